//! Helpers for running `qcow2rs` and the real `qemu-img` side by side.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Output of a command, with text fields.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// Panic with the whole output unless the exit code is `code`.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.stderr);
        self
    }
}

fn run(prog: &str, dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {prog}: {e} (qemu-img is required for these tests)")
        });
    Run::from(out)
}

/// Run `prog` in `dir` with extra environment variables (`None` removes one).
pub fn run_env(prog: &str, dir: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> Run {
    let mut cmd = Command::new(prog);
    cmd.args(args).current_dir(dir);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    Run::from(out)
}

/// Our binary's path.
pub fn ours_exe() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2rs")
}

/// Run our binary in `dir`.
pub fn ours(dir: &Path, args: &[&str]) -> Run {
    run(env!("CARGO_BIN_EXE_qcow2rs"), dir, args)
}

/// Run the real qemu-img in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Run {
    run("qemu-img", dir, args)
}

/// Run qemu-io in `dir`.
pub fn qemu_io(dir: &Path, args: &[&str]) -> Run {
    run("qemu-io", dir, args)
}

/// A fresh temporary directory.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Deterministic test data: compressible text, incompressible noise and zeros, by region.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let block = 64 * 1024;
    for (i, chunk) in out.chunks_mut(block).enumerate() {
        match (i as u64 + seed) % 4 {
            0 => {
                let text = format!("block {i} of the qcow2rs test pattern, compressible text. ");
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
            1 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            2 => {} // zeros
            _ => {
                // mostly zeros with a few bytes set
                chunk[chunk.len() / 2] = 0xab;
                chunk[0] = i as u8 | 1;
            }
        }
    }
    out
}

/// Write `data` to `dir/name`, returning the path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Parse JSON output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

/// Big-endian u64 at `off` in a file.
pub fn peek_be64(path: &Path, off: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

/// Write bytes at `off` in a file (a small hex poker, like qemu-iotests' poke_file).
pub fn poke(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}
