//! Poisoning end to end over real gRPC on 127.0.0.1: eight clients train the digits MLP on
//! their own non-IID partitions with the real trainer for several rounds; one of them is
//! malicious — it trains too, then sends its delta sign-flipped and scaled (×20 or more, kept
//! just under the hard `max_update_norm` so it is not simply refused) and claims 10⁶ samples.
//! With the coordinator's defaults the final held-out accuracy stays within 2 points of the
//! clean run; with plain FedAvg and the defences off it collapses. Deterministic seeds.

mod common;

use std::time::Instant;

use common::*;
use hearth_coordinator::{start, Aggregation, Combine, Config, ModelConfig};
use hearth_model::{
    accuracy, clip_l2, encode_update, l2_norm, sub, train, Classifier, CodecConfig, Dataset,
    OnnxModel, Split, TaskSpec, TrainConfig, Weights,
};
use hearth_proto::v1::RoundState;
use rand::SeedableRng;

const MODEL: &str = "digits";
const CLIENTS: usize = 8;
const ROUNDS: u64 = 8;
/// Index of the malicious client (its share is the smallest: 102 of 1437 samples).
const ATTACKER: usize = 6;
/// What the attacker claims.
const LIE: u64 = 1_000_000;
/// Dirichlet concentration of the label skew across clients.
const ALPHA: f32 = 1.0;

fn tokens() -> Vec<String> {
    (0..CLIENTS).map(|i| format!("poison-token-{i}")).collect()
}

fn config(db: &std::path::Path, aggregation: Aggregation) -> Config {
    let mut c = Config {
        db_path: db.to_path_buf(),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: tokens(),
        aggregation,
        models: vec![ModelConfig {
            name: MODEL.into(),
            task: "digits".into(),
            init: None,
            eval: false,
            seed: 3,
        }],
        ..Config::default()
    };
    c.round.local_epochs = 2;
    c.round.learning_rate = 0.05;
    c.round.batch_size = 16;
    c
}

/// Plain FedAvg with every defence added here turned off (the hard bound and the fixed
/// `max_client_samples` stay at their defaults).
fn plain() -> Aggregation {
    Aggregation {
        combine: Combine::Mean,
        norm_bound_factor: 0.0,
        sample_cap_factor: 0.0,
        ..Aggregation::default()
    }
}

struct Run {
    accuracy: f32,
    details: Vec<String>,
    attack_scales: Vec<f32>,
}

/// What the malicious client does with its honestly trained delta.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Nothing: every client is honest.
    None,
    /// Sign-flipped and scaled by this factor.
    Scaled(f32),
    /// Sign-flipped and scaled so its norm sits at 90 % of the hard bound (the strongest
    /// update the hard bound lets through).
    UnderBound,
}

/// One client's work in a round, as the agent does it: train on its share, delta, clip to the
/// round's bound, encode (8 bits, dense). An attacker flips and scales the clipped delta and
/// encodes that instead; returns the payload and the scale.
fn local_update(
    global: &OnnxModel,
    data: &Dataset,
    cfg: &Config,
    seed: u64,
    attack: Attack,
) -> (Vec<u8>, f32) {
    let r = &cfg.round;
    let tc = TrainConfig {
        epochs: r.local_epochs,
        learning_rate: r.learning_rate,
        batch_size: r.batch_size as usize,
        seed,
        ..TrainConfig::default()
    };
    let g = global.weights();
    let (local, _) = train(global, data, &tc).unwrap();
    let mut delta = sub(&local, &g).unwrap();
    let norm = clip_l2(&mut delta, r.clip_norm);
    let scale = match attack {
        Attack::None => 1.0,
        Attack::Scaled(s) => s,
        Attack::UnderBound => 0.9 * cfg.max_update_norm / norm,
    };
    if attack != Attack::None {
        delta = map_weights(&delta, |_, _, v| -scale * v);
        assert!(
            l2_norm(&delta) < cfg.max_update_norm,
            "the attack stays under the hard bound"
        );
    }
    let mut residual = Weights::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    // 8-bit dense, as when the figures in ARCHITECTURE.md were measured (the round default
    // is now sparse; this test is about aggregation, not the codec).
    let codec = CodecConfig {
        bits: 8,
        topk_fraction: 1.0,
        entropy: true,
        compact: false,
    };
    (
        encode_update(&delta, &mut residual, &codec, &mut rng).unwrap(),
        scale,
    )
}

/// `ROUNDS` rounds of all `CLIENTS` under `cfg`; the final model's held-out accuracy.
async fn run(cfg: Config, attack: Attack, parts: &[Dataset], test: &Dataset) -> Run {
    let server = start(cfg.clone(), listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let mut clients = Vec::new();
    for (i, t) in tokens().iter().enumerate() {
        clients.push(tls.enroll(t, &format!("dev-{i}")).await.unwrap());
    }
    let mut details = Vec::new();
    let mut attack_scales = Vec::new();
    for round in 0..ROUNDS {
        let base = round + 1;
        let r = start_round(&ch, MODEL, CLIENTS as u32, CLIENTS as u32, 300).await;
        assert_eq!(r.base_version, base);
        for (i, c) in clients.iter().enumerate() {
            let (bytes, _, _, _) = fetch(&ch, c, MODEL, base, 0).await.unwrap();
            let global = OnnxModel::from_bytes(&bytes).unwrap();
            let bad = attack != Attack::None && i == ATTACKER;
            let mine = if bad { attack } else { Attack::None };
            let (data, cfg) = (parts[i].clone(), cfg.clone());
            let seed = 1000 * round + i as u64;
            let (payload, scale) =
                tokio::task::spawn_blocking(move || local_update(&global, &data, &cfg, seed, mine))
                    .await
                    .unwrap();
            let samples = if bad { LIE } else { parts[i].len() as u64 };
            let ack = upload(&ch, c, MODEL, r.round_id, base, samples, &payload)
                .await
                .unwrap();
            assert!(ack.accepted, "round {round} client {i}: {ack:?}");
            if bad {
                attack_scales.push(scale);
            }
        }
        let s = wait_state(&ch, MODEL, r.round_id, RoundState::Completed).await;
        details.push(s.detail);
    }
    let (bytes, _, _, _) = fetch(&ch, &clients[0], MODEL, ROUNDS + 1, 0).await.unwrap();
    server.shutdown().await.unwrap();
    let model = OnnxModel::from_bytes(&bytes).unwrap();
    let test = test.clone();
    let accuracy = tokio::task::spawn_blocking(move || {
        accuracy(&Classifier::new(&model).unwrap(), &test).unwrap()
    })
    .await
    .unwrap();
    Run {
        accuracy,
        details,
        attack_scales,
    }
}

/// ×50: within the ×20–100 a scaling attack uses.
const SCALE: f32 = 50.0;
/// The hard bound of the runs with the ×50 attacker: honest norms here are 1–5, so under the
/// default 50 a ×50 update would simply be refused; raised in every run (clean ones too) so the
/// attack lands and only the defences under test stand in its way.
const LIFTED_HARD_BOUND: f32 = 1000.0;

fn lifted(mut c: Config) -> Config {
    c.max_update_norm = LIFTED_HARD_BOUND;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_hold_accuracy_under_a_poisoned_client_that_wrecks_plain_fedavg() {
    let t0 = Instant::now();
    let spec = TaskSpec::resolve("digits", &data_dir()).unwrap();
    let full = spec.load(Split::Train).unwrap();
    let test = spec.load(Split::Test).unwrap();
    let parts: Vec<Dataset> = (0..CLIENTS)
        .map(|i| full.partition(i, CLIENTS, ALPHA, 5))
        .collect();
    let sizes: Vec<usize> = parts.iter().map(Dataset::len).collect();
    let dir = tempfile::tempdir().unwrap();
    let db = |n: &str| dir.path().join(n);
    let defaults = Aggregation::default;

    let clean = run(
        lifted(config(&db("clean"), defaults())),
        Attack::None,
        &parts,
        &test,
    )
    .await;
    let defended = run(
        lifted(config(&db("defended"), defaults())),
        Attack::Scaled(SCALE),
        &parts,
        &test,
    )
    .await;
    assert_eq!(defended.attack_scales, vec![SCALE; ROUNDS as usize]);
    let clean_plain = run(
        lifted(config(&db("clean-plain"), plain())),
        Attack::None,
        &parts,
        &test,
    )
    .await;
    let wrecked = run(
        lifted(config(&db("plain"), plain())),
        Attack::Scaled(SCALE),
        &parts,
        &test,
    )
    .await;
    // Every default, hard bound included, against the strongest update it lets through.
    let under = run(
        config(&db("under"), defaults()),
        Attack::UnderBound,
        &parts,
        &test,
    )
    .await;
    eprintln!(
        "partition sizes {sizes:?}\n\
         clean (defaults) {:.4}, attacked ×{SCALE} (defaults) {:.4}, \
         attacked under the hard bound (all defaults, scales {:.1?}) {:.4}, \
         clean (plain FedAvg) {:.4}, attacked ×{SCALE} (plain FedAvg, defences off) {:.4}; {:.1} s\n\
         defaults, last attacked round: {}\nplain, last attacked round: {}",
        clean.accuracy,
        defended.accuracy,
        under.attack_scales,
        under.accuracy,
        clean_plain.accuracy,
        wrecked.accuracy,
        t0.elapsed().as_secs_f64(),
        defended.details.last().unwrap(),
        wrecked.details.last().unwrap(),
    );

    assert!(
        clean.accuracy > 0.85,
        "the clean run learns: {}",
        clean.accuracy
    );
    assert!(
        (clean_plain.accuracy - clean.accuracy).abs() <= 0.02,
        "the defaults cost a clean run at most 2 points: {} vs plain {}",
        clean.accuracy,
        clean_plain.accuracy
    );
    for (what, r) in [("×50", &defended), ("under the hard bound", &under)] {
        assert!(
            r.accuracy >= clean.accuracy - 0.02 && r.accuracy >= clean_plain.accuracy - 0.02,
            "defaults under the {what} attack: {} vs clean {} / clean plain {}",
            r.accuracy,
            clean.accuracy,
            clean_plain.accuracy
        );
        assert!(
            r.details.iter().all(|d| d.contains("multi-Krum (f = 1")),
            "{:?}",
            r.details
        );
    }
    assert!(
        wrecked.accuracy < clean.accuracy - 0.3,
        "plain FedAvg visibly degrades: {} vs clean {}",
        wrecked.accuracy,
        clean.accuracy
    );
}
