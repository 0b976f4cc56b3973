//! `bench` against the real `qemu-img bench`: same flags, same summary lines, plus an
//! fdatasync count within the budgets of the design (DESIGN.md, "Ordered metadata flushing").

mod common;

use std::path::Path;

use common::*;

/// The fdatasync figures of our summary: (fdatasyncs, flushes).
fn syncs(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("fdatasyncs: "))
        .unwrap_or_else(|| panic!("no fdatasyncs line in:\n{out}"));
    let n: u64 = line["fdatasyncs: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let flushes = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" flushes"))
        .map_or(0, |f| f.parse().unwrap());
    (n, flushes)
}

/// Our output has qemu-img's lines first (the time aside), then the fdatasync line.
fn same_summary(ours: &str, theirs: &str) {
    let o: Vec<&str> = ours.lines().collect();
    let t: Vec<&str> = theirs.lines().collect();
    assert_eq!(o.len(), t.len() + 1, "ours:\n{ours}\nqemu-img:\n{theirs}");
    let n = t.len();
    assert_eq!(o[..n - 1], t[..n - 1]);
    for l in [o[n - 1], t[n - 1]] {
        let secs = l
            .strip_prefix("Run completed in ")
            .and_then(|s| s.strip_suffix(" seconds."))
            .unwrap_or_else(|| panic!("bad line {l:?}"));
        let (_, frac) = secs.split_once('.').unwrap();
        assert_eq!(frac.len(), 3, "{l}");
        secs.parse::<f64>().unwrap();
    }
}

fn fresh(dir: &Path, name: &str, size: &str) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, size]).expect(0);
}

#[test]
fn summary_lines_like_qemu_img() {
    let d = tmp();
    let dir = d.path();
    fresh(dir, "a.qcow2", "64M");
    fresh(dir, "b.qcow2", "64M");
    let cases: &[&[&str]] = &[
        &["-c", "300", "-d", "4"],
        &["-c", "100", "-s", "8k", "-o", "1M", "-S", "192k"],
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "8",
            "--flush-interval",
            "32",
            "--pattern",
            "0x5a",
        ],
        &[
            "-w",
            "-c",
            "50",
            "-d",
            "1",
            "-t",
            "writethrough",
            "-S",
            "69632",
        ],
    ];
    for args in cases {
        let mut a = vec!["bench"];
        a.extend_from_slice(args);
        let mut o = a.clone();
        o.push("a.qcow2");
        let mut t = a.clone();
        t.push("b.qcow2");
        let ours = ours(dir, &o).expect(0).stdout;
        let theirs = qemu_img(dir, &t).expect(0).stdout;
        same_summary(&ours, &theirs);
    }
    // Both images hold the same data and are clean.
    qemu_img(dir, &["check", "a.qcow2"]).expect(0);
    let c = qemu_img(dir, &["compare", "a.qcow2", "b.qcow2"]).expect(0);
    assert_eq!(c.stdout, "Images are identical.\n");
}

#[test]
fn fdatasyncs_within_budget() {
    let d = tmp();
    let dir = d.path();
    fresh(dir, "w.qcow2", "256M");
    // 256 writes of 4 KiB, each in its own new cluster (step 17 blocks of 4 KiB), flush every
    // 64, 8 in flight. writeback: at most 2 fdatasyncs per flush that follows allocations.
    let args = [
        "bench",
        "-w",
        "-c",
        "256",
        "-d",
        "8",
        "--flush-interval",
        "64",
        "-S",
        "69632",
        "w.qcow2",
    ];
    let out = ours(dir, &args).expect(0).stdout;
    assert!(out.contains("Sending flush every 64 requests\n"), "{out}");
    let (n, flushes) = syncs(&out);
    assert_eq!(flushes, 4, "{out}");
    assert!(n >= 1 && n <= 2 * flushes, "{out}");
    // The same offsets again: pure overwrites, 1 per flush.
    let out = ours(dir, &args).expect(0).stdout;
    let (n, flushes) = syncs(&out);
    assert!(n <= flushes, "{out}");

    // writethrough: at most 2 per allocating write, 1 per overwrite.
    let wt = [
        "bench",
        "-w",
        "-t",
        "writethrough",
        "-c",
        "40",
        "-d",
        "4",
        "-o",
        "64M",
        "-S",
        "69632",
        "w.qcow2",
    ];
    let out = ours(dir, &wt).expect(0).stdout;
    let (n, flushes) = syncs(&out);
    assert_eq!(flushes, 0);
    assert!(n <= 2 * 40, "{out}");
    let out = ours(dir, &wt).expect(0).stdout;
    assert!(syncs(&out).0 <= 40, "{out}");

    // Reads cost nothing, in any mode.
    for t in ["writeback", "writethrough"] {
        let out = ours(dir, &["bench", "-c", "500", "-t", t, "w.qcow2"])
            .expect(0)
            .stdout;
        assert_eq!(syncs(&out).0, 0, "{out}");
    }
    // unsafe: flushes are ignored.
    let mut a = args.to_vec();
    a.splice(1..1, ["-t", "unsafe"]);
    let out = ours(dir, &a).expect(0).stdout;
    assert_eq!(syncs(&out).0, 0, "{out}");

    qemu_img(dir, &["check", "w.qcow2"]).expect(0);
}

#[test]
fn json_output_and_errors() {
    let d = tmp();
    let dir = d.path();
    fresh(dir, "j.qcow2", "16M");
    let out = ours(
        dir,
        &[
            "bench",
            "--output=json",
            "-w",
            "-c",
            "64",
            "-d",
            "2",
            "--flush-interval",
            "16",
            "j.qcow2",
        ],
    )
    .expect(0)
    .stdout;
    let v = json(&out);
    assert_eq!(v["count"], 64);
    assert_eq!(v["flushes"], 4);
    assert_eq!(v["write"], true);
    assert!(v["fdatasyncs"].as_u64().unwrap() <= 8);
    assert!(v["seconds"].as_f64().unwrap() >= 0.0);

    // --image-opts names the file with options (as for the other subcommands).
    ours(
        dir,
        &[
            "bench",
            "-c",
            "8",
            "--image-opts",
            "driver=qcow2,file.filename=j.qcow2",
        ],
    )
    .expect(0);
    let o = ours(
        dir,
        &[
            "bench",
            "--image-opts",
            "driver=qcow2,bogus=1,file.filename=j.qcow2",
        ],
    )
    .expect(1);
    assert!(o.stderr.contains("Invalid option 'bogus'"), "{}", o.stderr);

    // Same checks and messages as qemu-img.
    let bad: &[&[&str]] = &[
        &["--flush-interval", "4"],
        &["-w", "--flush-interval", "4"],
        &["-c", "0"],
        &["-c", "-1"],
        &["-d", "abc"],
        &["--pattern", "256"],
        &["-t", "bogus"],
        &["-n"],
        &["-s", "1000"],
    ];
    for args in bad {
        let mut a = vec!["bench"];
        a.extend_from_slice(args);
        a.push("j.qcow2");
        let o = ours(dir, &a).expect(1);
        let q = qemu_img(dir, &a).expect(1);
        let msg = |s: &str, prog: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(prog))
                .map(str::to_string)
                .unwrap_or_default()
        };
        assert_eq!(
            msg(&o.stderr, "qcow2rs: "),
            msg(&q.stderr, "qemu-img: "),
            "{args:?}"
        );
    }
}
