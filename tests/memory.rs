//! What one request can make the sidecar hold, measured on the real binary
//! (its resident memory, from /proc) against DynamoDB Local: replies are
//! written out as they fill, a multi-get reads its misses a window at a
//! time, and connections share a bounded reply budget, so a 15 KB request
//! asking for 900 MB of values costs megabytes, whether its client reads
//! or not.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoLocal, McClient, WAIT, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_dynacache");
const MIB: u64 = 1 << 20;
const VALUE: usize = 300 * 1024;

/// The binary, killed on drop.
struct Sidecar {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Sidecar {
    async fn start(db: &DynamoLocal, table: &str, env: &[(&str, &str)]) -> Sidecar {
        let port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--table",
            table,
            "--endpoint-url",
            &db.endpoint,
        ])
        .env("AWS_ACCESS_KEY_ID", common::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env_remove("DYNACACHE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let sidecar = Sidecar { child, addr };
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "dynacache never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sidecar
    }

    fn rss(&self) -> u64 {
        rss(self.child.id())
    }

    /// Samples the resident memory every few milliseconds until stopped;
    /// returns the highest seen.
    fn watch(&self) -> Watch {
        let pid = self.child.id();
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Watch { peak, stop, thread }
    }

    async fn client(&self) -> McClient {
        McClient::connect(self.addr).await
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Watch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    fn peak(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Resident memory of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A multi-get of `keys`, and how many bytes its whole reply is.
fn multi_get(keys: impl Iterator<Item = String>) -> Vec<u8> {
    let mut request = b"get".to_vec();
    for key in keys {
        request.push(b' ');
        request.extend_from_slice(key.as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request
}

/// Reads one multi-get's whole reply as it streams; returns the number of
/// values in it (checked for their size).
async fn read_values(stream: &mut tokio::net::TcpStream) -> usize {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pending: Vec<u8> = Vec::new();
    let mut values = 0;
    loop {
        // Consume whole VALUE blocks from the front.
        while let Some(line_end) = pending.windows(2).position(|w| w == b"\r\n") {
            let line = std::str::from_utf8(&pending[..line_end])
                .unwrap()
                .to_string();
            if line == "END" {
                return values;
            }
            assert!(line.starts_with("VALUE "), "{line}");
            let len: usize = line.split(' ').nth(3).unwrap().parse().unwrap();
            assert_eq!(len, VALUE);
            if pending.len() < line_end + 2 + len + 2 {
                break;
            }
            pending.drain(..line_end + 2 + len + 2);
            values += 1;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the reply keeps coming")
            .unwrap();
        assert!(n > 0, "closed mid-reply after {values} values");
        pending.extend_from_slice(&buf[..n]);
    }
}

/// A client that keeps asking for a small value while the big replies go
/// on; returns the slowest answer it got.
fn well_behaved(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let mut c = McClient::connect(addr).await;
        let mut slowest = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            assert_eq!(
                c.call(b"get small\r\n").await,
                "VALUE small 0 1\r\nx\r\nEND\r\n"
            );
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_get_of_one_large_key_repeated_holds_megabytes_not_gigabytes() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let sidecar = Sidecar::start(&db, &settings.table, &[("DYNACACHE_WRITE_TIMEOUT", "2s")]).await;
    let mut c = sidecar.client().await;
    let mut set = format!("set big 0 0 {VALUE}\r\n").into_bytes();
    set.extend(std::iter::repeat_n(b'v', VALUE));
    set.extend_from_slice(b"\r\n");
    assert_eq!(c.call(&set).await, "STORED\r\n");
    assert_eq!(c.call(b"set small 0 0 1\r\nx\r\n").await, "STORED\r\n");
    assert!(c.call(b"get big\r\n").await.starts_with("VALUE big"));
    // 3,000 times the 300 KB key, in a 12 KB request: 900 MB of reply.
    let request = multi_get((0..3000).map(|_| "big".to_string()));
    assert!(request.len() < 16 * 1024);
    let baseline = sidecar.rss();

    // A client that reads the whole reply.
    let watch = sidecar.watch();
    let stop = Arc::new(AtomicBool::new(false));
    let small = well_behaved(sidecar.addr, stop.clone());
    let mut reader = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut reader, &request)
        .await
        .unwrap();
    assert_eq!(read_values(&mut reader).await, 3000);
    stop.store(true, Ordering::Relaxed);
    let slowest = small.await.unwrap();
    let growth = watch.peak().saturating_sub(baseline);
    eprintln!("rss growth: {} KiB", growth / 1024);
    assert!(
        growth < 64 * MIB,
        "a reading client: RSS grew {} MiB",
        growth / MIB
    );
    assert!(
        slowest < Duration::from_secs(2),
        "others were served meanwhile: {slowest:?}"
    );

    // Clients that never read: each holds its connection until
    // write_timeout, and no more memory than its share.
    let baseline = sidecar.rss();
    let watch = sidecar.watch();
    let stop = Arc::new(AtomicBool::new(false));
    let small = well_behaved(sidecar.addr, stop.clone());
    let mut stuck = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &request)
            .await
            .unwrap();
        stuck.push(s);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let slowest = small.await.unwrap();
    let growth = watch.peak().saturating_sub(baseline);
    eprintln!("rss growth: {} KiB", growth / 1024);
    assert!(
        growth < 64 * MIB,
        "clients that do not read: RSS grew {} MiB",
        growth / MIB
    );
    assert!(
        slowest < Duration::from_secs(2),
        "others were served meanwhile: {slowest:?}"
    );
    let stats = c.stats("").await;
    assert_eq!(
        stats["curr_connections"], "2",
        "the stuck ones were closed by write_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_get_of_many_large_misses_reads_them_a_window_at_a_time() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    // 120 values of 300 KB in the table, none in the sidecar's memory (whose
    // budget holds a few of them at most).
    let client = db.client();
    let value = vec![b'v'; VALUE];
    for i in 0..120 {
        client
            .put_item()
            .table_name(&settings.table)
            .item("key", AttributeValue::S(format!("d{i:03}")))
            .item("value", AttributeValue::B(Blob::new(value.clone())))
            .item("flags", AttributeValue::N("0".into()))
            .item("version", AttributeValue::N("1".into()))
            .send()
            .await
            .unwrap();
    }
    let sidecar = Sidecar::start(
        &db,
        &settings.table,
        &[
            ("DYNACACHE_MEMORY_LIMIT", "4 MiB"),
            ("DYNACACHE_CACHE_SHARDS", "1"),
            ("DYNACACHE_WRITE_TIMEOUT", "2s"),
        ],
    )
    .await;
    let mut c = sidecar.client().await;
    assert_eq!(c.call(b"set small 0 0 1\r\nx\r\n").await, "STORED\r\n");
    // 25 passes over the 120 keys: 3,000 misses, 900 MB.
    let request = multi_get((0..3000).map(|i| format!("d{:03}", i % 120)));
    let baseline = sidecar.rss();
    let watch = sidecar.watch();
    let stop = Arc::new(AtomicBool::new(false));
    let small = well_behaved(sidecar.addr, stop.clone());
    let mut reader = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut reader, &request)
        .await
        .unwrap();
    assert_eq!(read_values(&mut reader).await, 3000);
    // And one that never reads.
    let mut stuck = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stuck, &request)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let slowest = small.await.unwrap();
    let growth = watch.peak().saturating_sub(baseline);
    eprintln!("rss growth: {} KiB", growth / 1024);
    // Two windows of ten 300 KB items in flight at once (the reader's and
    // the stuck client's): most of this is the DynamoDB SDK's buffers for
    // a 4 MB BatchGetItem answer, and the allocator keeping them for reuse.
    assert!(growth < 96 * MIB, "RSS grew {} MiB", growth / MIB);
    assert!(
        slowest < Duration::from_secs(2),
        "others were served meanwhile: {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_reply_budget() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let sidecar = Sidecar::start(
        &db,
        &settings.table,
        &[
            ("DYNACACHE_REPLY_MEMORY_LIMIT", "8 MiB"),
            ("DYNACACHE_WRITE_TIMEOUT", "3s"),
        ],
    )
    .await;
    let mut c = sidecar.client().await;
    let mut set = format!("set big 0 0 {VALUE}\r\n").into_bytes();
    set.extend(std::iter::repeat_n(b'v', VALUE));
    set.extend_from_slice(b"\r\n");
    assert_eq!(c.call(&set).await, "STORED\r\n");
    assert_eq!(c.call(b"set small 0 0 1\r\nx\r\n").await, "STORED\r\n");
    let request = multi_get((0..200).map(|_| "big".to_string()));
    let baseline = sidecar.rss();
    let watch = sidecar.watch();
    let stop = Arc::new(AtomicBool::new(false));
    let small = well_behaved(sidecar.addr, stop.clone());
    // 128 clients ask for 60 MB each and never read: without a shared
    // budget each would hold a value beyond its 64 KiB allowance (~46 MB
    // together); with it, 8 MiB in all.
    let mut stuck = Vec::new();
    for _ in 0..128 {
        let mut s = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &request)
            .await
            .unwrap();
        stuck.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let slowest = small.await.unwrap();
    let growth = watch.peak().saturating_sub(baseline);
    eprintln!("rss growth: {} KiB", growth / 1024);
    assert!(growth < 32 * MIB, "RSS grew {} MiB", growth / MIB);
    assert!(
        slowest < Duration::from_secs(2),
        "others were served meanwhile: {slowest:?}"
    );
}
