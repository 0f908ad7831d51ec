//! The engine: runs one [`Command`] against the cache and the store and
//! encodes its replies. This is where the cached-DB contract lives:
//!
//! - writes go to the store first; the cache changes only after the store
//!   accepted them, and a failed write drops the key from the cache (the
//!   store's state is then unknown, so the next read must ask it);
//! - a get is served from memory on a hit; a miss reads the store and fills
//!   the cache; a store error is `SERVER_ERROR`, never a miss;
//! - an expired item is never served, from memory or from the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use crate::cache::{Entry, ItemCache};
use crate::metrics::{CommandMetrics, Outcome};
use crate::protocol::{Command, Keys, Reply, StoreMode};
use crate::store::{PutCondition, Store, StoreError, StoredItem};

/// The memcached protocol level dynacache answers `version` with, then its own.
pub const VERSION: &str = concat!("1.6.0-dynacache-", env!("CARGO_PKG_VERSION"));

/// Exptimes up to this many seconds are relative; larger ones are Unix times.
const RELATIVE_EXPTIME_MAX: i64 = 60 * 60 * 24 * 30;

/// What the connection does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// `quit`: write what is buffered, then close.
    Close,
}

pub struct Engine<S> {
    cache: ItemCache,
    store: S,
    versions: VersionClock,
    metrics: CommandMetrics,
}

impl<S: Store> Engine<S> {
    pub fn new(cache: ItemCache, store: S) -> Engine<S> {
        Engine {
            cache,
            store,
            versions: VersionClock::new(),
            metrics: CommandMetrics::new(),
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

    /// Runs `cmd` now (wall clock) and appends its replies to `out`.
    pub async fn execute(&self, cmd: Command<'_>, out: &mut BytesMut) -> Flow {
        self.execute_at(cmd, out, unix_now()).await
    }

    /// Runs `cmd` as if the time were `now` (Unix seconds).
    pub async fn execute_at(&self, cmd: Command<'_>, out: &mut BytesMut, now: u32) -> Flow {
        let name = cmd.name();
        let started = Instant::now();
        let (outcome, flow) = match cmd {
            Command::Get { keys, cas } => (self.get(keys, cas, out, now).await, Flow::Continue),
            Command::Store {
                mode,
                key,
                flags,
                exptime,
                data,
                noreply,
            } => {
                let result = self.store_item(mode, key, flags, exptime, data, now).await;
                (finish(out, noreply, result), Flow::Continue)
            }
            Command::Delete { key, noreply } => {
                let result = self.delete(key, now).await;
                (finish(out, noreply, result), Flow::Continue)
            }
            Command::Touch {
                key,
                exptime,
                noreply,
            } => {
                let result = self.touch(key, exptime, now).await;
                (finish(out, noreply, result), Flow::Continue)
            }
            Command::Version => {
                Reply::Version(VERSION).encode(out);
                (Outcome::Ok, Flow::Continue)
            }
            Command::Quit => (Outcome::Ok, Flow::Close),
        };
        self.metrics.command(name, outcome);
        self.metrics.duration(name, started);
        flow
    }

    /// A storage request whose data was too large to accept: memcached
    /// drops the old value of a failed `set`, so the cached copy goes too
    /// (the store keeps its item, and the next read returns it).
    pub fn reject_too_large(&self, mode: StoreMode, key: &[u8]) {
        if mode == StoreMode::Set {
            self.cache.remove(key);
        }
        self.metrics.command(mode.name(), Outcome::ServerError);
    }

    /// Counts a request that did not parse.
    pub fn count_invalid(&self) {
        self.metrics.command("invalid", Outcome::ClientError);
    }

    async fn get(&self, keys: Keys<'_>, cas: bool, out: &mut BytesMut, now: u32) -> Outcome {
        // Refuse the whole request before answering any of it.
        for key in keys.iter() {
            if let Err(e) = self.store.check_key(key) {
                return error_reply(out, &e);
            }
        }
        let start = out.len();
        let mut all_hit = true;
        for key in keys.iter() {
            if let Some(entry) = self.cache.get(key, now) {
                self.metrics.hits.increment(1);
                value_reply(out, key, entry.flags, entry.value(), entry.version, cas);
                continue;
            }
            self.metrics.misses.increment(1);
            match self.store.get(key, now).await {
                Ok(Some(item)) => {
                    value_reply(out, key, item.flags, &item.value, item.version, cas);
                    self.fill(key, &item, now);
                }
                Ok(None) => all_hit = false,
                Err(e) => {
                    // Never a partial answer that reads as a miss.
                    out.truncate(start);
                    return error_reply(out, &e);
                }
            }
        }
        Reply::End.encode(out);
        if all_hit { Outcome::Hit } else { Outcome::Miss }
    }

    async fn store_item(
        &self,
        mode: StoreMode,
        key: &[u8],
        flags: u32,
        exptime: i64,
        data: &[u8],
        now: u32,
    ) -> Answer {
        self.store.check_key(key)?;
        let item = StoredItem {
            value: data.to_vec(),
            flags,
            expires_at: expiry(exptime, now),
            version: self.versions.next(),
        };
        let condition = match mode {
            StoreMode::Set => PutCondition::Always,
            StoreMode::Add => PutCondition::Absent { now },
        };
        match self.store.put(key, &item, condition).await {
            Ok(true) => {
                self.fill(key, &item, now);
                Ok((Outcome::Stored, Reply::Stored))
            }
            Ok(false) => Ok((Outcome::NotStored, Reply::NotStored)),
            Err(e) => {
                self.cache.remove(key);
                Err(e)
            }
        }
    }

    async fn delete(&self, key: &[u8], now: u32) -> Answer {
        self.store.check_key(key)?;
        let result = self.store.delete(key, now).await;
        self.cache.remove(key);
        match result {
            Ok(true) => Ok((Outcome::Deleted, Reply::Deleted)),
            Ok(false) => Ok((Outcome::NotFound, Reply::NotFound)),
            Err(e) => Err(e),
        }
    }

    async fn touch(&self, key: &[u8], exptime: i64, now: u32) -> Answer {
        self.store.check_key(key)?;
        match self.store.touch(key, expiry(exptime, now), now).await {
            Ok(Some(item)) => {
                self.fill(key, &item, now);
                Ok((Outcome::Touched, Reply::Touched))
            }
            Ok(None) => {
                self.cache.remove(key);
                Ok((Outcome::NotFound, Reply::NotFound))
            }
            Err(e) => {
                self.cache.remove(key);
                Err(e)
            }
        }
    }

    /// Caches what the store just confirmed it holds; an expired item
    /// instead removes any cached copy.
    fn fill(&self, key: &[u8], item: &StoredItem, now: u32) {
        if item.is_expired(now) {
            self.cache.remove(key);
        } else {
            self.cache.insert(Entry::new(
                key,
                &item.value,
                item.flags,
                item.expires_at,
                item.version,
            ));
        }
    }
}

/// A write's result: its reply, or the store error to answer instead.
type Answer = Result<(Outcome, Reply<'static>), StoreError>;

/// Encodes a write's reply (nothing under `noreply`, errors included, as
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

/// memcached's exptime as an absolute expiry in Unix seconds: 0 = never; up
/// to 30 days relative to `now`; above that a Unix time; negative or past =
/// already expired (`now`, which TTL will sweep: TTL ignores times more than
/// five years old, so an item is never written with 1970 as its expiry).
pub fn expiry(exptime: i64, now: u32) -> u32 {
    let now64 = i64::from(now);
    let at = match exptime {
        0 => return 0,
        e if e < 0 => now64,
        e if e <= RELATIVE_EXPTIME_MAX => now64 + e,
        e => e.max(now64),
    };
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// The wall clock in whole Unix seconds, as memcached keeps it.
pub fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Item versions (cas uniques): microseconds since the epoch shifted left by
/// 10 bits, with a random per-process tag in those bits, strictly increasing
/// within the process. Unique across processes unless two pick the same tag
/// in the same microsecond; roughly ordered by time across hosts.
struct VersionClock {
    last: AtomicU64,
    tag: u64,
}

impl VersionClock {
    fn new() -> VersionClock {
        use std::hash::BuildHasher;
        let tag =
            std::collections::hash_map::RandomState::new().hash_one(std::process::id()) & 0x3ff;
        VersionClock {
            last: AtomicU64::new(0),
            tag,
        }
    }

    fn next(&self) -> u64 {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let candidate = (micros << 10) | self.tag;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = candidate.max(last + 1024);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Limits, Parsed, parse};
    use crate::store::MemoryStore;

    const NOW: u32 = 1_800_000_000;

    fn engine() -> Engine<MemoryStore> {
        Engine::new(ItemCache::new(1 << 20, 4), MemoryStore::new())
    }

    /// Runs every request in `input` at `now`, as a connection would.
    async fn run(engine: &Engine<MemoryStore>, input: &[u8], now: u32) -> String {
        let mut out = BytesMut::new();
        let mut rest = input;
        loop {
            match parse(rest, &Limits::default()) {
                Parsed::Request(cmd, len) => {
                    engine.execute_at(cmd, &mut out, now).await;
                    rest = &rest[len..];
                }
                Parsed::Incomplete => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn set_writes_store_then_cache() {
        let e = engine();
        assert_eq!(run(&e, b"set k 3 0 2\r\nhi\r\n", NOW).await, "STORED\r\n");
        let stored = e.store().raw(b"k").unwrap();
        assert_eq!(
            (stored.value.as_slice(), stored.flags, stored.expires_at),
            (&b"hi"[..], 3, 0)
        );
        let cached = e.cache().get(b"k", NOW).unwrap();
        assert_eq!(
            (cached.value(), cached.version),
            (&b"hi"[..], stored.version)
        );
        // The hit is served from memory: no store call.
        let calls = e.store().calls();
        assert_eq!(
            run(&e, b"get k\r\n", NOW).await,
            "VALUE k 3 2\r\nhi\r\nEND\r\n"
        );
        assert_eq!(e.store().calls(), calls);
    }

    #[tokio::test]
    async fn failed_set_answers_server_error_and_caches_nothing() {
        let e = engine();
        run(&e, b"set k 0 0 3\r\nold\r\n", NOW).await;
        e.store().set_failing(true);
        let reply = run(&e, b"set k 0 0 3\r\nnew\r\n", NOW).await;
        assert!(
            reply.starts_with("SERVER_ERROR dynamodb unreachable"),
            "{reply}"
        );
        assert!(
            e.cache().get(b"k", NOW).is_none(),
            "the cached copy is dropped"
        );
        assert_eq!(e.store().raw(b"k").unwrap().value, b"old");
    }

    #[tokio::test]
    async fn store_error_on_miss_is_server_error_not_a_miss() {
        let e = engine();
        run(&e, b"set hit 0 0 1\r\nx\r\n", NOW).await;
        e.store().set_failing(true);
        // A hit is still served from memory during an outage...
        assert_eq!(
            run(&e, b"get hit\r\n", NOW).await,
            "VALUE hit 0 1\r\nx\r\nEND\r\n"
        );
        // ...but a multi-get with a miss answers only the error, no partial values.
        let reply = run(&e, b"get hit other\r\n", NOW).await;
        assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
        assert!(
            !reply.contains("VALUE") && !reply.contains("END"),
            "{reply}"
        );
    }

    #[tokio::test]
    async fn miss_fills_from_store() {
        let e = engine();
        let item = StoredItem {
            value: b"from db".to_vec(),
            flags: 1,
            expires_at: 0,
            version: 77,
        };
        e.store().insert_raw(b"k", item);
        assert_eq!(
            run(&e, b"gets k\r\n", NOW).await,
            "VALUE k 1 7 77\r\nfrom db\r\nEND\r\n"
        );
        assert_eq!(e.cache().get(b"k", NOW).unwrap().version, 77);
    }

    #[tokio::test]
    async fn expired_items_are_never_served() {
        let e = engine();
        // Expired in the store but not yet deleted (TTL is lazy).
        let item = StoredItem {
            value: b"stale".to_vec(),
            flags: 0,
            expires_at: NOW - 1,
            version: 1,
        };
        e.store().insert_raw(b"old", item);
        assert_eq!(run(&e, b"get old\r\n", NOW).await, "END\r\n");
        // Expired in memory.
        run(&e, b"set k 0 10 1\r\nx\r\n", NOW).await;
        assert_eq!(
            run(&e, b"get k\r\n", NOW + 9).await,
            "VALUE k 0 1\r\nx\r\nEND\r\n"
        );
        assert_eq!(run(&e, b"get k\r\n", NOW + 10).await, "END\r\n");
    }

    #[tokio::test]
    async fn add_only_when_absent_or_expired() {
        let e = engine();
        assert_eq!(run(&e, b"add k 0 5 1\r\na\r\n", NOW).await, "STORED\r\n");
        assert_eq!(
            run(&e, b"add k 0 0 1\r\nb\r\n", NOW).await,
            "NOT_STORED\r\n"
        );
        assert_eq!(
            run(&e, b"add k 0 0 1\r\nc\r\n", NOW + 5).await,
            "STORED\r\n"
        );
        assert_eq!(e.store().raw(b"k").unwrap().value, b"c");
    }

    #[tokio::test]
    async fn delete_and_touch() {
        let e = engine();
        run(&e, b"set k 0 0 1\r\nx\r\n", NOW).await;
        assert_eq!(run(&e, b"touch k 100\r\n", NOW).await, "TOUCHED\r\n");
        assert_eq!(e.store().raw(b"k").unwrap().expires_at, NOW + 100);
        assert_eq!(e.cache().get(b"k", NOW).unwrap().expires_at, NOW + 100);
        assert_eq!(run(&e, b"touch nope 1\r\n", NOW).await, "NOT_FOUND\r\n");
        assert_eq!(run(&e, b"delete k\r\n", NOW).await, "DELETED\r\n");
        assert!(e.cache().get(b"k", NOW).is_none() && e.store().raw(b"k").is_none());
        assert_eq!(run(&e, b"delete k\r\n", NOW).await, "NOT_FOUND\r\n");
    }

    #[tokio::test]
    async fn noreply_suppresses_replies_and_errors() {
        let e = engine();
        assert_eq!(
            run(&e, b"set k 0 0 1 noreply\r\nx\r\ndelete k noreply\r\n", NOW).await,
            ""
        );
        e.store().set_failing(true);
        assert_eq!(run(&e, b"set k 0 0 1 noreply\r\nx\r\n", NOW).await, "");
    }

    #[test]
    fn exptime_rules() {
        assert_eq!(expiry(0, NOW), 0);
        assert_eq!(expiry(-1, NOW), NOW);
        assert_eq!(expiry(1, NOW), NOW + 1);
        assert_eq!(expiry(2_592_000, NOW), NOW + 2_592_000);
        // Past 30 days it is a Unix time; one in the past is already expired.
        assert_eq!(expiry(2_592_001, NOW), NOW);
        assert_eq!(expiry(i64::from(NOW) + 50, NOW), NOW + 50);
        assert_eq!(expiry(i64::MAX, NOW), u32::MAX);
    }

    #[test]
    fn versions_increase_and_differ() {
        let clock = VersionClock::new();
        let mut last = 0;
        for _ in 0..10_000 {
            let v = clock.next();
            assert!(v > last);
            last = v;
        }
    }
}
