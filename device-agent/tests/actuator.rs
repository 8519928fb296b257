//! The virtual switch over real MQTT (embedded rumqttd on loopback).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{start_broker, Sub};
use hearth_agent::actuator::{start_actuator, ActuatorConfig};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_follows_commands_and_refuses_garbage() {
    let port = start_broker();
    let mut sub = Sub::connect(
        port,
        "observer",
        &[
            "zigbee2mqtt/lamp",
            "zigbee2mqtt/lamp/availability",
            "homeassistant/switch/hearth/lamp/config",
        ],
    )
    .await;
    let lamp = start_actuator(ActuatorConfig::new(
        "lamp",
        &format!("mqtt://127.0.0.1:{port}"),
    ))
    .await
    .unwrap();
    let stats = lamp.stats();

    let disc = sub
        .wait_for(WAIT, |m| {
            m.topic == "homeassistant/switch/hearth/lamp/config"
        })
        .await
        .expect("discovery config");
    let d: serde_json::Value = serde_json::from_slice(&disc.payload).unwrap();
    assert_eq!(d["command_topic"], "zigbee2mqtt/lamp/set");
    assert_eq!(d["state_topic"], "zigbee2mqtt/lamp");
    assert_eq!(d["value_template"], "{{ value_json.state }}");
    assert_eq!(d["payload_on"], r#"{"state":"ON"}"#);
    assert_eq!(
        d["availability"][0]["topic"],
        "zigbee2mqtt/lamp/availability"
    );
    assert_eq!(d["device"]["identifiers"][0], "hearth_lamp");
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/lamp/availability" && m.text() == "online"
    })
    .await
    .expect("online");
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/lamp" && m.text() == r#"{"state":"OFF"}"#
    })
    .await
    .expect("initial state");

    let client = sub.client.clone();
    let set = |body: &'static str| {
        let c = client.clone();
        async move {
            c.publish("zigbee2mqtt/lamp/set", QoS::AtLeastOnce, false, body)
                .await
                .unwrap()
        }
    };
    set(r#"{"state":"ON"}"#).await;
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/lamp" && m.text() == r#"{"state":"ON"}"#
    })
    .await
    .expect("ON state");
    assert_eq!(stats.state(), "ON");

    set(r#"{"state":"TOGGLE"}"#).await;
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/lamp" && m.text() == r#"{"state":"OFF"}"#
    })
    .await
    .expect("TOGGLE flips to OFF");
    set(r#"{"state":"TOGGLE"}"#).await;
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/lamp" && m.text() == r#"{"state":"ON"}"#
    })
    .await
    .expect("TOGGLE flips back to ON");

    set("garbage").await;
    set(r#"{"state":"DIM"}"#).await;
    set(r#"{"state":"OFF","raw":[1,2,3]}"#).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while stats.commands_refused.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusals not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refused commands change nothing.
    assert_eq!(stats.state(), "ON");
    assert_eq!(stats.commands_received.load(Ordering::SeqCst), 6);
    assert_eq!(stats.commands_applied.load(Ordering::SeqCst), 3);
    assert_eq!(stats.commands_refused.load(Ordering::SeqCst), 3);
    assert!(sub
        .wait_for(Duration::from_millis(300), |m| m.topic
            == "zigbee2mqtt/lamp")
        .await
        .is_none());

    // The retained state is what a newcomer sees.
    let mut late = Sub::connect(port, "late", &["zigbee2mqtt/lamp"]).await;
    let m = late.next(WAIT).await.expect("retained state");
    assert!(m.retain);
    assert_eq!(m.text(), r#"{"state":"ON"}"#);

    // Home Assistant restarting asks for a new announcement.
    assert_eq!(stats.discovery_announcements.load(Ordering::SeqCst), 1);
    sub.client
        .publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
        .await
        .unwrap();
    sub.wait_for(WAIT, |m| {
        m.topic == "homeassistant/switch/hearth/lamp/config"
    })
    .await
    .expect("re-announced");
    assert_eq!(stats.discovery_announcements.load(Ordering::SeqCst), 2);

    lamp.shutdown().await.unwrap();
    let mut after = Sub::connect(port, "after", &["zigbee2mqtt/lamp/availability"]).await;
    let m = after.next(WAIT).await.expect("retained availability");
    assert_eq!(m.text(), "offline");
}

/// A virtual light takes what a Zigbee2MQTT light takes, publishes its state the way
/// Zigbee2MQTT does, answers `/get`, honours a configured discovery prefix (its birth topic
/// too), and comes back in its retained state after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_speaks_zigbee2mqtt_and_restores_its_retained_state() {
    let port = start_broker();
    let mut sub = Sub::connect(port, "light-observer", &["zigbee2mqtt/desk", "ha/#"]).await;
    let cfg = ActuatorConfig {
        kind: hearth_agent::actuator::DeviceKind::Light,
        discovery_prefix: "ha".into(),
        ..ActuatorConfig::new("desk", &format!("mqtt://127.0.0.1:{port}"))
    };
    let light = start_actuator(cfg.clone()).await.unwrap();
    let disc = sub
        .wait_for(WAIT, |m| m.topic == "ha/light/hearth/desk/config")
        .await
        .expect("light discovery on the configured prefix");
    let d: serde_json::Value = serde_json::from_slice(&disc.payload).unwrap();
    assert_eq!(d["schema"], "json");
    assert_eq!(
        d["supported_color_modes"],
        serde_json::json!(["color_temp"])
    );
    let client = sub.client.clone();
    let set = |body: &'static str| {
        let c = client.clone();
        async move {
            c.publish("zigbee2mqtt/desk/set", QoS::AtLeastOnce, false, body)
                .await
                .unwrap()
        }
    };
    set(r#"{"state":"ON","brightness":77,"color_temp":"warm","transition":2}"#).await;
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/desk"
            && m.text()
                == r#"{"brightness":77,"color_mode":"color_temp","color_temp":454,"state":"ON"}"#
    })
    .await
    .expect("Zigbee2MQTT's light state");
    set(r#"{"brightness":0}"#).await;
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/desk" && m.text().contains(r#""state":"OFF""#)
    })
    .await
    .expect("brightness 0 switches off");
    set(r#"{"brightness":120}"#).await;
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/desk"
            && m.text().contains(r#""brightness":120"#)
            && m.text().contains(r#""state":"ON""#)
    })
    .await
    .expect("a brightness switches on");
    // `/get` publishes the state again.
    let stats = light.stats();
    sub.client
        .publish(
            "zigbee2mqtt/desk/get",
            QoS::AtLeastOnce,
            false,
            r#"{"state":""}"#,
        )
        .await
        .unwrap();
    sub.wait_for(WAIT, |m| m.topic == "zigbee2mqtt/desk")
        .await
        .expect("state read");
    assert_eq!(stats.state_reads.load(Ordering::SeqCst), 1);
    // The birth topic follows the prefix.
    sub.client
        .publish("ha/status", QoS::AtLeastOnce, false, "online")
        .await
        .unwrap();
    sub.wait_for(WAIT, |m| m.topic == "ha/light/hearth/desk/config")
        .await
        .expect("re-announced on ha/status");
    light.shutdown().await.unwrap();

    // Restarted without a state directory: the retained state brings it back as it was.
    let again = start_actuator(cfg).await.unwrap();
    let s = again.stats();
    let deadline = tokio::time::Instant::now() + WAIT;
    while s.discovery_announcements.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no announcement");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.restored.load(Ordering::SeqCst), "state restored");
    let st = s.device_state();
    assert_eq!((st.on, st.brightness, st.color_temp), (true, 120, 454));
    let mut late = Sub::connect(port, "light-late", &["zigbee2mqtt/desk"]).await;
    let m = late.next(WAIT).await.expect("retained state");
    assert_eq!(
        m.text(),
        r#"{"brightness":120,"color_mode":"color_temp","color_temp":454,"state":"ON"}"#,
        "the restarted light announced the state it had, not OFF"
    );
    again.shutdown().await.unwrap();
}

/// The command-id window survives a restart of the actuator *process* (SIGKILL) when it has
/// a state directory: a TOGGLE delivered again with the same id after the restart (the hub
/// re-sends what its broker may have lost) is applied once. `HEARTH_TEST_NO_STATE_DIR=1`
/// runs the actuator without one, to see this test fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_ids_survive_an_actuator_restart() {
    let port = start_broker();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spawn = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-agent"));
        c.args([
            "actuator",
            "--name",
            "fan",
            "--mqtt",
            &format!("mqtt://127.0.0.1:{port}"),
        ]);
        if std::env::var_os("HEARTH_TEST_NO_STATE_DIR").is_none() {
            c.arg("--state-dir").arg(&state);
        }
        Killed(
            c.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut sub = Sub::connect(
        port,
        "fan-observer",
        &["zigbee2mqtt/fan", "zigbee2mqtt/fan/availability"],
    )
    .await;
    let fan = spawn();
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/fan/availability" && m.text() == "online"
    })
    .await
    .expect("the fan is up");
    let toggle = r#"{"state":"TOGGLE","hearth_id":"hub-1a-7"}"#;
    sub.client
        .publish("zigbee2mqtt/fan/set", QoS::AtLeastOnce, false, toggle)
        .await
        .unwrap();
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/fan" && m.text() == r#"{"state":"ON"}"#
    })
    .await
    .expect("toggled on");
    drop(fan); // SIGKILL
    let _fan = spawn();
    // Back, in the state it had (from its journal, or its retained state without one).
    sub.wait_for(WAIT, |m| {
        m.topic == "zigbee2mqtt/fan/availability" && m.text() == "online"
    })
    .await
    .expect("the fan is back");
    tokio::time::sleep(Duration::from_millis(800)).await;
    sub.client
        .publish("zigbee2mqtt/fan/set", QoS::AtLeastOnce, false, toggle)
        .await
        .unwrap();
    // A different command afterwards, as a barrier: its state shows the redelivery was
    // not applied in between.
    sub.client
        .publish(
            "zigbee2mqtt/fan/set",
            QoS::AtLeastOnce,
            false,
            r#"{"state":"ON","hearth_id":"hub-1a-8"}"#,
        )
        .await
        .unwrap();
    let mut states = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Some(m) = sub
        .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if m.topic == "zigbee2mqtt/fan" {
            states.push(m.text());
        }
    }
    assert!(
        states.iter().all(|s| s == r#"{"state":"ON"}"#),
        "the redelivered TOGGLE was applied again after the restart: {states:?}"
    );
}

/// A child process SIGKILLed (by its PID) and reaped when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The broker side of one MQTT 3.1.1 connection, byte for byte, so the test sees exactly
/// when the device acknowledges a command (a real broker hides that).
struct WirePeer {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl WirePeer {
    /// Reads one packet: (first byte, body).
    async fn packet(&mut self) -> (u8, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 2 {
                let (mut len, mut mul, mut i) = (0usize, 1usize, 1);
                let mut complete = false;
                while i < self.buf.len() && i <= 4 {
                    let b = self.buf[i];
                    len += (b & 0x7f) as usize * mul;
                    mul *= 128;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if complete && self.buf.len() >= i + len {
                    let first = self.buf[0];
                    let body = self.buf[i..i + len].to_vec();
                    self.buf.drain(..i + len);
                    return (first, body);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the device closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(bytes).await.unwrap();
    }

    /// Answers what a broker must (CONNACK, SUBACK, PUBACK, PINGRESP, UNSUBACK) and
    /// returns the packets a test looks at: subscribed filters and PUBACKs from the device.
    async fn next(&mut self) -> Wire {
        loop {
            let (first, body) = self.packet().await;
            match first >> 4 {
                1 => self.send(&[0x20, 2, 0, 0]).await,
                8 => {
                    let mut filters = Vec::new();
                    let mut i = 2;
                    while i + 2 <= body.len() {
                        let l = u16::from_be_bytes([body[i], body[i + 1]]) as usize;
                        filters.push(String::from_utf8_lossy(&body[i + 2..i + 2 + l]).into_owned());
                        i += 2 + l + 1;
                    }
                    let mut ack = vec![0x90, 2 + filters.len() as u8, body[0], body[1]];
                    ack.extend(std::iter::repeat_n(1u8, filters.len()));
                    self.send(&ack).await;
                    return Wire::Subscribed(filters);
                }
                10 => self.send(&[0xB0, 2, body[0], body[1]]).await,
                12 => self.send(&[0xD0, 0]).await,
                3 if (first >> 1) & 3 == 1 => {
                    let l = u16::from_be_bytes([body[0], body[1]]) as usize;
                    self.send(&[0x40, 2, body[2 + l], body[3 + l]]).await;
                }
                4 => return Wire::PubAck(u16::from_be_bytes([body[0], body[1]])),
                _ => {}
            }
        }
    }
}

enum Wire {
    Subscribed(Vec<String>),
    PubAck(u16),
}

/// A command is acknowledged only once applied: when its PUBACK reaches the broker, its
/// line is already in the device's journal, so a device killed in between is sent the
/// command again by a broker keeping its session (and applies it once). A burst of commands
/// makes the difference visible: acknowledged on receipt, most PUBACKs would leave before
/// the worker had written their lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_acknowledged_only_after_it_is_applied() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ActuatorConfig {
        state_dir: Some(dir.path().to_path_buf()),
        ..ActuatorConfig::new("lamp", &format!("mqtt://127.0.0.1:{port}"))
    };
    let journal = cfg.journal_path().unwrap();
    let lamp = start_actuator(cfg).await.unwrap();
    let (s, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the device connects")
        .unwrap();
    let mut peer = WirePeer { s, buf: Vec::new() };
    tokio::time::timeout(WAIT, async {
        loop {
            if let Wire::Subscribed(f) = peer.next().await {
                if f.iter().any(|f| f == "zigbee2mqtt/lamp/set") {
                    break;
                }
            }
        }
    })
    .await
    .expect("the device subscribes to its command topic");

    const N: u16 = 200;
    let mut burst = Vec::new();
    for k in 1..=N {
        let topic = b"zigbee2mqtt/lamp/set";
        let state = if k % 2 == 0 { "ON" } else { "OFF" };
        let payload = format!(r#"{{"state":"{state}","hearth_id":"cmd-{k}"}}"#);
        let len = 2 + topic.len() + 2 + payload.len();
        burst.extend_from_slice(&[0x32, len as u8]);
        burst.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        burst.extend_from_slice(topic);
        burst.extend_from_slice(&k.to_be_bytes());
        burst.extend_from_slice(payload.as_bytes());
    }
    peer.send(&burst).await;
    let mut acked = std::collections::HashSet::new();
    tokio::time::timeout(WAIT, async {
        while acked.len() < N as usize {
            if let Wire::PubAck(k) = peer.next().await {
                let lines = std::fs::read_to_string(&journal).unwrap_or_default();
                assert!(
                    lines.contains(&format!("\"cmd-{k}\"")),
                    "command {k} acknowledged before it was applied ({} commands applied so far)",
                    lamp.stats().commands_applied.load(Ordering::Relaxed)
                );
                acked.insert(k);
            }
        }
    })
    .await
    .expect("every command acknowledged");
    assert_eq!(
        lamp.stats().commands_applied.load(Ordering::Relaxed),
        N as u64
    );
}
