//! Hearth device agent.
//!
//! An agent runs on a sensor or camera: it replays its own share of a data set
//! as if sensed, or reads a live source ([`source`]: a device's MQTT state topic, a
//! command's lines) into sliding windows, classifies each sample with the current compressed model
//! (tract, off the async runtime), publishes small schema-checked verdicts on
//! MQTT (never raw samples), and takes part in federated rounds: it trains on
//! its own samples and uploads only a clipped, quantized model delta.
//!
//! The crate also hosts a virtual Zigbee2MQTT-style switch ([`actuator`]).
//!
//! Entry points: [`start`] / [`run`] for the agent (which enrols itself at start when it has a
//! token and no credentials), [`enroll`] for an explicit enrolment, [`actuator::start_actuator`] /
//! [`actuator::run_actuator`] for the switch.
#![forbid(unsafe_code)]

pub mod actuator;
mod agent;
pub mod camera;
pub mod config;
pub mod distill;
mod error;
mod federation;
pub mod inference;
mod live;
pub mod metrics;
pub mod mqtt;
pub mod samples;
pub mod source;
pub mod state;
pub mod stats;

pub use agent::{run, start, AgentHandle};
pub use config::{Config, Partition};
pub use error::{Error, RpcCode};
pub use federation::{enroll, MAX_MODEL_BYTES};
pub use source::SourceConfig;
pub use stats::{AgentStats, StatsSnapshot};
