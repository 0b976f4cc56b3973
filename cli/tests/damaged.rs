//! Damaged images at the command line (issue 10, part 3): `check` opens a truncated image and
//! reports it as qemu-img check does, byte for byte and with the same exit code.

mod common;

use common::{ours, qemu_img, qemu_io, tmp};
use std::path::Path;

/// A 4 MiB image with data at 0..1M and 2M..3M: header, refcount table, refcount block, L1, L2
/// then data clusters, 64 KiB each (qemu-img's layout).
fn image(dir: &Path) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]).expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0xbb 2M 1M",
            "img.qcow2",
        ],
    )
    .expect(0);
}

fn cut(dir: &Path, len: u64) {
    std::fs::copy(dir.join("img.qcow2"), dir.join("t.qcow2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("t.qcow2"))
        .unwrap();
    f.set_len(len).unwrap();
}

#[test]
fn check_reports_a_truncated_image_as_qemu_img_does() {
    let t = tmp();
    let dir = t.path();
    image(dir);
    // In a data cluster, in the L2 table, at the L1 table, in the refcount block, in the
    // refcount table, in the header cluster.
    for len in [
        0x58000, 0x50000, 0x48000, 0x40000, 0x30000, 0x28000, 0x20000, 0x18000, 0x10000, 0x8000,
        1000,
    ] {
        cut(dir, len);
        for args in [
            &["check", "t.qcow2"][..],
            &["check", "--output=json", "t.qcow2"],
        ] {
            let q = qemu_img(dir, args);
            let o = ours(dir, args);
            assert_eq!(
                (o.code, &o.stdout, &o.stderr),
                (q.code, &q.stdout, &q.stderr),
                "truncated at {len:#x}: {args:?}"
            );
        }
    }
    // The cuts above cover both outcomes.
    cut(dir, 0x48000);
    assert_eq!(qemu_img(dir, &["check", "t.qcow2"]).code, 2);
    cut(dir, 0x30000);
    assert_eq!(qemu_img(dir, &["check", "t.qcow2"]).code, 0);
}

#[test]
fn repair_of_a_truncated_image_is_refused_not_made_worse() {
    let t = tmp();
    let dir = t.path();
    image(dir);
    cut(dir, 0x18000);
    let before = std::fs::read(dir.join("t.qcow2")).unwrap();
    let r = ours(dir, &["check", "-r", "all", "t.qcow2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("L1 table at 0x30000 (8 bytes) lies past the end of the file"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(dir.join("t.qcow2")).unwrap(), before);
}

#[test]
fn convert_names_the_damaged_range_and_salvage_rescues_the_rest() {
    let t = tmp();
    let dir = t.path();
    image(dir);
    // Cut inside the first data cluster: 32 KiB of it remain; the other 31 clusters of the
    // first MiB and the whole second data MiB are gone.
    cut(dir, 0x58000);
    let r = ours(dir, &["convert", "-O", "raw", "t.qcow2", "o.raw"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("qcow2rs: error while reading at byte 65536: ")
            && r.stderr.contains("guest offset 0x10000")
            && r.stderr.contains("past the end of the file"),
        "{}",
        r.stderr
    );
    // (cut, bytes skipped, warnings about tables cut short)
    for (len, skipped, tables) in [
        (0x58000u64, 0x1f0000u64, 0),
        (0x48000, 0x200000, 0),
        (0x30000, 0, 1),
        (0x18000, 0, 2),
    ] {
        cut(dir, len);
        let r = ours(
            dir,
            &["convert", "--salvage", "-O", "raw", "t.qcow2", "o.raw"],
        );
        assert_eq!(r.code, 0, "cut at {len:#x}: {}", r.stderr);
        // qemu-img reads what lies past the end of the file as zeros: the same bytes.
        qemu_img(dir, &["convert", "-O", "raw", "t.qcow2", "q.raw"]).expect(0);
        let ours_raw = std::fs::read(dir.join("o.raw")).unwrap();
        assert!(
            ours_raw == std::fs::read(dir.join("q.raw")).unwrap(),
            "cut at {len:#x}"
        );
        if len == 0x58000 {
            assert!(ours_raw[..0x8000].iter().all(|&b| b == 0xaa));
        }
        let total = format!(
            "qcow2rs: warning: --salvage: {skipped} bytes of 't.qcow2' could not be read and were written as zeros\n"
        );
        if skipped > 0 {
            assert!(r.stderr.ends_with(&total), "cut at {len:#x}: {}", r.stderr);
            assert!(
                r.stderr.contains("error while reading offset "),
                "{}",
                r.stderr
            );
        } else {
            assert!(!r.stderr.contains("--salvage"), "{}", r.stderr);
        }
        assert_eq!(
            r.stderr.matches("lies past the end of the file (").count()
                - r.stderr.matches("data cluster").count(),
            tables,
            "cut at {len:#x}: {}",
            r.stderr
        );
    }
}

#[test]
fn map_shows_what_it_can_then_names_the_damaged_range() {
    let t = tmp();
    let dir = t.path();
    // 4 KiB clusters: each L2 table covers 2 MiB. The second one (at 0x205000, made for the
    // write at 2 MiB) is cut short; the first 2 MiB are whole.
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "img.qcow2",
            "4M",
        ],
    )
    .expect(0);
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 0xaa 0 3M",
            "-c",
            "write -P 0xbb 3M 1M",
            "img.qcow2",
        ],
    )
    .expect(0);
    cut(dir, 0x205800);
    // qemu-img maps what the cut table's remaining bytes say, to clusters past the end of the
    // file, and exits 0; we show the whole part and name the damaged range.
    let q = qemu_img(dir, &["map", "t.qcow2"]).expect(0);
    assert!(q.stdout.contains("0x206000"), "{}", q.stdout);
    let r = ours(dir, &["map", "t.qcow2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "Offset          Length          Mapped to       File\n0               0x200000        0x5000          t.qcow2\n"
    );
    assert!(
        r.stderr.starts_with(
            "qcow2rs: Could not read file metadata: guest range 0x200000..0x210000 is damaged: "
        ) && r.stderr.contains("L2 table at 0x205000"),
        "{}",
        r.stderr
    );
    let r = ours(dir, &["map", "--output=json", "t.qcow2"]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stdout,
        "[{ \"start\": 0, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 20480}]\n"
    );
}
