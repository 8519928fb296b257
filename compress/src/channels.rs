//! Structured channel pruning of conv graphs: whole output channels of `Conv` nodes are
//! removed and every consumer is rewritten, so the file and the work genuinely shrink.
//!
//! The analysis follows each tensor's channel axis through the graph ([`analyse`]): a
//! (non-grouped) `Conv` with constant weights creates new channels; element-wise ops,
//! pooling, `Transpose`, shape-preserving `Reshape`/`Flatten`/`Squeeze`, `BatchNormalization`
//! and depthwise `Conv`s (group = channels: a depthwise conv's channels follow its producer)
//! carry them; a binary op of two tensors carrying channels (a residual `Add`, the `Mul` of a
//! squeeze-excitation block) ties channel *i* of one to channel *i* of the other, so tied
//! channels form one class that is removed together or left alone; `Concat` on the channel
//! axis concatenates (its zero-padding inputs, `ConstantOfShape`, shrink with it). A channel
//! class is removable when every member is a conv output (or zero padding) and none reaches a
//! graph output or an op the analysis does not know (which then needs all its channels).
//!
//! Removal ([`remove`]) slices, per node, every constant the removed channels touch: the
//! producing conv's filters and bias, the consuming conv's input slices, a depthwise conv's
//! filters (and its `group`), per-channel constants of element-wise ops (biases, PReLU
//! slopes, BatchNorm vectors), the rows of a `MatMul`/`Gemm` reading the flattened channels,
//! the channel count in a `Reshape`'s target shape and in a `ConstantOfShape`'s shape. Each
//! sliced constant is written as a new initializer for that node (shared constants stay
//! intact for their other readers; dead ones are dropped).
//!
//! [`prune_channels`] ranks classes within each group of classes with the same producing
//! convs (one layer, or the layers a residual chain ties together) by the L1 norm of the
//! filters (each conv's norms scaled by their mean) or, with calibration inputs, by output
//! sensitivity: the mean change of the model's outputs when the class alone is zeroed, and
//! removes `round(fraction · n)` of each group (at least one channel stays).

use crate::measure::GenericRunner;
use hearth_model::error::ModelError;
use hearth_model::onnx::{f32_initializer, initializer_data, raw_initializer, InitValues};
use hearth_model::tensor::Tensor as HTensor;
use hearth_model::OnnxModel;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

/// How channels are ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelCriterion {
    /// L1 norm of the producing filters (each conv's norms divided by their mean).
    L1,
    /// Output change on calibration inputs when the class alone is zeroed.
    Sensitivity,
}

/// Where a channel comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Output channel `ch` of the Conv node `node`.
    Conv { node: usize, ch: usize },
    /// Channel `ch` of the zeros a `ConstantOfShape` node makes.
    Zero { node: usize },
    /// Anything else (not removable).
    Other,
}

/// A constant input of a node to slice: input `input` of node `node`, along `axis`, keeping
/// the positions the layout of tensor `by` keeps. `shape_elem`: the constant is an int64
/// shape whose element `axis` holds the channel count (set to the kept count).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slice {
    node: usize,
    input: usize,
    axis: usize,
    by: String,
    shape_elem: bool,
}

/// The channel structure of a graph.
#[derive(Clone, Debug)]
pub struct Analysis {
    /// Per tensor: channel axis and channel ids.
    layout: HashMap<String, (usize, Vec<usize>)>,
    origin: Vec<Origin>,
    parent: Vec<usize>,
    frozen: Vec<bool>,
    slices: BTreeSet<Slice>,
    /// Depthwise convs: node → the tensor whose layout gives its channels.
    depthwise: BTreeMap<usize, String>,
}

/// What [`prune_channels`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelReport {
    /// Removable channel classes before pruning.
    pub removable: usize,
    /// Classes removed.
    pub removed: usize,
    /// Groups (layers or tied layers) pruned.
    pub groups: usize,
    /// Conv nodes whose output channels shrank.
    pub convs: usize,
    /// Output channels of convs before and after (sum over convs).
    pub conv_channels: (usize, usize),
    /// Per tensor whose channels shrank: the original channel positions it keeps.
    pub kept: BTreeMap<String, Vec<usize>>,
}

impl std::fmt::Display for ChannelReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} removable channel classes in {} groups; conv channels {} -> {} in {} convs",
            self.removed,
            self.removable,
            self.groups,
            self.conv_channels.0,
            self.conv_channels.1,
            self.convs
        )
    }
}

fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_i(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

/// Shape of an initializer (any type).
fn init_shape(g: &pb::GraphProto, name: &str) -> Option<Vec<usize>> {
    g.initializer
        .iter()
        .find(|t| t.name == name)
        .map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect())
}

fn f32_init(g: &pb::GraphProto, name: &str) -> Option<HTensor> {
    let t = g.initializer.iter().find(|t| t.name == name)?;
    match initializer_data(t)? {
        (shape, DataType::Float, InitValues::Float(data)) => Some(HTensor { shape, data }),
        _ => None,
    }
}

fn i64_init(g: &pb::GraphProto, name: &str) -> Option<Vec<i64>> {
    let t = g.initializer.iter().find(|t| t.name == name)?;
    match initializer_data(t)? {
        (_, DataType::Int64, InitValues::Int(v)) => Some(v),
        _ => None,
    }
}

const UNARY: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Identity",
    "Dropout",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Resize",
    "Upsample",
    "Cast",
];
const BINARY: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean",
];

impl Analysis {
    fn fresh(&mut self, origin: Origin, frozen: bool) -> usize {
        let id = self.origin.len();
        self.origin.push(origin);
        self.parent.push(id);
        self.frozen.push(frozen);
        id
    }

    fn find(&self, mut i: usize) -> usize {
        while self.parent[i] != i {
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.parent[hi] = lo;
        }
    }

    fn freeze(&mut self, name: &str) {
        if let Some((_, ids)) = self.layout.get(name).cloned() {
            for id in ids {
                self.frozen[id] = true;
            }
        }
    }

    /// Channel classes (root id → member ids).
    fn classes(&self) -> BTreeMap<usize, Vec<usize>> {
        let mut c: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for id in 0..self.origin.len() {
            c.entry(self.find(id)).or_default().push(id);
        }
        c
    }

    /// Removable classes: no frozen member, every member a conv output or zero padding, at
    /// least one conv output.
    fn removable(&self) -> BTreeMap<usize, Vec<usize>> {
        self.classes()
            .into_iter()
            .filter(|(_, m)| {
                m.iter()
                    .all(|&i| !self.frozen[i] && self.origin[i] != Origin::Other)
                    && m.iter()
                        .any(|&i| matches!(self.origin[i], Origin::Conv { .. }))
            })
            .collect()
    }

    /// Number of removable channel classes.
    pub fn removable_count(&self) -> usize {
        self.removable().len()
    }
}

/// Tensor shapes by tract's analysis (concrete shapes only).
fn shapes(model: &OnnxModel) -> Result<HashMap<String, Vec<usize>>, ModelError> {
    Ok(crate::normalise::tensor_facts(model)?
        .into_iter()
        .filter_map(|(k, f)| f.shape.map(|s| (k, s)))
        .collect())
}

/// Follows the channels of every tensor of `model` (see the module doc). Errors when the
/// nodes are not in topological order.
pub fn analyse(model: &OnnxModel) -> Result<Analysis, ModelError> {
    let g = model
        .proto()
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Onnx("no graph".into()))?;
    let shapes = shapes(model)?;
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut known: HashSet<String> = g
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .chain(g.input.iter().map(|i| i.name.clone()))
        .collect();
    let mut a = Analysis {
        layout: HashMap::new(),
        origin: Vec::new(),
        parent: Vec::new(),
        frozen: Vec::new(),
        slices: BTreeSet::new(),
        depthwise: BTreeMap::new(),
    };
    for (ni, n) in g.node.iter().enumerate() {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !known.contains(i) {
                return Err(ModelError::Onnx(format!(
                    "node {} reads {i} before it is produced (nodes not in topological order)",
                    n.name
                )));
            }
        }
        known.extend(n.output.iter().cloned());
        let is_const = |name: &str| inits.contains(name);
        let tracked: Vec<Option<(usize, Vec<usize>)>> =
            n.input.iter().map(|i| a.layout.get(i).cloned()).collect();
        let out = n.output.first().cloned().unwrap_or_default();
        let out_shape = shapes.get(&out).cloned();
        let mut handled = true;
        match n.op_type.as_str() {
            "Conv" => {
                let w = n.input.get(1).cloned().unwrap_or_default();
                let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
                let group = attr_i(n, "group", 1) as usize;
                let wshape = if is_const(&w) {
                    f32_init(g, &w).map(|t| t.shape)
                } else {
                    None
                };
                let bias_ok = bias
                    .as_ref()
                    .is_none_or(|b| is_const(b) && f32_init(g, b).is_some());
                match (wshape, &tracked[0]) {
                    (Some(ws), inp) if bias_ok && ws.len() >= 3 => {
                        let m = ws[0];
                        let c_in = ws[1] * group;
                        let depthwise = group > 1 && group == c_in && m == c_in;
                        match inp {
                            Some((1, ids)) if ids.len() == c_in && depthwise => {
                                a.layout.insert(out.clone(), (1, ids.clone()));
                                a.depthwise.insert(ni, out.clone());
                                a.slices.insert(Slice {
                                    node: ni,
                                    input: 1,
                                    axis: 0,
                                    by: out.clone(),
                                    shape_elem: false,
                                });
                                if bias.is_some() {
                                    a.slices.insert(Slice {
                                        node: ni,
                                        input: 2,
                                        axis: 0,
                                        by: out.clone(),
                                        shape_elem: false,
                                    });
                                }
                            }
                            Some((1, ids)) if ids.len() == c_in && group == 1 => {
                                a.slices.insert(Slice {
                                    node: ni,
                                    input: 1,
                                    axis: 1,
                                    by: n.input[0].clone(),
                                    shape_elem: false,
                                });
                                conv_out(&mut a, ni, &out, m, bias.is_some(), false);
                            }
                            None if group == 1 => {
                                conv_out(&mut a, ni, &out, m, bias.is_some(), false)
                            }
                            Some(_) => {
                                a.freeze(&n.input[0]);
                                conv_out(&mut a, ni, &out, m, bias.is_some(), true);
                            }
                            None => {}
                        }
                    }
                    _ => handled = false,
                }
            }
            "ConstantOfShape" => {
                let rank4 = out_shape.as_ref().is_some_and(|s| s.len() >= 3);
                let value_zero = attr(n, "value")
                    .and_then(|v| v.t.as_ref())
                    .and_then(|t| match initializer_data(t) {
                        Some((_, _, InitValues::Float(v))) => Some(v.iter().all(|&x| x == 0.0)),
                        Some((_, _, InitValues::Int(v))) => Some(v.iter().all(|&x| x == 0)),
                        None => None,
                    })
                    .unwrap_or(true);
                let shape_const = n.input.first().is_some_and(|s| i64_init(g, s).is_some());
                if let (true, true, true, Some(s)) = (rank4, value_zero, shape_const, &out_shape) {
                    let ids = (0..s[1])
                        .map(|_| a.fresh(Origin::Zero { node: ni }, false))
                        .collect();
                    a.layout.insert(out.clone(), (1, ids));
                    a.slices.insert(Slice {
                        node: ni,
                        input: 0,
                        axis: 1,
                        by: out.clone(),
                        shape_elem: true,
                    });
                }
            }
            op if UNARY.contains(&op) => {
                // Extra inputs (Clip bounds, Resize scales) must be constants.
                let extra_const = n.input.iter().skip(1).all(|i| i.is_empty() || is_const(i));
                match (&tracked[0], extra_const) {
                    (Some(l), true) => {
                        if op == "Resize" || op == "Upsample" {
                            // Channel scale must stay 1: the channel count is unchanged.
                            let same = out_shape
                                .as_ref()
                                .is_some_and(|s| s.get(l.0) == Some(&l.1.len()));
                            if !same {
                                handled = false;
                            } else {
                                a.layout.insert(out.clone(), l.clone());
                            }
                        } else {
                            a.layout.insert(out.clone(), l.clone());
                        }
                    }
                    (Some(_), false) => handled = false,
                    (None, _) => {}
                }
            }
            "BatchNormalization" => {
                if let Some(l) = &tracked[0] {
                    if l.0 == 1 && n.input.iter().skip(1).all(|i| is_const(i)) {
                        a.layout.insert(out.clone(), l.clone());
                        for k in 1..n.input.len() {
                            a.slices.insert(Slice {
                                node: ni,
                                input: k,
                                axis: 0,
                                by: out.clone(),
                                shape_elem: false,
                            });
                        }
                    } else {
                        handled = false;
                    }
                }
            }
            op if BINARY.contains(&op) => {
                handled = binary(&mut a, g, ni, n, &tracked, out_shape.as_deref(), &shapes);
            }
            "Concat" => {
                handled = concat(&mut a, n, &tracked, &shapes, out_shape.as_deref());
            }
            "Transpose" => {
                if let Some((ax, ids)) = &tracked[0] {
                    let perm: Vec<i64> =
                        attr(n, "perm").map(|p| p.ints.clone()).unwrap_or_default();
                    match perm.iter().position(|&p| p as usize == *ax) {
                        Some(pos) => {
                            a.layout.insert(out.clone(), (pos, ids.clone()));
                        }
                        None => handled = false,
                    }
                }
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                if let Some((ax, ids)) = &tracked[0] {
                    handled = false;
                    let ins = shapes.get(&n.input[0]);
                    if let (Some(ins), Some(outs)) = (ins, &out_shape) {
                        let before: usize = ins[..*ax].iter().product();
                        let c = ids.len();
                        let pos = (0..outs.len()).find(|&p| {
                            outs[p] == c && outs[..p].iter().product::<usize>() == before
                        });
                        let extra_const = n.input.iter().skip(1).all(|i| is_const(i));
                        if let (Some(p), true) = (pos, extra_const) {
                            let mut ok = true;
                            if n.op_type == "Reshape" {
                                match n.input.get(1).and_then(|s| i64_init(g, s)) {
                                    Some(sh) if sh.get(p) == Some(&(c as i64)) => {
                                        a.slices.insert(Slice {
                                            node: ni,
                                            input: 1,
                                            axis: p,
                                            by: out.clone(),
                                            shape_elem: true,
                                        });
                                    }
                                    // -1 is inferred; 0 copies the input's dimension at p.
                                    Some(sh)
                                        if sh.get(p) == Some(&-1)
                                            || (sh.get(p) == Some(&0) && p == *ax) => {}
                                    _ => ok = false,
                                }
                            }
                            if ok {
                                a.layout.insert(out.clone(), (p, ids.clone()));
                                handled = true;
                            }
                        }
                    }
                }
            }
            "MatMul" | "Gemm" => {
                let w = n.input.get(1).cloned().unwrap_or_default();
                let trans_a = attr_i(n, "transA", 0) == 1;
                let trans_b = n.op_type == "Gemm" && attr_i(n, "transB", 0) == 1;
                match (&tracked[0], tracked.get(1).cloned().flatten()) {
                    (Some((ax, _)), None)
                        if !trans_a
                            && is_const(&w)
                            && init_shape(g, &w).is_some_and(|s| s.len() == 2)
                            && shapes.get(&n.input[0]).is_some_and(|s| *ax + 1 == s.len()) =>
                    {
                        a.slices.insert(Slice {
                            node: ni,
                            input: 1,
                            axis: usize::from(trans_b),
                            by: n.input[0].clone(),
                            shape_elem: false,
                        });
                    }
                    (None, None) => {}
                    _ => handled = false,
                }
            }
            _ => handled = false,
        }
        if !handled {
            for i in &n.input {
                a.freeze(i);
            }
            a.layout.remove(&out);
        }
    }
    for o in &g.output {
        a.freeze(&o.name);
    }
    Ok(a)
}

fn conv_out(a: &mut Analysis, ni: usize, out: &str, m: usize, bias: bool, frozen: bool) {
    let ids = (0..m)
        .map(|ch| a.fresh(Origin::Conv { node: ni, ch }, frozen))
        .collect();
    a.layout.insert(out.to_string(), (1, ids));
    for (input, axis) in [(1, 0)].into_iter().chain(bias.then_some((2, 0))) {
        a.slices.insert(Slice {
            node: ni,
            input,
            axis,
            by: out.to_string(),
            shape_elem: false,
        });
    }
}

/// A binary element-wise op: tracked inputs carrying all channels are tied position by
/// position; constants with the channel dimension are sliced; broadcast (1) is fine.
fn binary(
    a: &mut Analysis,
    g: &pb::GraphProto,
    ni: usize,
    n: &pb::NodeProto,
    tracked: &[Option<(usize, Vec<usize>)>],
    out_shape: Option<&[usize]>,
    shapes: &HashMap<String, Vec<usize>>,
) -> bool {
    let Some(out_shape) = out_shape else {
        return tracked.iter().all(Option::is_none);
    };
    let r = out_shape.len();
    // The output's channel axis and ids: from the first tracked input with all channels.
    let mut lead: Option<(usize, Vec<usize>)> = None;
    for (k, t) in tracked.iter().enumerate() {
        if let Some((ax, ids)) = t {
            let in_rank = shapes.get(&n.input[k]).map_or(r, Vec::len);
            let oax = ax + r - in_rank.min(r);
            if out_shape.get(oax) == Some(&ids.len()) {
                lead = Some((oax, ids.clone()));
                break;
            }
        }
    }
    let Some((oax, ids)) = lead else {
        return tracked.iter().all(Option::is_none);
    };
    let c = ids.len();
    let mut slices = Vec::new();
    for (k, name) in n.input.iter().enumerate() {
        let in_shape = shapes.get(name).cloned().or_else(|| init_shape(g, name));
        let Some(in_shape) = in_shape else {
            return false;
        };
        // The input's axis aligned with the output's channel axis (numpy broadcasting).
        let off = r as isize - in_shape.len() as isize;
        let iax = oax as isize - off;
        let dim = if iax >= 0 {
            in_shape.get(iax as usize).copied().unwrap_or(1)
        } else {
            1
        };
        match &tracked[k] {
            Some((ax, tids)) if iax >= 0 && *ax == iax as usize && tids.len() == c => {
                for (x, y) in tids.clone().into_iter().zip(ids.clone()) {
                    a.union(x, y);
                }
            }
            Some(_) => return false,
            None if dim == 1 => {}
            None if dim == c && g.initializer.iter().any(|t| &t.name == name) => {
                slices.push(Slice {
                    node: ni,
                    input: k,
                    axis: iax as usize,
                    by: n.output[0].clone(),
                    shape_elem: false,
                })
            }
            None => return false,
        }
    }
    a.slices.extend(slices);
    a.layout.insert(n.output[0].clone(), (oax, ids));
    true
}

/// `Concat`: on the channel axis the layouts concatenate (untracked inputs get channels that
/// are not removable); on another axis the inputs' channels are tied.
fn concat(
    a: &mut Analysis,
    n: &pb::NodeProto,
    tracked: &[Option<(usize, Vec<usize>)>],
    shapes: &HashMap<String, Vec<usize>>,
    out_shape: Option<&[usize]>,
) -> bool {
    if tracked.iter().all(Option::is_none) {
        return true;
    }
    let Some(out_shape) = out_shape else {
        return false;
    };
    let r = out_shape.len() as i64;
    let axis = attr_i(n, "axis", 0);
    let axis = if axis < 0 { axis + r } else { axis } as usize;
    let ch_axis = tracked
        .iter()
        .flatten()
        .map(|t| t.0)
        .next()
        .expect("one tracked");
    if tracked.iter().flatten().any(|t| t.0 != ch_axis) {
        return false;
    }
    if axis == ch_axis {
        let mut ids = Vec::new();
        for (k, t) in tracked.iter().enumerate() {
            match t {
                Some((_, i)) => ids.extend(i.iter().copied()),
                None => {
                    let Some(s) = shapes.get(&n.input[k]) else {
                        return false;
                    };
                    let Some(&c) = s.get(axis) else {
                        return false;
                    };
                    ids.extend((0..c).map(|_| a.fresh(Origin::Other, true)));
                }
            }
        }
        a.layout.insert(n.output[0].clone(), (axis, ids));
        true
    } else {
        if tracked.iter().any(Option::is_none) {
            return false;
        }
        let first = tracked[0].clone().expect("tracked").1;
        for t in tracked.iter().flatten().skip(1) {
            if t.1.len() != first.len() {
                return false;
            }
            for (x, y) in t.1.iter().zip(&first) {
                a.union(*x, *y);
            }
        }
        a.layout.insert(n.output[0].clone(), (ch_axis, first));
        true
    }
}

/// Slices `t` along `axis`, keeping the positions `keep`.
fn slice_axis(t: &HTensor, axis: usize, keep: &[usize]) -> HTensor {
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let dim = t.shape[axis];
    let mut data = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let s = (o * dim + k) * inner;
            data.extend_from_slice(&t.data[s..s + inner]);
        }
    }
    let mut shape = t.shape.clone();
    shape[axis] = keep.len();
    HTensor::new(shape, data)
}

/// `model` without the channel classes `removed` (class root ids from `a`).
fn remove(
    model: &OnnxModel,
    a: &Analysis,
    removed: &BTreeSet<usize>,
) -> Result<OnnxModel, ModelError> {
    let mut proto = model.proto().clone();
    let g = proto.graph.as_mut().expect("graph");
    let keep_of = |name: &str| -> Option<(usize, Vec<usize>)> {
        let (_, ids) = a.layout.get(name)?;
        let keep: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| !removed.contains(&a.find(id)))
            .map(|(p, _)| p)
            .collect();
        (keep.len() < ids.len()).then_some((ids.len(), keep))
    };
    // Per (node, input): the slices to apply, in order.
    let mut per_input: BTreeMap<(usize, usize), Vec<&Slice>> = BTreeMap::new();
    for s in &a.slices {
        per_input.entry((s.node, s.input)).or_default().push(s);
    }
    let mut new_inits = Vec::new();
    for ((node, input), list) in per_input {
        let name = g.node[node].input[input].clone();
        let mut changed = false;
        if list.iter().any(|s| s.shape_elem) {
            let Some(mut v) = i64_init(g, &name) else {
                continue;
            };
            for s in &list {
                if let Some((old, keep)) = keep_of(&s.by) {
                    if v.get(s.axis) == Some(&(old as i64)) {
                        v[s.axis] = keep.len() as i64;
                        changed = true;
                    }
                }
            }
            if changed {
                let new = format!("{name}.pch{node}");
                new_inits.push(raw_initializer(
                    &new,
                    &[v.len()],
                    DataType::Int64,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ));
                g.node[node].input[input] = new;
            }
            continue;
        }
        let Some(mut t) = f32_init(g, &name) else {
            return Err(ModelError::Onnx(format!(
                "channel pruning: {name} (input {input} of node {}) is not an f32 constant",
                g.node[node].name
            )));
        };
        for s in &list {
            if let Some((old, keep)) = keep_of(&s.by) {
                if t.shape.get(s.axis) != Some(&old) {
                    return Err(ModelError::Shape(format!(
                        "channel pruning: {name} has shape {:?}, expected {old} on axis {}",
                        t.shape, s.axis
                    )));
                }
                t = slice_axis(&t, s.axis, &keep);
                changed = true;
            }
        }
        if changed {
            let new = format!("{name}.pch{node}");
            new_inits.push(f32_initializer(&new, &t));
            g.node[node].input[input] = new;
        }
    }
    for (&node, by) in &a.depthwise {
        if let Some((_, keep)) = keep_of(by) {
            let n = &mut g.node[node];
            match n.attribute.iter_mut().find(|x| x.name == "group") {
                Some(x) => x.i = keep.len() as i64,
                None => {
                    return Err(ModelError::Onnx("depthwise conv without group".into()));
                }
            }
        }
    }
    g.initializer.extend(new_inits);
    // Drop initializers nothing reads any more; old intermediate shapes are stale.
    let read: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().map(|o| o.name.clone()))
        .collect();
    g.initializer.retain(|t| read.contains(&t.name));
    g.input
        .retain(|i| read.contains(&i.name) || !proto_has_init(&g.initializer, &i.name));
    g.value_info.clear();
    OnnxModel::from_bytes(&proto.encode_to_vec())
}

fn proto_has_init(inits: &[pb::TensorProto], name: &str) -> bool {
    inits.iter().any(|t| t.name == name)
}

/// Per removable class: its group key (the producing nodes) and L1 score.
fn l1_scores(
    model: &OnnxModel,
    a: &Analysis,
    classes: &BTreeMap<usize, Vec<usize>>,
) -> BTreeMap<usize, (Vec<usize>, f32)> {
    let g = model.proto().graph.as_ref().expect("graph");
    // Per conv node: per-channel L1 and their mean.
    let mut norms: HashMap<usize, (Vec<f32>, f32)> = HashMap::new();
    let mut out = BTreeMap::new();
    for (&root, members) in classes {
        let mut key = Vec::new();
        let mut score = 0.0;
        for &m in members {
            match a.origin[m] {
                Origin::Conv { node, ch } => {
                    key.push(node);
                    let (v, mean) = norms.entry(node).or_insert_with(|| {
                        let w = f32_init(g, &g.node[node].input[1]).expect("conv weight");
                        let per = w.data.len() / w.shape[0].max(1);
                        let v: Vec<f32> = w
                            .data
                            .chunks(per.max(1))
                            .map(|c| c.iter().map(|x| x.abs()).sum())
                            .collect();
                        let mean = v.iter().sum::<f32>() / v.len().max(1) as f32;
                        (v, mean)
                    });
                    score += v[ch] / mean.max(1e-12);
                }
                Origin::Zero { node } => key.push(node),
                Origin::Other => {}
            }
        }
        key.sort_unstable();
        key.dedup();
        out.insert(root, (key, score));
    }
    out
}

/// Classes to remove: per group, the `round(fraction · n)` of lowest score (at least one
/// stays); ties broken by class id.
fn choose(scores: &BTreeMap<usize, (Vec<usize>, f32)>, fraction: f32) -> (BTreeSet<usize>, usize) {
    let mut groups: BTreeMap<&Vec<usize>, Vec<(f32, usize)>> = BTreeMap::new();
    for (&root, (key, s)) in scores {
        groups.entry(key).or_default().push((*s, root));
    }
    let mut removed = BTreeSet::new();
    let mut pruned_groups = 0;
    for (_, mut v) in groups {
        v.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        let k =
            ((fraction as f64 * v.len() as f64).round() as usize).min(v.len().saturating_sub(1));
        if k > 0 {
            pruned_groups += 1;
        }
        removed.extend(v.iter().take(k).map(|x| x.1));
    }
    (removed, pruned_groups)
}

/// Sensitivity scores: per class, the mean absolute change of every output value over
/// `inputs` when the class alone is zeroed (its producing filters and biases set to 0).
fn sensitivity_scores(
    model: &OnnxModel,
    a: &Analysis,
    classes: &BTreeMap<usize, Vec<usize>>,
    inputs: &[Vec<f32>],
    progress: &dyn Fn(u64, u64),
) -> Result<BTreeMap<usize, (Vec<usize>, f32)>, ModelError> {
    let mut out = l1_scores(model, a, classes);
    let base = GenericRunner::new(model)?;
    let reference: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| {
            base.run(x)
                .map(|o| o.into_iter().flat_map(|t| t.data).collect())
        })
        .collect::<Result<_, _>>()?;
    let g = model.proto().graph.as_ref().expect("graph");
    let total = classes.len() as u64;
    for (done, (&root, members)) in classes.iter().enumerate() {
        let mut w = hearth_model::tensor::Weights::new();
        for &m in members {
            if let Origin::Conv { node, ch } = a.origin[m] {
                for k in [1usize, 2] {
                    let Some(name) = g.node[node].input.get(k).filter(|s| !s.is_empty()) else {
                        continue;
                    };
                    let t = w
                        .entry(name.clone())
                        .or_insert_with(|| f32_init(g, name).expect("conv constant"));
                    let per = t.data.len() / t.shape[0].max(1);
                    t.data[ch * per..(ch + 1) * per].fill(0.0);
                }
            }
        }
        let mut zeroed = model.clone();
        zeroed.set_weights(&w)?;
        let r = GenericRunner::new(&zeroed)?;
        let (mut sum, mut count) = (0f64, 0usize);
        for (x, y) in inputs.iter().zip(&reference) {
            let o: Vec<f32> = r.run(x)?.into_iter().flat_map(|t| t.data).collect();
            for (p, q) in o.iter().zip(y) {
                sum += f64::from((p - q).abs());
            }
            count += y.len();
        }
        if let Some(e) = out.get_mut(&root) {
            e.1 = (sum / count.max(1) as f64) as f32;
        }
        progress(done as u64 + 1, total);
    }
    Ok(out)
}

/// Removes `fraction` of the removable channel classes of every group of `model` (see the
/// module doc), ranked by `criterion` (sensitivity needs `inputs`). Returns the smaller model
/// and what was removed. Errors when nothing is removable or `fraction` removes nothing.
pub fn prune_channels(
    model: &OnnxModel,
    fraction: f32,
    criterion: ChannelCriterion,
    inputs: &[Vec<f32>],
    progress: &dyn Fn(u64, u64),
) -> Result<(OnnxModel, ChannelReport), ModelError> {
    let a = analyse(model)?;
    let classes = a.removable();
    if classes.is_empty() {
        return Err(ModelError::Onnx(
            "no removable conv channels (every channel reaches a graph output or an op channel \
             pruning does not rewrite)"
                .into(),
        ));
    }
    let scores = match criterion {
        ChannelCriterion::L1 => l1_scores(model, &a, &classes),
        ChannelCriterion::Sensitivity => {
            if inputs.is_empty() {
                return Err(ModelError::Data(
                    "sensitivity channel pruning needs calibration inputs".into(),
                ));
            }
            sensitivity_scores(model, &a, &classes, inputs, progress)?
        }
    };
    let (removed, groups) = choose(&scores, fraction);
    if removed.is_empty() {
        return Err(ModelError::Onnx(format!(
            "fraction {fraction} removes no channel ({} removable classes)",
            classes.len()
        )));
    }
    let pruned = remove(model, &a, &removed)?;
    let kept = a
        .layout
        .iter()
        .filter_map(|(name, (_, ids))| {
            let keep: Vec<usize> = (0..ids.len())
                .filter(|&p| !removed.contains(&a.find(ids[p])))
                .collect();
            (keep.len() < ids.len()).then(|| (name.clone(), keep))
        })
        .collect();
    let (b, c) = (per_conv_channels(model), per_conv_channels(&pruned));
    let convs = b.iter().zip(&c).filter(|(x, y)| x != y).count();
    Ok((
        pruned,
        ChannelReport {
            removable: classes.len(),
            removed: removed.len(),
            groups,
            convs,
            conv_channels: (b.iter().sum(), c.iter().sum()),
            kept,
        },
    ))
}

/// Output channels of every Conv with constant weights, in node order.
fn per_conv_channels(model: &OnnxModel) -> Vec<usize> {
    let g = model.proto().graph.as_ref().expect("graph");
    g.node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .filter_map(|n| init_shape(g, &n.input[1]).map(|s| s[0]))
        .collect()
}

/// Sum of the output channels of every Conv with constant weights.
pub fn conv_channels(model: &OnnxModel) -> usize {
    let g = model.proto().graph.as_ref().expect("graph");
    g.node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .filter_map(|n| init_shape(g, &n.input[1]).map(|s| s[0]))
        .sum()
}
