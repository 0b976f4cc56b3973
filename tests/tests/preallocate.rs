//! Space reserved ahead of allocating writes (issue 10 item 6): an image opened with O_DIRECT
//! reserves (fallocate, KEEP_SIZE) the never-written part of its allocation run in windows ahead
//! of the frontier, so that parallel writers' O_DIRECT writes find allocated blocks (ext4 then
//! runs them under a shared inode lock); what no write used is punched out again when the run is
//! returned and at close, so the file occupies what it would without the reservation, and
//! `qemu-img check` and `compare` see nothing of it. A buffered image reserves nothing, and a
//! failed reservation is only a lost hint.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow2rs::storage::{Fault, OpKind, RecordingStorage, ENOSPC};
use qcow2rs::{CacheMode, CreateOptions, Image, OpenOptions};
use qcow2rs_tests::*;

const THREADS: u64 = 4;
const PER_THREAD: u64 = 64;
/// Request `i` writes 4 KiB at `i * STEP`: a cluster of its own each (64 KiB clusters).
const STEP: u64 = 65536 + 4096;

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn data(i: u64) -> Vec<u8> {
    (0..4096u64).map(|k| (i * 7 + k % 251 + 1) as u8).collect()
}

/// 4 threads, 64 allocating 4 KiB writes each.
fn write_all(img: &Arc<Image>) {
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let img = img.clone();
            s.spawn(move || {
                for k in 0..PER_THREAD {
                    let i = k * THREADS + t;
                    img.write_at(&data(i), i * STEP).unwrap();
                }
            });
        }
    });
}

fn open(p: &Path, cache: CacheMode) -> Arc<Image> {
    let mut o = OpenOptions::new();
    o.cache = cache;
    Arc::new(Image::open(p, &o).unwrap())
}

fn create(p: &Path) {
    let mut co = CreateOptions::new(64 * MIB);
    co.cluster_size = 65536;
    Image::create(p, &co).unwrap();
}

/// O_DIRECT and fallocate on the directory's file system (ext4 or xfs, as /tmp is on the CI
/// machine); None (with a note) elsewhere, e.g. a tmpfs /tmp, which has no O_DIRECT.
fn supported(dir: &Path) -> Option<()> {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if fs.starts_with("ext") || fs == "xfs" {
        Some(())
    } else {
        eprintln!("preallocate: not run, {} is on {fs}", dir.display());
        None
    }
}

#[test]
fn o_direct_writers_reserve_ahead_and_give_it_back_at_close() {
    let dir = tmpdir();
    if supported(dir.path()).is_none() {
        return;
    }
    let direct = path_in(&dir, "direct.qcow2");
    let buffered = path_in(&dir, "buffered.qcow2");
    create(&direct);
    create(&buffered);

    let img = open(&direct, CacheMode::None);
    img.write_at(&data(0), 0).unwrap();
    // One 4 KiB write, and the window ahead of it is reserved.
    let one = allocated(&direct);
    assert!(
        one >= 4 * MIB,
        "O_DIRECT: {one} bytes allocated after the first allocating write, expected the 4 MiB \
         window reserved"
    );
    write_all(&img);
    img.flush().unwrap();
    Arc::into_inner(img).unwrap().close().unwrap();

    let img = open(&buffered, CacheMode::Writeback);
    img.write_at(&data(0), 0).unwrap();
    let one_buffered = allocated(&buffered);
    assert!(
        one_buffered < MIB,
        "buffered: {one_buffered} bytes allocated after one write: nothing should be reserved"
    );
    write_all(&img);
    Arc::into_inner(img).unwrap().close().unwrap();

    // Closed: the reserved space that no write used is given back.
    let (d, b) = (allocated(&direct), allocated(&buffered));
    assert!(
        d <= b + 256 * 1024,
        "after close the O_DIRECT image occupies {d} bytes, the buffered one {b}"
    );
    assert_qemu_clean(&direct);
    let r = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        direct.to_str().unwrap(),
        buffered.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "qemu-img compare: {r}");
    let img = open(&direct, CacheMode::None);
    for i in 0..THREADS * PER_THREAD {
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, i * STEP).unwrap();
        assert_eq!(buf, data(i), "request {i}");
    }
}

/// The reservation is a hint: when it fails (ENOSPC on every call) the writes go on as without
/// it. On the recording storage, which also checks its contract (inside the file, never-written
/// bytes only).
#[test]
fn failed_reservations_change_nothing() {
    let dir = tmpdir();
    let p = path_in(&dir, "r.qcow2");
    create(&p);
    for fail in [false, true] {
        let rec = Arc::new(RecordingStorage::new(std::fs::read(&p).unwrap()));
        if fail {
            rec.inject(Fault::from_then_on(OpKind::Preallocate, 1, ENOSPC));
        }
        let img =
            Arc::new(Image::open_storage(rec.clone(), "r.qcow2", &OpenOptions::new()).unwrap());
        write_all(&img);
        img.flush().unwrap();
        for i in 0..THREADS * PER_THREAD {
            let mut buf = vec![0u8; 4096];
            img.read_at(&mut buf, i * STEP).unwrap();
            assert_eq!(buf, data(i), "request {i} (reservations failing: {fail})");
        }
        Arc::into_inner(img).unwrap().close().unwrap();
        let calls = rec.op_count(OpKind::Preallocate);
        assert!(calls >= 1, "no reservation was asked for");
        assert_eq!(rec.faults_fired() > 0, fail);
    }
}
