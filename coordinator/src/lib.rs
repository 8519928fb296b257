//! Hearth coordinator: the gRPC service that enrolls clients, runs federated rounds, folds
//! quantized updates into a running FedAvg sum, and publishes new model versions.
//!
//! - [`config`]: TOML configuration with defaults and validation.
//! - [`store`]: all durable state behind one interface (sled, or PostgreSQL shared by
//!   several instances).
//! - [`cluster`]: instances sharing one database learn of each other's rounds and versions.
//! - [`aggregate`]: O(model) running weighted sum, update validation and clipping.
//! - [`robust`]: median, trimmed mean and Krum over a round's kept updates.
//! - [`optimizer`]: server optimizers (FedAvg, FedAvgM, FedAdam, FedYogi) and their state.
//! - [`state`] / [`rounds`]: the domain (enrollment, auth, round lifecycle, crash recovery).
//! - [`ratelimit`]: per-client token buckets (bounded table) the gRPC edge consults.
//! - [`signing`]: the model-signing key; every published version is signed with it.
//! - [`pki`]: the coordinator's CA: server certificate, client certificates from CSRs.
//! - [`metrics`]: counters for Prometheus; every refusal is logged and counted there.
//! - [`service`]: tonic services; the only place with wire types.
//! - [`server`]: [`run`] and [`start`].
//! - [`client`]: TLS channels to a coordinator, for the CLI subcommands and tests.
//! - [`upstream`]: home aggregator mode — versions and rounds from an upstream coordinator,
//!   each local round sent there as one update.
//! - [`plot`]: accuracy per version and bytes per round as SVG (`hearth-coordinator plot`).
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod client;
pub mod cluster;
pub mod config;
pub mod handshake;
pub mod limits;
pub mod metrics;
pub mod optimizer;
pub mod pki;
pub mod plot;
pub mod ratelimit;
pub mod robust;
pub mod rounds;
pub mod server;
pub mod service;
pub mod signing;
pub mod state;
pub mod store;
pub mod upstream;

pub use config::{
    Aggregation, ClientOptimizer, ClientTraining, Combine, Config, ConfigError, Downlink,
    ModelConfig, RoundDefaults, ServerOptimizer, StoreBackend, StoreConfig, UpstreamConfig,
};
pub use server::{run, start, CoordinatorHandle};
pub use state::Coordinator;

/// Coordinator errors.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Storage failure.
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    /// Model (ONNX, codec, evaluation) failure.
    #[error("model: {0}")]
    Model(#[from] hearth_model::ModelError),
    /// I/O failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// gRPC transport failure.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Certificate authority failure.
    #[error("PKI: {0}")]
    Pki(#[from] pki::PkiError),
    /// Start-up failure (models, data sets).
    #[error("start-up: {0}")]
    Init(String),
    /// Home aggregator: the upstream coordinator cannot be reached.
    #[error("upstream coordinator: {0}")]
    Upstream(String),
    /// Anything else that should not happen.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Whether a service the coordinator needs is unavailable (the database at start-up): the
    /// binary exits 69, as for a port it cannot bind.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Store(store::StoreError::Unavailable(_)) | Error::Upstream(_)
        )
    }
}
