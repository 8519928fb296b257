//! The models `bench-compress` times at batch 64 really run batched: Hearth's int8 export keeps
//! the fp32 model's symbolic batch dimension, and `predict_batch` on 64 rows gives the same
//! probabilities as 64 batch-1 `predict` calls (which is what the batch-64 column assumes).

use hearth_bench::timing;
use hearth_compress::qonnx;
use hearth_model::{Classifier, Dataset, MlpSpec, OnnxModel, Task};

fn data(spec: &MlpSpec, rows: usize) -> Dataset {
    let n_in = spec.input_len;
    Dataset {
        task: spec.task.parse().unwrap(),
        classes: spec.classes.clone(),
        input_len: n_in,
        x: (0..rows * n_in)
            .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.3)
            .collect(),
        y: (0..rows).map(|r| (r % spec.classes.len()) as u32).collect(),
    }
}

#[test]
fn int8_export_has_symbolic_batch_and_batches_like_single_calls() {
    let spec = MlpSpec {
        hidden: vec![32, 16],
        ..Task::Digits.default_spec()
    };
    let fp32 = OnnxModel::build_mlp(&spec, 3);
    let calib = data(&spec, 100);
    let int8 = qonnx::export_int8(&fp32, &calib).unwrap();
    for m in [&fp32, &int8] {
        let dim = timing::input_batch_dim(m).unwrap();
        assert!(dim.parse::<u64>().is_err(), "batch dim is fixed: {dim}");
    }
    let test = data(&spec, 64);
    for m in [&fp32, &int8] {
        let c = Classifier::new(m).unwrap();
        let k = c.classes().len();
        let batch = c.predict_batch(&test.x, 64).unwrap();
        assert_eq!(batch.len(), 64 * k);
        for r in 0..64 {
            let one = c
                .predict(&test.x[r * spec.input_len..][..spec.input_len])
                .unwrap();
            for (a, b) in one.iter().zip(&batch[r * k..(r + 1) * k]) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "row {r}: {one:?} vs {:?}",
                    &batch[r * k..(r + 1) * k]
                );
            }
        }
        let l = timing::classifier_batch_latency(&c, &test.x, 64, 2, 5).unwrap();
        assert_eq!((l.batch, l.per_sample.runs), (64, 5));
    }
}
