//! The flush protocol: what the next flush owes, the two epochs of a flush, group commit,
//! deferred frees, the dirty bit of lazy refcounts, and close.
//!
//! # Crash analysis
//!
//! Nothing is synced while guest writes run; metadata changes live in the L2 and refcount-block
//! caches (write-back, bounded) and in the in-memory L1 table. A power cut may leave any subset
//! of the writes issued since the last completed barrier. The rules every such subset must
//! survive (DESIGN.md, "Ordered metadata flushing"), and where each is kept:
//!
//! 1. **A refcount increase is stable before any entry naming the cluster.** `alloc.rs` raises
//!    refcounts in the refcount cache and records it here (`refcount_raised`). Before an L2
//!    entry naming a new cluster is changed, [`State::order_entry_update`] makes the L2 cache
//!    depend on the refcount cache (`cache.rs` then writes the refcount blocks and issues a
//!    barrier before it writes any L2 table: on eviction and in epoch 1 below). A new L2 table
//!    is only reachable once its L1 entry is written, which happens in epoch 2, after the
//!    barrier ending epoch 1. Mutants: `l2-refcount-dep`, `pre-barrier`, `unlinked-flag`.
//! 2. **A pointer removal is stable before the refcount it held drops.** Every free is
//!    deferred ([`Pending::defer_free`]); a flush hands the frees queued before it (its
//!    [`FlushTicket`]) to [`State::flush_end`], which applies them only after the flush's final
//!    barrier made every removal stable. The decreases are written at a later flush; a crash
//!    before that leaks. A freed cluster is not reused before its decrease is applied, so no
//!    stable pointer can name a cluster handed out again. Mutant: `deferred-frees`.
//! 3. **Data is stable before the entry that maps it.** A data write sets the data-written
//!    flag (`host.rs`); an L2 entry naming newly written data makes the L2 cache owe a bare
//!    barrier first (`depends_on_flush`), except where a crash could only show what the guest
//!    saw before: a cluster past every byte ever written reads as zeros, and zeros are the old
//!    contents of a guest cluster that read as zeros. Compressed data always needs the barrier
//!    (a torn stream does not decompress), and so does a cluster zeroed before its zero flag is
//!    cleared. Allocating writes write their data without the lock (`datapath.rs`,
//!    `write_allocating`) into reserved clusters and link the entries only after that write
//!    returned, under the lock: a flush running meanwhile finds no entry naming the data yet.
//!    Mutants: `data-barrier`, `virgin-check`, `compressed-barrier`, `zero-alloc-barrier`,
//!    `par-early-link`.
//! 4. **The file length is stable before an entry naming a cluster past the old end.** A run
//!    extends the file when it is reserved (`file_grown`); the next entry naming a cluster of it
//!    waits for a barrier. Mutant: `len-pending`.
//! 5. **New tables are stable before what switches to them.** New refcount blocks before their
//!    refcount-table entry, a grown refcount table or L1 table before the header switch (one
//!    write inside sector 0): in `alloc.rs` and `mapping.rs`. Mutants: `refblock-barrier`,
//!    `reftable-barrier`, `l1-grow-barrier`.
//! 6. **Lazy refcounts.** The dirty bit is written and stable before the first L2 or refcount
//!    change of every session ([`State::mark_dirty`]); the next read-write open after a crash
//!    rebuilds the refcounts. Mutant: `dirty-bit`.
//! 7. **A failed fdatasync poisons the image** (`host.rs`): the kernel may have dropped pages
//!    it could not write, so nothing more is written or claimed durable until the image is
//!    reopened. That includes a group-commit flush whose final fdatasync, running outside the
//!    lock, succeeded while another thread's barrier failed (the kernel reports a writeback
//!    error to one caller only): it fails too (`GroupCommit::flush`). Mutant: `failed-flush`;
//!    the `flush_window` fault runs catch the concurrent case.
//!
//! Not a rule: the space that `alloc.rs` reserves ahead of allocating writes on an O_DIRECT
//! file (`HostFile::preallocate_ahead`, fallocate with KEEP_SIZE) and gives back at close
//! (punching holes that read as zeros). Both stay inside the length the run set, over bytes
//! never written, so neither the bytes nor the length of the file depend on whether they
//! reached the disk: every crash image is one without them. A crash only keeps the reserved
//! blocks allocated (the file occupies more; `qemu-img check` sees nothing).
//!
//! # A flush
//!
//! Epoch 1 (only when an L1 entry, or a linked L2 table with a dependency, waits for it):
//! refcount blocks and new, unlinked L2 tables are written, then a barrier: every refcount
//! increase, every new table and every piece of data that a pointer will name is now stable.
//! Epoch 2: the refcount blocks changed since, the L2 tables and the L1 entries are written, then
//! the final barrier. Then the frees queued before the flush are applied in memory, and freed
//! clusters are punched out of the file before anything can reuse them. So a guest flush costs
//! two fdatasyncs after allocations, one after pure overwrites, none when nothing changed.
//!
//! # Group commit
//!
//! The final barrier of a guest flush runs outside the state lock ([`GroupCommit`]), so other
//! threads go on reading, writing and allocating meanwhile, and their writes share the next
//! flush. What they change during the barrier is not covered by it: `epoch` counts every change
//! of ordering state, and [`State::flush_end`] marks the dependencies satisfied only if the epoch
//! is still the one the flush began with. New L2 tables are marked linked before their L1
//! entries are written (not after the final barrier), so that an entry another thread adds
//! during the barrier, and an eviction writes, waits for its dependencies like any other.
//! Check, repair, resize and close wait for a flush in progress and keep new ones from starting
//! ([`GroupCommit::quiesce`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::cache::Kind;
use crate::error::{Error, Result};
use crate::format::header;
use crate::mutants::active as mutant;
use crate::offset::{HostCluster, HostOffset};
use crate::state::State;

/// What the next flush owes: ordering state that is not yet stable.
#[derive(Default)]
pub(crate) struct Pending {
    /// Refcount increases in the cache that are not yet stable.
    refcount_raised: bool,
    /// The file was extended and the new length is not yet stable.
    file_grown: bool,
    /// Bumped whenever ordering state changes (pending increases, dependencies, new tables,
    /// L1 changes, deferred frees): a flush whose final barrier ran outside the lock marks that
    /// state stable only if nothing changed meanwhile.
    epoch: u64,
    /// Reference drops waiting for their pointer removal to become stable.
    frees: Vec<(HostCluster, bool)>,
}

impl Pending {
    /// A refcount was raised in the cache.
    pub(crate) fn refcount_raised(&mut self) {
        self.refcount_raised = true;
        self.epoch += 1;
    }
    /// The file was extended.
    pub(crate) fn file_grown(&mut self) {
        self.file_grown = true;
        self.epoch += 1;
    }
    /// Some other ordering state changed (a dependency, a new table, an L1 entry).
    pub(crate) fn changed(&mut self) {
        self.epoch += 1;
    }
    /// Drop a reference to `c` once the pointer removal is stable (punching it out of the file
    /// if it becomes free and `discard` is set).
    pub(crate) fn defer_free(&mut self, c: HostCluster, discard: bool) {
        self.frees.push((c, discard));
        self.epoch += 1;
    }
}

/// What a flush wrote before its final barrier, to be marked stable after it.
pub(crate) struct FlushTicket {
    epoch: u64,
    unlinked: Vec<HostOffset>,
    frees: Vec<(HostCluster, bool)>,
}

impl State {
    /// Lazy refcounts: make the dirty bit stable before the first metadata change of the
    /// session (every L2 entry change and every refcount change calls this), so that any crash
    /// state whose refcounts lag behind its tables is rebuilt on the next open.
    pub(crate) fn mark_dirty(&mut self) -> Result<()> {
        if !self.access.lazy() || self.header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            return Ok(());
        }
        self.write_header(header::INCOMPAT_FIELD, "header (dirty bit)", |h| {
            h.incompatible_features |= header::INCOMPAT_DIRTY
        })?;
        self.file.barrier()
    }

    /// `mark_dirty`, for the changes that do not create an L2 table.
    pub(crate) fn mark_dirty_any(&mut self) -> Result<()> {
        if mutant("dirty-bit") {
            return Ok(());
        }
        self.mark_dirty()
    }

    /// Before an L2 entry is pointed at a newly allocated cluster: the entry may only reach
    /// the disk after the cluster's refcount (rule 1), after the file length (rule 4) and,
    /// with `data_barrier`, after the data written there (rule 3).
    pub(crate) fn order_entry_update(&mut self, data_barrier: bool) -> Result<()> {
        if !self.access.lazy() && self.pending.refcount_raised && !mutant("l2-refcount-dep") {
            self.caches.set_dependency(&mut self.file, Kind::L2)?;
            self.pending.changed();
        }
        let data_barrier = data_barrier && !mutant("data-barrier");
        let file_grown = self.pending.file_grown && !mutant("len-pending");
        if data_barrier || file_grown {
            self.caches.set_depends_on_flush(Kind::L2);
            self.pending.changed();
        }
        Ok(())
    }

    /// Before an L2 entry is changed to name data just written into a cluster it already
    /// names (a zeroed preallocated cluster, new subclusters): the data first (rule 3).
    pub(crate) fn order_after_data(&mut self) {
        self.caches.set_depends_on_flush(Kind::L2);
        self.pending.changed();
    }

    /// Make everything durable: both epochs and the final barrier, under the lock.
    pub(crate) fn flush_inner(&mut self) -> Result<()> {
        if let Some(t) = self.flush_begin()? {
            if let Err(e) = self.file.barrier() {
                self.failed_final_barrier(t);
                return Err(e);
            }
            self.flush_end(t)?;
        }
        Ok(())
    }

    /// The final barrier of the flush begun with `t` failed: nothing it covered is known to be
    /// stable (and the image is poisoned).
    fn failed_final_barrier(&mut self, t: FlushTicket) {
        self.file.data_written_flag().store(true, Ordering::SeqCst);
        self.pending.frees.extend(t.frees);
    }

    /// Everything a flush does before its final barrier: `None` when nothing needs one.
    pub(crate) fn flush_begin(&mut self) -> Result<Option<FlushTicket>> {
        if self.access.read_only() {
            return Ok(None);
        }
        self.file.poisoned()?;
        let lazy = self.access.lazy();
        let data_written = self.file.data_written_flag().load(Ordering::SeqCst);
        let rb_pending =
            !lazy && self.pending.refcount_raised && self.caches.has_dirty(Kind::Refblock);
        if !self.caches.has_dirty(Kind::L2)
            && !self.tables.l1_dirty()
            && !data_written
            && self.pending.frees.is_empty()
            && !rb_pending
        {
            return Ok(None);
        }
        // Epoch 1.
        let need_pre = self.tables.l1_dirty()
            || (self.caches.has_dirty_linked(Kind::L2) && self.caches.has_dependency(Kind::L2));
        if need_pre {
            if !lazy {
                self.caches.write_all(&mut self.file, Kind::Refblock)?;
            }
            self.caches.write_some(&mut self.file, Kind::L2, true)?;
            if !mutant("pre-barrier") {
                self.file.barrier()?;
            }
            self.caches.satisfied(Kind::L2);
            if !lazy {
                self.pending.refcount_raised = false;
            }
            self.pending.file_grown = false;
        }
        // Epoch 2.
        if !lazy {
            self.caches.write_all(&mut self.file, Kind::Refblock)?;
        }
        let mut unlinked = self.caches.unlinked_offsets(Kind::L2);
        if !mutant("unlinked-flag") {
            // The L1 entries naming the new tables are about to be written: from now on a crash
            // may find the tables reachable, so every later change to them must wait for what
            // it points to, like any other table. (Linking them only after the final barrier,
            // which runs outside the lock, let other threads add entries meanwhile that an
            // eviction wrote without their dependencies.)
            self.caches.link_offsets(Kind::L2, &unlinked);
            unlinked.clear();
        }
        self.caches.write_all(&mut self.file, Kind::L2)?;
        self.write_l1_dirty()?;
        // Data writes completed before this point are covered by the barrier that follows.
        self.file.data_written_flag().store(false, Ordering::SeqCst);
        Ok(Some(FlushTicket {
            epoch: self.pending.epoch,
            unlinked,
            frees: std::mem::take(&mut self.pending.frees),
        }))
    }

    /// After the final barrier of a flush begun with `t`: what it wrote is stable.
    pub(crate) fn flush_end(&mut self, t: FlushTicket) -> Result<()> {
        if t.epoch == self.pending.epoch {
            if !self.access.lazy() {
                self.pending.refcount_raised = false;
            }
            self.pending.file_grown = false;
            self.caches.satisfied(Kind::L2);
        }
        self.caches.link_offsets(Kind::L2, &t.unlinked);
        let later = std::mem::replace(&mut self.pending.frees, t.frees);
        let r = self.apply_deferred_frees();
        self.pending.frees.extend(later);
        r
    }

    /// Apply the deferred decreases. Call only right after a barrier that made every pointer
    /// removal so far stable.
    fn apply_deferred_frees(&mut self) -> Result<()> {
        if self.pending.frees.is_empty() {
            return Ok(());
        }
        // Wait for data I/O running outside the lock: none may reach a cluster freed here.
        let gate = self.file.io_gate();
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        let mut list = std::mem::take(&mut self.pending.frees).into_iter();
        while let Some((c, discard)) = list.next() {
            if let Err(e) = self.release_cluster(c, discard) {
                // Not applied (the refcount change failed): keep it and the rest for later.
                self.pending.frees.push((c, discard));
                self.pending.frees.extend(list);
                self.file.punch_pending();
                return Err(e);
            }
        }
        // Still under the exclusive gate: no data I/O can reach what is punched out.
        self.file.punch_pending();
        Ok(())
    }

    /// Close: give back the unused run, flush, write the refcounts lazy mode held back, clear
    /// the dirty bit, and in unsafe mode sync once.
    pub(crate) fn close_inner(&mut self) -> Result<()> {
        if self.access.close() || self.access.read_only() {
            return Ok(());
        }
        // After a failed fdatasync nothing more is written (and no sync claims success).
        self.file.poisoned()?;
        // Give back the unused run first (nothing points into it), so its refcounts go out
        // with the rest; if it sits at the end of the file, trim the file too.
        self.trim_unused_run()?;
        self.return_run()?;
        self.file.release_reserved();
        // In unsafe mode nothing was promised before close: write everything, sync once.
        let unsafe_mode = self.file.barriers_off();
        self.flush_inner()?;
        if self.caches.has_dirty(Kind::Refblock) {
            self.caches.write_all(&mut self.file, Kind::Refblock)?;
            if !unsafe_mode {
                self.file.barrier()?;
            }
        }
        if self.access.lazy() && self.header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            // Refcounts are stable now (in unsafe mode: with the final sync).
            self.write_header(header::INCOMPAT_FIELD, "header (clear dirty bit)", |h| {
                h.incompatible_features &= !header::INCOMPAT_DIRTY
            })?;
            if !unsafe_mode {
                self.file.barrier()?;
            }
        }
        if unsafe_mode {
            self.file.enable_barriers();
            self.file.barrier()?;
        }
        Ok(())
    }
}

/// Group commit, as QEMU's bdrv_co_flush does it: at most one flush runs at a time, and a
/// flush that began after a write completed covers it.
pub(crate) struct GroupCommit {
    state: Mutex<CommitState>,
    cv: Condvar,
    /// Completed guest writes (and flush requests), numbered.
    write_seq: AtomicU64,
}

#[derive(Default)]
struct CommitState {
    running: bool,
    /// The write sequence number that the last completed flush covers.
    done: u64,
}

impl GroupCommit {
    pub(crate) fn new() -> GroupCommit {
        GroupCommit {
            state: Mutex::new(CommitState::default()),
            cv: Condvar::new(),
            write_seq: AtomicU64::new(0),
        }
    }

    fn commit_state(&self) -> MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest write (or a flush request) completed.
    pub(crate) fn write_done(&self) {
        self.write_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Make every write completed so far durable. Waits for a flush in progress; returns at
    /// once when a flush that began after our writes completed made them stable; otherwise runs
    /// one, with its final fdatasync outside the state lock, so that other threads keep reading,
    /// writing and allocating meanwhile and their writes share the next flush.
    pub(crate) fn flush(&self, state: &Mutex<State>) -> Result<()> {
        let want = self.write_seq.load(Ordering::SeqCst);
        {
            let mut g = self.commit_state();
            loop {
                if g.done >= want {
                    return Ok(());
                }
                if !g.running {
                    g.running = true;
                    break;
                }
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        let covers = self.write_seq.load(Ordering::SeqCst);
        let res = (|| -> Result<()> {
            let (t, storage, name, barriers_off) = {
                let mut s = crate::state::lock(state);
                let t = s.flush_begin()?;
                (
                    t,
                    s.file.storage().clone(),
                    s.file.shared_name(),
                    s.file.barriers_off(),
                )
            };
            let Some(t) = t else {
                return Ok(());
            };
            if !barriers_off {
                if let Err(e) = storage.flush() {
                    let mut s = crate::state::lock(state);
                    s.file.poison(&e);
                    s.failed_final_barrier(t);
                    return Err(Error::io(&name, "flush", e));
                }
            }
            let mut s = crate::state::lock(state);
            if let Err(e) = s.file.poisoned() {
                // A barrier on another thread failed while this fdatasync ran outside the
                // lock. The kernel may have dropped pages this flush covered and reports that
                // to one caller only: this flush's success proves nothing (rule 7).
                s.failed_final_barrier(t);
                return Err(e);
            }
            s.flush_end(t)
        })();
        let mut g = self.commit_state();
        g.running = false;
        if res.is_ok() {
            g.done = g.done.max(covers);
        }
        self.cv.notify_all();
        res
    }

    /// Wait until no flush is between its two halves (its final fdatasync runs outside the
    /// state lock, holding a ticket of deferred frees) and keep new ones from starting until the
    /// returned guard is dropped. For the operations that must see the whole state settled:
    /// check and repair, resize, close.
    pub(crate) fn quiesce(&self) -> Quiet<'_> {
        let mut g = self.commit_state();
        while g.running {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.running = true;
        Quiet(self)
    }
}

/// Held while no group-commit flush may run (see [`GroupCommit::quiesce`]).
pub(crate) struct Quiet<'a>(&'a GroupCommit);

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        let mut g = self.0.commit_state();
        g.running = false;
        self.0.cv.notify_all();
    }
}
