//! The composition root: [`start`] turns a [`Config`] and a [`Store`] into a
//! running server (listeners, cache, engine, admin listener, background
//! upkeep, accept loop), the same way for the binary, the integration tests
//! and the benchmarks. [`Running`] tells where it listens and stops it.
//!
//! The accept loop serves at most `max_connections` clients; one more is
//! answered `ERROR Too many open connections` and closed at once, as
//! memcached does, so its client fails fast and tries another server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::cache::ItemCache;
use crate::config::{Config, PrefixPolicy};
use crate::connection::{self, ConnectionOptions};
use crate::engine::{Engine, EngineOptions, KeyRule};
use crate::listener::{self, Accepted, Listener, Peer};
use crate::metrics::Event;
use crate::protocol::Limits;
use crate::store::Store;

/// What a client beyond `max_connections` is told before it is closed.
const TOO_MANY: &[u8] = b"ERROR Too many open connections\r\n";

/// At most one "accept failed" warning this often (out of file descriptors,
/// accept fails on every try).
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// A server that is serving.
pub struct Running<S> {
    pub engine: Arc<Engine<S>>,
    /// The TCP address clients connect to (its port, if 0 was asked for).
    pub tcp: Option<SocketAddr>,
    pub unix_socket: Option<PathBuf>,
    /// The address of `/metrics`, `/healthz` and `/readyz`.
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    accepting: tokio::task::JoinHandle<bool>,
}

impl<S: Store> Running<S> {
    /// Fires to stop the server (what SIGTERM does in the binary).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server was told to stop and has stopped: no more
    /// connections accepted, open ones finished within the grace period.
    /// Returns whether they all finished in time.
    pub async fn stopped(self) -> bool {
        self.accepting.await.unwrap_or(false)
    }

    /// Stops the server now (see [`Running::stopped`]).
    pub async fn stop(self) -> bool {
        self.shutdown.cancel();
        self.stopped().await
    }
}

/// Starts serving `config` on `store`; `recorder` renders the `metrics`
/// crate's histograms on `/metrics` (the binary installs one per process).
pub async fn start<S: Store>(
    config: &Config,
    store: S,
    recorder: Option<PrometheusHandle>,
) -> Result<Running<S>, String> {
    // The admin listener first: once clients can connect, so can probes.
    let admin = bind_admin(config).await?;
    let mut listeners = Vec::new();
    if let Some(addr) = config.tcp_listen() {
        listeners.push(Listener::bind_tcp(addr).await?);
    }
    if let Some(path) = &config.unix_socket {
        listeners.push(Listener::bind_unix(path, config.unix_socket_mode)?);
    }
    serve(admin, listeners, config, store, recorder).await
}

async fn bind_admin(config: &Config) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|e| format!("cannot serve metrics on {}: {e}", config.metrics_listen))
}

/// [`start`] on listeners bound already (tests bind `127.0.0.1:0`, which
/// `listen` cannot say: there port 0 means no TCP, as in memcached).
pub async fn start_on<S: Store>(
    listeners: Vec<Listener>,
    config: &Config,
    store: S,
    recorder: Option<PrometheusHandle>,
) -> Result<Running<S>, String> {
    let admin = bind_admin(config).await?;
    serve(admin, listeners, config, store, recorder).await
}

async fn serve<S: Store>(
    admin_listener: tokio::net::TcpListener,
    listeners: Vec<Listener>,
    config: &Config,
    store: S,
    recorder: Option<PrometheusHandle>,
) -> Result<Running<S>, String> {
    let limits = Limits {
        item_size_max: config.item_size_max.as_u64() as usize,
        item_overhead: store.item_overhead(),
        ..Limits::default()
    };
    let cache = ItemCache::new(config.memory_limit.as_u64(), config.shards());
    let options = EngineOptions {
        max_local_age: config.max_local_age,
        stale_on_error: config.stale_on_error,
        flush_enabled: config.flush_enabled,
        settings_report: settings_report(config),
        item_size_max: limits.item_size_max,
        hot_keys: config.hot_keys,
        rules: config
            .prefix
            .iter()
            .map(|r| KeyRule {
                prefix: r.prefix.as_bytes().into(),
                local: r.policy == PrefixPolicy::Local,
                max_ttl: r.max_ttl,
            })
            .collect(),
        local_memory_limit: config.local_memory_limit.as_u64(),
        negative_caching: config.negative_caching,
    };
    let engine = Arc::new(Engine::with_options(cache, store, options));
    // Fleet mode: join before serving (writes wait until joined).
    let fleet = match config.fleet.options() {
        Some(options) => {
            let fleet = engine.join_fleet(options);
            let local: std::sync::Weak<dyn crate::fleet::LocalCache> =
                Arc::downgrade(&engine) as std::sync::Weak<dyn crate::fleet::LocalCache>;
            fleet.start(local).await?;
            Some(fleet)
        }
        None => None,
    };
    // A flush_all made before this process started still hides old items.
    if let Err(e) = engine.refresh_flush_marker().await {
        tracing::warn!(error = %e, "cannot read the flush_all marker yet; retrying in the background");
    }

    let tcp = listeners.iter().find_map(Listener::local_addr);
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| format!("metrics listener: {e}"))?;

    let shutdown = CancellationToken::new();
    let admin = Admin::new(recorder, engine.clone(), shutdown.clone());
    tokio::spawn(admin::serve(admin_listener, Arc::new(admin)));
    let upkeep = engine.clone();
    let upkeep_shutdown = shutdown.clone();
    tokio::spawn(async move { upkeep.run_upkeep(upkeep_shutdown).await });

    let described: Vec<_> = listeners.iter().map(Listener::describe).collect();
    tracing::info!(listen = %described.join(", "), metrics = %admin_addr, table = %config.dynamodb.table, "serving");
    let serving = Serving {
        engine: engine.clone(),
        options: Arc::new(ConnectionOptions::from_config(config, limits)),
        max_connections: config.max_connections,
        shutdown_grace: config.shutdown_grace,
        shutdown: shutdown.clone(),
    };
    let accepting = tokio::spawn(async move {
        let drained = serving.accept(listeners).await;
        // Served what was in flight: now leave the fleet, so peers stop
        // waiting for this member.
        if let Some(fleet) = fleet {
            fleet.leave().await;
        }
        drained
    });
    Ok(Running {
        engine,
        tcp,
        unix_socket: config.unix_socket.clone(),
        admin: admin_addr,
        shutdown,
        accepting,
    })
}

struct Serving<S> {
    engine: Arc<Engine<S>>,
    options: Arc<ConnectionOptions>,
    max_connections: usize,
    shutdown_grace: Duration,
    shutdown: CancellationToken,
}

impl<S: Store> Serving<S> {
    /// Serves `listeners` until shutdown, then stops accepting (drops them:
    /// a unix socket's file is removed), lets connections finish their
    /// current requests for up to the grace period, and returns whether they
    /// all finished in time.
    async fn accept(self, listeners: Vec<Listener>) -> bool {
        let counters = self.engine.counters();
        counters.set_connections_limit(self.max_connections);
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let tracker = TaskTracker::new();
        let mut turn = 0;
        let mut last_warning: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = listener::accept_any(&listeners, &mut turn) => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    let peer = accepted.peer();
                    (accepted, peer)
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't
                    // spin, and don't log twenty lines a second.
                    if last_warning.is_none_or(|at| at.elapsed() >= ACCEPT_WARNING_EVERY) {
                        tracing::warn!(error = %e, "accept failed (logged at most every 10 s)");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let connection = self.connection(permit);
                    match stream {
                        Accepted::Tcp(stream, _) => {
                            let _ = stream.set_nodelay(true);
                            tracker.spawn(connection.run(stream, peer));
                        }
                        Accepted::Unix(stream) => {
                            tracker.spawn(connection.run(stream, peer));
                        }
                    }
                }
                Err(_) => {
                    counters.record(Event::RejectedConnections);
                    tokio::spawn(refuse(stream));
                }
            }
        }
        drop(listeners);
        tracker.close();
        tokio::time::timeout(self.shutdown_grace, tracker.wait())
            .await
            .is_ok()
    }

    fn connection(&self, permit: OwnedSemaphorePermit) -> Connection<S> {
        Connection {
            engine: self.engine.clone(),
            options: self.options.clone(),
            shutdown: self.shutdown.clone(),
            _permit: permit,
        }
    }
}

/// Tells a client beyond the limit so, briefly, and closes it.
async fn refuse(stream: Accepted) {
    let write = async {
        match stream {
            Accepted::Tcp(mut s, _) => {
                let _ = s.write_all(TOO_MANY).await;
                let _ = s.shutdown().await;
            }
            Accepted::Unix(mut s) => {
                let _ = s.write_all(TOO_MANY).await;
                let _ = s.shutdown().await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// What a connection's task holds: its permit is released when it ends.
struct Connection<S> {
    engine: Arc<Engine<S>>,
    options: Arc<ConnectionOptions>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl<S: Store> Connection<S> {
    async fn run<T>(self, stream: T, peer: Peer)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let counters = self.engine.counters();
        counters.connection_opened();
        let result = connection::serve(stream, &self.engine, &self.options, &self.shutdown).await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        counters.connection_closed();
    }
}

/// `stats settings` lines, named as memcached names them where it has them.
fn settings_report(config: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("maxconns", config.max_connections.to_string()),
        ("tcpport", config.listen.port().to_string()),
        ("inter", config.listen.ip().to_string()),
        ("item_size_max", config.item_size_max.as_u64().to_string()),
        ("idle_timeout", config.idle_timeout.as_secs().to_string()),
        (
            "num_threads",
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .to_string(),
        ),
        (
            "max_local_age",
            humantime::format_duration(config.max_local_age).to_string(),
        ),
        ("dynamodb_table", config.dynamodb.table.clone()),
        (
            "consistent_reads",
            config.dynamodb.consistent_reads.to_string(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpStream, UnixStream};

    use super::*;
    use crate::store::MemoryStore;

    const WAIT: Duration = Duration::from_secs(30);

    /// Sends `version` and reads the whole reply line.
    async fn version<T: AsyncRead + AsyncWrite + Unpin>(stream: &mut T) -> String {
        stream.write_all(b"version\r\n").await.unwrap();
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n") {
            let mut byte = [0u8; 64];
            let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(n > 0, "closed");
            reply.extend_from_slice(&byte[..n]);
        }
        String::from_utf8(reply).unwrap()
    }

    #[tokio::test]
    async fn one_slot_serves_whichever_listener_has_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let config = Config {
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            unix_socket: Some(path.clone()),
            max_connections: 1,
            ..Config::default()
        };
        let tcp = Listener::bind_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let unix = Listener::bind_unix(&path, config.unix_socket_mode).unwrap();
        let running = start_on(vec![tcp, unix], &config, MemoryStore::new(), None)
            .await
            .unwrap();
        let addr = running.tcp.unwrap();
        // The single slot is not parked on one listener: each kind is
        // served while the other has no client.
        let closed = || async {
            // The slot is free once the server has seen the client go.
            while running.engine.counters().connections() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        for _ in 0..3 {
            let mut c = UnixStream::connect(&path).await.unwrap();
            assert!(version(&mut c).await.starts_with("VERSION "));
            drop(c);
            tokio::time::timeout(WAIT, closed()).await.unwrap();
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert!(version(&mut c).await.starts_with("VERSION "));
            drop(c);
            tokio::time::timeout(WAIT, closed()).await.unwrap();
        }
        assert!(running.stop().await, "drained");
        assert!(!path.exists(), "the socket file goes with the listener");
    }
}
