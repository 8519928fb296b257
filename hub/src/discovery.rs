//! Home Assistant MQTT discovery for every Hearth agent and for the hub itself.
//!
//! Every config is published retained on `<prefix>/<component>/hearth/<object_id>/config`
//! (`<prefix>` is `[home_assistant] discovery_prefix`, `homeassistant` by default) and
//! published again when Home Assistant announces itself (`online` on `<prefix>/status`) and
//! whenever the hub's MQTT connection comes back (a broker that lost its retained messages).
//! Entities of a device that is removed (`hearth-hub devices remove`, or while the hub was
//! stopped: its tombstone) get an empty retained config, which removes them from Home
//! Assistant. An agent that is merely offline keeps its entities (shown unavailable).
//!
//! Per agent `<d>` (one Home Assistant device, `identifiers: ["hearth_<d>"]`, linked to the
//! hub with `via_device`):
//! - **`event`** `<d>_<event>` for each event name (`hearth/<d>/event/<event>`), with the
//!   model's classes as `event_types` and a `value_template` that turns Hearth's event
//!   (`{"class","score","model","ts"}`) into `{"event_type": class, "score", "model"}`.
//!   An `event` entity, not a `binary_sensor`: a Hearth event is a momentary verdict ("a
//!   person at 19:00:03, 0.93") with no matching "cleared" message, so a binary sensor would
//!   have to invent an off delay and would merge repeated detections; an event entity records
//!   each occurrence with its type and attributes, which is what automations trigger on.
//! - **`sensor`** `<d>_<event>_confidence` (diagnostic): the last event's score, from the
//!   same topic; a number, so a sensor with `state_class: measurement` (history, statistics).
//! - **`sensor`** `<d>_model_version` (diagnostic): the version part of `model` in the
//!   agent's retained `hearth/<d>/meta` (the whole meta as attributes).
//! - **`binary_sensor`** `<d>_connected` (diagnostic, `device_class: connectivity`): the
//!   agent's `hearth/<d>/availability`. Every other entity carries that topic as its
//!   `availability`, so it shows *unavailable* while the agent is offline.
//!
//! The hub (`identifiers: ["hearth_hub"]`, availability `hearth/hearth-hub/status`, the hub
//! publisher's last will): sensors `events_per_second`, `events`, `commands` and `rounds`
//! (model versions announced) read from `hearth/hearth-hub/state` (retained JSON, every
//! `stats_interval_secs`), and a **`button`** `hearth_hub_refresh_<model>` per model its
//! agents run (and `follow_models`). A press publishes `payload_press` to
//! `hearth/hearth-hub/refresh/<model>`; the hub then starts a federated round on the
//! coordinator, as `hearth-hub refresh <model>` does. With `[mqtt_auth] refresh = "signed"`
//! the payload is a token derived from the refresh key (see
//! [`crate::auth::RefreshVerifier::button_token`]), so only who can read the retained
//! button config can press: Home Assistant and admins under Mosquitto's ACL; any logged-in
//! client on the embedded broker, which has no ACLs. `broker_acl` accepts `PRESS` (the ACL
//! decides who may publish there); `off` publishes no buttons and ignores presses.
//!
//! Zigbee2MQTT devices are not announced here: Zigbee2MQTT publishes its own discovery.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_edge::stopped;
use hearth_proto::mqtt::valid_name;
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::registry::{DeviceInfo, Registry, Source};
use crate::router::RefreshGuard;

/// Default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";
/// Node id of every Hearth entity's discovery topic.
pub const NODE_ID: &str = "hearth";
/// The hub's topic root (`hearth-hub` is a reserved device name).
pub const HUB_ROOT: &str = "hearth/hearth-hub";
/// The hub's Home Assistant device identifier.
pub const HUB_DEVICE_ID: &str = "hearth_hub";
/// `payload_press` of refresh buttons when the broker's ACL authorises presses.
pub const PRESS: &str = "PRESS";
/// Most refresh buttons (one per model).
pub const MAX_BUTTONS: usize = 64;
/// Capacity of the channel that wakes the discovery task.
const KICKS: usize = 64;
/// Changes within this time are announced together.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// `[home_assistant]` in the hub's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Publish discovery configs.
    pub enabled: bool,
    /// Home Assistant's discovery prefix (its `discovery_prefix`): configs go to
    /// `<prefix>/…/config`, its birth message comes on `<prefix>/status`.
    pub discovery_prefix: String,
    /// Announce the hub itself: its sensors and a refresh button per model.
    pub hub_entities: bool,
    /// How often the hub's sensors are published, in seconds.
    pub stats_interval_secs: u64,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            enabled: true,
            discovery_prefix: DEFAULT_PREFIX.into(),
            hub_entities: true,
            stats_interval_secs: 10,
        }
    }
}

/// A topic prefix: levels without wildcards, no empty level.
pub fn topic_prefix_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.contains(['+', '#', '\0'])
        && s.split('/').all(|l| !l.is_empty())
}

impl HomeAssistantConfig {
    /// Checks the prefix and the interval; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !topic_prefix_ok(&self.discovery_prefix) {
            return Err(format!(
                "home_assistant.discovery_prefix `{}` must be a topic prefix without wildcards \
                 or empty levels",
                self.discovery_prefix
            ));
        }
        if !(1..=3600).contains(&self.stats_interval_secs) {
            return Err("home_assistant.stats_interval_secs must be within 1..=3600".into());
        }
        Ok(())
    }

    /// `<prefix>/status`: Home Assistant's birth and last-will topic.
    pub fn status_topic(&self) -> String {
        status_topic(&self.discovery_prefix)
    }
}

/// `<prefix>/status`.
pub fn status_topic(prefix: &str) -> String {
    format!("{prefix}/status")
}

/// `hearth/hearth-hub/state`: the hub's sensors (retained JSON).
pub fn hub_state_topic() -> String {
    format!("{HUB_ROOT}/state")
}

/// `hearth/hearth-hub/status`: the hub's availability (`online`, last will `offline`).
pub fn hub_status_topic() -> String {
    format!("{HUB_ROOT}/status")
}

/// `hearth/hearth-hub/refresh/<model>`: presses of the refresh button.
pub fn button_topic(model: &str) -> String {
    format!("{HUB_ROOT}/refresh/{model}")
}

/// The model of a button press topic.
pub fn parse_button_topic(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(HUB_ROOT)?
        .strip_prefix("/refresh/")
        .filter(|m| valid_name(m))
}

fn config_topic(prefix: &str, component: &str, object_id: &str) -> String {
    format!("{prefix}/{component}/{NODE_ID}/{object_id}/config")
}

fn availability(topic: String) -> Value {
    json!([{ "topic": topic, "payload_available": "online", "payload_not_available": "offline" }])
}

/// The discovery configs of one Hearth agent, by topic (empty for anything else, and for a
/// device whose name cannot be an object id).
pub fn agent_entities(prefix: &str, d: &DeviceInfo) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if d.source != Source::Hearth || !valid_name(&d.name) || d.kind == "actuator" {
        return out;
    }
    let n = &d.name;
    let uid = format!("hearth_{n}");
    let model_name = d.model.split('@').next().unwrap_or_default();
    let device = json!({
        "identifiers": [uid],
        "name": n,
        "manufacturer": "Hearth",
        "model": if model_name.is_empty() { "Hearth agent".to_string() } else { format!("Hearth agent ({model_name})") },
        "sw_version": d.sw_version,
        "via_device": HUB_DEVICE_ID,
    });
    let avail = availability(format!("hearth/{n}/availability"));
    for e in d.event_names.iter().filter(|e| valid_name(e)) {
        let topic = format!("hearth/{n}/event/{e}");
        if !d.classes.is_empty() {
            out.insert(
                config_topic(prefix, "event", &format!("{n}_{e}")),
                json!({
                    "name": e,
                    "unique_id": format!("{uid}_{e}"),
                    "state_topic": topic,
                    "event_types": d.classes,
                    "value_template": "{{ {'event_type': value_json.class, 'score': value_json.score, 'model': value_json.model} | to_json }}",
                    "qos": 1,
                    "availability": avail,
                    "device": device,
                }),
            );
        }
        out.insert(
            config_topic(prefix, "sensor", &format!("{n}_{e}_confidence")),
            json!({
                "name": format!("{e} confidence"),
                "unique_id": format!("{uid}_{e}_confidence"),
                "state_topic": topic,
                "value_template": "{{ value_json.score }}",
                "state_class": "measurement",
                "suggested_display_precision": 2,
                "entity_category": "diagnostic",
                "qos": 1,
                "availability": avail,
                "device": device,
            }),
        );
    }
    out.insert(
        config_topic(prefix, "sensor", &format!("{n}_model_version")),
        json!({
            "name": "Model version",
            "unique_id": format!("{uid}_model_version"),
            "state_topic": format!("hearth/{n}/meta"),
            "value_template": "{{ value_json.model.split('@') | last }}",
            "json_attributes_topic": format!("hearth/{n}/meta"),
            "entity_category": "diagnostic",
            "icon": "mdi:brain",
            "qos": 1,
            "availability": avail,
            "device": device,
        }),
    );
    out.insert(
        config_topic(prefix, "binary_sensor", &format!("{n}_connected")),
        json!({
            "name": "Connected",
            "unique_id": format!("{uid}_connected"),
            "state_topic": format!("hearth/{n}/availability"),
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "qos": 1,
            "device": device,
        }),
    );
    out
}

/// The hub's own entities: sensors, and a refresh button per model (`press` gives each
/// button's `payload_press`; `None` publishes no buttons).
pub fn hub_entities(
    prefix: &str,
    models: &BTreeSet<String>,
    press: Option<&dyn Fn(&str) -> String>,
) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let device = json!({
        "identifiers": [HUB_DEVICE_ID],
        "name": "Hearth hub",
        "manufacturer": "Hearth",
        "model": "Hearth hub",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let avail = availability(hub_status_topic());
    let sensors = [
        (
            "events_per_second",
            "Events per second",
            Some("events/s"),
            "measurement",
        ),
        ("events", "Events", None, "total_increasing"),
        ("commands", "Commands", None, "total_increasing"),
        ("rounds", "Federated rounds", None, "total_increasing"),
    ];
    for (key, name, unit, class) in sensors {
        let mut v = json!({
            "name": name,
            "unique_id": format!("{HUB_DEVICE_ID}_{key}"),
            "state_topic": hub_state_topic(),
            "value_template": format!("{{{{ value_json.{key} }}}}"),
            "state_class": class,
            "qos": 1,
            "availability": avail,
            "device": device,
        });
        if let Some(u) = unit {
            v["unit_of_measurement"] = json!(u);
        }
        out.insert(
            config_topic(prefix, "sensor", &format!("{HUB_DEVICE_ID}_{key}")),
            v,
        );
    }
    if let Some(press) = press {
        for m in models.iter().take(MAX_BUTTONS) {
            out.insert(
                config_topic(prefix, "button", &format!("{HUB_DEVICE_ID}_refresh_{m}")),
                json!({
                    "name": format!("Refresh {m}"),
                    "unique_id": format!("{HUB_DEVICE_ID}_refresh_{m}"),
                    "command_topic": button_topic(m),
                    "payload_press": press(m),
                    "entity_category": "config",
                    "icon": "mdi:school",
                    "qos": 1,
                    "retain": false,
                    "availability": avail,
                    "device": device,
                }),
            );
        }
    }
    out
}

/// Why the discovery task wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// The registry changed (meta, removal): compare and publish what differs.
    Changed,
    /// Home Assistant came online, or the hub's connection came back: publish everything.
    All,
}

/// Wakes the discovery task; never blocks (a full channel already holds a wake-up).
#[derive(Debug, Clone, Default)]
pub struct Kicker(Option<mpsc::Sender<Kick>>);

impl Kicker {
    pub(crate) fn changed(&self) {
        if let Some(tx) = &self.0 {
            let _ = tx.try_send(Kick::Changed);
        }
    }
    pub(crate) fn all(&self) {
        if let Some(tx) = &self.0 {
            let _ = tx.try_send(Kick::All);
        }
    }
}

/// What the discovery task published, for tests and metrics.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    /// Retained configs published (non-empty).
    pub configs_published: AtomicU64,
    /// Empty retained configs published (entities removed).
    pub configs_removed: AtomicU64,
    /// Full re-publications (Home Assistant online, reconnect).
    pub republished: AtomicU64,
}

/// The discovery task's inputs.
pub(crate) struct Discovery {
    pub cfg: HomeAssistantConfig,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub client: AsyncClient,
    pub guard: RefreshGuard,
    pub follow_models: Vec<String>,
    pub stats: Arc<DiscoveryStats>,
}

/// Starts the discovery task; the kicker is the router's.
pub(crate) fn spawn(
    d: Discovery,
    shutdown: watch::Receiver<bool>,
) -> (Kicker, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(KICKS);
    (Kicker(Some(tx)), tokio::spawn(d.run(rx, shutdown)))
}

impl Discovery {
    /// Models with a button: those the agents run, and `follow_models`.
    fn models(&self, devices: &[DeviceInfo]) -> BTreeSet<String> {
        devices
            .iter()
            .filter(|d| d.source == Source::Hearth)
            .filter_map(|d| d.model.split('@').next())
            .chain(self.follow_models.iter().map(String::as_str))
            .filter(|m| valid_name(m))
            .map(str::to_string)
            .collect()
    }

    fn desired(&self) -> BTreeMap<String, String> {
        let prefix = &self.cfg.discovery_prefix;
        let devices = self.registry.snapshot();
        let mut all: BTreeMap<String, Value> = BTreeMap::new();
        for d in &devices {
            all.extend(agent_entities(prefix, d));
        }
        if self.cfg.hub_entities {
            let token = |m: &str| match &self.guard {
                RefreshGuard::Signed(v) => v.button_token(m),
                _ => PRESS.to_string(),
            };
            let press: Option<&dyn Fn(&str) -> String> = match self.guard {
                RefreshGuard::Off => None,
                _ => Some(&token),
            };
            all.extend(hub_entities(prefix, &self.models(&devices), press));
        }
        all.into_iter().map(|(t, v)| (t, v.to_string())).collect()
    }

    async fn publish(&self, topic: &str, body: String) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, body)
            .await
            .is_ok()
    }

    /// Publishes what differs from `published` (empty configs for what is gone).
    async fn sync(&self, published: &mut BTreeMap<String, String>) {
        let want = self.desired();
        let gone: Vec<String> = published
            .keys()
            .filter(|t| !want.contains_key(*t))
            .cloned()
            .collect();
        for t in gone {
            if self.publish(&t, String::new()).await {
                self.stats.configs_removed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(topic = %t, "Home Assistant entity removed");
                published.remove(&t);
            }
        }
        for (t, body) in want {
            if published.get(&t) == Some(&body) {
                continue;
            }
            if self.publish(&t, body.clone()).await {
                self.stats.configs_published.fetch_add(1, Ordering::Relaxed);
                published.insert(t, body);
            }
        }
    }

    fn hub_state(&self, rate: f64) -> String {
        json!({
            "events_per_second": (rate * 10.0).round() / 10.0,
            "events": Metrics::get(&self.metrics.events_received),
            "commands": Metrics::get(&self.metrics.commands_published),
            "rounds": Metrics::get(&self.metrics.models_announced),
            "devices": self.registry.len(),
        })
        .to_string()
    }

    async fn run(self, mut rx: mpsc::Receiver<Kick>, mut shutdown: watch::Receiver<bool>) {
        // Entities of devices removed while the hub was stopped count as published, so the
        // first sync removes them from Home Assistant.
        let mut published: BTreeMap<String, String> = self
            .registry
            .removed()
            .iter()
            .flat_map(|d| agent_entities(&self.cfg.discovery_prefix, d).into_keys())
            .map(|t| (t, String::new()))
            .collect();
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.stats_interval_secs));
        let mut last = (Instant::now(), Metrics::get(&self.metrics.events_received));
        if self.cfg.hub_entities {
            let _ = self.publish(&hub_status_topic(), "online".into()).await;
        }
        self.sync(&mut published).await;
        loop {
            let kick = tokio::select! {
                _ = stopped(&mut shutdown) => break,
                k = rx.recv() => match k { Some(k) => Some(k), None => break },
                _ = tick.tick() => None,
            };
            match kick {
                Some(mut k) => {
                    // Let a burst (a bridge list, a reconnect) settle, then take it whole.
                    tokio::time::sleep(DEBOUNCE).await;
                    while let Ok(more) = rx.try_recv() {
                        if more == Kick::All {
                            k = Kick::All;
                        }
                    }
                    if k == Kick::All {
                        self.stats.republished.fetch_add(1, Ordering::Relaxed);
                        published.retain(|_, body| body.is_empty());
                        if self.cfg.hub_entities {
                            let _ = self.publish(&hub_status_topic(), "online".into()).await;
                        }
                    }
                    self.sync(&mut published).await;
                }
                None => {
                    self.sync(&mut published).await;
                    if self.cfg.hub_entities {
                        let now = (Instant::now(), Metrics::get(&self.metrics.events_received));
                        let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
                        let rate = now.1.saturating_sub(last.1) as f64 / secs;
                        last = now;
                        let _ = self.publish(&hub_state_topic(), self.hub_state(rate)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> DeviceInfo {
        DeviceInfo {
            name: "door-cam".into(),
            kind: "agent".into(),
            model: "faces@3".into(),
            sw_version: "0.1.0".into(),
            classes: vec!["none".into(), "person".into()],
            event_names: vec!["detection".into()],
            ..DeviceInfo::default()
        }
    }

    #[test]
    fn agent_entities_follow_the_schema() {
        let e = agent_entities("ha", &agent());
        let topics: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(
            topics,
            [
                "ha/binary_sensor/hearth/door-cam_connected/config",
                "ha/event/hearth/door-cam_detection/config",
                "ha/sensor/hearth/door-cam_detection_confidence/config",
                "ha/sensor/hearth/door-cam_model_version/config",
            ]
        );
        let ev = &e["ha/event/hearth/door-cam_detection/config"];
        assert_eq!(ev["event_types"], json!(["none", "person"]));
        assert_eq!(ev["state_topic"], "hearth/door-cam/event/detection");
        assert_eq!(ev["device"]["identifiers"], json!(["hearth_door-cam"]));
        let c = &e["ha/sensor/hearth/door-cam_detection_confidence/config"];
        assert_eq!(c["entity_category"], "diagnostic");
        // Not an agent: nothing.
        let mut z = agent();
        z.source = Source::Zigbee2mqtt;
        assert!(agent_entities("ha", &z).is_empty());
        // No classes yet: no event entity (event_types is required), the rest stays.
        let mut bare = agent();
        bare.classes.clear();
        assert_eq!(agent_entities("ha", &bare).len(), 3);
    }

    #[test]
    fn hub_entities_and_buttons() {
        let models: BTreeSet<String> = ["faces".to_string(), "plaid".to_string()].into();
        let press = |m: &str| format!("tok-{m}");
        let e = hub_entities("homeassistant", &models, Some(&press));
        let b = &e["homeassistant/button/hearth/hearth_hub_refresh_plaid/config"];
        assert_eq!(b["command_topic"], "hearth/hearth-hub/refresh/plaid");
        assert_eq!(b["payload_press"], "tok-plaid");
        assert_eq!(e.len(), 6);
        assert_eq!(hub_entities("homeassistant", &models, None).len(), 4);
        assert_eq!(
            parse_button_topic("hearth/hearth-hub/refresh/plaid"),
            Some("plaid")
        );
        assert_eq!(parse_button_topic("hearth/hearth-hub/refresh/a b"), None);
        assert!(HomeAssistantConfig {
            discovery_prefix: "ha/+".into(),
            ..HomeAssistantConfig::default()
        }
        .validate()
        .is_err());
    }
}
