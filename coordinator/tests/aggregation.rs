//! Server optimizers and robust aggregation over real gRPC on 127.0.0.1: one poisoned client
//! (a sign-flipped, ×20 update claiming a huge sample count) among four honest ones wrecks
//! FedAvg's published model, while the median, the trimmed mean and Krum keep it close to the
//! honest average; server-side clipping and the sample cap shrink the attacker's pull exactly
//! as computed here; FedAvgM and FedAdam state (and a robust round's kept updates) survive a
//! restart of the coordinator on the same database.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use hearth_coordinator::{
    start, Aggregation, Combine, Config, Downlink, ModelConfig, ServerOptimizer,
};
use hearth_model::{decode_update, OnnxModel, Weights};
use hearth_proto::v1::RoundState;
use tonic::transport::Channel;

const TOKENS: [&str; 5] = [
    "agg-token-1",
    "agg-token-2",
    "agg-token-3",
    "agg-token-4",
    "agg-token-5",
];
/// Samples each honest client reports.
const HONEST_SAMPLES: u64 = 10;
/// What the attacker claims.
const CLAIMED_SAMPLES: u64 = 1_000_000_000;
/// `max_client_samples` of the test coordinator.
const SAMPLE_CAP: u64 = 50;
/// Server-side clip bound of the `clipped` model.
const CLIP: f32 = 1.0;

fn model(name: &str) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        task: "digits".into(),
        init: None,
        eval: false,
        seed: 7,
    }
}

fn config(db: &Path, aggregation: &[(&str, Aggregation)]) -> Config {
    let mut c = Config {
        db_path: db.to_path_buf(),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: TOKENS.iter().map(|t| t.to_string()).collect(),
        max_client_samples: SAMPLE_CAP,
        models: aggregation.iter().map(|(n, _)| model(n)).collect(),
        model_aggregation: aggregation
            .iter()
            .map(|(n, a)| (n.to_string(), a.clone()))
            .collect::<BTreeMap<_, _>>(),
        // The exact aggregate is published (the compressed downlink, which publishes its
        // 8-bit reconstruction, has tests/downlink.rs).
        downlink: Downlink {
            bits: 0,
            ..Downlink::default()
        },
        ..Config::default()
    };
    // Krum with f = 1 needs rounds of at least 5; tests ask for smaller rounds where they may.
    c.round.min_clients = 5;
    c.round.max_clients = 5;
    c.round.deadline_secs = 300;
    c
}

/// An explicit method with the adaptive bounds off, so the method alone is measured.
fn combine(c: Combine) -> Aggregation {
    Aggregation {
        combine: c,
        trim_fraction: 0.2,
        krum_byzantine: 1,
        krum_select: 2,
        norm_bound_factor: 0.0,
        sample_cap_factor: 0.0,
        ..Aggregation::default()
    }
}

async fn enroll_all(tls: &Tls) -> Vec<Creds> {
    let mut out = Vec::new();
    for (i, t) in TOKENS.iter().enumerate() {
        out.push(tls.enroll(t, &format!("dev-{i}")).await.unwrap());
    }
    out
}

async fn global(ch: &Channel, c: &Creds, name: &str, version: u64) -> Weights {
    let (bytes, _, _, _) = fetch(ch, c, name, version, 0).await.unwrap();
    OnnxModel::from_bytes(&bytes).unwrap().weights()
}

fn add(a: &Weights, b: &Weights, scale: f32) -> Weights {
    map_weights(a, |k, i, x| x + scale * b[k].data[i])
}

fn norm(w: &Weights) -> f64 {
    w.values()
        .flat_map(|t| t.data.iter())
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Runs one full round of `name` (five uploads: four honest clients close to one direction,
/// client 4 the attacker) and returns (global, published, honest payloads, attacker payload).
async fn poisoned_round(
    ch: &Channel,
    clients: &[Creds],
    name: &str,
) -> (Weights, Weights, Vec<Vec<u8>>, Vec<u8>) {
    let g = global(ch, &clients[0], name, 1).await;
    let base = delta(&g, 0.5, 0.02);
    let honest: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let d = add(&base, &delta(&g, 1.0 + i as f32, 0.002), 1.0);
            encode(&d, 8, 40 + i)
        })
        .collect();
    let attack = encode(&add(&base, &base, -21.0), 8, 99);
    let r = start_round(ch, name, 5, 5, 300).await;
    for (i, p) in honest.iter().enumerate() {
        let ack = upload(ch, &clients[i], name, r.round_id, 1, HONEST_SAMPLES, p)
            .await
            .unwrap();
        assert!(ack.accepted, "{name} client {i}: {ack:?}");
    }
    let ack = upload(
        ch,
        &clients[4],
        name,
        r.round_id,
        1,
        CLAIMED_SAMPLES,
        &attack,
    )
    .await
    .unwrap();
    assert!(ack.accepted, "{name} attacker: {ack:?}");
    let s = wait_state(ch, name, r.round_id, RoundState::Completed).await;
    assert_eq!(s.new_version, 2, "{s:?}");
    (g, global(ch, &clients[0], name, 2).await, honest, attack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robust_methods_resist_a_poisoned_client_that_wrecks_fedavg() {
    let dir = tempfile::tempdir().unwrap();
    let clipped = Aggregation {
        clip_norm: CLIP,
        ..combine(Combine::Mean)
    };
    let cfg = config(
        &dir.path().join("db"),
        &[
            ("fedavg", combine(Combine::Mean)),
            ("median", combine(Combine::Median)),
            ("trimmed", combine(Combine::TrimmedMean)),
            ("krum", combine(Combine::Krum)),
            ("clipped", clipped),
        ],
    );
    let server = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let clients = enroll_all(&tls).await;

    let mut errors = BTreeMap::new();
    for name in ["fedavg", "median", "trimmed", "krum"] {
        let (g, got, honest, _) = poisoned_round(&ch, &clients, name).await;
        let refs: Vec<(&[u8], u64)> = honest.iter().map(|p| (p.as_slice(), 1)).collect();
        let honest_avg = fedavg(&g, &refs);
        errors.insert(name, max_abs_diff(&got, &honest_avg));
    }
    // Honest updates differ by at most 0.004 per coordinate; the attacker pulls FedAvg by
    // about (−20 − 1)·0.02·50/90 per coordinate, weighted by its capped 50 samples.
    assert!(errors["fedavg"] > 0.1, "{errors:?}");
    for name in ["median", "trimmed", "krum"] {
        assert!(errors[name] < 0.005, "{name}: {errors:?}");
    }

    // Clipping: the attacker's update is scaled down to CLIP and weighted by the capped
    // sample count; the published model is exactly that weighted mean.
    let (g, got, honest, attack) = poisoned_round(&ch, &clients, "clipped").await;
    let a = decode_update(&attack).unwrap();
    let n = norm(&a);
    assert!(
        n > f64::from(CLIP) * 10.0,
        "the attack is far above the bound: {n}"
    );
    let clipped_attack = add(&a, &a, (f64::from(CLIP) / n) as f32 - 1.0);
    let mut want = g.clone();
    let total = (4 * HONEST_SAMPLES + SAMPLE_CAP) as f32;
    for p in &honest {
        let d = decode_update(p).unwrap();
        assert!(norm(&d) < f64::from(CLIP), "honest updates are not clipped");
        hearth_model::axpy(&mut want, HONEST_SAMPLES as f32 / total, &d).unwrap();
    }
    hearth_model::axpy(&mut want, SAMPLE_CAP as f32 / total, &clipped_attack).unwrap();
    let err = max_abs_diff(&got, &want);
    assert!(err < 1e-5, "clipped and capped FedAvg differs by {err}");
    let refs: Vec<(&[u8], u64)> = honest.iter().map(|p| (p.as_slice(), 1)).collect();
    let clipped_err = max_abs_diff(&got, &fedavg(&g, &refs));
    assert!(
        clipped_err < errors["fedavg"] / 5.0,
        "clipping shrinks the pull: {clipped_err} vs {errors:?}"
    );
    server.shutdown().await.unwrap();
}

/// Two rounds of one client each: a server optimizer's second step depends on the state the
/// first one left, and a restart between them must not lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimizer_state_and_kept_updates_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let avgm = Aggregation {
        optimizer: ServerOptimizer::FedAvgM,
        momentum: 0.5,
        server_learning_rate: Some(0.8),
        ..Aggregation::default()
    };
    let adam = Aggregation {
        optimizer: ServerOptimizer::FedAdam,
        server_learning_rate: Some(0.01),
        beta1: 0.9,
        beta2: 0.99,
        tau: 0.01,
        ..Aggregation::default()
    };
    let median = combine(Combine::Median);
    let cfg = config(
        &db,
        &[
            ("avgm", avgm.clone()),
            ("adam", adam.clone()),
            ("median", median),
        ],
    );

    let server = start(cfg.clone(), listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let clients = enroll_all(&tls).await;
    let mut first = BTreeMap::new();
    for name in ["avgm", "adam"] {
        let g = global(&ch, &clients[0], name, 1).await;
        let p = encode(&delta(&g, 0.3, 0.02), 8, 1);
        let r = start_round(&ch, name, 1, 1, 300).await;
        assert!(
            upload(&ch, &clients[0], name, r.round_id, 1, 10, &p)
                .await
                .unwrap()
                .accepted
        );
        wait_state(&ch, name, r.round_id, RoundState::Completed).await;
        first.insert(name, (g, decode_update(&p).unwrap()));
    }
    // A median round left open with two of its three updates.
    let g_med = global(&ch, &clients[0], "median", 1).await;
    let med: Vec<Vec<u8>> = [(0.1, 0.01), (0.2, 0.5), (0.3, 0.02)]
        .iter()
        .enumerate()
        .map(|(i, (seed, scale))| encode(&delta(&g_med, *seed, *scale), 8, 60 + i as u64))
        .collect();
    let r_med = start_round(&ch, "median", 3, 3, 300).await;
    for (i, p) in med.iter().enumerate().take(2) {
        assert!(
            upload(&ch, &clients[i], "median", r_med.round_id, 1, 10, p)
                .await
                .unwrap()
                .accepted
        );
    }
    server.shutdown().await.unwrap();
    drop(ch);

    let server = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let mut rebound = Vec::new();
    for c in &clients {
        rebound.push(tls.rebind(c).await);
    }
    let clients = rebound;
    for name in ["avgm", "adam"] {
        let (x0, d1) = &first[name];
        let x1 = global(&ch, &clients[0], name, 2).await;
        let p = encode(&delta(x0, 2.1, 0.015), 8, 2);
        let d2 = decode_update(&p).unwrap();
        let r = start_round(&ch, name, 1, 1, 300).await;
        assert_eq!(r.base_version, 2);
        assert!(
            upload(&ch, &clients[1], name, r.round_id, 2, 10, &p)
                .await
                .unwrap()
                .accepted
        );
        let s = wait_state(&ch, name, r.round_id, RoundState::Completed).await;
        assert!(
            s.detail
                .contains(if name == "avgm" { "FedAvgM" } else { "FedAdam" }),
            "{s:?}"
        );
        let got = global(&ch, &clients[0], name, 3).await;
        let a = if name == "avgm" { &avgm } else { &adam };
        let want = second_step(a, &x1, d1, &d2, true);
        let fresh = second_step(a, &x1, d1, &d2, false);
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-5, "{name}: second step differs by {err}");
        let lost = max_abs_diff(&got, &fresh);
        assert!(
            lost > 1e-3,
            "{name}: a lost state would be visible ({lost})"
        );
    }
    // The resumed median round completes with all three kept updates.
    let ack = upload(&ch, &clients[2], "median", r_med.round_id, 1, 10, &med[2])
        .await
        .unwrap();
    assert!(ack.accepted && ack.updates_in_round == 3, "{ack:?}");
    wait_state(&ch, "median", r_med.round_id, RoundState::Completed).await;
    let got = global(&ch, &clients[0], "median", 2).await;
    let ds: Vec<Weights> = med.iter().map(|p| decode_update(p).unwrap()).collect();
    let want = map_weights(&g_med, |k, i, g| {
        let mut col: Vec<f32> = ds.iter().map(|d| d[k].data[i]).collect();
        col.sort_by(f32::total_cmp);
        g + col[1]
    });
    let err = max_abs_diff(&got, &want);
    assert!(err < 1e-6, "median after restart differs by {err}");
    server.shutdown().await.unwrap();
}

/// The second server step from x1 (what round 1 published) with the pseudo-gradients Δ1 and
/// Δ2, by the optimizer's formula in f64; `kept = false` is what a lost state would give (m and
/// v from zero). FedAvgM: x2 = x1 + η(μΔ1 + Δ2). FedAdam: m1 = (1−β1)Δ1, v1 = (1−β2)Δ1²,
/// m2 = β1 m1 + (1−β1)Δ2, v2 = β2 v1 + (1−β2)Δ2², x2 = x1 + η m2 / (√v2 + τ).
fn second_step(a: &Aggregation, x1: &Weights, d1: &Weights, d2: &Weights, kept: bool) -> Weights {
    let lr = f64::from(a.server_learning_rate.unwrap());
    let (mu, b1, b2, tau) = (
        f64::from(a.momentum),
        f64::from(a.beta1),
        f64::from(a.beta2),
        f64::from(a.tau),
    );
    let keep = if kept { 1.0 } else { 0.0 };
    map_weights(x1, |k, i, x| {
        let (g1, g2) = (f64::from(d1[k].data[i]), f64::from(d2[k].data[i]));
        let step = if a.optimizer == ServerOptimizer::FedAvgM {
            keep * mu * g1 + g2
        } else {
            let (m1, v1) = (keep * (1.0 - b1) * g1, keep * (1.0 - b2) * g1 * g1);
            let m2 = b1 * m1 + (1.0 - b1) * g2;
            let v2 = b2 * v1 + (1.0 - b2) * g2 * g2;
            m2 / (v2.sqrt() + tau)
        };
        (f64::from(x) + lr * step) as f32
    })
}

/// Opens a round of `name` on `base` for `uploads.len()` clients (client i sends
/// `uploads[i]`), waits for it to complete and returns its status.
async fn full_round(
    ch: &Channel,
    clients: &[Creds],
    name: &str,
    base: u64,
    uploads: &[(Vec<u8>, u64)],
) -> hearth_proto::v1::RoundStatus {
    let n = uploads.len() as u32;
    let r = start_round(ch, name, n, n, 300).await;
    assert_eq!(r.base_version, base);
    for (i, (p, samples)) in uploads.iter().enumerate() {
        let ack = upload(ch, &clients[i], name, r.round_id, base, *samples, p)
            .await
            .unwrap();
        assert!(ack.accepted, "{name} client {i}: {ack:?}");
    }
    wait_state(ch, name, r.round_id, RoundState::Completed).await
}

/// Three honest payloads near one direction (seeds `s`..) and a sign-flipped ×20 attack on it.
fn honest_and_attack(g: &Weights, s: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let base = delta(g, 0.5 + s as f32, 0.02);
    let honest = (0..4)
        .map(|i| {
            let d = add(&base, &delta(g, 1.0 + i as f32, 0.002), 1.0);
            encode(&d, 8, 40 + s + i)
        })
        .collect();
    (honest, encode(&add(&base, &base, -21.0), 8, 99 + s))
}

/// x + Σ wᵢ·clip(dᵢ, bound)/Σ wᵢ in f64, clipping as the coordinator does (bound 0 = none).
fn bounded_mean(x: &Weights, ups: &[(Weights, f64)], bound: f32) -> Weights {
    let total: f64 = ups.iter().map(|u| u.1).sum();
    let scaled: Vec<(Weights, f64)> = ups
        .iter()
        .map(|(d, w)| {
            let n = norm(d);
            let s = if bound > 0.0 && n > f64::from(bound) {
                (f64::from(bound) / n) as f32
            } else {
                1.0
            };
            (map_weights(d, |_, _, v| v * s), *w)
        })
        .collect();
    map_weights(x, |k, i, v| {
        let s: f64 = scaled
            .iter()
            .map(|(d, w)| w * f64::from(d[k].data[i]))
            .sum();
        (f64::from(v) + s / total) as f32
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The defaults against one attacker (sign-flipped ×20, claiming 10⁹ samples): a round of five
/// takes multi-Krum (the attacker left out); a round of four keeps its updates and bounds them against its own
/// medians (norm ≤ 3 × the median norm, weight ≤ 3 × the median sample count) before the
/// weighted mean; a `mean` round (running sum) bounds them against the medians of the last
/// rounds. The published models are checked against those bounds computed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_bounds_and_auto_robust_limit_a_poisoned_client() {
    let dir = tempfile::tempdir().unwrap();
    let history = Aggregation {
        combine: Combine::Mean,
        ..Aggregation::default()
    };
    let cfg = config(
        &dir.path().join("db"),
        &[
            ("auto5", Aggregation::default()),
            ("auto4", Aggregation::default()),
            ("history", history),
        ],
    );
    let server = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let clients = enroll_all(&tls).await;

    // Five updates: multi-Krum leaves the attacker out, the result is the honest mean.
    let (g, got, honest, _) = poisoned_round(&ch, &clients, "auto5").await;
    let refs: Vec<(&[u8], u64)> = honest.iter().map(|p| (p.as_slice(), 1)).collect();
    let err = max_abs_diff(&got, &fedavg(&g, &refs));
    let s = status(&ch, "auto5", 0).await;
    assert!(s.detail.contains("multi-Krum (f = 1, update(s) ["), "{s:?}");
    assert!(err < 0.005, "auto with five updates: {err}");

    // Four updates (three honest, the attacker): bounded against the round's own medians.
    let g = global(&ch, &clients[0], "auto4", 1).await;
    let (honest, attack) = honest_and_attack(&g, 0);
    let mut uploads: Vec<(Vec<u8>, u64)> = honest[..3]
        .iter()
        .map(|p| (p.clone(), HONEST_SAMPLES))
        .collect();
    uploads.push((attack, CLAIMED_SAMPLES));
    let s = full_round(&ch, &clients, "auto4", 1, &uploads).await;
    let ds: Vec<Weights> = uploads
        .iter()
        .map(|(p, _)| decode_update(p).unwrap())
        .collect();
    let bound = (3.0 * median(ds.iter().map(norm).collect())) as f32;
    assert!(
        norm(&ds[3]) > 5.0 * f64::from(bound),
        "the attack is far above the bound"
    );
    let cap = 3.0 * HONEST_SAMPLES as f64;
    let weighted: Vec<(Weights, f64)> = ds
        .iter()
        .enumerate()
        .map(|(i, d)| (d.clone(), if i == 3 { cap } else { HONEST_SAMPLES as f64 }))
        .collect();
    let got = global(&ch, &clients[0], "auto4", 2).await;
    let err = max_abs_diff(&got, &bounded_mean(&g, &weighted, bound));
    assert!(err < 1e-5, "round-bounded mean differs by {err}: {s:?}");
    assert!(
        s.detail.contains("1 clipped") && s.detail.contains("capped at 30"),
        "{s:?}"
    );

    // The running sum: round 1 (four honest) teaches the bounds, round 2 applies them.
    let g1 = global(&ch, &clients[0], "history", 1).await;
    let (honest1, _) = honest_and_attack(&g1, 0);
    let first: Vec<(Vec<u8>, u64)> = honest1
        .iter()
        .map(|p| (p.clone(), HONEST_SAMPLES))
        .collect();
    full_round(&ch, &clients, "history", 1, &first).await;
    let learnt = (3.0
        * median(
            first
                .iter()
                .map(|(p, _)| norm(&decode_update(p).unwrap()))
                .collect(),
        )) as f32;
    let g2 = global(&ch, &clients[0], "history", 2).await;
    let (honest2, attack2) = honest_and_attack(&g2, 10);
    let mut second: Vec<(Vec<u8>, u64)> = honest2[..3]
        .iter()
        .map(|p| (p.clone(), HONEST_SAMPLES))
        .collect();
    second.push((attack2, CLAIMED_SAMPLES));
    let s = full_round(&ch, &clients, "history", 2, &second).await;
    assert!(s.detail.contains("mean of 4"), "{s:?}");
    let ds: Vec<(Weights, f64)> = second
        .iter()
        .enumerate()
        .map(|(i, (p, _))| {
            let w = if i == 3 { cap } else { HONEST_SAMPLES as f64 };
            (decode_update(p).unwrap(), w)
        })
        .collect();
    assert!(norm(&ds[3].0) > 5.0 * f64::from(learnt));
    let got = global(&ch, &clients[0], "history", 3).await;
    let err = max_abs_diff(&got, &bounded_mean(&g2, &ds, learnt));
    assert!(err < 1e-5, "history-bounded mean differs by {err}: {s:?}");
    server.shutdown().await.unwrap();
}
