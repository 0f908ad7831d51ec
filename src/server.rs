//! The accept loop: a connection permit is taken *before* accepting, so
//! overload waits in the kernel's backlog rather than in our memory; each
//! connection runs on its own task, tracked so shutdown can wait for them.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection;
use crate::engine::Engine;
use crate::protocol::Limits;
use crate::store::Store;

/// How the server treats connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub limits: Limits,
    pub max_connections: usize,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// Close connections idle this long (None: never).
    pub idle_timeout: Option<Duration>,
}

/// Serves `listener` until `shutdown` fires, then stops accepting, lets
/// connections finish their current requests for up to the grace period,
/// and returns whether they all finished in time.
pub async fn serve<S: Store>(
    listener: TcpListener,
    engine: Arc<Engine<S>>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> bool {
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let tracker = TaskTracker::new();
    let options = Arc::new(options);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        let options = options.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            engine.connection_opened();
            if let Err(e) = connection::serve(stream, &engine, &options, &shutdown).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            engine.connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tokio::time::timeout(options.shutdown_grace, tracker.wait())
        .await
        .is_ok()
}
