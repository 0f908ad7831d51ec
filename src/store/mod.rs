//! The durable store behind the cache: the one seam the engine is generic
//! over. [`DynamoStore`] is the product; [`MemoryStore`] serves unit tests and
//! micro-benchmarks only.
//!
//! A store reports what the table holds: an item whose expiry has passed is
//! absent, whether or not DynamoDB's TTL sweeper has deleted it yet.

mod dynamo;
mod memory;
mod metering;
mod outage;

use std::future::Future;

pub use dynamo::{DynamoSettings, DynamoStore, KeyType, TableBilling, TableSettings};
pub use memory::MemoryStore;

/// An item as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredItem {
    pub value: Vec<u8>,
    pub flags: u32,
    /// Unix seconds after which the item is gone; 0 = never.
    pub expires_at: u32,
    /// Changes on every write; the item's cas unique.
    pub version: u64,
}

impl StoredItem {
    pub fn is_expired(&self, now: u32) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }
}

/// When a put may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutCondition {
    /// Always (`set`).
    Always,
    /// Only if no live item has the key at `now` (`add`): decided by the
    /// store atomically, so two writers racing to create a key cannot both win.
    Absent { now: u32 },
}

/// Why a store call failed. Every variant reaches the client as an explicit
/// error reply, never as a miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key cannot be held by the table's key attribute.
    #[error("{0}")]
    InvalidKey(&'static str),
    #[error("dynamodb timed out")]
    Timeout,
    #[error("dynamodb throttled the request")]
    Throttled,
    #[error("dynamodb unreachable: {0}")]
    Unavailable(String),
    #[error("dynamodb error: {0}")]
    Service(String),
    /// The table holds an item this program cannot read (wrong attribute types).
    #[error("bad item in table: {0}")]
    BadItem(String),
}

/// What the engine needs from durable storage.
pub trait Store: Send + Sync + 'static {
    /// Whether the table's key attribute can hold `key`.
    fn check_key(&self, key: &[u8]) -> Result<(), StoreError>;

    /// Bytes an item costs in the store besides its key and value (attribute
    /// names and numbers), to keep items under the store's size limit.
    fn item_overhead(&self) -> usize;

    /// The live item for `key` at `now`, read strongly consistently where the
    /// store offers a choice and the settings ask for it.
    fn get(
        &self,
        key: &[u8],
        now: u32,
    ) -> impl Future<Output = Result<Option<StoredItem>, StoreError>> + Send;

    /// Writes `item`; returns false when `condition` did not hold.
    fn put(
        &self,
        key: &[u8],
        item: &StoredItem,
        condition: PutCondition,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes `key`; returns whether a live item was there at `now`.
    fn delete(&self, key: &[u8], now: u32)
    -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Sets the expiry of the live item at `key`; returns the item as it now
    /// is (expired, if `expires_at` is already past), or None if there was no
    /// live item at `now`.
    fn touch(
        &self,
        key: &[u8],
        expires_at: u32,
        now: u32,
    ) -> impl Future<Output = Result<Option<StoredItem>, StoreError>> + Send;
}
