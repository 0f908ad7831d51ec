//! The durable store behind the cache: the one seam the engine is generic
//! over. [`DynamoStore`] is the product; [`MemoryStore`] serves unit tests and
//! micro-benchmarks only.
//!
//! A store is deliberately simple: it reads items as they are (expired ones
//! and tombstones included: deciding what is live is the engine's, in
//! [`Item::is_live`]) and writes an item only if the key still holds what
//! the writer saw ([`Expect`]). That one primitive is what lets every write
//! be checked against the state it replaces, so a write answered long ago
//! (a timeout whose request lands late) can never overwrite a newer one.

pub mod codec;
mod dynamo;
mod memory;
mod metering;
mod outage;

use std::future::Future;

pub use codec::Compression;
pub use dynamo::{
    CHUNKS_ATTRIBUTE, DynamoSettings, DynamoStore, ITEM_MAX, KeyType, TableBilling, TableSettings,
    VALUE_MAX,
};
pub use memory::MemoryStore;

// The item type the store, the cache and the engine share.
pub use crate::item::{Item, TOMBSTONE_AGE, View, is_expired};

/// Keys that begin with this hold dynacache's own items (the `flush_all`
/// marker, fleet membership); a client cannot name them (a classic key has
/// no space; a base64 meta key with one is refused).
pub const RESERVED_PREFIX: &[u8] = b"dynacache ";

/// What a write expects the key to hold, checked by the store atomically
/// with the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No item at all (never written, or its tombstone swept by TTL).
    Missing,
    /// The item of this version (a live one if `live`, under the write's
    /// view), held over `1 + chunks` items ([`Item::chunks`]).
    Version {
        version: u64,
        live: bool,
        chunks: u8,
    },
}

impl Expect {
    /// What to expect to replace `item` (`None`: the key holds nothing).
    pub fn of(item: Option<&Item>, view: View) -> Expect {
        match item {
            None => Expect::Missing,
            Some(item) => Expect::Version {
                version: item.version,
                live: item.is_live(view),
                chunks: item.chunks,
            },
        }
    }
}

/// A write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// The whole item.
    Put(&'a Item),
    /// Only the expiry and the version (touch): the value is not sent again.
    Retime { expires_at: u32, version: u64 },
}

impl Change<'_> {
    /// The version the key holds once this is written.
    pub fn version(&self) -> u64 {
        match self {
            Change::Put(item) => item.version,
            Change::Retime { version, .. } => *version,
        }
    }
}

/// How a conditional write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written, over `1 + chunks` items (what [`Item::chunks`] of the
    /// written item is from now on).
    Done { chunks: u8 },
    /// The key did not hold what was expected; this is what it holds (as
    /// it is: expired items and tombstones included), read in the same
    /// round trip.
    Conflict(Option<Item>),
}

/// Why a store call failed. Every variant reaches the client as a short,
/// explicit error reply, never as a miss; details go to the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key cannot be held by the table's key attribute.
    #[error("{0}")]
    InvalidKey(&'static str),
    #[error("dynamodb timed out")]
    Timeout,
    #[error("dynamodb throttled the request")]
    Throttled,
    #[error("dynamodb unreachable")]
    Unavailable,
    /// DynamoDB answered with a server error (5xx): the request may or may
    /// not have been applied.
    #[error("dynamodb internal error")]
    Internal,
    /// DynamoDB refused the request (4xx); the AWS error code.
    #[error("dynamodb rejected the request: {0}")]
    Rejected(String),
    /// A read-modify-write lost the race for a key too many times in a row.
    #[error("too much contention on this key, try again")]
    Contention,
    /// The table holds an item this program cannot read (wrong attribute types).
    #[error("bad item in table: {0}")]
    BadItem(String),
    /// Fleet mode: this member cannot tell that every peer heard of its
    /// writes (joining, or cut off from the membership). A write answered
    /// so may have reached DynamoDB.
    #[error("fleet membership unknown")]
    FleetUnknown,
}

impl StoreError {
    /// Whether this says DynamoDB itself is failing (not this request):
    /// then aged entries are served without asking it again until a probe
    /// gets an answer.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout | StoreError::Unavailable | StoreError::Internal
        )
    }

    /// Whether a write that failed this way may still be applied: it timed
    /// out, its connection failed, or DynamoDB failed inside. The engine
    /// then fences the key (see `engine::write`).
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout | StoreError::Unavailable | StoreError::Internal
        )
    }
}

/// What the engine needs from durable storage.
pub trait Store: Send + Sync + 'static {
    /// Whether the table's key attribute can hold `key`.
    fn check_key(&self, key: &[u8]) -> Result<(), StoreError>;

    /// Whether it can hold every key of `keys`, keys separated by spaces
    /// (a multi-get's key list, checked whole before any value is written).
    /// A store whose rule holds for a line as for each of its keys checks
    /// the line at once.
    fn check_key_list(&self, keys: &[u8]) -> Result<(), StoreError> {
        keys.split(|b| *b == b' ')
            .filter(|k| !k.is_empty())
            .try_for_each(|k| self.check_key(k))
    }

    /// Bytes an item costs in the store besides its key and value (attribute
    /// names and numbers), to keep items under the store's size limit.
    fn item_overhead(&self) -> usize;

    /// The item at `key` as it is (expired or a tombstone included), read
    /// strongly consistently where the store offers a choice and the
    /// settings ask for it.
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Item>, StoreError>> + Send;

    /// The items at several distinct keys, in `keys` order. One call may cost
    /// several round trips (DynamoDB: BatchGetItem, 100 keys each,
    /// unprocessed keys retried); any failure fails them all.
    fn get_many(
        &self,
        keys: &[&[u8]],
    ) -> impl Future<Output = Result<Vec<Option<Item>>, StoreError>> + Send {
        async move {
            let mut items = Vec::with_capacity(keys.len());
            for key in keys {
                items.push(self.get(key).await?);
            }
            Ok(items)
        }
    }

    /// Writes `change` if the key holds what `expect` says (liveness judged
    /// under `view`). Retrying the same call is safe: a write that already
    /// landed comes back as a conflict holding its own version.
    fn write(
        &self,
        key: &[u8],
        change: Change<'_>,
        expect: Expect,
        view: View,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;

    /// Whether the store can serve now (for `/readyz`): Ok, or the reason.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}
