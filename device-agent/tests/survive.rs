//! Agents that survive: the `hearth-agent` binary, started from a config file on a state
//! directory, is SIGKILLed at the moments that used to lose or corrupt its part in a round
//! (during local training, right after the coordinator acknowledged its upload, while it
//! retries through a coordinator outage) and restarted on the same directory. The
//! coordinator runs in this process on loopback (stopped and restarted on its port and
//! database for the outage). Checked each time: the round counts exactly one update from
//! the device and completes, the residual on disk is the one that belongs to the update the
//! coordinator aggregated (the published version is the base plus that very payload), and a
//! resumed upload does not train again. A round that fails at its deadline rolls the
//! residual back to the one before the round; a round task that arrives while the agent
//! trains is handled afterwards; a model download killed after its first chunk resumes at
//! the byte it reached.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{data_dir, start_broker, Coord};
use hearth_agent::state::{FedState, PendingUpdate, StateDir};
use hearth_coordinator::{
    Config as CoordConfig, CoordinatorHandle, Downlink, ModelConfig, RoundDefaults,
};
use hearth_model::{OnnxModel, Weights};
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{RoundState, RoundStatus, RoundStatusRequest, StartRoundRequest};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-agent");
const ADMIN: &str = "admin-secret-token-0123456789";
const TOKEN: &str = "token-survivor-0001";
const MODEL: &str = "faces";
const LIMIT: Duration = Duration::from_secs(60);

/// The coordinator's config: one enrollment token, rounds of one client by default.
fn coord_config(db: &Path, epochs: u32) -> CoordConfig {
    CoordConfig {
        db_path: db.join("coord.db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: vec![TOKEN.into()],
        round: RoundDefaults {
            min_clients: 1,
            max_clients: 1,
            deadline_secs: 120,
            local_epochs: epochs,
            quant_bits: 8,
            topk_fraction: 0.3,
            ..RoundDefaults::default()
        },
        // Exact f32 deltas down: a published version is then exactly base + the aggregated
        // payload, which is what these tests check (the default downlink is sparse and lossy).
        downlink: Downlink {
            bits: 32,
            topk_fraction: 1.0,
        },
        models: vec![ModelConfig {
            name: MODEL.into(),
            task: "faces".into(),
            init: None,
            eval: false,
            seed: 1,
        }],
        ..CoordConfig::default()
    }
}

async fn start_coordinator(cfg: CoordConfig, addr: SocketAddr) -> CoordinatorHandle {
    // The port of a stopped coordinator can take a moment to be free again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                return hearth_coordinator::start(cfg, l)
                    .await
                    .expect("coordinator")
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    req
}

async fn admin(url: &Coord) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(url.channel().await)
}

async fn start_round(url: &Coord, min: u32, deadline_secs: u32) -> u64 {
    admin(url)
        .await
        .start_round(authed(StartRoundRequest {
            model: MODEL.into(),
            min_clients: min,
            max_clients: min,
            deadline_secs,
            reason: "cli".into(),
            ..Default::default()
        }))
        .await
        .expect("round starts")
        .into_inner()
        .round_id
}

async fn round_status(url: &Coord, id: u64) -> RoundStatus {
    admin(url)
        .await
        .get_round_status(authed(RoundStatusRequest {
            model: MODEL.into(),
            round_id: id,
        }))
        .await
        .unwrap()
        .into_inner()
}

/// Polls `f` every 20 ms until it yields a value, for at most `limit`.
async fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(limit, f)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// One test's agent: its config file and state directory; each run logs to its own file.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(broker: u16, coord: &Coord) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        let ca = coord.write_ca(&dir.path().join("coordinator-ca.pem"));
        let text = format!(
            "device = \"survivor\"\ntask = \"faces\"\nmqtt = \"mqtt://127.0.0.1:{broker}\"\n\
             coordinator = {url:?}\ncoordinator_ca_file = {ca:?}\nenrollment_token = {TOKEN:?}\ndata_dir = {data:?}\n\
             state_dir = {state:?}\nreplay_rate_hz = 2\nbootstrap_epochs = 1\n\
             [partition]\nindex = 0\ncount = 2\nalpha = 0.5\nseed = 11\n",
            url = coord.url,
            data = data_dir(),
            state = dir.path().join("state"),
        );
        std::fs::write(&config, text).unwrap();
        Setup { dir, config }
    }

    fn state(&self) -> StateDir {
        StateDir::open(&self.dir.path().join("state")).unwrap()
    }

    fn fed(&self) -> FedState {
        self.state().load_federation(MODEL).unwrap()
    }

    /// The weights of the stored global model once it is `version`.
    fn model_at(&self, version: u64) -> Option<Weights> {
        match self.state().load_model(MODEL) {
            Ok(Some((meta, bytes))) if meta.version == version => {
                Some(OnnxModel::from_bytes(&bytes).unwrap().weights())
            }
            _ => None,
        }
    }

    /// Starts the binary (`pause_at` sets the test hook).
    fn spawn(&self, run: &str, pause_at: Option<&str>) -> Agent {
        let log = self.dir.path().join(format!("agent-{run}.log"));
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,sled=warn")
            .env("NO_COLOR", "1")
            .env_remove("HEARTH_TEST_PAUSE_AT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(p) = pause_at {
            cmd.env("HEARTH_TEST_PAUSE_AT", p);
        }
        Agent {
            child: cmd.spawn().expect("agent binary starts"),
            log,
        }
    }
}

/// A running `hearth-agent` process; SIGKILLed and reaped on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// The log so far, without colour codes.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Waits (bounded) until the log contains `what`.
    async fn wait_log(&mut self, what: &str, limit: Duration) {
        let seen = poll(limit, || {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("agent exited ({st}) before {what:?}; log:\n{}", self.log());
            }
            self.log().contains(what).then_some(())
        })
        .await;
        if seen.is_none() {
            panic!(
                "no {what:?} in the agent log within {limit:?}:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap, bounded; returns the log.
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "killed agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The published version is the base plus exactly `payload` (one client, server rate 1).
fn assert_aggregated(base: &Weights, new: &Weights, payload: &[u8]) {
    let update = hearth_model::decode_update_for(payload, base).unwrap();
    let mut want = base.clone();
    hearth_model::axpy(&mut want, 1.0, &update).unwrap();
    let mut err = 0f32;
    for (name, t) in &want {
        for (a, b) in t.data.iter().zip(&new[name].data) {
            err = err.max((a - b).abs());
        }
    }
    assert!(
        err < 1e-5,
        "published version differs from base + payload by {err}"
    );
    assert!(update.values().any(|t| t.data.iter().any(|v| *v != 0.0)));
}

/// One test's world: a broker, a coordinator (its database in `db`, on `addr`) and the
/// agent's directory.
struct Home {
    db: tempfile::TempDir,
    addr: SocketAddr,
    epochs: u32,
    coord: Option<CoordinatorHandle>,
    url: Coord,
    agent: Setup,
}

impl Home {
    /// Rounds train for `epochs` local epochs.
    async fn new(epochs: u32) -> Home {
        let broker = start_broker();
        let db = tempfile::tempdir().unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let coord = start_coordinator(coord_config(db.path(), epochs), addr).await;
        let url = Coord::of(&coord);
        let agent = Setup::new(broker, &url);
        Home {
            db,
            addr,
            epochs,
            coord: Some(coord),
            url,
            agent,
        }
    }

    /// Stops the coordinator (the agent sees an outage).
    async fn stop(&mut self) {
        if let Some(c) = self.coord.take() {
            c.shutdown().await.unwrap();
        }
    }

    /// Starts the coordinator again on the same port and database.
    async fn restart(&mut self) {
        let cfg = coord_config(self.db.path(), self.epochs);
        self.coord = Some(start_coordinator(cfg, self.addr).await);
    }

    /// A home whose agent holds version 1 and trains for a round just opened (one client).
    async fn training(epochs: u32, deadline_secs: u32) -> (Home, Agent, Weights, u64) {
        let h = Home::new(epochs).await;
        let (mut a, v1) = h.first_run(None).await;
        let round = start_round(&h.url, 1, deadline_secs).await;
        a.wait_log("local training", LIMIT).await;
        (h, a, v1, round)
    }

    /// Starts the agent and waits until it has enrolled and holds global version 1.
    async fn first_run(&self, pause_at: Option<&str>) -> (Agent, Weights) {
        let a = self.agent.spawn("first", pause_at);
        let v1 = wait_for("version 1 stored", LIMIT, || self.agent.model_at(1)).await;
        (a, v1)
    }

    /// Restarts the agent on its state directory, which holds `pending` (trained for `round`
    /// on `v1`, not acknowledged on record), and checks that it re-sent those bytes without
    /// training, that the round completed with them alone, and that their residual is the
    /// committed one. `duplicate`: whether the coordinator had counted them already.
    async fn check_resumed(
        &self,
        round: u64,
        v1: &Weights,
        pending: &PendingUpdate,
        duplicate: bool,
    ) {
        assert_eq!((pending.round_id, pending.acked), (round, false));
        let s = &self.agent;
        let a2 = s.spawn("second", None);
        let f = wait_for("the round settled", LIMIT, || {
            let f = s.fed();
            f.pending.is_none().then_some(f)
        })
        .await;
        assert_eq!(f.residual.as_ref(), Some(&pending.residual));
        assert_eq!(f.joined, vec![round]);
        let st = round_status(&self.url, round).await;
        assert_eq!(
            (st.state, st.updates, st.uplink_bytes),
            (
                RoundState::Completed as i32,
                1,
                pending.payload.len() as u64
            )
        );
        let v2 = wait_for("version 2 stored", LIMIT, || s.model_at(2)).await;
        assert_aggregated(v1, &v2, &pending.payload);
        let log = a2.kill();
        assert!(log.contains("resuming the update"), "{log}");
        assert!(log.contains(&format!("duplicate={duplicate}")), "{log}");
        assert!(!log.contains("local training"), "trained again:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_right_after_the_ack_resumes_without_training_and_commits_the_residual() {
    let mut h = Home::new(2).await;
    let (mut a, v1) = h.first_run(Some("ack")).await;
    let round = start_round(&h.url, 1, 120).await;
    // The coordinator counted the update; the agent is stopped before it recorded the ack.
    a.wait_log("federation worker paused", LIMIT).await;
    a.kill();
    let st = round_status(&h.url, round).await;
    assert_eq!((st.state, st.updates), (RoundState::Completed as i32, 1));
    let f = h.agent.fed();
    assert_eq!(
        f.residual, None,
        "residual committed before the outcome: {f:?}"
    );
    assert!(f.joined.is_empty());
    let pending = f.pending.expect("the trained update is on disk");
    h.check_resumed(round, &v1, &pending, true).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_training_trains_again_and_the_round_counts_one_update() {
    let (mut h, a, _, round) = Home::training(3000, 120).await;
    let s = &h.agent;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = a.kill();
    assert!(
        !log.contains("local update ready"),
        "training ended first:\n{log}"
    );
    assert_eq!(s.fed(), FedState::default());
    assert_eq!(round_status(&h.url, round).await.updates, 0);

    let a2 = s.spawn("second", None);
    let f = wait_for("the round settled", Duration::from_secs(120), || {
        let f = s.fed();
        (f.pending.is_none() && !f.joined.is_empty()).then_some(f)
    })
    .await;
    assert_eq!(f.joined, vec![round]);
    assert!(f.residual.is_some());
    let st = round_status(&h.url, round).await;
    assert_eq!(
        (st.state, st.updates, st.new_version),
        (RoundState::Completed as i32, 1, 2)
    );
    wait_for("version 2 stored", LIMIT, || s.model_at(2)).await;
    a2.kill();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_retrying_through_an_outage_resumes_the_same_bytes() {
    // The coordinator goes down while the agent trains.
    let (mut h, mut a, v1, round) = Home::training(150, 120).await;
    h.stop().await;
    // It keeps re-sending past the ~6 s the old five attempts lasted.
    a.wait_log("attempt=6", LIMIT).await;
    let log = a.kill();
    assert!(!log.contains("upload failed until"), "gave up:\n{log}");
    let pending = h.agent.fed().pending.expect("the update is on disk");
    h.restart().await;
    h.check_resumed(round, &v1, &pending, false).await;
    h.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_agent_finishes_its_upload_once_the_coordinator_is_back() {
    // Issue 10 (c) without a restart: the same process keeps re-sending the same bytes
    // through the outage and is counted once the coordinator is back, without training again.
    let (mut h, mut a, v1, round) = Home::training(150, 120).await;
    h.stop().await;
    a.wait_log("attempt=6", LIMIT).await;
    let pending = h.agent.fed().pending.expect("the update is on disk");
    h.restart().await;
    let s = &h.agent;
    let f = wait_for("the round settled", LIMIT, || {
        let f = s.fed();
        f.pending.is_none().then_some(f)
    })
    .await;
    assert_eq!(f.residual.as_ref(), Some(&pending.residual));
    assert_eq!(f.joined, vec![round]);
    let st = round_status(&h.url, round).await;
    assert_eq!(
        (st.state, st.updates, st.uplink_bytes),
        (
            RoundState::Completed as i32,
            1,
            pending.payload.len() as u64
        )
    );
    let v2 = wait_for("version 2 stored", LIMIT, || s.model_at(2)).await;
    assert_aggregated(&v1, &v2, &pending.payload);
    let log = a.kill();
    assert!(!log.contains("upload failed until"), "gave up:\n{log}");
    assert_eq!(
        log.matches("local update ready").count(),
        1,
        "trained again:\n{log}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_fails_at_its_deadline_rolls_the_residual_back() {
    let mut h = Home::new(2).await;
    let (s, url) = (&h.agent, h.url.clone());
    let (a, _) = h.first_run(None).await;
    // A first round completes: its residual is committed.
    let r1 = start_round(&url, 1, 120).await;
    let before = wait_for("round 1 settled", LIMIT, || {
        let f = s.fed();
        (f.pending.is_none() && f.joined == vec![r1]).then_some(f)
    })
    .await;
    let r1_residual = before.residual.clone().expect("committed residual");
    // The second round needs two clients and gets one before its short deadline.
    let r2 = start_round(&url, 2, 4).await;
    let pending = wait_for("round 2 acknowledged", LIMIT, || {
        s.fed().pending.filter(|p| p.round_id == r2 && p.acked)
    })
    .await;
    assert_ne!(pending.residual, r1_residual);
    assert_eq!(s.fed().residual.as_ref(), Some(&r1_residual));
    let f = wait_for("round 2 settled", LIMIT, || {
        let f = s.fed();
        f.pending.is_none().then_some(f)
    })
    .await;
    assert_eq!(
        round_status(&url, r2).await.state,
        RoundState::Failed as i32
    );
    assert_eq!(f.residual, Some(r1_residual), "residual not rolled back");
    assert_eq!(f.joined, vec![r1, r2]);
    let log = a.kill();
    assert!(log.contains("outcome=Failed"), "{log}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_killed_after_its_first_chunk_resumes_where_it_stopped() {
    let mut h = Home::new(2).await;
    let s = &h.agent;
    let mut a = s.spawn("first", Some("chunk"));
    a.wait_log("federation worker paused", LIMIT).await;
    a.kill();
    let part = s
        .state()
        .load_download(MODEL)
        .unwrap()
        .expect("partial download");
    assert_eq!(part.meta.version, 1);
    assert_eq!(part.bytes.len(), hearth_proto::CHUNK_SIZE);
    assert!(part.meta.size_bytes > part.bytes.len() as u64);

    let a2 = s.spawn("second", None);
    wait_for("version 1 stored", LIMIT, || s.model_at(1)).await;
    assert_eq!(s.state().load_download(MODEL).unwrap(), None);
    let log = a2.kill();
    let resumed = format!(
        "resuming the model download version=1 offset={}",
        part.bytes.len()
    );
    assert!(log.contains(&resumed), "{log}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_task_arriving_during_training_is_queued_not_lost() {
    // Round 1 fails at its deadline while the agent still trains for it; round 2 opens then.
    let (mut h, a, _, r1) = Home::training(8000, 2).await;
    let s = &h.agent;
    let deadline = Instant::now() + LIMIT;
    while round_status(&h.url, r1).await.state != RoundState::Failed as i32 {
        assert!(Instant::now() < deadline, "round 1 did not fail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r2 = start_round(&h.url, 1, 120).await;
    assert!(
        !a.log().contains("local update ready"),
        "training ended first"
    );
    let f = wait_for("round 2 settled", Duration::from_secs(120), || {
        let f = s.fed();
        (f.pending.is_none() && !f.joined.is_empty()).then_some(f)
    })
    .await;
    assert_eq!(f.joined, vec![r2]);
    let st = round_status(&h.url, r2).await;
    assert_eq!((st.state, st.updates), (RoundState::Completed as i32, 1));
    let log = a.kill();
    assert!(log.contains("outcome=CountedOut"), "{log}");
    h.stop().await;
}
