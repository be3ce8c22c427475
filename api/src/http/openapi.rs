//! The OpenAPI 3.0 description of the control plane, written by hand next to the handlers it
//! describes. A test checks that every route of the router is documented with its method.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use super::{AppState, authorize, timed};

/// `GET /v1/openapi.json`.
pub(super) async fn serve_document(State(st): State<AppState>, headers: HeaderMap) -> Response {
    timed("openapi", async move {
        authorize(&st.svc, &headers)?;
        Ok(Json(document()))
    })
    .await
}

fn error_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for code in codes {
        let description = match *code {
            "400" => "malformed request (bad key, query, body or tenant name)",
            "401" => "missing or wrong bearer token, or a tenant token used for another tenant",
            "404" => "no such chunk for the caller's tenant",
            "413" => "request too large",
            _ => "server-side failure",
        };
        m.insert(
            code.to_string(),
            json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }),
        );
    }
    Value::Object(m)
}

fn ok_json(description: &str, schema: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn with_errors(ok_code: &str, ok: Value, errors: &[&str]) -> Value {
    let mut r = error_responses(errors);
    r[ok_code] = ok;
    r
}

const TENANT: &str = "#/components/parameters/Tenant";
const KEY: &str = "#/components/parameters/Key";

/// The whole document.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "kvtier control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, stats, prefix lookup, chunk management, metrics and a server-sent event feed of a kvtier node. Every operation except GET /healthz requires `Authorization: Bearer <token>` when the server has a token configured; the tenant is taken from the X-Kvtier-Tenant header (default \"default\") and scopes every tenant-owned resource. Errors are JSON {\"error\", \"code\"}. Layout fingerprints are returned as 16 hex digits."
        },
        "security": [ { "bearer": [] } ],
        "paths": {
            "/healthz": { "get": {
                "operationId": "healthz",
                "summary": "Liveness and degradation (unauthenticated: safe for probes, reveals no data)",
                "security": [],
                "responses": { "200": ok_json("always 200 while serving; status is degraded when the configured disk tier is down", "Health") }
            }},
            "/metrics": { "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition; store figures are refreshed at scrape time",
                "responses": with_errors("200", json!({ "description": "metrics", "content": { "text/plain": { "schema": { "type": "string" } } } }), &["401"])
            }},
            "/v1/stats": { "get": {
                "operationId": "stats",
                "summary": "Store-wide occupancy and counters per tier (all tenants; no keys)",
                "responses": with_errors("200", ok_json("stats", "Stats"), &["401"])
            }},
            "/v1/config": { "get": {
                "operationId": "config",
                "summary": "The effective configuration; the token and tenant tokens are redacted",
                "responses": with_errors("200", json!({ "description": "ServeConfig as JSON", "content": { "application/json": { "schema": { "type": "object" } } } }), &["401"])
            }},
            "/v1/openapi.json": { "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": with_errors("200", json!({ "description": "OpenAPI 3.0 document", "content": { "application/json": { "schema": { "type": "object" } } } }), &["401"])
            }},
            "/v1/lookup": { "post": {
                "operationId": "lookup",
                "summary": "How many leading tokens of a prompt are cached for the caller's tenant, chunk by chunk",
                "parameters": [ { "$ref": TENANT } ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/LookupRequest" } } } },
                "responses": with_errors("200", ok_json("the cached prefix", "LookupResponse"), &["400", "401", "413"])
            }},
            "/v1/prompts/budget": { "post": {
                "operationId": "applyBudget",
                "summary": "Prune a stored prompt of the caller's tenant to a SqueezeAttention layer budget: every chunk is rewritten keeping only each layer's selected tokens (codec 7, lossy). Only tenants in lossy_tenants.",
                "parameters": [ { "$ref": TENANT } ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/BudgetRequest" } } } },
                "responses": with_errors("200", ok_json("what was kept", "BudgetResponse"), &["400", "401", "404", "413", "507"])
            }},
            "/v1/prompts/{key}/queries": { "put": {
                "operationId": "uploadQueries",
                "summary": "Query vectors of a stored prompt's prefill, sampled positions: the prompt's retrieval index is (re)built with the attention-aware graph instead of HNSW. {key} is the prompt's last chunk.",
                "parameters": [
                    { "$ref": TENANT }, { "$ref": KEY },
                    { "name": "heads", "in": "query", "required": true, "schema": { "type": "integer", "minimum": 1 }, "description": "query heads per layer (a multiple of the layout's KV heads)" }
                ],
                "requestBody": { "required": true, "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" }, "example": "little-endian f32 [layer][query head][n][head_dim]" } } },
                "responses": with_errors("200", json!({ "description": "the queries were kept", "content": { "application/json": { "schema": { "type": "object", "properties": {
                    "key": { "$ref": "#/components/schemas/Key" }, "heads": { "type": "integer" }, "positions": { "type": "integer", "description": "n, query positions per head" } } } } } }), &["400", "401", "404", "413", "507"])
            }},
            "/v1/chunks": { "get": {
                "operationId": "listChunks",
                "summary": "The caller's chunks in key order, paged",
                "parameters": [
                    { "$ref": TENANT },
                    { "name": "tier", "in": "query", "schema": { "$ref": "#/components/schemas/Tier" }, "description": "only chunks present in this tier" },
                    { "name": "after", "in": "query", "schema": { "$ref": "#/components/schemas/Key" }, "description": "cursor: the `next` of the previous page" },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }
                ],
                "responses": with_errors("200", ok_json("one page", "ChunkPage"), &["400", "401"])
            }},
            "/v1/chunks/{key}": {
                "get": {
                    "operationId": "showChunk",
                    "summary": "One chunk of the caller's tenant; verify=true re-reads every copy and checks its checksum",
                    "parameters": [
                        { "$ref": TENANT }, { "$ref": KEY },
                        { "name": "verify", "in": "query", "schema": { "type": "boolean", "default": false } }
                    ],
                    "responses": with_errors("200", ok_json("the chunk", "ChunkDetail"), &["400", "401", "404", "500", "503"])
                },
                "delete": {
                    "operationId": "deleteChunk",
                    "summary": "Delete a chunk of the caller's tenant from every tier",
                    "parameters": [ { "$ref": TENANT }, { "$ref": KEY } ],
                    "responses": with_errors("204", json!({ "description": "deleted" }), &["400", "401", "404", "503"])
                }
            },
            "/v1/events": { "get": {
                "operationId": "events",
                "summary": "Server-sent events of the caller's chunks: ready (first), stored, removed, cleared, lagged (the subscriber fell behind; resynchronise with listChunks). `event:` is the type, `data:` one JSON object. Keep-alive comments every 15 s.",
                "parameters": [ { "$ref": TENANT } ],
                "responses": with_errors("200", json!({ "description": "event stream", "content": { "text/event-stream": { "schema": { "$ref": "#/components/schemas/Event" } } } }), &["401"])
            }}
        },
        "components": components(),
    })
}

fn components() -> Value {
    json!({
        "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        "parameters": {
            "Tenant": { "name": "X-Kvtier-Tenant", "in": "header", "required": false, "schema": { "type": "string", "default": "default", "maxLength": 128 }, "description": "tenant to act as (printable ASCII); a tenant-bound token fixes it" },
            "Key": { "name": "key", "in": "path", "required": true, "schema": { "$ref": "#/components/schemas/Key" } }
        },
        "schemas": {
            "Error": { "type": "object", "required": ["error", "code"], "properties": {
                "error": { "type": "string", "description": "lowercase human-readable message" },
                "code": { "type": "string", "enum": ["unauthorized", "not_found", "bad_request", "too_large", "full", "corrupt", "unavailable", "internal", "method_not_allowed"] }
            }},
            "Key": { "type": "string", "pattern": "^[0-9a-fA-F]{32}$", "description": "128-bit chunk key as 32 hex digits" },
            "Fingerprint": { "type": "string", "pattern": "^[0-9a-f]{16}$" },
            "Tier": { "type": "string", "enum": ["gpu", "host", "disk", "remote"] },
            "Fidelity": { "type": "object", "required": ["kind"], "properties": {
                "kind": { "type": "string", "enum": ["exact", "lossless", "lossy"] },
                "codec": { "type": "integer", "description": "lossy only" },
                "error_bound": { "type": "number", "description": "lossy only" }
            }},
            "Health": { "type": "object", "properties": {
                "ok": { "type": "boolean" },
                "status": { "type": "string", "enum": ["ok", "degraded"] },
                "uptime_secs": { "type": "number" },
                "version": { "type": "string" },
                "disk": { "type": "object", "properties": {
                    "configured": { "type": "boolean" }, "up": { "type": "boolean" }, "error": { "type": "string", "nullable": true }
                }}
            }},
            "TierStats": { "type": "object", "properties": {
                "tier": { "$ref": "#/components/schemas/Tier" },
                "chunks": { "type": "integer" }, "bytes": { "type": "integer" }, "budget": { "type": "integer" },
                "hits": { "type": "integer" }, "misses": { "type": "integer" }, "evictions": { "type": "integer" },
                "promotions": { "type": "integer" }, "demotions": { "type": "integer" },
                "corrupt": { "type": "integer" }, "errors": { "type": "integer" }
            }},
            "Stats": { "type": "object", "properties": {
                "chunks": { "type": "integer" }, "leases": { "type": "integer" },
                "tiers": { "type": "array", "items": { "$ref": "#/components/schemas/TierStats" } }
            }},
            "ModelLayout": { "type": "object", "required": ["model_id", "num_layers", "kv_heads", "head_dim", "dtype", "attention"], "properties": {
                "model_id": { "type": "string" }, "num_layers": { "type": "integer" }, "kv_heads": { "type": "integer" }, "head_dim": { "type": "integer" },
                "dtype": { "type": "string", "enum": ["f16", "bf16", "f32", "fp8-e4m3"] },
                "attention": { "type": "object", "description": "{\"kind\": \"mha\"} or {\"kind\": \"mla\", \"latent_dim\": 512, \"rope_dim\": 64}" }
            }},
            "LookupRequest": { "type": "object", "required": ["tokens"], "description": "exactly one of layout_fingerprint and layout", "properties": {
                "layout_fingerprint": { "oneOf": [ { "type": "integer", "format": "int64" }, { "type": "string", "description": "hex, optional 0x" }, { "$ref": "#/components/schemas/ModelLayout" } ] },
                "layout": { "$ref": "#/components/schemas/ModelLayout" },
                "salt": { "type": "string", "nullable": true, "description": "LoRA id or cache salt" },
                "chunk_tokens": { "type": "integer", "default": 256, "minimum": 1, "maximum": 65536 },
                "tokens": { "type": "array", "maxItems": 1048576, "items": { "type": "integer", "minimum": 0, "maximum": 4294967295u64 } }
            }},
            "BudgetRequest": { "type": "object", "required": ["keys", "fraction"], "properties": {
                "keys": { "type": "array", "items": { "$ref": "#/components/schemas/Key" }, "description": "the prompt's chunks, first first" },
                "fraction": { "type": "number", "description": "tokens kept per layer on average, as a fraction of the prompt, in (0, 1]" },
                "layer_cos": { "type": "array", "items": { "type": "number" }, "description": "per-layer importance; omitted: uniform budgets" },
                "p": { "type": "number", "description": "share of the uniform budget the least important layers keep; omitted: the service's squeeze_p (1.0, uniform, unless configured)" },
                "policy": { "type": "string", "enum": ["streaming", "h2o"], "default": "streaming" },
                "sinks": { "type": "integer", "default": 4 },
                "recent_ratio": { "type": "number", "default": 0.5, "description": "h2o: share of the budget after the sinks kept as the recent window" },
                "scores": { "type": "array", "items": { "type": "array", "items": { "type": "number" } }, "description": "h2o: accumulated attention [layer][token]" }
            }},
            "BudgetResponse": { "type": "object", "properties": {
                "tokens": { "type": "integer" },
                "budgets": { "type": "array", "items": { "type": "integer" } },
                "squeezed_layers": { "type": "array", "items": { "type": "integer" } },
                "chunks": { "type": "integer" },
                "bytes_before": { "type": "integer" },
                "bytes_after": { "type": "integer" }
            }},
            "LookupResponse": { "type": "object", "properties": {
                "hit_tokens": { "type": "integer" },
                "chunk_tokens": { "type": "integer" },
                "layout_fingerprint": { "$ref": "#/components/schemas/Fingerprint" },
                "chunks": { "type": "array", "items": { "type": "object", "properties": {
                    "key": { "$ref": "#/components/schemas/Key" },
                    "tiers": { "type": "array", "items": { "$ref": "#/components/schemas/Tier" } },
                    "fidelity": { "$ref": "#/components/schemas/Fidelity" }
                }}}
            }},
            "Chunk": { "type": "object", "properties": {
                "key": { "$ref": "#/components/schemas/Key" },
                "layout_fingerprint": { "$ref": "#/components/schemas/Fingerprint" },
                "tokens": { "type": "integer" }, "depth": { "type": "integer" },
                "parent": { "type": "string", "nullable": true },
                "tiers": { "type": "array", "items": { "$ref": "#/components/schemas/Tier" } },
                "size": { "type": "integer", "description": "decoded (raw) size in bytes" },
                "codec": { "type": "integer" },
                "fidelity": { "$ref": "#/components/schemas/Fidelity" },
                "leases": { "type": "integer" },
                "last_access": { "type": "integer", "description": "logical access tick; higher is more recent" }
            }},
            "ChunkDetail": { "allOf": [ { "$ref": "#/components/schemas/Chunk" }, { "type": "object", "properties": {
                "verify": { "type": "object", "description": "present with verify=true", "properties": {
                    "ok": { "type": "boolean" },
                    "tiers": { "type": "array", "items": { "type": "object", "properties": { "tier": { "$ref": "#/components/schemas/Tier" }, "ok": { "type": "boolean" } } } }
                }}
            }}]},
            "ChunkPage": { "type": "object", "properties": {
                "chunks": { "type": "array", "items": { "$ref": "#/components/schemas/Chunk" } },
                "next": { "type": "string", "nullable": true, "description": "pass as `after` for the next page; null on the last page" }
            }},
            "Event": { "type": "object", "required": ["event", "timestamp"], "properties": {
                "event": { "type": "string", "enum": ["ready", "stored", "removed", "cleared", "lagged"] },
                "timestamp": { "type": "integer", "description": "milliseconds since the Unix epoch, when sent" },
                "key": { "$ref": "#/components/schemas/Key" },
                "parent": { "type": "string", "nullable": true },
                "depth": { "type": "integer" }, "tokens": { "type": "integer" },
                "tier": { "$ref": "#/components/schemas/Tier" },
                "layout_fingerprint": { "$ref": "#/components/schemas/Fingerprint" },
                "size": { "type": "integer" },
                "fidelity": { "$ref": "#/components/schemas/Fidelity" },
                "dropped": { "type": "integer", "description": "lagged only: events this subscriber missed" },
                "tenant": { "type": "string", "description": "ready only" }
            }}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_method() {
        let doc = document();
        for (method, path) in super::super::routes() {
            let op = &doc["paths"][path][method.as_str().to_ascii_lowercase()];
            assert!(
                op.is_object(),
                "{method} {path} missing from the openapi document"
            );
            assert!(
                op["responses"].is_object(),
                "{method} {path} has no responses"
            );
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(
            documented,
            super::super::routes().len(),
            "no undocumented extras"
        );
    }
}
