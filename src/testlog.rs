//! Tests: the log records a test's own thread emits, captured (unit tests only).
//!
//! ```text
//!  log::error!(..) on the test thread ─► Capture (the process's logger, installed once) ─► this thread's Vec<String>
//! ```
//!
//! # Design
//! `log` has one logger per process: the first `capture` installs this one (and lets every level
//! through; no other unit test installs a logger or changes the level). Records are kept only on a
//! thread inside `capture`, so tests running in parallel never see each other's records; a record
//! logged by another thread (an owner thread, say) is not seen either.

use std::cell::RefCell;

thread_local! {
    static RECORDS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        // try_with: a thread being torn down may still log.
        let _ = RECORDS.try_with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push(format!("{}: {}", r.level(), r.args()));
            }
        });
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// Runs `f`, returning what it returned and the records this thread logged meanwhile ("LEVEL: text").
pub(crate) fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CAPTURE).expect("another logger is installed in the unit tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    RECORDS.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let r = f();
    let logs = RECORDS.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (r, logs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_this_threads_records_inside_capture_are_kept() {
        log::error!("before");
        let ((), logs) = super::capture(|| {
            log::warn!("inside {}", 1);
            std::thread::spawn(|| log::error!("another thread")).join().unwrap();
        });
        assert_eq!(logs, ["WARN: inside 1"]);
    }
}
