//! Typed offsets and the image geometry that converts between them.
//!
//! Four kinds of number name places in an image, and the classic qcow2 bugs come from mixing
//! them (encrypting with the guest sector where the host sector was meant, or the reverse):
//!
//! - [`GuestOffset`]: a byte in the guest's virtual disk;
//! - [`GuestCluster`]: the index of a guest cluster (what the L1/L2 tree maps);
//! - [`HostOffset`]: a byte in the image file;
//! - [`HostCluster`]: the index of a host cluster (what a refcount counts).
//!
//! Each is a newtype. Adding a length (a plain `u64` byte count) to an offset gives an offset
//! of the same kind; subtracting two offsets of one kind gives a length. Nothing converts one
//! kind into another except the named methods of [`Geometry`] (which knows the cluster size),
//! and [`GuestOffset::sector`] / [`HostOffset::sector`], which say which sector they mean.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub(crate) struct $name(u64);

        impl $name {
            /// Wrap a raw value read from (or computed for) the image.
            pub(crate) const fn new(v: u64) -> Self {
                $name(v)
            }
            /// The raw value, for the format encoders and the storage calls.
            pub(crate) const fn get(self) -> u64 {
                self.0
            }
            /// `self + len`, or `None` on overflow.
            #[allow(dead_code)] // not every kind needs it
            pub(crate) fn checked_add(self, len: u64) -> Option<Self> {
                self.0.checked_add(len).map($name)
            }
        }

        /// Advance by a length in bytes (or clusters, for the cluster indexes).
        impl Add<u64> for $name {
            type Output = $name;
            fn add(self, len: u64) -> $name {
                $name(self.0 + len)
            }
        }

        impl AddAssign<u64> for $name {
            fn add_assign(&mut self, len: u64) {
                self.0 += len;
            }
        }

        /// The distance between two places of the same kind.
        impl Sub for $name {
            type Output = u64;
            fn sub(self, earlier: $name) -> u64 {
                self.0 - earlier.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        /// Hexadecimal, as the messages print offsets.
        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

offset_type!(
    /// A byte offset in the guest's virtual disk.
    GuestOffset
);
offset_type!(
    /// A byte offset in the image file.
    HostOffset
);
offset_type!(
    /// The index of a guest cluster: guest offset / cluster size.
    GuestCluster
);
offset_type!(
    /// The index of a host cluster: host offset / cluster size (a refcount's index).
    HostCluster
);

impl GuestOffset {
    /// The guest's 512-byte sector number (legacy AES takes its IV from it).
    pub(crate) const fn sector(self) -> u64 {
        self.0 >> 9
    }
}

impl HostOffset {
    /// The image file's 512-byte sector number (LUKS takes its IV from it).
    pub(crate) const fn sector(self) -> u64 {
        self.0 >> 9
    }
    /// Round down to a 512-byte sector boundary.
    pub(crate) const fn sector_floor(self) -> HostOffset {
        HostOffset(self.0 & !511)
    }
}

/// The fixed shape of an open image: cluster size, table sizes, entry formats. It is the only
/// thing that converts between offsets and cluster indexes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
    refcount_order: u32,
}

impl Geometry {
    pub(crate) fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32) -> Geometry {
        Geometry {
            cluster_bits,
            extended_l2,
            refcount_order,
        }
    }

    /// Cluster size in bytes.
    pub(crate) const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub(crate) const fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Whether L2 entries are extended (128 bits, with a subcluster bitmap).
    pub(crate) const fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// Bytes per L2 entry.
    pub(crate) const fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table.
    pub(crate) const fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// Subcluster size in bytes (extended L2 entries).
    pub(crate) const fn subcluster_size(&self) -> u64 {
        self.cluster_size() / crate::format::l2::sub::COUNT as u64
    }
    /// log2 of the refcount width in bits.
    pub(crate) const fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Refcounts per refcount block.
    pub(crate) const fn refcounts_per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    // Guest side.

    /// The guest cluster holding `off`, and the offset inside it.
    pub(crate) const fn split(&self, off: GuestOffset) -> (GuestCluster, u64) {
        (
            GuestCluster(off.0 >> self.cluster_bits),
            off.0 & (self.cluster_size() - 1),
        )
    }
    /// The guest cluster holding `off`.
    pub(crate) const fn guest_cluster(&self, off: GuestOffset) -> GuestCluster {
        GuestCluster(off.0 >> self.cluster_bits)
    }
    /// The first guest cluster starting at or after `off`.
    pub(crate) const fn guest_cluster_ceil(&self, off: GuestOffset) -> GuestCluster {
        GuestCluster(off.0.div_ceil(self.cluster_size()))
    }
    /// Where guest cluster `c` starts.
    pub(crate) const fn guest_offset(&self, c: GuestCluster) -> GuestOffset {
        GuestOffset(c.0 << self.cluster_bits)
    }
    /// The L1 index of the table that maps guest cluster `c`.
    pub(crate) const fn l1_index(&self, c: GuestCluster) -> u64 {
        c.0 / self.l2_entries()
    }
    /// The index of `c`'s entry in its L2 table.
    pub(crate) const fn l2_index(&self, c: GuestCluster) -> usize {
        (c.0 % self.l2_entries()) as usize
    }
    /// The first guest cluster of the next L2 table after the one mapping `c`.
    pub(crate) const fn next_l2_range(&self, c: GuestCluster) -> GuestCluster {
        GuestCluster((self.l1_index(c) + 1) * self.l2_entries())
    }

    // Host side.

    /// The host cluster holding `off`.
    pub(crate) const fn host_cluster(&self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }
    /// Where host cluster `c` starts.
    pub(crate) const fn host_offset(&self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }
    /// Whether `off` starts a host cluster.
    pub(crate) const fn is_cluster_aligned(&self, off: HostOffset) -> bool {
        off.0 & (self.cluster_size() - 1) == 0
    }
    /// Host clusters needed to hold `bytes`.
    pub(crate) const fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
    /// The index of the refcount block (refcount-table entry) that counts cluster `c`.
    pub(crate) const fn refcount_table_index(&self, c: HostCluster) -> u64 {
        c.0 / self.refcounts_per_block()
    }
    /// The index of `c`'s refcount in its refcount block.
    pub(crate) const fn refcount_block_index(&self, c: HostCluster) -> usize {
        (c.0 % self.refcounts_per_block()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let g = Geometry::new(16, false, 4);
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.refcounts_per_block(), 32768);
        let (c, in_cluster) = g.split(GuestOffset::new(3 * 65536 + 17));
        assert_eq!((c, in_cluster), (GuestCluster::new(3), 17));
        assert_eq!(g.guest_offset(c), GuestOffset::new(3 * 65536));
        assert_eq!(g.l1_index(GuestCluster::new(8192 * 2 + 5)), 2);
        assert_eq!(g.l2_index(GuestCluster::new(8192 * 2 + 5)), 5);
        assert_eq!(
            g.next_l2_range(GuestCluster::new(5)),
            GuestCluster::new(8192)
        );
        assert_eq!(
            g.guest_cluster_ceil(GuestOffset::new(65537)),
            GuestCluster::new(2)
        );
        let h = HostOffset::new(5 * 65536 + 1000);
        assert_eq!(g.host_cluster(h), HostCluster::new(5));
        assert!(!g.is_cluster_aligned(h));
        assert!(g.is_cluster_aligned(g.host_offset(HostCluster::new(5))));
        assert_eq!(h.sector(), (5 * 65536 + 1000) / 512);
        assert_eq!(h.sector_floor(), HostOffset::new(5 * 65536 + 512));
        assert_eq!(GuestOffset::new(1024).sector(), 2);
        assert_eq!(h - HostOffset::new(5 * 65536), 1000);
        let e = Geometry::new(16, true, 4);
        assert_eq!(e.l2_entries(), 4096);
        assert_eq!(e.subcluster_size(), 2048);
    }
}
