//! Allocating writes run their data I/O outside the image lock (`core/src/datapath.rs`,
//! `write_allocating`): host clusters are reserved under the lock, the data (copy-on-write
//! included) is written without it, and the entries are linked under the lock again. These
//! tests put other operations into that window on plain images, deterministically through the
//! `testing` hook (which runs after the unlocked data write, before the lock is taken again),
//! and require the result a serial order gives (the window's operation first, then the write),
//! no leaked reservation, a clean `qemu-img check` and the data after a reopen.
//!
//! The encrypted variants are in `concurrent_encrypted.rs`; random concurrent work on one image
//! is `stress.rs`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qcow2rs::{CreateOptions, Image, OpenOptions, RepairMode};
use qcow2rs_tests::*;

const CS: u64 = 64 * KIB;

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    Image::create(&p, &CreateOptions::new(size)).unwrap();
    p
}

fn open(p: &Path) -> Arc<Image> {
    Arc::new(Image::open(p, &OpenOptions::new()).unwrap())
}

fn fill(len: u64, tag: u8) -> Vec<u8> {
    (0..len)
        .map(|i| tag ^ (i as u8).wrapping_mul(13) ^ (i >> 9) as u8 ^ 0x40)
        .collect()
}

fn read(img: &Image, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    img.read_at(&mut b, off).unwrap();
    b
}

fn assert_clean(img: &Image, what: &str) {
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{what}: {:?}",
        r.messages
    );
}

/// Flush, close, `qemu-img check`, reopen, and compare `expect` (offset, bytes).
fn settle(img: Arc<Image>, path: &Path, expect: &[(u64, Vec<u8>)]) {
    assert_clean(&img, "before close");
    for (off, want) in expect {
        assert!(
            read(&img, *off, want.len() as u64) == *want,
            "data at {off:#x} before close"
        );
    }
    img.flush().unwrap();
    let refs = Arc::strong_count(&img);
    Arc::try_unwrap(img)
        .unwrap_or_else(|_| panic!("the image is still shared ({refs} references)"))
        .close()
        .unwrap();
    assert_qemu_clean(path);
    let img = open(path);
    for (off, want) in expect {
        assert!(
            read(&img, *off, want.len() as u64) == *want,
            "data at {off:#x} after reopen"
        );
    }
}

/// Run `op` in the window of the next allocating write on this thread.
fn in_window(img: &Arc<Image>, op: impl FnOnce(&Image) + 'static) {
    let inner = img.clone();
    qcow2rs::testing::between_reserve_and_write(move || op(&inner));
}

#[test]
fn another_write_to_the_same_cluster_in_the_window_is_kept() {
    let dir = TempDir::new().unwrap();
    let path = image(dir.path(), "a.qcow2", 4 * MIB);
    let img = open(&path);
    // Partial writes: both land in the one cluster (the outer one is redone in place).
    let (a, b) = (fill(4 * KIB, 1), fill(4 * KIB, 2));
    let b2 = b.clone();
    in_window(&img, move |i| i.write_at(&b2, 3 * CS + 8 * KIB).unwrap());
    img.write_at(&a, 3 * CS).unwrap();
    // Whole clusters: the outer write is the later one and wins on cluster 5; the inner one
    // also allocates cluster 9, taking the next free cluster meanwhile.
    let (c, d, e) = (fill(2 * CS, 3), fill(CS, 4), fill(CS, 5));
    let (d2, e2) = (d.clone(), e.clone());
    in_window(&img, move |i| {
        i.write_at(&d2, 5 * CS).unwrap();
        i.write_at(&e2, 9 * CS).unwrap();
    });
    img.write_at(&c, 4 * CS).unwrap();
    let mut cluster3 = vec![0u8; CS as usize];
    cluster3[..4096].copy_from_slice(&a);
    cluster3[8192..12288].copy_from_slice(&b);
    settle(img, &path, &[(3 * CS, cluster3), (4 * CS, c), (9 * CS, e)]);
}

#[test]
fn discard_and_zero_in_the_window_come_first() {
    let dir = TempDir::new().unwrap();
    let path = image(dir.path(), "a.qcow2", 4 * MIB);
    let img = open(&path);
    let old = fill(4 * CS, 6);
    img.write_at(&old, 0).unwrap();
    // Shared with a snapshot: a partial write copies the rest of the old cluster first.
    img.create_snapshot("base").unwrap();
    let (a, b) = (fill(4 * KIB, 7), fill(4 * KIB, 8));
    in_window(&img, |i| i.discard(CS, CS).unwrap());
    img.write_at(&a, CS + 4 * KIB).unwrap();
    in_window(&img, |i| i.write_zeroes(2 * CS, CS).unwrap());
    img.write_at(&b, 2 * CS + 60 * KIB).unwrap();
    // A plain zero-fill of part of a cluster the write targets, and a discard of a cluster
    // the write allocates and one it does not touch.
    let c = fill(CS + 8 * KIB, 9);
    in_window(&img, |i| {
        i.write_zeroes(3 * CS + 4 * KIB, 4 * KIB).unwrap();
        i.discard(0, CS).unwrap();
    });
    img.write_at(&c, 3 * CS).unwrap();
    let mut c1 = vec![0u8; CS as usize];
    c1[4096..8192].copy_from_slice(&a);
    let mut c2 = vec![0u8; CS as usize];
    c2[60 * 1024..].copy_from_slice(&b);
    let mut c4 = vec![0u8; CS as usize];
    c4[..8192].copy_from_slice(&c[CS as usize..]);
    settle(
        img,
        &path,
        &[
            (0, vec![0u8; CS as usize]),
            (CS, c1),
            (2 * CS, c2),
            (3 * CS, c[..CS as usize].to_vec()),
            (4 * CS, c4),
        ],
    );
    // The snapshot still holds the old data.
    let snap = Image::open(
        &path,
        &OpenOptions {
            read_only: true,
            snapshot: Some("base".into()),
            ..OpenOptions::new()
        },
    )
    .unwrap();
    assert!(read(&snap, 0, 4 * CS) == old);
}

#[test]
fn copy_on_write_from_a_backing_file_with_a_discard_in_the_window() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.raw");
    let back = fill(MIB, 10);
    std::fs::write(&base, &back).unwrap();
    let path = dir.path().join("over.qcow2");
    let mut o = CreateOptions::new(MIB);
    o.backing_file = Some(base.to_str().unwrap().into());
    o.backing_format = Some("raw".into());
    Image::create(&path, &o).unwrap();
    let img = open(&path);
    let a = fill(4 * KIB, 11);
    // No window: copy-on-write from the backing file, read under the lock, written without.
    img.write_at(&a, 2 * CS + 4 * KIB).unwrap();
    // A discard in the window makes the cluster a zero cluster (the backing file must not
    // show through): the write is redone over zeros.
    in_window(&img, |i| i.discard(3 * CS, CS).unwrap());
    img.write_at(&a, 3 * CS + 4 * KIB).unwrap();
    let mut c2 = back[2 * CS as usize..3 * CS as usize].to_vec();
    c2[4096..8192].copy_from_slice(&a);
    let mut c3 = vec![0u8; CS as usize];
    c3[4096..8192].copy_from_slice(&a);
    let c4 = back[4 * CS as usize..5 * CS as usize].to_vec();
    settle(img, &path, &[(2 * CS, c2), (3 * CS, c3), (4 * CS, c4)]);
}

#[test]
fn resize_in_the_window_fails_a_write_past_the_new_end_and_keeps_one_below() {
    let dir = TempDir::new().unwrap();
    let path = image(dir.path(), "a.qcow2", 4 * MIB);
    let img = open(&path);
    let a = fill(CS + 4 * KIB, 12);
    in_window(&img, |i| i.resize(2 * MIB).unwrap());
    let err = img.write_at(&a, 40 * CS).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    assert_eq!(img.virtual_size(), 2 * MIB);
    assert_clean(&img, "after the failed write");
    in_window(&img, |i| i.resize(MIB).unwrap());
    img.write_at(&a, 4 * CS).unwrap();
    in_window(&img, |i| i.resize(3 * MIB).unwrap());
    img.write_at(&a, 10 * CS).unwrap();
    settle(img, &path, &[(4 * CS, a.clone()), (10 * CS, a.clone())]);
}

#[test]
fn snapshot_created_in_the_window_holds_the_old_data() {
    let dir = TempDir::new().unwrap();
    let path = image(dir.path(), "a.qcow2", 4 * MIB);
    let img = open(&path);
    let old = fill(2 * CS, 13);
    img.write_at(&old, 0).unwrap();
    img.create_snapshot("one").unwrap();
    // The write copies cluster 0 (shared) and allocates cluster 2 (new) while a second
    // snapshot is taken: the snapshot is the image before the write.
    let a = fill(CS + CS / 2, 14);
    in_window(&img, |i| {
        i.create_snapshot("two").unwrap();
    });
    img.write_at(&a, CS / 2 + CS).unwrap();
    let mut want = old.clone();
    want.extend(vec![0u8; CS as usize]);
    want[(CS + CS / 2) as usize..].copy_from_slice(&a);
    assert_eq!(want.len() as u64, 3 * CS);
    settle(img, &path, &[(0, want)]);
    for (name, want) in [("one", &old), ("two", &old)] {
        let snap = Image::open(
            &path,
            &OpenOptions {
                read_only: true,
                snapshot: Some(name.into()),
                ..OpenOptions::new()
            },
        )
        .unwrap();
        assert!(read(&snap, 0, 2 * CS) == *want, "snapshot {name}");
        assert!(read(&snap, 2 * CS, CS).iter().all(|&b| b == 0));
    }
}

#[test]
fn flush_in_the_window_then_the_next_flush_covers_the_write() {
    let dir = TempDir::new().unwrap();
    let path = image(dir.path(), "a.qcow2", 4 * MIB);
    let img = open(&path);
    let a = fill(3 * CS, 15);
    in_window(&img, |i| i.flush().unwrap());
    img.write_at(&a, 7 * CS + 512).unwrap();
    // Only an entry-free image was flushed in the window: the write's entries are dirty now.
    let before = img.sync_count();
    img.flush().unwrap();
    assert!(
        img.sync_count() > before,
        "the flush after the write synced nothing"
    );
    settle(img, &path, &[(7 * CS + 512, a)]);
}

#[test]
fn check_and_repair_in_the_window_wait_for_the_reservations() {
    let dir = TempDir::new().unwrap();
    let path = image(dir.path(), "a.qcow2", 4 * MIB);
    let img = open(&path);
    for (k, repair) in [None, Some(RepairMode::Leaks), Some(RepairMode::All)]
        .into_iter()
        .enumerate()
    {
        let at = (20 + 4 * k as u64) * CS + 4 * KIB;
        let inner = img.clone();
        let slot: Arc<Mutex<Option<std::thread::JoinHandle<_>>>> = Default::default();
        let s2 = slot.clone();
        qcow2rs::testing::between_reserve_and_write(move || {
            let i = inner.clone();
            let h = std::thread::spawn(move || i.check(repair).unwrap());
            // Let the check reach the lock while this write is in the window.
            std::thread::sleep(std::time::Duration::from_millis(50));
            *s2.lock().unwrap() = Some(h);
        });
        let a = fill(2 * CS + 4 * KIB, 16);
        img.write_at(&a, at).unwrap();
        let r = slot.lock().unwrap().take().unwrap().join().unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.leaks_fixed, r.corruptions_fixed),
            (0, 0, 0, 0),
            "{repair:?}: {:?}",
            r.messages
        );
        assert!(read(&img, at, a.len() as u64) == a);
    }
    // A discard of the whole cluster the write covers: the write is redone, and wins.
    let a = fill(CS, 17);
    in_window(&img, |i| {
        i.discard(40 * CS, CS).unwrap();
    });
    img.write_at(&a, 40 * CS).unwrap();
    settle(img, &path, &[(40 * CS, a.clone())]);
}
