//! Service-wide read-only endpoints: health, store stats, effective configuration and the
//! Prometheus scrape.
//!
//! Stats and metrics describe the whole store, not one tenant: they are operator views (counts
//! and bytes, never keys), still behind the token.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use kvtier_cache::StoreStats;

use super::{AppState, HttpError, authorize, timed};

/// `GET /healthz`: unauthenticated, so load balancers and probes need no secret. Always 200
/// while the process serves; `status` is `degraded` when a configured disk tier failed to open
/// (the service then runs on host memory alone) or the remote cluster does not answer.
pub(super) async fn healthz(State(st): State<AppState>) -> Response {
    timed("healthz", async move {
        let svc = &st.svc;
        let disk_configured = svc.config.disk_bytes > 0;
        // The remote tier is pinged (bounded by its timeout, on a blocking thread); while the
        // cluster is unreachable the node is degraded and serves from its local tiers.
        let remote_up = match svc.remote.clone() {
            Some(r) => Some(
                tokio::task::spawn_blocking(move || r.check_health())
                    .await
                    .unwrap_or(false),
            ),
            None => None,
        };
        let degraded = svc.disk_error.is_some() || remote_up == Some(false);
        Ok(Json(json!({
            "ok": !degraded,
            "status": if degraded { "degraded" } else { "ok" },
            "uptime_secs": svc.started.elapsed().as_secs_f64(),
            "version": env!("CARGO_PKG_VERSION"),
            "disk": {
                "configured": disk_configured,
                "up": disk_configured && !degraded,
                "error": svc.disk_error,
            },
            "remote": {
                "configured": remote_up.is_some(),
                "up": remote_up.unwrap_or(false),
            },
        })))
    })
    .await
}

/// `GET /v1/stats`.
pub(super) async fn stats(State(st): State<AppState>, headers: HeaderMap) -> Response {
    timed("stats", async move {
        authorize(&st.svc, &headers)?;
        let mut v = stats_json(&st.svc.store.stats());
        // NVML may sample for a few milliseconds: off the async workers.
        let gpus = tokio::task::spawn_blocking(gpu_json).await.unwrap_or_else(
            |e| json!({ "gpus": [], "gpus_unavailable": format!("telemetry task failed: {e}") }),
        );
        if let (Value::Object(m), Value::Object(g)) = (&mut v, gpus) {
            m.extend(g);
        }
        Ok(Json(v))
    })
    .await
}

/// Flattens [`StoreStats`] so each tier is one object of plain numbers.
pub(super) fn stats_json(s: &StoreStats) -> Value {
    let tiers: Vec<Value> = s
        .tiers
        .iter()
        .map(|t| {
            json!({
                "tier": t.tier.name(),
                "chunks": t.usage.chunks,
                "bytes": t.usage.bytes,
                "budget": t.usage.budget,
                "hits": t.hits,
                "misses": t.misses,
                "evictions": t.evictions,
                "promotions": t.promotions,
                "demotions": t.demotions,
                "corrupt": t.corrupt,
                "errors": t.errors,
            })
        })
        .collect();
    json!({ "chunks": s.chunks, "leases": s.leases, "tiers": tiers })
}

/// Per-GPU telemetry (`gpus`), and `gpus_unavailable` saying why the list is empty when NVML
/// cannot be used (no driver).
pub(super) fn gpu_json() -> Value {
    let (gpus, why) = kvtier_offload::gpu::telemetry::gpu_stats_or_empty();
    let mut v = json!({ "gpus": gpus });
    if let Some(why) = why {
        v["gpus_unavailable"] = Value::String(why);
    }
    v
}

/// `GET /v1/config`: the effective configuration, secrets redacted.
pub(super) async fn config(State(st): State<AppState>, headers: HeaderMap) -> Response {
    timed("config", async move {
        authorize(&st.svc, &headers)?;
        let mut v = serde_json::to_value(&st.svc.config).map_err(|e| {
            HttpError(crate::error::ApiError::Internal(format!(
                "serialize config: {e}"
            )))
        })?;
        redact(&mut v);
        Ok(Json(v))
    })
    .await
}

/// Replaces every token with a marker. `tenant_tokens` maps token → tenant, so its keys are
/// secrets: they become `<redacted N>` while the tenant names stay visible.
fn redact(v: &mut Value) {
    if let Some(t) = v.get_mut("token")
        && !t.is_null()
    {
        *t = Value::String("<redacted>".into());
    }
    if let Some(t) = v.get_mut("remote_password")
        && !t.is_null()
    {
        *t = Value::String("<redacted>".into());
    }
    if let Some(Value::Object(m)) = v.get_mut("tenant_tokens") {
        let tenants: Vec<Value> = std::mem::take(m).into_iter().map(|(_, t)| t).collect();
        for (i, t) in tenants.into_iter().enumerate() {
            m.insert(format!("<redacted {}>", i + 1), t);
        }
    }
}

/// `GET /metrics`: Prometheus text format, store figures refreshed now.
pub(super) async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Response {
    timed("metrics", async move {
        authorize(&st.svc, &headers)?;
        let (gpus, _) =
            tokio::task::spawn_blocking(kvtier_offload::gpu::telemetry::gpu_stats_or_empty)
                .await
                .unwrap_or_default();
        crate::metrics::refresh_gpus(&gpus);
        let mut text = crate::metrics::render(&st.svc.store.stats(), &st.svc.retrieval);
        if let Some(r) = &st.svc.remote {
            text.push_str(&crate::metrics::remote_text(&r.stats()));
        }
        Ok((
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_every_token_and_keeps_tenants() {
        let mut cfg = crate::config::ServeConfig {
            token: Some("global-secret".into()),
            ..Default::default()
        };
        cfg.tenant_tokens
            .insert("alice-secret".into(), "alice".into());
        let mut v = serde_json::to_value(&cfg).unwrap();
        redact(&mut v);
        let text = v.to_string();
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(v["token"], "<redacted>");
        assert_eq!(v["tenant_tokens"]["<redacted 1>"], "alice");
        let mut open = serde_json::to_value(crate::config::ServeConfig::default()).unwrap();
        redact(&mut open);
        assert!(open["token"].is_null(), "no token configured stays null");
    }
}
