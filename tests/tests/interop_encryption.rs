//! Encrypted images, both ways with qemu-img: LUKS in every AES variant qemu-img makes, and
//! legacy AES. Images qemu-img makes are written by us and judged by qemu-img (compare with the
//! secret, check clean) and images we make are written by qemu-io and read back by us. Wrong
//! passwords are `BadKey`; no plaintext ever reaches the host file.

use std::path::{Path, PathBuf};

use qcow2rs::{
    CipherAlg, CipherMode, CreateOptions, EncryptionOptions, Error, HashAlg, Image, IvGenAlg,
    OpenOptions,
};
use qcow2rs_tests::*;

const PW: &str = "correct horse battery staple";

fn secret_arg(pw: &str) -> String {
    format!("secret,id=sec0,data={pw}")
}

fn image_opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path.display()
    )
}

/// qemu-img with `--object secret` for `PW` and the image given as `--image-opts`.
fn qemu_img_secret(sub: &str, extra: &[&str], path: &Path, tail: &[&str]) -> Run {
    let obj = secret_arg(PW);
    let io = image_opts(path);
    let mut args = vec![sub, "--object", &obj];
    args.extend_from_slice(extra);
    args.push("--image-opts");
    args.push(&io);
    args.extend_from_slice(tail);
    qemu_img(&args)
}

/// `qemu-img compare` of the raw reference against the encrypted image.
fn assert_qemu_compare_encrypted(reference: &Path, img: &Path) {
    let obj = secret_arg(PW);
    let raw = format!("driver=raw,file.filename={}", reference.display());
    let io = image_opts(img);
    let r = qemu_img(&["compare", "--object", &obj, "--image-opts", &raw, &io]);
    assert!(
        r.code == 0 && r.stdout.contains("Images are identical"),
        "qemu-img compare: {r}"
    );
}

fn assert_qemu_check_encrypted(img: &Path) {
    let r = qemu_img_secret("check", &[], img, &[]);
    assert!(
        r.code == 0 && r.stdout.contains("No errors were found"),
        "qemu-img check: {r}"
    );
}

fn qemu_io_secret(img: &Path, cmds: &[String]) -> Run {
    let obj = secret_arg(PW);
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.arg("--object").arg(&obj).arg("--image-opts");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(image_opts(img));
    let r = run(&mut cmd);
    assert!(
        r.code == 0 && !r.all().contains("failed"),
        "qemu-io failed: {r}"
    );
    r
}

fn open_pw(path: &Path, pw: &str) -> qcow2rs::Result<Image> {
    Image::open(
        path,
        &OpenOptions {
            password: Some(pw.into()),
            ..OpenOptions::new()
        },
    )
}

/// The LUKS variants qemu-img can make with AES: (alg, mode, ivgen, ivgen hash, hash).
fn variants() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
)> {
    let mut v = Vec::new();
    for alg in ["aes-128", "aes-192", "aes-256"] {
        for mode in ["xts", "cbc"] {
            if alg == "aes-192" && mode == "cbc" {
                // qemu-img aborts on these (key material is not whole sectors).
                continue;
            }
            for iv in ["plain", "plain64", "essiv"] {
                for hash in ["sha1", "sha256", "sha512"] {
                    // ESSIV needs a hash whose digest is an AES key: sha256 only.
                    let ivhash = if iv == "essiv" { "sha256" } else { hash };
                    v.push((alg, mode, iv, ivhash, hash));
                }
            }
        }
    }
    v
}

fn luks_opts(v: (&str, &str, &str, &str, &str)) -> String {
    format!(
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg={},encrypt.cipher-mode={},encrypt.ivgen-alg={},encrypt.ivgen-hash-alg={},encrypt.hash-alg={}",
        v.0, v.1, v.2, v.3, v.4
    )
}

fn our_luks(v: (&str, &str, &str, &str, &str)) -> EncryptionOptions {
    let mut e = EncryptionOptions::luks(PW);
    e.cipher_alg = CipherAlg::parse(v.0).unwrap();
    e.cipher_mode = CipherMode::parse(v.1).unwrap();
    e.ivgen_alg = IvGenAlg::parse(v.2).unwrap();
    e.ivgen_hash_alg = HashAlg::parse(v.3).unwrap();
    e.hash_alg = HashAlg::parse(v.4).unwrap();
    e.iter_time_ms = 10;
    e
}

fn qemu_create_encrypted(path: &Path, size: u64, opts: &str) {
    let obj = secret_arg(PW);
    let size = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &obj,
        "-o",
        opts,
        path.to_str().unwrap(),
        &size,
    ])
    .ok();
}

/// A random workload through our library on an encrypted image, mirrored in a model.
fn our_workload(path: &Path, pw: &str, seed: u64, size: u64, cluster: u64) -> Model {
    let img = open_pw(path, pw).unwrap();
    let mut model = Model::zeros(size, cluster);
    let mut rng = Rng::new(seed);
    let w = Workload {
        ops: 120,
        max_len: 200 * KIB,
        ..Workload::default()
    };
    run_workload(&img, &mut model, &mut rng, &w);
    let got = read_all(&img, &mut rng);
    assert_same("our read-back", &got, &model.data);
    img.close().unwrap();
    model
}

#[test]
fn luks_variants_made_by_qemu_written_by_us() {
    let dir = tmpdir();
    let size = 4 << 20;
    // qemu-img spends over 2 s calibrating PBKDF2 per image: CI takes every fifth variant
    // from a start that changes from run to run (every IV generator and hash, every cipher
    // and mode each time); QCOW2RS_LUKS_MATRIX=full takes them all.
    let full = std::env::var("QCOW2RS_LUKS_MATRIX").as_deref() == Ok("full");
    let start = std::env::var("QCOW2RS_LUKS_START")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as usize
                % 5
        });
    eprintln!(
        "LUKS variants made by qemu-img: {} (QCOW2RS_LUKS_START={start})",
        if full { "all" } else { "every fifth" }
    );
    for (i, v) in variants().into_iter().enumerate() {
        if !full && i % 5 != start % 5 {
            continue;
        }
        let img = dir.path().join(format!("q{i}.qcow2"));
        qemu_create_encrypted(&img, size, &luks_opts(v));
        let model = our_workload(&img, PW, 100 + i as u64, size, 65536);
        let reference = dir.path().join(format!("q{i}.raw"));
        model.save(&reference);
        assert_qemu_compare_encrypted(&reference, &img);
        assert_qemu_check_encrypted(&img);
        // A wrong password is BadKey, distinct from every other error.
        match open_pw(&img, "wrong") {
            Err(Error::BadKey { file }) => assert!(file.contains(&format!("q{i}.qcow2"))),
            other => panic!("{v:?}: wrong password gave {other:?}"),
        }
    }
}

#[test]
fn luks_variants_made_by_us_written_by_qemu() {
    let dir = tmpdir();
    let size = 4 << 20;
    for (i, v) in variants().into_iter().enumerate() {
        let img = dir.path().join(format!("o{i}.qcow2"));
        let mut o = CreateOptions::new(size);
        o.encryption = Some(our_luks(v));
        Image::create(&img, &o).unwrap();
        // qemu-img sees the variant we asked for.
        let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]).ok();
        let j = &info.stdout;
        assert!(
            j.contains(&format!("\"cipher-alg\": \"{}\"", v.0)),
            "{v:?} {j}"
        );
        assert!(
            j.contains(&format!("\"cipher-mode\": \"{}\"", v.1)),
            "{v:?} {j}"
        );
        assert!(
            j.contains(&format!("\"ivgen-alg\": \"{}\"", v.2)),
            "{v:?} {j}"
        );
        assert!(
            j.contains(&format!("\"hash-alg\": \"{}\"", v.4)),
            "{v:?} {j}"
        );
        let pattern = 0x11 + i as u8;
        qemu_io_secret(
            &img,
            &[
                format!("write -P {pattern} 65536 131072"),
                "write -P 0x5a 1000448 4096".to_string(),
                "write -z 3145728 65536".to_string(),
            ],
        );
        let ours = open_pw(&img, PW).unwrap();
        let mut buf = vec![0u8; 131072];
        ours.read_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == pattern), "{v:?}");
        let mut b2 = vec![0u8; 4096];
        ours.read_at(&mut b2, 1000448).unwrap();
        assert!(b2.iter().all(|&b| b == 0x5a), "{v:?}");
        // And our own writes on top read back in qemu-io.
        ours.write_at(&vec![0xc3; 70000], 2 << 20).unwrap();
        ours.close().unwrap();
        qemu_io_secret(
            &img,
            &[
                format!("read -P {pattern} 65536 131072"),
                "read -P 0xc3 2097152 70000".to_string(),
                "read -P 0 3145728 65536".to_string(),
            ],
        );
        assert_qemu_check_encrypted(&img);
    }
}

#[test]
fn legacy_aes_both_ways() {
    let dir = tmpdir();
    let size = 8 << 20;
    for (i, compat) in ["1.1", "0.10"].into_iter().enumerate() {
        // qemu-img makes it, we write, qemu judges.
        let img = dir.path().join(format!("qa{i}.qcow2"));
        qemu_create_encrypted(
            &img,
            size,
            &format!("compat={compat},encrypt.format=aes,encrypt.key-secret=sec0"),
        );
        let model = our_workload(&img, PW, 7 + i as u64, size, 65536);
        let reference = dir.path().join(format!("qa{i}.raw"));
        model.save(&reference);
        assert_qemu_compare_encrypted(&reference, &img);
        assert_qemu_check_encrypted(&img);
        // No key check: a wrong password opens and reads garbage, as in QEMU.
        let wrong = open_pw(&img, "wrong").unwrap();
        let mut buf = vec![0u8; size as usize];
        wrong.read_at(&mut buf, 0).unwrap();
        assert_ne!(buf, model.data);
        drop(wrong);

        // We make it, qemu-io writes, we read.
        let img = dir.path().join(format!("oa{i}.qcow2"));
        let mut o = CreateOptions::new(size);
        o.compat = qcow2rs::Compat::parse(compat).unwrap();
        o.encryption = Some(EncryptionOptions::aes(PW));
        Image::create(&img, &o).unwrap();
        qemu_io_secret(&img, &["write -P 0x77 512 130560".to_string()]);
        let ours = open_pw(&img, PW).unwrap();
        let mut buf = vec![0u8; 130560];
        ours.read_at(&mut buf, 512).unwrap();
        assert!(buf.iter().all(|&b| b == 0x77));
        ours.write_at(b"tail", size - 4).unwrap();
        ours.close().unwrap();
        qemu_io_secret(
            &img,
            &[
                "read -P 0x77 512 130560".to_string(),
                format!("read -v {} 4", size - 4),
            ],
        );
        assert_qemu_check_encrypted(&img);
    }
}

fn scan_for(path: &Path, needle: &[u8]) -> Option<usize> {
    let data = std::fs::read(path).unwrap();
    data.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn no_plaintext_reaches_the_host_file() {
    let dir = tmpdir();
    let marker: Vec<u8> = b"PLAINTEXT-MARKER-0123456789abcdef".repeat(16);
    for fmt in ["luks", "aes"] {
        let base: PathBuf = dir.path().join(format!("{fmt}.qcow2"));
        let mut o = CreateOptions::new(8 << 20);
        o.encryption = Some(if fmt == "luks" {
            let mut e = EncryptionOptions::luks(PW);
            e.iter_time_ms = 10;
            e
        } else {
            EncryptionOptions::aes(PW)
        });
        Image::create(&base, &o).unwrap();
        let img = open_pw(&base, PW).unwrap();
        // Whole clusters, partial (copy-on-write) clusters, unaligned writes.
        for k in 0..20u64 {
            img.write_at(&marker, k * 300_007).unwrap();
        }
        img.flush().unwrap();
        for k in 0..20u64 {
            img.write_at(&marker[..100], k * 300_007 + 3).unwrap();
        }
        img.close().unwrap();
        assert_eq!(scan_for(&base, &marker[..32]), None, "{fmt}");
        assert_eq!(scan_for(&base, b"PLAINTEXT-MARKER"), None, "{fmt}");
        // Still reads back.
        let img = open_pw(&base, PW).unwrap();
        let mut buf = vec![0u8; marker.len()];
        img.read_at(&mut buf, 300_007).unwrap();
        assert_eq!(&buf[3..103], &marker[..100]);
        assert_eq!(&buf[103..], &marker[103..]);
    }
}

#[test]
fn encrypted_overlays_over_plain_and_encrypted_bases() {
    let dir = tmpdir();
    let size = 4u64 << 20;
    let base_plain = dir.path().join("base-plain.qcow2");
    qemu_create(&base_plain, size, "");
    qemu_io(
        &base_plain,
        "qcow2",
        &["write -P 0x42 0 4194304".to_string()],
    );
    let base_enc = dir.path().join("base-enc.qcow2");
    let mut o = CreateOptions::new(size);
    let mut e = EncryptionOptions::luks("base-secret");
    e.iter_time_ms = 10;
    o.encryption = Some(e);
    Image::create(&base_enc, &o).unwrap();
    {
        let b = open_pw(&base_enc, "base-secret").unwrap();
        b.write_at(&vec![0x43; size as usize], 0).unwrap();
        b.close().unwrap();
    }
    for (base, fill, base_pw) in [
        (&base_plain, 0x42u8, None),
        (&base_enc, 0x43u8, Some("base-secret")),
    ] {
        let top = dir.path().join(format!("top-{fill}.qcow2"));
        let mut o = CreateOptions::new(0);
        o.backing_file = Some(base.file_name().unwrap().to_str().unwrap().to_string());
        o.backing_format = Some("qcow2".into());
        o.backing_password = base_pw.map(Into::into);
        let mut e = EncryptionOptions::luks(PW);
        e.iter_time_ms = 10;
        o.encryption = Some(e);
        Image::create(&top, &o).unwrap();
        let img = Image::open(
            &top,
            &OpenOptions {
                password: Some(PW.into()),
                backing_password: base_pw.map(Into::into),
                ..OpenOptions::new()
            },
        )
        .unwrap();
        // Partial-cluster writes copy the backing file's data up (decrypted from the base,
        // encrypted for the overlay).
        img.write_at(&[0xee; 1000], 70_000).unwrap();
        let mut buf = vec![0u8; 200_000];
        img.read_at(&mut buf, 0).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let want = if (70_000..71_000).contains(&i) {
                0xee
            } else {
                fill
            };
            assert_eq!(b, want, "byte {i} over {}", base.display());
        }
        img.close().unwrap();
        // qemu-io agrees (each layer with its own secret).
        let obj_top = secret_arg(PW);
        let mut opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            top.display()
        );
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.arg("--object").arg(&obj_top);
        if let Some(p) = base_pw {
            cmd.arg("--object").arg(format!("secret,id=sec1,data={p}"));
            opts.push_str(",backing.encrypt.key-secret=sec1");
        }
        cmd.arg("--image-opts")
            .arg("-c")
            .arg(format!("read -P {fill} 0 70000"))
            .arg("-c")
            .arg("read -P 0xee 70000 1000")
            .arg("-c")
            .arg(format!("read -P {fill} 71000 100000"))
            .arg(opts);
        let r = run(&mut cmd);
        assert!(r.code == 0 && !r.all().contains("failed"), "{r}");
    }
}

#[test]
fn missing_password_and_inspection() {
    let dir = tmpdir();
    let img = dir.path().join("l.qcow2");
    qemu_create_encrypted(
        &img,
        1 << 20,
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    );
    match Image::open(&img, &OpenOptions::new()) {
        Err(Error::NeedKey { .. }) => {}
        other => panic!("open without a password gave {other:?}"),
    }
    let i = Image::open(
        &img,
        &OpenOptions {
            without_key: true,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    let info = i.info().unwrap();
    let luks = info.encryption.unwrap().luks.unwrap();
    assert_eq!(luks.cipher_alg, CipherAlg::Aes256);
    assert_eq!(luks.slots.len(), 8);
    assert!(luks.slots[0].active && !luks.slots[1].active);
    let mut b = [0u8; 512];
    assert!(matches!(i.read_at(&mut b, 0), Err(Error::NeedKey { .. })));
    assert!(!format!(
        "{:?}",
        OpenOptions {
            password: Some(PW.into()),
            ..OpenOptions::new()
        }
    )
    .contains("horse"));
}

#[test]
fn other_ciphers_are_unsupported_by_name() {
    let dir = tmpdir();
    for (cipher, mode) in [
        ("twofish-256", "xts"),
        ("serpent-128", "xts"),
        ("cast5-128", "cbc"),
    ] {
        let img = dir.path().join(format!("{cipher}.qcow2"));
        qemu_create_encrypted(
            &img,
            1 << 20,
            &format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg={cipher},encrypt.cipher-mode={mode}"),
        );
        match open_pw(&img, PW) {
            Err(Error::Unsupported { feature, .. }) => {
                let name = cipher.split('-').next().unwrap();
                assert!(feature.contains(&format!("'{name}'")), "{feature}");
            }
            other => panic!("{cipher}: {other:?}"),
        }
    }
}

#[test]
fn encrypted_with_every_cache_mode() {
    use qcow2rs::CacheMode;
    let dir = tmpdir();
    for (i, cache) in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::None,
        CacheMode::Directsync,
        CacheMode::Unsafe,
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("c{i}.qcow2"));
        let mut o = CreateOptions::new(4 << 20);
        o.extended_l2 = i % 2 == 1;
        o.encryption = Some(if i % 2 == 0 {
            let mut e = EncryptionOptions::luks(PW);
            e.iter_time_ms = 10;
            e
        } else {
            EncryptionOptions::aes(PW)
        });
        Image::create(&img, &o).unwrap();
        let opts = OpenOptions {
            password: Some(PW.into()),
            cache,
            ..OpenOptions::new()
        };
        let model = {
            let image = Image::open(&img, &opts).unwrap();
            let mut model = Model::zeros(4 << 20, 65536);
            let mut rng = Rng::new(900 + i as u64);
            let w = Workload {
                ops: 60,
                max_len: 150 * KIB,
                ..Workload::default()
            };
            run_workload(&image, &mut model, &mut rng, &w);
            image.close().unwrap();
            model
        };
        let reference = dir.path().join(format!("c{i}.raw"));
        model.save(&reference);
        assert_qemu_compare_encrypted(&reference, &img);
        assert_qemu_check_encrypted(&img);
    }
}

#[test]
fn compressed_writes_to_encrypted_images_are_plain_writes() {
    let dir = tmpdir();
    let img = dir.path().join("c.qcow2");
    // A disk that ends inside a cluster and inside a sector's worth of data.
    let size = 3 * 65536 + 4096;
    let mut o = CreateOptions::new(size);
    o.encryption = Some(EncryptionOptions::aes(PW));
    Image::create(&img, &o).unwrap();
    let image = open_pw(&img, PW).unwrap();
    let data = vec![0x5cu8; 65536];
    image.write_compressed(65536, &data).unwrap();
    image.write_compressed(3 * 65536, &data[..1000]).unwrap();
    // Again, now that the cluster is allocated: an in-place overwrite ending inside a sector.
    image.write_compressed(3 * 65536, &data[..1000]).unwrap();
    let mut back = vec![0u8; 65536];
    image.read_at(&mut back, 65536).unwrap();
    assert_eq!(back, data);
    let mut tail = vec![0u8; 4096];
    image.read_at(&mut tail, 3 * 65536).unwrap();
    assert!(tail[..1000].iter().all(|&b| b == 0x5c) && tail[1000..].iter().all(|&b| b == 0));
    image.close().unwrap();
    assert_qemu_check_encrypted(&img);
}

#[test]
fn growing_over_an_odd_sized_raw_backing_file() {
    // Growing zeroes what the backing file would show through, up to its end, which here is
    // not on a sector boundary: the encrypted image must zero a partial sector.
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x77u8; (1 << 20) + 700]).unwrap();
    let top = dir.path().join("top.qcow2");
    let mut o = CreateOptions::new(512 << 10);
    o.cluster_size = 65536 * 4;
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some("raw".into());
    let mut e = EncryptionOptions::luks(PW);
    e.iter_time_ms = 10;
    o.encryption = Some(e);
    Image::create(&top, &o).unwrap();
    let img = open_pw(&top, PW).unwrap();
    // Own the cluster holding the end of the backing file's data.
    img.write_at(&[1u8; 512], (512 << 10) - 512).unwrap();
    img.resize(2 << 20).unwrap();
    img.write_at(&[2u8; 512], (1 << 20) + 4096).unwrap();
    img.resize(4 << 20).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..(512 << 10) - 512].iter().all(|&b| b == 0x77));
    assert!(buf[(512 << 10) - 512..512 << 10].iter().all(|&b| b == 1));
    for (i, &b) in buf.iter().enumerate().skip(512 << 10) {
        let want = if ((1 << 20) + 4096..(1 << 20) + 4608).contains(&i) {
            2
        } else {
            0
        };
        assert_eq!(b, want, "byte {i}");
    }
    img.close().unwrap();
    assert_qemu_check_encrypted(&top);
}

fn luks_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let img = dir.join(name);
    let mut o = CreateOptions::new(size);
    let mut e = EncryptionOptions::luks(PW);
    e.iter_time_ms = 10;
    o.encryption = Some(e);
    Image::create(&img, &o).unwrap();
    img
}

#[test]
fn forced_overwrite_never_leaves_no_password() {
    use qcow2rs::KeySlotChange;
    let dir = tmpdir();
    let img = luks_image(dir.path(), "f.qcow2", 1 << 20);
    let image = open_pw(&img, PW).unwrap();
    // The only active slot: overwriting it would pass through "no password at all".
    let mut c = KeySlotChange::add("new");
    c.keyslot = Some(0);
    c.force = true;
    assert!(matches!(
        image.change_key_slots(&c),
        Err(Error::InvalidArgument(_))
    ));
    // With a second password: a forced overwrite of slot 1 that fails before storing the new
    // key (an impossible iteration time) leaves slot 1 working.
    let mut c2 = KeySlotChange::add("second");
    c2.iter_time_ms = Some(10);
    assert_eq!(image.change_key_slots(&c2).unwrap(), vec![1]);
    let mut c3 = KeySlotChange::add("third");
    c3.keyslot = Some(1);
    c3.force = true;
    c3.iter_time_ms = Some(u64::MAX / 2);
    assert!(image.change_key_slots(&c3).is_err());
    image.close().unwrap();
    open_pw(&img, PW).unwrap();
    open_pw(&img, "second").unwrap();
}

#[test]
fn preallocated_v2_encrypted_images_are_refused() {
    let dir = tmpdir();
    for e in [EncryptionOptions::aes(PW), EncryptionOptions::luks(PW)] {
        let img = dir.path().join("p.qcow2");
        let mut o = CreateOptions::new(1 << 20);
        o.compat = qcow2rs::Compat::V2;
        o.preallocation = qcow2rs::Preallocation::Metadata;
        o.encryption = Some(e);
        assert!(matches!(
            Image::create(&img, &o),
            Err(Error::InvalidArgument(_))
        ));
        // v3 preallocation reads zeros.
        o.compat = qcow2rs::Compat::V3;
        if let Some(e) = o.encryption.as_mut() {
            e.iter_time_ms = 10;
        }
        Image::create(&img, &o).unwrap();
        let image = open_pw(&img, PW).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}

#[test]
fn empty_requests_touch_nothing_and_resize_needs_the_key() {
    let dir = tmpdir();
    let img = luks_image(dir.path(), "e.qcow2", 1 << 20);
    let image = open_pw(&img, PW).unwrap();
    image.write_at(&[], 1).unwrap();
    image.write_zeroes(1, 0).unwrap();
    let mut none = [0u8; 0];
    image.read_at(&mut none, 3).unwrap();
    let m = image.map(0, 1 << 20).unwrap();
    assert!(m.iter().all(|e| !e.data), "{m:?}");
    image.close().unwrap();
    let ro = Image::open(
        &img,
        &OpenOptions {
            without_key: true,
            ..OpenOptions::new()
        },
    )
    .unwrap();
    assert!(matches!(ro.resize(1000 * 512), Err(Error::NeedKey { .. })));
    assert_eq!(ro.virtual_size(), 1 << 20);
}
