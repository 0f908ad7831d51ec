//! The admin listener (`metrics_listen`): what Prometheus, Kubernetes and
//! load balancers ask of a running sidecar, over plain HTTP/1.1.
//!
//! - `GET /metrics`: the Prometheus text exposition.
//! - `GET /healthz`: 200 while the process answers at all (liveness).
//! - `GET /hotkeys`: the keys read and written most (JSON).
//! - `GET /readyz`: 200 when clients can be served: the memcached listeners
//!   are up (not starting, not shutting down) and the store answers
//!   ([`Store::ready`]: DynamoDB's DescribeTable on the configured table);
//!   else 503 with the reason.
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
use crate::store::Store;

/// How long a readiness answer is reused: a probe storm (many probers, or a
/// tight period) costs at most one DescribeTable per this interval.
pub const READINESS_TTL: Duration = Duration::from_secs(1);

/// How often the recorder's upkeep runs (drains histogram samples).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A client that sends no request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin listener serves, for a server on any store.
pub struct Admin<S> {
    recorder: Option<PrometheusHandle>,
    engine: Arc<Engine<S>>,
    shutdown: CancellationToken,
    /// The last store check; the lock also makes concurrent probes wait
    /// for one check instead of each sending its own.
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl<S: Store> Admin<S> {
    /// For an engine whose listeners are bound; `shutdown` firing means
    /// they stop accepting.
    pub fn new(
        recorder: Option<PrometheusHandle>,
        engine: Arc<Engine<S>>,
        shutdown: CancellationToken,
    ) -> Admin<S> {
        Admin {
            recorder,
            engine,
            shutdown,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the sidecar can serve its clients now: Ok, or the reason.
    pub async fn ready(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down: no longer accepting connections".into());
        }
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last
            && at.elapsed() < READINESS_TTL
        {
            return result.clone();
        }
        if let Some(fleet) = self.engine.fleet()
            && !fleet.may_acknowledge()
        {
            return Err("joining the fleet: not all members have answered yet".into());
        }
        let result = self.engine.store().ready().await;
        *last = Some((Instant::now(), result.clone()));
        result
    }

    fn metrics(&self) -> String {
        let mut text = crate::metrics::render(
            self.recorder.as_ref(),
            self.engine.counters(),
            &self.engine.cache().stats(),
        );
        if let Some(local) = self.engine.local_cache() {
            crate::metrics::render_local(&local.stats(), &mut text);
        }
        if let Some(fleet) = self.engine.fleet() {
            fleet.render(&mut text);
        }
        text
    }
}

/// Serves `listener` until the process exits: it keeps answering during a
/// graceful shutdown, so probes see 503 and Prometheus gets a last scrape.
pub async fn serve<S: Store>(listener: TcpListener, admin: Arc<Admin<S>>) {
    if let Some(recorder) = admin.recorder.clone() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                recorder.run_upkeep();
            }
        });
    }
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

async fn respond<S: Store>(admin: &Admin<S>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, admin.metrics());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/hotkeys" => {
            let mut response = Response::new(Full::new(Bytes::from(hot_keys_json(
                admin.engine.hot_keys(),
            ))));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        "/readyz" => match admin.ready().await {
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

/// `/hotkeys`: the keys read and written most, as JSON, keys escaped
/// ([`crate::hotkeys::printable`]).
fn hot_keys_json(hot: &crate::hotkeys::HotKeys) -> String {
    let list = |top: Vec<crate::hotkeys::HotKey>| -> Vec<serde_json::Value> {
        top.into_iter()
            .map(|h| {
                serde_json::json!({
                    "key": crate::hotkeys::printable(&h.key),
                    "count": h.count,
                    "error": h.error,
                })
            })
            .collect()
    };
    let body = serde_json::json!({
        "reads": list(hot.top_reads()),
        "writes": list(hot.top_writes()),
        "read_sample": crate::hotkeys::READ_SAMPLE,
    });
    format!("{body}\n")
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
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn readiness_follows_the_store_and_shutdown() {
        let engine = Arc::new(Engine::new(ItemCache::new(1 << 20, 1), MemoryStore::new()));
        let shutdown = CancellationToken::new();
        let admin = Admin::new(None, engine.clone(), shutdown.clone());
        assert_eq!(admin.ready().await, Ok(()));
        shutdown.cancel();
        let reason = admin.ready().await.unwrap_err();
        assert!(reason.starts_with("shutting down"), "{reason}");
        let failing = Admin::new(None, engine, CancellationToken::new());
        failing.engine.store().set_failing(true);
        assert!(failing.ready().await.is_err(), "the store's answer");
    }
}
