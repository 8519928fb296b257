//! Errors of the device agent library.

use std::path::PathBuf;

/// Everything that can go wrong in the agent or the virtual actuator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable (bad value, unknown field, missing file).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model library refused a model, a data set or an update.
    #[error("model: {0}")]
    Model(#[from] hearth_model::ModelError),
    /// The MQTT client request queue is closed.
    #[error("MQTT client: {0}")]
    Mqtt(#[from] rumqttc::ClientError),
    /// A federation call returned an error status.
    #[error("coordinator call failed: {0}")]
    Rpc(Box<tonic::Status>),
    /// The coordinator URL or connection is unusable.
    #[error("coordinator transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Downloaded or stored bytes do not match their announced size or digest.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// The persisted state directory holds something unreadable.
    #[error("state: {0}")]
    State(String),
    /// The coordinator answered something the agent cannot use.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A background task panicked or was cancelled.
    #[error("background task: {0}")]
    Task(String),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc(Box::new(s))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
