//! Hearth's edge layer: everything the hub, the agent, the actuator and their tests need
//! to talk MQTT and to behave as a well-mannered process, written once.
//!
//! - [`url`]: one MQTT URL parser (`mqtt://`, `tcp://`, `mqtts://`, credentials, IPv6).
//! - [`client`]: one builder of rumqttc client options, with real TLS (rustls + ring) for
//!   `mqtts://` trusting a CA file.
//! - [`backoff`]: one exponential backoff with jitter, capped, reset after a success.
//! - [`connection`]: one reconnect loop around rumqttc's event loop, with a shared
//!   up/down status, and the clean `offline` + disconnect at shutdown.
//!
//! Feature `mqtt` (default) gates the MQTT modules; `broker` adds the embedded broker.
//! - [`broker`] (feature `broker`): the embedded rumqttd configuration and a start-up that
//!   survives losing its port to someone else.
//! - [`passwd`] (feature `auth`, part of `broker`): Mosquitto password files (`$7$` hashes),
//!   generated passwords, private files written by rename.
//! - [`fsutil`]: durable whole-file replacement (temp file, fsync, rename, mode).
//! - [`process`]: SIGINT/SIGTERM, tracing initialisation, command-line parsing with the
//!   house exit codes (64 bad usage, 69 unavailable).
#![forbid(unsafe_code)]

pub mod backoff;
#[cfg(feature = "broker")]
pub mod broker;
#[cfg(feature = "mqtt")]
pub mod client;
#[cfg(feature = "mqtt")]
pub mod connection;
mod error;
pub mod fsutil;
#[cfg(feature = "auth")]
pub mod passwd;
pub mod process;
#[cfg(feature = "mqtt")]
pub mod url;

pub use backoff::Backoff;
#[cfg(feature = "mqtt")]
pub use client::ClientSettings;
#[cfg(feature = "mqtt")]
pub use connection::{Connection, LinkStatus};
pub use error::Error;
pub use process::{stopped, EXIT_UNAVAILABLE, EXIT_USAGE};
#[cfg(feature = "mqtt")]
pub use url::MqttUrl;
