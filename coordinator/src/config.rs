//! Coordinator configuration: a TOML file deserialised with serde over built-in defaults,
//! checked by [`Config::validate`] before anything starts.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("cannot parse config file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message (with line and column).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole coordinator configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the binary listens on (ignored by [`crate::run`], which takes a bound listener).
    pub listen: String,
    /// Directory of the sled database (created if missing).
    pub db_path: PathBuf,
    /// Directory holding the data sets (`<data_dir>/<task>/test.csv`) used for evaluation.
    pub data_dir: PathBuf,
    /// Secret expected as `authorization: Bearer <admin_token>` on admin calls.
    pub admin_token: String,
    /// One-time enrollment tokens seeded into the store on start-up (each allows one enrollment;
    /// a token that was used is not re-seeded on restart).
    pub enrollment_tokens: Vec<String>,
    /// Largest accepted update payload in bytes.
    pub max_update_bytes: u64,
    /// Time limit for one `UploadUpdate` call (whole stream), seconds.
    pub upload_timeout_secs: u64,
    /// Time limit for one `FetchModel` call, seconds.
    pub fetch_timeout_secs: u64,
    /// How long a graceful shutdown may take to drain calls before the binary exits anyway.
    pub shutdown_grace_secs: u64,
    /// Server learning rate: new = global + lr · FedAvg(deltas).
    #[serde(serialize_with = "short_f32")]
    pub server_learning_rate: f32,
    /// Largest L2 norm of a decoded update the coordinator accepts.
    #[serde(serialize_with = "short_f32")]
    pub max_update_norm: f32,
    /// Round defaults (used when a `StartRound` field is 0) and the task sent to clients.
    pub round: RoundDefaults,
    /// Models the coordinator serves.
    #[serde(rename = "model")]
    pub models: Vec<ModelConfig>,
}

/// Round parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoundDefaults {
    /// Fewest updates for a round to complete at its deadline.
    pub min_clients: u32,
    /// The round completes as soon as this many updates are in.
    pub max_clients: u32,
    /// Seconds from opening to the deadline.
    pub deadline_secs: u32,
    /// Local epochs clients train for.
    pub local_epochs: u32,
    /// Client learning rate.
    #[serde(serialize_with = "short_f32")]
    pub learning_rate: f32,
    /// Client batch size.
    pub batch_size: u32,
    /// L2 bound clients clip their delta to (0 = none).
    #[serde(serialize_with = "short_f32")]
    pub clip_norm: f32,
    /// Bits per value of the uploaded delta.
    pub quant_bits: u32,
    /// Fraction of delta entries kept (1.0 = dense).
    #[serde(serialize_with = "short_f32")]
    pub topk_fraction: f32,
}

/// One served model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name used on the wire (`[a-z0-9_-]`).
    pub name: String,
    /// Task: a task file (`path/to/task.toml`) or the name of a set in `data_dir`
    /// (`<data_dir>/<name>/task.toml`: `plaid`, `faces`, `digits`, `gunpoint`, …).
    pub task: String,
    /// ONNX file for version 1; when absent a fresh MLP is built from the task's default spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Evaluate each new version on the task's held-out split.
    #[serde(default = "default_true")]
    pub eval: bool,
    /// Seed of the initial weights when no `init` file is given.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

/// Writes an f32 with its shortest decimal form (0.05, not 0.05000000074505806).
fn short_f32<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.to_string().parse::<f64>().unwrap_or(f64::from(*v)))
}

fn default_true() -> bool {
    true
}

fn default_seed() -> u64 {
    1
}

impl Default for RoundDefaults {
    fn default() -> Self {
        RoundDefaults {
            min_clients: 2,
            max_clients: 10,
            deadline_secs: 300,
            local_epochs: 5,
            learning_rate: 0.01,
            batch_size: 32,
            clip_norm: 10.0,
            quant_bits: 8,
            topk_fraction: 1.0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".into(),
            db_path: "hearth-coordinator.db".into(),
            data_dir: "data".into(),
            admin_token: String::new(),
            enrollment_tokens: Vec::new(),
            max_update_bytes: 16 * 1024 * 1024,
            upload_timeout_secs: 60,
            fetch_timeout_secs: 120,
            shutdown_grace_secs: 10,
            server_learning_rate: 1.0,
            max_update_norm: 50.0,
            round: RoundDefaults::default(),
            models: ["plaid", "faces", "digits"]
                .into_iter()
                .map(|t| ModelConfig {
                    name: t.into(),
                    task: t.into(),
                    init: None,
                    eval: true,
                    seed: 1,
                })
                .collect(),
        }
    }
}

impl Config {
    /// Parses TOML text (missing fields take their defaults). Does not validate.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })
    }

    /// Reads and parses a TOML file. Does not validate.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The configuration as TOML (what `--print-default-config` prints for the defaults).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }

    /// Checks every value; the message names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.admin_token.len() < 16 {
            return bad("admin_token must be set and at least 16 characters long \
                 (set it in the file or with --admin-token / HEARTH_ADMIN_TOKEN)"
                .into());
        }
        if self.db_path.as_os_str().is_empty() {
            return bad("db_path must not be empty".into());
        }
        for (i, t) in self.enrollment_tokens.iter().enumerate() {
            if t.len() < 8 {
                return bad(format!(
                    "enrollment_tokens[{i}] is shorter than 8 characters"
                ));
            }
        }
        if self.max_update_bytes == 0 || self.max_update_bytes > 1 << 30 {
            return bad("max_update_bytes must be in 1..=1073741824".into());
        }
        if self.upload_timeout_secs == 0 || self.fetch_timeout_secs == 0 {
            return bad("upload_timeout_secs and fetch_timeout_secs must be > 0".into());
        }
        if !(self.server_learning_rate.is_finite() && self.server_learning_rate > 0.0) {
            return bad("server_learning_rate must be a finite number > 0".into());
        }
        if !(self.max_update_norm.is_finite() && self.max_update_norm > 0.0) {
            return bad("max_update_norm must be a finite number > 0".into());
        }
        let r = &self.round;
        if r.min_clients == 0 {
            return bad("round.min_clients must be >= 1".into());
        }
        if r.max_clients < r.min_clients {
            return bad(format!(
                "round.max_clients ({}) must be >= round.min_clients ({})",
                r.max_clients, r.min_clients
            ));
        }
        if r.deadline_secs == 0 {
            return bad("round.deadline_secs must be >= 1".into());
        }
        if r.local_epochs == 0 || r.batch_size == 0 {
            return bad("round.local_epochs and round.batch_size must be >= 1".into());
        }
        if !(r.learning_rate.is_finite() && r.learning_rate > 0.0) {
            return bad("round.learning_rate must be a finite number > 0".into());
        }
        if !(r.clip_norm.is_finite() && r.clip_norm >= 0.0) {
            return bad("round.clip_norm must be a finite number >= 0".into());
        }
        if r.clip_norm > self.max_update_norm {
            return bad(format!(
                "round.clip_norm ({}) must not exceed max_update_norm ({})",
                r.clip_norm, self.max_update_norm
            ));
        }
        if !(2..=8).contains(&r.quant_bits) {
            return bad("round.quant_bits must be in 2..=8".into());
        }
        if !(r.topk_fraction > 0.0 && r.topk_fraction <= 1.0) {
            return bad("round.topk_fraction must be in (0, 1]".into());
        }
        if self.models.is_empty() {
            return bad("at least one [[model]] is required".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let ok_name = !m.name.is_empty()
                && m.name.len() <= 64
                && m.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok_name {
                return bad(format!(
                    "model[{i}].name {:?} must be 1-64 characters of [a-z0-9_-]",
                    m.name
                ));
            }
            if !seen.insert(m.name.as_str()) {
                return bad(format!("model[{i}].name {:?} is listed twice", m.name));
            }
            if let Err(e) = hearth_model::TaskSpec::resolve(&m.task, &self.data_dir) {
                return bad(format!(
                    "model[{i}] ({}): unknown task {:?}: {e}",
                    m.name, m.task
                ));
            }
            if let Some(p) = &m.init {
                if !p.is_file() {
                    return bad(format!(
                        "model[{i}] ({}): init file {} does not exist",
                        m.name,
                        p.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The configured model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            admin_token: "0123456789abcdef".into(),
            ..Config::default()
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = valid();
        let text = c.to_toml();
        assert!(text.contains("[[model]]"), "{text}");
        let back = Config::from_toml_str(&text).unwrap();
        assert_eq!(back, c);
        back.validate().unwrap();
    }

    #[test]
    fn default_config_needs_an_admin_token() {
        let e = Config::default().validate().unwrap_err().to_string();
        assert!(e.contains("admin_token"), "{e}");
    }

    #[test]
    fn partial_file_takes_defaults() {
        let c = Config::from_toml_str(
            "admin_token = \"0123456789abcdef\"\n[round]\nmin_clients = 3\n\
             [[model]]\nname = \"d\"\ntask = \"digits\"\n",
        )
        .unwrap();
        assert_eq!(c.round.min_clients, 3);
        assert_eq!(c.round.max_clients, 10);
        assert_eq!(c.models.len(), 1);
        assert!(c.models[0].eval);
        assert_eq!(c.models[0].seed, 1);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = valid();
        c.round.max_clients = 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("round.max_clients"));
        // A task file by path (here a data set added by configuration alone) is a task.
        let mut c = valid();
        let gunpoint = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/gunpoint/task.toml");
        c.models[0].task = gunpoint.into();
        c.validate().unwrap();
        let mut c = valid();
        c.models[0].task = "cats".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("unknown task"));
        let mut c = valid();
        c.models[1].name = "plaid".into();
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let e = Config::from_toml_str("admin_tokn = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_tokn"), "{e}");
    }
}
