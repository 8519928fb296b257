//! Home aggregator mode (`[upstream]`) over real gRPC and TLS on 127.0.0.1: an upstream
//! coordinator and a home aggregator (both the real server, in process), three clients of
//! the home uploading known updates. The upstream must receive exactly one update — from the
//! aggregator's identity, with the home's total sample count — and publish what FedAvg of
//! the three updates gives (within the 8-bit codec of the one upload); the home re-serves
//! upstream's versions with their signatures unchanged.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use hearth_coordinator::store::RoundState as StoredState;
use hearth_coordinator::{start, Config, CoordinatorHandle, Downlink, ModelConfig, RoundDefaults};
use hearth_coordinator::{Combine, UpstreamConfig};
use hearth_model::OnnxModel;
use hearth_proto::v1::RoundState;

const HOME_TOKEN: &str = "home-token-0001";
const DEVICE_TOKENS: [&str; 3] = ["device-token-1", "device-token-2", "device-token-3"];

fn upstream_config(db: &Path) -> Config {
    Config {
        db_path: db.join("up.db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec![HOME_TOKEN.into()],
        metrics_listen: String::new(),
        round: RoundDefaults {
            min_clients: 1,
            max_clients: 1,
            deadline_secs: 60,
            quant_bits: 8,
            ..RoundDefaults::default()
        },
        models: vec![ModelConfig {
            name: "digits".into(),
            task: "digits".into(),
            init: None,
            eval: false,
            seed: 7,
        }],
        // The exact result of the server step is published.
        downlink: Downlink {
            bits: 0,
            ..Downlink::default()
        },
        ..Config::default()
    }
}

fn home_config(db: &Path, upstream: &CoordinatorHandle, ca_file: &Path) -> Config {
    let mut c = Config {
        db_path: db.join("home.db"),
        admin_token: ADMIN.into(),
        enrollment_tokens: DEVICE_TOKENS.iter().map(|t| t.to_string()).collect(),
        round: RoundDefaults {
            min_clients: 3,
            max_clients: 3,
            ..RoundDefaults::default()
        },
        models: vec![ModelConfig {
            name: "digits".into(),
            task: String::new(),
            init: None,
            eval: false,
            seed: 1,
        }],
        upstream: Some(UpstreamConfig {
            url: upstream.endpoint(),
            ca_file: Some(ca_file.to_path_buf()),
            enrollment_token: Some(HOME_TOKEN.into()),
            device_name: "home-1".into(),
            ..UpstreamConfig::default()
        }),
        ..Config::default()
    };
    // The bounded mean (three updates are below robust_from_clients anyway).
    c.aggregation.combine = Combine::Mean;
    c
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..600 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_one_update_per_home_equal_to_fedavg_of_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(upstream_config(dir.path()), listener().await)
        .await
        .expect("upstream starts");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, up.ca_pem().unwrap()).unwrap();
    let home = start(home_config(dir.path(), &up, &ca_file), listener().await)
        .await
        .expect("home aggregator starts");
    let up_store = up.coordinator().store().clone();
    let home_store = home.coordinator().store().clone();
    let home_id = home
        .coordinator()
        .upstream()
        .expect("a home aggregator")
        .client_id()
        .to_string();
    // Its upstream identity (key, certificate) is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir.path().join("home.db.upstream.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    // The home's clients pin the upstream's key: the home publishes nothing of its own.
    assert_eq!(
        home.coordinator().model_signing_key(),
        up.coordinator().model_signing_key()
    );

    // Version 1 is re-served by the home with the upstream's signature, unchanged.
    let v1 = wait_for("version 1 at the home", || {
        home_store.latest_version("digits").unwrap()
    })
    .await;
    assert_eq!(v1, {
        let mut u = up_store.version("digits", 1).unwrap().unwrap();
        u.created_unix_ms = v1.created_unix_ms;
        u.eval_accuracy = None;
        u
    });
    let tls = Tls::connect(&home).await;
    let mut clients = Vec::new();
    for (i, t) in DEVICE_TOKENS.iter().enumerate() {
        clients.push(tls.enroll(t, &format!("device-{i}")).await.unwrap());
    }
    let (bytes, sha, _, _) = fetch(&tls.ch, &clients[0], "digits", 1, 0).await.unwrap();
    assert_eq!(sha, v1.sha256);
    assert_eq!(
        bytes,
        up_store.model_bytes("digits", 1).unwrap().unwrap().to_vec()
    );
    let global = OnnxModel::from_bytes(&bytes).unwrap().weights();

    // An operator starts a round upstream; the home opens its local round for it.
    let up_tls = Tls::connect(&up).await;
    let round = start_round(&up_tls.ch, "digits", 1, 1, 60).await;
    let local = wait_for("the home's local round", || {
        home_store
            .latest_round("digits")
            .unwrap()
            .filter(|r| r.upstream_round == round.round_id && r.state == StoredState::Open)
    })
    .await;
    assert_eq!(local.base_version, 1);
    assert!(local.deadline_unix_ms < local.upstream_deadline_unix_ms);
    // Local clients are not allowed to start rounds at the home.
    let refused = hearth_proto::v1::admin_client::AdminClient::new(tls.ch.clone())
        .start_round(with_admin(
            hearth_proto::v1::StartRoundRequest {
                model: "digits".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // Three clients upload exact (f32) updates with different sample counts.
    let samples = [100u64, 200, 300];
    let mut payloads = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let p = encode(&delta(&global, i as f32 + 1.0, 0.05), 32, i as u64);
        let ack = upload(&tls.ch, c, "digits", local.id, 1, samples[i], &p)
            .await
            .unwrap();
        assert!(ack.accepted, "{ack:?}");
        payloads.push(p);
    }
    let status = wait_state(&up_tls.ch, "digits", round.round_id, RoundState::Completed).await;

    // Exactly one update reached the upstream: the home's, with the home's sample count.
    assert_eq!(status.updates, 1);
    let markers = up_store.markers(round.round_id).unwrap();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0].client_id, home_id);
    assert_eq!(markers[0].reported_samples, samples.iter().sum::<u64>());
    assert!(clients
        .iter()
        .all(|c| up_store.client(&c.id).unwrap().is_none()));
    let m = up.coordinator().metrics();
    assert_eq!(m.total("hearth_coordinator_updates_accepted_total"), 1);
    assert_eq!(m.total("hearth_coordinator_rejections_total"), 0);

    // What upstream published is FedAvg of the three updates, within one 8-bit step of the
    // home's one upload.
    let v2 = OnnxModel::from_bytes(&up_store.model_bytes("digits", 2).unwrap().unwrap())
        .unwrap()
        .weights();
    let updates: Vec<(&[u8], u64)> = payloads
        .iter()
        .zip(samples)
        .map(|(p, n)| (p.as_slice(), n))
        .collect();
    let expected = fedavg(&global, &updates);
    let step = expected
        .iter()
        .map(|(k, t)| {
            let max = t
                .data
                .iter()
                .zip(&global[k].data)
                .map(|(e, g)| (e - g).abs())
                .fold(0.0f32, f32::max);
            max / 127.0
        })
        .fold(0.0f32, f32::max);
    let err = max_abs_diff(&v2, &expected);
    assert!(
        err <= step * 1.01 + 1e-6,
        "published model is {err} from FedAvg (8-bit step {step})"
    );
    // A single client's update would be far off.
    let one = fedavg(&global, &updates[..1]);
    assert!(max_abs_diff(&v2, &one) > 10.0 * step);

    // The home's round closed as sent upstream, and its counters say so.
    let closed = home_store.round(local.id).unwrap().unwrap();
    assert_eq!(
        (closed.state, closed.new_version, closed.updates),
        (StoredState::Completed, 0, 3)
    );
    assert!(
        closed.detail.contains("sent to upstream round"),
        "{}",
        closed.detail
    );
    let hm = home.coordinator().metrics();
    assert_eq!(
        hm.get(
            "hearth_aggregator_upstream_uploads_total",
            "model=\"digits\",outcome=\"accepted\""
        ),
        1
    );
    assert_eq!(
        hm.get("hearth_aggregator_updates_folded_total", "model=\"digits\""),
        3
    );

    // Version 2 is back at the home, signed by upstream, and served to its clients.
    let v2_home = wait_for("version 2 at the home", || {
        home_store.version("digits", 2).unwrap()
    })
    .await;
    let v2_up = up_store.version("digits", 2).unwrap().unwrap();
    assert_eq!(
        (&v2_home.sha256, &v2_home.signature, v2_home.parent_version),
        (&v2_up.sha256, &v2_up.signature, v2_up.parent_version)
    );
    assert!(hm
        .render()
        .contains("hearth_aggregator_versions_imported_total{model=\"digits\"} 2"));
    let (bytes, _, _, _) = fetch(&tls.ch, &clients[1], "digits", 2, 0).await.unwrap();
    assert_eq!(
        bytes,
        up_store.model_bytes("digits", 2).unwrap().unwrap().to_vec()
    );

    home.shutdown().await.unwrap();
    up.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_home_aggregator_needs_an_upstream_identity_or_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(&ca, cert.pem()).unwrap();
    let mut c = Config {
        db_path: dir.path().join("home.db"),
        admin_token: ADMIN.into(),
        models: vec![ModelConfig {
            name: "digits".into(),
            task: String::new(),
            init: None,
            eval: false,
            seed: 1,
        }],
        upstream: Some(UpstreamConfig {
            url: "https://127.0.0.1:1".into(),
            ca_file: Some(ca.clone()),
            ..UpstreamConfig::default()
        }),
        ..Config::default()
    };
    c.validate().expect("valid");
    let e = start(c.clone(), listener().await).await.unwrap_err();
    assert!(!e.is_unavailable());
    assert!(e.to_string().contains("enrollment_token"), "{e}");
    // With a token, an unreachable upstream is "unavailable" (exit 69), not a bad config.
    c.upstream.as_mut().unwrap().enrollment_token = Some("some-token".into());
    let e = start(c.clone(), listener().await).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    // One update must never be the home's aggregate.
    let mut one = c.clone();
    one.round.min_clients = 1;
    let e = one.validate().unwrap_err().to_string();
    assert!(e.contains("min_clients >= 2"), "{e}");
    // Models of a home aggregator come from upstream: no local evaluation or init file.
    c.models[0].eval = true;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("eval = false"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_that_do_not_verify_with_the_pinned_upstream_key_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(upstream_config(dir.path()), listener().await)
        .await
        .expect("upstream starts");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, up.ca_pem().unwrap()).unwrap();
    let creds = dir.path().join("identity.json");
    let mut cfg = home_config(dir.path(), &up, &ca_file);
    cfg.upstream.as_mut().unwrap().credentials_file = Some(creds.clone());
    // A first run enrols and imports version 1.
    let home = start(cfg.clone(), listener().await).await.unwrap();
    let store = home.coordinator().store().clone();
    wait_for("version 1", || store.latest_version("digits").unwrap()).await;
    home.shutdown().await.unwrap();
    drop(store);

    // The stored identity now pins another key (as if the upstream's key were not the one
    // that signed): a home with a fresh database must refuse what the upstream serves.
    let mut ident: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    let other = hearth_proto::signing::ModelSigner::from_secret(&[7u8; 32]).public_key();
    ident["model_signing_key"] = hex::encode(other).into();
    std::fs::write(&creds, serde_json::to_vec(&ident).unwrap()).unwrap();
    cfg.db_path = dir.path().join("home2.db");
    let home = start(cfg, listener().await).await.unwrap();
    assert_eq!(home.coordinator().model_signing_key(), other);
    let m = home.coordinator().metrics().clone();
    wait_for("the refusal", || {
        (m.rejections("upstream_model") > 0).then_some(())
    })
    .await;
    let store = home.coordinator().store();
    assert!(store.latest_version("digits").unwrap().is_none());
    assert_eq!(m.total("hearth_aggregator_versions_imported_total"), 0);
    home.shutdown().await.unwrap();
    up.shutdown().await.unwrap();
}
