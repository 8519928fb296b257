//! Latency: warm up, then time each call separately and report order statistics, at batch 1
//! (one row per call) and at batch N (N consecutive rows per call, reported per sample).
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

/// Per-sample latency of batched calls: order statistics of the per-call wall time divided
/// by the batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchLatency {
    /// Rows per call.
    pub batch: usize,
    /// Per-call times divided by `batch` (µs per sample).
    pub per_sample: Latency,
}

/// `rows` rows of `x` (rows of `input_len`) read cyclically from row 0, so that any `batch`
/// consecutive rows starting at `(i * batch) % n` are one contiguous slice of the result.
fn cycled(x: &[f32], input_len: usize, rows: usize) -> Vec<f32> {
    let n = x.len() / input_len;
    (0..rows)
        .flat_map(|r| &x[(r % n) * input_len..(r % n + 1) * input_len])
        .copied()
        .collect()
}

/// Times `call` on batches of `batch` rows of `x` (`n` rows of `input_len`): call `i` gets rows
/// `i * batch ..` (mod `n`, wrapping, so every test row is used in turn and a split smaller than
/// `batch` is repeated), `warmup` untimed calls, then `runs` timed ones; times are divided by
/// `batch`.
pub fn measure_batch<F>(
    x: &[f32],
    input_len: usize,
    batch: usize,
    warmup: usize,
    runs: usize,
    mut call: F,
) -> Result<BatchLatency, BenchError>
where
    F: FnMut(&[f32], usize) -> Result<(), BenchError>,
{
    if input_len == 0 || batch == 0 || x.is_empty() || !x.len().is_multiple_of(input_len) {
        return Err(BenchError::Format(format!(
            "{} input values are not batches of {batch} rows of {input_len}",
            x.len()
        )));
    }
    let n = x.len() / input_len;
    // Rows n.. repeat rows 0.., so a batch starting at any row < n is contiguous.
    let buf = cycled(x, input_len, n + batch);
    let at = |i: usize| {
        let start = (i * batch) % n;
        &buf[start * input_len..(start + batch) * input_len]
    };
    for i in 0..warmup {
        call(at(i), batch)?;
    }
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let input = at(warmup + i);
        let t = Instant::now();
        call(input, batch)?;
        times.push(t.elapsed().as_secs_f64() * 1e6 / batch as f64);
    }
    Ok(BatchLatency {
        batch,
        per_sample: summarize(times),
    })
}

/// Per-sample latency of a Hearth [`Classifier`] at batch `batch` (`predict_batch`: the
/// symbolic-batch plan, `batch` rows in, `batch` probability rows out), single-threaded.
pub fn classifier_batch_latency(
    c: &Classifier,
    x: &[f32],
    batch: usize,
    warmup: usize,
    runs: usize,
) -> Result<BatchLatency, BenchError> {
    let classes = c.classes().len();
    measure_batch(x, c.input_len(), batch, warmup, runs, |input, n| {
        let p = c.predict_batch(std::hint::black_box(input), n)?;
        if p.len() != n * classes {
            return Err(BenchError::Format(format!(
                "predict_batch returned {} values for {n} rows of {classes} classes",
                p.len()
            )));
        }
        std::hint::black_box(p);
        Ok(())
    })
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

/// The declared first (batch) dimension of `model`'s data input: its symbol (e.g. `N`) or its
/// fixed size (e.g. `1`); `None` if the input has no shape.
pub fn input_batch_dim(model: &hearth_model::OnnxModel) -> Option<String> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::type_proto::Value as Type;
    let g = model.proto().graph.as_ref()?;
    let name = model.input_name()?;
    let input = g.input.iter().find(|i| i.name == name)?;
    let Type::TensorType(t) = input.r#type.as_ref()?.value.as_ref()?;
    match t.shape.as_ref()?.dim.first()?.value.as_ref()? {
        Value::DimParam(p) => Some(p.clone()),
        Value::DimValue(v) => Some(v.to_string()),
    }
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
    fn measure_batch_cycles_contiguous_batches() {
        // 5 rows of 2 values; batches of 3 wrap around the split.
        let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let mut firsts = Vec::new();
        let l = measure_batch(&x, 2, 3, 1, 3, |b, n| {
            assert_eq!(b.len(), n * 2);
            firsts.push(b.iter().step_by(2).copied().collect::<Vec<_>>());
            Ok(())
        })
        .unwrap();
        assert_eq!(l.batch, 3);
        assert_eq!(l.per_sample.runs, 3);
        assert_eq!(
            firsts,
            vec![
                vec![0.0, 2.0, 4.0],
                vec![6.0, 8.0, 0.0],
                vec![2.0, 4.0, 6.0],
                vec![8.0, 0.0, 2.0],
            ]
        );
        // A split smaller than the batch is repeated.
        let mut seen = Vec::new();
        measure_batch(&x[..4], 2, 5, 0, 1, |b, _| {
            seen.extend(b.iter().step_by(2).copied());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![0.0, 2.0, 0.0, 2.0, 0.0]);
        assert!(measure_batch(&x, 3, 2, 0, 1, |_, _| Ok(())).is_err());
        assert!(measure_batch(&x, 2, 0, 0, 1, |_, _| Ok(())).is_err());
    }

    #[test]
    fn measure_batch_reports_per_sample_times() {
        let x = vec![0.0f32; 8];
        let l = measure_batch(&x, 1, 4, 0, 3, |_, _| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        })
        .unwrap();
        // 2 ms per call of 4 rows: at least 500 µs per sample, well under a full call.
        assert!(l.per_sample.median_us >= 500.0, "{l:?}");
        assert!(l.per_sample.median_us < 2000.0, "{l:?}");
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
        assert_eq!(
            input_batch_dim(&floor_model(3).unwrap()).as_deref(),
            Some("N")
        );
        let b = classifier_batch_latency(&c, &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], 64, 2, 5).unwrap();
        assert_eq!((b.batch, b.per_sample.runs), (64, 5));
        assert!(b.per_sample.median_us > 0.0);
    }
}
