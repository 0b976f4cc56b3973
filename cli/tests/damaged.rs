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
