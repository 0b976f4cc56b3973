//! Python bindings: the private native module `qcow2rs._qcow2rs`.
//!
//! The public API is the pure-Python package `qcow2rs` (`python/qcow2rs/__init__.py`), which wraps
//! [`NativeImage`] in an `io.RawIOBase`. This crate only converts: Python arguments to core options,
//! core results to Python objects, and core errors to exceptions (in `errors.rs`, the one place).
//! Every call that touches the disk runs with the GIL released.

use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};
use qcow2rs::{
    BackingPolicy, CacheMode, CheckReport, CipherAlg, CipherMode, Compat, CompressionType,
    CreateOptions, EncryptionFormat, EncryptionInfo, EncryptionOptions, Error, HashAlg, Image,
    ImageInfo, IvGenAlg, KeySlotChange, KeySlotState, MapEntry, OpenOptions, Password,
    Preallocation, RepairMode, SnapshotInfo, SnapshotOptions, SnapshotRef,
};

mod errors;

use errors::{to_pyerr, Failure};

/// `r`, with a core error raised as its exception.
fn raise<T>(py: Python<'_>, r: Result<T, Error>) -> PyResult<T> {
    r.map_err(|e| to_pyerr(py, e))
}

/// Convert a Python integer argument to `u64`: negative or too large is an invalid argument.
fn to_u64(what: &str, v: i128) -> Result<u64, Error> {
    u64::try_from(v).map_err(|_| {
        Error::InvalidArgument(format!("{what} must be between 0 and 2**64-1, not {v}"))
    })
}

/// Convert a Python integer argument to `u32`.
fn to_u32(what: &str, v: i128) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| {
        Error::InvalidArgument(format!("{what} must be between 0 and 2**32-1, not {v}"))
    })
}

/// A path argument as the string the core stores in the image (a backing file name).
fn path_to_string(what: &str, p: PathBuf) -> Result<String, Error> {
    p.into_os_string().into_string().map_err(|p| {
        let shown = p.to_string_lossy();
        Error::InvalidArgument(format!("{what} is not valid UTF-8: {shown}"))
    })
}

/// The `backing` argument of `open`: `"any"` (the default), `"none"`, or a list (any iterable
/// but a string) of allowed directories, each a `str` or `os.PathLike`.
fn backing_arg(v: Option<&Bound<'_, PyAny>>) -> PyResult<BackingPolicy> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(BackingPolicy::Any);
    };
    if let Ok(s) = v.cast::<PyString>() {
        return match s.to_cow()?.as_ref() {
            "any" => Ok(BackingPolicy::Any),
            "none" => Ok(BackingPolicy::None),
            other => Err(to_pyerr(
                v.py(),
                Error::InvalidArgument(format!(
                    "invalid backing policy: '{other}' (use 'any', 'none' or a list of directories)"
                )),
            )),
        };
    }
    let mut dirs = Vec::new();
    for d in v.try_iter()? {
        dirs.push(d?.extract::<PathBuf>()?);
    }
    Ok(BackingPolicy::Allow(dirs))
}

/// A password argument: `str` (its UTF-8 bytes) or any bytes-like object.
fn password_arg(v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Password>> {
    let Some(v) = v else { return Ok(None) };
    if v.is_none() {
        return Ok(None);
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Some(Password::from(s.to_cow()?.as_ref())));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(Some(Password::from(b.as_bytes())));
    }
    if let Ok(b) = v.cast::<PyByteArray>() {
        return Ok(Some(Password::new(b.to_vec())));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "a password must be str, bytes or bytearray",
    ))
}

/// An encryption option given by name.
fn alg<T>(what: &str, v: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, Error> {
    parse(v).ok_or_else(|| Error::InvalidArgument(format!("invalid {what}: '{v}'")))
}

/// Create a new qcow2 image file (an existing file is overwritten).
///
/// `size` is the virtual size in bytes (rounded up to 512); without it (with `backing_file`),
/// the backing file's, as ``qemu-img create -b BASE -F FMT FILE`` takes it.
/// The keyword arguments are qemu-img's ``-o`` options: `cluster_size` (512 to 2 MiB, a power
/// of two), `refcount_bits`, `compat` is ``"1.1"`` (v3) or ``"0.10"`` (v2); `preallocation` is
/// ``"off"`` or ``"metadata"``; `compression_type` is ``"zlib"`` or ``"zstd"``;
/// `backing_format` (``"qcow2"`` or ``"raw"``) is required with `backing_file`.
/// `encrypt` is ``"luks"`` or ``"aes"`` (legacy, no key check: for old images only) and needs
/// `password` (str or bytes); `cipher_alg`, `cipher_mode`, `ivgen_alg`, `ivgen_hash_alg`,
/// `hash_alg` and `iter_time` (milliseconds of PBKDF2) are qemu-img's ``encrypt.*`` options
/// for LUKS. `backing_password` opens an encrypted backing file. `open_backing=False`
/// (``qemu-img create -u``) does not open the backing file, which need not exist yet: `size`
/// is then required.
#[pyfunction]
#[pyo3(signature = (
    path,
    size = None,
    *,
    cluster_size = 65536,
    refcount_bits = 16,
    compat = "1.1",
    backing_file = None,
    backing_format = None,
    lazy_refcounts = false,
    preallocation = "off",
    extended_l2 = false,
    compression_type = "zlib",
    encrypt = None,
    password = None,
    cipher_alg = "aes-256",
    cipher_mode = "xts",
    ivgen_alg = "plain64",
    ivgen_hash_alg = "sha256",
    hash_alg = "sha256",
    iter_time = 2000,
    backing_password = None,
    open_backing = true,
))]
#[allow(clippy::too_many_arguments)]
fn create(
    py: Python<'_>,
    path: PathBuf,
    size: Option<i128>,
    cluster_size: i128,
    refcount_bits: i128,
    compat: &str,
    backing_file: Option<PathBuf>,
    backing_format: Option<String>,
    lazy_refcounts: bool,
    preallocation: &str,
    extended_l2: bool,
    compression_type: &str,
    encrypt: Option<&str>,
    password: Option<&Bound<'_, PyAny>>,
    cipher_alg: &str,
    cipher_mode: &str,
    ivgen_alg: &str,
    ivgen_hash_alg: &str,
    hash_alg: &str,
    iter_time: i128,
    backing_password: Option<&Bound<'_, PyAny>>,
    open_backing: bool,
) -> PyResult<()> {
    let password = password_arg(password)?;
    let backing_password = password_arg(backing_password)?;
    let file = path.to_string_lossy().into_owned();
    let opts = (|| {
        // As qemu-img create: without a size, the backing file's; its format is not guessed.
        let size = match (size, &backing_file) {
            (Some(s), _) => to_u64("size", s)?,
            // The core takes the backing file's size for 0.
            (None, Some(_)) if open_backing => 0,
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "{file}: Image creation needs a size parameter when the backing file is \
                     not opened (open_backing=False)"
                )))
            }
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                    "{file}: Image creation needs a size parameter"
                )))
            }
        };
        if backing_file.is_some() && backing_format.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{file}: Backing file specified without backing format (give \
                     backing_format='qcow2' or 'raw', as qemu-img create -F)"
            )));
        }
        let encryption = match encrypt {
            None => {
                if password.is_some() {
                    return Err(Error::InvalidArgument(
                        "password given without encrypt= ('luks' or 'aes')".into(),
                    ));
                }
                None
            }
            Some(f) => {
                let pw = password.clone().ok_or_else(|| {
                    Error::InvalidArgument(format!("encrypt='{f}' needs a password"))
                })?;
                Some(EncryptionOptions {
                    format: EncryptionFormat::parse(f)?,
                    password: pw,
                    cipher_alg: alg("cipher_alg", cipher_alg, CipherAlg::parse)?,
                    cipher_mode: alg("cipher_mode", cipher_mode, CipherMode::parse)?,
                    ivgen_alg: alg("ivgen_alg", ivgen_alg, IvGenAlg::parse)?,
                    ivgen_hash_alg: alg("ivgen_hash_alg", ivgen_hash_alg, HashAlg::parse)?,
                    hash_alg: alg("hash_alg", hash_alg, HashAlg::parse)?,
                    iter_time_ms: to_u64("iter_time", iter_time)?,
                })
            }
        };
        Ok(CreateOptions {
            size,
            cluster_size: to_u32("cluster_size", cluster_size)?,
            refcount_bits: to_u32("refcount_bits", refcount_bits)?,
            compat: Compat::parse(compat)?,
            backing_file: backing_file
                .map(|p| path_to_string("backing_file", p))
                .transpose()?,
            backing_format,
            lazy_refcounts,
            preallocation: Preallocation::parse(preallocation)?,
            extended_l2,
            compression_type: CompressionType::parse(compression_type)?,
            open_backing,
            encryption,
            backing_password,
        })
    })()
    .map_err(|e| errors::to_pyerr_in(py, e, Some(&file)))?;
    py.detach(|| Image::create(&path, &opts))
        .map_err(|e| errors::to_pyerr_in(py, e, Some(&file)))
}

/// Whether `mode` opens read-only (`Ok(true)`) or read-write (`Ok(false)`), read as the built-in
/// `open` reads it: the letters in any order, each at most once, with CPython's messages for
/// what it refuses. Of the modes it takes, those that create, truncate or append (an image is made
/// by `create`) and the text modes (an image is binary) are refused; `"rw"`, the earlier
/// spelling, still means `"r+b"`.
fn parse_mode(mode: &str) -> Result<bool, String> {
    if mode == "rw" {
        return Ok(false);
    }
    let invalid = || format!("invalid mode: '{mode}'");
    let [mut r, mut w, mut x, mut a, mut plus, mut t, mut b] = [false; 7];
    for c in mode.chars() {
        let flag = match c {
            'r' => &mut r,
            'w' => &mut w,
            'x' => &mut x,
            'a' => &mut a,
            '+' => &mut plus,
            't' => &mut t,
            'b' => &mut b,
            _ => return Err(invalid()),
        };
        if *flag {
            return Err(invalid());
        }
        *flag = true;
    }
    if t && b {
        return Err("can't have text and binary mode at once".into());
    }
    match [r, w, x, a].iter().filter(|&&f| f).count() {
        0 => {
            return Err(
                "Must have exactly one of create/read/write/append mode and at most one plus"
                    .into(),
            )
        }
        1 => {}
        _ => return Err("must have exactly one of create/read/write/append mode".into()),
    }
    if !r {
        return Err(format!(
            "{}: qcow2rs.open does not create, truncate or append to an image (make one with \
             qcow2rs.create, then open it 'r+b')",
            invalid()
        ));
    }
    if t {
        return Err(format!(
            "{}: an image is a binary file (use 'rb' or 'r+b')",
            invalid()
        ));
    }
    Ok(!plus)
}

/// Open an image file. `mode` is `"rb"` (read-only) or `"r+b"` (read-write). `snapshot`
/// (an ID or a name) opens a read-only view of that internal snapshot.
#[pyfunction]
#[pyo3(signature = (
    path,
    mode = "rb",
    *,
    cache = "writeback",
    l2_cache_size = None,
    refcount_cache_size = None,
    password = None,
    backing_password = None,
    snapshot = None,
    backing = None,
    damaged = false,
    force_share = false,
    without_key = false,
    lazy_refcounts = None,
))]
#[allow(clippy::too_many_arguments)]
fn open(
    py: Python<'_>,
    path: PathBuf,
    mode: &str,
    cache: &str,
    l2_cache_size: Option<i128>,
    refcount_cache_size: Option<i128>,
    password: Option<&Bound<'_, PyAny>>,
    backing_password: Option<&Bound<'_, PyAny>>,
    snapshot: Option<String>,
    backing: Option<&Bound<'_, PyAny>>,
    damaged: bool,
    force_share: bool,
    without_key: bool,
    lazy_refcounts: Option<bool>,
) -> PyResult<NativeImage> {
    let backing = backing_arg(backing)?;
    let password = password_arg(password)?;
    let backing_password = password_arg(backing_password)?;
    let read_only = raise(py, parse_mode(mode).map_err(Error::InvalidArgument))?;
    let opts = raise(
        py,
        (|| {
            Ok(OpenOptions {
                read_only,
                cache: CacheMode::parse(cache)?,
                l2_cache_size: l2_cache_size
                    .map(|v| to_u64("l2_cache_size", v))
                    .transpose()?,
                refcount_cache_size: refcount_cache_size
                    .map(|v| to_u64("refcount_cache_size", v))
                    .transpose()?,
                password,
                backing_password,
                snapshot: snapshot.map(SnapshotRef::IdOrName),
                backing,
                damaged,
                force_share,
                without_key,
                lazy_refcounts,
                ..OpenOptions::default()
            })
        })(),
    )?;
    // Errors of the open name the file, also those the core words without it.
    let image = py
        .detach(|| Image::open(&path, &opts))
        .map_err(|e| errors::to_pyerr_in(py, e, Some(&path.to_string_lossy())))?;
    Ok(NativeImage {
        filename: image.filename().to_string(),
        image: RwLock::new(Some(image)),
    })
}

/// An open image. Operations share the image (it is `Sync`); `close` waits for them to finish.
#[pyclass(module = "qcow2rs._qcow2rs", name = "NativeImage", frozen)]
pub struct NativeImage {
    image: RwLock<Option<Image>>,
    /// The image file's name, for the errors of calls whose arguments are refused before they
    /// reach the image (they name it as the core's errors do), also once it is closed.
    filename: String,
}

impl NativeImage {
    /// `r`, with a core error raised as its exception, naming this image when it names no file.
    fn arg<T>(&self, py: Python<'_>, r: Result<T, Error>) -> PyResult<T> {
        r.map_err(|e| errors::to_pyerr_in(py, e, Some(&self.filename)))
    }

    /// Run `f` on the open image with the GIL released.
    fn with<R, F>(&self, py: Python<'_>, f: F) -> PyResult<R>
    where
        R: Send,
        F: Send + FnOnce(&Image) -> Result<R, Error>,
    {
        py.detach(|| {
            let guard = self.image.read().unwrap_or_else(PoisonError::into_inner);
            let image = guard.as_ref().ok_or(Failure::Closed)?;
            f(image).map_err(|e| Failure::InImage(e, image.filename().to_string()))
        })
        .map_err(|f| f.into_pyerr(py))
    }
}

#[pymethods]
impl NativeImage {
    /// Read up to `length` bytes at `offset`; short (or empty) at the end of the disk.
    fn read_at<'py>(
        &self,
        py: Python<'py>,
        offset: i128,
        length: i128,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        let length = self.arg(py, to_u64("length", length))?;
        let n = self.with(py, |img| {
            Ok(img.virtual_size().saturating_sub(offset).min(length))
        })?;
        let n = self.arg(
            py,
            usize::try_from(n)
                .ok()
                .filter(|&n| isize::try_from(n).is_ok())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("length {n} does not fit in memory"))
                }),
        )?;
        if n == 0 {
            return Ok(PyBytes::new(py, b""));
        }
        // A new bytes object, not zeroed first as `PyBytes::new_with` does (that costs a fifth
        // of a 1 MiB read from the page cache); as `io.FileIO.read` does, it is handed out only
        // after the read has filled all of it (`Image::read_at` fills the whole buffer or
        // fails, and on failure the object is dropped unread). It is ours alone until this
        // returns, so it is filled without the GIL.
        // SAFETY: a null source asks CPython for an object of `n` uninitialised bytes, owned
        // by us (null, with an exception set, if that fails); `PyBytes_AsString` of a bytes
        // object is its `n`-byte buffer, which lives as long as `bytes` and is written only
        // through `target` here.
        let (bytes, target) = unsafe {
            let raw = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as isize);
            let bytes = Bound::from_owned_ptr_or_err(py, raw)?.cast_into_unchecked::<PyBytes>();
            let ptr = pyo3::ffi::PyBytes_AsString(raw).cast::<u8>();
            (bytes, std::slice::from_raw_parts_mut(ptr, n))
        };
        self.with(py, move |img| img.read_at(target, offset))?;
        Ok(bytes)
    }

    /// Read into `buffer` (any writable, C-contiguous object with the buffer protocol) at
    /// `offset`, without the GIL and without a copy; returns the number of bytes read (short,
    /// or 0, at the end of the disk).
    fn readinto_at(
        &self,
        py: Python<'_>,
        offset: i128,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        let buf = PyUntypedBuffer::get(buffer)?;
        if buf.readonly() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "readinto needs a writable buffer (bytearray, memoryview, ...)",
            ));
        }
        if !buf.is_c_contiguous() {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "readinto needs a C-contiguous buffer",
            ));
        }
        let len = buf.len_bytes();
        // SAFETY: the buffer is exported (so it cannot be resized or freed) until `buf` drops,
        // after the read; it is writable and contiguous, `len` bytes long.
        let target: &mut [u8] = if len == 0 {
            &mut []
        } else {
            unsafe { std::slice::from_raw_parts_mut(buf.buf_ptr().cast::<u8>(), len) }
        };
        self.with(py, move |img| {
            let n = img.virtual_size().saturating_sub(offset).min(len as u64) as usize;
            if n > 0 {
                img.read_at(&mut target[..n], offset)?;
            }
            Ok(n)
        })
    }

    /// Write all of `data` (any C-contiguous object with the buffer protocol; not copied) at
    /// `offset`. The disk does not grow: writing past its end fails. An empty write does
    /// nothing, wherever it is (like writing nothing to a file).
    fn write_at(&self, py: Python<'_>, offset: i128, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        let buf = PyUntypedBuffer::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "write needs a C-contiguous buffer",
            ));
        }
        let len = buf.len_bytes();
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the buffer stays exported (not resized, not freed) until `buf` drops, after
        // the write; it is contiguous and `len` bytes long.
        let data: &[u8] = unsafe { std::slice::from_raw_parts(buf.buf_ptr().cast::<u8>(), len) };
        self.with(py, |img| {
            let size = img.virtual_size();
            let len = data.len() as u64;
            // A read-only image refuses any write (the core says so), wherever it is: the mode
            // is checked before the position, as io.FileIO does.
            if !img.is_read_only() && offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::InvalidArgument(format!(
                    "{}: cannot write {len} bytes at offset {offset}: the virtual disk ends at \
                     {size} bytes and does not grow by writing (use resize() to enlarge it)",
                    img.filename()
                )));
            }
            img.write_at(data, offset)
        })
    }

    /// Write one cluster of `data`, compressed, at the cluster-aligned `offset`.
    fn write_compressed(&self, py: Python<'_>, offset: i128, data: &[u8]) -> PyResult<()> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        self.with(py, |img| img.write_compressed(offset, data))
    }

    /// Make `length` bytes at `offset` read as zeros.
    fn write_zeroes(&self, py: Python<'_>, offset: i128, length: i128) -> PyResult<()> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        let length = self.arg(py, to_u64("length", length))?;
        self.with(py, |img| img.write_zeroes(offset, length))
    }

    /// Discard the whole clusters inside the range.
    fn discard(&self, py: Python<'_>, offset: i128, length: i128) -> PyResult<()> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        let length = self.arg(py, to_u64("length", length))?;
        self.with(py, |img| img.discard(offset, length))
    }

    /// Make everything written so far durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |img| img.flush())
    }

    /// Change the virtual size.
    fn resize(&self, py: Python<'_>, size: i128) -> PyResult<()> {
        let size = self.arg(py, to_u64("size", size))?;
        self.with(py, |img| img.resize(size))
    }

    /// Facts about the image, as a dict with the fields of the core's `ImageInfo`.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = self.with(py, |img| img.info())?;
        info_dict(py, &info)
    }

    /// How `[offset, offset+length)` is stored (default: to the end of the disk), as dicts.
    #[pyo3(signature = (offset = 0, length = None))]
    fn map<'py>(
        &self,
        py: Python<'py>,
        offset: i128,
        length: Option<i128>,
    ) -> PyResult<Bound<'py, PyList>> {
        let offset = self.arg(py, to_u64("offset", offset))?;
        let length = self.arg(py, length.map(|l| to_u64("length", l)).transpose())?;
        let entries = self.with(py, |img| {
            let length = length.unwrap_or_else(|| img.virtual_size().saturating_sub(offset));
            img.map(offset, length)
        })?;
        let list = PyList::empty(py);
        for e in &entries {
            list.append(map_entry_dict(py, e)?)?;
        }
        Ok(list)
    }

    /// The tables a damaged open found cut short by the end of the file.
    fn damage(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with(py, |i| Ok(i.damage()))
    }

    /// Check consistency; `repair` is None, `"leaks"` or `"all"`.
    #[pyo3(signature = (repair = None))]
    fn check<'py>(&self, py: Python<'py>, repair: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
        let repair = match repair {
            None => None,
            Some("leaks") => Some(RepairMode::Leaks),
            Some("all") => Some(RepairMode::All),
            Some(other) => {
                return self.arg(
                    py,
                    Err(Error::InvalidArgument(format!(
                        "invalid repair mode: '{other}' (use None, 'leaks' or 'all')"
                    ))),
                )
            }
        };
        let report = self.with(py, |img| img.check(repair))?;
        check_dict(py, &report)
    }

    /// Add or remove LUKS passwords, as `qemu-img amend -o encrypt.*` does: `add` is the
    /// password to add (`encrypt.new-secret`, into `slot` or the first free one), else `remove`
    /// erases every slot it opens (`encrypt.old-secret`), else `slot` is erased. Returns the
    /// slots changed.
    #[pyo3(signature = (*, add = None, remove = None, slot = None, iter_time = None, force = false))]
    fn change_key_slots(
        &self,
        py: Python<'_>,
        add: Option<&Bound<'_, PyAny>>,
        remove: Option<&Bound<'_, PyAny>>,
        slot: Option<usize>,
        iter_time: Option<i128>,
        force: bool,
    ) -> PyResult<Vec<usize>> {
        let add = password_arg(add)?;
        let remove = password_arg(remove)?;
        let iter_time_ms = self.arg(py, iter_time.map(|t| to_u64("iter_time", t)).transpose())?;
        let change = KeySlotChange {
            state: if add.is_some() {
                KeySlotState::Active
            } else {
                KeySlotState::Inactive
            },
            keyslot: slot,
            new_secret: add,
            old_secret: remove,
            iter_time_ms,
            force,
        };
        if change.new_secret.is_none() && change.old_secret.is_none() && slot.is_none() {
            return self.arg(
                py,
                Err(Error::InvalidArgument(
                    "nothing to change: give a password to add or remove, or a slot".into(),
                )),
            );
        }
        self.with(py, |img| img.change_key_slots(&change))
    }

    /// The image file's name, as opened.
    #[getter]
    fn filename(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |img| Ok(img.filename().to_string()))
    }

    /// Flush and close. Closing a closed image does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let image = py.detach(|| {
            self.image
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        });
        match image {
            Some(img) => self.arg(py, py.detach(|| img.close())),
            None => Ok(()),
        }
    }

    /// Whether the image is closed.
    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        py.detach(|| {
            self.image
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none()
        })
    }

    /// Virtual disk size in bytes.
    #[getter]
    fn virtual_size(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |img| Ok(img.virtual_size()))
    }

    /// Cluster size in bytes.
    #[getter]
    fn cluster_size(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |img| Ok(img.cluster_size()))
    }

    /// Whether the image is open read-only.
    #[getter]
    fn read_only(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |img| Ok(img.is_read_only()))
    }

    /// Number of fdatasyncs issued on the image file so far.
    #[getter]
    fn sync_count(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |img| Ok(img.sync_count()))
    }

    /// The internal snapshots, in table order, as dicts.
    fn snapshots<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.with(py, |img| Ok(img.snapshots()))?;
        snapshot_list(py, &list)
    }

    /// The snapshot this image shows (opened with `snapshot=`), as a dict, or None.
    #[getter]
    fn snapshot_view<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let view = self.with(py, |img| Ok(img.snapshot_view()))?;
        view.map(|s| snapshot_dict(py, &s)).transpose()
    }

    /// Create an internal snapshot named `name`; `date` is (seconds, nanoseconds) or None for
    /// now, `icount` None for none. Returns it as a dict.
    #[pyo3(
        signature = (name, *, vm_clock_nsec = 0, icount = Some(0), date = None),
        text_signature = "($self, /, name, *, vm_clock_nsec=0, icount=0, date=None)"
    )]
    fn create_snapshot<'py>(
        &self,
        py: Python<'py>,
        name: String,
        vm_clock_nsec: i128,
        icount: Option<i128>,
        date: Option<(i128, i128)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = self.arg(
            py,
            (|| {
                Ok(SnapshotOptions {
                    name,
                    date: date
                        .map(|(s, ns)| {
                            Ok::<_, Error>((
                                to_u32("date (seconds)", s)?,
                                to_u32("date (nanoseconds)", ns)?,
                            ))
                        })
                        .transpose()?,
                    vm_clock_nsec: to_u64("vm_clock_nsec", vm_clock_nsec)?,
                    icount: icount.map(|i| to_u64("icount", i)).transpose()?,
                })
            })(),
        )?;
        let s = self.with(py, |img| img.create_snapshot_with(&opts))?;
        snapshot_dict(py, &s)
    }

    /// Revert the disk to the snapshot with this ID, else this name. Returns it as a dict.
    fn apply_snapshot<'py>(
        &self,
        py: Python<'py>,
        id_or_name: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(py, |img| img.apply_snapshot(id_or_name))?;
        snapshot_dict(py, &s)
    }

    /// Delete the snapshot with this ID, else this name. Returns it as a dict.
    fn delete_snapshot<'py>(
        &self,
        py: Python<'py>,
        id_or_name: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(py, |img| img.delete_snapshot(id_or_name))?;
        snapshot_dict(py, &s)
    }
}

impl Drop for NativeImage {
    fn drop(&mut self) {
        // Dropping the core image flushes it: do that without holding the GIL too.
        let image = self
            .image
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(img) = image {
            Python::attach(|py| py.detach(|| drop(img)));
        }
    }
}

fn info_dict<'py>(py: Python<'py>, i: &ImageInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("filename", &i.filename)?;
    d.set_item("virtual_size", i.virtual_size)?;
    d.set_item("actual_size", i.actual_size)?;
    d.set_item("cluster_size", i.cluster_size)?;
    d.set_item("compat", i.compat.as_str())?;
    d.set_item("refcount_bits", i.refcount_bits)?;
    d.set_item("lazy_refcounts", i.lazy_refcounts)?;
    d.set_item("corrupt", i.corrupt)?;
    d.set_item("dirty", i.dirty)?;
    d.set_item("extended_l2", i.extended_l2)?;
    d.set_item("compression_type", i.compression_type.as_str())?;
    d.set_item("backing_file", &i.backing_file)?;
    d.set_item("backing_format", &i.backing_format)?;
    d.set_item("full_backing_filename", &i.full_backing_filename)?;
    d.set_item("crypt_method", i.crypt_method)?;
    d.set_item("snapshot_count", i.snapshot_count)?;
    d.set_item("snapshots", snapshot_list(py, &i.snapshots)?)?;
    d.set_item("read_only", i.read_only)?;
    d.set_item(
        "encryption",
        i.encryption
            .as_ref()
            .map(|e| encrypt_dict(py, e))
            .transpose()?,
    )?;
    Ok(d)
}

/// The encryption of an image as `qemu-img info --output=json` shows it (`encrypt` in
/// `format-specific`), keys and all.
fn encrypt_dict<'py>(py: Python<'py>, e: &EncryptionInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("format", e.format.as_str())?;
    if let Some(l) = &e.luks {
        d.set_item("cipher-alg", l.cipher_alg.as_str())?;
        d.set_item("cipher-mode", l.cipher_mode.as_str())?;
        d.set_item("ivgen-alg", l.ivgen_alg.as_str())?;
        if let Some(h) = l.ivgen_hash_alg {
            d.set_item("ivgen-hash-alg", h.as_str())?;
        }
        d.set_item("hash-alg", l.hash_alg.as_str())?;
        d.set_item("detached-header", false)?;
        d.set_item("payload-offset", l.payload_offset)?;
        d.set_item("master-key-iters", l.master_key_iters)?;
        d.set_item("uuid", &l.uuid)?;
        let slots = PyList::empty(py);
        for s in &l.slots {
            let o = PyDict::new(py);
            o.set_item("active", s.active)?;
            if let Some(i) = s.iters {
                o.set_item("iters", i)?;
            }
            if let Some(st) = s.stripes {
                o.set_item("stripes", st)?;
            }
            o.set_item("key-offset", s.key_offset)?;
            slots.append(o)?;
        }
        d.set_item("slots", slots)?;
    }
    Ok(d)
}

fn snapshot_dict<'py>(py: Python<'py>, s: &SnapshotInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &s.id)?;
    d.set_item("name", &s.name)?;
    d.set_item("date_sec", s.date_sec)?;
    d.set_item("date_nsec", s.date_nsec)?;
    d.set_item("vm_clock_nsec", s.vm_clock_nsec)?;
    d.set_item("vm_state_size", s.vm_state_size)?;
    d.set_item("disk_size", s.disk_size)?;
    d.set_item("icount", s.icount)?;
    Ok(d)
}

fn snapshot_list<'py>(py: Python<'py>, list: &[SnapshotInfo]) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for s in list {
        out.append(snapshot_dict(py, s)?)?;
    }
    Ok(out)
}

fn map_entry_dict<'py>(py: Python<'py>, e: &MapEntry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("start", e.start)?;
    d.set_item("length", e.length)?;
    d.set_item("depth", e.depth)?;
    d.set_item("present", e.present)?;
    d.set_item("zero", e.zero)?;
    d.set_item("data", e.data)?;
    d.set_item("compressed", e.compressed)?;
    d.set_item("offset", e.offset)?;
    Ok(d)
}

fn check_dict<'py>(py: Python<'py>, r: &CheckReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("corruptions", r.corruptions)?;
    d.set_item("leaks", r.leaks)?;
    d.set_item("check_errors", r.check_errors)?;
    d.set_item("corruptions_fixed", r.corruptions_fixed)?;
    d.set_item("leaks_fixed", r.leaks_fixed)?;
    d.set_item("total_clusters", r.total_clusters)?;
    d.set_item("allocated_clusters", r.allocated_clusters)?;
    d.set_item("fragmented_clusters", r.fragmented_clusters)?;
    d.set_item("compressed_clusters", r.compressed_clusters)?;
    d.set_item("image_end_offset", r.image_end_offset)?;
    d.set_item("messages", PyTuple::new(py, &r.messages)?)?;
    d.set_item("rebuilt", r.rebuilt)?;
    d.set_item("is_clean", r.is_clean())?;
    d.set_item("exit_code", r.exit_code())?;
    Ok(d)
}

/// The native half of the `qcow2rs` package. Import `qcow2rs`, not this.
#[pymodule]
fn _qcow2rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(create, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_class::<NativeImage>()?;
    Ok(())
}
