//! Workloads: what the guest does, and how a run on a [`RecordingStorage`] is recorded.

use std::path::Path;
use std::sync::Arc;

use qcow2rs::storage::{CrashLog, Fault, OpKind, RecordingStorage};
use qcow2rs::{CacheMode, Compat, CreateOptions, Image, MemStorage, OpenOptions, Preallocation};

use super::guest::{pattern, Guest, BACKING_OP_BASE, SEC};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// One guest operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum G {
    /// The start of the run: the image as created (and set up) is durable.
    Start,
    Write(u64, u64),
    Zeroes(u64, u64),
    Discard(u64, u64),
    /// `write_compressed` of one whole cluster at this offset.
    Compressed(u64),
    Flush,
    Resize(u64),
    Close,
    /// Close the image and open it again (a new session: allocation starts from scratch).
    Reopen,
    /// The image is dropped after an error (Drop flushes, errors are not seen).
    Drop,
}

impl std::fmt::Display for G {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            G::Start => write!(f, "start"),
            G::Write(o, l) => write!(f, "write {o:#x}+{l:#x}"),
            G::Zeroes(o, l) => write!(f, "write_zeroes {o:#x}+{l:#x}"),
            G::Discard(o, l) => write!(f, "discard {o:#x}+{l:#x}"),
            G::Compressed(o) => write!(f, "write_compressed {o:#x}"),
            G::Flush => write!(f, "flush"),
            G::Resize(s) => write!(f, "resize {s:#x}"),
            G::Close => write!(f, "close"),
            G::Reopen => write!(f, "close and reopen"),
            G::Drop => write!(f, "drop (after error)"),
        }
    }
}

/// Sanity check of a workload: (start image, end image) -> what is missing.
pub type ExpectFn = fn(&[u8], &[u8]) -> Result<(), String>;

/// A workload.
#[derive(Clone)]
pub struct Spec {
    pub name: &'static str,
    pub what: &'static str,
    pub create: CreateOptions,
    /// A qcow2 backing file of the same size, with data over its first `backing_data` bytes.
    pub backing_data: Option<u64>,
    pub open: OpenOptions,
    /// Run before recording (part of the durable starting image).
    pub setup: Vec<G>,
    /// The recorded operations.
    pub ops: Vec<G>,
    /// Share of the random crash states (0: deterministic and fault-run states only).
    pub weight: u64,
    /// Run `qemu-img check` on every state of this workload.
    pub qemu_all: bool,
    /// Sanity check that the workload did what it is meant to exercise: (start image, end image).
    pub expect: Option<ExpectFn>,
}

impl Spec {
    fn new(name: &'static str, what: &'static str, size: u64, cluster: u32) -> Spec {
        let mut create = CreateOptions::new(size);
        create.cluster_size = cluster;
        Spec {
            name,
            what,
            create,
            backing_data: None,
            open: OpenOptions::new(),
            setup: Vec::new(),
            ops: Vec::new(),
            weight: 10,
            qemu_all: false,
            expect: None,
        }
    }
    pub fn lazy(&self) -> bool {
        self.create.lazy_refcounts || self.open.lazy_refcounts == Some(true)
    }
    pub fn writethrough(&self) -> bool {
        self.open.cache.write_through()
    }
}

fn be32(b: &[u8], o: usize) -> u64 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as u64
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
/// (l1_size, l1_offset, reftable_offset, reftable_clusters, cluster_size)
pub fn header_facts(b: &[u8]) -> (u64, u64, u64, u64, u64) {
    (
        be32(b, 36),
        be64(b, 40),
        be64(b, 48),
        be32(b, 56),
        1 << be32(b, 20),
    )
}
fn table_nonzero(b: &[u8], off: u64, entries: u64) -> usize {
    (0..entries)
        .filter(|i| {
            let o = (off + i * 8) as usize;
            o + 8 <= b.len() && be64(b, o) & 0x00ff_ffff_ffff_fe00 != 0
        })
        .count()
}

/// Deterministic pseudo-random guest I/O.
fn random_ops(
    seed: u64,
    n: usize,
    size: u64,
    cluster: u64,
    max_len: u64,
    flush_every: u64,
) -> Vec<G> {
    let mut r = super::plans::Rng::new(seed);
    let mut ops = Vec::new();
    for i in 0..n {
        let sectors = size / SEC;
        let len_sec = 1 + r.below(max_len / SEC);
        let start = r.below(sectors - len_sec);
        let (off, len) = (start * SEC, len_sec * SEC);
        match r.below(10) {
            0 => ops.push(G::Zeroes(off, len)),
            1 => {
                let c = off / cluster * cluster;
                let n = 1 + r.below(3);
                ops.push(G::Discard(c, (n * cluster).min(size - c)));
            }
            _ => ops.push(G::Write(off, len)),
        }
        if r.below(flush_every) == 0 || i + 1 == n {
            ops.push(G::Flush);
        }
    }
    ops
}

/// Every workload.
pub fn all() -> Vec<Spec> {
    use G::*;
    let mut v = Vec::new();

    let mut s = Spec::new(
        "first_write",
        "first writes to unallocated clusters (64 KiB clusters)",
        4 * MIB,
        65536,
    );
    s.ops = vec![
        Write(0, 4 * KIB),
        Flush,
        Write(MIB, 64 * KIB),
        Write(3 * MIB + 512, 1024),
        Flush,
        Close,
    ];
    // Every state of this workload goes through qemu-img check: no random top-up states.
    s.qemu_all = true;
    s.weight = 0;
    v.push(s);

    let mut s = Spec::new(
        "overwrite",
        "in-place overwrites of allocated clusters, whole and partial",
        4 * MIB,
        65536,
    );
    s.setup = vec![Write(0, 256 * KIB), Write(2 * MIB, 64 * KIB)];
    s.ops = vec![
        Write(0, 64 * KIB),
        Write(68 * KIB, 8 * KIB),
        Flush,
        Write(128 * KIB, 512),
        Write(2 * MIB + 32 * KIB, 32 * KIB),
        Flush,
        Write(0, 128 * KIB),
        Write(200 * KIB, 512),
        Close,
    ];
    s.weight = 6;
    v.push(s);

    let mut s = Spec::new(
        "new_l2",
        "allocations needing new L2 tables (4 KiB clusters: one table per 2 MiB)",
        8 * MIB,
        4096,
    );
    s.ops = vec![
        Write(0, 4 * KIB),
        Flush,
        Write(2 * MIB, 8 * KIB),
        Write(4 * MIB + 4 * KIB, 4 * KIB),
        Flush,
        Write(6 * MIB, 4 * KIB),
        Write(3 * MIB, 4 * KIB),
        Flush,
        Write(6 * MIB + 12 * KIB, 8 * KIB),
        Close,
    ];
    s.expect = Some(|_, end| {
        let (l1n, l1o, ..) = header_facts(end);
        let n = table_nonzero(end, l1o, l1n);
        (n >= 4)
            .then_some(())
            .ok_or(format!("expected 4 L2 tables, found {n}"))
    });
    v.push(s);

    let mut s = Spec::new(
        "l1_growth",
        "resize past the L1 table's coverage, then write (512-byte clusters)",
        4 * MIB,
        512,
    );
    s.ops = vec![
        Write(0, KIB),
        Flush,
        Resize(12 * MIB),
        Write(10 * MIB, 2 * KIB),
        Write(5 * MIB, 512),
        Flush,
        Resize(16 * MIB),
        Write(15 * MIB + 512, KIB),
        Write(2 * MIB, 512),
        Close,
    ];
    s.expect = Some(|start, end| {
        let (a, ao, ..) = header_facts(start);
        let (b, bo, ..) = header_facts(end);
        (b > a && ao != bo).then_some(()).ok_or(format!(
            "L1 did not grow and move: {a}@{ao:#x} -> {b}@{bo:#x}"
        ))
    });
    s.weight = 8;
    v.push(s);

    let mut s = Spec::new(
        "refblock_growth",
        "new refcount blocks (512-byte clusters, 64-bit refcounts: one block per 64 clusters)",
        4 * MIB,
        512,
    );
    s.create.refcount_bits = 64;
    s.ops = vec![
        Write(0, 16 * KIB),
        Flush,
        Write(MIB, 24 * KIB),
        Flush,
        Write(2 * MIB, 40 * KIB),
        Write(3 * MIB, 512),
        Close,
    ];
    s.expect = Some(|start, end| {
        let (.., ro, rc, cs) = header_facts(start);
        let a = table_nonzero(start, ro, rc * cs / 8);
        let (.., ro, rc, cs) = header_facts(end);
        let b = table_nonzero(end, ro, rc * cs / 8);
        (b >= a + 2)
            .then_some(())
            .ok_or(format!("refcount blocks {a} -> {b}: expected growth"))
    });
    s.weight = 12;
    v.push(s);

    let mut s = Spec::new(
        "reftable_growth",
        "refcount table growth past one cluster (512-byte clusters, 64-bit refcounts: 2 MiB per table cluster)",
        4 * MIB,
        512,
    );
    s.create.refcount_bits = 64;
    s.setup = vec![Write(0, MIB)];
    s.ops = vec![
        Write(MIB, 256 * KIB),
        Flush,
        Write(MIB + 256 * KIB, 256 * KIB),
        Write(256 * KIB, KIB),
        Flush,
        Write(MIB + 512 * KIB, 512 * KIB),
        Flush,
        Write(3 * MIB, 16 * KIB),
        Close,
    ];
    s.expect = Some(|start, end| {
        let (.., ao, ac, _) = header_facts(start);
        let (.., bo, bc, _) = header_facts(end);
        (ao != bo && bc > ac).then_some(()).ok_or(format!(
            "refcount table did not grow and move: {ac}@{ao:#x} -> {bc}@{bo:#x}"
        ))
    });
    s.weight = 12;
    v.push(s);

    let mut s = Spec::new(
        "discard",
        "discards, reuse of freed clusters after a flush",
        4 * MIB,
        65536,
    );
    s.setup = vec![Write(0, 512 * KIB)];
    s.ops = vec![
        Discard(0, 128 * KIB),
        Flush,
        Discard(256 * KIB, 64 * KIB),
        Write(MIB, 128 * KIB),
        Flush,
        Write(2 * MIB, 64 * KIB),
        Discard(320 * KIB, 128 * KIB),
        Write(3 * MIB, 64 * KIB),
        Flush,
        Discard(MIB, 64 * KIB),
        Write(MIB + 64 * KIB, 4 * KIB),
        Close,
    ];
    s.weight = 8;
    v.push(s);

    let mut s = Spec::new(
        "reuse",
        "freed clusters handed out again in a new session (close, reopen), next to fresh frees (512-byte clusters)",
        4 * MIB,
        512,
    );
    // Every L2 table first, then the data: the data clusters are contiguous, and so is the hole
    // a discard leaves (the engine allocates in runs of 1024 clusters, and only a hole that big
    // is reused).
    s.setup = (0..128).map(|i| Write(i * 32 * KIB, 512)).collect();
    s.setup.push(Write(512 * KIB, 1536 * KIB));
    s.ops = vec![
        Discard(512 * KIB, MIB),
        Write(2 * MIB + 512 * KIB, 16 * KIB),
        Flush,
        Reopen,
        Write(2 * MIB + 640 * KIB, 48 * KIB),
        Discard(1536 * KIB, 256 * KIB),
        Write(3 * MIB + 256 * KIB, 16 * KIB),
        Flush,
        Reopen,
        Write(3 * MIB + 384 * KIB, 32 * KIB),
        Write(64 * KIB, 2 * KIB),
        Close,
    ];
    s.expect = Some(|start, end| {
        // Host clusters that held guest [512 KiB, 1.5 MiB) at the start hold other data at the end.
        let before = open_copy(start)?.map(512 * KIB, MIB).map_err(io_err)?;
        let freed: Vec<(u64, u64)> = before
            .iter()
            .filter_map(|m| m.offset.map(|o| (o, o + m.length)))
            .collect();
        let img = open_copy(end)?;
        let after = img.map(0, img.virtual_size()).map_err(io_err)?;
        after
            .iter()
            .filter_map(|m| m.offset.map(|o| (o, o + m.length)))
            .any(|(a, b)| freed.iter().any(|&(c, d)| a < d && c < b))
            .then_some(())
            .ok_or("no freed cluster was reused".to_string())
    });
    s.weight = 10;
    v.push(s);

    let mut s = Spec::new(
        "write_zeroes",
        "write-zeroes: zero clusters (v3), explicit zeros for partial clusters, writes into zeroed clusters",
        4 * MIB,
        65536,
    );
    s.setup = vec![Write(0, 256 * KIB)];
    s.ops = vec![
        Zeroes(0, 64 * KIB),
        Zeroes(64 * KIB + 512, 4 * KIB),
        Flush,
        Write(0, 4 * KIB),
        Zeroes(128 * KIB, 128 * KIB),
        Flush,
        Zeroes(MIB, 64 * KIB),
        Write(128 * KIB + 4 * KIB, 512),
        Zeroes(2 * MIB - 4 * KIB, 72 * KIB),
        Close,
    ];
    s.weight = 8;
    v.push(s);

    let mut s = Spec::new(
        "cow_backing",
        "copy-on-write over a qcow2 backing file: partial writes, zeroes and discards",
        4 * MIB,
        65536,
    );
    s.backing_data = Some(2 * MIB);
    s.ops = vec![
        Write(4 * KIB, 4 * KIB),
        Flush,
        Write(124 * KIB, 8 * KIB),
        Write(MIB, 64 * KIB),
        Flush,
        Zeroes(128 * KIB, 64 * KIB),
        Discard(192 * KIB, 64 * KIB),
        Write(256 * KIB + 512, 512),
        Flush,
        Write(3 * MIB, 4 * KIB),
        Write(4 * KIB, 512),
        Close,
    ];
    s.weight = 10;
    v.push(s);

    let mut s = Spec::new(
        "cow_backing_small_clusters",
        "copy-on-write over a backing file with 4 KiB clusters and a 2-entry L2 cache",
        4 * MIB,
        4096,
    );
    s.backing_data = Some(4 * MIB);
    s.open.l2_cache_size = Some(2 * 4096);
    s.open.refcount_cache_size = Some(2 * 4096);
    s.ops = random_ops(0xc0b, 24, 4 * MIB, 4096, 6 * KIB, 5);
    s.ops.push(Close);
    s.weight = 10;
    v.push(s);

    let mut s = Spec::new(
        "resize",
        "grow, write, shrink (freeing the tail, partial last cluster), grow again",
        4 * MIB,
        65536,
    );
    s.setup = vec![Write(0, 128 * KIB), Write(3 * MIB, 128 * KIB)];
    s.ops = vec![
        Resize(8 * MIB),
        Write(7 * MIB, 64 * KIB),
        Write(6 * MIB + 512, KIB),
        Flush,
        Resize(2 * MIB),
        Flush,
        Resize(6 * MIB),
        Write(5 * MIB, 4 * KIB),
        Flush,
        Resize(5 * MIB + 512),
        Resize(6 * MIB),
        Write(5 * MIB + 8 * KIB, 512),
        Close,
    ];
    s.weight = 8;
    v.push(s);

    let mut s = Spec::new(
        "partial_cluster",
        "sector-sized and unaligned-to-cluster writes: COW from zeros, spanning clusters, in place",
        4 * MIB,
        65536,
    );
    s.ops = vec![
        Write(512, 512),
        Write(64 * KIB - KIB, 2 * KIB),
        Flush,
        Write(3 * 512, 1536),
        Write(200 * KIB + 7 * 512, 4608),
        Flush,
        Write(300 * KIB, 512),
        Write(300 * KIB + 1024, 512),
        Write(300 * KIB + 512, 512),
        Write(64 * KIB + 512, 512),
        Close,
    ];
    s.weight = 6;
    v.push(s);

    let mut s = Spec::new(
        "compressed",
        "compressed clusters, then COW and full overwrites of them",
        4 * MIB,
        65536,
    );
    s.expect = Some(|_, end| {
        let img = open_copy(end)?;
        let map = img.map(0, img.virtual_size()).map_err(io_err)?;
        map.iter()
            .any(|m| m.compressed)
            .then_some(())
            .ok_or("no compressed cluster left at the end".to_string())
    });
    s.ops = vec![
        Compressed(0),
        Compressed(64 * KIB),
        Compressed(128 * KIB),
        Flush,
        Write(64 * KIB + 4 * KIB, 4 * KIB),
        Write(128 * KIB, 64 * KIB),
        Flush,
        Compressed(256 * KIB),
        Write(512, 512),
        Close,
    ];
    s.weight = 6;
    v.push(s);

    let mut s = Spec::new(
        "interleaved",
        "seeded random writes, zeroes and discards interleaved with flushes (4 KiB clusters)",
        8 * MIB,
        4096,
    );
    s.ops = random_ops(0x1e, 40, 8 * MIB, 4096, 12 * KIB, 5);
    s.ops.push(Close);
    s.weight = 14;
    v.push(s);

    let mut s = Spec::new(
        "small_cache",
        "cache evictions: 512-byte clusters, L2 and refcount caches of 2 entries, random writes",
        4 * MIB,
        512,
    );
    s.open.l2_cache_size = Some(2 * 512);
    s.open.refcount_cache_size = Some(2 * 512);
    s.ops = random_ops(0x5c, 30, 4 * MIB, 512, 2 * KIB, 6);
    s.ops.push(Close);
    s.weight = 14;
    v.push(s);

    let mut s = Spec::new(
        "lazy_refcounts",
        "lazy refcounts: dirty bit, refcounts rebuilt on the next read-write open",
        8 * MIB,
        4096,
    );
    s.create.lazy_refcounts = true;
    s.expect = Some(|_, end| {
        let info = open_copy(end)?.info().map_err(io_err)?;
        (info.lazy_refcounts && !info.dirty)
            .then_some(())
            .ok_or(format!(
                "expected lazy refcounts, clean after close: {info:?}"
            ))
    });
    s.ops = vec![
        Write(0, 4 * KIB),
        Flush,
        Write(64 * KIB, 64 * KIB),
        Write(MIB + 512, KIB),
        Flush,
        Discard(0, 4 * KIB),
        Write(3 * MIB, 4 * KIB),
        Flush,
        Write(5 * MIB, 8 * KIB),
        Zeroes(64 * KIB, 8 * KIB),
        Close,
    ];
    s.weight = 8;
    v.push(s);

    let mut s = Spec::new(
        "writethrough",
        "cache=writethrough: every acknowledged write is durable",
        8 * MIB,
        4096,
    );
    s.open.cache = CacheMode::Writethrough;
    s.setup = vec![Write(2 * MIB, 8 * KIB)];
    s.ops = vec![
        Write(0, 4 * KIB),
        Write(2 * MIB, 8 * KIB),
        Write(4 * KIB + 512, 512),
        Zeroes(0, 4 * KIB),
        Discard(2 * MIB, 4 * KIB),
        Write(6 * MIB, 4 * KIB),
        Write(6 * MIB + 4 * KIB, 12 * KIB),
        Close,
    ];
    s.weight = 6;
    v.push(s);

    let mut s = Spec::new(
        "extended_l2",
        "extended L2 entries: subcluster allocation, zeroing and discard (32 KiB clusters)",
        4 * MIB,
        32768,
    );
    s.create.extended_l2 = true;
    s.expect = Some(|_, end| {
        let info = open_copy(end)?.info().map_err(io_err)?;
        info.extended_l2
            .then_some(())
            .ok_or("expected extended L2 entries".to_string())
    });
    s.ops = vec![
        Write(0, KIB),
        Write(5 * KIB, 3 * KIB),
        Flush,
        Zeroes(8 * KIB, 4 * KIB),
        Write(96 * KIB, 32 * KIB),
        Discard(96 * KIB, 32 * KIB),
        Flush,
        Write(KIB, KIB),
        Write(MIB, 2 * KIB),
        Close,
    ];
    s.weight = 6;
    v.push(s);

    let mut s = Spec::new(
        "prealloc_metadata",
        "writes into preallocated zero clusters (preallocation=metadata)",
        4 * MIB,
        65536,
    );
    s.create.preallocation = Preallocation::Metadata;
    s.ops = vec![
        Write(0, 4 * KIB),
        Flush,
        Write(MIB, 64 * KIB),
        Zeroes(0, 64 * KIB),
        Write(2 * MIB + 512, 512),
        Flush,
        Discard(MIB, 64 * KIB),
        Close,
    ];
    s.weight = 5;
    v.push(s);

    let mut s = Spec::new(
        "v2",
        "a compat=0.10 image: no zero clusters",
        4 * MIB,
        65536,
    );
    s.create.compat = Compat::V2;
    s.setup = vec![Write(0, 128 * KIB)];
    s.ops = vec![
        Write(256 * KIB, 4 * KIB),
        Flush,
        Zeroes(0, 64 * KIB),
        Discard(64 * KIB, 64 * KIB),
        Write(MIB, 8 * KIB),
        Flush,
        Write(64 * KIB, 512),
        Close,
    ];
    s.weight = 5;
    v.push(s);

    v
}

/// A workload's starting point: the image after creation and setup, and the guest model of it.
pub struct Prepared {
    pub base: Vec<u8>,
    pub guest: Guest,
    /// Records of `Start` and the setup ops (all durable at epoch 0).
    pub recs: Vec<OpRec>,
    pub name: String,
}

/// One executed guest operation.
#[derive(Clone, Debug)]
pub struct OpRec {
    pub g: G,
    /// Storage log range of the operation.
    pub log_start: usize,
    pub log_end: usize,
    /// Successful flushes when it returned.
    pub flushes: usize,
    /// `None`: success.
    pub error: Option<String>,
    /// A successful sync point: everything acknowledged before is durable from epoch `flushes`.
    pub sync: bool,
}

/// A recorded run.
pub struct Run {
    pub cl: CrashLog,
    pub ops: Vec<OpRec>,
    pub guest: Guest,
    pub faults: Vec<Fault>,
    pub fired: u64,
    pub counts: [u64; 4],
}

impl Run {
    /// The last guest op whose sync point a crash in epoch `k` must honour.
    pub fn synced_op(&self, k: usize) -> usize {
        self.ops
            .iter()
            .rposition(|r| r.sync && r.error.is_none() && r.flushes <= k)
            .expect("Start is always synced")
    }
    /// Index of the first failed log entry, if any.
    pub fn first_failed_entry(&self) -> Option<usize> {
        self.cl.entries().iter().position(|e| e.failed())
    }
}

fn io_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Open a copy of image bytes read-only (without its backing file).
fn open_copy(bytes: &[u8]) -> Result<Image, String> {
    let opts = OpenOptions {
        open_backing: false,
        ..OpenOptions::read_only()
    };
    Image::open_storage(
        Arc::new(MemStorage::from_vec(bytes.to_vec())),
        "copy",
        &opts,
    )
    .map_err(io_err)
}

/// Create the image (and its backing file) and run the setup ops.
pub fn prepare(spec: &Spec, dir: &Path) -> Result<Prepared, String> {
    let size = spec.create.size;
    let cs = spec.create.cluster_size as u64;
    let mut create = spec.create.clone();
    let name = dir.join(format!("{}.qcow2", spec.name));
    let mut initial = Vec::new();
    if let Some(data_len) = spec.backing_data {
        let bpath = dir.join(format!("{}-backing.qcow2", spec.name));
        let mut bo = CreateOptions::new(size);
        bo.cluster_size = 65536;
        Image::create(&bpath, &bo).map_err(io_err)?;
        let b = Image::open(&bpath, &OpenOptions::new()).map_err(io_err)?;
        initial = vec![0u8; size as usize];
        for (i, chunk) in initial[..data_len as usize]
            .chunks_mut(SEC as usize)
            .enumerate()
        {
            pattern(BACKING_OP_BASE + i as u32, i as u64, false, chunk);
        }
        b.write_at(&initial[..data_len as usize], 0)
            .map_err(io_err)?;
        b.close().map_err(io_err)?;
        create.backing_file = Some(bpath.display().to_string());
        create.backing_format = Some("qcow2".into());
    }
    let mem = Arc::new(MemStorage::new());
    Image::create_on(mem.clone(), &name.display().to_string(), &create).map_err(io_err)?;
    let discard_shows_backing = spec.backing_data.is_some() && spec.create.compat == Compat::V2;
    let mut guest = Guest::new(size, cs, initial, discard_shows_backing);
    let mut recs = vec![OpRec {
        g: G::Start,
        log_start: 0,
        log_end: 0,
        flushes: 0,
        error: None,
        sync: true,
    }];
    if !spec.setup.is_empty() {
        let img = Image::open_storage(mem.clone(), &name.display().to_string(), &spec.open)
            .map_err(io_err)?;
        for g in &spec.setup {
            let i = recs.len();
            exec(&img, &mut guest, i, g).map_err(|e| format!("setup {g}: {e}"))?;
            recs.push(OpRec {
                g: g.clone(),
                log_start: 0,
                log_end: 0,
                flushes: 0,
                error: None,
                sync: true,
            });
        }
        img.close().map_err(io_err)?;
    }
    Ok(Prepared {
        base: mem.to_vec(),
        guest,
        recs,
        name: name.display().to_string(),
    })
}

/// Run one guest op on `img`, updating the model first.
fn exec(img: &Image, guest: &mut Guest, i: usize, g: &G) -> qcow2rs::Result<()> {
    match *g {
        G::Write(off, len) => {
            let buf = guest.write(i, off, len, false);
            img.write_at(&buf, off)
        }
        G::Compressed(off) => {
            let cs = img.cluster_size() as u64;
            let buf = guest.write(i, off, cs, true);
            img.write_compressed(off, &buf)
        }
        G::Zeroes(off, len) => {
            guest.zeroes(i, off, len);
            img.write_zeroes(off, len)
        }
        G::Discard(off, len) => {
            guest.discard(i, off, len);
            img.discard(off, len)
        }
        G::Flush => img.flush(),
        G::Resize(sz) => {
            guest.resize(i, sz);
            img.resize(sz)
        }
        G::Start | G::Close | G::Reopen | G::Drop => unreachable!(),
    }
}

/// Run the recorded part of a workload on a fresh [`RecordingStorage`], with `faults` injected.
/// Stops at the first error (then drops the image).
pub fn run(spec: &Spec, prep: &Prepared, faults: &[Fault]) -> Run {
    let rec = Arc::new(RecordingStorage::new(prep.base.clone()));
    for f in faults {
        rec.inject(*f);
    }
    let mut guest = prep.guest.clone();
    let mut ops = prep.recs.clone();
    let wt = spec.writethrough();
    let opened = Image::open_storage(rec.clone(), &prep.name, &spec.open);
    let mut img = match opened {
        Ok(img) => Some(img),
        Err(e) => {
            ops.push(OpRec {
                g: G::Start,
                log_start: 0,
                log_end: rec.log_len(),
                flushes: rec.epoch(),
                error: Some(format!("open: {e}")),
                sync: false,
            });
            None
        }
    };
    if img.is_some() {
        for g in &spec.ops {
            let i = ops.len();
            let log_start = rec.log_len();
            let r = match g {
                G::Close => img.take().unwrap().close(),
                G::Reopen => img.take().unwrap().close().and_then(|()| {
                    img = Some(Image::open_storage(rec.clone(), &prep.name, &spec.open)?);
                    Ok(())
                }),
                g => exec(img.as_ref().unwrap(), &mut guest, i, g),
            };
            let ok = r.is_ok();
            let sync = ok
                && match g {
                    G::Flush | G::Close | G::Reopen => true,
                    G::Write(..) | G::Zeroes(..) | G::Discard(..) | G::Compressed(..) => wt,
                    _ => false,
                };
            ops.push(OpRec {
                g: g.clone(),
                log_start,
                log_end: rec.log_len(),
                flushes: rec.epoch(),
                error: r.err().map(|e| e.to_string()),
                sync,
            });
            if !ok || img.is_none() {
                break;
            }
        }
    }
    if let Some(img) = img.take() {
        let log_start = rec.log_len();
        drop(img);
        ops.push(OpRec {
            g: G::Drop,
            log_start,
            log_end: rec.log_len(),
            flushes: rec.epoch(),
            error: None,
            sync: false,
        });
    }
    let counts = [
        rec.op_count(OpKind::Write),
        rec.op_count(OpKind::SetLen),
        rec.op_count(OpKind::Discard),
        rec.op_count(OpKind::Flush),
    ];
    Run {
        cl: rec.crash_log(),
        ops,
        guest,
        faults: faults.to_vec(),
        fired: rec.faults_fired(),
        counts,
    }
}
