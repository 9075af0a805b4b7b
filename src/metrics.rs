//! `--metrics ADDR:PORT`: the statistics in the Prometheus text exposition format at `/metrics`.
//!
//! ```text
//!  scraper ──GET /metrics──► metrics thread ─► snapshot (registry stats, exports, module stats)
//!                                             ─► prometheus::TextEncoder ─► HTTP/1.1 200 text/plain
//! ```
//!
//! # Design
//! * One thread, one connection at a time (scrapes are rare and cheap), reading at most 8 KiB of
//!   request with a 2 s timeout, so a slow or hostile client can delay a scrape but not the daemon.
//! * The values are read at scrape time from the counters the I/O path already keeps (no extra work
//!   on the hot path); the text is produced by the `prometheus` crate's encoder from metric families
//!   built here, not by hand-written strings.
//! * Families: `vblkd_bdev_ops_total{bdev,kind}`, `vblkd_bdev_bytes_total{bdev,kind}`,
//!   `vblkd_bdev_errors_total{bdev}`, `vblkd_bdev_io_latency_seconds{bdev}` (histogram of reads and
//!   writes), `vblkd_bdev_queue_depth{bdev}`, `vblkd_bdev_qos_limit{bdev,limit}`,
//!   `vblkd_export_queues{bdev,socket}`, `vblkd_export_connected{bdev,socket}`,
//!   `vblkd_export_connections_total{bdev,socket}`, and every number a module reports (FTL, cache) as
//!   `vblkd_module_stat{bdev,module,key}`.
//! * Loopback by default: the operator names the address; nothing listens unless `--metrics` is given.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use vmm_sys_util::eventfd::EventFd;

use crate::bdev::stats::{latency_bucket_bound_seconds, LATENCY_BUCKETS};
use crate::daemon::Daemon;

/// Binds `addr` and serves `/metrics` until `stop` is written.
pub fn start(
    addr: SocketAddr,
    daemon: Arc<Daemon>,
    stop: Arc<EventFd>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    log::info!("metrics on http://{bound}/metrics");
    let h = std::thread::Builder::new().name("vblkd-metrics".into()).spawn(move || loop {
        let mut pfds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `pfds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if pfds[1].revents != 0 {
            return;
        }
        if let Ok((s, _)) = listener.accept() {
            if let Err(e) = serve(s, &daemon) {
                log::debug!("metrics client: {e}");
            }
        }
    })?;
    Ok((bound, h))
}

fn serve(mut s: TcpStream, daemon: &Daemon) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > 8192 {
            break;
        }
    }
    let first = req.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first = String::from_utf8_lossy(first);
    let mut words = first.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        ("405 Method Not Allowed", "text/plain", b"only GET\n".to_vec())
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(daemon))
    } else {
        ("404 Not Found", "text/plain", b"see /metrics\n".to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&body)
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f
}

fn counter(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_gauge(g);
    m
}

/// Every number in a module's stats JSON, flattened with `.`-joined keys.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f64)>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.push((prefix.to_string(), f));
            }
        }
        serde_json::Value::Bool(b) => out.push((prefix.to_string(), if *b { 1.0 } else { 0.0 })),
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), v, out);
            }
        }
        _ => {}
    }
}

/// The exposition text of the daemon's current statistics.
pub fn render(daemon: &Daemon) -> Vec<u8> {
    let reg = daemon.registry();
    let mut ops = family("vblkd_bdev_ops_total", "Completed I/O by kind.", MetricType::COUNTER);
    let mut bytes = family("vblkd_bdev_bytes_total", "Bytes moved or covered by kind.", MetricType::COUNTER);
    let mut errors = family("vblkd_bdev_errors_total", "Failed I/O.", MetricType::COUNTER);
    let mut lat = family(
        "vblkd_bdev_io_latency_seconds",
        "Read and write latency from submission to completion.",
        MetricType::HISTOGRAM,
    );
    let mut qd = family("vblkd_bdev_queue_depth", "I/O submitted and not yet completed.", MetricType::GAUGE);
    let mut qos = family("vblkd_bdev_qos_limit", "QoS limits (0 = unlimited).", MetricType::GAUGE);
    let mut module = family("vblkd_module_stat", "Module statistics (FTL, cache, ...).", MetricType::GAUGE);
    for name in reg.names() {
        let (Ok(stats), Some(bdev)) = (reg.bdev_stats(&name), reg.get(&name)) else { continue };
        let s = stats.snapshot();
        let b = name.as_str();
        for (kind, n, by) in [
            ("read", s.read_ops, s.read_bytes),
            ("write", s.write_ops, s.write_bytes),
            ("unmap", s.unmap_ops, s.unmap_bytes),
            ("write_zeroes", s.write_zeroes_ops, s.write_zeroes_bytes),
            ("flush", s.flush_ops, 0),
        ] {
            ops.mut_metric().push(counter(&[("bdev", b), ("kind", kind)], n as f64));
            bytes.mut_metric().push(counter(&[("bdev", b), ("kind", kind)], by as f64));
        }
        errors.mut_metric().push(counter(&[("bdev", b)], s.errors as f64));
        let hist = stats.latency_histogram();
        let mut h = Histogram::default();
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS);
        for (i, c) in hist.iter().enumerate().take(LATENCY_BUCKETS - 1) {
            cumulative += c;
            let mut bk = Bucket::default();
            bk.set_upper_bound(latency_bucket_bound_seconds(i));
            bk.set_cumulative_count(cumulative);
            buckets.push(bk);
        }
        h.set_bucket(buckets);
        h.set_sample_count(hist.iter().sum());
        h.set_sample_sum((s.read_latency_ns_sum + s.write_latency_ns_sum) as f64 * 1e-9);
        let mut m = Metric::default();
        m.set_label(labels(&[("bdev", b)]));
        m.set_histogram(h);
        lat.mut_metric().push(m);
        qd.mut_metric().push(gauge(&[("bdev", b)], stats.queue_depth() as f64));
        if let Ok(c) = reg.control(&name) {
            let l = c.qos.limits();
            qos.mut_metric().push(gauge(&[("bdev", b), ("limit", "iops")], l.iops as f64));
            qos.mut_metric().push(gauge(&[("bdev", b), ("limit", "bps")], l.bps as f64));
        }
        if let Some(v) = bdev.module_stats() {
            let mut flat = Vec::new();
            flatten("", &v, &mut flat);
            let module_name = bdev.info().module;
            for (k, f) in flat {
                module.mut_metric().push(gauge(&[("bdev", b), ("module", module_name), ("key", &k)], f));
            }
        }
    }
    let mut exports = family("vblkd_export_queues", "Virtqueues offered by each export.", MetricType::GAUGE);
    let mut connected =
        family("vblkd_export_connected", "1 while a frontend is connected to the export.", MetricType::GAUGE);
    let mut connections =
        family("vblkd_export_connections_total", "Frontends accepted by the export.", MetricType::COUNTER);
    for (e, is_connected, n) in daemon.export_states() {
        let socket = e.socket.display().to_string();
        let l = [("bdev", e.bdev.as_str()), ("socket", socket.as_str())];
        exports.mut_metric().push(gauge(&l, f64::from(e.queues)));
        connected.mut_metric().push(gauge(&l, if is_connected { 1.0 } else { 0.0 }));
        connections.mut_metric().push(counter(&l, n as f64));
    }
    let families: Vec<MetricFamily> =
        [ops, bytes, errors, lat, qd, qos, module, exports, connected, connections]
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        log::warn!("metrics encoding: {e}");
    }
    out
}
