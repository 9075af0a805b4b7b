//! `vblkd cache info --cache BDEV-OR-PATH`: a cache's metadata and statistics as JSON.
//!
//! ```text
//!  PATH (image file or block device, opened read-only) ─► superblock ─► line records ─► JSON
//!  BDEV (no such path, no '/') ─► running daemon's control socket: cache-stats ─► JSON (live figures)
//! ```
//!
//! # Design
//! Reads the same on-media format as a load (`layout.rs`) through plain `std::fs` reads, never writes:
//! safe on a device that a running vblkd uses (the figures are then as of the last writes). Occupancy and
//! dirty counts are computed from the line records the way a load would see them (after an unclean
//! shutdown only dirty lines count); the other counters are those saved at the last clean shutdown.
//!
//! A value that names an existing path, or contains a `/`, is a path; anything else is a cache bdev
//! name, looked up in the running daemon (`--control`, the daemon's control socket) with its
//! `cache-stats` method: live counters of the bdev and of its shared cache, with the instance's
//! metadata (uuid, line size, lines, data offset, cores).
//!
//! # Limitations
//! A bdev name is only known to a running daemon; a stopped one's cache is read by its device path.

use std::collections::HashMap;

use super::layout;
use super::map::Counters;

/// `vblkd cache info`: metadata and saved statistics of a cache device image, read-only.
pub fn info_json(path: &std::path::Path) -> Result<serde_json::Value, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let dev_bytes = f.seek(SeekFrom::End(0)).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut first = vec![0u8; layout::MD_OFFSET as usize];
    f.read_exact(&mut first).map_err(|e| format!("{}: {e}", path.display()))?;
    let (sb, seq) = layout::decode_superblock(&first).map_err(|e| format!("{}: {e}", path.display()))?;
    layout::check_superblock(&sb, dev_bytes, sb.cache_block_size)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let md_bytes =
        (layout::page_offset(sb.num_lines.div_ceil(layout::LINES_PER_PAGE)) - layout::MD_OFFSET) as usize;
    let mut image = vec![0u8; md_bytes];
    f.read_exact(&mut image).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut per_core: HashMap<u16, (u64, u64)> = HashMap::new();
    for i in 0..sb.num_lines {
        let o = i as usize * layout::LINE_MD_BYTES as usize;
        let rec = layout::decode_line(&image[o..o + layout::LINE_MD_BYTES as usize], i)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(r) = rec.filter(|r| r.used && (r.valid | r.dirty) != 0) {
            let e = per_core.entry(r.core_id).or_default();
            if sb.clean_shutdown || r.dirty != 0 {
                e.0 += 1;
            }
            e.1 += u64::from(r.dirty != 0);
        }
    }
    let cores: Vec<serde_json::Value> = sb
        .cores
        .iter()
        .map(|c| {
            let (occ, dirty) = per_core.get(&c.id).copied().unwrap_or_default();
            let mut stats = c.stats.clone();
            if !stats.is_object() {
                stats = serde_json::to_value(Counters::default()).unwrap_or_default();
            }
            if let Some(o) = stats.as_object_mut() {
                o.insert("occupancy_lines".into(), occ.into());
                o.insert("dirty_lines".into(), dirty.into());
                o.insert("mode".into(), sb.mode.clone().into());
            }
            serde_json::json!({
                "cache_bdev": c.cache_bdev, "core_bdev": c.core_bdev, "id": c.id,
                "core_blocks": c.core_blocks, "block_size": c.block_size, "stats": stats,
            })
        })
        .collect();
    let (occ, dirty) = per_core.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    Ok(serde_json::json!({
        "path": path.display().to_string(),
        "version": layout::VERSION,
        "superblock_seq": seq,
        "uuid": sb.uuid,
        "mode": sb.mode,
        "cleaner": sb.cleaner,
        "line_size": sb.line_size,
        "num_lines": sb.num_lines,
        "cache_block_size": sb.cache_block_size,
        "data_offset": sb.data_offset,
        "clean_shutdown": sb.clean_shutdown,
        "occupancy_lines": occ,
        "dirty_lines": dirty,
        "cores": cores,
    }))
}

/// `vblkd cache info`: a path is read directly (read-only); a bdev name asks the running daemon.
pub fn info_any(target: &str, control: &std::path::Path) -> Result<serde_json::Value, String> {
    let path = std::path::Path::new(target);
    if target.contains('/') || path.exists() {
        return info_json(path);
    }
    let args = crate::cli::CtlArgs {
        control: control.to_path_buf(),
        timeout: 30,
        method: "cache-stats".into(),
        params: vec![format!("name={target}")],
    };
    match crate::ctl::call(&args) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("source".into(), format!("daemon at {}", control.display()).into());
            }
            Ok(v)
        }
        Err(crate::ctl::CtlError::Connection(e)) => Err(format!(
            "{target}: no such file, and no running daemon to ask for a cache bdev of that name: {e}"
        )),
        Err(crate::ctl::CtlError::Rpc { message, .. }) if message.contains("no bdev named") => Err(format!(
            "{target}: no such file, and the daemon at {} has no bdev of that name",
            control.display()
        )),
        Err(e) => Err(format!("{target}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layout::{CoreEntry, LineRecord, Superblock};

    /// A cache device image of `num_lines` 4 KiB lines (512-byte blocks) holding `sb` and `recs`
    /// (line, record).
    fn image(dir: &std::path::Path, sb: &Superblock, recs: &[(u32, LineRecord)]) -> std::path::PathBuf {
        let (n, off) = (u64::from(sb.num_lines), sb.data_offset);
        let mut dev = vec![0u8; (off + n * 4096) as usize];
        dev[4096..8192].copy_from_slice(&layout::encode_superblock(sb, 5).unwrap());
        for (line, r) in recs {
            let page = layout::page_offset(line / layout::LINES_PER_PAGE) as usize;
            let bytes = &mut dev[page..page + layout::PAGE_BYTES as usize];
            layout::put_record(bytes, line % layout::LINES_PER_PAGE, r);
        }
        let p = dir.join(format!("cache-{}.img", sb.num_lines));
        std::fs::write(&p, dev).unwrap();
        p
    }

    fn rec(core_id: u16, core_line: u64, used: bool, valid: u128, dirty: u128) -> LineRecord {
        LineRecord { seq: 1, used, core_id, core_line, valid, dirty }
    }

    /// Occupancy and dirty counts come from the records as a load would see them (used lines
    /// with valid or dirty sectors; after an unclean shutdown only dirty ones), per core and in
    /// total, records on every page included; saved counters come from the superblock (defaults
    /// when none were saved).
    #[test]
    fn info_counts_the_lines_a_load_would_see() {
        let dir = tempfile::tempdir().unwrap();
        let saved = Counters { read_hits: 7, evictions: 3, ..Counters::default() };
        let core = |id: u16, stats: serde_json::Value| CoreEntry {
            id,
            cache_bdev: format!("c{id}"),
            core_bdev: format!("core{id}"),
            core_blocks: 2048,
            block_size: 512,
            stats,
        };
        let (num_lines, data_offset) = layout::geometry(8192 + 2 * 4096 + 40 * 4096, 4096).unwrap();
        assert_eq!((num_lines, data_offset), (40, 16384));
        let mut sb = Superblock {
            uuid: "ab".into(),
            line_size: 4096,
            mode: "wb".into(),
            cleaner: "alru".into(),
            num_lines,
            cache_block_size: 512,
            data_offset,
            clean_shutdown: true,
            cores: vec![core(0, serde_json::to_value(saved).unwrap()), core(1, serde_json::Value::Null)],
        };
        let recs = [
            (0, rec(0, 10, true, 0xff, 0)),    // clean
            (1, rec(0, 11, true, 0xff, 0x0f)), // dirty
            (2, rec(1, 10, true, 0, 1)),       // dirty, no valid bits recorded
            (3, rec(1, 11, true, 0, 0)),       // empty: not loaded
            (4, rec(0, 12, false, 0xff, 0)),   // free
            (35, rec(1, 12, true, 3, 0)),      // clean, on the second page
            (36, rec(0, 13, true, 1, 1)),      // dirty, valid == dirty
        ];
        let counts = |v: &serde_json::Value| {
            let c = |i: usize| {
                let s = &v["cores"][i]["stats"];
                (s["occupancy_lines"].as_u64().unwrap(), s["dirty_lines"].as_u64().unwrap())
            };
            (c(0), c(1), (v["occupancy_lines"].as_u64().unwrap(), v["dirty_lines"].as_u64().unwrap()))
        };
        let v = info_json(&image(dir.path(), &sb, &recs)).unwrap();
        assert_eq!(counts(&v), ((3, 2), (2, 1), (5, 3)), "{v}");
        assert_eq!(v["cores"][0]["stats"]["read_hits"], 7);
        assert_eq!(v["cores"][0]["stats"]["evictions"], 3);
        assert_eq!(v["cores"][0]["stats"]["mode"], "wb");
        assert_eq!(v["cores"][1]["stats"]["read_hits"], 0, "no saved counters: zeros");
        assert_eq!(v["superblock_seq"], 5);
        sb.clean_shutdown = false;
        let v = info_json(&image(dir.path(), &sb, &recs)).unwrap();
        assert_eq!(counts(&v), ((2, 2), (1, 1), (3, 3)), "after an unclean shutdown: {v}");
        // The smallest device: one line, its records page and the superblocks, nothing more.
        let (num_lines, data_offset) = layout::geometry(3 * 4096 + 4096, 4096).unwrap();
        assert_eq!((num_lines, data_offset), (1, 12288));
        let sb = Superblock { num_lines, data_offset, clean_shutdown: true, ..sb };
        let v = info_json(&image(dir.path(), &sb, &[(0, rec(1, 4, true, 1, 0))])).unwrap();
        assert_eq!(counts(&v), ((0, 0), (1, 0), (1, 0)), "{v}");
    }

    /// A bdev name goes to the daemon's control socket: its answer, marked with where it came
    /// from; "no bdev named" said plainly; any other refusal passed on. A value with a `/` is a
    /// path even when nothing is there.
    #[test]
    fn info_asks_the_daemon_about_a_bdev_name() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..3 {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&s).read_line(&mut line).unwrap();
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(req["method"], "cache-stats");
                let answer = match req["params"]["name"].as_str().unwrap() {
                    "c0" => serde_json::json!({"id": 1, "result": {"read_hits": 4}}),
                    "c9" => {
                        serde_json::json!({"id": 1, "error": {"code": -32602, "message": "name: no bdev named 'c9'"}})
                    }
                    _ => {
                        serde_json::json!({"id": 1, "error": {"code": -32602, "message": "name: not a cache bdev"}})
                    }
                };
                (&s).write_all(format!("{answer}\n").as_bytes()).unwrap();
            }
        });
        let v = info_any("c0", &sock).unwrap();
        assert_eq!(v["read_hits"], 4);
        assert_eq!(v["source"], format!("daemon at {}", sock.display()));
        assert_eq!(
            info_any("c9", &sock).unwrap_err(),
            format!("c9: no such file, and the daemon at {} has no bdev of that name", sock.display())
        );
        assert_eq!(info_any("m0", &sock).unwrap_err(), "m0: cache-stats: name: not a cache bdev");
        server.join().unwrap();
        let missing = dir.path().join("no-such.img");
        let e = info_any(&missing.display().to_string(), &sock).unwrap_err();
        assert!(e.starts_with(&format!("{}: ", missing.display())) && !e.contains("daemon"), "{e}");
    }
}
