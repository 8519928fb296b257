//! Hearth models: tensors, ONNX build/read/write, tract inference, MLP training,
//! quantization, the compact update codec and the data sets.
//!
//! Synchronous library (no async runtime): callers run the CPU-heavy parts
//! (training, batch inference) on a blocking thread.
#![forbid(unsafe_code)]

pub mod codebook;
pub mod data;
pub mod distill;
pub mod error;
pub mod infer;
pub mod lowrank;
pub mod measure;
pub mod mixed;
pub mod onnx;
pub mod package;
pub mod prune;
pub mod qonnx;
pub mod quant;
pub mod tensor;
pub mod train;
pub mod update;

pub use data::{Dataset, Split, Task};
pub use error::ModelError;
pub use infer::{accuracy, Classifier};
pub use onnx::{MlpSpec, OnnxModel};
pub use quant::{
    dequantize, quantize_affine, quantize_stochastic, quantize_symmetric, QuantParams,
};
pub use tensor::{axpy, l2_norm, num_params, sub, Tensor, Weights};
pub use train::{train, TrainConfig, TrainReport};
pub use update::{clip_l2, decode_update, encode_update, CodecConfig};
