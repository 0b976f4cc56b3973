//! Image locking against QEMU's: the same OFD lock bytes as qemu-io takes (read from
//! /proc/locks), conflicts in both directions with real qemu-io / qemu-img processes, two
//! qcow2rs users in two processes and in one process, backing files locked shared, creation, and
//! the locks gone after close.
//!
//! The qcow2rs user in another process is this test binary itself, run again with
//! `QCOW2RS_HOLD=PATH` (test `hold_child`, ignored otherwise): it opens PATH and keeps it open
//! until its stdin closes.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qcow2rs::{CreateOptions, Error, Image, OpenOptions};
use qcow2rs_tests::*;

/// The byte-range locks anyone holds on `path` (OFD and POSIX), from /proc/locks.
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let ino = std::fs::metadata(path).unwrap().ino();
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        // "1: OFDLCK ADVISORY READ -1 08:01:10174902 100 101"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || !f[5].ends_with(&format!(":{ino}")) {
            continue;
        }
        let (Ok(a), Ok(b)) = (f[6].parse::<u64>(), f[7].parse::<u64>()) else {
            continue;
        };
        out.extend(a..=b);
    }
    out
}

/// Panics unless `path` carries no locks within a few seconds (a process that another test
/// thread is starting may hold a copy of a descriptor until its exec).
fn assert_unlocked(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !locked_bytes(path).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{}: locks left behind: {:?}",
            path.display(),
            locked_bytes(path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Each file's locks become `want` within 5 s (qemu-io may still be adjusting its permissions
/// on one file of a chain when the other already shows the expected locks).
fn assert_settles(files: &[(&Path, &BTreeSet<u64>)], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Vec<_> = files.iter().map(|(p, _)| locked_bytes(p)).collect();
        let want: Vec<_> = files.iter().map(|(_, w)| (*w).clone()).collect();
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: locks {now:?}, ours were {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bytes(b: &[u64]) -> BTreeSet<u64> {
    b.iter().copied().collect()
}

const RW: &[u64] = &[100, 101, 103, 201, 203];
const RO: &[u64] = &[100, 201, 203];
const SHARE: &[u64] = &[100];

/// Waits until `path` carries exactly `want` (someone else is opening it).
fn wait_for_locks(path: &Path, want: &[u64], child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if locked_bytes(path) == bytes(want) {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "{what} exited ({st}) before locking {}: {err}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} never got locks {want:?} (has {:?})",
            path.display(),
            locked_bytes(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process holding an image open; killed when dropped.
struct Holder {
    child: Child,
}

impl Holder {
    /// qemu-io with `flags` (`-r`, `-U`) holding `path`, whose locks are `want` once it is open.
    fn qemu_io(path: &Path, flags: &[&str], want: &[u64]) -> Holder {
        Holder::qemu_io_chain(path, flags, &[(path, want)])
    }

    /// qemu-io holding `path`, open once each file of `wait` carries its locks.
    fn qemu_io_chain(path: &Path, flags: &[&str], wait: &[(&Path, &[u64])]) -> Holder {
        require_qemu();
        let mut child = Command::new("qemu-io")
            .args(flags)
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for (p, want) in wait {
            wait_for_locks(p, want, &mut child, "qemu-io");
        }
        Holder { child }
    }

    /// This test binary in another process, holding `path` with qcow2rs (`ro`: read-only).
    fn qcow2rs(path: &Path, ro: bool, want: &[u64]) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["hold_child", "--exact", "--ignored", "--nocapture"])
            .env("QCOW2RS_HOLD", path)
            .env("QCOW2RS_HOLD_RO", if ro { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_locks(path, want, &mut child, "qcow2rs child");
        Holder { child }
    }

    /// Close its stdin and wait (at most 30 s) for it to exit by itself; panics if it failed.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "holder exited with {st}");
                return;
            }
            assert!(Instant::now() < deadline, "holder did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The other process of `Holder::qcow2rs`: holds `$QCOW2RS_HOLD` until stdin closes.
#[test]
#[ignore = "run by the other tests as a child process"]
fn hold_child() {
    let Some(path) = std::env::var_os("QCOW2RS_HOLD") else {
        return;
    };
    let opts = OpenOptions {
        read_only: std::env::var("QCOW2RS_HOLD_RO").as_deref() == Ok("1"),
        ..OpenOptions::new()
    };
    let img = Image::open(PathBuf::from(path), &opts).unwrap();
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink).unwrap();
    img.close().unwrap();
}

fn image(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    let p = path_in(dir, name);
    Image::create(&p, &CreateOptions::new(4 * MIB)).unwrap();
    p
}

fn ro() -> OpenOptions {
    OpenOptions::read_only()
}
fn share() -> OpenOptions {
    OpenOptions {
        force_share: true,
        ..OpenOptions::read_only()
    }
}

/// The `what` of a Locked error (panics on anything else), checking the file is named.
fn locked(r: qcow2rs::Result<Image>, path: &Path) -> String {
    match r {
        Err(Error::Locked { file, what }) => {
            assert_eq!(file, path.display().to_string());
            let e = Error::Locked {
                file: file.clone(),
                what: what.clone(),
            };
            let msg = e.to_string();
            assert!(
                msg.contains(&file) && msg.contains("Is another process"),
                "{msg}"
            );
            what
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("{}: open succeeded despite the lock", path.display()),
    }
}

#[test]
fn our_lock_bytes_are_qemus() {
    require_qemu();
    let dir = tmpdir();
    let base = image(&dir, "base.qcow2");
    let ov = path_in(&dir, "ov.qcow2");
    qemu_create_overlay(&ov, "base.qcow2", "qcow2", "", None);
    for (opts, flags, want) in [
        (OpenOptions::new(), &[][..], RW),
        (ro(), &["-r"][..], RO),
        (share(), &["-r", "-U"][..], SHARE),
    ] {
        // The plain image, then the overlay and its backing file (always shared, read-only).
        let img = Image::open(&base, &opts).unwrap();
        let ours = locked_bytes(&base);
        drop(img);
        assert_unlocked(&base);
        let qemu = Holder::qemu_io(&base, flags, want);
        assert_settles(&[(&base, &ours)], &format!("qemu-io {flags:?}"));
        drop(qemu);

        let img = Image::open(&ov, &opts).unwrap();
        let ours = (locked_bytes(&ov), locked_bytes(&base));
        img.close().unwrap();
        assert_unlocked(&ov);
        assert_unlocked(&base);
        let base_want = if want == SHARE { SHARE } else { RO };
        let qemu = Holder::qemu_io_chain(&ov, flags, &[(&ov, want), (&base, base_want)]);
        assert_settles(&[(&ov, &ours.0), (&base, &ours.1)], &format!("{flags:?}"));
        drop(qemu);
    }
}

/// qemu-io's own answer (stderr) when it opens `path` with `flags` while someone holds it.
fn qemu_refusal(path: &Path, flags: &[&str]) -> String {
    let mut args = flags.to_vec();
    let p = path.to_str().unwrap();
    args.extend(["-f", "qcow2", "-c", "read 0 512", p]);
    let r = run(Command::new("qemu-io").args(&args));
    assert_ne!(r.code, 0, "qemu-io {flags:?} was not refused:\n{r}");
    r.stderr
}

#[test]
fn qemu_writer_refuses_us_as_it_refuses_qemu() {
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    let qemu = Holder::qemu_io(&img, &[], RW);
    // Read-write: like a second qemu-io, we cannot get the "write" lock.
    let what = locked(Image::open(&img, &OpenOptions::new()), &img);
    assert_eq!(what, "Failed to get \"write\" lock");
    assert!(qemu_refusal(&img, &[]).contains(&what));
    // Read-only: we would not share writing with the writer.
    let what = locked(Image::open(&img, &ro()), &img);
    assert_eq!(what, "Failed to get shared \"write\" lock");
    assert!(qemu_refusal(&img, &["-r"]).contains(&what));
    // Force-share: allowed, as `qemu-io -r -U` is.
    let shared = Image::open(&img, &share()).unwrap();
    let mut buf = [0u8; 512];
    shared.read_at(&mut buf, 0).unwrap();
    drop(shared);
    // Our failed opens left nothing behind: qemu-io's locks are all there is.
    assert_eq!(locked_bytes(&img), bytes(RW));
    drop(qemu);
    assert_unlocked(&img);
    Image::open(&img, &OpenOptions::new())
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn qemu_reader_refuses_our_writer_only() {
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    let _qemu = Holder::qemu_io(&img, &["-r"], RO);
    let what = locked(Image::open(&img, &OpenOptions::new()), &img);
    assert_eq!(what, "Failed to get \"write\" lock");
    assert!(qemu_refusal(&img, &[]).contains(&what));
    // Readers share.
    Image::open(&img, &ro()).unwrap().close().unwrap();
}

#[test]
fn our_writer_in_another_process_refuses_qemu_and_qcow2rs() {
    require_qemu();
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    let p = img.to_str().unwrap();
    let child = Holder::qcow2rs(&img, false, RW);
    // qemu-img info: exactly qemu's wording against a QEMU writer.
    let r = qemu_img(&["info", p]);
    assert_ne!(r.code, 0, "{r}");
    assert!(
        r.stderr.contains("Failed to get shared \"write\" lock")
            && r.stderr
                .contains(&format!("Is another process using the image [{p}]?")),
        "{r}"
    );
    qemu_img(&["info", "-U", p]).ok();
    assert!(qemu_refusal(&img, &[]).contains("Failed to get \"write\" lock"));
    // Another qcow2rs user (this process) is refused too, read-write and read-only.
    locked(Image::open(&img, &OpenOptions::new()), &img);
    locked(Image::open(&img, &ro()), &img);
    Image::open(&img, &share()).unwrap();
    // Closed: qemu can write again, and no lock is left.
    child.finish();
    assert_unlocked(&img);
    qemu_io(&img, "qcow2", &["write -P 7 0 4k".to_string()]).ok();
    assert_qemu_clean(&img);
}

#[test]
fn our_reader_refuses_qemu_writer() {
    require_qemu();
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    let child = Holder::qcow2rs(&img, true, RO);
    assert!(qemu_refusal(&img, &[]).contains("Failed to get \"write\" lock"));
    let r = run(Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
        .arg(&img));
    assert_eq!(r.code, 0, "{r}");
    child.finish();
    assert_unlocked(&img);
}

#[test]
fn backing_files_are_locked_shared() {
    require_qemu();
    let dir = tmpdir();
    let base = image(&dir, "base.qcow2");
    let ov = path_in(&dir, "ov.qcow2");
    qemu_create_overlay(&ov, "base.qcow2", "qcow2", "", None);
    let img = Image::open(&ov, &OpenOptions::new()).unwrap();
    assert_eq!(locked_bytes(&base), bytes(RO));
    // Nobody may write the base under us: not qemu-io, not qcow2rs.
    assert!(qemu_refusal(&base, &[]).contains("Failed to get \"write\" lock"));
    locked(Image::open(&base, &OpenOptions::new()), &base);
    // Reading it is fine.
    qemu_img(&["info", base.to_str().unwrap()]).ok();
    Image::open(&base, &ro()).unwrap().close().unwrap();
    img.close().unwrap();
    assert_unlocked(&base);
    assert_unlocked(&ov);
    // And the other way: qemu-io writing the base keeps us from opening the overlay.
    let _qemu = Holder::qemu_io(&base, &[], RW);
    let what = locked(Image::open(&ov, &ro()), &base);
    assert_eq!(what, "Failed to get shared \"write\" lock");
    // -U reaches down the chain, as qemu-io's does.
    Image::open(&ov, &share()).unwrap().close().unwrap();
}

/// A raw backing file carries only the read byte, in QEMU and here: others may write it.
#[test]
fn raw_backing_files_take_the_read_byte_only() {
    require_qemu();
    let dir = tmpdir();
    let base = path_in(&dir, "base.raw");
    std::fs::write(&base, vec![7u8; MIB as usize]).unwrap();
    let ov = path_in(&dir, "ov.qcow2");
    qemu_create_overlay(&ov, "base.raw", "raw", "", None);
    for (opts, flags, want) in [(OpenOptions::new(), &[][..], RW), (ro(), &["-r"][..], RO)] {
        let img = Image::open(&ov, &opts).unwrap();
        let ours = locked_bytes(&base);
        img.close().unwrap();
        assert_unlocked(&base);
        let qemu = Holder::qemu_io_chain(&ov, flags, &[(&ov, want), (&base, SHARE)]);
        assert_eq!(ours, locked_bytes(&base), "{flags:?}");
        drop(qemu);
    }
}

#[test]
fn two_opens_in_one_process_exclude_each_other() {
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    let w = Image::open(&img, &OpenOptions::new()).unwrap();
    assert_eq!(
        locked(Image::open(&img, &OpenOptions::new()), &img),
        "Failed to get \"write\" lock"
    );
    assert_eq!(
        locked(Image::open(&img, &ro()), &img),
        "Failed to get shared \"write\" lock"
    );
    let s = Image::open(&img, &share()).unwrap();
    s.close().unwrap();
    w.close().unwrap();
    let r1 = Image::open(&img, &ro()).unwrap();
    let r2 = Image::open(&img, &ro()).unwrap();
    assert_eq!(
        locked(Image::open(&img, &OpenOptions::new()), &img),
        "Failed to get \"write\" lock"
    );
    drop((r1, r2));
    assert_unlocked(&img);
    // force_share is for read-only opens only, as qemu-img's -U.
    let rw_share = OpenOptions {
        force_share: true,
        ..OpenOptions::new()
    };
    match Image::open(&img, &rw_share) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("force-share"), "{m}"),
        other => panic!("force_share with read-write: {:?}", other.map(|_| ())),
    }
}

/// A read-write open of an image marked corrupt goes on read-only: its locks become a reader's.
#[test]
fn corrupt_image_opened_read_write_holds_a_readers_locks() {
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    poke_u8(&img, 79, peek_bytes(&img, 79, 1)[0] | 2); // incompatible_features: corrupt
    let w = Image::open(&img, &OpenOptions::new()).unwrap();
    assert!(w.is_read_only());
    assert_eq!(locked_bytes(&img), bytes(RO));
    Image::open(&img, &ro()).unwrap().close().unwrap();
    drop(w);
    assert_unlocked(&img);
}

#[test]
fn create_refuses_an_image_in_use_and_leaves_no_locks() {
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    assert_unlocked(&img);
    let w = Image::open(&img, &OpenOptions::new()).unwrap();
    w.write_at(&[9u8; 4096], 0).unwrap();
    w.flush().unwrap();
    let len = file_len(&img);
    match Image::create(&img, &CreateOptions::new(MIB)) {
        Err(Error::Locked { file, .. }) => assert_eq!(file, img.display().to_string()),
        other => panic!("create over an open image: {:?}", other.map(|_| ())),
    }
    // Not truncated: the image and its data are intact.
    assert_eq!(file_len(&img), len);
    let mut buf = [0u8; 4096];
    w.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [9u8; 4096]);
    w.close().unwrap();
    assert_our_check_clean(&img);
}

#[test]
fn in_memory_images_take_no_locks() {
    use qcow2rs::storage::{MemStorage, Storage};
    use std::sync::Arc;
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_on(st.clone(), "mem", &CreateOptions::new(MIB)).unwrap();
    let a = Image::open_storage(st.clone(), "mem", &OpenOptions::new()).unwrap();
    a.close().unwrap();
    let b = Image::open_storage(st.clone(), "mem", &OpenOptions::new()).unwrap();
    let c = Image::open_storage(st, "mem", &ro()).unwrap();
    drop((b, c));
}

/// The locks go when the image is closed, even while another process still holds a descriptor
/// of the same open file description (as a process another thread is starting does, from its
/// fork to its exec): here a `sleep` with the image file as its stdin.
#[test]
fn close_releases_the_locks_of_a_shared_descriptor() {
    use qcow2rs::storage::FileStorage;
    use std::sync::Arc;
    let dir = tmpdir();
    let img = image(&dir, "a.qcow2");
    let st = FileStorage::open(&img, true, false).unwrap();
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::from(st.file().try_clone().unwrap()))
        .spawn()
        .unwrap();
    let w = Image::open_storage(
        Arc::new(st),
        &img.display().to_string(),
        &OpenOptions::new(),
    );
    let w = w.unwrap();
    assert_eq!(locked_bytes(&img), bytes(RW));
    w.close().unwrap();
    let gone = locked_bytes(&img).is_empty();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(
        gone,
        "the locks outlived the image while a copy of its descriptor lived"
    );
    Image::open(&img, &OpenOptions::new())
        .unwrap()
        .close()
        .unwrap();
}
