//! The HTTP control plane end to end: a real [`Service`], served on a loopback port, driven with
//! reqwest. Chunks are put straight into the store, then every endpoint is checked against what
//! was stored, including tenant isolation and the event stream.

use std::sync::Arc;
use std::time::Duration;

use kvtier::config::ServeConfig;
use kvtier::service::Service;
use kvtier::testing::{TestServer, loopback_config};
use kvtier_cache::{ChunkKey, ChunkMeta, ModelLayout, Namespace, WriteMode};
use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123";
const CHUNK: u32 = 4;

struct Harness {
    svc: Arc<Service>,
    base: String,
    http: reqwest::Client,
    srv: TestServer,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(disk_bytes: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Self::start_with(
            ServeConfig {
                disk_bytes,
                host_bytes: 64 << 20,
                token: Some(TOKEN.into()),
                // Every put reaches disk too, so verify has two copies to check.
                write_mode: WriteMode::WriteThrough,
                ..loopback_config(dir.path())
            },
            dir,
        )
        .await
    }

    async fn start_with(config: ServeConfig, dir: tempfile::TempDir) -> Harness {
        let srv = TestServer::start_with(config).unwrap();
        Harness {
            svc: srv.svc.clone(),
            base: srv.http_url(),
            http: reqwest::Client::new(),
            srv,
            _dir: dir,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str, tenant: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("X-Kvtier-Tenant", tenant)
    }

    async fn get_json(&self, path: &str, tenant: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::GET, path, tenant)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn lookup(&self, tenant: &str, body: Value) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::POST, "/v1/lookup", tenant)
            .json(&body)
            .send()
            .await;
        let r = r.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// Stores every full chunk of `tokens` for `tenant`; returns the keys in prompt order.
    fn put_prompt(&self, tenant: &str, tokens: &[u32]) -> Vec<ChunkKey> {
        let ns = ns(tenant);
        let keys = ns.chunk_keys(tokens);
        for (depth, key) in keys.iter().enumerate() {
            let payload = vec![depth as u8 + 1; 64];
            let mut meta = ChunkMeta::raw(ns.tenant_id(), fp(), CHUNK, depth as u32, 64);
            meta.parent = depth.checked_sub(1).map(|d| keys[d]);
            self.svc.store.put(*key, meta, &payload).unwrap();
        }
        keys
    }

    async fn shutdown(self) {
        tokio::time::timeout(Duration::from_secs(5), self.srv.shutdown())
            .await
            .expect("server stops within 5 s of shutdown")
            .unwrap();
    }
}

fn fp() -> u64 {
    ModelLayout::smollm2_135m().fingerprint()
}

fn ns(tenant: &str) -> Namespace {
    Namespace::new(fp(), tenant).with_chunk_tokens(CHUNK)
}

fn lookup_body(tokens: &[u32]) -> Value {
    json!({ "layout_fingerprint": fp(), "chunk_tokens": CHUNK, "tokens": tokens })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn token_is_required_everywhere_but_healthz() {
    let h = Harness::start(0).await;
    let url = format!("{}/v1/stats", h.base);
    let missing = h.http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    assert_eq!(body["error"], "unauthorized: missing token");

    let wrong = h
        .http
        .get(&url)
        .bearer_auth("test-token-0124")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["error"],
        "unauthorized: invalid token"
    );

    let basic = h
        .http
        .get(&url)
        .basic_auth("u", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    assert!(
        basic.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("bearer")
    );

    assert_eq!(h.get_json("/v1/stats", "alice").await.0, 200);
    let bad_tenant = h.get_json("/v1/chunks", "a b").await;
    assert_eq!(bad_tenant.0, 400, "{}", bad_tenant.1);

    let health = h
        .http
        .get(format!("{}/healthz", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["disk"]["configured"], false);
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    h.shutdown().await;
}

#[tokio::test]
async fn healthz_reports_a_failed_disk_tier_as_degraded() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the data directory should be: the disk tier cannot open under it.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let cfg = ServeConfig {
        data_dir: blocker,
        // The data plane's socket cannot live under it either.
        socket: dir.path().join("kvtier.sock"),
        disk_bytes: 16 << 20,
        host_bytes: 64 << 20,
        ..loopback_config(dir.path())
    };
    let h = Harness::start_with(cfg, dir).await;
    let health: Value = h
        .http
        .get(format!("{}/healthz", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["ok"], false);
    assert_eq!(health["disk"]["up"], false);
    assert!(health["disk"]["error"].is_string());
    h.shutdown().await;
}

#[tokio::test]
async fn stats_count_what_was_stored() {
    let h = Harness::start(0).await;
    let keys = h.put_prompt("alice", &(0..12).collect::<Vec<_>>());
    assert!(
        h.svc
            .store
            .get(ns("alice").tenant_id(), keys[0], true)
            .unwrap()
            .hit()
            .is_some()
    );
    let (status, s) = h.get_json("/v1/stats", "alice").await;
    assert_eq!(status, 200);
    assert_eq!(s["chunks"], 3);
    assert_eq!(s["leases"], 0);
    let host = &s["tiers"][0];
    assert_eq!(host["tier"], "host");
    assert_eq!(host["chunks"], 3);
    assert_eq!(host["budget"], 64 << 20);
    assert!(host["bytes"].as_u64().unwrap() >= 3 * 64);
    assert_eq!(host["hits"], 1);
    assert_eq!(
        s["tiers"].as_array().unwrap().len(),
        1,
        "no disk tier configured"
    );
    // GPU telemetry: a list, and where it is empty, the reason (no NVML on CPU machines).
    let gpus = s["gpus"].as_array().expect("gpus list in stats");
    if gpus.is_empty() {
        assert!(s["gpus_unavailable"].as_str().unwrap().starts_with("nvml"));
    } else {
        assert!(gpus[0]["memory_total_bytes"].as_u64().unwrap() > 0);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn lookup_finds_the_stored_prefix_for_its_tenant_only() {
    let h = Harness::start(0).await;
    let tokens: Vec<u32> = (100..116).collect();
    let keys = h.put_prompt("alice", &tokens);

    // Two extra tokens: a partial chunk never matches.
    let mut longer = tokens.clone();
    longer.extend([1, 2]);
    let (status, r) = h.lookup("alice", lookup_body(&longer)).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["hit_tokens"], 16);
    assert_eq!(r["layout_fingerprint"], format!("{:016x}", fp()));
    let got: Vec<String> = r["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap().into())
        .collect();
    assert_eq!(
        got,
        keys.iter().map(ChunkKey::to_string).collect::<Vec<_>>()
    );
    assert_eq!(strings(&r["chunks"][0]["tiers"]), ["host"]);
    assert_eq!(r["chunks"][0]["fidelity"]["kind"], "exact");

    let mut diverged = tokens.clone();
    diverged[9] = 7;
    assert_eq!(
        h.lookup("alice", lookup_body(&diverged)).await.1["hit_tokens"],
        8
    );

    let other = h.lookup("bob", lookup_body(&tokens)).await;
    assert_eq!(other.0, 200);
    assert_eq!(
        other.1["hit_tokens"], 0,
        "identical tokens of another tenant never match"
    );

    let by_layout =
        json!({ "layout": ModelLayout::smollm2_135m(), "chunk_tokens": CHUNK, "tokens": tokens });
    assert_eq!(h.lookup("alice", by_layout).await.1["hit_tokens"], 16);
    let by_hex = json!({ "layout_fingerprint": format!("{:x}", fp()), "chunk_tokens": CHUNK, "tokens": tokens });
    assert_eq!(h.lookup("alice", by_hex).await.1["hit_tokens"], 16);
    let salted = json!({ "layout_fingerprint": fp(), "salt": "lora-1", "chunk_tokens": CHUNK, "tokens": tokens });
    assert_eq!(h.lookup("alice", salted).await.1["hit_tokens"], 0);

    let too_many = vec![0u32; (1 << 20) + 1];
    let (status, r) = h.lookup("alice", lookup_body(&too_many)).await;
    assert_eq!(status, 413, "{r}");
    assert_eq!(r["code"], "too_large");

    let (status, r) = h
        .lookup(
            "alice",
            json!({ "layout_fingerprint": fp(), "tokens": [-1] }),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("bad request: invalid lookup body"),
        "{r}"
    );
    let (status, r) = h.lookup("alice", json!({ "tokens": [1] })).await;
    assert_eq!(status, 400);
    assert!(
        r["error"].as_str().unwrap().contains("layout_fingerprint"),
        "{r}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn list_pages_through_the_callers_chunks_only() {
    let h = Harness::start(0).await;
    let mut alice: Vec<ChunkKey> = h.put_prompt("alice", &(0..20).collect::<Vec<_>>());
    let bob = h.put_prompt("bob", &(0..8).collect::<Vec<_>>());
    alice.sort();

    let mut seen = Vec::new();
    let mut path = "/v1/chunks?limit=2".to_string();
    let mut pages = 0;
    loop {
        let (status, page) = h.get_json(&path, "alice").await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for c in page["chunks"].as_array().unwrap() {
            seen.push(c["key"].as_str().unwrap().parse::<ChunkKey>().unwrap());
            assert_eq!(c["tokens"], CHUNK);
            assert_eq!(c["size"], 64);
            assert_eq!(c["layout_fingerprint"], format!("{:016x}", fp()));
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/chunks?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(pages, 3, "5 chunks in pages of 2");
    assert_eq!(seen, alice, "every chunk once, in key order, none of bob's");

    let (_, b) = h.get_json("/v1/chunks", "bob").await;
    let bob_keys: Vec<ChunkKey> = b["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap().parse().unwrap())
        .collect();
    let mut bob_sorted = bob.clone();
    bob_sorted.sort();
    assert_eq!(bob_keys, bob_sorted);
    assert!(b["next"].is_null());

    assert_eq!(
        h.get_json("/v1/chunks?tier=disk", "alice").await.1["chunks"],
        json!([])
    );
    assert_eq!(
        h.get_json("/v1/chunks?tier=host", "alice").await.1["chunks"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    for bad in [
        "/v1/chunks?tier=tape",
        "/v1/chunks?limit=0",
        "/v1/chunks?after=zz",
        "/v1/chunks?colour=red",
    ] {
        let (status, r) = h.get_json(bad, "alice").await;
        assert_eq!(status, 400, "{bad}: {r}");
        assert_eq!(r["code"], "bad_request");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn show_verifies_every_copy_and_is_tenant_scoped() {
    let h = Harness::start(16 << 20).await;
    let keys = h.put_prompt("alice", &(0..8).collect::<Vec<_>>());
    let (status, c) = h
        .get_json(&format!("/v1/chunks/{}", keys[1]), "alice")
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["depth"], 1);
    assert_eq!(c["parent"], keys[0].to_string());
    assert_eq!(
        strings(&c["tiers"]),
        ["host", "disk"],
        "write-through puts reach disk"
    );
    assert!(c.get("verify").is_none());

    let (status, v) = h
        .get_json(&format!("/v1/chunks/{}?verify=true", keys[1]), "alice")
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verify"]["ok"], true);
    let tiers: Vec<&str> = v["verify"]["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["host", "disk"]);

    let (status, r) = h.get_json(&format!("/v1/chunks/{}", keys[1]), "bob").await;
    assert_eq!(status, 404, "another tenant's chunk is invisible: {r}");
    assert_eq!(r["code"], "not_found");
    let (status, r) = h.get_json("/v1/chunks/not-a-key", "alice").await;
    assert_eq!(status, 400);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("expected 32 hex digits"),
        "{r}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn delete_removes_once_and_only_for_the_owner() {
    let h = Harness::start(0).await;
    let keys = h.put_prompt("alice", &(0..4).collect::<Vec<_>>());
    let path = format!("/v1/chunks/{}", keys[0]);
    let del = |tenant: &'static str| h.req(reqwest::Method::DELETE, &path, tenant).send();

    assert_eq!(del("bob").await.unwrap().status(), 404);
    assert!(
        h.svc.store.info(ns("alice").tenant_id(), keys[0]).is_some(),
        "bob's delete did nothing"
    );
    let ok = del("alice").await.unwrap();
    assert_eq!(ok.status(), 204);
    assert!(ok.bytes().await.unwrap().is_empty());
    assert_eq!(h.get_json(&path, "alice").await.0, 404);
    assert_eq!(del("alice").await.unwrap().status(), 404);
    assert_eq!(
        h.lookup("alice", lookup_body(&[0, 1, 2, 3])).await.1["hit_tokens"],
        0
    );
    let bad = h
        .req(reqwest::Method::DELETE, "/v1/chunks/123", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    h.shutdown().await;
}

/// Reads server-sent messages until one whose `data` is not a keep-alive; returns (event, data).
async fn next_event(resp: &mut reqwest::Response, buf: &mut String) -> (String, Value) {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let msg: String = buf.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = None;
            for line in msg.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(d.trim()).unwrap());
                }
            }
            match data {
                Some(d) => return (name, d),
                None => continue, // a comment
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .expect("stream still open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn events_stream_the_callers_changes_only() {
    let h = Harness::start(0).await;
    let mut resp = h
        .req(reqwest::Method::GET, "/v1/events", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    let (name, ready) = next_event(&mut resp, &mut buf).await;
    assert_eq!(
        (name.as_str(), ready["tenant"].as_str()),
        ("ready", Some("alice"))
    );

    // Bob's chunk is stored first: if it leaked, it would be the next event alice sees.
    h.put_prompt("bob", &[9, 9, 9, 9]);
    let keys = h.put_prompt("alice", &(0..8).collect::<Vec<_>>());
    for (depth, key) in keys.iter().enumerate() {
        let (name, ev) = next_event(&mut resp, &mut buf).await;
        assert_eq!(name, "stored");
        assert_eq!(ev["event"], "stored");
        assert_eq!(ev["key"], key.to_string());
        assert_eq!(ev["depth"], depth);
        assert_eq!(ev["tokens"], CHUNK);
        assert_eq!(ev["tier"], "host");
        assert_eq!(ev["layout_fingerprint"], format!("{:016x}", fp()));
        assert!(ev["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        let parent = if depth == 0 {
            Value::Null
        } else {
            json!(keys[depth - 1].to_string())
        };
        assert_eq!(ev["parent"], parent);
    }
    h.svc
        .store
        .delete(
            ns("bob").tenant_id(),
            ns("bob").chunk_keys(&[9, 9, 9, 9])[0],
        )
        .unwrap();
    h.svc
        .store
        .delete(ns("alice").tenant_id(), keys[1])
        .unwrap();
    let (name, ev) = next_event(&mut resp, &mut buf).await;
    assert_eq!(
        (name.as_str(), ev["key"].as_str()),
        ("removed", Some(keys[1].to_string().as_str()))
    );

    // Shutdown must end the open stream rather than wait for the client forever.
    h.shutdown().await;
}

#[tokio::test]
async fn metrics_expose_per_tier_series_and_request_counts() {
    let h = Harness::start(0).await;
    h.put_prompt("alice", &(0..8).collect::<Vec<_>>());
    assert_eq!(h.get_json("/v1/stats", "alice").await.0, 200);
    let r = h
        .req(reqwest::Method::GET, "/metrics", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for series in [
        "kvtier_tier_chunks{tier=\"host\"}",
        "kvtier_tier_bytes{tier=\"host\"}",
        "kvtier_tier_budget_bytes{tier=\"host\"} 67108864",
        "kvtier_tier_hits_total{tier=\"host\"}",
        "kvtier_tier_misses_total{tier=\"host\"}",
        "kvtier_tier_evictions_total{tier=\"host\"}",
        "kvtier_tier_promotions_total{tier=\"host\"}",
        "kvtier_tier_demotions_total{tier=\"host\"}",
        "kvtier_requests_total{op=\"stats\",plane=\"http\",result=\"ok\"}",
        "kvtier_request_duration_seconds_bucket{op=\"stats\",plane=\"http\",le=\"10\"}",
        "kvtier_retrieval_indexed_prompts 0",
        "kvtier_retrieval_index_bytes 0",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    let refused = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    h.shutdown().await;
}

#[tokio::test]
async fn config_is_served_with_the_token_redacted() {
    let h = Harness::start(0).await;
    let r = h
        .req(reqwest::Method::GET, "/v1/config", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains(TOKEN), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["token"], "<redacted>");
    assert_eq!(v["host_bytes"], 64 << 20);
    h.shutdown().await;
}

#[tokio::test]
async fn openapi_documents_every_route_and_every_route_is_served() {
    let h = Harness::start(0).await;
    let (status, doc) = h.get_json("/v1/openapi.json", "alice").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(
        doc["paths"]["/healthz"]["get"]["security"],
        json!([]),
        "healthz is documented as open"
    );
    let routes = kvtier::http::routes();
    assert_eq!(routes.len(), 12);
    for (method, path) in routes {
        let op = &doc["paths"][path][method.as_str().to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} undocumented");
        // The route exists on the live server: anything but the router's own 404/405.
        let url_path = path.replace("{key}", &ChunkKey(42).to_string());
        let mut req = h.req(method.clone(), &url_path, "alice");
        if path == "/v1/lookup" {
            req = req.json(&lookup_body(&[]));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        assert_ne!(status, 405, "{method} {path}");
        if status == 404 {
            let body: Value = resp.json().await.unwrap();
            assert_ne!(body["error"], "not found: no such route", "{method} {path}");
        }
    }
    let (status, r) = h.get_json("/v2/nothing", "alice").await;
    assert_eq!((status, r["code"].as_str()), (404, Some("not_found")));
    let put = h
        .req(reqwest::Method::PUT, "/v1/stats", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 405);
    h.shutdown().await;
}
