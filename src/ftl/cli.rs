//! `vblkd ftl info --media IMAGE [--punits BEGIN-END]`: an FTL's superblock, bands and statistics as
//! JSON, read without modifying the image.

use std::io::Write;
use std::path::PathBuf;

use super::FtlError;

/// `vblkd ftl` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum FtlCommand {
    /// Print the FTL on an emulated image as JSON (read-only).
    Info {
        /// The emulated OCSSD image.
        #[arg(long)]
        media: PathBuf,
        /// Parallel-unit range of the FTL: BEGIN-END (default: the whole device).
        #[arg(long)]
        punits: Option<String>,
    },
}

/// Parses `BEGIN-END` (or a single PU).
pub fn parse_punits(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u32 = a.trim().parse().map_err(|_| format!("punits={s}: '{a}' is not a number"))?;
    let b: u32 = b.trim().parse().map_err(|_| format!("punits={s}: '{b}' is not a number"))?;
    if b < a {
        return Err(format!("punits={s}: the range ends before it begins"));
    }
    Ok((a, b))
}

/// Runs a command, printing to `out`.
pub fn run_to(cmd: FtlCommand, out: &mut dyn Write) -> Result<(), String> {
    match cmd {
        FtlCommand::Info { media, punits } => {
            let (b, e) = match punits.as_deref() {
                Some(p) => parse_punits(p).map(|(b, e)| (b, Some(e))).map_err(|m| format!("--{m}"))?,
                None => (0, None),
            };
            let v = super::info::info_json(&media, b, e)
                .map_err(|e: FtlError| format!("--media {}: {e}", media.display()))?;
            let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
            writeln!(out, "{text}").map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punits_ranges() {
        assert_eq!(parse_punits("2-5"), Ok((2, 5)));
        assert_eq!(parse_punits(" 1 - 4 "), Ok((1, 4)));
        assert_eq!(parse_punits("3"), Ok((3, 3)));
        assert_eq!(parse_punits("3-3"), Ok((3, 3)));
        assert_eq!(parse_punits("5-2"), Err("punits=5-2: the range ends before it begins".into()));
        assert_eq!(parse_punits("x-2"), Err("punits=x-2: 'x' is not a number".into()));
        assert_eq!(parse_punits("1-y"), Err("punits=1-y: 'y' is not a number".into()));
    }
}
