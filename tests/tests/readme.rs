//! The README's C example, run as printed. The program is the ```` ```c ```` block of the "C"
//! section and the commands are the lines of the ```` ```sh ```` block after it, both taken from
//! README.md verbatim: a change to either that breaks the example fails here.
//!
//! The README tells the user to run the commands from the repository root. Here `cargo ...` lines
//! run in the repository root; the other lines run in a scratch directory that stands in for it:
//! it holds `demo.c` and symlinks `include` and `target` to the repository's, so `-Iinclude`,
//! `-Ltarget/release` and `"$PWD/target/release"` resolve as they do for the user, and `demo` and
//! `disk.qcow2` are written there rather than into the checkout. `LD_LIBRARY_PATH` (which `cargo
//! test` points at `target/debug`, where a debug `libqcow2rs.so` lives) is removed, so the program
//! must find the library by itself, as it must for a user.
//!
//! (The Rust example is a doctest of this crate, see lib.rs; the command-line example is run by
//! cli/tests/readme.rs and the Python one by python/tests/test_readme.py.)

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2rs::{Image, OpenOptions};
use qcow2rs_tests::{qemu_img, run};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate is inside the workspace")
        .to_path_buf()
}

/// The target directory (as in c_api.rs): `CARGO_TARGET_DIR`, else the directory holding
/// `<profile>/deps/<this test>`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return workspace_root().join(dir);
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?.parent()?.parent()?.to_path_buf();
        dir.join("CACHEDIR.TAG").exists().then_some(dir)
    });
    from_exe.unwrap_or_else(|| workspace_root().join("target"))
}

/// The fenced code blocks of the README section headed `heading`, as (info string, body).
fn section_blocks(heading: &str) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let mut lines = readme
        .lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "));
    let mut blocks = Vec::new();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            blocks.push((info.to_string(), body.join("\n") + "\n"));
        }
    }
    assert!(
        !blocks.is_empty(),
        "README.md has no code block under `{heading}`"
    );
    blocks
}

/// The one block of language `lang` in `blocks`.
fn only_block<'a>(blocks: &'a [(String, String)], lang: &str) -> &'a str {
    let found: Vec<&str> = blocks
        .iter()
        .filter(|(info, _)| info == lang)
        .map(|(_, body)| body.as_str())
        .collect();
    assert_eq!(found.len(), 1, "want one ```{lang} block in the C section");
    found[0]
}

#[test]
fn readme_c_example_builds_and_runs_as_printed() {
    let blocks = section_blocks("## C");
    let program = only_block(&blocks, "c");
    let commands = only_block(&blocks, "sh");

    let root = workspace_root();
    let target = target_dir();
    let scratch = tempfile::Builder::new()
        .prefix("qcow2rs-readme-c-")
        .tempdir()
        .unwrap();
    let dir = scratch.path();
    std::fs::write(dir.join("demo.c"), program).unwrap();
    std::os::unix::fs::symlink(root.join("include"), dir.join("include")).unwrap();
    std::os::unix::fs::symlink(&target, dir.join("target")).unwrap();

    // `cargo` on PATH is the one running this test.
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(cargo_dir) = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .and_then(|c| c.parent().map(Path::to_path_buf))
    {
        let mut p = cargo_dir.into_os_string();
        p.push(":");
        p.push(&path);
        path = p;
    }

    let mut last = None;
    for line in commands.lines().filter(|l| !l.trim().is_empty()) {
        let cwd = if line.starts_with("cargo ") {
            &root
        } else {
            dir
        };
        let r = run(Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(cwd)
            .env("PATH", &path)
            .env_remove("LD_LIBRARY_PATH"));
        assert_eq!(
            r.code,
            0,
            "README C example: `{line}` (in {}) failed\n{r}",
            cwd.display()
        );
        last = Some(r);
    }
    let last = last.expect("the README's C commands are empty");
    assert_eq!(
        last.stdout, "hello, qcow2\n",
        "the README's C program should print what it read back\n{last}"
    );

    // The example is also warning-free C11.
    let r = run(Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
        ])
        .arg(root.join("include"))
        .arg(dir.join("demo.c")));
    assert_eq!(r.code, 0, "the README's C program has warnings\n{r}");

    let image = dir.join("disk.qcow2");
    assert!(image.exists(), "the README's C program made no disk.qcow2");
    let check = qemu_img(&["check", "-f", "qcow2", image.to_str().unwrap()]);
    assert!(
        check.code == 0 && check.stdout.contains("No errors were found on the image."),
        "qemu-img check does not call the README's disk.qcow2 clean\n{check}"
    );
    let img = Image::open(&image, &OpenOptions::read_only()).unwrap();
    assert_eq!(img.virtual_size(), 1 << 30);
    let mut buf = [0u8; 12];
    img.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(&buf, b"hello, qcow2");
    img.close().unwrap();
}
