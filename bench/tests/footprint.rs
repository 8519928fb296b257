//! Timings for `bench/footprint`: one training epoch and one batch-1 inference of the PLAID
//! agent's model (float and int8, in the engine the agent uses and in tract), printed as one
//! `FOOTPRINT {json}` line. `bench/footprint` runs it natively and under qemu-aarch64 (as a
//! Pi 4 and a Pi 5) from the same dev-profile build and reports the ratios: qemu is not a Pi,
//! so only ratios are meaningful. Ignored in the normal suite (it is a measurement, and slow
//! under emulation): `cargo nextest run -p hearth-bench --run-ignored only -E 'test(footprint)'`.
use std::path::Path;
use std::time::Instant;

use hearth_compress::qonnx;
use hearth_model::{train, Classifier, Engine, OnnxModel, Split, TaskSpec, TrainConfig};

/// Median of `runs` timed calls of `f`, in microseconds, after one warm-up call.
fn median_us(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

#[test]
#[ignore = "a measurement for bench/footprint"]
fn footprint_timings() {
    let task = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/plaid/task.toml");
    let spec = TaskSpec::from_file(&task).unwrap();
    let (tr, te) = (
        spec.load(Split::Train).unwrap(),
        spec.load(Split::Test).unwrap(),
    );
    let mut model = OnnxModel::build_mlp(&spec.mlp_spec(), 1);
    // Two epochs, so the per-epoch figure is not one epoch plus set-up.
    let epochs = 2;
    let cfg = TrainConfig {
        epochs,
        seed: 1,
        ..TrainConfig::default()
    };
    let t = Instant::now();
    let (w, _) = train(&model, &tr, &cfg).unwrap();
    let epoch_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(epochs);
    model.set_weights(&w).unwrap();
    let int8 = qonnx::export_int8(&model, &tr).unwrap();
    let n = te.input_len;
    let samples: Vec<&[f32]> = te.x.chunks_exact(n).take(64).collect();
    let per_sample = |c: &Classifier| {
        let mut i = 0;
        median_us(200, || {
            c.predict(samples[i % samples.len()]).unwrap();
            i += 1;
        })
    };
    let float = Classifier::new(&model).unwrap();
    let q = Classifier::new(&int8).unwrap();
    assert_eq!((float.engine(), q.engine()), (Engine::Dense, Engine::Dense));
    let float_tract = Classifier::with_engine(&model, Engine::Tract).unwrap();
    let int8_tract = Classifier::with_engine(&int8, Engine::Tract).unwrap();
    let int8_kernel = hearth_model::dense::engine_for(&int8)
        .map(|d| d.kernel())
        .unwrap_or_default();
    println!(
        "FOOTPRINT {{\"train_samples\":{},\"epoch_ms\":{epoch_ms:.1},\"float_dense_us\":{:.2},\
         \"int8_dense_us\":{:.2},\"float_tract_us\":{:.2},\"int8_tract_us\":{:.2},\
         \"int8_kernel\":\"{int8_kernel}\"}}",
        tr.y.len(),
        per_sample(&float),
        per_sample(&q),
        per_sample(&float_tract),
        per_sample(&int8_tract),
    );
}
