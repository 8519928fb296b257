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
    /// The coordinator answered a call with an error.
    #[error("coordinator call failed: {code}: {message}")]
    Rpc {
        /// What kind of failure (the gRPC status code, as a domain value).
        code: RpcCode,
        /// The coordinator's message.
        message: String,
    },
    /// The coordinator (or the broker) cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// A listening socket could not be bound (the metrics endpoint).
    #[error("cannot bind {0}")]
    Bind(String),
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

/// Edge errors: configuration problems (broker URL, TLS files) stay configuration errors.
impl From<hearth_edge::Error> for Error {
    fn from(e: hearth_edge::Error) -> Self {
        if e.is_config() {
            Error::Config(e.to_string())
        } else {
            Error::Unavailable(e.to_string())
        }
    }
}

/// Why the coordinator refused a call: the gRPC status codes as a domain type, so that no
/// wire type appears in the agent's API (the conversion lives in the federation module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl RpcCode {
    /// Worth retrying: the coordinator or the network is (briefly) unavailable.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            RpcCode::Unavailable
                | RpcCode::Unknown
                | RpcCode::DeadlineExceeded
                | RpcCode::Cancelled
                | RpcCode::Aborted
                | RpcCode::ResourceExhausted
                | RpcCode::Internal
        )
    }
}

impl std::fmt::Display for RpcCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

impl Error {
    /// Whether retrying may help (an unreachable coordinator, a transient call failure).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Rpc { code, .. } => code.is_transient(),
            Error::Unavailable(_) => true,
            _ => false,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
