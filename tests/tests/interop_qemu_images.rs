//! Images made and filled by qemu-img / qemu-io, read by qcow2rs.
//!
//! The reference is always qemu's own view: `qemu-img convert -O raw` of the image (following the
//! backing chain). We read the whole virtual disk through `Image::read_at` in pieces of random length
//! and compare byte for byte, check the image with our own `check` (clean, and the same allocated and
//! compressed cluster counts as `qemu-img check`), compare our `map` with `qemu-img map`, and make
//! sure that a read-only open changes no byte of the file and a read-write open + close keeps it
//! clean.

use std::path::Path;

use qcow2rs::{Image, OpenOptions};
use qcow2rs_tests::*;

/// Cluster size from the header.
fn cluster_size_of(path: &Path) -> u64 {
    1 << peek_be32(path, hdr::CLUSTER_BITS)
}

/// Per-512-byte (present, zero, data, compressed) classification of a map.
fn classify(
    size: u64,
    extents: impl Iterator<Item = (u64, u64, bool, bool, bool, bool)>,
) -> Vec<(bool, bool, bool, bool)> {
    let mut out = vec![(false, false, false, false); size.div_ceil(512) as usize];
    let mut covered = 0u64;
    for (start, len, present, zero, data, compressed) in extents {
        assert_eq!(start, covered, "map extents are not contiguous at {start}");
        for s in start / 512..(start + len).div_ceil(512) {
            out[s as usize] = (present, zero, data, compressed);
        }
        covered = start + len;
    }
    assert_eq!(covered, size, "map does not cover the whole disk");
    out
}

/// Our `map` says the same as `qemu-img map` about every sector: present, zero, data, compressed.
fn compare_map(path: &Path) {
    let img = Image::open(path, &OpenOptions::read_only()).unwrap();
    let size = img.virtual_size();
    let ours = img
        .map(0, size)
        .unwrap_or_else(|e| panic!("map {}: {e}", path.display()));
    img.close().unwrap();
    let theirs = qemu_map(path);
    let a = classify(
        size,
        ours.iter()
            .map(|e| (e.start, e.length, e.present, e.zero, e.data, e.compressed)),
    );
    let b = classify(
        size,
        theirs
            .iter()
            .map(|e| (e.start, e.length, e.present, e.zero, e.data, e.compressed)),
    );
    // Where a cluster has data, qemu-img also asks the host file system whether the data is a hole
    // (a preallocated but never written cluster then shows as zero); we do not probe the host for
    // holes, so `zero` is compared only where there is no data.
    let same = |x: (bool, bool, bool, bool), y: (bool, bool, bool, bool)| {
        x.0 == y.0 && x.2 == y.2 && x.3 == y.3 && (x.2 || x.1 == y.1)
    };
    if let Some(i) = (0..a.len()).find(|&i| !same(a[i], b[i])) {
        panic!(
            "{}: map differs from qemu-img map at guest offset {:#x}: ours (present, zero, data, \
             compressed) = {:?}, qemu-img = {:?}\nours: {:#?}\nqemu-img: {:#?}",
            path.display(),
            i * 512,
            a[i],
            b[i],
            ours.iter()
                .filter(|e| e.start <= i as u64 * 512 && i as u64 * 512 < e.start + e.length)
                .collect::<Vec<_>>(),
            theirs
                .iter()
                .filter(|e| e.start <= i as u64 * 512 && i as u64 * 512 < e.start + e.length)
                .collect::<Vec<_>>(),
        );
    }
}

/// Everything we check on an image that qemu made: returns qemu's check result.
fn verify(path: &Path, seed: u64) -> QemuCheck {
    let before = std::fs::read(path).unwrap();
    let want = qemu_read_all(path, "qcow2");
    let got = our_read_all(path, seed);
    assert_same(
        &format!("{}: qcow2rs read vs qemu-img convert", path.display()),
        &got,
        &want,
    );
    let ours = assert_our_check_clean(path);
    let q = assert_qemu_clean(path);
    assert_eq!(
        (ours.allocated_clusters, ours.compressed_clusters),
        (q.allocated_clusters, q.compressed_clusters),
        "{}: (allocated, compressed) clusters: ours vs qemu-img check\n{}",
        path.display(),
        q.json
    );
    let has_backing = peek_be64(path, hdr::BACKING_FILE_OFFSET) != 0;
    if !has_backing {
        compare_map(path);
    }
    assert!(
        std::fs::read(path).unwrap() == before,
        "{}: a read-only open, read and check changed the file",
        path.display()
    );
    // A read-write open and a close without writes keeps the image clean and its content intact.
    Image::open(path, &OpenOptions::new())
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
        .close()
        .unwrap();
    assert_qemu_clean(path);
    assert_same(
        &format!(
            "{}: content after a read-write open + close",
            path.display()
        ),
        &qemu_read_all(path, "qcow2"),
        &want,
    );
    q
}

/// Creates an image with qemu-img, fills it with a random qemu-io workload and verifies it.
fn qemu_case(size: u64, opts: &str, seed: u64, ops: usize, max_len: u64) -> QemuCheck {
    let dir = tmpdir();
    let p = path_in(&dir, "img.qcow2");
    qemu_create(&p, size, opts);
    let cs = cluster_size_of(&p);
    let mut rng = Rng::new(seed);
    qemu_io(
        &p,
        "qcow2",
        &qemu_io_workload(&mut rng, size, cs, ops, max_len),
    );
    let q = verify(&p, seed);
    assert!(q.allocated_clusters > 0, "the workload allocated nothing");
    q
}

// ---- cluster sizes -------------------------------------------------------------------------------

#[test]
fn qemu_cluster_512() {
    qemu_case(16 * MIB, "cluster_size=512", 1, 400, 64 * KIB);
}

#[test]
fn qemu_cluster_4k() {
    qemu_case(32 * MIB, "cluster_size=4k", 2, 400, 256 * KIB);
}

#[test]
fn qemu_cluster_64k() {
    qemu_case(64 * MIB, "cluster_size=64k", 3, 400, 512 * KIB);
}

#[test]
fn qemu_cluster_2m() {
    qemu_case(32 * MIB, "cluster_size=2M", 4, 200, 3 * MIB);
}

// ---- refcount widths -----------------------------------------------------------------------------

#[test]
fn qemu_refcount_bits_1() {
    qemu_case(
        16 * MIB,
        "cluster_size=4k,refcount_bits=1",
        11,
        300,
        128 * KIB,
    );
}

#[test]
fn qemu_refcount_bits_16() {
    qemu_case(
        16 * MIB,
        "cluster_size=64k,refcount_bits=16",
        12,
        300,
        256 * KIB,
    );
}

#[test]
fn qemu_refcount_bits_64() {
    // 512-byte clusters and 64-bit refcounts: one refblock covers 64 clusters (32 KiB of file), so
    // the workload makes qemu allocate many refblocks and grow the refcount table.
    qemu_case(
        8 * MIB,
        "cluster_size=512,refcount_bits=64",
        13,
        300,
        64 * KIB,
    );
}

#[test]
fn qemu_refcount_bits_other_widths() {
    for (i, bits) in [2u32, 4, 8, 32].into_iter().enumerate() {
        qemu_case(
            8 * MIB,
            &format!("cluster_size=4k,refcount_bits={bits}"),
            14 + i as u64,
            150,
            64 * KIB,
        );
    }
}

// ---- versions and features -----------------------------------------------------------------------

#[test]
fn qemu_compat_v2() {
    qemu_case(32 * MIB, "compat=0.10", 21, 300, 256 * KIB);
    qemu_case(8 * MIB, "compat=0.10,cluster_size=512", 22, 200, 32 * KIB);
}

#[test]
fn qemu_lazy_refcounts_clean_close() {
    qemu_case(32 * MIB, "lazy_refcounts=on", 23, 300, 256 * KIB);
}

#[test]
fn qemu_preallocation_metadata() {
    for (cs, seed) in [("64k", 24u64), ("512", 25), ("2M", 26)] {
        let dir = tmpdir();
        let p = path_in(&dir, "prealloc.qcow2");
        let size = 16 * MIB;
        qemu_create(
            &p,
            size,
            &format!("preallocation=metadata,cluster_size={cs}"),
        );
        // Freshly preallocated: every cluster is a preallocated zero cluster.
        let q = verify(&p, seed);
        assert_eq!(q.allocated_clusters, size / cluster_size_of(&p));
        let mut rng = Rng::new(seed);
        let csz = cluster_size_of(&p);
        qemu_io(
            &p,
            "qcow2",
            &qemu_io_workload(&mut rng, size, csz, 200, 256 * KIB),
        );
        verify(&p, seed + 100);
    }
}

/// Zero clusters with and without an allocation, discards and partial writes into each.
#[test]
fn qemu_zero_discard_partial_clusters() {
    for (compat, seed) in [("1.1", 31u64), ("0.10", 32)] {
        let dir = tmpdir();
        let p = path_in(&dir, "z.qcow2");
        qemu_create(&p, 16 * MIB, &format!("compat={compat}"));
        let cmds: Vec<String> = [
            "write -P 0xaa 0 1M",
            "write -z 65536 65536",
            "write -z -u 131072 65536",
            "discard 196608 131072",
            "write -P 0xbb 200000 1000",
            "write -P 0xcc 70000 100",
            "write -P 0xcd 140000 4096",
            "write -z 300000 5000",
            "write -P 0xdd 1048576 513",
            "write -P 0xee 2097151 2",
            "write -z 4194304 1048576",
            "write -P 0x11 4259840 7",
            "discard 8388608 65536",
            "write -P 0x12 16777215 1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        qemu_io(&p, "qcow2", &cmds);
        verify(&p, seed);
    }
}

// ---- compression ---------------------------------------------------------------------------------

/// A raw disk whose clusters are compressible text, zeros or random data.
fn compressible_disk(seed: u64, size: u64, cs: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut disk = Vec::with_capacity(size as usize);
    for c in 0..size / cs {
        match c % 7 {
            3 => disk.extend(std::iter::repeat_n(0u8, cs as usize)),
            5 => disk.extend(rng.bytes(cs as usize)),
            _ => disk.extend(compressible(seed * 100_000 + c, cs as usize)),
        }
    }
    disk
}

fn qemu_compressed_case(ctype: &str, cs: u64, seed: u64) {
    let dir = tmpdir();
    let src = path_in(&dir, "src.raw");
    let p = path_in(&dir, "comp.qcow2");
    let size = 16 * MIB;
    let disk = compressible_disk(seed, size, cs);
    std::fs::write(&src, &disk).unwrap();
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={ctype},cluster_size={cs}"),
        src.to_str().unwrap(),
        p.to_str().unwrap(),
    ])
    .ok();
    let q = verify(&p, seed);
    assert!(
        q.compressed_clusters > 0 && q.text.contains("compressed clusters"),
        "qemu-img stored no compressed cluster: the test data is not compressible\n{}",
        q.text
    );
    assert!(
        !q.text.contains(" 0.00% compressed"),
        "no compressed clusters: {}",
        q.text
    );
    assert_same("compressed image vs source", &our_read_all(&p, seed), &disk);
    // Partial overwrites of compressed clusters (copy-on-write of the decompressed data),
    // discards and zeroes on top.
    let mut rng = Rng::new(seed + 1);
    qemu_io(
        &p,
        "qcow2",
        &qemu_io_workload(&mut rng, size, cs, 80, 128 * KIB),
    );
    verify(&p, seed + 2);
}

#[test]
fn qemu_compressed_zlib_64k() {
    qemu_compressed_case("zlib", 64 * KIB, 41);
}

#[test]
fn qemu_compressed_zstd_64k() {
    qemu_compressed_case("zstd", 64 * KIB, 42);
}

#[test]
fn qemu_compressed_zlib_4k() {
    qemu_compressed_case("zlib", 4 * KIB, 43);
}

#[test]
fn qemu_compressed_zstd_2m() {
    qemu_compressed_case("zstd", 2 * MIB, 44);
}

/// `qemu-io write -c` at the cluster-size extremes (the compressed descriptor's offset/size split
/// moves with cluster_bits).
#[test]
fn qemu_write_compressed_cluster_extremes() {
    for (cs, ctype, seed) in [
        (512u64, "zlib", 45u64),
        (512, "zstd", 46),
        (2 * MIB, "zlib", 47),
        (32 * KIB, "zstd", 48),
    ] {
        let dir = tmpdir();
        let p = path_in(&dir, "wc.qcow2");
        let size = 8 * MIB;
        qemu_create(
            &p,
            size,
            &format!("cluster_size={cs},compression_type={ctype}"),
        );
        // Every cluster gets its own pattern byte, so a cluster read from the wrong place shows.
        let n = (size / cs).min(48);
        let mut cmds = Vec::new();
        for c in 0..n {
            if c % 3 != 2 {
                cmds.push(format!(
                    "write -c -P {:#x} {} {}",
                    (c * 7 + 1) % 256,
                    c * cs,
                    cs
                ));
            }
        }
        cmds.push(format!("write -P 0x77 {} 100", cs / 2)); // partial overwrite of a compressed cluster
        qemu_io(&p, "qcow2", &cmds);
        let q = verify(&p, seed);
        assert!(q.compressed_clusters > 0, "{}", q.text);
    }
}

// ---- backing chains ------------------------------------------------------------------------------

#[test]
fn qemu_backing_chain_qcow2() {
    let dir = tmpdir();
    let base = path_in(&dir, "base.qcow2");
    let mid = path_in(&dir, "mid.qcow2");
    let top = path_in(&dir, "top.qcow2");
    let size = 16 * MIB;
    let mut rng = Rng::new(51);
    qemu_create(&base, size, "cluster_size=4k");
    qemu_io(
        &base,
        "qcow2",
        &qemu_io_workload(&mut rng, size, 4 * KIB, 250, 512 * KIB),
    );
    qemu_create_overlay(&mid, "base.qcow2", "qcow2", "cluster_size=64k", None);
    qemu_io(
        &mid,
        "qcow2",
        &qemu_io_workload(&mut rng, size, 64 * KIB, 150, 256 * KIB),
    );
    qemu_create_overlay(&top, "mid.qcow2", "qcow2", "cluster_size=512", None);
    qemu_io(
        &top,
        "qcow2",
        &qemu_io_workload(&mut rng, size, 512, 150, 64 * KIB),
    );
    verify(&top, 52);
    verify(&mid, 53);
}

#[test]
fn qemu_backing_chain_raw_base_shorter() {
    // raw base (8 MiB) <- mid (12 MiB, v2) <- top (16 MiB): reads past the end of a shorter
    // backing file are zeros.
    let dir = tmpdir();
    let base = path_in(&dir, "base.raw");
    let mid = path_in(&dir, "mid.qcow2");
    let top = path_in(&dir, "top.qcow2");
    let mut rng = Rng::new(54);
    std::fs::write(&base, rng.bytes(8 * MIB as usize)).unwrap();
    qemu_create_overlay(&mid, "base.raw", "raw", "compat=0.10", Some(12 * MIB));
    qemu_io(
        &mid,
        "qcow2",
        &qemu_io_workload(&mut rng, 12 * MIB, 64 * KIB, 150, 256 * KIB),
    );
    qemu_create_overlay(
        &top,
        "mid.qcow2",
        "qcow2",
        "cluster_size=4k",
        Some(16 * MIB),
    );
    qemu_io(
        &top,
        "qcow2",
        &qemu_io_workload(&mut rng, 16 * MIB, 4 * KIB, 200, 128 * KIB),
    );
    verify(&top, 55);
    verify(&mid, 56);
}

// ---- extended L2 entries (subclusters) -------------------------------------------------------------

/// Writes, write-zeroes and discards aligned to subclusters, plus a few unaligned writes.
fn subcluster_ops(rng: &mut Rng, size: u64, cs: u64, n: usize) -> Vec<String> {
    let sc = cs / 32;
    let mut cmds = Vec::new();
    for _ in 0..n {
        let k = rng.below(size / sc);
        let m = rng.range(1, 6).min(size / sc - k);
        cmds.push(match rng.below(10) {
            0..=4 => format!("write -P {:#x} {} {}", rng.range(1, 255), k * sc, m * sc),
            5..=6 => format!("write -z {} {}", k * sc, m * sc),
            7 => {
                let c = rng.below(size / cs);
                format!("discard {} {cs}", c * cs)
            }
            _ => format!(
                "write -P {:#x} {} {}",
                rng.range(1, 255),
                k * sc + rng.below(sc),
                rng.range(1, 2 * sc).min(size - k * sc - sc).max(1)
            ),
        });
    }
    cmds
}

#[test]
fn qemu_extended_l2() {
    for (cs, seed) in [(64 * KIB, 61u64), (128 * KIB, 62), (2 * MIB, 63)] {
        let dir = tmpdir();
        let p = path_in(&dir, "ext.qcow2");
        let size = 16 * MIB;
        qemu_create(&p, size, &format!("cluster_size={cs},extended_l2=on"));
        let mut rng = Rng::new(seed);
        let mut cmds = subcluster_ops(&mut rng, size, cs, 200);
        cmds.extend(qemu_io_workload(&mut rng, size, cs, 60, 256 * KIB));
        qemu_io(&p, "qcow2", &cmds);
        verify(&p, seed);
    }
}

#[test]
fn qemu_extended_l2_over_backing() {
    // Unallocated subclusters of the overlay read from the backing file; zeroed ones read zeros.
    let dir = tmpdir();
    let base = path_in(&dir, "base.qcow2");
    let top = path_in(&dir, "top.qcow2");
    let size = 16 * MIB;
    let mut rng = Rng::new(64);
    qemu_create(&base, size, "");
    qemu_io(&base, "qcow2", &[format!("write -P 0x5a 0 {size}")]);
    qemu_io(
        &base,
        "qcow2",
        &qemu_io_workload(&mut rng, size, 64 * KIB, 100, 256 * KIB),
    );
    qemu_create_overlay(
        &top,
        "base.qcow2",
        "qcow2",
        "cluster_size=128k,extended_l2=on",
        None,
    );
    qemu_io(
        &top,
        "qcow2",
        &subcluster_ops(&mut rng, size, 128 * KIB, 250),
    );
    verify(&top, 65);
}

// ---- lazy refcounts after a crash ------------------------------------------------------------------

/// qemu-io is killed after a flush with lazy refcounts on: the dirty bit stays set and the refcounts
/// on disk are stale. A read-only open reads the data; a read-write open repairs the image.
#[test]
fn qemu_lazy_refcounts_dirty_after_crash() {
    let dir = tmpdir();
    let p = path_in(&dir, "lazy.qcow2");
    let size = 16 * MIB;
    qemu_create(&p, size, "lazy_refcounts=on,cluster_size=4k");
    let r = qemu_io_raw(
        &p,
        "qcow2",
        &[
            "write -P 0x11 0 1M".to_string(),
            "write -P 0x22 3M 100k".to_string(),
            "write -P 0x33 5000 3000".to_string(),
            "flush".to_string(),
            "sigraise 9".to_string(),
        ],
    );
    assert_ne!(r.code, 0, "qemu-io was not killed:\n{r}");
    let mut want = vec![0u8; size as usize];
    want[..MIB as usize].fill(0x11);
    want[3 * MIB as usize..3 * MIB as usize + 100 * 1024].fill(0x22);
    want[5000..8000].fill(0x33);
    assert_ne!(
        peek_be64(&p, hdr::INCOMPATIBLE_FEATURES) & 1,
        0,
        "the dirty bit is not set: the crash scenario did not happen"
    );
    let q = qemu_check(&p);
    assert_eq!(
        q.code, 2,
        "qemu-img check should see stale refcounts:\n{}",
        q.text
    );
    // Read-only: the data is there, and our check sees the stale refcounts too.
    assert_same("dirty image, read-only read", &our_read_all(&p, 66), &want);
    let ours = our_check(&p);
    assert!(
        ours.corruptions > 0,
        "our check of a dirty image with stale refcounts found no corruption: {ours:?}"
    );
    // Read-write open repairs; then write more.
    let img = Image::open(&p, &OpenOptions::new())
        .unwrap_or_else(|e| panic!("read-write open of a dirty lazy-refcount image: {e}"));
    img.write_at(&[0x44; 70_000], 6 * MIB).unwrap();
    want[6 * MIB as usize..6 * MIB as usize + 70_000].fill(0x44);
    img.close().unwrap();
    assert_eq!(
        peek_be64(&p, hdr::INCOMPATIBLE_FEATURES) & 1,
        0,
        "dirty bit still set after a clean close"
    );
    assert_qemu_clean(&p);
    assert_same("repaired image", &qemu_read_all(&p, "qcow2"), &want);
    assert_our_check_clean(&p);
}

// ---- internal snapshots (made by qemu-img) -------------------------------------------------------

/// An image with internal snapshots: we read the active state, our check counts the snapshots'
/// references, and writes over clusters shared with a snapshot copy them (COPIED clear, refcount 2)
/// without touching the snapshot, which qemu-img then still reads back intact.
#[test]
fn qemu_internal_snapshots_shared_clusters() {
    // With 2-bit refcounts (at most 3 references) qemu-img itself cannot apply s1 when s1, s2 and
    // the active layer share a cluster, so that image gets one snapshot.
    for (opts, seed, two) in [
        ("cluster_size=64k", 71u64, true),
        ("cluster_size=4k,refcount_bits=2", 72, false),
    ] {
        let dir = tmpdir();
        let p = path_in(&dir, "snap.qcow2");
        let size = 16 * MIB;
        qemu_create(&p, size, opts);
        let cs = cluster_size_of(&p);
        let mut rng = Rng::new(seed);
        qemu_io(
            &p,
            "qcow2",
            &qemu_io_workload(&mut rng, size, cs, 150, 256 * KIB),
        );
        qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]).ok();
        let s1 = qemu_read_all(&p, "qcow2");
        qemu_io(
            &p,
            "qcow2",
            &qemu_io_workload(&mut rng, size, cs, 100, 256 * KIB),
        );
        if two {
            qemu_img(&["snapshot", "-c", "s2", p.to_str().unwrap()]).ok();
        }
        verify(&p, seed);

        // Our writes over shared clusters (the model read first: qemu-img cannot open the
        // image while we hold it read-write).
        let mut model = Model::zeros(size, cs);
        model.data = qemu_read_all(&p, "qcow2");
        let img = Image::open(&p, &OpenOptions::new())
            .unwrap_or_else(|e| panic!("open an image with snapshots read-write: {e}"));
        run_workload(
            &img,
            &mut model,
            &mut rng,
            &Workload {
                ops: 150,
                ..Workload::default()
            },
        );
        img.close().unwrap();
        let reference = path_in(&dir, "ref.raw");
        model.save(&reference);
        assert_qemu_clean(&p);
        assert_qemu_compare(&reference, &p);
        assert_our_check_clean(&p);
        // Snapshot s1 still holds what it held.
        qemu_img(&["snapshot", "-a", "s1", p.to_str().unwrap()]).ok();
        assert_same(
            "snapshot s1 after our writes",
            &qemu_read_all(&p, "qcow2"),
            &s1,
        );
        assert_qemu_clean(&p);
    }
}

// ---- random configurations -----------------------------------------------------------------------

/// Seeded random qemu-img option sets and qemu-io workloads (with a backing file for some):
/// everything qemu writes, we read.
#[test]
fn qemu_random_configurations() {
    for seed in 0..24u64 {
        let mut rng = Rng::new(7000 + seed);
        let cs = *rng.pick(&[512u64, 2048, 4096, 32768, 65536, 524_288, 2 * MIB]);
        let size = if cs == 2 * MIB { 16 * MIB } else { 8 * MIB };
        let mut opts = vec![format!("cluster_size={cs}")];
        if rng.chance(25) {
            opts.push("compat=0.10".into());
        } else {
            opts.push(format!(
                "refcount_bits={}",
                rng.pick(&[1u32, 2, 4, 8, 16, 32, 64])
            ));
            if rng.chance(30) {
                opts.push("lazy_refcounts=on".into());
            }
            if cs >= 16384 && rng.chance(40) {
                opts.push("extended_l2=on".into());
            }
            if rng.chance(30) {
                opts.push("compression_type=zstd".into());
            }
        }
        let dir = tmpdir();
        let p = path_in(&dir, "random.qcow2");
        let backing = rng.chance(40);
        if backing {
            let b = path_in(&dir, "b.qcow2");
            let blen = rng.range(1, size / 512) * 512;
            qemu_create(&b, blen, "cluster_size=4k");
            qemu_io(
                &b,
                "qcow2",
                &qemu_io_workload(&mut rng, blen, 4096, 60, 512 * KIB),
            );
            qemu_create_overlay(&p, "b.qcow2", "qcow2", &opts.join(","), Some(size));
        } else {
            if rng.chance(20) {
                opts.push("preallocation=metadata".into());
            }
            qemu_create(&p, size, &opts.join(","));
        }
        eprintln!("seed {seed}: {} backing={backing}", opts.join(","));
        let max_len = rng.range(4 * KIB, 512 * KIB);
        let mut cmds = qemu_io_workload(&mut rng, size, cs, 150, max_len);
        // Compressed writes of whole clusters go first: qemu-io refuses them on allocated
        // clusters. The workload then overwrites some of them.
        if !backing && !opts.iter().any(|o| o.starts_with("preallocation")) {
            let mut c = vec![];
            for k in 0..4 {
                let cl = (size / cs - 1).saturating_sub(2 * k);
                c.push(format!("write -c -P {:#x} {} {cs}", 0x70 + k, cl * cs));
            }
            c.extend(cmds);
            cmds = c;
        }
        qemu_io(&p, "qcow2", &cmds);
        verify(&p, seed);
    }
}
