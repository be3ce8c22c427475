//! The codec settings the suite compares, and running one of them over every chunk.
//!
//! Timings run on a one-thread rayon pool so that GB/s figures are per core, whatever faer or
//! rayon would do with more threads, and are taken from the thread's own CPU time
//! (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`): the build machines are shared, and wall time
//! there measures the neighbours as much as the codec. xKV fits are shared by the settings that
//! truncate them.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use kvtier_cache::{Fidelity, ModelLayout};
use kvtier_compress::{
    Codec, Fp8E4m3, Kivi, PlainLz4, PlanesLz4, RankRule, XkvFit, decode_any, inspect, xkv_decode,
    xkv_encode,
};

/// How a setting encodes.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    Lz4,
    /// The default lossless codec for the layout ([`PlanesLz4::for_layout`]).
    Lossless,
    Planes {
        xor: bool,
        bitshuffle: bool,
    },
    Kivi {
        bits: u8,
        group: usize,
    },
    Fp8,
    /// xKV (`group_layers` > 1) or per-layer SVD (1), at a target ratio; `values` false = keys only.
    Svd {
        group_layers: usize,
        ratio: f32,
        values: bool,
    },
}

pub struct Setting {
    pub name: String,
    pub method: Method,
}

/// Every setting, in report order.
pub fn all_settings() -> Vec<Setting> {
    let mut s = vec![
        Setting {
            name: "lz4".into(),
            method: Method::Lz4,
        },
        Setting {
            name: "lossless".into(),
            method: Method::Lossless,
        },
        Setting {
            name: "planes".into(),
            method: Method::Planes {
                xor: false,
                bitshuffle: false,
            },
        },
        Setting {
            name: "planes-xor".into(),
            method: Method::Planes {
                xor: true,
                bitshuffle: false,
            },
        },
        Setting {
            name: "bitshuf".into(),
            method: Method::Planes {
                xor: false,
                bitshuffle: true,
            },
        },
        Setting {
            name: "bitshuf-xor".into(),
            method: Method::Planes {
                xor: true,
                bitshuffle: true,
            },
        },
        Setting {
            name: "int8-g32".into(),
            method: Method::Kivi { bits: 8, group: 32 },
        },
        Setting {
            name: "int4-g32".into(),
            method: Method::Kivi { bits: 4, group: 32 },
        },
        Setting {
            name: "int4-g64".into(),
            method: Method::Kivi { bits: 4, group: 64 },
        },
        Setting {
            name: "fp8".into(),
            method: Method::Fp8,
        },
    ];
    for values in [true, false] {
        for ratio in [2.0f32, 4.0, 8.0] {
            for (g, label) in [(4, "xkv"), (1, "svd1")] {
                let suffix = if values { "" } else { "-konly" };
                s.push(Setting {
                    name: format!("{label}{suffix}-{ratio}x"),
                    method: Method::Svd {
                        group_layers: g,
                        ratio,
                        values,
                    },
                });
            }
        }
    }
    s
}

/// What running a setting produced.
pub struct Outcome {
    /// Encoded chunks plus every basis (xKV).
    pub stored_bytes: usize,
    pub decoded: Vec<Vec<u8>>,
    pub encode_s: f64,
    pub decode_s: f64,
    /// xKV: time of the basis fits alone (included in `encode_s`).
    pub fit_s: f64,
    /// The loosest fidelity any chunk declared.
    pub fidelity: Fidelity,
}

/// xKV decompositions per (group_layers, values), one per span, with the time they took.
pub type FitCache = HashMap<(usize, bool), (Vec<XkvFit>, f64)>;

pub struct Inputs<'a> {
    pub layout: &'a ModelLayout,
    pub rope_base: f64,
    pub chunks: &'a [Vec<u8>],
    pub chunk_tokens: usize,
    pub span: usize,
}

/// A stopwatch over the current thread's CPU time.
struct CpuClock(cpu_time::ThreadTime);

impl CpuClock {
    fn start() -> Self {
        CpuClock(cpu_time::ThreadTime::now())
    }

    fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

fn loosest(a: Fidelity, b: Fidelity) -> Fidelity {
    match (a, b) {
        (Fidelity::Lossy { error_bound: x, .. }, Fidelity::Lossy { error_bound: y, .. })
            if y > x =>
        {
            b
        }
        (Fidelity::Lossy { .. }, _) => a,
        _ => b,
    }
}

pub fn run(setting: &Setting, inp: &Inputs<'_>, fits: &mut FitCache) -> Result<Outcome> {
    let codec: Box<dyn Codec> = match setting.method {
        Method::Svd {
            group_layers,
            ratio,
            values,
        } => return run_svd(inp, fits, group_layers, ratio, values),
        Method::Lz4 => Box::new(PlainLz4),
        Method::Lossless => Box::new(PlanesLz4::for_layout(inp.layout)),
        Method::Planes { xor, bitshuffle } => {
            let stride = if xor {
                PlanesLz4::token_stride(inp.layout)
            } else {
                0
            };
            Box::new(PlanesLz4 {
                xor_stride: stride,
                bitshuffle,
                ..PlanesLz4::for_layout(inp.layout)
            })
        }
        Method::Kivi { bits, group } => Box::new(Kivi {
            layout: inp.layout.clone(),
            bits,
            key_group: group,
            value_group: group,
        }),
        Method::Fp8 => Box::new(Fp8E4m3 {
            layout: inp.layout.clone(),
        }),
    };
    let t = CpuClock::start();
    let encoded = inp
        .chunks
        .iter()
        .map(|c| codec.encode(c))
        .collect::<Result<Vec<_>, _>>()?;
    let encode_s = t.seconds();
    let t = CpuClock::start();
    let decoded = encoded
        .iter()
        .map(|e| decode_any(e).map(|(_, raw)| raw))
        .collect::<Result<Vec<_>, _>>()?;
    let decode_s = t.seconds();
    let mut fidelity = Fidelity::Lossless;
    for e in &encoded {
        fidelity = loosest(fidelity, inspect(e)?.1);
    }
    if fidelity.is_exact() {
        ensure!(
            decoded == inp.chunks,
            "{} did not decode bit-exact",
            setting.name
        );
    }
    Ok(Outcome {
        stored_bytes: encoded.iter().map(Vec::len).sum(),
        decoded,
        encode_s,
        decode_s,
        fit_s: 0.0,
        fidelity,
    })
}

fn run_svd(
    inp: &Inputs<'_>,
    fits: &mut FitCache,
    g: usize,
    ratio: f32,
    values: bool,
) -> Result<Outcome> {
    if let std::collections::hash_map::Entry::Vacant(slot) = fits.entry((g, values)) {
        let t = CpuClock::start();
        let mut spans = Vec::new();
        for (s, span) in inp.chunks.chunks(inp.span).enumerate() {
            let refs: Vec<(u64, &[u8])> = span
                .iter()
                .enumerate()
                .map(|(i, c)| (((s * inp.span + i) * inp.chunk_tokens) as u64, c.as_slice()))
                .collect();
            spans
                .push(XkvFit::new(inp.layout, inp.rope_base, &refs, g, values).context("xkv fit")?);
        }
        slot.insert((spans, t.seconds()));
    }
    let (spans, fit_s) = &fits[&(g, values)];
    let t = CpuClock::start();
    let mut stored = 0;
    let mut encoded = Vec::new();
    let mut bases = Vec::new();
    for (s, fit) in spans.iter().enumerate() {
        let basis = fit.basis(RankRule::Ratio(ratio))?;
        stored += basis.encoded_len();
        for (i, c) in inp
            .chunks
            .iter()
            .skip(s * inp.span)
            .take(inp.span)
            .enumerate()
        {
            let pos = ((s * inp.span + i) * inp.chunk_tokens) as u64;
            encoded.push((s, xkv_encode(&basis, pos, c)?));
        }
        bases.push(basis);
    }
    let encode_s = t.seconds() + fit_s;
    let t = CpuClock::start();
    let mut decoded = Vec::with_capacity(encoded.len());
    for (s, e) in &encoded {
        let mut out = Vec::new();
        xkv_decode(&bases[*s], e, &mut out)?;
        decoded.push(out);
    }
    let decode_s = t.seconds();
    let mut fidelity = Fidelity::Lossless;
    for (_, e) in &encoded {
        fidelity = loosest(fidelity, inspect(e)?.1);
    }
    stored += encoded.iter().map(|(_, e)| e.len()).sum::<usize>();
    Ok(Outcome {
        stored_bytes: stored,
        decoded,
        encode_s,
        decode_s,
        fit_s: *fit_s,
        fidelity,
    })
}
