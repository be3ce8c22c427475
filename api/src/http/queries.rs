//! `PUT /v1/prompts/{key}/queries?heads=H`: an engine uploads query vectors of a stored
//! prompt's prefill, so the prompt's retrieval index is built with the attention-aware graph
//! (see [`kvtier_prompt::retrieval`]). The body is raw little-endian f32, `[layer][query head][n]
//! [head_dim]`; `{key}` is the prompt's last chunk.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::json;

use super::extract::{parse_key, query_pairs, read_limited};
use super::{AppState, authorize, bad_request, blocking, timed};

/// Largest body: 256 MiB, e.g. 2,048 sampled positions of all 9 heads of SmolLM2's 30 layers
/// take 135 MiB. Engines sample positions rather than send every one.
pub const MAX_QUERIES_BODY: usize = 256 << 20;

/// `PUT /v1/prompts/{key}/queries`.
pub(super) async fn upload(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    timed("queries", async move {
        let caller = authorize(&st.svc, &headers)?;
        let tip = parse_key(&key)?;
        let mut heads = None;
        for (_, value) in query_pairs(query.as_deref(), &["heads"])? {
            heads = Some(value.parse::<u32>().map_err(|_| {
                bad_request(format!("heads must be a positive integer, not {value:?}"))
            })?);
        }
        let heads = heads.ok_or_else(|| bad_request("missing ?heads= (query heads per layer)"))?;
        let body = read_limited(body, MAX_QUERIES_BODY).await?;
        if body.len() % 4 != 0 {
            return Err(bad_request(format!(
                "body of {} bytes is not whole little-endian f32 values",
                body.len()
            )));
        }
        let svc = st.svc.clone();
        let tenant = caller.tenant_id;
        blocking(move || {
            let data: Vec<f32> = body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let n = svc
                .retrieval
                .set_queries(&svc.store, tenant, tip, heads, data)?;
            Ok(Json(
                json!({ "key": tip.to_string(), "heads": heads, "positions": n }),
            ))
        })
        .await
    })
    .await
}
