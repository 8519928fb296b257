//! The edge layer's error type.

/// Everything the edge layer can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A broker URL that does not follow the rules of [`crate::url`]. A configuration error.
    #[error("broker URL `{url}`: {reason}")]
    Url {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Inconsistent client settings (credentials twice, a CA file without TLS, …).
    /// A configuration error.
    #[error("{0}")]
    Settings(String),
    /// The TLS trust anchors cannot be loaded (missing or invalid CA file). A configuration error.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listening socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// What wanted the socket.
        what: &'static str,
        /// The address asked for.
        addr: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The embedded broker did not come up.
    #[error("embedded MQTT broker: {0}")]
    Broker(String),
    /// Other I/O failures.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether this is a configuration error (exit code 64) rather than an unavailable
    /// resource (exit code 69).
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Url { .. } | Error::Settings(_) | Error::Tls(_))
    }
}
