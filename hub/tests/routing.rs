//! End-to-end tests of the hub on loopback: embedded rumqttd on a free port, real rumqttc
//! clients publishing events and listening for actuator commands. Every wait is bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hearth_hub::{
    Availability, BrokerConfig, Config, DropReason, Error, HubHandle, InvalidKind, Metrics, Role,
};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

const RULES: &str = r#"
[[rule]]
name = "porch light when someone is at the door"
[rule.when]
device = "door-cam"
event = "detection"
class = "person"
min_score = 0.8
[rule.then]
actuator = "porch_light"
payload = { state = "ON" }
cooldown_secs = 10

# used as an ordering barrier: no cooldown, fires on every kettle
[[rule]]
name = "kettle"
[rule.when]
device = "kitchen-*"
class = "kettle"
[rule.then]
actuator = "kitchen_fan"
payload = { state = "TOGGLE" }
"#;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn uid(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

struct Home {
    hub: HubHandle,
    _dir: tempfile::TempDir,
}

/// The test clients' login on each embedded broker (by port): `start_hub` provisions an
/// admin for the test's own clients, which `listener` and `publisher` use.
static LOGINS: Mutex<Option<HashMap<u16, (String, String)>>> = Mutex::new(None);

fn login(addr: SocketAddr) -> Option<(String, String)> {
    LOGINS.lock().unwrap().as_ref()?.get(&addr.port()).cloned()
}

impl Home {
    /// `mqtt://user:password@…` of this hub's embedded broker for a new admin principal
    /// (for a second hub that uses it as its external broker).
    fn external_url(&self, via: Option<SocketAddr>) -> String {
        let p = self.hub.provision(&uid("other-hub"), Role::Admin).unwrap();
        let addr = via.unwrap_or(self.hub.mqtt_addr());
        format!("mqtt://{}:{}@{addr}", p.user, p.password)
    }
}

async fn start_hub(rules: &str, tweak: impl FnOnce(&mut Config)) -> Home {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let mut cfg = Config {
        client_id: uid("hub"),
        rules: Some(path),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        broker: BrokerConfig::embedded("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    cfg.mqtt_auth.dir = dir.path().join("mqtt");
    tweak(&mut cfg);
    let embedded =
        matches!(cfg.broker, BrokerConfig::Embedded { .. }) && !cfg.mqtt_auth.allow_anonymous;
    let hub = timeout(Duration::from_secs(15), hearth_hub::start(cfg))
        .await
        .expect("hub starts in time")
        .expect("hub starts");
    if embedded {
        let p = hub.provision("tester", Role::Admin).unwrap();
        LOGINS
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(hub.mqtt_addr().port(), (p.user, p.password));
    }
    Home { hub, _dir: dir }
}

/// A client that forwards every publish it receives on `filter`.
async fn listener(
    addr: SocketAddr,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let mut o = MqttOptions::new(uid("listener"), addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    if let Some((u, p)) = login(addr) {
        o.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(o, 64);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        for _ in 0..100_000 {
            match el.poll().await {
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    timeout(WAIT, ready_rx)
        .await
        .expect("suback in time")
        .unwrap();
    (client, rx)
}

/// A publishing client whose event loop runs in the background.
async fn publisher(addr: SocketAddr) -> AsyncClient {
    let mut o = MqttOptions::new(uid("agent"), addr.ip().to_string(), addr.port());
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some((u, p)) = login(addr) {
        o.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(o, 256);
    tokio::spawn(async move {
        for _ in 0..100_000 {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
}

/// Publishes `payload` on the door camera's detection topic (QoS 1).
async fn door_cam(agent: &AsyncClient, payload: impl Into<Vec<u8>>, retain: bool) {
    agent
        .publish(
            "hearth/door-cam/event/detection",
            QoS::AtLeastOnce,
            retain,
            payload.into(),
        )
        .await
        .unwrap();
}

fn event(class: &str, score: f32) -> Vec<u8> {
    format!(r#"{{"class":"{class}","score":{score},"model":"door-cam@7","ts":"2026-11-24T18:00:00.000Z"}}"#)
        .into_bytes()
}

/// The next command, with its `hearth_id` checked and removed.
async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>) -> (String, Vec<u8>) {
    let (topic, payload) = timeout(WAIT, rx.recv())
        .await
        .expect("a command in time")
        .expect("listener alive");
    (topic, without_id(&payload))
}

/// A command payload without its `hearth_id` (which must be there).
fn without_id(payload: &[u8]) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(payload).expect("a JSON command");
    let id = v
        .as_object_mut()
        .and_then(|o| o.remove("hearth_id"))
        .expect("the command carries a hearth_id");
    assert!(id.as_str().is_some_and(|s| !s.is_empty()), "{id}");
    serde_json::to_vec(&v).unwrap()
}

/// A kettle in the kitchen: the `kettle` rule toggles the kitchen fan on every one.
async fn publish_kettle(agent: &AsyncClient) {
    agent
        .publish(
            "hearth/kitchen-plug/event/appliance",
            QoS::AtLeastOnce,
            false,
            event("kettle", 0.5),
        )
        .await
        .unwrap();
}

/// Publishes a kettle event and waits for its command: every message published before it
/// on the same connection has been routed by then (QoS 1 order is preserved).
async fn barrier(agent: &AsyncClient, rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    publish_kettle(agent).await;
    let (topic, payload) = next(rx).await;
    assert_eq!(
        topic, "zigbee2mqtt/kitchen_fan/set",
        "an unexpected command arrived before the barrier"
    );
    assert_eq!(payload, br#"{"state":"TOGGLE"}"#);
}

/// Publishes kettle events until one is routed to the kitchen fan (a hub that connects and
/// subscribes in the background is routing from then on); at most 50 tries of 200 ms.
async fn kettles_until_routed(
    agent: &AsyncClient,
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    for _ in 0..50 {
        publish_kettle(agent).await;
        if let Ok(Some((topic, _))) = timeout(Duration::from_millis(200), rx.recv()).await {
            assert_eq!(topic, "zigbee2mqtt/kitchen_fan/set");
            return;
        }
    }
    panic!("no kettle event was routed within 10 s");
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..250 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_at_the_door_turns_the_porch_light_on() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    assert_ne!(addr.port(), 0);
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/+/set").await;
    let agent = publisher(addr).await;
    door_cam(&agent, event("person", 0.93), false).await;
    let (topic, payload) = next(&mut rx).await;
    assert_eq!(topic, "zigbee2mqtt/porch_light/set");
    assert_eq!(payload, br#"{"state":"ON"}"#);
    let m = home.hub.metrics();
    assert_eq!(Metrics::get(&m.events_received), 1);
    assert_eq!(Metrics::get(&m.events_routed), 1);
    assert_eq!(Metrics::get(&m.commands_published), 1);
    let dev = home
        .hub
        .registry()
        .get("door-cam")
        .expect("device registered from its event");
    assert_eq!(dev.events, 1);
    timeout(WAIT, home.hub.shutdown())
        .await
        .expect("shutdown in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_threshold_wrong_class_or_device_do_not_fire() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/#").await;
    let agent = publisher(addr).await;
    for (topic, payload) in [
        ("hearth/door-cam/event/detection", event("person", 0.79)),
        ("hearth/door-cam/event/detection", event("cat", 0.99)),
        ("hearth/garden-cam/event/detection", event("person", 0.99)),
        ("hearth/door-cam/event/motion", event("person", 0.99)),
    ] {
        agent
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    barrier(&agent, &mut rx).await;
    let m = home.hub.metrics();
    assert_eq!(Metrics::get(&m.events_received), 5);
    assert_eq!(
        Metrics::get(&m.events_routed),
        1,
        "only the barrier matched"
    );
    assert_eq!(Metrics::get(&m.commands_published), 1);
    assert_eq!(m.events_dropped_total(), 0, "valid events are not drops");
    home.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_suppresses_a_second_firing() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/+/set").await;
    let agent = publisher(addr).await;
    for _ in 0..2 {
        door_cam(&agent, event("person", 0.95), false).await;
    }
    let (topic, _) = next(&mut rx).await;
    assert_eq!(topic, "zigbee2mqtt/porch_light/set");
    barrier(&agent, &mut rx).await; // the second porch command would have come before it
    let m = home.hub.metrics();
    assert_eq!(Metrics::get(&m.events_routed), 3);
    assert_eq!(Metrics::get(&m.cooldown_suppressed), 1);
    assert_eq!(Metrics::get(&m.commands_published), 2);
    home.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payloads_are_dropped_counted_and_never_routed() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/#").await;
    let agent = publisher(addr).await;
    let t = "hearth/door-cam/event/detection";
    // A person with a raw waveform attached: extra field.
    let extra =
        br#"{"class":"person","score":0.99,"model":"m@1","ts":"t","samples":[0.1,0.2]}"#.to_vec();
    // A person event padded past the size limit.
    let big = format!(
        r#"{{"class":"person","score":0.99,"model":"m@1","ts":"{}"}}"#,
        "x".repeat(hearth_proto::mqtt::MAX_EVENT_BYTES)
    )
    .into_bytes();
    let malformed = b"{\"class\":\"person\",\"score\":0.99".to_vec();
    let bad_score = event("person", 1.5);
    let bad_class = event("per/son", 0.99);
    for p in [extra, big, malformed, bad_score, bad_class] {
        agent.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
    }
    barrier(&agent, &mut rx).await;
    let m = home.hub.metrics();
    assert_eq!(m.events_dropped(DropReason::Schema), 2);
    assert_eq!(m.events_dropped(DropReason::TooLarge), 1);
    assert_eq!(m.events_dropped(DropReason::BadScore), 1);
    assert_eq!(m.events_dropped(DropReason::BadField), 1);
    assert_eq!(Metrics::get(&m.events_received), 6);
    assert_eq!(
        Metrics::get(&m.commands_published),
        1,
        "only the barrier fired"
    );
    // Nothing else arrives: the next command is a second barrier's (QoS 1 keeps order).
    barrier(&agent, &mut rx).await;
    assert_eq!(Metrics::get(&m.commands_published), 2);
    home.hub.shutdown().await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_and_registry() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/+/set").await;
    let agent = publisher(addr).await;
    let meta = br#"{"device":"door-cam","kind":"agent","model":"faces@3","classes":["none","person"],"sw_version":"0.1.0"}"#;
    agent
        .publish(
            "hearth/door-cam/meta",
            QoS::AtLeastOnce,
            true,
            meta.to_vec(),
        )
        .await
        .unwrap();
    agent
        .publish(
            "hearth/door-cam/availability",
            QoS::AtLeastOnce,
            true,
            "online",
        )
        .await
        .unwrap();
    agent
        .publish("hearth/plug/availability", QoS::AtLeastOnce, true, "maybe")
        .await
        .unwrap();
    door_cam(&agent, event("person", 0.9), false).await;
    door_cam(&agent, "nope", false).await;
    assert_eq!(next(&mut rx).await.0, "zigbee2mqtt/porch_light/set");
    barrier(&agent, &mut rx).await;

    let reg = home.hub.registry();
    let cam = reg.get("door-cam").expect("door-cam known");
    assert_eq!(cam.availability, Availability::Online);
    assert_eq!(cam.meta.as_ref().map(|m| m.model.as_str()), Some("faces@3"));
    assert_eq!(
        home.hub
            .metrics()
            .invalid_messages(InvalidKind::Availability),
        1
    );

    let resp = http_get(home.hub.metrics_addr().unwrap(), "/metrics").await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{resp}"
    );
    for line in [
        "hearth_hub_events_received_total 3",
        "hearth_hub_events_routed_total 2",
        "hearth_hub_commands_published_total 2",
        "hearth_hub_events_dropped_total{reason=\"schema\"} 1",
        "hearth_hub_refresh_requests_total 0",
        "hearth_hub_devices{availability=\"online\"} 1",
    ] {
        assert!(
            resp.contains(&format!("\n{line}\n")),
            "missing `{line}` in\n{resp}"
        );
    }
    let devices = http_get(home.hub.metrics_addr().unwrap(), "/devices").await;
    assert!(
        devices.contains("\"name\":\"door-cam\"")
            && devices.contains("\"availability\":\"online\""),
        "{devices}"
    );
    assert!(http_get(home.hub.metrics_addr().unwrap(), "/x")
        .await
        .starts_with("HTTP/1.1 404"));
    let health = http_get(home.hub.metrics_addr().unwrap(), "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");

    // Offline via the last-will topic.
    agent
        .publish(
            "hearth/door-cam/availability",
            QoS::AtLeastOnce,
            true,
            "offline",
        )
        .await
        .unwrap();
    wait_until("door-cam offline", || {
        reg.get("door-cam").unwrap().availability == Availability::Offline
    })
    .await;
    home.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_requests_are_counted_and_fail_without_a_coordinator() {
    // Coordinator configured but unreachable: the MQTT refresh fails quickly, the follower
    // keeps retrying in the background, and shutdown still completes in time.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = start_hub("", |c| {
        c.coordinator = Some(format!("http://127.0.0.1:{port}"));
        c.admin_token = Some("secret".into());
    })
    .await;
    // A device with valid MQTT credentials, but no admin: it cannot sign.
    let agent = publisher(home.hub.mqtt_addr()).await;
    let refresh = |body: Vec<u8>| {
        let agent = agent.clone();
        async move {
            agent
                .publish("hearth/federation/refresh", QoS::AtLeastOnce, false, body)
                .await
                .unwrap()
        }
    };
    let m = home.hub.metrics();
    // Unsigned (what any client could publish before), signed with a wrong key, and junk.
    refresh(br#"{"model":"plaid"}"#.to_vec()).await;
    let forged = hearth_hub::auth::sign_refresh(b"a key the device made up itself!", "plaid");
    refresh(serde_json::to_vec(&forged).unwrap()).await;
    refresh(b"plaid".to_vec()).await;
    wait_until("refusals counted", || {
        Metrics::get(&m.refresh_unauthorized) == 2 && m.invalid_messages(InvalidKind::Refresh) == 1
    })
    .await;
    assert_eq!(
        Metrics::get(&m.refresh_requests),
        0,
        "nothing unsigned got through"
    );
    // Signed with the hub's key (what `hearth-hub refresh-request` prints for an admin):
    // accepted, then fails at the unreachable coordinator.
    let key = home.hub.credentials().unwrap().refresh_key().unwrap();
    let signed = serde_json::to_vec(&hearth_hub::auth::sign_refresh(&key, "plaid")).unwrap();
    refresh(signed.clone()).await;
    wait_until("refresh failure", || Metrics::get(&m.refresh_failures) == 1).await;
    assert_eq!(Metrics::get(&m.refresh_requests), 1);
    // The same signed request seen on the broker and published again: a replay.
    refresh(signed).await;
    wait_until("replay refused", || {
        Metrics::get(&m.refresh_unauthorized) == 3
    })
    .await;
    assert_eq!(Metrics::get(&m.refresh_requests), 1);
    assert!(home
        .hub
        .render_metrics()
        .contains("hearth_hub_refresh_unauthorized_total 3"));
    let t = std::time::Instant::now();
    timeout(WAIT, home.hub.shutdown())
        .await
        .expect("shutdown in time");
    assert!(t.elapsed() < Duration::from_secs(4));
}

/// Whether a client logging in with `login` gets a CONNACK from the broker at `addr`.
async fn connects(addr: SocketAddr, login: Option<(&str, &str)>) -> bool {
    let mut o = MqttOptions::new(uid("login"), addr.ip().to_string(), addr.port());
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (_c, mut el) = AsyncClient::new(o, 8);
    let r = timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(a))) => {
                    return a.code == rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    r.expect("an answer or a closed connection in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_clients_without_valid_credentials() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    let cam = home.hub.provision("door-cam", Role::Device).unwrap();
    assert!(connects(addr, Some((&cam.user, &cam.password))).await);
    assert!(!connects(addr, None).await, "no credentials");
    assert!(
        !connects(addr, Some((&cam.user, "guess"))).await,
        "wrong password"
    );
    assert!(
        !connects(addr, Some(("intruder", &cam.password))).await,
        "unknown user"
    );
    let hub_pw =
        std::fs::read_to_string(home.hub.credentials().unwrap().hub_password_path()).unwrap();
    assert!(
        !connects(addr, Some(("door-cam", hub_pw.trim()))).await,
        "another's password"
    );

    // A rotated password replaces the old one at once.
    let rotated = home.hub.provision("door-cam", Role::Device).unwrap();
    assert!(!connects(addr, Some((&cam.user, &cam.password))).await);
    assert!(connects(addr, Some((&rotated.user, &rotated.password))).await);

    // Nothing from a client without credentials reaches the hub: its event never arrives.
    let mut o = MqttOptions::new(uid("rogue"), addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (rogue, mut el) = AsyncClient::new(o, 8);
    rogue
        .publish(
            "hearth/door-cam/event/detection",
            QoS::AtLeastOnce,
            false,
            event("person", 0.99),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let _ = timeout(Duration::from_millis(500), el.poll()).await;
    }
    assert_eq!(Metrics::get(&home.hub.metrics().events_received), 0);

    // `allow_anonymous` is the only way to open the embedded broker.
    let open = start_hub("", |c| c.mqtt_auth.allow_anonymous = true).await;
    assert!(connects(open.hub.mqtt_addr(), None).await);
    open.hub.shutdown().await;
    home.hub.shutdown().await;
}

/// `deprovision-device` on the embedded broker: the device's next login is refused at once
/// (the broker reads the changed password file again), the others' still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deprovisioned_device_can_no_longer_log_in_to_the_embedded_broker() {
    let home = start_hub(RULES, |_| {}).await;
    let addr = home.hub.mqtt_addr();
    let cam = home.hub.provision("door-cam", Role::Device).unwrap();
    let other = home.hub.provision("garden-cam", Role::Device).unwrap();
    assert!(connects(addr, Some((&cam.user, &cam.password))).await);
    let gone = home.hub.deprovision("door-cam").unwrap();
    assert_eq!(gone.role, Some(Role::Device));
    assert!(
        !connects(addr, Some((&cam.user, &cam.password))).await,
        "a deprovisioned device logged in"
    );
    assert!(connects(addr, Some((&other.user, &other.password))).await);
    assert!(home.hub.deprovision("door-cam").is_err(), "only once");
    home.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_fail_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, RULES.replace("min_score = 0.8", "min_score = 80")).unwrap();
    let cfg = Config {
        rules: Some(path.clone()),
        broker: BrokerConfig::embedded("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    let err = hearth_hub::start(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Rules(_)));
    assert_eq!(
        err.to_string(),
        format!(
            "{}:8: rule \"porch light when someone is at the door\": when.min_score 80 must be within 0..=1",
            path.display()
        )
    );
    let missing = Config {
        rules: Some(dir.path().join("nope.toml")),
        ..Config::default()
    };
    let e = hearth_hub::start(missing).await.unwrap_err().to_string();
    assert!(
        e.starts_with("cannot read rules file") && e.contains("nope.toml"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_on_shutdown_and_external_broker_works() {
    // Hub A (no rules) provides the broker; hub B (the rules) uses it as an external
    // broker via run(): commands on A's broker can only come from B.
    let a = start_hub("", |_| {}).await;
    let url = a.external_url(None);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = Config {
        client_id: uid("hub-b"),
        rules: Some(rules),
        broker: BrokerConfig::external(url.clone()),
        ..Config::default()
    };
    let b = tokio::spawn(hearth_hub::run(cfg, async {
        let _ = stop_rx.await;
    }));
    let addr = a.hub.mqtt_addr();
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/+/set").await;
    let agent = publisher(addr).await;
    // Bounded wait until B routes (it connects and subscribes in the background).
    kettles_until_routed(&agent, &mut rx).await;
    assert!(!b.is_finished(), "run() keeps running until told to stop");
    stop_tx.send(()).unwrap();
    timeout(WAIT, b)
        .await
        .expect("run returns in time")
        .unwrap()
        .unwrap();

    // Unreachable external broker: start fails within the connect timeout with a clear error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = Config {
        client_id: uid("hub-c"),
        connect_timeout_secs: 1,
        broker: BrokerConfig::external(format!("mqtt://127.0.0.1:{port}")),
        ..Config::default()
    };
    let e = timeout(WAIT, hearth_hub::start(cfg))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("MQTT broker: cannot connect and subscribe"),
        "{e}"
    );
    a.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_retained_events_are_not_routed_on_subscribe() {
    // Broker from a rule-less hub A holds a retained person event; hub B, connecting
    // later, receives it with the retain flag (MQTT 3.3.1.3) and must not fire on it.
    let a = start_hub("", |_| {}).await;
    let addr = a.hub.mqtt_addr();
    let agent = publisher(addr).await;
    door_cam(&agent, event("person", 0.99), true).await;
    wait_until("hub A saw the event", || {
        Metrics::get(&a.hub.metrics().events_received) == 1
    })
    .await;
    let (_l, mut rx) = listener(addr, "zigbee2mqtt/+/set").await;
    let b = start_hub(RULES, |c| {
        c.broker = BrokerConfig::external(a.external_url(None))
    })
    .await;
    barrier(&agent, &mut rx).await;
    let m = b.hub.metrics();
    assert_eq!(m.events_dropped(DropReason::Retained), 1);
    assert_eq!(
        Metrics::get(&m.commands_published),
        1,
        "only the barrier fired"
    );
    b.hub.shutdown().await;
    a.hub.shutdown().await;
}

/// A TCP forwarder on a fixed loopback port to `upstream`, which can be cut (listener and
/// every forwarded connection closed) and restored on the same port.
struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut p = Proxy {
            addr,
            upstream,
            task: None,
        };
        p.task = Some(tokio::spawn(Proxy::serve(l, upstream)));
        p
    }

    async fn serve(l: tokio::net::TcpListener, upstream: SocketAddr) {
        // Aborting this task drops the set, which aborts (and closes) every connection.
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut down, _)) = l.accept().await {
            conns.spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    }

    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn restore(&mut self) {
        let mut tries = 0;
        let l = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "cannot rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.task = Some(tokio::spawn(Proxy::serve(l, self.upstream)));
    }
}

async fn wait_for_status(addr: SocketAddr, status: &str, limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let r = http_get(addr, "/healthz").await;
        if r.starts_with(&format!("HTTP/1.1 {status}")) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never answered {status}; last:\n{r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_the_mqtt_connection_and_the_hub_reconnects() {
    // Hub A's embedded broker, reached by hub B through a proxy we can cut.
    let a = start_hub("", |_| {}).await;
    let mut proxy = Proxy::start(a.hub.mqtt_addr()).await;
    let b = start_hub(RULES, |c| {
        c.broker = BrokerConfig::external(a.external_url(Some(proxy.addr)));
    })
    .await;
    let status = b.hub.metrics_addr().unwrap();
    wait_for_status(status, "200", WAIT).await;
    assert!(b.hub.health().is_ok());
    let connects = Metrics::get(&b.hub.metrics().mqtt_connects);

    proxy.cut();
    let r = wait_for_status(status, "503", WAIT).await;
    // Every MQTT link goes through the proxy; whichever the hub noticed first is named.
    assert!(r.contains("MQTT") && r.contains("down"), "{r}");

    proxy.restore().await;
    wait_for_status(status, "200", Duration::from_secs(20)).await;
    assert!(Metrics::get(&b.hub.metrics().mqtt_connects) >= connects + 2);

    // And it routes again once resubscribed.
    let (_l, mut rx) = listener(a.hub.mqtt_addr(), "zigbee2mqtt/+/set").await;
    let agent = publisher(a.hub.mqtt_addr()).await;
    kettles_until_routed(&agent, &mut rx).await;
    b.hub.shutdown().await;
    a.hub.shutdown().await;
}

/// Refresh nonces outlive the hub: a signed refresh accepted before a restart is refused as a
/// replay after it (the nonce file in the credentials directory, 0600), while a fresh one is
/// obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_refresh_cannot_be_replayed_after_a_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let creds = tempfile::tempdir().unwrap();
    let tweak = |c: &mut Config| {
        c.coordinator = Some(format!("http://127.0.0.1:{port}"));
        c.admin_token = Some("secret".into());
        c.mqtt_auth.dir = creds.path().join("mqtt");
    };
    let send = |addr: SocketAddr, body: Vec<u8>| async move {
        let c = publisher(addr).await;
        c.publish("hearth/federation/refresh", QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
        c
    };
    let home = start_hub("", tweak).await;
    let key = home.hub.credentials().unwrap().refresh_key().unwrap();
    let signed = serde_json::to_vec(&hearth_hub::auth::sign_refresh(&key, "plaid")).unwrap();
    let m = home.hub.metrics();
    let _c = send(home.hub.mqtt_addr(), signed.clone()).await;
    // Accepted (then fails at the unreachable coordinator).
    wait_until("refresh accepted", || {
        Metrics::get(&m.refresh_failures) == 1
    })
    .await;
    assert_eq!(Metrics::get(&m.refresh_requests), 1);
    let file = creds
        .path()
        .join("mqtt")
        .join(hearth_hub::auth::REFRESH_NONCES_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "nonce file is private: {mode:o}");
    }
    drop(_c);
    home.hub.shutdown().await;

    let home = start_hub("", tweak).await;
    let m = home.hub.metrics();
    let _c = send(home.hub.mqtt_addr(), signed).await;
    wait_until("replay refused", || {
        Metrics::get(&m.refresh_unauthorized) == 1
    })
    .await;
    assert_eq!(
        Metrics::get(&m.refresh_requests),
        0,
        "the replay was obeyed"
    );
    let fresh = serde_json::to_vec(&hearth_hub::auth::sign_refresh(&key, "plaid")).unwrap();
    let _d = send(home.hub.mqtt_addr(), fresh).await;
    wait_until("fresh refresh accepted", || {
        Metrics::get(&m.refresh_requests) == 1
    })
    .await;
    home.hub.shutdown().await;
}
