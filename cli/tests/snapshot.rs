//! `snapshot`, the snapshot list of `info`, and `convert -l`/`-s`, against the real qemu-img on
//! the same images: listings byte for byte (in several time zones), errors word for word (with
//! our program name), snapshots made by either tool applied and deleted by the other.

mod common;

use std::path::Path;

use common::*;
use qcow2rs::{Image, OpenOptions, SnapshotOptions};

/// Time zones to list in (`None`: TZ unset, the system's zone).
const ZONES: [Option<&str>; 5] = [
    Some("UTC"),
    Some("America/New_York"),
    Some("Asia/Kolkata"),
    Some("Australia/Lord_Howe"),
    None,
];

fn ours_tz(dir: &Path, args: &[&str], tz: Option<&str>) -> Run {
    run_env(ours_exe(), dir, args, &[("TZ", tz)])
}

fn qemu_tz(dir: &Path, args: &[&str], tz: Option<&str>) -> Run {
    run_env("qemu-img", dir, args, &[("TZ", tz)])
}

/// qemu-img's messages in our words: our program name where it names itself.
fn as_ours(s: &str) -> String {
    s.replace("qemu-img: ", "qcow2rs: ")
        .replace("'qemu-img snapshot --help'", "'qcow2rs snapshot --help'")
}

/// Run `args` with both tools: the same exit code, stdout byte for byte, and stderr with our
/// program name. Returns our run.
fn same_tz(dir: &Path, args: &[&str], tz: Option<&str>) -> Run {
    let o = ours_tz(dir, args, tz);
    let t = qemu_tz(dir, args, tz);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert_eq!(
        o.code, t.code,
        "exit code of {args:?} (TZ={tz:?}); ours:\n{}{}\nqemu-img:\n{}{}",
        o.stdout, o.stderr, t.stdout, t.stderr
    );
    assert_eq!(o.stdout, t.stdout, "stdout of {args:?} (TZ={tz:?})");
    assert_eq!(
        o.stderr,
        as_ours(&t.stderr),
        "stderr of {args:?} (TZ={tz:?})"
    );
    o
}

fn same(dir: &Path, args: &[&str]) -> Run {
    same_tz(dir, args, Some("UTC"))
}

fn create(dir: &Path, name: &str, size: &str) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, size]).expect(0);
}

fn write(dir: &Path, img: &str, pattern: u8, offset: &str, len: &str) {
    qemu_io(
        dir,
        &["-c", &format!("write -P {pattern} {offset} {len}"), img],
    )
    .expect(0);
}

/// Read `len` bytes at `offset` with qemu-io and check they all are `pattern`.
fn expect_data(dir: &Path, img: &str, pattern: u8, offset: &str, len: &str) {
    let r = qemu_io(
        dir,
        &["-c", &format!("read -P {pattern} {offset} {len}"), img],
    )
    .expect(0);
    assert!(
        !r.stdout.contains("Pattern verification failed"),
        "{img} at {offset}+{len} is not {pattern}:\n{}",
        r.stdout
    );
}

fn check_clean(dir: &Path, img: &str) {
    let r = qemu_img(dir, &["check", img]).expect(0);
    assert!(
        r.stdout.contains("No errors were found on the image."),
        "{img}: {}",
        r.stdout
    );
}

/// `qemu-img check` of the LUKS image `e.qcow2` (secret `s`, password `pw`).
fn check_clean_luks(dir: &Path) {
    let r = qemu_img(
        dir,
        &[
            "check",
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s",
        ],
    )
    .expect(0);
    assert!(
        r.stdout.contains("No errors were found on the image."),
        "{}",
        r.stdout
    );
}

fn virtual_size(dir: &Path, img: &str) -> u64 {
    let v = json(
        &qemu_img(dir, &["info", "--output=json", img])
            .expect(0)
            .stdout,
    );
    v["virtual-size"].as_u64().unwrap()
}

/// The snapshot names qemu-img lists, in table order.
fn qemu_names(dir: &Path, img: &str) -> Vec<String> {
    let v = json(
        &qemu_img(dir, &["info", "--output=json", "-U", img])
            .expect(0)
            .stdout,
    );
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// File offsets of the snapshot table entries of a qcow2 image.
fn snapshot_entries(path: &Path) -> Vec<u64> {
    let b = std::fs::read(path).unwrap();
    let be16 = |o: usize| u16::from_be_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let n = be32(60);
    let mut p = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(p as u64);
        let len = 40 + be32(p + 36) + be16(p + 12) + be16(p + 14);
        p = (p + len).div_ceil(8) * 8;
    }
    out
}

/// Record `size` bytes of saved VM state in snapshot number `i` (no tool here makes any).
fn poke_vm_state(path: &Path, i: usize, size: u64) {
    let e = snapshot_entries(path)[i];
    poke(path, e + 32, &(size as u32).to_be_bytes());
    poke(path, e + 40, &size.to_be_bytes());
}

/// A snapshot with a given date, guest clock and icount, through the library.
fn snapshot_with(path: &Path, name: &str, date: u32, clock: u64, icount: Option<u64>) {
    let img = Image::open(path, &OpenOptions::new()).unwrap();
    img.create_snapshot_with(&SnapshotOptions {
        name: name.to_string(),
        date: Some((date, 5)),
        vm_clock_nsec: clock,
        icount,
    })
    .unwrap();
    img.close().unwrap();
}

/// An image with every kind of snapshot: made by qemu-img and by us (icount 0), duplicate
/// names, names longer than the column and than QEMU's 255-byte buffer, an empty name, a
/// non-ASCII name, fixed dates in and out of daylight saving time, guest clocks, VM state
/// sizes, and no icount.
fn many_snapshots(dir: &Path) -> &'static str {
    let img = "many.qcow2";
    create(dir, img, "8M");
    write(dir, img, 1, "0", "1M");
    qemu_img(dir, &["snapshot", "-c", "s1", img]).expect(0);
    write(dir, img, 2, "1M", "1M");
    ours(dir, &["snapshot", "-c", "s1", img]).expect(0);
    qemu_img(
        dir,
        &["snapshot", "-c", "a much longer name than the column", img],
    )
    .expect(0);
    ours(dir, &["snapshot", "-c", "", img]).expect(0);
    qemu_img(dir, &["snapshot", "-c", "snapshot-été", img]).expect(0);
    // Names past 255 bytes: qemu-img cuts them when it creates, and so do we.
    ours(dir, &["snapshot", "-c", &"o".repeat(300), img]).expect(0);
    qemu_img(dir, &["snapshot", "-c", &"q".repeat(300), img]).expect(0);
    let path = dir.join(img);
    // Stored whole through the library: both tools show the first 255 bytes.
    snapshot_with(&path, &"L".repeat(300), 1_000_000_000, 0, Some(0));
    snapshot_with(
        &path,
        "winter",
        1_700_000_000,
        (3600 * 27 + 61) * 1_000_000_000 + 123_456_789,
        None,
    );
    snapshot_with(
        &path,
        "summer",
        1_690_000_000,
        3600 * 12345 * 1_000_000_000,
        Some(12_345_678_901),
    );
    snapshot_with(&path, "epoch", 0, 999_999_999, None);
    let n = snapshot_entries(&path).len();
    poke_vm_state(&path, n - 3, 3 << 29);
    poke_vm_state(&path, n - 2, 1000);
    poke_vm_state(&path, n - 1, 5 << 20);
    check_clean(dir, img);
    img
}

#[test]
fn list_and_info_match_qemu_byte_for_byte() {
    let d = tmp();
    let dir = d.path();
    create(dir, "empty.qcow2", "1M");
    create(dir, "one.qcow2", "1M");
    qemu_img(dir, &["snapshot", "-c", "only", "one.qcow2"]).expect(0);
    let many = many_snapshots(dir);
    for img in ["empty.qcow2", "one.qcow2", many] {
        for tz in ZONES {
            let list = same_tz(dir, &["snapshot", "-l", img], tz);
            if img == "empty.qcow2" {
                assert_eq!(list.stdout, "", "no snapshots, no output");
            } else {
                assert!(list.stdout.starts_with("Snapshot list:\nID      TAG"));
            }
            same_tz(dir, &["snapshot", img], tz); // -l is the default
            same_tz(dir, &["snapshot", "-q", "-U", "--list", img], tz);
            let info = same_tz(dir, &["info", img], tz);
            assert_eq!(info.stdout.contains("Snapshot list:"), img != "empty.qcow2");
            same_tz(dir, &["info", "--output=json", img], tz);
        }
    }
    let list = ours(dir, &["snapshot", "-l", many]).expect(0).stdout;
    assert!(list.contains(&format!("{} ", "o".repeat(255))));
    assert!(!list.contains(&"o".repeat(256)));
    assert!(list.contains("1.5 GiB"), "{list}");
    assert!(list.contains("0.977 KiB"), "{list}");
    assert!(list.contains("0027:01:01.123         --"), "{list}");
    assert!(list.contains("12345:00:00.000 12345678901"), "{list}");
    let info = json(&ours(dir, &["info", "--output=json", many]).expect(0).stdout);
    let snaps = info["snapshots"].as_array().unwrap();
    let winter = snaps.iter().find(|s| s["name"] == "winter").unwrap();
    assert_eq!(winter["vm-clock-sec"], 97261);
    assert_eq!(winter["vm-clock-nsec"], 123_456_789);
    assert!(
        winter.get("icount").is_none(),
        "icount is left out when absent"
    );
    assert_eq!(snaps[0]["icount"], 0);
}

#[test]
fn dates_are_local_time() {
    let d = tmp();
    let dir = d.path();
    create(dir, "t.qcow2", "1M");
    let path = dir.join("t.qcow2");
    snapshot_with(&path, "winter", 1_700_000_000, 0, Some(0));
    snapshot_with(&path, "summer", 1_690_000_000, 0, Some(0));
    let expected = [
        ("UTC", "2023-11-14 22:13:20", "2023-07-22 04:26:40"),
        (
            "America/New_York",
            "2023-11-14 17:13:20",
            "2023-07-22 00:26:40",
        ),
        ("Asia/Kolkata", "2023-11-15 03:43:20", "2023-07-22 09:56:40"),
        (
            "Australia/Lord_Howe",
            "2023-11-15 09:13:20",
            "2023-07-22 14:56:40",
        ),
        (
            "EST5EDT,M3.2.0,M11.1.0",
            "2023-11-14 17:13:20",
            "2023-07-22 00:26:40",
        ),
    ];
    for (tz, winter, summer) in expected {
        let list = same_tz(dir, &["snapshot", "-l", "t.qcow2"], Some(tz)).stdout;
        assert!(list.contains(winter), "TZ={tz}:\n{list}");
        assert!(list.contains(summer), "TZ={tz}:\n{list}");
        same_tz(dir, &["info", "t.qcow2"], Some(tz));
    }
}

#[test]
fn info_with_backing_file_and_luks() {
    let d = tmp();
    let dir = d.path();
    create(dir, "base.qcow2", "4M");
    write(dir, "base.qcow2", 8, "0", "4M");
    qemu_img(dir, &["snapshot", "-c", "b1", "base.qcow2"]).expect(0);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )
    .expect(0);
    ours(dir, &["snapshot", "-c", "o1", "ov.qcow2"]).expect(0);
    qemu_img(dir, &["snapshot", "-c", "o2", "ov.qcow2"]).expect(0);
    for args in [
        &["info", "ov.qcow2"][..],
        &["info", "--output=json", "ov.qcow2"],
        &["info", "--backing-chain", "ov.qcow2"],
        &["info", "--backing-chain", "--output=json", "ov.qcow2"],
        &["snapshot", "-l", "ov.qcow2"],
    ] {
        same(dir, args);
    }

    let obj = "secret,id=s,data=pw";
    let opts = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s";
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            obj,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            "e.qcow2",
            "4M",
        ],
    )
    .expect(0);
    let io =
        |cmd: &str| qemu_io(dir, &["--object", obj, "--image-opts", "-c", cmd, opts]).expect(0);
    io("write -P 1 0 1M");
    let keyed = |op: &'static str, name: &'static str| {
        ["snapshot", "--object", obj, "--image-opts", op, name, opts]
    };
    qemu_img(dir, &keyed("-c", "e1")).expect(0);
    io("write -P 2 0 1M");
    ours(dir, &keyed("-c", "e2")).expect(0);
    io("write -P 3 0 1M");
    same(dir, &["info", "e.qcow2"]);
    same(dir, &["info", "--output=json", "e.qcow2"]);
    // With the key, listing is the same as qemu-img's.
    let keyed_list = same(
        dir,
        &["snapshot", "--object", obj, "--image-opts", "-l", opts],
    );
    assert!(
        keyed_list.stdout.contains("\n1       e1 "),
        "{}",
        keyed_list.stdout
    );
    // Without it, qemu-img refuses; we list (metadata needs no key).
    let r = qemu_img(dir, &["snapshot", "-l", "e.qcow2"]).expect(1);
    assert!(r
        .stderr
        .contains("Parameter 'encrypt.key-secret' is required for cipher"));
    let r = ours(dir, &["snapshot", "-l", "e.qcow2"]).expect(0);
    assert_eq!(r.stdout, keyed_list.stdout);
    // A wrong key is refused by both.
    let bad = [
        "snapshot",
        "--object",
        "secret,id=s,data=wrong",
        "--image-opts",
        "-l",
        opts,
    ];
    qemu_img(dir, &bad).expect(1);
    let r = ours(dir, &bad).expect(1);
    assert!(
        r.stderr
            .contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        r.stderr
    );
    // Changes need the key, as in qemu-img.
    for op in [["-c", "x"], ["-a", "e1"], ["-d", "e1"]] {
        qemu_img(dir, &["snapshot", op[0], op[1], "e.qcow2"]).expect(1);
        let r = ours(dir, &["snapshot", op[0], op[1], "e.qcow2"]).expect(1);
        assert!(
            r.stderr
                .contains("Parameter 'encrypt.key-secret' is required for cipher"),
            "{}",
            r.stderr
        );
    }
    // With it, we apply and delete; qemu-io reads the snapshot's data back.
    let r = ours(dir, &keyed("-a", "e1")).expect(0);
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
    let r = io("read -P 1 0 1M");
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    check_clean_luks(dir);
    qemu_img(dir, &keyed("-a", "e2")).expect(0);
    let r = io("read -P 2 0 1M");
    assert!(!r.stdout.contains("verification failed"), "{}", r.stdout);
    ours(dir, &keyed("-d", "e1")).expect(0);
    check_clean_luks(dir);
    assert_eq!(qemu_names(dir, "e.qcow2"), ["e2"]);
}

#[test]
fn create_apply_delete_are_silent() {
    let d = tmp();
    let dir = d.path();
    for (tool, img) in [("ours", "o.qcow2"), ("qemu", "q.qcow2")] {
        create(dir, img, "1M");
        for args in [
            &["snapshot", "-c", "a", img][..],
            &["snapshot", "-q", "-c", "b", img],
            &["snapshot", "--create", "c", img],
            &["snapshot", "-a", "a", img],
            &["snapshot", "-q", "--apply", "2", img],
            &["snapshot", "-d", "a", img],
            &["snapshot", "-q", "-d", "b", img],
            &["snapshot", "--delete", "c", img],
        ] {
            // (qemu-img 10 declares --create/--apply/--delete without an argument: give it
            // the short forms.)
            let qargs: Vec<&str> = args
                .iter()
                .map(|a| match *a {
                    "--create" => "-c",
                    "--apply" => "-a",
                    "--delete" => "-d",
                    a => a,
                })
                .collect();
            let r = if tool == "ours" {
                ours(dir, args)
            } else {
                qemu_img(dir, &qargs)
            }
            .expect(0);
            assert_eq!(r.stdout, "", "{tool} {args:?}");
            assert_eq!(r.stderr, "", "{tool} {args:?}");
            check_clean(dir, img);
        }
        assert!(qemu_names(dir, img).is_empty());
    }
}

#[test]
fn errors_match_qemu() {
    let d = tmp();
    let dir = d.path();
    create(dir, "w.qcow2", "1M");
    qemu_img(dir, &["snapshot", "-c", "s1", "w.qcow2"]).expect(0);
    qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]).expect(0);
    let before = ours(dir, &["snapshot", "-l", "w.qcow2"]).expect(0).stdout;
    let cases: &[&[&str]] = &[
        &["snapshot", "-d", "nope", "w.qcow2"],
        &["snapshot", "-d", "1", "w.qcow2"], // an ID: -d takes names only
        &["snapshot", "-a", "nope", "w.qcow2"],
        &["snapshot", "-c", "w.qcow2"],
        &["snapshot", "-l", "-c", "x", "w.qcow2"],
        &["snapshot", "-c", "x", "-c", "y", "w.qcow2"],
        &["snapshot", "-a", "s1", "-d", "s1", "w.qcow2"],
        &["snapshot", "-l", "-l", "w.qcow2"],
        &["snapshot", "w.qcow2", "w.qcow2"],
        &["snapshot"],
        &["snapshot", "-U", "-c", "x", "w.qcow2"],
        &["snapshot", "-U", "-a", "s1", "w.qcow2"],
        &["snapshot", "-U", "-d", "s1", "w.qcow2"],
        &["snapshot", "-U", "-l", "w.qcow2"],
        &[
            "snapshot",
            "--image-opts",
            "-f",
            "qcow2",
            "-l",
            "driver=qcow2,file.filename=w.qcow2",
        ],
        &[
            "snapshot",
            "--image-opts",
            "-l",
            "driver=qcow2,file.filename=w.qcow2",
        ],
        &["snapshot", "-l", "missing.qcow2"],
        &["snapshot", "-c", "x", "missing.qcow2"],
        &["snapshot", "-f", "raw", "-l", "w.qcow2"],
        &["snapshot", "-f", "raw", "-l", "r.raw"],
        &["snapshot", "-f", "raw", "-c", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-a", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-d", "x", "r.raw"],
        &["snapshot", "-f", "qcow2", "-l", "r.raw"],
    ];
    for args in cases {
        same(dir, args);
    }
    assert_eq!(ours(dir, &["snapshot", "-l", "w.qcow2"]).stdout, before);
    check_clean(dir, "w.qcow2");
}

/// A read-only file: changes fail to open it, a listing works. As root, run both tools as
/// nobody (when `setpriv` is there) so that the permission counts.
#[test]
fn read_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmp();
    let dir = d.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    create(dir, "ro.qcow2", "1M");
    qemu_img(dir, &["snapshot", "-c", "s1", "ro.qcow2"]).expect(0);
    let path = dir.join("ro.qcow2");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let privileged = std::fs::OpenOptions::new().write(true).open(&path).is_ok();
    let prefix: Vec<&str> = if privileged {
        let has_setpriv = std::process::Command::new("setpriv")
            .arg("--help")
            .output()
            .is_ok();
        if !has_setpriv {
            eprintln!("skipped: running privileged and setpriv is missing");
            return;
        }
        vec!["--reuid=65534", "--regid=65534", "--clear-groups"]
    } else {
        vec![]
    };
    let run = |prog: &str, args: &[&str]| {
        let mut full: Vec<&str> = prefix.clone();
        full.push(prog);
        full.extend_from_slice(args);
        if privileged {
            run_env("setpriv", dir, &full, &[("TZ", Some("UTC"))])
        } else {
            run_env(full[0], dir, &full[1..], &[("TZ", Some("UTC"))])
        }
    };
    for args in [
        &["snapshot", "-c", "x", "ro.qcow2"][..],
        &["snapshot", "-a", "s1", "ro.qcow2"],
        &["snapshot", "-d", "s1", "ro.qcow2"],
        &["snapshot", "-l", "ro.qcow2"],
    ] {
        let o = run(ours_exe(), args);
        let t = run("qemu-img", args);
        assert_eq!(o.code, t.code, "{args:?}: {}", o.stderr);
        assert_eq!(o.stdout, t.stdout, "{args:?}");
        assert_eq!(o.stderr, as_ours(&t.stderr), "{args:?}");
    }
    assert_eq!(qemu_names(dir, "ro.qcow2"), ["s1"]);
}

#[test]
fn our_snapshots_work_in_qemu() {
    let d = tmp();
    let dir = d.path();
    let img = "x.qcow2";
    create(dir, img, "4M");
    write(dir, img, 1, "0", "4M");
    ours(dir, &["snapshot", "-c", "one", img]).expect(0);
    check_clean(dir, img);
    write(dir, img, 2, "0", "1M");
    ours(dir, &["snapshot", "-c", "two", img]).expect(0);
    check_clean(dir, img);
    // Grow after the snapshots: applying one goes back to its size.
    qemu_img(dir, &["resize", "-q", img, "8M"]).expect(0);
    write(dir, img, 3, "6M", "1M");
    same(dir, &["snapshot", "-l", img]);
    same(dir, &["info", img]);

    qemu_img(dir, &["snapshot", "-a", "one", img]).expect(0);
    check_clean(dir, img);
    assert_eq!(virtual_size(dir, img), 4 << 20);
    expect_data(dir, img, 1, "0", "4M");
    qemu_img(dir, &["snapshot", "-a", "2", img]).expect(0); // by ID
    check_clean(dir, img);
    expect_data(dir, img, 2, "0", "1M");
    expect_data(dir, img, 1, "1M", "3M");
    qemu_img(dir, &["snapshot", "-d", "one", img]).expect(0);
    check_clean(dir, img);
    assert_eq!(qemu_names(dir, img), ["two"]);
    qemu_img(dir, &["snapshot", "-d", "two", img]).expect(0);
    check_clean(dir, img);
    assert_eq!(same(dir, &["snapshot", "-l", img]).stdout, "");
    expect_data(dir, img, 2, "0", "1M");
}

#[test]
fn qemu_snapshots_work_in_ours() {
    let d = tmp();
    let dir = d.path();
    let img = "y.qcow2";
    create(dir, img, "4M");
    write(dir, img, 1, "0", "4M");
    qemu_img(dir, &["snapshot", "-c", "one", img]).expect(0);
    write(dir, img, 2, "0", "1M");
    qemu_img(dir, &["snapshot", "-c", "two", img]).expect(0);
    qemu_img(dir, &["resize", "-q", img, "8M"]).expect(0);
    write(dir, img, 3, "6M", "1M");
    same(dir, &["snapshot", "-l", img]);

    ours(dir, &["snapshot", "-a", "one", img]).expect(0);
    check_clean(dir, img);
    assert_eq!(virtual_size(dir, img), 4 << 20);
    expect_data(dir, img, 1, "0", "4M");
    ours(dir, &["snapshot", "-a", "2", img]).expect(0);
    check_clean(dir, img);
    expect_data(dir, img, 2, "0", "1M");
    expect_data(dir, img, 1, "1M", "3M");
    ours(dir, &["snapshot", "-d", "one", img]).expect(0);
    check_clean(dir, img);
    same(dir, &["snapshot", "-l", img]);
    // -d takes a name, not an ID, in both tools.
    same(dir, &["snapshot", "-d", "2", img]);
    ours(dir, &["snapshot", "-d", "two", img]).expect(0);
    check_clean(dir, img);
    assert_eq!(same(dir, &["snapshot", "-l", img]).stdout, "");
    expect_data(dir, img, 2, "0", "1M");
}

/// `-a` takes an ID first, then the first snapshot with the name, and `-d` the first snapshot
/// with the name, as qemu-img does: the same commands on copies of one image leave the same
/// images.
#[test]
fn ids_before_names_and_duplicate_names() {
    let d = tmp();
    let dir = d.path();
    create(dir, "z.qcow2", "1M");
    write(dir, "z.qcow2", 5, "0", "1M");
    qemu_img(dir, &["snapshot", "-c", "2", "z.qcow2"]).expect(0); // ID 1, named "2"
    write(dir, "z.qcow2", 6, "0", "1M");
    qemu_img(dir, &["snapshot", "-c", "dup", "z.qcow2"]).expect(0); // ID 2
    write(dir, "z.qcow2", 7, "0", "1M");
    qemu_img(dir, &["snapshot", "-c", "dup", "z.qcow2"]).expect(0); // ID 3
    write(dir, "z.qcow2", 9, "0", "1M");
    for step in [
        ["-a", "2"],
        ["-a", "dup"],
        ["-d", "dup"],
        ["-a", "dup"],
        ["-d", "2"],
    ] {
        std::fs::copy(dir.join("z.qcow2"), dir.join("theirs.qcow2")).unwrap();
        ours(dir, &["snapshot", step[0], step[1], "z.qcow2"]).expect(0);
        qemu_img(dir, &["snapshot", step[0], step[1], "theirs.qcow2"]).expect(0);
        check_clean(dir, "z.qcow2");
        assert_eq!(
            ours(dir, &["snapshot", "-l", "z.qcow2"]).stdout,
            qemu_img(dir, &["snapshot", "-l", "theirs.qcow2"]).stdout,
            "after {step:?}"
        );
        let c = qemu_img(dir, &["compare", "-s", "z.qcow2", "theirs.qcow2"]).expect(0);
        assert_eq!(c.stdout, "Images are identical.\n", "after {step:?}");
    }
    // Steps: apply ID 2 (6), apply the first "dup" = ID 2 (6), delete it, apply "dup" = ID 3
    // (7), delete the one named "2" (ID 1).
    expect_data(dir, "z.qcow2", 7, "0", "1M");
    assert_eq!(qemu_names(dir, "z.qcow2"), ["dup"]);
}

fn compare_identical(dir: &Path, a: &str, b: &str) {
    let c = qemu_img(dir, &["compare", a, b]).expect(0);
    assert_eq!(c.stdout, "Images are identical.\n", "{a} vs {b}");
}

#[test]
fn convert_from_a_snapshot() {
    let d = tmp();
    let dir = d.path();
    let src = "src.qcow2";
    create(dir, src, "8M");
    write(dir, src, 1, "0", "2M");
    qemu_img(dir, &["snapshot", "-c", "first", src]).expect(0);
    write(dir, src, 2, "1M", "2M");
    write(dir, src, 3, "5M", "1M");
    ours(dir, &["snapshot", "-c", "second", src]).expect(0);
    write(dir, src, 4, "0", "8M");
    let forms: &[&[&str]] = &[
        &["-l", "first"],
        &["-l", "1"],
        &["-l", "second"],
        &["-l", "snapshot.id=1"],
        &["-l", "snapshot.name=second"],
        &["-l", "snapshot.id=2,snapshot.name=second"],
        &["--source-snapshot", "snapshot.id=1"],
        // The option list wins over a plain name, whatever the order.
        &["-l", "nope", "-l", "snapshot.name=first"],
        &["-l", "snapshot.name=first", "-l", "nope"],
    ];
    let mut n = 0;
    for form in forms {
        for out_fmt in ["raw", "qcow2"] {
            n += 1;
            let (mine, theirs) = (format!("o{n}.{out_fmt}"), format!("t{n}.{out_fmt}"));
            let mut a = vec!["convert", "-O", out_fmt];
            a.extend_from_slice(form);
            let qa: Vec<&str> = a
                .iter()
                .map(|s| if *s == "--source-snapshot" { "-l" } else { s })
                .collect();
            let mut oa = a.clone();
            oa.extend_from_slice(&[src, &mine]);
            let mut ta = qa.clone();
            ta.extend_from_slice(&[src, &theirs]);
            let r = ours(dir, &oa).expect(0);
            assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
            qemu_img(dir, &ta).expect(0);
            let c = qemu_img(dir, &["compare", "-s", &mine, &theirs]).expect(0);
            assert_eq!(c.stdout, "Images are identical.\n", "{form:?} -O {out_fmt}");
            if out_fmt == "qcow2" {
                check_clean(dir, &mine);
            }
        }
    }
    expect_data(dir, "o1.raw", 1, "0", "2M");
    expect_data(dir, "o5.raw", 2, "1M", "2M");
    // -s ID_OR_NAME: older qemu-img's spelling of -l ID_OR_NAME (qemu-img 10 has no -s).
    ours(dir, &["convert", "-O", "raw", "-s", "second", src, "s.raw"]).expect(0);
    compare_identical(dir, "s.raw", "t5.raw");
    ours(dir, &["convert", "-O", "raw", "-s", "1", src, "s1.raw"]).expect(0);
    compare_identical(dir, "s1.raw", "t1.raw");
    qemu_img(dir, &["convert", "-O", "raw", "-s", "1", src, "x.raw"]).expect(1);

    // Errors, word for word; no output file is left.
    qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]).expect(0);
    for (form, file) in [
        (&["-l", "nope"][..], src),
        (&["-l", "snapshot.id=1,snapshot.name=second"], src),
        (&["-l", "snapshot.id=9"], src),
        (&["-l", "snapshot.bogus=1"], src),
        (&["-l", "first"], "r.raw"),
        (&["-l", "first"], "missing.qcow2"),
    ] {
        let mut a = vec!["convert", "-O", "raw"];
        a.extend_from_slice(form);
        a.extend_from_slice(&[file, "bad.raw"]);
        let r = same(dir, &a);
        assert_eq!(r.code, 1);
        assert!(!dir.join("bad.raw").exists(), "{form:?}");
    }
    let r = ours(dir, &["convert", "-O", "raw", "-s", "nope", src, "bad.raw"]).expect(1);
    assert_eq!(
        r.stderr,
        "qcow2rs: Failed to load snapshot: Can't find snapshot\n"
    );
    check_clean(dir, src);
    expect_data(dir, src, 4, "0", "8M");
}

#[test]
fn convert_snapshot_of_overlay_and_luks() {
    let d = tmp();
    let dir = d.path();
    create(dir, "base.qcow2", "4M");
    write(dir, "base.qcow2", 8, "0", "4M");
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )
    .expect(0);
    write(dir, "ov.qcow2", 9, "1M", "1M");
    ours(dir, &["snapshot", "-c", "ovs", "ov.qcow2"]).expect(0);
    write(dir, "ov.qcow2", 10, "0", "4M");
    ours(
        dir,
        &["convert", "-l", "ovs", "-O", "qcow2", "ov.qcow2", "o.qcow2"],
    )
    .expect(0);
    qemu_img(
        dir,
        &["convert", "-l", "ovs", "-O", "qcow2", "ov.qcow2", "t.qcow2"],
    )
    .expect(0);
    compare_identical(dir, "o.qcow2", "t.qcow2");
    expect_data(dir, "o.qcow2", 8, "0", "1M");
    expect_data(dir, "o.qcow2", 9, "1M", "1M");
    // With -B: only what the overlay's snapshot holds is copied.
    let b = ["-B", "base.qcow2", "-F", "qcow2"];
    let mut a = vec!["convert", "-l", "ovs", "-O", "qcow2"];
    a.extend_from_slice(&b);
    let mut oa = a.clone();
    oa.extend_from_slice(&["ov.qcow2", "ob.qcow2"]);
    let mut ta = a.clone();
    ta.extend_from_slice(&["ov.qcow2", "tb.qcow2"]);
    ours(dir, &oa).expect(0);
    qemu_img(dir, &ta).expect(0);
    compare_identical(dir, "ob.qcow2", "tb.qcow2");
    check_clean(dir, "ob.qcow2");

    let obj = "secret,id=s,data=pw";
    let opts = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s";
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            obj,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            "e.qcow2",
            "4M",
        ],
    )
    .expect(0);
    let io = |cmd: &str| {
        qemu_io(dir, &["--object", obj, "--image-opts", "-c", cmd, opts]).expect(0);
    };
    io("write -P 1 0 2M");
    qemu_img(
        dir,
        &[
            "snapshot",
            "--object",
            obj,
            "--image-opts",
            "-c",
            "e1",
            opts,
        ],
    )
    .expect(0);
    io("write -P 2 0 4M");
    for (tool, out) in [("ours", "oe.raw"), ("qemu", "te.raw")] {
        let a = [
            "convert",
            "--object",
            obj,
            "--image-opts",
            "-l",
            "e1",
            "-O",
            "raw",
            opts,
            out,
        ];
        if tool == "ours" {
            ours(dir, &a).expect(0);
        } else {
            qemu_img(dir, &a).expect(0);
        }
    }
    compare_identical(dir, "oe.raw", "te.raw");
    expect_data(dir, "oe.raw", 1, "0", "2M");
    // Without the key the snapshot's data cannot be read.
    let r = ours(
        dir,
        &["convert", "-l", "e1", "-O", "raw", "e.qcow2", "x.raw"],
    )
    .expect(1);
    assert!(r
        .stderr
        .contains("Parameter 'encrypt.key-secret' is required for cipher"));
}

/// After a resize the snapshot's disk size and the image's differ. Our output has the
/// snapshot's size (what `snapshot -a` would give); qemu-img's has the image's current size:
/// zeros past a smaller snapshot, and a larger one cut short.
#[test]
fn convert_snapshot_keeps_its_disk_size() {
    let d = tmp();
    let dir = d.path();
    let img = "r.qcow2";
    create(dir, img, "1M");
    write(dir, img, 7, "0", "1M");
    qemu_img(dir, &["snapshot", "-c", "small", img]).expect(0);
    qemu_img(dir, &["resize", "-q", img, "3M"]).expect(0);
    write(dir, img, 9, "0", "3M");
    qemu_img(dir, &["snapshot", "-c", "big", img]).expect(0);

    ours(
        dir,
        &["convert", "-l", "small", "-O", "raw", img, "o_small.raw"],
    )
    .expect(0);
    qemu_img(
        dir,
        &["convert", "-l", "small", "-O", "raw", img, "t_small.raw"],
    )
    .expect(0);
    assert_eq!(
        std::fs::metadata(dir.join("o_small.raw")).unwrap().len(),
        1 << 20
    );
    assert_eq!(
        std::fs::metadata(dir.join("t_small.raw")).unwrap().len(),
        3 << 20
    );
    // The same data; qemu-img's copy only has zeros after it.
    let c = qemu_img(dir, &["compare", "o_small.raw", "t_small.raw"]).expect(0);
    assert_eq!(
        c.stdout,
        "Warning: Image size mismatch!\nImages are identical.\n"
    );

    // Go back to the small snapshot: now the big one is larger than the image.
    qemu_img(dir, &["snapshot", "-a", "small", img]).expect(0);
    ours(
        dir,
        &["convert", "-l", "big", "-O", "raw", img, "o_big.raw"],
    )
    .expect(0);
    std::fs::copy(dir.join(img), dir.join("applied.qcow2")).unwrap();
    qemu_img(dir, &["snapshot", "-a", "big", "applied.qcow2"]).expect(0);
    let c = qemu_img(dir, &["compare", "-s", "o_big.raw", "applied.qcow2"]).expect(0);
    assert_eq!(c.stdout, "Images are identical.\n");
    expect_data(dir, "o_big.raw", 9, "0", "3M");
}
