//! JSON output byte-for-byte like qemu-img's.
//!
//! qemu-img builds a QDict and prints it with `qobject_to_json_pretty`. A QDict iterates its keys by
//! hash bucket (`tdb_hash(key) % 512`), newest insertion first within a bucket, so the key order
//! looks arbitrary but is fixed. [`Value::Obj`] takes its entries in QAPI insertion order and
//! [`Value::pretty`] emits them in QDict order, so our output matches qemu-img's text exactly.

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<Value>),
    /// Entries in insertion order (qemu's QAPI field order).
    Obj(Vec<(String, Value)>),
}

impl Value {
    /// An object from (key, value) pairs in insertion order.
    pub fn obj<K: Into<String>>(entries: Vec<(K, Value)>) -> Value {
        Value::Obj(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
    /// A string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }
    /// An integer value (sizes above `i64::MAX` are clamped; qemu uses int64 throughout).
    pub fn int(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }

    /// Pretty-printed, as `qobject_to_json_pretty` does (no trailing newline).
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    /// The entries of an object in the order qemu prints them.
    pub fn ordered_entries(entries: &[(String, Value)]) -> Vec<&(String, Value)> {
        let mut v: Vec<(usize, &(String, Value))> = entries.iter().enumerate().collect();
        // Same bucket: the later insertion comes first.
        v.sort_by(|(ia, a), (ib, b)| qdict_bucket(&a.0).cmp(&qdict_bucket(&b.0)).then(ib.cmp(ia)));
        v.into_iter().map(|(_, e)| e).collect()
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => out.push_str(&i.to_string()),
            Value::Str(s) => write_str(out, s),
            Value::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, indent + 1);
                    item.write(out, indent + 1);
                }
                newline(out, indent);
                out.push(']');
            }
            Value::Obj(entries) => {
                out.push('{');
                for (i, (k, v)) in Value::ordered_entries(entries).into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, indent + 1);
                    write_str(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                }
                newline(out, indent);
                out.push('}');
            }
        }
    }
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    for _ in 0..indent * 4 {
        out.push(' ');
    }
}

/// A JSON string, escaped like qemu's `to_json_str`: printable ASCII as is, everything else
/// (control characters and non-ASCII) as `\uXXXX` (UTF-16, upper-case hex).
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// qemu's `tdb_hash(key) % QDICT_BUCKET_MAX`.
fn qdict_bucket(key: &str) -> u32 {
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        value = value.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_key_order() {
        // The order `qemu-img check --output=json` prints these keys in.
        let keys = [
            "filename",
            "format",
            "check-errors",
            "image-end-offset",
            "corruptions",
            "leaks",
            "corruptions-fixed",
            "leaks-fixed",
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "compressed-clusters",
        ];
        let entries: Vec<(String, Value)> = keys
            .iter()
            .map(|k| (k.to_string(), Value::Int(0)))
            .collect();
        let order: Vec<&str> = Value::ordered_entries(&entries)
            .into_iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "corruptions",
                "corruptions-fixed",
                "check-errors",
                "leaks",
                "leaks-fixed",
                "allocated-clusters",
                "filename",
                "format",
                "fragmented-clusters"
            ]
        );
    }

    #[test]
    fn pretty_empty_containers() {
        let v = Value::obj(vec![
            ("children", Value::Arr(vec![])),
            ("data", Value::obj::<String>(vec![])),
        ]);
        assert_eq!(
            v.pretty(),
            "{\n    \"children\": [\n    ],\n    \"data\": {\n    }\n}"
        );
    }
}
