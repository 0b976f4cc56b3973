//! The guest-side model: every version every guest sector ever held, and which guest operation
//! wrote it. Guest I/O is sector-aligned (512 bytes), as a virtual disk's is.
//!
//! Every sector a guest write carries is unique and self-describing: it starts with the tag
//! `QCRS`, the guest operation number and the guest sector number, so that a wrong sector found
//! after a crash can be named ("data op 7 wrote for sector 1234").

pub const SEC: u64 = 512;
static ZEROS: [u8; SEC as usize] = [0; SEC as usize];

/// Whether a sector is all zeros (a memcmp: fast even without optimisation).
pub fn is_zero(b: &[u8]) -> bool {
    b == &ZEROS[..b.len()]
}
const TAG: &[u8; 4] = b"QCRS";

/// What a sector holds in one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// What it held before the workload: the backing file's data, or zeros.
    Initial,
    /// Zeros (write-zeroes, discard, shrink).
    Zero,
    /// The backing file's bytes (zeros past its end), whatever the overlay's original size: a
    /// discard in a v2 image with a backing file exposes them, also in a grown range.
    Backing,
    /// Data written by a guest write: slot in the arena.
    Data(u32),
    /// What snapshot `k` (the `k`-th snapshot the workload created) holds at this sector: a
    /// version an applied snapshot brings back.
    Snap(u32),
}

/// What a snapshot holds: per sector, the versions it may hold (one, unless an op before it
/// failed), and the disk size it recorded.
#[derive(Debug, Clone)]
pub struct SnapContents {
    /// The guest op that created it.
    pub op: usize,
    pub size: u64,
    pub sectors: Vec<Vec<Content>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Version {
    /// Guest operation index.
    pub op: usize,
    pub content: Content,
}

/// A deterministic 64-bit mix (SplitMix64 finaliser).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The unique content guest operation `op` writes to guest sector `sector`. Compressible data
/// (for compressed writes) repeats one byte after the tag.
pub fn pattern(op: u32, sector: u64, compressible: bool, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SEC as usize);
    out[0..4].copy_from_slice(TAG);
    out[4..8].copy_from_slice(&op.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    if compressible {
        out[16..].fill((mix(op as u64 ^ sector) as u8) | 1);
    } else {
        let mut s = mix(((op as u64) << 40) ^ sector ^ 0x5eed);
        for chunk in out[16..].chunks_mut(8) {
            s = mix(s);
            chunk.copy_from_slice(&s.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Describe a sector's bytes for a failure message.
pub fn describe(b: &[u8], guest: &Guest, sector: u64) -> String {
    if is_zero(b) {
        return "zeros".into();
    }
    if (sector * SEC) < guest.initial.len() as u64 && b == guest.initial_sector(sector) {
        return "the backing file's data".into();
    }
    if &b[0..4] == TAG {
        let op = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let s = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let mut want = [0u8; SEC as usize];
        let plain = {
            pattern(op, s, false, &mut want);
            want == b
        };
        let comp = {
            pattern(op, s, true, &mut want);
            want == b
        };
        let intact = if plain || comp { "" } else { " (damaged)" };
        let who = if op >= BACKING_OP_BASE {
            format!("the backing file's data for guest sector {s}{intact}")
        } else if s == sector {
            format!("data of guest op {op} for this sector{intact}")
        } else {
            format!(
                "data of guest op {op} for guest sector {s} (offset {:#x}){intact}",
                s * SEC
            )
        };
        return who;
    }
    let n = b.iter().filter(|&&x| x != 0).count();
    format!(
        "garbage ({n} non-zero bytes, first 16: {:02x?})",
        &b[..16.min(b.len())]
    )
}

/// Operation numbers at and above this tag the backing file's data.
pub const BACKING_OP_BASE: u32 = 0x4000_0000;

/// Every version of every guest sector.
#[derive(Debug, Clone, Default)]
pub struct Guest {
    /// Initial guest bytes (the backing file's content); past its end the disk reads zeros.
    pub initial: Vec<u8>,
    /// 512-byte slots of written data.
    pub arena: Vec<u8>,
    /// Per sector, the versions after the initial one, in issue order.
    pub hist: Vec<Vec<Version>>,
    /// Virtual size after each resize: (op, size); the first entry is the initial size.
    pub sizes: Vec<(usize, u64)>,
    /// Whether a discard exposes the backing file (v2 image with a backing file).
    pub discard_shows_backing: bool,
    pub cluster: u64,
    /// The snapshots the workload created, in order (whether or not the creation succeeded).
    pub snaps: Vec<SnapContents>,
}

impl Guest {
    pub fn new(size: u64, cluster: u64, initial: Vec<u8>, discard_shows_backing: bool) -> Guest {
        Guest {
            initial,
            arena: Vec::new(),
            hist: vec![Vec::new(); (size / SEC) as usize],
            sizes: vec![(0, size)],
            discard_shows_backing,
            cluster,
            snaps: Vec::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.sizes.last().unwrap().1
    }

    /// Whether the initial content of sector `s` is the backing file's data (past the image's
    /// starting size the disk reads zeros, even over a larger backing file).
    fn backed(&self, s: u64) -> bool {
        let end = (self.initial.len() as u64).min(self.sizes[0].1);
        s * SEC < end
    }

    pub fn initial_sector(&self, s: u64) -> &[u8] {
        let a = (s * SEC) as usize;
        &self.initial[a..a + SEC as usize]
    }

    fn ensure(&mut self, sectors: u64) {
        if self.hist.len() < sectors as usize {
            self.hist.resize(sectors as usize, Vec::new());
        }
    }

    fn push(&mut self, sector: u64, op: usize, content: Content) {
        self.ensure(sector + 1);
        self.hist[sector as usize].push(Version { op, content });
    }

    /// A guest write by op `op`; returns the bytes to write.
    pub fn write(&mut self, op: usize, off: u64, len: u64, compressible: bool) -> Vec<u8> {
        assert!(off.is_multiple_of(SEC) && len.is_multiple_of(SEC) && len > 0);
        let mut buf = vec![0u8; len as usize];
        for (i, chunk) in buf.chunks_mut(SEC as usize).enumerate() {
            let s = off / SEC + i as u64;
            pattern(op as u32, s, compressible, chunk);
            let slot = (self.arena.len() / SEC as usize) as u32;
            self.arena.extend_from_slice(chunk);
            self.push(s, op, Content::Data(slot));
        }
        buf
    }

    pub fn zeroes(&mut self, op: usize, off: u64, len: u64) {
        assert!(off.is_multiple_of(SEC) && len.is_multiple_of(SEC));
        for s in off / SEC..(off + len) / SEC {
            self.push(s, op, Content::Zero);
        }
    }

    /// A discard: whole clusters inside the range (and the partial last cluster of the disk
    /// when the range reaches the end) read as zeros afterwards, or from the backing file in a
    /// v2 image with one.
    pub fn discard(&mut self, op: usize, off: u64, len: u64) {
        let cs = self.cluster;
        let size = self.size();
        let end = off + len;
        let first = off.div_ceil(cs);
        let last = if end >= size {
            size.div_ceil(cs)
        } else {
            end / cs
        };
        let c = if self.discard_shows_backing {
            Content::Backing
        } else {
            Content::Zero
        };
        for gc in first..last {
            let a = gc * cs;
            let b = ((gc + 1) * cs).min(size);
            for s in a / SEC..b / SEC {
                self.push(s, op, c);
            }
        }
    }

    /// A resize: the sectors a shrink cuts off, and the ones a growth adds, read as zeros
    /// afterwards (never the backing file's data past the old size).
    pub fn resize(&mut self, op: usize, new: u64) {
        let old = self.size();
        let (a, b) = if new < old { (new, old) } else { (old, new) };
        for s in a / SEC..b / SEC {
            self.push(s, op, Content::Zero);
        }
        self.ensure(new / SEC);
        self.sizes.push((op, new));
    }

    /// A resize by op `op` failed and the image reports `actual` as its size now: later ops see
    /// that size (the zeros the failed op pushed stay possible, never guaranteed).
    pub fn resize_failed(&mut self, op: usize, actual: u64) {
        if self.size() != actual {
            self.ensure(actual.div_ceil(SEC));
            self.sizes.push((op, actual));
        }
    }

    /// Snapshot creation by op `op` (`ok(o)`: op `o` succeeded): the snapshot holds what a
    /// read at that point may return. Returns its index.
    pub fn snapshot(&mut self, op: usize, ok: impl Fn(usize) -> bool) -> usize {
        let size = self.size();
        let sectors = (0..size / SEC)
            .map(|s| self.readable(s as usize, op, &ok))
            .collect();
        self.snaps.push(SnapContents { op, size, sectors });
        self.snaps.len() - 1
    }

    /// Applying snapshot `k` by op `op`: every sector takes the snapshot's version, and the
    /// disk its size.
    pub fn apply(&mut self, op: usize, k: usize) {
        let size = self.snaps[k].size;
        for s in 0..size / SEC {
            self.push(s, op, Content::Snap(k as u32));
        }
        // A shrink cuts the rest off: if the disk grows again it reads zeros there.
        let old = self.size();
        for s in size / SEC..old / SEC {
            self.push(s, op, Content::Zero);
        }
        self.ensure(size / SEC);
        self.sizes.push((op, size));
    }

    /// What a read of sector `s` by op `before` may return: the latest version written by an
    /// earlier successful op (`ok`), or any version an earlier failed op wrote after it.
    pub fn readable(&self, s: usize, before: usize, ok: impl Fn(usize) -> bool) -> Vec<Content> {
        let h = &self.hist[s];
        let g = h.iter().rposition(|v| v.op < before && ok(v.op));
        let mut out = vec![g.map_or(Content::Initial, |i| h[i].content)];
        out.extend(
            h[g.map_or(0, |i| i + 1)..]
                .iter()
                .filter(|v| v.op < before)
                .map(|v| v.content),
        );
        out
    }

    pub fn bytes_match(&self, s: u64, c: Content, b: &[u8]) -> bool {
        match c {
            Content::Zero => is_zero(b),
            Content::Backing => {
                if (s * SEC) < self.initial.len() as u64 {
                    b == self.initial_sector(s)
                } else {
                    is_zero(b)
                }
            }
            Content::Initial => {
                if self.backed(s) {
                    b == self.initial_sector(s)
                } else {
                    is_zero(b)
                }
            }
            Content::Data(i) => {
                let a = i as usize * SEC as usize;
                b == &self.arena[a..a + SEC as usize]
            }
            Content::Snap(k) => match self.snaps[k as usize].sectors.get(s as usize) {
                Some(cands) => cands.iter().any(|&c| self.bytes_match(s, c, b)),
                None => is_zero(b),
            },
        }
    }

    pub fn name(&self, c: Content, s: u64) -> String {
        match c {
            Content::Zero => "zeros".into(),
            Content::Backing => "the backing file's data (discarded)".into(),
            Content::Initial => {
                if self.backed(s) {
                    "initial (backing) data".into()
                } else {
                    "zeros (initial)".into()
                }
            }
            Content::Data(i) => {
                let a = i as usize * SEC as usize;
                let op = u32::from_le_bytes(self.arena[a + 4..a + 8].try_into().unwrap());
                format!("data of guest op {op}")
            }
            Content::Snap(k) => {
                let snap = &self.snaps[k as usize];
                let what: Vec<String> = snap
                    .sectors
                    .get(s as usize)
                    .map_or(vec!["zeros".into()], |c| {
                        c.iter().map(|&c| self.name(c, s)).collect()
                    });
                format!(
                    "snapshot {k} (made by guest op {}): {}",
                    snap.op,
                    what.join(" or ")
                )
            }
        }
    }
}

/// What a crash state must show: per sector, the allowed contents; the allowed virtual sizes.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Index into `items` where each sector's candidates start (`starts[s]..starts[s+1]`).
    pub starts: Vec<u32>,
    pub items: Vec<Content>,
    /// The first candidate of each sector is the guaranteed one (as of the last guest sync);
    /// the others are versions written after it.
    pub sizes: Vec<u64>,
    /// The guest op whose sync point is the last one the crash state must honour.
    pub synced_op: usize,
}

impl Expect {
    /// `guaranteed(op)`: whether op `op`'s versions must be on the disk (it succeeded and a sync
    /// point covers it); `maybe(op)`: whether a version written by `op` may be there. Per sector
    /// the guaranteed version is the latest one whose op is guaranteed (the initial content if
    /// none), and the candidates are it plus every later version that may appear. `synced_op`
    /// is only for messages.
    pub fn build(
        g: &Guest,
        synced_op: usize,
        guaranteed: impl Fn(usize) -> bool,
        maybe: impl Fn(usize) -> bool,
    ) -> Expect {
        let mut starts = Vec::with_capacity(g.hist.len() + 1);
        let mut items = Vec::with_capacity(g.hist.len());
        for h in &g.hist {
            let first = items.len();
            starts.push(first as u32);
            let gi = h.iter().rposition(|v| guaranteed(v.op));
            items.push(gi.map_or(Content::Initial, |i| h[i].content));
            for v in h[gi.map_or(0, |i| i + 1)..].iter().filter(|v| maybe(v.op)) {
                if !items[first..].contains(&v.content) {
                    items.push(v.content);
                }
            }
        }
        starts.push(items.len() as u32);
        let gi = g
            .sizes
            .iter()
            .rposition(|&(op, _)| op == 0 || guaranteed(op));
        let gi = gi.unwrap_or(0);
        let mut sizes = vec![g.sizes[gi].1];
        for &(op, sz) in &g.sizes[gi + 1..] {
            if maybe(op) && !sizes.contains(&sz) {
                sizes.push(sz);
            }
        }
        Expect {
            starts,
            items,
            sizes,
            synced_op,
        }
    }

    pub fn candidates(&self, s: usize) -> &[Content] {
        &self.items[self.starts[s] as usize..self.starts[s + 1] as usize]
    }
}
