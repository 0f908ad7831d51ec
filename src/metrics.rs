//! What is counted, once: every event the request path records is one
//! atomic add ([`Counters::record`]), and both memcached's `stats` and the
//! Prometheus text of `/metrics` read the same atomics. Names follow
//! Prometheus conventions: `_total` counters, base units (`_seconds`,
//! `_bytes`). The README's metrics table documents every name here.
//!
//! Histograms (latencies, batch sizes) and the DynamoDB call counters go
//! through the `metrics` crate's recorder ([`install`]), whose text
//! [`render`] serves together with the counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::Histogram;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use strum::{EnumCount, IntoStaticStr, VariantArray};

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
pub const CACHE_NEGATIVE_HITS: &str = "dynacache_cache_negative_hits_total";
pub const CACHE_REVALIDATIONS: &str = "dynacache_cache_revalidations_total";
pub const WRITES_FENCED: &str = "dynacache_writes_fenced_total";
pub const WRITES: &str = "dynacache_writes_total";
pub const FLEET_READS_THROUGH: &str = "dynacache_fleet_reads_through_total";
pub const FLEET_ACK_WAIT: &str = "dynacache_fleet_ack_wait_seconds";
pub const DYNAMODB_RETRIES: &str = "dynacache_dynamodb_retries_total";
pub const DYNAMODB_READ_CAPACITY: &str = "dynacache_dynamodb_consumed_read_capacity_units_total";
pub const DYNAMODB_WRITE_CAPACITY: &str = "dynacache_dynamodb_consumed_write_capacity_units_total";
pub const CONNECTIONS: &str = "dynacache_connections";
pub const CONNECTIONS_TOTAL: &str = "dynacache_connections_total";
pub const CONNECTIONS_LIMIT: &str = "dynacache_connections_limit";
pub const CONNECTIONS_LIMIT_REACHED: &str = "dynacache_connections_limit_reached_total";
pub const CLIENT_BYTES: &str = "dynacache_client_bytes_total";
pub const LOCAL_KEYS: &str = "dynacache_local_keys_total";
pub const LOCAL_CACHE_ITEMS: &str = "dynacache_local_cache_items";
pub const LOCAL_CACHE_BYTES: &str = "dynacache_local_cache_bytes";
pub const LOCAL_CACHE_LIMIT_BYTES: &str = "dynacache_local_cache_limit_bytes";
pub const LOCAL_CACHE_EVICTIONS: &str = "dynacache_local_cache_evictions_total";
pub const STORE_VALUES: &str = "dynacache_store_values_total";
pub const STORE_VALUE_BYTES: &str = "dynacache_store_value_bytes_total";
pub const DYNAMODB_CALL_CAPACITY: &str = "dynacache_dynamodb_call_capacity_units";

/// Latency buckets for DynamoDB calls: 250 µs (DynamoDB Local on loopback) to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Capacity units one DynamoDB call consumed: half a unit (an eventually
/// consistent read) to a chunked value's transaction (2 units per KB).
const CAPACITY_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
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
        .set_buckets_for_metric(Matcher::Full(FLEET_ACK_WAIT.into()), COMMAND_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(DYNAMODB_CALL_CAPACITY.into()),
            CAPACITY_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    PROCESS.describe();
    Ok(handle)
}

/// The process metrics Prometheus' own clients export (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`, `process_threads`, ...), read from /proc at
/// each scrape: what an operator compares the cache's budget and the
/// connection limit against.
static PROCESS: std::sync::LazyLock<metrics_process::Collector> =
    std::sync::LazyLock::new(metrics_process::Collector::default);

fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_histogram!(
        COMMAND_DURATION,
        Unit::Seconds,
        "Time to run a command (cache and DynamoDB), from parsed request to encoded reply."
    );
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
    describe_histogram!(
        FLEET_ACK_WAIT,
        Unit::Seconds,
        "Fleet mode: how long a write waited for its peers' acknowledgements."
    );
    describe_counter!(
        DYNAMODB_RETRIES,
        "DynamoDB attempts beyond the first, by operation (the SDK's standard retry)."
    );
    describe_histogram!(
        DYNAMODB_CALL_CAPACITY,
        "Capacity units one DynamoDB call consumed, as DynamoDB reports them, by operation."
    );
    describe_counter!(
        STORE_VALUES,
        "Values written to or read from DynamoDB compressed, or split over chunk items."
    );
    describe_counter!(
        STORE_VALUE_BYTES,
        Unit::Bytes,
        "Bytes of values written to or read from DynamoDB: as clients see them (plain) and as the table holds them (stored)."
    );
}

/// What the request path counts. Each event is one counter; memcached's
/// `stats` shows those memcached has (under memcached's names), `/metrics`
/// those it has a name for ([`Event::prometheus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Event {
    /// Keys asked for by retrievals (memcached's `cmd_get`).
    CmdGet,
    /// Storage commands (`cmd_set`).
    CmdSet,
    CmdFlush,
    CmdTouch,
    /// Keys found, from memory or DynamoDB (`get_hits`).
    GetHits,
    GetMisses,
    /// Cached entries found expired.
    GetExpired,
    /// Cached entries hidden by a `flush_all`.
    GetFlushed,
    DeleteMisses,
    DeleteHits,
    IncrMisses,
    IncrHits,
    DecrMisses,
    DecrHits,
    CasMisses,
    CasHits,
    CasBadval,
    TouchHits,
    TouchMisses,
    StoreTooLarge,
    /// Items larger than the whole cache budget: stored, but not kept in memory.
    StoreNoMemory,
    /// Items written (`total_items`).
    TotalItems,
    TotalConnections,
    /// Connections closed at once because all slots were taken.
    RejectedConnections,
    /// Keys served from memory.
    CacheHits,
    /// Keys read from DynamoDB.
    CacheMisses,
    CacheCoalesced,
    CacheRevalidations,
    CacheStaleServed,
    /// Writes of unknown outcome made harmless (see `engine::write`).
    WritesFenced,
    /// Writes through the write path that changed the item...
    WritesDone,
    /// ...that were refused on what DynamoDB holds (`NOT_STORED`, ...)...
    WritesRefused,
    /// ...and that failed (an error answered).
    WritesFailed,
    /// Fleet mode: keys read from DynamoDB, not memory, because a peer's
    /// lease was missing.
    FleetReadsThrough,
    /// Gets answered as misses by a negative entry: DynamoDB was not asked.
    CacheNegativeHits,
    /// Keys of local prefixes (memory only) found in memory...
    LocalHits,
    /// ...not found (never read from DynamoDB)...
    LocalMisses,
    /// ...and written (to memory only).
    LocalWrites,
}

impl Event {
    /// Events dynacache adds: not in memcached's `stats`.
    fn memcached(self) -> bool {
        !matches!(
            self,
            Event::CacheHits
                | Event::CacheMisses
                | Event::CacheCoalesced
                | Event::CacheRevalidations
                | Event::CacheStaleServed
                | Event::WritesFenced
                | Event::WritesDone
                | Event::WritesRefused
                | Event::WritesFailed
                | Event::FleetReadsThrough
                | Event::LocalHits
                | Event::LocalMisses
                | Event::LocalWrites
                | Event::CacheNegativeHits
        )
    }

    /// The Prometheus counter this event is, its help text, and the label
    /// that tells it from the family's other events.
    fn prometheus(self) -> Option<Family> {
        let writes = "Writes through the write path, by result: done (DynamoDB changed), refused (decided on what DynamoDB holds: NOT_STORED, EXISTS, NOT_FOUND), failed (an error answered).";
        let local = "Keys of local prefixes (kept in memory only, never in DynamoDB): hits, misses and writes.";
        let labelled = match self {
            Event::WritesDone => Some((WRITES, writes, Some(("result", "done")))),
            Event::WritesRefused => Some((WRITES, writes, Some(("result", "refused")))),
            Event::WritesFailed => Some((WRITES, writes, Some(("result", "failed")))),
            Event::LocalHits => Some((LOCAL_KEYS, local, Some(("event", "hit")))),
            Event::LocalMisses => Some((LOCAL_KEYS, local, Some(("event", "miss")))),
            Event::LocalWrites => Some((LOCAL_KEYS, local, Some(("event", "write")))),
            _ => None,
        };
        if labelled.is_some() {
            return labelled;
        }
        let (name, help) = match self {
            Event::CacheHits => (CACHE_HITS, "Keys served from memory."),
            Event::CacheMisses => (
                CACHE_MISSES,
                "Keys not in memory (then read from DynamoDB).",
            ),
            Event::CacheCoalesced => (
                CACHE_COALESCED,
                "Misses that waited for another request's read of the same key.",
            ),
            Event::CacheRevalidations => (
                CACHE_REVALIDATIONS,
                "Cached entries older than max_local_age re-read from DynamoDB.",
            ),
            Event::CacheNegativeHits => (
                CACHE_NEGATIVE_HITS,
                "Gets answered as misses from a negative entry (a recent read found nothing): no DynamoDB read.",
            ),
            Event::CacheStaleServed => (
                CACHE_STALE_SERVED,
                "Entries older than max_local_age served because DynamoDB failed.",
            ),
            Event::WritesFenced => (
                WRITES_FENCED,
                "Writes whose outcome was unknown (a timeout), made unable to land later.",
            ),
            Event::FleetReadsThrough => (
                FLEET_READS_THROUGH,
                "Fleet mode: keys read from DynamoDB instead of memory because a peer's lease was missing.",
            ),
            Event::TotalConnections => (
                CONNECTIONS_TOTAL,
                "Client connections accepted since start.",
            ),
            Event::RejectedConnections => (
                CONNECTIONS_LIMIT_REACHED,
                "Connections refused with ERROR Too many open connections, all slots being taken.",
            ),
            _ => return None,
        };
        Some((name, help, None))
    }
}

/// A Prometheus counter family, its help text, and the label that tells one
/// of its series from the others.
type Family = (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
);

/// How a request ended, for `dynacache_commands_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
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

/// The kinds of request, labelling `dynacache_commands_total` and the
/// latency histogram; `Invalid` counts requests that did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum CommandKind {
    Get,
    Gets,
    Gat,
    Gats,
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas,
    Delete,
    Touch,
    Incr,
    Decr,
    FlushAll,
    Stats,
    Verbosity,
    CacheMemlimit,
    Shutdown,
    Mn,
    Mg,
    Ms,
    Md,
    Ma,
    Me,
    Version,
    Quit,
    Invalid,
}

impl CommandKind {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// The counters of one server, and its command latency histograms.
pub struct Counters {
    events: [AtomicU64; Event::COUNT],
    /// `stats reset` subtracts these: Prometheus counters never go down.
    reset_at: [AtomicU64; Event::COUNT],
    commands: [[AtomicU64; Outcome::COUNT]; CommandKind::COUNT],
    durations: [Histogram; CommandKind::COUNT],
    /// Open client connections.
    connections: AtomicU64,
    connections_limit: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl Counters {
    /// Counters whose histograms go to the recorder installed now (none:
    /// they record nothing; the counters count anyway).
    pub fn new() -> Counters {
        Counters {
            events: std::array::from_fn(|_| AtomicU64::new(0)),
            reset_at: std::array::from_fn(|_| AtomicU64::new(0)),
            commands: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            durations: std::array::from_fn(|i| {
                let name = CommandKind::VARIANTS[i].name();
                metrics::histogram!(COMMAND_DURATION, "command" => name)
            }),
            connections: AtomicU64::new(0),
            connections_limit: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }

    /// Counts one event.
    pub fn record(&self, event: Event) {
        self.events[event as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How often `event` happened since start.
    pub fn get(&self, event: Event) -> u64 {
        self.events[event as usize].load(Ordering::Relaxed)
    }

    /// Counts one request and records how long it took.
    pub fn finished(&self, kind: CommandKind, outcome: Outcome, started: Instant) {
        self.counted(kind, outcome);
        self.durations[kind as usize].record(started.elapsed().as_secs_f64());
    }

    /// Counts one request whose time is not measured (`quit`, a bad request).
    pub fn counted(&self, kind: CommandKind, outcome: Outcome) {
        self.commands[kind as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.record(Event::TotalConnections);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn set_connections_limit(&self, limit: usize) {
        self.connections_limit
            .store(limit as u64, Ordering::Relaxed);
    }

    /// Bytes a connection read and wrote.
    pub fn io(&self, read: usize, written: usize) {
        self.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(written as u64, Ordering::Relaxed);
    }

    /// memcached's counters, as `stats` prints them (since the last reset).
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut lines: Vec<(&'static str, u64)> = Event::VARIANTS
            .iter()
            .filter(|e| e.memcached())
            .map(|&e| {
                let i = e as usize;
                let now = self.events[i].load(Ordering::Relaxed);
                (
                    e.into(),
                    now.saturating_sub(self.reset_at[i].load(Ordering::Relaxed)),
                )
            })
            .collect();
        lines.push(("bytes_read", self.bytes_read.load(Ordering::Relaxed)));
        lines.push(("bytes_written", self.bytes_written.load(Ordering::Relaxed)));
        lines
    }

    /// `stats reset`: memcached's counters start again from zero (for
    /// `stats` only; `/metrics` counters never go down).
    pub fn reset(&self) {
        for (event, at) in self.events.iter().zip(&self.reset_at) {
            at.store(event.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Appends the Prometheus text of these counters and of `cache`.
    pub fn render(&self, cache: &CacheStats, out: &mut String) {
        family(out, COMMANDS, "counter", "Requests by command and outcome.");
        for kind in CommandKind::VARIANTS {
            for outcome in Outcome::VARIANTS {
                let n = self.commands[*kind as usize][*outcome as usize].load(Ordering::Relaxed);
                if n > 0 {
                    let (command, outcome): (&str, &str) = (kind.name(), outcome.into());
                    let _ = writeln!(
                        out,
                        "{COMMANDS}{{command=\"{command}\",outcome=\"{outcome}\"}} {n}"
                    );
                }
            }
        }
        let mut last_family = "";
        for event in Event::VARIANTS {
            let Some((name, help, label)) = event.prometheus() else {
                continue;
            };
            if name != last_family {
                family(out, name, "counter", help);
                last_family = name;
            }
            let n = self.get(*event);
            match label {
                Some((label, value)) => {
                    let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
                }
                None => {
                    let _ = writeln!(out, "{name} {n}");
                }
            }
        }
        let gauges: [(&str, &str, &str, u64); 6] = [
            (
                CONNECTIONS,
                "gauge",
                "Open client connections.",
                self.connections(),
            ),
            (
                CONNECTIONS_LIMIT,
                "gauge",
                "Connections served at once (max_connections); more are refused.",
                self.connections_limit.load(Ordering::Relaxed),
            ),
            (
                CACHE_ITEMS,
                "gauge",
                "Items in memory (keys known absent not counted; their bytes are).",
                cache.items,
            ),
            (
                CACHE_BYTES,
                "gauge",
                "Bytes charged against the memory budget.",
                cache.bytes,
            ),
            (
                CACHE_LIMIT_BYTES,
                "gauge",
                "The memory budget.",
                cache.limit_bytes,
            ),
            (
                CACHE_EXPIRATIONS,
                "counter",
                "Expired entries a get found in memory and dropped (those reclaimed for room count in dynacache_cache_evictions_total{reason=\"expired\"}).",
                cache.expirations.saturating_sub(cache.evictions_expired),
            ),
        ];
        for (name, kind, help, value) in gauges {
            family(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        family(
            out,
            CACHE_EVICTIONS,
            "counter",
            "Entries evicted to stay within the memory budget, by reason: capacity (a live entry), expired (an expired entry reclaimed before a live one would have been).",
        );
        for (reason, n) in [
            ("capacity", cache.evictions),
            ("expired", cache.evictions_expired),
        ] {
            let _ = writeln!(out, "{CACHE_EVICTIONS}{{reason=\"{reason}\"}} {n}");
        }
        family(
            out,
            CLIENT_BYTES,
            "counter",
            "Bytes read from and written to memcached clients.",
        );
        for (direction, counter) in [("read", &self.bytes_read), ("written", &self.bytes_written)] {
            let n = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "{CLIENT_BYTES}{{direction=\"{direction}\"}} {n}");
        }
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters::new()
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text for `/metrics`: the recorder's metrics (if one is
/// installed), a server's counters, then the capacity counters.
pub fn render(
    recorder: Option<&PrometheusHandle>,
    counters: &Counters,
    cache: &CacheStats,
) -> String {
    if recorder.is_some() {
        PROCESS.collect();
    }
    let mut text = recorder.map(PrometheusHandle::render).unwrap_or_default();
    if !text.is_empty() && !text.ends_with("\n\n") {
        text.push('\n');
    }
    counters.render(cache, &mut text);
    text.push('\n');
    render_capacity(&mut text);
    text
}

/// The gauges of local keys' cache (`[[prefix]]` with `policy = "local"`).
pub fn render_local(local: &CacheStats, out: &mut String) {
    let gauges = [
        (
            LOCAL_CACHE_ITEMS,
            "gauge",
            "Local keys in memory.",
            local.items,
        ),
        (
            LOCAL_CACHE_BYTES,
            "gauge",
            "Bytes local keys are charged against their budget.",
            local.bytes,
        ),
        (
            LOCAL_CACHE_LIMIT_BYTES,
            "gauge",
            "Local keys' memory budget (local_memory_limit).",
            local.limit_bytes,
        ),
        (
            LOCAL_CACHE_EVICTIONS,
            "counter",
            "Local keys evicted to stay within their budget.",
            local.evictions,
        ),
    ];
    for (name, kind, help, value) in gauges {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    out.push('\n');
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
    CapacityCounter::new("TransactWriteItems"),
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
        metrics::histogram!(DYNAMODB_CALL_CAPACITY, "operation" => counter.operation).record(units);
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
        family(out, name, "counter", help);
        for c in counters {
            let units = c.milli_units.load(Ordering::Relaxed) as f64 / 1000.0;
            let _ = writeln!(out, "{name}{{operation=\"{}\"}} {units}", c.operation);
        }
        out.push('\n');
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

    #[test]
    fn one_count_feeds_stats_and_prometheus_and_reset_is_for_stats_only() {
        let counters = Counters::new();
        counters.record(Event::CacheHits);
        counters.record(Event::GetHits);
        counters.record(Event::GetHits);
        let stats: std::collections::HashMap<_, _> = counters.stats().into_iter().collect();
        assert_eq!(stats["get_hits"], 2);
        assert!(
            !stats.contains_key("cache_hits"),
            "dynacache's own events stay out of stats"
        );
        let mut text = String::new();
        counters.render(&CacheStats::default(), &mut text);
        assert!(text.contains(&format!("{CACHE_HITS} 1\n")), "{text}");
        counters.reset();
        counters.record(Event::CacheHits);
        let stats: std::collections::HashMap<_, _> = counters.stats().into_iter().collect();
        assert_eq!(stats["get_hits"], 0);
        let mut text = String::new();
        counters.render(&CacheStats::default(), &mut text);
        assert!(
            text.contains(&format!("{CACHE_HITS} 2\n")),
            "never goes down: {text}"
        );
    }

    #[test]
    fn command_names_are_the_protocol_names() {
        let names: Vec<&str> = CommandKind::VARIANTS.iter().map(|k| k.name()).collect();
        for name in [
            "get",
            "gats",
            "flush_all",
            "cache_memlimit",
            "mg",
            "invalid",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
    }
}
