//! The compact wire format of a model delta (what agents upload), with error feedback.
//!
//! Layout (all integers LEB128 varints unless noted, floats little-endian):
//! ```text
//! "HUPD" version:u8(=1) tensors                      (self-describing)
//! "HUPD" version:u8(=2) layout_digest:u32            (compact: the model's tensors in name
//!                                                     order, CRC-32 of their names and shapes)
//! per tensor: [v1 only: name_len name(utf-8) ndim dims…] encoding:u8 bits:u8 scale:f32
//!   encoding 0 (dense):  values for every element
//!   encoding 1 (top-k):  k, then k index gaps as varints (first index, then idx[i] - idx[i-1] - 1),
//!                        then k values
//!   encoding 2 (top-k, Rice-coded positions): k, r:u8 (≤ 24), then the same k gaps Golomb–Rice
//!                        coded (g >> r in unary as ones and a closing zero, then the low r bits of
//!                        g, LSB-first; padded to a byte), then k values
//!   values: bits = 32 → raw f32; bits 2..=8 → symmetric codes q + 2^(bits-1), packed LSB-first
//!           (8 bits = one byte per value, 4 bits = two per byte); bits = 1 → one sign bit per
//!           value (1 = +scale, 0 = −scale), scale = mean |value| of the sent values
//! ```
//! Encoding applies error feedback: `v = delta + residual`; keep the top-k of `|v|`; quantize
//! them (2..=8 bits: unbiased stochastic rounding; 1 bit: sign times the mean magnitude, the
//! ternary code of Sattler et al.'s sparse ternary compression); `residual = v - dequantized(sent)`
//! (the residual stays on the device and is added to the next round's delta). With
//! [`CodecConfig::entropy`] a top-k tensor's positions are Rice coded when that is smaller than
//! varints (encoding 2), which it is at the sparsities that matter (`codec_sweep` measures it).

use crate::bytes::{Put, Reader};
use crate::error::ModelError;
use crate::quant::{dequantize, quantize_stochastic, QuantParams};
use crate::tensor::{Tensor, Weights};
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"HUPD";
const VERSION: u8 = 1;
/// The compact layout: no names or shapes, the model's layout digest instead.
const COMPACT: u8 = 2;
const DENSE: u8 = 0;
const TOPK: u8 = 1;
const TOPK_RICE: u8 = 2;
/// Largest Rice parameter: gaps are below 2^24 (the element bound) for every useful choice.
const MAX_RICE: u8 = 24;
/// Refuse to decode updates holding more than this many elements in total (16 Mi, 64 MiB
/// decoded) or tensors deeper than 8 dims. A top-k tensor's size is only declared, so the
/// bound is on the sum: a few bytes must not make the decoder allocate gigabytes.
pub const MAX_ELEMENTS: usize = 1 << 24;
const MAX_DIMS: usize = 8;

/// Settings of [`encode_update`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CodecConfig {
    /// Bits per sent value: 1 (sign times the mean magnitude), 2..=8 (quantized with
    /// stochastic rounding) or 32 (raw f32).
    pub bits: u8,
    /// Share of each tensor's values sent (largest |v| first); 1.0 = dense.
    pub topk_fraction: f32,
    /// Rice-code a top-k tensor's positions when that is smaller than varint gaps (decoders
    /// read both; off = the varint layout only).
    pub entropy: bool,
    /// The compact layout (version 2): no tensor names or shapes, the model's layout digest
    /// instead; decoded with [`decode_update_for`] by whoever holds the model. Off = the
    /// self-describing layout (version 1) that [`decode_update`] reads alone.
    pub compact: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            bits: 8,
            topk_fraction: 1.0,
            entropy: true,
            compact: false,
        }
    }
}

impl CodecConfig {
    /// Dense (no top-k) at `bits`, compact layout (what agents and the coordinator send).
    pub fn dense(bits: u8) -> CodecConfig {
        CodecConfig::topk(bits, 1.0)
    }

    /// Top-`topk_fraction` at `bits`, Rice-coded positions, compact layout (what agents and
    /// the coordinator send).
    pub fn topk(bits: u8, topk_fraction: f32) -> CodecConfig {
        CodecConfig {
            bits,
            topk_fraction,
            entropy: true,
            compact: true,
        }
    }
}

/// Whether `bits` is a value width the codec writes and reads: 1..=8 or 32.
pub fn valid_bits(bits: u32) -> bool {
    matches!(bits, 1..=8 | 32)
}

/// `delta + residual` → top-k → stochastic quantization → bytes; `residual` is updated in
/// place to `v - sent` and afterwards holds exactly the tensors of `delta`.
pub fn encode_update(
    delta: &Weights,
    residual: &mut Weights,
    cfg: &CodecConfig,
    rng: &mut impl rand::Rng,
) -> Result<Vec<u8>, ModelError> {
    if !valid_bits(u32::from(cfg.bits)) {
        return Err(ModelError::Codec(format!(
            "unsupported bits {}: use 1..=8 or 32",
            cfg.bits
        )));
    }
    if !(cfg.topk_fraction > 0.0 && cfg.topk_fraction <= 1.0) {
        return Err(ModelError::Codec(format!(
            "topk_fraction {} not in (0, 1]",
            cfg.topk_fraction
        )));
    }
    for (name, t) in delta {
        if t.data.len() != t.shape.iter().product::<usize>() {
            return Err(ModelError::Shape(format!(
                "tensor {name}: shape {:?} vs {} values",
                t.shape,
                t.data.len()
            )));
        }
        if t.data.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Codec(format!(
                "tensor {name} has non-finite values"
            )));
        }
        if let Some(r) = residual.get(name) {
            if r.shape != t.shape {
                return Err(ModelError::Shape(format!(
                    "residual {name}: shape {:?} vs {:?}",
                    r.shape, t.shape
                )));
            }
        }
    }
    let mut out = Vec::new();
    out.put_bytes(MAGIC);
    if cfg.compact {
        out.put_u8(COMPACT);
        out.put_u32(layout_digest(delta));
    } else {
        out.put_u8(VERSION);
        out.put_varint(delta.len() as u64);
    }
    let mut new_residual = Weights::new();
    for (name, t) in delta {
        let n = t.len();
        let mut v = t.data.clone();
        if let Some(r) = residual.get(name) {
            v.iter_mut().zip(&r.data).for_each(|(a, b)| *a += b);
        }
        let k = if cfg.topk_fraction >= 1.0 {
            n
        } else {
            ((n as f64 * f64::from(cfg.topk_fraction)).ceil() as usize).clamp(1.min(n), n)
        };
        let indices: Vec<usize> = if k == n {
            (0..n).collect()
        } else {
            let mut idx: Vec<usize> = (0..n).collect();
            // Largest |v| first; ties broken by index so the choice is deterministic.
            idx.select_nth_unstable_by(k - 1, |&a, &b| {
                v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b))
            });
            idx.truncate(k);
            idx.sort_unstable();
            idx
        };
        let chosen: Vec<f32> = indices.iter().map(|&i| v[i]).collect();
        let (sent, scale, payload) = if cfg.bits == 32 {
            let bytes = chosen
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>();
            (chosen.clone(), 0.0f32, bytes)
        } else if cfg.bits == 1 {
            let scale = if chosen.is_empty() {
                0.0
            } else {
                (chosen.iter().map(|x| f64::from(x.abs())).sum::<f64>() / chosen.len() as f64)
                    as f32
            };
            let signs: Vec<bool> = chosen.iter().map(|x| *x >= 0.0).collect();
            let sent: Vec<f32> = signs
                .iter()
                .map(|&p| if p { scale } else { -scale })
                .collect();
            (sent, scale, pack_bits(&signs))
        } else {
            let (q, p) = quantize_stochastic(&chosen, cfg.bits, rng);
            (dequantize(&q, &p), p.scale, pack(&q, cfg.bits))
        };
        // Error feedback: what was not sent (or sent imprecisely) is carried to next round.
        let mut r = v;
        for (&i, s) in indices.iter().zip(&sent) {
            r[i] -= s;
        }
        new_residual.insert(
            name.clone(),
            Tensor {
                shape: t.shape.clone(),
                data: r,
            },
        );

        if !cfg.compact {
            out.put_header(name, &t.shape);
        }
        let rice = if k != n && cfg.entropy {
            rice_gaps(&indices).filter(|(_, b)| {
                let mut varints = Vec::new();
                varints.put_gaps(indices.iter().copied());
                b.len() + 1 < varints.len()
            })
        } else {
            None
        };
        out.put_u8(match (k == n, &rice) {
            (true, _) => DENSE,
            (false, None) => TOPK,
            (false, Some(_)) => TOPK_RICE,
        });
        out.put_u8(cfg.bits);
        out.put_f32(scale);
        if k != n {
            out.put_varint(k as u64);
            match rice {
                Some((r, bits)) => {
                    out.put_u8(r);
                    out.put_bytes(&bits);
                }
                None => out.put_gaps(indices.iter().copied()),
            }
        }
        out.put_bytes(&payload);
    }
    *residual = new_residual;
    Ok(out)
}

/// Bits written LSB-first into bytes.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    bit: usize,
}

impl BitWriter {
    fn push(&mut self, one: bool) {
        if self.bit.is_multiple_of(8) {
            self.out.push(0);
        }
        if one {
            *self.out.last_mut().expect("pushed above") |= 1 << (self.bit % 8);
        }
        self.bit += 1;
    }
}

/// One bit per flag, LSB-first.
fn pack_bits(flags: &[bool]) -> Vec<u8> {
    let mut w = BitWriter::default();
    flags.iter().for_each(|&f| w.push(f));
    w.out
}

/// The gaps of sorted distinct `indices` Golomb–Rice coded with the best parameter:
/// `(r, bytes)`, or `None` for no indices.
fn rice_gaps(indices: &[usize]) -> Option<(u8, Vec<u8>)> {
    if indices.is_empty() {
        return None;
    }
    let mut gaps = Vec::with_capacity(indices.len());
    let mut next = 0usize;
    for &i in indices {
        gaps.push((i - next) as u64);
        next = i + 1;
    }
    let cost = |r: u8| -> u64 { gaps.iter().map(|g| (g >> r) + 1 + u64::from(r)).sum() };
    let r = (0..=MAX_RICE).min_by_key(|&r| (cost(r), r))?;
    let mut w = BitWriter::default();
    for g in gaps {
        for _ in 0..g >> r {
            w.push(true);
        }
        w.push(false);
        for b in 0..r {
            w.push(g >> b & 1 == 1);
        }
    }
    Some((r, w.out))
}

/// Reads `count` Rice-coded gaps (parameter `r`) from the front of `bytes` as positions
/// below `n`; returns them and the bytes used (whole bytes). Never reads past `bytes`.
fn read_rice(bytes: &[u8], count: usize, n: usize, r: u8) -> Result<(Vec<usize>, usize), String> {
    if count > n {
        return Err(format!("{count} positions in {n} values"));
    }
    // Every gap takes at least r + 1 bits: a count beyond that is refused before allocating.
    if count.saturating_mul(usize::from(r) + 1) > bytes.len().saturating_mul(8) {
        return Err(format!("{count} positions in {} bytes", bytes.len()));
    }
    let total = bytes.len() * 8;
    let mut bit = 0usize;
    let read = |bit: &mut usize| -> Result<bool, String> {
        if *bit >= total {
            return Err("positions truncated".into());
        }
        let v = bytes[*bit / 8] >> (*bit % 8) & 1 == 1;
        *bit += 1;
        Ok(v)
    };
    let mut out = Vec::with_capacity(count);
    let mut next = 0usize;
    for _ in 0..count {
        let mut q = 0usize;
        while read(&mut bit)? {
            q += 1;
            // Past the tensor's size already: refuse early (bounded work either way).
            if q > n {
                return Err(format!("position beyond {n}"));
            }
        }
        let mut low = 0usize;
        for b in 0..r {
            if read(&mut bit)? {
                low |= 1 << b;
            }
        }
        let gap = q
            .checked_shl(u32::from(r))
            .filter(|g| g >> r == q)
            .and_then(|g| g.checked_add(low))
            .ok_or_else(|| format!("position beyond {n}"))?;
        let i = next
            .checked_add(gap)
            .filter(|&i| i < n)
            .ok_or_else(|| format!("position beyond {n}"))?;
        out.push(i);
        next = i + 1;
    }
    Ok((out, bit.div_ceil(8)))
}

/// Packs symmetric codes as `q + 2^(bits-1)` in `bits` bits each, LSB-first.
fn pack(q: &[i32], bits: u8) -> Vec<u8> {
    let offset = 1i32 << (bits - 1);
    let mut out = vec![0u8; (q.len() * bits as usize).div_ceil(8)];
    let mut bit = 0usize;
    for &c in q {
        let u = (c + offset) as u32;
        for b in 0..bits as usize {
            if u >> b & 1 == 1 {
                out[(bit + b) / 8] |= 1 << ((bit + b) % 8);
            }
        }
        bit += bits as usize;
    }
    out
}

fn unpack(bytes: &[u8], n: usize, bits: u8) -> Result<Vec<i32>, ModelError> {
    let offset = 1i32 << (bits - 1);
    let qmax = offset - 1;
    let mut out = Vec::with_capacity(n);
    let mut bit = 0usize;
    for _ in 0..n {
        let mut u = 0u32;
        for b in 0..bits as usize {
            u |= u32::from(bytes[(bit + b) / 8] >> ((bit + b) % 8) & 1) << b;
        }
        bit += bits as usize;
        let c = u as i32 - offset;
        if c.abs() > qmax {
            return Err(ModelError::Codec(format!("code {c} outside ±{qmax}")));
        }
        out.push(c);
    }
    Ok(out)
}

/// Decodes bytes produced by [`encode_update`] with the self-describing layout (version 1)
/// into the (dequantized) sent delta; unsent top-k positions are 0. A compact update
/// (version 2) needs the model's layout: [`decode_update_for`]. Malformed input is an
/// error, never a panic.
pub fn decode_update(bytes: &[u8]) -> Result<Weights, ModelError> {
    decode(bytes, None)
}

/// Decodes an update of either layout for a model whose tensors are `layout` (names and
/// shapes; values unused): a compact update takes its names and shapes from it (and must
/// carry its digest), a self-describing one is decoded as by [`decode_update`] (checking
/// it against the model is the caller's business, as before).
pub fn decode_update_for(bytes: &[u8], layout: &Weights) -> Result<Weights, ModelError> {
    decode(bytes, Some(layout))
}

/// CRC-32 of the tensor names and shapes, in order: what a compact update is for.
pub fn layout_digest(layout: &Weights) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (name, t) in layout {
        let mut b = Vec::new();
        b.put_header(name, &t.shape);
        h.update(&b);
    }
    h.finalize()
}

fn decode(bytes: &[u8], layout: Option<&Weights>) -> Result<Weights, ModelError> {
    let mut r = Reader::new(bytes);
    r.expect(MAGIC, "a Hearth update")?;
    let version = r.u8()?;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut budget = MAX_ELEMENTS;
    match (version, layout) {
        (VERSION, _) => {
            // Every tensor takes at least 8 bytes, which bounds the count by the input size.
            let count = r.usize("tensor count", bytes.len() / 8)?;
            for _ in 0..count {
                let (name, shape) = r.header(MAX_DIMS, budget)?;
                let n = shape.iter().product::<usize>();
                budget -= n;
                let data = tensor_body(&mut r, &name, n)?;
                if out.insert(name.clone(), Tensor { shape, data }).is_some() {
                    return Err(ModelError::Codec(format!("tensor {name} appears twice")));
                }
            }
        }
        (COMPACT, Some(layout)) => {
            let digest = r.u32()?;
            if digest != layout_digest(layout) {
                return Err(ModelError::Codec(
                    "a compact update for another model layout".into(),
                ));
            }
            for (name, t) in layout {
                let n = t.shape.iter().product::<usize>();
                if n > budget {
                    return Err(ModelError::Codec(format!(
                        "the layout exceeds {MAX_ELEMENTS} values"
                    )));
                }
                budget -= n;
                let data = tensor_body(&mut r, name, n)?;
                out.insert(
                    name.clone(),
                    Tensor {
                        shape: t.shape.clone(),
                        data,
                    },
                );
            }
        }
        (COMPACT, None) => {
            return Err(ModelError::Codec(
                "a compact update needs the model's layout to decode".into(),
            ))
        }
        (v, _) => {
            return Err(ModelError::Codec(format!("unsupported update version {v}")));
        }
    }
    r.finish()?;
    Ok(out)
}

/// One tensor's encoding, bits, scale, positions and values (after its header), `n` values.
fn tensor_body(r: &mut Reader<'_>, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let encoding = r.u8()?;
    let bits = r.u8()?;
    if !valid_bits(u32::from(bits)) {
        return Err(ModelError::Codec(format!(
            "tensor {name}: unsupported bits {bits}"
        )));
    }
    let scale = r.f32()?;
    // The largest code times the scale must stay finite, as 32-bit values must.
    let max_code = match bits {
        32 => 0,
        1 => 1,
        b => (1u32 << (b - 1)) - 1,
    };
    let overflows = !(scale * max_code as f32).is_finite();
    if !scale.is_finite() || scale < 0.0 || overflows {
        return Err(ModelError::Codec(format!(
            "tensor {name}: bad scale {scale}"
        )));
    }
    let indices: Option<Vec<usize>> = match encoding {
        DENSE => None,
        TOPK => {
            // Each index takes at least one byte: bounded by what is left.
            let k = r.usize("k", n.min(r.remaining()))?;
            Some(
                r.gaps(k, n)
                    .map_err(|e| ModelError::Codec(format!("tensor {name}: {e}")))?,
            )
        }
        TOPK_RICE => {
            // Each index takes at least one bit: bounded by what is left.
            let k = r.usize("k", n.min(r.remaining().saturating_mul(8)))?;
            let rp = r.u8()?;
            if rp > MAX_RICE {
                return Err(ModelError::Codec(format!(
                    "tensor {name}: Rice parameter {rp} above {MAX_RICE}"
                )));
            }
            let (idx, used) = read_rice(r.rest(), k, n, rp)
                .map_err(|e| ModelError::Codec(format!("tensor {name}: {e}")))?;
            r.take(used)?;
            Some(idx)
        }
        e => {
            return Err(ModelError::Codec(format!(
                "tensor {name}: unknown encoding {e}"
            )))
        }
    };
    let m = indices.as_ref().map_or(n, Vec::len);
    let values: Vec<f32> = if bits == 1 {
        let packed = r.take(m.div_ceil(8))?;
        (0..m)
            .map(|i| {
                if packed[i / 8] >> (i % 8) & 1 == 1 {
                    scale
                } else {
                    -scale
                }
            })
            .collect()
    } else if bits == 32 {
        let v = r.f32s(m)?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::Codec(format!(
                "tensor {name}: non-finite value"
            )));
        }
        v
    } else {
        let packed = r.take((m * bits as usize).div_ceil(8))?;
        let q = unpack(packed, m, bits)?;
        dequantize(
            &q,
            &QuantParams {
                scale,
                zero_point: 0,
                bits,
            },
        )
    };
    let data = match indices {
        None => values,
        Some(idx) => {
            let mut d = vec![0.0f32; n];
            for (i, v) in idx.into_iter().zip(values) {
                d[i] = v;
            }
            d
        }
    };
    Ok(data)
}

/// Scales `delta` down to L2 norm `max_norm` if it is larger; returns the norm before.
pub fn clip_l2(delta: &mut Weights, max_norm: f32) -> f32 {
    let norm = crate::tensor::l2_norm(delta);
    if norm.is_finite() && max_norm >= 0.0 && norm > max_norm && norm > 0.0 {
        let f = max_norm / norm;
        delta
            .values_mut()
            .for_each(|t| t.data.iter_mut().for_each(|v| *v *= f));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::l2_norm;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn delta(seed: u64) -> Weights {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w = Weights::new();
        for (name, shape) in [
            ("fc0.weight", vec![64, 128]),
            ("fc0.bias", vec![64]),
            ("fc1.weight", vec![11, 64]),
            ("fc1.bias", vec![11]),
        ] {
            let n = shape.iter().product();
            w.insert(
                name.to_string(),
                Tensor::new(shape, (0..n).map(|_| rng.gen_range(-0.05..0.05)).collect()),
            );
        }
        w
    }

    fn fp32_bytes(w: &Weights) -> usize {
        4 * crate::tensor::num_params(w)
    }

    #[test]
    fn dense_round_trip_error_is_bounded() {
        let d = delta(1);
        let mut rng = StdRng::seed_from_u64(2);
        for bits in [8u8, 4, 2] {
            let mut res = Weights::new();
            let bytes = encode_update(
                &d,
                &mut res,
                &CodecConfig {
                    bits,
                    topk_fraction: 1.0,
                    entropy: true,
                    compact: false,
                },
                &mut rng,
            )
            .unwrap();
            let back = decode_update(&bytes).unwrap();
            assert_eq!(
                back.keys().collect::<Vec<_>>(),
                d.keys().collect::<Vec<_>>()
            );
            for (name, t) in &d {
                let amax = t.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let step = amax / ((1 << (bits - 1)) - 1) as f32;
                assert_eq!(back[name].shape, t.shape);
                for ((a, b), r) in t.data.iter().zip(&back[name].data).zip(&res[name].data) {
                    assert!(
                        (a - b).abs() <= step * 1.0001,
                        "{name} bits {bits}: {a} vs {b}"
                    );
                    // Residual property: sent + residual == v (= delta, residual was empty).
                    assert!((b + r - a).abs() < 1e-6);
                }
            }
        }
        let mut res = Weights::new();
        let exact = decode_update(
            &encode_update(
                &d,
                &mut res,
                &CodecConfig {
                    bits: 32,
                    topk_fraction: 1.0,
                    entropy: true,
                    compact: false,
                },
                &mut rng,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(exact, d);
        assert!(l2_norm(&res) == 0.0);
    }

    #[test]
    fn sizes_shrink_as_expected() {
        let d = delta(3);
        let mut rng = StdRng::seed_from_u64(4);
        let fp32 = fp32_bytes(&d);
        let size = |bits, topk_fraction, rng: &mut StdRng| {
            let mut res = Weights::new();
            encode_update(
                &d,
                &mut res,
                &CodecConfig {
                    bits,
                    topk_fraction,
                    entropy: true,
                    compact: false,
                },
                rng,
            )
            .unwrap()
            .len()
        };
        let dense8 = size(8, 1.0, &mut rng);
        let ratio = dense8 as f64 / fp32 as f64;
        assert!(
            (0.25..0.26).contains(&ratio),
            "8-bit dense is {ratio} of fp32"
        );
        let dense4 = size(4, 1.0, &mut rng);
        assert!((dense4 as f64 / fp32 as f64) < 0.13);
        let top10 = size(8, 0.1, &mut rng);
        assert!(top10 < dense8 / 4, "top-10% {top10} vs dense {dense8}");
        let top1_4 = size(4, 0.01, &mut rng);
        assert!(top1_4 < top10 / 5, "top-1% 4-bit {top1_4} vs {top10}");
    }

    #[test]
    fn topk_error_feedback_keeps_everything() {
        let d = delta(5);
        let mut rng = StdRng::seed_from_u64(6);
        let cfg = CodecConfig {
            bits: 8,
            topk_fraction: 0.05,
            entropy: true,
            compact: false,
        };
        let mut res = Weights::new();
        let mut sent_total = Weights::new();
        for round in 0..3 {
            let prev = res.clone();
            let bytes = encode_update(&d, &mut res, &cfg, &mut rng).unwrap();
            let sent = decode_update(&bytes).unwrap();
            for (name, t) in &d {
                let nz = sent[name].data.iter().filter(|v| **v != 0.0).count();
                assert!(
                    nz <= (t.len() as f32 * 0.05).ceil() as usize,
                    "{name}: {nz} sent"
                );
                for (i, v) in t.data.iter().enumerate() {
                    let before = prev.get(name).map_or(0.0, |r| r.data[i]);
                    // sent + residual == delta + previous residual.
                    assert!(
                        (sent[name].data[i] + res[name].data[i] - (v + before)).abs() < 1e-6,
                        "round {round}"
                    );
                }
            }
            if sent_total.is_empty() {
                sent_total = sent;
            } else {
                crate::tensor::axpy(&mut sent_total, 1.0, &sent).unwrap();
            }
        }
        // Over rounds, sent + residual tracks 3 × delta exactly.
        let mut total = sent_total.clone();
        crate::tensor::axpy(&mut total, 1.0, &res).unwrap();
        let mut three = d.clone();
        crate::tensor::axpy(&mut three, 2.0, &d).unwrap();
        let diff = crate::tensor::sub(&total, &three).unwrap();
        assert!(l2_norm(&diff) < 1e-4);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let d = delta(7);
        let mut rng = StdRng::seed_from_u64(8);
        for cfg in [
            CodecConfig {
                bits: 8,
                topk_fraction: 1.0,
                entropy: true,
                compact: false,
            },
            CodecConfig {
                bits: 4,
                topk_fraction: 0.1,
                entropy: false,
                compact: false,
            },
            CodecConfig::topk(4, 0.1),
            CodecConfig::topk(1, 0.03),
        ] {
            let mut res = Weights::new();
            let bytes = encode_update(&d, &mut res, &cfg, &mut rng).unwrap();
            let decode_update = |b: &[u8]| decode_update_for(b, &d);
            assert!(decode_update(&bytes).is_ok());
            // A compact update is unreadable without its layout, and for another layout.
            if cfg.compact {
                assert!(super::decode_update(&bytes).is_err());
                // Same shapes in the same order, another name: only the digest tells.
                let mut other = d.clone();
                let t = other.remove("fc1.bias").unwrap();
                other.insert("fc1.bias2".into(), t);
                let e = decode_update_for(&bytes, &other).unwrap_err().to_string();
                assert!(e.contains("another model layout"), "{e}");
            }
            for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
                assert!(decode_update(&bytes[..cut]).is_err(), "truncated at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode_update(&longer).is_err());
            // Flipping bytes must never panic; flips in the header must be rejected.
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0xff;
                let _ = decode_update(&b);
            }
            for i in 0..5 {
                let mut b = bytes.clone();
                b[i] ^= 0x01;
                assert!(decode_update(&b).is_err());
            }
            for _ in 0..2000 {
                let mut b = bytes.clone();
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
                let _ = decode_update(&b);
            }
        }
        assert!(decode_update(&[]).is_err());
        // A huge claimed dimension is refused without allocating.
        let mut evil = b"HUPD\x01\x01\x01a\x02".to_vec();
        evil.put_varint(1 << 27);
        evil.put_varint(1 << 27);
        assert!(decode_update(&evil).is_err());
        let mut bad = d.clone();
        bad.get_mut("fc0.bias").unwrap().data[0] = f32::NAN;
        assert!(
            encode_update(&bad, &mut Weights::new(), &CodecConfig::default(), &mut rng).is_err()
        );
        assert!(encode_update(
            &d,
            &mut Weights::new(),
            &CodecConfig {
                bits: 9,
                topk_fraction: 1.0,
                entropy: true,
                compact: false
            },
            &mut rng
        )
        .is_err());
    }

    #[test]
    fn rice_positions_and_sign_values_round_trip_and_are_smaller() {
        let d = delta(21);
        for (bits, frac) in [(1u8, 0.01f32), (1, 0.1), (2, 0.03), (4, 0.3), (8, 0.1)] {
            let mut sizes = Vec::new();
            let mut sent = Vec::new();
            for entropy in [false, true] {
                let mut rng = StdRng::seed_from_u64(22);
                let mut res = Weights::new();
                let cfg = CodecConfig {
                    bits,
                    topk_fraction: frac,
                    entropy,
                    compact: false,
                };
                let bytes = encode_update(&d, &mut res, &cfg, &mut rng).unwrap();
                let back = decode_update(&bytes).unwrap();
                for (name, t) in &d {
                    for ((s, r), v) in back[name].data.iter().zip(&res[name].data).zip(&t.data) {
                        assert!((s + r - v).abs() < 1e-6, "{name}");
                    }
                }
                sizes.push(bytes.len());
                sent.push(back);
            }
            // The same values at the same positions, in fewer bytes.
            assert_eq!(sent[0], sent[1], "bits {bits} top {frac}");
            assert!(
                sizes[1] < sizes[0],
                "bits {bits} top {frac}: Rice {} vs varint {}",
                sizes[1],
                sizes[0]
            );
            if bits == 1 {
                // Sign times the mean magnitude of the kept values.
                for (name, t) in &sent[1] {
                    let nz: Vec<f32> = t.data.iter().copied().filter(|v| *v != 0.0).collect();
                    assert!(nz.iter().all(|v| v.abs() == nz[0].abs()), "{name}");
                }
            }
        }
    }

    #[test]
    fn malformed_rice_positions_are_errors() {
        let d = delta(23);
        let mut rng = StdRng::seed_from_u64(24);
        let bytes = encode_update(
            &d,
            &mut Weights::new(),
            &CodecConfig::topk(1, 0.02),
            &mut rng,
        )
        .unwrap();
        assert!(decode_update_for(&bytes, &d).is_ok());
        for cut in 0..bytes.len() {
            assert!(
                decode_update_for(&bytes[..cut], &d).is_err(),
                "truncated at {cut}"
            );
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = decode_update_for(&b, &d);
            }
        }
        // A unary run past the tensor's size, and a Rice parameter above the bound.
        let mut b = Vec::new();
        b.put_bytes(MAGIC);
        b.put_u8(VERSION);
        b.put_varint(1);
        b.put_header("t", &[16]);
        b.put_u8(TOPK_RICE);
        b.put_u8(8);
        b.put_f32(1.0);
        b.put_varint(1);
        b.put_u8(0);
        b.put_bytes(&[0xff, 0xff, 0xff]);
        b.put_u8(0);
        let e = decode_update(&b).unwrap_err().to_string();
        assert!(e.contains("beyond"), "{e}");
        let at = b.len() - 5;
        b[at] = MAX_RICE + 1;
        let e = decode_update(&b).unwrap_err().to_string();
        assert!(e.contains("Rice parameter"), "{e}");
    }

    #[test]
    fn clipping() {
        let mut d = delta(9);
        let before = l2_norm(&d);
        assert_eq!(clip_l2(&mut d, before * 2.0), before);
        assert!((l2_norm(&d) - before).abs() < 1e-6);
        assert_eq!(clip_l2(&mut d, 0.5), before);
        assert!((l2_norm(&d) - 0.5).abs() < 1e-4);
    }

    /// A random small update: 1–4 tensors of random shapes (some empty), values over a few
    /// orders of magnitude.
    fn random_delta(rng: &mut StdRng) -> Weights {
        let mut w = Weights::new();
        for t in 0..rng.gen_range(1..5) {
            let shape: Vec<usize> = (0..rng.gen_range(0..4))
                .map(|_| rng.gen_range(0..9))
                .collect();
            let n = shape.iter().product();
            let scale = 10f32.powi(rng.gen_range(-4..3));
            let data = (0..n).map(|_| rng.gen_range(-1.0..1.0) * scale).collect();
            w.insert(format!("t{t}"), Tensor::new(shape, data));
        }
        w
    }

    #[test]
    fn property_round_trip_over_random_updates() {
        let mut rng = StdRng::seed_from_u64(0xc0dec);
        for _ in 0..300 {
            let d = random_delta(&mut rng);
            let bits = [1, 2, 3, 4, 5, 6, 7, 8, 32][rng.gen_range(0..9)];
            let cfg = CodecConfig {
                bits,
                topk_fraction: rng.gen_range(0.01..=1.0),
                entropy: rng.gen(),
                compact: rng.gen(),
            };
            let mut residual = Weights::new();
            let bytes = encode_update(&d, &mut residual, &cfg, &mut rng).unwrap();
            let sent = decode_update_for(&bytes, &d).unwrap();
            // Error feedback is exact: what was sent plus what is kept is the delta.
            for (name, t) in &d {
                assert_eq!(sent[name].shape, t.shape);
                let r = &residual[name];
                for ((s, r), v) in sent[name].data.iter().zip(&r.data).zip(&t.data) {
                    assert!((s + r - v).abs() <= 1e-5 * v.abs().max(1.0), "{name}");
                }
            }
            if bits == 32 && cfg.topk_fraction >= 1.0 {
                assert_eq!(sent, d);
            }
        }
    }

    #[test]
    fn property_arbitrary_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0xbad);
        let d = delta(11);
        let mut res = Weights::new();
        let cfg = CodecConfig {
            bits: 4,
            topk_fraction: 0.2,
            entropy: true,
            compact: false,
        };
        let good = encode_update(&d, &mut res, &cfg, &mut rng).unwrap();
        for _ in 0..2000 {
            // Random bytes after the magic, and the real update with a few bytes changed.
            let mut b = b"HUPD\x01".to_vec();
            b.extend((0..rng.gen_range(0..64)).map(|_| rng.gen::<u8>()));
            let _ = decode_update(&b);
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let _ = decode_update(&b);
        }
        // The compact layout: random bodies after a valid digest, and a mutated real update.
        let good = encode_update(&d, &mut res, &CodecConfig::topk(2, 0.1), &mut rng).unwrap();
        for _ in 0..2000 {
            let mut b = b"HUPD\x02".to_vec();
            b.put_u32(layout_digest(&d));
            b.extend((0..rng.gen_range(0..64)).map(|_| rng.gen::<u8>()));
            let _ = decode_update_for(&b, &d);
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let _ = decode_update_for(&b, &d);
        }
    }

    #[test]
    fn declared_sizes_are_bounded_in_total() {
        // Regression: many top-k tensors that each declare 2^24 values but send none made
        // a few dozen bytes decode into gigabytes of zeros.
        let mut b = Vec::new();
        b.put_bytes(MAGIC);
        b.put_u8(VERSION);
        b.put_varint(4);
        for i in 0..4 {
            b.put_header(&format!("t{i}"), &[MAX_ELEMENTS / 2]);
            b.put_u8(TOPK);
            b.put_u8(8);
            b.put_f32(1.0);
            b.put_varint(0);
        }
        let e = decode_update(&b).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }

    #[test]
    fn a_scale_whose_codes_overflow_is_refused() {
        // Regression: a finite scale near f32::MAX times a code of 127 decoded to ±inf,
        // while 32-bit values that are not finite are refused.
        for (scale, ok) in [(f32::MAX, false), (3e36, false), (2e36, true), (1.0, true)] {
            let mut b = Vec::new();
            b.put_bytes(MAGIC);
            b.put_u8(VERSION);
            b.put_varint(1);
            b.put_header("t", &[2]);
            b.put_u8(DENSE);
            b.put_u8(8);
            b.put_f32(scale);
            b.put_bytes(&[255, 1]); // codes +127 and -127
            match decode_update(&b) {
                Ok(w) => {
                    assert!(ok, "scale {scale} decoded to {:?}", w["t"].data);
                    assert!(w["t"].data.iter().all(|v| v.is_finite()));
                }
                Err(e) => {
                    assert!(!ok, "scale {scale}: {e}");
                    assert!(e.to_string().contains("bad scale"), "{e}");
                }
            }
        }
    }
}
