//! An in-process [`Store`] for unit tests and micro-benchmarks. Not a
//! product feature: nothing held here survives the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{PutCondition, Store, StoreError, StoredItem};

#[derive(Default)]
pub struct MemoryStore {
    items: Mutex<HashMap<Vec<u8>, StoredItem>>,
    /// While set, every call fails as DynamoDB does in an outage.
    failing: AtomicBool,
    calls: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes every later call fail (true) or succeed again (false).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
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

    async fn get(&self, key: &[u8], now: u32) -> Result<Option<StoredItem>, StoreError> {
        let items = self.enter()?;
        Ok(items.get(key).filter(|i| !i.is_expired(now)).cloned())
    }

    async fn put(
        &self,
        key: &[u8],
        item: &StoredItem,
        condition: PutCondition,
    ) -> Result<bool, StoreError> {
        let mut items = self.enter()?;
        if let PutCondition::Absent { now } = condition
            && items.get(key).is_some_and(|i| !i.is_expired(now))
        {
            return Ok(false);
        }
        items.insert(key.to_vec(), item.clone());
        Ok(true)
    }

    async fn delete(&self, key: &[u8], now: u32) -> Result<bool, StoreError> {
        let mut items = self.enter()?;
        Ok(items.remove(key).is_some_and(|i| !i.is_expired(now)))
    }

    async fn touch(
        &self,
        key: &[u8],
        expires_at: u32,
        now: u32,
    ) -> Result<Option<StoredItem>, StoreError> {
        let mut items = self.enter()?;
        match items.get_mut(key) {
            Some(item) if !item.is_expired(now) => {
                item.expires_at = expires_at;
                Ok(Some(item.clone()))
            }
            _ => Ok(None),
        }
    }
}
