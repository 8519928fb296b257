//! Tasks defined by a file, not by code: a TOML task file names the task, its classes and
//! event name, the input (a window of one or several channels, an image, or a feature
//! vector), the preprocessing chain, the model family and size, and where the labelled data
//! comes from (paths relative to the task file; formats in [`crate::formats`]).
//!
//! ```toml
//! name = "gunpoint"
//! classes = ["gun", "point"]
//! event = "gesture"                  # event name the agent publishes (default: the task name)
//! [input]
//! kind = "series"                    # series | image | vector
//! channels = 1
//! length = 150                       # omit for variable-length series
//! [[preprocess]]
//! step = "znorm"                     # resample, pad, znorm, scale, plaid_features, channel_stats
//! [model]
//! family = "mlp"
//! hidden = [32]                      # [] = a linear head
//! weight_decay = 0.0                 # L2 in every training of this model (default 0)
//! [data]
//! format = "ts"                      # ts | csv | npy | npz
//! labels = ["1", "2"]                # the file's label of each class ("name": class names, "index": class ids)
//! train = "GunPoint_TRAIN.ts"
//! test = "GunPoint_TEST.ts"
//! ```
//!
//! [`TaskSpec::from_file`] parses and validates (errors name the file and the field);
//! [`TaskSpec::preprocess`] turns one raw sample into the model input, the same function at
//! training and on the device; [`TaskSpec::load`] reads a split into a [`Dataset`].

use crate::data::{resample, Dataset, Split};
use crate::formats::{self, csv::CsvOptions, npy::NpyArray, FormatError, RawSet};
use crate::minirocket::{self, MiniRocket};
use crate::onnx::MlpSpec;
use crate::onnx::OnnxModel;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// A task file that cannot be read, parsed, validated, or whose data is malformed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The task file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The task file is not valid TOML for a task (the message names line and key).
    #[error("{}: {message}", path.display())]
    Syntax {
        /// The task file.
        path: PathBuf,
        /// toml's message.
        message: String,
    },
    /// A field has an invalid value.
    #[error("{}: field `{field}`: {message}", path.display())]
    Field {
        /// The task file.
        path: PathBuf,
        /// The field, e.g. `preprocess[1].length`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A data file is malformed or does not fit the task.
    #[error(transparent)]
    Data(#[from] FormatError),
}

/// What one sample is, before preprocessing.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// A window of `channels` series of `length` samples (`None`: variable length).
    Series {
        /// Number of channels.
        #[serde(default = "one")]
        channels: usize,
        /// Fixed length of every channel, when the data has one.
        length: Option<usize>,
    },
    /// A `height` × `width` image with `channels` planes (row-major, planes one after another).
    Image {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// Planes (1: grey).
        #[serde(default = "one")]
        channels: usize,
    },
    /// A feature vector of `length` values.
    Vector {
        /// Number of values.
        length: usize,
    },
}

fn one() -> usize {
    1
}

impl Input {
    /// Channels per sample.
    pub fn channels(&self) -> usize {
        match *self {
            Input::Series { channels, .. } | Input::Image { channels, .. } => channels,
            Input::Vector { .. } => 1,
        }
    }

    /// Required length of every channel, if fixed.
    pub fn length(&self) -> Option<usize> {
        match *self {
            Input::Series { length, .. } => length,
            Input::Image { height, width, .. } => Some(height.saturating_mul(width)),
            Input::Vector { length } => Some(length),
        }
    }
}

/// A per-channel divisor: one for every channel, or one per channel.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Divisor {
    /// The same for every channel.
    All(f32),
    /// One per channel.
    PerChannel(Vec<f32>),
}

/// One preprocessing step; each maps every channel (or, for the feature front ends, the
/// series) to new values. The chain runs in order; the channels are then concatenated.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Linear interpolation onto `length` points spanning the first to the last sample.
    Resample {
        /// Output length.
        length: usize,
    },
    /// Truncate, or pad at the end with `value`, to `length`.
    Pad {
        /// Output length.
        length: usize,
        /// Padding value.
        #[serde(default)]
        value: f32,
    },
    /// Per-series, per-channel z-normalisation: `(x - mean) / (std + eps)` (population std).
    Znorm {
        /// Added to the standard deviation.
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// Per-channel scaling `x / divide`, then optionally clamped to `[lo, hi]`.
    Scale {
        /// Divisor, one for all channels or one per channel.
        divide: Divisor,
        /// Optional `[lo, hi]` clamp after dividing.
        clamp: Option<[f32; 2]>,
    },
    /// The PLAID smart-plug front end ([`plaid_features`]) of a single-channel series:
    /// `length` z-normalised points, log level, log length and `length / 2 + 1` log DFT
    /// magnitudes.
    PlaidFeatures {
        /// Resampled length.
        length: usize,
        /// Current scale of the level feature.
        level_scale: f32,
        /// Reference length of the length feature.
        ref_len: f32,
    },
    /// Per channel, [`CHANNEL_STATS`] summary statistics in place of the series.
    ChannelStats,
    /// The MiniRocket front end ([`crate::minirocket`]) over the fixed-length window of every
    /// channel: `features` (rounded down to a multiple of 84) standardised PPV features of
    /// fixed random convolutions. Its biases and standardisation are fitted on the train
    /// split (the first time a model is built) and then travel with the model
    /// ([`TaskSpec::with_model`], [`TaskSpec::stamp`]). Must be the last step.
    Minirocket {
        /// Number of features (a multiple of 84; rounded down, at least 84).
        #[serde(default = "default_features")]
        features: usize,
        /// Seed of the random structure and of the fitting.
        #[serde(default)]
        seed: u64,
        /// Train samples the standardisation is fitted on.
        #[serde(default = "default_fit_samples")]
        fit_samples: usize,
    },
}

fn default_features() -> usize {
    1008
}

fn default_fit_samples() -> usize {
    512
}

fn default_eps() -> f64 {
    1e-8
}

/// Names of the statistics [`Step::ChannelStats`] computes per channel, in order.
/// Most values one sample may hold at any point of the preprocessing chain (channels ×
/// length, 4 Mi: 16 MiB of `f32`): what a task file can make every agent allocate per
/// sample is bounded, and the shape arithmetic cannot overflow.
pub const MAX_SAMPLE_VALUES: usize = 1 << 22;

pub const CHANNEL_STATS: [&str; 8] = [
    "mean",
    "std",
    "min",
    "max",
    "mean_abs_diff",
    "std_diff",
    "skewness",
    "crossings",
];

/// The model family and its size.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelFamily {
    /// Fully connected ReLU layers of the given widths, then one logit per class.
    Mlp {
        /// Hidden widths.
        hidden: Vec<usize>,
        /// L2 weight decay of every training of this model (local rounds, bootstrap,
        /// distillation); 0 (default) = off. Wanted by a linear head on many features and
        /// few samples (MiniRocket on GunPoint: 0.3).
        #[serde(default)]
        weight_decay: f32,
    },
}

/// Data file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// UCR/UEA `.ts`.
    Ts,
    /// CSV ([`crate::formats::csv`]).
    Csv,
    /// `.npy` samples plus a `.npy` of integer class ids.
    Npy,
    /// `.npz` with the samples and class ids as two arrays.
    Npz,
}

/// How the labels in the files map to classes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Labels {
    /// `"name"`: the class names; `"index"`: class ids 0, 1, ….
    Mode(String),
    /// The file's label of each class, in class order.
    Map(Vec<String>),
}

/// Where the labelled data comes from.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// File format.
    pub format: Format,
    /// Train split (relative to the task file).
    pub train: PathBuf,
    /// Test split (relative to the task file).
    pub test: Option<PathBuf>,
    /// `npy`: the class ids of the train split.
    pub train_labels: Option<PathBuf>,
    /// `npy`: the class ids of the test split.
    pub test_labels: Option<PathBuf>,
    /// `npz`: the samples array.
    #[serde(default = "default_x")]
    pub x_key: String,
    /// `npz`: the class-id array.
    #[serde(default = "default_y")]
    pub y_key: String,
    /// `csv`: the first line is a header.
    #[serde(default = "yes")]
    pub header: bool,
    /// `csv` with a header: the label column.
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// Label mapping (default: class names; `npy`/`npz`: class ids).
    pub labels: Option<Labels>,
}

fn default_x() -> String {
    "x".into()
}
fn default_y() -> String {
    "y".into()
}
fn yes() -> bool {
    true
}
fn default_label_column() -> String {
    "label".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: String,
    description: Option<String>,
    classes: Vec<String>,
    event: Option<String>,
    input: Input,
    #[serde(default)]
    preprocess: Vec<Step>,
    model: ModelFamily,
    data: DataSource,
}

/// A validated task file.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSpec {
    /// The task file (data paths are relative to its directory).
    pub path: PathBuf,
    /// Task name (ONNX metadata `hearth.task`, model name by default).
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Class names, class-id order (ONNX metadata `hearth.classes`).
    pub classes: Vec<String>,
    /// Name of the events the agent publishes (`hearth/<device>/event/<event>`).
    pub event: String,
    /// What a raw sample is.
    pub input: Input,
    /// The preprocessing chain.
    pub preprocess: Vec<Step>,
    /// The model family and size.
    pub model: ModelFamily,
    /// The labelled data.
    pub data: DataSource,
    input_len: usize,
    /// The fitted MiniRocket front end, when the chain ends in one (fitted on first use or
    /// taken from a model; shared by clones).
    front: FrontCell,
}

/// The fitted front end of a [`TaskSpec`]: fitted state, not part of the task's identity
/// (equal task files compare equal whether or not one of them was fitted yet).
#[derive(Clone, Default)]
struct FrontCell(Arc<OnceLock<Arc<MiniRocket>>>);

impl PartialEq for FrontCell {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for FrontCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "fitted"
        } else {
            "unfitted"
        })
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl TaskSpec {
    /// Reads and validates a task file.
    pub fn from_file(path: &Path) -> Result<TaskSpec, TaskError> {
        let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        TaskSpec::from_toml_str(&text, path)
    }

    /// The task named `task`: a path to a task file (it ends in `.toml` or names an existing
    /// file), else the name of a set in `data_dir`, `<data_dir>/<task>/task.toml`. For a
    /// vendored set (plaid, faces, digits) whose directory has no task file (a data directory
    /// vendored before task files), the task file built into Hearth is used, its data read
    /// from `<data_dir>/<task>/` as before.
    pub fn resolve(task: &str, data_dir: &Path) -> Result<TaskSpec, TaskError> {
        let direct = Path::new(task);
        if task.ends_with(".toml") || direct.is_file() {
            return TaskSpec::from_file(direct);
        }
        let file = data_dir.join(task).join("task.toml");
        match task.parse::<crate::data::Task>() {
            Ok(builtin) if !file.exists() => Ok(TaskSpec {
                path: file,
                ..builtin.spec()
            }),
            _ => TaskSpec::from_file(&file),
        }
    }

    /// Parses and validates task-file text; `path` locates the data files and names errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<TaskSpec, TaskError> {
        let f: TaskFile = toml::from_str(text).map_err(|e| TaskError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let field = |field: &str, message: String| TaskError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if !valid_name(&f.name) {
            return Err(field(
                "name",
                format!("{:?}: use 1-64 characters of [A-Za-z0-9_.-]", f.name),
            ));
        }
        if f.classes.len() < 2 {
            return Err(field("classes", "at least two classes".into()));
        }
        for (i, c) in f.classes.iter().enumerate() {
            if c.trim().is_empty() || c.contains(',') || c.trim() != c {
                return Err(field(
                    &format!("classes[{i}]"),
                    format!("{c:?}: non-empty, no commas, no surrounding spaces"),
                ));
            }
            if f.classes[..i].contains(c) {
                return Err(field(
                    &format!("classes[{i}]"),
                    format!("{c:?} appears twice"),
                ));
            }
        }
        let event = f.event.unwrap_or_else(|| f.name.clone());
        if !valid_name(&event) {
            return Err(field(
                "event",
                format!("{event:?}: use 1-64 characters of [A-Za-z0-9_.-]"),
            ));
        }
        let (channels, length) = (f.input.channels(), f.input.length());
        if channels == 0
            || length == Some(0)
            || matches!(
                f.input,
                Input::Image { height: 0, .. } | Input::Image { width: 0, .. }
            )
        {
            return Err(field("input", "sizes must be at least 1".into()));
        }
        // Every step's output (and the input) holds at most MAX_SAMPLE_VALUES values.
        let too_big = |(c, l): (usize, Option<usize>)| {
            c.checked_mul(l.unwrap_or(1))
                .is_none_or(|n| n > MAX_SAMPLE_VALUES)
        };
        if too_big((channels, length)) {
            return Err(field(
                "input",
                format!("more than {MAX_SAMPLE_VALUES} values per sample"),
            ));
        }
        // Shape inference through the chain: (channels, length per channel).
        let mut shape = (channels, length);
        for (i, step) in f.preprocess.iter().enumerate() {
            let at = |name: &str| format!("preprocess[{i}].{name}");
            shape = match step {
                Step::Resample { length } | Step::Pad { length, .. } => {
                    if *length == 0 {
                        return Err(field(&at("length"), "must be at least 1".into()));
                    }
                    if too_big((shape.0, Some(*length))) {
                        return Err(field(
                            &at("length"),
                            format!("more than {MAX_SAMPLE_VALUES} values per sample"),
                        ));
                    }
                    (shape.0, Some(*length))
                }
                Step::Znorm { eps } => {
                    if !(eps.is_finite() && *eps >= 0.0) {
                        return Err(field(&at("eps"), "must be finite and >= 0".into()));
                    }
                    shape
                }
                Step::Scale { divide, clamp } => {
                    let d: &[f32] = match divide {
                        Divisor::All(d) => std::slice::from_ref(d),
                        Divisor::PerChannel(d) => {
                            if d.len() != shape.0 {
                                return Err(field(
                                    &at("divide"),
                                    format!("{} divisors for {} channels", d.len(), shape.0),
                                ));
                            }
                            d
                        }
                    };
                    if d.iter().any(|v| !v.is_finite() || *v == 0.0) {
                        return Err(field(&at("divide"), "must be finite and non-zero".into()));
                    }
                    if let Some([lo, hi]) = clamp {
                        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                            return Err(field(&at("clamp"), "[lo, hi] with lo <= hi".into()));
                        }
                    }
                    shape
                }
                Step::PlaidFeatures {
                    length,
                    level_scale,
                    ref_len,
                } => {
                    if shape.0 != 1 {
                        return Err(field(
                            &at("step"),
                            format!(
                                "plaid_features takes one channel, the input has {}",
                                shape.0
                            ),
                        ));
                    }
                    if *length < 2 {
                        return Err(field(&at("length"), "must be at least 2".into()));
                    }
                    // Its output is ~1.5 × length values.
                    if *length > MAX_SAMPLE_VALUES / 2 {
                        return Err(field(
                            &at("length"),
                            format!("at most {}", MAX_SAMPLE_VALUES / 2),
                        ));
                    }
                    if !(level_scale.is_finite() && *level_scale > 0.0) {
                        return Err(field(&at("level_scale"), "must be > 0".into()));
                    }
                    if !(ref_len.is_finite() && *ref_len > 0.0) {
                        return Err(field(&at("ref_len"), "must be > 0".into()));
                    }
                    (1, Some(length + 2 + length / 2 + 1))
                }
                Step::ChannelStats => (shape.0, Some(CHANNEL_STATS.len())),
                Step::Minirocket {
                    features,
                    fit_samples,
                    ..
                } => {
                    if i + 1 != f.preprocess.len() {
                        return Err(field(
                            &at("step"),
                            "minirocket must be the last step".into(),
                        ));
                    }
                    let Some(len) = shape.1 else {
                        return Err(field(
                            &at("step"),
                            "minirocket needs a fixed length: resample or pad first".into(),
                        ));
                    };
                    if len < 9 {
                        return Err(field(
                            &at("step"),
                            format!("minirocket needs at least 9 points per channel, not {len}"),
                        ));
                    }
                    if *features == 0 || *features > 100_000 {
                        return Err(field(&at("features"), "1..=100000".into()));
                    }
                    if *fit_samples == 0 {
                        return Err(field(&at("fit_samples"), "must be at least 1".into()));
                    }
                    (1, Some(minirocket::output_len(*features)))
                }
            };
        }
        if too_big(shape) {
            return Err(field(
                "preprocess",
                format!("more than {MAX_SAMPLE_VALUES} values per sample"),
            ));
        }
        let input_len = match shape {
            (c, Some(l)) => c * l,
            (_, None) => {
                return Err(field(
                    "preprocess",
                    "variable-length input: the chain must fix the length (resample, pad, \
                     plaid_features or channel_stats)"
                        .into(),
                ))
            }
        };
        let ModelFamily::Mlp {
            hidden,
            weight_decay,
        } = &f.model;
        if hidden.contains(&0) {
            return Err(field("model.hidden", "widths must be at least 1".into()));
        }
        if !(weight_decay.is_finite() && (0.0..=100.0).contains(weight_decay)) {
            return Err(field(
                "model.weight_decay",
                format!("{weight_decay}: must be in [0, 100]"),
            ));
        }
        match &f.data.labels {
            Some(Labels::Mode(m)) if m != "name" && m != "index" => {
                return Err(field(
                    "data.labels",
                    format!("{m:?}: \"name\", \"index\" or a list"),
                ))
            }
            Some(Labels::Map(m)) if m.len() != f.classes.len() => {
                return Err(field(
                    "data.labels",
                    format!("{} labels for {} classes", m.len(), f.classes.len()),
                ))
            }
            _ => {}
        }
        if f.data.format == Format::Npy && f.data.train_labels.is_none() {
            return Err(field(
                "data.train_labels",
                "required with format = \"npy\"".into(),
            ));
        }
        if f.data.format == Format::Npy && f.data.test.is_some() && f.data.test_labels.is_none() {
            return Err(field(
                "data.test_labels",
                "required with format = \"npy\" and a test split".into(),
            ));
        }
        Ok(TaskSpec {
            path: path.to_path_buf(),
            name: f.name,
            description: f.description,
            classes: f.classes,
            event,
            input: f.input,
            preprocess: f.preprocess,
            model: f.model,
            data: f.data,
            input_len,
            front: FrontCell::default(),
        })
    }

    /// Length of the model input (after the preprocessing chain).
    pub fn input_len(&self) -> usize {
        self.input_len
    }

    /// The model the task file asks for, with the task's name and classes.
    pub fn mlp_spec(&self) -> MlpSpec {
        let ModelFamily::Mlp { hidden, .. } = &self.model;
        MlpSpec {
            task: self.name.clone(),
            input_len: self.input_len,
            hidden: hidden.clone(),
            classes: self.classes.clone(),
        }
    }

    /// The L2 weight decay every training of this task's model uses (0 = off).
    pub fn weight_decay(&self) -> f32 {
        let ModelFamily::Mlp { weight_decay, .. } = &self.model;
        *weight_decay
    }

    /// Turns one raw sample (one value vector per channel, missing values NaN; or one vector
    /// holding every channel one after another) into the model input.
    ///
    /// Missing values: trailing ones are dropped (unequal-length padding), the others are
    /// linearly interpolated from their neighbours (a channel with no value becomes empty).
    /// Inputs with a fixed length (images, vectors, fixed-length series) must have it.
    pub fn preprocess(&self, raw: &[Vec<f32>]) -> Result<Vec<f32>, String> {
        let front = self.minirocket_step();
        let chans = self.chain(raw, front.map_or(self.preprocess.len(), |(i, _)| i))?;
        match front {
            None => Ok(chans.concat()),
            Some(_) => {
                let fe = self.front_end().map_err(|e| e.to_string())?;
                fe.transform(&chans.concat())
                    .ok_or_else(|| "window size differs from the front end's".to_string())
            }
        }
    }

    /// The MiniRocket step, if the chain has one (always the last).
    fn minirocket_step(&self) -> Option<(usize, &Step)> {
        self.preprocess
            .iter()
            .enumerate()
            .find(|(_, s)| matches!(s, Step::Minirocket { .. }))
    }

    /// Whether the chain ends in a fitted front end (MiniRocket) that travels with the model.
    pub fn has_front_end(&self) -> bool {
        self.minirocket_step().is_some()
    }

    /// The fitted MiniRocket front end: the one taken from a model ([`TaskSpec::with_model`]),
    /// else fitted on the train split (once per process and task: the fit is deterministic,
    /// so every binary that fits computes the same one).
    pub fn front_end(&self) -> Result<Arc<MiniRocket>, TaskError> {
        if let Some(f) = self.front.0.get() {
            return Ok(f.clone());
        }
        let Some((
            at,
            Step::Minirocket {
                features,
                seed,
                fit_samples,
            },
        )) = self.minirocket_step()
        else {
            return Err(TaskError::Field {
                path: self.path.clone(),
                field: "preprocess".into(),
                message: "the chain has no minirocket step".into(),
            });
        };
        static FITTED: OnceLock<Mutex<HashMap<String, Arc<MiniRocket>>>> = OnceLock::new();
        let key = format!(
            "{}|{:?}|{:?}|{:?}",
            self.path.display(),
            self.data,
            self.input,
            self.preprocess
        );
        let cache = FITTED.get_or_init(Mutex::default);
        let cached = cache.lock().ok().and_then(|c| c.get(&key).cloned());
        let fe = match cached {
            Some(f) => f,
            None => {
                let (raw, file) = self.read_raw(Split::Train)?;
                let mut samples = Vec::with_capacity(raw.samples.len());
                for (i, s) in raw.samples.iter().enumerate() {
                    let chans = self.chain(s, at).map_err(|m| {
                        FormatError::new(&file, None, format!("series {}: {m}", i + 1))
                    })?;
                    samples.push(chans.concat());
                }
                if samples.is_empty() {
                    return Err(FormatError::new(&file, None, "no samples").into());
                }
                let length = samples[0].len() / self.input.channels();
                let f = Arc::new(MiniRocket::fit(
                    &samples,
                    self.input.channels(),
                    length,
                    *features,
                    *seed,
                    *fit_samples,
                ));
                if let Ok(mut c) = cache.lock() {
                    c.insert(key, f.clone());
                }
                f
            }
        };
        let _ = self.front.0.set(fe);
        Ok(self.front.0.get().cloned().expect("set above"))
    }

    /// This task with the front end `model` carries (ONNX metadata
    /// [`minirocket::META_KEY`]), so no training data is needed to compute its features. A
    /// task without a front end is returned as it is; a model whose front end is missing or
    /// does not fit the task file (channels, length, features, seed) is an error.
    pub fn with_model(&self, model: &OnnxModel) -> Result<TaskSpec, TaskError> {
        let meta = model.meta(minirocket::META_KEY);
        let err = |message: String| TaskError::Field {
            path: self.path.clone(),
            field: "preprocess".into(),
            message,
        };
        let Some((at, Step::Minirocket { features, seed, .. })) = self.minirocket_step() else {
            return match meta {
                None => Ok(self.clone()),
                Some(_) => Err(err(
                    "the model carries a minirocket front end, the task file has none".into(),
                )),
            };
        };
        let meta = meta.ok_or_else(|| {
            err(
                "the model carries no fitted minirocket front end (metadata hearth.minirocket)"
                    .into(),
            )
        })?;
        let fe = MiniRocket::from_meta(meta).map_err(err)?;
        let length = self.chain_len(at);
        if fe.channels != self.input.channels()
            || Some(fe.length) != length
            || fe.features != minirocket::output_len(*features)
            || fe.seed != *seed
        {
            return Err(err(format!(
                "the model's front end ({} channels x {}, {} features, seed {}) does not fit the \
                 task file's",
                fe.channels, fe.length, fe.features, fe.seed
            )));
        }
        let spec = TaskSpec {
            front: FrontCell::default(),
            ..self.clone()
        };
        let _ = spec.front.0.set(Arc::new(fe));
        Ok(spec)
    }

    /// Writes the task's fitted front end into `model`'s metadata (no-op without one).
    pub fn stamp(&self, model: &mut OnnxModel) -> Result<(), TaskError> {
        if self.has_front_end() {
            model.set_meta(minirocket::META_KEY, &self.front_end()?.to_meta());
        }
        Ok(())
    }

    /// The model the task file asks for, initialised from `seed`, with the fitted front end
    /// in its metadata.
    pub fn build_model(&self, seed: u64) -> Result<OnnxModel, TaskError> {
        let mut m = OnnxModel::build_mlp(&self.mlp_spec(), seed);
        self.stamp(&mut m)?;
        Ok(m)
    }

    /// Length per channel after the first `upto` steps (None: variable).
    fn chain_len(&self, upto: usize) -> Option<usize> {
        let mut len = self.input.length();
        for s in &self.preprocess[..upto] {
            len = match s {
                Step::Resample { length } | Step::Pad { length, .. } => Some(*length),
                Step::PlaidFeatures { length, .. } => Some(length + 2 + length / 2 + 1),
                Step::ChannelStats => Some(CHANNEL_STATS.len()),
                Step::Minirocket { features, .. } => Some(minirocket::output_len(*features)),
                _ => len,
            };
        }
        len
    }

    /// Checks one raw sample and runs the first `upto` steps of the chain.
    fn chain(&self, raw: &[Vec<f32>], upto: usize) -> Result<Vec<Vec<f32>>, String> {
        let c = self.input.channels();
        let mut chans: Vec<Vec<f32>> = if raw.len() == c {
            raw.iter().map(|ch| fill_missing(ch)).collect()
        } else if raw.len() == 1 && c > 1 && raw[0].len().is_multiple_of(c) {
            raw[0].chunks(raw[0].len() / c).map(fill_missing).collect()
        } else {
            return Err(format!("{} channels, the task input has {c}", raw.len()));
        };
        if let Some(n) = self.input.length() {
            if let Some(ch) = chans.iter().find(|ch| ch.len() != n) {
                return Err(format!("{} values per channel, expected {n}", ch.len()));
            }
        }
        if chans.iter().all(Vec::is_empty) {
            return Err("no values".into());
        }
        for step in &self.preprocess[..upto] {
            chans = apply(step, chans);
        }
        Ok(chans)
    }

    /// The file of a split, relative to the task file's directory.
    fn split_path(&self, p: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(p)
    }

    /// Reads a split and preprocesses every sample.
    pub fn load(&self, split: Split) -> Result<Dataset, TaskError> {
        let (raw, file) = self.read_raw(split)?;
        self.dataset(raw, &file)
    }

    /// The samples of a split as a feature front end sees them (the chain up to its first
    /// feature step — minirocket, plaid_features, channel_stats — or the whole chain), one `channels × length` vector each,
    /// with their class ids: the input a reference classifier is trained on.
    pub fn windows(&self, split: Split) -> Result<(Vec<Vec<f32>>, Vec<u32>), TaskError> {
        let (raw, file) = self.read_raw(split)?;
        let upto = self
            .preprocess
            .iter()
            .position(|s| {
                matches!(
                    s,
                    Step::Minirocket { .. } | Step::PlaidFeatures { .. } | Step::ChannelStats
                )
            })
            .unwrap_or(self.preprocess.len());
        let ids = self.dataset_labels(&raw, &file)?;
        let mut out = Vec::with_capacity(raw.samples.len());
        for (i, s) in raw.samples.iter().enumerate() {
            let chans = self
                .chain(s, upto)
                .map_err(|m| FormatError::new(&file, None, format!("series {}: {m}", i + 1)))?;
            out.push(chans.concat());
        }
        Ok((out, ids))
    }

    /// Reads a split as it is in the file.
    fn read_raw(&self, split: Split) -> Result<(RawSet, PathBuf), TaskError> {
        let d = &self.data;
        let (file, labels_file) = match split {
            Split::Train => (Some(&d.train), d.train_labels.as_ref()),
            Split::Test => (d.test.as_ref(), d.test_labels.as_ref()),
        };
        let file = file.ok_or_else(|| TaskError::Field {
            path: self.path.clone(),
            field: "data.test".into(),
            message: "no test split configured".into(),
        })?;
        let file = self.split_path(file);
        let raw = match d.format {
            Format::Ts => formats::ts::read(&file)?,
            Format::Csv => formats::csv::read(
                &file,
                &CsvOptions {
                    header: d.header,
                    label_column: d.label_column.clone(),
                },
            )?,
            Format::Npy => {
                let lf = self.split_path(labels_file.map_or(Path::new(""), PathBuf::as_path));
                from_arrays(formats::npy::read(&file)?, formats::npy::read(&lf)?, &file)?
            }
            Format::Npz => from_arrays(
                formats::npy::read_npz(&file, &d.x_key)?,
                formats::npy::read_npz(&file, &d.y_key)?,
                &file,
            )?,
        };
        Ok((raw, file))
    }

    /// The class id of every sample of `raw` (read from `file`).
    fn dataset_labels(&self, raw: &RawSet, file: &Path) -> Result<Vec<u32>, TaskError> {
        let numeric = matches!(self.data.format, Format::Npy | Format::Npz);
        let by_index = match &self.data.labels {
            Some(Labels::Mode(m)) => m == "index",
            Some(Labels::Map(_)) => false,
            None => numeric,
        };
        let names: &[String] = match &self.data.labels {
            Some(Labels::Map(m)) => m,
            _ => &self.classes,
        };
        let at = |i: usize| {
            let what = if numeric { "sample" } else { "series" };
            format!("{what} {}", i + 1)
        };
        let mut y = Vec::with_capacity(raw.samples.len());
        for (i, label) in raw.labels.iter().enumerate() {
            let bad = |m: String| FormatError::new(file, None, format!("{}: {m}", at(i)));
            let id = if by_index {
                label
                    .parse::<usize>()
                    .ok()
                    .filter(|&k| k < self.classes.len())
                    .ok_or_else(|| {
                        bad(format!(
                            "label {label:?} is not a class id 0..{}",
                            self.classes.len()
                        ))
                    })?
            } else {
                names
                    .iter()
                    .position(|n| n == label)
                    .ok_or_else(|| bad(format!("label {label:?} is not one of {names:?}")))?
            };
            y.push(id as u32);
        }
        if y.is_empty() {
            return Err(FormatError::new(file, None, "no samples").into());
        }
        Ok(y)
    }

    /// Maps labels to class ids and preprocesses every sample of `raw` (read from `file`).
    pub fn dataset(&self, raw: RawSet, file: &Path) -> Result<Dataset, TaskError> {
        let y = self.dataset_labels(&raw, file)?;
        let numeric = matches!(self.data.format, Format::Npy | Format::Npz);
        let mut x = Vec::with_capacity(raw.samples.len() * self.input_len);
        for (i, sample) in raw.samples.iter().enumerate() {
            let what = if numeric { "sample" } else { "series" };
            x.extend(
                self.preprocess(sample)
                    .map_err(|m| FormatError::new(file, None, format!("{what} {}: {m}", i + 1)))?,
            );
        }
        Ok(Dataset {
            task: self.name.clone(),
            classes: self.classes.clone(),
            input_len: self.input_len,
            x,
            y,
        })
    }
}

/// Samples array `(n, …)` and labels `(n,)` → a raw set; a 3-d `(n, c, l)` array gives `c`
/// channels, anything else one channel per sample.
fn from_arrays(x: NpyArray, y: NpyArray, file: &Path) -> Result<RawSet, FormatError> {
    let err = |m: String| FormatError::new(file, None, m);
    let n = *x
        .shape
        .first()
        .ok_or_else(|| err("the samples array is a scalar".into()))?;
    if y.shape != [n] {
        return Err(err(format!(
            "labels of shape {:?} for {n} samples",
            y.shape
        )));
    }
    let per = x.data.len().checked_div(n).unwrap_or(0);
    let chans = if x.shape.len() == 3 {
        x.shape[1].max(1)
    } else {
        1
    };
    let mut set = RawSet::default();
    for (i, (row, &label)) in x.data.chunks(per.max(1)).zip(&y.data).enumerate() {
        if label.fract() != 0.0 || label < 0.0 {
            return Err(err(format!(
                "sample {}: label {label} is not a class id",
                i + 1
            )));
        }
        let row: Vec<f32> = row.iter().map(|&v| v as f32).collect();
        set.samples
            .push(row.chunks(per / chans).map(<[f32]>::to_vec).collect());
        set.labels.push(format!("{label}"));
    }
    Ok(set)
}

/// Drops trailing NaNs and fills the others by linear interpolation (ends: nearest value).
fn fill_missing(x: &[f32]) -> Vec<f32> {
    let end = x.iter().rposition(|v| !v.is_nan()).map_or(0, |i| i + 1);
    let mut out = x[..end].to_vec();
    let known: Vec<usize> = (0..end).filter(|&i| !out[i].is_nan()).collect();
    if known.len() == end {
        return out;
    }
    let mut k = 0;
    for i in 0..end {
        while k + 1 < known.len() && known[k + 1] <= i {
            k += 1;
        }
        if out[i].is_nan() {
            let (a, b) = (known[k], known.get(k + 1).copied().unwrap_or(known[k]));
            out[i] = if i < a || a == b {
                out[a]
            } else {
                out[a] + (out[b] - out[a]) * ((i - a) as f32 / (b - a) as f32)
            };
        }
    }
    out
}

/// Applies one step to every channel.
fn apply(step: &Step, chans: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    match step {
        Step::Resample { length } => chans.iter().map(|c| resample(c, *length)).collect(),
        Step::Pad { length, value } => chans
            .into_iter()
            .map(|mut c| {
                c.resize(*length, *value);
                c
            })
            .collect(),
        Step::Znorm { eps } => chans.iter().map(|c| znorm(c, *eps)).collect(),
        Step::Scale { divide, clamp } => chans
            .into_iter()
            .enumerate()
            .map(|(k, c)| {
                let d = match divide {
                    Divisor::All(d) => *d,
                    Divisor::PerChannel(d) => d[k],
                };
                c.into_iter()
                    .map(|v| {
                        let v = v / d;
                        clamp.map_or(v, |[lo, hi]| v.clamp(lo, hi))
                    })
                    .collect()
            })
            .collect(),
        Step::PlaidFeatures {
            length,
            level_scale,
            ref_len,
        } => vec![plaid_features(&chans[0], *length, *level_scale, *ref_len)],
        Step::ChannelStats => chans.iter().map(|c| channel_stats(c)).collect(),
        // Needs the fitted state: applied by `TaskSpec::preprocess`, never through here.
        Step::Minirocket { .. } => chans,
    }
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// `(x - mean) / (std + eps)` with the population std.
fn znorm(x: &[f32], eps: f64) -> Vec<f32> {
    let r: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let (mean, sd) = mean_std(&r);
    r.iter().map(|v| ((v - mean) / (sd + eps)) as f32).collect()
}

/// The [`CHANNEL_STATS`] of one channel (zeros for an empty one).
fn channel_stats(x: &[f32]) -> Vec<f32> {
    if x.is_empty() {
        return vec![0.0; CHANNEL_STATS.len()];
    }
    let r: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let (mean, sd) = mean_std(&r);
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let diff: Vec<f64> = r.windows(2).map(|w| w[1] - w[0]).collect();
    let mad = diff.iter().map(|d| d.abs()).sum::<f64>() / diff.len().max(1) as f64;
    let (_, sd_diff) = mean_std(&diff);
    let skew = if sd > 0.0 {
        r.iter().map(|v| ((v - mean) / sd).powi(3)).sum::<f64>() / r.len() as f64
    } else {
        0.0
    };
    let crossings = r
        .windows(2)
        .filter(|w| (w[0] - mean) * (w[1] - mean) < 0.0)
        .count() as f64
        / r.len() as f64;
    [mean, sd, min, max, mad, sd_diff, skew, crossings]
        .iter()
        .map(|&v| v as f32)
        .collect()
}

/// The PLAID front end for a raw current series `x[0..n)` (`length + 2 + length / 2 + 1`
/// values), the recipe of the preprocessing study in `data/README.md` (test accuracy of a
/// 64-unit MLP: 0.67, against 0.40 for the resampled series divided by a constant):
/// 1. `r` = `x` linearly resampled to `length` points;
/// 2. `z = (r - mean(r)) / (std(r) + 1e-8)` (population std): the waveform's shape;
/// 3. `ln(rms(r) / level_scale + 1e-6)`: its level, over six orders of magnitude;
/// 4. `ln(n / ref_len)`: the raw length (the archive's series length carries signal);
/// 5. `ln(1 + |DFT(z)[k]|)` for `k = 0..=length / 2` (unnormalised): its harmonics.
pub fn plaid_features(x: &[f32], length: usize, level_scale: f32, ref_len: f32) -> Vec<f32> {
    let bins = length / 2 + 1;
    let r: Vec<f64> = resample(x, length).into_iter().map(f64::from).collect();
    let len = r.len() as f64;
    let mean = r.iter().sum::<f64>() / len;
    let sd = (r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / len).sqrt();
    let z: Vec<f64> = r.iter().map(|v| (v - mean) / (sd + 1e-8)).collect();
    let rms = (r.iter().map(|v| v * v).sum::<f64>() / len).sqrt();
    let mut out: Vec<f32> = Vec::with_capacity(length + 2 + bins);
    out.extend(z.iter().map(|&v| v as f32));
    out.push((rms / f64::from(level_scale) + 1e-6).ln() as f32);
    out.push((x.len().max(1) as f64 / f64::from(ref_len)).ln() as f32);
    // Real DFT by direct summation over a twiddle table (length × bins multiply-adds).
    let (cos, sin): (Vec<f64>, Vec<f64>) = (0..length)
        .map(|j| {
            let a = 2.0 * std::f64::consts::PI * j as f64 / length as f64;
            (a.cos(), a.sin())
        })
        .unzip();
    for k in 0..bins {
        let (mut re, mut im) = (0.0f64, 0.0f64);
        for (j, &v) in z.iter().enumerate() {
            let t = (j * k) % length;
            re += v * cos[t];
            im -= v * sin[t];
        }
        out.push((1.0 + (re * re + im * im).sqrt()).ln() as f32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::npy::npy_bytes as npy;

    const BASE: &str = r#"
name = "t"
classes = ["a", "b"]
[input]
kind = "series"
channels = 2
[[preprocess]]
step = "resample"
length = 4
[model]
family = "mlp"
hidden = [3]
[data]
format = "ts"
train = "train.ts"
test = "test.ts"
"#;

    fn spec(text: &str) -> Result<TaskSpec, TaskError> {
        TaskSpec::from_toml_str(text, Path::new("/x/task.toml"))
    }

    #[test]
    fn sizes_beyond_the_sample_bound_are_refused_not_overflowed() {
        // Regression: `height * width`, `channels * length` and the PLAID front end's
        // output length overflowed (a panic) on huge values, and a huge resample length made
        // preprocessing allocate whatever the file said.
        let huge = i64::MAX.to_string();
        let image = |h: &str, w: &str| {
            BASE.replace(
                "kind = \"series\"\nchannels = 2",
                &format!("kind = \"image\"\nheight = {h}\nwidth = {w}\nchannels = 1"),
            )
        };
        let cases = [
            (image(&huge, "2"), "field `input`"),
            (image("4096", "4096"), "field `input`"),
            (
                BASE.replace("channels = 2", &format!("channels = {huge}")),
                "field `input`",
            ),
            (
                BASE.replace("length = 4", "length = 4194304"),
                "field `preprocess[0].length`",
            ),
            (
                BASE.replace("length = 4", &format!("length = {huge}")),
                "field `preprocess[0].length`",
            ),
            (
                BASE.replace("channels = 2", "channels = 1").replace(
                    "step = \"resample\"\nlength = 4",
                    &format!(
                        "step = \"plaid_features\"\nlength = {huge}\nlevel_scale = 1.0\n\
                         ref_len = 1.0"
                    ),
                ),
                "field `preprocess[0].length`",
            ),
        ];
        for (text, want) in cases {
            let e = spec(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e}\n{text}");
        }
        // At the bound it parses.
        let ok = BASE.replace("length = 4", "length = 2097152");
        assert_eq!(spec(&ok).unwrap().input_len(), MAX_SAMPLE_VALUES);
    }

    #[test]
    fn a_valid_file_parses_with_its_shape() {
        let s = spec(BASE).unwrap();
        assert_eq!(s.input_len(), 8);
        assert_eq!(s.event, "t");
        assert_eq!(s.mlp_spec().hidden, [3]);
        assert_eq!(s.mlp_spec().classes, ["a", "b"]);
        assert_eq!(s.weight_decay(), 0.0);
    }

    #[test]
    fn bad_files_name_the_file_and_the_field() {
        let cases = [
            ("name = \"t\"", "name = \"a b\"", "field `name`"),
            ("[\"a\", \"b\"]", "[\"a\"]", "field `classes`"),
            ("[\"a\", \"b\"]", "[\"a\", \"a\"]", "field `classes[1]`"),
            ("[\"a\", \"b\"]", "[\"a\", \"b,c\"]", "field `classes[1]`"),
            ("length = 4", "length = 0", "field `preprocess[0].length`"),
            (
                "step = \"resample\"\nlength = 4",
                "step = \"znorm\"",
                "field `preprocess`",
            ),
            (
                "step = \"resample\"",
                "step = \"fft\"",
                "unknown variant `fft`",
            ),
            (
                "length = 4",
                "length = 4\nspeed = 2",
                "unknown field `speed`",
            ),
            ("hidden = [3]", "hidden = [0]", "field `model.hidden`"),
            (
                "hidden = [3]",
                "hidden = [3]\nweight_decay = -0.5",
                "field `model.weight_decay`",
            ),
            (
                "family = \"mlp\"",
                "family = \"cnn\"",
                "unknown variant `cnn`",
            ),
            (
                "format = \"ts\"",
                "format = \"xls\"",
                "unknown variant `xls`",
            ),
            (
                "format = \"ts\"",
                "format = \"npy\"",
                "field `data.train_labels`",
            ),
            (
                "test = \"test.ts\"",
                "test = \"test.ts\"\nlabels = \"ids\"",
                "field `data.labels`",
            ),
            (
                "test = \"test.ts\"",
                "test = \"test.ts\"\nlabels = [\"x\"]",
                "field `data.labels`",
            ),
            ("channels = 2", "channels = 0", "field `input`"),
            (
                "step = \"resample\"\nlength = 4",
                "step = \"plaid_features\"\nlength = 4\nlevel_scale = 1.0\nref_len = 4.0",
                "field `preprocess[0].step`",
            ),
            (
                "step = \"resample\"\nlength = 4",
                "step = \"scale\"\ndivide = [1.0]",
                "field `preprocess[0].divide`",
            ),
            (
                "step = \"resample\"\nlength = 4",
                "step = \"scale\"\ndivide = 0.0",
                "field `preprocess[0].divide`",
            ),
            ("[model]", "[modle]", "task.toml"),
        ];
        for (from, to, want) in cases {
            assert!(BASE.contains(from), "{from}");
            let e = spec(&BASE.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.starts_with("/x/task.toml"),
                "{to}: {e}"
            );
        }
        let e = TaskSpec::from_file(Path::new("/nonexistent/task.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/task.toml"), "{e}");
    }

    #[test]
    fn the_chain_runs_per_channel_in_order() {
        let s = spec(&BASE.replace(
            "[model]",
            "[[preprocess]]\nstep = \"scale\"\ndivide = [2.0, -1.0]\nclamp = [-3.0, 3.0]\n[model]",
        ))
        .unwrap();
        let out = s
            .preprocess(&[vec![0.0, 6.0], vec![1.0, 2.0, 3.0, 4.0]])
            .unwrap();
        assert_eq!(out, [0.0, 1.0, 2.0, 3.0, -1.0, -2.0, -3.0, -3.0]);
        // One vector holding both channels, and missing values (interior filled, trailing dropped).
        let one = s
            .preprocess(&[vec![0.0, f32::NAN, 6.0, 1.0, 4.0, f32::NAN]])
            .unwrap();
        assert_eq!(one, [0.0, 1.0, 2.0, 3.0, -1.0, -2.0, -3.0, -3.0]);
        assert!(s
            .preprocess(&[vec![1.0; 3]])
            .unwrap_err()
            .contains("1 channels"));
        assert!(s
            .preprocess(&[vec![], vec![]])
            .unwrap_err()
            .contains("no values"));
        let z =
            spec(&BASE.replace("[model]", "[[preprocess]]\nstep = \"znorm\"\n[model]")).unwrap();
        let out = z.preprocess(&[vec![1.0, 3.0], vec![5.0; 2]]).unwrap();
        let var = out[..4].iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(
            out[0] < 0.0 && out[..4].iter().sum::<f32>().abs() < 1e-6,
            "{out:?}"
        );
        assert!((var - 1.0).abs() < 1e-5, "{out:?}");
        assert_eq!(&out[4..], [0.0; 4]);
        let st = spec(&BASE.replace(
            "step = \"resample\"\nlength = 4",
            "step = \"channel_stats\"",
        ))
        .unwrap();
        assert_eq!(st.input_len(), 2 * CHANNEL_STATS.len());
        let out = st
            .preprocess(&[vec![1.0, -1.0, 1.0, -1.0], vec![2.0]])
            .unwrap();
        assert_eq!(&out[..5], [0.0, 1.0, -1.0, 1.0, 2.0]);
        assert_eq!(out[7], 0.75);
        let p = spec(&BASE.replace("step = \"resample\"", "step = \"pad\"\nvalue = 9.0")).unwrap();
        assert_eq!(
            p.preprocess(&[vec![1.0], vec![1.0; 6]]).unwrap(),
            [1.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0]
        );
    }

    #[test]
    fn fill_missing_interpolates_and_drops_the_tail() {
        let n = f32::NAN;
        assert_eq!(fill_missing(&[n, 1.0, n, 3.0, n, n]), [1.0, 1.0, 2.0, 3.0]);
        assert!(fill_missing(&[n, n]).is_empty());
        assert_eq!(fill_missing(&[2.0]), [2.0]);
    }

    #[test]
    fn plaid_features_of_known_signals() {
        // A constant series: zero shape, level ln(1 + 1e-6), length ln(512/256), flat spectrum.
        let p = plaid_features(&[166.5; 512], 256, 166.5, 256.0);
        assert_eq!(p.len(), 387);
        assert!(p[..256].iter().all(|&v| v == 0.0));
        assert!(p[256].abs() < 1e-5);
        assert!((p[257] - 2f32.ln()).abs() < 1e-6);
        assert!(p[258..].iter().all(|&v| v.abs() < 1e-6));
        // A pure tone of 4 cycles: unit-variance shape, all energy in DFT bin 4.
        let tone: Vec<f32> = (0..1000)
            .map(|i| 3.0 * (2.0 * std::f32::consts::PI * 4.0 * i as f32 / 999.0).sin())
            .collect();
        let p = plaid_features(&tone, 256, 166.5, 256.0);
        let spec = &p[258..];
        let peak = (0..129)
            .max_by(|&a, &b| spec[a].total_cmp(&spec[b]))
            .unwrap();
        assert_eq!(peak, 4);
        assert!(
            (spec[4] - (1.0 + 128.0 * 2f32.sqrt()).ln()).abs() < 0.1,
            "{}",
            spec[4]
        );
        let var = p[..256].iter().map(|v| v * v).sum::<f32>() / 256.0;
        assert!((var - 1.0).abs() < 1e-3);
        assert!(plaid_features(&[], 256, 166.5, 256.0)
            .iter()
            .all(|v| v.is_finite()));
    }

    /// Writes `dir/task.toml`: [`BASE`] with the data section `data` and the classes `classes`.
    fn task_in(dir: &Path, classes: &str, data: &str) -> TaskSpec {
        let text = BASE.replace("[\"a\", \"b\"]", classes).replace(
            "format = \"ts\"\ntrain = \"train.ts\"\ntest = \"test.ts\"",
            data,
        );
        let path = dir.join("task.toml");
        std::fs::write(&path, text).unwrap();
        TaskSpec::from_file(&path).unwrap()
    }

    #[test]
    fn loads_npy_npz_and_csv_with_header_through_the_task_file() {
        let dir = tempfile::tempdir().unwrap();
        let x: Vec<u8> = (0..16).flat_map(|v| (v as f32).to_le_bytes()).collect();
        std::fs::write(dir.path().join("x.npy"), npy("<f4", "(2, 2, 4)", &x)).unwrap();
        std::fs::write(dir.path().join("y.npy"), npy("|u1", "(2,)", &[1, 0])).unwrap();
        let ab = "[\"a\", \"b\"]";
        let s = task_in(
            dir.path(),
            ab,
            "format = \"npy\"\ntrain_labels = \"y.npy\"\ntrain = \"x.npy\"",
        );
        let d = s.load(Split::Train).unwrap();
        assert_eq!(d.y, [1, 0]);
        assert_eq!(d.task, "t");
        assert_eq!(d.sample(1), [8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]);
        let e = s.load(Split::Test).unwrap_err().to_string();
        assert!(e.contains("data.test"), "{e}");
        std::fs::write(dir.path().join("y.npy"), npy("|u1", "(2,)", &[1, 2])).unwrap();
        let e = s.load(Split::Train).unwrap_err().to_string();
        assert!(
            e.contains("x.npy") && e.contains("sample 2") && e.contains("class id"),
            "{e}"
        );
        // npz (the fixture written like numpy.savez): x (3, 2, 4) f8, y = [0, 2, 1].
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/small.npz");
        std::fs::copy(fixture, dir.path().join("d.npz")).unwrap();
        let abc = "[\"a\", \"b\", \"c\"]";
        let d = task_in(dir.path(), abc, "format = \"npz\"\ntrain = \"d.npz\"");
        let d = d.load(Split::Train).unwrap();
        assert_eq!(d.y, [0, 2, 1]);
        assert_eq!(d.sample(2)[..4], [4.0, 4.25, 4.5, 4.75]);
        // CSV with a header and string labels, one channel per row split into two.
        let csv = "x1,x2,kind,x3,x4\n1,2,b,3,4\n5,6,a,7,8\n";
        std::fs::write(dir.path().join("t.csv"), csv).unwrap();
        let d = task_in(
            dir.path(),
            ab,
            "format = \"csv\"\nlabel_column = \"kind\"\ntrain = \"t.csv\"",
        );
        let d = d.load(Split::Train).unwrap();
        assert_eq!(d.y, [1, 0]);
        let want = [
            1.0,
            4.0 / 3.0,
            5.0 / 3.0,
            2.0,
            3.0,
            10.0 / 3.0,
            11.0 / 3.0,
            4.0,
        ];
        assert!(d
            .sample(0)
            .iter()
            .zip(want)
            .all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
