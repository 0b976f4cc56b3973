//! `check -r all` on images whose metadata is damaged in ways that make structures overlap, with
//! qemu-img as the oracle: after our repair and a reopen, `qemu-img check` must call the image
//! clean and the guest data that was readable must be unchanged. Each test was written, and seen
//! to fail, before its fix (review of 2026-12-07).

use std::path::Path;

use qcow2rs::{Image, OpenOptions, RepairMode};
use qcow2rs_tests::*;

fn repair_all(path: &Path) -> qcow2rs::CheckReport {
    let img = Image::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()));
    let r = img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    r
}

/// An active L1 entry with flags but no offset (`0x8000000000000000`, COPIED alone). Every reader
/// takes it for an unallocated L2 table, but QEMU's check counts it as an L2 table at offset 0
/// (it tests the raw entry for zero), and QEMU's writer, seeing COPIED, would load the header
/// cluster as that L2 table and write guest mappings into it (its overlap check stops that by
/// marking the image corrupt). Our check called such an image clean and `-r all` left the entry,
/// so an image we had "repaired" was one QEMU reports 40-odd errors in and refuses to write.
#[test]
fn l1_entry_with_flags_and_no_offset_is_reported_and_cleared() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("a.qcow2");
    qemu_small_image(&p);
    let before = qemu_read_all(&p, "qcow2");
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    assert_eq!(peek_be32(&p, hdr::L1_SIZE), 2);
    poke_be64(&p, l1 + 8, 1 << 63);

    // The oracle sees a corruption; so must we.
    let q = qemu_check(&p);
    assert!(q.corruptions > 0, "qemu-img check: {}", q.text);
    let ours = our_check(&p);
    assert!(
        ours.corruptions > 0,
        "our check calls clean an image qemu-img finds {} corruptions in",
        q.corruptions
    );

    let r = repair_all(&p);
    assert!(r.is_clean(), "{:?}", r.messages);
    assert_qemu_clean(&p);
    assert_our_check_clean(&p);
    assert_eq!(peek_be64(&p, l1 + 8), 0);
    assert_same(
        "guest data after repair",
        &qemu_read_all(&p, "qcow2"),
        &before,
    );
    // And QEMU can write there again.
    qemu_io(&p, "qcow2", &["write -P 0xdd 2M 4k".into()]).ok();
    assert_qemu_clean(&p);
}

const PW: &str = "correct horse battery staple";

fn secret_arg() -> String {
    format!("secret,id=sec0,data={PW}")
}

fn qemu_io_secret(img: &Path, cmds: &[&str]) -> Run {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.arg("--object").arg(secret_arg()).arg("--image-opts");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        img.display()
    ));
    run(&mut cmd)
}

/// An active L1 entry pointing into the LUKS header area (at a cluster of key material): the
/// COPIED pass of `-r all` read those random bytes as L2 entries and cleared bit 63 of every one
/// that decoded as an aligned standard cluster with a refcount other than one, writing the
/// "repaired" table back over the key material: the password no longer opened the image.
/// (qemu-img check -r all does the same: its overlap check does not cover the encryption
/// header.) A table that shares its cluster with other metadata is now left alone.
#[test]
fn copied_repair_never_writes_an_l2_table_over_the_luks_header() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("e.qcow2");
    let obj = secret_arg();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &obj,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096",
        p.to_str().unwrap(),
        "4M",
    ])
    .ok();
    let w = qemu_io_secret(&p, &["write -P 0xaa 0 12k"]);
    assert!(w.code == 0 && !w.all().contains("failed"), "{w}");
    let ext = header_extensions(&p)
        .into_iter()
        .find(|e| e.0 == 0x0537_be77)
        .expect("full disk encryption header extension");
    let (luks_off, luks_len) = (peek_be64(&p, ext.1), peek_be64(&p, ext.1 + 8));
    assert!(luks_len > 2 * 4096);
    let luks_before = peek_bytes(&p, luks_off, luks_len as usize);
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    poke_be64(&p, l1 + 8, (luks_off + 4096) | 1 << 63);

    let img = Image::open(
        &p,
        &OpenOptions {
            password: Some(PW.into()),
            ..OpenOptions::new()
        },
    )
    .unwrap();
    let r = img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert!(
        peek_bytes(&p, luks_off, luks_len as usize) == luks_before,
        "check -r all wrote into the LUKS header area:\n{}",
        head_tail(&r.messages.join("\n"), 20)
    );
    // QEMU still opens it with the password and reads the data.
    let rd = qemu_io_secret(&p, &["read -P 0xaa 0 12k"]);
    assert!(rd.code == 0 && !rd.all().contains("failed"), "{rd}");
}

/// A snapshot whose L1 table offset names the active L1 table. The L2 tables and data are then
/// referenced twice, and `-r all` raised their refcounts (and the L1 table's) to two and called
/// the image clean (qemu-img check agrees once the counts match, though its `-r all` refuses
/// the image: its overlap check will not write the active L1 over an inactive one). But the
/// active L1 table is written in place, whatever its refcount: the next guest write that gave a
/// guest cluster a new L2 table changed the snapshot too. The active L1 table must have its
/// clusters to itself; the check reports it when it does not.
#[test]
fn active_l1_table_shared_with_a_snapshot_is_not_called_clean() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("s.qcow2");
    qemu_small_image(&p);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]).ok();
    qemu_io(&p, "qcow2", &["write -P 0xdd 4k 4k".into()]).ok();
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    let table = peek_be64(&p, hdr::SNAPSHOTS_OFFSET);
    assert_eq!(peek_be32(&p, hdr::NB_SNAPSHOTS), 1);
    poke_be64(&p, table, l1);

    let r = repair_all(&p);
    assert!(
        !r.is_clean(),
        "check -r all called clean an image whose snapshot shares the active L1 table:\n{}",
        head_tail(&r.messages.join("\n"), 20)
    );
    assert!(!our_check(&p).is_clean());
}

/// The same image opened read-write and written without a check: the write that gave guest
/// cluster 2 MiB its first L2 table wrote the active L1 entry, which was the snapshot's L1
/// entry too: the snapshot, read by qemu-img, then showed the new data. The image now opens
/// read-only (QEMU's overlap check refuses the L1 write and marks the image corrupt).
#[test]
fn write_never_changes_a_snapshot_sharing_the_active_l1_table() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("s.qcow2");
    qemu_small_image(&p);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]).ok();
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    poke_be64(&p, peek_be64(&p, hdr::SNAPSHOTS_OFFSET), l1);

    match Image::open(&p, &OpenOptions::default()) {
        Ok(img) => {
            let _ = img.write_at(&[0x5a; 4096], 2 << 20);
            let _ = img.close();
        }
        Err(e) => eprintln!("open refused: {e}"),
    }
    let raw = d.path().join("snap.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .ok();
    let snap = std::fs::read(&raw).unwrap();
    assert!(
        snap[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0),
        "a write to the active disk changed the snapshot"
    );
}

/// An active L1 entry with COPIED naming the refcount table, or a refcount block, as its L2
/// table. A guest write there took the table as its own (COPIED) and wrote the new cluster's L2
/// entry into it: into the refcount table, entry 0 then named the guest data cluster as the
/// first refcount block; into a refcount block, a refcount became 0x8000-odd. QEMU's overlap
/// check refuses such a write (active L2 over refcount table or block).
#[test]
fn guest_write_never_writes_an_l2_entry_into_refcount_structures() {
    require_qemu();
    for target in ["refcount table", "refcount block"] {
        let d = tmpdir();
        let p = d.path().join("r.qcow2");
        qemu_small_image(&p);
        let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
        let block = peek_be64(&p, reftable);
        let off = if target == "refcount table" {
            reftable
        } else {
            block
        };
        let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
        poke_be64(&p, l1 + 8, off | 1 << 63);
        let (t0, b0) = (peek_bytes(&p, reftable, 4096), peek_bytes(&p, block, 4096));

        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        let w = img.write_at(&[0x5a; 4096], 2 << 20);
        let _ = img.close();
        assert!(
            peek_bytes(&p, reftable, 4096) == t0 && peek_bytes(&p, block, 4096) == b0,
            "a guest write ({w:?}) wrote an L2 entry into the {target}"
        );
    }
}

/// An L2 entry (COPIED) naming the refcount block as a guest data cluster. Discarding that
/// guest cluster dropped the block's only counted reference: its refcount became 0, and the
/// next allocation could hand the live refcount block out as a new data cluster.
#[test]
fn discard_never_frees_a_refcount_block_named_by_an_l2_entry() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_small_image(&p);
    let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
    let block = peek_be64(&p, reftable);
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    let l2 = peek_be64(&p, l1) & L1E_OFFSET_MASK;
    poke_be64(&p, l2 + 8, block | 1 << 63);
    let b0 = peek_bytes(&p, block, 4096);

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let r = img.discard(4096, 4096);
    let _ = img.flush();
    for k in 0..8u64 {
        let _ = img.write_at(&[0x5a; 4096], (1 << 20) + k * 4096);
    }
    let _ = img.close();
    let b1 = peek_bytes(&p, block, 4096);
    assert!(
        b1.iter().any(|&b| b != 0x5a) && b1[..8] == b0[..8],
        "discard ({r:?}) freed the refcount block and a guest write reused it"
    );
}
