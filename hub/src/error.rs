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
    /// The device registry's database cannot be opened (locked by a running hub, damaged).
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Other I/O failures.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Edge errors keep their meaning: configuration problems exit with 64, a port that cannot
/// be bound or a broker that does not come up with 69.
impl From<hearth_edge::Error> for Error {
    fn from(e: hearth_edge::Error) -> Self {
        match e {
            e if e.is_config() => Error::Config(e.to_string()),
            hearth_edge::Error::Bind { what, addr, source } => Error::Bind { what, addr, source },
            hearth_edge::Error::Io(e) => Error::Io(e),
            e => Error::Broker(e.to_string()),
        }
    }
}
