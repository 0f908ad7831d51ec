//! Hot keys: the keys read and written most, in fixed memory, for the
//! operator looking for the key that throttles one DynamoDB partition
//! (1,000 write and 3,000 read units a second each).
//!
//! Each direction is a Space-Saving summary (Metwally, Agrawal, El Abbadi,
//! "Efficient computation of frequent and top-k elements in data streams",
//! 2005): `k` counters; a key already counted adds one; a new key takes the
//! smallest counter's place, starting from its count (kept as the error
//! bound). Every key seen more than N/k times of N is in it, and each count
//! is at most `error` above the truth. Keys live in fixed slots, so
//! counting never allocates (the hit path allocates nothing,
//! `tests/hit_allocations.rs`); the `topk` crate's summary takes an owned
//! key on every insert, which would. Reads are sampled at random, one in
//! [`READ_SAMPLE`], and their counts scaled back, so a hit pays a few
//! thread-local instructions most of the time; writes are all counted (each
//! is a DynamoDB call anyway).
//!
//! Keys are never Prometheus labels (one series per key would grow without
//! bound): they are shown by `stats hotkeys` and on the admin listener at
//! `/hotkeys`, escaped ([`printable`]).

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::Mutex;

use hashbrown::HashTable;

/// One read in this many (per thread) is counted.
pub const READ_SAMPLE: u64 = 16;

/// The longest key a slot holds (memcached's limit).
const KEY_MAX: usize = 250;

/// What a summary tells of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotKey {
    pub key: Vec<u8>,
    /// Estimated requests for the key (sampling scaled back): at most
    /// `error` above the count seen.
    pub count: u64,
    pub error: u64,
}

/// The hot keys of both directions.
pub struct HotKeys {
    reads: Mutex<Summary>,
    writes: Mutex<Summary>,
}

thread_local! {
    /// A xorshift state per thread: reads are sampled at random, since a
    /// fixed one-in-N would see only one key of a client that alternates
    /// between N's divisors of keys.
    static SAMPLER: Cell<u64> = Cell::new(
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8) | 1,
    );
}

impl HotKeys {
    /// Summaries of `k` keys each (0: counting is off).
    pub fn new(k: usize) -> HotKeys {
        HotKeys {
            reads: Mutex::new(Summary::new(k)),
            writes: Mutex::new(Summary::new(k)),
        }
    }

    /// A read of `key` (a retrieval's key, hit or miss): counted one time
    /// in [`READ_SAMPLE`], at random.
    pub fn read(&self, key: &[u8]) {
        let mut x = SAMPLER.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        SAMPLER.set(x);
        if x.is_multiple_of(READ_SAMPLE) {
            lock(&self.reads).add(key, READ_SAMPLE);
        }
    }

    /// A write of `key` through the write path.
    pub fn write(&self, key: &[u8]) {
        lock(&self.writes).add(key, 1);
    }

    /// The keys read most, most first.
    pub fn top_reads(&self) -> Vec<HotKey> {
        lock(&self.reads).top()
    }

    /// The keys written most, most first.
    pub fn top_writes(&self) -> Vec<HotKey> {
        lock(&self.writes).top()
    }
}

fn lock(summary: &Mutex<Summary>) -> std::sync::MutexGuard<'_, Summary> {
    summary.lock().unwrap_or_else(|e| e.into_inner())
}

/// One Space-Saving summary over fixed slots.
struct Summary {
    slots: Vec<Slot>,
    /// Slot indexes by the key's hash (capacity for every slot: never grows).
    index: HashTable<u16>,
    hasher: foldhash::fast::FixedState,
}

struct Slot {
    key: [u8; KEY_MAX],
    len: u8,
    count: u64,
    error: u64,
}

impl Slot {
    fn key(&self) -> &[u8] {
        &self.key[..usize::from(self.len)]
    }
}

impl Summary {
    fn new(k: usize) -> Summary {
        let k = k.min(usize::from(u16::MAX));
        Summary {
            slots: Vec::with_capacity(k),
            index: HashTable::with_capacity(k),
            hasher: foldhash::fast::FixedState::with_seed(0x5eed),
        }
    }

    fn add(&mut self, key: &[u8], weight: u64) {
        let capacity = self.slots.capacity();
        if capacity == 0 || key.is_empty() {
            return;
        }
        let key = &key[..key.len().min(KEY_MAX)];
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        if let Some(&i) = self
            .index
            .find(hash, |&i| slots[usize::from(i)].key() == key)
        {
            self.slots[usize::from(i)].count += weight;
            return;
        }
        let hasher = &self.hasher;
        if self.slots.len() < capacity {
            let i = u16::try_from(self.slots.len()).expect("at most u16::MAX slots");
            let mut slot = Slot {
                key: [0; KEY_MAX],
                len: key.len() as u8,
                count: weight,
                error: 0,
            };
            slot.key[..key.len()].copy_from_slice(key);
            self.slots.push(slot);
            let slots = &self.slots;
            self.index
                .insert_unique(hash, i, |&i| hasher.hash_one(slots[usize::from(i)].key()));
            return;
        }
        // The smallest counter gives its place to the new key.
        let (min, _) = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.count)
            .expect("slots are full");
        let old_hash = hasher.hash_one(self.slots[min].key());
        let min16 = min as u16;
        if let Ok(entry) = self.index.find_entry(old_hash, |&i| i == min16) {
            entry.remove();
        }
        let slot = &mut self.slots[min];
        slot.error = slot.count;
        slot.count += weight;
        slot.key[..key.len()].copy_from_slice(key);
        slot.len = key.len() as u8;
        let slots = &self.slots;
        self.index.insert_unique(hash, min16, |&i| {
            hasher.hash_one(slots[usize::from(i)].key())
        });
    }

    fn top(&self) -> Vec<HotKey> {
        let mut top: Vec<HotKey> = self
            .slots
            .iter()
            .map(|s| HotKey {
                key: s.key().to_vec(),
                count: s.count,
                error: s.error,
            })
            .collect();
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        top
    }
}

/// `key` as text safe to print anywhere (a terminal, a log, JSON): printable
/// ASCII as it is, a backslash doubled, every other byte `\xNN`.
pub fn printable(key: &[u8]) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x21..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heavy_keys_are_found_with_bounded_error() {
        let hot = HotKeys::new(8);
        // 3 heavy keys among 1,000 light ones, interleaved.
        for round in 0..200u32 {
            for heavy in [&b"h:a"[..], b"h:b", b"h:c"] {
                for _ in 0..(if heavy == b"h:a" { 3 } else { 1 }) {
                    hot.write(heavy);
                }
            }
            for light in 0..5 {
                hot.write(format!("light{}", (round * 5 + light) % 1000).as_bytes());
            }
        }
        let top = hot.top_writes();
        assert_eq!(top.len(), 8, "k counters, no more");
        let names: Vec<&[u8]> = top.iter().take(3).map(|h| h.key.as_slice()).collect();
        assert_eq!(names, [&b"h:a"[..], b"h:b", b"h:c"]);
        for h in &top[..3] {
            let truth = if h.key == b"h:a" { 600 } else { 200 };
            assert!(
                h.count >= truth && h.count - h.error <= truth,
                "{h:?} against {truth}"
            );
        }
        // Counted writes add up: every counter is a request somewhere.
        let total: u64 = top.iter().map(|h| h.count - h.error).sum();
        assert!(total <= 200 * 10);
    }

    #[test]
    fn reads_are_sampled_and_scaled_back() {
        let hot = HotKeys::new(4);
        for i in 0..16_000 {
            // Alternating keys: a fixed one-in-16 would only ever see one.
            hot.read(if i % 2 == 0 { b"page" } else { b"side" });
        }
        let top = hot.top_reads();
        for hot in &top {
            assert!(
                (6_400..=9_600).contains(&hot.count),
                "8,000 each, one in 16 counted 16 times: {hot:?}"
            );
        }
        assert_eq!(top.len(), 2);
        assert!(HotKeys::new(0).top_reads().is_empty());
        HotKeys::new(0).write(b"off");
    }

    #[test]
    fn keys_print_safely() {
        assert_eq!(printable(b"a:1\\x"), "a:1\\\\x");
        assert_eq!(printable(b"\x00\xff \n\"k"), "\\x00\\xff\\x20\\x0a\"k");
    }

    #[test]
    fn counting_allocates_nothing() {
        let hot = HotKeys::new(4);
        for i in 0..4 {
            hot.write(format!("warm{i}").as_bytes());
        }
        let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("key{i}").into_bytes()).collect();
        let counts = allocation_counter::measure(|| {
            for key in &keys {
                hot.write(key);
                hot.read(key);
            }
        });
        assert_eq!(counts.count_total, 0, "{counts:?}");
    }
}
