//! C ABI for qcow2rs: `libqcow2rs` (cdylib + staticlib) and the header `include/qcow2rs.h`, which
//! cbindgen generates from this crate (see `capi/cbindgen.toml`).
//!
//! Every function is a thin layer over the core crate: it converts arguments, calls one core method,
//! and converts the result. Conventions, stated once here and in the header:
//! - every exported body runs inside `ffi::boundary`, which catches panics (`QCOW2_ERR_PANIC`)
//!   and records the outcome in a thread-local last error (`qcow2_last_error_message`);
//! - core errors become codes in exactly one place (`error.rs`);
//! - all raw pointers are checked and converted in `ffi.rs`, the only module with `unsafe` code.
//!
//! What of the core is reachable from C (checked against `core/src/lib.rs`):
//!
//! | core | C |
//! |---|---|
//! | `Image::create` + `CreateOptions` (all fields, `EncryptionOptions`) | `qcow2_create` + `qcow2_create_options` |
//! | `Image::open` + `OpenOptions` (all fields, `BackingPolicy`, `SnapshotRef`) | `qcow2_open`, `qcow2_open_ex` + `qcow2_open_options` |
//! | `read_at` / `write_at` | `qcow2_read` / `qcow2_write`, vectored `qcow2_readv` / `qcow2_writev` |
//! | `write_zeroes`, `discard`, `write_compressed`, `flush`, `resize`, `close` | same names |
//! | `virtual_size`, `sync_count`, `info` (`ImageInfo`) | `qcow2_virtual_size`, `qcow2_sync_count`, `qcow2_info` + string getters |
//! | `ImageInfo::encryption` (`EncryptionInfo`, `LuksInfo`, `LuksSlotInfo`) | `qcow2_encryption_info` |
//! | `ImageInfo::snapshots`, `snapshot_view` | `qcow2_snapshot_count` / `_get` / `_view` |
//! | `create_snapshot_with`, `apply_snapshot`, `delete_snapshot` | `qcow2_snapshot_create` / `_apply` / `_delete` |
//! | `map` (`MapEntry`) | `qcow2_map` |
//! | `check` (`CheckReport`, `RepairMode`) | `qcow2_check` |
//! | `damage` | `qcow2_damage` |
//! | `change_key_slots` (`KeySlotChange`) | `qcow2_luks_add_key`, `qcow2_luks_remove_key` |
//! | `probe_format` (`Format`) | `qcow2_probe_format` |
//!
//! Not exported: the `Storage` trait and `MemStorage` (a Rust-side I/O seam for tests),
//! `cipher_speed` (a hidden benchmark hook), and `LockMode` (chosen by the read-only and
//! force-share open flags). Conversion and comparison live in the CLI, not in the core.
//!
//! The exported functions are `extern "C"` functions with C's calling contract (valid pointers, as
//! documented per function), like those of rustls-ffi; they are safe Rust signatures only so that the
//! boundary stays in one place. The `rlib` exists for Rust tests of this crate.
#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

// The header lists items in this order (cbindgen.toml: sort_by = "None"); blank lines keep rustfmt
// from sorting the declarations.
mod error;

mod options;

mod image;

mod info;

mod snapshot;

mod ffi;

pub use error::*;
pub use image::*;
pub use info::*;
pub use options::*;
pub use snapshot::*;
