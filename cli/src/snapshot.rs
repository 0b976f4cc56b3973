//! `qcow2rs snapshot`: like `qemu-img snapshot`: list (`-l`, the default), create (`-c`),
//! apply (`-a`) and delete (`-d`) internal snapshots. Also the snapshot list that `info` prints,
//! in the same format, and its JSON form.
//!
//! As in qemu-img, `-a` takes an ID, else a name (the first snapshot with it), but `-d` takes a
//! name only (QEMU's `bdrv_snapshot_find`); `-c` cuts a name to 255 bytes.
//!
//! Differences from qemu-img 10, on purpose:
//! - `-l` lists the snapshots of an encrypted image without its password (they are metadata);
//!   a password that is given is checked. qemu-img needs the password even to list.
//!   `-c`, `-a` and `-d` need it, as in qemu-img.
//! - `-l` does not open the backing file (as `info`), so a missing one does not stop a listing.
//! - `--create`, `--apply` and `--delete` take the snapshot name, as the help says (qemu-img 10
//!   declares these long options without an argument and crashes on `--create`).

use qcow2rs::{Format, Image, OpenOptions, SnapshotInfo, SnapshotRef};

use crate::disk::{open_error, parse_format, resolve_format, RawFile};
use crate::qjson::Value;
use crate::util::{core_text, local_time, size_to_str, strerror, CliError, CliResult};
use crate::SnapshotArgs;

/// QEMU keeps snapshot IDs in a `char[128]` and names in a `char[256]` wherever it lists them
/// (`QEMUSnapshotInfo`), and `qemu-img snapshot -c` names a snapshot through it too.
pub const MAX_ID_BYTES: usize = 127;
pub const MAX_NAME_BYTES: usize = 255;

/// `s` cut to at most `max` bytes (at a character boundary), as QEMU's `pstrcpy` cuts it.
pub fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A snapshot as qemu-img shows it: ID and name cut to QEMU's buffer sizes.
pub fn as_qemu_shows(s: &SnapshotInfo) -> SnapshotInfo {
    SnapshotInfo {
        id: truncate_bytes(&s.id, MAX_ID_BYTES).to_string(),
        name: truncate_bytes(&s.name, MAX_NAME_BYTES).to_string(),
        ..s.clone()
    }
}

/// `printf("%-Ns")`: pad to `width` bytes on the right (C counts bytes, not characters).
fn left(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.len())))
}

/// `printf("%Ns")`: pad to `width` bytes on the left.
fn right(s: &str, width: usize) -> String {
    format!("{}{s}", " ".repeat(width.saturating_sub(s.len())))
}

/// One line of QEMU's snapshot table (`bdrv_snapshot_dump`), without the newline.
fn line(cols: [&str; 6]) -> String {
    format!(
        "{} {} {} {} {} {}",
        left(cols[0], 7),
        left(cols[1], 16),
        right(cols[2], 8),
        right(cols[3], 19),
        right(cols[4], 15),
        right(cols[5], 10)
    )
}

/// The guest clock as QEMU prints it: `hours:minutes:seconds.milliseconds`, `%04d:%02d:%02d.%03d`
/// of C `int`s.
pub fn vm_clock(nsec: u64) -> String {
    let secs = (nsec / 1_000_000_000) as i64;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        (secs / 3600) as i32,
        ((secs / 60) % 60) as i32,
        (secs % 60) as i32,
        ((nsec / 1_000_000) % 1000) as i32
    )
}

/// One row of the snapshot table.
fn row(s: &SnapshotInfo) -> String {
    let icount = s
        .icount
        .map_or("--".to_string(), |i| (i as i64).to_string());
    line([
        &s.id,
        &s.name,
        &size_to_str(s.vm_state_size),
        &local_time(s.date_sec as i64),
        &vm_clock(s.vm_clock_nsec),
        &icount,
    ])
}

/// The `Snapshot list:` block of `qemu-img snapshot -l` and `qemu-img info`: nothing when there
/// are no snapshots.
pub fn list_text(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&line([
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT",
    ]));
    out.push('\n');
    for s in list {
        out.push_str(&row(&as_qemu_shows(s)));
        out.push('\n');
    }
    out
}

/// QAPI's `SnapshotInfo`, as `qemu-img info --output=json` prints each element of `snapshots`
/// (the guest clock split in seconds and nanoseconds; `icount` only when recorded).
pub fn snapshot_json(s: &SnapshotInfo) -> Value {
    let s = as_qemu_shows(s);
    let mut v: Vec<(&str, Value)> = vec![
        ("id", Value::str(&s.id)),
        ("name", Value::str(&s.name)),
        ("vm-state-size", Value::int(s.vm_state_size)),
        ("date-sec", Value::int(s.date_sec as u64)),
        ("date-nsec", Value::int(s.date_nsec as u64)),
        ("vm-clock-sec", Value::int(s.vm_clock_nsec / 1_000_000_000)),
        ("vm-clock-nsec", Value::int(s.vm_clock_nsec % 1_000_000_000)),
    ];
    if let Some(i) = s.icount {
        v.push(("icount", Value::Int(i as i64)));
    }
    Value::obj(v)
}

/// What to do.
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

fn usage(msg: &str) -> CliError {
    CliError::new(format!(
        "{msg}\nTry 'qcow2rs snapshot --help' for more info"
    ))
}

/// The reason qemu-img gives for a failed snapshot operation: the errno's text, or our own
/// words where they say more than an errno could (a corrupt image, a limit).
fn reason(e: &qcow2rs::Error, file: &str) -> String {
    match e {
        qcow2rs::Error::Corrupt { .. } | qcow2rs::Error::InvalidArgument(_) => {
            let text = core_text(e);
            let prefix = format!("{file}: ");
            text.strip_prefix(&prefix).unwrap_or(&text).to_string()
        }
        _ => strerror(e.errno()),
    }
}

pub fn run(a: &SnapshotArgs) -> CliResult {
    let given = a.list as usize + a.apply.len() + a.create.len() + a.delete.len();
    if given > 1 {
        return Err(usage("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    let action = if let Some(n) = a.create.first() {
        Action::Create(n.clone())
    } else if let Some(n) = a.apply.first() {
        Action::Apply(n.clone())
    } else if let Some(n) = a.delete.first() {
        Action::Delete(n.clone())
    } else {
        Action::List
    };
    if a.files.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    if a.sec.image_opts && a.fmt.is_some() {
        return Err(CliError::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let fmt = a.fmt.as_deref().map(parse_format).transpose()?;
    let r = a.sec.image(&a.files[0])?;
    let file = r.path.as_str();
    let list = matches!(action, Action::List);
    if a.force_share && !list {
        return Err(CliError::new(format!(
            "Could not open '{file}': force-share=on can only be used with read-only images"
        )));
    }
    if resolve_format(file, fmt.or(r.fmt))? == Format::Raw {
        // Raw images have no snapshots; qemu-img opens them all the same.
        RawFile::open(file, list)?;
        return match action {
            Action::List => Ok(0),
            Action::Create(n) => Err(CliError::new(format!(
                "Could not create snapshot '{n}': {}",
                strerror(95)
            ))),
            Action::Apply(n) => Err(CliError::new(format!(
                "Could not apply snapshot '{n}': Block driver does not support snapshots"
            ))),
            Action::Delete(n) => Err(CliError::new(format!(
                "Could not delete snapshot '{n}': snapshot not found"
            ))),
        };
    }
    let opts = if list {
        r.open_options(OpenOptions {
            open_backing: false,
            // Listing reads metadata only: no key is needed (a given one is checked).
            without_key: true,
            force_share: a.force_share,
            ..OpenOptions::read_only()
        })
    } else {
        r.open_options(OpenOptions::new())
    };
    let img = Image::open(file, &opts).map_err(|e| open_error(file, &e))?;
    match action {
        Action::List => print!("{}", list_text(&img.snapshots())),
        Action::Create(n) => {
            // qemu-img passes the name through QEMU's 256-byte buffer.
            let name = truncate_bytes(&n, MAX_NAME_BYTES);
            img.create_snapshot(name).map_err(|e| {
                CliError::new(format!(
                    "Could not create snapshot '{n}': {}",
                    reason(&e, file)
                ))
            })?;
        }
        Action::Apply(n) => {
            img.apply_snapshot(n.as_str()).map_err(|e| {
                CliError::new(format!(
                    "Could not apply snapshot '{n}': Failed to load snapshot: {}",
                    reason(&e, file)
                ))
            })?;
        }
        Action::Delete(n) => {
            // qemu-img deletes the first snapshot with this name (not an ID, unlike -a).
            img.delete_snapshot(SnapshotRef::Name(n.clone()))
                .map_err(|e| match e {
                    qcow2rs::Error::NotFound { .. } => CliError::new(format!(
                        "Could not delete snapshot '{n}': snapshot not found"
                    )),
                    _ => CliError::new(format!(
                        "Could not delete snapshot '{n}': {}",
                        reason(&e, file)
                    )),
                })?;
        }
    }
    img.close()
        .map_err(|e| CliError::new(format!("{file}: {}", core_text(&e))))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_and_table() {
        assert_eq!(vm_clock(0), "0000:00:00.000");
        assert_eq!(
            vm_clock((3600 * 27 + 61) * 1_000_000_000 + 123_456_789),
            "0027:01:01.123"
        );
        assert_eq!(vm_clock(3600 * 12345 * 1_000_000_000), "12345:00:00.000");
        assert_eq!(
            line(["ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"]),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        // Widths count bytes, as C's printf does.
        assert_eq!(left("é", 4), "é  ");
        assert_eq!(truncate_bytes("aé", 2), "a");
        assert_eq!(truncate_bytes("abc", 2), "ab");
        assert_eq!(list_text(&[]), "");
    }
}
