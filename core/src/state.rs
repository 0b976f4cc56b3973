//! The mutable state of an open image, behind the image's lock, split into parts that say what
//! they are. Each part's fields are private to the module that owns it; the others call its
//! methods:
//!
//! | part | type | owner |
//! |---|---|---|
//! | shape (cluster size, entry formats) | [`Geometry`] | `offset.rs` (fixed at open) |
//! | the host file, its extent, barriers | [`HostFile`] | `host.rs` |
//! | the header as stored | [`StoredHeader`] | here |
//! | the active L1 table | [`Tables`] | `mapping.rs` |
//! | refcount table, free space, reserved run | [`Allocator`] | `alloc.rs` |
//! | what the next flush owes | [`Pending`] | `flush.rs` |
//! | L2 and refcount-block caches | [`Caches`] | `cache.rs` |
//! | the last decompressed cluster | [`Decompressed`] | `datapath.rs` |
//! | the snapshot table, a snapshot view | [`Snapshots`] | `snapshot.rs` |
//! | the metadata clusters guest data must not hit | [`MetaClusters`] | here |
//! | read-only or writable, closed | [`Access`] | here |

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use crate::alloc::Allocator;
use crate::backing::Backing;
use crate::cache::Caches;
use crate::crypto::Crypto;
use crate::datapath::Decompressed;
use crate::error::{Error, Result};
use crate::flush::Pending;
use crate::format::header::Header;
use crate::format::l2::L1E_OFFSET_MASK;
use crate::format::refcount::REFT_OFFSET_MASK;
use crate::host::HostFile;
use crate::mapping::Tables;
use crate::offset::{Geometry, GuestOffset, HostCluster, HostOffset};
use crate::options::{CacheMode, CompressionType};
use crate::snapshot::Snapshots;

/// The mutable state of an open image.
pub(crate) struct State {
    pub geo: Geometry,
    pub file: HostFile,
    pub header: StoredHeader,
    pub tables: Tables,
    pub alloc: Allocator,
    pub pending: Pending,
    pub caches: Caches,
    pub decompressed: Decompressed,
    pub meta: MetaClusters,
    pub access: Access,
    /// Fixed at open.
    pub backing: Option<Backing>,
    /// The snapshot table (`snapshot.rs`).
    pub snapshots: Snapshots,
    /// Fixed at open.
    pub compression: CompressionType,
    /// The cipher of an encrypted image (`crypto/`); replaced when key slots change.
    pub crypto: Option<Arc<Crypto>>,
    /// Clusters allocated for writes that encrypt outside the lock (`datapath.rs`).
    pub reserved: crate::datapath::Reservations,
}

impl State {
    /// The file name, for messages.
    pub(crate) fn name(&self) -> &str {
        self.file.name()
    }

    /// Refuse writes to a read-only or poisoned image.
    pub(crate) fn check_writable(&self) -> Result<()> {
        self.access.check_writable(self.file.name())?;
        self.file.poisoned()
    }

    /// Refuse guest data I/O on an encrypted image opened without its password.
    pub(crate) fn check_key(&self) -> Result<()> {
        match &self.crypto {
            Some(c) if !c.unlocked() => Err(Error::NeedKey {
                file: self.name().to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Refuse a guest range past the virtual size.
    pub(crate) fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(Error::invalid(format!(
                "{}: range {off}+{len} is past the end of the disk ({} bytes)",
                self.name(),
                self.header.size
            ))),
        }
    }

    /// The end of the guest disk.
    pub(crate) fn disk_end(&self) -> GuestOffset {
        GuestOffset::new(self.header.size)
    }

    /// Change header fields: `change` is applied to a copy, the bytes of `field` are written
    /// from it, and only once that write succeeded does the in-memory header take the change.
    /// A failed write poisons the image (the header on disk is unknown).
    pub(crate) fn write_header(
        &mut self,
        field: Range<usize>,
        what: &str,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        self.header.write(&mut self.file, field, what, change)
    }

    /// Whether host cluster `c` holds metadata (header, L1, refcount table and blocks, active
    /// L2 tables, snapshot table and the snapshots' L1 and L2 tables, LUKS header area). The set
    /// is built when first needed.
    pub(crate) fn is_metadata(&mut self, c: HostCluster) -> bool {
        if self.meta.set.is_none() {
            let geo = self.geo;
            // The snapshots' L2 tables: one whose refcount was 0 was handed out by the
            // allocator and overwritten (the snapshot lost its data). A snapshot L1 table that
            // cannot be read contributes nothing here (using the snapshot reports it).
            let mut snapshot_l2 = Vec::new();
            for e in self.snapshots.entries() {
                if let Ok(l1) = self.read_snapshot_l1(e) {
                    snapshot_l2.extend(l1.iter().map(|&x| x & L1E_OFFSET_MASK));
                }
            }
            let mut m = HashSet::new();
            let mut range = |off: u64, len: u64| {
                if len > 0 {
                    let first = geo.host_cluster(HostOffset::new(off));
                    for i in 0..geo.clusters_for(off % geo.cluster_size() + len) {
                        m.insert(first + i);
                    }
                }
            };
            let h = &*self.header;
            range(0, geo.cluster_size());
            range(h.l1_table_offset, h.l1_size as u64 * 8);
            range(
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * geo.cluster_size(),
            );
            range(h.snapshots_offset, self.snapshots.table_size());
            for e in self.snapshots.entries() {
                range(e.l1_table_offset, e.l1_size as u64 * 8);
            }
            if let Some(a) = self.crypto.as_ref().and_then(|c| c.luks.as_ref()) {
                range(a.offset.get(), a.len);
            }
            for &e in self.alloc.reftable() {
                let o = e & REFT_OFFSET_MASK;
                if o != 0 {
                    m.insert(geo.host_cluster(HostOffset::new(o)));
                }
            }
            for &o in self.tables.l1().iter().chain(&snapshot_l2) {
                let o = o & L1E_OFFSET_MASK;
                if o != 0 {
                    m.insert(geo.host_cluster(HostOffset::new(o)));
                }
            }
            self.meta.set = Some(m);
        }
        self.meta.set.as_ref().is_some_and(|m| m.contains(&c))
    }
}

impl State {
    /// What other metadata (header, L1 table, refcount table or block, snapshot table or L1
    /// table, encryption header) shares the cluster of the L2 table at `l2`, if any: a table
    /// that is to be written in place must not (a crafted L1 entry with COPIED naming the
    /// refcount table made a guest write put its L2 entry there). Checked once per table.
    pub(crate) fn l2_overlap(&mut self, l2: HostOffset) -> Option<&'static str> {
        let c = self.geo.host_cluster(l2);
        if self.meta.l2_ok.contains(&c) {
            return None;
        }
        let cs = self.geo.cluster_size();
        let h = &*self.header;
        let hit =
            |off: u64, len: u64| len > 0 && off / cs <= c.get() && c.get() <= (off + len - 1) / cs;
        let what = if c.get() == 0 {
            Some("image header")
        } else if hit(h.l1_table_offset, h.l1_size as u64 * 8) {
            Some("active L1 table")
        } else if hit(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        ) {
            Some("refcount table")
        } else if h.nb_snapshots > 0 && hit(h.snapshots_offset, self.snapshots.table_size()) {
            Some("snapshot table")
        } else if self
            .snapshots
            .entries()
            .iter()
            .any(|e| hit(e.l1_table_offset, e.l1_size as u64 * 8))
        {
            Some("L1 table of a snapshot")
        } else if self
            .crypto
            .as_ref()
            .and_then(|k| k.luks.as_ref())
            .is_some_and(|a| hit(a.offset.get(), a.len))
        {
            Some("encryption header")
        } else if self
            .alloc
            .reftable()
            .iter()
            .any(|&e| e & REFT_OFFSET_MASK == l2.get())
        {
            Some("refcount block")
        } else {
            None
        };
        if what.is_none() {
            self.meta.l2_ok.insert(c);
        }
        what
    }
}

/// The header as stored in the file. Read it through `Deref`; change it only with
/// [`StoredHeader::write`], which writes first and changes memory after.
pub(crate) struct StoredHeader(Header);

impl StoredHeader {
    pub(crate) fn new(h: Header) -> StoredHeader {
        StoredHeader(h)
    }

    /// Write the bytes of `field` with `change` applied; keep the change once written.
    pub(crate) fn write(
        &mut self,
        file: &mut HostFile,
        field: Range<usize>,
        what: &str,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut h = self.0.clone();
        change(&mut h);
        let b = h.field_bytes(field.clone());
        if let Err(e) = file.write_meta(&b, HostOffset::new(field.start as u64), what) {
            // A failed write may still have reached the disk: the header there is now the
            // old one or the new one, and memory cannot know which (a table switch, above
            // all). Refuse to go on until the image is reopened.
            file.poison_header(&e);
            return Err(e);
        }
        self.0 = h;
        Ok(())
    }
}

impl StoredHeader {
    /// Change the header in memory only: for a read-only snapshot view, which shows the
    /// snapshot's size and L1 table and never writes the header.
    pub(crate) fn change_for_view(&mut self, change: impl FnOnce(&mut Header)) {
        change(&mut self.0);
    }

    /// Rewrite the whole header cluster (fields and extensions) with `change` applied; keep
    /// the change once written. Only for creation: the write is not atomic.
    pub(crate) fn rewrite(
        &mut self,
        file: &mut HostFile,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut h = self.0.clone();
        change(&mut h);
        let b = h.serialize().map_err(|e| match e {
            crate::format::header::HeaderError::Corrupt(w, _)
            | crate::format::header::HeaderError::Unsupported(w) => {
                Error::invalid(format!("{}: {w}", file.name()))
            }
        })?;
        file.write_meta(&b, HostOffset::new(0), "header")?;
        self.0 = h;
        Ok(())
    }
}

impl std::ops::Deref for StoredHeader {
    type Target = Header;
    fn deref(&self) -> &Header {
        &self.0
    }
}

/// The host clusters that hold metadata, so that no guest write lands there (a crafted or
/// damaged image must not steer a guest write into its own header or tables). Built on demand;
/// dropped after any change of the metadata layout that is not tracked one cluster at a time.
#[derive(Default)]
pub(crate) struct MetaClusters {
    set: Option<HashSet<HostCluster>>,
    /// L2 tables found not to share their cluster with other metadata (`State::l2_overlap`).
    l2_ok: HashSet<HostCluster>,
}

impl MetaClusters {
    /// A new metadata cluster (a new L2 table or refcount block).
    pub(crate) fn note(&mut self, c: HostCluster) {
        if let Some(m) = &mut self.set {
            m.insert(c);
        }
    }
    /// The layout changed: rebuild the set when next needed.
    pub(crate) fn invalidate(&mut self) {
        self.set = None;
        self.l2_ok.clear();
    }
    /// Cluster `c` was freed: if it held metadata, the set is stale.
    pub(crate) fn freed(&mut self, c: HostCluster) {
        self.l2_ok.remove(&c);
        if self.set.as_ref().is_some_and(|m| m.contains(&c)) {
            self.set = None;
        }
    }
}

/// Whether the image may be written, and why not; whether it was closed.
pub(crate) struct Access {
    read_only: bool,
    reason: String,
    /// The file was opened for writing (repair may make a corrupt-marked image writable).
    writable_storage: bool,
    cache_mode: CacheMode,
    lazy_refcounts: bool,
    closed: bool,
}

impl Access {
    pub(crate) fn new(
        read_only: bool,
        reason: String,
        writable_storage: bool,
        cache_mode: CacheMode,
        lazy_refcounts: bool,
    ) -> Access {
        Access {
            read_only,
            reason,
            writable_storage,
            cache_mode,
            lazy_refcounts,
            closed: false,
        }
    }
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }
    pub(crate) fn writable_storage(&self) -> bool {
        self.writable_storage
    }
    pub(crate) fn cache_mode(&self) -> CacheMode {
        self.cache_mode
    }
    /// Lazy refcounts are in use this session.
    pub(crate) fn lazy(&self) -> bool {
        self.lazy_refcounts
    }
    fn check_writable(&self, file: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: file.to_string(),
                reason: self.reason.clone(),
            });
        }
        Ok(())
    }
    /// Repair cleared the corrupt bit of an image opened for writing.
    pub(crate) fn allow_writes(&mut self) {
        if self.writable_storage {
            self.read_only = false;
            self.reason.clear();
        }
    }
    /// Mark closed; returns whether it already was.
    pub(crate) fn close(&mut self) -> bool {
        std::mem::replace(&mut self.closed, true)
    }
}

/// Lock the state. A panic in another thread that held it does not make later calls panic.
pub(crate) fn lock(state: &std::sync::Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}
