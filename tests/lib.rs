//! Helpers shared by the cross-boundary tests: running qemu-img and qemu-io, poking bytes into image
//! files, a seeded PRNG, compressible data, a raw reference model of a disk and byte comparisons.
//!
//! The interop tests treat qemu-img 10.0.2 as the oracle. They need the real `qemu-img` and `qemu-io`
//! on `PATH` and fail loudly (never skip) when they are missing.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use qcow2rs::{CheckReport, Image, OpenOptions};

pub use tempfile::TempDir;

// The README's examples, run as printed: rustdoc compiles and runs every rust code block of
// README.md as a doctest of this crate (`cargo test -p qcow2rs-tests --doc`), in the crate
// directory, so the example's `disk.qcow2` lands in `tests/disk.qcow2` (git-ignored). The C,
// command-line and Python examples are run by `tests/tests/readme.rs`, `cli/tests/readme.rs` and
// `python/tests/test_readme.py`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ------------------------------------------------------------------------------------------------
// Header field offsets (qcow2-brief.md, section 1.1)

pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// Offset mask of an L1 entry / standard L2 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

// ------------------------------------------------------------------------------------------------
// External tools

fn check_tool(name: &str) {
    let res = Command::new(name).arg("--version").output();
    match res {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{name} --version` failed ({}): {}{}\nThe interop tests need qemu-utils 10.x \
             (apt-get install qemu-utils).",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "cannot run `{name}`: {e}\nThe interop tests need qemu-img and qemu-io on PATH \
             (apt-get install qemu-utils). They do not skip when it is missing."
        ),
    }
}

/// Panics with a clear message unless qemu-img and qemu-io can be run.
pub fn require_qemu() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        check_tool("qemu-img");
        check_tool("qemu-io");
    });
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// The result of one external command.
#[derive(Debug)]
pub struct Run {
    pub cmdline: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(cmd: &Command, out: Output) -> Run {
        Run {
            cmdline: describe(cmd),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
    /// Panics (showing the command and its output) unless the exit code is 0.
    pub fn ok(self) -> Run {
        if self.code != 0 {
            panic!("{self}");
        }
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |s: &str| -> String {
            if s.len() > 6000 {
                format!("{}\n... ({} bytes more)", &s[..6000], s.len() - 6000)
            } else {
                s.to_string()
            }
        };
        write!(
            f,
            "command: {}\nexit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
            cut(&self.stdout),
            cut(&self.stderr)
        )
    }
}

/// Runs a command to completion and captures its output (stdin is closed).
pub fn run(cmd: &mut Command) -> Run {
    cmd.stdin(std::process::Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    Run::from(cmd, out)
}

/// `qemu-img ARGS...`, whatever its exit code.
pub fn qemu_img(args: &[&str]) -> Run {
    require_qemu();
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img create -f qcow2 [-o OPTS] PATH SIZE`; panics on failure.
pub fn qemu_create(path: &Path, size: u64, opts: &str) {
    let p = path.to_str().unwrap();
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p);
    args.push(&size);
    qemu_img(&args).ok();
}

/// `qemu-img create -f qcow2 -b BACKING -F BFMT [-o OPTS] PATH [SIZE]`; the backing name is stored as
/// given (relative names resolve against the overlay's directory).
pub fn qemu_create_overlay(
    path: &Path,
    backing: &str,
    backing_fmt: &str,
    opts: &str,
    size: Option<u64>,
) {
    let p = path.to_str().unwrap();
    let size = size.map(|s| s.to_string());
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
    ];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p);
    if let Some(s) = &size {
        args.push(s);
    }
    qemu_img(&args).ok();
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuMapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
}

fn json_bool(obj: &str, key: &str) -> Option<bool> {
    let pat = format!("\"{key}\":");
    let at = obj.find(&pat)? + pat.len();
    let rest = obj[at..].trim_start();
    if rest.starts_with("true") {
        Some(true)
    } else if rest.starts_with("false") {
        Some(false)
    } else {
        None
    }
}

/// `qemu-img map --output=json` of a qcow2 image (qemu prints one extent per line).
pub fn qemu_map(path: &Path) -> Vec<QemuMapEntry> {
    let r = qemu_img(&[
        "map",
        "-f",
        "qcow2",
        "--output=json",
        path.to_str().unwrap(),
    ])
    .ok();
    r.stdout
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| QemuMapEntry {
            start: json_u64(l, "start").unwrap(),
            length: json_u64(l, "length").unwrap(),
            depth: json_u64(l, "depth").unwrap(),
            present: json_bool(l, "present").unwrap(),
            zero: json_bool(l, "zero").unwrap(),
            data: json_bool(l, "data").unwrap(),
            compressed: json_bool(l, "compressed").unwrap_or(false),
        })
        .collect()
}

/// Runs qemu-io with the given commands on one image (format given explicitly, so no probing) and
/// panics unless every command succeeded (exit code 0 and no "failed" in the output).
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) -> Run {
    let r = qemu_io_raw(path, fmt, cmds);
    if r.code != 0 || r.all().contains("failed") {
        panic!("qemu-io reported a failure\n{r}");
    }
    r
}

/// Runs qemu-io whatever the outcome.
pub fn qemu_io_raw(path: &Path, fmt: &str, cmds: &[String]) -> Run {
    require_qemu();
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg(fmt);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    run(&mut cmd)
}

/// `qemu-img convert -O raw IMG RAW` (the image's format is given, backing chain followed).
pub fn qemu_to_raw(img: &Path, fmt: &str, raw: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .ok();
}

/// Reads a whole image through qemu-img (converted to a raw file next to it).
pub fn qemu_read_all(img: &Path, fmt: &str) -> Vec<u8> {
    let raw = img.with_extension("qemu-ref.raw");
    qemu_to_raw(img, fmt, &raw);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

/// What `qemu-img check --output=json` says (keys it omits count as 0).
#[derive(Debug, Clone)]
pub struct QemuCheck {
    pub code: i32,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub allocated_clusters: u64,
    pub compressed_clusters: u64,
    pub total_clusters: u64,
    pub json: String,
    /// The human-readable output of a second, plain `qemu-img check`.
    pub text: String,
}

/// Extracts an unsigned number after `"key":` from qemu's flat JSON output.
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat)? + pat.len();
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Like [`json_u64`] but the last occurrence of the key (`qemu-img info` lists the child "file"
/// node, with its own "virtual-size", before the image's).
pub fn json_u64_last(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = json.rfind(&pat)?;
    json_u64(&json[at..], key)
}

/// Runs `qemu-img check` (JSON and plain text) on a qcow2 image.
pub fn qemu_check(path: &Path) -> QemuCheck {
    let p = path.to_str().unwrap();
    let j = qemu_img(&["check", "-f", "qcow2", "--output=json", p]);
    let t = qemu_img(&["check", "-f", "qcow2", p]);
    let g = |k| json_u64(&j.stdout, k).unwrap_or(0);
    QemuCheck {
        code: j.code,
        corruptions: g("corruptions"),
        leaks: g("leaks"),
        check_errors: g("check-errors"),
        allocated_clusters: g("allocated-clusters"),
        compressed_clusters: g("compressed-clusters"),
        total_clusters: g("total-clusters"),
        json: j.stdout.clone(),
        text: t.all(),
    }
}

/// The first `n` lines and the last 5 lines of a long text.
pub fn head_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= n + 5 {
        return text.to_string();
    }
    format!(
        "{}\n... ({} lines left out) ...\n{}",
        lines[..n].join("\n"),
        lines.len() - n - 5,
        lines[lines.len() - 5..].join("\n")
    )
}

/// Asserts that `qemu-img check` finds the image clean: exit 0, no leaks, "No errors were found".
pub fn assert_qemu_clean(path: &Path) -> QemuCheck {
    let c = qemu_check(path);
    assert!(
        c.code == 0
            && c.leaks == 0
            && c.corruptions == 0
            && c.check_errors == 0
            && c.text.contains("No errors were found on the image."),
        "qemu-img check is not clean for {}:\n{}\n{}",
        path.display(),
        head_tail(&c.text, 30),
        c.json
    );
    c
}

/// Asserts `qemu-img compare -f raw -F qcow2 REF IMG` says the images are identical.
pub fn assert_qemu_compare(reference_raw: &Path, img: &Path) {
    let r = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        reference_raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(
        r.code == 0 && r.stdout.contains("Images are identical."),
        "qemu-img compare found a difference between the reference and {}:\n{r}",
        img.display()
    );
}

// ------------------------------------------------------------------------------------------------
// Poking at image files

fn open_rw_file(path: &Path) -> std::fs::File {
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes raw bytes at a file offset.
pub fn poke_bytes(path: &Path, off: u64, bytes: &[u8]) {
    open_rw_file(path).write_all_at(bytes, off).unwrap();
}
pub fn poke_u8(path: &Path, off: u64, v: u8) {
    poke_bytes(path, off, &[v]);
}
pub fn poke_be16(path: &Path, off: u64, v: u16) {
    poke_bytes(path, off, &v.to_be_bytes());
}
pub fn poke_be32(path: &Path, off: u64, v: u32) {
    poke_bytes(path, off, &v.to_be_bytes());
}
pub fn poke_be64(path: &Path, off: u64, v: u64) {
    poke_bytes(path, off, &v.to_be_bytes());
}
/// Reads raw bytes at a file offset (zeros past EOF).
pub fn peek_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    let flen = f.metadata().unwrap().len();
    if off < flen {
        let n = ((flen - off) as usize).min(len);
        f.read_exact_at(&mut buf[..n], off).unwrap();
    }
    buf
}
pub fn peek_be16(path: &Path, off: u64) -> u16 {
    u16::from_be_bytes(peek_bytes(path, off, 2).try_into().unwrap())
}
pub fn peek_be32(path: &Path, off: u64) -> u32 {
    u32::from_be_bytes(peek_bytes(path, off, 4).try_into().unwrap())
}
pub fn peek_be64(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(peek_bytes(path, off, 8).try_into().unwrap())
}
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}
pub fn truncate(path: &Path, len: u64) {
    open_rw_file(path).set_len(len).unwrap();
}

/// The header extensions of a qcow2 file: (type, offset of the payload, length).
pub fn header_extensions(path: &Path) -> Vec<(u32, u64, u32)> {
    let version = peek_be32(path, hdr::VERSION);
    let mut off = if version >= 3 {
        peek_be32(path, hdr::HEADER_LENGTH) as u64
    } else {
        72
    };
    let cluster = 1u64 << peek_be32(path, hdr::CLUSTER_BITS);
    let mut out = Vec::new();
    while off + 8 <= cluster {
        let ty = peek_be32(path, off);
        let len = peek_be32(path, off + 4);
        if ty == 0 {
            break;
        }
        out.push((ty, off + 8, len));
        off += 8 + (len as u64).div_ceil(8) * 8;
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Seeded PRNG (SplitMix64): deterministic workloads without extra dependencies

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Text-like data that deflate and zstd (with QEMU's 4 KiB window) compress well, different for every
/// `seed` and every line: not a constant fill, so a wrong cluster shows up as a mismatch.
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "qcow2", "cluster", "refcount", "table", "guest", "host", "offset", "the", "quick",
        "brown", "fox", "jumps", "over", "lazy", "dog", "L1", "L2", "sector", "image", "backing",
        "zero", "data", "flush", "barrier",
    ];
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{seed:08x}:{line:06} ").as_bytes());
        for _ in 0..8 {
            out.extend_from_slice(rng.pick(WORDS).as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
        line += 1;
    }
    out.truncate(len);
    out
}

// ------------------------------------------------------------------------------------------------
// Reading and comparing

/// Panics with the first differing offset (and a count) unless `got == want`.
pub fn assert_same(ctx: &str, got: &[u8], want: &[u8]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{ctx}: length differs: got {} bytes, want {}",
        got.len(),
        want.len()
    );
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let end = (first + 16).min(got.len());
    panic!(
        "{ctx}: {count} bytes differ, the first at offset {first} ({first:#x}, sector {}):\n  got  {:02x?}\n  want {:02x?}",
        first / 512,
        &got[first..end],
        &want[first..end]
    );
}

/// Reads the whole virtual disk through `img` in pieces of random (unaligned) length.
pub fn read_all(img: &Image, rng: &mut Rng) -> Vec<u8> {
    let size = img.virtual_size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    while off < size {
        let len = if rng.chance(30) {
            rng.range(1, 70_000)
        } else {
            rng.range(1, 3 * MIB)
        }
        .min(size - off);
        img.read_at(&mut out[off as usize..(off + len) as usize], off)
            .unwrap_or_else(|e| panic!("read_at({off}, {len}) failed: {e}"));
        off += len;
    }
    out
}

/// Opens read-only and reads the whole disk.
pub fn our_read_all(path: &Path, seed: u64) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    let data = read_all(&img, &mut Rng::new(seed));
    img.close().unwrap();
    data
}

/// Runs our check (no repair) on an image opened read-only.
pub fn our_check(path: &Path) -> CheckReport {
    let img = Image::open(path, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    let r = img
        .check(None)
        .unwrap_or_else(|e| panic!("check {}: {e}", path.display()));
    img.close().unwrap();
    r
}

/// Asserts our check finds no corruption, no leak and no check error.
pub fn assert_our_check_clean(path: &Path) -> CheckReport {
    let r = our_check(path);
    assert!(
        r.is_clean(),
        "our check of {} is not clean: {} corruptions, {} leaks, {} check errors\n{}",
        path.display(),
        r.corruptions,
        r.leaks,
        r.check_errors,
        head_tail(&r.messages.join("\n"), 30)
    );
    r
}

// ------------------------------------------------------------------------------------------------
// A raw reference model of a disk, mirrored into alongside our writes

/// The expected content of a virtual disk.
#[derive(Debug, Clone)]
pub struct Model {
    /// What the guest reads now.
    pub data: Vec<u8>,
    /// What a discarded cluster reads as: the backing chain's content (v2 with a backing file), else
    /// zeros.
    pub discard_reveals: Vec<u8>,
    pub cluster_size: u64,
}

impl Model {
    pub fn zeros(size: u64, cluster_size: u64) -> Model {
        Model {
            data: vec![0; size as usize],
            discard_reveals: vec![0; size as usize],
            cluster_size,
        }
    }
    /// A model over a backing disk: reads come from `backing`; `v2` decides what discard shows.
    pub fn over_backing(backing: &[u8], size: u64, cluster_size: u64, v2: bool) -> Model {
        let mut data = backing.to_vec();
        data.resize(size as usize, 0);
        let discard_reveals = if v2 {
            data.clone()
        } else {
            vec![0; size as usize]
        };
        Model {
            data,
            discard_reveals,
            cluster_size,
        }
    }
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }
    pub fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }
    pub fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }
    /// Whole clusters inside the range are discarded; partial ones stay.
    pub fn discard(&mut self, off: u64, len: u64) {
        let cs = self.cluster_size;
        let start = off.div_ceil(cs) * cs;
        let end = ((off + len) / cs * cs).min(self.size());
        if start < end {
            let (s, e) = (start as usize, end as usize);
            let src = self.discard_reveals[s..e].to_vec();
            self.data[s..e].copy_from_slice(&src);
        }
    }
    pub fn resize(&mut self, new_size: u64) {
        self.data.resize(new_size as usize, 0);
        self.discard_reveals.resize(new_size as usize, 0);
    }
    /// Writes the model as a raw file.
    pub fn save(&self, path: &Path) {
        std::fs::write(path, &self.data).unwrap();
    }
}

/// Parameters of a random workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub ops: usize,
    /// Largest single write (bytes).
    pub max_len: u64,
    /// Percent of operations that are write_zeroes.
    pub zero_pct: u64,
    /// Percent of operations that are discards.
    pub discard_pct: u64,
    /// Flush after this many operations (0: never).
    pub flush_every: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            ops: 300,
            max_len: 256 * KIB,
            zero_pct: 10,
            discard_pct: 8,
            flush_every: 50,
        }
    }
}

/// Picks an (offset, length) pair: sector-aligned, cluster-aligned or arbitrary, often in a hot
/// region so that later operations overwrite earlier ones.
pub fn pick_range(rng: &mut Rng, size: u64, cluster: u64, max_len: u64) -> (u64, u64) {
    let len = match rng.below(10) {
        0..=3 => rng.range(1, 8 * KIB),
        4..=5 => rng.range(1, 16) * 512,
        6 => cluster * rng.range(1, 3),
        7 => rng.range(1, max_len),
        _ => rng.range(1, 64 * KIB),
    }
    .min(max_len)
    .min(size);
    let space = size - len;
    let off = match rng.below(10) {
        0..=3 => rng.below(space.min(size / 8) + 1),
        4..=5 => rng.below(space / 512 + 1) * 512,
        6..=7 => (rng.below(space / cluster + 1) * cluster).min(space),
        _ => rng.below(space + 1),
    };
    (off, len)
}

/// Runs a seeded random mix of writes, overwrites, write_zeroes and discards on `img`, mirrored into
/// `model`.
pub fn run_workload(img: &Image, model: &mut Model, rng: &mut Rng, w: &Workload) {
    let size = model.size();
    let cs = model.cluster_size;
    for i in 0..w.ops {
        let roll = rng.below(100);
        let (off, len) = pick_range(rng, size, cs, w.max_len);
        if roll < w.zero_pct {
            img.write_zeroes(off, len)
                .unwrap_or_else(|e| panic!("op {i}: write_zeroes({off}, {len}): {e}"));
            model.zero(off, len);
        } else if roll < w.zero_pct + w.discard_pct {
            // Discards are more useful when they cover whole clusters.
            let (off, len) = if rng.chance(50) {
                let c = rng.below(size / cs);
                let n = rng.range(1, 4).min(size / cs - c);
                (c * cs, n * cs)
            } else {
                (off, len)
            };
            img.discard(off, len)
                .unwrap_or_else(|e| panic!("op {i}: discard({off}, {len}): {e}"));
            model.discard(off, len);
        } else {
            let buf = if rng.chance(20) {
                vec![rng.below(256) as u8; len as usize]
            } else {
                rng.bytes(len as usize)
            };
            img.write_at(&buf, off)
                .unwrap_or_else(|e| panic!("op {i}: write_at({off}, {len}): {e}"));
            model.write(off, &buf);
        }
        if w.flush_every > 0 && (i + 1) % w.flush_every == 0 {
            img.flush().unwrap_or_else(|e| panic!("op {i}: flush: {e}"));
        }
        if i % 64 == 63 {
            // Spot-check a random range while the image is open.
            let (o, l) = pick_range(rng, size, cs, 128 * KIB);
            let mut got = vec![0u8; l as usize];
            img.read_at(&mut got, o)
                .unwrap_or_else(|e| panic!("op {i}: read_at({o}, {l}): {e}"));
            assert_same(
                &format!("after op {i}: read_at({o}, {l})"),
                &got,
                &model.data[o as usize..(o + l) as usize],
            );
        }
    }
}

/// A random qemu-io workload: `write -P`, `write -z` (sometimes with `-u`), `discard`; offsets and
/// lengths of every alignment. qemu-img's own raw conversion is the reference, so no model is kept.
pub fn qemu_io_workload(
    rng: &mut Rng,
    size: u64,
    cluster: u64,
    ops: usize,
    max_len: u64,
) -> Vec<String> {
    let mut cmds = Vec::with_capacity(ops);
    for _ in 0..ops {
        let (off, len) = pick_range(rng, size, cluster, max_len);
        let roll = rng.below(100);
        let cmd = if roll < 12 {
            let u = if rng.chance(50) { "-u " } else { "" };
            format!("write -z {u}{off} {len}")
        } else if roll < 20 {
            let c = rng.below(size / cluster);
            let n = rng.range(1, 4).min(size / cluster - c);
            format!("discard {} {}", c * cluster, n * cluster)
        } else {
            format!("write -P {:#x} {off} {len}", rng.range(1, 255))
        };
        cmds.push(cmd);
    }
    cmds
}

// ------------------------------------------------------------------------------------------------
// Misc

/// A fresh temporary directory (removed when dropped).
pub fn tmpdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcow2rs-interop-")
        .tempdir()
        .unwrap()
}

/// A 4 MiB image with 4 KiB clusters (two L1 entries), three data clusters written by qemu-io.
pub fn qemu_small_image(path: &Path) {
    qemu_create(path, 4 << 20, "cluster_size=4096");
    qemu_io(
        path,
        "qcow2",
        &[
            "write -P 0xaa 0 4k".into(),
            "write -P 0xbb 4k 4k".into(),
            "write -P 0xcc 8k 4k".into(),
        ],
    )
    .ok();
}

/// `dir/name` as a PathBuf.
pub fn path_in(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Runs `f` on another thread and panics if it has not finished within `secs` (an endless loop or
/// an unbounded allocation in the code under test) or if it panicked (the panic is re-raised with
/// its message).
pub fn with_timeout<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(what.to_string())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {secs} s (endless loop or huge allocation?)")
        }
    }
}

/// The message of a caught panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

// ------------------------------------------------------------------------------------------------
// A random workload mixing snapshots, compressed clusters, zeroes, discards, resizes, flushes and
// reopens, with a model of the active disk and of every snapshot; our check along the way,
// qemu-img check and qemu-img's reading at the end (review3.rs, review4.rs).

/// The password of [`SnapshotWorkload`]'s LUKS images.
pub const WORKLOAD_PASSWORD: &str = "correct horse battery staple";

/// qemu's `--object` for [`WORKLOAD_PASSWORD`], as secret `sec0`.
pub fn workload_secret() -> String {
    format!("secret,id=sec0,data={WORKLOAD_PASSWORD}")
}

/// What kind of image a [`SnapshotWorkload`] runs on.
#[derive(Clone, Copy, Debug)]
pub enum ImageKind {
    Plain,
    Subclusters,
    /// LUKS, with [`WORKLOAD_PASSWORD`].
    Luks,
    /// Over a raw backing file of random data (discarded clusters become zero clusters, a
    /// grown range reads as zeros).
    Backing,
}

/// A snapshot the model keeps: its name and the disk it holds.
pub struct ModelSnapshot {
    pub name: String,
    pub data: Vec<u8>,
}

/// The model's side of a discard of `len` bytes at `off`: the whole clusters in it read as
/// zeros (the partial ones at either end keep their data), up to the end of the disk.
pub fn discard_model(m: &mut [u8], off: u64, len: u64, cs: u64) {
    let size = m.len() as u64;
    let end = off + len;
    let first = off.div_ceil(cs) * cs;
    let last = if end >= size { size } else { end / cs * cs };
    if last > first {
        m[first as usize..last as usize].fill(0);
    }
}

/// qemu-img's reading of the image (its active disk, or snapshot `name`), with
/// [`WORKLOAD_PASSWORD`] when `luks`.
pub fn qemu_raw(p: &Path, snapshot: Option<&str>, luks: bool) -> Vec<u8> {
    let raw = p.with_extension(format!("{}.raw", snapshot.unwrap_or("active")));
    let mut args: Vec<String> = vec!["convert".into(), "-U".into()];
    if let Some(name) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={name}")]);
    }
    if luks {
        args.extend([
            "--object".into(),
            workload_secret(),
            "--image-opts".into(),
            format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                p.display()
            ),
        ]);
    } else {
        args.push(p.to_str().unwrap().into());
    }
    args.extend(["-O".into(), "raw".into(), raw.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    qemu_img(&args).ok();
    let d = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    d
}

/// Parameters of [`snapshot_workload`].
#[derive(Clone, Debug)]
pub struct SnapshotWorkload {
    pub seed: u64,
    pub cluster_size: u32,
    pub refcount_bits: u32,
    pub kind: ImageKind,
    /// The cache mode every open uses (`CacheMode::None`: O_DIRECT, through the space reserved
    /// ahead of allocating writes, trimmed and punched at each close).
    pub cache: qcow2rs::CacheMode,
    pub ops: usize,
}

/// One thread: writes, compressed writes, zeroes, discards, snapshots created, applied and
/// deleted, the disk grown and shrunk, flushes, closes and reopens, against a model of the
/// disk and of every snapshot; our check and a full read every 16 operations, qemu-img check
/// and qemu-img's reading of the disk and of every snapshot at the end.
pub fn snapshot_workload(w: &SnapshotWorkload) {
    let d = tmpdir();
    let p = d.path().join("w.qcow2");
    let cs = w.cluster_size as u64;
    let mut rng = Rng::new(w.seed);
    let size0 = 64 * cs + 512 * rng.below(4);
    let luks = matches!(w.kind, ImageKind::Luks);
    let encryption = luks.then(|| {
        let mut e = qcow2rs::EncryptionOptions::luks(WORKLOAD_PASSWORD);
        e.iter_time_ms = 10;
        e
    });
    let mut model = vec![0u8; size0 as usize];
    let backing = matches!(w.kind, ImageKind::Backing);
    if backing {
        rng.fill(&mut model);
        std::fs::write(d.path().join("base.raw"), &model).unwrap();
    }
    Image::create(
        &p,
        &qcow2rs::CreateOptions {
            cluster_size: w.cluster_size,
            refcount_bits: w.refcount_bits,
            extended_l2: matches!(w.kind, ImageKind::Subclusters),
            encryption,
            backing_file: backing.then(|| "base.raw".into()),
            backing_format: backing.then(|| "raw".into()),
            ..qcow2rs::CreateOptions::new(size0)
        },
    )
    .unwrap();
    let opts = OpenOptions {
        password: luks.then(|| WORKLOAD_PASSWORD.into()),
        cache: w.cache,
        ..OpenOptions::default()
    };
    let ctx = format!(
        "seed {}, {} B clusters, {}-bit refcounts, {:?}, {:?}",
        w.seed, cs, w.refcount_bits, w.kind, w.cache
    );
    let mut snaps: Vec<ModelSnapshot> = Vec::new();
    let mut img = Image::open(&p, &opts).unwrap();
    let mut next = 0;
    let mut log = Vec::new();
    for i in 0..w.ops {
        let size = model.len() as u64;
        let op = rng.below(100);
        let (off, len) = {
            let off = rng.below(size) & !511;
            let len = (rng.range(1, 3 * cs) & !511).max(512).min(size - off);
            (off, len)
        };
        match op {
            0..=24 => {
                let b = rng.bytes(len as usize);
                log.push(format!("write {off:#x}+{len:#x}"));
                img.write_at(&b, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            25..=44 => {
                let c = rng.below(size.div_ceil(cs)) * cs;
                let n = cs.min(size - c);
                let b = compressible(rng.next_u64(), n as usize);
                log.push(format!("compressed {c:#x}+{n:#x}"));
                img.write_compressed(c, &b).unwrap();
                model[c as usize..(c + n) as usize].copy_from_slice(&b);
            }
            45..=54 => {
                log.push(format!("zeroes {off:#x}+{len:#x}"));
                img.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            55..=66 => {
                log.push(format!("discard {off:#x}+{len:#x}"));
                img.discard(off, len).unwrap();
                discard_model(&mut model, off, len, cs);
            }
            67..=74 => {
                if snaps.len() < 4 {
                    let name = format!("s{next}");
                    next += 1;
                    log.push(format!("snapshot create {name}"));
                    img.create_snapshot(&name).unwrap();
                    snaps.push(ModelSnapshot {
                        name,
                        data: model.clone(),
                    });
                }
            }
            75..=80 => {
                if !snaps.is_empty() {
                    let s = &snaps[rng.below(snaps.len() as u64) as usize];
                    log.push(format!("snapshot apply {}", s.name));
                    img.apply_snapshot(s.name.as_str()).unwrap();
                    model = s.data.clone();
                }
            }
            81..=86 => {
                if !snaps.is_empty() {
                    let k = rng.below(snaps.len() as u64) as usize;
                    let s = snaps.remove(k);
                    log.push(format!("snapshot delete {}", s.name));
                    img.delete_snapshot(s.name.as_str()).unwrap();
                }
            }
            87..=91 => {
                let new = if rng.chance(50) {
                    size + 512 * rng.range(1, 3 * cs / 512)
                } else {
                    (size - 512 * rng.range(1, 3 * cs / 512)).max(8 * cs)
                };
                log.push(format!("resize {size:#x} -> {new:#x}"));
                match img.resize(new) {
                    Ok(()) => model.resize(new as usize, 0),
                    Err(e) => log.push(format!("  refused: {e}")),
                }
            }
            92..=95 => {
                log.push("flush".into());
                img.flush().unwrap();
            }
            _ => {
                log.push("reopen".into());
                img.close().unwrap();
                img = Image::open(&p, &opts).unwrap();
            }
        }
        if i % 16 == 15 {
            let r = img.check(None).unwrap();
            assert!(
                r.is_clean(),
                "{ctx}: check after op {i}:\n{}\nops:\n{}",
                head_tail(&r.messages.join("\n"), 20),
                log.join("\n")
            );
            let mut got = vec![0u8; model.len()];
            img.read_at(&mut got, 0).unwrap();
            if got != model {
                eprintln!("{ctx}: ops:\n{}", log.join("\n"));
            }
            assert_same(&format!("{ctx}: disk after op {i}"), &got, &model);
        }
    }
    img.close().unwrap();
    let q = if luks {
        let opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            p.display()
        );
        qemu_img(&[
            "check",
            "--object",
            &workload_secret(),
            "--image-opts",
            &opts,
        ])
    } else {
        qemu_img(&["check", p.to_str().unwrap()])
    };
    assert!(
        q.code == 0 && q.all().contains("No errors were found"),
        "{ctx}: qemu-img check:\n{}\nops:\n{}",
        q.all(),
        log.join("\n")
    );
    let got = qemu_raw(&p, None, luks);
    if got != model {
        eprintln!("{ctx}: ops:\n{}", log.join("\n"));
    }
    assert_same(&format!("{ctx}: qemu reads the disk"), &got, &model);
    for s in &snaps {
        // qemu-img reads a snapshot at the active disk's size.
        let got = qemu_raw(&p, Some(&s.name), luks);
        let n = got.len().min(s.data.len());
        if got[..n] != s.data[..n] {
            eprintln!("{ctx}: ops:\n{}", log.join("\n"));
        }
        assert_same(
            &format!("{ctx}: qemu reads snapshot {}", s.name),
            &got[..n],
            &s.data[..n],
        );
    }
}
