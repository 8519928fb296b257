//! An in-process federated simulation with the parts the real system uses: every client
//! trains locally on its non-IID share ([`Dataset::partition`], the agents' partitions),
//! clips its delta, codes it with the real update codec ([`encode_update`], error feedback
//! kept per client), and the server decodes and applies the sample-weighted mean (FedAvg).
//! No network and no coordinator: it measures what a model family reaches federated, for
//! the accuracy benchmark, the codec sweep (`examples/codec_sweep.rs`) and the tests, at a
//! fraction of the demo's cost. Besides the codec it can apply the remedies that let very
//! sparse updates converge (Lin et al., Deep Gradient Compression): momentum correction
//! across rounds with momentum factor masking, and a sparsity warm-up; local clipping is
//! `clip_norm`.

use crate::data::Dataset;
use crate::error::ModelError;
use crate::infer::{accuracy, Classifier};
use crate::onnx::OnnxModel;
use crate::tensor::{axpy, sub, Tensor, Weights};
use crate::train::{train, TrainConfig};
use crate::update::{clip_l2, decode_update_for, encode_update, CodecConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// How a simulation runs; the defaults are the demo's (3 clients, Dirichlet 0.5, partition
/// seed 42, 10 local epochs at lr 0.01, clip 10, 8-bit dense updates).
#[derive(Clone, Debug)]
pub struct FedSim {
    /// Number of clients.
    pub clients: usize,
    /// Dirichlet concentration of the label skew.
    pub alpha: f32,
    /// Partition seed.
    pub partition_seed: u64,
    /// Federated rounds.
    pub rounds: u32,
    /// Local training of every client (its `seed` is varied per client and round).
    pub local: TrainConfig,
    /// L2 bound of each client's delta (0: none).
    pub clip_norm: f32,
    /// Update codec.
    pub codec: CodecConfig,
    /// Downlink codec (`None`: every version ships whole): each new global model is the
    /// reconstruction of a coded delta against the previous one ([`crate::downlink`]), the
    /// server keeping the error feedback.
    pub downlink: Option<CodecConfig>,
    /// DGC momentum correction across rounds (0 = off): each client keeps a velocity
    /// `u = m·u + delta` and codes `u` (its error feedback accumulating what was not sent);
    /// `u` is cleared where a value was sent (momentum factor masking).
    pub dgc_momentum: f32,
    /// Sparsity warm-up: over the first `warmup_rounds` rounds the uplink top-k fraction
    /// falls geometrically from 1 to `codec.topk_fraction` (round r < W sends
    /// `topk^((r+1)/(W+1))`); 0 = the target from the start.
    pub warmup_rounds: u32,
    /// Another size of each payload (e.g. after a general-purpose compressor), summed into
    /// [`RoundStat::uplink_alt_bytes`] / [`RoundStat::downlink_alt_bytes`].
    pub alt_size: Option<fn(&[u8]) -> usize>,
}

/// What one simulated round cost and reached.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundStat {
    /// Accuracy of the new global model on the test set.
    pub accuracy: f32,
    /// Mean uplink payload per client, bytes.
    pub uplink_bytes: f64,
    /// Downlink bytes per client for the new version (the coded delta, or the ONNX file).
    pub downlink_bytes: f64,
    /// [`FedSim::alt_size`] of the uplink payloads, mean per client (0 without it).
    pub uplink_alt_bytes: f64,
    /// [`FedSim::alt_size`] of the downlink payload (0 without it).
    pub downlink_alt_bytes: f64,
}

impl Default for FedSim {
    fn default() -> Self {
        FedSim {
            clients: 3,
            alpha: 0.5,
            partition_seed: 42,
            rounds: 3,
            local: TrainConfig {
                epochs: 10,
                learning_rate: 0.01,
                ..TrainConfig::default()
            },
            clip_norm: 10.0,
            codec: CodecConfig::default(),
            downlink: None,
            dgc_momentum: 0.0,
            warmup_rounds: 0,
            alt_size: None,
        }
    }
}

/// Runs `sim` from `model` on `train_set` and returns the global model after every round
/// with its accuracy on `test_set`.
pub fn run(
    sim: &FedSim,
    model: &OnnxModel,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<(OnnxModel, Vec<f32>), ModelError> {
    let (m, stats) = run_counted(sim, model, train_set, test_set)?;
    Ok((m, stats.iter().map(|s| s.accuracy).collect()))
}

/// [`run`], with the bytes every round put on the wire.
pub fn run_counted(
    sim: &FedSim,
    model: &OnnxModel,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<(OnnxModel, Vec<RoundStat>), ModelError> {
    let shares: Vec<Dataset> = (0..sim.clients)
        .map(|i| train_set.partition(i, sim.clients, sim.alpha, sim.partition_seed))
        .filter(|d| !d.is_empty())
        .collect();
    let mut global = model.clone();
    let mut residuals: Vec<Option<Weights>> = vec![None; shares.len()];
    let mut velocities: Vec<Option<Weights>> = vec![None; shares.len()];
    let mut rng = StdRng::seed_from_u64(sim.partition_seed ^ 0x0053_494d);
    let mut history = Vec::new();
    let mut server_residual = Weights::new();
    for round in 0..sim.rounds {
        let base = global.weights();
        let mut sum: Weights = base
            .iter()
            .map(|(k, v)| (k.clone(), Tensor::zeros(&v.shape)))
            .collect();
        let mut total = 0.0f32;
        let mut uplink = 0usize;
        let mut uplink_alt = 0usize;
        let codec = if round < sim.warmup_rounds && sim.codec.topk_fraction < 1.0 {
            let e = (round + 1) as f32 / (sim.warmup_rounds + 1) as f32;
            CodecConfig {
                topk_fraction: sim.codec.topk_fraction.powf(e),
                ..sim.codec
            }
        } else {
            sim.codec
        };
        for (c, share) in shares.iter().enumerate() {
            let cfg = TrainConfig {
                seed: sim.local.seed ^ ((round as u64) << 32 | c as u64),
                ..sim.local.clone()
            };
            let (local, _) = train(&global, share, &cfg)?;
            let mut delta = sub(&local, &base)?;
            if sim.clip_norm > 0.0 {
                clip_l2(&mut delta, sim.clip_norm);
            }
            let residual = residuals[c].get_or_insert_with(|| {
                delta
                    .iter()
                    .map(|(k, v)| (k.clone(), Tensor::zeros(&v.shape)))
                    .collect()
            });
            let zeros = || -> Weights {
                delta
                    .iter()
                    .map(|(k, v)| (k.clone(), Tensor::zeros(&v.shape)))
                    .collect()
            };
            let coded_input = if sim.dgc_momentum > 0.0 {
                let u = velocities[c].get_or_insert_with(zeros);
                for (name, t) in u.iter_mut() {
                    let d = &delta[name];
                    t.data
                        .iter_mut()
                        .zip(&d.data)
                        .for_each(|(a, b)| *a = sim.dgc_momentum * *a + b);
                }
                u.clone()
            } else {
                delta
            };
            let bytes = encode_update(&coded_input, residual, &codec, &mut rng)?;
            uplink += bytes.len();
            uplink_alt += sim.alt_size.map_or(0, |f| f(&bytes));
            let decoded = decode_update_for(&bytes, &base)?;
            if let Some(u) = velocities[c].as_mut() {
                // Momentum factor masking: what was sent leaves the velocity.
                for (name, t) in u.iter_mut() {
                    let s = &decoded[name];
                    t.data
                        .iter_mut()
                        .zip(&s.data)
                        .filter(|(_, s)| **s != 0.0)
                        .for_each(|(a, _)| *a = 0.0);
                }
            }
            let n = share.len() as f32;
            axpy(&mut sum, n, &decoded)?;
            total += n;
        }
        let mut next = base.clone();
        axpy(&mut next, 1.0 / total, &sum)?;
        let (downlink, downlink_alt) = match &sim.downlink {
            Some(cfg) => {
                let seed = sim.partition_seed ^ u64::from(round).wrapping_mul(0x9e37_79b9);
                let (payload, published) =
                    crate::downlink::code(&global, &next, &mut server_residual, cfg, seed)?;
                global = published;
                (payload.len(), sim.alt_size.map_or(0, |f| f(&payload)))
            }
            None => {
                global.set_weights(&next)?;
                let file = global.to_bytes();
                (file.len(), sim.alt_size.map_or(0, |f| f(&file)))
            }
        };
        history.push(RoundStat {
            accuracy: accuracy(&Classifier::new(&global)?, test_set)?,
            uplink_bytes: uplink as f64 / shares.len().max(1) as f64,
            downlink_bytes: downlink as f64,
            uplink_alt_bytes: uplink_alt as f64 / shares.len().max(1) as f64,
            downlink_alt_bytes: downlink_alt as f64,
        });
    }
    Ok((global, history))
}

/// Trains `model` centrally on the whole `train_set` with `cfg`; returns it and its
/// accuracy on `test_set`.
pub fn central(
    model: &OnnxModel,
    train_set: &Dataset,
    test_set: &Dataset,
    cfg: &TrainConfig,
) -> Result<(OnnxModel, f32), ModelError> {
    let (w, _) = train(model, train_set, cfg)?;
    let mut m = model.clone();
    m.set_weights(&w)?;
    let acc = accuracy(&Classifier::new(&m)?, test_set)?;
    Ok((m, acc))
}
