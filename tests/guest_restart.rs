//! Backend restart with no guest-visible error (INFLIGHT_SHMFD) under a real QEMU guest.
//!
//! A TCG guest runs fio with crc32c verification on 2 queues over `delay` (jitter: completions
//! reorder, many requests in flight) on a `file` bdev, while the host kills vblkd with SIGKILL five
//! times at random moments and stops it once with SIGTERM, each time restarting it on the same
//! socket (QEMU's chardev has `reconnect=1`). The guest must see zero I/O errors and fio must verify.
//! The stall of each restart (kill → first request completed by the new daemon) is printed.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 256 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Vblkd {
    child: Option<Child>,
    log: PathBuf,
}

impl Vblkd {
    fn start(dir: &Path, n: u32, image: &Path, socket: &Path) -> Self {
        let log = dir.join(format!("vblkd-{n}.log"));
        let out = File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_vblkd"))
            .args([
                "--bdev",
                &format!("driver=file,name=f0,path={}", image.display()),
                "--bdev",
                "driver=delay,name=d0,base=f0,read-us=3000,write-us=6000,jitter-us=5000",
                "--export",
                &format!("bdev=d0,socket={},queues=2,queue-size=128", socket.display()),
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn vblkd");
        let d = Self { child: Some(child), log };
        let want = socket.display().to_string();
        let t = Instant::now();
        while !d.log_text().contains(&want) {
            assert!(t.elapsed() < Duration::from_secs(20), "vblkd did not start:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Completed operations on `d0` (reads + writes), from a SIGUSR1 statistics dump.
    fn ops(&self) -> u64 {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(20));
        let text = self.log_text();
        let Some(line) = text.lines().rev().find(|l| l.starts_with('{')) else { return 0 };
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        v["d0"]["write_ops"].as_u64().unwrap_or(0) + v["d0"]["read_ops"].as_u64().unwrap_or(0)
    }

    fn kill9(mut self) {
        let mut c = self.child.take().expect("child");
        c.kill().expect("SIGKILL");
        c.wait().expect("wait");
    }

    fn sigterm(mut self) {
        let mut c = self.child.take().expect("child");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                assert!(st.success(), "vblkd exited with {st} on SIGTERM:\n{}", self.log_text());
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "vblkd ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vblkd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A small xorshift for the kill moments (no extra dependency; seeded from the clock).
fn rand_ms(state: &mut u64, lo: u64, hi: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    lo + *state % (hi - lo)
}

#[test]
fn guest_sees_no_error_across_backend_restarts() {
    let dir = tempfile::Builder::new().prefix("vblkd-restart").tempdir_in("/tmp").expect("tmp");
    let image = dir.path().join("disk.img");
    File::create(&image).expect("image").set_len(DISK_BYTES).expect("size");
    let socket = dir.path().join("vblkd.sock");
    let mut n = 0;
    let mut d = Vblkd::start(dir.path(), n, &image, &socket);

    let console = dir.path().join("console.log");
    let mut guest = Command::new(repo().join("qemu/run-guest.sh"));
    guest
        .arg("--socket")
        .arg(&socket)
        .args(["--queues", "2", "--reconnect", "1", "--quiet", "--timeout", "240"])
        .args(["--env", "GUEST_FIO_RUNTIME=45", "--env", "GUEST_FIO_MIB=32"])
        .arg("--log")
        .arg(&console)
        .arg("fio-restart")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let guest = guest.spawn().expect("run-guest.sh");

    // Wait until the guest's fio is writing.
    while d.ops() < 200 {
        assert!(t0.elapsed() < Duration::from_secs(150), "the guest never started I/O:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("restart: guest I/O running after {:.1} s", t0.elapsed().as_secs_f64());
    let mut seed = (std::process::id() as u64) << 20 | t0.elapsed().subsec_nanos() as u64 | 1;
    let mut stalls = Vec::new();
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(rand_ms(&mut seed, 1500, 4000)));
        let kind = if round == 3 { "SIGTERM" } else { "SIGKILL" };
        let t = Instant::now();
        if round == 3 {
            d.sigterm();
        } else {
            d.kill9();
        }
        n += 1;
        d = Vblkd::start(dir.path(), n, &image, &socket);
        // The guest's I/O resumes when the new daemon completes its first request.
        while d.ops() == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no I/O completed within 30 s of restart {n}:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
        let stall = t.elapsed();
        let resubmitted = d.log_text().contains("resubmitting");
        eprintln!(
            "restart {n} ({kind}): I/O stalled {:.2} s{}",
            stall.as_secs_f64(),
            if resubmitted { ", in-flight requests resubmitted" } else { "" }
        );
        stalls.push(stall);
    }
    let out = guest.wait_with_output().expect("guest");
    let text = fs::read_to_string(&console).unwrap_or_default().replace('\r', "");
    let ok = out.status.success()
        && text.lines().any(|l| l.starts_with("VBLKD-GUEST-RESULT: PASS"))
        && text.lines().any(|l| l.starts_with("VBLKD-GUEST-WORKLOAD: fio-restart.sh PASS"));
    if !ok {
        panic!(
            "guest failed ({}):\n--- console ---\n{text}\n--- run-guest ---\n{}{}\n--- last vblkd log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        );
    }
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with("write: IOPS=")
            || t.starts_with("read: IOPS=")
            || t.starts_with("clat (")
            || t.starts_with("lat (")
            || l.contains("restart:")
        {
            eprintln!("restart: guest: {}", l.trim_end());
        }
    }
    let max = stalls.iter().max().copied().unwrap_or_default();
    eprintln!(
        "restart: 6 restarts (5 SIGKILL, 1 SIGTERM), stalls {:?}, max {:.2} s; total {:.1} s",
        stalls.iter().map(|s| format!("{:.2}", s.as_secs_f64())).collect::<Vec<_>>(),
        max.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    d.sigterm();
}
