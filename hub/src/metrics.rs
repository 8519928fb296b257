//! Counters the hub keeps (atomics, shared as `Arc<Metrics>`) and their Prometheus text form.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use hearth_proto::mqtt::EventError;

/// Why an event payload was dropped by the privacy guard or the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over [`hearth_proto::mqtt::MAX_EVENT_BYTES`].
    TooLarge,
    /// Not JSON, wrong types, missing or extra fields.
    Schema,
    /// A string field empty, too long or with forbidden characters.
    BadField,
    /// Score outside `[0, 1]`.
    BadScore,
    /// Device or event name in the topic is not a valid name.
    BadTopic,
    /// A retained event (stale on subscribe; events are never routed twice).
    Retained,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 6] = [
        DropReason::TooLarge,
        DropReason::Schema,
        DropReason::BadField,
        DropReason::BadScore,
        DropReason::BadTopic,
        DropReason::Retained,
    ];

    /// Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::Schema => "schema",
            DropReason::BadField => "bad_field",
            DropReason::BadScore => "bad_score",
            DropReason::BadTopic => "bad_topic",
            DropReason::Retained => "retained",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<&EventError> for DropReason {
    fn from(e: &EventError) -> Self {
        match e {
            EventError::TooLarge(_) => DropReason::TooLarge,
            EventError::Schema(_) => DropReason::Schema,
            EventError::BadField(_) => DropReason::BadField,
            EventError::BadScore(_) => DropReason::BadScore,
        }
    }
}

/// Non-event messages the hub refused (meta, availability, refresh requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    /// `hearth/<device>/meta` that is not a `DeviceMeta`.
    Meta,
    /// `hearth/<device>/availability` other than `online` / `offline`.
    Availability,
    /// `hearth/federation/refresh` that is not a `RefreshRequest`.
    Refresh,
    /// `<base>/<device>` state that rules read but is not a JSON object.
    State,
}

impl InvalidKind {
    /// Every kind, in label order.
    pub const ALL: [InvalidKind; 4] = [
        InvalidKind::Meta,
        InvalidKind::Availability,
        InvalidKind::Refresh,
        InvalidKind::State,
    ];

    /// Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            InvalidKind::Meta => "meta",
            InvalidKind::Availability => "availability",
            InvalidKind::Refresh => "refresh",
            InvalidKind::State => "state",
        }
    }
}

/// Upper bounds (seconds) of the event → command latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A Prometheus histogram over [`LATENCY_BUCKETS`] (atomics; lock-free observation).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram as `name` (cumulative buckets, `+Inf`, sum, count).
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// The hub's counters. All monotonic; read with [`Metrics::get`] helpers or render them.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages received on event topics (valid or not).
    pub events_received: AtomicU64,
    /// Valid events that matched at least one rule.
    pub events_routed: AtomicU64,
    /// Rule firings suppressed by a cooldown.
    pub cooldown_suppressed: AtomicU64,
    /// Actuator commands handed to the MQTT client (QoS 1; again when re-sent).
    pub commands_published: AtomicU64,
    /// Actuator commands the broker acknowledged (they left the outbox).
    pub commands_acked: AtomicU64,
    /// Commands held because their actuator was offline.
    pub commands_held: AtomicU64,
    /// Held commands acknowledged by the broker after their actuator came back.
    pub commands_delivered_late: AtomicU64,
    /// Held commands dropped because they grew older than the expiry.
    pub commands_expired: AtomicU64,
    /// Held commands dropped because their actuator's queue was full.
    pub commands_dropped_over_cap: AtomicU64,
    /// Commands in the outbox not yet sent (a gauge).
    pub commands_waiting: AtomicU64,
    /// Actuator commands the MQTT client refused (connection gone).
    pub commands_failed: AtomicU64,
    /// Valid refresh requests received on `hearth/federation/refresh`.
    pub refresh_requests: AtomicU64,
    /// Refresh requests refused because no admin signed them (or the signature was stale,
    /// replayed or wrong).
    pub refresh_unauthorized: AtomicU64,
    /// Refresh requests the coordinator did not accept (or could not be reached).
    pub refresh_failures: AtomicU64,
    /// Model publications announced on `hearth/federation/model/<name>`.
    pub models_announced: AtomicU64,
    /// Device meta / availability updates applied to the registry.
    pub registry_updates: AtomicU64,
    /// MQTT (re)connections of the hub's clients.
    pub mqtt_connects: AtomicU64,
    /// Rule firings (all rules; per rule in `hearth_hub_rules_fired_total{rule}`).
    pub rules_fired: AtomicU64,
    /// Event receipt → broker PubAck of the command it caused.
    pub event_to_command: Histogram,
    dropped: [AtomicU64; DropReason::ALL.len()],
    invalid: [AtomicU64; InvalidKind::ALL.len()],
}

impl Metrics {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one dropped event; returns the new count for that reason.
    pub fn drop_event(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Dropped events for one reason.
    pub fn events_dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    /// Dropped events, all reasons.
    pub fn events_dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Counts one refused non-event message; returns the new count for that kind.
    pub fn invalid_message(&self, kind: InvalidKind) -> u64 {
        self.invalid[kind as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Refused non-event messages of one kind.
    pub fn invalid_messages(&self, kind: InvalidKind) -> u64 {
        self.invalid[kind as usize].load(Ordering::Relaxed)
    }

    /// Reads a counter (shorthand for `load(Relaxed)`).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        let simple: [(&str, &str, &AtomicU64); 16] = [
            (
                "events_received_total",
                "Messages received on hearth/+/event/+ topics.",
                &self.events_received,
            ),
            (
                "events_routed_total",
                "Valid events that matched at least one rule.",
                &self.events_routed,
            ),
            (
                "cooldown_suppressed_total",
                "Rule firings suppressed by a cooldown.",
                &self.cooldown_suppressed,
            ),
            (
                "commands_published_total",
                "Actuator commands published (QoS 1).",
                &self.commands_published,
            ),
            (
                "commands_acked_total",
                "Actuator commands acknowledged by the broker.",
                &self.commands_acked,
            ),
            (
                "commands_held_total",
                "Commands held while their actuator was offline.",
                &self.commands_held,
            ),
            (
                "commands_delivered_late_total",
                "Held commands delivered after their actuator came back.",
                &self.commands_delivered_late,
            ),
            (
                "commands_expired_total",
                "Held commands dropped as too old.",
                &self.commands_expired,
            ),
            (
                "commands_dropped_over_cap_total",
                "Held commands dropped because the actuator's queue was full.",
                &self.commands_dropped_over_cap,
            ),
            (
                "commands_failed_total",
                "Actuator commands the MQTT client refused.",
                &self.commands_failed,
            ),
            (
                "refresh_requests_total",
                "Federated refresh requests.",
                &self.refresh_requests,
            ),
            (
                "refresh_failures_total",
                "Refresh requests that failed.",
                &self.refresh_failures,
            ),
            (
                "refresh_unauthorized_total",
                "Refresh requests refused: not signed by an admin, stale or replayed.",
                &self.refresh_unauthorized,
            ),
            (
                "models_announced_total",
                "Model publications announced on MQTT.",
                &self.models_announced,
            ),
            (
                "registry_updates_total",
                "Device meta and availability updates.",
                &self.registry_updates,
            ),
            (
                "mqtt_connects_total",
                "MQTT connections made by the hub's clients.",
                &self.mqtt_connects,
            ),
        ];
        for (name, help, c) in simple {
            let _ = writeln!(out, "# HELP hearth_hub_{name} {help}");
            let _ = writeln!(out, "# TYPE hearth_hub_{name} counter");
            let _ = writeln!(out, "hearth_hub_{name} {}", Metrics::get(c));
        }
        out.push_str("# HELP hearth_hub_commands_waiting Commands waiting in the outbox.\n");
        out.push_str("# TYPE hearth_hub_commands_waiting gauge\n");
        let _ = writeln!(
            out,
            "hearth_hub_commands_waiting {}",
            Metrics::get(&self.commands_waiting)
        );
        out.push_str("# HELP hearth_hub_events_dropped_total Event payloads dropped by the privacy guard, by reason.\n");
        out.push_str("# TYPE hearth_hub_events_dropped_total counter\n");
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "hearth_hub_events_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.events_dropped(r)
            );
        }
        out.push_str(
            "# HELP hearth_hub_messages_invalid_total Non-event messages refused, by kind.\n",
        );
        out.push_str("# TYPE hearth_hub_messages_invalid_total counter\n");
        for k in InvalidKind::ALL {
            let _ = writeln!(
                out,
                "hearth_hub_messages_invalid_total{{kind=\"{}\"}} {}",
                k.label(),
                self.invalid_messages(k)
            );
        }
        self.event_to_command.render(
            "hearth_hub_event_to_command_seconds",
            "From the receipt of an event to the broker's acknowledgement of the command it caused.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let m = Metrics::new();
        Metrics::inc(&m.events_received);
        Metrics::inc(&m.events_received);
        m.drop_event(DropReason::TooLarge);
        m.invalid_message(InvalidKind::Availability);
        let t = m.render_prometheus();
        assert!(t.contains("hearth_hub_events_received_total 2\n"), "{t}");
        assert!(
            t.contains("hearth_hub_events_dropped_total{reason=\"too_large\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("hearth_hub_events_dropped_total{reason=\"schema\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("hearth_hub_messages_invalid_total{kind=\"availability\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE hearth_hub_commands_published_total counter\n"),
            "{t}"
        );
        assert_eq!(m.events_dropped_total(), 1);
        // every sample line is `name[{labels}] value`
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            v.parse::<u64>().unwrap();
        }
    }
}
