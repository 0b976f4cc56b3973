//! Images made by qemu-img/qemu-io, read and written by us, checked by qemu-img.

use qcow2rs::{Image, OpenOptions};
use std::path::Path;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("qemu tools are installed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

fn to_raw(img: &Path, raw: &Path) -> Vec<u8> {
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

fn read_all(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    let rep = img.check(None).unwrap();
    assert!(rep.corruptions == 0, "{rep:?}");
    buf
}

fn compressible(len: usize, seed: u32) -> Vec<u8> {
    let words = [
        "alpha ", "beta ", "gamma ", "delta ", "qcow2 ", "cluster ", "\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(2654435761).max(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(words[(x % 7) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = compressible(8 << 20, 7);
    data[3 << 20..4 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    for (ct, cs) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "4096"),
        ("zstd", "2M"),
        ("zlib", "512"),
    ] {
        let img = dir.path().join(format!("c-{ct}-{cs}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct},cluster_size={cs}"),
                src.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        let check = run("qemu-img", &["check", img.to_str().unwrap()]);
        assert!(!check.contains(" 0.00% compressed"), "{check}");
        assert!(read_all(&img) == data, "{ct} {cs} read mismatch");
        // Overwrite parts of compressed clusters, then qemu-img must agree.
        {
            let i = Image::open(&img, &OpenOptions::new()).unwrap();
            i.write_at(&[0x5a; 10000], 100_000).unwrap();
            i.write_zeroes(1 << 20, 200_000).unwrap();
            i.discard(2 << 20, 2 << 20).unwrap();
            i.close().unwrap();
        }
        data[100_000..110_000].fill(0x5a);
        data[1 << 20..(1 << 20) + 200_000].fill(0);
        let mut expect = data.clone();
        expect[2 << 20..4 << 20].fill(0);
        run("qemu-img", &["check", img.to_str().unwrap()]);
        assert!(
            to_raw(&img, &dir.path().join("o.raw")) == expect,
            "{ct} {cs} after write"
        );
        data = compressible(8 << 20, 7);
        data[3 << 20..4 << 20].fill(0);
    }
}

#[test]
fn snapshots_cow() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "16M"]);
    run("qemu-io", &["-c", "write -P 0x11 0 4M", p]);
    run("qemu-img", &["snapshot", "-c", "s1", p]);
    {
        let i = Image::open(&img, &OpenOptions::new()).unwrap();
        assert_eq!(i.info().unwrap().snapshot_count, 1);
        i.write_at(&[0x22; 5000], 70_000).unwrap();
        i.write_at(&[0x33; 1 << 20], 2 << 20).unwrap();
        i.discard(3 << 20, 1 << 20).unwrap();
        let rep = i.check(None).unwrap();
        assert!(rep.is_clean(), "{rep:?}");
        i.close().unwrap();
    }
    run("qemu-img", &["check", p]);
    run(
        "qemu-io",
        &[
            "-c",
            "read -P 0x22 70000 5000",
            "-c",
            "read -P 0x11 0 70000",
            "-c",
            "read -P 0x33 2M 1M",
            p,
        ],
    );
    run("qemu-img", &["snapshot", "-a", "s1", p]);
    run("qemu-io", &["-c", "read -P 0x11 0 4M", p]);
    run("qemu-img", &["check", p]);
}

#[test]
fn backing_chain_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    std::fs::write(&base, vec![0x44u8; 4 << 20]).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
            "8M",
        ],
    );
    run(
        "qemu-io",
        &["-c", "write -P 0x55 1M 1M", mid.to_str().unwrap()],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    {
        let i = Image::open(&top, &OpenOptions::new()).unwrap();
        i.write_at(&[0x66; 1000], (1 << 20) + 500).unwrap();
        i.write_at(&[0x77; 1000], 100).unwrap();
        i.close().unwrap();
    }
    run("qemu-img", &["check", top.to_str().unwrap()]);
    let expect = to_raw(&top, &dir.path().join("t.raw"));
    assert!(read_all(&top) == expect);
    assert_eq!(&expect[100..1100], &[0x77; 1000][..]);
    assert_eq!(expect[0], 0x44);
    assert_eq!(expect[(1 << 20) + 499], 0x55);
    assert_eq!(expect[5 << 20], 0);
}
