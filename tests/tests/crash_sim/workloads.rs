//! Workloads: what the guest does, and how a run on a [`RecordingStorage`] is recorded.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qcow2rs::storage::{CrashLog, Fault, OpKind, RecordingStorage};
use qcow2rs::{
    CacheMode, Compat, CreateOptions, EncryptionOptions, Image, MemStorage, OpenOptions,
    Preallocation,
};

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
    /// An unclean reopen: the image is leaked (`std::mem::forget`, as if the process was
    /// killed: no close, a lazy-refcount dirty bit stays) and opened again on the same storage.
    Kill,
    /// Read and compare with the model (what the last successful write put there, or what a
    /// later failed one may have).
    Read(u64, u64),
    /// The image is dropped after an error (Drop flushes, errors are not seen).
    Drop,
    /// A flush on another thread, made slow (each fdatasync takes 100 ms); the inner ops run on
    /// this thread while it syncs, most of them inside its final fdatasync, which runs outside
    /// the image lock (the group-commit window). Only data ops inside.
    FlushDuring(Vec<G>),
    /// LUKS: add [`key_password`]`(slot)` in that key slot (durable when it returns).
    AddKey(usize),
    /// LUKS: erase that key slot (durable when it returns).
    RemoveKey(usize),
    /// Create the workload's `k`-th internal snapshot (named `s{k % 3}`: names repeat).
    /// Durable when it returns.
    Snapshot(usize),
    /// Apply the `k`-th snapshot (durable when it returns; the disk takes its size).
    ApplySnapshot(usize),
    /// Delete the `k`-th snapshot (durable when it returns).
    DeleteSnapshot(usize),
}

/// The snapshots a run created, by ordinal: what `create_snapshot` returned (`None` when it
/// failed). Each records its ordinal + 1 as its VM clock, so that a crash image's snapshots
/// can be told apart whatever IDs they were given.
pub type Snaps = Vec<Option<qcow2rs::SnapshotInfo>>;

/// The password of LUKS key slot `slot` in the key-slot workloads (slot 0: the one the image
/// is created and opened with).
pub fn key_password(slot: usize) -> String {
    if slot == 0 {
        super::random::PASSWORD.to_string()
    } else {
        format!("{}-{slot}", super::random::PASSWORD)
    }
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
            G::Kill => write!(f, "kill (leak the image) and reopen"),
            G::Read(o, l) => write!(f, "read {o:#x}+{l:#x}"),
            G::Drop => write!(f, "drop (after error)"),
            G::AddKey(s) => write!(f, "add a password in key slot {s}"),
            G::RemoveKey(s) => write!(f, "erase key slot {s}"),
            G::Snapshot(k) => write!(f, "create snapshot #{k} ('s{}')", k % 3),
            G::ApplySnapshot(k) => write!(f, "apply snapshot #{k}"),
            G::DeleteSnapshot(k) => write!(f, "delete snapshot #{k}"),
            G::FlushDuring(inner) => {
                write!(f, "flush on another thread, while it syncs:")?;
                for g in inner {
                    write!(f, " {g};")?;
                }
                Ok(())
            }
        }
    }
}

/// Sanity check of a workload: (start image, end image) -> what is missing.
pub type ExpectFn = fn(&[u8], &[u8]) -> Result<(), String>;

/// A workload.
#[derive(Clone)]
pub struct Spec {
    pub name: String,
    pub what: String,
    pub create: CreateOptions,
    /// A qcow2 backing file of the same size (or `backing_size`), with data over its first
    /// `backing_data` bytes.
    pub backing_data: Option<u64>,
    pub backing_size: Option<u64>,
    /// Fault runs go on after a failed operation (until a failed flush meets a reopen or close:
    /// the run ends there). Otherwise they stop at the first error.
    pub keep_going: bool,
    /// A generated workload: few deterministic plans per epoch, a few sampled fault runs.
    pub random: bool,
    /// Concurrent workload: the thread each op runs on (empty: one thread, in order).
    pub thread_of: Vec<usize>,
    /// Flush delay of the recording storage (concurrent workloads).
    pub flush_delay: Option<Duration>,
    /// Sleep in the unlocked window of every allocating write (concurrent workloads: the
    /// other threads' writes to the same clusters then land inside it every run).
    pub window_delay: Option<Duration>,
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
    /// The options a crash image is opened with: read-write defaults, with the workload's
    /// password when it is encrypted.
    pub fn reopen(&self) -> OpenOptions {
        OpenOptions {
            password: self.open.password.clone(),
            ..OpenOptions::new()
        }
    }
    pub fn new(name: &str, what: &str, size: u64, cluster: u32) -> Spec {
        let mut create = CreateOptions::new(size);
        create.cluster_size = cluster;
        Spec {
            name: name.to_string(),
            what: what.to_string(),
            create,
            backing_data: None,
            backing_size: None,
            keep_going: false,
            random: false,
            thread_of: Vec::new(),
            flush_delay: None,
            window_delay: None,
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
    pub fn threads(&self) -> usize {
        self.thread_of.iter().max().map_or(1, |&t| t + 1)
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

    let mut s = Spec::new(
        "dirty_bit",
        "lazy refcounts: clean close, reopen, allocation in an existing L2 table (needs the dirty bit again)",
        8 * MIB,
        4096,
    );
    s.create.lazy_refcounts = true;
    s.ops = vec![
        Write(0, 4 * KIB),
        Reopen,
        Write(8 * KIB, 4 * KIB),
        Flush,
        Write(16 * KIB, 8 * KIB),
        Flush,
        Kill,
        Write(32 * KIB, 4 * KIB),
        Flush,
        Close,
    ];
    s.weight = 4;
    v.push(s);

    // A new run of clusters reserved in the middle of writes into existing (linked) L2 tables,
    // with a 2-table L2 cache: evictions write tables naming clusters of the new run while its
    // refcounts and the file extension are still pending (for the "l2-refcount-dep" and, with
    // lazy refcounts, the "len-pending" mutants).
    for lazy in [false, true] {
        let mut s = Spec::new(
            if lazy {
                "run_turnover_lazy"
            } else {
                "run_turnover"
            },
            if lazy {
                "lazy refcounts: the allocation run turns over during writes into existing L2 tables (2-table caches, 512-byte clusters, 1-bit refcounts)"
            } else {
                "the allocation run turns over during writes into existing L2 tables (2-table caches, 512-byte clusters, 1-bit refcounts)"
            },
            MIB,
            512,
        );
        s.create.lazy_refcounts = lazy;
        // One refcount block covers the whole image (4096 clusters at 1 bit): the new run's
        // increases stay in the cache, so only the L2 -> refcount dependency orders them.
        s.create.refcount_bits = 1;
        s.open.l2_cache_size = Some(1024);
        s.open.refcount_cache_size = Some(1024);
        let tables = 18u64;
        let span = 32 * KIB;
        for k in 0..tables {
            s.ops.push(Write(k * span, 512));
        }
        s.ops.push(Flush);
        for k in 0..tables {
            s.ops.push(Write(k * span + 512, span - 512));
            if k % 3 == 2 {
                s.ops.push(Flush);
            }
        }
        s.ops.push(Flush);
        s.ops.push(Close);
        s.weight = 4;
        v.push(s);
    }

    // The group-commit window, deterministically: a flush's final fdatasync runs outside the
    // lock while this thread adds entries to the L2 table the flush just linked and evicts it
    // (2-table cache) (for the "unlinked-flag" mutant).
    let mut s = Spec::new(
        "flush_window",
        "writes into a just-linked L2 table and evictions while a flush's final fdatasync runs outside the lock",
        8 * MIB,
        4096,
    );
    s.open.l2_cache_size = Some(2 * 4096);
    s.ops = vec![
        Write(0, 4 * KIB),
        FlushDuring(vec![
            Compressed(4 * KIB),
            Write(8 * KIB, 4 * KIB),
            Write(2 * MIB, 4 * KIB),
            Write(4 * MIB, 4 * KIB),
            Write(6 * MIB, 4 * KIB),
        ]),
        Write(12 * KIB, 4 * KIB),
        Flush,
        Close,
    ];
    s.weight = 2;
    v.push(s);

    let mut s = Spec::new(
        "resize_over_backing",
        "an overlay smaller than its backing file (data past the overlay's end) grown by resize",
        MIB,
        65536,
    );
    s.backing_data = Some(2 * MIB);
    s.backing_size = Some(2 * MIB);
    s.ops = vec![
        Write(4 * KIB, 4 * KIB),
        Flush,
        Resize(MIB + 64 * KIB),
        Flush,
        Resize(2 * MIB - 512),
        Write(MIB + 128 * KIB, 4 * KIB),
        Flush,
        Resize(2 * MIB),
        Close,
    ];
    s.weight = 4;
    v.push(s);

    let mut s = Spec::new(
        "failed_flush",
        "fault runs go on after a failed flush: later writes and flushes (the image must refuse them)",
        4 * MIB,
        4096,
    );
    s.keep_going = true;
    s.ops = vec![
        Write(0, 4 * KIB),
        Write(MIB, 8 * KIB),
        Flush,
        Write(4 * KIB, 4 * KIB),
        Write(2 * MIB, 4 * KIB),
        Flush,
        Write(8 * KIB, 4 * KIB),
        Write(MIB, 4 * KIB),
        Flush,
        Write(12 * KIB, 4 * KIB),
        Flush,
        Close,
    ];
    s.weight = 4;
    v.push(s);

    let mut s = Spec::new(
        "comp_reuse",
        "compressed clusters read, COW-ed, freed, their host clusters reused once the allocation run is used up, compressed again (1 KiB clusters)",
        4 * MIB,
        1024,
    );
    let mut ops = Vec::new();
    for c in 0..8 {
        ops.push(Compressed(c * KIB));
    }
    ops.push(Read(0, 8 * KIB));
    ops.push(Write(KIB + 512, 512));
    ops.push(Discard(0, 8 * KIB));
    ops.push(Flush);
    // 1024 new clusters: the run (1024 clusters) is used up, the next starts at the freed ones.
    ops.push(Write(64 * KIB, 512 * KIB));
    ops.push(Write(576 * KIB, 512 * KIB));
    for k in 0..8u64 {
        let c = 2 * MIB + k * 2 * KIB;
        ops.push(Write(1088 * KIB + k * 6 * KIB, 6 * KIB));
        ops.push(Compressed(c));
        ops.push(Read(c, KIB));
        ops.push(Compressed(c + KIB));
        ops.push(Write(c + KIB + 512, 512));
        ops.push(Read(c, 2 * KIB));
    }
    ops.push(Flush);
    ops.push(Read(0, 4 * MIB));
    ops.push(Close);
    s.ops = ops;
    s.weight = 6;
    v.push(s);

    let mut s = Spec::new(
        "comp_cache",
        "a compressed cluster partly read (and so cached decompressed), freed, and its host cluster reused at the same offset by new compressed data (1 KiB clusters)",
        4 * MIB,
        1024,
    );
    // 1013 clusters use up the allocation run that the first write started (and its L2
    // tables), so the next compressed cluster starts the next run, at the lowest free cluster:
    // the one freed by the discard (checked below).
    // The read takes half the cluster: only a partly read cluster is kept decompressed (a
    // whole one is decompressed straight into the caller's buffer).
    s.ops = vec![
        Compressed(0),
        Read(0, 512),
        Discard(0, KIB),
        Flush,
        Write(64 * KIB, 1013 * KIB),
        Compressed(3 * MIB),
        Read(3 * MIB, KIB),
        Flush,
        Read(0, 4 * MIB),
        Close,
    ];
    s.expect = Some(|_, end| {
        // Guest 3 MiB is compressed at the start of a host cluster below all the filled data.
        let (_, l1o, .., cs) = header_facts(end);
        let per = cs / 8;
        let c = 3 * MIB / cs;
        let l2 = be64(end, (l1o + c / per * 8) as usize) & 0x00ff_ffff_ffff_fe00;
        let e = be64(end, (l2 + c % per * 8) as usize);
        let bits = 62 - (cs.trailing_zeros() as u64 - 8);
        let at = e & ((1 << bits) - 1);
        let img = open_copy(end)?;
        let fill = img.map(64 * KIB, 1013 * KIB).map_err(io_err)?;
        let lowest = fill.iter().filter_map(|m| m.offset).min().unwrap_or(0);
        (e >> 62 & 1 == 1 && at.is_multiple_of(cs) && at < lowest)
            .then_some(())
            .ok_or(format!(
                "the compressed cluster is at {at:#x} (entry {e:#x}), the fill from {lowest:#x}: the freed cluster was not reused for it"
            ))
    });
    s.weight = 2;
    v.push(s);

    let mut s = Spec::new(
        "unlinked_flag",
        "concurrent writeback, 2-table L2 cache: allocations into a table created just before another thread's flush, while that flush syncs",
        512 * KIB,
        512,
    );
    s.open.l2_cache_size = Some(2 * 512);
    s.open.refcount_cache_size = Some(2 * 512);
    s.flush_delay = Some(std::time::Duration::from_millis(3));
    let mut ops = Vec::new();
    let mut thread_of = Vec::new();
    let table = |t: u64, c: u64| (t * 64 + c) * 512;
    for r in 0..7u64 {
        let (a, b) = (2 * r, 2 * r + 1);
        ops.push(Write(table(a, 0), 512));
        thread_of.push(0);
        ops.push(Flush);
        thread_of.push(0);
        for (t, c) in [(1, 1), (2, 2), (1, 4), (2, 5)] {
            ops.push(Write(table(a, c + 6 * (r % 3)), 512));
            thread_of.push(t);
            ops.push(Write(table(b, c), 512));
            thread_of.push(t);
        }
        ops.push(Flush);
        thread_of.push(1);
    }
    s.ops = ops;
    s.thread_of = thread_of;
    s.weight = 4;
    v.push(s);

    // Parallel allocating writers (datapath.rs, `write_allocating`: data written outside the
    // lock between reserving a cluster and linking it): three threads walk the same clusters
    // in step, each writing its own 1 KiB stripes of every 4 KiB cluster over a backing file
    // (so every write is a copy-on-write, and two threads often allocate the same guest
    // cluster at once: the later one must write into the first one's cluster), while a fourth
    // thread flushes with a slow fdatasync.
    let mut s = Spec::new(
        "par_writers",
        "concurrent writeback: three threads allocate the same clusters at once (own 1 KiB stripes of each, copy-on-write over a backing file), a fourth flushes",
        256 * KIB,
        4096,
    );
    s.backing_data = Some(256 * KIB);
    s.flush_delay = Some(std::time::Duration::from_millis(2));
    // Mutant par-stale-link needs two writers in the window for one cluster at once.
    s.window_delay = Some(std::time::Duration::from_micros(300));
    let mut ops = Vec::new();
    let mut thread_of = Vec::new();
    let stripe = KIB;
    for pass in 0..2u64 {
        for c in 0..24u64 {
            for t in 0..3u64 {
                let own: Vec<u64> = (4 * c..4 * c + 4).filter(|k| k % 3 == t).collect();
                let k = own[(pass as usize) % own.len()];
                let len = if (c + t + pass) % 3 == 0 { 512 } else { stripe };
                ops.push(Write(k * stripe, len));
                thread_of.push(t as usize);
                if c % 6 == 5 {
                    ops.push(Read(k * stripe, len));
                    thread_of.push(t as usize);
                }
            }
            if c % 3 == 1 {
                ops.push(Flush);
                thread_of.push(3);
            }
        }
    }
    s.ops = ops;
    s.thread_of = thread_of;
    s.weight = 4;
    v.push(s);

    // Encryption: the data path's extra rules (whole encrypted clusters, entries always after
    // the data) with partial writes into new clusters, copy-on-write from a backing file,
    // zero clusters and discards; torn writes must leave every sector decrypting to its old or
    // new plaintext.
    for (name, e) in [
        ("luks", EncryptionOptions::luks(super::random::PASSWORD)),
        (
            "legacy_aes",
            EncryptionOptions::aes(super::random::PASSWORD),
        ),
    ] {
        let mut s = Spec::new(
            &format!("encrypted_{name}"),
            "encrypted image: partial writes into new clusters, COW over a backing file, zeroes, discard, reuse",
            2 * MIB,
            4096,
        );
        let mut e = e;
        e.iter_time_ms = 1;
        s.create.encryption = Some(e);
        s.open.password = Some(super::random::PASSWORD.into());
        s.backing_data = Some(MIB);
        s.setup = vec![Write(0, 8 * KIB)];
        s.ops = vec![
            Write(512, 1024),
            Write(20 * KIB + 512, 512),
            Flush,
            Write(MIB + 1536, 3 * KIB),
            Write(512 * KIB + 512, 1024),
            Zeroes(64 * KIB, 8 * KIB),
            Flush,
            Discard(0, 16 * KIB),
            Flush,
            Write(1536 * KIB, 6 * KIB),
            Write(4 * KIB + 1536, 9216),
            Read(0, 64 * KIB),
            Reopen,
            Write(MIB - 512, 1024),
            Flush,
            Close,
        ];
        s.weight = 2;
        v.push(s);
    }

    // LUKS key slots: every crash state must have, as its active slots, one of the sets the
    // workload had (from the last completed change on), each opening with its own password:
    // a power cut never leaves no working password, or an active slot that opens nothing.
    // Slot 6's entry straddles the LUKS header's first sector boundary.
    let mut s = Spec::new(
        "key_slots",
        "LUKS key slots added and erased between data writes",
        MIB,
        65536,
    );
    let mut e = EncryptionOptions::luks(super::random::PASSWORD);
    e.iter_time_ms = 1;
    s.create.encryption = Some(e);
    s.open.password = Some(super::random::PASSWORD.into());
    s.ops = vec![
        Write(0, 64 * KIB),
        AddKey(1),
        Write(64 * KIB, 4 * KIB),
        AddKey(6),
        Flush,
        RemoveKey(1),
        AddKey(7),
        Write(128 * KIB, 8 * KIB),
        RemoveKey(6),
        AddKey(1),
        Close,
    ];
    s.weight = 1;
    v.push(s);

    snapshot_workloads(&mut v);
    v
}

/// Internal snapshots: creation over owned clusters and tables (COPIED cleared, refcounts
/// raised, the table switched), copy-on-write of shared clusters and L2 tables after it,
/// deletion (refcounts dropped, COPIED set again), applying (a new L1 switched with the size),
/// with small caches, lazy refcounts, encryption, a backing file and a v2 image.
fn snapshot_workloads(v: &mut Vec<Spec>) {
    use G::*;
    let basic = |s: &mut Spec| {
        s.setup = vec![Write(0, 256 * KIB), Write(2 * MIB, 64 * KIB)];
        s.ops = vec![
            Snapshot(0),
            Write(4 * KIB, 4 * KIB),
            Write(MIB, 64 * KIB),
            Flush,
            Snapshot(1),
            Discard(64 * KIB, 64 * KIB),
            Zeroes(128 * KIB, 64 * KIB),
            Write(2 * MIB + 512, 1024),
            DeleteSnapshot(0),
            Write(8 * KIB, 4 * KIB),
            Flush,
            ApplySnapshot(1),
            Write(192 * KIB, 8 * KIB),
            Snapshot(2),
            DeleteSnapshot(1),
            Write(0, 4 * KIB),
            Close,
        ];
    };
    let mut s = Spec::new(
        "snapshots",
        "snapshots: create, copy-on-write of shared clusters and tables, discard and zeroes of shared clusters, delete, apply",
        4 * MIB,
        65536,
    );
    basic(&mut s);
    s.qemu_all = true;
    s.weight = 4;
    v.push(s);

    let mut s = Spec::new(
        "snapshots_small_cache",
        "snapshots over many L2 tables with 2-entry caches (512-byte clusters, 4-bit refcounts): evictions inside the snapshot walks",
        MIB,
        512,
    );
    s.create.refcount_bits = 4;
    s.open.l2_cache_size = Some(2 * 512);
    s.open.refcount_cache_size = Some(2 * 512);
    s.setup = (0..12).map(|t| Write(t * 32 * KIB, 2 * KIB)).collect();
    s.ops = vec![
        Snapshot(0),
        Write(KIB, 512),
        Write(5 * 32 * KIB, KIB),
        Snapshot(1),
        Write(9 * 32 * KIB + 512, 512),
        Flush,
        DeleteSnapshot(0),
        Write(3 * 32 * KIB, 2 * KIB),
        ApplySnapshot(1),
        Write(11 * 32 * KIB, 512),
        DeleteSnapshot(1),
        Write(KIB, 512),
        Close,
    ];
    s.weight = 4;
    v.push(s);

    let mut s = Spec::new(
        "snapshots_lazy",
        "snapshots with lazy refcounts, an unclean reopen after them",
        4 * MIB,
        4096,
    );
    s.create.lazy_refcounts = true;
    basic(&mut s);
    s.ops.insert(9, Kill);
    s.weight = 3;
    v.push(s);

    let mut s = Spec::new(
        "snapshots_resize",
        "snapshots of several disk sizes: applying one resizes (grow and shrink in one header write)",
        2 * MIB,
        65536,
    );
    s.setup = vec![Write(0, 128 * KIB), Write(2 * MIB - 64 * KIB, 64 * KIB)];
    s.ops = vec![
        Snapshot(0),
        Resize(6 * MIB),
        Write(5 * MIB, 64 * KIB),
        Snapshot(1),
        Resize(MIB),
        Write(4 * KIB, 4 * KIB),
        ApplySnapshot(1),
        Write(5 * MIB + 4 * KIB, 4 * KIB),
        ApplySnapshot(0),
        Resize(3 * MIB),
        Write(2 * MIB + 512, 512),
        Close,
    ];
    s.weight = 3;
    v.push(s);

    let mut s = Spec::new(
        "snapshots_encrypted",
        "snapshots of a LUKS image over a backing file: shared clusters re-encrypted where they are copied",
        4 * MIB,
        4096,
    );
    let mut e = EncryptionOptions::luks(super::random::PASSWORD);
    e.iter_time_ms = 1;
    s.create.encryption = Some(e);
    s.open.password = Some(super::random::PASSWORD.into());
    s.backing_data = Some(MIB);
    basic(&mut s);
    s.setup = vec![Write(0, 64 * KIB), Write(MIB + 512 * KIB, 16 * KIB)];
    s.weight = 2;
    v.push(s);

    let mut s = Spec::new(
        "snapshots_v2_backing",
        "snapshots of a compat=0.10 image over a backing file (no zero clusters)",
        4 * MIB,
        65536,
    );
    s.create.compat = Compat::V2;
    s.backing_data = Some(2 * MIB);
    basic(&mut s);
    s.weight = 3;
    v.push(s);
}

/// A workload's starting point: the image after creation and setup, and the guest model of it.
pub struct Prepared {
    pub base: Vec<u8>,
    pub guest: Guest,
    /// Records of `Start` and the setup ops (all durable at epoch 0).
    pub recs: Vec<OpRec>,
    pub name: String,
    /// Snapshots created by the setup ops.
    pub snaps: Snaps,
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
    /// The thread that ran it (0 in sequential workloads).
    pub thread: usize,
    /// Global sequence numbers taken when the op began and when it completed.
    pub begin_seq: u64,
    pub done_seq: u64,
    /// Its session was killed (`G::Kill`) before a sync point of that session covered it: what
    /// it changed in memory only (cached metadata) died with the process, so it may be lost
    /// for good; later sessions' flushes do not cover it.
    pub lost: bool,
}

/// A recorded run.
pub struct Run {
    pub cl: CrashLog,
    /// Guest reads during the run that returned data the model does not allow.
    pub read_failures: Vec<String>,
    pub ops: Vec<OpRec>,
    pub guest: Guest,
    pub faults: Vec<Fault>,
    pub fired: u64,
    pub counts: [u64; 4],
    /// The snapshots the run created (setup ops included).
    pub snaps: Snaps,
}

impl Run {
    /// The last guest op whose sync point a crash in epoch `k` must honour (for messages).
    pub fn synced_op(&self, k: usize) -> usize {
        self.ops
            .iter()
            .rposition(|r| r.sync && r.error.is_none() && r.flushes <= k)
            .expect("Start is always synced")
    }
    /// Per op: whether its content is guaranteed in a crash state of epoch `k`. Op `o` is
    /// guaranteed when it succeeded and some successful sync op `F` (flush, close, reopen,
    /// writethrough write) with `F.begin_seq > o.done_seq` (it began after `o` completed), or
    /// `o` itself when it is a sync op, returned with its end epoch at most `k`.
    pub fn guaranteed(&self, k: usize) -> Vec<bool> {
        let eligible = |r: &OpRec| r.sync && r.error.is_none() && r.flushes <= k;
        let max_begin = self
            .ops
            .iter()
            .filter(|r| eligible(r))
            .map(|r| r.begin_seq)
            .max()
            .unwrap_or(0);
        self.ops
            .iter()
            .map(|r| r.error.is_none() && !r.lost && (eligible(r) || r.done_seq < max_begin))
            .collect()
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
        let bsize = spec.backing_size.unwrap_or(size);
        let mut bo = CreateOptions::new(bsize);
        bo.cluster_size = 65536;
        Image::create(&bpath, &bo).map_err(io_err)?;
        let b = Image::open(&bpath, &OpenOptions::new()).map_err(io_err)?;
        initial = vec![0u8; bsize as usize];
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
    let mut recs = vec![rec0(G::Start)];
    let mut snaps = Snaps::new();
    if !spec.setup.is_empty() {
        let img = Image::open_storage(mem.clone(), &name.display().to_string(), &spec.open)
            .map_err(io_err)?;
        for g in &spec.setup {
            let i = recs.len();
            let p = model(&mut guest, i, g, cs, &|_| true);
            exec(&img, &p, g, &mut snaps).map_err(|e| format!("setup {g}: {e}"))?;
            recs.push(rec0(g.clone()));
        }
        img.close().map_err(io_err)?;
    }
    Ok(Prepared {
        base: mem.to_vec(),
        guest,
        recs,
        name: name.display().to_string(),
        snaps,
    })
}

/// A durable record (Start and setup ops).
fn rec0(g: G) -> OpRec {
    OpRec {
        g,
        log_start: 0,
        log_end: 0,
        flushes: 0,
        error: None,
        sync: true,
        thread: 0,
        begin_seq: 0,
        done_seq: 0,
        lost: false,
    }
}

/// Update the model for guest op `i`; returns the bytes it writes (if any). `ok(o)`: an
/// earlier op `o` succeeded (what a snapshot holds depends on it).
fn model(guest: &mut Guest, i: usize, g: &G, cs: u64, ok: &dyn Fn(usize) -> bool) -> Vec<u8> {
    match *g {
        G::Snapshot(k) => {
            let made = guest.snapshot(i, ok);
            assert_eq!(made, k, "snapshot ordinals must count up from 0");
            Vec::new()
        }
        G::ApplySnapshot(k) => {
            guest.apply(i, k);
            Vec::new()
        }
        G::Write(off, len) => guest.write(i, off, len, false),
        G::Compressed(off) => guest.write(i, off, cs, true),
        G::Zeroes(off, len) => {
            guest.zeroes(i, off, len);
            Vec::new()
        }
        G::Discard(off, len) => {
            guest.discard(i, off, len);
            Vec::new()
        }
        G::Resize(sz) => {
            guest.resize(i, sz);
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// The snapshot of ordinal `k`, as the image knows it, or an error when its creation failed.
fn snap_ref(snaps: &Snaps, k: usize) -> qcow2rs::Result<qcow2rs::SnapshotRef> {
    match snaps.get(k) {
        Some(Some(info)) => Ok(qcow2rs::SnapshotRef::Id(info.id.clone())),
        _ => Err(qcow2rs::Error::InvalidArgument(format!(
            "snapshot #{k} was not created"
        ))),
    }
}

/// Run one guest op on `img` (the model was updated by [`model`], which gave `buf`).
fn exec(img: &Image, buf: &[u8], g: &G, snaps: &mut Snaps) -> qcow2rs::Result<()> {
    match *g {
        G::Snapshot(k) => {
            let mut o = qcow2rs::SnapshotOptions::new(format!("s{}", k % 3));
            o.vm_clock_nsec = k as u64 + 1;
            let r = img.create_snapshot_with(&o);
            snaps.resize(k + 1, None);
            snaps[k] = r.as_ref().ok().cloned();
            r.map(|_| ())
        }
        G::ApplySnapshot(k) => img.apply_snapshot(snap_ref(snaps, k)?).map(|_| ()),
        G::DeleteSnapshot(k) => img.delete_snapshot(snap_ref(snaps, k)?).map(|_| ()),
        G::Write(off, _) => img.write_at(buf, off),
        G::Compressed(off) => img.write_compressed(off, buf),
        G::Zeroes(off, len) => img.write_zeroes(off, len),
        G::Discard(off, len) => img.discard(off, len),
        G::Flush => img.flush(),
        G::Resize(sz) => img.resize(sz),
        G::AddKey(slot) => {
            let mut c = qcow2rs::KeySlotChange::add(key_password(slot));
            c.keyslot = Some(slot);
            c.iter_time_ms = Some(1);
            img.change_key_slots(&c).map(|_| ())
        }
        G::RemoveKey(slot) => img
            .change_key_slots(&qcow2rs::KeySlotChange::remove_slot(slot))
            .map(|_| ()),
        G::Start | G::Close | G::Reopen | G::Kill | G::Drop | G::Read(..) | G::FlushDuring(..) => {
            unreachable!()
        }
    }
}

/// Guest read of op `i`: compare with what the model allows (versions of ops before `i`;
/// `failed(op)`: that op returned an error).
fn check_read(
    img: &Image,
    guest: &Guest,
    i: usize,
    off: u64,
    len: u64,
    failed: &dyn Fn(usize) -> bool,
) -> qcow2rs::Result<Option<String>> {
    let mut buf = vec![0u8; len as usize];
    img.read_at(&mut buf, off)?;
    for (j, sec) in buf.chunks(SEC as usize).enumerate() {
        let s = off / SEC + j as u64;
        let ok = |op: usize| op < i && !failed(op);
        let allowed = guest.readable(s as usize, i, ok);
        if !allowed.iter().any(|&c| guest.bytes_match(s, c, sec)) {
            return Ok(Some(format!(
                "guest op {i} (read {off:#x}+{len:#x}): sector {s} holds {}; allowed: {}",
                super::guest::describe(sec, guest, s),
                allowed
                    .iter()
                    .map(|&c| guest.name(c, s))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
    }
    Ok(None)
}

/// Whether an operation failed after the last successful flush of `log`.
fn failed_since_last_flush(log: &[qcow2rs::storage::LogEntry]) -> bool {
    let start = log
        .iter()
        .rposition(|e| e.op == qcow2rs::storage::Op::Flush && !e.failed())
        .map_or(0, |i| i + 1);
    log[start..].iter().any(|e| e.failed())
}

/// Run the recorded part of a workload on a fresh [`RecordingStorage`], with `faults` injected.
/// Stops at the first error (then drops the image), unless the workload keeps going: then
/// only a failed flush followed by a close, reopen or kill ends it (the image refuses
/// everything after a failed flush until reopened, and a reopened image cannot know what the
/// failed flush lost).
pub fn run(spec: &Spec, prep: &Prepared, faults: &[Fault]) -> Run {
    if spec.threads() > 1 {
        return run_concurrent(spec, prep, faults);
    }
    let rec = Arc::new(RecordingStorage::new(prep.base.clone()));
    for f in faults {
        rec.inject(*f);
    }
    let cs = spec.create.cluster_size as u64;
    let mut guest = prep.guest.clone();
    let mut ops = prep.recs.clone();
    let mut snaps = prep.snaps.clone();
    let mut deleted: Vec<usize> = Vec::new();
    let mut read_failures = Vec::new();
    let mut leaked = false;
    let wt = spec.writethrough();
    let seq = AtomicU64::new(1);
    let opened = Image::open_storage(rec.clone(), &prep.name, &spec.open);
    let mut img = match opened {
        Ok(img) => Some(img),
        Err(e) => {
            ops.push(OpRec {
                error: Some(format!("open: {e}")),
                sync: false,
                log_end: rec.log_len(),
                flushes: rec.epoch(),
                ..rec0(G::Start)
            });
            None
        }
    };
    if img.is_some() {
        for g in &spec.ops {
            let failed_flush = rec
                .log()
                .iter()
                .any(|e| e.failed() && e.op == qcow2rs::storage::Op::Flush);
            if failed_flush && matches!(g, G::Close | G::Reopen | G::Kill) {
                break;
            }
            // A failed write may have reached the disk within its epoch, in the model, although
            // reads never saw it (in reality what reached the disk, reads would see). A killed
            // session reopened in that same epoch would read the file without it and act on
            // that: a combination that cannot happen, so the run ends there.
            if matches!(g, G::Kill) && failed_since_last_flush(&rec.log()) {
                break;
            }
            let i = ops.len();
            let log_start = rec.log_len();
            let begin_seq = seq.fetch_add(1, Ordering::SeqCst);
            let reopen = |img: &mut Option<Image>| -> qcow2rs::Result<()> {
                *img = Some(Image::open_storage(rec.clone(), &prep.name, &spec.open)?);
                Ok(())
            };
            let mut inner_recs: Vec<OpRec> = Vec::new();
            let r = match g {
                G::Close => img.take().unwrap().close(),
                G::Reopen => img.take().unwrap().close().and_then(|()| reopen(&mut img)),
                G::Kill => {
                    // Everything since the session's last sync point may be lost for good.
                    let last_sync = ops
                        .iter()
                        .rposition(|r: &OpRec| r.sync && r.error.is_none())
                        .unwrap_or(0);
                    for r in ops[last_sync + 1..].iter_mut() {
                        r.lost = true;
                    }
                    std::mem::forget(img.take().unwrap());
                    leaked = true;
                    reopen(&mut img)
                }
                G::FlushDuring(inner) => {
                    let image = img.as_ref().unwrap();
                    rec.set_flush_delay(Duration::from_millis(100));
                    let flushes = rec.op_count(OpKind::Flush);
                    let r = std::thread::scope(|sc| {
                        let flusher = sc.spawn(|| image.flush());
                        // Wait until the flusher is in its first fdatasync (it holds the image
                        // lock there), so that the ops below run after it, mostly inside its
                        // final fdatasync.
                        let t0 = std::time::Instant::now();
                        while rec.op_count(OpKind::Flush) == flushes
                            && t0.elapsed() < Duration::from_secs(5)
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        for g in inner {
                            let j = i + 1 + inner_recs.len();
                            let log_start = rec.log_len();
                            let begin_seq = seq.fetch_add(1, Ordering::SeqCst);
                            let buf = model(&mut guest, j, g, cs, &|_| true);
                            let r = exec(image, &buf, g, &mut Snaps::new());
                            let done_seq = seq.fetch_add(1, Ordering::SeqCst);
                            inner_recs.push(OpRec {
                                log_start,
                                log_end: rec.log_len(),
                                flushes: rec.epoch(),
                                error: r.err().map(|e| e.to_string()),
                                sync: false,
                                begin_seq,
                                done_seq,
                                ..rec0(g.clone())
                            });
                        }
                        flusher.join().expect("flusher thread")
                    });
                    rec.set_flush_delay(Duration::ZERO);
                    r
                }
                G::Read(off, len) => {
                    let failed = |op: usize| ops[op].error.is_some() || ops[op].lost;
                    match check_read(img.as_ref().unwrap(), &guest, i, *off, *len, &failed) {
                        Ok(Some(msg)) => {
                            read_failures.push(msg);
                            Ok(())
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                G::ApplySnapshot(k) | G::DeleteSnapshot(k)
                    if snaps.get(*k).is_none_or(|s| s.is_none()) || deleted.contains(k) =>
                {
                    // Its creation failed, or it was deleted: nothing to run (and nothing for
                    // the model), a failed op.
                    Err(qcow2rs::Error::InvalidArgument(format!(
                        "snapshot #{k} does not exist"
                    )))
                }
                g => {
                    let ok = |op: usize| ops[op].error.is_none() && !ops[op].lost;
                    let buf = model(&mut guest, i, g, cs, &ok);
                    let r = exec(img.as_ref().unwrap(), &buf, g, &mut snaps);
                    if let (G::DeleteSnapshot(k), Ok(())) = (g, &r) {
                        deleted.push(*k);
                    }
                    if let (G::Resize(_), Err(_)) = (g, &r) {
                        guest.resize_failed(i, img.as_ref().unwrap().virtual_size());
                    }
                    r
                }
            };
            let done_seq = seq.fetch_add(1, Ordering::SeqCst);
            let ok = r.is_ok();
            let sync = ok
                && match g {
                    G::Flush | G::Close | G::Reopen | G::FlushDuring(..) => true,
                    // Key-slot changes and snapshot operations are durable when they return.
                    G::AddKey(_) | G::RemoveKey(_) => true,
                    G::Snapshot(_) | G::ApplySnapshot(_) | G::DeleteSnapshot(_) => true,
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
                thread: 0,
                begin_seq,
                done_seq,
                lost: false,
            });
            // The ops that ran while the flush synced, numbered after it.
            ops.extend(inner_recs);
            if (!ok && !spec.keep_going) || img.is_none() {
                break;
            }
        }
    }
    if let Some(img) = img.take() {
        let log_start = rec.log_len();
        let begin_seq = seq.fetch_add(1, Ordering::SeqCst);
        drop(img);
        ops.push(OpRec {
            g: G::Drop,
            log_start,
            log_end: rec.log_len(),
            flushes: rec.epoch(),
            error: None,
            sync: false,
            thread: 0,
            begin_seq,
            done_seq: seq.fetch_add(1, Ordering::SeqCst),
            lost: false,
        });
    }
    finish(rec, ops, guest, faults, read_failures, leaked, snaps)
}

fn finish(
    rec: Arc<RecordingStorage>,
    ops: Vec<OpRec>,
    guest: Guest,
    faults: &[Fault],
    read_failures: Vec<String>,
    leaked: bool,
    snaps: Snaps,
) -> Run {
    let counts = [
        rec.op_count(OpKind::Write),
        rec.op_count(OpKind::SetLen),
        rec.op_count(OpKind::Discard),
        rec.op_count(OpKind::Flush),
    ];
    let run = Run {
        cl: rec.crash_log(),
        read_failures,
        ops,
        guest,
        faults: faults.to_vec(),
        fired: rec.faults_fired(),
        counts,
        snaps,
    };
    if leaked {
        // A leaked image keeps the storage alive: free its bytes.
        rec.release();
    }
    run
}

/// A concurrent workload: every op's data is computed through the model in op order first
/// (each thread owns its own guest clusters, so per-sector history order is the owning
/// thread's order); then the threads run their ops on one shared image, and each op records
/// the global sequence numbers when it began and completed. Not replayable bit for bit: the
/// run is recorded once and its crash states checked.
fn run_concurrent(spec: &Spec, prep: &Prepared, faults: &[Fault]) -> Run {
    let rec = Arc::new(RecordingStorage::new(prep.base.clone()));
    for f in faults {
        rec.inject(*f);
    }
    let cs = spec.create.cluster_size as u64;
    let mut guest = prep.guest.clone();
    let base = prep.recs.len();
    let bufs: Vec<Vec<u8>> = spec
        .ops
        .iter()
        .enumerate()
        .map(|(j, g)| model(&mut guest, base + j, g, cs, &|_| true))
        .collect();
    let wt = spec.writethrough();
    let mut ops = prep.recs.clone();
    let seq = AtomicU64::new(1);
    let img = match Image::open_storage(rec.clone(), &prep.name, &spec.open) {
        Ok(img) => img,
        Err(e) => {
            ops.push(OpRec {
                error: Some(format!("open: {e}")),
                sync: false,
                ..rec0(G::Start)
            });
            return finish(
                rec,
                ops,
                guest,
                faults,
                Vec::new(),
                false,
                prep.snaps.clone(),
            );
        }
    };
    if let Some(d) = spec.flush_delay {
        rec.set_flush_delay(d);
    }
    let slots: Vec<Mutex<Option<OpRec>>> = spec.ops.iter().map(|_| Mutex::new(None)).collect();
    let read_failures = Mutex::new(Vec::new());
    let errors: Vec<Mutex<bool>> = spec.ops.iter().map(|_| Mutex::new(false)).collect();
    std::thread::scope(|sc| {
        for t in 0..spec.threads() {
            let (img, guest, bufs, slots, seq, rec) = (&img, &guest, &bufs, &slots, &seq, &rec);
            let (read_failures, errors) = (&read_failures, &errors);
            sc.spawn(move || {
                if let Some(d) = spec.window_delay {
                    qcow2rs::testing::set_window_delay(d);
                }
                for (j, g) in spec.ops.iter().enumerate() {
                    if spec.thread_of[j] != t {
                        continue;
                    }
                    let i = base + j;
                    let log_start = rec.log_len();
                    let begin_seq = seq.fetch_add(1, Ordering::SeqCst);
                    let r = match g {
                        G::Read(off, len) => {
                            let failed =
                                |op: usize| op >= base && *errors[op - base].lock().unwrap();
                            match check_read(img, guest, i, *off, *len, &failed) {
                                Ok(Some(m)) => {
                                    read_failures.lock().unwrap().push(m);
                                    Ok(())
                                }
                                Ok(None) => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                        g => exec(img, &bufs[j], g, &mut Snaps::new()),
                    };
                    let done_seq = seq.fetch_add(1, Ordering::SeqCst);
                    *errors[j].lock().unwrap() = r.is_err();
                    let ok = r.is_ok();
                    let sync = ok
                        && match g {
                            G::Flush => true,
                            G::Write(..) | G::Zeroes(..) | G::Discard(..) | G::Compressed(..) => wt,
                            _ => false,
                        };
                    *slots[j].lock().unwrap() = Some(OpRec {
                        g: g.clone(),
                        log_start,
                        log_end: rec.log_len(),
                        flushes: rec.epoch(),
                        error: r.err().map(|e| e.to_string()),
                        sync,
                        thread: t,
                        begin_seq,
                        done_seq,
                        lost: false,
                    });
                }
            });
        }
    });
    ops.extend(slots.into_iter().map(|m| m.into_inner().unwrap().unwrap()));
    rec.set_flush_delay(Duration::ZERO);
    let log_start = rec.log_len();
    let begin_seq = seq.fetch_add(1, Ordering::SeqCst);
    let r = img.close();
    ops.push(OpRec {
        g: G::Close,
        log_start,
        log_end: rec.log_len(),
        flushes: rec.epoch(),
        sync: r.is_ok(),
        error: r.err().map(|e| e.to_string()),
        thread: 0,
        begin_seq,
        done_seq: seq.fetch_add(1, Ordering::SeqCst),
        lost: false,
    });
    finish(
        rec,
        ops,
        guest,
        faults,
        read_failures.into_inner().unwrap(),
        false,
        prep.snaps.clone(),
    )
}
