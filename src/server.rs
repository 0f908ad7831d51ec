//! The accept loop: a connection permit is taken *before* accepting, so
//! overload waits in the kernel's backlog rather than in our memory; then
//! whichever listener (TCP, unix socket) has a client gets it. Each
//! connection runs on its own task, tracked so shutdown can wait for them.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection;
use crate::engine::Engine;
use crate::listener::{self, Accepted, Listener, Peer};
use crate::protocol::Limits;
use crate::store::Store;

/// How the server treats connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub limits: Limits,
    /// Connections served at once, over all listeners.
    pub max_connections: usize,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// Close connections idle this long (None: never).
    pub idle_timeout: Option<Duration>,
}

/// Serves `listeners` until `shutdown` fires, then stops accepting (drops
/// them: a unix socket's file is removed), lets connections finish their
/// current requests for up to the grace period, and returns whether they
/// all finished in time.
pub async fn serve<S: Store>(
    listeners: Vec<Listener>,
    engine: Arc<Engine<S>>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> bool {
    let metrics = engine.metrics();
    metrics
        .connections_limit
        .set(options.max_connections as f64);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let tracker = TaskTracker::new();
    let options = Arc::new(options);
    let mut turn = 0;
    loop {
        if permits.available_permits() == 0 {
            // New clients now wait in the backlog until a connection closes.
            metrics.connections_limit_reached.increment(1);
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener::accept_any(&listeners, &mut turn) => accepted,
        };
        let connection = Connection {
            engine: engine.clone(),
            options: options.clone(),
            shutdown: shutdown.clone(),
            permit,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tracker.spawn(connection.run(stream, Peer::Tcp(peer)));
            }
            Ok(Accepted::Unix(stream)) => {
                tracker.spawn(connection.run(stream, Peer::Unix));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listeners);
    tracker.close();
    tokio::time::timeout(options.shutdown_grace, tracker.wait())
        .await
        .is_ok()
}

/// What a connection's task holds: its permit is released when it ends.
struct Connection<S> {
    engine: Arc<Engine<S>>,
    options: Arc<ServeOptions>,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
}

impl<S: Store> Connection<S> {
    async fn run<T>(self, stream: T, peer: Peer)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        self.engine.connection_opened();
        let result = connection::serve(stream, &self.engine, &self.options, &self.shutdown).await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        self.engine.connection_closed();
        drop(self.permit);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UnixStream};

    use super::*;
    use crate::cache::ItemCache;
    use crate::config::SocketMode;
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
    async fn one_permit_serves_whichever_listener_has_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let unix = Listener::bind_unix(&path, SocketMode(0o700)).unwrap();
        let engine = Arc::new(Engine::new(ItemCache::new(1 << 20, 1), MemoryStore::new()));
        let options = ServeOptions {
            limits: Limits::default(),
            max_connections: 1,
            shutdown_grace: WAIT,
            idle_timeout: None,
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            vec![tcp.into(), unix],
            engine,
            options,
            shutdown.clone(),
        ));
        // The single permit is not parked on one listener: each kind is
        // served while the other has no client.
        for _ in 0..3 {
            let mut c = UnixStream::connect(&path).await.unwrap();
            assert!(version(&mut c).await.starts_with("VERSION "));
            drop(c);
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert!(version(&mut c).await.starts_with("VERSION "));
            drop(c);
        }
        shutdown.cancel();
        assert!(server.await.unwrap(), "drained");
        assert!(!path.exists(), "the socket file goes with the listener");
    }
}
