//! `qcow2rs info`: like `qemu-img info`, human and JSON output.

use std::os::unix::fs::MetadataExt;

use qcow2rs::{
    Compat, EncryptionInfo, Format, Image, ImageInfo, OpenOptions, Password, SnapshotInfo,
};

use crate::disk::{open_error, open_io_error, parse_format, resolve_format};
use crate::qjson::Value;
use crate::snapshot;
use crate::util::{path_combine, round_up, size_to_str, CliResult};
use crate::{parse_output, InfoArgs};

/// What `info` reports about one image of the chain.
struct Node {
    /// The image as qemu-img's QAPI ImageInfo.
    value: Value,
    /// Where the next image in the chain is, and its format.
    backing: Option<(String, Option<Format>)>,
    /// The internal snapshots (also in `value`).
    snapshots: Vec<SnapshotInfo>,
}

/// Length (rounded up to 512, as qemu's block layer sees it) and allocated bytes of a file.
fn file_sizes(path: &str) -> CliResult<(u64, u64)> {
    let md = std::fs::metadata(path).map_err(|e| open_io_error(path, &e))?;
    Ok((round_up(md.len(), 512), md.blocks() * 512))
}

fn file_child(path: &str, len: u64, actual: u64) -> Value {
    Value::Arr(vec![Value::obj(vec![
        ("name", Value::str("file")),
        (
            "info",
            Value::obj(vec![
                ("filename", Value::str(path)),
                ("format", Value::str("file")),
                ("dirty-flag", Value::Bool(false)),
                ("actual-size", Value::int(actual)),
                ("virtual-size", Value::int(len)),
                (
                    "format-specific",
                    Value::obj(vec![
                        ("type", Value::str("file")),
                        ("data", Value::obj::<String>(vec![])),
                    ]),
                ),
                ("children", Value::Arr(vec![])),
            ]),
        ),
    ])])
}

/// The `format-specific` object of a qcow2 image.
pub fn qcow2_specific(info: &ImageInfo) -> Value {
    let mut data: Vec<(&str, Value)> = vec![("compat", Value::str(info.compat.as_str()))];
    if info.compat == Compat::V3 {
        data.push(("extended-l2", Value::Bool(info.extended_l2)));
        data.push(("lazy-refcounts", Value::Bool(info.lazy_refcounts)));
        data.push(("corrupt", Value::Bool(info.corrupt)));
    }
    data.push(("refcount-bits", Value::int(info.refcount_bits as u64)));
    if let Some(e) = &info.encryption {
        data.push(("encrypt", encrypt_block(e)));
    }
    data.push((
        "compression-type",
        Value::str(info.compression_type.as_str()),
    ));
    Value::obj(vec![
        ("type", Value::str("qcow2")),
        ("data", Value::obj(data)),
    ])
}

/// The `encrypt` object, as QAPI's QCryptoBlockInfo (insertion order is QAPI's order; the
/// printer puts it in qemu's dictionary order).
fn encrypt_block(e: &EncryptionInfo) -> Value {
    let mut v: Vec<(&str, Value)> = vec![("format", Value::str(e.format.as_str()))];
    if let Some(l) = &e.luks {
        v.push(("cipher-alg", Value::str(l.cipher_alg.as_str())));
        v.push(("cipher-mode", Value::str(l.cipher_mode.as_str())));
        v.push(("ivgen-alg", Value::str(l.ivgen_alg.as_str())));
        if let Some(h) = l.ivgen_hash_alg {
            v.push(("ivgen-hash-alg", Value::str(h.as_str())));
        }
        v.push(("hash-alg", Value::str(l.hash_alg.as_str())));
        v.push(("detached-header", Value::Bool(false)));
        v.push(("payload-offset", Value::int(l.payload_offset)));
        v.push(("master-key-iters", Value::int(l.master_key_iters as u64)));
        v.push(("uuid", Value::str(&l.uuid)));
        let slots = l
            .slots
            .iter()
            .map(|s| {
                let mut o: Vec<(&str, Value)> = vec![("active", Value::Bool(s.active))];
                if let Some(i) = s.iters {
                    o.push(("iters", Value::int(i as u64)));
                }
                if let Some(st) = s.stripes {
                    o.push(("stripes", Value::int(st as u64)));
                }
                o.push(("key-offset", Value::int(s.key_offset)));
                Value::obj(o)
            })
            .collect();
        v.push(("slots", Value::Arr(slots)));
    }
    Value::obj(v)
}

fn node(
    path: &str,
    fmt: Option<Format>,
    password: Option<Password>,
    force_share: bool,
) -> CliResult<Node> {
    let fmt = resolve_format(path, fmt)?;
    let (len, actual) = file_sizes(path)?;
    match fmt {
        Format::Raw => {
            // Opening checks that we may read it, as qemu-img does.
            std::fs::File::open(path).map_err(|e| open_io_error(path, &e))?;
            let value = Value::obj(vec![
                ("filename", Value::str(path)),
                ("format", Value::str("raw")),
                ("dirty-flag", Value::Bool(false)),
                ("actual-size", Value::int(actual)),
                ("virtual-size", Value::int(len)),
                ("children", file_child(path, len, actual)),
            ]);
            Ok(Node {
                value,
                backing: None,
                snapshots: Vec::new(),
            })
        }
        Format::Qcow2 => {
            let opts = OpenOptions {
                open_backing: false,
                // info shows metadata: no key is needed (a given one is checked).
                without_key: true,
                password,
                force_share,
                ..OpenOptions::read_only()
            };
            let img = Image::open(path, &opts).map_err(|e| open_error(path, &e))?;
            let info = img.info().map_err(|e| open_error(path, &e))?;
            let mut v: Vec<(&str, Value)> = vec![
                ("filename", Value::str(path)),
                ("format", Value::str("qcow2")),
                ("dirty-flag", Value::Bool(info.dirty)),
                ("actual-size", Value::int(actual)),
                ("virtual-size", Value::int(info.virtual_size)),
                ("cluster-size", Value::int(info.cluster_size as u64)),
            ];
            if info.crypt_method != 0 {
                v.push(("encrypted", Value::Bool(true)));
            }
            let mut backing = None;
            if let Some(b) = &info.backing_file {
                let full = path_combine(path, b);
                v.push(("backing-filename", Value::str(b)));
                v.push(("full-backing-filename", Value::str(&full)));
                if let Some(f) = &info.backing_format {
                    v.push(("backing-filename-format", Value::str(f)));
                }
                let bfmt = info
                    .backing_format
                    .as_deref()
                    .and_then(|f| Format::parse(f).ok());
                backing = Some((full, bfmt));
            }
            if !info.snapshots.is_empty() {
                let list = info.snapshots.iter().map(snapshot::snapshot_json).collect();
                v.push(("snapshots", Value::Arr(list)));
            }
            v.push(("format-specific", qcow2_specific(&info)));
            v.push(("children", file_child(path, len, actual)));
            Ok(Node {
                value: Value::obj(v),
                backing,
                snapshots: info.snapshots,
            })
        }
    }
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Obj(e) => e.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    }
}

fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    match get(v, key) {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    }
}

fn get_int(v: &Value, key: &str) -> Option<u64> {
    match get(v, key) {
        Some(Value::Int(i)) => Some(*i as u64),
        _ => None,
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Str(s) => s.clone(),
        _ => String::new(),
    }
}

/// qemu's `bdrv_image_info_specific_dump`: keys with `-` turned into spaces, nested objects
/// indented by four more spaces.
fn dump_specific(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Obj(entries) => {
            for (k, val) in Value::ordered_entries(entries) {
                let key = k.replace('-', " ");
                match val {
                    Value::Obj(_) | Value::Arr(_) => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        dump_specific(out, val, indent + 4);
                    }
                    _ => out.push_str(&format!("{pad}{key}: {}\n", scalar(val))),
                }
            }
        }
        Value::Arr(items) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Obj(_) | Value::Arr(_) => {
                        out.push_str(&format!("{pad}[{i}]:\n"));
                        dump_specific(out, item, indent + 4);
                    }
                    _ => out.push_str(&format!("{pad}[{i}]: {}\n", scalar(item))),
                }
            }
        }
        _ => out.push_str(&format!("{pad}{}\n", scalar(v))),
    }
}

/// qemu's `bdrv_image_info_dump` for one image.
fn human(node: &Node) -> String {
    let v = &node.value;
    let mut out = String::new();
    let vs = get_int(v, "virtual-size").unwrap_or(0);
    let actual = get_int(v, "actual-size").unwrap_or(0);
    out.push_str(&format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        get_str(v, "filename").unwrap_or(""),
        get_str(v, "format").unwrap_or(""),
        size_to_str(vs),
        vs,
        size_to_str(actual)
    ));
    if let Some(Value::Bool(true)) = get(v, "encrypted") {
        out.push_str("encrypted: yes\n");
    }
    if let Some(cs) = get_int(v, "cluster-size") {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(Value::Bool(true)) = get(v, "dirty-flag") {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = get_str(v, "backing-filename") {
        out.push_str(&format!("backing file: {b}"));
        match get_str(v, "full-backing-filename") {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => out.push_str(&format!(" (actual path: {full})")),
            Some(_) => {}
        }
        out.push('\n');
    }
    if let Some(f) = get_str(v, "backing-filename-format") {
        out.push_str(&format!("backing file format: {f}\n"));
    }
    out.push_str(&snapshot::list_text(&node.snapshots));
    if let Some(spec) = get(v, "format-specific") {
        out.push_str("Format specific information:\n");
        if let Some(data) = get(spec, "data") {
            dump_specific(&mut out, data, 4);
        }
    }
    if let Some(Value::Arr(children)) = get(v, "children") {
        for child in children {
            let name = get_str(child, "name").unwrap_or("");
            let Some(ci) = get(child, "info") else {
                continue;
            };
            let len = get_int(ci, "virtual-size").unwrap_or(0);
            out.push_str(&format!(
                "Child node '/{name}':\n    filename: {}\n    protocol type: {}\n    file length: {} ({} bytes)\n    disk size: {}\n",
                get_str(ci, "filename").unwrap_or(""),
                get_str(ci, "format").unwrap_or(""),
                size_to_str(len),
                len,
                size_to_str(get_int(ci, "actual-size").unwrap_or(0))
            ));
        }
    }
    out
}

pub fn run(a: &InfoArgs) -> CliResult {
    let json = parse_output("info", &a.output)?;
    let r = a.sec.image(&a.file)?;
    let fmt = match a.fmt.as_deref().map(parse_format).transpose()? {
        Some(f) => Some(f),
        None => r.fmt,
    };
    let mut nodes = vec![node(&r.path, fmt, r.password.clone(), a.force_share)?];
    if a.backing_chain {
        let mut seen = vec![r.path.clone()];
        while let Some((path, bfmt)) = nodes.last().and_then(|n| n.backing.clone()) {
            if seen.contains(&path) || seen.len() > 64 {
                return Err(crate::util::CliError::new(format!(
                    "Backing file '{path}' creates an infinite loop."
                )));
            }
            seen.push(path.clone());
            nodes.push(node(
                &path,
                bfmt,
                r.backing_password.clone(),
                a.force_share,
            )?);
        }
    }
    let text = if json {
        if a.backing_chain {
            Value::Arr(nodes.into_iter().map(|n| n.value).collect()).pretty() + "\n"
        } else {
            nodes[0].value.pretty() + "\n"
        }
    } else {
        nodes.iter().map(human).collect::<Vec<_>>().join("\n")
    };
    print!("{text}");
    Ok(0)
}
