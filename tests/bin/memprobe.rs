//! `memprobe`: the child process of the bounded-memory test (`tests/tests/bounded_memory.rs`),
//! run under `/usr/bin/time -v` so that its peak RSS is the library's, not the test harness's.
//!
//! ```text
//! memprobe PATH SIZE CLUSTER REFCOUNT_BITS COUNT L2_CACHE REFCOUNT_CACHE SEED
//! ```
//!
//! Creates PATH (SIZE bytes virtual, the given cluster size and refcount width), opens it with
//! the given cache sizes in bytes (0: the default), writes 4 KiB at COUNT pseudo-random 4 KiB
//! aligned offsets spread over the whole disk (flushing every 1000 writes), reads every one back
//! and compares, reads 4 KiB at COUNT more random offsets (most unallocated), closes, and prints
//! one line with the figures. Exits non-zero on any error or mismatch.

use std::process::exit;
use std::time::Instant;

use qcow2rs::{CreateOptions, Image, OpenOptions};

fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn block(seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = vec![0u8; 4096];
    for c in v.chunks_mut(8) {
        c.copy_from_slice(&next(&mut s).to_le_bytes());
    }
    v
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 8 {
        eprintln!(
            "usage: memprobe PATH SIZE CLUSTER REFCOUNT_BITS COUNT L2_CACHE REFCOUNT_CACHE SEED"
        );
        exit(2);
    }
    let n = |i: usize| -> u64 {
        a[i].parse().unwrap_or_else(|_| {
            eprintln!("memprobe: argument {} is not a number: {}", i + 1, a[i]);
            exit(2)
        })
    };
    let (path, size, cluster, rb, count, l2, rc, seed) =
        (&a[0], n(1), n(2), n(3), n(4), n(5), n(6), n(7));
    let fail = |what: &str, e: qcow2rs::Error| -> ! {
        eprintln!("memprobe: {what}: {e}");
        exit(1)
    };
    let mut co = CreateOptions::new(size);
    co.cluster_size = cluster as u32;
    co.refcount_bits = rb as u32;
    Image::create(path, &co).unwrap_or_else(|e| fail("create", e));
    let mut opts = OpenOptions::new();
    opts.l2_cache_size = (l2 > 0).then_some(l2);
    opts.refcount_cache_size = (rc > 0).then_some(rc);
    let t = Instant::now();
    let img = Image::open(path, &opts).unwrap_or_else(|e| fail("open", e));
    let blocks = size / 4096;
    let mut s = seed | 1;
    let mut offs = Vec::with_capacity(count as usize);
    for i in 0..count {
        // Distinct blocks: stratified over the disk, random within each stratum.
        let stratum = blocks / count.max(1);
        let b = i * stratum + next(&mut s) % stratum.max(1);
        offs.push(b * 4096);
        img.write_at(&block(b), b * 4096)
            .unwrap_or_else(|e| fail("write", e));
        if i % 1000 == 999 {
            img.flush().unwrap_or_else(|e| fail("flush", e));
        }
    }
    img.flush().unwrap_or_else(|e| fail("flush", e));
    let wrote = t.elapsed();
    let mut buf = vec![0u8; 4096];
    // Read back in another order than written, so the caches keep turning over.
    for i in 0..count {
        let o = offs[((i * 7919) % count) as usize];
        img.read_at(&mut buf, o).unwrap_or_else(|e| fail("read", e));
        if buf != block(o / 4096) {
            eprintln!("memprobe: data at guest offset {o} differs");
            exit(1);
        }
    }
    let mut zero_reads = 0;
    for _ in 0..count {
        let o = next(&mut s) % blocks * 4096;
        img.read_at(&mut buf, o).unwrap_or_else(|e| fail("read", e));
        zero_reads += buf.iter().all(|&b| b == 0) as u64;
    }
    img.close().unwrap_or_else(|e| fail("close", e));
    println!(
        "memprobe: {count} writes and {} reads over {size} bytes in {:.2} s (writes {:.2} s), {zero_reads} random reads saw zeros",
        2 * count,
        t.elapsed().as_secs_f64(),
        wrote.as_secs_f64()
    );
}
