//! On-disk structures: parse, serialize, validate. No I/O. All big-endian encoding lives here.
pub mod header;
pub mod l2;
pub mod refcount;
pub mod snapshot;

/// Read a big-endian u16 at `off` (caller guarantees bounds).
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
/// Read a big-endian u32 at `off` (caller guarantees bounds).
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
/// Read a big-endian u64 at `off` (caller guarantees bounds).
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
/// Write a big-endian u16 at `off`.
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
/// Write a big-endian u32 at `off`.
pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
/// Write a big-endian u64 at `off`.
pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Decode a table of big-endian u64 entries (L1 table, refcount table).
pub fn decode_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| be64(c, 0)).collect()
}
/// Encode a table of u64 entries big-endian.
pub fn encode_table(t: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; t.len() * 8];
    for (i, v) in t.iter().enumerate() {
        put64(&mut out, i * 8, *v);
    }
    out
}
/// Read entry `i` of a big-endian u64 table held in a byte buffer (an L2 table).
pub fn table_get(b: &[u8], i: usize) -> u64 {
    be64(b, i * 8)
}
/// Set entry `i` of a big-endian u64 table held in a byte buffer.
pub fn table_set(b: &mut [u8], i: usize, v: u64) {
    put64(b, i * 8, v)
}
/// One u64 big-endian, for single-entry table writes.
pub fn u64_bytes(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}
