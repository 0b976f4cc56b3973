//! Gives the shared library an ELF soname, `libqcow2rs.so.<major>` (`libqcow2rs.so.0` while the
//! version is 0.x), as C libraries have: a program linked with `-lqcow2rs` then records
//! `NEEDED libqcow2rs.so.0`, and `scripts/install-c.sh` installs the usual chain
//! `libqcow2rs.so -> libqcow2rs.so.0 -> libqcow2rs.so.0.1.0`. (cargo-c does the same for other
//! crates; see README "Installing the C library" for why it is not used here.)
//!
//! Since such programs look for `libqcow2rs.so.0` at run time, this script also puts a symlink
//! `libqcow2rs.so.0 -> libqcow2rs.so` beside cargo's output (`target/<profile>/`), so that
//! programs linked against the build tree (the C API tests, `-Wl,-rpath,target/release`) run.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let family = env::var("CARGO_CFG_TARGET_FAMILY").unwrap_or_default();
    // ELF platforms with GNU-style linkers; macOS (install_name) and Windows have no soname.
    if family != "unix" || os == "macos" || os == "ios" {
        return;
    }
    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets CARGO_PKG_VERSION_MAJOR");
    let soname = format!("libqcow2rs.so.{major}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: the profile directory, where cargo
    // puts libqcow2rs.so, is three levels up.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let Some(profile_dir) = out_dir.ancestors().nth(3) else {
        return;
    };
    if out_dir.ancestors().nth(2).and_then(|d| d.file_name()) != Some("build".as_ref()) {
        return; // an unfamiliar layout: leave it alone
    }
    let link = profile_dir.join(&soname);
    if std::fs::symlink_metadata(&link).is_err() {
        // Dangling until the library is linked; a failure only affects running from the tree.
        if let Err(e) = std::os::unix::fs::symlink("libqcow2rs.so", &link) {
            println!("cargo:warning=could not create {}: {e}", link.display());
        }
    }
}
