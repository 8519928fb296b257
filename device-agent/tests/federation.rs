//! The federation path end to end against the real coordinator (in process, on
//! loopback): enrollment, model fetch + hot-swap, a full round with two agents
//! training on their own shares, the new version swapped in, and a restart that
//! resumes from the stored credentials and model.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{data_dir, start_broker, Sub};
use hearth_agent::state::StateDir;
use hearth_agent::{AgentHandle, Config, Partition};
use hearth_coordinator::{Config as CoordConfig, ModelConfig, RoundDefaults};
use hearth_proto::mqtt::Event;
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{RoundState, RoundStatusRequest, StartRoundRequest};

const ADMIN: &str = "admin-secret-token-0123456789";

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

fn agent_config(
    device: &str,
    index: usize,
    port: u16,
    coord: &str,
    state: &Path,
    token: Option<&str>,
) -> Config {
    Config {
        device: device.into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        coordinator: Some(coord.into()),
        // The coordinator's CA: its pki/ beside the database (see `two_agents_…`).
        coordinator_ca_file: Some(ca_file(state)),
        enrollment_token: token.map(str::to_string),
        task: "faces".into(),
        data_dir: data_dir(),
        partition: Partition {
            index,
            count: 2,
            alpha: 0.5,
            seed: 11,
        },
        replay_rate_hz: 20.0,
        replay_limit: None,
        min_event_score: 0.0,
        state_dir: state.to_path_buf(),
        bootstrap_epochs: 1,
        ..Config::default()
    }
}

/// Where each test copies the coordinator's CA certificate for the agent of `state`: a
/// home user copies `pki/ca.pem` to the device the same way.
fn ca_file(state: &Path) -> std::path::PathBuf {
    state.with_extension("ca.pem")
}

/// `msg` with the admin bearer token.
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
async fn two_agents_complete_a_round_and_hot_swap_the_new_version() {
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
        enrollment_tokens: vec!["token-cam-a-0001".into(), "token-cam-b-0002".into()],
        round: RoundDefaults {
            min_clients: 2,
            max_clients: 2,
            deadline_secs: 60,
            local_epochs: 2,
            quant_bits: 8,
            topk_fraction: 0.5,
            ..RoundDefaults::default()
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = hearth_coordinator::start(coord_cfg, listener)
        .await
        .expect("coordinator starts");
    let url = coord.endpoint();
    assert!(url.starts_with("https://"));

    let sa = tempfile::tempdir().unwrap();
    let sb = tempfile::tempdir().unwrap();
    for s in [&sa, &sb] {
        std::fs::write(ca_file(s.path()), coord.ca_pem().unwrap()).unwrap();
    }
    let mut events = Sub::connect(port, "watcher", &["hearth/+/event/#"]).await;
    let a = hearth_agent::start(agent_config(
        "cam-a",
        0,
        port,
        &url,
        sa.path(),
        Some("token-cam-a-0001"),
    ))
    .await
    .unwrap();
    let b = hearth_agent::start(agent_config(
        "cam-b",
        1,
        port,
        &url,
        sb.path(),
        Some("token-cam-b-0002"),
    ))
    .await
    .unwrap();

    // Both enroll, subscribe and replace their bootstrap model by global version 1.
    let limit = Duration::from_secs(30);
    wait_until("version 1 on both agents", limit, || {
        version(&a) == 1 && version(&b) == 1
    })
    .await;
    assert_eq!(a.model_tag(), "faces@1");
    assert!(a.stats().bytes_downloaded.load(Ordering::Relaxed) > 0);
    events
        .wait_for(limit, |m| {
            Event::parse(&m.payload)
                .map(|e| e.model == "faces@1")
                .unwrap_or(false)
        })
        .await
        .expect("events from the fetched model");

    // An operator starts a round.
    let ch = hearth_coordinator::client::connect(&url, coord.ca_pem(), None)
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch);
    let round = admin
        .start_round(authed(StartRoundRequest {
            model: "faces".into(),
            reason: "cli".into(),
            ..StartRoundRequest::default()
        }))
        .await
        .expect("round starts")
        .into_inner();
    assert_eq!(round.base_version, 1);

    wait_until("both updates", limit, || {
        a.stats().rounds_joined.load(Ordering::Relaxed) == 1
            && b.stats().rounds_joined.load(Ordering::Relaxed) == 1
    })
    .await;
    wait_until("version 2 on both agents", limit, || {
        version(&a) == 2 && version(&b) == 2
    })
    .await;
    let sa_stats = a.stats().snapshot();
    assert_eq!(sa_stats.rounds_failed, 0);
    // Version 2 came as a coded delta against version 1 and rebuilt the signed file.
    assert_eq!(
        (sa_stats.models_from_delta, sa_stats.delta_fallbacks),
        (1, 0),
        "{sa_stats:?}"
    );
    assert!(sa_stats.bytes_uploaded > 0);

    let status = admin
        .get_round_status(authed(RoundStatusRequest {
            model: "faces".into(),
            round_id: round.round_id,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, RoundState::Completed as i32);
    assert_eq!(status.updates, 2);
    assert_eq!(status.new_version, 2);
    // Compressed: 8-bit top-50 % updates weigh well under a dense f32 delta.
    assert!(
        status.uplink_bytes < status.model_fp32_bytes,
        "uplink {} vs dense {}",
        status.uplink_bytes,
        status.model_fp32_bytes
    );
    assert_eq!(
        status.uplink_bytes,
        sa_stats.bytes_uploaded + b.stats().bytes_uploaded.load(Ordering::Relaxed)
    );

    // Events keep flowing, now from the new version.
    events
        .wait_for(limit, |m| {
            Event::parse(&m.payload)
                .map(|e| e.model == "faces@2")
                .unwrap_or(false)
        })
        .await
        .expect("events from the hot-swapped model");

    // State persisted: model v2, residual, credentials.
    let st = StateDir::open(sa.path()).unwrap();
    let (meta, _) = st.load_model("faces").unwrap().expect("stored model");
    assert_eq!(meta.version, 2);
    assert!(st.load_residual("faces").unwrap().is_some());
    let creds = st.load_credentials().unwrap().unwrap();
    // Enrolled by CSR at start: a certificate of the coordinator's CA, no shared key.
    assert!(creds.client_key.is_empty() && !creds.key_pem.is_empty());
    let der = hearth_coordinator::pki::pem_to_der(&creds.cert_pem).unwrap();
    assert_eq!(
        hearth_coordinator::pki::common_name(&der),
        Some(creds.client_id.clone())
    );
    assert_eq!(st.load_rounds("faces").unwrap(), vec![round.round_id]);

    a.shutdown().await.unwrap();
    // Restart without a token: stored credentials and model are used.
    let a2 = hearth_agent::start(agent_config("cam-a", 0, port, &url, sa.path(), None))
        .await
        .unwrap();
    assert_eq!(a2.model_tag(), "faces@2");
    // No spurious re-fetch. The subscription's first event announces v2, which the restarted
    // agent already has; a round opened now reaches its worker after that announcement, and
    // joining it needs base version 2. The round wants three updates, so with two agents it
    // stays open and nothing newer is published: once the agent joined it, any download is
    // a re-fetch of a version it had stored.
    let round2 = admin
        .start_round(authed(StartRoundRequest {
            model: "faces".into(),
            min_clients: 3,
            max_clients: 3,
            reason: "cli".into(),
            ..StartRoundRequest::default()
        }))
        .await
        .expect("second round starts")
        .into_inner();
    assert_eq!(round2.base_version, 2);
    wait_until("the restarted agent joins round 2", limit, || {
        a2.stats().rounds_joined.load(Ordering::Relaxed) == 1
    })
    .await;
    let s2 = a2.stats().snapshot();
    assert_eq!(
        (s2.bytes_downloaded, s2.models_loaded, s2.model_version),
        (0, 0, 2),
        "no spurious re-fetch: {s2:?}"
    );
    assert_eq!(s2.rounds_failed, 0);
    a2.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    coord.shutdown().await.unwrap();
}
