//! The router: every message the hub receives goes through here.
//!
//! - `hearth/<device>/event/<name>`: the privacy guard ([`parse_event`]: size limit and
//!   schema of a verdict or of a camera track event, whose `camera` must be the topic's
//!   device) first; invalid payloads are dropped, counted and logged with topic and reason
//!   only (never the payload). Valid events update the registry and are matched against
//!   the rules; firing rules hand their command to [`crate::delivery`] (outbox, QoS 1).
//! - `hearth/<device>/meta`, `hearth/<device>/availability`: the registry.
//! - `<actuator_base>/<actuator>/availability` of every actuator the rules name: the
//!   delivery task holds that actuator's commands while it is offline.
//! - `hearth/federation/refresh`: starts a federated round on the coordinator, if the
//!   request is authorised ([`RefreshGuard`]: signed by an admin by default).

use std::sync::Arc;
use std::time::Instant;

use hearth_proto::mqtt::{
    parse_event, parse_event_topic, valid_name, DeviceMeta, RefreshRequest, REFRESH_TOPIC, ROOT,
};
use rumqttc::Publish;
use tokio::sync::Semaphore;

use crate::delivery::{self, parse_availability};
use crate::federation;
use crate::metrics::{DropReason, InvalidKind, Metrics};
use crate::registry::{Availability, Registry};
use crate::rules::{Rule, RuleSet};

/// Largest accepted `meta` payload.
pub const MAX_META_BYTES: usize = 4096;
/// Largest accepted refresh request payload.
pub const MAX_REFRESH_BYTES: usize = 1024;

/// Topic filters the hub subscribes to: Hearth's own, and the availability topic of
/// every actuator `rules` name (`<actuator_base>/<actuator>/availability`).
pub fn subscriptions(rules: &RuleSet, actuator_base: &str) -> Vec<String> {
    let mut v = vec![
        format!("{ROOT}/+/event/+"),
        format!("{ROOT}/+/meta"),
        format!("{ROOT}/+/availability"),
        REFRESH_TOPIC.to_string(),
    ];
    for r in rules.rules() {
        let t = availability_topic(actuator_base, &r.actuator);
        if !v.contains(&t) {
            v.push(t);
        }
    }
    v
}

fn availability_topic(actuator_base: &str, actuator: &str) -> String {
    format!("{actuator_base}/{actuator}/availability")
}

/// Where refresh requests go.
#[derive(Debug, Clone)]
pub struct RefreshTarget {
    pub url: String,
    /// The coordinator's CA certificate (PEM), for an `https://` URL.
    pub ca_pem: Option<String>,
    pub token: String,
}

/// Which refresh requests the router obeys.
#[derive(Debug, Clone)]
pub enum RefreshGuard {
    /// Only requests signed with the refresh key, fresh and not replayed.
    Signed(Arc<crate::auth::RefreshVerifier>),
    /// Any well-formed request (the broker's ACL restricts who may publish one).
    BrokerAcl,
    /// None.
    Off,
}

/// Routes incoming messages.
pub struct Router {
    pub(crate) rules: Arc<RuleSet>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    /// The delivery task (its own connection, so awaiting a publish can never block the
    /// loop that drains the subscription).
    pub(crate) commands: delivery::Sender,
    /// Commands go to `<actuator_base>/<actuator>/set`.
    pub(crate) actuator_base: String,
    pub(crate) refresh: Option<RefreshTarget>,
    pub(crate) refresh_guard: RefreshGuard,
    /// One refresh in flight at a time.
    pub(crate) refresh_gate: Arc<Semaphore>,
}

/// Whether the n-th occurrence of a warning should be logged (first 20, then powers of two):
/// a flood of bad messages cannot flood the log.
fn should_log(n: u64) -> bool {
    n <= 20 || n.is_power_of_two()
}

impl Router {
    /// Handles one incoming publish.
    pub async fn handle(&self, p: &Publish) {
        let topic = p.topic.as_str();
        if let Some((device, name)) = parse_event_topic(topic) {
            self.handle_event(topic, device, name, p).await;
            return;
        }
        if topic == REFRESH_TOPIC {
            self.handle_refresh(p);
            return;
        }
        if let Some(actuator) = topic
            .strip_prefix(self.actuator_base.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_suffix("/availability"))
        {
            if self.rules.rules().iter().any(|r| r.actuator == actuator) {
                return self
                    .handle_actuator_availability(topic, actuator, &p.payload)
                    .await;
            }
        }
        let Some(rest) = topic.strip_prefix(ROOT).and_then(|r| r.strip_prefix('/')) else {
            return;
        };
        match rest.split_once('/') {
            Some((device, "meta")) => self.handle_meta(topic, device, &p.payload),
            Some((device, "availability")) => self.handle_availability(topic, device, &p.payload),
            _ => {}
        }
    }

    fn drop_event(&self, topic: &str, reason: DropReason, bytes: usize) {
        let n = self.metrics.drop_event(reason);
        if should_log(n) {
            tracing::warn!(
                topic,
                reason = reason.label(),
                bytes,
                dropped = n,
                "event dropped"
            );
        }
    }

    async fn handle_event(&self, topic: &str, device: &str, name: &str, p: &Publish) {
        Metrics::inc(&self.metrics.events_received);
        if !valid_name(device) || !valid_name(name) {
            return self.drop_event(topic, DropReason::BadTopic, p.payload.len());
        }
        if p.retain {
            return self.drop_event(topic, DropReason::Retained, p.payload.len());
        }
        let inbound = match parse_event(device, &p.payload) {
            Ok(ev) => ev,
            Err(e) => return self.drop_event(topic, DropReason::from(&e), p.payload.len()),
        };
        self.registry.record_event(device);
        // A camera track's `end` is recorded but fires no rule.
        let Some(ev) = inbound.verdict() else {
            return;
        };
        // Up to a handful of firings per event: no allocation unless something fires.
        let mut fired: Vec<&Rule> = Vec::new();
        let matched = self
            .rules
            .dispatch(device, name, &ev, Instant::now(), |r| fired.push(r));
        if matched == 0 {
            return;
        }
        Metrics::inc(&self.metrics.events_routed);
        let suppressed = (matched - fired.len()) as u64;
        if suppressed > 0 {
            self.metrics
                .cooldown_suppressed
                .fetch_add(suppressed, std::sync::atomic::Ordering::Relaxed);
        }
        for r in fired {
            if self
                .commands
                .command(&r.actuator, &r.topic, &r.payload)
                .await
            {
                tracing::debug!(rule = %r.name, topic = %r.topic, device, class = %ev.class, "rule fired");
            } else {
                Metrics::inc(&self.metrics.commands_failed);
                tracing::warn!(rule = %r.name, topic = %r.topic, "command not queued: delivery stopped");
            }
        }
    }

    async fn handle_actuator_availability(&self, topic: &str, actuator: &str, payload: &[u8]) {
        match parse_availability(payload) {
            Some(online) => self.commands.availability(actuator, online).await,
            None => {
                let n = self.metrics.invalid_message(InvalidKind::Availability);
                if should_log(n) {
                    tracing::warn!(
                        topic,
                        "availability must be `online`, `offline` or {{\"state\":\"online\"}}"
                    );
                }
            }
        }
    }

    fn handle_meta(&self, topic: &str, device: &str, payload: &[u8]) {
        let invalid = |reason: &str| {
            let n = self.metrics.invalid_message(InvalidKind::Meta);
            if should_log(n) {
                tracing::warn!(topic, reason, "device meta refused");
            }
        };
        if !valid_name(device) {
            return invalid("device name in topic is invalid");
        }
        if payload.is_empty() {
            // An empty retained message clears the meta.
            self.registry.set_meta(device, None);
            Metrics::inc(&self.metrics.registry_updates);
            return;
        }
        if payload.len() > MAX_META_BYTES {
            return invalid("payload too large");
        }
        let meta: DeviceMeta = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(_) => return invalid("not a DeviceMeta document"),
        };
        if meta.device != device {
            return invalid("`device` does not match the topic");
        }
        if self.registry.set_meta(device, Some(meta)) {
            Metrics::inc(&self.metrics.registry_updates);
        } else {
            invalid("registry full");
        }
    }

    fn handle_availability(&self, topic: &str, device: &str, payload: &[u8]) {
        let a = match (valid_name(device), Availability::parse(payload)) {
            (true, Some(a)) => a,
            _ => {
                let n = self.metrics.invalid_message(InvalidKind::Availability);
                if should_log(n) {
                    tracing::warn!(topic, "availability must be `online` or `offline`");
                }
                return;
            }
        };
        if self.registry.set_availability(device, a) {
            Metrics::inc(&self.metrics.registry_updates);
            tracing::info!(device, availability = a.as_str(), "device availability");
        }
    }

    fn handle_refresh(&self, p: &Publish) {
        let invalid = |reason: &str| {
            let n = self.metrics.invalid_message(InvalidKind::Refresh);
            if should_log(n) {
                tracing::warn!(topic = REFRESH_TOPIC, reason, "refresh request refused");
            }
        };
        if p.retain {
            // A retained request would start a round at every hub restart.
            return invalid("retained refresh requests are ignored");
        }
        if p.payload.len() > MAX_REFRESH_BYTES {
            return invalid("payload too large");
        }
        let req: RefreshRequest = match serde_json::from_slice(&p.payload) {
            Ok(r) => r,
            Err(_) => return invalid("expected {\"model\":\"<name>\"}"),
        };
        if !valid_name(&req.model) {
            return invalid("invalid model name");
        }
        let refused = match &self.refresh_guard {
            RefreshGuard::Signed(v) => v.verify(&req, crate::auth::now_ms()).err(),
            RefreshGuard::BrokerAcl => None,
            RefreshGuard::Off => Some("MQTT refresh requests are off (mqtt_auth.refresh)"),
        };
        if let Some(reason) = refused {
            let n = self
                .metrics
                .refresh_unauthorized
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if should_log(n) {
                tracing::warn!(topic = REFRESH_TOPIC, model = %req.model, reason, "refresh request refused: not authorised");
            }
            return;
        }
        Metrics::inc(&self.metrics.refresh_requests);
        let Some(target) = self.refresh.clone() else {
            Metrics::inc(&self.metrics.refresh_failures);
            tracing::warn!(model = %req.model, "refresh requested but no coordinator is configured");
            return;
        };
        let Ok(permit) = self.refresh_gate.clone().try_acquire_owned() else {
            Metrics::inc(&self.metrics.refresh_failures);
            tracing::warn!(model = %req.model, "refresh ignored: another refresh is in flight");
            return;
        };
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match federation::start_round(
                &target.url,
                target.ca_pem.as_deref(),
                &target.token,
                &req.model,
                "mqtt",
            )
            .await
            {
                Ok(info) => tracing::info!(
                    model = %info.model, round = info.round_id, state = %info.state,
                    "refresh: round started"
                ),
                Err(e) => {
                    Metrics::inc(&metrics.refresh_failures);
                    tracing::warn!(model = %req.model, error = %e, "refresh failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle() {
        assert!(should_log(1) && should_log(20) && should_log(1024));
        assert!(!should_log(21) && !should_log(1000));
    }

    #[test]
    fn subscription_filters() {
        let rules = RuleSet::parse(
            "[[rule]]\nname = \"a\"\n[rule.when]\n[rule.then]\nactuator = \"living room/lamp\"\npayload = { state = \"ON\" }\n\
             [[rule]]\nname = \"b\"\n[rule.when]\n[rule.then]\nactuator = \"living room/lamp\"\npayload = { state = \"OFF\" }\n",
            "t",
            "z2m",
        )
        .unwrap();
        let s = subscriptions(&rules, "z2m");
        assert_eq!(s[0], "hearth/+/event/+");
        assert_eq!(s[3], "hearth/federation/refresh");
        assert_eq!(&s[4..], ["z2m/living room/lamp/availability"]);
    }
}
