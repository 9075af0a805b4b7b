//! `vblkd ctl`: the control socket's command-line client.
//!
//! `vblkd ctl [--control PATH] METHOD [key=value | value]...` sends one JSON-RPC 2.0 request (one
//! line), prints the result as pretty JSON on stdout and exits 0; a JSON-RPC error is printed on
//! stderr (`vblkd ctl: METHOD: message`) with exit status 1; a usage error exits 2.
//!
//! A bare value (no `=`) is the method's main parameter: the bdev name for `bdev-stats`,
//! `bdev-remove`, `qos-set` and `bdev-reset`, the level for `log-level`, and for `export-remove` the
//! socket (when it contains a `/`) or the bdev name.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::cli::CtlArgs;

/// Why `vblkd ctl` failed, with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad arguments (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Could not talk to the daemon (exit 1).
    #[error("{0}")]
    Connection(String),
    /// The daemon answered with an error (exit 1).
    #[error("{method}: {message}")]
    Rpc {
        /// The method.
        method: String,
        /// The daemon's message.
        message: String,
    },
}

impl CtlError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Connection(_) | Self::Rpc { .. } => 1,
        }
    }
}

/// The key a bare value stands for, per method.
fn main_key(method: &str, value: &str) -> Option<&'static str> {
    match method {
        "bdev-stats" | "bdev-remove" | "qos-set" | "bdev-reset" | "ftl-info" | "cache-stats"
        | "cache-mode-set" | "cache-flush" => Some("name"),
        "log-level" => Some("level"),
        "export-remove" => Some(if value.contains('/') { "socket" } else { "bdev" }),
        _ => None,
    }
}

/// Builds the request's params object from the command-line words.
pub fn build_params(method: &str, words: &[String]) -> Result<Value, CtlError> {
    let mut map = Map::new();
    for (i, w) in words.iter().enumerate() {
        let (k, v) = match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => (k.to_string(), v.to_string()),
            Some(_) => return Err(CtlError::Usage(format!("'{w}' has an empty key"))),
            None => match (i, main_key(method, w)) {
                (0, Some(k)) => (k.to_string(), w.clone()),
                _ => return Err(CtlError::Usage(format!("'{w}' is not key=value"))),
            },
        };
        if map.insert(k.clone(), Value::String(v)).is_some() {
            return Err(CtlError::Usage(format!("parameter '{k}' given twice")));
        }
    }
    Ok(Value::Object(map))
}

/// Sends the request and returns the result value.
pub fn call(args: &CtlArgs) -> Result<Value, CtlError> {
    let params = build_params(&args.method, &args.params)?;
    let stream = UnixStream::connect(&args.control).map_err(|e| {
        CtlError::Connection(format!(
            "cannot connect to the control socket {}: {e} (is vblkd running? see --control)",
            args.control.display()
        ))
    })?;
    let timeout = Some(Duration::from_secs(args.timeout.max(1)));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let mut line = json!({"jsonrpc": "2.0", "id": 1, "method": args.method, "params": params}).to_string();
    line.push('\n');
    let mut w = &stream;
    w.write_all(line.as_bytes()).map_err(|e| CtlError::Connection(format!("sending the request: {e}")))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| CtlError::Connection(format!("reading the answer: {e}")))?;
    let v: Value = serde_json::from_str(&answer)
        .map_err(|e| CtlError::Connection(format!("the daemon's answer is not JSON ({e}): {answer:?}")))?;
    if let Some(err) = v.get("error") {
        let message = err.get("message").and_then(Value::as_str).unwrap_or("unknown error").to_string();
        return Err(CtlError::Rpc { method: args.method.clone(), message });
    }
    Ok(v.get("result").cloned().unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn bare_values_become_the_main_parameter() {
        assert_eq!(build_params("bdev-remove", &words(&["m0"])).unwrap(), json!({"name": "m0"}));
        assert_eq!(
            build_params("qos-set", &words(&["m0", "iops=10000"])).unwrap(),
            json!({"name": "m0", "iops": "10000"})
        );
        assert_eq!(
            build_params("export-remove", &words(&["/a/b.sock"])).unwrap(),
            json!({"socket": "/a/b.sock"})
        );
        assert_eq!(build_params("export-remove", &words(&["m0"])).unwrap(), json!({"bdev": "m0"}));
        assert_eq!(build_params("log-level", &words(&["debug"])).unwrap(), json!({"level": "debug"}));
    }

    #[test]
    fn bad_words_are_usage_errors() {
        assert!(matches!(build_params("bdev-add", &words(&["m0"])), Err(CtlError::Usage(_))));
        assert!(matches!(build_params("bdev-remove", &words(&["m0", "m1"])), Err(CtlError::Usage(_))));
        assert!(matches!(build_params("bdev-add", &words(&["=x"])), Err(CtlError::Usage(_))));
        assert!(matches!(build_params("bdev-add", &words(&["a=1", "a=2"])), Err(CtlError::Usage(_))));
    }
}
