//! `qcow2rs check`: like `qemu-img check`.

use qcow2rs::{CacheMode, CheckReport, Format, Image, OpenOptions, RepairMode};

use crate::disk::{open_error, parse_format, resolve_format};
use crate::qjson::Value;
use crate::util::{strerror, CliError, CliResult};
use crate::{parse_output, CheckArgs};

/// qemu-img's `ImageCheck` object: optional members are present only when non-zero.
pub fn check_json(r: &CheckReport, filename: &str) -> Value {
    let mut v: Vec<(&str, Value)> = vec![
        ("filename", Value::str(filename)),
        ("format", Value::str("qcow2")),
        ("check-errors", Value::int(r.check_errors)),
    ];
    let opt = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        // qemu's total-clusters counts guest clusters (virtual size / cluster size).
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, n) in opt {
        if n != 0 {
            v.push((k, Value::int(n)));
        }
    }
    Value::obj(v)
}

/// qemu-img's `dump_human_image_check`.
pub fn check_human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

pub fn run(a: &CheckArgs) -> CliResult {
    let json = parse_output("check", &a.output)?;
    let repair = match a.repair.as_deref() {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(other) => {
            return Err(CliError::new(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{other}'\nTry 'qcow2rs check --help' for more info"
            )))
        }
    };
    let r = a.sec.image(&a.file)?;
    let fmt = match a.fmt.as_deref().map(parse_format).transpose()? {
        Some(f) => Some(f),
        None => r.fmt,
    };
    let file = r.path.as_str();
    if resolve_format(file, fmt)? != Format::Qcow2 {
        return Err(CliError::with_code(
            "This image format does not support checks",
            63,
        ));
    }
    let cache = match &a.cache {
        Some(c) => CacheMode::parse(c).map_err(|e| CliError::new(crate::util::core_text(&e)))?,
        None => CacheMode::Writeback,
    };
    let opts = r.open_options(OpenOptions {
        read_only: repair.is_none(),
        // With -r, the core refuses it as qemu-img does.
        force_share: a.force_share,
        cache,
        open_backing: false,
        // Checking reads metadata only: an encrypted image is checked without its key too.
        without_key: true,
        // A truncated image is opened and its damage reported, as qemu-img check does; repair
        // needs the image whole.
        damaged: repair.is_none(),
        ..OpenOptions::default()
    });
    let img = Image::open(file, &opts).map_err(|e| open_error(file, &e))?;
    let report = match img.check(repair) {
        Ok(r) => r,
        Err(e) => {
            return Err(CliError::new(format!(
                "Check failed: {}",
                strerror(e.errno())
            )))
        }
    };
    img.close()
        .map_err(|e| CliError::new(format!("{file}: {}", crate::util::core_text(&e))))?;

    // Problem lines go to stderr, as qemu's qcow2 driver prints them.
    for m in &report.messages {
        eprintln!("{m}");
    }
    if !a.quiet {
        let mut out = String::new();
        if !json && (report.leaks_fixed != 0 || report.corruptions_fixed != 0) {
            out.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                report.leaks_fixed, report.corruptions_fixed
            ));
        }
        if json {
            out.push_str(&check_json(&report, file).pretty());
            out.push('\n');
        } else {
            out.push_str(&check_human(&report));
        }
        print!("{out}");
    }
    if report.check_errors != 0 {
        return Err(CliError::new("Check failed"));
    }
    Ok(report.exit_code())
}
