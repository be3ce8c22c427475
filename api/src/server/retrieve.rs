//! `Retrieve`: top-k keys of a stored prompt, with their K/V rows (see [`kvtier_prompt::retrieval`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::context::{Ctx, header, keys_of};
use super::reply::{Fatal, Outgoing, Reply, frame, later};
use crate::error::ApiError;
use crate::transport::Reader;
use crate::wire::{self, AlignedVec, Preamble, RetrieveHeader, RetrieveOkHeader, WireError};
use kvtier_prompt::retrieval::RetrieveRequest;

/// Reads the query payload, then searches on a blocking thread (chunk reads may hit disk and
/// decode; exact scans are CPU work).
pub(crate) async fn retrieve(
    ctx: &Arc<Ctx>,
    pre: Preamble,
    buf: &AlignedVec,
    reader: &mut Reader,
    stall: Duration,
) -> Result<Reply, Fatal> {
    let mut req = {
        let a = header::<RetrieveHeader>(buf)
            .map_err(|e| Fatal::Wire(pre.request_id, WireError::InvalidHeader(e.to_string())))?;
        RetrieveRequest {
            keys: keys_of(&a.keys),
            layer: a.layer.to_native(),
            heads: a.heads.to_native(),
            queries: Vec::new(),
            k: a.k.to_native(),
            accept_lossy: a.accept_lossy,
        }
    };
    let mut payload = vec![0u8; pre.payload_len as usize];
    wire::read_payload_into(reader, &mut payload, stall).await?;
    if !payload.len().is_multiple_of(4) {
        return Ok(Reply::Now(Err(ApiError::BadRequest(
            "query payload is not a whole number of f32s".into(),
        ))));
    }
    req.queries = payload
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let c = ctx.clone();
    Ok(later(move || {
        let r = c.svc.retrieval.retrieve(&c.svc.store, c.tenant_id, &req)?;
        let heads = req.heads as usize;
        let queries = r.positions.len() / (heads * r.k as usize).max(1);
        let h = RetrieveOkHeader {
            index: r.index as u8,
            lossy: r.lossy,
            tokens: r.tokens,
            k: r.k,
            queries: queries as u32,
            heads: req.heads,
            row_bytes: (r.k_rows.len() / r.positions.len().max(1)) as u32,
        };
        let len = h.payload_len().unwrap_or(u64::MAX);
        if len > c.limits.max_payload_len {
            return Err(ApiError::TooLarge(format!(
                "the answer would be {len} bytes, over the frame limit of {}; ask for fewer \
                 queries or a smaller k",
                c.limits.max_payload_len
            )));
        }
        let positions: Vec<u8> = r.positions.iter().flat_map(|p| p.to_le_bytes()).collect();
        let mut out = Outgoing::frame(frame(&h, len)?);
        out.payload = vec![
            Bytes::from(positions),
            Bytes::from(r.k_rows),
            Bytes::from(r.v_rows),
        ];
        Ok(out)
    }))
}
