//! Backing files: qcow2 or raw, resolved relative to the overlay, with a depth limit and a
//! cycle check.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::Password;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::lock::LockMode;
use crate::map::MapEntry;
use crate::options::OpenOptions;
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

/// Open the backing file of `overlay`, read-only and locked as QEMU locks backing files (a qcow2
/// one as a read-only image, or as a force-share one with `force_share`; a raw one with the read
/// byte only). `chain` holds the canonical paths already open above.
pub(crate) fn open(
    overlay: &str,
    backing: &str,
    format: Option<&str>,
    password: Option<&Password>,
    force_share: bool,
    chain: &mut Vec<PathBuf>,
) -> Result<Backing> {
    let top = chain.len() <= 1;
    open_inner(overlay, backing, format, password, force_share, chain).map_err(|e| {
        // Errors deep in a chain are reported once, against the image the user opened.
        if top {
            e.in_backing_of(overlay, backing)
        } else {
            e
        }
    })
}

fn open_inner(
    overlay: &str,
    backing: &str,
    format: Option<&str>,
    password: Option<&Password>,
    force_share: bool,
    chain: &mut Vec<PathBuf>,
) -> Result<Backing> {
    let path = resolve(overlay, backing);
    if path.is_dir() {
        return Err(Error::invalid(format!(
            "{overlay}: backing file '{}' is a directory",
            path.display()
        )));
    }
    let shown = path.display().to_string();
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::corrupt(
            overlay,
            format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
            0,
        ));
    }
    let canon = std::fs::canonicalize(&path)
        .map_err(|e| Error::io(overlay, format!("Could not open backing file '{shown}'"), e))?;
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
        None => crate::probe_format(&path)?,
    };
    match fmt {
        Format::Qcow2 => {
            chain.push(canon);
            let opts = OpenOptions {
                password: password.cloned(),
                backing_password: password.cloned(),
                force_share,
                ..OpenOptions::read_only()
            };
            let img = Image::open_chain(&path, &opts, chain)?;
            chain.pop();
            Ok(Backing::Qcow2(Box::new(img)))
        }
        Format::Raw => {
            let st = FileStorage::open(&path, false, false)
                .map_err(|e| Error::io(&shown, "open backing file", e))?;
            // QEMU's raw format node passes the backing edge's permissions down, and those share
            // everything: a raw backing file carries only the "consistent read" byte (measured
            // with qemu-io 10.0, read-only and read-write overlays alike).
            st.lock(&shown, LockMode::ForceShare)?;
            let size = st.len().map_err(|e| Error::io(&shown, "stat", e))?;
            Ok(Backing::Raw {
                storage: Arc::new(st),
                size,
            })
        }
    }
}
