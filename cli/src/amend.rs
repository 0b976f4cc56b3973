//! `qcow2rs amend`: like `qemu-img amend`, for LUKS key slots (`-o encrypt.state=active|inactive,
//! encrypt.keyslot=N,encrypt.new-secret=ID,encrypt.old-secret=ID,encrypt.iter-time=MS`).

use qcow2rs::{CacheMode, Format, Image, KeySlotChange, KeySlotState, OpenOptions};

use crate::disk::{open_error, parse_format, resolve_format};
use crate::secrets::{read_password_file, split_opts};
use crate::util::{core_text, CliError, CliResult};
use crate::AmendArgs;

pub fn run(a: &AmendArgs) -> CliResult {
    let r = a.sec.image(&a.file)?;
    let secrets = a.sec.secrets()?;
    let fmt = match a.fmt.as_deref().map(parse_format).transpose()? {
        Some(f) => Some(f),
        None => r.fmt,
    };
    let file = r.path.as_str();
    if a.options.is_empty() {
        return Err(CliError::new("Must specify options (-o)"));
    }
    let mut state = None;
    let mut change = KeySlotChange::add(qcow2rs::Password::new(Vec::new()));
    change.new_secret = None;
    for arg in &a.options {
        for (k, v) in split_opts(arg) {
            match k.as_str() {
                "encrypt.state" => {
                    state = Some(match v.as_str() {
                        "active" => KeySlotState::Active,
                        "inactive" => KeySlotState::Inactive,
                        _ => {
                            return Err(CliError::new(format!(
                                "Parameter 'encrypt.state' does not accept value '{v}'"
                            )))
                        }
                    })
                }
                "encrypt.keyslot" => {
                    change.keyslot = Some(v.parse().map_err(|_| {
                        CliError::new(format!("Parameter 'encrypt.keyslot' expects an integer, not '{v}'"))
                    })?)
                }
                "encrypt.new-secret" => change.new_secret = Some(secrets.get(&v, file)?),
                "encrypt.old-secret" => change.old_secret = Some(secrets.get(&v, file)?),
                "encrypt.iter-time" => {
                    change.iter_time_ms = Some(v.parse().map_err(|_| {
                        CliError::new(format!(
                            "Parameter 'encrypt.iter-time' expects a number, not '{v}'"
                        ))
                    })?)
                }
                "help" | "?" => {
                    return Err(CliError::with_code(
                        "Supported options:\n  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly\n  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase\n  encrypt.old-secret=<str> - Select all keyslots that match this password\n  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)",
                        0,
                    ))
                }
                other => {
                    return Err(CliError::new(format!(
                        "Invalid parameter '{other}' (qcow2rs amends LUKS key slots only)"
                    )))
                }
            }
        }
    }
    if let Some(f) = &a.new_password_file {
        change.new_secret = Some(read_password_file(f)?);
    }
    change.state = state.unwrap_or(if change.new_secret.is_some() {
        KeySlotState::Active
    } else {
        KeySlotState::Inactive
    });
    change.force = a.force;
    if resolve_format(file, fmt)? != Format::Qcow2 {
        return Err(CliError::new(
            "Format driver 'raw' does not support option amendment",
        ));
    }
    let cache = match &a.cache {
        Some(c) => CacheMode::parse(c).map_err(|e| CliError::new(core_text(&e)))?,
        None => CacheMode::Writeback,
    };
    let img = Image::open(
        file,
        &r.open_options(OpenOptions {
            cache,
            open_backing: false,
            ..OpenOptions::new()
        }),
    )
    .map_err(|e| open_error(file, &e))?;
    match img.change_key_slots(&change) {
        Ok(_) => {}
        Err(e) => {
            // qemu-img words these without the file name.
            let text = core_text(&e);
            let prefix = format!("{file}: ");
            return Err(CliError::new(
                text.strip_prefix(&prefix).unwrap_or(&text).to_string(),
            ));
        }
    }
    img.close().map_err(|e| CliError::new(core_text(&e)))?;
    Ok(0)
}
