//! Third independent review (2026-12-07, evening): crafted and damaged images, snapshots and
//! compressed clusters, looking for a write that corrupts an image. Each test was written, and
//! seen to fail, before its fix; qemu-img is the oracle where it has an opinion.

use std::path::{Path, PathBuf};

use qcow2rs::{Image, OpenOptions, RepairMode};
use qcow2rs_tests::*;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn tmpdir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("qcow2rs-review3-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// A 4 MiB image with 4 KiB clusters (two L1 entries), three data clusters written by qemu-io.
fn qemu_image(path: &Path) {
    qemu_create(path, 4 << 20, "cluster_size=4096");
    qemu_io(
        path,
        "qcow2",
        &[
            "write -P 0xaa 0 4k".into(),
            "write -P 0xbb 4k 4k".into(),
            "write -P 0xcc 8k 4k".into(),
        ],
    )
    .ok();
}

/// Set the 16-bit refcount of the cluster at `off` in the first refcount block.
fn poke_refcount(p: &Path, off: u64, v: u16) {
    let reftable = peek_be64(p, hdr::REFCOUNT_TABLE_OFFSET);
    let block = peek_be64(p, reftable);
    poke_be16(p, block + 2 * (off / 4096), v);
}

/// Whether a cluster of `p` at `off` holds guest data written with byte `b` (a whole 512-byte
/// sector of it).
fn holds_pattern(p: &Path, off: u64, b: u8) -> bool {
    peek_bytes(p, off, 4096)
        .chunks(512)
        .any(|s| s.iter().all(|&x| x == b))
}

/// The refcount block's own refcount is 0 (a damaged image: qemu-img check reports
/// `ERROR cluster 2 refcount=0 reference=1`). The allocator's first fit found the refcount
/// block's cluster free and its overlap check (header, L1, refcount table, snapshot tables)
/// did not cover refcount blocks: the cluster was handed out and a guest write put its data
/// over the live refcount block. (QEMU's overlap check covers refcount blocks.)
#[test]
fn allocator_never_hands_out_a_refcount_block_with_refcount_zero() {
    require_qemu();
    let d = tmpdir("refblock-rc0");
    let p = d.0.join("r.qcow2");
    qemu_image(&p);
    let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
    let block = peek_be64(&p, reftable);
    poke_refcount(&p, block, 0);

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut res = Vec::new();
    for k in 0..8u64 {
        res.push(img.write_at(&[0x5a; 4096], (1 << 20) + k * 4096).err());
    }
    let _ = img.close();
    assert!(
        !holds_pattern(&p, block, 0x5a),
        "a guest write landed on the refcount block ({res:?})"
    );
    // Repair makes it whole again, and every write that succeeded reads back.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert_qemu_clean(&p);
    let after = qemu_read_all(&p, "qcow2");
    for (k, r) in res.iter().enumerate() {
        let at = (1 << 20) + k * 4096;
        if r.is_none() {
            assert_same(
                &format!("write {k} (acknowledged)"),
                &after[at..at + 4096],
                &[0x5a; 4096],
            );
        }
    }
}

/// The same for an L2 table of the active L1 table whose refcount is 0.
#[test]
fn allocator_never_hands_out_an_active_l2_table_with_refcount_zero() {
    require_qemu();
    let d = tmpdir("l2-rc0");
    let p = d.0.join("r.qcow2");
    qemu_image(&p);
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    let l2 = peek_be64(&p, l1) & L1E_OFFSET_MASK;
    poke_refcount(&p, l2, 0);
    let before = qemu_read_all(&p, "qcow2");

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    for k in 0..8u64 {
        let _ = img.write_at(&[0x5a; 4096], (3 << 20) + k * 4096);
    }
    let _ = img.close();
    assert!(
        !holds_pattern(&p, l2, 0x5a),
        "a guest write landed on the active L2 table"
    );
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert_qemu_clean(&p);
    let after = qemu_read_all(&p, "qcow2");
    assert_same("first 1 MiB", &after[..1 << 20], &before[..1 << 20]);
}

/// An L2 entry naming the first cluster past the end of the file, in an image whose refcount
/// table must be rebuilt (an entry with a reserved bit). The rebuild placed its new refcount
/// block right at the old end of the file, which that entry names: the repaired image had a
/// refcount block shared with a guest data cluster (qemu-img check: `ERROR refcount block 0
/// refcount=2`), and the guest read the refcount block as its data. (qemu-img check -r all
/// refuses this image: its own rebuild trips its overlap check.) The rebuilt structures now
/// go where no entry points, and a cluster named past the old end is counted once the file
/// covers it.
#[test]
fn refcount_rebuild_never_places_a_block_where_an_l2_entry_points() {
    require_qemu();
    let d = tmpdir("rebuild-past-end");
    let p = d.0.join("r.qcow2");
    qemu_image(&p);
    let len = file_len(&p);
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    let l2 = peek_be64(&p, l1) & L1E_OFFSET_MASK;
    poke_be64(&p, l2 + 3 * 8, len | 1 << 63);
    let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
    poke_be64(&p, reftable, peek_be64(&p, reftable) | 1);

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let r = img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert!(r.rebuilt, "{:?}", r.messages);
    let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
    assert_ne!(
        peek_be64(&p, reftable) & L1E_OFFSET_MASK,
        len,
        "the rebuilt refcount block is where the L2 entry of guest cluster 3 points"
    );
    assert_qemu_clean(&p);
    assert_our_check_clean(&p);
    let data = qemu_read_all(&p, "qcow2");
    assert_same("guest cluster 3", &data[12288..16384], &[0; 4096]);
    assert_same("guest cluster 0", &data[..4096], &[0xaa; 4096]);
}

/// A snapshot's L1 entry with flags but no offset (`0x8000000000000000`). Our check reported
/// it and `-r all` left it: the "repaired" image still had the corruption qemu-img counts (an
/// L2 table at offset 0), and applying the snapshot made it the active entry. `-r all` now
/// clears it in place (the snapshot reads the same: an unallocated L2 table either way).
#[test]
fn snapshot_l1_entry_with_flags_and_no_offset_is_repaired() {
    require_qemu();
    let d = tmpdir("snap-l1-flags");
    let p = d.0.join("s.qcow2");
    qemu_image(&p);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]).ok();
    let table = peek_be64(&p, hdr::SNAPSHOTS_OFFSET);
    let sn_l1 = peek_be64(&p, table);
    assert_eq!(peek_be64(&p, sn_l1 + 8), 0);
    poke_be64(&p, sn_l1 + 8, 1 << 63);
    let q = qemu_check(&p);
    assert!(q.corruptions > 0, "qemu-img check: {}", q.text);
    assert!(our_check(&p).corruptions > 0);

    let r = repair_all(&p);
    assert!(r.is_clean(), "{:?}", r.messages);
    assert_eq!(peek_be64(&p, sn_l1 + 8), 0);
    assert_qemu_clean(&p);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.apply_snapshot("s1").unwrap();
    img.close().unwrap();
    assert_qemu_clean(&p);
}

fn repair_all(path: &Path) -> qcow2rs::CheckReport {
    let img = Image::open(path, &OpenOptions::default()).unwrap();
    let r = img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    r
}
