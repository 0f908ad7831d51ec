//! The real `dynacache` binary: CLI, config errors, init-table, serving
//! over TCP and a unix socket, health, metrics, logs and SIGTERM, against
//! DynamoDB Local.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::TimeToLiveStatus;
use common::exposition::{self, Exposition};
use common::{DynamoLocal, McClient, WAIT, free_port};
use dynacache::config::{Config, LogFormat, SocketMode};
use dynacache::store::TableSettings;

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
        "--check-config",
        "--log-format",
        "-l, --listen",
        "-p, --port",
        "-s, --unix-socket",
        "-a, --unix-socket-mode",
        "-c, --max-connections",
        "-m <MIB>",
        "/readyz",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}");
    }
    // The settings operators tune most, each with its default.
    for (flag, default) in [
        ("--max-local-age <DURATION>", "[default: 2s]"),
        ("--stale-on-error <BOOL>", "[default: true]"),
        ("--item-size-max <SIZE>", "[default: 400KiB]"),
        ("--log-format <FORMAT>", "[default: text]"),
    ] {
        let line = help
            .lines()
            .find(|l| l.contains(flag))
            .unwrap_or_else(|| panic!("--help lists {flag}"));
        let described = help
            .split(flag)
            .nth(1)
            .and_then(|rest| rest.split("\n  -").next())
            .unwrap_or(line);
        assert!(described.contains(default), "{flag}: {described}");
    }
    assert!(
        help.contains("[possible values: text, json]"),
        "--log-format is a value enum"
    );
    let out = run(&["init-table", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--table",
        "--endpoint-url",
        "--region",
        "--config",
        "--billing-mode",
        "--read-capacity",
        "--write-capacity",
    ] {
        assert!(help.contains(flag), "init-table --help mentions {flag}");
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
    // Flags after the sub-command, as users of aws, kubectl and cargo type them.
    let args = [
        "init-table",
        "--table",
        table.as_str(),
        "--endpoint-url",
        db.endpoint.as_str(),
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

    // And before it, as before.
    let again = run(&[
        "--endpoint-url",
        db.endpoint.as_str(),
        "--table",
        table.as_str(),
        "init-table",
    ]);
    assert!(
        again.status.success(),
        "a second run is a no-op: {}",
        stderr(&again)
    );
    assert!(stderr(&again).contains("already exists"));

    // Provisioned capacity from init-table's own flags.
    let provisioned = common::unique_name("prov");
    let out = run(&[
        "init-table",
        "--endpoint-url",
        db.endpoint.as_str(),
        "--table",
        provisioned.as_str(),
        "--billing-mode",
        "provisioned",
        "--read-capacity",
        "7",
        "--write-capacity",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let described = db
        .client()
        .describe_table()
        .table_name(&provisioned)
        .send()
        .await
        .unwrap();
    let throughput = described.table().unwrap().provisioned_throughput().unwrap();
    assert_eq!(throughput.read_capacity_units(), Some(7));
    assert_eq!(throughput.write_capacity_units(), Some(3));
}

/// `--check-config` with `args`: the effective configuration it prints.
fn checked(args: &[&str]) -> Config {
    let mut all = args.to_vec();
    all.push("--check-config");
    let out = run(&all);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    Config::from_toml(&String::from_utf8_lossy(&out.stdout)).expect("prints a config file")
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dynacache.toml");
    std::fs::write(
        &path,
        "memory_limit = \"1 GiB\"\nunix_socket = \"/run/dynacache/dynacache.sock\"\n[dynamodb]\ntable = \"sessions\"\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let config = checked(&["--config", path, "--table", "override"]);
    let expected = Config {
        memory_limit: bytesize::ByteSize::gib(1),
        unix_socket: Some("/run/dynacache/dynacache.sock".into()),
        dynamodb: dynacache::store::DynamoSettings {
            table: "override".into(),
            ..Default::default()
        },
        ..Config::default()
    };
    assert_eq!(config, expected, "file, then flags, over the defaults");

    let out = run(&["--config", path, "--table", "x", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty(), "nothing printed for a bad config");
    assert!(stderr(&out).contains("dynamodb.table"), "{}", stderr(&out));
}

#[test]
fn file_then_environment_then_flags_on_either_side_of_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dynacache.toml");
    std::fs::write(
        &path,
        "max_local_age = \"5s\"\nitem_size_max = \"100 KiB\"\n[dynamodb]\ntable = \"from-file\"\nregion = \"eu-west-1\"\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let checked_env = |args: &[&str], env: &[(&str, &str)]| -> Config {
        let mut cmd = dynacache(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        Config::from_toml(&String::from_utf8_lossy(&out.stdout)).unwrap()
    };
    let env = [
        ("DYNACACHE_MAX_LOCAL_AGE", "750ms"),
        ("DYNACACHE_DYNAMODB__TABLE", "from-env"),
        ("DYNACACHE_STALE_ON_ERROR", "false"),
        // Not a configuration key: left alone, not an error.
        ("DYNACACHE_SOMETHING_ELSE", "1"),
    ];
    let config = checked_env(&["--config", path, "--check-config"], &env);
    assert_eq!(
        config.max_local_age,
        Duration::from_millis(750),
        "env over file"
    );
    assert_eq!(config.dynamodb.table, "from-env");
    assert_eq!(
        config.dynamodb.region.as_deref(),
        Some("eu-west-1"),
        "file over defaults"
    );
    assert_eq!(config.item_size_max, bytesize::ByteSize::kib(100));
    assert!(!config.stale_on_error);
    for args in [
        &[
            "--config",
            path,
            "serve",
            "--max-local-age",
            "250ms",
            "--table",
            "from-flag",
            "--check-config",
        ][..],
        &[
            "--max-local-age",
            "250ms",
            "serve",
            "--config",
            path,
            "--table",
            "from-flag",
            "--check-config",
        ],
        &[
            "--check-config",
            "--table",
            "from-flag",
            "serve",
            "--max-local-age",
            "250ms",
            "-C",
            path,
        ],
    ] {
        let config = checked_env(args, &env);
        assert_eq!(
            config.max_local_age,
            Duration::from_millis(250),
            "flag over env: {args:?}"
        );
        assert_eq!(config.dynamodb.table, "from-flag", "{args:?}");
        assert_eq!(config.dynamodb.region.as_deref(), Some("eu-west-1"));
    }
    let config = checked(&[
        "--stale-on-error",
        "false",
        "--item-size-max",
        "2000",
        "--log-format",
        "json",
        "--max-local-age",
        "0s",
    ]);
    assert!(!config.stale_on_error);
    assert_eq!(config.item_size_max, bytesize::ByteSize::b(2000));
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.max_local_age, Duration::ZERO);

    // A bad value in the environment names the variable's key; exit 64.
    let out = dynacache(&["--check-config"])
        .env("DYNACACHE_MAX_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("MAX_CONNECTIONS"), "{}", stderr(&out));
    // A size no item can have is refused naming the key.
    let out = run(&["--item-size-max", "1MiB", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("item_size_max"), "{}", stderr(&out));
}

#[test]
fn memcached_style_flags() {
    let config = checked(&[
        "-l",
        "10.1.2.3",
        "-p",
        "11311",
        "-m",
        "128",
        "-c",
        "10",
        "-s",
        "/tmp/d.sock",
        "-a",
        "0660",
    ]);
    assert_eq!(config.listen, "10.1.2.3:11311".parse().unwrap());
    assert_eq!(config.memory_limit, bytesize::ByteSize::mib(128));
    assert_eq!(config.max_connections, 10);
    assert_eq!(
        config.unix_socket.as_deref(),
        Some(Path::new("/tmp/d.sock"))
    );
    assert_eq!(config.unix_socket_mode, SocketMode(0o660));

    // -l takes IP:PORT too; an explicit -p wins.
    assert_eq!(
        checked(&["-l", "[::1]:4000"]).listen,
        "[::1]:4000".parse().unwrap()
    );
    assert_eq!(
        checked(&["-l", "127.0.0.1:4000", "-p", "5000"]).listen,
        "127.0.0.1:5000".parse().unwrap()
    );
    // -p 0 turns TCP off: fine with a unix socket, an error without one.
    assert_eq!(
        checked(&["-p", "0", "-s", "/tmp/d.sock"]).tcp_listen(),
        None
    );
    let out = run(&["-p", "0", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("`listen`"), "{}", stderr(&out));
    assert_eq!(
        checked(&["--log-format", "json"]).log_format,
        LogFormat::Json
    );

    // Flags clap rejects are usage errors (exit 2), named.
    for (args, named) in [
        (&["-l", "localhost"][..], "--listen"),
        (&["-a", "0999"][..], "--unix-socket-mode"),
        (
            &["-m", "64", "--memory-limit", "1GiB"][..],
            "--memory-limit",
        ),
        (&["--log-format", "yaml"][..], "--log-format"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
}

/// A running binary; killed on drop if a test fails before stopping it.
struct Running(Child);

impl Running {
    /// SIGTERM, then the exit status (within [`WAIT`]).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dynacache did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The child's stderr, collected line by line as it is written.
fn tail_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr is piped");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

/// Polls `done` until it holds, failing the test after [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP/1.0 GET (or another method): status, headers, body.
fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http(port, "GET", path);
    (status, body)
}

/// Scrapes /metrics and parses it strictly.
fn exposition(port: u16) -> Exposition {
    let (status, body) = get(port, "/metrics");
    assert_eq!(status, 200);
    exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// One request over a unix socket, then `quit`: everything the server wrote.
fn unix_exchange(path: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request).unwrap();
    s.write_all(b"quit\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

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
    assert_eq!(running.terminate().code(), Some(0));
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
async fn unix_socket_beside_tcp_replaces_a_stale_file_and_removes_its_own() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dynacache.sock");
    let sock_arg = sock.to_str().unwrap();
    // Left behind by a run that was killed: bound, nobody accepting.
    drop(UnixListener::bind(&sock).unwrap());
    let port = free_port();
    let metrics_listen = format!("127.0.0.1:{}", free_port());
    let mut child = dynacache(&[
        "-l",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-s",
        sock_arg,
        "-a",
        "0660",
        "--metrics-listen",
        &metrics_listen,
        "--log-format",
        "json",
        "--table",
        &settings.table,
        "--endpoint-url",
        &db.endpoint,
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let log = tail_stderr(&mut child);
    wait_listening(&mut child, port);
    let mut running = Running(child);
    // The stale file refuses connections until dynacache has replaced it.
    eventually("the unix socket", || UnixStream::connect(&sock).is_ok()).await;

    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(unix_exchange(&sock, b"set u 0 0 2\r\nhi\r\n"), "STORED\r\n");
    let mut tcp = McClient::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    assert_eq!(tcp.call(b"get u\r\n").await, "VALUE u 0 2\r\nhi\r\nEND\r\n");

    // A second dynacache on the same path refuses to start and leaves ours alone.
    let out = run(&[
        "-p",
        "0",
        "-s",
        sock_arg,
        "--metrics-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--table",
        &settings.table,
        "--endpoint-url",
        &db.endpoint,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another server"), "{}", stderr(&out));
    assert_eq!(
        unix_exchange(&sock, b"get u\r\n"),
        "VALUE u 0 2\r\nhi\r\nEND\r\n"
    );

    assert_eq!(running.terminate().code(), Some(0));
    assert!(!sock.exists(), "the socket file is removed on a clean exit");

    // --log-format json: every line is a JSON object; start-up says where it listens.
    let log = log.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["fields"]["message"] == "serving")
        .unwrap_or_else(|| panic!("no serving line: {log}"));
    let listen = serving["fields"]["listen"].as_str().unwrap();
    assert!(
        listen.contains(&format!("127.0.0.1:{port}")) && listen.contains("unix:"),
        "{listen}"
    );
    assert!(log.contains("removed a stale socket file"), "{log}");
}

/// DescribeTable calls made so far, from /metrics.
fn describe_calls(metrics_port: u16) -> f64 {
    let e = exposition(metrics_port);
    ["ok", "error", "timeout", "throttled"]
        .iter()
        .map(|outcome| {
            e.count(
                "dynacache_dynamodb_requests_total",
                &[("operation", "DescribeTable"), ("outcome", outcome)],
            )
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_dynamodb_and_an_outage_logs_once() {
    const FAILING: &str = "dynamodb calls are failing";
    let mut db = DynamoLocal::private().await;
    let settings = db.new_table().await;
    let (port, metrics_port) = (free_port(), free_port());
    let mut child = dynacache(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
        "--table",
        &settings.table,
        "--endpoint-url",
        &db.endpoint,
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let log = tail_stderr(&mut child);
    wait_listening(&mut child, port);
    let _running = Running(child);
    let log_count = |text: &str| log.lock().unwrap().matches(text).count();

    assert_eq!(get(metrics_port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(metrics_port, "/readyz"), (200, "ready\n".into()));
    // A probe storm costs at most one DescribeTable per second.
    let before = describe_calls(metrics_port);
    let started = Instant::now();
    for _ in 0..40 {
        assert_eq!(get(metrics_port, "/readyz").0, 200);
    }
    let calls = describe_calls(metrics_port) - before;
    let bound = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(calls <= bound, "{calls} DescribeTable calls for 40 probes");

    db.stop();
    let mut body = String::new();
    eventually("/readyz to fail", || {
        let (status, b) = get(metrics_port, "/readyz");
        body = b;
        status == 503
    })
    .await;
    assert!(
        body.starts_with("not ready: DescribeTable") && body.contains(&settings.table),
        "{body}"
    );
    assert_eq!(get(metrics_port, "/healthz").0, 200, "alive all the same");
    let mut c = McClient::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    for i in 0..4 {
        let reply = c.call(format!("get miss{i}\r\n").as_bytes()).await;
        assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    }
    assert_eq!(log_count(FAILING), 1, "one warning for the whole outage");
    // Connection errors are retried by the SDK before the call fails.
    let retries = exposition(metrics_port).count(
        "dynacache_dynamodb_retries_total",
        &[("operation", "GetItem")],
    );
    assert!(retries >= 4.0, "{retries} retries for 4 failed GetItems");

    // DynamoDB Local comes back on the same port, empty (it keeps data in
    // memory): the table is created again.
    let _db = DynamoLocal::start_on(db.port).await;
    let store = common::connect(settings.clone()).await;
    assert!(store.create_table(&TableSettings::default()).await.unwrap());
    eventually("/readyz to recover", || {
        get(metrics_port, "/readyz").0 == 200
    })
    .await;
    assert_eq!(c.call(b"set back 0 0 1\r\nx\r\n").await, "STORED\r\n");
    // The episode ends once calls have succeeded for a quiet while; probes
    // keep calling DescribeTable until then.
    eventually("the recovery line", || {
        get(metrics_port, "/readyz");
        log_count("dynamodb answers again") == 1
    })
    .await;
    assert_eq!(log_count(FAILING), 1, "{}", log.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let (port, metrics_port) = (free_port(), free_port());
    let mut child = dynacache(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
        "-c",
        "7",
        "--table",
        &settings.table,
        "--endpoint-url",
        &db.endpoint,
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_listening(&mut child, port);
    let _running = Running(child);

    let (status, head, _) = http(metrics_port, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(http(metrics_port, "POST", "/metrics").0, 405);
    assert_eq!(get(metrics_port, "/nope").0, 404);

    // wait_listening's probe connection is counted asynchronously: let it
    // settle before the baseline.
    let deadline = Instant::now() + WAIT;
    let before = loop {
        let scrape = exposition(metrics_port);
        if scrape.count("dynacache_connections_total", &[]) >= 1.0
            && scrape.get("dynacache_connections", &[]) == Some(0.0)
        {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "the probe connection never settled"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut c = McClient::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    for (request, reply) in [
        (&b"set k 0 0 1\r\nv\r\n"[..], "STORED\r\n"),
        (b"get k\r\n", "VALUE k 0 1\r\nv\r\nEND\r\n"),
        (b"add k 0 0 1\r\nw\r\n", "NOT_STORED\r\n"),
        (b"touch k 100\r\n", "TOUCHED\r\n"),
        (b"delete k\r\n", "DELETED\r\n"),
        (b"get k\r\n", "END\r\n"),
    ] {
        assert_eq!(c.call(request).await, reply);
    }
    let after = exposition(metrics_port);

    for (name, kind) in &after.types {
        assert!(name.starts_with("dynacache_"), "{name}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        }
    }
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.count(name, labels) - before.count(name, labels)
    };
    let commands = "dynacache_commands_total";
    for (command, outcome) in [
        ("set", "stored"),
        ("get", "hit"),
        ("get", "miss"),
        ("add", "not_stored"),
        ("touch", "touched"),
        ("delete", "deleted"),
    ] {
        let labels = [("command", command), ("outcome", outcome)];
        assert_eq!(moved(commands, &labels), 1.0, "{command} {outcome}");
    }
    let latency = "dynacache_command_duration_seconds_count";
    assert_eq!(moved(latency, &[("command", "get")]), 2.0);
    assert_eq!(moved(latency, &[("command", "set")]), 1.0);
    assert_eq!(moved("dynacache_cache_hits_total", &[]), 1.0);
    assert_eq!(moved("dynacache_cache_misses_total", &[]), 1.0);
    assert_eq!(moved("dynacache_connections_total", &[]), 1.0);
    assert_eq!(after.get("dynacache_connections", &[]), Some(1.0));
    assert_eq!(after.get("dynacache_connections_limit", &[]), Some(7.0));
    // set: PutItem; add of a cached key: a GetItem confirms it is there
    // (refusals are decided on DynamoDB's answer, never the cache's); touch:
    // UpdateItem; delete: PutItem of a tombstone; get after it: GetItem.
    let requests = "dynacache_dynamodb_requests_total";
    for (operation, outcome, n) in [
        ("PutItem", "ok", 2.0),
        ("PutItem", "conditional_failed", 0.0),
        ("UpdateItem", "ok", 1.0),
        ("GetItem", "ok", 2.0),
    ] {
        let labels = [("operation", operation), ("outcome", outcome)];
        assert_eq!(moved(requests, &labels), n, "{operation} {outcome}");
    }
    // Capacity as DynamoDB reports it: a strongly consistent read of a
    // small item is 1 RCU, a small write 1 WCU.
    let read = "dynacache_dynamodb_consumed_read_capacity_units_total";
    let write = "dynacache_dynamodb_consumed_write_capacity_units_total";
    assert_eq!(moved(read, &[("operation", "GetItem")]), 2.0);
    for (operation, n) in [("PutItem", 2.0), ("UpdateItem", 1.0)] {
        assert_eq!(moved(write, &[("operation", operation)]), n, "{operation}");
    }
}

#[test]
fn exposition_parser_is_strict() {
    let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\n\
                # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n";
    let parsed = exposition::parse(good).unwrap();
    assert_eq!(
        parsed.get("a_total", &[("y", "q\""), ("x", "1")]),
        Some(3.0)
    );
    assert_eq!(parsed.get("h_count", &[]), Some(2.0));
    for bad in [
        "a b\n",                    // bad value
        "1a 1\n",                   // bad name
        "a{x=1} 1\n",               // unquoted label
        "a{x=\"1\" 1\n",            // unterminated labels
        "a 1\na 2\n",               // repeated series
        "a 1\n# TYPE a counter\n",  // TYPE after samples
        "a 1\nb 1\na{x=\"\"} 1\n",  // split family
        "# TYPE a counter\na -1\n", // negative counter
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
    ] {
        assert!(exposition::parse(bad).is_err(), "accepted {bad:?}");
    }
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
