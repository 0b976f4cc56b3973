//! Several threads doing random reads, writes, write_zeroes, discards, flushes and snapshot
//! creation on ONE image, checked against an exact model.
//!
//! The disk is split in two halves. In the first, 3 KiB stripes belong to the threads in turn
//! (stripe `s` to thread `s % T`): every cluster is shared by several threads, some stripes
//! cross cluster boundaries, and the writes are allocating, copy-on-write (after a snapshot,
//! over a backing file) or in place, partial and unaligned. In the second, blocks of 4 clusters
//! belong to the threads in turn: writes across cluster boundaries, zeroes and cluster-aligned
//! discards. Since no two threads touch the same bytes, each thread's model of its own bytes is
//! exact: every read is checked against it, and at the end the whole disk is read back, the
//! image closed, `qemu-img check` must be clean and `qemu-img compare` must find it equal to a
//! raw file of the model.
//!
//! Images: plain, with a backing file, encrypted (LUKS), with subclusters, and 4 KiB clusters
//! opened with cache=none (O_DIRECT), with 2 to 8 threads. `QCOW2RS_STRESS_SECONDS` is the budget per image (default 3).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qcow2rs::{CacheMode, CreateOptions, EncryptionOptions, Image, OpenOptions};
use qcow2rs_tests::*;

const SIZE: u64 = 8 * MIB;
const HALF: u64 = SIZE / 2;
const STRIPE: u64 = 3 * KIB;
const PW: &str = "stress password";

struct Config {
    name: &'static str,
    threads: u64,
    cluster: u64,
    backing: bool,
    luks: bool,
    subclusters: bool,
    /// cache=none (O_DIRECT: unaligned pieces are read-modify-writes of their blocks).
    direct: bool,
}

fn budget() -> Duration {
    let s = std::env::var("QCOW2RS_STRESS_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// A random range owned by thread `t` of `n`: (offset, length).
fn own_range(rng: &mut Rng, t: u64, n: u64, cs: u64, sector: bool) -> (u64, u64) {
    let align = if sector { 512 } else { 1 };
    if rng.chance(50) {
        let stripes = HALF / STRIPE;
        let s = rng.below(stripes / n) * n + t;
        let s = if s >= stripes { t } else { s };
        let a = rng.below(STRIPE / align);
        let b = rng.below(STRIPE / align);
        let (lo, hi) = (a.min(b), a.max(b) + 1);
        (s * STRIPE + lo * align, (hi - lo) * align)
    } else {
        let block = 4 * cs;
        let blocks = HALF / block;
        let b = rng.below(blocks / n) * n + t;
        let b = if b >= blocks { t } else { b };
        let units = block / align;
        let a = rng.below(units);
        let len = 1 + rng.below((units - a).min(2 * cs / align));
        (HALF + b * block + a * align, len * align)
    }
}

fn image(dir: &Path, c: &Config) -> (std::path::PathBuf, Vec<u8>, OpenOptions) {
    let path = dir.join(format!("{}.qcow2", c.name));
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = c.cluster as u32;
    o.extended_l2 = c.subclusters;
    let mut initial = vec![0u8; SIZE as usize];
    if c.backing {
        let base = dir.join(format!("{}.base.raw", c.name));
        Rng::new(77).fill(&mut initial);
        std::fs::write(&base, &initial).unwrap();
        o.backing_file = Some(base.to_str().unwrap().into());
        o.backing_format = Some("raw".into());
    }
    let mut open = OpenOptions::new();
    if c.direct {
        open.cache = CacheMode::None;
    }
    if c.luks {
        let mut e = EncryptionOptions::luks(PW);
        e.iter_time_ms = 10;
        o.encryption = Some(e);
        open.password = Some(PW.into());
    }
    Image::create(&path, &o).unwrap();
    (path, initial, open)
}

fn run(c: &Config) {
    let dir = TempDir::new().unwrap();
    let (path, initial, open) = image(dir.path(), c);
    let img = Image::open(&path, &open).unwrap();
    let model = Mutex::new(initial);
    let until = Instant::now() + budget();
    let snaps = Mutex::new(0u32);
    let counts = Mutex::new([0u64; 6]);
    let cs = c.cluster;
    std::thread::scope(|scope| {
        for t in 0..c.threads {
            let (img, model, snaps, counts) = (&img, &model, &snaps, &counts);
            scope.spawn(move || {
                let mut rng = Rng::new(0x57e55 + t * 1000 + c.threads);
                // This thread's bytes, kept here as well: the shared model is only for the end.
                let mut mine: Vec<u8> = model.lock().unwrap().clone();
                let mut n = [0u64; 6];
                let mut i = 0u64;
                while Instant::now() < until {
                    i += 1;
                    let (off, len) = own_range(&mut rng, t, c.threads, cs, c.luks);
                    let r = (off as usize, (off + len) as usize);
                    match rng.below(100) {
                        0..=44 => {
                            let mut buf = vec![0u8; len as usize];
                            rng.fill(&mut buf);
                            img.write_at(&buf, off).unwrap();
                            mine[r.0..r.1].copy_from_slice(&buf);
                            n[0] += 1;
                        }
                        45..=74 => {
                            let mut buf = vec![0u8; len as usize];
                            img.read_at(&mut buf, off).unwrap();
                            assert!(
                                buf == mine[r.0..r.1],
                                "{}: thread {t} op {i}: read {len} bytes at {off:#x}: not what was written",
                                c.name
                            );
                            n[1] += 1;
                        }
                        75..=82 => {
                            img.write_zeroes(off, len).unwrap();
                            mine[r.0..r.1].fill(0);
                            n[2] += 1;
                        }
                        83..=90 if off >= HALF => {
                            // Cluster-aligned inside this thread's block.
                            let first = off.div_ceil(cs) * cs;
                            let end = (off + len) / cs * cs;
                            if first < end {
                                img.discard(first, end - first).unwrap();
                                mine[first as usize..end as usize].fill(0);
                                n[3] += 1;
                            }
                        }
                        91..=98 => {
                            img.flush().unwrap();
                            n[4] += 1;
                        }
                        99 => {
                            let k = {
                                let mut s = snaps.lock().unwrap();
                                *s += 1;
                                *s
                            };
                            if k <= 4 {
                                img.create_snapshot(&format!("s{k}")).unwrap();
                                n[5] += 1;
                            }
                        }
                        _ => {}
                    }
                }
                // Hand this thread's bytes to the shared model.
                let mut m = model.lock().unwrap();
                let stripes = HALF / STRIPE;
                for s in (t..stripes).step_by(c.threads as usize) {
                    let (a, b) = ((s * STRIPE) as usize, ((s + 1) * STRIPE) as usize);
                    m[a..b].copy_from_slice(&mine[a..b]);
                }
                let block = 4 * cs;
                for b in (t..HALF / block).step_by(c.threads as usize) {
                    let a = (HALF + b * block) as usize;
                    m[a..a + block as usize].copy_from_slice(&mine[a..a + block as usize]);
                }
                let mut all = counts.lock().unwrap();
                for k in 0..6 {
                    all[k] += n[k];
                }
            });
        }
    });
    let model = model.into_inner().unwrap();
    let mut all = vec![0u8; SIZE as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "{}: final contents differ from the model",
        c.name
    );
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{}: {:?}",
        c.name,
        r.messages
    );
    img.close().unwrap();
    let counts = counts.into_inner().unwrap();
    eprintln!(
        "stress {}: {} threads, {} writes, {} reads, {} zeroes, {} discards, {} flushes, {} snapshots",
        c.name, c.threads, counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
    );
    assert!(counts[0] > 0 && counts[1] > 0, "{}: no work done", c.name);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    if c.luks {
        let obj = format!("secret,id=sec0,data={PW}");
        let opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            path.display()
        );
        let r = qemu_img(&["check", "--object", &obj, "--image-opts", &opts]);
        assert!(
            r.code == 0 && r.stdout.contains("No errors were found"),
            "{}: qemu-img check: {r}",
            c.name
        );
        let r = qemu_img(&[
            "compare",
            "--object",
            &obj,
            "--image-opts",
            &format!("driver=raw,file.filename={}", raw.display()),
            &opts,
        ]);
        assert!(
            r.code == 0 && r.stdout.contains("Images are identical."),
            "{}: qemu-img compare: {r}",
            c.name
        );
    } else {
        assert_qemu_clean(&path);
        assert_qemu_compare(&raw, &path);
    }
    // Reopened, it reads the same.
    let img = Image::open(&path, &open).unwrap();
    img.read_at(&mut all, 0).unwrap();
    assert!(all == model, "{}: contents differ after reopen", c.name);
}

#[test]
fn stress_plain_4_threads() {
    run(&Config {
        name: "plain",
        threads: 4,
        cluster: 64 * KIB,
        backing: false,
        luks: false,
        subclusters: false,
        direct: false,
    });
}

#[test]
fn stress_small_clusters_8_threads_o_direct() {
    run(&Config {
        name: "small",
        threads: 8,
        cluster: 4 * KIB,
        backing: false,
        luks: false,
        subclusters: false,
        direct: true,
    });
}

#[test]
fn stress_backing_3_threads() {
    run(&Config {
        name: "backing",
        threads: 3,
        cluster: 64 * KIB,
        backing: true,
        luks: false,
        subclusters: false,
        direct: false,
    });
}

#[test]
fn stress_luks_2_threads() {
    run(&Config {
        name: "luks",
        threads: 2,
        cluster: 64 * KIB,
        backing: false,
        luks: true,
        subclusters: false,
        direct: false,
    });
}

#[test]
fn stress_subclusters_4_threads() {
    run(&Config {
        name: "subclusters",
        threads: 4,
        cluster: 64 * KIB,
        backing: true,
        luks: false,
        subclusters: true,
        direct: false,
    });
}
