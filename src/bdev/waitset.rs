//! One fd to sleep on for several: an epoll set of the fds a stacked module waits on (its base
//! channels' completion fds, a timer, a mailbox), readable whenever one of them is. A module hands
//! it out as its channel's `wait_fd`, so an idle poller sleeps on one fd per queue.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A new epoll set watching `fds` for input (event data: the fd itself).
pub(crate) fn epoll_set(fds: impl IntoIterator<Item = RawFd>) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and owned at once.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let epfd = unsafe { OwnedFd::from_raw_fd(raw) };
    for fd in fds {
        epoll_add(&epfd, fd)?;
    }
    Ok(epfd)
}

/// Adds `fd` (input events, event data: the fd) to the epoll set `epfd`. The caller keeps `fd`
/// open while it is in the set.
pub(crate) fn epoll_add(epfd: &OwnedFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
    // SAFETY: a valid epoll fd and a valid epoll_event on the stack for the duration of the call.
    if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
