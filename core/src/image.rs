//! The image: open/create, read/write/zeroes/discard/flush/resize, info and map.

use std::path::Path;
use std::sync::Arc;

use crate::check::{CheckReport, RepairMode};
use crate::error::Result;
use crate::options::{Compat, CompressionType, CreateOptions, OpenOptions};
use crate::storage::Storage;

/// Facts about an image, as `qemu-img info` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name the image was opened with.
    pub filename: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Bytes the host file occupies on disk.
    pub actual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Version.
    pub compat: Compat,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts bit.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit (lazy refcounts in use and not cleanly closed).
    pub dirty: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// Backing file format as stored in the image.
    pub backing_format: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Encryption method (0 none, 1 AES, 2 LUKS).
    pub crypt_method: u32,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// Whether the image is open read-only.
    pub read_only: bool,
}

/// One extent of the guest address space, as `qemu-img map --output=json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Backing-chain depth the data comes from (0 = this image; the chain length when unallocated).
    pub depth: u32,
    /// Whether some image in the chain holds it.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (allocated).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the file at `depth`, for uncompressed data.
    pub offset: Option<u64>,
}

/// An open qcow2 image. `Send + Sync`: share it between threads with `Arc`.
pub struct Image {
    _p: (),
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").finish_non_exhaustive()
    }
}

impl Image {
    /// Create a new image file at `path` (truncating an existing one).
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let _ = (path, opts);
        todo!()
    }
    /// Create a new image on `storage` (which should be empty). `name` is used in messages and to
    /// resolve a relative backing file name.
    pub fn create_on(storage: Arc<dyn Storage>, name: &str, opts: &CreateOptions) -> Result<()> {
        let _ = (storage, name, opts);
        todo!()
    }
    /// Open an image file.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let _ = (path, opts);
        todo!()
    }
    /// Open an image on `storage`. `name` is used in messages and to resolve backing files.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        name: &str,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let _ = (storage, name, opts);
        todo!()
    }
    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        todo!()
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        todo!()
    }
    /// Whether the image is open read-only.
    pub fn is_read_only(&self) -> bool {
        todo!()
    }
    /// Read `buf.len()` bytes at guest `offset`. The range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        todo!()
    }
    /// Write `buf` at guest `offset`. The range must lie within the virtual size.
    /// Durable after the next [`Image::flush`] (or at once in write-through modes).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        todo!()
    }
    /// Make `len` bytes at `offset` read as zeros, as cheaply as the format allows
    /// (zero clusters in v3; explicit zeros where needed).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        todo!()
    }
    /// Discard whole clusters inside the range: they are freed (and punched out of the host file)
    /// and read as zeros afterwards, or from the backing file in a v2 image with one.
    /// Partial clusters at the ends are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        todo!()
    }
    /// Write compressed data for whole cluster(s) at a cluster-aligned `offset`. `data` is at most
    /// one cluster (less only for the last cluster of the disk). Clusters that do not compress are
    /// written normally. The target cluster must not be allocated. Compression runs outside the
    /// image lock, so several threads calling this compress in parallel.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _ = (offset, data);
        todo!()
    }
    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        todo!()
    }
    /// Change the virtual size. Shrinking requires the cut-off tail to be unallocated.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        todo!()
    }
    /// Facts about the image.
    pub fn info(&self) -> Result<ImageInfo> {
        todo!()
    }
    /// How the guest range `[offset, offset+len)` is stored, as merged extents.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let _ = (offset, len);
        todo!()
    }
    /// Check consistency; with `repair`, fix what the mode allows (the image must be writable).
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let _ = repair;
        todo!()
    }
    /// Number of fdatasyncs issued on the image file so far.
    pub fn sync_count(&self) -> u64 {
        todo!()
    }
    /// Flush and close. Dropping an image also flushes, but cannot report errors.
    pub fn close(self) -> Result<()> {
        todo!()
    }
}
