//! The image: open/create, read/write/zeroes/discard/flush/resize, info and map.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::backing::{self, Backing};
use crate::cache::{Caches, Kind};
use crate::check::{CheckReport, RepairMode};
use crate::compress;
use crate::error::{Error, Result};
use crate::format::header::{self, Header, HeaderError};
use crate::format::l2::{self, Desc, L1E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use crate::format::refcount;
use crate::format::snapshot::{self, SnapshotEntry};
use crate::format::{self as fmt};
use crate::mutants::active as mutant;
use crate::options::{
    CacheMode, Compat, CompressionType, CreateOptions, OpenOptions, Preallocation,
};
use crate::storage::{FileStorage, Storage};

/// Facts about an image, as `qemu-img info` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name the image was opened with.
    pub filename: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Bytes the host file occupies on disk.
    pub actual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Version.
    pub compat: Compat,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts bit.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit (lazy refcounts in use and not cleanly closed).
    pub dirty: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// Backing file format as stored in the image.
    pub backing_format: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Encryption method (0 none, 1 AES, 2 LUKS).
    pub crypt_method: u32,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// Whether the image is open read-only.
    pub read_only: bool,
}

/// One extent of the guest address space, as `qemu-img map --output=json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Backing-chain depth the data comes from (0 = this image; the chain length when unallocated).
    pub depth: u32,
    /// Whether some image in the chain holds it.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (allocated).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the file at `depth`, for uncompressed data.
    pub offset: Option<u64>,
}

/// The mutable state of an open image, behind the image's lock.
pub(crate) struct State {
    pub name: String,
    pub storage: Arc<dyn Storage>,
    pub h: Header,
    pub cs: u64,
    pub cluster_bits: u32,
    pub l2_entries: u64,
    pub extended: bool,
    pub rb_entries: u64,
    pub l1: Vec<u64>,
    pub reftable: Vec<u64>,
    pub caches: Caches,
    pub free_cluster_index: u64,
    pub alloc_end: u64,
    pub known_len: u64,
    /// End of everything ever written to the file (the file length at open counts as written).
    /// Clusters past it read as zeros.
    pub written_end: u64,
    pub read_only: bool,
    pub ro_reason: String,
    pub writable_storage: bool,
    pub backing: Option<Backing>,
    pub cache_mode: CacheMode,
    pub lazy: bool,
    /// Reference drops waiting for their pointer removal to become stable.
    pub deferred_frees: Vec<(u64, bool)>,
    /// Clusters reserved (refcount raised) and not yet handed out.
    pub run: std::ops::Range<u64>,
    /// Refcount increases in the cache that are not yet stable.
    pub incr_pending: bool,
    /// The file was extended and the new length is not yet stable.
    pub len_pending: bool,
    /// Active L1 entries changed in memory and not yet written.
    pub l1_dirty: BTreeSet<usize>,
    pub snapshots: Vec<SnapshotEntry>,
    /// Where the next compressed cluster may be packed (inside a host cluster holding only
    /// compressed data written this session); 0 when none. Reset when that cluster loses a
    /// reference: it may become free and be reused.
    pub comp_pos: u64,
    /// The last decompressed cluster: (host offset, data). Dropped whenever a cluster is freed.
    pub comp_cache: Option<(u64, Vec<u8>)>,
    /// Host clusters holding metadata (header, L1, refcount table and blocks, active L2
    /// tables, snapshot table): guest data is never written there. Built on demand; `None`
    /// after any change of the metadata layout that is not tracked incrementally.
    pub meta_clusters: Option<std::collections::HashSet<u64>>,
    /// Data was written since the last barrier (set after the write completes, by threads
    /// writing outside the lock too).
    pub data_written: Arc<AtomicBool>,
    /// Held shared by data I/O running outside the state lock; held exclusively while freed
    /// clusters are released, so that no such I/O can reach a cluster that is being reused.
    pub io_gate: Arc<RwLock<()>>,
    pub compression: CompressionType,
    pub closed: bool,
    /// Bumped whenever ordering state changes (pending increments, dependencies, new tables,
    /// L1 changes, deferred frees): a flush that ran its final barrier outside the lock marks
    /// that state stable only if nothing changed meanwhile.
    pub meta_epoch: u64,
}

/// What a flush wrote before its final barrier, to be marked stable after it.
pub(crate) struct FlushTicket {
    epoch: u64,
    unlinked: Vec<u64>,
    frees: Vec<(u64, bool)>,
}

/// Group commit: at most one flush runs at a time; `done` is the write sequence number that
/// the last completed flush covers.
#[derive(Default)]
struct GroupCommit {
    running: bool,
    done: u64,
}

/// An open qcow2 image. `Send + Sync`: share it between threads with `Arc`.
pub struct Image {
    state: Mutex<State>,
    name: String,
    cluster_size: u32,
    compression: CompressionType,
    gc: Mutex<GroupCommit>,
    gc_cv: std::sync::Condvar,
    /// Completed guest writes (and flush requests), numbered.
    write_seq: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("file", &self.name)
            .field("cluster_size", &self.cluster_size)
            .finish_non_exhaustive()
    }
}

fn map_header_err(name: &str, e: HeaderError) -> Error {
    match e {
        HeaderError::Corrupt(what, off) => Error::corrupt(name, what, off),
        HeaderError::Unsupported(f) => Error::unsupported(name, f),
    }
}

impl State {
    pub(crate) fn file_len(&self) -> Result<u64> {
        Ok(self.known_len)
    }

    pub(crate) fn write_meta(&mut self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, off)
            .map_err(|e| Error::io(&self.name, format!("write {what} at {off:#x}"), e))?;
        self.known_len = self.known_len.max(off + buf.len() as u64);
        self.written_end = self.written_end.max(off + buf.len() as u64);
        Ok(())
    }

    fn write_data(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.storage
            .write_at(buf, off)
            .map_err(|e| Error::io(&self.name, format!("write data at {off:#x}"), e))?;
        self.known_len = self.known_len.max(off + buf.len() as u64);
        self.written_end = self.written_end.max(off + buf.len() as u64);
        // The next flush owes a barrier for it, whatever the caller.
        self.data_written.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn barrier(&mut self) -> Result<()> {
        if self.caches.no_barriers {
            return Ok(());
        }
        self.storage.flush().map_err(|e| {
            self.caches.poison(&e);
            Error::io(&self.name, "flush", e)
        })
    }

    /// Change header fields: `change` is applied to a copy, the bytes of `field` are written
    /// from it, and only once that write succeeded does the in-memory header take the change.
    pub(crate) fn write_header(
        &mut self,
        field: std::ops::Range<usize>,
        what: &str,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut h = self.h.clone();
        change(&mut h);
        let b = h.field_bytes(field.clone());
        self.write_meta(&b, field.start as u64, what)?;
        self.h = h;
        Ok(())
    }

    /// The error every write and flush returns once an fdatasync failed: the kernel may have
    /// dropped the pages it could not write and will not report that again, so nothing written
    /// since the last successful flush can be trusted to be on disk. Like a database after a
    /// failed fsync, the image refuses to go on until it is reopened.
    pub(crate) fn poisoned(&self) -> Result<()> {
        match self.caches.poisoned() {
            None => Ok(()),
            Some(errno) => Err(Error::Io {
                file: self.name.clone(),
                context: "refusing to write: an earlier flush (fdatasync) failed, so data written \
                          since the last successful flush may not be on disk; close and reopen \
                          the image"
                    .into(),
                source: match errno {
                    Some(n) => std::io::Error::from_raw_os_error(n),
                    None => std::io::Error::other("earlier flush failed"),
                },
            }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: self.name.clone(),
                reason: self.ro_reason.clone(),
            });
        }
        self.poisoned()
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.h.size => Ok(()),
            _ => Err(Error::invalid(format!(
                "{}: range {off}+{len} is past the end of the disk ({} bytes)",
                self.name, self.h.size
            ))),
        }
    }

    /// Lazy refcounts: make the dirty bit stable before the first metadata change of the
    /// session (every L2 entry change and every refcount change calls this), so that any crash
    /// state whose refcounts lag behind its tables is rebuilt on the next open.
    pub(crate) fn mark_dirty(&mut self) -> Result<()> {
        if !self.lazy || self.h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            return Ok(());
        }
        self.write_header(header::INCOMPAT_FIELD, "header (dirty bit)", |h| {
            h.incompatible_features |= header::INCOMPAT_DIRTY
        })?;
        self.barrier()
    }

    /// `mark_dirty`, for the changes that do not create an L2 table.
    fn mark_dirty_any(&mut self) -> Result<()> {
        if mutant("dirty-bit") {
            return Ok(());
        }
        self.mark_dirty()
    }

    /// Validate the host cluster an L2 entry names before guest data is written there: aligned,
    /// inside the file, and not holding metadata (a crafted or damaged image must not steer a
    /// guest write into its own header or tables).
    fn check_write_target(&mut self, host: u64, gc: u64) -> Result<()> {
        self.check_data_in_file(host, gc)?;
        let c = host / self.cs;
        if self.meta_clusters().contains(&c) {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "Preventing write of guest data at guest offset {:#x} into metadata at {host:#x} (the L2 entry points at the image's own tables; run check -r all)",
                    gc * self.cs
                ),
                host,
            ));
        }
        Ok(())
    }

    /// The set of host clusters holding metadata, built when needed.
    fn meta_clusters(&mut self) -> &std::collections::HashSet<u64> {
        if self.meta_clusters.is_none() {
            let cs = self.cs;
            let mut m = std::collections::HashSet::new();
            let mut range = |off: u64, len: u64| {
                if len > 0 {
                    for c in off / cs..(off + len).div_ceil(cs) {
                        m.insert(c);
                    }
                }
            };
            range(0, cs);
            range(self.h.l1_table_offset, self.h.l1_size as u64 * 8);
            range(
                self.h.refcount_table_offset,
                self.h.refcount_table_clusters as u64 * cs,
            );
            range(
                self.h.snapshots_offset,
                snapshot::table_size(&self.snapshots),
            );
            for &e in &self.reftable {
                let o = e & crate::format::refcount::REFT_OFFSET_MASK;
                if o != 0 {
                    m.insert(o / cs);
                }
            }
            for &e in &self.l1 {
                let o = e & L1E_OFFSET_MASK;
                if o != 0 {
                    m.insert(o / cs);
                }
            }
            self.meta_clusters = Some(m);
        }
        self.meta_clusters.as_ref().expect("just built")
    }

    /// A new metadata cluster (a new L2 table or refcount block).
    pub(crate) fn note_meta_cluster(&mut self, off: u64) {
        if let Some(m) = &mut self.meta_clusters {
            m.insert(off / self.cs);
        }
    }

    /// Whether nothing was ever written at host offset `host` (nor after it): the file was only
    /// extended over it, so it reads as zeros.
    fn never_written(&self, host: u64) -> bool {
        host >= self.written_end.max(self.caches.written_end)
    }

    /// Validate a host data cluster offset from an L2 entry.
    fn check_data_offset(&self, host: u64, gc: u64) -> Result<()> {
        if !host.is_multiple_of(self.cs) {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "cluster allocation offset {host:#x} unaligned (guest offset {:#x})",
                    gc * self.cs
                ),
                host,
            ));
        }
        Ok(())
    }

    fn check_data_in_file(&self, host: u64, gc: u64) -> Result<()> {
        self.check_data_offset(host, gc)?;
        if host >= self.known_len {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "data cluster at {host:#x} (guest offset {:#x}) lies past the end of the file",
                    gc * self.cs
                ),
                host,
            ));
        }
        Ok(())
    }

    /// The L2 table offset for guest cluster `gc`, or 0.
    fn l2_offset(&self, gc: u64) -> Result<u64> {
        let l1i = gc / self.l2_entries;
        let Some(&e) = self.l1.get(l1i as usize) else {
            return Ok(0);
        };
        let off = e & L1E_OFFSET_MASK;
        if e & l2::L1E_RESERVED_MASK != 0 {
            return Err(Error::corrupt(
                &self.name,
                format!("L1 entry {l1i} ({e:#x}) has reserved bits set"),
                self.h.l1_table_offset + l1i * 8,
            ));
        }
        if off != 0 {
            self.check_meta_offset(off, "L2 table", self.h.l1_table_offset + l1i * 8)?;
        }
        Ok(off)
    }

    /// The (entry, bitmap) for guest cluster `gc`.
    pub(crate) fn lookup(&mut self, gc: u64) -> Result<(u64, u64)> {
        let l2off = self.l2_offset(gc)?;
        if l2off == 0 {
            return Ok((0, 0));
        }
        let i = self
            .caches
            .get(&*self.storage, &self.name, Kind::L2, l2off, false)?;
        let idx = (gc % self.l2_entries) as usize;
        let d = self.caches.data(Kind::L2, i);
        let (e, bm) = if self.extended {
            (fmt::table_get(d, idx * 2), fmt::table_get(d, idx * 2 + 1))
        } else {
            (fmt::table_get(d, idx), 0)
        };
        let reserved = if self.extended {
            l2::L2E_RESERVED_MASK | OFLAG_ZERO
        } else {
            l2::L2E_RESERVED_MASK
        };
        if e & l2::OFLAG_COMPRESSED == 0 && e & reserved != 0 {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "L2 entry {e:#x} for guest offset {:#x} has reserved bits set",
                    gc * self.cs
                ),
                l2off + idx as u64 * if self.extended { 16 } else { 8 },
            ));
        }
        Ok((e, bm))
    }

    fn decode(&self, e: u64) -> Desc {
        l2::decode(e, self.cluster_bits, self.extended)
    }

    /// Write an entry into the (writable) L2 table of `gc`.
    fn set_entry(&mut self, gc: u64, entry: u64, bitmap: u64) -> Result<()> {
        self.mark_dirty_any()?;
        let l2off = self.l1[(gc / self.l2_entries) as usize] & L1E_OFFSET_MASK;
        let i = self
            .caches
            .get(&*self.storage, &self.name, Kind::L2, l2off, false)?;
        let idx = (gc % self.l2_entries) as usize;
        let d = self.caches.data_mut(Kind::L2, i);
        if self.extended {
            fmt::table_set(d, idx * 2, entry);
            fmt::table_set(d, idx * 2 + 1, bitmap);
        } else {
            fmt::table_set(d, idx, entry);
        }
        Ok(())
    }

    /// Make the L2 table of `gc` allocated and exclusively ours (COPIED); returns its offset.
    ///
    /// Crash analysis: the new table lives only in the cache, flagged unlinked, and the L1 entry
    /// naming it only in memory. At the next flush the table and its refcount are written and
    /// made stable (first barrier) before the L1 entry is written (second barrier). A crash
    /// before that leaks the new cluster. The old (shared) table's reference is dropped only
    /// after the L1 switch is stable (deferred free).
    fn prepare_l2(&mut self, gc: u64) -> Result<u64> {
        let l1i = (gc / self.l2_entries) as usize;
        if l1i >= self.l1.len() {
            return Err(Error::corrupt(
                &self.name,
                format!("L1 table is too small for guest offset {:#x}", gc * self.cs),
                self.h.l1_table_offset,
            ));
        }
        let l1e = self.l1[l1i];
        let old = self.l2_offset(gc)?;
        if old != 0 && l1e & OFLAG_COPIED != 0 {
            return Ok(old);
        }
        self.mark_dirty()?;
        let table = if old != 0 {
            let i = self
                .caches
                .get(&*self.storage, &self.name, Kind::L2, old, false)?;
            self.caches.data(Kind::L2, i).to_vec()
        } else {
            vec![0u8; self.cs as usize]
        };
        let new = self.alloc_run_cluster()?;
        let i = self
            .caches
            .get(&*self.storage, &self.name, Kind::L2, new, true)?;
        self.caches.data_mut(Kind::L2, i).copy_from_slice(&table);
        self.caches.mark_unlinked(Kind::L2, i);
        self.note_meta_cluster(new);
        self.meta_epoch += 1;
        self.l1[l1i] = new | OFLAG_COPIED;
        self.l1_dirty.insert(l1i);
        if old != 0 {
            self.free_clusters(old, 1, false)?;
        }
        Ok(new)
    }

    /// Write the changed active L1 entries, merging neighbours into one write.
    fn write_l1_dirty(&mut self) -> Result<()> {
        // Cleared only once written: a failed write leaves them dirty for the next flush.
        let dirty: Vec<usize> = self.l1_dirty.iter().copied().collect();
        let mut k = 0;
        while k < dirty.len() {
            let mut end = k + 1;
            while end < dirty.len() && dirty[end] == dirty[end - 1] + 1 {
                end += 1;
            }
            let first = dirty[k];
            let bytes = fmt::encode_table(&self.l1[first..dirty[end - 1] + 1]);
            self.write_meta(
                &bytes,
                self.h.l1_table_offset + first as u64 * 8,
                "L1 entries",
            )?;
            k = end;
        }
        self.l1_dirty.clear();
        Ok(())
    }

    // ---------------------------------------------------------------- reads

    /// Read guest bytes without a bounds check against the virtual size.
    pub(crate) fn read_inner(&mut self, buf: &mut [u8], mut off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let gc = off >> self.cluster_bits;
            let co = off & (self.cs - 1);
            let n = ((self.cs - co) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let (e, bm) = self.lookup(gc)?;
            if self.extended {
                self.read_ext(gc, co, out, e, bm)?;
            } else {
                let d = self.decode(e);
                self.read_desc(gc, co, out, d)?;
            }
            done += n;
            off += n as u64;
        }
        Ok(())
    }

    fn read_desc(&mut self, gc: u64, co: u64, out: &mut [u8], d: Desc) -> Result<()> {
        match d {
            Desc::Unallocated => self.read_backing(out, gc * self.cs + co),
            Desc::ZeroPlain | Desc::ZeroAlloc { .. } => {
                out.fill(0);
                Ok(())
            }
            Desc::Normal { host } => {
                self.check_data_in_file(host, gc)?;
                self.storage
                    .read_at(out, host + co)
                    .map_err(|e| Error::io(&self.name, format!("read data at {host:#x}"), e))
            }
            Desc::Compressed { offset, len } => {
                let data = self.decompressed(gc, offset, len)?;
                out.copy_from_slice(&data[co as usize..co as usize + out.len()]);
                Ok(())
            }
        }
    }

    fn read_ext(&mut self, gc: u64, co: u64, out: &mut [u8], e: u64, bm: u64) -> Result<()> {
        let d = l2::decode(e, self.cluster_bits, true);
        if let Desc::Compressed { .. } = d {
            return self.read_desc(gc, co, out, d);
        }
        if l2::sub::invalid(bm) {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "invalid subcluster bitmap {bm:#x} for guest offset {:#x}",
                    gc * self.cs
                ),
                0,
            ));
        }
        let host = e & l2::L2E_OFFSET_MASK;
        if host == 0 && bm & 0xffff_ffff != 0 {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "subclusters allocated without a host cluster at guest offset {:#x}",
                    gc * self.cs
                ),
                0,
            ));
        }
        let scs = self.cs / l2::sub::COUNT as u64;
        let mut pos = 0usize;
        while pos < out.len() {
            let o = co + pos as u64;
            let sc = (o / scs) as u32;
            // Extend over following subclusters of the same kind.
            let kind = |s: u32| {
                if l2::sub::allocated(bm, s) {
                    1
                } else if l2::sub::zero(bm, s) {
                    2
                } else {
                    0
                }
            };
            let k = kind(sc);
            let mut end_sc = sc + 1;
            while end_sc < l2::sub::COUNT && kind(end_sc) == k {
                end_sc += 1;
            }
            let n = ((end_sc as u64 * scs - o) as usize).min(out.len() - pos);
            let part = &mut out[pos..pos + n];
            match k {
                1 => {
                    self.check_data_in_file(host, gc)?;
                    self.storage
                        .read_at(part, host + o)
                        .map_err(|e| Error::io(&self.name, format!("read data at {host:#x}"), e))?
                }
                2 => part.fill(0),
                _ => self.read_backing(part, gc * self.cs + o)?,
            }
            pos += n;
        }
        Ok(())
    }

    fn read_backing(&mut self, out: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read(out, guest, &self.name),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    fn decompressed(&mut self, gc: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        if let Some((o, d)) = &self.comp_cache {
            if *o == offset {
                return Ok(d.clone());
            }
        }
        if offset >= self.known_len || len > 2 * self.cs {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "compressed cluster for guest offset {:#x} lies past the end of the file",
                    gc * self.cs
                ),
                offset,
            ));
        }
        let mut input = vec![0u8; len as usize];
        self.storage
            .read_at(&mut input, offset)
            .map_err(|e| Error::io(&self.name, "read compressed cluster", e))?;
        let mut out = vec![0u8; self.cs as usize];
        compress::decompress(&input, &mut out, self.compression).map_err(|w| {
            Error::corrupt(
                &self.name,
                format!(
                    "compressed cluster for guest offset {:#x}: {w}",
                    gc * self.cs
                ),
                offset,
            )
        })?;
        self.comp_cache = Some((offset, out.clone()));
        Ok(out)
    }

    // ---------------------------------------------------------------- writes

    fn write_inner(&mut self, buf: &[u8], mut off: u64) -> Result<()> {
        let mut done = 0usize;
        // Guest bytes whose write was left to us, merged while their host clusters are
        // contiguous: one pwrite for a long sequential write instead of one per cluster.
        let mut pend: Option<(usize, usize, u64)> = None;
        while done < buf.len() {
            let gc = off >> self.cluster_bits;
            let co = off & (self.cs - 1);
            let n = ((self.cs - co) as usize).min(buf.len() - done);
            if let Some(host) = self.write_cluster(gc, co, &buf[done..done + n])? {
                match &mut pend {
                    Some((start, len, h)) if *start + *len == done && *h + *len as u64 == host => {
                        *len += n
                    }
                    _ => {
                        if let Some((start, len, h)) = pend.take() {
                            self.write_data(&buf[start..start + len], h)?;
                        }
                        pend = Some((done, n, host));
                    }
                }
            }
            done += n;
            off += n as u64;
        }
        if let Some((start, len, h)) = pend {
            self.write_data(&buf[start..start + len], h)?;
        }
        self.data_written.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `write_cluster`, doing the data write itself.
    fn write_cluster_now(&mut self, gc: u64, co: u64, data: &[u8]) -> Result<()> {
        if let Some(host) = self.write_cluster(gc, co, data)? {
            self.write_data(data, host)?;
        }
        Ok(())
    }

    /// Drop the reference an old descriptor held (after its L2 entry was replaced).
    fn release(&mut self, d: Desc, discard: bool) -> Result<()> {
        match d {
            Desc::Normal { host } | Desc::ZeroAlloc { host } => {
                self.free_clusters(host, 1, discard)
            }
            Desc::Compressed { offset, len } => {
                let first = (offset & !511) / self.cs;
                let last = (offset + len - 1) / self.cs;
                self.free_clusters(first * self.cs, last - first + 1, discard)
            }
            _ => Ok(()),
        }
    }

    /// Write `data` into guest cluster `gc` at `co`. Returns `Some(host)` when the caller is to
    /// write `data` at `host` itself, which is only done where the data write has no ordering
    /// constraint (an in-place overwrite, or a never-written cluster of a zero guest cluster).
    fn write_cluster(&mut self, gc: u64, co: u64, data: &[u8]) -> Result<Option<u64>> {
        let (e, bm) = self.lookup(gc)?;
        if self.extended {
            self.write_cluster_ext(gc, co, data, e, bm)?;
            return Ok(None);
        }
        let d = self.decode(e);
        let copied = e & OFLAG_COPIED != 0;
        match d {
            Desc::Normal { host } if copied => {
                self.check_write_target(host, gc)?;
                return Ok(Some(host + co));
            }
            Desc::ZeroAlloc { host } if copied => {
                self.check_write_target(host, gc)?;
                let mut full = vec![0u8; self.cs as usize];
                full[co as usize..co as usize + data.len()].copy_from_slice(data);
                self.prepare_l2(gc)?;
                self.write_data(&full, host)?;
                // The zeroed cluster must be stable before the entry stops saying "zero".
                if !mutant("zero-alloc-barrier") {
                    self.caches.set_depends_on_flush(Kind::L2);
                }
                self.meta_epoch += 1;
                self.set_entry(gc, host | OFLAG_COPIED, 0)?;
                return Ok(None);
            }
            _ => {}
        }
        // Allocating write, with copy-on-write of the parts the guest did not write.
        let old_zero = match d {
            Desc::Unallocated => self.backing.is_none(),
            Desc::ZeroPlain => true,
            _ => false,
        };
        self.prepare_l2(gc)?;
        let new = self.alloc_run_cluster()?;
        let virgin = self.never_written(new) || mutant("virgin-check");
        let mut deferred = None;
        if virgin && old_zero {
            // The cluster reads as zeros already (the file was extended over it and nothing
            // was ever written there): write only the guest's bytes, no zero copy-on-write.
            // The caller may merge the write with its neighbours: if the entry reached the
            // disk before the data, the guest would read zeros, its old contents.
            deferred = Some(new + co);
        } else if data.len() as u64 != self.cs {
            let mut full = vec![0u8; self.cs as usize];
            self.read_desc(gc, 0, &mut full, d)?;
            full[co as usize..co as usize + data.len()].copy_from_slice(data);
            self.write_data(&full, new)?;
        } else {
            self.write_data(data, new)?;
        }
        self.link(gc, new | OFLAG_COPIED, 0, !(virgin && old_zero))?;
        self.release(d, false)?;
        Ok(deferred)
    }

    /// Point `gc` at newly written data.
    ///
    /// The new cluster's refcount must be stable before the entry is written: if the increase is
    /// still pending, the L2 cache is made to depend on the refcount cache. The data must be
    /// stable first too (`data_barrier`), except when a crash could only reveal what the guest
    /// saw before: a cluster past every byte ever written to the file reads as zeros, and if
    /// the guest cluster read as zeros before, zeros are its old version.
    fn link(&mut self, gc: u64, entry: u64, bitmap: u64, data_barrier: bool) -> Result<()> {
        if !self.lazy && self.incr_pending && !mutant("l2-refcount-dep") {
            self.caches
                .set_dependency(&*self.storage, &self.name, Kind::L2)?;
            self.meta_epoch += 1;
        }
        let data_barrier = data_barrier && !mutant("data-barrier");
        let len_pending = self.len_pending && !mutant("len-pending");
        if data_barrier || len_pending {
            self.caches.set_depends_on_flush(Kind::L2);
            self.meta_epoch += 1;
        }
        self.set_entry(gc, entry, bitmap)
    }

    fn write_cluster_ext(&mut self, gc: u64, co: u64, data: &[u8], e: u64, bm: u64) -> Result<()> {
        let d = l2::decode(e, self.cluster_bits, true);
        let scs = self.cs / l2::sub::COUNT as u64;
        let s0 = co / scs;
        let s1 = (co + data.len() as u64).div_ceil(scs);
        let mut touched = 0u64;
        for s in s0..s1 {
            touched |= 1u64 << s;
        }
        let copied = e & OFLAG_COPIED != 0;
        match d {
            Desc::Normal { host } if copied => {
                self.check_write_target(host, gc)?;
                if bm & touched == touched {
                    return self.write_data(data, host + co);
                }
                let span = self.span_buffer(gc, s0 * scs, s1 * scs, co, data)?;
                self.prepare_l2(gc)?;
                self.write_data(&span, host + s0 * scs)?;
                self.caches.set_depends_on_flush(Kind::L2);
                self.meta_epoch += 1;
                let nbm = (bm | touched) & !(touched << 32);
                self.set_entry(gc, e, nbm)
            }
            Desc::Unallocated => {
                let span = self.span_buffer(gc, s0 * scs, s1 * scs, co, data)?;
                self.prepare_l2(gc)?;
                let new = self.alloc_run_cluster()?;
                let virgin = self.never_written(new) || mutant("virgin-check");
                self.write_data(&span, new + s0 * scs)?;
                let nbm = (bm | touched) & !(touched << 32);
                let old_zero = self.backing.is_none();
                self.link(gc, new | OFLAG_COPIED, nbm, !(virgin && old_zero))
            }
            _ => {
                // Compressed or shared: copy the whole cluster.
                let full = self.span_buffer(gc, 0, self.cs, co, data)?;
                self.prepare_l2(gc)?;
                let new = self.alloc_run_cluster()?;
                self.write_data(&full, new)?;
                let nbm = if matches!(d, Desc::Compressed { .. }) {
                    0xffff_ffff
                } else {
                    (bm | touched) & !(touched << 32)
                };
                self.link(gc, new | OFLAG_COPIED, nbm, true)?;
                self.release(d, false)
            }
        }
    }

    /// Current guest contents of `[start, end)` within cluster `gc`, with `data` laid over at `co`.
    fn span_buffer(
        &mut self,
        gc: u64,
        start: u64,
        end: u64,
        co: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let mut span = vec![0u8; (end - start) as usize];
        let rel = (co - start) as usize;
        if rel > 0 {
            self.read_inner(&mut span[..rel], gc * self.cs + start)?;
        }
        let tail = rel + data.len();
        if tail < span.len() {
            self.read_inner(&mut span[tail..], gc * self.cs + start + tail as u64)?;
        }
        span[rel..tail].copy_from_slice(data);
        Ok(span)
    }

    /// Whether guest cluster range reads as zeros without looking at data.
    fn known_zero(&mut self, gc: u64) -> Result<bool> {
        let (e, bm) = self.lookup(gc)?;
        if self.extended {
            return Ok(e == 0 && (bm >> 32) == 0xffff_ffff
                || (e == 0 && bm == 0 && self.backing.is_none()));
        }
        Ok(match self.decode(e) {
            Desc::ZeroPlain | Desc::ZeroAlloc { .. } => true,
            Desc::Unallocated => self.backing.is_none(),
            _ => false,
        })
    }

    fn zero_inner(&mut self, mut off: u64, len: u64) -> Result<()> {
        let end = off + len;
        while off < end {
            let gc = off >> self.cluster_bits;
            let co = off & (self.cs - 1);
            let n = (self.cs - co).min(end - off);
            let whole = co == 0 && (n == self.cs || off + n >= self.h.size);
            if self.extended {
                self.zero_ext(gc, co, n, whole)?;
            } else if whole && self.h.version >= 3 {
                self.zero_cluster(gc)?;
            } else if !self.known_zero(gc)? {
                let zeros = vec![0u8; n as usize];
                self.write_cluster_now(gc, co, &zeros)?;
            }
            off += n;
        }
        self.data_written.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn zero_cluster(&mut self, gc: u64) -> Result<()> {
        let (e, _) = self.lookup(gc)?;
        let d = self.decode(e);
        let copied = e & OFLAG_COPIED != 0;
        let (entry, release) = match d {
            Desc::ZeroPlain => return Ok(()),
            Desc::ZeroAlloc { .. } if copied => return Ok(()),
            Desc::Unallocated if self.backing.is_none() => return Ok(()),
            Desc::Normal { host } if copied => (host | OFLAG_COPIED | OFLAG_ZERO, false),
            _ => (OFLAG_ZERO, true),
        };
        self.prepare_l2(gc)?;
        self.set_entry(gc, entry, 0)?;
        if release {
            self.release(d, false)?;
        }
        Ok(())
    }

    fn zero_ext(&mut self, gc: u64, co: u64, n: u64, whole: bool) -> Result<()> {
        let scs = self.cs / l2::sub::COUNT as u64;
        let (e, bm) = self.lookup(gc)?;
        let d = l2::decode(e, self.cluster_bits, true);
        let copied = e & OFLAG_COPIED != 0;
        if whole {
            let (entry, release) = match d {
                Desc::Normal { .. } if copied => (e, false),
                Desc::Unallocated => (0, false),
                _ => (0, true),
            };
            self.prepare_l2(gc)?;
            self.set_entry(gc, entry, 0xffff_ffffu64 << 32)?;
            if release {
                self.release(d, false)?;
            }
            return Ok(());
        }
        // Whole subclusters become zero; partial ones get explicit zeros.
        let first = co.div_ceil(scs);
        let last = (co + n) / scs;
        if matches!(d, Desc::Compressed { .. })
            || (matches!(d, Desc::Normal { .. }) && !copied)
            || first >= last
        {
            let zeros = vec![0u8; n as usize];
            return self.write_cluster_now(gc, co, &zeros);
        }
        if co < first * scs {
            let zeros = vec![0u8; (first * scs - co) as usize];
            self.write_cluster_now(gc, co, &zeros)?;
        }
        if co + n > last * scs {
            let zeros = vec![0u8; (co + n - last * scs) as usize];
            self.write_cluster_now(gc, last * scs, &zeros)?;
        }
        let (e, bm2) = self.lookup(gc)?;
        let _ = bm;
        let mut mask = 0u64;
        for s in first..last {
            mask |= 1u64 << s;
        }
        self.prepare_l2(gc)?;
        self.set_entry(gc, e, (bm2 & !mask) | (mask << 32))
    }

    fn discard_inner(&mut self, off: u64, len: u64) -> Result<()> {
        let end = off + len;
        let first = off.div_ceil(self.cs);
        let mut last = end / self.cs;
        if end >= self.h.size {
            last = self.h.size.div_ceil(self.cs);
        }
        for gc in first..last {
            self.discard_cluster(gc, self.backing.is_some())?;
        }
        Ok(())
    }

    fn discard_cluster(&mut self, gc: u64, keep_zero: bool) -> Result<()> {
        let (e, bm) = self.lookup(gc)?;
        let d = if self.extended {
            l2::decode(e, self.cluster_bits, true)
        } else {
            self.decode(e)
        };
        let v3 = self.h.version >= 3;
        let (entry, bitmap) = if keep_zero && v3 {
            if self.extended {
                (0, 0xffff_ffffu64 << 32)
            } else {
                (OFLAG_ZERO, 0)
            }
        } else {
            (0, 0)
        };
        if e == entry && bm == bitmap {
            return Ok(());
        }
        if d == Desc::Unallocated && e == 0 && bm == 0 && !(keep_zero && v3) {
            return Ok(());
        }
        self.prepare_l2(gc)?;
        self.set_entry(gc, entry, bitmap)?;
        self.release(d, true)
    }

    fn write_compressed_inner(
        &mut self,
        gc: u64,
        data: &[u8],
        comp: Option<Vec<u8>>,
    ) -> Result<()> {
        let (e, _) = self.lookup(gc)?;
        let d = if self.extended {
            l2::decode(e, self.cluster_bits, true)
        } else {
            self.decode(e)
        };
        let comp = match comp {
            Some(c) if matches!(d, Desc::Unallocated | Desc::ZeroPlain) => c,
            _ => return self.write_inner(data, gc * self.cs),
        };
        self.prepare_l2(gc)?;
        let len = comp.len() as u64;
        // Pack into the partly used cluster when it fits (and its refcount can count one more).
        let pack = !self.comp_pos.is_multiple_of(self.cs)
            && self.comp_pos % self.cs + len <= self.cs
            && l2::compressed_fits(self.comp_pos, len, self.cluster_bits)
            && self.refcount(self.comp_pos / self.cs)?
                < crate::format::refcount::max(self.h.refcount_order);
        let off = if pack {
            self.change_refcount(self.comp_pos / self.cs, 1)?;
            self.comp_pos
        } else {
            self.alloc_run_cluster()?
        };
        self.comp_pos = 0;
        self.write_data(&comp, off)?;
        self.comp_pos = off + len;
        let entry = l2::encode_compressed(off, len, self.cluster_bits);
        // Compressed data must always be stable first: a torn stream does not decompress.
        self.link(gc, entry, 0, !mutant("compressed-barrier"))?;
        self.data_written.store(true, Ordering::SeqCst);
        self.release(d, false)
    }

    // ---------------------------------------------------------------- flush, resize

    /// Make everything durable. Costs at most two barriers when metadata changed, one for data
    /// only, none when nothing changed.
    ///
    /// Epoch 1 (only when some L2 entry or L1 entry waits for it): refcount blocks and new,
    /// unlinked L2 tables are written, then a barrier: every refcount increase, every new table
    /// and every piece of data that a pointer will name is now stable. Epoch 2: L2 tables and L1
    /// entries are written, then a barrier. Then the reference drops whose pointer removal just
    /// became stable are applied in memory (written at a later flush; a crash before that only
    /// leaks), and freed clusters are punched out of the file before anything can reuse them.
    pub(crate) fn flush_inner(&mut self) -> Result<()> {
        if let Some(t) = self.flush_begin()? {
            if let Err(e) = self.barrier() {
                self.data_written.store(true, Ordering::SeqCst);
                self.deferred_frees.extend(t.frees);
                return Err(e);
            }
            self.flush_end(t)?;
        }
        Ok(())
    }

    /// Everything a flush does before its final barrier: `None` when nothing needs one.
    pub(crate) fn flush_begin(&mut self) -> Result<Option<FlushTicket>> {
        if self.read_only {
            return Ok(None);
        }
        self.poisoned()?;
        let rb_pending = !self.lazy && self.incr_pending && self.caches.has_dirty(Kind::Refblock);
        if !self.caches.has_dirty(Kind::L2)
            && self.l1_dirty.is_empty()
            && !self.data_written.load(Ordering::SeqCst)
            && self.deferred_frees.is_empty()
            && !rb_pending
        {
            return Ok(None);
        }
        let need_pre = !self.l1_dirty.is_empty()
            || (self.caches.has_dirty_linked(Kind::L2) && self.caches.has_dependency(Kind::L2));
        if need_pre {
            if !self.lazy {
                self.caches
                    .write_all(&*self.storage, &self.name, Kind::Refblock)?;
            }
            self.caches
                .write_some(&*self.storage, &self.name, Kind::L2, true)?;
            if !mutant("pre-barrier") {
                self.barrier()?;
            }
            self.caches.satisfied(Kind::L2);
            if !self.lazy {
                self.incr_pending = false;
            }
            self.len_pending = false;
        }
        if !self.lazy {
            self.caches
                .write_all(&*self.storage, &self.name, Kind::Refblock)?;
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
        self.caches
            .write_all(&*self.storage, &self.name, Kind::L2)?;
        self.write_l1_dirty()?;
        // Data writes completed before this point are covered by the barrier that follows.
        self.data_written.store(false, Ordering::SeqCst);
        Ok(Some(FlushTicket {
            epoch: self.meta_epoch,
            unlinked,
            frees: std::mem::take(&mut self.deferred_frees),
        }))
    }

    /// After the final barrier of a flush begun with `t`: what it wrote is stable.
    pub(crate) fn flush_end(&mut self, t: FlushTicket) -> Result<()> {
        if t.epoch == self.meta_epoch {
            if !self.lazy {
                self.incr_pending = false;
            }
            self.len_pending = false;
            self.caches.satisfied(Kind::L2);
        }
        self.caches.link_offsets(Kind::L2, &t.unlinked);
        let later = std::mem::replace(&mut self.deferred_frees, t.frees);
        let r = self.apply_deferred_frees();
        self.deferred_frees.extend(later);
        r
    }

    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        // The new table is written from memory: everything it names must be stable first.
        self.flush_inner()?;
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(self.cs);
        let new = self.alloc_clusters(clusters)?;
        if !self.lazy {
            self.caches
                .flush(&*self.storage, &self.name, Kind::Refblock)?;
        }
        let mut table = self.l1.clone();
        table.resize(entries as usize, 0);
        let mut enc = fmt::encode_table(&table);
        enc.resize((clusters * self.cs) as usize, 0);
        self.write_meta(&enc, new, "new L1 table")?;
        if !mutant("l1-grow-barrier") {
            self.barrier()?;
        }
        let old_off = self.h.l1_table_offset;
        let old_clusters = (self.h.l1_size as u64 * 8).div_ceil(self.cs);
        self.write_header(header::L1_FIELDS, "header (L1 switch)", |h| {
            h.l1_table_offset = new;
            h.l1_size = entries as u32;
        })?;
        self.meta_clusters = None;
        self.barrier()?;
        self.l1 = table;
        if old_off != 0 && old_clusters > 0 {
            self.free_clusters(old_off, old_clusters, true)?;
        }
        Ok(())
    }

    /// Change the virtual size.
    ///
    /// Crash analysis. Shrinking: the new size is written and made stable first; only then is
    /// the cut-off tail freed (and a partial last cluster zeroed past the new end), all of it
    /// invisible to the guest by then. Freeing first would let a crash show the old size with
    /// tail clusters gone: the backing file's data, or zeros, where the guest had data. A crash
    /// after the size switch leaves stale entries past the end, which growing handles.
    /// Growing: everything in the grown range that does not already read as zeros (the backing
    /// file's data, stale entries a crash left past the old end) is zeroed and made stable
    /// before the new size is written.
    fn resize_inner(&mut self, new_size: u64) -> Result<()> {
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "{}: new size {new_size} is not a multiple of 512",
                self.name
            )));
        }
        let old = self.h.size;
        if new_size < old {
            self.flush_inner()?;
            self.write_header(header::SIZE_FIELD, "header (size)", |h| h.size = new_size)?;
            self.barrier()?;
            self.scrub(new_size, old, false)?;
            return self.flush_inner();
        }
        if new_size > old {
            let need = self
                .h
                .l1_entries_for(new_size)
                .filter(|&n| n <= header::MAX_L1_ENTRIES)
                .ok_or_else(|| {
                    Error::invalid(format!("{}: size {new_size} is too large", self.name))
                })?;
            if need > self.l1.len() as u64 {
                self.mark_dirty()?;
                self.grow_l1(need)?;
            }
        }
        let late = mutant("resize-zero-order");
        if new_size > old && !late {
            self.scrub(old, new_size, true)?;
        }
        self.flush_inner()?;
        self.write_header(header::SIZE_FIELD, "header (size)", |h| h.size = new_size)?;
        self.barrier()?;
        if new_size > old && late {
            self.scrub(old, new_size, true)?;
            self.flush_inner()?;
        }
        Ok(())
    }

    /// Make the guest range `[from, to)` (past the virtual size, or about to become part of it)
    /// read as zeros: allocated clusters are freed (zero clusters where a backing file would
    /// show through), partial clusters get explicit zeros. With `grow`, the backing file's range
    /// is zeroed too. Only clusters that have an L2 table are visited.
    fn scrub(&mut self, from: u64, to: u64, grow: bool) -> Result<()> {
        let saved = self.h.size;
        self.h.size = self.h.size.max(to);
        let r = self.scrub_inner(from, to, grow);
        self.h.size = saved;
        r
    }

    fn scrub_inner(&mut self, from: u64, to: u64, grow: bool) -> Result<()> {
        let backing_end = self.backing.as_ref().map_or(0, |b| b.virtual_size());
        let mut off = from;
        while off < to {
            let gc = off >> self.cluster_bits;
            let co = off & (self.cs - 1);
            let n = (self.cs - co).min(to - off);
            if self.l2_offset(gc)? == 0 {
                // No table: the rest of its range reads as zeros, or from the backing file.
                let range_end = ((gc / self.l2_entries + 1) * self.l2_entries * self.cs).min(to);
                if grow && backing_end > off {
                    let end = backing_end.min(range_end);
                    self.zero_inner(off, end - off)?;
                }
                off = range_end;
                continue;
            }
            let (e, bm) = self.lookup(gc)?;
            let shows_backing = grow && backing_end > off;
            if co != 0 || n < self.cs {
                // Partial cluster: explicit zeros (copy-on-write keeps the rest).
                if (e != 0 || bm != 0 || shows_backing) && !self.known_zero(gc)? {
                    let zeros = vec![0u8; n as usize];
                    self.write_cluster_now(gc, co, &zeros)?;
                }
            } else if shows_backing {
                self.zero_inner(off, n)?;
            } else if e != 0 || bm != 0 {
                self.discard_cluster(gc, false)?;
            }
            off += n;
        }
        Ok(())
    }

    fn preallocate_metadata(&mut self) -> Result<()> {
        let clusters = self.h.size.div_ceil(self.cs);
        let mut gc = 0;
        while gc < clusters {
            let n = (self.l2_entries - gc % self.l2_entries).min(clusters - gc);
            self.prepare_l2(gc)?;
            let host = self.alloc_clusters(n)?;
            for i in 0..n {
                let h = host + i * self.cs;
                if self.extended {
                    // Allocated host cluster, no subcluster allocated: reads as zeros, or
                    // from the backing file.
                    self.set_entry(gc + i, h | OFLAG_COPIED, 0)?;
                } else if self.h.version >= 3 {
                    self.set_entry(gc + i, h | OFLAG_COPIED | OFLAG_ZERO, 0)?;
                } else {
                    self.set_entry(gc + i, h | OFLAG_COPIED, 0)?;
                }
            }
            gc += n;
        }
        let end = self.alloc_end * self.cs;
        if end > self.known_len {
            self.storage
                .set_len(end)
                .map_err(|e| Error::io(&self.name, "extend file", e))?;
            self.known_len = end;
        }
        self.flush_inner()
    }

    fn close_inner(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if self.read_only {
            return Ok(());
        }
        // After a failed fdatasync nothing more is written (and no sync claims success).
        self.poisoned()?;
        // Give back the unused run first (nothing points into it), so its refcounts go out
        // with the rest; if it sits at the end of the file, trim the file too.
        if self.run.end * self.cs == self.known_len && !self.run.is_empty() {
            let end = (self.run.start * self.cs).max(
                self.written_end
                    .max(self.caches.written_end)
                    .div_ceil(self.cs)
                    * self.cs,
            );
            if end < self.known_len {
                self.storage
                    .set_len(end)
                    .map_err(|e| Error::io(&self.name, "trim file", e))?;
                self.known_len = end;
            }
        }
        self.return_run()?;
        // In unsafe mode nothing was promised before close: write everything, sync once.
        let unsafe_mode = self.caches.no_barriers;
        self.flush_inner()?;
        if self.caches.has_dirty(Kind::Refblock) {
            self.caches
                .write_all(&*self.storage, &self.name, Kind::Refblock)?;
            if !unsafe_mode {
                self.barrier()?;
            }
        }
        if self.lazy && self.h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            // Refcounts are stable now (in unsafe mode: with the final sync).
            self.write_header(header::INCOMPAT_FIELD, "header (clear dirty bit)", |h| {
                h.incompatible_features &= !header::INCOMPAT_DIRTY
            })?;
            if !unsafe_mode {
                self.barrier()?;
            }
        }
        if unsafe_mode {
            self.caches.no_barriers = false;
            self.barrier()?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- map

    fn map_inner(&mut self, offset: u64, len: u64, out: &mut Vec<MapEntry>) -> Result<()> {
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let gc = off >> self.cluster_bits;
            let co = off & (self.cs - 1);
            let mut n = (self.cs - co).min(end - off);
            if self.l2_offset(gc)? == 0 {
                // The whole L2 range is unallocated here.
                let range_end = (gc / self.l2_entries + 1) * self.l2_entries * self.cs;
                n = range_end.min(end) - off;
                self.map_unallocated(off, n, out)?;
                off += n;
                continue;
            }
            let (e, bm) = self.lookup(gc)?;
            if self.extended
                && !matches!(
                    l2::decode(e, self.cluster_bits, true),
                    Desc::Compressed { .. }
                )
            {
                let scs = self.cs / l2::sub::COUNT as u64;
                let host = e & l2::L2E_OFFSET_MASK;
                let mut o = co;
                while o < co + n {
                    let s = (o / scs) as u32;
                    let m = ((s as u64 + 1) * scs).min(co + n) - o;
                    let g = gc * self.cs + o;
                    let at = (host != 0).then_some(host + o);
                    if l2::sub::allocated(bm, s) {
                        push_map(out, entry(g, m, true, false, at, 0));
                    } else if l2::sub::zero(bm, s) {
                        push_map(out, entry(g, m, false, true, at, 0));
                    } else if host != 0 && self.backing.is_none() {
                        // Unallocated subcluster of an allocated cluster: qemu reports it
                        // as zero with the host offset.
                        let mut me = entry(g, m, false, true, at, 0);
                        me.present = false;
                        push_map(out, me);
                    } else {
                        self.map_unallocated(g, m, out)?;
                    }
                    o += m;
                }
                off += n;
                continue;
            }
            match self.decode(e) {
                Desc::Unallocated => self.map_unallocated(off, n, out)?,
                Desc::ZeroPlain => push_map(out, entry(off, n, false, true, None, 0)),
                Desc::ZeroAlloc { host } => {
                    push_map(out, entry(off, n, false, true, Some(host + co), 0))
                }
                Desc::Normal { host } => {
                    push_map(out, entry(off, n, true, false, Some(host + co), 0))
                }
                Desc::Compressed { .. } => {
                    let mut me = entry(off, n, true, false, None, 0);
                    me.compressed = true;
                    push_map(out, me);
                }
            }
            off += n;
        }
        Ok(())
    }

    fn map_unallocated(&mut self, off: u64, n: u64, out: &mut Vec<MapEntry>) -> Result<()> {
        match &self.backing {
            Some(b) => {
                for mut me in b.map(off, n)? {
                    me.depth += 1;
                    push_map(out, me);
                }
            }
            None => push_map(
                out,
                MapEntry {
                    start: off,
                    length: n,
                    depth: 0,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                },
            ),
        }
        Ok(())
    }
}

fn entry(
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    offset: Option<u64>,
    depth: u32,
) -> MapEntry {
    MapEntry {
        start,
        length,
        depth,
        present: true,
        zero,
        data,
        compressed: false,
        offset,
    }
}

fn push_map(out: &mut Vec<MapEntry>, me: MapEntry) {
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.offset, me.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.start + last.length == me.start
            && last.depth == me.depth
            && last.present == me.present
            && last.zero == me.zero
            && last.data == me.data
            && last.compressed == me.compressed
            && contiguous
        {
            last.length += me.length;
            return;
        }
    }
    out.push(me);
}

fn storage_err(name: &str, what: &str) -> impl Fn(std::io::Error) -> Error {
    let (name, what) = (name.to_string(), what.to_string());
    move |e| Error::io(&name, what.clone(), e)
}

/// Check creation options before anything touches the disk.
fn validate_create(opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size as u64;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {cs})"
        )));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || !(1..=64).contains(&rb) {
        return Err(Error::invalid(format!(
            "Refcount width must be a power of two and may not exceed 64 bits (got {rb})"
        )));
    }
    let v2 = opts.compat == Compat::V2;
    if v2 && rb != 16 {
        return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
    }
    if v2 && opts.lazy_refcounts {
        return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
    }
    if v2 && opts.extended_l2 {
        return Err(Error::invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
    }
    if v2 && opts.compression_type != CompressionType::Zlib {
        return Err(Error::invalid(
                "Compression type selection is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if opts.backing_file.is_some() && opts.preallocation != Preallocation::Off && !opts.extended_l2
    {
        return Err(Error::invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if opts.backing_file.is_none() && opts.backing_format.is_some() {
        return Err(Error::invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    Ok(())
}

impl Image {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no group-commit flush is between its two halves (its final fdatasync runs
    /// outside the state lock, holding a ticket of deferred frees) and keep new ones from
    /// starting until the returned guard is dropped. For the operations that must see the
    /// whole state settled: check and repair, resize, close.
    fn quiesce(&self) -> Quiet<'_> {
        let mut g = self.gc.lock().unwrap_or_else(|e| e.into_inner());
        while g.running {
            g = self.gc_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.running = true;
        Quiet(self)
    }

    /// Create a new image file at `path` (truncating an existing one).
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let name = path.display().to_string();
        validate_create(opts)?;
        let st = FileStorage::create(path).map_err(|e| Error::io(&name, "create", e))?;
        Image::create_on(Arc::new(st), &name, opts)?;
        // The new directory entry must be durable too, or a crash could lose the whole file.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&name, "sync the directory of the new image", e))
    }

    /// Create a new image on `storage` (which should be empty). `name` is used in messages and to
    /// resolve a relative backing file name.
    pub fn create_on(storage: Arc<dyn Storage>, name: &str, opts: &CreateOptions) -> Result<()> {
        validate_create(opts)?;
        let cs = opts.cluster_size as u64;
        let v2 = opts.compat == Compat::V2;
        let mut size = opts.size;
        let mut backing_format = opts.backing_format.clone();
        if let Some(bf) = &opts.backing_file {
            if bf.len() > header::MAX_BACKING_NAME as usize {
                return Err(Error::invalid("Backing file name too long"));
            }
            if opts.open_backing {
                let mut chain = Vec::new();
                let b = backing::open(name, bf, backing_format.as_deref(), &mut chain)?;
                if size == 0 {
                    size = b.virtual_size();
                }
                if backing_format.is_none() {
                    backing_format = Some(
                        match b {
                            Backing::Qcow2(_) => "qcow2",
                            Backing::Raw { .. } => "raw",
                        }
                        .to_string(),
                    );
                }
            } else if size == 0 {
                return Err(Error::invalid(
                    "Image size must be given when the backing file is not opened",
                ));
            }
        }
        let size = size.div_ceil(512) * 512;
        let cluster_bits = cs.trailing_zeros();
        let refcount_order = opts.refcount_bits.trailing_zeros();
        let mut h = Header {
            version: if v2 { 2 } else { 3 },
            backing_file_offset: 0,
            backing_file_size: opts.backing_file.as_ref().map_or(0, |b| b.len() as u32),
            cluster_bits,
            size: 0,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: if v2 {
                header::V2_HEADER_LEN
            } else {
                header::V3_HEADER_LEN
            },
            compression_type: 0,
            unknown_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: opts.backing_file.clone(),
        };
        if opts.extended_l2 {
            h.incompatible_features |= header::INCOMPAT_EXTL2;
        }
        if opts.compression_type == CompressionType::Zstd {
            h.incompatible_features |= header::INCOMPAT_COMPRESSION;
            h.compression_type = 1;
        }
        if opts.lazy_refcounts {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        }
        if let Some(f) = &backing_format {
            h.set_extension(header::EXT_BACKING_FORMAT, Some(f.as_bytes().to_vec()));
        }
        h.set_extension(header::EXT_FEATURE_TABLE, Some(Header::feature_table()));
        let mut hdr = match h.serialize() {
            Ok(b) => b,
            Err(_) => {
                // Small clusters: like QEMU, leave out the (optional) feature name table.
                h.set_extension(header::EXT_FEATURE_TABLE, None);
                h.serialize().map_err(|e| map_header_err(name, e))?
            }
        };
        hdr.resize(cs as usize, 0);
        // Refcount table (cluster 1) naming one refcount block (cluster 2) that counts
        // clusters 0..=2.
        let mut reftable = vec![0u8; cs as usize];
        fmt::table_set(&mut reftable, 0, 2 * cs);
        let mut block = vec![0u8; cs as usize];
        for c in 0..3 {
            refcount::set(&mut block, c, refcount_order, 1);
        }
        let w = storage_err(name, "write new image");
        storage.set_len(0).map_err(&w)?;
        storage.write_at(&hdr, 0).map_err(&w)?;
        storage.write_at(&reftable, cs).map_err(&w)?;
        storage.write_at(&block, 2 * cs).map_err(&w)?;
        // Now grow it with the engine: L1 table, size, preallocation. Creation is not atomic
        // anyway (a crash leaves a half-made file), so it runs without ordering barriers and
        // syncs once, at close.
        let img = Image::open_storage_chain(
            storage,
            name,
            &OpenOptions {
                open_backing: false,
                lazy_refcounts: Some(false),
                cache: CacheMode::Unsafe,
                ..OpenOptions::default()
            },
            &mut Vec::new(),
        )?;
        {
            let mut s = img.lock();
            s.resize_inner(size)?;
            if opts.preallocation == Preallocation::Metadata {
                s.preallocate_metadata()?;
            }
        }
        img.close()
    }

    /// Open an image file.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Image::open_chain(path.as_ref(), opts, &mut Vec::new())
    }

    pub(crate) fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Image> {
        let name = path.display().to_string();
        let st = FileStorage::open(path, !opts.read_only, opts.cache.direct())
            .map_err(|e| Error::io(&name, "Could not open", e))?;
        if chain.is_empty() {
            if let Ok(c) = std::fs::canonicalize(path) {
                chain.push(c);
            }
        }
        Image::open_storage_chain(Arc::new(st), &name, opts, chain)
    }

    /// Open an image on `storage`. `name` is used in messages and to resolve backing files.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        name: &str,
        opts: &OpenOptions,
    ) -> Result<Image> {
        Image::open_storage_chain(storage, name, opts, &mut Vec::new())
    }

    fn open_storage_chain(
        storage: Arc<dyn Storage>,
        name: &str,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Image> {
        let file_len = storage.len().map_err(|e| Error::io(name, "stat", e))?;
        if file_len < header::V2_HEADER_LEN as u64 {
            return Err(Error::corrupt(
                name,
                format!("file is too short ({file_len} bytes) to be a qcow2 image"),
                0,
            ));
        }
        let mut first = vec![0u8; 4096.min(file_len as usize)];
        storage
            .read_at(&mut first, 0)
            .map_err(|e| Error::io(name, "read header", e))?;
        if first[0..4] != header::MAGIC_BYTES {
            return Err(Error::corrupt(
                name,
                "Image is not in qcow2 format (bad magic)",
                0,
            ));
        }
        let cb = fmt::be32(&first, 20);
        if !(9..=21).contains(&cb) {
            return Err(Error::unsupported(
                name,
                format!("cluster size 2^{cb} (Unsupported cluster size)"),
            ));
        }
        let cs = 1u64 << cb;
        let mut hbuf = vec![0u8; cs as usize];
        storage
            .read_at(&mut hbuf, 0)
            .map_err(|e| Error::io(name, "read header", e))?;
        let h = Header::parse(&hbuf).map_err(|e| map_header_err(name, e))?;
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                name,
                format!(
                    "encrypted images ({}) are not supported yet",
                    if h.crypt_method == 1 { "AES" } else { "LUKS" }
                ),
            ));
        }
        let read_table = |off: u64, len: u64, what: &str, field: u64| -> Result<Vec<u8>> {
            if len == 0 {
                return Ok(Vec::new());
            }
            if off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(
                    name,
                    format!("{what} at {off:#x} ({len} bytes) lies past the end of the file"),
                    field,
                ));
            }
            let mut b = vec![0u8; len as usize];
            storage
                .read_at(&mut b, off)
                .map_err(|e| Error::io(name, format!("read {what}"), e))?;
            Ok(b)
        };
        let l1 = fmt::decode_table(&read_table(
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            "L1 table",
            40,
        )?);
        let reftable = fmt::decode_table(&read_table(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
            "refcount table",
            48,
        )?);
        let mut snapshots = Vec::new();
        if h.nb_snapshots > 0 {
            let avail = file_len
                .saturating_sub(h.snapshots_offset)
                .min(snapshot::MAX_TABLE_SIZE);
            let t = read_table(h.snapshots_offset, avail, "snapshot table", 64)?;
            snapshots = snapshot::parse(&t, h.nb_snapshots)
                .map_err(|(w, o)| Error::corrupt(name, w, h.snapshots_offset + o))?;
            for (i, s) in snapshots.iter().enumerate() {
                if s.l1_table_offset % cs != 0
                    || s.l1_size as u64 > header::MAX_L1_ENTRIES
                    || s.l1_table_offset
                        .checked_add(s.l1_size as u64 * 8)
                        .is_none_or(|e| e > file_len)
                {
                    return Err(Error::corrupt(
                        name,
                        format!("snapshot {} ('{}') has an invalid L1 table", i + 1, s.name),
                        h.snapshots_offset,
                    ));
                }
            }
        }
        let mut read_only = opts.read_only;
        let mut ro_reason = if read_only {
            "opened read-only".to_string()
        } else {
            String::new()
        };
        if !read_only && h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            read_only = true;
            ro_reason = "the image is marked corrupt; repair it with check -r all".into();
        }
        let backing = match (&h.backing_file, opts.open_backing) {
            (Some(bf), true) => Some(backing::open(
                name,
                bf,
                h.backing_format().as_deref(),
                chain,
            )?),
            _ => None,
        };
        let l2_entries = h.l2_entries();
        let l2_cap = match opts.l2_cache_size {
            Some(b) => (b / cs) as usize,
            None => (h.l1_size as usize).clamp(2, ((32u64 << 20) / cs).max(2) as usize),
        };
        let rb_cap = match opts.refcount_cache_size {
            Some(b) => (b / cs) as usize,
            None => 4,
        };
        let mut caches = Caches::new(cs as usize, l2_cap, rb_cap);
        caches.no_barriers = opts.cache == CacheMode::Unsafe;
        let lazy = h.version >= 3
            && opts
                .lazy_refcounts
                .unwrap_or(h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0);
        let compression = if h.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        };
        let dirty = h.incompatible_features & header::INCOMPAT_DIRTY != 0;
        let clear_autoclear =
            !read_only && h.autoclear_features & !header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let state = State {
            name: name.to_string(),
            storage: storage.clone(),
            cs,
            cluster_bits: cb,
            l2_entries,
            extended: h.extended_l2(),
            rb_entries: cs * 8 / (1u64 << h.refcount_order),
            l1,
            reftable,
            caches,
            free_cluster_index: 0,
            alloc_end: file_len.div_ceil(cs),
            known_len: file_len,
            written_end: file_len,
            read_only,
            ro_reason,
            writable_storage: !opts.read_only,
            backing,
            cache_mode: opts.cache,
            lazy,
            deferred_frees: Vec::new(),
            run: 0..0,
            incr_pending: false,
            len_pending: false,
            l1_dirty: BTreeSet::new(),
            snapshots,
            comp_pos: 0,
            comp_cache: None,
            meta_clusters: None,
            data_written: Arc::new(AtomicBool::new(false)),
            io_gate: Arc::new(RwLock::new(())),
            compression,
            closed: false,
            meta_epoch: 0,
            h: h.clone(),
        };
        let img = Image {
            state: Mutex::new(state),
            name: name.to_string(),
            cluster_size: cs as u32,
            compression,
            gc: Mutex::new(GroupCommit::default()),
            gc_cv: std::sync::Condvar::new(),
            write_seq: std::sync::atomic::AtomicU64::new(0),
        };
        if !read_only {
            let mut s = img.lock();
            let setup = (|| -> Result<()> {
                if clear_autoclear {
                    // We do not keep bitmaps up to date: mark them inconsistent, as QEMU's rule
                    // asks.
                    s.write_header(88..96, "header (autoclear features)", |h| {
                        h.autoclear_features &= header::AUTOCLEAR_DATA_FILE_RAW
                    })?;
                    s.barrier()?;
                }
                if dirty {
                    // Refcounts may be stale after a crash with lazy refcounts: rebuild them.
                    crate::check::run(&mut s, Some(RepairMode::All))?;
                }
                Ok(())
            })();
            if let Err(e) = setup {
                // Dropping the half-opened image must not close it normally: that would write
                // back a half-done rebuild and clear the dirty bit over stale refcounts.
                s.closed = true;
                return Err(e);
            }
        }
        Ok(img)
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.lock().h.size
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        self.cluster_size
    }
    /// The file name the image was opened with.
    pub fn filename(&self) -> &str {
        &self.name
    }
    /// Whether the image is open read-only.
    pub fn is_read_only(&self) -> bool {
        self.lock().read_only
    }
    /// Read `buf.len()` bytes at guest `offset`. The range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut s = self.lock();
        s.check_range(offset, buf.len() as u64)?;
        if s.extended {
            return s.read_inner(buf, offset);
        }
        // Look up under the lock; read allocated data outside it, so readers scale.
        let mut plan: Vec<(usize, usize, u64)> = Vec::new();
        let mut done = 0usize;
        let mut off = offset;
        while done < buf.len() {
            let gc = off >> s.cluster_bits;
            let co = off & (s.cs - 1);
            let n = ((s.cs - co) as usize).min(buf.len() - done);
            let (e, _) = s.lookup(gc)?;
            match s.decode(e) {
                Desc::Normal { host } => {
                    s.check_data_in_file(host, gc)?;
                    match plan.last_mut() {
                        Some(last)
                            if last.0 + last.1 == done && last.2 + last.1 as u64 == host + co =>
                        {
                            last.1 += n
                        }
                        _ => plan.push((done, n, host + co)),
                    }
                }
                d => s.read_desc(gc, co, &mut buf[done..done + n], d)?,
            }
            done += n;
            off += n as u64;
        }
        let gate = s.io_gate.clone();
        let storage = s.storage.clone();
        let _shared = gate.read().unwrap_or_else(|e| e.into_inner());
        drop(s);
        for (start, len, host) in plan {
            storage
                .read_at(&mut buf[start..start + len], host)
                .map_err(|e| Error::io(&self.name, format!("read data at {host:#x}"), e))?;
        }
        Ok(())
    }
    /// Write `buf` at guest `offset`. The range must lie within the virtual size.
    /// Durable after the next [`Image::flush`] (or at once in write-through modes).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, buf.len() as u64)?;
        if !s.extended {
            // Overwrites of clusters we own exclusively run outside the lock.
            let mut plan: Vec<(usize, usize, u64)> = Vec::new();
            let mut done = 0usize;
            let mut off = offset;
            let mut in_place = true;
            while done < buf.len() {
                let gc = off >> s.cluster_bits;
                let co = off & (s.cs - 1);
                let n = ((s.cs - co) as usize).min(buf.len() - done);
                let (e, _) = s.lookup(gc)?;
                match s.decode(e) {
                    Desc::Normal { host } if e & OFLAG_COPIED != 0 => {
                        s.check_write_target(host, gc)?;
                        plan.push((done, n, host + co));
                    }
                    _ => {
                        in_place = false;
                        break;
                    }
                }
                done += n;
                off += n as u64;
            }
            if in_place {
                let gate = s.io_gate.clone();
                let storage = s.storage.clone();
                let flag = s.data_written.clone();
                let write_through = s.cache_mode.write_through();
                let end = plan.iter().map(|p| p.2 + p.1 as u64).max().unwrap_or(0);
                if end > s.known_len {
                    s.known_len = end;
                }
                if end > s.written_end {
                    s.written_end = end;
                }
                {
                    let _shared = gate.read().unwrap_or_else(|e| e.into_inner());
                    drop(s);
                    for (start, len, host) in plan {
                        storage
                            .write_at(&buf[start..start + len], host)
                            .map_err(|e| {
                                Error::io(&self.name, format!("write data at {host:#x}"), e)
                            })?;
                    }
                    flag.store(true, Ordering::SeqCst);
                }
                self.write_seq.fetch_add(1, Ordering::SeqCst);
                if write_through {
                    self.flush_grouped()?;
                }
                return Ok(());
            }
        }
        s.write_inner(buf, offset)?;
        self.finish_write(s)
    }

    /// A guest write (or zeroes, discard) is complete: count it, release the lock, and in the
    /// write-through modes make it durable through the shared group-commit flush.
    fn finish_write(&self, s: MutexGuard<'_, State>) -> Result<()> {
        let write_through = s.cache_mode.write_through();
        drop(s);
        self.write_seq.fetch_add(1, Ordering::SeqCst);
        if write_through {
            self.flush_grouped()?;
        }
        Ok(())
    }

    /// Group commit, as QEMU's bdrv_co_flush does it. Waits for a flush in progress; returns at
    /// once when a flush that began after our writes completed made them stable; otherwise runs
    /// one, with its final fdatasync outside the state lock, so that other threads keep reading,
    /// writing and allocating meanwhile and their writes share the next flush.
    fn flush_grouped(&self) -> Result<()> {
        let want = self.write_seq.load(Ordering::SeqCst);
        {
            let mut g = self.gc.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if g.done >= want {
                    return Ok(());
                }
                if !g.running {
                    g.running = true;
                    break;
                }
                g = self.gc_cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        let covers = self.write_seq.load(Ordering::SeqCst);
        let res = (|| -> Result<()> {
            let (t, storage, no_barriers) = {
                let mut s = self.lock();
                (s.flush_begin()?, s.storage.clone(), s.caches.no_barriers)
            };
            if let Some(t) = t {
                if !no_barriers {
                    if let Err(e) = storage.flush() {
                        let mut s = self.lock();
                        s.caches.poison(&e);
                        s.data_written.store(true, Ordering::SeqCst);
                        s.deferred_frees.extend(t.frees);
                        return Err(Error::io(&self.name, "flush", e));
                    }
                }
                self.lock().flush_end(t)?;
            }
            Ok(())
        })();
        let mut g = self.gc.lock().unwrap_or_else(|e| e.into_inner());
        g.running = false;
        if res.is_ok() {
            g.done = g.done.max(covers);
        }
        self.gc_cv.notify_all();
        res
    }
    /// Make `len` bytes at `offset` read as zeros, as cheaply as the format allows
    /// (zero clusters in v3; explicit zeros where needed).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, len)?;
        s.zero_inner(offset, len)?;
        self.finish_write(s)
    }
    /// Discard whole clusters inside the range: they are freed (and punched out of the host file)
    /// and read as zeros afterwards, or from the backing file in a v2 image with one.
    /// Partial clusters at the ends are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, len)?;
        s.discard_inner(offset, len)?;
        self.finish_write(s)
    }
    /// Write compressed data for whole cluster(s) at a cluster-aligned `offset`. `data` is at most
    /// one cluster (less only for the last cluster of the disk). Clusters that do not compress are
    /// written normally. The target cluster must not be allocated. Compression runs outside the
    /// image lock, so several threads calling this compress in parallel.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size as u64;
        if !offset.is_multiple_of(cs) || data.len() as u64 > cs {
            return Err(Error::invalid(format!(
                "{}: compressed writes must be one cluster at a cluster-aligned offset",
                self.name
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let padded;
        let cluster: &[u8] = if (data.len() as u64) < cs {
            let mut p = vec![0u8; cs as usize];
            p[..data.len()].copy_from_slice(data);
            padded = p;
            &padded
        } else {
            data
        };
        let comp = compress::compress(cluster, self.compression);
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, data.len() as u64)?;
        if s.extended || s.h.crypt_method != 0 {
            s.write_inner(data, offset)?;
            return self.finish_write(s);
        }
        if comp.is_none() {
            s.write_inner(data, offset)?;
            return self.finish_write(s);
        }
        s.write_compressed_inner(offset / cs, data, comp)?;
        self.finish_write(s)
    }
    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        // In unsafe mode the barriers are skipped (flushes are ignored), but metadata is still
        // written back, in order, so that other readers of the file see it.
        self.write_seq.fetch_add(1, Ordering::SeqCst);
        self.flush_grouped()
    }
    /// Change the virtual size. Shrinking frees the cut-off tail.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let _q = self.quiesce();
        let mut s = self.lock();
        s.check_writable()?;
        s.resize_inner(new_size)
    }
    /// Facts about the image.
    pub fn info(&self) -> Result<ImageInfo> {
        let s = self.lock();
        let actual = s
            .storage
            .allocated_size()
            .map_err(|e| Error::io(&s.name, "stat", e))?;
        let bf = s.h.backing_file.clone();
        Ok(ImageInfo {
            filename: s.name.clone(),
            virtual_size: s.h.size,
            actual_size: actual,
            cluster_size: s.cs as u32,
            compat: if s.h.version >= 3 {
                Compat::V3
            } else {
                Compat::V2
            },
            refcount_bits: s.h.refcount_bits(),
            lazy_refcounts: s.h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: s.h.incompatible_features & header::INCOMPAT_CORRUPT != 0,
            dirty: s.h.incompatible_features & header::INCOMPAT_DIRTY != 0,
            extended_l2: s.extended,
            compression_type: s.compression,
            full_backing_filename: bf
                .as_ref()
                .map(|b| backing::resolve(&s.name, b).display().to_string()),
            backing_file: bf,
            backing_format: s.h.backing_format(),
            crypt_method: s.h.crypt_method,
            snapshot_count: s.h.nb_snapshots,
            read_only: s.read_only,
        })
    }
    /// How the guest range `[offset, offset+len)` is stored, as merged extents.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let mut s = self.lock();
        s.check_range(offset, len)?;
        let mut out = Vec::new();
        s.map_inner(offset, len, &mut out)?;
        Ok(out)
    }
    /// Check consistency; with `repair`, fix what the mode allows (the image must be writable).
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let _q = self.quiesce();
        let mut s = self.lock();
        if repair.is_some() && !s.writable_storage {
            return Err(Error::ReadOnly {
                file: s.name.clone(),
                reason: "repair needs the image opened read-write".into(),
            });
        }
        if !s.read_only {
            // Settle pending work so the stored refcounts describe the image exactly.
            s.flush_inner()?;
            s.return_run()?;
        }
        if repair.is_none() {
            return crate::check::run(&mut s, None);
        }
        // Repair may rewrite and free anything: no data I/O may run outside the lock meanwhile.
        let gate = s.io_gate.clone();
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        crate::check::run(&mut s, repair)
    }
    /// Number of fdatasyncs issued on the image file so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().storage.sync_count()
    }
    /// Flush and close. Dropping an image also flushes, but cannot report errors.
    pub fn close(self) -> Result<()> {
        let _q = self.quiesce();
        self.lock().close_inner()
    }
}

/// Held while no group-commit flush may run (see [`Image::quiesce`]).
struct Quiet<'a>(&'a Image);

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gc.lock().unwrap_or_else(|e| e.into_inner());
        g.running = false;
        self.0.gc_cv.notify_all();
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _q = self.quiesce();
        let _ = self.lock().close_inner();
    }
}
