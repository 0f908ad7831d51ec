//! An in-process [`Store`] for unit tests and micro-benchmarks. Not a
//! product feature: nothing held here survives the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::{Change, Expect, Item, Store, StoreError, View, Written};

/// A write that timed out, as it would still reach the table.
struct Late {
    key: Vec<u8>,
    put: Option<Item>,
    retime: (u32, u64),
    expect: Expect,
    view: View,
}

#[derive(Default)]
pub struct MemoryStore {
    items: Mutex<HashMap<Vec<u8>, Item>>,
    /// While set, every call fails as DynamoDB does in an outage.
    failing: AtomicBool,
    /// While set, writes are not applied and answer a timeout (their
    /// outcome unknown to the caller), as a write stuck in the network; they
    /// are kept, to land later ([`MemoryStore::land_late`]).
    timing_out: AtomicBool,
    late: Mutex<Vec<Late>>,
    calls: AtomicU64,
    /// While set, reads and writes take their answer (a write is applied),
    /// then wait to return it until released: a call in flight, its answer
    /// still on the way back, while something else happens.
    answers_held: AtomicBool,
    answers_waiting: AtomicU64,
    answers_released: tokio::sync::Notify,
    /// While set, another writer changes an item just before every write
    /// that expects a version of it, so those writes always lose the race.
    interfering: AtomicBool,
    /// Values longer than this are held as if split over several items
    /// (as [`super::DynamoStore`] splits them), each write checking the
    /// count it expects; 0 = never.
    chunk_size: AtomicUsize,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Makes every later call fail (true) or succeed again (false).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Holds every later read and write after it has taken its answer
    /// (true), or lets them all return (false).
    pub fn hold_answers(&self, held: bool) {
        self.answers_held.store(held, Ordering::SeqCst);
        if !held {
            self.answers_released.notify_waiters();
        }
    }

    /// Calls waiting to return (see [`MemoryStore::hold_answers`]).
    pub fn answers_waiting(&self) -> u64 {
        self.answers_waiting.load(Ordering::SeqCst)
    }

    async fn answer_gate(&self) {
        loop {
            let released = self.answers_released.notified();
            if !self.answers_held.load(Ordering::SeqCst) {
                return;
            }
            self.answers_waiting.fetch_add(1, Ordering::SeqCst);
            released.await;
            self.answers_waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A write, applied now (see [`Store::write`]).
    fn write_now(
        &self,
        key: &[u8],
        change: Change<'_>,
        expect: Expect,
        view: View,
    ) -> Result<Written, StoreError> {
        let mut items = self.enter()?;
        if self.timing_out.load(Ordering::SeqCst) {
            let (put, retime) = match change {
                Change::Put(item) => (Some(item.clone()), (0, 0)),
                Change::Retime {
                    expires_at,
                    version,
                } => (None, (expires_at, version)),
            };
            self.late.lock().unwrap().push(Late {
                key: key.to_vec(),
                put,
                retime,
                expect,
                view,
            });
            return Err(StoreError::Timeout);
        }
        if let Expect::Version { .. } = expect
            && self.interfering.load(Ordering::SeqCst)
            && let Some(item) = items.get_mut(key)
        {
            item.version += 1;
        }
        let chunk_size = self.chunk_size.load(Ordering::SeqCst);
        Ok(apply(&mut items, key, change, expect, view, chunk_size))
    }

    /// Makes every later write time out without being applied.
    pub fn set_timing_out(&self, timing_out: bool) {
        self.timing_out.store(timing_out, Ordering::SeqCst);
    }

    /// Applies, in order, the writes that timed out: what happens when a
    /// write stuck in the network reaches the table after all.
    pub fn land_late(&self) -> Vec<Written> {
        let late = std::mem::take(&mut *self.late.lock().unwrap());
        let mut items = self.items.lock().unwrap();
        let chunk_size = self.chunk_size.load(Ordering::SeqCst);
        late.into_iter()
            .map(|w| {
                let change = match &w.put {
                    Some(item) => Change::Put(item),
                    None => Change::Retime {
                        expires_at: w.retime.0,
                        version: w.retime.1,
                    },
                };
                apply(&mut items, &w.key, change, w.expect, w.view, chunk_size)
            })
            .collect()
    }

    /// Holds values as if split into items of `bytes` (0: never), so that a
    /// write naming the wrong number of them is refused, as DynamoDB refuses it.
    pub fn set_chunk_size(&self, bytes: usize) {
        self.chunk_size.store(bytes, Ordering::SeqCst);
    }

    /// Makes every version-conditioned write lose to a simulated other writer.
    pub fn set_interfering(&self, interfering: bool) {
        self.interfering.store(interfering, Ordering::SeqCst);
    }

    /// Calls made so far, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// What the store holds for `key`, expired or not.
    pub fn raw(&self, key: &[u8]) -> Option<Item> {
        self.items.lock().unwrap().get(key).cloned()
    }

    /// Puts an item directly, as another writer would.
    pub fn insert_raw(&self, key: &[u8], item: Item) {
        self.items.lock().unwrap().insert(key.to_vec(), item);
    }

    fn enter(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Vec<u8>, Item>>, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable);
        }
        Ok(self.items.lock().unwrap())
    }
}

impl Store for MemoryStore {
    fn check_key(&self, _key: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn check_key_list(&self, _keys: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn item_overhead(&self) -> usize {
        0
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Item>, StoreError> {
        let found = self.enter()?.get(key).cloned();
        self.answer_gate().await;
        Ok(found)
    }

    async fn write(
        &self,
        key: &[u8],
        change: Change<'_>,
        expect: Expect,
        view: View,
    ) -> Result<Written, StoreError> {
        let written = self.write_now(key, change, expect, view)?;
        self.answer_gate().await;
        Ok(written)
    }

    async fn ready(&self) -> Result<(), String> {
        match self.failing.load(Ordering::SeqCst) {
            true => Err("memory store set to fail".into()),
            false => Ok(()),
        }
    }
}

/// A conditional write, as DynamoDB decides it.
fn apply(
    items: &mut HashMap<Vec<u8>, Item>,
    key: &[u8],
    change: Change<'_>,
    expect: Expect,
    view: View,
    chunk_size: usize,
) -> Written {
    {
        let current = items.get(key);
        let holds = match (expect, current) {
            (Expect::Missing, None) => true,
            (
                Expect::Version {
                    version,
                    live,
                    chunks,
                },
                Some(item),
            ) => item.version == version && item.chunks == chunks && (!live || item.is_live(view)),
            _ => false,
        };
        if !holds {
            return Written::Conflict(current.cloned());
        }
    }
    let chunks = match change {
        Change::Put(item) => {
            let chunks = match chunk_size {
                0 => 0,
                size => u8::try_from(item.value.len().saturating_sub(1) / size).unwrap_or(u8::MAX),
            };
            items.insert(
                key.to_vec(),
                Item {
                    chunks,
                    ..item.clone()
                },
            );
            chunks
        }
        Change::Retime {
            expires_at,
            version,
        } => {
            let item = items.get_mut(key).expect("a version was expected");
            item.expires_at = expires_at;
            item.version = version;
            item.chunks
        }
    };
    Written::Done { chunks }
}
