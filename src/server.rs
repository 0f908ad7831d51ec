//! The accept loops: one per listener (TCP, unix socket), sharing one pool
//! of connection permits. A permit is taken *before* accepting, so overload
//! waits in the kernel's backlog rather than in our memory; each connection
//! runs on its own task, tracked so shutdown can wait for them.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection;
use crate::engine::Engine;
use crate::listener::{Accepted, Listener, Peer};
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
}

/// What every accept loop and connection task shares.
struct Shared<S> {
    engine: Arc<Engine<S>>,
    options: ServeOptions,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Serves `listeners` until `shutdown` fires, then stops accepting (a unix
/// socket's file is removed then), lets connections finish their current
/// requests for up to the grace period, and returns whether they all
/// finished in time.
pub async fn serve<S: Store>(
    listeners: Vec<Listener>,
    engine: Arc<Engine<S>>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> bool {
    engine
        .metrics()
        .connections_limit
        .set(options.max_connections as f64);
    let shared = Arc::new(Shared {
        engine,
        permits: Arc::new(Semaphore::new(options.max_connections)),
        options,
        tracker: TaskTracker::new(),
        shutdown,
    });
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|listener| tokio::spawn(accept_loop(listener, shared.clone())))
        .collect();
    for accept in loops {
        let _ = accept.await;
    }
    shared.tracker.close();
    tokio::time::timeout(shared.options.shutdown_grace, shared.tracker.wait())
        .await
        .is_ok()
}

/// Accepts on one listener until shutdown, then drops it.
async fn accept_loop<S: Store>(listener: Listener, shared: Arc<Shared<S>>) {
    let metrics = shared.engine.metrics();
    loop {
        if shared.permits.available_permits() == 0 {
            // New clients now wait in the backlog until a connection closes.
            metrics.connections_limit_reached.increment(1);
        }
        let permit = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            permit = shared.permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                let _ = stream.set_nodelay(true);
                spawn_connection(&shared, stream, Peer::Tcp(peer), permit);
            }
            Ok(Accepted::Unix(stream)) => spawn_connection(&shared, stream, Peer::Unix, permit),
            Err(e) => {
                // Out of file descriptors and the like: back off, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn spawn_connection<S, T>(
    shared: &Arc<Shared<S>>,
    stream: T,
    peer: Peer,
    permit: OwnedSemaphorePermit,
) where
    S: Store,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared_for_task = shared.clone();
    shared.tracker.spawn(async move {
        let shared = shared_for_task;
        let metrics = shared.engine.metrics();
        metrics.connections.increment(1.0);
        metrics.connections_total.increment(1);
        let result = connection::serve(
            stream,
            &shared.engine,
            &shared.options.limits,
            &shared.shutdown,
        )
        .await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        metrics.connections.decrement(1.0);
        drop(permit);
    });
}
