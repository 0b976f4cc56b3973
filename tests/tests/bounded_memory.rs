//! Bounded memory (issue 10, part 8): memory follows the configured caches, whatever the image.
//!
//! A child process (`memprobe`, tests/bin/memprobe.rs) creates a 16 TiB virtual image, writes 4 KiB
//! at thousands of offsets spread over the whole disk (each in its own L2 range at 64 KiB clusters),
//! reads them back and reads random unallocated blocks, under `/usr/bin/time -v`. Its peak RSS must
//! stay within
//!
//! ```text
//! RSS of the same run on a tiny image (code, allocator, per-cluster scratch buffers)
//!   + L2 cache + refcount cache (as configured, or their defaults)
//!   + the L1 table and the refcount table of the big image
//!   + 2 MiB
//! ```
//!
//! with the default caches and with small ones (1 MiB of L2 cache), so a structure that grows with
//! the virtual size or the file size (a 16 TiB image has 256 Mi clusters: a bitmap of them alone is
//! 32 MiB) fails the small-cache case. The same for 2 MiB clusters with 64-bit refcounts.
//!
//! `QCOW2RS_MEMORY_WRITES` sets the number of writes at 64 KiB clusters (default 10000; a tenth of
//! it at 2 MiB clusters, where each write allocates 2 MiB of sparse file).
//!
//! Long backing chains and many snapshots: open, read and write time at two sizes (30 and 60
//! levels, as the library refuses chains deeper than 64; 250 and 500 snapshots); the ratio must be far from quadratic.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qcow2rs::{CacheMode, CreateOptions, Image, OpenOptions};
use qcow2rs_tests::*;

const TIB: u64 = 1 << 40;

/// The tests of this file run one at a time: the memory probes load the machine, which would
/// skew the timings of the others.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn writes() -> u64 {
    std::env::var("QCOW2RS_MEMORY_WRITES")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("QCOW2RS_MEMORY_WRITES={s} is not a number"))
        })
        .unwrap_or(10000)
}

/// Peak RSS in bytes of one memprobe run, and its summary line.
#[allow(clippy::too_many_arguments)]
fn probe(
    dir: &Path,
    size: u64,
    cluster: u64,
    rb: u64,
    count: u64,
    l2: u64,
    rc: u64,
) -> (u64, String) {
    let img = dir.join("probe.qcow2");
    let _ = std::fs::remove_file(&img);
    let r = run(Command::new("/usr/bin/time")
        .arg("-v")
        .arg(env!("CARGO_BIN_EXE_memprobe"))
        .args([
            img.to_str().unwrap(),
            &size.to_string(),
            &cluster.to_string(),
            &rb.to_string(),
            &count.to_string(),
            &l2.to_string(),
            &rc.to_string(),
            "7",
        ]));
    let _ = std::fs::remove_file(&img);
    assert!(
        r.code == 0,
        "memprobe failed (is /usr/bin/time installed? apt-get install time):\n{r}"
    );
    let kib: u64 = r
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
        .unwrap_or_else(|| panic!("no peak RSS in /usr/bin/time's output:\n{r}"))
        .trim()
        .parse()
        .unwrap();
    (kib * 1024, r.stdout.trim().to_string())
}

/// Bytes of L2 and refcount cache the library uses for these options (open.rs: the byte size
/// divided by the cluster size, at least 2 tables; by default the L2 cache covers the disk up to
/// 32 MiB and the refcount cache is 4 clusters).
fn cache_bytes(size: u64, cluster: u64, l2: u64, rc: u64) -> u64 {
    let l1_entries = size.div_ceil(cluster * (cluster / 8));
    let l2_tables = if l2 > 0 {
        (l2 / cluster).max(2)
    } else {
        l1_entries.clamp(2, ((32 << 20) / cluster).max(2))
    };
    let rb_blocks = if rc > 0 { (rc / cluster).max(2) } else { 4 };
    (l2_tables + rb_blocks) * cluster
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Where the probe images go: /dev/shm when it is a tmpfs (the 64 KiB-cluster run allocates
/// ~700 MiB of L2 tables, and unlinking that from a busy disk can take a minute), else /tmp.
fn probe_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("qcow2rs-mem-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tmpdir()
}

fn bounded(cluster: u64, rb: u64, count: u64, caches: &[(u64, u64)]) {
    let dir = probe_dir();
    let size = 16 * TIB;
    for &(l2, rc) in caches {
        let (tiny, _) = probe(dir.path(), 64 * MIB, cluster, rb, 16, l2, rc);
        let (big, line) = probe(dir.path(), size, cluster, rb, count, l2, rc);
        let cache = cache_bytes(size, cluster, l2, rc);
        let l1 = size.div_ceil(cluster * (cluster / 8)) * 8;
        // The refcount table of the big file: one entry per refcount block.
        let file_bytes = count * cluster * 2 + l1;
        let per_block = cluster * 8 / rb;
        let reftable = file_bytes.div_ceil(cluster * per_block) * 8 + cluster;
        let bound = tiny + cache + l1 + reftable + (2 << 20);
        eprintln!(
            "cluster {cluster}, refcount_bits {rb}, L2 cache {}, refcount cache {}: peak RSS {:.1} MiB \
             (tiny image {:.1} MiB, caches {:.1} MiB, L1 {:.2} MiB; bound {:.1} MiB); {line}",
            if l2 > 0 { format!("{l2}") } else { "default".into() },
            if rc > 0 { format!("{rc}") } else { "default".into() },
            mib(big),
            mib(tiny),
            mib(cache),
            mib(l1),
            mib(bound)
        );
        assert!(
            big <= bound,
            "cluster {cluster}: peak RSS {:.1} MiB exceeds the bound {:.1} MiB (tiny image {:.1} MiB + \
             caches {:.1} MiB + L1 {:.2} MiB + refcount table + 2 MiB): something grows with the image",
            mib(big),
            mib(bound),
            mib(tiny),
            mib(cache),
            mib(l1)
        );
    }
}

#[test]
fn memory_bounded_by_caches_64k_clusters_16_tib() {
    let _serial = serial();
    bounded(65536, 16, writes(), &[(0, 0), (MIB, 256 * KIB)]);
}

#[test]
fn memory_bounded_by_caches_2m_clusters_64bit_refcounts_16_tib() {
    let _serial = serial();
    bounded(2 * MIB, 64, (writes() / 10).max(1), &[(0, 0), (MIB, MIB)]);
}

/// The best of five runs of `f`.
fn best_of_5(mut f: impl FnMut() -> Duration) -> Duration {
    (0..5).map(|_| f()).min().unwrap()
}

fn unsafe_open() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.cache = CacheMode::Unsafe;
    o
}

/// A chain of `levels` overlays over a base, each writing its own cluster; returns the top.
fn chain(dir: &Path, levels: usize) -> std::path::PathBuf {
    let size = 8 * MIB;
    let base = dir.join("l0.qcow2");
    Image::create(&base, &CreateOptions::new(size)).unwrap();
    for i in 1..=levels {
        let p = dir.join(format!("l{i}.qcow2"));
        let mut co = CreateOptions::new(size);
        co.backing_file = Some(format!("l{}.qcow2", i - 1));
        co.backing_format = Some("qcow2".into());
        Image::create(&p, &co).unwrap();
        let img = Image::open(&p, &unsafe_open()).unwrap();
        img.write_at(&[i as u8; 512], (i as u64 % 128) * 65536)
            .unwrap();
        img.close().unwrap();
    }
    dir.join(format!("l{levels}.qcow2"))
}

/// Open the top of the chain, read the whole disk (every unallocated cluster walks the chain),
/// write into 32 clusters (copy-on-write from deep in the chain), close.
fn chain_work(top: &Path) -> Duration {
    let t = Instant::now();
    let img = Image::open(top, &unsafe_open()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..8 * MIB).step_by(MIB as usize) {
        img.read_at(&mut buf, off).unwrap();
    }
    for c in 0..32u64 {
        img.write_at(&[0xee; 512], c * 65536 + 4096).unwrap();
    }
    // Do not keep the writes: the next run must do the same work.
    drop(img);
    t.elapsed()
}

#[test]
fn long_backing_chains_cost_linear_time() {
    let _serial = serial();
    let mut times = vec![];
    for levels in [30, 60] {
        let dir = tmpdir();
        let top = chain(dir.path(), levels);
        // The content is right: level i's cluster reads i from the top.
        let img = Image::open(&top, &OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 512];
        img.read_at(&mut b, (levels as u64 % 128) * 65536).unwrap();
        assert_eq!(b[0], levels as u8);
        drop(img);
        let copy = dir.path().join("work.qcow2");
        let t = best_of_5(|| {
            std::fs::copy(&top, &copy).unwrap();
            chain_work(&copy)
        });
        eprintln!("backing chain of {levels}: open + read 8 MiB + 32 COW writes: {t:?}");
        times.push(t);
    }
    let ratio = times[1].as_secs_f64() / times[0].as_secs_f64().max(1e-6);
    assert!(
        ratio < 3.2,
        "twice the backing-chain length costs {ratio:.2}x the time (linear: 2x, quadratic: 4x): {times:?}"
    );
}

/// An image with `n` snapshots of a 64 MiB disk with data in 16 clusters.
fn with_snapshots(path: &Path, n: usize) {
    Image::create(path, &CreateOptions::new(64 * MIB)).unwrap();
    let img = Image::open(path, &unsafe_open()).unwrap();
    for c in 0..16u64 {
        img.write_at(&[c as u8 + 1; 4096], c * 4 * MIB).unwrap();
    }
    for i in 0..n {
        img.create_snapshot(&format!("s{i}")).unwrap();
    }
    img.close().unwrap();
}

/// Open, read the disk, write into the 16 shared clusters (copy-on-write: refcount > 1), create and
/// delete one snapshot, close.
fn snapshot_work(path: &Path, n: usize) -> Duration {
    let t = Instant::now();
    let img = Image::open(path, &unsafe_open()).unwrap();
    assert_eq!(img.snapshots().len(), n);
    let mut buf = vec![0u8; 4096];
    for c in 0..16u64 {
        img.read_at(&mut buf, c * 4 * MIB).unwrap();
        assert_eq!(buf[0], c as u8 + 1);
        img.write_at(&[0xaa; 512], c * 4 * MIB).unwrap();
    }
    img.create_snapshot("extra").unwrap();
    img.delete_snapshot("extra").unwrap();
    img.close().unwrap();
    t.elapsed()
}

#[test]
fn many_snapshots_cost_linear_time() {
    let _serial = serial();
    let mut times = vec![];
    for n in [250, 500] {
        let dir = tmpdir();
        let orig = dir.path().join("snaps.qcow2");
        let t0 = Instant::now();
        with_snapshots(&orig, n);
        let created = t0.elapsed();
        let copy = dir.path().join("work.qcow2");
        let t = best_of_5(|| {
            std::fs::copy(&orig, &copy).unwrap();
            snapshot_work(&copy, n)
        });
        eprintln!(
            "{n} snapshots: created in {created:?}; open + read + 16 COW writes + create and delete one: {t:?}"
        );
        assert_qemu_clean(&copy);
        times.push(t);
    }
    let ratio = times[1].as_secs_f64() / times[0].as_secs_f64().max(1e-6);
    assert!(
        ratio < 3.2,
        "twice the snapshots cost {ratio:.2}x the time (linear: 2x, quadratic: 4x): {times:?}"
    );
}

/// preallocation=metadata allocates every cluster of the disk: the allocator's first-fit scan must
/// not start again from the first free cluster for each L2 range and refcount block (that made
/// creating a 512-byte-cluster image quadratic: 12 s for 32 MiB, where qemu-img takes 0.7 s; 2 MiB
/// took 70 ms and 16 MiB 2 s, 28x).
#[test]
fn preallocation_costs_linear_time() {
    let _serial = serial();
    let dir = tmpdir();
    let mut times = vec![];
    for size in [2 * MIB, 16 * MIB] {
        let t = best_of_5(|| {
            let p = dir.path().join("p.qcow2");
            let _ = std::fs::remove_file(&p);
            let mut co = CreateOptions::new(size);
            co.cluster_size = 512;
            co.preallocation = qcow2rs::Preallocation::Metadata;
            let t = Instant::now();
            Image::create(&p, &co).unwrap();
            t.elapsed()
        });
        eprintln!(
            "preallocation=metadata, 512-byte clusters, {} MiB: {t:?}",
            size >> 20
        );
        times.push(t);
    }
    assert_qemu_clean(&dir.path().join("p.qcow2"));
    let ratio = times[1].as_secs_f64() / times[0].as_secs_f64().max(1e-6);
    assert!(
        ratio < 16.0,
        "8x the disk costs {ratio:.1}x the time to preallocate (linear: 8x, quadratic: 64x): {times:?}"
    );
}
