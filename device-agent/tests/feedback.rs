//! Labels from the home, end to end over real parts (embedded broker, coordinator over gRPC
//! with TLS): a GunPoint agent owning a small, label-skewed share of the train split reads
//! the other series live from a command source, publishes a verdict with an id for each
//! window, and the home answers `{"event": id, "label": class}` on `hearth/<device>/feedback`.
//! The next federated round trains on the labelled samples too: the coordinator's held-out
//! accuracy of the new version is measurably higher than the same run without feedback, and
//! lower with wrong labels. Malformed feedback, unknown classes and unknown events are
//! counted and change nothing.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{data_dir, start_broker, Sub};
use hearth_agent::samples::SampleStore;
use hearth_agent::source::{CommandSource, SourceConfig, Windowing};
use hearth_agent::{Config, Partition};
use hearth_coordinator::{Config as CoordConfig, ModelConfig, RoundDefaults};
use hearth_proto::mqtt::Event;
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{ListVersionsRequest, StartRoundRequest};
use rumqttc::QoS;

const ADMIN: &str = "admin-secret-token-feedback-0001";
const WAIT: Duration = Duration::from_secs(60);

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    req
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the home answers for each event.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Nothing,
    TrueLabels,
    WrongLabels,
}

/// The GunPoint train series as lines (one value per line) and their class names.
fn series(dir: &Path) -> (std::path::PathBuf, Vec<String>, usize) {
    let task = hearth_model::TaskSpec::resolve("gunpoint", &data_dir()).unwrap();
    let raw =
        hearth_model::formats::ts::read(&data_dir().join("gunpoint/GunPoint_TRAIN.ts")).unwrap();
    let mut text = String::new();
    let mut labels = Vec::new();
    for (s, l) in raw.samples.iter().zip(&raw.labels) {
        for v in &s[0] {
            text += &format!("{v}\n");
        }
        // The archive's labels: 1 = gun_draw, 2 = point (the task file's `labels`).
        labels.push(task.classes[if l == "1" { 0 } else { 1 }].clone());
    }
    let file = dir.join("gunpoint-train.txt");
    std::fs::write(&file, text).unwrap();
    (file, labels, raw.samples.len())
}

/// One home: returns (accuracy of v1, of v2, feedback applied, samples labelled in store).
async fn run(answer: Answer) -> (f32, f32, u64) {
    let port = start_broker();
    let dir = tempfile::tempdir().unwrap();
    let coord_cfg = CoordConfig {
        db_path: dir.path().join("coord.db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec!["token-feedback-0001".into()],
        round: RoundDefaults {
            min_clients: 1,
            max_clients: 1,
            deadline_secs: 60,
            local_epochs: 10,
            ..RoundDefaults::default()
        },
        models: vec![ModelConfig {
            name: "gunpoint".into(),
            task: "gunpoint".into(),
            init: None,
            eval: true,
            seed: 1,
        }],
        ..CoordConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = hearth_coordinator::start(coord_cfg, listener)
        .await
        .expect("coordinator starts");
    let url = coord.endpoint();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, coord.ca_pem().unwrap()).unwrap();

    let (file, labels, n) = series(dir.path());
    let mut events = Sub::connect(port, "home", &["hearth/hand/event/#"]).await;
    let state = dir.path().join("agent");
    let cfg = Config {
        device: "hand".into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        coordinator: Some(url.clone()),
        coordinator_ca_file: Some(ca),
        enrollment_token: Some("token-feedback-0001".into()),
        task: "gunpoint".into(),
        data_dir: data_dir(),
        // A small share, nearly all of one class.
        partition: Partition {
            index: 0,
            count: 5,
            alpha: 0.1,
            seed: 3,
        },
        min_event_score: 0.0,
        state_dir: state.clone(),
        bootstrap_epochs: 0,
        source: SourceConfig::Command(CommandSource {
            program: "cat".into(),
            args: vec![file.display().to_string()],
            restart: false,
            windowing: Windowing::default(),
        }),
        ..Config::default()
    };
    let agent = hearth_agent::start(cfg).await.expect("agent starts");
    let own = agent.local_samples();
    wait_until("global version 1", || {
        agent.stats().model_version.load(Ordering::Relaxed) == 1
    })
    .await;
    tokio::time::timeout(WAIT, agent.replay_finished())
        .await
        .expect("the command's series are classified");
    let stats = agent.stats();
    assert_eq!(stats.snapshot().windows, n as u64);

    // The verdicts, in window order: their ids are what the home answers to.
    let mut ids = Vec::new();
    while ids.len() < n {
        let m = events.next(WAIT).await.expect("an event per window");
        let ev = Event::parse(&m.payload).unwrap();
        ids.push(ev.id.expect("events carry an id"));
    }
    let topic = "hearth/hand/feedback";
    if answer != Answer::Nothing {
        // Refused without effect: not feedback, an unknown class, an event never seen.
        for bad in [
            r#"{"event":"x","label":"point","extra":[1,2,3]}"#.to_string(),
            format!(r#"{{"event":"{}","label":"no-such-class"}}"#, ids[0]),
            r#"{"event":"0000000000000000","label":"point"}"#.to_string(),
        ] {
            events
                .client
                .publish(topic, QoS::AtLeastOnce, false, bad)
                .await
                .unwrap();
        }
        for (id, label) in ids.iter().zip(&labels) {
            let label = match answer {
                Answer::WrongLabels if label == "point" => "gun_draw",
                Answer::WrongLabels => "point",
                _ => label.as_str(),
            };
            let body = format!(r#"{{"event":"{id}","label":"{label}"}}"#);
            events
                .client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
        }
        wait_until("every label applied", || {
            stats.feedback_applied.load(Ordering::Relaxed) == n as u64
                && stats.feedback_refused.load(Ordering::Relaxed) == 3
        })
        .await;
    }

    let ch = hearth_coordinator::client::connect(&url, coord.ca_pem(), None)
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch);
    admin
        .start_round(authed(StartRoundRequest {
            model: "gunpoint".into(),
            reason: "test".into(),
            ..StartRoundRequest::default()
        }))
        .await
        .expect("round starts");
    wait_until("version 2", || {
        agent.stats().model_version.load(Ordering::Relaxed) == 2
    })
    .await;
    let versions = admin
        .list_versions(authed(ListVersionsRequest {
            model: "gunpoint".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .versions;
    let acc = |v: u64| {
        versions
            .iter()
            .find(|m| m.version == v)
            .map(|m| m.eval_accuracy)
            .unwrap()
    };
    let applied = stats.feedback_applied.load(Ordering::Relaxed);
    eprintln!(
        "{answer:?}: {own} own samples, {applied} labelled by feedback; held-out accuracy v1 {:.3} -> v2 {:.3}",
        acc(1),
        acc(2)
    );
    agent.shutdown().await.unwrap();

    // The store kept every window's sample; `wipe` empties it.
    let store = SampleStore::open(&state, hearth_agent::samples::StoreConfig::default()).unwrap();
    assert_eq!(store.len(), n);
    let labelled = store.labelled().unwrap().len() as u64;
    assert_eq!(labelled, applied);
    drop(store);
    assert_eq!(SampleStore::wipe(&state).unwrap(), n);
    coord.shutdown().await.unwrap();
    (acc(1), acc(2), applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_labels_change_the_next_model() {
    let (_, without, _) = run(Answer::Nothing).await;
    let (_, with, applied) = run(Answer::TrueLabels).await;
    let (_, wrong, _) = run(Answer::WrongLabels).await;
    assert_eq!(applied, 50);
    eprintln!("GunPoint v2 held-out accuracy: no feedback {without:.3}, true labels {with:.3}, wrong labels {wrong:.3}");
    assert!(
        with >= without + 0.1,
        "true labels: {with} vs {without} without feedback"
    );
    assert!(wrong < with - 0.1, "wrong labels: {wrong} vs {with}");
}
