//! The kernel's ceiling for parallel writers of one file: J threads write to a RAW file (no
//! qcow2, no locks of ours), so the figures say what the file system allows whatever an image
//! format does on top of it (scripts/bench_writers.sh runs it with `raw`).
//!
//!   raw_writers FILE MODE CACHE SIZE STEP COUNT THREADS
//!
//! Request `i` (taken from a shared counter) writes SIZE bytes at `i * STEP`, so with STEP = 64
//! KiB + 4 KiB the requests land as a qcow2 image's allocating writes do: each in a cluster of its
//! own, at a host offset that grows with `i`. MODE is the state of the file before the run:
//! `extend` (empty: every write extends the file), `sparse` (truncated to its full length: every
//! write fills a hole inside the file), `prealloc` (fallocated: every write goes to reserved,
//! unwritten blocks) or `overwrite` (written once before: every write goes to written blocks).
//! CACHE is `buffered` or `direct` (O_DIRECT). The file is fdatasynced once at the end, inside
//! the timing. Prints `MB/s IOPS`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn die(msg: &str) -> ! {
    eprintln!("raw_writers: {msg}");
    std::process::exit(2)
}

fn num(s: &str, what: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|_| die(&format!("{what}: not a number: {s}")))
}

/// A zero-filled buffer of `len` bytes aligned to 4 KiB (for O_DIRECT).
fn aligned(raw: &mut Vec<u8>, len: usize) -> &mut [u8] {
    *raw = vec![0x5a; len + 4096];
    let skip = (4096 - raw.as_ptr() as usize % 4096) % 4096;
    &mut raw[skip..skip + len]
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [file, mode, cache, size, step, count, threads] = &a[..] else {
        die("usage: raw_writers FILE extend|sparse|prealloc|overwrite buffered|direct SIZE STEP COUNT THREADS")
    };
    let (size, step, count, threads) = (
        num(size, "SIZE"),
        num(step, "STEP"),
        num(count, "COUNT"),
        num(threads, "THREADS"),
    );
    if size == 0 || size > step || threads == 0 {
        die("SIZE must be 1..=STEP and THREADS at least 1");
    }
    let direct = match cache.as_str() {
        "buffered" => false,
        "direct" => true,
        _ => die(&format!("CACHE is buffered or direct, not {cache}")),
    };
    let total = count * step;
    let setup = File::create(file).unwrap_or_else(|e| die(&format!("{file}: {e}")));
    match mode.as_str() {
        "extend" => {}
        "sparse" => setup.set_len(total).unwrap(),
        "prealloc" => rustix::fs::fallocate(&setup, rustix::fs::FallocateFlags::empty(), 0, total)
            .unwrap_or_else(|e| die(&format!("{file}: fallocate: {e}"))),
        "overwrite" => {
            let chunk = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < total {
                let n = (total - off).min(chunk.len() as u64) as usize;
                setup.write_all_at(&chunk[..n], off).unwrap();
                off += n as u64;
            }
        }
        _ => die(&format!("unknown MODE {mode}")),
    }
    setup.sync_all().unwrap();
    drop(setup);
    let mut oo = OpenOptions::new();
    oo.write(true);
    if direct {
        oo.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    }
    let f = oo
        .open(file)
        .unwrap_or_else(|e| die(&format!("{file}: {e}")));
    let next = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut raw = Vec::new();
                let buf = aligned(&mut raw, size as usize);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if let Err(e) = f.write_all_at(buf, i * step) {
                        die(&format!("{file}: write at {}: {e}", i * step));
                    }
                }
            });
        }
    });
    f.sync_data().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.1} {:.0}",
        (count * size) as f64 / secs / 1e6,
        count as f64 / secs
    );
}
