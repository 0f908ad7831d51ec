//! `ItemCache`: the in-memory copy of recently used items.
//!
//! Sharded so that cores do not contend on one lock; each shard is an exact
//! LRU list over a slab of entries with a byte budget, so get, insert and
//! evict are O(1). A cached item costs one 48-byte slab slot (its metadata
//! and LRU links), one allocation holding exactly its key and value, and a
//! 4-byte slab index in the hash table: less than memcached's per-item
//! overhead (BENCHMARKS.md, section 3). An [`Entry`]'s allocation moves into
//! the cache as it is; a get hit is encoded from the cache in place under the
//! shard's lock ([`ItemCache::get_with`]), or copied out ([`ItemCache::get`]).
//!
//! The cache never talks to DynamoDB and decides nothing about consistency:
//! the engine tells it what to hold. It only keeps the byte budget (counting
//! keys, values and [`ENTRY_OVERHEAD`]) and never returns an expired entry.

use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;

use crate::item::{Item, is_expired};

/// Bytes charged per entry besides its key and value's allocation (see
/// [`allocation_size`]), so that the budget bounds real memory (measured
/// against RSS in BENCHMARKS.md):
/// - the slab slot (48 bytes);
/// - its hash-table index: 4 bytes and a control byte per bucket, at a load
///   factor between 7/16 and 7/8 (hashbrown doubles), so up to 12 bytes.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Slot>() + 12;

/// What an allocation of `len` bytes takes with mimalloc, the binary's
/// allocator: no header, and sizes rounded up to 8 bytes up to 64, then to
/// a quarter of the power of two below (80, 96, 112, 128, 160, ...).
pub fn allocation_size(len: usize) -> usize {
    if len <= 64 {
        return len.next_multiple_of(8);
    }
    let step = (len - 1).checked_ilog2().map_or(1, |log| 1usize << log) / 4;
    len.next_multiple_of(step)
}

const NIL: u32 = u32::MAX;

/// An item as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key followed by the value, in one allocation (moved into the
    /// cache as it is).
    kv: Box<[u8]>,
    key_len: u8,
    pub flags: u32,
    /// Unix seconds after which the item is gone; 0 = never.
    pub expires_at: u32,
    /// The item's version in the store (its cas unique).
    pub version: u64,
    /// When the engine last had this from the store (its own clock, in ms),
    /// to bound how stale a copy may get ([`Entry::filled_at`]).
    pub filled_at_ms: u64,
    /// The store's [`Item::chunks`], kept so a write over this copy names
    /// them.
    pub chunks: u8,
    /// A negative entry: the store held no live item for the key when it
    /// was read (see [`Entry::absent`]).
    pub absent: bool,
}

impl Entry {
    /// Builds an entry; `key` must be at most 255 bytes (the protocol allows 250).
    pub fn new(key: &[u8], value: &[u8], flags: u32, expires_at: u32, version: u64) -> Entry {
        let key_len = u8::try_from(key.len()).expect("keys are at most 250 bytes");
        let mut kv = Vec::with_capacity(key.len() + value.len());
        kv.extend_from_slice(key);
        kv.extend_from_slice(value);
        Entry {
            kv: kv.into(),
            key_len,
            flags,
            expires_at,
            version,
            filled_at_ms: 0,
            chunks: 0,
            absent: false,
        }
    }

    /// A negative entry for `key`: the store held nothing live for it at
    /// `version` (a version taken when its read began, so a `flush_all`
    /// after that hides it as it hides items). No value; charged for its
    /// key and overhead like any entry. [`ItemCache::get`] never returns it:
    /// it is no copy of an item.
    pub fn absent(key: &[u8], version: u64) -> Entry {
        Entry {
            absent: true,
            ..Entry::new(key, b"", 0, 0, version)
        }
    }

    /// The same entry, held by the store over `1 + chunks` items.
    pub fn chunks(mut self, chunks: u8) -> Entry {
        self.chunks = chunks;
        self
    }

    /// The same entry, marked as read from the store at `ms`.
    pub fn filled_at(mut self, ms: u64) -> Entry {
        self.filled_at_ms = ms;
        self
    }

    pub fn key(&self) -> &[u8] {
        &self.kv[..usize::from(self.key_len)]
    }

    pub fn value(&self) -> &[u8] {
        &self.kv[usize::from(self.key_len)..]
    }

    /// Bytes this entry is charged against the budget.
    pub fn charge(&self) -> usize {
        entry_charge(self.kv.len())
    }
}

/// An entry seen in place, in the cache, for as long as its shard is locked.
pub struct EntryRef<'a>(&'a Slot);

impl EntryRef<'_> {
    pub fn key(&self) -> &[u8] {
        self.0.key()
    }

    pub fn value(&self) -> &[u8] {
        &self.0.kv[self.0.key().len()..]
    }

    pub fn flags(&self) -> u32 {
        self.0.flags
    }

    pub fn version(&self) -> u64 {
        self.0.version
    }

    pub fn expires_at(&self) -> u32 {
        self.0.expires_at
    }

    pub fn filled_at_ms(&self) -> u64 {
        self.0.packed & FILLED_MASK
    }

    pub fn chunks(&self) -> u8 {
        (self.0.packed >> CHUNKS_SHIFT) as u8
    }

    /// Whether this is a negative entry ([`Entry::absent`]).
    pub fn is_absent(&self) -> bool {
        self.0.packed & ABSENT != 0
    }

    /// A copy that outlives the lock.
    pub fn to_item(&self) -> Item {
        Item {
            value: self.value().to_vec(),
            flags: self.0.flags,
            expires_at: self.0.expires_at,
            version: self.0.version,
            chunks: self.chunks(),
        }
    }
}

/// Why the cache had no entry to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    Absent,
    /// There was one, but it had expired (now dropped).
    Expired,
}

/// Counters since start, for metrics and `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub items: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
    pub evictions: u64,
    pub expirations: u64,
}

pub struct ItemCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: foldhash::quality::RandomState,
    /// Picks a shard from a hash's middle bits: the table itself uses the
    /// low bits and the top seven, which must stay varied within a shard.
    shard_mask: u64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    limit_bytes: AtomicU64,
}

impl ItemCache {
    /// A cache of at most `limit_bytes` over `shards` shards (rounded up to a
    /// power of two). An item larger than one shard's share is not cached.
    pub fn new(limit_bytes: u64, shards: usize) -> ItemCache {
        let shards = shards.max(1).next_power_of_two();
        let per_shard = per_shard_limit(limit_bytes, shards);
        ItemCache {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            hasher: foldhash::quality::RandomState::default(),
            shard_mask: shards as u64 - 1,
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            limit_bytes: AtomicU64::new(limit_bytes),
        }
    }

    /// The default shard count: enough that cores rarely meet on one lock.
    pub fn default_shards() -> usize {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        (cores * 8).next_power_of_two()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[((hash >> 32) & self.shard_mask) as usize]
    }

    /// A copy of the live entry for `key`, marked most recently used. An
    /// expired entry is dropped and reported as absent.
    pub fn get(&self, key: &[u8], now: u32) -> Option<Item> {
        self.get_with(key, now, |entry| {
            (!entry.is_absent()).then(|| entry.to_item())
        })
        .flatten()
    }

    /// [`ItemCache::get`] without the copy: `read` sees the live entry in
    /// place, under the shard's lock (a hit encodes its reply from it).
    pub fn get_with<R>(
        &self,
        key: &[u8],
        now: u32,
        read: impl FnOnce(EntryRef<'_>) -> R,
    ) -> Option<R> {
        self.lookup(key, now, read).ok()
    }

    /// [`ItemCache::get_with`], telling an entry that had expired (and is
    /// now dropped) from none.
    pub fn lookup<R>(
        &self,
        key: &[u8],
        now: u32,
        read: impl FnOnce(EntryRef<'_>) -> R,
    ) -> Result<R, Miss> {
        let hash = self.hasher.hash_one(key);
        let mut shard = lock(self.shard(hash));
        let idx = shard.find(hash, key).ok_or(Miss::Absent)?;
        if shard.slots[idx].is_expired(now) {
            shard.remove_at(hash, idx);
            drop(shard);
            self.expirations.fetch_add(1, Ordering::Relaxed);
            return Err(Miss::Expired);
        }
        shard.touch(idx);
        Ok(read(EntryRef(&shard.slots[idx])))
    }

    /// Stores a copy of `item` for `key`, as read from the store at
    /// `filled_at_ms` (see [`Entry::filled_at`]); as [`ItemCache::insert`].
    pub fn insert_item(&self, key: &[u8], item: &Item, filled_at_ms: u64) -> bool {
        let entry = Entry::new(key, &item.value, item.flags, item.expires_at, item.version);
        self.insert(entry.filled_at(filled_at_ms).chunks(item.chunks))
    }

    /// Stores `entry`, replacing any entry for its key, evicting least
    /// recently used entries of the shard until it fits. Returns false (and
    /// holds nothing for the key) when the entry alone exceeds a shard's budget.
    pub fn insert(&self, entry: Entry) -> bool {
        let hash = self.hasher.hash_one(entry.key());
        let mut shard = lock(self.shard(hash));
        if let Some(idx) = shard.find(hash, entry.key()) {
            shard.remove_at(hash, idx);
        }
        let hasher = &self.hasher;
        if entry.charge() > shard.limit {
            return false;
        }
        let mut evicted = 0;
        while shard.bytes + entry.charge() > shard.limit {
            shard.evict_lru(hasher);
            evicted += 1;
        }
        shard.push(hash, entry, hasher);
        drop(shard);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }

    /// Drops the entry for `key`, if any. Returns whether there was one.
    pub fn remove(&self, key: &[u8]) -> bool {
        let hash = self.hasher.hash_one(key);
        let mut shard = lock(self.shard(hash));
        match shard.find(hash, key) {
            Some(idx) => {
                shard.remove_at(hash, idx);
                true
            }
            None => false,
        }
    }

    /// Drops every entry (`flush_all`).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let limit = shard.limit;
            *shard = Shard::new(limit);
        }
    }

    /// Changes the byte budget, evicting at once what no longer fits.
    pub fn set_limit(&self, limit_bytes: u64) {
        self.limit_bytes.store(limit_bytes, Ordering::Relaxed);
        let per_shard = per_shard_limit(limit_bytes, self.shards.len());
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.limit = per_shard;
            let mut evicted = 0;
            while shard.bytes > shard.limit {
                shard.evict_lru(&self.hasher);
                evicted += 1;
            }
            drop(shard);
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Current totals. Takes each shard's lock in turn: for metrics and
    /// `stats`, not for the request path.
    pub fn stats(&self) -> CacheStats {
        let (mut items, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            items += shard.table.len() as u64;
            bytes += shard.bytes as u64;
        }
        CacheStats {
            items,
            bytes,
            limit_bytes: self.limit_bytes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
        }
    }
}

/// Bytes an entry whose key and value total `kv_len` is charged against the budget.
pub fn entry_charge(kv_len: usize) -> usize {
    allocation_size(kv_len) + ENTRY_OVERHEAD
}

fn per_shard_limit(limit_bytes: u64, shards: usize) -> usize {
    usize::try_from(limit_bytes / shards as u64).unwrap_or(usize::MAX)
}

/// A poisoned shard only means another thread panicked mid-request; the
/// shard's own invariants are restored before any call returns, so go on.
fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// An entry in the slab: 48 bytes. Its hash is not kept (the key's is
/// computed again when the table grows or the entry leaves), and the key's
/// length shares a word with the fill time.
struct Slot {
    /// The key followed by the value, exactly that long.
    kv: Box<[u8]>,
    version: u64,
    /// `filled_at_ms` in the low 47 bits, a negative entry's flag, the
    /// store's chunk count, then the key's length in the top 8.
    packed: u64,
    flags: u32,
    expires_at: u32,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
}

const FILLED_BITS: u32 = 47;
const FILLED_MASK: u64 = (1 << FILLED_BITS) - 1;
/// Bit 47: a negative entry.
const ABSENT: u64 = 1 << 47;
const CHUNKS_SHIFT: u32 = 48;
const KEY_LEN_SHIFT: u32 = 56;

impl Slot {
    fn new(entry: Entry) -> Slot {
        Slot {
            kv: entry.kv,
            version: entry.version,
            // 2^47 ms is 4,400 years of uptime.
            packed: entry.filled_at_ms.min(FILLED_MASK)
                | if entry.absent { ABSENT } else { 0 }
                | u64::from(entry.chunks) << CHUNKS_SHIFT
                | u64::from(entry.key_len) << KEY_LEN_SHIFT,
            flags: entry.flags,
            expires_at: entry.expires_at,
            prev: NIL,
            next: NIL,
        }
    }

    fn key(&self) -> &[u8] {
        &self.kv[..(self.packed >> KEY_LEN_SHIFT) as usize]
    }

    fn is_expired(&self, now: u32) -> bool {
        is_expired(self.expires_at, now)
    }
}

/// The slab: slots indexed by a `u32`.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
}

impl Slab {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Appends `slot`, returning its index. Grows by an eighth rather than
    /// doubling, so spare slots stay within the slack [`ENTRY_OVERHEAD`]
    /// leaves (a large array is reallocated by remapping pages).
    fn push(&mut self, slot: Slot) -> u32 {
        let idx = u32::try_from(self.slots.len()).expect("fewer than 2^32 entries per shard");
        if self.slots.len() == self.slots.capacity() {
            self.slots.reserve_exact(self.slots.len() / 8 + 16);
        }
        self.slots.push(slot);
        idx
    }
}

impl std::ops::Index<u32> for Slab {
    type Output = Slot;
    fn index(&self, idx: u32) -> &Slot {
        &self.slots[idx as usize]
    }
}

impl std::ops::IndexMut<u32> for Slab {
    fn index_mut(&mut self, idx: u32) -> &mut Slot {
        &mut self.slots[idx as usize]
    }
}

/// One shard: a hash table of slab indices and an LRU list through the slab.
struct Shard {
    table: HashTable<u32>,
    slots: Slab,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to evict.
    tail: u32,
    bytes: usize,
    limit: usize,
}

impl Shard {
    fn new(limit: usize) -> Shard {
        Shard {
            table: HashTable::new(),
            slots: Slab::default(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            bytes: 0,
            limit,
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&idx| slots[idx].key() == key)
            .copied()
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let s = &self.slots[idx];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    fn link_front(&mut self, idx: u32) {
        let old_head = self.head;
        {
            let s = &mut self.slots[idx];
            s.prev = NIL;
            s.next = old_head;
        }
        match old_head {
            NIL => self.tail = idx,
            h => self.slots[h].prev = idx,
        }
        self.head = idx;
    }

    fn touch(&mut self, idx: u32) {
        if self.head != idx {
            self.unlink(idx);
            self.link_front(idx);
        }
    }

    fn push(&mut self, hash: u64, entry: Entry, hasher: &impl BuildHasher) {
        self.bytes += entry.charge();
        let slot = Slot::new(entry);
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = slot;
                idx
            }
            None => self.slots.push(slot),
        };
        let slots = &self.slots;
        self.table
            .insert_unique(hash, idx, |&i| hasher.hash_one(slots[i].key()));
        self.link_front(idx);
    }

    fn remove_at(&mut self, hash: u64, idx: u32) {
        if let Ok(found) = self.table.find_entry(hash, |&i| i == idx) {
            found.remove();
        }
        self.unlink(idx);
        let slot = &mut self.slots[idx];
        self.bytes -= entry_charge(slot.kv.len());
        // Release the value now; the slot itself is reused by the next push.
        slot.kv = Box::default();
        self.free.push(idx);
    }

    fn evict_lru(&mut self, hasher: &impl BuildHasher) {
        let idx = self.tail;
        debug_assert_ne!(idx, NIL, "evicting from an empty shard");
        if idx == NIL {
            return;
        }
        let hash = hasher.hash_one(self.slots[idx].key());
        self.remove_at(hash, idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str) -> Entry {
        Entry::new(key.as_bytes(), value.as_bytes(), 0, 0, 1)
    }

    /// A one-shard cache with room for exactly `n` entries of 1-byte keys and values.
    fn cache_for(n: usize) -> ItemCache {
        ItemCache::new((n * entry_charge(2)) as u64, 1)
    }

    #[test]
    fn a_slot_is_48_bytes_and_charges_follow_the_allocator() {
        assert_eq!(std::mem::size_of::<Slot>(), 48);
        let sizes: Vec<usize> = [0, 1, 48, 64, 65, 81, 128, 129, 200, 1000, 1025]
            .into_iter()
            .map(allocation_size)
            .collect();
        assert_eq!(sizes, [0, 8, 48, 64, 80, 96, 128, 160, 224, 1024, 1280]);
        assert_eq!(entry_charge(48), 48 + 48 + 12);
    }

    #[test]
    fn metadata_survives_the_compact_slot() {
        let cache = ItemCache::new(1 << 20, 1);
        let key = [b'k'; 250];
        let entry = Entry::new(&key, b"value", u32::MAX, u32::MAX - 1, u64::MAX)
            .filled_at((1 << 47) - 1)
            .chunks(u8::MAX);
        assert!(cache.insert(entry));
        let item = Item {
            value: b"value".to_vec(),
            flags: u32::MAX,
            expires_at: u32::MAX - 1,
            version: u64::MAX,
            chunks: u8::MAX,
        };
        assert_eq!(cache.get(&key, 0), Some(item));
        assert_eq!(
            cache.get_with(&key, 0, |e| (e.filled_at_ms(), e.is_absent())),
            Some(((1 << 47) - 1, false))
        );
        // A fill time beyond 47 bits is kept at the largest it can hold,
        // without touching the fields packed beside it.
        cache.insert(Entry::new(b"x", b"", 0, 0, 1).filled_at(u64::MAX).chunks(3));
        assert_eq!(
            cache.get_with(b"x", 0, |e| (
                e.filled_at_ms(),
                e.chunks(),
                e.key().len(),
                e.is_absent()
            )),
            Some(((1 << 47) - 1, 3, 1, false))
        );
        // A negative entry: found in place, never copied out as an item.
        assert!(cache.insert(Entry::absent(b"gone", 9).filled_at(5)));
        assert_eq!(
            cache.get_with(b"gone", 0, |e| (
                e.is_absent(),
                e.version(),
                e.filled_at_ms()
            )),
            Some((true, 9, 5))
        );
        assert_eq!(cache.get(b"gone", 0), None);
    }

    #[test]
    fn get_returns_what_was_inserted() {
        let cache = cache_for(4);
        assert!(cache.insert(Entry::new(b"k", b"v", 7, 0, 42)));
        let got = cache.get(b"k", 100).unwrap();
        assert_eq!(
            (got.value.as_slice(), got.flags, got.version),
            (&b"v"[..], 7, 42)
        );
        assert_eq!(
            cache.get_with(b"k", 100, |e| e.key().to_vec()),
            Some(b"k".to_vec())
        );
        assert!(cache.get(b"x", 100).is_none());
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let cache = cache_for(3);
        for k in ["a", "b", "c"] {
            assert!(cache.insert(entry(k, "1")));
        }
        // Use "a" so "b" becomes the oldest.
        assert!(cache.get(b"a", 0).is_some());
        cache.insert(entry("d", "1"));
        assert!(cache.get(b"b", 0).is_none(), "b was least recently used");
        for k in ["a", "c", "d"] {
            assert!(cache.get(k.as_bytes(), 0).is_some(), "{k} kept");
        }
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn byte_accounting_counts_key_value_and_overhead() {
        let cache = ItemCache::new(1 << 20, 1);
        cache.insert(Entry::new(b"key", b"value!", 0, 0, 1));
        cache.insert(Entry::new(b"k2", b"", 0, 0, 1));
        let stats = cache.stats();
        assert_eq!(stats.items, 2);
        assert_eq!(stats.bytes, (entry_charge(9) + entry_charge(2)) as u64);
        // Replacing an entry replaces its charge.
        cache.insert(Entry::new(b"key", b"v", 0, 0, 2));
        assert_eq!(
            cache.stats().bytes,
            (entry_charge(4) + entry_charge(2)) as u64
        );
        cache.remove(b"key");
        cache.remove(b"k2");
        assert_eq!(
            cache.stats(),
            CacheStats {
                limit_bytes: 1 << 20,
                ..CacheStats::default()
            }
        );
    }

    #[test]
    fn budget_is_never_exceeded_by_large_values() {
        let cache = ItemCache::new(10_000, 1);
        for i in 0..100 {
            cache.insert(Entry::new(
                format!("k{i}").as_bytes(),
                &[b'x'; 900],
                0,
                0,
                1,
            ));
            assert!(cache.stats().bytes <= 10_000);
        }
        // An entry larger than the whole budget is refused, and replaces nothing stale.
        cache.insert(Entry::new(b"big", b"old", 0, 0, 1));
        assert!(!cache.insert(Entry::new(b"big", &[b'x'; 20_000], 0, 0, 2)));
        assert!(cache.get(b"big", 0).is_none());
    }

    #[test]
    fn expired_entries_are_not_returned() {
        let cache = cache_for(4);
        cache.insert(Entry::new(b"k", b"v", 0, 100, 1));
        assert!(cache.get(b"k", 99).is_some());
        assert!(cache.get(b"k", 100).is_none(), "expires at its second");
        assert_eq!(cache.stats().items, 0, "dropped on access");
        assert_eq!(cache.stats().expirations, 1);
        cache.insert(Entry::new(b"n", b"v", 0, 0, 1));
        assert!(cache.get(b"n", u32::MAX).is_some(), "0 never expires");
    }

    #[test]
    fn shrinking_the_limit_evicts_oldest() {
        let cache = cache_for(4);
        for k in ["a", "b", "c", "d"] {
            cache.insert(entry(k, "1"));
        }
        cache.set_limit((2 * entry_charge(2)) as u64);
        assert!(cache.get(b"a", 0).is_none() && cache.get(b"b", 0).is_none());
        assert!(cache.get(b"c", 0).is_some() && cache.get(b"d", 0).is_some());
    }

    #[test]
    fn slots_are_reused_and_many_keys_spread_over_shards() {
        let cache = ItemCache::new(1 << 24, 8);
        for round in 0..3 {
            for i in 0..1000 {
                cache.insert(Entry::new(format!("key{i}").as_bytes(), b"v", 0, 0, round));
            }
        }
        assert_eq!(cache.stats().items, 1000);
        for i in 0..1000 {
            assert_eq!(
                cache.get(format!("key{i}").as_bytes(), 0).unwrap().version,
                2
            );
        }
        let slots: usize = cache.shards.iter().map(|s| lock(s).slots.len()).sum();
        assert_eq!(slots, 1000, "replaced entries reuse their slots");
    }
}
