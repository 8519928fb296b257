//! The `[limits]` over real gRPC: oversized messages are refused (and counted), the
//! connection cap holds (the N+1th connection waits while N are open and proceeds when one
//! closes), and one connection runs at most `max_streams_per_connection` calls at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hearth_coordinator::{start, Config, ModelConfig};
use hearth_proto::v1::{
    enrollment_client::EnrollmentClient, federation_client::FederationClient, update_chunk,
    EnrollRequest, UpdateChunk,
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
