//! Engine tests on real files, checked by our own check and by qemu-img where it is installed.

use qcow2rs::{Compat, CreateOptions, Image, OpenOptions, Preallocation, RepairMode};
use std::path::Path;
use std::process::Command;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn qemu_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=human"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check failed for {}:\n{text}",
        path.display()
    );
}

fn qemu_compare_raw(raw: &Path, img: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(img)
        .output()
        .expect("qemu-img is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img compare: {text}");
}

fn workload(img: &Image, reference: &mut [u8], seed: u64, ops: usize) {
    let size = reference.len() as u64;
    let mut rng = Rng(seed);
    for _ in 0..ops {
        let op = rng.below(10);
        let off = rng.below(size);
        let len = (rng.below(200_000) + 1).min(size - off);
        match op {
            0..=5 => {
                let byte = (rng.next() & 0xff) as u8;
                let buf: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
                img.write_at(&buf, off).unwrap();
                reference[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            6 | 7 => {
                img.write_zeroes(off, len).unwrap();
                reference[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                // Discard reads back as zeros in v3 without backing (and v2 without backing).
                img.discard(off, len).unwrap();
                let cs = img.cluster_size() as u64;
                let first = off.div_ceil(cs) * cs;
                let mut last = (off + len) / cs * cs;
                if off + len == size {
                    last = size;
                }
                if last > first {
                    reference[first as usize..last as usize].fill(0);
                }
            }
            _ => img.flush().unwrap(),
        }
    }
}

fn run_case(
    cluster_size: u32,
    refcount_bits: u32,
    compat: Compat,
    extended_l2: bool,
    lazy: bool,
    prealloc: bool,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    let size = 8u64 << 20;
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster_size;
    opts.refcount_bits = refcount_bits;
    opts.compat = compat;
    opts.extended_l2 = extended_l2;
    opts.lazy_refcounts = lazy;
    if prealloc {
        opts.preallocation = Preallocation::Metadata;
    }
    Image::create(&path, &opts).unwrap();
    qemu_check(&path);
    let mut reference = vec![0u8; size as usize];
    {
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        workload(
            &img,
            &mut reference,
            cluster_size as u64 * 31 + refcount_bits as u64,
            60,
        );
        let mut back = vec![0u8; size as usize];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == reference, "read-back mismatch before close");
        let rep = img.check(None).unwrap();
        assert!(rep.is_clean(), "our check: {rep:?}");
        img.close().unwrap();
    }
    qemu_check(&path);
    let raw = dir.path().join("ref.raw");
    std::fs::write(&raw, &reference).unwrap();
    qemu_compare_raw(&raw, &path);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; size as usize];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == reference, "read-back mismatch after reopen");
}

#[test]
fn matrix_default() {
    run_case(65536, 16, Compat::V3, false, false, false);
}
#[test]
fn matrix_small_clusters() {
    run_case(512, 16, Compat::V3, false, false, false);
    run_case(4096, 1, Compat::V3, false, false, false);
    run_case(512, 64, Compat::V3, false, false, false);
}
#[test]
fn matrix_v2() {
    run_case(65536, 16, Compat::V2, false, false, false);
    run_case(4096, 16, Compat::V2, false, false, true);
}
#[test]
fn matrix_extended_l2() {
    run_case(65536, 16, Compat::V3, true, false, false);
    run_case(2 << 20, 16, Compat::V3, true, false, false);
}
#[test]
fn matrix_lazy_prealloc() {
    run_case(65536, 16, Compat::V3, false, true, false);
    run_case(65536, 16, Compat::V3, false, false, true);
    run_case(2 << 20, 8, Compat::V3, false, false, false);
}

#[test]
fn refcount_table_growth() {
    // 512-byte clusters with 64-bit refcounts: one refblock covers 64 clusters, one reftable
    // cluster 64 blocks = 4096 clusters = 2 MiB. Write 6 MiB to grow the table several times.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.qcow2");
    let mut opts = CreateOptions::new(16 << 20);
    opts.cluster_size = 512;
    opts.refcount_bits = 64;
    Image::create(&path, &opts).unwrap();
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 1 << 20).unwrap();
    img.close().unwrap();
    qemu_check(&path);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data);
    assert!(img.check(None).unwrap().is_clean());
}

#[test]
fn leak_repair() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.qcow2");
    Image::create(&path, &CreateOptions::new(4 << 20)).unwrap();
    {
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        img.write_at(&[1u8; 70000], 0).unwrap();
        img.close().unwrap();
    }
    // Make a leak: discard via qemu-io is fine, but simpler: bump the refcount of cluster 0.
    // Refcount block is at cluster 2 (16-bit entries): cluster 0 -> offset 2*65536.
    let mut f = std::fs::read(&path).unwrap();
    f[2 * 65536 + 1] = 2;
    std::fs::write(&path, &f).unwrap();
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    let rep = img.check(None).unwrap();
    assert_eq!((rep.leaks, rep.corruptions), (1, 0), "{rep:?}");
    let rep = img.check(Some(RepairMode::Leaks)).unwrap();
    assert_eq!((rep.leaks, rep.leaks_fixed), (0, 1), "{rep:?}");
    img.close().unwrap();
    qemu_check(&path);
}

#[test]
fn concurrent_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mt.qcow2");
    Image::create(&path, &CreateOptions::new(64 << 20)).unwrap();
    let img = std::sync::Arc::new(Image::open(&path, &OpenOptions::new()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let base = t * (16 << 20);
                let mut rng = Rng(t + 1);
                let mut model = vec![0u8; 16 << 20];
                for i in 0..400 {
                    let off = rng.below((16 << 20) - 70000);
                    let len = rng.below(70000) + 1;
                    let v = (i % 250) as u8 + 1;
                    if i % 7 == 3 {
                        img.discard(base + off, len).unwrap();
                        let cs = 65536;
                        let first = (base + off).div_ceil(cs) * cs - base;
                        let last = (base + off + len) / cs * cs - base;
                        if last > first {
                            model[first as usize..last as usize].fill(0);
                        }
                    } else {
                        img.write_at(&vec![v; len as usize], base + off).unwrap();
                        model[off as usize..(off + len) as usize].fill(v);
                    }
                    if i % 50 == 0 {
                        img.flush().unwrap();
                    }
                    let mut back = vec![0u8; len as usize];
                    img.read_at(&mut back, base + off).unwrap();
                    assert!(back == model[off as usize..(off + len) as usize]);
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let img = std::sync::Arc::try_unwrap(img).unwrap();
    let rep = img.check(None).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    img.close().unwrap();
    qemu_check(&path);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    for (t, m) in models.iter().enumerate() {
        let mut back = vec![0u8; m.len()];
        img.read_at(&mut back, t as u64 * (16 << 20)).unwrap();
        assert!(&back == m, "thread {t} region differs after reopen");
    }
}

fn poke_u64(path: &Path, off: usize, v: u64) {
    let mut f = std::fs::read(path).unwrap();
    f[off..off + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(path, &f).unwrap();
}

#[test]
fn repair_all_rebuilds_missing_refcount_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rb.qcow2");
    Image::create(&path, &CreateOptions::new(16 << 20)).unwrap();
    {
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        img.write_at(&vec![9u8; 3 << 20], 1 << 20).unwrap();
        img.close().unwrap();
    }
    // Drop the only refcount block from the refcount table (at cluster 1).
    poke_u64(&path, 65536, 0);
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    let rep = img.check(None).unwrap();
    assert!(rep.corruptions > 0, "{rep:?}");
    let rep = img.check(Some(RepairMode::All)).unwrap();
    assert!(rep.is_clean() && rep.rebuilt, "{rep:?}");
    img.write_at(&[1u8; 100_000], 8 << 20).unwrap();
    img.close().unwrap();
    qemu_check(&path);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; 3 << 20];
    img.read_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 9));
}

#[test]
fn corrupt_bit_forces_read_only_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cb.qcow2");
    Image::create(&path, &CreateOptions::new(16 << 20)).unwrap();
    poke_u64(&path, 72, 2); // incompatible feature bit 1: corrupt
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    assert!(img.is_read_only());
    let err = img.write_at(&[1], 0).unwrap_err();
    assert!(matches!(err, qcow2rs::Error::ReadOnly { .. }), "{err}");
    assert!(err.to_string().contains("cb.qcow2"), "{err}");
    let rep = img.check(Some(RepairMode::All)).unwrap();
    assert!(rep.is_clean());
    assert!(!img.is_read_only());
    img.write_at(&[1], 0).unwrap();
    img.close().unwrap();
    assert!(
        !Image::open(&path, &OpenOptions::read_only())
            .unwrap()
            .info()
            .unwrap()
            .corrupt
    );
    qemu_check(&path);
}

#[test]
fn unknown_incompatible_feature_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uf.qcow2");
    Image::create(&path, &CreateOptions::new(16 << 20)).unwrap();
    poke_u64(&path, 72, 1 << 20);
    let err = Image::open(&path, &OpenOptions::read_only()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bit 20") && msg.contains("uf.qcow2"), "{msg}");
}

#[test]
fn lazy_refcounts_crash_then_repair_on_open() {
    use qcow2rs::{MemStorage, Storage};
    use std::sync::Arc;
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(16 << 20);
    o.lazy_refcounts = true;
    Image::create_on(st.clone(), "lazy.qcow2", &o).unwrap();
    let img = Image::open_storage(st.clone(), "lazy.qcow2", &OpenOptions::new()).unwrap();
    img.write_at(&[3u8; 300_000], 12345).unwrap();
    img.flush().unwrap();
    // "Crash": copy the bytes as they are now, without closing.
    let crashed = Arc::new(MemStorage::from_vec(st.to_vec()));
    std::mem::forget(img);
    let ro = Image::open_storage(crashed.clone(), "lazy.qcow2", &OpenOptions::read_only()).unwrap();
    assert!(ro.info().unwrap().dirty);
    let rep = ro.check(None).unwrap();
    assert!(!rep.is_clean(), "stale refcounts should show: {rep:?}");
    drop(ro);
    let rw = Image::open_storage(crashed.clone(), "lazy.qcow2", &OpenOptions::new()).unwrap();
    assert!(!rw.info().unwrap().dirty);
    assert!(rw.check(None).unwrap().is_clean());
    let mut b = vec![0u8; 300_000];
    rw.read_at(&mut b, 12345).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    assert!(crashed.len().unwrap() > 0);
}

#[test]
fn freed_clusters_are_reused() {
    // Discard-and-rewrite must not grow the file without bound: freed gaps of any size are
    // reused once the discard is stable.
    for cluster_size in [512u32, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reuse.qcow2");
        let mut o = CreateOptions::new(64 << 20);
        o.cluster_size = cluster_size;
        Image::create(&path, &o).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let data = vec![0x3cu8; 4 << 20];
        let mut first = 0;
        for round in 0..6u64 {
            let off = (round % 3) * (8 << 20);
            img.write_at(&data, off).unwrap();
            img.flush().unwrap();
            if round == 0 {
                first = std::fs::metadata(&path).unwrap().len();
            }
            img.discard(off, data.len() as u64).unwrap();
            img.flush().unwrap();
        }
        img.write_at(&data, 0).unwrap();
        let rep = img.check(None).unwrap();
        assert!(rep.is_clean(), "{rep:?}");
        img.close().unwrap();
        let last = std::fs::metadata(&path).unwrap().len();
        assert!(
            last < first * 3 / 2,
            "{cluster_size}: file grew from {first} to {last} bytes while rewriting discarded space"
        );
        qemu_check(&path);
    }
}

#[test]
fn concurrent_writethrough_group_commit() {
    use qcow2rs::CacheMode;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wt.qcow2");
    Image::create(&path, &CreateOptions::new(256 << 20)).unwrap();
    let opts = OpenOptions {
        cache: CacheMode::Writethrough,
        ..OpenOptions::default()
    };
    let img = std::sync::Arc::new(Image::open(&path, &opts).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let off = (i * 8 + t) * 65536 + (t * 512);
                    img.write_at(&[(t + 1) as u8; 4096], off).unwrap();
                    if i % 50 == 7 {
                        img.discard(((i * 8 + t) * 65536) & !0xffff, 65536).unwrap();
                        img.write_at(&[(t + 1) as u8; 4096], off).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let syncs = img.sync_count();
    let img = std::sync::Arc::try_unwrap(img).unwrap();
    let rep = img.check(None).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    img.close().unwrap();
    qemu_check(&path);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    for t in 0..8u64 {
        for i in 0..200u64 {
            let off = (i * 8 + t) * 65536 + (t * 512);
            let mut b = [0u8; 4096];
            img.read_at(&mut b, off).unwrap();
            assert!(
                b.iter().all(|&x| x == (t + 1) as u8),
                "thread {t} write {i}"
            );
        }
    }
    assert!(syncs <= 2 * 1700, "{syncs} syncs");
}
