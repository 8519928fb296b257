//! Quantization primitives on slices, used by the update codec and by the compression
//! toolkit's tensor schemes (`hearth_compress::quant`): affine (asymmetric, with an integer
//! zero point), symmetric, and unbiased stochastic rounding; codes returned as `i32`.

use rand::Rng;

/// How integer codes map back to reals: `x ≈ scale * (q - zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    /// Step between adjacent levels (> 0).
    pub scale: f32,
    /// Code that represents 0.0 (0 for symmetric).
    pub zero_point: i32,
    /// Bits per code.
    pub bits: u8,
}

/// The smallest and largest finite values of `x` (`(0, 0)` when there are none).
pub fn finite_range(x: &[f32]) -> (f32, f32) {
    let (lo, hi) = x
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        (0.0, 0.0)
    } else {
        (lo, hi)
    }
}

/// Affine quantization to codes `0..=2^b-1`: `q = round((x - min) / (max - min) * (2^b - 1))`.
///
/// The range is widened to include 0 and its minimum nudged onto the integer grid (as ONNX
/// and TFLite do) so that 0.0 is exact — pruned weights stay exactly zero — and
/// `|x - dequantize(q)| <= scale / 2` holds for every finite `x`. `bits` is clamped to 1..=16.
pub fn quantize_affine(x: &[f32], bits: u8) -> (Vec<i32>, QuantParams) {
    let bits = bits.clamp(1, 16);
    let levels = ((1u32 << bits) - 1) as f32;
    let (lo, hi) = finite_range(x);
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = if hi > lo { (hi - lo) / levels } else { 1.0 };
    let zero_point = (-lo / scale).round().clamp(0.0, levels) as i32;
    let q = x
        .iter()
        .map(|&v| ((v / scale).round() + zero_point as f32).clamp(0.0, levels) as i32)
        .collect();
    (
        q,
        QuantParams {
            scale,
            zero_point,
            bits,
        },
    )
}

/// Symmetric quantization to codes `-(2^(b-1)-1)..=2^(b-1)-1` with zero point 0 and
/// `scale = max|x| / (2^(b-1)-1)`. `bits` is clamped to 2..=16.
pub fn quantize_symmetric(x: &[f32], bits: u8) -> (Vec<i32>, QuantParams) {
    let (p, qmax) = symmetric_params(x, bits);
    let q = x
        .iter()
        .map(|&v| (v / p.scale).round().clamp(-qmax, qmax) as i32)
        .collect();
    (q, p)
}

/// Symmetric parameters for `x` at `bits`, and the largest code magnitude.
fn symmetric_params(x: &[f32], bits: u8) -> (QuantParams, f32) {
    let bits = bits.clamp(2, 16);
    let qmax = ((1u32 << (bits - 1)) - 1) as f32;
    let (lo, hi) = finite_range(x);
    let amax = lo.abs().max(hi.abs());
    let scale = if amax > 0.0 { amax / qmax } else { 1.0 };
    (
        QuantParams {
            scale,
            zero_point: 0,
            bits,
        },
        qmax,
    )
}

/// Symmetric quantization with stochastic rounding: `q = floor(x / scale + u)`,
/// `u ~ U[0, 1)`, so `E[dequantize(q)] = x` (unbiased), with `|x - dequantize(q)| < scale`.
pub fn quantize_stochastic(x: &[f32], bits: u8, rng: &mut impl Rng) -> (Vec<i32>, QuantParams) {
    let (p, qmax) = symmetric_params(x, bits);
    let q = x
        .iter()
        .map(|&v| {
            let u: f32 = rng.gen();
            (v / p.scale + u).floor().clamp(-qmax, qmax) as i32
        })
        .collect();
    (q, p)
}

/// `scale * (q - zero_point)` for every code.
pub fn dequantize(q: &[i32], p: &QuantParams) -> Vec<f32> {
    q.iter()
        .map(|&c| (c - p.zero_point) as f32 * p.scale)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn sample(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(lo..hi)).collect()
    }

    #[test]
    fn affine_round_trip_within_half_a_step() {
        for bits in [8u8, 4, 2] {
            for (lo, hi) in [(-1.0f32, 3.0f32), (0.5, 2.0), (-7.0, -0.25), (-1e-3, 1e-3)] {
                let x = sample(u64::from(bits), 1000, lo, hi);
                let (q, p) = quantize_affine(&x, bits);
                let max_code = (1i32 << bits) - 1;
                assert!(q.iter().all(|&c| (0..=max_code).contains(&c)));
                let d = dequantize(&q, &p);
                let eps = 1e-6 * hi.abs().max(lo.abs());
                for (a, b) in x.iter().zip(&d) {
                    assert!(
                        (a - b).abs() <= p.scale / 2.0 + eps,
                        "bits {bits}: {a} -> {b}, scale {}",
                        p.scale
                    );
                }
                // Zero is exact.
                assert_eq!(dequantize(&[p.zero_point], &p)[0], 0.0);
            }
        }
        let (q, p) = quantize_affine(&[0.0; 4], 8);
        assert_eq!(dequantize(&q, &p), vec![0.0; 4]);
    }

    #[test]
    fn symmetric_round_trip_within_half_a_step() {
        for bits in [8u8, 4, 2] {
            let x = sample(7, 1000, -2.0, 1.0);
            let (q, p) = quantize_symmetric(&x, bits);
            assert_eq!(p.zero_point, 0);
            let qmax = (1i32 << (bits - 1)) - 1;
            assert!(q.iter().all(|&c| c.abs() <= qmax));
            let d = dequantize(&q, &p);
            for (a, b) in x.iter().zip(&d) {
                assert!(
                    (a - b).abs() <= p.scale / 2.0 + 1e-6,
                    "bits {bits}: {a} -> {b}"
                );
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let mut rng = StdRng::seed_from_u64(9);
        let x = sample(3, 64, -1.0, 1.0);
        for bits in [8u8, 4, 2] {
            let draws = 4000;
            let mut mean_err = vec![0.0f64; x.len()];
            let mut scale = 0.0;
            for _ in 0..draws {
                let (q, p) = quantize_stochastic(&x, bits, &mut rng);
                scale = p.scale;
                for ((m, a), b) in mean_err.iter_mut().zip(&x).zip(dequantize(&q, &p)) {
                    assert!((a - b).abs() < p.scale + 1e-6);
                    *m += f64::from(b - a) / f64::from(draws);
                }
            }
            // The standard error of each mean is at most scale / (2 sqrt(draws)) ≈ 0.008 scale.
            for m in &mean_err {
                assert!(
                    m.abs() < 0.05 * f64::from(scale),
                    "bits {bits}: bias {m}, scale {scale}"
                );
            }
            // Deterministic rounding would be biased on the same values.
            let (q, p) = quantize_symmetric(&x, bits);
            let det_bias: f64 = x
                .iter()
                .zip(dequantize(&q, &p))
                .map(|(a, b)| f64::from((b - a).abs()))
                .sum();
            assert!(det_bias > 0.0);
        }
    }
}
