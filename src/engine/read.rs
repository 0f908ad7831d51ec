//! The read path: `get`/`gets` served from memory where possible, misses
//! read from the store (coalesced per key, batched per request), and
//! `gat`/`gats`, which are writes of the expiry that answer values.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::watch;

use super::write::{Done, Op};
use super::{Engine, REPLY_HEAD, error_reply, expiry, value_reply};
use crate::cache::{EntryRef, Fill, Miss};
use crate::metrics::{Event, Outcome};
use crate::output::Output;
use crate::protocol::{Keys, Reply};
use crate::store::{Item, Store, StoreError, View};

impl<S: Store> Engine<S> {
    /// `get`/`gets`: hits answered from memory, misses read from the store
    /// in windows of keys (one batch each, see `READ_AHEAD`), every value
    /// written out as the output fills, so a request of any number of keys
    /// holds a bounded amount of memory.
    pub(super) async fn get(
        &self,
        keys: Keys<'_>,
        cas: bool,
        out: &mut Output<'_>,
        view: View,
    ) -> Outcome {
        let start = out.mark();
        let now_ms = self.now_ms();
        // A request with a key the table cannot hold is refused whole,
        // before any of it is answered: the key list checked at once (a
        // classic key has no space, so none is reserved). A single key is
        // checked on a miss: a key the table cannot hold is never cached,
        // so never a hit.
        let mut rest = keys.iter();
        if keys.0.contains(&b' ')
            && let Err(e) = self.store.check_key_list(keys.0)
        {
            return error_reply(out.buf(), &e);
        }
        // Fast path: answer hits straight from the cache, allocating nothing,
        // until the first key that needs the store.
        let mut pending = None;
        for key in rest.by_ref() {
            self.count_read(key);
            let lookup = self
                .hit_in_place(key, view, now_ms, out, |entry, buf| {
                    let (flags, version) = (entry.flags(), entry.version());
                    value_reply(buf, key, flags, entry.value(), version, cas);
                })
                .await;
            match lookup {
                Ok(()) => {
                    self.count_hit(key);
                    self.counters.record(Event::GetHits);
                }
                Err(lookup) => {
                    pending = Some((key, lookup));
                    break;
                }
            }
        }
        let Some(first_miss) = pending else {
            Reply::End.encode(out.buf());
            return Outcome::Hit;
        };

        // Slow path: the rest of the keys, a window at a time.
        let mut all_hit = true;
        let window = self.get_window();
        let mut lookups = vec![first_miss];
        loop {
            while lookups.len() < window
                && let Some(key) = rest.next()
            {
                self.count_read(key);
                let lookup = self.fresh(key, view, now_ms);
                lookups.push((key, lookup));
            }
            if lookups.is_empty() {
                break;
            }
            match self.answer_window(&mut lookups, cas, out, view).await {
                Ok(hit) => all_hit &= hit,
                Err(e) => {
                    // Never a partial answer that reads as a miss: the error
                    // alone if nothing was written yet, else instead of END.
                    out.truncate(start);
                    return error_reply(out.buf(), &e);
                }
            }
            lookups.clear();
        }
        Reply::End.encode(out.buf());
        if all_hit { Outcome::Hit } else { Outcome::Miss }
    }

    /// Answers a window of a multi-get's keys, in order: what the cache had,
    /// and the rest read from the store in one go. Returns whether every key
    /// was found.
    async fn answer_window(
        &self,
        lookups: &mut [(&[u8], Lookup)],
        cas: bool,
        out: &mut Output<'_>,
        view: View,
    ) -> Result<bool, StoreError> {
        let mut wanted: Vec<&[u8]> = Vec::new();
        for (key, lookup) in lookups.iter() {
            // Local keys are in memory or nowhere: never read from the store.
            // A negative entry says the store holds nothing: not read either.
            if !matches!(lookup, Lookup::Fresh(_) | Lookup::Negative)
                && !wanted.contains(key)
                && !self.is_local(key)
            {
                wanted.push(key);
            }
        }
        self.check_keys(wanted.iter().copied())?;
        if lookups.len() > 1 {
            // Values held ahead of writing them (copies of cached ones, and
            // those read) count against the output's memory: room for the
            // largest they can be, reserved first.
            let ahead = lookups.len() * (self.options.item_size_max + REPLY_HEAD);
            out.make_room(ahead).await;
        }
        // Old copies may stand in for a re-read, if allowed (every key
        // not fresh has one).
        let stale_ok = self.options.stale_on_error
            && lookups
                .iter()
                .all(|(k, l)| !matches!(l, Lookup::Absent) || self.is_local(k));
        let fetched = if wanted.is_empty() {
            Some(Vec::new())
        } else if stale_ok {
            self.reread(&wanted, view).await
        } else {
            Some(self.fetch(&wanted, view).await?)
        };
        let mut all_hit = true;
        for (key, lookup) in lookups.iter_mut() {
            let key: &[u8] = key;
            let found = match (std::mem::replace(lookup, Lookup::Absent), &fetched) {
                (Lookup::Fresh(item), _) => {
                    self.count_hit(key);
                    Some(Arc::new(item))
                }
                (Lookup::Negative, _) => None,
                (_, _) if self.is_local(key) => {
                    self.counters.record(Event::LocalMisses);
                    None
                }
                (Lookup::Aged(item), None) => {
                    self.counters.record(Event::CacheStaleServed);
                    Some(Arc::new(item))
                }
                (_, Some(fetched)) => {
                    self.counters.record(Event::CacheMisses);
                    let i = wanted
                        .iter()
                        .position(|k| *k == key)
                        .expect("every miss was fetched");
                    fetched[i].clone()
                }
                (Lookup::Absent, None) => {
                    unreachable!("an absent key makes a failed fetch an error")
                }
            };
            match found {
                Some(item) => {
                    self.counters.record(Event::GetHits);
                    out.make_room(key.len() + item.value.len() + REPLY_HEAD)
                        .await;
                    value_reply(out.buf(), key, item.flags, &item.value, item.version, cas);
                }
                None => {
                    self.counters.record(Event::GetMisses);
                    all_hit = false;
                }
            }
        }
        Ok(all_hit)
    }

    /// One key through the get path (cache, `max_local_age`, coalesced
    /// store read, stale copy on a failed re-read if allowed): `mg`, `me`.
    pub(super) async fn lookup(&self, key: &[u8], view: View) -> Result<Option<Item>, StoreError> {
        self.count_read(key);
        let lookup = self.fresh(key, view, self.now_ms());
        self.finish_lookup(key, view, lookup).await
    }

    /// [`Engine::lookup`] once the cache has been asked: `lookup` is its answer.
    pub(super) async fn finish_lookup(
        &self,
        key: &[u8],
        view: View,
        lookup: Lookup,
    ) -> Result<Option<Item>, StoreError> {
        let found = match lookup {
            Lookup::Fresh(item) => {
                self.count_hit(key);
                Some(item)
            }
            Lookup::Negative => None,
            _ if self.is_local(key) => {
                self.counters.record(Event::LocalMisses);
                None
            }
            Lookup::Aged(item) if self.options.stale_on_error => {
                match self.reread(&[key], view).await {
                    Some(mut items) => {
                        self.counters.record(Event::CacheMisses);
                        items.pop().flatten().map(Arc::unwrap_or_clone)
                    }
                    None => {
                        self.counters.record(Event::CacheStaleServed);
                        Some(item)
                    }
                }
            }
            _ => {
                let mut items = self.fetch(&[key], view).await?;
                self.counters.record(Event::CacheMisses);
                items.pop().flatten().map(Arc::unwrap_or_clone)
            }
        };
        self.counters.record(match found {
            Some(_) => Event::GetHits,
            None => Event::GetMisses,
        });
        Ok(found)
    }

    /// Refuses a whole retrieval, before answering any of it, if the table
    /// cannot hold one of its keys.
    fn check_keys<'k>(&self, mut keys: impl Iterator<Item = &'k [u8]>) -> Result<(), StoreError> {
        keys.try_for_each(|key| self.check_key(key))
    }

    /// Re-reads entries past `max_local_age` whose old copies may stand in:
    /// None (serve the copies) at once while DynamoDB is known to be
    /// failing, or when the read fails or takes longer than `REVALIDATE_WAIT`.
    async fn reread(&self, keys: &[&[u8]], view: View) -> Option<Vec<Option<Arc<Item>>>> {
        if self.store_down() {
            return None;
        }
        match tokio::time::timeout(REVALIDATE_WAIT, self.fetch(keys, view)).await {
            Ok(Ok(fetched)) => Some(fetched),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "serving entries past max_local_age: the store failed");
                None
            }
            Err(_) => None,
        }
    }

    /// A hit encoded from the cache into `out` in place, under its shard's
    /// lock (`encode` writes the reply). One that does not fit the output
    /// waits for room first and is then looked up again: nothing is copied.
    /// When the answer is not a fresh entry, nothing is left in `out`.
    pub(super) async fn hit_in_place(
        &self,
        key: &[u8],
        view: View,
        now_ms: u64,
        out: &mut Output<'_>,
        encode: impl Fn(&EntryRef<'_>, &mut bytes::BytesMut),
    ) -> Result<(), Lookup> {
        loop {
            let mark = out.mark();
            let served = self.fresh_with(key, view, now_ms, |entry| {
                let size = key.len() + entry.value().len() + REPLY_HEAD;
                if !out.fits(size) {
                    return Err(size);
                }
                encode(&entry, out.buf());
                Ok(())
            });
            match served.served() {
                Ok(Err(size)) => out.make_room(size).await,
                Ok(Ok(())) => return Ok(()),
                Err(lookup) => {
                    out.truncate(mark);
                    return Err(lookup);
                }
            }
        }
    }

    /// What the cache can do for `key`: a fresh entry, one past
    /// `max_local_age` (to re-read, kept as a fallback), or nothing.
    fn fresh(&self, key: &[u8], view: View, now_ms: u64) -> Lookup {
        self.fresh_with(key, view, now_ms, |entry| entry.to_item())
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
        // Fleet mode: memory is served only while every peer's lease is
        // held, checked on the clock of this moment (not the request's
        // start: the process may have been paused since), and again after
        // the entry was read: only if this member was coherent throughout
        // (same epoch) was the entry current at some instant of the read.
        // A caller that `serve`d into its output drops what it wrote when
        // the answer is not `Fresh`.
        let fleet = self.fleet.get().map(|fleet| (fleet, fleet.epoch()));
        if let Some((fleet, _)) = fleet
            && !fleet.coherent(self.now_ms())
        {
            self.counters.record(Event::FleetReadsThrough);
            return Lookup::Absent;
        }
        // Local keys have no copy in DynamoDB to re-read: never aged.
        let cache = self.cache_for(key);
        let max = match self.is_local(key) {
            true => 0,
            false => self.options.max_local_age.as_millis() as u64,
        };
        let found = cache.lookup(key, view.now, |entry| {
            let aged = max > 0 && now_ms.saturating_sub(entry.filled_at_ms()) >= max;
            if entry.is_absent() {
                // Known absent, if recently enough; else read again (never
                // served stale: an old "absent" could be a false miss).
                if aged {
                    Found::NegativeAged
                } else {
                    Found::Negative
                }
            } else if entry.version() < view.flushed_before {
                // Written before a flush_all that has taken effect.
                Found::Flushed
            } else if aged {
                Found::Aged(entry.to_item())
            } else {
                Found::Fresh(serve(entry))
            }
        });
        if let Some((fleet, epoch)) = fleet
            && !(fleet.coherent(self.now_ms()) && fleet.epoch() == epoch)
        {
            self.counters.record(Event::FleetReadsThrough);
            return Lookup::Absent;
        }
        match found {
            Err(Miss::Absent) => Lookup::Absent,
            Err(Miss::Expired) => {
                self.counters.record(Event::GetExpired);
                Lookup::Absent
            }
            Ok(Found::Fresh(served)) => Lookup::Fresh(served),
            Ok(Found::Flushed) => {
                cache.remove(key);
                self.counters.record(Event::GetFlushed);
                Lookup::Absent
            }
            Ok(Found::Aged(aged)) => {
                self.counters.record(Event::CacheRevalidations);
                Lookup::Aged(aged)
            }
            Ok(Found::Negative) => {
                self.counters.record(Event::CacheNegativeHits);
                Lookup::Negative
            }
            Ok(Found::NegativeAged) => Lookup::Absent,
        }
    }

    /// Reads `keys` (distinct) from the store, joining reads already in
    /// flight for any of them, and fills the cache with what it read unless
    /// a write to the key completed meanwhile.
    async fn fetch(
        &self,
        keys: &[&[u8]],
        view: View,
    ) -> Result<Vec<Option<Arc<Item>>>, StoreError> {
        let mut results: Vec<Option<Option<Arc<Item>>>> = vec![None; keys.len()];
        let mut lead = Leader {
            reads: &self.reads,
            keys,
            flights: Vec::new(),
        };
        let mut follow = Vec::new();
        // Fleet mode, not coherent: peers' writes do not wait for this
        // member, so a read in flight may predate one acknowledged since;
        // every get reads for itself.
        let incoherent = self.fleet.get().is_some_and(|f| !f.coherent(self.now_ms()));
        for (i, key) in keys.iter().enumerate() {
            match self.reads.entry(Box::from(*key)) {
                dashmap::Entry::Occupied(_) if incoherent => {
                    // Its own flight, outside the map (its result fills nothing).
                    lead.flights.push((i, Arc::new(Flight::new())));
                }
                dashmap::Entry::Occupied(e) => follow.push((i, e.get().result.subscribe())),
                dashmap::Entry::Vacant(e) => {
                    let flight = Arc::new(Flight::new());
                    e.insert(flight.clone());
                    lead.flights.push((i, flight));
                }
            }
        }
        if !lead.flights.is_empty() {
            let mut lead_keys: Vec<&[u8]> = lead.flights.iter().map(|(i, _)| keys[*i]).collect();
            let epoch = self.epoch_now();
            // Fleet mode, not coherent: a flush_all acknowledged meanwhile
            // did not wait for this member, so the marker comes along.
            let with_marker = self.fleet.get().is_some_and(|f| !f.coherent(self.now_ms()));
            if with_marker {
                lead_keys.push(super::admin::FLUSH_MARKER_KEY);
            }
            // What the read finds is stamped with when it was asked for:
            // its age, and so `max_local_age`, counts the time DynamoDB took
            // to answer (a write elsewhere may have landed meanwhile).
            let now_ms = self.now_ms();
            let read = match lead_keys.as_slice() {
                [one] => self.store.get(one).await.map(|item| vec![item]),
                many => self.store.get_many(many).await,
            };
            self.note_store(&read);
            let mut view = view;
            let read = read.map(|mut items| {
                if with_marker {
                    if let Some(marker) = items.pop().flatten() {
                        self.apply_flush(marker.version);
                    }
                    view = self.view(view.now);
                }
                items
            });
            match read {
                Ok(items) => {
                    for ((i, flight), found) in lead.flights.iter().zip(items) {
                        // Fill only if no write took the flight out of the map.
                        let key = keys[*i];
                        self.reads.remove_if(key, |_, f| {
                            let ours = Arc::ptr_eq(f, flight);
                            if ours && self.observed(key, found.as_ref()) {
                                match &found {
                                    Some(item) if item.is_live(view) => {
                                        self.fill_at(key, item, view, now_ms, epoch, Fill::Read)
                                    }
                                    _ => self.fill_absent(key, view, now_ms, epoch),
                                }
                            }
                            ours
                        });
                        // Shared, not copied, with the requests that joined.
                        let item = found.filter(|item| item.is_live(view)).map(Arc::new);
                        let _ = flight.result.send(Some(Ok(item.clone())));
                        results[*i] = Some(item);
                    }
                }
                Err(e) => {
                    for (_, flight) in &lead.flights {
                        let _ = flight.result.send(Some(Err(e.clone())));
                    }
                    return Err(e);
                }
            }
            lead.finish();
        }
        for (i, mut rx) in follow {
            self.counters.record(Event::CacheCoalesced);
            let shared = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| (*v).clone());
            results[i] = Some(match shared {
                Some(result) => result?,
                // The leader went away without an answer: read it ourselves.
                None => self
                    .store
                    .get(keys[i])
                    .await?
                    .filter(|item| item.is_live(view))
                    .map(Arc::new),
            });
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every key was read"))
            .collect())
    }

    /// `gat`/`gats`: each key's expiry is updated in the store (a write
    /// through the write path, so other sidecars agree), and the items found
    /// are answered: even one the new exptime has already expired (`gat -1`),
    /// which is then gone, as in memcached.
    pub(super) async fn get_and_touch(
        &self,
        keys: Keys<'_>,
        cas: bool,
        exptime: i32,
        out: &mut Output<'_>,
        view: View,
    ) -> Outcome {
        if let Err(e) = self.check_keys(keys.iter()) {
            return error_reply(out.buf(), &e);
        }
        let start = out.mark();
        let mut all_hit = true;
        let op = Op::Touch {
            expires_at: expiry(exptime, view.now),
        };
        for key in keys.iter() {
            self.counters.record(Event::CmdTouch);
            self.count_read(key);
            match self.write(key, op, view).await {
                Ok(Done::Written(item)) => {
                    self.counters.record(Event::GetHits);
                    out.make_room(key.len() + item.value.len() + REPLY_HEAD)
                        .await;
                    value_reply(out.buf(), key, item.flags, &item.value, item.version, cas);
                }
                Ok(Done::Refused(..)) => {
                    self.counters.record(Event::GetMisses);
                    all_hit = false;
                }
                Err(e) => {
                    out.truncate(start);
                    return error_reply(out.buf(), &e);
                }
            }
        }
        Reply::End.encode(out.buf());
        if all_hit { Outcome::Hit } else { Outcome::Miss }
    }
}

/// What the cache holds for a key, as the get path sees it.
/// `T`: what was made of a fresh entry (a copy, or a reply already encoded).
pub(super) enum Lookup<T = Item> {
    Fresh(T),
    /// Older than `max_local_age`: re-read it, but keep it in case the store fails.
    Aged(Item),
    /// A negative entry younger than `max_local_age`: the store held
    /// nothing live for the key; answered as a miss without asking it.
    Negative,
    Absent,
}

/// What [`Engine::fresh_with`] found in the cache's entry.
enum Found<R> {
    Fresh(R),
    Flushed,
    Aged(Item),
    Negative,
    NegativeAged,
}

impl<T> Lookup<T> {
    /// What a fresh entry gave, or the lookup the store must finish.
    pub(super) fn served(self) -> Result<T, Lookup> {
        match self {
            Lookup::Fresh(served) => Ok(served),
            Lookup::Aged(item) => Err(Lookup::Aged(item)),
            Lookup::Negative => Err(Lookup::Negative),
            Lookup::Absent => Err(Lookup::Absent),
        }
    }
}

type ReadResult = Result<Option<Arc<Item>>, StoreError>;

/// The longest a re-read of an entry past `max_local_age` holds its request
/// when `stale_on_error` lets the old copy stand in: past it, the copy is
/// served.
pub(super) const REVALIDATE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// One store read in flight; requests missing the same key wait for its result.
pub(super) struct Flight {
    result: watch::Sender<Option<ReadResult>>,
}

impl Flight {
    /// Requests waiting for this read besides its leader (tests).
    #[cfg(test)]
    pub(super) fn followers(&self) -> usize {
        self.result.receiver_count()
    }

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
