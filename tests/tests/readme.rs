//! The README's C example, run as printed. The program is the ```` ```c ```` block of the "C"
//! section and the commands are the lines of the ```` ```sh ```` block after it, both taken from
//! README.md verbatim: a change to either that breaks the example fails here.
//!
//! The README tells the user to run the commands from the repository root. Here `cargo ...` and
//! `./scripts/...` lines run in the repository root; the other lines run in a scratch directory that
//! stands in for it: it holds `demo.c` and symlinks `include` and `target` to the repository's, and
//! `demo` and `disk.qcow2` are written there rather than into the checkout. The install script
//! installs into a temporary user prefix (`PREFIX`, no root needed), and `PKG_CONFIG_PATH` points at
//! its `lib/pkgconfig`, as the script tells a user to set it. `LD_LIBRARY_PATH` (which `cargo test`
//! points at `target/debug`, where a debug `libqcow2rs.so` lives) is removed, so the program must
//! find the installed library by itself (through the rpath in the user prefix's `qcow2rs.pc`), as
//! it must for a user. The test then checks what was installed: the soname `libqcow2rs.so.0`, the
//! symlink chain, no debug information in the installed library, and a program that needs
//! `libqcow2rs.so.0` from the prefix, not from the build tree.
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
    let prefix = dir.join("prefix");
    let pkg_config_path = prefix.join("lib").join("pkgconfig");
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
        let cwd = if line.starts_with("cargo ") || line.starts_with("./scripts/") {
            &root
        } else {
            dir
        };
        let r = run(Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(cwd)
            .env("PATH", &path)
            .env("PREFIX", &prefix)
            .env("PKG_CONFIG_PATH", &pkg_config_path)
            .env("CARGO_TARGET_DIR", &target)
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

    check_installed(&prefix, &dir.join("demo"));

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

/// What `scripts/install-c.sh` put into `prefix`, and how `exe` (built with pkg-config) uses it.
fn check_installed(prefix: &Path, exe: &Path) {
    let lib = prefix.join("lib");
    let real = lib.join(format!("libqcow2rs.so.{}", env!("CARGO_PKG_VERSION")));
    for (link, to) in [
        ("libqcow2rs.so", "libqcow2rs.so.0"),
        (
            "libqcow2rs.so.0",
            real.file_name().unwrap().to_str().unwrap(),
        ),
    ] {
        let target = std::fs::read_link(lib.join(link))
            .unwrap_or_else(|e| panic!("{} is not a symlink: {e}", lib.join(link).display()));
        assert_eq!(target, Path::new(to), "{link} should point at {to}");
    }
    for file in [
        lib.join("libqcow2rs.a"),
        prefix.join("include").join("qcow2rs.h"),
        lib.join("pkgconfig").join("qcow2rs.pc"),
    ] {
        assert!(file.is_file(), "{} was not installed", file.display());
    }

    let dynamic = run(Command::new("readelf").arg("-d").arg(&real));
    assert_eq!(dynamic.code, 0, "readelf -d failed\n{dynamic}");
    assert!(
        dynamic.stdout.contains("Library soname: [libqcow2rs.so.0]"),
        "the installed library's soname is not libqcow2rs.so.0\n{dynamic}"
    );
    let sections = run(Command::new("readelf").arg("-S").arg("-W").arg(&real));
    assert_eq!(sections.code, 0, "readelf -S failed\n{sections}");
    assert!(
        sections.stdout.contains(".dynsym") && !sections.stdout.contains(".debug_info"),
        "the installed library should carry no debug information\n{sections}"
    );

    let needed = run(Command::new("readelf").arg("-d").arg(exe));
    assert!(
        needed
            .stdout
            .contains("Shared library: [libqcow2rs.so.0]")
            && needed.stdout.contains(&format!("[{}]", lib.display())),
        "the README's program should need libqcow2rs.so.0 with the prefix's lib/ as its run path\n{needed}"
    );
}
