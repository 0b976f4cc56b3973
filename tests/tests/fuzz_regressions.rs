//! Replays every input kept in `tests/fuzz-regressions/<target>/` through the body of fuzz
//! target `<target>` (`qcow2rs::fuzzing`, shared with `fuzz/fuzz_targets/`), in the ordinary
//! `cargo test`: no cargo-fuzz and no nightly needed. Each file there is a finding of the
//! fuzzers (minimized with `cargo fuzz tmin`), kept after its fix, or a small seed. An input
//! fails the test when the target panics on it or when it takes longer than the fuzzers'
//! time limit allows (scaled for an unoptimized build).

use std::path::Path;
use std::time::{Duration, Instant};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("header", qcow2rs::fuzzing::header),
    ("open_read", qcow2rs::fuzzing::open_read),
    ("check_repair", qcow2rs::fuzzing::check_repair),
    ("mutate", qcow2rs::fuzzing::mutate),
];

/// libFuzzer runs with `-timeout=1` on an optimized build; tests build with opt-level 1.
const LIMIT: Duration = Duration::from_secs(20);

fn replay(name: &str, target: Target) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-regressions")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let start = Instant::now();
        let r = std::panic::catch_unwind(|| target(&data));
        let took = start.elapsed();
        if r.is_err() {
            failed.push(format!("{}: panicked", f.display()));
        } else if took > LIMIT {
            failed.push(format!("{}: took {took:?}", f.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target {name}:\n{}",
        failed.join("\n")
    );
    files.len()
}

#[test]
fn header() {
    assert!(replay("header", TARGETS[0].1) > 0);
}

#[test]
fn open_read() {
    assert!(replay("open_read", TARGETS[1].1) > 0);
}

#[test]
fn check_repair() {
    assert!(replay("check_repair", TARGETS[2].1) > 0);
}

#[test]
fn mutate() {
    assert!(replay("mutate", TARGETS[3].1) > 0);
}

/// Empty and truncated inputs, for each target's own decoding of its input.
#[test]
fn short_inputs_are_harmless() {
    for data in [
        &b""[..],
        &[0u8][..],
        &[1u8, 3][..],
        &[2u8; 600][..],
        &[3u8; 64][..],
    ] {
        for (_, t) in TARGETS {
            t(data);
        }
    }
}
