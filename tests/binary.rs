//! The real `dynacache` binary: CLI, config errors, init-table, serving
//! over TCP and a unix socket, health, metrics, logs and SIGTERM, against
//! DynamoDB Local.
//!
//! Every process a test starts is bounded by [`WAIT`] and stopped when the
//! test ends, passed or failed ([`Running`]); everything is on loopback.
//! HTTP goes through [`http`] alone, and every read of /metrics through the
//! strict exposition parser ([`exposition`]).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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

/// A running binary; killed (SIGKILL) and reaped on drop, so a test that
/// fails before stopping it leaves nothing behind.
struct Running(Child);

impl Running {
    /// SIGTERM, then the exit status (within [`WAIT`]).
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.exit_within(WAIT, "exit after SIGTERM")
    }

    /// The exit status, once the process exits by itself within `limit`.
    fn exit_within(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dynacache did not {what} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Runs `cmd` to its exit, which must come within [`WAIT`] (else it is
/// killed and the test fails): its status, stdout and stderr.
fn finish(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let mut running = Running(child);
    let stdout = drain(running.0.stdout.take().unwrap());
    let stderr = drain(running.0.stderr.take().unwrap());
    let status = running.exit_within(WAIT, "exit");
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The binary with `args`, run to its exit (within [`WAIT`]).
fn run(args: &[&str]) -> Output {
    finish(dynacache(args))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// --- The command line -----------------------------------------------------

#[test]
fn help_lists_every_flag_and_the_sub_commands() {
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
}

#[test]
fn help_gives_the_defaults_of_the_settings_tuned_most() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--max-local-age <DURATION>", "[default: 2s]"),
        ("--stale-on-error <BOOL>", "[default: true]"),
        ("--item-size-max <SIZE>", "[default: 1MiB]"),
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
}

#[test]
fn init_table_help_lists_its_flags() {
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
}

#[test]
fn version_prints_the_package_version() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

// --- Configuration errors: exit 64 (EX_USAGE), naming the key -------------

#[test]
fn a_bad_config_file_exits_64_naming_the_key() {
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
}

#[test]
fn a_missing_config_file_exits_64() {
    let out = run(&["--config", "/nonexistent/dynacache.toml"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn flags_are_validated_too() {
    let out = run(&["--table", "x"]);
    assert_eq!(out.status.code(), Some(64), "flags are validated too");
}

/// Values of the right type that cannot work (src/config.rs gives each
/// bound's reason), each as its `DYNACACHE_<KEY>` variable.
const UNWORKABLE: &[(&str, &str, &str)] = &[
    // A 15 GB allocation at start-up, then an abort.
    ("DYNACACHE_CACHE_SHARDS", "100000000", "cache_shards"),
    ("DYNACACHE_CACHE_SHARDS", "65537", "cache_shards"),
    // 2048 shards of the default 64 MiB: 32 KiB each.
    ("DYNACACHE_CACHE_SHARDS", "2048", "cache_shards"),
    ("DYNACACHE_MAX_CONNECTIONS", "0", "max_connections"),
    // Beyond any process's open-file limit.
    (
        "DYNACACHE_MAX_CONNECTIONS",
        "99999999999",
        "max_connections",
    ),
    ("DYNACACHE_MEMORY_LIMIT", "0", "memory_limit"),
    // Beyond any machine's memory.
    ("DYNACACHE_MEMORY_LIMIT", "97.7 PiB", "memory_limit"),
    ("DYNACACHE_REQUEST_TIMEOUT", "0s", "request_timeout"),
    ("DYNACACHE_REQUEST_TIMEOUT", "2days", "request_timeout"),
    ("DYNACACHE_WRITE_TIMEOUT", "0s", "write_timeout"),
    ("DYNACACHE_WRITE_TIMEOUT", "2days", "write_timeout"),
];

#[test]
fn values_that_cannot_work_exit_64_naming_the_key() {
    // Should one start after all: fresh loopback ports, and a DynamoDB
    // endpoint where nothing answers (the discard port).
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics_listen = format!("127.0.0.1:{}", free_port());
    let serve = [
        "--listen",
        listen.as_str(),
        "--metrics-listen",
        metrics_listen.as_str(),
        "--endpoint-url",
        "http://127.0.0.1:9",
    ];
    for &(variable, value, key) in UNWORKABLE {
        let check: Vec<&str> = serve.iter().copied().chain(["--check-config"]).collect();
        for (how, args) in [("--check-config", &check[..]), ("serving", &serve[..])] {
            let mut cmd = dynacache(args);
            cmd.env(variable, value);
            // Bounded: a run that starts serving is killed after WAIT.
            let out = finish(cmd);
            let err = stderr(&out);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{how}, {variable}={value}: {err}"
            );
            assert!(
                out.stdout.is_empty(),
                "{how}, {variable}={value}: printed nothing"
            );
            // One line, the error: nothing was started, so nothing logged.
            assert!(
                err.starts_with(&format!("dynacache: config key `{key}`: "))
                    && err.lines().count() == 1,
                "{how}, {variable}={value}: {err}"
            );
        }
    }
}

// --- init-table ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_table_creates_the_table_with_ttl_and_is_idempotent() {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_table_provisions_the_capacity_its_flags_give() {
    let db = DynamoLocal::shared().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_from_the_standard_aws_variable() {
    let db = DynamoLocal::shared().await;
    let table = common::unique_name("env");
    let mut cmd = dynacache(&["--table", &table, "init-table"]);
    cmd.env("AWS_ENDPOINT_URL_DYNAMODB", &db.endpoint);
    let out = finish(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let tables = db.client().list_tables().send().await.unwrap();
    assert!(tables.table_names().contains(&table));
}

// --- --check-config and the layers ----------------------------------------

/// The binary with `args` (one of them `--check-config`) and the
/// environment `env`: the effective configuration it prints.
fn checked_env(args: &[&str], env: &[(&str, &str)]) -> Config {
    let mut cmd = dynacache(args);
    cmd.envs(env.iter().copied());
    let out = finish(cmd);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    Config::from_toml(&String::from_utf8_lossy(&out.stdout)).expect("prints a config file")
}

/// `--check-config` with `args`: the effective configuration it prints.
fn checked(args: &[&str]) -> Config {
    let mut all = args.to_vec();
    all.push("--check-config");
    checked_env(&all, &[])
}

/// A configuration file in `dir` with `text`; its path.
fn config_file(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("dynacache.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const CHECKED_FILE: &str = "memory_limit = \"1 GiB\"\nunix_socket = \"/run/dynacache/dynacache.sock\"\n[dynamodb]\ntable = \"sessions\"\n";

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, CHECKED_FILE);
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
}

#[test]
fn fleet_mode_comes_from_the_environment_and_its_secret_is_never_printed() {
    let secret = "a fleet secret, more than sixteen bytes";
    let env = [
        ("DYNACACHE_FLEET__LISTEN", "127.0.0.1:11311"),
        ("DYNACACHE_FLEET__ADVERTISE", "10.0.3.7:11311"),
        ("DYNACACHE_FLEET_SECRET", secret),
    ];
    let mut cmd = dynacache(&["--check-config", "--fleet-lease", "2s"]);
    cmd.envs(env);
    let out = finish(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !printed.contains(secret),
        "the secret is printed:\n{printed}"
    );
    let config = Config::from_toml(&printed).unwrap();
    assert_eq!(
        config.fleet.listen,
        Some("127.0.0.1:11311".parse().unwrap())
    );
    assert_eq!(config.fleet.advertise.as_deref(), Some("10.0.3.7:11311"));
    assert_eq!(config.fleet.lease, Duration::from_secs(2));
    // An address peers cannot dial is refused, naming fleet.advertise:
    // every address of the host (peers would dial themselves), or no port.
    for (listen, advertise) in [
        ("0.0.0.0:11311", None),
        ("127.0.0.1:11311", Some("10.0.3.7")),
        ("127.0.0.1:11311", Some("10.0.3.7:")),
        ("127.0.0.1:11311", Some(":11311")),
    ] {
        let mut cmd = dynacache(&["--check-config"]);
        cmd.env("DYNACACHE_FLEET__LISTEN", listen)
            .env("DYNACACHE_FLEET_SECRET", secret);
        if let Some(advertise) = advertise {
            cmd.env("DYNACACHE_FLEET__ADVERTISE", advertise);
        }
        let out = finish(cmd);
        assert_eq!(out.status.code(), Some(64), "{listen} {advertise:?}");
        assert!(
            stderr(&out).starts_with("dynacache: config key `fleet.advertise`: "),
            "{}",
            stderr(&out)
        );
    }
    // Without a secret (or a short one), fleet mode is refused, naming it.
    for short in [None, Some("too short")] {
        let mut cmd = dynacache(&["--check-config"]);
        cmd.env("DYNACACHE_FLEET__LISTEN", "127.0.0.1:11311");
        if let Some(short) = short {
            cmd.env("DYNACACHE_FLEET_SECRET", short);
        }
        let out = finish(cmd);
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("DYNACACHE_FLEET_SECRET"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn check_config_prints_nothing_for_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, CHECKED_FILE);
    let path = path.to_str().unwrap();
    let out = run(&["--config", path, "--table", "x", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty(), "nothing printed for a bad config");
    assert!(stderr(&out).contains("dynamodb.table"), "{}", stderr(&out));
}

const LAYERED_FILE: &str = "max_local_age = \"5s\"\nitem_size_max = \"100 KiB\"\n[dynamodb]\ntable = \"from-file\"\nregion = \"eu-west-1\"\n";

const LAYERED_ENV: [(&str, &str); 4] = [
    ("DYNACACHE_MAX_LOCAL_AGE", "750ms"),
    ("DYNACACHE_DYNAMODB__TABLE", "from-env"),
    ("DYNACACHE_STALE_ON_ERROR", "false"),
    // Not a configuration key: left alone, not an error.
    ("DYNACACHE_SOMETHING_ELSE", "1"),
];

#[test]
fn environment_overrides_the_file_and_the_file_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, LAYERED_FILE);
    let path = path.to_str().unwrap();
    let config = checked_env(&["--config", path, "--check-config"], &LAYERED_ENV);
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
}

#[test]
fn flags_override_the_environment_on_either_side_of_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, LAYERED_FILE);
    let path = path.to_str().unwrap();
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
        let config = checked_env(args, &LAYERED_ENV);
        assert_eq!(
            config.max_local_age,
            Duration::from_millis(250),
            "flag over env: {args:?}"
        );
        assert_eq!(config.dynamodb.table, "from-flag", "{args:?}");
        assert_eq!(config.dynamodb.region.as_deref(), Some("eu-west-1"));
    }
}

#[test]
fn cache_and_logging_flags_reach_their_keys() {
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
    assert_eq!(
        checked(&["--log-format", "json"]).log_format,
        LogFormat::Json
    );
}

#[test]
fn a_bad_environment_value_exits_64_naming_its_variable() {
    let mut cmd = dynacache(&["--check-config"]);
    cmd.env("DYNACACHE_MAX_CONNECTIONS", "many");
    let out = finish(cmd);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("MAX_CONNECTIONS"), "{}", stderr(&out));
}

#[test]
fn an_item_size_max_no_item_can_have_exits_64() {
    let out = run(&["--item-size-max", "5MiB", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("item_size_max"), "{}", stderr(&out));
}

#[test]
fn memcached_style_flags_reach_their_keys() {
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
}

#[test]
fn listen_takes_an_ip_and_port_and_an_explicit_port_wins() {
    assert_eq!(
        checked(&["-l", "[::1]:4000"]).listen,
        "[::1]:4000".parse().unwrap()
    );
    assert_eq!(
        checked(&["-l", "127.0.0.1:4000", "-p", "5000"]).listen,
        "127.0.0.1:5000".parse().unwrap()
    );
}

#[test]
fn port_0_turns_tcp_off_and_then_needs_a_unix_socket() {
    assert_eq!(
        checked(&["-p", "0", "-s", "/tmp/d.sock"]).tcp_listen(),
        None
    );
    let out = run(&["-p", "0", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("`listen`"), "{}", stderr(&out));
}

#[test]
fn flags_clap_rejects_exit_2_naming_the_flag() {
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

// --- Serving ---------------------------------------------------------------

/// A dynacache serving memcached clients on 127.0.0.1:`port` and
/// /metrics on 127.0.0.1:`metrics_port`; its stderr collected as written.
struct Server {
    running: Running,
    port: u16,
    metrics_port: u16,
    log: Arc<Mutex<String>>,
    tail: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the binary with `args`, which must make it listen on `port`
    /// (and serve metrics on `metrics_port`); returns once it accepts there.
    fn start(args: &[&str], port: u16, metrics_port: u16) -> Server {
        let child = dynacache(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut running = Running(child);
        let (log, tail) = tail_stderr(&mut running.0);
        let mut server = Server {
            running,
            port,
            metrics_port,
            log,
            tail: Some(tail),
        };
        server.wait_listening();
        server
    }

    /// Polls until the memcached port accepts connections, failing the test
    /// if the process exits or [`WAIT`] passes.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.running.0.try_wait().unwrap() {
                panic!("dynacache exited early: {status}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dynacache never listened on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The memcached address.
    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// What it has logged so far.
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM; then its exit status (within [`WAIT`]) and everything it logged.
    fn terminate(&mut self) -> (ExitStatus, String) {
        let status = self.running.terminate();
        // The process has exited: its stderr reaches its end.
        if let Some(tail) = self.tail.take() {
            tail.join().unwrap();
        }
        (status, self.log())
    }
}

/// A dynacache serving `args` on fresh loopback ports.
fn serve(args: &[&str]) -> Server {
    let (port, metrics_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let mut all: Vec<&str> = vec!["--listen", &listen, "--metrics-listen", &metrics_listen];
    all.extend_from_slice(args);
    Server::start(&all, port, metrics_port)
}

/// The child's stderr, collected line by line as it is written, and the
/// thread collecting it (done once the child has exited).
fn tail_stderr(child: &mut Child) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr is piped");
    let sink = log.clone();
    let tail = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (log, tail)
}

/// Polls `done` until it holds, failing the test after [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP response: status, head (status line and headers), body.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// The one way these tests speak HTTP: an HTTP/1.0 `method` of `path` on
/// 127.0.0.1:`port`, read to the end (bounded by [`WAIT`]).
fn http(port: u16, method: &str, path: &str) -> Response {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The one way these tests read /metrics: scraped, and parsed strictly.
fn exposition(port: u16) -> Exposition {
    let Response { status, body, .. } = http(port, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// One request over a unix socket, then `quit`: everything the server wrote.
fn unix_exchange(path: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s.write_all(request).unwrap();
    s.write_all(b"quit\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

/// The configuration file of the serving tests, on `table`: a small
/// budget, a short grace, and the flush_all marker read only at start-up
/// (the next read is an hour away).
fn serving_config(dir: &tempfile::TempDir, table: &str) -> PathBuf {
    config_file(
        dir,
        &format!(
            "memory_limit = \"8 MiB\"\nshutdown_grace = \"5s\"\nmax_local_age = \"1h\"\n[dynamodb]\ntable = \"{table}\"\n"
        ),
    )
}

/// A dynacache on `db` started with [`serving_config`] for a new table;
/// and that table's settings.
async fn serve_with_a_config_file(
    db: &DynamoLocal,
) -> (Server, dynacache::store::DynamoSettings, tempfile::TempDir) {
    let settings = db.new_table().await;
    let dir = tempfile::tempdir().unwrap();
    let config = serving_config(&dir, &settings.table);
    let server = serve(&[
        "--config",
        config.to_str().unwrap(),
        "--endpoint-url",
        &db.endpoint,
    ]);
    (server, settings, dir)
}

/// `set a`, `get a` (a hit) and `get nope` (a miss) on a new connection.
async fn set_hit_and_miss(server: &Server) -> McClient {
    let mut c = McClient::connect(server.addr()).await;
    assert_eq!(c.call(b"set a 0 0 1\r\nx\r\n").await, "STORED\r\n");
    assert_eq!(c.call(b"get a\r\n").await, "VALUE a 0 1\r\nx\r\nEND\r\n");
    assert_eq!(c.call(b"get nope\r\n").await, "END\r\n");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_the_settings_of_its_config_file() {
    let db = DynamoLocal::shared().await;
    let (server, settings, _dir) = serve_with_a_config_file(&db).await;
    let _c = set_hit_and_miss(&server).await;
    let item = common::table_item(&db.client(), &settings, "a").await;
    assert!(item.is_some(), "the config file's table was used");

    // The cache gauges are published once a second: poll for them.
    let deadline = Instant::now() + WAIT;
    loop {
        let e = exposition(server.metrics_port);
        // `a` (`nope`, remembered as absent, is charged but not an item).
        if e.get("dynacache_cache_items", &[]) == Some(1.0) {
            assert_eq!(
                e.get("dynacache_cache_limit_bytes", &[]),
                Some(8.0 * 1024.0 * 1024.0),
                "the config file's memory_limit"
            );
            assert!(e.get("dynacache_cache_bytes", &[]).unwrap() > 2.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache gauges never published: {:?}",
            e.samples
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_from_start_up() {
    let db = DynamoLocal::shared().await;
    let (server, _settings, _dir) = serve_with_a_config_file(&db).await;
    let _c = set_hit_and_miss(&server).await;

    let e = exposition(server.metrics_port);
    let commands = "dynacache_commands_total";
    assert_eq!(
        e.get(commands, &[("command", "set"), ("outcome", "stored")]),
        Some(1.0),
        "{:?}",
        e.samples
    );
    assert_eq!(
        e.get(commands, &[("command", "get"), ("outcome", "hit")]),
        Some(1.0)
    );
    assert_eq!(e.get("dynacache_cache_hits_total", &[]), Some(1.0));
    assert_eq!(e.get("dynacache_cache_misses_total", &[]), Some(1.0));
    let requests = "dynacache_dynamodb_requests_total";
    assert_eq!(
        e.get(requests, &[("operation", "PutItem"), ("outcome", "ok")]),
        Some(1.0)
    );
    // The miss, and the start-up read of the flush_all marker (the next is an hour away).
    assert_eq!(
        e.get(requests, &[("operation", "GetItem"), ("outcome", "ok")]),
        Some(2.0)
    );
    let latency = "dynacache_dynamodb_request_duration_seconds";
    assert_eq!(
        e.types.get(latency).map(String::as_str),
        Some("histogram"),
        "latency histogram"
    );
    let put_latency = e.get(
        &format!("{latency}_bucket"),
        &[("operation", "PutItem"), ("le", "+Inf")],
    );
    assert!(
        put_latency.is_some_and(|n| n >= 1.0),
        "latency histogram of PutItem: {put_latency:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_tell_what_compression_and_chunks_do() {
    let db = DynamoLocal::shared().await;
    let (mut server, _settings, dir) = serve_with_a_config_file(&db).await;
    let mut c = McClient::connect(server.addr()).await;
    let set = |key: &str, value: &[u8]| {
        let mut req = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        req
    };
    // A page that compresses into one item; bytes that do not, over three.
    let page = common::corpus::html(100_000, 1);
    let noise = common::corpus::random(1_000_000, 2);
    assert_eq!(c.call(&set("page", &page)).await, "STORED\r\n");
    assert_eq!(c.call(&set("noise", &noise)).await, "STORED\r\n");
    let e = exposition(server.metrics_port);
    let bytes = |direction: &str, form: &str| {
        e.get(
            "dynacache_store_value_bytes_total",
            &[("direction", direction), ("form", form)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(bytes("write", "plain"), 1_100_000.0, "{:?}", e.samples);
    let stored = bytes("write", "stored");
    assert!(
        stored > 1_000_000.0 && stored < 1_020_000.0,
        "the page stored in about a ninth: {stored}"
    );
    let values = |direction: &str, form: &str| {
        e.get(
            "dynacache_store_values_total",
            &[("direction", direction), ("form", form)],
        )
    };
    assert_eq!(values("write", "compressed"), Some(1.0));
    assert_eq!(values("write", "chunked"), Some(1.0));
    let units = "dynacache_dynamodb_call_capacity_units";
    assert_eq!(e.types.get(units).map(String::as_str), Some("histogram"));
    assert_eq!(
        e.get(
            &format!("{units}_count"),
            &[("operation", "TransactWriteItems")]
        ),
        Some(1.0)
    );
    assert!(
        e.get(
            "dynacache_dynamodb_consumed_write_capacity_units_total",
            &[("operation", "TransactWriteItems")]
        )
        .is_some_and(|u| u > 0.0)
    );
    // Read back by a restarted sidecar: decompressed, and assembled from chunks.
    let (status, _) = server.terminate();
    assert!(status.success());
    let config = dir.path().join("dynacache.toml");
    let again = serve(&[
        "--config",
        config.to_str().unwrap(),
        "--endpoint-url",
        &db.endpoint,
    ]);
    let mut c = McClient::connect(again.addr()).await;
    let mut expected = format!("VALUE noise 0 {}\r\n", noise.len()).into_bytes();
    expected.extend_from_slice(&noise);
    expected.extend_from_slice(b"\r\nEND\r\n");
    assert!(c.call_bytes(b"get noise\r\n").await == expected);
    let mut expected = format!("VALUE page 0 {}\r\n", page.len()).into_bytes();
    expected.extend_from_slice(&page);
    expected.extend_from_slice(b"\r\nEND\r\n");
    assert!(c.call_bytes(b"get page\r\n").await == expected);
    let e = exposition(again.metrics_port);
    let read = |form: &str| {
        e.get(
            "dynacache_store_value_bytes_total",
            &[("direction", "read"), ("form", form)],
        )
    };
    assert_eq!(read("plain"), Some(1_100_000.0));
    assert!(read("stored").is_some_and(|b| b < 1_020_000.0));
    assert_eq!(
        e.get(
            "dynacache_store_values_total",
            &[("direction", "read"), ("form", "chunked")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_cleanly_on_sigterm() {
    let db = DynamoLocal::shared().await;
    let (mut server, _settings, _dir) = serve_with_a_config_file(&db).await;
    let mut c = set_hit_and_miss(&server).await;

    // SIGTERM: stop accepting, close idle connections, exit 0.
    let (status, log) = server.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(c.closed().await, "the idle connection was closed");
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

// --- A unix socket ----------------------------------------------------------

/// A dynacache serving TCP on a fresh port and the unix socket `sock`
/// (mode 0660), with `args` added, on a new table of `db`; once both
/// accept. And the table's settings.
async fn serve_tcp_and_unix(
    db: &DynamoLocal,
    sock: &Path,
    args: &[&str],
) -> (Server, dynacache::store::DynamoSettings) {
    let settings = db.new_table().await;
    let (port, metrics_port) = (free_port(), free_port());
    let port_arg = port.to_string();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let mut all: Vec<&str> = vec![
        "-l",
        "127.0.0.1",
        "-p",
        &port_arg,
        "-s",
        sock.to_str().unwrap(),
        "-a",
        "0660",
        "--metrics-listen",
        &metrics_listen,
        "--table",
        &settings.table,
        "--endpoint-url",
        &db.endpoint,
    ];
    all.extend_from_slice(args);
    let server = Server::start(&all, port, metrics_port);
    // A stale file refuses connections until dynacache has replaced it.
    eventually("the unix socket", || UnixStream::connect(sock).is_ok()).await;
    (server, settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_beside_tcp_replaces_a_stale_file_and_removes_its_own() {
    let db = DynamoLocal::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dynacache.sock");
    // Left behind by a run that was killed: bound, nobody accepting.
    drop(UnixListener::bind(&sock).unwrap());
    let (mut server, _) = serve_tcp_and_unix(&db, &sock, &[]).await;

    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(unix_exchange(&sock, b"set u 0 0 2\r\nhi\r\n"), "STORED\r\n");
    let mut tcp = McClient::connect(server.addr()).await;
    assert_eq!(tcp.call(b"get u\r\n").await, "VALUE u 0 2\r\nhi\r\nEND\r\n");

    let (status, log) = server.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!sock.exists(), "the socket file is removed on a clean exit");
    assert!(log.contains("removed a stale socket file"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_unix_socket_refuses_to_start() {
    let db = DynamoLocal::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dynacache.sock");
    let sock_arg = sock.to_str().unwrap();
    let (_server, settings) = serve_tcp_and_unix(&db, &sock, &[]).await;
    assert_eq!(unix_exchange(&sock, b"set u 0 0 2\r\nhi\r\n"), "STORED\r\n");

    // A second one refuses to start (within WAIT) and leaves ours alone.
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_and_say_where_it_listens() {
    let db = DynamoLocal::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dynacache.sock");
    // A stale file, so its removal is logged too.
    drop(UnixListener::bind(&sock).unwrap());
    let (mut server, _) = serve_tcp_and_unix(&db, &sock, &["--log-format", "json"]).await;
    let port = server.port;
    assert_eq!(unix_exchange(&sock, b"set u 0 0 2\r\nhi\r\n"), "STORED\r\n");
    let (status, log) = server.terminate();
    assert_eq!(status.code(), Some(0), "{log}");

    // Every line is a JSON object; start-up says where it listens.
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

// --- Health and readiness ---------------------------------------------------

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

/// A dynacache on `db`, on a new table of its own.
async fn serve_on(db: &DynamoLocal) -> (Server, dynacache::store::DynamoSettings) {
    let settings = db.new_table().await;
    let server = serve(&["--table", &settings.table, "--endpoint-url", &db.endpoint]);
    (server, settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_ok_while_dynamodb_answers() {
    let db = DynamoLocal::shared().await;
    let (server, _) = serve_on(&db).await;
    let healthz = http(server.metrics_port, "GET", "/healthz");
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));
    let readyz = http(server.metrics_port, "GET", "/readyz");
    assert_eq!((readyz.status, readyz.body.as_str()), (200, "ready\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_storm_costs_at_most_one_describe_table_a_second() {
    let db = DynamoLocal::shared().await;
    let (server, _) = serve_on(&db).await;
    let metrics_port = server.metrics_port;
    let before = describe_calls(metrics_port);
    let started = Instant::now();
    for _ in 0..40 {
        assert_eq!(http(metrics_port, "GET", "/readyz").status, 200);
    }
    let calls = describe_calls(metrics_port) - before;
    let bound = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(calls <= bound, "{calls} DescribeTable calls for 40 probes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_dynamodb_and_an_outage_logs_once() {
    const FAILING: &str = "dynamodb calls are failing";
    let mut db = DynamoLocal::private().await;
    let (server, settings) = serve_on(&db).await;
    let metrics_port = server.metrics_port;
    let log_count = |text: &str| server.log().matches(text).count();
    let readyz = || http(metrics_port, "GET", "/readyz");
    assert_eq!(readyz().status, 200, "ready before the outage");

    db.stop();
    let mut body = String::new();
    eventually("/readyz to fail", || {
        let response = readyz();
        body = response.body;
        response.status == 503
    })
    .await;
    assert!(
        body.starts_with("not ready: DescribeTable") && body.contains(&settings.table),
        "{body}"
    );
    assert_eq!(
        http(metrics_port, "GET", "/healthz").status,
        200,
        "alive all the same"
    );
    let mut c = McClient::connect(server.addr()).await;
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
    eventually("/readyz to recover", || readyz().status == 200).await;
    assert_eq!(c.call(b"set back 0 0 1\r\nx\r\n").await, "STORED\r\n");
    // The episode ends once calls have succeeded for a quiet while; probes
    // keep calling DescribeTable until then.
    eventually("the recovery line", || {
        readyz();
        log_count("dynamodb answers again") == 1
    })
    .await;
    assert_eq!(log_count(FAILING), 1, "{}", server.log());
}

// --- Metrics ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_served_to_get_only() {
    let db = DynamoLocal::shared().await;
    let (server, _) = serve_on(&db).await;
    let metrics_port = server.metrics_port;
    let Response { status, head, body } = http(metrics_port, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    exposition::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(http(metrics_port, "POST", "/metrics").status, 405);
    assert_eq!(http(metrics_port, "GET", "/nope").status, 404);
}

/// Scrapes before and after six commands on one connection, on a dynacache
/// serving `args` on a new table of the shared DynamoDB Local.
struct Traffic {
    before: Exposition,
    after: Exposition,
    // Open at the second scrape (1 connection), and until the test ends.
    _client: McClient,
    _server: Server,
    _db: DynamoLocal,
}

impl Traffic {
    async fn through(args: &[&str]) -> Traffic {
        let db = DynamoLocal::shared().await;
        let settings = db.new_table().await;
        let mut all: Vec<&str> = vec!["--table", &settings.table, "--endpoint-url", &db.endpoint];
        all.extend_from_slice(args);
        let server = serve(&all);
        // Server::start's probe connection is counted asynchronously: let
        // it settle before the baseline.
        let deadline = Instant::now() + WAIT;
        let before = loop {
            let scrape = exposition(server.metrics_port);
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
        let mut c = McClient::connect(server.addr()).await;
        for (request, reply) in [
            (&b"set k 0 0 1\r\nv\r\n"[..], "STORED\r\n"),
            (b"get k\r\n", "VALUE k 0 1\r\nv\r\nEND\r\n"),
            (b"add k 0 0 1\r\nw\r\n", "NOT_STORED\r\n"),
            (b"touch k 100\r\n", "TOUCHED\r\n"),
            (b"delete k\r\n", "DELETED\r\n"),
            // Known absent since the delete (a negative entry): no read.
            (b"get k\r\n", "END\r\n"),
            // Never seen: read from DynamoDB.
            (b"get nope\r\n", "END\r\n"),
        ] {
            assert_eq!(c.call(request).await, reply);
        }
        let after = exposition(server.metrics_port);
        Traffic {
            before,
            after,
            _client: c,
            _server: server,
            _db: db,
        }
    }

    /// How much `name{labels}` moved between the scrapes.
    fn moved(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.after.count(name, labels) - self.before.count(name, labels)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_follow_prometheus_conventions() {
    let traffic = Traffic::through(&[]).await;
    for (name, kind) in &traffic.after.types {
        // Ours, or the process metrics every Prometheus client exports.
        assert!(
            name.starts_with("dynacache_") || name.starts_with("process_"),
            "{name}"
        );
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        }
    }
}

/// The process metrics Prometheus' own clients export, read at each
/// scrape: memory, CPU, file descriptors against their limit, start time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_are_exported_as_prometheus_clients_do() {
    let traffic = Traffic::through(&[]).await;
    let m = &traffic.after;
    let get = |name: &str| m.get(name, &[]).unwrap_or_else(|| panic!("{name} missing"));
    let rss = get("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 4e9, "resident memory {rss}");
    assert_eq!(m.types["process_resident_memory_bytes"], "gauge");
    // Listeners, the metrics socket, the client's connection at least.
    let fds = get("process_open_fds");
    assert!(fds >= 3.0 && fds <= get("process_max_fds"), "{fds} fds");
    // A counter, as Prometheus' clients have it (the `metrics` crate's
    // counters are integers: whole seconds, enough for a rate over minutes).
    assert_eq!(m.types["process_cpu_seconds_total"], "counter");
    assert!(get("process_cpu_seconds_total") >= 0.0);
    let started = get("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now && started > now - 600.0,
        "started {started}, now {now}"
    );
    // Read again at each scrape: the value moves with the process.
    assert!(
        traffic
            .before
            .get("process_cpu_seconds_total", &[])
            .unwrap()
            <= get("process_cpu_seconds_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_cache_and_connection_metrics_move_with_traffic() {
    let traffic = Traffic::through(&["-c", "7"]).await;
    let moved = |name: &str, labels: &[(&str, &str)]| traffic.moved(name, labels);
    let commands = "dynacache_commands_total";
    for (command, outcome, n) in [
        ("set", "stored", 1.0),
        ("get", "hit", 1.0),
        ("get", "miss", 2.0),
        ("add", "not_stored", 1.0),
        ("touch", "touched", 1.0),
        ("delete", "deleted", 1.0),
    ] {
        let labels = [("command", command), ("outcome", outcome)];
        assert_eq!(moved(commands, &labels), n, "{command} {outcome}");
    }
    let latency = "dynacache_command_duration_seconds_count";
    assert_eq!(moved(latency, &[("command", "get")]), 3.0);
    assert_eq!(moved(latency, &[("command", "set")]), 1.0);
    assert_eq!(moved("dynacache_cache_hits_total", &[]), 1.0);
    assert_eq!(moved("dynacache_cache_misses_total", &[]), 1.0, "nope");
    assert_eq!(
        moved("dynacache_cache_negative_hits_total", &[]),
        1.0,
        "k after its delete"
    );
    assert_eq!(moved("dynacache_connections_total", &[]), 1.0);
    assert_eq!(traffic.after.get("dynacache_connections", &[]), Some(1.0));
    assert_eq!(
        traffic.after.get("dynacache_connections_limit", &[]),
        Some(7.0),
        "max_connections (-c 7)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_request_and_capacity_metrics_move_with_traffic() {
    let traffic = Traffic::through(&[]).await;
    let moved = |name: &str, labels: &[(&str, &str)]| traffic.moved(name, labels);
    // set: PutItem; add of a cached key: a GetItem confirms it is there
    // (refusals are decided on DynamoDB's answer, never the cache's); touch:
    // UpdateItem; delete: PutItem of a tombstone; get after it: nothing
    // (known absent); get of a key never seen: GetItem.
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

// --- Durability -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    let db = DynamoLocal::shared().await;
    let (server, settings) = serve_on(&db).await;
    let listen = server.addr();

    // Writers send sets one after another and record each acknowledged key.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = McClient::connect(listen).await;
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
    drop(server); // SIGKILL, then reap
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
