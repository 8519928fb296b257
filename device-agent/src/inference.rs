//! The current classifier and its atomic hot-swap, and turning one sample into
//! an [`Event`] verdict. Inference itself is synchronous: callers run it on
//! `spawn_blocking`.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use hearth_model::{Classifier, Dataset, OnnxModel, TaskSpec};
use hearth_proto::mqtt::Event;

use crate::state::sha256_hex;
use crate::Error;

/// A loaded model version, ready for inference and as a training base.
pub struct Loaded {
    /// Federated model name.
    pub name: String,
    /// Global version (0 for a model that did not come from the coordinator).
    pub version: u64,
    /// Whether this is a coordinator-published version.
    pub global: bool,
    /// Distilled on the device from `version` when idle ([`crate::distill`]): the model in
    /// use, never a training base (rounds start from the stored global version).
    pub distilled: bool,
    /// SHA-256 of the ONNX bytes.
    pub sha256: String,
    /// The ONNX graph (training base, weights by name).
    pub onnx: OnnxModel,
    /// The inference plan.
    pub classifier: Classifier,
    /// The task file with the front end this model carries ([`TaskSpec::with_model`]): what
    /// live windows are preprocessed with while this model is in use. Set by [`Loaded::adopt`].
    pub task: Option<Arc<TaskSpec>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("global", &self.global)
            .field("distilled", &self.distilled)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Loaded {
    /// Builds the inference plan for `onnx` (CPU work: call off the async runtime).
    pub fn new(name: &str, version: u64, global: bool, onnx: OnnxModel) -> Result<Loaded, Error> {
        let classifier = Classifier::new(&onnx)?;
        let sha256 = sha256_hex(&onnx.to_bytes());
        Ok(Loaded {
            name: name.to_string(),
            version,
            global,
            distilled: false,
            sha256,
            onnx,
            classifier,
            task: None,
        })
    }

    /// Parses ONNX bytes and builds the plan (CPU work).
    pub fn from_bytes(
        name: &str,
        version: u64,
        global: bool,
        bytes: &[u8],
    ) -> Result<Loaded, Error> {
        let onnx = OnnxModel::from_bytes(bytes)?;
        let classifier = Classifier::new(&onnx)?;
        Ok(Loaded {
            name: name.to_string(),
            version,
            global,
            distilled: false,
            sha256: sha256_hex(bytes),
            onnx,
            classifier,
            task: None,
        })
    }

    /// The engine serving per-event inference (Hearth's dense engine or tract).
    pub fn engine(&self) -> hearth_model::Engine {
        self.classifier.engine()
    }

    /// `name@version`, the model tag carried by events.
    pub fn tag(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Class labels of the model.
    pub fn classes(&self) -> &[String] {
        self.classifier.classes()
    }

    /// Refuses a model whose input size or class list differs from the local data.
    pub fn check_compatible(&self, data: &Dataset) -> Result<(), Error> {
        if self.onnx.input_len() != data.input_len {
            return Err(Error::Protocol(format!(
                "model {} takes {} inputs, the local {} data has {}",
                self.tag(),
                self.onnx.input_len(),
                data.task,
                data.input_len
            )));
        }
        if self.classifier.classes() != data.classes.as_slice() {
            return Err(Error::Protocol(format!(
                "model {} classes {:?} differ from the data set's {:?}",
                self.tag(),
                self.classifier.classes(),
                data.classes
            )));
        }
        Ok(())
    }

    /// Adopts the model for `task`: the task file with the fitted front end the model
    /// carries (MiniRocket's, ONNX metadata), so that the device preprocesses with the very
    /// values the model was trained on. A model whose front end does not fit the task file is
    /// refused; one without any (made before front ends travelled) gets the task's own fit.
    pub fn adopt(&mut self, task: &TaskSpec) -> Result<(), Error> {
        if task.has_front_end() && self.onnx.meta(hearth_model::minirocket::META_KEY).is_none() {
            // A model from before front ends travelled with it: the task's own fit (the fit
            // is deterministic, so it is the one the model was trained with if the data is).
            tracing::warn!(
                model = %self.tag(),
                "the model carries no fitted front end: using the task file's, fitted on its train split"
            );
            self.task = Some(Arc::new(task.clone()));
            return Ok(());
        }
        let t = task.with_model(&self.onnx).map_err(|e| {
            Error::Protocol(format!(
                "model {} does not fit the task file: {e}",
                self.tag()
            ))
        })?;
        self.task = Some(Arc::new(t));
        Ok(())
    }

    /// Classifies one preprocessed sample into a validated event (CPU work).
    pub fn verdict(&self, input: &[f32], at: SystemTime) -> Result<Event, Error> {
        let probs = self.classifier.predict(input)?;
        let (best, score) = probs
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, p)| p.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .ok_or_else(|| Error::Protocol("classifier returned no finite probability".into()))?;
        let class = self
            .classes()
            .get(best)
            .cloned()
            .ok_or_else(|| Error::Protocol(format!("class index {best} has no label")))?;
        let ev = Event {
            class,
            score: score.clamp(0.0, 1.0),
            model: self.tag(),
            ts: humantime::format_rfc3339_millis(at).to_string(),
            id: None,
            kind: None,
        };
        ev.validate()
            .map_err(|e| Error::Protocol(format!("refusing to publish an invalid event: {e}")))?;
        Ok(ev)
    }
}

/// The model in use, swapped atomically: readers clone the inner `Arc` and keep
/// using that version for the sample at hand, so a swap never drops a verdict.
#[derive(Debug)]
pub struct ModelSlot {
    inner: RwLock<Arc<Loaded>>,
}

impl ModelSlot {
    /// A slot holding `l`.
    pub fn new(l: Loaded) -> ModelSlot {
        ModelSlot {
            inner: RwLock::new(Arc::new(l)),
        }
    }

    /// The model in use now.
    pub fn current(&self) -> Arc<Loaded> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs `l`; returns the previous model.
    pub fn swap(&self, l: Arc<Loaded>) -> Arc<Loaded> {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *g, l)
    }
}
