//! qcow2rs: crash-consistent qcow2 disk images.
//!
//! Read and write qcow2 v2/v3 images (any cluster size from 512 B to 2 MiB, refcount widths 1 to 64
//! bits, extended L2 entries, zero and compressed clusters, backing chains), check and repair them.
//!
//! ```
//! use qcow2rs::{CreateOptions, Image, OpenOptions};
//! let dir = std::env::temp_dir().join(format!("qcow2rs-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("disk.qcow2");
//! Image::create(&path, &CreateOptions::new(64 << 20)).unwrap();
//! let img = Image::open(&path, &OpenOptions::new()).unwrap();
//! img.write_at(b"hello, qcow2", 1 << 20).unwrap();
//! img.flush().unwrap();
//! let mut buf = [0u8; 12];
//! img.read_at(&mut buf, 1 << 20).unwrap();
//! assert_eq!(&buf, b"hello, qcow2");
//! img.close().unwrap();
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```
// The only unsafe code is the two `fcntl` calls of the image locks (`lock.rs`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod alloc;
mod backing;
mod cache;
mod check;
mod compress;
mod crypto;
mod datapath;
mod error;
mod flush;
pub mod format;
#[cfg(feature = "testing")]
pub mod fuzzing;
mod host;
mod image;
mod keyslots;
mod lock;
mod map;
mod mapping;
#[cfg(feature = "testing")]
pub mod mutants;
/// Hooks for deterministic tests of concurrent paths (feature `testing` only).
#[cfg(feature = "testing")]
pub use datapath::testing;
#[cfg(not(feature = "testing"))]
mod mutants;
mod offset;
mod open;
mod options;
mod resize;
mod snapshot;
mod state;
pub mod storage;

pub use check::{CheckReport, RepairMode};
pub use crypto::{
    cipher_speed, CipherAlg, CipherMode, EncryptionFormat, EncryptionInfo, EncryptionOptions,
    HashAlg, IvGenAlg, LuksInfo, LuksSlotInfo, Password,
};
pub use error::{Error, Result};
pub use image::Image;
pub use keyslots::{KeySlotChange, KeySlotState};
pub use lock::LockMode;
pub use map::{ImageInfo, MapEntry};
pub use options::{
    BackingPolicy, CacheMode, Compat, CompressionType, CreateOptions, OpenOptions, Preallocation,
};
pub use snapshot::{SnapshotInfo, SnapshotOptions, SnapshotRef};
pub use storage::{FileStorage, MemStorage, Storage};

/// Image file formats this library can read: qcow2 and raw (for backing files and conversion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// Raw image.
    Raw,
}

impl Format {
    /// `qcow2` or `raw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
    /// Parse `qcow2` or `raw`.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            _ => Err(Error::InvalidArgument(format!(
                "Unknown or unsupported format '{s}' (use qcow2 or raw)"
            ))),
        }
    }
}

/// Guess a file's format from its first bytes: qcow2 magic, else raw.
///
/// The probe never blocks: a FIFO or a socket (which an image may name as its backing file) is
/// an error, not a read that waits for a writer.
pub fn probe_format(path: impl AsRef<std::path::Path>) -> Result<Format> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let path = path.as_ref();
    let name = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(|e| Error::io(&name, "Could not open", e))?;
    let ft = f
        .metadata()
        .map_err(|e| Error::io(&name, "Could not open", e))?
        .file_type();
    if ft.is_fifo() || ft.is_socket() {
        return Err(Error::invalid(format!(
            "'{name}' is a {}, not an image",
            if ft.is_fifo() { "FIFO" } else { "socket" }
        )));
    }
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f
            .read(&mut magic[got..])
            .map_err(|e| Error::io(&name, "read", e))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(if got == 4 && magic == format::header::MAGIC_BYTES {
        Format::Qcow2
    } else {
        Format::Raw
    })
}
