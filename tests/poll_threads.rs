//! `poll-threads=N` and `--poll-cpus LIST` through the real binary and libblkio (issue 10).
//!
//! * one poller thread serves four queues, each with its own data (written and read back), and the
//!   daemon has exactly that one poller for the export (vhost workers counted in /proc/PID/task);
//! * a queue sharing its thread with a saturated queue keeps being served (no starvation);
//! * `--poll-cpus` pins every poller thread to the listed CPUs (/proc/PID/task/TID/status);
//! * bad `poll-threads` / `--poll-cpus` values exit 2 naming the flag.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{vblkd, Daemon};
use vblkd::client::{BlkClient, Completion, QueueClient};

const BS: usize = 4096;
const MIB: u64 = 1 << 20;

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Thread ids of the daemon's vhost-user-backend worker threads (the pollers).
fn pollers(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "vring_worker" {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// Waits (bounded) until the daemon has `n` poller threads; returns the last count seen.
fn wait_pollers(pid: u32, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = pollers(pid).len();
        if c == n || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_n(q: &mut QueueClient, n: usize) -> Vec<Completion> {
    let mut all = Vec::new();
    while all.len() < n {
        let mut out = Vec::with_capacity(n - all.len());
        q.wait(1, &mut out, Duration::from_secs(30)).expect("wait");
        assert!(!out.is_empty(), "no completion within 30 s");
        all.extend(out);
    }
    for c in &all {
        assert_eq!(c.ret, 0, "request {} failed", c.user_data);
    }
    all
}

fn pattern(seed: u64) -> Vec<u8> {
    (0..BS as u64).map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8).collect()
}

/// Writes then reads back `rounds` x `qd` blocks through one queue's own area.
fn verify_queue(mut q: QueueClient, qi: usize, qd: usize, rounds: usize) -> QueueClient {
    let area = qi as u64 * 16 * MIB;
    for round in 0..rounds {
        for slot in 0..qd {
            let p = pattern((qi * 100_000 + round * qd + slot) as u64);
            q.mem_mut()[slot * BS..(slot + 1) * BS].copy_from_slice(&p);
            q.write(area + ((round * qd + slot) * BS) as u64 % (16 * MIB), slot * BS, BS, slot);
        }
        wait_n(&mut q, qd);
        for slot in 0..qd {
            q.mem_mut()[slot * BS..(slot + 1) * BS].fill(0);
            q.read(area + ((round * qd + slot) * BS) as u64 % (16 * MIB), slot * BS, BS, slot);
        }
        wait_n(&mut q, qd);
        for slot in 0..qd {
            let p = pattern((qi * 100_000 + round * qd + slot) as u64);
            assert!(
                q.mem()[slot * BS..(slot + 1) * BS] == p[..],
                "queue {qi} round {round} slot {slot} differs"
            );
        }
    }
    q
}

/// Runs [`verify_queue`] on every queue, one thread each; returns the queues (still connected).
fn verify_all(queues: Vec<QueueClient>, qd: usize, rounds: usize) -> Vec<QueueClient> {
    std::thread::scope(|s| {
        let hs: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(qi, q)| s.spawn(move || verify_queue(q, qi, qd, rounds)))
            .collect();
        hs.into_iter().map(|h| h.join().expect("queue thread")).collect()
    })
}

#[test]
fn one_poller_thread_serves_four_queues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (dir.path().join("a.sock"), dir.path().join("b.sock"), dir.path().join("c.sock"));
    let mut d = Daemon::start(
        &args(&[
            "--control",
            "none",
            "--bdev",
            "driver=malloc,name=m0,size=64M",
            "--bdev",
            "driver=malloc,name=m1,size=64M",
            "--bdev",
            "driver=null,name=n0,size=1G",
            "--export",
            &format!("bdev=m0,socket={},queues=4,poll-threads=1", a.display()),
            "--export",
            &format!("bdev=m1,socket={},queues=4,poll-threads=2", b.display()),
            "--export",
            &format!("bdev=n0,socket={},queues=4", c.display()),
        ]),
        &a,
    );
    common::wait_for_socket(&c, d.child.as_mut().expect("child"));
    let pid = d.child.as_ref().expect("child").id();
    assert_eq!(pollers(pid).len(), 0, "no poller before a frontend connects");

    let client = BlkClient::connect(&a, 4, 64, 4 * 16 * BS).expect("connect a");
    assert_eq!(client.num_queues(), 4);
    assert_eq!(wait_pollers(pid, 1), 1, "poll-threads=1: one poller thread for 4 queues");
    let _qa = verify_all(client.into_queue_clients(16 * BS), 16, 20);
    assert_eq!(pollers(pid).len(), 1, "still one poller after I/O on every queue");

    let cb = BlkClient::connect(&b, 4, 64, 4 * 16 * BS).expect("connect b");
    assert_eq!(wait_pollers(pid, 3), 3, "poll-threads=2 adds two pollers");
    let _qb = verify_all(cb.into_queue_clients(16 * BS), 8, 10);
    let cc = BlkClient::connect(&c, 4, 64, 4 * BS).expect("connect c");
    assert_eq!(wait_pollers(pid, 7), 7, "the default is one poller per queue");
    drop(cc);
    assert!(d.stop().success());
}

#[test]
fn a_shared_thread_does_not_starve_a_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let mut d = Daemon::start(
        &args(&[
            "--control",
            "none",
            "--bdev",
            "driver=null,name=n0,size=1G",
            "--export",
            &format!("bdev=n0,socket={},queues=2,poll-threads=1", sock.display()),
        ]),
        &sock,
    );
    let client = BlkClient::connect(&sock, 2, 128, 2 * 64 * BS).expect("connect");
    let mut qs = client.into_queue_clients(64 * BS).into_iter();
    let (mut busy, mut quiet) = (qs.next().expect("q0"), qs.next().expect("q1"));
    let stop = AtomicBool::new(false);
    let served = std::thread::scope(|s| {
        // Queue 0: 64 requests always in flight for the whole test.
        let hammer = s.spawn(|| {
            for slot in 0..64 {
                busy.read(slot as u64 * BS as u64, slot * BS, BS, slot);
            }
            let mut done = 0u64;
            let mut out = Vec::with_capacity(64);
            while !stop.load(Ordering::Relaxed) {
                out.clear();
                busy.wait(1, &mut out, Duration::from_secs(30)).expect("busy wait");
                for c in &out {
                    assert_eq!(c.ret, 0);
                    busy.read(c.user_data as u64 * BS as u64, c.user_data * BS, BS, c.user_data);
                }
                done += out.len() as u64;
            }
            wait_n(&mut busy, 64);
            done
        });
        std::thread::sleep(Duration::from_millis(200));
        // Queue 1: one request at a time while queue 0 is saturated; each must be answered.
        let mut served = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            quiet.read(0, 0, BS, 7);
            let c = wait_n(&mut quiet, 1);
            assert_eq!(c[0].user_data, 7);
            served += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let busy_done = hammer.join().expect("hammer");
        eprintln!("shared poller: busy queue {busy_done} requests, quiet queue {served} requests in 3 s");
        served
    });
    // Not a speed figure: a starved queue would answer none (or time out above).
    assert!(served >= 20, "the quiet queue got only {served} requests through in 3 s");
    assert!(d.stop().success());
}

fn cpus_allowed(pid: u32, tid: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .expect("Cpus_allowed_list")
}

#[test]
fn poll_cpus_pins_every_poller() {
    let allowed = vblkd::vhost::pin::allowed_cpus();
    let cpu = *allowed.last().expect("some CPU");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("p.sock");
    let mut d = Daemon::start(
        &args(&[
            "--control",
            "none",
            "--poll-cpus",
            &cpu.to_string(),
            "--bdev",
            "driver=malloc,name=m0,size=64M",
            "--export",
            &format!("bdev=m0,socket={},queues=2", sock.display()),
        ]),
        &sock,
    );
    let pid = d.child.as_ref().expect("child").id();
    let client = BlkClient::connect(&sock, 2, 64, 2 * 8 * BS).expect("connect");
    let _q = verify_all(client.into_queue_clients(8 * BS), 4, 2);
    let tids = pollers(pid);
    assert_eq!(tids.len(), 2);
    for tid in &tids {
        assert_eq!(cpus_allowed(pid, tid), cpu.to_string(), "poller {tid} is not pinned");
    }
    // Threads other than the pollers are left alone.
    let main = cpus_allowed(pid, &pid.to_string());
    if allowed.len() > 1 {
        assert_ne!(main, cpu.to_string(), "the main thread was pinned too");
    }
    assert!(d.stop().success());
}

fn refused(extra: &[&str], flag: &str, what: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("x.sock");
    let mut a = args(&["--control", "none", "--bdev", "driver=null,name=n0,size=1G"]);
    a.extend(extra.iter().map(|s| s.replace("SOCK", &sock.display().to_string())));
    let out = vblkd().args(&a).output().expect("run vblkd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{a:?}: {err}");
    assert!(err.contains(flag) && err.contains(what), "{a:?}: stderr does not name {flag} / {what}: {err}");
    assert!(!Path::new(&sock).exists(), "nothing may be served");
}

#[test]
fn bad_poll_threads_and_poll_cpus_are_refused() {
    refused(&["--export", "bdev=n0,socket=SOCK,queues=4,poll-threads=0"], "--export", "poll-threads=0");
    refused(&["--export", "bdev=n0,socket=SOCK,queues=4,poll-threads=5"], "--export", "poll-threads=5");
    refused(&["--export", "bdev=n0,socket=SOCK,queues=2,poll-threads=x"], "--export", "poll-threads=x");
    let ok = "bdev=n0,socket=SOCK,queues=2";
    refused(&["--poll-cpus", "99999", "--export", ok], "--poll-cpus", "CPU 99999 is not available");
    refused(&["--poll-cpus", "3-1", "--export", ok], "--poll-cpus", "ends before it starts");
    refused(&["--poll-cpus", "zero", "--export", ok], "--poll-cpus", "not a CPU number");
    refused(&["--poll-cpus", "", "--export", ok], "--poll-cpus", "not a CPU number");
}
