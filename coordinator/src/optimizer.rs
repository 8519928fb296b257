//! Server optimizers (Reddi et al. 2020, "Adaptive Federated Optimization"), applied at round
//! completion to the round's pseudo-gradient Δ (the combined client deltas):
//!
//! - FedAvg: x += η Δ
//! - FedAvgM: m = μ m + Δ; x += η m
//! - FedAdam: m = β1 m + (1−β1) Δ; v = β2 v + (1−β2) Δ²; x += η m / (√v + τ)
//! - FedYogi: as FedAdam with v = v − (1−β2) Δ² sign(v − Δ²)
//!
//! m and v start at zero (as in Flower) and are kept per model in the store next to the
//! versions ([`ServerState`]), written in the transaction that publishes the version they
//! produced, so they survive a restart.

use hearth_model::bytes::{Put, Reader};
use hearth_model::{Tensor, Weights};

use crate::aggregate::{put_weights, read_weights, AggregateError};
use crate::config::{Aggregation, ServerOptimizer};

/// A model's server optimizer state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerState {
    /// Optimizer that produced the state (moments of another optimizer are not reused).
    pub optimizer: ServerOptimizer,
    /// Rounds applied so far.
    pub steps: u64,
    /// Momentum / first moment.
    pub m: Option<Weights>,
    /// Second moment.
    pub v: Option<Weights>,
}

const MAGIC: &[u8; 5] = b"HOPT1";

fn optimizer_code(o: ServerOptimizer) -> u8 {
    match o {
        ServerOptimizer::FedAvg => 0,
        ServerOptimizer::FedAvgM => 1,
        ServerOptimizer::FedAdam => 2,
        ServerOptimizer::FedYogi => 3,
    }
}

impl ServerState {
    /// Compact encoding (what the store keeps per model).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_bytes(MAGIC);
        b.put_u8(optimizer_code(self.optimizer));
        b.put_u64(self.steps);
        for w in [&self.m, &self.v] {
            b.put_u8(u8::from(w.is_some()));
            if let Some(w) = w {
                put_weights(&mut b, w);
            }
        }
        b
    }

    /// Inverse of [`ServerState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<ServerState, AggregateError> {
        let mut r = Reader::new(bytes);
        r.expect(MAGIC, "server optimizer state")?;
        let code = r.u8()?;
        let optimizer = [
            ServerOptimizer::FedAvg,
            ServerOptimizer::FedAvgM,
            ServerOptimizer::FedAdam,
            ServerOptimizer::FedYogi,
        ]
        .into_iter()
        .find(|o| optimizer_code(*o) == code)
        .ok_or_else(|| AggregateError::Encoding(format!("unknown optimizer code {code}")))?;
        let steps = r.u64()?;
        let mut moments = [None, None];
        for slot in &mut moments {
            if r.u8()? != 0 {
                *slot = Some(read_weights(&mut r)?);
            }
        }
        r.finish()?;
        let [m, v] = moments;
        Ok(ServerState {
            optimizer,
            steps,
            m,
            v,
        })
    }
}

/// Zeros shaped like `w`.
fn zeros(w: &Weights) -> Weights {
    w.iter()
        .map(|(k, t)| {
            (
                k.clone(),
                Tensor::new(t.shape.clone(), vec![0.0; t.data.len()]),
            )
        })
        .collect()
}

/// `moment` if it matches `like`'s names and shapes, else zeros.
fn moment_like(moment: Option<Weights>, like: &Weights) -> Weights {
    match moment {
        Some(m)
            if m.len() == like.len()
                && m.iter()
                    .zip(like)
                    .all(|((a, ta), (b, tb))| a == b && ta.data.len() == tb.data.len()) =>
        {
            m
        }
        _ => zeros(like),
    }
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Applies one server step of `a.optimizer` with learning rate `lr` to the weights `x`, given
/// the round's pseudo-gradient `delta` (same names and shapes), and returns the new state.
/// A state from another optimizer or with other shapes starts again from zero.
pub fn step(
    a: &Aggregation,
    lr: f32,
    x: &mut Weights,
    delta: &Weights,
    state: ServerState,
) -> Result<ServerState, AggregateError> {
    if x.len() != delta.len()
        || x.iter()
            .zip(delta)
            .any(|((a, ta), (b, tb))| a != b || ta.data.len() != tb.data.len())
    {
        return Err(AggregateError::Names(
            "pseudo-gradient does not match the model".into(),
        ));
    }
    let state = if state.optimizer == a.optimizer {
        state
    } else {
        ServerState {
            optimizer: a.optimizer,
            ..ServerState::default()
        }
    };
    let lr = f64::from(lr);
    let steps = state.steps + 1;
    match a.optimizer {
        ServerOptimizer::FedAvg => {
            for (name, t) in x.iter_mut() {
                for (w, d) in t.data.iter_mut().zip(&delta[name].data) {
                    *w = (f64::from(*w) + lr * f64::from(*d)) as f32;
                }
            }
            Ok(ServerState {
                optimizer: a.optimizer,
                steps,
                m: None,
                v: None,
            })
        }
        ServerOptimizer::FedAvgM => {
            let mu = f64::from(a.momentum);
            let mut m = moment_like(state.m, delta);
            for (name, t) in x.iter_mut() {
                let mt = &mut m.get_mut(name).expect("same names").data;
                for ((w, d), mv) in t.data.iter_mut().zip(&delta[name].data).zip(mt) {
                    let next = mu * f64::from(*mv) + f64::from(*d);
                    *mv = next as f32;
                    *w = (f64::from(*w) + lr * next) as f32;
                }
            }
            Ok(ServerState {
                optimizer: a.optimizer,
                steps,
                m: Some(m),
                v: None,
            })
        }
        ServerOptimizer::FedAdam | ServerOptimizer::FedYogi => {
            let yogi = a.optimizer == ServerOptimizer::FedYogi;
            let (b1, b2, tau) = (f64::from(a.beta1), f64::from(a.beta2), f64::from(a.tau));
            let mut m = moment_like(state.m, delta);
            let mut v = moment_like(state.v, delta);
            for (name, t) in x.iter_mut() {
                let mt = &mut m.get_mut(name).expect("same names").data;
                let vt = &mut v.get_mut(name).expect("same names").data;
                for (((w, d), mv), vv) in t.data.iter_mut().zip(&delta[name].data).zip(mt).zip(vt) {
                    let d = f64::from(*d);
                    let m1 = b1 * f64::from(*mv) + (1.0 - b1) * d;
                    let v0 = f64::from(*vv);
                    let d2 = d * d;
                    let v1 = if yogi {
                        v0 - (1.0 - b2) * d2 * sign(v0 - d2)
                    } else {
                        b2 * v0 + (1.0 - b2) * d2
                    };
                    *mv = m1 as f32;
                    *vv = v1 as f32;
                    *w = (f64::from(*w) + lr * m1 / (v1.max(0.0).sqrt() + tau)) as f32;
                }
            }
            Ok(ServerState {
                optimizer: a.optimizer,
                steps,
                m: Some(m),
                v: Some(v),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &[f32]) -> Weights {
        let mut w = Weights::new();
        w.insert("a".into(), Tensor::new(vec![v.len()], v.to_vec()));
        w
    }

    fn agg(o: ServerOptimizer) -> Aggregation {
        Aggregation {
            optimizer: o,
            momentum: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.1,
            ..Aggregation::default()
        }
    }

    fn close(a: &Weights, b: &[f64]) {
        for (x, y) in a["a"].data.iter().zip(b) {
            assert!(
                (f64::from(*x) - y).abs() < 1e-5,
                "{:?} vs {b:?}",
                a["a"].data
            );
        }
    }

    #[test]
    fn fedavg_adds_the_scaled_delta() {
        let mut x = w(&[1.0, 2.0]);
        let s = step(
            &agg(ServerOptimizer::FedAvg),
            0.5,
            &mut x,
            &w(&[2.0, -4.0]),
            ServerState::default(),
        )
        .unwrap();
        close(&x, &[2.0, 0.0]);
        assert_eq!((s.steps, s.m, s.v), (1, None, None));
    }

    #[test]
    fn fedavgm_two_steps_by_hand() {
        let a = agg(ServerOptimizer::FedAvgM);
        let mut x = w(&[0.0]);
        // m1 = 1; x = 0 + 1·1 = 1. m2 = 0.5·1 + 2 = 2.5; x = 1 + 2.5 = 3.5.
        let s = step(&a, 1.0, &mut x, &w(&[1.0]), ServerState::default()).unwrap();
        close(&x, &[1.0]);
        let s = step(&a, 1.0, &mut x, &w(&[2.0]), s).unwrap();
        close(&x, &[3.5]);
        close(s.m.as_ref().unwrap(), &[2.5]);
        assert_eq!(s.steps, 2);
        // Without the state the second step is plain: x = 1 + 2.
        let mut y = w(&[1.0]);
        step(&a, 1.0, &mut y, &w(&[2.0]), ServerState::default()).unwrap();
        close(&y, &[3.0]);
    }

    #[test]
    fn fedadam_two_steps_by_hand() {
        let a = agg(ServerOptimizer::FedAdam);
        let mut x = w(&[0.0, 1.0]);
        // Step 1, Δ = (1, −2): m = 0.1Δ = (0.1, −0.2); v = 0.01Δ² = (0.01, 0.04);
        // √v = (0.1, 0.2); x += 0.5·m/(√v + 0.1) = 0.5·(0.1/0.2, −0.2/0.3) = (0.25, −1/3).
        let s = step(&a, 0.5, &mut x, &w(&[1.0, -2.0]), ServerState::default()).unwrap();
        close(&x, &[0.25, 1.0 - 1.0 / 3.0]);
        // Step 2, Δ = (3, 0): m = (0.09 + 0.3, −0.18) = (0.39, −0.18);
        // v = (0.0099 + 0.09, 0.0396) = (0.0999, 0.0396);
        // x += 0.5·(0.39/(√0.0999 + 0.1), −0.18/(√0.0396 + 0.1)).
        let s = step(&a, 0.5, &mut x, &w(&[3.0, 0.0]), s).unwrap();
        let x0 = 0.25 + 0.5 * 0.39 / (0.0999f64.sqrt() + 0.1);
        let x1 = 1.0 - 1.0 / 3.0 - 0.5 * 0.18 / (0.0396f64.sqrt() + 0.1);
        close(&x, &[x0, x1]);
        close(s.m.as_ref().unwrap(), &[0.39, -0.18]);
        close(s.v.as_ref().unwrap(), &[0.0999, 0.0396]);
        let back = ServerState::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn fedyogi_second_moment_by_hand() {
        let a = agg(ServerOptimizer::FedYogi);
        let mut x = w(&[0.0]);
        // Step 1, Δ = 1: v0 = 0 < Δ² so v = 0 + 0.01 = 0.01 (as Adam).
        let s = step(&a, 1.0, &mut x, &w(&[1.0]), ServerState::default()).unwrap();
        close(s.v.as_ref().unwrap(), &[0.01]);
        // Step 2, Δ = 0.05: v − Δ² = 0.0075 > 0 so v = 0.01 − 0.01·0.0025 = 0.009975
        // (Adam would give 0.99·0.01 + 0.000025 = 0.009925).
        let s = step(&a, 1.0, &mut x, &w(&[0.05]), s).unwrap();
        close(s.v.as_ref().unwrap(), &[0.009975]);
    }

    #[test]
    fn state_of_another_optimizer_or_shape_restarts() {
        let run = |o, x: &mut Weights, d: &[f32], s| step(&agg(o), 1.0, x, &w(d), s);
        let mut x = w(&[0.0]);
        let adam = run(
            ServerOptimizer::FedAdam,
            &mut x,
            &[1.0],
            ServerState::default(),
        )
        .unwrap();
        let mut y = w(&[0.0]);
        let s = run(ServerOptimizer::FedAvgM, &mut y, &[1.0], adam).unwrap();
        close(&y, &[1.0]);
        assert_eq!(s.steps, 1);
        let mut z = w(&[0.0, 0.0]);
        let s = run(ServerOptimizer::FedAvgM, &mut z, &[1.0, 1.0], s).unwrap();
        close(&z, &[1.0, 1.0]);
        assert!(run(ServerOptimizer::FedAvg, &mut z, &[1.0], s).is_err());
        assert!(ServerState::from_bytes(b"HOPT1\x09").is_err());
    }
}
