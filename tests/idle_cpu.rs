//! Idle cost of many attached queues (issue 10, SPEC §9 "Idle cost ~0"), through the real binary and
//! real libblkio frontends:
//!
//! * a daemon with 4 exports x 4 queues (`poll-threads=1`), a frontend attached to each, every queue
//!   used once and then left idle, uses < 1 % of one CPU over 20 s (user + sys of the whole process
//!   from /proc/PID/stat; a functional bound on idle behaviour, not a benchmark);
//! * attaching the four frontends adds exactly one poller thread per export (vhost workers counted in
//!   /proc/PID/task), and no other thread per queue;
//! * after the idle period every queue answers its first request (the poller sleeps on the kick
//!   eventfd once `poll-us` has passed without work, and the kick wakes it): within 2 s, a bound
//!   that only a poller that never wakes would miss.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::Daemon;
use vblkd::client::BlkClient;

const EXPORTS: usize = 4;
const QUEUES: usize = 4;
const IDLE: Duration = Duration::from_secs(20);

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100)
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name (field 2) may contain spaces: fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// (all threads, vhost worker threads) of the process.
fn threads(pid: u32) -> (usize, usize) {
    let mut all = 0;
    let mut pollers = 0;
    let mut names = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        all += 1;
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        names.push(comm.trim().to_string());
        if comm.trim() == "vring_worker" {
            pollers += 1;
        }
    }
    names.sort();
    eprintln!("threads of {pid}: {names:?}");
    (all, pollers)
}

/// Context switches (voluntary + involuntary) of the poller threads: a poller asleep in epoll_wait
/// makes none; one that naps and re-polls makes hundreds per second.
fn poller_switches(pid: u32) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != "vring_worker" {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    n
}

/// One read on every queue of `c`; returns the slowest answer.
fn touch_every_queue(c: &mut BlkClient) -> Duration {
    let mut slowest = Duration::ZERO;
    for q in 0..c.num_queues() {
        let t = Instant::now();
        let ret = c.sync(q, |c, tag| c.read(q, 4096 * q as u64, 0, 4096, tag)).expect("request answered");
        assert_eq!(ret, 0, "queue {q} failed");
        slowest = slowest.max(t.elapsed());
    }
    slowest
}

#[test]
fn idle_daemon_uses_no_cpu_and_wakes_on_the_first_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sockets: Vec<PathBuf> = (0..EXPORTS).map(|i| dir.path().join(format!("e{i}.sock"))).collect();
    let mut args = vec!["--control".to_string(), "none".to_string()];
    for (i, s) in sockets.iter().enumerate() {
        args.push("--bdev".into());
        // null: no background thread (malloc populates its RAM from one), so thread counts are exact.
        args.push(format!("driver=null,name=m{i},size=16M"));
        args.push("--export".into());
        args.push(format!("bdev=m{i},socket={},queues={QUEUES},poll-threads=1", s.display()));
    }
    let mut d = Daemon::start(&args, &sockets[0]);
    for s in &sockets[1..] {
        common::wait_for_socket(s, d.child.as_mut().expect("child"));
    }
    let pid = d.child.as_ref().expect("child").id();
    let (before, pollers_before) = threads(pid);
    assert_eq!(pollers_before, 0);

    let mut clients: Vec<BlkClient> =
        sockets.iter().map(|s| BlkClient::connect(s, QUEUES, 64, 64 * 1024).expect("connect")).collect();
    for c in &mut clients {
        assert_eq!(c.num_queues(), QUEUES);
        touch_every_queue(c);
    }
    let (after, pollers) = threads(pid);
    // Per connection: the front door proxy and its reply pump, vhost-user-backend's handler and our
    // wait thread, plus the pollers; nothing scales with the queue count.
    eprintln!("threads: {before} before the frontends, {after} with them ({pollers} pollers)");
    assert_eq!(pollers, EXPORTS, "poll-threads=1: one poller per export");
    let per_connection = (after - before - pollers) / EXPORTS;
    assert_eq!((after - before - pollers) % EXPORTS, 0, "the same non-poller threads for each connection");
    assert!(per_connection <= 4, "{per_connection} non-poller threads per connection");

    // Let every poller finish its poll-us spin, then measure a quiet period.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = cpu_ticks(pid);
    let s0 = poller_switches(pid);
    let start = Instant::now();
    std::thread::sleep(IDLE);
    let used = cpu_ticks(pid) - t0;
    let switches = poller_switches(pid) - s0;
    let wall = start.elapsed();
    let hz = ticks_per_second();
    let pct = used as f64 * 100.0 / (wall.as_secs_f64() * hz as f64);
    eprintln!(
        "idle: {used} ticks (1/{hz} s) of CPU in {wall:?} = {pct:.3} % of one CPU; {switches} poller context switches"
    );
    assert!(
        switches <= 20,
        "idle pollers woke up {switches} times in {wall:?}: they must sleep until kicked"
    );
    assert!(
        (used as f64) < 0.01 * wall.as_secs_f64() * hz as f64,
        "idle daemon used {used} ticks in {wall:?} ({pct:.2} % of one CPU, limit 1 %)"
    );

    // Busy again: every queue of every export answers its first request.
    let mut slowest = Duration::ZERO;
    for c in &mut clients {
        slowest = slowest.max(touch_every_queue(c));
    }
    eprintln!("first request after {IDLE:?} idle: slowest answer {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "a queue took {slowest:?} to answer after idling");
    drop(clients);
    assert!(d.stop().success());
}

/// A cache over file bdevs (the threads engine: a worker signals its eventfd just after handing
/// over the completion, so the poller may collect a completion before its signal lands) goes quiet
/// after I/O: the cache polls only the channels below it that have I/O in flight, so a late signal
/// would keep its wait fd readable and its poller awake for good, unless cleared before sleeping.
#[test]
fn an_idle_cache_over_files_sleeps_after_io() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("c.sock");
    let (core, cdev) = (dir.path().join("core.img"), dir.path().join("cdev.img"));
    let args: Vec<String> = [
        "--control".to_string(),
        "none".into(),
        "--bdev".into(),
        format!("driver=file,name=core,path={},size=64M,engine=threads", core.display()),
        "--bdev".into(),
        format!("driver=file,name=cd,path={},size=16M,engine=threads", cdev.display()),
        "--bdev".into(),
        "driver=cache,name=c0,cache=cd,core=core,mode=wt,seq-cutoff=off".into(),
        "--export".into(),
        format!("bdev=c0,socket={},queues=1", sock.display()),
    ]
    .into();
    let mut d = Daemon::start(&args, &sock);
    let pid = d.child.as_ref().expect("child").id();
    let mut c = BlkClient::connect(&sock, 1, 64, 64 * 1024).expect("connect");
    // Writes (the cache device's channel and the core's), misses, hits (the cache device's lane).
    for round in 0..3u64 {
        for i in 0..64u64 {
            let off = 4096 * ((i * 7 + round) % 256);
            let ret = if round == 0 {
                c.sync(0, |c, tag| c.write(0, off, 0, 4096, tag))
            } else {
                c.sync(0, |c, tag| c.read(0, off, 0, 4096, tag))
            };
            assert_eq!(ret.expect("answered"), 0);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(pid);
    let s0 = poller_switches(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(pid) - t0;
    let switches = poller_switches(pid) - s0;
    let wall = start.elapsed();
    let hz = ticks_per_second();
    eprintln!("idle cache: {used} ticks (1/{hz} s) in {wall:?}; {switches} poller context switches");
    assert!(switches <= 20, "the idle poller woke up {switches} times in {wall:?}");
    assert!(
        (used as f64) < 0.05 * wall.as_secs_f64() * hz as f64,
        "idle cache used {used} ticks in {wall:?}"
    );
    assert_eq!(c.sync(0, |c, tag| c.read(0, 0, 0, 4096, tag)).expect("answered"), 0);
    drop(c);
    assert!(d.stop().success());
}
