//! Batch-1 latency of `Classifier::predict` and where its per-call time goes:
//! `cargo run --release -p hearth-model --example predict_latency [rounds]`.
//! Models: PLAID 387-256-128-11, the same with 50 % of the neurons removed (387-128-64-11),
//! and a tiny Softmax-dominated 64-8-10. Protocol as in `bench` (300 warm-up calls, median of
//! 3000 timed calls cycling through the inputs), repeated `rounds` times (median of medians).
//! The breakdown runs the batch-1 plan with tract directly on a reused state (as `predict`'s
//! pooled states do): input tensor, `state.run`, output copy, then the time per plan node.
//! Not part of the product.

use hearth_model::{Classifier, MlpSpec, OnnxModel, Task};
use std::hint::black_box;
use std::time::Instant;
use tract_onnx::prelude::*;

const WARMUP: usize = 300;
const RUNS: usize = 3000;
const ROWS: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// Deterministic inputs in roughly the range of standardised features.
fn inputs(input_len: usize) -> Vec<f32> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..ROWS * input_len)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Median per-call latency of `Classifier::predict` (µs), bench protocol.
fn predict_median(c: &Classifier, x: &[f32]) -> Result<f64, Box<dyn std::error::Error>> {
    let n = c.input_len();
    let row = |i: usize| &x[(i % ROWS) * n..(i % ROWS + 1) * n];
    for i in 0..WARMUP {
        black_box(c.predict(black_box(row(i)))?);
    }
    let mut times = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let input = row(i);
        let t = Instant::now();
        black_box(c.predict(black_box(input))?);
        times.push(us(t));
    }
    Ok(median(times))
}

/// Median time of each step of a batch-1 call on a reused state, and per plan node, in µs.
fn breakdown(model: &OnnxModel, x: &[f32]) -> Result<(), Box<dyn std::error::Error>> {
    let n = model.input_len();
    let plan = tract_onnx::onnx()
        .model_for_proto_model(model.proto())?
        .with_input_fact(0, f32::fact([1, n]).into())?
        .into_optimized()?
        .into_runnable()?;
    let row = |i: usize| &x[(i % ROWS) * n..(i % ROWS + 1) * n];
    let mut state = plan.spawn()?;
    let mut reused: Vec<Vec<f64>> = (0..4).map(|_| Vec::with_capacity(RUNS)).collect::<Vec<_>>();
    for i in 0..WARMUP + RUNS {
        let t_all = Instant::now();
        let t = Instant::now();
        let input = Tensor::from_shape(&[1, n], row(i))?;
        let d_tensor = us(t);
        let t = Instant::now();
        let out = state.run(tvec!(input.into()))?;
        let d_run = us(t);
        let t = Instant::now();
        let probs = out[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        drop(out);
        let d_extract = us(t);
        black_box(probs);
        let d_total = us(t_all);
        if i >= WARMUP {
            for (v, d) in reused.iter_mut().zip([d_tensor, d_run, d_extract, d_total]) {
                v.push(d);
            }
        }
    }
    let reused: Vec<String> = ["tensor", "run", "extract", "total"]
        .iter()
        .zip(reused)
        .map(|(k, v)| format!("{k} {:.2}", median(v)))
        .collect();
    println!("    reused state (µs):         {}", reused.join(", "));

    // Per node, on the reused state: where `run` itself goes.
    let graph = plan.model();
    let mut per_node = (0..graph.nodes.len())
        .map(|_| Vec::with_capacity(RUNS))
        .collect::<Vec<_>>();
    for i in 0..WARMUP + RUNS {
        let input = Tensor::from_shape(&[1, n], row(i))?;
        let timed = i >= WARMUP;
        black_box(state.run_plan_with_eval(
            tvec!(input.into()),
            |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                if timed {
                    per_node[node.id].push(us(t));
                }
                out
            },
        )?);
    }
    for &id in plan.order_without_consts() {
        let node = &graph.nodes[id];
        println!(
            "      {:<24} {:<16} {:>6.2} µs  {}",
            node.name,
            node.op.name(),
            median(std::mem::take(&mut per_node[id])),
            node.op
                .info()
                .unwrap_or_default()
                .iter()
                .find(|l| l.starts_with("Mult:"))
                .cloned()
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(5), |s| s.parse())?;
    let spec = |task: Task, hidden: Vec<usize>| {
        let d = task.default_spec();
        MlpSpec {
            task: task.to_string(),
            input_len: d.input_len,
            hidden,
            classes: d.classes,
        }
    };
    let t0 = Instant::now();
    black_box(Instant::now());
    let t_overhead = us(t0);
    println!("Instant::now() pair ≈ {t_overhead:.3} µs");
    let models = [
        ("plaid 387-256-128-11", spec(Task::Plaid, vec![256, 128])),
        (
            "plaid 387-128-64-11 (50% neurons)",
            spec(Task::Plaid, vec![128, 64]),
        ),
        (
            "digits 64-8-10 (tiny, Softmax-heavy)",
            spec(Task::Digits, vec![8]),
        ),
    ];
    for (label, spec) in models {
        let model = OnnxModel::build_mlp(&spec, 7);
        let c = Classifier::new(&model)?;
        let x = inputs(spec.input_len);
        let medians = (0..rounds)
            .map(|_| predict_median(&c, &x))
            .collect::<Result<Vec<f64>, _>>()?;
        println!(
            "{label}: Classifier::predict median {:.2} µs (round medians {:?})",
            median(medians.clone()),
            medians
                .iter()
                .map(|m| (m * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
        breakdown(&model, &x)?;
    }
    Ok(())
}
