//! Fleet coherence on real processes (docs/fleet.md): several dynacache
//! binaries in fleet mode on one DynamoDB Local table, talked to with raw
//! memcached bytes over loopback sockets, each sidecar's peer port behind
//! a real fault proxy, and faults from signals (SIGSTOP, SIGKILL, SIGTERM).
//!
//! The guarantee under test: once a write through any sidecar has been
//! acknowledged, no sidecar answers a read that begins afterwards with an
//! older value. Each test also shows the cache was in play (reads served
//! from memory), and one runs the same steps without fleet mode and sees
//! the stale read fleet mode prevents, so the checks can fail.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::{DynamoLocal, McClient, WAIT, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_dynacache");
const SECRET: &str = "a fleet secret for the tests, 32+";
/// The lease term the tests run with (the default) and the membership
/// period (shorter than the default, so evictions take seconds, not tens).
const LEASE: Duration = Duration::from_secs(1);
const PERIOD: &str = "250ms";

/// One dynacache binary; killed on drop.
struct Sidecar {
    child: Child,
    addr: SocketAddr,
    metrics: u16,
    /// Its peer port (`--fleet-listen`), if in fleet mode.
    peer_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start a sidecar.
#[derive(Clone)]
struct Setup {
    endpoint: String,
    table: String,
    fleet: bool,
    secret: String,
    /// A configuration file's text for every sidecar, if any.
    config: Option<String>,
}

impl Setup {
    async fn new(db: &DynamoLocal, fleet: bool) -> Setup {
        Setup {
            endpoint: db.endpoint.clone(),
            table: db.new_table().await.table,
            fleet,
            secret: SECRET.into(),
            config: None,
        }
    }

    /// Starts a sidecar whose peers dial it directly.
    fn spawn(&self) -> Sidecar {
        self.spawn_at(free_port(), None)
    }

    /// Starts a sidecar whose peers dial it through a fault proxy.
    async fn spawn_proxied(&self) -> (Sidecar, FaultProxy) {
        let peer_port = free_port();
        let proxy = FaultProxy::start(&format!("127.0.0.1:{peer_port}")).await;
        let sidecar = self.spawn_at(peer_port, Some(proxy.addr.to_string()));
        (sidecar, proxy)
    }

    fn spawn_at(&self, peer_port: u16, advertise: Option<String>) -> Sidecar {
        let port = free_port();
        let metrics = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--table",
            &self.table,
            "--endpoint-url",
            &self.endpoint,
            // Far longer than any test: only fleet mode keeps caches fresh.
            "--max-local-age",
            "1h",
        ]);
        if let Some(text) = &self.config {
            let path = dir.path().join("dynacache.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        if self.fleet {
            let advertise = advertise.unwrap_or_else(|| format!("127.0.0.1:{peer_port}"));
            cmd.args([
                "--fleet-listen",
                &format!("127.0.0.1:{peer_port}"),
                "--fleet-advertise",
                &advertise,
                "--fleet-lease",
                &format!("{}ms", LEASE.as_millis()),
                "--fleet-membership-period",
                PERIOD,
                "--fleet-secret",
                &self.secret,
            ]);
        }
        cmd.env("AWS_ACCESS_KEY_ID", common::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "dynacache=debug")
            .env_remove("DYNACACHE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Sidecar {
            child: cmd.spawn().unwrap(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            metrics,
            peer_port,
            log,
            _dir: dir,
        }
    }
}

impl Sidecar {
    async fn client(&self) -> McClient {
        McClient::connect(self.addr).await
    }

    /// An HTTP/1.0 GET on the admin port: status and body, or None if it
    /// does not listen (yet).
    async fn http(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut response))
            .await
            .ok()?
            .ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        Some((head.split(' ').nth(1)?.parse().ok()?, body.to_string()))
    }

    /// A sample's value from /metrics (a gauge or counter without labels).
    async fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.http("/metrics").await.expect("metrics answer");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
            .parse()
            .unwrap()
    }

    /// Polls until `check` holds, bounded by `limit`.
    async fn wait_for<F, Fut>(&self, what: &str, limit: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "{what} not within {limit:?}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Until /readyz answers 200: in fleet mode, every member it joined
    /// counts it, so it may acknowledge writes.
    async fn ready(&self) {
        self.wait_for("ready", WAIT, || async {
            matches!(self.http("/readyz").await, Some((200, _)))
        })
        .await;
    }

    /// Until it serves from memory (holds every lease it needs).
    async fn coherent(&self, limit: Duration) {
        self.wait_for("coherent", limit, || async {
            matches!(self.http("/metrics").await, Some((200, body)) if body.contains("\ndynacache_fleet_coherent 1\n"))
        })
        .await;
    }

    async fn get_hits(&self) -> u64 {
        self.client().await.stats("").await["get_hits"]
            .parse()
            .unwrap()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, and the exit within `WAIT`.
    fn terminate(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(100)..].join("\n")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `n` sidecars in fleet mode and waits until all are ready and
/// serve from memory.
async fn fleet_of(setup: &Setup, n: usize) -> Vec<Sidecar> {
    let sidecars: Vec<Sidecar> = (0..n).map(|_| setup.spawn()).collect();
    for s in &sidecars {
        s.ready().await;
        s.coherent(WAIT).await;
    }
    sidecars
}

/// `get key` through `sidecar`.
async fn get(sidecar: &Sidecar, key: &str) -> String {
    sidecar
        .client()
        .await
        .call(format!("get {key}\r\n").as_bytes())
        .await
}

fn value(key: &str, data: &str) -> String {
    format!("VALUE {key} 0 {}\r\n{data}\r\nEND\r\n", data.len())
}

/// One mutating step and what every sidecar must answer to `get` right
/// after it was acknowledged.
struct Step {
    name: &'static str,
    /// The value set before the step (every sidecar reads it into memory).
    before: &'static str,
    /// The requests, given the key and the `gets` cas of the value before.
    requests: fn(&str, u64) -> Vec<String>,
    /// The acknowledgement expected for the last request.
    ack: &'static str,
    /// The value after, None for a miss.
    after: Option<&'static str>,
}

fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "set",
            before: "old",
            requests: |k, _| vec![format!("set {k} 0 0 3\r\nnew\r\n")],
            ack: "STORED\r\n",
            after: Some("new"),
        },
        Step {
            name: "delete",
            before: "old",
            requests: |k, _| vec![format!("delete {k}\r\n")],
            ack: "DELETED\r\n",
            after: None,
        },
        Step {
            name: "cas",
            before: "old",
            requests: |k, cas| vec![format!("cas {k} 0 0 3 {cas}\r\nnew\r\n")],
            ack: "STORED\r\n",
            after: Some("new"),
        },
        Step {
            name: "incr",
            before: "41",
            requests: |k, _| vec![format!("incr {k} 1\r\n")],
            ack: "42\r\n",
            after: Some("42"),
        },
        Step {
            name: "append",
            before: "old",
            requests: |k, _| vec![format!("append {k} 0 0 3\r\nnew\r\n")],
            ack: "STORED\r\n",
            after: Some("oldnew"),
        },
        Step {
            name: "touch into the past",
            before: "old",
            requests: |k, _| vec![format!("touch {k} -1\r\n")],
            ack: "TOUCHED\r\n",
            after: None,
        },
        Step {
            name: "ms",
            before: "old",
            requests: |k, _| vec![format!("ms {k} 3\r\nnew\r\n")],
            ack: "HD\r\n",
            after: Some("new"),
        },
        Step {
            name: "md",
            before: "old",
            requests: |k, _| vec![format!("md {k}\r\n")],
            ack: "HD\r\n",
            after: None,
        },
        Step {
            name: "flush_all",
            before: "old",
            requests: |_, _| vec!["flush_all\r\n".to_string()],
            ack: "OK\r\n",
            after: None,
        },
    ]
}

/// Runs every step with a different writer each time; returns the stale
/// reads seen (step, reader, answer).
async fn run_steps(sidecars: &[Sidecar]) -> Vec<String> {
    let mut stale = Vec::new();
    for (i, step) in steps().iter().enumerate() {
        let key = format!("step{i}");
        let writer = &sidecars[i % sidecars.len()];
        let mut w = writer.client().await;
        let before = step.before;
        let set = format!("set {key} 0 0 {}\r\n{before}\r\n", before.len());
        assert_eq!(w.call(set.as_bytes()).await, "STORED\r\n");
        // Everyone reads it twice: the second read is from memory.
        for s in sidecars {
            for _ in 0..2 {
                assert_eq!(get(s, &key).await, value(&key, before), "{}", step.name);
            }
        }
        let gets = w.call(format!("gets {key}\r\n").as_bytes()).await;
        let cas: u64 = gets
            .split_whitespace()
            .nth(4)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{gets}"));
        let requests = (step.requests)(&key, cas);
        let mut ack = String::new();
        for r in &requests {
            ack = w.call(r.as_bytes()).await;
        }
        assert_eq!(ack, step.ack, "{}", step.name);
        // At once, on every sidecar.
        let expected = match step.after {
            Some(data) => value(&key, data),
            None => "END\r\n".to_string(),
        };
        for (n, s) in sidecars.iter().enumerate() {
            let got = get(s, &key).await;
            if got != expected {
                stale.push(format!("{}: sidecar {n} answered {got:?}", step.name));
            }
        }
    }
    stale
}

/// The tests here time leases: one at a time, so they do not starve each
/// other of the machine's two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_seen_at_once_by_every_sidecar() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;

    // Without fleet mode the same steps read stale values: the check can fail.
    let alone = Setup::new(&db, false).await;
    let pair = [alone.spawn(), alone.spawn()];
    for s in &pair {
        s.ready().await;
    }
    let stale = run_steps(&pair).await;
    assert!(
        stale.len() >= 5,
        "without fleet mode most steps read stale: {stale:?}"
    );
    drop(pair);

    let setup = Setup::new(&db, true).await;
    let sidecars = fleet_of(&setup, 3).await;
    let hits: Vec<u64> = futures(sidecars.iter().map(|s| s.get_hits())).await;
    let stale = run_steps(&sidecars).await;
    assert!(stale.is_empty(), "stale reads in fleet mode: {stale:?}");
    // And memory was in play: every sidecar served the second reads.
    let after: Vec<u64> = futures(sidecars.iter().map(|s| s.get_hits())).await;
    for (n, (b, a)) in hits.iter().zip(&after).enumerate() {
        assert!(
            a - b >= steps().len() as u64,
            "sidecar {n} served {} hits",
            a - b
        );
    }
}

/// Awaits futures one after another (the sidecars are independent).
async fn futures<T>(fs: impl Iterator<Item = impl std::future::Future<Output = T>>) -> Vec<T> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}

// ---- a history of concurrent clients, under faults ------------------------

/// One operation of a history: what it did, what it answered, and when it
/// began and ended.
#[derive(Clone, Debug)]
struct Event {
    key: usize,
    /// Which sidecar answered it.
    sidecar: usize,
    kind: Kind,
    start: Instant,
    end: Instant,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    /// A write of `value` (None: a delete); `acked` false for SERVER_ERROR
    /// (it may take effect at any time, or never).
    Write { value: Option<String>, acked: bool },
    /// A read that answered `value` (None: a miss).
    Read { value: Option<String> },
}

/// The stale reads of a history of single-key registers whose writes each
/// write a distinct value: a read is stale if every write it could have
/// read from had been overwritten, before the read began, by a write
/// acknowledged before the read began. A read of a value no write wrote,
/// or of a write that began after the read ended, is wrong too. `history`
/// holds, for each key, an initial acknowledged delete before everything.
fn stale_reads(history: &[Event]) -> Vec<String> {
    let writes: Vec<&Event> = history
        .iter()
        .filter(|e| matches!(e.kind, Kind::Write { .. }))
        .collect();
    let mut found = Vec::new();
    for read in history {
        let Kind::Read { value } = &read.kind else {
            continue;
        };
        let sources: Vec<&&Event> = writes
            .iter()
            .filter(|w| w.key == read.key)
            .filter(|w| matches!(&w.kind, Kind::Write { value: v, .. } if v == value))
            .filter(|w| w.start <= read.end)
            .collect();
        let current = sources.iter().any(|w| {
            let Kind::Write { acked, .. } = w.kind else {
                unreachable!()
            };
            // Its effect ended when a later write, begun after it was
            // acknowledged, was itself acknowledged before the read began.
            // A write of unknown outcome may take effect at any time.
            !acked
                || !writes.iter().any(|later| {
                    later.key == read.key
                        && matches!(later.kind, Kind::Write { acked: true, .. })
                        && later.start > w.end
                        && later.end < read.start
                })
        });
        if !current {
            let t0 = history[0].start;
            let span = |e: &Event| {
                format!(
                    "{:?}..{:?} on sidecar {}",
                    e.start - t0,
                    e.end - t0,
                    e.sidecar
                )
            };
            let writes: Vec<String> = writes
                .iter()
                .filter(|w| w.key == read.key)
                .map(|w| format!("{:?} {}", w.kind, span(w)))
                .collect();
            found.push(format!(
                "key {} read {value:?} {}; writes of the key: {writes:#?}",
                read.key,
                span(read)
            ));
        }
    }
    found
}

#[test]
fn the_history_check_finds_stale_reads() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let write = |v: &str, acked, s, e| Event {
        key: 0,
        sidecar: 0,
        kind: Kind::Write {
            value: Some(v.into()),
            acked,
        },
        start: at(s),
        end: at(e),
    };
    let read = |v: Option<&str>, s, e| Event {
        key: 0,
        sidecar: 0,
        kind: Kind::Read {
            value: v.map(Into::into),
        },
        start: at(s),
        end: at(e),
    };
    let initial = Event {
        key: 0,
        sidecar: 0,
        kind: Kind::Write {
            value: None,
            acked: true,
        },
        start: at(0),
        end: at(0),
    };
    let base = vec![initial, write("a", true, 10, 20), write("b", true, 30, 40)];
    let check = |r: Event| {
        let mut h = base.clone();
        h.push(r);
        stale_reads(&h).len()
    };
    assert_eq!(check(read(Some("b"), 50, 60)), 0);
    assert_eq!(check(read(Some("a"), 50, 60)), 1, "a was overwritten by b");
    assert_eq!(check(read(None, 50, 60)), 1, "a miss after b");
    assert_eq!(check(read(Some("a"), 35, 60)), 0, "b not acknowledged yet");
    assert_eq!(check(read(Some("a"), 25, 60)), 0);
    assert_eq!(check(read(None, 5, 15)), 0, "before a was acknowledged");
    assert_eq!(check(read(Some("c"), 50, 60)), 1, "never written");
    assert_eq!(
        check(read(Some("b"), 5, 25)),
        1,
        "b began after the read ended"
    );
    // A write of unknown outcome may land at any time.
    let mut h = base.clone();
    h.push(write("c", false, 1, 2));
    h.push(read(Some("c"), 50, 60));
    assert_eq!(stale_reads(&h), Vec::<String>::new());
}

/// A tiny deterministic generator for the workload (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const KEYS: usize = 4;

/// One client: random gets, sets and deletes on random sidecars until
/// `stop`; returns its history.
async fn client(id: u64, addrs: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> Vec<Event> {
    let mut conns = Vec::new();
    for addr in &addrs {
        conns.push(McClient::connect(*addr).await);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut history = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = rng.below(KEYS as u64) as usize;
        let sidecar = rng.below(addrs.len() as u64) as usize;
        let conn = &mut conns[sidecar];
        let name = format!("h{key}");
        let roll = rng.below(10);
        let start = Instant::now();
        let kind = if roll < 5 {
            let reply = conn.call(format!("get {name}\r\n").as_bytes()).await;
            if reply.starts_with("SERVER_ERROR") {
                continue;
            }
            let value = reply
                .strip_prefix("VALUE ")
                .map(|rest| rest.split("\r\n").nth(1).unwrap().to_string());
            assert!(value.is_some() || reply == "END\r\n", "{reply}");
            Kind::Read { value }
        } else if roll == 8 {
            // cas: a gets (a read), then a cas on its unique.
            let reply = conn.call(format!("gets {name}\r\n").as_bytes()).await;
            if reply.starts_with("SERVER_ERROR") {
                continue;
            }
            let Some(rest) = reply.strip_prefix("VALUE ") else {
                assert_eq!(reply, "END\r\n");
                history.push(Event {
                    key,
                    sidecar,
                    kind: Kind::Read { value: None },
                    start,
                    end: Instant::now(),
                });
                continue;
            };
            let mut lines = rest.split("\r\n");
            let unique: u64 = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(3)
                .unwrap()
                .parse()
                .unwrap();
            history.push(Event {
                key,
                sidecar,
                kind: Kind::Read {
                    value: lines.next().map(str::to_string),
                },
                start,
                end: Instant::now(),
            });
            let data = format!("c{id}n{n}");
            let start = Instant::now();
            let reply = conn
                .call(format!("cas {name} 0 0 {} {unique}\r\n{data}\r\n", data.len()).as_bytes())
                .await;
            let acked = match reply.as_str() {
                "STORED\r\n" => true,
                // Refused by DynamoDB's condition: nothing written.
                "EXISTS\r\n" | "NOT_FOUND\r\n" => continue,
                r if r.starts_with("SERVER_ERROR") => false,
                r => panic!("{r}"),
            };
            history.push(Event {
                key,
                sidecar,
                kind: Kind::Write {
                    value: Some(data),
                    acked,
                },
                start,
                end: Instant::now(),
            });
            continue;
        } else if roll < 9 {
            let data = format!("c{id}n{n}");
            let reply = conn
                .call(format!("set {name} 0 0 {}\r\n{data}\r\n", data.len()).as_bytes())
                .await;
            assert!(
                reply == "STORED\r\n" || reply.starts_with("SERVER_ERROR"),
                "{reply}"
            );
            Kind::Write {
                value: Some(data),
                acked: reply == "STORED\r\n",
            }
        } else {
            let reply = conn.call(format!("delete {name}\r\n").as_bytes()).await;
            match reply.as_str() {
                // Refused: the key was absent; a read of "absent" in effect,
                // but when is not known precisely: not recorded.
                "NOT_FOUND\r\n" => continue,
                "DELETED\r\n" => Kind::Write {
                    value: None,
                    acked: true,
                },
                r if r.starts_with("SERVER_ERROR") => Kind::Write {
                    value: None,
                    acked: false,
                },
                r => panic!("{r}"),
            }
        };
        history.push(Event {
            key,
            sidecar,
            kind,
            start,
            end: Instant::now(),
        });
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_under_faults_never_read_stale() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;
    let setup = Setup::new(&db, true).await;
    let mut sidecars = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let (sidecar, proxy) = setup.spawn_proxied().await;
        sidecars.push(sidecar);
        proxies.push(proxy);
    }
    for s in &sidecars {
        s.ready().await;
        s.coherent(WAIT).await;
    }
    let hits_before: u64 = futures(sidecars.iter().map(|s| s.get_hits()))
        .await
        .iter()
        .sum();

    let t0 = Instant::now();
    let mut history: Vec<Event> = (0..KEYS)
        .map(|key| Event {
            key,
            sidecar: 0,
            kind: Kind::Write {
                value: None,
                acked: true,
            },
            start: t0,
            end: t0,
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<SocketAddr> = sidecars.iter().map(|s| s.addr).collect();
    let clients: Vec<_> = (0..4)
        .map(|id| tokio::spawn(client(id, addrs.clone(), stop.clone())))
        .collect();

    // The faults, one after another, two seconds each, with clean spells
    // between: a peer port that swallows what it is sent, one that delays
    // it, one that resets connections, then a sidecar stopped outright.
    let spell = Duration::from_secs(2);
    tokio::time::sleep(spell).await;
    eprintln!("{:?} blackhole 2", t0.elapsed());
    proxies[2].set_fault(Fault::Blackhole);
    tokio::time::sleep(spell).await;
    proxies[2].set_fault(Fault::Pass);
    eprintln!("{:?} delay 1", t0.elapsed());
    proxies[1].set_delay(Duration::from_millis(300));
    tokio::time::sleep(spell).await;
    proxies[1].set_delay(Duration::ZERO);
    eprintln!("{:?} reset 0", t0.elapsed());
    proxies[0].set_fault(Fault::Reset);
    tokio::time::sleep(spell).await;
    proxies[0].set_fault(Fault::Pass);
    // Delayed beyond the lease: grants arrive too late to be worth anything.
    eprintln!("{:?} long delay 1", t0.elapsed());
    proxies[1].set_delay(LEASE + Duration::from_millis(500));
    tokio::time::sleep(spell).await;
    proxies[1].set_delay(Duration::ZERO);
    eprintln!("{:?} stop 2", t0.elapsed());
    let stopped = Instant::now();
    sidecars[2].signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sidecars[2].signal("-CONT");
    let resumed = Instant::now();
    eprintln!("{:?} cont 2", t0.elapsed());
    tokio::time::sleep(spell).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        history.extend(c.await.unwrap());
    }
    // Writes are answered within a lease (a peer that does not answer)
    // plus the operation timeout (DynamoDB), and a margin for the machine;
    // those sent to the stopped sidecar waited for it to resume besides.
    let bound = LEASE + Duration::from_secs(3) + Duration::from_secs(1);
    for e in &history {
        let on_stopped = e.sidecar == 2 && e.start < resumed && e.end > stopped;
        if matches!(e.kind, Kind::Write { .. }) && !on_stopped {
            assert!(
                e.end - e.start < bound,
                "a write took {:?}",
                e.end - e.start
            );
        }
    }

    let reads = history
        .iter()
        .filter(|e| matches!(e.kind, Kind::Read { .. }))
        .count();
    let acked = history
        .iter()
        .filter(|e| matches!(e.kind, Kind::Write { acked: true, .. }))
        .count();
    let stale = stale_reads(&history);
    assert!(
        stale.is_empty(),
        "{} stale reads of {reads}: {stale:#?}",
        stale.len()
    );
    assert!(reads > 100 && acked > 100, "{reads} reads, {acked} writes");
    // Memory was in play between the faults.
    let hits: u64 = futures(sidecars.iter().map(|s| s.get_hits()))
        .await
        .iter()
        .sum();
    assert!(
        hits - hits_before >= reads as u64 / 10,
        "{} of {reads} reads from memory",
        hits - hits_before
    );
    // The faults over, every sidecar serves from memory again.
    for s in &sidecars {
        s.coherent(Duration::from_secs(20)).await;
    }
    // And every sidecar answers what DynamoDB holds.
    for key in 0..KEYS {
        let name = format!("h{key}");
        let mut answers = Vec::new();
        for s in &sidecars {
            match tokio::time::timeout(Duration::from_secs(20), get(s, &name)).await {
                Ok(answer) => answers.push(answer),
                Err(_) => panic!("no answer to a get; log:\n{}", s.log_tail()),
            }
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    }
}

// ---- stopped, killed, joining and leaving members --------------------------

/// `set key` through `sidecar`: the answer and how long it took.
async fn timed_set(sidecar: &Sidecar, key: &str, data: &str) -> (String, Duration) {
    let mut c = sidecar.client().await;
    let start = Instant::now();
    let reply = c
        .call(format!("set {key} 0 0 {}\r\n{data}\r\n", data.len()).as_bytes())
        .await;
    (reply, start.elapsed())
}

/// Reads `key` twice through each sidecar (the second from memory).
async fn cache_everywhere(sidecars: &[&Sidecar], key: &str, data: &str) {
    for s in sidecars {
        for _ in 0..2 {
            assert_eq!(get(s, key).await, value(key, data));
        }
    }
}

/// The most a write waits for a peer that stopped answering: its lease
/// (plus 50 ms of slack), and a margin for a loaded machine.
const WRITE_BOUND: Duration = Duration::from_millis(LEASE.as_millis() as u64 + 1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_killed_member_delays_writes_by_at_most_a_lease() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;
    let setup = Setup::new(&db, true).await;
    let s = fleet_of(&setup, 3).await;
    let (a, b, c) = (&s[0], &s[1], &s[2]);
    assert_eq!(timed_set(a, "k", "v1").await.0, "STORED\r\n");
    cache_everywhere(&[a, b, c], "k", "v1").await;

    // Stopped: it cannot acknowledge; the write waits out its lease.
    c.signal("-STOP");
    let (reply, took) = timed_set(a, "k", "v2").await;
    assert_eq!(reply, "STORED\r\n");
    assert!(
        took < WRITE_BOUND,
        "a write waited {took:?} for a stopped peer"
    );
    assert_eq!(get(b, "k").await, value("k", "v2"));
    // Resumed: its leases ran out while it was stopped, so it reads
    // through (and never answers v1).
    c.signal("-CONT");
    assert_eq!(get(c, "k").await, value("k", "v2"));
    let timed_out = a
        .metric("dynacache_fleet_invalidations_timed_out_total")
        .await;
    assert!(
        timed_out >= 1.0,
        "the write waited for the lease, not an ack"
    );

    // Killed: writes wait at most a lease, then the survivors evict it and
    // serve from memory again.
    c.signal("-KILL");
    let (reply, took) = timed_set(b, "k", "v3").await;
    assert_eq!(reply, "STORED\r\n");
    assert!(
        took < WRITE_BOUND,
        "a write waited {took:?} for a dead peer"
    );
    assert_eq!(get(a, "k").await, value("k", "v3"));
    // Eviction after 5 silent leases, then S·(1+ε)/(1−ε)² + 0.5 s.
    let limit = Duration::from_secs(20);
    a.wait_for("an eviction", limit, || async {
        a.metric("dynacache_fleet_evictions_total").await
            + b.metric("dynacache_fleet_evictions_total").await
            >= 1.0
    })
    .await;
    a.coherent(limit).await;
    b.coherent(limit).await;
    let hits = b.get_hits().await;
    cache_everywhere(&[a, b], "k", "v3").await;
    assert!(b.get_hits().await > hits, "b serves from memory again");
    let (reply, took) = timed_set(a, "k", "v4").await;
    assert_eq!(reply, "STORED\r\n");
    assert!(took < LEASE / 2, "with the dead member evicted, {took:?}");
    assert_eq!(get(b, "k").await, value("k", "v4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_without_a_stale_read_or_a_wait() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;
    let setup = Setup::new(&db, true).await;
    let mut s = fleet_of(&setup, 2).await;
    assert_eq!(timed_set(&s[0], "k", "v1").await.0, "STORED\r\n");
    cache_everywhere(&[&s[0], &s[1]], "k", "v1").await;
    let regained: Vec<f64> = futures(
        s.iter()
            .map(|x| x.metric("dynacache_fleet_coherence_regained_total")),
    )
    .await;

    // A third joins: once ready, its writes reach the others' memory...
    let c = setup.spawn();
    c.ready().await;
    assert_eq!(timed_set(&c, "k", "v2").await.0, "STORED\r\n");
    for x in &s {
        assert_eq!(get(x, "k").await, value("k", "v2"));
    }
    // ...and theirs reach its memory.
    c.coherent(WAIT).await;
    cache_everywhere(&[&s[0], &s[1], &c], "k", "v2").await;
    assert_eq!(timed_set(&s[0], "k", "v3").await.0, "STORED\r\n");
    assert_eq!(get(&c, "k").await, value("k", "v3"));
    assert_eq!(get(&s[1], "k").await, value("k", "v3"));
    // Nobody emptied its cache for the newcomer.
    for (x, before) in s.iter().zip(&regained) {
        assert_eq!(
            x.metric("dynacache_fleet_coherence_regained_total").await,
            *before
        );
    }

    // One leaves (SIGTERM): it says so, and writes do not wait for it.
    s[1].terminate();
    cache_everywhere(&[&s[0], &c], "k", "v3").await;
    let (reply, took) = timed_set(&c, "k", "v4").await;
    assert_eq!(reply, "STORED\r\n");
    assert!(
        took < LEASE / 2,
        "a write waited {took:?} for a member that left"
    );
    assert_eq!(get(&s[0], "k").await, value("k", "v4"));
    assert_eq!(
        c.metric("dynacache_fleet_invalidations_timed_out_total")
            .await,
        0.0
    );
    s[0].coherent(Duration::from_secs(5)).await;
    // Nobody emptied its cache for the member that left either.
    assert_eq!(
        s[0].metric("dynacache_fleet_coherence_regained_total")
            .await,
        regained[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_and_garbage_are_refused() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;
    let setup = Setup::new(&db, true).await;
    let s = fleet_of(&setup, 2).await;

    // Garbage on a peer port: the connection is dropped, nothing changes.
    let mut junk = tokio::net::TcpStream::connect(("127.0.0.1", s[0].peer_port))
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut bytes = vec![0u8; 4096];
        let mut rng = Rng(7);
        bytes.iter_mut().for_each(|b| *b = rng.below(256) as u8);
        bytes[..2].copy_from_slice(&[0, 32]);
        junk.write_all(&bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, junk.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the peer port hangs up on garbage"
        );
    }

    // A sidecar with another secret registers in the table, but no member
    // talks to it: it never serves from memory nor acknowledges a write,
    // and the members evict it.
    let intruder = Setup {
        secret: "not the fleet's secret, though long".into(),
        ..setup.clone()
    }
    .spawn();
    let limit = Duration::from_secs(20);
    s[0].wait_for("the intruder evicted", limit, || async {
        s[0].metric("dynacache_fleet_evictions_total").await
            + s[1].metric("dynacache_fleet_evictions_total").await
            >= 1.0
    })
    .await;
    assert!(matches!(intruder.http("/readyz").await, Some((503, _))));
    let (reply, _) = timed_set(&intruder, "k", "intruder").await;
    assert_eq!(reply, "SERVER_ERROR fleet membership unknown\r\n");
    assert_eq!(intruder.metric("dynacache_fleet_coherent").await, 0.0);
    assert_eq!(
        intruder.metric("dynacache_fleet_evictions_total").await,
        0.0,
        "a member no peer counts evicts nobody"
    );
    assert_eq!(
        intruder
            .metric("dynacache_fleet_leases_granted_total")
            .await,
        0.0
    );

    // The members carry on, coherent.
    for x in &s {
        x.coherent(Duration::from_secs(5)).await;
    }
    assert_eq!(timed_set(&s[0], "k", "v1").await.0, "STORED\r\n");
    cache_everywhere(&[&s[0], &s[1]], "k", "v1").await;
    assert_eq!(timed_set(&s[1], "k", "v2").await.0, "STORED\r\n");
    assert_eq!(get(&s[0], "k").await, value("k", "v2"));
    // Reads through the intruder go to DynamoDB.
    assert_eq!(get(&intruder, "k").await, value("k", "v2"));
}

/// Keys of a local prefix live in each sidecar's memory only, but in fleet
/// mode a write through one removes every other's copy before it is
/// answered, as for durable keys: a delete through A is a miss on B at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_keys_are_invalidated_fleet_wide() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;
    let mut setup = Setup::new(&db, true).await;
    setup.config = Some("[[prefix]]\nprefix = \"page:\"\npolicy = \"local\"\n".into());
    let sidecars = fleet_of(&setup, 2).await;
    let (a, b) = (&sidecars[0], &sidecars[1]);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // Each renders and caches the page on its own.
    assert_eq!(
        ca.call(b"set page:home 0 0 2\r\nv1\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(
        cb.call(b"set page:home 0 0 2\r\nv2\r\n").await,
        "STORED\r\n"
    );
    // B's write removed A's copy: A misses rather than serve v1.
    assert_eq!(ca.call(b"get page:home\r\n").await, "END\r\n");
    assert_eq!(
        cb.call(b"get page:home\r\n").await,
        "VALUE page:home 0 2\r\nv2\r\nEND\r\n"
    );
    // A delete through A removes B's copy.
    assert_eq!(
        ca.call(b"set page:home 0 0 2\r\nv3\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(cb.call(b"get page:home\r\n").await, "END\r\n");
    assert_eq!(
        cb.call(b"set page:home 0 0 2\r\nv4\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(ca.call(b"delete page:home\r\n").await, "NOT_FOUND\r\n");
    assert_eq!(
        cb.call(b"get page:home\r\n").await,
        "VALUE page:home 0 2\r\nv4\r\nEND\r\n"
    );
    assert_eq!(cb.call(b"delete page:home\r\n").await, "DELETED\r\n");
    assert_eq!(cb.call(b"get page:home\r\n").await, "END\r\n");
    assert_eq!(
        ca.call(b"set page:home 0 0 2\r\nv5\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(
        cb.call(b"set page:home 0 0 2\r\nv6\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(
        ca.call(b"get page:home\r\n").await,
        "END\r\n",
        "v5 went with B's write"
    );
    assert_eq!(
        ca.call(b"set page:home 0 0 2\r\nv7\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(
        cb.call(b"delete page:home\r\n").await,
        "NOT_FOUND\r\n",
        "v6 went with A's write"
    );
    assert_eq!(
        ca.call(b"get page:home\r\n").await,
        "VALUE page:home 0 2\r\nv7\r\nEND\r\n"
    );
    // Nothing of it ever reached DynamoDB.
    let item = common::table_item(
        &db.client(),
        &dynacache::store::DynamoSettings {
            table: setup.table.clone(),
            ..Default::default()
        },
        "page:home",
    )
    .await;
    assert!(item.is_none(), "a local key in the table: {item:?}");
    for s in [a, b] {
        assert!(s.metric("dynacache_fleet_invalidations_sent_total").await >= 3.0);
    }
}

/// A key one member found absent (and remembers as absent, for up to the
/// hour of `max_local_age` these sidecars run with) is seen at once when
/// another member creates it: the invalidation removes the negative entry
/// as it removes a copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_absence_is_invalidated_like_a_value() {
    let _serial = SERIAL.lock().await;
    let db = DynamoLocal::shared().await;
    let setup = Setup::new(&db, true).await;
    let sidecars = fleet_of(&setup, 2).await;
    let (a, b) = (&sidecars[0], &sidecars[1]);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for _ in 0..3 {
        assert_eq!(ca.call(b"get fresh-session\r\n").await, "END\r\n");
    }
    let negative = a.metric("dynacache_cache_negative_hits_total").await;
    assert!(negative >= 2.0, "A remembers the absence: {negative}");
    assert_eq!(
        cb.call(b"add fresh-session 0 0 2\r\nok\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(
        ca.call(b"get fresh-session\r\n").await,
        "VALUE fresh-session 0 2\r\nok\r\nEND\r\n"
    );
    // And a delete through B makes A's copy a miss at once, remembered again.
    assert_eq!(cb.call(b"delete fresh-session\r\n").await, "DELETED\r\n");
    assert_eq!(ca.call(b"get fresh-session\r\n").await, "END\r\n");
}
