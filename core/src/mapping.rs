//! The L1/L2 mapping: guest cluster -> L2 entry, table allocation and copy-on-write of shared
//! tables, entry updates, the active L1 table and its growth.
//!
//! Crash analysis (the ordering itself is kept by `flush.rs`):
//! - A new L2 table lives only in the cache, flagged unlinked, and the L1 entry naming it only
//!   in memory. At the next flush the table and its refcount are written and made stable (first
//!   barrier) before the L1 entry is written (second barrier). A crash before that leaks the new
//!   cluster. The old (shared) table's reference is dropped only after the L1 switch is stable
//!   (deferred free).
//! - A grown L1 table is written whole from memory, so everything it names is made stable first
//!   (a full flush); the table itself is stable before the header switches to it (one write
//!   inside sector 0); the old table is freed after the switch is stable.

use std::collections::BTreeSet;

use crate::cache::Kind;
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::l2::{self, L1E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use crate::format::{self as fmt};
use crate::mutants::active as mutant;
use crate::offset::{Geometry, GuestCluster, HostOffset};
use crate::state::State;

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Desc {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster preallocated at `host`.
    ZeroAlloc { host: HostOffset },
    /// Data in the host cluster at `host`.
    Normal { host: HostOffset },
    /// Compressed data: `len` bytes (a sector-rounded upper bound) starting at `offset`.
    Compressed { offset: HostOffset, len: u64 },
}

/// One L2 entry as stored: its first word and, with extended L2 entries, the subcluster
/// bitmap (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

impl L2Entry {
    /// Unallocated, no subcluster information.
    pub(crate) const EMPTY: L2Entry = L2Entry { word: 0, bitmap: 0 };
    /// A standard zero cluster without a host cluster (v3).
    pub(crate) const ZERO: L2Entry = L2Entry {
        word: OFLAG_ZERO,
        bitmap: 0,
    };
    /// Extended L2: every subcluster reads as zeros, no host cluster.
    pub(crate) const ALL_ZERO_SUBCLUSTERS: L2Entry = L2Entry {
        word: 0,
        bitmap: 0xffff_ffff << 32,
    };

    pub(crate) const fn new(word: u64, bitmap: u64) -> L2Entry {
        L2Entry { word, bitmap }
    }
    /// Data in the host cluster at `host`, which we own exclusively (COPIED).
    pub(crate) const fn owned(host: HostOffset, bitmap: u64) -> L2Entry {
        L2Entry {
            word: host.get() | OFLAG_COPIED,
            bitmap,
        }
    }
    /// A zero cluster keeping its (exclusively owned) host cluster at `host`.
    pub(crate) const fn zero_at(host: HostOffset) -> L2Entry {
        L2Entry {
            word: host.get() | OFLAG_COPIED | OFLAG_ZERO,
            bitmap: 0,
        }
    }
    /// `len` compressed bytes at `offset`.
    pub(crate) fn compressed(geo: &Geometry, offset: HostOffset, len: u64) -> L2Entry {
        L2Entry {
            word: l2::encode_compressed(offset.get(), len, geo.cluster_bits()),
            bitmap: 0,
        }
    }
    /// The same entry with another subcluster bitmap.
    pub(crate) const fn with_bitmap(self, bitmap: u64) -> L2Entry {
        L2Entry {
            word: self.word,
            bitmap,
        }
    }

    /// Decode the entry.
    pub(crate) fn desc(self, geo: &Geometry) -> Desc {
        match l2::decode(self.word, geo.cluster_bits(), geo.extended_l2()) {
            l2::Desc::Unallocated => Desc::Unallocated,
            l2::Desc::ZeroPlain => Desc::ZeroPlain,
            l2::Desc::ZeroAlloc { host } => Desc::ZeroAlloc {
                host: HostOffset::new(host),
            },
            l2::Desc::Normal { host } => Desc::Normal {
                host: HostOffset::new(host),
            },
            l2::Desc::Compressed { offset, len } => Desc::Compressed {
                offset: HostOffset::new(offset),
                len,
            },
        }
    }
    /// The COPIED flag: the host cluster's refcount is exactly one.
    pub(crate) const fn copied(self) -> bool {
        self.word & OFLAG_COPIED != 0
    }
    /// The host cluster offset field (0 when none; meaningless for compressed entries).
    pub(crate) const fn host(self) -> HostOffset {
        HostOffset::new(self.word & l2::L2E_OFFSET_MASK)
    }
    /// Nothing stored at all.
    pub(crate) const fn is_empty(self) -> bool {
        self.word == 0 && self.bitmap == 0
    }
}

/// The active L1 table in memory, and which of its entries are not yet written.
pub(crate) struct Tables {
    l1: Vec<u64>,
    /// Active L1 entries changed in memory and not yet written.
    l1_dirty: BTreeSet<usize>,
}

impl Tables {
    pub(crate) fn new(l1: Vec<u64>) -> Tables {
        Tables {
            l1,
            l1_dirty: BTreeSet::new(),
        }
    }
    /// The active L1 entries.
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }
    /// Whether some L1 entry waits to be written.
    pub(crate) fn l1_dirty(&self) -> bool {
        !self.l1_dirty.is_empty()
    }
    /// Clear the COPIED flag of every entry (each table is about to be shared: `snapshot.rs`).
    pub(crate) fn clear_copied(&mut self) {
        for (i, e) in self.l1.iter_mut().enumerate() {
            if *e & OFLAG_COPIED != 0 {
                *e &= !OFLAG_COPIED;
                self.l1_dirty.insert(i);
            }
        }
    }
    /// Set or clear the COPIED flag of entry `i` (`snapshot.rs`).
    pub(crate) fn set_copied(&mut self, i: usize, on: bool) {
        if on {
            self.l1[i] |= OFLAG_COPIED;
        } else {
            self.l1[i] &= !OFLAG_COPIED;
        }
        self.l1_dirty.insert(i);
    }
    /// Take `l1` as the active table, already written where the header now points (applying
    /// a snapshot); returns the old one.
    pub(crate) fn replace(&mut self, l1: Vec<u64>) -> Vec<u64> {
        self.l1_dirty.clear();
        std::mem::replace(&mut self.l1, l1)
    }
}

impl State {
    /// The L2 table offset for guest cluster `c`, or `None` when it has none.
    pub(crate) fn l2_table(&self, c: GuestCluster) -> Result<Option<HostOffset>> {
        let l1i = self.geo.l1_index(c);
        let Some(&e) = self.tables.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let entry_at = self.header.l1_table_offset + l1i * 8;
        if e & l2::L1E_RESERVED_MASK != 0 {
            return Err(Error::corrupt(
                self.name(),
                format!("L1 entry {l1i} ({e:#x}) has reserved bits set"),
                entry_at,
            ));
        }
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let off = HostOffset::new(off);
        self.check_meta_offset(off, "L2 table", entry_at)?;
        Ok(Some(off))
    }

    /// The L2 entry of guest cluster `c` (empty when it has no table).
    pub(crate) fn lookup(&mut self, c: GuestCluster) -> Result<L2Entry> {
        let Some(table) = self.l2_table(c)? else {
            return Ok(L2Entry::EMPTY);
        };
        let i = self.caches.get(&mut self.file, Kind::L2, table, false)?;
        let idx = self.geo.l2_index(c);
        let d = self.caches.data(Kind::L2, i);
        let extended = self.geo.extended_l2();
        let e = if extended {
            L2Entry::new(fmt::table_get(d, idx * 2), fmt::table_get(d, idx * 2 + 1))
        } else {
            L2Entry::new(fmt::table_get(d, idx), 0)
        };
        let reserved = if extended {
            l2::L2E_RESERVED_MASK | OFLAG_ZERO
        } else {
            l2::L2E_RESERVED_MASK
        };
        if e.word & l2::OFLAG_COMPRESSED == 0 && e.word & reserved != 0 {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "L2 entry {:#x} for guest offset {:#x} has reserved bits set",
                    e.word,
                    self.geo.guest_offset(c)
                ),
                table.get() + idx as u64 * self.geo.l2_entry_size(),
            ));
        }
        Ok(e)
    }

    /// Write an entry into the (writable: see [`State::prepare_l2`]) L2 table of `c`.
    pub(crate) fn set_entry(&mut self, c: GuestCluster, e: L2Entry) -> Result<()> {
        self.mark_dirty_any()?;
        // A write between its two phases must not link a cluster it reserved for `c`.
        self.reserved.entry_changed(c);
        let table =
            HostOffset::new(self.tables.l1[self.geo.l1_index(c) as usize] & L1E_OFFSET_MASK);
        let i = self.caches.get(&mut self.file, Kind::L2, table, false)?;
        let idx = self.geo.l2_index(c);
        let extended = self.geo.extended_l2();
        let d = self.caches.data_mut(Kind::L2, i);
        if extended {
            fmt::table_set(d, idx * 2, e.word);
            fmt::table_set(d, idx * 2 + 1, e.bitmap);
        } else {
            fmt::table_set(d, idx, e.word);
        }
        Ok(())
    }

    /// Make the L2 table of `c` allocated and exclusively ours (COPIED); returns its offset.
    /// A new table stays unlinked (see the crash analysis above) until a flush links it.
    pub(crate) fn prepare_l2(&mut self, c: GuestCluster) -> Result<HostOffset> {
        let l1i = self.geo.l1_index(c) as usize;
        if l1i >= self.tables.l1.len() {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "L1 table is too small for guest offset {:#x}",
                    self.geo.guest_offset(c)
                ),
                self.header.l1_table_offset,
            ));
        }
        let l1e = self.tables.l1[l1i];
        let old = self.l2_table(c)?;
        if let Some(old) = old {
            if l1e & OFLAG_COPIED != 0 {
                if let Some(what) = self.l2_overlap(old) {
                    return Err(Error::corrupt(
                        self.name(),
                        format!(
                            "Preventing write of the L2 table at {old:#x} (L1 entry {l1i}): it shares its cluster with the {what} (run check -r all)"
                        ),
                        old.get(),
                    ));
                }
                return Ok(old);
            }
        }
        self.mark_dirty()?;
        let table = match old {
            Some(old) => {
                let i = self.caches.get(&mut self.file, Kind::L2, old, false)?;
                self.caches.data(Kind::L2, i).to_vec()
            }
            None => vec![0u8; self.geo.cluster_size() as usize],
        };
        let new = self.alloc_run_cluster()?;
        let i = self.caches.get(&mut self.file, Kind::L2, new, true)?;
        self.caches.data_mut(Kind::L2, i).copy_from_slice(&table);
        self.caches.mark_unlinked(Kind::L2, i);
        self.meta.note(self.geo.host_cluster(new));
        self.pending.changed();
        self.tables.l1[l1i] = new.get() | OFLAG_COPIED;
        self.tables.l1_dirty.insert(l1i);
        if let Some(old) = old {
            self.free_clusters(old, 1, false)?;
        }
        Ok(new)
    }

    /// Write the changed active L1 entries, merging neighbours into one write.
    pub(crate) fn write_l1_dirty(&mut self) -> Result<()> {
        // Cleared only once written: a failed write leaves them dirty for the next flush.
        let dirty: Vec<usize> = self.tables.l1_dirty.iter().copied().collect();
        let mut k = 0;
        while k < dirty.len() {
            let mut end = k + 1;
            while end < dirty.len() && dirty[end] == dirty[end - 1] + 1 {
                end += 1;
            }
            let first = dirty[k];
            let bytes = fmt::encode_table(&self.tables.l1[first..dirty[end - 1] + 1]);
            let at = HostOffset::new(self.header.l1_table_offset + first as u64 * 8);
            self.file.write_meta(&bytes, at, "L1 entries")?;
            k = end;
        }
        self.tables.l1_dirty.clear();
        Ok(())
    }

    /// Set active L1 entry `l1i` on disk, then in memory (repair of a COPIED flag).
    pub(crate) fn rewrite_l1_entry(&mut self, l1i: usize, entry: u64) -> Result<()> {
        let at = HostOffset::new(self.header.l1_table_offset + l1i as u64 * 8);
        self.file
            .write_meta(&fmt::u64_bytes(entry), at, "L1 entry")?;
        self.tables.l1[l1i] = entry;
        Ok(())
    }

    /// Grow the active L1 table to `entries` entries (see the crash analysis above).
    pub(crate) fn grow_l1(&mut self, entries: u64) -> Result<()> {
        // The new table is written from memory: everything it names must be stable first.
        self.flush_inner()?;
        let bytes = entries * 8;
        let clusters = self.geo.clusters_for(bytes);
        let new = self.alloc_clusters(clusters)?;
        if !self.access.lazy() {
            self.caches.flush(&mut self.file, Kind::Refblock)?;
        }
        let mut table = self.tables.l1.clone();
        table.resize(entries as usize, 0);
        let mut enc = fmt::encode_table(&table);
        enc.resize((clusters * self.geo.cluster_size()) as usize, 0);
        self.file.write_meta(&enc, new, "new L1 table")?;
        if !mutant("l1-grow-barrier") {
            self.file.barrier()?;
        }
        let old_off = HostOffset::new(self.header.l1_table_offset);
        let old_clusters = self.geo.clusters_for(self.header.l1_size as u64 * 8);
        self.write_header(header::L1_FIELDS, "header (L1 switch)", |h| {
            h.l1_table_offset = new.get();
            h.l1_size = entries as u32;
        })?;
        self.meta.invalidate();
        self.file.barrier()?;
        self.tables.l1 = table;
        if old_off.get() != 0 && old_clusters > 0 {
            self.free_clusters(old_off, old_clusters, true)?;
        }
        Ok(())
    }
}
