//! `POST /v1/prompts/budget`: prune a stored prompt to a layer-wise token budget
//! (see [`kvtier_prompt::budget`], which also enforces that only lossy tenants may prune).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use kvtier_cache::ChunkKey;

use kvtier_prompt::budget::{BudgetRequest, Selection, apply_budget};

use super::extract::read_limited;
use super::{AppState, HttpResult, authorize, bad_request, blocking, timed};

/// Largest body: H2O scores for a long prompt (`layers × tokens` numbers) fit comfortably.
pub const MAX_BUDGET_BODY: usize = 64 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body_ {
    keys: Vec<String>,
    fraction: f64,
    #[serde(default)]
    layer_cos: Option<Vec<f32>>,
    #[serde(default)]
    p: Option<f64>,
    #[serde(default = "default_policy")]
    policy: String,
    #[serde(default = "default_sinks")]
    sinks: usize,
    #[serde(default = "default_recent")]
    recent_ratio: f32,
    #[serde(default)]
    scores: Option<Vec<Vec<f32>>>,
}

fn default_policy() -> String {
    "streaming".into()
}
fn default_sinks() -> usize {
    4
}
fn default_recent() -> f32 {
    0.5
}

/// Parses a budget request; `p` defaults to the service's `squeeze_p`.
fn parse(body: &[u8], default_p: f64) -> HttpResult<BudgetRequest> {
    let b: Body_ = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("invalid budget body: {e}")))?;
    let keys = b
        .keys
        .iter()
        .map(|k| {
            k.parse::<ChunkKey>()
                .map_err(|e| bad_request(e.to_string()))
        })
        .collect::<HttpResult<Vec<_>>>()?;
    let selection = match (b.policy.as_str(), b.scores) {
        ("streaming", None) => Selection::Streaming { sinks: b.sinks },
        ("streaming", Some(_)) => {
            return Err(bad_request("scores are only used by policy \"h2o\""));
        }
        ("h2o", Some(scores)) => Selection::HeavyHitters {
            sinks: b.sinks,
            recent_ratio: b.recent_ratio,
            scores,
        },
        ("h2o", None) => return Err(bad_request("policy \"h2o\" needs scores [layer][token]")),
        (other, _) => {
            return Err(bad_request(format!(
                "unknown policy {other:?} (streaming or h2o)"
            )));
        }
    };
    Ok(BudgetRequest {
        keys,
        fraction: b.fraction,
        layer_cos: b.layer_cos,
        p: b.p.unwrap_or(default_p),
        selection,
    })
}

/// `POST /v1/prompts/budget`.
pub(super) async fn budget(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    timed("budget", async move {
        let caller = authorize(&st.svc, &headers)?;
        let body = read_limited(body, MAX_BUDGET_BODY).await?;
        let svc = st.svc.clone();
        let tenant = caller.tenant_id;
        blocking(move || {
            let req = parse(&body, svc.config.squeeze_p)?;
            let out = apply_budget(&svc.store, &svc.layouts, &svc.lossy_tenants, tenant, &req)?;
            // Engines send layer importance here; the squeezer reuses it under pressure.
            if let (Some(cos), Some(info)) = (&req.layer_cos, svc.store.info(tenant, req.keys[0])) {
                svc.importance.remember(info.meta.layout, cos);
            }
            Ok(Json(serde_json::to_value(out).unwrap_or(Value::Null)))
        })
        .await
    })
    .await
}
