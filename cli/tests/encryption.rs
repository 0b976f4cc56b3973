//! Encrypted images from the command line, against the real qemu-img and qemu-io: secrets as
//! qemu-img users pass them (`--object secret`, `-o encrypt.key-secret`, `--image-opts`,
//! `--target-image-opts`) and the short forms (`--password-file`, `--target-password-file`);
//! `info` output byte for byte; convert between plain, AES and LUKS; `amend` key slots; wrong
//! passwords; no plaintext in any file.

mod common;

use common::*;
use std::path::Path;

/// qemu-img's output with the values that differ between two images of the same options
/// (UUID, PBKDF2 iterations, sizes on disk) blanked.
fn stable(s: &str) -> String {
    s.lines()
        .filter(|l| {
            !(l.contains("uuid")
                || l.contains("iters")
                || l.contains("disk size")
                || l.contains("actual-size")
                || l.contains("file length"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn io_opts(file: &str, id: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret={id}")
}

fn scan(path: &Path, needle: &[u8]) -> bool {
    let data = std::fs::read(path).unwrap();
    data.windows(needle.len()).any(|w| w == needle)
}

const MARK: &[u8] = b"qcow2rs-plaintext-marker-7d1f";

fn marked(len: usize) -> Vec<u8> {
    MARK.iter().copied().cycle().take(len).collect()
}

#[test]
fn create_and_info_match_qemu() {
    let d = tmp();
    let dir = d.path();
    write_file(dir, "pw", b"s3cret");
    for opts in [
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        "encrypt.format=aes,encrypt.key-secret=s",
        "encryption=on,encrypt.key-secret=s",
    ] {
        let obj = "secret,id=s,file=pw";
        let q = qemu_img(dir, &["create", "-f", "qcow2", "--object", obj, "-o", opts, "q.qcow2", "16M"]).expect(0);
        let o = ours(dir, &["create", "-f", "qcow2", "--object", obj, "-o", opts, "o.qcow2", "16M"]).expect(0);
        assert_eq!(o.stdout.replace("o.qcow2", "q.qcow2"), q.stdout, "{opts}");
        let qi = qemu_img(dir, &["info", "q.qcow2"]).expect(0);
        let oi = ours(dir, &["info", "o.qcow2"]).expect(0);
        assert_eq!(
            stable(&oi.stdout).replace("o.qcow2", "q.qcow2"),
            stable(&qi.stdout),
            "{opts}"
        );
        // And our info of qemu's image is qemu's, byte for byte but for the file's length.
        let oq = ours(dir, &["info", "q.qcow2"]).expect(0);
        assert_eq!(stable(&oq.stdout), stable(&qi.stdout), "{opts}");
        // JSON: the same keys in the same order (the printer's dictionary order).
        let qj = qemu_img(dir, &["info", "--output=json", "q.qcow2"]).expect(0);
        let oj = ours(dir, &["info", "--output=json", "q.qcow2"]).expect(0);
        let spec = |s: &str| {
            let start = s.find("\"format-specific\"").unwrap();
            let end = s.find("\"dirty-flag\": false\n}").unwrap();
            s[start..end].to_string()
        };
        assert_eq!(spec(&oj.stdout), spec(&qj.stdout), "{opts}");
    }
    // Errors as qemu-img words them.
    let r = ours(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            "x.qcow2",
            "1M",
        ],
    )
    .expect(1);
    assert!(
        r.stderr
            .contains("x.qcow2: Parameter 'encrypt.key-secret' is required for cipher"),
        "{}",
        r.stderr
    );
    let r = ours(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=nope",
            "x.qcow2",
            "1M",
        ],
    )
    .expect(1);
    assert!(
        r.stderr.contains("x.qcow2: No secret with id 'nope'"),
        "{}",
        r.stderr
    );
}

#[test]
fn write_convert_compare_both_ways() {
    let d = tmp();
    let dir = d.path();
    write_file(dir, "pw1", b"first password");
    write_file(dir, "pw2", b"second password");
    let data = marked(3 << 20);
    write_file(dir, "src.raw", &data);
    // raw -> LUKS (ours), read by qemu.
    ours(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "--object",
            "secret,id=k,file=pw1",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
            "src.raw",
            "l1.qcow2",
        ],
    )
    .expect(0);
    assert!(!scan(&dir.join("l1.qcow2"), MARK));
    let cmp = |a: &str, b: &str| {
        qemu_img(
            dir,
            &[
                "compare",
                "--object",
                "secret,id=k,file=pw1",
                "--object",
                "secret,id=j,file=pw2",
                "--image-opts",
                a,
                b,
            ],
        )
        .expect(0)
    };
    cmp(
        "driver=raw,file.filename=src.raw",
        &io_opts("l1.qcow2", "k"),
    );
    // LUKS -> LUKS with a new password (short forms), and LUKS -> AES -> LUKS.
    ours(
        dir,
        &[
            "convert",
            "--password-file",
            "pw1",
            "-O",
            "qcow2",
            "--target-password-file",
            "pw2",
            "-o",
            "encrypt.format=luks,encrypt.iter-time=10",
            "l1.qcow2",
            "l2.qcow2",
        ],
    )
    .expect(0);
    cmp(
        "driver=raw,file.filename=src.raw",
        &io_opts("l2.qcow2", "j"),
    );
    ours(
        dir,
        &[
            "convert",
            "--object",
            "secret,id=j,file=pw2",
            "--image-opts",
            &io_opts("l2.qcow2", "j"),
            "-O",
            "qcow2",
            "--object",
            "secret,id=a,file=pw1",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=a",
            "a.qcow2",
        ],
    )
    .expect(0);
    cmp("driver=raw,file.filename=src.raw", &io_opts("a.qcow2", "k"));
    assert!(!scan(&dir.join("a.qcow2"), MARK));
    ours(
        dir,
        &[
            "convert",
            "--password-file",
            "pw1",
            "-O",
            "qcow2",
            "--target-password-file",
            "pw2",
            "-o",
            "encrypt.format=luks,encrypt.iter-time=10",
            "a.qcow2",
            "l3.qcow2",
        ],
    )
    .expect(0);
    cmp(
        "driver=raw,file.filename=src.raw",
        &io_opts("l3.qcow2", "j"),
    );
    // qemu makes one, we decrypt it.
    qemu_img(
        dir,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "--object",
            "secret,id=k,file=pw1",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
            "src.raw",
            "q.qcow2",
        ],
    )
    .expect(0);
    ours(
        dir,
        &[
            "convert",
            "--password-file",
            "pw1",
            "-O",
            "raw",
            "q.qcow2",
            "out.raw",
        ],
    )
    .expect(0);
    assert_eq!(std::fs::read(dir.join("out.raw")).unwrap(), data);
    // Our compare, our check, our map.
    let r = ours(
        dir,
        &[
            "compare",
            "--object",
            "secret,id=k,file=pw1",
            "--object",
            "secret,id=j,file=pw2",
            "--image-opts",
            &io_opts("q.qcow2", "k"),
            &io_opts("l3.qcow2", "j"),
        ],
    )
    .expect(0);
    assert!(r.stdout.contains("Images are identical."));
    ours(dir, &["check", "--password-file", "pw2", "l3.qcow2"]).expect(0);
    let qm = qemu_img(
        dir,
        &[
            "map",
            "--output=json",
            "--object",
            "secret,id=k,file=pw1",
            "--image-opts",
            &io_opts("q.qcow2", "k"),
        ],
    )
    .expect(0);
    let om = ours(
        dir,
        &["map", "--output=json", "--password-file", "pw1", "q.qcow2"],
    )
    .expect(0);
    assert_eq!(om.stdout, qm.stdout);
    let r = ours(dir, &["map", "--password-file", "pw1", "q.qcow2"]).expect(1);
    assert!(
        r.stderr
            .contains("File contains external, encrypted or compressed clusters."),
        "{}",
        r.stderr
    );
    // -n into an existing encrypted image with --target-image-opts.
    qemu_img(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            "secret,id=k,file=pw1",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
            "n.qcow2",
            "3M",
        ],
    )
    .expect(0);
    ours(
        dir,
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            "secret,id=k,file=pw1",
            "--target-image-opts",
            "src.raw",
            &io_opts("n.qcow2", "k"),
        ],
    )
    .expect(0);
    cmp("driver=raw,file.filename=src.raw", &io_opts("n.qcow2", "k"));
    // Compression and encryption together are refused, as qemu-img refuses them.
    let r = ours(
        dir,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "--object",
            "secret,id=k,file=pw1",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k",
            "src.raw",
            "c.qcow2",
        ],
    )
    .expect(1);
    assert!(
        r.stderr
            .contains("Compression and encryption not supported at the same time"),
        "{}",
        r.stderr
    );
}

#[test]
fn wrong_and_missing_passwords() {
    let d = tmp();
    let dir = d.path();
    write_file(dir, "pw", b"right");
    write_file(dir, "bad", b"wrong");
    qemu_img(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            "secret,id=k,file=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
            "l.qcow2",
            "1M",
        ],
    )
    .expect(0);
    for cmd in [
        vec![
            "convert",
            "--password-file",
            "bad",
            "-O",
            "raw",
            "l.qcow2",
            "x.raw",
        ],
        vec!["info", "--password-file", "bad", "l.qcow2"],
        vec!["check", "--password-file", "bad", "l.qcow2"],
        vec!["resize", "--password-file", "bad", "l.qcow2", "2M"],
    ] {
        let r = ours(dir, &cmd);
        assert_eq!(r.code, 1, "{cmd:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("Could not open 'l.qcow2': Invalid password, cannot unlock any keyslot"),
            "{cmd:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("wrong") && !r.stdout.contains("wrong"));
    }
    let r = ours(dir, &["convert", "-O", "raw", "l.qcow2", "x.raw"]).expect(1);
    assert!(r.stderr.contains("encrypt.key-secret"), "{}", r.stderr);
    // info needs no key.
    ours(dir, &["info", "l.qcow2"]).expect(0);
}

#[test]
fn amend_key_slots_with_qemu_checking() {
    let d = tmp();
    let dir = d.path();
    write_file(dir, "a", b"password a");
    write_file(dir, "b", b"password b");
    qemu_img(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            "secret,id=a,file=a",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=a,encrypt.iter-time=10",
            "l.qcow2",
            "4M",
        ],
    )
    .expect(0);
    let data = marked(1 << 20);
    write_file(dir, "data.raw", &data);
    qemu_io(
        dir,
        &[
            "--object",
            "secret,id=a,file=a",
            "--image-opts",
            "-c",
            "write -P 0x41 0 1M",
            &io_opts("l.qcow2", "a"),
        ],
    )
    .expect(0);
    let read_ok = |id: &str| {
        let r = qemu_io(
            dir,
            &[
                "--object",
                &format!("secret,id={id},file={id}"),
                "--image-opts",
                "-c",
                "read -P 0x41 0 1M",
                &io_opts("l.qcow2", id),
            ],
        );
        r.code == 0 && !r.stdout.contains("failed") && !r.stderr.contains("Invalid password")
    };
    let objs = [
        "--object",
        "secret,id=a,file=a",
        "--object",
        "secret,id=b,file=b",
    ];
    let amend = |opts: &str, key: &str, extra: &[&str]| {
        let mut args = vec!["amend"];
        args.extend_from_slice(&objs);
        args.extend_from_slice(extra);
        let io = io_opts("l.qcow2", key);
        args.extend_from_slice(&["--image-opts", &io, "-o", opts]);
        ours(dir, &args)
    };
    amend(
        "encrypt.state=active,encrypt.new-secret=b,encrypt.iter-time=10",
        "a",
        &[],
    )
    .expect(0);
    assert!(read_ok("a") && read_ok("b"));
    let r = amend(
        "encrypt.state=active,encrypt.new-secret=b,encrypt.keyslot=1",
        "a",
        &[],
    )
    .expect(1);
    assert!(
        r.stderr
            .contains("Refusing to overwrite active keyslot 1 - please erase it first"),
        "{}",
        r.stderr
    );
    amend("encrypt.state=inactive,encrypt.old-secret=a", "b", &[]).expect(0);
    assert!(!read_ok("a") && read_ok("b"));
    let r = amend("encrypt.state=inactive,encrypt.keyslot=1", "b", &[]).expect(1);
    assert!(
        r.stderr
            .contains("Attempt to erase the only active keyslot 1"),
        "{}",
        r.stderr
    );
    let r = amend("encrypt.state=inactive,encrypt.old-secret=b", "b", &[]).expect(1);
    assert!(
        r.stderr
            .contains("All the active keyslots match the (old) password"),
        "{}",
        r.stderr
    );
    // qemu-img amend and ours agree on the result; qemu-img check is clean.
    qemu_img(
        dir,
        &[
            "amend",
            "--object",
            "secret,id=a,file=a",
            "--object",
            "secret,id=b,file=b",
            "--image-opts",
            &io_opts("l.qcow2", "b"),
            "-o",
            "encrypt.state=active,encrypt.new-secret=a,encrypt.iter-time=10",
        ],
    )
    .expect(0);
    assert!(read_ok("a") && read_ok("b"));
    let info = ours(dir, &["info", "--output=json", "l.qcow2"]).expect(0);
    let v = json(&info.stdout);
    let slots = v["format-specific"]["data"]["encrypt"]["slots"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(slots.iter().filter(|s| s["active"] == true).count(), 2);
    qemu_img(
        dir,
        &[
            "check",
            "--object",
            "secret,id=a,file=a",
            "--image-opts",
            &io_opts("l.qcow2", "a"),
        ],
    )
    .expect(0);
    // The removed password's key material was wiped, and no plaintext anywhere.
    assert!(!scan(&dir.join("l.qcow2"), MARK));
}
