//! Inference with tract: the plans are optimised once when a [`Classifier`] is built and
//! reused for every call (one plan fixed to batch 1 for per-event `predict`, one with a
//! symbolic batch for `predict_batch`; both come from one graph decluttered with the batch
//! symbolic, so the batch-1 plan keeps the batch axis and needs no reshapes). Batch-1 calls
//! also reuse tract run states and their input tensors from a small pool ([`StatePool`]), so
//! a call pays only for the plan itself.
//!
//! When the model is a chain Hearth's dense engine runs exactly ([`crate::dense`]: the float
//! Gemm/Relu MLPs Hearth trains and their int8 QOperator exports), batch-1 calls go to that
//! engine instead, after it has been checked against the tract plan on probe inputs;
//! [`Engine`] says which one serves `predict`, and [`Classifier::with_engine`] pins one.

use crate::data::Dataset;
use crate::error::ModelError;
use crate::onnx::OnnxModel;
use hearth_dense::DenseNet;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

/// Most batch-1 run states kept for reuse; one per thread that calls `predict` at once is
/// enough, more are created on demand and dropped after the call.
const MAX_POOLED_STATES: usize = 8;

/// A reusable batch-1 run: tract's per-session state (op states, the value table with the
/// constants already seeded, the matrix kernels' scratch) and a `[1, input_len]` input tensor
/// overwritten in place.
struct Slot {
    state: TypedSimpleState,
    input: Arc<Tensor>,
    /// Thread the state last ran on. tract keeps matrix-kernel scratch per session in
    /// thread-locals and frees it only on the thread that drops the state, so a slot is
    /// reused only by its own thread (no scratch left behind on others).
    thread: ThreadId,
}

/// Idle batch-1 [`Slot`]s, checked out for the duration of one call.
#[derive(Default)]
struct StatePool(Mutex<Vec<Slot>>);

impl StatePool {
    /// An idle slot of the calling thread, if any.
    fn take(&self) -> Option<Slot> {
        let me = std::thread::current().id();
        // A poisoned lock only means a panic elsewhere mid-push/pop; the Vec is still valid.
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = slots.iter().rposition(|s| s.thread == me)?;
        Some(slots.swap_remove(i))
    }

    /// Returns a slot after a successful call. When the pool is full the oldest slot goes, so
    /// slots of threads that have since exited (a blocking pool's idle workers) cannot crowd
    /// out the live ones; it is dropped after the lock is released.
    fn put(&self, slot: Slot) {
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let evicted = (slots.len() >= MAX_POOLED_STATES).then(|| slots.remove(0));
        slots.push(slot);
        drop(slots);
        drop(evicted);
    }
}

/// Which engine serves batch-1 [`Classifier::predict`] calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Engine {
    /// Hearth's dense engine when the model is a chain it runs (and it agrees with tract on
    /// the probes), otherwise tract.
    #[default]
    Auto,
    /// Always tract's optimised plan.
    Tract,
    /// Hearth's dense engine ([`crate::dense`]).
    Dense,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Auto => "auto",
            Engine::Tract => "tract",
            Engine::Dense => "dense",
        })
    }
}

/// A loaded, optimised classifier. `Send + Sync`: share it behind an `Arc`. Clones share the
/// plans and the pool of batch-1 run states.
#[derive(Clone)]
pub struct Classifier {
    single: Plan,
    batch: Plan,
    pool: Arc<StatePool>,
    dense: Option<Arc<DenseNet>>,
    classes: Vec<String>,
    input_len: usize,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("classes", &self.classes)
            .field("input_len", &self.input_len)
            .field("engine", &self.engine())
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// Loads the model into tract and optimises a batch-1 plan and a batch-N plan; batch-1
    /// calls use Hearth's dense engine where it applies ([`Engine::Auto`]).
    pub fn new(model: &OnnxModel) -> Result<Classifier, ModelError> {
        Classifier::with_engine(model, Engine::Auto)
    }

    /// As [`Classifier::new`], with the batch-1 engine chosen: `Tract` never uses the dense
    /// engine; `Dense` requires it (an error when the model is not a chain it runs, or when
    /// it disagrees with tract on the probes).
    pub fn with_engine(model: &OnnxModel, engine: Engine) -> Result<Classifier, ModelError> {
        let input_len = model.input_len();
        if input_len == 0 {
            return Err(ModelError::Onnx("cannot determine the input length".into()));
        }
        let inference = tract_onnx::onnx()
            .model_for_proto_model(model.proto())
            .map_err(ModelError::tract)?;
        // Declutter once with a symbolic batch, then fix it to 1 for the per-event plan and
        // only run codegen on that. Decluttering with a concrete batch of 1 drops the batch
        // axis between layers, and tract then reshapes every hidden activation back into a
        // matrix around each matmul (an `IntoShape` before and after), which also keeps the
        // bias + Relu of that layer from fusing into the matmul: ~0.7-1 µs per call.
        let batch_sym = inference.sym("N");
        let decluttered = inference
            .with_input_fact(
                0,
                f32::fact([TDim::from(batch_sym.clone()), TDim::from(input_len as i64)]).into(),
            )
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .map_err(ModelError::tract)?;
        let single = decluttered
            .set_symbols(&std::collections::HashMap::from([(
                batch_sym,
                TDim::from(1i64),
            )]))
            .and_then(|mut m| {
                m.optimize()?;
                m.into_runnable()
            })
            .map_err(ModelError::tract)?;
        let batch = decluttered
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(ModelError::tract)?;
        let mut classes = model.classes();
        // Probe once: checks the plan runs and learns the output width.
        let probe = run(&single, &vec![0.0; input_len], 1, input_len)?;
        if classes.len() != probe.len() {
            if model
                .proto()
                .metadata_props
                .iter()
                .any(|e| e.key == crate::onnx::META_CLASSES)
            {
                return Err(ModelError::Onnx(format!(
                    "{} classes in metadata, model outputs {}",
                    classes.len(),
                    probe.len()
                )));
            }
            classes = (0..probe.len()).map(|i| format!("class_{i}")).collect();
        }
        let dense = match engine {
            Engine::Tract => None,
            Engine::Auto | Engine::Dense => crate::dense::engine_for(model)
                .filter(|d| d.output_len() == probe.len())
                .filter(|d| agrees_with_tract(d, &single, input_len)),
        };
        if engine == Engine::Dense && dense.is_none() {
            return Err(ModelError::Onnx(
                "the dense engine does not run this model (not a Gemm/Relu or int8 QLinearConv chain)"
                    .into(),
            ));
        }
        Ok(Classifier {
            single,
            batch,
            pool: Arc::default(),
            dense: dense.map(Arc::new),
            classes,
            input_len,
        })
    }

    /// The engine serving batch-1 calls: `Dense` or `Tract`.
    pub fn engine(&self) -> Engine {
        if self.dense.is_some() {
            Engine::Dense
        } else {
            Engine::Tract
        }
    }

    /// Class probabilities for one preprocessed input.
    pub fn predict(&self, input: &[f32]) -> Result<Vec<f32>, ModelError> {
        if input.len() != self.input_len {
            return Err(ModelError::Shape(format!(
                "input has {} values, model expects {}",
                input.len(),
                self.input_len
            )));
        }
        match &self.dense {
            Some(d) => Ok(d.predict(input)?),
            None => self.run_single(input),
        }
    }

    /// One batch-1 run on a pooled state: the input is copied into the slot's tensor, the
    /// probabilities out of tract's output. Same plan and kernels as `plan.run`, so the
    /// results are bit-identical to a fresh state's.
    fn run_single(&self, input: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut slot = match self.pool.take() {
            Some(slot) => slot,
            None => Slot {
                state: self.single.spawn().map_err(ModelError::tract)?,
                input: Arc::new(
                    Tensor::zero::<f32>(&[1, self.input_len]).map_err(ModelError::tract)?,
                ),
                thread: std::thread::current().id(),
            },
        };
        // The state drops every value at the end of a run, so the tensor is ours again;
        // should anything still hold it, use a fresh one.
        match Arc::get_mut(&mut slot.input) {
            Some(t) => t
                .try_as_plain_ram_mut()
                .and_then(|mut v| {
                    v.as_slice_mut::<f32>()?.copy_from_slice(input);
                    Ok(())
                })
                .map_err(ModelError::tract)?,
            None => {
                slot.input = Arc::new(
                    Tensor::from_shape(&[1, self.input_len], input).map_err(ModelError::tract)?,
                )
            }
        }
        // On error the slot is dropped rather than pooled: its state may be mid-turn.
        let out = slot
            .state
            .run(tvec!(TValue::from_const(Arc::clone(&slot.input))))
            .map_err(ModelError::tract)?;
        let probs = first_output(&out)?;
        drop(out);
        self.pool.put(slot);
        Ok(probs)
    }

    /// Class probabilities for `n` inputs laid out row-major in `x` (`n * classes` values).
    pub fn predict_batch(&self, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        if x.len() != n * self.input_len {
            return Err(ModelError::Shape(format!(
                "{} values for {n} inputs of {}",
                x.len(),
                self.input_len
            )));
        }
        match n {
            0 => Ok(Vec::new()),
            1 => self.predict(x),
            _ => run(&self.batch, x, n, self.input_len),
        }
    }

    /// Class labels by output index.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Input vector length.
    pub fn input_len(&self) -> usize {
        self.input_len
    }
}

/// Whether the dense engine's outputs match the tract plan's on a fixed set of probe inputs
/// (zeros, and pseudo-random inputs inside and beyond the usual feature range): within 1e-4
/// (summation order, softmax) for float models, 1e-3 for int8 ones, whose integer arithmetic
/// is the same; should a requantisation tie round apart from tract's, the model stays in
/// tract.
fn agrees_with_tract(d: &DenseNet, plan: &Plan, input_len: usize) -> bool {
    let tol = if d.is_int8() { 1e-3 } else { 1e-4 };
    let probes: Vec<Vec<f32>> = (0..6u32)
        .map(|p| {
            (0..input_len)
                .map(|i| match p {
                    0 => 0.0,
                    _ => {
                        let h = (i as u32)
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(p * 40_503);
                        (h % 2001) as f32 / 1000.0 - 1.0 + (p as f32 - 3.0) * 0.5
                    }
                })
                .collect()
        })
        .collect();
    probes
        .iter()
        .all(|x| match (d.predict(x), run(plan, x, 1, input_len)) {
            (Ok(a), Ok(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(&b)
                        .all(|(u, v)| (u - v).abs() <= tol * (1.0 + v.abs()))
            }
            _ => false,
        })
}

fn run(plan: &Plan, x: &[f32], n: usize, input_len: usize) -> Result<Vec<f32>, ModelError> {
    let input =
        tract_onnx::prelude::Tensor::from_shape(&[n, input_len], x).map_err(ModelError::tract)?;
    let out = plan.run(tvec!(input.into())).map_err(ModelError::tract)?;
    first_output(&out)
}

/// The values of a run's first output.
fn first_output(out: &[TValue]) -> Result<Vec<f32>, ModelError> {
    let first = out
        .first()
        .ok_or_else(|| ModelError::Tract("model has no output".into()))?;
    let view = first.try_as_plain_ram().map_err(ModelError::tract)?;
    Ok(view.as_slice::<f32>().map_err(ModelError::tract)?.to_vec())
}

/// Index of the largest value (first on ties); `None` for an empty slice.
pub fn argmax(p: &[f32]) -> Option<usize> {
    p.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// Share of samples whose most probable class is the label (0 for an empty set).
pub fn accuracy(c: &Classifier, ds: &Dataset) -> Result<f32, ModelError> {
    if ds.is_empty() {
        return Ok(0.0);
    }
    const CHUNK: usize = 256;
    let k = c.classes().len();
    let mut correct = 0usize;
    let mut start = 0;
    while start < ds.len() {
        let end = (start + CHUNK).min(ds.len());
        let probs =
            c.predict_batch(&ds.x[start * ds.input_len..end * ds.input_len], end - start)?;
        for (row, &y) in probs.chunks(k.max(1)).zip(&ds.y[start..end]) {
            if argmax(row) == Some(y as usize) {
                correct += 1;
            }
        }
        start = end;
    }
    Ok(correct as f32 / ds.len() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Task;

    #[test]
    fn classifier_is_send_sync_and_runs() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Classifier>();
        let model = OnnxModel::build_mlp(&Task::Digits.default_spec(), 5);
        let c = Classifier::new(&model).unwrap();
        assert_eq!(c.classes().len(), 10);
        let x: Vec<f32> = (0..64).map(|i| (i % 17) as f32 / 16.0).collect();
        let p = c.predict(&x).unwrap();
        assert_eq!(p.len(), 10);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let mut xs = x.clone();
        xs.extend(x.iter().map(|v| 1.0 - v));
        xs.extend(&x);
        let pb = c.predict_batch(&xs, 3).unwrap();
        assert_eq!(pb.len(), 30);
        for (a, b) in p.iter().zip(&pb[..10]) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(&pb[..10], &pb[20..]);
        assert!(c.predict(&x[..10]).is_err());
        assert!(c.predict_batch(&xs, 2).is_err());
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), Some(1));
    }

    #[test]
    fn pooled_predict_matches_fresh_state_bit_for_bit() {
        let spec = crate::onnx::MlpSpec {
            hidden: vec![16, 8],
            ..Task::Digits.default_spec()
        };
        let c = Classifier::with_engine(&OnnxModel::build_mlp(&spec, 11), Engine::Tract).unwrap();
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| {
                (0..64)
                    .map(|i| ((i * 7 + r * 13) % 23) as f32 / 11.0 - 1.0)
                    .collect()
            })
            .collect();
        let fresh: Vec<Vec<f32>> = rows
            .iter()
            .map(|x| run(&c.single, x, 1, 64).unwrap())
            .collect();
        assert_ne!(fresh[0], fresh[1]);
        // Reused states and input tensors: every call sees its own input, nothing leaks over.
        for _ in 0..3 {
            for (x, want) in rows.iter().zip(&fresh) {
                assert_eq!(&c.predict(x).unwrap(), want);
                assert_eq!(&c.predict_batch(x, 1).unwrap(), want);
            }
        }
        assert_eq!(c.pool.0.lock().unwrap().len(), 1);
        // Concurrent callers (and a clone sharing the pool) each get a state of their own.
        let c2 = c.clone();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (c, rows, fresh) = (if t % 2 == 0 { &c } else { &c2 }, &rows, &fresh);
                s.spawn(move || {
                    for i in 0..200 {
                        let k = (i + t) % rows.len();
                        assert_eq!(&c.predict(&rows[k]).unwrap(), &fresh[k]);
                    }
                });
            }
        });
        let pooled = c.pool.0.lock().unwrap().len();
        assert!((1..=MAX_POOLED_STATES).contains(&pooled), "{pooled}");
        // More threads than slots: the newest threads' slots stay, the oldest go.
        let mut last = None;
        for _ in 0..MAX_POOLED_STATES + 3 {
            last = Some(
                std::thread::scope(|s| {
                    s.spawn(|| {
                        assert_eq!(c.predict(&rows[2]).unwrap(), fresh[2]);
                        std::thread::current().id()
                    })
                    .join()
                })
                .unwrap(),
            );
        }
        let threads: Vec<ThreadId> = c.pool.0.lock().unwrap().iter().map(|s| s.thread).collect();
        assert_eq!(threads.len(), MAX_POOLED_STATES);
        assert_eq!(threads.last().copied(), last);
        assert!(c.predict(&rows[0][..63]).is_err());
        assert_eq!(c.predict(&rows[0]).unwrap(), fresh[0]);
    }

    #[test]
    fn batch1_plan_has_no_reshapes_and_matches_plain_plan() {
        let spec = crate::onnx::MlpSpec {
            hidden: vec![24, 12],
            ..Task::Digits.default_spec()
        };
        let mut model = OnnxModel::build_mlp(&spec, 3);
        // Non-zero biases, as after training (zero ones are folded away by tract).
        let mut w = model.weights();
        for (name, t) in w.iter_mut() {
            if name.ends_with("bias") {
                for (i, v) in t.data.iter_mut().enumerate() {
                    *v = (i % 5) as f32 * 0.03 - 0.06;
                }
            }
        }
        model.set_weights(&w).unwrap();
        let c = Classifier::new(&model).unwrap();
        let ops: Vec<String> = c
            .single
            .model()
            .nodes
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        assert!(!ops.iter().any(|o| o == "IntoShape"), "{ops:?}");
        assert_eq!(
            ops.iter().filter(|o| *o == "OptMatMul").count(),
            3,
            "{ops:?}"
        );
        // Same probabilities as tract's default pipeline with the batch fixed to 1 up front.
        let plain = tract_onnx::onnx()
            .model_for_proto_model(model.proto())
            .and_then(|m| m.with_input_fact(0, f32::fact([1, 64]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .unwrap();
        for r in 0..4 {
            let x: Vec<f32> = (0..64)
                .map(|i| ((i * 5 + r * 11) % 19) as f32 / 9.0 - 1.0)
                .collect();
            let want = run(&plain, &x, 1, 64).unwrap();
            let got = c.predict(&x).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6, "{got:?} vs {want:?}");
            }
        }
    }
}
