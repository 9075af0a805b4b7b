//! The vhost-user front door: every message from a frontend is read, checked and answered here
//! before vhost-user-backend sees it (SPEC §7, issue 9).
//!
//! ```text
//!  frontend ──socket──► Proxy (f→b thread): recv header+fds, body ─► FrontDoor::check
//!                         │  Forward ───────────────► private socket ──► VhostUserDaemon (vhost-user-backend)
//!                         │  Refuse  ─► error reply (REPLY_ACK) ; connection kept
//!                         │  Local   ─► GET/SET_INFLIGHT_FD answered here ([`LocalHandler`])
//!                         │  Close   ─► broken protocol stream: connection closed
//!  frontend ◄─────────── (b→f thread): replies relayed; GET_PROTOCOL_FEATURES gains the bits
//!                                       answered locally (INFLIGHT_SHMFD)
//! ```
//!
//! # Why a proxy
//! vhost-user-backend 0.24 ends the whole connection on any error a handler returns (its request
//! loop breaks on the first `Err`), installs a memory table before the backend can check it,
//! accepts ring sizes that virtio-queue then silently ignores (a non-power-of-two size keeps the
//! old size, so the device and the guest disagree on the ring layout: stale avail slots are taken as
//! heads and old write chains re-executed — `tests/hostile_ring.rs`), and has no INFLIGHT_SHMFD.
//! Its message handler type is private, so it cannot be wrapped; instead, the daemon is given the
//! other end of a private socket, and everything the frontend sends passes [`FrontDoor::check`]
//! first. Only well-formed, accepted messages reach vhost-user-backend, which keeps doing the
//! vring/memory/worker plumbing it does well.
//!
//! # What is checked ([`FrontDoor::check`], a pure function: fuzzed, see `fuzz/`)
//! * Header: version 1, not a reply, payload ≤ 4096 bytes, fds only on messages that carry them,
//!   at most [`MAX_FDS`]. A violation is a broken stream → [`Verdict::Close`].
//! * Payload shape per message; a bad payload (the stream is still in step) is refused.
//! * Features / protocol features not offered; config writes other than `wce ∈ {0,1}`.
//! * Memory tables (SET_MEM_TABLE, ADD_MEM_REG): 1..=[`MAX_TABLE_REGIONS`] regions, one fd each,
//!   no zero-sized region, no overflow of guest, user or file ranges, each region within its fd's
//!   size (`fstat`: vm-memory does not check, and the first access past the end would SIGBUS the
//!   daemon), no overlapping guest ranges, at most [`MAX_MEM_SLOTS`] regions in all.
//! * Vring messages: index < queue count; size a power of two in `1..=max`; a ring whose size was
//!   refused cannot be started (its SET_VRING_KICK is refused) until a good size is set; a ring
//!   that runs when a size is refused (the protocol sets sizes on stopped rings) keeps its size.
//!
//! # Limitations
//! * Messages that need a reply by themselves (GET_*) cannot be refused without one: a bad
//!   GET_VRING_BASE / GET_CONFIG / GET_INFLIGHT_FD closes the connection.
//! * A refusal without REPLY_ACK negotiated (or without NEED_REPLY) is silent, as the protocol has it.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, info, warn};

use super::ratelimit::RateLimit;

/// Largest payload of a vhost-user message (the `vhost` crate's `MAX_MSG_SIZE`).
pub const MAX_PAYLOAD: usize = 0x1000;
/// Most fds taken with one message.
pub const MAX_FDS: usize = 32;
/// Most regions in one SET_MEM_TABLE.
pub const MAX_TABLE_REGIONS: usize = 32;
/// Most memory regions in all (vhost-user-backend's `MAX_MEM_SLOTS`).
pub const MAX_MEM_SLOTS: usize = 509;
/// Header length.
pub const HDR_LEN: usize = 12;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (virtio feature bit 30).
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature bits.
pub mod pf {
    /// MQ.
    pub const MQ: u64 = 1 << 0;
    /// LOG_SHMFD.
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// REPLY_ACK.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// CONFIG.
    pub const CONFIG: u64 = 1 << 9;
    /// INFLIGHT_SHMFD.
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    /// CONFIGURE_MEM_SLOTS.
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
}

/// Header flag bits.
const VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Request codes (vhost-user specification).
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GPU_SET_SOCKET: u32 = 33;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags (version, REPLY, NEED_REPLY).
    pub flags: u32,
    /// Payload length.
    pub size: u32,
}

impl Header {
    /// Parses 12 little-endian bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self { request: w(0), flags: w(4), size: w(8) }
    }

    /// The 12 wire bytes.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// NEED_REPLY is set.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// A broken protocol stream: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Bad version or the REPLY flag on a request.
    #[error("bad header flags {0:#x}")]
    BadFlags(u32),
    /// Payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is too large")]
    TooLarge(u32),
    /// Fds on a message that takes none, or the wrong number.
    #[error("unexpected file descriptors ({0}) on request {1}")]
    UnexpectedFds(usize, u32),
    /// The stream ended inside a message.
    #[error("truncated message")]
    Truncated,
    /// A message that needs a reply by itself had bad parameters.
    #[error("request {0} cannot be answered: {1}")]
    Unanswerable(u32, Refusal),
}

/// Why a well-formed message was refused (the connection stays usable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Payload length wrong for the request.
    #[error("payload of {got} bytes, expected {want}")]
    BadPayload {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
    /// Virtio feature bits not offered.
    #[error("feature bits {0:#x} were not offered")]
    FeaturesNotOffered(u64),
    /// Protocol feature bits not offered.
    #[error("protocol feature bits {0:#x} were not offered")]
    ProtocolFeaturesNotOffered(u64),
    /// A protocol feature this message needs was not negotiated.
    #[error("protocol feature {0:#x} not negotiated")]
    NotNegotiated(u64),
    /// A vring index out of range.
    #[error("vring index {0} out of range")]
    BadIndex(u32),
    /// A vring size that is zero, above the maximum or not a power of two.
    #[error("vring size {0} is not a power of two in 1..={1}")]
    BadRingSize(u32, u16),
    /// SET_VRING_KICK for a ring whose size was refused.
    #[error("vring {0} has no accepted size")]
    RingSizeNotSet(u32),
    /// Bad vring address flags.
    #[error("vring address flags {0:#x}")]
    BadRingFlags(u32),
    /// SET_VRING_ENABLE with a value other than 0/1.
    #[error("vring enable value {0}")]
    BadEnable(u32),
    /// Config write other than `wce`, or a bad value.
    #[error("config write at offset {0} ({1} bytes): only wce (0 or 1) is writable")]
    ConfigWrite(u32, u32),
    /// Config read out of range.
    #[error("config read at offset {0} ({1} bytes)")]
    ConfigRead(u32, u32),
    /// Bad memory table.
    #[error("memory table: {0}")]
    Memory(String),
    /// A message vblkd does not implement.
    #[error("request {0} is not supported")]
    Unsupported(u32),
    /// A locally handled message failed.
    #[error("{0}")]
    Local(String),
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass to vhost-user-backend (with a rewritten payload when `Some`).
    Forward(Option<Vec<u8>>),
    /// Refuse: error reply when REPLY_ACK is negotiated and NEED_REPLY set.
    Refuse(Refusal),
    /// Answer here (INFLIGHT messages).
    Local,
    /// Close the connection.
    Close(ProtocolError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    gpa: u64,
    size: u64,
}

/// The checker's view of one connection.
#[derive(Debug, Clone)]
pub struct FrontDoor {
    num_queues: u32,
    max_queue_size: u16,
    offered_features: u64,
    offered_protocol: u64,
    /// Protocol bits answered here rather than by vhost-user-backend.
    local_protocol: u64,
    acked_features: u64,
    acked_protocol: u64,
    ring_size_ok: Vec<bool>,
    regions: Vec<Region>,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

fn want_len(body: &[u8], want: usize) -> Result<(), Refusal> {
    if body.len() == want {
        Ok(())
    } else {
        Err(Refusal::BadPayload { got: body.len(), want })
    }
}

/// Messages that may carry fds, and how many.
fn fds_allowed(request: u32) -> std::ops::RangeInclusive<usize> {
    match request {
        req::SET_MEM_TABLE => 0..=MAX_TABLE_REGIONS,
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => 0..=1,
        req::ADD_MEM_REG | req::REM_MEM_REG => 0..=1,
        req::SET_LOG_FD | req::SET_INFLIGHT_FD | req::SET_BACKEND_REQ_FD | req::GPU_SET_SOCKET => 0..=1,
        _ => 0..=0,
    }
}

impl FrontDoor {
    /// A checker for a device with `num_queues` rings of at most `max_queue_size`, offering
    /// `features` and `protocol` (which include the `local_protocol` bits answered by the proxy).
    pub fn new(
        num_queues: u16,
        max_queue_size: u16,
        features: u64,
        protocol: u64,
        local_protocol: u64,
    ) -> Self {
        let n = usize::from(num_queues);
        Self {
            num_queues: u32::from(num_queues),
            max_queue_size,
            offered_features: features,
            offered_protocol: protocol | local_protocol,
            local_protocol,
            acked_features: 0,
            acked_protocol: 0,
            // virtio-queue starts every ring at the maximum size.
            ring_size_ok: vec![true; n],
            regions: Vec::new(),
        }
    }

    /// REPLY_ACK is in effect (as the `vhost` crate decides it).
    pub fn reply_ack(&self) -> bool {
        self.offered_features & F_PROTOCOL_FEATURES != 0 && self.acked_protocol & pf::REPLY_ACK != 0
    }

    /// Negotiated protocol features.
    pub fn acked_protocol(&self) -> u64 {
        self.acked_protocol
    }

    /// Protocol bits to add to vhost-user-backend's GET_PROTOCOL_FEATURES answer.
    pub fn local_protocol(&self) -> u64 {
        self.local_protocol
    }

    fn index(&self, i: u32) -> Result<usize, Refusal> {
        if i < self.num_queues {
            Ok(i as usize)
        } else {
            Err(Refusal::BadIndex(i))
        }
    }

    /// Checks one message. `fd_sizes[i]` is the size of the i-th attached fd when it is a regular
    /// file (memfd, tmpfs, hugetlbfs), `None` otherwise. Accepted state changes are recorded.
    pub fn check(&mut self, hdr: &Header, body: &[u8], fd_sizes: &[Option<u64>]) -> Verdict {
        if hdr.flags & VERSION_MASK != 1 || hdr.flags & FLAG_REPLY != 0 {
            return Verdict::Close(ProtocolError::BadFlags(hdr.flags));
        }
        if hdr.size as usize > MAX_PAYLOAD {
            return Verdict::Close(ProtocolError::TooLarge(hdr.size));
        }
        if body.len() != hdr.size as usize {
            return Verdict::Close(ProtocolError::Truncated);
        }
        if !fds_allowed(hdr.request).contains(&fd_sizes.len()) {
            return Verdict::Close(ProtocolError::UnexpectedFds(fd_sizes.len(), hdr.request));
        }
        match self.check_body(hdr.request, body, fd_sizes) {
            Ok(v) => v,
            Err(r) => match hdr.request {
                // These need a reply of their own kind: an error ack would desynchronise the frontend.
                req::GET_VRING_BASE | req::GET_CONFIG | req::GET_INFLIGHT_FD => {
                    Verdict::Close(ProtocolError::Unanswerable(hdr.request, r))
                }
                _ => Verdict::Refuse(r),
            },
        }
    }

    fn check_body(&mut self, request: u32, body: &[u8], fds: &[Option<u64>]) -> Result<Verdict, Refusal> {
        let fwd = Ok(Verdict::Forward(None));
        match request {
            req::GET_FEATURES | req::SET_OWNER | req::RESET_OWNER | req::GET_PROTOCOL_FEATURES => {
                want_len(body, 0)?;
                fwd
            }
            req::GET_QUEUE_NUM => {
                want_len(body, 0)?;
                self.need_protocol(pf::MQ)?;
                fwd
            }
            req::GET_MAX_MEM_SLOTS => {
                want_len(body, 0)?;
                self.need_protocol(pf::CONFIGURE_MEM_SLOTS)?;
                fwd
            }
            req::SET_FEATURES => {
                want_len(body, 8)?;
                let v = u64_at(body, 0);
                let extra = v & !self.offered_features;
                if extra != 0 {
                    return Err(Refusal::FeaturesNotOffered(extra));
                }
                self.acked_features = v;
                fwd
            }
            req::SET_PROTOCOL_FEATURES => {
                want_len(body, 8)?;
                let v = u64_at(body, 0);
                let extra = v & !self.offered_protocol;
                if extra != 0 {
                    return Err(Refusal::ProtocolFeaturesNotOffered(extra));
                }
                self.acked_protocol = v;
                let backend = v & !self.local_protocol;
                Ok(Verdict::Forward((backend != v).then(|| backend.to_le_bytes().to_vec())))
            }
            req::SET_MEM_TABLE => {
                let regions = Self::table(body, fds)?;
                self.regions = regions;
                fwd
            }
            req::ADD_MEM_REG => {
                self.need_protocol(pf::CONFIGURE_MEM_SLOTS)?;
                want_len(body, 40)?;
                if fds.len() != 1 {
                    return Err(Refusal::Memory("ADD_MEM_REG without exactly one fd".into()));
                }
                let r = Self::region(&body[8..40], fds[0])?;
                if self.regions.len() >= MAX_MEM_SLOTS {
                    return Err(Refusal::Memory(format!("more than {MAX_MEM_SLOTS} regions")));
                }
                if let Some(o) = self.regions.iter().find(|o| overlaps(o, &r)) {
                    return Err(Refusal::Memory(format!(
                        "region {:#x}+{:#x} overlaps {:#x}+{:#x}",
                        r.gpa, r.size, o.gpa, o.size
                    )));
                }
                self.regions.push(r);
                fwd
            }
            req::REM_MEM_REG => {
                self.need_protocol(pf::CONFIGURE_MEM_SLOTS)?;
                want_len(body, 40)?;
                let gpa = u64_at(body, 8);
                let size = u64_at(body, 16);
                let at = self
                    .regions
                    .iter()
                    .position(|o| o.gpa == gpa && o.size == size)
                    .ok_or_else(|| Refusal::Memory(format!("no region {gpa:#x}+{size:#x} to remove")))?;
                self.regions.swap_remove(at);
                fwd
            }
            req::SET_VRING_NUM => {
                want_len(body, 8)?;
                let i = self.index(u32_at(body, 0))?;
                let num = u32_at(body, 4);
                if num == 0 || num > u32::from(self.max_queue_size) || !num.is_power_of_two() {
                    // A stopped ring cannot be started again until a good size is set; a running
                    // one (the protocol sends sizes to stopped rings) keeps its size, and the
                    // frontend has been told.
                    self.ring_size_ok[i] = false;
                    return Err(Refusal::BadRingSize(num, self.max_queue_size));
                }
                self.ring_size_ok[i] = true;
                fwd
            }
            req::SET_VRING_ADDR => {
                want_len(body, 40)?;
                self.index(u32_at(body, 0))?;
                let flags = u32_at(body, 4);
                // Only VHOST_VRING_F_LOG exists, and dirty logging is not offered.
                if flags != 0 {
                    return Err(Refusal::BadRingFlags(flags));
                }
                fwd
            }
            req::SET_VRING_BASE => {
                want_len(body, 8)?;
                self.index(u32_at(body, 0))?;
                let base = u32_at(body, 4);
                if base > u32::from(u16::MAX) {
                    return Err(Refusal::BadPayload { got: base as usize, want: usize::from(u16::MAX) });
                }
                fwd
            }
            req::GET_VRING_BASE => {
                want_len(body, 8)?;
                self.index(u32_at(body, 0))?;
                fwd
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                want_len(body, 8)?;
                let v = u64_at(body, 0);
                let nofd = v & 0x100 != 0;
                if v & !0x1ff != 0 || nofd != fds.is_empty() {
                    return Err(Refusal::BadPayload { got: fds.len(), want: usize::from(!nofd) });
                }
                let i = self.index((v & 0xff) as u32)?;
                if request == req::SET_VRING_KICK && !self.ring_size_ok[i] {
                    return Err(Refusal::RingSizeNotSet(i as u32));
                }
                fwd
            }
            req::SET_VRING_ENABLE => {
                want_len(body, 8)?;
                self.index(u32_at(body, 0))?;
                let num = u32_at(body, 4);
                if num > 1 {
                    return Err(Refusal::BadEnable(num));
                }
                if self.acked_features & F_PROTOCOL_FEATURES == 0 {
                    return Err(Refusal::NotNegotiated(F_PROTOCOL_FEATURES));
                }
                fwd
            }
            req::GET_CONFIG => {
                self.need_protocol(pf::CONFIG)?;
                let (offset, size) = Self::config_hdr(body)?;
                if offset.checked_add(size).map_or(true, |end| end > 256) {
                    return Err(Refusal::ConfigRead(offset, size));
                }
                fwd
            }
            req::SET_CONFIG => {
                self.need_protocol(pf::CONFIG)?;
                let (offset, size) = Self::config_hdr(body)?;
                if offset != 32 || size != 1 || body[12] > 1 {
                    return Err(Refusal::ConfigWrite(offset, size));
                }
                fwd
            }
            req::GET_INFLIGHT_FD | req::SET_INFLIGHT_FD => {
                self.need_protocol(pf::INFLIGHT_SHMFD)?;
                if self.local_protocol & pf::INFLIGHT_SHMFD == 0 {
                    return Err(Refusal::Unsupported(request));
                }
                want_len(body, 24)?;
                if request == req::SET_INFLIGHT_FD && fds.len() != 1 {
                    return Err(Refusal::BadPayload { got: fds.len(), want: 1 });
                }
                Ok(Verdict::Local)
            }
            other => Err(Refusal::Unsupported(other)),
        }
    }

    fn need_protocol(&self, bit: u64) -> Result<(), Refusal> {
        if self.acked_protocol & bit != 0 {
            Ok(())
        } else {
            Err(Refusal::NotNegotiated(bit))
        }
    }

    fn config_hdr(body: &[u8]) -> Result<(u32, u32), Refusal> {
        if body.len() < 12 {
            return Err(Refusal::BadPayload { got: body.len(), want: 12 });
        }
        let (offset, size) = (u32_at(body, 0), u32_at(body, 4));
        want_len(body, 12 + size as usize)?;
        Ok((offset, size))
    }

    /// One 32-byte region description: guest address, size, user address, mmap offset.
    fn region(b: &[u8], fd_size: Option<u64>) -> Result<Region, Refusal> {
        let (gpa, size, uaddr, off) = (u64_at(b, 0), u64_at(b, 8), u64_at(b, 16), u64_at(b, 24));
        let bad = |why: String| Err(Refusal::Memory(why));
        if size == 0 {
            return bad(format!("zero-sized region at {gpa:#x}"));
        }
        if gpa.checked_add(size).is_none() || uaddr.checked_add(size).is_none() {
            return bad(format!("region {gpa:#x}+{size:#x} overflows"));
        }
        let Some(end) = off.checked_add(size) else {
            return bad(format!("region {gpa:#x}: mmap offset {off:#x} + size overflows"));
        };
        if let Some(len) = fd_size {
            if end > len {
                return bad(format!(
                    "region {gpa:#x}+{size:#x} at file offset {off:#x} extends past its file ({len} bytes)"
                ));
            }
        }
        Ok(Region { gpa, size })
    }

    fn table(body: &[u8], fds: &[Option<u64>]) -> Result<Vec<Region>, Refusal> {
        if body.len() < 8 {
            return Err(Refusal::BadPayload { got: body.len(), want: 8 });
        }
        let n = u32_at(body, 0) as usize;
        if n == 0 || n > MAX_TABLE_REGIONS {
            return Err(Refusal::Memory(format!("{n} regions (1..={MAX_TABLE_REGIONS} allowed)")));
        }
        want_len(body, 8 + 32 * n)?;
        if fds.len() != n {
            return Err(Refusal::Memory(format!("{n} regions but {} fds", fds.len())));
        }
        let mut out: Vec<Region> = Vec::with_capacity(n);
        for (k, fd) in fds.iter().enumerate() {
            let r = Self::region(&body[8 + 32 * k..8 + 32 * (k + 1)], *fd)?;
            if let Some(o) = out.iter().find(|o| overlaps(o, &r)) {
                return Err(Refusal::Memory(format!(
                    "region {:#x}+{:#x} overlaps {:#x}+{:#x}",
                    r.gpa, r.size, o.gpa, o.size
                )));
            }
            out.push(r);
        }
        Ok(out)
    }
}

fn overlaps(a: &Region, b: &Region) -> bool {
    // Both ranges were checked not to overflow.
    a.gpa < b.gpa + b.size && b.gpa < a.gpa + a.size
}

/// Answers the messages the proxy handles itself.
pub trait LocalHandler: Send + Sync {
    /// GET_INFLIGHT_FD: the reply payload (24 bytes) and the fd to send.
    fn get_inflight_fd(&self, body: &[u8]) -> Result<(Vec<u8>, OwnedFd), Refusal>;
    /// SET_INFLIGHT_FD with its fd.
    fn set_inflight_fd(&self, body: &[u8], fd: OwnedFd) -> Result<(), Refusal>;
}

/// One received message.
pub struct Message {
    /// Header.
    pub hdr: Header,
    /// Payload.
    pub body: Vec<u8>,
    /// Attached fds.
    pub fds: Vec<OwnedFd>,
}

/// Errors of the wire layer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the socket between messages.
    #[error("peer disconnected")]
    Disconnected,
    /// Protocol violation.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Receives one message (header with its fds, then the payload).
pub fn recv_message(sock: &UnixStream) -> Result<Message, WireError> {
    let mut hdr = [0u8; HDR_LEN];
    // Room for MAX_FDS fds.
    let mut cmsg = [0u64; 40];
    let mut iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HDR_LEN };
    // SAFETY: msghdr is plain data; every pointer set below refers to a live local buffer.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov`/`hdr` and `cmsg`, all alive for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut fds = Vec::new();
    // SAFETY: CMSG_* walk the control buffer the kernel filled in (msg_controllen bytes of `cmsg`).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for k in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(k));
                    // SAFETY: the kernel just installed this fd for us; we own it now.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ProtocolError::UnexpectedFds(MAX_FDS + 1, 0).into());
    }
    if n == 0 {
        return Err(WireError::Disconnected);
    }
    let mut r = sock;
    if n < HDR_LEN {
        r.read_exact(&mut hdr[n..]).map_err(|_| ProtocolError::Truncated)?;
    }
    let hdr = Header::parse(&hdr);
    if hdr.size as usize > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(hdr.size).into());
    }
    let mut body = vec![0u8; hdr.size as usize];
    r.read_exact(&mut body).map_err(|_| ProtocolError::Truncated)?;
    Ok(Message { hdr, body, fds })
}

/// Sends one message with optional fds.
pub fn send_message(sock: &UnixStream, hdr: &Header, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let hb = hdr.bytes();
    let mut bufs = [IoSlice::new(&hb), IoSlice::new(body)];
    let mut cmsg = [0u64; 40];
    // SAFETY: msghdr is plain data; every pointer set below refers to a live local buffer.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_mut_ptr().cast();
    msg.msg_iovlen = 2;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        if space > std::mem::size_of_val(&cmsg) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many fds"));
        }
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes; CMSG_FIRSTHDR points at its start.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
        }
    }
    let total = HDR_LEN + body.len();
    // SAFETY: `msg` refers to live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    if n < total {
        // The fds went with the first bytes; send the rest plainly.
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&hb);
        all.extend_from_slice(body);
        let mut w = sock;
        w.write_all(&all[n..])?;
    }
    Ok(())
}

fn fd_size(fd: &OwnedFd) -> Option<u64> {
    // SAFETY: fstat on an fd we own into a zeroed stat struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    if rc != 0 {
        // Not statable: treat as size 0 so any region on it is refused.
        return Some(0);
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        Some(st.st_size as u64)
    } else {
        None
    }
}

/// How long a write to the frontend may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Relays one frontend connection to vhost-user-backend through the front door. Returns when either
/// side closes; both sockets are shut down then.
pub fn run_proxy(
    name: &str,
    frontend: UnixStream,
    backend: UnixStream,
    mut door: FrontDoor,
    local: Arc<dyn LocalHandler>,
) {
    let _ = frontend.set_write_timeout(Some(WRITE_TIMEOUT));
    let (f_w, b_r) = match (frontend.try_clone(), backend.try_clone()) {
        (Ok(f), Ok(b)) => (Arc::new(Mutex::new(f)), b),
        (Err(e), _) | (_, Err(e)) => {
            warn!("{name}: cannot clone sockets: {e}");
            return;
        }
    };
    let added = door.local_protocol();
    let f_w2 = f_w.clone();
    let relay_name = name.to_string();
    let relay = std::thread::Builder::new().name(format!("{name}-replies")).spawn(move || {
        loop {
            let m = match recv_message(&b_r) {
                Ok(m) => m,
                Err(WireError::Disconnected) => break,
                Err(e) => {
                    debug!("{relay_name}: backend reply stream: {e}");
                    break;
                }
            };
            let mut body = m.body;
            if m.hdr.request == req::GET_PROTOCOL_FEATURES && body.len() == 8 {
                body = (u64_at(&body, 0) | added).to_le_bytes().to_vec();
            }
            let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
            let w = f_w2.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = send_message(&w, &m.hdr, &body, &raw) {
                debug!("{relay_name}: cannot relay a reply: {e}");
                break;
            }
        }
        // The backend ended the connection: end the frontend's too.
        let w = f_w2.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    });
    let mut log = RateLimit::default();
    let reply = |hdr: &Header, body: &[u8], fds: &[RawFd]| -> std::io::Result<()> {
        let w = f_w.lock().unwrap_or_else(|p| p.into_inner());
        let h = Header { request: hdr.request, flags: 1 | FLAG_REPLY, size: body.len() as u32 };
        send_message(&w, &h, body, fds)
    };
    loop {
        let m = match recv_message(&frontend) {
            Ok(m) => m,
            Err(WireError::Disconnected) => break,
            Err(e) => {
                warn!("{name}: closing the connection: {e}");
                break;
            }
        };
        let sizes: Vec<Option<u64>> = m.fds.iter().map(fd_size).collect();
        match door.check(&m.hdr, &m.body, &sizes) {
            Verdict::Forward(rewritten) => {
                let body = rewritten.as_deref().unwrap_or(&m.body);
                let hdr = Header { size: body.len() as u32, ..m.hdr };
                let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
                if let Err(e) = send_message(&backend, &hdr, body, &raw) {
                    warn!("{name}: backend gone: {e}");
                    break;
                }
                if m.hdr.request == req::SET_VRING_KICK {
                    // Kick once: after a reconnection the guest may be waiting for requests that
                    // are resubmitted from the in-flight table and would never kick by itself
                    // (libvhost-user does the same). A spurious kick is harmless.
                    if let Some(fd) = m.fds.first() {
                        let one = 1u64.to_ne_bytes();
                        // SAFETY: an 8-byte write from a local buffer to the kick eventfd we hold.
                        let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
                    }
                }
            }
            Verdict::Refuse(why) => {
                if log.allow(name) {
                    warn!("{name}: refusing request {}: {why}", m.hdr.request);
                }
                if door.reply_ack() && m.hdr.need_reply() {
                    if let Err(e) = reply(&m.hdr, &1u64.to_le_bytes(), &[]) {
                        warn!("{name}: cannot answer: {e}");
                        break;
                    }
                }
            }
            Verdict::Local => {
                if m.hdr.request == req::GET_INFLIGHT_FD {
                    // The reply must carry an fd: a failure cannot be answered and closes.
                    let res = local.get_inflight_fd(&m.body).and_then(|(body, fd)| {
                        reply(&m.hdr, &body, &[fd.as_raw_fd()]).map_err(|e| Refusal::Local(e.to_string()))
                    });
                    if let Err(e) = res {
                        warn!("{name}: GET_INFLIGHT_FD failed: {e}; closing the connection");
                        break;
                    }
                } else {
                    let mut fds = m.fds;
                    let res = match fds.pop() {
                        Some(fd) => local.set_inflight_fd(&m.body, fd),
                        None => Err(Refusal::BadPayload { got: 0, want: 1 }),
                    };
                    if let Err(e) = &res {
                        if log.allow(name) {
                            warn!("{name}: refusing SET_INFLIGHT_FD: {e}");
                        }
                    }
                    if door.reply_ack() && m.hdr.need_reply() {
                        let v: u64 = if res.is_ok() { 0 } else { 1 };
                        if let Err(e) = reply(&m.hdr, &v.to_le_bytes(), &[]) {
                            warn!("{name}: cannot answer: {e}");
                            break;
                        }
                    }
                }
            }
            Verdict::Close(e) => {
                warn!("{name}: closing the connection: {e}");
                break;
            }
        }
        log.flush(name);
    }
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    if let Ok(h) = relay {
        let _ = h.join();
    }
    info!("{name}: front door closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES: u64 = (1 << 32) | F_PROTOCOL_FEATURES | 0xff;
    const PROTOCOL: u64 = pf::MQ | pf::REPLY_ACK | pf::CONFIG | pf::CONFIGURE_MEM_SLOTS;

    fn door() -> FrontDoor {
        let mut d = FrontDoor::new(2, 64, FEATURES, PROTOCOL, pf::INFLIGHT_SHMFD);
        let v =
            d.check(&hdr(req::SET_PROTOCOL_FEATURES, 8), &(PROTOCOL | pf::INFLIGHT_SHMFD).to_le_bytes(), &[]);
        // The locally answered bit is stripped before vhost-user-backend sees it.
        assert_eq!(v, Verdict::Forward(Some(PROTOCOL.to_le_bytes().to_vec())));
        d
    }

    fn hdr(request: u32, size: usize) -> Header {
        Header { request, flags: 1 | FLAG_NEED_REPLY, size: size as u32 }
    }

    fn check(d: &mut FrontDoor, request: u32, body: &[u8], fds: &[Option<u64>]) -> Verdict {
        d.check(&hdr(request, body.len()), body, fds)
    }

    fn region(gpa: u64, size: u64, off: u64) -> Vec<u8> {
        [gpa.to_le_bytes(), size.to_le_bytes(), 0x7f00_0000_0000u64.to_le_bytes(), off.to_le_bytes()].concat()
    }

    fn table(regions: &[Vec<u8>]) -> Vec<u8> {
        let mut b = (regions.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for r in regions {
            b.extend_from_slice(r);
        }
        b
    }

    fn state(i: u32, n: u32) -> Vec<u8> {
        [i.to_le_bytes(), n.to_le_bytes()].concat()
    }

    fn refused(v: Verdict) -> bool {
        matches!(v, Verdict::Refuse(_))
    }

    #[test]
    fn broken_stream_closes() {
        let mut d = door();
        let bad_version = Header { request: req::GET_FEATURES, flags: 2, size: 0 };
        assert!(matches!(d.check(&bad_version, &[], &[]), Verdict::Close(_)));
        let reply_flag = Header { request: req::GET_FEATURES, flags: 1 | FLAG_REPLY, size: 0 };
        assert!(matches!(d.check(&reply_flag, &[], &[]), Verdict::Close(_)));
        let big = Header { request: req::SET_CONFIG, flags: 1, size: 5000 };
        assert!(matches!(d.check(&big, &[], &[]), Verdict::Close(ProtocolError::TooLarge(5000))));
        assert!(
            matches!(check(&mut d, req::GET_FEATURES, &[], &[Some(4096)]), Verdict::Close(_)),
            "fd on GET_FEATURES"
        );
        assert!(
            matches!(check(&mut d, req::GET_VRING_BASE, &state(9, 0), &[]), Verdict::Close(_)),
            "unanswerable"
        );
    }

    #[test]
    fn memory_tables() {
        let mut d = door();
        let m = 1u64 << 20;
        assert_eq!(
            check(&mut d, req::SET_MEM_TABLE, &table(&[region(0, m, 0)]), &[Some(m)]),
            Verdict::Forward(None)
        );
        for (what, t, fds) in [
            ("past the fd", table(&[region(0, m, 4096)]), vec![Some(m)]),
            ("zero-sized", table(&[region(0, 0, 0)]), vec![Some(m)]),
            ("overlap", table(&[region(0, m, 0), region(m - 1, m, 0)]), vec![Some(2 * m), Some(2 * m)]),
            ("offset overflow", table(&[region(0, m, u64::MAX - 5)]), vec![None]),
            ("guest overflow", table(&[region(u64::MAX - 5, m, 0)]), vec![None]),
            ("fd count", table(&[region(0, m, 0), region(m, m, 0)]), vec![Some(m)]),
            ("no regions", table(&[]), vec![]),
            ("too many", table(&vec![region(0, 4096, 0); 33]), vec![None; 32]),
        ] {
            assert!(refused(check(&mut d, req::SET_MEM_TABLE, &t, &fds)), "{what}");
        }
        // ADD_MEM_REG may not overlap what is there; REM_MEM_REG must name a region.
        let add = |gpa: u64| [vec![0u8; 8], region(gpa, m, 0)].concat();
        assert!(refused(check(&mut d, req::ADD_MEM_REG, &add(m / 2), &[Some(m)])));
        assert_eq!(check(&mut d, req::ADD_MEM_REG, &add(m), &[Some(m)]), Verdict::Forward(None));
        assert!(refused(check(&mut d, req::REM_MEM_REG, &add(3 * m), &[])));
        assert_eq!(check(&mut d, req::REM_MEM_REG, &add(m), &[]), Verdict::Forward(None));
    }

    #[test]
    fn vring_sizes_and_kicks() {
        let mut d = door();
        for n in [0u32, 3, 33, 128] {
            assert!(refused(check(&mut d, req::SET_VRING_NUM, &state(0, n), &[])), "size {n}");
        }
        assert!(refused(check(&mut d, req::SET_VRING_NUM, &state(2, 32), &[])), "index 2 of 2 queues");
        // After a refused size the ring cannot be started ...
        assert!(refused(check(&mut d, req::SET_VRING_KICK, &0u64.to_le_bytes(), &[None])));
        // ... until a good size is set.
        assert_eq!(check(&mut d, req::SET_VRING_NUM, &state(0, 32), &[]), Verdict::Forward(None));
        assert_eq!(check(&mut d, req::SET_VRING_KICK, &0u64.to_le_bytes(), &[None]), Verdict::Forward(None));
        // Stopped (GET_VRING_BASE), refused a size, it cannot start again until a good one.
        assert_eq!(check(&mut d, req::GET_VRING_BASE, &state(0, 0), &[]), Verdict::Forward(None));
        assert!(refused(check(&mut d, req::SET_VRING_NUM, &state(0, 33), &[])));
        assert!(refused(check(&mut d, req::SET_VRING_KICK, &0u64.to_le_bytes(), &[None])));
        // NOFD without an fd is fine; an fd with NOFD is not.
        assert_eq!(check(&mut d, req::SET_VRING_CALL, &0x100u64.to_le_bytes(), &[]), Verdict::Forward(None));
        assert!(refused(check(&mut d, req::SET_VRING_CALL, &0x100u64.to_le_bytes(), &[None])));
        assert!(refused(check(&mut d, req::SET_VRING_ENABLE, &state(0, 2), &[])));
    }

    #[test]
    fn features_and_config() {
        let mut d = door();
        assert!(refused(check(&mut d, req::SET_FEATURES, &(FEATURES | 1 << 40).to_le_bytes(), &[])));
        assert!(
            refused(check(&mut d, req::SET_PROTOCOL_FEATURES, &(1u64 << 1).to_le_bytes(), &[])),
            "LOG_SHMFD"
        );
        let wce = |off: u32, v: u8| {
            [off.to_le_bytes(), 1u32.to_le_bytes(), 0u32.to_le_bytes()]
                .concat()
                .into_iter()
                .chain([v])
                .collect::<Vec<u8>>()
        };
        assert_eq!(check(&mut d, req::SET_CONFIG, &wce(32, 1), &[]), Verdict::Forward(None));
        assert!(refused(check(&mut d, req::SET_CONFIG, &wce(32, 2), &[])));
        assert!(refused(check(&mut d, req::SET_CONFIG, &wce(0, 1), &[])));
        assert!(refused(check(&mut d, 99, &[], &[])), "unknown request");
        let inflight =
            [0u64.to_le_bytes().to_vec(), 0u64.to_le_bytes().to_vec(), vec![2, 0, 32, 0, 0, 0, 0, 0]]
                .concat();
        assert_eq!(check(&mut d, req::GET_INFLIGHT_FD, &inflight, &[]), Verdict::Local);
        assert!(d.reply_ack());
    }
}
