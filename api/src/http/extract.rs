//! Request extractors the control plane's handlers share: the body read under a size limit,
//! a chunk key in a path, query parameters checked against the names a route knows.
//!
//! A leaf of `http`: handlers import from here, never from each other.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use kvtier_cache::ChunkKey;

use super::{HttpError, HttpResult, bad_request};
use crate::error::ApiError;

/// Reads the whole body, refusing (413) as soon as it passes `limit`.
pub(super) async fn read_limited(body: Body, limit: usize) -> HttpResult<Bytes> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(|e| bad_request(format!("reading request body: {e}")))?;
        if buf.len() + frame.len() > limit {
            return Err(HttpError(ApiError::TooLarge(format!(
                "request body exceeds {limit} bytes"
            ))));
        }
        buf.extend_from_slice(&frame);
    }
    Ok(buf.freeze())
}

/// A chunk key as written in paths and queries (32 hex digits).
pub(super) fn parse_key(text: &str) -> HttpResult<ChunkKey> {
    text.parse::<ChunkKey>()
        .map_err(|e| bad_request(e.to_string()))
}

/// Query parameters as `(name, value)` pairs, refusing names the route does not know so a
/// misspelt filter is an error rather than silently ignored.
pub(super) fn query_pairs(raw: Option<&str>, known: &[&str]) -> HttpResult<Vec<(String, String)>> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let name = percent_decode(name)?;
        if !known.contains(&name.as_str()) {
            return Err(bad_request(format!(
                "unknown query parameter {name:?} (known: {})",
                known.join(", ")
            )));
        }
        out.push((name, percent_decode(value)?));
    }
    Ok(out)
}

/// Decodes `%XX` escapes and `+` (form encoding's space).
fn percent_decode(s: &str) -> HttpResult<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad_request("malformed percent escape in query"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad_request("query is not valid utf-8"))
}

/// Parses a boolean query value.
pub(super) fn parse_bool(name: &str, v: &str) -> HttpResult<bool> {
    match v {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad_request(format!(
            "query parameter {name} must be true or false, got {v:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_unknown_names_are_refused() {
        let q = query_pairs(
            Some("tier=host&after=%2Fx+y&limit=5"),
            &["tier", "after", "limit"],
        )
        .unwrap();
        assert_eq!(
            q,
            vec![
                ("tier".to_string(), "host".to_string()),
                ("after".to_string(), "/x y".to_string()),
                ("limit".to_string(), "5".to_string()),
            ]
        );
        let err = query_pairs(Some("tierr=host"), &["tier"]).unwrap_err();
        assert!(
            err.0
                .to_string()
                .contains("unknown query parameter \"tierr\"")
        );
        assert!(query_pairs(Some("tier=%zz"), &["tier"]).is_err());
        assert!(query_pairs(Some("tier=%4"), &["tier"]).is_err());
        assert!(query_pairs(None, &[]).unwrap().is_empty());
    }

    #[test]
    fn keys_parse_with_clear_errors() {
        let k = ChunkKey(0xabc);
        assert_eq!(parse_key(&k.to_string()).unwrap(), k);
        let err = parse_key("not-a-key").unwrap_err().0;
        assert_eq!(err.http_status(), 400);
        assert!(err.to_string().contains("expected 32 hex digits"), "{err}");
    }
}
