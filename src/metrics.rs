//! Metric names and the Prometheus exporter. Names follow Prometheus
//! conventions: `_total` counters, base units (`_seconds`, `_bytes`).
//!
//! Handles for the request path are made once ([`CommandMetrics`]), so
//! counting a request is an atomic add, not a registry lookup. The README's
//! metrics table documents every name here.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::cache::CacheStats;

pub const COMMANDS: &str = "dynacache_commands_total";
pub const COMMAND_DURATION: &str = "dynacache_command_duration_seconds";
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
pub const DYNAMODB_RETRIES: &str = "dynacache_dynamodb_retries_total";
pub const DYNAMODB_READ_CAPACITY: &str = "dynacache_dynamodb_consumed_read_capacity_units_total";
pub const DYNAMODB_WRITE_CAPACITY: &str = "dynacache_dynamodb_consumed_write_capacity_units_total";
pub const CONNECTIONS: &str = "dynacache_connections";
pub const CONNECTIONS_TOTAL: &str = "dynacache_connections_total";
pub const CONNECTIONS_LIMIT: &str = "dynacache_connections_limit";
pub const CONNECTIONS_LIMIT_REACHED: &str = "dynacache_connections_limit_reached_total";

/// Latency buckets for DynamoDB calls: 250 µs (DynamoDB Local on loopback) to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Keys per BatchGetItem call: up to DynamoDB's 100.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0];

/// Latency buckets for whole commands: a hit takes microseconds, a miss or
/// a write a DynamoDB call.
const COMMAND_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder; its handle renders the text that
/// [`render`] serves. The caller runs the handle's upkeep periodically.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(COMMAND_DURATION.into()), COMMAND_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DYNAMODB_DURATION.into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DYNAMODB_BATCH_KEYS.into()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// The Prometheus text for `/metrics`: the recorder's metrics, then the
/// capacity counters.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    render_capacity(&mut text);
    text
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(COMMANDS, "Requests by command and outcome.");
    describe_histogram!(
        COMMAND_DURATION,
        Unit::Seconds,
        "Time to run a command (cache and DynamoDB), from parsed request to encoded reply."
    );
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
    describe_counter!(
        DYNAMODB_RETRIES,
        "DynamoDB attempts beyond the first, by operation (the SDK's standard retry)."
    );
    describe_gauge!(CONNECTIONS, "Open client connections.");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted since start."
    );
    describe_gauge!(
        CONNECTIONS_LIMIT,
        "Connections served at once (max_connections); more wait in the listen backlog."
    );
    describe_counter!(
        CONNECTIONS_LIMIT_REACHED,
        "Times all connection slots were taken, so new clients waited in the listen backlog."
    );
}

/// DynamoDB's capacity units consumed, by operation. Counted here, not in
/// the `metrics` registry, whose counters hold whole numbers: capacity
/// comes in halves (an eventually consistent read of up to 4 KB is 0.5 RCU).
/// Kept in thousandths, so adding is one atomic add and sums are exact.
struct CapacityCounter {
    operation: &'static str,
    milli_units: AtomicU64,
}

impl CapacityCounter {
    const fn new(operation: &'static str) -> CapacityCounter {
        CapacityCounter {
            operation,
            milli_units: AtomicU64::new(0),
        }
    }
}

/// Operations that consume read capacity, and those that consume write
/// capacity (all with ReturnConsumedCapacity=TOTAL; see `store::metering`).
static READ_CAPACITY: [CapacityCounter; 2] = [
    CapacityCounter::new("GetItem"),
    CapacityCounter::new("BatchGetItem"),
];
static WRITE_CAPACITY: [CapacityCounter; 3] = [
    CapacityCounter::new("PutItem"),
    CapacityCounter::new("UpdateItem"),
    CapacityCounter::new("DeleteItem"),
];

/// Adds what one call consumed; other operations (DescribeTable) consume none.
pub fn record_capacity(operation: &str, units: f64) {
    let counter = READ_CAPACITY
        .iter()
        .chain(&WRITE_CAPACITY)
        .find(|c| c.operation == operation);
    if let Some(counter) = counter
        && units.is_finite()
        && units > 0.0
    {
        counter
            .milli_units
            .fetch_add((units * 1000.0).round() as u64, Ordering::Relaxed);
    }
}

fn render_capacity(out: &mut String) {
    let families = [
        (
            DYNAMODB_READ_CAPACITY,
            &READ_CAPACITY[..],
            "DynamoDB read capacity units consumed, as DynamoDB reports them.",
        ),
        (
            DYNAMODB_WRITE_CAPACITY,
            &WRITE_CAPACITY[..],
            "DynamoDB write capacity units consumed, as DynamoDB reports them (failed conditional writes are billed but not reported).",
        ),
    ];
    for (name, counters, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for c in counters {
            let units = c.milli_units.load(Ordering::Relaxed) as f64 / 1000.0;
            let _ = writeln!(out, "{name}{{operation=\"{}\"}} {units}", c.operation);
        }
        out.push('\n');
    }
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
    "mg",
    "ms",
    "md",
    "ma",
    "me",
    "version",
    "quit",
    "invalid",
];

/// Handles for what the request path counts, registered on first use so
/// only combinations that happen appear in `/metrics`.
pub struct CommandMetrics {
    commands: Box<[OnceLock<Counter>]>,
    durations: Box<[OnceLock<Histogram>]>,
    pub hits: Counter,
    pub misses: Counter,
    pub coalesced: Counter,
    pub revalidations: Counter,
    pub stale_served: Counter,
    pub connections: Gauge,
    pub connections_total: Counter,
    pub connections_limit: Gauge,
    pub connections_limit_reached: Counter,
}

impl CommandMetrics {
    /// Handles bound to the recorder installed now (none: they count nothing).
    pub fn new() -> CommandMetrics {
        CommandMetrics {
            commands: (0..COMMAND_NAMES.len() * Outcome::ALL)
                .map(|_| OnceLock::new())
                .collect(),
            durations: COMMAND_NAMES.iter().map(|_| OnceLock::new()).collect(),
            hits: metrics::counter!(CACHE_HITS),
            misses: metrics::counter!(CACHE_MISSES),
            coalesced: metrics::counter!(CACHE_COALESCED),
            revalidations: metrics::counter!(CACHE_REVALIDATIONS),
            stale_served: metrics::counter!(CACHE_STALE_SERVED),
            connections: metrics::gauge!(CONNECTIONS),
            connections_total: metrics::counter!(CONNECTIONS_TOTAL),
            connections_limit: metrics::gauge!(CONNECTIONS_LIMIT),
            connections_limit_reached: metrics::counter!(CONNECTIONS_LIMIT_REACHED),
        }
    }

    /// Counts one request: `command` must be one of [`COMMAND_NAMES`].
    pub fn command(&self, command: &'static str, outcome: Outcome) {
        if let Some(idx) = command_index(command) {
            self.count(idx, command, outcome);
        }
    }

    /// Counts one finished request and records its latency: one name
    /// lookup for both, since this runs for every request.
    pub fn finished(&self, command: &'static str, outcome: Outcome, started: Instant) {
        let Some(idx) = command_index(command) else {
            return;
        };
        self.count(idx, command, outcome);
        self.durations[idx]
            .get_or_init(|| metrics::histogram!(COMMAND_DURATION, "command" => command))
            .record(started.elapsed().as_secs_f64());
    }

    fn count(&self, idx: usize, command: &'static str, outcome: Outcome) {
        self.commands[idx * Outcome::ALL + outcome as usize]
            .get_or_init(
                || metrics::counter!(COMMANDS, "command" => command, "outcome" => outcome.name()),
            )
            .increment(1);
    }
}

fn command_index(command: &str) -> Option<usize> {
    let idx = COMMAND_NAMES.iter().position(|&n| n == command);
    debug_assert!(idx.is_some(), "unknown command name {command}");
    idx
}

impl Default for CommandMetrics {
    fn default() -> Self {
        CommandMetrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_summed_exactly_in_halves() {
        let value = |text: &str, op: &str| -> f64 {
            let series = format!("{DYNAMODB_READ_CAPACITY}{{operation=\"{op}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap()
                .parse()
                .unwrap()
        };
        let mut before = String::new();
        render_capacity(&mut before);
        for _ in 0..3 {
            record_capacity("BatchGetItem", 0.5);
        }
        record_capacity("DescribeTable", 1.0); // consumes none: ignored
        let mut after = String::new();
        render_capacity(&mut after);
        assert_eq!(
            value(&after, "BatchGetItem") - value(&before, "BatchGetItem"),
            1.5
        );
        assert!(after.contains(&format!("# TYPE {DYNAMODB_WRITE_CAPACITY} counter")));
        assert!(after.contains(&format!(
            "{DYNAMODB_WRITE_CAPACITY}{{operation=\"PutItem\"}} "
        )));
    }
}
