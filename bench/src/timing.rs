//! Batch-1 latency: warm up, then time each call separately and report order statistics.
//! The ONNX Runtime side (`bench/ort_side.py`) uses the same protocol: the same test inputs
//! in the same order, the same warm-up and run counts, one thread.

use crate::BenchError;
use hearth_model::Classifier;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Order statistics of per-call wall times, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub median_us: f64,
    /// 10th percentile.
    pub p10_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// Timed calls (after warm-up).
    pub runs: usize,
}

/// Value at quantile `q` (0..=1) of sorted `v`, nearest rank; 0 for an empty slice.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[i]
}

/// Statistics of raw per-call times (µs).
pub fn summarize(mut times_us: Vec<f64>) -> Latency {
    times_us.sort_by(f64::total_cmp);
    let median = if times_us.is_empty() {
        0.0
    } else if times_us.len() % 2 == 1 {
        times_us[times_us.len() / 2]
    } else {
        (times_us[times_us.len() / 2 - 1] + times_us[times_us.len() / 2]) / 2.0
    };
    Latency {
        median_us: median,
        p10_us: quantile(&times_us, 0.1),
        p90_us: quantile(&times_us, 0.9),
        runs: times_us.len(),
    }
}

/// Times `call` on the inputs `x` (`n` rows of `input_len`, used in turn): `warmup` untimed
/// calls, then `runs` timed ones.
pub fn measure<F>(
    x: &[f32],
    input_len: usize,
    warmup: usize,
    runs: usize,
    mut call: F,
) -> Result<Latency, BenchError>
where
    F: FnMut(&[f32]) -> Result<(), BenchError>,
{
    if input_len == 0 || x.is_empty() || !x.len().is_multiple_of(input_len) {
        return Err(BenchError::Format(format!(
            "{} input values are not rows of {input_len}",
            x.len()
        )));
    }
    let n = x.len() / input_len;
    let row = |i: usize| &x[(i % n) * input_len..(i % n + 1) * input_len];
    for i in 0..warmup {
        call(row(i))?;
    }
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let input = row(i);
        let t = Instant::now();
        call(input)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(summarize(times))
}

/// Batch-1 latency of a Hearth [`Classifier`] (`predict`, the path devices use: input
/// tensor in, probabilities out), single-threaded as tract runs by default.
pub fn classifier_latency(
    c: &Classifier,
    x: &[f32],
    warmup: usize,
    runs: usize,
) -> Result<Latency, BenchError> {
    measure(x, c.input_len(), warmup, runs, |input| {
        std::hint::black_box(c.predict(std::hint::black_box(input))?);
        Ok(())
    })
}

/// A model that only applies Softmax to a `[N, width]` input: the per-call floor of an
/// engine (input in, probabilities out, no layers), timed like the real models.
pub fn floor_model(width: usize) -> Result<hearth_model::OnnxModel, BenchError> {
    use prost::Message;
    use tract_onnx::pb;
    use tract_onnx::pb::tensor_shape_proto::{dimension::Value, Dimension};
    let vi = |name: &str| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(Value::DimParam("N".into())),
                            ..Default::default()
                        },
                        Dimension {
                            value: Some(Value::DimValue(width as i64)),
                            ..Default::default()
                        },
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "floor".into(),
            node: vec![pb::NodeProto {
                input: vec!["input".into()],
                output: vec!["probs".into()],
                name: "softmax".into(),
                op_type: "Softmax".into(),
                attribute: vec![pb::AttributeProto {
                    name: "axis".into(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            input: vec![vi("input")],
            output: vec![vi("probs")],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(hearth_model::OnnxModel::from_bytes(&proto.encode_to_vec())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_statistics() {
        let l = summarize(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(l.median_us, 3.0);
        assert_eq!(l.runs, 5);
        assert_eq!(l.p10_us, 1.0);
        assert_eq!(l.p90_us, 5.0);
        assert_eq!(summarize(vec![1.0, 2.0, 3.0, 10.0]).median_us, 2.5);
        assert_eq!(summarize(Vec::new()).median_us, 0.0);
    }

    #[test]
    fn measure_cycles_rows_and_counts_calls() {
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let mut seen = Vec::new();
        let l = measure(&x, 2, 1, 4, |r| {
            seen.push(r[0]);
            Ok(())
        })
        .unwrap();
        assert_eq!(l.runs, 4);
        assert_eq!(seen, vec![0.0, 0.0, 2.0, 4.0, 0.0]);
        assert!(measure(&x, 4, 0, 1, |_| Ok(())).is_err());
    }

    #[test]
    fn floor_model_is_a_softmax() {
        let c = Classifier::new(&floor_model(3).unwrap()).unwrap();
        let p = c.predict(&[0.0, 0.0, (2.0f32).ln()]).unwrap();
        assert!(
            (p[2] - 0.5).abs() < 1e-6 && (p[0] - 0.25).abs() < 1e-6,
            "{p:?}"
        );
        let l = classifier_latency(&c, &[1.0, 2.0, 3.0], 2, 5).unwrap();
        assert_eq!(l.runs, 5);
        assert!(l.median_us > 0.0);
    }
}
