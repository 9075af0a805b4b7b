//! Command-line grammar (SPEC §6) and its errors.
//!
//! ```text
//! vblkd [--data-dir DIR] [--bdev KEY=VAL,...]... [--export KEY=VAL,...]... [--log-level LEVEL]
//!   --bdev driver=malloc,name=m0,size=1G[,block-size=512|4096]
//!   --bdev driver=null,name=n0,size=1T[,block-size=...]
//!   --bdev driver=file,name=f0,path=disk.img[,size=1G][,direct=on|off][,engine=io_uring|threads][,block-size=...]
//!   --bdev driver=delay,name=d0,base=f0,read-us=N,write-us=N[,jitter-us=N]
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

use crate::ocssd::cli::MediaCommand;

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
            | Self::Delay { name, .. } => name,
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
                format!("unknown driver '{other}' (expected malloc, null, file or delay)"),
            ))
        }
    };
    keys.finish()?;
    Ok(spec)
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
        let bdev = BdevSpec::File {
            name: "disk0".into(),
            path: args.data_dir.join("disk0.img"),
            size_bytes: Some(DEFAULT_DISK_BYTES),
            block_size: 512,
            direct: false,
            engine: FileEngine::IoUring,
        };
        let export = ExportSpec {
            bdev: "disk0".into(),
            socket: args.data_dir.join("vblkd.sock"),
            queues: crate::vhost::default_queues(),
            queue_size: 256,
            readonly: false,
            serial: "vblkd-disk0".into(),
            poll_us: 50,
        };
        (vec![bdev], vec![export])
    } else {
        let mut bdevs = Vec::new();
        let mut names = HashSet::new();
        for v in &args.bdevs {
            let spec = parse_bdev(v)?;
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
    fn defaults_serve_a_file_disk() {
        let c = build_config(&args(&["--data-dir", "/tmp/d"])).expect("valid");
        assert!(c.is_default);
        assert_eq!(c.exports[0].socket, PathBuf::from("/tmp/d/vblkd.sock"));
        assert!(
            matches!(&c.bdevs[0], BdevSpec::File { size_bytes: Some(s), .. } if *s == DEFAULT_DISK_BYTES)
        );
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
