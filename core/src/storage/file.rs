use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::Storage;
use crate::lock::{self, Held, LockMode};

/// Alignment used for O_DIRECT I/O.
const DIRECT_ALIGN: usize = 4096;

/// Free space that [`Storage::preallocate`] leaves on the file system at least (and at least
/// 16 times what it reserves): on a nearly full disk nothing is reserved ahead, so that the
/// metadata (L2 tables, refcount blocks) still finds room and a full disk is reported by the
/// write that needs the space, as without preallocation.
const PREALLOC_MARGIN: u64 = 64 << 20;

/// A host file, accessed with positional I/O; `flush` is `fdatasync`.
///
/// With O_DIRECT every write is rounded out to whole 4 KiB blocks; a write that does not cover
/// its blocks exactly is a read-modify-write of the blocks around it. Those run exclusively
/// (`rmw` held for writing) against every other write and length change, which take it shared:
/// two sub-block writes to one block (two 512-byte guest writes, or guest data next to an L2
/// table in a small-cluster image) would otherwise each write back the other's old bytes.
///
/// The image locks ([`Storage::lock`]) are held on this file's open file description, so they
/// last until the `FileStorage` is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: bool,
    syncs: AtomicU64,
    rmw: RwLock<()>,
    locks: Mutex<Held>,
}

impl FileStorage {
    /// Open an existing file.
    pub fn open(path: &Path, writable: bool, direct: bool) -> io::Result<FileStorage> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(writable);
        if direct {
            oo.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let file = oo.open(path)?;
        Ok(FileStorage {
            file,
            direct,
            syncs: AtomicU64::new(0),
            rmw: RwLock::new(()),
            locks: Mutex::default(),
        })
    }
    /// Create a file, or open an existing one for writing *without* truncating it: the caller
    /// takes [`LockMode::Create`] first, so that an image in use is not destroyed, and then
    /// truncates (as [`crate::Image::create`] does).
    pub fn create(path: &Path) -> io::Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(FileStorage {
            file,
            direct: false,
            syncs: AtomicU64::new(0),
            rmw: RwLock::new(()),
            locks: Mutex::default(),
        })
    }
    /// Wrap an open file.
    pub fn from_file(file: File) -> FileStorage {
        FileStorage {
            file,
            direct: false,
            syncs: AtomicU64::new(0),
            rmw: RwLock::new(()),
            locks: Mutex::default(),
        }
    }
    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn read_plain(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        let held = self.locks.get_mut().unwrap_or_else(|e| e.into_inner());
        lock::release(&self.file, held);
    }
}

/// A heap buffer whose usable part starts at a DIRECT_ALIGN boundary.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let addr = raw.as_ptr() as usize;
        let start = (DIRECT_ALIGN - addr % DIRECT_ALIGN) % DIRECT_ALIGN;
        Aligned { raw, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.read_plain(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = Aligned::new((end - start) as usize);
        self.read_plain(bounce.buf(), start)?;
        let skip = (offset - start) as usize;
        let n = buf.len();
        buf.copy_from_slice(&bounce.buf()[skip..skip + n]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = Aligned::new((end - start) as usize);
        let skip = (offset - start) as usize;
        let partial = skip != 0 || (offset + buf.len() as u64) != end;
        let (_shared, _exclusive);
        if partial {
            // Read-modify-write of the partial blocks at either end, alone.
            _exclusive = self.rmw.write().unwrap_or_else(|e| e.into_inner());
            self.read_plain(bounce.buf(), start)?;
        } else {
            _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        }
        bounce.buf()[skip..skip + buf.len()].copy_from_slice(buf);
        let len = self.len()?;
        self.file.write_all_at(bounce.buf(), start)?;
        // Do not let the block rounding grow the file.
        let new_end = offset + buf.len() as u64;
        if end > len && new_end < end {
            self.file.set_len(len.max(new_end))?;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Not while a read-modify-write that may restore the old length is in flight.
        let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        self.file.set_len(len)
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, fstatvfs, FallocateFlags};
        // Buffered writes of one file serialize on the inode lock whatever the blocks' state
        // (measured: scripts/bench_writers.sh raw), so reserving gains them nothing.
        if !self.direct || len == 0 {
            return Ok(());
        }
        let st = fstatvfs(&self.file)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < len.saturating_add(PREALLOC_MARGIN.max(len.saturating_mul(16))) {
            return Ok(());
        }
        match fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => Ok(()),
            Err(e) => {
                // A failed fallocate may keep part of the range (ext4 does, on ENOSPC): give
                // it back, so that the space goes to what is really written. The range was
                // never written, so punching it changes no byte.
                let _ = fallocate(
                    &self.file,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    offset,
                    len,
                );
                Err(e.into())
            }
        }
    }

    fn unreserve(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, seek, FallocateFlags, SeekFrom};
        use rustix::io::Errno;
        if !self.direct || len == 0 {
            return Ok(());
        }
        // SEEK_HOLE reports unwritten (fallocated, never written) blocks as holes when no page
        // cache covers them, which O_DIRECT keeps empty: punching the holes frees exactly the
        // reserved blocks that no write used (and real holes again, which costs nothing).
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let hole = match seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if hole >= end {
                break;
            }
            let data = match seek(&self.file, SeekFrom::Data(hole)) {
                Ok(d) => d.min(end),
                Err(Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            if data <= hole {
                break;
            }
            fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                hole,
                data - hole,
            )?;
            pos = data;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // Not supported by this file system: discard is advisory.
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn lock(&self, name: &str, mode: LockMode) -> crate::Result<()> {
        let mut held = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        lock::set(&self.file, name, &mut held, mode)
    }
}
