//! Signed models, over real gRPC on 127.0.0.1: the key handed out at enrolment is the one in
//! `<signing key>.pub`; every version the coordinator publishes — the initial one and one
//! produced by a round — carries a signature over (model, version, parent, sha256) that
//! verifies with it, in `ModelPublished`, in every `ModelChunk` and in `ListVersions`; and the
//! key and signatures survive a restart.

mod common;

use std::path::Path;

use common::*;
use hearth_coordinator::{start, Config, ModelConfig};
use hearth_model::OnnxModel;
use hearth_proto::signing::{ModelStatement, ModelVerifier};
use hearth_proto::v1::{
    enrollment_client::EnrollmentClient, federation_client::FederationClient, federation_event,
    EnrollRequest, FetchModelRequest, ModelPublished, RoundState, SubscribeRequest,
};

fn config(db: &Path) -> Config {
    Config {
        db_path: db.to_path_buf(),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec!["sign-token-1".into(), "sign-token-2".into()],
        models: vec![ModelConfig {
            name: "digits".into(),
            task: "digits".into(),
            init: None,
            eval: false,
            seed: 3,
        }],
        ..Config::default()
    }
}

/// Fetches a whole version, checking that every chunk carries the same signature and parent.
async fn fetch_signed(
    ch: &tonic::transport::Channel,
    c: &Creds,
    version: u64,
) -> (Vec<u8>, u64, Vec<u8>) {
    let mut s = FederationClient::new(c.channel(ch))
        .fetch_model(with_client(
            FetchModelRequest {
                model: "digits".into(),
                version,
                offset: 0,
                have_version: 0,
            },
            c,
        ))
        .await
        .unwrap()
        .into_inner();
    let (mut bytes, mut lineage) = (Vec::new(), None);
    while let Some(chunk) = s.message().await.unwrap() {
        let this = (chunk.parent_version, chunk.signature.clone());
        assert_eq!(
            *lineage.get_or_insert(this.clone()),
            this,
            "every chunk signs alike"
        );
        bytes.extend_from_slice(&chunk.data);
    }
    let (parent, sig) = lineage.expect("at least one chunk");
    (bytes, parent, sig)
}

fn verify(key: &ModelVerifier, version: u64, parent: u64, bytes: &[u8], sig: &[u8]) {
    let s = ModelStatement::for_bytes("digits", version, parent, bytes);
    key.verify(&s, sig)
        .unwrap_or_else(|e| panic!("digits v{version} (parent {parent}): {e}"));
}

fn published(e: federation_event::Event) -> ModelPublished {
    match e {
        federation_event::Event::Published(p) => p,
        other => panic!("expected a publication, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_versions_are_signed_with_the_enrolment_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let server = start(config(&db), listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();

    // The key file is private and its public half is the key handed out at enrolment.
    let key_file = dir.path().join("db.signing-key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let pub_hex = std::fs::read_to_string(dir.path().join("db.signing-key.pub")).unwrap();
    let (key_pem, csr_pem) = key_and_csr();
    let enrolled = EnrollmentClient::new(ch.clone())
        .enroll(EnrollRequest {
            token: "sign-token-1".into(),
            device_name: "plug".into(),
            csr_pem,
        })
        .await
        .unwrap()
        .into_inner();
    let key = ModelVerifier::from_bytes(&enrolled.model_signing_key).unwrap();
    assert_eq!(key, ModelVerifier::from_hex(&pub_hex).unwrap());
    let a = tls
        .client(&TlsCreds {
            id: enrolled.client_id,
            cert_pem: enrolled.client_cert_pem,
            key_pem,
        })
        .await;
    let b = tls.enroll("sign-token-2", "hall").await.unwrap();

    // Version 1: in the subscription snapshot, in every chunk and in ListVersions.
    let mut sub = FederationClient::new(a.channel(&ch))
        .subscribe(with_client(
            SubscribeRequest {
                models: vec!["digits".into()],
            },
            &a,
        ))
        .await
        .unwrap()
        .into_inner();
    let p1 = published(next_event(&mut sub).await);
    let (v1, parent, sig) = fetch_signed(&ch, &a, 1).await;
    assert_eq!((p1.version, p1.parent_version, parent), (1, 0, 0));
    assert_eq!(p1.signature, sig);
    verify(&key, 1, 0, &v1, &sig);

    // A round publishes version 2, signed with version 1 as its parent.
    let global = OnnxModel::from_bytes(&v1).unwrap().weights();
    let r = start_round(&ch, "digits", 2, 2, 60).await;
    for (c, seed) in [(&a, 1.0), (&b, 2.0)] {
        let payload = encode(&delta(&global, seed, 0.01), 8, seed as u64);
        let ack = upload(&ch, c, "digits", r.round_id, 1, 10, &payload)
            .await
            .unwrap();
        assert!(ack.accepted, "{}", ack.reason);
    }
    wait_state(&ch, "digits", r.round_id, RoundState::Completed).await;
    let p2 = loop {
        if let federation_event::Event::Published(p) = next_event(&mut sub).await {
            break p;
        }
    };
    let (v2, parent, sig) = fetch_signed(&ch, &a, 2).await;
    assert_eq!((p2.version, p2.parent_version, parent), (2, 1, 1));
    assert_eq!(p2.signature, sig);
    verify(&key, 2, 1, &v2, &sig);
    // The signature is bound to its version's bytes, lineage and name.
    let s = ModelStatement::for_bytes("digits", 2, 1, &v1);
    assert!(key.verify(&s, &sig).is_err());
    let s = ModelStatement::for_bytes("faces", 2, 1, &v2);
    assert!(key.verify(&s, &sig).is_err());
    drop(sub);
    server.shutdown().await.unwrap();

    // After a restart: the same key, the same signatures, listed with every version.
    let server = start(config(&db), listener().await).await.unwrap();
    let ch = Tls::connect(&server).await.ch;
    let listed = versions(&ch, "digits").await.unwrap();
    assert_eq!(listed.len(), 2);
    for (v, bytes) in listed.iter().zip([&v1, &v2]) {
        verify(&key, v.version, v.parent_version, bytes, &v.signature);
    }
    server.shutdown().await.unwrap();
}
