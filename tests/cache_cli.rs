//! `--bdev driver=cache,...`: defaults, and every refusal names the flag and the option.

mod common;

use clap::Parser;
use vblkd::cache::{CleanerPolicy, LoadPolicy, Mode, SeqCutoff};
use vblkd::cli::{build_config, Args, BdevSpec};

fn config(bdevs: &[&str]) -> Result<vblkd::cli::Config, String> {
    let mut argv = vec!["vblkd".to_string()];
    for b in bdevs {
        argv.push("--bdev".into());
        argv.push(b.to_string());
    }
    argv.extend(["--export".into(), "bdev=c0,socket=/nonexistent/s".into()]);
    build_config(&Args::try_parse_from(argv).expect("clap")).map_err(|e| e.to_string())
}

const BASE: [&str; 2] = ["driver=malloc,name=ram,size=16M", "driver=malloc,name=disk,size=64M"];

fn with(cache: &str) -> Result<vblkd::cli::Config, String> {
    config(&[BASE[0], BASE[1], cache])
}

#[test]
fn defaults() {
    let c = with("driver=cache,name=c0,cache=ram,core=disk").expect("valid");
    let BdevSpec::Cache(c) = &c.bdevs[2] else { panic!("not a cache spec") };
    assert_eq!(c.mode, Mode::Wt);
    assert_eq!(c.line_size, 4096);
    assert_eq!(c.cleaner, CleanerPolicy::Alru);
    assert_eq!(c.seq_cutoff, SeqCutoff::Full);
    assert_eq!(c.seq_cutoff_bytes, 1 << 20);
    assert_eq!(c.load, LoadPolicy::Auto);
    let c = with(
        "driver=cache,name=c0,cache=ram,core=disk,mode=wb,line-size=64K,cleaner=acp,seq-cutoff=always,\
         seq-cutoff-size=4M,load=on,alru-wake-ms=10,alru-stale-ms=0,clean-batch=7",
    )
    .expect("valid");
    let BdevSpec::Cache(c) = &c.bdevs[2] else { panic!("not a cache spec") };
    assert_eq!((c.mode, c.line_size, c.cleaner), (Mode::Wb, 65536, CleanerPolicy::Acp));
    assert_eq!((c.seq_cutoff, c.seq_cutoff_bytes, c.load), (SeqCutoff::Always, 4 << 20, LoadPolicy::On));
    assert_eq!((c.alru_wake_ms, c.alru_stale_ms, c.clean_batch), (10, 0, 7));
}

#[test]
fn refusals_name_the_option() {
    let cases = [
        ("driver=cache,name=c0,cache=ram,core=disk,mode=wx", "mode=wx must be one of wt, wb, wa, pt, wi, wo"),
        ("driver=cache,name=c0,cache=ram,core=disk,line-size=3K", "line-size=3072 must be 4K"),
        ("driver=cache,name=c0,cache=ram,core=disk,line-size=128K", "line-size=131072 must be 4K"),
        ("driver=cache,name=c0,cache=ram,core=disk,cleaner=lru", "cleaner=lru must be alru, acp or nop"),
        (
            "driver=cache,name=c0,cache=ram,core=disk,seq-cutoff=some",
            "seq-cutoff=some must be off, full or always",
        ),
        ("driver=cache,name=c0,cache=ram,core=disk,seq-cutoff-size=0", "seq-cutoff-size=0"),
        ("driver=cache,name=c0,cache=ram,core=disk,load=maybe", "load=maybe must be auto, on or off"),
        ("driver=cache,name=c0,cache=ram,core=disk,clean-batch=0", "clean-batch=0"),
        ("driver=cache,name=c0,cache=ram,core=disk,alru-wake-ms=0", "alru-wake-ms=0"),
        ("driver=cache,name=c0,cache=ram", "missing required key 'core'"),
        ("driver=cache,name=c0,core=disk", "missing required key 'cache'"),
        ("driver=cache,name=c0,cache=disk,core=disk", "must be different bdevs"),
        (
            "driver=cache,name=c0,cache=ram,core=nothing",
            "core=nothing: no bdev of that name defined before it",
        ),
        ("driver=cache,name=c0,cache=ram,core=disk,colour=red", "unknown key 'colour'"),
    ];
    for (spec, want) in cases {
        let e = with(spec).expect_err(spec);
        assert!(e.starts_with("--bdev") && e.contains(want), "{spec}: '{e}' lacks '{want}'");
    }
    let e = config(&[
        BASE[0],
        BASE[1],
        "driver=cache,name=c0,cache=ram,core=disk",
        "driver=cache,name=c1,cache=ram,core=disk",
    ])
    .expect_err("core twice");
    assert!(e.contains("core=disk is already the core of cache bdev 'c0'"), "{e}");
}

#[test]
fn build_time_refusals_exit_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let sock = dir.path().join("s.sock");
    let cache_dev = format!("driver=file,name=cd,path={d}/cache.img,size=2M");
    let run = |extra: &[String]| {
        let mut args: Vec<String> =
            vec!["--log-level".into(), "warn".into(), "--bdev".into(), cache_dev.clone()];
        for (i, e) in extra.iter().enumerate() {
            args.push("--bdev".into());
            args.push(format!("driver=malloc,name=core{i},size=8M"));
            args.push("--bdev".into());
            args.push(e.clone());
        }
        args.push("--export".into());
        args.push(format!("bdev=c0,socket={}", sock.display()));
        args
    };
    // Shared cache, disagreeing mode and line size: refused with the reason, exit 2 (a start-up error).
    let out = common::vblkd()
        .args(run(&[
            "driver=cache,name=c0,cache=cd,core=core0,mode=wb".into(),
            "driver=cache,name=c1,cache=cd,core=core1,mode=wt,line-size=8K".into(),
        ]))
        .output()
        .expect("run vblkd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--bdev name=c1")
            && err.contains("must agree")
            && err.contains("mode=wt (the shared cache uses wb)"),
        "{err}"
    );
    // A clean run formats the device; another line size later is another cache's metadata.
    let args = run(&["driver=cache,name=c0,cache=cd,core=core0".into()]);
    let mut d0 = common::Daemon::start(&args, &sock);
    assert!(d0.stop().success());
    let before = std::fs::read(dir.path().join("cache.img")).expect("image");
    let out = common::vblkd()
        .args(run(&["driver=cache,name=c0,cache=cd,core=core0,line-size=16K".into()]))
        .output()
        .expect("run vblkd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another cache's metadata") && err.contains("load=off"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("cache.img")).expect("image"), before, "device modified");
}
