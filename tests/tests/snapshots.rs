//! Internal snapshots, both ways with qemu-img.
//!
//! - Snapshots we make (plain, LUKS, legacy AES, over a backing file, with compressed clusters,
//!   subclusters, lazy refcounts, small clusters and narrow refcounts) are listed by
//!   `qemu-img snapshot -l`, read back by `qemu-img convert -l`, applied and deleted by
//!   qemu-img, and `qemu-img check` is clean (no leaks) after each step.
//! - Snapshots qemu-img makes we list, read through a snapshot view, apply and delete.
//! - A long random sequence of writes, snapshots, applies, deletes, resizes and reopens is
//!   compared against an in-memory model; `qemu-img check` is clean after each step.
//! - Applying a snapshot of another disk size resizes; refcount overflow (1- and 2-bit
//!   refcounts) fails cleanly; the limits of the snapshot table are enforced on open.

use std::collections::BTreeMap;
use std::path::PathBuf;

use qcow2rs::{
    Compat, CompressionType, CreateOptions, EncryptionOptions, Error, Image, OpenOptions,
    SnapshotRef,
};
use qcow2rs_tests::*;

const PW: &str = "snapshot secret";

/// An image under test, and how qemu-img names it (with the secret for encrypted ones).
struct Img {
    path: PathBuf,
    encrypted: bool,
}

impl Img {
    fn spec(&self) -> Vec<String> {
        if self.encrypted {
            vec![
                "--object".into(),
                format!("secret,id=sec0,data={PW}"),
                "--image-opts".into(),
            ]
        } else {
            vec!["-f".into(), "qcow2".into()]
        }
    }
    fn name_arg(&self) -> String {
        if self.encrypted {
            format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                self.path.display()
            )
        } else {
            self.path.display().to_string()
        }
    }
    /// `qemu-img SUB [spec] ARGS... IMAGE [TAIL...]`.
    fn qemu(&self, sub: &str, args: &[&str], tail: &[&str]) -> Run {
        let mut v: Vec<String> = vec![sub.into()];
        v.extend(self.spec());
        v.extend(args.iter().map(|s| s.to_string()));
        v.push(self.name_arg());
        v.extend(tail.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        qemu_img(&refs)
    }
    /// (ID, name) of each snapshot, as `qemu-img snapshot -l` lists them.
    fn qemu_list(&self) -> Vec<(String, String)> {
        let r = self.qemu("snapshot", &["-l"], &[]);
        assert_eq!(r.code, 0, "qemu-img snapshot -l: {r}");
        r.stdout
            .lines()
            .skip(2)
            .map(|l| {
                let mut it = l.split_whitespace();
                (
                    it.next().unwrap().to_string(),
                    it.next().unwrap().to_string(),
                )
            })
            .collect()
    }
    /// The disk (or snapshot `id`), as qemu-img converts it to raw.
    fn qemu_raw(&self, dir: &TempDir, id: Option<&str>) -> Vec<u8> {
        let out = path_in(dir, "qemu-out.raw");
        let _ = std::fs::remove_file(&out);
        let l = id.map(|i| format!("snapshot.id={i}"));
        let mut args = vec!["-O", "raw"];
        if let Some(l) = &l {
            args.insert(0, l);
            args.insert(0, "-l");
        }
        let r = self.qemu("convert", &args, &[out.to_str().unwrap()]);
        assert_eq!(r.code, 0, "qemu-img convert: {r}");
        std::fs::read(&out).unwrap()
    }
    fn assert_qemu_clean(&self, ctx: &str) {
        let r = self.qemu("check", &[], &[]);
        assert!(
            r.code == 0 && r.stdout.contains("No errors were found"),
            "{ctx}: qemu-img check: {r}"
        );
    }
    /// No corruption (leaks allowed: an image that is open holds its allocation run).
    fn assert_qemu_no_corruption(&self, ctx: &str) {
        let r = self.qemu("check", &[], &[]);
        assert!(
            (r.code == 0 || r.code == 3) && !r.all().contains("ERROR"),
            "{ctx}: qemu-img check: {r}"
        );
    }
    fn open_opts(&self) -> OpenOptions {
        OpenOptions {
            password: self.encrypted.then(|| PW.into()),
            ..OpenOptions::new()
        }
    }
    fn open(&self) -> Image {
        Image::open(&self.path, &self.open_opts()).unwrap()
    }
    /// A read-only view of snapshot `r`.
    fn view(&self, r: SnapshotRef) -> Image {
        Image::open(
            &self.path,
            &OpenOptions {
                read_only: true,
                snapshot: Some(r),
                ..self.open_opts()
            },
        )
        .unwrap()
    }
}

fn read_disk(img: &Image) -> Vec<u8> {
    let mut b = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}

fn assert_our_clean(img: &Image, ctx: &str) {
    let r = img.check(None).unwrap();
    assert!(
        r.is_clean(),
        "{ctx}: our check: {} corruptions, {} leaks: {:?}",
        r.corruptions,
        r.leaks,
        r.messages
    );
}

struct Config {
    name: &'static str,
    create: CreateOptions,
    /// A backing file with data (qcow2, made by qemu-img).
    backing: bool,
    /// Compressed writes are possible (not with encryption).
    compress: bool,
}

fn configs() -> Vec<Config> {
    let base = |size: u64, cs: u64| {
        let mut o = CreateOptions::new(size);
        o.cluster_size = cs as u32;
        o
    };
    let mut v = vec![Config {
        name: "default 64k",
        create: base(8 * MIB, 64 * KIB),
        backing: false,
        compress: true,
    }];
    let mut o = base(2 * MIB, 512);
    o.refcount_bits = 4;
    v.push(Config {
        name: "512 B clusters, 4-bit refcounts",
        create: o,
        backing: false,
        compress: true,
    });
    let mut o = base(8 * MIB, 64 * KIB);
    o.extended_l2 = true;
    v.push(Config {
        name: "extended L2",
        create: o,
        backing: true,
        compress: true,
    });
    let mut o = base(4 * MIB, 4 * KIB);
    o.compat = Compat::V2;
    v.push(Config {
        name: "compat 0.10, 4k, backing",
        create: o,
        backing: true,
        compress: true,
    });
    let mut o = base(8 * MIB, 16 * KIB);
    o.lazy_refcounts = true;
    o.compression_type = CompressionType::Zstd;
    v.push(Config {
        name: "lazy refcounts, zstd, 16k",
        create: o,
        backing: false,
        compress: true,
    });
    let mut o = base(8 * MIB, 2 * MIB);
    o.refcount_bits = 64;
    v.push(Config {
        name: "2 MiB clusters, 64-bit refcounts",
        create: o,
        backing: false,
        compress: true,
    });
    let mut o = base(4 * MIB, 64 * KIB);
    o.encryption = Some(EncryptionOptions {
        iter_time_ms: 10,
        ..EncryptionOptions::luks(PW)
    });
    v.push(Config {
        name: "LUKS",
        create: o,
        backing: true,
        compress: false,
    });
    let mut o = base(4 * MIB, 64 * KIB);
    o.encryption = Some(EncryptionOptions::aes(PW));
    v.push(Config {
        name: "legacy AES",
        create: o,
        backing: false,
        compress: false,
    });
    v
}

/// Make the image of `c` in `dir` (with its backing file), and the model of its disk.
fn make(dir: &TempDir, c: &Config) -> (Img, Model) {
    let p = path_in(dir, "snap.qcow2");
    let size = c.create.size;
    let cs = c.create.cluster_size as u64;
    let mut o = c.create.clone();
    let mut model = Model::zeros(size, cs);
    if c.backing {
        let b = path_in(dir, "base.qcow2");
        qemu_create(&b, size, "");
        let r = qemu_io(&b, "qcow2", &[format!("write -P 0x5a 0 {}", size / 2)]);
        assert_eq!(r.code, 0, "{r}");
        o.backing_file = Some("base.qcow2".into());
        o.backing_format = Some("qcow2".into());
        let mut base = vec![0u8; size as usize];
        base[..(size / 2) as usize].fill(0x5a);
        model = Model::over_backing(&base, size, cs, c.create.compat == Compat::V2);
    }
    Image::create(&p, &o).unwrap_or_else(|e| panic!("{}: create: {e}", c.name));
    let img = Img {
        path: p,
        encrypted: o.encryption.is_some(),
    };
    (img, model)
}

/// A few writes, zeroes, discards and compressed writes (mirrored in `model`).
fn scribble(img: &Image, model: &mut Model, rng: &mut Rng, compress: bool, ops: usize) {
    let size = model.size();
    let cs = model.cluster_size;
    for _ in 0..ops {
        let (off, len) = pick_range(rng, size, cs, 4 * cs);
        match rng.below(10) {
            0 => {
                img.write_zeroes(off, len).unwrap();
                model.zero(off, len);
            }
            1 => {
                img.discard(off, len).unwrap();
                model.discard(off, len);
            }
            2 if compress => {
                // A compressed cluster (written normally where the cluster is allocated).
                let c = rng.below(size / cs) * cs;
                let data = compressible(rng.next_u64(), cs.min(size - c) as usize);
                img.write_compressed(c, &data).unwrap();
                model.write(c, &data);
            }
            _ => {
                let buf = rng.bytes(len as usize);
                img.write_at(&buf, off).unwrap();
                model.write(off, &buf);
            }
        }
    }
}

#[test]
fn snapshots_we_make_qemu_img_lists_reads_applies_and_deletes() {
    require_qemu();
    for (k, c) in configs().into_iter().enumerate() {
        let dir = tmpdir();
        let (t, mut model) = make(&dir, &c);
        let mut rng = Rng::new(900 + k as u64);
        let cs = c.create.cluster_size as u64;
        let img = t.open();
        scribble(&img, &mut model, &mut rng, c.compress, 12);
        if c.compress {
            // Compressed clusters, shared by the snapshot, copied when written.
            let at = model.size() - 2 * cs;
            let data = compressible(k as u64, cs as usize);
            img.write_compressed(at, &data).unwrap();
            model.write(at, &data);
        }
        let s1 = img.create_snapshot("first").unwrap();
        assert_eq!((s1.id.as_str(), s1.name.as_str()), ("1", "first"));
        let m1 = model.data.clone();
        scribble(&img, &mut model, &mut rng, c.compress, 12);
        img.create_snapshot("second").unwrap();
        let m2 = model.data.clone();
        scribble(&img, &mut model, &mut rng, c.compress, 12);
        // The snapshots read back as they were, through views, while the disk goes on.
        assert_same(c.name, &read_disk(&img), &model.data);
        assert_our_clean(&img, c.name);
        img.close().unwrap();
        for (r, want) in [
            (SnapshotRef::Id(s1.id.clone()), &m1),
            ("second".into(), &m2),
        ] {
            let v = t.view(r);
            assert_same(c.name, &read_disk(&v), want);
            assert!(v.write_at(b"x", 0).is_err(), "a view is read-only");
        }
        t.assert_qemu_clean(&format!("{}: after two snapshots", c.name));
        assert_eq!(
            t.qemu_list(),
            vec![
                ("1".to_string(), "first".to_string()),
                ("2".to_string(), "second".to_string())
            ],
            "{}",
            c.name
        );
        assert_same(
            &format!("{}: qemu reads snapshot 1", c.name),
            &t.qemu_raw(&dir, Some("1")),
            &m1,
        );
        assert_same(
            &format!("{}: qemu reads snapshot 2", c.name),
            &t.qemu_raw(&dir, Some("2")),
            &m2,
        );
        assert_same(
            &format!("{}: qemu reads the disk", c.name),
            &t.qemu_raw(&dir, None),
            &model.data,
        );
        // qemu-img applies ours and deletes one.
        let r = t.qemu("snapshot", &["-a", "first"], &[]);
        assert_eq!(r.code, 0, "{}: qemu-img snapshot -a: {r}", c.name);
        t.assert_qemu_clean(&format!("{}: after qemu-img snapshot -a", c.name));
        assert_same(c.name, &t.qemu_raw(&dir, None), &m1);
        let r = t.qemu("snapshot", &["-d", "second"], &[]);
        assert_eq!(r.code, 0, "{}: qemu-img snapshot -d: {r}", c.name);
        t.assert_qemu_clean(&format!("{}: after qemu-img snapshot -d", c.name));
        // We carry on: the disk is snapshot 1's contents.
        let img = t.open();
        assert_same(c.name, &read_disk(&img), &m1);
        model.data = m1.clone();
        scribble(&img, &mut model, &mut rng, c.compress, 8);
        img.apply_snapshot("first").unwrap();
        assert_same(c.name, &read_disk(&img), &m1);
        img.delete_snapshot("first").unwrap();
        assert!(img.snapshots().is_empty());
        assert_our_clean(&img, c.name);
        img.close().unwrap();
        t.assert_qemu_clean(&format!("{}: after we applied and deleted", c.name));
        assert!(t.qemu_list().is_empty());
        assert_same(c.name, &t.qemu_raw(&dir, None), &m1);
    }
}

#[test]
fn snapshots_qemu_img_makes_we_list_read_apply_and_delete() {
    require_qemu();
    for encrypted in [false, true] {
        let dir = tmpdir();
        let p = path_in(&dir, "q.qcow2");
        let t = Img {
            path: p.clone(),
            encrypted,
        };
        if encrypted {
            let r = qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                &format!("secret,id=sec0,data={PW}"),
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                p.to_str().unwrap(),
                "8M",
            ]);
            assert_eq!(r.code, 0, "{r}");
        } else {
            qemu_create(&p, 8 * MIB, "");
        }
        let io = |cmds: &[&str]| {
            let mut c = std::process::Command::new("qemu-io");
            for a in t.spec() {
                c.arg(a);
            }
            for x in cmds {
                c.arg("-c").arg(x);
            }
            c.arg(t.name_arg());
            let r = run(&mut c);
            assert!(r.code == 0 && !r.all().contains("failed"), "qemu-io: {r}");
        };
        io(&["write -P 0x11 0 256k", "write -P 0x12 1M 64k"]);
        assert_eq!(t.qemu("snapshot", &["-c", "a"], &[]).code, 0);
        io(&["write -P 0x21 64k 4k", "discard 1M 64k"]);
        assert_eq!(t.qemu("snapshot", &["-c", "b"], &[]).code, 0);
        assert_eq!(t.qemu("snapshot", &["-c", "a"], &[]).code, 0);
        io(&["write -P 0x31 128k 8k"]);
        let qa = t.qemu_raw(&dir, Some("1"));
        let qb = t.qemu_raw(&dir, Some("2"));
        let qa2 = t.qemu_raw(&dir, Some("3"));
        let now = t.qemu_raw(&dir, None);
        let img = t.open();
        let list = img.snapshots();
        let names: Vec<(&str, &str)> = list
            .iter()
            .map(|s| (s.id.as_str(), s.name.as_str()))
            .collect();
        assert_eq!(names, vec![("1", "a"), ("2", "b"), ("3", "a")]);
        assert!(list
            .iter()
            .all(|s| s.disk_size == 8 * MIB && s.icount == Some(0)));
        assert_same("disk", &read_disk(&img), &now);
        drop(img);
        assert_same("view 1", &read_disk(&t.view("a".into())), &qa);
        assert_same("view 2", &read_disk(&t.view("b".into())), &qb);
        assert_same(
            "view 3",
            &read_disk(&t.view(SnapshotRef::IdAndName("3".into(), "a".into()))),
            &qa2,
        );
        let img = t.open();
        // "a" is ID 1 (the first with that name), as qemu-img finds it.
        img.apply_snapshot("a").unwrap();
        assert_same("applied a", &read_disk(&img), &qa);
        img.write_at(&[0x77; 4096], 0).unwrap();
        img.delete_snapshot("2").unwrap();
        let e = img.delete_snapshot("nope").unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("snapshot 'nope' not found"), "{e}");
        assert_our_clean(&img, "after apply and delete");
        img.close().unwrap();
        t.assert_qemu_clean("after we applied and deleted");
        assert_eq!(
            t.qemu_list(),
            vec![("1".into(), "a".into()), ("3".into(), "a".into())]
        );
        let mut want = qa.clone();
        want[..4096].fill(0x77);
        assert_same("qemu reads our write", &t.qemu_raw(&dir, None), &want);
        assert_same("snapshot 3 intact", &t.qemu_raw(&dir, Some("3")), &qa2);
        // Our next ID follows qemu's rule (highest + 1).
        let img = t.open();
        assert_eq!(img.create_snapshot("c").unwrap().id, "4");
        img.close().unwrap();
        t.assert_qemu_clean("after our create");
    }
}

/// A snapshot of another disk size: applying it resizes, in one step.
#[test]
fn applying_a_snapshot_of_another_size_resizes() {
    require_qemu();
    let dir = tmpdir();
    let t = Img {
        path: path_in(&dir, "r.qcow2"),
        encrypted: false,
    };
    Image::create(&t.path, &CreateOptions::new(4 * MIB)).unwrap();
    let img = t.open();
    img.write_at(&[1u8; 8192], 4 * MIB - 8192).unwrap();
    img.create_snapshot("small").unwrap();
    img.resize(64 * MIB).unwrap();
    img.write_at(&[2u8; 65536], 40 * MIB).unwrap();
    img.create_snapshot("big").unwrap();
    img.resize(MIB).unwrap();
    img.apply_snapshot("big").unwrap();
    assert_eq!(img.virtual_size(), 64 * MIB);
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 40 * MIB).unwrap();
    assert_eq!(b, vec![2u8; 65536]);
    img.apply_snapshot("small").unwrap();
    assert_eq!(img.virtual_size(), 4 * MIB);
    let mut b = vec![0u8; 8192];
    img.read_at(&mut b, 4 * MIB - 8192).unwrap();
    assert_eq!(b, vec![1u8; 8192]);
    assert_our_clean(&img, "after applies");
    img.close().unwrap();
    t.assert_qemu_clean("after applies");
    let r = qemu_img(&["info", t.path.to_str().unwrap()]);
    assert!(r.stdout.contains("virtual size: 4 MiB"), "{r}");
    // And qemu-img resizes the same way applying ours.
    assert_eq!(t.qemu("snapshot", &["-a", "big"], &[]).code, 0);
    let img = t.open();
    assert_eq!(img.virtual_size(), 64 * MIB);
    assert_our_clean(&img, "after qemu's apply");
}

/// Narrow refcounts: a snapshot that would overflow one fails before changing anything.
#[test]
fn refcount_overflow_fails_cleanly() {
    require_qemu();
    for bits in [1u32, 2] {
        let dir = tmpdir();
        let t = Img {
            path: path_in(&dir, "n.qcow2"),
            encrypted: false,
        };
        let mut o = CreateOptions::new(4 * MIB);
        o.refcount_bits = bits;
        Image::create(&t.path, &o).unwrap();
        let img = t.open();
        // An empty disk has nothing to share: QEMU allows this even with 1-bit refcounts.
        img.create_snapshot("empty").unwrap();
        img.write_at(&[9u8; 65536], 0).unwrap();
        let mut made = 1;
        let err = loop {
            match img.create_snapshot("s") {
                Ok(_) => made += 1,
                Err(e) => break e,
            }
            assert!(made < 10);
        };
        // With 2-bit refcounts the disk and two snapshots share a cluster (3 references).
        assert_eq!(made, if bits == 1 { 1 } else { 3 }, "{bits}-bit");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("refcount"), "{err}");
        assert_our_clean(&img, "after the refused snapshot");
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![9u8; 65536]);
        // The flags cleared before the refusal are back: writes still go in place.
        let len = std::fs::metadata(&t.path).unwrap().len();
        img.write_at(&[8u8; 65536], 0).unwrap();
        img.flush().unwrap();
        if bits == 1 {
            assert_eq!(std::fs::metadata(&t.path).unwrap().len(), len);
        }
        img.close().unwrap();
        t.assert_qemu_clean(&format!("{bits}-bit refcounts"));
    }
}

/// After its only snapshot is deleted the disk owns its clusters again: COPIED is set, writes
/// go in place, and qemu-img finds nothing to complain about.
#[test]
fn deleting_the_last_snapshot_gives_clusters_back() {
    require_qemu();
    let dir = tmpdir();
    let t = Img {
        path: path_in(&dir, "d.qcow2"),
        encrypted: false,
    };
    Image::create(&t.path, &CreateOptions::new(16 * MIB)).unwrap();
    let img = t.open();
    img.write_at(&vec![3u8; 4 * MIB as usize], 0).unwrap();
    img.create_snapshot("s").unwrap();
    // A write after the snapshot copies its cluster and the L2 table.
    img.write_at(&[4u8; 4096], 0).unwrap();
    img.flush().unwrap();
    let grown = std::fs::metadata(&t.path).unwrap().len();
    img.delete_snapshot("s").unwrap();
    assert_eq!(img.snapshots().len(), 0);
    let r = img.check(None).unwrap();
    assert!(r.is_clean() && r.missing_copied == 0, "{r:?}");
    // Every cluster is ours again: overwrites allocate nothing.
    img.write_at(&vec![5u8; 4 * MIB as usize], 0).unwrap();
    img.flush().unwrap();
    assert!(std::fs::metadata(&t.path).unwrap().len() <= grown);
    img.close().unwrap();
    t.assert_qemu_clean("after delete");
    let r = qemu_img(&["info", "--output=json", t.path.to_str().unwrap()]);
    assert!(!r.stdout.contains("\"snapshots\""), "{r}");
}

/// The snapshot table's limits (brief 1.7) are enforced on open.
#[test]
fn snapshot_table_limits_on_open() {
    let dir = tmpdir();
    let p = path_in(&dir, "l.qcow2");
    Image::create(&p, &CreateOptions::new(4 * MIB)).unwrap();
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&[1u8; 512], 0).unwrap();
    img.create_snapshot("s").unwrap();
    img.close().unwrap();
    let table = peek_be64(&p, 64);
    let good = std::fs::read(&p).unwrap();
    let refuse = |what: &str, poke: &dyn Fn()| {
        std::fs::write(&p, &good).unwrap();
        poke();
        match Image::open(&p, &OpenOptions::read_only()) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
    };
    refuse("too many snapshots", &|| poke_be32(&p, 60, 65537));
    refuse("extra data over 1 KiB", &|| poke_be32(&p, table + 36, 1025));
    refuse("table past the end of the file", &|| {
        poke_be64(&p, 64, 1 << 40)
    });
    refuse("snapshot L1 unaligned", &|| poke_be64(&p, table, 0x10001));
    refuse("snapshot L1 too large", &|| {
        poke_be32(&p, table + 8, 32 << 20)
    });
    std::fs::write(&p, &good).unwrap();
    // A snapshot view must be read-only, and name a snapshot that exists.
    let e = Image::open(
        &p,
        &OpenOptions {
            snapshot: Some("s".into()),
            ..OpenOptions::new()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = Image::open(
        &p,
        &OpenOptions {
            snapshot: Some("t".into()),
            ..OpenOptions::read_only()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

/// `check -r all` on an image with snapshots counts every snapshot's references: after the
/// refcounts are damaged (one shared cluster's lowered; a whole refcount block zeroed), repair
/// leaves an image qemu-img calls clean, with every snapshot reading back and still deletable.
#[test]
fn repair_counts_snapshot_references() {
    require_qemu();
    for damage in ["one refcount", "a refcount block"] {
        let dir = tmpdir();
        let t = Img {
            path: path_in(&dir, "r.qcow2"),
            encrypted: false,
        };
        Image::create(&t.path, &CreateOptions::new(8 * MIB)).unwrap();
        let img = t.open();
        img.write_at(&vec![1u8; 2 * MIB as usize], 0).unwrap();
        img.create_snapshot("s1").unwrap();
        img.write_at(&vec![2u8; MIB as usize], MIB).unwrap();
        img.create_snapshot("s2").unwrap();
        img.write_at(&vec![3u8; 512 * 1024], 0).unwrap();
        img.close().unwrap();
        let disk = |parts: &[(u8, u64)]| {
            let mut d = Vec::new();
            for &(v, n) in parts {
                d.extend(std::iter::repeat_n(v, n as usize));
            }
            d.resize(8 * MIB as usize, 0);
            d
        };
        let active = disk(&[(3, MIB / 2), (1, MIB / 2), (2, MIB)]);
        let s2 = disk(&[(1, MIB), (2, MIB)]);
        let s1 = disk(&[(1, 2 * MIB)]);
        let reftable = peek_be64(&t.path, 48);
        let block = peek_be64(&t.path, reftable);
        if damage == "one refcount" {
            // Guest cluster 10 (768 KiB) was never rewritten: s1, s2 and the active disk
            // share it (refcount 3). Make it 1.
            let l1 = peek_be64(&t.path, 40);
            let l2 = peek_be64(&t.path, l1) & 0x00ff_ffff_ffff_fe00;
            let host = peek_be64(&t.path, l2 + 8 * 10) & 0x00ff_ffff_ffff_fe00;
            let at = block + 2 * (host / 65536);
            assert_eq!(peek_be16(&t.path, at), 3);
            poke_be16(&t.path, at, 1);
        } else {
            poke_bytes(&t.path, block, &vec![0u8; 65536]);
        }
        let r = qemu_img(&["check", t.path.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{damage}: qemu-img must see the damage: {r}");
        let img = t.open();
        let rep = img.check(Some(qcow2rs::RepairMode::All)).unwrap();
        assert!(rep.corruptions_fixed > 0, "{damage}: {rep:?}");
        let after = img.check(None).unwrap();
        assert!(
            after.is_clean() && after.missing_copied == 0,
            "{damage}: {after:?}"
        );
        assert_eq!(read_disk(&img), active, "{damage}: active disk");
        img.close().unwrap();
        t.assert_qemu_clean(&format!("{damage}: after repair"));
        for (name, want) in [("s1", &s1), ("s2", &s2)] {
            let v = t.view(SnapshotRef::Name(name.into()));
            assert_eq!(&read_disk(&v), want, "{damage}: {name}");
        }
        let r = qemu_img(&["snapshot", "-d", "s1", t.path.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{r}");
        t.assert_qemu_clean(&format!("{damage}: after qemu-img deleted s1"));
        let img = t.open();
        img.delete_snapshot("s2").unwrap();
        assert_our_clean(&img, "after we deleted s2");
        img.close().unwrap();
        t.assert_qemu_clean(&format!("{damage}: after we deleted s2"));
    }
}

/// A snapshot name that is not UTF-8 (qemu-img takes any bytes) survives our rewrites of the
/// snapshot table byte for byte; we show it with replacement characters.
#[test]
fn non_utf8_snapshot_names_are_kept() {
    use std::os::unix::ffi::OsStrExt;
    require_qemu();
    let dir = tmpdir();
    let p = path_in(&dir, "u.qcow2");
    qemu_create(&p, 4 * MIB, "");
    let raw: &[u8] = b"caf\xe9-\xff";
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c"])
        .arg(std::ffi::OsStr::from_bytes(raw))
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    assert_eq!(img.snapshots()[0].name, String::from_utf8_lossy(raw));
    img.create_snapshot("second").unwrap();
    img.delete_snapshot("second").unwrap();
    img.close().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.stdout.windows(raw.len()).any(|w| w == raw),
        "the name's bytes changed: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-d"])
        .arg(std::ffi::OsStr::from_bytes(raw))
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Bad arguments to create are refused before anything changes.
#[test]
fn bad_snapshot_arguments() {
    let dir = tmpdir();
    let p = path_in(&dir, "a.qcow2");
    Image::create(&p, &CreateOptions::new(4 * MIB)).unwrap();
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&[1u8; 512], 0).unwrap();
    let mut o = qcow2rs::SnapshotOptions::new("a\0b");
    let e = img.create_snapshot_with(&o).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    o = qcow2rs::SnapshotOptions::new("x".repeat(65536));
    let e = img.create_snapshot_with(&o).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    o = qcow2rs::SnapshotOptions::new("late");
    o.date = Some((1, 1_000_000_000));
    let e = img.create_snapshot_with(&o).unwrap_err();
    assert!(e.to_string().contains("nanoseconds"), "{e}");
    assert!(img.snapshots().is_empty());
    o.date = Some((1, 999_999_999));
    let s = img.create_snapshot_with(&o).unwrap();
    assert_eq!((s.date_sec, s.date_nsec), (1, 999_999_999));
    assert_our_clean(&img, "after refused creates");
}

/// A snapshot table larger than the first read at open (long names: 300 entries of about 600
/// bytes, 180 KiB): every entry is read, by us and by qemu-img, and the table we rewrite on
/// delete is read back whole.
#[test]
fn large_snapshot_table() {
    require_qemu();
    let dir = tmpdir();
    let t = Img {
        path: path_in(&dir, "big.qcow2"),
        encrypted: false,
    };
    Image::create(&t.path, &CreateOptions::new(4 * MIB)).unwrap();
    let img = t.open();
    let name = |i: usize| format!("{i:04}-{}", "x".repeat(590));
    for i in 0..300 {
        img.write_at(&[(i % 250) as u8 + 1; 512], (i as u64 % 8) * 65536)
            .unwrap();
        img.create_snapshot(name(i).as_str()).unwrap();
    }
    img.close().unwrap();
    t.assert_qemu_clean("300 snapshots with long names");
    let img = t.open();
    let list = img.snapshots();
    assert_eq!(list.len(), 300);
    for (i, s) in list.iter().enumerate() {
        assert_eq!(s.name, name(i));
    }
    img.delete_snapshot(SnapshotRef::Name(name(7))).unwrap();
    img.close().unwrap();
    let r = qemu_img(&["snapshot", "-l", t.path.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r}");
    let listed = r
        .stdout
        .lines()
        .filter(|l| l.contains("-xxxxxxxxxx"))
        .count();
    assert_eq!(listed, 299, "{r}");
    assert!(!r.stdout.contains(&name(7)), "{r}");
    t.assert_qemu_clean("after deleting one of 300");
    // Snapshot 299 holds what the last write left (offset 299 % 8 clusters in).
    let v = t.view(SnapshotRef::Name(name(299)));
    let mut b = [0u8; 512];
    v.read_at(&mut b, 3 * 65536).unwrap();
    assert_eq!(b, [(299 % 250) as u8 + 1; 512]);
}

/// Freed clusters are punched out of the file in merged ranges, not one call each: deleting a
/// snapshot after 256 copy-on-write writes leaves the file's allocated blocks down by about
/// as much, and takes a handful of discards (counted by the recording storage).
#[test]
fn freed_clusters_are_punched_in_ranges() {
    use qcow2rs::storage::{OpKind, RecordingStorage};
    let dir = tmpdir();
    let p = path_in(&dir, "p.qcow2");
    let mut o = CreateOptions::new(64 * MIB);
    o.cluster_size = 65536;
    Image::create(&p, &o).unwrap();
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&vec![1u8; 16 * MIB as usize], 0).unwrap();
    img.create_snapshot("s").unwrap();
    for i in 0..256u64 {
        img.write_at(&[2u8; 4096], i * 65536).unwrap();
    }
    img.close().unwrap();
    // The calls, on a recording copy.
    let rec = std::sync::Arc::new(RecordingStorage::new(std::fs::read(&p).unwrap()));
    let img = Image::open_storage(rec.clone(), "p.qcow2", &OpenOptions::new()).unwrap();
    img.apply_snapshot("s").unwrap();
    img.close().unwrap();
    let discards = rec.op_count(OpKind::Discard);
    assert!(
        (1..=4).contains(&discards),
        "{discards} discards for 256 freed clusters"
    );
    // The space, on the real file.
    let before = blocks(&p);
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.apply_snapshot("s").unwrap();
    img.close().unwrap();
    let after = blocks(&p);
    assert!(
        before - after >= 256 * 65536 * 9 / 10,
        "{before} -> {after} bytes allocated"
    );
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(read_disk(&img)[..16 * MIB as usize].iter().all(|&b| b == 1));
}

fn blocks(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The expected state of an image with snapshots.
struct SnapModel {
    disk: Model,
    /// ID -> (name, contents).
    snaps: BTreeMap<u64, (String, Vec<u8>)>,
    next_id: u64,
}

/// A long random sequence against the model, `qemu-img check` after every step that changes
/// the snapshots (and every fifth other one), every snapshot read back at the end by us and by
/// qemu-img.
#[test]
fn random_sequence_against_a_model() {
    require_qemu();
    let steps: usize = std::env::var("QCOW2RS_SNAPSHOT_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    for (k, (cs, lazy, v2)) in [
        (64 * KIB, false, false),
        (4 * KIB, true, false),
        (16 * KIB, false, true),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmpdir();
        let t = Img {
            path: path_in(&dir, "m.qcow2"),
            encrypted: false,
        };
        let size = 4 * MIB;
        let mut o = CreateOptions::new(size);
        o.cluster_size = cs as u32;
        o.lazy_refcounts = lazy;
        if v2 {
            o.compat = Compat::V2;
        }
        Image::create(&t.path, &o).unwrap();
        let mut m = SnapModel {
            disk: Model::zeros(size, cs),
            snaps: BTreeMap::new(),
            next_id: 1,
        };
        let mut rng = Rng::new(77 + k as u64);
        let mut img = t.open();
        for step in 0..steps {
            let ctx = format!("config {k}, step {step}");
            let roll = rng.below(100);
            let snapshot_op = roll >= 70;
            match roll {
                0..=59 => scribble(&img, &mut m.disk, &mut rng, false, 2),
                60..=64 => {
                    let new = rng.range(1, 9) * MIB / 2;
                    img.resize(new).unwrap();
                    m.disk.resize(new);
                }
                65..=69 => {
                    img.close().unwrap();
                    img = t.open();
                }
                70..=81 => {
                    let name = format!("n{}", rng.below(4));
                    match img.create_snapshot(&name) {
                        Ok(s) => {
                            assert_eq!(s.id, m.next_id.to_string(), "{ctx}");
                            m.snaps.insert(m.next_id, (name, m.disk.data.clone()));
                            m.next_id += 1;
                        }
                        Err(e) => panic!("{ctx}: create: {e}"),
                    }
                }
                82..=90 if !m.snaps.is_empty() => {
                    let ids: Vec<u64> = m.snaps.keys().copied().collect();
                    let id = *rng.pick(&ids);
                    img.apply_snapshot(SnapshotRef::Id(id.to_string())).unwrap();
                    let data = m.snaps[&id].1.clone();
                    m.disk.resize(data.len() as u64);
                    m.disk.data = data;
                }
                _ if !m.snaps.is_empty() => {
                    let ids: Vec<u64> = m.snaps.keys().copied().collect();
                    let id = *rng.pick(&ids);
                    img.delete_snapshot(SnapshotRef::Id(id.to_string()))
                        .unwrap();
                    m.snaps.remove(&id);
                }
                _ => {}
            }
            // The next ID is the highest plus one, so deleting the newest reuses its ID.
            m.next_id = m.snaps.keys().next_back().map_or(1, |i| i + 1);
            let list: Vec<(u64, String)> = img
                .snapshots()
                .iter()
                .map(|s| (s.id.parse().unwrap(), s.name.clone()))
                .collect();
            let want: Vec<(u64, String)> =
                m.snaps.iter().map(|(i, (n, _))| (*i, n.clone())).collect();
            assert_eq!(list, want, "{ctx}");
            assert_same(&ctx, &read_disk(&img), &m.disk.data);
            if snapshot_op || step % 5 == 0 {
                assert_our_clean(&img, &ctx);
                img.flush().unwrap();
                let dup = path_in(&dir, "copy.qcow2");
                std::fs::copy(&t.path, &dup).unwrap();
                if !lazy {
                    // A lazy-refcount image is dirty while open: qemu-img checks it at the end.
                    let c = Img {
                        path: dup,
                        encrypted: false,
                    };
                    c.assert_qemu_no_corruption(&ctx);
                }
            }
        }
        img.close().unwrap();
        t.assert_qemu_clean(&format!("config {k}: at the end"));
        for (id, (_, data)) in &m.snaps {
            let ctx = format!("config {k}: snapshot {id}");
            assert_same(
                &format!("{ctx}, our view"),
                &read_disk(&t.view(SnapshotRef::Id(id.to_string()))),
                data,
            );
            // qemu-img reads a snapshot at the image's current size (our views take the size
            // the snapshot recorded): compare what both cover, zeros past the snapshot's end.
            let q = t.qemu_raw(&dir, Some(&id.to_string()));
            let n = q.len().min(data.len());
            assert_same(&format!("{ctx}, qemu-img"), &q[..n], &data[..n]);
            assert!(
                q[n..].iter().all(|&b| b == 0),
                "{ctx}: qemu-img past the end"
            );
        }
    }
}
