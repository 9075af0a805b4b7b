//! OCSSD 2.0 media: spec types, PPA packing, vector command encoding, the transport-neutral
//! driver interface, and the file-backed emulator (SPEC §3).
//!
//! ```text
//!   ftl ──► driver::{MediaDevice, QueuePair} ──┬─► emu::EmuDevice   (file image, default)
//!                                              └─► nvme (later: OCSSD 2.0 / ZNS over VFIO)
//!   spec  ── on-wire layouts and status codes      ppa    ── address packing
//!   vector ── LBA lists, SQE, completion bitmap     cli    ── `vblkd media create|info`
//! ```
//!
//! # Design
//! Wire formats (`spec`, `vector`) are pure and shared by every transport; `driver` is the
//! only thing the FTL sees. See each module's doc.

pub mod cli;
pub mod driver;
pub mod emu;
pub mod ppa;
pub mod spec;
pub mod table;
pub mod vector;

pub use driver::{
    Buffers, Capabilities, Command, Completion, IoBuf, MediaDevice, MediaError, MediaInfo, MediaKind, Op,
    PpaList, QueuePair, RejectReason, Rejected, SgList,
};
pub use emu::{EmuConfig, EmuDevice, EmuGeometry, Fault, ReadErrorKind};
pub use ppa::{Ppa, PpaFormat};
pub use spec::{ChunkInfo, ChunkNotification, ChunkState, Geometry, Status};
pub use vector::LbaBitmap;
