//! Hearth's dense engine: batch-1 inference for the model family Hearth ships — a chain of
//! fully connected layers ending in an optional softmax, either in float (`y = Wx + b`, ReLU)
//! or in int8 with the ONNX QOperator semantics (QuantizeLinear → QLinearConv(k=1)… →
//! DequantizeLinear).
//!
//! This crate is pure arithmetic: it knows nothing of ONNX. `hearth-model` recognises the
//! graphs it can run and hands it the layers ([`FloatLayer`], [`Int8Chain`]); everything else
//! runs in tract. It is the only code in Hearth with CPU-specific vector paths, hence its own
//! crate boundary.
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
//! with a scalar fallback; no `unsafe` here (only in `arm`, for `SDOT`: see there why).
//!
//! int8 layers stay int8 in memory on x86-64 (AVX2 / AVX-512 BW) and on aarch64, so an int8
//! model streams a quarter of the float model's bytes and runs faster than it. On x86-64 the
//! product is `vpmaddwd` on sign-extended weights and activation pairs, through `pulp`'s
//! feature-checked (safe) intrinsics (`x86`); on aarch64 it is `SDOT` where the CPU has
//! `dotprod` (Raspberry Pi 5) and `SMULL`+`SADALP` elsewhere (Pi 4), detected at run time
//! (`arm`). Elsewhere (old x86 without AVX2) the int8 weights are widened to f32 at load and the
//! integer products are done exactly in float lanes.
//!
//! The semantics are the ONNX operators': float outputs equal tract's up to summation order;
//! int8 ones use the same integer products and round-half-to-even requantisation.
// `deny`, not `forbid`: the one `allow` is the aarch64 `SDOT` kernel (`arm`).
#![deny(unsafe_code)]

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arm;
pub mod conv;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Rows per weight panel for wide layers: 64 f32 accumulators are four AVX-512 (or eight
/// AVX2, sixteen NEON) registers, kept across the whole pass over the inputs.
const WIDE: usize = 64;
/// Rows per panel for narrow layers (the class logits), so they do not pay for 64 rows.
const NARROW: usize = 16;

/// Why a set of layers cannot become a [`DenseNet`], or an input cannot be run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DenseError {
    /// Layer shapes that do not chain, or buffers of the wrong length.
    #[error("shape: {0}")]
    Shape(String),
    /// Values the engine cannot represent exactly (e.g. a folded int32 bias overflowing).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// One float layer, `y = W x + b`, optionally followed by ReLU.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatLayer {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// `W`, row-major `outputs × inputs` (one row per output).
    pub weight: Vec<f32>,
    /// `b`, one per output.
    pub bias: Vec<f32>,
    /// Whether a ReLU follows.
    pub relu: bool,
}

/// One int8 layer with ONNX QLinearConv(k=1) semantics and symmetric weights:
/// `y = sat(round_even((Σ (x − zx)·w + b) · sx·sw/sy) + zy)`, where `sx`, `zx` are the
/// previous layer's output scale and zero point (or the chain's input quantisation).
#[derive(Clone, Debug, PartialEq)]
pub struct QLinearLayer {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// int8 weights, row-major `outputs × inputs`, zero point 0.
    pub weight: Vec<i8>,
    /// Weight scale per output row (`sw`).
    pub weight_scale: Vec<f32>,
    /// int32 bias per output (in units of `sx·sw`).
    pub bias: Vec<i32>,
    /// Output scale (`sy`).
    pub out_scale: f32,
    /// Output zero point (`zy`).
    pub out_zero: i8,
}

/// QuantizeLinear(`in_scale`, `in_zero`) → int8 layers → DequantizeLinear with the last
/// layer's output scale and zero point.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Chain {
    /// Input quantisation scale.
    pub in_scale: f32,
    /// Input quantisation zero point.
    pub in_zero: i8,
    /// The layers, first to last.
    pub layers: Vec<QLinearLayer>,
}

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
    Int8(PackedInt8Chain),
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

/// QuantizeLinear → int8 layers → DequantizeLinear, packed for the kernels.
#[derive(Clone, Debug)]
struct PackedInt8Chain {
    in_scale: f32,
    in_zero: i32,
    layers: Vec<Int8Layer>,
    out_scale: f32,
    out_zero: i32,
}

/// One packed QLinearConv(k=1), with the input zero point folded into the bias
/// (`b − zx·Σw`), so the product is `Σ x·w` alone.
///
/// On x86-64 with AVX2 (or AVX-512 BW) and on aarch64 the weights stay int8 in memory, a
/// quarter of the float bytes, and the product is integer: `vpmaddwd` multiplies int8 weights
/// (sign-extended to i16) by pairs of int8 activations and adds each pair into an i32 lane
/// (`x86`); `SDOT`, or `SMULL`+`SADALP`, does the same for quads of inputs (`arm`).
/// Elsewhere (old x86 without AVX2) the weights are held widened to f32 and multiplied in
/// float lanes: every product and every partial sum over at most [`EXACT_BLOCK`] inputs is an
/// integer below 2^24, so that arithmetic is the integer one too, exactly.
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
    /// Row panels of input pairs, int8 (see `x86::pack_pairs`); `pairs` = ⌈inputs / 2⌉.
    #[cfg(target_arch = "x86_64")]
    Pairs { pairs: usize, packed: Vec<i8> },
    /// Row panels of input quads, int8 (see `arm::pack_quads`); `quads` = ⌈inputs / 4⌉.
    #[cfg(target_arch = "aarch64")]
    Quads { quads: usize, packed: Vec<i8> },
    /// Input blocks of at most [`EXACT_BLOCK`]: (first input, inputs, row panels input-major
    /// as [`F32Layer::packed`], the int8 values as f32). Never built on aarch64 (every
    /// aarch64 CPU has NEON), where the tests still check it.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    Widened(Vec<(usize, usize, Vec<f32>)>),
}

impl Int8Layer {
    /// Packs row-major int8 weights `w` (`outputs × inputs`).
    fn new(
        w: &[i8],
        outputs: usize,
        inputs: usize,
        bias: Vec<i32>,
        multiplier: Vec<f32>,
        out_zero: i32,
    ) -> Int8Layer {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            let panel = panel_rows(outputs);
            return Int8Layer {
                outputs,
                panel,
                weights: Int8Weights::Pairs {
                    pairs: inputs.div_ceil(2),
                    packed: x86::pack_pairs(w, outputs, inputs, panel),
                },
                bias,
                multiplier,
                out_zero,
            };
        }
        #[cfg(target_arch = "aarch64")]
        {
            let panel = panel_rows(outputs);
            Int8Layer {
                outputs,
                panel,
                weights: Int8Weights::Quads {
                    quads: inputs.div_ceil(4),
                    packed: arm::pack_quads(w, outputs, inputs, panel),
                },
                bias,
                multiplier,
                out_zero,
            }
        }
        #[cfg(not(target_arch = "aarch64"))]
        Int8Layer::widened(w, outputs, inputs, bias, multiplier, out_zero)
    }

    /// Bytes the packed weights occupy in memory (padding included).
    fn weight_bytes(&self) -> usize {
        match &self.weights {
            #[cfg(target_arch = "x86_64")]
            Int8Weights::Pairs { packed, .. } => packed.len(),
            #[cfg(target_arch = "aarch64")]
            Int8Weights::Quads { packed, .. } => packed.len(),
            Int8Weights::Widened(blocks) => blocks
                .iter()
                .map(|(_, _, p)| p.len() * std::mem::size_of::<f32>())
                .sum(),
        }
    }

    /// The name of the kernel that runs this layer's product.
    fn kernel(&self) -> &'static str {
        match &self.weights {
            #[cfg(target_arch = "x86_64")]
            Int8Weights::Pairs { .. } => {
                if pulp::x86::V4::try_new().is_some() {
                    "avx512bw-vpmaddwd"
                } else {
                    "avx2-vpmaddwd"
                }
            }
            #[cfg(target_arch = "aarch64")]
            Int8Weights::Quads { .. } => arm::Kernel::best().name(),
            Int8Weights::Widened(_) => "f32-widened",
        }
    }

    /// The portable form: weights widened to f32 in exact blocks.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    fn widened(
        w: &[i8],
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
                    .map(|&v| f32::from(v))
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
    // Off x86-64 and aarch64 the match below has one arm.
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
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
            #[cfg(target_arch = "aarch64")]
            Int8Weights::Quads { quads, packed } => {
                arm::product(packed, *quads, self.panel, q, acc);
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

fn shape(msg: String) -> DenseError {
    DenseError::Shape(msg)
}

/// Checks that `layers` (as (inputs, outputs) pairs) chain and are non-empty.
fn check_chain(dims: impl Iterator<Item = (usize, usize)>) -> Result<(usize, usize), DenseError> {
    let mut first = None;
    let mut width = 0;
    for (i, (inputs, outputs)) in dims.enumerate() {
        if inputs == 0 || outputs == 0 {
            return Err(shape(format!("layer {i} has an empty side")));
        }
        match first {
            None => first = Some(inputs),
            Some(_) if inputs != width => {
                return Err(shape(format!(
                    "layer {i} takes {inputs} inputs, the previous layer gives {width}"
                )))
            }
            Some(_) => {}
        }
        width = outputs;
    }
    first
        .map(|f| (f, width))
        .ok_or_else(|| shape("no layers".into()))
}

impl DenseNet {
    /// A float chain; `softmax` normalises the last layer's outputs.
    pub fn float(layers: &[FloatLayer], softmax: bool) -> Result<DenseNet, DenseError> {
        let (input_len, outputs) = check_chain(layers.iter().map(|l| (l.inputs, l.outputs)))?;
        let mut packed_layers = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            if l.weight.len() != l.inputs * l.outputs || l.bias.len() != l.outputs {
                return Err(shape(format!(
                    "layer {i}: weight has {} values and bias {}, expected {}x{} and {}",
                    l.weight.len(),
                    l.bias.len(),
                    l.outputs,
                    l.inputs,
                    l.outputs
                )));
            }
            let (panel, packed) = pack_f32(&l.weight, l.outputs, l.inputs);
            packed_layers.push(F32Layer {
                inputs: l.inputs,
                outputs: l.outputs,
                panel,
                packed,
                bias: l.bias.clone(),
                relu: l.relu,
            });
        }
        Ok(DenseNet {
            input_len,
            outputs,
            body: Body::F32(packed_layers),
            softmax,
        })
    }

    /// An int8 chain; `softmax` normalises the dequantised outputs.
    pub fn int8(chain: &Int8Chain, softmax: bool) -> Result<DenseNet, DenseError> {
        let (input_len, outputs) = check_chain(chain.layers.iter().map(|l| (l.inputs, l.outputs)))?;
        let positive = |s: f32| s.is_finite() && s > 0.0;
        if !positive(chain.in_scale) {
            return Err(DenseError::Unsupported("input scale must be > 0".into()));
        }
        let (mut scale, mut zero) = (chain.in_scale, i32::from(chain.in_zero));
        let mut layers = Vec::with_capacity(chain.layers.len());
        for (i, l) in chain.layers.iter().enumerate() {
            let (o, n) = (l.outputs, l.inputs);
            if l.weight.len() != o * n || l.bias.len() != o || l.weight_scale.len() != o {
                return Err(shape(format!(
                    "int8 layer {i}: {} weights, {} biases, {} scales for {o}x{n}",
                    l.weight.len(),
                    l.bias.len(),
                    l.weight_scale.len()
                )));
            }
            if !positive(l.out_scale) || !l.weight_scale.iter().all(|&s| positive(s)) {
                return Err(DenseError::Unsupported(format!(
                    "int8 layer {i}: scales must be > 0"
                )));
            }
            let folded: Vec<i32> = (0..o)
                .map(|r| {
                    let sum: i64 = l.weight[r * n..(r + 1) * n]
                        .iter()
                        .map(|&w| i64::from(w))
                        .sum();
                    i32::try_from(i64::from(l.bias[r]) - i64::from(zero) * sum).ok()
                })
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    DenseError::Unsupported(format!("int8 layer {i}: folded bias overflows i32"))
                })?;
            let multiplier = l
                .weight_scale
                .iter()
                .map(|ws| scale * ws / l.out_scale)
                .collect();
            let out_zero = i32::from(l.out_zero);
            layers.push(Int8Layer::new(
                &l.weight, o, n, folded, multiplier, out_zero,
            ));
            (scale, zero) = (l.out_scale, out_zero);
        }
        Ok(DenseNet {
            input_len,
            outputs,
            body: Body::Int8(PackedInt8Chain {
                in_scale: chain.in_scale,
                in_zero: i32::from(chain.in_zero),
                layers,
                out_scale: scale,
                out_zero: zero,
            }),
            softmax,
        })
    }

    /// Input vector length.
    pub fn input_len(&self) -> usize {
        self.input_len
    }

    /// Output vector length.
    pub fn output_len(&self) -> usize {
        self.outputs
    }

    /// Whether the weights are int8.
    pub fn is_int8(&self) -> bool {
        matches!(self.body, Body::Int8(_))
    }

    /// Bytes the packed weights occupy in memory (panel padding included, biases and scales
    /// not): about one per parameter for an int8 model whose weights stay int8, four for a
    /// float model or widened int8 weights.
    pub fn weight_bytes(&self) -> usize {
        match &self.body {
            Body::F32(layers) => layers
                .iter()
                .map(|l| l.packed.len() * std::mem::size_of::<f32>())
                .sum(),
            Body::Int8(chain) => chain.layers.iter().map(Int8Layer::weight_bytes).sum(),
        }
    }

    /// The kernel that multiplies this model's weights on this CPU: `f32-<simd>` for float
    /// models (`pulp`'s dispatch: `avx512`, `avx2`, `neon`, `scalar`), and for int8 ones
    /// `avx512bw-vpmaddwd`, `avx2-vpmaddwd`, `neon-sdot`, `neon-smull-sadalp` or `f32-widened`.
    pub fn kernel(&self) -> String {
        match &self.body {
            Body::F32(_) => format!("f32-{}", float_simd()),
            Body::Int8(chain) => chain
                .layers
                .first()
                .map_or("none", Int8Layer::kernel)
                .to_string(),
        }
    }

    /// The model's output (probabilities when built with `softmax`) for one input.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<f32>, DenseError> {
        if x.len() != self.input_len {
            return Err(shape(format!(
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

/// The instruction set `pulp` picks for the float kernel on this CPU.
fn float_simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V4::try_new().is_some() {
            return "avx512";
        }
        if pulp::x86::V3::try_new().is_some() {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    if pulp::aarch64::Neon::try_new().is_some() {
        return "neon";
    }
    "scalar"
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

fn run_int8(c: &PackedInt8Chain, x: &[f32]) -> Vec<f32> {
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
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Layer shapes covering one and several panels, odd widths, and a row long enough
    /// (2100 · 2^14 > 2^24) to need the exact blocks.
    const SHAPES: [(usize, usize); 6] =
        [(5, 3), (16, 7), (17, 64), (70, 33), (128, 387), (20, 2100)];

    /// int8 weights and inputs for `outputs × inputs`, extremes included (row 0 is all −128
    /// against inputs of −128), and the exact integer products.
    fn int8_case(outputs: usize, inputs: usize) -> (Vec<i8>, Vec<f32>, Vec<i64>) {
        let w: Vec<i8> = (0..outputs * inputs)
            .map(|i| if i < inputs { -128 } else { ((i * 7919) % 256) as i16 - 128 } as i8)
            .collect();
        let x: Vec<i8> = (0..inputs)
            .map(|i| if i % 3 == 0 { -128 } else { ((i * 31) % 256) as i16 - 128 } as i8)
            .collect();
        let want = (0..outputs)
            .map(|r| {
                (0..inputs)
                    .map(|j| i64::from(w[r * inputs + j]) * i64::from(x[j]))
                    .sum()
            })
            .collect();
        (w, x.iter().map(|&v| f32::from(v)).collect(), want)
    }

    fn assert_exact(acc: &[i32], want: &[i64], form: &str) {
        assert_eq!(acc.len(), want.len(), "{form}: output count");
        for (r, (v, w)) in acc.iter().zip(want).enumerate() {
            assert_eq!(i64::from(*v), *w, "{form}: row {r} of {}", want.len());
        }
    }

    #[test]
    fn packed_float_products_match_the_plain_sums() {
        for (outputs, inputs) in SHAPES {
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
        }
    }

    #[test]
    fn int8_products_are_exact_in_the_default_and_the_widened_form() {
        for (outputs, inputs) in SHAPES {
            let (w, x, want) = int8_case(outputs, inputs);
            let mut acc = Vec::new();
            let zeros = || (vec![0; outputs], vec![1.0; outputs]);
            let (b, m) = zeros();
            Int8Layer::new(&w, outputs, inputs, b, m, 0).product(&x, &mut acc);
            assert_exact(&acc, &want, "default");
            let (b, m) = zeros();
            Int8Layer::widened(&w, outputs, inputs, b, m, 0).product(&x, &mut acc);
            assert_exact(&acc, &want, "widened");
        }
    }

    /// Runs one x86 integer kernel on every shape; the accumulator starts as a sentinel, so a
    /// kernel that writes nothing cannot pass on another kernel's result.
    #[cfg(target_arch = "x86_64")]
    fn x86_kernel_is_exact(name: &str, v4: Option<pulp::x86::V4>, v3: Option<pulp::x86::V3>) {
        if v4.is_none() && v3.is_none() {
            // Said, not silently passed: this CPU lacks the instruction set.
            eprintln!("SKIPPED: the {name} int8 kernel did not run (this CPU does not have it)");
            return;
        }
        for (outputs, inputs) in SHAPES {
            let (w, x, want) = int8_case(outputs, inputs);
            let panel = panel_rows(outputs);
            let pairs = inputs.div_ceil(2);
            let packed = x86::pack_pairs(&w, outputs, inputs, panel);
            let xp = x86::pair_operands(&x, pairs);
            let mut acc = vec![i32::MIN; outputs];
            x86::run(v4, v3, &packed, pairs, panel, &xp, &mut acc);
            assert_exact(&acc, &want, name);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_int8_kernel_is_exact_or_skipped_when_absent() {
        x86_kernel_is_exact("AVX2", None, pulp::x86::V3::try_new());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_int8_kernel_is_exact_or_skipped_when_absent() {
        x86_kernel_is_exact("AVX-512 BW", pulp::x86::V4::try_new(), None);
    }

    /// Runs one aarch64 integer kernel on every shape, from a sentinel accumulator.
    #[cfg(target_arch = "aarch64")]
    fn arm_kernel_is_exact(kernel: arm::Kernel) {
        for (outputs, inputs) in SHAPES {
            let (w, x, want) = int8_case(outputs, inputs);
            let panel = panel_rows(outputs);
            let quads = inputs.div_ceil(4);
            let packed = arm::pack_quads(&w, outputs, inputs, panel);
            let xq = arm::quad_operands(&x, quads);
            let mut acc = vec![i32::MIN; outputs];
            arm::run(kernel, &packed, quads, panel, &xq, &mut acc);
            assert_exact(&acc, &want, kernel.name());
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_widening_int8_kernel_is_exact() {
        arm_kernel_is_exact(arm::Kernel::Widening);
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_sdot_int8_kernel_is_exact_or_skipped_when_absent() {
        if arm::Sdot::try_new().is_none() {
            // Said, not silently passed (qemu-aarch64 -cpu cortex-a72, a Pi 4).
            eprintln!("SKIPPED: the SDOT int8 kernel did not run (this CPU has no dotprod)");
            return;
        }
        arm_kernel_is_exact(arm::Kernel::Sdot);
    }

    /// A 64 × 300 layer: int8 weights must take about a byte each once loaded (a quarter of
    /// the float model's), not be widened to f32, wherever an integer kernel exists; and the
    /// kernel reported is the one this CPU's features select.
    #[test]
    fn int8_weights_stay_int8_in_memory_and_the_kernel_fits_the_cpu() {
        let (outputs, inputs) = (64, 300);
        let (w, _, _) = int8_case(outputs, inputs);
        let chain = Int8Chain {
            in_scale: 0.1,
            in_zero: 0,
            layers: vec![QLinearLayer {
                inputs,
                outputs,
                weight: w.clone(),
                weight_scale: vec![0.01; outputs],
                bias: vec![0; outputs],
                out_scale: 0.5,
                out_zero: 0,
            }],
        };
        let int8 = DenseNet::int8(&chain, false).unwrap();
        let float = DenseNet::float(
            &[FloatLayer {
                inputs,
                outputs,
                weight: w.iter().map(|&v| f32::from(v)).collect(),
                bias: vec![0.0; outputs],
                relu: false,
            }],
            false,
        )
        .unwrap();
        let params = outputs * inputs;
        eprintln!(
            "int8 kernel {}: {} weight bytes; float kernel {}: {} bytes; {params} parameters",
            int8.kernel(),
            int8.weight_bytes(),
            float.kernel(),
            float.weight_bytes()
        );
        assert_eq!(float.weight_bytes(), 4 * params);
        #[cfg(target_arch = "x86_64")]
        let integer_kernel = x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let integer_kernel = cfg!(target_arch = "aarch64");
        if integer_kernel {
            // Padding to whole input pairs/quads only: 300 is a multiple of 4.
            assert_eq!(int8.weight_bytes(), params, "int8 weights widened");
        } else {
            eprintln!("SKIPPED: no integer int8 kernel on this CPU: weights widened to f32");
            assert_eq!(int8.weight_bytes(), 4 * params);
        }
        #[cfg(target_arch = "aarch64")]
        {
            let want = if std::arch::is_aarch64_feature_detected!("dotprod") {
                "neon-sdot"
            } else {
                "neon-smull-sadalp"
            };
            assert_eq!(int8.kernel(), want);
            assert_eq!(float.kernel(), "f32-neon");
        }
    }

    #[test]
    fn chains_are_checked_and_the_int8_chain_folds_the_input_zero_point() {
        let l = |inputs, outputs| FloatLayer {
            inputs,
            outputs,
            weight: vec![0.5; inputs * outputs],
            bias: vec![0.0; outputs],
            relu: true,
        };
        assert!(DenseNet::float(&[], false).is_err());
        assert!(DenseNet::float(&[l(3, 4), l(5, 2)], false).is_err());
        let net = DenseNet::float(&[l(3, 4), l(4, 2)], false).unwrap();
        assert_eq!(
            (net.input_len(), net.output_len(), net.is_int8()),
            (3, 2, false)
        );
        assert_eq!(net.predict(&[1.0, 1.0, 1.0]).unwrap(), vec![3.0, 3.0]);
        assert!(net.predict(&[1.0]).is_err());
        // One int8 layer, y = x·1 + 0 with scale 1 everywhere and input zero point 3: the
        // quantised input is x + 3, the folded bias removes the 3 again.
        let chain = Int8Chain {
            in_scale: 1.0,
            in_zero: 3,
            layers: vec![QLinearLayer {
                inputs: 2,
                outputs: 1,
                weight: vec![1, 1],
                weight_scale: vec![1.0],
                bias: vec![5],
                out_scale: 1.0,
                out_zero: 0,
            }],
        };
        let net = DenseNet::int8(&chain, false).unwrap();
        assert!(net.is_int8());
        assert_eq!(net.predict(&[2.0, 4.0]).unwrap(), vec![11.0]);
        let mut bad = chain.clone();
        bad.layers[0].weight_scale = vec![0.0];
        assert!(matches!(
            DenseNet::int8(&bad, false),
            Err(DenseError::Unsupported(_))
        ));
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
