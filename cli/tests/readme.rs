//! The README's command-line example, run as printed: every line of the ```` ```sh ```` block of
//! the "Command line" section of README.md, in order, through `sh -c` in a fresh directory with
//! this build's `qcow2rs` first on PATH. Each line must exit 0 (on these fresh images `check` and
//! `compare` report clean and identical), and qemu-img must call the images it leaves clean.

mod common;

use std::path::Path;
use std::process::Command;

use common::{qemu_img, tmp};

/// The lines of the one ```` ```sh ```` block under `## Command line` in README.md.
fn readme_commands() -> Vec<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| *l != "## Command line")
        .skip(1)
        .take_while(|l| !l.starts_with("## "));
    let mut blocks = Vec::new();
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            let body: Vec<String> = lines
                .by_ref()
                .take_while(|l| *l != "```")
                .map(str::to_string)
                .collect();
            blocks.push((line.to_string(), body));
        }
    }
    assert_eq!(
        blocks.len(),
        1,
        "want one code block under `## Command line` in README.md"
    );
    let (fence, body) = blocks.pop().unwrap();
    assert_eq!(
        fence, "```sh",
        "the command-line example should be a ```sh block"
    );
    body.into_iter().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn readme_command_line_example_runs_as_printed() {
    let commands = readme_commands();
    assert!(
        commands.iter().all(|l| l.starts_with("qcow2rs ")),
        "every line of the README's command-line example should run qcow2rs: {commands:?}"
    );
    let exe = Path::new(env!("CARGO_BIN_EXE_qcow2rs"));
    let mut path = exe.parent().unwrap().as_os_str().to_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());

    let dir = tmp();
    for line in &commands {
        let out = Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(dir.path())
            .env("PATH", &path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sh: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "README command-line example: `{line}` exited with {}\nstdout:\n{}\nstderr:\n{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
        );
    }

    for image in ["disk.qcow2", "compressed.qcow2"] {
        let r = qemu_img(dir.path(), &["check", "-f", "qcow2", image]).expect(0);
        assert!(
            r.stdout.contains("No errors were found on the image."),
            "qemu-img check {image}: {}",
            r.stdout
        );
    }
}
