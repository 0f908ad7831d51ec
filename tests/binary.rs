//! The real `dynacache` binary: CLI, config errors, init-table, serving,
//! metrics and SIGTERM, against DynamoDB Local.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::TimeToLiveStatus;
use common::{DynamoLocal, McClient, WAIT, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_dynacache");

fn dynacache(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("AWS_ACCESS_KEY_ID", common::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env_remove("DYNACACHE_CONFIG")
        .stdin(Stdio::null());
    cmd
}

fn run(args: &[&str]) -> Output {
    dynacache(args).output().expect("binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_and_version() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--table",
        "--memory-limit",
        "--metrics-listen",
        "--endpoint-url",
        "--region",
        "init-table",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}");
    }
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[dynamodb]\ntable = \"ab\"\n", "dynamodb.table"),
        ("[dynamodb]\ntabel = \"sessions\"\n", "tabel"),
        ("memory_limit = \"lots\"\n", "memory_limit"),
        ("max_connections = 0\n", "max_connections"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = run(&["--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{text}");
        assert!(
            stderr(&out).contains(key),
            "error names {key}: {}",
            stderr(&out)
        );
    }
    let out = run(&["--config", "/nonexistent/dynacache.toml"]);
    assert_eq!(out.status.code(), Some(64));
    let out = run(&["--table", "x"]);
    assert_eq!(out.status.code(), Some(64), "flags are validated too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_table_creates_with_ttl_and_is_idempotent() {
    let db = DynamoLocal::shared().await;
    let table = common::unique_name("init");
    let args = [
        "--endpoint-url",
        db.endpoint.as_str(),
        "--table",
        table.as_str(),
        "init-table",
    ];
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let ttl = db
        .client()
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.time_to_live_status(), Some(&TimeToLiveStatus::Enabled));
    assert_eq!(ttl.attribute_name(), Some("expires_at"));
    let described = db
        .client()
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let key = &described.table().unwrap().key_schema()[0];
    assert_eq!(key.attribute_name(), "key");

    let again = run(&args);
    assert!(
        again.status.success(),
        "a second run is a no-op: {}",
        stderr(&again)
    );
    assert!(stderr(&again).contains("already exists"));
}

/// A running binary; killed on drop if a test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until `addr` accepts connections, failing the test if the process
/// exits or [`WAIT`] passes.
fn wait_listening(child: &mut Child, port: u16) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("dynacache exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "dynacache never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body
}

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_counts_and_stops_cleanly_on_sigterm() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let (port, metrics_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dynacache.toml");
    std::fs::write(
        &config,
        format!(
            "memory_limit = \"8 MiB\"\nshutdown_grace = \"5s\"\nmax_local_age = \"1h\"\n[dynamodb]\ntable = \"{}\"\n",
            settings.table
        ),
    )
    .unwrap();
    let mut child = dynacache(&[
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics_listen,
        "--endpoint-url",
        &db.endpoint,
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_listening(&mut child, port);
    let mut running = Running(child);

    let mut c = McClient::connect(listen.parse().unwrap()).await;
    assert_eq!(c.call(b"set a 0 0 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"get a\r\n").await, "VALUE a 0 1\r\nx\r\nEND\r\n");
    assert_eq!(c.call(b"get nope\r\n").await, "END\r\n");
    let item = common::table_item(&db.client(), &settings, "a").await;
    assert!(item.is_some(), "the config file's table was used");

    let body = scrape(metrics_port);
    let stored = r#"dynacache_commands_total{command="set",outcome="stored"}"#;
    assert_eq!(metric(&body, stored), Some(1.0), "{body}");
    assert_eq!(
        metric(
            &body,
            r#"dynacache_commands_total{command="get",outcome="hit"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric(&body, "dynacache_cache_hits_total"), Some(1.0));
    assert_eq!(metric(&body, "dynacache_cache_misses_total"), Some(1.0));
    assert_eq!(
        metric(
            &body,
            r#"dynacache_dynamodb_requests_total{operation="PutItem",outcome="ok"}"#
        ),
        Some(1.0)
    );
    // The miss, and the start-up read of the flush_all marker (the next is an hour away).
    assert_eq!(
        metric(
            &body,
            r#"dynacache_dynamodb_requests_total{operation="GetItem",outcome="ok"}"#
        ),
        Some(2.0)
    );
    assert!(
        body.contains("dynacache_dynamodb_request_duration_seconds_bucket{operation=\"PutItem\""),
        "latency histogram"
    );

    // The cache gauges are published once a second: poll for them.
    let deadline = Instant::now() + WAIT;
    loop {
        let body = scrape(metrics_port);
        if metric(&body, "dynacache_cache_items") == Some(1.0) {
            assert_eq!(
                metric(&body, "dynacache_cache_limit_bytes"),
                Some(8.0 * 1024.0 * 1024.0)
            );
            assert!(metric(&body, "dynacache_cache_bytes").unwrap() > 2.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache gauges never published: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM: stop accepting, close idle connections, exit 0.
    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dynacache did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(c.closed().await, "the idle connection was closed");
    let mut log = String::new();
    running
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_from_the_standard_aws_variable() {
    let db = DynamoLocal::shared().await;
    let table = common::unique_name("env");
    let out = dynacache(&["--table", &table, "init-table"])
        .env("AWS_ENDPOINT_URL_DYNAMODB", &db.endpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let tables = db.client().list_tables().send().await.unwrap();
    assert!(tables.table_names().contains(&table));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics_listen = format!("127.0.0.1:{}", free_port());
    let mut child = dynacache(&[
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics_listen,
        "--endpoint-url",
        &db.endpoint,
        "--table",
        &settings.table,
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_listening(&mut child, port);
    let running = Running(child);

    // Writers send sets one after another and record each acknowledged key.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = McClient::connect(listen.parse().unwrap()).await;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{w}-{i}");
                c.send(format!("set {key} 0 0 {}\r\n{key}\r\n", key.len()).as_bytes())
                    .await;
                match c.try_reply().await {
                    Some(reply) if reply == "STORED\r\n" => acked.lock().unwrap().push(key),
                    _ => return,
                }
            }
        }));
    }
    // Kill -9 in the middle of the stream of writes.
    let deadline = Instant::now() + WAIT;
    while acked.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "writes too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(running); // SIGKILL, then reap
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200);
    for key in &acked {
        let item = common::table_item(&db.client(), &settings, key).await;
        let value = item.unwrap_or_else(|| panic!("acknowledged {key} is missing"));
        assert_eq!(value["value"].as_b().unwrap().as_ref(), key.as_bytes());
    }
}
