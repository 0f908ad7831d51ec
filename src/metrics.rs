//! Metric names and the Prometheus exporter. Names follow Prometheus
//! conventions: `_total` counters, base units (`_seconds`, `_bytes`).
//!
//! Handles for the request path are made once ([`CommandMetrics`]), so
//! counting a request is an atomic add, not a registry lookup.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::cache::CacheStats;

pub const COMMANDS: &str = "dynacache_commands_total";
pub const CACHE_HITS: &str = "dynacache_cache_hits_total";
pub const CACHE_MISSES: &str = "dynacache_cache_misses_total";
pub const CACHE_EVICTIONS: &str = "dynacache_cache_evictions_total";
pub const CACHE_EXPIRATIONS: &str = "dynacache_cache_expirations_total";
pub const CACHE_ITEMS: &str = "dynacache_cache_items";
pub const CACHE_BYTES: &str = "dynacache_cache_bytes";
pub const CACHE_LIMIT_BYTES: &str = "dynacache_cache_limit_bytes";
pub const DYNAMODB_REQUESTS: &str = "dynacache_dynamodb_requests_total";
pub const DYNAMODB_DURATION: &str = "dynacache_dynamodb_request_duration_seconds";
pub const DYNAMODB_BATCH_KEYS: &str = "dynacache_dynamodb_batch_get_keys";
pub const CACHE_COALESCED: &str = "dynacache_cache_coalesced_misses_total";
pub const CACHE_STALE_SERVED: &str = "dynacache_cache_stale_served_total";
pub const CACHE_REVALIDATIONS: &str = "dynacache_cache_revalidations_total";
pub const CONNECTIONS: &str = "dynacache_connections";
pub const CONNECTIONS_TOTAL: &str = "dynacache_connections_total";

/// Latency buckets for DynamoDB calls: 250 µs (DynamoDB Local on loopback) to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Keys per BatchGetItem call: up to DynamoDB's 100.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0];

/// Installs the global recorder and serves `/metrics` on `addr`.
/// Must run inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DYNAMODB_BATCH_KEYS.into()), BATCH_BUCKETS)?
        .install()?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(COMMANDS, "Requests by command and outcome.");
    describe_counter!(CACHE_HITS, "Keys served from memory.");
    describe_counter!(
        CACHE_MISSES,
        "Keys not in memory (then read from DynamoDB)."
    );
    describe_counter!(
        CACHE_EVICTIONS,
        "Entries evicted to stay within the memory budget."
    );
    describe_counter!(CACHE_EXPIRATIONS, "Expired entries dropped from memory.");
    describe_gauge!(CACHE_ITEMS, "Entries in memory.");
    describe_gauge!(
        CACHE_BYTES,
        Unit::Bytes,
        "Bytes charged against the memory budget."
    );
    describe_gauge!(CACHE_LIMIT_BYTES, Unit::Bytes, "The memory budget.");
    describe_counter!(
        DYNAMODB_REQUESTS,
        "DynamoDB calls by operation and outcome."
    );
    describe_histogram!(
        DYNAMODB_DURATION,
        Unit::Seconds,
        "DynamoDB call latency, retries included."
    );
    describe_histogram!(
        DYNAMODB_BATCH_KEYS,
        "Keys per BatchGetItem call (multi-get misses)."
    );
    describe_counter!(
        CACHE_COALESCED,
        "Misses that waited for another request's read of the same key."
    );
    describe_counter!(
        CACHE_REVALIDATIONS,
        "Cached entries older than max_local_age re-read from DynamoDB."
    );
    describe_counter!(
        CACHE_STALE_SERVED,
        "Entries older than max_local_age served because DynamoDB failed."
    );
    describe_gauge!(CONNECTIONS, "Open client connections.");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted since start."
    );
}

/// Publishes the cache's totals (called periodically: the cache keeps its
/// own counters so the request path touches no gauge).
pub fn publish_cache(stats: &CacheStats, last: &mut CacheStats) {
    metrics::gauge!(CACHE_ITEMS).set(stats.items as f64);
    metrics::gauge!(CACHE_BYTES).set(stats.bytes as f64);
    metrics::gauge!(CACHE_LIMIT_BYTES).set(stats.limit_bytes as f64);
    metrics::counter!(CACHE_EVICTIONS).increment(stats.evictions.saturating_sub(last.evictions));
    metrics::counter!(CACHE_EXPIRATIONS)
        .increment(stats.expirations.saturating_sub(last.expirations));
    *last = *stats;
}

/// How a request ended, for `dynacache_commands_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stored,
    NotStored,
    Deleted,
    NotFound,
    Touched,
    Ok,
    ClientError,
    ServerError,
}

impl Outcome {
    const ALL: usize = 10;

    fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stored => "stored",
            Outcome::NotStored => "not_stored",
            Outcome::Deleted => "deleted",
            Outcome::NotFound => "not_found",
            Outcome::Touched => "touched",
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
        }
    }
}

/// Command names that label `dynacache_commands_total`; "invalid" counts
/// requests that did not parse.
pub const COMMAND_NAMES: &[&str] = &[
    "get",
    "gets",
    "gat",
    "gats",
    "set",
    "add",
    "replace",
    "append",
    "prepend",
    "cas",
    "delete",
    "touch",
    "incr",
    "decr",
    "flush_all",
    "stats",
    "verbosity",
    "cache_memlimit",
    "shutdown",
    "mn",
    "version",
    "quit",
    "invalid",
];

/// Handles for what the request path counts, registered on first use so
/// only combinations that happen appear in `/metrics`.
pub struct CommandMetrics {
    commands: Box<[OnceLock<Counter>]>,
    pub hits: Counter,
    pub misses: Counter,
    pub coalesced: Counter,
    pub revalidations: Counter,
    pub stale_served: Counter,
    pub connections: Gauge,
    pub connections_total: Counter,
}

impl CommandMetrics {
    /// Handles bound to the recorder installed now (none: they count nothing).
    pub fn new() -> CommandMetrics {
        CommandMetrics {
            commands: (0..COMMAND_NAMES.len() * Outcome::ALL)
                .map(|_| OnceLock::new())
                .collect(),
            hits: metrics::counter!(CACHE_HITS),
            misses: metrics::counter!(CACHE_MISSES),
            coalesced: metrics::counter!(CACHE_COALESCED),
            revalidations: metrics::counter!(CACHE_REVALIDATIONS),
            stale_served: metrics::counter!(CACHE_STALE_SERVED),
            connections: metrics::gauge!(CONNECTIONS),
            connections_total: metrics::counter!(CONNECTIONS_TOTAL),
        }
    }

    /// Counts one request: `command` must be one of [`COMMAND_NAMES`].
    pub fn command(&self, command: &'static str, outcome: Outcome) {
        let Some(idx) = COMMAND_NAMES.iter().position(|&n| n == command) else {
            debug_assert!(false, "unknown command name {command}");
            return;
        };
        self.commands[idx * Outcome::ALL + outcome as usize]
            .get_or_init(
                || metrics::counter!(COMMANDS, "command" => command, "outcome" => outcome.name()),
            )
            .increment(1);
    }
}

impl Default for CommandMetrics {
    fn default() -> Self {
        CommandMetrics::new()
    }
}
