//! The cached-DB contract, seen from a client socket, against a real
//! DynamoDB Local whose contents are checked through the SDK.

mod common;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoLocal, McClient, TestServer, live_item, now, table_item};
use dynacache::store::Store;

fn n(v: &AttributeValue) -> u64 {
    v.as_n().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_reaches_the_table_before_stored() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings.clone()).await;
    let mut c = server.client().await;

    assert_eq!(
        c.call(b"set session 1 0 5\r\nhello\r\n").await,
        "STORED\r\n"
    );
    // STORED means DynamoDB has it: read the table directly.
    let item = table_item(&db.client(), &settings, "session")
        .await
        .expect("item in table");
    assert_eq!(item["value"], AttributeValue::B(Blob::new("hello")));
    assert_eq!(n(&item["flags"]), 1);
    assert!(n(&item["version"]) > 0);
    assert!(
        !item.contains_key("expires_at"),
        "exptime 0 writes no expiry"
    );

    assert_eq!(c.call(b"set ttl 0 100 1\r\nx\r\n").await, "STORED\r\n");
    let item = table_item(&db.client(), &settings, "ttl").await.unwrap();
    let expires = n(&item["expires_at"]);
    let t = now();
    assert!(
        (t + 99..=t + 100).contains(&expires),
        "expires_at {expires} vs now {t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_cache_reads_back_from_dynamodb() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings.clone()).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set k 7 0 4\r\ndata\r\n").await, "STORED\r\n");
    let cas = c.call(b"gets k\r\n").await;
    assert!(server.stop().await, "drained");

    // A new process has an empty cache: the value must come from DynamoDB.
    let server = TestServer::start(settings.clone()).await;
    assert_eq!(server.engine.cache().stats().items, 0);
    let mut c = server.client().await;
    assert_eq!(c.call(b"get k\r\n").await, "VALUE k 7 4\r\ndata\r\nEND\r\n");
    assert_eq!(
        c.call(b"gets k\r\n").await,
        cas,
        "the cas unique survives the restart"
    );
    assert_eq!(
        server.engine.cache().stats().items,
        1,
        "the miss filled the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_items_in_the_table_are_not_served() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    // DynamoDB Local never deletes TTL items, like the service within its lag.
    db.client()
        .put_item()
        .table_name(&settings.table)
        .item("key", AttributeValue::S("gone".into()))
        .item("value", AttributeValue::B(Blob::new("stale")))
        .item("flags", AttributeValue::N("0".into()))
        .item("expires_at", AttributeValue::N((now() - 10).to_string()))
        .item("version", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    let server = TestServer::start(settings.clone()).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"get gone\r\n").await, "END\r\n");
    // An expired item counts as absent for add, and for delete and touch.
    assert_eq!(c.call(b"touch gone 100\r\n").await, "NOT_FOUND\r\n");
    assert_eq!(c.call(b"add gone 0 0 5\r\nfresh\r\n").await, "STORED\r\n");
    assert_eq!(
        c.call(b"get gone\r\n").await,
        "VALUE gone 0 5\r\nfresh\r\nEND\r\n"
    );

    // A negative exptime stores an already-expired item: nothing is served.
    assert_eq!(c.call(b"set neg 0 -1 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"get neg\r\n").await, "END\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_expire_from_memory_on_the_clock() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set short 0 1 1\r\nx\r\n").await, "STORED\r\n");
    let expires = now() + 1;
    // Wait for the wall clock itself to pass the expiry (time, not readiness).
    while now() < expires {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(c.call(b"get short\r\n").await, "END\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_delete_touch_follow_the_table() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings.clone()).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"add a 0 0 1\r\n1\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"add a 0 0 1\r\n2\r\n").await, "NOT_STORED\r\n");
    assert_eq!(c.call(b"touch a 500\r\n").await, "TOUCHED\r\n");
    let item = table_item(&db.client(), &settings, "a").await.unwrap();
    assert!(n(&item["expires_at"]) >= now() + 499);
    assert_eq!(item["value"], AttributeValue::B(Blob::new("1")));
    assert_eq!(c.call(b"touch a 0\r\n").await, "TOUCHED\r\n");
    let item = table_item(&db.client(), &settings, "a").await.unwrap();
    assert!(
        !item.contains_key("expires_at"),
        "touch 0 removes the expiry"
    );
    assert_eq!(c.call(b"touch missing 10\r\n").await, "NOT_FOUND\r\n");
    assert_eq!(c.call(b"delete a\r\n").await, "DELETED\r\n");
    assert!(live_item(&db.client(), &settings, "a").await.is_none());
    assert_eq!(c.call(b"get a\r\n").await, "END\r\n");
    assert_eq!(c.call(b"delete a\r\n").await, "NOT_FOUND\r\n");

    // A delete through DynamoDB's side is seen once the cached copy is gone
    // (here: a fresh server; across live sidecars see max_local_age).
    assert_eq!(c.call(b"set b 0 0 1\r\nx\r\n").await, "STORED\r\n");
    db.client()
        .delete_item()
        .table_name(&settings.table)
        .key("key", AttributeValue::S("b".into()))
        .send()
        .await
        .unwrap();
    let fresh = TestServer::start(settings).await;
    assert_eq!(fresh.client().await.call(b"get b\r\n").await, "END\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_adds_from_two_sidecars_have_one_winner() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let a = TestServer::start(settings.clone()).await;
    let b = TestServer::start(settings.clone()).await;
    let keys = 20;
    let mut tasks = Vec::new();
    for (host, server) in [(b'a', &a), (b'b', &b)] {
        for worker in 0..4u8 {
            let mut c = server.client().await;
            tasks.push(tokio::spawn(async move {
                let mut won = Vec::new();
                for k in 0..keys {
                    let req = format!("add race{k} 0 0 2\r\n{}{}\r\n", host as char, worker);
                    match c.call(req.as_bytes()).await.as_str() {
                        "STORED\r\n" => won.push(k),
                        "NOT_STORED\r\n" => {}
                        other => panic!("unexpected reply {other:?}"),
                    }
                }
                won
            }));
        }
    }
    let mut winners = vec![0; keys];
    for t in tasks {
        for k in t.await.unwrap() {
            winners[k] += 1;
        }
    }
    assert!(
        winners.iter().all(|&w| w == 1),
        "each key has exactly one winner: {winners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    let mut batch = Vec::new();
    let mut expected = String::new();
    for i in 0..50 {
        batch.extend_from_slice(
            format!(
                "set p{i} {i} 0 {}\r\n{i}\r\nget p{i}\r\n",
                i.to_string().len()
            )
            .as_bytes(),
        );
        expected.push_str(&format!(
            "STORED\r\nVALUE p{i} {i} {}\r\n{i}\r\nEND\r\n",
            i.to_string().len()
        ));
    }
    batch.extend_from_slice(b"bogus\r\nversion\r\n");
    c.send(&batch).await;
    let mut got = String::new();
    for _ in 0..100 {
        got.push_str(&c.reply().await);
    }
    assert_eq!(got, expected);
    assert_eq!(c.reply().await, "ERROR\r\n");
    assert!(c.reply().await.starts_with("VERSION 1.6."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_size_limit_is_memcacheds() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings.clone()).await;
    let mut c = server.client().await;
    let key = "k".repeat(250);
    // memcached's 1 MiB, key and attribute names included.
    let max = 1024 * 1024 - key.len() - Store::item_overhead(server.engine.store());
    // The largest value accepted is stored (incompressible: over three items).
    let value = common::corpus::random(max, 9);
    let mut req = format!("set {key} 0 0 {max}\r\n").into_bytes();
    req.extend_from_slice(&value);
    req.extend_from_slice(b"\r\n");
    assert_eq!(c.call(&req).await, "STORED\r\n");
    let item = table_item(&db.client(), &settings, &key).await.unwrap();
    assert_eq!(item["chunks"].as_n().unwrap(), "2");
    let get = format!("get {key}\r\n");
    let mut expected = format!("VALUE {key} 0 {max}\r\n").into_bytes();
    expected.extend_from_slice(&value);
    expected.extend_from_slice(b"\r\nEND\r\n");
    assert!(c.call_bytes(get.as_bytes()).await == expected);

    // One byte more: refused, the data discarded, the stream still in sync,
    // and the old value gone (memcached drops it too: the client meant to
    // replace it, so it must not read it back).
    let mut req = format!("set {key} 0 0 {}\r\n", max + 1).into_bytes();
    req.extend(std::iter::repeat_n(b'v', max + 1));
    req.extend_from_slice(b"\r\nversion\r\n");
    assert_eq!(
        c.call(&req).await,
        "SERVER_ERROR object too large for cache\r\n"
    );
    assert!(c.reply().await.starts_with("VERSION "));
    assert!(server.engine.cache().get(key.as_bytes(), 0).is_none());
    assert!(live_item(&db.client(), &settings, &key).await.is_none());
    assert_eq!(c.call(get.as_bytes()).await, "END\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_the_table_cannot_hold_are_client_errors() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    let reply = c.call(b"set \xff\xfe 0 0 1\r\nx\r\n").await;
    assert!(
        reply.starts_with("CLIENT_ERROR key is not valid UTF-8"),
        "{reply}"
    );
    let reply = c.call(b"get ok \xff\r\n").await;
    assert!(reply.starts_with("CLIENT_ERROR "), "{reply}");
    // The connection is still usable.
    assert_eq!(c.call(b"set ok 0 0 1\r\nx\r\n").await, "STORED\r\n");
    // A cached key beside one the table cannot hold: only the error, no value.
    let reply = c.call(b"get ok \xff\r\n").await;
    assert!(
        reply.starts_with("CLIENT_ERROR ") && !reply.contains("VALUE"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_with_a_b_key_attribute() {
    let db = DynamoLocal::shared().await;
    let mut settings = db.new_table().await;
    settings.table = common::unique_name("bin");
    settings.key_type = dynacache::store::KeyType::B;
    let store = common::connect(settings.clone()).await;
    store.create_table(&Default::default()).await.unwrap();
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set \xff\xfe 0 0 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(
        c.call(b"get \xff\xfe\r\n").await,
        "VALUE \u{fffd}\u{fffd} 0 1\r\nx\r\nEND\r\n"
    );
}

/// The client sees a connection it can keep using.
async fn still_serving(c: &mut McClient) {
    assert!(c.call(b"version\r\n").await.starts_with("VERSION "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_dynamodb_is_server_error_and_caches_nothing() {
    let db = DynamoLocal::shared().await;
    let mut settings = db.new_table().await;
    // Nothing listens here: every call fails at once with connection refused.
    settings.endpoint_url = Some(format!("http://127.0.0.1:{}", common::free_port()));
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    let reply = c.call(b"get k\r\n").await;
    assert!(
        reply.starts_with("SERVER_ERROR dynamodb unreachable"),
        "{reply}"
    );
    let reply = c.call(b"set k 0 0 1\r\nx\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    assert_eq!(
        server.engine.cache().stats().items,
        0,
        "a failed set caches nothing"
    );
    let reply = c.call(b"get k\r\n").await;
    assert!(
        reply.starts_with("SERVER_ERROR "),
        "never a false miss, never the unacknowledged value: {reply}"
    );
    still_serving(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_dynamodb_serves_hits_and_fails_the_rest_loudly() {
    let mut db = DynamoLocal::private().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    assert_eq!(c.call(b"set cached 0 0 3\r\nhit\r\n").await, "STORED\r\n");

    db.stop();
    assert_eq!(
        c.call(b"get cached\r\n").await,
        "VALUE cached 0 3\r\nhit\r\nEND\r\n"
    );
    let reply = c.call(b"get uncached\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    let reply = c.call(b"get cached uncached\r\n").await;
    assert!(
        reply.starts_with("SERVER_ERROR ") && !reply.contains("VALUE"),
        "{reply}"
    );
    let reply = c.call(b"set cached 0 0 3\r\nnew\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    // The write's fate is unknown, so the old value is not served either.
    let reply = c.call(b"get cached\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    let reply = c.call(b"delete cached\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    still_serving(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_item_is_a_server_error_not_a_miss() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    // Written by something else, with a number where the value belongs.
    db.client()
        .put_item()
        .table_name(&settings.table)
        .item("key", AttributeValue::S("odd".into()))
        .item("value", AttributeValue::N("5".into()))
        .send()
        .await
        .unwrap();
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    assert_eq!(
        c.call(b"get odd\r\n").await,
        "SERVER_ERROR bad item in table: attribute value has the wrong type\r\n"
    );
}
