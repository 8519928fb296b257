//! On-device distillation (synchronous, CPU work: call off the async runtime): a larger
//! teacher MLP trained on the device's labelled data gives soft targets (logits) for the
//! unlabelled samples of the store ([`crate::samples`]); the small student is trained on the
//! labelled samples and the pseudo-labelled ones with the trainer's distillation objective
//! (`α · T² · KL(teacher_T ‖ student_T) + (1 − α) · CE`), so it learns from samples no
//! one labelled. Not yet run by the agent on its own (see ARCHITECTURE.md): the functions
//! here and their measured gain (`distill::tests`) are the building block.

use hearth_model::train::forward_logits;
use hearth_model::{train, Dataset, DistillTarget, MlpSpec, ModelError, OnnxModel, TrainConfig};
use serde::{Deserialize, Serialize};

/// `[distill]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Hidden widths of the teacher.
    pub teacher_hidden: Vec<usize>,
    /// Epochs of teacher training.
    pub teacher_epochs: u32,
    /// Epochs of student training.
    pub epochs: u32,
    /// Softmax temperature T of the KL term.
    pub temperature: f32,
    /// Weight α of the KL term (1 − α on the labels).
    pub alpha: f32,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            teacher_hidden: vec![256, 128],
            teacher_epochs: 60,
            epochs: 30,
            temperature: 4.0,
            alpha: 0.7,
        }
    }
}

/// Trains a teacher of `teacher_hidden` widths for the task of `student` on `labelled`.
pub fn train_teacher(
    student: &OnnxModel,
    labelled: &Dataset,
    cfg: &DistillConfig,
    seed: u64,
) -> Result<OnnxModel, ModelError> {
    let spec = MlpSpec {
        task: student.task().unwrap_or(&labelled.task).to_string(),
        input_len: labelled.input_len,
        hidden: cfg.teacher_hidden.clone(),
        classes: labelled.classes.clone(),
    };
    let mut teacher = OnnxModel::build_mlp(&spec, seed);
    let tc = TrainConfig {
        epochs: cfg.teacher_epochs,
        seed,
        ..TrainConfig::default()
    };
    let (w, _) = train(&teacher, labelled, &tc)?;
    teacher.set_weights(&w)?;
    Ok(teacher)
}

/// The student after distillation, and how many samples the teacher labelled.
#[derive(Debug)]
pub struct Distilled {
    /// The trained student (same graph as the input student).
    pub student: OnnxModel,
    /// Unlabelled samples that received the teacher's soft targets.
    pub pseudo_labelled: usize,
}

/// Trains `student` (from its current weights) on `labelled` plus `unlabelled` (inputs of the
/// task's length), every sample with the teacher's logits as soft targets; the unlabelled
/// ones take the teacher's argmax as their hard label.
pub fn distill_student(
    student: &OnnxModel,
    teacher: &OnnxModel,
    labelled: &Dataset,
    unlabelled: &[Vec<f32>],
    cfg: &DistillConfig,
    seed: u64,
) -> Result<Distilled, ModelError> {
    let mut data = labelled.clone();
    let mut pseudo = 0;
    for x in unlabelled.iter().filter(|x| x.len() == data.input_len) {
        data.x.extend_from_slice(x);
        data.y.push(0); // replaced below by the teacher's argmax
        pseudo += 1;
    }
    let n = data.len();
    let logits = forward_logits(teacher, &data.x, n)?;
    let k = data.classes.len();
    for i in labelled.len()..n {
        let row = &logits[i * k..(i + 1) * k];
        data.y[i] = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(j, _)| j as u32);
    }
    let tc = TrainConfig {
        epochs: cfg.epochs,
        seed,
        distill: Some(DistillTarget {
            teacher_logits: logits,
            alpha: cfg.alpha,
            temperature: cfg.temperature,
        }),
        ..TrainConfig::default()
    };
    let (w, _) = train(student, &data, &tc)?;
    let mut out = student.clone();
    out.set_weights(&w)?;
    Ok(Distilled {
        student: out,
        pseudo_labelled: pseudo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_model::{accuracy, Classifier, Split, TaskSpec};

    /// Held-out gain of distillation on PLAID: the device labelled a small share (one of
    /// eight non-IID partitions of the train split); the rest of the train split is what it
    /// sensed without labels. Student = the task file's MLP trained on the labelled share;
    /// teacher = a [256, 128] MLP on the same share; distilled student = the student trained
    /// further on labelled + teacher-labelled samples (KL, T = 4, α = 0.7).
    #[test]
    fn distillation_changes_the_student_and_the_gain_is_measured() {
        let data = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data"));
        let task = TaskSpec::resolve("plaid", &data).unwrap();
        let train_set = task.load(Split::Train).unwrap();
        let test = task.load(Split::Test).unwrap();
        let labelled = train_set.partition(0, 8, 1.0, 9);
        let owners: std::collections::HashSet<Vec<u32>> = (0..labelled.len())
            .map(|i| labelled.sample(i).iter().map(|v| v.to_bits()).collect())
            .collect();
        let unlabelled: Vec<Vec<f32>> = (0..train_set.len())
            .map(|i| train_set.sample(i).to_vec())
            .filter(|x| !owners.contains(&x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()))
            .collect();
        let mut student = OnnxModel::build_mlp(&task.mlp_spec(), 5);
        let (w, _) = train(
            &student,
            &labelled,
            &TrainConfig {
                epochs: 30,
                seed: 5,
                ..TrainConfig::default()
            },
        )
        .unwrap();
        student.set_weights(&w).unwrap();
        let cfg = DistillConfig::default();
        let teacher = train_teacher(&student, &labelled, &cfg, 6).unwrap();
        let d = distill_student(&student, &teacher, &labelled, &unlabelled, &cfg, 7).unwrap();
        let acc = |m: &OnnxModel| accuracy(&Classifier::new(m).unwrap(), &test).unwrap();
        let (before, t, after) = (acc(&student), acc(&teacher), acc(&d.student));
        eprintln!(
            "PLAID distillation: {} labelled, {} pseudo-labelled; held-out student {before:.3}, \
             teacher {t:.3}, distilled student {after:.3} (gain {:+.3})",
            labelled.len(),
            d.pseudo_labelled,
            after - before
        );
        assert_eq!(d.pseudo_labelled, unlabelled.len());
        assert!(d.pseudo_labelled > 3 * labelled.len());
        assert_ne!(
            d.student.weights(),
            student.weights(),
            "the student changed"
        );
        assert!(
            after > before,
            "distillation did not help: {before} -> {after}"
        );
    }
}
