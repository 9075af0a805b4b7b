//! The export socket as an operator sets it: owner, group and mode applied before it accepts.
//!
//! ```text
//!  socket(AF_UNIX) ─► bind(path)          file exists, connect() → ECONNREFUSED (not listening)
//!                  ─► chown(owner, group)  ─► chmod(mode)
//!                  ─► listen()            only now can a frontend connect, with the final permissions
//! ```
//!
//! # Design
//! `std::os::unix::net::UnixListener::bind` binds and listens in one call, so a frontend could connect
//! while the socket still has the umask's mode. Here the socket is bound, its file's ownership and
//! mode are set, and only then does it listen: there is no moment at which the socket accepts with
//! the wrong permissions. This runs every time the socket is created (each daemon start), so a
//! restart never loses the operator's settings the way a one-off `chmod` would.
//!
//! Names are resolved once, when the flags are parsed ([`SocketPerms::parse_owner`] /
//! [`SocketPerms::parse_group`]), so a bad name fails before anything is built. Without any of the
//! options the socket keeps what the umask gives (the behaviour before these options existed).
//!
//! # Limitations
//! `chown`/`chmod` act on the path (Linux cannot change a socket file's mode through its fd), so the
//! directory holding the socket must not be writable by untrusted users (as for any socket path).

use std::ffi::{CStr, CString};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Backlog of the listening socket (one frontend at a time; a reconnecting one may queue).
const BACKLOG: libc::c_int = 16;

/// Ownership and mode of an export's socket file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketPerms {
    /// Mode bits (0..=0o777), applied with chmod; `None` keeps what the umask gives.
    pub mode: Option<u32>,
    /// Owner uid; `None` keeps the daemon's uid.
    pub owner: Option<u32>,
    /// Group gid; `None` keeps the daemon's gid.
    pub group: Option<u32>,
}

/// Errors of resolving a socket option or creating the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// `socket-mode` is not an octal mode up to 0777.
    #[error("socket-mode={0} must be an octal mode between 0 and 0777 (e.g. 0660)")]
    BadMode(String),
    /// No such user.
    #[error("socket-owner={0}: no such user")]
    NoUser(String),
    /// No such group.
    #[error("socket-group={0}: no such group")]
    NoGroup(String),
    /// The path does not fit in `sockaddr_un` or holds a NUL byte.
    #[error("socket path {0} is too long for a UNIX socket (at most 107 bytes) or contains a NUL byte")]
    BadPath(PathBuf),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl SocketPerms {
    /// Parses `socket-mode` (octal, with or without a leading 0, e.g. `0660`, `660`).
    pub fn parse_mode(s: &str) -> Result<u32, SocketError> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(SocketError::BadMode(s.to_string()));
        }
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 => Ok(m),
            _ => Err(SocketError::BadMode(s.to_string())),
        }
    }

    /// Resolves `socket-owner`: a user name, or a numeric uid.
    pub fn parse_owner(s: &str) -> Result<u32, SocketError> {
        if let Ok(uid) = s.parse::<u32>() {
            return Ok(uid);
        }
        lookup_user(s).ok_or_else(|| SocketError::NoUser(s.to_string()))
    }

    /// Resolves `socket-group`: a group name, or a numeric gid.
    pub fn parse_group(s: &str) -> Result<u32, SocketError> {
        if let Ok(gid) = s.parse::<u32>() {
            return Ok(gid);
        }
        lookup_group(s).ok_or_else(|| SocketError::NoGroup(s.to_string()))
    }

    /// True when no option is set (the socket keeps what the umask and the daemon's ids give).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Size of the buffer for getpwnam_r/getgrnam_r strings (grown on ERANGE).
const NSS_BUF: usize = 4096;

fn lookup_user(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut size = NSS_BUF;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: passwd is plain data, filled in by getpwnam_r.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: FFI call with a valid NUL-terminated name, an out-struct, a buffer of `size` bytes
        // that outlives the call, and a valid out-pointer; the strings it sets point into `buf`,
        // which we do not read.
        let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), size, &mut result) };
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 2;
            continue;
        }
        return (rc == 0 && !result.is_null()).then_some(pwd.pw_uid);
    }
}

fn lookup_group(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut size = NSS_BUF;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: group is plain data, filled in by getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `lookup_user`, with getgrnam_r.
        let rc = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), size, &mut result) };
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 2;
            continue;
        }
        return (rc == 0 && !result.is_null()).then_some(grp.gr_gid);
    }
}

fn os(what: &'static str, path: &Path) -> SocketError {
    SocketError::Os { what, path: path.to_path_buf(), source: std::io::Error::last_os_error() }
}

/// Creates a listening UNIX socket at `path` (which must not exist) with `perms` applied before
/// `listen`: until then a `connect` is refused, so nobody connects under the wrong permissions.
/// On error the socket file, if it was created, is removed.
pub fn bind_listener(path: &Path, perms: &SocketPerms) -> Result<UnixListener, SocketError> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| SocketError::BadPath(path.into()))?;
    // SAFETY: sockaddr_un is plain data; zeroed is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = cpath.as_bytes_with_nul();
    if bytes.len() > addr.sun_path.len() {
        return Err(SocketError::BadPath(path.into()));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2); the returned fd is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os("socket", path));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un of `len` bytes, valid for the call.
    if unsafe { libc::bind(raw, std::ptr::addr_of!(addr).cast(), len) } != 0 {
        return Err(os("bind", path));
    }
    let created = RemoveOnError(Some(path.to_path_buf()));
    apply(&cpath, path, perms)?;
    // SAFETY: listen(2) on the socket we own.
    if unsafe { libc::listen(raw, BACKLOG) } != 0 {
        return Err(os("listen", path));
    }
    created.keep();
    Ok(UnixListener::from(fd))
}

/// chown then chmod (chown may clear mode bits on some systems, so the mode comes last).
fn apply(cpath: &CStr, path: &Path, perms: &SocketPerms) -> Result<(), SocketError> {
    if perms.owner.is_some() || perms.group.is_some() {
        let uid = perms.owner.unwrap_or(u32::MAX); // (uid_t)-1: leave unchanged
        let gid = perms.group.unwrap_or(u32::MAX);
        // SAFETY: lchown(2) with a valid NUL-terminated path; does not follow a symlink.
        if unsafe { libc::lchown(cpath.as_ptr(), uid, gid) } != 0 {
            return Err(os("chown", path));
        }
    }
    if let Some(mode) = perms.mode {
        // SAFETY: chmod(2) with a valid NUL-terminated path.
        if unsafe { libc::chmod(cpath.as_ptr(), mode as libc::mode_t) } != 0 {
            return Err(os("chmod", path));
        }
    }
    Ok(())
}

/// Removes the socket file on drop unless [`keep`](Self::keep) was called.
struct RemoveOnError(Option<PathBuf>);

impl RemoveOnError {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes the socket file when the export ends (the listener built from a raw socket does not).
pub(crate) struct SocketFile(pub(crate) PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;

    #[test]
    fn modes() {
        assert_eq!(SocketPerms::parse_mode("0660").ok(), Some(0o660));
        assert_eq!(SocketPerms::parse_mode("660").ok(), Some(0o660));
        assert_eq!(SocketPerms::parse_mode("0o600").ok(), Some(0o600));
        assert_eq!(SocketPerms::parse_mode("0777").ok(), Some(0o777));
        for bad in ["", "0888", "1777", "07777", "rw", "-1", "66 0"] {
            assert!(SocketPerms::parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(SocketPerms::parse_owner("root").ok(), Some(0));
        assert_eq!(SocketPerms::parse_group("root").ok(), Some(0));
        assert_eq!(SocketPerms::parse_owner("1234").ok(), Some(1234));
        assert!(matches!(SocketPerms::parse_owner("no-such-user-vblkd"), Err(SocketError::NoUser(_))));
        assert!(matches!(SocketPerms::parse_group("no-such-group-vblkd"), Err(SocketError::NoGroup(_))));
    }

    #[test]
    fn mode_and_group_are_set_before_listening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.sock");
        let perms = SocketPerms { mode: Some(0o640), owner: None, group: Some(1234) };
        let l = bind_listener(&path, &perms).expect("bind");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(meta.gid(), 1234);
        let _c = UnixStream::connect(&path).expect("connect");
        assert!(l.accept().is_ok());
        // An existing path is not replaced.
        assert!(matches!(bind_listener(&path, &perms), Err(SocketError::Os { what: "bind", .. })));
    }

    #[test]
    fn too_long_path_is_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(matches!(bind_listener(&long, &SocketPerms::default()), Err(SocketError::BadPath(_))));
    }
}
