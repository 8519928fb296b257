//! A MiniRocket feature front end (Dempster, Schmidt & Webb, KDD 2021, arXiv 2012.08791;
//! ROCKET: arXiv 1910.13051): a fixed set of random convolutions over a fixed-length window
//! of one or several channels, each followed by PPV pooling (the proportion of positive
//! values after subtracting a bias), then per-feature standardisation.
//!
//! The 84 kernels have length 9, weights −1 everywhere except 2 at three positions (every
//! choice of three of nine); dilations are spread exponentially up to the window length;
//! half the (kernel, dilation) pairs use zero padding. Nothing here is learned by gradient:
//! the only values fitted from data are the biases (quantiles of one random training
//! example's convolution output each, at low-discrepancy quantile levels) and each
//! feature's mean and standard deviation over a sample of the training set. The structure
//! (dilations, channel subsets of multivariate kernels, which example fits which bias) is a
//! function of `(channels, length, features, seed)` alone, so every binary derives it; the
//! fitted values travel with the model as ONNX metadata ([`META_KEY`], [`MiniRocket::to_meta`]),
//! so a device needs only the model to compute the features the head was trained on.
//!
//! The transform uses MiniRocket's decomposition: with `A = −Σ x(shifts)` and
//! `G_j = 3·x(shift j)`, the kernel with 2s at `i, j, k` is `A + G_i + G_j + G_k`, so one
//! dilation costs 10 passes over the window plus three additions per kernel and position.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// ONNX metadata key holding the fitted front end.
pub const META_KEY: &str = "hearth.minirocket";
/// Number of kernels (choices of 3 of 9 positions).
pub const KERNELS: usize = 84;
/// Kernel length.
const K: usize = 9;
/// Most dilations per kernel (as in the reference implementation).
const MAX_DILATIONS: usize = 32;
/// Floor of a feature's standard deviation in the standardisation.
const MIN_STD: f32 = 0.02;

/// The fixed structure and fitted values of a MiniRocket front end.
#[derive(Clone, PartialEq)]
pub struct MiniRocket {
    /// Channels of the window.
    pub channels: usize,
    /// Window length (samples per channel).
    pub length: usize,
    /// Number of features ([`output_len`] of the requested count).
    pub features: usize,
    /// Seed of the random structure.
    pub seed: u64,
    /// Fitted bias of every feature.
    pub biases: Vec<f32>,
    /// Mean of every feature over the fitting sample.
    pub mean: Vec<f32>,
    /// Standard deviation of every feature over the fitting sample (floored).
    pub std: Vec<f32>,
    plan: Plan,
}

impl std::fmt::Debug for MiniRocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniRocket")
            .field("channels", &self.channels)
            .field("length", &self.length)
            .field("features", &self.features)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

/// One (dilation, kernel) pair: its features are `first..first + count`.
#[derive(Clone, Debug, PartialEq)]
struct Combo {
    dilation: usize,
    kernel: [usize; 3],
    padded: bool,
    channels: Vec<usize>,
    first: usize,
    count: usize,
}

#[derive(Clone, Debug, PartialEq)]
struct Plan {
    dilations: Vec<usize>,
    /// Combos grouped by dilation, in feature order.
    combos: Vec<Combo>,
}

/// Features actually produced for a requested count: a multiple of [`KERNELS`], at least one.
pub fn output_len(requested: usize) -> usize {
    (requested / KERNELS).max(1) * KERNELS
}

/// The 84 index triples, in lexicographic order.
fn kernel_indices() -> Vec<[usize; 3]> {
    let mut out = Vec::with_capacity(KERNELS);
    for i in 0..K {
        for j in i + 1..K {
            for k in j + 1..K {
                out.push([i, j, k]);
            }
        }
    }
    out
}

/// The structure for `(channels, length, features, seed)`; `length >= 1`, `channels >= 1`.
fn plan(channels: usize, length: usize, features: usize, seed: u64) -> Plan {
    let per_kernel = output_len(features) / KERNELS;
    let true_max = per_kernel.min(MAX_DILATIONS);
    let multiplier = per_kernel as f64 / true_max as f64;
    let max_exp = if length > K {
        ((length - 1) as f64 / (K - 1) as f64).log2().max(0.0)
    } else {
        0.0
    };
    // floor(logspace(0, max_exp, true_max, base 2)), unique with counts.
    let mut dilations: Vec<usize> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    for s in 0..true_max {
        let e = if true_max > 1 {
            max_exp * s as f64 / (true_max - 1) as f64
        } else {
            0.0
        };
        let d = (2f64.powf(e).floor() as usize).max(1);
        if dilations.last() == Some(&d) {
            *counts.last_mut().expect("pushed with the dilation") += 1;
        } else {
            dilations.push(d);
            counts.push(1);
        }
    }
    let mut per_dilation: Vec<usize> = counts
        .iter()
        .map(|&c| (c as f64 * multiplier) as usize)
        .collect();
    let mut rem = per_kernel - per_dilation.iter().sum::<usize>().min(per_kernel);
    let mut i = 0;
    while rem > 0 {
        per_dilation[i] += 1;
        rem -= 1;
        i = (i + 1) % per_dilation.len();
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4d49_4e49_524f_434b);
    let max_ch = channels.min(K) as f64;
    let kernels = kernel_indices();
    let mut combos = Vec::with_capacity(dilations.len() * KERNELS);
    let mut first = 0;
    for (di, (&dilation, &count)) in dilations.iter().zip(&per_dilation).enumerate() {
        for (ki, &kernel) in kernels.iter().enumerate() {
            let chans = if channels == 1 {
                vec![0]
            } else {
                // 2^U(0, log2(max_ch + 1)) channels, as in MiniRocket's multivariate variant.
                let n = 2f64.powf(rng.gen::<f64>() * (max_ch + 1.0).log2()) as usize;
                let n = n.clamp(1, channels);
                let mut all: Vec<usize> = (0..channels).collect();
                for t in 0..n {
                    let s = rng.gen_range(t..channels);
                    all.swap(t, s);
                }
                let mut c = all[..n].to_vec();
                c.sort_unstable();
                c
            };
            combos.push(Combo {
                dilation,
                kernel,
                padded: (di % 2 + ki) % 2 == 0,
                channels: chans,
                first,
                count,
            });
            first += count;
        }
    }
    Plan { dilations, combos }
}

/// Per channel and dilation: `A` and the nine `G_j`, each of length `length` (zero padding).
struct Planes {
    a: Vec<f32>,
    g: Vec<f32>,
}

fn planes(x: &[f32], dilation: usize) -> Planes {
    let n = x.len();
    let mut a = vec![0.0f32; n];
    let mut g = vec![0.0f32; K * n];
    let half = (K / 2) as isize;
    for j in 0..K {
        let shift = (j as isize - half) * dilation as isize;
        let gj = &mut g[j * n..(j + 1) * n];
        for t in 0..n {
            let s = t as isize + shift;
            if s >= 0 && (s as usize) < n {
                let v = x[s as usize];
                a[t] -= v;
                gj[t] = 3.0 * v;
            }
        }
    }
    Planes { a, g }
}

/// The convolution output of one combo over the whole window (zero padded).
fn conv(combo: &Combo, planes: &[Planes], n: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(n, 0.0);
    let [i, j, k] = combo.kernel;
    for &c in &combo.channels {
        let p = &planes[c];
        let (gi, gj, gk) = (
            &p.g[i * n..(i + 1) * n],
            &p.g[j * n..(j + 1) * n],
            &p.g[k * n..(k + 1) * n],
        );
        for t in 0..n {
            out[t] += p.a[t] + gi[t] + gj[t] + gk[t];
        }
    }
}

/// Quantile with linear interpolation (numpy's default) of a sorted slice.
fn quantile(sorted: &[f32], q: f64) -> f32 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let w = (pos - lo as f64) as f32;
    sorted[lo] + (sorted[hi] - sorted[lo]) * w
}

impl MiniRocket {
    /// Fits the biases on `samples` (each `channels × length` values, channel after channel)
    /// and the standardisation on up to `max_samples` of them (chosen by `seed`).
    ///
    /// # Panics
    /// If `samples` is empty or a sample has the wrong size (callers validate).
    pub fn fit(
        samples: &[Vec<f32>],
        channels: usize,
        length: usize,
        features: usize,
        seed: u64,
        max_samples: usize,
    ) -> MiniRocket {
        assert!(!samples.is_empty(), "MiniRocket needs fitting samples");
        assert!(samples.iter().all(|s| s.len() == channels * length));
        let plan = plan(channels, length, features, seed);
        let features = output_len(features);
        let golden = (5f64.sqrt() + 1.0) / 2.0;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4249_4153);
        let mut biases = vec![0.0f32; features];
        let mut out = Vec::new();
        for &dilation in &plan.dilations {
            for combo in plan.combos.iter().filter(|c| c.dilation == dilation) {
                let ex = &samples[rng.gen_range(0..samples.len())];
                let pl: Vec<Planes> = ex.chunks(length).map(|c| planes(c, dilation)).collect();
                conv(combo, &pl, length, &mut out);
                out.sort_unstable_by(f32::total_cmp);
                let range = combo.first..combo.first + combo.count;
                for (f, b) in range.clone().zip(&mut biases[range]) {
                    *b = quantile(&out, ((f + 1) as f64 * golden).fract());
                }
            }
        }
        let mut m = MiniRocket {
            channels,
            length,
            features,
            seed,
            biases,
            mean: vec![0.0; features],
            std: vec![1.0; features],
            plan,
        };
        let mut idx: Vec<usize> = (0..samples.len()).collect();
        for t in 0..idx.len().min(max_samples.max(1)) {
            let s = rng.gen_range(t..idx.len());
            idx.swap(t, s);
        }
        idx.truncate(max_samples.max(1));
        let raw: Vec<Vec<f32>> = idx.iter().map(|&i| m.ppv(&samples[i])).collect();
        let n = raw.len() as f64;
        for f in 0..features {
            let mean = raw.iter().map(|r| f64::from(r[f])).sum::<f64>() / n;
            let var = raw
                .iter()
                .map(|r| (f64::from(r[f]) - mean).powi(2))
                .sum::<f64>()
                / n;
            m.mean[f] = mean as f32;
            m.std[f] = (var.sqrt() as f32).max(MIN_STD);
        }
        m
    }

    /// The raw PPV features of one window (`channels × length` values).
    fn ppv(&self, x: &[f32]) -> Vec<f32> {
        let n = self.length;
        let mut feats = vec![0.0f32; self.features];
        let mut out = Vec::with_capacity(n);
        for &dilation in &self.plan.dilations {
            let pl: Vec<Planes> = x.chunks(n).map(|c| planes(c, dilation)).collect();
            let pad = (K - 1) * dilation / 2;
            for combo in self.plan.combos.iter().filter(|c| c.dilation == dilation) {
                conv(combo, &pl, n, &mut out);
                let span = if combo.padded || 2 * pad >= n {
                    &out[..]
                } else {
                    &out[pad..n - pad]
                };
                let len = span.len() as f32;
                let range = combo.first..combo.first + combo.count;
                for (f, &b) in feats[range.clone()].iter_mut().zip(&self.biases[range]) {
                    *f = span.iter().filter(|&&v| v > b).count() as f32 / len;
                }
            }
        }
        feats
    }

    /// The standardised features of one window (`channels × length` values, channel after
    /// channel); `None` when the window has another size.
    pub fn transform(&self, x: &[f32]) -> Option<Vec<f32>> {
        if x.len() != self.channels * self.length {
            return None;
        }
        let mut f = self.ppv(x);
        for ((v, m), s) in f.iter_mut().zip(&self.mean).zip(&self.std) {
            *v = (*v - m) / s;
        }
        Some(f)
    }

    /// The text stored under [`META_KEY`]: `v1;channels;length;features;seed;` then the
    /// biases, means and standard deviations as hex of little-endian f32.
    pub fn to_meta(&self) -> String {
        let bytes: Vec<u8> = self
            .biases
            .iter()
            .chain(&self.mean)
            .chain(&self.std)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        format!(
            "v1;{};{};{};{};{}",
            self.channels,
            self.length,
            self.features,
            self.seed,
            hex::encode(bytes)
        )
    }

    /// Parses [`MiniRocket::to_meta`] text (bounded: at most 1 Mi features, 4096 channels
    /// and 1 Mi samples per channel; the hex must hold exactly three values per feature).
    pub fn from_meta(s: &str) -> Result<MiniRocket, String> {
        let mut it = s.splitn(6, ';');
        if it.next() != Some("v1") {
            return Err(format!("{META_KEY}: unknown version"));
        }
        let mut num = |what: &str, max: u64| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v <= max)
                .ok_or_else(|| format!("{META_KEY}: bad {what}"))
        };
        let channels = num("channels", 4096)? as usize;
        let length = num("length", 1 << 20)? as usize;
        let features = num("features", 1 << 20)? as usize;
        let seed = num("seed", u64::MAX)?;
        if channels == 0 || length == 0 || features != output_len(features) {
            return Err(format!("{META_KEY}: bad sizes"));
        }
        let hex_text = it.next().unwrap_or("");
        if hex_text.len() != features * 3 * 4 * 2 {
            return Err(format!(
                "{META_KEY}: {} hex digits for {features} features",
                hex_text.len()
            ));
        }
        let bytes = hex::decode(hex_text).map_err(|e| format!("{META_KEY}: {e}"))?;
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if vals.iter().any(|v| !v.is_finite()) || vals[2 * features..].iter().any(|&s| s <= 0.0) {
            return Err(format!("{META_KEY}: non-finite or non-positive values"));
        }
        Ok(MiniRocket {
            channels,
            length,
            features,
            seed,
            biases: vals[..features].to_vec(),
            mean: vals[features..2 * features].to_vec(),
            std: vals[2 * features..].to_vec(),
            plan: plan(channels, length, features, seed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, f: f32, phase: f32) -> Vec<f32> {
        (0..n)
            .map(|t| (t as f32 * f + phase).sin() + 0.1 * ((t * 7 % 13) as f32 / 13.0))
            .collect()
    }

    #[test]
    fn sizes_and_dilations() {
        assert_eq!(output_len(10), 84);
        assert_eq!(output_len(2000), 1932);
        let p = plan(1, 256, 2000, 1);
        let total: usize = p.combos.iter().map(|c| c.count).sum();
        assert_eq!(total, 1932);
        assert_eq!(p.dilations[0], 1);
        // Largest dilation keeps the kernel inside the window: 8·d ≤ length − 1.
        assert!(p.dilations.iter().all(|&d| 8 * d < 256));
        assert!(p.dilations.windows(2).all(|w| w[0] < w[1]));
    }

    /// The decomposition equals the direct convolution with weights −1 and 2.
    #[test]
    fn conv_matches_direct() {
        let x = wave(40, 0.3, 0.1);
        let p = plan(1, 40, 84, 3);
        for combo in p.combos.iter().take(84) {
            let pl = vec![planes(&x, combo.dilation)];
            let mut out = Vec::new();
            conv(combo, &pl, x.len(), &mut out);
            for (t, &o) in out.iter().enumerate() {
                let mut d = 0.0f32;
                for j in 0..K {
                    let s = t as isize + (j as isize - 4) * combo.dilation as isize;
                    let w = if combo.kernel.contains(&j) { 2.0 } else { -1.0 };
                    if s >= 0 && (s as usize) < x.len() {
                        d += w * x[s as usize];
                    }
                }
                assert!((d - o).abs() < 1e-4, "t={t}: {d} vs {o}");
            }
        }
    }

    #[test]
    fn deterministic_and_round_trips_through_metadata() {
        let samples: Vec<Vec<f32>> = (0..20)
            .map(|i| wave(64, 0.1 + i as f32 * 0.02, i as f32))
            .collect();
        let a = MiniRocket::fit(&samples, 1, 64, 300, 7, 16);
        let b = MiniRocket::fit(&samples, 1, 64, 300, 7, 16);
        assert_eq!(a, b);
        let c = MiniRocket::fit(&samples, 1, 64, 300, 8, 16);
        assert_ne!(a.biases, c.biases);
        let back = MiniRocket::from_meta(&a.to_meta()).unwrap();
        assert_eq!(back, a);
        let f = a.transform(&samples[3]).unwrap();
        assert_eq!(f.len(), 252);
        assert!(f.iter().all(|v| v.is_finite()));
        assert_eq!(back.transform(&samples[3]).unwrap(), f);
        assert!(a.transform(&samples[3][..10]).is_none());
        // Truncated or corrupted metadata is refused, not trusted.
        let m = a.to_meta();
        assert!(MiniRocket::from_meta(&m[..m.len() - 8]).is_err());
        assert!(MiniRocket::from_meta(&m.replacen("v1", "v9", 1)).is_err());
        assert!(MiniRocket::from_meta("v1;1;64;99999999999;1;").is_err());
    }

    #[test]
    fn multivariate_kernels_use_channel_subsets() {
        let samples: Vec<Vec<f32>> = (0..10)
            .map(|i| {
                let mut s = wave(50, 0.2, i as f32);
                s.extend(wave(50, 0.5, -(i as f32)));
                s.extend(wave(50, 0.05, 0.0));
                s
            })
            .collect();
        let m = MiniRocket::fit(&samples, 3, 50, 168, 1, 10);
        assert!(m.plan.combos.iter().any(|c| c.channels.len() > 1));
        assert!(m
            .plan
            .combos
            .iter()
            .all(|c| c.channels.iter().all(|&k| k < 3)));
        assert_eq!(m.transform(&samples[0]).unwrap().len(), 168);
    }
}
