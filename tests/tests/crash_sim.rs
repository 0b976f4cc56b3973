//! The crash simulator (DESIGN.md, "Proving it: the crash simulator").
//!
//! Every workload runs on a [`RecordingStorage`] while a guest-side model records every version
//! every guest sector held and which guest op wrote it. Then, for every flush epoch, the images a
//! power cut could leave are built (the durable image plus subsets of the pending writes: all
//! subsets when there are at most 10, otherwise all prefixes, all single drops and seeded random
//! subsets; whole and torn at 512-byte sectors) and each is opened read-write from a copy and
//! checked:
//!
//! * (a) `check(None)` finds no corruption (leaks are allowed and counted);
//! * (b) every guaranteed guest write reads back; every other sector holds the guaranteed
//!   version or a later one that may have reached the disk, never anything else; the virtual
//!   size is one the guest set (see "The guarantee rule");
//! * (c) repairing (`RepairMode::Leaks` or `All`, alternately) leaves an image that checks clean;
//! * on a sample (every 20th state, `QCOW2RS_CRASH_QEMU_EVERY`; every deterministic state with
//!   `QCOW2RS_CRASH_QEMU_DET=1`; every state of `first_write`), the real `qemu-img check` exits 0
//!   or 3 on the crash image (for lazy refcounts: after our read-write open rebuilt the
//!   refcounts), and 0 after our repair.
//!
//! A sample of the states (every 10th dirty one, every 97th other one) is crashed again during its
//! own recovery: opened read-write on a `RecordingStorage` (a dirty lazy-refcount image rebuilds
//! its refcounts there), repaired with `check -r all` and closed; every crash state of that
//! recovery must open, check without corruption, repair clean and show exactly the guest data the
//! recovered image showed.
//!
//! # The crash model (core/src/storage/recording.rs)
//! * A flush is an interval: it is logged when it begins, and covers what was logged before it.
//!   Concurrent workloads make the recording storage sleep inside flush (`set_flush_delay`) so
//!   that other threads' writes race the "fdatasync": those are pending in the next epoch, and in
//!   the flush's own epoch too (an epoch ends where the flush ending it completed).
//! * A failed write, discard or set_len is pending in its own epoch (it may have reached the
//!   disk) and absent from later durable images (reads never saw it, so it is not in the page
//!   cache either). Doubtful entries: every one that was pending when a flush failed (Linux may
//!   drop the dirty pages of a failed writeback and report it once) is
//!   never part of a durable image and is pending (any subset, whole or torn) in its own and
//!   every later epoch, applied in log order among the durable operations (images are rebuilt
//!   from the first doubtful entry on: `CrashLog::replay_base` / `replay`).
//!
//! # The guarantee rule
//! Every op records a global sequence number when it begins and when it completes (one counter
//! for all threads), and the epoch when it returned. In a crash state of epoch `k`, op `o`'s
//! content is *guaranteed* when `o` succeeded and some successful sync op `F` (flush, close,
//! reopen, or a write in writethrough mode) that began after `o` completed
//! (`F.begin_seq > o.done_seq`), or `o` itself if it is a sync op, returned with an epoch `<= k`.
//! `o` *may* appear when its first log entry is before the end of epoch `k`. Per sector the
//! allowed contents are the latest guaranteed version (the initial one if none) and every later
//! version that may appear. A failed op is never guaranteed, and may appear in every later state.
//! Past the image's starting size the disk reads zeros even over a larger backing file, and a
//! resize makes the range it adds (or cuts off) read zeros. For sequential workloads this is the
//! old rule (everything up to the last completed sync point).
//!
//! # Workloads
//! * Fixed ones (`workloads::all`), each aimed at one mechanism; some are there for a mutant:
//!   `dirty_bit` (lazy refcounts, clean reopen, allocation in an existing L2 table),
//!   `resize_over_backing` (an overlay smaller than its backing file grown by resize),
//!   `failed_flush` (fault runs go on after a failed flush), `comp_reuse` (compressed clusters
//!   read, COW-ed, freed, reused once the allocation run is used up, compressed again; guest
//!   reads are checked during the run), `unlinked_flag` (concurrent, 2-table L2 cache, writes
//!   racing another thread's flush).
//! * Generated ones (`random.rs`), `QCOW2RS_CRASH_RANDOM=N` of them (default: states / 80)
//!   from `QCOW2RS_CRASH_SEED` (default 0x5eed0006, printed in the summary; named
//!   `rnd-<seed>-<i>`): random cluster size (512 B to 2 MiB, small ones more often), v2/v3,
//!   lazy refcounts, extended L2, refcount width, zlib/zstd, 2-cluster caches, a backing file
//!   (sometimes larger than the image), writeback or writethrough, and 10-60 ops: partial and
//!   multi-cluster writes, zeroes, discards, compressed writes, flushes, resizes, reads (checked
//!   against the model during the run), clean reopens (`G::Reopen`) and unclean ones (`G::Kill`:
//!   the image is leaked as if the process was killed and opened again on the same storage),
//!   with free-flush-allocate patterns so that freed clusters are reused. Each gets
//!   `RANDOM_SHARE`% of the target divided among them: two light plans per epoch (all, and one
//!   of none, half, one torn) and a few random ones, plus two sampled fault runs (four from 200000
//!   states on) checking a sample of the later epochs.
//! * Encryption: one generated workload in five (sequential or concurrent) is encrypted (LUKS
//!   aes-256-xts, LUKS aes-128-cbc-essiv, or legacy AES; `random::encryption`), as are the fixed
//!   `encrypted_luks` and `encrypted_legacy_aes` (partial writes into new clusters, COW over a
//!   backing file, zeroes, discard, reopen). Torn writes are torn at 512-byte sectors, so every
//!   sector must decrypt to a version the model allows: old or new plaintext, never garbage.
//!   `key_slots` adds and erases LUKS passwords between writes (`G::AddKey`, `G::RemoveKey`,
//!   sync points when they return): in every crash state the active slots must be one of the
//!   sets the workload had since its last completed change, and each must open with its own
//!   password (`check_key_slots`, failure kind "key slots wrong").
//! * Every sixth generated workload is concurrent (`cnc-<seed>-<i>`): 2-4 threads on one
//!   image, thread `t` owning the guest clusters `c % T == t` (they share L2 tables and refcount
//!   blocks), doing writes, zeroes, discards, compressed writes, flushes and reads, writeback or
//!   writethrough, with a flush delay of 1-3 ms. All data comes from the model in op order before
//!   the threads start. A concurrent run cannot be replayed bit for bit: it is recorded once and
//!   its crash states checked; it gets no fault runs.
//!
//! # Fault injection
//! Fault runs make every write and every flush of every fixed workload fail in turn (EIO once,
//! ENOSPC from then on; up to 12 set_len and discards, EIO once): the error must reach the caller
//! of the op it happened in (a failed discard may be ignored: discards are hints). Fixed
//! workloads stop at the first error (the image is dropped, which may flush); generated ones and
//! `failed_flush` go on after a failed op (a failed flush followed by a close, reopen or kill
//! ends the run there: the image refuses everything after a failed fdatasync until reopened, and
//! a reopened image cannot know what was lost). Generated workloads sample their faults: a write
//! failing with EIO, a window of 2-4 writes failing with ENOSPC (then space comes back), a flush
//! failing once, a discard failing, a write and a later flush. Every state from the epoch of the
//! first fault on is checked.
//!
//! Two more tests guard the harness itself: `harness_catches_missing_barriers` runs a workload in
//! cache=unsafe mode (no barriers) and requires the simulator to find both corruption and lost
//! data; `recording_replays_to_the_final_image` checks the log replays to what the engine saw.
//!
//! Environment:
//! * `QCOW2RS_CRASH_STATES=N`: target number of crash states (default 20000); random subsets scale.
//! * `QCOW2RS_CRASH_RANDOM=N`: generated workloads (default STATES / 80: 250 in CI).
//! * `QCOW2RS_CRASH_SEED=S`: their seed (decimal or 0x-hex; default 0x5eed0006).
//! * `QCOW2RS_CRASH_ONLY=a,b`: only the named workloads (substring match).
//! * `QCOW2RS_CRASH_FAULTS=0`: skip fault injection.
//! * `QCOW2RS_CRASH_DUMP=DIR`: write every failing crash image (and its description) to DIR.
//! * `QCOW2RS_CRASH_THREADS=T`: worker threads (default: available parallelism, at most 4).
//! * `QCOW2RS_CRASH_QEMU_EVERY=K`: run qemu-img check on every K-th state (default 20; 0: never).
//! * `QCOW2RS_CRASH_QEMU_DET=1`: also on every deterministic state (for long runs).
//! * `QCOW2RS_CRASH_RECOVERY=0`: skip the crashes during recovery.
//! * `QCOW2RS_CRASH_STOP_FIRST=1`: start no new job (and check no further state) after the first
//!   failure (`scripts/mutants.sh` uses it; with `QCOW2RS_MUTANT=<name>` switching a mutant of
//!   `qcow2rs::mutants::ALL` on).
//! * `QCOW2RS_CRASH_FIRST=a,b`: run the jobs of the workloads whose names contain one of these
//!   first (nothing is skipped; with `STOP_FIRST` a mutant's likely catcher ends the run early).
//!
//! The run ends with these lines: `crash-sim: first failure after N states` (when there was
//! one), `crash-sim: seed S ..., D distinct workload logs, F distinct fault-run logs, E distinct
//! epochs` (hashes of each fault-free run's log; of each fault run's log; of each epoch's log
//! prefix and pending set), and `crash-sim: N states, C corruptions, L with leaks`, where C
//! counts the states (and workloads, and guest reads during a run) that failed any check (each is
//! described in detail above those lines).

#[path = "crash_sim/guest.rs"]
mod guest;
#[path = "crash_sim/plans.rs"]
mod plans;
#[path = "crash_sim/random.rs"]
mod random;
#[path = "crash_sim/workloads.rs"]
mod workloads;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use qcow2rs::storage::{CrashLog, Fault, Op, OpKind, Persist, RecordingStorage, EIO, ENOSPC};
use qcow2rs::{Image, MemStorage, OpenOptions, RepairMode};

use guest::{describe, Expect, SEC};
use plans::{Epoch, Origin, Plan, Rng};
use workloads::{header_facts, Prepared, Run, Spec, G};

/// Every workload: the fixed ones, then the generated ones (every sixth concurrent).
fn all_workloads(cfg: &Config) -> Vec<Spec> {
    let mut v = workloads::all();
    for i in 0..cfg.random {
        v.push(if i % 6 == 5 {
            random::generate_concurrent(cfg.seed, i)
        } else {
            random::generate(cfg.seed, i)
        });
    }
    if std::env::var_os("QCOW2RS_CRASH_PRINT_OPS").is_some() {
        for spec in v
            .iter()
            .filter(|s| cfg.only.is_empty() || cfg.only.contains(&s.name))
        {
            eprintln!("workload {}: {}", spec.name, spec.what);
            for (i, g) in spec.setup.iter().enumerate() {
                eprintln!("  setup {i}: {g}");
            }
            for (i, g) in spec.ops.iter().enumerate() {
                eprintln!("  op {}: {g}", i + 1 + spec.setup.len());
            }
        }
    }
    v
}

const DEFAULT_STATES: usize = 20_000;
/// Default seed of the random workloads.
const DEFAULT_SEED: u64 = 0x5eed_0006;
/// Share of the target (percent) that goes to the random workloads.
const RANDOM_SHARE: usize = 40;

/// Set when a state failed and `QCOW2RS_CRASH_STOP_FIRST=1`: no more jobs are started.
static STOP: AtomicBool = AtomicBool::new(false);
/// States checked so far (all threads), and the count when the first failure was found.
static STATES_DONE: AtomicU64 = AtomicU64::new(0);
static FIRST_FAIL: AtomicU64 = AtomicU64::new(u64::MAX);
/// Distinct epochs (their identity hashes) and distinct fault-run logs.
static EPOCH_IDS: LazyLock<Mutex<HashSet<u64>>> = LazyLock::new(Default::default);
static FAULT_LOGS: LazyLock<Mutex<HashSet<u64>>> = LazyLock::new(Default::default);

fn note_failure(cfg: &Config) {
    FIRST_FAIL.fetch_min(STATES_DONE.load(Ordering::SeqCst), Ordering::SeqCst);
    if cfg.stop_first {
        STOP.store(true, Ordering::SeqCst);
    }
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}
/// Largest number of pending operations whose subsets are all enumerated.
const MAX_ALL_SUBSETS: usize = 10;
/// Detailed failure reports kept (all failures are counted).
const MAX_REPORTS: usize = 40;

struct Config {
    target: usize,
    only: Vec<String>,
    faults: bool,
    dump: Option<PathBuf>,
    threads: usize,
    qemu_every: u64,
    qemu_det: bool,
    recovery: bool,
    random: usize,
    seed: u64,
    stop_first: bool,
    /// Workload-name substrings whose jobs run first (`QCOW2RS_CRASH_FIRST`).
    first: Vec<String>,
}

impl Config {
    fn from_env() -> Config {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str, d: usize| {
            var(k).map_or(d, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{k}={v}: expected a number"))
            })
        };
        let par = std::thread::available_parallelism().map_or(2, |n| n.get());
        Config {
            target: num("QCOW2RS_CRASH_STATES", DEFAULT_STATES),
            only: var("QCOW2RS_CRASH_ONLY")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default(),
            faults: var("QCOW2RS_CRASH_FAULTS").is_none_or(|v| v != "0"),
            dump: var("QCOW2RS_CRASH_DUMP").map(PathBuf::from),
            threads: num("QCOW2RS_CRASH_THREADS", par.min(4)).max(1),
            qemu_every: num("QCOW2RS_CRASH_QEMU_EVERY", 20) as u64,
            qemu_det: var("QCOW2RS_CRASH_QEMU_DET").is_some_and(|v| v != "0"),
            recovery: var("QCOW2RS_CRASH_RECOVERY").is_none_or(|v| v != "0"),
            random: num(
                "QCOW2RS_CRASH_RANDOM",
                num("QCOW2RS_CRASH_STATES", DEFAULT_STATES) / 80,
            ),
            seed: var("QCOW2RS_CRASH_SEED").map_or(DEFAULT_SEED, |v| {
                let t = v.trim_start_matches("0x");
                u64::from_str_radix(t, if t.len() < v.len() { 16 } else { 10 })
                    .unwrap_or_else(|_| panic!("QCOW2RS_CRASH_SEED={v}: expected a number"))
            }),
            stop_first: var("QCOW2RS_CRASH_STOP_FIRST").is_some_and(|v| v != "0"),
            first: var("QCOW2RS_CRASH_FIRST")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default(),
        }
    }
}

/// A workload, prepared and recorded once without faults.
struct Work {
    spec: Spec,
    prep: Prepared,
    run: Run,
}

enum Job {
    /// Crash states of epoch `k` of the fault-free run: the deterministic ones (round 0) and
    /// `random` random ones.
    Epoch {
        w: usize,
        k: usize,
        random: usize,
        round: u32,
        chunk: u32,
    },
    /// A run with faults injected, and its crash states.
    Fault {
        w: usize,
        faults: Vec<Fault>,
        random: usize,
    },
}

#[derive(Default)]
struct Stats {
    states: u64,
    failed: u64,
    leaks: u64,
    duplicates: u64,
    qemu: u64,
    fault_runs: u64,
    errors_reported: u64,
    errors_ignored: u64,
    dirty: u64,
    /// Crash states taken during recovery (refcount rebuild, check -r) of a crash state.
    recovery: u64,
    by_kind: [u64; 9],
    reports: Vec<String>,
}

const KINDS: [&str; 9] = [
    "open failed",
    "check found corruption",
    "guest data wrong",
    "repair left it unclean",
    "qemu-img check",
    "fault not reported",
    "panic",
    "key slots wrong",
    "snapshots wrong",
];

impl Stats {
    fn add(&mut self, o: Stats) {
        self.states += o.states;
        self.failed += o.failed;
        self.leaks += o.leaks;
        self.duplicates += o.duplicates;
        self.qemu += o.qemu;
        self.fault_runs += o.fault_runs;
        self.errors_reported += o.errors_reported;
        self.errors_ignored += o.errors_ignored;
        self.dirty += o.dirty;
        self.recovery += o.recovery;
        for i in 0..KINDS.len() {
            self.by_kind[i] += o.by_kind[i];
        }
        for r in o.reports {
            if self.reports.len() < MAX_REPORTS {
                self.reports.push(r);
            }
        }
    }
    fn report(&mut self, kinds: &[usize], text: String) {
        self.failed += 1;
        for &k in kinds {
            self.by_kind[k] += 1;
        }
        if self.reports.len() < MAX_REPORTS {
            self.reports.push(text);
        }
    }
}

/// Everything a state check needs to know about where the state comes from.
struct StateCtx<'a> {
    work: &'a Work,
    run: &'a Run,
    ep: &'a Epoch<'a>,
    expect: &'a Expect,
    tmp: &'a Path,
    cfg: &'a Config,
    job: usize,
    seed: u64,
}

/// What a check of one state found.
struct Found {
    kinds: Vec<usize>,
    problems: Vec<String>,
    leaks: bool,
    /// The crash image had the dirty bit set (lazy refcounts).
    dirty: bool,
}

/// Whether a crash image has the dirty bit set (v3 only: in a v2 header byte 79 belongs to
/// the header extensions).
fn is_dirty(b: &[u8]) -> bool {
    b.len() > 79 && b[4..8] != [0, 0, 0, 2] && b[79] & 1 != 0
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

impl Found {
    fn panicked(p: &(dyn std::any::Any + Send)) -> Found {
        Found {
            kinds: vec![6],
            problems: vec![format!("panicked: {}", panic_text(p))],
            leaks: false,
            dirty: false,
        }
    }
    fn fail(&mut self, kind: usize, msg: String) {
        if !self.kinds.contains(&kind) {
            self.kinds.push(kind);
        }
        self.problems.push(msg);
    }
}

fn messages(r: &qcow2rs::CheckReport) -> String {
    let n = r.messages.len();
    let mut s: Vec<String> = r.messages.iter().take(12).cloned().collect();
    if n > 12 {
        s.push(format!("... ({} more)", n - 12));
    }
    s.join("; ")
}

/// `qemu-img check`: (exit code, the first lines of its output, whether every ERROR line it
/// printed is about a COPIED flag).
fn qemu_check_full(path: &Path, password: Option<&qcow2rs::Password>) -> (i32, String, bool) {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("check");
    match password {
        // Encrypted: the secret as qemu-img takes it (the simulator's passwords are plain ASCII
        // without commas).
        Some(p) => {
            cmd.arg("--object")
                .arg(format!(
                    "secret,id=k,data={}",
                    String::from_utf8_lossy(p.as_bytes())
                ))
                .arg("--image-opts")
                .arg(format!(
                    "driver=qcow2,file.filename={},encrypt.key-secret=k",
                    path.display()
                ));
        }
        None => {
            cmd.args(["-f", "qcow2"]).arg(path);
        }
    }
    match cmd.output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let lines: Vec<&str> = text.lines().take(12).collect();
            let copied_only = text
                .lines()
                .filter(|l| l.contains("ERROR"))
                .all(|l| l.contains("ERROR OFLAG_COPIED"));
            (
                out.status.code().unwrap_or(-1),
                lines.join(" | "),
                copied_only,
            )
        }
        Err(e) => panic!(
            "cannot run qemu-img ({e}): the crash simulator needs qemu-img 10 on PATH \
             (apt-get install qemu-utils)"
        ),
    }
}

fn qemu_check(path: &Path, password: Option<&qcow2rs::Password>) -> (i32, String) {
    let (code, out, _) = qemu_check_full(path, password);
    (code, out)
}

/// Whether a crash state may hold missing COPIED flags (`CheckReport::missing_copied`): a
/// snapshot creation or deletion that may have reached this state without completing (in
/// flight, or failed): see the crash analysis in core/src/snapshot.rs.
fn missing_copied_allowed(ctx: &StateCtx) -> bool {
    let k = ctx.ep.k;
    let end = ctx.ep.cl.epoch_end(k);
    let guaranteed = ctx.run.guaranteed(k);
    ctx.run.ops.iter().enumerate().any(|(i, r)| {
        matches!(r.g, G::Snapshot(_) | G::DeleteSnapshot(_))
            && r.log_start < end
            && (!guaranteed[i] || r.error.is_some())
    })
}

/// Snapshots: every snapshot whose creation is guaranteed in this state (and whose deletion
/// cannot have reached it) is listed, nothing is listed that the workload did not create (or
/// had surely deleted), and each listed one reads back exactly what the disk held when it was
/// taken, at the size it recorded.
fn check_snapshots(ctx: &StateCtx, bytes: &[u8], found: &mut Found) {
    let ops = &ctx.run.ops;
    if !ops.iter().any(|r| matches!(r.g, G::Snapshot(_))) {
        return;
    }
    let k = ctx.ep.k;
    let end = ctx.ep.cl.epoch_end(k);
    let guaranteed = ctx.run.guaranteed(k);
    let may = |i: usize| ops[i].log_start < end;
    let n = ctx.run.guest.snaps.len();
    let (mut must, mut can) = (vec![false; n], vec![false; n]);
    for (i, r) in ops.iter().enumerate() {
        match r.g {
            G::Snapshot(s) => {
                must[s] = guaranteed[i];
                // A failed creation may have switched the header all the same.
                can[s] = may(i);
            }
            G::DeleteSnapshot(s) => {
                if may(i) {
                    must[s] = false;
                }
                if guaranteed[i] {
                    can[s] = false;
                }
            }
            _ => {}
        }
    }
    let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let opts = OpenOptions {
        password: ctx.work.spec.open.password.clone(),
        ..OpenOptions::read_only()
    };
    let listed = match Image::open_storage(mem.clone(), &ctx.work.prep.name, &opts) {
        Ok(img) => img.snapshots(),
        Err(e) => {
            found.fail(
                8,
                format!("cannot open the crash image to list snapshots: {e}"),
            );
            return;
        }
    };
    let mut seen = vec![false; n];
    for info in &listed {
        // The VM clock is the ordinal + 1 (workloads::exec).
        let s = info.vm_clock_nsec.wrapping_sub(1) as usize;
        // What creation returned (nothing when it failed: then the name must still be right).
        let fits = match ctx.run.snaps.get(s) {
            Some(Some(k)) => k.id == info.id && k.name == info.name,
            Some(None) => info.name == format!("s{}", s % 3),
            None => false,
        };
        if s >= n || !fits || !can[s] {
            found.fail(
                8,
                format!(
                    "snapshot ID {} '{}' is listed, but the workload cannot have it here",
                    info.id, info.name
                ),
            );
            continue;
        }
        seen[s] = true;
        let model = &ctx.run.guest.snaps[s];
        let view = Image::open_storage(
            mem.clone(),
            &ctx.work.prep.name,
            &OpenOptions {
                snapshot: Some(qcow2rs::SnapshotRef::Id(info.id.clone())),
                ..opts.clone()
            },
        );
        let view = match view {
            Ok(v) => v,
            Err(e) => {
                found.fail(8, format!("snapshot #{s} (ID {}): view: {e}", info.id));
                continue;
            }
        };
        if view.virtual_size() != model.size {
            found.fail(
                8,
                format!(
                    "snapshot #{s} (ID {}): size {:#x}, taken at {:#x}",
                    info.id,
                    view.virtual_size(),
                    model.size
                ),
            );
            continue;
        }
        let mut buf = vec![0u8; model.size as usize];
        if let Err(e) = view.read_at(&mut buf, 0) {
            found.fail(8, format!("snapshot #{s}: read: {e}"));
            continue;
        }
        let guest = &ctx.run.guest;
        let bad: Vec<u64> = buf
            .chunks(SEC as usize)
            .enumerate()
            .filter(|(i, sec)| {
                !model.sectors[*i]
                    .iter()
                    .any(|&c| guest.bytes_match(*i as u64, c, sec))
            })
            .map(|(i, _)| i as u64)
            .collect();
        if let Some(&first) = bad.first() {
            let sec = &buf[(first * SEC) as usize..((first + 1) * SEC) as usize];
            found.fail(
                8,
                format!(
                    "snapshot #{s} (ID {}): {} sectors differ from what the disk held when it was taken; sector {first} holds {}, allowed: {}",
                    info.id,
                    bad.len(),
                    describe(sec, guest, first),
                    model.sectors[first as usize]
                        .iter()
                        .map(|&c| guest.name(c, first))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            );
        }
    }
    for s in 0..n {
        if must[s] && !seen[s] {
            found.fail(
                8,
                format!("snapshot #{s} was created (durably) but is not listed"),
            );
        }
    }
}

/// Read the whole disk and compare every sector with the model.
fn verify_data(img: &Image, ctx: &StateCtx, found: &mut Found) {
    let guest = &ctx.run.guest;
    let e = ctx.expect;
    let size = img.virtual_size();
    if !e.sizes.contains(&size) {
        found.fail(
            2,
            format!(
                "virtual size is {size:#x}; allowed: {:x?}",
                e.sizes
                    .iter()
                    .map(|s| format!("{s:#x}"))
                    .collect::<Vec<_>>()
            ),
        );
        return;
    }
    // An apply that may have reached this state without being guaranteed: the disk must be
    // wholly the old one or wholly the snapshot, never a mix (sectors that match both, or
    // neither, say nothing).
    let doubtful_apply = {
        let k = ctx.ep.k;
        let end = ctx.ep.cl.epoch_end(k);
        let guaranteed = ctx.run.guaranteed(k);
        ctx.run.ops.iter().enumerate().find_map(|(i, r)| match r.g {
            G::ApplySnapshot(_) if r.log_start < end && !guaranteed[i] => Some(i),
            _ => None,
        })
    };
    let mut only_new: Option<u64> = None;
    let mut only_old: Option<u64> = None;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut bad: Vec<(u64, u64, String, String)> = Vec::new(); // (first, last, found, allowed)
    let mut nbad = 0u64;
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off) as usize;
        if let Err(err) = img.read_at(&mut buf[..n], off) {
            found.fail(2, format!("read at {off:#x}+{n:#x} failed: {err}"));
            return;
        }
        for (i, sec) in buf[..n].chunks(SEC as usize).enumerate() {
            let s = off / SEC + i as u64;
            let cands = e.candidates(s as usize);
            if let Some(a) = doubtful_apply {
                let h = &guest.hist[s as usize];
                let new = h.iter().find(|v| v.op == a);
                // A sector whose guaranteed version has the same content (the same snapshot
                // applied before) cannot tell old from new.
                let same_before = new.is_some_and(|n| cands[0] == n.content);
                if let (Some(new), false) = (new, same_before) {
                    let is_new = guest.bytes_match(s, new.content, sec);
                    let is_old = cands
                        .iter()
                        .any(|&c| c != new.content && guest.bytes_match(s, c, sec));
                    if is_new && !is_old {
                        only_new.get_or_insert(s);
                    }
                    if is_old && !is_new {
                        only_old.get_or_insert(s);
                    }
                }
            }
            if cands.iter().any(|&c| guest.bytes_match(s, c, sec)) {
                continue;
            }
            nbad += 1;
            let what = describe(sec, guest, s);
            let allowed = cands
                .iter()
                .map(|&c| guest.name(c, s))
                .collect::<Vec<_>>()
                .join(" or ");
            let n = bad.len();
            match bad.last_mut() {
                Some(l) if l.1 + 1 == s && l.2 == what && l.3 == allowed => l.1 = s,
                _ if n < 8 => bad.push((s, s, what, allowed)),
                _ => {}
            }
        }
        off += n as u64;
    }
    if nbad > 0 {
        let mut msg = format!("{nbad} guest sectors hold a wrong version:");
        for (a, b, what, allowed) in bad {
            msg.push_str(&format!(
                "\n      sectors {a}..={b} (guest {:#x}..{:#x}): found {what}; allowed: {allowed} (first allowed = guaranteed since guest op {})",
                a * SEC,
                (b + 1) * SEC,
                e.synced_op
            ));
        }
        found.fail(2, msg);
    }
    if let (Some(a), Some(n), Some(o)) = (doubtful_apply, only_new, only_old) {
        found.fail(
            2,
            format!(
                "a half-applied snapshot: guest op {a} ({}) shows at sector {n}, the disk before it at sector {o}",
                ctx.run.ops[a].g
            ),
        );
    }
}

/// Check one crash state. `qemu`: also run qemu-img check. `all`: repair with `All`, else `Leaks`.
fn check_state(ctx: &StateCtx, bytes: Vec<u8>, qemu: bool, all: bool, seq: u64) -> Found {
    let lazy = ctx.work.spec.lazy();
    // Dirty bit (incompatible feature bit 0): the read-write open must rebuild the refcounts.
    let dirty = is_dirty(&bytes);
    let mut found = Found {
        kinds: Vec::new(),
        problems: Vec::new(),
        leaks: false,
        dirty,
    };
    let qpath = ctx.tmp.join(format!("qemu-{}-{seq}.qcow2", ctx.job));
    let copied_ok = missing_copied_allowed(ctx);
    if qemu && !lazy {
        std::fs::write(&qpath, &bytes).unwrap();
        let (code, out, copied_only) =
            qemu_check_full(&qpath, ctx.work.spec.open.password.as_ref());
        // Missing COPIED flags are "corruptions" to qemu-img too (exit 2).
        if code != 0 && code != 3 && !(code == 2 && copied_ok && copied_only) {
            found.fail(
                4,
                format!("qemu-img check on the crash image exited {code}: {out}"),
            );
        }
    }
    check_key_slots(ctx, &bytes, &mut found);
    check_snapshots(ctx, &bytes, &mut found);
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let img = match Image::open_storage(mem.clone(), &ctx.work.prep.name, &ctx.work.spec.reopen()) {
        Ok(i) => i,
        Err(e) => {
            found.fail(0, format!("read-write open failed: {e}"));
            return found;
        }
    };
    if qemu && lazy {
        // The crash image is dirty: check what the read-write open (refcount rebuild) left.
        std::fs::write(&qpath, mem.to_vec()).unwrap();
        let (code, out, copied_only) =
            qemu_check_full(&qpath, ctx.work.spec.open.password.as_ref());
        if code != 0 && code != 3 && !(code == 2 && copied_ok && copied_only) {
            found.fail(
                4,
                format!("qemu-img check after our read-write open (lazy refcounts rebuilt) exited {code}: {out}"),
            );
        }
    }
    let mut missing_copied = false;
    match img.check(None) {
        Ok(r) => {
            missing_copied = r.missing_copied > 0;
            let tolerated = copied_ok && r.corruptions == r.missing_copied;
            if (r.corruptions > 0 && !tolerated) || r.check_errors > 0 {
                found.fail(
                    1,
                    format!(
                        "check: {} corruptions, {} leaks, {} check errors: {}",
                        r.corruptions,
                        r.leaks,
                        r.check_errors,
                        messages(&r)
                    ),
                );
            }
            found.leaks = r.leaks > 0;
            if dirty && (r.leaks > 0 || r.corruptions > r.missing_copied) {
                found.fail(
                    1,
                    format!(
                        "the crash image had the dirty bit set, but after the read-write open (refcount rebuild) check is not clean: {} leaks: {}",
                        r.leaks,
                        messages(&r)
                    ),
                );
            }
        }
        Err(e) => found.fail(1, format!("check failed: {e}")),
    }
    verify_data(&img, ctx, &mut found);
    // Missing COPIED flags are fixed by `-r all` only.
    let mode = if all || !found.kinds.is_empty() || missing_copied {
        RepairMode::All
    } else {
        RepairMode::Leaks
    };
    match img.check(Some(mode)) {
        Ok(_) => match img.check(None) {
            Ok(r) if r.is_clean() => {}
            Ok(r) => found.fail(
                3,
                format!(
                    "after check -r {mode:?}: {} corruptions, {} leaks, {} check errors: {}",
                    r.corruptions,
                    r.leaks,
                    r.check_errors,
                    messages(&r)
                ),
            ),
            Err(e) => found.fail(3, format!("check after repair failed: {e}")),
        },
        Err(e) => found.fail(3, format!("check -r {mode:?} failed: {e}")),
    }
    if qemu {
        // Data must survive the repair, and qemu must agree the result is clean.
        verify_data(&img, ctx, &mut found);
        match img.close() {
            Ok(()) => {
                std::fs::write(&qpath, mem.to_vec()).unwrap();
                let (code, out) = qemu_check(&qpath, ctx.work.spec.open.password.as_ref());
                if code != 0 {
                    found.fail(
                        4,
                        format!("qemu-img check after our repair ({mode:?}) exited {code}: {out}"),
                    );
                }
            }
            Err(e) => found.fail(3, format!("close after repair failed: {e}")),
        }
        let _ = std::fs::remove_file(&qpath);
    }
    found
}

/// What a log entry's offset is, judged from the durable image's header.
fn annotate(durable: &[u8], e: &qcow2rs::storage::LogEntry) -> String {
    let off = match e.op {
        Op::Write { offset, .. } | Op::Discard { offset, .. } => offset,
        _ => return String::new(),
    };
    if durable.len() < 72 {
        return String::new();
    }
    let (l1n, l1o, rto, rtc, cs) = header_facts(durable);
    let what = if off < cs {
        "header".to_string()
    } else if off >= l1o && off < l1o + (l1n * 8).max(1) {
        format!("L1[{}]", (off - l1o) / 8)
    } else if off >= rto && off < rto + rtc * cs {
        format!("reftable[{}]", (off - rto) / 8)
    } else {
        format!("cluster {}", off / cs)
    };
    format!(" ({what})")
}

fn report(ctx: &StateCtx, plan: &Plan, found: &Found, durable: &[u8], label: &str) -> String {
    let w = ctx.work;
    let cl = &ctx.run.cl;
    let k = ctx.ep.k;
    let mut s = format!(
        "crash-sim FAILURE in workload '{}' ({})\n",
        w.spec.name, w.spec.what
    );
    if !ctx.run.faults.is_empty() {
        let f: Vec<String> = ctx
            .run
            .faults
            .iter()
            .map(|f| {
                format!(
                    "{:?} #{} fails with errno {} {}",
                    f.op,
                    f.nth,
                    f.errno,
                    if f.once { "once" } else { "from then on" }
                )
            })
            .collect();
        s.push_str(&format!("  fault injected: {}\n", f.join("; ")));
    }
    let start = cl.flush_index(k).map_or(0, |i| i + 1);
    s.push_str(&format!(
        "  state: {label}, epoch {k} of {} (durable up to {}), pending log entries #{start}..#{} ({} ops, {} of them doubtful: covered by a failed flush)\n",
        cl.epochs() - 1,
        cl.flush_index(k)
            .map_or("the starting image".to_string(), |i| format!("flush #{i}")),
        cl.epoch_end(k),
        ctx.ep.n(),
        ctx.ep.doubtful()
    ));
    s.push_str(&format!(
        "  crash keeps: {} [{:?}, seed {:#x}]\n",
        ctx.ep.describe(plan),
        plan.origin,
        ctx.seed
    ));
    s.push_str("  problems:\n");
    for p in &found.problems {
        s.push_str(&format!("    - {p}\n"));
    }
    let synced = ctx.expect.synced_op;
    s.push_str(&format!(
        "  guest ops (guaranteed durable: up to op {synced}, '{}'):\n",
        ctx.run.ops[synced].g
    ));
    for (i, r) in ctx.run.ops.iter().enumerate() {
        let near =
            (r.log_end + 1 >= start && r.log_start <= cl.epoch_end(k) + 1) || r.error.is_some();
        if !near && i != synced {
            continue;
        }
        if r.g == G::Start && i > 0 {
            continue;
        }
        s.push_str(&format!(
            "    op {i}{}: {} -> log #{}..#{}, {} flushes done{}{}\n",
            if ctx.work.spec.threads() > 1 {
                format!(
                    " (thread {}, seq {}..{})",
                    r.thread, r.begin_seq, r.done_seq
                )
            } else {
                String::new()
            },
            r.g,
            r.log_start,
            r.log_end,
            r.flushes,
            if r.sync { ", sync point" } else { "" },
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!(", FAILED: {e}"))
        ));
    }
    s.push_str("  pending log entries:\n");
    for (j, &idx) in ctx.ep.pending.iter().enumerate().take(40) {
        let e = &cl.entries()[idx];
        let how = match &plan.persist[j] {
            Persist::Whole => "kept".to_string(),
            Persist::Lost => "lost".to_string(),
            Persist::Sectors(m) => format!(
                "torn: {} of {} sectors",
                m.iter().filter(|&&b| b).count(),
                m.len()
            ),
        };
        s.push_str(&format!(
            "    #{idx}: {e}{} -> {how}\n",
            annotate(durable, e)
        ));
    }
    if ctx.ep.n() > 40 {
        s.push_str(&format!("    ... {} more\n", ctx.ep.n() - 40));
    }
    s.push_str(&format!(
        "  reproduce: QCOW2RS_CRASH_ONLY={} QCOW2RS_CRASH_STATES={} QCOW2RS_CRASH_DUMP=/tmp/crash cargo test -p qcow2rs-tests --test crash_sim -- --nocapture\n",
        w.spec.name, ctx.cfg.target
    ));
    s
}

/// Check `plans` of one epoch; `extra`: further whole images (label, bytes) to check.
#[allow(clippy::too_many_arguments)]
fn run_epoch(
    work: &Work,
    run: &Run,
    k: usize,
    plans: Vec<Plan>,
    random: usize,
    seed: u64,
    cfg: &Config,
    tmp: &Path,
    job: usize,
    stats: &mut Stats,
    final_image: Option<Vec<u8>>,
    seen: &Mutex<HashSet<u64>>,
) {
    let cl = &run.cl;
    let ep = Epoch::new(cl, k);
    let durable = cl.durable(k);
    let end = cl.epoch_end(k);
    let synced = run.synced_op(k);
    let guaranteed = run.guaranteed(k);
    let expect = Expect::build(
        &run.guest,
        synced,
        |op| guaranteed[op],
        |op| run.ops[op].log_start < end,
    );
    let ctx = StateCtx {
        work,
        run,
        ep: &ep,
        expect: &expect,
        tmp,
        cfg,
        job,
        seed,
    };
    let mut rng = Rng::new(seed);
    let fresh = |img: &[u8], plan: &Plan| seen.lock().unwrap().insert(ep.fingerprint(img, plan));
    let mut seq = 0u64;
    let mut check = |plan: &Plan, img: Vec<u8>, label: &str, stats: &mut Stats| {
        seq += 1;
        // (Mutant runs, which stop at the first failure, skip the workloads' own qemu_all.)
        let qemu = (work.spec.qemu_all && !cfg.stop_first)
            || (cfg.qemu_det && label == "deterministic")
            || (cfg.qemu_every > 0 && seed.wrapping_add(seq).is_multiple_of(cfg.qemu_every));
        let all = (seed ^ seq) & 1 == 1;
        // A sample of states is also crashed during its own recovery: every 10th one that
        // needs a refcount rebuild (dirty), every 97th other one (check -r).
        let dirty = is_dirty(&img);
        let every = if dirty { 10 } else { 97 };
        let nested = cfg.recovery && seed.wrapping_add(seq * 7).is_multiple_of(every);
        let parent = nested.then(|| img.clone());
        let found = catch_unwind(AssertUnwindSafe(|| check_state(&ctx, img, qemu, all, seq)))
            .unwrap_or_else(|p| Found::panicked(&*p));
        if let Some(parent) = parent {
            if found.kinds.is_empty() {
                recovery_crashes(&ctx, parent, plan, label, seq, stats);
            }
        }
        stats.states += 1;
        STATES_DONE.fetch_add(1, Ordering::SeqCst);
        if qemu {
            stats.qemu += 1;
        }
        if found.leaks {
            stats.leaks += 1;
        }
        if found.dirty {
            stats.dirty += 1;
        }
        if !found.kinds.is_empty() {
            let text = report(&ctx, plan, &found, &durable, label);
            if let Some(dir) = &cfg.dump {
                let _ = std::fs::create_dir_all(dir);
                let base = dir.join(format!("{}-e{k}-j{job}-s{seq}", work.spec.name));
                let img = match label {
                    "final" => cl.final_image(),
                    _ => ep.build(plan),
                };
                let _ = std::fs::write(base.with_extension("qcow2"), &img);
                let _ = std::fs::write(base.with_extension("txt"), &text);
            }
            stats.report(&found.kinds, text);
            note_failure(cfg);
        }
    };
    // Plans are applied to a scratch copy and undone again, so that a duplicate costs no copy
    // of the whole image.
    let mut scratch = ep.base.clone();
    let mut try_plan = |plan: &Plan, label: &str, stats: &mut Stats| -> bool {
        let min_len = ep.build_into(&mut scratch, plan);
        let fresh = fresh(&scratch, plan);
        let img = fresh.then(|| scratch.clone());
        ep.restore(&mut scratch, min_len);
        debug_assert!(scratch == ep.base);
        match img {
            Some(img) => {
                check(plan, img, label, stats);
                true
            }
            None => {
                stats.duplicates += 1;
                false
            }
        }
    };
    for plan in &plans {
        if stopped() {
            return;
        }
        try_plan(plan, "deterministic", stats);
    }
    let mut done = 0;
    let mut attempts = 0;
    let must_tear = ep.n() <= MAX_ALL_SUBSETS;
    let mut plans_seen = HashSet::new();
    while done < random && attempts < random * 8 && !stopped() {
        attempts += 1;
        let plan = ep.random(&mut rng, must_tear);
        if !plans_seen.insert(plan.persist.clone()) {
            stats.duplicates += 1;
            continue;
        }
        if try_plan(&plan, "random", stats) {
            done += 1;
        }
    }
    if let Some(img) = final_image {
        let plan = Plan {
            persist: vec![Persist::Whole; ep.n()],
            origin: Origin::Fault,
        };
        check(&plan, img, "final", stats);
    }
}

/// Crash a state again while it recovers: open it read-write on a [`RecordingStorage`] (a dirty
/// image rebuilds its refcounts there), repair it (`check -r all`) and close it; then every
/// crash state of that recovery must open, check without corruption, repair clean, and show
/// exactly the guest data the recovered image showed.
fn recovery_crashes(
    ctx: &StateCtx,
    parent: Vec<u8>,
    parent_plan: &Plan,
    parent_label: &str,
    seq: u64,
    stats: &mut Stats,
) {
    let name = &ctx.work.prep.name;
    let rec = Arc::new(RecordingStorage::new(parent));
    let Ok(img) = Image::open_storage(rec.clone(), name, &ctx.work.spec.reopen()) else {
        return; // the state's own check reports it
    };
    let mut data = vec![0u8; img.virtual_size() as usize];
    if img.read_at(&mut data, 0).is_err() {
        return;
    }
    let _ = img.check(Some(RepairMode::All));
    let _ = img.close();
    let cl = rec.crash_log();
    for k in 0..cl.epochs() {
        let ep = Epoch::new(&cl, k);
        if ep.n() == 0 {
            continue;
        }
        let durable = cl.durable(k);
        let mut rng = Rng::new(ctx.seed ^ seq << 16 ^ k as u64);
        let mut plans = ep.deterministic(6, &mut rng);
        for _ in 0..4 {
            plans.push(ep.random(&mut rng, ep.n() <= 6));
        }
        let mut seen = HashSet::new();
        for plan in &plans {
            let bytes = ep.build(plan);
            if !seen.insert(ep.fingerprint(&bytes, plan)) {
                continue;
            }
            stats.states += 1;
            stats.recovery += 1;
            let mem = Arc::new(MemStorage::from_vec(bytes));
            let opts = ctx.work.spec.reopen();
            let copied_ok = missing_copied_allowed(ctx);
            let found = catch_unwind(AssertUnwindSafe(|| {
                check_recovered(mem, name, &opts, &data, copied_ok)
            }))
            .unwrap_or_else(|p| Found::panicked(&*p));
            if found.leaks {
                stats.leaks += 1;
            }
            if found.kinds.is_empty() {
                continue;
            }
            let mut text = report(ctx, parent_plan, &found, &durable, parent_label);
            text = text.replacen(
                "  problems:",
                &format!(
                    "  CRASH DURING RECOVERY of that state (open read-write, check -r all, close), recovery epoch {k} of {}, pending recovery log entries: {}\n  recovery crash keeps: {} [{:?}]\n  recovery log: {}\n  problems:",
                    cl.epochs() - 1,
                    ep.n(),
                    ep.describe(plan),
                    plan.origin,
                    ep.pending
                        .iter()
                        .take(30)
                        .map(|&i| format!("#{i} {}", cl.entries()[i]))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                1,
            );
            if let Some(dir) = &ctx.cfg.dump {
                let _ = std::fs::create_dir_all(dir);
                let base = dir.join(format!(
                    "{}-e{}-j{}-s{seq}-recovery-e{k}-{}",
                    ctx.work.spec.name,
                    ctx.ep.k,
                    ctx.job,
                    stats.reports.len()
                ));
                let _ = std::fs::write(base.with_extension("qcow2"), ep.build(plan));
                let _ = std::fs::write(base.with_extension("txt"), &text);
            }
            stats.report(&found.kinds, text);
            note_failure(ctx.cfg);
        }
    }
}

/// Checks of a crash state taken during recovery: it opens, has no corruption, shows the recovered
/// guest data, and repairs clean.
/// `copied_ok`: the state being recovered may hold missing COPIED flags, which the repair sets
/// again (a crash during it leaves some of them missing).
fn check_recovered(
    mem: Arc<MemStorage>,
    name: &str,
    opts: &OpenOptions,
    data: &[u8],
    copied_ok: bool,
) -> Found {
    let mut found = Found {
        kinds: Vec::new(),
        problems: Vec::new(),
        leaks: false,
        dirty: false,
    };
    match Image::open_storage(mem, name, opts) {
        Err(e) => found.fail(0, format!("read-write open failed: {e}")),
        Ok(img) => {
            match img.check(None) {
                Ok(r)
                    if (r.corruptions > 0 && !(copied_ok && r.corruptions == r.missing_copied))
                        || r.check_errors > 0 =>
                {
                    found.fail(
                        1,
                        format!(
                            "check: {} corruptions, {} check errors: {}",
                            r.corruptions,
                            r.check_errors,
                            messages(&r)
                        ),
                    )
                }
                Ok(r) => found.leaks = r.leaks > 0,
                Err(e) => found.fail(1, format!("check failed: {e}")),
            }
            let mut got = vec![0u8; img.virtual_size() as usize];
            match img.read_at(&mut got, 0) {
                Err(e) => found.fail(2, format!("read failed: {e}")),
                Ok(()) if got != data => {
                    let first = got
                        .iter()
                        .zip(data)
                        .position(|(a, b)| a != b)
                        .map_or(got.len().min(data.len()), |p| p);
                    found.fail(
                        2,
                        format!(
                            "guest data differs from the recovered image's (size {:#x} vs {:#x}; first difference at guest offset {first:#x})",
                            got.len(),
                            data.len()
                        ),
                    )
                }
                Ok(()) => {}
            }
            match img
                .check(Some(RepairMode::All))
                .and_then(|_| img.check(None))
            {
                Ok(r) if r.is_clean() => {}
                Ok(r) => found.fail(
                    3,
                    format!(
                        "after check -r all: {} corruptions, {} leaks: {}",
                        r.corruptions,
                        r.leaks,
                        messages(&r)
                    ),
                ),
                Err(e) => found.fail(3, format!("repair failed: {e}")),
            }
        }
    }
    found
}

fn fault_job(
    work: &Work,
    faults: &[Fault],
    random: usize,
    cfg: &Config,
    tmp: &Path,
    job: usize,
) -> Stats {
    let mut stats = Stats {
        fault_runs: 1,
        ..Stats::default()
    };
    let run = workloads::run(&work.spec, &work.prep, faults);
    let Some(first) = run.first_failed_entry().filter(|_| run.fired > 0) else {
        // The replay is deterministic: the fault must fire.
        stats.report(
            &[5],
            format!(
                "crash-sim FAILURE in workload '{}': injected fault {faults:?} never fired",
                work.spec.name
            ),
        );
        note_failure(cfg);
        return stats;
    };
    let cl = &run.cl;
    FAULT_LOGS.lock().unwrap().insert(plans::log_identity(cl));
    EPOCH_IDS
        .lock()
        .unwrap()
        .extend(plans::epoch_identities(cl));
    for msg in &run.read_failures {
        stats.report(
            &[2],
            format!(
                "crash-sim FAILURE in workload '{}' (fault run {faults:?}): a guest read returned the wrong data: {msg}",
                work.spec.name
            ),
        );
        note_failure(cfg);
    }
    // Every guest op during which a fault fired must have failed.
    for idx in (0..cl.entries().len()).filter(|&i| cl.entries()[i].failed()) {
        // (Ops may overlap in the log: those run while a flush syncs. Any of them may own it.)
        let owners: Vec<usize> = (0..run.ops.len())
            .filter(|&i| run.ops[i].log_start <= idx && idx < run.ops[i].log_end)
            .collect();
        let owner = owners
            .iter()
            .copied()
            .find(|&i| run.ops[i].error.is_some())
            .or(owners.first().copied());
        let kind = cl.entries()[idx].op.kind();
        match owner {
            Some(i) if run.ops[i].error.is_some() => stats.errors_reported += 1,
            Some(i) if kind == OpKind::Discard || run.ops[i].g == G::Drop => {
                // A discard is a hint (the Storage trait allows ignoring it); Drop cannot report.
                stats.errors_ignored += 1;
            }
            Some(i) => {
                stats.report(
                    &[5],
                    format!(
                        "crash-sim FAILURE in workload '{}': storage {} (log #{idx}) failed with an injected error ({faults:?}) but guest op {i} ('{}') returned success: the error did not reach the caller",
                        work.spec.name, cl.entries()[idx], run.ops[i].g
                    ),
                );
                note_failure(cfg);
            }
            None => {}
        }
    }
    // The epoch the fault happened in, and every later one (Drop may flush).
    let fault_epoch = cl.entries()[..first]
        .iter()
        .filter(|e| e.op == Op::Flush && !e.failed())
        .count();
    let last = cl.epochs() - 1;
    let mut rng = Rng::new(name_seed(&work.spec.name) ^ first as u64);
    // A generated workload checks a sample of the later epochs.
    let epochs: Vec<usize> = (fault_epoch..=last)
        .filter(|&k| !work.spec.random || k <= fault_epoch + 1 || k == last || rng.chance(30))
        .collect();
    for k in epochs {
        if stopped() {
            break;
        }
        let ep = Epoch::new(cl, k);
        let n = ep.n();
        let mut plans = Vec::new();
        let all = Plan {
            persist: vec![Persist::Whole; n],
            origin: Origin::Fault,
        };
        plans.push(all.clone());
        if k > fault_epoch {
            plans.push(Plan {
                persist: vec![Persist::Lost; n],
                origin: Origin::Fault,
            });
        }
        for (j, &idx) in ep.pending.iter().enumerate() {
            if !cl.entries()[idx].failed() {
                continue;
            }
            // Everything before the failed op, and it (whole / lost / torn).
            let mut p: Vec<Persist> = (0..n)
                .map(|x| {
                    if x <= j {
                        Persist::Whole
                    } else {
                        Persist::Lost
                    }
                })
                .collect();
            plans.push(Plan {
                persist: p.clone(),
                origin: Origin::Fault,
            });
            p[j] = Persist::Lost;
            plans.push(Plan {
                persist: p.clone(),
                origin: Origin::Fault,
            });
            if ep.sectors[j] >= 2 {
                let s = ep.sectors[j];
                p[j] = Persist::Sectors((0..s).map(|x| x < s / 2).collect());
                plans.push(Plan {
                    persist: p,
                    origin: Origin::Fault,
                });
            }
            let mut q = all.persist.clone();
            q[j] = Persist::Lost;
            plans.push(Plan {
                persist: q,
                origin: Origin::Fault,
            });
        }
        if work.spec.random && plans.len() > 4 {
            // Everything, nothing, and two of the failure-centred plans.
            let a = 2 + rng.below(plans.len() as u64 - 2) as usize;
            let b = 2 + rng.below(plans.len() as u64 - 2) as usize;
            plans = vec![
                plans[0].clone(),
                plans[1].clone(),
                plans[a].clone(),
                plans[b].clone(),
            ];
        }
        let fin = (k == last).then(|| cl.final_image());
        let seed = name_seed(&work.spec.name)
            ^ faults
                .iter()
                .map(|f| f.nth << 32 ^ (f.errno as u64) << 8 ^ f.op as u64)
                .fold(0, |a, b| guest::mix(a ^ b))
            ^ k as u64;
        let seen = Mutex::new(HashSet::new());
        run_epoch(
            work, &run, k, plans, random, seed, cfg, tmp, job, &mut stats, fin, &seen,
        );
    }
    stats
}

/// A seed that depends only on the workload's name (stable when workloads are filtered).
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A few seeded fault runs for a generated workload: one write failing with EIO, a window of
/// writes failing with ENOSPC (then space comes back), a flush failing once, a discard failing,
/// a write and a later flush failing.
fn random_fault_list(spec: &Spec, run: &Run, n: usize) -> Vec<Vec<Fault>> {
    let [writes, _, discards, flushes] = run.counts;
    let mut rng = Rng::new(name_seed(&spec.name) ^ 0xfa17);
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 4 * n {
        tries += 1;
        let w = 1 + rng.below(writes.max(1));
        let f: Vec<Fault> = match rng.below(5) {
            0 => vec![Fault::once(OpKind::Write, w, EIO)],
            1 => (0..2 + rng.below(3))
                .map(|i| Fault::once(OpKind::Write, w + i, ENOSPC))
                .collect(),
            2 if flushes > 0 => vec![Fault::once(OpKind::Flush, 1 + rng.below(flushes), EIO)],
            3 if discards > 0 => vec![Fault::once(OpKind::Discard, 1 + rng.below(discards), EIO)],
            4 if flushes > 0 => vec![
                Fault::once(OpKind::Write, w, ENOSPC),
                Fault::once(OpKind::Flush, 1 + rng.below(flushes), EIO),
            ],
            _ => continue,
        };
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

fn fault_list(run: &Run) -> Vec<Vec<Fault>> {
    let [writes, set_lens, discards, flushes] = run.counts;
    let mut out = Vec::new();
    for n in 1..=writes {
        out.push(vec![Fault::once(OpKind::Write, n, EIO)]);
        out.push(vec![Fault::from_then_on(OpKind::Write, n, ENOSPC)]);
    }
    for n in 1..=flushes {
        out.push(vec![Fault::once(OpKind::Flush, n, EIO)]);
        out.push(vec![Fault::from_then_on(OpKind::Flush, n, ENOSPC)]);
    }
    // set_len and discard: at most 12 of each (a discard is issued per freed cluster).
    let sample = |count: u64| -> Vec<u64> {
        let mut v: Vec<u64> = (0..count.min(12))
            .map(|i| 1 + i * count / count.min(12))
            .collect();
        v.dedup();
        v
    };
    for n in sample(set_lens) {
        out.push(vec![Fault::once(OpKind::SetLen, n, EIO)]);
    }
    for n in sample(discards) {
        out.push(vec![Fault::once(OpKind::Discard, n, EIO)]);
    }
    out
}

/// Deterministic plans of an epoch, estimated without building them.
fn det_estimate(ep: &Epoch) -> usize {
    let n = ep.n();
    let base = if n <= MAX_ALL_SUBSETS {
        1 << n
    } else {
        2 * n + 1
    };
    base + 2 * ep.multi_sector()
}

/// Room for random states in an epoch (0 when the deterministic ones cover every state).
fn random_capacity(ep: &Epoch) -> usize {
    if ep.n() > MAX_ALL_SUBSETS {
        ep.n()
    } else {
        2 * ep.multi_sector()
    }
}

/// Jobs for epoch `k` of workload `w`: `random` random states split in chunks (so that the
/// threads share the work); the deterministic states go with the first chunk of round 0.
fn push_epoch_jobs(jobs: &mut Vec<Job>, w: usize, k: usize, random: usize, round: u32, det: bool) {
    const CHUNK: usize = 250;
    let chunks = random.div_ceil(CHUNK).max(usize::from(det));
    for c in 0..chunks {
        jobs.push(Job::Epoch {
            w,
            k,
            random: CHUNK.min(random - (c * CHUNK).min(random)),
            round,
            chunk: c as u32,
        });
    }
}

fn run_jobs(
    jobs: &[Job],
    job_base: usize,
    works: &[Work],
    seen: &[Vec<Mutex<HashSet<u64>>>],
    per_work: &[Mutex<(Stats, f64)>],
    cfg: &Config,
    tmp: &Path,
) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..cfg.threads {
            sc.spawn(|| loop {
                if stopped() {
                    break;
                }
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(j) else { break };
                let id = job_base + j;
                let t = Instant::now();
                let job_w = match job {
                    Job::Epoch { w, .. } | Job::Fault { w, .. } => *w,
                };
                let outcome = catch_unwind(AssertUnwindSafe(|| match job {
                    Job::Epoch {
                        w,
                        k,
                        random,
                        round,
                        chunk,
                    } => {
                        let work = &works[*w];
                        let seed = name_seed(&work.spec.name)
                            ^ ((*chunk as u64) << 40)
                            ^ ((*round as u64) << 24)
                            ^ (*k as u64);
                        let plans = if *round == 0 && *chunk == 0 {
                            let mut rng = Rng::new(seed ^ 0xc0ffee);
                            let ep = Epoch::new(&work.run.cl, *k);
                            if work.spec.random {
                                ep.light(&mut rng)
                            } else {
                                ep.deterministic(MAX_ALL_SUBSETS, &mut rng)
                            }
                        } else {
                            Vec::new()
                        };
                        let mut stats = Stats::default();
                        run_epoch(
                            work,
                            &work.run,
                            *k,
                            plans,
                            *random,
                            seed.wrapping_mul(3),
                            cfg,
                            tmp,
                            id,
                            &mut stats,
                            None,
                            &seen[*w][*k],
                        );
                        (*w, stats)
                    }
                    Job::Fault { w, faults, random } => {
                        (*w, fault_job(&works[*w], faults, *random, cfg, tmp, id))
                    }
                }));
                let (wi, stats) = outcome.unwrap_or_else(|p| {
                    let mut st = Stats::default();
                    let what = match job {
                        Job::Epoch {
                            k, round, chunk, ..
                        } => {
                            format!("epoch {k} (round {round}, chunk {chunk})")
                        }
                        Job::Fault { faults, .. } => format!("fault run {faults:?}"),
                    };
                    st.report(
                        &[6],
                        format!(
                            "crash-sim FAILURE in workload '{}': {what} panicked: {}",
                            works[job_w].spec.name,
                            panic_text(&*p)
                        ),
                    );
                    note_failure(cfg);
                    (job_w, st)
                });
                let mut g = per_work[wi].lock().unwrap();
                g.0.add(stats);
                g.1 += t.elapsed().as_secs_f64();
            });
        }
    });
}

#[test]
fn crash_sim() {
    let cfg = Config::from_env();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut setup_failures: Vec<String> = Vec::new();

    // Phase 1: prepare and record every workload without faults.
    let mut works: Vec<Work> = Vec::new();
    let mut logs = HashSet::new();
    for spec in all_workloads(&cfg) {
        if !cfg.only.is_empty() && !cfg.only.iter().any(|o| spec.name.contains(o.as_str())) {
            continue;
        }
        let prep = match workloads::prepare(&spec, tmp.path()) {
            Ok(p) => p,
            Err(e) => {
                setup_failures.push(format!(
                    "crash-sim FAILURE: workload '{}' could not be set up: {e}",
                    spec.name
                ));
                continue;
            }
        };
        let run = workloads::run(&spec, &prep, &[]);
        // A snapshot that would overflow narrow refcounts is refused before anything changes
        // (generated workloads pick 1- and 2-bit refcounts too): an expected failure.
        // (Then applying or deleting that snapshot fails too: it does not exist.)
        let refused = |r: &workloads::OpRec| {
            matches!(
                r.g,
                G::Snapshot(_) | G::ApplySnapshot(_) | G::DeleteSnapshot(_)
            ) && r.error.as_deref().is_some_and(|e| {
                e.contains("refcount would exceed") || e.contains("does not exist")
            })
        };
        if let Some(r) = run.ops.iter().find(|r| r.error.is_some() && !refused(r)) {
            setup_failures.push(format!(
                "crash-sim FAILURE: workload '{}' failed without any fault: op '{}': {}",
                spec.name,
                r.g,
                r.error.as_ref().unwrap()
            ));
        }
        for msg in &run.read_failures {
            setup_failures.push(format!(
                "crash-sim FAILURE: workload '{}': a guest read returned the wrong data: {msg}",
                spec.name
            ));
        }
        if let Some(f) = spec.expect {
            if let Err(e) = f(&prep.base, &run.cl.final_image()) {
                setup_failures.push(format!(
                    "crash-sim FAILURE: workload '{}' did not exercise what it should: {e}",
                    spec.name
                ));
            }
        }
        logs.insert(plans::log_identity(&run.cl));
        EPOCH_IDS
            .lock()
            .unwrap()
            .extend(plans::epoch_identities(&run.cl));
        works.push(Work { spec, prep, run });
    }
    assert!(!works.is_empty(), "no workload matches QCOW2RS_CRASH_ONLY");
    if !setup_failures.is_empty() {
        note_failure(&cfg);
    }
    let n_random = works.iter().filter(|w| w.spec.random).count();
    let n_concurrent = works.iter().filter(|w| w.spec.threads() > 1).count();

    // Phase 2: budget. The generated workloads get RANDOM_SHARE percent of the target (a few
    // light plans per epoch and a few sampled fault runs each). For the fixed ones:
    // deterministic states first; random ones fill up to the rest of the target, 35% of it
    // going to the fault runs.
    let random_budget = if n_random > 0 {
        cfg.target * RANDOM_SHARE / 100
    } else {
        0
    };
    let per_random = (random_budget / n_random.max(1)).max(6);
    let random_faults = if cfg.target >= 200_000 { 4 } else { 2 };
    let target = cfg.target - random_budget;
    let mut det_main = 0usize;
    let mut capacity: Vec<Vec<usize>> = Vec::new();
    for w in &works {
        let mut caps = Vec::new();
        for k in 0..w.run.cl.epochs() {
            let ep = Epoch::new(&w.run.cl, k);
            if !w.spec.random {
                det_main += det_estimate(&ep);
            }
            caps.push(random_capacity(&ep));
        }
        capacity.push(caps);
    }
    let fault_lists: Vec<Vec<Vec<Fault>>> = works
        .iter()
        .map(|w| {
            if !cfg.faults || w.spec.threads() > 1 {
                Vec::new()
            } else if w.spec.random {
                random_fault_list(&w.spec, &w.run, random_faults)
            } else {
                fault_list(&w.run)
            }
        })
        .collect();
    let fault_runs: usize = works
        .iter()
        .zip(&fault_lists)
        .filter(|(w, _)| !w.spec.random)
        .map(|(_, l)| l.len())
        .sum();
    const FAULT_DET: usize = 6;
    let fault_random = (target * 35 / 100)
        .checked_div(fault_runs)
        .map_or(0, |n| n.saturating_sub(FAULT_DET));
    let main_random = target
        .saturating_sub(det_main + fault_runs * (FAULT_DET + fault_random))
        .max(target / 10);
    let total_weight: u64 = works
        .iter()
        .zip(&capacity)
        .filter(|(_, c)| c.iter().any(|&x| x > 0))
        .map(|(w, _)| w.spec.weight)
        .sum::<u64>()
        .max(1);

    let mut jobs: Vec<Job> = Vec::new();
    for (wi, w) in works.iter().enumerate() {
        if w.spec.random {
            let epochs = capacity[wi].len();
            let nf = fault_lists[wi].len();
            let main = if nf > 0 { per_random / 2 } else { per_random };
            for k in 0..epochs {
                push_epoch_jobs(&mut jobs, wi, k, main / epochs, 0, true);
            }
            for f in &fault_lists[wi] {
                jobs.push(Job::Fault {
                    w: wi,
                    faults: f.clone(),
                    random: (per_random - main) / nf / epochs.min(6),
                });
            }
            continue;
        }
        let share = (main_random as u64 * w.spec.weight / total_weight) as usize;
        let cap_sum: usize = capacity[wi].iter().sum::<usize>().max(1);
        for (k, &cap) in capacity[wi].iter().enumerate() {
            push_epoch_jobs(&mut jobs, wi, k, share * cap / cap_sum, 0, true);
        }
        for f in &fault_lists[wi] {
            jobs.push(Job::Fault {
                w: wi,
                faults: f.clone(),
                random: fault_random,
            });
        }
    }
    eprintln!(
        "crash-sim: {} workloads ({} generated from seed {:#x}, {} of them concurrent), {} epochs, {} fault runs; target {} states ({} deterministic, {} random in epochs, {} random per fault run, {} per generated workload); {} threads",
        works.len(),
        n_random,
        cfg.seed,
        n_concurrent,
        capacity.iter().map(|c| c.len()).sum::<usize>(),
        fault_lists.iter().map(|l| l.len()).sum::<usize>(),
        cfg.target,
        det_main,
        main_random,
        fault_random,
        per_random,
        cfg.threads
    );

    // QCOW2RS_CRASH_FIRST: the named workloads' jobs go to the front (nothing is dropped).
    if !cfg.first.is_empty() {
        let name_of = |j: &Job| match j {
            Job::Epoch { w, .. } | Job::Fault { w, .. } => works[*w].spec.name.as_str(),
        };
        jobs.sort_by_key(|j| !cfg.first.iter().any(|f| name_of(j).contains(f.as_str())));
    }

    // Phase 3: run the jobs; then top up with random states until the target is reached.
    let seen: Vec<Vec<Mutex<HashSet<u64>>>> = capacity
        .iter()
        .map(|c| c.iter().map(|_| Mutex::new(HashSet::new())).collect())
        .collect();
    let per_work: Vec<Mutex<(Stats, f64)>> = works
        .iter()
        .map(|_| Mutex::new((Stats::default(), 0.0)))
        .collect();
    let mut job_base = 0;
    for round in 0..8u32 {
        run_jobs(&jobs, job_base, &works, &seen, &per_work, &cfg, tmp.path());
        job_base += jobs.len();
        let done: u64 = per_work.iter().map(|m| m.lock().unwrap().0.states).sum();
        let deficit = (cfg.target as u64).saturating_sub(done) as usize;
        if deficit == 0 || stopped() {
            break;
        }
        jobs = Vec::new();
        for (wi, w) in works
            .iter()
            .enumerate()
            .filter(|(_, w)| w.spec.weight > 0 && !w.spec.random)
        {
            let share = deficit as u64 * w.spec.weight / total_weight + 1;
            let cap_sum: usize = capacity[wi].iter().sum::<usize>().max(1);
            for (k, &cap) in capacity[wi].iter().enumerate() {
                let random = (share as usize * cap).div_ceil(cap_sum);
                if cap > 0 && random > 0 {
                    push_epoch_jobs(&mut jobs, wi, k, random, round + 1, false);
                }
            }
        }
        if jobs.is_empty() {
            break;
        }
    }

    // Summary.
    let mut total = Stats::default();
    let mut gen = Stats::default();
    let mut gen_secs = 0.0;
    for (w, m) in works.iter().zip(per_work) {
        let (s, secs) = m.into_inner().unwrap();
        let [wr, sl, di, fl] = w.run.counts;
        if w.spec.random {
            if s.failed > 0 {
                eprintln!(
                    "crash-sim: {:<28} {:>7} states ({:>5} fault runs), {:>4} failed ({})",
                    w.spec.name, s.states, s.fault_runs, s.failed, w.spec.what
                );
            }
            gen_secs += secs;
            gen.states += s.states;
            gen.failed += s.failed;
            gen.fault_runs += s.fault_runs;
            gen.leaks += s.leaks;
            gen.dirty += s.dirty;
            gen.qemu += s.qemu;
            gen.duplicates += s.duplicates;
            total.add(s);
            continue;
        }
        eprintln!(
            "crash-sim: {:<28} {:>7} states ({:>5} fault runs), {:>4} failed, {:>6} with leaks, {:>6} dirty, {:>6} duplicates skipped, {:>4} qemu-img checks, {:>7.1} s; log: {wr} writes, {fl} flushes, {di} discards, {sl} set_len",
            w.spec.name, s.states, s.fault_runs, s.failed, s.leaks, s.dirty, s.duplicates, s.qemu, secs
        );
        total.add(s);
    }
    if n_random > 0 {
        eprintln!(
            "crash-sim: {:<28} {:>7} states ({:>5} fault runs), {:>4} failed, {:>6} with leaks, {:>6} dirty, {:>6} duplicates skipped, {:>4} qemu-img checks, {:>7.1} s ({n_random} workloads, {n_concurrent} concurrent)",
            format!("generated (seed {:#x})", cfg.seed), gen.states, gen.fault_runs, gen.failed, gen.leaks, gen.dirty, gen.duplicates, gen.qemu, gen_secs
        );
    }
    for f in &setup_failures {
        eprintln!("{f}");
    }
    for r in &total.reports {
        eprintln!("{r}");
    }
    if total.failed > 0 {
        let kinds: Vec<String> = KINDS
            .iter()
            .zip(total.by_kind)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        eprintln!(
            "crash-sim: failing states by kind: {} ({} reports shown above)",
            kinds.join(", "),
            total.reports.len()
        );
    }
    eprintln!(
        "crash-sim: {} of the states crashed during the recovery of another; {} fault runs ({} errors reached the caller, {} discard errors ignored), {} qemu-img checks, {:.1} s",
        total.recovery,
        total.fault_runs,
        total.errors_reported,
        total.errors_ignored,
        total.qemu,
        t0.elapsed().as_secs_f64()
    );
    let c = total.failed + setup_failures.len() as u64;
    let first = FIRST_FAIL.load(Ordering::SeqCst);
    if first != u64::MAX {
        eprintln!(
            "crash-sim: first failure after {first} states{}",
            if cfg.stop_first {
                " (QCOW2RS_CRASH_STOP_FIRST: stopped there)"
            } else {
                ""
            }
        );
    }
    eprintln!(
        "crash-sim: seed {:#x} (QCOW2RS_CRASH_SEED), {} generated workloads (QCOW2RS_CRASH_RANDOM); {} distinct workload logs, {} distinct fault-run logs, {} distinct epochs",
        cfg.seed,
        n_random,
        logs.len(),
        FAULT_LOGS.lock().unwrap().len(),
        EPOCH_IDS.lock().unwrap().len()
    );
    eprintln!(
        "crash-sim: {} states, {} corruptions, {} with leaks",
        total.states, c, total.leaks
    );
    assert!(
        c == 0,
        "crash simulator: {c} failing states or workloads (see the reports above)"
    );
}

/// The crash log must reproduce what the engine saw: sanity check of the harness itself.
#[test]
fn recording_replays_to_the_final_image() {
    let tmp = tempfile::tempdir().unwrap();
    for spec in workloads::all().into_iter().take(3) {
        let prep = workloads::prepare(&spec, tmp.path()).unwrap();
        let run = workloads::run(&spec, &prep, &[]);
        let cl: &CrashLog = &run.cl;
        let mut img = cl.durable(0);
        cl.advance(&mut img, 0, cl.epochs() - 1);
        for &i in &cl.pending(cl.epochs() - 1) {
            cl.apply(&mut img, i, &Persist::Whole);
        }
        assert_eq!(img, cl.final_image(), "{}", spec.name);
    }
}

/// The simulator must catch an engine that does not order its writes: in cache=unsafe mode the
/// engine issues no barrier before close, so crash states must show both corruption (an L2 entry
/// reaching the disk without its refcount) and lost guest data (a guest flush that made nothing
/// durable). If this test fails, the simulator has gone blind.
#[test]
fn harness_catches_missing_barriers() {
    let cfg = Config {
        target: 0,
        only: Vec::new(),
        faults: false,
        dump: None,
        threads: 1,
        qemu_every: 0,
        qemu_det: false,
        recovery: false,
        random: 0,
        seed: 0,
        stop_first: false,
        first: Vec::new(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = workloads::all()
        .into_iter()
        .find(|s| s.name == "interleaved")
        .unwrap();
    spec.open.cache = qcow2rs::CacheMode::Unsafe;
    let prep = workloads::prepare(&spec, tmp.path()).unwrap();
    let run = workloads::run(&spec, &prep, &[]);
    assert!(run.ops.iter().all(|r| r.error.is_none()));
    let work = Work { spec, prep, run };
    let mut stats = Stats::default();
    for k in 0..work.run.cl.epochs() {
        let seen = Mutex::new(HashSet::new());
        run_epoch(
            &work,
            &work.run,
            k,
            Vec::new(),
            150,
            k as u64,
            &cfg,
            tmp.path(),
            0,
            &mut stats,
            None,
            &seen,
        );
    }
    eprintln!(
        "without barriers: {} states, {} failed ({} corrupt, {} with wrong data); first report:\n{}",
        stats.states,
        stats.failed,
        stats.by_kind[1],
        stats.by_kind[2],
        stats.reports.first().map_or("", |s| s.as_str())
    );
    assert!(
        stats.by_kind[1] > 0,
        "the simulator found no corruption in a run without barriers"
    );
    assert!(
        stats.by_kind[2] > 0,
        "the simulator found no lost data in a run without barriers"
    );
}

/// Key-slot workloads: the crash image's active LUKS slots are one of the sets the workload
/// had from its last completed key-slot change on, and each active slot opens with its own
/// password (so a power cut never leaves no working password, or a slot that opens nothing).
fn check_key_slots(ctx: &StateCtx, bytes: &[u8], found: &mut Found) {
    use std::collections::BTreeSet;
    let ops = &ctx.run.ops;
    if !ops
        .iter()
        .any(|r| matches!(r.g, G::AddKey(_) | G::RemoveKey(_)))
    {
        return;
    }
    let k = ctx.ep.k;
    let end = ctx.ep.cl.epoch_end(k);
    let guaranteed = ctx.run.guaranteed(k);
    let mut sets: Vec<BTreeSet<usize>> = vec![BTreeSet::from([0])];
    let mut first = 0;
    for (i, r) in ops.iter().enumerate() {
        let (slot, add) = match r.g {
            G::AddKey(s) => (s, true),
            G::RemoveKey(s) => (s, false),
            _ => continue,
        };
        if r.log_start >= end {
            break; // it cannot have reached this state
        }
        let mut next = sets.last().unwrap().clone();
        if add {
            next.insert(slot);
        } else {
            next.remove(&slot);
        }
        sets.push(next);
        if guaranteed[i] {
            first = sets.len() - 1;
        }
        if r.error.is_some() {
            break;
        }
    }
    let allowed = &sets[first..];
    let open = |password: Option<String>| {
        Image::open_storage(
            Arc::new(MemStorage::from_vec(bytes.to_vec())),
            "key-slot-check",
            &OpenOptions {
                open_backing: false,
                without_key: password.is_none(),
                password: password.map(Into::into),
                ..OpenOptions::read_only()
            },
        )
    };
    let active: BTreeSet<usize> = match open(None).and_then(|i| i.info()) {
        Ok(info) => match info.encryption.and_then(|e| e.luks) {
            Some(l) => l
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.active)
                .map(|(i, _)| i)
                .collect(),
            None => {
                found.fail(7, "the LUKS header is gone".into());
                return;
            }
        },
        Err(e) => {
            found.fail(7, format!("cannot read the LUKS header: {e}"));
            return;
        }
    };
    if !allowed.contains(&active) {
        found.fail(
            7,
            format!("active key slots {active:?}, expected one of {allowed:?}"),
        );
    }
    for &s in &active {
        if let Err(e) = open(Some(workloads::key_password(s))) {
            found.fail(
                7,
                format!("key slot {s} is active but its password does not open the image: {e}"),
            );
        }
    }
}
