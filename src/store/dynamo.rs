//! [`DynamoStore`]: items in one DynamoDB table, one item per key.
//!
//! Layout (attribute names configurable): the key as partition key (S or B),
//! the value (B), the flags (N), the expiry in Unix seconds (N, the table's
//! TTL attribute; absent = never) and a version (N) that every write changes.
//! DynamoDB deletes expired items lazily, so every read compares the expiry
//! with the clock itself.
//!
//! **Encoded values.** A value stored compressed, or too large for one item
//! (400 KB), has a map as its value attribute: `{"zstd": B}` (or `{"raw":
//! B}`) holding the bytes, or their first part. A binary that predates
//! encoding reads a map as a bad item (`SERVER_ERROR`), never as a value,
//! during a rolling upgrade. Values that are neither stay plain `B`, as
//! every version of dynacache wrote them.
//!
//! **Chunks.** A value whose bytes do not fit one item is a *head* (the
//! key's item, with the first part and `chunks` = n) and n chunk items at
//! the keys `dynacache chunk <i> <key>` (i = 1..=n; no client can name
//! them), each with the head's version and expiry, so the table's TTL
//! removes them with it. Every write of a chunked key is one
//! TransactWriteItems: the head, conditioned as any write (on the version
//! replaced and on its chunk count), the new chunks, and deletes of the old
//! chunks the new value does not overwrite; so nothing is ever half
//! written, and no chunk outlives its head's last version (a delete leaves
//! a tombstone head and no chunk). A reader reads the head, then its chunks
//! (one consistent BatchGetItem), and uses them only if every one carries
//! the head's version; else a write landed between the two reads, and it
//! reads again. Chunks of two versions are never put together.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType as DynamoKeyType,
    KeysAndAttributes, ProvisionedThroughput, ReturnValuesOnConditionCheckFailure,
    ScalarAttributeType, TimeToLiveSpecification,
};
use serde::{Deserialize, Serialize};

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{Delete, Put, TransactWriteItem, Update};
use bytesize::ByteSize;

use super::codec::{self, Codec, Compression, Compressor};
use super::{Change, Expect, Item, RESERVED_PREFIX, Store, StoreError, View, Written};

/// DynamoDB's item size limit, attribute names included.
pub const ITEM_MAX: usize = 400 * 1024;

/// The largest value (key and attribute overhead included) chunking writes
/// atomically: one TransactWriteItems carries at most 4 MiB (and 100
/// items); 64 KiB of that are left for keys, attribute names and the
/// deletes of a replaced value's chunks.
pub const VALUE_MAX: usize = 4 * 1024 * 1024 - 64 * 1024;

/// The attribute holding a head's chunk count (absent: no chunks).
pub const CHUNKS_ATTRIBUTE: &str = "chunks";

/// Chunk items' keys begin with this (then the index, a space, the key).
const CHUNK_PREFIX: &[u8] = b"dynacache chunk ";

/// Room left in each item besides the key, its attribute names and numbers,
/// and the value's bytes: a chunk's longer key, the value map's framing,
/// the chunk count.
const PART_SLACK: usize = 128;

/// Values this large are compressed and decompressed on a blocking thread:
/// a megabyte takes milliseconds, too long to hold a runtime worker.
const OFFLOAD_MIN: usize = 128 * 1024;

/// Reads of a chunked value that may find a newer write between the head and
/// its chunks before giving up (each retry means a write just landed).
const READ_ATTEMPTS: usize = 8;

/// Attempts of a transaction that collides with another one in flight on
/// the same items (DynamoDB cancels both with `TransactionConflict`).
const TRANSACT_ATTEMPTS: usize = 4;

/// The type of the table's partition key attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// String: readable in the console; keys must be valid UTF-8.
    S,
    /// Binary: any key bytes.
    B,
}

/// How to reach the table and how its items are laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamoSettings {
    pub table: String,
    /// Overrides the endpoint (DynamoDB Local); else the AWS chain decides.
    pub endpoint_url: Option<String>,
    /// Overrides the region; else the AWS chain decides.
    pub region: Option<String>,
    pub key_attribute: String,
    pub key_type: KeyType,
    pub value_attribute: String,
    pub flags_attribute: String,
    pub expiry_attribute: String,
    pub version_attribute: String,
    /// Strongly consistent reads on a miss (false halves their read cost).
    pub consistent_reads: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on one operation, retries included.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Attempts per operation, the first included (the SDK's standard retry).
    pub max_attempts: u32,
    /// "zstd": values of at least `compression_threshold` are stored
    /// compressed when that makes them smaller; "off": as they are.
    pub compression: Compression,
    /// Values shorter than this are stored as they are.
    pub compression_threshold: ByteSize,
    /// zstd's level: 1 (fastest) to 19 (smallest).
    pub compression_level: i32,
}

impl Default for DynamoSettings {
    fn default() -> Self {
        DynamoSettings {
            table: "dynacache".into(),
            endpoint_url: None,
            region: None,
            key_attribute: "key".into(),
            key_type: KeyType::S,
            value_attribute: "value".into(),
            flags_attribute: "flags".into(),
            expiry_attribute: "expires_at".into(),
            version_attribute: "version".into(),
            consistent_reads: true,
            connect_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(3),
            max_attempts: 3,
            compression: Compression::Zstd,
            compression_threshold: ByteSize::kib(1),
            compression_level: 3,
        }
    }
}

/// How `init-table` creates the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableSettings {
    /// "on_demand" (pay per request) or "provisioned".
    pub billing_mode: TableBilling,
    /// Read capacity units, when provisioned.
    pub read_capacity: i64,
    /// Write capacity units, when provisioned.
    pub write_capacity: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum TableBilling {
    OnDemand,
    Provisioned,
}

impl Default for TableSettings {
    fn default() -> Self {
        TableSettings {
            billing_mode: TableBilling::OnDemand,
            read_capacity: 5,
            write_capacity: 5,
        }
    }
}

pub struct DynamoStore {
    client: Client,
    settings: DynamoSettings,
    /// `#k`, `#v`, ... -> the configured attribute names, for expressions.
    names: HashMap<String, String>,
    compressor: Compressor,
    counts: ValueCounts,
}

/// The value counters, registered once (a `metrics::counter!` with labels
/// costs a registry lookup per call; these are one atomic add).
struct ValueCounts {
    /// By direction (write, read): plain bytes, stored bytes, values
    /// compressed, values chunked.
    write: [metrics::Counter; 4],
    read: [metrics::Counter; 4],
}

impl ValueCounts {
    fn new() -> ValueCounts {
        let of = |direction: &'static str| {
            [
                metrics::counter!(crate::metrics::STORE_VALUE_BYTES, "direction" => direction, "form" => "plain"),
                metrics::counter!(crate::metrics::STORE_VALUE_BYTES, "direction" => direction, "form" => "stored"),
                metrics::counter!(crate::metrics::STORE_VALUES, "direction" => direction, "form" => "compressed"),
                metrics::counter!(crate::metrics::STORE_VALUES, "direction" => direction, "form" => "chunked"),
            ]
        };
        ValueCounts {
            write: of("write"),
            read: of("read"),
        }
    }

    /// A value written or read: its plain and stored sizes, and whether it
    /// was compressed or chunked.
    fn value(
        counters: &[metrics::Counter; 4],
        plain: usize,
        stored: usize,
        compressed: bool,
        chunked: bool,
    ) {
        counters[0].increment(plain as u64);
        counters[1].increment(stored as u64);
        if compressed {
            counters[2].increment(1);
        }
        if chunked {
            counters[3].increment(1);
        }
    }
}

impl DynamoStore {
    /// A client from the standard AWS chain (env, profile, instance role),
    /// with the settings' endpoint, region, timeouts and retries on top.
    pub async fn connect(settings: DynamoSettings) -> DynamoStore {
        DynamoStore::connect_with(settings, |loader| loader).await
    }

    /// [`DynamoStore::connect`], with a last word on the AWS configuration
    /// (tests give DynamoDB Local static credentials this way).
    pub async fn connect_with(
        settings: DynamoSettings,
        customize: impl FnOnce(aws_config::ConfigLoader) -> aws_config::ConfigLoader,
    ) -> DynamoStore {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            )
            .retry_config(
                aws_config::retry::RetryConfig::standard().with_max_attempts(settings.max_attempts),
            );
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let region_in_env = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        match &settings.region {
            Some(region) => loader = loader.region(aws_config::Region::new(region.clone())),
            // DynamoDB Local ignores the region but the SDK needs one to
            // sign; don't go probing instance metadata for it.
            None if settings.endpoint_url.is_some() && !region_in_env => {
                loader = loader.region(aws_config::Region::new("us-east-1"));
            }
            None => {}
        }
        // Boxed: the loader's future is large, and callers nest it in theirs.
        let sdk = Box::pin(customize(loader).load()).await;
        let config = aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(super::metering::Metering)
            .build();
        DynamoStore::with_client(Client::from_conf(config), settings)
    }

    pub fn with_client(client: Client, settings: DynamoSettings) -> DynamoStore {
        let names = [
            ("#k", &settings.key_attribute),
            ("#v", &settings.value_attribute),
            ("#f", &settings.flags_attribute),
            ("#e", &settings.expiry_attribute),
            ("#r", &settings.version_attribute),
            ("#n", &CHUNKS_ATTRIBUTE.to_string()),
        ]
        .into_iter()
        .map(|(p, n)| (p.to_string(), n.clone()))
        .collect();
        let compressor = Compressor {
            compression: settings.compression,
            threshold: usize::try_from(settings.compression_threshold.as_u64())
                .unwrap_or(usize::MAX),
            level: settings.compression_level,
        };
        DynamoStore {
            client,
            settings,
            names,
            compressor,
            counts: ValueCounts::new(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn settings(&self) -> &DynamoSettings {
        &self.settings
    }

    /// Only the placeholders an expression uses may be sent.
    fn names_for(&self, expression: &str) -> HashMap<String, String> {
        self.names
            .iter()
            .filter(|(p, _)| expression.contains(p.as_str()))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect()
    }

    fn key_value(&self, key: &[u8]) -> Result<AttributeValue, StoreError> {
        match self.settings.key_type {
            KeyType::B => Ok(AttributeValue::B(Blob::new(key))),
            KeyType::S => std::str::from_utf8(key)
                .map(|s| AttributeValue::S(s.to_owned()))
                .map_err(|_| StoreError::InvalidKey(NOT_UTF8)),
        }
    }

    /// An item's head as DynamoDB holds it; a missing attribute takes its
    /// default (items other programs wrote may lack flags or a version).
    /// Takes the attributes by value: the value's bytes move, they are not
    /// copied.
    fn head_from(&self, mut attrs: HashMap<String, AttributeValue>) -> Result<Head, StoreError> {
        let s = &self.settings;
        let (codec, bytes) = match attrs.remove(&s.value_attribute) {
            Some(AttributeValue::B(b)) => (Codec::Raw, b.into_inner()),
            // Tables written by django-dynamodb-sessions hold strings.
            Some(AttributeValue::S(text)) => (Codec::Raw, text.into_bytes()),
            // An encoded value: one entry, named for its codec.
            Some(AttributeValue::M(map)) if map.len() == 1 => {
                let (name, bytes) = map.into_iter().next().expect("one entry");
                match (Codec::from_name(&name), bytes) {
                    (Some(codec), AttributeValue::B(b)) => (codec, b.into_inner()),
                    _ => return Err(bad_attr(&s.value_attribute)),
                }
            }
            Some(_) => return Err(bad_attr(&s.value_attribute)),
            None => (Codec::Raw, Vec::new()),
        };
        Ok(Head {
            item: Item {
                value: Vec::new(),
                flags: number(&attrs, &s.flags_attribute)?.unwrap_or(0),
                expires_at: expiry(&attrs, &s.expiry_attribute)?,
                version: number(&attrs, &s.version_attribute)?.unwrap_or(0),
                chunks: number(&attrs, CHUNKS_ATTRIBUTE)?.unwrap_or(0),
            },
            codec,
            bytes,
        })
    }

    fn head_in(
        &self,
        attrs: Option<HashMap<String, AttributeValue>>,
    ) -> Result<Option<Head>, StoreError> {
        match attrs {
            Some(attrs) if !attrs.is_empty() => self.head_from(attrs).map(Some),
            _ => Ok(None),
        }
    }

    /// The whole item `head` begins: its chunks read (one BatchGetItem) if
    /// it has any. None: they carry another version (a write landed between
    /// the two reads): read the head again.
    async fn complete(&self, key: &[u8], head: Head) -> Result<Option<Item>, StoreError> {
        let Head {
            mut item,
            codec,
            mut bytes,
        } = head;
        if item.chunks > 0 {
            let keys: Vec<Vec<u8>> = (1..=item.chunks).map(|i| chunk_key(key, i)).collect();
            let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let found = self.batch_get(&keys).await?;
            let s = &self.settings;
            let mut parts = Vec::with_capacity(found.len());
            for attrs in found {
                let part = attrs.and_then(|mut attrs| {
                    let version: Option<u64> = number(&attrs, &s.version_attribute).ok()?;
                    match attrs.remove(&s.value_attribute) {
                        Some(AttributeValue::B(b)) if version == Some(item.version) => {
                            Some(b.into_inner())
                        }
                        _ => None,
                    }
                });
                match part {
                    Some(part) => parts.push(part),
                    // An expired value's chunks may be gone with their TTL
                    // before its head: it is gone, whoever asks.
                    None if item.is_expired(unix_now()) => {
                        item.expires_at = 1;
                        return Ok(Some(item));
                    }
                    None => return Ok(None),
                }
            }
            bytes.reserve_exact(parts.iter().map(Vec::len).sum());
            for part in parts {
                bytes.extend_from_slice(&part);
            }
        }
        let stored = bytes.len();
        item.value = offload(stored, move || codec::decode(codec, bytes, VALUE_MAX))
            .await
            .map_err(|e| StoreError::BadItem(e.to_string()))?;
        let (compressed, chunked) = (codec == Codec::Zstd, item.chunks > 0);
        ValueCounts::value(
            &self.counts.read,
            item.value.len(),
            stored,
            compressed,
            chunked,
        );
        Ok(Some(item))
    }

    /// How `value`, to be written at `key`, is held: compressed if that is
    /// allowed and worth it (never dynacache's own items, which older
    /// binaries read too), and split over chunk items if it does not fit one.
    async fn encode(&self, key: &[u8], value: &[u8]) -> Encoded {
        let packed = if key.starts_with(RESERVED_PREFIX) || !self.compressor.tries(value.len()) {
            None
        } else if value.len() < OFFLOAD_MIN {
            self.compressor.compress(value)
        } else {
            let (compressor, value) = (self.compressor, value.to_vec());
            offload(value.len(), move || compressor.compress(&value)).await
        };
        let (codec, bytes) = match packed {
            Some(packed) => (Codec::Zstd, packed),
            None => (Codec::Raw, value.to_vec()),
        };
        let part = self.part_size(key);
        let (compressed, chunked) = (codec == Codec::Zstd, bytes.len() > part);
        ValueCounts::value(
            &self.counts.write,
            value.len(),
            bytes.len(),
            compressed,
            chunked,
        );
        let map = |bytes: Vec<u8>| {
            AttributeValue::M(HashMap::from([(
                codec.name().to_string(),
                AttributeValue::B(Blob::new(bytes)),
            )]))
        };
        if !chunked {
            let head = match codec {
                Codec::Raw => AttributeValue::B(Blob::new(bytes)),
                Codec::Zstd => map(bytes),
            };
            return Encoded {
                head,
                chunks: Vec::new(),
            };
        }
        let mut parts = bytes.chunks(part);
        let first = parts.next().expect("more than one part").to_vec();
        Encoded {
            head: map(first),
            chunks: parts.map(<[u8]>::to_vec).collect(),
        }
    }

    /// Bytes of a value each item holds: the item limit less the key, the
    /// attribute names and numbers, and [`PART_SLACK`].
    fn part_size(&self, key: &[u8]) -> usize {
        ITEM_MAX - key.len() - self.item_overhead() - PART_SLACK
    }

    /// The attributes of `item`'s head (at `key`), its value attribute `value`.
    fn head_attrs(
        &self,
        key: &[u8],
        item: &Item,
        value: AttributeValue,
        chunks: usize,
    ) -> Result<HashMap<String, AttributeValue>, StoreError> {
        let s = &self.settings;
        let mut attrs = HashMap::from([
            (s.key_attribute.clone(), self.key_value(key)?),
            (s.value_attribute.clone(), value),
            (
                s.flags_attribute.clone(),
                AttributeValue::N(item.flags.to_string()),
            ),
        ]);
        self.stamp(&mut attrs, item);
        if chunks > 0 {
            attrs.insert(
                CHUNKS_ATTRIBUTE.to_string(),
                AttributeValue::N(chunks.to_string()),
            );
        }
        Ok(attrs)
    }

    /// Adds `item`'s version and expiry (none: never) to an item's attributes.
    fn stamp(&self, attrs: &mut HashMap<String, AttributeValue>, item: &Item) {
        let s = &self.settings;
        attrs.insert(
            s.version_attribute.clone(),
            AttributeValue::N(item.version.to_string()),
        );
        if item.expires_at != 0 {
            attrs.insert(
                s.expiry_attribute.clone(),
                AttributeValue::N(item.expires_at.to_string()),
            );
        }
    }

    /// The key attribute of `key`'s chunk `i`.
    fn chunk_key_value(
        &self,
        key: &[u8],
        i: u8,
    ) -> Result<HashMap<String, AttributeValue>, StoreError> {
        Ok(HashMap::from([(
            self.settings.key_attribute.clone(),
            self.key_value(&chunk_key(key, i))?,
        )]))
    }

    /// The condition that the key holds what `expect` says, and its values.
    fn condition(expect: Expect, view: View) -> (String, HashMap<String, AttributeValue>) {
        match expect {
            Expect::Missing => ("attribute_not_exists(#k)".into(), HashMap::new()),
            Expect::Version {
                version,
                live,
                chunks,
            } => {
                // An item another program wrote may have no version: it is 0.
                let mut expr = match version {
                    0 => String::from(
                        "attribute_exists(#k) AND (attribute_not_exists(#r) OR #r = :ver)",
                    ),
                    _ => String::from("#r = :ver"),
                };
                let mut values =
                    HashMap::from([(":ver".to_string(), AttributeValue::N(version.to_string()))]);
                // The chunks the write removes are exactly the head's.
                match chunks {
                    0 => expr.push_str(" AND attribute_not_exists(#n)"),
                    n => {
                        expr.push_str(" AND #n = :chunks");
                        values.insert(":chunks".into(), AttributeValue::N(n.to_string()));
                    }
                }
                if live {
                    expr.push_str(" AND (attribute_not_exists(#e) OR #e > :now)");
                    values.insert(":now".into(), AttributeValue::N(view.now.to_string()));
                    if view.flushed_before > 0 {
                        expr.push_str(" AND #r >= :flushed");
                        values.insert(
                            ":flushed".into(),
                            AttributeValue::N(view.flushed_before.to_string()),
                        );
                    }
                }
                (expr, values)
            }
        }
    }

    /// What a write that found the key not as expected tells the engine:
    /// the item the failed condition returned, whole (a chunked one with its
    /// chunks read, or read again whole if they moved on meanwhile).
    async fn conflict(
        &self,
        key: &[u8],
        attrs: Option<HashMap<String, AttributeValue>>,
    ) -> Result<Written, StoreError> {
        let current = match self.head_in(attrs)? {
            None => None,
            Some(head) => match self.complete(key, head).await? {
                Some(item) => Some(item),
                None => self.get(key).await?,
            },
        };
        Ok(Written::Conflict(current))
    }

    /// One TransactWriteItems whose first action is the head's: Ok(None)
    /// written, Ok(Some(attrs)) the head's condition failed (with what the
    /// head holds, or nothing). Retried while it collides with another
    /// transaction in flight on the same items.
    async fn transact(
        &self,
        actions: Vec<TransactWriteItem>,
    ) -> Result<Option<Option<HashMap<String, AttributeValue>>>, StoreError> {
        let mut backoff = Duration::from_millis(10);
        for _ in 0..TRANSACT_ATTEMPTS {
            let call = self
                .client
                .transact_write_items()
                .set_transact_items(Some(actions.clone()))
                .send();
            let e = match self.send("TransactWriteItems", call).await {
                Ok(_) => return Ok(None),
                Err(e) => e,
            };
            let reasons = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                    c.cancellation_reasons()
                }
                // The same request (an SDK retry) is still being applied:
                // whether it lands is unknown.
                Some(TransactWriteItemsError::TransactionInProgressException(_)) => {
                    return Err(StoreError::Internal);
                }
                _ => return Err(classify(&e)),
            };
            let code = |r: &aws_sdk_dynamodb::types::CancellationReason| {
                r.code().unwrap_or("None").to_string()
            };
            let codes: Vec<String> = reasons.iter().map(code).collect();
            match codes.first().map(String::as_str) {
                Some("ConditionalCheckFailed") => {
                    return Ok(Some(reasons[0].item().cloned()));
                }
                _ if codes.iter().any(|c| c == "ConditionalCheckFailed") => {
                    return Err(StoreError::BadItem(
                        "a chunk of the value does not match its head".into(),
                    ));
                }
                _ if codes.iter().any(|c| c == "TransactionConflict") => {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                _ if codes
                    .iter()
                    .any(|c| c == "ThrottlingError" || c == "ProvisionedThroughputExceeded") =>
                {
                    return Err(StoreError::Throttled);
                }
                _ => {
                    let code = codes.into_iter().find(|c| c != "None");
                    return Err(StoreError::Rejected(
                        code.unwrap_or_else(|| "TransactionCanceledException".into())
                            .chars()
                            .take(64)
                            .collect(),
                    ));
                }
            }
        }
        Err(StoreError::Contention)
    }

    /// Reads the items at `keys` (distinct), in that order: BatchGetItem,
    /// 100 keys a call, unprocessed keys retried with backoff within one
    /// operation's bound.
    async fn batch_get(
        &self,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<HashMap<String, AttributeValue>>>, StoreError> {
        let s = &self.settings;
        let index: HashMap<&[u8], usize> = keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let mut found = vec![None; keys.len()];
        // Unprocessed keys (DynamoDB's partial answers under load) are retried
        // with backoff, within the same bound as any one operation.
        let deadline = Instant::now() + s.operation_timeout;
        for chunk in keys.chunks(BATCH_GET_MAX) {
            let mut pending = chunk
                .iter()
                .map(|k| {
                    Ok(HashMap::from([(
                        s.key_attribute.clone(),
                        self.key_value(k)?,
                    )]))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let mut backoff = Duration::from_millis(20);
            loop {
                metrics::histogram!(crate::metrics::DYNAMODB_BATCH_KEYS)
                    .record(pending.len() as f64);
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending))
                    .consistent_read(s.consistent_reads)
                    .build()
                    .map_err(|e| StoreError::Rejected(e.to_string()))?;
                let call = self
                    .client
                    .batch_get_item()
                    .request_items(&s.table, request)
                    .send();
                let mut out = self
                    .send("BatchGetItem", call)
                    .await
                    .map_err(|e| classify(&e))?;
                let items = out
                    .responses
                    .take()
                    .and_then(|mut r| r.remove(&s.table))
                    .unwrap_or_default();
                for attrs in items {
                    let i = match attrs.get(&s.key_attribute) {
                        Some(AttributeValue::S(k)) => index.get(k.as_bytes()),
                        Some(AttributeValue::B(k)) => index.get(k.as_ref()),
                        _ => return Err(bad_attr(&s.key_attribute)),
                    };
                    if let Some(&i) = i {
                        found[i] = Some(attrs);
                    }
                }
                pending = out
                    .unprocessed_keys()
                    .and_then(|u| u.get(&s.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                if Instant::now() + backoff > deadline {
                    return Err(StoreError::Throttled);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        Ok(found)
    }

    /// Runs one SDK call and records its latency and outcome: the one place
    /// every DynamoDB call is observed.
    async fn send<T, E>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, SdkError<E>>>,
    ) -> Result<T, SdkError<E>>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let started = Instant::now();
        // Boxed: SDK futures are large, and the engine's futures hold them.
        let result = Box::pin(call).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => "conditional_failed",
            // A transaction DynamoDB cancelled: a condition failed, or another
            // transaction was writing the same items (retried in `transact`).
            // DynamoDB answered: neither an error nor an outage.
            Err(e) if e.code() == Some("TransactionCanceledException") => "cancelled",
            // A single-item write refused while a transaction holds the
            // item (retried in `send_write`): DynamoDB answered too.
            Err(e) if e.code() == Some("TransactionConflictException") => "cancelled",
            Err(e) => match classify(e) {
                StoreError::Timeout => "timeout",
                StoreError::Throttled => "throttled",
                _ => "error",
            },
        };
        metrics::counter!(crate::metrics::DYNAMODB_REQUESTS, "operation" => operation, "outcome" => outcome)
            .increment(1);
        metrics::histogram!(crate::metrics::DYNAMODB_DURATION, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        match outcome {
            "ok" | "conditional_failed" | "cancelled" => super::outage::DYNAMODB.answered(),
            _ => {
                if let Err(e) = &result {
                    let error = classify(e);
                    tracing::debug!(operation, %error, detail = %DisplayErrorContext(e), "dynamodb call failed");
                    super::outage::DYNAMODB.failed(&error, &DisplayErrorContext(e).to_string());
                }
            }
        }
        result
    }

    /// A single-item write (`call` makes the request, again on each
    /// attempt), sent again while DynamoDB refuses it because a transaction
    /// (another sidecar's chunked write) holds the same item: the write is
    /// then decided on what that transaction left, as a condition decides
    /// it. After [`TRANSACT_ATTEMPTS`] the refusal stands (`Contention`).
    async fn send_write<T, E, F>(
        &self,
        operation: &'static str,
        mut call: impl FnMut() -> F,
    ) -> Result<T, SdkError<E>>
    where
        F: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut backoff = Duration::from_millis(10);
        for _ in 1..TRANSACT_ATTEMPTS {
            match self.send(operation, call()).await {
                Err(e) if e.code() == Some("TransactionConflictException") => {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                result => return result,
            }
        }
        self.send(operation, call()).await
    }

    /// Creates the table (partition key only, TTL on the expiry attribute).
    /// Returns false, changing nothing, when it already exists.
    pub async fn create_table(&self, table: &TableSettings) -> Result<bool, StoreError> {
        let s = &self.settings;
        let key_type = match s.key_type {
            KeyType::S => ScalarAttributeType::S,
            KeyType::B => ScalarAttributeType::B,
        };
        let mut req = self
            .client
            .create_table()
            .table_name(&s.table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(&s.key_attribute)
                    .attribute_type(key_type)
                    .build()
                    .map_err(|e| StoreError::Rejected(e.to_string()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(&s.key_attribute)
                    .key_type(DynamoKeyType::Hash)
                    .build()
                    .map_err(|e| StoreError::Rejected(e.to_string()))?,
            );
        req = match table.billing_mode {
            TableBilling::OnDemand => req.billing_mode(BillingMode::PayPerRequest),
            TableBilling::Provisioned => req
                .billing_mode(BillingMode::Provisioned)
                .provisioned_throughput(
                    ProvisionedThroughput::builder()
                        .read_capacity_units(table.read_capacity)
                        .write_capacity_units(table.write_capacity)
                        .build()
                        .map_err(|e| StoreError::Rejected(e.to_string()))?,
                ),
        };
        match Box::pin(req.send()).await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(classify(&e)),
        }
        self.client
            .wait_until_table_exists()
            .table_name(&s.table)
            .wait(Duration::from_secs(120))
            .await
            .map_err(|e| StoreError::Rejected(DisplayErrorContext(&e).to_string()))?;
        Box::pin(
            self.client
                .update_time_to_live()
                .table_name(&s.table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .enabled(true)
                        .attribute_name(&s.expiry_attribute)
                        .build()
                        .map_err(|e| StoreError::Rejected(e.to_string()))?,
                )
                .send(),
        )
        .await
        .map_err(|e| classify(&e))?;
        Ok(true)
    }

    /// Whether the table exists and answers (for readiness).
    pub async fn describe_table(&self) -> Result<(), StoreError> {
        let call = self
            .client
            .describe_table()
            .table_name(&self.settings.table)
            .send();
        match self.send("DescribeTable", call).await {
            Ok(_) => Ok(()),
            Err(e) => Err(classify(&e)),
        }
    }
}

/// BatchGetItem's limit of keys per call.
const BATCH_GET_MAX: usize = 100;

const NOT_UTF8: &str = "key is not valid UTF-8, which the table's S key attribute requires";

fn bad_attr(name: &str) -> StoreError {
    StoreError::BadItem(format!("attribute {name} has the wrong type"))
}

fn number<T: std::str::FromStr>(
    attrs: &HashMap<String, AttributeValue>,
    name: &str,
) -> Result<Option<T>, StoreError> {
    match attrs.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| bad_attr(name)),
        Some(_) => Err(bad_attr(name)),
    }
}

/// The expiry attribute as whole seconds (DynamoDB numbers may carry a
/// fraction); absent means never.
fn expiry(attrs: &HashMap<String, AttributeValue>, name: &str) -> Result<u32, StoreError> {
    match number::<f64>(attrs, name)? {
        None => Ok(0),
        Some(secs) if secs <= 0.0 => Ok(1), // already expired
        Some(secs) => Ok(secs.ceil().min(f64::from(u32::MAX)) as u32),
    }
}

/// What the client is told of an SDK failure: a short, classified reason
/// (the SDK's own text, with HTTP headers, goes to the debug log).
fn classify<E>(err: &SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::TimeoutError(_) => StoreError::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => StoreError::Timeout,
        SdkError::DispatchFailure(_) => StoreError::Unavailable,
        SdkError::ResponseError(_) => StoreError::Unavailable,
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            match code {
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded" => StoreError::Throttled,
                // A transaction held the item through every attempt.
                "TransactionConflictException" => StoreError::Contention,
                "InternalServerError" | "ServiceUnavailable" | "InternalFailure" => {
                    StoreError::Internal
                }
                _ if service.raw().status().is_server_error() => StoreError::Internal,
                // An AWS error code is a short identifier; bound it anyway.
                _ => StoreError::Rejected(code.chars().take(64).collect()),
            }
        }
        _ => StoreError::Unavailable,
    }
}

/// The item a failed condition returned (ReturnValuesOnConditionCheckFailure).
fn conflict_item<E>(
    err: &SdkError<E>,
    item: impl Fn(&E) -> Option<&HashMap<String, AttributeValue>>,
) -> Option<Option<HashMap<String, AttributeValue>>>
where
    E: ProvideErrorMetadata,
{
    let service = err.as_service_error()?;
    (service.code() == Some("ConditionalCheckFailedException")).then(|| item(service).cloned())
}

/// A key's item as read, before its value is whole: the item's fields (its
/// value empty), how its bytes are encoded, and the bytes it holds itself.
struct Head {
    item: Item,
    codec: Codec,
    bytes: Vec<u8>,
}

/// A value as it is to be written: the head's value attribute, and the
/// bytes of each chunk item after it (none: one item holds it all).
struct Encoded {
    head: AttributeValue,
    chunks: Vec<Vec<u8>>,
}

/// The key of `key`'s chunk `i` (from 1): reserved, so no client can name it.
fn chunk_key(key: &[u8], i: u8) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(CHUNK_PREFIX.len() + 4 + key.len());
    chunk.extend_from_slice(CHUNK_PREFIX);
    chunk.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
    chunk.push(b' ');
    chunk.extend_from_slice(key);
    chunk
}

/// Runs CPU-heavy work on a value of `len` bytes on a blocking thread when
/// the value is large (see [`OFFLOAD_MIN`]), else here.
async fn offload<T: Send + 'static>(len: usize, work: impl FnOnce() -> T + Send + 'static) -> T {
    if len < OFFLOAD_MIN {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Unix seconds now (the engine's clock, read the same way).
fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

impl Store for DynamoStore {
    fn check_key(&self, key: &[u8]) -> Result<(), StoreError> {
        match self.settings.key_type {
            KeyType::S if std::str::from_utf8(key).is_err() => {
                Err(StoreError::InvalidKey(NOT_UTF8))
            }
            _ => Ok(()),
        }
    }

    /// One UTF-8 check of the whole list: spaces are ASCII, so a list is
    /// valid UTF-8 exactly when each of its keys is.
    fn check_key_list(&self, keys: &[u8]) -> Result<(), StoreError> {
        self.check_key(keys)
    }

    fn item_overhead(&self) -> usize {
        let s = &self.settings;
        // Attribute names count toward the 400 KB item limit; numbers take
        // at most 21 bytes each.
        s.key_attribute.len()
            + s.value_attribute.len()
            + s.flags_attribute.len()
            + s.expiry_attribute.len()
            + s.version_attribute.len()
            + 3 * 21
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Item>, StoreError> {
        for _ in 0..READ_ATTEMPTS {
            let call = self
                .client
                .get_item()
                .table_name(&self.settings.table)
                .key(&self.settings.key_attribute, self.key_value(key)?)
                .consistent_read(self.settings.consistent_reads)
                .send();
            let attrs = match self.send("GetItem", call).await {
                Ok(out) => out.item,
                Err(e) => return Err(classify(&e)),
            };
            let Some(head) = self.head_in(attrs)? else {
                return Ok(None);
            };
            if let Some(item) = self.complete(key, head).await? {
                return Ok(Some(item));
            }
        }
        Err(StoreError::Contention)
    }

    async fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Item>>, StoreError> {
        let found = self.batch_get(keys).await?;
        let mut items = Vec::with_capacity(keys.len());
        for (key, attrs) in keys.iter().zip(found) {
            let item = match self.head_in(attrs)? {
                None => None,
                // A chunked value's chunks are read for it alone, and if a
                // write moved it on meanwhile, the whole item again.
                Some(head) => match self.complete(key, head).await? {
                    Some(item) => Some(item),
                    None => self.get(key).await?,
                },
            };
            items.push(item);
        }
        Ok(items)
    }

    async fn write(
        &self,
        key: &[u8],
        change: Change<'_>,
        expect: Expect,
        view: View,
    ) -> Result<Written, StoreError> {
        let s = &self.settings;
        let (condition, values) = Self::condition(expect, view);
        let old_chunks = match expect {
            Expect::Missing => 0,
            Expect::Version { chunks, .. } => chunks,
        };
        match change {
            Change::Put(item) => {
                let encoded = self.encode(key, &item.value).await;
                let chunks = u8::try_from(encoded.chunks.len())
                    .map_err(|_| StoreError::Rejected("value too large to store".into()))?;
                let head = self.head_attrs(key, item, encoded.head, encoded.chunks.len())?;
                if chunks == 0 && old_chunks == 0 {
                    let req = self
                        .client
                        .put_item()
                        .table_name(&s.table)
                        .set_item(Some(head))
                        .condition_expression(&condition)
                        .set_expression_attribute_names(Some(self.names_for(&condition)))
                        .set_expression_attribute_values(Some(values).filter(|v| !v.is_empty()))
                        .return_values_on_condition_check_failure(
                            ReturnValuesOnConditionCheckFailure::AllOld,
                        );
                    return match self.send_write("PutItem", || req.clone().send()).await {
                        Ok(_) => Ok(Written::Done { chunks }),
                        Err(e) => match conflict_item(&e, |e| match e {
                            PutItemError::ConditionalCheckFailedException(c) => c.item(),
                            _ => None,
                        }) {
                            Some(attrs) => self.conflict(key, attrs).await,
                            None => Err(classify(&e)),
                        },
                    };
                }
                // The head, its new chunks, and deletes of the old chunks
                // the new value leaves behind: all or nothing.
                let mut actions = vec![
                    TransactWriteItem::builder()
                        .put(
                            Put::builder()
                                .table_name(&s.table)
                                .set_item(Some(head))
                                .condition_expression(&condition)
                                .set_expression_attribute_names(Some(self.names_for(&condition)))
                                .set_expression_attribute_values(
                                    Some(values).filter(|v| !v.is_empty()),
                                )
                                .return_values_on_condition_check_failure(
                                    ReturnValuesOnConditionCheckFailure::AllOld,
                                )
                                .build()
                                .map_err(|e| StoreError::Rejected(e.to_string()))?,
                        )
                        .build(),
                ];
                for (i, part) in (1..).zip(encoded.chunks) {
                    // A chunk carries the head's version (readers check
                    // it) and expiry (the table's TTL removes it with the head).
                    let mut attrs = self.chunk_key_value(key, i)?;
                    attrs.insert(
                        s.value_attribute.clone(),
                        AttributeValue::B(Blob::new(part)),
                    );
                    self.stamp(&mut attrs, item);
                    let put = Put::builder()
                        .table_name(&s.table)
                        .set_item(Some(attrs))
                        .build()
                        .map_err(|e| StoreError::Rejected(e.to_string()))?;
                    actions.push(TransactWriteItem::builder().put(put).build());
                }
                for i in chunks.saturating_add(1)..=old_chunks {
                    let delete = Delete::builder()
                        .table_name(&s.table)
                        .set_key(Some(self.chunk_key_value(key, i)?))
                        .build()
                        .map_err(|e| StoreError::Rejected(e.to_string()))?;
                    actions.push(TransactWriteItem::builder().delete(delete).build());
                }
                match self.transact(actions).await? {
                    None => Ok(Written::Done { chunks }),
                    Some(attrs) => self.conflict(key, attrs).await,
                }
            }
            Change::Retime {
                expires_at,
                version,
            } => {
                let update = match expires_at {
                    0 => "SET #r = :new REMOVE #e",
                    _ => "SET #r = :new, #e = :exp",
                };
                let mut values = values;
                values.insert(":new".into(), AttributeValue::N(version.to_string()));
                if expires_at != 0 {
                    values.insert(":exp".into(), AttributeValue::N(expires_at.to_string()));
                }
                let names = self.names_for(&format!("{update} {condition}"));
                if old_chunks == 0 {
                    let req = self
                        .client
                        .update_item()
                        .table_name(&s.table)
                        .key(&s.key_attribute, self.key_value(key)?)
                        .update_expression(update)
                        .condition_expression(&condition)
                        .set_expression_attribute_names(Some(names))
                        .set_expression_attribute_values(Some(values))
                        .return_values_on_condition_check_failure(
                            ReturnValuesOnConditionCheckFailure::AllOld,
                        );
                    return match self.send_write("UpdateItem", || req.clone().send()).await {
                        Ok(_) => Ok(Written::Done { chunks: 0 }),
                        Err(e) => match conflict_item(&e, |e| match e {
                            UpdateItemError::ConditionalCheckFailedException(c) => c.item(),
                            _ => None,
                        }) {
                            Some(attrs) => self.conflict(key, attrs).await,
                            None => Err(classify(&e)),
                        },
                    };
                }
                // The head and every chunk take the new version and expiry
                // together (the chunks' TTL must not end before the head's).
                let old = match expect {
                    Expect::Version { version, .. } => version,
                    Expect::Missing => unreachable!("a chunked item was expected"),
                };
                let mut actions = vec![
                    TransactWriteItem::builder()
                        .update(
                            Update::builder()
                                .table_name(&s.table)
                                .key(&s.key_attribute, self.key_value(key)?)
                                .update_expression(update)
                                .condition_expression(&condition)
                                .set_expression_attribute_names(Some(names))
                                .set_expression_attribute_values(Some(values))
                                .return_values_on_condition_check_failure(
                                    ReturnValuesOnConditionCheckFailure::AllOld,
                                )
                                .build()
                                .map_err(|e| StoreError::Rejected(e.to_string()))?,
                        )
                        .build(),
                ];
                let chunk_condition = "#r = :old";
                let mut chunk_values = HashMap::from([
                    (":old".to_string(), AttributeValue::N(old.to_string())),
                    (":new".to_string(), AttributeValue::N(version.to_string())),
                ]);
                if expires_at != 0 {
                    chunk_values.insert(":exp".into(), AttributeValue::N(expires_at.to_string()));
                }
                let chunk_names = self.names_for(&format!("{update} {chunk_condition}"));
                for i in 1..=old_chunks {
                    let update = Update::builder()
                        .table_name(&s.table)
                        .set_key(Some(self.chunk_key_value(key, i)?))
                        .update_expression(update)
                        .condition_expression(chunk_condition)
                        .set_expression_attribute_names(Some(chunk_names.clone()))
                        .set_expression_attribute_values(Some(chunk_values.clone()))
                        .build()
                        .map_err(|e| StoreError::Rejected(e.to_string()))?;
                    actions.push(TransactWriteItem::builder().update(update).build());
                }
                match self.transact(actions).await? {
                    None => Ok(Written::Done { chunks: old_chunks }),
                    Some(attrs) => self.conflict(key, attrs).await,
                }
            }
        }
    }

    async fn ready(&self) -> Result<(), String> {
        self.describe_table()
            .await
            .map_err(|e| format!("DescribeTable {}: {e}", self.settings.table))
    }
}
