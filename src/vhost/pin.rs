//! `--poll-cpus LIST`: pinning poller threads to CPUs.
//!
//! ```text
//!  main: set_poll_cpus([2, 3]) ─► every vhost worker thread, on its first event:
//!        sched_setaffinity(0, { cpus[k % len] })   with k = 0, 1, 2, ... in the order threads wake
//! ```
//!
//! # Design
//! vhost-user-backend creates the worker threads itself and offers no start hook, so a worker pins
//! itself the first time it handles an event (a thread-local flag makes it once per thread). Threads
//! take the listed CPUs round-robin, in the order they first wake. The list is daemon-wide and set
//! once at start-up; without it nothing is pinned.
//!
//! # Limitations
//! A worker that never receives an event is never pinned (it never runs either).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static CPUS: OnceLock<Vec<usize>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

/// Why a CPU list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// Not of the form `0,2,4-7`.
    #[error("'{0}' is not a CPU number or range (expected e.g. 0,2,4-7)")]
    Syntax(String),
    /// A range whose end is below its start.
    #[error("range {0} ends before it starts")]
    Backwards(String),
    /// A CPU this process may not run on.
    #[error("CPU {cpu} is not available to this process (allowed: {allowed})")]
    NotAllowed {
        /// The CPU.
        cpu: usize,
        /// The process's allowed CPUs.
        allowed: String,
    },
    /// Nothing listed.
    #[error("the list is empty")]
    Empty,
}

/// The CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread (pid 0) and we
    // pass its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Parses `0,2,4-7` into CPU numbers (sorted, without duplicates) and checks each against `allowed`.
pub fn parse_cpu_list(s: &str, allowed: &[usize]) -> Result<Vec<usize>, CpuListError> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim) {
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| CpuListError::Syntax(part.to_string()));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if b < a {
                    return Err(CpuListError::Backwards(part.to_string()));
                }
                cpus.extend(a..=b.min(a + libc::CPU_SETSIZE as usize));
            }
            None if part.is_empty() => return Err(CpuListError::Syntax(part.to_string())),
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(CpuListError::Empty);
    }
    if let Some(&cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
        let allowed = allowed.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        return Err(CpuListError::NotAllowed { cpu, allowed });
    }
    Ok(cpus)
}

/// Sets the daemon-wide poller CPU list (once; later calls are ignored). Returns false when a list
/// was already set.
pub fn set_poll_cpus(cpus: Vec<usize>) -> bool {
    CPUS.set(cpus).is_ok()
}

/// Pins the calling thread to its share of the poller CPU list, the first time it is called on this
/// thread; does nothing without a list.
pub fn pin_this_thread_once() {
    if PINNED.with(Cell::get) {
        return;
    }
    PINNED.with(|p| p.set(true));
    let Some(cpus) = CPUS.get() else { return };
    if cpus.is_empty() {
        return;
    }
    let cpu = cpus[NEXT.fetch_add(1, Ordering::Relaxed) % cpus.len()];
    // SAFETY: cpu_set_t is plain data initialised by CPU_ZERO/CPU_SET; sched_setaffinity(0) changes the
    // calling thread only, and we pass the set's exact size.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        log::warn!("cannot pin a poller thread to CPU {cpu}: {}", std::io::Error::last_os_error());
    } else {
        log::debug!("poller thread pinned to CPU {cpu}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(parse_cpu_list("0", &all), Ok(vec![0]));
        assert_eq!(parse_cpu_list("3,1,1", &all), Ok(vec![1, 3]));
        assert_eq!(parse_cpu_list("0-2,6", &all), Ok(vec![0, 1, 2, 6]));
        assert_eq!(parse_cpu_list("2-2", &all), Ok(vec![2]));
        assert_eq!(parse_cpu_list("3-1", &all), Err(CpuListError::Backwards("3-1".into())));
        assert_eq!(parse_cpu_list("a", &all), Err(CpuListError::Syntax("a".into())));
        assert_eq!(parse_cpu_list("1,,2", &all), Err(CpuListError::Syntax(String::new())));
        assert_eq!(parse_cpu_list("-1", &all), Err(CpuListError::Syntax("-1".into())));
        assert!(matches!(parse_cpu_list("9", &all), Err(CpuListError::NotAllowed { cpu: 9, .. })));
        assert!(!allowed_cpus().is_empty());
    }
}
