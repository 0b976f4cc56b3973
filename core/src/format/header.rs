//! The qcow2 header (cluster 0): fields, header extensions, backing file name.

use super::{be32, be64, put32, put64};

/// The magic bytes `QFI\xfb`.
pub const MAGIC_BYTES: [u8; 4] = *b"QFI\xfb";

/// Incompatible feature: dirty (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible features known to this library.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear: bitmaps extension consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear: raw external data.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Autoclear bits we keep (we preserve bitmaps untouched).
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header this library writes (with the compression type field).
pub const V3_HEADER_LEN: u32 = 112;

/// Byte range of the L1 fields (l1_size, l1_table_offset) switched together in one write.
pub const L1_FIELDS: std::ops::Range<usize> = 36..48;
/// Byte range of the refcount table fields.
pub const REFTABLE_FIELDS: std::ops::Range<usize> = 48..60;
/// Byte range of the snapshot table fields.
pub const SNAPSHOT_FIELDS: std::ops::Range<usize> = 60..72;
/// Byte range of the incompatible features field.
pub const INCOMPAT_FIELD: std::ops::Range<usize> = 72..80;
/// Byte range of the virtual size field.
pub const SIZE_FIELD: std::ops::Range<usize> = 24..32;

/// Largest L1 table QEMU accepts, in entries.
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// One header extension, kept as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Payload.
    pub data: Vec<u8>,
}

/// A parse failure: what is wrong and at which offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Malformed header.
    Corrupt(String, u64),
    /// A feature this library does not implement.
    Unsupported(String),
}

/// The parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 entries.
    pub l1_size: u32,
    /// Active L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header bytes past the fields we know (up to header_length), kept as they are.
    pub unknown_fields: Vec<u8>,
    /// Header extensions other than the end marker, in order.
    pub extensions: Vec<Extension>,
    /// Backing file name.
    pub backing_file: Option<String>,
}

fn corrupt<T>(what: impl Into<String>, off: u64) -> Result<T, HeaderError> {
    Err(HeaderError::Corrupt(what.into(), off))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    /// Payload of the first extension of `kind`.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }
    /// Replace (or remove, with `None`) the extension of `kind`.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        let pos = self.extensions.iter().position(|e| e.kind == kind);
        match (pos, data) {
            (Some(p), Some(d)) => self.extensions[p].data = d,
            (Some(p), None) => {
                self.extensions.remove(p);
            }
            (None, Some(d)) => self.extensions.push(Extension { kind, data: d }),
            (None, None) => {}
        }
    }
    /// The backing format named in the header, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }
    /// Names of the set incompatible feature bits in `bits`, from the feature name table, or
    /// `bit N` where the table does not name them.
    pub fn feature_names(&self, class: u8, bits: u64) -> Vec<String> {
        let table = self.extension(EXT_FEATURE_TABLE).unwrap_or(&[]);
        (0..64)
            .filter(|b| bits & (1u64 << b) != 0)
            .map(|b| {
                table
                    .chunks_exact(48)
                    .find(|e| e[0] == class && e[1] as u32 == b)
                    .map(|e| {
                        let name = &e[2..];
                        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        String::from_utf8_lossy(&name[..end]).into_owned()
                    })
                    .unwrap_or_else(|| format!("Unknown incompatible feature: bit {b}"))
            })
            .collect()
    }

    /// Parse and validate a header from the first cluster of the file (`buf` holds at least
    /// the first cluster, or the whole file when shorter). `file_len` is the host file length.
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        if buf.len() < V2_HEADER_LEN as usize {
            return corrupt("file is too short to hold a qcow2 header", 0);
        }
        if buf[0..4] != MAGIC_BYTES {
            return corrupt("Image is not in qcow2 format (bad magic)", 0);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(HeaderError::Unsupported(format!(
                "cluster size 2^{cluster_bits} (Unsupported cluster size)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            unknown_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return corrupt("qcow2 header too short", 0);
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return corrupt("qcow2 header too short", 100);
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > buf.len() {
                return corrupt("qcow2 header exceeds cluster size", 100);
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
            let known_end = h.header_length.min(V3_HEADER_LEN) as usize;
            if known_end < h.header_length as usize {
                h.unknown_fields = buf[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
            let _ = known_end;
        }
        if h.refcount_order > 6 {
            return corrupt(
                format!(
                    "Reference count entry width too large ({} bits)",
                    1u64 << h.refcount_order.min(63)
                ),
                96,
            );
        }
        if h.crypt_method > 2 {
            return corrupt(
                format!("Unsupported encryption method: {}", h.crypt_method),
                32,
            );
        }
        // Header extensions.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        }
        .min(buf.len() as u64) as usize;
        let mut pos = h.header_length as usize;
        if version == 2 {
            pos = V2_HEADER_LEN as usize;
        }
        let mut seen: Vec<u32> = Vec::new();
        loop {
            if pos + 8 > ext_end {
                // No room for (more) extensions: QEMU treats this as the end of the list.
                break;
            }
            let kind = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_end = pos + 8 + len;
            if data_end > ext_end {
                return corrupt(format!("Header extension {kind:#x} too large"), pos as u64);
            }
            if seen.contains(&kind) {
                return corrupt(
                    format!("Header extension {kind:#x} appears twice"),
                    pos as u64,
                );
            }
            seen.push(kind);
            h.extensions.push(Extension {
                kind,
                data: buf[pos + 8..data_end].to_vec(),
            });
            pos = pos + 8 + len.div_ceil(8) * 8;
        }
        // Backing file name.
        if h.backing_file_offset != 0 && h.backing_file_size == 0 {
            // QEMU: an empty name means no backing file.
            h.backing_file_offset = 0;
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset;
            let len = h.backing_file_size as u64;
            if off > cluster_size
                || len > MAX_BACKING_NAME as u64
                || off + len > cluster_size
                || (off + len) as usize > buf.len()
            {
                return corrupt("Backing file name too long or out of the header cluster", 8);
            }
            let name = &buf[off as usize..(off + len) as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        // Feature checks.
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(HeaderError::Unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                h.feature_names(0, unknown).join(", ")
            )));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::Unsupported(
                "external data file (incompatible feature bit 2)".into(),
            ));
        }
        match h.compression_type {
            0 => {}
            1 => {
                if h.incompatible_features & INCOMPAT_COMPRESSION == 0 {
                    return corrupt(
                        "Compression type zstd is set but the compression type feature bit is not",
                        104,
                    );
                }
            }
            t => return Err(HeaderError::Unsupported(format!("compression type {t}"))),
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 && h.compression_type == 0 {
            return corrupt(
                "Compression type feature bit set but compression type is zlib",
                72,
            );
        }
        if h.crypt_method == 2 && h.extension(EXT_CRYPTO).is_none() {
            return corrupt("Missing CRYPTO header for crypt method 2", 32);
        }
        if h.crypt_method != 2 && h.extension(EXT_CRYPTO).is_some() {
            return corrupt(
                "CRYPTO header extension only expected with LUKS encryption method",
                32,
            );
        }
        if let Some(b) = h.extension(EXT_BITMAPS) {
            if b.len() < 24 {
                return corrupt(
                    "Bitmaps header extension is too short",
                    h.header_length as u64,
                );
            }
            let nb = be32(b, 0);
            let dir_size = be64(b, 8);
            let dir_off = be64(b, 16);
            if nb == 0 || nb > 65535 {
                return corrupt(
                    format!("Bitmaps extension: {nb} bitmaps (must be 1..65535)"),
                    0,
                );
            }
            if dir_size > 64 << 20 {
                return corrupt(
                    "Bitmaps extension: bitmap directory is larger than 64 MiB",
                    0,
                );
            }
            if !dir_off.is_multiple_of(1u64 << h.cluster_bits)
                || dir_off.checked_add(dir_size).is_none()
            {
                return corrupt("Bitmaps extension: invalid bitmap directory offset", 0);
            }
        }
        if let Some(c) = h.extension(EXT_CRYPTO) {
            if c.len() < 16 {
                return corrupt("Crypto header extension is too short", 0);
            }
        }
        h.validate_tables()?;
        Ok(h)
    }

    fn validate_tables(&self) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return corrupt("Image does not contain a reference count table", 56);
        }
        if self.refcount_table_clusters as u64 > MAX_REFTABLE_BYTES / cs {
            return corrupt("Reference count table too large", 56);
        }
        check_table(
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * cs,
            cs,
            "Reference count table",
            48,
        )?;
        // L1 table.
        if self.l1_size as u64 > MAX_L1_ENTRIES {
            return corrupt("Active L1 table too large", 36);
        }
        check_table(
            self.l1_table_offset,
            self.l1_size as u64 * 8,
            cs,
            "Active L1 table",
            40,
        )?;
        let needed = self
            .l1_entries_for(self.size)
            .ok_or(HeaderError::Corrupt("Image is too big".into(), 24))?;
        if needed > MAX_L1_ENTRIES {
            return corrupt("Image is too big", 24);
        }
        if (self.l1_size as u64) < needed {
            return corrupt("L1 table is too small", 36);
        }
        // Snapshot table.
        if self.nb_snapshots > super::snapshot::MAX_SNAPSHOTS {
            return corrupt("Too many snapshots", 60);
        }
        if self.nb_snapshots > 0 {
            check_table(self.snapshots_offset, 40, cs, "Snapshot table", 64)?;
        }
        Ok(())
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        let es = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / es
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let per_l1 = self.l2_entries().checked_mul(self.cluster_size())?;
        Some(size.div_ceil(per_l1))
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Serialize the whole header cluster (fields, extensions, backing name). Fails when it does
    /// not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, HeaderError> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        self.write_fields(&mut b);
        let mut pos = self.header_length as usize;
        if self.version == 3 && self.header_length as usize > V3_HEADER_LEN as usize {
            let n = self
                .unknown_fields
                .len()
                .min(self.header_length as usize - V3_HEADER_LEN as usize);
            b[V3_HEADER_LEN as usize..V3_HEADER_LEN as usize + n]
                .copy_from_slice(&self.unknown_fields[..n]);
        }
        if self.version == 2 {
            pos = V2_HEADER_LEN as usize;
        }
        for e in &self.extensions {
            let need = 8 + e.data.len().div_ceil(8) * 8;
            if pos + need + 8 > cs {
                return Err(HeaderError::Corrupt(
                    "header extensions do not fit in the first cluster".into(),
                    pos as u64,
                ));
            }
            put32(&mut b, pos, e.kind);
            put32(&mut b, pos + 4, e.data.len() as u32);
            b[pos + 8..pos + 8 + e.data.len()].copy_from_slice(&e.data);
            pos += need;
        }
        // End marker (already zero).
        pos += 8;
        if let Some(name) = &self.backing_file {
            if pos + name.len() > cs || name.len() > MAX_BACKING_NAME as usize {
                return Err(HeaderError::Corrupt(
                    "backing file name does not fit in the first cluster".into(),
                    pos as u64,
                ));
            }
            b[pos..pos + name.len()].copy_from_slice(name.as_bytes());
            put64(&mut b, 8, pos as u64);
            put32(&mut b, 16, name.len() as u32);
            pos += name.len();
        } else {
            put64(&mut b, 8, 0);
            put32(&mut b, 16, 0);
        }
        b.truncate(pos.div_ceil(8) * 8);
        Ok(b)
    }

    /// Write the fixed fields into `b` (at least header_length bytes, or 104+ for v3).
    pub fn write_fields(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&MAGIC_BYTES);
        put32(b, 4, self.version);
        put64(
            b,
            8,
            if self.backing_file.is_some() {
                self.backing_file_offset
            } else {
                0
            },
        );
        put32(b, 16, self.backing_file_size);
        put32(b, 20, self.cluster_bits);
        put64(b, 24, self.size);
        put32(b, 32, self.crypt_method);
        put32(b, 36, self.l1_size);
        put64(b, 40, self.l1_table_offset);
        put64(b, 48, self.refcount_table_offset);
        put32(b, 56, self.refcount_table_clusters);
        put32(b, 60, self.nb_snapshots);
        put64(b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(b, 72, self.incompatible_features);
            put64(b, 80, self.compatible_features);
            put64(b, 88, self.autoclear_features);
            put32(b, 96, self.refcount_order);
            put32(b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
            }
        }
    }

    /// The bytes of `range` of the fixed fields, for an in-sector header update.
    pub fn field_bytes(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let mut b = vec![0u8; V3_HEADER_LEN as usize];
        self.write_fields(&mut b);
        b[range].to_vec()
    }

    /// The feature name table this library writes (QEMU's eight entries).
    pub fn feature_table() -> Vec<u8> {
        let names: [(u8, u8, &str); 8] = [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ];
        let mut out = vec![0u8; names.len() * 48];
        for (i, (class, bit, name)) in names.iter().enumerate() {
            let e = &mut out[i * 48..(i + 1) * 48];
            e[0] = *class;
            e[1] = *bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        }
        out
    }
}

/// Validate a table's offset and length: aligned, inside the host offset space.
fn check_table(offset: u64, len: u64, cs: u64, what: &str, field: u64) -> Result<(), HeaderError> {
    if !offset.is_multiple_of(cs) {
        return corrupt(
            format!("{what} offset {offset:#x} is not cluster aligned"),
            field,
        );
    }
    if offset == 0 && len > 0 {
        return corrupt(format!("{what} is at offset 0"), field);
    }
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 && end <= super::l2::MAX_HOST_OFFSET => Ok(()),
        _ => corrupt(format!("{what} offset {offset:#x} is invalid"), field),
    }
}
