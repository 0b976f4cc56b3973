//! L2-table and refcount-block caches: write-back, bounded, with flush dependencies.
//!
//! The model is QEMU's Qcow2Cache. Each cache may *depend* on the other: before any dirty entry
//! of a dependent cache is written, the other cache is written and a barrier issued. Each cache
//! may also owe a bare barrier (`depends_on_flush`): earlier data writes (copy-on-write data)
//! must be stable before its entries are written.
//!
//! Crash analysis, for the two dependencies the engine sets:
//! - L2 -> refcount blocks (a new cluster's refcount before the L2 entry that points to it): if
//!   power fails after the refcount reached disk but before the L2 entry, the cluster is leaked
//!   (refcount 1, no reference). Never the reverse, which would let the cluster be allocated
//!   twice.
//! - refcount blocks -> L2 (a pointer removed before the refcount it held is decreased): a crash
//!   in between leaves a leak, never a live pointer to a free cluster.

use std::collections::HashMap;

use crate::error::Result;
use crate::host::HostFile;
use crate::offset::HostOffset;

/// Which cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    L2,
    Refblock,
}

impl Kind {
    fn other(self) -> Kind {
        match self {
            Kind::L2 => Kind::Refblock,
            Kind::Refblock => Kind::L2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::L2 => "L2 table",
            Kind::Refblock => "refcount block",
        }
    }
}

#[derive(Debug)]
struct Entry {
    offset: HostOffset,
    data: Vec<u8>,
    dirty: bool,
    /// A new table that nothing on disk points to yet: it may be written at any time, with no
    /// ordering constraint.
    unlinked: bool,
    lru: u64,
}

#[derive(Debug)]
pub(crate) struct Cache {
    entries: Vec<Entry>,
    index: HashMap<HostOffset, usize>,
    capacity: usize,
    tick: u64,
    /// The other cache must be written and a barrier issued before our dirty entries are written.
    depends: bool,
    /// A bare barrier is owed before our dirty entries are written.
    depends_on_flush: bool,
}

impl Cache {
    fn new(capacity: usize) -> Cache {
        Cache {
            entries: Vec::new(),
            index: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
            depends: false,
            depends_on_flush: false,
        }
    }
}

/// Both caches. They read and write through the [`HostFile`] each call is given.
#[derive(Debug)]
pub(crate) struct Caches {
    l2: Cache,
    rb: Cache,
    entry_size: usize,
}

impl Caches {
    pub fn new(entry_size: usize, l2_capacity: usize, rb_capacity: usize) -> Caches {
        Caches {
            l2: Cache::new(l2_capacity),
            rb: Cache::new(rb_capacity),
            entry_size,
        }
    }

    fn cache(&mut self, k: Kind) -> &mut Cache {
        match k {
            Kind::L2 => &mut self.l2,
            Kind::Refblock => &mut self.rb,
        }
    }

    fn barrier(f: &mut HostFile) -> Result<()> {
        f.barrier_for("flush (metadata ordering barrier)")
    }

    /// Whether any entry of `k` is dirty.
    pub fn has_dirty(&self, k: Kind) -> bool {
        match k {
            Kind::L2 => self.l2.entries.iter().any(|e| e.dirty),
            Kind::Refblock => self.rb.entries.iter().any(|e| e.dirty),
        }
    }

    /// Write one entry if dirty, honouring the dependencies first.
    fn entry_flush(&mut self, f: &mut HostFile, k: Kind, i: usize) -> Result<()> {
        if !self.cache(k).entries[i].dirty {
            return Ok(());
        }
        if self.cache(k).entries[i].unlinked {
            // Unreachable until linked: no ordering needed.
        } else if self.cache(k).depends {
            self.flush(f, k.other())?;
            self.cache(k).depends = false;
            self.cache(k).depends_on_flush = false;
        } else if self.cache(k).depends_on_flush {
            Self::barrier(f)?;
            self.cache(k).depends_on_flush = false;
        }
        let e = &self.cache(k).entries[i];
        f.write_meta(&e.data, e.offset, k.name())?;
        self.cache(k).entries[i].dirty = false;
        Ok(())
    }

    /// Write every dirty entry of `k` (no barrier after).
    pub fn write_all(&mut self, f: &mut HostFile, k: Kind) -> Result<()> {
        self.write_some(f, k, false)
    }

    /// Write the dirty entries of `k`; with `only_unlinked`, just the unlinked new tables.
    pub fn write_some(&mut self, f: &mut HostFile, k: Kind, only_unlinked: bool) -> Result<()> {
        // Write in offset order: friendlier to the disk.
        let mut order: Vec<usize> = (0..self.cache(k).entries.len())
            .filter(|&i| {
                let e = &self.cache(k).entries[i];
                e.dirty && (!only_unlinked || e.unlinked)
            })
            .collect();
        order.sort_by_key(|&i| self.cache(k).entries[i].offset);
        for i in order {
            self.entry_flush(f, k, i)?;
        }
        Ok(())
    }

    /// Write every dirty entry of `k`, then a barrier.
    pub fn flush(&mut self, f: &mut HostFile, k: Kind) -> Result<()> {
        self.write_all(f, k)?;
        Self::barrier(f)
    }

    /// Declare that `c`'s dirty entries may only be written after the other cache is stable.
    pub fn set_dependency(&mut self, f: &mut HostFile, c: Kind) -> Result<()> {
        let dep = c.other();
        if self.cache(dep).depends {
            // The other cache waits for us: make ourselves stable first (no cycles).
            self.flush(f, c)?;
            self.cache(dep).depends = false;
            self.cache(dep).depends_on_flush = false;
        }
        self.cache(c).depends = true;
        Ok(())
    }

    /// Declare that data written so far must be stable before `c`'s dirty entries are written.
    pub fn set_depends_on_flush(&mut self, c: Kind) {
        self.cache(c).depends_on_flush = true;
    }

    /// Whether `c` waits for the other cache or for a barrier.
    pub fn has_dependency(&self, c: Kind) -> bool {
        let c = match c {
            Kind::L2 => &self.l2,
            Kind::Refblock => &self.rb,
        };
        c.depends || c.depends_on_flush
    }

    /// The caller made everything `c` waits for stable (wrote the other cache, then a barrier).
    pub fn satisfied(&mut self, c: Kind) {
        self.cache(c).depends = false;
        self.cache(c).depends_on_flush = false;
    }

    /// Whether any linked (not new) entry of `k` is dirty.
    pub fn has_dirty_linked(&self, k: Kind) -> bool {
        let c = match k {
            Kind::L2 => &self.l2,
            Kind::Refblock => &self.rb,
        };
        c.entries.iter().any(|e| e.dirty && !e.unlinked)
    }

    /// Flag entry `i` of `k` as a new, unlinked table.
    pub fn mark_unlinked(&mut self, k: Kind, i: usize) {
        self.cache(k).entries[i].unlinked = true;
    }

    /// Offsets of the new, unlinked entries of `k`.
    pub fn unlinked_offsets(&self, k: Kind) -> Vec<HostOffset> {
        let c = match k {
            Kind::L2 => &self.l2,
            Kind::Refblock => &self.rb,
        };
        c.entries
            .iter()
            .filter(|e| e.unlinked)
            .map(|e| e.offset)
            .collect()
    }

    /// The tables at `offs` are now linked from stable metadata.
    pub fn link_offsets(&mut self, k: Kind, offs: &[HostOffset]) {
        for e in &mut self.cache(k).entries {
            if offs.contains(&e.offset) {
                e.unlinked = false;
            }
        }
    }

    /// Find or load the entry for `offset`. With `fresh` the entry starts zeroed (a new table)
    /// instead of being read. Returns its index, valid until the next `get` on the same cache.
    pub fn get(
        &mut self,
        f: &mut HostFile,
        k: Kind,
        offset: HostOffset,
        fresh: bool,
    ) -> Result<usize> {
        let c = self.cache(k);
        c.tick += 1;
        let tick = c.tick;
        if let Some(&i) = c.index.get(&offset) {
            c.entries[i].lru = tick;
            if fresh {
                c.entries[i].data.fill(0);
                c.entries[i].unlinked = false;
            }
            return Ok(i);
        }
        let mut data = vec![0u8; self.entry_size];
        if !fresh {
            f.read(&mut data, offset, &format!("{} at {offset:#x}", k.name()))?;
        }
        let slot = if self.cache(k).entries.len() < self.cache(k).capacity {
            self.cache(k).entries.push(Entry {
                offset,
                data,
                dirty: false,
                unlinked: false,
                lru: tick,
            });
            self.cache(k).entries.len() - 1
        } else {
            let victim = self
                .cache(k)
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.lru)
                .map(|(i, _)| i)
                .expect("cache has entries");
            self.entry_flush(f, k, victim)?;
            let c = self.cache(k);
            let old = c.entries[victim].offset;
            c.index.remove(&old);
            c.entries[victim] = Entry {
                offset,
                data,
                dirty: false,
                unlinked: false,
                lru: tick,
            };
            victim
        };
        self.cache(k).index.insert(offset, slot);
        Ok(slot)
    }

    pub fn data(&mut self, k: Kind, i: usize) -> &[u8] {
        &self.cache(k).entries[i].data
    }

    /// Mutable access; marks the entry dirty.
    pub fn data_mut(&mut self, k: Kind, i: usize) -> &mut [u8] {
        let e = &mut self.cache(k).entries[i];
        e.dirty = true;
        &mut e.data
    }

    /// Drop the entry for `offset` without writing it (its cluster was freed or rewritten).
    pub fn forget(&mut self, k: Kind, offset: HostOffset) {
        let c = self.cache(k);
        if let Some(i) = c.index.remove(&offset) {
            c.entries.swap_remove(i);
            if i < c.entries.len() {
                let moved = c.entries[i].offset;
                c.index.insert(moved, i);
            }
        }
    }

    /// Drop every entry of `k` (after writing none: caller decides).
    pub fn clear(&mut self, k: Kind) {
        let c = self.cache(k);
        c.entries.clear();
        c.index.clear();
        c.depends = false;
        c.depends_on_flush = false;
    }
}
