//! Hearth models: tensors, ONNX build/read/write, tract inference, MLP training,
//! quantization, the compact update codec and the data sets.
//!
//! Synchronous library (no async runtime): callers run the CPU-heavy parts
//! (training, batch inference) on a blocking thread.
#![forbid(unsafe_code)]

pub mod codebook;
pub mod data;
pub mod dense;
pub mod distill;
pub mod error;
pub mod infer;
pub mod lowrank;
pub mod measure;
pub mod mixed;
pub mod onnx;
pub mod package;
pub mod prune;
pub mod qconv;
pub mod qonnx;
pub mod quant;
pub mod tensor;
pub mod train;
pub mod update;

pub use codebook::{fit_codebook, gaussian_quantile_levels, kmeans_levels, CodebookKind};
pub use data::{Dataset, Split, Task};
pub use dense::DenseNet;
pub use distill::{distill, teacher_logits};
pub use error::ModelError;
pub use infer::{accuracy, Classifier, Engine};
pub use lowrank::{low_rank, rank_for_energy, svd};
pub use measure::{
    fix_constant_of_shape, load_for_tract, measure, measure_with, Agreement, GenericRunner,
    MeasureOptions, Measurement, OutputTransform,
};
pub use mixed::{
    auto_mixed_precision, layer_sensitivity, qat_finetune, uniform_plan, Budget, LayerChoice,
    LayerSensitivity, MixedPlan,
};
pub use onnx::{MlpSpec, OnnxModel};
pub use package::{decode_package, encode_package, Schemes};
pub use prune::{
    apply_masks, gemm_weight_names, iterative_prune, magnitude_masks, prune_layers, prune_neurons,
    sensitivity_masks, sparsity,
};
pub use qonnx::{export_int8, export_int8_with, plan_uses_integer_kernels, Int8Options};
pub use quant::{
    dequantize, fake_quantize, quantize_affine, quantize_stochastic, quantize_symmetric,
    quantize_tensor, scheme_bits, scheme_bytes, Granularity, QuantParams, QuantScheme,
    QuantizedTensor,
};
pub use tensor::{axpy, l2_norm, num_params, sub, Tensor, Weights};
pub use train::{train, DistillTarget, FakeQuant, TrainConfig, TrainReport};
pub use update::{clip_l2, decode_update, encode_update, CodecConfig};
