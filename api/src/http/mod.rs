//! The HTTP/JSON control plane: health, stats, prefix lookup, chunk listing and deletion,
//! effective configuration, Prometheus metrics, an OpenAPI document and a server-sent event
//! feed of stored/removed chunks for KV-aware routers.
//!
//! Every route except `/healthz` needs `Authorization: Bearer <token>` when a token is
//! configured; the caller's tenant comes from `X-Kvtier-Tenant` (default `default`) and scopes
//! everything tenant-owned (lookup, list, show, delete, events). Errors are JSON objects
//! `{"error": "<message>", "code": "<kind>"}` with the status and code of its [`crate::error::ErrorKind`],
//! including malformed bodies, queries and unknown routes, so clients parse one shape only.
//!
//! Handlers are in one file per surface: [`info`] (health, stats, config, metrics),
//! [`lookup`], [`chunks`], [`budget`], [`queries`], [`events`] and [`openapi`]; the extractors
//! they share are in [`extract`], and handlers never import from each other. Work that may touch
//! the disk or scan the whole index runs on blocking threads ([`blocking`]).

mod budget;
mod chunks;
mod events;
mod extract;
mod info;
mod lookup;
pub mod openapi;
mod queries;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use tokio::sync::watch;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::service::Service;

/// Header naming the tenant a caller acts as.
pub const TENANT_HEADER: &str = "x-kvtier-tenant";

/// What every handler gets: the service, and a flag raised when the server shuts down so that
/// long-lived responses (the event stream) end instead of holding graceful shutdown forever.
#[derive(Clone)]
struct AppState {
    svc: Arc<Service>,
    stop: Arc<watch::Sender<bool>>,
}

/// Every route, with its method: the single list the router is built from and that the OpenAPI
/// document is checked against. The method named here must be the one the `MethodRouter` uses.
fn table() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    vec![
        (Method::GET, "/healthz", get(info::healthz)),
        (Method::GET, "/metrics", get(info::metrics)),
        (Method::GET, "/v1/stats", get(info::stats)),
        (Method::GET, "/v1/config", get(info::config)),
        (
            Method::GET,
            "/v1/openapi.json",
            get(openapi::serve_document),
        ),
        (Method::POST, "/v1/lookup", post(lookup::lookup)),
        (Method::POST, "/v1/prompts/budget", post(budget::budget)),
        (
            Method::PUT,
            "/v1/prompts/{key}/queries",
            put(queries::upload),
        ),
        (Method::GET, "/v1/chunks", get(chunks::list)),
        (Method::GET, "/v1/chunks/{key}", get(chunks::show)),
        (Method::DELETE, "/v1/chunks/{key}", delete(chunks::remove)),
        (Method::GET, "/v1/events", get(events::events)),
    ]
}

/// Every `(method, path)` the router serves (paths in axum/OpenAPI `{param}` syntax).
pub fn routes() -> Vec<(Method, &'static str)> {
    table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The control-plane router. Event streams it serves end only when their client leaves; use
/// [`serve`] for a server that also ends them on shutdown.
pub fn router(svc: Arc<Service>) -> Router {
    build(svc, Arc::new(watch::channel(false).0))
}

fn build(svc: Arc<Service>, stop: Arc<watch::Sender<bool>>) -> Router {
    // The recorder must exist before the first handler records into the facade.
    crate::metrics::init();
    let mut router = Router::new();
    for (_, path, method_router) in table() {
        router = router.route(path, method_router);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { svc, stop })
}

/// Serves the control plane on `listener` until `shutdown` resolves, then stops accepting,
/// ends open event streams and waits for in-flight requests.
pub async fn serve(
    svc: Arc<Service>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let stop = Arc::new(watch::channel(false).0);
    let app = build(svc, stop.clone());
    // Without an HTTP listener of its own the exporter never drains histogram samples between
    // scrapes; do it here so an unscraped server does not accumulate them without bound.
    let handle = crate::metrics::init();
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    let signal = async move {
        shutdown.await;
        stop.send_replace(true);
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await;
    upkeep.abort();
    result.map_err(|e| ApiError::io("http control plane", e))
}

/// An [`ApiError`] as an HTTP response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl From<kvtier_cache::CacheError> for HttpError {
    fn from(e: kvtier_cache::CacheError) -> Self {
        HttpError(e.into())
    }
}

impl From<kvtier_prompt::PromptError> for HttpError {
    fn from(e: kvtier_prompt::PromptError) -> Self {
        HttpError(e.into())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let kind = self.0.kind();
        let status =
            StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({ "error": self.0.to_string(), "code": kind.code() });
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type HttpResult<T = Response> = Result<T, HttpError>;

fn bad_request(msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::BadRequest(msg.into()))
}

async fn not_found() -> HttpError {
    HttpError(ApiError::NotFound("no such route".into()))
}

async fn method_not_allowed() -> Response {
    let body = serde_json::json!({
        "error": "method not allowed for this route",
        "code": "method_not_allowed",
    });
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

/// The authenticated caller and the tenant id their chunks are stored under.
struct Caller {
    principal: Principal,
    tenant_id: u64,
}

/// Checks the bearer token and resolves the tenant. Done inside each handler (not as an
/// extractor) so that refused requests are counted in the op's metrics too.
fn authorize(svc: &Service, headers: &HeaderMap) -> HttpResult<Caller> {
    let presented = match headers.get(AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| unauthorized("authorization header is not ascii"))?;
            // The scheme name is case-insensitive (RFC 9110).
            let token = v
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .ok_or_else(|| unauthorized("authorization header must use the bearer scheme"))?;
            Some(token)
        }
    };
    let requested = match headers.get(TENANT_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| bad_request("x-kvtier-tenant header is not ascii"))?,
        ),
    };
    let principal = svc.auth.authorize(presented, requested)?;
    let tenant_id = kvtier_cache::key::tenant_id(&principal.tenant);
    Ok(Caller {
        principal,
        tenant_id,
    })
}

fn unauthorized(msg: &str) -> HttpError {
    HttpError(ApiError::Unauthorized(msg.into()))
}

/// Runs a handler body and records its outcome under `op` in the `http` plane.
async fn timed<T: IntoResponse>(
    op: &'static str,
    body: impl Future<Output = HttpResult<T>>,
) -> Response {
    let started = Instant::now();
    let result = body.await;
    crate::metrics::record_op(op, "http", started.elapsed(), result.is_ok());
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Runs store work that may block (disk reads, checksum passes, full index scans) on the
/// blocking pool, so async workers keep serving other requests.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> HttpResult<T> + Send + 'static,
) -> HttpResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError(ApiError::Internal(format!("blocking task failed: {e}"))))?
}

/// A layout fingerprint as clients see it: 16 hex digits, because JSON numbers above 2^53 lose
/// precision in many clients.
fn fingerprint_hex(fp: u64) -> String {
    format!("{fp:016x}")
}

/// Milliseconds since the Unix epoch.
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
