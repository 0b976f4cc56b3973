//! The qcow2 header (cluster 0).
/// The magic bytes `QFI\xfb`.
pub const MAGIC_BYTES: [u8; 4] = *b"QFI\xfb";
