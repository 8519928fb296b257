//! A real crash: the `hearth-coordinator` binary runs on a state directory on disk, a round is
//! opened over the Admin API, enrolled clients upload updates over the real wire protocol, and
//! the process is killed with SIGKILL right after the coordinator acknowledged some of them.
//! Restarted on the same directory, it must resume the round with exactly the acknowledged
//! updates: re-uploads are not counted again, and the published model is the FedAvg of every
//! accepted delta, computed here independently from the bytes that were sent.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hearth_model::OnnxModel;
use hearth_proto::v1::RoundState;
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_hearth-coordinator");
const MODEL: &str = "digits";
const TOKENS: [&str; 5] = [
    "crash-token-1",
    "crash-token-2",
    "crash-token-3",
    "crash-token-4",
    "crash-token-5",
];
/// Updates acknowledged before the kill; the rest come after the restart.
const BEFORE_KILL: usize = 3;

/// Writes the coordinator's config into `dir` (state in `dir/state`); returns its path. The
/// running sum is what is checked, so the round is plain FedAvg (`combine = "mean"`).
fn write_config(dir: &Path, b: &Backend) -> PathBuf {
    let path = dir.join("coordinator.toml");
    let tokens: Vec<String> = TOKENS.iter().map(|t| format!("{t:?}")).collect();
    let text = format!(
        "db_path = {db:?}\ndata_dir = {data:?}\nadmin_token = {ADMIN:?}\n\
         enrollment_tokens = [{tokens}]\n\
         [round]\nmin_clients = {n}\nmax_clients = {n}\ndeadline_secs = 600\n\
         [aggregation]\ncombine = \"mean\"\n\
         [downlink]\nbits = 0\n\
         [[model]]\nname = {MODEL:?}\ntask = \"digits\"\neval = false\nseed = 7\n{store}",
        db = dir.join("state").join("coordinator.db"),
        data = data_dir(),
        tokens = tokens.join(", "),
        n = TOKENS.len(),
        store = b.toml(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A free loopback port (bound, read and released; the binary binds it right after).
/// A coordinator process started by this test; killed and reaped on drop.
struct Coordinator {
    child: Child,
    addr: SocketAddr,
    pki: PathBuf,
}

impl Coordinator {
    fn spawn(config: &Path) -> Coordinator {
        // `pki` beside the database (see `write_config`).
        let pki = config.parent().unwrap().join("state").join("pki");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .env_remove("HEARTH_ADMIN_TOKEN")
            .env("RUST_LOG", "info,sled=warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("coordinator binary starts");
        Coordinator { child, addr, pki }
    }

    /// A TLS connection once the server answers admin calls (bounded wait).
    async fn connect(&mut self) -> Tls {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("coordinator exited during start-up: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "coordinator did not serve on {} within 60 s",
                self.addr
            );
            if let Ok(ca) = std::fs::read_to_string(self.pki.join("ca.pem")) {
                if let Ok(tls) = Tls::to(&format!("https://{}", self.addr), &ca).await {
                    if versions(&tls.ch, MODEL).await.is_ok() {
                        return tls;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap, bounded.
    fn kill(mut self) {
        self.child.kill().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "killed coordinator did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Client `i` uploads update `i` for every `i` in `which`; each must be newly accepted and
/// counted (the round then holds `i + 1` updates).
async fn upload_new(
    ch: &Channel,
    clients: &[Creds],
    round: u64,
    updates: &[(Vec<u8>, u64)],
    which: std::ops::Range<usize>,
) {
    for i in which {
        let (payload, samples) = &updates[i];
        let ack = upload(ch, &clients[i], MODEL, round, 1, *samples, payload)
            .await
            .unwrap();
        assert!(
            ack.accepted && !ack.duplicate && ack.updates_in_round == i as u32 + 1,
            "client {i}: {ack:?}"
        );
    }
}

on_both_backends! {
    async fn sigkill_mid_round_keeps_exactly_the_acknowledged_updates(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &b);

    let mut first = Coordinator::spawn(&config);
    let tls = first.connect().await;
    let ch = tls.ch.clone();
    let mut clients = Vec::new();
    for (i, t) in TOKENS.iter().enumerate() {
        clients.push(tls.enroll(t, &format!("plug-{i}")).await.unwrap());
    }
    let n = TOKENS.len() as u32;
    let round = start_round(&ch, MODEL, n, n, 600).await;
    assert_eq!(
        (round.state, round.base_version, round.updates),
        (RoundState::Open as i32, 1, 0)
    );
    let id = round.round_id;
    let (bytes, _, _, _) = fetch(&ch, &clients[0], MODEL, 1, 0).await.unwrap();
    let global = OnnxModel::from_bytes(&bytes).unwrap().weights();
    // Distinct deltas and weights per client, so any lost or doubled update shows in the average.
    let updates: Vec<(Vec<u8>, u64)> = (0..TOKENS.len())
        .map(|i| {
            let d = delta(&global, 0.1 + 0.9 * i as f32, 0.02);
            (encode(&d, 8, 100 + i as u64), 10 + 7 * i as u64)
        })
        .collect();

    upload_new(&ch, &clients, id, &updates, 0..BEFORE_KILL).await;
    // Killed right after the last acknowledgement: no graceful shutdown, no final flush.
    first.kill();
    drop(ch);

    let mut second = Coordinator::spawn(&config);
    let tls = second.connect().await;
    let ch = tls.ch.clone();
    // The CA is kept on disk: the certificates issued before the crash still work.
    let mut rebound = Vec::new();
    for c in &clients {
        rebound.push(tls.rebind(c).await);
    }
    let clients = rebound;
    let s = status(&ch, MODEL, id).await;
    assert_eq!(
        (s.state, s.updates),
        (RoundState::Open as i32, BEFORE_KILL as u32),
        "after the restart: {s:?}"
    );
    let sent: u64 = updates[..BEFORE_KILL]
        .iter()
        .map(|u| u.0.len() as u64)
        .sum();
    assert_eq!(s.uplink_bytes, sent);
    // Enrollments survived, and used tokens were not revived from the config file.
    assert_eq!(
        tls.enroll(TOKENS[0], "again").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Re-uploads by clients already counted (the same payload, or another one) are
    // acknowledged as duplicates and change nothing.
    for (c, payload) in [(0, &updates[0].0), (1, &updates[4].0)] {
        let ack = upload(&ch, &clients[c], MODEL, id, 1, 50, payload)
            .await
            .unwrap();
        assert!(
            ack.duplicate && ack.updates_in_round == BEFORE_KILL as u32,
            "{ack:?}"
        );
    }

    upload_new(&ch, &clients, id, &updates, BEFORE_KILL..TOKENS.len()).await;
    let s = wait_state(&ch, MODEL, id, RoundState::Completed).await;
    assert_eq!((s.updates, s.new_version), (n, 2), "{s:?}");
    let all: u64 = updates.iter().map(|u| u.0.len() as u64).sum();
    assert_eq!(s.uplink_bytes, all);

    // Version 2 is the FedAvg of exactly the five accepted updates, each once.
    let (v2, _, _, _) = fetch(&ch, &clients[1], MODEL, 2, 0).await.unwrap();
    let got = OnnxModel::from_bytes(&v2).unwrap().weights();
    let refs: Vec<(&[u8], u64)> = updates.iter().map(|(p, n)| (p.as_slice(), *n)).collect();
    let want = fedavg(&global, &refs);
    let err = max_abs_diff(&got, &want);
    assert!(
        err < 1e-5,
        "published model differs from the FedAvg by {err}"
    );
    // The check has teeth: the average without the pre-crash updates is far from it.
    let after_only = fedavg(&global, &refs[BEFORE_KILL..]);
    assert!(max_abs_diff(&got, &after_only) > 1e-3);
    second.kill();
    }
}

/// Three `hearth-coordinator` processes on one PostgreSQL database (the same config file:
/// database, CA and signing key; ports of their own). Any instance enrols, serves fetches
/// and accepts uploads for any round; a subscriber on one learns of a round opened on
/// another; one instance is SIGKILLed mid-round right after acknowledging updates, and the
/// round completes through the others with every acknowledged update counted once (the
/// published model is the FedAvg of all of them, computed here). A second round closes at
/// its deadline, when both survivors try to close it: exactly one version is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_rounds_and_a_killed_one_loses_no_update() {
    use hearth_proto::v1::{
        federation_client::FederationClient, federation_event, SubscribeRequest,
    };
    let Some(b) = Backend::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &b);
    // The first instance makes the CA, the signing key and version 1; then the others start.
    let mut a = Coordinator::spawn(&config);
    let ta = a.connect().await;
    let (mut bi, mut ci) = (Coordinator::spawn(&config), Coordinator::spawn(&config));
    let (tb, tc) = (bi.connect().await, ci.connect().await);

    // Enrolment on any instance; a token from the config still enrols once in all.
    let mut clients = Vec::new();
    for (i, t) in TOKENS.iter().enumerate() {
        let via = [&ta, &tb, &tc][i % 3];
        clients.push(via.enroll(t, &format!("plug-{i}")).await.unwrap());
    }
    for t in [&ta, &tb, &tc] {
        assert_eq!(
            t.enroll(TOKENS[0], "again").await.unwrap_err().code(),
            Code::PermissionDenied
        );
    }
    // Clients on C: a subscriber there, and the uploads after B's death.
    let mut on_c = Vec::new();
    for c in &clients {
        on_c.push(tc.rebind(c).await);
    }
    let on_b = tb.rebind(&clients[0]).await;
    let on_b2 = tb.rebind(&clients[1]).await;
    let mut sub = FederationClient::new(on_c[4].channel(&tc.ch))
        .subscribe(with_client(
            SubscribeRequest {
                models: vec![MODEL.into()],
            },
            &on_c[4],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut sub).await,
        federation_event::Event::Published(p) if p.version == 1
    ));

    let n = TOKENS.len() as u32;
    let round = start_round(&ta.ch, MODEL, n, n, 600).await;
    let id = round.round_id;
    // C's subscriber hears of the round A opened.
    match next_event(&mut sub).await {
        federation_event::Event::Round(t) => assert_eq!(t.round_id, id),
        e => panic!("expected the round opened on A, got {e:?}"),
    }
    let (bytes, _, _, _) = fetch(&tb.ch, &on_b, MODEL, 1, 0).await.unwrap();
    let global = OnnxModel::from_bytes(&bytes).unwrap().weights();
    let updates: Vec<(Vec<u8>, u64)> = (0..TOKENS.len())
        .map(|i| {
            let d = delta(&global, 0.1 + 0.9 * i as f32, 0.02);
            (encode(&d, 8, 100 + i as u64), 10 + 7 * i as u64)
        })
        .collect();
    // Two updates acknowledged by B, then B dies without any shutdown.
    for (i, c) in [(0, &on_b), (1, &on_b2)] {
        let ack = upload(&tb.ch, c, MODEL, id, 1, updates[i].1, &updates[i].0)
            .await
            .unwrap();
        assert!(
            ack.accepted && ack.updates_in_round == i as u32 + 1,
            "{ack:?}"
        );
    }
    bi.kill();
    // A retry of an update B acknowledged is a duplicate on C: counted once.
    let ack = upload(&tc.ch, &on_c[0], MODEL, id, 1, updates[0].1, &updates[0].0)
        .await
        .unwrap();
    assert!(ack.duplicate && ack.updates_in_round == 2, "{ack:?}");
    // The rest on A and C; the last one fills the round.
    for i in 2..TOKENS.len() {
        let (ch, c) = if i % 2 == 0 {
            (&ta.ch, ta.rebind(&clients[i]).await)
        } else {
            (&tc.ch, on_c[i].clone())
        };
        let ack = upload(ch, &c, MODEL, id, 1, updates[i].1, &updates[i].0)
            .await
            .unwrap();
        assert!(
            ack.accepted && ack.updates_in_round == i as u32 + 1,
            "{ack:?}"
        );
    }
    let s = wait_state(&tc.ch, MODEL, id, RoundState::Completed).await;
    assert_eq!((s.updates, s.new_version), (n, 2), "{s:?}");
    let all: u64 = updates.iter().map(|u| u.0.len() as u64).sum();
    assert_eq!(s.uplink_bytes, all);
    // C's subscriber hears of the version, whoever published it.
    match next_event(&mut sub).await {
        federation_event::Event::Published(p) => assert_eq!(p.version, 2),
        e => panic!("expected version 2, got {e:?}"),
    }
    let (v2, _, _, _) = fetch(&tc.ch, &on_c[1], MODEL, 2, 0).await.unwrap();
    let got = OnnxModel::from_bytes(&v2).unwrap().weights();
    let refs: Vec<(&[u8], u64)> = updates.iter().map(|(p, n)| (p.as_slice(), *n)).collect();
    let want = fedavg(&global, &refs);
    let err = max_abs_diff(&got, &want);
    assert!(
        err < 1e-5,
        "published model differs from the FedAvg by {err}"
    );
    // The check has teeth: without B's updates the average is far from it.
    assert!(max_abs_diff(&got, &fedavg(&global, &refs[2..])) > 1e-3);

    // A round closed at its deadline by whichever survivor takes its lock first.
    let r2 = start_round(&tc.ch, MODEL, 2, n, 3).await;
    let base = OnnxModel::from_bytes(&v2).unwrap().weights();
    for (i, ch) in [(0, &ta.ch), (1, &tc.ch)] {
        let c = if i == 0 {
            ta.rebind(&clients[0]).await
        } else {
            on_c[1].clone()
        };
        let p = encode(&delta(&base, 0.5 + i as f32, 0.01), 8, 7 + i as u64);
        assert!(
            upload(ch, &c, MODEL, r2.round_id, 2, 9, &p)
                .await
                .unwrap()
                .accepted
        );
    }
    let s = wait_state(&ta.ch, MODEL, r2.round_id, RoundState::Completed).await;
    assert_eq!((s.updates, s.new_version), (2, 3), "{s:?}");
    // Both survivors' timers fired; give the later one time to find the round closed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vs: Vec<u64> = versions(&tc.ch, MODEL)
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(vs, vec![1, 2, 3]);
    drop(sub);
    a.kill();
    ci.kill();
}
