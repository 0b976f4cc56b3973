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
    pub pending: Vec<usize>,
    /// Sectors of each pending op (0 for set_len).
    pub sectors: Vec<usize>,
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
        Epoch {
            cl,
            k,
            pending,
            sectors,
        }
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

    /// Build the image of `plan` on top of this epoch's durable image.
    pub fn build(&self, durable: &[u8], plan: &Plan) -> Vec<u8> {
        let mut img = durable.to_vec();
        for (j, &idx) in self.pending.iter().enumerate() {
            self.cl.apply(&mut img, idx, &plan.persist[j]);
        }
        img
    }

    /// Apply `plan` to `scratch` (a copy of the durable image); returns the shortest length the
    /// image had on the way, for [`Epoch::restore`].
    pub fn build_into(&self, scratch: &mut Vec<u8>, plan: &Plan) -> usize {
        let mut min_len = scratch.len();
        for (j, &idx) in self.pending.iter().enumerate() {
            self.cl.apply(scratch, idx, &plan.persist[j]);
            min_len = min_len.min(scratch.len());
        }
        min_len
    }

    /// Undo [`Epoch::build_into`]: only the pending ops' ranges and the length changed.
    pub fn restore(&self, scratch: &mut Vec<u8>, durable: &[u8], min_len: usize) {
        if min_len < durable.len() {
            scratch.truncate(min_len);
            scratch.extend_from_slice(&durable[min_len..]);
        } else {
            scratch.truncate(durable.len());
        }
        for &idx in &self.pending {
            let (a, b) = self.cl.entries()[idx].sector_range();
            let a = (a as usize).min(durable.len());
            let b = (b as usize).min(durable.len());
            scratch[a..b].copy_from_slice(&durable[a..b]);
        }
    }

    /// A fingerprint of the image `plan` builds: two plans with the same fingerprint build the
    /// same image (the bytes outside the pending ops' ranges are the durable image's).
    pub fn fingerprint(&self, img: &[u8], plan: &Plan) -> u64 {
        let mut h = DefaultHasher::new();
        h.write_u64(img.len() as u64);
        for (j, &idx) in self.pending.iter().enumerate() {
            let e = &self.cl.entries()[idx];
            match e.op {
                Op::SetLen { .. } => h.write_u8(matches!(plan.persist[j], Persist::Lost) as u8),
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
