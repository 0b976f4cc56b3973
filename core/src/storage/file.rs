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
        if !self.direct && buf.len() >= ALIAS_MIN && aliases(buf.as_ptr(), offset) {
            let done = BOUNCE.with(|b| match b.try_borrow_mut() {
                Ok(mut bounce) => self.read_bounced(&mut bounce, buf, offset).map(Some),
                Err(_) => Ok(None),
            })?;
            if done.is_some() {
                return Ok(());
            }
        }
        let n = self.pread_full(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// `pread` until `buf` is full or the end of the file; returns the bytes read.
    fn pread_full(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// [`Self::read_plain`] through `bounce`, placed so that the kernel's copy does not alias
    /// (see [`aliases`]), a chunk of [`BOUNCE_LEN`] at a time.
    fn read_bounced(&self, bounce: &mut Vec<u8>, buf: &mut [u8], offset: u64) -> io::Result<()> {
        const PAGE: u64 = 4096;
        if bounce.is_empty() {
            *bounce = vec![0; BOUNCE_LEN + PAGE as usize];
        }
        // Half a page away from both the file offset and the destination, modulo a page, so
        // that neither the kernel's copy into the chunk nor ours out of it (glibc's `memcpy`
        // also uses `rep movsb` for large copies) runs at an aliasing distance.
        let addr = bounce.as_ptr() as usize as u64;
        let at = ((offset + PAGE / 2) % PAGE + PAGE - addr % PAGE) % PAGE;
        let at = at as usize;
        let mut done = 0;
        while done < buf.len() {
            let len = (buf.len() - done).min(BOUNCE_LEN);
            let chunk = &mut bounce[at..at + len];
            let n = self.pread_full(chunk, offset + done as u64)?;
            buf[done..done + n].copy_from_slice(&chunk[..n]);
            done += n;
            if n < len {
                buf[done..].fill(0);
                break;
            }
        }
        Ok(())
    }
}

/// Whether an O_DIRECT request of `len` bytes at `buf` (file `offset`) can go to the device
/// as it is: buffer, offset and length all on [`DIRECT_ALIGN`] boundaries.
fn direct_as_is(buf: *const u8, len: usize, offset: u64) -> bool {
    (buf as usize).is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
        && len.is_multiple_of(DIRECT_ALIGN)
}

/// Reads of at least this many bytes are checked for [`aliases`].
const ALIAS_MIN: usize = 4096;
/// The chunk a read goes through when it would alias (a multiple of 4 KiB).
const BOUNCE_LEN: usize = 64 << 10;

thread_local! {
    /// Each thread's bounce buffer for reads that would alias, made on its first such read.
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether the kernel's copy from the page cache into `dest` for a read at file `offset` runs
/// at a short forward distance modulo 4 KiB (the destination 1 to 63 bytes past the source).
/// The kernel copies with `rep movsb`, which on some x86 CPUs (measured here: AMD EPYC with
/// FSRM) is 5x slower at such distances ("4K aliasing": 1.6 instead of 8 GB/s). A buffer from
/// `malloc` of 128 KiB or more starts 16 bytes into a page, so every page-aligned read into one
/// (a Python `bytearray`, `hashlib.file_digest`'s buffer, a C caller's `malloc`) would take the
/// slow path; such reads go through an aligned bounce buffer instead, and the user-space copy
/// out of it costs far less.
fn aliases(dest: *const u8, offset: u64) -> bool {
    let distance = (dest as usize as u64).wrapping_sub(offset) % 4096;
    (1..64).contains(&distance)
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
        // A read the device can do into the caller's buffer itself (a VMM's guest memory, the
        // CLI's and NBD server's aligned buffers) needs no bounce buffer.
        if direct_as_is(buf.as_ptr(), buf.len(), offset) {
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
        // Whole blocks from an aligned buffer go to the device as they are: no bounce buffer,
        // no read-modify-write, and the file cannot grow past the write's end.
        if direct_as_is(buf.as_ptr(), buf.len(), offset) {
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads that would alias go through the bounce buffer: every destination alignment, file
    /// offsets inside and across chunks, and reads that run past the end of the file (the rest
    /// reads as zeros), return exactly the file's bytes.
    #[test]
    fn aliasing_reads_return_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 3 * BOUNCE_LEN + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let st = FileStorage::open(&path, false, false).unwrap();
        let mut space = vec![0u8; len + 2 * 4096 + 8192];
        let mut bounced = 0;
        for offset in [0u64, 512, 4095, 4096 + 100, BOUNCE_LEN as u64 - 16] {
            for distance in [0usize, 8, 16, 24, 40, 63, 64, 2048] {
                for n in [
                    4096usize,
                    BOUNCE_LEN,
                    BOUNCE_LEN + 1,
                    2 * BOUNCE_LEN + 777,
                    len,
                ] {
                    // Place the destination `distance` bytes past the offset, modulo a page.
                    let base = space.as_ptr() as usize;
                    let want = (offset as usize + distance) % 4096;
                    let at = (want + 4096 - base % 4096) % 4096;
                    let dest = &mut space[at..at + n];
                    dest.fill(0xa5);
                    bounced += usize::from(aliases(dest.as_ptr(), offset));
                    st.read_at(dest, offset).unwrap();
                    let start = offset as usize;
                    let have = len.saturating_sub(start).min(n);
                    assert_eq!(
                        dest[..have],
                        data[start..start + have],
                        "{offset} {distance} {n}"
                    );
                    assert!(
                        dest[have..].iter().all(|&b| b == 0),
                        "{offset} {distance} {n}"
                    );
                }
            }
        }
        // distances 8, 16, 24, 40 and 63 alias, for every offset and length
        assert_eq!(bounced, 5 * 5 * 5);
    }

    /// O_DIRECT reads: into an aligned buffer (read by the device itself) and into unaligned
    /// ones (through the aligned bounce buffer), whole blocks, parts of blocks, and the file's
    /// last, partial block, after which the rest reads as zeros.
    #[test]
    fn o_direct_reads_aligned_and_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 5 * DIRECT_ALIGN + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + i / 4001) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let st = FileStorage::open(&path, false, true)
            .expect("O_DIRECT open (the temporary directory's file system must support it)");
        let mut space = Aligned::new(len + 3 * DIRECT_ALIGN);
        let space = space.buf();
        let a = DIRECT_ALIGN;
        for (at, offset, n) in [
            (0, 0, a),
            (0, a as u64, 3 * a),
            (0, 4 * a as u64, 2 * a),
            (0, 0, len + 2 * a),
            (512, 0, a),
            (16, 100, 2 * a + 7),
            (0, 4 * a as u64 + 999, a),
            (8, (len - 10) as u64, 50),
        ] {
            let dest = &mut space[at..at + n];
            dest.fill(0xa5);
            st.read_at(dest, offset).unwrap();
            let start = offset as usize;
            let have = len.saturating_sub(start).min(n);
            assert_eq!(dest[..have], data[start..start + have], "{at} {offset} {n}");
            assert!(dest[have..].iter().all(|&b| b == 0), "{at} {offset} {n}");
        }
    }

    /// O_DIRECT writes: whole blocks from an aligned buffer (written as they are) and the
    /// others (through a bounce buffer, with a read-modify-write of partial blocks) land where
    /// they should, leave the bytes around them alone and do not grow the file past their end.
    #[test]
    fn o_direct_writes_aligned_and_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 6 * DIRECT_ALIGN + 100;
        let mut want: Vec<u8> = (0..len).map(|i| (i * 31 + i / 3001) as u8).collect();
        std::fs::write(&path, &want).unwrap();
        let st = FileStorage::open(&path, true, true)
            .expect("O_DIRECT open (the temporary directory's file system must support it)");
        let mut space = Aligned::new(4 * DIRECT_ALIGN);
        let space = space.buf();
        let a = DIRECT_ALIGN;
        for (k, (at, offset, n)) in [
            (0, 0, a),
            (0, 2 * a as u64, 2 * a),
            (16, a as u64, a),
            (0, 3 * a as u64 + 512, 512),
            (100, 5 * a as u64 - 7, 20),
            (0, 6 * a as u64, 100),
        ]
        .into_iter()
        .enumerate()
        {
            let src = &mut space[at..at + n];
            for (i, b) in src.iter_mut().enumerate() {
                *b = (i * 7 + k * 50 + 1) as u8;
            }
            st.write_at(src, offset).unwrap();
            let o = offset as usize;
            want[o..o + n].copy_from_slice(src);
            assert_eq!(std::fs::read(&path).unwrap(), want, "{at} {offset} {n}");
        }
    }
}
