//! The image: the public type. It holds the state behind a lock and the group commit, and
//! each public method checks its arguments, takes the lock and hands the work to the module
//! that does it (`datapath.rs` for guest data, `flush.rs` for durability, `resize.rs`,
//! `map.rs`, `check.rs`; creating and opening are in `open.rs`).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::check::{CheckReport, RepairMode};
use crate::compress;
use crate::datapath;
use crate::error::{Error, Result};
use crate::flush::GroupCommit;
use crate::keyslots::KeySlotChange;
use crate::map::{ImageInfo, MapEntry};
use crate::offset::GuestOffset;
use crate::options::{CompressionType, OpenOptions};
use crate::snapshot::{SnapshotInfo, SnapshotOptions, SnapshotRef};
use crate::state::{self, State};

/// An open qcow2 image. `Send + Sync`: share it between threads with `Arc`.
pub struct Image {
    state: Mutex<State>,
    name: String,
    cluster_size: u32,
    compression: CompressionType,
    commit: GroupCommit,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("file", &self.name)
            .field("cluster_size", &self.cluster_size)
            .finish_non_exhaustive()
    }
}

impl Image {
    pub(crate) fn from_state(state: State, name: &str, compression: CompressionType) -> Image {
        Image {
            cluster_size: state.geo.cluster_size() as u32,
            state: Mutex::new(state),
            name: name.to_string(),
            compression,
            commit: GroupCommit::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        state::lock(&self.state)
    }

    /// Open an image file, taking QEMU's image locks on it and on its backing files (see
    /// [`crate::LockMode`]) for as long as the image is open: [`crate::Error::Locked`] when another user
    /// (QEMU, or another open image, in this process too) conflicts.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Image::open_chain(path.as_ref(), opts, &mut Vec::new())
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.lock().header.size
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        self.cluster_size
    }
    /// The file name the image was opened with.
    pub fn filename(&self) -> &str {
        &self.name
    }
    /// Whether the image is open read-only.
    pub fn is_read_only(&self) -> bool {
        self.lock().access.read_only()
    }

    /// Read `buf.len()` bytes at guest `offset`. The range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = self.lock();
        s.check_range(offset, buf.len() as u64)?;
        s.check_key()?;
        datapath::read(s, buf, GuestOffset::new(offset))
    }

    /// Write `buf` at guest `offset`. The range must lie within the virtual size.
    /// Durable after the next [`Image::flush`] (or at once in write-through modes).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let s = self.lock();
        s.check_writable()?;
        s.check_range(offset, buf.len() as u64)?;
        s.check_key()?;
        let write_through = s.access.cache_mode().write_through();
        datapath::write(&self.state, s, buf, GuestOffset::new(offset))?;
        self.write_done(write_through)
    }

    /// Make `len` bytes at `offset` read as zeros, as cheaply as the format allows
    /// (zero clusters in v3; explicit zeros where needed).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, len)?;
        s.check_key()?;
        let disk_end = s.disk_end();
        let (mut offset, mut len) = (offset, len);
        if s.crypto.is_some() {
            // The cipher works on whole sectors: partial ones at the ends get explicit zeros.
            let sector = crate::crypto::SECTOR as u64;
            let head = (sector - offset % sector) % sector;
            if head != 0 && len > 0 {
                let n = head.min(len);
                s.write_unaligned(&vec![0u8; n as usize], GuestOffset::new(offset))?;
                (offset, len) = (offset + n, len - n);
            }
            let tail = (offset + len) % sector;
            if len > 0 && tail != 0 {
                len -= tail;
                s.write_unaligned(&vec![0u8; tail as usize], GuestOffset::new(offset + len))?;
            }
        }
        s.zero_inner(GuestOffset::new(offset), len, disk_end)?;
        self.finish_write(s)
    }

    /// Discard whole clusters inside the range: they are freed (and punched out of the host file)
    /// and read as zeros afterwards, or from the backing file in a v2 image with one.
    /// Partial clusters at the ends are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, len)?;
        s.check_key()?;
        let disk_end = s.disk_end();
        s.discard_inner(GuestOffset::new(offset), len, disk_end)?;
        self.finish_write(s)
    }

    /// Write compressed data for whole cluster(s) at a cluster-aligned `offset`. `data` is at most
    /// one cluster (less only for the last cluster of the disk). Clusters that do not compress are
    /// written normally. The target cluster must not be allocated. Compression runs outside the
    /// image lock, so several threads calling this compress in parallel.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cluster_size = self.cluster_size as u64;
        if !offset.is_multiple_of(cluster_size) || data.len() as u64 > cluster_size {
            return Err(Error::invalid(format!(
                "{}: compressed writes must be one cluster at a cluster-aligned offset",
                self.name
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let padded;
        let cluster: &[u8] = if (data.len() as u64) < cluster_size {
            let mut p = vec![0u8; cluster_size as usize];
            p[..data.len()].copy_from_slice(data);
            padded = p;
            &padded
        } else {
            data
        };
        let comp = compress::compress(cluster, self.compression);
        let mut s = self.lock();
        s.check_writable()?;
        s.check_range(offset, data.len() as u64)?;
        s.check_key()?;
        let offset = GuestOffset::new(offset);
        if s.crypto.is_some() {
            // Encrypted images are never compressed (as in QEMU): a normal write, which also
            // handles a last cluster that ends inside a sector.
            let write_through = s.access.cache_mode().write_through();
            datapath::write(&self.state, s, data, offset)?;
            return self.write_done(write_through);
        }
        if s.geo.extended_l2() || comp.is_none() {
            s.write_inner(data, offset)?;
        } else {
            let c = s.geo.guest_cluster(offset);
            s.write_compressed_inner(c, data, comp)?;
        }
        self.finish_write(s)
    }

    /// A guest write (or zeroes, discard) is complete: release the lock, then count it.
    fn finish_write(&self, s: MutexGuard<'_, State>) -> Result<()> {
        let write_through = s.access.cache_mode().write_through();
        drop(s);
        self.write_done(write_through)
    }

    /// Count a completed write; in the write-through modes make it durable through the shared
    /// group-commit flush.
    fn write_done(&self, write_through: bool) -> Result<()> {
        self.commit.write_done();
        if write_through {
            self.commit.flush(&self.state)?;
        }
        Ok(())
    }

    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        // In unsafe mode the barriers are skipped (flushes are ignored), but metadata is still
        // written back, in order, so that other readers of the file see it.
        self.commit.write_done();
        self.commit.flush(&self.state)
    }

    /// Change the virtual size. Shrinking frees the cut-off tail.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let _q = self.commit.quiesce();
        let mut s = self.lock();
        s.check_writable()?;
        s.check_key()?;
        s.resize_inner(new_size)
    }

    /// For an image opened with [`crate::OpenOptions::damaged`]: the tables that the open found
    /// cut short by the end of the file (read as zeros there), one line each. Empty otherwise.
    pub fn damage(&self) -> Vec<String> {
        self.lock().file.damage().to_vec()
    }

    /// Facts about the image.
    pub fn info(&self) -> Result<ImageInfo> {
        self.lock().info()
    }

    /// How the guest range `[offset, offset+len)` is stored, as merged extents.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let mut s = self.lock();
        s.check_range(offset, len)?;
        let mut out = Vec::new();
        s.map_inner(offset, len, &mut out)?;
        Ok(out)
    }

    /// Check consistency; with `repair`, fix what the mode allows (the image must be writable).
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        let _q = self.commit.quiesce();
        let s = self.lock();
        // Clusters reserved by writes encrypting outside the lock would count as leaks.
        let mut s = State::drain_reservations(&self.state, s);
        s.reserved.everything_changed();
        let r = Self::check_drained(&mut s, repair);
        s.release_reservations();
        r
    }

    fn check_drained(s: &mut State, repair: Option<RepairMode>) -> Result<CheckReport> {
        if s.snapshots.view().is_some() {
            return Err(Error::invalid(format!(
                "{}: check the image, not a snapshot view of it",
                s.name()
            )));
        }
        if repair.is_some() && !s.access.writable_storage() {
            return Err(Error::ReadOnly {
                file: s.name().to_string(),
                reason: "repair needs the image opened read-write".into(),
            });
        }
        if !s.access.read_only() {
            // Settle pending work so the stored refcounts describe the image exactly.
            s.flush_inner()?;
            s.return_run()?;
        }
        if repair.is_none() {
            return crate::check::run(s, None);
        }
        // Repair may rewrite and free anything: no data I/O may run outside the lock meanwhile.
        let gate = s.file.io_gate();
        let _exclusive = gate.write().unwrap_or_else(|e| e.into_inner());
        crate::check::run(s, repair)
    }

    /// Add or remove LUKS passwords (see [`KeySlotChange`]); returns the slots changed. The
    /// image must be open read-write with a password. Each change is crash-safe: a power cut
    /// leaves the old or the new set of working passwords.
    pub fn change_key_slots(&self, change: &KeySlotChange) -> Result<Vec<usize>> {
        let _q = self.commit.quiesce();
        let mut s = self.lock();
        s.check_writable()?;
        s.flush_inner()?;
        let r = s.change_key_slots(change);
        if r.is_err() {
            // A half-done change: what is on disk is the truth now (a slot may be active there
            // that memory still takes as free). Read it back before any further change.
            let _ = s.reload_luks_header();
        }
        r
    }

    /// The internal snapshots, in the order of the snapshot table (`qemu-img snapshot -l`).
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.lock().snapshot_list()
    }

    /// The snapshot this image shows, when it was opened on one ([`OpenOptions::snapshot`]).
    pub fn snapshot_view(&self) -> Option<SnapshotInfo> {
        self.lock().snapshots.view().cloned()
    }

    /// Create an internal snapshot of the disk as it is now, named `name`, as
    /// `qemu-img snapshot -c NAME` does (IDs are numbered by QEMU's rule; names need not be
    /// unique). Durable when it returns. Writes after it copy the clusters they change, so the
    /// snapshot keeps reading what the disk held now. Crash-safe: a power cut leaves the
    /// snapshot whole or absent, and at worst leaked clusters.
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.create_snapshot_with(&SnapshotOptions::new(name))
    }

    /// [`Image::create_snapshot`] with the date, VM clock and icount to record.
    pub fn create_snapshot_with(&self, opts: &SnapshotOptions) -> Result<SnapshotInfo> {
        let _q = self.commit.quiesce();
        self.lock().create_snapshot_inner(opts)
    }

    /// Revert the disk to a snapshot (`qemu-img snapshot -a`): its contents become the
    /// active image, and the virtual size becomes the size it recorded. A string names the
    /// snapshot by ID, else by name, as qemu-img takes it. Durable when it returns; a power
    /// cut leaves the old or the new disk, never a mix.
    pub fn apply_snapshot(&self, snapshot: impl Into<SnapshotRef>) -> Result<SnapshotInfo> {
        let r = snapshot.into();
        let _q = self.commit.quiesce();
        self.lock().apply_snapshot_inner(&r)
    }

    /// Delete a snapshot (`qemu-img snapshot -d`) and free what only it used. A string names
    /// the snapshot by ID, else by name (qemu-img's `-d` looks up names only; pass
    /// [`SnapshotRef::Name`] for exactly that, as the `qcow2rs snapshot -d` command does).
    /// Durable when it returns.
    pub fn delete_snapshot(&self, snapshot: impl Into<SnapshotRef>) -> Result<SnapshotInfo> {
        let r = snapshot.into();
        let _q = self.commit.quiesce();
        self.lock().delete_snapshot_inner(&r)
    }

    /// Number of fdatasyncs issued on the image file so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().file.storage().sync_count()
    }

    /// Flush and close. Dropping an image also flushes, but cannot report errors.
    pub fn close(self) -> Result<()> {
        let _q = self.commit.quiesce();
        self.lock().close_inner()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _q = self.commit.quiesce();
        let _ = self.lock().close_inner();
    }
}
