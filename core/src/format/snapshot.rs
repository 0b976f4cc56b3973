//! The internal snapshot table (parse and serialize; snapshot operations live in `snapshot.rs`).

use super::{be16, be32, be64, put16, put32, put64};

/// Most snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table QEMU accepts.
pub const MAX_TABLE_SIZE: u64 = 64 << 20;
/// Largest extra data per entry.
pub const MAX_EXTRA: u32 = 1024;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock in ns.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field).
    pub vm_state_size: u32,
    /// Extra data, kept byte-exact (vm_state_size_large, disk_size, icount, unknown).
    pub extra: Vec<u8>,
    /// The ID and name bytes as stored, when either is not UTF-8 (`id` and `name` then hold
    /// lossy copies): a rewritten table keeps them byte-exact.
    pub raw: Option<(Vec<u8>, Vec<u8>)>,
}

impl SnapshotEntry {
    /// The ID's bytes, as stored.
    pub fn id_bytes(&self) -> &[u8] {
        self.raw.as_ref().map_or(self.id.as_bytes(), |r| &r.0)
    }
    /// The name's bytes, as stored.
    pub fn name_bytes(&self) -> &[u8] {
        self.raw.as_ref().map_or(self.name.as_bytes(), |r| &r.1)
    }
    /// Virtual disk size at snapshot time, if recorded.
    pub fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16).then(|| be64(&self.extra, 8))
    }
    /// VM state size, from extra data when present.
    pub fn vm_state_size_large(&self) -> u64 {
        if self.extra.len() >= 8 {
            be64(&self.extra, 0)
        } else {
            self.vm_state_size as u64
        }
    }
}

/// Why a snapshot table does not parse.
#[derive(Debug)]
pub struct TableError {
    /// What is wrong.
    pub what: String,
    /// Where, relative to the start of the table.
    pub at: u64,
    /// The bytes ran out before the entries did (a longer read may succeed).
    pub truncated: bool,
}

/// Parse `count` entries from the table bytes (which may run past the table's end).
pub fn parse(table: &[u8], count: u32) -> Result<Vec<SnapshotEntry>, TableError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let truncated = |i: u32, pos: usize| TableError {
        what: format!("snapshot table entry {i} is truncated"),
        at: pos as u64,
        truncated: true,
    };
    for i in 0..count {
        if pos + 40 > table.len() {
            return Err(truncated(i, pos));
        }
        let e = &table[pos..];
        let id_len = be16(e, 12) as usize;
        let name_len = be16(e, 14) as usize;
        let extra_len = be32(e, 36);
        if extra_len > MAX_EXTRA {
            return Err(TableError {
                what: format!("snapshot {i} has too much extra data ({extra_len} bytes)"),
                at: pos as u64,
                truncated: false,
            });
        }
        let extra_len = extra_len as usize;
        let total = 40 + extra_len + id_len + name_len;
        if pos + total > table.len() {
            return Err(truncated(i, pos));
        }
        let extra = e[40..40 + extra_len].to_vec();
        let id_raw = &e[40 + extra_len..40 + extra_len + id_len];
        let name_raw = &e[40 + extra_len + id_len..total];
        let id = String::from_utf8_lossy(id_raw).into_owned();
        let name = String::from_utf8_lossy(name_raw).into_owned();
        let raw = (id.as_bytes() != id_raw || name.as_bytes() != name_raw)
            .then(|| (id_raw.to_vec(), name_raw.to_vec()));
        out.push(SnapshotEntry {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            id,
            name,
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size: be32(e, 32),
            extra,
            raw,
        });
        pos += total.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Size in bytes of the table holding `entries`.
pub fn table_size(entries: &[SnapshotEntry]) -> u64 {
    entries
        .iter()
        .map(|e| {
            ((40 + e.extra.len() + e.id_bytes().len() + e.name_bytes().len()) as u64).div_ceil(8)
                * 8
        })
        .sum()
}

/// Serialize entries into a table.
pub fn serialize(entries: &[SnapshotEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        let (id, name) = (e.id_bytes(), e.name_bytes());
        let total = 40 + e.extra.len() + id.len() + name.len();
        out.resize(start + total.div_ceil(8) * 8, 0);
        let b = &mut out[start..];
        put64(b, 0, e.l1_table_offset);
        put32(b, 8, e.l1_size);
        put16(b, 12, id.len() as u16);
        put16(b, 14, name.len() as u16);
        put32(b, 16, e.date_sec);
        put32(b, 20, e.date_nsec);
        put64(b, 24, e.vm_clock_nsec);
        put32(b, 32, e.vm_state_size);
        put32(b, 36, e.extra.len() as u32);
        let mut p = 40;
        b[p..p + e.extra.len()].copy_from_slice(&e.extra);
        p += e.extra.len();
        b[p..p + id.len()].copy_from_slice(id);
        p += id.len();
        b[p..p + name.len()].copy_from_slice(name);
    }
    out
}
