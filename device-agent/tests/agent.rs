//! The agent over real MQTT (embedded rumqttd on loopback) on the real vendored
//! data: schema-valid events only, retained meta and availability, clean exit.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{data_dir, start_broker, Sub};
use hearth_agent::state::{sha256_hex, ModelMeta, StateDir};
use hearth_agent::{Config, Partition};
use hearth_model::{train, OnnxModel, Task, TrainConfig};
use hearth_proto::mqtt::{DeviceMeta, Event, MAX_EVENT_BYTES};

const WAIT: Duration = Duration::from_secs(30);

fn config(device: &str, task: &str, port: u16, state: &std::path::Path, limit: u64) -> Config {
    Config {
        device: device.into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        task: task.into(),
        data_dir: data_dir(),
        partition: Partition {
            index: 1,
            count: 3,
            alpha: 0.5,
            seed: 7,
        },
        replay_rate_hz: 500.0,
        replay_limit: Some(limit),
        min_event_score: 0.0,
        state_dir: state.to_path_buf(),
        bootstrap_epochs: 3,
        ..Config::default()
    }
}

/// The longest run of numbers in a payload (a leaked sample would be a long one).
fn longest_number_run(s: &str) -> usize {
    let mut best = 0;
    let mut run = 0;
    for tok in s.split([',', '[', ']', '{', '}', ':', ' ']) {
        if !tok.is_empty() && tok.trim_matches('"').parse::<f64>().is_ok() {
            run += 1;
            best = best.max(run);
        } else if !tok.is_empty() {
            run = 0;
        }
    }
    best
}

async fn collect_events(sub: &mut Sub, topic: &str, n: usize) -> Vec<(Event, usize, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = sub
            .wait_for(WAIT, |m| m.topic.contains("/event/"))
            .await
            .unwrap_or_else(|| panic!("only {} of {n} events arrived", out.len()));
        assert_eq!(m.topic, topic, "event on an unexpected topic");
        let ev = Event::parse(&m.payload).expect("schema-valid event");
        out.push((ev, m.payload.len(), m.text()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faces_agent_publishes_valid_events_meta_and_availability() {
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    let mut sub = Sub::connect(port, "watcher", &["hearth/door-cam/#"]).await;

    let limit = 40;
    let agent = hearth_agent::start(config("door-cam", "faces", port, state.path(), limit))
        .await
        .expect("agent starts");
    assert_eq!(agent.model_tag(), "faces@0");
    assert_eq!(
        agent.classes(),
        vec!["none".to_string(), "person".to_string()]
    );
    assert!(agent.local_samples() > 0 && agent.local_samples() < 150);

    let events = collect_events(&mut sub, "hearth/door-cam/event/detection", limit as usize).await;
    for (ev, len, text) in &events {
        assert!(*len <= MAX_EVENT_BYTES, "event of {len} bytes");
        assert!(longest_number_run(text) <= 2, "numbers in {text}");
        assert!(!text.contains('['), "list in {text}");
        assert!(ev.class == "none" || ev.class == "person");
        assert!(
            (0.5..=1.0).contains(&ev.score),
            "argmax of two classes: {}",
            ev.score
        );
        assert_eq!(ev.model, "faces@0");
        humantime::parse_rfc3339(&ev.ts).expect("RFC 3339 timestamp");
    }
    tokio::time::timeout(WAIT, agent.replay_finished())
        .await
        .expect("replay ends at the limit");
    let stats = agent.stats().snapshot();
    assert_eq!(stats.samples_replayed, limit);
    assert_eq!(stats.events_published, limit);
    assert_eq!(stats.inference_errors, 0);
    assert!(stats.mqtt_connects >= 1);
    // No more than `limit` events: the replay really stops.
    assert!(sub
        .wait_for(Duration::from_millis(300), |m| m.topic.contains("/event/"))
        .await
        .is_none());

    // A late subscriber gets the retained meta and `online`.
    let mut late = Sub::connect(
        port,
        "late",
        &["hearth/door-cam/meta", "hearth/door-cam/availability"],
    )
    .await;
    let meta = late
        .wait_for(WAIT, |m| m.topic == "hearth/door-cam/meta")
        .await
        .expect("retained meta");
    assert!(meta.retain);
    let meta: DeviceMeta = serde_json::from_slice(&meta.payload).unwrap();
    assert_eq!(meta.device, "door-cam");
    assert_eq!(meta.kind, "agent");
    assert_eq!(meta.model, "faces@0");
    assert_eq!(meta.classes, vec!["none", "person"]);
    let avail = late
        .wait_for(WAIT, |m| m.topic == "hearth/door-cam/availability")
        .await
        .expect("retained availability");
    assert!(avail.retain);
    assert_eq!(avail.text(), "online");
    drop(late);

    agent.shutdown().await.expect("clean shutdown");
    let mut after = Sub::connect(port, "after", &["hearth/door-cam/availability"]).await;
    let avail = after.next(WAIT).await.expect("retained availability");
    assert_eq!(avail.text(), "offline");
    assert!(avail.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaid_agent_runs_the_stored_global_model() {
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    let cfg = Config {
        min_event_score: 0.4,
        ..config("kitchen-plug", "plaid", port, state.path(), 25)
    };

    // A global model version 5 persisted by an earlier run of this device.
    let data = Task::Plaid
        .load(&cfg.data_dir, hearth_model::Split::Train)
        .unwrap();
    let mut model = OnnxModel::build_mlp(&Task::Plaid.default_spec(), 3);
    let (w, _) = train(
        &model,
        &data,
        &TrainConfig {
            epochs: 2,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    model.set_weights(&w).unwrap();
    let bytes = model.to_bytes();
    StateDir::open(state.path())
        .unwrap()
        .save_model(
            &ModelMeta {
                model: "plaid".into(),
                version: 5,
                sha256: sha256_hex(&bytes),
                size_bytes: bytes.len() as u64,
                ..ModelMeta::default()
            },
            &bytes,
        )
        .unwrap();

    let mut sub = Sub::connect(port, "watcher2", &["hearth/kitchen-plug/#"]).await;
    let agent = hearth_agent::start(cfg).await.expect("agent starts");
    assert_eq!(agent.model_tag(), "plaid@5");
    assert_eq!(agent.stats().model_version.load(Ordering::Relaxed), 5);
    tokio::time::timeout(WAIT, agent.replay_finished())
        .await
        .unwrap();
    let stats = agent.stats().snapshot();
    assert_eq!(stats.samples_replayed, 25);
    assert_eq!(stats.events_published + stats.events_suppressed, 25);
    let n = stats.events_published as usize;
    let events = collect_events(&mut sub, "hearth/kitchen-plug/event/appliance", n).await;
    let classes = Task::Plaid.classes();
    for (ev, len, text) in &events {
        assert!(
            ev.score >= 0.4,
            "verdict below min_event_score: {}",
            ev.score
        );
        assert!(*len <= MAX_EVENT_BYTES);
        assert!(longest_number_run(text) <= 2, "numbers in {text}");
        assert_eq!(ev.model, "plaid@5");
        assert!(classes.contains(&ev.class), "unknown class {}", ev.class);
    }
    agent.shutdown().await.unwrap();
}

/// A data set Hearth does not convert, by its task file alone: BasicMotions (6 IMU channels,
/// sktime's `.ts` files as they are). The model is named after the task, the events after the
/// task file's `event`, the classes come from the file, and no reading leaves the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_a_task_given_by_its_task_file() {
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    let mut sub = Sub::connect(port, "watcher", &["hearth/wrist/#"]).await;
    let task = data_dir().join("basicmotions/task.toml");
    let limit = 12;
    let agent = hearth_agent::start(config(
        "wrist",
        task.to_str().unwrap(),
        port,
        state.path(),
        limit,
    ))
    .await
    .expect("agent starts");
    assert_eq!(agent.model_tag(), "basicmotions@0");
    let classes = ["standing", "running", "walking", "badminton"];
    assert_eq!(agent.classes(), classes);
    let events = collect_events(&mut sub, "hearth/wrist/event/activity", limit as usize).await;
    for (ev, len, text) in &events {
        assert!(*len <= MAX_EVENT_BYTES);
        assert!(longest_number_run(text) <= 2, "numbers in {text}");
        assert!(classes.contains(&ev.class.as_str()), "{}", ev.class);
        assert_eq!(ev.model, "basicmotions@0");
    }
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_before_anything_starts() {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config("bad/name", "faces", 1883, state.path(), 1);
    assert!(matches!(
        hearth_agent::start(cfg.clone()).await,
        Err(hearth_agent::Error::Config(_))
    ));
    cfg.device = "ok".into();
    // A task file with a bad field: refused as configuration, naming the file and the field.
    let bad = state.path().join("task.toml");
    let text = std::fs::read_to_string(data_dir().join("gunpoint/task.toml")).unwrap();
    std::fs::write(
        &bad,
        text.replace("hidden = [32]", "hidden = []\nwidth = 3"),
    )
    .unwrap();
    cfg.task = bad.to_str().unwrap().into();
    match hearth_agent::start(cfg.clone()).await {
        Err(hearth_agent::Error::Config(e)) => {
            assert!(e.contains("task.toml") && e.contains("width"), "{e}")
        }
        other => panic!("accepted a bad task file: {:?}", other.err()),
    }
    cfg.task = "faces".into();
    cfg.data_dir = state.path().join("no-such-dir");
    assert!(hearth_agent::start(cfg).await.is_err());
}

/// Adoption (`Loaded::adopt`, `TaskSpec::with_model`): a PLAID model runs with the MiniRocket
/// front end it carries; one carrying a front end that does not fit the task file (another
/// task's) is refused at start, naming the task file, rather than run on wrong features.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_front_end_does_not_fit_is_refused() {
    let port = start_broker();
    let dir = tempfile::tempdir().unwrap();
    let task = hearth_model::TaskSpec::resolve("plaid", &data_dir()).unwrap();
    let other = hearth_model::TaskSpec::resolve(
        &data_dir()
            .join("gunpoint/minirocket.toml")
            .display()
            .to_string(),
        &data_dir(),
    )
    .unwrap();
    let mut foreign = OnnxModel::build_mlp(&task.mlp_spec(), 1);
    other.stamp(&mut foreign).unwrap();
    let path = dir.path().join("foreign.onnx");
    std::fs::write(&path, foreign.to_bytes()).unwrap();
    let cfg = Config {
        initial_model: Some(path),
        ..config("plug-x", "plaid", port, &dir.path().join("state"), 1)
    };
    let e = hearth_agent::start(cfg)
        .await
        .expect_err("refused")
        .to_string();
    assert!(e.contains("does not fit the task file"), "{e}");
    // Stamped with the task's own front end, the same weights are adopted.
    let stamped = task.build_model(1).unwrap();
    let path = dir.path().join("stamped.onnx");
    std::fs::write(&path, stamped.to_bytes()).unwrap();
    let cfg = Config {
        initial_model: Some(path),
        ..config("plug-y", "plaid", port, &dir.path().join("state2"), 1)
    };
    let agent = hearth_agent::start(cfg).await.expect("adopted");
    agent.shutdown().await.unwrap();
}
