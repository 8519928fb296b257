//! The compressed downlink: version N+1 of a model travels to an agent that holds version N
//! as a coded delta (the update codec of [`crate::update`]: top-k and low-bit quantization,
//! with the error feedback kept on the server), not as the whole fp32 ONNX file.
//!
//! There is no drift between what the coordinator computes and what agents run, because the
//! coordinator *defines* version N+1 as the reconstruction: `next = apply(parent, payload)`,
//! the same function, on the same parent bytes, that the agent calls. The server's exact
//! target (after its optimizer step) differs from that by what the codec did not send; that
//! difference is the residual, added to the next version's delta (error feedback), so
//! versions do not drift away from the target either. The published file, its SHA-256 and
//! its signature are those of the reconstruction; an agent checks the digest of what it
//! rebuilt against the signed one before it uses it.

use crate::error::ModelError;
use crate::onnx::OnnxModel;
use crate::tensor::{Tensor, Weights};
use crate::update::{decode_update_for, encode_update, CodecConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Adds the decoded `payload` to `parent`'s weights: the one reconstruction of a version
/// from its parent, used by the coordinator (to define the version) and by agents. The
/// payload must name exactly the parent's weight tensors with their shapes.
pub fn apply(parent: &OnnxModel, payload: &[u8]) -> Result<OnnxModel, ModelError> {
    let mut w = parent.weights();
    let delta = decode_update_for(payload, &w)?;
    if delta.len() != w.len() {
        return Err(ModelError::Codec(format!(
            "the delta has {} tensors, the model {}",
            delta.len(),
            w.len()
        )));
    }
    for (name, t) in &mut w {
        let d = delta
            .get(name)
            .ok_or_else(|| ModelError::Codec(format!("the delta lacks tensor {name}")))?;
        if d.shape != t.shape {
            return Err(ModelError::Shape(format!(
                "delta {name}: shape {:?} vs {:?}",
                d.shape, t.shape
            )));
        }
        // Plain f32 additions in element order: the same result on every platform.
        t.data.iter_mut().zip(&d.data).for_each(|(a, b)| *a += *b);
    }
    let mut next = parent.clone();
    next.set_weights(&w)?;
    Ok(next)
}

/// Codes `target - parent + residual` with `cfg` (stochastic rounding seeded by `seed`, so a
/// version is reproducible) and returns the payload and the reconstruction
/// [`apply`]`(parent, payload)` — the model to publish. `residual` (zeros or empty for none)
/// becomes what was not sent: `target - reconstruction`, up to f32 rounding.
pub fn code(
    parent: &OnnxModel,
    target: &Weights,
    residual: &mut Weights,
    cfg: &CodecConfig,
    seed: u64,
) -> Result<(Vec<u8>, OnnxModel), ModelError> {
    let base = parent.weights();
    let mut delta = Weights::new();
    for (name, t) in target {
        let b = base
            .get(name)
            .ok_or_else(|| ModelError::Codec(format!("the parent lacks tensor {name}")))?;
        if b.shape != t.shape {
            return Err(ModelError::Shape(format!(
                "target {name}: shape {:?} vs {:?}",
                t.shape, b.shape
            )));
        }
        let data = t.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
        delta.insert(name.clone(), Tensor::new(t.shape.clone(), data));
    }
    if residual
        .iter()
        .any(|(k, r)| delta.get(k).is_none_or(|d| d.shape != r.shape))
    {
        // A residual of another layout (the model changed) is dropped, not misapplied.
        residual.clear();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let payload = encode_update(&delta, residual, cfg, &mut rng)?;
    let next = apply(parent, &payload)?;
    Ok((payload, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::OnnxModel;

    use crate::data::Task;

    fn mlp() -> OnnxModel {
        OnnxModel::build_mlp(&Task::Digits.default_spec(), 7)
    }

    #[test]
    fn reconstruction_is_exact_and_the_residual_carries_the_rest() {
        let parent = mlp();
        let mut target = parent.weights();
        for t in target.values_mut() {
            for (i, v) in t.data.iter_mut().enumerate() {
                *v += 0.01 * ((i % 7) as f32 - 3.0);
            }
        }
        let cfg = CodecConfig {
            bits: 4,
            topk_fraction: 0.3,
            entropy: true,
            compact: false,
        };
        let mut residual = Weights::new();
        let (payload, next) = code(&parent, &target, &mut residual, &cfg, 5).unwrap();
        // What an agent rebuilds from the parent's bytes is byte for byte the published file.
        let again = apply(
            &OnnxModel::from_bytes(&parent.to_bytes()).unwrap(),
            &payload,
        )
        .unwrap();
        assert_eq!(again.to_bytes(), next.to_bytes());
        // The residual is what the reconstruction misses of the target.
        let got = next.weights();
        for (name, t) in &target {
            for ((x, y), r) in t.data.iter().zip(&got[name].data).zip(&residual[name].data) {
                assert!((x - y - r).abs() < 1e-5, "{name}: {x} - {y} != {r}");
            }
        }
        // The payload is far smaller than the fp32 file.
        assert!(payload.len() * 4 < next.to_bytes().len());
    }

    #[test]
    fn a_delta_for_another_model_is_refused() {
        let parent = mlp();
        let mut spec = Task::Digits.default_spec();
        spec.hidden = vec![4];
        let other = OnnxModel::build_mlp(&spec, 7);
        let mut residual = Weights::new();
        let (payload, _) = code(
            &other,
            &other.weights(),
            &mut residual,
            &CodecConfig::default(),
            1,
        )
        .unwrap();
        assert!(apply(&parent, &payload).is_err());
    }
}
