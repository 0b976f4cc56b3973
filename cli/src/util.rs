//! Small helpers shared by the subcommands: qemu-style size parsing and printing, error text,
//! backing-file path resolution.

use std::fmt;
use std::io;

/// A failed command: the message (printed as `qcow2rs: <message>`) and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub msg: String,
    pub code: i32,
}

impl CliError {
    /// A failure with exit code 1.
    pub fn new(msg: impl Into<String>) -> CliError {
        CliError {
            msg: msg.into(),
            code: 1,
        }
    }
    /// A failure with another exit code.
    pub fn with_code(msg: impl Into<String>, code: i32) -> CliError {
        CliError {
            msg: msg.into(),
            code,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

/// Result of a command: the exit code on success.
pub type CliResult<T = i32> = Result<T, CliError>;

/// `strerror(errno)`, as the C library words it.
pub fn strerror(errno: i32) -> String {
    strip_os_error(&io::Error::from_raw_os_error(errno).to_string())
}

/// The text of an I/O error without Rust's " (os error N)" suffix.
pub fn io_text(e: &io::Error) -> String {
    strip_os_error(&e.to_string())
}

fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s.to_string(),
    }
}

/// The message of a core error, without the generic "invalid argument: " prefix for argument
/// errors (qemu-img prints those bare) and with the OS error text in C-library wording.
pub fn core_text(e: &qcow2rs::Error) -> String {
    match e {
        qcow2rs::Error::InvalidArgument(m) => m.clone(),
        // qemu-img's two lines.
        qcow2rs::Error::Locked { file, what } => {
            format!("{file}: {what}\nIs another process using the image [{file}]?")
        }
        qcow2rs::Error::Io { source, .. } => {
            // "<file>: <context>: <strerror>"; keep the context, fix the errno wording.
            let s = e.to_string();
            let full = source.to_string();
            match s.strip_suffix(&full) {
                Some(head) => format!("{head}{}", io_text(source)),
                None => s,
            }
        }
        _ => e.to_string(),
    }
}

/// `FILE: message` for a core error about `file`, without naming the file twice (core messages
/// usually start with the file name already).
pub fn file_error(file: &str, e: &qcow2rs::Error) -> CliError {
    let text = core_text(e);
    let prefix = format!("{file}: ");
    if text.starts_with(&prefix) {
        CliError::new(text)
    } else {
        CliError::new(format!("{prefix}{text}"))
    }
}

/// `FILE: Could not create 'FILE': <strerror>` for an OS error, else as [`file_error`].
pub fn create_error(file: &str, e: &qcow2rs::Error) -> CliError {
    match e {
        qcow2rs::Error::Io { source, .. } => CliError::new(format!(
            "{file}: Could not create '{file}': {}",
            io_text(source)
        )),
        _ => file_error(file, e),
    }
}

/// Why a size string was rejected.
#[derive(Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all.
    Invalid,
    /// Above `i64::MAX`.
    TooLarge,
}

/// Parse a size the way qemu-img does (`qemu_strtosz`): decimal or `0x` hex bytes, or a decimal
/// number with an optional fraction and a suffix `B`, `k`/`K`, `M`, `G`, `T`, `P`, `E` (binary
/// multiples, case-insensitive). A trailing `B` after a multiple suffix (`1GB`, `4KB`) is accepted
/// too. The result must fit in `i64`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return Err(SizeError::Invalid);
    }
    let limit = i64::MAX as u64;
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| SizeError::TooLarge)?;
        return if v > limit {
            Err(SizeError::TooLarge)
        } else {
            Ok(v)
        };
    }
    let int_len = t.bytes().take_while(|b| b.is_ascii_digit()).count();
    let (int_part, rest) = t.split_at(int_len);
    let (frac_part, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(|b| b.is_ascii_digit()).count();
            (Some(&r[..n]), &r[n..])
        }
        None => (None, rest),
    };
    if int_part.is_empty() && frac_part.unwrap_or("").is_empty() {
        return Err(SizeError::Invalid);
    }
    let mul: u64 = match rest {
        "" | "b" | "B" => 1,
        _ => {
            let mut chars = rest.chars();
            let c = chars.next().unwrap_or(' ');
            let tail = chars.as_str();
            if !(tail.is_empty() || tail == "B" || tail == "b") {
                return Err(SizeError::Invalid);
            }
            match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => return Err(SizeError::Invalid),
            }
        }
    };
    if frac_part.is_some() && mul == 1 {
        // qemu: a fraction needs a multiple suffix.
        return Err(SizeError::Invalid);
    }
    let int_val: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| SizeError::TooLarge)?
    };
    let mut v = int_val.checked_mul(mul).ok_or(SizeError::TooLarge)?;
    if let Some(f) = frac_part.filter(|f| !f.is_empty()) {
        let frac: f64 = format!("0.{f}").parse().map_err(|_| SizeError::Invalid)?;
        v = v
            .checked_add((frac * mul as f64) as u64)
            .ok_or(SizeError::TooLarge)?;
    }
    if v > limit {
        return Err(SizeError::TooLarge);
    }
    Ok(v)
}

/// C's `printf("%0.3g", x)` for non-negative finite `x`.
pub fn fmt_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{x:.2e}"); // e.g. "1.96e2"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mant = trim_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{x:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// qemu's `size_to_str`: `64 MiB`, `196 KiB`, `0.977 KiB`, `512 B`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) exponent, minus one, divided by 10.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let i = if scaled < 1.0 {
        0
    } else {
        let exp = scaled.log2().floor() as i32 + 1; // frexp exponent
        ((exp - 1) / 10).clamp(0, 6) as usize
    };
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// Unix time `sec` as local time, `%Y-%m-%d %H:%M:%S` (as qemu's snapshot list prints dates):
/// the zone is the one the C library takes from `TZ` (or `/etc/localtime`), as GLib does.
pub fn local_time(sec: i64) -> String {
    extern "C" {
        // POSIX; the libc crate does not declare it.
        fn tzset();
    }
    let t = sec as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (the one pointer in it may be null).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `tzset` has no preconditions; `localtime_r` reads `t` and writes only `tm`, both
    // valid for the call, and the program does not change `TZ` while it runs.
    let ok = unsafe {
        tzset();
        !libc::localtime_r(&t, &mut tm).is_null()
    };
    if !ok {
        return String::new();
    }
    format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year as i64 + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// qemu's `path_combine`: a relative backing file name is relative to the directory of the image
/// that names it (string concatenation, no normalisation).
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') || name.is_empty() {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// Round `v` up to a multiple of `align` (a power of two).
pub fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align).saturating_mul(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size("0x100"), Ok(256));
        assert_eq!(parse_size("010"), Ok(10));
        assert_eq!(parse_size("+5"), Ok(5));
        assert_eq!(parse_size("1.5"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1.5B"), Err(SizeError::Invalid));
        assert_eq!(parse_size("0x10k"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1K5"), Err(SizeError::Invalid));
        assert_eq!(parse_size("1M "), Err(SizeError::Invalid));
        assert_eq!(parse_size("-1"), Err(SizeError::Invalid));
        assert_eq!(parse_size(""), Err(SizeError::Invalid));
        assert_eq!(parse_size("abc"), Err(SizeError::Invalid));
        assert_eq!(parse_size("8E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("99999999999999999999"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
    }

    #[test]
    fn size_strings() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(64 << 20), "64 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(3 << 19), "1.5 MiB");
        assert_eq!(size_to_str(15 << 20), "15 MiB");
        assert_eq!(size_to_str(1 << 60), "1 EiB");
    }

    #[test]
    fn paths() {
        assert_eq!(path_combine("sub/o.qcow2", "../a.qcow2"), "sub/../a.qcow2");
        assert_eq!(path_combine("o.qcow2", "a.qcow2"), "a.qcow2");
        assert_eq!(path_combine("/x/o.qcow2", "/y/a"), "/y/a");
        assert_eq!(strerror(5), "Input/output error");
    }
}
