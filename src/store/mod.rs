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
    /// Changes on every write; the item's cas unique. Versions are made from
    /// the writer's clock, so a version also dates its write (see
    /// [`View::flushed_before`]).
    pub version: u64,
}

/// What "live" means for one request: not expired at `now`, and not written
/// before the last `flush_all` that has taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct View {
    /// Unix seconds.
    pub now: u32,
    /// Items whose version is below this were flushed; 0 = no flush.
    pub flushed_before: u64,
}

impl View {
    pub fn at(now: u32) -> View {
        View {
            now,
            flushed_before: 0,
        }
    }
}

impl StoredItem {
    pub fn is_expired(&self, now: u32) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }

    /// Whether clients may see this item under `view`.
    pub fn is_live(&self, view: View) -> bool {
        !self.is_expired(view.now) && self.version >= view.flushed_before
    }
}

/// When a put may happen. Every condition is decided by the store
/// atomically with the write, so racing writers from many hosts agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutCondition {
    /// Always (`set`).
    Always,
    /// Only if no live item has the key (`add`).
    Absent,
    /// Only if a live item has the key (`replace`).
    Live,
    /// Only if the live item's version is this one (`cas`, and the
    /// read-modify-write of `append`, `prepend`, `incr`, `decr`).
    Version(u64),
}

/// The result of a conditional put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutResult {
    Stored,
    /// The condition did not hold; `current` is the live item the key holds
    /// now, read in the same round trip.
    Failed {
        current: Option<StoredItem>,
    },
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
    /// A read-modify-write lost the race for a key too many times in a row.
    #[error("too much contention on this key, try again")]
    Contention,
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

    /// The live item for `key`, read strongly consistently where the store
    /// offers a choice and the settings ask for it.
    fn get(
        &self,
        key: &[u8],
        view: View,
    ) -> impl Future<Output = Result<Option<StoredItem>, StoreError>> + Send;

    /// The live items for several distinct keys, in `keys` order.
    /// One call may cost several round trips (DynamoDB: BatchGetItem, 100
    /// keys each, unprocessed keys retried); any failure fails them all.
    fn get_many(
        &self,
        keys: &[&[u8]],
        view: View,
    ) -> impl Future<Output = Result<Vec<Option<StoredItem>>, StoreError>> + Send {
        async move {
            let mut items = Vec::with_capacity(keys.len());
            for key in keys {
                items.push(self.get(key, view).await?);
            }
            Ok(items)
        }
    }

    /// Writes `item` if `condition` holds under `view`.
    fn put(
        &self,
        key: &[u8],
        item: &StoredItem,
        condition: PutCondition,
        view: View,
    ) -> impl Future<Output = Result<PutResult, StoreError>> + Send;

    /// Deletes `key`; returns whether a live item was there.
    fn delete(
        &self,
        key: &[u8],
        view: View,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Sets the expiry of the live item at `key`; returns the item as it now
    /// is (expired, if `expires_at` is already past), or None if there was
    /// no live item.
    fn touch(
        &self,
        key: &[u8],
        expires_at: u32,
        view: View,
    ) -> impl Future<Output = Result<Option<StoredItem>, StoreError>> + Send;

    /// The time of the last `flush_all` (as a version: items below it are
    /// flushed once it has passed), or 0 if there was none.
    fn flush_marker(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Records a `flush_all` taking effect at `flushed_before`.
    fn set_flush_marker(
        &self,
        flushed_before: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
