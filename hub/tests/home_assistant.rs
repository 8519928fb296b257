//! Home Assistant MQTT discovery over a real broker (the hub's embedded rumqttd on a free
//! loopback port), checked against the schema Home Assistant documents for each component:
//! the keys it accepts, the ones it requires, the `device` block, `availability`,
//! `unique_id`, `entity_category`, `event_types` (event) and `command_topic` (button).
//!
//! Also: the configurable prefix is the only one used (a birth message on the default
//! `homeassistant/status` does nothing), `online` on `<prefix>/status` publishes every config
//! again, a refresh button press makes the hub start a refresh (and a wrong payload is
//! refused), and removing a device publishes empty retained configs for its entities — also
//! when it was removed while the hub was stopped. At the broker a removed entity's config is
//! a tombstone — a client subscribing later gets nothing for it — on the embedded broker and
//! on Mosquitto (which, unlike rumqttd, keeps a retained message that a non-retained empty
//! publish would not clear). Every wait is bounded.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hearth_hub::{BrokerConfig, Config, HubHandle, Metrics, Role};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);
const PREFIX: &str = "ha-test";

/// Keys Home Assistant's MQTT integration documents (full names; Hearth publishes no
/// abbreviations), common to every entity, and per component.
const COMMON: &[&str] = &[
    "name",
    "unique_id",
    "availability",
    "availability_mode",
    "device",
    "entity_category",
    "icon",
    "qos",
    "json_attributes_topic",
    "json_attributes_template",
    "enabled_by_default",
    "platform",
];
const EVENT: &[&str] = &[
    "state_topic",
    "event_types",
    "value_template",
    "device_class",
];
const SENSOR: &[&str] = &[
    "state_topic",
    "value_template",
    "state_class",
    "unit_of_measurement",
    "device_class",
    "suggested_display_precision",
    "expire_after",
    "force_update",
];
const BINARY_SENSOR: &[&str] = &[
    "state_topic",
    "value_template",
    "payload_on",
    "payload_off",
    "device_class",
    "expire_after",
    "off_delay",
];
const BUTTON: &[&str] = &[
    "command_topic",
    "command_template",
    "payload_press",
    "retain",
    "device_class",
];
const DEVICE: &[&str] = &[
    "identifiers",
    "connections",
    "name",
    "manufacturer",
    "model",
    "model_id",
    "sw_version",
    "hw_version",
    "via_device",
    "suggested_area",
    "configuration_url",
    "serial_number",
];

/// Checks one discovery config against the documented schema; returns its component.
fn check_schema(topic: &str, v: &Value) -> String {
    let parts: Vec<&str> = topic.split('/').collect();
    assert_eq!(
        parts.len(),
        5,
        "{topic}: <prefix>/<component>/<node_id>/<object_id>/config"
    );
    assert_eq!(
        (parts[0], parts[2], parts[4]),
        (PREFIX, "hearth", "config"),
        "{topic}"
    );
    let id_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    assert!(id_ok(parts[3]), "{topic}: object id in [a-zA-Z0-9_-]");
    let component = parts[1];
    let (specific, required): (&[&str], &[&str]) = match component {
        "event" => (EVENT, &["state_topic", "event_types"]),
        "sensor" => (SENSOR, &["state_topic"]),
        "binary_sensor" => (BINARY_SENSOR, &["state_topic"]),
        "button" => (BUTTON, &["command_topic"]),
        other => panic!("{topic}: unexpected component {other}"),
    };
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{topic}: not an object"));
    for k in obj.keys() {
        assert!(
            COMMON.contains(&k.as_str()) || specific.contains(&k.as_str()),
            "{topic}: `{k}` is not a documented {component} key"
        );
    }
    for k in required.iter().chain(&["unique_id", "device", "name"]) {
        assert!(obj.contains_key(*k), "{topic}: `{k}` is required");
    }
    assert!(
        id_ok(v["unique_id"].as_str().unwrap()),
        "{topic}: unique_id"
    );
    let dev = v["device"].as_object().unwrap();
    for k in dev.keys() {
        assert!(DEVICE.contains(&k.as_str()), "{topic}: device key `{k}`");
    }
    assert!(
        !dev["identifiers"].as_array().unwrap().is_empty(),
        "{topic}: device identifiers"
    );
    if let Some(c) = v.get("entity_category") {
        assert!(
            c == "diagnostic" || c == "config",
            "{topic}: entity_category {c}"
        );
    }
    if let Some(a) = v.get("availability") {
        for e in a.as_array().unwrap() {
            assert!(
                e["topic"].is_string(),
                "{topic}: availability entry needs a topic"
            );
            for k in e.as_object().unwrap().keys() {
                assert!(
                    [
                        "topic",
                        "payload_available",
                        "payload_not_available",
                        "value_template"
                    ]
                    .contains(&k.as_str()),
                    "{topic}: availability key `{k}`"
                );
            }
        }
    }
    if let Some(c) = v.get("state_class") {
        assert!(
            ["measurement", "total", "total_increasing"].contains(&c.as_str().unwrap()),
            "{topic}: state_class"
        );
    }
    if component == "event" {
        let types = v["event_types"].as_array().unwrap();
        assert!(!types.is_empty() && types.iter().all(Value::is_string));
    }
    if let Some(q) = v.get("qos") {
        assert!(q.as_u64().unwrap() <= 2);
    }
    component.to_string()
}

struct Hub {
    hub: HubHandle,
    login: (String, String),
}

/// A hub with its embedded broker, or on `external` (a URL with credentials).
async fn start(dir: &std::path::Path, coordinator_port: u16, external: Option<String>) -> Hub {
    let mut cfg = Config {
        client_id: "ha-hub".into(),
        broker: match &external {
            Some(u) => BrokerConfig::external(u.clone()),
            None => BrokerConfig::embedded("127.0.0.1:0".parse().unwrap()),
        },
        state_dir: Some(dir.join("state")),
        // A coordinator nobody answers: the hub signs refresh buttons (and tries, and
        // counts the failure, when one is pressed).
        coordinator: Some(format!("http://127.0.0.1:{coordinator_port}")),
        admin_token: Some("admin-token".into()),
        ..Config::default()
    };
    cfg.mqtt_auth.dir = dir.join("mqtt");
    cfg.home_assistant.discovery_prefix = PREFIX.into();
    cfg.home_assistant.stats_interval_secs = 1;
    let hub = tokio::time::timeout(WAIT, hearth_hub::start(cfg))
        .await
        .expect("hub starts in time")
        .expect("hub starts");
    let login = match external {
        Some(_) => (String::new(), String::new()),
        None => {
            let p = hub.provision("tester", Role::Admin).unwrap();
            (p.user, p.password)
        }
    };
    Hub { hub, login }
}

/// A client recording every publish on `filters`, retained flag included.
struct Watch {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    seen: Vec<(String, Vec<u8>)>,
}

impl Watch {
    async fn connect(
        addr: SocketAddr,
        login: &(String, String),
        id: &str,
        filters: &[&str],
    ) -> Watch {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(1 << 20, 1 << 20);
        if !login.0.is_empty() {
            o.set_credentials(login.0.clone(), login.1.clone());
        }
        let (client, mut el) = AsyncClient::new(o, 256);
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let n = filters.len();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut acks = 0;
            loop {
                match el.poll().await {
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                        acks += 1;
                        if acks == n {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx).await.unwrap().unwrap();
        Watch {
            client,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits until `cond` holds over everything received so far.
    async fn until(&mut self, what: &str, cond: impl Fn(&[(String, Vec<u8>)]) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(m)) => self.seen.push(m),
                _ => panic!(
                    "timed out waiting for {what}; received: {:?}",
                    self.seen
                        .iter()
                        .map(|(t, p)| format!("{t} {}", String::from_utf8_lossy(p)))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The last config per topic (empty = removed).
    fn configs(&self) -> BTreeMap<String, Vec<u8>> {
        self.seen
            .iter()
            .filter(|(t, _)| t.starts_with(PREFIX) && t.ends_with("/config"))
            .cloned()
            .collect()
    }

    async fn publish(&self, topic: &str, retain: bool, body: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, body.into())
            .await
            .unwrap();
    }
}

fn count(seen: &[(String, Vec<u8>)], topic: &str) -> usize {
    seen.iter().filter(|(t, _)| t == topic).count()
}

const META: &str = r#"{"device":"door-cam","kind":"agent","model":"faces@3","classes":["none","person"],"events":["detection"],"sw_version":"0.1.0"}"#;
const EVENT_TOPIC: &str = "ha-test/event/hearth/door-cam_detection/config";
const AGENT_TOPICS: [&str; 4] = [
    "ha-test/binary_sensor/hearth/door-cam_connected/config",
    EVENT_TOPIC,
    "ha-test/sensor/hearth/door-cam_detection_confidence/config",
    "ha-test/sensor/hearth/door-cam_model_version/config",
];
const BUTTON_TOPIC: &str = "ha-test/button/hearth/hearth_hub_refresh_faces/config";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_configs_follow_the_schema_and_the_device_life_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = start(dir.path(), coordinator_port, None).await;
    let addr = h.hub.mqtt_addr();
    let mut w = Watch::connect(
        addr,
        &h.login,
        "ha-watch",
        &[&format!("{PREFIX}/#"), "hearth/hearth-hub/#"],
    )
    .await;

    // An agent announces itself as Hearth agents do (retained meta and availability).
    w.publish("hearth/door-cam/meta", true, META).await;
    w.publish("hearth/door-cam/availability", true, "online")
        .await;
    w.until("the agent's and the hub's entities", |s| {
        AGENT_TOPICS
            .iter()
            .chain(&[BUTTON_TOPIC])
            .all(|t| count(s, t) > 0)
    })
    .await;
    let configs = w.configs();
    let mut components = HashSet::new();
    for (t, body) in &configs {
        let v: Value = serde_json::from_slice(body).unwrap();
        components.insert(check_schema(t, &v));
    }
    assert_eq!(
        components,
        ["event", "sensor", "binary_sensor", "button"]
            .map(String::from)
            .into()
    );
    // The exact payloads that matter to Home Assistant.
    let get = |t: &str| -> Value { serde_json::from_slice(&configs[t]).unwrap() };
    let ev = get(EVENT_TOPIC);
    assert_eq!(ev["state_topic"], "hearth/door-cam/event/detection");
    assert_eq!(ev["event_types"], serde_json::json!(["none", "person"]));
    assert_eq!(ev["unique_id"], "hearth_door-cam_detection");
    assert_eq!(
        ev["availability"],
        serde_json::json!([{"topic": "hearth/door-cam/availability",
            "payload_available": "online", "payload_not_available": "offline"}])
    );
    assert_eq!(
        ev["device"],
        serde_json::json!({"identifiers": ["hearth_door-cam"], "name": "door-cam",
            "manufacturer": "Hearth", "model": "Hearth agent (faces)", "sw_version": "0.1.0",
            "via_device": "hearth_hub"})
    );
    assert_eq!(
        ev["value_template"],
        "{{ {'event_type': value_json.class, 'score': value_json.score, 'model': value_json.model} | to_json }}"
    );
    let conf = get("ha-test/sensor/hearth/door-cam_detection_confidence/config");
    assert_eq!(conf["entity_category"], "diagnostic");
    assert_eq!(conf["value_template"], "{{ value_json.score }}");
    let version = get("ha-test/sensor/hearth/door-cam_model_version/config");
    assert_eq!(version["entity_category"], "diagnostic");
    assert_eq!(version["state_topic"], "hearth/door-cam/meta");
    let conn = get("ha-test/binary_sensor/hearth/door-cam_connected/config");
    assert_eq!(conn["device_class"], "connectivity");
    let button = get(BUTTON_TOPIC);
    assert_eq!(button["command_topic"], "hearth/hearth-hub/refresh/faces");
    let press = button["payload_press"].as_str().unwrap().to_string();
    assert_eq!(press.len(), 64, "a signed token: {press}");
    for s in ["events_per_second", "events", "commands", "rounds"] {
        let v = get(&format!("ha-test/sensor/hearth/hearth_hub_{s}/config"));
        assert_eq!(v["state_topic"], "hearth/hearth-hub/state");
        assert_eq!(v["availability"][0]["topic"], "hearth/hearth-hub/status");
    }
    // The hub's sensors' state and its availability.
    w.until("the hub's state", |s| {
        s.iter().any(|(t, p)| {
            t == "hearth/hearth-hub/state"
                && serde_json::from_slice::<Value>(p)
                    .is_ok_and(|v| v["events_per_second"].is_number() && v["rounds"].is_number())
        }) && s
            .iter()
            .any(|(t, p)| t == "hearth/hearth-hub/status" && p == b"online")
    })
    .await;
    // Every config is retained: a client arriving now gets them all.
    let mut late = Watch::connect(addr, &h.login, "ha-late", &[&format!("{PREFIX}/#")]).await;
    late.until("retained configs", |s| {
        AGENT_TOPICS
            .iter()
            .chain(&[BUTTON_TOPIC])
            .all(|t| count(s, t) > 0)
    })
    .await;
    drop(late);

    // Home Assistant's birth message on the configured prefix: everything again. On the
    // default prefix: nothing.
    let stats = h.hub.discovery_stats();
    let before = count(&w.seen, EVENT_TOPIC);
    w.publish("homeassistant/status", false, "online").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        stats.republished.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    w.publish("ha-test/status", false, "online").await;
    w.until("configs published again", |s| {
        count(s, EVENT_TOPIC) > before
    })
    .await;
    assert_eq!(
        stats.republished.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // A button press: the hub starts a refresh (the coordinator is not there: the failure
    // is counted); a wrong payload is refused.
    let m = h.hub.metrics();
    w.publish("hearth/hearth-hub/refresh/faces", false, "PRESS")
        .await;
    w.publish("hearth/hearth-hub/refresh/faces", false, press.clone())
        .await;
    let deadline = Instant::now() + WAIT;
    while Metrics::get(&m.refresh_failures) < 1 {
        assert!(Instant::now() < deadline, "the press was not acted on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(Metrics::get(&m.refresh_requests), 1);
    assert_eq!(
        Metrics::get(&m.refresh_unauthorized),
        1,
        "`PRESS` is not the token"
    );

    // Removal: empty retained configs for the agent's entities (and the button of the model
    // no agent runs any more); the hub's sensors stay.
    assert!(h.hub.remove_device("door-cam").is_some());
    w.until("the agent's entities removed", |s| {
        AGENT_TOPICS.iter().all(|t| {
            s.iter()
                .rev()
                .find(|(x, _)| x == t)
                .is_some_and(|(_, p)| p.is_empty())
        })
    })
    .await;
    assert!(!w.configs()["ha-test/sensor/hearth/hearth_hub_events/config"].is_empty());
    // At the broker the removed entities' configs are tombstones: a client arriving now
    // (Home Assistant after its own restart) gets the hub's retained configs and nothing
    // for the removed device.
    let hub_topics: Vec<String> = ["events_per_second", "events", "commands", "rounds"]
        .iter()
        .map(|s| format!("ha-test/sensor/hearth/hearth_hub_{s}/config"))
        .collect();
    let mut late = Watch::connect(addr, &h.login, "ha-late-2", &[&format!("{PREFIX}/#")]).await;
    late.until("the hub's retained configs", |s| {
        hub_topics.iter().all(|t| count(s, t) > 0)
    })
    .await;
    // Retained messages come in one burst at subscription; give stragglers a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(m) = late.rx.try_recv() {
        late.seen.push(m);
    }
    for t in AGENT_TOPICS {
        assert!(
            late.seen.iter().all(|(x, p)| x != t || p.is_empty()),
            "{t} is still retained on the broker after the removal"
        );
    }
    drop(late);
    // The retained meta is still on the broker: a new subscription does not bring the
    // removed device back.
    assert!(h.hub.registry().get("door-cam").is_none());

    // It comes back live, then is removed while the hub is stopped: the next start clears
    // its entities.
    w.publish("hearth/door-cam/meta", true, META).await;
    w.until("the agent's entities again", |s| {
        s.iter()
            .rev()
            .find(|(x, _)| x == EVENT_TOPIC)
            .is_some_and(|(_, p)| !p.is_empty())
    })
    .await;
    // (The first hub's embedded broker outlives it: the second hub uses it as an external
    // broker, so the watcher sees what it publishes at start-up.)
    let Hub { hub, login } = h;
    hub.shutdown().await;
    let reg = hearth_hub::Registry::open(&dir.path().join("state")).unwrap();
    assert!(reg.remove_id("door-cam").is_some());
    drop(reg);
    let from = w.seen.len();
    let url = format!("mqtt://{}:{}@{addr}", login.0, login.1);
    let h2 = start(dir.path(), coordinator_port, Some(url)).await;
    w.until(
        "entities of the device removed while the hub was stopped",
        |s| {
            AGENT_TOPICS
                .iter()
                .all(|t| s[from..].iter().any(|(x, p)| x == t && p.is_empty()))
        },
    )
    .await;
    // Its retained meta reaches the new hub's subscription too, and is ignored.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        h2.hub.registry().get("door-cam").is_none(),
        "its retained meta brought it back"
    );
    h2.hub.shutdown().await;
}

/// On Mosquitto: the agent's configs are retained (a late client gets them), and after the
/// removal a late client gets none of them, only the hub's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_devices_configs_are_tombstones_on_mosquitto() {
    const MOSQUITTO: &str = "/usr/sbin/mosquitto";
    assert!(
        std::path::Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: apt-get install -y mosquitto (scripts/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let mut broker = common::Proc(
        std::process::Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    common::wait_listening(&mut broker, port, WAIT, String::new);
    let coordinator_port = common::free_port();
    let h = start(
        dir.path(),
        coordinator_port,
        Some(format!("mqtt://127.0.0.1:{port}")),
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let anon = (String::new(), String::new());
    let mut w = Watch::connect(addr, &anon, "ha-watch", &[&format!("{PREFIX}/#")]).await;
    w.publish("hearth/door-cam/meta", true, META).await;
    w.publish("hearth/door-cam/availability", true, "online")
        .await;
    w.until("the agent's entities", |s| {
        AGENT_TOPICS.iter().all(|t| count(s, t) > 0)
    })
    .await;
    let late = |id: &'static str| {
        let anon = anon.clone();
        async move {
            let mut l = Watch::connect(addr, &anon, id, &[&format!("{PREFIX}/#")]).await;
            l.until("the hub's retained configs", |s| {
                count(s, "ha-test/sensor/hearth/hearth_hub_events/config") > 0
            })
            .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            while let Ok(m) = l.rx.try_recv() {
                l.seen.push(m);
            }
            l.seen
        }
    };
    let before = late("ha-late-1").await;
    for t in AGENT_TOPICS {
        assert!(
            before.iter().any(|(x, p)| x == t && !p.is_empty()),
            "{t} is retained before the removal"
        );
    }
    assert!(h.hub.remove_device("door-cam").is_some());
    w.until("the agent's entities removed", |s| {
        AGENT_TOPICS.iter().all(|t| {
            s.iter()
                .rev()
                .find(|(x, _)| x == t)
                .is_some_and(|(_, p)| p.is_empty())
        })
    })
    .await;
    let after = late("ha-late-2").await;
    for t in AGENT_TOPICS {
        assert!(
            after.iter().all(|(x, p)| x != t || p.is_empty()),
            "{t} is still retained on Mosquitto after the removal"
        );
    }
    h.hub.shutdown().await;
}
