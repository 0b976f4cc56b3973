//! The image file as the engine sees it: every read, write, length change and barrier on the
//! host file goes through [`HostFile`], which keeps the file's extent (its length and how much
//! of it was ever written) and remembers a failed fdatasync.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::mutants::active as mutant;
use crate::offset::HostOffset;
use crate::storage::Storage;

/// Most space reserved ahead of allocating writes at a time ([`HostFile::preallocate_ahead`]).
/// Each reservation is an fallocate, which waits for the O_DIRECT writes in flight: 4 MiB is one
/// such wait per 64 clusters of 64 KiB.
const PREALLOC_WINDOW: u64 = 4 << 20;

/// Why the image refuses to go on (see [`HostFile::poisoned`]).
#[derive(Clone, Copy)]
struct Poison {
    errno: Option<i32>,
    /// A header write failed (else an fdatasync did).
    header: bool,
}

/// The host file of an open image.
pub(crate) struct HostFile {
    name: Arc<str>,
    storage: Arc<dyn Storage>,
    /// The file length as far as we know it (grown by our writes and set_len calls).
    len: u64,
    /// End of everything ever written to the file (the file length at open counts as
    /// written). Clusters past it read as zeros.
    written_end: u64,
    /// Barriers are skipped (cache=unsafe; and while an image is being created).
    no_barriers: bool,
    /// An fdatasync or a header write failed (with this OS error, if it had one): see
    /// [`HostFile::poisoned`].
    poisoned: Option<Poison>,
    /// Data was written since the last barrier (set after the write completes, by threads
    /// writing outside the state lock too).
    data_written: Arc<AtomicBool>,
    /// Held shared by data I/O running outside the state lock; held exclusively while freed
    /// clusters are released, so that no such I/O can reach a cluster that is being reused.
    io_gate: Arc<RwLock<()>>,
    /// Freed ranges not yet punched out (adjacent ones merged): see [`HostFile::punch`].
    punches: Vec<(u64, u64)>,
    /// Mutant `punch-late`: the batch before, issued with the next one.
    late: Vec<(u64, u64)>,
    /// The never-written part of the allocation run, and the end of the space reserved in it
    /// so far ([`HostFile::preallocate_ahead`]).
    fresh: (u64, u64),
    prealloc_end: u64,
    /// The ranges reserved so far in this session ([`HostFile::release_reserved`]).
    reserved: Vec<(u64, u64)>,
    /// Opened as damaged (`OpenOptions::damaged`, read-only): a metadata cluster that the file
    /// ends inside of reads as zeros past the end, as QEMU reads it.
    damaged: bool,
    /// What the damaged open found cut short (tables read as zeros past the end).
    damage: Vec<String>,
}

impl HostFile {
    pub(crate) fn new(name: &str, storage: Arc<dyn Storage>, len: u64, no_barriers: bool) -> Self {
        HostFile {
            name: name.into(),
            storage,
            len,
            written_end: len,
            no_barriers,
            poisoned: None,
            data_written: Arc::new(AtomicBool::new(false)),
            io_gate: Arc::new(RwLock::new(())),
            punches: Vec::new(),
            late: Vec::new(),
            fresh: (0, 0),
            prealloc_end: 0,
            reserved: Vec::new(),
            damaged: false,
            damage: Vec::new(),
        }
    }

    /// Tolerate metadata clusters cut short by the end of the file (a damaged image opened
    /// read-only for inspection).
    pub(crate) fn set_damaged(&mut self, damage: Vec<String>) {
        self.damaged = true;
        self.damage = damage;
    }
    /// What the damaged open found cut short.
    pub(crate) fn damage(&self) -> &[String] {
        &self.damage
    }
    /// See [`HostFile::set_damaged`].
    pub(crate) fn damaged(&self) -> bool {
        self.damaged
    }

    /// The file name, for messages.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
    /// The file name, shared (for I/O that runs after the state lock is released).
    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }
    /// The storage, shared (for I/O that runs after the state lock is released).
    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    /// The data-written flag, shared with writers outside the state lock.
    pub(crate) fn data_written_flag(&self) -> &Arc<AtomicBool> {
        &self.data_written
    }
    /// The I/O gate (see the field).
    pub(crate) fn io_gate(&self) -> Arc<RwLock<()>> {
        self.io_gate.clone()
    }

    /// The file length as far as we know it.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was ever written at `off` (nor after it): the file was only extended
    /// over it, so it reads as zeros.
    pub(crate) fn never_written(&self, off: HostOffset) -> bool {
        off.get() >= self.written_end
    }

    /// Round the file's written extent up to `cluster_size`: the smallest length that keeps
    /// every byte written.
    pub(crate) fn written_end(&self) -> u64 {
        self.written_end
    }

    fn note_written(&mut self, end: u64) {
        self.len = self.len.max(end);
        self.written_end = self.written_end.max(end);
    }

    /// Read `buf.len()` bytes at `off`; `what` names them in an error.
    pub(crate) fn read(&self, buf: &mut [u8], off: HostOffset, what: &str) -> Result<()> {
        self.storage
            .read_at(buf, off.get())
            .map_err(|e| Error::io(&self.name, format!("read {what}"), e))
    }

    /// Read guest data at `off` (of the host cluster at `cluster`, named in an error).
    pub(crate) fn read_data(
        &self,
        buf: &mut [u8],
        off: HostOffset,
        cluster: HostOffset,
    ) -> Result<()> {
        self.storage
            .read_at(buf, off.get())
            .map_err(|e| Error::io(&self.name, format!("read data at {cluster:#x}"), e))
    }

    /// Write metadata (`what` names it in an error).
    pub(crate) fn write_meta(&mut self, buf: &[u8], off: HostOffset, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, off.get())
            .map_err(|e| Error::io(&self.name, format!("write {what} at {off:#x}"), e))?;
        self.note_written(off.get() + buf.len() as u64);
        Ok(())
    }

    /// Write guest data. The next flush owes a barrier for it, whoever the caller.
    pub(crate) fn write_data(&mut self, buf: &[u8], off: HostOffset) -> Result<()> {
        self.storage
            .write_at(buf, off.get())
            .map_err(|e| Error::io(&self.name, format!("write data at {off:#x}"), e))?;
        self.note_written(off.get() + buf.len() as u64);
        self.data_written.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Account for data that a writer outside the lock is about to write up to `end`.
    pub(crate) fn reserve_unlocked_write(&mut self, end: u64) {
        self.note_written(end);
    }

    /// Change the file length (`what` names the reason in an error).
    pub(crate) fn set_len(&mut self, len: u64, what: &str) -> Result<()> {
        self.storage
            .set_len(len)
            .map_err(|e| Error::io(&self.name, what, e))?;
        self.len = len;
        Ok(())
    }

    /// A new allocation run `[start, end)` (`alloc_run_cluster`): its part past the written
    /// extent was never written, and none of it will be until it is handed out, cluster after
    /// cluster, so [`HostFile::preallocate_ahead`] may reserve space there.
    pub(crate) fn new_run(&mut self, start: HostOffset, end: HostOffset) {
        let from = start.get().max(self.written_end.next_multiple_of(4096));
        self.fresh = (from, end.get().max(from));
        self.prealloc_end = from;
    }

    /// Reserve space ahead of the allocation frontier: the cluster at `off` (of `cluster`
    /// bytes) is being handed out of the run. When it is not covered yet, up to
    /// [`PREALLOC_WINDOW`] of the run's never-written part from there on is reserved with
    /// [`Storage::preallocate`] (O_DIRECT files only: there the writes that follow, issued
    /// outside the state lock, then run in parallel instead of serializing in the file system
    /// on block allocation). `alloc_run_cluster` has extended the file over the run, so the
    /// reservation changes neither the bytes nor the length of the file and no crash image
    /// differs (no ordering rule: `flush.rs`). Bounded, so that a nearly full disk keeps room
    /// for metadata (and the storage reserves nothing there); a failure is ignored (it is a
    /// hint). What the run does not use is given back with it ([`HostFile::unreserve`]).
    pub(crate) fn preallocate_ahead(&mut self, off: HostOffset, cluster: u64) {
        let off = off.get();
        if off + cluster <= self.prealloc_end {
            return;
        }
        let from = off.max(self.prealloc_end);
        let to = self
            .fresh
            .1
            .min(self.len)
            .min(off + PREALLOC_WINDOW.max(cluster));
        if from < to {
            self.prealloc_end = to;
            if self.storage.preallocate(from, to - from).is_ok() {
                match self.reserved.last_mut() {
                    Some(last) if last.1 == from => last.1 = to,
                    _ => self.reserved.push((from, to)),
                }
            }
        }
    }

    /// The run is given back from `from` on (its unused part: free clusters, never written):
    /// punch out what [`HostFile::preallocate_ahead`] reserved there, so the file occupies what
    /// it did without preallocation (a punch of never-written space changes no byte).
    pub(crate) fn unreserve(&mut self, from: HostOffset) {
        let from = from.get().max(self.fresh.0);
        let to = self.prealloc_end.min(self.len);
        self.fresh = (0, 0);
        self.prealloc_end = 0;
        if from < to {
            let _ = self.storage.unreserve(from, to - from);
        }
    }

    /// At close: give back the space reserved ahead of writes that no write used (the rest of
    /// the clusters that were written only in part), so that the file occupies what it would
    /// without preallocation. No data I/O may run meanwhile: the I/O gate is taken (close
    /// runs when no other thread holds the image anyway).
    pub(crate) fn release_reserved(&mut self) {
        if self.reserved.is_empty() {
            return;
        }
        let gate = self.io_gate.clone();
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        for (from, to) in std::mem::take(&mut self.reserved) {
            let to = to.min(self.len);
            if from < to {
                let _ = self.storage.unreserve(from, to - from);
            }
        }
    }

    /// Note a freed range to punch out: [`HostFile::punch_pending`] issues the batch, sorted and
    /// merged, so that freeing thousands of clusters (a snapshot deleted, a large discard) costs
    /// a few fallocate calls instead of one each. The batch must be issued before any of its
    /// clusters can be allocated again: every loop that frees clusters issues it when done, and
    /// `store_refcount` issues it before a free cluster's refcount rises, as a safety net.
    pub(crate) fn punch(&mut self, off: HostOffset, len: u64) {
        let off = off.get();
        match self.punches.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => self.punches.push((off, len)),
        }
    }

    /// Punch out the freed ranges noted so far (a hint: if it fails a range keeps its old bytes,
    /// which is safe, since a reused cluster below the written extent is never taken as reading
    /// zeros).
    pub(crate) fn punch_pending(&mut self) {
        let mut list = std::mem::take(&mut self.punches);
        if mutant("punch-late") {
            std::mem::swap(&mut list, &mut self.late);
        }
        if list.is_empty() {
            return;
        }
        list.sort_unstable();
        let mut run: Option<(u64, u64)> = None;
        for (off, len) in list {
            run = match run {
                Some((o, l)) if o + l >= off => Some((o, (off + len).max(o + l) - o)),
                Some((o, l)) => {
                    let _ = self.storage.discard(o, l);
                    Some((off, len))
                }
                None => Some((off, len)),
            };
        }
        if let Some((o, l)) = run {
            let _ = self.storage.discard(o, l);
        }
    }

    /// Durability barrier (fdatasync), unless barriers are off.
    pub(crate) fn barrier(&mut self) -> Result<()> {
        self.barrier_for("flush")
    }

    /// An fdatasync even in cache=unsafe: for the few writes whose order is not about
    /// performance but about never losing the way in (LUKS key slots).
    pub(crate) fn sync_always(&mut self, what: &str) -> Result<()> {
        self.storage.flush().map_err(|e| {
            self.poison(&e);
            Error::io(&self.name, what, e)
        })
    }

    /// `barrier`, with `what` naming it in an error.
    pub(crate) fn barrier_for(&mut self, what: &str) -> Result<()> {
        if self.no_barriers {
            return Ok(());
        }
        self.storage.flush().map_err(|e| {
            self.poison(&e);
            Error::io(&self.name, what, e)
        })
    }

    /// Whether barriers are skipped (cache=unsafe).
    pub(crate) fn barriers_off(&self) -> bool {
        self.no_barriers
    }
    /// Turn barriers back on (close in unsafe mode syncs once at the end).
    pub(crate) fn enable_barriers(&mut self) {
        self.no_barriers = false;
    }

    /// Record that an fdatasync failed: from now on the image refuses writes and flushes.
    pub(crate) fn poison(&mut self, e: &std::io::Error) {
        if crate::mutants::active("failed-flush") {
            return;
        }
        self.poisoned.get_or_insert(Poison {
            errno: e.raw_os_error(),
            header: false,
        });
    }

    /// Record that a write to the header failed: it may or may not have reached the disk, so
    /// the header on disk is unknown (a table switch may have happened or not). Nothing more
    /// is written until the image is reopened and the header read again.
    pub(crate) fn poison_header(&mut self, e: &Error) {
        let errno = match e {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => Some(e.errno()),
        };
        self.poisoned.get_or_insert(Poison {
            errno,
            header: true,
        });
    }

    /// The error every write and flush returns once an fdatasync failed: the kernel may have
    /// dropped the pages it could not write and will not report that again, so nothing written
    /// since the last successful flush can be trusted to be on disk. Like a database after a
    /// failed fsync, the image refuses to go on until it is reopened.
    pub(crate) fn poisoned(&self) -> Result<()> {
        match self.poisoned {
            None => Ok(()),
            Some(Poison { errno, header }) => Err(Error::Io {
                file: self.name.to_string(),
                context: if header {
                    "refusing to write: an earlier write to the image header failed, so the \
                     header on disk may or may not have changed; close and reopen the image"
                } else {
                    "refusing to write: an earlier flush (fdatasync) failed, so data written \
                     since the last successful flush may not be on disk; close and reopen \
                     the image"
                }
                .into(),
                source: match errno {
                    Some(n) => std::io::Error::from_raw_os_error(n),
                    None => std::io::Error::other("earlier flush failed"),
                },
            }),
        }
    }

    /// Bytes the file occupies on the host.
    pub(crate) fn allocated_size(&self) -> Result<u64> {
        self.storage
            .allocated_size()
            .map_err(|e| Error::io(&self.name, "stat", e))
    }

    /// The file's real length, asked of the storage.
    pub(crate) fn stat_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io(&self.name, "stat", e))
    }
}
