//! Cluster allocation and refcount updates.
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
//! - Decreases (freeing) are only made after the pointer removal is stable: the refcount cache
//!   depends on the L2 cache.

use crate::cache::Kind;
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::l2::MAX_HOST_OFFSET;
use crate::format::refcount::{self, REFT_OFFSET_MASK};
use crate::format::{self as fmt};
use crate::image::State;
use crate::mutants::active as mutant;

impl State {
    /// Validate a metadata offset read from the image (refcount block, L2 table).
    pub(crate) fn check_meta_offset(&self, off: u64, what: &str, at: u64) -> Result<()> {
        if !off.is_multiple_of(self.cs) || off == 0 || off >= MAX_HOST_OFFSET {
            return Err(Error::corrupt(
                &self.name,
                format!("{what} offset {off:#x} is invalid (not cluster aligned or out of range)"),
                at,
            ));
        }
        let len = self.file_len()?;
        if off.checked_add(self.cs).is_none_or(|end| end > len) {
            return Err(Error::corrupt(
                &self.name,
                format!("{what} at {off:#x} lies past the end of the file ({len} bytes)"),
                at,
            ));
        }
        Ok(())
    }

    /// Refcount of a host cluster (0 where no refcount block exists).
    pub(crate) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let ri = cluster / self.rb_entries;
        if ri >= self.reftable.len() as u64 {
            return Ok(0);
        }
        let rbo = self.reftable[ri as usize] & REFT_OFFSET_MASK;
        if rbo == 0 {
            return Ok(0);
        }
        self.check_meta_offset(rbo, "refcount block", self.h.refcount_table_offset + ri * 8)?;
        let i = self
            .caches
            .get(&*self.storage, &self.name, Kind::Refblock, rbo, false)?;
        let idx = (cluster % self.rb_entries) as usize;
        Ok(refcount::get(
            self.caches.data(Kind::Refblock, i),
            idx,
            self.h.refcount_order,
        ))
    }

    /// Set a refcount whose refcount block exists.
    fn store_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let ri = (cluster / self.rb_entries) as usize;
        let rbo = self.reftable[ri] & REFT_OFFSET_MASK;
        let i = self
            .caches
            .get(&*self.storage, &self.name, Kind::Refblock, rbo, false)?;
        let idx = (cluster % self.rb_entries) as usize;
        refcount::set(
            self.caches.data_mut(Kind::Refblock, i),
            idx,
            self.h.refcount_order,
            value,
        );
        Ok(())
    }

    /// Add `delta` to a cluster's refcount. Increases create refcount blocks as needed.
    /// Decreases are ordered after the pointer removal (refcount cache depends on L2 cache).
    pub(crate) fn change_refcount(&mut self, cluster: u64, delta: i64) -> Result<u64> {
        if !mutant("dirty-bit") {
            self.mark_dirty()?;
        }
        if delta > 0 {
            while self.ensure_refblock(cluster)? {}
        }
        let old = self.refcount(cluster)?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= refcount::max(self.h.refcount_order))
                .ok_or_else(|| {
                    Error::corrupt(
                        &self.name,
                        format!(
                            "refcount of cluster {cluster} would overflow {} bits",
                            self.h.refcount_bits()
                        ),
                        cluster * self.cs,
                    )
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(
                    &self.name,
                    format!("refcount of cluster {cluster} would drop below zero"),
                    cluster * self.cs,
                )
            })?
        };
        if delta > 0 {
            self.incr_pending = true;
            self.meta_epoch += 1;
        }
        self.store_refcount(cluster, new)?;
        if new == 0 && cluster < self.free_cluster_index {
            self.free_cluster_index = cluster;
        }
        Ok(new)
    }

    /// Drop one reference to each of `n` clusters at `host`, once the pointer removal that
    /// dropped it is stable: the decrease is deferred to the end of the next flush ("free does
    /// not mean free"), so the cluster is not reused, nor its refcount lowered on disk, while a
    /// stable pointer may still name it. Clusters that become free are then punched out of the
    /// host file when `discard` is set, before anything can reuse them.
    pub(crate) fn free_clusters(&mut self, host: u64, n: u64, discard: bool) -> Result<()> {
        let first = host / self.cs;
        // No more compressed data is packed into a cluster that may become free.
        if (first..first + n).contains(&(self.comp_pos / self.cs)) && !mutant("comp-pos") {
            self.comp_pos = 0;
        }
        if mutant("deferred-frees") {
            for c in first..first + n {
                self.release_cluster(c, discard)?;
            }
            return Ok(());
        }
        for c in first..first + n {
            self.deferred_frees.push((c, discard));
            self.meta_epoch += 1;
        }
        Ok(())
    }

    /// Drop one reference to cluster `c` now; if it became free, forget what the caches hold
    /// for it and punch it out of the file when `discard` is set.
    fn release_cluster(&mut self, c: u64, discard: bool) -> Result<()> {
        let left = self.change_refcount(c, -1)?;
        if left == 0 {
            self.caches.forget(Kind::L2, c * self.cs);
            self.caches.forget(Kind::Refblock, c * self.cs);
            if !mutant("comp-cache") {
                self.comp_cache = None;
            }
            if self.meta_clusters.as_ref().is_some_and(|m| m.contains(&c)) {
                self.meta_clusters = None;
            }
            // A punch is a hint: if it fails the cluster keeps its old bytes, which is safe
            // (a reused cluster below `written_end` is never taken as reading zeros).
            if discard {
                let _ = self.storage.discard(c * self.cs, self.cs);
            }
        }
        Ok(())
    }

    /// Apply the deferred decreases. Call only right after a barrier that made every pointer
    /// removal so far stable.
    pub(crate) fn apply_deferred_frees(&mut self) -> Result<()> {
        if self.deferred_frees.is_empty() {
            return Ok(());
        }
        // Wait for data I/O running outside the lock: none may reach a cluster freed here.
        let gate = self.io_gate.clone();
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        let mut list = std::mem::take(&mut self.deferred_frees).into_iter();
        while let Some((c, discard)) = list.next() {
            if let Err(e) = self.release_cluster(c, discard) {
                // Not applied (the refcount change failed): keep it and the rest for later.
                self.deferred_frees.push((c, discard));
                self.deferred_frees.extend(list);
                return Err(e);
            }
        }
        Ok(())
    }

    /// One cluster from the reserved run, reserving a new run when it is used up.
    ///
    /// Batched allocation: a run's refcounts are raised together, so one refcount-block write
    /// and one barrier cover many allocations. A crash leaks at most the unused rest of the run.
    pub(crate) fn alloc_run_cluster(&mut self) -> Result<u64> {
        if self.run.is_empty() {
            // Reuse free gaps of any size: the run is the first free extent, up to its length.
            let max = ((16u64 << 20) / self.cs).clamp(8, 1024);
            let (start, n) = self.alloc_extent(1, max)?;
            // Extend the file over the run now: its clusters then read as zeros, and the new
            // length is stable by the time any pointer to them is (the raised refcounts make
            // the L2 cache wait for a barrier issued after this).
            let end = start + n * self.cs;
            if end > self.known_len {
                if let Err(e) = self.storage.set_len(end) {
                    // Nothing points into the run yet: give it back at once.
                    for c in (start / self.cs..start / self.cs + n).rev() {
                        self.change_refcount(c, -1)?;
                    }
                    return Err(Error::io(&self.name, "extend file", e));
                }
                self.known_len = end;
                self.len_pending = true;
                self.meta_epoch += 1;
            }
            self.run = start / self.cs..start / self.cs + n;
        }
        let c = self.run.start;
        self.run.start += 1;
        Ok(c * self.cs)
    }

    /// Give back the unused part of the run (nothing points there: the decrease is immediate).
    pub(crate) fn return_run(&mut self) -> Result<()> {
        let run = std::mem::replace(&mut self.run, 0..0);
        for c in run.rev() {
            self.change_refcount(c, -1)?;
        }
        Ok(())
    }

    /// Allocate `n` contiguous clusters, each with refcount 1. Returns the host offset.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        Ok(self.alloc_extent(n, n)?.0)
    }

    /// First fit: the first run of at least `min` free clusters, taking up to `max` of them,
    /// each with refcount 1. Returns the host offset and the number of clusters.
    pub(crate) fn alloc_extent(&mut self, min: u64, max: u64) -> Result<(u64, u64)> {
        'restart: loop {
            let mut start = self.free_cluster_index.max(1);
            let mut run = 0;
            let mut c = start;
            while run < max {
                if self.refcount(c)? == 0 {
                    if run == 0 {
                        start = c;
                    }
                    run += 1;
                } else if run >= min {
                    break;
                } else {
                    run = 0;
                }
                c += 1;
            }
            let n = run;
            if (start + n) * self.cs > MAX_HOST_OFFSET {
                return Err(Error::NoSpace {
                    file: self.name.clone(),
                    context: "cluster allocation past the largest host offset".into(),
                });
            }
            self.check_overlap(start, n)?;
            for c in start..start + n {
                if self.ensure_refblock(c)? {
                    continue 'restart;
                }
            }
            for c in start..start + n {
                self.store_refcount(c, 1)?;
            }
            self.incr_pending = true;
            self.meta_epoch += 1;
            if start == self.free_cluster_index || self.free_cluster_index == 0 {
                self.free_cluster_index = start + n;
            }
            self.alloc_end = self.alloc_end.max(start + n);
            return Ok((start * self.cs, n));
        }
    }

    /// Refuse to hand out clusters that hold metadata we know about: their refcounts are wrong,
    /// and writing there would destroy the image.
    fn check_overlap(&self, start: u64, n: u64) -> Result<()> {
        let cs = self.cs;
        let (a, b) = (start * cs, (start + n) * cs);
        let tables = [
            (0, cs),
            (self.h.l1_table_offset, self.h.l1_size as u64 * 8),
            (
                self.h.refcount_table_offset,
                self.h.refcount_table_clusters as u64 * cs,
            ),
            (
                self.h.snapshots_offset,
                crate::format::snapshot::table_size(&self.snapshots),
            ),
        ];
        for (off, len) in tables {
            if len > 0 && off < b && a < off + len {
                return Err(Error::corrupt(
                    &self.name,
                    format!(
                        "Preventing invalid allocation of clusters at {a:#x}: they hold metadata but their refcount is 0 (run check -r all)"
                    ),
                    a,
                ));
            }
        }
        Ok(())
    }

    /// Make sure the refcount block covering `cluster` exists. Returns true if anything was
    /// allocated (callers that picked free clusters must pick again).
    pub(crate) fn ensure_refblock(&mut self, cluster: u64) -> Result<bool> {
        let ri = cluster / self.rb_entries;
        if ri >= self.reftable.len() as u64 {
            self.grow_reftable(ri + 1)?;
            return Ok(true);
        }
        if self.reftable[ri as usize] & REFT_OFFSET_MASK != 0 {
            return Ok(false);
        }
        // Place the new block at the first free cluster.
        let mut c = self.free_cluster_index.max(1);
        while self.refcount(c)? != 0 {
            c += 1;
        }
        if c / self.rb_entries != ri {
            // The block lands in another range: that range needs its own block first.
            if self.ensure_refblock(c)? {
                return Ok(true);
            }
            self.store_refcount(c, 1)?;
            // The refcount of the block's own cluster must be stable before the table names it.
            self.caches
                .flush(&*self.storage, &self.name, Kind::Refblock)?;
        }
        let mut block = vec![0u8; self.cs as usize];
        if c / self.rb_entries == ri {
            // Self-describing block.
            refcount::set(
                &mut block,
                (c % self.rb_entries) as usize,
                self.h.refcount_order,
                1,
            );
        }
        let off = c * self.cs;
        self.write_meta(&block, off, "new refcount block")?;
        if !mutant("refblock-barrier") {
            self.barrier()?;
        }
        let entry = fmt::u64_bytes(off);
        // In memory only once written: a failed write is retried by the next allocation (which
        // picks the same free cluster), instead of leaving a table that only memory knows.
        self.write_meta(
            &entry,
            self.h.refcount_table_offset + ri * 8,
            "refcount table entry",
        )?;
        self.note_meta_cluster(off);
        self.reftable[ri as usize] = off;
        self.alloc_end = self.alloc_end.max(c + 1);
        Ok(true)
    }

    /// Grow the refcount table to at least `min_entries`, placing the new table and the refcount
    /// blocks that describe it in a fresh area past every allocation.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cs;
        let per = self.rb_entries;
        let area = self.alloc_end.max(self.file_len()?.div_ceil(cs));
        let old_entries = self.reftable.len() as u64;
        let mut table_entries = min_entries.max(old_entries);
        let (mut nb, mut nt);
        loop {
            nt = (table_entries * 8).div_ceil(cs);
            // Ranges covering [area, area+nb+nt) that lack a block.
            let mut guess = 0;
            loop {
                let end = area + guess + nt;
                let first = area / per;
                let last = (end - 1) / per;
                let missing = (first..=last)
                    .filter(|&r| {
                        r >= old_entries || self.reftable[r as usize] & REFT_OFFSET_MASK == 0
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
            if need == table_entries && (need * 8).div_ceil(cs) == nt {
                break;
            }
            table_entries = need;
        }
        if nt > header::MAX_REFTABLE_BYTES / cs {
            return Err(Error::NoSpace {
                file: self.name.clone(),
                context: "refcount table would exceed its 8 MiB limit".into(),
            });
        }
        let table_entries = nt * cs / 8;
        let mut new_table = self.reftable.clone();
        new_table.resize(table_entries as usize, 0);
        // Assign blocks to the missing ranges, in order, at the start of the area.
        let first = area / per;
        let last = (area + nb + nt - 1) / per;
        let mut next = area;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for r in first..=last {
            if new_table[r as usize] & REFT_OFFSET_MASK == 0 {
                new_table[r as usize] = next * cs;
                new_blocks.push((r, vec![0u8; cs as usize]));
                next += 1;
            }
        }
        let table_off = next * cs;
        // Refcounts of the area: in new blocks directly, in existing blocks through the cache.
        for c in area..area + nb + nt {
            let r = c / per;
            if let Some((_, b)) = new_blocks.iter_mut().find(|(br, _)| *br == r) {
                refcount::set(b, (c % per) as usize, self.h.refcount_order, 1);
            } else {
                self.store_refcount(c, 1)?;
            }
        }
        for (r, b) in &new_blocks {
            self.write_meta(b, new_table[*r as usize], "new refcount block")?;
        }
        self.write_meta(
            &fmt::encode_table(&new_table),
            table_off,
            "new refcount table",
        )?;
        if mutant("reftable-barrier") {
            self.caches
                .write_all(&*self.storage, &self.name, Kind::Refblock)?;
        } else {
            self.caches
                .flush(&*self.storage, &self.name, Kind::Refblock)?;
        }
        // Switch: one write inside sector 0.
        let old_off = self.h.refcount_table_offset;
        let old_clusters = self.h.refcount_table_clusters as u64;
        self.write_header(
            header::REFTABLE_FIELDS,
            "header (refcount table switch)",
            |h| {
                h.refcount_table_offset = table_off;
                h.refcount_table_clusters = nt as u32;
            },
        )?;
        self.reftable = new_table;
        self.meta_clusters = None;
        self.alloc_end = self.alloc_end.max(area + nb + nt);
        self.barrier()?;
        self.free_clusters(old_off, old_clusters, true)?;
        Ok(())
    }
}
