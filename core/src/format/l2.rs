//! L1 and L2 table entries.

/// L1 entry: offset of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry (standard): host cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry reserved bits (standard clusters).
pub const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// COPIED flag: refcount is exactly one (L1 and L2 entries).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// COMPRESSED flag (L2).
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// ZERO flag (L2, standard clusters, v3).
pub const OFLAG_ZERO: u64 = 1;
/// Highest host offset a table may point to (exclusive).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// What one (standard) L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desc {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster preallocated at `host`.
    ZeroAlloc {
        /// Host offset.
        host: u64,
    },
    /// Data at host cluster `host`.
    Normal {
        /// Host offset.
        host: u64,
    },
    /// Compressed data: `len` bytes (sector-rounded upper bound) starting at byte `offset`.
    Compressed {
        /// Host byte offset.
        offset: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// Decode the first word of an L2 entry. `extended` images have no ZERO flag in word one.
pub fn decode(entry: u64, cluster_bits: u32, extended: bool) -> Desc {
    if entry & OFLAG_COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let nsec = (entry & ((1u64 << 62) - 1)) >> x;
        let len = (nsec + 1) * 512 - (offset & 511);
        return Desc::Compressed { offset, len };
    }
    let host = entry & L2E_OFFSET_MASK;
    let zero = !extended && entry & OFLAG_ZERO != 0;
    match (zero, host) {
        (true, 0) => Desc::ZeroPlain,
        (true, h) => Desc::ZeroAlloc { host: h },
        (false, 0) => Desc::Unallocated,
        (false, h) => Desc::Normal { host: h },
    }
}

/// Encode a compressed descriptor for `len` bytes at host byte `offset`.
pub fn encode_compressed(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let nsec = ((offset + len - 1) >> 9) - (offset >> 9);
    OFLAG_COMPRESSED | (nsec << x) | offset
}

/// Whether the compressed descriptor would be valid (sector count fits in its field). Empty
/// or overflowing ranges never are.
pub fn compressed_fits(offset: u64, len: u64, cluster_bits: u32) -> bool {
    let x = 62 - (cluster_bits - 8);
    let Some(last) = len.checked_sub(1).and_then(|l| offset.checked_add(l)) else {
        return false;
    };
    let nsec = (last >> 9) - (offset >> 9);
    offset < (1u64 << x) && nsec < (1u64 << (cluster_bits - 8))
}

/// Subcluster bitmap helpers for extended L2 entries (word two).
pub mod sub {
    /// Number of subclusters per cluster.
    pub const COUNT: u32 = 32;
    /// Whether subcluster `i` is allocated.
    pub fn allocated(bitmap: u64, i: u32) -> bool {
        bitmap & (1u64 << i) != 0
    }
    /// Whether subcluster `i` reads as zeros.
    pub fn zero(bitmap: u64, i: u32) -> bool {
        bitmap & (1u64 << (i + 32)) != 0
    }
    /// Bitmap is invalid when a subcluster is both allocated and zero.
    pub fn invalid(bitmap: u64) -> bool {
        (bitmap & 0xffff_ffff) & (bitmap >> 32) != 0
    }
}
