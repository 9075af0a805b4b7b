//! Command-line grammar (SPEC §6) and its errors.
//!
//! ```text
//! vblkd [--data-dir DIR] [--bdev KEY=VAL,...]... [--export KEY=VAL,...]... [--log-level LEVEL]
//!   --bdev driver=malloc,name=m0,size=1G[,block-size=512|4096]
//!   --bdev driver=null,name=n0,size=1T[,block-size=...]
//!   --bdev driver=file,name=f0,path=disk.img[,size=1G][,direct=on|off][,engine=auto|io_uring|threads][,block-size=...]
//!   --bdev driver=rbd,name=r0,pool=rbd,image=NAME[,conf=PATH][,user=admin][,keyring=PATH][,create=SIZE][,timeout=S]
//!   --bdev driver=cache,name=c0,cache=BDEV,core=BDEV[,mode=wt|wb|wa|pt|wi|wo][,line-size=4K..64K]
//!          [,cleaner=alru|acp|nop][,alru-wake-ms=N][,alru-stale-ms=N][,clean-batch=N]
//!          [,seq-cutoff=off|full|always][,seq-cutoff-size=1M][,load=auto|on|off]
//!   --bdev driver=ocssd-emu,name=o0,path=media.img[,create=on,groups=G,pus=U,chunks=C,chunk-blocks=B,
//!          ws-min=N,ws-opt=N,oob-bytes=N,bad-chunks=GRP:PU:CHK+...]
//!   --bdev driver=ftl,name=ftl0,base=o0[,punits=B-E][,mode=auto|create|restore][,force=on][,uuid=U]
//!          [,wbuf=6M][,lba-rsvd=20][,band-thld=90][,invalid-thld=10][,reloc-qdepth=32][,reloc-bands=3]
//!          [,interleave=1][,size=BYTES][,nv-cache=BDEV]
//!   --bdev driver=delay,name=d0,base=f0,read-us=N,write-us=N[,jitter-us=N]
//!   --export bdev=m0,socket=PATH[,queues=N][,queue-size=N][,readonly=on][,serial=STR][,poll-us=N][,poll-threads=N]
//!            [,socket-mode=0660][,socket-owner=USER][,socket-group=GROUP]
//! vblkd media create|info ...
//! vblkd cache info --cache BDEV-OR-PATH [--control PATH]
//! ```
//!
//! # Design
//! clap parses the flags into strings; this module turns each `KEY=VAL,...` list into a typed spec and
//! checks everything that can be checked before any bdev is built, so a bad command line exits before
//! anything is served. Every error names the flag and the problem.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::bdev::qos::QosLimits;
use crate::ftl::cli::FtlCommand;
use crate::ftl::{FtlConfig, Mode as FtlMode};
use crate::ocssd::cli::MediaCommand;
use crate::ocssd::{EmuGeometry, Ppa};

/// Size of the default file disk served when no `--bdev`/`--export` is given.
pub const DEFAULT_DISK_BYTES: u64 = 1 << 30;
pub use crate::vhost::{MAX_QUEUES, MAX_QUEUE_SIZE};

/// The raw command line.
#[derive(Debug, Parser)]
#[command(
    name = "vblkd",
    version,
    about = "vhost-user-blk backend daemon",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Directory for the default disk image and socket.
    #[arg(long, value_name = "DIR", default_value = "vblkd-data")]
    pub data_dir: PathBuf,
    /// A bdev: driver=malloc|null|file,name=NAME,... (repeatable, built in order).
    #[arg(long = "bdev", value_name = "KEY=VAL,...")]
    pub bdevs: Vec<String>,
    /// An export: bdev=NAME,socket=PATH,... (repeatable).
    #[arg(long = "export", value_name = "KEY=VAL,...")]
    pub exports: Vec<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
    /// Control socket (JSON-RPC): a path, or `none`. Default: DATA_DIR/vblkd.ctl.
    #[arg(long, value_name = "PATH|none")]
    pub control: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Pin poller threads to these CPUs, round-robin (e.g. 2,3 or 0-3).
    #[arg(long, value_name = "LIST")]
    pub poll_cpus: Option<String>,
    /// Subcommands (media tools).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Emulated OCSSD media images.
    #[command(subcommand)]
    Media(MediaCommand),
    /// Send one request to a running daemon's control socket and print the JSON result.
    Ctl(CtlArgs),
    /// Cache devices.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// FTL tools.
    #[command(subcommand)]
    Ftl(FtlCommand),
}

/// `vblkd ctl [--control PATH] METHOD [key=value | value]...`
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = "vblkd-data/vblkd.ctl")]
    pub control: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
    /// The method (bdev-list, bdev-stats, bdev-add, bdev-remove, export-list, export-add,
    /// export-remove, qos-set, bdev-reset, log-level).
    pub method: String,
    /// Parameters as key=value; a bare first value is the method's main parameter (a name, a level,
    /// a socket or bdev).
    pub params: Vec<String>,
}

/// `vblkd cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print a cache's metadata and statistics as JSON (never modifies the device).
    Info {
        /// A cache bdev of the running daemon (asked through its control socket), or a cache device
        /// path (an image file or block device, read directly).
        #[arg(long, value_name = "BDEV-OR-PATH")]
        cache: String,
        /// The running daemon's control socket (used when --cache is a bdev name).
        #[arg(long, value_name = "PATH", default_value = "vblkd-data/vblkd.ctl")]
        control: PathBuf,
    },
}

/// I/O engine of a file bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEngine {
    /// Cache hits inline on the poller thread (`RWF_NOWAIT`), the rest on io_uring (the default).
    Auto,
    /// io_uring (falls back to threads when unavailable).
    IoUring,
    /// A thread pool doing preadv/pwritev.
    Threads,
}

/// One bdev to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevSpec {
    /// RAM disk.
    Malloc {
        /// Name.
        name: String,
        /// Size in bytes.
        size_bytes: u64,
        /// Block size.
        block_size: u32,
    },
    /// No data.
    Null {
        /// Name.
        name: String,
        /// Size in bytes.
        size_bytes: u64,
        /// Block size.
        block_size: u32,
    },
    /// A file or block device.
    File {
        /// Name.
        name: String,
        /// Path of the file.
        path: PathBuf,
        /// Size in bytes (required when the file does not exist).
        size_bytes: Option<u64>,
        /// Block size.
        block_size: u32,
        /// O_DIRECT.
        direct: bool,
        /// Engine.
        engine: FileEngine,
    },
    /// A Ceph RBD image.
    Rbd {
        /// Name.
        name: String,
        /// Pool, image, credentials, create and time-out options.
        cfg: crate::bdev::rbd::RbdConfig,
    },
    /// A cache bdev over a core, on a cache device.
    Cache(crate::cache::CacheConfig),
    /// An emulated OCSSD image (a media device, not a block bdev: see `ocssd::table`).
    OcssdEmu {
        /// Name.
        name: String,
        /// Image path.
        path: PathBuf,
        /// Create the image when it does not exist.
        create: bool,
        /// Geometry for a new image (keys given on the command line are checked against an
        /// existing image).
        geometry: EmuGeometry,
        /// Geometry keys given explicitly.
        given: Vec<&'static str>,
        /// Chunks offline at creation.
        bad_chunks: Vec<Ppa>,
    },
    /// The FTL over a media device.
    Ftl {
        /// Media device name.
        base: String,
        /// Configuration (holds the name).
        cfg: FtlConfig,
        /// Non-volatile cache bdev (refused: not implemented).
        nv_cache: Option<String>,
    },
    /// Delays every completion of `base` (stacked; `base` is defined by an earlier `--bdev`).
    Delay {
        /// Name.
        name: String,
        /// Base bdev.
        base: String,
        /// Read delay, µs.
        read_us: u64,
        /// Write (and other kinds) delay, µs.
        write_us: u64,
        /// Jitter either way, µs.
        jitter_us: u64,
    },
}

impl BdevSpec {
    /// The bdev's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Malloc { name, .. }
            | Self::Null { name, .. }
            | Self::File { name, .. }
            | Self::OcssdEmu { name, .. } => name,
            Self::Ftl { cfg, .. } => &cfg.name,
            Self::Rbd { name, .. } => name,
            Self::Cache(c) => &c.name,
            Self::Delay { name, .. } => name,
        }
    }
}

/// One export to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Bdev name.
    pub bdev: String,
    /// Socket path.
    pub socket: PathBuf,
    /// Queues offered.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Read-only export.
    pub readonly: bool,
    /// GET_ID serial (at most 20 bytes).
    pub serial: String,
    /// Idle time before a poller sleeps, in µs.
    pub poll_us: u64,
    /// Poller threads for the export's queues (`poll-threads`); 0 = one per queue.
    pub poll_threads: u16,
    /// Owner, group and mode of the socket file (`socket-owner`, `socket-group`, `socket-mode`).
    pub socket_perms: crate::vhost::SocketPerms,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Bdevs, bottom-up.
    pub bdevs: Vec<BdevSpec>,
    /// Exports.
    pub exports: Vec<ExportSpec>,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// True when the defaults were used (no --bdev/--export given).
    pub is_default: bool,
    /// QoS limits given on `--bdev` (`qos-iops`, `qos-bps`), by bdev name.
    pub qos: Vec<(String, QosLimits)>,
    /// The control socket path (None: `--control none`).
    pub control: Option<PathBuf>,
    /// True when `--control` named the path (a busy default path is only a warning).
    pub control_explicit: bool,
    /// Metrics endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// CPUs poller threads are pinned to (`--poll-cpus`); empty = not pinned.
    pub poll_cpus: Vec<usize>,
}

/// A command-line error: names the flag and the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag} {value}: {problem}")]
pub struct CliError {
    /// The flag (e.g. `--bdev`).
    pub flag: String,
    /// The value given.
    pub value: String,
    /// What is wrong.
    pub problem: String,
}

fn err(flag: &str, value: &str, problem: impl Into<String>) -> CliError {
    CliError { flag: flag.to_string(), value: value.to_string(), problem: problem.into() }
}

/// Parses a size with an optional K/M/G/T suffix (binary units), e.g. `1G`, `512K`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("size '{s}' has an unknown suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 =
        digits.parse().map_err(|_| format!("size '{s}' is not a number with an optional K/M/G/T suffix"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

/// Splits `k=v,k=v` into a map; duplicate or empty keys are errors.
fn parse_kv(flag: &str, value: &str) -> Result<BTreeMap<String, String>, CliError> {
    let mut map = BTreeMap::new();
    for part in value.split(',') {
        let (k, v) =
            part.split_once('=').ok_or_else(|| err(flag, value, format!("'{part}' is not KEY=VALUE")))?;
        if k.is_empty() {
            return Err(err(flag, value, format!("'{part}' has an empty key")));
        }
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(err(flag, value, format!("key '{k}' given twice")));
        }
    }
    Ok(map)
}

struct Keys<'a> {
    flag: &'a str,
    value: &'a str,
    map: BTreeMap<String, String>,
}

impl Keys<'_> {
    fn required(&mut self, key: &str) -> Result<String, CliError> {
        self.map
            .remove(key)
            .ok_or_else(|| err(self.flag, self.value, format!("missing required key '{key}'")))
    }
    fn optional(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }
    fn size(&mut self, key: &str) -> Result<Option<u64>, CliError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v) => {
                parse_size(&v).map(Some).map_err(|p| err(self.flag, self.value, format!("{key}: {p}")))
            }
        }
    }
    fn number<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, CliError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| err(self.flag, self.value, format!("{key}={v} is not a valid number"))),
        }
    }
    fn on_off(&mut self, key: &str, default: bool) -> Result<bool, CliError> {
        match self.map.remove(key).as_deref() {
            None => Ok(default),
            Some("on" | "true" | "yes" | "1") => Ok(true),
            Some("off" | "false" | "no" | "0") => Ok(false),
            Some(v) => Err(err(self.flag, self.value, format!("{key}={v} must be on or off"))),
        }
    }
    fn finish(self) -> Result<(), CliError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(err(self.flag, self.value, format!("unknown key '{k}'"))),
        }
    }
}

fn block_size(keys: &mut Keys<'_>) -> Result<u32, CliError> {
    let bs: u32 = keys.number("block-size")?.unwrap_or(512);
    if bs != 512 && bs != 4096 {
        return Err(err(keys.flag, keys.value, format!("block-size={bs} must be 512 or 4096")));
    }
    Ok(bs)
}

fn checked_size(keys: &Keys<'_>, size: u64, bs: u32) -> Result<u64, CliError> {
    // The same rule the modules apply, checked here so a bad flag fails before anything is built.
    crate::bdev::check_geometry(size, bs).map_err(|e| err(keys.flag, keys.value, e.to_string()))?;
    Ok(size)
}

/// Parses one `--bdev` value with its optional QoS keys (`qos-iops=N`, `qos-bps=SIZE`), which every
/// driver accepts.
pub fn parse_bdev_with_qos(value: &str) -> Result<(BdevSpec, QosLimits), CliError> {
    let flag = "--bdev";
    let mut qos = QosLimits::default();
    let mut rest = Vec::new();
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("qos-iops", v)) => {
                qos.iops =
                    v.parse().map_err(|_| err(flag, value, format!("qos-iops={v} is not a whole number")))?;
            }
            Some(("qos-bps", v)) => {
                qos.bps = parse_size(v).map_err(|p| err(flag, value, format!("qos-bps: {p}")))?;
            }
            _ => rest.push(part),
        }
    }
    qos.validate().map_err(|p| err(flag, value, format!("qos-{p}")))?;
    let spec = parse_bdev(&rest.join(",")).map_err(|e| CliError { value: value.to_string(), ..e })?;
    Ok((spec, qos))
}

/// Parses one `--bdev` value.
pub fn parse_bdev(value: &str) -> Result<BdevSpec, CliError> {
    let flag = "--bdev";
    let mut keys = Keys { flag, value, map: parse_kv(flag, value)? };
    let driver = keys.required("driver")?;
    let name = keys.required("name")?;
    if name.is_empty() || name.contains(['/', ' ']) {
        return Err(err(flag, value, format!("name '{name}' must be non-empty without '/' or spaces")));
    }
    let spec = match driver.as_str() {
        "malloc" | "null" => {
            let bs = block_size(&mut keys)?;
            let size = keys.size("size")?.ok_or_else(|| err(flag, value, "missing required key 'size'"))?;
            let size_bytes = checked_size(&keys, size, bs)?;
            if driver == "malloc" {
                BdevSpec::Malloc { name, size_bytes, block_size: bs }
            } else {
                BdevSpec::Null { name, size_bytes, block_size: bs }
            }
        }
        "file" => {
            let path = PathBuf::from(keys.required("path")?);
            let bs = block_size(&mut keys)?;
            let size_bytes = match keys.size("size")? {
                Some(s) => Some(checked_size(&keys, s, bs)?),
                None => None,
            };
            let direct = keys.on_off("direct", false)?;
            let engine = match keys.optional("engine").as_deref() {
                None | Some("auto") => FileEngine::Auto,
                Some("io_uring") => FileEngine::IoUring,
                Some("threads") => FileEngine::Threads,
                Some(e) => {
                    return Err(err(flag, value, format!("engine={e} must be auto, io_uring or threads")))
                }
            };
            BdevSpec::File { name, path, size_bytes, block_size: bs, direct, engine }
        }
        "rbd" => {
            let pool = keys.required("pool")?;
            let image = keys.required("image")?;
            let conf = keys.optional("conf").map(PathBuf::from);
            let user = keys.optional("user").unwrap_or_else(|| "admin".to_string());
            let keyring = keys.optional("keyring").map(PathBuf::from);
            let create_bytes = match keys.size("create")? {
                Some(s) => Some(checked_size(&keys, s, 512)?),
                None => None,
            };
            let timeout_secs: u32 = keys.number("timeout")?.unwrap_or(30);
            if timeout_secs == 0 || timeout_secs > 3600 {
                return Err(err(flag, value, format!("timeout={timeout_secs} must be 1..=3600 seconds")));
            }
            for (k, v) in [("pool", &pool), ("image", &image), ("user", &user)] {
                if v.is_empty() || v.contains(['/', '@', ' ']) {
                    return Err(err(
                        flag,
                        value,
                        format!("{k}='{v}' must be non-empty without '/', '@' or spaces"),
                    ));
                }
            }
            let cfg =
                crate::bdev::rbd::RbdConfig { pool, image, conf, user, keyring, create_bytes, timeout_secs };
            BdevSpec::Rbd { name, cfg }
        }
        "cache" => BdevSpec::Cache(parse_cache(&mut keys, name)?),
        "ocssd-emu" => parse_ocssd_emu(&mut keys, name)?,
        "ftl" => parse_ftl(&mut keys, name)?,
        "delay" => {
            let base = keys.required("base")?;
            let mut us = |key: &str, required: bool| -> Result<u64, CliError> {
                let v: Option<u64> = keys.number(key)?;
                match v {
                    Some(v) if v > 60_000_000 => {
                        Err(err(flag, value, format!("{key}={v} is above 60000000 (60 s)")))
                    }
                    Some(v) => Ok(v),
                    None if required => Err(err(flag, value, format!("missing required key '{key}'"))),
                    None => Ok(0),
                }
            };
            let read_us = us("read-us", true)?;
            let write_us = us("write-us", true)?;
            let jitter_us = us("jitter-us", false)?;
            BdevSpec::Delay { name, base, read_us, write_us, jitter_us }
        }
        other => {
            return Err(err(
                flag,
                value,
                format!(
                "unknown driver '{other}' (expected malloc, null, file, rbd, cache, delay, ocssd-emu or ftl)"
            ),
            ))
        }
    };
    keys.finish()?;
    Ok(spec)
}

/// `socket-mode=0660`, `socket-owner=NAME|UID`, `socket-group=NAME|GID` of an export.
fn socket_perms(keys: &mut Keys<'_>) -> Result<crate::vhost::SocketPerms, CliError> {
    use crate::vhost::SocketPerms;
    let e = |keys: &Keys<'_>, p: crate::vhost::SocketError| err(keys.flag, keys.value, p.to_string());
    let mode = keys.optional("socket-mode").map(|m| SocketPerms::parse_mode(&m));
    let owner = keys.optional("socket-owner").map(|o| SocketPerms::parse_owner(&o));
    let group = keys.optional("socket-group").map(|g| SocketPerms::parse_group(&g));
    Ok(SocketPerms {
        mode: mode.transpose().map_err(|p| e(keys, p))?,
        owner: owner.transpose().map_err(|p| e(keys, p))?,
        group: group.transpose().map_err(|p| e(keys, p))?,
    })
}

fn parse_cache(keys: &mut Keys<'_>, name: String) -> Result<crate::cache::CacheConfig, CliError> {
    use crate::cache::{CacheConfig, CleanerPolicy, LoadPolicy, Mode, SeqCutoff};
    let (flag, value) = (keys.flag, keys.value);
    let cache = keys.required("cache")?;
    let core = keys.required("core")?;
    if cache == core {
        return Err(err(flag, value, format!("cache={cache} and core={core} must be different bdevs")));
    }
    let mut c = CacheConfig::new(&name, &cache, &core);
    if let Some(m) = keys.optional("mode") {
        c.mode = Mode::parse(&m)
            .ok_or_else(|| err(flag, value, format!("mode={m} must be one of wt, wb, wa, pt, wi, wo")))?;
    }
    if let Some(ls) = keys.size("line-size")? {
        let ok = u32::try_from(ls).ok().filter(|&l| crate::cache::valid_line_size(l));
        c.line_size =
            ok.ok_or_else(|| err(flag, value, format!("line-size={ls} must be 4K, 8K, 16K, 32K or 64K")))?;
    }
    c.cleaner = match keys.optional("cleaner").as_deref() {
        None | Some("alru") => CleanerPolicy::Alru,
        Some("acp") => CleanerPolicy::Acp,
        Some("nop") => CleanerPolicy::Nop,
        Some(v) => return Err(err(flag, value, format!("cleaner={v} must be alru, acp or nop"))),
    };
    if let Some(v) = keys.number::<u64>("alru-wake-ms")? {
        if v == 0 || v > 3_600_000 {
            return Err(err(flag, value, format!("alru-wake-ms={v} must be between 1 and 3600000")));
        }
        c.alru_wake_ms = v;
    }
    if let Some(v) = keys.number::<u64>("alru-stale-ms")? {
        if v > 3_600_000 {
            return Err(err(flag, value, format!("alru-stale-ms={v} must be at most 3600000")));
        }
        c.alru_stale_ms = v;
    }
    if let Some(v) = keys.number::<u32>("clean-batch")? {
        if v == 0 || v > 10_000 {
            return Err(err(flag, value, format!("clean-batch={v} must be between 1 and 10000")));
        }
        c.clean_batch = v;
    }
    c.seq_cutoff = match keys.optional("seq-cutoff").as_deref() {
        None | Some("full") => SeqCutoff::Full,
        Some("off") => SeqCutoff::Off,
        Some("always") => SeqCutoff::Always,
        Some(v) => return Err(err(flag, value, format!("seq-cutoff={v} must be off, full or always"))),
    };
    if let Some(v) = keys.size("seq-cutoff-size")? {
        if v == 0 {
            return Err(err(flag, value, "seq-cutoff-size=0 must be positive"));
        }
        c.seq_cutoff_bytes = v;
    }
    c.load = match keys.optional("load").as_deref() {
        None | Some("auto") => LoadPolicy::Auto,
        Some("on") => LoadPolicy::On,
        Some("off") => LoadPolicy::Off,
        Some(v) => return Err(err(flag, value, format!("load={v} must be auto, on or off"))),
    };
    Ok(c)
}

/// The geometry of the default disk's emulated media: 2 groups × 4 PUs, 64 chunks of 4 MiB
/// (2 GiB of sparse media for a 1 GiB FTL, so relocation has room).
pub fn default_media_geometry() -> EmuGeometry {
    EmuGeometry {
        num_grp: 2,
        num_pu: 4,
        num_chk: 64,
        clba: 1024,
        ws_min: 4,
        ws_opt: 16,
        ..EmuGeometry::default()
    }
}

fn parse_ocssd_emu(keys: &mut Keys<'_>, name: String) -> Result<BdevSpec, CliError> {
    let (flag, value) = (keys.flag, keys.value);
    let path = PathBuf::from(keys.required("path")?);
    let create = match keys.optional("create").as_deref() {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => return Err(err(flag, value, format!("create={v} must be on or off"))),
    };
    let mut g = EmuGeometry::default();
    let mut given = Vec::new();
    for (key, field) in [
        ("groups", &mut g.num_grp),
        ("pus", &mut g.num_pu),
        ("chunks", &mut g.num_chk),
        ("chunk-blocks", &mut g.clba),
        ("ws-min", &mut g.ws_min),
        ("ws-opt", &mut g.ws_opt),
        ("oob-bytes", &mut g.oob_bytes),
    ] {
        if let Some(v) = keys.number::<u32>(key)? {
            *field = v;
            given.push(key);
        }
    }
    if given.contains(&"ws-min") && !given.contains(&"ws-opt") {
        g.ws_opt = if g.clba % (4 * g.ws_min) == 0 { 4 * g.ws_min } else { g.ws_min };
    }
    if !given.is_empty() && !create {
        return Err(err(flag, value, "geometry keys need create=on (an existing image keeps its geometry)"));
    }
    if let Err(e) = g.validate() {
        let key = match &e {
            crate::ocssd::MediaError::InvalidConfig { field, .. } => match *field {
                "num_grp" => "groups",
                "num_pu" => "pus",
                "num_chk" => "chunks",
                "clba" => "chunk-blocks",
                "ws_min" => "ws-min",
                "ws_opt" => "ws-opt",
                "oob_bytes" => "oob-bytes",
                _ => "geometry",
            },
            _ => "geometry",
        };
        return Err(err(flag, value, format!("{key}: {e}")));
    }
    let bad_chunks = match keys.optional("bad-chunks") {
        None => Vec::new(),
        Some(v) => crate::ocssd::cli::parse_bad_chunks(&v.replace('+', ","))
            .map_err(|e| err(flag, value, format!("bad-chunks: {e} (separate entries with '+')")))?,
    };
    Ok(BdevSpec::OcssdEmu { name, path, create, geometry: g, given, bad_chunks })
}

fn parse_ftl(keys: &mut Keys<'_>, name: String) -> Result<BdevSpec, CliError> {
    let (flag, value) = (keys.flag, keys.value);
    let base = keys.required("base")?;
    let mut cfg = FtlConfig::new(&name);
    if let Some(p) = keys.optional("punits") {
        let (b, e) = crate::ftl::cli::parse_punits(&p).map_err(|m| err(flag, value, m))?;
        cfg.pu_begin = b;
        cfg.pu_end = Some(e);
    }
    cfg.mode = match keys.optional("mode").as_deref() {
        None | Some("auto") => FtlMode::Auto,
        Some("create") => FtlMode::Create,
        Some("restore") => FtlMode::Restore,
        Some(m) => return Err(err(flag, value, format!("mode={m} must be auto, create or restore"))),
    };
    cfg.force = keys.on_off("force", false)?;
    if cfg.force && cfg.mode != FtlMode::Create {
        return Err(err(flag, value, "force=on only applies to mode=create"));
    }
    if let Some(u) = keys.optional("uuid") {
        cfg.uuid = Some(
            crate::ftl::layout::parse_uuid(&u)
                .ok_or_else(|| err(flag, value, format!("uuid={u} is not a UUID (32 hex digits)")))?,
        );
    }
    if let Some(w) = keys.size("wbuf")? {
        cfg.wbuf_bytes = w;
    }
    if let Some(v) = keys.number("lba-rsvd")? {
        cfg.lba_rsvd = v;
    }
    if let Some(v) = keys.number("band-thld")? {
        cfg.band_thld = v;
    }
    if let Some(v) = keys.number("invalid-thld")? {
        cfg.invalid_thld = v;
    }
    if let Some(v) = keys.number("reloc-qdepth")? {
        cfg.reloc_qdepth = v;
    }
    if let Some(v) = keys.number("reloc-bands")? {
        cfg.reloc_bands = v;
    }
    if let Some(v) = keys.number("interleave")? {
        cfg.interleave_units = v;
    }
    cfg.size_bytes = keys.size("size")?;
    let nv_cache = keys.optional("nv-cache");
    cfg.validate().map_err(|e| err(flag, value, e.to_string()))?;
    Ok(BdevSpec::Ftl { base, cfg, nv_cache })
}

/// Parses one `--export` value.
pub fn parse_export(value: &str) -> Result<ExportSpec, CliError> {
    let flag = "--export";
    let mut keys = Keys { flag, value, map: parse_kv(flag, value)? };
    let bdev = keys.required("bdev")?;
    let socket = PathBuf::from(keys.required("socket")?);
    let queues: u16 = keys.number("queues")?.unwrap_or_else(crate::vhost::default_queues);
    if queues == 0 || queues > MAX_QUEUES {
        return Err(err(flag, value, format!("queues={queues} must be between 1 and {MAX_QUEUES}")));
    }
    let queue_size: u16 = keys.number("queue-size")?.unwrap_or(256);
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
        return Err(err(
            flag,
            value,
            format!("queue-size={queue_size} must be a power of two up to {MAX_QUEUE_SIZE}"),
        ));
    }
    let readonly = keys.on_off("readonly", false)?;
    let serial = keys.optional("serial").unwrap_or_else(|| bdev.clone());
    if serial.len() > 20 {
        return Err(err(flag, value, format!("serial '{serial}' is longer than 20 bytes")));
    }
    let poll_us: u64 = keys.number("poll-us")?.unwrap_or(50);
    if poll_us > 1_000_000 {
        return Err(err(flag, value, format!("poll-us={poll_us} is above 1000000")));
    }
    // Absent: one poller thread per queue (stored as 0).
    let poll_threads: u16 = match keys.number::<u16>("poll-threads")? {
        None => 0,
        Some(0) => {
            return Err(err(
                flag,
                value,
                "poll-threads=0: at least one thread (leave it out for one per queue)",
            ))
        }
        Some(n) if n > queues => {
            return Err(err(flag, value, format!("poll-threads={n} is more than queues={queues}")))
        }
        Some(n) => n,
    };
    let socket_perms = socket_perms(&mut keys)?;
    keys.finish()?;
    Ok(ExportSpec { bdev, socket, queues, queue_size, readonly, serial, poll_us, poll_threads, socket_perms })
}

/// Turns parsed flags into a validated configuration (no side effects).
pub fn build_config(args: &Args) -> Result<Config, CliError> {
    let log_level: log::LevelFilter = args.log_level.parse().map_err(|_| {
        err("--log-level", &args.log_level, "must be one of off, error, warn, info, debug, trace")
    })?;
    let is_default = args.bdevs.is_empty() && args.exports.is_empty();
    let mut qos = Vec::new();
    let (control, control_explicit) = match args.control.as_deref() {
        Some("none") => (None, true),
        Some("") => return Err(err("--control", "", "must be a path or 'none'")),
        Some(p) => (Some(PathBuf::from(p)), true),
        None => (Some(args.data_dir.join("vblkd.ctl")), false),
    };
    let metrics = match args.metrics.as_deref() {
        None => None,
        Some(v) => Some(v.parse::<std::net::SocketAddr>().map_err(|_| {
            err("--metrics", v, "must be ADDR:PORT, e.g. 127.0.0.1:9100 (an IPv6 address goes in brackets)")
        })?),
    };
    let (bdevs, exports) = if is_default {
        // The default disk: an FTL on an emulated OCSSD image in the data directory, created on the
        // first start and restored on every later one.
        let media = BdevSpec::OcssdEmu {
            name: "media0".into(),
            path: args.data_dir.join("media0.img"),
            create: true,
            geometry: default_media_geometry(),
            given: Vec::new(),
            bad_chunks: Vec::new(),
        };
        let mut cfg = FtlConfig::new("disk0");
        cfg.size_bytes = Some(DEFAULT_DISK_BYTES);
        let bdev = BdevSpec::Ftl { base: "media0".into(), cfg, nv_cache: None };
        let export = ExportSpec {
            bdev: "disk0".into(),
            socket: args.data_dir.join("vblkd.sock"),
            queues: crate::vhost::default_queues(),
            queue_size: 256,
            readonly: false,
            serial: "vblkd-disk0".into(),
            poll_us: 50,
            poll_threads: 0,
            socket_perms: crate::vhost::SocketPerms::default(),
        };
        (vec![media, bdev], vec![export])
    } else {
        let mut bdevs = Vec::new();
        let mut names = HashSet::new();
        let mut cores = std::collections::HashMap::new();
        for v in &args.bdevs {
            let (spec, limits) = parse_bdev_with_qos(v)?;
            if let BdevSpec::Cache(c) = &spec {
                for (key, b) in [("cache", &c.cache), ("core", &c.core)] {
                    if !names.contains(b) {
                        return Err(err(
                            "--bdev",
                            v,
                            format!("{key}={b}: no bdev of that name defined before it"),
                        ));
                    }
                }
                if let Some(other) = cores.insert(c.core.clone(), c.name.clone()) {
                    return Err(err(
                        "--bdev",
                        v,
                        format!("core={} is already the core of cache bdev '{other}'", c.core),
                    ));
                }
            }
            if let BdevSpec::Delay { base, .. } = &spec {
                if !names.contains(base) {
                    return Err(err(
                        "--bdev",
                        v,
                        format!("base '{base}' is not defined by an earlier --bdev"),
                    ));
                }
            }
            if !names.insert(spec.name().to_string()) {
                return Err(err("--bdev", v, format!("duplicate bdev name '{}'", spec.name())));
            }
            if !limits.is_unlimited() {
                qos.push((spec.name().to_string(), limits));
            }
            bdevs.push(spec);
        }
        if args.exports.is_empty() {
            return Err(err("--export", "", "no export given: add --export bdev=NAME,socket=PATH"));
        }
        let mut exports = Vec::new();
        let mut sockets = HashSet::new();
        let mut exported = HashSet::new();
        for v in &args.exports {
            let spec = parse_export(v)?;
            if !names.contains(&spec.bdev) {
                return Err(err(
                    "--export",
                    v,
                    format!("no bdev named '{}' (define it with --bdev)", spec.bdev),
                ));
            }
            if !exported.insert(spec.bdev.clone()) {
                return Err(err("--export", v, format!("bdev '{}' is exported twice", spec.bdev)));
            }
            if !sockets.insert(spec.socket.clone()) {
                return Err(err("--export", v, format!("socket {} is used twice", spec.socket.display())));
            }
            exports.push(spec);
        }
        (bdevs, exports)
    };
    let poll_cpus = match args.poll_cpus.as_deref() {
        None => Vec::new(),
        Some(v) => crate::vhost::pin::parse_cpu_list(v, &crate::vhost::pin::allowed_cpus())
            .map_err(|e| err("--poll-cpus", v, e.to_string()))?,
    };
    Ok(Config {
        poll_cpus,
        data_dir: args.data_dir.clone(),
        bdevs,
        exports,
        log_level,
        is_default,
        qos,
        control,
        control_explicit,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("vblkd").chain(v.iter().copied())).expect("clap parse")
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn good_command_line() {
        let c = build_config(&args(&[
            "--bdev",
            "driver=malloc,name=m0,size=64M,block-size=4096",
            "--bdev",
            "driver=file,name=f0,path=/tmp/x.img,size=1G,direct=on,engine=threads",
            "--export",
            "bdev=m0,socket=/tmp/m0.sock,queues=2,queue-size=128,readonly=on,serial=abc,poll-us=10",
            "--export",
            "bdev=f0,socket=/tmp/f0.sock",
        ]))
        .expect("valid");
        assert_eq!(
            c.bdevs[0],
            BdevSpec::Malloc { name: "m0".into(), size_bytes: 64 << 20, block_size: 4096 }
        );
        assert!(matches!(c.bdevs[1], BdevSpec::File { direct: true, engine: FileEngine::Threads, .. }));
        assert_eq!(c.exports[0].queues, 2);
        assert_eq!(c.exports[0].queue_size, 128);
        assert!(c.exports[0].readonly);
        assert_eq!(c.exports[0].serial, "abc");
        assert_eq!(c.exports[1].queue_size, 256);
        assert!(!c.is_default);
    }

    #[test]
    fn defaults_serve_an_ftl_disk() {
        let c = build_config(&args(&["--data-dir", "/tmp/d"])).expect("valid");
        assert!(c.is_default);
        assert_eq!(c.exports[0].socket, PathBuf::from("/tmp/d/vblkd.sock"));
        assert!(
            matches!(&c.bdevs[0], BdevSpec::OcssdEmu { path, create: true, .. } if path == &PathBuf::from("/tmp/d/media0.img"))
        );
        assert!(matches!(&c.bdevs[1], BdevSpec::Ftl { base, cfg, .. }
            if base == "media0" && cfg.size_bytes == Some(DEFAULT_DISK_BYTES)));
        assert_eq!(c.exports[0].bdev, "disk0");
    }

    #[test]
    fn ftl_and_media_keys() {
        let c = build_config(&args(&[
            "--bdev",
            "driver=ocssd-emu,name=o0,path=/tmp/m.img,create=on,groups=1,pus=4,chunks=16,chunk-blocks=64,ws-min=4,ws-opt=8,bad-chunks=0:1:3+0:2:4",
            "--bdev",
            "driver=ftl,name=f0,base=o0,punits=0-3,mode=create,force=on,wbuf=1M,lba-rsvd=30,band-thld=80,invalid-thld=20,reloc-qdepth=16,reloc-bands=2,uuid=0102030405060708090a0b0c0d0e0f10",
            "--export",
            "bdev=f0,socket=/tmp/f0.sock",
        ]))
        .expect("valid");
        match &c.bdevs[0] {
            BdevSpec::OcssdEmu { geometry, bad_chunks, create: true, .. } => {
                assert_eq!(
                    (geometry.num_grp, geometry.num_pu, geometry.num_chk, geometry.clba),
                    (1, 4, 16, 64)
                );
                assert_eq!(bad_chunks.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        match &c.bdevs[1] {
            BdevSpec::Ftl { base, cfg, .. } => {
                assert_eq!(base, "o0");
                assert_eq!(
                    (cfg.pu_begin, cfg.pu_end, cfg.mode, cfg.force),
                    (0, Some(3), FtlMode::Create, true)
                );
                assert_eq!(
                    (cfg.wbuf_bytes, cfg.lba_rsvd, cfg.band_thld, cfg.invalid_thld),
                    (1 << 20, 30, 80, 20)
                );
                assert_eq!((cfg.reloc_qdepth, cfg.reloc_bands), (16, 2));
                assert_eq!(cfg.uuid.map(|u| u[0]), Some(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ftl_refusals_name_the_option() {
        let cases: &[(&str, &str)] = &[
            ("invalid-thld=100", "invalid-thld"),
            ("lba-rsvd=0", "lba-rsvd"),
            ("lba-rsvd=100", "lba-rsvd"),
            ("wbuf=0", "wbuf"),
            ("wbuf=5000", "wbuf"),
            ("mode=sometimes", "mode=sometimes"),
            ("force=on", "force=on"),
            ("uuid=xyz", "uuid=xyz"),
            ("punits=5-2", "punits=5-2"),
            ("band-thld=0", "band-thld"),
            ("reloc-qdepth=0", "reloc-qdepth"),
        ];
        for (extra, want) in cases {
            let bdev = format!("driver=ftl,name=f,base=o,{extra}");
            let e = build_config(&args(&["--bdev", &bdev, "--export", "bdev=f,socket=/s"])).expect_err(extra);
            let msg = e.to_string();
            assert!(msg.starts_with("--bdev") && msg.contains(want), "{extra}: '{msg}' lacks '{want}'");
        }
        let e = build_config(&args(&[
            "--bdev",
            "driver=ocssd-emu,name=o,path=/x,chunks=4",
            "--export",
            "bdev=o,socket=/s",
        ]))
        .expect_err("geometry without create");
        assert!(e.to_string().contains("create=on"), "{e}");
        let e = build_config(&args(&[
            "--bdev",
            "driver=ocssd-emu,name=o,path=/x,create=on,ws-min=3,ws-opt=8",
            "--export",
            "bdev=o,socket=/s",
        ]))
        .expect_err("bad ws-opt");
        assert!(e.to_string().contains("ws-opt"), "{e}");
    }

    #[test]
    fn errors_name_the_flag_and_problem() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--bdev", "driver=foo,name=a,size=1M", "--export", "bdev=a,socket=/s"],
                "unknown driver 'foo'",
            ),
            (
                &[
                    "--bdev",
                    "driver=malloc,name=a,size=1M",
                    "--bdev",
                    "driver=null,name=a,size=1M",
                    "--export",
                    "bdev=a,socket=/s",
                ],
                "duplicate bdev name 'a'",
            ),
            (
                &["--bdev", "driver=malloc,name=a,size=1M", "--export", "bdev=b,socket=/s"],
                "no bdev named 'b'",
            ),
            (
                &["--bdev", "driver=malloc,name=a,size=1000", "--export", "bdev=a,socket=/s"],
                "not a multiple of the block size",
            ),
            (
                &["--bdev", "driver=malloc,name=a", "--export", "bdev=a,socket=/s"],
                "missing required key 'size'",
            ),
            (
                &["--bdev", "driver=malloc,name=a,size=1M,colour=red", "--export", "bdev=a,socket=/s"],
                "unknown key 'colour'",
            ),
            (
                &["--bdev", "driver=malloc,name=a,size=1M", "--export", "bdev=a,socket=/s,queue-size=100"],
                "power of two",
            ),
            (
                &["--bdev", "driver=malloc,name=a,size=1M", "--export", "bdev=a,socket=/s,queues=0"],
                "queues=0",
            ),
            (
                &["--bdev", "driver=malloc,name=a,size=1M,block-size=1024", "--export", "bdev=a,socket=/s"],
                "512 or 4096",
            ),
            (&["--bdev", "driver=malloc,name=a,size=1M"], "no export given"),
            (&["--log-level", "loud"], "must be one of"),
        ];
        for (argv, want) in cases {
            let e = build_config(&args(argv)).expect_err("must fail");
            let msg = e.to_string();
            assert!(msg.contains(want), "{argv:?}: '{msg}' lacks '{want}'");
            assert!(msg.starts_with("--"), "{argv:?}: '{msg}' does not name the flag");
        }
    }

    #[test]
    fn delay_bdev_flags() {
        let c = build_config(&args(&[
            "--bdev",
            "driver=malloc,name=m0,size=64M",
            "--bdev",
            "driver=delay,name=d0,base=m0,read-us=100,write-us=250,jitter-us=50",
            "--export",
            "bdev=d0,socket=/tmp/s",
        ]))
        .expect("config");
        assert_eq!(
            c.bdevs[1],
            BdevSpec::Delay {
                name: "d0".into(),
                base: "m0".into(),
                read_us: 100,
                write_us: 250,
                jitter_us: 50
            }
        );
        let bad: &[(&[&str], &str)] = &[
            (&["--bdev", "driver=delay,name=d0,base=m0,read-us=1,write-us=1"], "not defined by an earlier"),
            (
                &[
                    "--bdev",
                    "driver=malloc,name=m0,size=1M",
                    "--bdev",
                    "driver=delay,name=d0,base=m0,read-us=1",
                ],
                "write-us",
            ),
            (
                &[
                    "--bdev",
                    "driver=malloc,name=m0,size=1M",
                    "--bdev",
                    "driver=delay,name=d0,base=m0,read-us=x,write-us=1",
                ],
                "read-us",
            ),
            (
                &[
                    "--bdev",
                    "driver=malloc,name=m0,size=1M",
                    "--bdev",
                    "driver=delay,name=d0,base=m0,read-us=99999999999,write-us=1",
                ],
                "above",
            ),
        ];
        for (argv, want) in bad {
            let mut v = argv.to_vec();
            v.extend(["--export", "bdev=m0,socket=/s"]);
            let msg = build_config(&args(&v)).expect_err("must fail").to_string();
            assert!(msg.contains(want) && msg.starts_with("--bdev"), "{argv:?}: '{msg}' lacks '{want}'");
        }
    }
}
