//! Untrusted images (issue 10, part 2): the backing-file policy of `OpenOptions::backing`.
//!
//! The images are made by qemu-img (`create -u`, so that it opens nothing), naming backing
//! files an attacker would pick: a system file, a symbolic link out of the allowed directory, a
//! `../` escape, a device, a FIFO. A FIFO proves that a file is not opened: opening it for
//! reading blocks until a writer comes, so every open here runs under a timeout.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use qcow2rs::{BackingPolicy, Error, Image, OpenOptions};
use qcow2rs_tests::{qemu_img, TempDir};

const MIB: u64 = 1 << 20;

fn tmp() -> (TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(t.path()).unwrap();
    (t, dir)
}

/// `qemu-img create -u -b BACKING -F FMT PATH 1M`: the backing file is named, never opened.
fn overlay(path: &Path, backing: &str, fmt: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        fmt,
        path.to_str().unwrap(),
        "1M",
    ])
    .ok();
}

fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Open on another thread; a hang (a FIFO opened for reading) fails the test instead of
/// blocking it.
fn open_timed(path: &Path, opts: OpenOptions) -> Result<Image, Error> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Image::open(&p, &opts));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("opening {} hung", path.display()))
}

fn allow(dirs: &[&Path]) -> OpenOptions {
    OpenOptions {
        backing: BackingPolicy::Allow(dirs.iter().map(|d| d.to_path_buf()).collect()),
        ..OpenOptions::read_only()
    }
}

fn policy(p: BackingPolicy) -> OpenOptions {
    OpenOptions {
        backing: p,
        ..OpenOptions::read_only()
    }
}

/// The error must be `Error::Backing` of kind `kind`, naming the overlay and the backing name;
/// returns its message.
fn expect_refused(r: Result<Image, Error>, ov: &Path, name: &str, kind: ErrorKind) -> String {
    let e = match r {
        Ok(_) => panic!("{}: backing file '{name}' was opened", ov.display()),
        Err(e) => e,
    };
    let msg = e.to_string();
    match &e {
        Error::Backing {
            file,
            backing,
            source,
        } => {
            assert_eq!(file, &ov.display().to_string(), "{msg}");
            assert_eq!(backing, name, "{msg}");
            assert_eq!(source.kind(), kind, "{msg}");
        }
        other => panic!("expected Error::Backing, got {other:?}"),
    }
    let head = format!("{}: Could not open backing file '{name}': ", ov.display());
    assert!(msg.starts_with(&head), "{msg}");
    assert_eq!(msg.matches(&ov.display().to_string()).count(), 1, "{msg}");
    assert!(!msg.contains("os error"), "{msg}");
    msg
}

fn write_raw(path: &Path, byte: u8, len: usize) {
    std::fs::write(path, vec![byte; len]).unwrap();
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn allow_refuses_a_system_file() {
    let (_t, dir) = tmp();
    let ov = dir.join("ov.qcow2");
    overlay(&ov, "/etc/passwd", "raw");
    let msg = expect_refused(
        open_timed(&ov, allow(&[&dir])),
        &ov,
        "/etc/passwd",
        ErrorKind::PermissionDenied,
    );
    assert!(
        msg.contains("outside the directories the backing policy allows")
            && msg.contains(&dir.display().to_string()),
        "{msg}"
    );
    let e = open_timed(&ov, allow(&[])).err().unwrap();
    assert_eq!(e.errno(), 13, "{e}");
    assert!(e.to_string().contains("(none)"), "{e}");
    // QEMU's behaviour stays the default: the file is opened, as qemu-img opens it.
    let img = open_timed(&ov, OpenOptions::read_only()).unwrap();
    let passwd = std::fs::read("/etc/passwd").unwrap();
    assert_eq!(&read_all(&img)[..passwd.len()], &passwd[..]);
}

#[test]
fn allow_refuses_a_symlink_out_of_the_directory() {
    let (_t, dir) = tmp();
    let allowed = dir.join("images");
    std::fs::create_dir(&allowed).unwrap();
    let secret = dir.join("secret.raw");
    write_raw(&secret, 0x5a, 4096);
    std::os::unix::fs::symlink(&secret, allowed.join("base.raw")).unwrap();
    let ov = allowed.join("ov.qcow2");
    overlay(&ov, "base.raw", "raw");
    let msg = expect_refused(
        open_timed(&ov, allow(&[&allowed])),
        &ov,
        &allowed.join("base.raw").display().to_string(),
        ErrorKind::PermissionDenied,
    );
    assert!(msg.contains(&secret.display().to_string()), "{msg}");
    // A `../` escape is the same thing without a link.
    overlay(&ov, "../secret.raw", "raw");
    expect_refused(
        open_timed(&ov, allow(&[&allowed])),
        &ov,
        &allowed.join("../secret.raw").display().to_string(),
        ErrorKind::PermissionDenied,
    );
    // The directory above allows both.
    let img = open_timed(&ov, allow(&[&dir])).unwrap();
    assert_eq!(&read_all(&img)[..4096], &[0x5a; 4096][..]);
}

#[test]
fn allow_refuses_devices_and_proc_files() {
    let (_t, dir) = tmp();
    let ov = dir.join("ov.qcow2");
    for name in ["/dev/zero", "/dev/null", "/proc/self/environ"] {
        overlay(&ov, name, "raw");
        let msg = expect_refused(
            open_timed(&ov, allow(&[&dir, Path::new("/dev"), Path::new("/proc")])),
            &ov,
            name,
            ErrorKind::PermissionDenied,
        );
        assert!(msg.contains("allows only regular files"), "{msg}");
    }
    // Without a policy, a character device opens as QEMU opens it.
    overlay(&ov, "/dev/zero", "raw");
    let out = dir.join("out.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        ov.to_str().unwrap(),
        out.to_str().unwrap(),
    ])
    .ok();
    open_timed(&ov, OpenOptions::read_only()).unwrap();
}

#[test]
fn a_fifo_is_refused_without_hanging_under_every_policy() {
    let (_t, dir) = tmp();
    mkfifo(&dir.join("fifo"));
    let ov = dir.join("ov.qcow2");
    for fmt in ["raw", "qcow2"] {
        overlay(&ov, "fifo", fmt);
        for p in [BackingPolicy::Any, BackingPolicy::Allow(vec![dir.clone()])] {
            let fifo = dir.join("fifo").display().to_string();
            let msg = expect_refused(
                open_timed(&ov, policy(p)),
                &ov,
                &fifo,
                ErrorKind::InvalidInput,
            );
            assert!(
                msg.contains("it is a FIFO, which cannot be a backing file"),
                "{msg}"
            );
        }
        // None opens nothing: unallocated clusters read as zeros.
        let img = open_timed(&ov, policy(BackingPolicy::None)).unwrap();
        assert!(read_all(&img).iter().all(|&b| b == 0));
        // open_backing: false still means the same.
        let opts = OpenOptions {
            open_backing: false,
            ..OpenOptions::read_only()
        };
        open_timed(&ov, opts).unwrap();
    }
}

#[test]
fn allow_opens_a_chain_inside_the_directory_and_checks_every_link() {
    let (_t, dir) = tmp();
    let allowed = dir.join("images");
    std::fs::create_dir(&allowed).unwrap();
    let base = allowed.join("base.raw");
    write_raw(&base, 0x11, MIB as usize);
    let mid = allowed.join("mid.qcow2");
    overlay(&mid, "base.raw", "raw");
    let ov = allowed.join("ov.qcow2");
    overlay(&ov, "mid.qcow2", "qcow2");
    // Allowed through a symbolic link to the directory, too.
    let link = dir.join("link");
    std::os::unix::fs::symlink(&allowed, &link).unwrap();
    for d in [&allowed, &link] {
        let img = open_timed(&ov, allow(&[d])).unwrap();
        assert_eq!(read_all(&img), vec![0x11; MIB as usize]);
    }
    // The middle image's own backing file is held to the policy too.
    let outside = dir.join("outside.raw");
    write_raw(&outside, 0x22, MIB as usize);
    overlay(&mid, "../outside.raw", "raw");
    let e = open_timed(&ov, allow(&[&allowed])).err().unwrap();
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::Backing { backing, .. } if backing.ends_with("images/../outside.raw")),
        "{e:?}"
    );
    assert!(
        msg.contains("mid.qcow2") && msg.contains("outside.raw"),
        "{msg}"
    );
    let img = open_timed(&ov, allow(&[&dir])).unwrap();
    assert_eq!(read_all(&img), vec![0x22; MIB as usize]);
}

#[test]
fn a_missing_backing_file_is_named_as_qemu_names_it() {
    let (_t, dir) = tmp();
    let ov = dir.join("ov.qcow2");
    overlay(&ov, "base.qcow2", "qcow2");
    let q = qemu_img(&["info", "--backing-chain", ov.to_str().unwrap()]);
    let base = dir.join("base.qcow2").display().to_string();
    assert!(
        q.stderr.contains(&format!(
            "Could not open '{base}': No such file or directory"
        )),
        "{q}"
    );
    let msg = expect_refused(
        open_timed(&ov, OpenOptions::read_only()),
        &ov,
        &base,
        ErrorKind::NotFound,
    );
    assert_eq!(
        msg,
        format!(
            "{}: Could not open backing file '{base}': No such file or directory",
            ov.display()
        )
    );
    let e = open_timed(&ov, OpenOptions::read_only()).err().unwrap();
    assert_eq!(e.errno(), 2);
    // A directory is not a backing file either.
    std::fs::create_dir(dir.join("base.qcow2")).unwrap();
    let msg = expect_refused(
        open_timed(&ov, OpenOptions::read_only()),
        &ov,
        &base,
        ErrorKind::InvalidInput,
    );
    assert!(msg.ends_with("Is a directory"), "{msg}");
}

#[test]
fn errors_in_a_backing_chain_name_each_file_once() {
    let (_t, dir) = tmp();
    let b = dir.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "1M"]).ok();
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.set_len(100).unwrap();
    let ov = dir.join("ov.qcow2");
    overlay(&ov, "b.qcow2", "qcow2");
    let e = open_timed(&ov, OpenOptions::read_only()).err().unwrap();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: image is corrupt: Could not open backing file '{}': qcow2 header too short (offset 0x64)",
            ov.display(),
            b.display()
        )
    );
    // Two levels down: the middle image and the broken one, each named once.
    let mid = dir.join("mid.qcow2");
    overlay(&mid, "b.qcow2", "qcow2");
    overlay(&ov, "mid.qcow2", "qcow2");
    let msg = open_timed(&ov, OpenOptions::read_only())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        msg,
        format!(
            "{}: image is corrupt: Could not open backing file '{}': {}: qcow2 header too short (offset 0x64)",
            ov.display(),
            mid.display(),
            b.display()
        )
    );
}
