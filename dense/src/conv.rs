//! Convolutional graphs at batch 1 in the dense engine: direct, depthwise and 1×1 convolutions
//! (float, or int8 with the ONNX `QLinearConv` semantics and per-channel weight scales) with
//! fused bias / residual add / activation, plus the cheap ops such graphs have between convs
//! (add, ReLU/Clip/PRelu, max pooling, zero channel padding, (de)quantisation).
//!
//! Layout: every tensor is one image, NHWC (channels innermost), its channel stride rounded up
//! to [`CH_ALIGN`] with the padding channels always zero, so a channel vector of any width
//! `pulp` picks (AVX-512 16 lanes, AVX2 8, NEON 4, scalar 1) never runs past a pixel and a
//! channel padding (`Concat` with zeros, as TF→ONNX exporters write `tf.pad`) is free.
//!
//! Kernels (all `pulp` generic code, dispatched at run time: AVX-512/AVX2+FMA on x86-64, NEON
//! on aarch64, scalar elsewhere; no `unsafe`):
//! - 1×1 stride-1 convs are a matrix product `pixels × Cin · Cin × Cout` with the weights
//!   packed `[Cin][Cout]`, four pixels × three channel vectors per register block (no im2col);
//! - depthwise convs run over channel vectors per output pixel, taps clipped at the borders
//!   (no padded copy);
//! - other convs (the stem: 5×5 stride 2 over 3 channels) are direct: per output pixel, per
//!   valid tap and input channel, a broadcast times a vector of output channels.
//!
//! int8: activations between the int8 ops are held *centred* (`q − z`, an integer in
//! [−255, 255], stored as f32) and the int8 weights as integer-valued f32, so the same product
//! kernels compute `Σ (x − z_x)·w` exactly (every partial sum is an integer below 2^24: checked
//! when the graph is built, `K·255·127 + |bias| < 2^24`) and the epilogue requantises it
//! (`sat(round_even((Σ + b)·s_x·s_w/s_y) + z_y)`), optionally dequantises it and applies the
//! residual add and activation the graph has after it. Results equal the integer arithmetic;
//! against tract, the only differences are in how the requantisation multiplier is rounded
//! (±1 step on ties), which the tests bound.

use crate::DenseError;
use pulp::Simd;
use std::sync::Mutex;

/// Channel strides are multiples of this (the widest vector, AVX-512's 16 f32 lanes).
pub const CH_ALIGN: usize = 16;

/// Output-channel vectors per register block of the conv kernels.
const NV: usize = 3;
/// Pixels per register block of the 1×1 kernel.
const PIX: usize = 4;

/// f32 values whose first element is 64-byte aligned (a cache line, one AVX-512 vector):
/// with channel strides of [`CH_ALIGN`], every channel vector of a tensor or of the packed
/// weights then loads from a single cache line.
#[derive(Debug, Default)]
struct Aligned {
    v: Vec<f32>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeros(len: usize) -> Aligned {
        let v = vec![0.0f32; len + CH_ALIGN];
        let off = (64 - v.as_ptr() as usize % 64) % 64 / std::mem::size_of::<f32>();
        Aligned { v, off, len }
    }

    fn from_slice(s: &[f32]) -> Aligned {
        let mut a = Aligned::zeros(s.len());
        a.copy_from_slice(s);
        a
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

impl Clone for Aligned {
    fn clone(&self) -> Aligned {
        Aligned::from_slice(self)
    }
}

fn stride_of(c: usize) -> usize {
    c.div_ceil(CH_ALIGN) * CH_ALIGN
}

fn unsupported(msg: String) -> DenseError {
    DenseError::Unsupported(msg)
}

/// A tensor of a [`ConvGraph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorId(usize);

/// An element-wise activation.
#[derive(Clone, Debug, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// `min(max(x, lo), hi)`.
    Clip(f32, f32),
    /// `x < 0 ? slope[c]·x : x`, one slope per channel (or one for all).
    PRelu(Vec<f32>),
}

/// A convolution's geometry (ONNX `Conv` attributes); dilation 1.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// Depthwise (`group = in = out`) rather than a full (`group = 1`) convolution.
    pub depthwise: bool,
}

impl ConvShape {
    /// Weights per output channel.
    fn per_output(&self) -> usize {
        let cin = if self.depthwise { 1 } else { self.in_channels };
        cin * self.kernel[0] * self.kernel[1]
    }
}

/// A convolution's parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum ConvWeights {
    /// `weight` in ONNX order (`O × I/group × kh × kw`), one bias per output channel.
    F32 { weight: Vec<f32>, bias: Vec<f32> },
    /// ONNX `QLinearConv`: symmetric int8 weights (`O × I/group × kh × kw`) with one scale per
    /// output channel, int32 bias in units of `s_x·s_w`, output scale and zero point. The input
    /// must be an int8 tensor (from [`ConvGraph::quantize`] or another int8 conv).
    Int8 {
        weight: Vec<i8>,
        weight_scale: Vec<f32>,
        bias: Vec<i32>,
        out_scale: f32,
        out_zero: i8,
    },
}

/// What a convolution does with its sums in the same pass: for an int8 conv, `dequantize`
/// makes the output float (ONNX `DequantizeLinear` after the `QLinearConv`); then, for float
/// outputs, `add` (a residual of the output's shape) and `act`.
#[derive(Clone, Debug, PartialEq)]
pub struct Epilogue {
    pub dequantize: bool,
    pub add: Option<TensorId>,
    pub act: Activation,
}

impl Default for Epilogue {
    fn default() -> Self {
        Epilogue {
            dequantize: false,
            add: None,
            act: Activation::Identity,
        }
    }
}

#[derive(Clone, Debug)]
struct Info {
    h: usize,
    w: usize,
    c: usize,
    /// int8 tensor (held centred): `(scale, zero point)`.
    quant: Option<(f32, i32)>,
    /// Buffer holding it (channel padding shares its source's buffer).
    buf: usize,
}

impl Info {
    fn cs(&self) -> usize {
        stride_of(self.c)
    }
}

/// A convolutional graph being described, op by op, in execution order; every op checks its
/// shapes. Build it, then [`ConvNet::new`] packs it.
#[derive(Clone, Debug)]
pub struct ConvGraph {
    tensors: Vec<Info>,
    bufs: usize,
    ops: Vec<Op>,
    outputs: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Conv {
        x: usize,
        y: usize,
        shape: ConvShape,
        weights: ConvWeights,
        epi: Epilogue,
    },
    Quantize {
        x: usize,
        y: usize,
    },
    Dequantize {
        x: usize,
        y: usize,
    },
    Add {
        a: usize,
        b: usize,
        y: usize,
        act: Activation,
    },
    Act {
        x: usize,
        y: usize,
        act: Activation,
    },
    MaxPool {
        x: usize,
        y: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    },
    /// Copy into a wider channel stride (padding channels zero).
    Widen {
        x: usize,
        y: usize,
    },
}

impl ConvGraph {
    /// A graph whose input is one `h × w × c` float image (NHWC).
    pub fn new(h: usize, w: usize, c: usize) -> (ConvGraph, TensorId) {
        let g = ConvGraph {
            tensors: vec![Info {
                h,
                w,
                c,
                quant: None,
                buf: 0,
            }],
            bufs: 1,
            ops: Vec::new(),
            outputs: Vec::new(),
        };
        (g, TensorId(0))
    }

    /// `(h, w, c)` of a tensor.
    pub fn shape(&self, t: TensorId) -> (usize, usize, usize) {
        let i = &self.tensors[t.0];
        (i.h, i.w, i.c)
    }

    /// Whether a tensor is int8.
    pub fn is_int8(&self, t: TensorId) -> bool {
        self.tensors[t.0].quant.is_some()
    }

    /// `(scale, zero point)` of an int8 tensor.
    pub fn quant(&self, t: TensorId) -> Option<(f32, i32)> {
        self.tensors.get(t.0).and_then(|i| i.quant)
    }

    fn info(&self, t: TensorId) -> Result<&Info, DenseError> {
        self.tensors
            .get(t.0)
            .ok_or_else(|| DenseError::Shape(format!("no tensor {}", t.0)))
    }

    fn push(&mut self, h: usize, w: usize, c: usize, quant: Option<(f32, i32)>) -> usize {
        self.tensors.push(Info {
            h,
            w,
            c,
            quant,
            buf: self.bufs,
        });
        self.bufs += 1;
        self.tensors.len() - 1
    }

    fn float(&self, t: TensorId, what: &str) -> Result<&Info, DenseError> {
        let i = self.info(t)?;
        if i.quant.is_some() {
            return Err(unsupported(format!("{what}: int8 input, float expected")));
        }
        Ok(i)
    }

    fn check_act(act: &Activation, c: usize) -> Result<(), DenseError> {
        match act {
            Activation::PRelu(s) if s.len() != 1 && s.len() != c => Err(DenseError::Shape(
                format!("PRelu has {} slopes for {c} channels", s.len()),
            )),
            // Padding channels must stay zero.
            Activation::Clip(lo, hi) if *lo > 0.0 || *hi < 0.0 || lo > hi => {
                Err(unsupported(format!("Clip({lo}, {hi}) does not keep 0")))
            }
            _ => Ok(()),
        }
    }

    /// A convolution of `x` (see [`ConvWeights`], [`Epilogue`]).
    pub fn conv(
        &mut self,
        x: TensorId,
        shape: ConvShape,
        weights: ConvWeights,
        epi: Epilogue,
    ) -> Result<TensorId, DenseError> {
        let i = self.info(x)?.clone();
        let s = &shape;
        if s.in_channels != i.c {
            return Err(DenseError::Shape(format!(
                "conv takes {} channels, input has {}",
                s.in_channels, i.c
            )));
        }
        if s.depthwise && s.in_channels != s.out_channels {
            return Err(unsupported(
                "depthwise conv with a channel multiplier".into(),
            ));
        }
        if s.kernel.contains(&0) || s.stride.contains(&0) || s.out_channels == 0 {
            return Err(DenseError::Shape("empty kernel, stride or output".into()));
        }
        let (ph, pw) = (i.h + s.pads[0] + s.pads[2], i.w + s.pads[1] + s.pads[3]);
        if ph < s.kernel[0] || pw < s.kernel[1] {
            return Err(DenseError::Shape(
                "kernel larger than the padded input".into(),
            ));
        }
        let (oh, ow) = (
            (ph - s.kernel[0]) / s.stride[0] + 1,
            (pw - s.kernel[1]) / s.stride[1] + 1,
        );
        let n = s.out_channels * s.per_output();
        let float_out = match &weights {
            ConvWeights::F32 { weight, bias } => {
                if i.quant.is_some() {
                    return Err(unsupported("float conv of an int8 tensor".into()));
                }
                if weight.len() != n || bias.len() != s.out_channels {
                    return Err(DenseError::Shape(format!(
                        "conv: {} weights and {} biases, expected {n} and {}",
                        weight.len(),
                        bias.len(),
                        s.out_channels
                    )));
                }
                true
            }
            ConvWeights::Int8 {
                weight,
                weight_scale,
                bias,
                out_scale,
                ..
            } => {
                if i.quant.is_none() {
                    return Err(unsupported("int8 conv of a float tensor".into()));
                }
                if weight.len() != n
                    || bias.len() != s.out_channels
                    || weight_scale.len() != s.out_channels
                {
                    return Err(DenseError::Shape(format!(
                        "int8 conv: {} weights, {} biases, {} scales for {} outputs × {}",
                        weight.len(),
                        bias.len(),
                        weight_scale.len(),
                        s.out_channels,
                        s.per_output()
                    )));
                }
                let ok = |v: f32| v.is_finite() && v > 0.0;
                if !ok(*out_scale) || !weight_scale.iter().all(|&v| ok(v)) {
                    return Err(unsupported("int8 conv: scales must be > 0".into()));
                }
                // Exactness of the f32-lane integer product (see the module header).
                let bmax = bias.iter().map(|b| i64::from(*b).abs()).max().unwrap_or(0);
                let bound = s.per_output() as i64 * 255 * 127 + bmax;
                if bound >= 1 << 24 {
                    return Err(unsupported(format!(
                        "int8 conv: {} products per output and bias {bmax} may exceed 2^24",
                        s.per_output()
                    )));
                }
                epi.dequantize
            }
        };
        if let Some(a) = epi.add {
            let a = self.float(a, "residual add")?;
            if (a.h, a.w, a.c) != (oh, ow, s.out_channels) {
                return Err(DenseError::Shape("residual add of another shape".into()));
            }
        }
        if !float_out && (epi.add.is_some() || epi.act != Activation::Identity) {
            return Err(unsupported(
                "add/activation on an int8 conv output without dequantize".into(),
            ));
        }
        Self::check_act(&epi.act, s.out_channels)?;
        let quant = match &weights {
            ConvWeights::Int8 {
                out_scale,
                out_zero,
                ..
            } if !epi.dequantize => Some((*out_scale, i32::from(*out_zero))),
            _ => None,
        };
        let y = self.push(oh, ow, s.out_channels, quant);
        self.ops.push(Op::Conv {
            x: x.0,
            y,
            shape,
            weights,
            epi,
        });
        Ok(TensorId(y))
    }

    /// ONNX `QuantizeLinear` to int8.
    pub fn quantize(&mut self, x: TensorId, scale: f32, zero: i8) -> Result<TensorId, DenseError> {
        let i = self.float(x, "quantize")?.clone();
        if !(scale.is_finite() && scale > 0.0) {
            return Err(unsupported("quantize: scale must be > 0".into()));
        }
        let y = self.push(i.h, i.w, i.c, Some((scale, i32::from(zero))));
        self.ops.push(Op::Quantize { x: x.0, y });
        Ok(TensorId(y))
    }

    /// ONNX `DequantizeLinear` of an int8 tensor.
    pub fn dequantize(&mut self, x: TensorId) -> Result<TensorId, DenseError> {
        let i = self.info(x)?.clone();
        if i.quant.is_none() {
            return Err(unsupported("dequantize of a float tensor".into()));
        }
        let y = self.push(i.h, i.w, i.c, None);
        self.ops.push(Op::Dequantize { x: x.0, y });
        Ok(TensorId(y))
    }

    /// `act(a + b)` of two float tensors of one shape.
    pub fn add(
        &mut self,
        a: TensorId,
        b: TensorId,
        act: Activation,
    ) -> Result<TensorId, DenseError> {
        let ia = self.float(a, "add")?.clone();
        let ib = self.float(b, "add")?;
        if (ia.h, ia.w, ia.c) != (ib.h, ib.w, ib.c) {
            return Err(DenseError::Shape("add of two shapes".into()));
        }
        Self::check_act(&act, ia.c)?;
        let y = self.push(ia.h, ia.w, ia.c, None);
        self.ops.push(Op::Add {
            a: a.0,
            b: b.0,
            y,
            act,
        });
        Ok(TensorId(y))
    }

    /// An activation of a float tensor.
    pub fn activation(&mut self, x: TensorId, act: Activation) -> Result<TensorId, DenseError> {
        let i = self.float(x, "activation")?.clone();
        Self::check_act(&act, i.c)?;
        let y = self.push(i.h, i.w, i.c, None);
        self.ops.push(Op::Act { x: x.0, y, act });
        Ok(TensorId(y))
    }

    /// Max pooling of a float tensor (ONNX `MaxPool`, pads as `[top, left, bottom, right]`).
    pub fn max_pool(
        &mut self,
        x: TensorId,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    ) -> Result<TensorId, DenseError> {
        let i = self.float(x, "max pool")?.clone();
        if kernel.contains(&0) || stride.contains(&0) {
            return Err(DenseError::Shape("max pool: empty kernel or stride".into()));
        }
        if pads[0] >= kernel[0]
            || pads[2] >= kernel[0]
            || pads[1] >= kernel[1]
            || pads[3] >= kernel[1]
        {
            return Err(unsupported("max pool: a pad as wide as the kernel".into()));
        }
        let (ph, pw) = (i.h + pads[0] + pads[2], i.w + pads[1] + pads[3]);
        if ph < kernel[0] || pw < kernel[1] {
            return Err(DenseError::Shape("max pool larger than its input".into()));
        }
        let (oh, ow) = (
            (ph - kernel[0]) / stride[0] + 1,
            (pw - kernel[1]) / stride[1] + 1,
        );
        let y = self.push(oh, ow, i.c, None);
        self.ops.push(Op::MaxPool {
            x: x.0,
            y,
            kernel,
            stride,
            pads,
        });
        Ok(TensorId(y))
    }

    /// `x` followed by zero channels up to `c` (ONNX `Concat` with a zero tensor on the
    /// channel axis): free when the channel stride already holds them.
    pub fn pad_channels(&mut self, x: TensorId, c: usize) -> Result<TensorId, DenseError> {
        let i = self.float(x, "channel padding")?.clone();
        if c < i.c {
            return Err(DenseError::Shape("channel padding narrows".into()));
        }
        if stride_of(c) == i.cs() {
            self.tensors.push(Info {
                c,
                quant: None,
                ..i
            });
            return Ok(TensorId(self.tensors.len() - 1));
        }
        let y = self.push(i.h, i.w, c, None);
        self.ops.push(Op::Widen { x: x.0, y });
        Ok(TensorId(y))
    }

    /// Marks a float tensor as a graph output (in the order of the calls).
    pub fn output(&mut self, x: TensorId) -> Result<(), DenseError> {
        self.float(x, "graph output")?;
        self.outputs.push(x.0);
        Ok(())
    }
}

/// A packed activation: slopes per padded channel.
#[derive(Clone, Debug)]
enum Act {
    Identity,
    Relu,
    Clip(f32, f32),
    PRelu(Aligned),
}

impl Act {
    fn pack(a: &Activation, c: usize) -> Act {
        match a {
            Activation::Identity => Act::Identity,
            Activation::Relu => Act::Relu,
            Activation::Clip(lo, hi) => Act::Clip(*lo, *hi),
            Activation::PRelu(s) => {
                let mut v = vec![0.0; stride_of(c)];
                for (k, d) in v.iter_mut().take(c).enumerate() {
                    *d = if s.len() == 1 { s[0] } else { s[k] };
                }
                Act::PRelu(Aligned::from_slice(&v))
            }
        }
    }

    #[inline(always)]
    fn apply<S: Simd>(&self, simd: S, v: S::f32s, c: usize) -> S::f32s {
        match self {
            Act::Identity => v,
            Act::Relu => simd.max_f32s(v, simd.splat_f32s(0.0)),
            Act::Clip(lo, hi) => {
                simd.min_f32s(simd.max_f32s(v, simd.splat_f32s(*lo)), simd.splat_f32s(*hi))
            }
            Act::PRelu(s) => {
                let neg = simd.less_than_f32s(v, simd.splat_f32s(0.0));
                simd.select_f32s(neg, simd.mul_f32s(v, load::<S>(s, c)), v)
            }
        }
    }
}

/// One vector of `s` at `at`.
#[inline(always)]
fn load<S: Simd>(s: &[f32], at: usize) -> S::f32s {
    S::as_simd_f32s(&s[at..at + S::F32_LANES]).0[0]
}

#[inline(always)]
fn store<S: Simd>(s: &mut [f32], at: usize, v: S::f32s) {
    S::as_mut_simd_f32s(&mut s[at..at + S::F32_LANES]).0[0] = v;
}

/// Branch-free round half to even of a vector (as [`round_even`]).
#[inline(always)]
fn round_even_v<S: Simd>(simd: S, v: S::f32s) -> S::f32s {
    const MAGIC: f32 = 12_582_912.0;
    let v = simd.min_f32s(
        simd.max_f32s(v, simd.splat_f32s(-1_048_576.0)),
        simd.splat_f32s(1_048_576.0),
    );
    simd.sub_f32s(
        simd.add_f32s(v, simd.splat_f32s(MAGIC)),
        simd.splat_f32s(MAGIC),
    )
}

/// `clamp(round_even(v) + z, −128, 127) − z`: a centred int8 value.
#[inline(always)]
fn requant_v<S: Simd>(simd: S, v: S::f32s, zero: f32) -> S::f32s {
    let q = simd.add_f32s(round_even_v(simd, v), simd.splat_f32s(zero));
    let q = simd.min_f32s(
        simd.max_f32s(q, simd.splat_f32s(-128.0)),
        simd.splat_f32s(127.0),
    );
    simd.sub_f32s(q, simd.splat_f32s(zero))
}

#[derive(Clone, Debug)]
enum Kind {
    /// 1×1, stride 1, no padding: weights `[Cin][Cout stride]`.
    Pointwise,
    /// Weights `[kh][kw][C stride]`.
    Depthwise,
    /// Weights `[kh][kw][Cin][Cout stride]`.
    Direct,
}

#[derive(Clone, Debug)]
struct Requant {
    /// `s_x·s_w[c]/s_y` per padded channel.
    mult: Aligned,
    zero: f32,
    /// `Some(s_y)`: dequantise after requantising.
    dequant: Option<f32>,
}

#[derive(Clone, Debug)]
struct PackedConv {
    x: usize,
    y: usize,
    kind: Kind,
    shape: ConvShape,
    w: Aligned,
    bias: Aligned,
    requant: Option<Requant>,
    add: Option<usize>,
    act: Act,
}

#[derive(Clone, Debug)]
enum Packed {
    Conv(Box<PackedConv>),
    Quantize {
        x: usize,
        y: usize,
        scale: f32,
        zero: f32,
    },
    Dequantize {
        x: usize,
        y: usize,
        scale: f32,
    },
    Add {
        a: usize,
        b: usize,
        y: usize,
        act: Act,
    },
    Act {
        x: usize,
        y: usize,
        act: Act,
    },
    MaxPool {
        x: usize,
        y: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    },
    Widen {
        x: usize,
        y: usize,
    },
}

/// A packed [`ConvGraph`], ready to run (single-threaded; concurrent callers take turns on
/// its activation buffers).
#[derive(Debug)]
pub struct ConvNet {
    tensors: Vec<Info>,
    ops: Vec<Packed>,
    outputs: Vec<usize>,
    int8_convs: usize,
    convs: usize,
    /// One buffer per tensor (SSA: each written once per run), reused between runs.
    bufs: Mutex<Vec<Aligned>>,
}

impl ConvNet {
    /// Packs the weights of `g` for this CPU's kernels.
    pub fn new(g: ConvGraph) -> Result<ConvNet, DenseError> {
        if g.outputs.is_empty() {
            return Err(DenseError::Shape("graph without outputs".into()));
        }
        let t = &g.tensors;
        let mut ops = Vec::with_capacity(g.ops.len());
        let (mut convs, mut int8_convs) = (0, 0);
        for op in g.ops {
            ops.push(match op {
                Op::Conv {
                    x,
                    y,
                    shape,
                    weights,
                    epi,
                } => {
                    convs += 1;
                    let (xi, yi) = (&t[x], &t[y]);
                    let cso = yi.cs();
                    let (kind, wf, bias, requant) = match weights {
                        ConvWeights::F32 { weight, bias } => {
                            let (k, w) = pack_conv(&shape, &weight, cso, |v| v);
                            (k, Aligned::from_slice(&w), pad(&bias, cso), None)
                        }
                        ConvWeights::Int8 {
                            weight,
                            weight_scale,
                            bias,
                            out_scale,
                            out_zero,
                        } => {
                            int8_convs += 1;
                            let (sx, _) = xi.quant.expect("checked when built");
                            let (k, w) = pack_conv(&shape, &weight, cso, f32::from);
                            let mult: Vec<f32> =
                                weight_scale.iter().map(|ws| sx * ws / out_scale).collect();
                            let b: Vec<f32> = bias.iter().map(|&b| b as f32).collect();
                            let rq = Requant {
                                mult: pad(&mult, cso),
                                zero: f32::from(out_zero),
                                dequant: epi.dequantize.then_some(out_scale),
                            };
                            (k, Aligned::from_slice(&w), pad(&b, cso), Some(rq))
                        }
                    };
                    Packed::Conv(Box::new(PackedConv {
                        x,
                        y,
                        kind,
                        act: Act::pack(&epi.act, shape.out_channels),
                        shape,
                        w: wf,
                        bias,
                        requant,
                        add: epi.add.map(|a| a.0),
                    }))
                }
                Op::Quantize { x, y } => {
                    let (scale, zero) = t[y].quant.expect("quantize output is int8");
                    Packed::Quantize {
                        x,
                        y,
                        scale,
                        zero: zero as f32,
                    }
                }
                Op::Dequantize { x, y } => Packed::Dequantize {
                    x,
                    y,
                    scale: t[x].quant.expect("checked when built").0,
                },
                Op::Add { a, b, y, act } => Packed::Add {
                    a,
                    b,
                    y,
                    act: Act::pack(&act, t[y].c),
                },
                Op::Act { x, y, act } => Packed::Act {
                    x,
                    y,
                    act: Act::pack(&act, t[y].c),
                },
                Op::MaxPool {
                    x,
                    y,
                    kernel,
                    stride,
                    pads,
                } => Packed::MaxPool {
                    x,
                    y,
                    kernel,
                    stride,
                    pads,
                },
                Op::Widen { x, y } => Packed::Widen { x, y },
            });
        }
        let mut bufs: Vec<Aligned> = (0..g.bufs).map(|_| Aligned::default()).collect();
        for i in t {
            bufs[i.buf] = Aligned::zeros(i.h * i.w * i.cs());
        }
        Ok(ConvNet {
            tensors: g.tensors,
            ops,
            outputs: g.outputs,
            int8_convs,
            convs,
            bufs: Mutex::new(bufs),
        })
    }

    /// `(h, w, c)` of the input.
    pub fn input_shape(&self) -> (usize, usize, usize) {
        let i = &self.tensors[0];
        (i.h, i.w, i.c)
    }

    /// `(h, w, c)` of each output.
    pub fn output_shapes(&self) -> Vec<(usize, usize, usize)> {
        self.outputs
            .iter()
            .map(|&o| {
                let i = &self.tensors[o];
                (i.h, i.w, i.c)
            })
            .collect()
    }

    /// Number of convolutions, and of those int8.
    pub fn conv_counts(&self) -> (usize, usize) {
        (self.convs, self.int8_convs)
    }

    /// The kernels' instruction set on this CPU (`f32-avx512`, `f32-avx2`, `f32-neon`,
    /// `f32-scalar`): the int8 convs run on the same lanes (exact integer products).
    pub fn kernel(&self) -> String {
        format!("f32-{}", crate::float_simd())
    }

    /// Runs one image (`h·w·c` values, NHWC) and returns each output, NHWC, `h·w·c` values.
    pub fn run(&self, input: &[f32]) -> Result<Vec<Vec<f32>>, DenseError> {
        let i0 = &self.tensors[0];
        if input.len() != i0.h * i0.w * i0.c {
            return Err(DenseError::Shape(format!(
                "input has {} values, the graph takes {}×{}×{}",
                input.len(),
                i0.h,
                i0.w,
                i0.c
            )));
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        {
            let (c, cs) = (i0.c, i0.cs());
            let b = &mut bufs[i0.buf];
            for (dst, src) in b.chunks_exact_mut(cs).zip(input.chunks_exact(c)) {
                dst[..c].copy_from_slice(src);
            }
        }
        let arch = pulp::Arch::new();
        for op in &self.ops {
            arch.dispatch(Step {
                op,
                t: &self.tensors,
                bufs: &mut bufs,
            });
        }
        Ok(self
            .outputs
            .iter()
            .map(|&o| {
                let i = &self.tensors[o];
                bufs[i.buf]
                    .chunks_exact(i.cs())
                    .flat_map(|p| &p[..i.c])
                    .copied()
                    .collect()
            })
            .collect())
    }
}

fn pad(v: &[f32], n: usize) -> Aligned {
    let mut p = Aligned::zeros(n);
    p[..v.len()].copy_from_slice(v);
    p
}

/// Packs ONNX-order conv weights (`O × I/group × kh × kw`) for the kernel its shape selects.
fn pack_conv<T: Copy>(
    s: &ConvShape,
    w: &[T],
    cso: usize,
    f: impl Fn(T) -> f32,
) -> (Kind, Vec<f32>) {
    let [kh, kw] = s.kernel;
    let (o, per) = (s.out_channels, s.per_output());
    if s.depthwise {
        let mut p = vec![0.0; kh * kw * cso];
        for c in 0..o {
            for t in 0..kh * kw {
                p[t * cso + c] = f(w[c * per + t]);
            }
        }
        return (Kind::Depthwise, p);
    }
    let cin = s.in_channels;
    let mut p = vec![0.0; kh * kw * cin * cso];
    for co in 0..o {
        for ci in 0..cin {
            for t in 0..kh * kw {
                p[(t * cin + ci) * cso + co] = f(w[co * per + ci * kh * kw + t]);
            }
        }
    }
    let pointwise = kh == 1 && kw == 1 && s.stride == [1, 1] && s.pads == [0; 4];
    (
        if pointwise {
            Kind::Pointwise
        } else {
            Kind::Direct
        },
        p,
    )
}

/// One op, run by `pulp` with the best instruction set found.
struct Step<'a> {
    op: &'a Packed,
    t: &'a [Info],
    bufs: &'a mut [Aligned],
}

/// The output buffer (taken out for the op's duration) and the inputs.
fn split(bufs: &mut [Aligned], y: usize) -> (Aligned, &[Aligned]) {
    let out = std::mem::take(&mut bufs[y]);
    (out, bufs)
}

impl pulp::WithSimd for Step<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let t = self.t;
        let l = S::F32_LANES;
        let y = match self.op {
            Packed::Conv(c) => c.y,
            Packed::Quantize { y, .. }
            | Packed::Dequantize { y, .. }
            | Packed::Add { y, .. }
            | Packed::Act { y, .. }
            | Packed::MaxPool { y, .. }
            | Packed::Widen { y, .. } => *y,
        };
        let yb = t[y].buf;
        let (mut out, bufs) = split(self.bufs, yb);
        let buf = |i: usize| &bufs[t[i].buf][..];
        match self.op {
            Packed::Conv(c) => conv(simd, c, t, buf(c.x), c.add.map(buf), &mut out),
            Packed::Quantize { x, scale, zero, .. } => {
                let inv = simd.splat_f32s(*scale);
                for (d, s) in out.chunks_exact_mut(l).zip(buf(*x).chunks_exact(l)) {
                    let v = simd.div_f32s(load::<S>(s, 0), inv);
                    store::<S>(d, 0, requant_v(simd, v, *zero));
                }
                // Padding channels: (0 / s) quantises to 0 centred; nothing else to do.
            }
            Packed::Dequantize { x, scale, .. } => {
                let s = simd.splat_f32s(*scale);
                for (d, v) in out.chunks_exact_mut(l).zip(buf(*x).chunks_exact(l)) {
                    store::<S>(d, 0, simd.mul_f32s(load::<S>(v, 0), s));
                }
            }
            Packed::Add { a, b, act, .. } => {
                let cs = t[y].cs();
                let (a, b) = (buf(*a), buf(*b));
                for at in (0..out.len()).step_by(l) {
                    let v = simd.add_f32s(load::<S>(a, at), load::<S>(b, at));
                    store::<S>(&mut out, at, act.apply(simd, v, at % cs));
                }
            }
            Packed::Act { x, act, .. } => {
                let cs = t[y].cs();
                let x = buf(*x);
                for at in (0..out.len()).step_by(l) {
                    store::<S>(&mut out, at, act.apply(simd, load::<S>(x, at), at % cs));
                }
            }
            Packed::MaxPool {
                x,
                kernel,
                stride,
                pads,
                ..
            } => max_pool(
                simd,
                &t[*x],
                &t[y],
                buf(*x),
                *kernel,
                *stride,
                *pads,
                &mut out,
            ),
            Packed::Widen { x, .. } => {
                let (cx, cy) = (t[*x].cs(), t[y].cs());
                for (d, s) in out.chunks_exact_mut(cy).zip(buf(*x).chunks_exact(cx)) {
                    d[..cx].copy_from_slice(s);
                }
            }
        }
        self.bufs[yb] = out;
    }
}

/// Valid kernel taps along one axis for output index `o`: `lo..hi` of `0..k`.
#[inline(always)]
fn taps(o: usize, stride: usize, pad: usize, k: usize, n: usize) -> (usize, usize) {
    let start = o * stride; // in padded coordinates
    let lo = pad.saturating_sub(start);
    let hi = k.min((n + pad).saturating_sub(start));
    (lo, hi.max(lo))
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn max_pool<S: Simd>(
    simd: S,
    xi: &Info,
    yi: &Info,
    x: &[f32],
    [kh, kw]: [usize; 2],
    [sh, sw]: [usize; 2],
    pads: [usize; 4],
    out: &mut [f32],
) {
    let (cs, l) = (xi.cs(), S::F32_LANES);
    for oy in 0..yi.h {
        let (y0, y1) = taps(oy, sh, pads[0], kh, xi.h);
        for ox in 0..yi.w {
            let (x0, x1) = taps(ox, sw, pads[1], kw, xi.w);
            let o = (oy * yi.w + ox) * cs;
            for c in (0..cs).step_by(l) {
                let mut m = simd.splat_f32s(f32::NEG_INFINITY);
                for ky in y0..y1 {
                    let iy = oy * sh + ky - pads[0];
                    for kx in x0..x1 {
                        let ix = ox * sw + kx - pads[1];
                        m = simd.max_f32s(m, load::<S>(x, (iy * xi.w + ix) * cs + c));
                    }
                }
                store::<S>(out, o + c, m);
            }
        }
    }
}

/// The epilogue of a conv for one vector of output channels `c` at output pixel `pix`.
#[inline(always)]
fn finish<S: Simd>(
    simd: S,
    k: &PackedConv,
    add: Option<&[f32]>,
    cso: usize,
    acc: S::f32s,
    pix: usize,
    c: usize,
) -> S::f32s {
    let mut v = simd.add_f32s(acc, load::<S>(&k.bias, c));
    if let Some(rq) = &k.requant {
        v = requant_v(simd, simd.mul_f32s(v, load::<S>(&rq.mult, c)), rq.zero);
        match rq.dequant {
            Some(s) => v = simd.mul_f32s(v, simd.splat_f32s(s)),
            None => return v,
        }
    }
    if let Some(a) = add {
        v = simd.add_f32s(v, load::<S>(a, pix * cso + c));
    }
    k.act.apply(simd, v, c)
}

#[inline(always)]
fn conv<S: Simd>(
    simd: S,
    k: &PackedConv,
    t: &[Info],
    x: &[f32],
    add: Option<&[f32]>,
    out: &mut [f32],
) {
    let (xi, yi) = (&t[k.x], &t[k.y]);
    let (xs, cso, l) = (xi.cs(), yi.cs(), S::F32_LANES);
    let vecs = cso / l;
    match k.kind {
        Kind::Pointwise => {
            let pixels = yi.h * yi.w;
            let cin = k.shape.in_channels;
            let mut p0 = 0;
            while p0 < pixels {
                let np = PIX.min(pixels - p0);
                let mut v0 = 0;
                while v0 < vecs {
                    let nv = NV.min(vecs - v0);
                    match (np == PIX, nv) {
                        (true, 3) => {
                            pw_block::<S, PIX, 3>(simd, k, x, xs, cin, add, cso, p0, v0, out)
                        }
                        (true, 2) => {
                            pw_block::<S, PIX, 2>(simd, k, x, xs, cin, add, cso, p0, v0, out)
                        }
                        (true, _) => {
                            pw_block::<S, PIX, 1>(simd, k, x, xs, cin, add, cso, p0, v0, out)
                        }
                        (false, _) => {
                            for p in p0..p0 + np {
                                for v in v0..v0 + nv {
                                    pw_block::<S, 1, 1>(simd, k, x, xs, cin, add, cso, p, v, out);
                                }
                            }
                        }
                    }
                    v0 += nv;
                }
                p0 += np;
            }
        }
        Kind::Depthwise => {
            let s = &k.shape;
            let [kh, kw] = s.kernel;
            for oy in 0..yi.h {
                let (y0, y1) = taps(oy, s.stride[0], s.pads[0], kh, xi.h);
                for ox in 0..yi.w {
                    let (x0, x1) = taps(ox, s.stride[1], s.pads[1], kw, xi.w);
                    let pix = oy * yi.w + ox;
                    for c in (0..cso).step_by(l) {
                        let mut acc = simd.splat_f32s(0.0);
                        for ky in y0..y1 {
                            let iy = oy * s.stride[0] + ky - s.pads[0];
                            for kx in x0..x1 {
                                let ix = ox * s.stride[1] + kx - s.pads[1];
                                acc = simd.mul_add_f32s(
                                    load::<S>(&k.w, (ky * kw + kx) * cso + c),
                                    load::<S>(x, (iy * xi.w + ix) * xs + c),
                                    acc,
                                );
                            }
                        }
                        store::<S>(out, pix * cso + c, finish(simd, k, add, cso, acc, pix, c));
                    }
                }
            }
        }
        Kind::Direct => {
            let mut v0 = 0;
            while v0 < vecs {
                let nv = NV.min(vecs - v0);
                match nv {
                    3 => direct::<S, 3>(simd, k, xi, yi, x, add, v0, out),
                    2 => direct::<S, 2>(simd, k, xi, yi, x, add, v0, out),
                    _ => direct::<S, 1>(simd, k, xi, yi, x, add, v0, out),
                }
                v0 += nv;
            }
        }
    }
}

/// `P` pixels × `V` output-channel vectors (from vector `v0`) of a 1×1 conv.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pw_block<S: Simd, const P: usize, const V: usize>(
    simd: S,
    k: &PackedConv,
    x: &[f32],
    xs: usize,
    cin: usize,
    add: Option<&[f32]>,
    cso: usize,
    p0: usize,
    v0: usize,
    out: &mut [f32],
) {
    let l = S::F32_LANES;
    let c0 = v0 * l;
    let rows: [&[f32]; P] = core::array::from_fn(|p| &x[(p0 + p) * xs..(p0 + p) * xs + cin]);
    let mut acc = [[simd.splat_f32s(0.0); V]; P];
    for (ci, wrow) in k.w.chunks_exact(cso).take(cin).enumerate() {
        let wv = S::as_simd_f32s(&wrow[c0..c0 + V * l]).0;
        let xv: [S::f32s; P] = core::array::from_fn(|p| simd.splat_f32s(rows[p][ci]));
        for (a, x) in acc.iter_mut().zip(xv) {
            for (a, w) in a.iter_mut().zip(wv) {
                *a = simd.mul_add_f32s(*w, x, *a);
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        let pix = p0 + p;
        for (v, a) in a.iter().enumerate() {
            let c = c0 + v * l;
            store::<S>(out, pix * cso + c, finish(simd, k, add, cso, *a, pix, c));
        }
    }
}

/// A direct conv for `V` output-channel vectors from vector `v0`, every output pixel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn direct<S: Simd, const V: usize>(
    simd: S,
    k: &PackedConv,
    xi: &Info,
    yi: &Info,
    x: &[f32],
    add: Option<&[f32]>,
    v0: usize,
    out: &mut [f32],
) {
    let s = &k.shape;
    let [kh, kw] = s.kernel;
    let (xs, cso, l, cin) = (xi.cs(), yi.cs(), S::F32_LANES, s.in_channels);
    let c0 = v0 * l;
    for oy in 0..yi.h {
        let (y0, y1) = taps(oy, s.stride[0], s.pads[0], kh, xi.h);
        for ox in 0..yi.w {
            let (x0, x1) = taps(ox, s.stride[1], s.pads[1], kw, xi.w);
            let pix = oy * yi.w + ox;
            let mut acc = [simd.splat_f32s(0.0); V];
            for ky in y0..y1 {
                let iy = oy * s.stride[0] + ky - s.pads[0];
                for kx in x0..x1 {
                    let ix = ox * s.stride[1] + kx - s.pads[1];
                    let xrow = &x[(iy * xi.w + ix) * xs..(iy * xi.w + ix) * xs + cin];
                    let wt = &k.w[(ky * kw + kx) * cin * cso..(ky * kw + kx + 1) * cin * cso];
                    for (ci, &xv) in xrow.iter().enumerate() {
                        let wv = S::as_simd_f32s(&wt[ci * cso + c0..ci * cso + c0 + V * l]).0;
                        let xv = simd.splat_f32s(xv);
                        for v in 0..V {
                            acc[v] = simd.mul_add_f32s(wv[v], xv, acc[v]);
                        }
                    }
                }
            }
            for (v, a) in acc.iter().enumerate() {
                let c = c0 + v * l;
                store::<S>(out, pix * cso + c, finish(simd, k, add, cso, *a, pix, c));
            }
        }
    }
}

#[cfg(test)]
mod tests;
