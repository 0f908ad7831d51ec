//! The contract under concurrency, DynamoDB faults, careless clients and a
//! fleet of sidecars. DynamoDB calls are counted on the wire by a fault
//! proxy between dynacache and DynamoDB Local (tests/common/proxy.rs).

mod common;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use common::proxy::{Fault, FaultProxy};
use common::{DynamoLocal, TestServer, WAIT, live_item, table_item, test_config};
use dynacache::config::Config;
use dynacache::engine::EngineOptions;
use dynacache::store::DynamoSettings;

const MB: u64 = 1 << 20;

/// Settings that reach the table through `proxy`, with short timeouts.
fn via(proxy: &FaultProxy, settings: &DynamoSettings) -> DynamoSettings {
    DynamoSettings {
        endpoint_url: Some(proxy.endpoint()),
        connect_timeout: Duration::from_millis(500),
        operation_timeout: Duration::from_secs(1),
        max_attempts: 2,
        ..settings.clone()
    }
}

fn options(max_local_age: Duration) -> EngineOptions {
    EngineOptions {
        max_local_age,
        ..EngineOptions::default()
    }
}

async fn put_raw(db: &DynamoLocal, settings: &DynamoSettings, key: &str, value: &str) {
    db.client()
        .put_item()
        .table_name(&settings.table)
        .item("key", AttributeValue::S(key.into()))
        .item("value", AttributeValue::B(Blob::new(value)))
        .item("flags", AttributeValue::N("0".into()))
        .item("version", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_make_one_read() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    put_raw(&db, &settings, "hot", "v").await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    // Slow reads widen the window in which misses pile up.
    proxy.set_delay(Duration::from_millis(300));
    let server = TestServer::start_custom(
        via(&proxy, &settings),
        64 * MB,
        options(Duration::ZERO),
        None,
    )
    .await;

    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(server.client().await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.call(b"get hot\r\n").await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "VALUE hot 0 1\r\nv\r\nEND\r\n");
    }
    assert_eq!(
        proxy.calls("GetItem"),
        1,
        "100 concurrent gets of one missing key = 1 DynamoDB read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_get_misses_are_batched() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    {
        let writer = TestServer::start(settings.clone()).await;
        let mut c = writer.client().await;
        for i in 0..250 {
            let v = format!("v{i}");
            let req = format!("set k{i} {i} 0 {}\r\n{v}\r\n", v.len());
            assert_eq!(c.call(req.as_bytes()).await, "STORED\r\n");
        }
    }
    // Misses are read 4 MiB of items at a time (what a request may hold
    // read ahead), at most 100 keys per call: 100 keys with 40 KiB items.
    let proxy = FaultProxy::start(&db.endpoint).await;
    let config = Config {
        item_size_max: bytesize::ByteSize::kib(40),
        ..test_config(via(&proxy, &settings))
    };
    let server = TestServer::with_config(config).await;
    let mut c = server.client().await;
    // 250 keys, one of them twice and one absent.
    let mut req = String::from("get");
    let mut expected = String::new();
    for i in (0..250).chain([7]) {
        req.push_str(&format!(" k{i}"));
        expected.push_str(&format!(
            "VALUE k{i} {i} {}\r\nv{i}\r\n",
            format!("v{i}").len()
        ));
    }
    req.push_str(" absent\r\n");
    expected.push_str("END\r\n");
    assert_eq!(c.call(req.as_bytes()).await, expected);
    assert_eq!(
        proxy.calls("BatchGetItem"),
        3,
        "251 distinct keys = 3 calls of at most 100"
    );
    assert_eq!(proxy.calls("GetItem"), 0);
    // Now all cached: no more calls.
    assert_eq!(c.call(req.as_bytes()).await, expected);
    assert_eq!(proxy.calls("BatchGetItem"), 3);

    // With 1 MiB items (the default), 4 keys a call.
    let proxy = FaultProxy::start(&db.endpoint).await;
    let server = TestServer::start(via(&proxy, &settings)).await;
    let mut c = server.client().await;
    assert_eq!(c.call(req.as_bytes()).await, expected);
    assert_eq!(proxy.calls("BatchGetItem"), 63, "251 keys, 4 a call");
    assert_eq!(proxy.calls("GetItem"), 0, "the absent one in the last call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_older_than_a_write_never_fills_the_cache() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    put_raw(&db, &settings, "k", "old").await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let server = TestServer::start_custom(
        via(&proxy, &settings),
        64 * MB,
        options(Duration::ZERO),
        None,
    )
    .await;

    // The miss's GetItem happens in DynamoDB, but its answer is held back...
    proxy.hold_get_responses();
    let mut reader = server.client().await;
    let read = tokio::spawn(async move { reader.call(b"get k\r\n").await });
    let deadline = Instant::now() + WAIT;
    while proxy.held() == 0 {
        assert!(Instant::now() < deadline, "the GetItem never came back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...while a write of the key completes.
    let mut writer = server.client().await;
    assert_eq!(writer.call(b"set k 0 0 3\r\nnew\r\n").await, "STORED\r\n");
    proxy.release();
    // The late read may answer what it read (it was concurrent with the write)...
    let answer = read.await.unwrap();
    assert!(answer.contains("old") || answer.contains("new"), "{answer}");
    // ...but it must not have put the old value in the cache.
    let cached = server
        .engine
        .cache()
        .get(b"k", 0)
        .expect("the write cached its value");
    assert_eq!(cached.value.as_slice(), b"new");
    assert_eq!(
        writer.call(b"get k\r\n").await,
        "VALUE k 0 3\r\nnew\r\nEND\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_one_key_reach_the_cache_in_dynamodb_order() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let server = TestServer::start_custom(
        via(&proxy, &settings),
        64 * MB,
        options(Duration::ZERO),
        None,
    )
    .await;
    // The first write is applied in DynamoDB, but its answer comes late...
    proxy.hold_responses("PutItem", 1);
    let mut first = server.client().await;
    let first_write = tokio::spawn(async move { first.call(b"set k 0 0 5\r\nfirst\r\n").await });
    let deadline = Instant::now() + WAIT;
    while proxy.held() == 0 {
        assert!(
            Instant::now() < deadline,
            "the first PutItem never came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and a second write to the key is sent meanwhile. Without per-key
    // ordering it would reach DynamoDB, answer, and fill the cache before
    // the first one's late answer overwrote the cache with the older value.
    let mut second = server.client().await;
    let second_write = tokio::spawn(async move { second.call(b"set k 0 0 6\r\nsecond\r\n").await });
    // Give an unordered second write its chance to finish (it cannot here).
    let chance = Instant::now() + Duration::from_millis(500);
    while proxy.calls("PutItem") < 2 && Instant::now() < chance {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.release();
    assert_eq!(first_write.await.unwrap(), "STORED\r\n");
    assert_eq!(second_write.await.unwrap(), "STORED\r\n");
    let in_table = table_item(&db.client(), &settings, "k").await.unwrap();
    assert_eq!(in_table["value"].as_b().unwrap().as_ref(), b"second");
    let cached = server.engine.cache().get(b"k", 0).expect("cached");
    assert_eq!(
        cached.value.as_slice(),
        b"second",
        "the cache ends as DynamoDB does"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writes_and_reads_leave_cache_equal_to_table() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server =
        TestServer::start_custom(settings.clone(), 64 * MB, options(Duration::ZERO), None).await;
    let keys = ["a", "b", "c"];
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            // A fixed, different pseudo-random sequence per worker.
            let mut x = worker * 2654435761 + 1;
            for i in 0..60 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = keys[(x % 3) as usize];
                let req = match (x >> 8) % 4 {
                    0 => format!("delete {key}\r\n"),
                    1 | 2 => format!("get {key}\r\n"),
                    _ => {
                        let v = format!("w{worker}i{i}");
                        format!("set {key} 0 0 {}\r\n{v}\r\n", v.len())
                    }
                };
                let reply = c.call(req.as_bytes()).await;
                assert!(
                    !reply.starts_with("SERVER_ERROR") && !reply.starts_with("CLIENT_ERROR"),
                    "{reply}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for key in keys {
        let in_table = table_item(&db.client(), &settings, key)
            .await
            .map(|item| item["value"].as_b().unwrap().as_ref().to_vec());
        if let Some(cached) = server.engine.cache().get(key.as_bytes(), 0) {
            assert_eq!(
                Some(cached.value.as_slice().to_vec()),
                in_table,
                "cache and DynamoDB agree on {key}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_promptly_keeps_hits_and_recovers() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let server = TestServer::start_custom(
        via(&proxy, &settings),
        64 * MB,
        options(Duration::ZERO),
        None,
    )
    .await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set cached 0 0 1\r\nx\r\n").await, "STORED\r\n");

    for (n, fault) in [Fault::Blackhole, Fault::Reset].into_iter().enumerate() {
        proxy.set_fault(fault);
        assert_eq!(
            c.call(b"get cached\r\n").await,
            "VALUE cached 0 1\r\nx\r\nEND\r\n",
            "{fault:?}: hits served"
        );
        // A key of each round's own: the last round's delete left its key
        // known absent (negative caching), which a get then answers.
        for req in [
            format!("get other{n}\r\n"),
            format!("set other{n} 0 0 1\r\ny\r\n"),
            format!("delete other{n}\r\n"),
            format!("touch other{n} 5\r\n"),
        ] {
            let req = req.as_bytes();
            let started = Instant::now();
            let reply = c.call(req).await;
            let took = started.elapsed();
            assert!(
                reply.starts_with("SERVER_ERROR dynamodb"),
                "{fault:?}: {reply}"
            );
            // Bounded by operation_timeout (1 s), with slack for a busy machine.
            assert!(
                took < Duration::from_secs(3),
                "{fault:?}: {req:?} took {took:?}"
            );
        }
        proxy.set_fault(Fault::Pass);
        // Service comes back by itself.
        let set = format!("set other{n} 0 0 1\r\ny\r\n");
        assert_eq!(c.call(set.as_bytes()).await, "STORED\r\n");
        let delete = format!("delete other{n}\r\n");
        assert_eq!(c.call(delete.as_bytes()).await, "DELETED\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_then_reported() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let mut settings = via(&proxy, &settings);
    settings.max_attempts = 3;
    settings.operation_timeout = Duration::from_secs(10);
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    proxy.set_fault(Fault::Throttle);
    let reply = c.call(b"set t 0 0 1\r\nx\r\n").await;
    assert_eq!(reply, "SERVER_ERROR dynamodb throttled the request\r\n");
    assert_eq!(proxy.calls("PutItem"), 3, "every attempt was made");
    assert!(server.engine.cache().get(b"t", 0).is_none());
    proxy.set_fault(Fault::Pass);
    assert_eq!(c.call(b"set t 0 0 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(proxy.calls("PutItem"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aged_entries_are_served_during_an_outage() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let age = Duration::from_millis(200);
    let server =
        TestServer::start_custom(via(&proxy, &settings), 64 * MB, options(age), None).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set s 0 0 1\r\nx\r\n").await, "STORED\r\n");
    tokio::time::sleep(age * 2).await; // let the entry age: time itself is under test
    proxy.set_fault(Fault::Blackhole);
    assert_eq!(c.call(b"get s\r\n").await, "VALUE s 0 1\r\nx\r\nEND\r\n");
    let reply = c.call(b"get s never-cached\r\n").await;
    assert!(
        reply.starts_with("SERVER_ERROR"),
        "a key with no copy still fails: {reply}"
    );
}

/// With DynamoDB blackholed: the first aged hit waits at most the
/// revalidation bound (500 ms), not the operation timeout; once a call has
/// failed (the outage is known), aged hits are answered from memory without
/// asking DynamoDB at all; a probe finds it back, and re-reads resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aged_hits_do_not_wait_for_a_known_outage() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let age = Duration::from_millis(200);
    // An operation timeout far above the bounds under test.
    let slow = DynamoSettings {
        operation_timeout: Duration::from_secs(5),
        max_attempts: 1,
        ..via(&proxy, &settings)
    };
    let server = TestServer::start_custom(slow, 64 * MB, options(age), None).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set s 0 0 1\r\nx\r\n").await, "STORED\r\n");
    tokio::time::sleep(age * 2).await; // let the entry age: time itself is under test
    proxy.set_fault(Fault::Blackhole);

    // Not known yet: the re-read is given 500 ms, then the copy is served.
    let started = Instant::now();
    assert_eq!(c.call(b"get s\r\n").await, "VALUE s 0 1\r\nx\r\nEND\r\n");
    let first = started.elapsed();
    assert!(first < Duration::from_millis(1500), "{first:?}");

    // A miss fails (after the operation timeout): now the outage is known.
    let reply = c.call(b"get never-cached\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR"), "{reply}");
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(c.call(b"get s\r\n").await, "VALUE s 0 1\r\nx\r\nEND\r\n");
        assert_eq!(c.call(b"mg s v\r\n").await, "VA 1\r\nx\r\n");
    }
    let forty = started.elapsed();
    // Together they took less than one re-read's bound (500 ms each when
    // the outage is not known: 20 s; broken that way, this fails).
    assert!(
        forty < Duration::from_secs(2),
        "40 aged hits took {forty:?}"
    );

    // DynamoDB back: the probe notices, and a change made elsewhere is
    // read again once the copy is past max_local_age.
    proxy.set_fault(Fault::Pass);
    put_raw(&db, &settings, "s", "y").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = c.call(b"get s\r\n").await;
        if reply == "VALUE s 0 1\r\ny\r\nEND\r\n" {
            break;
        }
        assert_eq!(reply, "VALUE s 0 1\r\nx\r\nEND\r\n");
        assert!(Instant::now() < deadline, "never re-read after the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_restart_is_survived() {
    let mut db = DynamoLocal::private().await;
    let settings = db.new_table().await;
    let mut fast = settings.clone();
    fast.operation_timeout = Duration::from_secs(1);
    fast.max_attempts = 2;
    let server = TestServer::start(fast).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set a 0 0 1\r\nx\r\n").await, "STORED\r\n");
    let port = db.port;
    db.stop();
    let reply = c.call(b"get b\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR"), "{reply}");
    // DynamoDB Local comes back (empty: it runs in memory) on the same port.
    let db = DynamoLocal::start_on(port).await;
    let store = common::connect(settings.clone()).await;
    store.create_table(&Default::default()).await.unwrap();
    assert_eq!(c.call(b"set b 0 0 1\r\ny\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"get b\r\n").await, "VALUE b 0 1\r\ny\r\nEND\r\n");
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_another_sidecar_are_seen_within_max_local_age() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let bound = Duration::from_millis(500);
    let a = TestServer::start_custom(settings.clone(), 64 * MB, options(bound), None).await;
    let b = TestServer::start_custom(settings.clone(), 64 * MB, options(bound), None).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    assert_eq!(ca.call(b"set session 0 0 2\r\nv1\r\n").await, "STORED\r\n");
    assert_eq!(
        cb.call(b"get session\r\n").await,
        "VALUE session 0 2\r\nv1\r\nEND\r\n"
    );

    // An update through A, then a delete through A (a logout): B sees each
    // within the bound.
    for (write, expect) in [
        (
            &b"set session 0 0 2\r\nv2\r\n"[..],
            "VALUE session 0 2\r\nv2\r\nEND\r\n",
        ),
        (b"delete session\r\n", "END\r\n"),
    ] {
        let written = Instant::now();
        assert!(ca.call(write).await.ends_with("\r\n"));
        let deadline = written + WAIT;
        let seen = loop {
            if cb.call(b"get session\r\n").await == expect {
                break written.elapsed();
            }
            assert!(Instant::now() < deadline, "B never saw the write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        println!(
            "B saw {:?} after {seen:?} (max_local_age {bound:?})",
            String::from_utf8_lossy(write)
        );
        assert!(
            seen <= bound + Duration::from_millis(300),
            "seen after {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_writes_in_flight() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    proxy.set_delay(Duration::from_millis(500));
    let server = TestServer::start(via(&proxy, &settings)).await;
    let mut c = server.client().await;
    c.send(b"set inflight 0 0 1\r\nx\r\n").await;
    proxy.wait_calls("PutItem", 1).await;
    // Shut down while the PutItem is on its way.
    let stopping = tokio::spawn(server.stop());
    assert_eq!(c.reply().await, "STORED\r\n");
    assert!(stopping.await.unwrap(), "drained within the grace period");
    assert!(
        table_item(&db.client(), &settings, "inflight")
            .await
            .is_some()
    );
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn careless_and_hostile_clients_cost_little() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start_custom(
        settings.clone(),
        64 * MB,
        options(Duration::ZERO),
        Some(Duration::from_millis(500)),
    )
    .await;

    // A client gone mid-value stores nothing.
    let mut gone = server.client().await;
    gone.send(b"set half 0 0 10\r\nabc").await;
    drop(gone);
    // A 4 GB length is refused at once; a 2 GB one is discarded as it comes.
    let mut c = server.client().await;
    assert_eq!(
        c.call(b"set k 0 0 4294967295\r\n").await,
        "CLIENT_ERROR bad command line format\r\n"
    );
    assert_eq!(
        c.call(b"set k 0 0 2147483645\r\n").await,
        "SERVER_ERROR object too large for cache\r\n"
    );
    c.send(&vec![b'x'; 4 * MB as usize]).await;
    drop(c);
    // A line with no end closes that connection only.
    let mut long = server.client().await;
    long.send(&vec![b'z'; 4096]).await;
    assert!(long.closed().await);

    // Slow-loris clients trickling a request do not hold up others.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = server.client().await;
        s.send(b"get sl").await;
        slow.push(s);
    }
    let mut c = server.client().await;
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(c.call(b"get half\r\n").await, "END\r\n");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(live_item(&db.client(), &settings, "half").await.is_none());

    // Idle connections are closed after idle_timeout; busy ones are not.
    let mut idle = server.client().await;
    let started = Instant::now();
    assert!(idle.closed().await);
    assert!(started.elapsed() >= Duration::from_millis(450));
}

/// Waits (bounded) until the server counts `n` open connections.
async fn connections_become(server: &TestServer, n: u64) {
    let deadline = Instant::now() + WAIT;
    while server.engine.counters().connections() != n {
        assert!(Instant::now() < deadline, "never {n} connections");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_at_once() {
    let db = DynamoLocal::shared().await;
    let config = Config {
        max_connections: 2,
        ..test_config(db.new_table().await)
    };
    let server = TestServer::with_config(config).await;
    let mut first = server.client().await;
    let mut second = server.client().await;
    assert!(first.call(b"version\r\n").await.starts_with("VERSION"));
    assert!(second.call(b"version\r\n").await.starts_with("VERSION"));
    // The third is told at once, as memcached tells it, and closed: its
    // client fails fast and can pick another server.
    let started = Instant::now();
    let mut third = server.client().await;
    assert_eq!(
        third.try_reply().await.as_deref(),
        Some("ERROR Too many open connections\r\n")
    );
    assert!(third.closed().await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let stats = first.stats("").await;
    assert_eq!(
        stats["rejected_connections"], "1",
        "counted as memcached counts it"
    );
    // A slot freed is a slot for the next client.
    drop(first);
    connections_become(&server, 1).await;
    let mut fourth = server.client().await;
    assert!(fourth.call(b"version\r\n").await.starts_with("VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_client_is_closed_by_request_timeout() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let config = Config {
        request_timeout: Duration::from_millis(500),
        ..test_config(settings.clone())
    };
    let server = TestServer::with_config(config).await;
    // Whole requests with pauses between them are fine: only a request that
    // takes too long to arrive counts.
    let mut patient = server.client().await;
    for _ in 0..3 {
        assert!(patient.call(b"version\r\n").await.starts_with("VERSION"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // One byte every 100 ms never makes a whole request in time.
    let mut trickler = server.client().await;
    let started = Instant::now();
    trickler.send(b"set k 0 0 100\r\n").await;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickler.try_send(b"x").await.is_err() || server.engine.counters().connections() < 2
            {
                return;
            }
        }
    });
    closed.await.expect("closed in time");
    connections_become(&server, 1).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(live_item(&db.client(), &settings, "k").await.is_none());
    assert!(patient.call(b"version\r\n").await.starts_with("VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_by_write_timeout() {
    let db = DynamoLocal::shared().await;
    let config = Config {
        write_timeout: Duration::from_millis(500),
        ..test_config(db.new_table().await)
    };
    let server = TestServer::with_config(config).await;
    let mut c = server.client().await;
    let value = vec![b'v'; 300 * 1024];
    let mut set = format!("set big 0 0 {}\r\n", value.len()).into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    assert_eq!(c.call(&set).await, "STORED\r\n");
    // Ask for far more than socket buffers hold, and never read.
    let mut reader = server.client().await;
    let started = Instant::now();
    for _ in 0..200 {
        if reader.try_send(b"get big\r\n").await.is_err() {
            break;
        }
    }
    connections_become(&server, 1).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // The slot went back; others are served as before.
    assert!(
        c.call(b"get big\r\n")
            .await
            .starts_with("VALUE big 0 307200")
    );
}

/// A write whose request is held in the network past its timeout (so its
/// client is answered `SERVER_ERROR`), and lands in DynamoDB only after a
/// later write was acknowledged: the later write stays, in the table and in
/// every sidecar's cache. For every kind of write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_write_never_overwrites_an_acknowledged_one() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let late_side = TestServer::start(via(&proxy, &settings)).await;
    let other = TestServer::start(settings.clone()).await;
    let mut a = late_side.client().await;
    let mut b = other.client().await;
    // (key, set-up through a, the write that lands late, its operation,
    //  the later writes through the other sidecar with their answers, what
    //  every reader must then see)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a str,
    );
    let cases: [Case; 9] = [
        (
            "set",
            "set set 0 0 2\r\nv0\r\n",
            "set set 0 0 4\r\nlate\r\n",
            "PutItem",
            &[("set set 0 0 3\r\nnew\r\n", "STORED\r\n")],
            "new",
        ),
        (
            "add",
            "",
            "add add 0 0 4\r\nlate\r\n",
            "PutItem",
            &[("set add 0 0 3\r\nnew\r\n", "STORED\r\n")],
            "new",
        ),
        (
            "gone",
            "",
            "add gone 0 0 4\r\nlate\r\n",
            "PutItem",
            &[
                ("set gone 0 0 3\r\nnew\r\n", "STORED\r\n"),
                ("delete gone\r\n", "DELETED\r\n"),
            ],
            "",
        ),
        (
            "cas",
            "set cas 0 0 2\r\nv0\r\n",
            "cas cas 0 0 4 {unique}\r\nlate\r\n",
            "PutItem",
            &[("set cas 0 0 3\r\nnew\r\n", "STORED\r\n")],
            "new",
        ),
        (
            "del",
            "set del 0 0 2\r\nv0\r\n",
            "delete del\r\n",
            "PutItem",
            &[("set del 0 0 3\r\nnew\r\n", "STORED\r\n")],
            "new",
        ),
        (
            "incr",
            "set incr 0 0 2\r\n10\r\n",
            "incr incr 5\r\n",
            "PutItem",
            &[("set incr 0 0 3\r\n100\r\n", "STORED\r\n")],
            "100",
        ),
        (
            "app",
            "set app 0 0 2\r\nv0\r\n",
            "append app 0 0 1\r\nx\r\n",
            "PutItem",
            &[("set app 0 0 3\r\nnew\r\n", "STORED\r\n")],
            "new",
        ),
        (
            "touch",
            "set touch 0 0 2\r\nv0\r\n",
            "touch touch -1\r\n",
            "UpdateItem",
            &[("set touch 0 0 3\r\nnew\r\n", "STORED\r\n")],
            "new",
        ),
        (
            "ms",
            "set ms 0 0 2\r\nv0\r\n",
            "ms ms 4 T0\r\nlate\r\n",
            "PutItem",
            &[("md ms\r\n", "HD\r\n")],
            "",
        ),
    ];
    let mut late = 0;
    for (key, setup, write, operation, later, wanted) in cases {
        let context = format!("late {write:?} after {later:?}");
        if !setup.is_empty() {
            assert!(!a.call(setup.as_bytes()).await.starts_with("SERVER_ERROR"));
        }
        let unique = a.call(format!("gets {key}\r\n").as_bytes()).await;
        let unique = unique.split_whitespace().nth(4).unwrap_or("0").to_string();
        let write = write.replace("{unique}", &unique);
        proxy.hold_requests(operation, 1);
        let answer = a.call(write.as_bytes()).await;
        assert_eq!(answer, "SERVER_ERROR dynamodb timed out\r\n", "{context}");
        // Another client, told of the failure, writes again; acknowledged.
        for (request, acknowledged) in later {
            assert_eq!(b.call(request.as_bytes()).await, *acknowledged, "{context}");
        }
        // Now the old request reaches DynamoDB.
        proxy.release_requests();
        late += 1;
        proxy.wait_late_delivered(late).await;
        let expected = match wanted {
            "" => "END\r\n".to_string(),
            value => format!("VALUE {key} 0 {}\r\n{value}\r\nEND\r\n", value.len()),
        };
        for (side, client) in [("late sidecar", &mut a), ("other sidecar", &mut b)] {
            let got = client.call(format!("get {key}\r\n").as_bytes()).await;
            assert_eq!(got, expected, "{context}: {side}");
        }
        let item = live_item(&db.client(), &settings, key).await;
        match wanted {
            "" => assert!(item.is_none(), "{context}: table"),
            value => {
                let AttributeValue::B(stored) = &item.unwrap()["value"] else {
                    panic!("binary value")
                };
                assert_eq!(stored.as_ref(), value.as_bytes(), "{context}: table");
            }
        }
    }
}

/// A key absent from the table costs one DynamoDB read per `max_local_age`,
/// not one per get (bots with stale session cookies, add-then-get), and a
/// write through another sidecar is seen within that same bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_keys_are_read_once_per_max_local_age() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let age = Duration::from_millis(500);
    let server =
        TestServer::start_custom(via(&proxy, &settings), 64 << 20, options(age), None).await;
    let mut c = server.client().await;
    let reads = proxy.calls("GetItem");
    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(c.call(b"get stale-cookie\r\n").await, "END\r\n");
    }
    // One read per max_local_age that the 50 gets took (one, on loopback).
    let periods = 1 + (started.elapsed().as_millis() / age.as_millis()) as u64;
    let made = proxy.calls("GetItem") - reads;
    assert!(
        (1..=periods).contains(&made),
        "{made} reads for 50 gets in {:?}",
        started.elapsed()
    );
    // Created through another sidecar: seen within max_local_age.
    let other = TestServer::start(settings.clone()).await;
    let mut o = other.client().await;
    let created = Instant::now();
    assert_eq!(
        o.call(b"set stale-cookie 0 0 1\r\nx\r\n").await,
        "STORED\r\n"
    );
    loop {
        let reply = c.call(b"get stale-cookie\r\n").await;
        if reply != "END\r\n" {
            assert_eq!(reply, "VALUE stale-cookie 0 1\r\nx\r\nEND\r\n");
            break;
        }
        assert!(
            created.elapsed() < age + Duration::from_millis(500),
            "still a miss {:?} after the write",
            created.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.stop().await && other.stop().await);
}
