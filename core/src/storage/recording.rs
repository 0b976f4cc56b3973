//! [`RecordingStorage`]: an in-memory file that logs every mutating operation, builds the images a
//! power cut could leave behind, and injects I/O errors. For the crash simulator (feature
//! `testing`).
//!
//! # What is logged
//! Every `write_at` (offset and bytes), `set_len`, `discard` and `flush`, in the order they were
//! issued, including the ones that failed because a fault was injected. Reads are not logged; they
//! see every successful write so far, like a page cache would.
//!
//! # The crash model
//! A successful `flush` is a barrier: everything issued before it is on stable storage. Call the
//! state after the `k`-th successful flush *epoch `k`* (epoch 0 is the starting image, assumed
//! durable). A power cut between flush `k` and flush `k + 1` (or while flush `k + 1` runs) leaves:
//!
//! * the durable image of epoch `k`: every successful operation up to flush `k` applied in order;
//! * plus **any subset** of the operations issued after flush `k` and before flush `k + 1`
//!   completed (its *pending* operations), applied in issue order. The device may reorder writes
//!   freely between barriers, so no subset is excluded;
//! * each pending write or discard reaches the disk **whole, not at all, or torn**: sector-atomic,
//!   at 512-byte sectors (aligned to the file, not to the write), any subset of its sectors. A
//!   write smaller than a sector and inside one sector is atomic. A write that does not cover
//!   whole sectors persists whole sectors holding what the file held right after it (the bytes
//!   of earlier, still pending writes to the same sectors included), as a page cache or a
//!   read-modify-write would write them;
//! * a write past the end of the file extends it only if (part of) it persisted: the file then
//!   ends after its last persisted sector;
//! * a pending `set_len` (truncate or extend) may be lost;
//! * `preallocate` (fallocate with KEEP_SIZE on a file) reserves space and changes neither the
//!   bytes nor the length of the file: no crash image depends on whether it reached the disk,
//!   so it is not logged (it is counted, and can be made to fail). What keeps this true is its
//!   contract, which this storage enforces by panicking when the engine breaks it: the range
//!   lies inside the file and reads as zeros (never written), so neither the reservation nor
//!   the punch that gives it back after a failure can change a byte;
//! * a failed operation (injected error) did not change what reads see, but may have reached the
//!   disk anyway (EIO after a partial transfer): it is a pending operation of its own epoch like
//!   any other; durable images of later epochs assume it did not land (it cannot land later:
//!   it is not in the page cache, or reads would see it). A failed flush is no barrier;
//! * **doubtful** operations: every operation that was pending when a flush failed (issued after
//!   the last successful flush and before the failed one). On Linux a failed writeback may drop the dirty pages and report the error once;
//!   the next fdatasync then succeeds without them. So a doubtful operation is never part of a
//!   durable image, and it is a pending operation of its own epoch and of **every later epoch**
//!   (any subset, whole or torn), applied in log order among the others: a durable operation
//!   issued after it still overwrites it.
//!
//! # Flushes are intervals
//! A flush is logged when it begins: everything logged before it is covered by it. With
//! [`RecordingStorage::set_flush_delay`] the flush then sleeps (the "fdatasync" runs) without
//! holding the lock, so other threads go on; what they log meanwhile is not covered (it is
//! pending in the next epoch) but may be on the disk already when the power fails before the
//! flush returned, so it is pending in the flush's previous epoch too: an epoch ends where the
//! flush that ends it *completed* ([`CrashLog::epoch_end`]).
//!
//! [`CrashLog`] builds these images: [`CrashLog::crash_image`], or [`CrashLog::replay_base`] and
//! [`CrashLog::replay`] (what the crash simulator uses), with one [`Persist`] choice per pending
//! operation.
//!
//! # Fault injection
//! [`Fault`] makes the `n`-th operation of a kind (counted from 1 since the storage was created,
//! failed ones included) fail with an OS error, EIO (5) or ENOSPC (28) typically, either once or
//! for that operation and every later one of the same kind (like blkdebug's `once=on/off`).

use std::io;
use std::sync::Mutex;

use super::Storage;

/// Sector size of the crash model: the unit a power cut cannot tear.
pub const SECTOR: u64 = 512;
/// `EIO`, for [`Fault::errno`].
pub const EIO: i32 = 5;
/// `ENOSPC`, for [`Fault::errno`].
pub const ENOSPC: i32 = 28;

/// The kind of a logged operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `write_at`.
    Write,
    /// `set_len`.
    SetLen,
    /// `discard`.
    Discard,
    /// `flush`.
    Flush,
    /// `preallocate` (counted and open to faults, not logged: see the module documentation).
    Preallocate,
}

/// One logged operation, as the engine issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write_at(data, offset)`.
    Write {
        /// File offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `set_len(len)`.
    SetLen {
        /// New length.
        len: u64,
    },
    /// `discard(offset, len)`.
    Discard {
        /// File offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `flush()`.
    Flush,
}

impl Op {
    /// The kind of the operation.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Write { .. } => OpKind::Write,
            Op::SetLen { .. } => OpKind::SetLen,
            Op::Discard { .. } => OpKind::Discard,
            Op::Flush => OpKind::Flush,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write { offset, data } => write!(f, "write {offset:#x}+{:#x}", data.len()),
            Op::SetLen { len } => write!(f, "set_len {len:#x}"),
            Op::Discard { offset, len } => write!(f, "discard {offset:#x}+{len:#x}"),
            Op::Flush => write!(f, "flush"),
        }
    }
}

/// A logged operation with its outcome.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The operation.
    pub op: Op,
    /// The injected error (raw OS error number) if the operation failed.
    pub error: Option<i32>,
    /// For writes and discards: the sector-aligned start of what the operation persists.
    sector_offset: u64,
    /// For writes and discards: the whole sectors (the last one possibly cut at the end of the
    /// file) as the file held them right after the operation (as if it succeeded).
    sector_data: Vec<u8>,
    /// For flushes: the log length when the flush returned (entries at or after it were issued
    /// after it completed). `index + 1` without a flush delay.
    done: usize,
}

impl LogEntry {
    /// Whether the operation failed (an injected fault).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
    /// Number of 512-byte sectors a write or discard may persist independently (0 for
    /// `set_len` and `flush`, and for a discard past the end of the file).
    pub fn sectors(&self) -> usize {
        self.sector_data.len().div_ceil(SECTOR as usize)
    }
    /// The file range `[start, end)` a write or discard may change, in whole sectors (cut at the
    /// end of the file).
    pub fn sector_range(&self) -> (u64, u64) {
        (
            self.sector_offset,
            self.sector_offset + self.sector_data.len() as u64,
        )
    }
}

impl std::fmt::Display for LogEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(e) = self.error {
            write!(f, " (failed: errno {e})")?;
        }
        Ok(())
    }
}

/// How much of one pending operation a crash image keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Persist {
    /// The whole operation reached the disk.
    Whole,
    /// Nothing of it did.
    Lost,
    /// Torn: exactly the sectors marked true (index `i` is the `i`-th sector of
    /// [`LogEntry::sector_range`]). Only meaningful for writes and discards; a `set_len` is kept
    /// when any entry is true.
    Sectors(Vec<bool>),
}

/// An injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Which kind of operation fails.
    pub op: OpKind,
    /// The first failing operation of that kind, counted from 1 since the storage was created.
    pub nth: u64,
    /// The OS error number returned ([`EIO`], [`ENOSPC`], ...).
    pub errno: i32,
    /// Fail only the `nth` operation (`true`), or it and every later one of the kind (`false`).
    pub once: bool,
}

impl Fault {
    /// The `nth` operation of kind `op` fails once with `errno`.
    pub fn once(op: OpKind, nth: u64, errno: i32) -> Fault {
        Fault {
            op,
            nth,
            errno,
            once: true,
        }
    }
    /// The `nth` and every later operation of kind `op` fail with `errno`.
    pub fn from_then_on(op: OpKind, nth: u64, errno: i32) -> Fault {
        Fault {
            op,
            nth,
            errno,
            once: false,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    flush_delay: std::time::Duration,
    data: Vec<u8>,
    base: Vec<u8>,
    log: Vec<LogEntry>,
    counts: [u64; 5],
    faults: Vec<Fault>,
    fired: u64,
    syncs: u64,
}

fn kind_index(k: OpKind) -> usize {
    match k {
        OpKind::Write => 0,
        OpKind::SetLen => 1,
        OpKind::Discard => 2,
        OpKind::Flush => 3,
        OpKind::Preallocate => 4,
    }
}

impl Inner {
    /// Count the operation and decide whether it fails.
    fn admit(&mut self, k: OpKind) -> Option<i32> {
        let n = {
            let c = &mut self.counts[kind_index(k)];
            *c += 1;
            *c
        };
        let hit = self
            .faults
            .iter()
            .find(|f| f.op == k && (n == f.nth || (!f.once && n > f.nth)))
            .map(|f| f.errno);
        if hit.is_some() {
            self.fired += 1;
        }
        hit
    }
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

fn end_of(offset: u64, len: usize) -> io::Result<usize> {
    to_usize(offset)?
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))
}

/// Write `buf` at `off` into `data`, extending it with zeros as needed.
fn put(data: &mut Vec<u8>, off: usize, buf: &[u8]) {
    let end = off + buf.len();
    if end > data.len() {
        data.resize(end, 0);
    }
    data[off..end].copy_from_slice(buf);
}

/// The whole sectors around `[off, off+len)` of `data` after `change` is applied to them, cut at
/// the end of the file after the change. Returns (start, bytes).
fn sectors_after(
    data: &[u8],
    off: usize,
    len: usize,
    change: impl FnOnce(&mut Vec<u8>, usize),
) -> (u64, Vec<u8>) {
    let s = SECTOR as usize;
    let start = off / s * s;
    let end = (off + len).div_ceil(s) * s;
    let mut buf = if start < data.len() {
        data[start..data.len().min(end)].to_vec()
    } else {
        Vec::new()
    };
    change(&mut buf, off - start);
    // Cut at the end of the file after the change.
    let file_end = data.len().max(start + buf.len());
    buf.truncate(file_end.min(end) - start);
    (start as u64, buf)
}

/// An in-memory file that logs every write, `set_len`, discard and flush, and can inject faults.
/// See the [module documentation](self) for the crash model.
#[derive(Debug, Default)]
pub struct RecordingStorage {
    inner: Mutex<Inner>,
}

impl RecordingStorage {
    /// A file holding `base` (the durable state at epoch 0), with an empty log.
    pub fn new(base: Vec<u8>) -> RecordingStorage {
        RecordingStorage {
            inner: Mutex::new(Inner {
                data: base.clone(),
                base,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a fault. Faults stay until [`RecordingStorage::clear_faults`].
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }
    /// Remove every fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }
    /// How many operations failed because of an injected fault.
    pub fn faults_fired(&self) -> u64 {
        self.lock().fired
    }
    /// How many operations of kind `k` were issued so far (failed ones included).
    pub fn op_count(&self, k: OpKind) -> u64 {
        self.lock().counts[kind_index(k)]
    }
    /// A copy of the log so far.
    pub fn log(&self) -> Vec<LogEntry> {
        self.lock().log.clone()
    }
    /// Number of log entries so far (the index the next operation will get).
    pub fn log_len(&self) -> usize {
        self.lock().log.len()
    }
    /// Number of successful flushes so far: the current epoch.
    pub fn epoch(&self) -> usize {
        self.lock().syncs as usize
    }
    /// A copy of the file as reads see it now.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().data.clone()
    }
    /// The starting image and the log so far, for building crash images.
    pub fn crash_log(&self) -> CrashLog {
        let g = self.lock();
        CrashLog::new(g.base.clone(), g.log.clone())
    }
    /// Make every flush sleep `delay` after it was logged, without holding the lock (so that
    /// other threads' operations race it). Zero (the default): no sleep.
    pub fn set_flush_delay(&self, delay: std::time::Duration) {
        self.lock().flush_delay = delay;
    }
    /// Free the file's bytes and the log (for a storage that stays referenced by a leaked image
    /// after its log was taken). Later operations still work, on an empty file.
    pub fn release(&self) {
        let mut g = self.lock();
        g.data = Vec::new();
        g.base = Vec::new();
        g.log = Vec::new();
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        let off = to_usize(offset)?;
        buf.fill(0);
        if off < g.data.len() {
            let n = buf.len().min(g.data.len() - off);
            buf[..n].copy_from_slice(&g.data[off..off + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        let off = to_usize(offset)?;
        end_of(offset, buf.len())?;
        let error = g.admit(OpKind::Write);
        let (sector_offset, sector_data) =
            sectors_after(&g.data, off, buf.len(), |b, rel| put(b, rel, buf));
        if error.is_none() {
            put(&mut g.data, off, buf);
        }
        g.log.push(LogEntry {
            op: Op::Write {
                offset,
                data: buf.to_vec(),
            },
            error,
            sector_offset,
            sector_data,
            done: 0,
        });
        match error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        let n = to_usize(len)?;
        let error = g.admit(OpKind::SetLen);
        if error.is_none() {
            g.data.resize(n, 0);
        }
        g.log.push(LogEntry {
            op: Op::SetLen { len },
            error,
            sector_offset: 0,
            sector_data: Vec::new(),
            done: 0,
        });
        match error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        let off = to_usize(offset)?;
        let end = end_of(offset, to_usize(len)?)?;
        assert!(
            end <= g.data.len(),
            "preallocate {offset:#x}+{len:#x} past the end of the file ({:#x})",
            g.data.len()
        );
        assert!(
            g.data[off..end].iter().all(|&b| b == 0),
            "preallocate {offset:#x}+{len:#x} over bytes that were written"
        );
        match g.admit(OpKind::Preallocate) {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn flush(&self) -> io::Result<()> {
        let (error, index, delay) = {
            let mut g = self.lock();
            let error = g.admit(OpKind::Flush);
            if error.is_none() {
                g.syncs += 1;
            }
            let index = g.log.len();
            g.log.push(LogEntry {
                op: Op::Flush,
                error,
                sector_offset: 0,
                sector_data: Vec::new(),
                done: index + 1,
            });
            (error, index, g.flush_delay)
        };
        if !delay.is_zero() {
            // The "fdatasync" runs: other threads go on issuing operations meanwhile.
            std::thread::sleep(delay);
            let mut g = self.lock();
            let n = g.log.len();
            g.log[index].done = n;
        }
        match error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        let error = g.admit(OpKind::Discard);
        let flen = g.data.len();
        let off = to_usize(offset)?.min(flen);
        let end = to_usize(offset.saturating_add(len))?.min(flen);
        let (sector_offset, sector_data) = if end > off {
            sectors_after(&g.data, off, end - off, |b, rel| {
                b[rel..rel + (end - off)].fill(0)
            })
        } else {
            (off as u64, Vec::new())
        };
        if error.is_none() {
            g.data[off..end].fill(0);
        }
        g.log.push(LogEntry {
            op: Op::Discard { offset, len },
            error,
            sector_offset,
            sector_data,
            done: 0,
        });
        match error {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn sync_count(&self) -> u64 {
        self.lock().syncs
    }
}

/// A starting image and an operation log: builds the images a power cut could leave.
/// See the [module documentation](self) for the model.
#[derive(Debug, Clone)]
pub struct CrashLog {
    base: Vec<u8>,
    entries: Vec<LogEntry>,
    /// Log indices of the successful flushes.
    flushes: Vec<usize>,
    /// Per entry: doubtful (pending when a flush failed): never durable, pending in
    /// every epoch from its own on.
    doubtful: Vec<bool>,
}

impl CrashLog {
    /// A crash log over `base` (durable at epoch 0) and `entries`.
    pub fn new(base: Vec<u8>, entries: Vec<LogEntry>) -> CrashLog {
        let flushes = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.op == Op::Flush && !e.failed())
            .map(|(i, _)| i)
            .collect();
        let mut doubtful = vec![false; entries.len()];
        let mut since_sync: Vec<usize> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match (&e.op, e.failed()) {
                (Op::Flush, false) => since_sync.clear(),
                (Op::Flush, true) => {
                    for &j in &since_sync {
                        doubtful[j] = true;
                    }
                }
                _ => since_sync.push(i),
            }
        }
        CrashLog {
            base,
            entries,
            flushes,
            doubtful,
        }
    }
    /// The starting image.
    pub fn base(&self) -> &[u8] {
        &self.base
    }
    /// Every logged operation.
    pub fn entries(&self) -> &[LogEntry] {
        &self.entries
    }
    /// Whether entry `index` is doubtful: a flush failed while it was pending. It
    /// is never durable, and pending in every epoch from its own on.
    pub fn doubtful(&self, index: usize) -> bool {
        self.doubtful[index]
    }
    /// Number of epochs: successful flushes + 1 (epoch 0 is the starting image).
    pub fn epochs(&self) -> usize {
        self.flushes.len() + 1
    }
    /// Log index of the flush that starts epoch `epoch` (`None` for epoch 0).
    pub fn flush_index(&self, epoch: usize) -> Option<usize> {
        epoch.checked_sub(1).map(|i| self.flushes[i])
    }
    /// Log index where epoch `epoch` ends: where the flush starting the next epoch completed
    /// (right after its entry, unless operations raced it), or the end of the log. Operations
    /// at or after it cannot be part of a crash image of this epoch.
    ///
    /// Flushes may overlap (several threads): the epoch ends at the earliest completion of any
    /// flush that began after it, since each of them makes at least the next epoch durable.
    pub fn epoch_end(&self, epoch: usize) -> usize {
        self.flushes[epoch.min(self.flushes.len())..]
            .iter()
            .map(|&f| self.entries[f].done.clamp(f + 1, self.entries.len()))
            .min()
            .unwrap_or(self.entries.len())
    }
    /// Log indices of the operations pending in epoch `epoch`, in log order: every write,
    /// discard and `set_len` (failed ones included) after its flush and before the next
    /// successful one completed, and every earlier doubtful one.
    pub fn pending(&self, epoch: usize) -> Vec<usize> {
        let start = self.flush_index(epoch).map_or(0, |i| i + 1);
        (0..start)
            .filter(|&i| self.doubtful[i])
            .chain(start..self.epoch_end(epoch))
            .filter(|&i| self.entries[i].op != Op::Flush)
            .collect()
    }
    /// Whether entry `i` is applied whole in every crash image of epoch `epoch` (a successful,
    /// not doubtful operation before its flush).
    fn durable_in(&self, i: usize, epoch: usize) -> bool {
        i < self.flush_index(epoch).unwrap_or(0) && !self.entries[i].failed() && !self.doubtful[i]
    }
    /// The durable image of epoch `epoch`: the starting image with every successful operation
    /// before its flush applied, doubtful ones excepted.
    pub fn durable(&self, epoch: usize) -> Vec<u8> {
        let mut img = self.base.clone();
        let end = self.flush_index(epoch).unwrap_or(0);
        for i in 0..end {
            if self.durable_in(i, epoch) {
                self.apply(&mut img, i, &Persist::Whole);
            }
        }
        img
    }
    /// Bring a durable image of epoch `from` to epoch `to` (`from <= to`).
    pub fn advance(&self, img: &mut Vec<u8>, from: usize, to: usize) {
        let start = self.flush_index(from).unwrap_or(0);
        let end = self.flush_index(to).unwrap_or(0);
        for i in start..end {
            if self.durable_in(i, to) {
                self.apply(img, i, &Persist::Whole);
            }
        }
    }
    /// Where the crash images of epoch `epoch` start to differ: the first pending entry (or the
    /// epoch's flush), and the image with every durable operation before it applied. Every crash
    /// image of the epoch is that image plus [`CrashLog::replay`] from there.
    pub fn replay_base(&self, epoch: usize) -> (usize, Vec<u8>) {
        let start = self.flush_index(epoch).map_or(0, |i| i + 1);
        let from = (0..start).find(|&i| self.doubtful[i]).unwrap_or(start);
        let mut img = self.base.clone();
        for i in 0..from {
            if self.durable_in(i, epoch) {
                self.apply(&mut img, i, &Persist::Whole);
            }
        }
        (from, img)
    }
    /// Replay log entries `from..epoch_end(epoch)` onto `img` (the image of
    /// [`CrashLog::replay_base`]) in log order: durable ones whole, pending ones (`pending`, the
    /// entries of [`CrashLog::pending`] from `from` on) as `persist` says (missing: lost), the
    /// others not at all. Returns the shortest length the image had on the way.
    pub fn replay(
        &self,
        img: &mut Vec<u8>,
        epoch: usize,
        from: usize,
        pending: &[usize],
        persist: &[Persist],
    ) -> usize {
        let mut min_len = img.len();
        let mut j = 0;
        for i in from..self.epoch_end(epoch) {
            while j < pending.len() && pending[j] < i {
                j += 1;
            }
            if j < pending.len() && pending[j] == i {
                self.apply(img, i, persist.get(j).unwrap_or(&Persist::Lost));
            } else if self.durable_in(i, epoch) {
                self.apply(img, i, &Persist::Whole);
            } else {
                continue;
            }
            min_len = min_len.min(img.len());
        }
        min_len
    }
    /// The image with every successful operation applied (what reads saw at the end).
    pub fn final_image(&self) -> Vec<u8> {
        let mut img = self.base.clone();
        for i in 0..self.entries.len() {
            if !self.entries[i].failed() {
                self.apply(&mut img, i, &Persist::Whole);
            }
        }
        img
    }
    /// Apply (part of) log entry `index` to `img`, as `how` says.
    pub fn apply(&self, img: &mut Vec<u8>, index: usize, how: &Persist) {
        let e = &self.entries[index];
        match (&e.op, how) {
            (_, Persist::Lost) | (Op::Flush, _) => {}
            (Op::SetLen { len }, Persist::Whole) => img.resize(*len as usize, 0),
            (Op::SetLen { len }, Persist::Sectors(m)) => {
                if m.iter().any(|&b| b) {
                    img.resize(*len as usize, 0)
                }
            }
            (Op::Write { .. }, Persist::Whole) => {
                put(img, e.sector_offset as usize, &e.sector_data);
            }
            (Op::Discard { .. }, Persist::Whole) => {
                // A discard never extends the file: cut at the current end.
                let start = e.sector_offset as usize;
                let n = e.sector_data.len().min(img.len().saturating_sub(start));
                if n > 0 {
                    img[start..start + n].copy_from_slice(&e.sector_data[..n]);
                }
            }
            (Op::Write { .. } | Op::Discard { .. }, Persist::Sectors(mask)) => {
                let s = SECTOR as usize;
                let discard = matches!(e.op, Op::Discard { .. });
                for (i, chunk) in e.sector_data.chunks(s).enumerate() {
                    if !mask.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    let at = e.sector_offset as usize + i * s;
                    if discard {
                        let n = chunk.len().min(img.len().saturating_sub(at));
                        if n > 0 {
                            img[at..at + n].copy_from_slice(&chunk[..n]);
                        }
                    } else {
                        put(img, at, chunk);
                    }
                }
            }
        }
    }
    /// The crash image of epoch `epoch` keeping pending operation `pending(epoch)[i]` as
    /// `persist[i]` says (missing entries are lost).
    pub fn crash_image(&self, epoch: usize, persist: &[Persist]) -> Vec<u8> {
        let pending = self.pending(epoch);
        let (from, mut img) = self.replay_base(epoch);
        self.replay(&mut img, epoch, from, &pending, persist);
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_and_reads() {
        let st = RecordingStorage::new(vec![1u8; 1024]);
        st.write_at(&[2u8; 10], 100).unwrap();
        st.flush().unwrap();
        st.set_len(2048).unwrap();
        st.discard(0, 512).unwrap();
        let mut b = [9u8; 4];
        st.read_at(&mut b, 98).unwrap();
        assert_eq!(b, [0, 0, 0, 0]);
        st.read_at(&mut b, 510).unwrap();
        assert_eq!(b, [0, 0, 1, 1]);
        assert_eq!(st.len().unwrap(), 2048);
        assert_eq!(st.sync_count(), 1);
        let log = st.log();
        let kinds: Vec<_> = log.iter().map(|e| e.op.kind()).collect();
        assert_eq!(
            kinds,
            [
                OpKind::Write,
                OpKind::Flush,
                OpKind::SetLen,
                OpKind::Discard
            ]
        );
        // The sub-sector write persists its whole sector.
        assert_eq!(log[0].sector_range(), (0, 512));
        assert_eq!(log[0].sectors(), 1);
    }

    #[test]
    fn epochs_and_crash_images() {
        let st = RecordingStorage::new(vec![0u8; 1024]);
        st.write_at(&[1u8; 1024], 0).unwrap();
        st.flush().unwrap();
        st.write_at(&[2u8; 1024], 512).unwrap(); // extends to 1536, 2 sectors
        st.set_len(4096).unwrap();
        let cl = st.crash_log();
        assert_eq!(cl.epochs(), 2);
        assert_eq!(cl.pending(0), vec![0]);
        assert_eq!(cl.pending(1), vec![2, 3]);
        let d1 = cl.durable(1);
        assert_eq!(d1, vec![1u8; 1024]);
        let mut d = cl.durable(0);
        cl.advance(&mut d, 0, 1);
        assert_eq!(d, d1);
        // Lost everything.
        assert_eq!(cl.crash_image(1, &[]), d1);
        // Whole write, lost set_len.
        let img = cl.crash_image(1, &[Persist::Whole, Persist::Lost]);
        assert_eq!(img.len(), 1536);
        assert!(img[512..].iter().all(|&b| b == 2));
        // Torn: only the second sector (past the old end).
        let img = cl.crash_image(1, &[Persist::Sectors(vec![false, true]), Persist::Lost]);
        assert_eq!(img.len(), 1536);
        assert!(img[..1024].iter().all(|&b| b == 1));
        assert!(img[1024..].iter().all(|&b| b == 2));
        // Torn: only the first sector; the file is not extended.
        let img = cl.crash_image(1, &[Persist::Sectors(vec![true, false]), Persist::Whole]);
        assert_eq!(img.len(), 4096);
        assert!(img[512..1024].iter().all(|&b| b == 2));
        assert!(img[1024..].iter().all(|&b| b == 0));
        assert_eq!(cl.final_image(), st.to_vec());
    }

    #[test]
    fn unaligned_writes_carry_their_sector() {
        let st = RecordingStorage::new(vec![0u8; 1024]);
        st.flush().unwrap();
        st.write_at(&[7u8; 8], 8).unwrap();
        st.write_at(&[8u8; 8], 16).unwrap();
        let cl = st.crash_log();
        // Keeping only the second write persists the first one's bytes too (same sector).
        let img = cl.crash_image(1, &[Persist::Lost, Persist::Whole]);
        assert_eq!(&img[8..16], &[7u8; 8]);
        assert_eq!(&img[16..24], &[8u8; 8]);
        // Keeping only the first does not persist the second.
        let img = cl.crash_image(1, &[Persist::Whole, Persist::Lost]);
        assert_eq!(&img[16..24], &[0u8; 8]);
    }

    #[test]
    fn faults() {
        let st = RecordingStorage::new(Vec::new());
        st.inject(Fault::once(OpKind::Write, 2, EIO));
        st.inject(Fault::from_then_on(OpKind::Flush, 2, ENOSPC));
        st.write_at(b"a", 0).unwrap();
        let e = st.write_at(b"b", 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(EIO));
        st.write_at(b"c", 2).unwrap();
        st.flush().unwrap();
        assert_eq!(st.flush().unwrap_err().raw_os_error(), Some(ENOSPC));
        assert_eq!(st.flush().unwrap_err().raw_os_error(), Some(ENOSPC));
        assert_eq!(st.faults_fired(), 3);
        assert_eq!(st.sync_count(), 1);
        // The failed write did not change the file, but is logged.
        assert_eq!(st.to_vec(), b"a\0c");
        let cl = st.crash_log();
        assert!(cl.entries()[1].failed());
        assert_eq!(cl.epochs(), 2);
        assert_eq!(cl.pending(0), vec![0, 1, 2]);
        assert_eq!(cl.durable(1), b"a\0c");
        let img = cl.crash_image(0, &[Persist::Whole, Persist::Whole, Persist::Lost]);
        assert_eq!(img, b"ab");
        assert_eq!(st.op_count(OpKind::Flush), 3);
        st.clear_faults();
        st.flush().unwrap();
    }

    #[test]
    fn failed_flush_makes_pending_writes_doubtful() {
        let st = RecordingStorage::new(vec![0u8; 1024]);
        st.inject(Fault::once(OpKind::Flush, 2, EIO));
        st.write_at(&[1u8; 512], 0).unwrap(); // #0
        st.flush().unwrap(); // #1: epoch 1
        st.write_at(&[2u8; 512], 0).unwrap(); // #2: pending when #4 fails
        st.write_at(&[3u8; 512], 512).unwrap(); // #3: too
        assert!(st.flush().is_err()); // #4
        st.write_at(&[4u8; 512], 512).unwrap(); // #5
        st.flush().unwrap(); // #6: epoch 2
        st.write_at(&[5u8; 8], 0).unwrap(); // #7
        let cl = st.crash_log();
        let kinds: Vec<bool> = (0..cl.entries().len()).map(|i| cl.doubtful(i)).collect();
        assert_eq!(
            kinds,
            [false, false, true, true, false, false, false, false]
        );
        assert_eq!(cl.epochs(), 3);
        // The writes a failed flush covered are never durable...
        let d2 = cl.durable(2);
        assert!(d2[..512].iter().all(|&b| b == 1));
        assert!(d2[512..].iter().all(|&b| b == 4));
        // ... and pending in every later epoch, in log order.
        assert_eq!(cl.pending(1), vec![2, 3, 5]);
        assert_eq!(cl.pending(2), vec![2, 3, 7]);
        // Epoch 2 keeping both doubtful writes: #3 is overwritten by the durable #5.
        let img = cl.crash_image(2, &[Persist::Whole, Persist::Whole, Persist::Lost]);
        assert!(img[..512].iter().all(|&b| b == 2));
        assert!(img[512..].iter().all(|&b| b == 4));
        // Losing them: the durable image.
        assert_eq!(cl.crash_image(2, &[]), d2);
        // The sub-sector write #7 carries what reads saw (#2's bytes) in its sector.
        let img = cl.crash_image(2, &[Persist::Lost, Persist::Lost, Persist::Whole]);
        assert_eq!(&img[..8], &[5u8; 8]);
        assert!(img[8..512].iter().all(|&b| b == 2));
        let (from, base) = cl.replay_base(2);
        assert_eq!(from, 2);
        assert!(base[..512].iter().all(|&b| b == 1));
        assert!(base[512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn failed_write_is_pending_in_its_epoch_only() {
        let st = RecordingStorage::new(vec![0u8; 1024]);
        st.inject(Fault::once(OpKind::Write, 1, ENOSPC));
        assert!(st.write_at(&[1u8; 1024], 0).is_err()); // #0
        st.flush().unwrap(); // #1
        st.write_at(&[2u8; 512], 512).unwrap(); // #2
        st.flush().unwrap(); // #3
        let cl = st.crash_log();
        assert!(!cl.doubtful(0) && !cl.doubtful(2));
        assert_eq!(cl.pending(0), vec![0]);
        assert_eq!(cl.pending(1), vec![2]);
        assert_eq!(cl.pending(2), Vec::<usize>::new());
        assert_eq!(cl.durable(2), [vec![0u8; 512], vec![2u8; 512]].concat());
        // In its own epoch it may have landed, whole or torn.
        let img = cl.crash_image(0, &[Persist::Sectors(vec![true, false])]);
        assert_eq!(img, [vec![1u8; 512], vec![0u8; 512]].concat());
    }

    #[test]
    fn delayed_flush_is_an_interval() {
        use std::sync::Arc;
        use std::time::Duration;
        let st = Arc::new(RecordingStorage::new(vec![0u8; 1024]));
        st.set_flush_delay(Duration::from_millis(200));
        st.write_at(&[1u8; 512], 0).unwrap(); // #0
        let t = {
            let st = st.clone();
            std::thread::spawn(move || st.flush().unwrap()) // #1
        };
        while st.log_len() < 2 {
            std::thread::yield_now();
        }
        st.write_at(&[2u8; 512], 512).unwrap(); // #2: races the flush
        t.join().unwrap();
        st.write_at(&[3u8; 512], 512).unwrap(); // #3: after it returned
        let cl = st.crash_log();
        assert_eq!(cl.epoch_end(0), 3);
        // The racing write may be on the disk in a crash before the flush returned...
        assert_eq!(cl.pending(0), vec![0, 2]);
        // ... and is not covered by it.
        assert_eq!(cl.pending(1), vec![2, 3]);
        assert_eq!(cl.durable(1), [vec![1u8; 512], vec![0u8; 512]].concat());
    }

    #[test]
    fn overlapping_flushes_end_an_epoch_at_the_first_completion() {
        use std::sync::Arc;
        use std::time::Duration;
        let st = Arc::new(RecordingStorage::new(vec![0u8; 1536]));
        st.set_flush_delay(Duration::from_millis(300));
        st.write_at(&[1u8; 512], 0).unwrap(); // #0
        let slow = {
            let st = st.clone();
            std::thread::spawn(move || st.flush().unwrap()) // #1, completes last
        };
        while st.log_len() < 2 {
            std::thread::yield_now();
        }
        st.write_at(&[2u8; 512], 512).unwrap(); // #2
        st.set_flush_delay(Duration::ZERO);
        st.flush().unwrap(); // #3: began after #1, completes first
        st.write_at(&[3u8; 512], 1024).unwrap(); // #4: after #3 completed
        slow.join().unwrap();
        let cl = st.crash_log();
        // A crash before #3 completed: #2 may be lost, #4 was not issued yet.
        assert_eq!(cl.epoch_end(0), 4);
        assert_eq!(cl.pending(0), vec![0, 2]);
        assert_eq!(cl.epoch_end(1), 4);
        assert_eq!(cl.pending(1), vec![2]);
        // Once #3 completed, #2 is durable.
        assert_eq!(cl.durable(2)[512..1024], [2u8; 512]);
    }
}
