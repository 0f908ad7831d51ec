//! The write path: every command that changes an item goes through
//! [`Engine::write`], and only there do the store and the cache change.
//!
//! One write, in order:
//! 1. the key is checked and locked (writes to one key from this process
//!    reach the store and the cache one at a time);
//! 2. the change is decided on what the key holds ([`decide`]): the cached
//!    copy as a first guess, or what DynamoDB answered;
//! 3. it is written **only if the key still holds exactly that** (its
//!    version, or nothing): a guess that was wrong costs a round trip that
//!    returns the real item, and the change is decided again; a refusal
//!    (`NOT_STORED`, `EXISTS`, ...) is only ever decided on what DynamoDB
//!    returned, never on the cache;
//! 4. reads of the key in flight are ended (they may have read the older
//!    item), then the cache gets exactly what DynamoDB now holds, or loses
//!    the key.
//!
//! Because every write is conditioned on the version it replaces, and
//! versions never repeat, a write that was answered (even `SERVER_ERROR`
//! after a timeout) and lands later finds a newer version and fails: it can
//! never overwrite a write that began after it was answered. A write whose
//! outcome is unknown leaves the key *in doubt*: it is dropped from memory,
//! reads do not fill it, and [`Engine::settle_doubts`] fences it (moves the
//! key's version on, conditioned on the version the lost write expects, so
//! that write can never land) or finds that it landed.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use super::Engine;
use crate::fleet::Fleet;
use crate::metrics::Event;
use crate::protocol::StoreMode;
use crate::store::{Change, Expect, Item, RESERVED_PREFIX, Store, StoreError, View, Written};

/// Attempts of one write before giving up on a hot key.
const WRITE_ATTEMPTS: usize = 64;

/// A change to one key, as commands ask for it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Op<'a> {
    /// `set`, `add`, `replace`, `append`, `prepend`, `cas` and `ms`: with
    /// `cas`, only to that version of a live item.
    Store {
        mode: StoreMode,
        flags: u32,
        expires_at: u32,
        data: &'a [u8],
        cas: Option<u64>,
    },
    /// `incr`/`decr` and `ma`: memcached's unsigned 64-bit arithmetic; with
    /// `expires_at`, the expiry changes too.
    Arith {
        incr: bool,
        delta: u64,
        cas: Option<u64>,
        expires_at: Option<u32>,
    },
    /// `touch`, `gat`, `mg T`: a new expiry for a live item.
    Touch { expires_at: u32 },
    /// `delete`, `md`: leaves a tombstone (see [`Item::tombstone`]).
    Delete { cas: Option<u64> },
    /// `flush_all`: the marker item records the time from which older items
    /// are hidden; only ever moves forward.
    Flush { before: u64 },
}

/// Why a write was not made, decided on what DynamoDB holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `add` on a live item; `replace`/`append`/`prepend` without one.
    NotStored,
    /// The live item is not the version asked for.
    Exists,
    /// No live item (`cas`, `incr`, `touch`, `delete`).
    NotFound,
    /// `incr`/`decr` of a value that is not a number.
    NotANumber,
    /// A `flush_all` older than the one already recorded.
    AlreadyFlushed,
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Done {
    /// DynamoDB holds this item now.
    Written(Item),
    /// Nothing was written; DynamoDB holds this (as it is).
    Refused(Refusal, Option<Item>),
}

/// What a write saw of the key before writing.
struct Prior {
    item: Option<Item>,
    /// Whether `item` came from DynamoDB (else it is the cache's guess).
    known: bool,
}

/// A key whose last write's outcome is unknown: that write expects
/// `expected` and would leave version `ours`.
#[derive(Debug, Clone)]
pub(super) struct Doubt {
    expected: Expect,
    /// The item the lost write replaces, for the fence.
    prior: Option<Item>,
    ours: u64,
    /// A peer's write (fleet mode): the peer fences it; this member only
    /// keeps the key uncached, until it sees the outcome or `REMOTE_DOUBT`.
    remote: Option<std::time::Instant>,
}

/// How long a peer's doubt is kept at most: AWS refuses requests signed
/// more than 5 minutes earlier, so no write lands later than that.
const REMOTE_DOUBT: std::time::Duration = std::time::Duration::from_secs(300);

/// Fleet mode: how long a write waits for this member to be able to
/// acknowledge (joining the fleet) before it is refused.
const FLEET_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Doubt {
    pub(super) fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// What peers are told of it: the version the lost write expects (None
    /// for no item) and the one it would leave.
    fn told(&self) -> (Option<u64>, u64) {
        let expected = match self.expected {
            Expect::Missing => None,
            Expect::Version { version, .. } => Some(version),
        };
        (expected, self.ours)
    }

    /// Whether the lost write can still land on a key holding `item`.
    fn still_possible(&self, item: Option<&Item>) -> bool {
        if self
            .remote
            .is_some_and(|since| since.elapsed() > REMOTE_DOUBT)
        {
            return false;
        }
        match (self.expected, item) {
            (Expect::Missing, None) => true,
            (Expect::Version { version, .. }, Some(item)) => item.version == version,
            _ => false,
        }
    }
}

impl<S: Store> Engine<S> {
    /// The one write path (see the module's documentation).
    pub(super) async fn write(
        &self,
        key: &[u8],
        op: Op<'_>,
        view: View,
    ) -> Result<Done, StoreError> {
        // The flush marker is the one reserved key written here.
        if !matches!(op, Op::Flush { .. }) {
            self.check_key(key)?;
            self.hot.write(key);
        }
        let op = self.capped(key, op, view);
        // Fleet mode: a member that could not acknowledge does not write.
        let fleet = self.fleet.get();
        if let Some(fleet) = fleet
            && !fleet.writable(FLEET_WAIT).await
        {
            return Err(StoreError::FleetUnknown);
        }
        let lock = self.writes.lock(key).await;
        if self.is_local(key) {
            // Memory only: decided on what this sidecar holds, as memcached
            // decides it, then told to the peers like any write.
            // The key stays locked until the peers have heard, as for any write.
            let result = Ok(self.write_local(key, op, view));
            let result = match fleet {
                None => result,
                Some(fleet) => self.tell_fleet(fleet, key, op, result).await,
            };
            self.count_write(op, &result, true);
            return result;
        }
        let epoch = self.epoch_now();
        let result = self.write_locked(key, op, view).await;
        self.note_store(&result);
        // Whatever a read in flight got is older than this write's outcome.
        self.reads.remove(key);
        match &result {
            // A write that landed moved the version on: no earlier lost
            // write can land any more.
            Ok(Done::Written(_)) => {
                self.doubts.remove(key);
                if let Op::Flush { before } = op {
                    self.apply_flush(before);
                }
            }
            Ok(Done::Refused(_, current)) => {
                self.observed(key, current.as_ref());
            }
            Err(_) => {}
        }
        // The cache takes the outcome unless a peer's write of the key
        // invalidated it while this one was in flight (which of the two is
        // newer, the cache cannot tell): decided under the key's
        // invalidation lock, so an invalidation is acknowledged either
        // before this fill (and prevents it) or after it (and removes it).
        let filled = lock.unless_invalidated(|| match (&result, op) {
            (Ok(_), Op::Flush { .. }) => {}
            (Ok(Done::Written(item)), _) | (Ok(Done::Refused(_, Some(item))), _) => {
                self.fill(key, item, view, epoch)
            }
            // Refused on a key DynamoDB holds nothing for.
            (Ok(Done::Refused(_, None)), _) if self.observed(key, None) => {
                self.fill_absent(key, view, self.now_ms(), epoch)
            }
            _ => {
                self.cache.remove(key);
            }
        });
        if !filled {
            self.cache.remove(key);
        }
        let result = match fleet {
            None => result,
            Some(fleet) => self.tell_fleet(fleet, key, op, result).await,
        };
        self.count_write(op, &result, false);
        result
    }

    /// A write of a local key (memory only), under its key lock: the change
    /// decided on the local copy (absent, expired or flushed: no item), and
    /// made there.
    fn write_local(&self, key: &[u8], op: Op<'_>, view: View) -> Done {
        let local = self.cache_for(key);
        let current = local.get(key, view.now);
        let floor = current
            .as_ref()
            .map_or(0, |i| i.version)
            .max(view.flushed_before);
        let version = self.versions.next_after(floor);
        match decide(op, current.as_ref(), view, version, self.value_max(key)) {
            Ok((_, new)) => {
                self.counters.record(Event::LocalWrites);
                if new.is_live(view) {
                    if !local.insert_written(key, &new, self.now_ms()) {
                        self.counters.record(Event::StoreNoMemory);
                    }
                } else {
                    // A delete, or a write that expires at once.
                    local.remove(key);
                }
                Done::Written(new)
            }
            Err(refusal) => Done::Refused(refusal, current),
        }
    }

    /// The longest value `key` may hold: what the parser allows a `set`.
    fn value_max(&self, key: &[u8]) -> usize {
        self.options
            .item_size_max
            .saturating_sub(key.len() + self.store.item_overhead())
    }

    /// `op` with its expiry capped by the key's rule (`max_ttl`): a write
    /// asking for a later expiry, or none, gets now + `max_ttl`.
    fn capped<'a>(&self, key: &[u8], op: Op<'a>, view: View) -> Op<'a> {
        let Some(max) = self.rule(key).and_then(|r| r.max_ttl) else {
            return op;
        };
        let limit = view
            .now
            .saturating_add(u32::try_from(max.as_secs()).unwrap_or(u32::MAX));
        let cap = |at: u32| if at == 0 || at > limit { limit } else { at };
        match op {
            Op::Store {
                mode,
                flags,
                expires_at,
                data,
                cas,
            } => Op::Store {
                mode,
                flags,
                // append and prepend keep the item's expiry (capped when set).
                expires_at: cap(expires_at),
                data,
                cas,
            },
            Op::Arith {
                incr,
                delta,
                cas,
                expires_at,
            } => Op::Arith {
                incr,
                delta,
                cas,
                expires_at: expires_at.map(cap),
            },
            Op::Touch { expires_at } => Op::Touch {
                expires_at: cap(expires_at),
            },
            other => other,
        }
    }

    /// Fleet mode: tells every peer holding this member's lease about the
    /// write, and waits for each (or for its lease to end) before the write
    /// is answered. A write of unknown outcome is told too, as a doubt.
    async fn tell_fleet(
        &self,
        fleet: &Fleet<S>,
        key: &[u8],
        op: Op<'_>,
        result: Result<Done, StoreError>,
    ) -> Result<Done, StoreError> {
        match (&result, op) {
            (Ok(Done::Written(_)), Op::Flush { before }) => fleet.flush(before).await,
            (Ok(Done::Written(_)), _) => fleet.acknowledge(key, None).await,
            (Err(e), _) if e.outcome_unknown() => {
                let doubt = self.doubts.get(key).map(|d| d.told());
                fleet.acknowledge(key, doubt).await;
            }
            _ => {}
        }
        match result {
            // It landed, but the fleet may not all have heard: say so.
            Ok(Done::Written(_)) if !fleet.may_acknowledge() => Err(StoreError::FleetUnknown),
            other => other,
        }
    }

    /// Checks that the table can hold `key` and that it is not one of
    /// dynacache's own (a base64 meta key can name any bytes).
    pub(super) fn check_key(&self, key: &[u8]) -> Result<(), StoreError> {
        if key.starts_with(RESERVED_PREFIX) {
            return Err(StoreError::InvalidKey("key is reserved by dynacache"));
        }
        self.store.check_key(key)
    }

    async fn write_locked(&self, key: &[u8], op: Op<'_>, view: View) -> Result<Done, StoreError> {
        let mut prior = match op {
            Op::Flush { .. } => Prior {
                item: None,
                known: false,
            },
            // Any cached copy, however old: it is only a guess.
            _ => Prior {
                item: self.cache.get(key, view.now),
                known: false,
            },
        };
        let value_max = self.value_max(key);
        for _ in 0..WRITE_ATTEMPTS {
            let floor = prior
                .item
                .as_ref()
                .map_or(0, |i| i.version)
                .max(view.flushed_before);
            let version = self.versions.next_after(floor);
            let (change, new) = match decide(op, prior.item.as_ref(), view, version, value_max) {
                Ok(decided) => decided,
                Err(_) if !prior.known => {
                    // Refuse only on what DynamoDB says.
                    prior = Prior {
                        item: self.store.get(key).await?,
                        known: true,
                    };
                    continue;
                }
                Err(refusal) => return Ok(Done::Refused(refusal, prior.item)),
            };
            let expect = Expect::of(prior.item.as_ref(), view);
            match self
                .store
                .write(key, change_of(&change, &new), expect, view)
                .await
            {
                Ok(Written::Done { chunks }) => return Ok(Done::Written(Item { chunks, ..new })),
                // An earlier attempt of this very write (the SDK retried it
                // after a lost answer) landed.
                Ok(Written::Conflict(Some(current))) if current.version == new.version => {
                    return Ok(Done::Written(Item {
                        chunks: current.chunks,
                        ..new
                    }));
                }
                Ok(Written::Conflict(current)) => {
                    prior = Prior {
                        item: current,
                        known: true,
                    };
                }
                Err(e) => {
                    if e.outcome_unknown() {
                        self.doubt(
                            key,
                            Doubt {
                                expected: expect,
                                prior: prior.item,
                                ours: new.version,
                                remote: None,
                            },
                        );
                    }
                    return Err(e);
                }
            }
        }
        Err(StoreError::Contention)
    }

    /// Records that `key`'s last write may still land.
    fn doubt(&self, key: &[u8], doubt: Doubt) {
        self.doubts.insert(Box::from(key), doubt);
        self.cache.remove(key);
        self.doubt_added.notify_one();
    }

    /// A peer's write of `key` may land later (fleet mode): keep the key
    /// uncached while DynamoDB may hold `expected` (None: nothing).
    pub(super) fn doubt_remote(&self, key: &[u8], expected: Option<u64>, ours: u64) {
        let expected = match expected {
            None => Expect::Missing,
            // Only compared with what is seen (a peer fences its own).
            Some(version) => Expect::Version {
                version,
                live: false,
                chunks: 0,
            },
        };
        // A doubt of our own stays: we must fence it.
        if self.doubts.get(key).is_none_or(|d| d.is_remote()) {
            self.doubts.insert(
                Box::from(key),
                Doubt {
                    expected,
                    prior: None,
                    ours,
                    remote: Some(std::time::Instant::now()),
                },
            );
        }
    }

    /// DynamoDB was seen holding `item` for `key`: a doubt that cannot come
    /// true any more is settled. Returns whether the key may be cached.
    pub(super) fn observed(&self, key: &[u8], item: Option<&Item>) -> bool {
        match self.doubts.get(key) {
            None => true,
            Some(doubt) if doubt.still_possible(item) => false,
            Some(doubt) => {
                let settled = doubt.ours;
                drop(doubt);
                self.doubts.remove_if(key, |_, d| d.ours == settled);
                true
            }
        }
    }

    /// Whether a key has a write whose outcome is unknown.
    pub fn in_doubt(&self, key: &[u8]) -> bool {
        self.doubts.contains_key(key)
    }

    /// Fences every key in doubt: moves its version on, conditioned on the
    /// version the lost write expects (or writes a tombstone where it
    /// expects nothing), so it can never land; or finds that it landed.
    /// Returns how many are still in doubt (DynamoDB still failing).
    pub async fn settle_doubts(&self) -> usize {
        // Peers' doubts are theirs to fence; they expire on their own.
        self.doubts
            .retain(|_, d| d.remote.is_none_or(|since| since.elapsed() <= REMOTE_DOUBT));
        let keys: Vec<Box<[u8]>> = self
            .doubts
            .iter()
            .filter(|d| !d.is_remote())
            .map(|d| d.key().clone())
            .collect();
        for key in keys {
            let _lock = self.writes.lock(&key).await;
            let Some(doubt) = self.doubts.get(&key[..]).map(|d| d.clone()) else {
                continue;
            };
            if doubt.is_remote() {
                continue;
            }
            let view = self.view(super::unix_now());
            let version = self.versions.next_after(doubt.ours);
            let fence = match &doubt.prior {
                Some(prior) => Change::Retime {
                    expires_at: prior.expires_at,
                    version,
                },
                None => Change::Put(&Item::tombstone(version, view.now)),
            };
            // Not `Expect::of`: the condition is exactly the lost write's.
            let expect = match doubt.expected {
                Expect::Version {
                    version, chunks, ..
                } => Expect::Version {
                    version,
                    live: false,
                    chunks,
                },
                Expect::Missing => Expect::Missing,
            };
            match self.store.write(&key, fence, expect, view).await {
                Ok(_) => {
                    // Fenced, or the key moved on: the lost write cannot land.
                    self.doubts.remove_if(&key[..], |_, d| d.ours == doubt.ours);
                    self.reads.remove(&key[..]);
                    self.cache.remove(&key);
                    self.counters.record(Event::WritesFenced);
                    // Peers kept the key uncached meanwhile: it is settled.
                    if let Some(fleet) = self.fleet.get() {
                        fleet.acknowledge(&key, None).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot fence a write of unknown outcome yet")
                }
            }
        }
        self.doubts.iter().filter(|d| !d.is_remote()).count()
    }

    /// Fences doubts as they come, retrying with backoff while DynamoDB fails.
    pub(super) async fn run_fences(&self, shutdown: &tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.doubt_added.notified() => {}
                _ = tokio::time::sleep(backoff), if !self.doubts.is_empty() => {}
            }
            if self.settle_doubts().await > 0 {
                backoff = (backoff * 2).min(Duration::from_secs(2));
            } else {
                backoff = Duration::from_millis(50);
            }
        }
    }

    /// Counts what a write did, for `stats` and `/metrics`; the write path's
    /// own counters (`dynacache_writes_total`) only for writes to DynamoDB.
    fn count_write(&self, op: Op<'_>, result: &Result<Done, StoreError>, local: bool) {
        let refusal = match result {
            Ok(Done::Written(_)) => None,
            Ok(Done::Refused(refusal, _)) => Some(*refusal),
            Err(_) => {
                if !local {
                    self.counters.record(Event::WritesFailed);
                }
                return;
            }
        };
        if !local {
            self.counters.record(match refusal {
                None => Event::WritesDone,
                Some(_) => Event::WritesRefused,
            });
        }
        let events: &[Event] = match (op, refusal) {
            (Op::Store { cas: Some(_), .. }, None) => &[Event::CasHits, Event::TotalItems],
            (Op::Store { cas: Some(_), .. }, Some(Refusal::Exists)) => &[Event::CasBadval],
            (Op::Store { cas: Some(_), .. }, Some(Refusal::NotFound)) => &[Event::CasMisses],
            (Op::Store { .. }, None) => &[Event::TotalItems],
            (Op::Arith { incr: true, .. }, None) => &[Event::IncrHits],
            (Op::Arith { incr: true, .. }, Some(Refusal::NotFound)) => &[Event::IncrMisses],
            (Op::Arith { incr: false, .. }, None) => &[Event::DecrHits],
            (Op::Arith { incr: false, .. }, Some(Refusal::NotFound)) => &[Event::DecrMisses],
            (Op::Touch { .. }, None) => &[Event::TouchHits],
            (Op::Touch { .. }, Some(_)) => &[Event::TouchMisses],
            (Op::Delete { .. }, None) => &[Event::DeleteHits],
            (Op::Delete { .. }, Some(Refusal::NotFound)) => &[Event::DeleteMisses],
            _ => &[],
        };
        for &event in events {
            self.counters.record(event);
        }
    }
}

/// The change `op` makes to a key holding `current` (as it is), as the item
/// it leaves, with `version`; or why it makes none. `value_max`: the
/// longest value the key may hold (`item_size_max` less the key and the
/// store's overhead), which an append or prepend must not exceed.
pub(super) fn decide(
    op: Op<'_>,
    current: Option<&Item>,
    view: View,
    version: u64,
    value_max: usize,
) -> Result<(Decided, Item), Refusal> {
    let live = current.filter(|item| item.is_live(view));
    let check_cas = |cas: Option<u64>| match (cas, live) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(Refusal::NotFound),
        (Some(cas), Some(item)) if item.version != cas => Err(Refusal::Exists),
        (Some(_), Some(_)) => Ok(()),
    };
    match op {
        Op::Store {
            mode,
            flags,
            expires_at,
            data,
            cas,
        } => {
            check_cas(cas)?;
            let whole = |value: Vec<u8>| Item {
                value,
                flags,
                expires_at,
                version,
                chunks: 0,
            };
            match (mode, live) {
                (StoreMode::Add, Some(_)) if cas.is_none() => Err(Refusal::NotStored),
                (StoreMode::Replace | StoreMode::Append | StoreMode::Prepend, None) => {
                    Err(Refusal::NotStored)
                }
                // Flags and expiry stay the item's.
                (StoreMode::Append | StoreMode::Prepend, Some(item)) => {
                    // As memcached: an item that would outgrow the largest
                    // is not stored (NOT_STORED), the old one kept.
                    if item.value.len() + data.len() > value_max {
                        return Err(Refusal::NotStored);
                    }
                    let value = match mode {
                        StoreMode::Append => [&item.value[..], data].concat(),
                        _ => [data, &item.value[..]].concat(),
                    };
                    Ok((
                        Decided::Put,
                        Item {
                            value,
                            version,
                            // How the store splits it is the store's to say.
                            chunks: 0,
                            ..item.clone()
                        },
                    ))
                }
                _ => Ok((Decided::Put, whole(data.to_vec()))),
            }
        }
        Op::Arith {
            incr,
            delta,
            cas,
            expires_at,
        } => {
            check_cas(cas)?;
            let item = live.ok_or(Refusal::NotFound)?;
            let old = parse_counter(&item.value).ok_or(Refusal::NotANumber)?;
            let new = if incr {
                old.wrapping_add(delta)
            } else {
                old.saturating_sub(delta)
            };
            // A shorter result is padded with spaces to the old length, as
            // memcached rewrites the value in place.
            let mut value = itoa::Buffer::new().format(new).as_bytes().to_vec();
            if value.len() < item.value.len() {
                value.resize(item.value.len(), b' ');
            }
            Ok((
                Decided::Put,
                Item {
                    value,
                    flags: item.flags,
                    expires_at: expires_at.unwrap_or(item.expires_at),
                    version,
                    chunks: 0,
                },
            ))
        }
        Op::Touch { expires_at } => {
            let item = live.ok_or(Refusal::NotFound)?;
            Ok((
                Decided::Retime,
                Item {
                    expires_at,
                    version,
                    ..item.clone()
                },
            ))
        }
        Op::Delete { cas } => {
            check_cas(cas)?;
            live.ok_or(Refusal::NotFound)?;
            Ok((Decided::Put, Item::tombstone(version, view.now)))
        }
        Op::Flush { before } => match current {
            Some(marker) if marker.version >= before => Err(Refusal::AlreadyFlushed),
            _ => Ok((
                Decided::Put,
                Item {
                    version: before,
                    ..Item::default()
                },
            )),
        },
    }
}

/// How a decided change is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decided {
    /// The whole item.
    Put,
    /// Expiry and version only.
    Retime,
}

fn change_of<'a>(decided: &Decided, item: &'a Item) -> Change<'a> {
    match decided {
        Decided::Put => Change::Put(item),
        Decided::Retime => Change::Retime {
            expires_at: item.expires_at,
            version: item.version,
        },
    }
}

/// A counter value as memcached's `strtoull` reads it: surrounding
/// whitespace allowed (memcached pads shrunk values with spaces), digits
/// only, at most 2^64 - 1.
pub(super) fn parse_counter(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value)
        .ok()?
        .trim_matches(|c: char| c.is_ascii_whitespace());
    let digits = text.strip_prefix('+').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Per-key write locks: writes to one key from this process reach the store
/// and then the cache one at a time, so the cache ends as the store does.
/// Each also notes whether a peer invalidated the key meanwhile (fleet mode).
#[derive(Default)]
pub(super) struct KeyLocks {
    locks: DashMap<Box<[u8]>, Arc<KeyLock>>,
}

#[derive(Default)]
pub(super) struct KeyLock {
    mutex: Arc<tokio::sync::Mutex<()>>,
    /// Set by a peer's invalidation; held while the write's outcome goes to
    /// the cache (a sync lock, never held across an await).
    invalidated: std::sync::Mutex<bool>,
}

pub(super) struct KeyLockGuard<'a> {
    locks: &'a KeyLocks,
    key: Box<[u8]>,
    lock: Option<Arc<KeyLock>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    pub(super) async fn lock(&self, key: &[u8]) -> KeyLockGuard<'_> {
        let lock = self.locks.entry(Box::from(key)).or_default().clone();
        let guard = lock.mutex.clone().lock_owned().await;
        // Invalidations before this write began are not about it.
        *lock.invalidated.lock().unwrap_or_else(|e| e.into_inner()) = false;
        KeyLockGuard {
            locks: self,
            key: Box::from(key),
            lock: Some(lock),
            guard: Some(guard),
        }
    }

    /// A peer wrote `key`: a write of it in flight here must not cache its
    /// result.
    pub(super) fn invalidated(&self, key: &[u8]) {
        let lock = self.locks.get(key).map(|l| l.clone());
        if let Some(lock) = lock {
            *lock.invalidated.lock().unwrap_or_else(|e| e.into_inner()) = true;
        }
    }
}

impl KeyLockGuard<'_> {
    /// Runs `fill` unless a peer invalidated the key since the lock was
    /// taken (then returns false), holding the invalidation lock meanwhile.
    pub(super) fn unless_invalidated<R>(&self, fill: impl FnOnce() -> R) -> bool {
        let Some(lock) = &self.lock else {
            fill();
            return true;
        };
        let mut invalidated = lock.invalidated.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut *invalidated) {
            return false;
        }
        fill();
        true
    }
}

impl Drop for KeyLockGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let lock = self.lock.take();
        // Forget the key's lock unless another writer holds or awaits it
        // (the map's reference and ours make two).
        self.locks.locks.remove_if(&self.key, |_, l| {
            lock.as_ref().is_some_and(|ours| Arc::ptr_eq(l, ours)) && Arc::strong_count(l) == 2
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1_800_000_000;

    /// [`decide`] with no size limit in the way.
    fn decided(
        op: Op<'_>,
        current: Option<&Item>,
        view: View,
        version: u64,
    ) -> Result<(Decided, Item), Refusal> {
        decide(op, current, view, version, usize::MAX)
    }

    fn item(value: &[u8], version: u64) -> Item {
        Item {
            value: value.to_vec(),
            flags: 3,
            expires_at: 0,
            version,
            chunks: 0,
        }
    }

    fn store(mode: StoreMode, cas: Option<u64>) -> Op<'static> {
        Op::Store {
            mode,
            flags: 9,
            expires_at: 0,
            data: b"new",
            cas,
        }
    }

    #[test]
    fn refusals_follow_memcached() {
        let view = View::at(NOW);
        let live = item(b"old", 7);
        let expired = Item {
            expires_at: NOW,
            ..item(b"old", 7)
        };
        let refused = |op, current: Option<&Item>| decided(op, current, view, 8).err();
        assert_eq!(
            refused(store(StoreMode::Add, None), Some(&live)),
            Some(Refusal::NotStored)
        );
        assert_eq!(refused(store(StoreMode::Add, None), Some(&expired)), None);
        assert_eq!(
            refused(store(StoreMode::Replace, None), None),
            Some(Refusal::NotStored)
        );
        assert_eq!(
            refused(store(StoreMode::Append, None), Some(&expired)),
            Some(Refusal::NotStored)
        );
        assert_eq!(
            refused(store(StoreMode::Set, Some(7)), None),
            Some(Refusal::NotFound)
        );
        assert_eq!(
            refused(store(StoreMode::Set, Some(6)), Some(&live)),
            Some(Refusal::Exists)
        );
        assert_eq!(refused(store(StoreMode::Set, Some(7)), Some(&live)), None);
        assert_eq!(
            refused(Op::Delete { cas: None }, Some(&expired)),
            Some(Refusal::NotFound)
        );
        assert_eq!(
            refused(Op::Touch { expires_at: 0 }, None),
            Some(Refusal::NotFound)
        );
        let flushed = View {
            now: NOW,
            flushed_before: 8,
        };
        assert_eq!(
            decided(store(StoreMode::Replace, None), Some(&live), flushed, 9).err(),
            Some(Refusal::NotStored),
            "a flushed item is not live"
        );
    }

    #[test]
    fn an_append_past_the_largest_item_is_not_stored() {
        let view = View::at(NOW);
        let live = item(b"abcd", 7);
        for mode in [StoreMode::Append, StoreMode::Prepend] {
            assert_eq!(
                decide(store(mode, None), Some(&live), view, 8, 6).err(),
                Some(Refusal::NotStored),
                "{mode:?}"
            );
            // Exactly the largest is stored.
            let (_, new) = decide(store(mode, None), Some(&live), view, 8, 7).unwrap();
            assert_eq!(new.value.len(), 7);
        }
    }

    #[test]
    fn changes_keep_what_memcached_keeps() {
        let view = View::at(NOW);
        let live = Item {
            expires_at: NOW + 50,
            ..item(b"ab", 7)
        };
        let (how, new) = decided(store(StoreMode::Prepend, None), Some(&live), view, 8).unwrap();
        assert_eq!(how, Decided::Put);
        assert_eq!(
            (new.value.as_slice(), new.flags, new.expires_at, new.version),
            (&b"newab"[..], 3, NOW + 50, 8)
        );
        let (how, new) = decided(
            Op::Touch {
                expires_at: NOW + 9,
            },
            Some(&live),
            view,
            8,
        )
        .unwrap();
        assert_eq!(how, Decided::Retime);
        assert_eq!(
            (new.value.as_slice(), new.expires_at, new.version),
            (&b"ab"[..], NOW + 9, 8)
        );
        let (_, tomb) = decided(Op::Delete { cas: Some(7) }, Some(&live), view, 8).unwrap();
        assert!(!tomb.is_live(view) && tomb.version == 8);
        let counter = item(b"10", 7);
        let arith = |incr, delta| Op::Arith {
            incr,
            delta,
            cas: None,
            expires_at: None,
        };
        assert_eq!(
            decided(arith(false, 9), Some(&counter), view, 8)
                .unwrap()
                .1
                .value,
            b"1 "
        );
        assert_eq!(
            decided(arith(true, 1), Some(&item(b"x", 1)), view, 8).err(),
            Some(Refusal::NotANumber)
        );
        let marker = Item {
            version: 100,
            ..Item::default()
        };
        assert_eq!(
            decided(Op::Flush { before: 90 }, Some(&marker), view, 1).err(),
            Some(Refusal::AlreadyFlushed)
        );
        assert_eq!(
            decided(Op::Flush { before: 110 }, Some(&marker), view, 1)
                .unwrap()
                .1
                .version,
            110
        );
    }
}
