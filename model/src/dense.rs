//! Hearth's dense engine: batch-1 inference for the model family Hearth ships — a chain of
//! fully connected layers ending in an optional Softmax, either in float (Gemm + Relu) or in
//! the int8 QOperator form `qonnx` exports (QuantizeLinear → QLinearConv(k=1)… →
//! DequantizeLinear).
//!
//! Why it exists: at batch 1 these models are a few matrix × vector products of 10–100 k
//! multiply-adds, and a general graph runtime spends about as long on per-node work (packing
//! the input, allocating outputs, the plan's bookkeeping: ~0.5 µs per matrix product and
//! ~1 µs per call in tract 0.23.9) as on the products themselves, so pruning half the
//! neurons cannot halve the time there; tract also has no int8 matrix × vector kernel, so
//! its int8 plan is slower than its float one. Here each layer is one pass over weights
//! packed at load time into panels of rows, with the panel's sums held in vector registers
//! (a matrix × vector product is bound by streaming the weights, not by arithmetic). The
//! vector code is `pulp`'s: it picks AVX-512/AVX2 on x86-64 and NEON on aarch64 at run time,
//! with a scalar fallback; no `unsafe` here.
//!
//! int8 layers stay int8 in memory on x86-64 (AVX2 / AVX-512 BW): the product is `vpmaddwd`
//! on sign-extended weights and activation pairs, through `pulp`'s feature-checked (safe)
//! intrinsics, so an int8 model streams a quarter of the float model's bytes and runs faster
//! than it. Elsewhere the int8 weights are widened to f32 at load and the integer products are
//! done exactly in float lanes.
//!
//! The semantics are the ONNX operators': float outputs equal tract's up to summation order
//! (≤ 1e-6 on the test sets); int8 ones use the same integer products and round-half-to-even
//! requantisation, bit-identical to tract's on the test sets. A
//! [`Classifier`](crate::Classifier) builds this engine only when the graph is exactly that
//! chain *and* it agrees with tract on probe inputs; everything else runs in tract, and
//! batches always do (tract's matrix × matrix kernels are the right tool there).

use crate::error::ModelError;
use crate::onnx::OnnxModel;
use tract_onnx::pb::{self, tensor_proto::DataType};

/// Rows per weight panel for wide layers: 64 f32 accumulators are four AVX-512 (or eight
/// AVX2, sixteen NEON) registers, kept across the whole pass over the inputs.
const WIDE: usize = 64;
/// Rows per panel for narrow layers (the class logits), so they do not pay for 64 rows.
const NARROW: usize = 16;

/// A model in Hearth's dense engine.
#[derive(Clone, Debug)]
pub struct DenseNet {
    input_len: usize,
    outputs: usize,
    body: Body,
    softmax: bool,
}

#[derive(Clone, Debug)]
enum Body {
    F32(Vec<F32Layer>),
    Int8(Int8Chain),
}

/// `y = W x + b`, optionally Relu, with `W` packed into row panels.
#[derive(Clone, Debug)]
struct F32Layer {
    inputs: usize,
    outputs: usize,
    panel: usize,
    /// Panel `p` holds rows `p·panel…`, input-major: `w[p][j][r] = W[p·panel + r][j]`,
    /// zero-padded to whole panels.
    packed: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
}

/// QuantizeLinear → int8 layers → DequantizeLinear.
#[derive(Clone, Debug)]
struct Int8Chain {
    in_scale: f32,
    in_zero: i32,
    layers: Vec<Int8Layer>,
    out_scale: f32,
    out_zero: i32,
}

/// One QLinearConv(k=1): `y = sat(round_even((Σ (x−zx)·w + b) · sx·sw/sy) + zy)`, with the
/// input zero point folded into the bias (`b − zx·Σw`), so the product is `Σ x·w` alone.
///
/// On x86-64 with AVX2 (or AVX-512 BW) the weights stay int8 in memory, a quarter of the
/// float bytes, and the product is integer: `vpmaddwd` multiplies int8 weights (sign-extended
/// to i16) by pairs of int8 activations and adds each pair into an i32 lane ([`x86`]).
/// Elsewhere (aarch64 until an `SDOT` kernel is written, old x86) the weights are held widened
/// to f32 and multiplied in float lanes: every product and every partial sum over at most
/// [`EXACT_BLOCK`] inputs is an integer below 2^24, so that arithmetic is the integer one too,
/// exactly.
#[derive(Clone, Debug)]
struct Int8Layer {
    outputs: usize,
    panel: usize,
    weights: Int8Weights,
    bias: Vec<i32>,
    multiplier: Vec<f32>,
    out_zero: i32,
}

#[derive(Clone, Debug)]
enum Int8Weights {
    /// Row panels of input pairs, int8 (see [`x86::pack_pairs`]); `pairs` = ⌈inputs / 2⌉.
    #[cfg(target_arch = "x86_64")]
    Pairs { pairs: usize, packed: Vec<i8> },
    /// Input blocks of at most [`EXACT_BLOCK`]: (first input, inputs, row panels input-major
    /// as [`F32Layer::packed`], the int8 values as f32).
    Widened(Vec<(usize, usize, Vec<f32>)>),
}

impl Int8Layer {
    /// Packs row-major int8 weights `w` (`outputs × inputs`, as i64 from the initializer).
    fn new(
        w: &[i64],
        outputs: usize,
        inputs: usize,
        bias: Vec<i32>,
        multiplier: Vec<f32>,
        out_zero: i32,
    ) -> Int8Layer {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            let panel = panel_rows(outputs);
            let w8: Vec<i8> = w.iter().map(|&v| v.clamp(-128, 127) as i8).collect();
            return Int8Layer {
                outputs,
                panel,
                weights: Int8Weights::Pairs {
                    pairs: inputs.div_ceil(2),
                    packed: x86::pack_pairs(&w8, outputs, inputs, panel),
                },
                bias,
                multiplier,
                out_zero,
            };
        }
        Int8Layer::widened(w, outputs, inputs, bias, multiplier, out_zero)
    }

    /// The portable form: weights widened to f32 in exact blocks.
    fn widened(
        w: &[i64],
        outputs: usize,
        inputs: usize,
        bias: Vec<i32>,
        multiplier: Vec<f32>,
        out_zero: i32,
    ) -> Int8Layer {
        let blocks = (0..inputs)
            .step_by(EXACT_BLOCK)
            .map(|first| {
                let k = EXACT_BLOCK.min(inputs - first);
                let rows: Vec<f32> = (0..outputs)
                    .flat_map(|o| &w[o * inputs + first..o * inputs + first + k])
                    .map(|&v| v as f32)
                    .collect();
                (first, k, pack_f32(&rows, outputs, k).1)
            })
            .collect();
        Int8Layer {
            outputs,
            panel: panel_rows(outputs),
            weights: Int8Weights::Widened(blocks),
            bias,
            multiplier,
            out_zero,
        }
    }

    /// `acc[r] = Σ_j W[r][j]·q[j]` for int8 values `q` (held as floats), exactly.
    // Off x86-64 the match below has one arm.
    #[cfg_attr(
        not(target_arch = "x86_64"),
        allow(clippy::infallible_destructuring_match)
    )]
    fn product(&self, q: &[f32], acc: &mut Vec<i32>) {
        acc.clear();
        acc.resize(self.outputs, 0);
        let blocks = match &self.weights {
            #[cfg(target_arch = "x86_64")]
            Int8Weights::Pairs { pairs, packed } => {
                x86::product(packed, *pairs, self.panel, q, acc);
                return;
            }
            Int8Weights::Widened(blocks) => blocks,
        };
        let mut part = vec![0.0f32; self.outputs];
        for (first, k, packed) in blocks {
            pulp::Arch::new().dispatch(Gemv {
                packed,
                k: *k,
                panel: self.panel,
                x: &q[*first..first + k],
                y: &mut part,
            });
            for (a, p) in acc.iter_mut().zip(&part) {
                *a += *p as i32;
            }
        }
    }
}

impl DenseNet {
    /// The dense engine for `model`, or `None` when the graph is not a chain it runs exactly
    /// (any other op, attribute or layout: those models run in tract).
    pub fn from_model(model: &OnnxModel) -> Option<DenseNet> {
        float_chain(model).or_else(|| int8_chain(model))
    }

    /// Input vector length.
    pub fn input_len(&self) -> usize {
        self.input_len
    }

    /// Output vector length.
    pub fn output_len(&self) -> usize {
        self.outputs
    }

    /// Whether the weights are int8 (the QOperator chain).
    pub fn is_int8(&self) -> bool {
        matches!(self.body, Body::Int8(_))
    }

    /// The model's output (probabilities when the graph ends in Softmax) for one input.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        if x.len() != self.input_len {
            return Err(ModelError::Shape(format!(
                "input has {} values, model expects {}",
                x.len(),
                self.input_len
            )));
        }
        let mut out = match &self.body {
            Body::F32(layers) => run_f32(layers, x),
            Body::Int8(chain) => run_int8(chain, x),
        };
        if self.softmax {
            softmax(&mut out);
        }
        Ok(out)
    }
}

fn run_f32(layers: &[F32Layer], x: &[f32]) -> Vec<f32> {
    let mut cur = x.to_vec();
    for l in layers {
        let mut y = vec![0.0f32; l.outputs];
        pulp::Arch::new().dispatch(Gemv {
            packed: &l.packed,
            k: l.inputs,
            panel: l.panel,
            x: &cur,
            y: &mut y,
        });
        for (v, b) in y.iter_mut().zip(&l.bias) {
            *v += b;
            if l.relu && *v < 0.0 {
                *v = 0.0;
            }
        }
        cur = y;
    }
    cur
}

fn run_int8(c: &Int8Chain, x: &[f32]) -> Vec<f32> {
    // int8 activation values, held as (exact) floats for the product.
    let mut q: Vec<f32> = x
        .iter()
        .map(|&v| (round_even(v / c.in_scale) + c.in_zero as f32).clamp(-128.0, 127.0))
        .collect();
    let mut acc = Vec::new();
    for l in &c.layers {
        l.product(&q, &mut acc);
        q.clear();
        q.extend(
            acc.iter()
                .zip(&l.bias)
                .zip(&l.multiplier)
                .map(|((a, b), m)| {
                    (round_even((a + b) as f32 * m) + l.out_zero as f32).clamp(-128.0, 127.0)
                }),
        );
    }
    q.iter()
        .map(|&v| (v as i32 - c.out_zero) as f32 * c.out_scale)
        .collect()
}

/// One layer's matrix × vector product, run by `pulp` with the best instruction set found:
/// its `with_simd` is inlined into a function compiled for that set.
struct Gemv<'a> {
    packed: &'a [f32],
    k: usize,
    panel: usize,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl pulp::WithSimd for Gemv<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let (k, panel) = (self.k, self.panel);
        let mut res = [0.0f32; WIDE];
        for (out, cols) in self
            .y
            .chunks_mut(panel)
            .zip(self.packed.chunks_exact(panel * k))
        {
            if panel >= 4 * S::F32_LANES {
                for first in (0..panel).step_by(4 * S::F32_LANES) {
                    rows::<S, 4>(simd, cols, panel, first, self.x, &mut res);
                }
            } else {
                for first in (0..panel).step_by(S::F32_LANES) {
                    rows::<S, 1>(simd, cols, panel, first, self.x, &mut res);
                }
            }
            let n = out.len();
            out.copy_from_slice(&res[..n]);
        }
    }
}

/// Rows `first..first + V·lanes` of one panel (stored input-major) into `res`: one pass over
/// the inputs with `V` vector accumulators, a compile-time count, so they stay in registers
/// (four vectors for wide panels, one for narrow ones).
#[inline(always)]
fn rows<S: pulp::Simd, const V: usize>(
    simd: S,
    cols: &[f32],
    panel: usize,
    first: usize,
    x: &[f32],
    res: &mut [f32; WIDE],
) {
    let n = V * S::F32_LANES;
    let mut acc = [simd.splat_f32s(0.0); V];
    for (col, &xj) in cols.chunks_exact(panel).zip(x) {
        let (w, _) = S::as_simd_f32s(&col[first..first + n]);
        let w = &w[..V];
        let xs = simd.splat_f32s(xj);
        for (a, w) in acc.iter_mut().zip(w) {
            *a = simd.mul_add_f32s(*w, xs, *a);
        }
    }
    let (r, _) = S::as_mut_simd_f32s(&mut res[first..first + n]);
    for (d, a) in r.iter_mut().zip(acc) {
        *d = a;
    }
}

/// Inputs per exact block of the int8 product: |w·x| ≤ 128·128 = 2^14, so a sum of up to
/// 2^10 such integer products stays within 2^24, where every integer is an f32.
const EXACT_BLOCK: usize = 1 << 10;

/// Round half to even, as ONNX (Quantize)Linear ops do, for the ranges int8 needs: values
/// are clamped to ±2^20 first (all saturate anyway), where adding and subtracting 1.5·2^23
/// leaves exactly the rounded integer (IEEE round-to-nearest-even). Branch-free and no libm
/// call, so the loops around it vectorise.
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let v = v.clamp(-1_048_576.0, 1_048_576.0);
    (v + MAGIC) - MAGIC
}

/// ONNX QuantizeLinear to int8: `sat(round_even(x / s) + z)`.
#[cfg(test)]
fn quantize(x: f32, scale: f32, zero: i32) -> i16 {
    (round_even(x / scale) + zero as f32).clamp(-128.0, 127.0) as i16
}

/// Numerically stable softmax over the whole vector, in place.
fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

fn panel_rows(outputs: usize) -> usize {
    if outputs <= NARROW {
        NARROW
    } else {
        WIDE
    }
}

/// Packs row-major `w` (`outputs × inputs`) into `panel`-row panels, input-major.
fn pack_f32(w: &[f32], outputs: usize, inputs: usize) -> (usize, Vec<f32>) {
    let panel = panel_rows(outputs);
    let panels = outputs.div_ceil(panel);
    let mut p = vec![0.0f32; panels * panel * inputs];
    for r in 0..outputs {
        let (pi, ri) = (r / panel, r % panel);
        for j in 0..inputs {
            p[pi * panel * inputs + j * panel + ri] = w[r * inputs + j];
        }
    }
    (panel, p)
}

fn graph(model: &OnnxModel) -> Option<&pb::GraphProto> {
    model.proto().graph.as_ref()
}

/// The only node reading `name`, if exactly one does.
fn sole_consumer<'g>(g: &'g pb::GraphProto, name: &str) -> Option<&'g pb::NodeProto> {
    let mut it = g.node.iter().filter(|n| n.input.iter().any(|i| i == name));
    let n = it.next()?;
    it.next().is_none().then_some(n)
}

fn output_name(g: &pb::GraphProto) -> Option<&str> {
    match g.output.as_slice() {
        [o] => Some(o.name.as_str()),
        _ => None,
    }
}

fn attr<'n>(n: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// Whether a Softmax node normalises the class axis of a `[N, C]` tensor (axis 1 or −1; the
/// pre-opset-13 flattening from axis 1 is the same thing for 2-D).
fn softmax_over_classes(n: &pb::NodeProto) -> bool {
    matches!(attr(n, "axis").map(|a| a.i), None | Some(1) | Some(-1))
}

/// A float Gemm/Relu chain (what Hearth trains; also `prune`/`lowrank` outputs).
fn float_chain(model: &OnnxModel) -> Option<DenseNet> {
    let g = graph(model)?;
    let layers = model.dense_layers().ok()?;
    let weights = model.weights();
    // Follow the chain again to find where it ends, and require that every node is on it.
    let mut cur = model.input_name()?.to_string();
    let mut used = 0;
    let mut softmax = false;
    while let Some(n) = sole_consumer(g, &cur) {
        match n.op_type.as_str() {
            "Gemm" | "Relu" => {}
            "Softmax" if softmax_over_classes(n) => softmax = true,
            _ => return None,
        }
        used += 1;
        cur = n.output.first()?.clone();
        if softmax {
            break;
        }
    }
    if used != g.node.len() || output_name(g)? != cur {
        return None;
    }
    let mut out = Vec::new();
    for l in &layers {
        let w = weights.get(&l.weight)?;
        let rows = l.out_major(w);
        let bias = match &l.bias {
            Some(b) => weights.get(b)?.data.clone(),
            None => vec![0.0; l.outputs],
        };
        let (panel, packed) = pack_f32(&rows, l.outputs, l.inputs);
        out.push(F32Layer {
            inputs: l.inputs,
            outputs: l.outputs,
            panel,
            packed,
            bias,
            relu: l.relu,
        });
    }
    Some(DenseNet {
        input_len: layers.first()?.inputs,
        outputs: layers.last()?.outputs,
        body: Body::F32(out),
        softmax,
    })
}

/// Values of an integer or float initializer, widened (raw little-endian or typed fields).
enum Values {
    Int(Vec<i64>),
    Float(Vec<f32>),
}

fn initializer<'g>(g: &'g pb::GraphProto, name: &str) -> Option<&'g pb::TensorProto> {
    g.initializer.iter().find(|t| t.name == name)
}

fn values(t: &pb::TensorProto) -> Option<(Vec<usize>, DataType, Values)> {
    if t.data_location == Some(1) {
        return None;
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let n: usize = dims.iter().product();
    let dt = DataType::try_from(t.data_type).ok()?;
    let raw = &t.raw_data;
    let v = match dt {
        DataType::Float if !raw.is_empty() => Values::Float(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DataType::Float => Values::Float(t.float_data.clone()),
        DataType::Int8 if !raw.is_empty() => {
            Values::Int(raw.iter().map(|&b| i64::from(b as i8)).collect())
        }
        DataType::Int32 if !raw.is_empty() => Values::Int(
            raw.chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        DataType::Int8 | DataType::Int32 => {
            Values::Int(t.int32_data.iter().map(|&v| i64::from(v)).collect())
        }
        DataType::Int64 if !raw.is_empty() => Values::Int(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        DataType::Int64 => Values::Int(t.int64_data.clone()),
        _ => return None,
    };
    let len = match &v {
        Values::Int(x) => x.len(),
        Values::Float(x) => x.len(),
    };
    (len == n).then_some((dims, dt, v))
}

fn floats(g: &pb::GraphProto, name: &str) -> Option<Vec<f32>> {
    match values(initializer(g, name)?)? {
        (_, _, Values::Float(v)) => Some(v),
        _ => None,
    }
}

/// An int8 tensor's values (zero points and weights must be int8, not uint8).
fn int8s(g: &pb::GraphProto, name: &str) -> Option<(Vec<usize>, Vec<i64>)> {
    match values(initializer(g, name)?)? {
        (dims, DataType::Int8, Values::Int(v)) => Some((dims, v)),
        _ => None,
    }
}

fn scalar_f32(g: &pb::GraphProto, name: &str) -> Option<f32> {
    match floats(g, name)?.as_slice() {
        [s] if s.is_finite() && *s > 0.0 => Some(*s),
        _ => None,
    }
}

fn scalar_i8(g: &pb::GraphProto, name: &str) -> Option<i32> {
    match int8s(g, name)?.1.as_slice() {
        [z] => i32::try_from(*z).ok(),
        _ => None,
    }
}

/// Whether an Unsqueeze/Squeeze touches only axis 2 (opset ≥ 13 input or older attribute).
fn axis2_only(g: &pb::GraphProto, n: &pb::NodeProto) -> bool {
    let axes: Option<Vec<i64>> = match n.input.get(1) {
        Some(a) if !a.is_empty() => match initializer(g, a).and_then(values) {
            Some((_, _, Values::Int(v))) => Some(v),
            _ => None,
        },
        _ => attr(n, "axes").map(|a| a.ints.clone()),
    };
    matches!(axes.as_deref(), Some([2]) | Some([-1]))
}

/// The int8 chain `qonnx::export_int8` writes (per-tensor or per-channel weight scales):
/// Unsqueeze → QuantizeLinear → QLinearConv(k=1)… → DequantizeLinear → Squeeze [→ Softmax].
fn int8_chain(model: &OnnxModel) -> Option<DenseNet> {
    let g = graph(model)?;
    let input_len = model.input_len();
    let mut n = sole_consumer(g, model.input_name()?)?;
    if n.op_type != "Unsqueeze" || !axis2_only(g, n) {
        return None;
    }
    let mut used = 1;
    n = sole_consumer(g, n.output.first()?)?;
    if n.op_type != "QuantizeLinear" || n.input.len() != 3 || attr(n, "axis").is_some() {
        return None;
    }
    let (in_scale, in_zero) = (scalar_f32(g, &n.input[1])?, scalar_i8(g, &n.input[2])?);
    let (mut scale, mut zero) = (in_scale, in_zero);
    used += 1;
    let mut layers = Vec::new();
    let mut width = input_len;
    loop {
        n = sole_consumer(g, n.output.first()?)?;
        if n.op_type != "QLinearConv" {
            break;
        }
        used += 1;
        let ok_attrs = n.attribute.iter().all(|a| match a.name.as_str() {
            "kernel_shape" | "strides" | "dilations" => a.ints.iter().all(|&v| v == 1),
            "pads" => a.ints.iter().all(|&v| v == 0),
            "group" => a.i == 1,
            "auto_pad" => a.s.is_empty() || a.s == b"NOTSET",
            _ => false,
        });
        if !ok_attrs || !(8..=9).contains(&n.input.len()) {
            return None;
        }
        let i = &n.input;
        if scalar_f32(g, &i[1])? != scale || scalar_i8(g, &i[2])? != zero {
            return None;
        }
        let (wdims, w) = int8s(g, &i[3])?;
        let (outputs, inputs) = match wdims.as_slice() {
            [o, c, 1] => (*o, *c),
            _ => return None,
        };
        if inputs != width {
            return None;
        }
        let w_scale = floats(g, &i[4])?;
        let w_scale = match w_scale.len() {
            1 => vec![w_scale[0]; outputs],
            l if l == outputs => w_scale,
            _ => return None,
        };
        // Symmetric weights only (Hearth's export): a zero weight zero point.
        if int8s(g, &i[5])?.1.iter().any(|&z| z != 0) {
            return None;
        }
        let (y_scale, y_zero) = (scalar_f32(g, &i[6])?, scalar_i8(g, &i[7])?);
        let bias: Vec<i64> = match i.get(8).filter(|b| !b.is_empty()) {
            Some(b) => match values(initializer(g, b)?)? {
                (_, DataType::Int32, Values::Int(v)) if v.len() == outputs => v,
                _ => return None,
            },
            None => vec![0; outputs],
        };
        let folded: Vec<i32> = (0..outputs)
            .map(|o| {
                let sum: i64 = w[o * inputs..(o + 1) * inputs].iter().sum();
                i32::try_from(bias[o] - i64::from(zero) * sum).ok()
            })
            .collect::<Option<_>>()?;
        let multiplier = w_scale.iter().map(|ws| scale * ws / y_scale).collect();
        layers.push(Int8Layer::new(
            &w, outputs, inputs, folded, multiplier, y_zero,
        ));
        (scale, zero, width) = (y_scale, y_zero, outputs);
    }
    if layers.is_empty() || n.op_type != "DequantizeLinear" || n.input.len() != 3 {
        return None;
    }
    if scalar_f32(g, &n.input[1])? != scale || scalar_i8(g, &n.input[2])? != zero {
        return None;
    }
    used += 1;
    n = sole_consumer(g, n.output.first()?)?;
    if n.op_type != "Squeeze" || !axis2_only(g, n) {
        return None;
    }
    used += 1;
    let mut cur = n.output.first()?.clone();
    let mut softmax = false;
    if let Some(s) = sole_consumer(g, &cur) {
        if s.op_type != "Softmax" || !softmax_over_classes(s) {
            return None;
        }
        softmax = true;
        used += 1;
        cur = s.output.first()?.clone();
    }
    if used != g.node.len() || output_name(g)? != cur {
        return None;
    }
    Some(DenseNet {
        input_len,
        outputs: width,
        body: Body::Int8(Int8Chain {
            in_scale,
            in_zero,
            layers,
            out_scale: scale,
            out_zero: zero,
        }),
        softmax,
    })
}

/// The x86-64 integer kernel for int8 layers: AVX-512 BW (16 rows per register) or AVX2 (8),
/// through `pulp`'s feature-checked intrinsics (safe calls: the token proves the CPU has them).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__m128i, __m256i, __m512i};
    use pulp::x86::{V3, V4};
    use pulp::Simd;

    /// Whether this CPU runs the kernel (AVX2 at least).
    pub(super) fn available() -> bool {
        V3::try_new().is_some()
    }

    /// Packs row-major int8 `w` (`outputs × inputs`) into `panel`-row panels of input pairs:
    /// panel `p`, pair `j/2`, row `r`, `j % 2` — a row's two weights of a pair side by side, so
    /// one `vpmaddwd` lane is `w[r][j]·x[j] + w[r][j+1]·x[j+1]`. Odd widths get a zero pad.
    pub(super) fn pack_pairs(w: &[i8], outputs: usize, inputs: usize, panel: usize) -> Vec<i8> {
        let pairs = inputs.div_ceil(2);
        let mut p = vec![0i8; outputs.div_ceil(panel) * panel * 2 * pairs];
        for r in 0..outputs {
            let (pi, ri) = (r / panel, r % panel);
            for j in 0..inputs {
                p[pi * panel * 2 * pairs + (j / 2) * panel * 2 + ri * 2 + j % 2] =
                    w[r * inputs + j];
            }
        }
        p
    }

    /// `acc[r] = Σ_j W[r][j]·q[j]` for int8 activation values `q` (held as floats), in i32.
    pub(super) fn product(packed: &[i8], pairs: usize, panel: usize, q: &[f32], acc: &mut [i32]) {
        let xp = pair_operands(q, pairs);
        run(V4::try_new(), V3::try_new(), packed, pairs, panel, &xp, acc);
    }

    /// The widest kernel of those given (tests pass `None` for AVX-512 to run the AVX2 one).
    pub(super) fn run(
        v4: Option<V4>,
        v3: Option<V3>,
        packed: &[i8],
        pairs: usize,
        panel: usize,
        xp: &[i32],
        acc: &mut [i32],
    ) {
        if let Some(v4) = v4 {
            let k = Kernel::<V4, 4> {
                isa: v4,
                packed,
                pairs,
                panel,
                xp,
                acc,
            };
            Simd::vectorize(v4, k);
        } else if let Some(v3) = v3 {
            let k = Kernel::<V3, 8> {
                isa: v3,
                packed,
                pairs,
                panel,
                xp,
                acc,
            };
            Simd::vectorize(v3, k);
        }
    }

    /// Input pairs as the kernel's broadcast operands: two i16 halves, low = even input.
    pub(super) fn pair_operands(q: &[f32], pairs: usize) -> Vec<i32> {
        (0..pairs)
            .map(|p| {
                let lo = q.get(2 * p).map_or(0, |&v| v as i16);
                let hi = q.get(2 * p + 1).map_or(0, |&v| v as i16);
                (i32::from(hi as u16) << 16) | i32::from(lo as u16)
            })
            .collect()
    }

    /// One instruction set's pair multiply-add on a register of `ROWS` i32 lanes (one lane per
    /// weight row): the only part of the kernel that differs between AVX-512 and AVX2.
    trait PairMadd: Copy {
        type Reg: Copy;
        /// Rows (i32 lanes) per register.
        const ROWS: usize;
        fn zero(self) -> Self::Reg;
        fn splat(self, x: i32) -> Self::Reg;
        /// `acc` plus, per lane `r`, `w[2r]·x_lo + w[2r+1]·x_hi` (`w`: `ROWS` rows × 2 int8).
        fn madd(self, acc: Self::Reg, w: &[i8], xs: Self::Reg) -> Self::Reg;
        fn store(self, r: Self::Reg, out: &mut [i32]);
    }

    impl PairMadd for V4 {
        type Reg = __m512i;
        const ROWS: usize = 16;
        #[inline(always)]
        fn zero(self) -> __m512i {
            self.avx512f._mm512_setzero_si512()
        }
        #[inline(always)]
        fn splat(self, x: i32) -> __m512i {
            self.avx512f._mm512_set1_epi32(x)
        }
        #[inline(always)]
        fn madd(self, acc: __m512i, w: &[i8], xs: __m512i) -> __m512i {
            let bytes: [i8; 32] = w.try_into().unwrap_or([0; 32]);
            let w = self
                .avx512bw
                ._mm512_cvtepi8_epi16(pulp::cast::<_, __m256i>(bytes));
            self.avx512f
                ._mm512_add_epi32(acc, self.avx512bw._mm512_madd_epi16(w, xs))
        }
        #[inline(always)]
        fn store(self, r: __m512i, out: &mut [i32]) {
            out.copy_from_slice(&pulp::cast::<_, [i32; 16]>(r));
        }
    }

    impl PairMadd for V3 {
        type Reg = __m256i;
        const ROWS: usize = 8;
        #[inline(always)]
        fn zero(self) -> __m256i {
            self.avx._mm256_setzero_si256()
        }
        #[inline(always)]
        fn splat(self, x: i32) -> __m256i {
            self.avx._mm256_set1_epi32(x)
        }
        #[inline(always)]
        fn madd(self, acc: __m256i, w: &[i8], xs: __m256i) -> __m256i {
            let bytes: [i8; 16] = w.try_into().unwrap_or([0; 16]);
            let w = self
                .avx2
                ._mm256_cvtepi8_epi16(pulp::cast::<_, __m128i>(bytes));
            self.avx2
                ._mm256_add_epi32(acc, self.avx2._mm256_madd_epi16(w, xs))
        }
        #[inline(always)]
        fn store(self, r: __m256i, out: &mut [i32]) {
            out.copy_from_slice(&pulp::cast::<_, [i32; 8]>(r));
        }
    }

    /// The int8 panel product on instruction set `T` with up to `R` accumulator registers
    /// (`R · T::ROWS` = 64 rows, a wide panel, per pass over the inputs).
    struct Kernel<'a, T, const R: usize> {
        isa: T,
        packed: &'a [i8],
        pairs: usize,
        panel: usize,
        xp: &'a [i32],
        acc: &'a mut [i32],
    }

    impl<T: PairMadd, const R: usize> pulp::WithSimd for Kernel<'_, T, R> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let isa = self.isa;
            let stride = self.panel * 2 * self.pairs;
            for (out, cols) in self
                .acc
                .chunks_mut(self.panel)
                .zip(self.packed.chunks_exact(stride))
            {
                let mut sums = [0i32; 64];
                let groups = self.panel / T::ROWS;
                for g in (0..groups).step_by(R) {
                    let n = (groups - g).min(R);
                    let mut acc = [isa.zero(); R];
                    for (col, &x) in cols.chunks_exact(self.panel * 2).zip(self.xp) {
                        let xs = isa.splat(x);
                        for (i, a) in acc.iter_mut().enumerate().take(n) {
                            let off = (g + i) * 2 * T::ROWS;
                            *a = isa.madd(*a, &col[off..off + 2 * T::ROWS], xs);
                        }
                    }
                    for (i, a) in acc.iter().enumerate().take(n) {
                        isa.store(*a, &mut sums[(g + i) * T::ROWS..(g + i + 1) * T::ROWS]);
                    }
                }
                let n = out.len();
                out.copy_from_slice(&sums[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_products_match_the_plain_sums() {
        for (outputs, inputs) in [(5, 3), (16, 7), (17, 64), (70, 33), (128, 387), (20, 2100)] {
            let w: Vec<f32> = (0..outputs * inputs)
                .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..inputs).map(|i| (i % 13) as f32 / 6.5 - 1.0).collect();
            let (panel, packed) = pack_f32(&w, outputs, inputs);
            let mut y = vec![0.0; outputs];
            pulp::Arch::new().dispatch(Gemv {
                packed: &packed,
                k: inputs,
                panel,
                x: &x,
                y: &mut y,
            });
            for (r, v) in y.iter().enumerate() {
                let want: f32 = (0..inputs).map(|j| w[r * inputs + j] * x[j]).sum();
                assert!(
                    (v - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{v} vs {want}"
                );
            }
            // int8 extremes included: row 0 is all −128 against inputs of −128, the largest
            // sums (2100 · 2^14 > 2^24 needs the exact blocks).
            let wq: Vec<i64> = (0..outputs * inputs)
                .map(|i| {
                    if i < inputs {
                        -128
                    } else {
                        ((i * 7919) % 256) as i64 - 128
                    }
                })
                .collect();
            let xq: Vec<i64> = (0..inputs)
                .map(|i| {
                    if i % 3 == 0 {
                        -128
                    } else {
                        ((i * 31) % 256) as i64 - 128
                    }
                })
                .collect();
            let xf: Vec<f32> = xq.iter().map(|&v| v as f32).collect();
            let want: Vec<i64> = (0..outputs)
                .map(|r| (0..inputs).map(|j| wq[r * inputs + j] * xq[j]).sum())
                .collect();
            let check = |acc: &[i32], form: &str| {
                for (r, (v, w)) in acc.iter().zip(&want).enumerate() {
                    assert_eq!(i64::from(*v), *w, "{form}: row {r} of {outputs}x{inputs}");
                }
            };
            let mut acc = Vec::new();
            let l = Int8Layer::new(
                &wq,
                outputs,
                inputs,
                vec![0; outputs],
                vec![1.0; outputs],
                0,
            );
            l.product(&xf, &mut acc);
            check(&acc, "default");
            let l = Int8Layer::widened(
                &wq,
                outputs,
                inputs,
                vec![0; outputs],
                vec![1.0; outputs],
                0,
            );
            l.product(&xf, &mut acc);
            check(&acc, "widened");
            #[cfg(target_arch = "x86_64")]
            if let Some(v3) = pulp::x86::V3::try_new() {
                let w8: Vec<i8> = wq.iter().map(|&v| v as i8).collect();
                let panel = panel_rows(outputs);
                let pairs = inputs.div_ceil(2);
                let packed = x86::pack_pairs(&w8, outputs, inputs, panel);
                let xp = x86::pair_operands(&xf, pairs);
                let mut acc = vec![0; outputs];
                x86::run(None, Some(v3), &packed, pairs, panel, &xp, &mut acc);
                check(&acc, "avx2");
                x86::run(
                    pulp::x86::V4::try_new(),
                    None,
                    &packed,
                    pairs,
                    panel,
                    &xp,
                    &mut acc,
                );
                check(&acc, "avx-512 (or untouched when absent)");
            }
        }
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        assert_eq!(quantize(2.5, 1.0, 0), 2);
        assert_eq!(quantize(3.5, 1.0, 0), 4);
        assert_eq!(quantize(-2.5, 1.0, 0), -2);
        assert_eq!(quantize(1000.0, 1.0, 0), 127);
        assert_eq!(quantize(-1000.0, 1.0, 10), -128);
        assert_eq!(quantize(0.0, 0.1, -128), -128);
        assert_eq!(quantize(f32::INFINITY, 1.0, 0), 127);
        for i in -3000..3000 {
            let v = i as f32 * 0.25;
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
        assert_eq!(round_even(1e30), 1_048_576.0);
    }

    #[test]
    fn softmax_is_a_distribution_and_keeps_the_order() {
        let mut v = vec![1.0, 3.0, 2.0, 9.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] > 0.99 && v[1] > v[2] && v[2] > v[0]);
        let mut big = vec![0.0, 1000.0];
        softmax(&mut big);
        assert_eq!(big, vec![0.0, 1.0]);
    }
}
