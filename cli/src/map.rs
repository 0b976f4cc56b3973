//! `qcow2rs map`: like `qemu-img map`, human and JSON output.

use std::io::Write;

use qcow2rs::{Format, Image, MapEntry, OpenOptions};

use crate::disk::{parse_format, Disk, RawFile};
use crate::util::{path_combine, CliError, CliResult};
use crate::{parse_output, MapArgs};

/// qemu-img's `entry_mergeable` (the file name follows from the depth here).
fn mergeable(curr: &MapEntry, next: &MapEntry) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
        || curr.offset.is_some() != next.offset.is_some()
    {
        return false;
    }
    match (curr.offset, next.offset) {
        (Some(a), Some(b)) => a + curr.length == b,
        _ => true,
    }
}

/// File names of the backing chain, by depth, resolved like qemu resolves them.
fn chain_names(file: &str, disk: &Disk) -> Vec<String> {
    let mut names = vec![file.to_string()];
    let Disk::Qcow2(img) = disk else {
        return names;
    };
    let mut next = img
        .info()
        .ok()
        .and_then(|i| i.backing_file.map(|b| (b, i.backing_format)));
    while let Some((b, bfmt)) = next.take() {
        let path = path_combine(names.last().map(String::as_str).unwrap_or(""), &b);
        names.push(path.clone());
        if names.len() > 64 {
            break;
        }
        let is_qcow2 = match bfmt.as_deref() {
            Some(f) => f == "qcow2",
            None => qcow2rs::probe_format(&path).ok() == Some(Format::Qcow2),
        };
        if is_qcow2 {
            // The chain is open already, locked as the user asked: this second look at its
            // headers shares the files.
            let opts = OpenOptions {
                open_backing: false,
                without_key: true,
                force_share: true,
                ..OpenOptions::read_only()
            };
            next = Image::open(&path, &opts)
                .and_then(|i| i.info())
                .ok()
                .and_then(|i| i.backing_file.map(|b| (b, i.backing_format)));
        }
    }
    names
}

/// The host files of the chain, to look for holes in them as qemu's block layer does. qemu asks
/// the host file about a data extent only for raw images and for qcow2 images it detects as
/// metadata-preallocated (more clusters in use than the file has allocated blocks); there a data
/// cluster whose host range is a hole reads as zeros and is shown so.
struct HostFiles<'a> {
    names: &'a [String],
    /// Per depth: the host file, if holes in it are to be reported.
    files: Vec<Option<RawFile>>,
}

impl HostFiles<'_> {
    fn file(&mut self, depth: usize) -> Option<&RawFile> {
        while self.files.len() <= depth {
            let name = self.names.get(self.files.len());
            let f = name.and_then(|n| {
                let recurse = match qcow2rs::probe_format(n).ok()? {
                    Format::Raw => true,
                    Format::Qcow2 => metadata_preallocated(n).unwrap_or(false),
                };
                if recurse {
                    RawFile::open(n, true).ok()
                } else {
                    None
                }
            });
            self.files.push(f);
        }
        self.files[depth].as_ref()
    }

    /// Split data extents where their host range has holes, marking those parts zero.
    fn refine(&mut self, entries: Vec<MapEntry>) -> Vec<MapEntry> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let host = match e.offset {
                Some(off) if e.data && !e.zero && !e.compressed => off,
                _ => {
                    out.push(e);
                    continue;
                }
            };
            let Some(f) = self.file(e.depth as usize) else {
                out.push(e);
                continue;
            };
            for h in f.map(host, e.length) {
                let mut piece = e.clone();
                piece.start = e.start + (h.start - host);
                piece.length = h.length;
                piece.offset = Some(h.start);
                piece.zero = h.zero;
                out.push(piece);
            }
        }
        out
    }
}

/// qemu's `qcow2_detect_metadata_preallocation`: are at least
/// `max(allocated_clusters * 10 / 9, allocated_clusters + 2)` clusters of the file in use, where
/// `allocated_clusters` counts the blocks the host file really has? The clusters in use are
/// estimated from the map (data clusters, L2 tables) plus the fixed metadata.
fn metadata_preallocated(path: &str) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    // A second look at an image of the open chain: shared, as in chain_names.
    let opts = OpenOptions {
        open_backing: false,
        without_key: true,
        force_share: true,
        ..OpenOptions::read_only()
    };
    let img = Image::open(path, &opts).ok()?;
    let info = img.info().ok()?;
    let cs = img.cluster_size() as u64;
    let md = std::fs::metadata(path).ok()?;
    let real_clusters = md.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = md.len().div_ceil(cs);
    if end_cluster < threshold {
        return Some(false);
    }
    let l2_entry = if info.extended_l2 { 16 } else { 8 };
    let l2_span = cs / l2_entry * cs;
    let mut used = 0u64;
    let (mut last_cluster, mut last_l2) = (u64::MAX, u64::MAX);
    let size = img.virtual_size();
    let mut pos = 0;
    while pos < size && used < threshold {
        let len = (size - pos).min(1 << 34);
        for e in img.map(pos, len).ok()? {
            let Some(off) = e.offset.filter(|_| e.depth == 0) else {
                continue;
            };
            let (first, last) = (off / cs, (off + e.length.max(1) - 1) / cs);
            used += last - first + 1 - u64::from(first == last_cluster);
            last_cluster = last;
            let (l2a, l2b) = (e.start / l2_span, (e.start + e.length.max(1) - 1) / l2_span);
            used += l2b - l2a + 1 - u64::from(l2a == last_l2);
            last_l2 = l2b;
        }
        pos += len;
    }
    // Header, L1 table, refcount table and blocks.
    let refblocks = end_cluster.div_ceil(cs * 8 / info.refcount_bits.max(1) as u64);
    used += 3 + refblocks;
    Some(used.min(end_cluster) >= threshold)
}

struct Dumper<'a> {
    json: bool,
    names: &'a [String],
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
}

impl Dumper<'_> {
    /// qemu-img's `dump_map_entry`; in human mode it may rewrite `next` so that zero areas merge.
    fn dump(&mut self, e: &MapEntry, next: Option<&mut MapEntry>) -> CliResult<()> {
        let werr = |err: std::io::Error| CliError::new(err.to_string());
        if self.json {
            let b = |v: bool| if v { "true" } else { "false" };
            write!(
                self.out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start,
                e.length,
                e.depth,
                b(e.present),
                b(e.zero),
                b(e.data),
                b(e.compressed)
            )
            .map_err(werr)?;
            if let Some(off) = e.offset {
                write!(self.out, ", \"offset\": {off}").map_err(werr)?;
            }
            write!(self.out, "}}").map_err(werr)?;
            if next.is_some() {
                writeln!(self.out, ",").map_err(werr)?;
            }
            return Ok(());
        }
        if e.data && e.offset.is_none() {
            return Err(CliError::new(
                "File contains external, encrypted or compressed clusters.",
            ));
        }
        if e.data && !e.zero {
            let name = self
                .names
                .get(e.depth as usize)
                .map(String::as_str)
                .unwrap_or("");
            writeln!(
                self.out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                name
            )
            .map_err(werr)?;
        }
        if let Some(n) = next {
            if !n.data || n.zero {
                n.data = false;
                n.zero = true;
            }
        }
        Ok(())
    }
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

pub fn run(a: &MapArgs) -> CliResult {
    let json = parse_output("map", &a.output)?;
    let r = a.sec.image(&a.file)?;
    let fmt = match a.fmt.as_deref().map(parse_format).transpose()? {
        Some(f) => Some(f),
        None => r.fmt,
    };
    // The map is metadata: an encrypted image is mapped without its key too.
    let disk = Disk::open(
        &r.path,
        fmt,
        &r.open_options(OpenOptions {
            without_key: true,
            force_share: a.force_share,
            ..OpenOptions::read_only()
        }),
    )?;
    let size = disk.size();
    let start = match &a.start {
        Some(s) => crate::util::parse_size(s)
            .map_err(|_| CliError::new(format!("Invalid start offset specified: '{s}'")))?,
        None => 0,
    };
    let max_len = match &a.max_length {
        Some(s) => crate::util::parse_size(s)
            .map_err(|_| CliError::new(format!("Invalid length specified: '{s}'")))?,
        None => u64::MAX,
    };
    let end = start.saturating_add(max_len).min(size).max(start);

    let names = chain_names(&r.path, &disk);
    let mut hosts = HostFiles {
        names: &names,
        files: Vec::new(),
    };
    let mut d = Dumper {
        json,
        names: &names,
        out: std::io::BufWriter::new(std::io::stdout().lock()),
    };
    if json {
        write!(d.out, "[").map_err(|e| CliError::new(e.to_string()))?;
    } else {
        writeln!(
            d.out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(|e| CliError::new(e.to_string()))?;
    }

    let mut curr = MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    };
    // Ask for the map in windows so that a huge, fragmented image does not need all its extents
    // in memory at once.
    const WINDOW: u64 = 1 << 30;
    let mut pos = start;
    while pos < end {
        let mut len = (end - pos).min(WINDOW);
        let mut damaged = None;
        let entries = match disk.map(pos, len) {
            Ok(e) => e,
            Err(m) => {
                // Show the extents before the damage, then name the damaged range.
                let (good, bad) = map_until_damage(&disk, pos, len);
                let (u, ue, m2) = bad.unwrap_or((pos, pos + len, m));
                damaged = Some(format!(
                    "Could not read file metadata: guest range {u:#x}..{ue:#x} is damaged: {m2}"
                ));
                len = u - pos;
                good
            }
        };
        if entries.is_empty() && damaged.is_none() {
            return Err(CliError::new(format!(
                "Could not read file metadata: no mapping at offset {pos}"
            )));
        }
        let entries = if matches!(disk, Disk::Qcow2(_)) {
            hosts.refine(entries)
        } else {
            entries
        };
        for mut next in entries {
            if mergeable(&curr, &next) {
                curr.length += next.length;
                continue;
            }
            if curr.length > 0 {
                d.dump(&curr, Some(&mut next))?;
            }
            curr = next;
        }
        if let Some(msg) = damaged {
            if curr.length > 0 {
                d.dump(&curr, None)?;
            }
            if json {
                writeln!(d.out, "]").map_err(|e| CliError::new(e.to_string()))?;
            }
            d.out.flush().map_err(|e| CliError::new(e.to_string()))?;
            return Err(CliError::new(msg));
        }
        pos += len;
    }
    d.dump(&curr, None)?;
    if json {
        writeln!(d.out, "]").map_err(|e| CliError::new(e.to_string()))?;
    }
    d.out.flush().map_err(|e| CliError::new(e.to_string()))?;
    Ok(0)
}

/// Map `[pos, pos+len)` 64 KiB at a time up to the first range that cannot be mapped: the
/// extents before it, and that range with its error.
fn map_until_damage(
    disk: &Disk,
    pos: u64,
    len: u64,
) -> (Vec<MapEntry>, Option<(u64, u64, String)>) {
    const UNIT: u64 = 64 << 10;
    let mut good = Vec::new();
    let mut u = pos;
    while u < pos + len {
        let ue = ((u / UNIT + 1) * UNIT).min(pos + len);
        match disk.map(u, ue - u) {
            Ok(v) => good.extend(v),
            Err(m) => return (good, Some((u, ue, m))),
        }
        u = ue;
    }
    (good, None)
}
