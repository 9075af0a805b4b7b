//! Command-line grammar (SPEC §6) and its errors.
//!
//! ```text
//! vblkd [--data-dir DIR] [--bdev KEY=VAL,...]... [--export KEY=VAL,...]... [--log-level LEVEL]
//!   --bdev driver=malloc,name=m0,size=1G[,block-size=512|4096]
//!   --bdev driver=null,name=n0,size=1T[,block-size=...]
//!   --bdev driver=file,name=f0,path=disk.img[,size=1G][,direct=on|off][,engine=io_uring|threads][,block-size=...]
//!   --bdev driver=ocssd-emu,name=o0,path=media.img[,create=on,groups=G,pus=U,chunks=C,chunk-blocks=B,
//!          ws-min=N,ws-opt=N,oob-bytes=N,bad-chunks=GRP:PU:CHK+...]
//!   --bdev driver=ftl,name=ftl0,base=o0[,punits=B-E][,mode=auto|create|restore][,force=on][,uuid=U]
//!          [,wbuf=6M][,lba-rsvd=20][,band-thld=90][,invalid-thld=10][,reloc-qdepth=32][,reloc-bands=3]
//!          [,interleave=1][,size=BYTES][,nv-cache=BDEV]
//!   --export bdev=m0,socket=PATH[,queues=N][,queue-size=N][,readonly=on][,serial=STR][,poll-us=N]
//! vblkd media create|info ...
//! ```
//!
//! # Design
//! clap parses the flags into strings; this module turns each `KEY=VAL,...` list into a typed spec and
//! checks everything that can be checked before any bdev is built, so a bad command line exits before
//! anything is served. Every error names the flag and the problem.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// FTL tools.
    #[command(subcommand)]
    Ftl(FtlCommand),
}

/// I/O engine of a file bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEngine {
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
                None | Some("io_uring") => FileEngine::IoUring,
                Some("threads") => FileEngine::Threads,
                Some(e) => return Err(err(flag, value, format!("engine={e} must be io_uring or threads"))),
            };
            BdevSpec::File { name, path, size_bytes, block_size: bs, direct, engine }
        }
        "ocssd-emu" => parse_ocssd_emu(&mut keys, name)?,
        "ftl" => parse_ftl(&mut keys, name)?,
        other => {
            return Err(err(
                flag,
                value,
                format!("unknown driver '{other}' (expected malloc, null, file, ocssd-emu or ftl)"),
            ))
        }
    };
    keys.finish()?;
    Ok(spec)
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
    keys.finish()?;
    Ok(ExportSpec { bdev, socket, queues, queue_size, readonly, serial, poll_us })
}

/// Turns parsed flags into a validated configuration (no side effects).
pub fn build_config(args: &Args) -> Result<Config, CliError> {
    let log_level: log::LevelFilter = args.log_level.parse().map_err(|_| {
        err("--log-level", &args.log_level, "must be one of off, error, warn, info, debug, trace")
    })?;
    let is_default = args.bdevs.is_empty() && args.exports.is_empty();
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
        };
        (vec![media, bdev], vec![export])
    } else {
        let mut bdevs = Vec::new();
        let mut names = HashSet::new();
        for v in &args.bdevs {
            let spec = parse_bdev(v)?;
            if !names.insert(spec.name().to_string()) {
                return Err(err("--bdev", v, format!("duplicate bdev name '{}'", spec.name())));
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
    Ok(Config { data_dir: args.data_dir.clone(), bdevs, exports, log_level, is_default })
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
}
