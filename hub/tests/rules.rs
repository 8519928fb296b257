//! The rules engine end to end on loopback: an embedded rumqttd on a free port, real
//! rumqttc clients publishing events, states and availability and listening for commands.
//! Every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hearth_hub::{BrokerConfig, Config, HubHandle};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn uid(p: &str) -> String {
    format!(
        "{p}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A hub on a free port (anonymous clients allowed: these tests are about rules) with the
/// rules file at `dir/rules.toml`.
async fn start(dir: &Path, rules: &str, tweak: impl FnOnce(&mut Config)) -> HubHandle {
    let path = dir.join("rules.toml");
    if !path.exists() {
        std::fs::write(&path, rules).unwrap();
    }
    let mut cfg = Config {
        client_id: uid("hub"),
        rules: Some(path),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        broker: BrokerConfig::embedded("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    cfg.mqtt_auth.allow_anonymous = true;
    cfg.mqtt_auth.dir = dir.join("mqtt");
    tweak(&mut cfg);
    timeout(Duration::from_secs(15), hearth_hub::start(cfg))
        .await
        .expect("hub starts in time")
        .expect("hub starts")
}

type Rx = mpsc::UnboundedReceiver<(String, serde_json::Value, Instant)>;

/// Commands on `zigbee2mqtt/+/set`, parsed, with their arrival time.
async fn commands(addr: SocketAddr) -> Rx {
    let mut o = MqttOptions::new(uid("listener"), addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(o, 64);
    client
        .subscribe("zigbee2mqtt/+/set", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut ready = Some(ready_tx);
        for _ in 0..100_000 {
            match el.poll().await {
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).expect("commands are JSON");
                    if tx.send((p.topic.clone(), v, Instant::now())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    timeout(WAIT, ready_rx).await.expect("suback").unwrap();
    rx
}

async fn publisher(addr: SocketAddr) -> AsyncClient {
    let o = MqttOptions::new(uid("agent"), addr.ip().to_string(), addr.port());
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

async fn publish(c: &AsyncClient, topic: &str, payload: &str) {
    c.publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .unwrap();
}

fn event(class: &str, score: f32, id: &str, kind: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"{kind}","class":"{class}","score":{score},"model":"door-cam@7","ts":"2026-11-30T18:00:00.000Z"}}"#
    )
}

async fn next(rx: &mut Rx) -> (String, serde_json::Value, Instant) {
    timeout(WAIT, rx.recv())
        .await
        .expect("a command in time")
        .expect("listener alive")
}

/// Barrier: a `ping` event fires the `barrier` rule (to `zigbee2mqtt/barrier/set`) and its
/// command arrives after everything published before it was routed. Returns what came first.
async fn until_barrier(agent: &AsyncClient, rx: &mut Rx) -> Vec<(String, serde_json::Value)> {
    publish(
        agent,
        "hearth/probe/event/ping",
        &event("ping", 1.0, "b", "new"),
    )
    .await;
    let mut before = Vec::new();
    loop {
        let (t, v, _) = next(rx).await;
        if t == "zigbee2mqtt/barrier/set" {
            return before;
        }
        before.push((t, v));
    }
}

const BARRIER: &str = r#"
[[rule]]
name = "barrier"
[rule.when]
device = "probe"
[rule.then]
actuator = "barrier"
payload = { state = "TOGGLE" }
"#;

async fn metrics_text(hub: &HubHandle) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(hub.metrics_addr().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_scene_delay_and_track_type() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"{BARRIER}
[[rule]]
name = "welcome \"home\""
[rule.when]
device = "door-cam"
class = "person"
type = "new"
[[rule.action]]
kind = "scene"
commands = [
  {{ actuator = "porch_light", payload = {{ state = "ON", event_id = "{{{{ id }}}}", score = "{{{{ score }}}}", note = "say \"hi\" \\ to {{{{ device }}}} ({{{{ rule }}}})" }} }},
  {{ actuator = "hall_light", payload = {{ state = "ON", brightness = 40 }} }},
]
[[rule.action]]
kind = "delay"
secs = 0.4
[[rule.action]]
kind = "command"
actuator = "porch_light"
payload = {{ state = "OFF", event_id = "{{{{ id }}}}" }}
"#
    );
    let hub = start(dir.path(), &rules, |_| {}).await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let agent = publisher(hub.mqtt_addr()).await;

    // `end` of a track does not match `type = "new"`.
    publish(
        &agent,
        "hearth/door-cam/event/detection",
        &event("person", 0.93, "t-1", "end"),
    )
    .await;
    assert!(until_barrier(&agent, &mut rx).await.is_empty());

    publish(
        &agent,
        "hearth/door-cam/event/detection",
        &event("person", 0.93, "t-2", "new"),
    )
    .await;
    let (t1, v1, at1) = next(&mut rx).await;
    assert_eq!(t1, "zigbee2mqtt/porch_light/set");
    assert_eq!(v1["event_id"], "t-2");
    assert_eq!(v1["score"], serde_json::json!(0.93));
    assert_eq!(v1["note"], "say \"hi\" \\ to door-cam (welcome \"home\")");
    assert!(v1["hearth_id"].is_string());
    let (t2, v2, _) = next(&mut rx).await;
    assert_eq!(t2, "zigbee2mqtt/hall_light/set");
    assert_eq!(v2["brightness"], 40);
    let (t3, v3, at3) = next(&mut rx).await;
    assert_eq!(
        (t3.as_str(), &v3["state"], &v3["event_id"]),
        (
            "zigbee2mqtt/porch_light/set",
            &serde_json::json!("OFF"),
            &serde_json::json!("t-2")
        )
    );
    let gap = at3 - at1;
    assert!(
        gap >= Duration::from_millis(350),
        "the delay held the last command back: {gap:?}"
    );
    let history = hub.rules_history(None, 10);
    let f = history
        .iter()
        .find(|f| f.rule == "welcome \"home\"")
        .expect("recorded");
    assert_eq!(f.commands.len(), 3);
    assert!((f.commands[2].after_secs - 0.4).abs() < 1e-9);
    hub.shutdown().await;
}

/// A camera track event as a camera agent publishes it (Frigate's fields), with the head's
/// verdict when `sub` is given.
fn camera_event(id: &str, sub: Option<(&str, f32)>) -> String {
    let sub = sub.map_or(String::new(), |(l, p)| {
        format!(r#","sub_label":"{l}","sub_score":{p}"#)
    });
    format!(
        r#"{{"type":"new","id":"{id}","camera":"door-cam","label":"face","score":0.9,"top_score":0.9,"box":[0.3,0.3,0.7,0.7],"start_time":1800000000.5,"end_time":null,"model":"blazeface@1"{sub}}}"#
    )
}

/// Rules on a camera's head verdict (`sub_label`, `min_sub_score`, Frigate's `label`), with
/// real camera events through the embedded broker: each verdict gets its own scene, an event
/// without a verdict or below the head's probability fires neither, and the verdict renders
/// into the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_head_verdicts_pick_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"{BARRIER}
[[rule]]
name = "stranger"
[rule.when]
device = "door-cam"
label = "face"
sub_label = "none"
[rule.then]
actuator = "porch_light"
payload = {{ state = "ON", brightness = 254, seen = "{{{{ sub_label }}}}", p = "{{{{ sub_score }}}}", track = "{{{{ id }}}}" }}

[[rule]]
name = "resident"
[rule.when]
device = "door-cam"
label = "face"
sub_label = "person"
min_sub_score = 0.8
[rule.then]
actuator = "hall_light"
payload = {{ state = "ON", track = "{{{{ id }}}}" }}
"#
    );
    let hub = start(dir.path(), &rules, |_| {}).await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let agent = publisher(hub.mqtt_addr()).await;
    let topic = "hearth/door-cam/event/detection";
    for (id, sub) in [
        ("1-1", None),
        ("1-2", Some(("person", 0.6))),
        ("1-3", Some(("none", 0.7))),
        ("1-4", Some(("person", 0.93))),
    ] {
        publish(&agent, topic, &camera_event(id, sub)).await;
    }
    let mut got = until_barrier(&agent, &mut rx).await;
    // (Commands to two actuators: their order is not the events'.)
    got.sort_by(|a, b| b.0.cmp(&a.0));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, "zigbee2mqtt/porch_light/set");
    assert_eq!(
        (&got[0].1["seen"], &got[0].1["p"], &got[0].1["track"]),
        (
            &serde_json::json!("none"),
            &serde_json::json!(0.7),
            &serde_json::json!("1-3")
        )
    );
    assert_eq!(got[1].0, "zigbee2mqtt/hall_light/set");
    assert_eq!(got[1].1["track"], "1-4");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_availability_triggers_and_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"{BARRIER}
[[rule]]
name = "tv on: dim the lights"
[rule.when]
kind = "state"
device = "tv"
to = "ON"
[rule.then]
actuator = "living_light"
payload = {{ brightness = 30, because = "{{{{ device }}}} {{{{ attribute }}}} = {{{{ value }}}}" }}

[[rule]]
name = "camera gone"
[rule.when]
kind = "availability"
device = "door-cam*"
to = "offline"
[rule.then]
actuator = "siren"
payload = {{ state = "ON", who = "{{{{ device }}}}" }}

[[rule]]
name = "person while the tv has been on for 1 s"
[rule.when]
class = "person"
[[rule.condition]]
kind = "state"
device = "tv"
equals = "ON"
for_secs = 1
[[rule.condition]]
kind = "score"
min = 0.9
[[rule.condition]]
kind = "time"
after = "00:00"
before = "23:59:59"
[rule.then]
actuator = "pause"
payload = {{ state = "ON" }}
"#
    );
    let hub = start(dir.path(), &rules, |_| {}).await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let agent = publisher(hub.mqtt_addr()).await;

    publish(&agent, "zigbee2mqtt/tv", r#"{"state":"ON","volume":10}"#).await;
    let (t, v, _) = next(&mut rx).await;
    assert_eq!(t, "zigbee2mqtt/living_light/set");
    assert_eq!(v["because"], "tv state = ON");
    let tv_on = Instant::now();
    // Same state again (volume only): no firing. A person at once: the tv has not been on
    // for 1 s yet.
    publish(&agent, "zigbee2mqtt/tv", r#"{"state":"ON","volume":11}"#).await;
    publish(
        &agent,
        "hearth/cam/event/detection",
        &event("person", 0.95, "p1", "new"),
    )
    .await;
    assert!(until_barrier(&agent, &mut rx).await.is_empty());
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(tv_on.elapsed())).await;
    // Score below the condition's minimum: nothing; then one above it: fires.
    publish(
        &agent,
        "hearth/cam/event/detection",
        &event("person", 0.85, "p2", "new"),
    )
    .await;
    assert!(until_barrier(&agent, &mut rx).await.is_empty());
    publish(
        &agent,
        "hearth/cam/event/detection",
        &event("person", 0.95, "p3", "new"),
    )
    .await;
    let before = until_barrier(&agent, &mut rx).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].0, "zigbee2mqtt/pause/set");

    // Availability: online (no firing), offline (fires once), offline again (no change).
    for a in ["online", "offline", "offline"] {
        publish(&agent, "hearth/door-cam-2/availability", a).await;
    }
    let before = until_barrier(&agent, &mut rx).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].0, "zigbee2mqtt/siren/set");
    assert_eq!(before[0].1["who"], "door-cam-2");
    // The tv off: the condition fails again.
    publish(&agent, "zigbee2mqtt/tv", r#"{"state":"OFF"}"#).await;
    publish(
        &agent,
        "hearth/cam/event/detection",
        &event("person", 0.95, "p4", "new"),
    )
    .await;
    assert!(until_barrier(&agent, &mut rx).await.is_empty());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_and_interval_triggers() {
    let dir = tempfile::tempdir().unwrap();
    // A time trigger 2 s from now (UTC, the default offset); not within a minute's end.
    let mut now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now % 60 > 50 {
        tokio::time::sleep(Duration::from_secs(61 - now % 60)).await;
        now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
    }
    let at = (now + 2) % 86_400;
    let rules = format!(
        r#"
[[rule]]
name = "alarm"
[rule.when]
kind = "time"
at = "{:02}:{:02}:{:02}"
[rule.then]
actuator = "alarm"
payload = {{ state = "ON", by = "{{{{ rule }}}}" }}

[[rule]]
name = "pump"
[rule.when]
kind = "interval"
every_secs = 1
[rule.then]
actuator = "pump"
payload = {{ state = "TOGGLE" }}
"#,
        at / 3600,
        at / 60 % 60,
        at % 60
    );
    let hub = start(dir.path(), &rules, |_| {}).await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let t0 = Instant::now();
    let (mut alarms, mut pumps) = (0, 0);
    while t0.elapsed() < Duration::from_millis(4500) {
        if let Ok(Some((t, v, _))) = timeout(Duration::from_millis(200), rx.recv()).await {
            match t.as_str() {
                "zigbee2mqtt/alarm/set" => {
                    assert_eq!(v["by"], "alarm");
                    alarms += 1
                }
                "zigbee2mqtt/pump/set" => pumps += 1,
                other => panic!("{other}"),
            }
        }
    }
    assert_eq!(alarms, 1, "a time trigger fires once");
    assert!((3..=5).contains(&pumps), "every second for ~4.5 s: {pumps}");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_and_debounce() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"{BARRIER}
[[rule]]
name = "motion settles"
debounce_secs = 0.5
[rule.when]
device = "hall-pir"
[rule.then]
actuator = "hall_light"
payload = {{ state = "ON", last = "{{{{ id }}}}" }}

[[rule]]
name = "doorbell"
cooldown_secs = 30
[rule.when]
device = "doorbell"
[rule.then]
actuator = "chime"
payload = {{ state = "ON" }}
"#
    );
    let hub = start(dir.path(), &rules, |_| {}).await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let agent = publisher(hub.mqtt_addr()).await;

    for id in ["m1", "m2", "m3", "m4"] {
        publish(
            &agent,
            "hearth/hall-pir/event/motion",
            &event("motion", 0.9, id, "update"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let last = Instant::now();
    let (t, v, at) = next(&mut rx).await;
    assert_eq!(t, "zigbee2mqtt/hall_light/set");
    assert_eq!(v["last"], "m4", "the last trigger's values");
    assert!(at - last >= Duration::from_millis(300), "{:?}", at - last);
    // No second firing for the earlier triggers.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(until_barrier(&agent, &mut rx).await.is_empty());

    for id in ["d1", "d2", "d3"] {
        publish(
            &agent,
            "hearth/doorbell/event/ring",
            &event("ring", 1.0, id, "new"),
        )
        .await;
    }
    let before = until_barrier(&agent, &mut rx).await;
    assert_eq!(before.len(), 1, "cooldown: {before:?}");
    assert_eq!(
        hearth_hub::Metrics::get(&hub.metrics().cooldown_suppressed),
        2
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_takes_good_files_and_keeps_the_last_good_rules() {
    let dir = tempfile::tempdir().unwrap();
    let one = format!("{BARRIER}\n[[rule]]\nname = \"door\"\n[rule.when]\ndevice = \"door-cam\"\n[rule.then]\nactuator = \"porch_light\"\npayload = {{ state = \"ON\" }}\n");
    let hub = start(dir.path(), &one, |c| c.rules_engine.reload_secs = 1).await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let agent = publisher(hub.mqtt_addr()).await;
    let path = dir.path().join("rules.toml");
    let door = |id: &'static str| event("person", 0.9, id, "new");

    publish(&agent, "hearth/door-cam/event/detection", &door("a")).await;
    assert_eq!(
        until_barrier(&agent, &mut rx).await[0].0,
        "zigbee2mqtt/porch_light/set"
    );

    // A good change: the door now turns on the hall light, and a new state rule needs a
    // topic the hub did not follow before (`zigbee2mqtt/tv`).
    let tv = "\n[[rule]]\nname = \"tv\"\n[rule.when]\nkind = \"state\"\ndevice = \"tv\"\nto = \"ON\"\n[rule.then]\nactuator = \"dim\"\npayload = { brightness = 10 }\n";
    let two = one.replace("porch_light", "hall_light") + tv;
    std::fs::write(&path, &two).unwrap();
    let t0 = Instant::now();
    while hub.rules_reloads().0 < 1 {
        assert!(t0.elapsed() < WAIT, "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&agent, "hearth/door-cam/event/detection", &door("b")).await;
    assert_eq!(
        until_barrier(&agent, &mut rx).await[0].0,
        "zigbee2mqtt/hall_light/set"
    );
    // The hub follows the new state topic (a state change gets through, bounded retries).
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < WAIT,
            "the reloaded rules' state topic is not followed"
        );
        publish(&agent, "zigbee2mqtt/tv", r#"{"state":"OFF"}"#).await;
        publish(&agent, "zigbee2mqtt/tv", r#"{"state":"ON"}"#).await;
        let got = until_barrier(&agent, &mut rx).await;
        if got.iter().any(|(t, _)| t == "zigbee2mqtt/dim/set") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A bad change (an unknown field on line 8): refused, counted, last good rules stay.
    std::fs::write(&path, two.replace("payload", "paylod")).unwrap();
    let t0 = Instant::now();
    while hub.rules_reloads().1 < 1 {
        assert!(t0.elapsed() < WAIT, "no refused reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&agent, "hearth/door-cam/event/detection", &door("c")).await;
    assert_eq!(
        until_barrier(&agent, &mut rx).await[0].0,
        "zigbee2mqtt/hall_light/set"
    );
    let e = hub.reload_rules().unwrap_err().to_string();
    assert!(
        e.contains("rules.toml") && e.contains("unknown field `paylod`") && e.contains("line 8"),
        "{e}"
    );
    let m = metrics_text(&hub).await;
    assert!(
        m.contains("hearth_hub_rules_reloads_total{result=\"ok\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("hearth_hub_rules_reloads_total{result=\"error\"} 2\n"),
        "{m}"
    );
    assert_eq!(hub.rules().len(), 3);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_restart_and_metrics_count_firings() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!("{BARRIER}\n[[rule]]\nname = \"door\"\n[rule.when]\ndevice = \"door-cam\"\n[rule.then]\nactuator = \"porch_light\"\npayload = {{ state = \"ON\", id = \"{{{{ id }}}}\" }}\n");
    let history = dir.path().join("history");
    let set = |c: &mut Config| c.rules_engine.history = Some(history.clone());
    {
        let hub = start(dir.path(), &rules, set).await;
        let mut rx = commands(hub.mqtt_addr()).await;
        let agent = publisher(hub.mqtt_addr()).await;
        publish(
            &agent,
            "hearth/door-cam/event/detection",
            &event("person", 0.9, "first", "new"),
        )
        .await;
        assert_eq!(until_barrier(&agent, &mut rx).await.len(), 1);
        let t0 = Instant::now();
        loop {
            let m = metrics_text(&hub).await;
            if m.contains("hearth_hub_event_to_command_seconds_count 2\n") {
                assert!(
                    m.contains("hearth_hub_rules_fired_total{rule=\"door\"} 1\n"),
                    "{m}"
                );
                assert!(
                    m.contains("hearth_hub_rules_fired_total{rule=\"barrier\"} 1\n"),
                    "{m}"
                );
                assert!(
                    m.contains("hearth_hub_mqtt_connected{link=\"subscriber\"} 1\n"),
                    "{m}"
                );
                assert!(m.contains("hearth_hub_embedded_broker_running 1\n"), "{m}");
                assert!(
                    m.contains("hearth_hub_event_to_command_seconds_bucket{le=\"+Inf\"} 2\n"),
                    "{m}"
                );
                break;
            }
            assert!(t0.elapsed() < WAIT, "latency not observed: {m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        hub.shutdown().await;
    }
    let hub = start(dir.path(), &rules, set).await;
    let h = hub.rules_history(Some("door"), 10);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].trigger, "event hearth/door-cam/event/detection");
    assert!(
        h[0].commands[0].payload.contains("\"id\":\"first\""),
        "{:?}",
        h[0]
    );
    assert_eq!(hub.rules_history(None, 10).len(), 2);
    hub.shutdown().await;
}

/// `[rules_engine] history_max_per_rule` reaches the history: a busy rule keeps only its
/// newest firings there, and the others keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_keeps_at_most_history_max_per_rule_of_a_busy_rule() {
    let dir = tempfile::tempdir().unwrap();
    let rules = format!("{BARRIER}\n[[rule]]\nname = \"door\"\n[rule.when]\ndevice = \"door-cam\"\n[rule.then]\nactuator = \"porch_light\"\npayload = {{ state = \"ON\", id = \"{{{{ id }}}}\" }}\n");
    let hub = start(dir.path(), &rules, |c| {
        c.rules_engine.history = Some(dir.path().join("history"));
        c.rules_engine.history_max_per_rule = 3;
    })
    .await;
    let mut rx = commands(hub.mqtt_addr()).await;
    let agent = publisher(hub.mqtt_addr()).await;
    for i in 0..6 {
        publish(
            &agent,
            "hearth/door-cam/event/detection",
            &event("person", 0.9, &format!("e-{i}"), "new"),
        )
        .await;
    }
    assert_eq!(until_barrier(&agent, &mut rx).await.len(), 6);
    // The history is written behind the commands: wait (bounded) for the newest door firing
    // and the barrier's.
    let t0 = Instant::now();
    let door = loop {
        let door = hub.rules_history(Some("door"), 100);
        let newest = door
            .first()
            .is_some_and(|f| f.commands[0].payload.contains("\"e-5\""));
        if newest && !hub.rules_history(Some("barrier"), 1).is_empty() {
            break door;
        }
        assert!(t0.elapsed() < WAIT, "history not written: {door:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ids: Vec<&str> = ["e-5", "e-4", "e-3"].to_vec();
    assert_eq!(door.len(), 3, "the busy rule is capped: {door:?}");
    for (f, id) in door.iter().zip(ids) {
        assert!(f.commands[0].payload.contains(id), "newest first: {door:?}");
    }
    assert_eq!(hub.rules_history(Some("barrier"), 100).len(), 1);
    hub.shutdown().await;
}
