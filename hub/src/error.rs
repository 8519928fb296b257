//! The hub's error type.

use crate::rules::RulesError;

/// Everything that can stop the hub from starting or a refresh from succeeding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (the binary exits with 64).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The rules file cannot be read or is invalid.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// A listening socket could not be bound (broker or metrics).
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    /// The embedded broker did not come up or the external one is unreachable.
    #[error("MQTT broker: {0}")]
    Broker(String),
    /// The coordinator could not be reached or refused the call.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// Other I/O failures.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
