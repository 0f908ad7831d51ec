//! The engine: runs one [`Command`] against the cache and the store and
//! encodes its replies. This is where the cached-DB contract lives:
//!
//! - every change goes through one write path (`write.rs`): DynamoDB first,
//!   conditioned on the version it replaces, then the cache; a failed write
//!   drops the key from the cache, and one whose outcome is unknown is
//!   fenced so that it cannot land later;
//! - a get is served from memory on a hit; a miss reads the store and fills
//!   the cache; a store error is `SERVER_ERROR`, never a miss;
//! - an expired or flushed item is never served, from memory or the store.
//!
//! Within one process the engine also keeps the cache equal to the store
//! under concurrency (writes are serialized per key; a read that was in
//! flight when a write completed never fills the cache), coalesces concurrent
//! misses of one key into one store read, fetches the misses of a multi-get
//! in one batch, and re-reads entries older than `max_local_age` so writes
//! made through other sidecars are seen in time.
//!
//! Files: `write.rs` (the write path), `read.rs` (get, gat), `meta.rs`
//! (meta commands), `admin.rs` (flush_all, stats, settings), `clock.rs`.

mod admin;
mod clock;
mod meta;
mod read;
mod write;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::cache::{Entry, Fill, ItemCache};
use crate::fleet::{Fleet, LocalCache};
use crate::hotkeys::HotKeys;
use crate::metrics::{CommandKind, Counters, Event, Outcome};
use crate::output::Output;
use crate::protocol::{Command, Reply, StoreMode};
use crate::store::{Item, Store, StoreError, View};

pub use clock::{VersionClock, expiry, unix_micros, unix_now, version_at};

use read::Flight;
use write::{Done, Doubt, KeyLocks, Op, Refusal};

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
    /// The largest item (key, value and store overhead), for bounding what
    /// a multi-get reads ahead.
    pub item_size_max: usize,
    /// Keys tracked as the most read and the most written (`stats hotkeys`,
    /// `/hotkeys`); 0 = none.
    pub hot_keys: usize,
    /// Policies by key prefix, first match wins (`[[prefix]]`); a key no
    /// rule matches is durable, with no expiry cap.
    pub rules: Vec<KeyRule>,
    /// The memory budget of local keys' cache (apart from the cache's).
    pub local_memory_limit: u64,
    /// Whether a read that finds nothing is remembered (a negative entry,
    /// for `max_local_age` at most, in the cache's budget).
    pub negative_caching: bool,
}

/// What happens to keys that begin with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    pub prefix: Box<[u8]>,
    /// Kept in this sidecar's memory only, never written to DynamoDB (a page
    /// cache, as memcached held it); else durable.
    pub local: bool,
    /// Writes asking for a later expiry, or none, get this from now.
    pub max_ttl: Option<Duration>,
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
            item_size_max: 1024 * 1024,
            hot_keys: 32,
            rules: Vec::new(),
            local_memory_limit: 64 << 20,
            negative_caching: true,
        }
    }
}

pub struct Engine<S> {
    cache: ItemCache,
    /// The keys of local prefixes ([`KeyRule::local`]), when any rule has one.
    local: Option<ItemCache>,
    store: Arc<S>,
    /// Fleet mode: the peers whose memory this engine keeps coherent.
    fleet: std::sync::OnceLock<Arc<Fleet<S>>>,
    options: EngineOptions,
    versions: VersionClock,
    counters: Counters,
    hot: HotKeys,
    /// Store reads in flight, by key: later misses of the key wait for them.
    reads: DashMap<Box<[u8]>, Arc<Flight>>,
    writes: KeyLocks,
    /// Keys whose last write's outcome is unknown (see `write.rs`).
    doubts: DashMap<Box<[u8]>, Doubt>,
    doubt_added: Notify,
    /// Items with a version below this are flushed once its time has come
    /// (`flush_all`, here or seen in the store's marker); 0 = none.
    flushed_before: AtomicU64,
    /// DynamoDB is known to be failing (a call failed with an outage error
    /// and nothing has succeeded since): aged entries are served at once
    /// where `stale_on_error` allows, and the upkeep probes every second.
    store_down: std::sync::atomic::AtomicBool,
    /// The origin of `filled_at_ms` stamps.
    epoch: Instant,
    started: std::time::SystemTime,
}

impl<S: Store> Engine<S> {
    pub fn new(cache: ItemCache, store: S) -> Engine<S> {
        Engine::with_options(cache, store, EngineOptions::default())
    }

    pub fn with_options(cache: ItemCache, store: S, options: EngineOptions) -> Engine<S> {
        let local = options
            .rules
            .iter()
            .any(|r| r.local)
            .then(|| ItemCache::new(options.local_memory_limit, ItemCache::default_shards()));
        Engine {
            cache,
            local,
            store: Arc::new(store),
            fleet: std::sync::OnceLock::new(),
            hot: HotKeys::new(options.hot_keys),
            options,
            versions: VersionClock::new(),
            counters: Counters::new(),
            reads: DashMap::new(),
            writes: KeyLocks::default(),
            doubts: DashMap::new(),
            doubt_added: Notify::new(),
            flushed_before: AtomicU64::new(0),
            store_down: std::sync::atomic::AtomicBool::new(false),
            epoch: Instant::now(),
            started: std::time::SystemTime::now(),
        }
    }

    pub fn cache(&self) -> &ItemCache {
        &self.cache
    }

    /// The cache of local keys, when some prefix is local.
    pub fn local_cache(&self) -> Option<&ItemCache> {
        self.local.as_ref()
    }

    /// The rule for `key`: the first whose prefix it begins with (none for
    /// dynacache's own keys: the flush marker is always durable).
    fn rule(&self, key: &[u8]) -> Option<&KeyRule> {
        let mut rules = self.options.rules.iter();
        rules
            .find(|r| key.starts_with(&r.prefix))
            .filter(|_| !key.starts_with(crate::store::RESERVED_PREFIX))
    }

    /// The cache that holds `key`: the local keys' own, or the cache.
    fn cache_for(&self, key: &[u8]) -> &ItemCache {
        match &self.local {
            Some(local) if self.is_local(key) => local,
            _ => &self.cache,
        }
    }

    /// Whether `key` is kept in memory only, never in DynamoDB.
    fn is_local(&self, key: &[u8]) -> bool {
        self.local.is_some() && self.rule(key).is_some_and(|r| r.local)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Fleet mode: a fleet on this engine's store and clock (see
    /// `crate::fleet`). Start it with [`Fleet::start`], giving it this engine.
    pub fn join_fleet(&self, options: crate::fleet::FleetOptions) -> Arc<Fleet<S>> {
        let fleet = Fleet::new(options, self.store.clone(), self.epoch);
        let _ = self.fleet.set(fleet.clone());
        fleet
    }

    /// The fleet, in fleet mode.
    pub fn fleet(&self) -> Option<&Arc<Fleet<S>>> {
        self.fleet.get()
    }

    /// The keys read and written most (`stats hotkeys`, `/hotkeys`).
    pub fn hot_keys(&self) -> &HotKeys {
        &self.hot
    }

    /// One key asked for by a retrieval: counted for `stats` and hot keys.
    fn count_read(&self, key: &[u8]) {
        self.counters.record(Event::CmdGet);
        self.hot.read(key);
    }

    /// A key served from memory: a cache hit, or a local key's, counted apart.
    fn count_hit(&self, key: &[u8]) {
        self.counters.record(match self.is_local(key) {
            true => Event::LocalHits,
            false => Event::CacheHits,
        });
    }

    /// The coherence epoch (fleet mode), captured when a read or write
    /// begins: its result fills the cache only if it is still current.
    fn epoch_now(&self) -> u64 {
        self.fleet.get().map_or(0, |f| f.epoch())
    }

    /// What this engine counted (for `stats`, `/metrics` and tests).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Runs `cmd` now (wall clock) and appends its replies to `out`.
    pub async fn execute(&self, cmd: Command<'_>, out: &mut Output<'_>) -> Flow {
        self.execute_at(cmd, out, unix_now()).await
    }

    /// Runs `cmd` as if the time were `now` (Unix seconds).
    pub async fn execute_at(&self, cmd: Command<'_>, out: &mut Output<'_>, now: u32) -> Flow {
        let kind = kind(&cmd);
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
                self.counters.record(Event::CmdSet);
                let (mode, cas) = match mode {
                    StoreMode::Cas(unique) => (StoreMode::Set, Some(unique)),
                    other => (other, None),
                };
                let op = Op::Store {
                    mode,
                    flags,
                    expires_at: expiry(exptime, view.now),
                    data,
                    cas,
                };
                let answer = self.write(key, op, view).await.map(|done| match done {
                    Done::Written(_) => (Outcome::Stored, Reply::Stored),
                    Done::Refused(Refusal::Exists, _) => (Outcome::NotStored, Reply::Exists),
                    Done::Refused(Refusal::NotFound, _) => (Outcome::NotFound, Reply::NotFound),
                    Done::Refused(..) => (Outcome::NotStored, Reply::NotStored),
                });
                finish(out.buf(), noreply, answer)
            }
            Command::Delete { key, noreply } => {
                let answer = self
                    .write(key, Op::Delete { cas: None }, view)
                    .await
                    .map(|done| match done {
                        Done::Written(_) => (Outcome::Deleted, Reply::Deleted),
                        Done::Refused(..) => (Outcome::NotFound, Reply::NotFound),
                    });
                finish(out.buf(), noreply, answer)
            }
            Command::Touch {
                key,
                exptime,
                noreply,
            } => {
                self.counters.record(Event::CmdTouch);
                let op = Op::Touch {
                    expires_at: expiry(exptime, view.now),
                };
                let answer = self.write(key, op, view).await.map(|done| match done {
                    Done::Written(_) => (Outcome::Touched, Reply::Touched),
                    Done::Refused(..) => (Outcome::NotFound, Reply::NotFound),
                });
                finish(out.buf(), noreply, answer)
            }
            Command::Arith {
                incr,
                key,
                delta,
                noreply,
            } => {
                let op = Op::Arith {
                    incr,
                    delta,
                    cas: None,
                    expires_at: None,
                };
                let answer = self.write(key, op, view).await.map(|done| match done {
                    Done::Written(item) => {
                        let n = write::parse_counter(&item.value).expect("written as a number");
                        (Outcome::Ok, Reply::Number(n))
                    }
                    Done::Refused(Refusal::NotANumber, _) => (Outcome::ClientError, NON_NUMERIC),
                    Done::Refused(..) => (Outcome::NotFound, Reply::NotFound),
                });
                finish(out.buf(), noreply, answer)
            }
            Command::FlushAll { delay, noreply } => {
                let answer = self.flush_all(delay, now).await;
                finish(out.buf(), noreply, answer)
            }
            Command::Stats(group) => self.stats_reply(group, out.buf()),
            Command::Verbosity { noreply } => {
                finish(out.buf(), noreply, Ok((Outcome::Ok, Reply::Ok)))
            }
            Command::CacheMemlimit { megabytes, noreply } => {
                finish(out.buf(), noreply, Ok(self.cache_memlimit(megabytes)))
            }
            Command::Shutdown => {
                Reply::ShutdownRefused.encode(out.buf());
                Outcome::ClientError
            }
            Command::Meta(meta) => self.meta(meta, out, view).await,
            Command::MetaNoop => {
                Reply::MetaNoop.encode(out.buf());
                Outcome::Ok
            }
            Command::Version => {
                Reply::Version(VERSION).encode(out.buf());
                Outcome::Ok
            }
            Command::Quit => {
                self.counters.counted(kind, Outcome::Ok);
                return Flow::Close;
            }
        };
        self.counters.finished(kind, outcome, started);
        Flow::Continue
    }

    /// A storage request whose data was too large to accept. memcached drops
    /// the old value of a `set` that fails this way (a client that meant to
    /// replace it must not read it back), so the item is deleted from the
    /// store and the cache. Returns the error to answer if that failed.
    pub async fn reject_too_large(&self, mode: StoreMode, key: &[u8]) -> Option<StoreError> {
        self.counters.record(Event::StoreTooLarge);
        self.counters
            .counted(store_kind(mode), Outcome::ServerError);
        if mode != StoreMode::Set || self.check_key(key).is_err() {
            return None;
        }
        self.write(key, Op::Delete { cas: None }, self.view(unix_now()))
            .await
            .err()
    }

    /// Counts a request that did not parse.
    pub fn count_invalid(&self) {
        self.counters
            .counted(CommandKind::Invalid, Outcome::ClientError);
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

    /// Caches what a write just made the store hold (a key the application
    /// writes starts in the cache's main queue, [`Fill::Write`]); an item
    /// that is not live leaves the key known absent.
    fn fill(&self, key: &[u8], item: &Item, view: View, epoch: u64) {
        self.fill_at(key, item, view, self.now_ms(), epoch, Fill::Write);
    }

    /// Caches `item`, read or written at `now_ms` (see [`Engine::fill`]).
    fn fill_at(&self, key: &[u8], item: &Item, view: View, now_ms: u64, epoch: u64, how: Fill) {
        if !self.observed(key, Some(item)) {
            self.cache.remove(key);
            return;
        }
        if !item.is_live(view) {
            // Expired, a tombstone, or flushed: the key holds nothing live.
            self.fill_absent(key, view, now_ms, epoch);
            return;
        }
        let entry = Entry::new(key, &item.value, item.flags, item.expires_at, item.version)
            .chunks(item.chunks)
            .filled_at(now_ms);
        if !self.fill_entry(key, entry, view, epoch, how) {
            self.counters.record(Event::StoreNoMemory);
        }
    }

    /// Remembers that the store holds nothing live for `key` (a negative
    /// entry, read at `now_ms`), if negative caching is on: a get within
    /// `max_local_age` answers a miss without asking DynamoDB. Any write of
    /// the key replaces it; in fleet mode a peer's write removes it, as it
    /// removes any copy. The caller has checked that no write of unknown
    /// outcome keeps the key in doubt. Filled as a read whatever made it
    /// (a delete, a refused write): that the application removed a key says
    /// nothing of its reading it again, so a sweep of deletes passes through
    /// the small queue and never pushes out the keys read often.
    fn fill_absent(&self, key: &[u8], view: View, now_ms: u64, epoch: u64) {
        if !self.options.negative_caching || self.is_local(key) {
            self.cache.remove(key);
            return;
        }
        let entry = Entry::absent(key, 0).filled_at(now_ms);
        self.fill_entry(key, entry, view, epoch, Fill::Read);
    }

    /// Puts `entry` in the cache, unless fleet mode forbids it. Returns
    /// false when it is larger than a shard's budget (not cached).
    fn fill_entry(&self, key: &[u8], entry: Entry, view: View, epoch: u64, how: Fill) -> bool {
        // Fleet mode: only while coherent, and only from a read or write
        // that began in this coherence epoch (checked again after the
        // insert, which a regain may have raced: its clear comes after).
        let current = |f: &Arc<Fleet<S>>| f.coherent(self.now_ms()) && f.epoch() == epoch;
        if self.fleet.get().is_some_and(|f| !current(f)) {
            // Nor may an older copy stay (one filled since by a read that
            // did not see this outcome).
            self.cache.remove(key);
            return true;
        }
        let cached = self.cache.insert_at(entry, how, view.now);
        if self.fleet.get().is_some_and(|f| f.epoch() != epoch) {
            self.cache.remove(key);
        }
        cached
    }

    /// Keys of a multi-get looked up and read from the store at a time.
    fn get_window(&self) -> usize {
        (READ_AHEAD / self.options.item_size_max.max(1)).clamp(1, 100)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Notes what a store call (a read or a write) says about DynamoDB's health.
    fn note_store<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.store_down.store(false, Ordering::Relaxed),
            Err(e) if e.is_outage() => self.store_down.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
    }

    /// Whether DynamoDB is known to be failing now.
    pub fn store_down(&self) -> bool {
        self.store_down.load(Ordering::Relaxed)
    }
}

/// Room for a value reply's line (and a meta reply's flags) besides its data.
const REPLY_HEAD: usize = 512;

/// What a multi-get may hold of values read ahead of writing them: its
/// misses are read this many bytes' worth of items at a time (at most 100
/// keys, DynamoDB's BatchGetItem limit): 4 keys a call with the default
/// 1 MiB `item_size_max`, 10 at 400 KiB, 100 with items up to 40 KiB.
const READ_AHEAD: usize = 4 << 20;

const NON_NUMERIC: Reply<'static> =
    Reply::ClientError("cannot increment or decrement non-numeric value");

/// The kind of request `cmd` is, for counting.
fn kind(cmd: &Command<'_>) -> CommandKind {
    match cmd {
        Command::Get {
            cas: false,
            touch: None,
            ..
        } => CommandKind::Get,
        Command::Get {
            cas: true,
            touch: None,
            ..
        } => CommandKind::Gets,
        Command::Get {
            cas: false,
            touch: Some(_),
            ..
        } => CommandKind::Gat,
        Command::Get {
            cas: true,
            touch: Some(_),
            ..
        } => CommandKind::Gats,
        Command::Store { mode, .. } => store_kind(*mode),
        Command::Delete { .. } => CommandKind::Delete,
        Command::Touch { .. } => CommandKind::Touch,
        Command::Arith { incr: true, .. } => CommandKind::Incr,
        Command::Arith { incr: false, .. } => CommandKind::Decr,
        Command::FlushAll { .. } => CommandKind::FlushAll,
        Command::Stats(_) => CommandKind::Stats,
        Command::Verbosity { .. } => CommandKind::Verbosity,
        Command::CacheMemlimit { .. } => CommandKind::CacheMemlimit,
        Command::Shutdown => CommandKind::Shutdown,
        Command::MetaNoop => CommandKind::Mn,
        Command::Meta(meta) => match meta.cmd {
            crate::protocol::MetaCmd::Get => CommandKind::Mg,
            crate::protocol::MetaCmd::Set => CommandKind::Ms,
            crate::protocol::MetaCmd::Delete => CommandKind::Md,
            crate::protocol::MetaCmd::Arith => CommandKind::Ma,
            crate::protocol::MetaCmd::Debug => CommandKind::Me,
        },
        Command::Version => CommandKind::Version,
        Command::Quit => CommandKind::Quit,
    }
}

fn store_kind(mode: StoreMode) -> CommandKind {
    match mode {
        StoreMode::Set => CommandKind::Set,
        StoreMode::Add => CommandKind::Add,
        StoreMode::Replace => CommandKind::Replace,
        StoreMode::Append => CommandKind::Append,
        StoreMode::Prepend => CommandKind::Prepend,
        StoreMode::Cas(_) => CommandKind::Cas,
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

/// What the fleet does to this engine's memory (see `crate::fleet`).
impl<S: Store> LocalCache for Engine<S> {
    fn invalidate(&self, key: &[u8], doubt: Option<(Option<u64>, u64)>) {
        if let Some((expected, ours)) = doubt {
            self.doubt_remote(key, expected, ours);
        } else {
            // A write that landed: any doubt a peer told us of is over.
            self.doubts.remove_if(key, |_, d| d.is_remote());
        }
        // Writes of the key in flight here will not cache their result...
        self.writes.invalidated(key);
        // ...nor will reads in flight, nor later gets that would have
        // joined them.
        self.reads.remove(key);
        self.cache_for(key).remove(key);
    }

    fn flush(&self, before: u64) {
        self.apply_flush(before);
    }

    fn regain(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            // Reads in flight began before: no get may join them now.
            self.reads.clear();
            self.cache.clear();
            if let Some(local) = &self.local {
                local.clear();
            }
            match self.refresh_flush_marker().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the flush_all marker: not serving from memory yet");
                    false
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
