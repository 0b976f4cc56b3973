//! Consistency check and repair, classified the way `qemu-img check` classifies problems.

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Lower refcounts that are too high (leaked clusters).
    Leaks,
    /// Repair leaks and corruptions: raise refcounts that are too low (rebuilding the refcount
    /// structures if needed), fix COPIED flags, clear the dirty and corrupt bits.
    All,
}

/// The result of a consistency check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
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
    /// Clusters in the image file (file length / cluster size, rounded up).
    pub total_clusters: u64,
    /// Guest clusters that are allocated in this image (data, compressed or preallocated zero).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not physically following their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Highest host offset in use, rounded to a cluster.
    pub image_end_offset: u64,
    /// One line per problem, worded as qemu-img words them
    /// (`Leaked cluster 5 refcount=1 reference=0`, `ERROR cluster 7 refcount=0 reference=1`, ...).
    pub messages: Vec<String>,
    /// Total guest clusters (virtual size / cluster size), for the "A/B = x% allocated" line.
    pub guest_clusters: u64,
}

impl CheckReport {
    /// True when no corruption and no leak remains.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
    /// qemu-img's exit code for this result: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}
