//! Graph normalisation: the first step of every recipe, so that graphs as common exporters
//! write them (weights in `Constant` nodes, unfused BatchNormalization, Identity chains) look
//! like the graphs the later steps expect (weights as initializers, one Conv/Gemm per layer).
//!
//! Passes, in order, each counted in [`NormaliseReport`]:
//! 1. `Constant` nodes → initializers (PaddlePaddle's paddle2onnx and older PyTorch exporters
//!    store every weight this way, so a step looking at initializers sees no weight at all);
//! 2. constant sub-graphs fold: a node whose inputs all come from initializers is replaced by
//!    the values tract computes for its outputs during analysis (unless that grows the file:
//!    a `ConstantOfShape` or `Expand` stays);
//! 3. `BatchNormalization` folds into the preceding `Conv` (per output channel) or `Gemm`
//!    (per output column) when that node's constant weights feed only the BN;
//! 4. `Identity`, no-op `Cast` (to the type it already has) and no-op `Reshape` (to the shape
//!    it already has; only when the input shape is fixed, as shapes are analysed at batch 1)
//!    go, and `Reshape → Reshape` chains collapse to the last one;
//! 5. nodes and initializers nothing reads go;
//! 6. shapes: when the input shape is fixed (by the exporter or `--input-shape`), graph
//!    outputs whose dimensions the exporter left symbolic get the dimensions tract infers.
//!
//! Types and shapes of intermediate tensors come from tract's analysis of the graph with its
//! input fixed ([`tensor_facts`]). [`check_equivalence`] runs the original and the normalised
//! graph in tract on the same inputs and reports the largest output difference; the pipeline
//! fails when it exceeds [`tolerance`]. [`unsupported_ops`] lists the ops tract has no
//! translation for, so the CLI can name them before any step runs.

use crate::measure::{extra_inputs, input_shape, GenericRunner};
use hearth_model::error::ModelError;
use hearth_model::onnx::{f32_initializer, initializer_data, raw_initializer, InitValues};
use hearth_model::tensor::Tensor as HTensor;
use hearth_model::OnnxModel;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::fmt;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Relative tolerance of the normalised graph's outputs: `max |Δ| <= REL_TOL · max(1, max |y|)`.
pub const REL_TOL: f32 = 1e-3;

/// What normalisation changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NormaliseReport {
    /// `Constant` nodes turned into initializers.
    pub constants: usize,
    /// Nodes of constant sub-graphs replaced by their values.
    pub folded: usize,
    /// BatchNormalization nodes folded into the preceding Conv/Gemm.
    pub batchnorms: usize,
    /// BatchNormalization nodes left (no foldable Conv/Gemm before them).
    pub batchnorms_left: usize,
    /// `Identity` nodes removed.
    pub identities: usize,
    /// No-op `Cast` nodes removed.
    pub casts: usize,
    /// No-op `Reshape` nodes removed or chains collapsed.
    pub reshapes: usize,
    /// Nodes no output depends on, removed.
    pub dead_nodes: usize,
    /// Graph outputs given concrete dimensions.
    pub shapes: usize,
}

impl NormaliseReport {
    /// True when the graph was rewritten.
    pub fn changed(&self) -> bool {
        self.constants
            + self.folded
            + self.batchnorms
            + self.identities
            + self.casts
            + self.reshapes
            + self.dead_nodes
            + self.shapes
            > 0
    }
}

impl fmt::Display for NormaliseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            (self.constants, "Constant→initializer"),
            (self.folded, "constant nodes folded"),
            (self.batchnorms, "BatchNorm folded"),
            (self.batchnorms_left, "BatchNorm left"),
            (self.identities, "Identity removed"),
            (self.casts, "no-op Cast removed"),
            (self.reshapes, "Reshape removed"),
            (self.dead_nodes, "dead nodes removed"),
            (self.shapes, "output shapes inferred"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            write!(f, "nothing to normalise")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

/// Element type and (concrete) shape of a tensor, as tract infers them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFact {
    /// ONNX element type, when known.
    pub onnx_type: Option<i32>,
    /// Dimensions, when all are known.
    pub shape: Option<Vec<usize>>,
    /// The value, when tract computes it from constants alone.
    pub value: Option<Arc<Tensor>>,
}

fn onnx_type_of(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::F32 => DataType::Float,
        DatumType::F64 => DataType::Double,
        DatumType::F16 => DataType::Float16,
        DatumType::I8 => DataType::Int8,
        DatumType::U8 => DataType::Uint8,
        DatumType::I16 => DataType::Int16,
        DatumType::U16 => DataType::Uint16,
        DatumType::I32 => DataType::Int32,
        DatumType::U32 => DataType::Uint32,
        DatumType::I64 | DatumType::TDim => DataType::Int64,
        DatumType::U64 => DataType::Uint64,
        DatumType::Bool => DataType::Bool,
        _ => return None,
    })
}

/// tract's analysis of `model` with its data input fixed to its batch-1 shape: type, shape and
/// (for constant sub-graphs) value of every named tensor. Analysis errors leave facts partial.
pub fn tensor_facts(model: &OnnxModel) -> Result<HashMap<String, TensorFact>, ModelError> {
    let shape = input_shape(model)?;
    let mut m = tract_onnx::onnx()
        .model_for_proto_model(model.proto())
        .and_then(|m| m.with_input_fact(0, f32::fact(&shape).into()))
        .map_err(ModelError::tract)?;
    for (k, (_, s)) in extra_inputs(model)?.iter().enumerate() {
        m = m
            .with_input_fact(k + 1, f32::fact(s).into())
            .map_err(ModelError::tract)?;
    }
    let _ = m.analyse(false);
    let mut facts = HashMap::new();
    for node in m.nodes() {
        for (ix, out) in node.outputs.iter().enumerate() {
            // Sources and constants are named after their tensor but carry no outlet label.
            let label = match m.outlet_label(OutletId::new(node.id, ix)) {
                Some(l) => l,
                None if ix == 0 => node.name.as_str(),
                None => continue,
            };
            let f = &out.fact;
            let onnx_type = f
                .datum_type
                .concretize()
                .and_then(onnx_type_of)
                .map(|d| d as i32);
            let shape = f.shape.concretize().and_then(|dims| {
                dims.iter()
                    .map(|d| d.to_i64().ok().and_then(|v| usize::try_from(v).ok()))
                    .collect::<Option<Vec<_>>>()
            });
            facts.insert(
                label.to_string(),
                TensorFact {
                    onnx_type,
                    shape,
                    value: f.value.concretize(),
                },
            );
        }
    }
    Ok(facts)
}

/// Op types of `model` that tract has no translation for, with the first node using each.
pub fn unsupported_ops(model: &OnnxModel) -> Vec<(String, String)> {
    let reg = tract_onnx::onnx().op_register;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let Some(g) = model.proto().graph.as_ref() else {
        return out;
    };
    let mut graphs = vec![g];
    while let Some(g) = graphs.pop() {
        for n in &g.node {
            if !reg.0.contains_key(&n.op_type) && seen.insert(n.op_type.clone()) {
                let node = if n.name.is_empty() {
                    n.output.first().cloned().unwrap_or_default()
                } else {
                    n.name.clone()
                };
                out.push((n.op_type.clone(), node));
            }
            for a in &n.attribute {
                graphs.extend(a.g.iter());
                graphs.extend(a.graphs.iter());
            }
        }
    }
    out
}

/// `model` with its data input's dimensions set to `shape` (e.g. `[1, 3, 48, 192]` for a
/// model exported with symbolic height and width).
pub fn pin_input_shape(model: &OnnxModel, shape: &[usize]) -> Result<OnnxModel, ModelError> {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let name = model
        .input_name()
        .ok_or_else(|| ModelError::Onnx("graph has no data input".into()))?
        .to_string();
    let mut proto = model.proto().clone();
    let g = proto.graph.as_mut().expect("graph");
    let vi = g
        .input
        .iter_mut()
        .find(|i| i.name == name)
        .ok_or_else(|| ModelError::Onnx(format!("no input {name}")))?;
    let Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(t)),
        ..
    }) = vi.r#type.as_mut()
    else {
        return Err(ModelError::Onnx(format!("input {name} is not a tensor")));
    };
    if let Some(s) = &t.shape {
        if s.dim.len() != shape.len() {
            return Err(ModelError::Shape(format!(
                "input {name} has rank {}, --input-shape gives {shape:?}",
                s.dim.len()
            )));
        }
    }
    t.shape = Some(pb::TensorShapeProto {
        dim: shape
            .iter()
            .map(|&d| Dimension {
                value: Some(Value::DimValue(d as i64)),
                ..Default::default()
            })
            .collect(),
    });
    OnnxModel::from_bytes(&proto.encode_to_vec())
}

/// The initializer of a `Constant` node's value attribute, named `name`.
fn constant_tensor(node: &pb::NodeProto, name: &str) -> Option<pb::TensorProto> {
    let a = node.attribute.first()?;
    if node.attribute.len() != 1 {
        return None;
    }
    let t = match a.name.as_str() {
        "value" => {
            let mut t = a.t.clone()?;
            t.name = name.into();
            t
        }
        "value_float" => raw_initializer(name, &[], DataType::Float, a.f.to_le_bytes().to_vec()),
        "value_floats" => raw_initializer(
            name,
            &[a.floats.len()],
            DataType::Float,
            a.floats.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        "value_int" => raw_initializer(name, &[], DataType::Int64, a.i.to_le_bytes().to_vec()),
        "value_ints" => raw_initializer(
            name,
            &[a.ints.len()],
            DataType::Int64,
            a.ints.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        _ => return None,
    };
    Some(t)
}

/// A tract tensor as an ONNX initializer (`None` for types ONNX or Hearth do not store).
fn tensor_proto(name: &str, t: &Tensor) -> Option<pb::TensorProto> {
    let dims: Vec<usize> = t.shape().to_vec();
    let t = if t.datum_type() == DatumType::TDim {
        t.cast_to::<i64>().ok()?.into_owned()
    } else {
        t.clone()
    };
    let dt = onnx_type_of(t.datum_type())?;
    if dt == DataType::Float16 {
        return None;
    }
    let raw: Vec<u8> = match t.datum_type() {
        DatumType::Bool => t
            .try_as_plain_ram()
            .ok()?
            .as_slice::<bool>()
            .ok()?
            .iter()
            .map(|&b| u8::from(b))
            .collect(),
        _ => t.as_bytes().to_vec(),
    };
    Some(raw_initializer(name, &dims, dt, raw))
}

fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_f(n: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

fn attr_i(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

fn set_attr_f(n: &mut pb::NodeProto, name: &str, v: f32) {
    match n.attribute.iter_mut().find(|a| a.name == name) {
        Some(a) => a.f = v,
        None => n.attribute.push(pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f: v,
            ..Default::default()
        }),
    }
}

/// The graph being rewritten.
struct Graph<'a> {
    g: &'a mut pb::GraphProto,
}

impl Graph<'_> {
    fn f32_init(&self, name: &str) -> Option<HTensor> {
        let t = self.g.initializer.iter().find(|t| t.name == name)?;
        match initializer_data(t)? {
            (shape, DataType::Float, InitValues::Float(data)) => Some(HTensor { shape, data }),
            _ => None,
        }
    }

    /// Sets (adds or replaces) an f32 initializer.
    fn put_f32(&mut self, name: &str, t: &HTensor) {
        let p = f32_initializer(name, t);
        match self.g.initializer.iter_mut().find(|i| i.name == name) {
            Some(i) => *i = p,
            None => self.g.initializer.push(p),
        }
    }

    fn is_output(&self, name: &str) -> bool {
        self.g.output.iter().any(|o| o.name == name)
    }

    fn is_input(&self, name: &str) -> bool {
        self.g.input.iter().any(|i| i.name == name)
    }

    /// Number of node inputs reading `name` (graph outputs not counted).
    fn readers(&self, name: &str) -> usize {
        self.g
            .node
            .iter()
            .flat_map(|n| n.input.iter())
            .filter(|i| *i == name)
            .count()
    }

    fn fresh_name(&self, base: &str) -> String {
        let taken: HashSet<&str> = self
            .g
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .chain(
                self.g
                    .node
                    .iter()
                    .flat_map(|n| n.output.iter().map(String::as_str)),
            )
            .chain(self.g.input.iter().map(|i| i.name.as_str()))
            .collect();
        (0..)
            .map(|k| format!("{base}.{k}"))
            .find(|n| !taken.contains(n.as_str()))
            .expect("a free name")
    }

    /// Removes node `idx` whose output `out` equals its input `inp` (a pass-through). Returns
    /// false (graph untouched) when neither name can stand for the other.
    fn bypass(&mut self, idx: usize, inp: &str, out: &str) -> bool {
        if !self.is_output(out) {
            for n in self.g.node.iter_mut() {
                for i in n.input.iter_mut() {
                    if i == out {
                        *i = inp.to_string();
                    }
                }
            }
            self.g.node.remove(idx);
            return true;
        }
        // The output is a graph output: the producer of `inp` writes `out` directly.
        let produced = self
            .g
            .node
            .iter()
            .any(|n| n.output.iter().any(|o| o == inp));
        if !produced || self.is_output(inp) || self.is_input(inp) {
            return false;
        }
        self.g.node.remove(idx);
        for n in self.g.node.iter_mut() {
            for s in n.output.iter_mut().chain(n.input.iter_mut()) {
                if s == inp {
                    *s = out.to_string();
                }
            }
        }
        true
    }
}

/// Pass 1: `Constant` nodes become initializers.
fn constants_to_initializers(g: &mut pb::GraphProto) -> usize {
    let mut count = 0;
    let mut keep = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let out = n.output.first().cloned().unwrap_or_default();
        let t = (n.op_type == "Constant" && n.domain.is_empty() && !out.is_empty())
            .then(|| constant_tensor(&n, &out))
            .flatten();
        match t {
            Some(t) => {
                g.initializer.push(t);
                count += 1;
            }
            None => keep.push(n),
        }
    }
    g.node = keep;
    count
}

/// A folded node may produce up to this many values even from fewer input values.
const FOLD_MIN_GROWTH: usize = 64;

/// Ops never folded (random, or with sub-graphs).
fn foldable(op: &str) -> bool {
    !matches!(
        op,
        "RandomNormal"
            | "RandomUniform"
            | "RandomNormalLike"
            | "RandomUniformLike"
            | "Multinomial"
            | "Bernoulli"
            | "If"
            | "Loop"
            | "Scan"
    )
}

/// Pass 2: nodes whose inputs are all constant are replaced by their values.
fn fold_constants(model: &OnnxModel) -> Result<(OnnxModel, usize), ModelError> {
    let facts = tensor_facts(model)?;
    let mut proto = model.proto().clone();
    let g = proto.graph.as_mut().expect("graph");
    let mut consts: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let mut sizes: HashMap<String, usize> = g
        .initializer
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dims.iter().product::<i64>().max(1) as usize,
            )
        })
        .collect();
    let mut count = 0;
    let mut keep = Vec::with_capacity(g.node.len());
    let mut new_inits = Vec::new();
    for n in std::mem::take(&mut g.node) {
        let all_const = n.input.iter().all(|i| i.is_empty() || consts.contains(i));
        let outs: Vec<&String> = n.output.iter().filter(|o| !o.is_empty()).collect();
        let values: Option<Vec<pb::TensorProto>> =
            (all_const && !n.input.is_empty() && foldable(&n.op_type) && !outs.is_empty())
                .then(|| {
                    let vals: Vec<Arc<Tensor>> = outs
                        .iter()
                        .map(|o| facts.get(o.as_str())?.value.clone())
                        .collect::<Option<_>>()?;
                    // Folding must not grow the file (e.g. ConstantOfShape, Expand).
                    let in_len: usize = n
                        .input
                        .iter()
                        .filter_map(|i| sizes.get(i))
                        .sum::<usize>()
                        .max(FOLD_MIN_GROWTH);
                    if vals.iter().map(|v| v.len()).sum::<usize>() > in_len {
                        return None;
                    }
                    outs.iter()
                        .zip(&vals)
                        .map(|(o, v)| tensor_proto(o, v))
                        .collect()
                })
                .flatten();
        match values {
            Some(vs) => {
                for v in vs {
                    consts.insert(v.name.clone());
                    sizes.insert(
                        v.name.clone(),
                        v.dims.iter().product::<i64>().max(1) as usize,
                    );
                    new_inits.push(v);
                }
                count += 1;
            }
            None => keep.push(n),
        }
    }
    g.node = keep;
    g.initializer.extend(new_inits);
    Ok((OnnxModel::from_bytes(&proto.encode_to_vec())?, count))
}

/// Pass 3: BatchNormalization into the preceding Conv/Gemm. Returns (folded, left).
fn fold_batchnorms(g: &mut pb::GraphProto) -> (usize, usize) {
    let (mut folded, mut left) = (0, 0);
    let mut i = 0;
    while i < g.node.len() {
        if g.node[i].op_type != "BatchNormalization" || !g.node[i].domain.is_empty() {
            i += 1;
            continue;
        }
        if fold_one_bn(g, i) {
            folded += 1;
            // The BN node was removed: index i now holds the next node.
        } else {
            left += 1;
            i += 1;
        }
    }
    (folded, left)
}

fn fold_one_bn(g: &mut pb::GraphProto, bn_idx: usize) -> bool {
    let bn = g.node[bn_idx].clone();
    if bn.input.len() < 5 || bn.output.iter().skip(1).any(|o| !o.is_empty()) {
        return false;
    }
    let x = &bn.input[0];
    let mut graph = Graph { g };
    let params: Option<Vec<HTensor>> = bn.input[1..5].iter().map(|n| graph.f32_init(n)).collect();
    let Some(p) = params else { return false };
    let (scale, beta, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
    let ch = scale.len();
    if [beta, mean, var].iter().any(|t| t.len() != ch) {
        return false;
    }
    let eps = attr_f(&bn, "epsilon", 1e-5);
    let s: Vec<f32> = (0..ch)
        .map(|c| scale.data[c] / (var.data[c] + eps).sqrt())
        .collect();
    let Some(prod_idx) = graph
        .g
        .node
        .iter()
        .position(|n| n.output.first() == Some(x))
    else {
        return false;
    };
    if graph.readers(x) != 1 || graph.is_output(x) {
        return false;
    }
    let prod = graph.g.node[prod_idx].clone();
    let Some(wname) = prod.input.get(1).cloned() else {
        return false;
    };
    let Some(w) = graph.f32_init(&wname) else {
        return false;
    };
    let bias_name = prod.input.get(2).filter(|b| !b.is_empty()).cloned();
    let bias = match &bias_name {
        Some(b) => match graph.f32_init(b) {
            Some(t) => Some(t),
            None => return false,
        },
        None => None,
    };
    let (new_w, new_b, beta_attr) = match prod.op_type.as_str() {
        "Conv" if prod.domain.is_empty() => {
            if w.shape.first() != Some(&ch) || bias.as_ref().is_some_and(|b| b.len() != ch) {
                return false;
            }
            let per = w.len() / ch;
            let mut nw = w.clone();
            for (c, sc) in s.iter().enumerate() {
                for v in &mut nw.data[c * per..(c + 1) * per] {
                    *v *= sc;
                }
            }
            let b: Vec<f32> = (0..ch)
                .map(|c| {
                    let b0 = bias.as_ref().map_or(0.0, |b| b.data[c]);
                    (b0 - mean.data[c]) * s[c] + beta.data[c]
                })
                .collect();
            (nw, HTensor::new(vec![ch], b), None)
        }
        "Gemm" if prod.domain.is_empty() => {
            if w.shape.len() != 2 || attr_i(&prod, "transA", 0) != 0 {
                return false;
            }
            let trans_b = attr_i(&prod, "transB", 0) != 0;
            let (rows, cols) = (w.shape[0], w.shape[1]);
            let out = if trans_b { rows } else { cols };
            if out != ch {
                return false;
            }
            let beta_g = attr_f(&prod, "beta", 1.0);
            let c0: Vec<f32> = match &bias {
                Some(b) if b.len() == ch => b.data.iter().map(|v| v * beta_g).collect(),
                Some(b) if b.len() == 1 => vec![b.data[0] * beta_g; ch],
                Some(_) => return false,
                None => vec![0.0; ch],
            };
            let mut nw = w.clone();
            for r in 0..rows {
                for c in 0..cols {
                    let o = if trans_b { r } else { c };
                    nw.data[r * cols + c] *= s[o];
                }
            }
            let b: Vec<f32> = (0..ch)
                .map(|c| (c0[c] - mean.data[c]) * s[c] + beta.data[c])
                .collect();
            (nw, HTensor::new(vec![ch], b), Some(1.0))
        }
        _ => return false,
    };
    // Weights shared with another node get a new name; otherwise they are replaced in place.
    let w_target = if graph.readers(&wname) == 1 {
        wname.clone()
    } else {
        graph.fresh_name(&format!("{wname}.bn"))
    };
    graph.put_f32(&w_target, &new_w);
    let b_target = match &bias_name {
        Some(b) if graph.readers(b) == 1 => b.clone(),
        _ => graph.fresh_name(&format!("{}.bias", prod.output[0])),
    };
    graph.put_f32(&b_target, &new_b);
    let p = &mut graph.g.node[prod_idx];
    p.input.truncate(1);
    p.input.push(w_target);
    p.input.push(b_target);
    p.output[0] = bn.output[0].clone();
    if let Some(v) = beta_attr {
        set_attr_f(p, "beta", v);
    }
    graph.g.node.remove(bn_idx);
    true
}

/// Pass 4a: Identity nodes.
fn remove_identities(g: &mut pb::GraphProto) -> usize {
    let mut count = 0;
    let mut i = 0;
    while i < g.node.len() {
        let n = &g.node[i];
        if n.op_type == "Identity" && n.domain.is_empty() && n.input.len() == 1 {
            let (inp, out) = (n.input[0].clone(), n.output[0].clone());
            if (Graph { g: &mut *g }).bypass(i, &inp, &out) {
                count += 1;
                continue;
            }
        }
        i += 1;
    }
    count
}

/// Pass 4b: Casts to the type their input has, Reshapes to the shape it has, Reshape chains.
fn remove_noop_casts_reshapes(
    g: &mut pb::GraphProto,
    facts: &HashMap<String, TensorFact>,
    input_fixed: bool,
) -> (usize, usize) {
    let (mut casts, mut reshapes) = (0, 0);
    let consts: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let mut i = 0;
    while i < g.node.len() {
        let n = g.node[i].clone();
        if !n.domain.is_empty() || n.input.is_empty() || n.output.len() != 1 {
            i += 1;
            continue;
        }
        let (inp, out) = (n.input[0].clone(), n.output[0].clone());
        let fin = facts.get(&inp);
        let fout = facts.get(&out);
        let same_shape = matches!((fin.and_then(|f| f.shape.as_ref()), fout.and_then(|f| f.shape.as_ref())), (Some(a), Some(b)) if a == b);
        match n.op_type.as_str() {
            "Cast" => {
                let to = attr_i(&n, "to", -1) as i32;
                let from = fin.and_then(|f| f.onnx_type);
                if from == Some(to) && (Graph { g: &mut *g }).bypass(i, &inp, &out) {
                    casts += 1;
                    continue;
                }
            }
            "Reshape" => {
                // Shapes are analysed at batch 1: only trusted when the input is fixed.
                if input_fixed
                    && same_shape
                    && !consts.contains(&inp)
                    && (Graph { g: &mut *g }).bypass(i, &inp, &out)
                {
                    reshapes += 1;
                    continue;
                }
                // Reshape(Reshape(x)) → Reshape(x) when the inner result has no other reader
                // and the outer target shape is a constant without 0 ("copy the input's
                // dimension", which would then copy from x instead).
                let outer_fixed = n.input.get(1).is_some_and(|s| {
                    g.initializer.iter().any(|t| {
                        &t.name == s
                            && matches!(initializer_data(t), Some((_, _, InitValues::Int(v))) if !v.contains(&0))
                    })
                });
                if !outer_fixed {
                    i += 1;
                    continue;
                }
                let graph = Graph { g: &mut *g };
                let inner = graph
                    .g
                    .node
                    .iter()
                    .find(|p| p.output.first() == Some(&inp) && p.op_type == "Reshape")
                    .cloned();
                if let Some(inner) = inner {
                    if graph.readers(&inp) == 1 && !graph.is_output(&inp) {
                        g.node[i].input[0] = inner.input[0].clone();
                        reshapes += 1;
                        continue;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    (casts, reshapes)
}

/// Pass 5: nodes and initializers no graph output depends on.
fn remove_dead(g: &mut pb::GraphProto) -> usize {
    let mut live: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; g.node.len()];
    for (k, n) in g.node.iter().enumerate().rev() {
        // Nodes are topologically sorted in valid ONNX: one backward sweep suffices.
        if n.output.iter().any(|o| live.contains(o)) {
            keep[k] = true;
            live.extend(n.input.iter().cloned());
            for a in &n.attribute {
                // Sub-graphs may read outer tensors by name.
                for sg in a.g.iter().chain(a.graphs.iter()) {
                    for sn in &sg.node {
                        live.extend(sn.input.iter().cloned());
                    }
                }
            }
        }
    }
    let before = g.node.len();
    let mut k = 0;
    g.node.retain(|_| {
        k += 1;
        keep[k - 1]
    });
    let removed: HashSet<String> = g
        .initializer
        .iter()
        .filter(|t| !live.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    g.initializer.retain(|t| !removed.contains(&t.name));
    // Inputs that were only there to carry removed initializers (IR < 4 style) go too.
    g.input.retain(|i| !removed.contains(&i.name));
    before - g.node.len()
}

/// Pass 6: concrete dimensions on graph outputs left symbolic.
fn infer_output_shapes(g: &mut pb::GraphProto, facts: &HashMap<String, TensorFact>) -> usize {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let mut count = 0;
    for o in g.output.iter_mut() {
        let Some(shape) = facts.get(&o.name).and_then(|f| f.shape.clone()) else {
            continue;
        };
        let Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(t)),
            ..
        }) = o.r#type.as_mut()
        else {
            continue;
        };
        let concrete = t.shape.as_ref().is_some_and(|s| {
            s.dim.len() == shape.len()
                && s.dim
                    .iter()
                    .all(|d| matches!(d.value, Some(Value::DimValue(v)) if v > 0))
        });
        if concrete {
            continue;
        }
        t.shape = Some(pb::TensorShapeProto {
            dim: shape
                .iter()
                .map(|&d| Dimension {
                    value: Some(Value::DimValue(d as i64)),
                    ..Default::default()
                })
                .collect(),
        });
        count += 1;
    }
    count
}

/// True when every dimension of the data input is a fixed number (no symbolic batch).
fn input_is_concrete(model: &OnnxModel) -> bool {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(name) = model.input_name() else {
        return false;
    };
    let g = model.proto().graph.as_ref().expect("graph");
    g.input.iter().any(|i| {
        i.name == name
            && matches!(
                i.r#type.as_ref().and_then(|t| t.value.as_ref()),
                Some(pb::type_proto::Value::TensorType(t)) if t.shape.as_ref().is_some_and(|s| {
                    s.dim.iter().all(|d| matches!(d.value, Some(Value::DimValue(v)) if v > 0))
                })
            )
    })
}

fn rebuild(proto: &pb::ModelProto) -> Result<OnnxModel, ModelError> {
    OnnxModel::from_bytes(&proto.encode_to_vec())
}

/// Runs every pass on `model`; returns the normalised model and what changed.
pub fn normalise(model: &OnnxModel) -> Result<(OnnxModel, NormaliseReport), ModelError> {
    let mut r = NormaliseReport::default();
    let mut proto = model.proto().clone();
    r.constants = constants_to_initializers(proto.graph.as_mut().expect("graph"));
    let (m, folded) = fold_constants(&rebuild(&proto)?)?;
    r.folded = folded;
    let mut proto = m.proto().clone();
    let g = proto.graph.as_mut().expect("graph");
    let (bn, left) = fold_batchnorms(g);
    r.batchnorms = bn;
    r.batchnorms_left = left;
    r.identities = remove_identities(g);
    let m = rebuild(&proto)?;
    let facts = tensor_facts(&m)?;
    let mut proto = m.proto().clone();
    let g = proto.graph.as_mut().expect("graph");
    let fixed = input_is_concrete(&m);
    let (casts, reshapes) = remove_noop_casts_reshapes(g, &facts, fixed);
    r.casts = casts;
    r.reshapes = reshapes;
    r.dead_nodes = remove_dead(g);
    let m = rebuild(&proto)?;
    let facts = tensor_facts(&m)?;
    let mut proto = m.proto().clone();
    if fixed {
        r.shapes = infer_output_shapes(proto.graph.as_mut().expect("graph"), &facts);
    }
    if !r.changed() {
        return Ok((model.clone(), r));
    }
    if let Some(g) = proto.graph.as_mut() {
        // Old value_info may describe removed or renamed tensors; tract re-infers them.
        g.value_info.clear();
    }
    Ok((rebuild(&proto)?, r))
}

/// How far the normalised graph's outputs are from the original's.
#[derive(Clone, Debug, PartialEq)]
pub struct Equivalence {
    /// Largest |original − normalised| over every output value of every input.
    pub max_abs_diff: f32,
    /// Largest |original| output value (the scale the tolerance is relative to).
    pub max_abs_value: f32,
    /// Inputs compared.
    pub inputs: usize,
}

impl Equivalence {
    /// The allowed `max_abs_diff`: [`REL_TOL`] · max(1, `max_abs_value`).
    pub fn tolerance(&self) -> f32 {
        tolerance(self.max_abs_value)
    }

    /// True when within tolerance.
    pub fn ok(&self) -> bool {
        self.max_abs_diff <= self.tolerance()
    }
}

/// The allowed output difference for outputs of magnitude up to `max_abs_value`.
pub fn tolerance(max_abs_value: f32) -> f32 {
    REL_TOL * max_abs_value.max(1.0)
}

/// `n` reproducible inputs of `shape`: zeros, then uniform in [-1, 1].
pub fn probe_inputs(shape: &[usize], n: usize, seed: u64) -> Vec<Vec<f32>> {
    let len: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n.max(1))
        .map(|k| {
            if k == 0 {
                vec![0.0; len]
            } else {
                (0..len).map(|_| rng.gen_range(-1.0f32..=1.0)).collect()
            }
        })
        .collect()
}

/// Runs `original` and `normalised` in tract on `inputs` and compares every output.
pub fn check_equivalence(
    original: &OnnxModel,
    normalised: &OnnxModel,
    inputs: &[Vec<f32>],
) -> Result<Equivalence, ModelError> {
    let a = GenericRunner::new(original)?;
    let b = GenericRunner::new(normalised)?;
    let (mut max, mut scale) = (0f32, 0f32);
    for x in inputs {
        let ya = a.run(x)?;
        let yb = b.run(x)?;
        if ya.len() != yb.len() {
            return Err(ModelError::Onnx(format!(
                "normalised graph has {} outputs, the original {}",
                yb.len(),
                ya.len()
            )));
        }
        for (p, q) in ya.iter().zip(&yb) {
            if p.data.len() != q.data.len() {
                return Err(ModelError::Shape(format!(
                    "output {}: {:?} vs {:?}",
                    p.name, p.shape, q.shape
                )));
            }
            for (u, v) in p.data.iter().zip(&q.data) {
                let d = (u - v).abs();
                max = max.max(if d.is_nan() { f32::INFINITY } else { d });
                if u.is_finite() {
                    scale = scale.max(u.abs());
                }
            }
        }
    }
    Ok(Equivalence {
        max_abs_diff: max,
        max_abs_value: scale,
        inputs: inputs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_model::data::Task;

    #[test]
    fn an_mlp_has_nothing_to_normalise() {
        let m = OnnxModel::build_mlp(&Task::Digits.default_spec(), 1);
        let (n, r) = normalise(&m).unwrap();
        assert!(!r.changed(), "{r}");
        assert_eq!(n, m);
        assert_eq!(r.to_string(), "nothing to normalise");
    }

    #[test]
    fn the_equivalence_check_sees_changed_outputs() {
        let m = OnnxModel::build_mlp(&Task::Digits.default_spec(), 1);
        let inputs = probe_inputs(&[1, 64], 4, 0);
        let same = check_equivalence(&m, &m, &inputs).unwrap();
        assert_eq!(same.max_abs_diff, 0.0);
        assert!(same.ok());
        let mut changed = m.clone();
        let mut w = m.weights();
        for v in w.get_mut("fc1.weight").unwrap().data.iter_mut() {
            *v *= 3.0;
        }
        changed.set_weights(&w).unwrap();
        let eq = check_equivalence(&m, &changed, &inputs).unwrap();
        assert!(!eq.ok(), "{eq:?}");
    }

    #[test]
    fn tolerance_is_relative_above_one() {
        assert_eq!(tolerance(0.5), REL_TOL);
        assert_eq!(tolerance(100.0), 100.0 * REL_TOL);
        let p = probe_inputs(&[1, 4], 3, 0);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], vec![0.0; 4]);
        assert!(p[1].iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(p, probe_inputs(&[1, 4], 3, 0));
    }
}
