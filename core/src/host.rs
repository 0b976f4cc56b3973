//! The image file as the engine sees it: every read, write, length change and barrier on the
//! host file goes through [`HostFile`], which keeps the file's extent (its length and how much
//! of it was ever written) and remembers a failed fdatasync.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::mutants::active as mutant;
use crate::offset::HostOffset;
use crate::storage::Storage;

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
