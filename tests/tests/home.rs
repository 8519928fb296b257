//! End to end over loopback with the real parts: coordinator (gRPC on port 0, sled in a temp
//! dir), hub (embedded rumqttd broker on a free port, rules file), the porch-light actuator and
//! three doorbell-camera agents on non-IID shares of the real faces data.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hearth_demo::{default_data_dir, AgentGroup, Home, HomeOptions, PORCH_LIGHT};
use hearth_hub::Role;
use hearth_proto::mqtt::{Event, MAX_EVENT_BYTES};
use hearth_tests::{eventually, longest_number_run, Observer};

fn faces_home(dir: &std::path::Path) -> HomeOptions {
    let mut o = HomeOptions::demo(default_data_dir(), dir.to_path_buf());
    o.groups = vec![AgentGroup {
        prefix: "door-cam".into(),
        task: "faces".into(),
        count: 3,
    }];
    o.replay_rate_hz = 50.0;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_reaches_actuator_and_federated_round_improves_model() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::start(&faces_home(dir.path()))
        .await
        .expect("home starts");
    let observer = Observer::start(
        &home.client_url("test-observer", Role::Admin).unwrap(),
        "test-observer",
    )
    .await;

    // Federated round, requested over MQTT like a user would.
    let v1 = home.versions("faces").await.unwrap();
    assert_eq!(v1.len(), 1, "one initial version");
    let s = home
        .refresh_over_mqtt("faces", Duration::from_secs(120))
        .await
        .expect("round completes");
    assert_eq!(s.updates, 3, "all three agents contributed");
    assert_eq!(s.new_version, 2);
    // Int8 deltas: at most ~1/4 of dense fp32 plus per-tensor headers.
    assert!(
        s.uplink_bytes * 3 < s.model_fp32_bytes * u64::from(s.updates),
        "uplink {} vs fp32 {}",
        s.uplink_bytes,
        s.model_fp32_bytes * u64::from(s.updates)
    );
    let versions = home.versions("faces").await.unwrap();
    let (a1, a2) = (versions[0].eval_accuracy, versions[1].eval_accuracy);
    // Held-out set: 50 images, 25 faces. The initial model is untrained (≈ chance, 0.5); the
    // same MLP trained centrally reaches 0.98. One FedAvg round of 3 local epochs on three
    // label-skewed shares must at least beat 0.8 (10 of 50 errors) and not lose to v1.
    assert!(a2 >= 0.8, "v2 held-out accuracy {a2} (v1 {a1})");
    assert!(a2 >= a1, "v2 {a2} worse than v1 {a1}");
    // Every agent hot-swapped to v2 without restarting, and kept publishing.
    for (d, _, a) in &home.agents {
        assert_eq!(a.stats().model_version.load(Ordering::Relaxed), 2, "{d}");
        assert_eq!(a.stats().rounds_joined.load(Ordering::Relaxed), 1, "{d}");
    }

    // Control path: a camera sees a face → event → rule → porch light ON (retained state).
    let light = home.light.stats();
    assert!(
        eventually(Duration::from_secs(30), || light
            .commands_applied
            .load(Ordering::Relaxed)
            > 0)
        .await,
        "no command reached the porch light: {:?}",
        home.traffic()
    );
    assert_eq!(light.state(), "ON");
    let seen = observer.snapshot();
    assert!(seen
        .iter()
        .any(|m| m.topic == format!("zigbee2mqtt/{PORCH_LIGHT}/set")));
    assert!(seen
        .iter()
        .any(|m| m.topic == format!("zigbee2mqtt/{PORCH_LIGHT}")
            && m.payload == br#"{"state":"ON"}"#));

    // Privacy: everything on event topics is a schema-valid verdict under the size limit, and
    // no message anywhere on the broker carries a series of numbers (a sample).
    let events: Vec<_> = seen
        .iter()
        // Hearth's event topics (Home Assistant's `homeassistant/event/…` configs are not events).
        .filter(|m| m.topic.starts_with("hearth/") && m.topic.contains("/event/"))
        .collect();
    assert!(events.len() > 10, "saw only {} events", events.len());
    for m in &events {
        assert!(m.payload.len() <= MAX_EVENT_BYTES, "{}", m.topic);
        let e = Event::parse(&m.payload).unwrap_or_else(|e| panic!("{}: {e}", m.topic));
        assert!(e.model.starts_with("faces@"), "{e:?}");
    }
    for m in &seen {
        assert!(
            longest_number_run(&m.payload) < 8,
            "{} carries a run of numbers: {}",
            m.topic,
            String::from_utf8_lossy(&m.payload)
        );
    }

    // The summary's counters, taken once the control path drained: the agents stop, and every
    // event they published reached the hub and every command the hub sent was applied.
    let mut home = home;
    let t = home
        .drain_control_path(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(home.agents.is_empty());
    assert!(t.commands_published > 0, "{t:?}");
    assert_eq!((t.events_lost(), t.commands_lost()), (0, 0), "{t:?}");
    assert_eq!(t, home.traffic(), "the counters are final");
    home.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_drops_raw_payloads_on_event_topics() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = faces_home(dir.path());
    opts.groups[0].count = 1;
    let home = Home::start(&opts).await.expect("home starts");
    let metrics = home.hub.metrics();

    // A client without credentials, or with a made-up password, does not even get a session
    // on the hub's broker: it cannot publish as any device.
    let anonymous = Observer::connect(&home.hub.mqtt_url(), "rogue-anonymous").await;
    assert!(anonymous.is_err(), "a client without credentials connected");
    let mut url = hearth_edge::MqttUrl::parse(&home.hub.mqtt_url()).unwrap();
    url.username = Some("door-cam-1".into());
    url.password = Some("guessed".into());
    let guessed = Observer::connect(&url.to_url_with_password(), "rogue-guess").await;
    assert!(
        guessed.is_err(),
        "a client with a guessed password connected"
    );

    // A provisioned device that tries to ship its samples on a topic the person rule listens
    // to: an extra field carrying the image, a small extra field, and a payload that is not
    // JSON. Its login gets it onto the broker; the privacy guard still drops every one.
    let rogue = "door-cam-9";
    let observer = Observer::start(&home.client_url(rogue, Role::Device).unwrap(), rogue).await;
    let dropped_before = metrics.events_dropped_total();
    let topic = format!("hearth/{rogue}/event/detection");
    let pixels: Vec<String> = (0..625)
        .map(|i| format!("{:.3}", i as f32 / 625.0))
        .collect();
    let with_pixels = format!(
        r#"{{"class":"person","score":0.99,"model":"faces@1","ts":"2026-11-24T00:00:00Z","pixels":[{}]}}"#,
        pixels.join(",")
    );
    let extra_small = r#"{"class":"person","score":0.99,"model":"faces@1","ts":"2026-11-24T00:00:00Z","x":[1,2]}"#;
    for p in [
        with_pixels.as_bytes(),
        extra_small.as_bytes(),
        b"not json".as_slice(),
    ] {
        observer.publish(&topic, p.to_vec()).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || metrics.events_dropped_total()
            >= dropped_before + 3)
        .await,
        "hub did not drop the three invalid payloads: {}",
        home.hub.render_metrics()
    );
    // Not one of them counted as a valid event from that device, so none could fire a rule.
    let info = home.hub.registry().get(rogue);
    assert!(info.as_ref().is_none_or(|d| d.events == 0), "{info:?}");
    // A valid verdict on the same topic does count: the guard is not simply closed.
    let valid = br#"{"class":"none","score":0.99,"model":"faces@1","ts":"2026-11-24T00:00:00Z"}"#;
    observer.publish(&topic, valid.to_vec()).await;
    let reg = home.hub.registry();
    assert!(
        eventually(Duration::from_secs(10), || reg
            .get(rogue)
            .is_some_and(|d| d.events == 1))
        .await
    );
    assert!(home
        .hub
        .render_metrics()
        .contains("hearth_hub_events_dropped"));
    home.shutdown().await.unwrap();
}
