//! An in-process [`Store`] for unit tests and micro-benchmarks. Not a
//! product feature: nothing held here survives the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{PutCondition, PutResult, Store, StoreError, StoredItem, View};

#[derive(Default)]
pub struct MemoryStore {
    items: Mutex<HashMap<Vec<u8>, StoredItem>>,
    /// While set, every call fails as DynamoDB does in an outage.
    failing: AtomicBool,
    calls: AtomicU64,
    flush_marker: AtomicU64,
    /// While set, another writer changes an item just before every
    /// version-conditioned put of it, so those puts always lose the race.
    interfering: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes every later call fail (true) or succeed again (false).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes every version-conditioned put lose to a simulated other writer.
    pub fn set_interfering(&self, interfering: bool) {
        self.interfering.store(interfering, Ordering::SeqCst);
    }

    /// Calls made so far, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// What the store holds for `key`, expired or not.
    pub fn raw(&self, key: &[u8]) -> Option<StoredItem> {
        self.items.lock().unwrap().get(key).cloned()
    }

    /// Puts an item directly, as another writer would.
    pub fn insert_raw(&self, key: &[u8], item: StoredItem) {
        self.items.lock().unwrap().insert(key.to_vec(), item);
    }

    fn enter(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Vec<u8>, StoredItem>>, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store set to fail".into()));
        }
        Ok(self.items.lock().unwrap())
    }
}

impl Store for MemoryStore {
    fn check_key(&self, _key: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn item_overhead(&self) -> usize {
        0
    }

    async fn get(&self, key: &[u8], view: View) -> Result<Option<StoredItem>, StoreError> {
        let items = self.enter()?;
        Ok(items.get(key).filter(|i| i.is_live(view)).cloned())
    }

    async fn put(
        &self,
        key: &[u8],
        item: &StoredItem,
        condition: PutCondition,
        view: View,
    ) -> Result<PutResult, StoreError> {
        let mut items = self.enter()?;
        if let PutCondition::Version(_) = condition
            && self.interfering.load(Ordering::SeqCst)
            && let Some(item) = items.get_mut(key)
        {
            item.version += 1;
        }
        let current = items.get(key).filter(|i| i.is_live(view)).cloned();
        let holds = match condition {
            PutCondition::Always => true,
            PutCondition::Absent => current.is_none(),
            PutCondition::Live => current.is_some(),
            PutCondition::Version(v) => current.as_ref().is_some_and(|c| c.version == v),
        };
        if !holds {
            return Ok(PutResult::Failed { current });
        }
        items.insert(key.to_vec(), item.clone());
        Ok(PutResult::Stored)
    }

    async fn delete(&self, key: &[u8], view: View) -> Result<bool, StoreError> {
        let mut items = self.enter()?;
        Ok(items.remove(key).is_some_and(|i| i.is_live(view)))
    }

    async fn touch(
        &self,
        key: &[u8],
        expires_at: u32,
        view: View,
    ) -> Result<Option<StoredItem>, StoreError> {
        let mut items = self.enter()?;
        match items.get_mut(key) {
            Some(item) if item.is_live(view) => {
                item.expires_at = expires_at;
                Ok(Some(item.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn flush_marker(&self) -> Result<u64, StoreError> {
        drop(self.enter()?);
        Ok(self.flush_marker.load(Ordering::SeqCst))
    }

    async fn set_flush_marker(&self, flushed_before: u64) -> Result<(), StoreError> {
        drop(self.enter()?);
        self.flush_marker.store(flushed_before, Ordering::SeqCst);
        Ok(())
    }
}
