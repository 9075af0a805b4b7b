//! End-to-end: a real Linux guest's virtio-blk driver on a vblkd export.
//!
//! Each test starts a backend, boots a QEMU guest (TCG by default) with
//! `qemu/run-guest.sh` attached to the backend's vhost-user socket, runs the
//! guest workloads of `qemu/workloads/`, and checks the guest's result line.
//! The matrix is (malloc, file, FTL on an emulated OCSSD image) bdev x (1, 2) queues; in each:
//!
//! * boot A, read-write export: `fio-verify` (workload 1), `ext4` (2),
//!   `discard` (3), `persist-write` (4, first half);
//! * file bdev: the daemon is restarted (SIGTERM, exit 0) and the token is
//!   checked in the image file; boot B on a read-only export with a serial:
//!   `persist-verify` (4, second half) and `readonly` (5);
//! * ftl bdev: like file, except that the token is checked by the guest only (the image holds
//!   media, not a flat disk): the daemon restart restores the FTL from its metadata;
//! * malloc bdev: boot B on the same daemon (guest power cycle):
//!   `persist-verify`; then the daemon is restarted read-only with a serial and
//!   boot C runs `readonly`.
//!
//! Stacked bdevs (`guest_stack_*`, one boot each: `fio-verify`, `ext4`): cache(wt) over file, and
//! cache(wb, 2 queues, cache device smaller than fio's span) over file.
//!
//! The backend is vblkd (`CARGO_BIN_EXE_vblkd`). For developing the harness
//! without vblkd, `VBLKD_E2E_BACKEND=qsd` uses qemu-storage-daemon instead (its
//! "malloc" is a file on /dev/shm; its GET_ID string is fixed at
//! "vhost_user_blk"). Guests run one at a time. Nothing is skipped: a missing
//! QEMU, kernel or package fails the test (run `qemu/deps.sh` first).
//!
//! Environment: `VBLKD_E2E_BACKEND=vblkd|qsd`, `VBLKD_GUEST_ACCEL=tcg|kvm`,
//! `VBLKD_GUEST_TIMEOUT` (seconds per boot), `VBLKD_GUEST_CACHE`.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Disk size of every export: fio uses [0, 128M), the persistence pattern
/// [160M, 193M).
const DISK_BYTES: u64 = 256 << 20;
const DISK_SIZE: &str = "256M";
const SERIAL: &str = "vblkd-e2e-serial";
/// What qemu-storage-daemon 7.2 answers to VIRTIO_BLK_T_GET_ID.
const QSD_SERIAL: &str = "vhost_user_blk";
/// Offset of the persistence token block written by `persist-write.sh`.
const TOKEN_OFFSET: u64 = 192 << 20;

/// One guest at a time: TCG guests are CPU-bound and the host has 2 cores.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Vblkd,
    Qsd,
}

fn backend() -> Backend {
    match std::env::var("VBLKD_E2E_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("vblkd") => Backend::Vblkd,
        Ok("qsd") => Backend::Qsd,
        Ok(other) => panic!("VBLKD_E2E_BACKEND must be 'vblkd' or 'qsd', not '{other}'"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bdev {
    Malloc,
    File,
    /// An image in the machine's one-node Ceph test cluster (scripts/ceph-cluster.sh).
    Rbd,
    Ftl,
}

#[derive(Clone, Copy, Debug)]
struct ExportCfg {
    queues: u32,
    readonly: bool,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running backend daemon; killed on drop if the test did not stop it.
struct Daemon {
    backend: Backend,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(backend: Backend, dir: &Path, bdev: Bdev, image: &Path, cfg: ExportCfg) -> Daemon {
        let socket = dir.join("vblkd.sock");
        let log = dir.join(format!("daemon-{}.log", now_nanos()));
        let _ = fs::remove_file(&socket);
        let mut cmd = match backend {
            Backend::Vblkd => {
                let data_dir = dir.join("data");
                fs::create_dir_all(&data_dir).unwrap();
                let bdev_args = match bdev {
                    Bdev::Malloc => vec![format!("driver=malloc,name=d0,size={DISK_SIZE}")],
                    Bdev::File => vec![format!("driver=file,name=d0,path={}", image.display())],
                    Bdev::Ftl => vec![
                        format!(
                            "driver=ocssd-emu,name=o0,path={},create=on,groups=2,pus=2,chunks=48,chunk-blocks=512",
                            image.display()
                        ),
                        format!("driver=ftl,name=d0,base=o0,size={DISK_SIZE}"),
                    ],
                    Bdev::Rbd => vec![format!(
                        "driver=rbd,name=d0,pool=rbd,image=e2e-{}-{},conf={},create={DISK_SIZE}",
                        std::process::id(),
                        now_nanos(),
                        ceph_conf().display()
                    )],
                };
                let mut export = format!("bdev=d0,socket={},queues={}", socket.display(), cfg.queues);
                if cfg.readonly {
                    export.push_str(",readonly=on");
                }
                export.push_str(&format!(",serial={SERIAL}"));
                let mut c = Command::new(env!("CARGO_BIN_EXE_vblkd"));
                c.arg("--data-dir").arg(&data_dir);
                for b in &bdev_args {
                    c.args(["--bdev", b]);
                }
                c.args(["--export", &export, "--log-level", "info"]);
                c
            }
            Backend::Qsd => {
                // qsd has no RAM disk: "malloc" is a file on tmpfs.
                let (ro, writable) = if cfg.readonly { (",read-only=on", "off") } else { ("", "on") };
                let mut c = Command::new(std::env::var("VBLKD_QSD").unwrap_or("qemu-storage-daemon".into()));
                c.arg("--blockdev")
                    .arg(format!("driver=file,node-name=d0,filename={},discard=unmap{ro}", image.display()));
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable={writable},num-queues={}",
                    socket.display(),
                    cfg.queues
                ));
                c
            }
        };
        let out = File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        eprintln!("e2e: starting backend: {cmd:?}");
        let child =
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start backend {:?}: {e}", cmd.get_program()));
        let mut d = Daemon { backend, child: Some(child), socket, log };
        d.wait_for_socket();
        d
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "backend exited ({st}) before its socket {} appeared; its output:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            let is_sock = fs::metadata(&self.socket).map(|m| m.file_type().is_socket()).unwrap_or(false);
            if is_sock {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "backend socket {} did not appear within 20 s; output:\n{}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.backend == Backend::Vblkd {
            // vblkd prints the socket path on start.
            let want = self.socket.display().to_string();
            let deadline = Instant::now() + Duration::from_secs(2);
            while !self.log_text().contains(&want) {
                assert!(
                    Instant::now() < deadline,
                    "vblkd did not print its socket path {want}; output:\n{}",
                    self.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGTERM; vblkd must exit 0 and remove its socket.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let status = sigterm_and_wait(&mut child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("backend ignored SIGTERM for 20 s; output:\n{}", self.log_text()));
        match self.backend {
            Backend::Vblkd => {
                assert!(
                    status.success(),
                    "vblkd exited with {status} on SIGTERM (want 0); output:\n{}",
                    self.log_text()
                );
                assert!(
                    !self.socket.exists(),
                    "vblkd left its socket {} behind after SIGTERM",
                    self.socket.display()
                );
            }
            // qemu-storage-daemon 7.2 dies by the signal and leaves the socket.
            Backend::Qsd => assert!(
                status.success() || status.signal() == Some(libc::SIGTERM),
                "qemu-storage-daemon exited with {status}; output:\n{}",
                self.log_text()
            ),
        }
        eprintln!("e2e: backend stopped: {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("e2e: backend output:\n{}", self.log_text());
            }
        }
    }
}

fn sigterm_and_wait(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Boot the guest on `socket` and run `workloads`; panics unless the guest
/// printed `VBLKD-GUEST-RESULT: PASS` and every workload reported PASS.
fn run_guest(
    label: &str,
    socket: &Path,
    queues: u32,
    reconnect: bool,
    envs: &[(&str, String)],
    workloads: &[&str],
) {
    let mut cmd = Command::new(repo().join("qemu/run-guest.sh"));
    cmd.arg("--socket").arg(socket).arg("--queues").arg(queues.to_string()).arg("--quiet");
    if reconnect {
        cmd.args(["--reconnect", "1"]);
    }
    for (k, v) in envs {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    let log = std::env::temp_dir().join(format!("vblkd-guest-{}.log", now_nanos()));
    cmd.arg("--log").arg(&log);
    cmd.args(workloads);
    cmd.stdin(Stdio::null());
    eprintln!("e2e: [{label}] {cmd:?}");
    let start = Instant::now();
    let out = cmd.output().expect("cannot run qemu/run-guest.sh");
    let secs = start.elapsed().as_secs_f64();
    let console = fs::read_to_string(&log).unwrap_or_default().replace('\r', "");
    let _ = fs::remove_file(&log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success()
        && console.lines().any(|l| l.starts_with("VBLKD-GUEST-RESULT: PASS"))
        && workloads.iter().all(|w| {
            let name = if w.ends_with(".sh") { w.to_string() } else { format!("{w}.sh") };
            let want = format!("VBLKD-GUEST-WORKLOAD: {name} PASS");
            console.lines().any(|l| l.starts_with(&want))
        });
    if !ok {
        panic!(
            "[{label}] guest run failed ({}) after {secs:.1} s\n--- guest console ---\n{console}\n--- run-guest.sh ---\n{stdout}{stderr}",
            out.status,
            stdout = String::from_utf8_lossy(&out.stdout),
        );
    }
    // The figures for the record: per-workload times and fio's bandwidth lines.
    eprintln!("e2e: [{label}] PASS, boot {secs:.1} s");
    for l in console.lines() {
        let t = l.trim_start();
        if l.starts_with("VBLKD-GUEST-WORKLOAD: ")
            || t.starts_with("READ: bw=")
            || t.starts_with("WRITE: bw=")
            || t.starts_with("TRIM: bw=")
            || t.starts_with("read: IOPS=")
            || t.starts_with("write: IOPS=")
            || l.starts_with("  ")
                && (t.starts_with("virtqueue")
                    || t.contains("verified")
                    || t.contains("rejected")
                    || t.starts_with("serial")
                    || t.starts_with("discard"))
        {
            eprintln!("e2e: [{label}]   {}", l.trim_end());
        }
    }
}

fn run_matrix(bdev: Bdev, queues: u32) {
    let _guard = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let backend = backend();
    let t0 = Instant::now();
    let label = format!("{bdev:?}/{queues}q/{backend:?}").to_lowercase();
    let dir = tempfile::Builder::new().prefix("vblkd-e2e").tempdir_in("/tmp").unwrap();
    // qsd's stand-in for a RAM disk is a file on tmpfs; vblkd's malloc bdev has no file.
    let shm = (bdev == Bdev::Malloc && backend == Backend::Qsd)
        .then(|| tempfile::Builder::new().prefix("vblkd-e2e").tempdir_in("/dev/shm").unwrap());
    let image = match &shm {
        Some(shm) => shm.path().join("ram.img"),
        None => dir.path().join("disk.img"),
    };
    assert!(
        bdev != Bdev::Ftl || backend == Backend::Vblkd,
        "the FTL matrix needs the vblkd backend (qemu-storage-daemon has no FTL)"
    );
    let image = if bdev == Bdev::Ftl { dir.path().join("media.img") } else { image };
    if bdev == Bdev::File || backend == Backend::Qsd {
        File::create(&image).unwrap().set_len(DISK_BYTES).unwrap();
    }
    let token = format!("{label}-{}", now_nanos());
    let serial = match backend {
        Backend::Vblkd => SERIAL,
        Backend::Qsd => QSD_SERIAL,
    };
    let envs_rw = vec![("GUEST_PERSIST_TOKEN", token.clone())];
    let mut envs_ro = envs_rw.clone();
    envs_ro.push(("GUEST_EXPECT_SERIAL", serial.to_string()));
    // Exercise the chardev reconnect= option on the 2-queue configurations.
    let reconnect = queues > 1;
    let rw = ExportCfg { queues, readonly: false };
    let ro = ExportCfg { queues, readonly: true };

    let d = Daemon::start(backend, dir.path(), bdev, &image, rw);
    run_guest(
        &format!("{label} boot A"),
        &d.socket,
        queues,
        reconnect,
        &envs_rw,
        &["fio-verify", "ext4", "discard", "persist-write"],
    );
    match bdev {
        Bdev::Ftl => {
            // Clean stop (the FTL persists its metadata), restart: the FTL is restored.
            d.stop();
            let d = Daemon::start(backend, dir.path(), bdev, &image, ro);
            run_guest(
                &format!("{label} boot B (daemon restarted, FTL restored, read-only)"),
                &d.socket,
                queues,
                reconnect,
                &envs_ro,
                &["persist-verify", "readonly"],
            );
            d.stop();
        }
        Bdev::File => {
            d.stop();
            // The pattern reached the backing file, not only a cache.
            let mut f = File::open(&image).unwrap();
            f.seek(SeekFrom::Start(TOKEN_OFFSET)).unwrap();
            let mut buf = vec![0u8; 4096];
            f.read_exact(&mut buf).unwrap();
            let want = format!("VBLKD-PERSIST {token}\n");
            assert!(
                buf.starts_with(want.as_bytes()),
                "[{label}] image file lacks the persistence token at {TOKEN_OFFSET}: {:?}",
                String::from_utf8_lossy(&buf[..64])
            );
            let d = Daemon::start(backend, dir.path(), bdev, &image, ro);
            run_guest(
                &format!("{label} boot B (daemon restarted, read-only)"),
                &d.socket,
                queues,
                reconnect,
                &envs_ro,
                &["persist-verify", "readonly"],
            );
            d.stop();
        }
        Bdev::Malloc | Bdev::Rbd => {
            run_guest(
                &format!("{label} boot B (guest power cycle)"),
                &d.socket,
                queues,
                reconnect,
                &envs_rw,
                &["persist-verify"],
            );
            d.stop();
            let d = Daemon::start(backend, dir.path(), bdev, &image, ro);
            run_guest(
                &format!("{label} boot C (read-only)"),
                &d.socket,
                queues,
                reconnect,
                &envs_ro,
                &["readonly"],
            );
            d.stop();
        }
    }
    if backend == Backend::Qsd {
        eprintln!("e2e: [{label}] NOTE: backend is qemu-storage-daemon (development stand-in), not vblkd");
    }
    eprintln!("e2e: [{label}] all workloads PASS in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The machine's one-node Ceph test cluster (started unless it already answers); its ceph.conf.
fn ceph_conf() -> PathBuf {
    let out = Command::new("bash").arg(repo().join("scripts/ceph-cluster.sh")).arg("start").output().unwrap();
    assert!(out.status.success(), "ceph-cluster.sh start: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// ext4 + fio verify on an RBD image, 2 queues.
#[test]
fn guest_rbd_2q() {
    let _guard = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let dir = tempfile::Builder::new().prefix("vblkd-e2e").tempdir_in("/tmp").unwrap();
    let d = Daemon::start(
        Backend::Vblkd,
        dir.path(),
        Bdev::Rbd,
        &dir.path().join("unused"),
        ExportCfg { queues: 2, readonly: false },
    );
    run_guest("rbd/2q/vblkd", &d.socket, 2, true, &[], &["fio-verify", "ext4"]);
    d.stop();
    eprintln!("e2e: [rbd/2q/vblkd] all workloads PASS in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn guest_malloc_1q() {
    run_matrix(Bdev::Malloc, 1);
}

#[test]
fn guest_malloc_2q() {
    run_matrix(Bdev::Malloc, 2);
}

#[test]
fn guest_file_1q() {
    run_matrix(Bdev::File, 1);
}

#[test]
fn guest_file_2q() {
    run_matrix(Bdev::File, 2);
}

/// One boot of `fio-verify` and `ext4` on a vblkd built from `bdevs` (bottom-up; the top one must be
/// named `d0`; `DIR` in an argument is replaced by the test's temp dir). Adding a stack to the guest
/// matrix is one line in a `#[test] fn guest_stack_NAME()` (the `guest_stack_` prefix keeps it out of the
/// parallel first pass of `scripts/test.sh`), e.g. for a cache over the FTL:
/// `run_stack("cache-wb/ftl", &["driver=ftl,...,name=ftl0", "driver=malloc,name=cd,size=64M",
/// "driver=cache,name=d0,cache=cd,core=ftl0,mode=wb"], 1)`.
fn run_stack(label: &str, bdevs: &[&str], queues: u32) {
    let _guard = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let dir = tempfile::Builder::new().prefix("vblkd-e2e").tempdir_in("/tmp").unwrap();
    let socket = dir.path().join("vblkd.sock");
    let log = dir.path().join("daemon.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vblkd"));
    cmd.arg("--data-dir").arg(dir.path().join("data")).args(["--log-level", "info"]);
    for b in bdevs {
        cmd.arg("--bdev").arg(b.replace("DIR", &dir.path().display().to_string()));
    }
    cmd.arg("--export").arg(format!("bdev=d0,socket={},queues={queues},serial={SERIAL}", socket.display()));
    let out = File::create(&log).unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    eprintln!("e2e: starting backend: {cmd:?}");
    let child = cmd.spawn().expect("cannot start vblkd");
    let mut d = Daemon { backend: Backend::Vblkd, child: Some(child), socket, log };
    d.wait_for_socket();
    run_guest(label, &d.socket, queues, false, &[], &["fio-verify", "ext4"]);
    d.stop();
    eprintln!("e2e: [{label}] all workloads PASS in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn guest_stack_cache_wt_over_file() {
    run_stack(
        "cache-wt/file",
        &[
            "driver=file,name=core,path=DIR/core.img,size=256M",
            "driver=malloc,name=cd,size=64M",
            "driver=cache,name=d0,cache=cd,core=core,mode=wt",
        ],
        1,
    );
}

#[test]
fn guest_stack_cache_wb_over_file() {
    run_stack(
        "cache-wb/file",
        &[
            "driver=file,name=core,path=DIR/core.img,size=256M",
            "driver=malloc,name=cd,size=32M",
            "driver=cache,name=d0,cache=cd,core=core,mode=wb,cleaner=acp",
        ],
        2,
    );
}

#[test]
fn guest_stack_cache_wb_over_ftl() {
    run_stack(
        "cache-wb/ftl",
        &[
            "driver=ocssd-emu,name=o0,path=DIR/media.img,create=on,groups=2,pus=2,chunks=48,chunk-blocks=512",
            "driver=ftl,name=ftl0,base=o0,size=256M",
            "driver=malloc,name=cd,size=32M",
            "driver=cache,name=d0,cache=cd,core=ftl0,mode=wb",
        ],
        1,
    );
}

#[test]
fn guest_ftl_1q() {
    run_matrix(Bdev::Ftl, 1);
}

#[test]
fn guest_ftl_2q() {
    run_matrix(Bdev::Ftl, 2);
}
