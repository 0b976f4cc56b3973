//! qemu-img's `-p` progress line: `    (12.34/100%)` rewritten in place on stdout.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Progress over a known amount of work, safe to update from several threads.
pub struct Progress {
    enabled: bool,
    total: u64,
    done: AtomicU64,
    last_printed: Mutex<f64>,
}

impl Progress {
    /// Start; prints `(0.00/100%)` when enabled.
    pub fn new(enabled: bool, total: u64) -> Progress {
        let p = Progress {
            enabled,
            total,
            done: AtomicU64::new(0),
            last_printed: Mutex::new(0.0),
        };
        p.print(0.0);
        p
    }

    fn print(&self, pct: f64) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({pct:3.2}/100%)\r");
            let _ = out.flush();
        }
    }

    /// Record `n` more units done; prints when at least one percent has passed.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if !self.enabled {
            return;
        }
        let pct = if self.total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / self.total as f64).min(100.0)
        };
        let mut last = self.last_printed.lock().unwrap_or_else(|e| e.into_inner());
        if pct - *last >= 1.0 || (pct >= 100.0 && *last < 100.0) {
            *last = pct;
            self.print(pct);
        }
    }

    /// Finish: `(100.00/100%)` and a newline.
    pub fn finish(&self) {
        if self.enabled {
            self.print(100.0);
            println!();
        }
    }
}
