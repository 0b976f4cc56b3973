//! Backing files: qcow2 or raw, resolved relative to the overlay, with a depth limit and a
//! cycle check.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::Password;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::lock::LockMode;
use crate::map::MapEntry;
use crate::options::{BackingPolicy, OpenOptions};
use crate::storage::{FileStorage, Storage};
use crate::Format;

/// Longest backing chain we follow.
pub(crate) const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Debug)]
pub(crate) enum Backing {
    Qcow2(Box<Image>),
    Raw {
        storage: Arc<dyn Storage>,
        size: u64,
    },
}

impl Backing {
    pub fn virtual_size(&self) -> u64 {
        match self {
            Backing::Qcow2(i) => i.virtual_size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Read guest bytes; anything past the backing file's size reads as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64, name: &str) -> Result<()> {
        let size = self.virtual_size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Backing::Qcow2(i) => i.read_at(&mut buf[..avail], offset),
            Backing::Raw { storage, .. } => storage
                .read_at(&mut buf[..avail], offset)
                .map_err(|e| Error::io(name, "read backing file", e)),
        }
    }

    /// Map a range of the backing file (depth relative to the backing file).
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let size = self.virtual_size();
        let mut out = Vec::new();
        let avail = size.saturating_sub(offset).min(len);
        if avail > 0 {
            match self {
                Backing::Qcow2(i) => out = i.map(offset, avail)?,
                Backing::Raw { .. } => out.push(MapEntry {
                    start: offset,
                    length: avail,
                    depth: 0,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: false,
                    offset: Some(offset),
                }),
            }
        }
        if avail < len {
            out.push(MapEntry {
                start: offset + avail,
                length: len - avail,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        Ok(out)
    }
}

/// Resolve a backing name against the overlay's location.
pub(crate) fn resolve(overlay: &str, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match Path::new(overlay).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// Open the backing file of `overlay`, as `policy` allows (never called with
/// [`BackingPolicy::None`]), read-only and locked as QEMU locks backing files (a qcow2 one as a
/// read-only image, or as a force-share one with `force_share`; a raw one with the read byte
/// only). `chain` holds the canonical paths already open above. `without_key` opens encrypted
/// qcow2 backing files without their key when `password` is None, for inspection (as
/// [`OpenOptions::without_key`] does for the image itself).
#[allow(clippy::too_many_arguments)]
pub(crate) fn open(
    overlay: &str,
    backing: &str,
    format: Option<&str>,
    password: Option<&Password>,
    without_key: bool,
    policy: &BackingPolicy,
    force_share: bool,
    chain: &mut Vec<PathBuf>,
) -> Result<Backing> {
    let top = chain.len() <= 1;
    open_inner(
        overlay,
        backing,
        format,
        password,
        without_key,
        policy,
        force_share,
        chain,
    )
    .map_err(|e| {
        // Errors deep in a chain are reported once, against the image the user opened.
        if top {
            e.in_backing_of(overlay, &resolve(overlay, backing).display().to_string())
        } else {
            e
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn open_inner(
    overlay: &str,
    backing: &str,
    format: Option<&str>,
    password: Option<&Password>,
    without_key: bool,
    policy: &BackingPolicy,
    force_share: bool,
    chain: &mut Vec<PathBuf>,
) -> Result<Backing> {
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::corrupt(
            overlay,
            format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
            0,
        ));
    }
    let path = resolve(overlay, backing);
    let shown = path.display().to_string();
    // Named as qemu names it: the name resolved against the overlay's directory.
    let refused = |source: io::Error| Error::Backing {
        file: overlay.to_string(),
        backing: shown.clone(),
        source,
    };
    let (file, canon) = open_file(&path, policy).map_err(refused)?;
    if chain.contains(&canon) {
        return Err(Error::corrupt(
            overlay,
            format!("backing chain loop: '{shown}' is already in the chain"),
            0,
        ));
    }
    let fmt = match format {
        Some(f) => Format::parse(f)
            .map_err(|_| Error::unsupported(overlay, format!("backing file format '{f}'")))?,
        None => {
            let mut magic = [0u8; 4];
            let n = read_full(&file, &mut magic).map_err(|e| Error::io(&shown, "read", e))?;
            if n == 4 && magic == crate::format::header::MAGIC_BYTES {
                Format::Qcow2
            } else {
                Format::Raw
            }
        }
    };
    let storage = FileStorage::from_file(file);
    match fmt {
        Format::Qcow2 => {
            chain.push(canon);
            let opts = OpenOptions {
                password: password.cloned(),
                backing_password: password.cloned(),
                backing: policy.clone(),
                force_share,
                without_key,
                ..OpenOptions::read_only()
            };
            let img = Image::open_storage_chain(Arc::new(storage), &shown, &opts, chain)?;
            chain.pop();
            Ok(Backing::Qcow2(Box::new(img)))
        }
        Format::Raw => {
            // QEMU's raw format node passes the backing edge's permissions down, and those share
            // everything: a raw backing file carries only the "consistent read" byte (measured
            // with qemu-io 10.0, read-only and read-write overlays alike).
            storage.lock(&shown, LockMode::ForceShare)?;
            let size = storage.len().map_err(|e| Error::io(&shown, "stat", e))?;
            Ok(Backing::Raw {
                storage: Arc::new(storage),
                size,
            })
        }
    }
}

fn read_full(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Open a backing file read-only and check it against `policy`. The checks are made on the file
/// actually opened (its type from `fstat`, its real path from `/proc/self/fd`), so that swapping
/// a path component for a symbolic link between the check and the open changes nothing. The open
/// itself never blocks: a FIFO is opened with `O_NONBLOCK`, then refused.
fn open_file(path: &Path, policy: &BackingPolicy) -> io::Result<(File, PathBuf)> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    let ft = file.metadata()?.file_type();
    let refuse = |kind: io::ErrorKind, why: String| Err(io::Error::new(kind, why));
    if ft.is_dir() {
        return refuse(io::ErrorKind::InvalidInput, "Is a directory".into());
    }
    if ft.is_fifo() || ft.is_socket() {
        let what = if ft.is_fifo() { "a FIFO" } else { "a socket" };
        return refuse(
            io::ErrorKind::InvalidInput,
            format!("it is {what}, which cannot be a backing file"),
        );
    }
    let canon = real_path(&file, path)?;
    if let BackingPolicy::Allow(dirs) = policy {
        let allowed = |p: &Path| {
            dirs.iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .any(|d| p.starts_with(&d))
        };
        let list = || {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let special = ["/proc", "/sys", "/dev"]
            .iter()
            .any(|d| canon.starts_with(d));
        if !ft.is_file() || special {
            return refuse(
                io::ErrorKind::PermissionDenied,
                format!(
                    "'{}' is not a regular file, and the backing policy allows only regular files under {}",
                    canon.display(),
                    list()
                ),
            );
        }
        if !allowed(&canon) {
            return refuse(
                io::ErrorKind::PermissionDenied,
                format!(
                    "'{}' is outside the directories the backing policy allows ({})",
                    canon.display(),
                    if dirs.is_empty() {
                        "none".to_string()
                    } else {
                        list()
                    }
                ),
            );
        }
    }
    // Reads of a regular file or a device are unaffected by O_NONBLOCK, but clear it anyway:
    // the file is used as any other from here on.
    let fl = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK)?;
    Ok((file, canon))
}

/// The real path of an open file: what `/proc/self/fd` says (the file actually opened), or, where
/// there is no `/proc`, the canonical form of the path it was opened by.
fn real_path(file: &File, path: &Path) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(p) if p.is_absolute() => Ok(p),
        _ => std::fs::canonicalize(path),
    }
}
