//! The boundary: panic catching, and every NULL check and pointer conversion of the crate.
//!
//! Nothing outside this module dereferences a raw pointer. The helpers trust the contract that the
//! header states for each function (a non-NULL pointer points to valid memory of the stated size for
//! the duration of the call; handles come from `qcow2_open` and are not yet closed); what they can
//! check (NULL, alignment, lengths, UTF-8) they check and report as `QCOW2_ERR_INVALID_ARGUMENT`.

use std::any::Any;
use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;

use qcow2rs::Image;

use crate::error::{self, qcow2_error, FfiError};
use crate::image::qcow2_image;

/// Run the body of exported function `func`: catch any panic, record the outcome in the thread's
/// last error, and return its code.
pub(crate) fn boundary(
    func: &'static str,
    body: impl FnOnce() -> Result<(), FfiError>,
) -> qcow2_error {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let result = match catch_unwind(AssertUnwindSafe(body)) {
            Ok(r) => r,
            Err(payload) => Err(FfiError::Panic(panic_message(payload.as_ref()))),
        };
        error::record(func, result)
    }));
    outcome.unwrap_or(qcow2_error::QCOW2_ERR_PANIC)
}

/// The boundary for the few functions that cannot fail and return a plain value: a panic yields
/// `fallback`.
pub(crate) fn boundary_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

fn null(what: &str) -> FfiError {
    FfiError::Arg(format!("{what} is NULL"))
}

fn check_aligned<T>(p: *const T, what: &str) -> Result<(), FfiError> {
    if p.is_aligned() {
        Ok(())
    } else {
        Err(FfiError::Arg(format!("{what} is misaligned")))
    }
}

fn check_len<T>(len: usize, what: &str) -> Result<(), FfiError> {
    match len.checked_mul(std::mem::size_of::<T>()) {
        Some(n) if n <= isize::MAX as usize => Ok(()),
        _ => Err(FfiError::Arg(format!("{what}: length {len} is too large"))),
    }
}

/// Box an image into a new handle for the caller, who owns it until `qcow2_close`.
pub(crate) fn new_handle(image: Image) -> *mut qcow2_image {
    Box::into_raw(Box::new(qcow2_image { image }))
}

/// Take back ownership of a handle (`None` for NULL).
pub(crate) fn take_handle(img: *mut qcow2_image) -> Result<Option<Box<qcow2_image>>, FfiError> {
    if img.is_null() {
        return Ok(None);
    }
    check_aligned(img, "img")?;
    // SAFETY: a non-NULL handle was created by `new_handle` (Box::into_raw) and, per the header,
    // is passed to qcow2_close exactly once and not used afterwards (or concurrently).
    Ok(Some(unsafe { Box::from_raw(img) }))
}

/// Borrow the image behind a handle.
pub(crate) fn image<'a>(img: *const qcow2_image) -> Result<&'a Image, FfiError> {
    let handle = input(img, "img")?;
    Ok(&handle.image)
}

/// Borrow a caller-owned input struct; NULL is an error.
pub(crate) fn input<'a, T>(p: *const T, what: &str) -> Result<&'a T, FfiError> {
    optional_input(p, what)?.ok_or_else(|| null(what))
}

/// Borrow a caller-owned input struct; NULL gives `None`.
pub(crate) fn optional_input<'a, T>(p: *const T, what: &str) -> Result<Option<&'a T>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    check_aligned(p, what)?;
    // SAFETY: non-NULL and aligned; the caller guarantees it points to a valid, initialised `T`
    // that is not mutated during the call. The reference does not outlive the call.
    Ok(Some(unsafe { &*p }))
}

/// A caller's input buffer. NULL is allowed only with `len == 0`.
pub(crate) fn bytes<'a>(buf: *const u8, len: usize, what: &str) -> Result<&'a [u8], FfiError> {
    if len == 0 {
        return Ok(&[]);
    }
    if buf.is_null() {
        return Err(null(what));
    }
    check_len::<u8>(len, what)?;
    // SAFETY: non-NULL, `len` fits in isize, and the caller guarantees `len` readable bytes that are
    // not mutated during the call.
    Ok(unsafe { std::slice::from_raw_parts(buf, len) })
}

/// A caller's input array of `len` elements. NULL is allowed only with `len == 0`.
pub(crate) fn input_array<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], FfiError> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    check_aligned(p, what)?;
    check_len::<T>(len, what)?;
    // SAFETY: non-NULL, aligned, size fits in isize, and the caller guarantees `len` initialised
    // elements that are not mutated during the call.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A caller's output buffer. NULL is allowed only with `len == 0`.
pub(crate) fn bytes_mut<'a>(
    buf: *mut u8,
    len: usize,
    what: &str,
) -> Result<&'a mut [u8], FfiError> {
    if len == 0 {
        return Ok(&mut []);
    }
    if buf.is_null() {
        return Err(null(what));
    }
    check_len::<u8>(len, what)?;
    // SAFETY: non-NULL, `len` fits in isize, and the caller guarantees `len` writable bytes that
    // nothing else accesses during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(buf, len) })
}

/// A caller's array of `T` to be filled (its old contents are never read).
pub(crate) fn out_array<'a, T>(
    p: *mut T,
    len: usize,
    what: &str,
) -> Result<&'a mut [MaybeUninit<T>], FfiError> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(null(what));
    }
    check_aligned(p, what)?;
    check_len::<T>(len, what)?;
    // SAFETY: non-NULL, aligned, size fits in isize, and the caller guarantees room for `len`
    // elements that nothing else accesses during the call. MaybeUninit makes no claim about the
    // current contents.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<MaybeUninit<T>>(), len) })
}

/// A NUL-terminated C string argument; NULL gives `None`.
fn c_str<'a>(s: *const c_char) -> Option<&'a CStr> {
    if s.is_null() {
        return None;
    }
    // SAFETY: non-NULL; the caller guarantees a NUL-terminated string that stays unchanged during
    // the call.
    Some(unsafe { CStr::from_ptr(s) })
}

/// A file name argument: any bytes but NUL (not necessarily UTF-8).
pub(crate) fn path<'a>(s: *const c_char, what: &str) -> Result<&'a Path, FfiError> {
    use std::os::unix::ffi::OsStrExt;
    let s = c_str(s).ok_or_else(|| null(what))?;
    Ok(Path::new(std::ffi::OsStr::from_bytes(s.to_bytes())))
}

/// An optional UTF-8 string argument; NULL gives `None`.
pub(crate) fn optional_str<'a>(s: *const c_char, what: &str) -> Result<Option<&'a str>, FfiError> {
    match c_str(s) {
        None => Ok(None),
        Some(s) => s
            .to_str()
            .map(Some)
            .map_err(|_| FfiError::Arg(format!("{what} is not valid UTF-8"))),
    }
}

/// A required NUL-terminated UTF-8 string argument.
pub(crate) fn str_arg<'a>(s: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    optional_str(s, what)?.ok_or_else(|| null(what))
}

/// An output parameter, checked before any work is done and written only on success.
pub(crate) struct Out<'a, T> {
    ptr: NonNull<T>,
    _borrow: PhantomData<&'a mut T>,
}

/// Check an output pointer: NULL or misaligned is an error.
pub(crate) fn out<'a, T>(p: *mut T, what: &str) -> Result<Out<'a, T>, FfiError> {
    let ptr = NonNull::new(p).ok_or_else(|| null(what))?;
    check_aligned(p, what)?;
    Ok(Out {
        ptr,
        _borrow: PhantomData,
    })
}

/// Check an optional output pointer: NULL gives `None`, misaligned is an error.
pub(crate) fn optional_out<'a, T>(p: *mut T, what: &str) -> Result<Option<Out<'a, T>>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    out(p, what).map(Some)
}

impl<T> Out<'_, T> {
    /// Store the result (without reading or dropping the old contents, which may be uninitialised).
    pub(crate) fn write(self, value: T) {
        // SAFETY: checked non-NULL and aligned in `out`; the caller guarantees it points to writable
        // memory for a `T`. `write` neither reads nor drops the old value.
        unsafe { self.ptr.as_ptr().write(value) }
    }
}

/// A caller's string buffer, for getters that copy a string out. `buf == NULL && len == 0` asks for
/// the length only.
pub(crate) struct StrOut {
    buf: *mut c_char,
    len: usize,
}

/// Check a string output buffer: NULL with a non-zero length is an error.
pub(crate) fn str_out(buf: *mut c_char, len: usize, what: &str) -> Result<StrOut, FfiError> {
    if buf.is_null() && len != 0 {
        return Err(null(what));
    }
    check_len::<u8>(len, what)?;
    Ok(StrOut { buf, len })
}

impl StrOut {
    /// The buffer's size in bytes, or `None` when it is NULL (a length query).
    pub(crate) fn capacity(&self) -> Option<usize> {
        (!self.buf.is_null()).then_some(self.len)
    }

    /// Whether `write(s)` would succeed; nothing is written. Lets a function with several outputs
    /// check them all before writing any.
    pub(crate) fn check(&self, s: &str) -> Result<(), FfiError> {
        if self.buf.is_null() {
            return Ok(());
        }
        if s.as_bytes().contains(&0) {
            return Err(FfiError::Arg("string contains a NUL byte".to_string()));
        }
        if s.len() >= self.len {
            return Err(FfiError::BufferTooSmall(format!(
                "need {} bytes (with the NUL terminator), got {}",
                s.len() + 1,
                self.len
            )));
        }
        Ok(())
    }

    /// Copy `s` and its NUL terminator, or fail with BUFFER_TOO_SMALL (writing nothing). Returns the
    /// length of `s` (without the NUL); with a NULL buffer only that length is returned.
    pub(crate) fn write(self, s: &str) -> Result<usize, FfiError> {
        self.check(s)?;
        if !self.buf.is_null() {
            copy_str_truncated(s, self.buf, self.len);
        }
        Ok(s.len())
    }
}

/// Copy as much of `s` as fits in `len - 1` bytes (backing off to a UTF-8 character boundary),
/// then a NUL. Does nothing when `buf` is NULL or `len` is 0.
pub(crate) fn copy_str_truncated(s: &str, buf: *mut c_char, len: usize) {
    if buf.is_null() || len == 0 {
        return;
    }
    let mut n = s.len().min(len - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `buf` is non-NULL and the caller guarantees `len` writable bytes; we write `n + 1 <=
    // len` bytes, from a source (`s`) that cannot overlap caller memory.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
        buf.add(n).write(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{qcow2_last_errno, qcow2_last_error, qcow2_last_error_message};

    fn last_message() -> String {
        let mut buf = [0 as c_char; 256];
        let n = qcow2_last_error_message(buf.as_mut_ptr(), buf.len());
        let s = c_str(buf.as_ptr()).unwrap().to_str().unwrap().to_string();
        assert_eq!(n, s.len());
        s
    }

    #[test]
    fn a_panic_becomes_an_error_code_with_a_message() {
        let code = boundary("qcow2_test", || panic!("boom {}", 42));
        assert_eq!(code, qcow2_error::QCOW2_ERR_PANIC);
        assert_eq!(qcow2_last_error(), qcow2_error::QCOW2_ERR_PANIC);
        assert_eq!(
            last_message(),
            "qcow2_test: internal error (panic): boom 42"
        );
        assert_eq!(boundary_value(7, || panic!("boom")), 7);
    }

    #[test]
    fn success_clears_the_last_error() {
        let code = boundary("qcow2_test", || Err(null("img")));
        assert_eq!(code, qcow2_error::QCOW2_ERR_INVALID_ARGUMENT);
        assert_eq!(qcow2_last_errno(), 22);
        assert_eq!(last_message(), "qcow2_test: img is NULL");
        assert_eq!(boundary("qcow2_test", || Ok(())), qcow2_error::QCOW2_OK);
        assert_eq!(qcow2_last_error(), qcow2_error::QCOW2_OK);
        assert_eq!(qcow2_last_errno(), 0);
        assert_eq!(qcow2_last_error_message(std::ptr::null_mut(), 0), 0);
    }

    #[test]
    fn core_errors_keep_their_message_and_errno() {
        let e = qcow2rs::Error::Locked {
            file: "a.qcow2".to_string(),
            what: "Failed to get \"write\" lock".to_string(),
        };
        let code = boundary("qcow2_test", || Err(e.into()));
        assert_eq!(code, qcow2_error::QCOW2_ERR_LOCKED);
        assert_eq!(qcow2_last_errno(), 11);
        assert!(last_message().starts_with("a.qcow2: "));
    }

    #[test]
    fn truncation_keeps_utf8_and_nul() {
        let mut buf = [1 as c_char; 4];
        copy_str_truncated("aé-z", buf.as_mut_ptr(), buf.len());
        // "aé" is 3 bytes and fits with the NUL; "a\u{e9}-" would need 5.
        assert_eq!(c_str(buf.as_ptr()).unwrap().to_bytes(), "aé".as_bytes());
        copy_str_truncated("éé", buf.as_mut_ptr(), 2);
        assert_eq!(c_str(buf.as_ptr()).unwrap().to_bytes(), b"");
    }

    #[test]
    fn string_getters_query_fit_or_refuse() {
        let mut len = 0usize;
        let n = str_out(std::ptr::null_mut(), 0, "buf")
            .unwrap()
            .write("abc")
            .unwrap();
        assert_eq!(n, 3);
        let mut buf = [9 as c_char; 3];
        let err = str_out(buf.as_mut_ptr(), 3, "buf")
            .unwrap()
            .write("abc")
            .unwrap_err();
        assert!(matches!(err, FfiError::BufferTooSmall(_)));
        assert_eq!(buf, [9; 3], "nothing written on failure");
        let mut buf = [9 as c_char; 4];
        len += str_out(buf.as_mut_ptr(), 4, "buf")
            .unwrap()
            .write("abc")
            .unwrap();
        assert_eq!(len, 3);
        assert_eq!(c_str(buf.as_ptr()).unwrap().to_bytes(), b"abc");
        assert!(str_out(std::ptr::null_mut(), 1, "buf").is_err());
    }

    #[test]
    fn null_and_empty_buffers() {
        assert!(bytes(std::ptr::null(), 0, "buf").unwrap().is_empty());
        assert!(bytes(std::ptr::null(), 1, "buf").is_err());
        assert!(bytes_mut(std::ptr::null_mut(), 1, "buf").is_err());
        assert!(image(std::ptr::null()).is_err());
        assert!(take_handle(std::ptr::null_mut()).unwrap().is_none());
        assert!(out::<u64>(std::ptr::null_mut(), "out").is_err());
        let misaligned = (&mut [0u64; 2] as *mut u64)
            .cast::<u8>()
            .wrapping_add(1)
            .cast::<u64>();
        assert!(out(misaligned, "out").is_err());
    }
}
