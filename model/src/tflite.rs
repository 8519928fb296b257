//! TensorFlow Lite models in Hearth (feature `tflite`): a `.tflite` flatbuffer, read with
//! `tract-tflite`'s schema reader (the flatbuffer is verified first: bounded work on hostile
//! bytes), translated into Hearth's ONNX form (`tract_onnx::pb`), which tract then runs and
//! every `hearth-compress` step works on.
//!
//! Why a translation rather than `tract_tflite::tflite().model_for_path`: tract-tflite 0.23.9
//! loads none of the MediaPipe models (they store weights as float16 and dequantize them at
//! load, an op it lacks, and some use PReLU), and the compression toolkit works on ONNX.
//!
//! What is translated (see `docs/tflite.md`, kept in step with [`SUPPORTED_OPS`]):
//! - Layout: tensors stay NHWC as in the file; each convolution or pooling is wrapped in
//!   `Transpose` NHWC→NCHW / NCHW→NHWC (tract's optimiser removes the pairs). Conv weights
//!   become OIHW initializers, depthwise weights `[C·M,1,KH,KW]` with `group = C`.
//!   `SAME` padding becomes explicit pads (TensorFlow's rule: the odd pixel at the end).
//! - Quantization: float32 models; float16 weights (`DEQUANTIZE` of a constant FLOAT16 tensor,
//!   MediaPipe's form), and int8/uint8 constant weights behind a `DEQUANTIZE` (per tensor or
//!   per axis), folded into float32 initializers. Computed int8/uint8/int16 tensors
//!   (full-integer models, `QUANTIZE`) are refused, naming the op.
//! - Anything else is refused before translation with every unsupported op named
//!   ([`TfliteError::Unsupported`]); `hearth-compress` exits 64 on it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::f16;
use tract_tflite::tflite as fb;

use crate::onnx::{raw_initializer, OnnxModel, IR_VERSION, OPSET};

/// Metadata key on the translated ONNX model: sha256 of the `.tflite` file it came from.
pub const META_TFLITE_SHA256: &str = "hearth.tflite.sha256";

/// TFLite builtin operators the translation handles (builtin names as in the schema).
pub const SUPPORTED_OPS: &[&str] = &[
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEQUANTIZE",
    "DIV",
    "FULLY_CONNECTED",
    "HARD_SWISH",
    "LEAKY_RELU",
    "LOGISTIC",
    "MAXIMUM",
    "MAX_POOL_2D",
    "MEAN",
    "MINIMUM",
    "MUL",
    "PAD",
    "PADV2",
    "PRELU",
    "RELU",
    "RELU6",
    "RESHAPE",
    "SOFTMAX",
    "STRIDED_SLICE",
    "SUB",
    "TANH",
];

/// Why a `.tflite` file was not translated.
#[derive(thiserror::Error, Debug)]
pub enum TfliteError {
    /// The file could not be read.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Not a valid TFLite flatbuffer, or inconsistent (bad tensor index, missing buffer).
    #[error("not a valid TFLite model: {0}")]
    Malformed(String),
    /// Operators (or an operator's options or quantization scheme) Hearth does not translate.
    #[error("unsupported TFLite operator {0}")]
    Unsupported(String),
}

/// What the translation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TfliteReport {
    /// Operators in the file, by name, with counts.
    pub ops: BTreeMap<String, usize>,
    /// Float16 weight tensors folded to float32.
    pub folded_f16: usize,
    /// int8/uint8 weight tensors dequantized to float32.
    pub folded_int8: usize,
    /// Float weight values in the translated graph.
    pub params: usize,
}

/// True when the bytes carry the TFLite file identifier (`TFL3`).
pub fn is_tflite(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[4..8] == b"TFL3"
}

/// Reads and translates a `.tflite` file.
pub fn load(path: &Path) -> Result<(OnnxModel, TfliteReport), TfliteError> {
    to_onnx(&std::fs::read(path)?)
}

/// Reads a model file: ONNX, or TFLite (by content, `TFL3`) translated to ONNX.
pub fn load_any(path: &Path) -> Result<OnnxModel, crate::ModelError> {
    let bytes = std::fs::read(path)?;
    if is_tflite(&bytes) {
        return to_onnx(&bytes)
            .map(|(m, _)| m)
            .map_err(|e| crate::ModelError::Onnx(format!("{}: {e}", path.display())));
    }
    OnnxModel::from_bytes(&bytes)
}

fn op_name(model: &fb::Model, op: &fb::Operator) -> String {
    let Some(codes) = model.operator_codes() else {
        return "?".into();
    };
    let idx = op.opcode_index() as usize;
    if idx >= codes.len() {
        return format!("opcode #{idx} (out of range)");
    }
    let code = codes.get(idx);
    let builtin = builtin_code(&code);
    if builtin == fb::BuiltinOperator::CUSTOM {
        return format!("{} (custom)", code.custom_code().unwrap_or("?"));
    }
    builtin
        .variant_name()
        .map(str::to_string)
        .unwrap_or_else(|| format!("builtin {}", builtin.0))
}

fn builtin_code(code: &fb::OperatorCode) -> fb::BuiltinOperator {
    let dep = code.deprecated_builtin_code() as i32;
    if dep == fb::BuiltinOperator::PLACEHOLDER_FOR_GREATER_OP_CODES.0 {
        code.builtin_code()
    } else {
        fb::BuiltinOperator(dep)
    }
}

/// A constant tensor's values.
#[derive(Clone, Debug)]
enum Const {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<i64>),
}

struct Tx<'a> {
    model: fb::Model<'a>,
    sub: fb::SubGraph<'a>,
    names: Vec<String>,
    consts: HashMap<i32, Const>,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    used_names: HashSet<String>,
    report: TfliteReport,
}

fn bad(m: impl Into<String>) -> TfliteError {
    TfliteError::Malformed(m.into())
}

fn attr_i(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_is(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_f(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

fn value_info(name: &str, shape: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = shape
        .iter()
        .map(|&d| Dimension {
            value: Some(if d < 0 {
                Value::DimParam("N".into())
            } else {
                Value::DimValue(d)
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// TensorFlow `SAME` padding for one spatial axis: (begin, end).
fn same_pads(input: usize, kernel: usize, stride: usize, dilation: usize) -> (i64, i64) {
    let eff = (kernel - 1) * dilation + 1;
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + eff).saturating_sub(input);
    ((total / 2) as i64, (total - total / 2) as i64)
}

/// Translates a TFLite flatbuffer into Hearth's ONNX form.
pub fn to_onnx(bytes: &[u8]) -> Result<(OnnxModel, TfliteReport), TfliteError> {
    let model = fb::root_as_model(bytes).map_err(|e| bad(e.to_string()))?;
    let subs = model.subgraphs().ok_or_else(|| bad("no subgraphs"))?;
    if subs.is_empty() {
        return Err(bad("no subgraphs"));
    }
    let sub = subs.get(0);
    let ops = sub.operators().ok_or_else(|| bad("no operators"))?;
    let tensors = sub.tensors().ok_or_else(|| bad("no tensors"))?;

    // First pass: name every operator Hearth does not translate, before doing anything.
    let mut report = TfliteReport::default();
    let mut missing: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        let name = op_name(&model, &op);
        *report.ops.entry(name.clone()).or_default() += 1;
        if !SUPPORTED_OPS.contains(&name.as_str()) {
            let e = missing.entry(name).or_insert((0, i));
            e.0 += 1;
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|(n, (count, first))| format!("{n} ({count}x, first at operator {first})"))
            .collect();
        return Err(TfliteError::Unsupported(format!(
            "{}; Hearth translates {}",
            list.join(", "),
            SUPPORTED_OPS.join(" ")
        )));
    }

    // ONNX value names: the TFLite tensor names, made unique.
    let mut names = Vec::with_capacity(tensors.len());
    let mut used_names = HashSet::new();
    for (i, t) in tensors.iter().enumerate() {
        let base = t
            .name()
            .filter(|n| !n.is_empty())
            .unwrap_or("t")
            .to_string();
        let mut n = base.clone();
        if used_names.contains(&n) {
            n = format!("{base}__{i}");
        }
        used_names.insert(n.clone());
        names.push(n);
    }
    let mut tx = Tx {
        model,
        sub,
        names,
        consts: HashMap::new(),
        nodes: Vec::new(),
        inits: Vec::new(),
        used_names,
        report,
    };
    tx.read_consts()?;
    for (i, op) in ops.iter().enumerate() {
        let name = op_name(&tx.model, &op);
        tx.op(i, &name, &op).map_err(|e| match e {
            TfliteError::Unsupported(m) => {
                TfliteError::Unsupported(format!("{name} (operator {i}): {m}"))
            }
            TfliteError::Malformed(m) => bad(format!("{name} (operator {i}): {m}")),
            e => e,
        })?;
    }
    let inputs = tx.sub.inputs().ok_or_else(|| bad("no graph inputs"))?;
    let outputs = tx.sub.outputs().ok_or_else(|| bad("no graph outputs"))?;
    let mut g_in = Vec::new();
    for t in inputs.iter() {
        tx.float_activation(t, "graph input")?;
        g_in.push(value_info(&tx.names[t as usize], &tx.shape(t)?));
    }
    let mut g_out = Vec::new();
    for t in outputs.iter() {
        if tx.consts.contains_key(&t) {
            return Err(TfliteError::Unsupported(
                "a graph output that is a constant".into(),
            ));
        }
        tx.float_activation(t, "graph output")?;
        g_out.push(value_info(&tx.names[t as usize], &tx.shape(t)?));
    }
    tx.report.params = tx
        .inits
        .iter()
        .filter(|t| t.data_type == DataType::Float as i32)
        .map(|t| t.dims.iter().product::<i64>() as usize)
        .sum();
    let graph = pb::GraphProto {
        name: tx.sub.name().unwrap_or("tflite").to_string(),
        node: tx.nodes,
        initializer: tx.inits,
        input: g_in,
        output: g_out,
        ..Default::default()
    };
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    let proto = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET.max(14),
        }],
        producer_name: "hearth-tflite".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: vec![pb::StringStringEntryProto {
            key: META_TFLITE_SHA256.into(),
            value: digest,
        }],
        ..Default::default()
    };
    let bytes = prost::Message::encode_to_vec(&proto);
    let onnx = OnnxModel::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok((onnx, tx.report))
}

impl<'a> Tx<'a> {
    fn tensor(&self, t: i32) -> Result<fb::Tensor<'a>, TfliteError> {
        let ts = self.sub.tensors().ok_or_else(|| bad("no tensors"))?;
        if t < 0 || t as usize >= ts.len() {
            return Err(bad(format!("tensor index {t} out of range")));
        }
        Ok(ts.get(t as usize))
    }

    fn shape(&self, t: i32) -> Result<Vec<i64>, TfliteError> {
        let tensor = self.tensor(t)?;
        Ok(tensor
            .shape()
            .map(|s| s.iter().map(|d| d as i64).collect())
            .unwrap_or_default())
    }

    fn ushape(&self, t: i32) -> Result<Vec<usize>, TfliteError> {
        self.shape(t)?
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| {
                    TfliteError::Unsupported(format!("dynamic dimension in tensor {t}"))
                })
            })
            .collect()
    }

    /// Reads every tensor that has data into `consts` (float32, float16 and int32/int64
    /// as-is; quantized int8/uint8 are kept for DEQUANTIZE).
    fn read_consts(&mut self) -> Result<(), TfliteError> {
        let buffers = self.model.buffers().ok_or_else(|| bad("no buffers"))?;
        let ts = self.sub.tensors().ok_or_else(|| bad("no tensors"))?;
        for (i, t) in ts.iter().enumerate() {
            let b = t.buffer() as usize;
            if b == 0 {
                continue;
            }
            if b >= buffers.len() {
                return Err(bad(format!("tensor {i}: buffer {b} out of range")));
            }
            let Some(data) = buffers.get(b).data() else {
                continue;
            };
            let data = data.bytes();
            let shape: Vec<usize> = t
                .shape()
                .map(|s| s.iter().map(|d| d.max(0) as usize).collect())
                .unwrap_or_default();
            let n: usize = shape.iter().product();
            let ty = t.type_();
            let width = match ty {
                fb::TensorType::FLOAT32 | fb::TensorType::INT32 => 4,
                fb::TensorType::FLOAT16 | fb::TensorType::INT16 => 2,
                fb::TensorType::INT64 => 8,
                fb::TensorType::INT8 | fb::TensorType::UINT8 => 1,
                _ => continue,
            };
            if data.len() != n * width {
                return Err(bad(format!(
                    "tensor {i}: {} bytes of data for shape {shape:?}",
                    data.len()
                )));
            }
            let c = match ty {
                fb::TensorType::FLOAT32 => Const::F32(
                    shape,
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                fb::TensorType::FLOAT16 => Const::F32(
                    shape,
                    data.chunks_exact(2)
                        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                        .collect(),
                ),
                fb::TensorType::INT32 => Const::I64(
                    data.chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                        .collect(),
                ),
                fb::TensorType::INT64 => Const::I64(
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect(),
                ),
                // Quantized weights: dequantized where a DEQUANTIZE reads them.
                _ => continue,
            };
            self.consts.insert(i as i32, c);
        }
        Ok(())
    }

    /// Refuses a computed tensor that is not float32 (full-integer quantization).
    fn float_activation(&self, t: i32, role: &str) -> Result<(), TfliteError> {
        let tensor = self.tensor(t)?;
        let ty = tensor.type_();
        if ty != fb::TensorType::FLOAT32 {
            let q = if tensor.quantization().and_then(|q| q.scale()).is_some() {
                " (quantized activations: full-integer models are not translated)"
            } else {
                ""
            };
            return Err(TfliteError::Unsupported(format!(
                "{role} {:?} is {}{q}",
                self.names[t as usize],
                ty.variant_name().unwrap_or("?")
            )));
        }
        Ok(())
    }

    fn fresh(&mut self, base: &str) -> String {
        let mut n = base.to_string();
        let mut k = 1;
        while self.used_names.contains(&n) {
            n = format!("{base}_{k}");
            k += 1;
        }
        self.used_names.insert(n.clone());
        n
    }

    fn node(
        &mut self,
        op_type: &str,
        inputs: Vec<String>,
        out: &str,
        attrs: Vec<pb::AttributeProto>,
    ) {
        let name = format!("{out}__{op_type}");
        self.nodes.push(pb::NodeProto {
            input: inputs,
            output: vec![out.to_string()],
            name,
            op_type: op_type.into(),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn init_f32(&mut self, base: &str, dims: &[usize], data: &[f32]) -> String {
        let name = self.fresh(base);
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits
            .push(raw_initializer(&name, dims, DataType::Float, raw));
        name
    }

    fn init_i64(&mut self, base: &str, data: &[i64]) -> String {
        let name = self.fresh(base);
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits
            .push(raw_initializer(&name, &[data.len()], DataType::Int64, raw));
        name
    }

    fn ints(&self, t: i32, what: &str) -> Result<Vec<i64>, TfliteError> {
        match self.consts.get(&t) {
            Some(Const::I64(v)) => Ok(v.clone()),
            _ => Err(TfliteError::Unsupported(format!(
                "{what} must be a constant integer tensor"
            ))),
        }
    }

    fn floats(&self, t: i32) -> Option<(Vec<usize>, Vec<f32>)> {
        match self.consts.get(&t) {
            Some(Const::F32(s, v)) => Some((s.clone(), v.clone())),
            _ => None,
        }
    }

    /// The ONNX value for an op input: a computed tensor by name, or a float constant as an
    /// initializer (emitted on first use).
    fn value(&mut self, t: i32) -> Result<String, TfliteError> {
        let name = self.names[t as usize].clone();
        if let Some((s, v)) = self.floats(t) {
            if !self.inits.iter().any(|i| i.name == name) {
                let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                self.inits
                    .push(raw_initializer(&name, &s, DataType::Float, raw));
            }
            return Ok(name);
        }
        if self.consts.contains_key(&t) {
            return Err(TfliteError::Unsupported(format!(
                "integer constant {name:?} used as a data input"
            )));
        }
        self.float_activation(t, "input")?;
        Ok(name)
    }

    fn transpose(&mut self, x: &str, perm: &[i64], base: &str) -> String {
        let out = self.fresh(base);
        self.node(
            "Transpose",
            vec![x.into()],
            &out,
            vec![attr_is("perm", perm)],
        );
        out
    }

    /// Where an op's last node writes: the output itself, or a fresh name when a fused
    /// activation follows (then [`Tx::activation`] writes the output).
    fn target(&mut self, out: &str, act: fb::ActivationFunctionType) -> String {
        if act == fb::ActivationFunctionType::NONE {
            out.to_string()
        } else {
            self.fresh(&format!("{out}.pre"))
        }
    }

    /// Applies a fused activation from `pre` into the op's output tensor name `out`.
    fn activation(
        &mut self,
        pre: &str,
        out: &str,
        act: fb::ActivationFunctionType,
    ) -> Result<(), TfliteError> {
        use fb::ActivationFunctionType as A;
        match act {
            A::NONE if pre == out => {}
            A::NONE => self.node("Identity", vec![pre.into()], out, vec![]),
            A::RELU => self.node("Relu", vec![pre.into()], out, vec![]),
            A::RELU6 | A::RELU_N1_TO_1 => {
                let (lo, hi) = if act == A::RELU6 {
                    (0.0, 6.0)
                } else {
                    (-1.0, 1.0)
                };
                let lo = self.init_f32(&format!("{out}.min"), &[], &[lo]);
                let hi = self.init_f32(&format!("{out}.max"), &[], &[hi]);
                self.node("Clip", vec![pre.into(), lo, hi], out, vec![]);
            }
            A::TANH => self.node("Tanh", vec![pre.into()], out, vec![]),
            other => {
                return Err(TfliteError::Unsupported(format!(
                    "fused activation {}",
                    other.variant_name().unwrap_or("?")
                )))
            }
        }
        Ok(())
    }

    fn ins(&self, op: &fb::Operator) -> Vec<i32> {
        op.inputs().map(|v| v.iter().collect()).unwrap_or_default()
    }

    fn op(&mut self, idx: usize, name: &str, op: &fb::Operator<'a>) -> Result<(), TfliteError> {
        let ins = self.ins(op);
        let outs: Vec<i32> = op.outputs().map(|v| v.iter().collect()).unwrap_or_default();
        let Some(&out_t) = outs.first() else {
            return Err(bad("no output"));
        };
        self.tensor(out_t)?;
        for &t in ins.iter().filter(|&&t| t >= 0) {
            self.tensor(t)?;
        }
        let need = |n: usize| -> Result<(), TfliteError> {
            if ins.len() < n || ins[..n].iter().any(|&t| t < 0) {
                Err(bad(format!("expected {n} inputs")))
            } else {
                Ok(())
            }
        };
        let out = self.names[out_t as usize].clone();
        let opt_err = || bad(format!("operator {idx}: missing options"));
        match name {
            "DEQUANTIZE" => {
                need(1)?;
                return self.dequantize(ins[0], out_t);
            }
            "CONV_2D" | "DEPTHWISE_CONV_2D" => {
                need(2)?;
                let depthwise = name == "DEPTHWISE_CONV_2D";
                let (padding, sh, sw, dh, dw, act) = if depthwise {
                    let o = op
                        .builtin_options_as_depthwise_conv_2_doptions()
                        .ok_or_else(opt_err)?;
                    (
                        o.padding(),
                        o.stride_h(),
                        o.stride_w(),
                        o.dilation_h_factor(),
                        o.dilation_w_factor(),
                        o.fused_activation_function(),
                    )
                } else {
                    let o = op
                        .builtin_options_as_conv_2_doptions()
                        .ok_or_else(opt_err)?;
                    (
                        o.padding(),
                        o.stride_h(),
                        o.stride_w(),
                        o.dilation_h_factor(),
                        o.dilation_w_factor(),
                        o.fused_activation_function(),
                    )
                };
                let xs = self.ushape(ins[0])?;
                if xs.len() != 4 {
                    return Err(TfliteError::Unsupported(format!(
                        "input of rank {}",
                        xs.len()
                    )));
                }
                let (ws, w) = self.floats(ins[1]).ok_or_else(|| {
                    TfliteError::Unsupported("weights that are not a float constant".into())
                })?;
                if ws.len() != 4 {
                    return Err(bad("weights of rank != 4"));
                }
                let cin = xs[3];
                let (kh, kw) = (ws[1], ws[2]);
                // TFLite: conv [O,KH,KW,I], depthwise [1,KH,KW,C·M]. ONNX: OIHW.
                let (o, i_per_group, group) = if depthwise {
                    (ws[3], 1, cin)
                } else {
                    let g = if ws[3] == 0 || cin % ws[3] != 0 {
                        0
                    } else {
                        cin / ws[3]
                    };
                    (ws[0], ws[3], g)
                };
                if group == 0 || o % group != 0 {
                    return Err(bad(format!("weights {ws:?} do not fit input {xs:?}")));
                }
                let mut oihw = vec![0f32; o * i_per_group * kh * kw];
                for oo in 0..o {
                    for ii in 0..i_per_group {
                        for y in 0..kh {
                            for x in 0..kw {
                                let src = if depthwise {
                                    (y * kw + x) * o + oo
                                } else {
                                    ((oo * kh + y) * kw + x) * i_per_group + ii
                                };
                                oihw[((oo * i_per_group + ii) * kh + y) * kw + x] = w[src];
                            }
                        }
                    }
                }
                let wname =
                    self.init_f32(&format!("{out}.weight"), &[o, i_per_group, kh, kw], &oihw);
                let mut inputs = vec![String::new(), wname];
                if ins.len() > 2 && ins[2] >= 0 {
                    let (_, b) = self.floats(ins[2]).ok_or_else(|| {
                        TfliteError::Unsupported("a bias that is not a float constant".into())
                    })?;
                    inputs.push(self.init_f32(&format!("{out}.bias"), &[o], &b));
                }
                let (sh, sw, dh, dw) = (
                    sh.max(1) as usize,
                    sw.max(1) as usize,
                    dh.max(1) as usize,
                    dw.max(1) as usize,
                );
                let pads = self.pads(padding, &xs, (kh, kw), (sh, sw), (dh, dw))?;
                let x = self.value(ins[0])?;
                inputs[0] = self.transpose(&x, &[0, 3, 1, 2], &format!("{out}.nchw_in"));
                let conv = self.fresh(&format!("{out}.nchw"));
                self.node(
                    "Conv",
                    inputs,
                    &conv,
                    vec![
                        attr_is("kernel_shape", &[kh as i64, kw as i64]),
                        attr_is("strides", &[sh as i64, sw as i64]),
                        attr_is("dilations", &[dh as i64, dw as i64]),
                        attr_is("pads", &pads),
                        attr_i("group", group as i64),
                    ],
                );
                let back = self.target(&out, act);
                self.node(
                    "Transpose",
                    vec![conv],
                    &back,
                    vec![attr_is("perm", &[0, 2, 3, 1])],
                );
                self.activation(&back, &out, act)?;
            }
            "MAX_POOL_2D" | "AVERAGE_POOL_2D" => {
                need(1)?;
                let o = op
                    .builtin_options_as_pool_2_doptions()
                    .ok_or_else(opt_err)?;
                let xs = self.ushape(ins[0])?;
                if xs.len() != 4 {
                    return Err(TfliteError::Unsupported(format!(
                        "input of rank {}",
                        xs.len()
                    )));
                }
                let (kh, kw) = (
                    o.filter_height().max(1) as usize,
                    o.filter_width().max(1) as usize,
                );
                let (sh, sw) = (o.stride_h().max(1) as usize, o.stride_w().max(1) as usize);
                let pads = self.pads(o.padding(), &xs, (kh, kw), (sh, sw), (1, 1))?;
                let x = self.value(ins[0])?;
                let t = self.transpose(&x, &[0, 3, 1, 2], &format!("{out}.nchw_in"));
                let pool = self.fresh(&format!("{out}.nchw"));
                let mut attrs = vec![
                    attr_is("kernel_shape", &[kh as i64, kw as i64]),
                    attr_is("strides", &[sh as i64, sw as i64]),
                    attr_is("pads", &pads),
                ];
                let ty = if name == "MAX_POOL_2D" {
                    "MaxPool"
                } else {
                    attrs.push(attr_i("count_include_pad", 0));
                    "AveragePool"
                };
                self.node(ty, vec![t], &pool, attrs);
                let act = o.fused_activation_function();
                let back = self.target(&out, act);
                self.node(
                    "Transpose",
                    vec![pool],
                    &back,
                    vec![attr_is("perm", &[0, 2, 3, 1])],
                );
                self.activation(&back, &out, act)?;
            }
            "ADD" | "SUB" | "MUL" | "DIV" | "MAXIMUM" | "MINIMUM" => {
                need(2)?;
                let act = match name {
                    "ADD" => op
                        .builtin_options_as_add_options()
                        .map(|o| o.fused_activation_function()),
                    "SUB" => op
                        .builtin_options_as_sub_options()
                        .map(|o| o.fused_activation_function()),
                    "MUL" => op
                        .builtin_options_as_mul_options()
                        .map(|o| o.fused_activation_function()),
                    "DIV" => op
                        .builtin_options_as_div_options()
                        .map(|o| o.fused_activation_function()),
                    _ => None,
                }
                .unwrap_or(fb::ActivationFunctionType::NONE);
                let ty = match name {
                    "ADD" => "Add",
                    "SUB" => "Sub",
                    "MUL" => "Mul",
                    "DIV" => "Div",
                    "MAXIMUM" => "Max",
                    _ => "Min",
                };
                let a = self.value(ins[0])?;
                let b = self.value(ins[1])?;
                let pre = self.target(&out, act);
                self.node(ty, vec![a, b], &pre, vec![]);
                self.activation(&pre, &out, act)?;
            }
            "RELU" | "RELU6" | "LOGISTIC" | "TANH" | "HARD_SWISH" => {
                need(1)?;
                let x = self.value(ins[0])?;
                match name {
                    "RELU" => self.node("Relu", vec![x], &out, vec![]),
                    "RELU6" => self.activation(&x, &out, fb::ActivationFunctionType::RELU6)?,
                    "LOGISTIC" => self.node("Sigmoid", vec![x], &out, vec![]),
                    "TANH" => self.node("Tanh", vec![x], &out, vec![]),
                    _ => self.node("HardSwish", vec![x], &out, vec![]),
                }
            }
            "LEAKY_RELU" => {
                need(1)?;
                let alpha = op
                    .builtin_options_as_leaky_relu_options()
                    .map(|o| o.alpha())
                    .unwrap_or(0.2);
                let x = self.value(ins[0])?;
                self.node("LeakyRelu", vec![x], &out, vec![attr_f("alpha", alpha)]);
            }
            "PRELU" => {
                need(2)?;
                let x = self.value(ins[0])?;
                let a = self.value(ins[1])?;
                self.node("PRelu", vec![x, a], &out, vec![]);
            }
            "PAD" | "PADV2" => {
                need(2)?;
                let p = self.ints(ins[1], "paddings")?;
                let rank = p.len() / 2;
                let mut pads: Vec<i64> = (0..rank).map(|i| p[2 * i]).collect();
                pads.extend((0..rank).map(|i| p[2 * i + 1]));
                let x = self.value(ins[0])?;
                let pn = self.init_i64(&format!("{out}.pads"), &pads);
                let mut inputs = vec![x, pn];
                if name == "PADV2" && ins.len() > 2 && ins[2] >= 0 {
                    let (_, v) = self.floats(ins[2]).ok_or_else(|| {
                        TfliteError::Unsupported("a pad value that is not a float constant".into())
                    })?;
                    let c = v.first().copied().unwrap_or(0.0);
                    inputs.push(self.init_f32(&format!("{out}.value"), &[], &[c]));
                }
                self.node("Pad", inputs, &out, vec![]);
            }
            "RESHAPE" => {
                need(1)?;
                let shape = if ins.len() > 1 && ins[1] >= 0 && self.consts.contains_key(&ins[1]) {
                    self.ints(ins[1], "new shape")?
                } else if let Some(s) = op
                    .builtin_options_as_reshape_options()
                    .and_then(|o| o.new_shape())
                {
                    s.iter().map(|d| d as i64).collect()
                } else {
                    self.shape(out_t)?
                };
                let x = self.value(ins[0])?;
                let s = self.init_i64(&format!("{out}.shape"), &shape);
                self.node("Reshape", vec![x, s], &out, vec![]);
            }
            "CONCATENATION" => {
                let o = op
                    .builtin_options_as_concatenation_options()
                    .ok_or_else(opt_err)?;
                let xs: Vec<String> = ins
                    .iter()
                    .map(|&t| self.value(t))
                    .collect::<Result<_, _>>()?;
                let act = o.fused_activation_function();
                let pre = self.target(&out, act);
                self.node("Concat", xs, &pre, vec![attr_i("axis", o.axis() as i64)]);
                self.activation(&pre, &out, act)?;
            }
            "STRIDED_SLICE" => {
                need(4)?;
                let o = op
                    .builtin_options_as_strided_slice_options()
                    .ok_or_else(opt_err)?;
                if o.ellipsis_mask() != 0 || o.new_axis_mask() != 0 {
                    return Err(TfliteError::Unsupported(
                        "ellipsis_mask / new_axis_mask".into(),
                    ));
                }
                let begin = self.ints(ins[1], "begin")?;
                let end = self.ints(ins[2], "end")?;
                let strides = self.ints(ins[3], "strides")?;
                let rank = begin.len();
                if end.len() != rank || strides.len() != rank {
                    return Err(bad("begin/end/strides lengths differ"));
                }
                let (mut starts, mut ends, mut squeeze) = (vec![], vec![], vec![]);
                for i in 0..rank {
                    let s = strides[i];
                    if s == 0 {
                        return Err(bad("zero stride"));
                    }
                    let bit = |m: i32| m & (1 << i) != 0;
                    let mut b = if bit(o.begin_mask()) {
                        if s > 0 {
                            0
                        } else {
                            i64::MAX
                        }
                    } else {
                        begin[i]
                    };
                    let mut e = if bit(o.end_mask()) {
                        if s > 0 {
                            i64::MAX
                        } else {
                            i64::MIN
                        }
                    } else {
                        end[i]
                    };
                    if bit(o.shrink_axis_mask()) {
                        b = begin[i];
                        e = if b == -1 { i64::MAX } else { b + 1 };
                        squeeze.push(i as i64);
                    }
                    starts.push(b);
                    ends.push(e);
                }
                let x = self.value(ins[0])?;
                let axes: Vec<i64> = (0..rank as i64).collect();
                let st = self.init_i64(&format!("{out}.starts"), &starts);
                let en = self.init_i64(&format!("{out}.ends"), &ends);
                let ax = self.init_i64(&format!("{out}.axes"), &axes);
                let sp = self.init_i64(&format!("{out}.steps"), &strides);
                if squeeze.is_empty() {
                    self.node("Slice", vec![x, st, en, ax, sp], &out, vec![]);
                } else {
                    let pre = self.fresh(&format!("{out}.pre"));
                    self.node("Slice", vec![x, st, en, ax, sp], &pre, vec![]);
                    let sq = self.init_i64(&format!("{out}.squeeze"), &squeeze);
                    self.node("Squeeze", vec![pre, sq], &out, vec![]);
                }
            }
            "MEAN" => {
                need(2)?;
                let keep = op
                    .builtin_options_as_reducer_options()
                    .map(|o| o.keep_dims())
                    .unwrap_or(false);
                let axes = self.ints(ins[1], "axes")?;
                let x = self.value(ins[0])?;
                self.node(
                    "ReduceMean",
                    vec![x],
                    &out,
                    vec![attr_is("axes", &axes), attr_i("keepdims", keep as i64)],
                );
            }
            "FULLY_CONNECTED" => {
                need(2)?;
                let o = op
                    .builtin_options_as_fully_connected_options()
                    .ok_or_else(opt_err)?;
                if o.weights_format() != fb::FullyConnectedOptionsWeightsFormat::DEFAULT {
                    return Err(TfliteError::Unsupported("shuffled weights format".into()));
                }
                let (ws, w) = self.floats(ins[1]).ok_or_else(|| {
                    TfliteError::Unsupported("weights that are not a float constant".into())
                })?;
                if ws.len() != 2 {
                    return Err(bad("weights of rank != 2"));
                }
                let wn = self.init_f32(&format!("{out}.weight"), &ws, &w);
                let x = self.value(ins[0])?;
                let flat_shape = self.init_i64(&format!("{out}.flat"), &[-1, ws[1] as i64]);
                let flat = self.fresh(&format!("{out}.in2d"));
                self.node("Reshape", vec![x, flat_shape], &flat, vec![]);
                let mut inputs = vec![flat, wn];
                if ins.len() > 2 && ins[2] >= 0 {
                    let (_, b) = self.floats(ins[2]).ok_or_else(|| {
                        TfliteError::Unsupported("a bias that is not a float constant".into())
                    })?;
                    inputs.push(self.init_f32(&format!("{out}.bias"), &[ws[0]], &b));
                }
                let gemm = self.fresh(&format!("{out}.gemm"));
                self.node("Gemm", inputs, &gemm, vec![attr_i("transB", 1)]);
                let shape = self.shape(out_t)?;
                let sn = self.init_i64(&format!("{out}.shape"), &shape);
                let act = o.fused_activation_function();
                let pre = self.target(&out, act);
                self.node("Reshape", vec![gemm, sn], &pre, vec![]);
                self.activation(&pre, &out, act)?;
            }
            "SOFTMAX" => {
                need(1)?;
                let beta = op
                    .builtin_options_as_softmax_options()
                    .map(|o| o.beta())
                    .unwrap_or(1.0);
                let mut x = self.value(ins[0])?;
                if beta != 1.0 {
                    let b = self.init_f32(&format!("{out}.beta"), &[], &[beta]);
                    let scaled = self.fresh(&format!("{out}.scaled"));
                    self.node("Mul", vec![x, b], &scaled, vec![]);
                    x = scaled;
                }
                self.node("Softmax", vec![x], &out, vec![attr_i("axis", -1)]);
            }
            other => return Err(TfliteError::Unsupported(other.to_string())),
        }
        self.float_activation(out_t, "output")?;
        Ok(())
    }

    fn pads(
        &self,
        padding: fb::Padding,
        xs: &[usize],
        (kh, kw): (usize, usize),
        (sh, sw): (usize, usize),
        (dh, dw): (usize, usize),
    ) -> Result<Vec<i64>, TfliteError> {
        Ok(if padding == fb::Padding::SAME {
            let (t, b) = same_pads(xs[1], kh, sh, dh);
            let (l, r) = same_pads(xs[2], kw, sw, dw);
            vec![t, l, b, r]
        } else if padding == fb::Padding::VALID {
            vec![0; 4]
        } else {
            return Err(TfliteError::Unsupported(format!("padding {}", padding.0)));
        })
    }

    /// Folds `DEQUANTIZE(constant)` into a float32 constant.
    fn dequantize(&mut self, input: i32, out: i32) -> Result<(), TfliteError> {
        let t = self.tensor(input)?;
        let ty = t.type_();
        if ty == fb::TensorType::FLOAT16 {
            if let Some(c) = self.consts.get(&input).cloned() {
                self.consts.insert(out, c);
                self.report.folded_f16 += 1;
                return Ok(());
            }
        }
        if ty == fb::TensorType::INT8 || ty == fb::TensorType::UINT8 {
            let buffers = self.model.buffers().ok_or_else(|| bad("no buffers"))?;
            let b = t.buffer() as usize;
            let data = (b != 0 && b < buffers.len())
                .then(|| buffers.get(b).data())
                .flatten();
            if let Some(data) = data {
                let q = t
                    .quantization()
                    .ok_or_else(|| bad("quantized weights without parameters"))?;
                let scale: Vec<f32> = q.scale().map(|v| v.iter().collect()).unwrap_or_default();
                let zp: Vec<i64> = q
                    .zero_point()
                    .map(|v| v.iter().collect())
                    .unwrap_or_default();
                if scale.is_empty() {
                    return Err(bad("quantized weights without a scale"));
                }
                let shape = self.ushape(input)?;
                let n: usize = shape.iter().product();
                let bytes = data.bytes();
                if bytes.len() != n {
                    return Err(bad("quantized weights of the wrong size"));
                }
                let axis = q.quantized_dimension() as usize;
                let (inner, dim) = if scale.len() > 1 {
                    if axis >= shape.len() || shape[axis] != scale.len() {
                        return Err(bad("per-axis scales do not match the quantized dimension"));
                    }
                    (shape[axis + 1..].iter().product::<usize>(), shape[axis])
                } else {
                    (1, 1)
                };
                let vals: Vec<f32> = bytes
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        let c = if dim > 1 { (i / inner) % dim } else { 0 };
                        let q = if ty == fb::TensorType::INT8 {
                            b as i8 as i64
                        } else {
                            b as i64
                        };
                        let z = zp.get(c).or(zp.first()).copied().unwrap_or(0);
                        ((q - z) as f32) * scale[c]
                    })
                    .collect();
                self.consts.insert(out, Const::F32(shape, vals));
                self.report.folded_int8 += 1;
                return Ok(());
            }
        }
        Err(TfliteError::Unsupported(format!(
            "DEQUANTIZE of a computed {} tensor (only constant float16 / int8 / uint8 weights are folded)",
            ty.variant_name().unwrap_or("?")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // 128 input, 3x3 stride 2: out 64, total pad 1, all at the end.
        assert_eq!(same_pads(128, 3, 2, 1), (0, 1));
        // 5x5 stride 1: 2 each side.
        assert_eq!(same_pads(16, 5, 1, 1), (2, 2));
        // 2x2 stride 2 on an even input: none.
        assert_eq!(same_pads(64, 2, 2, 1), (0, 0));
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        assert!(!is_tflite(b"abc"));
        let mut b = vec![0u8; 64];
        b[4..8].copy_from_slice(b"TFL3");
        assert!(matches!(to_onnx(&b), Err(TfliteError::Malformed(_))));
        for len in [0, 8, 12, 16] {
            assert!(to_onnx(&b[..len]).is_err());
        }
    }
}
