//! Training and inference on the vendored data sets (`data/`, see data/README.md).

use hearth_model::train::forward_probs;
use hearth_model::{accuracy, train, Classifier, Dataset, OnnxModel, Split, Task, TrainConfig};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

fn load(task: Task) -> (Dataset, Dataset) {
    (
        task.load(&data_dir(), Split::Train).unwrap(),
        task.load(&data_dir(), Split::Test).unwrap(),
    )
}

/// Trains the default MLP with the default config; returns the trained model and test accuracy.
fn train_default(task: Task) -> (OnnxModel, Dataset, f32) {
    let (tr, te) = load(task);
    let model = OnnxModel::build_mlp(&task.default_spec(), 0);
    let before = accuracy(&Classifier::new(&model).unwrap(), &te).unwrap();
    let (w, report) = train(&model, &tr, &TrainConfig::default()).unwrap();
    assert_eq!(report.samples, tr.len());
    assert!(report.final_loss.is_finite());
    let mut trained = model;
    trained.set_weights(&w).unwrap();
    let acc = accuracy(&Classifier::new(&trained).unwrap(), &te).unwrap();
    eprintln!(
        "{task}: test accuracy {before:.3} untrained -> {acc:.3} trained, final loss {:.4}",
        report.final_loss
    );
    (trained, te, acc)
}

#[test]
fn data_sets_load_as_specified() {
    for (task, n_train, n_test) in [
        (Task::Plaid, 537, 537),
        (Task::Faces, 150, 50),
        (Task::Digits, 1437, 360),
    ] {
        let (tr, te) = load(task);
        assert_eq!((tr.len(), te.len()), (n_train, n_test), "{task}");
        assert_eq!(tr.classes, task.default_spec().classes);
        assert_eq!(tr.input_len, task.default_spec().input_len);
        assert_eq!(tr.x.len(), tr.len() * tr.input_len);
        assert!(tr.x.iter().all(|v| v.is_finite()));
        // Every class occurs in the train split.
        for c in 0..tr.classes.len() as u32 {
            assert!(tr.y.contains(&c), "{task}: class {c} missing");
        }
        if task != Task::Plaid {
            assert!(tr.x.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }
}

// Chance is 1/11 (0.09) and the majority class 88/537 (0.16); this recipe measures 0.635 with
// the default config (the study in data/README.md gets 0.62–0.67 with scikit-learn's Adam MLP).
#[test]
fn plaid_training_beats_chance_by_far() {
    let (_, _, acc) = train_default(Task::Plaid);
    assert!(acc > 0.5, "PLAID test accuracy {acc}");
}

// Measured 0.98 (49/50); balanced classes, chance 0.5.
#[test]
fn faces_training_works() {
    let (_, _, acc) = train_default(Task::Faces);
    assert!(acc > 0.85, "faces test accuracy {acc}");
}

// Measured 0.956; chance 0.1 (1-NN gets about 0.965 on this set).
#[test]
fn digits_training_works() {
    let (_, _, acc) = train_default(Task::Digits);
    assert!(acc > 0.9, "digits test accuracy {acc}");
}

#[test]
fn onnx_round_trip_and_tract_matches_the_trainer() {
    let (model, te, _) = train_default(Task::Digits);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits.onnx");
    model.save(&path).unwrap();
    let loaded = OnnxModel::load(&path).unwrap();
    assert_eq!(loaded.weights(), model.weights());
    assert_eq!(loaded.classes(), Task::Digits.default_spec().classes);
    assert_eq!(loaded.task(), Some("digits"));

    let a = Classifier::new(&model).unwrap();
    let b = Classifier::new(&loaded).unwrap();
    let pa = a.predict_batch(&te.x, te.len()).unwrap();
    let pb = b.predict_batch(&te.x, te.len()).unwrap();
    assert_eq!(pa, pb);
    // tract (batch and single plans) against the trainer's own forward pass.
    let reference = forward_probs(&model, &te.x, te.len()).unwrap();
    let k = a.classes().len();
    let max_diff = pa
        .iter()
        .zip(&reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "tract vs trainer: {max_diff}");
    for i in (0..te.len()).step_by(37) {
        let single = a.predict(te.sample(i)).unwrap();
        for (x, y) in single.iter().zip(&reference[i * k..(i + 1) * k]) {
            assert!((x - y).abs() < 1e-4);
        }
    }
}

#[test]
fn plaid_tract_matches_the_trainer() {
    let (model, te, _) = train_default(Task::Plaid);
    let c = Classifier::new(&model).unwrap();
    let p = c.predict_batch(&te.x, te.len()).unwrap();
    let reference = forward_probs(&model, &te.x, te.len()).unwrap();
    let max_diff = p
        .iter()
        .zip(&reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "tract vs trainer: {max_diff}");
}

#[test]
fn real_partitions_cover_the_train_split() {
    let (tr, _) = load(Task::Digits);
    let count = 8;
    let parts: Vec<Dataset> = (0..count)
        .map(|k| tr.partition(k, count, 0.3, 11))
        .collect();
    assert!(parts.iter().all(|p| !p.is_empty()));
    assert_eq!(parts.iter().map(Dataset::len).sum::<usize>(), tr.len());
    // Same multiset of (sample, label) rows as the original.
    let mut all: Vec<(Vec<u32>, u32)> = parts
        .iter()
        .flat_map(|p| {
            (0..p.len()).map(move |i| (p.sample(i).iter().map(|v| v.to_bits()).collect(), p.y[i]))
        })
        .collect();
    let mut orig: Vec<(Vec<u32>, u32)> = (0..tr.len())
        .map(|i| (tr.sample(i).iter().map(|v| v.to_bits()).collect(), tr.y[i]))
        .collect();
    all.sort();
    orig.sort();
    assert_eq!(all, orig);
}
