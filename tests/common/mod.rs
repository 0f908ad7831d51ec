//! Test harness: a real DynamoDB Local, dynacache servers in-process or as
//! the real binary, and a raw-bytes memcached client over TCP.
//!
//! DynamoDB Local: `scripts/test.sh` starts one for the whole run and sets
//! `DYNACACHE_TEST_DYNAMODB` to its endpoint; tests then share it, each on
//! its own table. Without that variable (plain `cargo test`), each test
//! starts a private DynamoDB Local from `DYNAMODB_LOCAL_DIR` (default
//! `.dynamodb-local/`, filled by `scripts/dynamodb-local.sh install`) and
//! stops it when done. Tests that stop DynamoDB always use a private one.
#![allow(dead_code)]

pub mod corpus;
pub mod exposition;
pub mod proxy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::Credentials;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use dynacache::config::Config;
use dynacache::engine::{Engine, EngineOptions};
use dynacache::listener::Listener;
use dynacache::server::{self, Running};
use dynacache::store::{DynamoSettings, DynamoStore, TableSettings};

/// The access key DynamoDB Local accepts: letters and digits only.
pub const ACCESS_KEY: &str = "local";
/// Bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(60);

/// A DynamoDB Local endpoint; stops the process on drop if it started one.
pub struct DynamoLocal {
    pub endpoint: String,
    pub port: u16,
    child: Option<Child>,
}

impl DynamoLocal {
    /// The run's shared instance, or a private one if there is none.
    pub async fn shared() -> DynamoLocal {
        match std::env::var("DYNACACHE_TEST_DYNAMODB") {
            Ok(endpoint) => {
                let port = endpoint
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                DynamoLocal {
                    endpoint,
                    port,
                    child: None,
                }
            }
            Err(_) => DynamoLocal::private().await,
        }
    }

    /// A DynamoDB Local of this test's own, ready to answer.
    pub async fn private() -> DynamoLocal {
        DynamoLocal::start_on(free_port()).await
    }

    /// Starts DynamoDB Local on `port` and waits until it answers ListTables.
    pub async fn start_on(port: u16) -> DynamoLocal {
        let dir = std::env::var_os("DYNAMODB_LOCAL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".dynamodb-local"));
        let jar = dir.join("DynamoDBLocal.jar");
        assert!(
            jar.exists(),
            "{} is missing: run scripts/dynamodb-local.sh install (scripts/test.sh does)",
            jar.display()
        );
        let child = Command::new("java")
            .arg(format!(
                "-Djava.library.path={}",
                dir.join("DynamoDBLocal_lib").display()
            ))
            .arg("-jar")
            .arg(&jar)
            .args([
                "-inMemory",
                "-sharedDb",
                "-disableTelemetry",
                "-port",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("java starts (scripts/dynamodb-local.sh install puts it there)");
        let db = DynamoLocal {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            child: Some(child),
        };
        db.wait_ready().await;
        db
    }

    /// Polls ListTables until DynamoDB Local answers (bounded by [`WAIT`]).
    pub async fn wait_ready(&self) {
        let client = sdk_client(&self.endpoint);
        let deadline = Instant::now() + WAIT;
        loop {
            if Box::pin(client.list_tables().send()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "DynamoDB Local at {} never answered",
                self.endpoint
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops a private instance (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn client(&self) -> Client {
        sdk_client(&self.endpoint)
    }

    /// Settings for a new, empty table of this test's own, created now.
    pub async fn new_table(&self) -> DynamoSettings {
        let settings = DynamoSettings {
            table: unique_name("t"),
            endpoint_url: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            ..DynamoSettings::default()
        };
        let store = connect(settings.clone()).await;
        assert!(store.create_table(&TableSettings::default()).await.unwrap());
        settings
    }
}

impl Drop for DynamoLocal {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SDK client for checking the table's contents directly.
pub fn sdk_client(endpoint: &str) -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new(ACCESS_KEY, "secret", None, None, "test"))
        .build();
    Client::from_conf(config)
}

/// A store as the binary makes one, with DynamoDB Local's credentials.
pub async fn connect(settings: DynamoSettings) -> DynamoStore {
    DynamoStore::connect_with(settings, |loader| {
        loader.credentials_provider(Credentials::new(ACCESS_KEY, "secret", None, None, "test"))
    })
    .await
}

pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// dynacache served in-process on 127.0.0.1:<ephemeral> over a real socket,
/// started by the library's composition root as the binary starts it.
pub struct TestServer {
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    pub engine: Arc<Engine<DynamoStore>>,
    running: Option<Running<DynamoStore>>,
    shutdown: CancellationToken,
}

/// A configuration for a test server on `settings`' table.
pub fn test_config(settings: DynamoSettings) -> Config {
    Config {
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: 256,
        cache_shards: 4,
        shutdown_grace: Duration::from_secs(5),
        dynamodb: settings,
        ..Config::default()
    }
}

impl TestServer {
    pub async fn start(settings: DynamoSettings) -> TestServer {
        TestServer::start_with(settings, 64 << 20).await
    }

    pub async fn start_with(settings: DynamoSettings, memory_limit: u64) -> TestServer {
        TestServer::start_custom(settings, memory_limit, EngineOptions::default(), None).await
    }

    pub async fn start_custom(
        settings: DynamoSettings,
        memory_limit: u64,
        engine_options: EngineOptions,
        idle_timeout: Option<Duration>,
    ) -> TestServer {
        let config = Config {
            memory_limit: bytesize::ByteSize::b(memory_limit),
            max_local_age: engine_options.max_local_age,
            stale_on_error: engine_options.stale_on_error,
            flush_enabled: engine_options.flush_enabled,
            idle_timeout: idle_timeout.unwrap_or_default(),
            ..test_config(settings)
        };
        TestServer::with_config(config).await
    }

    /// A server of `config` (its `listen` is replaced by 127.0.0.1:<ephemeral>).
    pub async fn with_config(config: Config) -> TestServer {
        let store = connect(config.dynamodb.clone()).await;
        let listener = Listener::bind_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let running = server::start_on(vec![listener], &config, store, None)
            .await
            .unwrap();
        TestServer {
            addr: running.tcp.unwrap(),
            admin: running.admin,
            engine: running.engine.clone(),
            shutdown: running.shutdown_token(),
            running: Some(running),
        }
    }

    pub async fn client(&self) -> McClient {
        McClient::connect(self.addr).await
    }

    /// Stops serving; returns whether connections drained within the grace period.
    pub async fn stop(mut self) -> bool {
        self.running.take().unwrap().stop().await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A memcached client speaking raw protocol bytes.
pub struct McClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl McClient {
    pub async fn connect(addr: SocketAddr) -> McClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        McClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends `bytes` unless the server closed the connection (bounded by [`WAIT`]).
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(WAIT, self.stream.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Sends `request` and reads one whole reply (all of a retrieval's values and END).
    pub async fn call(&mut self, request: &[u8]) -> String {
        self.send(request).await;
        self.reply().await
    }

    /// Sends `request` and reads one whole reply, as bytes (binary values).
    pub async fn call_bytes(&mut self, request: &[u8]) -> Vec<u8> {
        self.send(request).await;
        self.reply_bytes().await
    }

    /// Reads one whole reply: a status line, or VALUE blocks up to END.
    pub async fn reply(&mut self) -> String {
        String::from_utf8_lossy(&self.reply_bytes().await).into_owned()
    }

    /// [`McClient::reply`], as bytes.
    pub async fn reply_bytes(&mut self) -> Vec<u8> {
        let mut reply = Vec::new();
        loop {
            let line = self.line().await;
            reply.extend_from_slice(&line);
            // `VALUE <key> <flags> <len>` blocks run up to END; a meta
            // `VA <len> <flags>*` line's value ends the reply.
            let (len, more) = match (line.strip_prefix(b"VALUE "), line.strip_prefix(b"VA ")) {
                (Some(header), _) => (
                    String::from_utf8_lossy(header)
                        .split(' ')
                        .nth(2)
                        .map(str::to_owned),
                    true,
                ),
                (_, Some(header)) => (
                    String::from_utf8_lossy(header)
                        .split(' ')
                        .next()
                        .map(str::to_owned),
                    false,
                ),
                _ => (None, false),
            };
            if let Some(len) = len {
                let len: usize = len.trim_end().parse().unwrap();
                let data = self.exactly(len + 2).await;
                reply.extend_from_slice(&data);
                if more {
                    continue;
                }
            }
            return reply;
        }
    }

    /// `stats` (or `stats <group>`): every `STAT` line up to `END`, by name.
    pub async fn stats(&mut self, group: &str) -> std::collections::HashMap<String, String> {
        let request = match group {
            "" => "stats\r\n".to_string(),
            group => format!("stats {group}\r\n"),
        };
        self.send(request.as_bytes()).await;
        let mut stats = std::collections::HashMap::new();
        loop {
            let line = String::from_utf8(self.line().await).unwrap();
            let line = line.trim_end();
            if line == "END" {
                return stats;
            }
            let mut parts = line.splitn(3, ' ');
            assert_eq!(parts.next(), Some("STAT"), "{line}");
            let name = parts.next().unwrap().to_string();
            stats.insert(name, parts.next().unwrap_or_default().to_string());
        }
    }

    /// One whole reply, or None if the connection ended first.
    pub async fn try_reply(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Some(
                    String::from_utf8_lossy(&self.buf.drain(..pos + 2).collect::<Vec<_>>())
                        .into_owned(),
                );
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// One line, `\r\n` included.
    pub async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return self.buf.drain(..pos + 2).collect();
            }
            self.fill().await;
        }
    }

    async fn exactly(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await;
        }
        self.buf.drain(..n).collect()
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("reply timed out")
            .expect("read");
        assert!(
            n > 0,
            "server closed the connection; got so far: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Whether the server closed the connection (reads EOF within [`WAIT`]).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// The item DynamoDB holds for `key` (a direct, consistent read).
pub async fn table_item(
    client: &Client,
    settings: &DynamoSettings,
    key: &str,
) -> Option<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    client
        .get_item()
        .table_name(&settings.table)
        .key(
            &settings.key_attribute,
            aws_sdk_dynamodb::types::AttributeValue::S(key.into()),
        )
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
}

/// The item a reader would see for `key` in DynamoDB: none if the table
/// holds nothing, an expired item, or a delete's tombstone (empty, expired).
pub async fn live_item(
    client: &Client,
    settings: &DynamoSettings,
    key: &str,
) -> Option<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    let item = table_item(client, settings, key).await?;
    let expired = match item.get(&settings.expiry_attribute) {
        Some(aws_sdk_dynamodb::types::AttributeValue::N(at)) => at.parse::<u64>().unwrap() <= now(),
        _ => false,
    };
    (!expired).then_some(item)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
