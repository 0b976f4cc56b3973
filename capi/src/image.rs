//! The image handle: create, open, close, and guest I/O.

use std::ffi::{c_char, c_void};

use qcow2rs::{CreateOptions, Image};

use crate::error::{qcow2_error, FfiError};
use crate::ffi::{self, boundary, boundary_value};
use crate::options::{qcow2_create_options, qcow2_open_options};

/// An open qcow2 image (opaque). Created by `qcow2_open`/`qcow2_open_ex`, freed by `qcow2_close`.
///
/// Thread safety: a handle may be used from several threads at once (reads, writes, flush, info,
/// ...), except `qcow2_close`, which must be the last call on the handle and must not run
/// concurrently with any other call on it.
pub struct qcow2_image {
    pub(crate) image: Image,
}

/// Major version of the library this header belongs to (compare with `qcow2_version_number()`
/// at run time). The header also defines `QCOW2RS_VERSION`, the string "MAJOR.MINOR.PATCH" made
/// from these three (see capi/cbindgen.toml).
pub const QCOW2RS_VERSION_MAJOR: u32 = 0;
/// Minor version of the library this header belongs to.
pub const QCOW2RS_VERSION_MINOR: u32 = 1;
/// Patch version of the library this header belongs to.
pub const QCOW2RS_VERSION_PATCH: u32 = 0;
/// The version as one number, `MAJOR << 16 | MINOR << 8 | PATCH`, for `#if` tests.
pub const QCOW2RS_VERSION_NUMBER: u32 =
    (QCOW2RS_VERSION_MAJOR << 16) | (QCOW2RS_VERSION_MINOR << 8) | QCOW2RS_VERSION_PATCH;

/// The version of the library loaded at run time as one number, `MAJOR << 16 | MINOR << 8 |
/// PATCH` (compare with the header's `QCOW2RS_VERSION_NUMBER`). Thread safety: any thread.
#[no_mangle]
pub extern "C" fn qcow2_version_number() -> u32 {
    boundary_value(0, || QCOW2RS_VERSION_NUMBER)
}

/// The library version, e.g. "0.1.0". Static string: do not free it. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn qcow2_version() -> *const c_char {
    boundary_value(std::ptr::null(), || {
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
    })
}

/// Create a new qcow2 image file at `path` (truncating an existing file) with a virtual size of
/// `size` bytes (rounded up to 512). `opts` may be NULL for the defaults of
/// `qcow2_create_options_init`. The image is not opened: use `qcow2_open` afterwards.
///
/// Ownership: `path` and `opts` (and the strings it points to) are borrowed for the call only.
/// Thread safety: any thread. On failure returns the error code (`QCOW2_ERR_INVALID_ARGUMENT` for a
/// NULL path or a bad option, `QCOW2_ERR_IO`, ...); a partially written file may be left behind.
#[no_mangle]
pub extern "C" fn qcow2_create(
    path: *const c_char,
    size: u64,
    opts: *const qcow2_create_options,
) -> qcow2_error {
    boundary("qcow2_create", || {
        let path = ffi::path(path, "path")?;
        // Bad options are reported with the name of the file they were meant for.
        let named = |e: FfiError| match e {
            FfiError::Arg(m) | FfiError::Core(qcow2rs::Error::InvalidArgument(m)) => {
                FfiError::Arg(format!("{}: {m}", path.display()))
            }
            e => e,
        };
        let opts = match ffi::optional_input(opts, "opts")? {
            Some(o) => (*o).to_core(size).map_err(named)?,
            None => CreateOptions::new(size),
        };
        Image::create(path, &opts).map_err(|e| named(e.into()))?;
        Ok(())
    })
}

/// Open the image at `path` with `flags` (`QCOW2_OPEN_*`, or-ed; 0 for read-write) and the other
/// defaults of `qcow2_open_options_init`. On success stores a new handle in `*out`.
///
/// Ownership: `path` is borrowed for the call; the caller owns the handle and must release it with
/// `qcow2_close`. Thread safety: any thread. On failure returns the error code and leaves `*out`
/// untouched: `QCOW2_ERR_IO` (errno `ENOENT` for a missing file), `QCOW2_ERR_CORRUPT`,
/// `QCOW2_ERR_UNSUPPORTED`, `QCOW2_ERR_LOCKED`, or `QCOW2_ERR_INVALID_ARGUMENT` (NULL `path` or
/// `out`, unknown flags).
#[no_mangle]
pub extern "C" fn qcow2_open(
    path: *const c_char,
    flags: u32,
    out: *mut *mut qcow2_image,
) -> qcow2_error {
    boundary("qcow2_open", || {
        let path = ffi::path(path, "path")?;
        let out = ffi::out(out, "out")?;
        let mut opts: qcow2_open_options = qcow2_open_options::defaults();
        opts.flags = flags;
        let image = Image::open(path, &opts.to_core()?)?;
        out.write(ffi::new_handle(image));
        Ok(())
    })
}

/// Like `qcow2_open`, with all open options: `opts` may be NULL for the defaults of
/// `qcow2_open_options_init`.
///
/// Ownership: `path` and `opts` are borrowed for the call; the caller owns the handle stored in
/// `*out` and must release it with `qcow2_close`. Thread safety: any thread. On failure returns the
/// error code and leaves `*out` untouched.
#[no_mangle]
pub extern "C" fn qcow2_open_ex(
    path: *const c_char,
    opts: *const qcow2_open_options,
    out: *mut *mut qcow2_image,
) -> qcow2_error {
    boundary("qcow2_open_ex", || {
        let path = ffi::path(path, "path")?;
        let opts = match ffi::optional_input(opts, "opts")? {
            Some(o) => (*o).to_core()?,
            None => qcow2_open_options::defaults().to_core()?,
        };
        let out = ffi::out(out, "out")?;
        let image = Image::open(path, &opts)?;
        out.write(ffi::new_handle(image));
        Ok(())
    })
}

/// Flush and close the image, and free the handle. `img` may be NULL (then nothing happens and
/// `QCOW2_OK` is returned).
///
/// Ownership: takes the handle; it is freed even when closing fails, so never use it again.
/// Thread safety: must not run concurrently with any other call on the same handle.
/// On failure (e.g. the final flush hit `QCOW2_ERR_IO` or `QCOW2_ERR_NO_SPACE`) returns the code;
/// data written since the last successful `qcow2_flush` may then not be durable.
#[no_mangle]
pub extern "C" fn qcow2_close(img: *mut qcow2_image) -> qcow2_error {
    boundary("qcow2_close", || {
        if let Some(handle) = ffi::take_handle(img)? {
            handle.image.close()?;
        }
        Ok(())
    })
}

/// Read `len` bytes at guest offset `offset` into `buf`. The range must lie within the virtual
/// size. Unallocated ranges read from the backing chain, or as zeros.
///
/// Ownership: `buf` belongs to the caller and must have room for `len` bytes (it may be NULL when
/// `len` is 0). Thread safety: may run concurrently with any call on the same handle but
/// `qcow2_close`. On failure returns the code (`QCOW2_ERR_INVALID_ARGUMENT` for a NULL handle or
/// buffer or a range past the end, `QCOW2_ERR_IO`, `QCOW2_ERR_CORRUPT`, ...); the contents of `buf`
/// are then unspecified.
#[no_mangle]
pub extern "C" fn qcow2_read(
    img: *const qcow2_image,
    offset: u64,
    buf: *mut u8,
    len: usize,
) -> qcow2_error {
    boundary("qcow2_read", || {
        let image = ffi::image(img)?;
        let buf = ffi::bytes_mut(buf, len, "buf")?;
        image.read_at(buf, offset)?;
        Ok(())
    })
}

/// Write the `len` bytes at `buf` at guest offset `offset`. The range must lie within the virtual
/// size. Durable after the next successful `qcow2_flush` (at once in the write-through cache modes).
///
/// Ownership: `buf` is borrowed for the call (it may be NULL when `len` is 0). Thread safety: may
/// run concurrently with any call on the same handle but `qcow2_close`. On failure returns the code
/// (`QCOW2_ERR_INVALID_ARGUMENT`, `QCOW2_ERR_READ_ONLY`, `QCOW2_ERR_IO`, `QCOW2_ERR_NO_SPACE`, ...);
/// the range then holds old or new data, and the image stays consistent.
#[no_mangle]
pub extern "C" fn qcow2_write(
    img: *mut qcow2_image,
    offset: u64,
    buf: *const u8,
    len: usize,
) -> qcow2_error {
    boundary("qcow2_write", || {
        let image = ffi::image(img)?;
        let buf = ffi::bytes(buf, len, "buf")?;
        image.write_at(buf, offset)?;
        Ok(())
    })
}

/// One buffer of a vectored read or write (`qcow2_readv`, `qcow2_writev`). Its layout is that of
/// POSIX `struct iovec` (`iov_base`, then `iov_len`), so an array of `struct iovec` may be passed
/// with a cast.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct qcow2_iovec {
    /// Start of the buffer; may be NULL when `len` is 0.
    pub base: *mut c_void,
    /// Length of the buffer in bytes.
    pub len: usize,
}

/// Buffers at least this long are read or written directly; shorter ones are gathered into one
/// bounce buffer so that many small buffers cost one request to the core, not one each.
const DIRECT_MIN: usize = 64 * 1024;
/// The largest bounce buffer: longer runs of small buffers are split into several requests.
const BOUNCE_MAX: usize = 1 << 20;

/// Check a vector: every buffer non-NULL (or empty), the total within `isize` and the range
/// `[offset, offset + total)` within the disk. Returns the vector (borrowed) and the total.
fn check_iov<'a>(
    image: &Image,
    offset: u64,
    iov: *const qcow2_iovec,
    iovcnt: usize,
) -> Result<&'a [qcow2_iovec], FfiError> {
    let iovs = ffi::input_array(iov, iovcnt, "iov")?;
    let mut total: usize = 0;
    for (i, v) in iovs.iter().enumerate() {
        if v.base.is_null() && v.len != 0 {
            return Err(FfiError::Arg(format!("iov[{i}].base is NULL")));
        }
        total = total
            .checked_add(v.len)
            .filter(|&t| t <= isize::MAX as usize)
            .ok_or_else(|| FfiError::Arg("iov: the total length is too large".to_string()))?;
    }
    let size = image.virtual_size();
    if offset
        .checked_add(total as u64)
        .is_none_or(|end| end > size)
    {
        return Err(FfiError::Arg(format!(
            "{}: request at offset {offset} for {total} bytes lies past the end of the disk \
             ({size} bytes)",
            image.filename()
        )));
    }
    Ok(iovs)
}

/// Read into the buffers of `iov` (`iovcnt` of them), in order, from consecutive guest offsets
/// starting at `offset`: the same as `qcow2_read` into their concatenation. The whole range must
/// lie within the virtual size. `iov` may be NULL when `iovcnt` is 0. Short buffers are read
/// through an internal bounce buffer (at most 1 MiB), long ones directly.
///
/// Ownership: `iov` and the buffers it points to belong to the caller; the buffers must not
/// overlap. Thread safety: as `qcow2_read`; the read is split into several requests, so a write on
/// another thread may be seen in some buffers and not in others. On failure returns the code
/// (`QCOW2_ERR_INVALID_ARGUMENT` for a NULL handle, a NULL `iov` with a non-zero `iovcnt`, a NULL
/// buffer with a non-zero length, or a range past the end; `QCOW2_ERR_IO`, ...); the contents of
/// the buffers are then unspecified.
#[no_mangle]
pub extern "C" fn qcow2_readv(
    img: *const qcow2_image,
    offset: u64,
    iov: *const qcow2_iovec,
    iovcnt: usize,
) -> qcow2_error {
    boundary("qcow2_readv", || {
        let image = ffi::image(img)?;
        let iovs = check_iov(image, offset, iov, iovcnt)?;
        let mut pos = offset;
        // Short buffers waiting to be read with one request: (index, guest offset of the first).
        let mut pending: Vec<usize> = Vec::new();
        let mut pending_start = offset;
        let mut pending_len = 0usize;
        let mut bounce: Vec<u8> = Vec::new();
        let mut flush_pending =
            |pending: &mut Vec<usize>, start: u64, len: &mut usize| -> Result<(), FfiError> {
                if pending.is_empty() {
                    return Ok(());
                }
                bounce.resize(*len, 0);
                image.read_at(&mut bounce, start)?;
                let mut at = 0;
                for &i in pending.iter() {
                    let v = iovs[i];
                    let dst = ffi::bytes_mut(v.base.cast(), v.len, "iov[].base")?;
                    dst.copy_from_slice(&bounce[at..at + v.len]);
                    at += v.len;
                }
                pending.clear();
                *len = 0;
                Ok(())
            };
        for (i, v) in iovs.iter().enumerate() {
            if v.len >= DIRECT_MIN {
                flush_pending(&mut pending, pending_start, &mut pending_len)?;
                image.read_at(ffi::bytes_mut(v.base.cast(), v.len, "iov[].base")?, pos)?;
            } else if v.len > 0 {
                if pending.is_empty() {
                    pending_start = pos;
                }
                pending.push(i);
                pending_len += v.len;
                if pending_len >= BOUNCE_MAX {
                    flush_pending(&mut pending, pending_start, &mut pending_len)?;
                }
            }
            pos += v.len as u64;
        }
        flush_pending(&mut pending, pending_start, &mut pending_len)?;
        Ok(())
    })
}

/// Write the buffers of `iov` (`iovcnt` of them), in order, at consecutive guest offsets starting
/// at `offset`: the same as `qcow2_write` of their concatenation. The whole range must lie within
/// the virtual size. `iov` may be NULL when `iovcnt` is 0. Short buffers are gathered into an
/// internal bounce buffer (at most 1 MiB), long ones written directly.
///
/// Ownership: `iov` and the buffers are borrowed for the call. Thread safety: as `qcow2_write`;
/// the write is split into several requests. On failure returns the code (as `qcow2_readv`, plus
/// `QCOW2_ERR_READ_ONLY`, `QCOW2_ERR_NO_SPACE`); each part of the range then holds old or new
/// data, and the image stays consistent.
#[no_mangle]
pub extern "C" fn qcow2_writev(
    img: *mut qcow2_image,
    offset: u64,
    iov: *const qcow2_iovec,
    iovcnt: usize,
) -> qcow2_error {
    boundary("qcow2_writev", || {
        let image = ffi::image(img)?;
        let iovs = check_iov(image, offset, iov, iovcnt)?;
        if iovs.iter().all(|v| v.len == 0) {
            // Like a zero-length qcow2_write: still refused on a read-only image.
            image.write_at(&[], offset)?;
            return Ok(());
        }
        let mut pos = offset;
        let mut bounce: Vec<u8> = Vec::new();
        let mut bounce_start = offset;
        for v in iovs {
            let src = ffi::bytes(v.base.cast_const().cast(), v.len, "iov[].base")?;
            if src.len() >= DIRECT_MIN {
                if !bounce.is_empty() {
                    image.write_at(&bounce, bounce_start)?;
                    bounce.clear();
                }
                image.write_at(src, pos)?;
            } else if !src.is_empty() {
                if bounce.is_empty() {
                    bounce_start = pos;
                }
                bounce.extend_from_slice(src);
                if bounce.len() >= BOUNCE_MAX {
                    image.write_at(&bounce, bounce_start)?;
                    bounce.clear();
                }
            }
            pos += v.len as u64;
        }
        if !bounce.is_empty() {
            image.write_at(&bounce, bounce_start)?;
        }
        Ok(())
    })
}

/// Make `len` bytes at guest offset `offset` read as zeros, as cheaply as the format allows (zero
/// clusters in v3, explicit zeros where needed).
///
/// Thread safety: as `qcow2_write`. On failure returns the code; the range then holds old data or
/// zeros.
#[no_mangle]
pub extern "C" fn qcow2_write_zeroes(img: *mut qcow2_image, offset: u64, len: u64) -> qcow2_error {
    boundary("qcow2_write_zeroes", || {
        ffi::image(img)?.write_zeroes(offset, len)?;
        Ok(())
    })
}

/// Discard the whole clusters inside `[offset, offset + len)`: they are freed (and punched out of
/// the host file) and read as zeros afterwards, or from the backing file in a v2 image with one.
/// Partial clusters at the ends are left alone.
///
/// Thread safety: as `qcow2_write`. On failure returns the code.
#[no_mangle]
pub extern "C" fn qcow2_discard(img: *mut qcow2_image, offset: u64, len: u64) -> qcow2_error {
    boundary("qcow2_discard", || {
        ffi::image(img)?.discard(offset, len)?;
        Ok(())
    })
}

/// Write `len` bytes at `buf` compressed, at a cluster-aligned guest `offset`. `len` is at most one
/// cluster (less only for the last cluster of the disk); the target cluster must not be allocated.
/// Data that does not compress is written normally. Several threads calling this compress in
/// parallel.
///
/// Ownership: `buf` is borrowed for the call. Thread safety: as `qcow2_write`. On failure returns
/// the code (`QCOW2_ERR_INVALID_ARGUMENT` for a misaligned offset, too much data, or an allocated
/// cluster).
#[no_mangle]
pub extern "C" fn qcow2_write_compressed(
    img: *mut qcow2_image,
    offset: u64,
    buf: *const u8,
    len: usize,
) -> qcow2_error {
    boundary("qcow2_write_compressed", || {
        let image = ffi::image(img)?;
        let buf = ffi::bytes(buf, len, "buf")?;
        image.write_compressed(offset, buf)?;
        Ok(())
    })
}

/// Make everything written so far durable (at most 2 fdatasyncs; none when nothing changed).
///
/// Thread safety: may run concurrently with any call on the same handle but `qcow2_close`; writes
/// that completed before the call started are covered. On failure returns the code; the image stays
/// consistent, but recent writes may not be durable.
#[no_mangle]
pub extern "C" fn qcow2_flush(img: *mut qcow2_image) -> qcow2_error {
    boundary("qcow2_flush", || {
        ffi::image(img)?.flush()?;
        Ok(())
    })
}

/// Change the virtual size to `new_size` bytes. Shrinking requires the cut-off tail to be
/// unallocated.
///
/// Thread safety: may run concurrently with any call on the same handle but `qcow2_close` (I/O
/// beyond the new end then fails). On failure returns the code; the size is unchanged.
#[no_mangle]
pub extern "C" fn qcow2_resize(img: *mut qcow2_image, new_size: u64) -> qcow2_error {
    boundary("qcow2_resize", || {
        ffi::image(img)?.resize(new_size)?;
        Ok(())
    })
}

/// Store the virtual disk size in bytes in `*out`.
///
/// Ownership: `out` belongs to the caller. Thread safety: any thread, concurrently with other calls
/// but `qcow2_close`. On failure (`QCOW2_ERR_INVALID_ARGUMENT` for NULL arguments) leaves `*out`
/// untouched.
#[no_mangle]
pub extern "C" fn qcow2_virtual_size(img: *const qcow2_image, out: *mut u64) -> qcow2_error {
    boundary("qcow2_virtual_size", || {
        let image = ffi::image(img)?;
        ffi::out(out, "out")?.write(image.virtual_size());
        Ok(())
    })
}

/// Store the number of fdatasyncs issued on the image file so far in `*out` (for tests and
/// benchmarks).
///
/// Ownership and thread safety: as `qcow2_virtual_size`. On failure leaves `*out` untouched.
#[no_mangle]
pub extern "C" fn qcow2_sync_count(img: *const qcow2_image, out: *mut u64) -> qcow2_error {
    boundary("qcow2_sync_count", || {
        let image = ffi::image(img)?;
        ffi::out(out, "out")?.write(image.sync_count());
        Ok(())
    })
}

/// LUKS: add the password `password` (`password_len` bytes, any bytes) to key slot `slot`, or
/// to the first free slot when `slot` is -1, with `iter_time_ms` milliseconds of PBKDF2 (0 for
/// the default 2000), like `qemu-img amend -o encrypt.state=active,encrypt.new-secret=...`. The
/// slot used is stored in `*out_slot` (which may be NULL). An active slot is overwritten only
/// with `force`. The change is durable when the call returns, and crash-safe: a power cut leaves
/// the old or the new set of working passwords.
///
/// Ownership: `password` is borrowed for the call (the library keeps no copy). Thread safety:
/// any thread, concurrently with other calls but `qcow2_close`. On failure returns the code
/// (`QCOW2_ERR_INVALID_ARGUMENT` for a legacy AES or plain image, a bad slot, no free slot or an
/// active slot without `force`; `QCOW2_ERR_READ_ONLY` when open read-only) and leaves
/// `*out_slot` untouched.
#[no_mangle]
pub extern "C" fn qcow2_luks_add_key(
    img: *mut qcow2_image,
    password: *const u8,
    password_len: usize,
    slot: i32,
    iter_time_ms: u64,
    force: bool,
    out_slot: *mut i32,
) -> qcow2_error {
    boundary("qcow2_luks_add_key", || {
        let image = ffi::image(img)?;
        let pw = crate::options::password(password, password_len, "password")?
            .ok_or_else(|| crate::error::FfiError::Arg("password is required".into()))?;
        let out = if out_slot.is_null() {
            None
        } else {
            Some(ffi::out(out_slot, "out_slot")?)
        };
        let mut c = qcow2rs::KeySlotChange::add(pw);
        c.keyslot = match slot {
            -1 => None,
            s if s >= 0 => Some(s as usize),
            s => return Err(crate::error::FfiError::Arg(format!("invalid key slot {s}"))),
        };
        c.iter_time_ms = (iter_time_ms != 0).then_some(iter_time_ms);
        c.force = force;
        let slots = image.change_key_slots(&c)?;
        if let Some(o) = out {
            o.write(slots.first().map_or(-1, |&s| s as i32));
        }
        Ok(())
    })
}

/// LUKS: erase key slot `slot`, or (with `slot` -1) every slot that `password` opens, like
/// `qemu-img amend -o encrypt.state=inactive,encrypt.keyslot=N|encrypt.old-secret=...`. Erasing
/// the last active slot is refused unless `force` (no password would open the image again). The
/// number of slots erased is stored in `*out_count` (which may be NULL). Durable and crash-safe
/// as `qcow2_luks_add_key`.
///
/// Ownership: `password` (NULL with length 0 when `slot` is given) is borrowed for the call.
/// Thread safety: as `qcow2_luks_add_key`. On failure returns the code (`QCOW2_ERR_INVALID_ARGUMENT`
/// for an inactive slot, no matching slot, or the last slot without `force`) and leaves
/// `*out_count` untouched.
#[no_mangle]
pub extern "C" fn qcow2_luks_remove_key(
    img: *mut qcow2_image,
    slot: i32,
    password: *const u8,
    password_len: usize,
    force: bool,
    out_count: *mut u32,
) -> qcow2_error {
    boundary("qcow2_luks_remove_key", || {
        let image = ffi::image(img)?;
        let pw = crate::options::password(password, password_len, "password")?;
        let out = if out_count.is_null() {
            None
        } else {
            Some(ffi::out(out_count, "out_count")?)
        };
        let mut c = match (slot, pw) {
            (s, _) if s >= 0 => qcow2rs::KeySlotChange::remove_slot(s as usize),
            (-1, Some(p)) => qcow2rs::KeySlotChange::remove_password(p),
            (-1, None) => {
                return Err(crate::error::FfiError::Arg(
                    "give a key slot or the password to erase".into(),
                ))
            }
            (s, _) => return Err(crate::error::FfiError::Arg(format!("invalid key slot {s}"))),
        };
        c.force = force;
        let slots = image.change_key_slots(&c)?;
        if let Some(o) = out {
            o.write(slots.len() as u32);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_match_the_package() {
        let num = |s: &str| s.parse::<u32>().unwrap();
        assert_eq!(QCOW2RS_VERSION_MAJOR, num(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(QCOW2RS_VERSION_MINOR, num(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(QCOW2RS_VERSION_PATCH, num(env!("CARGO_PKG_VERSION_PATCH")));
        // SAFETY: qcow2_version returns a static NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(qcow2_version()) };
        assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        assert_eq!(
            qcow2_version_number(),
            (QCOW2RS_VERSION_MAJOR << 16) | (QCOW2RS_VERSION_MINOR << 8) | QCOW2RS_VERSION_PATCH
        );
    }
}
