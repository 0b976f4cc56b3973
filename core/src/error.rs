//! The one error type of the library.
//!
//! Every message names the file and what is wrong in it. No message ever contains a password or a key.

use std::fmt;
use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when using an image.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the host file (or the storage below it).
    Io {
        /// The file the operation was on.
        file: String,
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The image is malformed: a structure is out of range, misaligned, or inconsistent.
    Corrupt {
        /// The file that is corrupt.
        file: String,
        /// What is wrong.
        what: String,
        /// The host offset of the offending structure (0 when not applicable).
        offset: u64,
    },
    /// The image uses a feature this library does not implement.
    Unsupported {
        /// The file.
        file: String,
        /// The feature.
        feature: String,
    },
    /// A caller passed a bad argument (offset past the end, bad option value, ...).
    InvalidArgument(String),
    /// The key or password is wrong.
    BadKey {
        /// The file.
        file: String,
    },
    /// The image is encrypted and no password was given.
    NeedKey {
        /// The file.
        file: String,
    },
    /// A write was attempted on an image opened read-only (or forced read-only).
    ReadOnly {
        /// The file.
        file: String,
        /// Why the image is read-only.
        reason: String,
    },
    /// The image is locked by another user.
    Locked {
        /// The file.
        file: String,
        /// What could not be had, in QEMU's words (`Failed to get "write" lock`).
        what: String,
    },
    /// What the caller named does not exist in the image (a snapshot).
    NotFound {
        /// The file.
        file: String,
        /// What was not found (`snapshot 'name'`).
        what: String,
    },
    /// The backing file named by an image could not be opened, or the open options'
    /// [`crate::BackingPolicy`] refused it. `source` says why: `NotFound` for a missing file,
    /// `PermissionDenied` for a file the policy refuses (or the OS does), `InvalidInput` for a
    /// file that cannot be a backing file (a directory, a FIFO, a socket).
    Backing {
        /// The image whose header names the backing file.
        file: String,
        /// The backing file's name, as the image names it, resolved against the image's
        /// directory (as qemu shows it).
        backing: String,
        /// Why it could not be opened.
        source: io::Error,
    },
    /// The host file system is full.
    NoSpace {
        /// The file.
        file: String,
        /// What was being done.
        context: String,
    },
}

impl Error {
    pub(crate) fn io(file: &str, context: impl Into<String>, source: io::Error) -> Error {
        if source.raw_os_error() == Some(28) || source.kind() == io::ErrorKind::StorageFull {
            return Error::NoSpace {
                file: file.to_string(),
                context: context.into(),
            };
        }
        Error::Io {
            file: file.to_string(),
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(file: &str, what: impl Into<String>, offset: u64) -> Error {
        Error::Corrupt {
            file: file.to_string(),
            what: what.into(),
            offset,
        }
    }

    pub(crate) fn unsupported(file: &str, feature: impl Into<String>) -> Error {
        Error::Unsupported {
            file: file.to_string(),
            feature: feature.into(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidArgument(msg.into())
    }

    /// The same error, reported against the overlay whose backing file failed to open: the
    /// message names the image the user opened, then the backing file (`backing`, resolved as
    /// it was opened) and what is wrong, each once. A file deeper in the chain is named too.
    pub(crate) fn in_backing_of(self, overlay: &str, backing: &str) -> Error {
        let prefix = |file: &str| {
            if file == backing {
                format!("Could not open backing file '{backing}'")
            } else {
                format!("Could not open backing file '{backing}': {file}")
            }
        };
        match self {
            Error::Io {
                file,
                context,
                source,
            } => Error::Io {
                file: overlay.to_string(),
                context: format!("{}: {context}", prefix(&file)),
                source,
            },
            Error::NoSpace { file, context } => Error::NoSpace {
                file: overlay.to_string(),
                context: format!("{}: {context}", prefix(&file)),
            },
            Error::Corrupt { file, what, offset } => Error::Corrupt {
                file: overlay.to_string(),
                what: format!("{}: {what}", prefix(&file)),
                offset,
            },
            Error::Unsupported { file, feature } => Error::Unsupported {
                file: overlay.to_string(),
                feature: format!("{}: {feature}", prefix(&file)),
            },
            other => other,
        }
    }

    /// The OS errno that best describes this error (EIO, EINVAL, ENOSPC, ...).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(5),
            Error::Corrupt { .. } => 5,
            Error::Unsupported { .. } => 95,
            Error::InvalidArgument(_) => 22,
            Error::BadKey { .. } | Error::NeedKey { .. } => 1,
            Error::ReadOnly { .. } => 30,
            Error::Locked { .. } => 11,
            Error::NoSpace { .. } => 28,
            Error::NotFound { .. } => 2,
            Error::Backing { source, .. } => source.raw_os_error().unwrap_or(match source.kind() {
                io::ErrorKind::NotFound => 2,
                io::ErrorKind::PermissionDenied => 13,
                io::ErrorKind::InvalidInput => 22,
                _ => 5,
            }),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io {
                file,
                context,
                source,
            } => write!(f, "{file}: {context}: {source}"),
            Error::Corrupt { file, what, offset } => {
                write!(f, "{file}: image is corrupt: {what} (offset {offset:#x})")
            }
            Error::Unsupported { file, feature } => write!(f, "{file}: unsupported: {feature}"),
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::BadKey { file } => {
                write!(f, "{file}: Invalid password, cannot unlock any keyslot")
            }
            Error::NeedKey { file } => write!(
                f,
                "{file}: the image is encrypted: a password is needed (Parameter 'encrypt.key-secret' is required for cipher)"
            ),
            Error::ReadOnly { file, reason } => write!(f, "{file}: image is read-only: {reason}"),
            Error::Locked { file, what } => write!(
                f,
                "{file}: {what}. Is another process using the image [{file}]?"
            ),
            Error::NoSpace { file, context } => {
                write!(f, "{file}: {context}: No space left on device")
            }
            Error::NotFound { file, what } => write!(f, "{file}: {what} not found"),
            Error::Backing {
                file,
                backing,
                source,
            } => write!(
                f,
                "{file}: Could not open backing file '{backing}': {}",
                io_text(source)
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::Backing { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// An OS error's text without Rust's " (os error N)" suffix, as strerror says it.
fn io_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
