//! Cluster allocation and refcount updates: the refcount table, free-space search, the reserved
//! run, compressed packing, refcount block creation and refcount table growth.
//!
//! Crash analysis:
//! - A cluster's refcount is raised (in the refcount-block cache) before any L2/L1 entry points
//!   at it; the L2 cache then depends on the refcount cache, so the raise is stable first. A crash
//!   in between leaks the cluster.
//! - A new refcount block is written and made stable before the refcount-table entry naming it
//!   is written. A crash in between leaks the block's cluster.
//! - A grown refcount table (with the refcount blocks describing it) is written and made stable
//!   before the header is switched to it with one write inside sector 0. The old table is freed
//!   after the switch is stable.
//! - Decreases (freeing) are only made after the pointer removal is stable: they are deferred
//!   to the end of the next flush (`flush.rs`), and the refcount cache depends on the L2 cache.
//! - A run's clusters lie inside the file (it is extended over them when the run is reserved),
//!   and the new length is stable before any pointer to them is (`len_pending` in `flush.rs`).

use crate::cache::Kind;
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::l2::{self, MAX_HOST_OFFSET};
use crate::format::refcount::{self, REFT_OFFSET_MASK};
use crate::format::{self as fmt};
use crate::mutants::active as mutant;
use crate::offset::{HostCluster, HostOffset};
use crate::state::State;

/// Free-space state: the refcount table in memory, where to search, the reserved run.
pub(crate) struct Allocator {
    reftable: Vec<u64>,
    /// No cluster below this one is free.
    free_cluster_index: HostCluster,
    /// `(c, min)`: no run of `min` or more free clusters starts below cluster `c` (0: none
    /// known). First fit for a run of `min` or more starts there instead of at
    /// `free_cluster_index`, so that a small hole there is not the start of a scan across
    /// everything allocated after it, at every allocation (preallocating a 512-byte-cluster
    /// image was quadratic). A cluster freed below `c` forgets it.
    run_hint: (HostCluster, u64),
    /// One past the highest cluster ever allocated.
    alloc_end: HostCluster,
    /// Clusters reserved (refcount raised) and not yet handed out: `run.0..run.1`.
    run: (HostCluster, HostCluster),
    /// Where the next compressed cluster may be packed (inside a host cluster holding only
    /// compressed data written this session); 0 when none. Reset when that cluster loses a
    /// reference: it may become free and be reused.
    comp_pos: HostOffset,
}

impl Allocator {
    pub(crate) fn new(reftable: Vec<u64>, file_clusters: u64) -> Allocator {
        Allocator {
            reftable,
            free_cluster_index: HostCluster::new(0),
            run_hint: (HostCluster::new(0), 0),
            alloc_end: HostCluster::new(file_clusters),
            run: (HostCluster::new(0), HostCluster::new(0)),
            comp_pos: HostOffset::new(0),
        }
    }
    /// The refcount table entries.
    pub(crate) fn reftable(&self) -> &[u64] {
        &self.reftable
    }
    /// One past the highest cluster ever allocated.
    pub(crate) fn alloc_end(&self) -> HostCluster {
        self.alloc_end
    }
    fn run_is_empty(&self) -> bool {
        self.run.0 >= self.run.1
    }
}

impl State {
    /// Validate a metadata offset read from the image (refcount block, L2 table); `at` is where
    /// it was read.
    pub(crate) fn check_meta_offset(&self, off: HostOffset, what: &str, at: u64) -> Result<()> {
        let cluster_size = self.geo.cluster_size();
        if !self.geo.is_cluster_aligned(off) || off.get() == 0 || off.get() >= MAX_HOST_OFFSET {
            return Err(Error::corrupt(
                self.name(),
                format!("{what} offset {off:#x} is invalid (not cluster aligned or out of range)"),
                at,
            ));
        }
        let len = self.file.len();
        // A damaged image may end inside the cluster: the rest reads as zeros.
        let need = if self.file.damaged() { 1 } else { cluster_size };
        if off.checked_add(need).is_none_or(|end| end.get() > len) {
            return Err(Error::corrupt(
                self.name(),
                format!("{what} at {off:#x} lies past the end of the file ({len} bytes)"),
                at,
            ));
        }
        Ok(())
    }

    /// The refcount block covering `c`, if it exists (validated).
    fn refcount_block(&self, c: HostCluster) -> Result<Option<HostOffset>> {
        let ri = self.geo.refcount_table_index(c);
        let Some(&e) = self.alloc.reftable.get(ri as usize) else {
            return Ok(None);
        };
        let block = e & REFT_OFFSET_MASK;
        if block == 0 {
            return Ok(None);
        }
        let block = HostOffset::new(block);
        self.check_meta_offset(
            block,
            "refcount block",
            self.header.refcount_table_offset + ri * 8,
        )?;
        Ok(Some(block))
    }

    /// Refcount of a host cluster (0 where no refcount block exists).
    pub(crate) fn refcount(&mut self, c: HostCluster) -> Result<u64> {
        let Some(block) = self.refcount_block(c)? else {
            return Ok(0);
        };
        let i = self
            .caches
            .get(&mut self.file, Kind::Refblock, block, false)?;
        Ok(refcount::get(
            self.caches.data(Kind::Refblock, i),
            self.geo.refcount_block_index(c),
            self.geo.refcount_order(),
        ))
    }

    /// Set a refcount whose refcount block exists.
    pub(crate) fn store_refcount(&mut self, c: HostCluster, value: u64) -> Result<()> {
        let ri = self.geo.refcount_table_index(c) as usize;
        let block = HostOffset::new(self.alloc.reftable[ri] & REFT_OFFSET_MASK);
        let i = self
            .caches
            .get(&mut self.file, Kind::Refblock, block, false)?;
        let (idx, order) = (self.geo.refcount_block_index(c), self.geo.refcount_order());
        if value > 0
            && !mutant("punch-late")
            && refcount::get(self.caches.data(Kind::Refblock, i), idx, order) == 0
        {
            // A free cluster about to be used must not be punched out afterwards.
            self.file.punch_pending();
        }
        refcount::set(self.caches.data_mut(Kind::Refblock, i), idx, order, value);
        if value == 0 && c < self.alloc.run_hint.0 {
            self.alloc.run_hint = (HostCluster::new(0), 0);
        }
        Ok(())
    }

    /// Add `delta` to a cluster's refcount. Increases create refcount blocks as needed.
    /// Decreases are ordered after the pointer removal (refcount cache depends on L2 cache).
    pub(crate) fn change_refcount(&mut self, c: HostCluster, delta: i64) -> Result<u64> {
        if !mutant("dirty-bit") {
            self.mark_dirty()?;
        }
        if delta > 0 {
            while self.ensure_refblock(c)? {}
        }
        let old = self.refcount(c)?;
        let at = self.geo.host_offset(c).get();
        let cluster = c.get();
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= refcount::max(self.geo.refcount_order()))
                .ok_or_else(|| {
                    Error::corrupt(
                        self.name(),
                        format!(
                            "refcount of cluster {cluster} would overflow {} bits",
                            self.header.refcount_bits()
                        ),
                        at,
                    )
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(
                    self.name(),
                    format!("refcount of cluster {cluster} would drop below zero"),
                    at,
                )
            })?
        };
        if delta > 0 {
            self.pending.refcount_raised();
        }
        self.store_refcount(c, new)?;
        if new == 0 && c < self.alloc.free_cluster_index {
            self.alloc.free_cluster_index = c;
        }
        Ok(new)
    }

    /// Drop one reference to each of the `n` clusters at `host`, once the pointer removal that
    /// dropped it is stable: the decrease is deferred to the end of the next flush ("free does
    /// not mean free"), so the cluster is not reused, nor its refcount lowered on disk, while a
    /// stable pointer may still name it. Clusters that become free are then punched out of the
    /// host file when `discard` is set, before anything can reuse them.
    pub(crate) fn free_clusters(&mut self, host: HostOffset, n: u64, discard: bool) -> Result<()> {
        let first = self.geo.host_cluster(host);
        // No more compressed data is packed into a cluster that may become free.
        let packing = self.geo.host_cluster(self.alloc.comp_pos);
        if first <= packing && packing < first + n && !mutant("comp-pos") {
            self.alloc.comp_pos = HostOffset::new(0);
        }
        if mutant("deferred-frees") {
            let r = (0..n).try_for_each(|i| self.release_cluster(first + i, discard));
            self.file.punch_pending();
            return r;
        }
        for i in 0..n {
            self.pending.defer_free(first + i, discard);
        }
        Ok(())
    }

    /// Drop one reference to cluster `c` now; if it became free, forget what the caches hold
    /// for it and punch it out of the file when `discard` is set.
    pub(crate) fn release_cluster(&mut self, c: HostCluster, discard: bool) -> Result<()> {
        let left = self.change_refcount(c, -1)?;
        if left == 0 {
            let off = self.geo.host_offset(c);
            self.caches.forget(Kind::L2, off);
            self.caches.forget(Kind::Refblock, off);
            if !mutant("comp-cache") {
                self.decompressed.clear();
            }
            self.meta.freed(c);
            if discard {
                self.file.punch(off, self.geo.cluster_size());
            }
        }
        Ok(())
    }

    /// One cluster from the reserved run, reserving a new run when it is used up.
    ///
    /// Batched allocation: a run's refcounts are raised together, so one refcount-block write
    /// and one barrier cover many allocations. A crash leaks at most the unused rest of the run.
    pub(crate) fn alloc_run_cluster(&mut self) -> Result<HostOffset> {
        if self.alloc.run_is_empty() {
            // Reuse free gaps of any size: the run is the first free extent, up to its length.
            let max = ((16u64 << 20) / self.geo.cluster_size()).clamp(8, 1024);
            let (start, n) = self.alloc_extent(1, max)?;
            let first = self.geo.host_cluster(start);
            // Extend the file over the run now: its clusters then read as zeros, and the new
            // length is stable by the time any pointer to them is (the raised refcounts make
            // the L2 cache wait for a barrier issued after this).
            let end = start + n * self.geo.cluster_size();
            if end.get() > self.file.len() {
                if let Err(e) = self.file.set_len(end.get(), "extend file") {
                    // Nothing points into the run yet: give it back at once.
                    for i in (0..n).rev() {
                        self.change_refcount(first + i, -1)?;
                    }
                    return Err(e);
                }
                self.pending.file_grown();
            }
            self.alloc.run = (first, first + n);
            self.file.new_run(start, end);
        }
        let c = self.alloc.run.0;
        self.alloc.run.0 += 1;
        let off = self.geo.host_offset(c);
        self.file.preallocate_ahead(off, self.geo.cluster_size());
        Ok(off)
    }

    /// Give back the unused part of the run (nothing points there: the decrease is immediate).
    pub(crate) fn return_run(&mut self) -> Result<()> {
        let (start, end) = std::mem::take(&mut self.alloc.run);
        if start < end {
            self.file.unreserve(self.geo.host_offset(start));
        }
        for i in (0..end - start).rev() {
            self.change_refcount(start + i, -1)?;
        }
        Ok(())
    }

    /// At close: if the unused run sits at the end of the file, cut the file back to the end
    /// of what was written (nothing points into the run).
    pub(crate) fn trim_unused_run(&mut self) -> Result<()> {
        let (start, end) = self.alloc.run;
        if start >= end || self.geo.host_offset(end).get() != self.file.len() {
            return Ok(());
        }
        let cluster_size = self.geo.cluster_size();
        let keep = self
            .geo
            .host_offset(start)
            .get()
            .max(self.file.written_end().div_ceil(cluster_size) * cluster_size);
        if keep < self.file.len() {
            self.file.set_len(keep, "trim file")?;
        }
        Ok(())
    }

    /// Allocate `n` contiguous clusters, each with refcount 1. Returns the host offset.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<HostOffset> {
        Ok(self.alloc_extent(n, n)?.0)
    }

    /// First fit: the first run of at least `min` free clusters, taking up to `max` of them,
    /// each with refcount 1. Returns the host offset and the number of clusters.
    pub(crate) fn alloc_extent(&mut self, min: u64, max: u64) -> Result<(HostOffset, u64)> {
        'restart: loop {
            let mut start = self.alloc.free_cluster_index.max(HostCluster::new(1));
            let (hint, hint_min) = self.alloc.run_hint;
            if min >= hint_min && hint > start {
                start = hint;
            }
            let from_index = start == self.alloc.free_cluster_index.max(HostCluster::new(1));
            let mut first_free = None;
            let mut run = 0;
            let mut c = start;
            // One refcount block at a time: a block that does not exist yet covers only free
            // clusters, and a cached block is scanned without a cache lookup per cluster (this
            // loop runs under the image lock for every allocation).
            let (per_block, order) = (self.geo.refcounts_per_block(), self.geo.refcount_order());
            'scan: while run < max {
                let idx = self.geo.refcount_block_index(c);
                let span = per_block - idx as u64;
                let Some(block) = self.refcount_block(c)? else {
                    let take = span.min(max - run);
                    first_free.get_or_insert(c);
                    if run == 0 {
                        start = c;
                    }
                    run += take;
                    c += take;
                    continue;
                };
                let i = self
                    .caches
                    .get(&mut self.file, Kind::Refblock, block, false)?;
                let data = self.caches.data(Kind::Refblock, i);
                for k in 0..span {
                    if run >= max {
                        break 'scan;
                    }
                    if refcount::get(data, idx + k as usize, order) == 0 {
                        first_free.get_or_insert(c);
                        if run == 0 {
                            start = c;
                        }
                        run += 1;
                    } else if run >= min {
                        break 'scan;
                    } else {
                        run = 0;
                    }
                    c += 1;
                }
            }
            let n = run;
            if self.geo.host_offset(start + n).get() > MAX_HOST_OFFSET {
                return Err(Error::NoSpace {
                    file: self.name().to_string(),
                    context: "cluster allocation past the largest host offset".into(),
                });
            }
            self.check_overlap(start, n)?;
            for i in 0..n {
                if self.ensure_refblock(start + i)? {
                    continue 'restart;
                }
            }
            for i in 0..n {
                self.store_refcount(start + i, 1)?;
            }
            self.pending.refcount_raised();
            let a = &mut self.alloc;
            if start == a.free_cluster_index || a.free_cluster_index.get() == 0 {
                a.free_cluster_index = start + n;
            } else if from_index {
                // Scanned from the first free cluster: every cluster before the first free one
                // met is in use (and the run taken is in use now).
                a.free_cluster_index = match first_free {
                    Some(f) if f != start => f,
                    _ => start + n,
                };
            }
            a.alloc_end = a.alloc_end.max(start + n);
            // First fit: no run of `min` free clusters starts before this one, and it is used now.
            a.run_hint = (start + n, min);
            return Ok((self.geo.host_offset(start), n));
        }
    }

    /// Refuse to hand out clusters that hold metadata we know about: their refcounts are wrong,
    /// and writing there would destroy the image. Besides the tables the header names, this
    /// covers refcount blocks, the active L2 tables and the encryption header
    /// (`State::is_metadata`): a refcount block or an L2 table whose own refcount was 0 was
    /// handed out, and guest data or a new L2 table written over it.
    fn check_overlap(&mut self, start: HostCluster, n: u64) -> Result<()> {
        if let Some(i) = (0..n).find(|&i| self.is_metadata(start + i)) {
            let at = self.geo.host_offset(start + i).get();
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "Preventing invalid allocation of the cluster at {at:#x}: it holds metadata but its refcount is 0 (run check -r all)"
                ),
                at,
            ));
        }
        let cluster_size = self.geo.cluster_size();
        let a = self.geo.host_offset(start).get();
        let b = self.geo.host_offset(start + n).get();
        let h = &*self.header;
        let tables = [
            (0, cluster_size),
            (h.l1_table_offset, h.l1_size as u64 * 8),
            (
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * cluster_size,
            ),
            (h.snapshots_offset, self.snapshots.table_size()),
        ];
        let snapshot_l1s = self
            .snapshots
            .entries()
            .iter()
            .map(|e| (e.l1_table_offset, e.l1_size as u64 * 8));
        for (off, len) in tables.into_iter().chain(snapshot_l1s) {
            if len > 0 && off < b && a < off + len {
                return Err(Error::corrupt(
                    self.name(),
                    format!(
                        "Preventing invalid allocation of clusters at {a:#x}: they hold metadata but their refcount is 0 (run check -r all)"
                    ),
                    a,
                ));
            }
        }
        Ok(())
    }

    /// Make sure the refcount block covering `c` exists. Returns true if anything was
    /// allocated (callers that picked free clusters must pick again).
    pub(crate) fn ensure_refblock(&mut self, c: HostCluster) -> Result<bool> {
        let ri = self.geo.refcount_table_index(c);
        if ri >= self.alloc.reftable.len() as u64 {
            self.grow_reftable(ri + 1)?;
            return Ok(true);
        }
        if self.alloc.reftable[ri as usize] & REFT_OFFSET_MASK != 0 {
            return Ok(false);
        }
        // Place the new block at the first free cluster.
        let mut b = self.alloc.free_cluster_index.max(HostCluster::new(1));
        while self.refcount(b)? != 0 {
            b += 1;
        }
        self.check_overlap(b, 1)?;
        // Every cluster before `b` is in use: the next search need not look there again.
        self.alloc.free_cluster_index = b;
        let self_describing = self.geo.refcount_table_index(b) == ri;
        if !self_describing {
            // The block lands in another range: that range needs its own block first.
            if self.ensure_refblock(b)? {
                return Ok(true);
            }
            self.store_refcount(b, 1)?;
            // The refcount of the block's own cluster must be stable before the table names it.
            self.caches.flush(&mut self.file, Kind::Refblock)?;
        }
        let mut block = vec![0u8; self.geo.cluster_size() as usize];
        if self_describing {
            refcount::set(
                &mut block,
                self.geo.refcount_block_index(b),
                self.geo.refcount_order(),
                1,
            );
        }
        let off = self.geo.host_offset(b);
        self.file.write_meta(&block, off, "new refcount block")?;
        if !mutant("refblock-barrier") {
            self.file.barrier()?;
        }
        // In memory only once written: a failed write is retried by the next allocation (which
        // picks the same free cluster), instead of leaving a table that only memory knows.
        let entry_at = HostOffset::new(self.header.refcount_table_offset + ri * 8);
        self.file
            .write_meta(&fmt::u64_bytes(off.get()), entry_at, "refcount table entry")?;
        self.meta.note(b);
        self.alloc.reftable[ri as usize] = off.get();
        self.alloc.alloc_end = self.alloc.alloc_end.max(b + 1);
        Ok(true)
    }

    /// Grow the refcount table to at least `min_entries`, placing the new table and the refcount
    /// blocks that describe it in a fresh area past every allocation, the end of the file and
    /// what the old table covers.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cluster_size = self.geo.cluster_size();
        let per = self.geo.refcounts_per_block();
        let old_entries = self.alloc.reftable.len() as u64;
        // Past everything allocated, the file, and what the old table covers (as QEMU places
        // it): a cluster the old table covers may have a refcount although it lies past the
        // end of the file (an L2 entry naming a data cluster whose write the file lost in a
        // crash), and the new structures must not share it.
        let area = self
            .alloc
            .alloc_end
            .get()
            .max(self.geo.clusters_for(self.file.len()))
            .max(old_entries.saturating_mul(per));
        let mut table_entries = min_entries.max(old_entries);
        let (mut nb, mut nt);
        loop {
            nt = (table_entries * 8).div_ceil(cluster_size);
            // Ranges covering [area, area+nb+nt) that lack a block.
            let mut guess = 0;
            loop {
                let end = area + guess + nt;
                let first = area / per;
                let last = (end - 1) / per;
                let missing = (first..=last)
                    .filter(|&r| {
                        r >= old_entries || self.alloc.reftable[r as usize] & REFT_OFFSET_MASK == 0
                    })
                    .count() as u64;
                if missing == guess {
                    nb = missing;
                    break;
                }
                guess = missing;
            }
            let last_range = (area + nb + nt - 1) / per;
            let need = table_entries.max(last_range + 1);
            if need == table_entries && (need * 8).div_ceil(cluster_size) == nt {
                break;
            }
            table_entries = need;
        }
        if nt > header::MAX_REFTABLE_BYTES / cluster_size {
            return Err(Error::NoSpace {
                file: self.name().to_string(),
                context: "refcount table would exceed its 8 MiB limit".into(),
            });
        }
        let table_entries = nt * cluster_size / 8;
        let mut new_table = self.alloc.reftable.clone();
        new_table.resize(table_entries as usize, 0);
        // Assign blocks to the missing ranges, in order, at the start of the area.
        let first = area / per;
        let last = (area + nb + nt - 1) / per;
        let mut next = area;
        // The area may hold freed clusters: punch them out now, not over the new tables.
        if !mutant("punch-late") {
            self.file.punch_pending();
        }
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for r in first..=last {
            if new_table[r as usize] & REFT_OFFSET_MASK == 0 {
                new_table[r as usize] = next * cluster_size;
                new_blocks.push((r, vec![0u8; cluster_size as usize]));
                next += 1;
            }
        }
        let table_off = HostOffset::new(next * cluster_size);
        // Refcounts of the area: in new blocks directly, in existing blocks through the cache.
        for c in area..area + nb + nt {
            let r = c / per;
            if let Some((_, b)) = new_blocks.iter_mut().find(|(br, _)| *br == r) {
                refcount::set(b, (c % per) as usize, self.geo.refcount_order(), 1);
            } else {
                self.store_refcount(HostCluster::new(c), 1)?;
            }
        }
        for (r, b) in &new_blocks {
            let at = HostOffset::new(new_table[*r as usize]);
            self.file.write_meta(b, at, "new refcount block")?;
        }
        self.file.write_meta(
            &fmt::encode_table(&new_table),
            table_off,
            "new refcount table",
        )?;
        if mutant("reftable-barrier") {
            self.caches.write_all(&mut self.file, Kind::Refblock)?;
        } else {
            self.caches.flush(&mut self.file, Kind::Refblock)?;
        }
        // Switch: one write inside sector 0.
        let old_off = HostOffset::new(self.header.refcount_table_offset);
        let old_clusters = self.header.refcount_table_clusters as u64;
        self.write_header(
            header::REFTABLE_FIELDS,
            "header (refcount table switch)",
            |h| {
                h.refcount_table_offset = table_off.get();
                h.refcount_table_clusters = nt as u32;
            },
        )?;
        self.alloc.reftable = new_table;
        self.meta.invalidate();
        self.alloc.alloc_end = self.alloc.alloc_end.max(HostCluster::new(area + nb + nt));
        self.file.barrier()?;
        self.free_clusters(old_off, old_clusters, true)?;
        Ok(())
    }

    /// Where `len` bytes of compressed data go: packed after the last compressed cluster when
    /// they fit in its host cluster (and that cluster's refcount can count one more), else at
    /// the start of a new cluster. Call [`State::compressed_written`] once they are written.
    pub(crate) fn alloc_compressed(&mut self, len: u64) -> Result<HostOffset> {
        let cluster_size = self.geo.cluster_size();
        let pos = self.alloc.comp_pos;
        let packing = self.geo.host_cluster(pos);
        let pack = !self.geo.is_cluster_aligned(pos)
            && pos.get() % cluster_size + len <= cluster_size
            && l2::compressed_fits(pos.get(), len, self.geo.cluster_bits())
            && self.refcount(packing)? < refcount::max(self.geo.refcount_order());
        let off = if pack {
            self.change_refcount(packing, 1)?;
            pos
        } else {
            self.alloc_run_cluster()?
        };
        // Until the data is written, nothing more is packed there.
        self.alloc.comp_pos = HostOffset::new(0);
        Ok(off)
    }

    /// Compressed data now ends at `end`: the next compressed cluster may be packed there.
    pub(crate) fn compressed_written(&mut self, end: HostOffset) {
        self.alloc.comp_pos = end;
    }

    /// After repair rebuilt the refcount structures: the new table, and the end of the area
    /// it was placed in.
    pub(crate) fn install_rebuilt_reftable(&mut self, table: Vec<u64>, end: HostCluster) {
        self.alloc.reftable = table;
        self.alloc.alloc_end = end;
        self.alloc.free_cluster_index = HostCluster::new(0);
        self.alloc.run_hint = (HostCluster::new(0), 0);
    }

    /// Repair may rewrite anything: forget where compressed data was being packed.
    pub(crate) fn forget_packing(&mut self) {
        self.alloc.comp_pos = HostOffset::new(0);
    }
}
