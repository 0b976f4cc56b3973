//! Untrusted images at the command line: inspection opens no backing file it was not asked to,
//! nothing hangs on a backing file that is a FIFO, and a missing backing file is named.

mod common;

use common::{ours_exe, qemu_img, run_env, tmp, Run};
use std::path::Path;

/// Our binary under `timeout 20`: a command that blocks on a FIFO exits 124 instead of hanging.
fn ours_timed(dir: &Path, args: &[&str]) -> Run {
    let mut a = vec!["20", ours_exe()];
    a.extend_from_slice(args);
    let r = run_env("timeout", dir, &a, &[]);
    assert_ne!(r.code, 124, "qcow2rs {args:?} hung\n{}", r.stderr);
    r
}

fn fifo_overlay(dir: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "fifo", "-F", "raw", "ov.qcow2", "1M",
        ],
    )
    .expect(0);
}

#[test]
fn inspection_opens_no_backing_file() {
    let t = tmp();
    let dir = t.path();
    fifo_overlay(dir);
    // Opening the FIFO would block (or, now, fail): these succeed only if they leave it alone.
    for args in [
        &["info", "ov.qcow2"][..],
        &["info", "--output=json", "ov.qcow2"],
        &["check", "ov.qcow2"],
        &["check", "--output=json", "ov.qcow2"],
        &["snapshot", "-l", "ov.qcow2"],
    ] {
        let r = ours_timed(dir, args).expect(0);
        assert!(r.stderr.is_empty(), "{args:?}: {}", r.stderr);
    }
    let r = ours_timed(dir, &["info", "ov.qcow2"]).expect(0);
    assert!(r.stdout.contains("backing file: fifo"), "{}", r.stdout);
}

#[test]
fn commands_that_need_the_backing_file_refuse_a_fifo_at_once() {
    let t = tmp();
    let dir = t.path();
    fifo_overlay(dir);
    let want = "qcow2rs: Could not open 'ov.qcow2': Could not open backing file 'fifo': it is a FIFO, which cannot be a backing file\n";
    for args in [
        &["map", "ov.qcow2"][..],
        &["convert", "-O", "raw", "ov.qcow2", "out.raw"],
        &["compare", "ov.qcow2", "ov.qcow2"],
    ] {
        let r = ours_timed(dir, args);
        assert_ne!(r.code, 0, "{args:?}");
        assert_eq!(r.stderr, want, "{args:?}");
    }
    // The chain's listing probes each file: a FIFO is not an image, and it is said at once.
    let r = ours_timed(dir, &["info", "--backing-chain", "ov.qcow2"]).expect(1);
    assert!(r.stderr.contains("'fifo' is a FIFO"), "{}", r.stderr);
}

#[test]
fn a_missing_backing_file_is_named_once() {
    let t = tmp();
    let dir = t.path();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
            "1M",
        ],
    )
    .expect(0);
    // qemu-img says: Could not open 'ov.qcow2': Could not open backing file: Could not open
    // 'base.qcow2': No such file or directory
    let q = qemu_img(dir, &["map", "ov.qcow2"]).expect(1);
    assert!(
        q.stderr.contains("'base.qcow2': No such file or directory"),
        "{}",
        q.stderr
    );
    let want = "qcow2rs: Could not open 'ov.qcow2': Could not open backing file 'base.qcow2': No such file or directory\n";
    for args in [
        &["map", "ov.qcow2"][..],
        &["convert", "-O", "raw", "ov.qcow2", "out.raw"],
        &["compare", "ov.qcow2", "ov.qcow2"],
    ] {
        let r = ours_timed(dir, args);
        assert_ne!(r.code, 0, "{args:?}");
        assert_eq!(r.stderr, want, "{args:?}");
    }
    // As qemu-img: the chain's missing file is named in its own words.
    let r = ours_timed(dir, &["info", "--backing-chain", "ov.qcow2"]).expect(1);
    assert_eq!(
        r.stderr,
        "qcow2rs: Could not open 'base.qcow2': Could not open 'base.qcow2': No such file or directory\n"
    );
    // A missing image itself, in qemu-img's words.
    let r = ours_timed(dir, &["info", "nothere.qcow2"]).expect(1);
    let q = qemu_img(dir, &["info", "nothere.qcow2"]).expect(1);
    assert_eq!(r.stderr.replace("qcow2rs:", "qemu-img:"), q.stderr);
}
