//! Internal snapshots: create, list, apply (revert to), delete, and the read-only view of one.
//!
//! A snapshot is a copy of the active L1 table plus one more reference to every L2 table and
//! every data cluster under it: the two trees share everything, and the next guest write to a
//! shared cluster or table copies it first (the COPIED flag, which says "refcount 1, write in
//! place", is cleared on everything that becomes shared). The snapshot table (`format/`) lists
//! the snapshots; it is replaced copy-on-write and switched with one write inside sector 0.
//!
//! # Crash analysis
//!
//! `qemu-img check` calls an image corrupt when a refcount is lower than the references to
//! its cluster, and when a COPIED flag in the active tree disagrees with the refcount. The
//! refcount and the flag live in different clusters, so no order of writes can move a cluster
//! from "one reference, COPIED" to "two references, not COPIED" with every intermediate state
//! passing both tests (QEMU's own order leaves "refcount 2, COPIED still set" in between).
//! The states this code can leave are chosen so that each one is *safe*:
//!
//! - **Leaks** (a refcount higher than the references): harmless, repaired by `check -r`.
//! - **A missing COPIED flag** (COPIED clear on a cluster of the active tree whose refcount and
//!   references are both 1): harmless, it only costs one needless copy-on-write; `check -r all`
//!   sets it again. `check` counts it as a corruption, as qemu-img does, and reports it apart
//!   (`CheckReport::missing_copied`) so that tests can tell it from real damage.
//! - Never a COPIED flag on a cluster with two references (a write in place would change the
//!   snapshot), never a refcount below the references (the cluster could be handed out twice),
//!   never a torn L1 table.
//!
//! **Create** (sync points marked ▮):
//! 1. Flush; wait for data I/O running outside the lock (the snapshot must not change after it
//!    is taken).
//! 2. Clear COPIED on every L2 entry and L1 entry of the active tree; write them ▮. A crash
//!    now leaves missing COPIED flags only. (Mutant `snap-copied-first`: skip this barrier,
//!    so that raised refcounts can reach the disk while COPIED is still set.)
//! 3. Copy the active L1 table to new clusters; raise the refcount of every L2 table and data
//!    cluster under it; write the new snapshot table to new clusters; write the refcount
//!    blocks ▮. A crash now leaves leaks (nothing names the new clusters yet).
//!    (Mutant `snap-table-barrier`: switch the header before this barrier.)
//! 4. Switch the header to the new snapshot table (bytes 60..72, one write) ▮. The old table
//!    is freed.
//!
//! **Apply**: the new active L1 is written to new clusters and switched to with one write
//! (bytes 24..48: size and L1 together, so that applying a snapshot of another disk size
//! resizes atomically). A power cut leaves the old or the new active image, never a mix.
//! 1. Flush; wait for data I/O outside the lock.
//! 2. Clear COPIED in the snapshot's L2 tables (they become shared with the active tree; the
//!    flags of a tree that is not active mean nothing); raise the refcounts of every table
//!    and cluster under the snapshot's L1; write the new L1 table (COPIED clear throughout);
//!    write the L2 tables and refcount blocks ▮. (Mutant `snap-apply-barrier`.)
//! 3. Switch the header ▮. Then lower the refcounts under the old active tree and free its L1
//!    (their pointer is gone for good). Everything in the new tree keeps at least two
//!    references (the snapshot and the active tree), so no COPIED flag changes.
//!
//! **Delete**:
//! 1. Flush; wait for data I/O outside the lock.
//! 2. Write the snapshot table without the entry, and the refcount blocks ▮; switch the header
//!    ▮ (the same order as create, steps 3-4). A crash before the switch leaks the new table.
//! 3. Lower the refcounts under the deleted snapshot's tree and free its L1 (leaks at worst).
//! 4. Clusters of the active tree that it shared now have refcount 1 and regain COPIED: the
//!    lowered refcounts are written ▮ before any flag is set (a crash in between leaves missing
//!    flags), then the L2 tables and L1 entries ▮. (Mutant `snap-copied-last`: set the flags
//!    without waiting, so a crash can leave COPIED on a cluster whose refcount is still 2.)
//!
//! **Errors**: a failure before the header switch gives back nothing that the old header names
//! and leaks what was allocated (check -r leaks takes it back). A failed header write may
//! still have reached the disk, so it poisons the image (`HostFile::poison_header`: every
//! further write refuses until the image is reopened and the header read again) and nothing
//! the new header would name is freed: the tables are leaked, never handed out twice.
//!
//! Lazy refcounts: every operation sets the dirty bit first, and refcounts are not trusted
//! while it is set (they are rebuilt, and COPIED flags repaired, on the next read-write open
//! after a crash), so the refcount writes and their barriers are skipped there, as everywhere
//! else.

use std::collections::HashMap;
use std::fmt;

use crate::cache::Kind;
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::l2::{self, L1E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::format::refcount;
use crate::format::snapshot::{self, SnapshotEntry, MAX_SNAPSHOTS, MAX_TABLE_SIZE};
use crate::format::{self as fmt_};
use crate::mapping::{Desc, L2Entry};
use crate::mutants::active as mutant;
use crate::offset::{HostCluster, HostOffset};
use crate::state::State;

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The unique ID (QEMU numbers them: the highest numeric ID plus one).
    pub id: String,
    /// The name (tag); names need not be unique.
    pub name: String,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// The guest clock when the snapshot was taken, in nanoseconds (0 for disk-only snapshots).
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (0 for disk-only snapshots such as `qemu-img snapshot -c` makes).
    pub vm_state_size: u64,
    /// The virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// The instruction count (record/replay), or `None` when not recorded.
    pub icount: Option<u64>,
}

/// Which snapshot: by ID, by name, by both, or as `qemu-img snapshot -a` takes it (an ID
/// first, then a name). A plain string converts to [`SnapshotRef::IdOrName`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// The snapshot with this ID, else the first with this name.
    IdOrName(String),
    /// The snapshot with this ID.
    Id(String),
    /// The first snapshot with this name.
    Name(String),
    /// The snapshot with this ID and this name.
    IdAndName(String, String),
}

impl From<&str> for SnapshotRef {
    fn from(s: &str) -> SnapshotRef {
        SnapshotRef::IdOrName(s.to_string())
    }
}

impl From<String> for SnapshotRef {
    fn from(s: String) -> SnapshotRef {
        SnapshotRef::IdOrName(s)
    }
}

impl From<&String> for SnapshotRef {
    fn from(s: &String) -> SnapshotRef {
        SnapshotRef::IdOrName(s.clone())
    }
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotRef::IdOrName(s) | SnapshotRef::Name(s) => write!(f, "'{s}'"),
            SnapshotRef::Id(s) => write!(f, "with ID '{s}'"),
            SnapshotRef::IdAndName(i, n) => write!(f, "'{n}' with ID '{i}'"),
        }
    }
}

/// What to record in a new snapshot. [`SnapshotOptions::new`] gives what
/// `qemu-img snapshot -c NAME` records: the time now, VM clock 0, icount 0, no VM state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// The name (tag). It need not be unique; it may not contain NUL bytes.
    pub name: String,
    /// Creation time (seconds, nanoseconds since the Unix epoch); `None`: now.
    pub date: Option<(u32, u32)>,
    /// The guest clock to record, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The instruction count to record; `None` records "none" (QEMU's -1).
    pub icount: Option<u64>,
}

impl SnapshotOptions {
    /// A snapshot named `name`, recorded as `qemu-img snapshot -c` records one.
    pub fn new(name: impl Into<String>) -> SnapshotOptions {
        SnapshotOptions {
            name: name.into(),
            date: None,
            vm_clock_nsec: 0,
            icount: Some(0),
        }
    }
}

/// Extra data QEMU writes with every entry: vm_state_size_large, disk_size, icount.
const EXTRA_KNOWN: usize = 24;

/// The snapshot table as stored (read at open, replaced only after a header switch), and the
/// snapshot an image was opened on as a read-only view, if any.
#[derive(Default)]
pub(crate) struct Snapshots {
    list: Vec<SnapshotEntry>,
    view: Option<SnapshotInfo>,
}

impl Snapshots {
    pub(crate) fn new(list: Vec<SnapshotEntry>) -> Snapshots {
        Snapshots { list, view: None }
    }
    /// The entries, in table order.
    pub(crate) fn entries(&self) -> &[SnapshotEntry] {
        &self.list
    }
    /// Bytes the stored table takes.
    pub(crate) fn table_size(&self) -> u64 {
        snapshot::table_size(&self.list)
    }
    /// The snapshot this image shows (read-only), if it was opened on one.
    pub(crate) fn view(&self) -> Option<&SnapshotInfo> {
        self.view.as_ref()
    }
    pub(crate) fn set_view(&mut self, info: SnapshotInfo) {
        self.view = Some(info);
    }

    /// The index of the snapshot `r` names, as QEMU looks it up.
    pub(crate) fn find(&self, r: &SnapshotRef) -> Option<usize> {
        let by_id = |id: &str| self.list.iter().position(|e| e.id == id);
        let by_name = |name: &str| self.list.iter().position(|e| e.name == name);
        match r {
            SnapshotRef::IdOrName(s) => by_id(s).or_else(|| by_name(s)),
            SnapshotRef::Id(id) => by_id(id),
            SnapshotRef::Name(name) => by_name(name),
            SnapshotRef::IdAndName(id, name) => self
                .list
                .iter()
                .position(|e| &e.id == id && &e.name == name),
        }
    }

    /// The ID QEMU gives the next snapshot: the highest numeric ID plus one (an ID that does
    /// not start with digits counts as 0, as `strtoul` reads it).
    fn next_id(&self) -> String {
        let max = self
            .list
            .iter()
            .map(|e| {
                e.id.bytes()
                    .take_while(u8::is_ascii_digit)
                    .fold(0u64, |n, d| {
                        n.saturating_mul(10).saturating_add((d - b'0') as u64)
                    })
            })
            .max()
            .unwrap_or(0);
        (max.saturating_add(1)).to_string()
    }
}

/// The public description of a stored entry; `size` is the disk size of the image, for
/// entries that do not record theirs.
pub(crate) fn info_of(e: &SnapshotEntry, size: u64) -> SnapshotInfo {
    let icount = (e.extra.len() >= EXTRA_KNOWN)
        .then(|| fmt_::be64(&e.extra, 16))
        .filter(|&i| i != u64::MAX);
    SnapshotInfo {
        id: e.id.clone(),
        name: e.name.clone(),
        date_sec: e.date_sec,
        date_nsec: e.date_nsec,
        vm_clock_nsec: e.vm_clock_nsec,
        vm_state_size: e.vm_state_size_large(),
        disk_size: e.disk_size().unwrap_or(size),
        icount,
    }
}

/// An entry as QEMU writes it back: at least the 24 bytes of known extra data (filled in from
/// the 32-bit fields and the image's size when an older writer left them out), unknown extra
/// data kept after them.
fn normalized(e: &SnapshotEntry, size: u64) -> SnapshotEntry {
    let mut out = e.clone();
    if e.extra.len() < EXTRA_KNOWN {
        let mut extra = vec![0u8; EXTRA_KNOWN];
        fmt_::put64(&mut extra, 0, e.vm_state_size_large());
        fmt_::put64(&mut extra, 8, e.disk_size().unwrap_or(size));
        let icount = if e.extra.len() >= EXTRA_KNOWN {
            fmt_::be64(&e.extra, 16)
        } else {
            u64::MAX
        };
        fmt_::put64(&mut extra, 16, icount);
        out.extra = extra;
    }
    let large = fmt_::be64(&out.extra, 0);
    out.vm_state_size = u32::try_from(large).unwrap_or(0);
    out
}

/// Which refcounts a walk changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delta {
    Up,
    Down,
}

impl State {
    /// The snapshots, as listed by `qemu-img snapshot -l`.
    pub(crate) fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        let size = self.header.size;
        self.snapshots
            .entries()
            .iter()
            .map(|e| info_of(e, size))
            .collect()
    }

    /// The entry `r` names, or the not-found error QEMU gives.
    fn find_snapshot(&self, r: &SnapshotRef) -> Result<usize> {
        self.snapshots.find(r).ok_or_else(|| Error::NotFound {
            file: self.name().to_string(),
            what: format!("snapshot {r}"),
        })
    }

    /// Refuse snapshot changes on a read-only image, a snapshot view, or an image whose
    /// data lives in an external file.
    fn check_snapshot_change(&self) -> Result<()> {
        self.check_writable()?;
        if self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                self.name(),
                "internal snapshots of an image with an external data file",
            ));
        }
        Ok(())
    }

    /// Validate a snapshot's L1 table (as QEMU validates it before using it) and read it.
    pub(crate) fn read_snapshot_l1(&self, e: &SnapshotEntry) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        let bytes = e.l1_size as u64 * 8;
        let bad = |what: String| {
            Error::corrupt(
                self.name(),
                format!("snapshot '{}' (ID {}): {what}", e.name, e.id),
                e.l1_table_offset,
            )
        };
        if e.l1_size as u64 > header::MAX_L1_ENTRIES {
            return Err(bad(format!("L1 table too large ({} entries)", e.l1_size)));
        }
        if bytes == 0 {
            return Ok(Vec::new());
        }
        if !e.l1_table_offset.is_multiple_of(cs)
            || e.l1_table_offset == 0
            || e.l1_table_offset
                .checked_add(bytes)
                .is_none_or(|end| end > self.file.len())
        {
            return Err(bad(format!(
                "L1 table at {:#x} is invalid (not cluster aligned, or past the end of the file)",
                e.l1_table_offset
            )));
        }
        let mut b = vec![0u8; bytes as usize];
        self.file.read(
            &mut b,
            HostOffset::new(e.l1_table_offset),
            "snapshot L1 table",
        )?;
        Ok(fmt_::decode_table(&b))
    }

    /// The host clusters an L2 entry references (first, count), validated against the file.
    fn entry_refs(&self, e: L2Entry, at: u64) -> Result<Option<(HostCluster, u64)>> {
        let geo = self.geo;
        let (first, n) = match e.desc(&geo) {
            Desc::Normal { host } | Desc::ZeroAlloc { host } => {
                if !geo.is_cluster_aligned(host) {
                    return Err(Error::corrupt(
                        self.name(),
                        format!("L2 entry {:#x} names an unaligned cluster", e.word),
                        at,
                    ));
                }
                (geo.host_cluster(host), 1)
            }
            Desc::Compressed { offset, len } => {
                let first = geo.host_cluster(offset.sector_floor());
                let last = geo.host_cluster(offset + len.max(1).saturating_sub(1));
                (first, last - first + 1)
            }
            Desc::Unallocated | Desc::ZeroPlain => return Ok(None),
        };
        let end = geo.host_offset(first + n).get();
        if first.get() == 0 || end > self.file.len().next_multiple_of(geo.cluster_size()) {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "L2 entry {:#x} names clusters outside the file ({} bytes)",
                    e.word,
                    self.file.len()
                ),
                at,
            ));
        }
        Ok(Some((first, n)))
    }

    /// The L2 table an L1 entry names (validated), or `None`.
    fn tree_table(&self, l1e: u64, at: u64) -> Result<Option<HostOffset>> {
        if l1e & l2::L1E_RESERVED_MASK != 0 {
            return Err(Error::corrupt(
                self.name(),
                format!("L1 entry {l1e:#x} has reserved bits set"),
                at,
            ));
        }
        let off = l1e & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let off = HostOffset::new(off);
        self.check_meta_offset(off, "L2 table", at)?;
        Ok(Some(off))
    }

    /// A copy of the L2 table at `t` (through the cache).
    fn table_copy(&mut self, t: HostOffset) -> Result<Vec<u8>> {
        let i = self.caches.get(&mut self.file, Kind::L2, t, false)?;
        Ok(self.caches.data(Kind::L2, i).to_vec())
    }

    /// Entry `j` of an L2 table held in `d`.
    fn table_entry(&self, d: &[u8], j: usize) -> L2Entry {
        if self.geo.extended_l2() {
            L2Entry::new(fmt_::table_get(d, 2 * j), fmt_::table_get(d, 2 * j + 1))
        } else {
            L2Entry::new(fmt_::table_get(d, j), 0)
        }
    }

    /// Set the first word of entry `j` of the cached L2 table at `t`.
    fn set_table_word(&mut self, t: HostOffset, j: usize, word: u64) -> Result<()> {
        let i = self.caches.get(&mut self.file, Kind::L2, t, false)?;
        let pos = if self.geo.extended_l2() { 2 * j } else { j };
        fmt_::table_set(self.caches.data_mut(Kind::L2, i), pos, word);
        Ok(())
    }

    /// Before every table and cluster under `l1` gains a reference: validate them, make sure
    /// no refcount would overflow, and clear COPIED on the L2 entries (they become shared).
    /// Only the L2 tables change here; the caller clears the L1 entries' flags.
    fn prepare_share(&mut self, l1: &[u64], l1_at: u64) -> Result<()> {
        let max = refcount::max(self.geo.refcount_order());
        let overflow = |s: &State, c: HostCluster| {
            Error::invalid(format!(
                "{}: cannot add a reference to cluster {} for the snapshot: its refcount would exceed the maximum of the image's {}-bit refcounts ({max}); widen them with qemu-img amend -o refcount_bits=16",
                s.name(),
                c.get(),
                s.header.refcount_bits()
            ))
        };
        // Clusters that several entries reference (packed compressed data) gain one
        // reference per entry.
        let mut multi: HashMap<HostCluster, u64> = HashMap::new();
        for (i, &e) in l1.iter().enumerate() {
            let Some(t) = self.tree_table(e, l1_at + i as u64 * 8)? else {
                continue;
            };
            let tc = self.geo.host_cluster(t);
            if self.refcount(tc)? >= max {
                return Err(overflow(self, tc));
            }
            let d = self.table_copy(t)?;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = self.table_entry(&d, j);
                let at = t.get() + j as u64 * self.geo.l2_entry_size();
                if let Some((first, n)) = self.entry_refs(entry, at)? {
                    if entry.word & OFLAG_COMPRESSED != 0 {
                        for k in 0..n {
                            *multi.entry(first + k).or_default() += 1;
                        }
                    } else if self.refcount(first)? >= max {
                        return Err(overflow(self, first));
                    }
                }
                if entry.copied() && entry.word & OFLAG_COMPRESSED == 0 {
                    self.set_table_word(t, j, entry.word & !OFLAG_COPIED)?;
                }
            }
        }
        for (c, k) in multi {
            if self.refcount(c)?.saturating_add(k) > max {
                return Err(overflow(self, c));
            }
        }
        Ok(())
    }

    /// Add or drop one reference to every L2 table and data cluster under `l1`. Dropped
    /// references are released at once (the caller made the pointer removal stable), and
    /// clusters that become free are punched out of the file.
    fn walk_refcounts(&mut self, l1: &[u64], l1_at: u64, delta: Delta) -> Result<()> {
        let r = self.walk_refcounts_inner(l1, l1_at, delta);
        self.file.punch_pending();
        r
    }

    fn walk_refcounts_inner(&mut self, l1: &[u64], l1_at: u64, delta: Delta) -> Result<()> {
        for (i, &e) in l1.iter().enumerate() {
            let Some(t) = self.tree_table(e, l1_at + i as u64 * 8)? else {
                continue;
            };
            let d = self.table_copy(t)?;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = self.table_entry(&d, j);
                let at = t.get() + j as u64 * self.geo.l2_entry_size();
                if let Some((first, n)) = self.entry_refs(entry, at)? {
                    for k in 0..n {
                        self.change_one(first + k, delta)?;
                    }
                }
            }
            self.change_one(self.geo.host_cluster(t), delta)?;
        }
        Ok(())
    }

    fn change_one(&mut self, c: HostCluster, delta: Delta) -> Result<()> {
        match delta {
            Delta::Up => self.change_refcount(c, 1).map(|_| ()),
            Delta::Down => self.release_cluster(c, true),
        }
    }

    /// Release `n` clusters at `off` at once: nothing on disk names them any more (their
    /// pointer removal is stable), or nothing ever did (a failed operation's allocations).
    fn release_now(&mut self, off: u64, n: u64) -> Result<()> {
        if off == 0 {
            return Ok(());
        }
        let first = self.geo.host_cluster(HostOffset::new(off));
        let r = (0..n).try_for_each(|k| self.release_cluster(first + k, true));
        self.file.punch_pending();
        r
    }

    /// Write `bytes` (a table) to newly allocated clusters; returns their offset (0 for an
    /// empty table) and count.
    fn write_new_table(&mut self, bytes: &[u8], what: &str) -> Result<(u64, u64)> {
        if bytes.is_empty() {
            return Ok((0, 0));
        }
        let n = self.geo.clusters_for(bytes.len() as u64);
        let off = self.alloc_clusters(n)?;
        let mut b = bytes.to_vec();
        b.resize((n * self.geo.cluster_size()) as usize, 0);
        if let Err(e) = self.file.write_meta(&b, off, what) {
            let _ = self.release_now(off.get(), n);
            return Err(e);
        }
        Ok((off.get(), n))
    }

    /// Write the refcount blocks (not in lazy mode: they are not trusted there), then a barrier.
    fn refcounts_stable(&mut self) -> Result<()> {
        if !self.access.lazy() {
            self.caches.write_all(&mut self.file, Kind::Refblock)?;
        }
        self.file.barrier()
    }

    /// Write `list` as the new snapshot table and switch the header to it (create, steps 3-4;
    /// delete, step 2). Returns the old table (offset, clusters), to be freed by the caller.
    fn switch_snapshot_table(&mut self, list: Vec<SnapshotEntry>) -> Result<(u64, u64)> {
        let size = self.header.size;
        let list: Vec<SnapshotEntry> = list.iter().map(|e| normalized(e, size)).collect();
        let bytes = snapshot::serialize(&list);
        if bytes.len() as u64 > MAX_TABLE_SIZE {
            return Err(Error::invalid(format!(
                "{}: the snapshot table would exceed QEMU's limit of 64 MiB",
                self.name()
            )));
        }
        let old = (
            self.header.snapshots_offset,
            self.geo.clusters_for(self.snapshots.table_size()),
        );
        // From here on a failure leaks the new table: a failed header write may still have
        // reached the disk (and poisons the image), so nothing the new header names is freed.
        let (off, _) = self.write_new_table(&bytes, "new snapshot table")?;
        if !mutant("snap-table-barrier") {
            self.refcounts_stable()?;
        }
        let count = list.len() as u32;
        self.write_header(
            header::SNAPSHOT_FIELDS,
            "header (snapshot table switch)",
            |h| {
                h.nb_snapshots = count;
                h.snapshots_offset = off;
            },
        )?;
        self.snapshots.list = list;
        self.meta.invalidate();
        self.file.barrier()?;
        Ok(old)
    }

    /// Start a snapshot operation: settle pending work, then wait for data I/O that runs
    /// outside the lock (it may not reach a cluster whose sharing changes). Returns the held
    /// I/O gate.
    fn quiet_for_snapshot(&mut self) -> Result<std::sync::Arc<std::sync::RwLock<()>>> {
        // Entries change wholesale (COPIED flags, the active L1): writes in flight redo.
        self.reserved.everything_changed();
        self.flush_inner()?;
        // Lazy refcounts: the dirty bit first, so that a crash anywhere in the operation is
        // repaired whole (refcounts and COPIED flags) by the next read-write open.
        self.mark_dirty()?;
        // Give back the allocation run, so that the new tables go to the first free clusters
        // rather than past the run (nothing points into it).
        self.trim_unused_run()?;
        self.return_run()?;
        Ok(self.file.io_gate())
    }

    /// Show the snapshot `r` names instead of the active disk (a read-only image only): its
    /// L1 table becomes the one lookups use, its disk size the virtual size, as QEMU's
    /// `qcow2_snapshot_load_tmp` does.
    pub(crate) fn enter_snapshot_view(&mut self, r: &SnapshotRef) -> Result<()> {
        debug_assert!(self.access.read_only());
        let idx = self.find_snapshot(r)?;
        let sn = self.snapshots.entries()[idx].clone();
        let info = info_of(&sn, self.header.size);
        let l1 = self.read_snapshot_l1(&sn)?;
        let need = self
            .header
            .l1_entries_for(info.disk_size)
            .unwrap_or(u64::MAX);
        if need > l1.len() as u64 {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "snapshot '{}' (ID {}): its L1 table ({} entries) is too small for its disk size ({} bytes)",
                    sn.name, sn.id, sn.l1_size, info.disk_size
                ),
                sn.l1_table_offset,
            ));
        }
        self.tables.replace(l1);
        self.header.change_for_view(|h| {
            h.size = info.disk_size;
            h.l1_table_offset = sn.l1_table_offset;
            h.l1_size = sn.l1_size;
        });
        self.meta.invalidate();
        self.snapshots.set_view(info);
        Ok(())
    }

    /// Create a snapshot of the active image (see the crash analysis above).
    pub(crate) fn create_snapshot_inner(&mut self, opts: &SnapshotOptions) -> Result<SnapshotInfo> {
        self.check_snapshot_change()?;
        if opts.name.contains('\0') || opts.name.len() > u16::MAX as usize {
            return Err(Error::invalid(format!(
                "{}: a snapshot name may not contain NUL bytes or be longer than 65535 bytes",
                self.name()
            )));
        }
        if opts.date.is_some_and(|(_, nsec)| nsec >= 1_000_000_000) {
            return Err(Error::invalid(format!(
                "{}: a snapshot date's nanoseconds must be below 1000000000",
                self.name()
            )));
        }
        if self.snapshots.entries().len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::invalid(format!(
                "{}: the image already has {MAX_SNAPSHOTS} snapshots, QEMU's limit",
                self.name()
            )));
        }
        let gate = self.quiet_for_snapshot()?;
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        let (date_sec, date_nsec) = opts.date.unwrap_or_else(now);
        let size = self.header.size;
        let mut extra = vec![0u8; EXTRA_KNOWN];
        fmt_::put64(&mut extra, 8, size);
        fmt_::put64(&mut extra, 16, opts.icount.unwrap_or(u64::MAX));
        let mut entry = SnapshotEntry {
            l1_table_offset: 0,
            l1_size: self.tables.l1().len() as u32,
            id: self.snapshots.next_id(),
            name: opts.name.clone(),
            date_sec,
            date_nsec,
            vm_clock_nsec: opts.vm_clock_nsec,
            vm_state_size: 0,
            extra,
            raw: None,
        };
        let mut list = self.snapshots.entries().to_vec();
        list.push(entry.clone());
        if snapshot::table_size(&list) > MAX_TABLE_SIZE {
            return Err(Error::invalid(format!(
                "{}: the snapshot table would exceed QEMU's limit of 64 MiB",
                self.name()
            )));
        }
        // Step 2: everything in the active tree becomes shared.
        let l1 = self.tables.l1().to_vec();
        let l1_at = self.header.l1_table_offset;
        if let Err(e) = self.prepare_share(&l1, l1_at) {
            // Some flags may be cleared already: put back the ones that are still right.
            let _ = self.restore_copied();
            return Err(e);
        }
        self.tables.clear_copied();
        self.caches.write_all(&mut self.file, Kind::L2)?;
        self.write_l1_dirty()?;
        if !mutant("snap-copied-first") {
            self.file.barrier()?;
        }
        // Step 3: the snapshot's L1 table, the references, the new snapshot table.
        let (l1_off, l1_n) = self.write_new_table(&fmt_::encode_table(&l1), "snapshot L1 table")?;
        entry.l1_table_offset = l1_off;
        *list.last_mut().expect("just pushed") = entry.clone();
        if let Err(e) = self.walk_refcounts(&l1, l1_at, Delta::Up) {
            let _ = self.release_now(l1_off, l1_n);
            return Err(e);
        }
        // A failure from here on leaks the snapshot's L1 table (the header may name it).
        let old = self.switch_snapshot_table(list)?;
        // Step 4 done: the old table is no longer named.
        self.release_now(old.0, old.1)?;
        Ok(info_of(&entry, size))
    }

    /// Make the snapshot `r` names the active image (see the crash analysis above).
    pub(crate) fn apply_snapshot_inner(&mut self, r: &SnapshotRef) -> Result<SnapshotInfo> {
        self.check_snapshot_change()?;
        let idx = self.find_snapshot(r)?;
        let sn = self.snapshots.entries()[idx].clone();
        let info = info_of(&sn, self.header.size);
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let disk_size = info.disk_size;
        let new_len = self
            .header
            .l1_entries_for(disk_size)
            .filter(|&n| n <= header::MAX_L1_ENTRIES)
            .ok_or_else(|| {
                Error::corrupt(
                    self.name(),
                    format!(
                        "snapshot '{}' (ID {}) records a disk size too large for the image ({disk_size} bytes)",
                        sn.name, sn.id
                    ),
                    self.header.snapshots_offset,
                )
            })?;
        let gate = self.quiet_for_snapshot()?;
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        // The new active L1: the snapshot's, cut or padded to the disk size (what lies past it
        // is saved VM state, which is not part of the disk), COPIED clear (all shared).
        let new_l1: Vec<u64> = (0..new_len as usize)
            .map(|i| sn_l1.get(i).copied().unwrap_or(0) & !OFLAG_COPIED)
            .collect();
        let sn_at = sn.l1_table_offset;
        let old_off = self.header.l1_table_offset;
        let old_n = self.geo.clusters_for(self.header.l1_size as u64 * 8);
        self.prepare_share(&new_l1, sn_at)?;
        self.walk_refcounts(&new_l1, sn_at, Delta::Up)?;
        // A failure from here on leaks the new L1 table: a failed header write may still have
        // reached the disk (and poisons the image), so nothing the new header names is freed.
        let (l1_off, _) =
            self.write_new_table(&fmt_::encode_table(&new_l1), "new active L1 table")?;
        self.caches.write_all(&mut self.file, Kind::L2)?;
        if !mutant("snap-apply-barrier") {
            self.refcounts_stable()?;
        }
        self.write_header(
            header::SIZE_FIELD.start..header::L1_FIELDS.end,
            "header (active L1 and size switch)",
            |h| {
                h.size = disk_size;
                h.l1_size = new_len as u32;
                h.l1_table_offset = l1_off;
            },
        )?;
        let old_l1 = self.tables.replace(new_l1);
        self.meta.invalidate();
        self.decompressed.clear();
        self.forget_packing();
        self.file.barrier()?;
        // The old active tree is gone for good: drop its references and free its L1.
        self.walk_refcounts(&old_l1, old_off, Delta::Down)?;
        self.release_now(old_off, old_n)?;
        Ok(info)
    }

    /// Delete the snapshot `r` names (see the crash analysis above).
    pub(crate) fn delete_snapshot_inner(&mut self, r: &SnapshotRef) -> Result<SnapshotInfo> {
        self.check_snapshot_change()?;
        let idx = self.find_snapshot(r)?;
        let sn = self.snapshots.entries()[idx].clone();
        let info = info_of(&sn, self.header.size);
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let gate = self.quiet_for_snapshot()?;
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        let mut list = self.snapshots.entries().to_vec();
        list.remove(idx);
        // Step 2: the table without the entry.
        let old = self.switch_snapshot_table(list)?;
        self.release_now(old.0, old.1)?;
        // Step 3: the snapshot's tree loses its references.
        self.walk_refcounts(&sn_l1, sn.l1_table_offset, Delta::Down)?;
        self.release_now(
            sn.l1_table_offset,
            self.geo.clusters_for(sn.l1_size as u64 * 8),
        )?;
        // Step 4: what the active tree shared with it may regain COPIED, once the lowered
        // refcounts are stable. Until then every L2 write (an eviction) waits for them.
        if !self.access.lazy() && !mutant("snap-copied-last") {
            self.caches.set_dependency(&mut self.file, Kind::L2)?;
        }
        if self.restore_copied()? {
            if !self.access.lazy() && !mutant("snap-copied-last") {
                self.caches.flush(&mut self.file, Kind::Refblock)?;
            }
            self.caches.satisfied(Kind::L2);
            self.caches.write_all(&mut self.file, Kind::L2)?;
            self.write_l1_dirty()?;
            self.file.barrier()?;
        }
        Ok(info)
    }

    /// Set the COPIED flags of the active tree from the refcounts: on where a table or cluster
    /// has exactly one reference, off elsewhere. Returns whether any flag changed (the changes
    /// are in the L2 cache and the dirty L1 entries, not yet written).
    pub(crate) fn restore_copied(&mut self) -> Result<bool> {
        let l1 = self.tables.l1().to_vec();
        let l1_at = self.header.l1_table_offset;
        let mut changed = false;
        for (i, &e) in l1.iter().enumerate() {
            let Some(t) = self.tree_table(e, l1_at + i as u64 * 8)? else {
                continue;
            };
            let own = self.refcount(self.geo.host_cluster(t))? == 1;
            if (e & OFLAG_COPIED != 0) != own {
                self.tables.set_copied(i, own);
                changed = true;
            }
            let d = self.table_copy(t)?;
            for j in 0..self.geo.l2_entries() as usize {
                let entry = self.table_entry(&d, j);
                if !matches!(
                    entry.desc(&self.geo),
                    Desc::Normal { .. } | Desc::ZeroAlloc { .. }
                ) {
                    continue;
                }
                let at = t.get() + j as u64 * self.geo.l2_entry_size();
                let Some((c, _)) = self.entry_refs(entry, at)? else {
                    continue;
                };
                let want = self.refcount(c)? == 1;
                if entry.copied() != want {
                    let word = if want {
                        entry.word | OFLAG_COPIED
                    } else {
                        entry.word & !OFLAG_COPIED
                    };
                    self.set_table_word(t, j, word)?;
                    changed = true;
                }
            }
        }
        if changed {
            self.pending.changed();
        }
        Ok(changed)
    }
}

/// Seconds and nanoseconds since the Unix epoch, to the microsecond as QEMU records them.
fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra: Vec::new(),
            raw: None,
        }
    }

    #[test]
    fn lookup_and_ids_as_qemu() {
        let s = Snapshots::new(vec![entry("1", "s1"), entry("2", "1"), entry("7", "s1")]);
        assert_eq!(s.find(&"s1".into()), Some(0));
        // An ID wins over a name.
        assert_eq!(s.find(&"1".into()), Some(0));
        assert_eq!(s.find(&SnapshotRef::Name("1".into())), Some(1));
        assert_eq!(s.find(&SnapshotRef::Id("7".into())), Some(2));
        assert_eq!(
            s.find(&SnapshotRef::IdAndName("7".into(), "s1".into())),
            Some(2)
        );
        assert_eq!(s.find(&"nope".into()), None);
        assert_eq!(s.next_id(), "8");
        let odd = Snapshots::new(vec![entry("abc", "x"), entry("12x", "y")]);
        assert_eq!(odd.next_id(), "13");
        assert_eq!(Snapshots::default().next_id(), "1");
    }

    #[test]
    fn short_entries_are_completed_on_rewrite() {
        let mut e = entry("1", "old");
        e.vm_state_size = 4096;
        let n = normalized(&e, 1 << 20);
        assert_eq!(n.extra.len(), EXTRA_KNOWN);
        assert_eq!(fmt_::be64(&n.extra, 0), 4096);
        assert_eq!(fmt_::be64(&n.extra, 8), 1 << 20);
        assert_eq!(fmt_::be64(&n.extra, 16), u64::MAX);
        let i = info_of(&n, 0);
        assert_eq!(
            (i.vm_state_size, i.disk_size, i.icount),
            (4096, 1 << 20, None)
        );
        // Unknown extra data is kept.
        let mut long = entry("2", "new");
        long.extra = vec![0u8; 40];
        long.extra[39] = 7;
        assert_eq!(normalized(&long, 0).extra, long.extra);
    }
}
