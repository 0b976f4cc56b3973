use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::Storage;

/// An in-memory file, for tests and scratch images.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    syncs: AtomicU64,
}

impl MemStorage {
    /// An empty file.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }
    /// A file holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemStorage {
        MemStorage {
            data: Mutex::new(data),
            syncs: AtomicU64::new(0),
        }
    }
    /// A copy of the file's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let off = to_usize(offset)?;
        buf.fill(0);
        if off < data.len() {
            let n = buf.len().min(data.len() - off);
            buf[..n].copy_from_slice(&data[off..off + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let off = to_usize(offset)?;
        let end = off
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[off..end].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = to_usize(len)?;
        self.lock().resize(len, 0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.lock();
        let off = to_usize(offset)?.min(data.len());
        let end = to_usize(offset.saturating_add(len))?.min(data.len());
        data[off..end].fill(0);
        Ok(())
    }
    fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}
