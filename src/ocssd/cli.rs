//! `vblkd media create|info`: make and inspect emulated OCSSD images.
//!
//! ```text
//! vblkd media create --path P --groups G --pus U --chunks C --chunk-blocks B
//!                    [--ws-min N] [--ws-opt N] [--mw-cunits N] [--oob-bytes N]
//!                    [--bad-chunks GRP:PU:CHK,...]
//! vblkd media info --path P          → JSON: geometry (spec field names) + chunk states
//! ```
//!
//! # Design
//! The integrator wires [`MediaCommand`] as a clap subcommand and calls [`run`]. Every
//! check is done here first so errors name the offending *flag*; the emulator checks again
//! with spec field names, and any error it still finds is mapped back to its flag.
//! `create` prints the same JSON as `info` for the new image.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::driver::MediaError;
use super::emu::image::{MAX_OOB_BYTES, MIN_OOB_BYTES};
use super::emu::{EmuConfig, EmuDevice, EmuGeometry};
use super::ppa::Ppa;
use super::spec::MAX_VECTOR_LBAS;

/// `vblkd media` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MediaCommand {
    /// Create an emulated OCSSD 2.0 image file.
    Create {
        /// Image file to create (must not exist).
        #[arg(long)]
        path: PathBuf,
        /// Number of groups (num_grp).
        #[arg(long)]
        groups: u32,
        /// Parallel units per group (num_pu).
        #[arg(long)]
        pus: u32,
        /// Chunks per parallel unit (num_chk).
        #[arg(long)]
        chunks: u32,
        /// Blocks (4 KiB) per chunk (clba).
        #[arg(long)]
        chunk_blocks: u32,
        /// Minimum write size in blocks (ws_min).
        #[arg(long, default_value_t = 4)]
        ws_min: u32,
        /// Optimal write size in blocks (ws_opt); default 4 × ws_min when that divides
        /// --chunk-blocks, else ws_min.
        #[arg(long)]
        ws_opt: Option<u32>,
        /// Cache minimum write size units (mw_cunits), reported to the host.
        #[arg(long, default_value_t = 0)]
        mw_cunits: u32,
        /// Out-of-band metadata bytes per block.
        #[arg(long, default_value_t = 16)]
        oob_bytes: u32,
        /// Chunks that start offline: GRP:PU:CHK,...
        #[arg(long)]
        bad_chunks: Option<String>,
    },
    /// Print an image's geometry and chunk-state counts as JSON.
    Info {
        /// Image file.
        #[arg(long)]
        path: PathBuf,
    },
}

/// Errors of `vblkd media`.
#[derive(Debug, Error)]
pub enum MediaCliError {
    /// A flag's value is invalid; the message names the flag.
    #[error("{message}")]
    Flag {
        /// The flag (`--ws-opt`).
        flag: &'static str,
        /// What is wrong, naming the flag.
        message: String,
    },
    /// The media layer refused (I/O, corrupt image, ...).
    #[error(transparent)]
    Media(#[from] MediaError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(std::io::Error),
}

fn flag_err(flag: &'static str, message: String) -> MediaCliError {
    MediaCliError::Flag { flag, message }
}

/// The flag that sets a spec field.
fn flag_of(field: &str) -> &'static str {
    match field {
        "num_grp" => "--groups",
        "num_pu" => "--pus",
        "num_chk" => "--chunks",
        "clba" => "--chunk-blocks",
        "ws_min" => "--ws-min",
        "ws_opt" => "--ws-opt",
        "mw_cunits" => "--mw-cunits",
        "oob_bytes" => "--oob-bytes",
        "bad_chunks" => "--bad-chunks",
        _ => "--groups/--pus/--chunks/--chunk-blocks",
    }
}

/// Parses `GRP:PU:CHK,...` (empty entries are ignored).
pub fn parse_bad_chunks(s: &str) -> Result<Vec<Ppa>, MediaCliError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        let nums: Option<Vec<u64>> = parts.iter().map(|p| p.trim().parse().ok()).collect();
        match nums.as_deref() {
            Some([g, p, c]) => out.push(Ppa::new(*g, *p, *c, 0)),
            _ => {
                return Err(flag_err(
                    "--bad-chunks",
                    format!("--bad-chunks entry '{item}' is not GRP:PU:CHK (three numbers)"),
                ))
            }
        }
    }
    Ok(out)
}

/// Builds and checks the emulator configuration of `create`.
fn create_config(cmd: &MediaCommand) -> Result<(PathBuf, EmuConfig), MediaCliError> {
    let MediaCommand::Create {
        path,
        groups,
        pus,
        chunks,
        chunk_blocks,
        ws_min,
        ws_opt,
        mw_cunits,
        oob_bytes,
        bad_chunks,
    } = cmd
    else {
        return Err(flag_err("create", "not a create command".into()));
    };
    for (flag, v) in [
        ("--groups", *groups),
        ("--pus", *pus),
        ("--chunks", *chunks),
        ("--chunk-blocks", *chunk_blocks),
        ("--ws-min", *ws_min),
    ] {
        if v == 0 {
            return Err(flag_err(flag, format!("{flag} 0: must be at least 1")));
        }
    }
    for (flag, v) in [("--groups", *groups), ("--pus", *pus)] {
        if v > u32::from(u16::MAX) {
            return Err(flag_err(flag, format!("{flag} {v}: at most 65535")));
        }
    }
    let max = MAX_VECTOR_LBAS as u32;
    if *ws_min > max {
        return Err(flag_err(
            "--ws-min",
            format!("--ws-min {ws_min} exceeds the {max}-block vector command limit"),
        ));
    }
    let ws_opt = match ws_opt {
        Some(v) => *v,
        None if (ws_min * 4) <= max && chunk_blocks % (ws_min * 4) == 0 => ws_min * 4,
        None => *ws_min,
    };
    if ws_opt == 0 {
        return Err(flag_err("--ws-opt", "--ws-opt 0: must be at least 1".into()));
    }
    if ws_opt % ws_min != 0 {
        return Err(flag_err(
            "--ws-opt",
            format!("--ws-opt {ws_opt} is not a multiple of --ws-min {ws_min}"),
        ));
    }
    if ws_opt > max {
        return Err(flag_err(
            "--ws-opt",
            format!("--ws-opt {ws_opt} exceeds the {max}-block vector command limit"),
        ));
    }
    if chunk_blocks % ws_opt != 0 {
        return Err(flag_err(
            "--chunk-blocks",
            format!("--chunk-blocks {chunk_blocks} is not a multiple of --ws-opt {ws_opt}"),
        ));
    }
    if !(MIN_OOB_BYTES..=MAX_OOB_BYTES).contains(oob_bytes) {
        return Err(flag_err(
            "--oob-bytes",
            format!("--oob-bytes {oob_bytes} is outside {MIN_OOB_BYTES}..={MAX_OOB_BYTES}"),
        ));
    }
    let bad = match bad_chunks {
        Some(s) => parse_bad_chunks(s)?,
        None => Vec::new(),
    };
    for b in &bad {
        for (name, flag, v, limit) in [
            ("group", "--groups", b.grp, *groups),
            ("PU", "--pus", b.pu, *pus),
            ("chunk", "--chunks", b.chk, *chunks),
        ] {
            if v >= u64::from(limit) {
                return Err(flag_err(
                    "--bad-chunks",
                    format!(
                        "--bad-chunks {}:{}:{}: {name} {v} is outside {flag} {limit}",
                        b.grp, b.pu, b.chk
                    ),
                ));
            }
        }
    }
    let geometry = EmuGeometry {
        num_grp: *groups,
        num_pu: *pus,
        num_chk: *chunks,
        clba: *chunk_blocks,
        ws_min: *ws_min,
        ws_opt,
        mw_cunits: *mw_cunits,
        oob_bytes: *oob_bytes,
        ..EmuGeometry::default()
    };
    Ok((path.clone(), EmuConfig { geometry, bad_chunks: bad, faults: Vec::new() }))
}

/// Maps emulator errors back to flags.
fn name_flag(e: MediaError, path: &Path) -> MediaCliError {
    match e {
        MediaError::InvalidConfig { field, reason } => {
            let flag = flag_of(field);
            flag_err(flag, format!("{flag} ({field}): {reason}"))
        }
        MediaError::NoSpace { needed_bytes, available_bytes, .. } => flag_err(
            "--path",
            format!(
                "--path {}: image of {needed_bytes} bytes (--groups × --pus × --chunks × \
                 --chunk-blocks) is too large for the disk: {available_bytes} bytes free",
                path.display()
            ),
        ),
        other => MediaCliError::Media(other),
    }
}

/// The `info` JSON of an image.
pub fn info_json(path: &Path) -> Result<serde_json::Value, MediaCliError> {
    let s = EmuDevice::inspect(path)?;
    let g = &s.info.geometry;
    let blocks = g.total_chunks() * u64::from(g.clba);
    Ok(serde_json::json!({
        "path": path.display().to_string(),
        "image_version": super::emu::image::IMAGE_VERSION,
        "image_bytes": s.layout.image_bytes,
        "capacity_bytes": blocks * u64::from(s.info.block_size_bytes),
        "geometry": {
            "mjr": g.mjr,
            "mnr": g.mnr,
            "num_grp": g.num_grp,
            "num_pu": g.num_pu,
            "num_chk": g.num_chk,
            "clba": g.clba,
            "ws_min": g.ws_min,
            "ws_opt": g.ws_opt,
            "mw_cunits": g.mw_cunits,
            "maxoc": g.maxoc,
            "maxocpu": g.maxocpu,
            "mccap": g.mccap,
            "lbaf": g.lbaf,
            "block_size": s.info.block_size_bytes,
            "oob_bytes": s.info.oob_bytes_per_block,
            "pe_cycles": s.geometry.pe_cycles,
        },
        "chunks": s.counts,
        "total_erases": s.total_erases,
    }))
}

/// Runs a command, writing its output to `out`.
pub fn run_to(cmd: MediaCommand, out: &mut dyn Write) -> Result<(), MediaCliError> {
    let path = match &cmd {
        MediaCommand::Create { .. } => {
            let (path, cfg) = create_config(&cmd)?;
            let dev = EmuDevice::create(&path, &cfg).map_err(|e| name_flag(e, &path))?;
            drop(dev);
            path
        }
        MediaCommand::Info { path } => path.clone(),
    };
    let v = info_json(&path)?;
    let text = serde_json::to_string_pretty(&v).map_err(|e| MediaCliError::Output(e.into()))?;
    writeln!(out, "{text}").map_err(MediaCliError::Output)
}

/// Runs a command, printing to stdout.
pub fn run(cmd: MediaCommand) -> Result<(), MediaCliError> {
    run_to(cmd, &mut std::io::stdout().lock())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(subcommand)]
        cmd: MediaCommand,
    }

    fn parse(args: &[&str]) -> MediaCommand {
        let mut v = vec!["media"];
        v.extend_from_slice(args);
        Wrapper::try_parse_from(v).expect("parses").cmd
    }

    fn create_args<'a>(path: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "create",
            "--path",
            path,
            "--groups",
            "2",
            "--pus",
            "2",
            "--chunks",
            "4",
            "--chunk-blocks",
            "32",
        ];
        v.extend_from_slice(extra);
        v
    }

    fn flag_error(args: &[&str]) -> (&'static str, String) {
        let cmd = parse(args);
        match run_to(cmd, &mut Vec::new()) {
            Err(MediaCliError::Flag { flag, message }) => (flag, message),
            other => panic!("expected a flag error, got {other:?}"),
        }
    }

    #[test]
    fn create_then_info_prints_spec_names_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let ps = p.to_str().expect("utf8");
        let mut out = Vec::new();
        run_to(
            parse(&create_args(ps, &["--ws-min", "4", "--ws-opt", "8", "--bad-chunks", "1:0:3,0:1:0"])),
            &mut out,
        )
        .expect("create works");
        let mut out = Vec::new();
        run_to(parse(&["info", "--path", ps]), &mut out).expect("info works");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        let g = &v["geometry"];
        assert_eq!(g["num_grp"], 2);
        assert_eq!(g["num_pu"], 2);
        assert_eq!(g["num_chk"], 4);
        assert_eq!(g["clba"], 32);
        assert_eq!(g["ws_min"], 4);
        assert_eq!(g["ws_opt"], 8);
        assert_eq!(g["mw_cunits"], 0);
        assert_eq!(g["oob_bytes"], 16);
        assert_eq!(g["lbaf"]["lbk_len"], 5);
        assert_eq!(v["chunks"]["free"], 14);
        assert_eq!(v["chunks"]["offline"], 2);
        assert_eq!(v["chunks"]["open"], 0);
        assert_eq!(v["chunks"]["closed"], 0);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let ps = p.to_str().expect("utf8");
        let (flag, msg) = flag_error(&create_args(ps, &["--ws-min", "4", "--ws-opt", "6"]));
        assert_eq!(flag, "--ws-opt");
        assert_eq!(msg, "--ws-opt 6 is not a multiple of --ws-min 4");
        let mut zero = create_args(ps, &[]);
        zero[4] = "0";
        let (flag, msg) = flag_error(&zero);
        assert_eq!(flag, "--groups");
        assert!(msg.contains("--groups 0"), "{msg}");
        let (flag, _) = flag_error(&create_args(ps, &["--oob-bytes", "8"]));
        assert_eq!(flag, "--oob-bytes");
        let (flag, msg) = flag_error(&create_args(ps, &["--ws-opt", "12"]));
        assert_eq!(flag, "--chunk-blocks");
        assert!(msg.contains("--ws-opt 12"), "{msg}");
        let (flag, msg) = flag_error(&create_args(ps, &["--bad-chunks", "0:9:0"]));
        assert_eq!(flag, "--bad-chunks");
        assert!(msg.contains("--pus 2"), "{msg}");
        let (flag, _) = flag_error(&create_args(ps, &["--bad-chunks", "1:2"]));
        assert_eq!(flag, "--bad-chunks");
        assert!(!p.exists(), "no image is left behind by refused commands");
    }

    #[test]
    fn image_too_large_for_the_disk_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let ps = p.to_str().expect("utf8");
        // 65535 × 65535 × 1024 chunks × 4 KiB blocks is ~2^57 bytes: no disk has that.
        let args = [
            "create",
            "--path",
            ps,
            "--groups",
            "65535",
            "--pus",
            "65535",
            "--chunks",
            "1024",
            "--chunk-blocks",
            "16",
        ];
        let (flag, msg) = flag_error(&args);
        assert_eq!(flag, "--path");
        assert!(msg.contains("too large for the disk"), "{msg}");
        assert!(!p.exists());
    }

    #[test]
    fn info_on_a_foreign_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("notes.txt");
        std::fs::write(&p, b"hello, not an image").expect("write");
        let ps = p.to_str().expect("utf8");
        match run_to(parse(&["info", "--path", ps]), &mut Vec::new()) {
            Err(MediaCliError::Media(MediaError::NotAnImage { .. })) => {}
            other => panic!("expected NotAnImage, got {other:?}"),
        }
    }
}
