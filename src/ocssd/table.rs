//! The process's table of opened media devices, by name (`--bdev driver=ocssd-emu,name=...`).
//!
//! # Design
//! A media device is not a block bdev (it has chunks, write pointers and OOB, not LBAs), so it is not
//! in the bdev registry: `main` opens each `ocssd-emu` spec into this table, and a stacked module
//! (the FTL's `base=`) looks it up by name. One process-wide table (`MediaTable::global`), because
//! the daemon has exactly one set of devices and `build_bdev(spec, registry)` keeps its signature.
//! Library users and tests pass `Arc<dyn MediaDevice>` directly and never touch it.
//!
//! # Limitations
//! Devices are never removed while the process runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use super::driver::{MediaDevice, MediaError};
use super::emu::{EmuConfig, EmuDevice};

/// Named media devices.
#[derive(Default)]
pub struct MediaTable {
    devices: Mutex<HashMap<String, Arc<dyn MediaDevice>>>,
}

static GLOBAL: OnceLock<MediaTable> = OnceLock::new();

impl MediaTable {
    /// The process-wide table.
    pub fn global() -> &'static MediaTable {
        GLOBAL.get_or_init(MediaTable::default)
    }

    /// Adds a device; false if the name is taken.
    pub fn insert(&self, name: &str, dev: Arc<dyn MediaDevice>) -> bool {
        let mut d = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if d.contains_key(name) {
            return false;
        }
        d.insert(name.to_string(), dev);
        true
    }

    /// Looks a device up.
    pub fn get(&self, name: &str) -> Option<Arc<dyn MediaDevice>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
}

/// Opens an emulated image, creating it first when `create` is set and it does not exist (an
/// existing image is never reformatted).
pub fn open_or_create(path: &Path, create: bool, cfg: &EmuConfig) -> Result<(EmuDevice, bool), MediaError> {
    if create && !path.exists() {
        return EmuDevice::create(path, cfg).map(|d| (d, true));
    }
    EmuDevice::open(path).map(|d| (d, false))
}
