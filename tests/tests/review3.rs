//! Third independent review (2026-12-07, evening): crafted and damaged images, snapshots and
//! compressed clusters, looking for a write that corrupts an image. Each test was written, and
//! seen to fail, before its fix; qemu-img is the oracle where it has an opinion.

use std::path::Path;

use qcow2rs::{Image, OpenOptions, RepairMode};
use qcow2rs_tests::*;

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
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_small_image(&p);
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
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_small_image(&p);
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
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_small_image(&p);
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
    let d = tmpdir();
    let p = d.path().join("s.qcow2");
    qemu_small_image(&p);
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

/// One seed per configuration in CI (8-15 s here); `REVIEW3_SEEDS=N` runs more. Run by hand:
/// 30 seeds of the three plain configurations, 20 then 15 of the first five, 12 of all six,
/// all passing.
#[test]
fn random_snapshots_compressed_discards_resizes() {
    require_qemu();
    let seeds: u64 = std::env::var("REVIEW3_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for seed in 0..seeds {
        for (cluster_size, kind) in [
            (512, ImageKind::Plain),
            (4096, ImageKind::Plain),
            (65536, ImageKind::Plain),
            (16384, ImageKind::Subclusters),
            (4096, ImageKind::Luks),
            (4096, ImageKind::Backing),
        ] {
            snapshot_workload(&SnapshotWorkload {
                seed,
                cluster_size,
                refcount_bits: 16,
                kind,
                cache: qcow2rs::CacheMode::Writeback,
                ops: 160,
            });
        }
    }
}

/// Threads writing, compressing, zeroing, discarding and reading their own clusters of one
/// image while another thread creates and deletes snapshots (delete frees clusters the
/// writers' copy-on-write copies of compressed clusters came from), each thread checking its
/// reads against its model; at the end our check and qemu-img check must be clean and qemu-img
/// must read the model.
#[test]
fn snapshot_create_delete_while_threads_write_compressed_clusters() {
    require_qemu();
    const T: u64 = 3;
    let d = tmpdir();
    let p = d.path().join("t.qcow2");
    let cs = 4096u64;
    let size = 96 * cs;
    Image::create(
        &p,
        &qcow2rs::CreateOptions {
            cluster_size: cs as u32,
            ..qcow2rs::CreateOptions::new(size)
        },
    )
    .unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let model = std::sync::Mutex::new(vec![0u8; size as usize]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let budget = std::time::Duration::from_millis(1500);
    std::thread::scope(|sc| {
        for t in 0..T {
            let (img, model, stop) = (&img, &model, &stop);
            sc.spawn(move || {
                let mut rng = Rng::new(1000 + t);
                let mut mine = vec![0u8; size as usize];
                let start = std::time::Instant::now();
                let mut i = 0;
                while start.elapsed() < budget {
                    i += 1;
                    let c = (rng.below(size / cs / T) * T + t) * cs;
                    let (a, b) = (c as usize, (c + cs) as usize);
                    match rng.below(100) {
                        0..=24 => {
                            let off = rng.below(cs / 512) * 512;
                            let len = rng.range(1, (cs - off) / 512) * 512;
                            let buf = rng.bytes(len as usize);
                            img.write_at(&buf, c + off).unwrap();
                            mine[a + off as usize..a + (off + len) as usize].copy_from_slice(&buf);
                        }
                        25..=49 => {
                            let buf = compressible(rng.next_u64(), cs as usize);
                            img.write_compressed(c, &buf).unwrap();
                            mine[a..b].copy_from_slice(&buf);
                        }
                        50..=59 => {
                            img.write_zeroes(c, cs).unwrap();
                            mine[a..b].fill(0);
                        }
                        60..=69 => {
                            img.discard(c, cs).unwrap();
                            mine[a..b].fill(0);
                        }
                        70..=74 => img.flush().unwrap(),
                        _ => {
                            let mut buf = vec![0u8; cs as usize];
                            img.read_at(&mut buf, c).unwrap();
                            assert!(buf == mine[a..b], "thread {t} op {i}: cluster {c:#x}");
                        }
                    }
                }
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                let mut m = model.lock().unwrap();
                for k in (t..size / cs).step_by(T as usize) {
                    let (a, b) = ((k * cs) as usize, ((k + 1) * cs) as usize);
                    m[a..b].copy_from_slice(&mine[a..b]);
                }
            });
        }
        let (img, stop) = (&img, &stop);
        sc.spawn(move || {
            let mut rng = Rng::new(7);
            let mut live: Vec<String> = Vec::new();
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if live.len() < 3 || rng.chance(40) {
                    let name = format!("s{k}");
                    k += 1;
                    img.create_snapshot(&name).unwrap();
                    live.push(name);
                } else {
                    let i = rng.below(live.len() as u64) as usize;
                    img.delete_snapshot(live.remove(i).as_str()).unwrap();
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
    });
    let model = model.into_inner().unwrap();
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    assert_same("the disk after the threads", &all, &model);
    let r = img.check(None).unwrap();
    assert!(r.is_clean(), "{}", head_tail(&r.messages.join("\n"), 20));
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert_same("qemu reads the disk", &qemu_read_all(&p, "qcow2"), &model);
}

/// A snapshot's own L2 table (the active tree copied it on write) whose refcount is 0. The
/// allocator handed its cluster out and a guest write overwrote it: the snapshot lost its data
/// (qemu-img read zeros or guest data there). QEMU's default overlap check does not cover
/// inactive L2 tables; ours does, since a snapshot is as much the user's data as the disk.
#[test]
fn allocator_never_hands_out_a_snapshot_l2_table_with_refcount_zero() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("s.qcow2");
    qemu_small_image(&p);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]).ok();
    qemu_io(&p, "qcow2", &["write -P 0xdd 4k 4k".into()]).ok();
    let snap_before = qemu_raw(&p, Some("s1"), false);
    let table = peek_be64(&p, hdr::SNAPSHOTS_OFFSET);
    let sn_l1 = peek_be64(&p, table);
    let sn_l2 = peek_be64(&p, sn_l1) & L1E_OFFSET_MASK;
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    assert_ne!(peek_be64(&p, l1) & L1E_OFFSET_MASK, sn_l2);
    poke_refcount(&p, sn_l2, 0);

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    for k in 0..8u64 {
        let _ = img.write_at(&[0x5a; 4096], (1 << 20) + k * 4096);
    }
    let _ = img.close();
    assert_same(
        "snapshot s1 after guest writes",
        &qemu_raw(&p, Some("s1"), false),
        &snap_before,
    );
}

/// The autoclear bit data-file-raw (bit 1) set on an image without an external data file.
/// QEMU refuses to open it ("data-file-raw requires a data file"); we kept the bit, opened the
/// image read-write and wrote to it. It now opens read-only (its data stays readable).
#[test]
fn data_file_raw_without_a_data_file_is_never_written() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_small_image(&p);
    poke_be64(&p, hdr::AUTOCLEAR_FEATURES, 1 << 1);
    let q = qemu_io_raw(&p, "qcow2", &["read 0 4k".into()]);
    assert!(
        q.all().contains("data-file-raw requires a data file"),
        "{q}"
    );
    let before = std::fs::read(&p).unwrap();

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert!(img.is_read_only());
    assert!(img.write_at(&[0x5a; 4096], 1 << 20).is_err());
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert_same("guest cluster 0", &b, &[0xaa; 4096]);
    assert!(img.create_snapshot("x").is_err());
    img.close().unwrap();
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the image was written"
    );
}

/// Compressed clusters that QEMU packed across host cluster boundaries (each one then holds a
/// reference to two host clusters, each host cluster is shared by several compressed clusters):
/// discard, zero, overwrite them in part and whole, with a snapshot sharing them, then delete
/// the snapshot and write again. qemu-img check must stay clean and qemu-img must read the
/// model at every step.
#[test]
fn compressed_clusters_qemu_packed_across_host_clusters() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("c.qcow2");
    let cs = 4096u64;
    let n = 48u64;
    qemu_create(&p, n * cs, "cluster_size=4096");
    let raw = d.path().join("src.raw");
    let mut model = Vec::new();
    for k in 0..n {
        // Half compressible: about 2 KiB compressed, so they straddle host clusters.
        let mut c = compressible(k, cs as usize / 2);
        c.extend(Rng::new(k).bytes(cs as usize / 2 - 300));
        c.resize(cs as usize, 0);
        model.extend(c);
    }
    std::fs::write(&raw, &model).unwrap();
    std::fs::remove_file(&p).unwrap();
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw.to_str().unwrap(),
        p.to_str().unwrap(),
    ])
    .ok();
    let q = assert_qemu_clean(&p);
    assert!(q.compressed_clusters > n / 2, "{}", q.json);
    // At least one compressed cluster crosses a host cluster boundary.
    let l2 = peek_be64(&p, peek_be64(&p, hdr::L1_TABLE_OFFSET)) & L1E_OFFSET_MASK;
    let spans = (0..n)
        .map(|k| peek_be64(&p, l2 + 8 * k))
        .filter(|&e| e & (1 << 62) != 0)
        .filter(|&e| {
            let off = e & ((1 << 58) - 1);
            let nsec = (e & ((1 << 62) - 1)) >> 58;
            let end = (off & !511) + (nsec + 1) * 512;
            off / cs != (end - 1) / cs
        })
        .count();
    assert!(
        spans > 0,
        "no compressed cluster crosses a host cluster boundary"
    );

    let mut rng = Rng::new(42);
    let step = |model: &[u8], what: &str| {
        assert_qemu_clean(&p);
        assert_same(what, &qemu_read_all(&p, "qcow2"), model);
    };
    for round in 0..3 {
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        if round == 1 {
            img.create_snapshot("s").unwrap();
        }
        for _ in 0..24 {
            let c = rng.below(n) * cs;
            let (a, b) = (c as usize, (c + cs) as usize);
            match rng.below(4) {
                0 => {
                    img.discard(c, cs).unwrap();
                    model[a..b].fill(0);
                }
                1 => {
                    img.write_zeroes(c + 512, 1024).unwrap();
                    model[a + 512..a + 1536].fill(0);
                }
                2 => {
                    let buf = rng.bytes(1024);
                    img.write_at(&buf, c + 2048).unwrap();
                    model[a + 2048..a + 3072].copy_from_slice(&buf);
                }
                _ => {
                    let buf = compressible(rng.next_u64(), cs as usize);
                    img.write_compressed(c, &buf).unwrap_or_else(|_| {
                        img.write_at(&buf, c).unwrap();
                    });
                    model[a..b].copy_from_slice(&buf);
                }
            }
        }
        if round == 2 {
            img.delete_snapshot("s").unwrap();
        }
        let r = img.check(None).unwrap();
        assert!(r.is_clean(), "round {round}: {:?}", r.messages);
        img.close().unwrap();
        step(&model, &format!("round {round}"));
    }
}

/// Narrow refcounts (1 and 2 bits): a snapshot that would overflow a refcount fails; the
/// failed operation may leak, never corrupt, and the image stays writable and readable as
/// before (qemu-img check: leaks at most; after -r leaks, clean).
#[test]
fn snapshot_that_overflows_narrow_refcounts_fails_cleanly() {
    require_qemu();
    for bits in [1u32, 2] {
        let d = tmpdir();
        let p = d.path().join("n.qcow2");
        let cs = 4096u64;
        Image::create(
            &p,
            &qcow2rs::CreateOptions {
                cluster_size: cs as u32,
                refcount_bits: bits,
                ..qcow2rs::CreateOptions::new(64 * cs)
            },
        )
        .unwrap();
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        let mut model = vec![0u8; 64 * cs as usize];
        for k in 0..16u64 {
            let b = Rng::new(k).bytes(cs as usize);
            img.write_at(&b, k * 3 * cs).unwrap();
            model[(k * 3 * cs) as usize..((k * 3 + 1) * cs) as usize].copy_from_slice(&b);
        }
        let mut made = 0;
        for s in 0..4 {
            match img.create_snapshot(&format!("s{s}")) {
                Ok(_) => made += 1,
                Err(e) => {
                    eprintln!("{bits} bits: snapshot {s}: {e}");
                    break;
                }
            }
        }
        assert!(made < 4, "{bits}-bit refcounts took 4 snapshots");
        let b = vec![0x5a; 2 * cs as usize];
        img.write_at(&b, cs / 2).unwrap();
        model[(cs / 2) as usize..(cs / 2 + 2 * cs) as usize].copy_from_slice(&b);
        let mut got = vec![0u8; model.len()];
        img.read_at(&mut got, 0).unwrap();
        assert_same(&format!("{bits} bits"), &got, &model);
        img.close().unwrap();
        let q = qemu_check(&p);
        assert!(
            q.corruptions == 0 && q.check_errors == 0,
            "{bits} bits: {}",
            q.text
        );
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        img.check(Some(RepairMode::Leaks)).unwrap();
        img.close().unwrap();
        assert_qemu_clean(&p);
        assert_same(
            &format!("{bits} bits (qemu)"),
            &qemu_read_all(&p, "qcow2"),
            &model,
        );
    }
}

/// Two snapshots whose entries name the same L1 table (crafted; qemu-img check -r all makes
/// the refcounts agree, after which qemu-img calls the image clean). Deleting one must leave
/// the other whole: its L1 table, L2 tables and data keep their references.
#[test]
fn deleting_a_snapshot_whose_l1_table_another_shares_keeps_the_other() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("s.qcow2");
    qemu_small_image(&p);
    let ps = p.to_str().unwrap();
    qemu_img(&["snapshot", "-c", "s1", ps]).ok();
    qemu_img(&["snapshot", "-c", "s2", ps]).ok();
    qemu_io(&p, "qcow2", &["write -P 0xdd 0 12k".into()]).ok();
    let want = qemu_raw(&p, Some("s1"), false);
    // Entry 2 names entry 1's L1 table.
    let table = peek_be64(&p, hdr::SNAPSHOTS_OFFSET);
    let l1_of_1 = peek_be64(&p, table);
    let len1 = 40
        + peek_be16(&p, table + 12) as u64
        + peek_be16(&p, table + 14) as u64
        + peek_be32(&p, table + 36) as u64;
    let e2 = table + len1.div_ceil(8) * 8;
    poke_be64(&p, e2, l1_of_1);
    let fix = qemu_img(&["check", "-r", "all", ps]);
    assert_qemu_clean(&p);
    assert_same("s2 before", &qemu_raw(&p, Some("s2"), false), &want);

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.delete_snapshot("s1").unwrap();
    for k in 0..16u64 {
        img.write_at(&[0x5a; 4096], (1 << 20) + k * 4096).unwrap();
    }
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert_same(
        &format!("s2 after deleting s1 ({})", fix.all().lines().count()),
        &qemu_raw(&p, Some("s2"), false),
        &want,
    );
}

/// The active L1 table's offset names the refcount block (crafted). Its first entries read as
/// garbage, but those past the refcounts in use are zero, and a guest write there gave the
/// guest cluster an L2 table by writing the L1 entry, into the refcount block: the refcounts
/// of four clusters became 0x8000-odd (and the refcount cache wrote its own copy of the block
/// back over the entry). QEMU's overlap check refuses that L1 write (and marks the image
/// corrupt); such an image now opens read-only, as one whose L1 table shares a cluster with
/// the refcount table does.
#[test]
fn active_l1_table_over_a_refcount_block_is_never_written() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_create(&p, 64 << 20, "cluster_size=4096");
    qemu_io(&p, "qcow2", &["write -P 0xaa 0 4k".into()]).ok();
    let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
    let block = peek_be64(&p, reftable);
    poke_be64(&p, hdr::L1_TABLE_OFFSET, block);
    let before = peek_bytes(&p, block, 4096);

    if let Ok(img) = Image::open(&p, &OpenOptions::default()) {
        let ro = img.is_read_only();
        let w = img.write_at(&[0x5a; 4096], 16 << 20);
        let _ = img.close();
        let after = peek_bytes(&p, block, 4096);
        let changed: Vec<usize> = (0..4096).filter(|&i| before[i] != after[i]).collect();
        assert!(
            changed.iter().all(|&i| i < 16),
            "a guest write ({w:?}) wrote into the refcount block that is also the L1 table: bytes {changed:?} changed"
        );
        assert!(ro, "opened read-write");
    }
}

/// An active L1 entry (without COPIED) naming the refcount block as its L2 table. No L2 write
/// lands there (the table is copied on write), but every refcount change rewrote "L2 entries"
/// of guest range 2-4 MiB: allocations elsewhere changed what the guest read there (from
/// zeros to errors about garbage entries). QEMU's overlap check refuses refcount-block writes
/// over an active L2 table. Such an image now opens read-only; `check -r all` rebuilds the
/// refcount structures elsewhere.
#[test]
fn refcount_updates_never_rewrite_an_active_l2_table() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("r.qcow2");
    qemu_create(&p, 64 << 20, "cluster_size=4096");
    qemu_io(&p, "qcow2", &["write -P 0xaa 0 4k".into()]).ok();
    let reftable = peek_be64(&p, hdr::REFCOUNT_TABLE_OFFSET);
    let block = peek_be64(&p, reftable);
    let l1 = peek_be64(&p, hdr::L1_TABLE_OFFSET);
    poke_be64(&p, l1 + 8, block);
    let read_range = |img: &Image| {
        (0..512u64)
            .map(|k| {
                let mut b = vec![0u8; 4096];
                img.read_at(&mut b, (2 << 20) + k * 4096).map(|()| b).ok()
            })
            .collect::<Vec<_>>()
    };
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let before = read_range(&img);
    img.close().unwrap();

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    for k in 0..64u64 {
        if let Err(e) = img.write_at(&[0x5a; 4096], (16 << 20) + k * 65536) {
            eprintln!("write {k}: {e}");
        }
    }
    let _ = img.close();
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let after = read_range(&img);
    img.close().unwrap();
    let changed = (0..512).filter(|&k| before[k] != after[k]).count();
    assert_eq!(
        changed, 0,
        "writes elsewhere changed {changed} guest clusters at 2-4 MiB"
    );

    // Repair moves the refcount structures away; then the image is writable again.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let r = img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert!(r.rebuilt, "{:?}", r.messages);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert!(!img.is_read_only());
    img.close().unwrap();
}

/// An image with a persistent dirty bitmap (qemu-img bitmap --add), written by us: opening it
/// read-write clears the autoclear bit (we do not keep bitmaps), after which QEMU ignores the
/// bitmaps extension and its check counts the bitmap directory and table as leaked clusters.
/// Our check still counted them as referenced and called the image clean where qemu-img
/// reports leaks; both now agree, and after either repair both call it clean.
#[test]
fn bitmap_clusters_are_counted_as_qemu_counts_them() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("b.qcow2");
    qemu_small_image(&p);
    let ps = p.to_str().unwrap();
    qemu_img(&["bitmap", "--add", ps, "b0"]).ok();
    qemu_io(&p, "qcow2", &["write -P 0xbb 1M 64k".into()]).ok();
    assert_qemu_clean(&p);
    assert_our_check_clean(&p);

    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.write_at(&[0x5a; 4096], 2 << 20).unwrap();
    img.close().unwrap();
    let q = qemu_check(&p);
    let ours = our_check(&p);
    assert_eq!(
        (ours.corruptions, ours.leaks),
        (q.corruptions, q.leaks),
        "ours: {:?}\nqemu-img: {}",
        ours.messages,
        q.text
    );
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    img.check(Some(RepairMode::Leaks)).unwrap();
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert_our_check_clean(&p);
    let data = qemu_read_all(&p, "qcow2");
    assert_same("1 MiB", &data[1 << 20..(1 << 20) + 65536], &[0xbb; 65536]);
    assert_same("2 MiB", &data[2 << 20..(2 << 20) + 4096], &[0x5a; 4096]);
}

/// Threads writing, compressing, zeroing and discarding anywhere (partial and whole clusters,
/// crossing cluster boundaries) while another thread creates, applies and deletes snapshots
/// and resizes. No model (apply changes everything under the writers): the image must check
/// clean, qemu-img must agree, and qemu-img and we must read the same disk and snapshots.
#[test]
fn snapshot_apply_and_resize_while_threads_write() {
    require_qemu();
    let d = tmpdir();
    let p = d.path().join("t.qcow2");
    let cs = 4096u64;
    let size = 64 * cs;
    Image::create(
        &p,
        &qcow2rs::CreateOptions {
            cluster_size: cs as u32,
            ..qcow2rs::CreateOptions::new(size)
        },
    )
    .unwrap();
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let budget = std::time::Duration::from_millis(1500);
    let mut names: Vec<String> = Vec::new();
    std::thread::scope(|sc| {
        for t in 0..3u64 {
            let (img, stop) = (&img, &stop);
            sc.spawn(move || {
                let mut rng = Rng::new(2000 + t);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let size = img.virtual_size();
                    let off = rng.below(size) & !511;
                    let len = (rng.range(512, 2 * cs) & !511).min(size - off);
                    // The disk may have shrunk under the request; nothing else may fail.
                    let r = match rng.below(4) {
                        0 => img.write_at(&rng.bytes(len as usize), off),
                        1 => {
                            let c = off / cs * cs;
                            let n = cs.min(size - c);
                            img.write_compressed(c, &compressible(rng.next_u64(), n as usize))
                        }
                        2 => img.write_zeroes(off, len),
                        _ => img.discard(off, len),
                    };
                    match r {
                        Ok(()) => {}
                        Err(qcow2rs::Error::InvalidArgument(m)) if m.contains("past the end") => {}
                        Err(e) => panic!("thread {t}: {e}"),
                    }
                }
            });
        }
        let (img, stop, names) = (&img, &stop, &mut names);
        sc.spawn(move || {
            let mut rng = Rng::new(9);
            let start = std::time::Instant::now();
            let mut k = 0;
            while start.elapsed() < budget {
                match rng.below(10) {
                    0..=3 if names.len() < 4 => {
                        let n = format!("s{k}");
                        k += 1;
                        img.create_snapshot(&n).unwrap();
                        names.push(n);
                    }
                    4..=5 if !names.is_empty() => {
                        let n = &names[rng.below(names.len() as u64) as usize];
                        img.apply_snapshot(n.as_str()).unwrap();
                    }
                    6 if !names.is_empty() => {
                        let n = names.remove(rng.below(names.len() as u64) as usize);
                        img.delete_snapshot(n.as_str()).unwrap();
                    }
                    7 => {
                        let s = img.virtual_size();
                        let new = if rng.chance(50) {
                            s + 3 * cs
                        } else {
                            (s - 3 * cs).max(16 * cs)
                        };
                        img.resize(new).unwrap();
                    }
                    _ => img.flush().unwrap(),
                }
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    let r = img.check(None).unwrap();
    assert!(r.is_clean(), "{}", head_tail(&r.messages.join("\n"), 20));
    let mut ours = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut ours, 0).unwrap();
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert_same(
        "qemu reads the disk as we do",
        &qemu_read_all(&p, "qcow2"),
        &ours,
    );
    for n in &names {
        let view = Image::open(
            &p,
            &OpenOptions {
                snapshot: Some(n.as_str().into()),
                ..OpenOptions::read_only()
            },
        )
        .unwrap();
        let mut snap = vec![0u8; view.virtual_size() as usize];
        view.read_at(&mut snap, 0).unwrap();
        view.close().unwrap();
        let q = qemu_raw(&p, Some(n), false);
        let m = q.len().min(snap.len());
        assert_same(&format!("snapshot {n}"), &q[..m], &snap[..m]);
    }
}
