//! `qcow2rs compare`: like `qemu-img compare`. Exit 0 identical, 1 different, 2 open error,
//! 4 read error.

use qcow2rs::{CacheMode, MapEntry, OpenOptions};

use crate::disk::{parse_format, Disk, ExtentCursor};
use crate::progress::Progress;
use crate::util::{core_text, CliError, CliResult};
use crate::CompareArgs;

const IO_BUF: u64 = 2 << 20;

/// The status of the extent at `offset`, and how far (at most `max`) it reaches.
fn status(cur: &mut ExtentCursor, offset: u64, max: u64) -> Result<(MapEntry, u64), CliError> {
    let e = cur.at(offset).map_err(|m| {
        CliError::with_code(
            format!("Sector allocation test failed for {offset}: {m}"),
            3,
        )
    })?;
    let n = e.length.min(max);
    Ok((e, n))
}

/// Offset (from the start of the buffers) of the first 512-byte sector that differs.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(512)
        .zip(b.chunks(512))
        .position(|(x, y)| x != y)
        .map(|i| i * 512)
}

/// Offset of the first 512-byte sector holding a non-zero byte.
fn first_nonzero(a: &[u8]) -> Option<usize> {
    a.chunks(512)
        .position(|s| s.iter().any(|&b| b != 0))
        .map(|i| i * 512)
}

struct Side<'a> {
    disk: &'a Disk,
    name: &'a str,
}

impl Side<'_> {
    fn read(&self, buf: &mut [u8], offset: u64) -> CliResult<()> {
        self.disk.read_at(buf, offset).map_err(|m| {
            CliError::with_code(
                format!("Error while reading offset {offset} of {}: {m}", self.name),
                4,
            )
        })
    }
}

pub fn run(a: &CompareArgs) -> CliResult {
    let say = |s: &str| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let open_code = |mut e: CliError| {
        e.code = 2;
        e
    };
    let fmt1 = a
        .fmt1
        .as_deref()
        .map(parse_format)
        .transpose()
        .map_err(open_code)?;
    let fmt2 = a
        .fmt2
        .as_deref()
        .map(parse_format)
        .transpose()
        .map_err(open_code)?;
    let cache = match &a.cache {
        Some(c) => CacheMode::parse(c).map_err(|e| CliError::with_code(core_text(&e), 2))?,
        None => CacheMode::Writeback,
    };
    let opts = OpenOptions {
        cache,
        force_share: a.force_share,
        ..OpenOptions::read_only()
    };
    let r1 = a.sec.image(&a.file1).map_err(open_code)?;
    let r2 = a.sec.image(&a.file2).map_err(open_code)?;
    let d1 =
        Disk::open(&r1.path, fmt1.or(r1.fmt), &r1.open_options(opts.clone())).map_err(open_code)?;
    let d2 =
        Disk::open(&r2.path, fmt2.or(r2.fmt), &r2.open_options(opts.clone())).map_err(open_code)?;
    let s1 = Side {
        disk: &d1,
        name: &r1.path,
    };
    let s2 = Side {
        disk: &d2,
        name: &r2.path,
    };
    let (size1, size2) = (d1.size(), d2.size());
    if size1 != size2 {
        if a.strict {
            say("Strict mode: Image size mismatch!");
            return Ok(1);
        }
        say("Warning: Image size mismatch!");
    }
    let common = size1.min(size2);
    let total = size1.max(size2);
    let progress = Progress::new(a.progress && !a.quiet, total);
    let mut buf1 = vec![0u8; IO_BUF as usize];
    let mut buf2 = vec![0u8; IO_BUF as usize];

    let mut c1 = ExtentCursor::new(&d1, size1);
    let mut c2 = ExtentCursor::new(&d2, size2);
    let mut offset = 0u64;
    while offset < common {
        let want = common - offset;
        let (st1, n1) = status(&mut c1, offset, want)?;
        let (st2, n2) = status(&mut c2, offset, want)?;
        let chunk = n1.min(n2);
        // qemu compares the block status flags: ZERO, ALLOCATED, DATA, OFFSET_VALID and EOF
        // (the extent reaches the end of the image).
        let flags = |e: &MapEntry, size: u64| {
            (
                e.zero,
                e.present,
                e.data,
                e.offset.is_some(),
                e.start + e.length >= size,
            )
        };
        if a.strict && flags(&st1, size1) != flags(&st2, size2) {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            return Ok(1);
        }
        if st1.zero && st2.zero {
            offset += chunk;
            progress.add(chunk);
            continue;
        }
        let chunk = chunk.min(IO_BUF);
        let n = chunk as usize;
        let diff = if st1.zero {
            s2.read(&mut buf2[..n], offset)?;
            first_nonzero(&buf2[..n])
        } else if st2.zero {
            s1.read(&mut buf1[..n], offset)?;
            first_nonzero(&buf1[..n])
        } else {
            s1.read(&mut buf1[..n], offset)?;
            s2.read(&mut buf2[..n], offset)?;
            first_diff(&buf1[..n], &buf2[..n])
        };
        if let Some(i) = diff {
            say(&format!(
                "Content mismatch at offset {}!",
                offset + i as u64
            ));
            return Ok(1);
        }
        offset += chunk;
        progress.add(chunk);
    }

    // The rest of the larger image must read as zeros.
    let (longer, cur) = if size1 > size2 {
        (&s1, &mut c1)
    } else {
        (&s2, &mut c2)
    };
    while offset < total {
        let (st, n) = status(cur, offset, total - offset)?;
        if st.zero {
            offset += n;
            progress.add(n);
            continue;
        }
        let chunk = n.min(IO_BUF);
        let len = chunk as usize;
        longer.read(&mut buf1[..len], offset)?;
        if let Some(i) = first_nonzero(&buf1[..len]) {
            say(&format!(
                "Content mismatch at offset {}!",
                offset + i as u64
            ));
            return Ok(1);
        }
        offset += chunk;
        progress.add(chunk);
    }
    progress.finish();
    say("Images are identical.");
    Ok(0)
}
