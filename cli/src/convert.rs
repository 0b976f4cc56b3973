//! `qcow2rs convert`: like `qemu-img convert`, for raw and qcow2 in either direction.
//!
//! A producer walks the source's extents in chunks of at least 2 MiB and hands the chunks that
//! hold anything to copy to workers. Areas that read as zeros stay unallocated in a qcow2 target
//! and sparse in a raw one. With `-c`, workers compress clusters in parallel (the core compresses
//! outside its lock); otherwise one worker keeps writes in order (as qemu-img does without `-W`),
//! so the target is laid out sequentially. The target is opened with cache mode `unsafe` by
//! default, like qemu-img's convert, and made durable once at the end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use qcow2rs::{CacheMode, Format, Image, MapEntry, OpenOptions, SnapshotRef};

use crate::create::create_raw;
use crate::disk::{open_error, open_io_error, parse_format, Disk, ExtentCursor};
use crate::opts::OptList;
use crate::progress::Progress;
use crate::util::{core_text, create_error, io_text, parse_size, CliError, CliResult};
use crate::ConvertArgs;

/// How a piece of the source is to be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Read it and write what is not zero.
    Data,
    /// It reads as zeros.
    Zero,
    /// Not allocated in the source's top image, and the target has a backing file that is
    /// expected to hold the same: leave it to the backing file.
    Backing,
}

#[derive(Debug, Clone, Copy)]
struct Piece {
    start: u64,
    len: u64,
    kind: Kind,
}

/// One unit of work: a chunk of the guest address space and how it is stored.
struct Item {
    start: u64,
    len: u64,
    pieces: Vec<Piece>,
}

/// The image being written.
enum Target {
    Qcow2(Box<Image>),
    Raw(File),
}

impl Target {
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        match self {
            Target::Qcow2(img) => img.write_at(buf, offset).map_err(|e| core_text(&e)),
            Target::Raw(f) => f.write_all_at(buf, offset).map_err(|e| io_text(&e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), String> {
        match self {
            Target::Qcow2(img) => img.write_zeroes(offset, len).map_err(|e| core_text(&e)),
            Target::Raw(f) => {
                let flags =
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
                if rustix::fs::fallocate(f, flags, offset, len).is_ok() {
                    return Ok(());
                }
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], pos).map_err(|e| io_text(&e))?;
                    pos += n as u64;
                }
                Ok(())
            }
        }
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        match self {
            Target::Qcow2(img) => img.write_compressed(offset, buf).map_err(|e| core_text(&e)),
            Target::Raw(f) => f.write_all_at(buf, offset).map_err(|e| io_text(&e)),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Target::Qcow2(img) => img.virtual_size(),
            Target::Raw(f) => f.metadata().map(|m| m.len()).unwrap_or(0),
        }
    }

    /// Make everything durable: one flush (qcow2 close) or one fdatasync (raw).
    fn finish(self) -> Result<(), String> {
        match self {
            Target::Qcow2(img) => (*img).close().map_err(|e| core_text(&e)),
            Target::Raw(f) => f.sync_data().map_err(|e| io_text(&e)),
        }
    }
}

/// What the workers share.
struct Job<'a> {
    src: &'a Disk,
    dst: &'a Target,
    /// Zero-detection (and compression) unit: the target's cluster size, or `-S` for raw.
    granule: u64,
    size: u64,
    compress: bool,
    /// Look for zeros in the data (`-S` is not 0).
    sparse: bool,
    /// The target reads as zeros where nothing was written (freshly created, no backing file).
    zero_init: bool,
    progress: &'a Progress,
    /// `--salvage`: unreadable ranges are written as zeros; the bytes skipped so far.
    salvage: Option<&'a AtomicU64>,
}

/// Unit in which a range that failed to read is read again, to find what can be read (and, for
/// an error message, where it failed): 64 KiB, the usual cluster size.
const RETRY_UNIT: u64 = 64 << 10;

/// Whether every byte is zero (written to vectorise).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

impl Job<'_> {
    /// A read of `buf` at `start` failed: read it again unit by unit. Without `--salvage` the
    /// first unit that fails is the error; with it, each run of failed units is zeroed and
    /// reported as a warning, and counted as skipped.
    fn read_again(&self, buf: &mut [u8], start: u64) -> CliResult<()> {
        let end = start + buf.len() as u64;
        let mut bad: Option<(u64, u64, String)> = None;
        let report = |bad: &mut Option<(u64, u64, String)>| {
            if let Some((s, e, m)) = bad.take() {
                eprintln!(
                    "qcow2rs: warning: error while reading offset {s} ({} bytes, written as zeros): {m}",
                    e - s
                );
                if let Some(skipped) = self.salvage {
                    skipped.fetch_add(e - s, Ordering::Relaxed);
                }
            }
        };
        let mut u = start;
        while u < end {
            let ue = ((u / RETRY_UNIT + 1) * RETRY_UNIT).min(end);
            let piece = &mut buf[(u - start) as usize..(ue - start) as usize];
            match self.src.read_at(piece, u) {
                Ok(()) => report(&mut bad),
                Err(m) => {
                    if self.salvage.is_none() {
                        return Err(CliError::new(format!(
                            "error while reading at byte {u}: {m}"
                        )));
                    }
                    piece.fill(0);
                    match &mut bad {
                        Some((_, e, _)) if *e == u => *e = ue,
                        _ => {
                            report(&mut bad);
                            bad = Some((u, ue, m));
                        }
                    }
                }
            }
            u = ue;
        }
        report(&mut bad);
        Ok(())
    }

    fn wr(&self, r: Result<(), String>, offset: u64) -> CliResult<()> {
        r.map_err(|m| CliError::new(format!("error while writing at byte {offset}: {m}")))
    }

    fn process(&self, item: &Item, buf: &mut [u8]) -> CliResult<()> {
        let base = item.start;
        let buf = &mut buf[..item.len as usize];
        for p in &item.pieces {
            let range = (p.start - base) as usize..(p.start - base + p.len) as usize;
            if p.kind == Kind::Data {
                if self.src.read_at(&mut buf[range.clone()], p.start).is_err() {
                    self.read_again(&mut buf[range], p.start)?;
                }
            } else {
                buf[range].fill(0);
            }
        }
        let end = base + item.len;
        let mut run: Option<(u64, u64)> = None; // pending data run to write uncompressed
        let flush_run = |run: &mut Option<(u64, u64)>, buf: &[u8]| -> CliResult<()> {
            if let Some((s, e)) = run.take() {
                let slice = &buf[(s - base) as usize..(e - base) as usize];
                self.wr(self.dst.write(slice, s), s)?;
            }
            Ok(())
        };
        let mut gs = base;
        while gs < end {
            let ge = (gs + self.granule).min(end);
            let overlapping = item
                .pieces
                .iter()
                .filter(|p| p.start < ge && p.start + p.len > gs);
            let mixed_backing = overlapping.clone().any(|p| p.kind == Kind::Backing);
            if mixed_backing {
                // Write exactly what the source's top image holds; the rest comes from the
                // target's backing file.
                flush_run(&mut run, buf)?;
                for p in overlapping {
                    let s = p.start.max(gs);
                    let e = (p.start + p.len).min(ge);
                    let slice = &buf[(s - base) as usize..(e - base) as usize];
                    match p.kind {
                        Kind::Backing => {}
                        Kind::Zero => self.wr(self.dst.write_zeroes(s, e - s), s)?,
                        Kind::Data if self.sparse && is_zero(slice) => {
                            self.wr(self.dst.write_zeroes(s, e - s), s)?
                        }
                        Kind::Data => self.wr(self.dst.write(slice, s), s)?,
                    }
                }
            } else {
                let slice = &buf[(gs - base) as usize..(ge - base) as usize];
                if self.sparse && is_zero(slice) {
                    flush_run(&mut run, buf)?;
                    if !self.zero_init {
                        self.wr(self.dst.write_zeroes(gs, ge - gs), gs)?;
                    }
                } else if self.compress && (ge - gs == self.granule || ge == self.size) {
                    flush_run(&mut run, buf)?;
                    self.wr(self.dst.write_compressed(slice, gs), gs)?;
                } else {
                    match &mut run {
                        Some((_, e)) if *e == gs => *e = ge,
                        _ => {
                            flush_run(&mut run, buf)?;
                            run = Some((gs, ge));
                        }
                    }
                }
            }
            gs = ge;
        }
        flush_run(&mut run, buf)?;
        self.progress.add(item.len);
        Ok(())
    }
}

fn classify(e: &MapEntry, target_has_backing: bool) -> Kind {
    if target_has_backing && (e.depth > 0 || !e.present) {
        Kind::Backing
    } else if e.zero || !e.present {
        Kind::Zero
    } else {
        Kind::Data
    }
}

fn parse_cache(s: Option<&str>, default: CacheMode) -> CliResult<CacheMode> {
    match s {
        None => Ok(default),
        Some(c) => {
            CacheMode::parse(c).map_err(|_| CliError::new(format!("Invalid cache option: {c}")))
        }
    }
}

pub fn run(a: &ConvertArgs) -> CliResult {
    let out_fmt = parse_format(&a.out_fmt)?;
    let src_fmt = a.fmt.as_deref().map(parse_format).transpose()?;
    if a.compress && out_fmt != Format::Qcow2 {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    if a.no_create && !a.options.is_empty() {
        return Err(CliError::new(
            "-o has no effect when skipping image creation",
        ));
    }
    let dst_cache = parse_cache(a.cache.as_deref(), CacheMode::Unsafe)?;
    let src_cache = parse_cache(a.src_cache.as_deref(), CacheMode::Writeback)?;
    let max_workers = match &a.workers {
        None => None,
        Some(m) => match m.parse::<usize>() {
            Ok(n) if (1..=16).contains(&n) => Some(n),
            _ => {
                return Err(CliError::new(
                    "Invalid number of coroutines specified. Must be between 1 and 16.",
                ))
            }
        },
    };
    let sparse_size = match &a.sparse {
        None => 4096,
        Some(s) => match parse_size(s) {
            Ok(n) if n % 512 == 0 && n <= 16 << 20 => n,
            _ => {
                return Err(CliError::new(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
                ))
            }
        },
    };

    let mut opts = OptList::parse(&a.options)?;
    if let Some(b) = &a.backing {
        opts.set("backing_file", b);
    }
    if let Some(f) = &a.backing_fmt {
        opts.set("backing_fmt", f);
    }
    let target_has_backing = opts.get("backing_file").is_some();
    if target_has_backing && opts.get("backing_fmt").is_none() {
        return Err(CliError::new(
            "Use of backing file requires explicit backing format",
        ));
    }
    if !a.no_create {
        opts.validate_keys(out_fmt, "")
            .map_err(|e| CliError::new(e.msg.trim_start_matches(": ").to_string()))?;
    }

    let snapshot = source_snapshot(a)?;
    let secrets = a.sec.secrets()?;
    let src_ref = a.sec.image(&a.src)?;
    let src_opts = src_ref.open_options(OpenOptions {
        cache: src_cache,
        snapshot: snapshot.clone(),
        // Salvage opens a truncated source too (its tables read as zeros past the end).
        damaged: a.salvage,
        force_share: a.force_share,
        ..OpenOptions::read_only()
    });
    let src = open_source(&src_ref.path, src_fmt.or(src_ref.fmt), &src_opts)?;
    if let Disk::Qcow2(img) = &src {
        for d in img.damage() {
            eprintln!("qcow2rs: warning: {}: {d}", src_ref.path);
        }
    }
    let size = src.size();
    if a.target_image_opts && !a.no_create {
        return Err(CliError::new("--target-image-opts requires use of -n flag"));
    }
    let dst_ref = crate::secrets::image_ref(&a.dst, a.target_image_opts, &secrets)?;
    let dst_name = dst_ref.path.as_str();
    let out_fmt = match (a.target_image_opts, dst_ref.fmt) {
        (true, Some(f)) => f,
        _ => out_fmt,
    };
    let mut dst_password = dst_ref.password.clone();
    if let Some(f) = &a.target_password_file {
        dst_password = Some(crate::secrets::read_password_file(f)?);
    }

    if !a.no_create {
        match out_fmt {
            Format::Qcow2 => {
                let mut co = opts.to_create_options(dst_name)?;
                co.size = size;
                co.encryption = opts.encryption(dst_name, &secrets, dst_password.clone())?;
                if let Some(e) = &co.encryption {
                    if a.compress {
                        return Err(CliError::new(
                            "Compression and encryption not supported at the same time",
                        ));
                    }
                    dst_password = Some(e.password.clone());
                }
                Image::create(dst_name, &co).map_err(|e| {
                    let why = create_error(dst_name, &e).msg;
                    let why = why
                        .strip_prefix(&format!("{dst_name}: "))
                        .unwrap_or(&why)
                        .to_string();
                    CliError::new(format!("{dst_name}: error while converting qcow2: {why}"))
                })?;
            }
            Format::Raw => create_raw(dst_name, size, opts.get("preallocation"))?,
        }
    }
    let dst = match out_fmt {
        Format::Qcow2 => {
            if a.no_create {
                crate::disk::resolve_format(dst_name, Some(Format::Qcow2))?;
            }
            let o = OpenOptions {
                cache: dst_cache,
                password: dst_password.clone(),
                ..OpenOptions::new()
            };
            Target::Qcow2(Box::new(
                Image::open(dst_name, &o).map_err(|e| open_error(dst_name, &e))?,
            ))
        }
        Format::Raw => Target::Raw(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dst_name)
                .map_err(|e| open_io_error(dst_name, &e))?,
        ),
    };
    if a.no_create && dst.size() < size {
        return Err(CliError::new("output file is smaller than input file"));
    }

    let granule = match &dst {
        Target::Qcow2(img) => img.cluster_size() as u64,
        Target::Raw(_) => sparse_size.max(512),
    };
    let chunk = granule * (2u64 << 20).div_ceil(granule);
    let workers = if a.compress || a.out_of_order {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        max_workers.map_or(cores, |m| m.min(cores)).max(1)
    } else {
        1
    };
    let progress = Progress::new(a.progress && !a.quiet, size);
    let skipped = AtomicU64::new(0);
    let job = Job {
        src: &src,
        dst: &dst,
        granule,
        size,
        compress: a.compress,
        sparse: sparse_size != 0,
        zero_init: !a.no_create && !target_has_backing,
        progress: &progress,
        salvage: a.salvage.then_some(&skipped),
    };
    copy(&job, chunk, workers, target_has_backing)?;
    progress.finish();
    let skipped = skipped.into_inner();
    if skipped > 0 {
        eprintln!(
            "qcow2rs: warning: --salvage: {skipped} bytes of '{}' could not be read and were written as zeros",
            a.src
        );
    }
    dst.finish()
        .map_err(|m| CliError::new(format!("{dst_name}: error while flushing: {m}")))?;
    Ok(0)
}

/// The source snapshot that `-l` or `-s` names. As in qemu-img, a `-l` that starts with
/// `snapshot.` is an option list (`snapshot.id=ID`, `snapshot.name=NAME`: the snapshot with
/// both, or with the one given) and wins over a plain `-l ID_OR_NAME` (an ID first, then a
/// name); among several of a kind the last counts. `-s ID_OR_NAME` is older qemu-img's spelling
/// of the plain form.
fn source_snapshot(a: &ConvertArgs) -> CliResult<Option<SnapshotRef>> {
    let mut params = None;
    let mut plain = a.snapshot.clone().map(SnapshotRef::IdOrName);
    for l in &a.source_snapshot {
        if !l.starts_with("snapshot.") {
            plain = Some(SnapshotRef::IdOrName(l.clone()));
            continue;
        }
        let (mut id, mut name) = (None, None);
        for (k, v) in crate::secrets::split_opts(l) {
            match k.as_str() {
                "snapshot.id" => id = Some(v),
                "snapshot.name" => name = Some(v),
                _ => {
                    return Err(CliError::new(format!(
                        "Invalid parameter '{k}'\nqcow2rs: Failed in parsing snapshot param '{l}'"
                    )))
                }
            }
        }
        params = Some(match (id, name) {
            (Some(i), Some(n)) => SnapshotRef::IdAndName(i, n),
            (Some(i), None) => SnapshotRef::Id(i),
            (None, Some(n)) => SnapshotRef::Name(n),
            (None, None) => {
                return Err(CliError::new(
                    "Failed to load snapshot: snapshot_id and name are both NULL",
                ))
            }
        });
    }
    Ok(params.or(plain))
}

/// Open the source; with a snapshot, a read-only view of it (its disk size, its contents).
fn open_source(path: &str, fmt: Option<Format>, opts: &OpenOptions) -> CliResult<Disk> {
    if opts.snapshot.is_none() {
        return Disk::open(path, fmt, opts);
    }
    match crate::disk::resolve_format(path, fmt)? {
        Format::Qcow2 => Image::open(path, opts)
            .map(|img| Disk::Qcow2(Box::new(img)))
            .map_err(|e| match e {
                qcow2rs::Error::NotFound { .. } => {
                    CliError::new("Failed to load snapshot: Can't find snapshot")
                }
                _ => open_error(path, &e),
            }),
        Format::Raw => Err(CliError::new(
            "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots",
        )),
    }
}

/// Walk the source and let `workers` threads copy the chunks that need it.
fn copy(job: &Job, chunk: u64, workers: usize, target_has_backing: bool) -> CliResult<()> {
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<CliError>> = Mutex::new(None);
    let record = |e: CliError| {
        failed.store(true, Ordering::SeqCst);
        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    };
    let (tx, rx) = mpsc::sync_channel::<Item>(workers * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buf = vec![0u8; chunk as usize];
                loop {
                    let item = {
                        let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                        guard.recv()
                    };
                    let Ok(item) = item else { break };
                    if failed.load(Ordering::SeqCst) {
                        continue; // drain
                    }
                    if let Err(e) = job.process(&item, &mut buf) {
                        record(e);
                    }
                }
            });
        }

        let mut cur = ExtentCursor::new(job.src, job.size);
        if job.salvage.is_some() {
            // Small windows: a damaged range fails the queries near it only.
            cur = cur.with_window(4 << 20);
        }
        let mut c = 0u64;
        while c < job.size && !failed.load(Ordering::SeqCst) {
            let l = chunk.min(job.size - c);
            let mut pieces: Vec<Piece> = Vec::new();
            let mut p = c;
            while p < c + l {
                let e = match cur.at(p) {
                    Ok(e) => e,
                    // Salvage: the extent is unknown; read it as data (what cannot be read
                    // is zeroed).
                    Err(_) if job.salvage.is_some() => {
                        let ue = ((p / RETRY_UNIT + 1) * RETRY_UNIT).min(c + l);
                        salvage_extent(job.src, p, ue)
                    }
                    Err(m) => {
                        record(CliError::new(format!(
                            "error while reading block status at offset {p}: {m}"
                        )));
                        break;
                    }
                };
                let n = e.length.min(c + l - p);
                let kind = classify(&e, target_has_backing);
                match pieces.last_mut() {
                    Some(last) if last.kind == kind && last.start + last.len == p => last.len += n,
                    _ => pieces.push(Piece {
                        start: p,
                        len: n,
                        kind,
                    }),
                }
                p += n;
            }
            if failed.load(Ordering::SeqCst) {
                break;
            }
            let skip = pieces.iter().all(|p| match p.kind {
                Kind::Backing => true,
                Kind::Zero => job.sparse && job.zero_init,
                Kind::Data => false,
            });
            if skip {
                job.progress.add(l);
            } else if tx
                .send(Item {
                    start: c,
                    len: l,
                    pieces,
                })
                .is_err()
            {
                break;
            }
            c += l;
        }
        drop(tx);
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The extent at `p` (within `[p, end)`) when the map of a larger range failed: the map of this
/// range alone, or, if that fails too, data to be read.
fn salvage_extent(src: &Disk, p: u64, end: u64) -> MapEntry {
    if let Ok(v) = src.map(p, end - p) {
        if let Some(e) = v
            .into_iter()
            .find(|e| e.start <= p && e.start + e.length > p)
        {
            let skip = p - e.start;
            return MapEntry {
                start: p,
                length: (e.start + e.length).min(end) - p,
                offset: e.offset.map(|o| o + skip),
                ..e
            };
        }
    }
    MapEntry {
        start: p,
        length: end - p,
        depth: 0,
        present: true,
        zero: false,
        data: true,
        compressed: false,
        offset: None,
    }
}
