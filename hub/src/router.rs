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
//!   request is authorised ([`RefreshGuard`]: signed by an admin by default); so does a
//!   press of a Home Assistant refresh button (`crate::discovery`).
//! - Zigbee2MQTT's `bridge/state`, `bridge/devices` and device topics under
//!   `<actuator_base>` (`crate::zigbee`): the registry.
//! - `<discovery_prefix>/status` = `online`: Home Assistant (re)started; the discovery task
//!   publishes every config again.

use std::sync::Arc;
use std::time::Instant;

use hearth_proto::mqtt::{
    parse_event, parse_event_topic, valid_name, DeviceMeta, RefreshRequest, REFRESH_TOPIC, ROOT,
};
use rumqttc::Publish;
use tokio::sync::Semaphore;

use crate::delivery::{self, parse_availability};
use crate::discovery::{self, Kicker};
use crate::federation;
use crate::metrics::{DropReason, InvalidKind, Metrics};
use crate::registry::{Availability, Registry, Source};
use crate::rules::engine::Executor;
use crate::rules::{EventFields, RuleSet};
use crate::zigbee;

/// Largest accepted `meta` payload.
pub const MAX_META_BYTES: usize = 4096;
/// Largest accepted refresh request payload.
pub const MAX_REFRESH_BYTES: usize = 1024;

/// Topic filters the hub subscribes to: Hearth's own, the availability topic of every
/// actuator `rules` name (`<actuator_base>/<actuator>/availability`) and the state topic
/// (`<actuator_base>/<device>`) of every device whose state rules read.
pub fn subscriptions(rules: &RuleSet, actuator_base: &str) -> Vec<String> {
    let mut v = vec![
        format!("{ROOT}/+/event/+"),
        format!("{ROOT}/+/meta"),
        format!("{ROOT}/+/availability"),
        REFRESH_TOPIC.to_string(),
    ];
    let mut extra: Vec<String> = rules
        .watched_availability()
        .map(|a| availability_topic(actuator_base, a))
        .chain(
            rules
                .watched_state()
                .map(|d| format!("{actuator_base}/{d}")),
        )
        .collect();
    extra.sort();
    extra.dedup();
    v.extend(extra);
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
    /// The rules engine and what carries firings out.
    pub(crate) exec: Arc<Executor>,
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
    /// Follow Zigbee2MQTT's topics under `actuator_base` into the registry.
    pub(crate) zigbee: bool,
    /// Where `<base>/<actuator>/get` goes when an actuator the rules name comes online
    /// (`None`: not asked).
    pub(crate) get_state: Option<rumqttc::AsyncClient>,
    /// Home Assistant's `<prefix>/status` (`None` without discovery).
    pub(crate) ha_status: Option<String>,
    /// Wakes the discovery task.
    pub(crate) discovery: Kicker,
}

/// Whether the n-th occurrence of a warning should be logged (first 20, then powers of two):
/// a flood of bad messages cannot flood the log.
fn should_log(n: u64) -> bool {
    n <= 20 || n.is_power_of_two()
}

impl Router {
    /// Handles one incoming publish.
    pub async fn handle(&self, p: &Publish) {
        let received = Instant::now();
        let topic = p.topic.as_str();
        if let Some((device, name)) = parse_event_topic(topic) {
            self.handle_event(topic, device, name, p, received).await;
            return;
        }
        if topic == REFRESH_TOPIC {
            self.handle_refresh(p);
            return;
        }
        if let Some(model) = discovery::parse_button_topic(topic) {
            return self.handle_button(model, p);
        }
        if self.ha_status.as_deref() == Some(topic) {
            if p.payload.as_ref() == b"online" {
                tracing::info!("Home Assistant is online: publishing discovery again");
                self.discovery.all();
            }
            return;
        }
        if self.zigbee {
            if let Some(t) = zigbee::classify(&self.actuator_base, topic) {
                self.handle_zigbee(topic, t, p);
            }
        }
        if let Some(rest) = topic
            .strip_prefix(self.actuator_base.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            let rules = self.exec.engine.current();
            if let Some(actuator) = rest.strip_suffix("/availability") {
                if rules.watches_availability(actuator) {
                    return self
                        .handle_actuator_availability(topic, actuator, &p.payload)
                        .await;
                }
            }
            if rules.watches_state(rest) && !p.payload.is_empty() {
                if !self.exec.on_state(rest, &p.payload).await {
                    let n = self.metrics.invalid_message(InvalidKind::State);
                    if should_log(n) {
                        tracing::warn!(topic, "device state is not a JSON object");
                    }
                }
                return;
            }
        }
        let Some(rest) = topic.strip_prefix(ROOT).and_then(|r| r.strip_prefix('/')) else {
            return;
        };
        match rest.split_once('/') {
            Some((device, "meta")) => self.handle_meta(topic, device, &p.payload, p.retain),
            Some((device, "availability")) => {
                self.handle_availability(topic, device, &p.payload, p.retain)
                    .await
            }
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

    async fn handle_event(
        &self,
        topic: &str,
        device: &str,
        name: &str,
        p: &Publish,
        received: Instant,
    ) {
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
        let Some(ev) = inbound.verdict() else {
            return;
        };
        if self
            .registry
            .record_event_detail(device, Some((name, &ev.class, ev.score)))
        {
            // A new event name: a new Home Assistant entity.
            self.discovery.changed();
        }
        let fields = EventFields::inbound(device, name, &ev, &inbound, &p.payload);
        let (matched, fired) = self.exec.on_event(fields, received).await;
        if matched == 0 {
            return;
        }
        Metrics::inc(&self.metrics.events_routed);
        let suppressed = (matched - fired) as u64;
        if suppressed > 0 {
            self.metrics
                .cooldown_suppressed
                .fetch_add(suppressed, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn handle_actuator_availability(&self, topic: &str, actuator: &str, payload: &[u8]) {
        match parse_availability(payload) {
            Some(online) => {
                self.commands.availability(actuator, online).await;
                self.exec.on_availability(actuator, online).await;
                if let (true, Some(c)) = (online, &self.get_state) {
                    // Read its state the way Zigbee2MQTT documents it (QoS 0: a lost read
                    // costs nothing).
                    let _ = c.try_publish(
                        zigbee::get_topic(&self.actuator_base, actuator),
                        rumqttc::QoS::AtMostOnce,
                        false,
                        zigbee::GET_STATE_PAYLOAD,
                    );
                }
            }
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

    fn handle_zigbee(&self, topic: &str, t: zigbee::Topic<'_>, p: &Publish) {
        let invalid = |kind: InvalidKind, reason: &str| {
            let n = self.metrics.invalid_message(kind);
            if should_log(n) {
                tracing::warn!(topic, reason, "Zigbee2MQTT message refused");
            }
        };
        match t {
            zigbee::Topic::BridgeState => match parse_availability(&p.payload) {
                Some(on) => {
                    let a = Availability::from_online(on);
                    if self.registry.bridge() != a {
                        tracing::info!(state = a.as_str(), "Zigbee2MQTT bridge");
                    }
                    self.registry.set_bridge(a);
                }
                None => invalid(
                    InvalidKind::Availability,
                    "bridge state must be online/offline",
                ),
            },
            zigbee::Topic::BridgeDevices => match zigbee::parse_bridge_devices(&p.payload) {
                Ok(list) => {
                    for d in self.registry.set_bridge_devices(&list) {
                        tracing::info!(device = %d.name, "Zigbee2MQTT device removed from the network");
                    }
                    Metrics::inc(&self.metrics.registry_updates);
                }
                Err(e) => invalid(InvalidKind::Meta, &e),
            },
            zigbee::Topic::State(name) => {
                // A device's state is a JSON object; an empty retained message clears it.
                if p.payload.is_empty() {
                    return;
                }
                if p.payload.first() != Some(&b'{') {
                    return invalid(InvalidKind::Meta, "device state must be a JSON object");
                }
                self.registry.record_state(name, &p.payload, p.retain);
            }
            zigbee::Topic::Availability(name) => match parse_availability(&p.payload) {
                Some(on) => {
                    if self.registry.set_availability_from(
                        Source::Zigbee2mqtt,
                        name,
                        Availability::from_online(on),
                        p.retain,
                    ) {
                        Metrics::inc(&self.metrics.registry_updates);
                    }
                }
                None => invalid(
                    InvalidKind::Availability,
                    "availability must be `online`, `offline` or {\"state\":\"online\"}",
                ),
            },
        }
    }

    fn handle_meta(&self, topic: &str, device: &str, payload: &[u8], retained: bool) {
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
            self.registry.set_meta_from(device, None, retained);
            Metrics::inc(&self.metrics.registry_updates);
            self.discovery.changed();
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
        if self.registry.set_meta_from(device, Some(meta), retained) {
            Metrics::inc(&self.metrics.registry_updates);
            self.discovery.changed();
        } else if !retained {
            invalid("registry full");
        }
    }

    async fn handle_availability(&self, topic: &str, device: &str, payload: &[u8], retained: bool) {
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
        if self
            .registry
            .set_availability_from(Source::Hearth, device, a, retained)
        {
            Metrics::inc(&self.metrics.registry_updates);
            tracing::info!(device, availability = a.as_str(), "device availability");
        }
        self.exec
            .on_availability(device, a == Availability::Online)
            .await;
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
        self.start_refresh(req.model);
    }

    /// A press of a Home Assistant refresh button: the payload must be the button's token
    /// (signed refreshes) or `PRESS` (broker ACL); refused when refreshes over MQTT are off.
    fn handle_button(&self, model: &str, p: &Publish) {
        let ok = !p.retain
            && match &self.refresh_guard {
                RefreshGuard::Signed(v) => v.verify_button(model, &p.payload),
                RefreshGuard::BrokerAcl => p.payload.as_ref() == discovery::PRESS.as_bytes(),
                RefreshGuard::Off => false,
            };
        if !ok {
            let n = self
                .metrics
                .refresh_unauthorized
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if should_log(n) {
                tracing::warn!(
                    model,
                    "refresh button press refused: wrong payload, retained or refreshes off"
                );
            }
            return;
        }
        tracing::info!(model, "refresh button pressed in Home Assistant");
        self.start_refresh(model.to_string());
    }

    /// Starts a federated round for `model` on the coordinator (one at a time).
    fn start_refresh(&self, model: String) {
        let req = RefreshRequest::unsigned(model);
        Metrics::inc(&self.metrics.refresh_requests);
        start_refresh(
            self.refresh.clone(),
            &self.refresh_gate,
            &self.metrics,
            &req.model,
            "mqtt",
        );
    }
}

/// Starts a federated round of `model` on the coordinator in the background (one at a time;
/// failures are logged and counted). The MQTT refresh request and rules' `refresh` actions
/// both come here.
pub(crate) fn start_refresh(
    target: Option<RefreshTarget>,
    gate: &Arc<Semaphore>,
    metrics: &Arc<Metrics>,
    model: &str,
    reason: &'static str,
) {
    let Some(target) = target else {
        Metrics::inc(&metrics.refresh_failures);
        tracing::warn!(model, "refresh requested but no coordinator is configured");
        return;
    };
    let Ok(permit) = gate.clone().try_acquire_owned() else {
        Metrics::inc(&metrics.refresh_failures);
        tracing::warn!(model, "refresh ignored: another refresh is in flight");
        return;
    };
    let metrics = metrics.clone();
    let model = model.to_string();
    tokio::spawn(async move {
        let _permit = permit;
        match federation::start_round(
            &target.url,
            target.ca_pem.as_deref(),
            &target.token,
            &model,
            reason,
        )
        .await
        {
            Ok(info) => tracing::info!(
                model = %info.model, round = info.round_id, state = %info.state, reason,
                "refresh: round started"
            ),
            Err(e) => {
                Metrics::inc(&metrics.refresh_failures);
                tracing::warn!(model = %model, error = %e, "refresh failed");
            }
        }
    });
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
