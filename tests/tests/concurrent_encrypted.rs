//! Allocating writes to encrypted images encrypt outside the image lock, between two locked
//! phases (`core/src/datapath.rs`, `write_allocating`): clusters are reserved first, then the
//! data encrypted for their host offsets, then written and linked. These tests put other
//! operations into that window, deterministically (the `testing` hook runs them on the writer's
//! own thread, or starts them on another) and at random from several threads, and require the
//! result a serial order would give, no leaked reservation and a clean `qemu-img check`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2rs::{CreateOptions, EncryptionOptions, Image, OpenOptions};
use qcow2rs_tests::*;

const PW: &str = "window password";
const CS: u64 = 64 * KIB;

fn luks_image(dir: &Path, size: u64) -> PathBuf {
    let img = dir.join("luks.qcow2");
    let mut o = CreateOptions::new(size);
    let mut e = EncryptionOptions::luks(PW);
    e.iter_time_ms = 10;
    o.encryption = Some(e);
    Image::create(&img, &o).unwrap();
    img
}

fn aes_image(dir: &Path, size: u64) -> PathBuf {
    let img = dir.join("aes.qcow2");
    let mut o = CreateOptions::new(size);
    o.encryption = Some(EncryptionOptions::aes(PW));
    Image::create(&img, &o).unwrap();
    img
}

fn open(path: &Path) -> Arc<Image> {
    Arc::new(
        Image::open(
            path,
            &OpenOptions {
                password: Some(PW.into()),
                ..OpenOptions::new()
            },
        )
        .unwrap(),
    )
}

fn fill(len: u64, tag: u8) -> Vec<u8> {
    (0..len)
        .map(|i| tag ^ (i as u8).wrapping_mul(7) ^ (i >> 9) as u8)
        .collect()
}

fn read(img: &Image, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    img.read_at(&mut b, off).unwrap();
    b
}

fn assert_clean(img: &Image, what: &str) {
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{what}: {:?}",
        r.messages
    );
}

fn assert_qemu_clean(path: &Path) {
    let obj = format!("secret,id=sec0,data={PW}");
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path.display()
    );
    let r = qemu_img(&["check", "--object", &obj, "--image-opts", &opts]);
    assert!(
        r.code == 0 && r.stdout.contains("No errors were found"),
        "qemu-img check: {r}"
    );
}

fn images(dir: &Path, size: u64) -> Vec<PathBuf> {
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    vec![luks_image(&a, size), aes_image(&b, size)]
}

#[test]
fn a_cluster_written_by_another_writer_inside_the_window_is_overwritten_in_place() {
    let dir = TempDir::new().unwrap();
    for path in images(dir.path(), 4 * MIB) {
        let img = open(&path);
        let (a, b, c) = (fill(2 * CS, 1), fill(CS, 2), fill(CS, 3));
        // While the write of clusters 3 and 4 encrypts, another write allocates cluster 4 and
        // one allocates cluster 9 (taking the next free cluster, as a reservation would).
        let inner = img.clone();
        let (b2, c2) = (b.clone(), c.clone());
        qcow2rs::testing::between_reserve_and_write(move || {
            inner.write_at(&b2, 4 * CS).unwrap();
            inner.write_at(&c2, 9 * CS).unwrap();
        });
        img.write_at(&a, 3 * CS).unwrap();
        // The outer write is the later one: it wins on cluster 4.
        assert_eq!(read(&img, 3 * CS, 2 * CS), a, "{}", path.display());
        assert_eq!(read(&img, 9 * CS, CS), c);
        // The cluster reserved for cluster 4 and not used was given back.
        assert_clean(&img, "after the window");
        img.flush().unwrap();
        drop(img);
        assert_qemu_clean(&path);
        let img = open(&path);
        assert_eq!(read(&img, 3 * CS, 2 * CS), a);
        assert_eq!(read(&img, 9 * CS, CS), c);
        // No plaintext reached the file.
        let file = std::fs::read(&path).unwrap();
        assert!(
            !file.windows(64).any(|w| w == &a[..64]),
            "plaintext on disk"
        );
    }
}

#[test]
fn check_waits_for_reservations_and_a_shrink_inside_the_window_fails_the_write_cleanly() {
    let dir = TempDir::new().unwrap();
    for path in images(dir.path(), 4 * MIB) {
        let img = open(&path);
        // check() started in the window, on another thread: it must wait for the write to
        // link or give back its reserved clusters, never count them as leaks (nor repair
        // them away).
        let inner = img.clone();
        let checker: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<_>>>> = Default::default();
        let slot = checker.clone();
        qcow2rs::testing::between_reserve_and_write(move || {
            let i = inner.clone();
            let h = std::thread::spawn(move || {
                let plain = i.check(None).unwrap();
                let repaired = i.check(Some(qcow2rs::RepairMode::All)).unwrap();
                (plain, repaired)
            });
            // Give the checker time to reach the lock while this write is in the window.
            std::thread::sleep(std::time::Duration::from_millis(50));
            *slot.lock().unwrap() = Some(h);
        });
        let data = fill(3 * CS, 4);
        img.write_at(&data, 10 * CS).unwrap();
        let (plain, repaired) = checker.lock().unwrap().take().unwrap().join().unwrap();
        assert_eq!(
            (plain.corruptions, plain.leaks),
            (0, 0),
            "{:?}",
            plain.messages
        );
        assert_eq!(
            (repaired.leaks_fixed, repaired.corruptions_fixed),
            (0, 0),
            "{:?}",
            repaired.messages
        );
        assert_eq!(read(&img, 10 * CS, 3 * CS), data);

        // A shrink in the window below the write: the write fails as it would have after
        // the shrink, and gives its clusters back.
        let inner = img.clone();
        qcow2rs::testing::between_reserve_and_write(move || inner.resize(2 * MIB).unwrap());
        let err = img.write_at(&fill(2 * CS, 5), 40 * CS).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert_eq!(img.virtual_size(), 2 * MIB);
        assert_clean(&img, "after the failed write");
        assert_eq!(read(&img, 10 * CS, 3 * CS), data);
        img.flush().unwrap();
        drop(img);
        assert_qemu_clean(&path);
    }
}

#[test]
fn several_writers_on_one_encrypted_image_match_a_serial_order() {
    let dir = TempDir::new().unwrap();
    for path in images(dir.path(), 4 * MIB) {
        let img = open(&path);
        let clusters = 64u64;
        let threads = 4u64;
        let rounds = 150u64;
        // Every write fills whole clusters with a pattern naming (thread, round, cluster):
        // a read must find, in every cluster, exactly one pattern some write put there, or
        // zeros after a discard (or never written), never a mix or garbage.
        let pattern = |t: u64, r: u64, c: u64| -> Vec<u8> {
            let mut v = fill(CS, (t * 31 + r * 7 + c) as u8);
            v[..24].copy_from_slice(&[t.to_le_bytes(), r.to_le_bytes(), c.to_le_bytes()].concat());
            v
        };
        std::thread::scope(|scope| {
            for t in 0..threads {
                let img = &img;
                scope.spawn(move || {
                    let mut rng = Rng::new(0xc0ffee + t);
                    for r in 0..rounds {
                        let first = rng.below(clusters - 3);
                        let n = 1 + rng.below(3);
                        match rng.below(10) {
                            0 => img.discard(first * CS, n * CS).unwrap(),
                            1 => img.flush().unwrap(),
                            2 if t == 0 => assert_clean(img, "check during the writes"),
                            _ => {
                                let buf: Vec<u8> =
                                    (first..first + n).flat_map(|c| pattern(t, r, c)).collect();
                                img.write_at(&buf, first * CS).unwrap();
                            }
                        }
                    }
                });
            }
        });
        for c in 0..clusters {
            let got = read(&img, c * CS, CS);
            if got.iter().all(|&b| b == 0) {
                continue;
            }
            let id: Vec<u64> = got[..24]
                .chunks(8)
                .map(|x| u64::from_le_bytes(x.try_into().unwrap()))
                .collect();
            assert_eq!(id[2], c, "cluster {c} holds another cluster's data");
            assert!(
                id[0] < threads && id[1] < rounds && got == pattern(id[0], id[1], c),
                "cluster {c} of {}: not a whole written pattern",
                path.display()
            );
        }
        assert_clean(&img, "after the writers");
        img.flush().unwrap();
        drop(img);
        assert_qemu_clean(&path);
    }
}
