//! Per-queue log rate limiting: a guest must not be able to fill the host's disk with warnings.
//!
//! ```text
//!  allow() ─► window (1 s) not full ─► log the message
//!          └► window full ─► count it as suppressed
//!  flush() (each poller wake-up / next window) ─► "N messages suppressed" once per window
//! ```
//!
//! # Design
//! A fixed window of [`WINDOW`]: at most [`BURST`] messages are logged per window; the rest are
//! counted, and the count is logged (once) as soon as a later window starts — from [`RateLimit::allow`]
//! or from [`RateLimit::flush`], which the poller calls every time it runs. No allocation, no clock
//! read when nothing is logged.

use std::time::{Duration, Instant};

/// Length of one window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Messages logged per window.
pub const BURST: u32 = 5;

/// A fixed-window limiter for one queue's per-request messages.
#[derive(Debug, Default)]
pub struct RateLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    total_suppressed: u64,
}

impl RateLimit {
    /// True when the caller may log now; otherwise the message is counted as suppressed.
    /// `what` names the queue for the periodic "suppressed" line.
    pub fn allow(&mut self, what: &str) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(t) if now.duration_since(t) < WINDOW => {}
            _ => {
                self.report(what);
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            self.total_suppressed += 1;
            false
        }
    }

    /// Logs the suppressed count once its window is over.
    pub fn flush(&mut self, what: &str) {
        if self.suppressed == 0 {
            return;
        }
        if self.window_start.is_some_and(|t| t.elapsed() >= WINDOW) {
            self.report(what);
            self.window_start = None;
        }
    }

    fn report(&mut self, what: &str) {
        if self.suppressed > 0 {
            log::warn!("{what}: {} similar messages suppressed", self.suppressed);
            self.suppressed = 0;
        }
    }

    /// Messages suppressed since creation (for tests and statistics).
    pub fn total_suppressed(&self) -> u64 {
        self.total_suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppress_then_new_window() {
        let mut r = RateLimit::default();
        let allowed = (0..100).filter(|_| r.allow("q0")).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(r.total_suppressed(), 100 - u64::from(BURST));
        std::thread::sleep(WINDOW + Duration::from_millis(20));
        r.flush("q0");
        assert_eq!(r.suppressed, 0, "flush reports and resets the count after the window");
        assert!(r.allow("q0"), "a new window allows again");
    }
}
