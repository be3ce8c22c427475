//! `/v1/chunks`: list, show (optionally verifying checksums) and delete the caller's chunks.
//!
//! Every store call passes the caller's tenant id, and the store answers "absent" for a chunk
//! of another tenant, so a key learnt elsewhere reveals nothing: show and delete give the same
//! 404 whether the key is unknown or belongs to someone else.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use kvtier_cache::{ChunkInfo, ChunkKey, TierKind};

use super::extract::{parse_bool, parse_key, query_pairs};
use super::{
    AppState, HttpError, HttpResult, authorize, bad_request, blocking, fingerprint_hex, timed,
};
use crate::error::ApiError;

/// Page size when the caller names none.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page a caller may ask for.
pub const MAX_PAGE: usize = 1000;

/// The JSON view of one chunk, shared by list and show.
pub(super) fn chunk_json(i: &ChunkInfo) -> Value {
    json!({
        "key": i.key.to_string(),
        "layout_fingerprint": fingerprint_hex(i.meta.layout),
        "tokens": i.meta.tokens,
        "depth": i.meta.depth,
        "parent": i.meta.parent.map(|p| p.to_string()),
        "tiers": tier_names(i.tiers),
        "size": i.meta.raw_len,
        "codec": i.meta.codec,
        "fidelity": i.meta.fidelity,
        "leases": i.leases,
        "last_access": i.last_access,
    })
}

fn tier_names(t: kvtier_cache::TierSet) -> Vec<&'static str> {
    t.iter().map(TierKind::name).collect()
}

fn parse_tier(text: &str) -> HttpResult<TierKind> {
    TierKind::ALL
        .into_iter()
        .find(|t| t.name() == text)
        .ok_or_else(|| bad_request(format!("unknown tier {text:?} (gpu, host, disk or remote)")))
}

fn not_found(key: ChunkKey) -> HttpError {
    HttpError(ApiError::NotFound(format!("chunk {key}")))
}

/// `GET /v1/chunks?tier=&after=&limit=`: the caller's chunks in key order. `next` is the cursor
/// for the following page (the last key returned), or null when this page is the last.
pub(super) async fn list(
    State(st): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    timed("list", async move {
        let caller = authorize(&st.svc, &headers)?;
        let mut tier = None;
        let mut after = None;
        let mut limit = DEFAULT_PAGE;
        for (name, value) in query_pairs(query.as_deref(), &["tier", "after", "limit"])? {
            match name.as_str() {
                "tier" => tier = Some(parse_tier(&value)?),
                "after" => after = Some(parse_key(&value)?),
                _ => {
                    limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            bad_request(format!("limit must be in 1..={MAX_PAGE}, got {value:?}"))
                        })?;
                }
            }
        }
        // A scan of the whole index plus a sort: cheap for small stores, but not something
        // to do on an async worker when the store holds millions of chunks.
        let store = st.svc.store.clone();
        let tenant = caller.tenant_id;
        let mut page = blocking(move || Ok(store.list(tenant, tier, after, limit + 1))).await?;
        let more = page.len() > limit;
        page.truncate(limit);
        let next = more
            .then(|| page.last().map(|i| i.key.to_string()))
            .flatten();
        let chunks: Vec<Value> = page.iter().map(chunk_json).collect();
        Ok(Json(json!({ "chunks": chunks, "next": next })))
    })
    .await
}

/// `GET /v1/chunks/{key}?verify=true`.
pub(super) async fn show(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    timed("show", async move {
        let caller = authorize(&st.svc, &headers)?;
        let key = parse_key(&key)?;
        let mut verify = false;
        for (name, value) in query_pairs(query.as_deref(), &["verify"])? {
            verify = parse_bool(&name, &value)?;
        }
        let info = st
            .svc
            .store
            .info(caller.tenant_id, key)
            .ok_or_else(|| not_found(key))?;
        let mut body = chunk_json(&info);
        let store = st.svc.store.clone();
        let tenant = caller.tenant_id;
        let copies = blocking(move || Ok(store.copies(tenant, key)?)).await?;
        body["copies"] = copies
            .iter()
            .map(|c| {
                json!({
                    "tier": c.tier.name(),
                    "codec": c.codec,
                    "codec_name": kvtier_cache::codec_id::name(c.codec),
                    "fidelity": c.fidelity,
                    "stored_bytes": c.stored_bytes,
                    "raw_bytes": c.raw_bytes,
                    "ratio": (c.ratio() * 1000.0).round() / 1000.0,
                })
            })
            .collect::<Vec<_>>()
            .into();
        if verify {
            // Re-reads the chunk in every tier holding it (disk I/O and a checksum pass).
            let store = st.svc.store.clone();
            let tenant = caller.tenant_id;
            let results = blocking(move || Ok(store.verify(tenant, key)?)).await?;
            let all_ok = results.iter().all(|(_, ok)| *ok);
            body["verify"] = json!({
                "ok": all_ok,
                "tiers": results
                    .iter()
                    .map(|(t, ok)| json!({ "tier": t.name(), "ok": ok }))
                    .collect::<Vec<_>>(),
            });
        }
        Ok(Json(body))
    })
    .await
}

/// `DELETE /v1/chunks/{key}`: 204 when removed, 404 when absent (or another tenant's).
pub(super) async fn remove(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    timed("delete", async move {
        let caller = authorize(&st.svc, &headers)?;
        let key = parse_key(&key)?;
        let store = st.svc.store.clone();
        let tenant = caller.tenant_id;
        // Removal touches every tier, the disk one included.
        let removed = blocking(move || Ok(store.delete(tenant, key)?)).await?;
        if !removed {
            return Err(not_found(key));
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_with_clear_errors() {
        assert_eq!(parse_tier("disk").unwrap(), TierKind::Disk);
        assert!(
            parse_tier("Disk")
                .unwrap_err()
                .0
                .to_string()
                .contains("unknown tier")
        );
    }
}
