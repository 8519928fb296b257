//! ONNX graph builders shared by the toolkit tests that build small graphs by hand.

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

/// A float initializer `name` of shape `dims` holding `v`.
pub fn init(name: &str, dims: &[usize], v: &[f32]) -> pb::TensorProto {
    hearth_model::onnx::raw_initializer(
        name,
        dims,
        DataType::Float,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// A float graph input/output `name` of fixed shape `dims`.
pub fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
