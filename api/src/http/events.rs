//! `GET /v1/events`: a server-sent event stream of the caller's stored, removed and cleared
//! chunks, for KV-aware routers that mirror what each kvtier node holds.
//!
//! Each SSE message has `event:` set to its type and `data:` one JSON object with an `event`
//! field of the same name. The stream opens with a `ready` message (so a client knows it is
//! subscribed before it acts); a subscriber that falls more than
//! [`crate::service::EVENT_BUFFER`] events behind gets a `lagged` message with the number
//! dropped, and should resynchronise from `GET /v1/chunks`. Comments keep idle connections
//! alive through proxies. The stream ends when the server shuts down.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{StreamExt, future, stream};
use serde_json::{Value, json};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use kvtier_cache::StoreEvent;

use super::{AppState, authorize, fingerprint_hex, timed, unix_millis};

/// Idle time after which a keep-alive comment is sent.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/events`.
pub(super) async fn events(State(st): State<AppState>, headers: HeaderMap) -> Response {
    timed("events", async move {
        let caller = authorize(&st.svc, &headers)?;
        // Subscribe before answering, so nothing stored after the `ready` message is missed.
        let rx = st.svc.events.subscribe();
        let mut stop = st.stop.subscribe();
        let tenant = caller.tenant_id;
        let ready = message(
            "ready",
            json!({ "event": "ready", "tenant": caller.principal.tenant, "timestamp": unix_millis() }),
        );
        let feed = BroadcastStream::new(rx).filter_map(move |item| {
            future::ready(match item {
                Ok(ev) => event_json(tenant, &ev).map(|(name, v)| message(name, v)),
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(message(
                    "lagged",
                    json!({ "event": "lagged", "dropped": n, "timestamp": unix_millis() }),
                )),
            })
        });
        let stream = stream::once(future::ready(ready))
            .chain(feed)
            .map(Ok::<_, Infallible>)
            .take_until(async move {
                // Err means the sender is gone, which also means the server is going away.
                let _ = stop.wait_for(|stopping| *stopping).await;
            });
        Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
    })
    .await
}

fn message(name: &'static str, data: Value) -> Event {
    // serde_json's compact form has no newlines, so the payload is one `data:` line.
    Event::default().event(name).data(data.to_string())
}

/// The message for `ev` if it concerns `tenant`, with its type name.
///
/// The timestamp is when the event is sent to this subscriber (the store's events carry no
/// time of their own); without lag that is within microseconds of the change.
fn event_json(tenant: u64, ev: &StoreEvent) -> Option<(&'static str, Value)> {
    match ev {
        StoreEvent::Stored { key, meta, tier } if meta.tenant == tenant => Some((
            "stored",
            json!({
                "event": "stored",
                "key": key.to_string(),
                "parent": meta.parent.map(|p| p.to_string()),
                "depth": meta.depth,
                "tokens": meta.tokens,
                "tier": tier.name(),
                "layout_fingerprint": fingerprint_hex(meta.layout),
                "size": meta.raw_len,
                "fidelity": meta.fidelity,
                "timestamp": unix_millis(),
            }),
        )),
        StoreEvent::Removed { key, tenant: t } if *t == tenant => Some((
            "removed",
            json!({ "event": "removed", "key": key.to_string(), "timestamp": unix_millis() }),
        )),
        StoreEvent::Cleared { tenant: t } if *t == tenant => Some((
            "cleared",
            json!({ "event": "cleared", "timestamp": unix_millis() }),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_cache::{ChunkKey, ChunkMeta, TierKind};

    #[test]
    fn events_are_scoped_to_their_tenant() {
        let mut meta = ChunkMeta::raw(7, 0xfeed, 256, 1, 1024);
        meta.parent = Some(ChunkKey(1));
        let stored = StoreEvent::Stored {
            key: ChunkKey(2),
            meta,
            tier: TierKind::Host,
        };
        let (name, v) = event_json(7, &stored).unwrap();
        assert_eq!(name, "stored");
        assert_eq!(v["key"], ChunkKey(2).to_string());
        assert_eq!(v["parent"], ChunkKey(1).to_string());
        assert_eq!(v["depth"], 1);
        assert_eq!(v["tokens"], 256);
        assert_eq!(v["tier"], "host");
        assert_eq!(v["layout_fingerprint"], "000000000000feed");
        assert!(event_json(8, &stored).is_none());
        let removed = StoreEvent::Removed {
            key: ChunkKey(2),
            tenant: 7,
        };
        assert_eq!(event_json(7, &removed).unwrap().0, "removed");
        assert!(event_json(8, &removed).is_none());
        assert!(event_json(8, &StoreEvent::Cleared { tenant: 7 }).is_none());
        assert_eq!(
            event_json(7, &StoreEvent::Cleared { tenant: 7 }).unwrap().0,
            "cleared"
        );
    }
}
