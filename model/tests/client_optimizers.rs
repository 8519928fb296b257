//! The client optimizers a federated round task can ask for, on a real task (digits, one
//! non-IID share): plain SGD and momentum take different paths, and FedProx's proximal term
//! keeps the local model measurably closer to the global model it started from.

use hearth_model::{l2_norm, sub, train, Dataset, OnnxModel, Split, Task, TrainConfig};

fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

fn share() -> (OnnxModel, Dataset) {
    let task = Task::Digits;
    let all = task.load(&data_dir(), Split::Train).unwrap();
    // A skewed share, as an agent holds one.
    let ds = all.partition(0, 4, 0.3, 7);
    (OnnxModel::build_mlp(&task.default_spec(), 3), ds)
}

/// ‖trained − start‖ after `cfg`.
fn drift(model: &OnnxModel, ds: &Dataset, cfg: &TrainConfig) -> f32 {
    let (w, _) = train(model, ds, cfg).unwrap();
    l2_norm(&sub(&w, &model.weights()).unwrap())
}

#[test]
fn fedprox_pulls_the_local_model_toward_the_global_one() {
    let (model, ds) = share();
    let base = TrainConfig {
        epochs: 5,
        learning_rate: 0.05,
        batch_size: 32,
        momentum: 0.0,
        seed: 1,
        ..TrainConfig::default()
    };
    let free = drift(&model, &ds, &base);
    let prox = drift(
        &model,
        &ds,
        &TrainConfig {
            proximal_mu: 1.0,
            ..base.clone()
        },
    );
    let strong = drift(
        &model,
        &ds,
        &TrainConfig {
            proximal_mu: 10.0,
            ..base.clone()
        },
    );
    eprintln!("distance to the global model: mu 0 {free:.3}, mu 1 {prox:.3}, mu 10 {strong:.3}");
    assert!(prox < 0.85 * free, "mu = 1: {prox} vs {free}");
    assert!(strong < 0.5 * prox, "mu = 10: {strong} vs {prox}");
    assert!(strong > 0.0, "it still learns");
}

#[test]
fn plain_sgd_and_momentum_differ() {
    let (model, ds) = share();
    let sgd = TrainConfig {
        epochs: 2,
        learning_rate: 0.05,
        batch_size: 32,
        momentum: 0.0,
        seed: 1,
        ..TrainConfig::default()
    };
    let momentum = TrainConfig {
        momentum: 0.9,
        ..sgd.clone()
    };
    let (a, _) = train(&model, &ds, &sgd).unwrap();
    let (b, _) = train(&model, &ds, &momentum).unwrap();
    let gap = l2_norm(&sub(&a, &b).unwrap());
    let (da, db) = (drift(&model, &ds, &sgd), drift(&model, &ds, &momentum));
    eprintln!("sgd moved {da:.3}, momentum {db:.3}, apart {gap:.3}");
    assert!(gap > 0.1 * da, "the two optimizers ended {gap} apart");
    // Momentum's effective step is about 1/(1-μ) larger.
    assert!(db > 1.5 * da, "momentum {db} vs sgd {da}");
}
