//! The vhost-user-blk device (SPEC §1): a `VhostUserBackend` serving one bdev per socket.
//!
//! ```text
//!  server (listen, reconnect, stop) ─► device (VhostUserBackend, config) ─► poller (per queue)
//!                                                                              │ request (parse)
//!                                                                              ▼
//!                                                                        bdev::Channel
//! ```
//!
//! Entry point for the daemon: [`serve`] with an [`ExportConfig`] and a stop [`EventFd`].

pub mod chain;
pub mod config;
pub mod device;
pub mod fastmem;
pub mod frontdoor;
pub mod inflight;
pub mod pin;
pub mod poller;
pub mod ratelimit;
pub mod request;
pub mod server;
pub mod socket;
pub mod spin;

pub use server::{
    check_socket, default_queues, serve, ExportConfig, ExportStatus, VhostError, MAX_QUEUES, MAX_QUEUE_SIZE,
};
pub use socket::{SocketError, SocketPerms};
pub use vmm_sys_util::eventfd::EventFd;
