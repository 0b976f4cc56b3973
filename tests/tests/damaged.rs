//! Damaged images (issue 10, part 3) through the library: `OpenOptions::damaged` opens a
//! truncated image read-only, `check` reports it as qemu-img check does, what the file still
//! holds reads back, and what it lost fails with an error naming the guest offset.

use std::path::Path;

use qcow2rs::{Error, Image, OpenOptions};
use qcow2rs_tests::{qemu_check, qemu_img, qemu_io, truncate};

const MIB: u64 = 1 << 20;

/// Data at 0..1M (0xaa) and 2M..3M (0xbb) of a 4 MiB image with 64 KiB clusters: header,
/// refcount table, refcount block, L1 (0x30000), L2 (0x40000), then the data from 0x50000.
fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]).ok();
    qemu_io(
        &p,
        "qcow2",
        &[
            "write -P 0xaa 0 1M".to_string(),
            "write -P 0xbb 2M 1M".to_string(),
        ],
    );
    p
}

fn damaged() -> OpenOptions {
    OpenOptions {
        damaged: true,
        ..OpenOptions::read_only()
    }
}

#[test]
fn a_truncated_image_opens_as_damaged_and_checks_like_qemu() {
    let t = tempfile::tempdir().unwrap();
    let src = image(t.path());
    let p = t.path().join("t.qcow2");
    for len in [0x58000u64, 0x48000, 0x30000, 0x28000, 0x18000, 0x8000] {
        std::fs::copy(&src, &p).unwrap();
        truncate(&p, len);
        let q = qemu_check(&p);
        let img = Image::open(&p, &damaged()).unwrap();
        let r = img.check(None).unwrap();
        assert_eq!(r.exit_code(), q.code, "cut at {len:#x}: {:?}", r.messages);
        assert_eq!(r.corruptions, q.corruptions, "cut at {len:#x}");
        assert_eq!(r.leaks, q.leaks, "cut at {len:#x}");
        // The tables the file lost are listed.
        let lost_l1 = len < 0x30000 + 8;
        assert_eq!(
            img.damage()
                .iter()
                .any(|d| d.starts_with("L1 table at 0x30000")),
            lost_l1,
            "cut at {len:#x}: {:?}",
            img.damage()
        );
        if !lost_l1 {
            // The strict open refuses only what it cannot read whole.
            Image::open(&p, &OpenOptions::read_only()).unwrap();
        } else {
            let e = Image::open(&p, &OpenOptions::read_only()).err().unwrap();
            assert!(matches!(e, Error::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains("L1 table at 0x30000"), "{e}");
        }
    }
}

#[test]
fn what_the_file_holds_reads_back_and_what_it_lost_is_named() {
    let t = tempfile::tempdir().unwrap();
    let src = image(t.path());
    let p = t.path().join("t.qcow2");
    std::fs::copy(&src, &p).unwrap();
    // The first data cluster keeps 32 KiB; the rest of the data is gone.
    truncate(&p, 0x58000);
    let img = Image::open(&p, &damaged()).unwrap();
    assert!(img.damage().is_empty());
    let mut b = vec![0u8; 0x8000];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0xaa));
    let mut b = vec![0u8; 4096];
    let e = img.read_at(&mut b, MIB / 2).err().unwrap();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains("guest offset 0x80000") && e.to_string().contains("past the end"),
        "{e}"
    );
    // Unallocated ranges read as zeros as ever.
    img.read_at(&mut b, MIB + 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Damaged means read-only.
    let e = Image::open(
        &p,
        &OpenOptions {
            damaged: true,
            ..OpenOptions::new()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
}
