//! The JSON record `bench-compress` writes (`hearth.json`) and `bench/ort_side.py` reads,
//! adds ONNX Runtime's rows to and turns into the combined table.

use crate::profile::PlanProfile;
use crate::timing::{BatchLatency, Latency};
use serde::{Deserialize, Serialize};

/// One model variant measured in tract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Row key: `fp32`, `hearth_int8`, `hearth_best`, `pruned50`.
    pub key: String,
    /// Human label for the table.
    pub label: String,
    /// File measured for size (relative to the work dir).
    pub file: String,
    /// Size of that file on disk (bytes).
    pub bytes: usize,
    /// Stored parameters (after structural changes).
    pub params: usize,
    /// Non-zero parameters.
    pub nonzeros: usize,
    /// Top-1 accuracy on the test split.
    pub accuracy: f32,
    /// Batch-1 latency of `Classifier::predict`, served by `engine`.
    pub latency: Latency,
    /// The engine serving batch-1 calls: `dense` (Hearth's dense engine) or `tract`.
    pub engine: String,
    /// Batch-1 latency through tract's plan (`Engine::Tract`), when `engine` is not tract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_tract: Option<Latency>,
    /// Per-sample latency at batch N in tract (`predict_batch`).
    pub latency_batch: BatchLatency,
    /// The model's declared batch dimension: a symbol (`N`) or a fixed size (`1`).
    pub batch_dim: String,
    /// How it was produced.
    pub recipe: String,
}

/// A variant that failed, and why (reported in the table instead of a number).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Missing {
    /// Row key.
    pub key: String,
    /// Human label.
    pub label: String,
    /// The error chain.
    pub error: String,
}

/// Everything measured for one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// `plaid`, `faces` or `digits`.
    pub task: String,
    /// Layer widths, e.g. `387-256-128-11`.
    pub layers: String,
    /// Train / test sizes.
    pub train_len: usize,
    /// Test split size.
    pub test_len: usize,
    /// fp32 ONNX file both engines start from (relative to the work dir).
    pub fp32_onnx: String,
    /// Test inputs `[n, input_len]` f32 `.npy`.
    pub test_x: String,
    /// Test labels `[n]` i64 `.npy`.
    pub test_y: String,
    /// Calibration inputs (the train split) `[n, input_len]` f32 `.npy`.
    pub calib_x: String,
    /// Measured variants, fp32 first.
    pub variants: Vec<Variant>,
    /// Variants that could not be produced: (row key, label, error).
    pub missing: Vec<Missing>,
    /// Per-node tract profile of the fp32 model.
    pub profile_fp32: Option<PlanProfile>,
    /// Per-node tract profile of Hearth's int8 model.
    pub profile_int8: Option<PlanProfile>,
    /// Whether tract's optimised int8 plan uses integer matrix kernels.
    pub int8_integer_kernels: Option<bool>,
}

/// The whole Hearth side of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HearthResults {
    /// tract version the binary links.
    pub tract: String,
    /// Build profile of the binary.
    pub profile: String,
    /// Threads tract used.
    pub threads: usize,
    /// Untimed calls before timing.
    pub warmup: usize,
    /// Timed calls per latency figure.
    pub runs: usize,
    /// Rows per call of the batched latency figures.
    pub batch: usize,
    /// Untimed batched calls before timing.
    pub batch_warmup: usize,
    /// Timed batched calls per figure.
    pub batch_runs: usize,
    /// Per-call floor: a Softmax-only `[1, 10]` model through `Classifier::predict`.
    pub floor: Latency,
    /// The same floor model at batch N (`predict_batch`), per sample.
    pub floor_batch: BatchLatency,
    /// Per-task results.
    pub tasks: Vec<TaskResult>,
}
