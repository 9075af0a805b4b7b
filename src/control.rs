//! The control socket (SPEC §8): JSON-RPC 2.0 over a UNIX stream socket, one request per line.
//!
//! ```text
//!  vblkd ctl / any client ──line──► accept thread ─► one thread per client (≤ MAX_CLIENTS)
//!                                                     │ parse (≤ 1 MiB a line) ─► dispatch(method)
//!                                                     ▼
//!                                                Daemon (bdevs, exports, QoS, reset, log level)
//! ```
//!
//! # Design
//! * The socket is created with mode 0600 (bound under a restrictive umask: no moment where another
//!   user could connect). A live socket at the path is refused; a stale one is replaced.
//! * Every client has its own thread, so a slow or stuck client never delays another; pollers are
//!   never involved (management goes through [`Daemon`]'s own lock). A line longer than 1 MiB is
//!   answered with an error and skipped; malformed JSON, an unknown method or bad parameters get a
//!   JSON-RPC error naming the parameter and the problem; a client that disconnects mid-line is
//!   simply dropped.
//! * Parameters are an object of `key: value` (strings or numbers): the same `KEY=VAL` grammar as the
//!   flags, so `bdev-add` and `export-add` reuse the flag parsers and their messages.
//!
//! # Methods
//! `bdev-list`, `bdev-stats [name]`, `bdev-add <--bdev keys>`, `bdev-remove name [force]`, `export-list`,
//! `export-add <--export keys>`, `export-remove socket|bdev`, `qos-set name iops bps`, `bdev-reset name`,
//! `log-level level`, `ftl-info name`, `cache-stats name`, `cache-mode-set name mode`,
//! `cache-flush name`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::cli;
use crate::daemon::{Daemon, DaemonError};

/// Longest request line accepted.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 64;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const SERVER_ERROR: i64 = -32000;

/// Errors starting the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path is taken by a live daemon, or is not a socket.
    #[error("{0}")]
    Socket(String),
    /// An OS error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An RPC error: code and message.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
}

impl RpcError {
    fn params(message: impl Into<String>) -> Self {
        Self { code: INVALID_PARAMS, message: message.into() }
    }
}

impl From<DaemonError> for RpcError {
    fn from(e: DaemonError) -> Self {
        let code = match e {
            DaemonError::InvalidParam { .. } => INVALID_PARAMS,
            DaemonError::NotFound(_) | DaemonError::Busy(_) | DaemonError::Failed(_) => SERVER_ERROR,
        };
        Self { code, message: e.to_string() }
    }
}

/// Binds `path` (mode 0600) and serves it until `stop` is written.
pub fn start(path: &Path, daemon: Arc<Daemon>, stop: Arc<EventFd>) -> Result<JoinHandle<()>, ControlError> {
    match crate::vhost::check_socket(path) {
        Ok(false) => {}
        Ok(true) => std::fs::remove_file(path).map_err(|source| ControlError::Io {
            context: format!("removing stale {}", path.display()),
            source,
        })?,
        Err(e) => return Err(ControlError::Socket(e.to_string())),
    }
    // SAFETY: umask only changes the process's file-creation mask; restored right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound
        .map_err(|source| ControlError::Io { context: format!("binding {}", path.display()), source })?;
    let path = path.to_path_buf();
    log::info!("control socket listening on {}", path.display());
    std::thread::Builder::new()
        .name("vblkd-control".into())
        .spawn(move || accept_loop(listener, path, daemon, stop))
        .map_err(|source| ControlError::Io { context: "spawning the control thread".into(), source })
}

fn accept_loop(listener: UnixListener, path: PathBuf, daemon: Arc<Daemon>, stop: Arc<EventFd>) {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let mut pfds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `pfds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("control socket: poll: {e}");
            break;
        }
        if pfds[1].revents != 0 {
            break;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let mut s = stream;
            let _ = s
                .write_all(error_response(&Value::Null, SERVER_ERROR, "too many control clients").as_bytes());
            continue;
        }
        let daemon = daemon.clone();
        let count = clients.clone();
        let spawned = std::thread::Builder::new().name("vblkd-ctl-client".into()).spawn(move || {
            serve_client(stream, &daemon);
            count.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            log::warn!("control socket: cannot spawn a client thread: {e}");
            clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _ = std::fs::remove_file(&path);
    log::info!("control socket closed");
}

/// Reads requests line by line until the client goes away.
fn serve_client(stream: UnixStream, daemon: &Daemon) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX) + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            if line.len() <= MAX_LINE_BYTES {
                return; // Disconnected mid-line: nothing to answer.
            }
            let msg = format!("request line longer than {MAX_LINE_BYTES} bytes");
            if out.write_all(error_response(&Value::Null, INVALID_REQUEST, &msg).as_bytes()).is_err() {
                return;
            }
            if !skip_line(&mut reader) {
                return;
            }
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(reply) = handle_line(&line, daemon) {
            if out.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Discards input up to and including the next newline; false at EOF or error.
fn skip_line(reader: &mut BufReader<UnixStream>) -> bool {
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) | Err(_) => return false,
            Ok(b) => b,
        };
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return true;
        }
        let n = buf.len();
        reader.consume(n);
    }
}

fn error_response(id: &Value, code: i64, message: &str) -> String {
    let mut s = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string();
    s.push('\n');
    s
}

/// Handles one request line; `None` for a notification (no `id`).
pub fn handle_line(line: &[u8], daemon: &Daemon) -> Option<String> {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Some(error_response(&Value::Null, PARSE_ERROR, &format!("parse error: {e}"))),
    };
    let Some(obj) = req.as_object() else {
        let msg =
            if req.is_array() { "batch requests are not supported" } else { "request is not an object" };
        return Some(error_response(&Value::Null, INVALID_REQUEST, msg));
    };
    let id = obj.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(error_response(&reply_id, INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\""));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Some(error_response(&reply_id, INVALID_REQUEST, "\"method\" must be a string"));
    };
    let result = params(obj.get("params")).and_then(|p| dispatch(method, p, daemon));
    id.as_ref()?;
    Some(match result {
        Ok(v) => {
            let mut s = json!({"jsonrpc": "2.0", "id": reply_id, "result": v}).to_string();
            s.push('\n');
            s
        }
        Err(e) => error_response(&reply_id, e.code, &e.message),
    })
}

/// Parameters as `key → string`; numbers and booleans are turned into their text.
fn params(p: Option<&Value>) -> Result<BTreeMap<String, String>, RpcError> {
    let mut out = BTreeMap::new();
    match p {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                    _ => {
                        return Err(RpcError::params(format!("parameter '{k}' must be a string or a number")))
                    }
                };
                out.insert(k.clone(), s);
            }
        }
        Some(_) => return Err(RpcError::params("params must be an object of key: value")),
    }
    Ok(out)
}

struct Params {
    method: &'static str,
    map: BTreeMap<String, String>,
}

impl Params {
    fn required(&mut self, key: &str) -> Result<String, RpcError> {
        self.map
            .remove(key)
            .ok_or_else(|| RpcError::params(format!("{}: missing required parameter '{key}'", self.method)))
    }
    fn optional(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }
    fn finish(self) -> Result<(), RpcError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(RpcError::params(format!("{}: unknown parameter '{k}'", self.method))),
        }
    }
    /// The remaining parameters in the flags' `k=v,k=v` grammar.
    fn as_flag_value(&mut self) -> String {
        std::mem::take(&mut self.map)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The method names, for `vblkd ctl --help` and errors.
pub const METHODS: &[&str] = &[
    "bdev-list",
    "bdev-stats",
    "bdev-add",
    "bdev-remove",
    "export-list",
    "export-add",
    "export-remove",
    "qos-set",
    "bdev-reset",
    "log-level",
    "ftl-info",
    "cache-stats",
    "cache-mode-set",
    "cache-flush",
];

/// The bdev `name` if it is of `module`, else a parameter error naming it.
fn module_bdev(
    reg: &crate::bdev::Registry,
    name: &str,
    module: &str,
) -> Result<std::sync::Arc<dyn crate::bdev::Bdev>, RpcError> {
    let b = reg.get(name).ok_or_else(|| RpcError::params(format!("name: no bdev named '{name}'")))?;
    if b.info().module != module {
        return Err(RpcError::params(format!(
            "name: bdev '{name}' is a {} bdev, not {module}",
            b.info().module
        )));
    }
    Ok(b)
}

fn cache_of(b: &dyn crate::bdev::Bdev) -> Result<&crate::cache::CacheBdev, RpcError> {
    b.as_any()
        .and_then(|a| a.downcast_ref::<crate::cache::CacheBdev>())
        .ok_or_else(|| RpcError { code: SERVER_ERROR, message: "not a cache bdev".into() })
}

fn dispatch(method: &str, map: BTreeMap<String, String>, daemon: &Daemon) -> Result<Value, RpcError> {
    let Some(&name) = METHODS.iter().find(|m| **m == method) else {
        return Err(RpcError {
            code: METHOD_NOT_FOUND,
            message: format!("unknown method '{method}' (methods: {})", METHODS.join(", ")),
        });
    };
    let mut p = Params { method: name, map };
    let reg = daemon.registry();
    match name {
        "bdev-list" => {
            p.finish()?;
            let exports = daemon.exports();
            let list: Vec<Value> = reg
                .names()
                .iter()
                .filter_map(|n| {
                    let b = reg.get(n)?;
                    let i = b.info();
                    Some(json!({
                        "name": i.name,
                        "module": i.module,
                        "uuid": uuid_string(&i.uuid),
                        "block_size": i.block_size,
                        "num_blocks": i.num_blocks,
                        "size_bytes": i.size_bytes(),
                        "claimed_by": reg.claimed_by(n).ok().flatten(),
                        "qos": reg.control(n).ok().map(|c| c.qos.limits()),
                        "exported_on": exports.iter().find(|e| &e.bdev == n).map(|e| e.socket.display().to_string()),
                    }))
                })
                .collect();
            Ok(Value::Array(list))
        }
        "bdev-stats" => {
            let one = p.optional("name");
            p.finish()?;
            let names = match one {
                Some(n) => {
                    let b =
                        reg.get(&n).ok_or_else(|| RpcError::params(format!("name: no bdev named '{n}'")))?;
                    vec![b.info().name.clone()]
                }
                None => reg.names(),
            };
            let mut out = serde_json::Map::new();
            for n in names {
                let (Ok(stats), Some(b)) = (reg.bdev_stats(&n), reg.get(&n)) else { continue };
                let mut v = serde_json::to_value(stats.snapshot()).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("queue_depth".into(), json!(stats.queue_depth()));
                    if let Some(m) = b.module_stats() {
                        o.insert(b.info().module.to_string(), m);
                    }
                }
                out.insert(n, v);
            }
            Ok(Value::Object(out))
        }
        "bdev-add" => {
            let value = p.as_flag_value();
            let (spec, qos) = cli::parse_bdev_with_qos(&value).map_err(|e| RpcError::params(e.problem))?;
            daemon.add_bdev(&spec, qos)?;
            Ok(json!({"name": spec.name()}))
        }
        "bdev-remove" => {
            let n = p.required("name")?;
            let force = match p.optional("force").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => return Err(RpcError::params(format!("force={v} must be true or false"))),
            };
            p.finish()?;
            daemon.remove_bdev_with(&n, force)?;
            Ok(json!({"removed": n}))
        }
        "export-list" => {
            p.finish()?;
            let list: Vec<Value> = daemon
                .export_states()
                .iter()
                .map(|(e, connected, connections)| {
                    json!({
                        "bdev": e.bdev, "socket": e.socket.display().to_string(), "queues": e.queues,
                        "queue_size": e.queue_size, "readonly": e.readonly, "serial": e.serial,
                        "poll_us": e.poll_us, "poll_threads": e.poll_threads, "connected": connected, "connections": connections,
                    })
                })
                .collect();
            Ok(Value::Array(list))
        }
        "export-add" => {
            let value = p.as_flag_value();
            let spec = cli::parse_export(&value).map_err(|e| RpcError::params(e.problem))?;
            if reg.get(&spec.bdev).is_none() {
                return Err(RpcError::params(format!("bdev: no bdev named '{}'", spec.bdev)));
            }
            let socket = daemon.add_export(spec)?;
            Ok(json!({"socket": socket.display().to_string()}))
        }
        "export-remove" => {
            let key = match (p.optional("socket"), p.optional("bdev")) {
                (Some(s), None) => s,
                (None, Some(b)) => b,
                (Some(_), Some(_)) => {
                    return Err(RpcError::params("export-remove: give socket or bdev, not both"))
                }
                (None, None) => {
                    return Err(RpcError::params(
                        "export-remove: missing required parameter 'socket' or 'bdev'",
                    ))
                }
            };
            p.finish()?;
            let spec = daemon.remove_export(&key)?;
            Ok(json!({"removed": spec.socket.display().to_string(), "bdev": spec.bdev}))
        }
        "qos-set" => {
            let n = p.required("name")?;
            let control =
                reg.control(&n).map_err(|_| RpcError::params(format!("name: no bdev named '{n}'")))?;
            let mut limits = control.qos.limits();
            if let Some(v) = p.optional("iops") {
                limits.iops =
                    v.parse().map_err(|_| RpcError::params(format!("iops={v} is not a whole number")))?;
            }
            if let Some(v) = p.optional("bps") {
                limits.bps = cli::parse_size(&v).map_err(|e| RpcError::params(format!("bps: {e}")))?;
            }
            p.finish()?;
            limits.validate().map_err(RpcError::params)?;
            reg.set_qos(&n, limits).map_err(|e| RpcError::params(e.to_string()))?;
            log::info!("bdev '{n}': QoS set to {} IOPS, {} bytes/s (0 = unlimited)", limits.iops, limits.bps);
            Ok(serde_json::to_value(limits).unwrap_or_default())
        }
        "bdev-reset" => {
            let n = p.required("name")?;
            p.finish()?;
            if reg.get(&n).is_none() {
                return Err(RpcError::params(format!("name: no bdev named '{n}'")));
            }
            daemon.reset_bdev(&n)?;
            Ok(json!({"reset": n}))
        }
        "log-level" => {
            let l = p.required("level")?;
            p.finish()?;
            let level: log::LevelFilter = l.parse().map_err(|_| {
                RpcError::params(format!("level={l} must be one of off, error, warn, info, debug, trace"))
            })?;
            log::set_max_level(level);
            Ok(json!({"level": level.to_string().to_lowercase()}))
        }
        "ftl-info" | "cache-stats" => {
            let n = p.required("name")?;
            p.finish()?;
            let module = if name == "ftl-info" { "ftl" } else { "cache" };
            let b = module_bdev(reg, &n, module)?;
            let i = b.info();
            let mut v = json!({
                "name": i.name, "uuid": uuid_string(&i.uuid), "block_size": i.block_size,
                "num_blocks": i.num_blocks,
            });
            if let (Some(o), Some(serde_json::Value::Object(m))) = (v.as_object_mut(), b.module_stats()) {
                o.extend(m);
            }
            Ok(v)
        }
        "cache-mode-set" => {
            let n = p.required("name")?;
            let m = p.required("mode")?;
            p.finish()?;
            let mode = crate::cache::Mode::parse(&m)
                .ok_or_else(|| RpcError::params(format!("mode={m} must be one of wt, wb, wa, pt, wi, wo")))?;
            let b = module_bdev(reg, &n, "cache")?;
            cache_of(b.as_ref())?
                .set_mode(mode)
                .map_err(|e| RpcError { code: SERVER_ERROR, message: e.to_string() })?;
            Ok(json!({"name": n, "mode": mode.as_str()}))
        }
        "cache-flush" => {
            let n = p.required("name")?;
            p.finish()?;
            let b = module_bdev(reg, &n, "cache")?;
            cache_of(b.as_ref())?
                .clean_all()
                .map_err(|e| RpcError { code: SERVER_ERROR, message: e.to_string() })?;
            Ok(json!({"flushed": n}))
        }
        _ => Err(RpcError { code: METHOD_NOT_FOUND, message: format!("unknown method '{method}'") }),
    }
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
