//! Hearth wire types.
//!
//! - [`v1`]: the gRPC federation protocol (enrollment, federation, admin), generated
//!   from `proto/hearth/federation.proto` at build time by protox + tonic-prost-build.
//! - [`mqtt`]: the JSON messages Hearth puts on MQTT topics, with their validation
//!   (the hub's privacy guard uses it to refuse anything that is not a small event).
//! - [`signing`]: the model-signature scheme shared by the coordinator,
//!   which signs every published version, and the agent, which verifies it.
//!
//! Wire types stay at the edges; the crates convert them to domain types.
#![forbid(unsafe_code)]

pub mod mqtt;
pub mod signing;

/// Generated gRPC types and services for `hearth.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("hearth.v1");
}

/// Metadata key carrying the enrolled client id on federation calls.
pub const CLIENT_ID_HEADER: &str = "x-hearth-client";
/// Metadata key carrying the enrolled client's secret key.
pub const CLIENT_KEY_HEADER: &str = "x-hearth-key";
/// Size of one model chunk on `FetchModel` and of upload chunks.
pub const CHUNK_SIZE: usize = 64 * 1024;
