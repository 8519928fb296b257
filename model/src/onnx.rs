//! ONNX models built, read and written with tract's own protobuf types (`tract_onnx::pb`):
//! the MLP Hearth ships, weights by initializer name, and Hearth's metadata.

use crate::error::ModelError;
use crate::tensor::{Tensor, Weights};
use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

/// ONNX IR version written by Hearth.
pub const IR_VERSION: i64 = 8;
/// Default-domain opset written by Hearth.
pub const OPSET: i64 = 13;
/// Metadata key: comma-separated class labels.
pub const META_CLASSES: &str = "hearth.classes";
/// Metadata key: the task name (`plaid`, `faces`, `digits`).
pub const META_TASK: &str = "hearth.task";
/// Name of the graph input.
pub const INPUT: &str = "input";
/// Name of the last Gemm output.
pub const LOGITS: &str = "logits";
/// Name of the graph output (softmax of the logits).
pub const PROBS: &str = "probs";

/// Shape of an MLP: `input_len` → hidden layers (ReLU) → one logit per class.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpSpec {
    /// Name of the task the model serves (written to the metadata `hearth.task`).
    pub task: String,
    /// Input vector length.
    pub input_len: usize,
    /// Widths of the hidden layers.
    pub hidden: Vec<usize>,
    /// Class labels (output width = `classes.len()`).
    pub classes: Vec<String>,
}

/// An ONNX model (a `ModelProto`), the single source of truth for structure and weights.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxModel {
    proto: pb::ModelProto,
}

/// One fully connected layer of a sequential Gemm/Relu graph, as the trainer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseLayer {
    /// Initializer name of the weight.
    pub weight: String,
    /// Initializer name of the bias, if any.
    pub bias: Option<String>,
    /// Gemm `transB`: true when the weight is stored `[out, in]` (PyTorch `Linear`).
    pub trans_b: bool,
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// Whether a Relu follows.
    pub relu: bool,
}

fn attr_int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Result<i64, &str>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Ok(v) => Value::DimValue(*v),
                Err(p) => Value::DimParam(p.to_string()),
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

/// An initializer of any element type from its little-endian raw bytes.
pub fn raw_initializer(
    name: &str,
    dims: &[usize],
    data_type: DataType,
    raw_data: Vec<u8>,
) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    }
}

/// A float initializer in little-endian raw form.
pub fn f32_initializer(name: &str, t: &Tensor) -> pb::TensorProto {
    let raw = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_initializer(name, &t.shape, DataType::Float, raw)
}

/// The values of a float or integer initializer, widened (from raw little-endian bytes or
/// the typed fields); `None` for external data, other types, or a count that does not match
/// the shape.
pub enum InitValues {
    Int(Vec<i64>),
    Float(Vec<f32>),
}

pub fn initializer_data(t: &pb::TensorProto) -> Option<(Vec<usize>, DataType, InitValues)> {
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
        DataType::Float if !raw.is_empty() => InitValues::Float(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DataType::Float => InitValues::Float(t.float_data.clone()),
        DataType::Int8 if !raw.is_empty() => {
            InitValues::Int(raw.iter().map(|&b| i64::from(b as i8)).collect())
        }
        DataType::Int32 if !raw.is_empty() => InitValues::Int(
            raw.chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        DataType::Int8 | DataType::Int32 => {
            InitValues::Int(t.int32_data.iter().map(|&v| i64::from(v)).collect())
        }
        DataType::Int64 if !raw.is_empty() => InitValues::Int(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        DataType::Int64 => InitValues::Int(t.int64_data.clone()),
        _ => return None,
    };
    let len = match &v {
        InitValues::Int(x) => x.len(),
        InitValues::Float(x) => x.len(),
    };
    (len == n).then_some((dims, dt, v))
}

/// The f32 values of an initializer (`float_data` or little-endian `raw_data`).
fn initializer_values(t: &pb::TensorProto) -> Option<Tensor> {
    match initializer_data(t)? {
        (shape, DataType::Float, InitValues::Float(data)) => Some(Tensor { shape, data }),
        _ => None,
    }
}

impl DenseLayer {
    /// This layer's weight `w` as `outputs × inputs`, row-major (one row per output unit),
    /// whichever way the Gemm stores it.
    pub fn out_major(&self, w: &Tensor) -> Vec<f32> {
        if self.trans_b {
            return w.data.clone();
        }
        let mut t = vec![0.0; w.data.len()];
        for i in 0..self.inputs {
            for o in 0..self.outputs {
                t[o * self.inputs + i] = w.data[i * self.outputs + o];
            }
        }
        t
    }
}

impl OnnxModel {
    /// Builds the MLP of `spec` with He-initialised weights drawn from `seed` and zero biases:
    /// input `"input"` f32[N, in] → Gemm(transB=1) `"fcK.weight"`[out,in] + `"fcK.bias"`[out]
    /// → Relu … → `"logits"` → Softmax → `"probs"`.
    pub fn build_mlp(spec: &MlpSpec, seed: u64) -> OnnxModel {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut widths = vec![spec.input_len];
        widths.extend(&spec.hidden);
        widths.push(spec.classes.len());
        let layers = widths.len() - 1;
        let mut nodes = Vec::new();
        let mut inits = Vec::new();
        let mut prev = INPUT.to_string();
        for k in 0..layers {
            let (fan_in, fan_out) = (widths[k], widths[k + 1]);
            let std = (2.0 / fan_in.max(1) as f64).sqrt();
            // A linear model (no hidden layer) starts at zero: with more inputs than samples
            // (MiniRocket's ~2,000 features, tens of samples) training only moves the weights
            // within the samples' span, so a random start would stay in every prediction as
            // noise. With hidden layers the random start breaks the symmetry and stays.
            let w: Vec<f32> = if layers == 1 {
                vec![0.0; fan_in * fan_out]
            } else {
                (0..fan_in * fan_out)
                    .map(|_| (crate::data::standard_normal(&mut rng) * std) as f32)
                    .collect()
            };
            let wname = format!("fc{k}.weight");
            let bname = format!("fc{k}.bias");
            inits.push(f32_initializer(
                &wname,
                &Tensor::new(vec![fan_out, fan_in], w),
            ));
            inits.push(f32_initializer(&bname, &Tensor::zeros(&[fan_out])));
            let last = k + 1 == layers;
            let out = if last {
                LOGITS.to_string()
            } else {
                format!("fc{k}")
            };
            nodes.push(pb::NodeProto {
                input: vec![prev.clone(), wname, bname],
                output: vec![out.clone()],
                name: format!("fc{k}"),
                op_type: "Gemm".into(),
                attribute: vec![attr_int("transB", 1)],
                ..Default::default()
            });
            prev = out;
            if !last {
                let relu = format!("relu{k}");
                nodes.push(pb::NodeProto {
                    input: vec![prev.clone()],
                    output: vec![relu.clone()],
                    name: relu.clone(),
                    op_type: "Relu".into(),
                    ..Default::default()
                });
                prev = relu;
            }
        }
        nodes.push(pb::NodeProto {
            input: vec![prev],
            output: vec![PROBS.into()],
            name: "softmax".into(),
            op_type: "Softmax".into(),
            attribute: vec![attr_int("axis", 1)],
            ..Default::default()
        });
        let n_classes = spec.classes.len() as i64;
        let graph = pb::GraphProto {
            name: format!("hearth-{}-mlp", spec.task),
            node: nodes,
            initializer: inits,
            input: vec![value_info(INPUT, &[Err("N"), Ok(spec.input_len as i64)])],
            output: vec![value_info(PROBS, &[Err("N"), Ok(n_classes)])],
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "hearth".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            metadata_props: vec![
                pb::StringStringEntryProto {
                    key: META_CLASSES.into(),
                    value: spec.classes.join(","),
                },
                pb::StringStringEntryProto {
                    key: META_TASK.into(),
                    value: spec.task.clone(),
                },
            ],
            ..Default::default()
        };
        OnnxModel { proto }
    }

    /// Decodes an ONNX file's bytes; the model must have a graph.
    pub fn from_bytes(b: &[u8]) -> Result<OnnxModel, ModelError> {
        let proto = pb::ModelProto::decode(b)?;
        if proto.graph.is_none() {
            return Err(ModelError::Onnx("model has no graph".into()));
        }
        Ok(OnnxModel { proto })
    }

    /// Reads an ONNX file.
    pub fn load(p: &Path) -> Result<OnnxModel, ModelError> {
        Self::from_bytes(&std::fs::read(p)?)
    }

    /// Encodes the model as ONNX protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    /// Writes the ONNX file (to a temporary file renamed into place).
    pub fn save(&self, p: &Path) -> Result<(), ModelError> {
        let tmp = p.with_extension("onnx.tmp");
        std::fs::write(&tmp, self.to_bytes())?;
        std::fs::rename(&tmp, p)?;
        Ok(())
    }

    /// Hex SHA-256 of the encoded model (what model fetches are checked against).
    pub fn sha256_hex(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.to_bytes()))
    }

    /// The underlying protobuf.
    pub fn proto(&self) -> &pb::ModelProto {
        &self.proto
    }

    fn graph(&self) -> &pb::GraphProto {
        // from_bytes and build_mlp guarantee a graph.
        self.proto
            .graph
            .as_ref()
            .expect("OnnxModel always has a graph")
    }

    /// Every f32 initializer, by name.
    pub fn weights(&self) -> Weights {
        self.graph()
            .initializer
            .iter()
            .filter_map(|t| initializer_values(t).map(|v| (t.name.clone(), v)))
            .collect()
    }

    /// Replaces initializers by name; every given name must exist with the same shape.
    pub fn set_weights(&mut self, w: &Weights) -> Result<(), ModelError> {
        let current = self.weights();
        for (name, t) in w {
            let old = current
                .get(name)
                .ok_or_else(|| ModelError::Shape(format!("no f32 initializer named {name}")))?;
            if old.shape != t.shape || t.data.len() != t.shape.iter().product::<usize>() {
                return Err(ModelError::Shape(format!(
                    "initializer {name}: shape {:?}, got {:?} ({} values)",
                    old.shape,
                    t.shape,
                    t.data.len()
                )));
            }
        }
        let graph = self
            .proto
            .graph
            .as_mut()
            .expect("OnnxModel always has a graph");
        for init in graph.initializer.iter_mut() {
            if let Some(t) = w.get(&init.name) {
                *init = f32_initializer(&init.name, t);
            }
        }
        Ok(())
    }

    /// A `metadata_props` value.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.proto
            .metadata_props
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    }

    /// Sets (or replaces) a `metadata_props` entry.
    pub fn set_meta(&mut self, key: &str, value: &str) {
        match self.proto.metadata_props.iter_mut().find(|e| e.key == key) {
            Some(e) => e.value = value.into(),
            None => self.proto.metadata_props.push(pb::StringStringEntryProto {
                key: key.into(),
                value: value.into(),
            }),
        }
    }

    /// Class labels from metadata `hearth.classes`; if absent, `class_0..class_{k-1}` from the
    /// output width when known, else empty.
    pub fn classes(&self) -> Vec<String> {
        match self.meta(META_CLASSES) {
            Some(s) if !s.is_empty() => s.split(',').map(|c| c.trim().to_string()).collect(),
            _ => match self.dense_layers() {
                Ok(l) => (0..l.last().map_or(0, |l| l.outputs))
                    .map(|i| format!("class_{i}"))
                    .collect(),
                Err(_) => Vec::new(),
            },
        }
    }

    /// The task name from metadata `hearth.task`.
    pub fn task(&self) -> Option<&str> {
        self.meta(META_TASK)
    }

    /// Length of the input vector (last dimension of the first graph input that is not an
    /// initializer; falls back to the first layer's width).
    pub fn input_len(&self) -> usize {
        use pb::tensor_shape_proto::dimension::Value;
        let g = self.graph();
        let from_input = g
            .input
            .iter()
            .find(|i| !g.initializer.iter().any(|t| t.name == i.name))
            .and_then(|i| match i.r#type.as_ref()?.value.as_ref()? {
                pb::type_proto::Value::TensorType(t) => match t.shape.as_ref()?.dim.last()?.value {
                    Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                    _ => None,
                },
            });
        from_input
            .or_else(|| {
                self.dense_layers()
                    .ok()
                    .and_then(|l| l.first().map(|l| l.inputs))
            })
            .unwrap_or(0)
    }

    /// Name of the first graph input that is not an initializer.
    pub fn input_name(&self) -> Option<&str> {
        let g = self.graph();
        g.input
            .iter()
            .find(|i| !g.initializer.iter().any(|t| t.name == i.name))
            .map(|i| i.name.as_str())
    }

    /// Reads the sequential Gemm/Relu structure (the chain from the graph input, ending at an
    /// optional Softmax). Errors on anything else: the trainer only handles this family.
    pub fn dense_layers(&self) -> Result<Vec<DenseLayer>, ModelError> {
        let g = self.graph();
        let weights = self.weights();
        let mut cur = self
            .input_name()
            .ok_or_else(|| ModelError::Onnx("graph has no data input".into()))?
            .to_string();
        let mut layers: Vec<DenseLayer> = Vec::new();
        // Each step consumes one node, so the chain is at most the node count long.
        for _ in 0..=g.node.len() {
            let consumers: Vec<&pb::NodeProto> = g
                .node
                .iter()
                .filter(|n| n.input.first() == Some(&cur))
                .collect();
            let node = match consumers.as_slice() {
                [] => break,
                [n] => *n,
                _ => {
                    return Err(ModelError::Onnx(format!(
                        "tensor {cur} feeds several nodes"
                    )))
                }
            };
            let int_attr = |name: &str, default: i64| {
                node.attribute
                    .iter()
                    .find(|a| a.name == name)
                    .map_or(default, |a| a.i)
            };
            let float_attr =
                |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.f);
            match node.op_type.as_str() {
                "Gemm" => {
                    if int_attr("transA", 0) != 0
                        || float_attr("alpha").is_some_and(|a| a != 1.0)
                        || float_attr("beta").is_some_and(|b| b != 1.0)
                    {
                        return Err(ModelError::Onnx(format!(
                            "Gemm {}: only transA=0, alpha=beta=1 supported",
                            node.name
                        )));
                    }
                    let trans_b = int_attr("transB", 0) != 0;
                    let wname = node.input.get(1).cloned().unwrap_or_default();
                    let w = weights.get(&wname).ok_or_else(|| {
                        ModelError::Onnx(format!(
                            "Gemm {}: weight {wname} is not an f32 initializer",
                            node.name
                        ))
                    })?;
                    if w.shape.len() != 2 {
                        return Err(ModelError::Onnx(format!("weight {wname} is not 2-D")));
                    }
                    let (outputs, inputs) = if trans_b {
                        (w.shape[0], w.shape[1])
                    } else {
                        (w.shape[1], w.shape[0])
                    };
                    let bias = node.input.get(2).filter(|b| !b.is_empty()).cloned();
                    if let Some(b) = &bias {
                        let bt = weights.get(b).ok_or_else(|| {
                            ModelError::Onnx(format!(
                                "Gemm {}: bias {b} is not an f32 initializer",
                                node.name
                            ))
                        })?;
                        if bt.data.len() != outputs {
                            return Err(ModelError::Onnx(format!(
                                "bias {b}: {} values, expected {outputs}",
                                bt.data.len()
                            )));
                        }
                    }
                    if let Some(prev) = layers.last() {
                        if prev.outputs != inputs {
                            return Err(ModelError::Onnx(format!(
                                "{wname}: input width {inputs} after {} outputs",
                                prev.outputs
                            )));
                        }
                    }
                    layers.push(DenseLayer {
                        weight: wname,
                        bias,
                        trans_b,
                        inputs,
                        outputs,
                        relu: false,
                    });
                }
                "Relu" => match layers.last_mut() {
                    Some(l) if !l.relu => l.relu = true,
                    _ => {
                        return Err(ModelError::Onnx(format!(
                            "Relu {} not after a Gemm",
                            node.name
                        )))
                    }
                },
                "Softmax" => break,
                other => {
                    return Err(ModelError::Onnx(format!(
                        "unsupported op {other} ({}): only sequential Gemm/Relu[/Softmax] graphs",
                        node.name
                    )))
                }
            }
            cur = node.output.first().cloned().unwrap_or_default();
        }
        if layers.is_empty() {
            return Err(ModelError::Onnx("no Gemm layer found".into()));
        }
        Ok(layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Task;

    #[test]
    fn build_and_round_trip() {
        let spec = Task::Digits.default_spec();
        let m = OnnxModel::build_mlp(&spec, 3);
        let bytes = m.to_bytes();
        let back = OnnxModel::from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.sha256_hex(), m.sha256_hex());
        assert_eq!(m.sha256_hex().len(), 64);
        assert_eq!(back.classes(), spec.classes);
        assert_eq!(back.task(), Some("digits"));
        assert_eq!(back.input_len(), 64);
        let w = back.weights();
        assert_eq!(w["fc0.weight"].shape, vec![32, 64]);
        assert_eq!(w["fc1.bias"].shape, vec![10]);
        let layers = back.dense_layers().unwrap();
        assert_eq!(layers.len(), 2);
        assert!(layers[0].relu && !layers[1].relu && layers[0].trans_b);
        // He init: variance ≈ 2 / fan_in.
        let v = &w["fc0.weight"].data;
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!(
            (var - 2.0 / 64.0).abs() < 0.2 * 2.0 / 64.0,
            "variance {var}"
        );
        assert_ne!(OnnxModel::build_mlp(&spec, 4).weights(), w);
        assert_eq!(OnnxModel::build_mlp(&spec, 3).weights(), w);
    }

    #[test]
    fn set_weights_checks_names_and_shapes() {
        let mut m = OnnxModel::build_mlp(&Task::Faces.default_spec(), 1);
        let mut w = m.weights();
        w.get_mut("fc1.bias").unwrap().data = vec![0.5, -0.5];
        m.set_weights(&w).unwrap();
        assert_eq!(m.weights()["fc1.bias"].data, vec![0.5, -0.5]);
        let mut bad = Weights::new();
        bad.insert("fc1.bias".into(), Tensor::zeros(&[3]));
        assert!(m.set_weights(&bad).is_err());
        let mut unknown = Weights::new();
        unknown.insert("nope".into(), Tensor::zeros(&[2]));
        assert!(m.set_weights(&unknown).is_err());
        assert!(OnnxModel::from_bytes(&[0xff, 0xff, 0xff]).is_err());
    }
}
