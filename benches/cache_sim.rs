//! cache_sim: hit ratio of eviction policies on a Zipfian trace, offline.
//!
//! Replays one trace of gets (a miss fills the cache, as dynacache's engine
//! does) through caches of the same byte budget:
//! - `exact-lru`: `ItemCache` with one shard, an exact LRU over the budget;
//! - `dynacache/N`: `ItemCache` with N shards, as the product runs it (the
//!   budget split evenly, LRU within each shard);
//! - `sieve` and `s3-fifo`: simulations of those policies (here only, not in
//!   the product), sized in items from the same budget.
//!
//! `cargo bench --bench cache_sim` prints a table (BENCHMARKS.md); under
//! `cargo test --all-targets` (no `--bench`) it replays a tiny trace only to
//! check the simulators agree with their definitions, and exits.

use std::collections::{HashMap, VecDeque};

use clap::Parser;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

use dynacache::cache::{Entry, ItemCache, entry_charge};

/// The binary's allocator, so `--memory` measures what production uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Cli {
    /// Passed by `cargo bench`; without it only a tiny self-check runs.
    #[arg(long, hide = true)]
    bench: bool,
    /// Distinct keys in the trace.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Gets replayed (the first fifth warms the caches and is not counted).
    #[arg(long, default_value_t = 5_000_000)]
    requests: u64,
    /// Zipf exponents to try.
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.99,1.2")]
    zipf_s: Vec<f64>,
    /// Budgets as a share of the bytes of all keys.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.05,0.1,0.25")]
    budgets: Vec<f64>,
    #[arg(long, default_value_t = 32)]
    value_size: usize,
    /// Shard counts of the product's cache to try (16 = 8 per core on 2 cores).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    shards: Vec<usize>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Instead of hit ratios: insert this many distinct items into one
    /// `ItemCache` (default shards) and report this process's RSS growth
    /// against the budget and the bytes charged. Run once per process: RSS
    /// never shrinks, so each case needs a fresh one.
    #[arg(long)]
    memory: Option<u64>,
    /// Budget for --memory, in bytes (default: room for every item).
    #[arg(long)]
    budget: Option<u64>,
}

fn main() {
    let cli = Cli::parse();
    if !cli.bench {
        self_check();
        println!("cache_sim: self-check passed; no simulation without --bench");
        return;
    }
    if let Some(items) = cli.memory {
        memory(items, cli.budget, cli.value_size);
        return;
    }
    println!(
        "hit ratio on a Zipfian trace: {} keys (16-byte keys, {}-byte values), {} gets, first {} not counted\n",
        cli.keys,
        cli.value_size,
        cli.requests,
        cli.requests / 5
    );
    let mut header = String::from("| zipf s | budget (share of all items) | exact-lru");
    for n in &cli.shards {
        header.push_str(&format!(" | dynacache/{n}"));
    }
    header.push_str(" | sieve | s3-fifo |");
    println!("{header}");
    println!("|{}", "---|".repeat(5 + cli.shards.len()));
    for &s in &cli.zipf_s {
        let trace = zipf_trace(cli.keys, cli.requests, s, cli.seed);
        for &share in &cli.budgets {
            let item_charge = entry_charge(16 + cli.value_size);
            let budget = (share * cli.keys as f64 * item_charge as f64) as u64;
            let capacity = (budget / item_charge as u64) as usize;
            let lru = replay_item_cache(&trace, budget, 1, cli.value_size);
            let mut row = format!("| {s} | {share} | {lru:.4}");
            for &n in &cli.shards {
                let r = replay_item_cache(&trace, budget, n, cli.value_size);
                row.push_str(&format!(" | {r:.4} ({:+.4})", r - lru));
            }
            let sieve = replay(&trace, &mut Sieve::new(capacity));
            let s3 = replay(&trace, &mut S3Fifo::new(capacity));
            row.push_str(&format!(
                " | {sieve:.4} ({:+.4}) | {s3:.4} ({:+.4}) |",
                sieve - lru,
                s3 - lru
            ));
            println!("{row}");
        }
    }
    println!("\n(in brackets: the difference from exact-lru, in hit ratio)");
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// RSS growth of filling one `ItemCache` with `items` distinct 16-byte keys.
fn memory(items: u64, budget: Option<u64>, value_size: usize) {
    let budget = budget.unwrap_or(u64::MAX / 2);
    let shards = ItemCache::default_shards();
    let value = vec![b'v'; value_size];
    let before = rss_bytes();
    let cache = ItemCache::new(budget, shards);
    for i in 0..items {
        cache.insert(Entry::new(&key_of(i), &value, 0, 0, 1));
    }
    // mimalloc returns freed memory (the slab's and table's old arrays as
    // they grew) to the OS one second after the free, on a later call into
    // the allocator: wait that out, then allocate, as a serving process does.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    for _ in 0..4 {
        let churn: Vec<Vec<u8>> = (0..10_000).map(|i| vec![0u8; 64 + i % 512]).collect();
        drop(std::hint::black_box(churn));
    }
    let after = rss_bytes();
    let stats = cache.stats();
    let growth = after - before;
    println!(
        "MEMORY in-process items_inserted={items} value_size={value_size} shards={shards} budget={} items={} charged={} charged_per_item={} rss_growth={growth} rss_per_item={} rss_over_charged={:.3}{}",
        if budget >= u64::MAX / 2 {
            "unbounded".to_string()
        } else {
            budget.to_string()
        },
        stats.items,
        stats.bytes,
        stats.bytes / stats.items.max(1),
        growth / stats.items.max(1),
        growth as f64 / stats.bytes as f64,
        if budget < u64::MAX / 2 {
            format!(" rss_over_budget={:.3}", growth as f64 / budget as f64)
        } else {
            String::new()
        },
    );
}

/// Key indices of a Zipfian trace, ranks spread over the key space.
fn zipf_trace(keys: u64, requests: u64, s: f64, seed: u64) -> Vec<u64> {
    let zipf = Zipf::new(keys as f64, s).expect("zipf parameters");
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..requests)
        .map(|_| (zipf.sample(&mut rng) as u64 - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys)
        .collect()
}

fn key_of(i: u64) -> [u8; 16] {
    let mut key = [b'0'; 16];
    key[0] = b'k';
    let mut n = i;
    for b in key[1..].iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
    key
}

/// Hit ratio of `ItemCache` with `shards` shards over the counted part of the trace.
fn replay_item_cache(trace: &[u64], budget: u64, shards: usize, value_size: usize) -> f64 {
    let cache = ItemCache::new(budget, shards);
    let value = vec![b'v'; value_size];
    let warm = trace.len() / 5;
    let mut hits = 0u64;
    for (n, &i) in trace.iter().enumerate() {
        let key = key_of(i);
        if cache.get(&key, 0).is_some() {
            if n >= warm {
                hits += 1;
            }
        } else {
            cache.insert(Entry::new(&key, &value, 0, 0, 1));
        }
    }
    hits as f64 / (trace.len() - warm) as f64
}

/// A policy simulated by item count.
trait Policy {
    /// Looks `key` up; on a miss, inserts it. Returns whether it was a hit.
    fn access(&mut self, key: u64) -> bool;
    fn len(&self) -> usize;
}

fn replay(trace: &[u64], policy: &mut impl Policy) -> f64 {
    let warm = trace.len() / 5;
    let mut hits = 0u64;
    for (n, &k) in trace.iter().enumerate() {
        if policy.access(k) && n >= warm {
            hits += 1;
        }
    }
    hits as f64 / (trace.len() - warm) as f64
}

const NIL: usize = usize::MAX;

/// SIEVE (Zhang et al., NSDI '24): one FIFO list and a "visited" bit; the
/// hand walks from the oldest end, clearing visited bits, and evicts the
/// first unvisited entry. A hit only sets a bit (no list move, no lock
/// contention in a real cache).
struct Sieve {
    capacity: usize,
    index: HashMap<u64, usize>,
    keys: Vec<u64>,
    visited: Vec<bool>,
    /// Towards newer entries.
    newer: Vec<usize>,
    /// Towards older entries.
    older: Vec<usize>,
    head: usize,
    tail: usize,
    hand: usize,
    free: Vec<usize>,
}

impl Sieve {
    fn new(capacity: usize) -> Sieve {
        Sieve {
            capacity: capacity.max(1),
            index: HashMap::new(),
            keys: Vec::new(),
            visited: Vec::new(),
            newer: Vec::new(),
            older: Vec::new(),
            head: NIL,
            tail: NIL,
            hand: NIL,
            free: Vec::new(),
        }
    }

    fn unlink(&mut self, i: usize) {
        let (newer, older) = (self.newer[i], self.older[i]);
        match newer {
            NIL => self.head = older,
            n => self.older[n] = older,
        }
        match older {
            NIL => self.tail = newer,
            o => self.newer[o] = newer,
        }
    }

    fn evict(&mut self) {
        let mut i = if self.hand == NIL {
            self.tail
        } else {
            self.hand
        };
        while self.visited[i] {
            self.visited[i] = false;
            i = match self.newer[i] {
                NIL => self.tail,
                n => n,
            };
        }
        self.hand = self.newer[i];
        self.unlink(i);
        self.index.remove(&self.keys[i]);
        self.free.push(i);
    }
}

impl Policy for Sieve {
    fn access(&mut self, key: u64) -> bool {
        if let Some(&i) = self.index.get(&key) {
            self.visited[i] = true;
            return true;
        }
        if self.index.len() >= self.capacity {
            self.evict();
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.keys[i] = key;
                self.visited[i] = false;
                i
            }
            None => {
                self.keys.push(key);
                self.visited.push(false);
                self.newer.push(NIL);
                self.older.push(NIL);
                self.keys.len() - 1
            }
        };
        self.newer[i] = NIL;
        self.older[i] = self.head;
        if self.head != NIL {
            self.newer[self.head] = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
        self.index.insert(key, i);
        false
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

/// S3-FIFO (Yang et al., SOSP '23): a small FIFO (10% of the space) that new
/// keys enter, a main FIFO, and a ghost FIFO of recently evicted keys. A key
/// leaving the small queue moves to main if it was hit while there, else to
/// ghost; a miss on a ghost key goes straight to main. Main reinserts entries
/// with a non-zero (capped at 3) frequency, decrementing it.
struct S3Fifo {
    small_cap: usize,
    main_cap: usize,
    small: VecDeque<u64>,
    main: VecDeque<u64>,
    ghost: VecDeque<u64>,
    /// Key -> access frequency (0..=3), for keys in small or main.
    freq: HashMap<u64, u8>,
    /// Keys in ghost, with how many times each is queued there.
    ghosts: HashMap<u64, u32>,
}

impl S3Fifo {
    fn new(capacity: usize) -> S3Fifo {
        let capacity = capacity.max(2);
        let small_cap = (capacity / 10).max(1);
        S3Fifo {
            small_cap,
            main_cap: capacity - small_cap,
            small: VecDeque::new(),
            main: VecDeque::new(),
            ghost: VecDeque::new(),
            freq: HashMap::new(),
            ghosts: HashMap::new(),
        }
    }

    fn push_ghost(&mut self, key: u64) {
        self.ghost.push_back(key);
        *self.ghosts.entry(key).or_default() += 1;
        while self.ghost.len() > self.main_cap {
            let old = self.ghost.pop_front().expect("non-empty");
            if let Some(n) = self.ghosts.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.ghosts.remove(&old);
                }
            }
        }
    }

    fn evict_main(&mut self) {
        while let Some(key) = self.main.pop_front() {
            let f = self.freq.get_mut(&key).expect("main keys have a frequency");
            if *f > 0 {
                *f -= 1;
                self.main.push_back(key);
            } else {
                self.freq.remove(&key);
                return;
            }
        }
    }

    fn evict_small(&mut self) {
        while let Some(key) = self.small.pop_front() {
            if self.freq[&key] > 0 {
                self.freq.insert(key, 0);
                if self.main.len() >= self.main_cap {
                    self.evict_main();
                }
                self.main.push_back(key);
            } else {
                self.freq.remove(&key);
                self.push_ghost(key);
                return;
            }
        }
    }

    fn make_room(&mut self) {
        while self.small.len() + self.main.len() >= self.small_cap + self.main_cap {
            if self.small.len() >= self.small_cap || self.main.is_empty() {
                self.evict_small();
            } else {
                self.evict_main();
            }
        }
    }
}

impl Policy for S3Fifo {
    fn access(&mut self, key: u64) -> bool {
        if let Some(f) = self.freq.get_mut(&key) {
            *f = (*f + 1).min(3);
            return true;
        }
        self.make_room();
        self.freq.insert(key, 0);
        if self.ghosts.contains_key(&key) {
            self.main.push_back(key);
        } else {
            self.small.push_back(key);
        }
        false
    }

    fn len(&self) -> usize {
        self.freq.len()
    }
}

/// Checks the simulators on tiny traces whose answers are known.
fn self_check() {
    // A working set that fits: every policy hits on all but the first pass.
    let trace: Vec<u64> = (0..10).cycle().take(1000).collect();
    for (name, r) in [
        ("sieve", replay(&trace, &mut Sieve::new(10))),
        ("s3-fifo", replay(&trace, &mut S3Fifo::new(20))),
        (
            "exact-lru",
            replay_item_cache(&trace, 10 * entry_charge(48) as u64, 1, 32),
        ),
    ] {
        assert!((r - 1.0).abs() < 1e-9, "{name}: {r}");
    }
    // One hot key between one-time keys: each policy keeps the hot key.
    let trace: Vec<u64> = (1..500).flat_map(|k| [0, k]).collect();
    let lru = replay_item_cache(&trace, 2 * entry_charge(48) as u64, 1, 32);
    let sieve = replay(&trace, &mut Sieve::new(2));
    let s3 = replay(&trace, &mut S3Fifo::new(10));
    for (name, r) in [("exact-lru", lru), ("sieve", sieve), ("s3-fifo", s3)] {
        assert!((0.45..=0.55).contains(&r), "{name}: {r}");
    }
    // Sizes stay within capacity on a skewed trace.
    let trace = zipf_trace(1000, 20_000, 0.99, 1);
    let (mut sieve, mut s3) = (Sieve::new(100), S3Fifo::new(100));
    for &k in &trace {
        sieve.access(k);
        s3.access(k);
        assert!(sieve.len() <= 100 && s3.len() <= 100);
    }
}
