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
}

impl<S: Store> Engine<S> {
    pub(super) async fn store_item(
        &self,
        mode: StoreMode,
        key: &[u8],
        flags: u32,
        exptime: i64,
        data: &[u8],
        view: View,
    ) -> Answer {
        self.store.check_key(key)?;
        bump(&self.stats.cmd_set);
        let _lock = self.writes.lock(key).await;
        if let StoreMode::Append | StoreMode::Prepend = mode {
            let modified = self
                .append(mode == StoreMode::Append, key, data, view)
                .await;
            self.reads.remove(key);
            return match modified {
                Ok(Modified::Written(item)) => self.stored(key, &item, view),
                Ok(_) => {
                    self.cache.remove(key);
                    Ok((Outcome::NotStored, Reply::NotStored))
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
        match (result, mode) {
            (PutResult::Stored, StoreMode::Cas(_)) => {
                bump(&self.stats.cas_hits);
                self.stored(key, &item, view)
            }
            (PutResult::Stored, _) => self.stored(key, &item, view),
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
                Ok((Outcome::NotStored, Reply::Exists))
            }
            (PutResult::Failed { current: None }, StoreMode::Cas(_)) => {
                bump(&self.stats.cas_misses);
                self.cache.remove(key);
                Ok((Outcome::NotFound, Reply::NotFound))
            }
            (PutResult::Failed { current }, _) => {
                // The store told us what it holds: cache exactly that.
                match current {
                    Some(current) => self.fill(key, &current, view),
                    None => {
                        self.cache.remove(key);
                    }
                }
                Ok((Outcome::NotStored, Reply::NotStored))
            }
        }
    }

    fn stored(&self, key: &[u8], item: &StoredItem, view: View) -> Answer {
        bump(&self.stats.total_items);
        self.fill(key, item, view);
        Ok((Outcome::Stored, Reply::Stored))
    }

    /// `append`/`prepend`: the live item's value with `data` added; flags
    /// and expiry stay as they are.
    async fn append(
        &self,
        append: bool,
        key: &[u8],
        data: &[u8],
        view: View,
    ) -> Result<Modified, StoreError> {
        self.modify(key, view, |item| {
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
        self.store.check_key(key)?;
        let _lock = self.writes.lock(key).await;
        let modified = self
            .modify(key, view, |item| {
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
                Ok((Outcome::Ok, Reply::Number(n)))
            }
            Ok(Modified::Missing) => {
                bump(misses);
                self.cache.remove(key);
                Ok((Outcome::NotFound, Reply::NotFound))
            }
            Ok(Modified::Refused(reply)) => Ok((Outcome::ClientError, reply)),
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
    async fn modify(
        &self,
        key: &[u8],
        view: View,
        change: impl Fn(&StoredItem) -> Result<Vec<u8>, Reply<'static>>,
    ) -> Result<Modified, StoreError> {
        let mut current = match self.cache.get(key, view.now) {
            Some(entry) if entry.version >= view.flushed_before => Some(StoredItem {
                value: entry.value().to_vec(),
                flags: entry.flags,
                expires_at: entry.expires_at,
                version: entry.version,
            }),
            _ => self.store.get(key, view).await?,
        };
        for _ in 0..RMW_ATTEMPTS {
            let Some(item) = current else {
                return Ok(Modified::Missing);
            };
            let value = match change(&item) {
                Ok(value) => value,
                Err(reply) => return Ok(Modified::Refused(reply)),
            };
            let new = StoredItem {
                value,
                flags: item.flags,
                expires_at: item.expires_at,
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
                PutResult::Failed { current: now } => current = now,
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

    pub(super) async fn touch(&self, key: &[u8], exptime: i64, view: View) -> Answer {
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
