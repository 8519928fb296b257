//! The `[limits]` over real gRPC: oversized messages are refused (and counted), the
//! connection cap holds (the N+1th connection waits while N are open and proceeds when one
//! closes), one connection runs at most `max_streams_per_connection` calls at once, a
//! unary call whose request never arrives is cut at `call_timeout_secs`, and a peer that
//! never finishes its TLS handshake is dropped at `handshake_timeout_secs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hearth_coordinator::{start, Config, ModelConfig};
use hearth_proto::v1::{
    enrollment_client::EnrollmentClient, federation_client::FederationClient, update_chunk,
    EnrollRequest, EnrollResponse, UpdateChunk,
};
use tonic::Code;

fn config(db: &std::path::Path) -> Config {
    Config {
        db_path: db.to_path_buf(),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec!["enroll-token-1".into(), "enroll-token-2".into()],
        models: vec![ModelConfig {
            name: "digits".into(),
            task: "digits".into(),
            init: None,
            eval: false,
            seed: 7,
        }],
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("db"));
    cfg.limits.max_message_bytes = 256 * 1024;
    let h = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&h).await;
    let ch = tls.ch.clone();
    // A unary call: a 300 KiB device name.
    let e = EnrollmentClient::new(ch.clone())
        .enroll(EnrollRequest {
            token: "enroll-token-1".into(),
            device_name: "x".repeat(300 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    // A streamed upload whose one chunk is over the limit.
    let a = tls.enroll("enroll-token-2", "a").await.unwrap();
    let payload = vec![1u8; 300 * 1024];
    let e = upload_raw(
        &ch,
        &a,
        vec![
            UpdateChunk {
                part: Some(update_chunk::Part::Header(header(
                    "digits", 1, 1, 5, &payload,
                ))),
            },
            UpdateChunk {
                part: Some(update_chunk::Part::Data(payload.clone())),
            },
        ],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    let m = h.coordinator().metrics();
    assert_eq!(m.rejections("message_too_large"), 2, "{}", m.render());
    // The server still answers normal calls afterwards.
    versions(&ch, "digits").await.unwrap();
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_holds_newcomers_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("db"));
    cfg.limits.max_connections = 2;
    let h = start(cfg, listener().await).await.unwrap();
    let addr = h.local_addr();
    // Two connections take both slots (a raw TCP connection is accepted and held by the
    // server's HTTP/2 handshake).
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The third connects at TCP level (kernel backlog) but is not served.
    let ch = hearth_coordinator::client::endpoint(&h.endpoint(), h.ca_pem(), None)
        .unwrap()
        .connect_lazy();
    let blocked = tokio::time::timeout(Duration::from_millis(1500), versions(&ch, "digits")).await;
    assert!(
        blocked.is_err(),
        "a third connection was served: {blocked:?}"
    );
    assert!(h.coordinator().metrics().rejections("connection_cap") >= 1);
    // One closes: the waiting connection is accepted and its call answered.
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(10), versions(&ch, "digits"))
        .await
        .expect("served once a slot is free");
    served.unwrap();
    drop(second);
    drop(ch);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("db"));
    cfg.limits.max_streams_per_connection = 1;
    cfg.upload_timeout_secs = 2;
    let h = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&h).await;
    let a = tls.enroll("enroll-token-1", "a").await.unwrap();
    // Both calls below go on a's own connection (one stream allowed).
    let ch = a.channel(&tls.ch);
    // A stalled upload holds the connection's only stream until its timeout cuts it.
    let (tx, rx) = tokio::sync::mpsc::channel::<UpdateChunk>(1);
    let payload = [7u8; 100];
    tx.send(UpdateChunk {
        part: Some(update_chunk::Part::Header(header(
            "digits", 1, 1, 5, &payload,
        ))),
    })
    .await
    .unwrap();
    let mut fed = FederationClient::new(ch.clone());
    let stalled = tokio::spawn(async move {
        fed.upload_update(with_client(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &a,
        ))
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), versions(&ch, "digits"))
        .await
        .expect("answered once the stream is free")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1200),
        "the second call ran beside the first: {waited:?}"
    );
    let e = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("the stalled upload was not cut")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    drop(tx);
    h.shutdown().await.unwrap();
}

/// A unary call whose request never arrives (the client sends the call's headers and then
/// holds its body open: a slow-loris caller) is cut at `call_timeout_secs` by the call-time
/// layer (`limits::CallTimeoutLayer`), not at the upload limit, and is logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_unary_call_is_cut_at_the_call_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("db"));
    cfg.limits.call_timeout_secs = 1;
    cfg.upload_timeout_secs = 120;
    let h = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&h).await;
    // `Enroll` is unary; sent as a client stream that never yields its one message, the
    // server waits for the request body.
    let mut grpc = tonic::client::Grpc::new(tls.ch.clone());
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<EnrollRequest>(1);
    let started = Instant::now();
    let call = grpc.client_streaming(
        tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        http::uri::PathAndQuery::from_static("/hearth.v1.Enrollment/Enroll"),
        tonic_prost::ProstCodec::<EnrollRequest, EnrollResponse>::default(),
    );
    let e = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the stalled call was not cut")
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(took < Duration::from_secs(5), "cut only after {took:?}");
    let m = h.coordinator().metrics();
    assert_eq!(m.rejections("timeout"), 1, "{}", m.render());
    assert!(
        m.render()
            .contains("hearth_coordinator_rejections_total{call=\"enroll\",reason=\"timeout\"} 1"),
        "{}",
        m.render()
    );
    drop(tx);
    // The connection serves the next call.
    versions(&tls.ch, "digits").await.unwrap();
    h.shutdown().await.unwrap();
}

/// A peer that opens a TCP connection and never sends its TLS ClientHello holds a connection
/// slot only until `handshake_timeout_secs`: the coordinator closes it, counts it
/// (`call="connect", reason="handshake_timeout"`), and the slot serves a real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_finishes_its_tls_handshake_is_dropped_and_counted() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("db"));
    cfg.limits.handshake_timeout_secs = 1;
    // The silent peer takes the only slot.
    cfg.limits.max_connections = 1;
    let h = start(cfg, listener().await).await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(h.local_addr())
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the silent peer's connection is still open");
    let took = started.elapsed();
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered: {n:?}");
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    let m = h.coordinator().metrics();
    assert!(
        m.render().contains(
            "hearth_coordinator_rejections_total{call=\"connect\",reason=\"handshake_timeout\"} 1"
        ),
        "{}",
        m.render()
    );
    // The freed slot serves a real client (the silent socket is still held on our side).
    let tls = tokio::time::timeout(Duration::from_secs(10), Tls::connect(&h))
        .await
        .expect("the slot was freed");
    versions(&tls.ch, "digits").await.unwrap();
    drop(silent);
    h.shutdown().await.unwrap();
}
