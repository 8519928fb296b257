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
