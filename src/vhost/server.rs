//! Serving one export on a UNIX socket: listen, serve a frontend, re-listen; stop on request.
//!
//! ```text
//!  serve() ─ bind (stale-socket check) ─► thread: loop { poll(listener, stop)
//!                                                      ─► fresh BlkBackend + VhostUserDaemon, start
//!                                                      ─► poll(disconnected, stop) }
//!            on stop: drain in-flight I/O, close the connection, remove the socket
//! ```
//!
//! # Design
//! A fresh backend and daemon per connection keeps no state across frontends; what survives a
//! restart lives in the frontend's in-flight table (`INFLIGHT_SHMFD`, [`super::inflight`]). The stop signal is an `EventFd`
//! that the caller writes once; it is never read here, so one fd can stop several exports.
//!
//! The frontend's connection is accepted here and served by the front door
//! ([`super::frontdoor::run_proxy`]); vhost-user-backend's daemon gets the other end of a socket on
//! a private (0700, `mkdtemp`) path, which is removed as soon as the daemon has accepted it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::BlkConfig;
use super::device::{BlkBackend, InflightSlot};
use super::frontdoor::{run_proxy, FrontDoor, LocalHandler, Refusal};
use super::inflight::InflightRegion;
use super::request::GuestMem;
use super::socket::{bind_listener, SocketError, SocketFile, SocketPerms};
use crate::bdev::Descriptor;

/// Largest queue size offered.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues per export (queue masks are u64 bitmasks).
pub const MAX_QUEUES: u16 = 64;

/// Options of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Number of virtqueues (1..=64).
    pub queues: u16,
    /// Maximum queue size offered (power of two, 4..=1024).
    pub queue_size: u16,
    /// Export read-only (`VIRTIO_BLK_F_RO`); forced when the descriptor is read-only.
    pub read_only: bool,
    /// GET_ID serial (up to 20 bytes).
    pub serial: String,
    /// Busy-poll time before a poller sleeps, microseconds.
    pub poll_us: u64,
    /// Poller threads serving the queues (`poll-threads`); 0 = one per queue.
    pub poll_threads: u16,
    /// Owner, group and mode of the socket file, applied before it accepts.
    pub socket_perms: SocketPerms,
    /// Live connection state, for the control socket and metrics.
    pub status: Arc<ExportStatus>,
}

/// What an export's serving thread reports while it runs.
#[derive(Debug, Default)]
pub struct ExportStatus {
    /// A frontend is connected right now.
    pub connected: std::sync::atomic::AtomicBool,
    /// Frontends accepted since the export started.
    pub connections: std::sync::atomic::AtomicU64,
}

impl PartialEq for ExportStatus {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for ExportStatus {}

/// The default number of queues: the CPU count, within 1..=[`MAX_QUEUES`].
pub fn default_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from(cpus).unwrap_or(MAX_QUEUES).clamp(1, MAX_QUEUES)
}

impl ExportConfig {
    /// Defaults: one queue per CPU, queue size 256, read-write, serial = bdev name, 50 µs polling.
    pub fn new(socket: impl Into<PathBuf>, serial: &str) -> Self {
        Self {
            socket: socket.into(),
            queues: default_queues(),
            queue_size: 256,
            read_only: false,
            serial: serial.to_string(),
            poll_us: 50,
            poll_threads: 0,
            socket_perms: SocketPerms::default(),
            status: Arc::default(),
        }
    }
}

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// A live daemon answers on the socket path.
    #[error("socket path {0} is in use by a running daemon")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Bad export options.
    #[error("{0}")]
    InvalidConfig(String),
    /// An OS error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be created with the requested ownership and mode.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// vhost-user-backend failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VhostError {
    let context = context.into();
    move |source| VhostError::Io { context, source }
}

/// Starts serving `desc` on `cfg.socket`; returns once the socket is bound.
///
/// The returned thread serves one frontend at a time and goes back to listening when it
/// disconnects. Write to `stop` (e.g. from the SIGTERM handler: `stop.write(1)`) to end it: in-flight
/// requests finish, the connection closes, the socket file is removed, and the thread returns.
pub fn serve(
    desc: Arc<Descriptor>,
    cfg: ExportConfig,
    stop: Arc<EventFd>,
) -> Result<JoinHandle<Result<(), VhostError>>, VhostError> {
    if cfg.queues == 0 || cfg.queues > MAX_QUEUES {
        return Err(VhostError::InvalidConfig(format!("queues={} must be 1..={MAX_QUEUES}", cfg.queues)));
    }
    if !cfg.queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&cfg.queue_size) {
        return Err(VhostError::InvalidConfig(format!(
            "queue-size={} must be a power of two in 4..={MAX_QUEUE_SIZE}",
            cfg.queue_size
        )));
    }
    prepare_socket(&cfg.socket)?;
    // Bound, given its owner/group/mode, then listening (no window with the wrong permissions).
    let listener = Listener::from(bind_listener(&cfg.socket, &cfg.socket_perms)?);
    let socket_file = SocketFile(cfg.socket.clone());
    info!("export '{}' listening on {}", desc.info().name, cfg.socket.display());
    std::thread::Builder::new()
        .name(format!("vhost-{}", desc.info().name))
        .spawn(move || {
            let _remove_at_end = socket_file;
            serve_loop(desc, cfg, stop, listener)
        })
        .map_err(io_err("spawning the export thread"))
}

/// Checks a socket path before anything is bound: `Ok(false)` when nothing is there, `Ok(true)` when a
/// stale socket file is (nobody accepts on it: safe to replace); a live daemon's socket or a
/// non-socket is refused. Changes nothing.
pub fn check_socket(path: &Path) -> Result<bool, VhostError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(format!("checking {}", path.display()))(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(VhostError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(VhostError::InUse(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(true),
        Err(e) => Err(io_err(format!("probing {}", path.display()))(e)),
    }
}

/// Removes a stale socket file (nobody listening); refuses a live one or a non-socket.
fn prepare_socket(path: &Path) -> Result<(), VhostError> {
    if check_socket(path)? {
        warn!("removing stale socket {}", path.display());
        std::fs::remove_file(path).map_err(io_err(format!("removing stale socket {}", path.display())))?;
    }
    Ok(())
}

/// Waits until one of `fds` is readable; returns their readiness.
fn wait_readable(fds: &[RawFd]) -> std::io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Answers GET/SET_INFLIGHT_FD and puts the table where the connection's workers find it.
struct InflightHandler {
    slot: InflightSlot,
    num_queues: u16,
}

fn inflight_msg(body: &[u8]) -> (u64, u64, u16, u16) {
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let u16_at = |i: usize| u16::from_le_bytes([body[i], body[i + 1]]);
    (u64_at(0), u64_at(8), u16_at(16), u16_at(18))
}

impl LocalHandler for InflightHandler {
    fn get_inflight_fd(&self, body: &[u8]) -> Result<(Vec<u8>, std::os::fd::OwnedFd), Refusal> {
        let (_, _, num_queues, queue_size) = inflight_msg(body);
        if num_queues > self.num_queues {
            return Err(Refusal::Local(format!(
                "GET_INFLIGHT_FD for {num_queues} queues; the export has {}",
                self.num_queues
            )));
        }
        let region =
            InflightRegion::create(num_queues, queue_size).map_err(|e| Refusal::Local(e.to_string()))?;
        let fd = region.fd().try_clone().map_err(|e| Refusal::Local(format!("dup: {e}")))?;
        let reply = region.reply().to_vec();
        info!("in-flight table: {num_queues} queues of {queue_size}");
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        Ok((reply, fd))
    }

    fn set_inflight_fd(&self, body: &[u8], fd: std::os::fd::OwnedFd) -> Result<(), Refusal> {
        let (size, offset, num_queues, queue_size) = inflight_msg(body);
        if num_queues > self.num_queues {
            return Err(Refusal::Local(format!(
                "SET_INFLIGHT_FD for {num_queues} queues; the export has {}",
                self.num_queues
            )));
        }
        let region = InflightRegion::open(fd, size, offset, num_queues, queue_size)
            .map_err(|e| Refusal::Local(e.to_string()))?;
        info!("in-flight table handed back: {num_queues} queues of {queue_size}");
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        Ok(())
    }
}

/// A fresh private directory (mode 0700) under the temp dir.
fn private_dir() -> std::io::Result<PathBuf> {
    let mut tmpl = std::env::temp_dir().join("vblkd-door-XXXXXX").into_os_string().into_encoded_bytes();
    tmpl.push(0);
    // SAFETY: mkdtemp rewrites the NUL-terminated template in place.
    let p = unsafe { libc::mkdtemp(tmpl.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    tmpl.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(tmpl)))
}

/// Starts `daemon` on a private socket and returns our end of its connection.
fn connect_daemon(daemon: &mut VhostUserDaemon<BlkBackend>) -> Result<UnixStream, String> {
    let dir = private_dir().map_err(|e| format!("private socket directory: {e}"))?;
    let path = dir.join("backend.sock");
    let result = (|| {
        let mut inner = Listener::new(&path, true).map_err(|e| format!("private socket: {e}"))?;
        let ours = UnixStream::connect(&path).map_err(|e| format!("private socket: {e}"))?;
        daemon.start(&mut inner).map_err(|e| format!("daemon: {e}"))?;
        Ok(ours)
    })();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn serve_loop(
    desc: Arc<Descriptor>,
    cfg: ExportConfig,
    stop: Arc<EventFd>,
    listener: Listener,
) -> Result<(), VhostError> {
    let read_only = cfg.read_only || !desc.writable();
    let blk = BlkConfig::new(desc.info(), cfg.queues, cfg.queue_size, read_only);
    let poll = Duration::from_micros(cfg.poll_us);
    let name = desc.info().name.clone();
    loop {
        let ready = wait_readable(&[listener.as_raw_fd(), stop.as_raw_fd()]).map_err(io_err("poll"))?;
        if ready[1] {
            break;
        }
        let frontend = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                error!("{name}: cannot accept a frontend: {e}");
                continue;
            }
        };
        let backend = BlkBackend::new(desc.clone(), blk, &cfg.serial, poll, cfg.poll_threads);
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-{name}"),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMem::new()),
        )
        .map_err(|e| VhostError::Daemon(e.to_string()))?;
        backend.set_epoll_fds(daemon.get_epoll_handlers().iter().map(|h| h.as_raw_fd()).collect());
        let to_daemon = match connect_daemon(&mut daemon) {
            Ok(s) => s,
            Err(e) => {
                error!("{name}: cannot start the vhost-user daemon: {e}");
                continue;
            }
        };
        let door = FrontDoor::new(
            blk.num_queues,
            u16::try_from(vhost_user_backend::VhostUserBackend::max_queue_size(&backend))
                .unwrap_or(MAX_QUEUE_SIZE),
            blk.features,
            (vhost_user_backend::VhostUserBackend::protocol_features(&backend)
                | vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK)
                .bits(),
            super::frontdoor::pf::INFLIGHT_SHMFD,
        );
        let local: Arc<dyn LocalHandler> =
            Arc::new(InflightHandler { slot: backend.inflight_slot(), num_queues: blk.num_queues });
        let proxy_name = format!("{name}-door");
        let proxy = std::thread::Builder::new()
            .name(proxy_name.clone())
            .spawn(move || run_proxy(&proxy_name, frontend, to_daemon, door, local))
            .map_err(io_err("spawning the front door thread"))?;
        info!("{name}: frontend connected");
        cfg.status.connected.store(true, std::sync::atomic::Ordering::Release);
        cfg.status.connections.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let shutdown = daemon.shutdown_handle();
        let done = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let done_w = done.try_clone().map_err(io_err("eventfd"))?;
        let waiter = std::thread::Builder::new()
            .name(format!("vhost-{name}-wait"))
            .spawn(move || {
                let r = daemon.wait();
                let _ = done_w.write(1);
                r
            })
            .map_err(io_err("spawning the wait thread"))?;
        let ready = wait_readable(&[done.as_raw_fd(), stop.as_raw_fd()]).map_err(io_err("poll"))?;
        let stopping = !ready[0] && ready[1];
        if stopping {
            info!("{name}: stopping: finishing in-flight requests");
            backend.drain_all();
            if let Some(h) = shutdown {
                h.shutdown();
            }
        }
        match waiter.join() {
            Ok(Ok(())) => info!("{name}: frontend disconnected"),
            // A frontend closing its socket surfaces as a "peer disconnected" handler error: normal.
            Ok(Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected))) => {
                info!("{name}: frontend disconnected")
            }
            Ok(Err(e)) => warn!("{name}: connection ended: {e}"),
            Err(_) => error!("{name}: connection thread panicked"),
        }
        cfg.status.connected.store(false, std::sync::atomic::Ordering::Release);
        if proxy.join().is_err() {
            error!("{name}: front door thread panicked");
        }
        backend.drain_all();
        if stopping {
            break;
        }
    }
    drop(listener);
    info!("{name}: export stopped");
    Ok(())
}
