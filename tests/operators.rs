//! What operators tune and look at, over real sockets: the hot keys
//! (`stats hotkeys`, `/hotkeys`) and per-prefix policy (`[[prefix]]`:
//! durable, local, a TTL cap).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{DynamoLocal, TestServer, WAIT, test_config};

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
    let server = TestServer::with_config(dynacache::config::Config {
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
