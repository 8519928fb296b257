//! int8 export in ONNX QOperator form, which tract runs with integer matmul kernels.
//!
//! A QDQ graph (`DequantizeLinear` in front of a float op) is folded back to f32 weights by
//! tract: a smaller file but float kernels. The QOperator form keeps the integer product in
//! the graph. For every Gemm of a sequential Gemm/Relu model Hearth emits
//!
//! ```text
//! a_k:u8 ──MatMulInteger(W_k:i8 [in,out], a_zero_point)──▶ i32
//!        ──Cast f32──Mul(s_a·s_w[c])──Add(bias)──[Relu]──QuantizeLinear(s_{k+1}, z_{k+1})──▶ a_{k+1}:u8
//! ```
//!
//! with the graph input quantized once at the start and the last layer's f32 logits feeding
//! the original tail (Softmax). Weights are symmetric int8 per output channel (zero point 0);
//! activations are affine uint8 with **static** scales and zero points calibrated from the
//! min/max of each layer input over a calibration [`Dataset`] (no `DynamicQuantizeLinear` at
//! run time). This is the static counterpart of ONNX Runtime's `quantize_dynamic` layout
//! (uint8 activations × int8 weights, `MatMulInteger`), which tract lowers to an
//! `OptMatMul` with i32 accumulators.
//!
//! [`plan_uses_integer_kernels`] checks the claim on tract's optimised plan itself.

use crate::data::Dataset;
use crate::error::ModelError;
use crate::onnx::OnnxModel;
use crate::quant::{quantize_affine, quantize_symmetric};
use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::tract_ndarray::{Array1, Array2, ArrayView2};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

/// Metadata key written on exported models: the quantization format.
pub const META_QUANT: &str = "hearth.quantization";

/// Options of [`export_int8_with`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Int8Options {
    /// One weight scale per output unit (true) or one per layer (false, smaller file).
    pub per_channel: bool,
}

impl Default for Int8Options {
    fn default() -> Self {
        Int8Options { per_channel: true }
    }
}

/// One matrix product of tract's optimised plan.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMulKernel {
    /// Node name in the optimised plan.
    pub node: String,
    /// Datum types of the node's inputs as tract sees them (packed operands show their
    /// pre-packing type when tract records it).
    pub inputs: Vec<String>,
    /// Accumulator types of the selected micro-kernels (`I32` for integer kernels).
    pub accumulators: Vec<String>,
    /// Names of the selected micro-kernels.
    pub kernels: Vec<String>,
}

impl MatMulKernel {
    /// True when the product takes 8-bit integer operands and every selected kernel
    /// accumulates in i32.
    pub fn is_integer(&self) -> bool {
        self.inputs.iter().any(|t| t == "I8" || t == "U8")
            && !self.accumulators.is_empty()
            && self.accumulators.iter().all(|a| a == "I32")
    }
}

fn attr_int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn init_f32(name: &str, dims: &[usize], v: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn init_u8(name: &str, v: u8) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: DataType::Uint8 as i32,
        raw_data: vec![v],
        ..Default::default()
    }
}

fn init_i8(name: &str, dims: &[usize], v: &[i8]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Int8 as i32,
        raw_data: v.iter().map(|&x| x as u8).collect(),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: name.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

/// Static uint8 parameters `(scale, zero_point)` covering `[min, max]` of `x` (and 0).
fn activation_params(x: &[f32]) -> (f32, u8) {
    let (_, p) = quantize_affine(x, 8);
    (p.scale, p.zero_point.clamp(0, 255) as u8)
}

/// The tensor names of the chain: for each dense layer, the output of its Gemm and the
/// output after its Relu (if any), found in the original graph.
fn chain_outputs(
    g: &pb::GraphProto,
    layers: &[crate::onnx::DenseLayer],
) -> Result<Vec<(String, String, Vec<usize>)>, ModelError> {
    let mut out = Vec::new();
    for l in layers {
        let (i, gemm) = g
            .node
            .iter()
            .enumerate()
            .find(|(_, n)| n.op_type == "Gemm" && n.input.get(1) == Some(&l.weight))
            .ok_or_else(|| ModelError::Onnx(format!("no Gemm uses {}", l.weight)))?;
        let gemm_out = gemm.output.first().cloned().unwrap_or_default();
        let mut used = vec![i];
        let mut tail = gemm_out.clone();
        if l.relu {
            let (j, relu) = g
                .node
                .iter()
                .enumerate()
                .find(|(_, n)| n.op_type == "Relu" && n.input.first() == Some(&gemm_out))
                .ok_or_else(|| ModelError::Onnx(format!("no Relu after {}", gemm.name)))?;
            tail = relu.output.first().cloned().unwrap_or_default();
            used.push(j);
        }
        out.push((gemm.name.clone(), tail, used));
    }
    Ok(out)
}

/// [`export_int8_with`] with per-channel weight scales.
pub fn export_int8(model: &OnnxModel, calib: &Dataset) -> Result<OnnxModel, ModelError> {
    export_int8_with(model, calib, &Int8Options::default())
}

/// Exports a sequential Gemm/Relu model to int8 QOperator form, with activation scales
/// calibrated (min/max) on `calib`. The result keeps the input, output and metadata of
/// `model` and runs in tract (and any ONNX runtime) on f32 inputs.
pub fn export_int8_with(
    model: &OnnxModel,
    calib: &Dataset,
    opts: &Int8Options,
) -> Result<OnnxModel, ModelError> {
    let layers = model.dense_layers()?;
    let weights = model.weights();
    let input_len = layers[0].inputs;
    if calib.input_len != input_len || calib.is_empty() {
        return Err(ModelError::Shape(format!(
            "calibration set: {} samples of {} inputs, model expects {input_len}",
            calib.len(),
            calib.input_len
        )));
    }
    let src = model.proto();
    let g = src
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Onnx("model has no graph".into()))?;
    let input = model
        .input_name()
        .ok_or_else(|| ModelError::Onnx("graph has no data input".into()))?
        .to_string();
    let chain = chain_outputs(g, &layers)?;

    // Calibration: float forward pass, recording each layer's input.
    let mut act = ArrayView2::from_shape((calib.len(), input_len), &calib.x[..])
        .map_err(|e| ModelError::Shape(e.to_string()))?
        .to_owned();
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let (s0, z0) = activation_params(act.as_slice().unwrap_or(&[]));
    inits.push(init_f32("q0.s", &[], &[s0]));
    inits.push(init_u8("q0.z", z0));
    nodes.push(node(
        "QuantizeLinear",
        "q0",
        &[&input, "q0.s", "q0.z"],
        "q0.q",
    ));
    let (mut a_scale, mut a_name, mut a_zp_name) = (s0, "q0.q".to_string(), "q0.z".to_string());
    let mut used_nodes: Vec<usize> = Vec::new();
    for (k, (l, (gname, tail, used))) in layers.iter().zip(&chain).enumerate() {
        used_nodes.extend(used);
        let w = &weights[&l.weight];
        // Weight as [out, in] rows (one row per output unit).
        let rows: Vec<f32> = if l.trans_b {
            w.data.clone()
        } else {
            let mut t = vec![0.0; w.data.len()];
            for i in 0..l.inputs {
                for o in 0..l.outputs {
                    t[o * l.inputs + i] = w.data[i * l.outputs + o];
                }
            }
            t
        };
        let mut q_rows = vec![0i8; rows.len()];
        let mut w_scale = vec![0.0f32; l.outputs];
        if opts.per_channel {
            for o in 0..l.outputs {
                let r = &rows[o * l.inputs..(o + 1) * l.inputs];
                let (q, p) = quantize_symmetric(r, 8);
                for (d, c) in q_rows[o * l.inputs..(o + 1) * l.inputs].iter_mut().zip(q) {
                    *d = c as i8;
                }
                w_scale[o] = p.scale;
            }
        } else {
            let (q, p) = quantize_symmetric(&rows, 8);
            for (d, c) in q_rows.iter_mut().zip(q) {
                *d = c as i8;
            }
            w_scale.iter_mut().for_each(|s| *s = p.scale);
        }
        // MatMulInteger wants B as [in, out].
        let mut b = vec![0i8; rows.len()];
        for o in 0..l.outputs {
            for i in 0..l.inputs {
                b[i * l.outputs + o] = q_rows[o * l.inputs + i];
            }
        }
        let wq = format!("{gname}.wq");
        inits.push(init_i8(&wq, &[l.inputs, l.outputs], &b));
        let rescale_name = format!("{gname}.r");
        let rescale: Vec<f32> = w_scale.iter().map(|s| s * a_scale).collect();
        if opts.per_channel {
            inits.push(init_f32(&rescale_name, &[l.outputs], &rescale));
        } else {
            inits.push(init_f32(&rescale_name, &[], &rescale[..1]));
        }
        let mm = format!("{gname}.i");
        nodes.push(node(
            "MatMulInteger",
            &format!("{gname}.mmi"),
            &[&a_name, &wq, &a_zp_name],
            &mm,
        ));
        let mut cast = node(
            "Cast",
            &format!("{gname}.cast"),
            &[&mm],
            &format!("{gname}.f"),
        );
        cast.attribute.push(attr_int("to", DataType::Float as i64));
        nodes.push(cast);
        let last_is_gemm = !l.relu;
        let gemm_out = if last_is_gemm && l.bias.is_none() {
            tail.clone()
        } else {
            format!("{gname}.s")
        };
        nodes.push(node(
            "Mul",
            &format!("{gname}.mul"),
            &[&format!("{gname}.f"), &rescale_name],
            &gemm_out,
        ));
        let mut cur = gemm_out;
        if let Some(bias) = &l.bias {
            let out = if l.relu {
                format!("{gname}.b")
            } else {
                tail.clone()
            };
            let bt = &weights[bias];
            inits.push(init_f32(bias, &bt.shape, &bt.data));
            nodes.push(node("Add", &format!("{gname}.add"), &[&cur, bias], &out));
            cur = out;
        }
        if l.relu {
            nodes.push(node("Relu", &format!("{gname}.relu"), &[&cur], tail));
        }

        // Float reference for the next layer's calibration.
        let wmat = Array2::from_shape_vec((l.outputs, l.inputs), rows)
            .map_err(|e| ModelError::Shape(e.to_string()))?;
        let mut z = act.dot(&wmat.t());
        if let Some(bias) = &l.bias {
            z += &Array1::from(weights[bias].data.clone());
        }
        if l.relu {
            z.mapv_inplace(|v| v.max(0.0));
        }
        act = z;
        if k + 1 < layers.len() {
            let (s, zp) = activation_params(&act.iter().copied().collect::<Vec<_>>());
            let qn = format!("q{}", k + 1);
            inits.push(init_f32(&format!("{qn}.s"), &[], &[s]));
            inits.push(init_u8(&format!("{qn}.z"), zp));
            nodes.push(node(
                "QuantizeLinear",
                &qn,
                &[tail, &format!("{qn}.s"), &format!("{qn}.z")],
                &format!("{qn}.q"),
            ));
            a_scale = s;
            a_name = format!("{qn}.q");
            a_zp_name = format!("{qn}.z");
        }
    }
    // The rest of the original graph (Softmax …) is kept verbatim.
    for (i, n) in g.node.iter().enumerate() {
        if !used_nodes.contains(&i) {
            nodes.push(n.clone());
        }
    }
    let mut opset = src.opset_import.clone();
    for o in opset.iter_mut() {
        if o.domain.is_empty() && o.version < 13 {
            o.version = 13;
        }
    }
    if !opset.iter().any(|o| o.domain.is_empty()) {
        opset.push(pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        });
    }
    let graph = pb::GraphProto {
        name: format!("{}-int8", g.name),
        node: nodes,
        initializer: inits,
        input: g
            .input
            .iter()
            .filter(|i| i.name == input)
            .cloned()
            .collect(),
        output: g.output.clone(),
        ..Default::default()
    };
    let proto = pb::ModelProto {
        ir_version: src.ir_version,
        opset_import: opset,
        producer_name: "hearth".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: src.metadata_props.clone(),
        ..Default::default()
    };
    let mut out = OnnxModel::from_bytes(&proto.encode_to_vec())?;
    let per = if opts.per_channel {
        "channel"
    } else {
        "tensor"
    };
    out.set_meta(META_QUANT, &format!("int8-qoperator/{per}"));
    Ok(out)
}

/// tract's optimised plan (batch 1) of `model`.
fn optimized_plan(model: &OnnxModel) -> Result<TypedModel, ModelError> {
    let input_len = model.input_len();
    if input_len == 0 {
        return Err(ModelError::Onnx("cannot determine the input length".into()));
    }
    tract_onnx::onnx()
        .model_for_proto_model(model.proto())
        .and_then(|m| m.with_input_fact(0, f32::fact([1, input_len]).into()))
        .and_then(|m| m.into_optimized())
        .map_err(ModelError::tract)
}

/// The matrix products of tract's optimised plan for `model` (batch 1), with the types
/// their kernels accumulate in.
pub fn matmul_kernels(model: &OnnxModel) -> Result<Vec<MatMulKernel>, ModelError> {
    let plan = optimized_plan(model)?;
    let mut out = Vec::new();
    for n in plan.nodes() {
        let Some(op) = n.op_as::<OptMatMul>() else {
            continue;
        };
        let inputs = n
            .inputs
            .iter()
            .map(|i| {
                plan.outlet_fact(*i)
                    .map(|f| format!("{:?}", f.datum_type))
                    .map_err(ModelError::tract)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(MatMulKernel {
            node: n.name.clone(),
            inputs,
            accumulators: op
                .mmm
                .iter()
                .map(|k| format!("{:?}", k.internal_type()))
                .collect(),
            kernels: op.mmm.iter().map(|k| k.name().to_string()).collect(),
        });
    }
    Ok(out)
}

/// True when tract's optimised plan of `model` has matrix products and every one of them
/// runs an integer kernel (i32 accumulators), as read from the plan's `OptMatMul` nodes.
pub fn plan_uses_integer_kernels(model: &OnnxModel) -> Result<bool, ModelError> {
    let k = matmul_kernels(model)?;
    Ok(!k.is_empty() && k.iter().all(MatMulKernel::is_integer))
}

/// Size of the weights as stored in an ONNX file: bytes of every initializer's payload.
pub fn initializer_bytes(model: &OnnxModel) -> usize {
    model.proto().graph.as_ref().map_or(0, |g| {
        g.initializer
            .iter()
            .map(|t| t.raw_data.len() + 4 * t.float_data.len() + 4 * t.int32_data.len())
            .sum()
    })
}
