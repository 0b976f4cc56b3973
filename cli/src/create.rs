//! `qcow2rs create`: like `qemu-img create`.

use std::os::unix::fs::FileExt;

use qcow2rs::{Format, Image, OpenOptions};

use crate::disk::{open_error, parse_format, resolve_format, RawFile};
use crate::opts::OptList;
use crate::util::{
    create_error, io_text, parse_size, path_combine, CliError, CliResult, SizeError,
};
use crate::CreateArgs;

/// Parse a size argument with qemu-img's messages.
pub fn parse_image_size(s: &str) -> CliResult<u64> {
    parse_size(s).map_err(|e| match e {
        SizeError::Invalid => CliError::new(format!("Invalid image size specified: '{s}'.")),
        SizeError::TooLarge => CliError::new(format!(
            "Invalid image size specified. Must be between 0 and {}.",
            i64::MAX
        )),
    })
}

/// The virtual size of the image at `path` (format `fmt`, probed when `None`).
pub fn image_size(path: &str, fmt: Option<Format>) -> CliResult<u64> {
    match resolve_format(path, fmt)? {
        Format::Qcow2 => {
            let opts = OpenOptions {
                open_backing: false,
                // The size is metadata: an encrypted backing file needs no key for it.
                without_key: true,
                ..OpenOptions::read_only()
            };
            let img = Image::open(path, &opts).map_err(|e| open_error(path, &e))?;
            Ok(img.virtual_size())
        }
        Format::Raw => {
            let disk = crate::disk::Disk::Raw(RawFile::open(path, true)?);
            Ok(disk.size())
        }
    }
}

pub fn run(a: &CreateArgs) -> CliResult {
    let fmt = parse_format(&a.fmt).map_err(|e| CliError::new(format!("{}: {}", a.file, e.msg)))?;
    let file = a.file.as_str();
    let mut opts = OptList::parse(&a.options)?;
    if let Some(b) = &a.backing {
        opts.set("backing_file", b);
    }
    if let Some(f) = &a.backing_fmt {
        opts.set("backing_fmt", f);
    }
    opts.validate_keys(fmt, file)?;

    let mut size = match &a.size {
        Some(s) => Some(parse_image_size(s)?),
        None => None,
    };
    if let Some(v) = opts.get("size") {
        if size.is_some() {
            return Err(CliError::new(format!(
                "{file}: The image size must be specified only once"
            )));
        }
        // Parsed (with its own message) by to_create_options below.
        size = parse_size(v).ok();
    }

    let mut create = match fmt {
        Format::Qcow2 => {
            let mut c = opts.to_create_options(file)?;
            let password = match &a.sec.password_file {
                Some(f) => Some(crate::secrets::read_password_file(f)?),
                None => None,
            };
            c.encryption = opts.encryption(file, &a.sec.secrets()?, password)?;
            Some(c)
        }
        Format::Raw => None,
    };

    // The backing file: its format is required; unless -u, it must open, and it gives the size
    // when none was given.
    if let Some(c) = create.as_mut() {
        if let Some(backing) = c.backing_file.clone() {
            let full = path_combine(file, &backing);
            let Some(bfmt) = c.backing_format.clone() else {
                let mut msg = format!("{file}: Backing file specified without backing format");
                if let Ok(p) = qcow2rs::probe_format(&full) {
                    msg.push_str(&format!("\nDetected format of {}.", p.as_str()));
                }
                return Err(CliError::new(msg));
            };
            let bfmt =
                parse_format(&bfmt).map_err(|e| CliError::new(format!("{file}: {}", e.msg)))?;
            if !a.unsafe_backing {
                let bsize = image_size(&full, Some(bfmt)).map_err(|e| {
                    // qemu-img: "FILE: Could not open 'B': <why>\nCould not open backing image."
                    let prefix = format!("Could not open '{full}': ");
                    let why = e.msg.strip_prefix(&prefix).unwrap_or(&e.msg);
                    let why = why.strip_prefix(&prefix).unwrap_or(why);
                    CliError::new(format!(
                        "{file}: {prefix}{why}\nCould not open backing image."
                    ))
                })?;
                if size.is_none() {
                    size = Some(bsize);
                }
            }
        }
    }

    let Some(size) = size else {
        return Err(CliError::new(format!(
            "{file}: Image creation needs a size parameter"
        )));
    };

    if !a.quiet {
        println!("Formatting '{file}', {}", opts.formatting_line(fmt, size));
    }

    match create {
        Some(mut c) => {
            c.size = size;
            c.open_backing = !a.unsafe_backing;
            Image::create(file, &c).map_err(|e| create_error(file, &e))?;
        }
        None => create_raw(file, size, opts.get("preallocation"))?,
    }
    Ok(0)
}

/// Create (or truncate) a raw file of `size` bytes.
pub fn create_raw(file: &str, size: u64, prealloc: Option<&str>) -> CliResult<()> {
    let err =
        |what: &str, e: std::io::Error| CliError::new(format!("{file}: {what}: {}", io_text(&e)));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|e| err("Could not create file", e))?;
    f.set_len(size)
        .map_err(|e| err("Could not resize file", e))?;
    match prealloc {
        None | Some("off") => {}
        Some("falloc") => {
            if size > 0 {
                rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size)
                    .map_err(|e| err("Could not preallocate data", e.into()))?;
            }
        }
        Some("full") => {
            let zeros = vec![0u8; 1 << 20];
            let mut pos = 0u64;
            while pos < size {
                let n = (size - pos).min(zeros.len() as u64) as usize;
                f.write_all_at(&zeros[..n], pos)
                    .map_err(|e| err("Could not write zeros for preallocation", e))?;
                pos += n as u64;
            }
        }
        Some(other) => {
            return Err(CliError::new(format!(
                "{file}: Invalid preallocation mode: '{other}'"
            )))
        }
    }
    f.sync_all().map_err(|e| err("Could not flush file", e))?;
    Ok(())
}
