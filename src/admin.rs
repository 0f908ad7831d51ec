//! The admin listener (`metrics_listen`): what Prometheus, Kubernetes and
//! load balancers ask of a running sidecar, over plain HTTP/1.1.
//!
//! - `GET /metrics`: the Prometheus text exposition.
//! - `GET /healthz`: 200 while the process answers at all (liveness).
//! - `GET /readyz`: 200 when clients can be served: the memcached listeners
//!   are up (not starting, not shutting down) and DynamoDB answers
//!   DescribeTable on the configured table; else 503 with the reason.
//!
//! It never touches the cache or the request path; it must not be exposed
//! beyond the host or pod network (it has no authentication).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::store::DynamoStore;

/// How long a readiness answer is reused: a probe storm (many probers, or a
/// tight period) costs at most one DescribeTable per this interval.
pub const READINESS_TTL: Duration = Duration::from_secs(1);

/// How often the recorder's upkeep runs (drains histogram samples).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A client that sends no request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the sidecar can serve its clients now.
pub struct Readiness {
    engine: Arc<Engine<DynamoStore>>,
    shutdown: CancellationToken,
    /// The last DynamoDB check; the lock also makes concurrent probes wait
    /// for one DescribeTable instead of each sending its own.
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    /// For an engine whose listeners are bound; `shutdown` firing means
    /// they stop accepting.
    pub fn new(engine: Arc<Engine<DynamoStore>>, shutdown: CancellationToken) -> Readiness {
        Readiness {
            engine,
            shutdown,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Ok when ready, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down: no longer accepting connections".into());
        }
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last
            && at.elapsed() < READINESS_TTL
        {
            return result.clone();
        }
        let table = &self.engine.store().settings().table;
        let result = self
            .engine
            .store()
            .describe_table()
            .await
            .map_err(|e| format!("DescribeTable {table}: {e}"));
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// What the admin listener serves.
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub readiness: Readiness,
}

/// Serves `listener` until the process exits: it keeps answering during a
/// graceful shutdown, so probes see 503 and Prometheus gets a last scrape.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let upkeep = admin.metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(respond(&admin, req).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn respond(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, crate::metrics::render(&admin.metrics));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match admin.readiness.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /readyz are served here\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ItemCache;
    use crate::store::DynamoSettings;

    #[tokio::test]
    async fn not_ready_once_shutdown_begins() {
        // Nothing listens on port 9: the check must not get that far.
        let settings = DynamoSettings {
            endpoint_url: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            ..DynamoSettings::default()
        };
        let store = DynamoStore::connect(settings).await;
        let engine = Arc::new(Engine::new(ItemCache::new(1 << 20, 1), store));
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new(engine, shutdown.clone());
        shutdown.cancel();
        let reason = readiness.check().await.unwrap_err();
        assert!(reason.starts_with("shutting down"), "{reason}");
    }
}
