//! Internal snapshots: list, create, apply (revert to), delete, and the snapshot an image shows.
//!
//! Strings (a snapshot's ID and name) come out as the info getters give them: copied into caller
//! buffers, NUL-terminated, with their lengths in the result; a NULL buffer of length 0 asks for
//! the length only. To open a read-only view of a snapshot, set `qcow2_open_options.snapshot`.

use std::ffi::c_char;

use qcow2rs::{SnapshotInfo, SnapshotOptions};

use crate::error::{qcow2_error, FfiError};
use crate::ffi::{self, boundary, StrOut};
use crate::image::qcow2_image;

/// Bytes that always hold the ID of a snapshot this library creates, with its NUL: new IDs are
/// decimal numbers (the highest numeric ID plus one, QEMU's rule) of at most 20 digits. The size
/// `qcow2_snapshot_create` requires of its `id_buf`. IDs written by other programs may be longer.
pub const QCOW2_SNAPSHOT_ID_SIZE: usize = 32;

/// One internal snapshot, as `qemu-img snapshot -l` lists it. Its ID and name are copied into
/// the caller's buffers by the function that fills this struct; their lengths are here.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_snapshot_info {
    /// Length of the ID in bytes, without the NUL terminator.
    pub id_len: usize,
    /// Length of the name in bytes, without the NUL terminator.
    pub name_len: usize,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// The guest clock when the snapshot was taken, in nanoseconds (0 for disk-only snapshots).
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (0 for disk-only snapshots, such as `qemu-img snapshot -c` makes).
    pub vm_state_size: u64,
    /// The virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// The instruction count (record/replay), valid when `has_icount`.
    pub icount: u64,
    /// `icount` is recorded (`qemu-img snapshot -l` shows it; QEMU stores -1 for none).
    pub has_icount: bool,
}

impl From<&SnapshotInfo> for qcow2_snapshot_info {
    fn from(s: &SnapshotInfo) -> qcow2_snapshot_info {
        qcow2_snapshot_info {
            id_len: s.id.len(),
            name_len: s.name.len(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            vm_state_size: s.vm_state_size,
            disk_size: s.disk_size,
            icount: s.icount.unwrap_or(0),
            has_icount: s.icount.is_some(),
        }
    }
}

/// What `qcow2_snapshot_create` records besides the name. Initialise it with
/// `qcow2_snapshot_options_init`, then change the fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct qcow2_snapshot_options {
    /// Record `date_sec`/`date_nsec` as the creation time. Default false: the time of the call.
    pub has_date: bool,
    /// Creation time to record: seconds since the Unix epoch (with `has_date`).
    pub date_sec: u32,
    /// Creation time to record: nanoseconds (with `has_date`).
    pub date_nsec: u32,
    /// The guest clock to record, in nanoseconds. Default 0.
    pub vm_clock_nsec: u64,
    /// The instruction count to record, with `has_icount`. Default 0.
    pub icount: u64,
    /// Record `icount`; false records none (QEMU's -1). Default true.
    pub has_icount: bool,
}

impl qcow2_snapshot_options {
    fn defaults() -> qcow2_snapshot_options {
        let d = SnapshotOptions::new("");
        qcow2_snapshot_options {
            has_date: d.date.is_some(),
            date_sec: d.date.map_or(0, |(s, _)| s),
            date_nsec: d.date.map_or(0, |(_, n)| n),
            vm_clock_nsec: d.vm_clock_nsec,
            icount: d.icount.unwrap_or(0),
            has_icount: d.icount.is_some(),
        }
    }

    /// The core's options for a snapshot named `name`.
    fn to_core(self, name: &str) -> SnapshotOptions {
        SnapshotOptions {
            name: name.to_string(),
            date: self.has_date.then_some((self.date_sec, self.date_nsec)),
            vm_clock_nsec: self.vm_clock_nsec,
            icount: self.has_icount.then_some(self.icount),
        }
    }
}

/// Fill `*out` with what `qemu-img snapshot -c` records: the time of the call, VM clock 0,
/// icount 0.
///
/// Ownership: `out` belongs to the caller. Thread safety: any thread.
/// Fails with `QCOW2_ERR_INVALID_ARGUMENT` if `out` is NULL.
#[no_mangle]
pub extern "C" fn qcow2_snapshot_options_init(out: *mut qcow2_snapshot_options) -> qcow2_error {
    boundary("qcow2_snapshot_options_init", || {
        ffi::out(out, "out")?.write(qcow2_snapshot_options::defaults());
        Ok(())
    })
}

/// Store the number of internal snapshots in `*out_count`.
///
/// Ownership: `out_count` belongs to the caller. Thread safety: may run concurrently with any call
/// on the same handle but `qcow2_close`. On failure returns the code and leaves `*out_count`
/// untouched.
#[no_mangle]
pub extern "C" fn qcow2_snapshot_count(
    img: *const qcow2_image,
    out_count: *mut usize,
) -> qcow2_error {
    boundary("qcow2_snapshot_count", || {
        let image = ffi::image(img)?;
        let out = ffi::out(out_count, "out_count")?;
        out.write(image.snapshots().len());
        Ok(())
    })
}

/// Copy one snapshot out: its ID into `id_buf`, its name into `name_buf` (both NUL-terminated),
/// and the rest into `*out`, all or nothing.
fn fill(
    s: &SnapshotInfo,
    id: StrOut,
    name: StrOut,
    out: ffi::Out<'_, qcow2_snapshot_info>,
) -> Result<(), FfiError> {
    id.check(&s.id)?;
    name.check(&s.name)?;
    id.write(&s.id)?;
    name.write(&s.name)?;
    out.write(qcow2_snapshot_info::from(s));
    Ok(())
}

/// Describe the snapshot at position `index` (0-based) of the snapshot table, the order of
/// `qemu-img snapshot -l`: its ID is copied into `id_buf` and its name into `name_buf`
/// (NUL-terminated), the rest, with both lengths, into `*out`. A NULL buffer with length 0 skips
/// that string (`*out` still gives its length), so a caller can ask for the lengths first, then
/// allocate. Enumerate the snapshots with indexes `0 .. qcow2_snapshot_count() - 1`.
///
/// Ownership: the buffers and `out` belong to the caller. Thread safety: may run concurrently with
/// any call on the same handle but `qcow2_close`; each call sees one state of the table, but a
/// snapshot created, deleted (or the whole table replaced by another program) between two calls
/// shifts the indexes: look snapshots up by ID after such changes. On failure returns the code
/// and writes neither buffer nor `*out`: `QCOW2_ERR_NOT_FOUND` when `index` is not below the count,
/// `QCOW2_ERR_BUFFER_TOO_SMALL` when a buffer is not longer than its string,
/// `QCOW2_ERR_INVALID_ARGUMENT` for NULL `img` or `out`, or a NULL buffer with a non-zero length.
#[no_mangle]
pub extern "C" fn qcow2_snapshot_get(
    img: *const qcow2_image,
    index: usize,
    id_buf: *mut c_char,
    id_buf_len: usize,
    name_buf: *mut c_char,
    name_buf_len: usize,
    out: *mut qcow2_snapshot_info,
) -> qcow2_error {
    boundary("qcow2_snapshot_get", || {
        let image = ffi::image(img)?;
        let id = ffi::str_out(id_buf, id_buf_len, "id_buf")?;
        let name = ffi::str_out(name_buf, name_buf_len, "name_buf")?;
        let out = ffi::out(out, "out")?;
        let list = image.snapshots();
        let s = list.get(index).ok_or_else(|| {
            FfiError::NotFound(format!(
                "{}: no snapshot at index {index} (the image has {})",
                image.filename(),
                list.len()
            ))
        })?;
        fill(s, id, name, out)
    })
}

/// Describe the snapshot the image shows, when it was opened on one (`qcow2_open_options.snapshot`):
/// buffers and `*out` as in `qcow2_snapshot_get`.
///
/// Ownership and thread safety: as `qcow2_snapshot_get`. On failure returns the code and writes
/// neither buffer nor `*out`: `QCOW2_ERR_NOT_FOUND` when the image is open on its active disk,
/// `QCOW2_ERR_BUFFER_TOO_SMALL`, `QCOW2_ERR_INVALID_ARGUMENT`.
#[no_mangle]
pub extern "C" fn qcow2_snapshot_view(
    img: *const qcow2_image,
    id_buf: *mut c_char,
    id_buf_len: usize,
    name_buf: *mut c_char,
    name_buf_len: usize,
    out: *mut qcow2_snapshot_info,
) -> qcow2_error {
    boundary("qcow2_snapshot_view", || {
        let image = ffi::image(img)?;
        let id = ffi::str_out(id_buf, id_buf_len, "id_buf")?;
        let name = ffi::str_out(name_buf, name_buf_len, "name_buf")?;
        let out = ffi::out(out, "out")?;
        let s = image.snapshot_view().ok_or_else(|| {
            FfiError::NotFound(format!(
                "{}: the image is open on its active disk, not on a snapshot",
                image.filename()
            ))
        })?;
        fill(&s, id, name, out)
    })
}

/// Create an internal snapshot of the disk as it is now, named `name` (NUL-terminated UTF-8;
/// names need not be unique), as `qemu-img snapshot -c NAME` does. `opts` may be NULL for the
/// defaults of `qcow2_snapshot_options_init`. The new snapshot's ID is copied into `id_buf`
/// (NUL-terminated), which needs `QCOW2_SNAPSHOT_ID_SIZE` bytes (or is NULL with length 0), and
/// its description into `*out` (which may be NULL); it is the last in the table. Durable when the
/// call returns; crash-safe: a power cut leaves the snapshot whole or absent (and at worst leaked
/// clusters). Writes after it copy the clusters they change, so the snapshot keeps reading what
/// the disk holds now.
///
/// Ownership: `name` and `opts` are borrowed for the call; `id_buf` and `out` belong to the
/// caller. Thread safety: may run concurrently with any call on the same handle but
/// `qcow2_close`; writes running on other threads finish before the snapshot is taken, later
/// ones wait for it. On failure returns the code, creates nothing and writes neither `id_buf` nor
/// `*out`: `QCOW2_ERR_READ_ONLY` (open read-only or on a snapshot), `QCOW2_ERR_UNSUPPORTED` (an
/// external data file), `QCOW2_ERR_BUFFER_TOO_SMALL` (`id_buf` shorter than
/// `QCOW2_SNAPSHOT_ID_SIZE`), `QCOW2_ERR_INVALID_ARGUMENT` (NULL `name`, a name that is not UTF-8
/// or longer than 65535 bytes, a bad option, QEMU's limit of 65536 snapshots), `QCOW2_ERR_IO`,
/// `QCOW2_ERR_NO_SPACE`.
#[no_mangle]
pub extern "C" fn qcow2_snapshot_create(
    img: *mut qcow2_image,
    name: *const c_char,
    opts: *const qcow2_snapshot_options,
    id_buf: *mut c_char,
    id_buf_len: usize,
    out: *mut qcow2_snapshot_info,
) -> qcow2_error {
    boundary("qcow2_snapshot_create", || {
        let image = ffi::image(img)?;
        let name = ffi::str_arg(name, "name")?;
        let opts = match ffi::optional_input(opts, "opts")? {
            Some(o) => *o,
            None => qcow2_snapshot_options::defaults(),
        }
        .to_core(name);
        let id = ffi::str_out(id_buf, id_buf_len, "id_buf")?;
        if id.capacity().is_some_and(|n| n < QCOW2_SNAPSHOT_ID_SIZE) {
            return Err(FfiError::BufferTooSmall(format!(
                "id_buf needs QCOW2_SNAPSHOT_ID_SIZE ({QCOW2_SNAPSHOT_ID_SIZE}) bytes, got \
                 {id_buf_len}"
            )));
        }
        let out = ffi::optional_out(out, "out")?;
        let s = image.create_snapshot_with(&opts)?;
        // Cannot fail for the IDs the core makes (at most 20 digits); should another rule ever
        // make a longer one, the caller learns that the snapshot exists but its ID did not fit.
        id.write(&s.id).map_err(|e| match e {
            FfiError::BufferTooSmall(m) => FfiError::BufferTooSmall(format!(
                "snapshot '{}' was created, but its ID does not fit in id_buf: {m}",
                s.name
            )),
            e => e,
        })?;
        if let Some(out) = out {
            out.write(qcow2_snapshot_info::from(&s));
        }
        Ok(())
    })
}

/// Revert the disk to a snapshot, as `qemu-img snapshot -a` does: `id_or_name` (NUL-terminated
/// UTF-8) names the snapshot by ID, else the first with that name. The snapshot's contents
/// become the active disk and the virtual size becomes the size it recorded (see
/// `qcow2_virtual_size`); the snapshot itself stays. Durable when the call returns; a power cut
/// leaves the old or the new disk, never a mix.
///
/// Ownership: `id_or_name` is borrowed for the call. Thread safety: may run concurrently with any
/// call on the same handle but `qcow2_close`; I/O on other threads sees the old or the new disk
/// (and fails past the end when the size shrinks). On failure returns the code and the disk is
/// unchanged: `QCOW2_ERR_NOT_FOUND` (no such snapshot), `QCOW2_ERR_READ_ONLY`,
/// `QCOW2_ERR_CORRUPT` (a damaged snapshot), `QCOW2_ERR_INVALID_ARGUMENT` (NULL or not UTF-8),
/// `QCOW2_ERR_IO`, `QCOW2_ERR_NO_SPACE`.
#[no_mangle]
pub extern "C" fn qcow2_snapshot_apply(
    img: *mut qcow2_image,
    id_or_name: *const c_char,
) -> qcow2_error {
    boundary("qcow2_snapshot_apply", || {
        let image = ffi::image(img)?;
        let which = ffi::str_arg(id_or_name, "id_or_name")?;
        image.apply_snapshot(which)?;
        Ok(())
    })
}

/// Delete a snapshot, as `qemu-img snapshot -d` does (`id_or_name` as in
/// `qcow2_snapshot_apply`), and free the clusters only it used. The active disk is unchanged.
/// Durable when the call returns; a power cut leaves the snapshot or not, and at worst leaked
/// clusters.
///
/// Ownership: `id_or_name` is borrowed for the call. Thread safety: may run concurrently with any
/// call on the same handle but `qcow2_close`. On failure returns the code:
/// `QCOW2_ERR_NOT_FOUND` (no such snapshot), `QCOW2_ERR_READ_ONLY`,
/// `QCOW2_ERR_INVALID_ARGUMENT` (NULL or not UTF-8), `QCOW2_ERR_IO`, ...
#[no_mangle]
pub extern "C" fn qcow2_snapshot_delete(
    img: *mut qcow2_image,
    id_or_name: *const c_char,
) -> qcow2_error {
    boundary("qcow2_snapshot_delete", || {
        let image = ffi::image(img)?;
        let which = ffi::str_arg(id_or_name, "id_or_name")?;
        image.delete_snapshot(which)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SnapshotInfo {
        SnapshotInfo {
            id: "12".to_string(),
            name: "before-upgrade".to_string(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: 1 << 30,
            icount: None,
        }
    }

    fn blank() -> qcow2_snapshot_info {
        qcow2_snapshot_info::from(&SnapshotInfo {
            id: String::new(),
            name: String::new(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 0,
            icount: Some(99),
        })
    }

    #[test]
    fn fill_writes_all_or_nothing() {
        let s = info();
        let mut id = [b'x' as c_char; 8];
        let mut name = [b'x' as c_char; 14]; // one short: no room for the NUL
        let mut out = blank();
        let err = fill(
            &s,
            ffi::str_out(id.as_mut_ptr(), id.len(), "id_buf").unwrap(),
            ffi::str_out(name.as_mut_ptr(), name.len(), "name_buf").unwrap(),
            ffi::out(&mut out, "out").unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, FfiError::BufferTooSmall(_)));
        assert_eq!(
            id, [b'x' as c_char; 8],
            "the ID, which fitted, is not written either"
        );
        assert_eq!(name, [b'x' as c_char; 14]);
        assert!(out.id_len == 0 && out.icount == 99, "out is not written");

        let mut name = [b'x' as c_char; 15];
        fill(
            &s,
            ffi::str_out(std::ptr::null_mut(), 0, "id_buf").unwrap(),
            ffi::str_out(name.as_mut_ptr(), name.len(), "name_buf").unwrap(),
            ffi::out(&mut out, "out").unwrap(),
        )
        .unwrap();
        assert_eq!((out.id_len, out.name_len), (2, 14));
        assert_eq!(
            (out.date_sec, out.date_nsec, out.vm_clock_nsec),
            (1_700_000_000, 5, 7)
        );
        assert!(!out.has_icount && out.icount == 0 && out.disk_size == 1 << 30);
        let copied: Vec<u8> = name.iter().map(|&c| c as u8).collect();
        assert_eq!(copied, b"before-upgrade\0");
    }

    #[test]
    fn defaults_are_what_qemu_img_records() {
        let d = qcow2_snapshot_options::defaults();
        assert!(!d.has_date && d.has_icount && d.icount == 0 && d.vm_clock_nsec == 0);
        assert_eq!(d.to_core("n"), SnapshotOptions::new("n"));
    }
}
