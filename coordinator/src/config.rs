//! Coordinator configuration: a TOML file deserialised with serde over built-in defaults,
//! checked by [`Config::validate`] before anything starts.

use std::collections::BTreeMap;
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

/// The whole coordinator configuration. Its `Debug` output redacts the admin and enrollment
/// tokens.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the binary listens on (ignored by [`crate::run`], which takes a bound listener).
    pub listen: String,
    /// Address of the Prometheus endpoint (`GET /metrics`, HTTP/1.1); empty = not served.
    pub metrics_listen: String,
    /// Directory of the sled database (created if missing); with `[store] backend =
    /// "postgres"`, the signing key and the PKI still default to paths beside it.
    pub db_path: PathBuf,
    /// Which database holds the state (`[store]`): sled at `db_path` (the default) or
    /// PostgreSQL, which several instances can share.
    pub store: StoreConfig,
    /// File of the ed25519 key every published model version is signed with (hex, mode
    /// 0600; created on first start, its public half written to `<file>.pub`). Default:
    /// `<db_path>.signing-key`, beside the database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// Directory holding the data sets (`<data_dir>/<task>/test.csv`) used for evaluation.
    pub data_dir: PathBuf,
    /// Secret expected as `authorization: Bearer <admin_token>` on admin calls.
    pub admin_token: String,
    /// One-time enrollment tokens seeded into the store on start-up (each allows one enrollment;
    /// a token that was used is not re-seeded on restart).
    pub enrollment_tokens: Vec<String>,
    /// Lifetime of tokens made by `enroll-token` / `CreateEnrollmentToken` without a TTL, seconds.
    pub enrollment_token_ttl_secs: u64,
    /// Plaintext gRPC with shared-key client credentials, for local demos and tests only.
    /// Off (the default): TLS with the coordinator's own CA, client certificates for agents.
    pub insecure: bool,
    /// Directory of the CA (`ca.pem`, `ca.key` mode 0600) and the server certificate; default:
    /// `pki` beside `db_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pki_dir: Option<PathBuf>,
    /// Names (DNS names or IP addresses) the server certificate is issued for; the host of
    /// `listen` is added when it is a specific address.
    pub tls_names: Vec<String>,
    /// Lifetime of the client certificates issued at enrolment, days.
    pub client_cert_days: u32,
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
    /// Largest L2 norm of a decoded update the coordinator accepts (the hard bound: above it an
    /// update is refused; a model's `aggregation.clip_norm` scales updates down below it).
    #[serde(serialize_with = "short_f32")]
    pub max_update_norm: f32,
    /// Cap on the sample count a client reports: its aggregation weight is
    /// `min(num_samples, max_client_samples)`.
    pub max_client_samples: u64,
    /// Memory allowed for the decoded updates a round keeps for the robust methods that need
    /// them (median, trimmed mean, Krum): `max_clients × 4 × parameters` must fit, checked for
    /// each such model at start-up and for every `StartRound`.
    pub max_round_memory_mb: u64,
    /// Per-client call rate limit (`[rate_limit]`, see [`crate::ratelimit`]).
    pub rate_limit: crate::ratelimit::RateLimitConfig,
    /// Limits on connections, streams, message sizes and call times (`[limits]`).
    pub limits: crate::limits::Limits,
    /// Round defaults (used when a `StartRound` field is 0) and the task sent to clients.
    pub round: RoundDefaults,
    /// Aggregation of every model that has no entry in `model_aggregation`.
    pub aggregation: Aggregation,
    /// Per-model aggregation (`[model_aggregation.<name>]`), replacing `aggregation` for that
    /// model; keys it leaves out take the built-in defaults.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_aggregation: BTreeMap<String, Aggregation>,
    /// Client optimizer sent in every round task of a model without an entry in
    /// `model_training` (`[client_training]`).
    pub client_training: ClientTraining,
    /// Per-model client optimizer (`[model_training.<name>]`), replacing `client_training`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_training: BTreeMap<String, ClientTraining>,
    /// How new versions travel to agents that hold the previous one (`[downlink]`).
    pub downlink: Downlink,
    /// Models the coordinator serves.
    #[serde(rename = "model")]
    pub models: Vec<ModelConfig>,
    /// Home aggregator mode (`[upstream]`, see [`crate::upstream`]): the models' versions and
    /// rounds come from this upstream coordinator, and each local round is sent there as
    /// one update. Absent (the default): an ordinary coordinator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamConfig>,
}

/// `[upstream]`: the coordinator above a home aggregator. `Debug` redacts the token.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The upstream coordinator: `https://host:port` (or `http://` for an insecure one).
    pub url: String,
    /// Its CA certificate (its `pki/ca.pem`), needed for `https://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// One-time enrollment token of the upstream coordinator, needed until the aggregator's
    /// upstream identity is stored in `credentials_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// The device name the aggregator enrols upstream as (one identity per home).
    pub device_name: String,
    /// Where the upstream identity (key, certificate, CA, pinned model-signing key) is kept,
    /// mode 0600; default `<db_path>.upstream.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// The upstream's model-signing public key (64 hex characters), pinned out of band; when
    /// absent, the key the upstream returned at enrolment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_signing_key: Option<String>,
    /// A local round closes this many seconds before the upstream round's deadline, so the
    /// home's aggregate can still be sent.
    pub upload_margin_secs: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            ca_file: None,
            enrollment_token: None,
            device_name: "hearth-home".into(),
            credentials_file: None,
            model_signing_key: None,
            upload_margin_secs: 10,
        }
    }
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field(
                "enrollment_token",
                &Redacted(self.enrollment_token.is_some()),
            )
            .field("device_name", &self.device_name)
            .field("credentials_file", &self.credentials_file)
            .field("model_signing_key", &self.model_signing_key)
            .field("upload_margin_secs", &self.upload_margin_secs)
            .finish()
    }
}

impl UpstreamConfig {
    fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            return Err(format!(
                "upstream.url {:?} must be an https:// (or, insecure, http://) URL",
                self.url
            ));
        }
        if self.url.starts_with("https://") {
            match &self.ca_file {
                None => {
                    return Err(format!(
                        "upstream.url {:?} uses TLS: set upstream.ca_file to the upstream \
                         coordinator's pki/ca.pem",
                        self.url
                    ))
                }
                Some(p) if !p.is_file() => {
                    return Err(format!("upstream.ca_file {} does not exist", p.display()))
                }
                Some(_) => {}
            }
        }
        if self.enrollment_token.as_deref().is_some_and(str::is_empty) {
            return Err("upstream.enrollment_token is empty".into());
        }
        if self.device_name.is_empty()
            || self.device_name.chars().count() > 128
            || self.device_name.chars().any(char::is_control)
        {
            return Err("upstream.device_name must be 1-128 printable characters".into());
        }
        if let Some(k) = &self.model_signing_key {
            hearth_proto::signing::ModelVerifier::from_hex(k).map_err(|e| {
                format!("upstream.model_signing_key is not a 64-hex ed25519 public key: {e}")
            })?;
        }
        if self.upload_margin_secs == 0 || self.upload_margin_secs > 3600 {
            return Err("upstream.upload_margin_secs must be in 1..=3600".into());
        }
        Ok(())
    }
}

/// The storage backend.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Embedded sled database at `db_path`: one process.
    #[default]
    Sled,
    /// PostgreSQL at `url` (or a database speaking its protocol): one or more instances.
    Postgres,
}

/// `[store]`: where the coordinator keeps its state. `Debug` redacts the URL (it may hold a
/// password).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `"sled"` (default) or `"postgres"`.
    pub backend: StoreBackend,
    /// PostgreSQL only: `postgres://user:password@host:port/database` (or libpq key=value
    /// pairs). Plaintext: keep the database on loopback or a private network.
    pub url: String,
    /// PostgreSQL only: most connections this instance opens (>= 2: closing a round holds
    /// one while it reads through another).
    pub pool_size: u32,
    /// PostgreSQL only: this instance's name in the database (its partial sums, markers);
    /// empty = a random one per start.
    pub instance: String,
    /// PostgreSQL only: how often, at the latest, an instance looks for rounds and versions
    /// of other instances (it also wakes on their notifications), milliseconds.
    pub poll_ms: u64,
    /// PostgreSQL only: uploads of one round this instance folds at once, each into a partial
    /// sum of its own (more commits in flight); a round may then take up to
    /// instances × accept_slots − 1 updates above `max_clients` (each counted once).
    /// At most pool_size − 2.
    pub accept_slots: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sled,
            url: String::new(),
            pool_size: 8,
            instance: String::new(),
            poll_ms: 1000,
            accept_slots: 1,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("url", &Redacted(!self.url.is_empty()))
            .field("pool_size", &self.pool_size)
            .field("instance", &self.instance)
            .field("poll_ms", &self.poll_ms)
            .field("accept_slots", &self.accept_slots)
            .finish()
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), String> {
        match self.backend {
            StoreBackend::Sled => {
                if !self.url.is_empty() {
                    return Err("store.url is set but store.backend is \"sled\" \
                         (set backend = \"postgres\" to use it)"
                        .into());
                }
            }
            StoreBackend::Postgres => {
                if self.url.is_empty() {
                    return Err("store.backend = \"postgres\" needs store.url \
                         (postgres://user:password@host:port/database)"
                        .into());
                }
                // The parser's message never repeats the URL (it may hold a password).
                if let Err(e) = self.url.parse::<tokio_postgres::Config>() {
                    return Err(format!("store.url is not a PostgreSQL URL: {e}"));
                }
                if !(2..=256).contains(&self.pool_size) {
                    return Err("store.pool_size must be in 2..=256".into());
                }
                if self.accept_slots == 0 || self.accept_slots + 2 > self.pool_size {
                    return Err("store.accept_slots must be in 1..=pool_size - 2".into());
                }
                if !(50..=60_000).contains(&self.poll_ms) {
                    return Err("store.poll_ms must be in 50..=60000".into());
                }
                if self.instance.len() > 64
                    || !self
                        .instance
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err("store.instance must be at most 64 of [A-Za-z0-9-_.]".into());
                }
            }
        }
        Ok(())
    }
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
    /// Bits per value of the uploaded delta: 1 (sign times the mean magnitude of the kept
    /// values), 2..=8 (stochastic rounding), 32 (uncompressed f32).
    pub quant_bits: u32,
    /// Fraction of delta entries kept (1.0 = dense).
    #[serde(serialize_with = "short_f32")]
    pub topk_fraction: f32,
    /// Client selection: the cohort of a round is this many of the available clients, drawn
    /// at random (0 = use `client_fraction`).
    pub clients_per_round: u32,
    /// Client selection: the cohort is this fraction of the available clients, rounded up
    /// (0 with `clients_per_round` 0 = no selection: any enrolled client may take part).
    /// Either way the cohort has at least `min_clients` clients.
    #[serde(serialize_with = "short_f32")]
    pub client_fraction: f32,
    /// A round starts only when at least this many clients are available (0 = no minimum).
    pub min_available_clients: u32,
    /// How long `StartRound` waits for enough available clients before refusing, seconds.
    pub available_wait_secs: u32,
    /// A client is available for a model while it holds a `Subscribe` stream for it, and for
    /// this many seconds after the stream ended (a reconnecting agent).
    pub available_window_secs: u64,
    /// Seed of the cohort draws (each round mixes in its model and position); absent = a
    /// fresh random seed per round. The seed used is stored with the round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection_seed: Option<u64>,
    /// Server loop: most rounds one refresh may ask for (`num_rounds`, or the bound of a
    /// "until target accuracy" refresh that names no count).
    pub max_rounds_per_refresh: u32,
    /// Federated evaluation: fraction of its local data each client holds out (never trains
    /// on) and evaluates the round's base version on (0 = no federated evaluation).
    #[serde(serialize_with = "short_f32")]
    pub eval_fraction: f32,
}

/// The compressed downlink (`hearth_model::downlink`): a version a round produces is the
/// reconstruction of a coded delta against its parent, and an agent holding the parent
/// downloads that delta instead of the ONNX file.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Downlink {
    /// Bits per value of the delta: 1 (sign times the mean magnitude), 2..=8 (quantized),
    /// both with error feedback on the server, 32 (raw f32 values: exact), or 0 (off: every
    /// version ships as the whole file).
    pub bits: u32,
    /// Share of each tensor's delta values sent, largest first (1.0 = dense).
    #[serde(serialize_with = "short_f32")]
    pub topk_fraction: f32,
}

impl Default for Downlink {
    fn default() -> Self {
        // The codec sweep's choice under the default uplink (BENCHMARKS.md, "Codec sweep").
        Downlink {
            bits: 8,
            topk_fraction: 0.1,
        }
    }
}

/// The optimizer clients train with, sent in the round task.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientOptimizer {
    /// Plain mini-batch SGD.
    Sgd,
    /// Heavy-ball momentum (`momentum`).
    #[default]
    Momentum,
}

/// Client-side training of a model: optimizer and FedProx's proximal term.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTraining {
    /// `sgd` or `momentum` (the default).
    pub optimizer: ClientOptimizer,
    /// Momentum μ of `momentum`.
    #[serde(serialize_with = "short_f32")]
    pub momentum: f32,
    /// FedProx: clients minimise loss + mu/2·‖w − w_global‖² (0 = off).
    #[serde(serialize_with = "short_f32")]
    pub proximal_mu: f32,
}

impl Default for ClientTraining {
    fn default() -> Self {
        ClientTraining {
            optimizer: ClientOptimizer::Momentum,
            momentum: 0.9,
            proximal_mu: 0.0,
        }
    }
}

impl ClientTraining {
    fn validate(&self, section: &str) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("{section}.momentum must be in [0, 1)"));
        }
        if !(self.proximal_mu.is_finite() && (0.0..=1000.0).contains(&self.proximal_mu)) {
            return Err(format!("{section}.proximal_mu must be in [0, 1000]"));
        }
        Ok(())
    }
}

/// One served model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name used on the wire (`[a-z0-9_-]`).
    pub name: String,
    /// Task: a task file (`path/to/task.toml`) or the name of a set in `data_dir`
    /// (`<data_dir>/<name>/task.toml`: `plaid`, `faces`, `digits`, `gunpoint`, …). Not used
    /// (may be empty) by a home aggregator (`[upstream]`), whose models come from upstream.
    #[serde(default)]
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

/// Server optimizer applied to the round's pseudo-gradient Δ (Reddi et al. 2020, "Adaptive
/// Federated Optimization").
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServerOptimizer {
    /// x += η Δ.
    #[default]
    FedAvg,
    /// m = μ m + Δ; x += η m.
    FedAvgM,
    /// m = β1 m + (1−β1) Δ; v = β2 v + (1−β2) Δ²; x += η m / (√v + τ).
    FedAdam,
    /// As FedAdam with v = v − (1−β2) Δ² sign(v − Δ²).
    FedYogi,
}

/// How the round's accepted updates are combined into the pseudo-gradient Δ.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The default: a round with at least `robust_from_clients` updates at close takes
    /// multi-Krum leaving out the `krum_byzantine` updates farthest from the others (the rest
    /// averaged by weight), a smaller one the weighted mean. The round keeps its updates when `max_clients × 4 × parameters` fits
    /// `max_round_memory_mb` (so the round-relative bounds apply too); otherwise it is the
    /// running-sum mean with the bounds learnt from earlier rounds.
    #[default]
    Auto,
    /// Weighted mean, folded into a running sum (O(model) memory): plain FedAvg, whatever the
    /// round's size.
    Mean,
    /// Coordinate-wise median (keeps the updates).
    Median,
    /// Coordinate-wise mean without the `trim_fraction` smallest and largest values on each
    /// side (keeps the updates).
    TrimmedMean,
    /// Krum / multi-Krum: the `krum_select` updates closest to their neighbours, assuming
    /// `krum_byzantine` attackers, averaged by weight (keeps the updates).
    Krum,
}

impl Combine {
    /// Whether the method always needs every decoded update of the round (not just the
    /// running sum). `Auto` keeps them when they fit the memory bound (decided per round by
    /// [`Aggregation::keeps_for_round`]).
    pub fn keeps_updates(self) -> bool {
        !matches!(self, Combine::Mean | Combine::Auto)
    }

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Combine::Auto => "auto",
            Combine::Mean => "mean",
            Combine::Median => "median",
            Combine::TrimmedMean => "trimmed_mean",
            Combine::Krum => "krum",
        }
    }
}

/// Per-model aggregation: robust combination, server-side clipping and server optimizer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Aggregation {
    /// `fedavg`, `fedavgm`, `fedadam` or `fedyogi`.
    pub optimizer: ServerOptimizer,
    /// Server learning rate η for this model (default: the top-level `server_learning_rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f32>,
    /// FedAvgM server momentum μ.
    #[serde(serialize_with = "short_f32")]
    pub momentum: f32,
    /// FedAdam/FedYogi first-moment decay β1.
    #[serde(serialize_with = "short_f32")]
    pub beta1: f32,
    /// FedAdam/FedYogi second-moment decay β2.
    #[serde(serialize_with = "short_f32")]
    pub beta2: f32,
    /// FedAdam/FedYogi adaptivity τ.
    #[serde(serialize_with = "short_f32")]
    pub tau: f32,
    /// `auto` (default), `mean`, `median`, `trimmed_mean` or `krum`.
    pub combine: Combine,
    /// `combine = "auto"` takes multi-Krum (n − `krum_byzantine` updates kept) when a round
    /// closes with at least this many updates (0 = never; otherwise >= 2·krum_byzantine + 3).
    pub robust_from_clients: u32,
    /// Adaptive per-client norm bound: an update whose L2 norm exceeds this multiple of the
    /// median norm is scaled down to it (0 = off). The median is the round's own when the round
    /// keeps its updates, else that of the updates accepted in the model's last rounds.
    #[serde(serialize_with = "short_f32")]
    pub norm_bound_factor: f32,
    /// Sample-count cap relative to the round: a client's weight is at most this multiple of
    /// the median reported sample count (the round's own, or the last rounds'; 0 = off), on top
    /// of `max_client_samples`.
    #[serde(serialize_with = "short_f32")]
    pub sample_cap_factor: f32,
    /// Fraction β of values dropped on each side by `trimmed_mean`, in [0, 0.5).
    #[serde(serialize_with = "short_f32")]
    pub trim_fraction: f32,
    /// Attackers `krum` (and `auto` from `robust_from_clients` updates) assumes (f); rounds need
    /// at least 2f + 3 updates.
    pub krum_byzantine: u32,
    /// Updates `krum` averages (m; 1 = Krum, more = multi-Krum).
    pub krum_select: u32,
    /// Server-side clipping: an accepted update whose L2 norm exceeds this is scaled down to
    /// it (0 = off). Updates above `max_update_norm` are still refused.
    #[serde(serialize_with = "short_f32")]
    pub clip_norm: f32,
}

impl Default for Aggregation {
    fn default() -> Self {
        Aggregation {
            optimizer: ServerOptimizer::FedAvg,
            server_learning_rate: None,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            combine: Combine::Auto,
            robust_from_clients: 5,
            norm_bound_factor: 3.0,
            sample_cap_factor: 3.0,
            trim_fraction: 0.1,
            krum_byzantine: 1,
            krum_select: 1,
            clip_norm: 0.0,
        }
    }
}

impl Aggregation {
    /// Checks the values that do not depend on a round; the message names the key.
    fn validate(&self, section: &str, max_update_norm: f32) -> Result<(), String> {
        let unit = |v: f32| (0.0..1.0).contains(&v);
        if let Some(lr) = self.server_learning_rate {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!(
                    "{section}.server_learning_rate must be a finite number > 0"
                ));
            }
        }
        if !unit(self.momentum) {
            return Err(format!("{section}.momentum must be in [0, 1)"));
        }
        if !unit(self.beta1) || !unit(self.beta2) {
            return Err(format!(
                "{section}.beta1 and {section}.beta2 must be in [0, 1)"
            ));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(format!("{section}.tau must be a finite number > 0"));
        }
        if !(0.0..0.5).contains(&self.trim_fraction) {
            return Err(format!("{section}.trim_fraction must be in [0, 0.5)"));
        }
        if self.krum_select == 0 {
            return Err(format!("{section}.krum_select must be >= 1"));
        }
        let krum_min = 2 * self.krum_byzantine + 3;
        if self.combine == Combine::Auto
            && self.robust_from_clients > 0
            && self.robust_from_clients < krum_min
        {
            return Err(format!(
                "{section}.robust_from_clients must be 0 (never) or >= {krum_min} (multi-Krum \
                 with krum_byzantine = {} needs 2f + 3 updates)",
                self.krum_byzantine
            ));
        }
        for (key, v) in [
            ("norm_bound_factor", self.norm_bound_factor),
            ("sample_cap_factor", self.sample_cap_factor),
        ] {
            if !(v.is_finite() && (v == 0.0 || v >= 1.0)) {
                return Err(format!(
                    "{section}.{key} must be 0 (off) or a finite number >= 1"
                ));
            }
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            return Err(format!("{section}.clip_norm must be a finite number >= 0"));
        }
        if self.clip_norm > max_update_norm {
            return Err(format!(
                "{section}.clip_norm ({}) must not exceed max_update_norm ({max_update_norm})",
                self.clip_norm
            ));
        }
        Ok(())
    }

    /// Whether a round of up to `max_clients` updates of `model_bytes` each keeps its decoded
    /// updates: always for the methods that need them, for `auto` when they fit
    /// `memory_limit_bytes` (else the round uses the running sum).
    pub fn keeps_for_round(
        &self,
        max_clients: u32,
        model_bytes: u64,
        memory_limit_bytes: u64,
    ) -> bool {
        match self.combine {
            Combine::Mean => false,
            Combine::Auto => {
                u64::from(max_clients).saturating_mul(model_bytes) <= memory_limit_bytes
            }
            _ => true,
        }
    }

    /// Checks a round's client bounds against the method: Krum needs `min_clients >= 2f + 3`
    /// and `krum_select <= min_clients - f`; methods that keep updates need
    /// `max_clients × model_bytes` within `memory_limit_bytes`.
    pub fn check_round(
        &self,
        min_clients: u32,
        max_clients: u32,
        model_bytes: u64,
        memory_limit_bytes: u64,
    ) -> Result<(), String> {
        if self.combine == Combine::Krum {
            let f = self.krum_byzantine;
            if min_clients < 2 * f + 3 {
                return Err(format!(
                    "krum with krum_byzantine = {f} needs min_clients >= {} (2f + 3), got {min_clients}",
                    2 * f + 3
                ));
            }
            if self.krum_select > min_clients - f {
                return Err(format!(
                    "krum_select ({}) must be <= min_clients - krum_byzantine ({})",
                    self.krum_select,
                    min_clients - f
                ));
            }
        }
        if self.combine.keeps_updates() {
            let need = u64::from(max_clients).saturating_mul(model_bytes);
            if need > memory_limit_bytes {
                return Err(format!(
                    "combine = \"{}\" keeps every update of a round: max_clients ({max_clients}) × \
                     {model_bytes} bytes per update = {need} bytes exceeds max_round_memory_mb \
                     ({} MiB = {memory_limit_bytes} bytes); lower max_clients, raise \
                     max_round_memory_mb or use combine = \"mean\"",
                    self.combine.as_str(),
                    memory_limit_bytes >> 20
                ));
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Bytes of one decoded f32 update of this model (4 × parameters), from the `init` file
    /// or the task's default MLP.
    pub fn update_bytes(&self, data_dir: &std::path::Path) -> Result<u64, String> {
        let params = match &self.init {
            Some(p) => {
                let bytes =
                    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                let model = hearth_model::OnnxModel::from_bytes(&bytes)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                hearth_model::num_params(&model.weights())
            }
            None => {
                let spec = hearth_model::TaskSpec::resolve(&self.task, data_dir)
                    .map_err(|e| format!("unknown task {:?}: {e}", self.task))?
                    .mlp_spec();
                let mut widths = vec![spec.input_len];
                widths.extend(&spec.hidden);
                widths.push(spec.classes.len());
                widths.windows(2).map(|w| (w[0] + 1) * w[1]).sum()
            }
        };
        Ok(4 * params as u64)
    }
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
            // The codec sweep's choice (BENCHMARKS.md, "Codec sweep"): the fewest uplink bytes
            // within one point of the fp32 run (momentum clients, digits, 9 seeds).
            quant_bits: 4,
            topk_fraction: 0.1,
            clients_per_round: 0,
            client_fraction: 0.0,
            min_available_clients: 0,
            available_wait_secs: 0,
            available_window_secs: 120,
            selection_seed: None,
            max_rounds_per_refresh: 100,
            eval_fraction: 0.0,
        }
    }
}

/// Stands in for a secret in `Debug` output: says whether it is set, never what it is.
struct Redacted(bool);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0 { "<redacted>" } else { "<empty>" })
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("db_path", &self.db_path)
            .field("store", &self.store)
            .field("data_dir", &self.data_dir)
            .field("admin_token", &Redacted(!self.admin_token.is_empty()))
            .field(
                "enrollment_tokens",
                &format_args!("[{} redacted]", self.enrollment_tokens.len()),
            )
            .field("max_update_bytes", &self.max_update_bytes)
            .field("upload_timeout_secs", &self.upload_timeout_secs)
            .field("fetch_timeout_secs", &self.fetch_timeout_secs)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("server_learning_rate", &self.server_learning_rate)
            .field("max_update_norm", &self.max_update_norm)
            .field("max_client_samples", &self.max_client_samples)
            .field("max_round_memory_mb", &self.max_round_memory_mb)
            .field("limits", &self.limits)
            .field("round", &self.round)
            .field("aggregation", &self.aggregation)
            .field("model_aggregation", &self.model_aggregation)
            .field("client_training", &self.client_training)
            .field("model_training", &self.model_training)
            .field("models", &self.models)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: String::new(),
            db_path: "hearth-coordinator.db".into(),
            store: StoreConfig::default(),
            signing_key_file: None,
            data_dir: "data".into(),
            admin_token: String::new(),
            enrollment_tokens: Vec::new(),
            enrollment_token_ttl_secs: 24 * 3600,
            insecure: false,
            pki_dir: None,
            tls_names: vec!["localhost".into(), "127.0.0.1".into()],
            client_cert_days: 365,
            max_update_bytes: 16 * 1024 * 1024,
            upload_timeout_secs: 60,
            fetch_timeout_secs: 120,
            shutdown_grace_secs: 10,
            server_learning_rate: 1.0,
            max_update_norm: 50.0,
            max_client_samples: 1_000_000,
            max_round_memory_mb: 256,
            rate_limit: crate::ratelimit::RateLimitConfig::default(),
            limits: crate::limits::Limits::default(),
            round: RoundDefaults::default(),
            aggregation: Aggregation::default(),
            model_aggregation: BTreeMap::new(),
            client_training: ClientTraining::default(),
            model_training: BTreeMap::new(),
            downlink: Downlink::default(),
            upstream: None,
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

    /// The model-signing key file: `signing_key_file`, or `<db_path>.signing-key`.
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key_file.clone().unwrap_or_else(|| {
            let mut s = self.db_path.as_os_str().to_os_string();
            s.push(".signing-key");
            PathBuf::from(s)
        })
    }

    /// The PKI directory: `pki_dir`, or `pki` beside the database.
    pub fn pki_dir(&self) -> PathBuf {
        match &self.pki_dir {
            Some(d) => d.clone(),
            None => self
                .db_path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("pki"),
        }
    }

    /// The names of the server certificate: `tls_names` plus `listen`'s host when it is a
    /// specific address (not 0.0.0.0 / ::).
    pub fn server_names(&self) -> Vec<String> {
        let mut names = self.tls_names.clone();
        if let Ok(a) = self.listen.parse::<std::net::SocketAddr>() {
            let ip = a.ip();
            if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
                names.push(ip.to_string());
            }
        }
        names
    }

    /// The configuration as TOML (what `--print-default-config` prints for the defaults).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }

    /// Checks every value; the message names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "metrics_listen {:?} is not an address like 127.0.0.1:9464 (empty turns it off)",
                self.metrics_listen
            ));
        }
        if self.admin_token.len() < 16 {
            return bad("admin_token must be set and at least 16 characters long \
                 (set it in the file or with --admin-token / HEARTH_ADMIN_TOKEN)"
                .into());
        }
        if self.db_path.as_os_str().is_empty() {
            return bad("db_path must not be empty".into());
        }
        self.store.validate().or_else(bad)?;
        if self.enrollment_token_ttl_secs == 0 {
            return bad("enrollment_token_ttl_secs must be >= 1".into());
        }
        if !self.insecure {
            if self.tls_names.is_empty() {
                return bad("tls_names must name at least one host (e.g. \"localhost\")".into());
            }
            if let Some(n) = self.tls_names.iter().find(|n| {
                n.is_empty()
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:*".contains(&b))
            }) {
                return bad(format!(
                    "tls_names entry {n:?} is not a host name or IP address"
                ));
            }
            if self.client_cert_days == 0 || self.client_cert_days > 3650 {
                return bad("client_cert_days must be in 1..=3650".into());
            }
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
        if self.max_client_samples == 0 {
            return bad("max_client_samples must be >= 1".into());
        }
        if self.max_round_memory_mb == 0 || self.max_round_memory_mb > 1 << 20 {
            return bad("max_round_memory_mb must be in 1..=1048576".into());
        }
        self.rate_limit.validate().or_else(bad)?;
        self.limits.validate().map_err(ConfigError::Invalid)?;
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
        if !hearth_model::update::valid_bits(r.quant_bits) {
            return bad(
                "round.quant_bits must be 1 (sign), in 2..=8, or 32 (uncompressed f32)".into(),
            );
        }
        let d = &self.downlink;
        if !(d.bits == 0 || hearth_model::update::valid_bits(d.bits)) {
            return bad(
                "downlink.bits must be 0 (off), 1 (sign), in 2..=8, or 32 (exact f32)".into(),
            );
        }
        if !(d.topk_fraction > 0.0 && d.topk_fraction <= 1.0) {
            return bad("downlink.topk_fraction must be in (0, 1]".into());
        }
        if !(r.topk_fraction > 0.0 && r.topk_fraction <= 1.0) {
            return bad("round.topk_fraction must be in (0, 1]".into());
        }
        if !(r.client_fraction.is_finite() && (0.0..=1.0).contains(&r.client_fraction)) {
            return bad("round.client_fraction must be in [0, 1] (0 = no selection)".into());
        }
        if r.clients_per_round > 0 && r.clients_per_round < r.min_clients {
            return bad(format!(
                "round.clients_per_round ({}) must be 0 or >= round.min_clients ({})",
                r.clients_per_round, r.min_clients
            ));
        }
        if r.available_wait_secs > 24 * 3600 {
            return bad("round.available_wait_secs must be <= 86400".into());
        }
        if r.available_window_secs == 0 {
            return bad("round.available_window_secs must be >= 1".into());
        }
        if r.max_rounds_per_refresh == 0 || r.max_rounds_per_refresh > 10_000 {
            return bad("round.max_rounds_per_refresh must be in 1..=10000".into());
        }
        if !(r.eval_fraction.is_finite() && (0.0..0.9).contains(&r.eval_fraction)) {
            return bad("round.eval_fraction must be in [0, 0.9)".into());
        }
        self.client_training
            .validate("client_training")
            .or_else(bad)?;
        for (name, t) in &self.model_training {
            if self.model(name).is_none() {
                return bad(format!(
                    "model_training.{name} names no configured [[model]]"
                ));
            }
            t.validate(&format!("model_training.{name}")).or_else(bad)?;
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
            if self.upstream.is_some() {
                if m.init.is_some() || m.eval {
                    return bad(format!(
                        "model[{i}] ({}): a home aggregator ([upstream]) takes its versions from \
                         upstream: set eval = false and no init file",
                        m.name
                    ));
                }
            } else if let Err(e) = hearth_model::TaskSpec::resolve(&m.task, &self.data_dir) {
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
            let a = self.aggregation_for(&m.name);
            let section = if self.model_aggregation.contains_key(&m.name) {
                format!("model_aggregation.{}", m.name)
            } else {
                "aggregation".to_string()
            };
            a.validate(&section, self.max_update_norm).or_else(bad)?;
            // A home aggregator's models are unknown until upstream sends them: their rounds
            // are checked when they open.
            let model_bytes = if a.combine.keeps_updates() && self.upstream.is_none() {
                m.update_bytes(&self.data_dir)
                    .map_err(|e| ConfigError::Invalid(format!("model[{i}] ({}): {e}", m.name)))?
            } else {
                0
            };
            a.check_round(
                r.min_clients,
                r.max_clients,
                model_bytes,
                self.round_memory_limit(),
            )
            .or_else(|e| {
                bad(format!(
                    "{section} (model {}, [round] defaults): {e}",
                    m.name
                ))
            })?;
        }
        if let Some(name) = self
            .model_aggregation
            .keys()
            .find(|n| self.model(n).is_none())
        {
            return bad(format!(
                "model_aggregation.{name} names no configured [[model]]"
            ));
        }
        self.aggregation
            .validate("aggregation", self.max_update_norm)
            .or_else(bad)?;
        if let Some(u) = &self.upstream {
            u.validate().or_else(bad)?;
            // The upstream must never receive one device's update as the home's aggregate.
            if r.min_clients < 2 {
                return bad(format!(
                    "a home aggregator ([upstream]) needs round.min_clients >= 2 (got {}): \
                     a round of one update would send that device's update upstream",
                    r.min_clients
                ));
            }
            for m in &self.models {
                let a = self.aggregation_for(&m.name);
                if a.combine == Combine::Krum && a.krum_select < 2 {
                    return bad(format!(
                        "a home aggregator cannot use combine = \"krum\" with krum_select < 2 \
                         (model {}): the aggregate would be one device's update",
                        m.name
                    ));
                }
            }
            if self.store.backend != StoreBackend::Sled {
                return bad("a home aggregator ([upstream]) keeps its state in sled: \
                     store.backend must be \"sled\""
                    .into());
            }
        }
        Ok(())
    }

    /// Where a home aggregator keeps its upstream identity: `upstream.credentials_file`, or
    /// `<db_path>.upstream.json`.
    pub fn upstream_credentials_path(&self) -> PathBuf {
        self.upstream
            .as_ref()
            .and_then(|u| u.credentials_file.clone())
            .unwrap_or_else(|| {
                let mut s = self.db_path.as_os_str().to_os_string();
                s.push(".upstream.json");
                PathBuf::from(s)
            })
    }

    /// The aggregation of model `name`.
    pub fn aggregation_for(&self, name: &str) -> &Aggregation {
        self.model_aggregation
            .get(name)
            .unwrap_or(&self.aggregation)
    }

    /// The client training of model `name`.
    pub fn training_for(&self, name: &str) -> ClientTraining {
        *self
            .model_training
            .get(name)
            .unwrap_or(&self.client_training)
    }

    /// `max_round_memory_mb` in bytes.
    pub fn round_memory_limit(&self) -> u64 {
        self.max_round_memory_mb << 20
    }

    /// The configured model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_section_is_validated_and_its_url_redacted() {
        let with = |toml: &str| {
            let mut c = Config::from_toml_str(toml).unwrap();
            c.admin_token = "admin-secret-0123456789".into();
            c
        };
        let url = "postgres://hearth:pg-secret-99@127.0.0.1:5432/hearth";
        let ok = with(&format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\n"));
        ok.validate().unwrap();
        assert_eq!(ok.store.backend, StoreBackend::Postgres);
        let text = format!("{ok:?} {ok:#?}");
        assert!(!text.contains("pg-secret-99"), "{text}");
        // The default is sled, and the default config round-trips through its TOML.
        let d = Config::default();
        assert_eq!(d.store.backend, StoreBackend::Sled);
        assert_eq!(Config::from_toml_str(&d.to_toml()).unwrap(), d);
        for (bad, key) in [
            ("[store]\nbackend = \"postgres\"\n", "store.url"),
            (&format!("[store]\nurl = {url:?}\n")[..], "store.url"),
            (
                "[store]\nbackend = \"postgres\"\nurl = \"postgres://h/db?sslmode=bogus\"\n",
                "store.url",
            ),
            (
                &format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\npool_size = 1\n")[..],
                "store.pool_size",
            ),
            (
                &format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\ninstance = \"a b\"\n")[..],
                "store.instance",
            ),
        ] {
            let e = with(bad).validate().unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
            assert!(!e.contains("pg-secret-99"), "{e}");
        }
        assert!(Config::from_toml_str("[store]\nbackend = \"mysql\"\n").is_err());
    }

    #[test]
    fn debug_output_redacts_tokens() {
        let c = Config {
            admin_token: "admin-secret-0123456789".into(),
            enrollment_tokens: vec!["enrol-secret-42".into()],
            ..Config::default()
        };
        let text = format!("{c:?} {c:#?}");
        assert!(!text.contains("admin-secret-0123456789"), "{text}");
        assert!(!text.contains("enrol-secret-42"), "{text}");
        assert!(text.contains("<redacted>") && text.contains("max_update_bytes"));
    }

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
    fn aggregation_parses_per_model_and_defaults_to_fedavg() {
        let c = Config::from_toml_str(
            "admin_token = \"0123456789abcdef\"\nmax_client_samples = 500\n\
             [round]\nmin_clients = 5\nmax_clients = 8\n\
             [aggregation]\noptimizer = \"fedavgm\"\nmomentum = 0.5\n\
             [model_aggregation.digits]\noptimizer = \"fedadam\"\ncombine = \"krum\"\n\
             krum_byzantine = 1\nkrum_select = 3\nclip_norm = 5.0\nserver_learning_rate = 0.01\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_client_samples, 500);
        let d = c.aggregation_for("digits");
        assert_eq!(
            (d.optimizer, d.combine),
            (ServerOptimizer::FedAdam, Combine::Krum)
        );
        assert_eq!(d.server_learning_rate, Some(0.01));
        assert_eq!(d.momentum, 0.9, "keys left out take the built-in defaults");
        let p = c.aggregation_for("plaid");
        assert_eq!(
            (p.optimizer, p.combine),
            (ServerOptimizer::FedAvgM, Combine::Auto)
        );
        assert_eq!(p.momentum, 0.5);
        let back = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let d = Config::default();
        assert_eq!(d.aggregation, Aggregation::default());
        assert_eq!(d.aggregation.optimizer, ServerOptimizer::FedAvg);
        assert_eq!(d.aggregation.combine, Combine::Auto);
        assert_eq!(d.aggregation.robust_from_clients, 5);
        assert_eq!(d.aggregation.norm_bound_factor, 3.0);
        assert_eq!(d.aggregation.sample_cap_factor, 3.0);
        assert_eq!(d.aggregation.clip_norm, 0.0);
        // An explicit choice wins: "mean" is plain FedAvg.
        let m = Config::from_toml_str("[aggregation]\ncombine = \"mean\"\n").unwrap();
        assert_eq!(m.aggregation.combine, Combine::Mean);
    }

    #[test]
    fn bad_aggregation_is_refused_with_the_key() {
        let krum = |c: &mut Config, min: u32, select: u32| {
            c.round.min_clients = min;
            c.round.max_clients = min;
            c.aggregation.combine = Combine::Krum;
            c.aggregation.krum_byzantine = 2;
            c.aggregation.krum_select = select;
        };
        type Change<'a> = &'a dyn Fn(&mut Config);
        let cases: [(Change, &str); 10] = [
            (
                &|c| c.aggregation.robust_from_clients = 2,
                "aggregation.robust_from_clients",
            ),
            (
                &|c| c.aggregation.norm_bound_factor = 0.5,
                "aggregation.norm_bound_factor",
            ),
            (&|c| c.rate_limit.burst = 0, "rate_limit.burst"),
            (
                &|c| c.aggregation.trim_fraction = 0.5,
                "aggregation.trim_fraction",
            ),
            (
                &|c| {
                    let beta2 = Aggregation {
                        beta2: 1.0,
                        ..Aggregation::default()
                    };
                    c.model_aggregation.insert("faces".into(), beta2);
                },
                "model_aggregation.faces.beta1 and model_aggregation.faces.beta2",
            ),
            (
                &|c| {
                    c.model_aggregation
                        .insert("cats".into(), Aggregation::default());
                },
                "model_aggregation.cats names no configured",
            ),
            (
                &|c| c.aggregation.clip_norm = 60.0,
                "must not exceed max_update_norm",
            ),
            (&|c| krum(c, 2, 1), "needs min_clients >= 7"),
            (
                &|c| krum(c, 7, 6),
                "krum_select (6) must be <= min_clients - krum_byzantine (5)",
            ),
            (&|c| c.max_client_samples = 0, "max_client_samples"),
        ];
        for (change, want) in cases {
            let mut c = valid();
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        // An unknown optimizer is a parse error that lists the known ones.
        let sgd = Config::from_toml_str("[aggregation]\noptimizer = \"sgd\"\n");
        assert!(
            matches!(sgd, Err(ConfigError::Parse { message, .. }) if message.contains("fedadam"))
        );
    }

    #[test]
    fn robust_methods_need_their_updates_to_fit_the_memory_limit() {
        // digits: (64 + 1)·32 + (32 + 1)·10 = 2410 parameters, 9640 bytes per update.
        let digits = Config::default().models[2].clone();
        assert_eq!(
            digits.update_bytes(&Config::default().data_dir).unwrap(),
            9640
        );
        let mut c = valid();
        c.models = vec![digits];
        c.model_aggregation.insert(
            "digits".into(),
            Aggregation {
                combine: Combine::Median,
                ..Aggregation::default()
            },
        );
        c.max_round_memory_mb = 1;
        c.round.max_clients = 108; // 108 × 9640 = 1041120 ≤ 1 MiB
        c.validate().unwrap();
        c.round.max_clients = 109; // 1050760 > 1048576
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("max_clients (109)") && e.contains("max_round_memory_mb (1 MiB"),
            "{e}"
        );
        // The running mean keeps no updates: no limit applies; `auto` keeps them only when
        // they fit, so it is never refused.
        c.model_aggregation.clear();
        c.validate().unwrap();
        let a = &c.aggregation;
        assert_eq!(a.combine, Combine::Auto);
        assert!(a.keeps_for_round(108, 9640, c.round_memory_limit()));
        assert!(!a.keeps_for_round(109, 9640, c.round_memory_limit()));
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
        // Value widths the codec reads: 1 (sign), 2..=8, 32; the downlink also 0 (off).
        for (bits, ok) in [(0, false), (1, true), (4, true), (9, false), (32, true)] {
            let mut c = valid();
            c.round.quant_bits = bits;
            assert_eq!(c.validate().is_ok(), ok, "quant_bits {bits}");
            let mut c = valid();
            c.downlink.bits = bits;
            assert_eq!(
                c.validate().is_ok(),
                ok || bits == 0,
                "downlink bits {bits}"
            );
        }
    }
}
