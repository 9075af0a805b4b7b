//! Bdev registry, descriptors and claims (SPEC §2 "Registry", "Descriptors").
//!
//! # Design
//! The registry maps names and aliases to entries. Users open a [`Descriptor`] (read-only or
//! read-write); a module that builds on a bdev (FTL, cache) *claims* it through its descriptor,
//! after which other read-write opens fail with [`BdevError::Claimed`]. Each descriptor hands out
//! per-thread generic [`Channel`]s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::channel::Channel;
use super::{Bdev, BdevError, BdevInfo};

/// One registered bdev and its shared state.
pub(crate) struct Entry {
    pub(crate) bdev: Arc<dyn Bdev>,
    claim: Mutex<Option<String>>,
}

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
        let entry = Arc::new(Entry { bdev, claim: Mutex::new(None) });
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
        Ok(Descriptor { entry, writable, claimed: false })
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
        Ok(entry.bdev.clone())
    }
}

/// An open handle on a bdev.
pub struct Descriptor {
    entry: Arc<Entry>,
    writable: bool,
    claimed: bool,
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

    /// A new generic I/O channel for the calling thread.
    pub fn channel(&self) -> Result<Channel, BdevError> {
        let module = self.entry.bdev.create_channel()?;
        Ok(Channel::new(self.entry.bdev.clone(), module, self.writable))
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        if self.claimed {
            *lock(&self.entry.claim) = None;
        }
    }
}
