//! Counters a Prometheus scraper reads (`GET /metrics` on `metrics_listen`), and the one place
//! a refusal is logged and counted: every rejected call, update or enrolment goes through
//! [`Metrics::reject`] with a short machine-readable reason, so a log line and a counter
//! always agree.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counter names, with their help text.
const HELP: &[(&str, &str)] = &[
    (
        "hearth_coordinator_rejections_total",
        "Calls, updates and enrolments refused, by call and reason.",
    ),
    (
        "hearth_coordinator_connections_accepted_total",
        "gRPC connections accepted (each holds a connection slot until it closes).",
    ),
    (
        "hearth_coordinator_connections_closed_total",
        "gRPC connections closed (by either side, a failed handshake or a keepalive timeout).",
    ),
    (
        "hearth_coordinator_updates_accepted_total",
        "Updates accepted into a round, by model.",
    ),
    (
        "hearth_coordinator_versions_published_total",
        "Model versions published, by model.",
    ),
    (
        "hearth_aggregator_updates_folded_total",
        "Home aggregator: local updates folded into aggregates the upstream accepted, by model.",
    ),
    (
        "hearth_aggregator_upstream_uploads_total",
        "Home aggregator: aggregates sent upstream, by model and outcome (accepted, refused, failed).",
    ),
    (
        "hearth_aggregator_versions_imported_total",
        "Home aggregator: upstream versions verified, stored and re-served, by model.",
    ),
];

/// The coordinator's counters. Labels are rendered `key="value"` pairs, sorted by the caller.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `k1="v1",k2="v2"` from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape(v));
    }
    s
}

impl Metrics {
    /// Adds 1 to counter `name` with rendered `labels` (see [`labels`]).
    pub fn inc(&self, name: &'static str, labels: String) {
        *self
            .counters
            .lock()
            .expect("metrics lock")
            .entry((name, labels))
            .or_default() += 1;
    }

    /// Adds `n` to counter `name` with rendered `labels`.
    pub fn add(&self, name: &'static str, labels: String, n: u64) {
        *self
            .counters
            .lock()
            .expect("metrics lock")
            .entry((name, labels))
            .or_default() += n;
    }

    /// Current value of a counter (0 if never incremented).
    pub fn get(&self, name: &str, labels: &str) -> u64 {
        self.counters
            .lock()
            .expect("metrics lock")
            .iter()
            .find(|((n, l), _)| *n == name && l == labels)
            .map_or(0, |(_, v)| *v)
    }

    /// Sum of a counter over all its label sets.
    pub fn total(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|((n, _), _)| *n == name)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Logs a refusal (warn, with the client and the detail) and counts it under
    /// `hearth_coordinator_rejections_total{call, reason}`. `reason` is a short stable
    /// identifier (`bad_token`, `norm_bound`, `rate_limited`, ...); `detail` is for people and
    /// must never contain a secret.
    pub fn reject(
        &self,
        call: &'static str,
        reason: &'static str,
        client: &str,
        detail: &dyn std::fmt::Display,
    ) {
        tracing::warn!(call, reason, client, %detail, "refused");
        self.inc(
            "hearth_coordinator_rejections_total",
            labels(&[("call", call), ("reason", reason)]),
        );
    }

    /// Rejections counted for `reason` (any call).
    pub fn rejections(&self, reason: &str) -> u64 {
        let needle = format!("reason=\"{}\"", escape(reason));
        self.counters
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|((n, l), _)| {
                *n == "hearth_coordinator_rejections_total" && l.contains(&needle)
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let counters = self.counters.lock().expect("metrics lock");
        let mut out = String::new();
        let mut names: Vec<&str> = HELP.iter().map(|(n, _)| *n).collect();
        for (n, _) in counters.keys() {
            if !names.contains(n) {
                names.push(n);
            }
        }
        for name in names {
            let help = HELP
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("Hearth coordinator counter.", |(_, h)| *h);
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((n, l), v) in counters.iter() {
                if *n == name {
                    if l.is_empty() {
                        let _ = writeln!(out, "{name} {v}");
                    } else {
                        let _ = writeln!(out, "{name}{{{l}}} {v}");
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_per_reason_and_rendered() {
        let m = Metrics::default();
        m.reject("upload", "norm_bound", "c1", &"norm 80 > 50");
        m.reject("upload", "norm_bound", "c2", &"norm 90 > 50");
        m.reject("enroll", "bad_token", "", &"unknown token");
        assert_eq!(m.rejections("norm_bound"), 2);
        assert_eq!(m.rejections("bad_token"), 1);
        assert_eq!(m.rejections("rate_limited"), 0);
        assert_eq!(m.total("hearth_coordinator_rejections_total"), 3);
        let text = m.render();
        assert!(
            text.contains(
                "hearth_coordinator_rejections_total{call=\"upload\",reason=\"norm_bound\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE hearth_coordinator_rejections_total counter"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("m", "a\"b\\c")]), "m=\"a\\\"b\\\\c\"");
    }
}
