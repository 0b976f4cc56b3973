//! Changing the virtual size, and metadata preallocation.
//!
//! Crash analysis. Shrinking: the new size is written and made stable first; only then is
//! the cut-off tail freed (and a partial last cluster zeroed past the new end), all of it
//! invisible to the guest by then. Freeing first would let a crash show the old size with
//! tail clusters gone: the backing file's data, or zeros, where the guest had data. A crash
//! after the size switch leaves stale entries past the end, which growing handles.
//! Growing: everything in the grown range that does not already read as zeros (the backing
//! file's data, stale entries a crash left past the old end) is zeroed and made stable
//! before the new size is written.

use crate::error::{Error, Result};
use crate::format::header;
use crate::mapping::L2Entry;
use crate::mutants::active as mutant;
use crate::offset::{GuestCluster, GuestOffset};
use crate::state::State;

impl State {
    /// Change the virtual size (see the crash analysis above).
    pub(crate) fn resize_inner(&mut self, new_size: u64) -> Result<()> {
        // Writes in flight redo their clusters the ordinary way (or fail on a shrink).
        self.reserved.everything_changed();
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "{}: new size {new_size} is not a multiple of 512",
                self.name()
            )));
        }
        let old = self.header.size;
        if new_size < old {
            self.flush_inner()?;
            self.write_header(header::SIZE_FIELD, "header (size)", |h| h.size = new_size)?;
            self.file.barrier()?;
            self.scrub(GuestOffset::new(new_size), GuestOffset::new(old), false)?;
            return self.flush_inner();
        }
        if new_size > old {
            let need = self
                .header
                .l1_entries_for(new_size)
                .filter(|&n| n <= header::MAX_L1_ENTRIES)
                .ok_or_else(|| {
                    Error::invalid(format!("{}: size {new_size} is too large", self.name()))
                })?;
            if need > self.tables.l1().len() as u64 {
                self.mark_dirty()?;
                self.grow_l1(need)?;
            }
        }
        let late = mutant("resize-zero-order");
        let (from, to) = (GuestOffset::new(old), GuestOffset::new(new_size));
        if new_size > old && !late {
            self.scrub(from, to, true)?;
        }
        self.flush_inner()?;
        self.write_header(header::SIZE_FIELD, "header (size)", |h| h.size = new_size)?;
        self.file.barrier()?;
        if new_size > old && late {
            self.scrub(from, to, true)?;
            self.flush_inner()?;
        }
        Ok(())
    }

    /// Make the guest range `[from, to)` (past the virtual size, or about to become part of it)
    /// read as zeros: allocated clusters are freed (zero clusters where a backing file would
    /// show through), partial clusters get explicit zeros. With `grow`, the backing file's range
    /// is zeroed too. Only clusters that have an L2 table are visited.
    fn scrub(&mut self, from: GuestOffset, to: GuestOffset, grow: bool) -> Result<()> {
        let geo = self.geo;
        let disk_end = self.disk_end().max(to);
        let backing_end = GuestOffset::new(self.backing.as_ref().map_or(0, |b| b.virtual_size()));
        let mut off = from;
        while off < to {
            let (c, in_cluster) = geo.split(off);
            let n = (geo.cluster_size() - in_cluster).min(to - off);
            if self.l2_table(c)?.is_none() {
                // No table: the rest of its range reads as zeros, or from the backing file.
                let range_end = geo.guest_offset(geo.next_l2_range(c)).min(to);
                if grow && backing_end > off {
                    let end = backing_end.min(range_end);
                    self.zero_inner(off, end - off, disk_end)?;
                }
                off = range_end;
                continue;
            }
            let e = self.lookup(c)?;
            let shows_backing = grow && backing_end > off;
            if in_cluster != 0 || n < geo.cluster_size() {
                // Partial cluster: explicit zeros (copy-on-write keeps the rest).
                if (!e.is_empty() || shows_backing) && !self.known_zero(c)? {
                    self.write_zeros(c, in_cluster, n)?;
                }
            } else if shows_backing {
                self.zero_inner(off, n, disk_end)?;
            } else if !e.is_empty() {
                self.discard_cluster(c, false)?;
            }
            off += n;
        }
        Ok(())
    }

    /// preallocation=metadata: every guest cluster gets a host cluster and reads as zeros.
    pub(crate) fn preallocate_metadata(&mut self) -> Result<()> {
        let geo = self.geo;
        let clusters = geo.clusters_for(self.header.size);
        let mut i = 0;
        while i < clusters {
            let c = GuestCluster::new(i);
            let n = (geo.l2_entries() - geo.l2_index(c) as u64).min(clusters - i);
            self.prepare_l2(c)?;
            let host = self.alloc_clusters(n)?;
            for k in 0..n {
                let h = host + k * geo.cluster_size();
                let entry = if geo.extended_l2() {
                    // Allocated host cluster, no subcluster allocated: reads as zeros, or
                    // from the backing file.
                    L2Entry::owned(h, 0)
                } else if self.header.version >= 3 {
                    L2Entry::zero_at(h)
                } else {
                    L2Entry::owned(h, 0)
                };
                self.set_entry(c + k, entry)?;
            }
            i += n;
        }
        let end = geo.host_offset(self.alloc.alloc_end()).get();
        if end > self.file.len() {
            self.file.set_len(end, "extend file")?;
        }
        self.flush_inner()
    }
}
