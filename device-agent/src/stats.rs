//! Counters the agent exposes while it runs (`Arc<AgentStats>`).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters of one agent. All fields are monotonic except `model_version`.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Samples replayed through the classifier.
    pub samples_replayed: AtomicU64,
    /// Events handed to the MQTT client (QoS 1).
    pub events_published: AtomicU64,
    /// Verdicts below `min_event_score`, not published.
    pub events_suppressed: AtomicU64,
    /// Verdicts that failed inference or event validation.
    pub inference_errors: AtomicU64,
    /// Rounds whose update the coordinator acknowledged (accepted or duplicate).
    pub rounds_joined: AtomicU64,
    /// Rounds the agent tried but could not complete (training, upload or rejection).
    pub rounds_failed: AtomicU64,
    /// Update payload bytes acknowledged by the coordinator.
    pub bytes_uploaded: AtomicU64,
    /// Local training runs for a round (a resumed upload does not train again).
    pub local_trainings: AtomicU64,
    /// Updates re-sent from the state directory after a restart (no retraining).
    pub uploads_resumed: AtomicU64,
    /// Rounds that completed with this device's update: its residual was committed.
    pub rounds_committed: AtomicU64,
    /// Rounds that failed after this device's update was acknowledged, or closed before it
    /// arrived: the residual went back to the one before the round.
    pub rounds_rolled_back: AtomicU64,
    /// Model bytes downloaded from the coordinator (whole files and coded deltas).
    pub bytes_downloaded: AtomicU64,
    /// Versions rebuilt from a coded delta against the version in use (compressed downlink).
    pub models_from_delta: AtomicU64,
    /// Deltas that did not rebuild the signed model (bad delta, or a base that differs from
    /// the coordinator's): the whole file was fetched instead.
    pub delta_fallbacks: AtomicU64,
    /// Model versions hot-swapped in since start.
    pub models_loaded: AtomicU64,
    /// Version of the model currently used for inference (0 = local bootstrap).
    pub model_version: AtomicU64,
    /// MQTT (re)connections acknowledged by the broker.
    pub mqtt_connects: AtomicU64,
    /// Downloaded models refused (the current one kept): the sum of the three below.
    pub models_refused: AtomicU64,
    /// … unsigned, or the signature does not verify with the pinned coordinator key (wrong
    /// key, another model name, version or parent than signed).
    pub models_refused_signature: AtomicU64,
    /// … the bytes do not hash to the signed (or announced) digest or size.
    pub models_refused_digest: AtomicU64,
    /// … validly signed but not a successor of the model in use (not newer: a replay; or its
    /// signed parent is older than the version in use).
    pub models_refused_lineage: AtomicU64,
    /// Live source: readings accepted into the window loop.
    pub readings: AtomicU64,
    /// Live source: messages or lines without the reading (field absent or null, empty line).
    pub readings_missing: AtomicU64,
    /// Live source: readings that were not a finite number, not JSON, too long, or had the
    /// wrong number of channels.
    pub readings_malformed: AtomicU64,
    /// Live source: readings dropped because the window loop lagged behind.
    pub readings_dropped: AtomicU64,
    /// Live source: windows classified.
    pub windows: AtomicU64,
    /// Samples kept in the on-device store behind an event.
    pub samples_stored: AtomicU64,
    /// Feedback messages that labelled a stored sample.
    pub feedback_applied: AtomicU64,
    /// Feedback refused: malformed, an unknown class, or no stored sample behind the event.
    pub feedback_refused: AtomicU64,
    /// Camera: track embeddings classified by the head (learning on the camera).
    pub head_verdicts: AtomicU64,
    /// Idle distillation runs finished (installed or not).
    pub distill_runs: AtomicU64,
    /// … whose student was installed as the model in use (not worse on the check split).
    pub distill_installed: AtomicU64,
    /// Unlabelled samples the teachers pseudo-labelled, over all runs.
    pub distill_pseudo_labelled: AtomicU64,
    /// Wall time of the runs, milliseconds.
    pub distill_millis: AtomicU64,
}

/// A plain copy of [`AgentStats`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub samples_replayed: u64,
    pub events_published: u64,
    pub events_suppressed: u64,
    pub inference_errors: u64,
    pub rounds_joined: u64,
    pub rounds_failed: u64,
    pub bytes_uploaded: u64,
    pub local_trainings: u64,
    pub uploads_resumed: u64,
    pub rounds_committed: u64,
    pub rounds_rolled_back: u64,
    pub bytes_downloaded: u64,
    pub models_from_delta: u64,
    pub delta_fallbacks: u64,
    pub models_loaded: u64,
    pub model_version: u64,
    pub mqtt_connects: u64,
    pub models_refused: u64,
    pub models_refused_signature: u64,
    pub models_refused_digest: u64,
    pub models_refused_lineage: u64,
    pub readings: u64,
    pub readings_missing: u64,
    pub readings_malformed: u64,
    pub readings_dropped: u64,
    pub windows: u64,
    pub samples_stored: u64,
    pub feedback_applied: u64,
    pub feedback_refused: u64,
    pub head_verdicts: u64,
    pub distill_runs: u64,
    pub distill_installed: u64,
    pub distill_pseudo_labelled: u64,
    pub distill_millis: u64,
}

impl AgentStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            samples_replayed: r(&self.samples_replayed),
            events_published: r(&self.events_published),
            events_suppressed: r(&self.events_suppressed),
            inference_errors: r(&self.inference_errors),
            rounds_joined: r(&self.rounds_joined),
            rounds_failed: r(&self.rounds_failed),
            bytes_uploaded: r(&self.bytes_uploaded),
            local_trainings: r(&self.local_trainings),
            uploads_resumed: r(&self.uploads_resumed),
            rounds_committed: r(&self.rounds_committed),
            rounds_rolled_back: r(&self.rounds_rolled_back),
            bytes_downloaded: r(&self.bytes_downloaded),
            models_from_delta: r(&self.models_from_delta),
            delta_fallbacks: r(&self.delta_fallbacks),
            models_loaded: r(&self.models_loaded),
            model_version: r(&self.model_version),
            mqtt_connects: r(&self.mqtt_connects),
            models_refused: r(&self.models_refused),
            models_refused_signature: r(&self.models_refused_signature),
            models_refused_digest: r(&self.models_refused_digest),
            models_refused_lineage: r(&self.models_refused_lineage),
            readings: r(&self.readings),
            readings_missing: r(&self.readings_missing),
            readings_malformed: r(&self.readings_malformed),
            readings_dropped: r(&self.readings_dropped),
            windows: r(&self.windows),
            samples_stored: r(&self.samples_stored),
            feedback_applied: r(&self.feedback_applied),
            feedback_refused: r(&self.feedback_refused),
            head_verdicts: r(&self.head_verdicts),
            distill_runs: r(&self.distill_runs),
            distill_installed: r(&self.distill_installed),
            distill_pseudo_labelled: r(&self.distill_pseudo_labelled),
            distill_millis: r(&self.distill_millis),
        }
    }
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
