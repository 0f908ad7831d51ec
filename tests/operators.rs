//! What operators tune and look at, over real sockets: the hot keys
//! (`stats hotkeys`, `/hotkeys`) and per-prefix policy (`[[prefix]]`:
//! durable, local, a TTL cap).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use dynacache::config::{Config, PrefixPolicy, PrefixRule};
use dynacache::store::DynamoSettings;

use common::proxy::FaultProxy;
use common::{DynamoLocal, TestServer, WAIT, table_item, test_config};

/// A GET on the admin listener: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_are_listed_by_stats_and_on_the_admin_listener() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::start(settings).await;
    let mut c = server.client().await;
    // Reads: one key takes half of 3,200 gets (hits), 100 others share the rest.
    for key in std::iter::once("page".to_string()).chain((0..100).map(|i| format!("cold{i}"))) {
        let set = format!("set {key} 0 0 1\r\nx\r\n");
        assert_eq!(c.call(set.as_bytes()).await, "STORED\r\n");
    }
    for i in 0..3200u32 {
        let key = if i % 2 == 0 {
            "page".to_string()
        } else {
            format!("cold{}", i % 100)
        };
        c.call(format!("get {key}\r\n").as_bytes()).await;
    }
    // Writes: one key 160 times; the 101 keys above and 40 others once each;
    // one key with bytes no terminal should print (a base64 meta key).
    for i in 0..200u32 {
        let key = if i < 160 {
            "counter".to_string()
        } else {
            format!("once{i}")
        };
        assert_eq!(
            c.call(format!("set {key} 0 0 1\r\n1\r\n").as_bytes()).await,
            "STORED\r\n"
        );
    }
    for _ in 0..3 {
        // "bin\x01é" (valid UTF-8, as the S key attribute needs) in base64.
        assert_eq!(c.call(b"ms YmluAcOp 1 b\r\nz\r\n").await, "HD\r\n");
    }

    let stats = c.stats("hotkeys").await;
    assert_eq!(stats["read:1:key"], "page", "{stats:?}");
    let count: u64 = stats["read:1:count"].parse().unwrap();
    // Reads are counted one in 16 at random and scaled back: 1,600 with a
    // standard deviation of 155 (a binomial of 1,600 draws at 1/16, times 16).
    assert!((1000..=2200).contains(&count), "about 1,600: {count}");
    assert_eq!(stats["write:1:key"], "counter");
    let count: u64 = stats["write:1:count"].parse().unwrap();
    let error: u64 = stats["write:1:error"].parse().unwrap();
    assert!(count >= 160 && count - error <= 160, "{count} - {error}");
    assert_eq!(stats["write:2:key"], "bin\\x01\\xc3\\xa9", "escaped");
    assert!(stats.len() <= 2 * 32 * 3, "at most 32 keys each way");

    let (status, body) = http_get(server.admin, "/hotkeys").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reads"][0]["key"], "page");
    assert_eq!(json["writes"][0]["key"], "counter");
    assert_eq!(json["writes"][1]["key"], "bin\\x01\\xc3\\xa9");
    assert_eq!(json["read_sample"], 16);
    assert!(json["reads"].as_array().unwrap().len() <= 32);
    // Never a Prometheus label.
    let (_, metrics) = http_get(server.admin, "/metrics").await;
    assert!(!metrics.contains("counter\""), "a key leaked into /metrics");
    assert!(server.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_can_be_turned_off() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let server = TestServer::with_config(Config {
        hot_keys: 0,
        ..test_config(settings)
    })
    .await;
    let mut c = server.client().await;
    for _ in 0..50 {
        c.call(b"set k 0 0 1\r\nx\r\n").await;
        c.call(b"get k\r\n").await;
    }
    let stats: HashMap<String, String> = c.stats("hotkeys").await;
    assert!(stats.is_empty(), "{stats:?}");
    let _ = Duration::ZERO;
    assert!(server.stop().await);
}

/// A server with a local prefix, a durable prefix with a TTL cap, and the
/// rest durable, its DynamoDB calls counted by a proxy.
async fn with_prefixes(
    db: &DynamoLocal,
) -> (TestServer, FaultProxy, dynacache::store::DynamoSettings) {
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let config = Config {
        prefix: vec![
            PrefixRule {
                prefix: "views.decorators.cache".into(),
                policy: PrefixPolicy::Local,
                max_ttl: None,
            },
            PrefixRule {
                prefix: "tmp:".into(),
                policy: PrefixPolicy::Local,
                max_ttl: Some(Duration::from_secs(30)),
            },
            PrefixRule {
                prefix: "sess:".into(),
                policy: PrefixPolicy::Durable,
                max_ttl: Some(Duration::from_secs(60)),
            },
        ],
        local_memory_limit: bytesize::ByteSize::mib(2),
        ..test_config(DynamoSettings {
            endpoint_url: Some(proxy.endpoint()),
            ..settings.clone()
        })
    };
    (TestServer::with_config(config).await, proxy, settings)
}

fn dynamodb_calls(proxy: &FaultProxy) -> u64 {
    [
        "GetItem",
        "BatchGetItem",
        "PutItem",
        "UpdateItem",
        "TransactWriteItems",
    ]
    .iter()
    .map(|op| proxy.calls(op))
    .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_prefixes_stay_in_memory_and_answer_as_memcached_does() {
    let db = DynamoLocal::shared().await;
    let (server, proxy, settings) = with_prefixes(&db).await;
    let mut c = server.client().await;
    let calls = dynamodb_calls(&proxy);
    let page = "views.decorators.cache.cache_page.home";
    // Every command, memcached's answers, not one DynamoDB call.
    let exchange: &[(&str, &str)] = &[
        ("get {k}\r\n", "END\r\n"),
        ("set {k} 3 0 4\r\nhtml\r\n", "STORED\r\n"),
        ("add {k} 0 0 1\r\nx\r\n", "NOT_STORED\r\n"),
        ("append {k} 0 0 1\r\n!\r\n", "STORED\r\n"),
        ("get {k}\r\n", "VALUE {k} 3 5\r\nhtml!\r\nEND\r\n"),
        ("replace {k} 0 0 2\r\n10\r\n", "STORED\r\n"),
        ("incr {k} 5\r\n", "15\r\n"),
        // The reply is the number; the value keeps its length ("0 "), as in memcached.
        ("decr {k} 20\r\n", "0\r\n"),
        ("touch {k} 100\r\n", "TOUCHED\r\n"),
        ("mg {k} v t\r\n", "VA 2 t100\r\n0 \r\n"),
        ("delete {k}\r\n", "DELETED\r\n"),
        ("delete {k}\r\n", "NOT_FOUND\r\n"),
        ("get {k} other\r\n", "END\r\n"),
    ];
    for (request, reply) in exchange {
        let request = request.replace("{k}", page);
        assert_eq!(
            c.call(request.as_bytes()).await,
            reply.replace("{k}", page),
            "{request:?}"
        );
    }
    // (`get ... other` read `other`, a durable key, from DynamoDB.)
    assert_eq!(
        dynamodb_calls(&proxy) - calls,
        1,
        "one GetItem, for `other`"
    );
    // cas on a local key: the unique gets answers.
    assert_eq!(c.call(b"set tmp:k 0 0 1\r\na\r\n").await, "STORED\r\n");
    let reply = c.call(b"gets tmp:k\r\n").await;
    let cas: u64 = reply
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let stale = format!("cas tmp:k 0 0 1 {}\r\nb\r\n", cas + 1);
    assert_eq!(c.call(stale.as_bytes()).await, "EXISTS\r\n");
    let fresh = format!("cas tmp:k 0 0 1 {cas}\r\nb\r\n");
    assert_eq!(c.call(fresh.as_bytes()).await, "STORED\r\n");
    // The TTL cap: asked for never, or longer, it gets 30 s.
    assert_eq!(c.call(b"mg tmp:k t\r\n").await, "HD t30\r\n");
    assert_eq!(dynamodb_calls(&proxy) - calls, 1, "still the one");
    assert!(table_item(&db.client(), &settings, page).await.is_none());

    // A restart empties it: memory only.
    let metrics = http_get(server.admin, "/metrics").await.1;
    let e = common::exposition::parse(&metrics).unwrap();
    let local = |event: &str| {
        e.get("dynacache_local_keys_total", &[("event", event)])
            .unwrap()
    };
    assert_eq!(
        local("write"),
        9.0,
        "set, append, replace, incr, decr, touch, delete; set and cas of tmp:k"
    );
    assert_eq!(
        local("hit"),
        4.0,
        "get and mg of the page, gets and mg of tmp:k"
    );
    assert_eq!(local("miss"), 2.0);
    assert_eq!(
        e.get("dynacache_local_cache_limit_bytes", &[]),
        Some(2.0 * 1024.0 * 1024.0)
    );
    // Local keys are no cache hits or misses of DynamoDB-backed keys.
    assert_eq!(e.get("dynacache_cache_hits_total", &[]), Some(0.0));
    assert!(server.stop().await);
    let (again, _proxy, _) = with_prefixes(&db).await;
    let mut c = again.client().await;
    assert_eq!(c.call(b"get tmp:k\r\n").await, "END\r\n");
    assert!(again.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_keys_have_their_own_budget_and_durable_prefixes_their_ttl_cap() {
    let db = DynamoLocal::shared().await;
    let (server, _proxy, settings) = with_prefixes(&db).await;
    let mut c = server.client().await;
    // Durable keys first, then 4 MB of local pages into a 2 MiB budget.
    for i in 0..20 {
        let set = format!("set keep{i} 0 0 5\r\nvalue\r\n");
        assert_eq!(c.call(set.as_bytes()).await, "STORED\r\n");
    }
    let page = vec![b'p'; 20_000];
    for i in 0..200 {
        let mut set =
            format!("set views.decorators.cache.p{i} 0 0 {}\r\n", page.len()).into_bytes();
        set.extend_from_slice(&page);
        set.extend_from_slice(b"\r\n");
        assert_eq!(c.call(&set).await, "STORED\r\n");
    }
    let local = server.engine.local_cache().unwrap().stats();
    assert!(local.bytes <= 2 << 20, "within its budget: {}", local.bytes);
    assert!(local.evictions > 0);
    assert_eq!(
        server.engine.cache().stats().items,
        20,
        "no durable key evicted"
    );
    // sess: keys are capped at 60 s, in DynamoDB too.
    let before = common::now();
    assert_eq!(c.call(b"set sess:a 1 0 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"set sess:b 1 3600 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"set sess:c 1 10 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"set other 1 3600 1\r\nx\r\n").await, "STORED\r\n");
    let expiry = |item: Option<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>| -> u64 {
        item.unwrap()["expires_at"].as_n().unwrap().parse().unwrap()
    };
    for (key, lifetime) in [
        ("sess:a", 60),
        ("sess:b", 60),
        ("sess:c", 10),
        ("other", 3600),
    ] {
        let at = expiry(table_item(&db.client(), &settings, key).await);
        assert!(
            (before + lifetime..=common::now() + lifetime).contains(&at),
            "{key}: expires {at}, {lifetime} s from {before}"
        );
    }
    assert!(server.stop().await);
}

#[test]
fn prefix_rules_are_checked() {
    let rule = |prefix: &str| Config {
        prefix: vec![PrefixRule {
            prefix: prefix.into(),
            policy: PrefixPolicy::Local,
            max_ttl: None,
        }],
        ..Config::default()
    };
    assert!(rule("").validate().is_err());
    assert!(rule("dynacache flush").validate().is_err());
    rule("d").validate().unwrap();
    let toml = "[[prefix]]\nprefix = \"page:\"\npolicy = \"local\"\nmax_ttl = \"5m\"\n\n[[prefix]]\nprefix = \"sess:\"\n";
    let config = Config::from_toml(toml).unwrap();
    assert_eq!(config.prefix.len(), 2);
    assert_eq!(config.prefix[0].max_ttl, Some(Duration::from_secs(300)));
    assert_eq!(config.prefix[1].policy, PrefixPolicy::Durable);
}
