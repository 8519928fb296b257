//! Hearth's benchmark helpers: batch-1 and batched latency of a tract plan, per-node tract profiles,
//! `.npy` files shared with the Python (ONNX Runtime) side, and the result records that
//! `bench/compress` merges into one table; `hubload`, the hub benchmark's load generator and receiver.
#![forbid(unsafe_code)]

pub mod hubload;
pub mod npy;
pub mod profile;
pub mod report;
pub mod timing;

/// Errors of the benchmark helpers.
#[derive(thiserror::Error, Debug)]
pub enum BenchError {
    /// File system.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A Hearth model operation failed.
    #[error("model: {0}")]
    Model(#[from] hearth_model::ModelError),
    /// tract failed to load, optimise or run a plan.
    #[error("tract: {0}")]
    Tract(String),
    /// Malformed input (shapes, npy headers).
    #[error("format: {0}")]
    Format(String),
}
