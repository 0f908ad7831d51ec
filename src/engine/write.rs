//! The write path: every command that changes an item. Each one is a single
//! conditional write in the store, so racing sidecars agree: `add`,
//! `replace` and `cas` are conditional puts; `append`, `prepend`, `incr` and
//! `decr` read, compute, and put conditioned on the version they read,
//! retrying from the item the failed condition returned.

use std::sync::Arc;

use dashmap::DashMap;

use super::stats::bump;
use super::{Answer, Engine, expiry};
use crate::metrics::Outcome;
use crate::protocol::{Reply, StoreMode};
use crate::store::{PutCondition, PutResult, Store, StoreError, StoredItem, View};

/// Attempts of a read-modify-write before giving up on a hot key.
const RMW_ATTEMPTS: usize = 64;

const NON_NUMERIC: Reply<'static> =
    Reply::ClientError("cannot increment or decrement non-numeric value");

/// How a read-modify-write ended.
enum Modified {
    /// The key held no live item.
    Missing,
    /// The new item is stored.
    Written(StoredItem),
    /// The change was refused with this reply (e.g. a non-numeric incr).
    Refused(Reply<'static>),
    /// The live item is not the version asked for; this is what it is.
    Mismatch(StoredItem),
}

/// How a storage command ended.
pub(super) enum StoreResult {
    Stored(StoredItem),
    /// A condition of `add`, `replace`, `append` or `prepend` failed.
    NotStored,
    /// The cas unique did not match.
    Exists,
    /// A `cas` found no item.
    NotFound,
}

/// How an `incr`/`decr` ended.
pub(super) enum Arith {
    /// Stored, with the new number.
    Written(StoredItem, u64),
    Missing,
    /// The cas unique did not match.
    Mismatch,
    Refused(Reply<'static>),
}

impl<S: Store> Engine<S> {
    pub(super) async fn store_item(
        &self,
        mode: StoreMode,
        key: &[u8],
        flags: u32,
        exptime: i32,
        data: &[u8],
        view: View,
    ) -> Answer {
        let stored = self
            .store_inner(mode, None, key, flags, exptime, data, view)
            .await?;
        Ok(match stored {
            StoreResult::Stored(_) => (Outcome::Stored, Reply::Stored),
            StoreResult::NotStored => (Outcome::NotStored, Reply::NotStored),
            StoreResult::Exists => (Outcome::NotStored, Reply::Exists),
            StoreResult::NotFound => (Outcome::NotFound, Reply::NotFound),
        })
    }

    /// A storage command, for the classic commands and `ms`. `cas` asks
    /// `append`/`prepend` to apply only to that version (`ms MA C<cas>`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_inner(
        &self,
        mode: StoreMode,
        cas: Option<u64>,
        key: &[u8],
        flags: u32,
        exptime: i32,
        data: &[u8],
        view: View,
    ) -> Result<StoreResult, StoreError> {
        self.store.check_key(key)?;
        bump(&self.stats.cmd_set);
        let _lock = self.writes.lock(key).await;
        if let StoreMode::Append | StoreMode::Prepend = mode {
            let modified = self
                .append(mode == StoreMode::Append, key, data, cas, view)
                .await;
            self.reads.remove(key);
            return match modified {
                Ok(Modified::Written(item)) => Ok(self.stored(key, item, view)),
                Ok(Modified::Mismatch(current)) => {
                    self.fill(key, &current, view);
                    Ok(StoreResult::Exists)
                }
                Ok(_) => {
                    self.cache.remove(key);
                    Ok(StoreResult::NotStored)
                }
                Err(e) => {
                    self.cache.remove(key);
                    Err(e)
                }
            };
        }
        let item = StoredItem {
            value: data.to_vec(),
            flags,
            expires_at: expiry(exptime, view.now),
            version: self.versions.next_after(view.flushed_before),
        };
        let condition = match mode {
            StoreMode::Add => PutCondition::Absent,
            StoreMode::Replace => PutCondition::Live,
            StoreMode::Cas(unique) => PutCondition::Version(unique),
            _ => PutCondition::Always,
        };
        let result = self.store.put(key, &item, condition, view).await;
        self.reads.remove(key);
        let result = match result {
            Ok(result) => result,
            Err(e) => {
                self.cache.remove(key);
                return Err(e);
            }
        };
        Ok(match (result, mode) {
            (PutResult::Stored, StoreMode::Cas(_)) => {
                bump(&self.stats.cas_hits);
                self.stored(key, item, view)
            }
            (PutResult::Stored, _) => self.stored(key, item, view),
            (
                PutResult::Failed {
                    current: Some(current),
                },
                StoreMode::Cas(_),
            ) => {
                bump(&self.stats.cas_badval);
                // The store told us what it holds: a client retrying its
                // `gets` here now sees that version.
                self.fill(key, &current, view);
                StoreResult::Exists
            }
            (PutResult::Failed { current: None }, StoreMode::Cas(_)) => {
                bump(&self.stats.cas_misses);
                self.cache.remove(key);
                StoreResult::NotFound
            }
            (PutResult::Failed { current }, _) => {
                // The store told us what it holds: cache exactly that.
                match current {
                    Some(current) => self.fill(key, &current, view),
                    None => {
                        self.cache.remove(key);
                    }
                }
                StoreResult::NotStored
            }
        })
    }

    fn stored(&self, key: &[u8], item: StoredItem, view: View) -> StoreResult {
        bump(&self.stats.total_items);
        self.fill(key, &item, view);
        StoreResult::Stored(item)
    }

    /// `append`/`prepend`: the live item's value with `data` added; flags
    /// and expiry stay as they are.
    async fn append(
        &self,
        append: bool,
        key: &[u8],
        data: &[u8],
        cas: Option<u64>,
        view: View,
    ) -> Result<Modified, StoreError> {
        self.modify(key, view, cas, None, |item| {
            let (first, second) = if append {
                (&item.value[..], data)
            } else {
                (data, &item.value[..])
            };
            Ok([first, second].concat())
        })
        .await
    }

    /// `incr`/`decr` with memcached's arithmetic: unsigned 64-bit, incr
    /// wraps, decr stops at 0; a shorter result is padded with spaces to the
    /// old length, as memcached rewrites the value in place.
    pub(super) async fn arith(&self, incr: bool, key: &[u8], delta: u64, view: View) -> Answer {
        match self.arith_inner(incr, key, delta, None, None, view).await? {
            Arith::Written(_, n) => Ok((Outcome::Ok, Reply::Number(n))),
            Arith::Missing | Arith::Mismatch => Ok((Outcome::NotFound, Reply::NotFound)),
            Arith::Refused(reply) => Ok((Outcome::ClientError, reply)),
        }
    }

    /// `incr`/`decr` (and `ma`): `cas` applies it only to that version,
    /// `expires_at` also sets the item's expiry.
    pub(super) async fn arith_inner(
        &self,
        incr: bool,
        key: &[u8],
        delta: u64,
        cas: Option<u64>,
        expires_at: Option<u32>,
        view: View,
    ) -> Result<Arith, StoreError> {
        self.store.check_key(key)?;
        let _lock = self.writes.lock(key).await;
        let modified = self
            .modify(key, view, cas, expires_at, |item| {
                let Some(old) = parse_counter(&item.value) else {
                    return Err(NON_NUMERIC);
                };
                let new = if incr {
                    old.wrapping_add(delta)
                } else {
                    old.saturating_sub(delta)
                };
                let mut value = new.to_string().into_bytes();
                if value.len() < item.value.len() {
                    value.resize(item.value.len(), b' ');
                }
                Ok(value)
            })
            .await;
        self.reads.remove(key);
        let (hits, misses) = if incr {
            (&self.stats.incr_hits, &self.stats.incr_misses)
        } else {
            (&self.stats.decr_hits, &self.stats.decr_misses)
        };
        match modified {
            Ok(Modified::Written(item)) => {
                bump(hits);
                self.fill(key, &item, view);
                let n = parse_counter(&item.value).expect("just written as a number");
                Ok(Arith::Written(item, n))
            }
            Ok(Modified::Missing) => {
                bump(misses);
                self.cache.remove(key);
                Ok(Arith::Missing)
            }
            Ok(Modified::Mismatch(current)) => {
                self.fill(key, &current, view);
                Ok(Arith::Mismatch)
            }
            Ok(Modified::Refused(reply)) => Ok(Arith::Refused(reply)),
            Err(e) => {
                self.cache.remove(key);
                Err(e)
            }
        }
    }

    /// Read-modify-write of `key`'s value, atomic in the store: the new
    /// value is put only if the item still has the version it was computed
    /// from; otherwise the put's answer (the current item) is the next
    /// attempt's input. Starts from the cached copy when there is one (a
    /// stale copy just costs one failed put), else from a consistent read.
    /// With `expect`, only that version is changed (a cached copy of another
    /// version is checked against the store first); with `expires_at`, the
    /// expiry changes too.
    async fn modify(
        &self,
        key: &[u8],
        view: View,
        expect: Option<u64>,
        expires_at: Option<u32>,
        change: impl Fn(&StoredItem) -> Result<Vec<u8>, Reply<'static>>,
    ) -> Result<Modified, StoreError> {
        let mut from_cache = true;
        let mut current = match self.cache.get(key, view.now) {
            Some(entry) if entry.version >= view.flushed_before => Some(StoredItem {
                value: entry.value().to_vec(),
                flags: entry.flags,
                expires_at: entry.expires_at,
                version: entry.version,
            }),
            _ => {
                from_cache = false;
                self.store.get(key, view).await?
            }
        };
        for _ in 0..RMW_ATTEMPTS {
            let Some(item) = current else {
                return Ok(Modified::Missing);
            };
            if let Some(expect) = expect
                && item.version != expect
            {
                if from_cache {
                    from_cache = false;
                    current = self.store.get(key, view).await?;
                    continue;
                }
                return Ok(Modified::Mismatch(item));
            }
            let value = match change(&item) {
                Ok(value) => value,
                Err(reply) => return Ok(Modified::Refused(reply)),
            };
            let new = StoredItem {
                value,
                flags: item.flags,
                expires_at: expires_at.unwrap_or(item.expires_at),
                version: self
                    .versions
                    .next_after(item.version.max(view.flushed_before)),
            };
            match self
                .store
                .put(key, &new, PutCondition::Version(item.version), view)
                .await?
            {
                PutResult::Stored => return Ok(Modified::Written(new)),
                PutResult::Failed { current: now } => {
                    from_cache = false;
                    current = now;
                }
            }
        }
        Err(StoreError::Contention)
    }

    pub(super) async fn delete(&self, key: &[u8], view: View) -> Answer {
        self.store.check_key(key)?;
        let _lock = self.writes.lock(key).await;
        let result = self.store.delete(key, view).await;
        self.reads.remove(key);
        self.cache.remove(key);
        match result? {
            true => {
                bump(&self.stats.delete_hits);
                Ok((Outcome::Deleted, Reply::Deleted))
            }
            false => {
                bump(&self.stats.delete_misses);
                Ok((Outcome::NotFound, Reply::NotFound))
            }
        }
    }

    /// `md <key> C<cas>`: deletes the item only if it has that version. The
    /// store has no conditional delete, so the item is overwritten, under
    /// the version condition, by an empty one that expires now: no reader
    /// sees it again, and the table's TTL removes it.
    pub(super) async fn delete_version(
        &self,
        key: &[u8],
        version: u64,
        view: View,
    ) -> Result<StoreResult, StoreError> {
        self.store.check_key(key)?;
        let _lock = self.writes.lock(key).await;
        let tombstone = StoredItem {
            value: Vec::new(),
            flags: 0,
            expires_at: view.now.max(1),
            version: self.versions.next_after(version.max(view.flushed_before)),
        };
        let result = self
            .store
            .put(key, &tombstone, PutCondition::Version(version), view)
            .await;
        self.reads.remove(key);
        self.cache.remove(key);
        Ok(match result? {
            PutResult::Stored => {
                bump(&self.stats.delete_hits);
                StoreResult::Stored(tombstone)
            }
            PutResult::Failed {
                current: Some(current),
            } => {
                self.fill(key, &current, view);
                StoreResult::Exists
            }
            PutResult::Failed { current: None } => {
                bump(&self.stats.delete_misses);
                StoreResult::NotFound
            }
        })
    }

    pub(super) async fn touch(&self, key: &[u8], exptime: i32, view: View) -> Answer {
        self.store.check_key(key)?;
        bump(&self.stats.cmd_touch);
        match self
            .touch_item(key, expiry(exptime, view.now), view)
            .await?
        {
            Some(_) => {
                bump(&self.stats.touch_hits);
                Ok((Outcome::Touched, Reply::Touched))
            }
            None => {
                bump(&self.stats.touch_misses);
                Ok((Outcome::NotFound, Reply::NotFound))
            }
        }
    }

    /// Sets the expiry of `key` in the store and caches the result.
    pub(super) async fn touch_item(
        &self,
        key: &[u8],
        expires_at: u32,
        view: View,
    ) -> Result<Option<StoredItem>, StoreError> {
        let _lock = self.writes.lock(key).await;
        let result = self.store.touch(key, expires_at, view).await;
        self.reads.remove(key);
        match &result {
            Ok(Some(item)) => self.fill(key, item, view),
            _ => {
                self.cache.remove(key);
            }
        }
        result
    }
}

/// A counter value as memcached's `strtoull` reads it: surrounding
/// whitespace allowed (memcached pads shrunk values with spaces), digits
/// only, at most 2^64 - 1.
fn parse_counter(value: &[u8]) -> Option<u64> {
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
#[derive(Default)]
pub(super) struct KeyLocks {
    locks: DashMap<Box<[u8]>, Arc<tokio::sync::Mutex<()>>>,
}

struct KeyLockGuard<'a> {
    locks: &'a KeyLocks,
    key: Box<[u8]>,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    async fn lock(&self, key: &[u8]) -> KeyLockGuard<'_> {
        let lock = self.locks.entry(Box::from(key)).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        KeyLockGuard {
            locks: self,
            key: Box::from(key),
            lock: Some(lock),
            guard: Some(guard),
        }
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
