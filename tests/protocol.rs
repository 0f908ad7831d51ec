//! The memcached protocol beyond the basics: conformance with Debian's
//! memcached 1.6 on the same bytes (compared live), and the commands that
//! read-modify-write staying atomic across sidecars sharing one table.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{DynamoLocal, McClient, TestServer, WAIT, free_port};
use dynacache::engine::EngineOptions;
use dynacache::store::DynamoSettings;

/// Debian's memcached on a loopback port, stopped on drop.
struct Memcached {
    addr: SocketAddr,
    child: Child,
}

impl Memcached {
    async fn start() -> Memcached {
        let port = free_port();
        let child = Command::new("memcached")
            // -u is needed when running as root (CI) and ignored otherwise.
            .args([
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "0",
                "-u",
                "root",
                "-m",
                "64",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("memcached is installed (scripts/test.sh installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "memcached never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Memcached { addr, child }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `request` on a fresh connection and reads everything that comes
/// back until the server has been quiet for a moment (or closed).
async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    // Then a marker request whose answer ends the exchange.
    s.write_all(b"\r\nmn\r\n").await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + WAIT;
    while !out.ends_with(b"MN\r\n") {
        assert!(
            Instant::now() < deadline,
            "no end to {:?}",
            String::from_utf8_lossy(request)
        );
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// Replaces the cas uniques of `VALUE` lines and of meta replies' `c`
/// return flags (they differ by design; `c0`, a failed `ms`, stays).
fn without_cas(reply: &[u8]) -> String {
    const META: [&str; 6] = ["VA", "HD", "EN", "NS", "EX", "NF"];
    String::from_utf8_lossy(reply)
        .split("\r\n")
        .map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() == 5 && parts[0] == "VALUE" {
                format!("{} {} {} {} <cas>", parts[0], parts[1], parts[2], parts[3])
            } else if META.contains(&parts[0]) {
                parts
                    .iter()
                    .map(|p| match p.strip_prefix('c') {
                        Some(n) if n != "0" && n.bytes().all(|b| b.is_ascii_digit()) => "c<cas>",
                        _ => p,
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_bytes_as_memcached() {
    let memcached = Memcached::start().await;
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings).await;
    let long_key = "k".repeat(251);
    let big = vec![b'x'; 2 << 20];
    // Each case uses keys of its own; cases run in order on both servers.
    let cases: Vec<Vec<u8>> = vec![
        // framing and errors
        b"\r\n".to_vec(),
        b"bogus\r\n".to_vec(),
        b"GET a\r\n".to_vec(),
        b"get\r\n".to_vec(),
        format!("get a {long_key}\r\n").into_bytes(),
        format!("set {long_key} 0 0 1\r\nx\r\n").into_bytes(),
        b"set c1 0 0 3\r\nxyzab\r\n".to_vec(),
        b"set c2 0 0 3 noreply\r\nxyzab\r\n".to_vec(),
        b"set c3 0 abc 1\r\nx\r\n".to_vec(),
        b"set c4 -1 0 1\r\nx\r\n".to_vec(),
        b"set c5 0 0 -1\r\n".to_vec(),
        b"set c6 0 0 1 noreply extra\r\nx\r\n".to_vec(),
        b"set c7 0 0 1 garbage\r\nx\r\nget c7\r\n".to_vec(),
        b"set  c8  5  0  1\r\nx\r\nget c8 c8\r\n".to_vec(),
        b"set c9 0 0 0\r\n\r\nget c9\r\n".to_vec(),
        b"get a\n".to_vec(),
        [&b"set big 0 0 2097152\r\n"[..], &big, b"\r\nget big\r\n"].concat(),
        [&b"set big2 0 0 1\r\nx\r\nset big2 0 0 2097152 noreply\r\n"[..], &big, b"\r\nget big2\r\n"].concat(),
        // storage commands
        b"set s1 4294967295 0 2\r\nhi\r\nget s1\r\ngets s1\r\n".to_vec(),
        b"set s1a 4294967296 0 1\r\nx\r\nget s1a\r\nset s1b 18446744073709551615 0 1\r\nx\r\nget s1b\r\nset s1c 18446744073709551616 0 1\r\nx\r\n".to_vec(),
        b"add s2 0 0 1\r\na\r\nadd s2 0 0 1\r\nb\r\nget s2\r\n".to_vec(),
        b"replace s3 0 0 1\r\nx\r\nset s3 1 0 1\r\nx\r\nreplace s3 2 0 1\r\ny\r\nget s3\r\n".to_vec(),
        b"append s4 0 0 1\r\nx\r\nprepend s4 0 0 1\r\nx\r\nset s4 5 0 1\r\nb\r\nappend s4 9 0 1\r\nc\r\nprepend s4 9 0 1\r\na\r\nget s4\r\n".to_vec(),
        b"set s5 0 -1 1\r\nx\r\nget s5\r\nadd s5 0 0 1\r\ny\r\nget s5\r\n".to_vec(),
        b"cas s6 0 0 1 1\r\nx\r\nset s6 0 0 1\r\nx\r\ncas s6 0 0 1 1\r\ny\r\ncas s6 0 0 1\r\ny\r\ncas s6 0 0 1 abc\r\ny\r\n".to_vec(),
        b"set s7 0 0 1 noreply\r\nx\r\nget s7\r\n".to_vec(),
        // delete, touch, gat
        b"delete d1\r\nset d1 0 0 1\r\nx\r\ndelete d1 0\r\ndelete d1\r\ndelete d1 1\r\ndelete d1 1 noreply\r\ndelete d1 noreply\r\ndelete\r\ndelete d1 b c d\r\n".to_vec(),
        b"touch t1 10\r\nset t1 0 0 1\r\nx\r\ntouch t1 10\r\ntouch t1 abc\r\ntouch t1 10 20 30\r\ntouch t1 -1\r\nget t1\r\n".to_vec(),
        b"set g1 3 0 1\r\nx\r\ngat 100 g1 g2\r\ngat\r\ngat 100\r\ngat abc g1\r\ngats 0 g1\r\n".to_vec(),
        // exptime is read as a 64-bit number and kept in 32 bits, as memcached does
        b"set e1 0 2147483648 1\r\nx\r\nget e1\r\n".to_vec(),
        b"set e2 0 4294967295 1\r\nx\r\nget e2\r\n".to_vec(),
        b"set e3 0 4294967296 1\r\nx\r\nget e3\r\nmg e3 t\r\n".to_vec(),
        b"set e4 0 4294967396 1\r\nx\r\nget e4\r\nmg e4 t\r\n".to_vec(),
        b"set e5 0 9999999999 1\r\nx\r\nget e5\r\n".to_vec(),
        b"set e6 0 -2147483649 1\r\nx\r\nget e6\r\ngat 4294967396 e6\r\nmg e6 t\r\n".to_vec(),
        b"set e7 0 99999999999999999999 1\r\nx\r\nget e7\r\n".to_vec(),
        b"set e8 0 0 1\r\nx\r\ntouch e8 4294967295\r\nget e8\r\ntouch e8 99999999999999999999\r\n".to_vec(),
        b"add e9 0 4294967295 1\r\nx\r\nadd e9 0 0 1\r\ny\r\nget e9\r\nreplace e9 0 4294967295 1\r\nz\r\nget e9\r\n".to_vec(),
        b"set e10 0 0 1\r\n5\r\ncas e10 0 4294967295 1 1\r\nx\r\nincr e10 1\r\n".to_vec(),
        b"ms e11 1 T4294967295\r\nx\r\nmg e11 v\r\nms e12 1 T4294967396\r\nx\r\nmg e12 t v\r\nmg e12 T4294967296 v\r\nmg e12 t\r\n".to_vec(),
        b"mg e13 N4294967396 t v\r\nmg e14 t v T99999999999999999999\r\n".to_vec(),
        // a negative exptime on gat, touch and mg T answers the item, then it is gone
        b"set e15 0 0 1\r\nv\r\ngat -1 e15\r\nget e15\r\n".to_vec(),
        b"set e16 7 0 1\r\nv\r\ngats -1 e16\r\ngets e16\r\n".to_vec(),
        b"set e17 0 0 1\r\nv\r\ntouch e17 -1\r\nget e17\r\n".to_vec(),
        b"set e18 0 0 1\r\nv\r\nmg e18 v t T-1\r\nmg e18 v\r\n".to_vec(),
        b"set e19 0 100 1\r\nv\r\ngat 4294967295 e19\r\nget e19\r\n".to_vec(),
        // incr, decr
        b"incr n1 1\r\nset n1 0 0 2\r\n10\r\nincr n1 5\r\ndecr n1 100\r\nget n1\r\nincr n1 18446744073709551615\r\n".to_vec(),
        b"set n2 0 0 20\r\n18446744073709551615\r\nincr n2 1\r\nget n2\r\n".to_vec(),
        b"set n3 0 0 2\r\nab\r\nincr n3 1\r\nincr n3 abc\r\nincr n3 -1\r\nincr n3\r\n".to_vec(),
        b"set n4 0 0 1\r\n9\r\nincr n4 1\r\nget n4\r\ndecr n4 1 noreply\r\nget n4\r\n".to_vec(),
        b"set n5 0 0 4\r\n 12 \r\nincr n5 1\r\nincr n5 99999999999999999999\r\n".to_vec(),
        // meta commands
        b"mg m1 v\r\nmg m1\r\nmg m1 k O9 q\r\nmg m1 k O9 v c\r\n".to_vec(),
        b"ms m2 2 T0 F5\r\nhi\r\nmg m2 v f s k c t O123 q\r\nmg m2\r\nmg m2 q\r\nmg m2 s q k\r\nmg m2 O\r\n".to_vec(),
        b"mg m3 v v\r\nmg m3 x\r\nmg m3 noreply\r\nmg m3 T\r\nmg m3 Tabc\r\nmg m3 Nabc\r\nmg m3 E5\r\nmg\r\nmg m3 O1 v O2\r\nmg m3 O123456789012345678901234567890123456789\r\n".to_vec(),
        format!("mg {long_key} v\r\nms {long_key} 2\r\nhi\r\nmd {long_key}\r\nma {long_key}\r\n").into_bytes(),
        b"ms m4 2 c k O1 T100 F3\r\nhi\r\nmg m4 t f s v\r\nms m4 2 q\r\nhi\r\nms m4 2 k s f t v h\r\nho\r\nmg m4 v\r\n".to_vec(),
        b"ms m5\r\nms m5 abc\r\nhi\r\nms m5 -1\r\nms m5 2 x\r\nhi\r\nms m5 3\r\nabcde\r\nms m5 3 x\r\nabcde\r\nms\r\n".to_vec(),
        b"ms m6 2 T\r\nhi\r\nms m6 2 Fabc\r\nhi\r\nms m6 2 F-1\r\nhi\r\nms m6 2 C\r\nhi\r\nms m6 2 S2\r\nhi\r\nms m6 2 T1 T2\r\nhi\r\nms m6 2 MX\r\nhi\r\nms m6 2 Ms\r\nhi\r\nms m6 2 M\r\nhi\r\nms m6 2 MSS\r\nhi\r\nms m6 2 E1\r\nhi\r\n".to_vec(),
        b"ms m7 2 ME\r\nhi\r\nms m7 2 ME k O1 c\r\nho\r\nmg m7 v\r\nms m7 1 MA\r\nx\r\nms m7 1 MP\r\ny\r\nmg m7 v\r\nms m7 2 MR\r\nzz\r\nmg m7 v\r\n".to_vec(),
        b"ms m8 2 MR O1 c k\r\nzz\r\nms m8 2 MA\r\nzz\r\nms m8 2 MP N100\r\nzz\r\nmg m8 v\r\nms m8 2 C1\r\nhi\r\nms m8 2 MS\r\nhi\r\nms m8 2 C1 c k O1\r\nhi\r\nms m8 2 C1 q\r\nhi\r\nms m8 2 ME q\r\nhi\r\n".to_vec(),
        b"ms m9 2 F4294967296\r\nhi\r\nmg m9 f\r\nms m9 2 F4294967295\r\nhi\r\nmg m9 f\r\nms m9 2 T-1\r\nhi\r\nmg m9 v\r\nms m9  02   O\r\nhi\r\nms m9 0\r\n\r\nmg m9 v s\r\n".to_vec(),
        b"ms bTEw 2 b k c\r\nhi\r\nmg bTEw b k v\r\nmg m10 v\r\nmg !!! b v\r\nms m10 2 b\r\nhi\r\nmd bTEw b k\r\nmd m10 b\r\n".to_vec(),
        b"md d1\r\nmd d1 q\r\nms d1 1\r\nx\r\nmd d1 k O5 c\r\nms d1 1\r\nx\r\nmd d1 q k\r\nmg d1 v\r\nmd d1 C1 O1 k\r\nms d1 1\r\nx\r\nmd d1 C1\r\nmd d1 q C1\r\nmg d1 v\r\n".to_vec(),
        b"md d2 x\r\nmd d2 E5\r\nmd d2 T\r\nmd d2 v\r\nmd d2 s\r\nmd\r\n".to_vec(),
        b"ma a1\r\nma a1 q\r\nma a1 O1 k t c v\r\nma a1 N0 J10\r\nma a1 v\r\nma a1 MD D3 v\r\nma a1 t v k O2\r\nma a1 M- v\r\nma a1 M+ v\r\nma a1 MI v\r\nma a1 q v\r\nma a1 q\r\nmg a1 v\r\n".to_vec(),
        b"ma a2 Md v\r\nma a2 Mi\r\nma a2 M v\r\nma a2 D v\r\nma a2 Dabc\r\nma a2 D-1\r\nma a2 x\r\nma a2 E99\r\nma a2 N0 Jx\r\nma\r\n".to_vec(),
        b"ma a3 q N0 v\r\nma a4 q N0\r\nma a5 N100 J5 v t\r\nma a5 N100 J5 v t\r\nma a6 J5 v\r\nma a5 s f v\r\nma a5 T50 t v\r\nma a5 C1 v\r\n".to_vec(),
        b"ms a7 2\r\nab\r\nma a7\r\nma a7 q\r\nms a8 2\r\n10\r\nma a8 MD D9 v\r\nmg a8 v s\r\nma a8 MD D9 v\r\nma a9 N0 J18446744073709551615 v\r\nma a9 v\r\n".to_vec(),
        b"me\r\nme nope\r\nme bm9wZQ== b\r\nme nope v\r\n".to_vec(),
        // (after a W, memcached answers Z to the others: not kept, see the README)
        b"mg v1 N30 v c t s\r\nmg v2 N30 T10 t\r\nmg v3 N30 q k\r\nmg v4 N0 q\r\n".to_vec(),
        b"ma v7 N100 T5 J1 t v\r\nma v7 N100 T5 J1 t v\r\nma v8 N100 J1 t v\r\nmg v9 N100 k s f t O1 v\r\n".to_vec(),
        b"ms v5 2 T10\r\nhi\r\nmg v5 T30 t v\r\nmg v5 t\r\nmg v5 T0 t\r\nmg v6 T30 v\r\nmg v6 T30 q v\r\n".to_vec(),
        [&b"ms big3 1\r\nx\r\nms big3 2097152 T0\r\n"[..], &big, b"\r\nmg big3 v\r\nms big4 2097152 q\r\n", &big, b"\r\nmg big4 v\r\n"].concat(),
        // operator commands
        b"verbosity 1\r\nverbosity 1 noreply\r\nverbosity a\r\nverbosity\r\nverbosity 1 2 3\r\n".to_vec(),
        b"flush_all abc\r\nflush_all 1 2 3\r\n".to_vec(),
        b"cache_memlimit 100\r\ncache_memlimit abc\r\ncache_memlimit 1\r\ncache_memlimit 100 noreply\r\n".to_vec(),
        // (stats cachedump lists whichever items each server holds: not compared)
        b"stats bogus\r\nstats sizes\r\nstats detail on\r\nstats detail dump\r\nstats reset\r\n".to_vec(),
        b"shutdown\r\n".to_vec(),
        // flush last: it empties both
        b"set f1 0 0 1\r\nx\r\nflush_all\r\nget f1\r\nset f1 0 0 1\r\ny\r\nget f1\r\nflush_all noreply\r\nflush_all 0\r\nget f1\r\n".to_vec(),
        b"set f2 0 0 1\r\nx\r\nflush_all 4294967296\r\nget f2\r\nflush_all 99999999999999999999\r\n".to_vec(),
    ];
    let mut differences = Vec::new();
    for case in &cases {
        let theirs = without_cas(&exchange(memcached.addr, case).await);
        let ours = without_cas(&exchange(server.addr, case).await);
        if !same_but_a_second(&theirs, &ours) {
            differences.push(format!(
                "request {:?}\n  memcached: {theirs:?}\n  dynacache: {ours:?}",
                String::from_utf8_lossy(&case[..case.len().min(120)])
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Whether two replies are the same, but for a meta `t` (seconds left)
/// one apart: each server reads its clock when it answers, and a DynamoDB
/// round trip can cross a second that memcached's answer did not.
fn same_but_a_second(theirs: &str, ours: &str) -> bool {
    let split =
        |s: &str| -> Vec<String> { s.split([' ', '\r', '\n']).map(str::to_string).collect() };
    let (a, b) = (split(theirs), split(ours));
    a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| {
            x == y
                || match (
                    x.strip_prefix('t').and_then(|n| n.parse::<i64>().ok()),
                    y.strip_prefix('t').and_then(|n| n.parse::<i64>().ok()),
                ) {
                    (Some(p), Some(q)) => (p - q).abs() <= 1,
                    _ => false,
                }
        })
}

#[test]
fn replies_a_second_apart_are_the_same() {
    assert!(same_but_a_second("VA 1 t100\r\n5\r\n", "VA 1 t99\r\n5\r\n"));
    assert!(!same_but_a_second(
        "VA 1 t100\r\n5\r\n",
        "VA 1 t98\r\n5\r\n"
    ));
    assert!(!same_but_a_second(
        "VA 1 t100\r\n5\r\n",
        "VA 1 t100\r\n6\r\n"
    ));
    assert!(!same_but_a_second("HD t100\r\n", "HD t100 f1\r\n"));
}

/// Two sidecars on one table, `conns` connections each.
async fn fleet(db: &DynamoLocal, conns: usize) -> (Vec<TestServer>, Vec<McClient>, DynamoSettings) {
    let settings = db.new_table().await;
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let server = TestServer::start(settings.clone()).await;
        for _ in 0..conns {
            clients.push(server.client().await);
        }
        servers.push(server);
    }
    (servers, clients, settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_from_two_sidecars_add_up() {
    let db = DynamoLocal::shared().await;
    let (_servers, mut clients, settings) = fleet(&db, 4).await;
    assert_eq!(
        clients[0].call(b"set counter 0 0 1\r\n0\r\n").await,
        "STORED\r\n"
    );
    let per_client = 25;
    let tasks: Vec<_> = clients
        .drain(..)
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..per_client {
                    let reply = c.call(b"incr counter 1\r\n").await;
                    seen.push(
                        reply
                            .trim_end()
                            .parse::<u64>()
                            .unwrap_or_else(|_| panic!("{reply:?}")),
                    );
                }
                seen
            })
        })
        .collect();
    let mut all = BTreeSet::new();
    for t in tasks {
        for n in t.await.unwrap() {
            assert!(all.insert(n), "two increments answered {n}");
        }
    }
    let total = 8 * per_client as u64;
    assert_eq!(
        all,
        (1..=total).collect(),
        "a serial order: every value once"
    );
    let item = common::table_item(&db.client(), &settings, "counter")
        .await
        .unwrap();
    assert_eq!(
        item["value"].as_b().unwrap().as_ref(),
        total.to_string().as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_sidecars_are_all_kept() {
    let db = DynamoLocal::shared().await;
    let (_servers, mut clients, settings) = fleet(&db, 3).await;
    assert_eq!(
        clients[0].call(b"set log 0 0 1\r\n|\r\n").await,
        "STORED\r\n"
    );
    let tasks: Vec<_> = clients
        .drain(..)
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                for j in 0..15 {
                    let token = format!("{i:02}{j:02}|");
                    let req = format!("append log 0 0 {}\r\n{token}\r\n", token.len());
                    assert_eq!(c.call(req.as_bytes()).await, "STORED\r\n");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // The table is the truth (a sidecar may serve its copy for max_local_age).
    let item = common::table_item(&db.client(), &settings, "log")
        .await
        .unwrap();
    let value = String::from_utf8(item["value"].as_b().unwrap().as_ref().to_vec()).unwrap();
    for i in 0..6 {
        for j in 0..15 {
            assert_eq!(
                value.matches(&format!("|{i:02}{j:02}|")).count(),
                1,
                "token {i:02}{j:02} in {value}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_cas_from_two_sidecars_has_one_winner_per_round() {
    let db = DynamoLocal::shared().await;
    let (_servers, mut clients, _) = fleet(&db, 1).await;
    assert_eq!(
        clients[0].call(b"set doc 0 0 1\r\n0\r\n").await,
        "STORED\r\n"
    );
    let mut b = clients.pop().unwrap();
    let mut a = clients.pop().unwrap();
    for round in 0..10 {
        // Both read the same version, then both try to replace it.
        let unique = |reply: String| {
            reply
                .lines()
                .next()
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let ua = unique(a.call(b"gets doc\r\n").await);
        let ub = unique(b.call(b"gets doc\r\n").await);
        assert_eq!(ua, ub, "round {round}: both sidecars see one version");
        let ra = format!("cas doc 0 0 1 {ua}\r\na\r\n");
        let rb = format!("cas doc 0 0 1 {ub}\r\nb\r\n");
        let (ra, rb) = tokio::join!(a.call(ra.as_bytes()), b.call(rb.as_bytes()));
        let mut replies = [ra, rb];
        replies.sort();
        assert_eq!(
            replies,
            ["EXISTS\r\n".to_string(), "STORED\r\n".to_string()],
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_all_reaches_every_sidecar() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let bound = Duration::from_millis(500);
    let options = EngineOptions {
        max_local_age: bound,
        ..EngineOptions::default()
    };
    let a = TestServer::start_custom(settings.clone(), 64 << 20, options.clone(), None).await;
    // The marker is read every max(max_local_age, 1 s).
    let poll = options.flush_poll_period();
    assert_eq!(poll, Duration::from_secs(1));
    let b = TestServer::start_custom(settings.clone(), 64 << 20, options, None).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    assert_eq!(ca.call(b"set old 0 0 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(
        cb.call(b"get old\r\n").await,
        "VALUE old 0 1\r\nx\r\nEND\r\n"
    );
    let flushed = Instant::now();
    assert_eq!(ca.call(b"flush_all\r\n").await, "OK\r\n");
    assert_eq!(
        ca.call(b"get old\r\n").await,
        "END\r\n",
        "at once on the flushing sidecar"
    );
    // The other sidecar stops serving it within its poll period, without a restart.
    while cb.call(b"get old\r\n").await != "END\r\n" {
        assert!(
            flushed.elapsed() < poll * 2,
            "B still serves the flushed item"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New writes are served everywhere, and a restarted sidecar respects the flush.
    assert_eq!(cb.call(b"set new 0 0 1\r\ny\r\n").await, "STORED\r\n");
    assert_eq!(
        ca.call(b"get new old\r\n").await,
        "VALUE new 0 1\r\ny\r\nEND\r\n"
    );
    let c = TestServer::start(settings).await;
    assert_eq!(
        c.client().await.call(b"get old new\r\n").await,
        "VALUE new 0 1\r\ny\r\nEND\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_increments_from_two_sidecars_add_up() {
    let db = DynamoLocal::shared().await;
    let (_servers, mut clients, settings) = fleet(&db, 3).await;
    let per_client = 20;
    // Every client vivifies the counter at 0 if absent: exactly one creates it.
    let tasks: Vec<_> = clients
        .drain(..)
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..per_client {
                    let reply = c.call(b"ma mcounter N0 J0 v\r\n").await;
                    let mut lines = reply.split("\r\n");
                    assert!(lines.next().unwrap().starts_with("VA "), "{reply:?}");
                    seen.push(lines.next().unwrap().parse::<u64>().unwrap());
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let total = 6 * per_client as u64;
    // One vivify answered 0 (the initial value); every other call incremented.
    assert_eq!(all, (0..total).collect::<Vec<_>>(), "a serial order");
    let item = common::table_item(&db.client(), &settings, "mcounter")
        .await
        .unwrap();
    assert_eq!(
        item["value"].as_b().unwrap().as_ref(),
        (total - 1).to_string().as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_meta_cas_from_two_sidecars_has_one_winner_per_round() {
    let db = DynamoLocal::shared().await;
    let (_servers, mut clients, _) = fleet(&db, 1).await;
    assert_eq!(clients[0].call(b"ms mdoc 1\r\n0\r\n").await, "HD\r\n");
    let mut b = clients.pop().unwrap();
    let mut a = clients.pop().unwrap();
    for round in 0..10 {
        let cas = |reply: String| reply.trim_end().trim_start_matches("HD c").to_string();
        // Both race on the version one of them read.
        let ca = cas(a.call(b"mg mdoc c\r\n").await);
        let cb = ca.clone();
        let ra = format!("ms mdoc 1 C{ca}\r\na\r\n");
        let rb = format!("md mdoc C{cb}\r\n");
        let (ra, rb) = tokio::join!(a.call(ra.as_bytes()), b.call(rb.as_bytes()));
        // One of the set and the delete wins; the other sees the change.
        let mut replies = [ra.clone(), rb.clone()];
        replies.sort();
        assert!(
            replies == ["EX\r\n", "HD\r\n"] || replies == ["HD\r\n", "NF\r\n"],
            "round {round}: {ra:?} {rb:?}"
        );
        let again = if ra == "HD\r\n" {
            "ms mdoc 1\r\n1\r\n"
        } else {
            "ms mdoc 1\r\n2\r\n"
        };
        assert_eq!(a.call(again.as_bytes()).await, "HD\r\n");
    }
}
