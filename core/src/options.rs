//! Options for creating and opening images.

use crate::crypto::{EncryptionOptions, Password};
use crate::error::{Error, Result};

/// qcow2 version to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// qcow2 version 2 (`compat=0.10`).
    V2,
    /// qcow2 version 3 (`compat=1.1`), the default.
    #[default]
    V3,
}

impl Compat {
    /// Parse qemu-img's spelling: `0.10`, `1.1`, `v2`, `v3`.
    pub fn parse(s: &str) -> Result<Compat> {
        match s {
            "0.10" | "v2" | "2" => Ok(Compat::V2),
            "1.1" | "v3" | "3" => Ok(Compat::V3),
            _ => Err(Error::invalid(format!(
                "Invalid compatibility level: '{s}' (use 0.10 or 1.1)"
            ))),
        }
    }
    /// qemu-img's spelling of the level (`0.10` or `1.1`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

/// Compression algorithm for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (qemu's `zlib`), the default.
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// Parse `zlib` or `zstd`.
    pub fn parse(s: &str) -> Result<CompressionType> {
        match s {
            "zlib" => Ok(CompressionType::Zlib),
            "zstd" => Ok(CompressionType::Zstd),
            _ => Err(Error::invalid(format!(
                "Invalid compression type: '{s}' (use zlib or zstd)"
            ))),
        }
    }
    /// `zlib` or `zstd`.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Preallocation mode at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing is preallocated.
    #[default]
    Off,
    /// All L2 tables and data clusters are allocated (data clusters as preallocated zero clusters).
    Metadata,
}

impl Preallocation {
    /// Parse `off` or `metadata`.
    pub fn parse(s: &str) -> Result<Preallocation> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            _ => Err(Error::invalid(format!(
                "Unsupported preallocation mode: '{s}' (use off or metadata)"
            ))),
        }
    }
}

/// Options for [`crate::Image::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// Cluster size: a power of two from 512 to 2 MiB. Default 64 KiB.
    pub cluster_size: u32,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 bits. Default 16. Version 2 requires 16.
    pub refcount_bits: u32,
    /// Version. Default v3.
    pub compat: Compat,
    /// Backing file name, stored as given (relative names are relative to the image's directory).
    pub backing_file: Option<String>,
    /// Backing file format (`qcow2` or `raw`); required with a backing file, like qemu-img.
    pub backing_format: Option<String>,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Extended L2 entries (subclusters; v3 only, cluster size at least 16 KiB).
    pub extended_l2: bool,
    /// Compression type for compressed clusters (zstd needs v3).
    pub compression_type: CompressionType,
    /// Open the backing file to check it and take its size and format (default true, like
    /// qemu-img without `-u`). When false, `size` and `backing_format` must be given.
    pub open_backing: bool,
    /// Encrypt the image (LUKS or legacy AES).
    pub encryption: Option<EncryptionOptions>,
    /// The password of an encrypted backing file (to check it when it is opened).
    pub backing_password: Option<Password>,
}

impl CreateOptions {
    /// Defaults like `qemu-img create -f qcow2 FILE SIZE`.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V3,
            backing_file: None,
            backing_format: None,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            open_backing: true,
            encryption: None,
            backing_password: None,
        }
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions::new(0)
    }
}

/// Cache mode, named as QEMU names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Durable at `flush` (default).
    #[default]
    Writeback,
    /// Durable when each write returns.
    Writethrough,
    /// O_DIRECT, durable at `flush`.
    None,
    /// O_DIRECT, durable when each write returns.
    Directsync,
    /// Flushes are ignored; one sync at close.
    Unsafe,
}

impl CacheMode {
    /// Parse qemu's names: `writeback`, `writethrough`, `none`, `directsync`, `unsafe`.
    pub fn parse(s: &str) -> Result<CacheMode> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "writethrough" => Ok(CacheMode::Writethrough),
            "none" | "off" => Ok(CacheMode::None),
            "directsync" => Ok(CacheMode::Directsync),
            "unsafe" => Ok(CacheMode::Unsafe),
            _ => Err(Error::invalid(format!("Invalid cache option: {s}"))),
        }
    }
    /// The name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::None => "none",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
    /// Whether the host file is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    /// Whether every write is made durable before it returns.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
}

/// Which backing files an image may make us open ([`OpenOptions::backing`]).
///
/// The name of a backing file comes from the image's header, so an image from an untrusted
/// source can name any file on the host: `/etc/shadow`, a device, a FIFO. The policy applies to
/// every file of the chain (a backing file's own backing file too).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Open whatever the header names, as QEMU does (regular files and devices), except what
    /// cannot be a backing file and could hang the open: FIFOs and sockets are refused, and
    /// nothing is opened in a way that blocks. The default.
    #[default]
    Any,
    /// Never open a backing file: clusters the image does not allocate read as zeros (as QEMU
    /// reads them with `backing=null`). The same as `open_backing: false`.
    None,
    /// Open only regular files whose real path (symbolic links and `..` resolved, on the file
    /// actually opened) lies under one of these directories; devices and anything under
    /// `/proc`, `/sys` or `/dev` are refused too. A refused file fails the open with
    /// [`crate::Error::Backing`] (`PermissionDenied`), naming the image, the backing name and
    /// the policy (FIFOs, sockets and directories fail with `InvalidInput`, as under every
    /// policy). An empty list refuses every backing file.
    Allow(Vec<std::path::PathBuf>),
}

/// Options for [`crate::Image::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// L2 cache size in bytes (default: enough to cover the whole disk, at most 32 MiB).
    pub l2_cache_size: Option<u64>,
    /// Refcount cache size in bytes (default: 4 clusters).
    pub refcount_cache_size: Option<u64>,
    /// Open the backing chain (default true). Without it, unallocated clusters read as zeros.
    /// `false` is the same as [`BackingPolicy::None`], whatever `backing` says.
    pub open_backing: bool,
    /// Which backing files the image may make us open (default [`BackingPolicy::Any`], QEMU's
    /// behaviour). Use [`BackingPolicy::None`] or [`BackingPolicy::Allow`] for images from an
    /// untrusted source.
    pub backing: BackingPolicy,
    /// Use lazy refcounts regardless of the image's header bit (`Some(true/false)`).
    pub lazy_refcounts: Option<bool>,
    /// The password of an encrypted image (`encrypt.key-secret`).
    pub password: Option<Password>,
    /// The password of encrypted backing files (each file of the chain below this one).
    pub backing_password: Option<Password>,
    /// Open an encrypted image without its password, for inspection: `info`, `map` and `check`
    /// work; reading or writing guest data fails with [`Error::NeedKey`]. Encrypted backing
    /// files are then opened without their key too, unless `backing_password` is given.
    pub without_key: bool,
    /// Open a damaged image for inspection and rescue: an L1, refcount or snapshot table that
    /// lies (partly) past the end of a truncated file reads as zeros where the file ends, as
    /// QEMU reads it, instead of failing the open. Needs `read_only`. `check` then reports the
    /// damage (as qemu-img check does); reading a cluster that the file no longer holds still
    /// fails with [`crate::Error::Corrupt`], naming the guest offset.
    pub damaged: bool,
    /// Open an internal snapshot instead of the active disk: a read-only view of what the
    /// disk held when the snapshot was taken (`qemu-img convert -l`). Needs `read_only`.
    pub snapshot: Option<crate::SnapshotRef>,
    /// Share the image with every other user, even writers (`qemu-img -U`, `force-share=on`):
    /// only a user that does not share reading conflicts. Needs `read_only`. What is read may
    /// be inconsistent while someone else writes the image. See [`crate::LockMode`].
    pub force_share: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            l2_cache_size: None,
            refcount_cache_size: None,
            open_backing: true,
            backing: BackingPolicy::Any,
            lazy_refcounts: None,
            password: None,
            backing_password: None,
            without_key: false,
            damaged: false,
            snapshot: None,
            force_share: false,
        }
    }
}

impl OpenOptions {
    /// The locks an open with these options takes (for a file opened outside the library, such
    /// as a raw image, through [`crate::storage::Storage::lock`]).
    pub fn lock_mode(&self) -> crate::LockMode {
        match (self.read_only, self.force_share) {
            (false, _) => crate::LockMode::ReadWrite,
            (true, false) => crate::LockMode::ReadOnly,
            (true, true) => crate::LockMode::ForceShare,
        }
    }
    /// Read-write defaults.
    pub fn new() -> OpenOptions {
        OpenOptions::default()
    }
    /// Read-only defaults.
    pub fn read_only() -> OpenOptions {
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        }
    }
    /// The backing policy in force: `open_backing: false` means [`BackingPolicy::None`].
    pub fn backing_policy(&self) -> BackingPolicy {
        if self.open_backing {
            self.backing.clone()
        } else {
            BackingPolicy::None
        }
    }
}
