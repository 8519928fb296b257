//! The device registry over a real broker (the hub's embedded rumqttd on loopback): fed by
//! agents' retained `meta`/`availability` and events, by Zigbee2MQTT's `bridge/state`,
//! `bridge/devices` (removal included) and device topics (JSON state, JSON and plain
//! availability), kept across a hub restart in its state directory (sled), and listed by
//! `hearth-hub devices` — from the database when the hub is stopped, from the running hub
//! (which holds the database) otherwise; `devices remove` both ways. Also the hub reads an
//! actuator's state with Zigbee2MQTT's `/get` when it comes online, and Hearth's virtual
//! switch answers it. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hearth_agent::actuator::{start_actuator, ActuatorConfig};
use hearth_hub::{Availability, BrokerConfig, Config, HubHandle, Role, Source};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, QoS};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-hub");
const WAIT: Duration = Duration::from_secs(15);

const BRIDGE_DEVICES: &str = r#"[
  {"ieee_address":"0x00124b0001","type":"Coordinator","friendly_name":"Coordinator","definition":null},
  {"ieee_address":"0x000b57fffec6a5b2","type":"Router","friendly_name":"living_lamp",
   "software_build_id":"2.3.050","definition":{"model":"LED1545G12","vendor":"IKEA","exposes":[]}},
  {"ieee_address":"0x0017880104e45517","type":"EndDevice","friendly_name":"hall_motion",
   "definition":{"model":"9290012607","vendor":"Philips","exposes":[]}}
]"#;

fn config(dir: &Path) -> Config {
    let mut cfg = Config {
        client_id: "registry-hub".into(),
        broker: BrokerConfig::embedded("127.0.0.1:0".parse().unwrap()),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        state_dir: Some(dir.join("state")),
        rules: Some(dir.join("rules.toml")),
        ..Config::default()
    };
    cfg.mqtt_auth.dir = dir.join("mqtt");
    cfg
}

async fn start(cfg: Config) -> HubHandle {
    tokio::time::timeout(WAIT, hearth_hub::start(cfg))
        .await
        .expect("hub starts in time")
        .expect("hub starts")
}

async fn client(addr: SocketAddr, user: &str, pw: &str) -> AsyncClient {
    let mut o = MqttOptions::new(format!("{user}-client"), addr.ip().to_string(), addr.port());
    o.set_credentials(user, pw);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut el) = AsyncClient::new(o, 64);
    tokio::spawn(async move {
        loop {
            if let Err(_) | Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) = el.poll().await
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    c
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("HEARTH_HUB_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_follows_agents_and_zigbee2mqtt_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), common::RULES).unwrap();
    let cfg = config(dir.path());
    let hub = start(cfg.clone()).await;
    let addr = hub.mqtt_addr();
    let z2m = hub.provision("z2m", Role::Admin).unwrap();
    let cam = hub.provision("door-cam", Role::Device).unwrap();
    let lamp_login = hub.provision("porch_light", Role::Actuator).unwrap();
    let z = client(addr, &z2m.user, &z2m.password).await;
    let a = client(addr, &cam.user, &cam.password).await;
    let pb = |c: &AsyncClient, t: &str, retain: bool, body: &str| {
        let (c, t, body) = (c.clone(), t.to_string(), body.to_string());
        async move { c.publish(t, QoS::AtLeastOnce, retain, body).await.unwrap() }
    };

    // Zigbee2MQTT: bridge state and devices, a device's state and JSON availability, and
    // another's plain availability.
    pb(
        &z,
        "zigbee2mqtt/bridge/state",
        true,
        r#"{"state":"online"}"#,
    )
    .await;
    pb(&z, "zigbee2mqtt/bridge/devices", true, BRIDGE_DEVICES).await;
    pb(
        &z,
        "zigbee2mqtt/living_lamp",
        true,
        r#"{"brightness":200,"state":"ON"}"#,
    )
    .await;
    pb(
        &z,
        "zigbee2mqtt/living_lamp/availability",
        true,
        r#"{"state":"online"}"#,
    )
    .await;
    pb(&z, "zigbee2mqtt/hall_motion/availability", true, "offline").await;
    // An agent: retained meta and availability, one event.
    let meta = r#"{"device":"door-cam","kind":"agent","model":"faces@3","classes":["none","person"],"events":["detection"],"sw_version":"0.1.0"}"#;
    pb(&a, "hearth/door-cam/meta", true, meta).await;
    pb(&a, "hearth/door-cam/availability", true, "online").await;
    pb(
        &a,
        "hearth/door-cam/event/detection",
        false,
        r#"{"class":"person","score":0.93,"model":"faces@3","ts":"2026-11-30T19:00:03Z"}"#,
    )
    .await;
    let reg = hub.registry();
    wait_for("the registry to fill", || {
        reg.get("door-cam").is_some_and(|d| d.events == 1)
            && reg
                .get_from(Source::Zigbee2mqtt, "living_lamp")
                .is_some_and(|d| d.availability == Availability::Online && d.events == 1)
            && reg
                .get_from(Source::Zigbee2mqtt, "hall_motion")
                .is_some_and(|d| d.availability == Availability::Offline)
            && reg.bridge() == Availability::Online
    })
    .await;
    let lamp = reg.get_from(Source::Zigbee2mqtt, "living_lamp").unwrap();
    assert_eq!(
        (
            lamp.kind.as_str(),
            lamp.vendor.as_str(),
            lamp.model.as_str()
        ),
        ("Router", "IKEA", "LED1545G12")
    );
    assert!(reg.get_from(Source::Zigbee2mqtt, "Coordinator").is_none());

    // Hearth's virtual switch, named by the rules: when it comes online the hub asks its
    // state on `/get` (as Zigbee2MQTT documents) and it answers.
    let porch = start_actuator(ActuatorConfig::new(
        "porch_light",
        &format!("mqtt://{}:{}@{addr}", lamp_login.user, lamp_login.password),
    ))
    .await
    .unwrap();
    let porch_stats = porch.stats();
    wait_for("the hub's state read", || {
        porch_stats.state_reads.load(Ordering::SeqCst) >= 1
    })
    .await;
    wait_for("the switch in the registry", || {
        reg.get_from(Source::Zigbee2mqtt, "porch_light")
            .is_some_and(|d| d.availability == Availability::Online)
    })
    .await;
    porch.shutdown().await.unwrap();

    // The running hub holds the database: the CLI asks it over its status endpoint.
    let hub_toml = dir.path().join("hub.toml");
    let metrics = hub.metrics_addr().unwrap();
    std::fs::write(
        &hub_toml,
        format!(
            "metrics_listen = \"{metrics}\"\nstate_dir = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let cfg_arg = hub_toml.to_str().unwrap();
    let (ok, out, err) = cli(&["--config", cfg_arg, "devices"]);
    assert!(ok, "{err}");
    for want in [
        "door-cam",
        "faces@3",
        "living_lamp",
        "IKEA LED1545G12",
        "hall_motion",
        "offline",
        "detection: person 0.93",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    println!("{out}");

    // A Zigbee2MQTT device leaves the network: the next device list lacks it.
    let without_motion: Vec<serde_json::Value> =
        serde_json::from_str::<Vec<serde_json::Value>>(BRIDGE_DEVICES)
            .unwrap()
            .into_iter()
            .filter(|d| d["friendly_name"] != "hall_motion")
            .collect();
    pb(
        &z,
        "zigbee2mqtt/bridge/devices",
        true,
        &serde_json::to_string(&without_motion).unwrap(),
    )
    .await;
    wait_for("the removal", || {
        reg.get_from(Source::Zigbee2mqtt, "hall_motion").is_none()
    })
    .await;
    // Removal through the running hub.
    let (ok, out, err) = cli(&[
        "--config",
        cfg_arg,
        "devices",
        "remove",
        "zigbee2mqtt/porch_light",
    ]);
    assert!(
        ok && out.contains("removed zigbee2mqtt/porch_light"),
        "{out}{err}"
    );
    let (ok, _, err) = cli(&["--config", cfg_arg, "devices", "remove", "nothing-here"]);
    assert!(!ok && err.contains("no device"), "{err}");
    drop(reg);
    hub.shutdown().await;

    // A new hub on the same state directory, with a fresh broker that holds no retained
    // message: everything is still known.
    let hub = start(cfg.clone()).await;
    let reg = hub.registry();
    let cam = reg.get("door-cam").expect("the agent survived the restart");
    assert_eq!(
        (
            cam.kind.as_str(),
            cam.model.as_str(),
            cam.events,
            cam.availability
        ),
        ("agent", "faces@3", 1, Availability::Online)
    );
    assert_eq!(cam.last_event.as_deref(), Some("detection: person 0.93"));
    let lamp = reg.get_from(Source::Zigbee2mqtt, "living_lamp").unwrap();
    assert_eq!(
        lamp.last_event.as_deref(),
        Some(r#"{"brightness":200,"state":"ON"}"#)
    );
    assert_eq!(reg.bridge(), Availability::Online);
    assert!(reg.get_from(Source::Zigbee2mqtt, "hall_motion").is_none());
    assert!(reg.get_from(Source::Zigbee2mqtt, "porch_light").is_none());
    drop(reg);
    hub.shutdown().await;

    // Stopped: the CLI reads the database itself (table and JSON) and removes from it.
    let state = dir.path().join("state");
    let (ok, out, err) = cli(&["devices", "--state-dir", state.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let list: Vec<hearth_hub::DeviceInfo> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2, "{out}");
    let (ok, out, err) = cli(&[
        "devices",
        "--state-dir",
        state.to_str().unwrap(),
        "remove",
        "door-cam",
    ]);
    assert!(ok && out.contains("removed hearth/door-cam"), "{out}{err}");
    let (ok, out, _) = cli(&["devices", "--state-dir", state.to_str().unwrap()]);
    assert!(
        ok && !out.contains("door-cam") && out.contains("living_lamp"),
        "{out}"
    );
}
