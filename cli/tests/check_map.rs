//! `check` and `map` against the real qemu-img.

mod common;

use std::path::Path;

use common::*;

/// Make qemu-img's fresh 64 MiB image leak one cluster: grow the file by a cluster and give that
/// cluster a refcount of 1 that nothing references.
fn make_leak(dir: &Path, name: &str) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "64M"]).expect(0);
    let path = dir.join(name);
    let cs = 65536u64;
    let len = std::fs::metadata(&path).unwrap().len();
    let leaked = len.div_ceil(cs); // first cluster past the end of the file
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len((leaked + 1) * cs)
        .unwrap();
    let reftable = peek_be64(&path, 48);
    let refblock = peek_be64(&path, reftable);
    assert_ne!(refblock, 0);
    poke(&path, refblock + 2 * leaked, &[0, 1]);
}

#[test]
fn check_clean_leaky_and_repaired() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "clean.qcow2", "64M"]).expect(0);
    qemu_io(dir, &["-c", "write -P 7 0 300k", "clean.qcow2"]).expect(0);
    let r = ours(dir, &["check", "clean.qcow2"]).expect(0);
    assert_eq!(
        r.stdout,
        qemu_img(dir, &["check", "clean.qcow2"]).expect(0).stdout
    );
    assert!(r.stdout.starts_with("No errors were found on the image.\n"));
    let o = ours(dir, &["check", "--output=json", "clean.qcow2"]).expect(0);
    let t = qemu_img(dir, &["check", "--output=json", "clean.qcow2"]).expect(0);
    assert_eq!(o.stdout, t.stdout);

    make_leak(dir, "leak.qcow2");
    qemu_img(dir, &["check", "leak.qcow2"]).expect(3);
    let r = ours(dir, &["check", "leak.qcow2"]).expect(3);
    assert!(
        r.stdout.contains(
            "1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
        ),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("Leaked cluster 4 refcount=1 reference=0"),
        "{}",
        r.stderr
    );
    let j = json(
        &ours(dir, &["check", "--output=json", "leak.qcow2"])
            .expect(3)
            .stdout,
    );
    let tj = json(
        &qemu_img(dir, &["check", "--output=json", "leak.qcow2"])
            .expect(3)
            .stdout,
    );
    for key in [
        "leaks",
        "total-clusters",
        "check-errors",
        "filename",
        "format",
    ] {
        assert_eq!(j[key], tj[key], "{key}");
    }
    assert_eq!(j["leaks"], 1);
    assert!(j.get("corruptions").is_none());
    ours(dir, &["check", "-q", "leak.qcow2"]).expect(3);

    // Repair the leak.
    let r = ours(dir, &["check", "-r", "leaks", "leak.qcow2"]).expect(0);
    assert!(
        r.stdout.starts_with(
            "The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"
        ),
        "{}",
        r.stdout
    );
    qemu_img(dir, &["check", "leak.qcow2"]).expect(0);
    ours(dir, &["check", "leak.qcow2"]).expect(0);

    // JSON of a repair.
    make_leak(dir, "leak2.qcow2");
    let j = json(
        &ours(dir, &["check", "-r", "all", "--output=json", "leak2.qcow2"])
            .expect(0)
            .stdout,
    );
    assert_eq!(j["leaks-fixed"], 1);
    assert!(j.get("leaks").is_none());
    qemu_img(dir, &["check", "leak2.qcow2"]).expect(0);

    // A corruption: the refcount of a data cluster dropped to 0.
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "bad.qcow2", "64M"]).expect(0);
    qemu_io(dir, &["-c", "write 0 64k", "bad.qcow2"]).expect(0);
    let path = dir.join("bad.qcow2");
    let l1 = peek_be64(&path, 40);
    let l2 = peek_be64(&path, l1) & 0x00ff_ffff_ffff_fe00;
    let data = peek_be64(&path, l2) & 0x00ff_ffff_ffff_fe00;
    let refblock = peek_be64(&path, peek_be64(&path, 48));
    poke(&path, refblock + 2 * (data / 65536), &[0, 0]);
    qemu_img(dir, &["check", "bad.qcow2"]).expect(2);
    let r = ours(dir, &["check", "bad.qcow2"]).expect(2);
    assert!(r.stdout.contains("errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"), "{}", r.stdout);
    ours(dir, &["check", "-r", "all", "bad.qcow2"]).expect(0);
    qemu_img(dir, &["check", "bad.qcow2"]).expect(0);

    // Raw images have no check.
    write_file(dir, "r.raw", &[0u8; 4096]);
    let r = ours(dir, &["check", "r.raw"]).expect(63);
    assert_eq!(
        r.stderr,
        "qcow2rs: This image format does not support checks\n"
    );
}

/// A refcount table entry that QEMU's check rejects (reserved bits set) or whose refcount block
/// shares its cluster with other metadata (the refcount table itself, an L2 table): the check
/// says what qemu-img says, and `-r all` rebuilds the refcount structure instead of fixing
/// refcounts in place, which would write refcounts over the table sharing the cluster (found by
/// the check_repair fuzz target: the repair reported a clean image that no longer opened clean).
#[test]
fn check_rebuilds_when_a_refcount_block_is_shared_like_qemu() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "64M"]).expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 7 0 300k",
            "-c",
            "write -P 9 40M 64k",
            "good.qcow2",
        ],
    )
    .expect(0);
    let good = dir.join("good.qcow2");
    let reftable = peek_be64(&good, 48);
    let refblock = peek_be64(&good, reftable);
    let l2 = peek_be64(&good, peek_be64(&good, 40)) & 0x00ff_ffff_ffff_fe00;
    let cases = [
        ("reserved", refblock | 0x100),
        ("on-reftable", reftable),
        ("on-l2", l2),
    ];
    for (name, entry) in cases {
        let file = format!("{name}.qcow2");
        let path = dir.join(&file);
        std::fs::copy(&good, &path).unwrap();
        poke(&path, reftable, &entry.to_be_bytes());
        let theirs = qemu_img(dir, &["check", &file]);
        let r = ours(dir, &["check", &file]);
        assert_eq!(
            (r.code, &r.stdout, &r.stderr),
            (theirs.code, &theirs.stdout, &theirs.stderr),
            "{name}: check differs from qemu-img's"
        );
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        let r = ours(dir, &["check", "-r", "all", &file]).expect(0);
        assert!(
            r.stderr.contains("Rebuilding refcount structure"),
            "{name}: {}",
            r.stderr
        );
        // Clean for both, read again from the file, and the guest data unchanged.
        ours(dir, &["check", &file]).expect(0);
        qemu_img(dir, &["check", &file]).expect(0);
        qemu_img(dir, &["compare", "good.qcow2", &file]).expect(0);
    }
}

#[test]
fn check_counts_compressed_and_fragmented_like_qemu() {
    let d = tmp();
    let dir = d.path();
    write_file(dir, "src.raw", &pattern(3 << 20, 1));
    qemu_img(dir, &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"]).expect(0);
    let mask = |s: &str| -> String { s.to_string() };
    for extra in [&[][..], &["--output=json"]] {
        let mut args = vec!["check"];
        args.extend_from_slice(extra);
        args.push("c.qcow2");
        let o = ours(dir, &args).expect(0);
        let t = qemu_img(dir, &args).expect(0);
        assert_eq!(mask(&o.stdout), mask(&t.stdout));
    }
    let j = json(
        &ours(dir, &["check", "--output=json", "c.qcow2"])
            .expect(0)
            .stdout,
    );
    assert!(j["compressed-clusters"].as_u64().unwrap() > 0);
}

#[test]
fn map_equals_qemu() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]).expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 3M 100k",
            "-c",
            "write -P 3 8M 64k",
            "base.qcow2",
        ],
    )
    .expect(0);
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
            "top.qcow2",
        ],
    )
    .expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 4 512k 1M",
            "-c",
            "write -z 3M 64k",
            "-c",
            "discard 8M 64k",
            "-c",
            "write -P 5 15M 1M",
            "top.qcow2",
        ],
    )
    .expect(0);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,preallocation=metadata",
            "pre.qcow2",
            "3M",
        ],
    )
    .expect(0);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "ext.qcow2",
            "8M",
        ],
    )
    .expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 6 4k 8k",
            "-c",
            "write -P 7 100k 3k",
            "ext.qcow2",
        ],
    )
    .expect(0);
    let mut sparse = vec![0u8; 4 << 20];
    sparse[(1 << 20)..(1 << 20) + 5000].fill(9);
    write_file(dir, "sparse.raw", &[]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("sparse.raw"))
            .unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&sparse[(1 << 20)..(1 << 20) + 5000], 1 << 20)
            .unwrap();
    }
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "empty.qcow2", "0"]).expect(0);
    for img in [
        "base.qcow2",
        "top.qcow2",
        "pre.qcow2",
        "sparse.raw",
        "empty.qcow2",
    ] {
        for extra in [
            &[][..],
            &["--output=json"],
            &["--output=json", "--start-offset=64k", "--max-length=3M"],
        ] {
            let mut args = vec!["map"];
            args.extend_from_slice(extra);
            args.push(img);
            let t = qemu_img(dir, &args).expect(0);
            let o = ours(dir, &args).expect(0);
            assert_eq!(o.stdout, t.stdout, "qcow2rs {args:?}");
        }
    }
    // Extended L2, including the host offsets of unallocated subclusters.
    let strip = |s: &str| -> serde_json::Value { json(s) };
    let o = ours(dir, &["map", "--output=json", "ext.qcow2"]).expect(0);
    let t = qemu_img(dir, &["map", "--output=json", "ext.qcow2"]).expect(0);
    assert_eq!(strip(&o.stdout), strip(&t.stdout));
    let o = ours(dir, &["map", "ext.qcow2"]).expect(0);
    let t = qemu_img(dir, &["map", "ext.qcow2"]).expect(0);
    assert_eq!(o.stdout, t.stdout);

    // Compressed clusters cannot be shown in human form.
    write_file(dir, "src.raw", &pattern(1 << 20, 0));
    qemu_img(dir, &["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"]).expect(0);
    let r = ours(dir, &["map", "c.qcow2"]).expect(1);
    assert!(r
        .stderr
        .contains("File contains external, encrypted or compressed clusters."));
    let o = ours(dir, &["map", "--output=json", "c.qcow2"]).expect(0);
    let t = qemu_img(dir, &["map", "--output=json", "c.qcow2"]).expect(0);
    assert_eq!(o.stdout, t.stdout);
}

/// A reader that goes away (`qcow2rs map img | head -1`) ends the command quietly, as it ends
/// any Unix tool, instead of a panic in the printing code.
#[test]
fn closed_output_pipe_is_not_a_panic() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "256M"]).expect(0);
    // Every other 64 KiB allocated: many map lines, more than a pipe buffer holds.
    let mut cmds = Vec::new();
    for i in (0..4096).step_by(2) {
        cmds.push("-c".to_string());
        cmds.push(format!("write {}k 4k", i * 64));
    }
    let mut args: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    args.push("a.qcow2");
    qemu_io(dir, &args).expect(0);
    let exe = env!("CARGO_BIN_EXE_qcow2rs");
    for sub in ["map --output=json a.qcow2", "info a.qcow2", "check a.qcow2"] {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("'{exe}' {sub} | head -c 1 >/dev/null"))
            .current_dir(dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{sub}: {err}");
        assert!(err.is_empty(), "{sub}: {err}");
    }
}
