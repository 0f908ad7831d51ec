//! `ItemCache`: the in-memory copy of recently used items.
//!
//! Sharded so that cores do not contend on one lock. Each shard keeps a byte
//! budget with S3-FIFO (Yang et al., SOSP '23), chosen by measurement
//! (`benches/cache_sim.rs`, BENCHMARKS.md section 4): two FIFO queues over a
//! slab of entries, a small one (a tenth of the budget) where keys read
//! through the cache start, and a main one, plus a ghost queue of the keys
//! recently evicted from small. A get hit only sets the entry's accessed bit
//! (no list move, no allocation); an entry leaving small with the bit set
//! moves to main, one without it goes and leaves its key's hash as a ghost;
//! a fill of a ghost's key, or a write of a key not cached ([`Fill::Write`]),
//! enters main directly; main gives an entry with the bit set another round
//! (bit cleared). So keys read once pass through small without displacing
//! what is read again, and get, insert and evict stay O(1) (amortized).
//!
//! A cached item costs one 48-byte slab slot (its metadata and FIFO links,
//! the policy's two bits in the fill time's word), one allocation holding
//! exactly its key and value, and a 4-byte slab index in the hash table:
//! less than memcached's per-item overhead (BENCHMARKS.md, section 3). Ghosts
//! are charged too ([`GHOST_CHARGE`] each), so the budget bounds everything
//! the policy keeps. An [`Entry`]'s allocation moves into the cache as it
//! is; a get hit is encoded from the cache in place under the shard's lock
//! ([`ItemCache::get_with`]), or copied out ([`ItemCache::get`]).
//!
//! Expired entries: a get drops the one it finds; an eviction drops one met
//! at a queue's oldest end without a second chance; and before a live entry
//! is evicted for room, a cursor checks the next [`SWEEP`] slab slots and
//! drops the expired ones there. Evictions are counted by reason
//! ([`CacheStats`]).
//!
//! The cache never talks to DynamoDB and decides nothing about consistency:
//! the engine tells it what to hold. It only keeps the byte budget (counting
//! keys, values, [`ENTRY_OVERHEAD`] and ghosts) and never returns an expired
//! entry.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hashbrown::HashTable;

use crate::item::{Item, is_expired};

/// Bytes charged per entry besides its key and value's allocation (see
/// [`allocation_size`]), so that the budget bounds real memory (measured
/// against RSS in BENCHMARKS.md):
/// - the slab slot (48 bytes);
/// - its hash-table index: 4 bytes and a control byte per bucket, at a load
///   factor between 7/16 and 7/8 (hashbrown doubles), so up to 12 bytes.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Slot>() + 12;

/// Bytes charged per ghost (a key recently evicted from the small queue):
/// its 8-byte hash in the ghost ring, and its 4-byte ring position in a hash
/// table at hashbrown's lowest load (as [`ENTRY_OVERHEAD`] counts it). A
/// ghost hit frees the 12 bytes of index; its ring slot (8 bytes) stays
/// charged until the ring moves past it.
pub const GHOST_CHARGE: usize = GHOST_SLOT + GHOST_INDEX;
const GHOST_SLOT: usize = 8;
const GHOST_INDEX: usize = 12;

/// Slab slots checked for expired entries before a live entry is evicted.
pub const SWEEP: u32 = 2;

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

    /// The same entry, marked as read from the store at `ms` (kept up to
    /// 2^45 - 1 ms, 1,100 years).
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

/// Where a fill comes from, which decides where a key not cached starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// After a read of the store (a get that missed): the key starts in the
    /// small queue (in main if it is a ghost), so a key read once leaves
    /// without displacing the ones read again.
    Read,
    /// After a write: the application wrote the key, no one-hit wonder read
    /// through the cache, so it starts in main.
    Write,
}

/// Counters since start, for metrics and `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries holding an item: negative entries (keys known absent) are
    /// not items, as memcached's `curr_items` counts only what it stores.
    pub items: u64,
    /// Bytes charged: entries and ghosts.
    pub bytes: u64,
    pub limit_bytes: u64,
    /// Live entries evicted for room (capacity).
    pub evictions: u64,
    /// Expired entries reclaimed for room (at a queue's oldest end, or by
    /// the sweep) before a live entry would have been evicted.
    pub evictions_expired: u64,
    /// Expired entries dropped: found by a get, or reclaimed
    /// (`evictions_expired` included).
    pub expirations: u64,
}

pub struct ItemCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: foldhash::quality::RandomState,
    /// Picks a shard from a hash's middle bits: the table itself uses the
    /// low bits and the top seven, which must stay varied within a shard.
    shard_mask: u64,
    evictions: AtomicU64,
    evictions_expired: AtomicU64,
    /// Expired entries a get found (and dropped).
    expired_on_get: AtomicU64,
    limit_bytes: AtomicU64,
}

/// The wall clock in Unix seconds, read at most once per call and only if
/// needed (an entry with an expiry replaced, met or swept), for fills whose
/// caller gave none.
struct Clock(Option<u32>);

impl Clock {
    fn at(now: u32) -> Clock {
        Clock(Some(now))
    }

    fn wall() -> Clock {
        Clock(None)
    }

    /// Whether an entry expiring at `expires_at` has expired (0: never,
    /// without reading the clock).
    fn expired(&mut self, expires_at: u32) -> bool {
        expires_at != 0 && is_expired(expires_at, self.now())
    }

    fn now(&mut self) -> u32 {
        *self.0.get_or_insert_with(|| {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }
}

/// Entries one call dropped for room, by reason.
#[derive(Default)]
struct Dropped {
    live: u64,
    expired: u64,
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
            evictions_expired: AtomicU64::new(0),
            expired_on_get: AtomicU64::new(0),
            limit_bytes: AtomicU64::new(limit_bytes),
        }
    }

    /// The default shard count: enough that cores rarely meet on one lock.
    pub fn default_shards() -> usize {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        (cores * 8).next_power_of_two()
    }

    /// The shard that holds `key`, below the shard count (for tests and
    /// tools that replay traffic shard by shard: shards evict independently).
    pub fn shard_of(&self, key: &[u8]) -> usize {
        ((self.hasher.hash_one(key) >> 32) & self.shard_mask) as usize
    }

    /// The shard count.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[((hash >> 32) & self.shard_mask) as usize]
    }

    /// A copy of the live entry for `key`, marked accessed. An expired entry
    /// is dropped and reported as absent.
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
            self.expired_on_get.fetch_add(1, Ordering::Relaxed);
            return Err(Miss::Expired);
        }
        // A hit moves nothing: the bit is read when the entry reaches the
        // oldest end of its queue.
        let slot = &mut shard.slots[idx];
        slot.packed |= ACCESSED;
        Ok(read(EntryRef(slot)))
    }

    /// Stores a copy of `item` for `key`, as read from the store at
    /// `filled_at_ms` (see [`Entry::filled_at`]) after a get missed; as
    /// [`ItemCache::insert`].
    pub fn insert_item(&self, key: &[u8], item: &Item, filled_at_ms: u64) -> bool {
        self.store(
            item_entry(key, item, filled_at_ms),
            Fill::Read,
            Clock::wall(),
        )
    }

    /// [`ItemCache::insert_item`] after a write of `item` (the store now
    /// holds it): a key not cached starts in main ([`Fill::Write`]).
    pub fn insert_written(&self, key: &[u8], item: &Item, filled_at_ms: u64) -> bool {
        self.store(
            item_entry(key, item, filled_at_ms),
            Fill::Write,
            Clock::wall(),
        )
    }

    /// [`ItemCache::insert_item`] or [`ItemCache::insert_written`] as `fill`
    /// says, with the caller's clock (`now`, Unix seconds, as
    /// [`ItemCache::get`] takes it) for telling expired entries.
    pub fn insert_item_at(
        &self,
        key: &[u8],
        item: &Item,
        filled_at_ms: u64,
        fill: Fill,
        now: u32,
    ) -> bool {
        self.store(item_entry(key, item, filled_at_ms), fill, Clock::at(now))
    }

    /// Stores `entry` as a read fill ([`Fill::Read`]), replacing any entry
    /// for its key, evicting entries of the shard until it fits (expired
    /// ones first, as [`ItemCache::insert_at`], on the wall clock). Returns
    /// false (and holds nothing for the key) when the entry alone exceeds a
    /// shard's budget.
    pub fn insert(&self, entry: Entry) -> bool {
        self.store(entry, Fill::Read, Clock::wall())
    }

    /// Stores `entry` as `fill` says, `now` telling expired entries (Unix
    /// seconds). A live entry it replaces keeps its queue and counts as
    /// accessed; a key not cached starts in small after a read (in main if
    /// it is a ghost), in main after a write. Room is made by dropping
    /// expired entries at the queues' oldest ends and among the next
    /// [`SWEEP`] slab slots, then by evicting live entries. Returns false
    /// (and holds nothing for the key) when the entry alone exceeds a
    /// shard's budget.
    pub fn insert_at(&self, entry: Entry, fill: Fill, now: u32) -> bool {
        self.store(entry, fill, Clock::at(now))
    }

    fn store(&self, entry: Entry, fill: Fill, mut clock: Clock) -> bool {
        let hash = self.hasher.hash_one(entry.key());
        let hasher = &self.hasher;
        let mut shard = lock(self.shard(hash));
        let mut prior = None;
        if let Some(idx) = shard.find(hash, entry.key()) {
            let slot = &shard.slots[idx];
            if !clock.expired(slot.expires_at) {
                prior = Some(slot.packed & MAIN);
            }
            shard.remove_at(hash, idx);
        }
        let charge = entry.charge();
        if charge > shard.limit {
            return false;
        }
        let ghost = shard.ghosts.take(hash);
        let (queue, accessed) = match prior {
            Some(queue) => (queue, ACCESSED),
            None if ghost || fill == Fill::Write => (MAIN, 0),
            None => (0, 0),
        };
        let mut dropped = Dropped::default();
        if shard.charged() + charge > shard.limit {
            shard.make_room(charge, &mut clock, hasher, &mut dropped);
        }
        shard.push(hash, entry, queue | accessed, hasher);
        drop(shard);
        self.count(dropped);
        true
    }

    fn count(&self, dropped: Dropped) {
        if dropped.live > 0 {
            self.evictions.fetch_add(dropped.live, Ordering::Relaxed);
        }
        if dropped.expired > 0 {
            self.evictions_expired
                .fetch_add(dropped.expired, Ordering::Relaxed);
        }
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

    /// Drops every entry and ghost (`flush_all`).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let limit = shard.limit;
            *shard = Shard::new(limit);
        }
    }

    /// Changes the byte budget, evicting at once what no longer fits
    /// (expired entries met first, then as an insert would).
    pub fn set_limit(&self, limit_bytes: u64) {
        self.limit_bytes.store(limit_bytes, Ordering::Relaxed);
        let per_shard = per_shard_limit(limit_bytes, self.shards.len());
        let mut clock = Clock::wall();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.set_limit(per_shard);
            let mut dropped = Dropped::default();
            if shard.charged() > shard.limit {
                shard.make_room(0, &mut clock, &self.hasher, &mut dropped);
            }
            drop(shard);
            self.count(dropped);
        }
    }

    /// Current totals. Takes each shard's lock in turn: for metrics and
    /// `stats`, not for the request path.
    pub fn stats(&self) -> CacheStats {
        let (mut items, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            items += (shard.table.len() - shard.absent) as u64;
            bytes += shard.charged() as u64;
        }
        let evictions_expired = self.evictions_expired.load(Ordering::Relaxed);
        CacheStats {
            items,
            bytes,
            limit_bytes: self.limit_bytes.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            evictions_expired,
            expirations: self.expired_on_get.load(Ordering::Relaxed) + evictions_expired,
        }
    }
}

fn item_entry(key: &[u8], item: &Item, filled_at_ms: u64) -> Entry {
    Entry::new(key, &item.value, item.flags, item.expires_at, item.version)
        .filled_at(filled_at_ms)
        .chunks(item.chunks)
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
/// length and the policy's bits share a word with the fill time.
struct Slot {
    /// The key followed by the value, exactly that long.
    kv: Box<[u8]>,
    version: u64,
    /// `filled_at_ms` in the low 45 bits, then [`ACCESSED`], [`MAIN`], a
    /// negative entry's flag ([`ABSENT`]), the store's chunk count (bits
    /// 48-55), and the key's length in the top 8.
    packed: u64,
    flags: u32,
    /// 0 (never) in a free slot, so the sweep passes over it.
    expires_at: u32,
    /// Towards the newest end of its queue.
    prev: u32,
    /// Towards the oldest end (the next to leave).
    next: u32,
}

const FILLED_BITS: u32 = 45;
const FILLED_MASK: u64 = (1 << FILLED_BITS) - 1;
/// Bit 45: hit since it entered its queue (or since its last round in main).
const ACCESSED: u64 = 1 << 45;
/// Bit 46: in the main queue (clear: in small).
const MAIN: u64 = 1 << 46;
/// Bit 47: a negative entry.
const ABSENT: u64 = 1 << 47;
const CHUNKS_SHIFT: u32 = 48;
const KEY_LEN_SHIFT: u32 = 56;

impl Slot {
    fn new(entry: Entry) -> Slot {
        Slot {
            kv: entry.kv,
            version: entry.version,
            // 2^45 ms is 1,100 years of uptime.
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

    fn charge(&self) -> usize {
        entry_charge(self.kv.len())
    }
}

/// The slab: slots indexed by a `u32`.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
}

impl Slab {
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

/// A FIFO queue linked through the slab.
#[derive(Clone, Copy)]
struct Fifo {
    /// Newest.
    head: u32,
    /// Oldest: the next to leave.
    tail: u32,
    len: usize,
}

const EMPTY: Fifo = Fifo {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// Keys recently evicted from small, without their values: a ring of their
/// hashes, oldest first, and a table of the live ones' ring positions
/// (wrapping u32 sequence numbers) keyed by the same hash. A ghost hit
/// removes the key from the table; its ring slot stays (a tombstone) until
/// the ring moves past it. A hash is all a ghost keeps: two keys of one
/// 64-bit hash would share a ghost, which only sends one to main.
#[derive(Default)]
struct Ghosts {
    ring: VecDeque<u64>,
    /// The position of `ring[0]`.
    front: u32,
    live: HashTable<u32>,
}

impl Ghosts {
    fn push(&mut self, hash: u64) {
        if self.ring.len() == self.ring.capacity() {
            // By an eighth, as the slab grows: the charge covers the ring's
            // slots in use, not a doubling's spare half.
            self.ring.reserve_exact(self.ring.len() / 8 + 16);
        }
        let pos = self.front.wrapping_add(self.ring.len() as u32);
        self.ring.push_back(hash);
        let ring = &self.ring;
        let front = self.front;
        let at = |p: &u32| ring[p.wrapping_sub(front) as usize];
        match self.live.find_mut(hash, |p| at(p) == hash) {
            // The same hash again: the older slot becomes a tombstone.
            Some(p) => *p = pos,
            None => {
                self.live.insert_unique(hash, pos, at);
            }
        }
    }

    /// Whether `hash` was a ghost's (it is not any more).
    fn take(&mut self, hash: u64) -> bool {
        if self.live.is_empty() {
            return false;
        }
        let ring = &self.ring;
        let front = self.front;
        match self
            .live
            .find_entry(hash, |p| ring[p.wrapping_sub(front) as usize] == hash)
        {
            Ok(found) => {
                found.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps the ring to at most `limit` slots, dropping the oldest ghosts,
    /// and drops the tombstones up to the oldest live one. A tombstone (the
    /// slot of a ghost read again, or of a hash pushed again) counts until
    /// the front reaches it: so the ring, and what it is charged, never
    /// outgrows `limit` slots, however many ghosts are read again.
    fn trim(&mut self, limit: usize) {
        while let Some(&hash) = self.ring.front() {
            let front = self.front;
            let within = self.ring.len() <= limit;
            match self.live.find_entry(hash, |&p| p == front) {
                Ok(_) if within => break,
                Ok(found) => {
                    found.remove();
                }
                Err(_) => {}
            }
            self.ring.pop_front();
            self.front = self.front.wrapping_add(1);
        }
    }

    fn charged(&self) -> usize {
        self.ring.len() * GHOST_SLOT + self.live.len() * GHOST_INDEX
    }

    #[cfg(test)]
    fn contains(&self, hash: u64) -> bool {
        let ring = &self.ring;
        let front = self.front;
        self.live
            .find(hash, |p| ring[p.wrapping_sub(front) as usize] == hash)
            .is_some()
    }
}

/// One shard: a hash table of slab indices, S3-FIFO's small and main queues
/// through the slab, and its ghosts.
struct Shard {
    table: HashTable<u32>,
    slots: Slab,
    free: Vec<u32>,
    small: Fifo,
    main: Fifo,
    /// Bytes charged by the entries in small.
    small_bytes: usize,
    /// Bytes charged by all entries (ghosts apart).
    bytes: usize,
    ghosts: Ghosts,
    limit: usize,
    /// Evict from small while it holds at least this (a tenth of the limit).
    small_target: usize,
    /// The sweep's last slab slot.
    cursor: u32,
    /// Negative entries among the table's (not items: `stats` leaves
    /// them out of the item count).
    absent: usize,
}

impl Shard {
    fn new(limit: usize) -> Shard {
        Shard {
            table: HashTable::new(),
            slots: Slab::default(),
            free: Vec::new(),
            small: EMPTY,
            main: EMPTY,
            small_bytes: 0,
            bytes: 0,
            ghosts: Ghosts::default(),
            limit,
            small_target: limit / 10,
            cursor: 0,
            absent: 0,
        }
    }

    fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        self.small_target = limit / 10;
    }

    /// Bytes charged against the limit: entries and ghosts.
    fn charged(&self) -> usize {
        self.bytes + self.ghosts.charged()
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&idx| slots[idx].key() == key)
            .copied()
    }

    fn fifo(&mut self, main: bool) -> &mut Fifo {
        if main {
            &mut self.main
        } else {
            &mut self.small
        }
    }

    /// Takes `idx` out of its queue (it stays in the slab and the table).
    fn unlink(&mut self, idx: u32) {
        let (prev, next, main, charge) = {
            let s = &self.slots[idx];
            (s.prev, s.next, s.packed & MAIN != 0, s.charge())
        };
        if !main {
            self.small_bytes -= charge;
        }
        let fifo = self.fifo(main);
        fifo.len -= 1;
        match prev {
            NIL => fifo.head = next,
            p => self.slots[p].next = next,
        }
        let fifo = self.fifo(main);
        match next {
            NIL => fifo.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    /// Links `idx` (in no queue) at the newest end of the queue its
    /// [`MAIN`] bit names.
    fn link_head(&mut self, idx: u32) {
        let (main, charge) = {
            let s = &self.slots[idx];
            (s.packed & MAIN != 0, s.charge())
        };
        if !main {
            self.small_bytes += charge;
        }
        let fifo = self.fifo(main);
        let old_head = fifo.head;
        fifo.head = idx;
        fifo.len += 1;
        if old_head == NIL {
            fifo.tail = idx;
        }
        if old_head != NIL {
            self.slots[old_head].prev = idx;
        }
        let s = &mut self.slots[idx];
        s.prev = NIL;
        s.next = old_head;
    }

    /// Moves `idx` to main's newest end, its accessed bit cleared.
    fn promote(&mut self, idx: u32) {
        self.unlink(idx);
        let s = &mut self.slots[idx];
        s.packed = (s.packed & !ACCESSED) | MAIN;
        self.link_head(idx);
    }

    /// A new entry at the newest end of the queue `bits` ([`MAIN`],
    /// [`ACCESSED`]) name.
    fn push(&mut self, hash: u64, entry: Entry, bits: u64, hasher: &impl BuildHasher) {
        self.bytes += entry.charge();
        let mut slot = Slot::new(entry);
        slot.packed |= bits;
        self.absent += usize::from(slot.packed & ABSENT != 0);
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
        self.link_head(idx);
    }

    fn remove_at(&mut self, hash: u64, idx: u32) {
        if let Ok(found) = self.table.find_entry(hash, |&i| i == idx) {
            found.remove();
        }
        self.unlink(idx);
        let slot = &mut self.slots[idx];
        self.bytes -= slot.charge();
        self.absent -= usize::from(slot.packed & ABSENT != 0);
        // Release the value now; the slot itself is reused by the next push.
        slot.kv = Box::default();
        slot.expires_at = 0;
        self.free.push(idx);
    }

    fn remove_slot(&mut self, idx: u32, hasher: &impl BuildHasher) {
        let hash = hasher.hash_one(self.slots[idx].key());
        self.remove_at(hash, idx);
    }

    /// Drops entries until `need` more bytes fit: first the expired ones
    /// among the next [`SWEEP`] slab slots, then as [`Shard::evict`] picks.
    /// If only ghosts' tombstones are left over, the ghosts start afresh.
    fn make_room(
        &mut self,
        need: usize,
        clock: &mut Clock,
        hasher: &impl BuildHasher,
        dropped: &mut Dropped,
    ) {
        dropped.expired += self.sweep(clock, hasher);
        while self.charged() + need > self.limit && !self.table.is_empty() {
            if self.evict(clock, hasher) {
                dropped.expired += 1;
            } else {
                dropped.live += 1;
            }
        }
        if self.charged() + need > self.limit {
            self.ghosts = Ghosts::default();
        }
    }

    /// Drops the expired entries among the next [`SWEEP`] slab slots (free
    /// slots never expire). Returns how many.
    fn sweep(&mut self, clock: &mut Clock, hasher: &impl BuildHasher) -> u64 {
        let len = self.slots.len() as u32;
        let mut dropped = 0;
        if len == 0 {
            return 0;
        }
        for _ in 0..SWEEP {
            self.cursor = if self.cursor + 1 >= len {
                0
            } else {
                self.cursor + 1
            };
            if clock.expired(self.slots[self.cursor].expires_at) {
                self.remove_slot(self.cursor, hasher);
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops one entry, from small while small holds at least its target
    /// (or main is empty), else from main. Leaving small, an entry accessed
    /// there moves to main; leaving main, it goes round again (bit
    /// cleared); an expired one goes at once. Returns whether the entry
    /// dropped had expired (else it was live, and its key becomes a ghost
    /// if it left small).
    fn evict(&mut self, clock: &mut Clock, hasher: &impl BuildHasher) -> bool {
        debug_assert!(!self.table.is_empty(), "evicting from an empty shard");
        let mut from_small = self.small.tail != NIL
            && (self.small_bytes >= self.small_target || self.main.tail == NIL);
        loop {
            let idx = if from_small {
                self.small.tail
            } else {
                self.main.tail
            };
            if idx == NIL {
                from_small = !from_small;
                continue;
            }
            let slot = &self.slots[idx];
            let expired = clock.expired(slot.expires_at);
            if !expired && slot.packed & ACCESSED != 0 {
                // Small to main, or main round again: either way main's head.
                self.promote(idx);
                continue;
            }
            let hash = hasher.hash_one(slot.key());
            self.remove_at(hash, idx);
            // At most as many ghost slots as main has entries: checked when
            // one is added, and when main loses one.
            if !from_small {
                self.ghosts.trim(self.main.len);
            } else if !expired {
                self.ghosts.push(hash);
                self.ghosts.trim(self.main.len);
            }
            return expired;
        }
    }

    /// Checks every invariant (tests only): the queues link exactly the
    /// table's entries, their lengths and byte counts are right.
    #[cfg(test)]
    fn check(&self) {
        let (mut seen, mut absent) = (0, 0);
        for (fifo, main) in [(&self.small, false), (&self.main, true)] {
            let (mut idx, mut prev, mut len, mut bytes) = (fifo.head, NIL, 0, 0);
            while idx != NIL {
                let s = &self.slots[idx];
                assert_eq!(s.prev, prev, "back link");
                assert_eq!(s.packed & MAIN != 0, main, "queue bit");
                len += 1;
                bytes += s.charge();
                absent += usize::from(s.packed & ABSENT != 0);
                prev = idx;
                idx = s.next;
            }
            assert_eq!(fifo.tail, prev, "tail");
            assert_eq!(fifo.len, len, "length");
            if !main {
                assert_eq!(self.small_bytes, bytes, "small bytes");
            }
            seen += len;
        }
        assert_eq!(seen, self.table.len(), "every entry in one queue");
        assert_eq!(absent, self.absent, "negative entries counted");
        assert!(self.ghosts.live.len() <= self.ghosts.ring.len(), "ghosts");
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str) -> Entry {
        Entry::new(key.as_bytes(), value.as_bytes(), 0, 0, 1)
    }

    /// What one entry of a 1-byte key and a 1-byte value is charged.
    fn e() -> usize {
        entry_charge(2)
    }

    /// A one-shard cache with room for exactly `n` entries of 1-byte keys and
    /// values, and `ghosts` ghosts.
    fn cache_for(n: usize, ghosts: usize) -> ItemCache {
        ItemCache::new((n * e() + ghosts * GHOST_CHARGE) as u64, 1)
    }

    fn read(cache: &ItemCache, key: &str) -> bool {
        cache.insert_at(entry(key, "1"), Fill::Read, 0)
    }

    fn write(cache: &ItemCache, key: &str) -> bool {
        cache.insert_at(entry(key, "1"), Fill::Write, 0)
    }

    fn hit(cache: &ItemCache, key: &str) -> bool {
        cache.get(key.as_bytes(), 0).is_some()
    }

    /// Where `key` is: Some(true) in main, Some(false) in small, None not
    /// cached. Looks without touching (a get would set the bit).
    fn queue_of(cache: &ItemCache, key: &str) -> Option<bool> {
        let hash = cache.hasher.hash_one(key.as_bytes());
        let shard = lock(cache.shard(hash));
        shard.check();
        let idx = shard.find(hash, key.as_bytes())?;
        Some(shard.slots[idx].packed & MAIN != 0)
    }

    fn is_ghost(cache: &ItemCache, key: &str) -> bool {
        let hash = cache.hasher.hash_one(key.as_bytes());
        lock(cache.shard(hash)).ghosts.contains(hash)
    }

    fn keys(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn negative_entries_are_not_counted_as_items() {
        let cache = ItemCache::new(1 << 20, 1);
        assert!(cache.insert(entry("here", "v")));
        assert!(cache.insert(Entry::absent(b"gone", 1)));
        assert!(cache.insert(Entry::absent(b"also-gone", 1)));
        assert_eq!(cache.stats().items, 1);
        // Replaced by a value, removed, cleared: the count follows.
        assert!(cache.insert(entry("gone", "back")));
        assert_eq!(cache.stats().items, 2);
        assert!(cache.remove(b"also-gone"));
        assert_eq!(cache.stats().items, 2);
        assert!(cache.insert(Entry::absent(b"here", 2)));
        assert_eq!(cache.stats().items, 1);
        assert!(queue_of(&cache, "here").is_some(), "invariants hold");
        cache.clear();
        assert!(cache.insert(Entry::absent(b"x", 1)));
        assert_eq!(cache.stats().items, 0);
    }

    #[test]
    fn ghosts_read_again_never_grow_the_ring_past_main() {
        // Reads of 200 keys into room for 20: many ghosts are read again,
        // each leaving a tombstone in the ring; the ring still never holds
        // more slots than main has entries (nor is charged for more).
        use rand::{RngExt, SeedableRng};
        let cache = cache_for(20, 20);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for i in 0..20_000 {
            let key = rng.random_range(0..200u32).to_string();
            if !hit(&cache, &key) {
                read(&cache, &key);
            }
            let shard = lock(cache.shard(0));
            assert!(
                shard.ghosts.ring.len() <= shard.main.len,
                "request {i}: {} ghost slots, {} in main",
                shard.ghosts.ring.len(),
                shard.main.len
            );
        }
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
        assert_eq!(GHOST_CHARGE, 20);
    }

    #[test]
    fn metadata_survives_the_compact_slot() {
        let cache = ItemCache::new(1 << 20, 1);
        let key = [b'k'; 250];
        let entry = Entry::new(&key, b"value", u32::MAX, u32::MAX - 1, u64::MAX)
            .filled_at((1 << 45) - 1)
            .chunks(u8::MAX);
        assert!(cache.insert(entry));
        let item = Item {
            value: b"value".to_vec(),
            flags: u32::MAX,
            expires_at: u32::MAX - 1,
            version: u64::MAX,
            chunks: u8::MAX,
        };
        // Hits set the policy's bit; nothing packed beside it changes.
        for _ in 0..2 {
            assert_eq!(cache.get(&key, 0), Some(item.clone()));
            assert_eq!(
                cache.get_with(&key, 0, |e| (e.filled_at_ms(), e.is_absent(), e.chunks())),
                Some(((1 << 45) - 1, false, u8::MAX))
            );
        }
        // A fill time beyond 45 bits is kept at the largest it can hold,
        // without touching the fields packed beside it.
        cache.insert(Entry::new(b"x", b"", 0, 0, 1).filled_at(u64::MAX).chunks(3));
        assert_eq!(
            cache.get_with(b"x", 0, |e| (
                e.filled_at_ms(),
                e.chunks(),
                e.key().len(),
                e.is_absent()
            )),
            Some(((1 << 45) - 1, 3, 1, false))
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
        // Moving between queues keeps it all too: in a tiny shard, a
        // negative entry, hit, moves to main as others arrive.
        let cache = cache_for(3, 0);
        let absent = Entry::absent(b"n", 7).filled_at(11).chunks(2);
        assert!(cache.insert_at(absent, Fill::Read, 0));
        assert!(cache.get_with(b"n", 0, |_| ()).is_some());
        for k in ["a", "b", "c"] {
            read(&cache, k);
        }
        assert_eq!(queue_of(&cache, "n"), Some(true), "promoted");
        assert_eq!(
            cache.get_with(b"n", 0, |e| (
                e.is_absent(),
                e.version(),
                e.filled_at_ms(),
                e.chunks(),
                e.key().to_vec()
            )),
            Some((true, 7, 11, 2, b"n".to_vec()))
        );
    }

    #[test]
    fn get_returns_what_was_inserted() {
        let cache = cache_for(4, 0);
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
        let item = Item {
            value: b"w".to_vec(),
            flags: 3,
            expires_at: 0,
            version: 5,
            chunks: 1,
        };
        assert!(cache.insert_item(b"i", &item, 9));
        assert!(cache.insert_written(b"j", &item, 9));
        assert!(cache.insert_item_at(b"l", &item, 9, Fill::Write, 100));
        for key in [&b"i"[..], b"j", b"l"] {
            assert_eq!(cache.get(key, 100), Some(item.clone()));
        }
        assert_eq!(
            (
                queue_of(&cache, "i"),
                queue_of(&cache, "j"),
                queue_of(&cache, "l")
            ),
            (Some(false), Some(true), Some(true))
        );
    }

    /// Five keys written (main), five read (small): room for ten entries
    /// and two ghosts.
    fn five_and_five() -> ItemCache {
        let cache = cache_for(10, 2);
        for k in keys("m", 5) {
            assert!(write(&cache, &k));
        }
        for k in keys("s", 5) {
            assert!(read(&cache, &k));
        }
        assert_eq!(cache.stats().evictions, 0);
        cache
    }

    #[test]
    fn a_key_read_once_leaves_through_small_and_becomes_a_ghost() {
        let cache = five_and_five();
        assert!(read(&cache, "x"));
        // Small held half the budget (over its tenth): its oldest, never
        // hit, went; main's entries stayed.
        assert_eq!(queue_of(&cache, "s0"), None);
        assert!(is_ghost(&cache, "s0"));
        for k in keys("m", 5) {
            assert_eq!(queue_of(&cache, &k), Some(true), "{k}");
        }
        let stats = cache.stats();
        assert_eq!((stats.items, stats.evictions), (10, 1));
        assert_eq!(
            stats.bytes,
            (10 * e() + GHOST_CHARGE) as u64,
            "the ghost is charged"
        );
    }

    #[test]
    fn a_ghost_hit_fills_main() {
        let cache = five_and_five();
        read(&cache, "x");
        assert!(is_ghost(&cache, "s0"));
        // Read again soon after: the key is not one-hit, so it starts in
        // main; small's next oldest makes room and becomes a ghost.
        assert!(read(&cache, "s0"));
        assert_eq!(queue_of(&cache, "s0"), Some(true));
        assert!(!is_ghost(&cache, "s0"));
        assert_eq!(queue_of(&cache, "s1"), None);
        assert!(is_ghost(&cache, "s1"));
        // Charged: one live ghost (s1). s0's ring slot, a tombstone since
        // the hit, was the ring's oldest: it went as s1 came.
        assert_eq!(cache.stats().bytes, (10 * e() + GHOST_CHARGE) as u64);
    }

    #[test]
    fn an_entry_hit_in_small_moves_to_main() {
        let cache = five_and_five();
        assert!(hit(&cache, "s0"));
        assert_eq!(queue_of(&cache, "s0"), Some(false), "a hit moves nothing");
        read(&cache, "x");
        assert_eq!(
            queue_of(&cache, "s0"),
            Some(true),
            "leaving small, hit once"
        );
        assert_eq!(queue_of(&cache, "s1"), None);
        assert!(is_ghost(&cache, "s1") && !is_ghost(&cache, "s0"));
        // Its bit was cleared on the way: main's turn finds it unhit.
        let hash = cache.hasher.hash_one(b"s0");
        let shard = lock(cache.shard(hash));
        let idx = shard.find(hash, b"s0").unwrap();
        assert_eq!(shard.slots[idx].packed & ACCESSED, 0);
    }

    #[test]
    fn a_write_enters_main_and_a_write_over_an_entry_keeps_its_queue() {
        let cache = cache_for(10, 0);
        write(&cache, "w");
        read(&cache, "r");
        assert_eq!(
            queue_of(&cache, "w"),
            Some(true),
            "a key written enters main"
        );
        assert_eq!(
            queue_of(&cache, "r"),
            Some(false),
            "a key read enters small"
        );
        write(&cache, "r");
        read(&cache, "w");
        assert_eq!(queue_of(&cache, "w"), Some(true), "replaced in its queue");
        assert_eq!(queue_of(&cache, "r"), Some(false), "replaced in its queue");
        // ...as if hit: leaving small, r moves to main.
        for k in keys("f", 8) {
            read(&cache, &k);
        }
        read(&cache, "y");
        assert_eq!(queue_of(&cache, "r"), Some(true));
        // An expired entry replaced is no entry: the write starts in main.
        let cache = cache_for(10, 0);
        cache.insert_at(Entry::new(b"t", b"1", 0, 50, 1), Fill::Read, 0);
        cache.insert_at(entry("t", "2"), Fill::Write, 60);
        assert_eq!(queue_of(&cache, "t"), Some(true));
        cache.insert_at(Entry::new(b"u", b"1", 0, 50, 1), Fill::Write, 0);
        cache.insert_at(entry("u", "2"), Fill::Read, 60);
        assert_eq!(queue_of(&cache, "u"), Some(false));
    }

    #[test]
    fn main_gives_a_hit_entry_one_more_round() {
        let cache = cache_for(3, 0);
        for k in ["a", "b", "c"] {
            write(&cache, k);
        }
        assert!(hit(&cache, "a"));
        write(&cache, "d");
        // a, the oldest, was hit: it went round again (bit cleared) and b,
        // next, left.
        assert_eq!(queue_of(&cache, "b"), None);
        for k in ["a", "c", "d"] {
            assert!(queue_of(&cache, k).is_some(), "{k} kept");
        }
        write(&cache, "e");
        assert_eq!(queue_of(&cache, "c"), None);
        // Only one round per hit: unhit since, a goes next.
        write(&cache, "f");
        assert_eq!(queue_of(&cache, "a"), None);
        assert_eq!(cache.stats().evictions, 3);
        // Nothing left main for the ghost queue.
        assert!(!is_ghost(&cache, "a"));
    }

    #[test]
    fn keys_read_once_do_not_displace_keys_read_again() {
        // Five keys read every 20 requests among keys read once: exact LRU,
        // with room for 13 entries, would have evicted them between reads.
        let cache = cache_for(10, 3);
        let hot = keys("h", 5);
        for k in &hot {
            read(&cache, k);
            assert!(hit(&cache, k));
        }
        for (i, k) in keys("once", 200).iter().enumerate() {
            read(&cache, k);
            if i % 20 == 19 {
                for h in &hot {
                    assert!(hit(&cache, h), "{h} kept while {k} passes");
                }
            }
        }
        for h in &hot {
            assert_eq!(queue_of(&cache, h), Some(true), "{h}");
        }
        assert!(cache.stats().evictions >= 190);
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

    /// xorshift64*, for the randomized test below.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[test]
    fn byte_budget_with_ghosts_is_never_exceeded() {
        // Mixed reads, writes, hits, removes, sizes and expiries over two
        // shards, every invariant checked after every call.
        let cache = ItemCache::new(40_000, 2);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut ghosts_seen = 0;
        for step in 0..20_000u32 {
            let r = next(&mut rng);
            // Skewed keys: a few hot, many cold.
            let k = if r.is_multiple_of(3) {
                r % 40
            } else {
                r % 2000
            };
            let key = format!("key{k}");
            let now = 1000 + step / 50;
            let expires = if k.is_multiple_of(5) {
                now + (r % 30) as u32
            } else {
                0
            };
            let value = vec![b'v'; (r >> 20) as usize % 700];
            match (r >> 8) % 10 {
                0..=3 => {
                    if cache.get(key.as_bytes(), now).is_none() {
                        let e = Entry::new(key.as_bytes(), &value, 0, expires, 1);
                        cache.insert_at(e, Fill::Read, now);
                    }
                }
                4 => {
                    let e = Entry::new(key.as_bytes(), &value, 0, expires, 2);
                    cache.insert_at(e, Fill::Write, now);
                }
                5 => {
                    cache.remove(key.as_bytes());
                }
                _ => {
                    cache.get_with(key.as_bytes(), now, |_| ());
                }
            }
            let mut charged = 0;
            for shard in cache.shards.iter() {
                let shard = lock(shard);
                shard.check();
                assert!(shard.charged() <= shard.limit, "step {step}");
                charged += shard.charged();
                ghosts_seen = ghosts_seen.max(shard.ghosts.live.len());
            }
            assert_eq!(cache.stats().bytes, charged as u64);
        }
        let stats = cache.stats();
        assert!(
            stats.evictions > 1000 && stats.evictions_expired > 0,
            "{stats:?}"
        );
        assert!(stats.expirations > stats.evictions_expired, "{stats:?}");
        assert!(ghosts_seen > 10, "ghosts were kept: {ghosts_seen}");
    }

    #[test]
    fn expired_entries_are_not_returned() {
        let cache = cache_for(4, 0);
        cache.insert(Entry::new(b"k", b"v", 0, 100, 1));
        assert!(cache.get(b"k", 99).is_some());
        assert!(cache.get(b"k", 100).is_none(), "expires at its second");
        assert_eq!(cache.stats().items, 0, "dropped on access");
        assert_eq!(cache.stats().expirations, 1);
        assert_eq!(cache.stats().evictions_expired, 0, "not reclaimed for room");
        cache.insert(Entry::new(b"n", b"v", 0, 0, 1));
        assert!(cache.get(b"n", u32::MAX).is_some(), "0 never expires");
    }

    #[test]
    fn expired_entries_are_reclaimed_before_a_live_one_is_evicted() {
        // Four written entries, hit (so main would keep them another
        // round), all expired by the time four new keys arrive: the sweep
        // finds them, none live is evicted.
        let cache = cache_for(4, 0);
        for k in ["a", "b", "c", "d"] {
            cache.insert_at(Entry::new(k.as_bytes(), b"1", 0, 100, 1), Fill::Write, 10);
            assert!(cache.get(k.as_bytes(), 50).is_some());
        }
        for k in ["e", "f", "g", "h"] {
            assert!(cache.insert_at(entry(k, "1"), Fill::Read, 200));
        }
        let stats = cache.stats();
        assert_eq!(
            (
                stats.items,
                stats.evictions,
                stats.evictions_expired,
                stats.expirations
            ),
            (4, 0, 4, 4)
        );
        for k in ["e", "f", "g", "h"] {
            assert!(queue_of(&cache, k).is_some(), "{k}");
        }
        // Where the sweep does not look, the queue's oldest end does: an
        // expired entry there goes at once, hit or not, and leaves no ghost.
        let cache = cache_for(4, 2);
        write(&cache, "m");
        cache.insert_at(Entry::new(b"a", b"1", 0, 100, 1), Fill::Read, 10);
        assert!(cache.get(b"a", 50).is_some());
        for k in ["b", "c"] {
            read(&cache, k);
        }
        // The sweep checks slots 1 and 2 (a is in 1): move its cursor past.
        {
            let hash = cache.hasher.hash_one(b"a");
            lock(cache.shard(hash)).cursor = 1;
        }
        assert!(cache.insert_at(entry("x", "1"), Fill::Read, 200));
        assert_eq!(queue_of(&cache, "a"), None);
        assert!(!is_ghost(&cache, "a"));
        let stats = cache.stats();
        assert_eq!((stats.evictions, stats.evictions_expired), (0, 1));
        for k in ["m", "b", "c", "x"] {
            assert!(queue_of(&cache, k).is_some(), "{k}");
        }
    }

    #[test]
    fn shrinking_the_limit_evicts_as_inserts_would() {
        let cache = cache_for(4, 0);
        for k in ["a", "b", "c", "d"] {
            read(&cache, k);
        }
        cache.set_limit((2 * e()) as u64);
        // Small is FIFO: the oldest two leave (main is empty: no ghosts).
        assert!(!hit(&cache, "a") && !hit(&cache, "b"));
        assert!(hit(&cache, "c") && hit(&cache, "d"));
        assert_eq!(cache.stats().bytes, (2 * e()) as u64);
        assert_eq!(cache.stats().evictions, 2);
        // Ghosts go too when nothing is left to keep them for.
        let cache = five_and_five();
        read(&cache, "x");
        assert!(cache.stats().bytes > (10 * e()) as u64, "a ghost");
        cache.set_limit(0);
        let stats = cache.stats();
        assert_eq!((stats.items, stats.bytes, stats.limit_bytes), (0, 0, 0));
        cache.set_limit((10 * e()) as u64);
        assert!(read(&cache, "s0"));
        assert_eq!(queue_of(&cache, "s0"), Some(false), "no ghost left");
    }

    #[test]
    fn clear_drops_entries_and_ghosts() {
        let cache = five_and_five();
        read(&cache, "x");
        assert!(is_ghost(&cache, "s0"));
        cache.clear();
        let stats = cache.stats();
        assert_eq!((stats.items, stats.bytes), (0, 0));
        assert!(!is_ghost(&cache, "s0"));
        read(&cache, "s0");
        assert_eq!(queue_of(&cache, "s0"), Some(false));
        assert_eq!(
            cache.stats().limit_bytes,
            (10 * e() + 2 * GHOST_CHARGE) as u64
        );
    }

    #[test]
    fn ghosts_are_bounded_by_main_and_tombstones_leave_with_the_ring() {
        let mut g = Ghosts::default();
        for h in 1..=5 {
            g.push(h);
        }
        g.trim(3);
        assert_eq!(g.ring.len(), 3, "the two oldest dropped");
        assert!(!g.contains(1) && !g.contains(2) && g.contains(3));
        assert!(g.take(4) && !g.take(4));
        assert_eq!(g.charged(), 3 * GHOST_SLOT + 2 * GHOST_INDEX);
        // The tombstone of 4 stays behind 3, then goes with it.
        g.trim(1);
        assert_eq!((g.ring.len(), g.live.len()), (1, 1));
        assert!(g.contains(5));
        // The same hash again keeps one live ghost, at its newest slot.
        g.push(5);
        assert_eq!((g.ring.len(), g.live.len()), (2, 1));
        g.trim(1);
        assert_eq!((g.ring.len(), g.live.len()), (1, 1));
        assert!(g.take(5));
        g.trim(0);
        assert_eq!(g.charged(), 0);
        // Positions wrap around u32.
        let mut g = Ghosts {
            front: u32::MAX - 1,
            ..Ghosts::default()
        };
        for h in 10..20 {
            g.push(h);
        }
        assert!((10..20).all(|h| g.contains(h)));
        g.trim(4);
        assert!((16..20).all(|h| g.contains(h)) && !g.contains(15));
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
