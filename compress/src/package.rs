//! Hearth's compact model package: sparse + low-bit tensors with a manifest, for transport.
//! The agent decodes it exactly (bit for bit) into an ONNX model that tract runs.
//!
//! Layout (integers LEB128 varints unless noted, floats little-endian f32):
//! ```text
//! "HPKG" version:u8(=1) sha256[32] (of every byte after it)
//! skeleton_len skeleton        ONNX ModelProto with the packaged initializers' data removed
//! count                        manifest: one entry per packaged tensor
//!   name_len name ndim dims…
//!   kind:u8   0 = raw f32 | 1 = uniform | 2 = power-of-two | 3 = codebook
//!   kind 1: bits:u8 channels, then per channel scale:f32 zero_point:u8
//!   kind 2: bits:u8 max_exp:zigzag varint
//!   kind 3: bits:u8 levels_len levels:f32…
//!   layout:u8 0 = dense | 1 = sparse, varint index gaps | 2 = sparse, bitmap
//!   nnz payload_len sha256[32] (of the decoded tensor's f32 little-endian bytes)
//! payloads, in manifest order:
//!   dense:  n codes          sparse varint: nnz gaps (first index, then i - prev - 1), nnz codes
//!   bitmap: ceil(n/8) bytes of a 1-per-stored-position bitmap (LSB first), nnz codes
//!   codes: `bits` each, LSB-first (raw f32 tensors: 4 bytes per value)
//! ```
//! "Sparse" omits the positions whose code stands for exactly 0.0 (the zero point, the zero
//! magnitude, or the codebook's 0 level); the encoder picks the smallest layout per tensor.
//! Values are quantized with [`crate::quant::quantize_tensor`] and decoded with
//! [`crate::quant::QuantizedTensor::dequantize`], the same code as
//! [`crate::quant::fake_quantize`], so decoded weights equal the fake-quantized ones exactly.

use crate::quant::{quantize_tensor, Dequant, QuantScheme, QuantizedTensor};
use hearth_model::bytes::{Put, Reader};
use hearth_model::error::ModelError;
use hearth_model::onnx::OnnxModel;
use hearth_model::tensor::{Tensor, Weights};
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

const MAGIC: &[u8; 4] = b"HPKG";
const VERSION: u8 = 1;
/// Refuse packages holding more than this many values in total (16 Mi: 64 MiB of f32, far
/// above any model a home device runs) or deeper tensors. Sparse layouts only declare a
/// tensor's size, so this bounds what a small package can make the decoder allocate.
pub const MAX_ELEMENTS: usize = 1 << 24;
const MAX_DIMS: usize = 8;
const KIND_RAW: u8 = 0;
const KIND_UNIFORM: u8 = 1;
const KIND_POW2: u8 = 2;
const KIND_LEVELS: u8 = 3;
const LAYOUT_DENSE: u8 = 0;
const LAYOUT_GAPS: u8 = 1;
const LAYOUT_BITMAP: u8 = 2;

/// Quantization scheme per initializer name (tensors not listed travel as raw f32).
pub type Schemes = BTreeMap<String, QuantScheme>;

fn codec(msg: impl Into<String>) -> ModelError {
    ModelError::Codec(msg.into())
}

/// Packs unsigned codes of `bits` (1..=8) bits each, LSB-first.
fn pack_codes(codes: &[u32], bits: u8) -> Vec<u8> {
    let bits = bits as usize;
    let mut out = vec![0u8; (codes.len() * bits).div_ceil(8)];
    for (k, &c) in codes.iter().enumerate() {
        let bit = k * bits;
        for b in 0..bits {
            if c >> b & 1 == 1 {
                out[(bit + b) / 8] |= 1 << ((bit + b) % 8);
            }
        }
    }
    out
}

fn unpack_codes(bytes: &[u8], n: usize, bits: u8) -> Vec<u32> {
    let bits = bits as usize;
    (0..n)
        .map(|k| {
            let bit = k * bits;
            (0..bits).fold(0u32, |u, b| {
                u | u32::from(bytes[(bit + b) / 8] >> ((bit + b) % 8) & 1) << b
            })
        })
        .collect()
}

fn zigzag(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn unzigzag(v: u64) -> i32 {
    let v = v as u32;
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

/// One tensor ready to write: its manifest header and payload.
struct Encoded {
    header: Vec<u8>,
    payload: Vec<u8>,
}

/// Chooses the smallest layout for the positions `keep` (sorted) out of `n`, each stored
/// with `unit` bytes of packed value via `values`.
fn layout_payload(n: usize, keep: &[usize], values: impl Fn(&[usize]) -> Vec<u8>) -> (u8, Vec<u8>) {
    let all: Vec<usize> = (0..n).collect();
    let dense = values(&all);
    let mut gaps = Vec::new();
    gaps.put_gaps(keep.iter().copied());
    let kept = values(keep);
    let gaps_len = gaps.len() + kept.len();
    let bitmap_len = n.div_ceil(8) + kept.len();
    if dense.len() <= gaps_len && dense.len() <= bitmap_len {
        (LAYOUT_DENSE, dense)
    } else if gaps_len <= bitmap_len {
        gaps.extend(kept);
        (LAYOUT_GAPS, gaps)
    } else {
        let mut bm = vec![0u8; n.div_ceil(8)];
        for &i in keep {
            bm[i / 8] |= 1 << (i % 8);
        }
        bm.extend(kept);
        (LAYOUT_BITMAP, bm)
    }
}

fn encode_tensor(name: &str, t: &Tensor, scheme: Option<&QuantScheme>) -> Encoded {
    let mut h = Vec::new();
    h.put_header(name, &t.shape);
    let n = t.len();
    let (decoded, keep, layout, payload) = match scheme {
        None => {
            h.push(KIND_RAW);
            let keep: Vec<usize> = (0..n).filter(|&i| t.data[i].to_bits() != 0).collect();
            let (layout, payload) = layout_payload(n, &keep, |idx| {
                idx.iter().flat_map(|&i| t.data[i].to_le_bytes()).collect()
            });
            (t.clone(), keep, layout, payload)
        }
        Some(s) => {
            let q = quantize_tensor(t, s);
            h.push(match q.dequant {
                Dequant::Uniform { .. } => KIND_UNIFORM,
                Dequant::PowerOfTwo { .. } => KIND_POW2,
                Dequant::Levels(_) => KIND_LEVELS,
            });
            h.push(q.bits);
            match &q.dequant {
                Dequant::Uniform { scale, zero_point } => {
                    h.put_varint(scale.len() as u64);
                    for (s, z) in scale.iter().zip(zero_point) {
                        h.extend_from_slice(&s.to_le_bytes());
                        h.push(*z as u8);
                    }
                }
                Dequant::PowerOfTwo { max_exp } => h.put_varint(zigzag(*max_exp)),
                Dequant::Levels(l) => {
                    h.put_varint(l.len() as u64);
                    for v in l {
                        h.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            let zero = zero_codes(&q);
            let per = n / zero.len().max(1);
            let keep: Vec<usize> = (0..n)
                .filter(|&i| q.codes[i] != zero[if zero.len() == 1 { 0 } else { i / per }])
                .collect();
            let (layout, payload) = layout_payload(n, &keep, |idx| {
                pack_codes(&idx.iter().map(|&i| q.codes[i]).collect::<Vec<_>>(), q.bits)
            });
            (q.dequantize(), keep, layout, payload)
        }
    };
    h.push(layout);
    h.put_varint(if layout == LAYOUT_DENSE {
        n
    } else {
        keep.len()
    } as u64);
    h.put_varint(payload.len() as u64);
    h.extend_from_slice(&tensor_digest(&decoded));
    Encoded { header: h, payload }
}

/// The code standing for 0.0 in each channel (one entry for per-tensor parameters); for a
/// codebook without a 0 level, a code no value uses (nothing is omitted).
fn zero_codes(q: &QuantizedTensor) -> Vec<u32> {
    match &q.dequant {
        Dequant::Uniform { zero_point, .. } => zero_point.iter().map(|&z| z as u32).collect(),
        Dequant::PowerOfTwo { .. } => vec![0],
        Dequant::Levels(l) => vec![l
            .iter()
            .position(|&v| v.to_bits() == 0)
            .map_or(u32::MAX, |p| p as u32)],
    }
}

fn tensor_digest(t: &Tensor) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in &t.data {
        h.update(v.to_le_bytes());
    }
    h.finalize().into()
}

/// Encodes `model` as a package: every f32 initializer, weights named in `schemes`
/// quantized with their scheme, the rest raw f32; `masks` (1 keep / 0 prune, by name) are
/// applied first so pruned weights are exactly 0 and take no space.
pub fn encode_package(
    model: &OnnxModel,
    schemes: &Schemes,
    masks: Option<&Weights>,
) -> Result<Vec<u8>, ModelError> {
    let mut weights = model.weights();
    for name in schemes.keys() {
        if !weights.contains_key(name) {
            return Err(ModelError::Shape(format!(
                "scheme for {name}, which is not an f32 initializer"
            )));
        }
    }
    if let Some(masks) = masks {
        for (name, m) in masks {
            let w = weights
                .get_mut(name)
                .ok_or_else(|| ModelError::Shape(format!("mask for unknown tensor {name}")))?;
            if m.shape != w.shape {
                return Err(ModelError::Shape(format!(
                    "mask {name}: shape {:?} vs {:?}",
                    m.shape, w.shape
                )));
            }
            for (v, &k) in w.data.iter_mut().zip(&m.data) {
                if k == 0.0 {
                    *v = 0.0;
                }
            }
        }
    }
    let mut skeleton = model.proto().clone();
    if let Some(g) = skeleton.graph.as_mut() {
        for init in g.initializer.iter_mut() {
            if weights.contains_key(&init.name) {
                init.raw_data.clear();
                init.float_data.clear();
            }
        }
    }
    let skeleton = skeleton.encode_to_vec();
    let mut body = Vec::new();
    body.put_varint(skeleton.len() as u64);
    body.extend_from_slice(&skeleton);
    body.put_varint(weights.len() as u64);
    let encoded: Vec<Encoded> = weights
        .iter()
        .map(|(name, t)| encode_tensor(name, t, schemes.get(name)))
        .collect();
    for e in &encoded {
        body.extend_from_slice(&e.header);
    }
    for e in &encoded {
        body.extend_from_slice(&e.payload);
    }
    let mut out = Vec::with_capacity(body.len() + 37);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// A manifest entry as read.
struct Entry {
    name: String,
    shape: Vec<usize>,
    bits: u8,
    dequant: Option<Dequant>,
    layout: u8,
    nnz: usize,
    payload_len: usize,
    digest: [u8; 32],
}

fn read_entry(r: &mut Reader<'_>, budget: &mut usize) -> Result<Entry, ModelError> {
    let (name, shape) = r.header(MAX_DIMS, *budget)?;
    let n: usize = shape.iter().product();
    *budget -= n;
    let kind = r.u8()?;
    let (bits, dequant) = match kind {
        KIND_RAW => (32, None),
        KIND_UNIFORM | KIND_POW2 | KIND_LEVELS => {
            let bits = r.u8()?;
            if !(1..=8).contains(&bits) {
                return Err(codec(format!("{name}: unsupported bits {bits}")));
            }
            let d = match kind {
                KIND_UNIFORM => {
                    let ch = r.usize("channels", n.max(1))?;
                    let (mut scale, mut zero_point) = (Vec::new(), Vec::new());
                    for _ in 0..ch {
                        scale.push(r.f32()?);
                        zero_point.push(i32::from(r.u8()?));
                    }
                    Dequant::Uniform { scale, zero_point }
                }
                KIND_POW2 => Dequant::PowerOfTwo {
                    max_exp: unzigzag(r.varint()?),
                },
                _ => {
                    let k = r.usize("codebook size", 1 << bits)?;
                    let levels = (0..k).map(|_| r.f32()).collect::<Result<Vec<_>, _>>()?;
                    Dequant::Levels(levels)
                }
            };
            (bits, Some(d))
        }
        k => return Err(codec(format!("{name}: unknown tensor kind {k}"))),
    };
    let layout = r.u8()?;
    if layout > LAYOUT_BITMAP {
        return Err(codec(format!("{name}: unknown layout {layout}")));
    }
    let nnz = r.usize("stored values", n)?;
    let payload_len = r.usize("payload length", r.remaining())?;
    let digest: [u8; 32] = r.array()?;
    Ok(Entry {
        name,
        shape,
        bits,
        dequant,
        layout,
        nnz,
        payload_len,
        digest,
    })
}

/// Positions stored in a payload and the rest of the payload (the values).
fn read_positions<'a>(
    e: &Entry,
    p: &'a [u8],
    n: usize,
) -> Result<(Vec<usize>, &'a [u8]), ModelError> {
    match e.layout {
        LAYOUT_DENSE => {
            if e.nnz != n {
                return Err(codec(format!(
                    "{}: dense with {} of {n} values",
                    e.name, e.nnz
                )));
            }
            // Sized before the positions are allocated: a dense payload holds every value.
            let want = if e.dequant.is_none() {
                n.checked_mul(4)
            } else {
                n.checked_mul(e.bits as usize).map(|b| b.div_ceil(8))
            };
            if want != Some(p.len()) {
                return Err(codec(format!(
                    "{}: {} payload bytes for {n} dense values",
                    e.name,
                    p.len()
                )));
            }
            Ok(((0..n).collect(), p))
        }
        LAYOUT_GAPS => {
            let mut r = Reader::new(p);
            let idx = r
                .gaps(e.nnz, n)
                .map_err(|err| codec(format!("{}: {err}", e.name)))?;
            Ok((idx, r.rest()))
        }
        _ => {
            let len = n.div_ceil(8);
            if p.len() < len {
                return Err(codec(format!("{}: truncated bitmap", e.name)));
            }
            let idx: Vec<usize> = (0..n).filter(|&i| p[i / 8] >> (i % 8) & 1 == 1).collect();
            if idx.len() != e.nnz {
                return Err(codec(format!(
                    "{}: bitmap has {} of {} values",
                    e.name,
                    idx.len(),
                    e.nnz
                )));
            }
            Ok((idx, &p[len..]))
        }
    }
}

fn decode_tensor(e: &Entry, payload: &[u8]) -> Result<Tensor, ModelError> {
    let n: usize = e.shape.iter().product();
    let (idx, values) = read_positions(e, payload, n)?;
    let t = match &e.dequant {
        None => {
            if values.len() != 4 * idx.len() {
                return Err(codec(format!(
                    "{}: {} value bytes for {} values",
                    e.name,
                    values.len(),
                    idx.len()
                )));
            }
            let mut data = vec![0.0f32; n];
            for (&i, c) in idx.iter().zip(values.chunks_exact(4)) {
                data[i] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            Tensor::new(e.shape.clone(), data)
        }
        Some(d) => {
            if values.len() != (idx.len() * e.bits as usize).div_ceil(8) {
                return Err(codec(format!(
                    "{}: {} code bytes for {} codes",
                    e.name,
                    values.len(),
                    idx.len()
                )));
            }
            let stored = unpack_codes(values, idx.len(), e.bits);
            let mut q = QuantizedTensor {
                shape: e.shape.clone(),
                bits: e.bits,
                codes: Vec::new(),
                dequant: d.clone(),
            };
            let zero = zero_codes(&q);
            if zero.len() > 1 && (e.shape.len() < 2 || e.shape[0] != zero.len()) {
                return Err(codec(format!(
                    "{}: {} channels for shape {:?}",
                    e.name,
                    zero.len(),
                    e.shape
                )));
            }
            if idx.len() != n && zero.iter().any(|&z| z >= 1 << e.bits) {
                return Err(codec(format!(
                    "{}: sparse tensor without a zero code",
                    e.name
                )));
            }
            let per = n / zero.len().max(1);
            let mut codes: Vec<u32> = (0..n)
                .map(|i| zero[if zero.len() == 1 { 0 } else { i / per }])
                .collect();
            for (&i, c) in idx.iter().zip(stored) {
                codes[i] = c;
            }
            q.codes = codes;
            q.validate()
                .map_err(|m| codec(format!("{}: {m}", e.name)))?;
            q.dequantize()
        }
    };
    if tensor_digest(&t) != e.digest {
        return Err(codec(format!(
            "{}: decoded values fail their sha256",
            e.name
        )));
    }
    Ok(t)
}

/// Decodes a package into the ONNX model it carries (weights exactly as encoded). Verifies
/// the package sha256, every tensor's sha256 and that each tensor matches the skeleton's
/// initializer. Malformed input is an error, never a panic.
pub fn decode_package(bytes: &[u8]) -> Result<OnnxModel, ModelError> {
    let mut r = Reader::new(bytes);
    r.expect(MAGIC, "a Hearth package")?;
    let version = r.u8()?;
    if version != VERSION {
        return Err(codec(format!("unsupported package version {version}")));
    }
    let digest = r.take(32)?;
    if Sha256::digest(r.rest()).as_slice() != digest {
        return Err(codec("package sha256 mismatch"));
    }
    let skel_len = r.usize("skeleton length", bytes.len())?;
    let mut skeleton = pb::ModelProto::decode(r.take(skel_len)?)?;
    let count = r.usize("tensor count", bytes.len() / 8)?;
    let mut budget = MAX_ELEMENTS;
    let entries = (0..count)
        .map(|_| read_entry(&mut r, &mut budget))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tensors = BTreeMap::new();
    for e in &entries {
        let payload = r.take(e.payload_len)?;
        let t = decode_tensor(e, payload)?;
        if tensors.insert(e.name.clone(), t).is_some() {
            return Err(codec(format!("tensor {} appears twice", e.name)));
        }
    }
    r.finish()?;
    let g = skeleton
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Onnx("package skeleton has no graph".into()))?;
    let mut filled = 0;
    for init in g.initializer.iter_mut() {
        if let Some(t) = tensors.get(&init.name) {
            let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            if init.dims != dims || init.data_type != DataType::Float as i32 {
                return Err(codec(format!(
                    "tensor {} does not match the skeleton",
                    init.name
                )));
            }
            init.raw_data = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            filled += 1;
        }
    }
    if filled != tensors.len() {
        return Err(codec("package tensors missing from the skeleton"));
    }
    OnnxModel::from_bytes(&skeleton.encode_to_vec())
}

#[cfg(test)]
mod tests {
    //! Properties over many random small models (seeded, fast): every scheme and sparsity
    //! round-trips exactly; arbitrary and mutated bytes are an error, never a panic; and the
    //! regressions found by fuzzing (`fuzz/`, `./scripts/fuzz.sh`) stay fixed.
    use super::*;
    use crate::codebook::CodebookKind;
    use crate::quant::{fake_quantize, Granularity};
    use hearth_model::onnx::MlpSpec;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn model(rng: &mut StdRng) -> OnnxModel {
        let spec = MlpSpec {
            task: "t".into(),
            input_len: rng.gen_range(1..12),
            hidden: (0..rng.gen_range(0..3))
                .map(|_| rng.gen_range(1..10))
                .collect(),
            classes: (0..rng.gen_range(2..5)).map(|i| format!("c{i}")).collect(),
        };
        OnnxModel::build_mlp(&spec, rng.gen())
    }

    fn scheme(rng: &mut StdRng) -> QuantScheme {
        let granularity = if rng.gen() {
            Granularity::PerTensor
        } else {
            Granularity::PerChannel
        };
        match rng.gen_range(0..5) {
            0 => QuantScheme::Affine {
                bits: rng.gen_range(2..=8),
                granularity,
            },
            1 => QuantScheme::Symmetric {
                bits: rng.gen_range(2..=8),
                granularity,
            },
            2 => QuantScheme::PowerOfTwo {
                bits: rng.gen_range(2..=6),
            },
            3 => QuantScheme::Codebook {
                bits: rng.gen_range(1..=4),
                kind: CodebookKind::GaussianQuantile,
            },
            _ => QuantScheme::Codebook {
                bits: rng.gen_range(1..=3),
                kind: CodebookKind::KMeans,
            },
        }
    }

    /// A package with a valid header around `body`.
    fn wrap(body: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.push(VERSION);
        b.extend_from_slice(&Sha256::digest(body));
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn random_models_round_trip_exactly() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..40 {
            let m = model(&mut rng);
            let w = m.weights();
            let mut schemes = Schemes::new();
            let mut masks = Weights::new();
            for (name, t) in &w {
                if rng.gen_bool(0.7) {
                    schemes.insert(name.clone(), scheme(&mut rng));
                }
                let keep = rng.gen_range(0.0..1.0);
                let data = (0..t.len())
                    .map(|_| f32::from(u8::from(rng.gen_bool(keep))))
                    .collect();
                masks.insert(name.clone(), Tensor::new(t.shape.clone(), data));
            }
            let pkg = encode_package(&m, &schemes, Some(&masks)).unwrap();
            let back = decode_package(&pkg).unwrap().weights();
            for (name, t) in &w {
                let mut masked = t.clone();
                for (v, k) in masked.data.iter_mut().zip(&masks[name].data) {
                    if *k == 0.0 {
                        *v = 0.0;
                    }
                }
                let want = match schemes.get(name) {
                    Some(s) => fake_quantize(&masked, s),
                    None => masked,
                };
                let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&back[name]), bits(&want), "{name}");
            }
        }
    }

    #[test]
    fn arbitrary_and_mutated_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut m = model(&mut rng);
        let w = m.weights();
        m.set_weights(&w).unwrap();
        let schemes: Schemes = w.keys().map(|n| (n.clone(), scheme(&mut rng))).collect();
        let pkg = encode_package(&m, &schemes, None).unwrap();
        for _ in 0..300 {
            // Random bodies behind a valid checksum, and the real body with a few bytes
            // changed (checksum fixed so the manifest and payload parsers see them).
            let len = rng.gen_range(0..200);
            let body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            assert!(decode_package(&wrap(&body)).is_err());
            let mut body = pkg[37..].to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..body.len());
                body[i] = rng.gen();
            }
            let _ = decode_package(&wrap(&body));
            let cut = rng.gen_range(0..pkg.len());
            assert!(decode_package(&pkg[..cut]).is_err());
        }
    }

    /// One-tensor package body: an empty skeleton, then a manifest entry from `entry`.
    fn one_tensor(entry: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let skeleton = pb::ModelProto::default().encode_to_vec();
        let mut b = Vec::new();
        b.put_varint(skeleton.len() as u64);
        b.extend_from_slice(&skeleton);
        b.put_varint(1);
        entry(&mut b);
        b
    }

    #[test]
    fn declared_sizes_do_not_allocate_before_they_are_checked() {
        // Regression: a dense 16 Mi-value tensor with a 0-byte payload made the
        // decoder collect 16 Mi positions before checking the payload length.
        let body = one_tensor(|b| {
            b.put_header("w", &[1 << 12, 1 << 12]);
            b.extend_from_slice(&[KIND_RAW, LAYOUT_DENSE]);
            b.put_varint(1 << 24);
            b.put_varint(0);
            b.extend_from_slice(&[0; 32]);
        });
        let e = decode_package(&wrap(&body)).unwrap_err().to_string();
        assert!(e.contains("payload bytes"), "{e}");
        // A total above the budget is refused from the manifest alone.
        let body = one_tensor(|b| b.put_header("w", &[MAX_ELEMENTS + 1]));
        let e = decode_package(&wrap(&body)).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        // A sparse tensor claiming more stored positions than its payload has bytes.
        let body = one_tensor(|b| {
            b.put_header("w", &[1 << 20]);
            b.extend_from_slice(&[KIND_RAW, LAYOUT_GAPS]);
            b.put_varint(1 << 20);
            b.put_varint(0);
            b.extend_from_slice(&[0; 32]);
        });
        assert!(decode_package(&wrap(&body)).is_err());
    }
}
