//! Damaged and hostile images: clear errors that name the file, never a panic, a hang or a huge
//! allocation.
//!
//! Every case starts from an image made by qemu-img, pokes bytes into it and opens it with
//! qcow2rs, under `catch_unwind` and a watchdog. Where qemu itself refuses the image (checked with
//! `qemu-img info` / `qemu-io`), we require an error too; where qemu opens it and reads zeros (tables
//! past the end of the file), we require that the damage is at least noticed: an error on open or
//! read, or a check that is not clean.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use qcow2rs::{CheckReport, Image, OpenOptions};
use qcow2rs_tests::*;

const SIZE: u64 = 16 * MIB;

/// A 16 MiB qemu-made image with data, a zeroed range and a compressed cluster. Returns its path and
/// its content.
fn base_image(dir: &TempDir, name: &str, opts: &str) -> (PathBuf, Vec<u8>) {
    let p = path_in(dir, name);
    qemu_create(&p, SIZE, opts);
    qemu_io(
        &p,
        "qcow2",
        &[
            "write -P 0x11 0 256k".to_string(),
            "write -P 0x22 5M 64k".to_string(),
            "write -z 8M 128k".to_string(),
            "write -c -P 0x33 12M 64k".to_string(),
        ],
    );
    let data = qemu_read_all(&p, "qcow2");
    (p, data)
}

fn copy_as(dir: &TempDir, src: &Path, name: &str) -> PathBuf {
    let p = path_in(dir, name);
    std::fs::copy(src, &p).unwrap();
    p
}

/// Whether qemu refuses to open the image at all (qemu-io opens the backing chain too, which
/// `qemu-img info` does not).
fn qemu_refuses(path: &Path) -> bool {
    let r = qemu_io_raw(path, "qcow2", &["read 0 512".to_string()]);
    r.code != 0 && r.stderr.contains("can't open")
}

/// What happened when qcow2rs was let loose on an image.
#[derive(Debug)]
enum Outcome {
    OpenFailed(String),
    Opened {
        read_errors: Vec<String>,
        check: Result<CheckReport, String>,
        close: Result<(), String>,
    },
}

impl Outcome {
    /// Every message, for the "names the file" assertion.
    fn messages(&self) -> Vec<String> {
        match self {
            Outcome::OpenFailed(m) => vec![m.clone()],
            Outcome::Opened {
                read_errors,
                check,
                close,
                ..
            } => {
                let mut v = read_errors.clone();
                if let Err(e) = check {
                    v.push(e.clone());
                }
                if let Err(e) = close {
                    v.push(e.clone());
                }
                v
            }
        }
    }
    /// The damage showed up somewhere: an error, or a check that is not clean.
    fn noticed(&self) -> bool {
        match self {
            Outcome::OpenFailed(_) => true,
            Outcome::Opened {
                read_errors, check, ..
            } => {
                !read_errors.is_empty()
                    || match check {
                        Ok(r) => !r.is_clean(),
                        Err(_) => true,
                    }
            }
        }
    }
}

/// Opens the image (read-only or read-write), reads its start, a few spots and the ranges in
/// `spots`, checks it and closes it, all under catch_unwind and a 30 s watchdog. A panic fails the
/// test with the panic message; so does an error message that does not name the file.
fn probe_with(path: &Path, read_only: bool, spots: &[(u64, u64)]) -> Outcome {
    let p = path.to_path_buf();
    let spots = spots.to_vec();
    let what = format!(
        "qcow2rs on {} ({})",
        path.display(),
        if read_only { "read-only" } else { "read-write" }
    );
    let what2 = what.clone();
    let res = with_timeout(&what, 30, move || {
        catch_unwind(AssertUnwindSafe(|| {
            let opts = if read_only {
                OpenOptions::read_only()
            } else {
                OpenOptions::new()
            };
            let img = match Image::open(&p, &opts) {
                Ok(img) => img,
                Err(e) => return Outcome::OpenFailed(e.to_string()),
            };
            let size = img.virtual_size();
            let mut read_errors = Vec::new();
            let mut ranges: Vec<(u64, u64)> = vec![(0, MIB)];
            let mut rng = Rng::new(size);
            for _ in 0..8 {
                ranges.push((rng.below(size.max(1)), 4096));
            }
            ranges.extend(spots);
            for (off, len) in ranges {
                if off >= size {
                    continue;
                }
                let len = len.min(size - off);
                let mut buf = vec![0u8; len as usize];
                if let Err(e) = img.read_at(&mut buf, off) {
                    read_errors.push(e.to_string());
                }
            }
            if !read_only && !img.is_read_only() && size >= 8192 {
                // Allocating writes, zeroes and a discard on top of the damage: errors are
                // fine, panics and hangs are not.
                let off = rng.below(size - 8192);
                for r in [
                    img.write_at(&[0xa5; 5000], off),
                    img.write_zeroes(off / 2, 4096),
                    img.discard(0, size.min(MIB)),
                    img.flush(),
                ] {
                    if let Err(e) = r {
                        read_errors.push(e.to_string());
                    }
                }
            }
            let check = img.check(None).map_err(|e| e.to_string());
            let close = img.close().map_err(|e| e.to_string());
            Outcome::Opened {
                read_errors,
                check,
                close,
            }
        }))
    });
    let out = match res {
        Ok(o) => o,
        Err(p) => panic!("{what2} panicked: {}", panic_message(&*p)),
    };
    let fname = path.file_name().unwrap().to_str().unwrap();
    for m in out.messages() {
        assert!(
            m.contains(fname),
            "{what2}: the error message does not name the file {fname}: {m}"
        );
    }
    out
}

fn probe(path: &Path, read_only: bool) -> Outcome {
    probe_with(path, read_only, &[])
}

/// Both a read-only and a read-write open fail; the messages name the file and contain every
/// string of `want` (case-insensitive). Returns the read-only open's message.
fn expect_open_err(path: &Path, want: &[&str]) -> String {
    let mut first = None;
    for ro in [true, false] {
        match probe(path, ro) {
            Outcome::OpenFailed(m) => {
                let lower = m.to_lowercase();
                for w in want {
                    assert!(
                        lower.contains(&w.to_lowercase()),
                        "{}: the error should mention {w:?}: {m}",
                        path.display()
                    );
                }
                first.get_or_insert(m);
            }
            other => panic!(
                "{} ({}) opened although it is damaged (qemu-img refuses: {}): {other:?}",
                path.display(),
                if ro { "read-only" } else { "read-write" },
                qemu_refuses(path)
            ),
        }
    }
    first.unwrap()
}

/// The damage is noticed in a read-only open: an open or read error, or a check that is not clean.
fn expect_noticed(path: &Path, spots: &[(u64, u64)]) -> Outcome {
    let out = probe_with(path, true, spots);
    assert!(
        out.noticed(),
        "{}: damaged image opened, read and checked clean: {out:?}",
        path.display()
    );
    out
}

/// Pokes `f` into a copy of `base` named `name` and returns its path.
fn damaged(dir: &TempDir, base: &Path, name: &str, f: impl FnOnce(&Path)) -> PathBuf {
    let p = copy_as(dir, base, name);
    f(&p);
    p
}

fn l1_offset(p: &Path) -> u64 {
    peek_be64(p, hdr::L1_TABLE_OFFSET)
}

fn l2_offset(p: &Path) -> u64 {
    peek_be64(p, l1_offset(p)) & L1E_OFFSET_MASK
}

// ---- headers ---------------------------------------------------------------------------------------

#[test]
fn truncated_header() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    for len in [0u64, 3, 4, 20, 71, 72, 100, 103] {
        let p = damaged(&dir, &base, &format!("trunc{len}.qcow2"), |p| {
            truncate(p, len)
        });
        assert!(qemu_refuses(&p), "qemu opens a {len}-byte file?");
        expect_open_err(&p, &[]);
    }
}

#[test]
fn bad_magic_and_version() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let p = damaged(&dir, &base, "magic.qcow2", |p| {
        poke_be32(p, hdr::MAGIC, 0x5146_49fa)
    });
    // Without the magic this is not a qcow2 image at all.
    expect_open_err(&p, &[]);
    for v in [0u32, 1, 4, 0xffff_ffff] {
        let p = damaged(&dir, &base, &format!("version{v}.qcow2"), |p| {
            poke_be32(p, hdr::VERSION, v)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
}

#[test]
fn garbage_headers() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    for seed in 0..40u64 {
        let mut rng = Rng::new(seed);
        let mut junk = rng.bytes(4096);
        if seed % 2 == 0 {
            junk[..4].copy_from_slice(b"QFI\xfb");
        }
        if seed % 4 == 0 {
            junk[4..8].copy_from_slice(&3u32.to_be_bytes());
        }
        let p = damaged(&dir, &base, &format!("garbage{seed}.qcow2"), |p| {
            poke_bytes(p, 0, &junk)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
}

#[test]
fn cluster_bits_out_of_range() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    for bits in [0u32, 8, 22, 31, 63, 64, 0xffff_ffff] {
        let p = damaged(&dir, &base, &format!("cbits{bits}.qcow2"), |p| {
            poke_be32(p, hdr::CLUSTER_BITS, bits)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
}

#[test]
fn header_length_out_of_range() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    for len in [0u32, 72, 96, 103, 0x10008, 0x20000, 0xffff_fff8] {
        let p = damaged(&dir, &base, &format!("hlen{len}.qcow2"), |p| {
            poke_be32(p, hdr::HEADER_LENGTH, len)
        });
        assert!(qemu_refuses(&p), "qemu opens header_length {len}");
        expect_open_err(&p, &[]);
    }
}

#[test]
fn header_extension_too_large() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let exts = header_extensions(&base);
    assert!(!exts.is_empty(), "qemu wrote no header extension");
    for len in [0xfff0u32, 0xffff_fff0] {
        let p = damaged(&dir, &base, &format!("ext{len}.qcow2"), |p| {
            poke_be32(p, exts[0].1 - 4, len)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
}

#[test]
fn refcount_order_and_crypt_method_out_of_range() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    for order in [7u32, 64, 0xffff_ffff] {
        let p = damaged(&dir, &base, &format!("rorder{order}.qcow2"), |p| {
            poke_be32(p, hdr::REFCOUNT_ORDER, order)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
    for m in [2u32, 3, 0xffff_ffff] {
        let p = damaged(&dir, &base, &format!("crypt{m}.qcow2"), |p| {
            poke_be32(p, hdr::CRYPT_METHOD, m)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
}

#[test]
fn virtual_size_too_big_for_l1() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    for size in [1u64 << 40, 1 << 62, u64::MAX - 511] {
        let p = damaged(&dir, &base, &format!("vsize{size:x}.qcow2"), |p| {
            poke_be64(p, hdr::SIZE, size)
        });
        assert!(qemu_refuses(&p));
        expect_open_err(&p, &[]);
    }
}

// ---- feature bits --------------------------------------------------------------------------------

#[test]
fn unknown_incompatible_features_are_named() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    // Rename the feature-table entry of "extended L2" (incompatible bit 4) to bit 5 "frobnicate
    // feature", then set bit 5: the error names the feature from the table.
    let (_, table, len) = header_extensions(&base)
        .into_iter()
        .find(|e| e.0 == 0x6803_f857)
        .expect("qemu wrote no feature name table");
    let entry = (0..len as u64 / 48)
        .map(|i| table + 48 * i)
        .find(|&e| peek_bytes(&base, e, 2) == [0, 4])
        .expect("no entry for incompatible bit 4");
    let p = damaged(&dir, &base, "incompat5.qcow2", |p| {
        poke_bytes(p, entry, &[0, 5]);
        let mut name = [0u8; 46];
        name[..18].copy_from_slice(b"frobnicate feature");
        poke_bytes(p, entry + 2, &name);
        poke_be64(p, hdr::INCOMPATIBLE_FEATURES, 1 << 5);
    });
    let r = qemu_img(&["info", p.to_str().unwrap()]);
    assert!(r.all().contains("frobnicate feature"), "{r}");
    expect_open_err(&p, &["frobnicate feature"]);

    // Bit 40 has no name: the error still says which bit.
    let p = damaged(&dir, &base, "incompat40.qcow2", |p| {
        poke_be64(p, hdr::INCOMPATIBLE_FEATURES, 1 << 40)
    });
    assert!(qemu_refuses(&p));
    let m = expect_open_err(&p, &[]);
    assert!(
        m.contains("40") || m.contains("10000000000"),
        "the error does not say which feature bit (40) is unknown: {m}"
    );
}

#[test]
fn unknown_compatible_and_autoclear_features() {
    let dir = tmpdir();
    let (base, data) = base_image(&dir, "base.qcow2", "");
    let p = damaged(&dir, &base, "compat.qcow2", |p| {
        poke_be64(p, hdr::COMPATIBLE_FEATURES, 1 << 5);
        poke_be64(p, hdr::AUTOCLEAR_FEATURES, 1 << 7);
    });
    // Unknown compatible and autoclear bits do not stop anyone from reading...
    assert_same("unknown compatible bits", &our_read_all(&p, 1), &data);
    // ...or writing; a writer clears the autoclear bits it does not know.
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&[0x44; 5000], 3 * MIB + 7).unwrap();
    img.close().unwrap();
    let mut want = data.clone();
    want[3 * MIB as usize + 7..3 * MIB as usize + 5007].fill(0x44);
    assert_eq!(
        peek_be64(&p, hdr::AUTOCLEAR_FEATURES) & (1 << 7),
        0,
        "unknown autoclear bit 7 survived a read-write open with writes"
    );
    assert_qemu_clean(&p);
    assert_same("after writing", &qemu_read_all(&p, "qcow2"), &want);
}

#[test]
fn corrupt_bit_opens_read_only() {
    let dir = tmpdir();
    let (base, data) = base_image(&dir, "base.qcow2", "");
    let p = damaged(&dir, &base, "corruptbit.qcow2", |p| {
        poke_be64(p, hdr::INCOMPATIBLE_FEATURES, 1 << 1)
    });
    // Read-only: opens and reads right, and says it is marked corrupt.
    let img = Image::open(&p, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("read-only open of an image with the corrupt bit: {e}"));
    assert!(
        img.info().unwrap().corrupt,
        "info() does not report the corrupt bit"
    );
    assert_same(
        "corrupt bit, read-only",
        &read_all(&img, &mut Rng::new(2)),
        &data,
    );
    img.close().unwrap();
    // Read-write: either refused, or opened read-only and refusing writes.
    let before = std::fs::read(&p).unwrap();
    match Image::open(&p, &OpenOptions::new()) {
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("corruptbit.qcow2"), "{m}");
            assert!(m.to_lowercase().contains("corrupt"), "{m}");
        }
        Ok(img) => {
            assert!(
                img.is_read_only(),
                "an image with the corrupt bit opened read-write"
            );
            let e = img
                .write_at(&[1; 512], 0)
                .expect_err("write to a corrupt image");
            assert!(e.to_string().contains("corruptbit.qcow2"), "{e}");
            img.close().unwrap();
        }
    }
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the corrupt image was modified"
    );
}

// ---- tables --------------------------------------------------------------------------------------

#[test]
fn l1_size_out_of_range() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    // Too large for the 32 MiB cap, absurd, and too small for the virtual size.
    for n in [4_194_305u32, 0x7fff_ffff, 0xffff_ffff, 0] {
        let p = damaged(&dir, &base, &format!("l1size{n}.qcow2"), |p| {
            poke_be32(p, hdr::L1_SIZE, n)
        });
        assert!(qemu_refuses(&p), "qemu accepts l1_size {n}");
        expect_open_err(&p, &[]);
    }
}

#[test]
fn table_offsets_invalid() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let l1 = l1_offset(&base);
    let rt = peek_be64(&base, hdr::REFCOUNT_TABLE_OFFSET);
    let cases: Vec<(&str, u64, u64)> = vec![
        ("l1-unaligned", hdr::L1_TABLE_OFFSET, l1 + 512),
        ("l1-zero", hdr::L1_TABLE_OFFSET, 0),
        (
            "l1-beyond-2^63",
            hdr::L1_TABLE_OFFSET,
            0xffff_ffff_ffff_0000,
        ),
        ("rt-unaligned", hdr::REFCOUNT_TABLE_OFFSET, rt + 8),
        ("rt-zero", hdr::REFCOUNT_TABLE_OFFSET, 0),
        (
            "rt-beyond-2^63",
            hdr::REFCOUNT_TABLE_OFFSET,
            0xffff_ffff_ffff_0000,
        ),
    ];
    for (name, field, value) in cases {
        let p = damaged(&dir, &base, &format!("{name}.qcow2"), |p| {
            poke_be64(p, field, value)
        });
        if qemu_refuses(&p) {
            expect_open_err(&p, &[]);
        } else {
            // qemu opens a table at offset 0 (it reads the header as the table); check must
            // notice at least.
            expect_noticed(&p, &[]);
        }
    }
    for clusters in [0u32, 129, 0xffff_ffff] {
        let p = damaged(&dir, &base, &format!("rtclusters{clusters}.qcow2"), |p| {
            poke_be32(p, hdr::REFCOUNT_TABLE_CLUSTERS, clusters)
        });
        assert!(
            qemu_refuses(&p),
            "qemu accepts refcount_table_clusters {clusters}"
        );
        expect_open_err(&p, &[]);
    }
}

#[test]
fn tables_past_eof_are_noticed() {
    // qemu opens these and reads zeros; we must at least notice.
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let l1 = l1_offset(&base);
    let p = damaged(&dir, &base, "l1-eof.qcow2", |p| {
        poke_be64(p, hdr::L1_TABLE_OFFSET, 1 << 40)
    });
    expect_noticed(&p, &[]);
    let p = damaged(&dir, &base, "rt-eof.qcow2", |p| {
        poke_be64(p, hdr::REFCOUNT_TABLE_OFFSET, 1 << 40)
    });
    expect_noticed(&p, &[]);
    // The first L2 table past EOF.
    let p = damaged(&dir, &base, "l2-eof.qcow2", |p| {
        poke_be64(p, l1, (1 << 63) | (1 << 40))
    });
    expect_noticed(&p, &[(0, 256 * KIB)]);
}

#[test]
fn unaligned_l2_and_data_offsets_fail_reads() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let l1 = l1_offset(&base);
    let l2 = l2_offset(&base);
    let d0 = peek_be64(&base, l2);
    let cases: Vec<(&str, u64, u64)> = vec![
        ("l2-unaligned", l1, (1 << 63) | (l2 + 4096)),
        ("data-unaligned", l2, d0 + 512),
        ("data-at-zero", l2, 1 << 63),
        ("l2-reserved-bits", l2, d0 | 0x3f00_0000_0000_0000),
    ];
    for (name, at, value) in cases {
        let p = damaged(&dir, &base, &format!("{name}.qcow2"), |p| {
            poke_be64(p, at, value)
        });
        let q = qemu_io_raw(&p, "qcow2", &["read 0 4k".to_string()]);
        let qemu_fails = q.code != 0 || q.all().contains("failed");
        let qemu_corrupt = qemu_check(&p).corruptions > 0;
        for ro in [true, false] {
            match probe_with(&p, ro, &[(0, 4096)]) {
                Outcome::OpenFailed(_) => {}
                Outcome::Opened {
                    read_errors, check, ..
                } => {
                    if qemu_fails {
                        assert!(
                            !read_errors.is_empty(),
                            "{name}: qemu-io fails to read offset 0 but we read it:\n{q}"
                        );
                    }
                    let r = check.unwrap_or_else(|e| panic!("{name}: check failed: {e}"));
                    if qemu_corrupt {
                        assert!(
                            r.corruptions > 0,
                            "{name}: qemu-img check finds corruption, our check none: {r:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn compressed_cluster_damage_fails_reads() {
    let dir = tmpdir();
    let (base, data) = base_image(&dir, "base.qcow2", "");
    let l2 = l2_offset(&base);
    // Guest 12 MiB = cluster 192 of the first L2 table (64 KiB clusters: x = 54).
    let at = l2 + 192 * 8;
    let desc = peek_be64(&base, at);
    assert_ne!(
        desc & (1 << 62),
        0,
        "guest 12M is not a compressed cluster: {desc:#x}"
    );
    let host = desc & ((1 << 54) - 1);
    let spot = [(12 * MIB, 64 * KIB)];

    // Garbage where the compressed bytes were.
    let p = damaged(&dir, &base, "comp-garbage.qcow2", |p| {
        poke_bytes(p, host, &Rng::new(9).bytes(600))
    });
    // The other clusters still read right.
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    img.read_at(&mut buf, 0).unwrap();
    assert_same("undamaged cluster", &buf, &data[..256 * 1024]);
    img.close().unwrap();
    // (The read-write probe writes, so it comes last.)
    for ro in [true, false] {
        match probe_with(&p, ro, &spot) {
            Outcome::OpenFailed(m) => panic!("open failed: {m}"),
            Outcome::Opened { read_errors, .. } => assert!(
                !read_errors.is_empty(),
                "garbage compressed data decompressed without error"
            ),
        }
    }

    // A compressed descriptor with the largest sector count, past EOF.
    let p = damaged(&dir, &base, "comp-eof.qcow2", |p| {
        poke_be64(p, at, (1 << 62) | (0xff << 54) | (1 << 40))
    });
    expect_noticed(&p, &spot);
    // One pointing into the header cluster.
    let p = damaged(&dir, &base, "comp-header.qcow2", |p| {
        poke_be64(p, at, (1 << 62) | (3 << 54) | 0x10)
    });
    expect_noticed(&p, &spot);
}

#[test]
fn truncated_body_is_noticed() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let l1 = l1_offset(&base);
    let l2 = l2_offset(&base);
    let rb = peek_be64(&base, peek_be64(&base, hdr::REFCOUNT_TABLE_OFFSET));
    let len = file_len(&base);
    for (name, at) in [
        ("at-refblock", rb),
        ("at-l1", l1),
        ("at-l2", l2),
        ("mid-data", l2 + 64 * KIB + 4096),
        ("last-cluster", len - 64 * KIB),
    ] {
        let p = damaged(&dir, &base, &format!("trunc-{name}.qcow2"), |p| {
            truncate(p, at)
        });
        let spots = [(0, 256 * KIB), (12 * MIB, 64 * KIB)];
        if qemu_check(&p).code != 0 {
            expect_noticed(&p, &spots);
        } else {
            // qemu-img check ignores what lies past the end of the file (a file cut right
            // at the L1 table checks clean); we only require no panic.
            probe_with(&p, true, &spots);
        }
        probe_with(&p, false, &spots);
    }
}

// ---- snapshots -------------------------------------------------------------------------------------

#[test]
fn snapshot_table_out_of_range() {
    let dir = tmpdir();
    let (base, _) = base_image(&dir, "base.qcow2", "");
    let cases: Vec<(&str, u32, u64)> = vec![
        ("snap-count-65537", 65537, 0x10_0000),
        ("snap-count-max", 0xffff_ffff, 0x10_0000),
        ("snap-unaligned", 1, 0x10008),
        ("snap-beyond-2^63", 4, 0xffff_ffff_ffff_0000),
    ];
    for (name, n, off) in cases {
        let p = damaged(&dir, &base, &format!("{name}.qcow2"), |p| {
            poke_be32(p, hdr::NB_SNAPSHOTS, n);
            poke_be64(p, hdr::SNAPSHOTS_OFFSET, off);
        });
        assert!(qemu_refuses(&p), "qemu accepts {name}");
        expect_open_err(&p, &[]);
    }
    // A snapshot table "at" the header: qemu opens it, but check finds it broken.
    let p = damaged(&dir, &base, "snap-at-header.qcow2", |p| {
        poke_be32(p, hdr::NB_SNAPSHOTS, 1);
        poke_be64(p, hdr::SNAPSHOTS_OFFSET, 0);
    });
    expect_noticed(&p, &[]);
    // Many zero-filled entries past EOF.
    let p = damaged(&dir, &base, "snap-eof.qcow2", |p| {
        poke_be32(p, hdr::NB_SNAPSHOTS, 60000);
        poke_be64(p, hdr::SNAPSHOTS_OFFSET, 1 << 40);
    });
    expect_noticed(&p, &[]);
}

// ---- backing chains --------------------------------------------------------------------------------

#[test]
fn backing_file_fields_invalid() {
    let dir = tmpdir();
    let (_, _) = base_image(&dir, "bottom.qcow2", "");
    let top = path_in(&dir, "top.qcow2");
    qemu_create_overlay(&top, "bottom.qcow2", "qcow2", "", None);
    let off = peek_be64(&top, hdr::BACKING_FILE_OFFSET);
    let cases: Vec<(&str, u64, u32)> = vec![
        ("name-past-cluster", 0x20000, 12),
        ("name-too-long", off, 2000),
        ("name-crosses-cluster", 0x10000 - 4, 12),
    ];
    for (name, o, len) in cases {
        let p = damaged(&dir, &top, &format!("{name}.qcow2"), |p| {
            poke_be64(p, hdr::BACKING_FILE_OFFSET, o);
            poke_be32(p, hdr::BACKING_FILE_SIZE, len);
        });
        assert!(qemu_refuses(&p), "qemu accepts {name}");
        expect_open_err(&p, &[]);
    }
    // An empty backing file name: qemu treats it as no backing file. We may too, or refuse the
    // image with an error that names it (not the directory the empty name resolves to).
    let p = damaged(&dir, &top, "emptyname.qcow2", |p| {
        poke_be32(p, hdr::BACKING_FILE_SIZE, 0);
    });
    assert!(!qemu_refuses(&p));
    probe(&p, true);
    // A backing "file" that is a directory: refused, and the error names the image.
    let p = damaged(&dir, &top, "dirname.qcow2", |p| {
        poke_bytes(p, off, b"/tmp");
        poke_be32(p, hdr::BACKING_FILE_SIZE, 4);
    });
    assert!(qemu_refuses(&p));
    expect_open_err(&p, &[]);
    // A backing file that does not exist: the error names it.
    let p = damaged(&dir, &top, "missing.qcow2", |p| {
        poke_bytes(p, off, b"nothere.qcow");
    });
    expect_open_err(&p, &["nothere.qcow"]);
}

#[test]
fn backing_loops_are_refused() {
    let dir = tmpdir();
    let a = path_in(&dir, "a.qcow2");
    let b = path_in(&dir, "b.qcow2");
    qemu_create(&b, SIZE, "");
    qemu_create_overlay(&a, "b.qcow2", "qcow2", "", None);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ])
    .ok();
    assert!(qemu_refuses(&a));
    expect_open_err(&a, &[]);
    expect_open_err(&b, &[]);
    // Without the backing chain the image itself opens fine.
    let img = Image::open(
        &a,
        &OpenOptions {
            open_backing: false,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    assert_eq!(img.virtual_size(), SIZE);
    img.close().unwrap();
    // An image that is its own backing file.
    let s = path_in(&dir, "self.qcow2");
    qemu_create(&s, SIZE, "");
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        s.to_str().unwrap(),
    ])
    .ok();
    expect_open_err(&s, &[]);
}

/// Builds d0000.qcow2 <- d0001.qcow2 <- ... <- d{depth}.qcow2 by copying one template and poking the
/// backing name; d0000 holds data. Returns the top.
fn chain(dir: &TempDir, depth: usize) -> PathBuf {
    let d0 = path_in(dir, "d0000.qcow2");
    qemu_create(&d0, MIB, "cluster_size=512");
    qemu_io(&d0, "qcow2", &["write -P 0x5d 4096 8192".to_string()]);
    let tmpl = path_in(dir, "template.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "d0000.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=512",
        tmpl.to_str().unwrap(),
        "1M",
    ])
    .ok();
    let off = peek_be64(&tmpl, hdr::BACKING_FILE_OFFSET);
    let bytes = std::fs::read(&tmpl).unwrap();
    let mut top = d0;
    for i in 1..=depth {
        let p = path_in(dir, &format!("d{i:04}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        poke_bytes(&p, off, format!("d{:04}.qcow2", i - 1).as_bytes());
        top = p;
    }
    top
}

#[test]
fn backing_chain_depth() {
    // A chain of 16 opens and reads through to the bottom...
    let dir = tmpdir();
    let top = chain(&dir, 16);
    let mut want = vec![0u8; MIB as usize];
    want[4096..4096 + 8192].fill(0x5d);
    assert_same("16-deep chain", &qemu_read_all(&top, "qcow2"), &want);
    assert_same("16-deep chain, ours", &our_read_all(&top, 3), &want);
    // ...one of 2000 is refused with an error (no stack overflow, no fd exhaustion).
    let dir = tmpdir();
    let top = chain(&dir, 2000);
    let m = expect_open_err(&top, &[]);
    eprintln!("2000-deep chain: {m}");
}

// ---- random mutations -----------------------------------------------------------------------------

/// The byte ranges worth mutating: header cluster start, refcount table, first refblock, L1 table
/// and first L2 table.
fn metadata_regions(p: &Path) -> Vec<(u64, u64)> {
    let cs = 1u64 << peek_be32(p, hdr::CLUSTER_BITS);
    let rt = peek_be64(p, hdr::REFCOUNT_TABLE_OFFSET);
    let rb = peek_be64(p, rt);
    let l1 = l1_offset(p);
    let l1_len = peek_be32(p, hdr::L1_SIZE) as u64 * 8;
    let l2 = l2_offset(p);
    vec![
        (0, cs.min(1024)),
        (rt, cs.min(256)),
        (rb, cs.min(512)),
        (l1, l1_len.clamp(8, 512)),
        (l2, cs.min(4096)),
    ]
}

/// Applies `iterations` seeded mutations (1 to 4 bytes or fields each) to `base` and probes each
/// result; returns the failures and how many mutated images opened.
fn fuzz(dir: &TempDir, base: &Path, iterations: u64, seed0: u64) -> (Vec<String>, u64) {
    let pristine = std::fs::read(base).unwrap();
    let regions = metadata_regions(base);
    let interesting: [u64; 12] = [
        0,
        1,
        0x7f,
        0xff,
        0x200,
        0x1_0000,
        0x7fff_ffff,
        0xffff_ffff,
        1 << 40,
        1 << 56,
        i64::MAX as u64,
        u64::MAX,
    ];
    let p = path_in(dir, "fuzz.qcow2");
    let mut opened = 0;
    let mut failures = Vec::new();
    for seed in seed0..seed0 + iterations {
        let mut rng = Rng::new(seed);
        let mut bytes = pristine.clone();
        for _ in 0..rng.range(1, 4) {
            let (start, len) = if rng.chance(40) {
                (0, 112)
            } else {
                *rng.pick(&regions)
            };
            let at = ((start + rng.below(len)) as usize).min(bytes.len() - 8);
            match rng.below(3) {
                0 => bytes[at] = rng.below(256) as u8,
                1 => {
                    let at = at / 4 * 4;
                    let v = *rng.pick(&interesting) as u32;
                    bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
                }
                _ => {
                    let at = at / 8 * 8;
                    let v = *rng.pick(&interesting);
                    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
        std::fs::write(&p, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(|| probe(&p, seed % 3 != 0))) {
            Ok(Outcome::OpenFailed(_)) => {}
            Ok(_) => opened += 1,
            Err(e) => failures.push(format!("seed {seed}: {}", panic_message(&*e))),
        }
    }
    (failures, opened)
}

/// Seeded mutations of the header and metadata tables of small images (512 B clusters; 64 KiB
/// clusters with a compressed cluster; 16 KiB extended-L2 clusters over a backing file): no panic,
/// no hang, every error names the file.
#[test]
fn mutation_fuzz() {
    let dir = tmpdir();
    let (small, _) = base_image(&dir, "fuzz512.qcow2", "cluster_size=512");
    let (big, _) = base_image(&dir, "fuzz64k.qcow2", "");
    qemu_create(&path_in(&dir, "fuzzbacking.qcow2"), SIZE, "");
    let ext = path_in(&dir, "fuzzext.qcow2");
    qemu_create_overlay(
        &ext,
        "fuzzbacking.qcow2",
        "qcow2",
        "cluster_size=16k,extended_l2=on",
        None,
    );
    qemu_io(
        &ext,
        "qcow2",
        &[
            "write -P 0x61 0 4k".to_string(),
            "write -z 8k 4k".to_string(),
            "write -P 0x62 1M 100k".to_string(),
        ],
    );
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for (base, n, seed0) in [
        (&small, 800u64, 1000u64),
        (&big, 400, 5000),
        (&ext, 400, 9000),
    ] {
        let (f, opened) = fuzz(&dir, base, n, seed0);
        summary.push(format!(
            "{}: {opened}/{n} opened, {} misbehaved",
            base.file_name().unwrap().to_string_lossy(),
            f.len()
        ));
        failures.extend(f);
    }
    eprintln!("mutation_fuzz: {}", summary.join("; "));
    assert!(
        failures.is_empty(),
        "{} mutated images misbehaved ({}):\n{}",
        failures.len(),
        summary.join("; "),
        failures.join("\n")
    );
}
