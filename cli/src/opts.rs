//! `-o key=value,...` format options, parsed into [`qcow2rs::CreateOptions`] the way qemu-img
//! parses its create options, and the `Formatting '...'` line qemu-img prints for them.

use qcow2rs::{
    CipherAlg, CipherMode, Compat, CompressionType, CreateOptions, EncryptionFormat,
    EncryptionOptions, HashAlg, IvGenAlg, Password, Preallocation,
};

use crate::util::{parse_size, CliError, CliResult};

/// The options given with one or more `-o`, in order (a later value for a key wins).
#[derive(Debug, Default, Clone)]
pub struct OptList {
    items: Vec<(String, String)>,
}

/// Keys qemu-img knows for qcow2 but qcow2rs does not implement.
const UNSUPPORTED_QCOW2: &[&str] = &["data_file", "data_file_raw"];

/// The encryption options, in the order qemu-img prints them.
const ENCRYPT_KEYS: &[&str] = &[
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

const QCOW2_KEYS: &[&str] = &[
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "lazy_refcounts",
    "refcount_bits",
    "compression_type",
];

const RAW_KEYS: &[&str] = &["size", "preallocation"];

impl OptList {
    /// Parse the `-o` arguments: `key=value` items separated by commas (`,,` is a literal comma);
    /// a bare `key` means `key=on`.
    pub fn parse(args: &[String]) -> CliResult<OptList> {
        let mut items = Vec::new();
        for arg in args {
            for item in split_escaped(arg) {
                if item.is_empty() {
                    continue;
                }
                let (k, v) = match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (item.clone(), "on".to_string()),
                };
                if k == "help" || k == "?" {
                    return Err(CliError::with_code(help_text(), 0));
                }
                items.push((k, v));
            }
        }
        Ok(OptList { items })
    }

    /// The value given for `key`, the last one if given several times.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Set (or replace) a value.
    pub fn set(&mut self, key: &str, value: &str) {
        self.items.retain(|(k, _)| k != key);
        self.items.push((key.to_string(), value.to_string()));
    }

    /// Check that every key is known for `fmt`; `file` prefixes the message like qemu-img's.
    pub fn validate_keys(&self, fmt: qcow2rs::Format, file: &str) -> CliResult<()> {
        let known = match fmt {
            qcow2rs::Format::Qcow2 => QCOW2_KEYS,
            qcow2rs::Format::Raw => RAW_KEYS,
        };
        for (k, _) in &self.items {
            if known.contains(&k.as_str())
                || (fmt == qcow2rs::Format::Qcow2 && ENCRYPT_KEYS.contains(&k.as_str()))
            {
                continue;
            }
            if fmt == qcow2rs::Format::Qcow2 && UNSUPPORTED_QCOW2.contains(&k.as_str()) {
                return Err(CliError::new(format!(
                    "{file}: Parameter '{k}' is not supported by qcow2rs"
                )));
            }
            if fmt == qcow2rs::Format::Raw && (k == "backing_file" || k == "backing_fmt") {
                return Err(CliError::new(format!(
                    "{file}: Backing file not supported for file format 'raw'"
                )));
            }
            return Err(CliError::new(format!("{file}: Invalid parameter '{k}'")));
        }
        Ok(())
    }

    /// Build qcow2 create options (the size is filled in by the caller).
    pub fn to_create_options(&self, file: &str) -> CliResult<CreateOptions> {
        let mut o = CreateOptions::new(0);
        let err = |m: String| CliError::new(format!("{file}: {m}"));
        if let Some(v) = self.get("size") {
            o.size = parse_opt_size("size", v).map_err(err)?;
        }
        if let Some(v) = self.get("cluster_size") {
            let cs = parse_opt_size("cluster_size", v).map_err(err)?;
            o.cluster_size = u32::try_from(cs).map_err(|_| {
                err("Cluster size must be a power of two between 512 and 2048k".into())
            })?;
        }
        if let Some(v) = self.get("refcount_bits") {
            o.refcount_bits = v.parse().map_err(|_| {
                err(format!(
                    "Parameter 'refcount_bits' expects a number, not '{v}'"
                ))
            })?;
        }
        if let Some(v) = self.get("compat") {
            o.compat = Compat::parse(v)
                .map_err(|_| err(format!("Parameter 'version' does not accept value '{v}'")))?;
        }
        if let Some(v) = self.get("lazy_refcounts") {
            o.lazy_refcounts = parse_bool("lazy_refcounts", v).map_err(err)?;
        }
        if let Some(v) = self.get("extended_l2") {
            o.extended_l2 = parse_bool("extended_l2", v).map_err(err)?;
        }
        if let Some(v) = self.get("preallocation") {
            o.preallocation = Preallocation::parse(v).map_err(|_| {
                err(format!(
                    "Parameter 'preallocation' does not accept value '{v}' (qcow2rs supports off and metadata)"
                ))
            })?;
        }
        if let Some(v) = self.get("compression_type") {
            o.compression_type = CompressionType::parse(v).map_err(|_| {
                err(format!(
                    "Parameter 'compression-type' does not accept value '{v}'"
                ))
            })?;
        }
        o.backing_file = self.get("backing_file").map(str::to_string);
        o.backing_format = self.get("backing_fmt").map(str::to_string);
        Ok(o)
    }

    /// The encryption the options ask for (`encrypt.format=luks|aes`, or the legacy
    /// `encryption=on`), with the password from `encrypt.key-secret=ID` or `password` (from
    /// `--password-file`).
    pub fn encryption(
        &self,
        file: &str,
        secrets: &crate::secrets::Secrets,
        password: Option<Password>,
    ) -> CliResult<Option<EncryptionOptions>> {
        let err = |m: String| CliError::new(format!("{file}: {m}"));
        let legacy = match self.get("encryption") {
            Some(v) => parse_bool("encryption", v).map_err(err)?,
            None => false,
        };
        let format = match self.get("encrypt.format") {
            Some(f) => Some(EncryptionFormat::parse(f).map_err(|_| {
                err(format!(
                    "Parameter 'encrypt.format' does not accept value '{f}'"
                ))
            })?),
            None if legacy => Some(EncryptionFormat::Aes),
            None => None,
        };
        let Some(format) = format else {
            if let Some(k) = ENCRYPT_KEYS.iter().find(|k| self.get(k).is_some()) {
                return Err(err(format!(
                    "Parameter '{k}' needs encrypt.format (luks or aes)"
                )));
            }
            return Ok(None);
        };
        if legacy && format != EncryptionFormat::Aes {
            return Err(err(
                "The legacy 'encryption' option only means encrypt.format=aes".into(),
            ));
        }
        let password = match self.get("encrypt.key-secret") {
            Some(id) => secrets.get(id, file)?,
            None => password.ok_or_else(|| {
                err("Parameter 'encrypt.key-secret' is required for cipher".into())
            })?,
        };
        let mut e = EncryptionOptions::luks(password);
        e.format = format;
        // An optional named value: unset keeps the default, a bad name is qemu-img's error.
        fn named<T>(
            o: &OptList,
            key: &str,
            parse: fn(&str) -> Option<T>,
            err: &dyn Fn(String) -> CliError,
        ) -> CliResult<Option<T>> {
            match o.get(key) {
                None => Ok(None),
                Some(v) => parse(v)
                    .map(Some)
                    .ok_or_else(|| err(format!("Parameter '{key}' does not accept value '{v}'"))),
            }
        }
        if let Some(a) = named(self, "encrypt.cipher-alg", CipherAlg::parse, &err)? {
            e.cipher_alg = a;
        }
        if let Some(m) = named(self, "encrypt.cipher-mode", CipherMode::parse, &err)? {
            e.cipher_mode = m;
        }
        if let Some(g) = named(self, "encrypt.ivgen-alg", IvGenAlg::parse, &err)? {
            e.ivgen_alg = g;
        }
        if let Some(h) = named(self, "encrypt.ivgen-hash-alg", HashAlg::parse, &err)? {
            e.ivgen_hash_alg = h;
        }
        if let Some(h) = named(self, "encrypt.hash-alg", HashAlg::parse, &err)? {
            e.hash_alg = h;
        }
        if let Some(v) = self.get("encrypt.iter-time") {
            e.iter_time_ms = v.parse().map_err(|_| {
                err(format!(
                    "Parameter 'encrypt.iter-time' expects a number, not '{v}'"
                ))
            })?;
        }
        Ok(Some(e))
    }

    /// The option part of qemu-img's `Formatting 'FILE', fmt=qcow2 ...` line: the options qemu
    /// prints, in its order, given values as given (sizes as numbers) and defaults where qemu has
    /// them.
    pub fn formatting_line(&self, fmt: qcow2rs::Format, size: u64) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        let num = |k: &str| -> Option<String> {
            self.get(k).map(|v| {
                parse_size(v)
                    .map(|n| n.to_string())
                    .unwrap_or(v.to_string())
            })
        };
        let string = |k: &str| self.get(k).map(|v| v.replace(',', ",,"));
        match fmt {
            qcow2rs::Format::Qcow2 => {
                for k in ENCRYPT_KEYS {
                    add(k, string(k));
                }
                add("cluster_size", num("cluster_size").or(Some("65536".into())));
                add("extended_l2", string("extended_l2").or(Some("off".into())));
                add("preallocation", string("preallocation"));
                add(
                    "compression_type",
                    string("compression_type").or(Some("zlib".into())),
                );
                add("size", Some(size.to_string()));
                add("backing_file", string("backing_file"));
                add("backing_fmt", string("backing_fmt"));
                add("compat", string("compat"));
                add(
                    "lazy_refcounts",
                    string("lazy_refcounts").or(Some("off".into())),
                );
                add(
                    "refcount_bits",
                    self.get("refcount_bits")
                        .map(str::to_string)
                        .or(Some("16".into())),
                );
            }
            qcow2rs::Format::Raw => {
                add("size", Some(size.to_string()));
                add("preallocation", string("preallocation"));
            }
        }
        format!("fmt={} {}", fmt.as_str(), parts.join(" "))
    }
}

/// qemu's boolean option values.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

fn parse_opt_size(key: &str, v: &str) -> Result<u64, String> {
    parse_size(v).map_err(|_| {
        format!(
            "Parameter '{key}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )
    })
}

/// Split at commas (`,,` is a literal comma), as qemu's option parser does.
pub fn split_escaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn help_text() -> String {
    let lines = [
        "Supported options:",
        "  backing_file=<str>     - File name of a base image",
        "  backing_fmt=<str>      - Image format of the base image (qcow2 or raw)",
        "  cluster_size=<size>    - qcow2 cluster size (512 to 2M, power of two)",
        "  compat=<str>           - Compatibility level (0.10 or 1.1)",
        "  compression_type=<str> - Compression method used for image cluster compression (zlib, zstd)",
        "  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm (aes-128, aes-192, aes-256)",
        "  encrypt.cipher-mode=<str> - Name of encryption cipher mode (xts, cbc)",
        "  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'",
        "  encrypt.hash-alg=<str> - Name of encryption hash algorithm (sha1, sha224, sha256, sha384, sha512)",
        "  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds",
        "  encrypt.ivgen-alg=<str> - Name of IV generator algorithm (plain, plain64, essiv)",
        "  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm",
        "  encrypt.key-secret=<str> - ID of secret providing qcow2 AES key or LUKS passphrase",
        "  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        "  extended_l2=<bool (on/off)> - Extended L2 tables",
        "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates",
        "  preallocation=<str>    - Preallocation mode (allowed values: off, metadata; raw: off, falloc, full)",
        "  refcount_bits=<num>    - Width of a reference count entry in bits",
        "  size=<size>            - Virtual disk size",
    ];
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> OptList {
        OptList::parse(&[s.to_string()]).unwrap()
    }

    #[test]
    fn formatting_line_like_qemu() {
        let o = OptList::default();
        assert_eq!(
            o.formatting_line(qcow2rs::Format::Qcow2, 67108864),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16"
        );
        let o = list("cluster_size=4k,refcount_bits=8,lazy_refcounts=on,compression_type=zstd,preallocation=metadata");
        assert_eq!(
            o.formatting_line(qcow2rs::Format::Qcow2, 10485760),
            "fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=metadata compression_type=zstd size=10485760 lazy_refcounts=on refcount_bits=8"
        );
        let o = list("compat=0.10,backing_file=a.qcow2,backing_fmt=qcow2");
        assert_eq!(
            o.formatting_line(qcow2rs::Format::Qcow2, 1 << 30),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 backing_file=a.qcow2 backing_fmt=qcow2 compat=0.10 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            OptList::default().formatting_line(qcow2rs::Format::Raw, 1048576),
            "fmt=raw size=1048576"
        );
    }

    #[test]
    fn parse_options() {
        let o = list("cluster_size=64k,backing_file=a,,b,lazy_refcounts");
        assert_eq!(o.get("cluster_size"), Some("64k"));
        assert_eq!(o.get("backing_file"), Some("a,b"));
        assert_eq!(o.get("lazy_refcounts"), Some("on"));
        let c = o.to_create_options("x").unwrap();
        assert_eq!(c.cluster_size, 65536);
        assert!(c.lazy_refcounts);
        assert!(list("lazy_refcounts=maybe").to_create_options("x").is_err());
        assert!(list("compat=1.2").to_create_options("x").is_err());
        assert!(list("foo=bar")
            .validate_keys(qcow2rs::Format::Qcow2, "x")
            .is_err());
    }
}
