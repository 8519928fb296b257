//! End-to-end tests of the coordinator over real gRPC on 127.0.0.1, each on both storage
//! backends (a temporary sled database, a PostgreSQL cluster of its own): enrollment, chunked and resumed model fetch, a full FedAvg round with real encoded
//! updates, refusals, deadlines, and a crash mid-round followed by a restart (in process, by
//! dropping the server's runtime; `crash.rs` kills the real binary).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use hearth_coordinator::{start, Config, Downlink, ModelConfig};
use hearth_model::{OnnxModel, Tensor};
use hearth_proto::v1::{
    admin_client::AdminClient, federation_client::FederationClient, federation_event, update_chunk,
    CreateTokenRequest, ListVersionsRequest, RoundState, StartRoundRequest, SubscribeRequest,
    UpdateChunk,
};
use hearth_proto::CHUNK_SIZE;
use sha2::{Digest, Sha256};
use tonic::{Code, Request};

const TOKENS: [&str; 4] = [
    "enroll-token-1",
    "enroll-token-2",
    "enroll-token-3",
    "enroll-token-4",
];

fn config(db: &Path) -> Config {
    let mut c = Config {
        db_path: db.to_path_buf(),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: TOKENS.iter().map(|t| t.to_string()).collect(),
        max_update_bytes: 256 * 1024,
        metrics_listen: "127.0.0.1:0".into(),
        models: vec![
            ModelConfig {
                name: "digits".into(),
                task: "digits".into(),
                init: None,
                eval: true,
                seed: 7,
            },
            ModelConfig {
                name: "faces".into(),
                task: "faces".into(),
                init: None,
                eval: false,
                seed: 3,
            },
        ],
        // The exact aggregate is published (the compressed downlink, which publishes its
        // 8-bit reconstruction, has tests/downlink.rs).
        downlink: Downlink {
            bits: 0,
            ..Downlink::default()
        },
        ..Config::default()
    };
    c.round.deadline_secs = 300;
    c
}

/// `GET /metrics` over a plain HTTP/1.0 connection; the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("metrics answered in time")
        .unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

on_both_backends! {
    async fn enroll_fetch_round_publish_and_refusals(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(b.configure(config(&dir.path().join("db"))), listener().await)
        .await
        .unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();

    // Enrollment: tokens are one-time.
    let a = tls.enroll(TOKENS[0], "kitchen-plug").await.unwrap();
    let b = tls.enroll(TOKENS[1], "hall-plug").await.unwrap();
    let c = tls.enroll(TOKENS[2], "garage-plug").await.unwrap();
    assert_ne!(a.id, b.id);
    let reuse = tls.enroll(TOKENS[0], "again").await.unwrap_err();
    assert_eq!(reuse.code(), Code::PermissionDenied);
    // A token minted by the admin works once.
    let minted = AdminClient::new(ch.clone())
        .create_enrollment_token(with_admin(
            CreateTokenRequest {
                uses: 1,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    tls.enroll(&minted, "extra").await.unwrap();
    assert_eq!(
        tls.enroll(&minted, "extra").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Admin auth.
    let mut admin = AdminClient::new(ch.clone());
    let bad = admin
        .list_versions(with_admin(
            ListVersionsRequest {
                model: "digits".into(),
            },
            "wrong-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);
    let none = admin
        .start_round(Request::new(StartRoundRequest {
            model: "digits".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    // Client auth.
    // Without its certificate, a client's id and key of insecure mode open no door.
    let forged = Creds {
        id: a.id.clone(),
        key: "0".repeat(64),
        tls: None,
    };
    assert_eq!(
        fetch(&ch, &forged, "digits", 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Version 1 exists and was evaluated.
    let v = versions(&ch, "digits").await.unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].version, 1);
    assert!(
        (0.0..=1.0).contains(&v[0].eval_accuracy),
        "{}",
        v[0].eval_accuracy
    );

    // Fetch in chunks, then resume from an offset; checksums verified.
    let (faces, sha, total, chunks) = fetch(&ch, &a, "faces", 0, 0).await.unwrap();
    assert_eq!(faces.len() as u64, total);
    assert_eq!(hex::encode(Sha256::digest(&faces)), sha);
    assert_eq!(chunks, faces.len().div_ceil(CHUNK_SIZE));
    assert!(chunks >= 2, "faces model is larger than one chunk");
    let off = total / 2 + 17;
    let (tail, sha2, total2, _) = fetch(&ch, &a, "faces", 1, off).await.unwrap();
    assert_eq!((sha2, total2), (sha.clone(), total));
    assert_eq!(&faces[off as usize..], &tail[..]);
    let (end, _, _, n_end) = fetch(&ch, &a, "faces", 1, total).await.unwrap();
    assert!(end.is_empty() && n_end == 1);
    assert_eq!(
        fetch(&ch, &a, "faces", 1, total + 1)
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    assert_eq!(
        fetch(&ch, &a, "faces", 9, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    OnnxModel::from_bytes(&faces).unwrap();

    let (digits, _, _, _) = fetch(&ch, &a, "digits", 0, 0).await.unwrap();
    let global = OnnxModel::from_bytes(&digits).unwrap().weights();
    let params: usize = global.values().map(|t| t.data.len()).sum();

    // Subscribe: current version first.
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
    match next_event(&mut sub).await {
        federation_event::Event::Published(p) => {
            assert_eq!((p.model.as_str(), p.version), ("digits", 1));
            assert_eq!(p.sha256, hex::encode(Sha256::digest(&digits)));
        }
        e => panic!("expected the current version first, got {e:?}"),
    }

    // Subscribe also accepts the admin token, and refuses anything else.
    let mut admin_sub = FederationClient::new(ch.clone())
        .subscribe(with_admin(SubscribeRequest { models: vec![] }, ADMIN))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..2 {
        match next_event(&mut admin_sub).await {
            federation_event::Event::Published(p) => seen.push((p.model, p.version)),
            e => panic!("expected versions first, got {e:?}"),
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![("digits".to_string(), 1), ("faces".to_string(), 1)]
    );
    drop(admin_sub);
    let e = FederationClient::new(ch.clone())
        .subscribe(with_admin(
            SubscribeRequest { models: vec![] },
            "not-the-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = FederationClient::new(a.channel(&ch))
        .subscribe(with_client(
            SubscribeRequest {
                models: vec!["nope".into()],
            },
            &a,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Start a round; a second StartRound returns the same round.
    let r = start_round(&ch, "digits", 2, 2, 300).await;
    assert_eq!(r.state, RoundState::Open as i32);
    assert_eq!(r.base_version, 1);
    assert_eq!(r.model_fp32_bytes, 4 * params as u64);
    let again = start_round(&ch, "digits", 3, 5, 300).await;
    assert_eq!(again.round_id, r.round_id);
    assert_eq!((again.min_clients, again.max_clients), (2, 2));
    match next_event(&mut sub).await {
        federation_event::Event::Round(t) => {
            assert_eq!((t.round_id, t.base_version), (r.round_id, 1));
            assert!(t.deadline_unix_ms > 0 && t.local_epochs > 0);
        }
        e => panic!("expected the round task, got {e:?}"),
    }

    let id = r.round_id;
    let d1 = delta(&global, 0.1, 0.02);
    let d2 = delta(&global, 2.3, 0.01);
    let p1 = encode(&d1, 8, 1);
    let p2 = encode(&d2, 8, 2);

    // Refusals: none of these count.
    let junk = vec![0xabu8; 300];
    let ack = upload(&ch, &a, "digits", id, 1, 10, &junk).await.unwrap();
    assert!(
        !ack.accepted && ack.reason.contains("undecodable"),
        "{ack:?}"
    );
    let mut wrong = delta(&global, 0.5, 0.01);
    let (k, t) = wrong
        .iter()
        .next()
        .map(|(k, t)| (k.clone(), t.clone()))
        .unwrap();
    wrong.insert(
        k,
        Tensor::new(vec![t.data.len() + 1], vec![0.01; t.data.len() + 1]),
    );
    let ack = upload(&ch, &a, "digits", id, 1, 10, &encode(&wrong, 8, 3))
        .await
        .unwrap();
    assert!(!ack.accepted && ack.reason.contains("shape"), "{ack:?}");
    // NaN: a raw f32 update with one value patched to NaN.
    let mut marked = delta(&global, 0.7, 0.01);
    marked.values_mut().next().unwrap().data[0] = 1234.5;
    let mut nan = encode(&marked, 32, 4);
    let pos = nan
        .windows(4)
        .position(|w| w == 1234.5f32.to_le_bytes())
        .unwrap();
    nan[pos..pos + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let ack = upload(&ch, &a, "digits", id, 1, 10, &nan).await.unwrap();
    assert!(
        !ack.accepted && ack.reason.contains("non-finite"),
        "{ack:?}"
    );
    let huge = encode(&delta(&global, 0.1, 5.0), 32, 5);
    let ack = upload(&ch, &a, "digits", id, 1, 10, &huge).await.unwrap();
    assert!(!ack.accepted && ack.reason.contains("norm"), "{ack:?}");
    let ack = upload(&ch, &a, "digits", id, 2, 10, &p1).await.unwrap();
    assert!(!ack.accepted && ack.reason.contains("base"), "{ack:?}");
    let ack = upload(&ch, &a, "digits", id, 1, 0, &p1).await.unwrap();
    assert!(!ack.accepted, "{ack:?}");
    // Each refusal above was counted, and a Prometheus scraper reads the count over HTTP.
    let m = server.coordinator().metrics();
    let refused = m.rejections("invalid_update");
    assert_eq!(
        (
            m.rejections("undecodable"),
            refused,
            m.rejections("norm_bound")
        ),
        (2, 1, 1),
        "junk and the wrong shape do not decode, NaN is invalid, one is above the hard bound"
    );
    assert_eq!(server.coordinator().metrics().rejections("wrong_base"), 1);
    assert_eq!(server.coordinator().metrics().rejections("zero_samples"), 1);
    let text = scrape(server.metrics_addr().expect("metrics_listen is set")).await;
    assert!(
        text.contains(&format!(
            "hearth_coordinator_rejections_total{{call=\"upload\",reason=\"invalid_update\"}} {refused}"
        )),
        "{text}"
    );
    // Oversized (declared over the limit), lying about the size, bad checksum, no header.
    let big = vec![1u8; 256 * 1024 + 1];
    let e = upload(&ch, &a, "digits", id, 1, 10, &big)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let mut h = header("digits", id, 1, 10, &p1);
    h.payload_size -= 1;
    let e = upload_raw(&ch, &a, framed(h, &p1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut h = header("digits", id, 1, 10, &p1);
    h.payload_sha256 = "00".repeat(32);
    let e = upload_raw(&ch, &a, framed(h, &p1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut parts = framed(header("digits", id, 1, 10, &p1), &p1);
    parts.remove(0);
    let e = upload_raw(&ch, &a, parts).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        upload(&ch, &forged, "digits", id, 1, 10, &p1)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let s = status(&ch, "digits", id).await;
    assert_eq!(
        (s.updates, s.uplink_bytes, s.state),
        (0, 0, RoundState::Open as i32)
    );

    // Two real updates; a duplicate is acknowledged but not counted.
    let ack = upload(&ch, &a, "digits", id, 1, 30, &p1).await.unwrap();
    assert!(
        ack.accepted && !ack.duplicate && ack.updates_in_round == 1,
        "{ack:?}"
    );
    let ack = upload(&ch, &a, "digits", id, 1, 30, &p1).await.unwrap();
    assert!(
        ack.accepted && ack.duplicate && ack.updates_in_round == 1,
        "{ack:?}"
    );
    let ack = upload(&ch, &b, "digits", id, 1, 10, &p2).await.unwrap();
    assert!(
        ack.accepted && !ack.duplicate && ack.updates_in_round == 2,
        "{ack:?}"
    );

    // Version 2 is published to subscribers.
    match next_event(&mut sub).await {
        federation_event::Event::Published(p) => assert_eq!(p.version, 2),
        e => panic!("expected version 2, got {e:?}"),
    }
    let s = wait_state(&ch, "digits", id, RoundState::Completed).await;
    assert_eq!((s.new_version, s.updates), (2, 2));
    assert_eq!(s.uplink_bytes, (p1.len() + p2.len()) as u64);
    assert!(
        s.uplink_bytes < s.model_fp32_bytes * 2 / 3,
        "8-bit updates are smaller than fp32"
    );
    assert!((0.0..=1.0).contains(&s.eval_accuracy), "{s:?}");
    let latest = status(&ch, "digits", 0).await;
    assert_eq!(latest.round_id, id);

    // The new weights are the FedAvg of what was uploaded.
    let (v2, sha_v2, _, _) = fetch(&ch, &c, "digits", 2, 0).await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&v2)), sha_v2);
    let got = OnnxModel::from_bytes(&v2).unwrap().weights();
    let want = fedavg(&global, &[(&p1, 30), (&p2, 10)]);
    assert!(
        max_abs_diff(&got, &want) < 1e-5,
        "{}",
        max_abs_diff(&got, &want)
    );
    // ... and within quantization tolerance of the exact weighted mean of the deltas.
    let mut exact = global.clone();
    hearth_model::axpy(&mut exact, 0.75, &d1).unwrap();
    hearth_model::axpy(&mut exact, 0.25, &d2).unwrap();
    let q = max_abs_diff(&got, &exact);
    assert!(q < 0.02 / 127.0 * 1.01 && q > 0.0, "quantization error {q}");

    // After completion: late uploads are refused, repeats still recognised.
    let ack = upload(&ch, &c, "digits", id, 1, 5, &p2).await.unwrap();
    assert!(!ack.accepted && ack.reason.contains("not open"), "{ack:?}");
    let ack = upload(&ch, &b, "digits", id, 1, 10, &p2).await.unwrap();
    assert!(ack.duplicate, "{ack:?}");

    let v = versions(&ch, "digits").await.unwrap();
    assert_eq!(v.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(v[1].from_round, id);
    assert_eq!(v[1].sha256, sha_v2);

    // A new round starts from version 2.
    let r2 = start_round(&ch, "digits", 1, 1, 300).await;
    assert!(r2.round_id > id);
    assert_eq!(r2.base_version, 2);
    drop(sub);
    server.shutdown().await.unwrap();
    }
}

on_both_backends! {
    async fn deadline_fails_or_completes_the_round(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let h = start(b.configure(config(&dir.path().join("db"))), listener().await)
        .await
        .unwrap();
    let tls = Tls::connect(&h).await;
    let ch = tls.ch.clone();
    let a = tls.enroll(TOKENS[0], "a").await.unwrap();

    // Too few updates at the deadline: FAILED, no new version.
    let r = start_round(&ch, "digits", 2, 3, 1).await;
    let (bytes, _, _, _) = fetch(&ch, &a, "digits", 0, 0).await.unwrap();
    let global = OnnxModel::from_bytes(&bytes).unwrap().weights();
    let p = encode(&delta(&global, 1.0, 0.01), 8, 9);
    assert!(
        upload(&ch, &a, "digits", r.round_id, 1, 5, &p)
            .await
            .unwrap()
            .accepted
    );
    let s = wait_state(&ch, "digits", r.round_id, RoundState::Failed).await;
    assert!(s.detail.contains("deadline"), "{s:?}");
    assert_eq!(s.new_version, 0);

    // Enough updates at the deadline: COMPLETED with version 2.
    let r = start_round(&ch, "faces", 1, 3, 1).await;
    let (bytes, _, _, _) = fetch(&ch, &a, "faces", 0, 0).await.unwrap();
    let global = OnnxModel::from_bytes(&bytes).unwrap().weights();
    let p = encode(&delta(&global, 1.0, 0.005), 8, 10);
    assert!(
        upload(&ch, &a, "faces", r.round_id, 1, 5, &p)
            .await
            .unwrap()
            .accepted
    );
    let s = wait_state(&ch, "faces", r.round_id, RoundState::Completed).await;
    assert_eq!(s.new_version, 2);
    assert_eq!(s.eval_accuracy, -1.0, "faces has eval off");
    h.shutdown().await.unwrap();
    }
}

/// Runs a coordinator on its own runtime in a thread; dropping that runtime kills every task
/// at once, like a crash (no graceful shutdown, no final flush by the server).
fn crashable(
    cfg: Config,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
    let t = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = listener().await;
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            tokio::select! {
                r = hearth_coordinator::run(cfg, l, std::future::pending()) => panic!("server ended: {r:?}"),
                _ = crash_rx => {}
            }
        });
        rt.shutdown_timeout(Duration::from_secs(5));
    });
    (addr_rx.recv().unwrap(), crash_tx, t)
}

on_both_backends! {
    async fn crash_mid_round_resumes_with_accepted_update(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let (addr, crash, thread) = crashable(backend.configure(config(&db)));
    let tls = tls_when_ready(addr, &dir.path().join("pki")).await;
    let ch = tls.ch.clone();
    let a = tls.enroll(TOKENS[0], "a").await.unwrap();
    let b = tls.enroll(TOKENS[1], "b").await.unwrap();
    let r = start_round(&ch, "digits", 2, 2, 300).await;
    let (bytes, _, _, _) = fetch(&ch, &a, "digits", 0, 0).await.unwrap();
    let global = OnnxModel::from_bytes(&bytes).unwrap().weights();
    let p1 = encode(&delta(&global, 0.3, 0.02), 8, 11);
    let p2 = encode(&delta(&global, 1.9, 0.02), 8, 12);
    let ack = upload(&ch, &a, "digits", r.round_id, 1, 12, &p1)
        .await
        .unwrap();
    assert!(ack.accepted && ack.updates_in_round == 1);

    crash.send(()).unwrap();
    thread.join().unwrap();
    drop(ch);

    // Restart on the same database: the round is still open with its update.
    let h = start(backend.configure(config(&db)), listener().await).await.unwrap();
    let tls = Tls::connect(&h).await;
    let ch = tls.ch.clone();
    // The same CA after the restart: the clients' certificates still work.
    let (a, b) = (tls.rebind(&a).await, tls.rebind(&b).await);
    let s = status(&ch, "digits", r.round_id).await;
    assert_eq!((s.state, s.updates), (RoundState::Open as i32, 1));
    assert_eq!(s.uplink_bytes, p1.len() as u64);
    // Enrollment survived; the used token did not come back.
    assert_eq!(
        tls.enroll(TOKENS[0], "x").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let ack = upload(&ch, &a, "digits", r.round_id, 1, 12, &p1)
        .await
        .unwrap();
    assert!(ack.duplicate && ack.updates_in_round == 1, "{ack:?}");
    let ack = upload(&ch, &b, "digits", r.round_id, 1, 4, &p2)
        .await
        .unwrap();
    assert!(ack.accepted && ack.updates_in_round == 2, "{ack:?}");
    let s = wait_state(&ch, "digits", r.round_id, RoundState::Completed).await;
    assert_eq!(s.new_version, 2);
    let (v2, _, _, _) = fetch(&ch, &a, "digits", 2, 0).await.unwrap();
    let got = OnnxModel::from_bytes(&v2).unwrap().weights();
    let want = fedavg(&global, &[(&p1, 12), (&p2, 4)]);
    assert!(
        max_abs_diff(&got, &want) < 1e-5,
        "{}",
        max_abs_diff(&got, &want)
    );
    h.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("db"));
    cfg.upload_timeout_secs = 1;
    let h = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&h).await;
    let ch = tls.ch.clone();
    let a = tls.enroll(TOKENS[0], "a").await.unwrap();
    let r = start_round(&ch, "digits", 1, 1, 300).await;
    // Header, one chunk of a 100-byte payload, then silence (the sender stays open).
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let payload = [7u8; 100];
    tx.send(UpdateChunk {
        part: Some(update_chunk::Part::Header(header(
            "digits", r.round_id, 1, 5, &payload,
        ))),
    })
    .await
    .unwrap();
    tx.send(UpdateChunk {
        part: Some(update_chunk::Part::Data(payload[..10].to_vec())),
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut fed = FederationClient::new(a.channel(&ch));
    let call = fed.upload_update(with_client(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        &a,
    ));
    let e = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the stalled upload was not cut")
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Logged and counted.
    assert_eq!(h.coordinator().metrics().rejections("timeout"), 1);
    drop(tx);
    assert_eq!(status(&ch, "digits", r.round_id).await.updates, 0);
    h.shutdown().await.unwrap();
}
