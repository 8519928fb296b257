//! Client selection, the server loop, the client optimizer, federated evaluation and
//! rollback with real agents against the real coordinator (in process, TLS, loopback):
//! three agents follow a model, each round draws two of them, only those two train (the
//! third is told it was not selected), the round task carries plain SGD with FedProx's term
//! and a held-out fraction, the agents' evaluations are aggregated per version, and a
//! rollback is loaded by every agent as a new version.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{data_dir, start_broker};
use hearth_agent::{AgentHandle, AgentStats, Config, Partition};
use hearth_coordinator::{
    ClientOptimizer, ClientTraining, Combine, Config as CoordConfig, ModelConfig, RoundDefaults,
};
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{ListVersionsRequest, RollbackRequest, StartRoundRequest};

const ADMIN: &str = "admin-secret-token-0123456789";
const TOKENS: [&str; 3] = ["token-sel-a-0001", "token-sel-b-0002", "token-sel-c-0003"];

async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
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

fn agent_config(i: usize, port: u16, coord: &str, state: &Path) -> Config {
    Config {
        device: format!("sel-{i}"),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        coordinator: Some(coord.into()),
        coordinator_ca_file: Some(state.with_extension("ca.pem")),
        enrollment_token: Some(TOKENS[i].into()),
        task: "faces".into(),
        data_dir: data_dir(),
        partition: Partition {
            index: i,
            count: 3,
            alpha: 0.5,
            seed: 11,
        },
        replay_rate_hz: 5.0,
        replay_limit: None,
        min_event_score: 0.0,
        state_dir: state.to_path_buf(),
        bootstrap_epochs: 1,
        ..Config::default()
    }
}

fn stat(a: &AgentHandle, f: impl Fn(&AgentStats) -> &AtomicU64) -> u64 {
    let s = a.stats();
    f(&s).load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cohort_of_two_of_three_real_agents_trains_evaluates_and_takes_a_rollback() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sled=warn")
        .with_test_writer()
        .try_init();
    let port = start_broker();
    let db = tempfile::tempdir().unwrap();
    let coord_cfg = CoordConfig {
        db_path: db.path().join("coord.db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: TOKENS.iter().map(|t| t.to_string()).collect(),
        round: RoundDefaults {
            min_clients: 2,
            max_clients: 10,
            deadline_secs: 60,
            local_epochs: 1,
            clients_per_round: 2,
            selection_seed: Some(5),
            min_available_clients: 3,
            available_wait_secs: 30,
            eval_fraction: 0.25,
            ..RoundDefaults::default()
        },
        client_training: ClientTraining {
            optimizer: ClientOptimizer::Sgd,
            momentum: 0.9,
            proximal_mu: 0.1,
        },
        models: vec![ModelConfig {
            name: "faces".into(),
            task: "faces".into(),
            init: None,
            eval: true,
            seed: 1,
        }],
        ..CoordConfig::default()
    };
    let mut coord_cfg = coord_cfg;
    coord_cfg.aggregation.combine = Combine::Mean;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = hearth_coordinator::start(coord_cfg, listener)
        .await
        .expect("coordinator starts");
    let url = coord.endpoint();
    let states: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = Vec::new();
    for (i, s) in states.iter().enumerate() {
        std::fs::write(s.path().with_extension("ca.pem"), coord.ca_pem().unwrap()).unwrap();
        agents.push(
            hearth_agent::start(agent_config(i, port, &url, s.path()))
                .await
                .unwrap(),
        );
    }
    let limit = Duration::from_secs(60);
    wait_until("version 1 on every agent", limit, || {
        agents.iter().all(|a| stat(a, |s| &s.model_version) == 1)
    })
    .await;

    // One refresh asks for two rounds; it waits until the three agents are available.
    let ch = hearth_coordinator::client::connect(&url, coord.ca_pem(), None)
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch);
    let first = admin
        .start_round(authed(StartRoundRequest {
            model: "faces".into(),
            num_rounds: 2,
            reason: "cli".into(),
            ..StartRoundRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.cohort_size, first.available_clients), (2, 3));
    let store = coord.coordinator().store().clone();
    wait_until("two rounds and version 3 on every agent", limit * 2, || {
        agents.iter().all(|a| stat(a, |s| &s.model_version) == 3)
    })
    .await;
    let rounds = store.rounds_of("faces").unwrap();
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r.cohort.len(), 2);
        assert_eq!(r.updates, 2, "round {} completed with its cohort", r.id);
        assert!(
            r.fed_eval_samples > 0,
            "round {}: no federated evaluation",
            r.id
        );
        // The task carried the configured client optimizer.
        assert_eq!(r.task.client.optimizer, ClientOptimizer::Sgd);
        assert_eq!(r.task.client.proximal_mu, 0.1);
    }
    // Only the selected agents trained: two per round, nobody refused.
    let trained: u64 = agents.iter().map(|a| stat(a, |s| &s.local_trainings)).sum();
    let joined: u64 = agents.iter().map(|a| stat(a, |s| &s.rounds_joined)).sum();
    assert_eq!((trained, joined), (4, 4));
    assert_eq!(
        coord.coordinator().metrics().rejections("not_selected"),
        0,
        "an agent that was not selected uploaded anyway"
    );

    // The held-out and the federated accuracy of each version, side by side.
    let versions = admin
        .list_versions(authed(ListVersionsRequest {
            model: "faces".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .versions;
    for v in &versions[..2] {
        assert!(
            (0.0..=1.0).contains(&v.federated_accuracy) && v.federated_samples > 0,
            "{v:?}"
        );
        assert!(v.eval_accuracy >= 0.0);
    }

    // Roll back to version 1: every agent loads it as version 4.
    let r = admin
        .rollback(authed(RollbackRequest {
            model: "faces".into(),
            version: 1,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.version, r.rollback_of), (4, 1));
    wait_until("the rollback on every agent", limit, || {
        agents.iter().all(|a| stat(a, |s| &s.model_version) == 4)
    })
    .await;
    for a in &agents {
        assert_eq!(a.model_tag(), "faces@4");
        assert_eq!(stat(a, |s| &s.models_refused), 0);
    }
    for a in agents {
        a.shutdown().await.unwrap();
    }
    coord.shutdown().await.unwrap();
}
