//! Secrets, the way qemu-img users already pass them: `--object secret,id=ID,data=...|file=...`
//! referred to by `-o encrypt.key-secret=ID` or by `--image-opts driver=qcow2,file.filename=F,
//! encrypt.key-secret=ID`; plus the short forms `--password-file FILE` (the image, or convert's
//! source) and `--target-password-file FILE` (convert's target).
//!
//! A password never has to be on the command line (`file=` and `--password-file` read it from a
//! file); `data=` exists for tests, as in qemu. Passwords are kept as [`qcow2rs::Password`]
//! (wiped on drop) and never printed.

use std::collections::HashMap;

use clap::Args;
use qcow2rs::{Format, OpenOptions, Password};

use crate::util::{CliError, CliResult};

/// The secret options every subcommand that opens an image takes.
#[derive(Args, Clone, Default)]
pub struct SecretArgs {
    /// Define a secret: secret,id=ID,data=PASSWORD or secret,id=ID,file=FILE[,format=raw|base64]
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// The image argument is an option string: driver=qcow2,file.filename=FILE,encrypt.key-secret=ID
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Read the image's password from FILE: its exact bytes, as qemu's secret file= reads them
    /// (a trailing newline is part of the password: write the file with printf, not echo)
    #[arg(long = "password-file", value_name = "FILE")]
    pub password_file: Option<String>,
}

/// The secrets defined with `--object`.
pub struct Secrets(HashMap<String, Password>);

/// An image named on the command line, with what its options say.
pub struct ImageRef {
    /// The file.
    pub path: String,
    /// `driver=` (`-f` otherwise).
    pub fmt: Option<Format>,
    /// The image's password.
    pub password: Option<Password>,
    /// The backing file's password (`backing.encrypt.key-secret=`).
    pub backing_password: Option<Password>,
}

impl ImageRef {
    /// `base` with this image's passwords.
    pub fn open_options(&self, base: OpenOptions) -> OpenOptions {
        OpenOptions {
            password: self.password.clone(),
            backing_password: self.backing_password.clone(),
            ..base
        }
    }
}

/// Split `a=b,c=d` (`,,` is a literal comma) into pairs; a bare `key` means `key=on`.
pub fn split_opts(s: &str) -> Vec<(String, String)> {
    crate::opts::split_escaped(s)
        .into_iter()
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (item, "on".to_string()),
        })
        .collect()
}

/// Read a password file: its exact bytes, as qemu's `secret,file=` reads them, so that the
/// same file works with both tools.
pub fn read_password_file(path: &str) -> CliResult<Password> {
    let b = std::fs::read(path).map_err(|e| {
        CliError::new(format!(
            "Unable to read {path}: {}",
            crate::util::io_text(&e)
        ))
    })?;
    Ok(Password::new(b))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl SecretArgs {
    /// The secrets of the `--object` options.
    pub fn secrets(&self) -> CliResult<Secrets> {
        let mut map = HashMap::new();
        for def in &self.object {
            let items = split_opts(def);
            let kind = items.first().map(|(k, v)| {
                if v == "on" {
                    k.clone()
                } else {
                    format!("{k}={v}")
                }
            });
            match kind.as_deref() {
                Some("secret") => {}
                Some(other) => {
                    return Err(CliError::new(format!(
                        "Invalid object type '{other}' (qcow2rs knows 'secret')"
                    )))
                }
                None => return Err(CliError::new("Parameter 'qom-type' is missing")),
            }
            let get = |k: &str| {
                items[1..]
                    .iter()
                    .rev()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.as_str())
            };
            for (k, _) in &items[1..] {
                if !["id", "data", "file", "format"].contains(&k.as_str()) {
                    return Err(CliError::new(format!("Property 'secret.{k}' not found")));
                }
            }
            let id = get("id").ok_or_else(|| CliError::new("Parameter 'id' is missing"))?;
            let raw = match (get("data"), get("file")) {
                (Some(d), None) => Password::from(d),
                (None, Some(f)) => read_password_file(f)?,
                _ => return Err(CliError::new("Either 'file' or 'data' must be provided")),
            };
            let pw = match get("format").unwrap_or("raw") {
                "raw" => raw,
                "base64" => {
                    let text = String::from_utf8_lossy(raw.as_bytes()).into_owned();
                    Password::new(base64_decode(&text).ok_or_else(|| {
                        CliError::new(format!("Unable to decode base64 data of secret '{id}'"))
                    })?)
                }
                f => {
                    return Err(CliError::new(format!(
                        "Parameter 'format' does not accept value '{f}'"
                    )))
                }
            };
            if map.insert(id.to_string(), pw).is_some() {
                return Err(CliError::new(format!(
                    "attempt to add duplicate property '{id}' to object"
                )));
            }
        }
        Ok(Secrets(map))
    }

    /// The image named by `arg` (a file name, or with `--image-opts` an option string), with
    /// its passwords from the options, or from `--password-file`.
    pub fn image(&self, arg: &str) -> CliResult<ImageRef> {
        let secrets = self.secrets()?;
        let mut r = image_ref(arg, self.image_opts, &secrets)?;
        if let Some(f) = &self.password_file {
            r.password = Some(read_password_file(f)?);
        }
        Ok(r)
    }
}

impl Secrets {
    /// The secret `id` (`file` names the image in the message).
    pub fn get(&self, id: &str, file: &str) -> CliResult<Password> {
        self.0
            .get(id)
            .cloned()
            .ok_or_else(|| CliError::new(format!("{file}: No secret with id '{id}'")))
    }
}

/// Parse an image argument.
pub fn image_ref(arg: &str, image_opts: bool, secrets: &Secrets) -> CliResult<ImageRef> {
    if !image_opts {
        return Ok(ImageRef {
            path: arg.to_string(),
            fmt: None,
            password: None,
            backing_password: None,
        });
    }
    let mut r = ImageRef {
        path: String::new(),
        fmt: None,
        password: None,
        backing_password: None,
    };
    let mut key = None;
    let mut backing_key = None;
    for (k, v) in split_opts(arg) {
        match k.as_str() {
            "driver" => r.fmt = Some(crate::disk::parse_format(&v)?),
            "file.filename" | "file" | "filename" => r.path = v,
            "file.driver" if v == "file" => {}
            "encrypt.key-secret" => key = Some(v),
            "backing.encrypt.key-secret" => backing_key = Some(v),
            "encrypt.format" => {}
            _ => {
                return Err(CliError::new(format!(
                    "Invalid option '{k}' in --image-opts '{arg}' (qcow2rs knows driver, file.filename, encrypt.key-secret, backing.encrypt.key-secret)"
                )))
            }
        }
    }
    if r.path.is_empty() {
        return Err(CliError::new(format!(
            "--image-opts '{arg}' names no file (file.filename=...)"
        )));
    }
    if let Some(id) = key {
        r.password = Some(secrets.get(&id, &r.path)?);
    }
    if let Some(id) = backing_key {
        r.backing_password = Some(secrets.get(&id, &r.path)?);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_image_opts() {
        let a = SecretArgs {
            object: vec![
                "secret,id=s0,data=pa,,ss".into(),
                "secret,id=s1,data=aGVsbG8=,format=base64".into(),
            ],
            image_opts: true,
            password_file: None,
        };
        let s = a.secrets().unwrap();
        assert_eq!(s.get("s0", "f").unwrap().as_bytes(), b"pa,ss");
        assert_eq!(s.get("s1", "f").unwrap().as_bytes(), b"hello");
        assert!(s.get("nope", "f").is_err());
        let r = a
            .image("driver=qcow2,file.filename=x.qcow2,encrypt.key-secret=s0")
            .unwrap();
        assert_eq!(r.path, "x.qcow2");
        assert_eq!(r.fmt, Some(Format::Qcow2));
        assert_eq!(r.password.unwrap().as_bytes(), b"pa,ss");
        assert!(a.image("driver=qcow2,bogus=1,file.filename=x").is_err());
        let bad = SecretArgs {
            object: vec!["tls-creds,id=x".into()],
            ..SecretArgs::default()
        };
        assert!(bad.secrets().is_err());
    }
}
