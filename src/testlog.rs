//! Tests: the log records a test's own thread emits (and, on request, threads of given names),
//! captured (unit tests only).
//!
//! ```text
//!  log::error!(..) on the test thread ─┐
//!  log::info!(..) on thread "cache-x" ─┴─► Capture (the process's logger, installed once) ─► the capture's Vec<String>
//! ```
//!
//! # Design
//! `log` has one logger per process: the first capture installs this one (and lets every level
//! through; no other unit test installs a logger or changes the level). Records are kept only on a
//! thread inside `capture`, or on a thread whose name a `capture_named` lists (an owner thread
//! named after its device: give the device a name no other test uses), so tests running in
//! parallel never see each other's records.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

type Sink = Arc<Mutex<Vec<String>>>;

thread_local! {
    static RECORDS: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Thread names whose records go to a capture.
static NAMED: Mutex<Vec<(String, Sink)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let line = || format!("{}: {}", r.level(), r.args());
        // try_with: a thread being torn down may still log.
        let mine = RECORDS.try_with(|c| c.borrow().clone()).ok().flatten();
        if let Some(s) = mine {
            s.lock().unwrap_or_else(|e| e.into_inner()).push(line());
            return;
        }
        let named = NAMED.lock().unwrap_or_else(|e| e.into_inner());
        if named.is_empty() {
            return;
        }
        let t = std::thread::current();
        if let Some((_, s)) = named.iter().find(|(n, _)| Some(n.as_str()) == t.name()) {
            s.lock().unwrap_or_else(|e| e.into_inner()).push(line());
        }
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// Runs `f`, returning what it returned and the records this thread logged meanwhile ("LEVEL: text").
pub(crate) fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    capture_named(&[], f)
}

/// Like `capture`, also keeping the records of threads named `names` while `f` runs.
pub(crate) fn capture_named<R>(names: &[&str], f: impl FnOnce() -> R) -> (R, Vec<String>) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CAPTURE).expect("another logger is installed in the unit tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    let sink: Sink = Arc::default();
    RECORDS.with(|c| *c.borrow_mut() = Some(sink.clone()));
    NAMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(names.iter().map(|n| (n.to_string(), sink.clone())));
    let r = f();
    NAMED.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, s)| !Arc::ptr_eq(s, &sink));
    RECORDS.with(|c| *c.borrow_mut() = None);
    let logs = std::mem::take(&mut *sink.lock().unwrap_or_else(|e| e.into_inner()));
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

    #[test]
    fn records_of_named_threads_are_kept_too() {
        let ((), logs) = super::capture_named(&["testlog-named"], || {
            let t = std::thread::Builder::new().name("testlog-named".into());
            t.spawn(|| log::info!("named")).unwrap().join().unwrap();
            std::thread::spawn(|| log::error!("unnamed")).join().unwrap();
        });
        assert_eq!(logs, ["INFO: named"]);
    }
}
