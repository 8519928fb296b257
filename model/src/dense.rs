//! Which ONNX graphs Hearth's dense engine ([`hearth_dense`]) runs, and their layers.
//!
//! Two shapes, exactly: the float Gemm/Relu chain Hearth trains, prunes and decodes from
//! packages, and the int8 QOperator chain `hearth-compress` exports (Unsqueeze →
//! QuantizeLinear → QLinearConv(k=1)… → DequantizeLinear → Squeeze), each with an optional
//! Softmax over the classes. Any other op, attribute or layout gives `None`, and the model
//! runs in tract. [`Classifier`](crate::Classifier) also checks the engine against tract on
//! probe inputs before using it.

use crate::onnx::{initializer_data, InitValues, OnnxModel};
use hearth_dense::{DenseNet, FloatLayer, Int8Chain, QLinearLayer};
use tract_onnx::pb::{self, tensor_proto::DataType};

/// The dense engine for `model`, or `None` when the graph is not a chain it runs exactly.
pub fn engine_for(model: &OnnxModel) -> Option<DenseNet> {
    float_chain(model).or_else(|| int8_chain(model))
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
        out.push(FloatLayer {
            inputs: l.inputs,
            outputs: l.outputs,
            weight: rows,
            bias,
            relu: l.relu,
        });
    }
    DenseNet::float(&out, softmax).ok()
}

fn initializer<'g>(g: &'g pb::GraphProto, name: &str) -> Option<&'g pb::TensorProto> {
    g.initializer.iter().find(|t| t.name == name)
}

fn floats(g: &pb::GraphProto, name: &str) -> Option<Vec<f32>> {
    match initializer_data(initializer(g, name)?)? {
        (_, _, InitValues::Float(v)) => Some(v),
        _ => None,
    }
}

/// An int8 tensor's values (zero points and weights must be int8, not uint8).
fn int8s(g: &pb::GraphProto, name: &str) -> Option<(Vec<usize>, Vec<i64>)> {
    match initializer_data(initializer(g, name)?)? {
        (dims, DataType::Int8, InitValues::Int(v)) => Some((dims, v)),
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
        Some(a) if !a.is_empty() => match initializer(g, a).and_then(initializer_data) {
            Some((_, _, InitValues::Int(v))) => Some(v),
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
            Some(b) => match initializer_data(initializer(g, b)?)? {
                (_, DataType::Int32, InitValues::Int(v)) if v.len() == outputs => v,
                _ => return None,
            },
            None => vec![0; outputs],
        };
        layers.push(QLinearLayer {
            inputs,
            outputs,
            weight: w
                .iter()
                .map(|&v| i8::try_from(v).ok())
                .collect::<Option<_>>()?,
            weight_scale: w_scale,
            bias: bias
                .iter()
                .map(|&v| i32::try_from(v).ok())
                .collect::<Option<_>>()?,
            out_scale: y_scale,
            out_zero: i8::try_from(y_zero).ok()?,
        });
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
    let chain = Int8Chain {
        in_scale,
        in_zero: i8::try_from(in_zero).ok()?,
        layers,
    };
    DenseNet::int8(&chain, softmax).ok()
}
