//! Which ONNX conv graphs Hearth's dense engine ([`hearth_dense::conv`]) runs: image models at
//! batch 1 made of `Conv` (full or depthwise, dilation 1), `Relu`/`Clip`/`PRelu`, `Add`,
//! `MaxPool`, channel zero padding (`Concat` with a `ConstantOfShape` zero tensor on axis 1),
//! and the layout ops around them (`Transpose` NHWC↔NCHW, `Reshape` of an NHWC tensor,
//! `Identity`); and their int8 exports (`QuantizeLinear` → `QLinearConv` →
//! `DequantizeLinear`, as `hearth-compress`'s `qconv` writes them, per-channel weight scales).
//!
//! Nodes are lowered in graph order; a conv's only reader, when it is an activation, an `Add`
//! whose other side is already computed, or (int8) the `DequantizeLinear` of its output, is
//! fused into the conv's epilogue. Anything else — another op, a dilation, a group that is
//! neither 1 nor depthwise, a non-constant weight — is an error naming the node, and the caller
//! uses tract. Callers check the engine against tract on probe inputs (the camera does, at
//! load).

use std::collections::{HashMap, HashSet};

use crate::onnx::{initializer_data, InitValues, OnnxModel};
use crate::ModelError;
use hearth_dense::conv::{
    Activation, ConvGraph, ConvNet, ConvShape, ConvWeights, Epilogue, TensorId,
};
use tract_onnx::pb::{self, tensor_proto::DataType};

/// How a lowered value's NHWC storage maps to the ONNX tensor.
#[derive(Clone, Debug, PartialEq)]
enum Layout {
    /// ONNX `[1, C, H, W]` (stored NHWC).
    Nchw,
    /// ONNX `[1, H, W, C]`.
    Nhwc,
    /// ONNX shape `dims`, the NHWC storage flattened.
    Flat(Vec<usize>),
}

#[derive(Clone, Debug)]
struct Val {
    t: TensorId,
    layout: Layout,
}

/// A graph output of a [`ConvEngine`].
#[derive(Clone, Debug, PartialEq)]
pub struct ConvOutput {
    /// ONNX name.
    pub name: String,
    /// ONNX shape.
    pub shape: Vec<usize>,
}

/// An ONNX conv graph lowered to the dense engine.
#[derive(Debug)]
pub struct ConvEngine {
    net: ConvNet,
    /// The ONNX input is `[1, C, H, W]` (else `[1, H, W, C]`).
    input_nchw: bool,
    /// Per output: whether to transpose NHWC storage to NCHW.
    outputs: Vec<(ConvOutput, bool)>,
}

impl ConvEngine {
    /// Lowers `model` (input fixed to batch 1 at `input_shape`, the ONNX input's shape).
    pub fn new(model: &OnnxModel, input_shape: &[usize]) -> Result<ConvEngine, ModelError> {
        Lowering::run(model, input_shape)
    }

    /// The ONNX input shape it takes.
    pub fn input_shape(&self) -> Vec<usize> {
        let (h, w, c) = self.net.input_shape();
        if self.input_nchw {
            vec![1, c, h, w]
        } else {
            vec![1, h, w, c]
        }
    }

    /// The outputs, in ONNX graph order.
    pub fn outputs(&self) -> Vec<ConvOutput> {
        self.outputs.iter().map(|(o, _)| o.clone()).collect()
    }

    /// Convolutions, and of those int8.
    pub fn conv_counts(&self) -> (usize, usize) {
        self.net.conv_counts()
    }

    /// The kernels' instruction set on this CPU.
    pub fn kernel(&self) -> String {
        self.net.kernel()
    }

    /// Runs one input (ONNX layout, row-major) and returns the outputs (ONNX layout).
    pub fn run(&self, input: &[f32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let (h, w, c) = self.net.input_shape();
        let outs = if self.input_nchw {
            if input.len() != c * h * w {
                return Err(ModelError::Shape(format!(
                    "input has {} values, expected {}",
                    input.len(),
                    c * h * w
                )));
            }
            let mut nhwc = vec![0.0; input.len()];
            for ch in 0..c {
                for p in 0..h * w {
                    nhwc[p * c + ch] = input[ch * h * w + p];
                }
            }
            self.net.run(&nhwc)?
        } else {
            self.net.run(input)?
        };
        Ok(outs
            .into_iter()
            .zip(&self.outputs)
            .map(|(v, (o, nchw))| {
                if !*nchw {
                    return v;
                }
                let [_, c, h, w] = o.shape[..] else {
                    return v;
                };
                let mut t = vec![0.0; v.len()];
                for p in 0..h * w {
                    for ch in 0..c {
                        t[ch * h * w + p] = v[p * c + ch];
                    }
                }
                t
            })
            .collect())
    }
}

fn err(n: &pb::NodeProto, msg: &str) -> ModelError {
    ModelError::Onnx(format!(
        "dense conv engine: {} node {:?}: {msg}",
        n.op_type, n.name
    ))
}

fn attr<'n>(n: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn ints(n: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn usizes(v: &[i64]) -> Option<Vec<usize>> {
    v.iter().map(|&x| usize::try_from(x).ok()).collect()
}

struct Lowering<'m> {
    g: &'m pb::GraphProto,
    inits: HashMap<&'m str, &'m pb::TensorProto>,
    /// Readers per tensor name (graph outputs count as one).
    readers: HashMap<&'m str, usize>,
    vals: HashMap<String, Val>,
    /// `ConstantOfShape` zero tensors: name → ONNX shape.
    zeros: HashMap<String, Vec<usize>>,
    done: HashSet<usize>,
    cg: ConvGraph,
}

impl<'m> Lowering<'m> {
    fn run(model: &'m OnnxModel, input_shape: &[usize]) -> Result<ConvEngine, ModelError> {
        let g = model
            .proto()
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Onnx("model has no graph".into()))?;
        let inits: HashMap<&str, &pb::TensorProto> =
            g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        let inputs: Vec<&pb::ValueInfoProto> = g
            .input
            .iter()
            .filter(|i| !inits.contains_key(i.name.as_str()))
            .collect();
        let [input] = inputs[..] else {
            return Err(ModelError::Onnx(format!(
                "dense conv engine: {} graph inputs, one expected",
                inputs.len()
            )));
        };
        let &[1, a, b, c] = input_shape else {
            return Err(ModelError::Shape(format!(
                "dense conv engine: input shape {input_shape:?}, [1, …] of rank 4 expected"
            )));
        };
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for n in &g.node {
            for i in &n.input {
                *readers.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &g.output {
            *readers.entry(o.name.as_str()).or_default() += 1;
        }
        // NHWC input when a Transpose to NCHW reads it (TF exports); NCHW otherwise.
        let nhwc = g.node.iter().any(|n| {
            n.op_type == "Transpose"
                && n.input.first() == Some(&input.name)
                && ints(n, "perm").as_deref() == Some(&[0, 3, 1, 2])
        });
        let (h, w, ch) = if nhwc { (a, b, c) } else { (b, c, a) };
        let (cg, t) = ConvGraph::new(h, w, ch);
        let mut l = Lowering {
            g,
            inits,
            readers,
            vals: HashMap::new(),
            zeros: HashMap::new(),
            done: HashSet::new(),
            cg,
        };
        l.vals.insert(
            input.name.clone(),
            Val {
                t,
                layout: if nhwc { Layout::Nhwc } else { Layout::Nchw },
            },
        );
        for i in 0..g.node.len() {
            if !l.done.contains(&i) {
                l.node(i)?;
            }
        }
        let mut outputs = Vec::new();
        for o in &g.output {
            let v = l.vals.get(&o.name).cloned().ok_or_else(|| {
                ModelError::Onnx(format!("dense conv engine: output {} not computed", o.name))
            })?;
            if l.cg.is_int8(v.t) {
                return Err(ModelError::Onnx(format!(
                    "dense conv engine: output {} is int8",
                    o.name
                )));
            }
            let (h, w, c) = l.cg.shape(v.t);
            let (shape, nchw) = match v.layout {
                Layout::Nchw => (vec![1, c, h, w], true),
                Layout::Nhwc => (vec![1, h, w, c], false),
                Layout::Flat(d) => (d, false),
            };
            l.cg.output(v.t)?;
            outputs.push((
                ConvOutput {
                    name: o.name.clone(),
                    shape,
                },
                nchw,
            ));
        }
        Ok(ConvEngine {
            net: ConvNet::new(l.cg)?,
            input_nchw: !nhwc,
            outputs,
        })
    }

    fn val(&self, n: &pb::NodeProto, name: &str) -> Result<Val, ModelError> {
        self.vals
            .get(name)
            .cloned()
            .ok_or_else(|| err(n, &format!("input {name} is not a computed tensor")))
    }

    /// A 4-D value in ONNX NCHW layout.
    fn nchw(&self, n: &pb::NodeProto, name: &str) -> Result<TensorId, ModelError> {
        let v = self.val(n, name)?;
        if v.layout != Layout::Nchw {
            return Err(err(n, "input not in NCHW layout"));
        }
        Ok(v.t)
    }

    fn init(&self, name: &str) -> Option<(Vec<usize>, DataType, InitValues)> {
        initializer_data(self.inits.get(name)?)
    }

    fn init_f32(
        &self,
        n: &pb::NodeProto,
        name: &str,
    ) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        match self.init(name) {
            Some((d, DataType::Float, InitValues::Float(v))) => Ok((d, v)),
            _ => Err(err(n, &format!("{name} is not a constant f32 tensor"))),
        }
    }

    fn init_int(
        &self,
        n: &pb::NodeProto,
        name: &str,
        dt: DataType,
    ) -> Result<(Vec<usize>, Vec<i64>), ModelError> {
        match self.init(name) {
            Some((d, t, InitValues::Int(v))) if t == dt => Ok((d, v)),
            _ => Err(err(n, &format!("{name} is not a constant {dt:?} tensor"))),
        }
    }

    fn scalar_f32(&self, n: &pb::NodeProto, name: &str) -> Result<f32, ModelError> {
        match self.init_f32(n, name)?.1[..] {
            [v] => Ok(v),
            _ => Err(err(n, &format!("{name} is not a scalar"))),
        }
    }

    fn scalar_i8(&self, n: &pb::NodeProto, name: &str) -> Result<i8, ModelError> {
        match self.init_int(n, name, DataType::Int8)?.1[..] {
            [v] => Ok(v as i8),
            _ => Err(err(n, &format!("{name} is not a scalar"))),
        }
    }

    fn only_reader(&self, name: &str) -> Option<usize> {
        if self.readers.get(name) != Some(&1) {
            return None;
        }
        self.g
            .node
            .iter()
            .position(|n| n.input.iter().any(|i| i == name))
    }

    /// The activation node `n` stands for, if it is one.
    fn activation(&self, n: &pb::NodeProto) -> Result<Option<Activation>, ModelError> {
        Ok(Some(match n.op_type.as_str() {
            "Relu" => Activation::Relu,
            "Clip" => {
                let bound = |k: usize, attr_name: &str, d: f32| -> Result<f32, ModelError> {
                    match n.input.get(k).filter(|s| !s.is_empty()) {
                        Some(name) => self.scalar_f32(n, name),
                        None => Ok(attr(n, attr_name).map_or(d, |a| a.f)),
                    }
                };
                Activation::Clip(
                    bound(1, "min", f32::NEG_INFINITY)?,
                    bound(2, "max", f32::INFINITY)?,
                )
            }
            "PRelu" => {
                let name = n.input.get(1).ok_or_else(|| err(n, "no slope"))?;
                let (d, v) = self.init_f32(n, name)?;
                // [C,1,1], [C] or a scalar.
                if d.iter().skip(1).any(|&x| x != 1) && v.len() != 1 {
                    return Err(err(n, "slope not per channel"));
                }
                Activation::PRelu(v)
            }
            _ => return Ok(None),
        }))
    }

    fn out(n: &pb::NodeProto) -> Result<&str, ModelError> {
        n.output
            .first()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err(n, "no output"))
    }

    fn set(&mut self, name: &str, t: TensorId) {
        self.vals.insert(
            name.to_string(),
            Val {
                t,
                layout: Layout::Nchw,
            },
        );
    }

    /// Fuses what follows a conv whose (float) output is `name`: an `Add` with a computed
    /// float NCHW tensor, then an activation. Returns the epilogue and the final output name.
    fn fuse_tail(
        &mut self,
        name: &str,
        mut epi: Epilogue,
    ) -> Result<(Epilogue, String), ModelError> {
        let mut cur = name.to_string();
        if let Some(i) = self.only_reader(&cur) {
            let n = &self.g.node[i];
            if n.op_type == "Add" && n.input.len() == 2 {
                let other = if n.input[0] == cur {
                    &n.input[1]
                } else {
                    &n.input[0]
                };
                if let Some(v) = self.vals.get(other.as_str()) {
                    if v.layout == Layout::Nchw && !self.cg.is_int8(v.t) && *other != cur {
                        epi.add = Some(v.t);
                        self.done.insert(i);
                        cur = Self::out(n)?.to_string();
                    }
                }
            }
        }
        if let Some(i) = self.only_reader(&cur) {
            let n = &self.g.node[i];
            if n.input.first() == Some(&cur) {
                if let Some(a) = self.activation(n)? {
                    epi.act = a;
                    self.done.insert(i);
                    cur = Self::out(n)?.to_string();
                }
            }
        }
        Ok((epi, cur))
    }

    fn conv_shape(
        &self,
        n: &pb::NodeProto,
        x: TensorId,
        wdims: &[usize],
    ) -> Result<ConvShape, ModelError> {
        let (_, _, cin) = self.cg.shape(x);
        let &[o, i, kh, kw] = wdims else {
            return Err(err(n, "weight is not 4-D"));
        };
        if let Some(a) = attr(n, "auto_pad") {
            if !a.s.is_empty() && a.s != b"NOTSET" && a.s != b"VALID" {
                return Err(err(n, "auto_pad SAME is not supported"));
            }
        }
        if ints(n, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
            return Err(err(n, "dilation ≠ 1"));
        }
        let group = attr(n, "group").map_or(1, |a| a.i);
        let depthwise = group != 1;
        if depthwise && !(group as usize == cin && i == 1 && o == cin) {
            return Err(err(n, "group is neither 1 nor depthwise"));
        }
        if !depthwise && i != cin {
            return Err(err(n, "weight/input channels differ"));
        }
        if let Some(k) = ints(n, "kernel_shape") {
            if usizes(&k) != Some(vec![kh, kw]) {
                return Err(err(n, "kernel_shape differs from the weight"));
            }
        }
        let stride = usizes(&ints(n, "strides").unwrap_or(vec![1, 1]))
            .filter(|s| s.len() == 2)
            .ok_or_else(|| err(n, "bad strides"))?;
        let pads = usizes(&ints(n, "pads").unwrap_or(vec![0; 4]))
            .filter(|p| p.len() == 4)
            .ok_or_else(|| err(n, "bad pads"))?;
        Ok(ConvShape {
            in_channels: cin,
            out_channels: o,
            kernel: [kh, kw],
            stride: [stride[0], stride[1]],
            pads: [pads[0], pads[1], pads[2], pads[3]],
            depthwise,
        })
    }

    fn node(&mut self, i: usize) -> Result<(), ModelError> {
        self.done.insert(i);
        let g = self.g;
        let n = &g.node[i];
        let input = |k: usize| -> Result<&str, ModelError> {
            n.input
                .get(k)
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| err(n, &format!("missing input {k}")))
        };
        let out = Self::out(n)?;
        match (n.domain.as_str(), n.op_type.as_str()) {
            ("", "Conv") => {
                let x = self.nchw(n, input(0)?)?;
                let (wd, w) = self.init_f32(n, input(1)?)?;
                let shape = self.conv_shape(n, x, &wd)?;
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(b) => self.init_f32(n, b)?.1,
                    None => vec![0.0; shape.out_channels],
                };
                let (epi, name) = self.fuse_tail(out, Epilogue::default())?;
                let y = self
                    .cg
                    .conv(x, shape, ConvWeights::F32 { weight: w, bias }, epi)?;
                self.set(&name, y);
            }
            ("", "QLinearConv") => {
                let x = self.nchw(n, input(0)?)?;
                let (sx, zx) = (
                    self.scalar_f32(n, input(1)?)?,
                    self.scalar_i8(n, input(2)?)?,
                );
                let _ = (sx, zx); // The input tensor carries its own (checked below).
                let (wd, w) = self.init_int(n, input(3)?, DataType::Int8)?;
                let (_, ws) = self.init_f32(n, input(4)?)?;
                let (_, wz) = self.init_int(n, input(5)?, DataType::Int8)?;
                if wz.iter().any(|&z| z != 0) {
                    return Err(err(n, "weight zero point ≠ 0"));
                }
                let (ys, yz) = (
                    self.scalar_f32(n, input(6)?)?,
                    self.scalar_i8(n, input(7)?)?,
                );
                let shape = self.conv_shape(n, x, &wd)?;
                let oc = shape.out_channels;
                let ws = if ws.len() == 1 { vec![ws[0]; oc] } else { ws };
                let bias: Vec<i32> = match n.input.get(8).filter(|s| !s.is_empty()) {
                    Some(b) => self
                        .init_int(n, b, DataType::Int32)?
                        .1
                        .iter()
                        .map(|&v| v as i32)
                        .collect(),
                    None => vec![0; oc],
                };
                if self.quant_of(x) != Some((sx, zx)) {
                    return Err(err(n, "input quantisation differs from its producer's"));
                }
                // Fuse the DequantizeLinear that is the output's only reader.
                let mut epi = Epilogue::default();
                let mut name = out.to_string();
                if let Some(d) = self.only_reader(out) {
                    let dn = &g.node[d];
                    if dn.op_type == "DequantizeLinear"
                        && dn.input.first().map(String::as_str) == Some(out)
                        && dn.input.get(1).map(|s| self.scalar_f32(dn, s).ok()) == Some(Some(ys))
                        && dn.input.get(2).map(|s| self.scalar_i8(dn, s).ok()) == Some(Some(yz))
                    {
                        self.done.insert(d);
                        epi.dequantize = true;
                        let (e, nm) = self.fuse_tail(Self::out(dn)?, epi)?;
                        (epi, name) = (e, nm);
                    }
                }
                let weights = ConvWeights::Int8 {
                    weight: w.iter().map(|&v| v as i8).collect(),
                    weight_scale: ws,
                    bias,
                    out_scale: ys,
                    out_zero: yz,
                };
                let y = self.cg.conv(x, shape, weights, epi)?;
                self.set(&name, y);
            }
            ("", "QuantizeLinear") => {
                let x = self.nchw(n, input(0)?)?;
                let (s, z) = (
                    self.scalar_f32(n, input(1)?)?,
                    self.scalar_i8(n, input(2)?)?,
                );
                let y = self.cg.quantize(x, s, z)?;
                self.set(out, y);
            }
            ("", "DequantizeLinear") => {
                let x = self.nchw(n, input(0)?)?;
                let (s, z) = (
                    self.scalar_f32(n, input(1)?)?,
                    self.scalar_i8(n, input(2)?)?,
                );
                if self.quant_of(x) != Some((s, z)) {
                    return Err(err(n, "scale/zero point differ from the tensor's"));
                }
                let y = self.cg.dequantize(x)?;
                self.set(out, y);
            }
            ("", "Add") => {
                let (a, b) = (self.nchw(n, input(0)?)?, self.nchw(n, input(1)?)?);
                let (epi, name) = self.fuse_tail(out, Epilogue::default())?;
                // A second Add fused by `fuse_tail` (a + b) + c, then the activation.
                let y = match epi.add {
                    Some(c) => {
                        let s = self.cg.add(a, b, Activation::Identity)?;
                        self.cg.add(s, c, epi.act)?
                    }
                    None => self.cg.add(a, b, epi.act)?,
                };
                self.set(&name, y);
            }
            ("", "Relu" | "Clip" | "PRelu") => {
                let x = self.nchw(n, input(0)?)?;
                let act = self.activation(n)?.expect("an activation op");
                let y = self.cg.activation(x, act)?;
                self.set(out, y);
            }
            ("", "MaxPool") => {
                let x = self.nchw(n, input(0)?)?;
                if attr(n, "ceil_mode").is_some_and(|a| a.i != 0)
                    || attr(n, "storage_order").is_some_and(|a| a.i != 0)
                    || ints(n, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1))
                    || n.output.len() > 1
                {
                    return Err(err(n, "ceil_mode, dilations, storage order or indices"));
                }
                let k = ints(n, "kernel_shape")
                    .and_then(|k| usizes(&k))
                    .filter(|k| k.len() == 2);
                let k = k.ok_or_else(|| err(n, "bad kernel_shape"))?;
                let s = usizes(&ints(n, "strides").unwrap_or(vec![1, 1]))
                    .filter(|s| s.len() == 2)
                    .ok_or_else(|| err(n, "bad strides"))?;
                let p = usizes(&ints(n, "pads").unwrap_or(vec![0; 4]))
                    .filter(|p| p.len() == 4)
                    .ok_or_else(|| err(n, "bad pads"))?;
                let y =
                    self.cg
                        .max_pool(x, [k[0], k[1]], [s[0], s[1]], [p[0], p[1], p[2], p[3]])?;
                self.set(out, y);
            }
            ("", "ConstantOfShape") => {
                let (_, dims) = self.init_int(n, input(0)?, DataType::Int64)?;
                let zero = match attr(n, "value").and_then(|a| a.t.as_ref()) {
                    None => true,
                    Some(t) => match initializer_data(t) {
                        Some((_, _, InitValues::Float(v))) => v.iter().all(|&x| x == 0.0),
                        Some((_, _, InitValues::Int(v))) => v.iter().all(|&x| x == 0),
                        None => false,
                    },
                };
                if !zero {
                    return Err(err(n, "non-zero fill"));
                }
                let d = usizes(&dims).ok_or_else(|| err(n, "negative shape"))?;
                self.zeros.insert(out.to_string(), d);
            }
            ("", "Concat") => {
                let axis = attr(n, "axis").map_or(1, |a| a.i);
                let (x, z) = (input(0)?, input(1)?);
                let x = self.nchw(n, x)?;
                let zd = self.zeros.get(z).cloned();
                let (h, w, c) = self.cg.shape(x);
                match zd {
                    Some(d)
                        if axis == 1
                            && n.input.len() == 2
                            && d.len() == 4
                            && d[0] == 1
                            && d[2] == h
                            && d[3] == w =>
                    {
                        let y = self.cg.pad_channels(x, c + d[1])?;
                        self.set(out, y);
                    }
                    _ => return Err(err(n, "only channel padding with zeros is supported")),
                }
            }
            ("", "Identity") => {
                let v = self.val(n, input(0)?)?;
                self.vals.insert(out.to_string(), v);
            }
            ("", "Transpose") => {
                let v = self.val(n, input(0)?)?;
                let perm = ints(n, "perm").unwrap_or_default();
                let layout = match (&v.layout, perm.as_slice()) {
                    (Layout::Nhwc, [0, 3, 1, 2]) => Layout::Nchw,
                    (Layout::Nchw, [0, 2, 3, 1]) => Layout::Nhwc,
                    _ => return Err(err(n, "only NHWC↔NCHW transposes are supported")),
                };
                self.vals.insert(out.to_string(), Val { t: v.t, layout });
            }
            ("", "Reshape") => {
                let v = self.val(n, input(0)?)?;
                let (h, w, c) = self.cg.shape(v.t);
                let (_, shape) = self.init_int(n, input(1)?, DataType::Int64)?;
                let total = h * w * c;
                let known: i64 = shape.iter().filter(|&&d| d > 0).product();
                let dims: Option<Vec<usize>> = shape
                    .iter()
                    .map(|&d| match d {
                        -1 if known > 0 => Some(total / known as usize),
                        d if d > 0 => Some(d as usize),
                        _ => None,
                    })
                    .collect();
                let dims = dims.filter(|d| d.iter().product::<usize>() == total);
                let dims = dims.ok_or_else(|| err(n, "shape does not fit"))?;
                // NHWC storage flattens as the ONNX tensor only when the layout is NHWC (or
                // one of H·W and C is 1 — not needed so far).
                if !matches!(v.layout, Layout::Nhwc | Layout::Flat(_)) {
                    return Err(err(n, "reshape of an NCHW tensor"));
                }
                self.vals.insert(
                    out.to_string(),
                    Val {
                        t: v.t,
                        layout: Layout::Flat(dims),
                    },
                );
            }
            (d, op) => {
                return Err(err(
                    n,
                    &format!(
                        "op {}{op} is not supported",
                        if d.is_empty() { "" } else { d }
                    ),
                ))
            }
        }
        Ok(())
    }

    /// The `(scale, zero point)` of an int8 value (None for float).
    fn quant_of(&self, t: TensorId) -> Option<(f32, i8)> {
        self.cg.quant(t).map(|(s, z)| (s, z as i8))
    }
}
