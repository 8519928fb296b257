//! Data sets in memory ([`Dataset`]), non-IID client partitions, resampling, and the vendored
//! tasks by name ([`Task`], a compatibility layer over their task files; a task's classes,
//! preprocessing and model are defined by its task file, see [`crate::task`]).

use crate::error::ModelError;
use crate::onnx::MlpSpec;
use crate::task::TaskSpec;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Which split of a data set to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// `train.csv`
    Train,
    /// `test.csv`
    Test,
}

/// The tasks whose data Hearth vendors (see the `impl` for how they map to task files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Smart-plug current waveform → appliance (11 classes).
    Plaid,
    /// Doorbell camera 25×25 grey crop → `none` / `person`.
    Faces,
    /// 8×8 grey digit → `digit_0..digit_9`.
    Digits,
}

/// The shipped task files, embedded so that the enum works without a data directory.
const PLAID_TOML: &str = include_str!("../../data/plaid/task.toml");
const FACES_TOML: &str = include_str!("../../data/faces/task.toml");
const DIGITS_TOML: &str = include_str!("../../data/digits/task.toml");

/// The vendored tasks, as a thin compatibility layer over their task files
/// (`data/<name>/task.toml`, parsed by [`TaskSpec`]): every property — classes, input length,
/// preprocessing, model size — comes from the file; nothing task-specific is in code. New
/// code takes a [`TaskSpec`] (any task file); the enum remains for the configurations and
/// tests that name a vendored set.
impl Task {
    /// Every vendored task.
    pub const ALL: [Task; 3] = [Task::Plaid, Task::Faces, Task::Digits];

    /// Directory name under `data/` (also the `Display` form).
    pub fn name(self) -> &'static str {
        match self {
            Task::Plaid => "plaid",
            Task::Faces => "faces",
            Task::Digits => "digits",
        }
    }

    /// The task file shipped with Hearth (`data/<name>/task.toml`, embedded at build time;
    /// data paths resolve under `data/<name>/` of the source tree).
    pub fn spec(self) -> TaskSpec {
        let text = match self {
            Task::Plaid => PLAID_TOML,
            Task::Faces => FACES_TOML,
            Task::Digits => DIGITS_TOML,
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data")
            .join(self.name())
            .join("task.toml");
        // The embedded files are checked by this crate's tests (`task_files.rs`).
        TaskSpec::from_toml_str(text, &path).expect("the shipped task files are valid")
    }

    /// The class labels of this task, in class-id order.
    pub fn classes(self) -> Vec<String> {
        self.spec().classes
    }

    /// Length of the preprocessed input vector.
    pub fn input_len(self) -> usize {
        self.spec().input_len()
    }

    /// Reads the split through `data_dir/<name>/task.toml` and preprocesses every sample.
    pub fn load(self, data_dir: &Path, split: Split) -> Result<Dataset, ModelError> {
        Ok(TaskSpec::resolve(self.name(), data_dir)?.load(split)?)
    }

    /// Turns one raw single-channel sample into the model input (the task file's chain).
    pub fn preprocess(self, raw: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.spec()
            .preprocess(&[raw.to_vec()])
            .map_err(|e| ModelError::Data(format!("{self}: {e}")))
    }

    /// The MLP the task file asks for.
    pub fn default_spec(self) -> MlpSpec {
        self.spec().mlp_spec()
    }
}

/// Linear interpolation of `x` onto `len` points spanning its first to last sample.
pub fn resample(x: &[f32], len: usize) -> Vec<f32> {
    match (x.len(), len) {
        (_, 0) => Vec::new(),
        (0, _) => vec![0.0; len],
        (1, _) => vec![x[0]; len],
        (n, 1) => vec![x[n - 1]],
        (n, _) => (0..len)
            .map(|i| {
                let t = i as f64 * (n - 1) as f64 / (len - 1) as f64;
                let j = (t.floor() as usize).min(n - 2);
                let frac = (t - j as f64) as f32;
                x[j] + (x[j + 1] - x[j]) * frac
            })
            .collect(),
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "plaid" => Ok(Task::Plaid),
            "faces" => Ok(Task::Faces),
            "digits" => Ok(Task::Digits),
            other => Err(ModelError::Data(format!("unknown task {other:?}"))),
        }
    }
}

/// A preprocessed data set held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The name of the task it belongs to.
    pub task: String,
    /// Class labels by class id.
    pub classes: Vec<String>,
    /// Length of each (preprocessed) sample.
    pub input_len: usize,
    /// Samples, row-major: `len() * input_len` values.
    pub x: Vec<f32>,
    /// Class id of each sample.
    pub y: Vec<u32>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The preprocessed input of sample `i`.
    pub fn sample(&self, i: usize) -> &[f32] {
        &self.x[i * self.input_len..(i + 1) * self.input_len]
    }

    /// A data set with the given samples (in that order).
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(indices.len() * self.input_len);
        for &i in indices {
            x.extend_from_slice(self.sample(i));
        }
        Dataset {
            task: self.task.clone(),
            classes: self.classes.clone(),
            input_len: self.input_len,
            x,
            y: indices.iter().map(|&i| self.y[i]).collect(),
        }
    }

    /// Non-IID partition `index` of `count`: label-skewed (Dirichlet(alpha) over classes per client, fixed seed); every client non-empty.
    ///
    /// For every class, client shares are drawn from a symmetric Dirichlet(`alpha`) and the
    /// class's (shuffled) samples are split by them; a client left empty then takes one sample
    /// from the largest client. Partitions of the same `(count, alpha, seed)` are disjoint and
    /// cover the set. Small `alpha` (0.1) gives strong skew, large (100) nearly IID. When
    /// `count > len()` the clients beyond `len()` necessarily get empty sets; `index >= count`
    /// gives an empty set.
    pub fn partition(&self, index: usize, count: usize, alpha: f32, seed: u64) -> Dataset {
        if index >= count {
            return self.subset(&[]);
        }
        let owners = self.partition_owners(count, alpha, seed);
        let mine: Vec<usize> = owners
            .iter()
            .enumerate()
            .filter(|(_, &o)| o == index)
            .map(|(i, _)| i)
            .collect();
        self.subset(&mine)
    }

    /// The client that owns each sample under `partition(_, count, alpha, seed)`.
    fn partition_owners(&self, count: usize, alpha: f32, seed: u64) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4845_4152_5448_u64);
        let alpha = if alpha.is_finite() && alpha > 0.0 {
            f64::from(alpha)
        } else {
            1.0
        };
        let mut owners = vec![0usize; self.len()];
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes.len().max(1)];
        for (i, &c) in self.y.iter().enumerate() {
            let c = (c as usize).min(by_class.len() - 1);
            by_class[c].push(i);
        }
        let mut sizes = vec![0usize; count];
        for members in by_class.iter_mut() {
            members.shuffle(&mut rng);
            let shares = dirichlet(&mut rng, alpha, count);
            // Cumulative cut points: round the running share so the pieces add up exactly.
            let n = members.len();
            let mut acc = 0.0f64;
            let mut start = 0usize;
            for (client, share) in shares.iter().enumerate() {
                acc += share;
                let end = if client + 1 == count {
                    n
                } else {
                    ((acc * n as f64).round() as usize).min(n)
                };
                for &i in &members[start..end.max(start)] {
                    owners[i] = client;
                }
                sizes[client] += end.saturating_sub(start);
                start = end.max(start);
            }
        }
        // Every client non-empty: an empty client takes one sample from the largest client.
        for client in 0..count.min(self.len()) {
            if sizes[client] > 0 {
                continue;
            }
            let donor = (0..count)
                .max_by_key(|&c| (sizes[c], std::cmp::Reverse(c)))
                .unwrap_or(0);
            let idx = (0..self.len()).rev().find(|&i| owners[i] == donor);
            if let Some(i) = idx {
                owners[i] = client;
                sizes[donor] -= 1;
                sizes[client] += 1;
            }
        }
        owners
    }
}

/// A symmetric Dirichlet(alpha) sample of dimension `k` (normalised gammas).
fn dirichlet(rng: &mut impl Rng, alpha: f64, k: usize) -> Vec<f64> {
    let mut g: Vec<f64> = (0..k).map(|_| gamma(rng, alpha)).collect();
    let sum: f64 = g.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        g.iter_mut().for_each(|v| *v /= sum);
    } else {
        // All draws underflowed (tiny alpha): put the whole class on one client.
        let winner = rng.gen_range(0..k.max(1));
        g.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = if i == winner { 1.0 } else { 0.0 });
    }
    g
}

/// Gamma(shape, 1) by Marsaglia–Tsang; shapes below 1 use the `U^(1/shape)` boost.
pub(crate) fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    // Acceptance rate is above 95% for every shape >= 1; the bound only guards against a
    // broken generator.
    for _ in 0..10_000 {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u: f64 = rng.gen();
        if u < 1.0 - 0.0331 * x.powi(4)
            || u.max(f64::MIN_POSITIVE).ln() < 0.5 * x * x + d * (1.0 - v + v.ln())
        {
            return d * v;
        }
    }
    d
}

/// A standard normal draw (Box–Muller).
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(n: usize, classes: usize) -> Dataset {
        Dataset {
            task: "digits".into(),
            classes: (0..classes).map(|c| format!("digit_{c}")).collect(),
            input_len: 2,
            x: (0..n * 2).map(|v| v as f32).collect(),
            y: (0..n).map(|i| (i * 7 % classes) as u32).collect(),
        }
    }

    #[test]
    fn task_names_round_trip() {
        for t in [Task::Plaid, Task::Faces, Task::Digits] {
            assert_eq!(t.to_string().parse::<Task>().unwrap(), t);
        }
        assert!("cats".parse::<Task>().is_err());
    }

    #[test]
    fn resample_is_linear_and_keeps_ends() {
        let r = resample(&[0.0, 10.0], 11);
        for (i, v) in r.iter().enumerate() {
            assert!((v - i as f32).abs() < 1e-5);
        }
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.1).sin()).collect();
        let r = resample(&x, 128);
        assert_eq!(r.len(), 128);
        assert_eq!(r[0], x[0]);
        assert!((r[127] - x[299]).abs() < 1e-6);
        assert_eq!(resample(&[3.0], 4), vec![3.0; 4]);
    }

    #[test]
    fn gamma_has_the_right_mean() {
        let mut rng = StdRng::seed_from_u64(1);
        for shape in [0.1, 0.5, 1.0, 3.0] {
            let n = 20_000;
            let mean: f64 = (0..n).map(|_| gamma(&mut rng, shape)).sum::<f64>() / n as f64;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "shape {shape}: mean {mean}"
            );
        }
    }

    #[test]
    fn partitions_are_disjoint_covering_nonempty_and_deterministic() {
        let ds = synthetic(500, 10);
        for &(count, alpha) in &[(5usize, 0.1f32), (10, 0.5), (3, 100.0), (50, 0.05)] {
            let mut seen = vec![0u32; ds.len()];
            for k in 0..count {
                let p = ds.partition(k, count, alpha, 42);
                assert!(!p.is_empty(), "client {k}/{count} alpha {alpha} empty");
                assert_eq!(p, ds.partition(k, count, alpha, 42));
                // Samples are unique: x[2i] = 2i identifies the sample.
                for j in 0..p.len() {
                    let i = (p.sample(j)[0] / 2.0) as usize;
                    assert_eq!(p.y[j], ds.y[i]);
                    seen[i] += 1;
                }
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "count {count}: not a partition"
            );
        }
        assert_ne!(ds.partition(0, 5, 0.1, 1), ds.partition(0, 5, 0.1, 2));
    }

    #[test]
    fn small_alpha_skews_labels() {
        let ds = synthetic(1000, 10);
        let distinct = |alpha: f32| -> f64 {
            (0..10)
                .map(|k| {
                    let p = ds.partition(k, 10, alpha, 7);
                    let mut hist = [0usize; 10];
                    p.y.iter().for_each(|&c| hist[c as usize] += 1);
                    // Share of the client's most frequent class.
                    *hist.iter().max().unwrap() as f64 / p.len() as f64
                })
                .sum::<f64>()
                / 10.0
        };
        let skewed = distinct(0.1);
        let iid = distinct(100.0);
        assert!(skewed > 0.5, "alpha 0.1: top-class share {skewed}");
        assert!(iid < 0.25, "alpha 100: top-class share {iid}");
    }
}
