//! vblkd — a vhost-user-blk backend daemon with a userspace block-device stack.
//!
//! Layers (each imports only the ones below it):
//! `vhost` → `bdev` ← (`ftl`, `cache`) → `ocssd` → `nvme`.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bdev;
pub mod cache;
pub mod cli;
pub mod client;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod ftl;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod ocssd;
pub mod tagmap;
#[cfg(test)]
mod testlog;
pub mod vhost;
