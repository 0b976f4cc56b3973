//! `qcow2rs`: a disk image utility shaped like `qemu-img`.
//!
//! Same subcommands, flags, output wording and exit codes as qemu-img 10 where they apply, so
//! scripts and habits carry over. Everything here is a thin user of the `qcow2rs` core API.

mod amend;
mod bench;
mod check;
mod compare;
mod convert;
mod create;
mod disk;
mod info;
mod map;
mod opts;
mod progress;
mod qjson;
mod resize;
mod secrets;
mod snapshot;
mod util;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use util::{CliError, CliResult};

#[derive(Parser)]
#[command(
    name = "qcow2rs",
    version,
    about = "qcow2rs disk image utility (qcow2 and raw), shaped like qemu-img",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new disk image: create [-f FMT] [-o OPTIONS] [-b BACKING -F FMT] FILE [SIZE]
    Create(CreateArgs),
    /// Show information about an image
    Info(InfoArgs),
    /// Check an image for consistency, optionally repairing it
    Check(CheckArgs),
    /// Convert an image to another format (raw, qcow2), optionally compressed
    Convert(ConvertArgs),
    /// Show how the guest address space of an image is stored
    Map(MapArgs),
    /// Compare the guest-visible contents of two images
    Compare(CompareArgs),
    /// Change the virtual size of an image: resize [--shrink] FILE [+|-]SIZE
    Resize(ResizeArgs),
    /// Run a simple image benchmark, like qemu-img bench (plus the fdatasync count)
    Bench(bench::BenchArgs),
    /// Change an image's format options: LUKS key slots (-o encrypt.state=active|inactive,...)
    Amend(AmendArgs),
    /// List, create, apply or delete internal snapshots: snapshot [-l | -a|-c|-d SNAPSHOT] FILE
    #[command(after_help = SNAPSHOT_HELP)]
    Snapshot(SnapshotArgs),
}

const SNAPSHOT_HELP: &str = "\
-l is the default; it prints nothing for an image without snapshots. As in qemu-img, -a takes
a snapshot ID, else a name (the first snapshot with it), and -d takes a name (the first
snapshot with it); names need not be unique, and -c cuts them to 255 bytes.

Encrypted images: -l lists the snapshots without the password (they are metadata; a password
that is given is checked), where qemu-img needs the password even to list. -c, -a and -d need
it, as in qemu-img (--object secret,... --image-opts ..., or --password-file). -l does not
need the backing file either (qemu-img opens it).";

/// Arguments of `snapshot`.
#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (probed when omitted; incompatible with --image-opts)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub fmt: Option<String>,
    /// Open the image in shared mode: with -l only (refused with -c, -a, -d, as in qemu-img)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet (the operations other than -l print nothing anyway)
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// List the snapshots of the image (the default)
    #[arg(short = 'l', long = "list", action = clap::ArgAction::Count)]
    pub list: u8,
    /// Create a snapshot named SNAPSHOT of the disk as it is now
    #[arg(
        short = 'c',
        long = "create",
        value_name = "SNAPSHOT",
        allow_hyphen_values = true
    )]
    pub create: Vec<String>,
    /// Apply the snapshot with ID SNAPSHOT, else the first named SNAPSHOT: the disk reverts to it (and to its size)
    #[arg(
        short = 'a',
        long = "apply",
        value_name = "SNAPSHOT",
        allow_hyphen_values = true
    )]
    pub apply: Vec<String>,
    /// Delete the (first) snapshot named SNAPSHOT
    #[arg(
        short = 'd',
        long = "delete",
        value_name = "SNAPSHOT",
        allow_hyphen_values = true
    )]
    pub delete: Vec<String>,
    /// Image file (or with --image-opts an option string)
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Arguments of `amend`.
#[derive(Args)]
pub struct AmendArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (probed when omitted)
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Options: encrypt.state, encrypt.keyslot, encrypt.new-secret, encrypt.old-secret, encrypt.iter-time
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Allow erasing the last key slot and overwriting an active one
    #[arg(long = "force")]
    pub force: bool,
    /// Read the password to add (encrypt.state=active) from FILE
    #[arg(long = "new-password-file", value_name = "FILE")]
    pub new_password_file: Option<String>,
    /// Quiet
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Cache mode for the image
    #[arg(short = 't')]
    pub cache: Option<String>,
    /// Image file
    pub file: String,
}

/// Arguments of `create`.
#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (qcow2 or raw)
    #[arg(short = 'f', default_value = "raw")]
    pub fmt: String,
    /// Format options, comma separated (cluster_size, refcount_bits, compat, backing_file, ...)
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Backing file
    #[arg(short = 'b')]
    pub backing: Option<String>,
    /// Backing file format
    #[arg(short = 'F')]
    pub backing_fmt: Option<String>,
    /// Do not open the backing file (a size must then be given)
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Image file
    pub file: String,
    /// Virtual size (k, M, G, T suffixes)
    pub size: Option<String>,
}

/// Arguments of `info`.
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (probed when omitted)
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Share the image even with writers (only the shared read lock is taken)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show the whole backing chain
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Image file
    pub file: String,
}

/// Arguments of `check`.
#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (probed when omitted)
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Repair: leaks or all
    #[arg(short = 'r', long = "repair")]
    pub repair: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Quiet
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Share the image even with writers (only the shared read lock is taken)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Cache mode for the image
    #[arg(short = 'T')]
    pub cache: Option<String>,
    /// Image file
    pub file: String,
}

/// Arguments of `convert`.
#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// The output argument is an option string (with -n): driver=qcow2,file.filename=F,encrypt.key-secret=ID
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Read the output's password from FILE (its exact bytes, like --password-file)
    #[arg(long = "target-password-file", value_name = "FILE")]
    pub target_password_file: Option<String>,
    /// Source format (probed when omitted)
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Output format: raw or qcow2
    #[arg(short = 'O', default_value = "raw")]
    pub out_fmt: String,
    /// Write compressed clusters (qcow2 output)
    #[arg(short = 'c')]
    pub compress: bool,
    /// Output format options, as for create
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Show progress
    #[arg(short = 'p')]
    pub progress: bool,
    /// Cache mode for the output (default unsafe: one sync at the end)
    #[arg(short = 't')]
    pub cache: Option<String>,
    /// Cache mode for the source
    #[arg(short = 'T')]
    pub src_cache: Option<String>,
    /// Backing file of the output: only data above it is copied
    #[arg(short = 'B')]
    pub backing: Option<String>,
    /// Format of the output's backing file
    #[arg(short = 'F')]
    pub backing_fmt: Option<String>,
    /// Do not create the output: it must exist
    #[arg(short = 'n')]
    pub no_create: bool,
    /// Allow out-of-order writes
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Number of parallel workers
    #[arg(short = 'm')]
    pub workers: Option<String>,
    /// Minimum run of zero bytes to leave sparse (default 4k; 0 writes everything)
    #[arg(short = 'S')]
    pub sparse: Option<String>,
    /// Share the source even with writers (only the shared read lock is taken)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Rescue a damaged source: what cannot be read is written as zeros, with a warning for
    /// each unreadable range and the total skipped at the end
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// Convert a snapshot of the source: snapshot.id=ID[,snapshot.name=NAME], snapshot.name=NAME, or an ID or name (ID first). The output has the snapshot's disk size (qemu-img gives it the image's current size)
    #[arg(
        short = 'l',
        long = "source-snapshot",
        value_name = "SNAPSHOT_PARAMS",
        allow_hyphen_values = true
    )]
    pub source_snapshot: Vec<String>,
    /// Convert a snapshot of the source, by ID or name: the same as -l ID_OR_NAME (older qemu-img's form; qemu-img 10 no longer has it)
    #[arg(
        short = 's',
        value_name = "SNAPSHOT_ID_OR_NAME",
        conflicts_with = "source_snapshot",
        allow_hyphen_values = true
    )]
    pub snapshot: Option<String>,
    /// Quiet
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Source image
    pub src: String,
    /// Output image
    pub dst: String,
}

/// Arguments of `map`.
#[derive(Args)]
pub struct MapArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (probed when omitted)
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// First guest byte to map
    #[arg(short = 's', long = "start-offset")]
    pub start: Option<String>,
    /// Number of bytes to map
    #[arg(short = 'l', long = "max-length")]
    pub max_length: Option<String>,
    /// Share the image even with writers (only the shared read lock is taken)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Image file
    pub file: String,
}

/// Arguments of `compare`.
#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Format of the first image (probed when omitted)
    #[arg(short = 'f')]
    pub fmt1: Option<String>,
    /// Format of the second image (probed when omitted)
    #[arg(short = 'F')]
    pub fmt2: Option<String>,
    /// Strict: also fail on size or allocation differences
    #[arg(short = 's')]
    pub strict: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Show progress
    #[arg(short = 'p')]
    pub progress: bool,
    /// Cache mode for both images
    #[arg(short = 'T')]
    pub cache: Option<String>,
    /// Share the images even with writers (only the shared read lock is taken)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// First image
    pub file1: String,
    /// Second image
    pub file2: String,
}

/// Arguments of `resize` (the size, the last argument, is taken off before parsing so that
/// `-5M` is not read as an option).
#[derive(Args)]
pub struct ResizeArgs {
    #[command(flatten)]
    pub sec: secrets::SecretArgs,
    /// Image format (probed when omitted)
    #[arg(short = 'f')]
    pub fmt: Option<String>,
    /// Allow shrinking
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Preallocation for the new part (only off)
    #[arg(long = "preallocation")]
    pub preallocation: Option<String>,
    /// Quiet
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Image file
    pub file: String,
}

fn run(args: Vec<String>) -> CliResult {
    let mut args = args;
    // resize: the size is always the last argument (it may look like an option: -5M).
    let mut resize_size = None;
    if args.get(1).map(String::as_str) == Some("resize") {
        let wants_help = args.iter().skip(2).any(|a| a == "-h" || a == "--help");
        if !wants_help {
            if args.len() < 4 {
                return Err(CliError::new(
                    "Expecting image file name and size\nTry 'qcow2rs resize --help' for more info",
                ));
            }
            resize_size = args.pop();
        }
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return Ok(code);
        }
    };
    match cli.cmd {
        Cmd::Create(a) => create::run(&a),
        Cmd::Info(a) => info::run(&a),
        Cmd::Check(a) => check::run(&a),
        Cmd::Convert(a) => convert::run(&a),
        Cmd::Map(a) => map::run(&a),
        Cmd::Compare(a) => compare::run(&a),
        Cmd::Resize(a) => resize::run(&a, resize_size.as_deref().unwrap_or("")),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::Amend(a) => amend::run(&a),
        Cmd::Snapshot(a) => snapshot::run(&a),
    }
}

/// `--output` value, with qemu-img's message when it is neither `human` nor `json`.
pub fn parse_output(cmd: &str, s: &str) -> CliResult<bool> {
    match s {
        "human" => Ok(false),
        "json" => Ok(true),
        _ => Err(CliError::new(format!(
            "--output expects 'human' or 'json' not '{s}'\nTry 'qcow2rs {cmd} --help' for more info"
        ))),
    }
}

fn main() -> ExitCode {
    // Like any Unix tool, end quietly when the reader of our output goes away
    // (`qcow2rs map img | head -1`), instead of panicking in `println!` on EPIPE.
    // SAFETY: setting a signal's disposition to its default, before any thread is started.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().collect();
    let code = match run(args) {
        Ok(code) => code,
        Err(e) if e.code == 0 => {
            // Requested help text (`-o help`).
            println!("{}", e.msg);
            0
        }
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("qcow2rs: {}", e.msg);
            e.code
        }
    };
    let _ = std::io::stdout().flush();
    ExitCode::from(code.clamp(0, 255) as u8)
}
