//! How the guest address space is stored, as `qemu-img map` reports it, and the facts
//! `qemu-img info` shows.

use crate::backing;
use crate::crypto::EncryptionInfo;
use crate::error::Result;
use crate::format::header;
use crate::format::l2;
use crate::mapping::Desc;
use crate::offset::GuestOffset;
use crate::options::{Compat, CompressionType};
use crate::state::State;

/// Facts about an image, as `qemu-img info` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name the image was opened with.
    pub filename: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Bytes the host file occupies on disk.
    pub actual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Version.
    pub compat: Compat,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts bit.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit (lazy refcounts in use and not cleanly closed).
    pub dirty: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name as stored in the image.
    pub backing_file: Option<String>,
    /// Backing file format as stored in the image.
    pub backing_format: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Encryption method (0 none, 1 AES, 2 LUKS).
    pub crypt_method: u32,
    /// How the image is encrypted (the LUKS header), as `qemu-img info` shows it.
    pub encryption: Option<EncryptionInfo>,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// The internal snapshots, in table order.
    pub snapshots: Vec<crate::SnapshotInfo>,
    /// Whether the image is open read-only.
    pub read_only: bool,
}

/// One extent of the guest address space, as `qemu-img map --output=json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Backing-chain depth the data comes from (0 = this image; the chain length when unallocated).
    pub depth: u32,
    /// Whether some image in the chain holds it.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (allocated).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the file at `depth`, for uncompressed data.
    pub offset: Option<u64>,
}

impl State {
    pub(crate) fn map_inner(
        &mut self,
        offset: u64,
        len: u64,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        let geo = self.geo;
        // Encrypted data has no host offset a reader could use (QEMU reports none).
        let crypt = self.crypto.is_some();
        let cs = geo.cluster_size();
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let (c, co) = geo.split(GuestOffset::new(off));
            let mut n = (cs - co).min(end - off);
            if self.l2_table(c)?.is_none() {
                // The whole L2 range is unallocated here.
                let range_end = geo.guest_offset(geo.next_l2_range(c)).get();
                n = range_end.min(end) - off;
                self.map_unallocated(off, n, out)?;
                off += n;
                continue;
            }
            let e = self.lookup(c)?;
            let bm = e.bitmap;
            if geo.extended_l2() && !matches!(e.desc(&geo), Desc::Compressed { .. }) {
                let scs = geo.subcluster_size();
                let host = e.host().get();
                let mut o = co;
                while o < co + n {
                    let s = (o / scs) as u32;
                    let m = ((s as u64 + 1) * scs).min(co + n) - o;
                    let g = geo.guest_offset(c).get() + o;
                    let at = (host != 0).then_some(host + o);
                    if l2::sub::allocated(bm, s) {
                        push_map(out, hide(entry(g, m, true, false, at, 0), crypt));
                    } else if l2::sub::zero(bm, s) {
                        push_map(out, hide(entry(g, m, false, true, at, 0), crypt));
                    } else if host != 0 && self.backing.is_none() {
                        // Unallocated subcluster of an allocated cluster: qemu reports it
                        // as zero with the host offset.
                        let mut me = entry(g, m, false, true, at, 0);
                        me.present = false;
                        push_map(out, hide(me, crypt));
                    } else {
                        self.map_unallocated(g, m, out)?;
                    }
                    o += m;
                }
                off += n;
                continue;
            }
            match e.desc(&geo) {
                Desc::Unallocated => self.map_unallocated(off, n, out)?,
                Desc::ZeroPlain => push_map(out, hide(entry(off, n, false, true, None, 0), crypt)),
                Desc::ZeroAlloc { host } => push_map(
                    out,
                    hide(entry(off, n, false, true, Some(host.get() + co), 0), crypt),
                ),
                Desc::Normal { host } => push_map(
                    out,
                    hide(entry(off, n, true, false, Some(host.get() + co), 0), crypt),
                ),
                Desc::Compressed { .. } => {
                    let mut me = entry(off, n, true, false, None, 0);
                    me.compressed = true;
                    push_map(out, hide(me, crypt));
                }
            }
            off += n;
        }
        Ok(())
    }

    pub(crate) fn map_unallocated(
        &mut self,
        off: u64,
        n: u64,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        match &self.backing {
            Some(b) => {
                for mut me in b.map(off, n)? {
                    me.depth += 1;
                    push_map(out, me);
                }
            }
            None => push_map(
                out,
                MapEntry {
                    start: off,
                    length: n,
                    depth: 0,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                },
            ),
        }
        Ok(())
    }

    /// Facts about the image (`actual` is the space the file occupies).
    pub(crate) fn info(&self) -> Result<ImageInfo> {
        let h = &*self.header;
        let bf = h.backing_file.clone();
        Ok(ImageInfo {
            filename: self.name().to_string(),
            virtual_size: h.size,
            actual_size: self.file.allocated_size()?,
            cluster_size: self.geo.cluster_size() as u32,
            compat: if h.version >= 3 {
                Compat::V3
            } else {
                Compat::V2
            },
            refcount_bits: h.refcount_bits(),
            lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: h.incompatible_features & header::INCOMPAT_CORRUPT != 0,
            dirty: h.incompatible_features & header::INCOMPAT_DIRTY != 0,
            extended_l2: self.geo.extended_l2(),
            compression_type: self.compression,
            full_backing_filename: bf
                .as_ref()
                .map(|b| backing::resolve(self.name(), b).display().to_string()),
            backing_file: bf,
            backing_format: h.backing_format(),
            crypt_method: h.crypt_method,
            encryption: self.crypto.as_ref().map(|c| c.info()),
            snapshot_count: h.nb_snapshots,
            snapshots: self.snapshot_list(),
            read_only: self.access.read_only(),
        })
    }
}

fn entry(
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    offset: Option<u64>,
    depth: u32,
) -> MapEntry {
    MapEntry {
        start,
        length,
        depth,
        present: true,
        zero,
        data,
        compressed: false,
        offset,
    }
}

/// `me` without its host offset when the image is encrypted.
fn hide(mut me: MapEntry, crypt: bool) -> MapEntry {
    if crypt {
        me.offset = None;
    }
    me
}

fn push_map(out: &mut Vec<MapEntry>, me: MapEntry) {
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.offset, me.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.start + last.length == me.start
            && last.depth == me.depth
            && last.present == me.present
            && last.zero == me.zero
            && last.data == me.data
            && last.compressed == me.compressed
            && contiguous
        {
            last.length += me.length;
            return;
        }
    }
    out.push(me);
}
