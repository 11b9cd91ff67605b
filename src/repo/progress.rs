//! A one-line progress display on stderr for long repository operations (verify, gc,
//! export, import), shown only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A counter of done items out of a total, redrawn at most every 100 ms.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    enabled: bool,
    last: Mutex<Option<Instant>>,
}

impl Progress {
    /// A progress line for `total` items, drawn when `enabled` is `Some(true)`, or when it
    /// is `None` and stderr is a terminal.
    pub fn new(label: impl Into<String>, total: u64, enabled: Option<bool>) -> Self {
        Self {
            label: label.into(),
            total,
            done: AtomicU64::new(0),
            enabled: enabled.unwrap_or_else(|| std::io::stderr().is_terminal()),
            last: Mutex::new(None),
        }
    }

    /// A display that never draws.
    pub fn hidden() -> Self {
        Self::new("", 0, Some(false))
    }

    /// Counts `n` more items done.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if !self.enabled {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now - t < Duration::from_millis(100)) && done < self.total {
            return;
        }
        *last = Some(now);
        self.draw(done);
    }

    /// Items done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn draw(&self, done: u64) {
        const WIDTH: u64 = 30;
        let total = self.total.max(1);
        let filled = (done.min(total) * WIDTH / total) as usize;
        let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH as usize - filled);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{bar}] {done}/{} ({}%)",
            self.label,
            self.total,
            done.min(total) * 100 / total
        );
        let _ = err.flush();
    }

    /// Ends the line (when anything was drawn).
    pub fn finish(&self) {
        if self.enabled {
            self.draw(self.done());
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_without_drawing_when_hidden() {
        let p = Progress::new("x", 10, Some(false));
        p.add(3);
        p.add(4);
        assert_eq!(p.done(), 7);
        p.finish();
        assert_eq!(Progress::hidden().done(), 0);
    }
}
