//! The hub as its home's aggregator (`[federation.aggregate]`), end to end over real gRPC,
//! TLS and MQTT on 127.0.0.1: an upstream coordinator, a hub whose home aggregator enrols
//! with it, and three real agents on their own shares of the digits set, enrolled with and
//! uploading to the hub. One upstream round: the upstream coordinator receives exactly one
//! update, from the hub's identity, whose sample count is the sum of the agents'; no agent
//! is known upstream; the agents load the version upstream published (they verify the
//! upstream's signature, which the hub re-serves unchanged) and held-out accuracy improves.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hearth_agent::{AgentHandle, Partition};
use hearth_coordinator::store::RoundState as StoredState;
use hearth_hub::{AggregateConfig, BrokerConfig, Config, FederationConfig, RefreshAuth};
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{RoundState, RoundStatusRequest, StartRoundRequest};

const ADMIN: &str = "upstream-admin-token-0123456789";
const HOME_ADMIN: &str = "home-admin-token-0123456789";
const HOME_TOKEN: &str = "home-enrol-token-1";
const LIMIT: Duration = Duration::from_secs(45);

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    req
}

fn version(a: &AgentHandle) -> u64 {
    a.stats().model_version.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_hub_aggregator_coordinator_one_update_per_home() {
    let dir = tempfile::tempdir().unwrap();

    // The upstream coordinator: one update completes a round (one home).
    let up_cfg = hearth_coordinator::Config {
        db_path: dir.path().join("upstream/db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec![HOME_TOKEN.into()],
        round: hearth_coordinator::RoundDefaults {
            min_clients: 1,
            max_clients: 1,
            deadline_secs: 60,
            local_epochs: 2,
            learning_rate: 0.1,
            quant_bits: 8,
            ..hearth_coordinator::RoundDefaults::default()
        },
        models: vec![hearth_coordinator::ModelConfig {
            name: "digits".into(),
            task: "digits".into(),
            init: None,
            eval: true,
            seed: 3,
        }],
        ..hearth_coordinator::Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = hearth_coordinator::start(up_cfg, listener).await.unwrap();
    let up_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&up_ca, up.ca_pem().unwrap()).unwrap();

    // The hub, aggregating digits for its home's agents.
    let agent_tokens: Vec<String> = (0..3).map(|i| format!("agent-token-000{i}")).collect();
    let mut hub_cfg = Config {
        client_id: "agg-hub".into(),
        broker: BrokerConfig::embedded("127.0.0.1:0".parse().unwrap()),
        state_dir: Some(dir.path().join("hub")),
        federation: FederationConfig {
            aggregate: AggregateConfig {
                models: vec!["digits".into()],
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: up.endpoint(),
                upstream_ca_file: Some(up_ca.clone()),
                enrollment_token: Some(HOME_TOKEN.into()),
                device_name: "the-home".into(),
                admin_token: Some(HOME_ADMIN.into()),
                enrollment_tokens: agent_tokens.clone(),
                min_clients: 3,
                max_clients: 3,
                ..AggregateConfig::default()
            },
        },
        ..Config::default()
    };
    hub_cfg.mqtt_auth.dir = dir.path().join("mqtt");
    hub_cfg.mqtt_auth.allow_anonymous = true;
    hub_cfg.mqtt_auth.refresh = RefreshAuth::Off;
    let hub = tokio::time::timeout(LIMIT, hearth_hub::start(hub_cfg))
        .await
        .expect("hub starts in time")
        .expect("hub starts");
    let agg = hub.aggregator().expect("the hub runs an aggregator");
    let hub_id = agg
        .coordinator()
        .upstream()
        .unwrap()
        .client_id()
        .to_string();
    // The agents trust the aggregator's own CA (a home user copies it like the coordinator's).
    let agg_ca = dir.path().join("aggregator-ca.pem");
    std::fs::write(&agg_ca, agg.ca_pem().unwrap()).unwrap();

    let mut agents = Vec::new();
    for (i, token) in agent_tokens.iter().enumerate() {
        let cfg = hearth_agent::Config {
            device: format!("digit-pad-{i}"),
            mqtt: format!("mqtt://{}", hub.mqtt_addr()),
            coordinator: Some(agg.endpoint()),
            coordinator_ca_file: Some(agg_ca.clone()),
            enrollment_token: Some(token.clone()),
            task: "digits".into(),
            data_dir: data_dir(),
            partition: Partition {
                index: i,
                count: 3,
                alpha: 1.0,
                seed: 5,
            },
            replay_rate_hz: 5.0,
            replay_limit: None,
            min_event_score: 0.0,
            state_dir: dir.path().join(format!("agent-{i}")),
            bootstrap_epochs: 1,
            ..hearth_agent::Config::default()
        };
        agents.push(hearth_agent::start(cfg).await.unwrap());
    }
    // Version 1 comes from upstream through the hub, signed by upstream.
    wait_until("version 1 on every agent", || {
        agents.iter().all(|a| version(a) == 1)
    })
    .await;

    let ch = hearth_coordinator::client::connect(&up.endpoint(), up.ca_pem(), None)
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch);
    let round = admin
        .start_round(authed(StartRoundRequest {
            model: "digits".into(),
            reason: "cli".into(),
            ..StartRoundRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    wait_until("version 2 on every agent", || {
        agents.iter().all(|a| version(a) == 2)
    })
    .await;

    let status = admin
        .get_round_status(authed(RoundStatusRequest {
            model: "digits".into(),
            round_id: round.round_id,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, RoundState::Completed as i32);
    // The upstream saw one update, the hub's, never an agent's.
    assert_eq!(status.updates, 1);
    let up_store = up.coordinator().store();
    let markers = up_store.markers(round.round_id).unwrap();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0].client_id, hub_id);
    assert_eq!(
        up.coordinator()
            .metrics()
            .total("hearth_coordinator_updates_accepted_total"),
        1
    );
    // Its sample count is the sum of the agents' (as the hub counted them).
    let home_store = agg.coordinator().store();
    let local = home_store.latest_round("digits").unwrap().unwrap();
    assert_eq!(local.upstream_round, round.round_id);
    assert_eq!(
        (local.state, local.updates),
        (StoredState::Completed, 3),
        "{}",
        local.detail
    );
    let local_markers = home_store.markers(local.id).unwrap();
    assert_eq!(local_markers.len(), 3);
    let sum: u64 = local_markers.iter().map(|m| m.num_samples).sum();
    assert!(sum > 0);
    assert_eq!(markers[0].reported_samples, sum);
    for m in &local_markers {
        assert!(up_store.client(&m.client_id).unwrap().is_none());
        assert!(!markers.iter().any(|u| u.client_id == m.client_id));
    }
    // One upload's bytes upstream: the agents' three uploads stopped at the hub.
    let uploaded: u64 = agents
        .iter()
        .map(|a| a.stats().bytes_uploaded.load(Ordering::Relaxed))
        .sum();
    assert_eq!(local.uplink_bytes, uploaded);
    assert_eq!(status.uplink_bytes, markers[0].payload_bytes);

    // The federated model improved on the held-out split.
    let v1 = up_store.version("digits", 1).unwrap().unwrap();
    let v2 = up_store.version("digits", 2).unwrap().unwrap();
    let (a1, a2) = (v1.eval_accuracy.unwrap(), v2.eval_accuracy.unwrap());
    assert!(a2 > a1 + 0.1, "accuracy {a1} -> {a2}");
    for a in &agents {
        assert_eq!(a.model_tag(), "digits@2");
        assert_eq!(a.stats().snapshot().models_refused, 0);
    }
    // The hub's /metrics-side counters of the aggregator.
    let m = agg.coordinator().metrics();
    assert_eq!(
        m.get("hearth_aggregator_updates_folded_total", "model=\"digits\""),
        3
    );

    for a in agents {
        a.shutdown().await.unwrap();
    }
    hub.shutdown().await;
    up.shutdown().await.unwrap();
}
