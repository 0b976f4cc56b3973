//! `qcow2rs bench`: like `qemu-img bench`, with the same flags, defaults and output, plus the
//! number of fdatasyncs the run cost.
//!
//! Request `i` goes to `offset + i * step` modulo the image size (the first one to `offset`
//! itself), as in qemu-img. qemu keeps DEPTH requests in flight from one thread with AIO, served
//! by a pool of up to 64 worker threads; here `min(DEPTH, 64)` threads (`QCOW2RS_BENCH_THREADS`
//! overrides the cap) take the next request from a shared counter, so reads and in-place
//! overwrites run in parallel while allocating writes serialise on the image's metadata lock.
//!
//! Flushes follow qemu's schedule: with `--flush-interval N`, a flush is due whenever the number
//! of requests not yet issued is a multiple of N (first after the initial burst of DEPTH
//! requests); in-flight requests are drained first (unless `--no-drain`). As in qemu-img the
//! clock stops when the last request completes: the flush due at the very end is issued (and
//! its fdatasyncs counted) but not timed, and neither is closing the image.
//!
//! `-n`/`-i native` are accepted and, like qemu, require `-t none` or `-t directsync` (O_DIRECT);
//! the requests are then served by the same thread pool. `-i io_uring` and `-i threads` likewise
//! select the thread pool.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::Instant;

use clap::Args;
use qcow2rs::{CacheMode, Format, Image, OpenOptions};

use crate::disk::{open_error, open_io_error, parse_format, resolve_format};
use crate::qjson::write_str;
use crate::util::{core_text, io_text, parse_size, strerror, CliError, CliResult};

/// Arguments of `bench` (qemu-img bench's).
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub sec: crate::secrets::SecretArgs,
    /// Print the sector cipher's own speed on this machine (luks, luks-cbc or aes) and exit
    #[arg(long = "cipher-speed", hide = true, value_name = "CIPHER")]
    pub cipher_speed: Option<String>,
    /// Number of I/O requests to perform (default 75000)
    #[arg(short = 'c', long = "count", allow_hyphen_values = true)]
    pub count: Option<String>,
    /// Number of requests to perform in parallel (default 64)
    #[arg(short = 'd', long = "depth", allow_hyphen_values = true)]
    pub depth: Option<String>,
    /// Image format (probed when omitted)
    #[arg(short = 'f', long = "format")]
    pub fmt: Option<String>,
    /// Issue a flush after this number of requests (write tests only)
    #[arg(long = "flush-interval", allow_hyphen_values = true)]
    pub flush_interval: Option<String>,
    /// Do not wait for requests in flight when flushing
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Async I/O backend: threads, native or io_uring (all served by a thread pool)
    #[arg(short = 'i', long = "aio")]
    pub aio: Option<String>,
    /// Native AIO (requires -t none or directsync, as in qemu-img)
    #[arg(short = 'n', long = "native")]
    pub native: bool,
    /// Start the first request at this offset
    #[arg(short = 'o', long = "offset", allow_hyphen_values = true)]
    pub offset: Option<String>,
    /// Write this pattern byte instead of zero
    #[arg(long = "pattern", allow_hyphen_values = true)]
    pub pattern: Option<String>,
    /// Quiet (accepted; the summary is printed anyway, as by qemu-img)
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Size of each request (default 4k)
    #[arg(short = 's', long = "buffer-size", allow_hyphen_values = true)]
    pub buffer_size: Option<String>,
    /// Offset increment from one request to the next (default: the buffer size)
    #[arg(short = 'S', long = "step-size", allow_hyphen_values = true)]
    pub step: Option<String>,
    /// Cache mode: writeback (default), writethrough, none, directsync, unsafe
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Perform a write test (default is read)
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Open the image in shared mode (read tests only)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// With `-t unsafe`: fdatasync the image file at every flush anyway. This measures the
    /// floor of a durable flush (one barrier, no metadata ordering) for scripts/bench.py.
    #[arg(long = "sync-flushes", hide = true)]
    pub sync_flushes: bool,
    /// Output format: human or json (json adds the thread count and fdatasync figures)
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Image file
    pub file: Option<String>,
    /// Extra arguments (an error, as in qemu-img)
    #[arg(hide = true)]
    pub extra: Vec<String>,
}

/// Most threads serving requests, whatever the depth.
const THREAD_CAP: u64 = 64;

/// `qemu_strtoul(s, NULL, 0, ..)`: decimal, `0x` hex or `0` octal; a leading `-` wraps around
/// (so it is reported as out of range).
fn parse_ulong(s: &str) -> Option<u64> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse().ok()?
    };
    Some(if neg && v != 0 { u64::MAX } else { v })
}

/// An integer option checked like qemu-img bench checks it.
fn int_opt(what: &str, s: Option<&str>, default: u64, min: u64, max: u64) -> CliResult<u64> {
    let Some(s) = s else { return Ok(default) };
    match parse_ulong(s) {
        None => Err(CliError::new(format!("Invalid {what} specified: '{s}'."))),
        Some(v) if v < min || v > max => Err(CliError::new(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
        Some(v) => Ok(v),
    }
}

/// A size option (`cvtnum`: suffixes allowed) checked like qemu-img bench checks it.
fn size_opt(what: &str, s: Option<&str>, default: u64, min: u64, max: u64) -> CliResult<u64> {
    let Some(s) = s else { return Ok(default) };
    let range = || {
        CliError::new(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))
    };
    if s.trim_start().starts_with('-') {
        return Err(range());
    }
    match parse_size(s) {
        Ok(v) if v < min || v > max => Err(range()),
        Ok(v) => Ok(v),
        Err(crate::util::SizeError::TooLarge) => Err(range()),
        Err(crate::util::SizeError::Invalid) => {
            Err(CliError::new(format!("Invalid {what} specified: '{s}'.")))
        }
    }
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
struct Plan {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: usize,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
    size: u64,
}

impl Plan {
    /// Offset of request `i`: qemu adds the step and wraps modulo the image size after each
    /// request, so only the first request can lie at or past the end.
    fn offset_of(&self, i: u64) -> u64 {
        if i == 0 || self.size == 0 {
            return self.offset;
        }
        ((self.offset as u128 + i as u128 * self.step as u128) % self.size as u128) as u64
    }

    /// Number of requests issued when the first flush is due: the first count >= the initial
    /// burst of `depth` requests that leaves a multiple of the interval still to issue.
    fn first_flush_at(&self) -> u64 {
        let burst = self.depth.min(self.count);
        let left = self.count - burst;
        burst + left % self.flush_interval
    }
}

/// An image opened for the run.
enum Target {
    /// The image, and (`--sync-flushes`) a handle to fdatasync at each flush with its count.
    Qcow2(Box<Image>, Option<(File, AtomicU64)>),
    Raw(RawImage),
}

/// A raw image file: pread/pwrite, fdatasync as the flush, cache modes as qemu applies them.
struct RawImage {
    file: File,
    /// A second handle without O_DIRECT, for requests that are not block aligned.
    buffered: Option<File>,
    size: u64,
    write_through: bool,
    ignore_flush: bool,
    syncs: AtomicU64,
}

/// O_DIRECT alignment for raw files (and of every request buffer).
const ALIGN: usize = 4096;

impl RawImage {
    fn open(path: &str, write: bool, cache: CacheMode) -> CliResult<RawImage> {
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(write);
        if cache.direct() {
            oo.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let file = oo.open(path).map_err(|e| open_io_error(path, &e))?;
        let buffered = if cache.direct() {
            Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(path)
                    .map_err(|e| open_io_error(path, &e))?,
            )
        } else {
            None
        };
        let size = file.metadata().map_err(|e| open_io_error(path, &e))?.len();
        Ok(RawImage {
            file,
            buffered,
            size,
            write_through: cache.write_through(),
            ignore_flush: cache == CacheMode::Unsafe,
            syncs: AtomicU64::new(0),
        })
    }

    fn handle(&self, buf: &[u8], offset: u64) -> &File {
        match &self.buffered {
            Some(b)
                if !offset.is_multiple_of(512)
                    || !buf.len().is_multiple_of(512)
                    || !(buf.as_ptr() as usize).is_multiple_of(512) =>
            {
                b
            }
            _ => &self.file,
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data()
    }
}

impl Target {
    fn size(&self) -> u64 {
        match self {
            Target::Qcow2(img, _) => img.virtual_size(),
            Target::Raw(r) => r.size,
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        match self {
            Target::Qcow2(img, _) => img.read_at(buf, offset).map_err(|e| core_text(&e)),
            Target::Raw(r) => {
                let f = r.handle(buf, offset);
                f.read_exact_at(buf, offset).map_err(|e| io_text(&e))
            }
        }
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        match self {
            Target::Qcow2(img, _) => img.write_at(buf, offset).map_err(|e| core_text(&e)),
            Target::Raw(r) => {
                let f = r.handle(buf, offset);
                f.write_all_at(buf, offset).map_err(|e| io_text(&e))?;
                if r.write_through {
                    r.sync().map_err(|e| io_text(&e))?;
                }
                Ok(())
            }
        }
    }

    fn flush(&self) -> Result<(), String> {
        match self {
            Target::Qcow2(img, extra) => {
                img.flush().map_err(|e| core_text(&e))?;
                if let Some((f, n)) = extra {
                    n.fetch_add(1, Ordering::Relaxed);
                    f.sync_data().map_err(|e| io_text(&e))?;
                }
                Ok(())
            }
            Target::Raw(r) if r.ignore_flush => Ok(()),
            Target::Raw(r) => r.sync().map_err(|e| io_text(&e)),
        }
    }

    fn syncs(&self) -> u64 {
        match self {
            Target::Qcow2(img, extra) => {
                img.sync_count() + extra.as_ref().map_or(0, |(_, n)| n.load(Ordering::Relaxed))
            }
            Target::Raw(r) => r.syncs.load(Ordering::Relaxed),
        }
    }

    fn close(self) -> Result<(), String> {
        match self {
            Target::Qcow2(img, _) => (*img).close().map_err(|e| core_text(&e)),
            Target::Raw(_) => Ok(()),
        }
    }
}

/// A request buffer aligned for O_DIRECT.
struct Buf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, fill: u8) -> Buf {
        let mem = vec![fill; len + ALIGN];
        let start = (ALIGN - mem.as_ptr() as usize % ALIGN) % ALIGN;
        Buf { mem, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// What a run measured.
struct Outcome {
    seconds: f64,
    syncs: u64,
    flushes: u64,
    threads: u64,
}

/// Work shared by the threads of a run.
struct Shared<'a> {
    target: &'a Target,
    plan: &'a Plan,
    /// Next request to issue.
    next: AtomicU64,
    /// End (exclusive) of the requests that may be issued before the next drain.
    seg_end: AtomicU64,
    /// Flushes issued.
    flushes: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared<'_> {
    fn fail(&self, msg: String) {
        self.failed.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(msg);
        }
    }

    fn request(&self, i: u64, buf: &mut Buf) -> Result<(), String> {
        let off = self.plan.offset_of(i);
        let len = self.plan.bufsize as u64;
        if off.checked_add(len).is_none_or(|end| end > self.plan.size) {
            // qemu's block layer fails requests past the end with EIO.
            return Err(strerror(5));
        }
        if self.plan.write {
            self.target.write(buf.get(), off)
        } else {
            self.target.read(buf.get(), off)
        }
    }

    fn flush(&self) -> Result<(), String> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.target.flush()
    }

    /// Issue requests until `end` (or a failure); with `--no-drain`, issue the due flushes
    /// inline.
    fn issue(&self, end: u64, buf: &mut Buf) {
        while !self.failed.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= end {
                break;
            }
            let r = if !self.plan.drain && self.plan.flush_interval > 0 && self.flush_due(i) {
                self.flush().and_then(|_| self.request(i, buf))
            } else {
                self.request(i, buf)
            };
            if let Err(m) = r {
                self.fail(m);
            }
        }
    }

    /// Whether a flush is due once `issued` requests were issued.
    fn flush_due(&self, issued: u64) -> bool {
        let p = self.plan;
        issued >= p.first_flush_at() && (p.count - issued).is_multiple_of(p.flush_interval)
    }
}

/// Run the requests of `plan` on `target`.
fn execute(target: &Target, plan: &Plan, threads: u64) -> Result<Outcome, String> {
    let sh = Shared {
        target,
        plan,
        next: AtomicU64::new(0),
        seg_end: AtomicU64::new(0),
        flushes: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    // Segments end where a drained flush is due.
    let segmented = plan.flush_interval > 0 && plan.drain;
    let first_end = if segmented {
        plan.first_flush_at()
    } else {
        plan.count
    };
    sh.seg_end.store(first_end, Ordering::SeqCst);
    let syncs0 = target.syncs();
    let barrier = Barrier::new(threads as usize);
    // The clock starts once every thread is ready, as qemu-img's starts after its setup.
    let t0: OnceLock<Instant> = OnceLock::new();
    let elapsed: Mutex<Option<f64>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = Buf::new(plan.bufsize, plan.pattern);
                if barrier.wait().is_leader() {
                    t0.get_or_init(Instant::now);
                }
                loop {
                    let end = sh.seg_end.load(Ordering::SeqCst);
                    sh.issue(end, &mut buf);
                    if barrier.wait().is_leader() {
                        // Everything up to `end` completed: the due flush, then the next
                        // segment.
                        let done = end >= plan.count || sh.failed.load(Ordering::SeqCst);
                        if done {
                            let t = t0.get_or_init(Instant::now).elapsed().as_secs_f64();
                            *elapsed.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
                        }
                        if segmented && !sh.failed.load(Ordering::SeqCst) {
                            if let Err(m) = sh.flush() {
                                sh.fail(m);
                            }
                        }
                        let next_end = if done || sh.failed.load(Ordering::SeqCst) {
                            u64::MAX
                        } else {
                            (end + plan.flush_interval).min(plan.count)
                        };
                        sh.next.store(end, Ordering::SeqCst);
                        sh.seg_end.store(next_end, Ordering::SeqCst);
                    }
                    barrier.wait();
                    if sh.seg_end.load(Ordering::SeqCst) == u64::MAX {
                        break;
                    }
                }
            });
        }
    });
    if let Some(m) = sh.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(m);
    }
    // The flush qemu issues when the last request completes (untimed there too); without
    // draining it is the one still due at the end.
    if plan.flush_interval > 0 && !plan.drain && plan.count >= plan.first_flush_at() {
        sh.flush()?;
    }
    let seconds = elapsed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_default();
    Ok(Outcome {
        seconds,
        syncs: target.syncs() - syncs0,
        flushes: sh.flushes.load(Ordering::Relaxed),
        threads,
    })
}

/// The thread pool size for a depth.
fn thread_count(depth: u64, count: u64) -> u64 {
    let cap = std::env::var("QCOW2RS_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(THREAD_CAP);
    depth.min(count).min(cap).max(1)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The extra summary line: fdatasyncs, per flush and per request.
fn syncs_line(o: &Outcome, count: u64) -> String {
    let per_req = ratio(o.syncs, count);
    if o.flushes > 0 {
        format!(
            "fdatasyncs: {} ({:.2} per flush, {} flushes, {:.3} per request)",
            o.syncs,
            ratio(o.syncs, o.flushes),
            o.flushes,
            per_req
        )
    } else {
        format!("fdatasyncs: {} ({:.3} per request)", o.syncs, per_req)
    }
}

fn json(plan: &Plan, file: &str, fmt: Format, cache: CacheMode, o: &Outcome) -> String {
    let bytes = plan.count * plan.bufsize as u64;
    let secs = o.seconds.max(1e-9);
    let mut name = String::new();
    write_str(&mut name, file);
    let fields: Vec<(&str, String)> = vec![
        ("filename", name),
        ("format", format!("\"{}\"", fmt.as_str())),
        ("cache", format!("\"{}\"", cache.as_str())),
        ("write", plan.write.to_string()),
        ("count", plan.count.to_string()),
        ("depth", plan.depth.to_string()),
        ("threads", o.threads.to_string()),
        ("buffer-size", plan.bufsize.to_string()),
        ("offset", plan.offset.to_string()),
        ("step-size", plan.step.to_string()),
        ("flush-interval", plan.flush_interval.to_string()),
        ("drain", plan.drain.to_string()),
        ("seconds", format!("{:.6}", o.seconds)),
        ("bytes", bytes.to_string()),
        ("bytes-per-second", format!("{:.0}", bytes as f64 / secs)),
        (
            "requests-per-second",
            format!("{:.1}", plan.count as f64 / secs),
        ),
        ("flushes", o.flushes.to_string()),
        ("fdatasyncs", o.syncs.to_string()),
        (
            "fdatasyncs-per-flush",
            format!("{:.4}", ratio(o.syncs, o.flushes)),
        ),
        (
            "fdatasyncs-per-request",
            format!("{:.4}", ratio(o.syncs, plan.count)),
        ),
    ];
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("    \"{k}\": {v}"))
        .collect();
    format!("{{\n{}\n}}", body.join(",\n"))
}

pub fn run(a: &BenchArgs) -> CliResult {
    let json_out = crate::parse_output("bench", &a.output)?;
    if let Some(c) = &a.cipher_speed {
        let mut e = match c.as_str() {
            "aes" => qcow2rs::EncryptionOptions::aes("x"),
            "luks" | "luks-cbc" => qcow2rs::EncryptionOptions::luks("x"),
            _ => {
                return Err(CliError::new(format!(
                    "--cipher-speed expects luks, luks-cbc or aes, not '{c}'"
                )))
            }
        };
        if c == "luks-cbc" {
            e.cipher_mode = qcow2rs::CipherMode::Cbc;
            e.ivgen_alg = qcow2rs::IvGenAlg::Essiv;
        }
        let [se, sd, pe, pd] = qcow2rs::cipher_speed(&e, 256 << 20);
        let mb = |x: f64| x / (1 << 20) as f64;
        println!(
            "{{\"cipher\": \"{c}\", \"encrypt-1-thread\": {:.0}, \"decrypt-1-thread\": {:.0}, \"encrypt-all-cores\": {:.0}, \"decrypt-all-cores\": {:.0}}}",
            mb(se), mb(sd), mb(pe), mb(pd)
        );
        return Ok(0);
    }
    let Some(file) = a.file.as_deref().filter(|_| a.extra.is_empty()) else {
        return Err(CliError::new(
            "Expecting one image file name\nTry 'qcow2rs bench --help' for more info",
        ));
    };
    let image = a.sec.image(file)?;
    let file = image.path.as_str();
    const INT_MAX: u64 = i32::MAX as u64;
    let count = int_opt("request count", a.count.as_deref(), 75000, 1, INT_MAX)?;
    let depth = int_opt("queue depth", a.depth.as_deref(), 64, 1, INT_MAX)?;
    let offset = size_opt("offset", a.offset.as_deref(), 0, 0, i64::MAX as u64)?;
    let bufsize = size_opt("buffer size", a.buffer_size.as_deref(), 4096, 1, INT_MAX)?;
    let step = size_opt("step size", a.step.as_deref(), 0, 0, INT_MAX)?;
    let pattern = int_opt("pattern byte", a.pattern.as_deref(), 0, 0, 255)?;
    let flush_interval = int_opt("flush interval", a.flush_interval.as_deref(), 0, 0, INT_MAX)?;
    let cache = match a.cache.as_deref() {
        None => CacheMode::Writeback,
        Some(c) => CacheMode::parse(c).map_err(|_| CliError::new("Invalid cache mode"))?,
    };
    let native = match a.aio.as_deref() {
        None => a.native,
        Some("native") => true,
        Some("threads" | "io_uring") => a.native,
        Some(x) => return Err(CliError::new(format!("Invalid aio option: {x}"))),
    };
    let fmt = a.fmt.as_deref().map(parse_format).transpose()?;
    if !a.write && flush_interval > 0 {
        return Err(CliError::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if flush_interval > 0 && flush_interval < depth {
        return Err(CliError::new("Flush interval can't be smaller than depth"));
    }
    if native && !cache.direct() {
        return Err(CliError::new(format!(
            "Could not open '{file}': aio=native was specified, but it requires cache.direct=on, which was not specified."
        )));
    }
    if a.sync_flushes && cache != CacheMode::Unsafe {
        return Err(CliError::new("--sync-flushes needs -t unsafe"));
    }
    if a.force_share && a.write {
        return Err(CliError::new(format!(
            "Could not open '{file}': force-share=on can only be used with read-only images"
        )));
    }

    let fmt = resolve_format(file, fmt)?;
    let target = match fmt {
        Format::Qcow2 => {
            let o = image.open_options(OpenOptions {
                read_only: !a.write,
                force_share: a.force_share,
                cache,
                ..OpenOptions::new()
            });
            let img = Image::open(file, &o).map_err(|e| open_error(file, &e))?;
            let extra = if a.sync_flushes {
                let f = File::open(file).map_err(|e| open_io_error(file, &e))?;
                Some((f, AtomicU64::new(0)))
            } else {
                None
            };
            Target::Qcow2(Box::new(img), extra)
        }
        Format::Raw => Target::Raw(RawImage::open(file, a.write, cache)?),
    };
    let plan = Plan {
        count,
        depth,
        offset,
        bufsize: bufsize as usize,
        step: if step == 0 { bufsize } else { step },
        write: a.write,
        pattern: pattern as u8,
        flush_interval,
        drain: !a.no_drain,
        size: target.size(),
    };
    if !json_out {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            plan.count,
            if plan.write { "write" } else { "read" },
            plan.bufsize,
            plan.depth,
            plan.offset,
            plan.step
        );
        if flush_interval > 0 {
            println!("Sending flush every {flush_interval} requests");
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let outcome = execute(&target, &plan, thread_count(depth, count))
        .map_err(|m| CliError::new(format!("Failed request: {m}")))?;
    if json_out {
        println!("{}", json(&plan, file, fmt, cache, &outcome));
    } else {
        println!("Run completed in {:.3} seconds.", outcome.seconds);
        println!("{}", syncs_line(&outcome, plan.count));
    }
    target
        .close()
        .map_err(|m| CliError::new(format!("{file}: error while closing: {m}")))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(count: u64, depth: u64, interval: u64) -> Plan {
        Plan {
            count,
            depth,
            offset: 0,
            bufsize: 4096,
            step: 4096,
            write: true,
            pattern: 0,
            flush_interval: interval,
            drain: true,
            size: 1 << 30,
        }
    }

    #[test]
    fn flush_schedule_like_qemu() {
        // 20000 requests, 64 in flight, flush every 64: the initial burst passes 19968 left,
        // so the first flush comes at 19904 left (96 issued), then every 64, last at 0 left.
        let p = plan(20000, 64, 64);
        assert_eq!(p.first_flush_at(), 96);
        assert_eq!((20000 - 96) / 64 + 1, 312);
        // One in flight, flush after every request.
        assert_eq!(plan(10, 1, 1).first_flush_at(), 1);
        // Depth above the count: one flush, at the end.
        assert_eq!(plan(10, 64, 64).first_flush_at(), 10);
        assert_eq!(plan(100, 4, 10).first_flush_at(), 10);
    }

    #[test]
    fn offsets_wrap() {
        let mut p = plan(10, 1, 0);
        p.size = 10 * 4096;
        p.step = 3 * 4096;
        assert_eq!(p.offset_of(0), 0);
        assert_eq!(p.offset_of(4), 2 * 4096);
        p.offset = 11 * 4096; // past the end: only the first request is there
        assert_eq!(p.offset_of(0), 11 * 4096);
        assert_eq!(p.offset_of(1), 4 * 4096);
    }

    #[test]
    fn numbers_like_qemu() {
        assert_eq!(parse_ulong("010"), Some(8));
        assert_eq!(parse_ulong("0x10"), Some(16));
        assert_eq!(parse_ulong("0"), Some(0));
        assert_eq!(parse_ulong("-1"), Some(u64::MAX));
        assert_eq!(parse_ulong("abc"), None);
        assert!(int_opt("x", Some("0"), 1, 1, 5).is_err());
    }
}
