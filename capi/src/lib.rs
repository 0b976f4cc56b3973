//! C ABI for qcow2rs: `libqcow2rs` (cdylib + staticlib) and the header `include/qcow2rs.h`, which
//! cbindgen generates from this crate (see `capi/cbindgen.toml`).
//!
//! Every function is a thin layer over the core crate: it converts arguments, calls one core method,
//! and converts the result. Conventions, stated once here and in the header:
//! - every exported body runs inside [`ffi::boundary`], which catches panics (`QCOW2_ERR_PANIC`)
//!   and records the outcome in a thread-local last error (`qcow2_last_error_message`);
//! - core errors become codes in exactly one place (`error.rs`);
//! - all raw pointers are checked and converted in `ffi.rs`, the only module with `unsafe` code.
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
