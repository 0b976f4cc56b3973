//! The C ABI from the outside: builds `libqcow2rs` (`cargo build -p qcow2rs-capi`), checks that the
//! committed header is what cbindgen generates, compiles the header as C11 and C++17, and compiles the
//! C programs in `tests/c/` against the shared and the static library and runs them (under valgrind
//! when it is installed).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The cbindgen version the committed header is generated with (see capi/cbindgen.toml).
const CBINDGEN_VERSION: &str = "0.29.4";

/// The warning flags every C program is compiled with.
const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"];

/// The C programs, each run with a scratch directory as its only argument.
const PROGRAMS: &[&str] = &[
    "test_basic",
    "test_threads",
    "test_encryption",
    "test_snapshots",
    "test_api",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate is inside the workspace")
        .to_path_buf()
}

/// The target directory this test was built in: `CARGO_TARGET_DIR`, else the directory holding
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

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd` and panic with its full output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let desc = describe(cmd);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
    if !out.status.success() {
        panic!(
            "`{desc}` failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Whether `program --version` runs, and its output.
fn tool_version(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Build the C library once per test process; returns the directory holding libqcow2rs.{so,a}.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target = target_dir();
        run(Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "-p", "qcow2rs-capi", "--target-dir"])
            .arg(&target));
        let dir = target.join("debug");
        for lib in ["libqcow2rs.so", "libqcow2rs.a"] {
            assert!(
                dir.join(lib).exists(),
                "{} was not built",
                dir.join(lib).display()
            );
        }
        dir
    })
}

fn include_dir() -> PathBuf {
    workspace_root().join("include")
}

fn c_dir() -> PathBuf {
    workspace_root().join("tests").join("c")
}

/// Where compiled C programs go.
fn build_dir() -> PathBuf {
    let dir = target_dir().join("c-tests");
    std::fs::create_dir_all(&dir).expect("create the C build directory");
    dir
}

#[test]
fn header_is_up_to_date() {
    let Some(version) = tool_version("cbindgen") else {
        eprintln!("cbindgen is not on PATH: not checking include/qcow2rs.h");
        return;
    };
    if !version.contains(CBINDGEN_VERSION) {
        eprintln!(
            "cbindgen is {}, the header is pinned to {CBINDGEN_VERSION}: not checking it",
            version.trim()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("qcow2rs.h");
    run(Command::new("cbindgen")
        .current_dir(workspace_root())
        .args([
            "--quiet",
            "--config",
            "capi/cbindgen.toml",
            "--crate",
            "qcow2rs-capi",
            "--output",
        ])
        .arg(&fresh)
        .arg("capi"));
    let committed = include_dir().join("qcow2rs.h");
    let want = std::fs::read(&fresh).unwrap();
    let have = std::fs::read(&committed).unwrap_or_default();
    if want != have {
        let diff = Command::new("diff")
            .arg("-u")
            .arg(&committed)
            .arg(&fresh)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|_| "(diff not available)".to_string());
        panic!(
            "include/qcow2rs.h is stale; regenerate it from the workspace root with\n  \
             cbindgen --quiet --config capi/cbindgen.toml --crate qcow2rs-capi \
             --output include/qcow2rs.h capi\n{diff}"
        );
    }
}

/// The functions `include/qcow2rs.h` declares, sorted.
fn header_functions() -> Vec<String> {
    let header = std::fs::read_to_string(include_dir().join("qcow2rs.h")).unwrap();
    let mut names: Vec<String> = header
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('#') && !l.starts_with('*'))
        .filter_map(|l| {
            // `enum qcow2_error qcow2_read(...`, `const char *qcow2_version(void);`
            let before = &l[..l.find('(')?];
            let name = before.split_whitespace().last()?.trim_start_matches('*');
            (name.starts_with("qcow2_")
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .then(|| name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The ABI check: the symbols `libqcow2rs.so` exports are exactly those listed in
/// `capi/symbols.txt` (sorted), and exactly the functions the header declares. A new export must be
/// added to the list on purpose (regenerate it with
/// `nm -D --defined-only target/debug/libqcow2rs.so | awk '{print $3}' | sort > capi/symbols.txt`);
/// a removed or renamed one breaks C callers and shows up here as a diff.
#[test]
fn exported_symbols_are_the_committed_list() {
    let lib = lib_dir().join("libqcow2rs.so");
    let out = run(Command::new("nm").args(["-D", "--defined-only"]).arg(&lib));
    let mut exported: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    exported.sort();
    exported.dedup();
    let list_path = workspace_root().join("capi").join("symbols.txt");
    let committed: Vec<String> = std::fs::read_to_string(&list_path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let diff = |want: &[String], have: &[String]| -> String {
        let mut d = String::new();
        for w in want.iter().filter(|w| !have.contains(w)) {
            d.push_str(&format!("-{w}\n"));
        }
        for h in have.iter().filter(|h| !want.contains(h)) {
            d.push_str(&format!("+{h}\n"));
        }
        d
    };
    assert!(
        exported == committed,
        "{} exports other symbols than {} lists (- listed but not exported, + exported but not \
         listed):\n{}",
        lib.display(),
        list_path.display(),
        diff(&committed, &exported)
    );
    let declared = header_functions();
    assert!(
        declared == committed,
        "include/qcow2rs.h declares other functions than {} lists (- listed, not declared; + \
         declared, not listed):\n{}",
        list_path.display(),
        diff(&committed, &declared)
    );
}

/// Every exported function is called by at least one C test program.
#[test]
fn every_exported_function_is_called_from_c() {
    let mut sources = String::new();
    for entry in std::fs::read_dir(c_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension() == Some(OsStr::new("c")) && !path.ends_with("test_header.c") {
            sources.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    let list = std::fs::read_to_string(workspace_root().join("capi").join("symbols.txt")).unwrap();
    let uncalled: Vec<&str> = list
        .lines()
        .filter(|f| !sources.contains(&format!("{f}(")))
        .collect();
    assert!(
        uncalled.is_empty(),
        "no C test in tests/c/ calls {uncalled:?}"
    );
}

#[test]
fn header_compiles_as_c11_and_cpp17_and_twice() {
    let src = c_dir().join("test_header.c");
    run(Command::new("gcc")
        .args(C_FLAGS)
        .args(["-pedantic", "-fsyntax-only", "-I"])
        .arg(include_dir())
        .arg(&src));
    run(Command::new("g++")
        .args([
            "-x",
            "c++",
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(include_dir())
        .arg(&src));
}

#[derive(Clone, Copy, Debug)]
enum Link {
    Shared,
    Static,
}

/// Compile `tests/c/<name>.c` against the library; returns the executable.
fn compile(name: &str, link: Link) -> PathBuf {
    let lib = lib_dir();
    let exe = build_dir().join(format!("{name}-{link:?}").to_lowercase());
    let mut cmd = Command::new("gcc");
    cmd.args(C_FLAGS)
        .arg("-pthread")
        .arg("-I")
        .arg(include_dir())
        .arg(c_dir().join(format!("{name}.c")))
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Shared => {
            let mut rpath = OsStr::new("-Wl,-rpath,").to_os_string();
            rpath.push(lib);
            cmd.arg("-L").arg(lib).arg("-lqcow2rs").arg(rpath);
        }
        // The static library needs what Rust's std links (`rustc --print native-static-libs`).
        Link::Static => {
            cmd.arg(lib.join("libqcow2rs.a")).args([
                "-lgcc_s",
                "-lutil",
                "-lrt",
                "-lpthread",
                "-lm",
                "-ldl",
                "-lc",
            ]);
        }
    }
    run(&mut cmd);
    exe
}

/// Run a compiled program with a fresh scratch directory, under valgrind when installed.
fn run_program(exe: &Path) {
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = if tool_version("valgrind").is_some() {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=1",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect,possible",
        ])
        .arg(exe);
        c
    } else {
        eprintln!(
            "valgrind is not installed: running {} directly",
            exe.display()
        );
        Command::new(exe)
    };
    let out = run(cmd.arg(scratch.path()));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn c_programs_pass_with_shared_library() {
    for name in PROGRAMS {
        run_program(&compile(name, Link::Shared));
    }
}

#[test]
fn c_programs_pass_with_static_library() {
    for name in PROGRAMS {
        run_program(&compile(name, Link::Static));
    }
}
