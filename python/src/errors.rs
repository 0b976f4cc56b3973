//! The one place where a core error becomes a Python exception.
//!
//! The exception classes live in `qcow2rs/_errors.py` (plain Python, so that they can also derive
//! from `FileNotFoundError`, `PermissionError`, `ValueError` and `LookupError`). Each one is an
//! `OSError` built as `cls(errno, message, filename)`: `errno` is [`qcow2rs::Error::errno`], the
//! message is the core's message, and `filename` is the file the core names (None when it names
//! none).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

const ENOENT: i32 = 2;
const EPERM: i32 = 1;
const EACCES: i32 = 13;

/// Why a call on an image failed: the core said no, or the image was already closed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// An error from the core library, in a call on the image file named.
    InImage(qcow2rs::Error, String),
    /// The image was closed before the call.
    Closed,
}

impl Failure {
    /// The exception to raise for this failure.
    pub(crate) fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::InImage(e, file) => to_pyerr_in(py, e, Some(&file)),
            // What io.FileIO raises for any operation on a closed file.
            Failure::Closed => PyValueError::new_err("I/O operation on closed image"),
        }
    }
}

/// Convert a core error to the matching `qcow2rs` exception.
pub(crate) fn to_pyerr(py: Python<'_>, err: qcow2rs::Error) -> PyErr {
    to_pyerr_in(py, err, None)
}

/// [`to_pyerr`] for an error in a call on the open image `image`: an error that names no file
/// (an invalid argument) gets the image as its `filename`.
pub(crate) fn to_pyerr_in(py: Python<'_>, err: qcow2rs::Error, image: Option<&str>) -> PyErr {
    use qcow2rs::Error as E;
    let errno = err.errno();
    let message = match &err {
        // The core's Display says "invalid argument: " first; the class (a ValueError, errno
        // EINVAL) says that already, and the message then reads like every other one: the
        // file first, when there is one, then what is wrong ("invalid mode: 'z'", as the
        // built-in open words it).
        E::InvalidArgument(m) => m.clone(),
        // Rust's io::Error ends in " (os error N)"; strerror's words are what Python shows
        // (the number is `errno`).
        _ => {
            let text = err.to_string();
            match text.rfind(" (os error ") {
                Some(i) if text.ends_with(')') => text[..i].to_string(),
                _ => text,
            }
        }
    };
    let (class, filename): (&'static Class, Option<&str>) = match &err {
        E::Io { file, .. } => (
            match errno {
                ENOENT => &NOT_FOUND,
                EPERM | EACCES => &PERMISSION_DENIED,
                _ => &ERROR,
            },
            Some(file),
        ),
        // A backing file that could not be opened: the exception names the backing file.
        E::Backing { backing, .. } => (
            match errno {
                ENOENT => &NOT_FOUND,
                EPERM | EACCES => &PERMISSION_DENIED,
                _ => &ERROR,
            },
            Some(backing),
        ),
        E::Corrupt { file, .. } => (&CORRUPT, Some(file)),
        E::Unsupported { file, .. } => (&UNSUPPORTED, Some(file)),
        E::InvalidArgument(_) => (&INVALID_ARGUMENT, None),
        E::BadKey { file } | E::NeedKey { file } => (&BAD_KEY, Some(file)),
        E::ReadOnly { file, .. } => (&READ_ONLY, Some(file)),
        E::Locked { file, .. } => (&LOCKED, Some(file)),
        E::NoSpace { file, .. } => (&NO_SPACE, Some(file)),
        E::NotFound { file, .. } => (&SNAPSHOT_NOT_FOUND, Some(file)),
        // A variant added to the core later: still a qcow2rs.Error with the right errno.
        _ => (&ERROR, None),
    };
    let filename = filename.or(image);
    match class
        .get(py)
        .and_then(|cls| cls.call1((errno, message, filename)))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// An exception class of `qcow2rs._errors`, imported on first use.
struct Class {
    name: &'static str,
    ty: PyOnceLock<Py<PyType>>,
}

impl Class {
    const fn new(name: &'static str) -> Class {
        Class {
            name,
            ty: PyOnceLock::new(),
        }
    }
    fn get<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyType>> {
        self.ty.import(py, "qcow2rs._errors", self.name)
    }
}

static ERROR: Class = Class::new("Error");
static NOT_FOUND: Class = Class::new("NotFoundError");
static PERMISSION_DENIED: Class = Class::new("PermissionDeniedError");
static CORRUPT: Class = Class::new("CorruptImageError");
static UNSUPPORTED: Class = Class::new("UnsupportedError");
static INVALID_ARGUMENT: Class = Class::new("InvalidArgumentError");
static BAD_KEY: Class = Class::new("BadKeyError");
static READ_ONLY: Class = Class::new("ReadOnlyError");
static LOCKED: Class = Class::new("ImageLockedError");
static NO_SPACE: Class = Class::new("NoSpaceError");
static SNAPSHOT_NOT_FOUND: Class = Class::new("SnapshotNotFoundError");
