//! One way to read any source image: a qcow2 image through the core, or a raw file with `pread`.
//!
//! Convert, compare and map see both through [`Disk`]: a virtual size, `read_at`, and `map` extents
//! shaped like [`qcow2rs::MapEntry`] (for raw files from `SEEK_DATA`/`SEEK_HOLE`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use qcow2rs::{Format, Image, MapEntry, OpenOptions};

use crate::util::{core_text, io_text, round_up, CliError, CliResult};

/// An open source image.
pub enum Disk {
    /// A qcow2 image (with its backing chain, if opened with one).
    Qcow2(Box<Image>),
    /// A raw file.
    Raw(RawFile),
}

/// A raw image file. Like qemu, its size is the file length rounded up to 512 bytes; the bytes
/// past the end of the file read as zeros.
pub struct RawFile {
    file: File,
    len: u64,
    size: u64,
}

/// Parse a `-f`/`-F`/`-O` format name, with qemu-img's wording on failure.
pub fn parse_format(name: &str) -> CliResult<Format> {
    match name {
        "qcow2" => Ok(Format::Qcow2),
        "raw" => Ok(Format::Raw),
        _ => Err(CliError::new(format!("Unknown file format '{name}'"))),
    }
}

/// `Could not open 'X': ...` for a failure while opening an image.
pub fn open_error(path: &str, e: &qcow2rs::Error) -> CliError {
    match e {
        // The file itself could not be opened: qemu-img's wording.
        qcow2rs::Error::Io {
            source,
            file,
            context,
        } if file == path && context == "Could not open" => CliError::new(format!(
            "Could not open '{path}': Could not open '{path}': {}",
            io_text(source)
        )),
        _ => {
            // Core messages start with the file name: do not say it twice.
            let text = core_text(e);
            let prefix = format!("{path}: ");
            let why = text.strip_prefix(&prefix).unwrap_or(&text);
            CliError::new(format!("Could not open '{path}': {why}"))
        }
    }
}

/// `Could not open 'X': Could not open 'X': <strerror>` for an OS error on the file itself.
pub fn open_io_error(path: &str, e: &io::Error) -> CliError {
    CliError::new(format!(
        "Could not open '{path}': Could not open '{path}': {}",
        io_text(e)
    ))
}

/// Find the format of `path`: the one given, checked against the file, or probed.
pub fn resolve_format(path: &str, fmt: Option<Format>) -> CliResult<Format> {
    let probed = qcow2rs::probe_format(path).map_err(|e| open_error(path, &e))?;
    match fmt {
        None => Ok(probed),
        Some(Format::Qcow2) if probed != Format::Qcow2 => Err(CliError::new(format!(
            "Could not open '{path}': Image is not in qcow2 format"
        ))),
        Some(f) => Ok(f),
    }
}

impl Disk {
    /// Open `path` as `fmt` (probed when `None`).
    pub fn open(path: &str, fmt: Option<Format>, opts: &OpenOptions) -> CliResult<Disk> {
        match resolve_format(path, fmt)? {
            Format::Qcow2 => Image::open(path, opts)
                .map(|img| Disk::Qcow2(Box::new(img)))
                .map_err(|e| open_error(path, &e)),
            Format::Raw => RawFile::open(path, opts.read_only).map(Disk::Raw),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(img) => img.virtual_size(),
            Disk::Raw(r) => r.size,
        }
    }

    /// Read `buf.len()` bytes at `offset` (within the virtual size).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        match self {
            Disk::Qcow2(img) => img.read_at(buf, offset).map_err(|e| core_text(&e)),
            Disk::Raw(r) => r.read_at(buf, offset).map_err(|e| io_text(&e)),
        }
    }

    /// How `[offset, offset+len)` is stored, as extents covering the whole range in order.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>, String> {
        match self {
            Disk::Qcow2(img) => img.map(offset, len).map_err(|e| core_text(&e)),
            Disk::Raw(r) => Ok(r.map(offset, len)),
        }
    }
}

impl RawFile {
    /// Open a raw file.
    pub fn open(path: &str, read_only: bool) -> CliResult<RawFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| open_io_error(path, &e))?;
        let len = file.metadata().map_err(|e| open_io_error(path, &e))?.len();
        Ok(RawFile {
            file,
            len,
            size: round_up(len, 512),
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            if pos >= self.len {
                buf[done..].fill(0);
                break;
            }
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Data and hole extents of `[offset, offset+len)` (holes and the part past the end of the
    /// file read as zeros).
    pub fn map(&self, offset: u64, len: u64) -> Vec<MapEntry> {
        let end = offset.saturating_add(len);
        let mut out: Vec<MapEntry> = Vec::new();
        let mut push = |start: u64, stop: u64, data: bool| {
            if stop <= start {
                return;
            }
            if let Some(last) = out.last_mut() {
                if last.data == data && last.start + last.length == start {
                    last.length += stop - start;
                    return;
                }
            }
            out.push(MapEntry {
                start,
                length: stop - start,
                depth: 0,
                present: true,
                zero: !data,
                data,
                compressed: false,
                offset: Some(start),
            });
        };
        let mut pos = offset;
        while pos < end {
            if pos >= self.len {
                push(pos, end, false);
                break;
            }
            let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => self.len,
                Err(_) => {
                    // No SEEK_DATA here: everything is data.
                    push(pos, end, true);
                    break;
                }
            };
            if data > pos {
                let stop = data.min(end);
                push(pos, stop, false);
                pos = stop;
                continue;
            }
            let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(pos)) {
                Ok(h) if h > pos => h,
                _ => self.len,
            };
            let stop = hole.min(end);
            push(pos, stop, true);
            pos = stop;
        }
        out
    }
}

/// Walks the extents of a disk in increasing offsets, asking the disk for its map a window at a
/// time (so a fragmented multi-terabyte image does not need all its extents in memory).
pub struct ExtentCursor<'a> {
    disk: &'a Disk,
    end: u64,
    entries: Vec<MapEntry>,
    idx: usize,
    win_end: u64,
    /// How much of the guest address space one map query covers.
    window: u64,
}

/// How much of the guest address space one map query covers.
const MAP_WINDOW: u64 = 1 << 30;

impl<'a> ExtentCursor<'a> {
    /// A cursor over `[0, end)`.
    pub fn new(disk: &'a Disk, end: u64) -> ExtentCursor<'a> {
        ExtentCursor {
            disk,
            end,
            entries: Vec::new(),
            idx: 0,
            win_end: 0,
            window: MAP_WINDOW,
        }
    }

    /// Query the map `window` bytes at a time (smaller windows keep a damaged range from
    /// failing the queries for much of the disk around it).
    pub fn with_window(mut self, window: u64) -> ExtentCursor<'a> {
        self.window = window.max(1);
        self
    }

    /// The extent containing `offset` (< end), clipped to start at `offset` and to end within
    /// the current window. Offsets must not decrease between calls.
    pub fn at(&mut self, offset: u64) -> Result<MapEntry, String> {
        if offset >= self.win_end || self.idx >= self.entries.len() {
            self.fetch(offset)?;
        }
        while self.idx < self.entries.len() {
            let e = &self.entries[self.idx];
            if e.start + e.length > offset {
                break;
            }
            self.idx += 1;
        }
        if self.idx >= self.entries.len() {
            self.fetch(offset)?;
        }
        let e = &self.entries[self.idx];
        if e.start > offset {
            return Err(format!("no mapping for offset {offset}"));
        }
        let stop = (e.start + e.length).min(self.win_end).min(self.end);
        let mut out = e.clone();
        let skip = offset - e.start;
        out.start = offset;
        out.length = stop - offset;
        out.offset = e.offset.map(|o| o + skip);
        Ok(out)
    }

    fn fetch(&mut self, offset: u64) -> Result<(), String> {
        let len = (self.end - offset).min(self.window);
        self.entries = self.disk.map(offset, len)?;
        self.idx = 0;
        self.win_end = offset + len;
        if self.entries.is_empty() || self.entries[0].length == 0 {
            return Err(format!("no mapping for offset {offset}"));
        }
        Ok(())
    }
}
