//! `vblkd-bench`: a load generator over a vhost-user-blk socket (libblkio client).
//!
//! ```text
//! vblkd-bench --socket PATH [--rw randread|randwrite|read|write] [--bs 4096] [--qd 32] [--queues 1]
//!             [--seconds 5] [--span-mib 1024] [--hot-pct 90 --hot-set-pct 10]
//! ```
//! `--hot-pct P` sends P % of random I/O to the first `--hot-set-pct` % of the span (a hot/cold
//! pattern for cache benchmarks; 0 = uniform).
//! One client thread per queue keeps `qd` requests in flight; prints IOPS, MiB/s and latency
//! percentiles (p50/p99/p99.9) as one JSON line, so runs against vblkd and qemu-storage-daemon compare.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vblkd::client::{BlkClient, QueueClient};

#[derive(Debug, Parser)]
struct Opts {
    /// vhost-user-blk socket.
    #[arg(long)]
    socket: PathBuf,
    /// Pattern.
    #[arg(long, default_value = "randread", value_parser = ["randread", "randwrite", "read", "write"])]
    rw: String,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Queue depth per queue.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Queues (one client thread each).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Run time.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes of the device to address, in MiB (capped at the capacity).
    #[arg(long, default_value_t = 1024)]
    span_mib: u64,
    /// Share of random I/O (percent) that goes to the hot set; 0 = uniform.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
    hot_pct: u64,
    /// Size of the hot set, in percent of the span.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    hot_set_pct: u64,
    /// Use libblkio poll queues (the client busy-polls for completions instead of sleeping).
    #[arg(long)]
    poll: bool,
}

struct QueueResult {
    ops: u64,
    errors: u64,
    lat_ns: Vec<u32>,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn run_queue(opts: &Opts, q: usize, capacity: u64, mut c: QueueClient) -> Result<QueueResult, String> {
    let blocks = (opts.span_mib << 20).min(capacity) / opts.bs as u64;
    if blocks == 0 {
        return Err("device smaller than one block".into());
    }
    let write = opts.rw.ends_with("write");
    let random = opts.rw.starts_with("rand");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (q as u64 + 1);
    let mut seq = (blocks / opts.queues as u64) * q as u64;
    let mut started = vec![Instant::now(); opts.qd];
    let mut res = QueueResult { ops: 0, errors: 0, lat_ns: Vec::with_capacity(1 << 20) };
    let mut issue = |c: &mut QueueClient, slot: usize, started: &mut [Instant]| {
        let lba = if random && opts.hot_pct > 0 {
            let hot = (blocks * opts.hot_set_pct / 100).max(1);
            let r = xorshift(&mut seed);
            if r % 100 < opts.hot_pct || hot >= blocks {
                (r >> 8) % hot
            } else {
                hot + (r >> 8) % (blocks - hot)
            }
        } else if random {
            xorshift(&mut seed) % blocks
        } else {
            seq = (seq + 1) % blocks;
            seq
        };
        started[slot] = Instant::now();
        if write {
            c.write(lba * opts.bs as u64, slot * opts.bs, opts.bs, slot);
        } else {
            c.read(lba * opts.bs as u64, slot * opts.bs, opts.bs, slot);
        }
    };
    for slot in 0..opts.qd {
        issue(&mut c, slot, &mut started);
    }
    let end = Instant::now() + Duration::from_secs_f64(opts.seconds);
    let mut done = Vec::with_capacity(opts.qd);
    let mut in_flight = opts.qd;
    while in_flight > 0 {
        done.clear();
        c.wait(1, &mut done, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        if done.is_empty() {
            return Err("no completion within 10 s".into());
        }
        let now = Instant::now();
        for comp in &done {
            let slot = comp.user_data;
            res.ops += 1;
            if comp.ret != 0 {
                res.errors += 1;
            }
            res.lat_ns.push(now.duration_since(started[slot]).as_nanos().min(u128::from(u32::MAX)) as u32);
            if now < end {
                issue(&mut c, slot, &mut started);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(res)
}

fn main() {
    let opts = Opts::parse();
    // One connection with `queues` queues (a vhost-user backend serves one frontend at a time).
    let queue_size = (opts.qd * 2).next_power_of_two().max(64);
    let client = BlkClient::connect_opts(
        &opts.socket,
        opts.queues,
        queue_size,
        opts.queues * opts.qd * opts.bs,
        false,
        opts.poll,
    );
    let (capacity, queues) =
        match client.and_then(|c| Ok((c.get_u64("capacity")?, c.into_queue_clients(opts.qd * opts.bs)))) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("vblkd-bench: {e}");
                std::process::exit(1);
            }
        };
    let t0 = Instant::now();
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(q, qc)| {
                let opts = &opts;
                s.spawn(move || run_queue(opts, q, capacity, qc))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("client thread panicked".into())))
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let mut ops = 0u64;
    let mut errors = 0u64;
    let mut lat: Vec<u32> = Vec::new();
    for r in results {
        match r {
            Ok(r) => {
                ops += r.ops;
                errors += r.errors;
                lat.extend(r.lat_ns);
            }
            Err(e) => {
                eprintln!("vblkd-bench: {e}");
                std::process::exit(1);
            }
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        f64::from(lat[i]) / 1000.0
    };
    let iops = ops as f64 / elapsed;
    println!(
        "{}",
        serde_json::json!({
            "rw": opts.rw, "bs": opts.bs, "qd": opts.qd, "queues": opts.queues,
            "seconds": (elapsed * 100.0).round() / 100.0,
            "iops": iops.round(), "mib_s": (iops * opts.bs as f64 / 1048576.0 * 10.0).round() / 10.0,
            "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "errors": errors,
        })
    );
    if errors > 0 {
        std::process::exit(1);
    }
}
