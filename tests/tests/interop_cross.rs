//! qemu-io and qcow2rs taking turns on the same image.
//!
//! - We create and write, qemu-io writes on top (including compressed clusters), we read it all back
//!   and compare with qemu-img's own raw conversion, then we write again and qemu-img must find the
//!   image clean and identical to our reference. Several rounds.
//! - We write patterns, zeroes and discards at assorted offsets and lengths; qemu-io `read -P`
//!   verifies every range, and the gaps read as zeros.

use std::path::Path;

use qcow2rs::{Compat, CompressionType, CreateOptions, Image, OpenOptions};
use qcow2rs_tests::*;

fn opts(size: u64, cluster: u64) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster as u32;
    o
}

fn configs() -> Vec<(&'static str, CreateOptions)> {
    let mut v = Vec::new();
    v.push(("default 64k", opts(32 * MIB, 64 * KIB)));
    let mut o = opts(8 * MIB, 512);
    o.refcount_bits = 1;
    v.push(("512 B clusters, 1-bit refcounts", o));
    let mut o = opts(16 * MIB, 64 * KIB);
    o.extended_l2 = true;
    v.push(("extended L2, 64k", o));
    let mut o = opts(16 * MIB, 4 * KIB);
    o.compat = Compat::V2;
    v.push(("compat 0.10, 4k", o));
    let mut o = opts(32 * MIB, 2 * MIB);
    o.refcount_bits = 64;
    v.push(("2 MiB clusters, 64-bit refcounts", o));
    let mut o = opts(16 * MIB, 16 * KIB);
    o.lazy_refcounts = true;
    o.compression_type = CompressionType::Zstd;
    v.push(("lazy refcounts, zstd, 16k", o));
    v
}

fn open_rw(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new())
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
}

#[test]
fn qemu_io_and_qcow2rs_take_turns() {
    for (i, (name, o)) in configs().into_iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        let dir = tmpdir();
        let p = path_in(&dir, "turns.qcow2");
        let reference = path_in(&dir, "turns.raw");
        let size = o.size;
        let cs = o.cluster_size as u64;
        Image::create(&p, &o).unwrap_or_else(|e| panic!("{name}: create: {e}"));
        let mut rng = Rng::new(seed);
        // The top eighth of the disk is kept free for qemu-io's compressed writes.
        let low = size / 8 * 7;
        let wl = Workload {
            ops: 120,
            max_len: 256 * KIB,
            ..Workload::default()
        };
        // What the disk should read as.
        let mut data = vec![0u8; size as usize];
        for round in 0..3u64 {
            let ctx = format!("{name}, round {round}");
            // Our turn (in the first round, below the area kept for compressed writes).
            let span = if round == 0 { low } else { size };
            let mut m = Model::zeros(span, cs);
            m.data.copy_from_slice(&data[..span as usize]);
            let img = open_rw(&p);
            run_workload(&img, &mut m, &mut rng, &wl);
            img.close().unwrap();
            data[..span as usize].copy_from_slice(&m.data);
            std::fs::write(&reference, &data).unwrap();
            assert_qemu_clean(&p);
            assert_qemu_compare(&reference, &p);
            if round == 2 {
                assert_our_check_clean(&p);
                break;
            }

            // qemu-io's turn: compressed clusters in the free top area (first round), then a
            // random workload over the whole disk.
            let mut cmds = Vec::new();
            if round == 0 {
                let mut c = low.div_ceil(cs);
                while c < size / cs && cmds.len() < 16 {
                    cmds.push(format!(
                        "write -c -P {:#x} {} {cs}",
                        0x40 + cmds.len(),
                        c * cs
                    ));
                    c += 2;
                }
            }
            // (In the first round the random writes stay below the compressed clusters.)
            cmds.extend(qemu_io_workload(&mut rng, span, cs, 80, 256 * KIB));
            qemu_io(&p, "qcow2", &cmds);
            let want = qemu_read_all(&p, "qcow2");
            assert_same(
                &format!("{ctx}: our read after qemu-io's writes"),
                &our_read_all(&p, seed + round),
                &want,
            );
            let ours = assert_our_check_clean(&p);
            let q = assert_qemu_clean(&p);
            assert_eq!(
                (ours.allocated_clusters, ours.compressed_clusters),
                (q.allocated_clusters, q.compressed_clusters),
                "{ctx}: (allocated, compressed) clusters: ours vs qemu-img\n{}",
                q.json
            );
            if round == 0 {
                assert!(
                    q.compressed_clusters > 0,
                    "{ctx}: no compressed clusters\n{}",
                    q.text
                );
            }
            data = want;
        }
    }
}

/// Non-overlapping ranges, each with what it should read as at the end.
fn plan(rng: &mut Rng, size: u64, cs: u64, n: usize) -> Vec<(u64, u64, Kind)> {
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < n * 20 {
        tries += 1;
        let kind = match rng.below(10) {
            0..=5 => Kind::Pattern(rng.range(1, 255) as u8),
            6..=7 => Kind::Zeroes,
            _ => Kind::Discard,
        };
        let (off, len) = match kind {
            Kind::Discard => {
                let c = rng.below(size / cs);
                let k = rng.range(1, 3).min(size / cs - c);
                (c * cs, k * cs)
            }
            _ => pick_range(rng, size, cs, 192 * KIB),
        };
        if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
            continue;
        }
        taken.push((off, len));
        out.push((off, len, kind));
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Pattern(u8),
    Zeroes,
    Discard,
}

#[test]
fn qemu_io_verifies_our_patterns() {
    for (i, (name, o)) in configs().into_iter().enumerate() {
        let seed = 300 + i as u64;
        let dir = tmpdir();
        let p = path_in(&dir, "patterns.qcow2");
        let size = o.size;
        let cs = o.cluster_size as u64;
        Image::create(&p, &o).unwrap();
        let mut rng = Rng::new(seed);
        let ranges = plan(&mut rng, size, cs, 60);
        let img = open_rw(&p);
        // First pass: everything gets data (zero/discard ranges too, so zeroing has work to do);
        // some pattern ranges get a different pattern first and are overwritten.
        for &(off, len, kind) in &ranges {
            let first = match kind {
                Kind::Pattern(b) if rng.chance(50) => b,
                _ => 0xff,
            };
            img.write_at(&vec![first; len as usize], off).unwrap();
        }
        img.flush().unwrap();
        for &(off, len, kind) in &ranges {
            match kind {
                Kind::Pattern(b) => img.write_at(&vec![b; len as usize], off).unwrap(),
                Kind::Zeroes => img.write_zeroes(off, len).unwrap(),
                Kind::Discard => img.discard(off, len).unwrap(),
            }
        }
        img.close().unwrap();
        assert_qemu_clean(&p);

        let mut cmds = Vec::new();
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.0);
        let mut pos = 0;
        for &(off, len, kind) in &sorted {
            if pos < off {
                cmds.push(format!("read -P 0 {pos} {}", off - pos));
            }
            let b = match kind {
                Kind::Pattern(b) => b,
                _ => 0,
            };
            cmds.push(format!("read -P {b:#x} {off} {len}"));
            pos = off + len;
        }
        if pos < size {
            cmds.push(format!("read -P 0 {pos} {}", size - pos));
        }
        let r = qemu_io_raw(&p, "qcow2", &cmds);
        assert!(
            r.code == 0 && !r.all().contains("failed"),
            "{name}: qemu-io found a range that does not hold what we wrote\n{r}"
        );
        assert_eq!(
            r.stdout.matches("read ").count(),
            cmds.len(),
            "{name}: not every read ran\n{r}"
        );
    }
}
