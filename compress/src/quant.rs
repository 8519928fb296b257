//! Tensor-level quantization schemes for model compression ([`QuantScheme`]), built on the
//! slice primitives in `hearth_model::quant`: affine or symmetric, per tensor or per channel
//! (axis 0 = output unit / filter), power-of-two (logarithmic) levels, and non-uniform
//! codebooks (see [`crate::codebook`]). [`quantize_tensor`] gives the stored form (unsigned
//! codes + what maps them back), [`fake_quantize`] the quantize→dequantize round trip used for
//! evaluation and quantization-aware training. Both go through
//! [`QuantizedTensor::dequantize`], so a decoder that stores the codes and parameters
//! reproduces `fake_quantize` bit for bit.

pub use crate::codebook::CodebookKind;
use crate::codebook::{assign_levels, fit_codebook};
use hearth_model::quant::{finite_range, quantize_affine, quantize_symmetric};
use hearth_model::Tensor;

/// Which values share one set of quantization parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale (and zero point) for the whole tensor.
    PerTensor,
    /// One per slice along axis 0 (output unit of a `[out, in]` Gemm weight, filter of a
    /// conv). Tensors of rank < 2 fall back to per tensor.
    PerChannel,
}

/// How a tensor is quantized. `bits` is 1..=8 for affine and codebooks, 2..=8 for symmetric
/// and power-of-two (values outside are clamped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantScheme {
    /// `q = round(x / scale) + zero_point` in `0..=2^b-1`, range widened to include 0.
    Affine { bits: u8, granularity: Granularity },
    /// `q = round(x / scale)` in `±(2^(b-1)-1)`, `scale = max|x| / (2^(b-1)-1)`.
    Symmetric { bits: u8, granularity: Granularity },
    /// Levels `0, ±2^(e-k)` for `k = 0..2^(b-1)-1`, `e = round(log2 max|x|)`: a sign bit
    /// and a magnitude index (0 = zero). Multiplications become shifts.
    PowerOfTwo { bits: u8 },
    /// `2^b` non-uniform levels fitted to the tensor (one code is reserved for an exact 0
    /// when the tensor has exact zeros, so pruned weights stay pruned).
    Codebook { bits: u8, kind: CodebookKind },
}

impl std::fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |g: &Granularity| match g {
            Granularity::PerTensor => "tensor",
            Granularity::PerChannel => "channel",
        };
        match self {
            QuantScheme::Affine { bits, granularity } => {
                write!(f, "affine{bits}/{}", g(granularity))
            }
            QuantScheme::Symmetric { bits, granularity } => {
                write!(f, "sym{bits}/{}", g(granularity))
            }
            QuantScheme::PowerOfTwo { bits } => write!(f, "pow2-{bits}"),
            QuantScheme::Codebook { bits, kind } => match kind {
                CodebookKind::GaussianQuantile => write!(f, "gauss{bits}"),
                CodebookKind::KMeans => write!(f, "kmeans{bits}"),
            },
        }
    }
}

/// Bits per stored code of a scheme (after clamping to the supported range).
pub fn scheme_bits(s: &QuantScheme) -> u8 {
    match *s {
        QuantScheme::Affine { bits, .. } | QuantScheme::Codebook { bits, .. } => bits.clamp(1, 8),
        QuantScheme::Symmetric { bits, .. } | QuantScheme::PowerOfTwo { bits } => bits.clamp(2, 8),
    }
}

/// What maps the unsigned codes of a [`QuantizedTensor`] back to reals.
#[derive(Clone, Debug, PartialEq)]
pub enum Dequant {
    /// `x = (code - zero_point[c]) as f32 * scale[c]` for channel `c` (one entry per channel
    /// along axis 0, or a single entry for the whole tensor). Symmetric codes are stored
    /// with `zero_point = 2^(b-1)`.
    Uniform {
        /// Step per channel (> 0).
        scale: Vec<f32>,
        /// Code of 0.0 per channel.
        zero_point: Vec<i32>,
    },
    /// Power-of-two: code = `sign << (b-1) | m`; `m = 0` is 0.0, else `±2^(max_exp - (m-1))`.
    PowerOfTwo {
        /// Exponent of the largest magnitude.
        max_exp: i32,
    },
    /// `x = levels[code]` (a codebook, ascending).
    Levels(Vec<f32>),
}

/// A tensor in stored form: one unsigned code (`< 2^bits`) per element.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// Bits per code.
    pub bits: u8,
    /// Codes, row-major.
    pub codes: Vec<u32>,
    /// How codes map back to reals.
    pub dequant: Dequant,
}

fn pow2_level(max_exp: i32, m: u32) -> f32 {
    // Exact for every exponent in the f32 range (including subnormals); clamped beyond.
    let e = (max_exp - (m as i32 - 1)).clamp(-149, 127);
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e + 149))
    }
}

impl QuantizedTensor {
    /// Number of channels the parameters cover (1 for per-tensor parameters).
    fn channels(&self) -> usize {
        match &self.dequant {
            Dequant::Uniform { scale, .. } => scale.len().max(1),
            _ => 1,
        }
    }

    /// Checks codes, parameters and shape for consistency (what a decoder must verify before
    /// calling [`QuantizedTensor::dequantize`]).
    pub fn validate(&self) -> Result<(), String> {
        let n: usize = self.shape.iter().product();
        if self.codes.len() != n {
            return Err(format!(
                "{} codes for shape {:?}",
                self.codes.len(),
                self.shape
            ));
        }
        if !(1..=8).contains(&self.bits) {
            return Err(format!("unsupported bits {}", self.bits));
        }
        let max_code = 1u32 << self.bits;
        if let Some(c) = self.codes.iter().find(|&&c| c >= max_code) {
            return Err(format!("code {c} needs more than {} bits", self.bits));
        }
        match &self.dequant {
            Dequant::Uniform { scale, zero_point } => {
                let ch = scale.len();
                if ch == 0 || zero_point.len() != ch {
                    return Err("uniform parameters missing".into());
                }
                if ch > 1 && (self.shape.len() < 2 || self.shape[0] != ch) {
                    return Err(format!("{ch} channel scales for shape {:?}", self.shape));
                }
                if scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err("scale must be finite and > 0".into());
                }
            }
            Dequant::PowerOfTwo { max_exp } => {
                if !(-160..=160).contains(max_exp) {
                    return Err(format!("power-of-two exponent {max_exp} out of range"));
                }
            }
            Dequant::Levels(levels) => {
                if levels.is_empty() || levels.len() > max_code as usize {
                    return Err(format!("{} levels for {} bits", levels.len(), self.bits));
                }
                if levels.iter().any(|v| !v.is_finite()) {
                    return Err("non-finite codebook level".into());
                }
                let k = levels.len() as u32;
                if let Some(c) = self.codes.iter().find(|&&c| c >= k) {
                    return Err(format!("code {c} outside a {k}-level codebook"));
                }
            }
        }
        Ok(())
    }

    /// The dequantized tensor.
    ///
    /// # Panics
    /// If [`QuantizedTensor::validate`] fails (a programming error; decoders validate first).
    pub fn dequantize(&self) -> Tensor {
        if let Err(e) = self.validate() {
            panic!("invalid quantized tensor: {e}");
        }
        let n = self.codes.len();
        let data: Vec<f32> = match &self.dequant {
            Dequant::Uniform { scale, zero_point } => {
                let ch = self.channels();
                let per = if n == 0 { 0 } else { n / ch };
                self.codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let k = if ch == 1 { 0 } else { i / per };
                        (c as i32 - zero_point[k]) as f32 * scale[k]
                    })
                    .collect()
            }
            Dequant::PowerOfTwo { max_exp } => {
                let half = 1u32 << (self.bits - 1);
                self.codes
                    .iter()
                    .map(|&c| {
                        let m = c & (half - 1);
                        let v = if m == 0 { 0.0 } else { pow2_level(*max_exp, m) };
                        if c & half != 0 {
                            -v
                        } else {
                            v
                        }
                    })
                    .collect()
            }
            Dequant::Levels(levels) => self.codes.iter().map(|&c| levels[c as usize]).collect(),
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// Bytes of the stored form: packed codes plus parameters (4 bytes per scale / level,
    /// per-channel zero points as 1 byte each).
    pub fn stored_bytes(&self) -> usize {
        let codes = (self.codes.len() * self.bits as usize).div_ceil(8);
        codes
            + match &self.dequant {
                Dequant::Uniform { scale, .. } => scale.len() * 5,
                Dequant::PowerOfTwo { .. } => 1,
                Dequant::Levels(l) => l.len() * 4,
            }
    }
}

/// Rows of `t` along axis 0 for `granularity` (one row = whole tensor for per-tensor).
fn channel_rows(t: &Tensor, granularity: Granularity) -> usize {
    match granularity {
        Granularity::PerChannel if t.shape.len() >= 2 && t.shape[0] > 0 && !t.is_empty() => {
            t.shape[0]
        }
        _ => 1,
    }
}

/// Quantizes `t` with scheme `s` into its stored form. Non-finite values are treated as 0
/// when fitting parameters and clamp to the extreme codes.
pub fn quantize_tensor(t: &Tensor, s: &QuantScheme) -> QuantizedTensor {
    let bits = scheme_bits(s);
    let (codes, dequant) = match *s {
        QuantScheme::Affine { granularity, .. } | QuantScheme::Symmetric { granularity, .. } => {
            let symmetric = matches!(s, QuantScheme::Symmetric { .. });
            let rows = channel_rows(t, granularity);
            let per = t.len() / rows.max(1);
            let mut codes = Vec::with_capacity(t.len());
            let (mut scale, mut zero_point) = (Vec::new(), Vec::new());
            for r in 0..rows {
                let x = &t.data[r * per..(r + 1) * per];
                if symmetric {
                    let (q, p) = quantize_symmetric(x, bits);
                    let offset = 1i32 << (bits - 1);
                    codes.extend(q.iter().map(|&c| (c + offset) as u32));
                    scale.push(p.scale);
                    zero_point.push(offset);
                } else {
                    let (q, p) = quantize_affine(x, bits);
                    codes.extend(q.iter().map(|&c| c as u32));
                    scale.push(p.scale);
                    zero_point.push(p.zero_point);
                }
            }
            (codes, Dequant::Uniform { scale, zero_point })
        }
        QuantScheme::PowerOfTwo { .. } => {
            let (lo, hi) = finite_range(&t.data);
            let amax = lo.abs().max(hi.abs());
            let max_exp = if amax > 0.0 {
                (amax.log2().round() as i32).clamp(-149, 127)
            } else {
                0
            };
            let half = 1u32 << (bits - 1);
            let mags = half - 1;
            // Positive levels ascending: 0, 2^(e-mags+1), ..., 2^e (index = code magnitude).
            let levels: Vec<f32> = std::iter::once(0.0)
                .chain((1..=mags).rev().map(|m| pow2_level(max_exp, m)))
                .collect();
            let idx = assign_levels(&t.data.iter().map(|v| v.abs()).collect::<Vec<_>>(), &levels);
            let codes = t
                .data
                .iter()
                .zip(idx)
                .map(|(&v, i)| {
                    // levels[i] is 0 for i = 0, else magnitude index m = mags - i + 1.
                    let m = if i == 0 { 0 } else { mags - i + 1 };
                    if v < 0.0 && m != 0 {
                        half | m
                    } else {
                        m
                    }
                })
                .collect();
            (codes, Dequant::PowerOfTwo { max_exp })
        }
        QuantScheme::Codebook { kind, .. } => {
            let levels = fit_codebook(&t.data, bits, kind);
            let codes = assign_levels(&t.data, &levels);
            (codes, Dequant::Levels(levels))
        }
    };
    QuantizedTensor {
        shape: t.shape.clone(),
        bits,
        codes,
        dequant,
    }
}

/// Quantize → dequantize: the tensor a model would compute with under scheme `s` (same
/// shape). Exact zeros stay exactly zero under every scheme.
pub fn fake_quantize(t: &Tensor, s: &QuantScheme) -> Tensor {
    quantize_tensor(t, s).dequantize()
}

/// Bytes `t` takes stored under `s` (packed codes plus parameters).
pub fn scheme_bytes(t: &Tensor, s: &QuantScheme) -> usize {
    let bits = scheme_bits(s) as usize;
    let codes = (t.len() * bits).div_ceil(8);
    codes
        + match *s {
            QuantScheme::Affine { granularity, .. }
            | QuantScheme::Symmetric { granularity, .. } => channel_rows(t, granularity) * 5,
            QuantScheme::PowerOfTwo { .. } => 1,
            QuantScheme::Codebook { .. } => (1usize << bits) * 4,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::Rng;
    use rand::SeedableRng;

    /// Rows with very different ranges: row r spans about ±10^(1-r/4).
    fn rows_tensor(seed: u64) -> Tensor {
        let (rows, cols) = (12, 50);
        let mut rng = StdRng::seed_from_u64(seed);
        let data = (0..rows * cols)
            .map(|i| {
                let r = i / cols;
                rng.gen_range(-1.0f32..1.0) * 10f32.powf(1.0 - r as f32 / 4.0)
            })
            .collect();
        Tensor::new(vec![rows, cols], data)
    }

    fn mse(a: &Tensor, b: &Tensor) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            / a.len() as f64
    }

    #[test]
    fn uniform_schemes_error_within_half_a_step_per_channel() {
        let t = rows_tensor(1);
        for bits in [8u8, 4, 2] {
            for granularity in [Granularity::PerTensor, Granularity::PerChannel] {
                for s in [
                    QuantScheme::Affine { bits, granularity },
                    QuantScheme::Symmetric { bits, granularity },
                ] {
                    let q = quantize_tensor(&t, &s);
                    assert!(q.codes.iter().all(|&c| c < 1 << bits), "{s}");
                    let Dequant::Uniform { scale, .. } = &q.dequant else {
                        panic!("{s}: not uniform")
                    };
                    let expect = if granularity == Granularity::PerChannel {
                        12
                    } else {
                        1
                    };
                    assert_eq!(scale.len(), expect);
                    let d = fake_quantize(&t, &s);
                    assert_eq!(d, q.dequantize());
                    assert_eq!(d.shape, t.shape);
                    for (i, (a, b)) in t.data.iter().zip(&d.data).enumerate() {
                        let sc = scale[if expect == 1 { 0 } else { i / 50 }];
                        assert!(
                            (a - b).abs() <= sc / 2.0 + 1e-5 * a.abs(),
                            "{s}: {a} -> {b}"
                        );
                    }
                    assert_eq!(scheme_bytes(&t, &s), q.stored_bytes());
                }
            }
        }
    }

    #[test]
    fn per_channel_beats_per_tensor_on_uneven_rows() {
        let t = rows_tensor(2);
        for bits in [8u8, 4, 2] {
            for sym in [false, true] {
                let mk = |granularity| {
                    if sym {
                        QuantScheme::Symmetric { bits, granularity }
                    } else {
                        QuantScheme::Affine { bits, granularity }
                    }
                };
                // Mean over rows of the relative error (row MSE / row mean square).
                let rel = |g| {
                    let d = fake_quantize(&t, &mk(g));
                    (0..12)
                        .map(|r| {
                            let a = Tensor::new(vec![50], t.data[r * 50..(r + 1) * 50].to_vec());
                            let b = Tensor::new(vec![50], d.data[r * 50..(r + 1) * 50].to_vec());
                            mse(&a, &b) / mse(&a, &Tensor::zeros(&[50]))
                        })
                        .sum::<f64>()
                        / 12.0
                };
                let (pt, pc) = (rel(Granularity::PerTensor), rel(Granularity::PerChannel));
                assert!(pc < pt / 4.0, "bits {bits} sym {sym}: {pc} vs {pt}");
                // The whole tensor's MSE is never worse per channel either.
                let m = |g| mse(&t, &fake_quantize(&t, &mk(g)));
                assert!(m(Granularity::PerChannel) <= m(Granularity::PerTensor));
            }
        }
    }

    #[test]
    fn power_of_two_levels_and_error_bound() {
        let t = rows_tensor(3);
        for bits in [8u8, 4, 2] {
            let s = QuantScheme::PowerOfTwo { bits };
            let q = quantize_tensor(&t, &s);
            let Dequant::PowerOfTwo { max_exp } = q.dequant else {
                panic!("not pow2")
            };
            let mags = (1i32 << (bits - 1)) - 1;
            let smallest = 2f32.powi(max_exp - mags + 1);
            let d = q.dequantize();
            for (a, b) in t.data.iter().zip(&d.data) {
                if *b != 0.0 {
                    assert_eq!(b.abs().log2().fract(), 0.0, "{b} is not a power of two");
                    assert_eq!(a.signum(), b.signum());
                }
                // Nearest power of two: relative error ≤ 1/3 (≤ 0.3 above the top level);
                // below the smallest level, at most half of it.
                let bound = (a.abs() / 3.0).max(smallest / 2.0) + 1e-6;
                assert!((a - b).abs() <= bound, "bits {bits}: {a} -> {b}");
            }
        }
        // 2 bits: {0, ±2^e}.
        let d = fake_quantize(
            &Tensor::new(vec![4], vec![0.9, -1.1, 0.2, 0.0]),
            &QuantScheme::PowerOfTwo { bits: 2 },
        );
        assert_eq!(d.data, vec![1.0, -1.0, 0.0, 0.0]);
    }

    #[test]
    fn codebook_error_bounded_by_level_gaps() {
        let t = rows_tensor(4);
        for bits in [8u8, 4, 2] {
            for kind in [CodebookKind::KMeans, CodebookKind::GaussianQuantile] {
                let s = QuantScheme::Codebook { bits, kind };
                let q = quantize_tensor(&t, &s);
                let Dequant::Levels(levels) = &q.dequant else {
                    panic!("not a codebook")
                };
                assert!(levels.len() <= 1 << bits && levels.windows(2).all(|w| w[0] < w[1]));
                let max_gap = levels
                    .windows(2)
                    .map(|w| w[1] - w[0])
                    .fold(0.0f32, f32::max);
                let d = q.dequantize();
                for (a, b) in t.data.iter().zip(&d.data) {
                    let outside = (levels[0] - a).max(a - levels[levels.len() - 1]).max(0.0);
                    assert!(
                        (a - b).abs() <= max_gap / 2.0 + outside + 1e-6,
                        "{s}: {a} -> {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn zeros_stay_zero_under_every_scheme() {
        let mut t = rows_tensor(5);
        for (i, v) in t.data.iter_mut().enumerate() {
            if i % 3 != 0 {
                *v = 0.0;
            }
        }
        for bits in [8u8, 4, 2] {
            for s in [
                QuantScheme::Affine {
                    bits,
                    granularity: Granularity::PerChannel,
                },
                QuantScheme::Symmetric {
                    bits,
                    granularity: Granularity::PerTensor,
                },
                QuantScheme::PowerOfTwo { bits },
                QuantScheme::Codebook {
                    bits,
                    kind: CodebookKind::KMeans,
                },
                QuantScheme::Codebook {
                    bits,
                    kind: CodebookKind::GaussianQuantile,
                },
            ] {
                let d = fake_quantize(&t, &s);
                for (a, b) in t.data.iter().zip(&d.data) {
                    if *a == 0.0 {
                        assert_eq!(b.to_bits(), 0, "{s}");
                    }
                }
                assert_eq!(
                    scheme_bits(&s),
                    bits.max(
                        if matches!(
                            s,
                            QuantScheme::Symmetric { .. } | QuantScheme::PowerOfTwo { .. }
                        ) {
                            2
                        } else {
                            1
                        }
                    )
                );
            }
        }
    }
}
