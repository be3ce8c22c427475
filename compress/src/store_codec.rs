//! [`StoreCodec`]: the codec hook ([`kvtier_cache::Transcoder`]) of the store's encoding tiers
//! ([`kvtier_cache::EncodingTier`]), built from a layout
//! registry, the per-tier [`CodecPolicy`] and the set of tenants whose namespaces accept lossy
//! data.
//!
//! The store hands it raw chunks on their way into a slower tier; it answers with the policy's
//! codec for that tier, or "store raw" when the chunk's layout is not registered (the store only
//! sees fingerprints), the policy says raw, the payload does not have the layout's shape, or the
//! encoding would not be smaller. xKV is not applied by the store: its basis spans many chunks
//! of one prompt, which the store does not see together (the `compress` suite measures it).

use std::collections::{HashMap, HashSet};

use kvtier_cache::transcode::Encoded;
use kvtier_cache::{CacheError, ChunkMeta, ModelLayout, TierKind, Transcoder};

use crate::codec::{
    CODEC_FP8_E4M3, CODEC_KIVI_INT4, CODEC_KIVI_INT8, CODEC_LZ4, CODEC_PLANES_LZ4, decode_any,
};
use crate::policy::{CodecPolicy, NamespaceFidelity};

/// Codec policy plus what it needs to build codecs: layouts by fingerprint, lossy tenants.
#[derive(Debug, Clone, Default)]
pub struct StoreCodec {
    policy: CodecPolicy,
    layouts: HashMap<u64, ModelLayout>,
    lossy_tenants: HashSet<u64>,
}

impl StoreCodec {
    /// A hook applying `policy`; register layouts before chunks of them can be encoded.
    pub fn new(policy: CodecPolicy) -> Self {
        StoreCodec {
            policy,
            ..StoreCodec::default()
        }
    }

    /// Makes chunks of `layout` encodable (keyed by its fingerprint).
    pub fn register(&mut self, layout: ModelLayout) {
        self.layouts.insert(layout.fingerprint(), layout);
    }

    /// Lets the namespaces of `tenant` (a [`kvtier_cache::key::tenant_id`]) hold lossy copies.
    pub fn allow_lossy(&mut self, tenant: u64) {
        self.lossy_tenants.insert(tenant);
    }

    /// The registered layout of a fingerprint.
    pub fn layout(&self, fingerprint: u64) -> Option<&ModelLayout> {
        self.layouts.get(&fingerprint)
    }

    fn namespace(&self, tenant: u64) -> NamespaceFidelity {
        match self.lossy_tenants.contains(&tenant) {
            true => NamespaceFidelity::LossyAllowed,
            false => NamespaceFidelity::ExactOnly,
        }
    }
}

impl Transcoder for StoreCodec {
    fn owns(&self, codec: u16) -> bool {
        matches!(
            codec,
            CODEC_LZ4 | CODEC_PLANES_LZ4 | CODEC_KIVI_INT8 | CODEC_KIVI_INT4 | CODEC_FP8_E4M3
        )
    }

    fn encode(
        &self,
        tier: TierKind,
        meta: &ChunkMeta,
        raw: &[u8],
    ) -> kvtier_cache::Result<Option<Encoded>> {
        let Some(layout) = self.layouts.get(&meta.layout) else {
            return Ok(None);
        };
        if layout.chunk_bytes(meta.tokens as usize) != raw.len() {
            return Ok(None);
        }
        let Some(codec) = self
            .policy
            .choose(tier, self.namespace(meta.tenant))
            .build(layout)
        else {
            return Ok(None);
        };
        let payload = codec
            .encode(raw)
            .map_err(|e| CacheError::Codec(format!("codec {}: {e}", codec.id())))?;
        if payload.len() >= raw.len() {
            return Ok(None);
        }
        Ok(Some(Encoded {
            codec: codec.id(),
            fidelity: codec.fidelity(),
            payload,
        }))
    }

    fn decode(&self, meta: &ChunkMeta, payload: &[u8]) -> kvtier_cache::Result<Vec<u8>> {
        let codec =
            crate::container::peek_codec(payload).map_err(|e| CacheError::Codec(e.to_string()))?;
        if codec != meta.codec {
            return Err(CacheError::Codec(format!(
                "record says codec {}, payload is codec {codec}",
                meta.codec
            )));
        }
        let (_, raw) = decode_any(payload).map_err(|e| CacheError::Codec(e.to_string()))?;
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvtier_cache::host::{HostConfig, slot_size_for};
    use kvtier_cache::{
        EncodingTier, Fidelity, GetOutcome, HostTier, MemoryTier, StoreConfig, Tier, TieredStore,
    };

    use super::*;
    use crate::testdata;

    fn fixture(lossy_tenant: Option<u64>) -> (Arc<MemoryTier>, TieredStore, ModelLayout, Vec<u8>) {
        let layout = testdata::small_layout(kvtier_cache::Dtype::F16);
        let raw = testdata::synthetic_prompt(&layout, 1, 16, 4, 11)
            .remove(0)
            .1;
        let mut hook = StoreCodec::new(CodecPolicy::default());
        hook.register(layout.clone());
        if let Some(t) = lossy_tenant {
            hook.allow_lossy(t);
        }
        let disk = Arc::new(MemoryTier::new(TierKind::Disk, 1 << 30));
        let host = Arc::new(HostTier::new(HostConfig {
            budget_bytes: slot_size_for(raw.len()) as u64,
            arena_bytes: 8 << 20,
        }));
        let cfg = StoreConfig {
            admit_after: 0,
            ..StoreConfig::default()
        };
        let lower: Vec<Arc<dyn Tier>> =
            vec![Arc::new(EncodingTier::new(disk.clone(), Arc::new(hook)))];
        let store = TieredStore::new(cfg, host, lower);
        (disk, store, layout, raw)
    }

    fn meta(tenant: u64, layout: &ModelLayout, raw: &[u8]) -> ChunkMeta {
        ChunkMeta::raw(tenant, layout.fingerprint(), 16, 0, raw.len() as u64)
    }

    #[test]
    fn disk_copies_are_lossless_by_default_and_bit_exact() {
        let (disk, s, layout, raw) = fixture(None);
        let key = kvtier_cache::ChunkKey(1);
        s.put(key, meta(1, &layout, &raw), &raw).unwrap();
        s.put(kvtier_cache::ChunkKey(2), meta(1, &layout, &raw), &raw)
            .unwrap(); // evicts 1
        let (rec, stored) = disk.get(key).unwrap().unwrap();
        assert_eq!(rec.codec, CODEC_PLANES_LZ4);
        assert!(stored.len() < raw.len());
        let r = s.get(1, key, false).unwrap().hit().unwrap();
        assert_eq!(r.bytes.as_ref(), raw.as_slice());
        assert_eq!(r.meta.fidelity, Fidelity::Exact);
    }

    #[test]
    fn lossy_tenants_get_int8_where_the_policy_says_and_exact_readers_are_refused() {
        let policy = CodecPolicy {
            disk: crate::policy::TierCodecs {
                exact: crate::CodecChoice::Lossless,
                lossy: crate::CodecChoice::Int8,
            },
            ..CodecPolicy::default()
        };
        let (disk, _, layout, raw) = fixture(None);
        let mut hook = StoreCodec::new(policy);
        hook.register(layout.clone());
        hook.allow_lossy(9);
        let enc = hook
            .encode(TierKind::Disk, &meta(9, &layout, &raw), &raw)
            .unwrap()
            .unwrap();
        assert_eq!(enc.codec, CODEC_KIVI_INT8);
        assert!(enc.payload.len() * 2 <= raw.len() + 4096);
        let exact = hook
            .encode(TierKind::Disk, &meta(1, &layout, &raw), &raw)
            .unwrap()
            .unwrap();
        assert_eq!(exact.fidelity, Fidelity::Lossless);
        // Through a store: tenant 9's evicted chunk is lossy, refused to exact readers.
        let host = Arc::new(HostTier::new(HostConfig {
            budget_bytes: slot_size_for(raw.len()) as u64,
            arena_bytes: 8 << 20,
        }));
        let cfg = StoreConfig {
            admit_after: 0,
            ..StoreConfig::default()
        };
        let lower: Vec<Arc<dyn Tier>> = vec![Arc::new(EncodingTier::new(disk, Arc::new(hook)))];
        let s = TieredStore::new(cfg, host, lower);
        let key = kvtier_cache::ChunkKey(5);
        s.put(key, meta(9, &layout, &raw), &raw).unwrap();
        s.put(kvtier_cache::ChunkKey(6), meta(9, &layout, &raw), &raw)
            .unwrap();
        assert!(matches!(
            s.get(9, key, false).unwrap(),
            GetOutcome::FidelityRejected(Fidelity::Lossy { .. })
        ));
        let r = s.get(9, key, true).unwrap().hit().unwrap();
        assert_eq!(r.bytes.len(), raw.len());
        let copies = s.copies(9, key).unwrap();
        assert!(copies.iter().all(|c| !c.fidelity.is_exact()));
    }

    #[test]
    fn unknown_layouts_and_wrong_shapes_are_stored_raw() {
        let (_, _, layout, raw) = fixture(None);
        let hook = StoreCodec::new(CodecPolicy::default());
        assert!(
            hook.encode(TierKind::Disk, &meta(1, &layout, &raw), &raw)
                .unwrap()
                .is_none()
        );
        let mut hook = hook;
        hook.register(layout.clone());
        assert!(
            hook.encode(
                TierKind::Disk,
                &meta(1, &layout, &raw),
                &raw[..raw.len() - 2]
            )
            .unwrap()
            .is_none()
        );
        assert!(
            hook.encode(TierKind::Host, &meta(1, &layout, &raw), &raw)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_payload_of_another_codec_is_refused() {
        let (_, _, layout, raw) = fixture(None);
        let mut hook = StoreCodec::new(CodecPolicy::default());
        hook.register(layout.clone());
        let enc = hook
            .encode(TierKind::Disk, &meta(1, &layout, &raw), &raw)
            .unwrap()
            .unwrap();
        let mut m = meta(1, &layout, &raw);
        m.codec = CODEC_KIVI_INT8;
        assert!(hook.decode(&m, &enc.payload).is_err());
        m.codec = enc.codec;
        let mut bad = enc.payload.clone();
        let n = bad.len();
        bad[n / 2] ^= 0x40;
        assert!(
            hook.decode(&m, &bad).is_err(),
            "checksum catches a flipped bit"
        );
        assert_eq!(hook.decode(&m, &enc.payload).unwrap(), raw);
    }
}
