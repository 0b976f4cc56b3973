//! Options for creating and opening images, and their conversion to the core's options.
//!
//! Enumerated option values are plain `uint32_t` typedefs with `#define`d constants rather than C
//! enums, so that any value a C caller stores is checked (and rejected with
//! `QCOW2_ERR_INVALID_ARGUMENT`) instead of being undefined behaviour on the Rust side.

use std::ffi::c_char;

use qcow2rs::{
    BackingPolicy, CacheMode, CipherAlg, CipherMode, Compat, CompressionType, CreateOptions,
    EncryptionOptions, HashAlg, IvGenAlg, OpenOptions, Password, Preallocation, SnapshotRef,
};

use crate::error::{qcow2_error, FfiError};
use crate::ffi::{self, boundary};

/// qcow2 version (`QCOW2_COMPAT_*`).
pub type qcow2_compat = u32;
/// qcow2 version 2 (`compat=0.10`).
pub const QCOW2_COMPAT_V2: qcow2_compat = 2;
/// qcow2 version 3 (`compat=1.1`), the default.
pub const QCOW2_COMPAT_V3: qcow2_compat = 3;

/// Compression algorithm for compressed clusters (`QCOW2_COMPRESSION_*`).
pub type qcow2_compression_type = u32;
/// Raw deflate (qemu's `zlib`), the default.
pub const QCOW2_COMPRESSION_ZLIB: qcow2_compression_type = 0;
/// Zstandard (v3 only).
pub const QCOW2_COMPRESSION_ZSTD: qcow2_compression_type = 1;

/// Preallocation mode at creation (`QCOW2_PREALLOC_*`).
pub type qcow2_preallocation = u32;
/// Nothing is preallocated (the default).
pub const QCOW2_PREALLOC_OFF: qcow2_preallocation = 0;
/// All L2 tables and data clusters are allocated (data clusters as preallocated zero clusters).
pub const QCOW2_PREALLOC_METADATA: qcow2_preallocation = 1;

/// Encryption of a new image (`QCOW2_ENCRYPT_*`).
pub type qcow2_encrypt_format = u32;
/// Not encrypted (the default).
pub const QCOW2_ENCRYPT_NONE: qcow2_encrypt_format = 0;
/// LUKS (crypt_method 2): the choice.
pub const QCOW2_ENCRYPT_LUKS: qcow2_encrypt_format = 1;
/// Legacy AES-128-CBC (crypt_method 1): no key check, deprecated by QEMU; for old images.
pub const QCOW2_ENCRYPT_AES: qcow2_encrypt_format = 2;

/// Cache mode, named as QEMU names them (`QCOW2_CACHE_*`).
pub type qcow2_cache_mode = u32;
/// Durable at `qcow2_flush` (the default).
pub const QCOW2_CACHE_WRITEBACK: qcow2_cache_mode = 0;
/// Durable when each write returns.
pub const QCOW2_CACHE_WRITETHROUGH: qcow2_cache_mode = 1;
/// O_DIRECT (buffers, offsets and lengths should be aligned), durable at `qcow2_flush`.
pub const QCOW2_CACHE_NONE: qcow2_cache_mode = 2;
/// O_DIRECT, durable when each write returns.
pub const QCOW2_CACHE_DIRECTSYNC: qcow2_cache_mode = 3;
/// Flushes are ignored; one sync at close. For conversions only.
pub const QCOW2_CACHE_UNSAFE: qcow2_cache_mode = 4;

/// Which backing files an image may make us open (`QCOW2_BACKING_*`); see
/// `qcow2_open_options.backing_policy`.
pub type qcow2_backing_policy = u32;
/// Open whatever the image names, as QEMU does (regular files and devices; FIFOs and sockets
/// are refused rather than hang the open). The default.
pub const QCOW2_BACKING_ANY: qcow2_backing_policy = 0;
/// Never open a backing file: clusters the image does not allocate read as zeros (the same as
/// `QCOW2_OPEN_NO_BACKING`).
pub const QCOW2_BACKING_NONE: qcow2_backing_policy = 1;
/// Open only regular files whose real path (symbolic links and `..` resolved) lies under one
/// of `qcow2_open_options.backing_allow`; anything else fails the open with `QCOW2_ERR_IO`,
/// errno `EACCES`, and a message naming the image, the backing file and the policy.
pub const QCOW2_BACKING_ALLOW: qcow2_backing_policy = 2;

/// Open flag: open read-only (writes fail with `QCOW2_ERR_READ_ONLY`).
pub const QCOW2_OPEN_RDONLY: u32 = 1 << 0;
/// Open flag: do not open the backing chain; unallocated clusters read as zeros.
pub const QCOW2_OPEN_NO_BACKING: u32 = 1 << 1;
/// Open flag: use lazy refcounts whatever the image header says.
pub const QCOW2_OPEN_LAZY_REFCOUNTS: u32 = 1 << 2;
/// Open flag: do not use lazy refcounts whatever the image header says.
pub const QCOW2_OPEN_NO_LAZY_REFCOUNTS: u32 = 1 << 3;
/// Open flag: open an encrypted image without its password, for inspection (info, map,
/// check); guest data I/O then fails with `QCOW2_ERR_BAD_KEY`.
pub const QCOW2_OPEN_WITHOUT_KEY: u32 = 1 << 4;
/// Open flag: force-share (`qemu-img -U`): take only the shared "consistent read" lock, so that
/// the open succeeds while another process (QEMU, or another qcow2rs user) writes the image.
/// Needs `QCOW2_OPEN_RDONLY` (else `QCOW2_ERR_INVALID_ARGUMENT`). Without it, an open fails with
/// `QCOW2_ERR_LOCKED` when another user's locks conflict, as QEMU's do: a read-write open
/// against any other user of the image, a read-only open against a writer.
pub const QCOW2_OPEN_FORCE_SHARE: u32 = 1 << 5;

/// Open flag: open a damaged image for inspection and rescue (needs `QCOW2_OPEN_RDONLY`): an
/// L1, refcount or snapshot table that lies past the end of a truncated file reads as zeros
/// where the file ends, as QEMU reads it, instead of failing the open. `qcow2_check` then
/// reports the damage; reading a cluster the file no longer holds fails with
/// `QCOW2_ERR_CORRUPT`.
pub const QCOW2_OPEN_DAMAGED: u32 = 1 << 6;

const OPEN_FLAGS_ALL: u32 = QCOW2_OPEN_DAMAGED
    | QCOW2_OPEN_RDONLY
    | QCOW2_OPEN_NO_BACKING
    | QCOW2_OPEN_LAZY_REFCOUNTS
    | QCOW2_OPEN_NO_LAZY_REFCOUNTS
    | QCOW2_OPEN_WITHOUT_KEY
    | QCOW2_OPEN_FORCE_SHARE;

/// Options for `qcow2_create`. Initialise it with `qcow2_create_options_init`, then change
/// the fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_create_options {
    /// Cluster size: a power of two from 512 to 2 MiB. Default 65536.
    pub cluster_size: u32,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 bits. Default 16; version 2 requires 16.
    pub refcount_bits: u32,
    /// Version (`QCOW2_COMPAT_*`). Default `QCOW2_COMPAT_V3`.
    pub compat: qcow2_compat,
    /// Backing file name (NUL-terminated UTF-8), stored as given: a relative name is relative to the
    /// image's directory. NULL (the default) for none. Borrowed for the duration of the call only.
    pub backing_file: *const c_char,
    /// Backing file format, "qcow2" or "raw"; required with a backing file. NULL by default.
    pub backing_format: *const c_char,
    /// Lazy refcounts (v3 only). Default false.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (v3 only, cluster size at least 16 KiB). Default false.
    pub extended_l2: bool,
    /// Preallocation mode (`QCOW2_PREALLOC_*`). Default `QCOW2_PREALLOC_OFF`.
    pub preallocation: qcow2_preallocation,
    /// Compression type (`QCOW2_COMPRESSION_*`). Default `QCOW2_COMPRESSION_ZLIB`.
    pub compression_type: qcow2_compression_type,
    /// Encryption (`QCOW2_ENCRYPT_*`). Default `QCOW2_ENCRYPT_NONE`.
    pub encrypt_format: qcow2_encrypt_format,
    /// The password (bytes, not NUL-terminated), required with encryption. Borrowed for the
    /// duration of the call only; the library keeps no copy after it returns.
    pub password: *const u8,
    /// Length of `password` in bytes.
    pub password_len: usize,
    /// LUKS cipher: "aes-128", "aes-192" or "aes-256"; NULL (the default) for "aes-256".
    pub encrypt_cipher_alg: *const c_char,
    /// LUKS mode: "xts" or "cbc"; NULL for "xts".
    pub encrypt_cipher_mode: *const c_char,
    /// LUKS IV generator: "plain", "plain64" or "essiv"; NULL for "plain64".
    pub encrypt_ivgen_alg: *const c_char,
    /// LUKS ESSIV hash: NULL for "sha256".
    pub encrypt_ivgen_hash_alg: *const c_char,
    /// LUKS PBKDF2 hash: "sha1", "sha224", "sha256", "sha384", "sha512"; NULL for "sha256".
    pub encrypt_hash_alg: *const c_char,
    /// LUKS PBKDF2 time per key slot in milliseconds; 0 (the default) for 2000.
    pub encrypt_iter_time_ms: u64,
    /// Password of an encrypted backing file; NULL for none. Not needed: the backing file is
    /// opened for its size only, which is read without the key (as `qemu-img create -b` does).
    pub backing_password: *const u8,
    /// Length of `backing_password`.
    pub backing_password_len: usize,
    /// Do not open the backing file (`qemu-img create -u`): it need not exist yet, and
    /// `backing_format` must then be given (and `size` is used as given). Default false: the
    /// backing file is opened to check it, and a `size` of 0 takes its size.
    pub no_backing_open: bool,
}

/// A password given as pointer + length (NULL with length 0: none).
pub(crate) fn password(p: *const u8, len: usize, what: &str) -> Result<Option<Password>, FfiError> {
    if p.is_null() && len == 0 {
        return Ok(None);
    }
    Ok(Some(Password::new(ffi::bytes(p, len, what)?)))
}

fn parsed<T>(
    s: *const c_char,
    what: &str,
    default: T,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T, FfiError> {
    match ffi::optional_str(s, what)? {
        None => Ok(default),
        Some(v) => parse(v).ok_or_else(|| FfiError::Arg(format!("invalid value '{v}' for {what}"))),
    }
}

impl qcow2_create_options {
    pub(crate) fn defaults() -> qcow2_create_options {
        let d = CreateOptions::default();
        qcow2_create_options {
            cluster_size: d.cluster_size,
            refcount_bits: d.refcount_bits,
            compat: compat_to_c(d.compat),
            backing_file: std::ptr::null(),
            backing_format: std::ptr::null(),
            lazy_refcounts: d.lazy_refcounts,
            extended_l2: d.extended_l2,
            preallocation: match d.preallocation {
                Preallocation::Off => QCOW2_PREALLOC_OFF,
                Preallocation::Metadata => QCOW2_PREALLOC_METADATA,
            },
            compression_type: compression_to_c(d.compression_type),
            encrypt_format: QCOW2_ENCRYPT_NONE,
            password: std::ptr::null(),
            password_len: 0,
            encrypt_cipher_alg: std::ptr::null(),
            encrypt_cipher_mode: std::ptr::null(),
            encrypt_ivgen_alg: std::ptr::null(),
            encrypt_ivgen_hash_alg: std::ptr::null(),
            encrypt_hash_alg: std::ptr::null(),
            encrypt_iter_time_ms: 0,
            backing_password: std::ptr::null(),
            backing_password_len: 0,
            no_backing_open: !d.open_backing,
        }
    }

    fn encryption(&self) -> Result<Option<EncryptionOptions>, FfiError> {
        if self.encrypt_format == QCOW2_ENCRYPT_NONE {
            return Ok(None);
        }
        let pw = password(self.password, self.password_len, "opts->password")?
            .ok_or_else(|| FfiError::Arg("an encrypted image needs opts->password".into()))?;
        let mut e = match self.encrypt_format {
            QCOW2_ENCRYPT_LUKS => EncryptionOptions::luks(pw),
            QCOW2_ENCRYPT_AES => EncryptionOptions::aes(pw),
            v => return Err(bad_value("encrypt_format", v)),
        };
        e.cipher_alg = parsed(
            self.encrypt_cipher_alg,
            "opts->encrypt_cipher_alg",
            e.cipher_alg,
            CipherAlg::parse,
        )?;
        e.cipher_mode = parsed(
            self.encrypt_cipher_mode,
            "opts->encrypt_cipher_mode",
            e.cipher_mode,
            CipherMode::parse,
        )?;
        e.ivgen_alg = parsed(
            self.encrypt_ivgen_alg,
            "opts->encrypt_ivgen_alg",
            e.ivgen_alg,
            IvGenAlg::parse,
        )?;
        e.ivgen_hash_alg = parsed(
            self.encrypt_ivgen_hash_alg,
            "opts->encrypt_ivgen_hash_alg",
            e.ivgen_hash_alg,
            HashAlg::parse,
        )?;
        e.hash_alg = parsed(
            self.encrypt_hash_alg,
            "opts->encrypt_hash_alg",
            e.hash_alg,
            HashAlg::parse,
        )?;
        if self.encrypt_iter_time_ms != 0 {
            e.iter_time_ms = self.encrypt_iter_time_ms;
        }
        Ok(Some(e))
    }

    /// The core's options for an image of `size` bytes.
    pub(crate) fn to_core(self, size: u64) -> Result<CreateOptions, FfiError> {
        let owned =
            |s: *const c_char, what| ffi::optional_str(s, what).map(|s| s.map(str::to_string));
        Ok(CreateOptions {
            size,
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            compat: match self.compat {
                QCOW2_COMPAT_V2 => Compat::V2,
                QCOW2_COMPAT_V3 => Compat::V3,
                v => return Err(bad_value("compat", v)),
            },
            backing_file: owned(self.backing_file, "opts->backing_file")?,
            backing_format: owned(self.backing_format, "opts->backing_format")?,
            lazy_refcounts: self.lazy_refcounts,
            preallocation: match self.preallocation {
                QCOW2_PREALLOC_OFF => Preallocation::Off,
                QCOW2_PREALLOC_METADATA => Preallocation::Metadata,
                v => return Err(bad_value("preallocation", v)),
            },
            extended_l2: self.extended_l2,
            compression_type: match self.compression_type {
                QCOW2_COMPRESSION_ZLIB => CompressionType::Zlib,
                QCOW2_COMPRESSION_ZSTD => CompressionType::Zstd,
                v => return Err(bad_value("compression_type", v)),
            },
            open_backing: !self.no_backing_open,
            encryption: self.encryption()?,
            backing_password: password(
                self.backing_password,
                self.backing_password_len,
                "opts->backing_password",
            )?,
        })
    }
}

/// Options for `qcow2_open_ex`. Initialise it with `qcow2_open_options_init`, then change
/// the fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_open_options {
    /// `QCOW2_OPEN_*` flags, or-ed. Default 0 (read-write, backing chain opened).
    pub flags: u32,
    /// Cache mode (`QCOW2_CACHE_*`). Default `QCOW2_CACHE_WRITEBACK`.
    pub cache_mode: qcow2_cache_mode,
    /// L2 cache size in bytes; 0 (the default) for enough to cover the whole disk, at most 32 MiB.
    pub l2_cache_size: u64,
    /// Refcount cache size in bytes; 0 (the default) for 4 clusters.
    pub refcount_cache_size: u64,
    /// Password of an encrypted image (bytes, not NUL-terminated); NULL for none. Borrowed
    /// for the duration of the call; the image keeps the derived key, never the password.
    pub password: *const u8,
    /// Length of `password` in bytes.
    pub password_len: usize,
    /// Password of the encrypted backing files; NULL for none.
    pub backing_password: *const u8,
    /// Length of `backing_password`.
    pub backing_password_len: usize,
    /// Open an internal snapshot instead of the active disk: a read-only view of what the disk
    /// held when the snapshot was taken. The ID or name of the snapshot (NUL-terminated UTF-8),
    /// looked up as `qemu-img snapshot` looks it up (an ID first, then the first snapshot with
    /// that name). Needs `QCOW2_OPEN_RDONLY`. NULL (the default) for the active disk. Borrowed
    /// for the duration of the call only. A snapshot that does not exist fails the open with
    /// `QCOW2_ERR_NOT_FOUND`.
    pub snapshot: *const c_char,
    /// Which backing files the image (and each file of its chain) may make us open
    /// (`QCOW2_BACKING_*`). Default `QCOW2_BACKING_ANY`, QEMU's behaviour. Use
    /// `QCOW2_BACKING_NONE` or `QCOW2_BACKING_ALLOW` for images from an untrusted source: their
    /// header can name any file (`/etc/shadow`, a device).
    pub backing_policy: qcow2_backing_policy,
    /// With `QCOW2_BACKING_ALLOW`: the allowed directories, `backing_allow_len` NUL-terminated
    /// paths (borrowed for the duration of the call). An empty list refuses every backing file.
    /// Must be NULL/0 with the other policies.
    pub backing_allow: *const *const c_char,
    /// Number of entries in `backing_allow`.
    pub backing_allow_len: usize,
}

impl qcow2_open_options {
    pub(crate) fn defaults() -> qcow2_open_options {
        let d = OpenOptions::default();
        let mut flags = 0;
        if d.read_only {
            flags |= QCOW2_OPEN_RDONLY;
        }
        if !d.open_backing {
            flags |= QCOW2_OPEN_NO_BACKING;
        }
        qcow2_open_options {
            flags,
            cache_mode: match d.cache {
                CacheMode::Writeback => QCOW2_CACHE_WRITEBACK,
                CacheMode::Writethrough => QCOW2_CACHE_WRITETHROUGH,
                CacheMode::None => QCOW2_CACHE_NONE,
                CacheMode::Directsync => QCOW2_CACHE_DIRECTSYNC,
                CacheMode::Unsafe => QCOW2_CACHE_UNSAFE,
            },
            l2_cache_size: d.l2_cache_size.unwrap_or(0),
            refcount_cache_size: d.refcount_cache_size.unwrap_or(0),
            password: std::ptr::null(),
            password_len: 0,
            backing_password: std::ptr::null(),
            backing_password_len: 0,
            snapshot: std::ptr::null(),
            backing_policy: match d.backing {
                BackingPolicy::None => QCOW2_BACKING_NONE,
                BackingPolicy::Allow(_) => QCOW2_BACKING_ALLOW,
                _ => QCOW2_BACKING_ANY,
            },
            backing_allow: std::ptr::null(),
            backing_allow_len: 0,
        }
    }

    fn backing(&self) -> Result<BackingPolicy, FfiError> {
        let dirs = ffi::input_array(
            self.backing_allow,
            self.backing_allow_len,
            "opts->backing_allow",
        )?;
        let policy = match self.backing_policy {
            QCOW2_BACKING_ANY => BackingPolicy::Any,
            QCOW2_BACKING_NONE => BackingPolicy::None,
            QCOW2_BACKING_ALLOW => {
                let mut v = Vec::with_capacity(dirs.len());
                for &d in dirs {
                    v.push(ffi::path(d, "opts->backing_allow[i]")?.to_path_buf());
                }
                return Ok(BackingPolicy::Allow(v));
            }
            v => return Err(bad_value("backing_policy", v)),
        };
        if !dirs.is_empty() {
            return Err(FfiError::Arg(
                "opts->backing_allow is for QCOW2_BACKING_ALLOW only".to_string(),
            ));
        }
        Ok(policy)
    }

    /// The core's options.
    pub(crate) fn to_core(self) -> Result<OpenOptions, FfiError> {
        let flags = self.flags;
        if flags & !OPEN_FLAGS_ALL != 0 {
            return Err(FfiError::Arg(format!(
                "unknown open flags {:#x}",
                flags & !OPEN_FLAGS_ALL
            )));
        }
        let has = |f: u32| flags & f != 0;
        let lazy_refcounts = match (
            has(QCOW2_OPEN_LAZY_REFCOUNTS),
            has(QCOW2_OPEN_NO_LAZY_REFCOUNTS),
        ) {
            (false, false) => None,
            (true, false) => Some(true),
            (false, true) => Some(false),
            (true, true) => {
                return Err(FfiError::Arg(
                    "QCOW2_OPEN_LAZY_REFCOUNTS and QCOW2_OPEN_NO_LAZY_REFCOUNTS are exclusive"
                        .to_string(),
                ))
            }
        };
        let nonzero = |n: u64| (n != 0).then_some(n);
        Ok(OpenOptions {
            read_only: has(QCOW2_OPEN_RDONLY),
            cache: match self.cache_mode {
                QCOW2_CACHE_WRITEBACK => CacheMode::Writeback,
                QCOW2_CACHE_WRITETHROUGH => CacheMode::Writethrough,
                QCOW2_CACHE_NONE => CacheMode::None,
                QCOW2_CACHE_DIRECTSYNC => CacheMode::Directsync,
                QCOW2_CACHE_UNSAFE => CacheMode::Unsafe,
                v => return Err(bad_value("cache_mode", v)),
            },
            l2_cache_size: nonzero(self.l2_cache_size),
            refcount_cache_size: nonzero(self.refcount_cache_size),
            open_backing: !has(QCOW2_OPEN_NO_BACKING),
            backing: self.backing()?,
            lazy_refcounts,
            password: password(self.password, self.password_len, "opts->password")?,
            backing_password: password(
                self.backing_password,
                self.backing_password_len,
                "opts->backing_password",
            )?,
            without_key: has(QCOW2_OPEN_WITHOUT_KEY),
            damaged: has(QCOW2_OPEN_DAMAGED),
            snapshot: ffi::optional_str(self.snapshot, "opts->snapshot")?
                .map(|s| SnapshotRef::IdOrName(s.to_string())),
            force_share: has(QCOW2_OPEN_FORCE_SHARE),
        })
    }
}

fn bad_value(field: &str, v: u32) -> FfiError {
    FfiError::Arg(format!("invalid value {v} for {field}"))
}

pub(crate) fn compat_to_c(c: Compat) -> qcow2_compat {
    match c {
        Compat::V2 => QCOW2_COMPAT_V2,
        Compat::V3 => QCOW2_COMPAT_V3,
    }
}

pub(crate) fn compression_to_c(c: CompressionType) -> qcow2_compression_type {
    match c {
        CompressionType::Zlib => QCOW2_COMPRESSION_ZLIB,
        CompressionType::Zstd => QCOW2_COMPRESSION_ZSTD,
    }
}

/// Fill `*out` with the defaults of `qemu-img create -f qcow2` (64 KiB clusters, 16-bit refcounts,
/// v3, no backing file, zlib).
///
/// Ownership: `out` belongs to the caller. Thread safety: any thread.
/// Fails with `QCOW2_ERR_INVALID_ARGUMENT` if `out` is NULL.
#[no_mangle]
pub extern "C" fn qcow2_create_options_init(out: *mut qcow2_create_options) -> qcow2_error {
    boundary("qcow2_create_options_init", || {
        ffi::out(out, "out")?.write(qcow2_create_options::defaults());
        Ok(())
    })
}

/// Fill `*out` with the default open options: read-write, writeback cache, default cache sizes,
/// backing chain opened, lazy refcounts as the image header says, the active disk (no snapshot).
///
/// Ownership: `out` belongs to the caller. Thread safety: any thread.
/// Fails with `QCOW2_ERR_INVALID_ARGUMENT` if `out` is NULL.
#[no_mangle]
pub extern "C" fn qcow2_open_options_init(out: *mut qcow2_open_options) -> qcow2_error {
    boundary("qcow2_open_options_init", || {
        ffi::out(out, "out")?.write(qcow2_open_options::defaults());
        Ok(())
    })
}
