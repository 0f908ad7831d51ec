//! A loopback TCP proxy between dynacache and DynamoDB Local that injects
//! faults and counts DynamoDB calls by operation (from each request's
//! `X-Amz-Target` header) and the capacity units DynamoDB answered that they
//! consumed, so tests can assert what reached DynamoDB and what it cost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forward everything.
    Pass = 0,
    /// Swallow requests: connections stay open, nothing ever answers.
    Blackhole = 1,
    /// Reset new connections at once (RST), close open ones on their next request.
    Reset = 2,
    /// Answer every request with DynamoDB's ThrottlingException (HTTP 400).
    Throttle = 3,
}

const THROTTLED: &str = "{\"__type\":\"com.amazonaws.dynamodb.v20120810#ThrottlingException\",\"message\":\"Rate of requests exceeds the allowed throughput.\"}";

struct Shared {
    upstream: SocketAddr,
    fault: AtomicU8,
    delay_ms: AtomicU64,
    /// Responses to this operation are held until released...
    hold_op: Mutex<Option<String>>,
    /// ...this many of them (the later ones pass).
    hold_budget: AtomicU64,
    held: AtomicU64,
    release: Notify,
    /// Requests of this operation are held before they reach DynamoDB...
    hold_requests_op: Mutex<Option<String>>,
    /// ...this many of them...
    hold_requests_budget: AtomicU64,
    /// ...until released; then each is sent on a connection of its own (its
    /// client may have given up on it long ago) and counted here.
    late_delivered: AtomicU64,
    release_requests: Notify,
    /// Requests of this operation are answered with this DynamoDB error
    /// (its `__type`) by the proxy, never reaching DynamoDB...
    refuse: Mutex<Option<(String, String)>>,
    /// ...this many of them.
    refuse_budget: AtomicU64,
    calls: Mutex<HashMap<String, u64>>,
    /// `ConsumedCapacity` units in the answers, by operation.
    capacity: Mutex<HashMap<String, f64>>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream is http://127.0.0.1:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            fault: AtomicU8::new(Fault::Pass as u8),
            delay_ms: AtomicU64::new(0),
            hold_op: Mutex::new(None),
            hold_budget: AtomicU64::new(0),
            held: AtomicU64::new(0),
            release: Notify::new(),
            hold_requests_op: Mutex::new(None),
            hold_requests_budget: AtomicU64::new(0),
            late_delivered: AtomicU64::new(0),
            release_requests: Notify::new(),
            refuse: Mutex::new(None),
            refuse_budget: AtomicU64::new(0),
            calls: Mutex::new(HashMap::new()),
            capacity: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, s.clone()));
            }
        });
        FaultProxy { addr, shared, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Delays every request by `delay` before forwarding it.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Holds GetItem responses (the read has happened in DynamoDB, its
    /// answer is late) until [`FaultProxy::release`].
    pub fn hold_get_responses(&self) {
        self.hold_responses("GetItem", u64::MAX);
    }

    /// Holds the next `count` responses to `operation` (it has happened in
    /// DynamoDB; its answer is late) until [`FaultProxy::release`].
    pub fn hold_responses(&self, operation: &str, count: u64) {
        *self.shared.hold_op.lock().unwrap() = Some(operation.to_string());
        self.shared.hold_budget.store(count, Ordering::SeqCst);
    }

    pub fn release(&self) {
        *self.shared.hold_op.lock().unwrap() = None;
        self.shared.hold_budget.store(0, Ordering::SeqCst);
        self.shared.release.notify_waiters();
    }

    /// Holds the next `count` requests of `operation` before they reach
    /// DynamoDB: the client times out and is answered, and the request lands
    /// later, at [`FaultProxy::release_requests`] (a write stuck in the
    /// network). Calls are counted when they arrive at the proxy.
    pub fn hold_requests(&self, operation: &str, count: u64) {
        *self.shared.hold_requests_op.lock().unwrap() = Some(operation.to_string());
        self.shared
            .hold_requests_budget
            .store(count, Ordering::SeqCst);
    }

    /// Lets held requests reach DynamoDB now.
    pub fn release_requests(&self) {
        *self.shared.hold_requests_op.lock().unwrap() = None;
        self.shared.hold_requests_budget.store(0, Ordering::SeqCst);
        self.shared.release_requests.notify_waiters();
    }

    /// Waits (bounded) until `n` held requests have reached DynamoDB and it
    /// has answered them.
    pub async fn wait_late_delivered(&self, n: u64) {
        let deadline = Instant::now() + super::WAIT;
        while self.shared.late_delivered.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "held requests never landed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Answers the next `count` requests of `operation` with DynamoDB's
    /// error `error` (say "TransactionConflictException", HTTP 400), as
    /// DynamoDB refuses a request: they never reach it.
    pub fn refuse(&self, operation: &str, error: &str, count: u64) {
        *self.shared.refuse.lock().unwrap() = Some((operation.to_string(), error.to_string()));
        self.shared.refuse_budget.store(count, Ordering::SeqCst);
    }

    /// Responses being held now.
    pub fn held(&self) -> u64 {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Calls of `operation` (e.g. "GetItem") seen so far.
    pub fn calls(&self, operation: &str) -> u64 {
        self.shared
            .calls
            .lock()
            .unwrap()
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// Capacity units DynamoDB reported consuming for `operation` so far
    /// (dynacache asks for `ReturnConsumedCapacity=TOTAL` on every call).
    pub fn capacity(&self, operation: &str) -> f64 {
        self.shared
            .capacity
            .lock()
            .unwrap()
            .get(operation)
            .copied()
            .unwrap_or(0.0)
    }

    /// Waits (bounded) until `operation` has been called at least `n` times.
    pub async fn wait_calls(&self, operation: &str, n: u64) {
        let deadline = Instant::now() + super::WAIT;
        while self.calls(operation) < n {
            assert!(
                Instant::now() < deadline,
                "{operation} never reached {n} calls"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fault(shared: &Shared) -> Fault {
    match shared.fault.load(Ordering::SeqCst) {
        1 => Fault::Blackhole,
        2 => Fault::Reset,
        3 => Fault::Throttle,
        _ => Fault::Pass,
    }
}

async fn relay(client: TcpStream, shared: Arc<Shared>) {
    if fault(&shared) == Fault::Reset {
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_rd, client_wr) = client.into_split();
    // Both directions may write to the client: upstream's responses, or
    // the proxy's own canned ones.
    let client_wr = Arc::new(tokio::sync::Mutex::new(client_wr));
    let (mut up_rd, mut up_wr) = upstream.into_split();
    // Set by the request side when the request in flight is a GetItem.
    // The operation of the request in flight on this connection.
    let last_op = Arc::new(Mutex::new(String::new()));

    let requests = {
        let shared = shared.clone();
        let last_op = last_op.clone();
        let client_wr = client_wr.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let op = operation(&buf[..n]);
                match fault(&shared) {
                    Fault::Blackhole => continue,
                    Fault::Reset => return,
                    Fault::Throttle => {
                        if let Some(op) = op {
                            *shared.calls.lock().unwrap().entry(op).or_default() += 1;
                            let response = format!(
                                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{THROTTLED}",
                                THROTTLED.len()
                            );
                            if client_wr
                                .lock()
                                .await
                                .write_all(response.as_bytes())
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        continue;
                    }
                    Fault::Pass => {}
                }
                if let Some(op) = &op {
                    *last_op.lock().unwrap() = op.clone();
                    *shared.calls.lock().unwrap().entry(op.clone()).or_default() += 1;
                }
                let refusal = op.as_deref().and_then(|op| {
                    let refuse = shared.refuse.lock().unwrap();
                    let (name, error) = refuse.as_ref()?;
                    (name == op
                        && shared
                            .refuse_budget
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok())
                    .then(|| error.clone())
                });
                if let Some(error) = refusal {
                    if whole_request(&mut client_rd, buf[..n].to_vec())
                        .await
                        .is_none()
                    {
                        return;
                    }
                    let body = format!(
                        "{{\"__type\":\"com.amazonaws.dynamodb.v20120810#{error}\",\"message\":\"refused by the test proxy\"}}"
                    );
                    let response = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if client_wr
                        .lock()
                        .await
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                let hold = op.as_deref().is_some_and(|op| {
                    shared.hold_requests_op.lock().unwrap().as_deref() == Some(op)
                        && shared
                            .hold_requests_budget
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                });
                if hold {
                    let Some(request) = whole_request(&mut client_rd, buf[..n].to_vec()).await
                    else {
                        return;
                    };
                    tokio::spawn(deliver_late(request, shared.clone()));
                    continue;
                }
                let delay = shared.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if up_wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let responses = {
        let shared = shared.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            // The end of the previous read, so a number split between two
            // reads is still found.
            let mut tail: Vec<u8> = Vec::new();
            loop {
                let n = match up_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut window = std::mem::take(&mut tail);
                let seen = window.len();
                window.extend_from_slice(&buf[..n]);
                // Numbers that end in what was seen before were counted then.
                let units: f64 = capacity_units(&window)
                    .into_iter()
                    .filter(|(end, _)| *end > seen)
                    .map(|(_, units)| units)
                    .sum();
                if units > 0.0 {
                    let op = last_op.lock().unwrap().clone();
                    *shared.capacity.lock().unwrap().entry(op).or_default() += units;
                }
                tail = window[window.len().saturating_sub(64)..].to_vec();
                let hold = {
                    let op = last_op.lock().unwrap();
                    shared.hold_op.lock().unwrap().as_deref() == Some(op.as_str())
                        && shared
                            .hold_budget
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                };
                if hold {
                    shared.held.fetch_add(1, Ordering::SeqCst);
                    let released = shared.release.notified();
                    if shared.hold_op.lock().unwrap().is_some() {
                        released.await;
                    }
                    shared.held.fetch_sub(1, Ordering::SeqCst);
                }
                if client_wr.lock().await.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    // Whichever side ends first ends the connection.
    tokio::select! {
        _ = requests => {}
        _ = responses => {}
    }
}

/// Reads the rest of the HTTP request whose first bytes are `start`
/// (headers, then `Content-Length` bytes of body).
async fn whole_request(
    client: &mut tokio::net::tcp::OwnedReadHalf,
    mut request: Vec<u8>,
) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Some(request);
            }
        }
        let mut chunk = vec![0u8; 64 * 1024];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Waits for [`FaultProxy::release_requests`], then sends `request` to
/// DynamoDB on a connection of its own and reads its answer.
async fn deliver_late(request: Vec<u8>, shared: Arc<Shared>) {
    let released = shared.release_requests.notified();
    if shared.hold_requests_op.lock().unwrap().is_some() {
        released.await;
    }
    if let Ok(mut upstream) = TcpStream::connect(shared.upstream).await
        && upstream.write_all(&request).await.is_ok()
    {
        // One response: its head, then whatever body comes with it.
        let mut answer = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(10), upstream.read(&mut answer)).await;
    }
    shared.late_delivered.fetch_add(1, Ordering::SeqCst);
}

/// The numbers after `"CapacityUnits":` in a piece of DynamoDB's JSON, with
/// where each ends; one cut by the end of the piece is left out.
fn capacity_units(bytes: &[u8]) -> Vec<(usize, f64)> {
    const KEY: &[u8] = b"\"CapacityUnits\":";
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(KEY.len()).position(|w| w == KEY) {
        let start = at + i + KEY.len();
        let len = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .unwrap_or(bytes.len() - start);
        let end = start + len;
        if end < bytes.len()
            && let Some(units) = std::str::from_utf8(&bytes[start..end])
                .ok()
                .and_then(|n| n.parse().ok())
        {
            found.push((end, units));
        }
        at = end;
    }
    found
}

/// The DynamoDB operation named in a request's `X-Amz-Target` header, if
/// this chunk carries the header (the SDK writes a small request, headers
/// and body, in one piece). Reads of dynacache's flush_all marker item are
/// named apart ("GetItem#flush_marker"), so tests count data reads alone.
fn operation(chunk: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(chunk);
    let op = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("x-amz-target") {
            return None;
        }
        Some(value.trim().rsplit('.').next()?.to_string())
    })?;
    Some(if text.contains("dynacache flush_all") {
        format!("{op}#flush_marker")
    } else {
        op
    })
}
