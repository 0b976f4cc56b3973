//! `qcow2rs resize`: like `qemu-img resize`.

use qcow2rs::{Format, Image, OpenOptions};

use crate::disk::{open_error, open_io_error, parse_format, resolve_format};
use crate::util::{core_text, io_text, parse_size, round_up, CliError, CliResult};
use crate::ResizeArgs;

const SHRINK_WARNING: &str = "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";

pub fn run(a: &ResizeArgs, size_arg: &str) -> CliResult {
    let (rel, digits) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i8, &size_arg[1..]),
        Some(b'-') => (-1i8, &size_arg[1..]),
        _ => (0i8, size_arg),
    };
    let amount = parse_size(digits).map_err(|_| {
        CliError::new(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )
    })?;
    if let Some(p) = a.preallocation.as_deref() {
        if p != "off" {
            return Err(CliError::new(format!(
                "Unsupported preallocation mode: '{p}' (qcow2rs supports off)"
            )));
        }
    }
    let fmt = a.fmt.as_deref().map(parse_format).transpose()?;
    let r = a.sec.image(&a.file)?;
    let file = r.path.as_str();
    let fmt = resolve_format(file, fmt)?;

    let new_size = |current: u64| -> CliResult<u64> {
        let n = match rel {
            1 => current.checked_add(amount),
            -1 => current.checked_sub(amount),
            _ => Some(amount),
        };
        match n {
            Some(n) if n > 0 && n <= i64::MAX as u64 => Ok(n),
            _ => Err(CliError::new("New image size must be positive")),
        }
    };
    let refuse_shrink = || {
        eprintln!("qcow2rs: Use the --shrink option to perform a shrink operation.");
        eprintln!("qcow2rs: warning: {SHRINK_WARNING}");
        Ok(1)
    };

    match fmt {
        Format::Qcow2 => {
            let img = Image::open(file, &r.open_options(OpenOptions::new()))
                .map_err(|e| open_error(file, &e))?;
            let current = img.virtual_size();
            let target = new_size(current)?;
            if target < current {
                if !a.shrink {
                    return refuse_shrink();
                }
                // The core shrinks only over an unallocated tail: free the whole clusters past
                // the new end first, as qemu does when it shrinks.
                let cs = img.cluster_size() as u64;
                let from = round_up(target, cs);
                if from < current {
                    img.discard(from, current - from)
                        .map_err(|e| CliError::new(core_text(&e)))?;
                }
            }
            img.resize(target)
                .map_err(|e| CliError::new(core_text(&e)))?;
            img.close().map_err(|e| CliError::new(core_text(&e)))?;
        }
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(file)
                .map_err(|e| open_io_error(file, &e))?;
            let current = f.metadata().map_err(|e| open_io_error(file, &e))?.len();
            let current = round_up(current, 512);
            let target = new_size(current)?;
            if target < current && !a.shrink {
                return refuse_shrink();
            }
            f.set_len(target)
                .map_err(|e| CliError::new(format!("Could not resize file: {}", io_text(&e))))?;
            f.sync_all()
                .map_err(|e| CliError::new(format!("Could not flush file: {}", io_text(&e))))?;
        }
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
