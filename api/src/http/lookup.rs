//! `POST /v1/lookup`: how many leading tokens of a prompt the caller's tenant has cached, and
//! where each chunk lives.
//!
//! The namespace is built from the caller's tenant (never from the body), so a lookup can only
//! ever match the caller's own chunks. The layout is given either as its fingerprint (a number,
//! or a hex string because JSON numbers above 2^53 are unsafe in many clients) or as the full
//! [`ModelLayout`], whose fingerprint is computed here exactly as the engines compute it.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use kvtier_cache::key::{DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS};
use kvtier_cache::{ModelLayout, Namespace, TieredStore};

use super::extract::read_limited;
use super::{
    AppState, HttpError, HttpResult, authorize, bad_request, blocking, fingerprint_hex, timed,
};
use crate::error::ApiError;

/// Most tokens one lookup may carry.
pub const MAX_LOOKUP_TOKENS: usize = 1 << 20;
/// Largest lookup body: room for [`MAX_LOOKUP_TOKENS`] ten-digit ids plus separators and the
/// rest of the object.
pub const MAX_LOOKUP_BODY: usize = 16 << 20;
/// Bodies up to this size are parsed and looked up on the async worker (well under a
/// millisecond); larger ones go to a blocking thread.
const INLINE_BODY: usize = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupRequest {
    #[serde(default)]
    layout_fingerprint: Option<LayoutRef>,
    #[serde(default)]
    layout: Option<ModelLayout>,
    #[serde(default)]
    salt: Option<String>,
    #[serde(default = "default_chunk_tokens")]
    chunk_tokens: u32,
    tokens: Vec<u32>,
}

fn default_chunk_tokens() -> u32 {
    DEFAULT_CHUNK_TOKENS
}

/// The forms `layout_fingerprint` may take.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LayoutRef {
    Number(u64),
    Hex(String),
    Layout(ModelLayout),
}

fn layout_fingerprint(l: &ModelLayout) -> HttpResult<u64> {
    l.validate()?;
    Ok(l.fingerprint())
}

impl LookupRequest {
    fn fingerprint(&self) -> HttpResult<u64> {
        match (&self.layout_fingerprint, &self.layout) {
            (Some(_), Some(_)) => Err(bad_request(
                "give either layout_fingerprint or layout, not both",
            )),
            (None, None) => Err(bad_request(
                "layout_fingerprint (number, hex string or layout object) or layout is required",
            )),
            (None, Some(l)) | (Some(LayoutRef::Layout(l)), None) => layout_fingerprint(l),
            (Some(LayoutRef::Number(n)), None) => Ok(*n),
            (Some(LayoutRef::Hex(s)), None) => {
                let digits = s.strip_prefix("0x").unwrap_or(s);
                if digits.is_empty() || digits.len() > 16 {
                    return Err(bad_request(format!(
                        "layout_fingerprint {s:?} must be 1 to 16 hex digits"
                    )));
                }
                u64::from_str_radix(digits, 16).map_err(|_| {
                    bad_request(format!("layout_fingerprint {s:?} is not hexadecimal"))
                })
            }
        }
    }
}

/// `POST /v1/lookup`.
pub(super) async fn lookup(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    timed("lookup", async move {
        let caller = authorize(&st.svc, &headers)?;
        let body = read_limited(body, MAX_LOOKUP_BODY).await?;
        let store = st.svc.store.clone();
        let tenant = caller.principal.tenant;
        let small = body.len() <= INLINE_BODY;
        let work = move || run_lookup(&store, &tenant, &body);
        if small { work() } else { blocking(work).await }
    })
    .await
}

fn run_lookup(store: &TieredStore, tenant: &str, body: &[u8]) -> HttpResult<Json<Value>> {
    let req: LookupRequest = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("invalid lookup body: {e}")))?;
    if req.tokens.len() > MAX_LOOKUP_TOKENS {
        return Err(HttpError(ApiError::TooLarge(format!(
            "{} tokens in one lookup (at most {MAX_LOOKUP_TOKENS})",
            req.tokens.len()
        ))));
    }
    if req.chunk_tokens == 0 || req.chunk_tokens > MAX_CHUNK_TOKENS {
        return Err(bad_request(format!(
            "chunk_tokens must be in 1..={MAX_CHUNK_TOKENS}, got {}",
            req.chunk_tokens
        )));
    }
    let fingerprint = req.fingerprint()?;
    let mut ns = Namespace::new(fingerprint, tenant).with_chunk_tokens(req.chunk_tokens);
    if let Some(salt) = &req.salt {
        ns = ns.with_salt(salt);
    }
    let found = store.lookup(&ns, &req.tokens);
    let chunks: Vec<Value> = found
        .chunks
        .iter()
        .map(|c| {
            json!({
                "key": c.key.to_string(),
                "tiers": c.tiers.iter().map(|t| t.name()).collect::<Vec<_>>(),
                "fidelity": c.fidelity,
            })
        })
        .collect();
    Ok(Json(json!({
        "hit_tokens": found.hit_tokens,
        "chunk_tokens": req.chunk_tokens,
        "layout_fingerprint": fingerprint_hex(fingerprint),
        "chunks": chunks,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> LookupRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn fingerprint_forms_agree() {
        let layout = ModelLayout::smollm2_135m();
        let fp = layout.fingerprint();
        let forms = [
            json!({ "layout_fingerprint": fp, "tokens": [] }),
            json!({ "layout_fingerprint": format!("{fp:016x}"), "tokens": [] }),
            json!({ "layout_fingerprint": format!("0x{fp:x}"), "tokens": [] }),
            json!({ "layout_fingerprint": layout, "tokens": [] }),
            json!({ "layout": layout, "tokens": [] }),
        ];
        for f in forms {
            assert_eq!(parse(f.clone()).fingerprint().unwrap(), fp, "{f}");
        }
    }

    #[test]
    fn ambiguous_or_malformed_fingerprints_are_refused() {
        let layout = ModelLayout::smollm2_135m();
        let both = parse(json!({ "layout_fingerprint": 1, "layout": layout, "tokens": [] }));
        assert!(both.fingerprint().is_err());
        assert!(parse(json!({ "tokens": [] })).fingerprint().is_err());
        let not_hex = parse(json!({ "layout_fingerprint": "xyz", "tokens": [] }));
        assert!(
            not_hex
                .fingerprint()
                .unwrap_err()
                .0
                .to_string()
                .contains("not hexadecimal")
        );
        let too_long = parse(json!({ "layout_fingerprint": "1".repeat(17), "tokens": [] }));
        assert!(too_long.fingerprint().is_err());
    }

    #[test]
    fn unknown_fields_and_bad_tokens_are_refused() {
        assert!(
            serde_json::from_value::<LookupRequest>(
                json!({ "layout_fingerprint": 1, "tokens": [], "tokenz": [] })
            )
            .is_err()
        );
        assert!(
            serde_json::from_value::<LookupRequest>(
                json!({ "layout_fingerprint": 1, "tokens": [-1] })
            )
            .is_err()
        );
    }
}
