//! The running daemon's state: its bdevs and exports, changed at start-up from the flags and at run
//! time from the control socket ([`crate::control`]).
//!
//! ```text
//!  main (flags) ──┐                       ┌─► Registry (bdevs, bottom-up)
//!                 ├─► Daemon ─────────────┤
//!  control socket ┘   (one Mutex, never   └─► exports: socket → (spec, stop eventfd, serving thread)
//!                      touched by pollers)
//! ```
//!
//! # Design
//! * Management operations are rare and may block (building a bdev, joining an export thread), so
//!   they are serialised by one `Mutex` over the export table; the I/O path never takes it: pollers
//!   only own their channels, and the registry's lock is only taken to open descriptors.
//! * Each export has its own stop eventfd, so one export can be removed while the others serve.
//!   Removing an export drains its in-flight requests, closes the connection (the frontend sees the
//!   device go away) and removes the socket.
//! * A bdev is removed only when nothing uses it: no export serves it and no stacked bdev claims it.
//!   Stacks are built bottom-up and torn down top-down.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::bdev::qos::QosLimits;
use crate::bdev::{Bdev, BdevIo, IoKind, Registry};
use crate::cli::{self, BdevSpec, ExportSpec};
use crate::vhost::{ExportConfig, ExportStatus, VhostError};

/// Errors of management operations; each names the parameter or object at fault.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A parameter is missing or invalid.
    #[error("{param}: {problem}")]
    InvalidParam {
        /// The parameter (or flag) name.
        param: String,
        /// What is wrong.
        problem: String,
    },
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object is in use.
    #[error("{0}")]
    Busy(String),
    /// The operation failed.
    #[error("{0}")]
    Failed(String),
}

impl DaemonError {
    fn param(param: &str, problem: impl std::fmt::Display) -> Self {
        Self::InvalidParam { param: param.to_string(), problem: problem.to_string() }
    }
}

type ExportThread = JoinHandle<Result<(), VhostError>>;

struct Export {
    spec: ExportSpec,
    status: Arc<ExportStatus>,
    stop: Arc<EventFd>,
    handle: Option<ExportThread>,
}

/// The daemon: bdev registry plus export table.
#[derive(Default)]
pub struct Daemon {
    registry: Arc<Registry>,
    exports: Mutex<Vec<Export>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens (or creates) an emulated OCSSD image into the process's media table.
pub fn open_media(spec: &BdevSpec) -> Result<(), String> {
    use crate::ocssd::table::{open_or_create, MediaTable};
    use crate::ocssd::{EmuConfig, MediaDevice};
    let BdevSpec::OcssdEmu { name, path, create, geometry, given, bad_chunks } = spec else {
        return Ok(());
    };
    let flag = |e: &dyn std::fmt::Display| format!("--bdev name={name}: {e}");
    let cfg = EmuConfig { geometry: *geometry, bad_chunks: bad_chunks.clone(), faults: Vec::new() };
    let (dev, created) = open_or_create(path, *create, &cfg).map_err(|e| flag(&e))?;
    if !created {
        // An existing image keeps its geometry: keys that disagree are refused, never applied.
        let g = dev.geometry();
        for (key, want, have) in [
            ("groups", geometry.num_grp, g.num_grp),
            ("pus", geometry.num_pu, g.num_pu),
            ("chunks", geometry.num_chk, g.num_chk),
            ("chunk-blocks", geometry.clba, g.clba),
            ("ws-min", geometry.ws_min, g.ws_min),
            ("ws-opt", geometry.ws_opt, g.ws_opt),
            ("oob-bytes", geometry.oob_bytes, g.oob_bytes),
        ] {
            if given.contains(&key) && want != have {
                return Err(flag(&format!(
                    "{key}={want}: the existing image {} has {key}={have} (it is never reformatted)",
                    path.display()
                )));
            }
        }
    } else {
        log::info!("created emulated OCSSD image {}", path.display());
    }
    let dev: Arc<dyn MediaDevice> = Arc::new(dev);
    if !MediaTable::global().insert(name, dev) {
        return Err(flag(&"a media device of this name already exists"));
    }
    Ok(())
}

/// Builds the module object for one bdev spec (stacked modules open their bases in `registry`).
pub fn build_bdev(spec: &BdevSpec, registry: &Registry) -> Result<Arc<dyn Bdev>, String> {
    use crate::bdev::file::{Engine, FileBdev};
    use crate::bdev::malloc::MallocBdev;
    use crate::bdev::null::NullBdev;
    let flag = |e: &dyn std::fmt::Display| format!("--bdev name={}: {e}", spec.name());
    Ok(match spec {
        BdevSpec::Malloc { name, size_bytes, block_size } => {
            Arc::new(MallocBdev::new(name, *size_bytes, *block_size).map_err(|e| flag(&e))?)
        }
        BdevSpec::Null { name, size_bytes, block_size } => {
            Arc::new(NullBdev::new(name, *size_bytes, *block_size).map_err(|e| flag(&e))?)
        }
        BdevSpec::File { name, path, size_bytes, block_size, direct, engine } => {
            let (engine, inline) = match engine {
                cli::FileEngine::Auto => (Engine::IoUring, true),
                cli::FileEngine::IoUring => (Engine::IoUring, false),
                cli::FileEngine::Threads => (Engine::Threads, false),
            };
            Arc::new(
                FileBdev::open_with_block_size(name, path, *size_bytes, *direct, engine, *block_size)
                    .map_err(|e| flag(&e))?
                    .with_inline(inline),
            )
        }
        BdevSpec::Cache(cfg) => crate::cache::CacheBdev::create(cfg, registry).map_err(|e| flag(&e))?,
        BdevSpec::OcssdEmu { .. } => return Err(flag(&"a media device is not a block bdev")),
        BdevSpec::Ftl { base, cfg, nv_cache } => {
            let nv = match nv_cache {
                Some(nv) => Some(registry.open(nv, true).map_err(|e| flag(&format!("nv-cache={nv}: {e}")))?),
                None => None,
            };
            let media = crate::ocssd::table::MediaTable::global().get(base).ok_or_else(|| {
                let hint = if registry.get(base).is_some() { " (it is a block bdev, not media)" } else { "" };
                flag(&format!("base={base}: no media device of that name{hint} (define it with --bdev driver=ocssd-emu,name={base},...)"))
            })?;
            Arc::new(crate::ftl::FtlBdev::open_with_nv(cfg.clone(), media, nv).map_err(|e| flag(&e))?)
        }
        BdevSpec::Delay { name, base, read_us, write_us, jitter_us } => {
            use crate::bdev::delay::{DelayBdev, DelayOptions};
            use std::time::Duration;
            let opts = DelayOptions {
                name: name.clone(),
                base: base.clone(),
                read: Duration::from_micros(*read_us),
                write: Duration::from_micros(*write_us),
                jitter: Duration::from_micros(*jitter_us),
            };
            Arc::new(DelayBdev::new(opts, registry).map_err(|e| flag(&e))?)
        }
        BdevSpec::Rbd { name, cfg } => {
            Arc::new(crate::bdev::rbd::RbdBdev::open(name, cfg).map_err(|e| flag(&e))?)
        }
    })
}

impl Daemon {
    /// An empty daemon.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bdev registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Builds and registers a bdev, with optional QoS limits.
    pub fn add_bdev(&self, spec: &BdevSpec, qos: QosLimits) -> Result<(), DaemonError> {
        qos.validate().map_err(|e| DaemonError::param("qos", e))?;
        if self.registry.get(spec.name()).is_some() {
            return Err(DaemonError::param("name", format!("bdev '{}' already exists", spec.name())));
        }
        if matches!(spec, BdevSpec::OcssdEmu { .. }) {
            // A media device is not a block bdev: it goes to the media table for an FTL to use.
            return open_media(spec).map_err(DaemonError::Failed);
        }
        let bdev = build_bdev(spec, &self.registry).map_err(DaemonError::Failed)?;
        self.registry.register(bdev.clone()).map_err(|e| DaemonError::param("name", e))?;
        if !qos.is_unlimited() {
            self.registry.set_qos(spec.name(), qos).map_err(|e| DaemonError::param("qos", e))?;
        }
        log::info!("bdev '{}' added ({} module)", spec.name(), bdev.info().module);
        Ok(())
    }

    /// Removes an unused bdev and shuts it down.
    pub fn remove_bdev(&self, name: &str) -> Result<(), DaemonError> {
        self.remove_bdev_with(name, false)
    }

    /// Removes a bdev; with `force`, also one claimed by a stacked bdev (a hot-remove, as a device
    /// that goes away: the bdev above it is told and removes itself in turn, e.g. a cache writes back
    /// what it can first). An exported bdev is refused either way.
    pub fn remove_bdev_with(&self, name: &str, force: bool) -> Result<(), DaemonError> {
        let bdev = self
            .registry
            .get(name)
            .ok_or_else(|| DaemonError::NotFound(format!("no bdev named '{name}'")))?;
        let canonical = bdev.info().name.clone();
        if let Some(ex) = lock(&self.exports).iter().find(|e| e.spec.bdev == canonical || e.spec.bdev == name)
        {
            return Err(DaemonError::Busy(format!(
                "bdev '{name}' is exported on {}: remove the export first",
                ex.spec.socket.display()
            )));
        }
        if let Ok(Some(by)) = self.registry.claimed_by(name) {
            if !force {
                return Err(DaemonError::Busy(format!(
                    "bdev '{name}' is claimed by '{by}': remove that first (or force=true to hot-remove it)"
                )));
            }
            log::warn!("bdev '{name}' (claimed by '{by}') is being hot-removed");
        }
        let bdev = self.registry.unregister(name).map_err(|e| DaemonError::NotFound(e.to_string()))?;
        bdev.shutdown().map_err(|e| DaemonError::Failed(format!("closing bdev '{name}': {e}")))?;
        log::info!("bdev '{canonical}' removed");
        Ok(())
    }

    /// Starts serving an export; returns the absolute socket path.
    pub fn add_export(&self, spec: ExportSpec) -> Result<PathBuf, DaemonError> {
        let mut exports = lock(&self.exports);
        if exports.iter().any(|e| e.spec.bdev == spec.bdev) {
            return Err(DaemonError::param("bdev", format!("bdev '{}' is already exported", spec.bdev)));
        }
        if exports.iter().any(|e| e.spec.socket == spec.socket) {
            return Err(DaemonError::param(
                "socket",
                format!("socket {} is already used by an export", spec.socket.display()),
            ));
        }
        crate::vhost::check_socket(&spec.socket)
            .map_err(|e| DaemonError::param("socket", format!("{}: {e}", spec.socket.display())))?;
        let sock = spec.socket.display().to_string();
        let desc = self
            .registry
            .open_with_remove(&spec.bdev, !spec.readonly, move |n| {
                log::error!("export on {sock}: bdev '{n}' was hot-removed; its I/O fails from now on");
            })
            .map_err(|e| DaemonError::param("bdev", e))?;
        let status = Arc::new(ExportStatus::default());
        let cfg = ExportConfig {
            socket: spec.socket.clone(),
            queues: spec.queues,
            queue_size: spec.queue_size,
            read_only: spec.readonly,
            serial: spec.serial.clone(),
            poll_us: spec.poll_us,
            poll_threads: spec.poll_threads,
            socket_perms: spec.socket_perms,
            status: status.clone(),
        };
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| DaemonError::Failed(format!("cannot create an eventfd: {e}")))?,
        );
        let handle = crate::vhost::serve(Arc::new(desc), cfg, stop.clone())
            .map_err(|e| DaemonError::Failed(format!("export of bdev '{}': {e}", spec.bdev)))?;
        let shown = std::path::absolute(&spec.socket).unwrap_or_else(|_| spec.socket.clone());
        exports.push(Export { spec, status, stop, handle: Some(handle) });
        Ok(shown)
    }

    /// Stops the export whose socket path or bdev name is `key`: in-flight requests finish, the
    /// frontend is disconnected, the socket is removed.
    pub fn remove_export(&self, key: &str) -> Result<ExportSpec, DaemonError> {
        let mut ex = {
            let mut exports = lock(&self.exports);
            let i = exports
                .iter()
                .position(|e| e.spec.bdev == key || e.spec.socket == std::path::Path::new(key))
                .ok_or_else(|| DaemonError::NotFound(format!("no export with socket or bdev '{key}'")))?;
            exports.remove(i)
        };
        stop_export(&mut ex)?;
        log::info!("export of bdev '{}' on {} removed", ex.spec.bdev, ex.spec.socket.display());
        Ok(ex.spec)
    }

    /// The exports being served.
    pub fn exports(&self) -> Vec<ExportSpec> {
        lock(&self.exports).iter().map(|e| e.spec.clone()).collect()
    }

    /// The exports with their live connection state: (spec, frontend connected, connections so far).
    pub fn export_states(&self) -> Vec<(ExportSpec, bool, u64)> {
        use std::sync::atomic::Ordering;
        lock(&self.exports)
            .iter()
            .map(|e| {
                let s = &e.status;
                (e.spec.clone(), s.connected.load(Ordering::Acquire), s.connections.load(Ordering::Acquire))
            })
            .collect()
    }

    /// Sends a reset to `name` from the calling thread and waits (bounded) for it.
    pub fn reset_bdev(&self, name: &str) -> Result<(), DaemonError> {
        let desc = self.registry.open(name, false).map_err(|e| DaemonError::NotFound(e.to_string()))?;
        let mut ch = desc.channel().map_err(|e| DaemonError::Failed(format!("bdev '{name}': {e}")))?;
        ch.submit(BdevIo::no_data(IoKind::Reset, 0, 0, 1));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut done = Vec::new();
        loop {
            ch.poll(&mut done);
            if let Some(c) = done.first() {
                return c.result.map_err(|e| DaemonError::Failed(format!("reset of bdev '{name}': {e}")));
            }
            if std::time::Instant::now() > deadline {
                return Err(DaemonError::Failed(format!("reset of bdev '{name}' did not finish in 30 s")));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Stops every export (reverse order) then shuts every bdev down top-down. Returns false when
    /// anything failed (logged).
    pub fn shutdown(&self) -> bool {
        let mut ok = true;
        let exports = std::mem::take(&mut *lock(&self.exports));
        // Signal all first so they drain in parallel, then join.
        for ex in &exports {
            if let Err(e) = ex.stop.write(1) {
                log::error!("signalling export '{}' to stop: {e}", ex.spec.bdev);
            }
        }
        for mut ex in exports.into_iter().rev() {
            if let Err(e) = stop_export(&mut ex) {
                log::error!("export '{}': {e}", ex.spec.bdev);
                ok = false;
            }
        }
        for name in self.registry.names().into_iter().rev() {
            match self.registry.unregister(&name) {
                Ok(bdev) => {
                    if let Err(e) = bdev.shutdown() {
                        log::error!("closing bdev '{name}': {e}");
                        ok = false;
                    }
                }
                Err(e) => log::error!("removing bdev '{name}': {e}"),
            }
        }
        ok
    }
}

fn stop_export(ex: &mut Export) -> Result<(), DaemonError> {
    ex.stop.write(1).map_err(|e| DaemonError::Failed(format!("signalling the export to stop: {e}")))?;
    match ex.handle.take().map(JoinHandle::join) {
        None | Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(DaemonError::Failed(e.to_string())),
        Some(Err(_)) => Err(DaemonError::Failed("export thread panicked".into())),
    }
}
