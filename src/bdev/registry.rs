//! Bdev registry, descriptors and claims (SPEC §2 "Registry", "Descriptors").
//!
//! # Design
//! The registry maps names and aliases to entries. Users open a [`Descriptor`] (read-only or
//! read-write); a module that builds on a bdev (FTL, cache) *claims* it through its descriptor,
//! after which other read-write opens fail with [`BdevError::Claimed`]. Each descriptor hands out
//! per-thread generic [`Channel`]s.
//!
//! ```text
//!  Registry ─name/alias─► Entry { bdev, claim, stats, remove callbacks } ◄─ Descriptor ─► Channel
//! ```
//!
//! Hot-remove: a descriptor opened with [`Registry::open_with_remove`] gets its callback called (once,
//! with the bdev name) when the bdev is unregistered; the bdev object lives on until every descriptor
//! and channel holding it is dropped.
//!
//! # Limitations
//! Callbacks run on the thread calling `unregister`, not on the descriptor's thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::channel::{BdevControl, Channel};
use super::stats::{BdevStats, BdevStatsSnapshot};
use super::{Bdev, BdevError, BdevInfo};

/// Called with the bdev name when an open bdev is being removed.
pub type RemoveCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// Called with the registry and the bdev name when an open bdev is being removed (a stacked bdev
/// uses the registry to remove itself in turn: cascading hot-remove).
pub type RemoveCallbackIn = Arc<dyn Fn(&Registry, &str) + Send + Sync>;

/// One registered bdev and its shared state.
pub(crate) struct Entry {
    pub(crate) bdev: Arc<dyn Bdev>,
    claim: Mutex<Option<String>>,
    pub(crate) stats: Arc<BdevStats>,
    /// QoS and reset state shared by the bdev's channels.
    pub(crate) control: Arc<BdevControl>,
    /// Descriptor id → hot-remove callback.
    on_remove: Mutex<Vec<(u64, RemoveCallbackIn)>>,
}

static NEXT_DESC_ID: AtomicU64 = AtomicU64::new(1);

/// The set of bdevs of one process.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Registration order (teardown is the reverse).
    order: Vec<String>,
    /// Name or alias → entry.
    by_name: HashMap<String, Arc<Entry>>,
    /// Canonical name → aliases.
    aliases: HashMap<String, Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a bdev under its `info().name`; `EEXIST` if the name is taken.
    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<(), BdevError> {
        let name = bdev.info().name.clone();
        let mut inner = lock(&self.inner);
        if inner.by_name.contains_key(&name) {
            return Err(BdevError::Exists(name));
        }
        let entry = Arc::new(Entry {
            bdev,
            claim: Mutex::new(None),
            stats: Arc::new(BdevStats::default()),
            control: Arc::new(BdevControl::default()),
            on_remove: Mutex::new(Vec::new()),
        });
        inner.by_name.insert(name.clone(), entry);
        inner.order.push(name);
        Ok(())
    }

    /// Adds an alias for an existing bdev; `EEXIST` if the alias is taken.
    pub fn add_alias(&self, name: &str, alias: &str) -> Result<(), BdevError> {
        let mut inner = lock(&self.inner);
        if inner.by_name.contains_key(alias) {
            return Err(BdevError::Exists(alias.to_string()));
        }
        let entry = inner.by_name.get(name).cloned().ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        let canonical = entry.bdev.info().name.clone();
        inner.by_name.insert(alias.to_string(), entry);
        inner.aliases.entry(canonical).or_default().push(alias.to_string());
        Ok(())
    }

    /// Looks up a bdev by name or alias.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Bdev>> {
        lock(&self.inner).by_name.get(name).map(|e| e.bdev.clone())
    }

    /// Names in registration order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner).order.clone()
    }

    /// Opens a descriptor. A read-write open of a claimed bdev fails (`EPERM`).
    pub fn open(&self, name: &str, writable: bool) -> Result<Descriptor, BdevError> {
        self.open_inner(name, writable, None)
    }

    /// Like [`Registry::open`], with a hot-remove callback fired (once) by [`Registry::unregister`].
    pub fn open_with_remove(
        &self,
        name: &str,
        writable: bool,
        on_remove: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<Descriptor, BdevError> {
        self.open_inner(name, writable, Some(Arc::new(move |_: &Registry, n: &str| on_remove(n))))
    }

    /// Like [`Registry::open_with_remove`], the callback also getting this registry: a stacked bdev
    /// whose base goes away can unregister itself (its own users then see a hot-remove in turn). The
    /// callback runs without the registry's lock held.
    pub fn open_with_remove_in(
        &self,
        name: &str,
        writable: bool,
        on_remove: impl Fn(&Registry, &str) + Send + Sync + 'static,
    ) -> Result<Descriptor, BdevError> {
        self.open_inner(name, writable, Some(Arc::new(on_remove)))
    }

    fn open_inner(
        &self,
        name: &str,
        writable: bool,
        cb: Option<RemoveCallbackIn>,
    ) -> Result<Descriptor, BdevError> {
        let entry = lock(&self.inner)
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        if writable {
            if let Some(by) = lock(&entry.claim).as_ref() {
                return Err(BdevError::Claimed { name: name.to_string(), by: by.clone() });
            }
        }
        let id = NEXT_DESC_ID.fetch_add(1, Ordering::Relaxed);
        if let Some(cb) = cb {
            lock(&entry.on_remove).push((id, cb));
        }
        Ok(Descriptor { entry, writable, claimed: false, id })
    }

    /// Statistics of every registered bdev as a JSON object keyed by name.
    pub fn stats_json(&self) -> serde_json::Value {
        let inner = lock(&self.inner);
        let mut map = serde_json::Map::new();
        for name in &inner.order {
            if let Some(e) = inner.by_name.get(name) {
                let mut v = serde_json::to_value(e.stats.snapshot()).unwrap_or_default();
                // Module statistics (e.g. the cache's hit counters) sit beside the generic ones.
                if let (Some(obj), Some(serde_json::Value::Object(m))) =
                    (v.as_object_mut(), e.bdev.module_stats())
                {
                    obj.extend(m);
                }
                map.insert(name.clone(), v);
            }
        }
        serde_json::Value::Object(map)
    }

    /// The module holding a claim on `name`, if any.
    pub fn claimed_by(&self, name: &str) -> Result<Option<String>, BdevError> {
        let entry = self.entry(name)?;
        let claim = lock(&entry.claim).clone();
        Ok(claim)
    }

    /// The shared statistics of `name` (histogram and queue depth included).
    pub fn bdev_stats(&self, name: &str) -> Result<Arc<BdevStats>, BdevError> {
        Ok(self.entry(name)?.stats.clone())
    }

    /// The QoS and reset controls of `name`.
    pub fn control(&self, name: &str) -> Result<Arc<BdevControl>, BdevError> {
        Ok(self.entry(name)?.control.clone())
    }

    /// Sets the QoS limits of `name` (validated: [`super::qos::QosLimits::validate`]); takes effect at
    /// once on every channel.
    pub fn set_qos(&self, name: &str, limits: super::qos::QosLimits) -> Result<(), BdevError> {
        limits.validate().map_err(BdevError::InvalidConfig)?;
        self.entry(name)?.control.qos.set(limits);
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<Arc<Entry>, BdevError> {
        lock(&self.inner).by_name.get(name).cloned().ok_or_else(|| BdevError::NotFound(name.to_string()))
    }

    /// Removes a bdev by name and returns it (the caller shuts it down once its users are gone).
    pub fn unregister(&self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let mut inner = lock(&self.inner);
        let entry = inner.by_name.get(name).cloned().ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        let canonical = entry.bdev.info().name.clone();
        inner.by_name.remove(&canonical);
        for alias in inner.aliases.remove(&canonical).unwrap_or_default() {
            inner.by_name.remove(&alias);
        }
        inner.order.retain(|n| n != &canonical);
        drop(inner);
        let callbacks = std::mem::take(&mut *lock(&entry.on_remove));
        for (_, cb) in callbacks {
            cb(self, &canonical);
        }
        Ok(entry.bdev.clone())
    }
}

/// An open handle on a bdev.
pub struct Descriptor {
    entry: Arc<Entry>,
    writable: bool,
    claimed: bool,
    id: u64,
}

impl Descriptor {
    /// The bdev's static facts.
    pub fn info(&self) -> &BdevInfo {
        self.entry.bdev.info()
    }

    /// The module object (for stats and teardown).
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.entry.bdev
    }

    /// True when opened read-write.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Claims the bdev for `module`; fails if another module holds a claim.
    pub fn claim(&mut self, module: &str) -> Result<(), BdevError> {
        let mut claim = lock(&self.entry.claim);
        if let Some(by) = claim.as_ref() {
            return Err(BdevError::Claimed { name: self.info().name.clone(), by: by.clone() });
        }
        *claim = Some(module.to_string());
        self.claimed = true;
        Ok(())
    }

    /// A new fast lane for the calling thread (see [`super::channel::Lane`]): for stacked modules only.
    pub fn lane(&self) -> Result<super::channel::Lane, BdevError> {
        let module = self.entry.bdev.create_channel()?;
        Ok(super::channel::Lane::new(
            self.entry.bdev.clone(),
            module,
            self.writable,
            self.entry.stats.clone(),
            self.entry.control.clone(),
        ))
    }

    /// A new generic I/O channel for the calling thread.
    pub fn channel(&self) -> Result<Channel, BdevError> {
        let module = self.entry.bdev.create_channel()?;
        Ok(Channel::new(
            self.entry.bdev.clone(),
            module,
            self.writable,
            self.entry.stats.clone(),
            self.entry.control.clone(),
        ))
    }

    /// The bdev-wide statistics (all channels, including closed ones).
    pub fn stats(&self) -> BdevStatsSnapshot {
        self.entry.stats.snapshot()
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        lock(&self.entry.on_remove).retain(|(id, _)| *id != self.id);
        if self.claimed {
            *lock(&self.entry.claim) = None;
        }
    }
}
