//! loadgen: load for any memcached-protocol server, and the same reads and
//! writes made straight to DynamoDB with aws-sdk-dynamodb, so dynacache can
//! be measured against memcached (hit path) and against the SDK (miss and
//! write paths) with one tool. Figures and commands: BENCHMARKS.md.
//!
//! A `[[bench]]` with `harness = false`. `cargo bench --bench loadgen -- mc
//! --addr 127.0.0.1:11211` runs it (cargo passes `--bench`);
//! `scripts/bench.sh` builds it once and runs the executable directly. Under
//! `cargo test --all-targets` cargo passes no `--bench`: it then only checks
//! its reply parser on canned bytes and exits, so tests never make load.
//!
//! Every run is bounded (`--duration`, at most [`MAX_RUN`]) and prints one
//! `RESULT key=value ...` line; `loadgen report FILE` turns those lines into
//! medians per workload and server and the ratio to a baseline server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

/// dynacache's allocator here too, so the direct-SDK baseline gets what the
/// sidecar gets (a client on glibc's malloc spends more CPU per call).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use dynacache::store::{DynamoSettings, DynamoStore};

/// No run lasts longer than this, whatever `--duration` says.
const MAX_RUN: Duration = Duration::from_secs(600);

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load for memcached-protocol servers and DynamoDB"
)]
struct Cli {
    /// Passed by `cargo bench`; without it (under `cargo test`) only self-checks run.
    #[arg(long, hide = true, global = true)]
    bench: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive a memcached-protocol server (memcached, dynacache).
    Mc(McArgs),
    /// GetItem / PutItem straight to DynamoDB with aws-sdk-dynamodb, configured
    /// as dynacache configures its client.
    Ddb(DdbArgs),
    /// Write items straight into a table with BatchWriteItem (a fast fill
    /// that dynacache's `set` would make one PutItem at a time).
    DdbFill(DdbFillArgs),
    /// Medians per workload and server of the RESULT lines in FILE, and the
    /// ratio of each server to the baseline.
    Report(ReportArgs),
    /// A TCP proxy that holds every chunk for --delay before passing it on,
    /// each way: DynamoDB Local made as far away as a real DynamoDB endpoint.
    DelayProxy(DelayProxyArgs),
}

#[derive(Debug, Clone, Args)]
struct DelayProxyArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay (tokio's timer rounds it up to the next millisecond).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1ms")]
    delay: Duration,
}

#[derive(Debug, Clone, Args)]
struct KeySpace {
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Key length in bytes: the prefix, then the key's index, zero-padded.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    #[arg(long, default_value = "k")]
    key_prefix: String,
    /// Value length of sets, in bytes.
    #[arg(long, default_value_t = 32)]
    value_size: usize,
    /// Key popularity.
    #[arg(long, value_enum, default_value_t = Popularity::Uniform)]
    dist: Popularity,
    /// Zipf exponent (with --dist zipf).
    #[arg(long, default_value_t = 0.99)]
    zipf_s: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Popularity {
    Uniform,
    Zipf,
}

#[derive(Debug, Clone, Args)]
struct Timing {
    /// Measured time.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Load before measuring (not counted).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Print `key=value` in the RESULT line (repeatable): workload=..., server=...
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Also report this process's CPU use over the measured time (the server's).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runtime worker threads of the generator (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Clone, Args)]
struct McArgs {
    #[arg(long, default_value = "127.0.0.1:11211")]
    addr: SocketAddr,
    /// Concurrent connections (or concurrent clients, with --new-conn).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests written per batch on a connection before reading the replies.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Share of requests that are `set` (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    set_ratio: f64,
    /// Keys per `get` (a multi-get above 1).
    #[arg(long, default_value_t = 1)]
    multiget: usize,
    /// Open a new connection for every request and close it after the reply,
    /// as Django does once per web request.
    #[arg(long)]
    new_conn: bool,
    /// Before the run: `set` every key, or read every key with multi-gets of
    /// --warm-batch (dynacache then fills its cache from DynamoDB).
    #[arg(long, value_enum, default_value_t = Warm::None)]
    warm: Warm,
    #[arg(long, default_value_t = 100)]
    warm_batch: usize,
    /// Only warm (no measured run).
    #[arg(long)]
    warm_only: bool,
    #[command(flatten)]
    space: KeySpace,
    #[command(flatten)]
    timing: Timing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Warm {
    None,
    Set,
    Get,
}

#[derive(Debug, Clone, Args)]
struct DdbArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    endpoint: String,
    #[arg(long, default_value = "dynacache")]
    table: String,
    #[arg(long, value_enum)]
    op: DdbOp,
    /// Concurrent requests (one task each, one request at a time).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Busy-wait this long between a reply and the next request (e.g. 40us),
    /// as a request through a sidecar leaves DynamoDB idle for the hop.
    #[arg(long, value_parser = humantime::parse_duration)]
    think: Option<Duration>,
    #[command(flatten)]
    space: KeySpace,
    #[command(flatten)]
    timing: Timing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DdbOp {
    /// GetItem, strongly consistent (dynacache's miss).
    Get,
    /// PutItem of the attributes dynacache writes for a `set`.
    Put,
}

#[derive(Debug, Clone, Args)]
struct DdbFillArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    endpoint: String,
    #[arg(long, default_value = "dynacache")]
    table: String,
    /// BatchWriteItem calls in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[command(flatten)]
    space: KeySpace,
}

#[derive(Debug, Clone, Args)]
struct ReportArgs {
    /// A file of RESULT lines (other lines are skipped).
    file: std::path::PathBuf,
    /// The `server` tag the others are compared with.
    #[arg(long, default_value = "memcached")]
    baseline: String,
}

fn main() {
    let cli = Cli::parse();
    if !cli.bench {
        self_check();
        println!("loadgen: reply parser self-check passed; no load without --bench");
        return;
    }
    let Some(command) = cli.command else {
        eprintln!("loadgen: give a subcommand (mc, ddb, ddb-fill, report); --help lists them");
        std::process::exit(2);
    };
    match command {
        Command::Mc(args) => runtime(args.timing.threads).block_on(mc(args)),
        Command::Ddb(args) => runtime(args.timing.threads).block_on(ddb(args)),
        Command::DdbFill(args) => runtime(2).block_on(ddb_fill(args)),
        Command::Report(args) => report(&args),
        Command::DelayProxy(args) => runtime(1).block_on(delay_proxy(args)),
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().expect("tokio runtime")
}

// ---------------------------------------------------------------- key space

/// Picks key indices and spells keys.
struct Keys {
    space: KeySpace,
    zipf: Option<Zipf<f64>>,
}

impl Keys {
    fn new(space: &KeySpace) -> Keys {
        assert!(space.keys > 0, "--keys must be above 0");
        let digits = (space.keys - 1).to_string().len();
        assert!(
            space.key_prefix.len() + digits <= space.key_size.max(1) && space.key_size <= 250,
            "--key-size {} cannot hold the prefix and {digits} digits (or is over 250)",
            space.key_size
        );
        let zipf = (space.dist == Popularity::Zipf)
            .then(|| Zipf::new(space.keys as f64, space.zipf_s).expect("valid zipf parameters"));
        Keys {
            space: space.clone(),
            zipf,
        }
    }

    fn pick(&self, rng: &mut SmallRng) -> u64 {
        match &self.zipf {
            // Rank 1 is the most popular; spread ranks over the key space
            // with a fixed odd multiplier so hot keys are not neighbours.
            Some(zipf) => {
                let rank = zipf.sample(rng) as u64 - 1;
                rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.space.keys
            }
            None => rng.random_range(0..self.space.keys),
        }
    }

    /// Appends the key of index `i`: the prefix, then `i` zero-padded.
    fn push(&self, out: &mut Vec<u8>, i: u64) {
        let prefix = self.space.key_prefix.as_bytes();
        out.extend_from_slice(prefix);
        let mut digits = [b'0'; 20];
        let mut n = i;
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = digits.len() - at;
        let width = self.space.key_size.saturating_sub(prefix.len());
        out.extend(std::iter::repeat_n(b'0', width.saturating_sub(len)));
        out.extend_from_slice(&digits[at..]);
    }

    fn key(&self, i: u64) -> String {
        let mut out = Vec::new();
        self.push(&mut out, i);
        String::from_utf8(out).expect("ASCII key")
    }
}

// ---------------------------------------------------------------- replies

/// What a reply says, once whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReplyOutcome {
    /// VALUE blocks (keys found) in a retrieval reply.
    hits: u32,
    /// SERVER_ERROR, CLIENT_ERROR, ERROR or an unexpected line.
    error: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// VALUE blocks then END.
    Retrieval,
    /// One status line (STORED).
    Status,
}

/// The length and outcome of the whole reply at the front of `buf`, or None
/// if more bytes are needed.
fn parse_reply(buf: &[u8], expect: Expect) -> Option<(usize, ReplyOutcome)> {
    let mut at = 0;
    let mut hits = 0;
    loop {
        let nl = buf[at..].iter().position(|&b| b == b'\n')?;
        let line = &buf[at..at + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let next = at + nl + 1;
        match expect {
            Expect::Status => {
                let error = line != b"STORED";
                return Some((next, ReplyOutcome { hits, error }));
            }
            Expect::Retrieval => {
                if line == b"END" {
                    return Some((next, ReplyOutcome { hits, error: false }));
                }
                if let Some(header) = line.strip_prefix(b"VALUE ") {
                    let len: usize = header
                        .split(|&b| b == b' ')
                        .nth(2)
                        .and_then(|n| std::str::from_utf8(n).ok())
                        .and_then(|n| n.parse().ok())?;
                    if buf.len() < next + len + 2 {
                        return None;
                    }
                    at = next + len + 2;
                    hits += 1;
                    continue;
                }
                return Some((next, ReplyOutcome { hits, error: true }));
            }
        }
    }
}

fn self_check() {
    let get = b"VALUE k1 0 3\r\nabc\r\nVALUE k2 5 0\r\n\r\nEND\r\nSTORED\r\n";
    let (n, out) = parse_reply(get, Expect::Retrieval).expect("whole");
    assert_eq!((n, out.hits, out.error), (40, 2, false));
    let (m, out) = parse_reply(&get[n..], Expect::Status).expect("whole");
    assert_eq!((m, out.error), (8, false));
    for cut in 0..n {
        assert!(
            parse_reply(&get[..cut], Expect::Retrieval).is_none(),
            "{cut}"
        );
    }
    let err = parse_reply(b"SERVER_ERROR dynamodb timed out\r\n", Expect::Retrieval);
    assert!(err.expect("whole").1.error);
    let space = KeySpace {
        keys: 1000,
        key_size: 16,
        key_prefix: "k".into(),
        value_size: 32,
        dist: Popularity::Zipf,
        zipf_s: 0.99,
        seed: 1,
    };
    let keys = Keys::new(&space);
    assert_eq!(keys.key(42), "k000000000000042");
    let mut rng = SmallRng::seed_from_u64(1);
    assert!((0..1000).all(|_| keys.pick(&mut rng) < 1000));
}

// ---------------------------------------------------------------- stats

/// What one connection (or task) measured.
struct Stats {
    /// Latency per request, in nanoseconds.
    latency: Histogram<u64>,
    ops: u64,
    keys_asked: u64,
    hits: u64,
    errors: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency: Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("bounds"),
            ops: 0,
            keys_asked: 0,
            hits: 0,
            errors: 0,
        }
    }

    /// One measured reply to a request of `keys` keys sent at `sent`.
    fn reply(&mut self, sent: Instant, keys: u64, outcome: &ReplyOutcome) {
        self.record(sent.elapsed());
        self.keys_asked += keys;
        self.hits += u64::from(outcome.hits);
        self.errors += u64::from(outcome.error);
    }

    fn merge(&mut self, other: &Stats) {
        self.latency.add(&other.latency).expect("same bounds");
        self.ops += other.ops;
        self.keys_asked += other.keys_asked;
        self.hits += other.hits;
        self.errors += other.errors;
    }

    fn record(&mut self, latency: Duration) {
        self.latency.saturating_record(latency.as_nanos() as u64);
        self.ops += 1;
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

/// CPU use of this process and of the server over the measured window.
struct CpuWindow {
    own: Option<f64>,
    server: Option<f64>,
    server_pid: Option<String>,
}

impl CpuWindow {
    fn start(server_pid: Option<u32>) -> CpuWindow {
        let server_pid = server_pid.map(|p| p.to_string());
        CpuWindow {
            own: cpu_seconds("self"),
            server: server_pid.as_deref().and_then(cpu_seconds),
            server_pid,
        }
    }

    /// (own, server) CPU seconds since start.
    fn end(&self) -> (Option<f64>, Option<f64>) {
        let own = cpu_seconds("self").zip(self.own).map(|(b, a)| b - a);
        let server = self
            .server_pid
            .as_deref()
            .and_then(cpu_seconds)
            .zip(self.server)
            .map(|(b, a)| b - a);
        (own, server)
    }
}

fn print_result(
    kind: &str,
    timing: &Timing,
    stats: &Stats,
    elapsed: Duration,
    cpu: (Option<f64>, Option<f64>),
    extra: &str,
) {
    let secs = elapsed.as_secs_f64();
    let h = &stats.latency;
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let hit_ratio = if stats.keys_asked > 0 {
        stats.hits as f64 / stats.keys_asked as f64
    } else {
        f64::NAN
    };
    let ops_per_s = stats.ops as f64 / secs;
    let pct = |c: Option<f64>| c.map_or(f64::NAN, |c| 100.0 * c / secs);
    let per_op = |c: Option<f64>| {
        c.map_or(f64::NAN, |c| {
            if stats.ops > 0 {
                1e6 * c / stats.ops as f64
            } else {
                f64::NAN
            }
        })
    };
    eprintln!(
        "loadgen {kind}: {ops} ops in {secs:.2}s = {ops_per_s:.0} ops/s; latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us, max {max:.1} us; hit ratio {hit_ratio:.4}; errors {errors}; generator CPU {gen:.0}%, server CPU {srv:.0}%",
        ops = stats.ops,
        p50 = us(0.5),
        p99 = us(0.99),
        p999 = us(0.999),
        max = h.max() as f64 / 1000.0,
        errors = stats.errors,
        gen = pct(cpu.0),
        srv = pct(cpu.1),
    );
    let mut line = String::from("RESULT");
    for tag in &timing.tags {
        line.push(' ');
        line.push_str(tag);
    }
    line.push_str(&format!(
        " kind={kind}{extra} ops={ops} secs={secs:.3} ops_per_s={ops_per_s:.1} p50_us={p50:.1} p90_us={p90:.1} p99_us={p99:.1} p999_us={p999:.1} max_us={max:.1} hit_ratio={hit_ratio:.4} errors={errors} gen_cpu_pct={gen:.1} server_cpu_pct={srv:.1} gen_cpu_us_per_op={gop:.2} server_cpu_us_per_op={sop:.2} total_cpu_us_per_op={tot:.2}",
        ops = stats.ops,
        p50 = us(0.5),
        p90 = us(0.9),
        p99 = us(0.99),
        p999 = us(0.999),
        max = h.max() as f64 / 1000.0,
        errors = stats.errors,
        gen = pct(cpu.0),
        srv = pct(cpu.1),
        gop = per_op(cpu.0),
        sop = per_op(cpu.1),
        // Generator plus server: for direct SDK calls the client is all there is.
        tot = per_op(cpu.0) + per_op(cpu.1).max(0.0),
    ));
    println!("{line}");
}

/// When the load starts, when measuring starts, and when everything stops.
#[derive(Debug, Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

impl Window {
    fn new(timing: &Timing) -> Window {
        let duration = timing.duration.min(MAX_RUN);
        let measure_from = Instant::now() + timing.warmup.min(MAX_RUN);
        Window {
            measure_from,
            end: measure_from + duration,
        }
    }

    /// Runs `cpu` sampling around the measured part of the window.
    async fn measure_cpu(self, server_pid: Option<u32>) -> ((Option<f64>, Option<f64>), Duration) {
        tokio::time::sleep_until(self.measure_from.into()).await;
        let cpu = CpuWindow::start(server_pid);
        let started = Instant::now();
        tokio::time::sleep_until(self.end.into()).await;
        (cpu.end(), started.elapsed())
    }
}

// ---------------------------------------------------------------- mc

/// What a connection sends, shared by all of them.
struct McPlan {
    keys: Keys,
    addr: SocketAddr,
    depth: usize,
    set_ratio: f64,
    multiget: usize,
    set_header_tail: Vec<u8>,
    value: Vec<u8>,
}

impl McPlan {
    /// Appends one request to `out`; returns what its reply will be and how
    /// many keys it asks for.
    fn push_request(&self, out: &mut Vec<u8>, rng: &mut SmallRng) -> (Expect, u64) {
        if self.set_ratio > 0.0 && rng.random_bool(self.set_ratio) {
            let i = self.keys.pick(rng);
            self.push_set(out, i);
            (Expect::Status, 0)
        } else {
            out.extend_from_slice(b"get");
            for _ in 0..self.multiget {
                out.push(b' ');
                let i = self.keys.pick(rng);
                self.keys.push(out, i);
            }
            out.extend_from_slice(b"\r\n");
            (Expect::Retrieval, self.multiget as u64)
        }
    }

    fn push_set(&self, out: &mut Vec<u8>, i: u64) {
        out.extend_from_slice(b"set ");
        self.keys.push(out, i);
        out.extend_from_slice(&self.set_header_tail);
        out.extend_from_slice(&self.value);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads replies off one connection.
struct ReplyReader {
    buf: Vec<u8>,
    at: usize,
}

impl ReplyReader {
    fn new() -> ReplyReader {
        ReplyReader {
            buf: Vec::with_capacity(64 * 1024),
            at: 0,
        }
    }

    async fn next(
        &mut self,
        stream: &mut TcpStream,
        expect: Expect,
    ) -> std::io::Result<ReplyOutcome> {
        loop {
            if let Some((n, outcome)) = parse_reply(&self.buf[self.at..], expect) {
                self.at += n;
                if self.at == self.buf.len() {
                    self.buf.clear();
                    self.at = 0;
                }
                return Ok(outcome);
            }
            if self.at > 0 {
                self.buf.drain(..self.at);
                self.at = 0;
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One persistent connection: batches of `depth` requests, then their replies.
async fn mc_connection(plan: Arc<McPlan>, id: u64, seed: u64, window: Window) -> Stats {
    let mut stats = Stats::new();
    let mut rng = SmallRng::seed_from_u64(seed ^ (id.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut stream = match connect(plan.addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: connect {}: {e}", plan.addr);
            stats.errors += 1;
            return stats;
        }
    };
    let mut reader = ReplyReader::new();
    let mut out = Vec::with_capacity(16 * 1024);
    let mut expects = Vec::with_capacity(plan.depth);
    while Instant::now() < window.end {
        out.clear();
        expects.clear();
        for _ in 0..plan.depth {
            expects.push(plan.push_request(&mut out, &mut rng));
        }
        let sent = Instant::now();
        let counted = sent >= window.measure_from;
        if let Err(e) = stream.write_all(&out).await {
            eprintln!("loadgen: write: {e}");
            stats.errors += 1;
            return stats;
        }
        for &(expect, keys) in &expects {
            match reader.next(&mut stream, expect).await {
                Ok(outcome) if counted => stats.reply(sent, keys, &outcome),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("loadgen: read: {e}");
                    stats.errors += 1;
                    return stats;
                }
            }
        }
    }
    stats
}

/// One client opening a new connection per request: connect, one request,
/// its reply, close (the client closes first, as Django's does).
async fn mc_new_conn_client(plan: Arc<McPlan>, id: u64, seed: u64, window: Window) -> Stats {
    let mut stats = Stats::new();
    let mut rng = SmallRng::seed_from_u64(seed ^ (id.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut out = Vec::with_capacity(1024);
    while Instant::now() < window.end {
        out.clear();
        let (expect, keys) = plan.push_request(&mut out, &mut rng);
        let sent = Instant::now();
        let counted = sent >= window.measure_from;
        let result = async {
            let mut stream = connect(plan.addr).await?;
            stream.write_all(&out).await?;
            let mut reader = ReplyReader::new();
            reader.next(&mut stream, expect).await
        }
        .await;
        match result {
            Ok(outcome) if counted => stats.reply(sent, keys, &outcome),
            Ok(_) => {}
            Err(e) => {
                if counted {
                    stats.errors += 1;
                }
                if stats.errors < 5 {
                    eprintln!("loadgen: new connection: {e}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    stats
}

/// Sets every key (`Warm::Set`) or reads every key in multi-gets
/// (`Warm::Get`), spread over `connections` connections.
async fn mc_warm(plan: Arc<McPlan>, warm: Warm, batch: usize, connections: usize) {
    let started = Instant::now();
    let errors = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let n = plan.keys.space.keys;
    let per = n.div_ceil(connections as u64);
    let mut tasks = Vec::new();
    for c in 0..connections as u64 {
        let plan = plan.clone();
        let errors = errors.clone();
        let hits = hits.clone();
        let range = (c * per)..((c + 1) * per).min(n);
        tasks.push(tokio::spawn(async move {
            let mut stream = connect(plan.addr).await.expect("connect for warm-up");
            let mut reader = ReplyReader::new();
            let mut out = Vec::new();
            let indices: Vec<u64> = range.collect();
            let (chunk, expect) = match warm {
                Warm::Set => (16, Expect::Status),
                _ => (batch.max(1), Expect::Retrieval),
            };
            for group in indices.chunks(chunk) {
                out.clear();
                let replies = match warm {
                    Warm::Set => {
                        for &i in group {
                            plan.push_set(&mut out, i);
                        }
                        group.len()
                    }
                    _ => {
                        out.extend_from_slice(b"get");
                        for &i in group {
                            out.push(b' ');
                            plan.keys.push(&mut out, i);
                        }
                        out.extend_from_slice(b"\r\n");
                        1
                    }
                };
                stream.write_all(&out).await.expect("warm-up write");
                for _ in 0..replies {
                    let outcome = reader
                        .next(&mut stream, expect)
                        .await
                        .expect("warm-up reply");
                    errors.fetch_add(u64::from(outcome.error), Ordering::Relaxed);
                    hits.fetch_add(u64::from(outcome.hits), Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("warm-up task");
    }
    eprintln!(
        "loadgen: warm-up ({warm:?}) of {n} keys took {:.1}s; errors {}, keys found {}",
        started.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
        hits.load(Ordering::Relaxed),
    );
}

async fn mc(args: McArgs) {
    let keys = Keys::new(&args.space);
    let plan = Arc::new(McPlan {
        keys,
        addr: args.addr,
        depth: args.depth.max(1),
        set_ratio: args.set_ratio.clamp(0.0, 1.0),
        multiget: args.multiget.max(1),
        set_header_tail: format!(" 0 0 {}\r\n", args.space.value_size).into_bytes(),
        value: vec![b'x'; args.space.value_size],
    });
    if args.warm != Warm::None {
        mc_warm(
            plan.clone(),
            args.warm,
            args.warm_batch,
            args.connections.clamp(1, 50),
        )
        .await;
    }
    if args.warm_only {
        return;
    }
    let window = Window::new(&args.timing);
    let mut tasks = Vec::new();
    for id in 0..args.connections as u64 {
        let plan = plan.clone();
        let seed = args.space.seed;
        tasks.push(if args.new_conn {
            tokio::spawn(mc_new_conn_client(plan, id, seed, window))
        } else {
            tokio::spawn(mc_connection(plan, id, seed, window))
        });
    }
    let (cpu, elapsed) = window.measure_cpu(args.timing.server_pid).await;
    let mut stats = Stats::new();
    for t in tasks {
        stats.merge(&t.await.expect("connection task"));
    }
    let extra = format!(
        " conns={} depth={} multiget={} set_ratio={} new_conn={} keys={} dist={:?}",
        args.connections,
        args.depth,
        args.multiget,
        args.set_ratio,
        args.new_conn,
        args.space.keys,
        args.space.dist
    );
    print_result("mc", &args.timing, &stats, elapsed, cpu, &extra);
}

// ---------------------------------------------------------------- ddb

/// A client configured exactly as dynacache configures its own
/// ([`DynamoStore::connect`]: the AWS chain, timeouts, retries), so the
/// comparison isolates what the sidecar adds.
async fn sdk_client(endpoint: &str, table: &str) -> Client {
    let settings = DynamoSettings {
        table: table.into(),
        endpoint_url: Some(endpoint.into()),
        ..DynamoSettings::default()
    };
    DynamoStore::connect(settings).await.client().clone()
}

/// The attributes dynacache writes for `set <key> 0 0 <len>`.
fn item_of(
    settings: &DynamoSettings,
    key: String,
    value: &[u8],
    version: u64,
) -> std::collections::HashMap<String, AttributeValue> {
    std::collections::HashMap::from([
        (settings.key_attribute.clone(), AttributeValue::S(key)),
        (
            settings.value_attribute.clone(),
            AttributeValue::B(Blob::new(value)),
        ),
        (
            settings.flags_attribute.clone(),
            AttributeValue::N("0".into()),
        ),
        (
            settings.version_attribute.clone(),
            AttributeValue::N(version.to_string()),
        ),
    ])
}

async fn ddb_task(
    client: Client,
    table: String,
    op: DdbOp,
    keys: Arc<Keys>,
    id: u64,
    window: Window,
    think: Option<Duration>,
) -> Stats {
    let settings = DynamoSettings::default();
    let mut stats = Stats::new();
    let mut rng =
        SmallRng::seed_from_u64(keys.space.seed ^ (id.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let value = vec![b'x'; keys.space.value_size];
    let mut version = id << 40;
    while Instant::now() < window.end {
        if let Some(think) = think {
            let until = Instant::now() + think;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let key = keys.key(keys.pick(&mut rng));
        let sent = Instant::now();
        let counted = sent >= window.measure_from;
        let (ok, hits) = match op {
            DdbOp::Get => {
                let r = client
                    .get_item()
                    .table_name(&table)
                    .key(&settings.key_attribute, AttributeValue::S(key))
                    .consistent_read(true)
                    .send()
                    .await;
                match r {
                    Ok(out) => (true, u64::from(out.item().is_some_and(|i| !i.is_empty()))),
                    Err(_) => (false, 0),
                }
            }
            DdbOp::Put => {
                version += 1;
                let r = client
                    .put_item()
                    .table_name(&table)
                    .set_item(Some(item_of(&settings, key, &value, version)))
                    .send()
                    .await;
                (r.is_ok(), 0)
            }
        };
        if counted {
            stats.record(sent.elapsed());
            if op == DdbOp::Get {
                stats.keys_asked += 1;
                stats.hits += hits;
            }
            stats.errors += u64::from(!ok);
        }
    }
    stats
}

async fn delay_proxy(args: DelayProxyArgs) {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .expect("delay-proxy: bind");
    eprintln!(
        "loadgen delay-proxy: {} -> {}, {:?} each way",
        args.listen, args.upstream, args.delay
    );
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let Ok(server) = TcpStream::connect(args.upstream).await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::spawn(delay_pipe(cr, sw, args.delay));
        tokio::spawn(delay_pipe(sr, cw, args.delay));
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read,
/// in order; ends (closing `to`) when `from` does.
async fn delay_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = tokio::time::Instant::now() + delay;
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn ddb(args: DdbArgs) {
    let client = sdk_client(&args.endpoint, &args.table).await;
    let keys = Arc::new(Keys::new(&args.space));
    let window = Window::new(&args.timing);
    let tasks: Vec<_> = (0..args.connections as u64)
        .map(|id| {
            tokio::spawn(ddb_task(
                client.clone(),
                args.table.clone(),
                args.op,
                keys.clone(),
                id,
                window,
                args.think,
            ))
        })
        .collect();
    let (cpu, elapsed) = window.measure_cpu(args.timing.server_pid).await;
    let mut stats = Stats::new();
    for t in tasks {
        stats.merge(&t.await.expect("ddb task"));
    }
    let extra = format!(
        " op={:?} conns={} keys={} dist={:?}",
        args.op, args.connections, args.space.keys, args.space.dist
    );
    print_result("ddb", &args.timing, &stats, elapsed, cpu, &extra);
}

async fn ddb_fill(args: DdbFillArgs) {
    let started = Instant::now();
    let client = sdk_client(&args.endpoint, &args.table).await;
    let keys = Arc::new(Keys::new(&args.space));
    let next = Arc::new(AtomicU64::new(0));
    let total = args.space.keys;
    let tasks: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (client, keys, next, table) = (
                client.clone(),
                keys.clone(),
                next.clone(),
                args.table.clone(),
            );
            tokio::spawn(async move {
                let settings = DynamoSettings::default();
                let value = vec![b'x'; keys.space.value_size];
                loop {
                    // BatchWriteItem takes at most 25 items.
                    let from = next.fetch_add(25, Ordering::Relaxed);
                    if from >= total {
                        return;
                    }
                    let mut pending: Vec<WriteRequest> = (from..(from + 25).min(total))
                        .map(|i| {
                            let put = PutRequest::builder()
                                .set_item(Some(item_of(&settings, keys.key(i), &value, 1)))
                                .build()
                                .expect("item set");
                            WriteRequest::builder().put_request(put).build()
                        })
                        .collect();
                    let mut backoff = Duration::from_millis(10);
                    while !pending.is_empty() {
                        let out = client
                            .batch_write_item()
                            .request_items(&table, pending.clone())
                            .send()
                            .await;
                        match out {
                            Ok(out) => {
                                pending = out
                                    .unprocessed_items()
                                    .and_then(|u| u.get(&table))
                                    .cloned()
                                    .unwrap_or_default();
                            }
                            Err(e) => {
                                // Throttling is retried by the SDK itself; anything
                                // left is a real error (no table, bad credentials).
                                eprintln!(
                                    "loadgen: BatchWriteItem: {}",
                                    aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                                );
                                std::process::exit(1);
                            }
                        }
                        if !pending.is_empty() {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                    if from % 100_000 == 0 && from > 0 {
                        eprintln!("loadgen: {from} items written");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("fill task");
    }
    eprintln!(
        "loadgen: wrote {total} items into {} in {:.1}s",
        args.table,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- report

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn report(args: &ReportArgs) {
    let text = std::fs::read_to_string(&args.file).expect("read the results file");
    // workload -> server -> metric -> values
    let mut runs: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>> = BTreeMap::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("RESULT ")) {
        let fields: BTreeMap<&str, &str> =
            line.split(' ').filter_map(|f| f.split_once('=')).collect();
        let workload = fields.get("workload").copied().unwrap_or("-").to_string();
        let server = fields.get("server").copied().unwrap_or("-").to_string();
        let metrics = runs.entry(workload).or_default().entry(server).or_default();
        for (k, v) in &fields {
            if let Ok(v) = v.parse::<f64>() {
                metrics.entry((*k).to_string()).or_default().push(v);
            }
        }
    }
    let cols = [
        "ops_per_s",
        "p50_us",
        "p99_us",
        "p999_us",
        "server_cpu_us_per_op",
        "gen_cpu_us_per_op",
        "total_cpu_us_per_op",
        "gen_cpu_pct",
        "hit_ratio",
        "errors",
    ];
    println!(
        "medians over rounds; ratio = server / {} (throughput: higher is better; latency and CPU per op: lower is better); total CPU = generator + server\n",
        args.baseline
    );
    println!(
        "| workload | server | rounds | ops/s | p50 us | p99 us | p99.9 us | server CPU us/op | generator CPU us/op | generator CPU % | hit ratio | errors | ops/s ratio | p50 ratio | p99 ratio | server CPU/op ratio | total CPU/op ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (workload, servers) in &runs {
        let base: Option<BTreeMap<&str, f64>> = servers.get(&args.baseline).map(|m| {
            cols.iter()
                .map(|c| (*c, median(m.get(*c).cloned().unwrap_or_default())))
                .collect()
        });
        for (server, metrics) in servers {
            let med: BTreeMap<&str, f64> = cols
                .iter()
                .map(|c| (*c, median(metrics.get(*c).cloned().unwrap_or_default())))
                .collect();
            let rounds = metrics.get("ops_per_s").map_or(0, Vec::len);
            let ratio = |c: &str| base.as_ref().map_or(f64::NAN, |b| med[c] / b[c]);
            println!(
                "| {workload} | {server} | {rounds} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.4} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                med["ops_per_s"],
                med["p50_us"],
                med["p99_us"],
                med["p999_us"],
                med["server_cpu_us_per_op"],
                med["gen_cpu_us_per_op"],
                med["gen_cpu_pct"],
                med["hit_ratio"],
                med["errors"],
                ratio("ops_per_s"),
                ratio("p50_us"),
                ratio("p99_us"),
                ratio("server_cpu_us_per_op"),
                ratio("total_cpu_us_per_op"),
            );
        }
    }
}
