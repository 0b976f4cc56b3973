//! Full disks (issue 10, part 7): ENOSPC on a real small file system that the test mounts, a tmpfs
//! and a loop-mounted ext4 (which has real fdatasync semantics), during allocating writes, flushes
//! (new L2 tables, refcount-table growth), snapshot creation and repair. After each failure: the
//! call returned `Error::NoSpace` naming the file, data flushed before reads back, `qemu-img check`
//! finds no corruption (leaks are allowed, and counted), the image closes and reopens, and once a
//! filler file on the same file system is deleted, writing goes on and the new data is durable.
//!
//! The tests mount file systems, so they need root (CI runs as root). Without the permission they
//! fail, saying how to run them, unless `QCOW2RS_NO_MOUNT=1` opts out explicitly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2rs::{CreateOptions, Error, Image, OpenOptions, RepairMode};
use qcow2rs_tests::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fs {
    Tmpfs,
    Ext4,
}

/// A small file system mounted on a temporary directory; unmounted when dropped.
struct Mount {
    dir: TempDir,
    _backing: Option<TempDir>,
}

impl Mount {
    /// Mounts `fs` of `mib` MiB, or returns None when the test is explicitly opted out.
    fn new(fs: Fs, mib: u64) -> Option<Mount> {
        let dir = tmpdir();
        let mp = dir.path().to_str().unwrap().to_string();
        let mut backing = None;
        let r = match fs {
            Fs::Tmpfs => run(Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                &mp,
            ])),
            Fs::Ext4 => {
                let b = tmpdir();
                let img = b.path().join("fs.img");
                std::fs::File::create(&img)
                    .unwrap()
                    .set_len(mib << 20)
                    .unwrap();
                let img = img.to_str().unwrap().to_string();
                // No journal and no reserved blocks: the space the test sees is the space it has.
                let mk = run(Command::new("mkfs.ext4").args([
                    "-q",
                    "-F",
                    "-O",
                    "^has_journal",
                    "-m",
                    "0",
                    &img,
                ]));
                if mk.code != 0 {
                    mk
                } else {
                    backing = Some(b);
                    run(Command::new("mount").args(["-o", "loop", &img, &mp]))
                }
            }
        };
        if r.code != 0 {
            if std::env::var("QCOW2RS_NO_MOUNT").as_deref() == Ok("1") {
                eprintln!("full_disk: not run, QCOW2RS_NO_MOUNT=1 (cannot mount {fs:?}: {r})");
                return None;
            }
            panic!(
                "cannot mount a small {fs:?} file system for the full-disk tests:\n{r}\n\
                 These tests mount file systems and need root (CI runs them as root): run them \
                 as root, e.g. `sudo -E cargo test -p qcow2rs-tests --test full_disk`, or set \
                 QCOW2RS_NO_MOUNT=1 to leave them out explicitly."
            );
        }
        Some(Mount {
            dir,
            _backing: backing,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Free bytes, as statvfs says.
    fn free(&self) -> u64 {
        let out = run(Command::new("stat").args([
            "-f",
            "-c",
            "%a %S",
            self.dir.path().to_str().unwrap(),
        ]))
        .ok();
        let v: Vec<u64> = out
            .stdout
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        v[0] * v[1]
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let r = run(Command::new("umount").arg(self.dir.path()));
        if r.code != 0 {
            let _ = run(Command::new("umount").arg("-l").arg(self.dir.path()));
        }
    }
}

/// Writes a filler file of about `bytes` (less if the disk fills first); returns its size.
fn filler(path: &Path, bytes: u64) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 4096];
    let mut n = 0;
    while n < bytes {
        let want = (bytes - n).min(4096) as usize;
        match f.write(&chunk[..want]) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filler {}: {e}", path.display()),
        }
    }
    // Make sure the blocks are really taken (ext4 allocates at writeback).
    let _ = f.sync_all();
    n
}

/// Fills the file system to the last block.
fn fill_up(path: &Path) -> u64 {
    filler(path, u64::MAX)
}

fn assert_nospace(e: &Error, img: &Path, what: &str) {
    match e {
        Error::NoSpace { file, .. } => assert!(
            file.contains(img.file_name().unwrap().to_str().unwrap()),
            "{what}: NoSpace names {file:?}, not the image {}",
            img.display()
        ),
        other => panic!("{what}: expected Error::NoSpace, got {other:?} ({other})"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(img.file_name().unwrap().to_str().unwrap()),
        "{what}: the message does not name the image: {msg}"
    );
}

/// qemu-img check finds no corruption; returns the leaks it counts.
fn assert_no_corruption(img: &Path, ctx: &str) -> u64 {
    let c = qemu_check(img);
    assert!(
        c.corruptions == 0 && c.check_errors == 0 && (c.code == 0 || c.code == 3),
        "{ctx}: qemu-img check finds the image broken:\n{}\n{}",
        head_tail(&c.text, 30),
        c.json
    );
    c.leaks
}

fn chunk(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// The data of `chunks` (guest offset, seed, len) reads back.
fn assert_chunks(img: &Image, chunks: &[(u64, u64, usize)], ctx: &str) {
    for &(off, seed, len) in chunks {
        let mut b = vec![0u8; len];
        img.read_at(&mut b, off)
            .unwrap_or_else(|e| panic!("{ctx}: read at {off}: {e}"));
        assert_same(&format!("{ctx}: guest {off}"), &b, &chunk(seed, len));
    }
}

fn create(img: &Path, size: u64, cluster: u32, refcount_bits: u32) {
    let mut co = CreateOptions::new(size);
    co.cluster_size = cluster;
    co.refcount_bits = refcount_bits;
    Image::create(img, &co).unwrap();
}

/// Reopens after a failure: the close may fail (it flushes); the image on disk must still open,
/// check free of corruption and hold every flushed chunk.
fn close_and_verify(img: Image, path: &Path, chunks: &[(u64, u64, usize)], ctx: &str) -> u64 {
    if let Err(e) = img.close() {
        eprintln!("{ctx}: close after ENOSPC failed as it may: {e}");
    }
    let leaks = assert_no_corruption(path, ctx);
    let img =
        Image::open(path, &OpenOptions::new()).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    assert_chunks(&img, chunks, ctx);
    img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
    leaks
}

/// After freeing space: writes go on, are durable, and qemu-img check is clean once repaired.
fn continue_after_freeing(path: &Path, chunks: &mut Vec<(u64, u64, usize)>, off: u64, ctx: &str) {
    let img = Image::open(path, &OpenOptions::new()).unwrap();
    for i in 0..4u64 {
        let c = (off + i * 64 * KIB, 9000 + i, 48 * KIB as usize);
        img.write_at(&chunk(c.1, c.2), c.0)
            .unwrap_or_else(|e| panic!("{ctx}: write after freeing space: {e}"));
        chunks.push(c);
    }
    img.flush()
        .unwrap_or_else(|e| panic!("{ctx}: flush after freeing space: {e}"));
    img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert_qemu_clean(path);
    let img = Image::open(path, &OpenOptions::read_only()).unwrap();
    assert_chunks(&img, chunks, &format!("{ctx}, after freeing space"));
}

/// Allocating writes until the disk is full, for a layout: the failure lands on a data write, a new
/// L2 table, a refcount block or the growth of the refcount table, depending on `filler_kib`.
fn writes_until_full(fs: Fs, cluster: u32, refcount_bits: u32, write_len: usize, filler_kib: u64) {
    let Some(m) = Mount::new(fs, 8) else { return };
    let path = m.path("t.qcow2");
    let ctx =
        format!("{fs:?} cluster {cluster} refcount_bits {refcount_bits} filler {filler_kib} KiB");
    create(&path, 64 * MIB, cluster, refcount_bits);
    let fill = m.path("filler");
    // At least 512 KiB, to be freed later.
    filler(&fill, (512 + filler_kib) * KIB);
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    let mut flushed = Vec::new();
    let mut pending = Vec::new();
    let mut off = 0u64;
    let mut seed = 1;
    let err = loop {
        let c = (off, seed, write_len);
        if let Err(e) = img.write_at(&chunk(seed, write_len), off) {
            break e;
        }
        pending.push(c);
        off += write_len as u64 + 4096 * (seed % 3); // unaligned, with gaps
        seed += 1;
        if seed % 4 == 0 {
            if let Err(e) = img.flush() {
                break e;
            }
            flushed.append(&mut pending);
        }
        assert!(
            off + write_len as u64 <= 64 * MIB,
            "{ctx}: the disk never filled up"
        );
    };
    assert_nospace(&err, &path, &ctx);
    assert!(!flushed.is_empty(), "{ctx}: nothing fitted");
    // Data flushed before still reads back through the open image.
    assert_chunks(&img, &flushed, &format!("{ctx}, same session"));
    let leaks = close_and_verify(img, &path, &flushed, &ctx);
    eprintln!("{ctx}: ENOSPC after {} flushed writes ({err}); qemu-img check: no corruption, {leaks} leaked clusters", flushed.len());
    std::fs::remove_file(&fill).unwrap();
    continue_after_freeing(&path, &mut flushed, 40 * MIB, &ctx);
}

#[test]
fn allocating_writes_until_full_tmpfs() {
    for filler_kib in [0, 1000, 2052, 3004] {
        writes_until_full(Fs::Tmpfs, 65536, 16, 40 * KIB as usize, filler_kib);
    }
}

#[test]
fn allocating_writes_until_full_ext4() {
    for filler_kib in [0, 1504] {
        writes_until_full(Fs::Ext4, 65536, 16, 40 * KIB as usize, filler_kib);
    }
}

/// 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB of file and one
/// refcount-table cluster 2 MiB, so the disk fills up while refcount blocks and the refcount
/// table are being allocated and grown.
#[test]
fn allocating_writes_until_full_small_clusters() {
    for filler_kib in [0, 7, 100, 1111, 2047, 3001] {
        writes_until_full(Fs::Tmpfs, 512, 64, 3000, filler_kib);
    }
    writes_until_full(Fs::Ext4, 512, 64, 3000, 999);
}

/// Writes that allocate new L2 tables, then the disk fills up, then the flush has to write the
/// tables and refcount blocks (into holes of the file): the flush fails with NoSpace and nothing on
/// disk names a table that did not reach it.
#[test]
fn flush_on_a_full_disk() {
    let mut failures = 0;
    for fs in [Fs::Tmpfs, Fs::Ext4] {
        // (cluster size, refcount bits, virtual size, where the unflushed writes go, their stride)
        for (cluster, rb, size, base, stride) in [
            (65536u32, 16u32, 64 << 30, 8 << 30, 512 * MIB),
            (512, 64, 1 << 30, 512 * MIB, 64 * 512),
        ] {
            let Some(m) = Mount::new(fs, 8) else { return };
            let path = m.path("t.qcow2");
            let ctx = format!("flush on a full {fs:?}, cluster {cluster}");
            create(&path, size, cluster, rb);
            let img = Image::open(&path, &OpenOptions::new()).unwrap();
            let mut flushed = vec![];
            for i in 0..8u64 {
                let c = (i * 3 * MIB + 512, 100 + i, 4096);
                img.write_at(&chunk(c.1, c.2), c.0).unwrap();
                flushed.push(c);
            }
            img.flush().unwrap();
            // New L2 tables far apart (each write needs one), not flushed.
            let mut unflushed = vec![];
            let mut hit = None;
            for i in 0..30u64 {
                let c = (base + i * stride, 200 + i, 4096);
                match img.write_at(&chunk(c.1, c.2), c.0) {
                    Ok(()) => unflushed.push(c),
                    Err(e) => {
                        hit = Some(e);
                        break;
                    }
                }
            }
            let fill = m.path("filler");
            let got = fill_up(&fill);
            eprintln!(
                "{ctx}: {} unflushed writes, filler {got} bytes, {} free",
                unflushed.len(),
                m.free()
            );
            let res = match hit {
                Some(e) => Err(e),
                None => img.flush(),
            };
            match res {
                Err(err) => {
                    assert_nospace(&err, &path, &ctx);
                    failures += 1;
                    // Flushing again must not claim success over a lost metadata write.
                    let again = img.flush();
                    assert!(
                        again.is_err(),
                        "{ctx}: a second flush succeeded after a failed one"
                    );
                }
                Ok(()) => {
                    // Every metadata write landed in blocks the file already had (with 512-byte
                    // clusters the tables share pages with data): then all of it is durable.
                    eprintln!("{ctx}: the flush needed no new blocks and succeeded");
                    flushed.append(&mut unflushed);
                }
            }
            let leaks = close_and_verify(img, &path, &flushed, &ctx);
            eprintln!("{ctx}: qemu-img check: no corruption, {leaks} leaked clusters");
            std::fs::remove_file(&fill).unwrap();
            continue_after_freeing(&path, &mut flushed, 40 * MIB, &ctx);
        }
    }
    assert!(failures >= 2, "no flush ran into the full disk");
}

/// Snapshot creation on a full disk fails with NoSpace and leaves the image and its snapshot
/// table consistent; after freeing space the snapshot is created and reads back.
#[test]
fn snapshot_on_a_full_disk() {
    for fs in [Fs::Tmpfs, Fs::Ext4] {
        let Some(m) = Mount::new(fs, 8) else { return };
        let path = m.path("t.qcow2");
        let ctx = format!("snapshot on a full {fs:?}");
        create(&path, 64 * MIB, 65536, 16);
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let mut flushed = vec![];
        for i in 0..16u64 {
            let c = (i * 2 * MIB + 4096, 300 + i, 100 * KIB as usize);
            img.write_at(&chunk(c.1, c.2), c.0).unwrap();
            flushed.push(c);
        }
        img.create_snapshot("before").unwrap();
        img.flush().unwrap();
        let fill = m.path("filler");
        fill_up(&fill);
        let err = img
            .create_snapshot("full")
            .expect_err("snapshot creation on a full disk succeeded");
        assert_nospace(&err, &path, &ctx);
        let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
        assert_eq!(
            names,
            vec!["before".to_string()],
            "{ctx}: snapshot list after the failure"
        );
        assert_chunks(&img, &flushed, &ctx);
        let leaks = close_and_verify(img, &path, &flushed, &ctx);
        let l = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]).ok();
        assert!(
            l.stdout.contains("before") && !l.stdout.contains("full"),
            "{ctx}: qemu-img snapshot -l:\n{l}"
        );
        eprintln!("{ctx}: qemu-img check: no corruption, {leaks} leaked clusters");
        std::fs::remove_file(&fill).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        img.create_snapshot("after").unwrap();
        img.close().unwrap();
        continue_after_freeing(&path, &mut flushed, 40 * MIB, &ctx);
        let l = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]).ok();
        assert!(
            l.stdout.contains("after"),
            "{ctx}: qemu-img snapshot -l:\n{l}"
        );
    }
}

/// `check -r all` on a full disk, on an image whose repair has to allocate (a refcount-table
/// entry is gone, so the refcount structure is rebuilt): it fails with NoSpace or succeeds, and the
/// image is never left worse than before; once space is freed the repair completes.
#[test]
fn repair_on_a_full_disk() {
    for fs in [Fs::Tmpfs, Fs::Ext4] {
        let Some(m) = Mount::new(fs, 8) else { return };
        let path = m.path("t.qcow2");
        let ctx = format!("repair on a full {fs:?}");
        create(&path, 64 * MIB, 65536, 16);
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let mut flushed = vec![];
        for i in 0..16u64 {
            let c = (i * 2 * MIB + 4096, 500 + i, 100 * KIB as usize);
            img.write_at(&chunk(c.1, c.2), c.0).unwrap();
            flushed.push(c);
        }
        img.close().unwrap();
        // Remove the first refcount block from the refcount table.
        let rt = peek_be64(&path, hdr::REFCOUNT_TABLE_OFFSET);
        poke_be64(&path, rt, 0);
        let before = qemu_check(&path);
        assert!(before.corruptions > 0, "{ctx}: the damage did not show");
        let fill = m.path("filler");
        fill_up(&fill);
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        match img.check(Some(RepairMode::All)) {
            Ok(r) => eprintln!("{ctx}: repair succeeded on the full disk: {:?}", r.messages),
            Err(e) => assert_nospace(&e, &path, &ctx),
        }
        let _ = img.close();
        let after = qemu_check(&path);
        assert!(
            after.check_errors == 0 && after.corruptions <= before.corruptions,
            "{ctx}: the failed repair made things worse:\nbefore:\n{}\nafter:\n{}",
            before.text,
            after.text
        );
        eprintln!(
            "{ctx}: qemu-img check before: {} corruptions; after the repair on the full disk: {} corruptions, {} leaks",
            before.corruptions, after.corruptions, after.leaks
        );
        std::fs::remove_file(&fill).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        img.check(Some(RepairMode::All)).unwrap();
        assert_chunks(&img, &flushed, &ctx);
        img.close().unwrap();
        assert_qemu_clean(&path);
        continue_after_freeing(&path, &mut flushed, 40 * MIB, &ctx);
    }
}

/// The disk fills up just before a write that grows the refcount table (512-byte clusters, 64-bit
/// refcounts: the table outgrows a cluster every 2 MiB of file): the growth fails with NoSpace
/// before the header switches to the new table, and the image stays consistent.
#[test]
fn refcount_table_growth_on_a_full_disk() {
    for fs in [Fs::Tmpfs, Fs::Ext4] {
        let ctx = format!("refcount-table growth on a full {fs:?}");
        let write = |img: &Image, i: u64| img.write_at(&chunk(700 + i, 1536), i * 2048);
        let flushed_upto = |k: u64| -> Vec<(u64, u64, usize)> {
            (0..k / 8 * 8).map(|i| (i * 2048, 700 + i, 1536)).collect()
        };
        // A first run finds the write that grows the table.
        let growth = {
            let Some(m) = Mount::new(fs, 16) else { return };
            let path = m.path("t.qcow2");
            create(&path, 64 * MIB, 512, 64);
            let img = Image::open(&path, &OpenOptions::new()).unwrap();
            let first = peek_be64(&path, hdr::REFCOUNT_TABLE_OFFSET);
            let mut k = 0;
            loop {
                write(&img, k).unwrap();
                if k % 8 == 7 {
                    img.flush().unwrap();
                }
                if peek_be64(&path, hdr::REFCOUNT_TABLE_OFFSET) != first {
                    break k;
                }
                k += 1;
                assert!(k < 4000, "{ctx}: the refcount table never grew");
            }
        };
        let Some(m) = Mount::new(fs, 8) else { return };
        let path = m.path("t.qcow2");
        create(&path, 64 * MIB, 512, 64);
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let table = peek_be64(&path, hdr::REFCOUNT_TABLE_OFFSET);
        for i in 0..growth {
            write(&img, i).unwrap();
            if i % 8 == 7 {
                img.flush().unwrap();
            }
        }
        img.flush().unwrap();
        let fill = m.path("filler");
        fill_up(&fill);
        let err =
            write(&img, growth).expect_err("the write that grows the refcount table succeeded");
        assert_nospace(&err, &path, &ctx);
        eprintln!("{ctx}: write {growth} failed: {err}");
        assert_eq!(
            peek_be64(&path, hdr::REFCOUNT_TABLE_OFFSET),
            table,
            "{ctx}: the header switched to a table that could not be written"
        );
        let mut flushed = flushed_upto(growth);
        assert_chunks(&img, &flushed, &ctx);
        let leaks = close_and_verify(img, &path, &flushed, &ctx);
        eprintln!("{ctx}: qemu-img check: no corruption, {leaks} leaked clusters");
        std::fs::remove_file(&fill).unwrap();
        continue_after_freeing(&path, &mut flushed, 40 * MIB, &ctx);
    }
}
