//! `convert`, `compare` and `resize` against the real qemu-img.

mod common;

use std::path::Path;

use common::*;

/// `qemu-img map --output=json` without the host offsets (which depend on allocation order).
fn map_shape(dir: &Path, img: &str) -> Vec<serde_json::Value> {
    let out = qemu_img(dir, &["map", "--output=json", img])
        .expect(0)
        .stdout;
    let mut v = json(&out).as_array().unwrap().clone();
    for e in &mut v {
        e.as_object_mut().unwrap().remove("offset");
    }
    v
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A sparse raw file: data at some places, holes elsewhere, and data blocks that are all zeros.
fn make_source(dir: &Path) -> Vec<u8> {
    let size = 12 << 20;
    let mut data = vec![0u8; size];
    let p = pattern(3 << 20, 5);
    data[..p.len()].copy_from_slice(&p);
    data[(7 << 20) + 4096..(7 << 20) + 4096 + 70000].copy_from_slice(&pattern(70000, 1)[..]);
    data[size - 512..].fill(0xee);
    write_file(dir, "src.raw", &data);
    data
}

#[test]
fn raw_qcow2_raw_round_trip() {
    let d = tmp();
    let dir = d.path();
    let data = make_source(dir);

    let r = ours(dir, &["convert", "-O", "qcow2", "src.raw", "ours.qcow2"]).expect(0);
    assert_eq!(r.stdout, "");
    qemu_img(dir, &["check", "ours.qcow2"]).expect(0);
    let c = qemu_img(dir, &["compare", "src.raw", "ours.qcow2"]).expect(0);
    assert_eq!(c.stdout, "Images are identical.\n");
    // Zero regions stay unallocated: the same extents as qemu-img's own conversion.
    qemu_img(dir, &["convert", "-O", "qcow2", "src.raw", "theirs.qcow2"]).expect(0);
    assert_eq!(map_shape(dir, "ours.qcow2"), map_shape(dir, "theirs.qcow2"));
    let shape = map_shape(dir, "ours.qcow2");
    assert!(shape
        .iter()
        .any(|e| e["present"] == false && e["zero"] == true));

    // Back to raw: identical bytes, and sparse.
    ours(
        dir,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "ours.qcow2",
            "back.raw",
        ],
    )
    .expect(0);
    assert_eq!(std::fs::read(dir.join("back.raw")).unwrap(), data);
    let alloc = allocated_bytes(&dir.join("back.raw"));
    assert!(
        alloc < 5 << 20,
        "back.raw not sparse: {alloc} bytes allocated"
    );

    // qcow2 -> qcow2 with options, -p progress and an explicit cache mode.
    let r = ours(
        dir,
        &[
            "convert",
            "-p",
            "-t",
            "writeback",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=0.10",
            "ours.qcow2",
            "small.qcow2",
        ],
    )
    .expect(0);
    assert!(r.stdout.contains("    (100.00/100%)\r"), "{:?}", r.stdout);
    qemu_img(dir, &["check", "small.qcow2"]).expect(0);
    qemu_img(dir, &["compare", "src.raw", "small.qcow2"]).expect(0);
    let info = json(
        &qemu_img(dir, &["info", "--output=json", "small.qcow2"])
            .expect(0)
            .stdout,
    );
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");

    // A raw source whose size is not a multiple of 512 reads as zero-padded, as in qemu.
    write_file(dir, "odd.raw", b"odd-sized source");
    ours(dir, &["convert", "-O", "qcow2", "odd.raw", "odd.qcow2"]).expect(0);
    qemu_img(dir, &["compare", "odd.raw", "odd.qcow2"]).expect(0);
}

#[test]
fn compressed_convert() {
    let d = tmp();
    let dir = d.path();
    make_source(dir);
    for (name, opts) in [
        ("z.qcow2", "compression_type=zlib"),
        ("zs.qcow2", "compression_type=zstd"),
    ] {
        ours(
            dir,
            &["convert", "-c", "-O", "qcow2", "-o", opts, "src.raw", name],
        )
        .expect(0);
        let check = qemu_img(dir, &["check", name]).expect(0);
        let line = check
            .stdout
            .lines()
            .find(|l| l.contains("compressed clusters"))
            .unwrap();
        let pct: f64 = line
            .split(", ")
            .find(|p| p.ends_with("compressed clusters"))
            .and_then(|p| p.split('%').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        assert!(pct > 0.0, "{line}");
        qemu_img(dir, &["compare", "src.raw", name]).expect(0);
        let map = json(
            &qemu_img(dir, &["map", "--output=json", name])
                .expect(0)
                .stdout,
        );
        assert!(map
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true));
        // qemu-img reads it back byte for byte.
        qemu_img(dir, &["convert", "-O", "raw", name, "q.raw"]).expect(0);
        assert_eq!(
            std::fs::read(dir.join("q.raw")).unwrap(),
            std::fs::read(dir.join("src.raw")).unwrap()
        );
    }
    let info = json(
        &qemu_img(dir, &["info", "--output=json", "zs.qcow2"])
            .expect(0)
            .stdout,
    );
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
    // Compression into raw is refused like qemu-img refuses it.
    let r = ours(dir, &["convert", "-c", "-O", "raw", "src.raw", "x.raw"]).expect(1);
    assert_eq!(
        r.stderr,
        "qcow2rs: Compression not supported for this file format\n"
    );
}

#[test]
fn convert_qemu_images_and_backing() {
    let d = tmp();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]).expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 4M 512k",
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
            "write -P 0x33 512k 1M",
            "-c",
            "write -z 4M 64k",
            "-c",
            "write -P 0 6M 64k",
            "top.qcow2",
        ],
    )
    .expect(0);

    // Flatten the chain.
    ours(dir, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]).expect(0);
    qemu_img(dir, &["compare", "top.qcow2", "flat.qcow2"]).expect(0);
    qemu_img(dir, &["convert", "-O", "qcow2", "top.qcow2", "qflat.qcow2"]).expect(0);
    assert_eq!(map_shape(dir, "flat.qcow2"), map_shape(dir, "qflat.qcow2"));
    let info = json(
        &qemu_img(dir, &["info", "--output=json", "flat.qcow2"])
            .expect(0)
            .stdout,
    );
    assert!(info.get("backing-filename").is_none());

    // Only the top layer, over the same backing file (-B): same layout as qemu-img's.
    let r = ours(
        dir,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "x.qcow2",
        ],
    )
    .expect(1);
    assert!(r
        .stderr
        .contains("Use of backing file requires explicit backing format"));
    ours(
        dir,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "ov.qcow2",
        ],
    )
    .expect(0);
    qemu_img(
        dir,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "qov.qcow2",
        ],
    )
    .expect(0);
    qemu_img(dir, &["check", "ov.qcow2"]).expect(0);
    qemu_img(dir, &["compare", "top.qcow2", "ov.qcow2"]).expect(0);
    let o = qemu_img(dir, &["map", "--output=json", "ov.qcow2"])
        .expect(0)
        .stdout;
    let t = qemu_img(dir, &["map", "--output=json", "qov.qcow2"])
        .expect(0)
        .stdout;
    assert_eq!(o, t);

    // A qemu-img-compressed image to raw and qcow2.
    write_file(dir, "p.raw", &pattern(2 << 20, 2));
    qemu_img(dir, &["convert", "-c", "-O", "qcow2", "p.raw", "pc.qcow2"]).expect(0);
    ours(dir, &["convert", "-O", "raw", "pc.qcow2", "p2.raw"]).expect(0);
    assert_eq!(
        std::fs::read(dir.join("p2.raw")).unwrap(),
        pattern(2 << 20, 2)
    );
    ours(
        dir,
        &[
            "convert", "-W", "-m", "4", "-O", "qcow2", "pc.qcow2", "p2.qcow2",
        ],
    )
    .expect(0);
    qemu_img(
        dir,
        &["compare", "-f", "raw", "-F", "qcow2", "p.raw", "p2.qcow2"],
    )
    .expect(0);

    // -n: into an existing image, whose old contents must be overwritten (zeros included).
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "old.qcow2", "8M"]).expect(0);
    qemu_io(dir, &["-c", "write -P 0x77 0 8M", "old.qcow2"]).expect(0);
    ours(
        dir,
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "old.qcow2"],
    )
    .expect(0);
    qemu_img(dir, &["compare", "top.qcow2", "old.qcow2"]).expect(0);
    qemu_img(dir, &["check", "old.qcow2"]).expect(0);
    write_file(dir, "old.raw", &vec![0x55u8; 8 << 20]);
    ours(dir, &["convert", "-n", "-O", "raw", "top.qcow2", "old.raw"]).expect(0);
    qemu_img(dir, &["compare", "top.qcow2", "old.raw"]).expect(0);
}

#[test]
fn compare_exit_codes() {
    let d = tmp();
    let dir = d.path();
    let data = make_source(dir);
    qemu_img(dir, &["convert", "-O", "qcow2", "src.raw", "same.qcow2"]).expect(0);
    qemu_img(
        dir,
        &["convert", "-c", "-O", "qcow2", "src.raw", "samec.qcow2"],
    )
    .expect(0);
    let mut changed = data.clone();
    changed[1_000_000] ^= 1;
    write_file(dir, "changed.raw", &changed);
    let mut longer = data.clone();
    longer.extend(vec![0u8; 1 << 20]);
    write_file(dir, "longer.raw", &longer);
    let mut longer_dirty = longer.clone();
    let n = longer_dirty.len();
    longer_dirty[n - 3000] = 1;
    write_file(dir, "longer_dirty.raw", &longer_dirty);

    let cases: &[(&[&str], i32)] = &[
        (&["src.raw", "same.qcow2"], 0),
        (&["same.qcow2", "src.raw"], 0),
        (&["samec.qcow2", "same.qcow2"], 0),
        (&["-f", "raw", "-F", "qcow2", "src.raw", "samec.qcow2"], 0),
        (&["src.raw", "changed.raw"], 1),
        (&["same.qcow2", "changed.raw"], 1),
        (&["-q", "same.qcow2", "changed.raw"], 1),
        (&["src.raw", "longer.raw"], 0),
        (&["-s", "src.raw", "longer.raw"], 1),
        (&["longer_dirty.raw", "same.qcow2"], 1),
        (&["-s", "samec.qcow2", "src.raw"], 1),
    ];
    for (args, code) in cases {
        let mut a = vec!["compare"];
        a.extend_from_slice(args);
        let o = ours(dir, &a).expect(*code);
        let t = qemu_img(dir, &a).expect(*code);
        assert_eq!(o.stdout, t.stdout, "{a:?}");
    }
    let o = ours(dir, &["compare", "src.raw", "changed.raw"]).expect(1);
    assert_eq!(o.stdout, "Content mismatch at offset 999936!\n");
    let o = ours(dir, &["compare", "src.raw", "missing.raw"]).expect(2);
    assert!(o
        .stderr
        .starts_with("qcow2rs: Could not open 'missing.raw'"));
}

#[test]
fn resize_grow_and_shrink() {
    let d = tmp();
    let dir = d.path();
    ours(dir, &["create", "-q", "-f", "qcow2", "r.qcow2", "10M"]).expect(0);
    qemu_io(
        dir,
        &["-c", "write -P 9 0 1M", "-c", "write -P 8 9M 1M", "r.qcow2"],
    )
    .expect(0);
    let r = ours(dir, &["resize", "r.qcow2", "+10M"]).expect(0);
    assert_eq!(r.stdout, "Image resized.\n");
    let size = |dir: &Path| {
        json(
            &qemu_img(dir, &["info", "--output=json", "r.qcow2"])
                .expect(0)
                .stdout,
        )["virtual-size"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(size(dir), 20 << 20);
    let r = ours(dir, &["resize", "r.qcow2", "-15M"]).expect(1);
    assert!(r
        .stderr
        .contains("Use the --shrink option to perform a shrink operation."));
    assert_eq!(size(dir), 20 << 20);
    ours(dir, &["resize", "--shrink", "r.qcow2", "-15M"]).expect(0);
    assert_eq!(size(dir), 5 << 20);
    qemu_img(dir, &["check", "r.qcow2"]).expect(0);
    qemu_io(dir, &["-c", "read -P 9 0 1M", "r.qcow2"]).expect(0);
    ours(dir, &["resize", "-q", "r.qcow2", "1G"]).expect(0);
    assert_eq!(size(dir), 1 << 30);
    qemu_io(dir, &["-c", "read -P 0 9M 1M", "r.qcow2"]).expect(0);
    qemu_img(dir, &["check", "r.qcow2"]).expect(0);
    let r = ours(dir, &["resize", "r.qcow2", "-2G"]).expect(1);
    assert!(r.stderr.contains("New image size must be positive"));

    write_file(dir, "r.raw", &[1u8; 4096]);
    ours(dir, &["resize", "-f", "raw", "r.raw", "1M"]).expect(0);
    assert_eq!(std::fs::metadata(dir.join("r.raw")).unwrap().len(), 1 << 20);
}
