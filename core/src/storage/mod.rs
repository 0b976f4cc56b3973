//! The only I/O seam: every byte the engine reads or writes goes through a [`Storage`].
//!
//! `flush` is the only durability barrier. The crash simulator and fault injection plug in here.

use std::fmt;
use std::io;

mod file;
mod mem;
#[cfg(feature = "testing")]
mod recording;

pub use file::FileStorage;
pub use mem::MemStorage;
#[cfg(feature = "testing")]
pub use recording::{
    CrashLog, Fault, LogEntry, Op, OpKind, Persist, RecordingStorage, EIO, ENOSPC, SECTOR,
};

/// A byte-addressed host file.
///
/// Implementations must be usable from several threads at once (`&self` methods, positional I/O).
pub trait Storage: Send + Sync + fmt::Debug {
    /// Read exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, extending the file if needed. Not durable until `flush`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserve the space of `[offset, offset + len)` for writes to come, a range inside the file
    /// that was never written (it reads as zeros). Changes neither the bytes nor the length of
    /// the file, so no crash image depends on it; a hint, done only where it pays: a file opened
    /// with O_DIRECT gets `fallocate(KEEP_SIZE)`, so that O_DIRECT writes into the range find
    /// their blocks allocated (unwritten) and ext4 runs them under its inode lock shared, in
    /// parallel, where writes into a hole take it exclusively. The default does nothing. On
    /// failure whatever was reserved is given back (the range still reads as zeros).
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Give back the space that [`Storage::preallocate`] reserved in `[offset, offset + len)`
    /// and no write used since (on a file: punch the ranges that read as holes, which
    /// fallocated blocks never written are). Changes no byte and not the length; the caller
    /// guarantees that no write into the range runs meanwhile. The default does nothing.
    fn unreserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Durability barrier: everything written before is on stable storage when this returns
    /// (fdatasync for a file).
    fn flush(&self) -> io::Result<()>;
    /// Tell the storage that a byte range is no longer needed (punch a hole). Reads of the range
    /// then return zeros. Best effort: may do nothing.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes actually allocated on the host (for `info`'s actual size). Defaults to `len`.
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }
    /// Number of durability barriers (`flush` calls that reached the device) so far.
    fn sync_count(&self) -> u64 {
        0
    }
    /// Take QEMU's image locks for `mode` on the file, or change the ones held to those of
    /// `mode` (`name` is for messages). Fails with [`crate::Error::Locked`] when another user of
    /// the file conflicts, holding what it held before. The default (in-memory storage) holds
    /// no locks.
    fn lock(&self, name: &str, mode: crate::LockMode) -> crate::Result<()> {
        let _ = (name, mode);
        Ok(())
    }
}
