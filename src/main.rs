//! `vblkd`: parse flags → build the bdev stack → start exports → wait for a signal → tear down.
//!
//! Signals: SIGINT/SIGTERM stop gracefully (finish in-flight I/O, flush and close every bdev, remove
//! the sockets, exit 0); SIGUSR1 prints statistics as JSON on stdout.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vblkd::cli::{self, Args, Command, Config};
use vblkd::daemon::Daemon;
use vmm_sys_util::eventfd::EventFd;

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Media(cmd)) => {
            return match vblkd::ocssd::cli::run(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vblkd media: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Ctl(ctl)) => {
            return match vblkd::ctl::call(&ctl) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vblkd ctl: {e}");
                    ExitCode::from(e.exit_code())
                }
            };
        }
        Some(Command::Cache(cli::CacheCommand::Info { cache, control })) => {
            return match vblkd::cache::info::info_any(&cache, &control) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vblkd cache info: --cache {e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Ftl(cmd)) => {
            return match vblkd::ftl::cli::run_to(cmd, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vblkd ftl: {e}");
                    ExitCode::from(2)
                }
            };
        }
        None => {}
    }
    let config = match cli::build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vblkd: {e}");
            return ExitCode::from(2);
        }
    };
    // The logger passes everything; `log`'s max level gates, so `vblkd ctl log-level` can change it.
    env_logger::Builder::new().filter_level(log::LevelFilter::Trace).format_timestamp_micros().init();
    log::set_max_level(config.log_level);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        // README: every start-up error exits 2 before anything is served; 1 only for errors while
        // stopping (a bdev that fails to flush or close, an export thread that failed).
        Err(RunError::Startup(e)) => {
            eprintln!("vblkd: {e}");
            ExitCode::from(2)
        }
        Err(RunError::Shutdown(e)) => {
            eprintln!("vblkd: {e}");
            ExitCode::from(1)
        }
    }
}

/// Why `run` failed: before serving (exit 2) or while stopping (exit 1).
enum RunError {
    Startup(String),
    Shutdown(String),
}

/// Errors before the daemon serves are start-up errors.
impl From<String> for RunError {
    fn from(e: String) -> Self {
        Self::Startup(e)
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

fn run(config: Config) -> Result<(), RunError> {
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
    if !config.poll_cpus.is_empty() {
        vblkd::vhost::pin::set_poll_cpus(config.poll_cpus.clone());
    }
    let daemon = Arc::new(Daemon::new());
    for spec in &config.bdevs {
        let limits = config.qos.iter().find(|(n, _)| n == spec.name()).map(|(_, l)| *l).unwrap_or_default();
        if let Err(e) = daemon.add_bdev(spec, limits) {
            daemon.shutdown();
            return Err(RunError::Startup(match e {
                vblkd::daemon::DaemonError::Failed(m) => m,
                e => format!("--bdev name={}: {e}", spec.name()),
            }));
        }
    }
    let stop = Arc::new(
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("cannot create the stop eventfd: {e}"))?,
    );
    let mut services = Vec::new();
    if let Some(path) = &config.control {
        if !config.control_explicit {
            // The default path lives in the data directory.
            let _ = std::fs::create_dir_all(&config.data_dir);
        }
        match vblkd::control::start(path, daemon.clone(), stop.clone()) {
            Ok(h) => services.push(h),
            Err(e) if !config.control_explicit => {
                log::warn!(
                    "no control socket at the default path {}: {e} (use --control PATH)",
                    path.display()
                )
            }
            Err(e) => {
                daemon.shutdown();
                return Err(RunError::Startup(format!("--control {}: {e}", path.display())));
            }
        }
    }
    if let Some(addr) = config.metrics {
        match vblkd::metrics::start(addr, daemon.clone(), stop.clone()) {
            Ok((bound, h)) => {
                println!("vblkd: metrics on http://{bound}/metrics");
                services.push(h);
            }
            Err(e) => {
                let _ = stop.write(1);
                daemon.shutdown();
                return Err(RunError::Startup(format!("--metrics {addr}: cannot listen: {e}")));
            }
        }
    }
    for ex in &config.exports {
        let shown = match daemon.add_export(ex.clone()) {
            Ok(p) => p,
            Err(e) => {
                let _ = stop.write(1);
                daemon.shutdown();
                return Err(RunError::Startup(format!("--export bdev={}: {e}", ex.bdev)));
            }
        };
        println!("vblkd: serving bdev '{}' on {}", ex.bdev, shown.display());
        println!(
            "vblkd: attach with: qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on \
             -numa node,memdev=mem -m 1G -chardev socket,id=c0,path={} \
             -device vhost-user-blk-pci,chardev=c0,num-queues={}",
            shown.display(),
            ex.queues
        );
    }
    loop {
        match wait_signal(&sigset) {
            libc::SIGUSR1 => println!("{}", daemon.registry().stats_json()),
            sig => {
                log::info!("signal {sig}: stopping");
                break;
            }
        }
    }
    // Top-down teardown: control and metrics, exports (finish in-flight I/O, remove sockets), then
    // bdevs in reverse order.
    if let Err(e) = stop.write(1) {
        log::error!("signalling the services to stop: {e}");
    }
    for h in services {
        let _ = h.join();
    }
    if daemon.shutdown() {
        log::info!("stopped cleanly");
        Ok(())
    } else {
        Err(RunError::Shutdown("errors during shutdown (see log)".into()))
    }
}
