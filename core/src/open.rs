//! Creating and opening images: option checks, the new file's first clusters, header and
//! table validation, and building the state of an open image.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::alloc::Allocator;
use crate::backing::{self, Backing};
use crate::cache::Caches;
use crate::check::RepairMode;
use crate::crypto::EncryptionFormat;
use crate::datapath::Decompressed;
use crate::error::{Error, Result};
use crate::flush::Pending;
use crate::format::header::{self, Header, HeaderError};
use crate::format::refcount;
use crate::format::snapshot;
use crate::format::{self as fmt};
use crate::host::HostFile;
use crate::image::Image;
use crate::lock::LockMode;
use crate::mapping::Tables;
use crate::offset::Geometry;
use crate::options::{
    CacheMode, Compat, CompressionType, CreateOptions, OpenOptions, Preallocation,
};
use crate::state::{Access, MetaClusters, State, StoredHeader};
use crate::storage::{FileStorage, Storage};

fn map_header_err(name: &str, e: HeaderError) -> Error {
    match e {
        HeaderError::Corrupt(what, off) => Error::corrupt(name, what, off),
        HeaderError::Unsupported(f) => Error::unsupported(name, f),
    }
}

fn storage_err(name: &str, what: &str) -> impl Fn(std::io::Error) -> Error {
    let (name, what) = (name.to_string(), what.to_string());
    move |e| Error::io(&name, what.clone(), e)
}

/// Check creation options before anything touches the disk.
fn validate_create(opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size as u64;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::invalid(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {cs})"
        )));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || !(1..=64).contains(&rb) {
        return Err(Error::invalid(format!(
            "Refcount width must be a power of two and may not exceed 64 bits (got {rb})"
        )));
    }
    let v2 = opts.compat == Compat::V2;
    if v2 && rb != 16 {
        return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
    }
    if v2 && opts.lazy_refcounts {
        return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
    }
    if v2 && opts.extended_l2 {
        return Err(Error::invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
    }
    if v2 && opts.compression_type != CompressionType::Zlib {
        return Err(Error::invalid(
                "Compression type selection is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if opts.backing_file.is_some() && opts.preallocation != Preallocation::Off && !opts.extended_l2
    {
        return Err(Error::invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if let Some(e) = &opts.encryption {
        if v2 && opts.preallocation == Preallocation::Metadata {
            // v2 has no zero flag: preallocated clusters would be plain zeros on disk, which
            // decrypt to noise.
            return Err(Error::invalid(
                "Preallocation of an encrypted image needs compatibility level 1.1 (compat=1.1): version 2 has no zero clusters, and preallocated zeros would not decrypt to zeros",
            ));
        }
        if e.format == EncryptionFormat::Luks {
            let spec = crate::crypto::spec_of(e);
            spec.validate().map_err(Error::invalid)?;
            if !(spec.key_bytes() * crate::crypto::luks::STRIPES as usize)
                .is_multiple_of(crate::crypto::SECTOR)
            {
                // qemu-img aborts on these (an assertion): key material must be whole sectors.
                return Err(Error::invalid(format!(
                    "{}-{} keys make key material that is not a whole number of 512-byte sectors, which QEMU cannot read; use another cipher",
                    e.cipher_alg.as_str(),
                    e.cipher_mode.as_str()
                )));
            }
        }
    }
    if opts.backing_file.is_none() && opts.backing_format.is_some() {
        return Err(Error::invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    Ok(())
}

impl Image {
    /// Create a new image file at `path` (truncating an existing one, unless someone has it open:
    /// then [`Error::Locked`], and the file is left as it was).
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let name = path.display().to_string();
        validate_create(opts)?;
        let st = FileStorage::create(path).map_err(|e| Error::io(&name, "create", e))?;
        // Locked before it is truncated (in create_on), as QEMU does: an image in use by
        // someone else is refused, not destroyed. The locks go with the file, at the end.
        st.lock(&name, LockMode::Create)?;
        Image::create_on(Arc::new(st), &name, opts)?;
        // The new directory entry must be durable too, or a crash could lose the whole file.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&name, "sync the directory of the new image", e))
    }

    /// Create a new image on `storage` (which should be empty). `name` is used in messages and to
    /// resolve a relative backing file name.
    pub fn create_on(storage: Arc<dyn Storage>, name: &str, opts: &CreateOptions) -> Result<()> {
        validate_create(opts)?;
        let cs = opts.cluster_size as u64;
        let v2 = opts.compat == Compat::V2;
        let mut size = opts.size;
        let mut backing_format = opts.backing_format.clone();
        if let Some(bf) = &opts.backing_file {
            if bf.len() > header::MAX_BACKING_NAME as usize {
                return Err(Error::invalid("Backing file name too long"));
            }
            if opts.open_backing {
                let mut chain = Vec::new();
                let b = backing::open(
                    name,
                    bf,
                    backing_format.as_deref(),
                    opts.backing_password.as_ref(),
                    // Its size and format are metadata: an encrypted backing file needs no key
                    // for them (as qemu-img create takes it); a given one is checked.
                    true,
                    &crate::BackingPolicy::Any,
                    false,
                    &mut chain,
                )?;
                if size == 0 {
                    size = b.virtual_size();
                }
                if backing_format.is_none() {
                    backing_format = Some(
                        match b {
                            Backing::Qcow2(_) => "qcow2",
                            Backing::Raw { .. } => "raw",
                        }
                        .to_string(),
                    );
                }
            } else if size == 0 {
                return Err(Error::invalid(
                    "Image size must be given when the backing file is not opened",
                ));
            }
        }
        let size = size.div_ceil(512) * 512;
        let cluster_bits = cs.trailing_zeros();
        let refcount_order = opts.refcount_bits.trailing_zeros();
        let mut h = Header {
            version: if v2 { 2 } else { 3 },
            backing_file_offset: 0,
            backing_file_size: opts.backing_file.as_ref().map_or(0, |b| b.len() as u32),
            cluster_bits,
            size: 0,
            crypt_method: match &opts.encryption {
                Some(e) if e.format == EncryptionFormat::Aes => 1,
                // LUKS: set once the LUKS header area exists (below).
                _ => 0,
            },
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: if v2 {
                header::V2_HEADER_LEN
            } else {
                header::V3_HEADER_LEN
            },
            compression_type: 0,
            unknown_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: opts.backing_file.clone(),
        };
        if opts.extended_l2 {
            h.incompatible_features |= header::INCOMPAT_EXTL2;
        }
        if opts.compression_type == CompressionType::Zstd {
            h.incompatible_features |= header::INCOMPAT_COMPRESSION;
            h.compression_type = 1;
        }
        if opts.lazy_refcounts {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        }
        if let Some(f) = &backing_format {
            h.set_extension(header::EXT_BACKING_FORMAT, Some(f.as_bytes().to_vec()));
        }
        h.set_extension(header::EXT_FEATURE_TABLE, Some(Header::feature_table()));
        let mut hdr = match h.serialize() {
            Ok(b) => b,
            Err(_) => {
                // Small clusters: like QEMU, leave out the (optional) feature name table.
                h.set_extension(header::EXT_FEATURE_TABLE, None);
                h.serialize().map_err(|e| map_header_err(name, e))?
            }
        };
        hdr.resize(cs as usize, 0);
        // Refcount table (cluster 1) naming one refcount block (cluster 2) that counts
        // clusters 0..=2.
        let mut reftable = vec![0u8; cs as usize];
        fmt::table_set(&mut reftable, 0, 2 * cs);
        let mut block = vec![0u8; cs as usize];
        for c in 0..3 {
            refcount::set(&mut block, c, refcount_order, 1);
        }
        let w = storage_err(name, "write new image");
        storage.set_len(0).map_err(&w)?;
        storage.write_at(&hdr, 0).map_err(&w)?;
        storage.write_at(&reftable, cs).map_err(&w)?;
        storage.write_at(&block, 2 * cs).map_err(&w)?;
        // Now grow it with the engine: L1 table, size, preallocation. Creation is not atomic
        // anyway (a crash leaves a half-made file), so it runs without ordering barriers and
        // syncs once, at close.
        let img = Image::open_storage_chain(
            storage,
            name,
            &OpenOptions {
                open_backing: false,
                lazy_refcounts: Some(false),
                cache: CacheMode::Unsafe,
                without_key: true,
                ..OpenOptions::default()
            },
            &mut Vec::new(),
        )?;
        {
            let mut s = img.lock();
            s.resize_inner(size)?;
            if let Some(e) = opts
                .encryption
                .as_ref()
                .filter(|e| e.format == EncryptionFormat::Luks)
            {
                s.create_luks_area(e)?;
            }
            if opts.preallocation == Preallocation::Metadata {
                s.preallocate_metadata()?;
            }
        }
        img.close()
    }

    pub(crate) fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Image> {
        let name = path.display().to_string();
        let st = FileStorage::open(path, !opts.read_only, opts.cache.direct())
            .map_err(|e| Error::io(&name, "Could not open", e))?;
        if chain.is_empty() {
            if let Ok(c) = std::fs::canonicalize(path) {
                chain.push(c);
            }
        }
        Image::open_storage_chain(Arc::new(st), &name, opts, chain)
    }

    /// Open an image on `storage`. `name` is used in messages and to resolve backing files.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        name: &str,
        opts: &OpenOptions,
    ) -> Result<Image> {
        Image::open_storage_chain(storage, name, opts, &mut Vec::new())
    }

    pub(crate) fn open_storage_chain(
        storage: Arc<dyn Storage>,
        name: &str,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Image> {
        if opts.damaged && !opts.read_only {
            return Err(Error::invalid(format!(
                "{name}: a damaged image can only be opened read-only"
            )));
        }
        if opts.force_share && !opts.read_only {
            return Err(Error::invalid(format!(
                "{name}: force-share=on can only be used with read-only images"
            )));
        }
        // The locks come first: nothing read before them could be trusted not to change.
        storage.lock(name, opts.lock_mode())?;
        let file_len = storage.len().map_err(|e| Error::io(name, "stat", e))?;
        if file_len < header::V2_HEADER_LEN as u64 {
            return Err(Error::corrupt(
                name,
                format!("file is too short ({file_len} bytes) to be a qcow2 image"),
                0,
            ));
        }
        let mut first = vec![0u8; 4096.min(file_len as usize)];
        storage
            .read_at(&mut first, 0)
            .map_err(|e| Error::io(name, "read header", e))?;
        if first[0..4] != header::MAGIC_BYTES {
            return Err(Error::corrupt(
                name,
                "Image is not in qcow2 format (bad magic)",
                0,
            ));
        }
        let cb = fmt::be32(&first, 20);
        if !(9..=21).contains(&cb) {
            return Err(Error::unsupported(
                name,
                format!("cluster size 2^{cb} (Unsupported cluster size)"),
            ));
        }
        let cs = 1u64 << cb;
        let mut hbuf = vec![0u8; cs as usize];
        storage
            .read_at(&mut hbuf, 0)
            .map_err(|e| Error::io(name, "read header", e))?;
        let h = Header::parse(&hbuf).map_err(|e| map_header_err(name, e))?;
        let crypto = crate::crypto::open(
            name,
            &h,
            &*storage,
            file_len,
            opts.password.as_ref(),
            opts.without_key,
        )?
        .map(Arc::new);
        let damage = std::cell::RefCell::new(Vec::new());
        let read_table = |off: u64, len: u64, what: &str, field: u64| -> Result<Vec<u8>> {
            if len == 0 {
                return Ok(Vec::new());
            }
            let end = off.checked_add(len);
            if opts.damaged && end.is_some() && len <= 32 << 20 {
                // What the file still holds, zeros past its end (as QEMU reads it).
                let mut b = vec![0u8; len as usize];
                let have = file_len.saturating_sub(off).min(len) as usize;
                if (have as u64) < len {
                    damage.borrow_mut().push(format!(
                        "{what} at {off:#x} ({len} bytes) lies past the end of the file ({file_len} bytes): {} bytes of it read as zeros",
                        len - have as u64
                    ));
                }
                if have > 0 {
                    storage
                        .read_at(&mut b[..have], off)
                        .map_err(|e| Error::io(name, format!("read {what}"), e))?;
                }
                return Ok(b);
            }
            if end.is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(
                    name,
                    format!("{what} at {off:#x} ({len} bytes) lies past the end of the file"),
                    field,
                ));
            }
            let mut b = vec![0u8; len as usize];
            storage
                .read_at(&mut b, off)
                .map_err(|e| Error::io(name, format!("read {what}"), e))?;
            Ok(b)
        };
        let l1 = fmt::decode_table(&read_table(
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            "L1 table",
            40,
        )?);
        let reftable = fmt::decode_table(&read_table(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
            "refcount table",
            48,
        )?);
        let mut snapshots = Vec::new();
        if h.nb_snapshots > 0 {
            let avail = file_len
                .saturating_sub(h.snapshots_offset)
                .min(snapshot::MAX_TABLE_SIZE);
            // The entries' sizes are known only as they are parsed: read a guess (plenty for
            // entries of usual size), then more while the table runs past it.
            let mut len = avail.min((h.nb_snapshots as u64 * 256).max(64 << 10));
            snapshots = loop {
                let t = read_table(h.snapshots_offset, len, "snapshot table", 64)?;
                match snapshot::parse(&t, h.nb_snapshots) {
                    Ok(list) => break list,
                    Err(e) if e.truncated && len < avail => len = (len * 4).min(avail),
                    Err(e) => return Err(Error::corrupt(name, e.what, h.snapshots_offset + e.at)),
                }
            };
            for (i, s) in snapshots.iter().enumerate() {
                if s.l1_table_offset % cs != 0
                    || s.l1_size as u64 > header::MAX_L1_ENTRIES
                    || s.l1_table_offset
                        .checked_add(s.l1_size as u64 * 8)
                        .is_none_or(|e| e > file_len)
                {
                    return Err(Error::corrupt(
                        name,
                        format!("snapshot {} ('{}') has an invalid L1 table", i + 1, s.name),
                        h.snapshots_offset,
                    ));
                }
            }
        }
        let mut read_only = opts.read_only;
        let mut ro_reason = if read_only {
            "opened read-only".to_string()
        } else {
            String::new()
        };
        if !read_only && h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            read_only = true;
            ro_reason = "the image is marked corrupt; repair it with check -r all".into();
            // Used read-only: let others read it as a read-only user would.
            storage.lock(name, LockMode::ReadOnly)?;
        }
        if !read_only && h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0 {
            // data-file-raw without an external data file (which is refused above): QEMU
            // refuses to open such an image at all ("data-file-raw requires a data file"), so
            // it is never written here either. Read-only, to let its data be rescued.
            read_only = true;
            ro_reason = "the data-file-raw bit is set but the image has no external data file (the image is invalid; QEMU refuses to open it)".into();
            storage.lock(name, LockMode::ReadOnly)?;
        }
        if !read_only {
            if let Some(what) = active_l1_overlap(&h, cs, &snapshots, &reftable) {
                // The active L1 table is written in place: a write would change the other
                // structure too (a snapshot's L1 table: the snapshot's contents). QEMU's
                // overlap check refuses those writes and marks the image corrupt.
                read_only = true;
                ro_reason = format!(
                    "the active L1 table shares its clusters with the {what}; writing it would change that too (the image is corrupt)"
                );
                storage.lock(name, LockMode::ReadOnly)?;
            } else if let Some(what) = active_l2_over_refcounts(&h, cs, &l1, &reftable) {
                // Every refcount change would rewrite entries of that L2 table: what the guest
                // reads there would change with allocations elsewhere. QEMU's overlap check
                // refuses such refcount writes. `check -r all` moves the refcount structures.
                read_only = true;
                ro_reason = format!(
                    "an active L2 table shares its cluster with the {what}; refcount updates would change the guest's data (the image is corrupt; repair it with check -r all)"
                );
                storage.lock(name, LockMode::ReadOnly)?;
            }
        }
        let backing = match (&h.backing_file, opts.backing_policy()) {
            (Some(_), crate::BackingPolicy::None) | (None, _) => None,
            (Some(bf), policy) => Some(backing::open(
                name,
                bf,
                h.backing_format().as_deref(),
                opts.backing_password.as_ref(),
                opts.without_key,
                &policy,
                opts.force_share,
                chain,
            )?),
        };
        let l2_cap = match opts.l2_cache_size {
            Some(b) => (b / cs) as usize,
            None => (h.l1_size as usize).clamp(2, ((32u64 << 20) / cs).max(2) as usize),
        };
        let rb_cap = match opts.refcount_cache_size {
            Some(b) => (b / cs) as usize,
            None => 4,
        };
        let caches = Caches::new(cs as usize, l2_cap, rb_cap);
        let lazy = h.version >= 3
            && opts
                .lazy_refcounts
                .unwrap_or(h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0);
        let compression = if h.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        };
        let dirty = h.incompatible_features & header::INCOMPAT_DIRTY != 0;
        let clear_autoclear =
            !read_only && h.autoclear_features & !header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let geo = Geometry::new(cb, h.extended_l2(), h.refcount_order);
        let mut file = HostFile::new(
            name,
            storage.clone(),
            file_len,
            opts.cache == CacheMode::Unsafe,
        );
        if opts.damaged {
            file.set_damaged(damage.take());
        }
        let state = State {
            geo,
            file,
            tables: Tables::new(l1),
            alloc: Allocator::new(reftable, file_len.div_ceil(cs)),
            pending: Pending::default(),
            caches,
            decompressed: Decompressed::default(),
            meta: MetaClusters::default(),
            access: Access::new(read_only, ro_reason, !opts.read_only, opts.cache, lazy),
            backing,
            snapshots: crate::snapshot::Snapshots::new(snapshots),
            compression,
            crypto,
            header: StoredHeader::new(h),
            reserved: Default::default(),
        };
        let mut state = state;
        if let Some(r) = &opts.snapshot {
            if !opts.read_only {
                return Err(Error::invalid(format!(
                    "{name}: a snapshot can only be opened read-only"
                )));
            }
            state.enter_snapshot_view(r)?;
        }
        let img = Image::from_state(state, name, compression);
        if !read_only {
            let mut s = img.lock();
            let setup = (|| -> Result<()> {
                if clear_autoclear {
                    // We do not keep bitmaps up to date: mark them inconsistent, as QEMU's rule
                    // asks.
                    s.write_header(88..96, "header (autoclear features)", |h| {
                        h.autoclear_features &= header::AUTOCLEAR_DATA_FILE_RAW
                    })?;
                    s.file.barrier()?;
                }
                if dirty {
                    // Refcounts may be stale after a crash with lazy refcounts: rebuild them.
                    crate::check::run(&mut s, Some(RepairMode::All))?;
                }
                Ok(())
            })();
            if let Err(e) = setup {
                // Dropping the half-opened image must not close it normally: that would write
                // back a half-done rebuild and clear the dirty bit over stale refcounts.
                s.access.close();
                return Err(e);
            }
        }
        Ok(img)
    }
}

/// Which structure written or read as something else shares a cluster with the active L1
/// table (all are cluster-aligned by the specification), if any: the header cluster, the
/// refcount table or a refcount block, the snapshot table, a snapshot's L1 table, the
/// encryption header.
fn active_l1_overlap(
    h: &Header,
    cs: u64,
    snapshots: &[snapshot::SnapshotEntry],
    reftable: &[u64],
) -> Option<String> {
    let len = h.l1_size as u64 * 8;
    if len == 0 {
        return None;
    }
    let (a, b) = (h.l1_table_offset / cs, (h.l1_table_offset + len - 1) / cs);
    let overlaps = |off: u64, n: u64| n > 0 && off / cs <= b && a <= (off + n - 1) / cs;
    if overlaps(0, cs) {
        return Some("image header".into());
    }
    if overlaps(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
    ) {
        return Some("refcount table".into());
    }
    // An L1 entry written into a refcount block changed four refcounts (and the refcount
    // cache's copy of the block, written back, undid the entry).
    if let Some(i) = reftable.iter().position(|&e| {
        e & refcount::REFT_OFFSET_MASK != 0 && overlaps(e & refcount::REFT_OFFSET_MASK, 1)
    }) {
        return Some(format!("refcount block {i}"));
    }
    let table = crate::snapshot::Snapshots::new(snapshots.to_vec()).table_size();
    if h.nb_snapshots > 0 && overlaps(h.snapshots_offset, table.max(1)) {
        return Some("snapshot table".into());
    }
    for (i, e) in snapshots.iter().enumerate() {
        if overlaps(e.l1_table_offset, e.l1_size as u64 * 8) {
            return Some(format!("L1 table of snapshot {} ('{}')", i + 1, e.name));
        }
    }
    if let Some(ext) = h.extension(header::EXT_CRYPTO) {
        if ext.len() >= 16 && overlaps(fmt::be64(ext, 0), fmt::be64(ext, 8)) {
            return Some("encryption header".into());
        }
    }
    None
}

/// Which refcount structure (the refcount table, a refcount block) shares a cluster with an L2
/// table of the active L1 table, if any. (Memory: a sorted copy of the refcount table's
/// clusters, no more than the refcount table itself.)
fn active_l2_over_refcounts(h: &Header, cs: u64, l1: &[u64], reftable: &[u64]) -> Option<String> {
    let mut blocks: Vec<(u64, usize)> = reftable
        .iter()
        .enumerate()
        .map(|(i, &e)| ((e & refcount::REFT_OFFSET_MASK) / cs, i))
        .filter(|&(c, _)| c != 0)
        .collect();
    blocks.sort_unstable();
    let first = h.refcount_table_offset / cs;
    let table = first..first + h.refcount_table_clusters as u64;
    for &e in l1 {
        let c = (e & crate::format::l2::L1E_OFFSET_MASK) / cs;
        if c == 0 {
            continue;
        }
        if table.contains(&c) {
            return Some("refcount table".into());
        }
        if let Ok(k) = blocks.binary_search_by_key(&c, |&(b, _)| b) {
            return Some(format!("refcount block {}", blocks[k].1));
        }
    }
    None
}

impl State {
    /// Make the LUKS header area of a new image: clusters for it (zero-filled, with the header
    /// and slot 0's key material), then the header naming it (crypt_method 2, extension
    /// 0x0537be77), as `qemu-img create -o encrypt.format=luks` lays it out.
    fn create_luks_area(&mut self, e: &crate::crypto::EncryptionOptions) -> Result<()> {
        let (area, header, key) = crate::crypto::new_luks(self.name(), e)?;
        let len = area.len() as u64;
        let n = self.geo.clusters_for(len);
        let off = self.alloc_clusters(n)?;
        let mut full = vec![0u8; (n * self.geo.cluster_size()) as usize];
        full[..area.len()].copy_from_slice(&area);
        self.file.write_meta(&full, off, "LUKS header")?;
        let mut ext = off.get().to_be_bytes().to_vec();
        ext.extend_from_slice(&len.to_be_bytes());
        let set = |h: &mut Header, table: bool| {
            h.crypt_method = 2;
            h.set_extension(header::EXT_CRYPTO, Some(ext.clone()));
            if !table {
                h.set_extension(header::EXT_FEATURE_TABLE, None);
            }
        };
        if self
            .header
            .rewrite(&mut self.file, |h| set(h, true))
            .is_err()
        {
            // Small clusters: like QEMU, leave out the (optional) feature name table.
            self.header.rewrite(&mut self.file, |h| set(h, false))?;
        }
        let area = crate::crypto::LuksArea {
            header,
            offset: off,
            len,
        };
        self.crypto = Some(Arc::new(crate::crypto::Crypto::luks(area, Some(key))));
        self.meta.invalidate();
        Ok(())
    }
}
