//! `create` and `info` against the real qemu-img.

mod common;

use common::*;

/// The info JSON of an image without the fields that depend on the file layout on disk.
fn info_fields(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    let o = v.as_object_mut().unwrap();
    o.remove("actual-size");
    o.remove("children");
    o.remove("filename");
    v
}

#[test]
fn create_options_agree_with_qemu() {
    let d = tmp();
    let dir = d.path();
    let cases: &[&[&str]] = &[
        &[],
        &["-o", "cluster_size=4096,refcount_bits=8"],
        &["-o", "compat=0.10"],
        &["-o", "lazy_refcounts=on"],
        &["-o", "extended_l2=on"],
        &["-o", "cluster_size=2M,extended_l2=on"],
        &["-o", "compression_type=zstd"],
        &["-o", "refcount_bits=1,cluster_size=512"],
        &["-o", "refcount_bits=64"],
        &["-o", "preallocation=metadata,cluster_size=8k"],
        &["-o", "cluster_size=16k", "-o", "refcount_bits=32"],
    ];
    for (i, opts) in cases.iter().enumerate() {
        let mine = format!("ours{i}.qcow2");
        let theirs = format!("theirs{i}.qcow2");
        let mut a = vec!["create", "-f", "qcow2"];
        a.extend_from_slice(opts);
        let mut ours_args = a.clone();
        ours_args.extend_from_slice(&[&mine, "24M"]);
        let mut their_args = a.clone();
        their_args.extend_from_slice(&[&theirs, "24M"]);
        let o = ours(dir, &ours_args).expect(0);
        let t = qemu_img(dir, &their_args).expect(0);
        assert_eq!(
            o.stdout.replace(&mine, "X"),
            t.stdout.replace(&theirs, "X"),
            "Formatting line for {opts:?}"
        );
        qemu_img(dir, &["check", &mine]).expect(0);
        let oi = json(
            &qemu_img(dir, &["info", "--output=json", &mine])
                .expect(0)
                .stdout,
        );
        let ti = json(
            &qemu_img(dir, &["info", "--output=json", &theirs])
                .expect(0)
                .stdout,
        );
        assert_eq!(info_fields(&oi), info_fields(&ti), "info for {opts:?}");
        // And qemu-io can write and read it back.
        qemu_io(dir, &["-c", "write -P 0x5a 1M 192k", &mine]).expect(0);
        qemu_io(dir, &["-c", "read -P 0x5a 1M 192k", &mine]).expect(0);
        qemu_img(dir, &["check", &mine]).expect(0);
    }
}

#[test]
fn create_backing_and_raw() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "40M"]).expect(0);
    // -b without -F is an error, as in qemu-img.
    let r = ours(
        dir,
        &["create", "-f", "qcow2", "-b", "base.qcow2", "ov.qcow2"],
    )
    .expect(1);
    assert!(
        r.stderr
            .starts_with("qcow2rs: ov.qcow2: Backing file specified without backing format"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("ov.qcow2").exists());
    // Size taken from the backing file.
    let r = ours(
        dir,
        &[
            "create",
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
    assert!(r
        .stdout
        .contains(" size=41943040 backing_file=base.qcow2 backing_fmt=qcow2 "));
    let info = json(
        &qemu_img(dir, &["info", "--output=json", "ov.qcow2"])
            .expect(0)
            .stdout,
    );
    assert_eq!(info["virtual-size"], 41943040);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    qemu_img(dir, &["check", "ov.qcow2"]).expect(0);

    // Raw, with the suffix forms.
    let r = ours(dir, &["create", "-f", "raw", "r.raw", "1.5M"]).expect(0);
    assert_eq!(r.stdout, "Formatting 'r.raw', fmt=raw size=1572864\n");
    assert_eq!(std::fs::metadata(dir.join("r.raw")).unwrap().len(), 1572864);
    ours(dir, &["create", "-q", "-f", "qcow2", "k.qcow2", "4k"]).expect(0);
    ours(dir, &["create", "-q", "-f", "qcow2", "g.qcow2", "2G"]).expect(0);
    ours(dir, &["create", "-q", "-f", "qcow2", "gb.qcow2", "1GB"]).expect(0);
    let info = json(
        &qemu_img(dir, &["info", "--output=json", "gb.qcow2"])
            .expect(0)
            .stdout,
    );
    assert_eq!(info["virtual-size"], 1u64 << 30);
}

#[test]
fn bad_input_fails_cleanly() {
    let d = tmp();
    let dir = d.path();
    let cases: &[(&[&str], &str)] = &[
        (
            &["create", "-f", "qcow2", "x.qcow2", "12Q"],
            "Invalid image size specified: '12Q'.",
        ),
        (
            &["create", "-f", "qcow2", "x.qcow2", "1.5"],
            "Invalid image size specified",
        ),
        (
            &["create", "-f", "qcow2", "x.qcow2"],
            "Image creation needs a size parameter",
        ),
        (
            &["create", "-f", "qcow2", "-o", "foo=1", "x.qcow2", "1M"],
            "Invalid parameter 'foo'",
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=3000",
                "x.qcow2",
                "1M",
            ],
            "Cluster size",
        ),
        (
            &["create", "-f", "vmdk", "x.vmdk", "1M"],
            "Unknown file format 'vmdk'",
        ),
        (&["info", "missing.qcow2"], "Could not open 'missing.qcow2'"),
        (
            &["check", "missing.qcow2"],
            "Could not open 'missing.qcow2'",
        ),
        (&["map", "missing.qcow2"], "Could not open 'missing.qcow2'"),
        (
            &["convert", "missing.raw", "out.qcow2"],
            "Could not open 'missing.raw'",
        ),
        (
            &["info", "--output=xml", "x"],
            "--output expects 'human' or 'json' not 'xml'",
        ),
    ];
    for (args, msg) in cases {
        let r = ours(dir, args).expect(1);
        assert!(
            r.stderr.starts_with("qcow2rs: ") && r.stderr.contains(msg),
            "{args:?}: {}",
            r.stderr
        );
    }
    // A file that claims to be qcow2 but is garbage: an error, not a panic.
    let mut junk = b"QFI\xfb".to_vec();
    junk.extend_from_slice(&[0xffu8; 4096]);
    write_file(dir, "junk.qcow2", &junk);
    for args in [
        &["info", "junk.qcow2"][..],
        &["check", "junk.qcow2"],
        &["map", "junk.qcow2"],
        &["convert", "-O", "raw", "junk.qcow2", "j.raw"],
        &["compare", "junk.qcow2", "junk.qcow2"],
    ] {
        let r = ours(dir, args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("qcow2rs: "), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn info_output_equals_qemu() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "plain.qcow2", "64M"]).expect(0);
    qemu_io(dir, &["-c", "write -P 1 0 200k", "plain.qcow2"]).expect(0);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1G",
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
            "lazy_refcounts=on,cluster_size=4k,refcount_bits=8,compression_type=zstd",
            "lazy.qcow2",
            "10M",
        ],
    )
    .expect(0);
    std::fs::create_dir(dir.join("sub")).unwrap();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../plain.qcow2",
            "-F",
            "qcow2",
            "sub/ov.qcow2",
        ],
    )
    .expect(0);
    write_file(dir, "disk.raw", &pattern(300_000, 3));
    write_file(dir, "odd.raw", b"not a multiple of 512");
    for img in [
        "plain.qcow2",
        "v2.qcow2",
        "lazy.qcow2",
        "sub/ov.qcow2",
        "disk.raw",
        "odd.raw",
    ] {
        for extra in [
            &[][..],
            &["--output=json"],
            &["--backing-chain"],
            &["--backing-chain", "--output=json"],
        ] {
            let mut args = vec!["info"];
            args.extend_from_slice(extra);
            args.push(img);
            let t = qemu_img(dir, &args).expect(0);
            let o = ours(dir, &args).expect(0);
            assert_eq!(o.stdout, t.stdout, "qcow2rs {args:?}");
        }
    }
    // -f qcow2 on a raw file.
    let r = ours(dir, &["info", "-f", "qcow2", "disk.raw"]).expect(1);
    assert_eq!(
        r.stderr,
        "qcow2rs: Could not open 'disk.raw': Image is not in qcow2 format\n"
    );
}
