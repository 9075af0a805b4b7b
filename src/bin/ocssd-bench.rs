//! `ocssd-bench`: throughput of the OCSSD emulator's vector write and vector read.
//!
//! ```text
//! ocssd-bench <image> <threads> <MiB per thread> [--ws-opt N] [--read-blocks N]
//! ```
//!
//! Creates a fresh image (replacing `<image>`), one parallel unit per thread, then each
//! thread writes its MiB sequentially through its own queue pair in `ws_opt`-block vector
//! writes (with OOB); then every chunk is reset and written again (the steady state of an
//! FTL: the image's pages already exist); then it all is read back in `--read-blocks`-block
//! vector reads.
//! Prints MiB/s and commands/s for both phases, over the slowest thread's wall time.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use vblkd::ocssd::{
    Command, Completion, EmuConfig, EmuDevice, EmuGeometry, IoBuf, MediaDevice, Op, Ppa, PpaList, QueuePair,
    SgList, Status,
};

const CHUNK_BLOCKS: u32 = 4096;
const BS: usize = 4096;
const QUEUE_DEPTH: usize = 32;

#[derive(Parser)]
#[command(about = "OCSSD emulator vector write/read throughput")]
struct Args {
    /// Image file to create (replaced if it exists); use /dev/shm for a tmpfs image.
    image: PathBuf,
    /// Number of threads (one queue pair and one parallel unit each).
    threads: u32,
    /// MiB written then read by each thread.
    mib: u64,
    /// Blocks per vector write (ws_opt).
    #[arg(long, default_value_t = 16)]
    ws_opt: u32,
    /// Blocks per vector read (default: ws_opt).
    #[arg(long)]
    read_blocks: Option<u32>,
}

struct Phase {
    bytes: u64,
    cmds: u64,
    elapsed: Duration,
}

fn drain(qp: &mut dyn QueuePair, done: &mut Vec<Completion>, pool: &mut Vec<SgList>) -> u64 {
    qp.poll(done, usize::MAX);
    let n = done.len() as u64;
    for c in done.drain(..) {
        if c.status != Status::SUCCESS {
            eprintln!("command {} failed: {}", c.tag, c.status);
            std::process::exit(1);
        }
        if let Some(d) = c.buffers.data {
            pool.push(d);
        }
    }
    n
}

/// Runs one phase on one thread: `write` or read `blocks_per_cmd` at a time.
fn run_phase(
    dev: &EmuDevice,
    pu: u64,
    num_chk: u64,
    blocks_per_cmd: u32,
    write: bool,
    barrier: &Barrier,
) -> Phase {
    let mut qp = dev.queue_pair(QUEUE_DEPTH).expect("queue pair");
    let oob_bytes = dev.info().oob_bytes_per_block as usize;
    let n = blocks_per_cmd as usize;
    let mut pool: Vec<SgList> = (0..QUEUE_DEPTH).map(|i| SgList::from(vec![(i as u8) | 1; n * BS])).collect();
    let mut done = Vec::with_capacity(QUEUE_DEPTH);
    let mut cmds = 0u64;
    barrier.wait();
    let start = Instant::now();
    for chk in 0..num_chk {
        for lbk in (0..u64::from(CHUNK_BLOCKS)).step_by(n) {
            let data = match pool.pop() {
                Some(d) => d,
                None => {
                    cmds += drain(qp.as_mut(), &mut done, &mut pool);
                    pool.pop().expect("a buffer came back")
                }
            };
            let ppas = PpaList::contiguous(Ppa::new(0, pu, chk, lbk), n).expect("≤ 64 blocks");
            let oob = Some(IoBuf::zeroed(n * oob_bytes));
            let op = if write { Op::Write { ppas, data, oob } } else { Op::Read { ppas, data, oob } };
            let mut cmd = Command { tag: lbk, op };
            while let Err(r) = qp.submit(cmd) {
                cmd = r.command;
                cmds += drain(qp.as_mut(), &mut done, &mut pool);
            }
        }
    }
    while qp.in_flight() > 0 {
        cmds += drain(qp.as_mut(), &mut done, &mut pool);
    }
    Phase { bytes: num_chk * u64::from(CHUNK_BLOCKS) * BS as u64, cmds, elapsed: start.elapsed() }
}

/// Resets every chunk (64 per vector reset).
fn reset_all(dev: &EmuDevice) {
    let mut qp = dev.queue_pair(1).expect("queue pair");
    let total = dev.info().geometry.total_chunks();
    let mut done = Vec::new();
    for first in (0..total).step_by(64) {
        let chunks: Vec<Ppa> =
            (first..total.min(first + 64)).filter_map(|i| dev.info().chunk_at(i)).collect();
        let chunks = PpaList::new(chunks).expect("1..=64 chunks");
        qp.submit(Command { tag: first, op: Op::Reset { chunks } }).expect("depth 1, drained below");
        qp.poll(&mut done, 1);
        if let Some(c) = done.pop() {
            if c.status != Status::SUCCESS {
                eprintln!("reset failed: {}", c.status);
                std::process::exit(1);
            }
        }
    }
}

fn report(name: &str, phases: &[Phase]) {
    let bytes: u64 = phases.iter().map(|p| p.bytes).sum();
    let cmds: u64 = phases.iter().map(|p| p.cmds).sum();
    let secs = phases.iter().map(|p| p.elapsed.as_secs_f64()).fold(0.0, f64::max);
    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "{name:28} {:9.1} MiB/s  {:9.0} cmd/s  ({mib:.0} MiB, {cmds} cmds, {secs:.3} s)",
        mib / secs,
        cmds as f64 / secs
    );
}

fn main() {
    let args = Args::parse();
    if args.threads == 0 || args.mib == 0 || args.ws_opt == 0 || args.ws_opt > 64 {
        eprintln!("threads and MiB must be ≥ 1, --ws-opt in 1..=64");
        std::process::exit(2);
    }
    let read_blocks = args.read_blocks.unwrap_or(args.ws_opt);
    if read_blocks == 0 || read_blocks > 64 || CHUNK_BLOCKS % read_blocks != 0 {
        eprintln!("--read-blocks must divide {CHUNK_BLOCKS} and be ≤ 64");
        std::process::exit(2);
    }
    let chunk_mib = u64::from(CHUNK_BLOCKS) * BS as u64 / (1024 * 1024);
    let num_chk = args.mib.div_ceil(chunk_mib);
    let _ = std::fs::remove_file(&args.image);
    let cfg = EmuConfig {
        geometry: EmuGeometry {
            num_grp: 1,
            num_pu: args.threads,
            num_chk: u32::try_from(num_chk).expect("chunk count fits u32"),
            clba: CHUNK_BLOCKS,
            ws_min: args.ws_opt.min(4),
            ws_opt: args.ws_opt,
            ..EmuGeometry::default()
        },
        ..EmuConfig::default()
    };
    let dev = EmuDevice::create(&args.image, &cfg).unwrap_or_else(|e| {
        eprintln!("creating {}: {e}", args.image.display());
        std::process::exit(1);
    });
    println!(
        "image {} | threads {} | {} MiB/thread | write {} blocks ({} KiB)/cmd | read {} blocks ({} KiB)/cmd | oob {} B/block",
        args.image.display(),
        args.threads,
        num_chk * chunk_mib,
        args.ws_opt,
        args.ws_opt as usize * BS / 1024,
        read_blocks,
        read_blocks as usize * BS / 1024,
        dev.info().oob_bytes_per_block,
    );
    let phases = [
        ("write (fresh image)", Some(true), args.ws_opt),
        ("reset all chunks", None, 0),
        ("write (rewrite after reset)", Some(true), args.ws_opt),
        ("read", Some(false), read_blocks),
    ];
    for (name, write, blocks) in phases {
        let Some(write) = write else {
            reset_all(&dev);
            println!("{name}");
            continue;
        };
        let barrier = Arc::new(Barrier::new(args.threads as usize));
        let phases: Vec<Phase> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..args.threads)
                .map(|t| {
                    let dev = dev.clone();
                    let barrier = Arc::clone(&barrier);
                    s.spawn(move || run_phase(&dev, u64::from(t), num_chk, blocks, write, &barrier))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("bench thread")).collect()
        });
        report(name, &phases);
    }
    drop(dev);
    let _ = std::fs::remove_file(&args.image);
}
