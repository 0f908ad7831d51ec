//! cache_sim: miss ratios of eviction policies, offline, every policy held
//! to the same byte budget with the product's own charging.
//!
//! Replays traces of gets and sets (a get that misses fills the cache, as
//! dynacache's engine does after its DynamoDB read; a set replaces the entry,
//! as the engine's write path does) through:
//! - `exact-lru`: exact LRU (the simulated `lru@none`: an expired entry
//!   goes when a get finds it or when it is the least recently used), what
//!   `ItemCache` was until S3-FIFO replaced it (at commit 51df7d9 the
//!   self-check held the two to the same answers, request by request);
//! - `dynacache`: the product's `ItemCache` with one shard (S3-FIFO with a
//!   1-bit counter, writes of keys not cached entering main, expired
//!   entries reclaimed at the queues' ends and by a 2-slot sweep: the
//!   self-check holds it to `s3-fifo-wm-c1@sweep2` request by request);
//!   `dynacache/16`: `ItemCache` with 16 shards, as the product runs it;
//! - simulated policies: `lru`, `sieve`, `clock`, `clock-2bit`, `s3-fifo`
//!   and its variants, `w-tinylfu`;
//!   `NAME/N` runs N shards of it, each with 1/N of the budget, keys spread
//!   by hash. S3-FIFO's variants ([`PolicySpec::parse`]): `-c1` a 1-bit
//!   counter instead of 2, `-wm` a set of a key not cached enters main
//!   instead of small, `-sPCT` another small-queue share, `-t2` two hits in
//!   small to move to main, `-ng` no ghosts, `-hc` the small queue's share
//!   adapted by hill climbing (as Caffeine adapts its window; `w-tinylfu-hc`
//!   likewise).
//!
//! What every simulated policy is charged, against the one byte budget:
//! - each resident entry: `entry_charge(key_len + value_len)`, exactly what
//!   `ItemCache` charges (the 48-byte slot, 12 bytes of table index, the
//!   key and value's allocation). Per-entry policy state of at most 3 bits
//!   is not charged again, as the slot can hold it (2 of the 48 bits of the
//!   fill time in its packed word, or the top bits of its u32 `prev`/`next`
//!   links, which become the FIFO links): SIEVE's visited bit, S3-FIFO's
//!   and CLOCK's 1- or 2-bit frequency and 1-bit queue, W-TinyLFU's 2-bit
//!   queue;
//! - S3-FIFO's ghost queue: [`GHOST_SLOT_BYTES`] (8) per ring slot, a key
//!   hash in a ring buffer, plus [`GHOST_INDEX_BYTES`] (12) per live ghost,
//!   its index in a hash table at hashbrown's worst load (as
//!   `ENTRY_OVERHEAD` counts it): 20 bytes a ghost;
//! - W-TinyLFU's count-min sketch: 8 bytes per word, a power of two of
//!   words at least the expected entry count (Caffeine's sizing: 16 4-bit
//!   counters per word, 4 per key), charged in full from the start.
//!
//! Expired entries (issue 16, item 2), `@RECLAIM` after a policy's name:
//! - `none`: an expired entry goes only when a get finds it (as `ItemCache`
//!   today) or when the policy would evict it anyway;
//! - `tail`: also, an expired entry met where the policy looks for a
//!   victim (the FIFO's oldest end, SIEVE's hand, an LRU's tail) is evicted
//!   at once, whatever its frequency or visited bit (no second chance);
//! - `sweepK`: `tail`, and before evicting anything live to make room, a
//!   cursor over the slab checks the next K slots and drops the expired ones
//!   there (O(K) per insert that needs room, no full scan).
//!
//! `cargo bench --bench cache_sim` prints the tables of BENCHMARKS.md; under
//! `cargo test --all-targets` (no `--bench`) it only checks each simulator
//! against its definition on tiny hand-checked traces, and exits.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use hashbrown::HashMap;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp, Geometric};

use dynacache::cache::{Entry, Fill, ItemCache, entry_charge};

/// The traces' requests and generators, shared with tests/hit_ratio.rs.
#[path = "../tests/common/trace.rs"]
pub(crate) mod trace;
use trace::{
    EPOCH, Req, generic_sizes, get_req, key_bytes, lognormal_of, mix64, unit, zipf_gets, zipf_ranks,
};

/// The binary's allocator, so `--memory` measures what production uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_POLICIES: &str = "exact-lru,lru/16,dynacache,dynacache/16,sieve,clock,clock-2bit,s3-fifo,s3-fifo-c1,\
s3-fifo-wm,s3-fifo-wm-c1,s3-fifo-wm-c1/16,s3-fifo-hc,s3-fifo-ng,w-tinylfu,w-tinylfu-hc";
const DEFAULT_TRACES: &str = "zipf-0.6,zipf-0.8,zipf-0.99,zipf-1.2,scan,session,twitter-c52";
const DEFAULT_RECLAIM: &str = "exact-lru,dynacache,lru@sweep2,sieve@none,sieve@sweep2,s3-fifo@none,\
s3-fifo@tail,s3-fifo@sweep2,s3-fifo-wm-c1@none,s3-fifo-wm-c1@tail,s3-fifo-wm-c1@sweep2,\
s3-fifo-wm-c1@sweep8,w-tinylfu@none,w-tinylfu@sweep2";

#[derive(Debug, Parser)]
struct Cli {
    /// Passed by `cargo bench`; without it only a tiny self-check runs.
    #[arg(long, hide = true)]
    bench: bool,
    /// Traces to replay: zipf-S (any S), scan, session, twitter-c52.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_TRACES)]
    traces: Vec<String>,
    /// Requests per trace.
    #[arg(long, default_value_t = 4_000_000)]
    requests: usize,
    /// Distinct keys of the Zipf traces (and of scan's hot set).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Budgets as a share of the trace's working set: the charges of all the
    /// distinct keys it requests.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.1,0.3")]
    budgets: Vec<f64>,
    /// Policies, as NAME[/SHARDS][@RECLAIM] (see the file's header).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_POLICIES)]
    policies: Vec<String>,
    /// Reclamation of simulated policies given no `@RECLAIM`.
    #[arg(long, default_value = "sweep2")]
    reclaim: String,
    /// Policies of the expired-item table (empty: no table).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_RECLAIM)]
    reclaim_policies: Vec<String>,
    /// Traces of the expired-item table.
    #[arg(long, value_delimiter = ',', default_value = "session")]
    reclaim_traces: Vec<String>,
    /// Share of each trace's requests that warms the caches, not counted.
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// Share of scan's requests to never-repeated keys.
    #[arg(long, default_value_t = 0.4)]
    scan_share: f64,
    /// Sessions starting per second in the session trace.
    #[arg(long, default_value_t = 50.0)]
    session_rate: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Replays run at once (default: the cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also print one `RESULT` line per replay, with raw counts (all
    /// requests, warm-up included, and the counted part).
    #[arg(long)]
    counts: bool,
    /// Instead of miss ratios: insert this many distinct items into one
    /// `ItemCache` (default shards) and report this process's RSS growth
    /// against the budget and the bytes charged. Run once per process: RSS
    /// never shrinks, so each case needs a fresh one.
    #[arg(long)]
    memory: Option<u64>,
    /// Budget for --memory, in bytes (default: room for every item).
    #[arg(long)]
    budget: Option<u64>,
    /// Value size for --memory.
    #[arg(long, default_value_t = 32)]
    value_size: usize,
}

fn main() {
    let mut cli = Cli::parse();
    // `--reclaim-policies ""` turns that table off.
    for list in [
        &mut cli.policies,
        &mut cli.reclaim_policies,
        &mut cli.reclaim_traces,
    ] {
        list.retain(|s| !s.is_empty());
    }
    if !cli.bench {
        self_check();
        println!("cache_sim: self-check passed; no simulation without --bench");
        return;
    }
    if let Some(items) = cli.memory {
        memory(items, cli.budget, cli.value_size);
        return;
    }
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let started = Instant::now();
    for spec in cli.policies.iter().chain(&cli.reclaim_policies) {
        if let Err(e) = PolicySpec::parse(spec, &cli.reclaim) {
            eprintln!("cache_sim: {e}");
            std::process::exit(2);
        }
    }
    println!("# cache_sim: miss ratios, every policy within the same byte budget\n");
    println!(
        "{} requests per trace, the first {:.0}% warm up and are not counted; seed {}; \
         budgets as a share of each trace's working set (the charges of all its distinct keys); \
         simulated policies reclaim expired entries with `{}` unless named otherwise.\n",
        cli.requests,
        cli.warmup * 100.0,
        cli.seed,
        cli.reclaim
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut meta_rows: Vec<Row> = Vec::new();
    let mut reclaim_rows: Vec<Row> = Vec::new();
    let mut names: Vec<&String> = cli.traces.iter().collect();
    for t in &cli.reclaim_traces {
        if !names.contains(&t) {
            names.push(t);
        }
    }
    println!("## Traces\n");
    println!(
        "| trace | requests | gets | sets | distinct keys | mean freq | one-hit keys | working set | mean charge | simulated time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for name in names {
        let t0 = Instant::now();
        let trace = match Trace::generate(name, &cli) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("cache_sim: {e}");
                std::process::exit(2);
            }
        };
        let stats = trace.stats();
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1}% | {:.1} MB | {:.0} B | {} s |",
            trace.name,
            trace.reqs.len(),
            stats.gets,
            stats.sets,
            stats.distinct,
            trace.reqs.len() as f64 / stats.distinct as f64,
            100.0 * stats.one_hit as f64 / stats.distinct as f64,
            stats.working_set as f64 / 1e6,
            stats.working_set as f64 / stats.distinct as f64,
            trace.duration(),
        );
        eprintln!(
            "cache_sim: {} generated in {:.1}s: {}",
            trace.name,
            t0.elapsed().as_secs_f64(),
            trace.about
        );
        let warm = (trace.reqs.len() as f64 * cli.warmup) as usize;
        let in_main = cli.traces.contains(name);
        let in_reclaim = cli.reclaim_traces.contains(name);
        let mut jobs = Vec::new();
        for &share in &cli.budgets {
            let budget = (share * stats.working_set as f64) as u64;
            if in_main {
                for p in &cli.policies {
                    jobs.push((share, budget, p.clone(), false));
                }
            }
            if in_reclaim {
                for p in &cli.reclaim_policies {
                    jobs.push((share, budget, p.clone(), true));
                }
            }
        }
        let t1 = Instant::now();
        let results = run_jobs(&trace, &stats, warm, &jobs, &cli.reclaim, threads);
        eprintln!(
            "cache_sim: {} replayed ({} replays) in {:.1}s",
            trace.name,
            jobs.len(),
            t1.elapsed().as_secs_f64()
        );
        for ((share, budget, spec, reclaim_table), out) in jobs.iter().zip(results) {
            if cli.counts {
                println!(
                    "RESULT trace={} budget_share={share} budget_bytes={budget} policy={spec} \
                     requests={} gets_all={} misses_all={} gets={} misses={} miss_ratio={:.6} \
                     metadata_bytes={} evicted_capacity={} evicted_expired={} expired_on_get={}",
                    trace.name,
                    trace.reqs.len(),
                    out.gets_all,
                    out.misses_all,
                    out.gets,
                    out.misses,
                    out.miss_ratio(),
                    out.meta_bytes,
                    out.evicted_capacity,
                    out.evicted_expired,
                    out.expired_on_get,
                );
            }
            let table = if *reclaim_table {
                &mut reclaim_rows
            } else {
                &mut rows
            };
            row_for(table, &trace.name, *share, *budget)
                .cells
                .push((spec.clone(), out));
            if !*reclaim_table && out.meta_bytes > 0 {
                row_for(&mut meta_rows, &trace.name, *share, *budget)
                    .cells
                    .push((spec.clone(), out));
            }
        }
    }
    println!();
    println!(
        "## Miss ratio (% of gets that go to DynamoDB; in brackets: points against exact-lru, negative = fewer reads)\n"
    );
    print_table(&rows, &cli.policies, |out, base| {
        let m = 100.0 * out.miss_ratio();
        match base {
            Some(b) => format!("{m:.2} ({:+.2})", m - 100.0 * b.miss_ratio()),
            None => format!("{m:.2}"),
        }
    });
    if !meta_rows.is_empty() {
        println!();
        println!("## Metadata charged at the end of the run (ghosts, sketch), % of the budget\n");
        let with_meta: Vec<String> = cli
            .policies
            .iter()
            .filter(|p| {
                meta_rows
                    .iter()
                    .any(|r| r.cells.iter().any(|(n, _)| n == *p))
            })
            .cloned()
            .collect();
        print_table(&meta_rows, &with_meta, |out, _| {
            format!(
                "{:.1}",
                100.0 * out.meta_bytes as f64 / out.budget.max(1) as f64
            )
        });
    }
    if !reclaim_rows.is_empty() {
        println!();
        println!(
            "## Expired entries: miss ratio (%) and, in brackets, evictions of live entries / expired entries reclaimed (thousands)\n"
        );
        print_table(&reclaim_rows, &cli.reclaim_policies, |out, _| {
            format!(
                "{:.2} ({:.0}k / {:.0}k)",
                100.0 * out.miss_ratio(),
                out.evicted_capacity as f64 / 1e3,
                (out.evicted_expired + out.expired_on_get) as f64 / 1e3
            )
        });
    }
    eprintln!("cache_sim: done in {:.1}s", started.elapsed().as_secs_f64());
}

struct Row {
    trace: String,
    share: f64,
    budget: u64,
    cells: Vec<(String, Outcome)>,
}

fn row_for<'a>(rows: &'a mut Vec<Row>, trace: &str, share: f64, budget: u64) -> &'a mut Row {
    let pos = rows
        .iter()
        .position(|r| r.trace == trace && r.share == share)
        .unwrap_or_else(|| {
            rows.push(Row {
                trace: trace.to_string(),
                share,
                budget,
                cells: Vec::new(),
            });
            rows.len() - 1
        });
    &mut rows[pos]
}

fn print_table(
    rows: &[Row],
    columns: &[String],
    cell: impl Fn(&Outcome, Option<&Outcome>) -> String,
) {
    let mut header = String::from("| trace | budget |");
    for c in columns {
        let _ = write!(header, " {c} |");
    }
    println!("{header}");
    println!("|---|---|{}", "---|".repeat(columns.len()));
    for row in rows {
        let base = row
            .cells
            .iter()
            .find(|(n, _)| n == "exact-lru")
            .map(|(_, o)| o);
        let mut line = format!(
            "| {} | {:.0}% ({:.1} MB) |",
            row.trace,
            row.share * 100.0,
            row.budget as f64 / 1e6
        );
        for c in columns {
            match row.cells.iter().find(|(n, _)| n == c) {
                Some((n, out)) => {
                    let base = if n == "exact-lru" { None } else { base };
                    let _ = write!(line, " {} |", cell(out, base));
                }
                None => line.push_str(" - |"),
            }
        }
        println!("{line}");
    }
}

/// Replays `jobs` over `threads` threads; results in the jobs' order.
fn run_jobs(
    trace: &Trace,
    stats: &TraceStats,
    warm: usize,
    jobs: &[(f64, u64, String, bool)],
    reclaim: &str,
    threads: usize,
) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, budget, spec, _)) = jobs.get(i) else {
                        break;
                    };
                    let spec = PolicySpec::parse(spec, reclaim).expect("checked");
                    let mut policy = spec.build(*budget, stats.mean_charge());
                    let out = replay(&trace.reqs, warm, policy.as_mut(), *budget);
                    results.lock().expect("results")[i] = Some(out);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|o| o.expect("every job ran"))
        .collect()
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

// ---------------------------------------------------------------- traces

struct Trace {
    name: String,
    /// How it was made, for the log.
    about: String,
    reqs: Vec<Req>,
}

struct TraceStats {
    gets: u64,
    sets: u64,
    distinct: u64,
    one_hit: u64,
    working_set: u64,
}

impl TraceStats {
    fn mean_charge(&self) -> u64 {
        self.working_set / self.distinct.max(1)
    }
}

impl Trace {
    fn generate(name: &str, cli: &Cli) -> Result<Trace, String> {
        let (r, seed) = (cli.requests, cli.seed);
        if let Some(s) = name.strip_prefix("zipf-") {
            let s: f64 = s
                .parse()
                .map_err(|_| format!("bad Zipf exponent in {name}"))?;
            return Ok(zipf_trace(name, cli.keys, r, s, seed));
        }
        match name {
            "scan" => Ok(scan_trace(cli.keys, r, 0.99, cli.scan_share, seed)),
            "session" => Ok(session_trace(r, cli.session_rate, seed)),
            "twitter-c52" => Ok(twitter_c52_trace(r, seed)),
            _ => Err(format!("unknown trace {name}")),
        }
    }

    fn stats(&self) -> TraceStats {
        let mut seen: HashMap<u64, (u32, u64), KeyHash> = HashMap::default();
        let (mut gets, mut sets) = (0, 0);
        for r in &self.reqs {
            if r.set {
                sets += 1;
            } else {
                gets += 1;
            }
            seen.entry(r.key).or_insert((0, r.charge())).0 += 1;
        }
        TraceStats {
            gets,
            sets,
            distinct: seen.len() as u64,
            one_hit: seen.values().filter(|(n, _)| *n == 1).count() as u64,
            working_set: seen.values().map(|(_, c)| c).sum(),
        }
    }

    fn duration(&self) -> u32 {
        match (self.reqs.first(), self.reqs.last()) {
            (Some(a), Some(b)) => b.time - a.time,
            _ => 0,
        }
    }
}

/// Gets only, Zipf(s) popularity over `keys` keys (independent requests).
fn zipf_trace(name: &str, keys: u64, requests: usize, s: f64, seed: u64) -> Trace {
    Trace {
        name: name.to_string(),
        about: format!("Zipf s={s} over {keys} keys, gets only, sizes as generic_sizes"),
        reqs: zipf_gets(keys, requests, s, seed),
    }
}

/// Gets: a Zipf(s) hot set over `keys` keys, interleaved with scans of
/// never-repeated keys (runs of geometric length, mean 256) making up
/// `scan_share` of the requests, as a crawler or a batch job reading cold
/// rows through the cache.
fn scan_trace(keys: u64, requests: usize, s: f64, scan_share: f64, seed: u64) -> Trace {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5CA7);
    let mut coin = SmallRng::seed_from_u64(seed ^ 0xC014);
    let mut next = zipf_ranks(keys, s, &mut rng);
    let mean_run = 256.0;
    let run_len = Geometric::new(1.0 / mean_run).expect("p");
    // A run starts after a hot request with the probability that makes
    // scan_share of all requests scan requests.
    let start_p = (scan_share / (1.0 - scan_share) / mean_run).min(1.0);
    let mut cold = 1u64 << 40;
    let mut reqs = Vec::with_capacity(requests);
    while reqs.len() < requests {
        let k = next();
        reqs.push(get_req(k, EPOCH, generic_sizes(k)));
        if coin.random_bool(start_p) {
            let n = 1 + run_len.sample(&mut coin);
            for _ in 0..n {
                if reqs.len() >= requests {
                    break;
                }
                cold += 1;
                reqs.push(get_req(cold, EPOCH, generic_sizes(cold)));
            }
        }
    }
    Trace {
        name: "scan".to_string(),
        about: format!(
            "Zipf s={s} hot set over {keys} keys, {:.0}% of requests in scans of never-repeated keys (geometric runs, mean {mean_run})",
            scan_share * 100.0
        ),
        reqs,
    }
}

/// Sessions: `rate` new sessions a second (Poisson arrivals), each one key
/// (40-60 bytes; value log-normal, median 400 bytes, sigma 0.7) created by a
/// set with a TTL of 300, 900 or 1800 s (equally likely), then read and
/// written (80% gets, 20% sets, each set renewing the TTL) by on average 14
/// more requests at uniform times over the session's life (exponential, mean
/// 180 s, at most 0.9 of the TTL, so every get finds the item live in the
/// table: a miss is a DynamoDB read that fills), then never again.
fn session_trace(requests: usize, rate: f64, seed: u64) -> Trace {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5E55);
    let gap: Exp<f64> = Exp::new(rate).expect("rate");
    let life: Exp<f64> = Exp::new(1.0 / 180.0).expect("mean");
    let more = Geometric::new(1.0 / 15.0).expect("p");
    // (time, key, is_set)
    let mut events: Vec<(f64, u64, bool)> = Vec::with_capacity(requests + 64);
    let mut ttls: Vec<u32> = Vec::new();
    let mut t = 0.0;
    while events.len() < requests {
        t += gap.sample(&mut rng);
        let key = ttls.len() as u64;
        let ttl: u32 = [300, 900, 1800][rng.random_range(0..3usize)];
        ttls.push(ttl);
        let d = life.sample(&mut rng).min(0.9 * f64::from(ttl));
        events.push((t, key, true));
        for _ in 0..more.sample(&mut rng) {
            events.push((t + d * rng.random::<f64>(), key, rng.random_bool(0.2)));
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    events.truncate(requests);
    let mut expiry = vec![0u32; ttls.len()];
    let reqs = events
        .into_iter()
        .map(|(t, key, set)| {
            let time = EPOCH + t as u32;
            if set {
                expiry[key as usize] = time + ttls[key as usize];
            }
            Req {
                key,
                time,
                expires_at: expiry[key as usize],
                value_len: lognormal_of(key, 400f64.ln(), 0.7, 16_384),
                key_len: 40 + (mix64(key ^ 0x5EED) % 21) as u8,
                set,
            }
        })
        .collect();
    Trace {
        name: "session".to_string(),
        about: format!(
            "{rate} sessions/s, TTL 300/900/1800 s renewed by sets, ~15 requests over an exponential life (mean 180 s), 20% of later requests sets"
        ),
        reqs,
    }
}

/// Twitter's cluster 52, generated from its published characteristics:
/// `stat/2020Mar.md` of github.com/twitter/cache-trace (the statistics of
/// the traces of Yang, Yue and Vinayak, "A large scale analysis of hundreds
/// of in-memory cache clusters at Twitter", OSDI '20), the cluster its
/// authors recommend for miss-ratio studies. Published: key size 20, value
/// size 273 (means), mean object frequency 32.6, one-hit-wonder ratio
/// 19.36%, Zipf alpha 1.2117, operations get 0.91 gets 0.02 add 0.04 cas
/// 0.02, TTLs 1d 0.65 / 14d 0.27 / 12h 0.07, 24.25 kqps.
///
/// How: `requests / 32.6` objects, of which 19.36% are requested once and
/// the others by the rank-frequency law `max(2, round(A r^-1.2117))` (A set
/// so the counts add up to `requests`): the published alpha, mean frequency
/// and one-hit-wonder ratio hold exactly (independent Zipf draws cannot hold
/// all three over a few million requests: they give about 45% one-hit
/// wonders). The requests are then shuffled (no temporal locality beyond
/// popularity: not published). get+gets are gets, add+cas sets (6.1%);
/// key length uniform 16..=24; value length log-normal with mean 273 and
/// sigma 1.0 (only the mean is published); each object's TTL drawn from the
/// published mix; time at 24.25k requests a second.
fn twitter_c52_trace(requests: usize, seed: u64) -> Trace {
    const ALPHA: f64 = 1.2117;
    const MEAN_FREQ: f64 = 32.6;
    const ONE_HIT: f64 = 0.1936;
    const SET_SHARE: f64 = 0.06 / 0.99;
    const QPS: f64 = 24_250.0;
    let objects = ((requests as f64 / MEAN_FREQ).round() as usize).max(2);
    let singles = (objects as f64 * ONE_HIT).round() as usize;
    let repeated = objects - singles;
    let target = requests.saturating_sub(singles);
    let counts = |a: f64| -> Vec<usize> {
        (1..=repeated)
            .map(|r| ((a * (r as f64).powf(-ALPHA)).round() as usize).max(2))
            .collect()
    };
    let (mut lo, mut hi) = (0.0, requests as f64 * 2.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if counts(mid).iter().sum::<usize>() < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut ids: Vec<u64> = Vec::with_capacity(requests);
    for (r, c) in counts(hi).into_iter().enumerate() {
        ids.extend(std::iter::repeat_n(r as u64, c));
    }
    ids.extend((repeated..objects).map(|r| r as u64));
    ids.truncate(requests);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x7A52);
    for i in (1..ids.len()).rev() {
        let j = rng.random_range(0..=i);
        ids.swap(i, j);
    }
    let ttl_of = |key: u64| -> u32 {
        let u = unit(mix64(key ^ 0x77));
        if u < 0.07 / 0.99 {
            12 * 3600
        } else if u < 0.72 / 0.99 {
            24 * 3600
        } else {
            14 * 24 * 3600
        }
    };
    let mut written: HashMap<u64, u32, KeyHash> = HashMap::default();
    let reqs = ids
        .into_iter()
        .enumerate()
        .map(|(i, rank)| {
            let key = rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8;
            let time = EPOCH + (i as f64 / QPS) as u32;
            let set = rng.random_bool(SET_SHARE);
            let expires_at = if set {
                let e = time + ttl_of(key);
                written.insert(key, e);
                e
            } else {
                // Written before the trace began, at its start at the latest.
                *written.get(&key).unwrap_or(&(EPOCH + ttl_of(key)))
            };
            Req {
                key,
                time,
                expires_at,
                value_len: lognormal_of(key, 273f64.ln() - 0.5, 1.0, 65_536),
                key_len: 16 + (mix64(key ^ 0x5EED) % 9) as u8,
                set,
            }
        })
        .collect();
    Trace {
        name: "twitter-c52".to_string(),
        about: format!(
            "twitter/cache-trace stat/2020Mar.md cluster52: {objects} objects, {singles} requested once, alpha {ALPHA}, A={hi:.0}"
        ),
        reqs,
    }
}

// ---------------------------------------------------------------- replay

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Outcome {
    pub(crate) budget: u64,
    pub(crate) gets_all: u64,
    pub(crate) misses_all: u64,
    pub(crate) gets: u64,
    pub(crate) misses: u64,
    pub(crate) meta_bytes: u64,
    pub(crate) evicted_capacity: u64,
    pub(crate) evicted_expired: u64,
    pub(crate) expired_on_get: u64,
}

impl Outcome {
    fn miss_ratio(&self) -> f64 {
        self.misses as f64 / self.gets.max(1) as f64
    }
}

pub(crate) fn replay(reqs: &[Req], warm: usize, policy: &mut dyn Policy, budget: u64) -> Outcome {
    let mut out = Outcome {
        budget,
        ..Outcome::default()
    };
    for (n, r) in reqs.iter().enumerate() {
        if r.set {
            policy.set(r);
            continue;
        }
        let hit = policy.get(r);
        out.gets_all += 1;
        out.misses_all += u64::from(!hit);
        if n >= warm {
            out.gets += 1;
            out.misses += u64::from(!hit);
        }
    }
    let c = policy.counters();
    out.meta_bytes = c.meta_bytes;
    out.evicted_capacity = c.evicted_capacity;
    out.evicted_expired = c.evicted_expired;
    out.expired_on_get = c.expired_on_get;
    out
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Bytes charged now: entries and metadata.
    charged: u64,
    /// Of which metadata (ghosts, sketch).
    meta_bytes: u64,
    /// Live entries evicted for room.
    evicted_capacity: u64,
    /// Expired entries dropped by the policy (tail or sweep).
    evicted_expired: u64,
    /// Expired entries found by a get (and dropped).
    expired_on_get: u64,
}

/// A cache under test.
pub(crate) trait Policy: Send {
    /// A get at `r.time`: true on a hit; on a miss the entry is filled as
    /// the store holds it.
    fn get(&mut self, r: &Req) -> bool;
    /// A write: the entry replaced by this version.
    fn set(&mut self, r: &Req);
    fn counters(&self) -> Counters;
}

/// How a policy treats expired entries (see the file's header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reclaim {
    None,
    Tail,
    /// Tail, and a sweep of this many slab slots before evicting for room.
    Sweep(u32),
}

impl Reclaim {
    fn parse(s: &str) -> Result<Reclaim, String> {
        match s {
            "none" => Ok(Reclaim::None),
            "tail" => Ok(Reclaim::Tail),
            _ => s
                .strip_prefix("sweep")
                .and_then(|k| k.parse().ok())
                .map(Reclaim::Sweep)
                .ok_or_else(|| format!("unknown reclamation {s} (none, tail, sweepK)")),
        }
    }

    fn at_tail(self) -> bool {
        self != Reclaim::None
    }

    fn sweep(self) -> u32 {
        match self {
            Reclaim::Sweep(k) => k,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// The product's ItemCache.
    Product,
    Lru,
    Sieve,
    /// S3-FIFO and the CLOCKs (S3-FIFO without small queue or ghosts).
    S3(S3Params),
    /// W-TinyLFU with this share of the budget as its window.
    WTinyLfu(f64),
}

pub(crate) struct PolicySpec {
    kind: Kind,
    shards: usize,
    reclaim: Reclaim,
}

impl PolicySpec {
    /// NAME[/SHARDS][@RECLAIM]. NAME: exact-lru, dynacache, lru, sieve,
    /// clock (1-bit), clock-2bit, w-tinylfu[-wPCT], or s3-fifo followed by
    /// any of -sPCT (small queue share, default 10), -tN (hits in small to
    /// move to main, default 1), -cN (frequency cap, default 3), -gPCT
    /// (ghosts as a share of main's entries, default 100), -ng (no ghosts).
    pub(crate) fn parse(spec: &str, default_reclaim: &str) -> Result<PolicySpec, String> {
        let (rest, reclaim) = match spec.split_once('@') {
            Some((r, rec)) => (r, rec),
            None => (spec, default_reclaim),
        };
        let (name, shards) = match rest.split_once('/') {
            Some((n, s)) => (
                n,
                s.parse::<usize>()
                    .map_err(|_| format!("bad shard count in {spec}"))?,
            ),
            None => (rest, 1),
        };
        let bad = || format!("unknown policy {spec}");
        let kind = match name {
            "exact-lru" if shards == 1 && !spec.contains('@') => Kind::Lru,
            "dynacache" => Kind::Product,
            "lru" => Kind::Lru,
            "sieve" => Kind::Sieve,
            "clock" => Kind::S3(S3Params {
                cap: 1,
                ..S3Params::clock()
            }),
            "clock-2bit" => Kind::S3(S3Params::clock()),
            _ if name.starts_with("w-tinylfu") => {
                let mut window = 0.01;
                for opt in name["w-tinylfu".len()..]
                    .split('-')
                    .filter(|o| !o.is_empty())
                {
                    if opt == "hc" {
                        window = f64::NAN;
                        continue;
                    }
                    let pct = opt.strip_prefix('w').and_then(|v| v.parse::<f64>().ok());
                    window = pct.ok_or_else(bad)? / 100.0;
                }
                Kind::WTinyLfu(window)
            }
            _ if name.starts_with("s3-fifo") => {
                let mut p = S3Params::paper();
                for opt in name["s3-fifo".len()..].split('-').filter(|o| !o.is_empty()) {
                    let (letter, value) = opt.split_at(1);
                    let n = value.parse::<u64>().ok();
                    match (letter, n) {
                        ("s", Some(v)) => p.small_share = v as f64 / 100.0,
                        ("t", Some(v @ 1..=3)) => p.threshold = v as u8,
                        ("c", Some(v @ 1..=3)) => p.cap = v as u8,
                        ("g", Some(v)) => p.ghost_pct = v,
                        ("n", None) if value == "g" => p.ghost_pct = 0,
                        ("h", None) if value == "c" => p.adaptive = true,
                        ("w", None) if value == "m" => p.writes_to_main = true,
                        _ => return Err(bad()),
                    }
                }
                Kind::S3(p)
            }
            _ => return Err(bad()),
        };
        let reclaim = if name == "exact-lru" {
            Reclaim::None
        } else {
            Reclaim::parse(reclaim)?
        };
        if kind == Kind::Product && spec.contains('@') {
            return Err(format!(
                "{spec}: the product's cache reclaims as it does (tail and sweep2)"
            ));
        }
        Ok(PolicySpec {
            kind,
            shards: shards.max(1),
            reclaim,
        })
    }

    /// A cache of `budget` bytes; `mean_charge` sizes W-TinyLFU's sketch.
    pub(crate) fn build(&self, budget: u64, mean_charge: u64) -> Box<dyn Policy> {
        self.build_salted(budget, mean_charge, 0x5AAD)
    }

    /// [`PolicySpec::build`], keys spread over shards by a hash salted with
    /// `salt` (another salt, another draw of which keys share a shard).
    pub(crate) fn build_salted(&self, budget: u64, mean_charge: u64, salt: u64) -> Box<dyn Policy> {
        self.build_routed(budget, mean_charge, Route::Salted(salt))
    }

    /// [`PolicySpec::build`], key ids sent to shards by `route` (which must
    /// answer below the shard count): to predict a cache whose shard of
    /// each key is known.
    pub(crate) fn build_routed(
        &self,
        budget: u64,
        mean_charge: u64,
        route: Route,
    ) -> Box<dyn Policy> {
        if self.kind == Kind::Product {
            return Box::new(Product::new(budget, self.shards));
        }
        if self.shards == 1 {
            return self.build_one(budget, mean_charge);
        }
        let per = budget / self.shards as u64;
        Box::new(Sharded {
            shards: (0..self.shards)
                .map(|_| self.build_one(per, mean_charge))
                .collect(),
            route,
        })
    }

    fn build_one(&self, budget: u64, mean_charge: u64) -> Box<dyn Policy> {
        let r = self.reclaim;
        match self.kind {
            Kind::Product => unreachable!("built above"),
            Kind::Lru => Box::new(Cached(Lru::new(budget, r))),
            Kind::Sieve => Box::new(Cached(Sieve::new(budget, r))),
            Kind::S3(p) => Box::new(Cached(S3Fifo::new(budget, p, r))),
            Kind::WTinyLfu(window) => {
                let entries = budget / mean_charge.max(1);
                Box::new(Cached(WTinyLfu::new(budget, entries, window, true, r)))
            }
        }
    }
}

/// The product's cache, fed real keys and values.
struct Product {
    cache: ItemCache,
    value: Vec<u8>,
}

impl Product {
    fn new(budget: u64, shards: usize) -> Product {
        Product {
            cache: ItemCache::new(budget, shards),
            value: vec![b'v'; 65_536],
        }
    }

    fn entry(&self, r: &Req) -> Entry {
        let key = key_bytes(r.key, r.key_len);
        Entry::new(
            &key[..usize::from(r.key_len)],
            &self.value[..r.value_len as usize],
            0,
            r.expires_at,
            1,
        )
    }
}

impl Policy for Product {
    fn get(&mut self, r: &Req) -> bool {
        let key = key_bytes(r.key, r.key_len);
        if self
            .cache
            .lookup(&key[..usize::from(r.key_len)], r.time, |_| ())
            .is_ok()
        {
            return true;
        }
        self.cache.insert_at(self.entry(r), Fill::Read, r.time);
        false
    }

    fn set(&mut self, r: &Req) {
        self.cache.insert_at(self.entry(r), Fill::Write, r.time);
    }

    fn counters(&self) -> Counters {
        // Ghosts are charged in `bytes`; the stats do not tell them apart.
        let s = self.cache.stats();
        Counters {
            charged: s.bytes,
            meta_bytes: 0,
            evicted_capacity: s.evictions,
            evicted_expired: s.evictions_expired,
            expired_on_get: s.expirations - s.evictions_expired,
        }
    }
}

/// N independent caches, keys spread by hash.
struct Sharded {
    shards: Vec<Box<dyn Policy>>,
    route: Route,
}

/// Which shard of a [`Sharded`] cache holds a key id.
#[derive(Clone)]
pub(crate) enum Route {
    /// By a hash of the id salted with this.
    Salted(u64),
    /// As this says.
    Given(Arc<dyn Fn(u64) -> usize + Send + Sync>),
}

impl Sharded {
    fn shard(&mut self, key: u64) -> &mut dyn Policy {
        let n = self.shards.len() as u64;
        let i = match &self.route {
            Route::Salted(salt) => ((mix64(key ^ salt) >> 32) % n) as usize,
            Route::Given(route) => route(key),
        };
        self.shards[i].as_mut()
    }
}

impl Policy for Sharded {
    fn get(&mut self, r: &Req) -> bool {
        self.shard(r.key).get(r)
    }

    fn set(&mut self, r: &Req) {
        self.shard(r.key).set(r)
    }

    fn counters(&self) -> Counters {
        self.shards
            .iter()
            .map(|s| s.counters())
            .fold(Counters::default(), |a, b| Counters {
                charged: a.charged + b.charged,
                meta_bytes: a.meta_bytes + b.meta_bytes,
                evicted_capacity: a.evicted_capacity + b.evicted_capacity,
                evicted_expired: a.evicted_expired + b.evicted_expired,
                expired_on_get: a.expired_on_get + b.expired_on_get,
            })
    }
}

// ---------------------------------------------------------------- the arena

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = mix64(n);
    }
}

type KeyHash = BuildHasherDefault<KeyHasher>;

const NIL: u32 = u32::MAX;
/// The queue of a node that is in none (free, or between queues).
const NO_QUEUE: u8 = u8::MAX;

/// A simulated entry: what the product's slot would hold for the policy.
#[derive(Debug, Clone, Copy)]
struct Node {
    key: u64,
    /// Towards the newest end of its queue.
    newer: u32,
    /// Towards the oldest end.
    older: u32,
    charge: u32,
    expires_at: u32,
    queue: u8,
    /// SIEVE's visited bit; S3-FIFO's and CLOCK's frequency (0..=3).
    bits: u8,
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    newest: u32,
    oldest: u32,
    bytes: u64,
    len: u64,
}

const EMPTY: Queue = Queue {
    newest: NIL,
    oldest: NIL,
    bytes: 0,
    len: 0,
};

/// Entries in a slab (indices are stable), up to three FIFO/LRU queues
/// linked through them, and the byte count of the resident ones.
struct Arena {
    nodes: Vec<Node>,
    free: Vec<u32>,
    index: HashMap<u64, u32, KeyHash>,
    queues: [Queue; 3],
    bytes: u64,
    /// The sweep's next slab slot.
    cursor: u32,
    counters: Counters,
}

impl Arena {
    fn new() -> Arena {
        Arena {
            nodes: Vec::new(),
            free: Vec::new(),
            index: HashMap::default(),
            queues: [EMPTY; 3],
            bytes: 0,
            cursor: 0,
            counters: Counters::default(),
        }
    }

    fn find(&self, key: u64) -> Option<u32> {
        self.index.get(&key).copied()
    }

    fn node(&self, idx: u32) -> &Node {
        &self.nodes[idx as usize]
    }

    fn node_mut(&mut self, idx: u32) -> &mut Node {
        &mut self.nodes[idx as usize]
    }

    fn expired(&self, idx: u32, now: u32) -> bool {
        let e = self.node(idx).expires_at;
        e != 0 && e <= now
    }

    fn oldest(&self, q: u8) -> u32 {
        self.queues[q as usize].oldest
    }

    fn len(&self, q: u8) -> u64 {
        self.queues[q as usize].len
    }

    fn queue_bytes(&self, q: u8) -> u64 {
        self.queues[q as usize].bytes
    }

    /// A new resident entry at the newest end of `q`.
    fn insert(&mut self, r: &Req, q: u8, bits: u8) -> u32 {
        let node = Node {
            key: r.key,
            newer: NIL,
            older: NIL,
            charge: r.charge() as u32,
            expires_at: r.expires_at,
            queue: NO_QUEUE,
            bits,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.bytes += r.charge();
        self.index.insert(r.key, idx);
        self.push(idx, q);
        idx
    }

    /// Links `idx` (in no queue) at the newest end of `q`.
    fn push(&mut self, idx: u32, q: u8) {
        let charge = u64::from(self.node(idx).charge);
        let queue = &mut self.queues[q as usize];
        let old_newest = queue.newest;
        queue.newest = idx;
        if queue.oldest == NIL {
            queue.oldest = idx;
        }
        queue.bytes += charge;
        queue.len += 1;
        if old_newest != NIL {
            self.node_mut(old_newest).newer = idx;
        }
        let n = self.node_mut(idx);
        n.queue = q;
        n.newer = NIL;
        n.older = old_newest;
    }

    /// Unlinks `idx` from its queue (it stays resident).
    fn unlink(&mut self, idx: u32) {
        let Node {
            newer,
            older,
            queue: q,
            charge,
            ..
        } = *self.node(idx);
        if q == NO_QUEUE {
            return;
        }
        match newer {
            NIL => self.queues[q as usize].newest = older,
            n => self.node_mut(n).older = older,
        }
        match older {
            NIL => self.queues[q as usize].oldest = newer,
            o => self.node_mut(o).newer = newer,
        }
        let queue = &mut self.queues[q as usize];
        queue.bytes -= u64::from(charge);
        queue.len -= 1;
        self.node_mut(idx).queue = NO_QUEUE;
    }

    /// Moves `idx` to the newest end of `q`.
    fn requeue(&mut self, idx: u32, q: u8) {
        self.unlink(idx);
        self.push(idx, q);
    }

    /// Drops `idx` from the cache.
    fn remove(&mut self, idx: u32) {
        self.unlink(idx);
        let key = self.node(idx).key;
        self.index.remove(&key);
        self.bytes -= u64::from(self.node(idx).charge);
        self.node_mut(idx).key = u64::MAX;
        self.free.push(idx);
    }

    /// The expired entries among the next `k` slab slots.
    fn sweep(&mut self, k: u32, now: u32) -> ([u32; 16], usize) {
        let mut found = ([NIL; 16], 0);
        let len = self.nodes.len() as u32;
        if len == 0 {
            return found;
        }
        for _ in 0..k.min(16) {
            self.cursor = if self.cursor + 1 >= len {
                0
            } else {
                self.cursor + 1
            };
            let idx = self.cursor;
            if self.node(idx).key != u64::MAX && self.expired(idx, now) {
                found.0[found.1] = idx;
                found.1 += 1;
            }
        }
        found
    }
}

/// What a simulated policy does on top of the arena; [`Cached`] turns it
/// into a [`Policy`] with the gets and sets every policy shares.
trait Evictor {
    fn arena(&mut self) -> &mut Arena;
    fn arena_ref(&self) -> &Arena;
    fn budget(&self) -> u64;
    /// Metadata charged besides the entries.
    fn meta_bytes(&self) -> u64 {
        0
    }
    fn reclaim(&self) -> Reclaim;
    /// A get found `idx` live.
    fn hit(&mut self, idx: u32);
    /// Every get's outcome (for policies that adapt).
    fn observe(&mut self, _hit: bool) {}
    /// Drops `idx`, fixing the policy's own pointers.
    fn drop_entry(&mut self, idx: u32) {
        self.arena().remove(idx);
    }
    /// Stores `r` (not resident). `prior`: the queue and bits of the version
    /// a set replaces (just removed), None for a fill or a new key.
    fn admit(&mut self, r: &Req, prior: Option<(u8, u8)>);

    /// Whether an entry of `charge` bytes may be stored at all.
    fn admits(&self, charge: u64) -> bool {
        charge + self.meta_bytes() <= self.budget()
    }

    /// Before evicting live entries for `need` more bytes: the sweep.
    fn sweep_for(&mut self, need: u64, now: u32) {
        let k = self.reclaim().sweep();
        if k == 0 || self.over(need) == 0 {
            return;
        }
        let (found, n) = self.arena().sweep(k, now);
        for &idx in &found[..n] {
            self.drop_entry(idx);
            self.arena().counters.evicted_expired += 1;
        }
    }

    /// Bytes over budget if `need` more were charged.
    fn over(&self, need: u64) -> u64 {
        (self.arena_ref().bytes + self.meta_bytes() + need).saturating_sub(self.budget())
    }
}

struct Cached<E>(E);

impl<E: Evictor + Send> Policy for Cached<E> {
    fn get(&mut self, r: &Req) -> bool {
        let e = &mut self.0;
        if let Some(idx) = e.arena_ref().find(r.key) {
            if !e.arena_ref().expired(idx, r.time) {
                e.hit(idx);
                e.observe(true);
                return true;
            }
            e.drop_entry(idx);
            e.arena().counters.expired_on_get += 1;
        }
        e.observe(false);
        if e.admits(r.charge()) {
            e.admit(r, None);
        }
        false
    }

    fn set(&mut self, r: &Req) {
        let e = &mut self.0;
        let mut prior = None;
        if let Some(idx) = e.arena_ref().find(r.key) {
            let n = *e.arena_ref().node(idx);
            if !e.arena_ref().expired(idx, r.time) {
                prior = Some((n.queue, n.bits));
            }
            e.drop_entry(idx);
        }
        if e.admits(r.charge()) {
            e.admit(r, prior);
        }
    }

    fn counters(&self) -> Counters {
        let a = self.0.arena_ref();
        Counters {
            charged: a.bytes + self.0.meta_bytes(),
            meta_bytes: self.0.meta_bytes(),
            ..a.counters
        }
    }
}

// ---------------------------------------------------------------- LRU

/// Exact LRU, as `ItemCache` (the self-check holds them to the same
/// answers); with `@sweepK`, to see what reclamation would do for it.
struct Lru {
    arena: Arena,
    budget: u64,
    reclaim: Reclaim,
}

impl Lru {
    fn new(budget: u64, reclaim: Reclaim) -> Lru {
        Lru {
            arena: Arena::new(),
            budget,
            reclaim,
        }
    }
}

impl Evictor for Lru {
    fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }
    fn arena_ref(&self) -> &Arena {
        &self.arena
    }
    fn budget(&self) -> u64 {
        self.budget
    }
    fn reclaim(&self) -> Reclaim {
        self.reclaim
    }

    fn hit(&mut self, idx: u32) {
        self.arena.requeue(idx, 0);
    }

    fn admit(&mut self, r: &Req, _prior: Option<(u8, u8)>) {
        self.sweep_for(r.charge(), r.time);
        while self.over(r.charge()) > 0 && self.arena.oldest(0) != NIL {
            let victim = self.arena.oldest(0);
            let expired = self.arena.expired(victim, r.time);
            self.arena.remove(victim);
            if expired && self.reclaim.at_tail() {
                self.arena.counters.evicted_expired += 1;
            } else {
                self.arena.counters.evicted_capacity += 1;
            }
        }
        self.arena.insert(r, 0, 0);
    }
}

// ---------------------------------------------------------------- SIEVE

/// SIEVE (Zhang et al., NSDI '24): one FIFO queue and a visited bit; a hit
/// sets the bit; the hand walks from the oldest end towards the newest
/// (wrapping), clearing set bits, and evicts the first entry whose bit is
/// clear; it stays where it stopped. New entries enter at the newest end.
/// Per entry: 1 bit (fits in the slot). Per cache: the hand (4 bytes).
struct Sieve {
    arena: Arena,
    budget: u64,
    hand: u32,
    reclaim: Reclaim,
}

impl Sieve {
    fn new(budget: u64, reclaim: Reclaim) -> Sieve {
        Sieve {
            arena: Arena::new(),
            budget,
            hand: NIL,
            reclaim,
        }
    }

    fn evict(&mut self, now: u32) {
        let a = &mut self.arena;
        let mut idx = if self.hand == NIL {
            a.oldest(0)
        } else {
            self.hand
        };
        loop {
            let n = *a.node(idx);
            debug_assert!(n.queue == 0 && n.key != u64::MAX, "hand on a free slot");
            if self.reclaim.at_tail() && a.expired(idx, now) {
                a.counters.evicted_expired += 1;
                break;
            }
            if n.bits == 0 {
                a.counters.evicted_capacity += 1;
                break;
            }
            a.node_mut(idx).bits = 0;
            idx = if n.newer == NIL { a.oldest(0) } else { n.newer };
        }
        self.hand = a.node(idx).newer;
        a.remove(idx);
    }
}

impl Evictor for Sieve {
    fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }
    fn arena_ref(&self) -> &Arena {
        &self.arena
    }
    fn budget(&self) -> u64 {
        self.budget
    }
    fn reclaim(&self) -> Reclaim {
        self.reclaim
    }

    fn hit(&mut self, idx: u32) {
        self.arena.node_mut(idx).bits = 1;
    }

    fn drop_entry(&mut self, idx: u32) {
        if self.hand == idx {
            self.hand = self.arena.node(idx).newer;
        }
        self.arena.remove(idx);
    }

    fn admit(&mut self, r: &Req, prior: Option<(u8, u8)>) {
        self.sweep_for(r.charge(), r.time);
        while self.over(r.charge()) > 0 && self.arena.oldest(0) != NIL {
            self.evict(r.time);
        }
        // A write is an access: the new version keeps the key visited.
        self.arena.insert(r, 0, u8::from(prior.is_some()));
    }
}

// ---------------------------------------------------------------- hill climbing

/// Hill climbing of one share (S3-FIFO's small queue, W-TinyLFU's window),
/// as Caffeine adapts its window: every sample of gets (10 per resident
/// entry), compare the hit ratio with the previous sample's; keep moving the
/// share the same way if it did not drop, else turn back; the step starts
/// at 6.25% and decays by 2% a sample, back to 6.25% when the hit ratio
/// moves by 5 points or more. State: a few counters per cache (per shard).
#[derive(Debug, Clone, Copy)]
struct Climber {
    share: f64,
    lo: f64,
    hi: f64,
    step: f64,
    previous: f64,
    hits: u64,
    gets: u64,
}

impl Climber {
    const STEP: f64 = 0.0625;

    fn new(share: f64, lo: f64, hi: f64) -> Climber {
        Climber {
            share,
            lo,
            hi,
            step: Climber::STEP,
            previous: f64::NAN,
            hits: 0,
            gets: 0,
        }
    }

    /// Counts a get; true when the share moved (a sample ended).
    fn record(&mut self, hit: bool, entries: u64) -> bool {
        self.gets += 1;
        self.hits += u64::from(hit);
        if self.gets < (10 * entries).max(1000) {
            return false;
        }
        let rate = self.hits as f64 / self.gets as f64;
        if !self.previous.is_nan() {
            let change = rate - self.previous;
            let amount = if change >= 0.0 { self.step } else { -self.step };
            self.step = if change.abs() >= 0.05 {
                Climber::STEP.copysign(amount)
            } else {
                0.98 * amount
            };
            self.share = (self.share + amount).clamp(self.lo, self.hi);
        }
        self.previous = rate;
        self.hits = 0;
        self.gets = 0;
        true
    }
}

// ---------------------------------------------------------------- S3-FIFO

const SMALL: u8 = 0;
const MAIN: u8 = 1;

/// Bytes charged per ghost ring slot: the key's 64-bit hash.
const GHOST_SLOT_BYTES: u64 = 8;
/// Bytes charged per live ghost: a 4-byte ring position in a hash table,
/// with its control byte, at hashbrown's lowest load (as `ENTRY_OVERHEAD`).
const GHOST_INDEX_BYTES: u64 = 12;

#[derive(Debug, Clone, Copy, PartialEq)]
struct S3Params {
    /// Share of the budget for the small queue (0: no small queue, all
    /// entries enter main: CLOCK).
    small_share: f64,
    /// Hits in small needed to move to main when leaving it.
    threshold: u8,
    /// Frequency cap (2 bits: 3; 1 bit: 1).
    cap: u8,
    /// Live ghosts kept, as a share (%) of main's entries; 0: no ghosts.
    ghost_pct: u64,
    /// Whether ghosts are charged (off only in hand-checked tests).
    charge_ghosts: bool,
    /// Small queue share adapted by hill climbing (within 1-90%).
    adaptive: bool,
    /// A set of a key not cached enters main, not small (the application
    /// wrote it: not a one-hit wonder read through the cache).
    writes_to_main: bool,
}

impl S3Params {
    /// As the paper: small 10%, ghosts as many as main's entries, moved
    /// to main if hit once in small, frequency capped at 3.
    fn paper() -> S3Params {
        S3Params {
            small_share: 0.1,
            threshold: 1,
            cap: 3,
            ghost_pct: 100,
            charge_ghosts: true,
            adaptive: false,
            writes_to_main: false,
        }
    }

    /// One FIFO with reinsertion and a 2-bit counter (CLOCK-2bit).
    fn clock() -> S3Params {
        S3Params {
            small_share: 0.0,
            ghost_pct: 0,
            ..S3Params::paper()
        }
    }
}

/// Keys recently evicted from small, without their values: a FIFO ring of
/// key hashes and a table from key to its ring slot. A ghost hit removes
/// the key from the table; its ring slot stays (a tombstone) until the ring
/// moves past it.
#[derive(Default)]
struct Ghost {
    ring: VecDeque<(u64, u64)>,
    live: HashMap<u64, u64, KeyHash>,
    seq: u64,
}

impl Ghost {
    fn push(&mut self, key: u64) {
        self.seq += 1;
        self.ring.push_back((key, self.seq));
        self.live.insert(key, self.seq);
    }

    /// Whether `key` was a ghost (it is not any more).
    fn take(&mut self, key: u64) -> bool {
        self.live.remove(&key).is_some()
    }

    /// Keeps the ring, tombstones included, to at most `limit` slots,
    /// dropping the oldest ghosts (as `ItemCache` does).
    fn trim(&mut self, limit: u64) {
        while let Some(&(key, seq)) = self.ring.front() {
            let is_live = self.live.get(&key) == Some(&seq);
            // The ring's slots, tombstones included, are what is capped.
            if is_live && self.ring.len() as u64 <= limit {
                break;
            }
            self.ring.pop_front();
            if is_live {
                self.live.remove(&key);
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.ring.len() as u64 * GHOST_SLOT_BYTES + self.live.len() as u64 * GHOST_INDEX_BYTES
    }
}

/// S3-FIFO (Yang et al., SOSP '23): new keys enter a small FIFO (10% of the
/// budget); leaving it, an entry hit there moves to the main FIFO, the
/// others go and their keys enter the ghost FIFO (as many ghosts as main
/// has entries); a miss on a ghost key enters main directly. Main reinserts
/// an entry with a non-zero frequency (capped at 3), decrementing it.
/// Evicts from small while small holds at least its share, else from main.
/// Per entry: 2 bits of frequency and 1 of queue (fit in the slot); ghosts
/// charged as [`GHOST_SLOT_BYTES`] + [`GHOST_INDEX_BYTES`].
struct S3Fifo {
    arena: Arena,
    budget: u64,
    small_target: u64,
    params: S3Params,
    climber: Option<Climber>,
    ghost: Ghost,
    reclaim: Reclaim,
}

impl S3Fifo {
    fn new(budget: u64, params: S3Params, reclaim: Reclaim) -> S3Fifo {
        S3Fifo {
            arena: Arena::new(),
            budget,
            small_target: (budget as f64 * params.small_share) as u64,
            params,
            climber: params
                .adaptive
                .then(|| Climber::new(params.small_share, 0.01, 0.9)),
            ghost: Ghost::default(),
            reclaim,
        }
    }

    fn ghost_limit(&self) -> u64 {
        self.arena.len(MAIN) * self.params.ghost_pct / 100
    }

    fn remove_counted(&mut self, idx: u32, now: u32) -> bool {
        let expired = self.arena.expired(idx, now);
        self.arena.remove(idx);
        if expired && self.reclaim.at_tail() {
            self.arena.counters.evicted_expired += 1;
        } else {
            self.arena.counters.evicted_capacity += 1;
        }
        expired
    }

    fn evict(&mut self, now: u32) {
        let small_full = self.arena.queue_bytes(SMALL) >= self.small_target;
        if self.arena.len(SMALL) > 0 && (small_full || self.arena.len(MAIN) == 0) {
            self.evict_small(now);
        } else {
            self.evict_main(now);
        }
    }

    fn evict_small(&mut self, now: u32) {
        loop {
            let t = self.arena.oldest(SMALL);
            if t == NIL {
                return self.evict_main(now);
            }
            let tail_expired = self.reclaim.at_tail() && self.arena.expired(t, now);
            if !tail_expired && self.arena.node(t).bits >= self.params.threshold {
                self.arena.node_mut(t).bits = 0;
                self.arena.requeue(t, MAIN);
                continue;
            }
            let key = self.arena.node(t).key;
            let expired = self.remove_counted(t, now);
            if self.params.ghost_pct > 0 && !expired {
                self.ghost.push(key);
                self.ghost.trim(self.ghost_limit());
            }
            return;
        }
    }

    fn evict_main(&mut self, now: u32) {
        loop {
            let t = self.arena.oldest(MAIN);
            if t == NIL {
                return self.evict_small(now);
            }
            let tail_expired = self.reclaim.at_tail() && self.arena.expired(t, now);
            let f = self.arena.node(t).bits;
            if !tail_expired && f > 0 {
                self.arena.node_mut(t).bits = f - 1;
                self.arena.requeue(t, MAIN);
                continue;
            }
            self.remove_counted(t, now);
            self.ghost.trim(self.ghost_limit());
            return;
        }
    }
}

impl Evictor for S3Fifo {
    fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }
    fn arena_ref(&self) -> &Arena {
        &self.arena
    }
    fn budget(&self) -> u64 {
        self.budget
    }
    fn reclaim(&self) -> Reclaim {
        self.reclaim
    }
    /// As the product: an entry that fits the budget alone is stored, the
    /// ghosts making way (see `admit`).
    fn admits(&self, charge: u64) -> bool {
        charge <= self.budget
    }

    fn meta_bytes(&self) -> u64 {
        if self.params.charge_ghosts {
            self.ghost.bytes()
        } else {
            0
        }
    }

    fn hit(&mut self, idx: u32) {
        let n = self.arena.node_mut(idx);
        n.bits = (n.bits + 1).min(self.params.cap);
    }

    fn observe(&mut self, hit: bool) {
        let entries = self.arena.index.len() as u64;
        if let Some(c) = &mut self.climber
            && c.record(hit, entries)
        {
            self.small_target = (self.budget as f64 * c.share) as u64;
        }
    }

    fn admit(&mut self, r: &Req, prior: Option<(u8, u8)>) {
        let ghost_hit = self.params.ghost_pct > 0 && self.ghost.take(r.key);
        let to_main = ghost_hit || self.params.small_share == 0.0;
        let (queue, bits) = match prior {
            // A write is an access; the new version stays in its queue.
            Some((q, b)) => (q, (b + 1).min(self.params.cap)),
            None if to_main || (r.set && self.params.writes_to_main) => (MAIN, 0),
            None => (SMALL, 0),
        };
        self.sweep_for(r.charge(), r.time);
        while self.over(r.charge()) > 0 && !self.arena.index.is_empty() {
            self.evict(r.time);
        }
        if self.over(r.charge()) > 0 {
            // Only ghosts' tombstones left over: start the ring afresh.
            self.ghost = Ghost::default();
        }
        self.arena.insert(r, queue, bits);
    }
}

// ---------------------------------------------------------------- W-TinyLFU

const WINDOW: u8 = 0;
const PROBATION: u8 = 1;
const PROTECTED: u8 = 2;

/// A count-min sketch of 4-bit counters as Caffeine's `FrequencySketch`:
/// a power-of-two array of 64-bit words (16 counters each), at least one
/// word per expected entry; a key increments one counter in each of 4
/// words (those below 15); after 10 increments per expected entry, every
/// counter is halved (aging). Estimates are the minimum of the 4.
struct Sketch {
    table: Vec<u64>,
    additions: u64,
    sample: u64,
}

impl Sketch {
    fn new(entries: u64) -> Sketch {
        let entries = entries.max(16);
        Sketch {
            table: vec![0; entries.next_power_of_two() as usize],
            additions: 0,
            sample: 10 * entries,
        }
    }

    fn bytes(&self) -> u64 {
        8 * self.table.len() as u64
    }

    fn slots(&self, key: u64) -> [(usize, u32); 4] {
        let mask = self.table.len() as u64 - 1;
        let h = mix64(key ^ 0xC0FF_EE00);
        std::array::from_fn(|i| {
            let hi = mix64(h.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            ((hi & mask) as usize, ((hi >> 60) as u32) * 4)
        })
    }

    fn increment(&mut self, key: u64) {
        let mut added = false;
        for (w, shift) in self.slots(key) {
            if (self.table[w] >> shift) & 15 < 15 {
                self.table[w] += 1 << shift;
                added = true;
            }
        }
        if added {
            self.additions += 1;
            if self.additions >= self.sample {
                let mut odd = 0;
                for w in &mut self.table {
                    odd += u64::from((*w & 0x1111_1111_1111_1111).count_ones());
                    *w = (*w >> 1) & 0x7777_7777_7777_7777;
                }
                self.additions = (self.additions - odd / 4) / 2;
            }
        }
    }

    fn estimate(&self, key: u64) -> u64 {
        self.slots(key)
            .into_iter()
            .map(|(w, shift)| (self.table[w] >> shift) & 15)
            .min()
            .unwrap_or(0)
    }
}

/// W-TinyLFU (Einziger, Friedman, Manes, "TinyLFU: a highly efficient cache
/// admission policy", 2017; as Caffeine, without its adaptive window): an
/// LRU window (1% of the budget) that new entries enter, and a segmented
/// LRU main (probation 20%, protected 80%). An entry leaving the window
/// contests the probation queue's LRU victim: it is admitted if the sketch
/// counts it more often (or, at 6 and more, by a 1-in-128 chance, as
/// Caffeine guards against hash flooding), else it goes. A hit in
/// probation moves the entry to protected, whose overflow goes back to
/// probation. Every get and set counts in the sketch. Per entry: 2 bits of
/// queue (fit in the slot); the sketch is charged (see [`Sketch`]).
struct WTinyLfu {
    arena: Arena,
    budget: u64,
    window_target: u64,
    protected_target: u64,
    /// The bytes for entries (the budget less the sketch).
    data: u64,
    climber: Option<Climber>,
    sketch: Sketch,
    charge_sketch: bool,
    rng: u64,
    reclaim: Reclaim,
}

impl WTinyLfu {
    /// `window`: its share of the budget; NaN: adapted by hill climbing
    /// (from 1%, within 0-100%).
    fn new(
        budget: u64,
        entries: u64,
        window: f64,
        charge_sketch: bool,
        reclaim: Reclaim,
    ) -> WTinyLfu {
        let climber = window.is_nan().then(|| Climber::new(0.01, 0.0, 1.0));
        let window = if window.is_nan() { 0.01 } else { window };
        let sketch = Sketch::new(entries);
        let data = if charge_sketch {
            budget.saturating_sub(sketch.bytes())
        } else {
            budget
        };
        let window_target = (data as f64 * window) as u64;
        WTinyLfu {
            arena: Arena::new(),
            budget,
            window_target,
            protected_target: (data - window_target) * 8 / 10,
            data,
            climber,
            sketch,
            charge_sketch,
            rng: 0x2545_F491_4F6C_DD1D,
            reclaim,
        }
    }

    fn admit_over(&mut self, candidate: u64, victim: u64) -> bool {
        let c = self.sketch.estimate(candidate);
        if c > self.sketch.estimate(victim) {
            return true;
        }
        if c < 6 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng & 127 == 0
    }

    fn remove_counted(&mut self, idx: u32, now: u32) {
        let expired = self.arena.expired(idx, now);
        self.arena.remove(idx);
        if expired && self.reclaim.at_tail() {
            self.arena.counters.evicted_expired += 1;
        } else {
            self.arena.counters.evicted_capacity += 1;
        }
    }

    fn trim_protected(&mut self) {
        while self.arena.queue_bytes(PROTECTED) > self.protected_target {
            let t = self.arena.oldest(PROTECTED);
            self.arena.requeue(t, PROBATION);
        }
    }

    /// The window's oldest entry leaves it: into probation if there is room,
    /// else against victims from main's oldest ends until one of them loses.
    fn leave_window(&mut self, now: u32) {
        let cand = self.arena.oldest(WINDOW);
        self.arena.unlink(cand);
        loop {
            if self.over(0) == 0 {
                self.arena.push(cand, PROBATION);
                return;
            }
            let victim = match self.arena.oldest(PROBATION) {
                NIL => self.arena.oldest(PROTECTED),
                v => v,
            };
            let tail = self.reclaim.at_tail();
            if victim == NIL || (tail && self.arena.expired(cand, now)) {
                self.remove_counted(cand, now);
                return;
            }
            if tail && self.arena.expired(victim, now) {
                self.remove_counted(victim, now);
                continue;
            }
            let (ck, vk) = (self.arena.node(cand).key, self.arena.node(victim).key);
            if self.admit_over(ck, vk) {
                self.remove_counted(victim, now);
            } else {
                self.remove_counted(cand, now);
                return;
            }
        }
    }
}

impl Evictor for WTinyLfu {
    fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }
    fn arena_ref(&self) -> &Arena {
        &self.arena
    }
    fn budget(&self) -> u64 {
        self.budget
    }
    fn reclaim(&self) -> Reclaim {
        self.reclaim
    }
    fn meta_bytes(&self) -> u64 {
        if self.charge_sketch {
            self.sketch.bytes()
        } else {
            0
        }
    }

    fn observe(&mut self, hit: bool) {
        let entries = self.arena.index.len() as u64;
        if let Some(c) = &mut self.climber
            && c.record(hit, entries)
        {
            self.window_target = (self.data as f64 * c.share) as u64;
            self.protected_target = (self.data - self.window_target) * 8 / 10;
        }
    }

    fn hit(&mut self, idx: u32) {
        self.sketch.increment(self.arena.node(idx).key);
        match self.arena.node(idx).queue {
            WINDOW => self.arena.requeue(idx, WINDOW),
            _ => {
                self.arena.requeue(idx, PROTECTED);
                self.trim_protected();
            }
        }
    }

    fn admit(&mut self, r: &Req, prior: Option<(u8, u8)>) {
        self.sketch.increment(r.key);
        let queue = match prior {
            Some((WINDOW, _)) | None => WINDOW,
            // A write is an access: as a hit.
            Some(_) => PROTECTED,
        };
        self.sweep_for(r.charge(), r.time);
        self.arena.insert(r, queue, 0);
        self.trim_protected();
        while self.arena.queue_bytes(WINDOW) > self.window_target && self.arena.len(WINDOW) > 0 {
            self.leave_window(r.time);
        }
        while self.over(0) > 0 {
            let victim = [PROBATION, PROTECTED, WINDOW]
                .into_iter()
                .map(|q| self.arena.oldest(q))
                .find(|&v| v != NIL)
                .expect("over budget with entries");
            self.remove_counted(victim, r.time);
        }
    }
}

// ---------------------------------------------------------------- self-check

/// Checks the simulators on tiny traces whose answers are known.
fn self_check() {
    // Uniform entries: 16-byte keys, 32-byte values.
    let c = entry_charge(48) as u64;
    let get = |key: u64| Req {
        key,
        time: EPOCH,
        expires_at: 0,
        value_len: 32,
        key_len: 16,
        set: false,
    };
    let hits = |p: &mut dyn Policy, keys: &[u64]| -> Vec<bool> {
        keys.iter().map(|&k| p.get(&get(k))).collect()
    };
    let bools = |s: &str| -> Vec<bool> { s.chars().map(|c| c == 'h').collect() };

    // A working set that fits: every policy hits on all but the first pass.
    let cycle: Vec<u64> = (0..10).cycle().take(1000).collect();
    for spec in [
        "exact-lru",
        "dynacache",
        "lru",
        "sieve",
        "s3-fifo",
        "clock-2bit",
        "w-tinylfu",
        "s3-fifo/4",
    ] {
        let mut p = PolicySpec::parse(spec, "tail")
            .expect("spec")
            .build(100 * c, c);
        let n = hits(p.as_mut(), &cycle).iter().filter(|h| !**h).count();
        assert_eq!(n, 10, "{spec}: misses on a fitting working set");
    }

    // SIEVE, room for 3: A B C A D B A C. D evicts B (A is visited: its bit
    // is cleared and the hand moves on); B then evicts C (the hand is there);
    // A hits; C evicts D, the hand's next.
    let mut sieve = Cached(Sieve::new(3 * c, Reclaim::Tail));
    assert_eq!(
        hits(&mut sieve, &[1, 2, 3, 1, 4, 2, 1, 3]),
        bools("mmmhmmhm"),
        "sieve"
    );
    let resident = |a: &Arena, k: u64| a.find(k).is_some();
    assert!([1, 2, 3].iter().all(|&k| resident(&sieve.0.arena, k)) && !resident(&sieve.0.arena, 4));

    // S3-FIFO, room for 10 (ghosts not charged), small = 1: fill 1..=10 all in
    // small (1 hit once); 11 makes room: 1 moves to main, 2 becomes a
    // ghost. 2 again: a ghost hit, straight into main (3 leaves small for the
    // ghost queue); 1 hits in main; 3, a ghost again, enters main too.
    let params = S3Params {
        charge_ghosts: false,
        ..S3Params::paper()
    };
    let mut s3 = Cached(S3Fifo::new(10 * c, params, Reclaim::Tail));
    let mut trace = vec![1, 1];
    trace.extend(2..=11);
    trace.extend([2, 1, 3]);
    assert_eq!(hits(&mut s3, &trace), bools("mhmmmmmmmmmmmhm"), "s3-fifo");
    let queue_of = |a: &Arena, k: u64| a.node(a.find(k).expect("resident")).queue;
    for k in [1, 2, 3] {
        assert_eq!(queue_of(&s3.0.arena, k), MAIN, "s3-fifo: {k} in main");
    }
    assert!(!resident(&s3.0.arena, 4) && s3.0.ghost.live.contains_key(&4));
    assert_eq!(s3.0.arena.len(SMALL), 7, "s3-fifo: 5..=11 in small");
    // Main reinserts with frequency - 1: a full main evicts 2 (never hit
    // there) before 1 (hit once, then reinserted with 0).
    let mut s3 = Cached(S3Fifo::new(
        10 * c,
        S3Params {
            small_share: 0.0,
            ..params
        },
        Reclaim::Tail,
    ));
    hits(&mut s3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 11]);
    assert!(
        resident(&s3.0.arena, 1) && !resident(&s3.0.arena, 2),
        "clock: 2 goes first"
    );

    // CLOCK-2bit, room for 3: 1 2 3 1 1 1 4 → 1 (freq 3) reinserted at 2,
    // 2 goes; 5 → 3 goes; 6 → 1 reinserted at 1, 4 goes; 1 still hits.
    let mut clock = Cached(S3Fifo::new(3 * c, S3Params::clock(), Reclaim::Tail));
    assert_eq!(
        hits(&mut clock, &[1, 2, 3, 1, 1, 1, 4, 5, 6, 1, 4]),
        bools("mmmhhhmmmhm"),
        "clock-2bit"
    );

    // W-TinyLFU, room for 100 (sketch not charged): keys 1..=99 seen 5
    // times each; then one-time keys cannot displace them (each leaves the
    // window and loses against a probation victim seen more often).
    let mut w = Cached(WTinyLfu::new(100 * c, 100, 0.01, false, Reclaim::Tail));
    for _ in 0..5 {
        hits(&mut w, &(1..=99).collect::<Vec<_>>());
    }
    hits(&mut w, &(1000..1500).collect::<Vec<_>>());
    // 1000 took the free slot; 1001..=1499 each pushed its predecessor out of
    // the window, which lost (but for a rare one whose 4 counters all
    // collide with frequent keys': a count-min sketch only overestimates);
    // 1499 is still in the window.
    let kept = (1..=99).filter(|&k| resident(&w.0.arena, k)).count();
    assert!(kept >= 97, "w-tinylfu kept {kept} of 99 frequent keys");
    assert_eq!(w.0.arena.counters.evicted_capacity, 499);
    assert!(resident(&w.0.arena, 1499) && !resident(&w.0.arena, 1498));

    // Variants: a 1-bit counter stops at 1; with -wm a set of a new key
    // enters main, a fill small.
    let spec = PolicySpec::parse("s3-fifo-wm-c1", "tail").expect("spec");
    let Kind::S3(p) = spec.kind else {
        panic!("s3-fifo-wm-c1 is S3-FIFO")
    };
    assert!(p.writes_to_main && p.cap == 1 && p.small_share == 0.1 && p.ghost_pct == 100);
    let mut s3 = Cached(S3Fifo::new(10 * c, p, Reclaim::Tail));
    hits(&mut s3, &[1, 1, 1, 1]);
    let mut w = get(2);
    w.set = true;
    s3.set(&w);
    let a = &s3.0.arena;
    assert_eq!(a.node(a.find(1).expect("1")).bits, 1, "capped at 1");
    assert_eq!((queue_of(a, 1), queue_of(a, 2)), (SMALL, MAIN));
    for bad in [
        "s3-fifo-x",
        "s3-fifo-c4",
        "w-tinylfu-z",
        "nope",
        "exact-lru@tail",
    ] {
        assert!(PolicySpec::parse(bad, "tail").is_err(), "{bad} refused");
    }

    // The climber keeps its direction while the hit ratio does not drop,
    // turns back when it does, and stays within its bounds.
    let mut climb = Climber::new(0.1, 0.01, 0.9);
    let sample = |climb: &mut Climber, hits: u64| {
        for i in 0..1000 {
            climb.record(i < hits, 0);
        }
    };
    sample(&mut climb, 500);
    assert_eq!(climb.share, 0.1, "the first sample only sets the reference");
    sample(&mut climb, 510);
    assert!((climb.share - 0.1625).abs() < 1e-9, "up: {}", climb.share);
    sample(&mut climb, 520);
    assert!(climb.share > 0.2, "still up: {}", climb.share);
    let top = climb.share;
    sample(&mut climb, 515);
    assert!(climb.share < top, "turned back: {}", climb.share);
    for _ in 0..100 {
        sample(&mut climb, 600);
    }
    assert!((0.01..=0.9).contains(&climb.share));

    // The product (one shard) and the simulated policy it implements,
    // s3-fifo-wm-c1@sweep2, agree request by request on variable sizes,
    // sets and TTLs: hits, bytes charged (ghosts included) and every
    // counter. (The product's ghosts are keyed by a 64-bit hash of the key,
    // the simulator's by the key: they differ only if two keys' hashes
    // collide.) exact-lru and lru/1@none agree too.
    let mut rng = SmallRng::seed_from_u64(3);
    let mut next = zipf_ranks(3000, 0.9, &mut rng);
    let mut lcg = SmallRng::seed_from_u64(4);
    let trace: Vec<Req> = (0..30_000u32)
        .map(|i| {
            let k = next();
            let (key_len, value_len) = generic_sizes(k);
            let time = EPOCH + i / 10;
            Req {
                key: k,
                time,
                expires_at: if k.is_multiple_of(3) {
                    time + 60 + (k % 7) as u32 * 30
                } else {
                    0
                },
                value_len,
                key_len,
                set: lcg.random_bool(0.1),
            }
        })
        .collect();
    let budget = 120_000;
    let mut product = Product::new(budget, 1);
    let spec = PolicySpec::parse("s3-fifo-wm-c1", "tail").expect("spec");
    let Kind::S3(params) = spec.kind else {
        panic!("s3-fifo-wm-c1 is S3-FIFO")
    };
    let mut s3 = Cached(S3Fifo::new(budget, params, Reclaim::Sweep(2)));
    let mut lru = PolicySpec::parse("exact-lru", "tail")
        .expect("spec")
        .build(budget, 1);
    let mut sharded = PolicySpec::parse("lru/1@none", "tail")
        .expect("spec")
        .build(budget, 1);
    let mut ghosts_charged = 0;
    for (i, r) in trace.iter().enumerate() {
        if r.set {
            product.set(r);
            s3.set(r);
            lru.set(r);
            sharded.set(r);
        } else {
            let (a, b) = (product.get(r), s3.get(r));
            assert_eq!(a, b, "request {i}: product {a}, s3-fifo-wm-c1@sweep2 {b}");
            let (l, s) = (lru.get(r), sharded.get(r));
            assert_eq!(l, s, "request {i}: exact-lru {l}, lru/1@none {s}");
        }
        let (p, c) = (product.counters(), s3.counters());
        assert_eq!(
            (
                p.charged,
                p.evicted_capacity,
                p.evicted_expired,
                p.expired_on_get
            ),
            (
                c.charged,
                c.evicted_capacity,
                c.evicted_expired,
                c.expired_on_get
            ),
            "request {i}"
        );
        ghosts_charged = ghosts_charged.max(c.meta_bytes);
        assert_eq!(lru.counters(), sharded.counters(), "request {i}");
    }
    let seen = product.counters();
    assert!(
        seen.evicted_capacity > 0
            && seen.evicted_expired > 0
            && seen.expired_on_get > 0
            && ghosts_charged > 0,
        "the comparison saw every path: {seen:?}, ghosts {ghosts_charged}"
    );

    // A route given as a function (tests/hit_ratio.rs gives the product's
    // own) spreads keys as told: the default hash, given, changes nothing.
    let spec = PolicySpec::parse("s3-fifo-wm-c1/4", "sweep2").expect("spec");
    let mut salted = spec.build(budget, 1);
    let given = Route::Given(Arc::new(|k| ((mix64(k ^ 0x5AAD) >> 32) % 4) as usize));
    let mut routed = spec.build_routed(budget, 1, given);
    let (a, b) = (
        replay(&trace, 0, salted.as_mut(), budget),
        replay(&trace, 0, routed.as_mut(), budget),
    );
    assert_eq!(
        (a.misses_all, a.evicted_capacity),
        (b.misses_all, b.evicted_capacity)
    );

    // Every policy stays within its budget, metadata included, at every step.
    for spec in [
        "dynacache",
        "dynacache/4",
        "lru@sweep2",
        "sieve@sweep2",
        "sieve@none",
        "s3-fifo@sweep2",
        "s3-fifo@none",
        "s3-fifo-t2",
        "s3-fifo-ng",
        "s3-fifo-wm-c1",
        "s3-fifo-hc",
        "clock-2bit",
        "clock",
        "w-tinylfu@sweep2",
        "w-tinylfu@none",
        "w-tinylfu-hc",
        "s3-fifo/4",
    ] {
        for budget in [30_000, 200_000] {
            let mut p = PolicySpec::parse(spec, "tail")
                .expect("spec")
                .build(budget, 250);
            for r in &trace {
                if r.set {
                    p.set(r)
                } else {
                    p.get(r);
                }
                let charged = p.counters().charged;
                assert!(charged <= budget, "{spec}: {charged} > {budget}");
            }
            assert!(p.counters().evicted_capacity > 0, "{spec} evicted");
        }
    }

    // Reclamation: 4 hot entries expire; 4 new ones then take their room
    // from the expired ones only (at the tail, or by the sweep), whatever
    // their bits; without it, SIEVE evicts live ones by their bits.
    for (spec, live_evictions) in [
        ("lru@sweep2", 0),
        ("sieve@tail", 0),
        ("sieve@sweep2", 0),
        ("s3-fifo@tail", 0),
        ("s3-fifo@sweep2", 0),
        ("s3-fifo-wm-c1@sweep2", 0),
        ("dynacache", 0),
        ("w-tinylfu@sweep2", 0),
        ("sieve@none", 4),
    ] {
        // Room for 4 entries, and W-TinyLFU's smallest sketch.
        let sketch = if spec.starts_with("w-tinylfu") {
            Sketch::new(0).bytes()
        } else {
            0
        };
        let mut p = PolicySpec::parse(spec, "tail")
            .expect("spec")
            .build(4 * c + sketch, c);
        for round in 0..3 {
            for k in 1..=4 {
                let mut r = get(k);
                r.time = EPOCH + round;
                r.expires_at = EPOCH + 10;
                if round == 0 {
                    r.set = true;
                    p.set(&r);
                } else {
                    assert!(p.get(&r), "{spec}: {k} hit");
                }
            }
        }
        for k in 5..=8 {
            let mut r = get(k);
            r.time = EPOCH + 20;
            p.get(&r);
        }
        let cn = p.counters();
        assert_eq!(
            (cn.evicted_capacity, cn.evicted_expired + cn.expired_on_get),
            (live_evictions, 4 - live_evictions),
            "{spec}"
        );
    }

    // The generators: the Twitter trace holds the published statistics; a
    // session's gets always find it live.
    let cli = Cli::parse_from(["cache_sim", "--requests", "40000"]);
    let t = Trace::generate("twitter-c52", &cli).expect("trace");
    let s = t.stats();
    let freq = t.reqs.len() as f64 / s.distinct as f64;
    let one_hit = s.one_hit as f64 / s.distinct as f64;
    assert!((freq - 32.6).abs() < 0.5, "mean frequency {freq}");
    assert!((one_hit - 0.1936).abs() < 0.01, "one-hit wonders {one_hit}");
    let t = Trace::generate("session", &cli).expect("trace");
    assert!(t.reqs.iter().all(|r| r.expires_at > r.time));
    assert!(t.reqs.iter().any(|r| r.set) && t.stats().distinct > 1000);
}
