//! Compressed clusters are read and decompressed outside the image lock (`core/src/datapath.rs`,
//! `read`), a large read on all cores. These tests check the bytes against what was written
//! (and against qemu-img), and put a free-and-reuse of the very cluster a read is about to read
//! into the read's unlocked window, deterministically through the `testing` hook: the read must
//! return what the cluster held when its mapping was looked up.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use qcow2rs::{CompressionType, CreateOptions, Image, OpenOptions};
use qcow2rs_tests::*;

const CS: u64 = 64 * KIB;

/// Compressible, and different in every cluster and every 4 KiB of it.
fn cluster(tag: u64) -> Vec<u8> {
    (0..CS)
        .map(|i| ((i / 4096) as u8).wrapping_mul(7) ^ (tag as u8).wrapping_mul(31) ^ (i % 3) as u8)
        .collect()
}

fn create(dir: &Path, kind: CompressionType, clusters: u64) -> PathBuf {
    let p = dir.join(format!("c-{kind:?}.qcow2"));
    let mut o = CreateOptions::new(64 * MIB);
    o.compression_type = kind;
    Image::create(&p, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    for k in 0..clusters {
        img.write_compressed(k * CS, &cluster(k)).unwrap();
    }
    img.close().unwrap();
    p
}

fn read(img: &Image, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    img.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn large_unaligned_and_small_reads_return_what_was_written() {
    let dir = TempDir::new().unwrap();
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        let n = 48;
        let p = create(dir.path(), kind, n);
        let want: Vec<u8> = (0..n).flat_map(cluster).collect();
        let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
        let map = img.map(0, n * CS).unwrap();
        assert!(map.iter().all(|e| e.compressed), "{kind:?}: {map:?}");
        // One large read (decompressed on all cores), unaligned at both ends, with a
        // never-written tail.
        let got = read(&img, 1000, n * CS + 5000);
        assert!(
            got[..(n * CS - 1000) as usize] == want[1000..],
            "{kind:?} large read"
        );
        assert!(got[(n * CS - 1000) as usize..].iter().all(|&b| b == 0));
        // Small reads, sequential (the kept cluster) and backwards (a new one each time).
        let fwd: Vec<u64> = (0..n * CS).step_by(12288).collect();
        let mut back: Vec<u64> = (0..n * CS).step_by(20480).collect();
        back.reverse();
        for off in fwd.into_iter().chain(back) {
            let len = 4096.min(n * CS - off);
            let o = off as usize;
            assert!(
                read(&img, off, len) == want[o..o + len as usize],
                "{kind:?} at {off:#x}"
            );
        }
        assert_eq!(
            read(&img, 0, n * CS),
            qemu_read_all(&p, "qcow2")[..(n * CS) as usize]
        );
    }
}

#[test]
fn threads_sharing_one_image_read_the_right_bytes() {
    let dir = TempDir::new().unwrap();
    let n = 32;
    let p = create(dir.path(), CompressionType::Zlib, n);
    let want: Arc<Vec<u8>> = Arc::new((0..n).flat_map(cluster).collect());
    let img = Arc::new(Image::open(&p, &OpenOptions::read_only()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (img, want) = (img.clone(), want.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9u64 + t;
                for _ in 0..400 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = [512, 4096, 70000, 300000][(x % 4) as usize];
                    let off = (x >> 8) % (n * CS - len);
                    let o = off as usize;
                    assert!(
                        read(&img, off, len) == want[o..o + len as usize],
                        "{off:#x}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// In the window of a read of compressed guest cluster 0 (looked up, lock released, not yet
/// read), another thread discards that cluster, flushes (which frees its host cluster and
/// punches it out) and writes new data that takes the freed cluster. The read must return the
/// old data: the free waits for the read (the I/O gate, as for uncompressed clusters). A read
/// that ran outside the gate would read zeros or the new data, and fail to decompress or
/// return wrong bytes.
fn free_and_reuse_in_the_window(partial: bool) {
    let dir = TempDir::new().unwrap();
    let p = create(dir.path(), CompressionType::Zlib, 1);
    let len_before = file_len(&p);
    let img = Arc::new(Image::open(&p, &OpenOptions::new()).unwrap());
    let other = img.clone();
    let (tx, rx) = mpsc::channel();
    let (htx, hrx) = mpsc::channel();
    qcow2rs::testing::in_unlocked_read_window(move || {
        let h = std::thread::spawn(move || {
            other.discard(0, CS).unwrap();
            other.flush().unwrap();
            other.write_at(&vec![0xa5; CS as usize], 5 * CS).unwrap();
            other.flush().unwrap();
            let _ = tx.send(());
        });
        // With the gate the other thread waits for this read; give it time to get ahead if
        // it can.
        let _ = rx.recv_timeout(Duration::from_millis(500));
        htx.send(h).unwrap();
    });
    let (off, len) = if partial { (8192, 4096) } else { (0, CS) };
    let mut got = vec![0u8; len as usize];
    let r = img.read_at(&mut got, off);
    hrx.recv().unwrap().join().unwrap();
    r.unwrap();
    assert!(
        got == cluster(0)[off as usize..(off + len) as usize],
        "the read returned bytes that were not in the cluster when it was looked up"
    );
    // The new data did take the freed cluster, the only one free inside the old file (else
    // the test proves nothing).
    let host = img.map(5 * CS, CS).unwrap()[0].offset.unwrap();
    assert!(
        host < len_before,
        "the write did not reuse the freed cluster ({host:#x})"
    );
    // And what is read now is the new state (the kept cluster was not stored stale).
    assert!(read(&img, off, len).iter().all(|&b| b == 0));
    assert!(read(&img, 5 * CS, CS).iter().all(|&b| b == 0xa5));
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    assert_qemu_clean(&p);
}

#[test]
fn a_cluster_freed_and_reused_in_the_window_of_a_whole_cluster_read_reads_the_old_data() {
    free_and_reuse_in_the_window(false);
}

#[test]
fn a_cluster_freed_and_reused_in_the_window_of_a_partial_read_reads_the_old_data() {
    free_and_reuse_in_the_window(true);
}

/// A large read of allocated clusters of an encrypted image is cut into one part per core,
/// each read and decrypted on its own thread (`datapath.rs`, `read_pieces`; a plain image's
/// are read on the calling thread). Clusters written in a shuffled
/// order (so host order is not guest order, and pieces merge only sometimes), with holes,
/// zero clusters and partial clusters, on a plain, a legacy AES and a LUKS image: every large
/// read, aligned or not, returns what was written.
#[test]
fn large_reads_of_scattered_clusters_plain_and_encrypted() {
    let dir = TempDir::new().unwrap();
    let n = 40u64;
    for enc in ["plain", "aes", "luks"] {
        let p = dir.path().join(format!("{enc}.qcow2"));
        let mut o = CreateOptions::new(n * CS);
        o.encryption = match enc {
            "aes" => Some(qcow2rs::EncryptionOptions::aes("pw")),
            "luks" => {
                let mut e = qcow2rs::EncryptionOptions::luks("pw");
                e.iter_time_ms = 10;
                Some(e)
            }
            _ => None,
        };
        Image::create(&p, &o).unwrap();
        let opts = OpenOptions {
            password: o.encryption.as_ref().map(|_| "pw".into()),
            ..OpenOptions::new()
        };
        let img = Image::open(&p, &opts).unwrap();
        let mut want = vec![0u8; (n * CS) as usize];
        // A fixed shuffle of the clusters; every 7th left unwritten, every 5th zeroed after a
        // write, every 3rd written in two halves (the second half first).
        let order: Vec<u64> = (0..n).map(|k| (k * 17 + 5) % n).collect();
        for &k in &order {
            if k % 7 == 3 {
                continue;
            }
            let data = cluster(k + 100);
            let at = (k * CS) as usize;
            if k % 3 == 0 {
                let h = (CS / 2) as usize;
                img.write_at(&data[h..], k * CS + h as u64).unwrap();
                img.write_at(&data[..h], k * CS).unwrap();
            } else {
                img.write_at(&data, k * CS).unwrap();
            }
            want[at..at + CS as usize].copy_from_slice(&data);
            if k % 5 == 1 {
                img.write_zeroes(k * CS + 4096, 8192).unwrap();
                want[at + 4096..at + 12288].fill(0);
            }
        }
        img.close().unwrap();
        let img = Image::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..opts
            },
        )
        .unwrap();
        for (off, len) in [
            (0, n * CS),
            (512, n * CS - 1024),
            (1000, 20 * CS + 5000),
            (3 * CS + 4096, 9 * CS),
            (CS - 512, 4 * CS + 1536),
        ] {
            let got = read(&img, off, len);
            let w = &want[off as usize..(off + len) as usize];
            if got != w {
                let at = got.iter().zip(w).position(|(a, b)| a != b).unwrap();
                panic!("{enc}: read of {len} bytes at {off}: differs at byte {at}");
            }
        }
    }
}

/// A read of a part of a compressed cluster inflates it only up to the end of that part, and
/// keeps that first part in the cache; a later read within it is served from the cache, one
/// beyond it inflates the whole cluster (`datapath.rs`, `CompPiece::decode`). Every order of
/// such reads returns what was written.
#[test]
fn partial_reads_of_compressed_clusters_inflate_a_prefix() {
    let dir = TempDir::new().unwrap();
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        let n = 6;
        let p = create(dir.path(), kind, n);
        let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
        for k in 0..n {
            let want = cluster(k);
            let base = k * CS;
            for (at, len) in [
                (40000u64, 4096u64),
                (100, 4096),
                (39000, 5096),
                (50000, 10000),
                (60000, 5536),
                (0, 512),
                (65000, 536),
            ] {
                let got = read(&img, base + at, len);
                assert!(
                    got[..] == want[at as usize..(at + len) as usize],
                    "{kind:?} cluster {k}: {len} bytes at {at}"
                );
            }
        }
        // Prefixes of one cluster, then reads in another cluster's middle: the cache holds
        // one cluster (or its first part) at a time.
        let all: Vec<u8> = (0..n).flat_map(cluster).collect();
        let mut x = 7u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 33) % (n * CS - 4096);
            let len = 1 + (x >> 20) % 4096;
            let got = read(&img, off, len);
            assert!(
                got[..] == all[off as usize..(off + len) as usize],
                "{kind:?} at {off}"
            );
        }
    }
}
