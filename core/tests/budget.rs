//! fdatasync budgets (DESIGN.md rule 4, issue 3): counted on the storage layer.

use qcow2rs::{CacheMode, CreateOptions, Image, MemStorage, OpenOptions, Storage};
use std::sync::Arc;

fn image(size: u64, cache: CacheMode, cluster_size: u32) -> (Arc<MemStorage>, Image) {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster_size;
    Image::create_on(st.clone(), "mem.qcow2", &o).unwrap();
    let img = Image::open_storage(
        st.clone(),
        "mem.qcow2",
        &OpenOptions {
            cache,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    (st, img)
}

fn syncs<F: FnOnce()>(st: &MemStorage, f: F) -> u64 {
    let before = st.sync_count();
    f();
    st.sync_count() - before
}

#[test]
fn writeback_flush_budget() {
    let (st, img) = image(1 << 30, CacheMode::Writeback, 65536);
    let cs = 65536u64;
    // Nothing changed: no sync.
    assert_eq!(syncs(&st, || img.flush().unwrap()), 0);
    // Allocating writes (first touches a new L2 table and reserves a run): at most 2.
    let n = syncs(&st, || {
        for i in 0..4 {
            img.write_at(&[1u8; 65536], i * cs).unwrap();
        }
        img.flush().unwrap();
    });
    assert!(n <= 2, "allocating epoch cost {n} syncs");
    assert_eq!(syncs(&st, || img.flush().unwrap()), 0);
    // Pure overwrites: 1.
    let n = syncs(&st, || {
        img.write_at(&[2u8; 4096], 4096).unwrap();
        img.write_at(&[2u8; 4096], cs + 100).unwrap();
        img.flush().unwrap();
    });
    assert_eq!(n, 1, "overwrite epoch");
    // Allocation needing a new L2 table (512 MiB away): at most 2.
    let n = syncs(&st, || {
        img.write_at(&[3u8; 4096], 512 << 20).unwrap();
        img.flush().unwrap();
    });
    assert!(n <= 2, "new L2 table epoch cost {n}");
    // Partial-cluster COW allocations and many random allocating writes: at most 2 per flush.
    let mut x = 12345u64;
    for _ in 0..50 {
        let n = syncs(&st, || {
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % ((1 << 30) / 4096)) * 4096;
                img.write_at(&[4u8; 4096], off).unwrap();
            }
            img.flush().unwrap();
        });
        assert!(n <= 2, "random allocating epoch cost {n}");
    }
    // Discard: at most 2, and the flush after it (nothing new) costs nothing.
    let n = syncs(&st, || {
        img.discard(0, 4 * cs).unwrap();
        img.flush().unwrap();
    });
    assert!(n <= 2, "discard epoch cost {n}");
    assert_eq!(syncs(&st, || img.flush().unwrap()), 0);
    let rep = img.check(None).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

#[test]
fn writethrough_budget() {
    let (st, img) = image(1 << 30, CacheMode::Writethrough, 65536);
    let writes = 2000u64;
    // Allocating 4 KiB writes, each into a new cluster: close to one sync per write.
    let n = syncs(&st, || {
        for i in 0..writes {
            img.write_at(&[5u8; 4096], i * 65536 * 3 % (1 << 30))
                .unwrap();
        }
    });
    let per = n as f64 / writes as f64;
    eprintln!("writethrough allocating: {n} fdatasyncs for {writes} writes ({per:.3}/write)");
    assert!(n <= 2 * writes, "more than 2 per allocating write");
    assert!(
        per < 1.1,
        "batched allocation should cost close to 1 per write, got {per:.3}"
    );
    // Overwrites: exactly one each.
    let n = syncs(&st, || {
        for i in 0..100u64 {
            img.write_at(&[6u8; 512], i * 65536 * 3 % (1 << 30))
                .unwrap();
        }
    });
    assert_eq!(n, 100, "overwrites");
    let rep = img.check(None).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

#[test]
fn unsafe_mode_syncs_only_at_close() {
    let (st, img) = image(64 << 20, CacheMode::Unsafe, 65536);
    let n = syncs(&st, || {
        for i in 0..100u64 {
            img.write_at(&[7u8; 65536], i * 65536).unwrap();
            img.flush().unwrap();
        }
    });
    assert_eq!(n, 0);
    let n = syncs(&st, || img.close().unwrap());
    assert_eq!(n, 1, "unsafe mode syncs once, at close");
    let img = Image::open_storage(st.clone(), "mem.qcow2", &OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 99 * 65536).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    assert!(img.check(None).unwrap().is_clean());
}

#[test]
fn create_syncs_once() {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(1 << 30);
    o.cluster_size = 512;
    Image::create_on(st.clone(), "mem.qcow2", &o).unwrap();
    assert_eq!(st.sync_count(), 1);
}
