//! Seeded random workloads: image options, and op lists that mix partial and multi-cluster
//! writes, zeroes, discards, compressed writes, flushes, resizes, clean and unclean reopens and
//! reads, with patterns that make the reuse of freed clusters likely. And concurrent ones: 2-4
//! threads on one image, each owning the guest clusters `c` with `c % T == thread`.

use std::time::Duration;

use qcow2rs::{
    CacheMode, CipherAlg, CipherMode, Compat, CompressionType, EncryptionOptions, IvGenAlg,
};

use super::guest::{mix, SEC};
use super::plans::Rng;
use super::workloads::{Spec, G, KIB, MIB};

fn pick<T: Copy>(r: &mut Rng, weighted: &[(u64, T)]) -> T {
    let total: u64 = weighted.iter().map(|w| w.0).sum();
    let mut x = r.below(total);
    for &(w, v) in weighted {
        if x < w {
            return v;
        }
        x -= w;
    }
    unreachable!()
}

fn cluster_size(r: &mut Rng) -> u64 {
    pick(
        r,
        &[
            (5, 512),
            (4, KIB),
            (3, 2 * KIB),
            (3, 4 * KIB),
            (2, 64 * KIB),
            (1, 2 * MIB),
        ],
    )
}

/// A sector-aligned range inside `[0, size)`: mostly inside one cluster, some whole clusters,
/// some spanning several.
fn range(r: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    let clusters = size.div_ceil(cs);
    let spc = cs / SEC;
    let (off, len) = match r.below(10) {
        0..=4 => {
            let c = r.below(clusters);
            let a = r.below(spc);
            let n = 1 + r.below((spc - a).min(16));
            (c * cs + a * SEC, n * SEC)
        }
        5..=7 => {
            let c = r.below(clusters);
            let n = 1 + r.below(if cs >= MIB { 1 } else { 4 });
            (c * cs, n * cs)
        }
        _ => {
            let start = r.below(size / SEC);
            let max = if cs >= MIB { 2 * spc } else { 6 * spc };
            (start * SEC, (1 + r.below(max)) * SEC)
        }
    };
    let off = off.min(size - SEC);
    (off, len.min(size - off))
}

/// The image options of a random workload.
fn options(r: &mut Rng, s: &mut Spec, cs: u64) {
    if r.chance(20) {
        s.create.compat = Compat::V2;
    } else {
        s.create.lazy_refcounts = r.chance(30);
        s.create.extended_l2 = cs >= 16 * KIB && r.chance(30);
        if r.chance(50) {
            s.create.refcount_bits = 1 << r.below(7);
        }
        if r.chance(30) {
            s.create.compression_type = CompressionType::Zstd;
        }
    }
    if r.chance(40) {
        s.open.l2_cache_size = Some(2 * cs);
        s.open.refcount_cache_size = Some(2 * cs);
    }
}

/// The password of encrypted generated workloads.
pub const PASSWORD: &str = "crash-sim-password";

/// One generated workload in five is encrypted: LUKS (aes-256-xts, or aes-128-cbc-essiv) or
/// legacy AES. Drawn from its own generator so that the rest of the workload does not change
/// with it. With encryption, every guest data cluster is written whole and encrypted (a
/// never-written cluster does not read as zeros once decrypted) and every L2 entry waits for
/// its data; torn writes must leave each 512-byte sector decrypting to its old or its new
/// plaintext.
fn encryption(seed: u64, i: usize, s: &mut Spec) {
    let mut r = Rng::new(mix(seed ^ 0xe4c_0de ^ (i as u64).wrapping_mul(0x2545_f491)));
    if !r.chance(20) {
        return;
    }
    let mut e = match r.below(3) {
        0 => EncryptionOptions::aes(PASSWORD),
        1 => EncryptionOptions::luks(PASSWORD),
        _ => {
            let mut e = EncryptionOptions::luks(PASSWORD);
            e.cipher_alg = CipherAlg::Aes128;
            e.cipher_mode = CipherMode::Cbc;
            e.ivgen_alg = IvGenAlg::Essiv;
            e
        }
    };
    e.iter_time_ms = 1;
    s.create.encryption = Some(e);
    s.open.password = Some(PASSWORD.into());
}

/// Random workload `i` of seed `seed`.
pub fn generate(seed: u64, i: usize) -> Spec {
    let mut r = Rng::new(mix(seed ^ (i as u64).wrapping_mul(0x9e37_79b9)));
    let cs = cluster_size(&mut r);
    let clusters = if cs >= MIB {
        3 + r.below(3)
    } else if cs >= 64 * KIB {
        64 + r.below(65)
    } else {
        64 + r.below(193)
    };
    let size = clusters * cs;
    let mut s = Spec::new(
        &format!("rnd-{seed:x}-{i}"),
        "seeded random workload",
        size,
        cs as u32,
    );
    s.random = true;
    s.keep_going = true;
    options(&mut r, &mut s, cs);
    encryption(seed, i, &mut s);
    if r.chance(25) {
        let data = (1 + r.below(size / SEC)) * SEC;
        s.backing_data = Some(data);
        if r.chance(30) {
            // A backing file larger than the image, with data past the image's end.
            let bsize = size + (1 + r.below(clusters)) * cs;
            s.backing_size = Some(bsize);
            s.backing_data = Some(bsize - r.below(cs / SEC) * SEC);
        }
    }
    if r.chance(20) {
        s.open.cache = CacheMode::Writethrough;
    }
    let mut cur = size;
    let n = 10 + r.below(51) as usize;
    let mut ops = Vec::new();
    // One workload in four takes internal snapshots: the disk size of each (applying one
    // resizes), and the ones not deleted.
    let snapshots = r.chance(25);
    let mut snap_sizes: Vec<u64> = Vec::new();
    let mut live: Vec<usize> = Vec::new();
    while ops.len() < n {
        if snapshots && r.chance(12) {
            match r.below(10) {
                0..=4 if snap_sizes.len() < 8 => {
                    ops.push(G::Snapshot(snap_sizes.len()));
                    live.push(snap_sizes.len());
                    snap_sizes.push(cur);
                }
                5..=7 if !live.is_empty() => {
                    let k = live[r.below(live.len() as u64) as usize];
                    ops.push(G::ApplySnapshot(k));
                    cur = snap_sizes[k];
                }
                _ if !live.is_empty() => {
                    let k = live.remove(r.below(live.len() as u64) as usize);
                    ops.push(G::DeleteSnapshot(k));
                }
                _ => {}
            }
            continue;
        }
        match r.below(100) {
            0..=34 => {
                let (o, l) = range(&mut r, cur, cs);
                ops.push(G::Write(o, l));
            }
            35..=41 => {
                let (o, l) = range(&mut r, cur, cs);
                ops.push(G::Zeroes(o, l));
            }
            42..=50 => {
                let (o, l) = range(&mut r, cur, cs);
                ops.push(G::Discard(o, l));
            }
            51..=57 => {
                let c = r.below(cur / cs);
                ops.push(G::Compressed(c * cs));
            }
            58..=71 => ops.push(G::Flush),
            72..=75 => {
                // Grow or shrink, in multiples of 512 (not always whole clusters).
                let max = size * 2;
                let new = (1 + r.below(max / SEC)) * SEC;
                let new = if r.chance(50) {
                    new.div_ceil(cs) * cs
                } else {
                    new
                };
                if new != cur && new >= cs {
                    ops.push(G::Resize(new));
                    cur = new;
                }
            }
            76..=78 => ops.push(G::Reopen),
            79..=81 => ops.push(G::Kill),
            82..=86 => {
                let (o, l) = range(&mut r, cur, cs);
                ops.push(G::Read(o, l));
            }
            87..=93 => {
                // Free, flush, allocate: new clusters then reuse the freed ones.
                let (o, l) = range(&mut r, cur, cs);
                ops.push(if r.chance(60) {
                    G::Discard(o, l)
                } else {
                    G::Zeroes(o, l)
                });
                ops.push(G::Flush);
                if r.chance(40) {
                    ops.push(if r.chance(50) { G::Reopen } else { G::Kill });
                }
                for _ in 0..1 + r.below(4) {
                    let (o, l) = range(&mut r, cur, cs);
                    ops.push(G::Write(o, l));
                }
            }
            _ => {
                // Compressed, read, discard, flush, more writes, compressed again.
                let c = r.below(cur / cs) * cs;
                ops.push(G::Compressed(c));
                ops.push(G::Read(c, cs));
                ops.push(G::Discard(c, cs));
                ops.push(G::Flush);
                for _ in 0..1 + r.below(3) {
                    let (o, l) = range(&mut r, cur, cs);
                    ops.push(G::Write(o, l));
                }
                let d = r.below(cur / cs) * cs;
                ops.push(G::Compressed(d));
                ops.push(G::Read(d, cs));
            }
        }
    }
    ops.push(G::Close);
    s.ops = ops;
    s.weight = 0;
    s.what = describe(&s);
    s
}

/// The options of a generated workload, for its failure reports.
fn describe(s: &Spec) -> String {
    let c = &s.create;
    let mut v = vec![
        format!("seeded random workload: cluster size {}", c.cluster_size),
        format!("{} MiB", c.size as f64 / MIB as f64),
        if c.compat == Compat::V2 { "v2" } else { "v3" }.to_string(),
        format!("refcount_bits {}", c.refcount_bits),
        format!("{:?}", c.compression_type),
        format!("cache {}", s.open.cache.as_str()),
    ];
    if c.lazy_refcounts {
        v.push("lazy refcounts".into());
    }
    if c.extended_l2 {
        v.push("extended L2".into());
    }
    if s.open.l2_cache_size.is_some() {
        v.push("2-cluster caches".into());
    }
    if s.ops.iter().any(|g| matches!(g, G::Snapshot(_))) {
        v.push("internal snapshots".into());
    }
    if let Some(d) = s.backing_data {
        v.push(format!(
            "backing file ({} bytes of data, size {})",
            d,
            s.backing_size.unwrap_or(c.size)
        ));
    }
    if s.threads() > 1 {
        v.push(format!("{} threads", s.threads()));
    }
    if let Some(e) = &c.encryption {
        v.push(match e.format {
            qcow2rs::EncryptionFormat::Aes => "legacy AES".to_string(),
            qcow2rs::EncryptionFormat::Luks => format!(
                "LUKS {}-{}-{}",
                e.cipher_alg.as_str(),
                e.cipher_mode.as_str(),
                e.ivgen_alg.as_str()
            ),
        });
    }
    v.join(", ")
}

/// Concurrent workload `i` of seed `seed`: `T` threads, thread `t` owns the guest clusters
/// `c % T == t` (so the threads share L2 tables and refcount blocks).
pub fn generate_concurrent(seed: u64, i: usize) -> Spec {
    let mut r = Rng::new(mix(seed ^ 0xc0cc ^ (i as u64).wrapping_mul(0x51_7cc1)));
    let cs = pick(&mut r, &[(3, 512), (2, 4 * KIB), (1, 64 * KIB)]);
    let threads = 2 + r.below(3) as usize;
    let clusters = 64 + r.below(129);
    let size = clusters * cs;
    let mut s = Spec::new(
        &format!("cnc-{seed:x}-{i}"),
        "seeded random concurrent workload",
        size,
        cs as u32,
    );
    s.random = true;
    if r.chance(25) {
        s.create.lazy_refcounts = true;
    }
    if r.chance(60) {
        s.open.l2_cache_size = Some(2 * cs);
        s.open.refcount_cache_size = Some(2 * cs);
    }
    if r.chance(30) {
        s.open.cache = CacheMode::Writethrough;
    }
    s.flush_delay = Some(Duration::from_millis(1 + r.below(3)));
    encryption(seed ^ 0xc0cc, i, &mut s);
    let per = 8 + r.below(13) as usize;
    let mut ops = Vec::new();
    let mut thread_of = Vec::new();
    let mut left = vec![per; threads];
    while left.iter().any(|&n| n > 0) {
        let t = r.below(threads as u64) as usize;
        if left[t] == 0 {
            continue;
        }
        left[t] -= 1;
        // A cluster this thread owns.
        let c = (r.below(clusters.div_ceil(threads as u64)) * threads as u64 + t as u64)
            .min(clusters - 1);
        let c = if c % threads as u64 == t as u64 {
            c
        } else {
            t as u64
        };
        let spc = cs / SEC;
        let g = match r.below(100) {
            0..=44 => {
                if r.chance(50) {
                    G::Write(c * cs, cs)
                } else {
                    let a = r.below(spc);
                    let n = 1 + r.below((spc - a).min(8));
                    G::Write(c * cs + a * SEC, n * SEC)
                }
            }
            45..=52 => {
                let a = r.below(spc);
                G::Zeroes(c * cs + a * SEC, (spc - a) * SEC)
            }
            53..=62 => G::Discard(c * cs, cs),
            63..=70 => G::Compressed(c * cs),
            71..=87 => G::Flush,
            _ => G::Read(c * cs, cs),
        };
        ops.push(g);
        thread_of.push(t);
    }
    s.ops = ops;
    s.thread_of = thread_of;
    s.weight = 0;
    s.what = describe(&s);
    s
}
