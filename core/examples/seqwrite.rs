//! Quick throughput probe: sequential or strided writes, reads and flushes through the engine.
//! Usage: seqwrite FILE COUNT BUFSIZE STEP FLUSH_INTERVAL CACHE [read]
use qcow2rs::{CacheMode, CreateOptions, Image, OpenOptions};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = &a[1];
    let count: u64 = a[2].parse().unwrap();
    let bs: usize = a[3].parse().unwrap();
    let step: u64 = a[4].parse().unwrap();
    let fi: u64 = a[5].parse().unwrap();
    let cache = CacheMode::parse(&a[6]).unwrap();
    let read = a.get(7).is_some();
    if !read {
        Image::create(path, &CreateOptions::new(4 << 30)).unwrap();
    }
    let img = Image::open(
        path,
        &OpenOptions {
            cache,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let size = img.virtual_size();
    let mut buf = vec![0xa5u8; bs];
    let t = std::time::Instant::now();
    let mut off = 0u64;
    for i in 0..count {
        if read {
            img.read_at(&mut buf, off).unwrap();
        } else {
            img.write_at(&buf, off).unwrap();
        }
        off = (off + step) % size;
        if fi > 0 && (i + 1) % fi == 0 {
            img.flush().unwrap();
        }
    }
    img.flush().unwrap();
    let el = t.elapsed().as_secs_f64();
    println!("{count} ops in {el:.3}s, syncs {}", img.sync_count());
    img.close().unwrap();
}
