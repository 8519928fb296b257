//! On-device distillation (synchronous, CPU work: call off the async runtime): a larger
//! teacher MLP trained on the device's labelled data gives soft targets (logits) for the
//! unlabelled samples of the store ([`crate::samples`]); the small student is trained on the
//! labelled samples and the pseudo-labelled ones with the trainer's distillation objective
//! (`α · T² · KL(teacher_T ‖ student_T) + (1 − α) · CE`), so it learns from samples no
//! one labelled.
//!
//! The agent runs it when idle ([`idle_loop`], `[distill] enabled = true`): no event
//! published for `idle_secs`, no local training under way, at least `every_secs` since the
//! last run and at least `min_unlabelled` unlabelled samples in the store. One run is bounded
//! (the newest `max_unlabelled` samples, the configured epochs) and runs on the blocking pool,
//! never on the async runtime. A fixed fifth of the labelled samples is held back as a check
//! split: the distilled student replaces the model in use only when it is not worse there.
//! The distilled model is the device's own (personalisation between rounds): rounds still
//! train from the global version, and the next global version replaces it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_edge::stopped;
use hearth_model::train::forward_logits;
use hearth_model::{train, Dataset, DistillTarget, MlpSpec, ModelError, OnnxModel, TrainConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::Shared;
use crate::inference::Loaded;
use crate::stats::add;

/// `[distill]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Run idle distillation in the agent.
    pub enabled: bool,
    /// The agent is idle after this long without publishing an event (seconds).
    pub idle_secs: f64,
    /// At least this long between two runs (seconds).
    pub every_secs: f64,
    /// A run needs at least this many unlabelled samples in the store.
    pub min_unlabelled: usize,
    /// A run uses at most the newest this many unlabelled samples.
    pub max_unlabelled: usize,
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
            enabled: false,
            idle_secs: 60.0,
            every_secs: 600.0,
            min_unlabelled: 20,
            max_unlabelled: 1000,
            teacher_hidden: vec![256, 128],
            teacher_epochs: 60,
            epochs: 30,
            temperature: 4.0,
            alpha: 0.7,
        }
    }
}

impl DistillConfig {
    /// Checks the ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let secs = |v: f64| v.is_finite() && v > 0.0 && v <= 7.0 * 86_400.0;
        if !secs(self.idle_secs) {
            return Err("distill.idle_secs must be in (0, 1 week]".into());
        }
        if !secs(self.every_secs) {
            return Err("distill.every_secs must be in (0, 1 week]".into());
        }
        if self.min_unlabelled == 0 || self.max_unlabelled < self.min_unlabelled {
            return Err("distill: need 1 <= min_unlabelled <= max_unlabelled".into());
        }
        if self.max_unlabelled > 100_000 {
            return Err("distill.max_unlabelled must be at most 100000".into());
        }
        if self.teacher_hidden.is_empty() || self.teacher_hidden.iter().any(|&w| w == 0 || w > 4096)
        {
            return Err(
                "distill.teacher_hidden: 1 to 4096 units per layer, at least one layer".into(),
            );
        }
        if self.teacher_epochs == 0
            || self.epochs == 0
            || self.teacher_epochs > 1000
            || self.epochs > 1000
        {
            return Err("distill: teacher_epochs and epochs must be in 1..=1000".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err("distill.temperature must be > 0".into());
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err("distill.alpha must be in [0, 1]".into());
        }
        Ok(())
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

/// What one idle run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunReport {
    pub pseudo_labelled: usize,
    /// Check-split accuracy of the model in use before and of the distilled student.
    pub before: f32,
    pub after: f32,
    pub installed: bool,
}

/// Accuracy of `model` on `data` (training-path forward pass).
fn check_accuracy(model: &OnnxModel, data: &Dataset) -> Result<f32, ModelError> {
    let n = data.len();
    if n == 0 {
        return Ok(0.0);
    }
    let logits = forward_logits(model, &data.x, n)?;
    let k = logits.len() / n;
    let correct = (0..n)
        .filter(|&i| {
            let row = &logits[i * k..(i + 1) * k];
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(j, _)| j as u32);
            best == data.y[i]
        })
        .count();
    Ok(correct as f32 / n as f32)
}

/// One idle distillation of `current` (CPU and disk work): the labelled samples (the
/// device's share and the home's labels) split into fit and check (every fifth sample), a
/// teacher on fit, the student distilled on fit + the unlabelled samples; the student is
/// returned when it is not worse on the check split.
pub fn run_once(
    current: &OnnxModel,
    labelled: &Dataset,
    unlabelled: &[Vec<f32>],
    cfg: &DistillConfig,
    seed: u64,
) -> Result<(RunReport, Option<OnnxModel>), ModelError> {
    let (check_idx, fit_idx): (Vec<usize>, Vec<usize>) =
        (0..labelled.len()).partition(|i| i % 5 == 4);
    let (fit, check) = if check_idx.is_empty() {
        (labelled.clone(), labelled.clone())
    } else {
        (labelled.subset(&fit_idx), labelled.subset(&check_idx))
    };
    let teacher = train_teacher(current, &fit, cfg, seed)?;
    let d = distill_student(current, &teacher, &fit, unlabelled, cfg, seed ^ 0x5eed)?;
    let before = check_accuracy(current, &check)?;
    let after = check_accuracy(&d.student, &check)?;
    let installed = after >= before;
    Ok((
        RunReport {
            pseudo_labelled: d.pseudo_labelled,
            before,
            after,
            installed,
        },
        installed.then_some(d.student),
    ))
}

/// Runs idle distillation for the agent until `stop` (see the module docs).
pub(crate) async fn idle_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.distill.clone();
    let idle = Duration::from_secs_f64(cfg.idle_secs);
    let every = Duration::from_secs_f64(cfg.every_secs);
    let poll = Duration::from_millis(250).min(idle);
    let mut last_events = shared.stats.events_published.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    let mut last_run: Option<Instant> = None;
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(poll) => {}
        }
        let events = shared.stats.events_published.load(Ordering::Relaxed);
        if events != last_events {
            last_events = events;
            quiet_since = Instant::now();
            continue;
        }
        if quiet_since.elapsed() < idle || last_run.is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        let Some(store) = shared.samples.clone() else {
            tracing::warn!("idle distillation needs the sample store ([store] enabled): off");
            return;
        };
        // One CPU job at a time: a round's local training waits for this run and vice versa.
        let _busy = shared.cpu.lock().await;
        last_run = Some(Instant::now());
        round += 1;
        let s = shared.clone();
        let cfg = cfg.clone();
        let seed = round ^ shared.config.partition.seed.rotate_left(7);
        let t0 = Instant::now();
        type Job = Option<(RunReport, Option<Loaded>)>;
        let job = tokio::task::spawn_blocking(move || -> Result<Job, crate::Error> {
            let mut unlabelled: Vec<Vec<f32>> = store
                .all()?
                .into_iter()
                .filter(|x| x.label.is_none())
                .map(|x| x.input)
                .collect();
            if unlabelled.len() < cfg.min_unlabelled {
                return Ok(None);
            }
            let keep_from = unlabelled.len().saturating_sub(cfg.max_unlabelled);
            unlabelled.drain(..keep_from);
            let cur = s.slot.current();
            let labelled = s.training_data();
            let (report, student) = run_once(&cur.onnx, &labelled, &unlabelled, &cfg, seed)?;
            let Some(student) = student else {
                return Ok(Some((report, None)));
            };
            let mut l = Loaded::new(&cur.name, cur.version, cur.global, student)?;
            l.distilled = true;
            l.task = cur.task.clone();
            Ok(Some((report, Some(l))))
        })
        .await;
        let ms = t0.elapsed().as_millis() as u64;
        match job {
            Ok(Ok(None)) => tracing::debug!("idle: too few unlabelled samples to distil"),
            Ok(Ok(Some((r, l)))) => {
                add(&shared.stats.distill_runs, 1);
                add(&shared.stats.distill_millis, ms);
                add(
                    &shared.stats.distill_pseudo_labelled,
                    r.pseudo_labelled as u64,
                );
                tracing::info!(
                    pseudo_labelled = r.pseudo_labelled,
                    check_before = r.before,
                    check_after = r.after,
                    installed = r.installed,
                    millis = ms,
                    "idle distillation"
                );
                // A newer global version that arrived meanwhile wins.
                let cur = shared.slot.current();
                if let Some(l) = l.filter(|l| cur.version == l.version && cur.global == l.global) {
                    add(&shared.stats.distill_installed, 1);
                    shared.install(Arc::new(l));
                }
            }
            Ok(Err(e)) => tracing::warn!("idle distillation failed: {e}"),
            Err(e) => tracing::warn!("idle distillation task failed: {e}"),
        }
        quiet_since = Instant::now();
    }
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
