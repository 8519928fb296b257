//! The compressed downlink over real gRPC on 127.0.0.1: a client that holds version N and
//! asks for N+1 gets a coded delta (`delta_base` = N) a fraction of the file's size; applying
//! it to N with `hearth_model::downlink::apply` rebuilds, byte for byte, the file the
//! coordinator published, lists and signed (so the signature verifies over the rebuild), for
//! two rounds in a row (the second carries the first's residual). A client holding another
//! version, or none, gets the whole file; with `downlink.bits = 0` everyone does.

mod common;

use std::path::Path;

use common::*;
use hearth_coordinator::{start, Config, Downlink, ModelConfig};
use hearth_model::{downlink, OnnxModel};
use hearth_proto::signing::{ModelStatement, ModelVerifier};
use hearth_proto::v1::{federation_client::FederationClient, FetchModelRequest, RoundState};

const TOKENS: [&str; 2] = ["down-token-1", "down-token-2"];

fn config(db: &Path, downlink: Downlink) -> Config {
    Config {
        db_path: db.to_path_buf(),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: TOKENS.iter().map(|t| t.to_string()).collect(),
        downlink,
        models: vec![ModelConfig {
            name: "digits".into(),
            task: "digits".into(),
            init: None,
            eval: true,
            seed: 9,
        }],
        ..Config::default()
    }
}

/// What `FetchModel` returned: (bytes, delta_base, sha256, parent, signature).
type Fetched = (Vec<u8>, u64, String, u64, Vec<u8>);

async fn fetch_have(ch: &tonic::transport::Channel, c: &Creds, version: u64, have: u64) -> Fetched {
    let mut s = FederationClient::new(c.channel(ch))
        .fetch_model(with_client(
            FetchModelRequest {
                model: "digits".into(),
                version,
                offset: 0,
                have_version: have,
            },
            c,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut out: Fetched = (Vec::new(), 0, String::new(), 0, Vec::new());
    while let Some(chunk) = s.message().await.unwrap() {
        assert_eq!(chunk.offset, out.0.len() as u64);
        out.0.extend_from_slice(&chunk.data);
        (out.1, out.2, out.3, out.4) = (
            chunk.delta_base,
            chunk.sha256,
            chunk.parent_version,
            chunk.signature,
        );
    }
    out
}

/// One round from `base` with both clients' small updates; returns the new version.
async fn round(ch: &tonic::transport::Channel, cs: &[&Creds], base: &[u8], seed: f32) -> u64 {
    let global = OnnxModel::from_bytes(base).unwrap().weights();
    let r = start_round(ch, "digits", 2, 2, 60).await;
    for (i, c) in cs.iter().enumerate() {
        let payload = encode(&delta(&global, seed + i as f32, 0.02), 8, i as u64 + 1);
        let ack = upload(ch, c, "digits", r.round_id, r.base_version, 20, &payload)
            .await
            .unwrap();
        assert!(ack.accepted, "{}", ack.reason);
    }
    wait_state(ch, "digits", r.round_id, RoundState::Completed)
        .await
        .new_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_the_parent_rebuilds_the_signed_version_from_a_coded_delta() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        config(&dir.path().join("db"), Downlink::default()),
        listener().await,
    )
    .await
    .unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let a = tls.enroll(TOKENS[0], "plug-a").await.unwrap();
    let b = tls.enroll(TOKENS[1], "plug-b").await.unwrap();
    let key = ModelVerifier::from_hex(
        &std::fs::read_to_string(dir.path().join("db.signing-key.pub")).unwrap(),
    )
    .unwrap();

    let (mut held, base, ..) = fetch_have(&ch, &a, 1, 0).await;
    assert_eq!(base, 0, "version 1 has no parent: the file");
    for (want, seed) in [(2u64, 1.0f32), (3, 5.0)] {
        assert_eq!(round(&ch, &[&a, &b], &held, seed).await, want);
        let (file, base, sha, parent, sig) = fetch_have(&ch, &a, want, 0).await;
        assert_eq!(base, 0, "no version held: the whole file");
        let (coded, base, dsha, dparent, dsig) = fetch_have(&ch, &a, want, want - 1).await;
        assert_eq!(base, want - 1, "the parent held: a delta against it");
        assert_eq!((dsha, dparent, &dsig), (sha.clone(), parent, &sig));
        assert!(
            coded.len() * 3 < file.len(),
            "v{want}: delta {} bytes vs file {}",
            coded.len(),
            file.len()
        );
        // The rebuild is the published file itself: same bytes, same signed digest.
        let rebuilt = downlink::apply(&OnnxModel::from_bytes(&held).unwrap(), &coded)
            .unwrap()
            .to_bytes();
        assert_eq!(
            rebuilt, file,
            "v{want}: the rebuild differs from the published file"
        );
        key.verify(
            &ModelStatement::for_bytes("digits", want, want - 1, &rebuilt),
            &sig,
        )
        .unwrap();
        // Someone holding another version (or a version that never existed) gets the file.
        let (other, base, ..) = fetch_have(&ch, &a, want, want + 4).await;
        assert_eq!((base, &other), (0, &file));
        held = file;
    }
    // Listed with the delta's size; downlink bytes count what was served.
    let listed = versions(&ch, "digits").await.unwrap();
    assert_eq!(listed[0].delta_bytes, 0);
    for v in &listed[1..] {
        assert!(
            v.delta_bytes > 0 && v.delta_bytes * 3 < v.size_bytes,
            "{v:?}"
        );
        assert_eq!(v.downlink_bytes, 2 * v.size_bytes + v.delta_bytes);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_downlink_off_every_client_gets_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let off = Downlink {
        bits: 0,
        ..Downlink::default()
    };
    let server = start(config(&dir.path().join("db"), off), listener().await)
        .await
        .unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let a = tls.enroll(TOKENS[0], "plug-a").await.unwrap();
    let b = tls.enroll(TOKENS[1], "plug-b").await.unwrap();
    let (v1, ..) = fetch_have(&ch, &a, 1, 0).await;
    assert_eq!(round(&ch, &[&a, &b], &v1, 1.0).await, 2);
    let (file, base, ..) = fetch_have(&ch, &a, 2, 1).await;
    assert_eq!(base, 0);
    assert_eq!(OnnxModel::from_bytes(&file).unwrap().to_bytes(), file);
    assert_eq!(versions(&ch, "digits").await.unwrap()[1].delta_bytes, 0);
    server.shutdown().await.unwrap();
}
