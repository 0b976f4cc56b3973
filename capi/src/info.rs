//! Facts about an image: info, its strings, the allocation map, and the consistency check.

use std::ffi::{c_char, CStr};

use qcow2rs::{ImageInfo, RepairMode};

use crate::error::{qcow2_error, FfiError};
use crate::ffi::{self, boundary};
use crate::image::qcow2_image;
use crate::options::{compat_to_c, compression_to_c, qcow2_compat, qcow2_compression_type};

/// Encryption method (`QCOW2_CRYPT_*`).
pub type qcow2_crypt_method = u32;
/// Not encrypted.
pub const QCOW2_CRYPT_NONE: qcow2_crypt_method = 0;
/// Legacy AES-CBC encryption.
pub const QCOW2_CRYPT_AES: qcow2_crypt_method = 1;
/// LUKS encryption.
pub const QCOW2_CRYPT_LUKS: qcow2_crypt_method = 2;

/// Facts about an open image, as `qemu-img info` shows them. Strings (file name, backing file) are
/// read with `qcow2_filename`, `qcow2_backing_file`, `qcow2_backing_format` and
/// `qcow2_full_backing_filename`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_image_info {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Bytes the host file occupies on disk.
    pub actual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Version (`QCOW2_COMPAT_*`).
    pub compat: qcow2_compat,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Compression type (`QCOW2_COMPRESSION_*`).
    pub compression_type: qcow2_compression_type,
    /// Encryption method (`QCOW2_CRYPT_*`).
    pub crypt_method: qcow2_crypt_method,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// Lazy refcounts bit.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit (lazy refcounts in use and not cleanly closed).
    pub dirty: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// The image is open read-only.
    pub read_only: bool,
    /// The image has a backing file.
    pub has_backing_file: bool,
}

impl From<&ImageInfo> for qcow2_image_info {
    fn from(i: &ImageInfo) -> qcow2_image_info {
        qcow2_image_info {
            virtual_size: i.virtual_size,
            actual_size: i.actual_size,
            cluster_size: i.cluster_size,
            compat: compat_to_c(i.compat),
            refcount_bits: i.refcount_bits,
            compression_type: compression_to_c(i.compression_type),
            crypt_method: i.crypt_method,
            snapshot_count: i.snapshot_count,
            lazy_refcounts: i.lazy_refcounts,
            corrupt: i.corrupt,
            dirty: i.dirty,
            extended_l2: i.extended_l2,
            read_only: i.read_only,
            has_backing_file: i.backing_file.is_some(),
        }
    }
}

/// Store facts about the image in `*out`.
///
/// Ownership: `out` belongs to the caller. Thread safety: may run concurrently with any call on the
/// same handle but `qcow2_close`. On failure returns the code and leaves `*out` untouched.
#[no_mangle]
pub extern "C" fn qcow2_info(img: *const qcow2_image, out: *mut qcow2_image_info) -> qcow2_error {
    boundary("qcow2_info", || {
        let image = ffi::image(img)?;
        let out = ffi::out(out, "out")?;
        out.write(qcow2_image_info::from(&image.info()?));
        Ok(())
    })
}

/// The body shared by the string getters: copy one string of the image's info out.
fn info_string(
    img: *const qcow2_image,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
    field: fn(&ImageInfo) -> Option<&str>,
) -> Result<(), FfiError> {
    let image = ffi::image(img)?;
    let dst = ffi::str_out(buf, len, "buf")?;
    let out_len = ffi::out(out_len, "out_len")?;
    let info = image.info()?;
    out_len.write(dst.write(field(&info).unwrap_or(""))?);
    Ok(())
}

/// Copy the file name the image was opened with into `buf` (NUL-terminated) and store its length
/// (without the NUL) in `*out_len`. With `buf == NULL && len == 0`, only stores the length.
///
/// Ownership: `buf` and `out_len` belong to the caller. Thread safety: may run concurrently with any
/// call on the same handle but `qcow2_close`. Fails with `QCOW2_ERR_BUFFER_TOO_SMALL` when `len` is
/// not more than the length; on any failure writes neither `buf` nor `*out_len`.
#[no_mangle]
pub extern "C" fn qcow2_filename(
    img: *const qcow2_image,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> qcow2_error {
    boundary("qcow2_filename", || {
        info_string(img, buf, len, out_len, |i| Some(&i.filename))
    })
}

/// Copy the backing file name as stored in the image into `buf`; the empty string when there is
/// none. Otherwise as `qcow2_filename`.
#[no_mangle]
pub extern "C" fn qcow2_backing_file(
    img: *const qcow2_image,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> qcow2_error {
    boundary("qcow2_backing_file", || {
        info_string(img, buf, len, out_len, |i| i.backing_file.as_deref())
    })
}

/// Copy the backing file format as stored in the image ("qcow2", "raw") into `buf`; the empty
/// string when none is stored. Otherwise as `qcow2_filename`.
#[no_mangle]
pub extern "C" fn qcow2_backing_format(
    img: *const qcow2_image,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> qcow2_error {
    boundary("qcow2_backing_format", || {
        info_string(img, buf, len, out_len, |i| i.backing_format.as_deref())
    })
}

/// Copy the backing file name resolved against the image's directory into `buf`; the empty string
/// when there is no backing file. Otherwise as `qcow2_filename`.
#[no_mangle]
pub extern "C" fn qcow2_full_backing_filename(
    img: *const qcow2_image,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> qcow2_error {
    boundary("qcow2_full_backing_filename", || {
        info_string(img, buf, len, out_len, |i| {
            i.full_backing_filename.as_deref()
        })
    })
}

/// One extent of the guest address space, as `qemu-img map --output=json` shows it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_map_entry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Host offset in the file at `depth`, for uncompressed data (valid when `has_offset`).
    pub offset: u64,
    /// Backing-chain depth the data comes from (0 = this image; the chain length when unallocated).
    pub depth: u32,
    /// Some image in the chain holds it.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (allocated).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// `offset` is valid.
    pub has_offset: bool,
}

/// Describe how the guest range `[offset, offset + len)` is stored: fill `entries` (room for
/// `max_entries`) with the first merged extents, in order, and store how many were written in
/// `*out_count`. When the range needs more extents than fit, the result is cut short: continue
/// from `entries[n - 1].start + entries[n - 1].length`.
///
/// Ownership: `entries` and `out_count` belong to the caller. Thread safety: may run concurrently
/// with any call on the same handle but `qcow2_close`. On failure (`QCOW2_ERR_INVALID_ARGUMENT` for
/// `max_entries == 0` with a non-empty range, NULL pointers or a range past the end, ...) returns the
/// code and writes neither `entries` nor `*out_count`.
#[no_mangle]
pub extern "C" fn qcow2_map(
    img: *const qcow2_image,
    offset: u64,
    len: u64,
    entries: *mut qcow2_map_entry,
    max_entries: usize,
    out_count: *mut usize,
) -> qcow2_error {
    boundary("qcow2_map", || {
        let image = ffi::image(img)?;
        let entries = ffi::out_array(entries, max_entries, "entries")?;
        let out_count = ffi::out(out_count, "out_count")?;
        if entries.is_empty() && len != 0 {
            return Err(FfiError::Arg("max_entries is 0".to_string()));
        }
        let map = image.map(offset, len)?;
        let n = map.len().min(entries.len());
        for (dst, e) in entries.iter_mut().zip(&map) {
            dst.write(qcow2_map_entry {
                start: e.start,
                length: e.length,
                offset: e.offset.unwrap_or(0),
                depth: e.depth,
                present: e.present,
                zero: e.zero,
                data: e.data,
                compressed: e.compressed,
                has_offset: e.offset.is_some(),
            });
        }
        out_count.write(n);
        Ok(())
    })
}

/// What `qcow2_check` may repair (`QCOW2_REPAIR_*`).
pub type qcow2_repair_mode = u32;
/// Check only.
pub const QCOW2_REPAIR_NONE: qcow2_repair_mode = 0;
/// Lower refcounts that are too high (leaked clusters).
pub const QCOW2_REPAIR_LEAKS: qcow2_repair_mode = 1;
/// Repair leaks and corruptions.
pub const QCOW2_REPAIR_ALL: qcow2_repair_mode = 2;

/// The result of `qcow2_check`, classified as `qemu-img check` classifies problems.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_check_report {
    /// Problems classified as corruptions (left after repair).
    pub corruptions: u64,
    /// Leaked clusters (left after repair).
    pub leaks: u64,
    /// Errors that prevented the check itself (I/O errors while reading metadata).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters (virtual size / cluster size, rounded up), as qemu-img counts them.
    pub total_clusters: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not physically following their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Highest host offset in use, rounded to a cluster.
    pub image_end_offset: u64,
    /// qemu-img's exit code for this result: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub exit_code: i32,
    /// The repair rebuilt the refcount structures.
    pub rebuilt: bool,
}

/// Check the image's consistency and, with `repair` other than `QCOW2_REPAIR_NONE`, fix what the mode
/// allows (the image must be open read-write). Stores the result in `*out`. Finding problems is
/// not a failure: look at `out->exit_code`.
///
/// Ownership: `out` belongs to the caller. Thread safety: may run concurrently with any call on the
/// same handle but `qcow2_close`. On failure (`QCOW2_ERR_READ_ONLY` for repair on a read-only
/// image, `QCOW2_ERR_IO`, ...) returns the code and leaves `*out` untouched.
#[no_mangle]
pub extern "C" fn qcow2_check(
    img: *mut qcow2_image,
    repair: qcow2_repair_mode,
    out: *mut qcow2_check_report,
) -> qcow2_error {
    boundary("qcow2_check", || {
        let image = ffi::image(img)?;
        let repair = match repair {
            QCOW2_REPAIR_NONE => None,
            QCOW2_REPAIR_LEAKS => Some(RepairMode::Leaks),
            QCOW2_REPAIR_ALL => Some(RepairMode::All),
            v => return Err(FfiError::Arg(format!("invalid value {v} for repair"))),
        };
        let out = ffi::out(out, "out")?;
        let r = image.check(repair)?;
        out.write(qcow2_check_report {
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            corruptions_fixed: r.corruptions_fixed,
            leaks_fixed: r.leaks_fixed,
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            image_end_offset: r.image_end_offset,
            exit_code: r.exit_code(),
            rebuilt: r.rebuilt,
        });
        Ok(())
    })
}

/// For an image opened with `QCOW2_OPEN_DAMAGED`: copy what the open found cut short by the end
/// of the file (tables read as zeros past it), one line per table separated by '\n', into `buf`
/// (NUL-terminated) and store its length in `*out_len`; the empty string when nothing is damaged
/// (always for other opens). Otherwise as `qcow2_filename`.
///
/// Ownership: `buf` and `out_len` belong to the caller. Thread safety: may run concurrently with
/// any call on the same handle but `qcow2_close`. On failure (`QCOW2_ERR_BUFFER_TOO_SMALL`,
/// `QCOW2_ERR_INVALID_ARGUMENT`) writes neither `buf` nor `*out_len`.
#[no_mangle]
pub extern "C" fn qcow2_damage(
    img: *const qcow2_image,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> qcow2_error {
    boundary("qcow2_damage", || {
        let image = ffi::image(img)?;
        let dst = ffi::str_out(buf, len, "buf")?;
        let out_len = ffi::out(out_len, "out_len")?;
        out_len.write(dst.write(&image.damage().join("\n"))?);
        Ok(())
    })
}

/// Number of key slots in a LUKS header.
pub const QCOW2_LUKS_SLOTS: usize = 8;
/// Bytes of `qcow2_crypt_info.uuid`: a LUKS UUID (36 characters) and its NUL, with room to
/// spare (the LUKS header's own field is 40 bytes).
pub const QCOW2_UUID_SIZE: usize = 40;

/// One LUKS key slot, as `qemu-img info` shows it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_luks_slot {
    /// Key slot offset in the LUKS header area, in bytes.
    pub key_offset: u64,
    /// PBKDF2 iterations (0 for an inactive slot).
    pub iters: u32,
    /// Anti-forensic stripes (0 for an inactive slot).
    pub stripes: u32,
    /// The slot holds a password.
    pub active: bool,
}

/// How an image is encrypted: the `encrypt` block of `qemu-img info --output=json`. The
/// strings are static (never freed, valid for the life of the process); they and the LUKS
/// fields are NULL / 0 unless `crypt_method` is `QCOW2_CRYPT_LUKS`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_crypt_info {
    /// Encryption method (`QCOW2_CRYPT_*`).
    pub crypt_method: qcow2_crypt_method,
    /// PBKDF2 iterations of the master key digest.
    pub master_key_iters: u32,
    /// Cipher: "aes-128", "aes-192" or "aes-256".
    pub cipher_alg: *const c_char,
    /// Cipher mode: "xts" or "cbc".
    pub cipher_mode: *const c_char,
    /// IV generator: "plain", "plain64" or "essiv".
    pub ivgen_alg: *const c_char,
    /// ESSIV hash ("sha256", ...); NULL unless `ivgen_alg` is "essiv".
    pub ivgen_hash_alg: *const c_char,
    /// PBKDF2 and anti-forensic hash ("sha1", "sha256", ...).
    pub hash_alg: *const c_char,
    /// Size of the LUKS header area in bytes (where the encrypted payload starts in it).
    pub payload_offset: u64,
    /// The volume UUID, NUL-terminated.
    pub uuid: [c_char; QCOW2_UUID_SIZE],
    /// The eight key slots.
    pub slots: [qcow2_luks_slot; QCOW2_LUKS_SLOTS],
}

/// Every algorithm name the core gives (`as_str` of `CipherAlg`, `CipherMode`, `IvGenAlg`,
/// `HashAlg`), as static C strings: what `qcow2_crypt_info` points to.
const ALGORITHM_NAMES: &[&CStr] = &[
    c"aes-128", c"aes-192", c"aes-256", c"xts", c"cbc", c"plain", c"plain64", c"essiv", c"sha1",
    c"sha224", c"sha256", c"sha384", c"sha512",
];

/// The static C string of an algorithm name; a name missing from the table (an algorithm added
/// to the core but not here) is reported, not replaced.
fn static_c_name(name: &str) -> Result<*const c_char, FfiError> {
    ALGORITHM_NAMES
        .iter()
        .find(|c| c.to_bytes() == name.as_bytes())
        .map(|c| c.as_ptr())
        .ok_or_else(|| FfiError::Panic(format!("algorithm {name:?} has no C name")))
}

/// Store how the image is encrypted in `*out` (also for an image opened with
/// `QCOW2_OPEN_WITHOUT_KEY`; for a plain image `crypt_method` is `QCOW2_CRYPT_NONE` and the rest
/// is empty). Key slots are as `qcow2_luks_add_key`/`qcow2_luks_remove_key` left them.
///
/// Ownership: `out` belongs to the caller; the strings it receives are static. Thread safety: may
/// run concurrently with any call on the same handle but `qcow2_close`. On failure returns the
/// code and leaves `*out` untouched.
#[no_mangle]
pub extern "C" fn qcow2_encryption_info(
    img: *const qcow2_image,
    out: *mut qcow2_crypt_info,
) -> qcow2_error {
    boundary("qcow2_encryption_info", || {
        let image = ffi::image(img)?;
        let out = ffi::out(out, "out")?;
        let info = image.info()?;
        let empty_slot = qcow2_luks_slot {
            key_offset: 0,
            iters: 0,
            stripes: 0,
            active: false,
        };
        let mut e = qcow2_crypt_info {
            crypt_method: info.crypt_method,
            master_key_iters: 0,
            cipher_alg: std::ptr::null(),
            cipher_mode: std::ptr::null(),
            ivgen_alg: std::ptr::null(),
            ivgen_hash_alg: std::ptr::null(),
            hash_alg: std::ptr::null(),
            payload_offset: 0,
            uuid: [0; QCOW2_UUID_SIZE],
            slots: [empty_slot; QCOW2_LUKS_SLOTS],
        };
        if let Some(l) = info.encryption.as_ref().and_then(|e| e.luks.as_ref()) {
            e.master_key_iters = l.master_key_iters;
            e.cipher_alg = static_c_name(l.cipher_alg.as_str())?;
            e.cipher_mode = static_c_name(l.cipher_mode.as_str())?;
            e.ivgen_alg = static_c_name(l.ivgen_alg.as_str())?;
            e.ivgen_hash_alg = match l.ivgen_hash_alg {
                Some(h) => static_c_name(h.as_str())?,
                None => std::ptr::null(),
            };
            e.hash_alg = static_c_name(l.hash_alg.as_str())?;
            e.payload_offset = l.payload_offset;
            if l.uuid.len() >= QCOW2_UUID_SIZE || l.uuid.as_bytes().contains(&0) {
                return Err(FfiError::Arg(format!(
                    "{}: the LUKS UUID is not a string of at most {} bytes",
                    image.filename(),
                    QCOW2_UUID_SIZE - 1
                )));
            }
            for (d, s) in e.uuid.iter_mut().zip(l.uuid.bytes()) {
                *d = s as c_char;
            }
            for (d, s) in e.slots.iter_mut().zip(&l.slots) {
                *d = qcow2_luks_slot {
                    key_offset: s.key_offset,
                    iters: s.iters.unwrap_or(0),
                    stripes: s.stripes.unwrap_or(0),
                    active: s.active,
                };
            }
        }
        out.write(e);
        Ok(())
    })
}

/// A file format (`QCOW2_FORMAT_*`), as `qcow2_probe_format` finds it.
pub type qcow2_format = u32;
/// A qcow2 image.
pub const QCOW2_FORMAT_QCOW2: qcow2_format = 1;
/// Anything else: a raw image.
pub const QCOW2_FORMAT_RAW: qcow2_format = 2;

/// Find the format of the file at `path` from its first bytes, as QEMU probes it: the qcow2
/// magic gives `QCOW2_FORMAT_QCOW2`, anything else `QCOW2_FORMAT_RAW`. Never blocks: a FIFO or a
/// socket is refused.
///
/// Ownership: `path` is borrowed for the call; `out` belongs to the caller. Thread safety: any
/// thread. On failure returns the code (`QCOW2_ERR_IO` with errno `ENOENT` for a missing file,
/// `QCOW2_ERR_INVALID_ARGUMENT` for NULL arguments, a FIFO or a socket) and leaves `*out`
/// untouched.
#[no_mangle]
pub extern "C" fn qcow2_probe_format(path: *const c_char, out: *mut qcow2_format) -> qcow2_error {
    boundary("qcow2_probe_format", || {
        let path = ffi::path(path, "path")?;
        let out = ffi::out(out, "out")?;
        out.write(match qcow2rs::probe_format(path)? {
            qcow2rs::Format::Qcow2 => QCOW2_FORMAT_QCOW2,
            qcow2rs::Format::Raw => QCOW2_FORMAT_RAW,
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2rs::{CipherAlg, CipherMode, HashAlg, IvGenAlg};

    #[test]
    fn every_algorithm_has_a_static_c_name() {
        let names = ["aes-128", "aes-192", "aes-256"]
            .map(|n| CipherAlg::parse(n).unwrap().as_str())
            .into_iter()
            .chain(["xts", "cbc"].map(|n| CipherMode::parse(n).unwrap().as_str()))
            .chain(["plain", "plain64", "essiv"].map(|n| IvGenAlg::parse(n).unwrap().as_str()))
            .chain(
                ["sha1", "sha224", "sha256", "sha384", "sha512"]
                    .map(|n| HashAlg::parse(n).unwrap().as_str()),
            );
        for n in names {
            let p = static_c_name(n).unwrap();
            // SAFETY: the table holds static NUL-terminated strings.
            assert_eq!(unsafe { CStr::from_ptr(p) }.to_str().unwrap(), n);
        }
        assert!(static_c_name("des").is_err());
    }
}
