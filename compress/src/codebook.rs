//! Non-uniform quantization levels (codebooks) fitted to a tensor's value distribution:
//!
//! - **Gaussian quantiles**: fit `N(μ, σ)` to the values and put the `K = 2^b` levels at the
//!   quantiles `(i + ½) / K` of that normal — dense near the mean, where trained weights are.
//! - **k-means** (Lloyd's algorithm in one dimension): start from the quantiles of the data
//!   and, separately, from the uniform affine grid; iterate at most [`KMEANS_MAX_ITERS`]
//!   times; keep whichever ends with the lower squared error. Lloyd never increases the
//!   error of its starting point, so the result is never worse than uniform affine
//!   quantization at the same bit width. Deterministic (no random init).
//!
//! Values are stored as indices into the ascending level table ([`assign_levels`]). When a
//! tensor has exact zeros (pruned weights), one level is reserved for an exact 0.0 and the
//! other `K - 1` are fitted to the non-zero values.

use hearth_model::quant::{dequantize, quantize_affine};

/// Bound on Lloyd iterations.
pub const KMEANS_MAX_ITERS: usize = 60;

/// How a codebook is fitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodebookKind {
    /// Quantiles of a normal fitted to the values.
    GaussianQuantile,
    /// Lloyd's k-means.
    KMeans,
}

/// Inverse CDF of the standard normal (Acklam's rational approximation, relative error
/// below 1.2e-9) for `p` in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// `k` levels at the quantiles `(i + ½)/k` of the normal fitted (mean, population std) to
/// the finite values of `x`; ascending. Empty input gives `[0.0]`.
pub fn gaussian_quantile_levels(x: &[f32], k: usize) -> Vec<f32> {
    let v: Vec<f64> = x
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v))
        .collect();
    if v.is_empty() || k == 0 {
        return vec![0.0];
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / n).sqrt();
    let mut levels: Vec<f32> = (0..k)
        .map(|i| (mean + std * normal_quantile((i as f64 + 0.5) / k as f64)) as f32)
        .collect();
    levels.sort_by(f32::total_cmp);
    levels.dedup();
    levels
}

/// Index of the nearest level for every value (`levels` ascending; ties go to the lower
/// level). NaN maps to the level nearest 0, ±∞ to the extreme levels.
///
/// # Panics
/// If `levels` is empty.
pub fn assign_levels(x: &[f32], levels: &[f32]) -> Vec<u32> {
    assert!(!levels.is_empty(), "empty codebook");
    x.iter()
        .map(|&v| {
            let v = if v.is_nan() { 0.0 } else { v };
            let i = levels.partition_point(|&l| l < v);
            let best = if i == 0 {
                0
            } else if i == levels.len() {
                levels.len() - 1
            } else if (v - levels[i - 1]) <= (levels[i] - v) {
                i - 1
            } else {
                i
            };
            best as u32
        })
        .collect()
}

/// Mean squared error of representing `x` by its nearest levels.
pub fn codebook_mse(x: &[f32], levels: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let idx = assign_levels(x, levels);
    x.iter()
        .zip(idx)
        .map(|(&v, i)| {
            let d = f64::from(v) - f64::from(levels[i as usize]);
            d * d
        })
        .sum::<f64>()
        / x.len() as f64
}

/// Lloyd iterations on sorted values from `init`; returns ascending centroids.
fn lloyd(sorted: &[f32], init: Vec<f32>, max_iters: usize) -> Vec<f32> {
    let n = sorted.len();
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0.0f64);
    for &v in sorted {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + f64::from(v));
    }
    let mut c = init;
    c.sort_by(f32::total_cmp);
    for _ in 0..max_iters {
        // Cluster j holds the values nearest c[j]: a contiguous run of the sorted values,
        // split where assign_levels would split them (ties to the lower level).
        let mut next = c.clone();
        let mut start = 0usize;
        for j in 0..c.len() {
            let end = if j + 1 == c.len() {
                n
            } else {
                let (a, b) = (c[j], c[j + 1]);
                start + sorted[start..].partition_point(|&v| (v - a) <= (b - v))
            };
            if end > start {
                next[j] = ((prefix[end] - prefix[start]) / (end - start) as f64) as f32;
            }
            start = end;
        }
        next.sort_by(f32::total_cmp);
        if next == c {
            break;
        }
        c = next;
    }
    c
}

/// `k` levels by 1-D k-means (Lloyd, at most `max_iters` iterations) on the finite values of
/// `x`, started from the data quantiles and from the uniform affine grid; the start with the
/// lower final error wins. Ascending. Fewer distinct values than `k` are returned as is.
pub fn kmeans_levels(x: &[f32], k: usize, max_iters: usize) -> Vec<f32> {
    let mut sorted: Vec<f32> = x.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() || k == 0 {
        return vec![0.0];
    }
    sorted.sort_by(f32::total_cmp);
    let mut distinct = sorted.clone();
    distinct.dedup();
    if distinct.len() <= k {
        return distinct;
    }
    let n = sorted.len();
    let quantile_init: Vec<f32> = (0..k)
        .map(|i| sorted[(((i as f64 + 0.5) / k as f64) * n as f64) as usize % n])
        .collect();
    // The uniform affine grid over the data (k = 2^b levels when k is a power of two).
    let bits = (usize::BITS - (k - 1).leading_zeros()).clamp(1, 16) as u8;
    let (_, p) = quantize_affine(&sorted, bits);
    let mut grid: Vec<f32> = dequantize(&(0..1i32 << bits).collect::<Vec<_>>(), &p);
    if grid.len() > k {
        // k = 2^b - 1 when a level is reserved for exact zeros: drop the grid's own 0.
        if let Some(z) = grid.iter().position(|&v| v == 0.0) {
            grid.remove(z);
        }
        grid.truncate(k);
    }
    let mut best: Option<(f64, Vec<f32>)> = None;
    for init in [quantile_init, grid] {
        let mut c = lloyd(&sorted, init, max_iters);
        c.dedup();
        let mse = codebook_mse(&sorted, &c);
        if best.as_ref().is_none_or(|(m, _)| mse < *m) {
            best = Some((mse, c));
        }
    }
    best.map(|(_, c)| c).unwrap_or_else(|| vec![0.0])
}

/// The ascending level table (at most `2^bits` entries) of `kind` for the values `x`. With
/// exact zeros present, 0.0 is one of the levels and the rest are fitted to the non-zeros.
pub fn fit_codebook(x: &[f32], bits: u8, kind: CodebookKind) -> Vec<f32> {
    let k = 1usize << bits.clamp(1, 8);
    let has_zero = x.contains(&0.0);
    let (fit, k_fit): (Vec<f32>, usize) = if has_zero {
        (x.iter().copied().filter(|&v| v != 0.0).collect(), k - 1)
    } else {
        (x.to_vec(), k)
    };
    let mut levels = if fit.iter().all(|v| !v.is_finite()) || k_fit == 0 {
        vec![0.0]
    } else {
        match kind {
            CodebookKind::GaussianQuantile => gaussian_quantile_levels(&fit, k_fit),
            CodebookKind::KMeans => kmeans_levels(&fit, k_fit, KMEANS_MAX_ITERS),
        }
    };
    if has_zero {
        levels.push(0.0);
    }
    // -0.0 and 0.0 compare equal: normalise so dedup keeps one exact 0.0.
    levels.iter_mut().for_each(|v| *v += 0.0);
    levels.sort_by(f32::total_cmp);
    levels.dedup();
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_matches_known_values() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_963_985),
            (0.025, -1.959_963_985),
            (0.841_344_746, 1.0),
            (0.001, -3.090_232_306),
        ] {
            assert!((normal_quantile(p) - z).abs() < 1e-6, "{p}");
        }
    }

    #[test]
    fn gaussian_levels_are_symmetric_about_the_mean() {
        let x: Vec<f32> = (0..1050)
            .map(|i| ((i % 21) as f32 - 10.0) * 0.1 + 3.0)
            .collect();
        let l = gaussian_quantile_levels(&x, 4);
        assert_eq!(l.len(), 4);
        assert!(((l[0] + l[3]) / 2.0 - 3.0).abs() < 1e-4);
        assert!(((l[1] + l[2]) / 2.0 - 3.0).abs() < 1e-4);
        assert!(l.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn kmeans_finds_separated_clusters() {
        let mut x = Vec::new();
        for c in [-5.0f32, 0.5, 7.0] {
            for i in 0..50 {
                x.push(c + (i as f32 - 25.0) * 0.001);
            }
        }
        let l = kmeans_levels(&x, 3, KMEANS_MAX_ITERS);
        assert_eq!(l.len(), 3);
        for (a, b) in l.iter().zip([-5.0f32, 0.5, 7.0]) {
            assert!((a - b).abs() < 1e-3, "{l:?}");
        }
        // Few distinct values: exact.
        assert_eq!(kmeans_levels(&[1.0, 2.0, 1.0], 4, 10), vec![1.0, 2.0]);
        assert_eq!(
            assign_levels(&[f32::NAN, 9.0, -9.0, 1.5], &[-1.0, 1.0, 2.0]),
            vec![0, 2, 0, 1]
        );
    }

    #[test]
    fn zeros_get_their_own_level() {
        let x = [0.0f32, 0.0, 0.3, 0.31, -0.7, 0.0, 1.2, 1.25];
        for kind in [CodebookKind::KMeans, CodebookKind::GaussianQuantile] {
            let l = fit_codebook(&x, 2, kind);
            assert!(l.len() <= 4 && l.contains(&0.0), "{l:?}");
        }
    }
}
