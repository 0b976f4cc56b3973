//! Consistency check and repair, classified the way `qemu-img check` classifies problems.
//!
//! The check rebuilds every cluster's reference count in memory from every reference (header,
//! L1/L2 trees of the active image and of each snapshot, data and compressed clusters, refcount
//! structures, snapshot table, encryption header, bitmaps) and compares with the stored counts:
//! stored > computed is a leak (harmless), stored < computed a corruption (the cluster could be
//! handed out twice).

use crate::cache::Kind;
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::l2::{self, Desc, L1E_OFFSET_MASK, OFLAG_COPIED};
use crate::format::refcount::{self, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::format::{self as fmt};
use crate::mutants::active as mutant;
use crate::offset::{HostCluster, HostOffset};
use crate::state::State;

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Lower refcounts that are too high (leaked clusters), and set COPIED flags that are
    /// missing (see [`CheckReport::missing_copied`]; fixing a leak can make one).
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
    /// Guest clusters (virtual size / cluster size, rounded up), as qemu-img counts them.
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
    /// Whether the refcount structures were rebuilt by the repair.
    pub rebuilt: bool,
    /// Of `corruptions`, COPIED flags that are missing (clear on a cluster of the active tree
    /// whose refcount and references are both one). qemu-img counts them as corruptions too,
    /// but they are harmless (they cost one needless copy-on-write) and a power cut during a
    /// snapshot operation can leave them, in QEMU as here; `check -r all` sets them again.
    pub missing_copied: u64,
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

/// Largest number of host clusters the check accounts for in memory.
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

struct Walk {
    cs: u64,
    /// For a damaged image (`OpenOptions::damaged`), the file's length: a reference that ends
    /// less than a cluster past it grows the table instead of being an error, as qemu-img
    /// check counts it ("the last cluster of qcow2 image may be semi-allocated").
    semi_allocated_end: Option<u64>,
    refs: Vec<u32>,
    report: CheckReport,
    /// (L1 index, L2 offset) of the active tree, for the COPIED pass.
    active_l2: Vec<(usize, u64)>,
    /// Active L1 entries with flags but no offset (see `walk_l1`), for `-r all` to clear.
    active_l1_flags_only: Vec<(usize, u64)>,
    /// The same in snapshots' L1 tables: (where the entry is stored, index, entry).
    snapshot_l1_flags_only: Vec<(u64, usize, u64)>,
    /// Whether a repair can only be done by rebuilding the refcount structures.
    need_rebuild: bool,
    /// References to clusters past the end of `refs` (past the end of the file): cluster and
    /// number of references. The rebuild places its new structures where none of them points
    /// (a crafted L2 entry naming the first cluster past the end made it share a cluster with
    /// the new refcount block), and counts those inside the file it grew.
    past_end: std::collections::BTreeMap<u64, u32>,
}

impl Walk {
    fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        let end = off.saturating_add(len);
        if let Some(file_len) = self.semi_allocated_end {
            if last as usize >= self.refs.len() && end.saturating_sub(file_len) < self.cs {
                self.refs.resize(last as usize + 1, 0);
            }
        }
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    // Bounded: a table past the end is recorded for its first clusters only.
                    for p in c..=last.min(c + 4096) {
                        let n = self.past_end.entry(p).or_insert(0);
                        *n = n.saturating_add(1);
                    }
                    self.report.messages.push(format!(
                        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
                    ));
                    self.report.corruptions += 1;
                    return;
                }
            }
        }
    }
    fn error(&mut self, msg: String) {
        self.report.messages.push(msg);
        self.report.corruptions += 1;
    }
}

fn read_bytes(s: &State, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    s.file.read(&mut b, HostOffset::new(off), what)?;
    Ok(b)
}

/// Walk one L1 tree (active or snapshot) and count its references.
/// `snapshot_l1`: where the snapshot's L1 table `l1` is stored (None: the active L1 table).
fn walk_l1(s: &mut State, w: &mut Walk, l1: &[u64], snapshot_l1: Option<u64>) -> Result<()> {
    let active = snapshot_l1.is_none();
    let cs = s.geo.cluster_size();
    for (i, &e) in l1.iter().enumerate() {
        // Contiguity is tracked per L2 table, as qemu-img does.
        let mut prev_host = 0u64;
        let off = e & L1E_OFFSET_MASK;
        if e & l2::L1E_RESERVED_MASK != 0 {
            w.error(format!(
                "ERROR found L1 entry with reserved bits set: {e:x}"
            ));
        }
        if off == 0 {
            // Flags without an offset: every reader takes the entry for an unallocated table,
            // but QEMU's check tests the raw entry for zero and counts an L2 table at offset 0,
            // and QEMU's writer, seeing COPIED, would load the header cluster as the L2 table.
            // Reported as a corruption; `-r all` clears the entry of the active tree (the guest
            // data does not change: the range reads as unallocated before and after).
            if e != 0 {
                match snapshot_l1 {
                    None => w.active_l1_flags_only.push((i, e)),
                    Some(t) => w.snapshot_l1_flags_only.push((t + i as u64 * 8, i, e)),
                }
            }
            continue;
        }
        if !off.is_multiple_of(cs) {
            w.error(format!(
                "ERROR l2_offset={off:#x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            continue;
        }
        w.add(off, cs);
        if off / cs >= w.refs.len() as u64 {
            continue;
        }
        if active {
            w.active_l2.push((i, off));
        }
        let idx = s
            .caches
            .get(&mut s.file, Kind::L2, HostOffset::new(off), false)?;
        let table = s.caches.data(Kind::L2, idx).to_vec();
        let n = s.geo.l2_entries() as usize;
        for j in 0..n {
            let (e2, bm) = if s.geo.extended_l2() {
                (
                    fmt::table_get(&table, 2 * j),
                    fmt::table_get(&table, 2 * j + 1),
                )
            } else {
                (fmt::table_get(&table, j), 0)
            };
            if e2 == 0 && bm == 0 {
                continue;
            }
            let reserved = if s.geo.extended_l2() {
                l2::L2E_RESERVED_MASK | l2::OFLAG_ZERO
            } else {
                l2::L2E_RESERVED_MASK
            };
            if e2 & l2::OFLAG_COMPRESSED == 0 && e2 & reserved != 0 {
                w.error(format!(
                    "ERROR found l2 entry with reserved bits set: {e2:x}"
                ));
            }
            let d = l2::decode(e2, s.geo.cluster_bits(), s.geo.extended_l2());
            match d {
                Desc::Normal { host } | Desc::ZeroAlloc { host } => {
                    if host % cs != 0 {
                        w.error(format!(
                            "ERROR offset={host:#x}: Cluster is not properly aligned; L2 entry corrupted."
                        ));
                        continue;
                    }
                    if s.geo.extended_l2() && l2::sub::invalid(bm) {
                        w.error(format!(
                            "ERROR: Invalid subcluster allocation bitmap {bm:#x} in L2 table at {off:#x}"
                        ));
                    }
                    w.add(host, cs);
                    if active {
                        w.report.allocated_clusters += 1;
                        if prev_host != 0 && host != prev_host + cs {
                            w.report.fragmented_clusters += 1;
                        }
                        prev_host = host;
                    }
                }
                Desc::Compressed { offset, len } => {
                    w.add(offset & !511, len + (offset & 511));
                    if active {
                        w.report.allocated_clusters += 1;
                        w.report.compressed_clusters += 1;
                        w.report.fragmented_clusters += 1;
                    }
                }
                Desc::Unallocated => {
                    if s.geo.extended_l2() && bm & 0xffff_ffff != 0 {
                        w.error(format!(
                            "ERROR: subclusters allocated without a host cluster in L2 table at {off:#x}"
                        ));
                    }
                }
                Desc::ZeroPlain => {}
            }
        }
    }
    Ok(())
}

fn walk_bitmaps(s: &State, w: &mut Walk) -> Result<()> {
    // Without the autoclear bit the extension is stale (a program that did not keep the
    // bitmaps, this one included, wrote the image): QEMU ignores it, and its check counts the
    // bitmaps' clusters as leaked. Counting them here called clean an image qemu-img finds
    // leaks in, and would keep clusters that QEMU's `-r leaks` frees.
    if s.header.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
        return Ok(());
    }
    let Some(ext) = s.header.extension(header::EXT_BITMAPS) else {
        return Ok(());
    };
    if ext.len() < 24 {
        w.error("ERROR: bitmaps extension is too short".into());
        return Ok(());
    }
    let nb = fmt::be32(ext, 0) as usize;
    let dir_size = fmt::be64(ext, 8);
    let dir_off = fmt::be64(ext, 16);
    if dir_size > 64 << 20 || dir_off.checked_add(dir_size).is_none() {
        w.error("ERROR: bitmap directory is too large".into());
        return Ok(());
    }
    w.add(dir_off, dir_size);
    let dir = read_bytes(s, dir_off, dir_size, "bitmap directory")?;
    let mut pos = 0usize;
    for _ in 0..nb {
        if pos + 24 > dir.len() {
            break;
        }
        let table_off = fmt::be64(&dir, pos);
        let table_size = fmt::be32(&dir, pos + 8) as u64;
        let name_size = fmt::be16(&dir, pos + 18) as usize;
        let extra = fmt::be32(&dir, pos + 20) as usize;
        pos += (24 + extra + name_size).div_ceil(8) * 8;
        if table_size > (64 << 20) / 8 {
            continue;
        }
        w.add(table_off, table_size * 8);
        let t = read_bytes(s, table_off, table_size * 8, "bitmap table")?;
        for e in fmt::decode_table(&t) {
            let off = e & 0x00ff_ffff_ffff_fe00;
            if off != 0 {
                w.add(off, s.geo.cluster_size());
            }
        }
    }
    Ok(())
}

/// Count every reference. With `count_refcount_structures` false, the refcount table and blocks
/// themselves are left out (for a rebuild, which replaces them).
fn walk(s: &mut State, nb_clusters: u64, count_refcount_structures: bool) -> Result<Walk> {
    let mut w = Walk {
        cs: s.geo.cluster_size(),
        semi_allocated_end: if s.file.damaged() {
            Some(s.file.stat_len()?.max(s.file.len()))
        } else {
            None
        },
        refs: vec![0u32; nb_clusters as usize],
        report: CheckReport::default(),
        active_l2: Vec::new(),
        active_l1_flags_only: Vec::new(),
        snapshot_l1_flags_only: Vec::new(),
        need_rebuild: false,
        past_end: Default::default(),
    };
    w.add(0, s.geo.cluster_size());
    w.add(s.header.l1_table_offset, s.header.l1_size as u64 * 8);
    let l1 = s.tables.l1().to_vec();
    walk_l1(s, &mut w, &l1, None)?;
    for snap in s.snapshots.entries().to_vec() {
        w.add(snap.l1_table_offset, snap.l1_size as u64 * 8);
        let t = read_bytes(
            s,
            snap.l1_table_offset,
            snap.l1_size as u64 * 8,
            "snapshot L1 table",
        )?;
        let t = fmt::decode_table(&t);
        walk_l1(s, &mut w, &t, Some(snap.l1_table_offset))?;
    }
    if s.header.nb_snapshots > 0 {
        let size = s.snapshots.table_size();
        w.add(s.header.snapshots_offset, size);
    }
    if count_refcount_structures {
        w.add(
            s.header.refcount_table_offset,
            s.header.refcount_table_clusters as u64 * s.geo.cluster_size(),
        );
    }
    if let Some(ext) = s.header.extension(header::EXT_CRYPTO) {
        if ext.len() >= 16 {
            let (off, len) = (fmt::be64(ext, 0), fmt::be64(ext, 8));
            w.add(off, len);
        }
    }
    walk_bitmaps(s, &mut w)?;
    // The refcount blocks last, as QEMU's check_refblocks: a block must be referenced exactly
    // once when everything else has been counted, or it shares its cluster with other
    // metadata or data, and fixing refcounts in place would write over that (the refcount
    // structure is rebuilt instead).
    for (i, &e) in s.alloc.reftable().to_vec().iter().enumerate() {
        if e & REFT_RESERVED_MASK != 0 {
            w.error(format!(
                "ERROR refcount table entry {i} has reserved bits set"
            ));
            w.need_rebuild = true;
            continue;
        }
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(s.geo.cluster_size()) {
            w.error(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            w.need_rebuild = true;
            continue;
        }
        if off / s.geo.cluster_size() >= nb_clusters {
            w.error(format!("ERROR refcount block {i} is outside image"));
            w.need_rebuild = true;
            continue;
        }
        if count_refcount_structures {
            w.add(off, s.geo.cluster_size());
            let refs = w.refs[(off / s.geo.cluster_size()) as usize];
            if refs != 1 {
                w.error(format!("ERROR refcount block {i} refcount={refs}"));
                w.need_rebuild = true;
            }
        }
    }
    // The active L1 table is written in place whatever its refcount (unlike an L2 table or a
    // data cluster, which a refcount above one makes copied on write): a cluster of it that
    // anything else also uses (a snapshot's L1 table, an L2 table, data) would be changed by
    // the next guest write. Raising the refcount to the number of references does not make
    // that safe, so this stays a corruption that repair does not fix.
    let cs = s.geo.cluster_size();
    let (l1_off, l1_len) = (s.header.l1_table_offset, s.header.l1_size as u64 * 8);
    if l1_len > 0 {
        for c in l1_off / cs..=(l1_off + l1_len - 1) / cs {
            match w.refs.get(c as usize).copied() {
                Some(r) if r > 1 => w.error(format!(
                    "ERROR active L1 table cluster {c} is also used by other metadata or data (references={r})"
                )),
                _ => {}
            }
        }
    }
    w.report.total_clusters = s.header.size.div_ceil(cs);
    Ok(w)
}

/// Whether the refcount block covering `c` is usable for an in-place fix.
fn block_ok(s: &State, c: u64, nb_clusters: u64) -> bool {
    let ri = (c / s.geo.refcounts_per_block()) as usize;
    match s.alloc.reftable().get(ri) {
        Some(&e) => {
            let off = e & REFT_OFFSET_MASK;
            off != 0
                && off.is_multiple_of(s.geo.cluster_size())
                && off / s.geo.cluster_size() < nb_clusters
        }
        None => false,
    }
}

fn stored_refcount(s: &mut State, c: u64, nb_clusters: u64) -> Result<u64> {
    if !block_ok(s, c, nb_clusters) {
        return Ok(0);
    }
    s.refcount(HostCluster::new(c))
}

fn set_refcount(s: &mut State, c: u64, v: u64) -> Result<()> {
    s.store_refcount(HostCluster::new(c), v)
}

/// Run the check, repairing as `repair` allows.
pub(crate) fn run(s: &mut State, repair: Option<RepairMode>) -> Result<CheckReport> {
    if repair.is_some() {
        // Repair may move the refcount structures and free clusters: forget what was derived
        // from the old layout.
        s.meta.invalidate();
        s.forget_packing();
        s.decompressed.clear();
    }
    let (first, fixed) = check_once(s, repair)?;
    if repair.is_none() || !fixed {
        return Ok(first);
    }
    // Double check the fixed image.
    let (mut second, _) = check_once(s, None)?;
    second.leaks_fixed = first.leaks_fixed;
    second.corruptions_fixed = first.corruptions_fixed;
    second.rebuilt = first.rebuilt;
    let mut msgs = first.messages;
    msgs.extend(second.messages);
    second.messages = msgs;
    Ok(second)
}

fn check_once(s: &mut State, repair: Option<RepairMode>) -> Result<(CheckReport, bool)> {
    let file_len = s.file.stat_len()?.max(s.file.len());
    let mut nb_clusters = file_len.div_ceil(s.geo.cluster_size());
    if nb_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::unsupported(
            s.name(),
            format!("checking an image file of {nb_clusters} clusters"),
        ));
    }
    let mut w = walk(s, nb_clusters, true)?;
    // A damaged image's last, semi-allocated cluster may have grown the table.
    nb_clusters = nb_clusters.max(w.refs.len() as u64);
    let mut fixed = false;
    let mut highest_stored = 0u64;
    let all = repair == Some(RepairMode::All);
    let max = refcount::max(s.header.refcount_order);
    for c in 0..nb_clusters {
        let computed = w.refs[c as usize] as u64;
        let stored = stored_refcount(s, c, nb_clusters)?;
        if stored > 0 {
            highest_stored = c + 1;
        }
        if stored == computed {
            continue;
        }
        if computed > max {
            w.error(format!(
                "ERROR overflow cluster offset={:#x} (refcount {computed} does not fit in {} bits); use qemu-img amend to increase the refcount entry width",
                c * s.geo.cluster_size(),
                s.header.refcount_bits()
            ));
            continue;
        }
        let leak = stored > computed;
        let can_fix = match repair {
            Some(RepairMode::Leaks) => leak,
            Some(RepairMode::All) => true,
            None => false,
        };
        if can_fix && block_ok(s, c, nb_clusters) && !w.need_rebuild {
            w.report.messages.push(format!(
                "Repairing cluster {c} refcount={stored} reference={computed}"
            ));
            set_refcount(s, c, computed)?;
            if leak {
                w.report.leaks_fixed += 1;
            } else {
                w.report.corruptions_fixed += 1;
            }
            fixed = true;
            continue;
        }
        if leak {
            w.report.messages.push(format!(
                "Leaked cluster {c} refcount={stored} reference={computed}"
            ));
            w.report.leaks += 1;
        } else {
            w.report.messages.push(format!(
                "ERROR cluster {c} refcount={stored} reference={computed}"
            ));
            w.report.corruptions += 1;
            if all {
                w.need_rebuild = true;
            }
        }
    }
    // Clusters past the end of the file must not be counted as in use either.
    if all && w.need_rebuild {
        rebuild(s, nb_clusters)?;
        // The new structures lie past the old end of the file.
        nb_clusters = s.file.len().div_ceil(s.geo.cluster_size());
        w.report
            .messages
            .push("Rebuilding refcount structure".into());
        w.report.corruptions_fixed += w.report.corruptions;
        w.report.leaks_fixed += w.report.leaks;
        w.report.corruptions = 0;
        w.report.leaks = 0;
        w.report.rebuilt = true;
        fixed = true;
    }
    // COPIED flags of the active tree. A flag that is clear where the refcount and the
    // references are one is only missing (see `CheckReport::missing_copied`): `-r leaks`
    // sets it too (fixing a leak can make one), as harmless as the leak fix itself.
    let leaks_mode = repair == Some(RepairMode::Leaks) && s.access.writable_storage();
    if fixed && repair.is_some() && s.access.writable_storage() && !mutant("repair-copied-order") {
        // A COPIED flag set below must not reach the disk before the lowered refcount that
        // justifies it (a crash between them would leave COPIED on a cluster whose stored
        // refcount is still 2).
        s.caches.flush(&mut s.file, Kind::Refblock)?;
    }
    for (l1i, e) in std::mem::take(&mut w.active_l1_flags_only) {
        if all {
            w.report.messages.push(format!(
                "Repairing L1 entry {l1i} with flags but no L2 table offset: {e:x}"
            ));
            s.rewrite_l1_entry(l1i, 0)?;
            w.report.corruptions_fixed += 1;
            fixed = true;
        } else {
            w.error(format!(
                "ERROR L1 entry {l1i} has flags but no L2 table offset: {e:x}"
            ));
        }
    }
    let refs_of = |w: &Walk, c: u64| w.refs.get(c as usize).copied().unwrap_or(0);
    // The same in a snapshot's L1 table: after the snapshot is applied it is the active
    // table's entry (QEMU's writer would load the header cluster as its L2 table). Cleared in
    // place, one 8-byte write, when nothing else uses the table's cluster (a crafted table
    // sharing it with other metadata is left alone); the snapshot's data does not change.
    for (at, l1i, e) in std::mem::take(&mut w.snapshot_l1_flags_only) {
        if all && refs_of(&w, at / s.geo.cluster_size()) == 1 {
            w.report.messages.push(format!(
                "Repairing snapshot L1 entry {l1i} with flags but no L2 table offset: {e:x}"
            ));
            s.file
                .write_meta(&[0; 8], HostOffset::new(at), "snapshot L1 entry")?;
            w.report.corruptions_fixed += 1;
            fixed = true;
        } else {
            w.error(format!(
                "ERROR snapshot L1 entry {l1i} has flags but no L2 table offset: {e:x}"
            ));
        }
    }
    let foreign = if all || leaks_mode {
        non_l2_metadata(s)
    } else {
        Vec::new()
    };
    for (l1i, off) in std::mem::take(&mut w.active_l2) {
        let rc = stored_refcount(s, off / s.geo.cluster_size(), nb_clusters)?;
        let e = s.tables.l1()[l1i];
        let want = rc == 1;
        let missing = want && refs_of(&w, off / s.geo.cluster_size()) == 1;
        if (e & OFLAG_COPIED != 0) != want {
            if all || (leaks_mode && missing) {
                let ne = if want {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                s.rewrite_l1_entry(l1i, ne)?;
                w.report.corruptions_fixed += 1;
                fixed = true;
            } else {
                w.error(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"
                ));
                w.report.missing_copied += missing as u64;
            }
        }
        if let Some(what) = shares_cluster_with(&foreign, off, s.geo.cluster_size()) {
            // The COPIED pass would write this "table" back over the other structure (a LUKS
            // header's key material, the snapshot table, ...), as QEMU's overlap check refuses
            // to (and does not for the encryption header). Left alone, reported.
            w.error(format!(
                "ERROR l2_offset={off:#x}: L2 table shares its cluster with the {what}; its OFLAG_COPIED flags are not repaired"
            ));
            continue;
        }
        for j in 0..s.geo.l2_entries() as usize {
            let idx = s
                .caches
                .get(&mut s.file, Kind::L2, HostOffset::new(off), false)?;
            let pos = if s.geo.extended_l2() { 2 * j } else { j };
            let e2 = fmt::table_get(s.caches.data(Kind::L2, idx), pos);
            let host = match l2::decode(e2, s.geo.cluster_bits(), s.geo.extended_l2()) {
                Desc::Normal { host } | Desc::ZeroAlloc { host }
                    if host % s.geo.cluster_size() == 0 =>
                {
                    host
                }
                _ => continue,
            };
            let rc = stored_refcount(s, host / s.geo.cluster_size(), nb_clusters)?;
            let want = rc == 1;
            let missing = want && refs_of(&w, host / s.geo.cluster_size()) == 1;
            if (e2 & OFLAG_COPIED != 0) != want {
                if all || (leaks_mode && missing) {
                    let ne = if want {
                        e2 | OFLAG_COPIED
                    } else {
                        e2 & !OFLAG_COPIED
                    };
                    let idx = s
                        .caches
                        .get(&mut s.file, Kind::L2, HostOffset::new(off), false)?;
                    fmt::table_set(s.caches.data_mut(Kind::L2, idx), pos, ne);
                    w.report.corruptions_fixed += 1;
                    fixed = true;
                } else {
                    w.error(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={e2:x} refcount={rc}"
                    ));
                    w.report.missing_copied += missing as u64;
                }
            }
        }
    }
    w.report.image_end_offset = w
        .refs
        .iter()
        .rposition(|&r| r > 0)
        .map_or(0, |c| c as u64 + 1)
        .max(highest_stored)
        * s.geo.cluster_size();
    if repair.is_some() && s.access.writable_storage() {
        if fixed {
            s.caches.flush(&mut s.file, Kind::L2)?;
            s.caches.flush(&mut s.file, Kind::Refblock)?;
        }
        if all {
            let bits = header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT;
            if s.header.incompatible_features & bits != 0 {
                s.write_header(
                    header::INCOMPAT_FIELD,
                    "header (clear dirty/corrupt)",
                    |h| h.incompatible_features &= !bits,
                )?;
                s.file.barrier()?;
                s.access.allow_writes();
            }
        }
    }
    Ok((w.report, fixed))
}

/// The host byte ranges of the metadata other than L2 tables (as they are now, after any
/// rebuild): header cluster, active L1 table, refcount table and blocks, snapshot table and the
/// snapshots' L1 tables, encryption header, bitmap directory. A table the COPIED pass would
/// write must not share a cluster with any of them.
fn non_l2_metadata(s: &State) -> Vec<(u64, u64, &'static str)> {
    let cs = s.geo.cluster_size();
    let h = &*s.header;
    let mut v = vec![
        (0, cs, "image header"),
        (h.l1_table_offset, h.l1_size as u64 * 8, "active L1 table"),
        (
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
            "refcount table",
        ),
    ];
    for &e in s.alloc.reftable() {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 {
            v.push((off, cs, "refcount block"));
        }
    }
    if h.nb_snapshots > 0 {
        v.push((
            h.snapshots_offset,
            s.snapshots.table_size(),
            "snapshot table",
        ));
    }
    for e in s.snapshots.entries() {
        v.push((e.l1_table_offset, e.l1_size as u64 * 8, "snapshot L1 table"));
    }
    if let Some(ext) = h.extension(header::EXT_CRYPTO) {
        if ext.len() >= 16 {
            v.push((fmt::be64(ext, 0), fmt::be64(ext, 8), "encryption header"));
        }
    }
    if let Some(ext) = h.extension(header::EXT_BITMAPS) {
        if ext.len() >= 24 {
            v.push((fmt::be64(ext, 16), fmt::be64(ext, 8), "bitmap directory"));
        }
    }
    v
}

/// Which of `ranges` has bytes in the cluster at `off`, if any.
fn shares_cluster_with(
    ranges: &[(u64, u64, &'static str)],
    off: u64,
    cs: u64,
) -> Option<&'static str> {
    let end = off.saturating_add(cs);
    ranges.iter().find_map(|&(o, len, what)| {
        let first = o - o % cs;
        let last = o.saturating_add(len);
        (len > 0 && first < end && off < last).then_some(what)
    })
}

/// Write new refcount structures past the end of the file, describing every reference found,
/// and switch the header to them.
///
/// Crash analysis: the new blocks and table are written and made stable before the header
/// switch (one write inside sector 0); until then the old structures stay in force.
fn rebuild(s: &mut State, nb_clusters: u64) -> Result<()> {
    let w = walk(s, nb_clusters, false)?;
    let mut refs: Vec<u64> = w.refs.iter().map(|&r| r as u64).collect();
    let cs = s.geo.cluster_size();
    let per = s.geo.refcounts_per_block();
    let mut area = nb_clusters.max(s.alloc.alloc_end().get());
    let (mut nb, mut nt) = (0u64, 1u64);
    loop {
        let total = area + nb + nt;
        let nb2 = total.div_ceil(per);
        let nt2 = (nb2 * 8).div_ceil(cs).max(1);
        if nb2 == nb && nt2 == nt {
            // Not over a cluster that an entry names past the end of the file.
            match w.past_end.range(area..area + nb + nt).next_back() {
                Some((&c, _)) => area = c + 1,
                None => break,
            }
        }
        nb = nb2;
        nt = nt2;
    }
    if nt > header::MAX_REFTABLE_BYTES / cs {
        return Err(Error::unsupported(
            s.name(),
            "rebuilding a refcount table larger than 8 MiB",
        ));
    }
    refs.resize((area + nb + nt) as usize, 0);
    // Clusters named past the old end lie inside the file now: count their references.
    for (&c, &n) in w.past_end.range(..area) {
        refs[c as usize] = n as u64;
    }
    for c in area..area + nb + nt {
        refs[c as usize] = 1;
    }
    let max = refcount::max(s.header.refcount_order);
    let mut table = vec![0u64; (nt * cs / 8) as usize];
    for r in 0..nb {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per {
            let c = r * per + i;
            if let Some(&v) = refs.get(c as usize) {
                if v > max {
                    return Err(Error::corrupt(
                        s.name(),
                        format!("refcount of cluster {c} overflows"),
                        c * cs,
                    ));
                }
                refcount::set(&mut block, i as usize, s.header.refcount_order, v);
            }
        }
        let off = (area + r) * cs;
        s.file
            .write_meta(&block, HostOffset::new(off), "rebuilt refcount block")?;
        table[r as usize] = off;
    }
    let toff = (area + nb) * cs;
    s.file.write_meta(
        &fmt::encode_table(&table),
        HostOffset::new(toff),
        "rebuilt refcount table",
    )?;
    s.caches.flush(&mut s.file, Kind::L2)?;
    s.file.barrier()?;
    s.write_header(
        header::REFTABLE_FIELDS,
        "header (refcount table switch)",
        |h| {
            h.refcount_table_offset = toff;
            h.refcount_table_clusters = nt as u32;
        },
    )?;
    s.caches.clear(Kind::Refblock);
    s.file.barrier()?;
    s.install_rebuilt_reftable(table, HostCluster::new(area + nb + nt));
    Ok(())
}
