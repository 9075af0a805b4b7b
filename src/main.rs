//! `vblkd`: parse flags → build the bdev stack → start exports → wait for a signal → tear down.
//!
//! Signals: SIGINT/SIGTERM stop gracefully (finish in-flight I/O, flush and close every bdev, remove
//! the sockets, exit 0); SIGUSR1 prints statistics as JSON on stdout.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vblkd::bdev::{Bdev, Registry};
use vblkd::cli::{self, Args, BdevSpec, Command, Config, ExportSpec};
use vblkd::vhost::ExportConfig;
use vmm_sys_util::eventfd::EventFd;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Media(cmd)) = args.command {
        return match vblkd::ocssd::cli::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vblkd media: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = match cli::build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vblkd: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new().filter_level(config.log_level).format_timestamp_micros().init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vblkd: {e}");
            ExitCode::from(1)
        }
    }
}

/// Blocks the stop/stats signals in this thread (and every thread it spawns later) so `sigwait` sees them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        libc::SIGTERM
    } else {
        sig
    }
}

fn build_bdev(spec: &BdevSpec, registry: &Registry) -> Result<Arc<dyn Bdev>, String> {
    use vblkd::bdev::file::{Engine, FileBdev};
    use vblkd::bdev::malloc::MallocBdev;
    use vblkd::bdev::null::NullBdev;
    let flag = |e: &dyn std::fmt::Display| format!("--bdev name={}: {e}", spec.name());
    Ok(match spec {
        BdevSpec::Malloc { name, size_bytes, block_size } => {
            Arc::new(MallocBdev::new(name, *size_bytes, *block_size).map_err(|e| flag(&e))?)
        }
        BdevSpec::Null { name, size_bytes, block_size } => {
            Arc::new(NullBdev::new(name, *size_bytes, *block_size).map_err(|e| flag(&e))?)
        }
        BdevSpec::File { name, path, size_bytes, block_size, direct, engine } => {
            let engine = match engine {
                cli::FileEngine::IoUring => Engine::IoUring,
                cli::FileEngine::Threads => Engine::Threads,
            };
            Arc::new(
                FileBdev::open_with_block_size(name, path, *size_bytes, *direct, engine, *block_size)
                    .map_err(|e| flag(&e))?,
            )
        }
        BdevSpec::Delay { name, base, read_us, write_us, jitter_us } => {
            use std::time::Duration;
            use vblkd::bdev::delay::{DelayBdev, DelayOptions};
            let opts = DelayOptions {
                name: name.clone(),
                base: base.clone(),
                read: Duration::from_micros(*read_us),
                write: Duration::from_micros(*write_us),
                jitter: Duration::from_micros(*jitter_us),
            };
            Arc::new(DelayBdev::new(opts, registry).map_err(|e| flag(&e))?)
        }
    })
}

type ExportThread = std::thread::JoinHandle<Result<(), vblkd::vhost::VhostError>>;

fn start_export(registry: &Registry, ex: &ExportSpec, stop: &Arc<EventFd>) -> Result<ExportThread, String> {
    let desc = registry.open(&ex.bdev, !ex.readonly).map_err(|e| e.to_string())?;
    let cfg = ExportConfig {
        socket: ex.socket.clone(),
        queues: ex.queues,
        queue_size: ex.queue_size,
        read_only: ex.readonly,
        serial: ex.serial.clone(),
        poll_us: ex.poll_us,
    };
    vblkd::vhost::serve(Arc::new(desc), cfg, stop.clone()).map_err(|e| e.to_string())
}

fn run(config: Config) -> Result<(), String> {
    let sigset = block_signals();
    if config.is_default {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("--data-dir {}: cannot create: {e}", config.data_dir.display()))?;
    }
    // Sockets first: a live daemon on a path is an error before anything is built.
    for ex in &config.exports {
        // A stale socket file is replaced when the export binds it.
        vblkd::vhost::check_socket(&ex.socket)
            .map_err(|e| format!("--export socket={}: {e}", ex.socket.display()))?;
    }
    let registry = Arc::new(Registry::new());
    for spec in &config.bdevs {
        let bdev = build_bdev(spec, &registry)?;
        registry.register(bdev).map_err(|e| format!("--bdev name={}: {e}", spec.name()))?;
    }
    let stop = Arc::new(
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("cannot create the stop eventfd: {e}"))?,
    );
    let mut exports = Vec::new();
    for ex in &config.exports {
        let handle =
            start_export(&registry, ex, &stop).map_err(|e| format!("--export bdev={}: {e}", ex.bdev))?;
        let shown = std::path::absolute(&ex.socket).unwrap_or_else(|_| ex.socket.clone());
        println!("vblkd: serving bdev '{}' on {}", ex.bdev, shown.display());
        println!(
            "vblkd: attach with: qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on \
             -numa node,memdev=mem -m 1G -chardev socket,id=c0,path={} \
             -device vhost-user-blk-pci,chardev=c0,num-queues={}",
            shown.display(),
            ex.queues
        );
        exports.push((ex.bdev.clone(), handle));
    }
    loop {
        match wait_signal(&sigset) {
            libc::SIGUSR1 => println!("{}", registry.stats_json()),
            sig => {
                log::info!("signal {sig}: stopping");
                break;
            }
        }
    }
    // Top-down teardown: exports (finish in-flight I/O, remove sockets), then bdevs in reverse order.
    let mut failed = false;
    if let Err(e) = stop.write(1) {
        log::error!("signalling the exports to stop: {e}");
    }
    for (name, handle) in exports.into_iter().rev() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::error!("export '{name}': {e}");
                failed = true;
            }
            Err(_) => {
                log::error!("export '{name}': thread panicked");
                failed = true;
            }
        }
    }
    for name in registry.names().into_iter().rev() {
        match registry.unregister(&name) {
            Ok(bdev) => {
                if let Err(e) = bdev.shutdown() {
                    log::error!("closing bdev '{name}': {e}");
                    failed = true;
                }
            }
            Err(e) => log::error!("removing bdev '{name}': {e}"),
        }
    }
    if failed {
        Err("errors during shutdown (see log)".into())
    } else {
        log::info!("stopped cleanly");
        Ok(())
    }
}
