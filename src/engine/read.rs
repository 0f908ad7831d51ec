//! The read path: `get`/`gets` served from memory where possible, misses
//! read from the store (coalesced per key, batched per request), and
//! `gat`/`gats`, which are writes of the expiry that answer values.

use std::sync::Arc;

use bytes::BytesMut;
use dashmap::DashMap;
use tokio::sync::watch;

use super::stats::bump;
use super::{Engine, error_reply, expiry, value_reply};
use crate::cache::{Entry, EntryRef};
use crate::metrics::Outcome;
use crate::protocol::{Keys, Reply};
use crate::store::{Store, StoreError, StoredItem, View};

impl<S: Store> Engine<S> {
    pub(super) async fn get(
        &self,
        keys: Keys<'_>,
        cas: bool,
        out: &mut BytesMut,
        view: View,
    ) -> Outcome {
        let start = out.len();
        let now_ms = self.now_ms();
        // Fast path: answer hits straight from the cache, allocating nothing,
        // until the first key that needs the store. Keys are checked against
        // the table on the slow path only: a key the table cannot hold was
        // never stored, so it is never a hit.
        let mut rest = keys.iter();
        let mut first_miss = None;
        for key in rest.by_ref() {
            // A hit is encoded from the cache in place, under its shard's lock.
            let served = self.fresh_with(key, view, now_ms, |entry| {
                value_reply(out, key, entry.flags(), entry.value(), entry.version(), cas);
            });
            match served.served() {
                Ok(()) => {
                    self.metrics.hits.increment(1);
                    bump(&self.stats.get_hits);
                }
                Err(lookup) => {
                    first_miss = Some((key, lookup));
                    break;
                }
            }
        }
        let Some((key, lookup)) = first_miss else {
            Reply::End.encode(out);
            return Outcome::Hit;
        };

        // Slow path: look the remaining keys up, read all misses in one go.
        let mut lookups = vec![(key, lookup)];
        lookups.extend(rest.map(|k| (k, self.fresh(k, view, now_ms))));
        let mut wanted: Vec<&[u8]> = Vec::new();
        for (key, lookup) in &lookups {
            if !matches!(lookup, Lookup::Fresh(_)) && !wanted.contains(key) {
                wanted.push(key);
            }
        }
        // Refuse the whole request, hits answered so far included.
        if let Err(e) = self.check_keys(wanted.iter().copied()) {
            out.truncate(start);
            return error_reply(out, &e);
        }
        let fetched = match self.fetch(&wanted, view).await {
            Ok(fetched) => Some(fetched),
            Err(e) => {
                // Old copies may stand in for a failed re-read, if allowed.
                let stale_ok = self.options.stale_on_error
                    && lookups.iter().all(|(_, l)| !matches!(l, Lookup::Absent));
                if !stale_ok {
                    // Never a partial answer that reads as a miss.
                    out.truncate(start);
                    return error_reply(out, &e);
                }
                tracing::debug!(error = %e, "serving entries past max_local_age: the store failed");
                None
            }
        };
        let mut all_hit = true;
        for (key, lookup) in lookups {
            let item = match (lookup, &fetched) {
                (Lookup::Fresh(entry), _) => {
                    self.metrics.hits.increment(1);
                    Some((entry.flags, Value::Cached(entry)))
                }
                (Lookup::Aged(entry), None) => {
                    self.metrics.stale_served.increment(1);
                    Some((entry.flags, Value::Cached(entry)))
                }
                (_, Some(fetched)) => {
                    self.metrics.misses.increment(1);
                    let i = wanted
                        .iter()
                        .position(|k| *k == key)
                        .expect("every miss was fetched");
                    fetched[i]
                        .clone()
                        .map(|item| (item.flags, Value::Stored(item)))
                }
                (Lookup::Absent, None) => {
                    unreachable!("an absent key makes a failed fetch an error")
                }
            };
            match item {
                Some((flags, value)) => {
                    bump(&self.stats.get_hits);
                    value_reply(out, key, flags, value.bytes(), value.version(), cas);
                }
                None => {
                    bump(&self.stats.get_misses);
                    all_hit = false;
                }
            }
        }
        Reply::End.encode(out);
        if all_hit { Outcome::Hit } else { Outcome::Miss }
    }

    /// One key through the get path (cache, `max_local_age`, coalesced
    /// store read, stale copy on a failed re-read if allowed): `mg`, `me`.
    pub(super) async fn lookup(&self, key: &[u8], view: View) -> Result<Option<Value>, StoreError> {
        let lookup = self.fresh(key, view, self.now_ms());
        self.finish_lookup(key, view, lookup).await
    }

    /// [`Engine::lookup`] once the cache has been asked: `lookup` is its answer.
    pub(super) async fn finish_lookup(
        &self,
        key: &[u8],
        view: View,
        lookup: Lookup,
    ) -> Result<Option<Value>, StoreError> {
        let found = match lookup {
            Lookup::Fresh(entry) => {
                self.metrics.hits.increment(1);
                Some(Value::Cached(entry))
            }
            other => match self.fetch(&[key], view).await {
                Ok(mut items) => {
                    self.metrics.misses.increment(1);
                    items.pop().flatten().map(Value::Stored)
                }
                Err(e) => match other {
                    Lookup::Aged(entry) if self.options.stale_on_error => {
                        self.metrics.stale_served.increment(1);
                        Some(Value::Cached(entry))
                    }
                    _ => return Err(e),
                },
            },
        };
        bump(match found {
            Some(_) => &self.stats.get_hits,
            None => &self.stats.get_misses,
        });
        Ok(found)
    }

    /// Refuses a whole retrieval, before answering any of it, if the table
    /// cannot hold one of its keys.
    fn check_keys<'k>(&self, mut keys: impl Iterator<Item = &'k [u8]>) -> Result<(), StoreError> {
        keys.try_for_each(|key| self.store.check_key(key))
    }

    /// What the cache can do for `key`: a fresh entry, one past
    /// `max_local_age` (to re-read, kept as a fallback), or nothing.
    fn fresh(&self, key: &[u8], view: View, now_ms: u64) -> Lookup {
        self.fresh_with(key, view, now_ms, |entry| entry.to_entry())
    }

    /// [`Engine::fresh`], handing a fresh entry to `serve` in place, under
    /// its shard's lock: a hit answered this way copies nothing.
    pub(super) fn fresh_with<R>(
        &self,
        key: &[u8],
        view: View,
        now_ms: u64,
        serve: impl FnOnce(EntryRef<'_>) -> R,
    ) -> Lookup<R> {
        bump(&self.stats.cmd_get);
        let max = self.options.max_local_age.as_millis() as u64;
        let found = self.cache.get_with(key, view.now, |entry| {
            if entry.version() < view.flushed_before {
                // Written before a flush_all that has taken effect.
                Err(None)
            } else if max > 0 && now_ms.saturating_sub(entry.filled_at_ms()) >= max {
                Err(Some(entry.to_entry()))
            } else {
                Ok(serve(entry))
            }
        });
        match found {
            None => Lookup::Absent,
            Some(Ok(served)) => Lookup::Fresh(served),
            Some(Err(None)) => {
                self.cache.remove(key);
                bump(&self.stats.get_flushed);
                Lookup::Absent
            }
            Some(Err(Some(aged))) => {
                self.metrics.revalidations.increment(1);
                Lookup::Aged(aged)
            }
        }
    }

    /// Reads `keys` (distinct) from the store, joining reads already in
    /// flight for any of them, and fills the cache with what it read unless
    /// a write to the key completed meanwhile.
    async fn fetch(
        &self,
        keys: &[&[u8]],
        view: View,
    ) -> Result<Vec<Option<StoredItem>>, StoreError> {
        let mut results: Vec<Option<Option<StoredItem>>> = vec![None; keys.len()];
        let mut lead = Leader {
            reads: &self.reads,
            keys,
            flights: Vec::new(),
        };
        let mut follow = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.reads.entry(Box::from(*key)) {
                dashmap::Entry::Occupied(e) => follow.push((i, e.get().result.subscribe())),
                dashmap::Entry::Vacant(e) => {
                    let flight = Arc::new(Flight::new());
                    e.insert(flight.clone());
                    lead.flights.push((i, flight));
                }
            }
        }
        if !lead.flights.is_empty() {
            let lead_keys: Vec<&[u8]> = lead.flights.iter().map(|(i, _)| keys[*i]).collect();
            let read = match lead_keys.as_slice() {
                [one] => self.store.get(one, view).await.map(|item| vec![item]),
                many => self.store.get_many(many, view).await,
            };
            let now_ms = self.now_ms();
            match &read {
                Ok(items) => {
                    for ((i, flight), item) in lead.flights.iter().zip(items) {
                        // Fill only if no write took the flight out of the map.
                        let key = keys[*i];
                        self.reads.remove_if(key, |_, f| {
                            let ours = Arc::ptr_eq(f, flight);
                            if ours && let Some(item) = item {
                                self.fill_at(key, item, view, now_ms);
                            }
                            ours
                        });
                        let _ = flight.result.send(Some(Ok(item.clone())));
                        results[*i] = Some(item.clone());
                    }
                }
                Err(e) => {
                    for (_, flight) in &lead.flights {
                        let _ = flight.result.send(Some(Err(e.clone())));
                    }
                }
            }
            lead.finish();
            read?;
        }
        for (i, mut rx) in follow {
            self.metrics.coalesced.increment(1);
            let shared = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| (*v).clone());
            results[i] = Some(match shared {
                Some(result) => result?,
                // The leader went away without an answer: read it ourselves.
                None => self.store.get(keys[i], view).await?,
            });
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every key was read"))
            .collect())
    }

    /// `gat`/`gats`: each key's expiry is updated in the store (a write, so
    /// other sidecars agree), and the items found are answered.
    pub(super) async fn get_and_touch(
        &self,
        keys: Keys<'_>,
        cas: bool,
        exptime: i32,
        out: &mut BytesMut,
        view: View,
    ) -> Outcome {
        if let Err(e) = self.check_keys(keys.iter()) {
            return error_reply(out, &e);
        }
        let start = out.len();
        let mut all_hit = true;
        for key in keys.iter() {
            bump(&self.stats.cmd_touch);
            bump(&self.stats.cmd_get);
            match self.touch_item(key, expiry(exptime, view.now), view).await {
                Ok(Some(item)) => {
                    bump(&self.stats.touch_hits);
                    bump(&self.stats.get_hits);
                    // The item was live when touched: it is answered even if
                    // the new exptime has already passed (`gat -1`), and only
                    // then is it gone, as in memcached.
                    value_reply(out, key, item.flags, &item.value, item.version, cas);
                }
                Ok(None) => {
                    bump(&self.stats.touch_misses);
                    bump(&self.stats.get_misses);
                    all_hit = false;
                }
                Err(e) => {
                    out.truncate(start);
                    return error_reply(out, &e);
                }
            }
        }
        Reply::End.encode(out);
        if all_hit { Outcome::Hit } else { Outcome::Miss }
    }
}

/// What the cache holds for a key, as the get path sees it.
/// `T`: what was made of a fresh entry (a copy, or a reply already encoded).
pub(super) enum Lookup<T = Entry> {
    Fresh(T),
    /// Older than `max_local_age`: re-read it, but keep it in case the store fails.
    Aged(Entry),
    Absent,
}

impl<T> Lookup<T> {
    /// What a fresh entry gave, or the lookup the store must finish.
    pub(super) fn served(self) -> Result<T, Lookup> {
        match self {
            Lookup::Fresh(served) => Ok(served),
            Lookup::Aged(entry) => Err(Lookup::Aged(entry)),
            Lookup::Absent => Err(Lookup::Absent),
        }
    }
}

/// A value to answer with, from the cache or just read from the store.
pub(super) enum Value {
    Cached(Entry),
    Stored(StoredItem),
}

impl Value {
    pub(super) fn flags(&self) -> u32 {
        match self {
            Value::Cached(e) => e.flags,
            Value::Stored(i) => i.flags,
        }
    }

    pub(super) fn expires_at(&self) -> u32 {
        match self {
            Value::Cached(e) => e.expires_at,
            Value::Stored(i) => i.expires_at,
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Value::Cached(e) => e.value(),
            Value::Stored(i) => &i.value,
        }
    }

    pub(super) fn version(&self) -> u64 {
        match self {
            Value::Cached(e) => e.version,
            Value::Stored(i) => i.version,
        }
    }
}

type ReadResult = Result<Option<StoredItem>, StoreError>;

/// One store read in flight; requests missing the same key wait for its result.
pub(super) struct Flight {
    result: watch::Sender<Option<ReadResult>>,
}

impl Flight {
    fn new() -> Flight {
        Flight {
            result: watch::channel(None).0,
        }
    }
}

/// The flights a request leads. Dropped (finished or cancelled), it takes
/// them out of the map if still there, so no later miss waits on a dead read.
struct Leader<'a> {
    reads: &'a DashMap<Box<[u8]>, Arc<Flight>>,
    keys: &'a [&'a [u8]],
    /// Index into `keys`, and the flight this request leads for that key.
    flights: Vec<(usize, Arc<Flight>)>,
}

impl Leader<'_> {
    fn finish(self) {}
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        for (i, flight) in &self.flights {
            self.reads
                .remove_if(self.keys[*i], |_, f| Arc::ptr_eq(f, flight));
        }
    }
}
