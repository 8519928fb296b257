//! Peers that stop answering, on real sockets over TLS: a client behind a TCP relay that
//! freezes (neither forwards nor reads, yet keeps both sockets open, like a device that lost
//! power behind a NAT) has its connections closed by the HTTP/2 keepalive within the
//! configured bound, freeing their connection slots; a download whose client stops reading
//! is cut at `fetch_timeout_secs`, ends with `DeadlineExceeded` (not as if it were complete),
//! frees its stream, and is counted.
#![cfg(unix)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hearth_coordinator::{start, Config, CoordinatorHandle, ModelConfig};
use hearth_proto::v1::{federation_client::FederationClient, FetchModelRequest, SubscribeRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const TOKEN: &str = "dead-peer-token-1";

fn config(dir: &std::path::Path, model: ModelConfig) -> Config {
    Config {
        db_path: dir.join("db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec![TOKEN.into()],
        models: vec![model],
        ..Config::default()
    }
}

fn digits() -> ModelConfig {
    ModelConfig {
        name: "digits".into(),
        task: "digits".into(),
        init: None,
        eval: false,
        seed: 7,
    }
}

/// A TCP relay from a loopback port to `upstream`. Once frozen it stops moving bytes in
/// both directions but holds every socket open (no FIN, no RST).
struct Relay {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` → `to` until frozen (then parks, holding both halves) or closed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..1_000_000 {
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => 0,
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Dead: keep the sockets, move nothing.
            std::future::pending::<()>().await;
        }
        if n > 0 && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    async fn to(upstream: std::net::SocketAddr) -> Relay {
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        let task = tokio::spawn(async move {
            let mut pumps = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let Ok((client, _)) = l.accept().await else {
                    return;
                };
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                pumps.spawn(pump(cr, sw, f.clone()));
                pumps.spawn(pump(sr, cw, f.clone()));
            }
            std::future::pending::<()>().await;
        });
        Relay { addr, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Connections open at the coordinator (accepted minus closed).
fn open_connections(h: &CoordinatorHandle) -> u64 {
    let m = h.coordinator().metrics();
    m.total("hearth_coordinator_connections_accepted_total")
        - m.total("hearth_coordinator_connections_closed_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_the_connections_of_a_dead_peer_and_frees_their_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), digits());
    cfg.limits.keepalive_interval_secs = 1;
    cfg.limits.keepalive_timeout_secs = 1;
    // Exactly the two connections of the client behind the relay.
    cfg.limits.max_connections = 2;
    let h = start(cfg, listener().await).await.unwrap();
    let relay = Relay::to(h.local_addr()).await;
    let via = Tls::to(&format!("https://{}", relay.addr), h.ca_pem().unwrap())
        .await
        .unwrap();
    let me = via.enroll(TOKEN, "porch-cam").await.unwrap();
    let mut sub = FederationClient::new(me.channel(&via.ch))
        .subscribe(SubscribeRequest {
            models: vec!["digits".into()],
        })
        .await
        .unwrap()
        .into_inner();
    next_event(&mut sub).await;
    assert_eq!(open_connections(&h), 2);
    // Both slots are taken: a newcomer is not served.
    let endpoint = h.endpoint();
    let direct = Tls::to(&endpoint, h.ca_pem().unwrap());
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), direct)
            .await
            .is_err(),
        "a third connection was served while two were open"
    );
    assert!(h.coordinator().metrics().rejections("connection_cap") >= 1);

    relay.freeze();
    let frozen_at = Instant::now();
    // Pings every second, each answered within a second or the connection is closed.
    for _ in 0..200 {
        if open_connections(&h) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = frozen_at.elapsed();
    assert_eq!(
        open_connections(&h),
        0,
        "the dead peer's connections are still open after {took:?}"
    );
    assert!(took < Duration::from_secs(6), "closed only after {took:?}");
    // The freed slots serve others: the subscription of a live client works.
    let direct = Tls::to(&h.endpoint(), h.ca_pem().unwrap()).await.unwrap();
    let again = direct.rebind(&me).await;
    let mut sub = FederationClient::new(again.channel(&direct.ch))
        .subscribe(SubscribeRequest {
            models: vec!["digits".into()],
        })
        .await
        .unwrap()
        .into_inner();
    next_event(&mut sub).await;
    drop(relay);
    h.shutdown().await.unwrap();
}

/// A task file like `faces` with a wide hidden layer: a model of ~2.5 MB (~40 chunks), far
/// more than the HTTP/2 windows and the server's queue hold.
fn big_model(dir: &std::path::Path) -> ModelConfig {
    let faces = data_dir().join("faces");
    let task = std::fs::read_to_string(faces.join("task.toml"))
        .unwrap()
        .replace("hidden = [32]", "hidden = [1024]");
    assert!(task.contains("hidden = [1024]"));
    let at = dir.join("bigfaces");
    std::fs::create_dir_all(&at).unwrap();
    std::fs::write(at.join("task.toml"), task).unwrap();
    for f in ["train.csv", "test.csv"] {
        std::os::unix::fs::symlink(faces.join(f), at.join(f)).unwrap();
    }
    ModelConfig {
        name: "big".into(),
        task: at.join("task.toml").to_str().unwrap().into(),
        init: None,
        eval: false,
        seed: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_cut_at_the_fetch_deadline_and_frees_its_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), big_model(dir.path()));
    cfg.fetch_timeout_secs = 1;
    // One call at a time per connection: the stalled download holds the client's only one.
    cfg.limits.max_streams_per_connection = 1;
    let h = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&h).await;
    let me = enroll_tls(&tls.ch, TOKEN, "slow-plug").await.unwrap();
    // The client's own channel, with the smallest HTTP/2 windows: unread data stops the
    // server after 64 KiB.
    let ch = hearth_coordinator::client::endpoint(
        &h.endpoint(),
        h.ca_pem(),
        Some((&me.cert_pem, &me.key_pem)),
    )
    .unwrap()
    .initial_stream_window_size(Some(65_535))
    .initial_connection_window_size(Some(65_535))
    .connect()
    .await
    .unwrap();
    let mut s = FederationClient::new(ch.clone())
        .fetch_model(FetchModelRequest {
            model: "big".into(),
            version: 1,
            offset: 0,
            have_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().expect("a first chunk");
    let total = first.total_size;
    assert!(total > 2_000_000, "the model is large: {total} bytes");
    // The client stops reading.
    let stalled_at = Instant::now();
    let m = h.coordinator().metrics();
    for _ in 0..200 {
        if m.rejections("timeout") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stalled_at.elapsed();
    assert_eq!(m.rejections("timeout"), 1, "not cut after {took:?}");
    assert!(
        m.render()
            .contains("hearth_coordinator_rejections_total{call=\"fetch\",reason=\"timeout\"} 1"),
        "{}",
        m.render()
    );
    assert!(took < Duration::from_secs(5), "cut only after {took:?}");
    // Reading on: what was queued, then DeadlineExceeded, never the whole model.
    let mut got = first.data.len() as u64;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("the cut stream ends")
        {
            Ok(Some(c)) => got += c.data.len() as u64,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let e = end.expect("a cut download ends with an error, not as if complete");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(got < total, "{got} of {total} bytes");
    // The stream is free again: the next call on the same connection is served at once.
    let next = tokio::time::timeout(Duration::from_secs(5), versions(&ch, "big"))
        .await
        .expect("the connection's stream was freed");
    assert_eq!(next.unwrap().len(), 1);
    h.shutdown().await.unwrap();
}
