//! Where tract spends the time of one batch-1 inference: the optimised plan (one line per
//! node: op, output type, chosen matrix kernel) and the mean wall time of each node, timed
//! around tract's own per-node `eval` through `SimpleState::run_plan_with_eval`.

use crate::BenchError;
use hearth_model::OnnxModel;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

fn tract_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Tract(e.to_string())
}

/// One node of the optimised plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// Node name.
    pub name: String,
    /// Op name (`OptMatMul`, `Softmax`, ...).
    pub op: String,
    /// Output type and shape, e.g. `1,256,I8`.
    pub output: String,
    /// Kernel choice of matrix products (tract's `Mult:` info line), else empty.
    pub kernel: String,
    /// Mean wall time per inference (µs).
    pub mean_us: f64,
}

/// The per-node profile of a batch-1 plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanProfile {
    /// Nodes in evaluation order (sources and constants included).
    pub nodes: Vec<NodeProfile>,
    /// Sum of the node times (µs per inference).
    pub nodes_total_us: f64,
    /// Mean wall time of the whole `run_plan_with_eval` call (µs), so the gap to
    /// `nodes_total_us` is tract's own per-call overhead (inputs, state, outputs).
    pub call_us: f64,
    /// Profiled inferences.
    pub runs: usize,
}

/// The batch-1 optimised plan of `model`, as tract runs it for `Classifier::predict`.
pub fn batch1_plan(model: &OnnxModel) -> Result<std::sync::Arc<TypedRunnableModel>, BenchError> {
    let input_len = model.input_len();
    tract_onnx::onnx()
        .model_for_proto_model(model.proto())
        .and_then(|m| m.with_input_fact(0, f32::fact([1, input_len]).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(tract_err)
}

/// Profiles `runs` batch-1 inferences over the rows of `x` (after `runs / 10` warm-up calls).
pub fn profile(model: &OnnxModel, x: &[f32], runs: usize) -> Result<PlanProfile, BenchError> {
    let input_len = model.input_len();
    if input_len == 0 || x.len() < input_len {
        return Err(BenchError::Format(
            "profile needs at least one input row".into(),
        ));
    }
    let rows = x.len() / input_len;
    let plan = batch1_plan(model)?;
    let graph = plan.model();
    let mut acc = vec![0f64; graph.nodes.len()];
    let warmup = runs / 10;
    let mut call_total = 0f64;
    for i in 0..warmup + runs {
        let row = &x[(i % rows) * input_len..(i % rows + 1) * input_len];
        let input = Tensor::from_shape(&[1, input_len], row).map_err(tract_err)?;
        let timed = i >= warmup;
        let t_call = Instant::now();
        // A fresh state per call, as `SimplePlan::run` (and so `Classifier::predict`) does.
        let mut state = plan.spawn().map_err(tract_err)?;
        state
            .run_plan_with_eval(tvec!(input.into()), |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let out = eval(ctx, op_state, node, inputs);
                if timed {
                    acc[node.id] += t.elapsed().as_secs_f64() * 1e6;
                }
                out
            })
            .map_err(tract_err)?;
        if timed {
            call_total += t_call.elapsed().as_secs_f64() * 1e6;
        }
    }
    let per = runs.max(1) as f64;
    let nodes: Vec<NodeProfile> = plan
        .order_without_consts()
        .iter()
        .map(|&id| {
            let node = &graph.nodes[id];
            let info = node.op.info().unwrap_or_default();
            NodeProfile {
                name: node.name.clone(),
                op: node.op.name().to_string(),
                output: node
                    .outputs
                    .iter()
                    .map(|o| format!("{:?}", o.fact))
                    .collect::<Vec<_>>()
                    .join(" "),
                kernel: info
                    .iter()
                    .find(|l| l.starts_with("Mult:"))
                    .cloned()
                    .unwrap_or_default(),
                mean_us: acc[id] / per,
            }
        })
        .collect();
    Ok(PlanProfile {
        nodes_total_us: nodes.iter().map(|n| n.mean_us).sum(),
        nodes,
        call_us: call_total / per,
        runs,
    })
}

/// Whether the plan's matrix products take integer operands (`OptMatMul` over i8/u8).
pub fn uses_integer_matmul(p: &PlanProfile) -> bool {
    p.nodes
        .iter()
        .any(|n| n.op == "OptMatMul" && (n.kernel.contains("i32") || n.kernel.contains("I32")))
}

/// Markdown table of a profile (nodes with a measurable share first kept in plan order).
pub fn markdown(p: &PlanProfile) -> String {
    let mut s =
        String::from("| node | op | output | kernel | µs | share |\n|---|---|---|---|---:|---:|\n");
    for n in &p.nodes {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.0}% |\n",
            n.name,
            n.op,
            n.output,
            n.kernel.replace('|', "/"),
            n.mean_us,
            100.0 * n.mean_us / p.call_us.max(1e-9)
        ));
    }
    s.push_str(&format!(
        "| (per-call overhead outside nodes) | | | | {:.2} | {:.0}% |\n",
        (p.call_us - p.nodes_total_us).max(0.0),
        100.0 * (p.call_us - p.nodes_total_us).max(0.0) / p.call_us.max(1e-9)
    ));
    s
}
