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
            have_version: 0,
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
        tls: None,
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

/// `insecure = true` (local demos only): plaintext, enrolment without a CSR hands out a
/// shared key, and that key (not a certificate) authenticates the client's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_is_plaintext_with_shared_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.insecure = true;
    let h = start(cfg, listener().await).await.unwrap();
    assert!(h.endpoint().starts_with("http://"), "{}", h.endpoint());
    assert!(h.ca_pem().is_none());
    assert!(!dir.path().join("pki").exists(), "no CA in insecure mode");
    let ch = channel(h.local_addr()).await;
    let me = enroll(&ch, "seeded-token-1", "hall").await.unwrap();
    assert!(me.key.len() >= 32, "a shared key is handed out");
    let (bytes, ..) = fetch(&ch, &me, MODEL, 1, 0).await.unwrap();
    assert!(!bytes.is_empty());
    let wrong = Creds {
        key: "0".repeat(64),
        ..me.clone()
    };
    let e = fetch(&ch, &wrong, MODEL, 1, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(h.coordinator().metrics().rejections("bad_credentials") >= 1);
    // A TLS client gets nowhere on the plaintext port.
    let ca = rcgen::CertificateParams::default()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let https = format!("https://{}", h.local_addr());
    assert!(hearth_coordinator::client::connect(&https, Some(&ca), None)
        .await
        .is_err());
    h.shutdown().await.unwrap();
}

/// A client certificate from the coordinator's CA with the given validity (CN `cn`).
fn issued(
    dir: &std::path::Path,
    h: &CoordinatorHandle,
    cn: &str,
    not_after: (i32, u8, u8),
) -> (String, String) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key = std::fs::read_to_string(dir.join("pki/ca.key")).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(h.ca_pem().unwrap(), KeyPair::from_pem(&ca_key).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    (
        p.signed_by(&key, &issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

/// Records `cert_pem` as the certificate enrolled for `id` (as `Enroll` would have).
fn enrol_in_store(h: &CoordinatorHandle, id: &str, cert_pem: &str) {
    let store = h.coordinator().store();
    let token = format!("token-for-{id}");
    store.seed_token(&token, 1).unwrap();
    let der = hearth_coordinator::pki::pem_to_der(cert_pem).unwrap();
    store
        .enroll(
            &token,
            &hearth_coordinator::store::ClientRecord {
                client_id: id.into(),
                device_name: id.into(),
                key_sha256: String::new(),
                enrolled_unix_ms: hearth_coordinator::store::now_unix_ms(),
                cert_sha256: hearth_coordinator::pki::fingerprint(&der),
                revoked_unix_ms: None,
            },
        )
        .unwrap();
}

/// An expired client certificate is refused at the handshake, logged and counted
/// (`cert_expired`), even though it is the very certificate enrolled for the client; the
/// same client with a certificate that differs only in its end date is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let h = server(dir.path()).await;
    let (old_cert, old_key) = issued(dir.path(), &h, "c-expired", (2021, 1, 1));
    enrol_in_store(&h, "c-expired", &old_cert);
    let (cert, key) = issued(dir.path(), &h, "c-current", (2099, 1, 1));
    enrol_in_store(&h, "c-current", &cert);
    let expired = TlsCreds {
        id: "c-expired".into(),
        cert_pem: old_cert,
        key_pem: old_key,
    };
    let current = TlsCreds {
        id: "c-current".into(),
        cert_pem: cert,
        key_pem: key,
    };
    // TLS 1.3: the server checks the client certificate after the client has finished its
    // side, so the refusal shows at connect or at the first call.
    let refused = match tls_channel(&h, Some(&expired)).await {
        Err(_) => true,
        Ok(ch) => subscribe_code(&ch).await.is_err(),
    };
    assert!(refused, "an expired certificate was served");
    let m = h.coordinator().metrics();
    for _ in 0..100 {
        if m.rejections("cert_expired") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (at least once: the channel may retry the handshake)
    let expired_count = m.rejections("cert_expired");
    assert!(expired_count >= 1, "{}", m.render());
    assert_eq!(m.rejections("not_enrolled"), 0, "refused for its date only");
    let ch = tls_channel(&h, Some(&current)).await.unwrap();
    subscribe_code(&ch).await.unwrap();
    assert_eq!(
        m.rejections("bad_cert"),
        0,
        "the current certificate is fine"
    );
    h.shutdown().await.unwrap();
}

/// Guessing the admin token is rate limited per peer: past the burst, refused attempts get
/// ResourceExhausted (counted as `rate_limited`), whatever token they try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guesses_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rate_limit.calls_per_minute = 6;
    cfg.rate_limit.burst = 3;
    let h = start(cfg, listener().await).await.unwrap();
    let anon = tls_channel(&h, None).await.unwrap();
    let mut codes = Vec::new();
    for i in 0..6 {
        let e = AdminClient::new(anon.clone())
            .revoke_device(with_admin(
                RevokeDeviceRequest {
                    device: "hall".into(),
                },
                &format!("guess-{i}-0123456789abcdef"),
            ))
            .await
            .unwrap_err();
        codes.push(e.code());
    }
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ]
    );
    let m = h.coordinator().metrics();
    assert_eq!(m.rejections("rate_limited"), 3, "{}", m.render());
    assert!(m.render().contains(
        "hearth_coordinator_rejections_total{call=\"revoke\",reason=\"rate_limited\"} 3"
    ));
    h.shutdown().await.unwrap();
}
