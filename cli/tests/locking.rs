//! Image locks from the command line: while qemu-io holds an image for writing, every
//! subcommand fails exactly as qemu-img does (exit code and message), and with `-U` the read-only
//! ones work, as qemu-img's do. The locks themselves are tested in tests/tests/locking.rs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether anyone holds a byte-range lock on `path` (from /proc/locks).
fn is_locked(path: &Path) -> bool {
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    locks.lines().any(|l| {
        l.split_whitespace()
            .nth(5)
            .is_some_and(|f| f.ends_with(&format!(":{ino}")))
    })
}

/// qemu-io holding `path` read-write until dropped (then killed).
struct QemuIo(Child);

impl QemuIo {
    fn hold(path: &Path) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-io is required for these tests");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_locked(path) {
            assert!(child.try_wait().unwrap().is_none(), "qemu-io exited");
            assert!(Instant::now() < deadline, "qemu-io never locked the image");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn subcommands_meet_a_locked_image_as_qemu_img_does() {
    let dir = tmp();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]).expect(0);
    let holder = QemuIo::hold(&d.join("a.qcow2"));
    let cases: &[(&[&str], i32)] = &[
        (&["info", "a.qcow2"], 1),
        (&["info", "-U", "a.qcow2"], 0),
        (&["check", "a.qcow2"], 1),
        (&["check", "-U", "a.qcow2"], 0),
        (&["check", "-U", "-r", "all", "a.qcow2"], 1),
        (&["map", "a.qcow2"], 1),
        (&["map", "-U", "a.qcow2"], 0),
        (&["compare", "a.qcow2", "a.qcow2"], 2),
        (&["compare", "-U", "a.qcow2", "a.qcow2"], 0),
        (&["convert", "-O", "raw", "a.qcow2", "x.raw"], 1),
        (&["convert", "-U", "-O", "raw", "a.qcow2", "x.raw"], 0),
        (&["snapshot", "-l", "a.qcow2"], 1),
        (&["snapshot", "-U", "-l", "a.qcow2"], 0),
        (&["snapshot", "-c", "s", "a.qcow2"], 1),
        (&["resize", "a.qcow2", "2M"], 1),
        (&["create", "-f", "qcow2", "a.qcow2", "1M"], 1),
        (&["bench", "-c", "1", "a.qcow2"], 1),
    ];
    for (args, code) in cases {
        let ours = ours(d, args).expect(*code);
        let theirs = qemu_img(d, args).expect(*code);
        let ours_text = format!("{}{}", ours.stdout, ours.stderr).replace("qcow2rs:", "qemu-img:");
        let theirs_text = format!("{}{}", theirs.stdout, theirs.stderr);
        assert_eq!(ours_text, theirs_text, "{args:?}");
        if *code == 1 && args[0] != "check" {
            assert!(
                ours.stderr
                    .contains("lock\nIs another process using the image [a.qcow2]?"),
                "{args:?}: {}",
                ours.stderr
            );
        }
    }
    // bench -U reads (its report has a line more than qemu-img's).
    ours(d, &["bench", "-U", "-c", "1", "a.qcow2"]).expect(0);
    // Untouched by all that: qemu-io's image is still 1 MiB and clean once it lets go.
    drop(holder);
    ours(d, &["check", "a.qcow2"]).expect(0);
    let info = json(
        &ours(d, &["info", "--output", "json", "a.qcow2"])
            .expect(0)
            .stdout,
    );
    assert_eq!(info["virtual-size"], 1 << 20);
}
