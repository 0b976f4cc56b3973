//! Error codes, the one mapping from `qcow2rs::Error`, and the thread-local last error.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr};

use crate::ffi::{self, boundary_value};

/// Result code of every fallible `qcow2_*` function. The numbers are stable: new codes are only ever
/// appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum qcow2_error {
    /// Success.
    QCOW2_OK = 0,
    /// An I/O error on the image file or a file in its backing chain (see `qcow2_last_errno()`).
    QCOW2_ERR_IO = 1,
    /// The image is malformed.
    QCOW2_ERR_CORRUPT = 2,
    /// The image uses a feature this library does not implement.
    QCOW2_ERR_UNSUPPORTED = 3,
    /// A bad argument: NULL pointer, range past the end of the disk, bad option value, ...
    QCOW2_ERR_INVALID_ARGUMENT = 4,
    /// The key or password is wrong.
    QCOW2_ERR_BAD_KEY = 5,
    /// A write to an image open read-only (or forced read-only, e.g. by the corrupt bit).
    QCOW2_ERR_READ_ONLY = 6,
    /// The image is locked by another user.
    QCOW2_ERR_LOCKED = 7,
    /// The host file system is full.
    QCOW2_ERR_NO_SPACE = 8,
    /// A bug: the library panicked. The panic was caught at the boundary; the handle involved
    /// should be closed.
    QCOW2_ERR_PANIC = 9,
    /// The caller's output buffer is too small; nothing was written.
    QCOW2_ERR_BUFFER_TOO_SMALL = 10,
    /// What the call names does not exist in the image (a snapshot).
    QCOW2_ERR_NOT_FOUND = 11,
}

use qcow2_error::*;

/// Everything that can fail in this crate: a core error or a fault of the C caller.
#[derive(Debug)]
pub(crate) enum FfiError {
    /// An error from the core library.
    Core(qcow2rs::Error),
    /// A bad argument detected by the C layer (NULL pointer, bad enum value, bad UTF-8, ...).
    Arg(String),
    /// An output buffer is too small.
    BufferTooSmall(String),
    /// What the call names does not exist (a snapshot index past the end of the table, ...).
    NotFound(String),
    /// A panic caught at the boundary.
    Panic(String),
}

impl From<qcow2rs::Error> for FfiError {
    fn from(e: qcow2rs::Error) -> FfiError {
        FfiError::Core(e)
    }
}

const ENOENT: i32 = 2;
const EINVAL: i32 = 22;
const EIO: i32 = 5;
const ERANGE: i32 = 34;

impl FfiError {
    /// The one place where errors become codes, errno values and messages.
    fn describe(&self, func: &str) -> (qcow2_error, i32, String) {
        use qcow2rs::Error as E;
        match self {
            FfiError::Core(e) => {
                let code = match e {
                    E::Io { .. } | E::Backing { .. } => QCOW2_ERR_IO,
                    E::Corrupt { .. } => QCOW2_ERR_CORRUPT,
                    E::Unsupported { .. } => QCOW2_ERR_UNSUPPORTED,
                    E::InvalidArgument(_) => QCOW2_ERR_INVALID_ARGUMENT,
                    E::BadKey { .. } | E::NeedKey { .. } => QCOW2_ERR_BAD_KEY,
                    E::ReadOnly { .. } => QCOW2_ERR_READ_ONLY,
                    E::Locked { .. } => QCOW2_ERR_LOCKED,
                    E::NoSpace { .. } => QCOW2_ERR_NO_SPACE,
                    E::NotFound { .. } => QCOW2_ERR_NOT_FOUND,
                    // The core enum is non-exhaustive; a kind added there without a code here is
                    // reported as an I/O error (with the core's errno and message).
                    _ => QCOW2_ERR_IO,
                };
                (code, e.errno(), e.to_string())
            }
            FfiError::Arg(m) => (QCOW2_ERR_INVALID_ARGUMENT, EINVAL, format!("{func}: {m}")),
            FfiError::BufferTooSmall(m) => {
                (QCOW2_ERR_BUFFER_TOO_SMALL, ERANGE, format!("{func}: {m}"))
            }
            FfiError::NotFound(m) => (QCOW2_ERR_NOT_FOUND, ENOENT, format!("{func}: {m}")),
            FfiError::Panic(m) => (
                QCOW2_ERR_PANIC,
                EIO,
                format!("{func}: internal error (panic): {m}"),
            ),
        }
    }
}

struct LastError {
    code: qcow2_error,
    errno: i32,
    message: String,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// Record the outcome of a call of `func` in this thread's last error and return its code.
pub(crate) fn record(func: &str, result: Result<(), FfiError>) -> qcow2_error {
    let (last, code) = match result {
        Ok(()) => (None, QCOW2_OK),
        Err(e) => {
            let (code, errno, message) = e.describe(func);
            (
                Some(LastError {
                    code,
                    errno,
                    message,
                }),
                code,
            )
        }
    };
    // `try_with` fails only while the thread is being torn down; the code is still returned.
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = last);
    code
}

fn with_last<T>(f: impl Fn(Option<&LastError>) -> T) -> T {
    LAST_ERROR
        .try_with(|l| f(l.borrow().as_ref()))
        .unwrap_or_else(|_| f(None))
}

/// Copy the message of this thread's last failed call into `buf` (at most `len` bytes, always
/// NUL-terminated when `len > 0`, truncated at a UTF-8 character boundary if needed).
///
/// Returns the full length of the message in bytes, excluding the NUL, like snprintf: a return
/// value `>= len` means the message was truncated. Pass `buf = NULL, len = 0` to ask for the length.
/// The message is empty (returns 0) when the last call on this thread succeeded.
///
/// Ownership: `buf` belongs to the caller. Thread safety: reads only the calling thread's state.
/// Messages name the file and what is wrong; they never contain a password or a key.
#[no_mangle]
pub extern "C" fn qcow2_last_error_message(buf: *mut c_char, len: usize) -> usize {
    boundary_value(0, || {
        with_last(|l| {
            let msg = l.map_or("", |l| l.message.as_str());
            ffi::copy_str_truncated(msg, buf, len);
            msg.len()
        })
    })
}

/// The code of this thread's last call that returns `qcow2_error` (`QCOW2_OK` if it succeeded or if
/// there was none). Thread safety: reads only the calling thread's state.
#[no_mangle]
pub extern "C" fn qcow2_last_error() -> qcow2_error {
    boundary_value(QCOW2_ERR_PANIC, || {
        with_last(|l| l.map_or(QCOW2_OK, |l| l.code))
    })
}

/// The OS errno that best describes this thread's last error (`ENOENT` for a missing file, `EIO`
/// for corruption, `EINVAL` for a bad argument, `ENOSPC`, `EROFS`, ...), or 0 if the last call
/// succeeded. Thread safety: reads only the calling thread's state.
#[no_mangle]
pub extern "C" fn qcow2_last_errno() -> c_int {
    boundary_value(EIO, || with_last(|l| l.map_or(0, |l| l.errno)))
}

/// A short static description of an error code ("invalid argument", ...), never NULL.
/// The string is static: do not free it. Unknown codes give "unknown error". (The parameter is an
/// `int` so that any value may be passed.) Thread safety: may be called from any thread.
#[no_mangle]
pub extern "C" fn qcow2_strerror(code: c_int) -> *const c_char {
    boundary_value(c"unknown error".as_ptr(), || strerror(code).as_ptr())
}

fn strerror(code: c_int) -> &'static CStr {
    match code {
        0 => c"success",
        1 => c"I/O error",
        2 => c"image is corrupt",
        3 => c"unsupported feature",
        4 => c"invalid argument",
        5 => c"invalid key or password",
        6 => c"image is read-only",
        7 => c"image is locked",
        8 => c"no space left on device",
        9 => c"internal error (panic)",
        10 => c"buffer too small",
        11 => c"not found",
        _ => c"unknown error",
    }
}
