//! On-disk structures: parse, serialize, validate. No I/O. All big-endian encoding lives here.
pub mod header;
