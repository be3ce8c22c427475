//! Which codec a tier stores chunks with, and who may be served what.
//!
//! Defaults: host (and GPU) keep raw bytes, since decode time would cost more than the memory
//! saved on the hot path; disk uses lossless byte planes (smaller files, bit-exact); remote uses
//! lossless, or KIVI int8 where the namespace accepts lossy data (network bandwidth is the
//! bottleneck there). [`CodecPolicy::choose`] never picks a lossy codec for an exact-only
//! namespace; that no lossy copy ever reaches a caller that asked for exact data is enforced by
//! the store's read path (`kvtier_cache::TieredStore::get`), whatever a tier holds.

use kvtier_cache::{ModelLayout, TierKind};

use crate::codec::Codec;
use crate::fp8::Fp8E4m3;
use crate::lossless::PlanesLz4;
use crate::quant::Kivi;

/// What a namespace (or a caller) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceFidelity {
    /// Exact or lossless only.
    ExactOnly,
    /// Lossy codecs allowed.
    LossyAllowed,
}

/// A codec choice, independent of the layout it will be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecChoice {
    /// Store the engine's bytes untouched.
    Raw,
    /// Byte planes + lz4.
    Lossless,
    /// KIVI int8.
    Int8,
    /// KIVI int4.
    Int4,
    /// FP8 E4M3.
    Fp8,
}

impl CodecChoice {
    pub fn is_lossy(self) -> bool {
        matches!(
            self,
            CodecChoice::Int8 | CodecChoice::Int4 | CodecChoice::Fp8
        )
    }

    /// The codec for `layout`, or `None` for raw. Quantisation needs an MHA layout in a float
    /// dtype; for anything else the lossless codec is returned instead, never a failing codec.
    pub fn build(self, layout: &ModelLayout) -> Option<Box<dyn Codec>> {
        let quantisable = layout.attention == kvtier_cache::AttentionKind::Mha
            && crate::shape::check_float_dtype(layout.dtype).is_ok();
        match self {
            CodecChoice::Raw => None,
            CodecChoice::Int8 if quantisable => Some(Box::new(Kivi::int8(layout.clone()))),
            CodecChoice::Int4 if quantisable => Some(Box::new(Kivi::int4(layout.clone()))),
            CodecChoice::Fp8 if quantisable => Some(Box::new(Fp8E4m3 {
                layout: layout.clone(),
            })),
            _ => Some(Box::new(PlanesLz4::for_layout(layout))),
        }
    }
}

/// Codec per tier: `exact` for namespaces that demand exact data, `lossy` where lossy is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierCodecs {
    pub exact: CodecChoice,
    pub lossy: CodecChoice,
}

/// The per-tier codec table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecPolicy {
    pub gpu: TierCodecs,
    pub host: TierCodecs,
    pub disk: TierCodecs,
    pub remote: TierCodecs,
}

impl Default for CodecPolicy {
    fn default() -> Self {
        let raw = TierCodecs {
            exact: CodecChoice::Raw,
            lossy: CodecChoice::Raw,
        };
        let lossless = TierCodecs {
            exact: CodecChoice::Lossless,
            lossy: CodecChoice::Lossless,
        };
        CodecPolicy {
            gpu: raw,
            host: raw,
            disk: lossless,
            remote: TierCodecs {
                exact: CodecChoice::Lossless,
                lossy: CodecChoice::Int8,
            },
        }
    }
}

impl CodecPolicy {
    /// The codec for `tier` under `ns`. A lossy entry configured for an exact-only namespace is
    /// downgraded to lossless, so a misconfiguration cannot break the fidelity rule.
    pub fn choose(&self, tier: TierKind, ns: NamespaceFidelity) -> CodecChoice {
        let t = match tier {
            TierKind::Gpu => self.gpu,
            TierKind::Host => self.host,
            TierKind::Disk => self.disk,
            TierKind::Remote => self.remote,
        };
        match ns {
            NamespaceFidelity::ExactOnly if t.exact.is_lossy() => CodecChoice::Lossless,
            NamespaceFidelity::ExactOnly => t.exact,
            NamespaceFidelity::LossyAllowed => t.lossy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NamespaceFidelity::*;
    use kvtier_cache::Fidelity;

    fn choose_codec(tier: TierKind, ns: NamespaceFidelity) -> CodecChoice {
        CodecPolicy::default().choose(tier, ns)
    }

    #[test]
    fn default_table() {
        assert_eq!(choose_codec(TierKind::Host, LossyAllowed), CodecChoice::Raw);
        assert_eq!(choose_codec(TierKind::Gpu, ExactOnly), CodecChoice::Raw);
        assert_eq!(
            choose_codec(TierKind::Disk, LossyAllowed),
            CodecChoice::Lossless
        );
        assert_eq!(
            choose_codec(TierKind::Remote, ExactOnly),
            CodecChoice::Lossless
        );
        assert_eq!(
            choose_codec(TierKind::Remote, LossyAllowed),
            CodecChoice::Int8
        );
    }

    #[test]
    fn exact_namespaces_never_get_lossy_codecs_or_chunks() {
        let bad = CodecPolicy {
            remote: TierCodecs {
                exact: CodecChoice::Int4,
                lossy: CodecChoice::Int4,
            },
            ..CodecPolicy::default()
        };
        let layout = ModelLayout::smollm2_135m();
        for policy in [CodecPolicy::default(), bad] {
            for tier in TierKind::ALL {
                let choice = policy.choose(tier, ExactOnly);
                assert!(!choice.is_lossy(), "{tier}: {choice:?}");
                if let Some(codec) = choice.build(&layout) {
                    assert!(codec.fidelity().is_exact(), "{tier}: {choice:?}");
                }
            }
        }
        let lossy = Kivi::int8(layout.clone()).fidelity();
        assert!(!lossy.is_exact());
        assert!(Fidelity::Lossless.is_exact() && Fidelity::Exact.is_exact());
    }

    #[test]
    fn unquantisable_layouts_fall_back_to_lossless() {
        let mla = ModelLayout::mla("m", 2, 8, 4, kvtier_cache::Dtype::Bf16);
        let codec = CodecChoice::Int8.build(&mla).unwrap();
        assert_eq!(codec.fidelity(), Fidelity::Lossless);
    }
}
