//! Knowledge distillation: a small student learns from a bigger teacher's softened outputs
//! as well as from the labels, with loss `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) +
//! (1−α)·CE(s, y)` (Hinton, Vinyals & Dean 2015). The teacher's logits are computed once for
//! the whole training set (they do not change), then the trainer ([`crate::train`]) runs
//! with [`TrainConfig::distill`] set.

use hearth_model::data::Dataset;
use hearth_model::error::ModelError;
use hearth_model::infer::Classifier;
use hearth_model::onnx::OnnxModel;
use hearth_model::train::{forward_logits, train, DistillTarget, TrainConfig, TrainReport};

/// The teacher's logits on every sample of `data` (`n × classes`, data order). Sequential
/// Gemm/Relu teachers run through the trainer's forward pass (exact logits); any other ONNX
/// classifier runs in tract and its log-probabilities are used, which differ from the logits
/// by a per-sample constant and so give the same softmax at every temperature.
pub fn teacher_logits(teacher: &OnnxModel, data: &Dataset) -> Result<Vec<f32>, ModelError> {
    if teacher.input_len() != data.input_len {
        return Err(ModelError::Shape(format!(
            "teacher expects {} inputs, data has {}",
            teacher.input_len(),
            data.input_len
        )));
    }
    if teacher.dense_layers().is_ok() {
        return forward_logits(teacher, &data.x, data.len());
    }
    let c = Classifier::new(teacher)?;
    let mut out = Vec::with_capacity(data.len() * c.classes().len());
    const CHUNK: usize = 256;
    let mut start = 0;
    while start < data.len() {
        let end = (start + CHUNK).min(data.len());
        let p = c.predict_batch(
            &data.x[start * data.input_len..end * data.input_len],
            end - start,
        )?;
        out.extend(p.iter().map(|v| v.max(1e-30).ln()));
        start = end;
    }
    Ok(out)
}

/// Trains `student` on `data` from `teacher` (soft targets at temperature `temperature`,
/// weight `alpha`) and the labels (weight `1 − alpha`), with the other hyper-parameters of
/// `cfg` (its `distill` field is replaced). Teacher and student must have the same inputs
/// and classes. Returns the trained student.
pub fn distill(
    student: &OnnxModel,
    teacher: &OnnxModel,
    data: &Dataset,
    alpha: f32,
    temperature: f32,
    cfg: &TrainConfig,
) -> Result<(OnnxModel, TrainReport), ModelError> {
    let s_classes = student.dense_layers()?.last().map_or(0, |l| l.outputs);
    let logits = teacher_logits(teacher, data)?;
    if logits.len() != data.len() * s_classes {
        return Err(ModelError::Shape(format!(
            "teacher gives {} logits for {} samples, student has {s_classes} classes",
            logits.len(),
            data.len()
        )));
    }
    let cfg = TrainConfig {
        distill: Some(DistillTarget {
            teacher_logits: logits,
            alpha,
            temperature,
        }),
        ..cfg.clone()
    };
    let (w, report) = train(student, data, &cfg)?;
    let mut out = student.clone();
    out.set_weights(&w)?;
    Ok((out, report))
}
