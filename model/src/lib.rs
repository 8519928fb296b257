//! Hearth models, the lean core every part uses: named tensors, ONNX build/read/write, tract
//! inference (with Hearth's dense engine, `hearth-dense`, for batch-1 calls), MLP training,
//! quantization primitives, the compact update codec, byte coding and the data sets.
//!
//! The compression toolkit (pruning, low-rank, codebooks, mixed precision, int8 export,
//! packages, measurement) is in `hearth-compress`; the agent and the coordinator do not
//! compile it.
//!
//! Synchronous library (no async runtime): callers run the CPU-heavy parts
//! (training, batch inference) on a blocking thread.
#![forbid(unsafe_code)]

pub mod bytes;
pub mod data;
pub mod dense;
pub mod dense_conv;
pub mod downlink;
pub mod error;
pub mod fedsim;
pub mod formats;
pub mod infer;
pub mod minirocket;
pub mod onnx;
pub mod quant;
pub mod task;
pub mod tensor;
#[cfg(feature = "tflite")]
pub mod tflite;
pub mod train;
pub mod update;

pub use data::{Dataset, Split, Task};
pub use error::ModelError;
pub use hearth_dense::DenseNet;
pub use infer::{accuracy, Classifier, Engine};
pub use onnx::{MlpSpec, OnnxModel};
pub use quant::{
    dequantize, quantize_affine, quantize_stochastic, quantize_symmetric, QuantParams,
};
pub use task::{TaskError, TaskSpec};
pub use tensor::{axpy, l2_norm, num_params, sub, Tensor, Weights};
pub use train::{train, DistillTarget, FakeQuant, TrainConfig, TrainReport};
pub use update::{clip_l2, decode_update, decode_update_for, encode_update, CodecConfig};
