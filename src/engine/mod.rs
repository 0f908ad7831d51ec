//! The engine: runs one [`Command`] against the cache and the store and
//! encodes its replies. This is where the cached-DB contract lives:
//!
//! - writes go to the store first; the cache changes only after the store
//!   accepted them, and a failed write drops the key from the cache (the
//!   store's state is then unknown, so the next read must ask it);
//! - a get is served from memory on a hit; a miss reads the store and fills
//!   the cache; a store error is `SERVER_ERROR`, never a miss;
//! - an expired or flushed item is never served, from memory or the store;
//! - commands that read, modify and write (`cas`, `append`, `incr`, ...) are
//!   conditional writes in the store, atomic across every sidecar.
//!
//! Within one process the engine also keeps the cache equal to the store
//! under concurrency (writes are serialized per key; a read that was in
//! flight when a write completed never fills the cache), coalesces concurrent
//! misses of one key into one store read, fetches the misses of a multi-get
//! in one batch, and re-reads entries older than `max_local_age` so writes
//! made through other sidecars are seen in time.
//!
//! Files: `read.rs` (get, gat), `write.rs` (storage, delete, touch, incr),
//! `admin.rs` (flush_all, stats, settings), `clock.rs`, `stats.rs`.

mod admin;
mod clock;
mod meta;
mod read;
mod stats;
mod write;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;

use crate::cache::{Entry, ItemCache};
use crate::metrics::{CommandMetrics, Outcome};
use crate::protocol::{Command, Reply, StoreMode};
use crate::store::{Store, StoreError, StoredItem, View};

pub use clock::{VersionClock, expiry, unix_micros, unix_now, version_at};
pub use stats::Stats;

use read::Flight;
use write::KeyLocks;

/// The memcached protocol level dynacache answers `version` with, then its
/// own version: libmemcached-based clients parse `major.minor.patch` and
/// stop at the first other character, so they read memcached 1.6.
pub const VERSION: &str = concat!("1.6.0-dynacache-", env!("CARGO_PKG_VERSION"));

/// What the connection does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// `quit`: write what is buffered, then close.
    Close,
}

/// Tuning of the engine's behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// A cached entry older than this is re-read from the store before it is
    /// served, bounding how long a write through another sidecar goes
    /// unseen; also how often other sidecars' `flush_all` is looked for
    /// (see [`EngineOptions::flush_poll_period`]).
    /// Zero: never re-read (a single sidecar per table).
    pub max_local_age: Duration,
    /// When that re-read fails, serve the old copy instead of an error
    /// (hits keep working through a DynamoDB outage).
    pub stale_on_error: bool,
    /// Whether `flush_all` is allowed (memcached's `-F` turns it off).
    pub flush_enabled: bool,
    /// `stats settings` lines describing the configuration.
    pub settings_report: Vec<(&'static str, String)>,
}

/// The shortest period between two reads of the `flush_all` marker: one
/// strongly consistent GetItem per second per sidecar at most, however small
/// `max_local_age` is (at 1 ms it would be a thousand a second, each billed).
pub const MIN_FLUSH_POLL: Duration = Duration::from_secs(1);

impl EngineOptions {
    /// How often the `flush_all` marker is read: `max_local_age`, but not
    /// more often than [`MIN_FLUSH_POLL`], and every 2 s when it is zero. A
    /// flush through another sidecar is honoured here within this period.
    pub fn flush_poll_period(&self) -> Duration {
        match self.max_local_age {
            d if d.is_zero() => Duration::from_secs(2),
            d => d.max(MIN_FLUSH_POLL),
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_local_age: Duration::from_secs(2),
            stale_on_error: true,
            flush_enabled: true,
            settings_report: Vec::new(),
        }
    }
}

pub struct Engine<S> {
    cache: ItemCache,
    store: S,
    options: EngineOptions,
    versions: VersionClock,
    metrics: CommandMetrics,
    stats: Stats,
    /// Store reads in flight, by key: later misses of the key wait for them.
    reads: DashMap<Box<[u8]>, Arc<Flight>>,
    writes: KeyLocks,
    /// Items with a version below this are flushed once its time has come
    /// (`flush_all`, here or seen in the store's marker); 0 = none.
    flushed_before: AtomicU64,
    /// Open client connections.
    connections: AtomicU64,
    /// The origin of `filled_at_ms` stamps.
    epoch: Instant,
    started: std::time::SystemTime,
}

impl<S: Store> Engine<S> {
    pub fn new(cache: ItemCache, store: S) -> Engine<S> {
        Engine::with_options(cache, store, EngineOptions::default())
    }

    pub fn with_options(cache: ItemCache, store: S, options: EngineOptions) -> Engine<S> {
        Engine {
            cache,
            store,
            options,
            versions: VersionClock::new(),
            metrics: CommandMetrics::new(),
            stats: Stats::default(),
            reads: DashMap::new(),
            writes: KeyLocks::default(),
            flushed_before: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            epoch: Instant::now(),
            started: std::time::SystemTime::now(),
        }
    }

    pub fn cache(&self) -> &ItemCache {
        &self.cache
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn metrics(&self) -> &CommandMetrics {
        &self.metrics
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Runs `cmd` now (wall clock) and appends its replies to `out`.
    pub async fn execute(&self, cmd: Command<'_>, out: &mut BytesMut) -> Flow {
        self.execute_at(cmd, out, unix_now()).await
    }

    /// Runs `cmd` as if the time were `now` (Unix seconds).
    pub async fn execute_at(&self, cmd: Command<'_>, out: &mut BytesMut, now: u32) -> Flow {
        let name = cmd.name();
        let started = Instant::now();
        let view = self.view(now);
        let outcome = match cmd {
            Command::Get { keys, cas, touch } => match touch {
                None => self.get(keys, cas, out, view).await,
                Some(exptime) => self.get_and_touch(keys, cas, exptime, out, view).await,
            },
            Command::Store {
                mode,
                key,
                flags,
                exptime,
                data,
                noreply,
            } => {
                let result = self.store_item(mode, key, flags, exptime, data, view).await;
                finish(out, noreply, result)
            }
            Command::Delete { key, noreply } => {
                let result = self.delete(key, view).await;
                finish(out, noreply, result)
            }
            Command::Touch {
                key,
                exptime,
                noreply,
            } => {
                let result = self.touch(key, exptime, view).await;
                finish(out, noreply, result)
            }
            Command::Arith {
                incr,
                key,
                delta,
                noreply,
            } => {
                let result = self.arith(incr, key, delta, view).await;
                finish(out, noreply, result)
            }
            Command::FlushAll { delay, noreply } => {
                let result = self.flush_all(delay, now).await;
                finish(out, noreply, result)
            }
            Command::Stats(group) => self.stats_reply(group, out),
            Command::Verbosity { noreply } => finish(out, noreply, Ok((Outcome::Ok, Reply::Ok))),
            Command::CacheMemlimit { megabytes, noreply } => {
                finish(out, noreply, Ok(self.cache_memlimit(megabytes)))
            }
            Command::Shutdown => {
                Reply::Line("ERROR: shutdown not enabled").encode(out);
                Outcome::ClientError
            }
            Command::Meta(meta) => self.meta(meta, out, view).await,
            Command::MetaNoop => {
                Reply::Line("MN").encode(out);
                Outcome::Ok
            }
            Command::Version => {
                Reply::Version(VERSION).encode(out);
                Outcome::Ok
            }
            Command::Quit => {
                self.metrics.command(name, Outcome::Ok);
                return Flow::Close;
            }
        };
        self.metrics.finished(name, outcome, started);
        Flow::Continue
    }

    /// A storage request whose data was too large to accept. memcached drops
    /// the old value of a `set` that fails this way (a client that meant to
    /// replace it must not read it back), so the item is deleted from the
    /// store and the cache. Returns the error to answer if that failed.
    pub async fn reject_too_large(&self, mode: StoreMode, key: &[u8]) -> Option<StoreError> {
        stats::bump(&self.stats.store_too_large);
        self.metrics.command(mode.name(), Outcome::ServerError);
        if mode != StoreMode::Set || self.store.check_key(key).is_err() {
            return None;
        }
        self.delete(key, self.view(unix_now())).await.err()
    }

    /// A client connected (for `stats` and metrics).
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        stats::bump(&self.stats.total_connections);
        self.metrics.connections.increment(1.0);
        self.metrics.connections_total.increment(1);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        self.metrics.connections.decrement(1.0);
    }

    /// Bytes a connection read and wrote (per batch, not per request).
    pub fn count_io(&self, read: usize, written: usize) {
        Stats::add(&self.stats.bytes_read, read as u64);
        Stats::add(&self.stats.bytes_written, written as u64);
    }

    /// Counts a request that did not parse.
    pub fn count_invalid(&self) {
        self.metrics.command("invalid", Outcome::ClientError);
    }

    /// What is live for a request at `now`: a flush counts once its time has come.
    fn view(&self, now: u32) -> View {
        let flushed_before = self.flushed_before.load(Ordering::Relaxed);
        let in_effect = flushed_before != 0 && version_at(unix_micros()) >= flushed_before;
        View {
            now,
            flushed_before: if in_effect { flushed_before } else { 0 },
        }
    }

    /// Caches what the store just confirmed it holds; an item that is not
    /// live instead removes any cached copy.
    fn fill(&self, key: &[u8], item: &StoredItem, view: View) {
        self.fill_at(key, item, view, self.now_ms());
    }

    fn fill_at(&self, key: &[u8], item: &StoredItem, view: View, now_ms: u64) {
        if item.is_live(view) {
            let entry = Entry::new(key, &item.value, item.flags, item.expires_at, item.version);
            self.cache.insert(entry.filled_at(now_ms));
        } else {
            self.cache.remove(key);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// A command's result: its reply, or the store error to answer instead.
type Answer = Result<(Outcome, Reply<'static>), StoreError>;

/// Encodes a command's reply (nothing under `noreply`, errors included, as
/// memcached does) and returns its outcome.
fn finish(out: &mut BytesMut, noreply: bool, answer: Answer) -> Outcome {
    match answer {
        Ok((outcome, reply)) => {
            if !noreply {
                reply.encode(out);
            }
            outcome
        }
        Err(e) if noreply => outcome_of(&e),
        Err(e) => error_reply(out, &e),
    }
}

fn value_reply(out: &mut BytesMut, key: &[u8], flags: u32, data: &[u8], version: u64, cas: bool) {
    Reply::Value {
        key,
        flags,
        data,
        cas: cas.then_some(version),
    }
    .encode(out);
}

fn outcome_of(e: &StoreError) -> Outcome {
    match e {
        StoreError::InvalidKey(_) => Outcome::ClientError,
        _ => Outcome::ServerError,
    }
}

/// Encodes the reply for a store error: a key the table cannot hold is the
/// client's error; anything else is the server's.
fn error_reply(out: &mut BytesMut, e: &StoreError) -> Outcome {
    match e {
        StoreError::InvalidKey(msg) => Reply::ClientError(msg).encode(out),
        other => Reply::ServerError(&other.to_string()).encode(out),
    }
    outcome_of(e)
}

#[cfg(test)]
mod tests;
