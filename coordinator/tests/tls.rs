//! gRPC over TLS with the coordinator's own CA, on real sockets (127.0.0.1): enrolment by CSR,
//! client certificates as the identity of rounds, refusal of calls without a certificate, with
//! one from another CA or one the CA signed but did not issue to the client, expired, reused
//! and other-device tokens, revocation (next call and open streams) and the admin credential.

mod common;

use std::time::Duration;

use common::*;
use hearth_coordinator::{start, Config, CoordinatorHandle, ModelConfig};
use hearth_proto::v1::{
    admin_client::AdminClient, federation_client::FederationClient, CreateTokenRequest,
    FetchModelRequest, RevokeDeviceRequest, StartRoundRequest, SubscribeRequest,
};
use tonic::{Code, Request};

const MODEL: &str = "digits";

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        db_path: dir.join("db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec!["seeded-token-1".into()],
        models: vec![ModelConfig {
            name: MODEL.into(),
            task: "digits".into(),
            init: None,
            eval: false,
            seed: 7,
        }],
        ..Config::default()
    };
    c.round.min_clients = 1;
    c.round.max_clients = 2;
    c
}

async fn server(dir: &std::path::Path) -> CoordinatorHandle {
    let h = start(config(dir), listener().await).await.unwrap();
    assert!(h.endpoint().starts_with("https://"), "TLS is the default");
    h
}

/// A token for `device` made through the Admin API (`ttl_secs` 0 = default).
async fn token(h: &CoordinatorHandle, device: &str, ttl_secs: u64) -> String {
    let ch = tls_channel(h, None).await.unwrap();
    AdminClient::new(ch)
        .create_enrollment_token(with_admin(
            CreateTokenRequest {
                uses: 1,
                device_name: device.into(),
                ttl_secs,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn subscribe_code(ch: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    let mut s = FederationClient::new(ch.clone())
        .subscribe(SubscribeRequest {
            models: vec![MODEL.into()],
        })
        .await?
        .into_inner();
    s.message().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_by_csr_gives_a_certificate_whose_identity_is_used_for_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let anon = tls_channel(&h, None).await.unwrap();
    let t = token(&h, "kitchen-plug", 0).await;
    let me = enroll_tls(&anon, &t, "kitchen-plug").await.unwrap();
    // The certificate chains to the coordinator's CA and names the client id.
    let der = hearth_coordinator::pki::pem_to_der(&me.cert_pem).unwrap();
    assert_eq!(
        hearth_coordinator::pki::common_name(&der).as_deref(),
        Some(me.id.as_str())
    );
    let rec = h.coordinator().store().client(&me.id).unwrap().unwrap();
    assert_eq!(rec.device_name, "kitchen-plug");
    assert_eq!(rec.cert_sha256, hearth_coordinator::pki::fingerprint(&der));
    assert!(rec.key_sha256.is_empty(), "no shared key over TLS");

    // A round: the update is recorded under the certificate's identity, once.
    let ch = tls_channel(&h, Some(&me)).await.unwrap();
    let round = AdminClient::new(anon.clone())
        .start_round(with_admin(
            StartRoundRequest {
                model: MODEL.into(),
                min_clients: 1,
                max_clients: 2,
                deadline_secs: 60,
                reason: "test".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    let (bytes, ..) = fetch_tls(&ch, 1).await.unwrap();
    let global = hearth_model::OnnxModel::from_bytes(&bytes)
        .unwrap()
        .weights();
    let payload = encode(&delta(&global, 0.3, 0.01), 8, 1);
    let up = |p: Vec<hearth_proto::v1::UpdateChunk>| {
        let ch = ch.clone();
        async move {
            FederationClient::new(ch)
                .upload_update(tokio_stream::iter(p))
                .await
                .map(|r| r.into_inner())
        }
    };
    let parts = framed(header(MODEL, round.round_id, 1, 10, &payload), &payload);
    let ack = up(parts.clone()).await.unwrap();
    assert!(ack.accepted && !ack.duplicate, "{ack:?}");
    assert!(h
        .coordinator()
        .store()
        .marker(round.round_id, &me.id)
        .unwrap()
        .is_some());
    let again = up(parts).await.unwrap();
    assert!(again.duplicate, "idempotent per certificate identity");
    h.shutdown().await.unwrap();
}

async fn fetch_tls(
    ch: &tonic::transport::Channel,
    version: u64,
) -> Result<(Vec<u8>, u64), tonic::Status> {
    let mut s = FederationClient::new(ch.clone())
        .fetch_model(FetchModelRequest {
            model: MODEL.into(),
            version,
            offset: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut total = 0;
    while let Some(c) = s.message().await? {
        total = c.total_size;
        out.extend_from_slice(&c.data);
    }
    Ok((out, total))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_calls_without_a_client_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let anon = tls_channel(&h, None).await.unwrap();
    let e = subscribe_code(&anon).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("no client certificate"), "{e:?}");
    let e = fetch_tls(&anon, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Not even the shared-key metadata of insecure mode opens a door.
    let forged = Creds {
        id: "c-anything".into(),
        key: "k".into(),
    };
    let e = fetch(&anon, &forged, MODEL, 1, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(h.coordinator().metrics().rejections("no_client_cert") >= 3);
    // Plaintext to the TLS port gets nowhere.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", h.local_addr()))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(subscribe_code(&plain).await.is_err());
    }
    h.shutdown().await.unwrap();
}

/// A certificate for `cn` signed by the CA key in `ca_key_pem` with certificate `ca_pem`
/// (or by a brand-new CA when `None`); returns (cert PEM, key PEM).
fn certificate(cn: &str, ca: Option<(&str, &str)>) -> (String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let issuer = match ca {
        Some((cert, key)) => {
            Issuer::from_ca_cert_pem(cert, KeyPair::from_pem(key).unwrap()).unwrap()
        }
        None => {
            let mut p = CertificateParams::default();
            p.distinguished_name
                .push(DnType::CommonName, "Hearth coordinator CA");
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            Issuer::new(p, KeyPair::generate().unwrap())
        }
    };
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_the_ca_did_not_issue_to_the_client_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let anon = tls_channel(&h, None).await.unwrap();
    let me = enroll_tls(&anon, "seeded-token-1", "hall").await.unwrap();
    // Another CA (same subject name) certifies the enrolled client id: refused by the
    // handshake or, at the latest, by the call.
    let (cert_pem, key_pem) = certificate(&me.id, None);
    let other = TlsCreds {
        id: me.id.clone(),
        cert_pem,
        key_pem,
    };
    match tls_channel(&h, Some(&other)).await {
        Err(_) => {}
        Ok(ch) => assert!(
            subscribe_code(&ch).await.is_err(),
            "another CA was accepted"
        ),
    }
    // The right CA, the right CN, but not the certificate issued at enrolment (e.g. a stolen
    // CA key used to mint a copy): refused by the fingerprint check.
    let ca_key = std::fs::read_to_string(dir.path().join("pki/ca.key")).unwrap();
    let (cert_pem, key_pem) = certificate(&me.id, Some((h.ca_pem().unwrap(), &ca_key)));
    let minted = TlsCreds {
        id: me.id.clone(),
        cert_pem,
        key_pem,
    };
    let ch = tls_channel(&h, Some(&minted)).await.unwrap();
    let e = subscribe_code(&ch).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("not enrolled"), "{e:?}");
    // The certificate issued at enrolment works.
    let ch = tls_channel(&h, Some(&me)).await.unwrap();
    subscribe_code(&ch).await.unwrap();
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_reused_and_other_device_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let anon = tls_channel(&h, None).await.unwrap();
    let short = token(&h, "porch", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = enroll_tls(&anon, &short, "porch").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");

    let t = token(&h, "porch", 0).await;
    let e = enroll_tls(&anon, &t, "garage").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("porch"), "{e:?}");
    enroll_tls(&anon, &t, "porch").await.unwrap();
    let e = enroll_tls(&anon, &t, "porch").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("already used"), "{e:?}");
    // Over TLS a CSR is required.
    let e = enroll(&anon, "seeded-token-1", "no-csr").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let m = h.coordinator().metrics();
    assert_eq!(m.rejections("token_expired"), 1);
    assert_eq!(m.rejections("token_device"), 1);
    assert_eq!(m.rejections("bad_token"), 1);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_refuses_the_next_call_and_ends_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let anon = tls_channel(&h, None).await.unwrap();
    let t = token(&h, "cam", 0).await;
    let me = enroll_tls(&anon, &t, "cam").await.unwrap();
    let bystander = enroll_tls(&anon, "seeded-token-1", "door").await.unwrap();
    let ch = tls_channel(&h, Some(&me)).await.unwrap();
    let mut stream = FederationClient::new(ch.clone())
        .subscribe(SubscribeRequest {
            models: vec![MODEL.into()],
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("current version");

    let revoked = AdminClient::new(anon.clone())
        .revoke_device(with_admin(
            RevokeDeviceRequest {
                device: "cam".into(),
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.client_ids, vec![me.id.clone()]);
    // The open stream ends promptly with PermissionDenied.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream of a revoked client ends within 5 s");
    let e = end.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The next call on the same connection is refused.
    let e = fetch_tls(&ch, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    assert!(h.coordinator().metrics().rejections("revoked") >= 1);
    // Others are untouched; an unknown device is NotFound.
    let other = tls_channel(&h, Some(&bystander)).await.unwrap();
    subscribe_code(&other).await.unwrap();
    let e = AdminClient::new(anon)
        .revoke_device(with_admin(
            RevokeDeviceRequest {
                device: "nobody".into(),
            },
            ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_admin_credential() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let anon = tls_channel(&h, None).await.unwrap();
    let me = enroll_tls(&anon, "seeded-token-1", "hall").await.unwrap();
    // Even with a valid client certificate, no admin credential means no admin call.
    let ch = tls_channel(&h, Some(&me)).await.unwrap();
    let mut admin = AdminClient::new(ch);
    let e = admin
        .create_enrollment_token(Request::new(CreateTokenRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = admin
        .revoke_device(with_admin(
            RevokeDeviceRequest {
                device: "hall".into(),
            },
            "wrong-admin-token-0123456789",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = admin
        .start_round(Request::new(StartRoundRequest {
            model: MODEL.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(h.coordinator().metrics().rejections("no_credentials") >= 2);
    assert!(h.coordinator().metrics().rejections("bad_credentials") >= 1);
    assert!(!h.coordinator().is_revoked(&me.id));
    h.shutdown().await.unwrap();
}
