//! Crash plans: which pending operations of an epoch a crash state keeps, whole or torn.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;

use qcow2rs::storage::{CrashLog, Op, Persist};

/// SplitMix64: deterministic, seeded.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x2545_f491_4f6c_dd1d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// Where a plan comes from (for the failure report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Subset,
    Prefix,
    SingleDrop,
    Torn,
    Random,
    Fault,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub persist: Vec<Persist>,
    pub origin: Origin,
}

/// The pending operations of one epoch, with what plan generation needs to know about them.
pub struct Epoch<'a> {
    pub cl: &'a CrashLog,
    pub k: usize,
    /// The pending log entries, in log order: this epoch's and every earlier doubtful one.
    pub pending: Vec<usize>,
    /// Sectors of each pending op (0 for set_len).
    pub sectors: Vec<usize>,
    /// Crash images are `base` with log entries `from..` replayed ([`CrashLog::replay`]).
    pub from: usize,
    pub base: Vec<u8>,
    /// Every entry the replay may apply: the bytes outside their ranges are `base`'s.
    touched: Vec<usize>,
}

/// A torn version of an op of `n` sectors: a random prefix (half the time) or random subset,
/// never all or none.
fn torn_mask(rng: &mut Rng, n: usize) -> Vec<bool> {
    debug_assert!(n >= 2);
    loop {
        let m: Vec<bool> = if rng.chance(50) {
            let cut = 1 + rng.below(n as u64 - 1) as usize;
            (0..n).map(|i| i < cut).collect()
        } else {
            (0..n).map(|_| rng.chance(50)).collect()
        };
        let kept = m.iter().filter(|&&b| b).count();
        if kept > 0 && kept < n {
            return m;
        }
    }
}

impl<'a> Epoch<'a> {
    pub fn new(cl: &'a CrashLog, k: usize) -> Epoch<'a> {
        let pending = cl.pending(k);
        let sectors = pending
            .iter()
            .map(|&i| match cl.entries()[i].op {
                Op::SetLen { .. } => 0,
                _ => cl.entries()[i].sectors(),
            })
            .collect();
        let (from, base) = cl.replay_base(k);
        let touched = (from..cl.epoch_end(k))
            .filter(|&i| cl.entries()[i].op != Op::Flush)
            .collect();
        Epoch {
            cl,
            k,
            pending,
            sectors,
            from,
            base,
            touched,
        }
    }

    /// Log indices of the pending entries that are doubtful (failed, or covered by a failed
    /// flush).
    pub fn doubtful(&self) -> usize {
        self.pending
            .iter()
            .filter(|&&i| self.cl.doubtful(i))
            .count()
    }

    pub fn n(&self) -> usize {
        self.pending.len()
    }

    /// Ops that can be torn.
    pub fn multi_sector(&self) -> usize {
        self.sectors.iter().filter(|&&s| s >= 2).count()
    }

    fn keep_first(&self, i: usize) -> Vec<Persist> {
        (0..self.n())
            .map(|j| if j < i { Persist::Whole } else { Persist::Lost })
            .collect()
    }

    /// The deterministic plans: all subsets when there are at most `max_all` pending ops,
    /// otherwise all prefixes and all single drops; then, for every op that spans several
    /// sectors, the state with everything before it kept and it torn to its first half, and the
    /// state with everything else kept and it torn at random.
    pub fn deterministic(&self, max_all: usize, rng: &mut Rng) -> Vec<Plan> {
        let n = self.n();
        let mut out = Vec::new();
        if n <= max_all {
            for m in 0u64..(1u64 << n) {
                out.push(Plan {
                    persist: (0..n)
                        .map(|j| {
                            if m >> j & 1 == 1 {
                                Persist::Whole
                            } else {
                                Persist::Lost
                            }
                        })
                        .collect(),
                    origin: Origin::Subset,
                });
            }
        } else {
            for i in 0..=n {
                out.push(Plan {
                    persist: self.keep_first(i),
                    origin: Origin::Prefix,
                });
            }
            for i in 0..n {
                let mut p = vec![Persist::Whole; n];
                p[i] = Persist::Lost;
                out.push(Plan {
                    persist: p,
                    origin: Origin::SingleDrop,
                });
            }
        }
        for i in 0..n {
            let s = self.sectors[i];
            if s < 2 {
                continue;
            }
            let mut p = self.keep_first(i);
            p[i] = Persist::Sectors((0..s).map(|j| j < s / 2).collect());
            out.push(Plan {
                persist: p,
                origin: Origin::Torn,
            });
            let mut p = vec![Persist::Whole; n];
            p[i] = Persist::Sectors(torn_mask(rng, s));
            out.push(Plan {
                persist: p,
                origin: Origin::Torn,
            });
        }
        out
    }

    /// Two plans for a generated workload's epoch: everything kept, and one of nothing kept,
    /// the first half kept, or one op torn with everything else kept.
    pub fn light(&self, rng: &mut Rng) -> Vec<Plan> {
        let n = self.n();
        let mut out = vec![Plan {
            persist: vec![Persist::Whole; n],
            origin: Origin::Prefix,
        }];
        if n == 0 {
            return out;
        }
        let multi: Vec<usize> = (0..n).filter(|&j| self.sectors[j] >= 2).collect();
        match rng.below(3) {
            0 if !multi.is_empty() => {
                let j = multi[rng.below(multi.len() as u64) as usize];
                let mut p = vec![Persist::Whole; n];
                p[j] = Persist::Sectors(torn_mask(rng, self.sectors[j]));
                out.push(Plan {
                    persist: p,
                    origin: Origin::Torn,
                });
            }
            1 if n >= 2 => out.push(Plan {
                persist: self.keep_first(n / 2),
                origin: Origin::Prefix,
            }),
            _ => out.push(Plan {
                persist: vec![Persist::Lost; n],
                origin: Origin::Prefix,
            }),
        }
        out
    }

    /// A seeded random state: each op kept with a probability drawn per plan, kept multi-sector
    /// ops torn a quarter of the time. With `must_tear` (every whole-op subset is enumerated
    /// already), one multi-sector op is always torn.
    pub fn random(&self, rng: &mut Rng, must_tear: bool) -> Plan {
        let pk = [20, 50, 80, 95][rng.below(4) as usize];
        let mut persist: Vec<Persist> = (0..self.n())
            .map(|j| {
                if !rng.chance(pk) {
                    Persist::Lost
                } else if self.sectors[j] >= 2 && rng.chance(25) {
                    Persist::Sectors(torn_mask(rng, self.sectors[j]))
                } else {
                    Persist::Whole
                }
            })
            .collect();
        if must_tear && !persist.iter().any(|p| matches!(p, Persist::Sectors(_))) {
            let multi: Vec<usize> = (0..self.n()).filter(|&j| self.sectors[j] >= 2).collect();
            if !multi.is_empty() {
                let j = multi[rng.below(multi.len() as u64) as usize];
                persist[j] = Persist::Sectors(torn_mask(rng, self.sectors[j]));
            }
        }
        Plan {
            persist,
            origin: Origin::Random,
        }
    }

    /// Build the image of `plan`.
    pub fn build(&self, plan: &Plan) -> Vec<u8> {
        let mut img = self.base.clone();
        self.build_into(&mut img, plan);
        img
    }

    /// Apply `plan` to `scratch` (a copy of [`Epoch::base`]); returns the shortest length the
    /// image had on the way, for [`Epoch::restore`].
    pub fn build_into(&self, scratch: &mut Vec<u8>, plan: &Plan) -> usize {
        self.cl
            .replay(scratch, self.k, self.from, &self.pending, &plan.persist)
    }

    /// Undo [`Epoch::build_into`]: only the replayed entries' ranges and the length changed.
    pub fn restore(&self, scratch: &mut Vec<u8>, min_len: usize) {
        let base = &self.base;
        if min_len < base.len() {
            scratch.truncate(min_len);
            scratch.extend_from_slice(&base[min_len..]);
        } else {
            scratch.truncate(base.len());
        }
        for &idx in &self.touched {
            let (a, b) = self.cl.entries()[idx].sector_range();
            let a = (a as usize).min(base.len());
            let b = (b as usize).min(base.len());
            scratch[a..b].copy_from_slice(&base[a..b]);
        }
    }

    /// A fingerprint of the image `plan` builds: two plans with the same fingerprint build the
    /// same image (the bytes outside the replayed entries' ranges are the base image's).
    pub fn fingerprint(&self, img: &[u8], plan: &Plan) -> u64 {
        let mut h = DefaultHasher::new();
        h.write_u64(img.len() as u64);
        let mut j = 0;
        for &idx in &self.touched {
            let e = &self.cl.entries()[idx];
            while j < self.pending.len() && self.pending[j] < idx {
                j += 1;
            }
            match e.op {
                Op::SetLen { .. } => {
                    let lost = j < self.pending.len()
                        && self.pending[j] == idx
                        && matches!(plan.persist[j], Persist::Lost);
                    h.write_u8(lost as u8)
                }
                _ => {
                    let (a, b) = e.sector_range();
                    let a = (a as usize).min(img.len());
                    let b = (b as usize).min(img.len());
                    h.write(&img[a..b]);
                }
            }
        }
        h.finish()
    }

    /// "kept #3-#7, lost #8, torn #9{0-3}/8, ..." in log indices.
    pub fn describe(&self, plan: &Plan) -> String {
        fn key(p: &Persist) -> u8 {
            match p {
                Persist::Whole => 0,
                Persist::Lost => 1,
                Persist::Sectors(_) => 2,
            }
        }
        let mut parts: Vec<String> = Vec::new();
        let mut j = 0;
        let n = self.n();
        while j < n {
            let p = &plan.persist[j];
            if let Persist::Sectors(m) = p {
                parts.push(format!(
                    "torn #{}{{{}}}/{}",
                    self.pending[j],
                    ranges(m),
                    m.len()
                ));
                j += 1;
                continue;
            }
            let mut e = j;
            while e + 1 < n && key(&plan.persist[e + 1]) == key(p) {
                e += 1;
            }
            let what = if key(p) == 0 { "kept" } else { "lost" };
            if e == j {
                parts.push(format!("{what} #{}", self.pending[j]));
            } else {
                parts.push(format!(
                    "{what} #{}..=#{}",
                    self.pending[j], self.pending[e]
                ));
            }
            j = e + 1;
        }
        if parts.is_empty() {
            "nothing pending".into()
        } else {
            parts.join(", ")
        }
    }
}

/// "0-3,7" for the true entries of a mask.
fn ranges(m: &[bool]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < m.len() {
        if !m[i] {
            i += 1;
            continue;
        }
        let mut e = i;
        while e + 1 < m.len() && m[e + 1] {
            e += 1;
        }
        out.push(if e == i {
            format!("{i}")
        } else {
            format!("{i}-{e}")
        });
        i = e + 1;
    }
    out.join(",")
}

/// Feed one log entry (operation, bytes, outcome) to a hasher.
pub fn hash_entry(h: &mut impl Hasher, e: &qcow2rs::storage::LogEntry) {
    match &e.op {
        Op::Write { offset, data } => {
            h.write_u8(0);
            h.write_u64(*offset);
            h.write(data);
        }
        Op::SetLen { len } => {
            h.write_u8(1);
            h.write_u64(*len);
        }
        Op::Discard { offset, len } => {
            h.write_u8(2);
            h.write_u64(*offset);
            h.write_u64(*len);
        }
        Op::Flush => h.write_u8(3),
    }
    h.write_i32(e.error.unwrap_or(0));
}

/// A hash of a whole log (with its starting image).
pub fn log_identity(cl: &CrashLog) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(cl.base());
    for e in cl.entries() {
        hash_entry(&mut h, e);
    }
    h.finish()
}

/// Per epoch, a hash of what its crash states are made of: the starting image, the log up to the
/// epoch's end, and its pending set (epochs with equal hashes have the same crash states).
pub fn epoch_identities(cl: &CrashLog) -> Vec<u64> {
    let mut h = DefaultHasher::new();
    h.write(cl.base());
    let mut done = 0;
    (0..cl.epochs())
        .map(|k| {
            let end = cl.epoch_end(k);
            if end > done {
                for e in &cl.entries()[done..end] {
                    hash_entry(&mut h, e);
                }
                done = end;
            }
            let mut e = h.clone();
            for i in cl.pending(k) {
                e.write_usize(i);
            }
            e.finish()
        })
        .collect()
}
