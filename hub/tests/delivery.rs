//! Zero lost commands across restarts, with real processes (issue 12, "Delivery").
//!
//! - The `hearth-hub` binary with its embedded broker is SIGKILLed three times mid-stream
//!   (about 1 s down each) while an agent publishes 20 events/s; one rule turns every
//!   person event into a command for the `porch_light` actuator (Hearth's virtual switch,
//!   in-process). The embedded broker forgets sessions and retained messages with its
//!   process, so delivery rests on the hub's persisted outbox holding commands until the
//!   lamp says `online` again.
//! - The same against Debian's Mosquitto on a free loopback port, restarted mid-stream
//!   (SIGTERM, so it writes its persistence file: `persistence true` in the temporary
//!   `mosquitto.conf`), resting on persistent sessions (`clean_session = false`).
//!
//! `HEARTH_TEST_HOLD=false` and `HEARTH_TEST_PERSISTENT=false` switch the two mechanisms
//! off, to see these tests fail without them.
//!
//! - Mosquitto SIGKILLed twice mid-stream (nothing saved), resting on the hub's re-send of
//!   what the dead broker had acknowledged and on holding commands until the lamp is back.
//!
//! All three require that every command the hub logged (`command queued`, written after the
//! command is in the outbox journal) was applied by the lamp, none twice. Child processes
//! are killed by PID when dropped; every wait is bounded; 127.0.0.1 only.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, wait_listening, Proc, RULES};
use hearth_agent::actuator::{start_actuator, ActuatorConfig, ActuatorHandle, ActuatorStats};
use hearth_edge::{ClientSettings, Connection, MqttUrl};
use rumqttc::{AsyncClient, QoS};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-hub");
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const WAIT: Duration = Duration::from_secs(20);
/// Events per second from the agent.
const RATE: u64 = 20;

/// A home under test: its directory, the hub's logs, the lamp, the agent.
struct Home {
    dir: tempfile::TempDir,
    port: u16,
    runs: usize,
    lamp: Option<ActuatorHandle>,
    agent: Option<tokio::task::JoinHandle<u64>>,
    stop_agent: Option<tokio::sync::oneshot::Sender<()>>,
    /// Passwords of the lamp and the agent, provisioned in the hub's credential store.
    lamp_pw: String,
    agent_pw: String,
}

impl Home {
    fn new(port: u16) -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
        let store = hearth_hub::CredentialStore::open(&dir.path().join("mqtt")).unwrap();
        let base = "zigbee2mqtt";
        let lamp = store
            .provision("porch_light", hearth_hub::Role::Actuator, base, false)
            .unwrap();
        let agent = store
            .provision("door-cam", hearth_hub::Role::Device, base, false)
            .unwrap();
        Home {
            dir,
            port,
            runs: 0,
            lamp: None,
            agent: None,
            stop_agent: None,
            lamp_pw: lamp.password,
            agent_pw: agent.password,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the hub's configuration (`extra` goes into `[delivery]`) and starts the
    /// binary; its log goes to `hub-<run>.log`.
    fn start_hub(&mut self, external: bool) -> Proc {
        let broker = if external {
            format!("url = \"mqtt://127.0.0.1:{}\"", self.port)
        } else {
            format!("listen = \"127.0.0.1:{}\"", self.port)
        };
        let hold = std::env::var("HEARTH_TEST_HOLD").unwrap_or_else(|_| "true".into());
        let cfg = format!(
            "client_id = \"delivery-hub\"\nrules = \"{}\"\n\n[delivery]\nhold_offline = {hold}\n\
             persistent_session = {}\nstate_file = \"{}\"\n\n[mqtt_auth]\ndir = \"{}\"\n\n\
             [broker]\n{broker}\n",
            self.path("rules.toml").display(),
            persistent(),
            self.path("outbox.jsonl").display(),
            self.path("mqtt").display(),
        );
        std::fs::write(self.path("hub.toml"), cfg).unwrap();
        let log = self.path(&format!("hub-{}.log", self.runs));
        self.runs += 1;
        let mut hub = Proc(
            Command::new(BIN)
                .arg("--config")
                .arg(self.path("hub.toml"))
                .env_remove("HEARTH_HUB_CONFIG")
                .env("RUST_LOG", "warn,hearth_hub::delivery=debug")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        if !external {
            wait_listening(&mut hub, self.port, WAIT, || self.logs());
        }
        hub
    }

    /// Every hub log so far.
    fn logs(&self) -> String {
        (0..self.runs)
            .map(|i| {
                std::fs::read_to_string(self.path(&format!("hub-{i}.log"))).unwrap_or_default()
            })
            .collect()
    }

    /// Ids of the commands the hub logged as queued (in its outbox), over every run.
    fn logged_ids(&self) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| l.contains("command queued"))
            .filter_map(|l| l.split("hearth_id=").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The broker URL with `user`'s credentials.
    fn url(&self, user: &str, password: &str) -> String {
        format!("mqtt://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// Starts the lamp (same client id every time: its session is its own).
    async fn run_lamp(&mut self) -> Arc<ActuatorStats> {
        let lamp = start_actuator(ActuatorConfig {
            persistent_session: persistent(),
            ..ActuatorConfig::new("porch_light", &self.url("porch_light", &self.lamp_pw))
        })
        .await
        .unwrap();
        let stats = lamp.stats();
        self.lamp = Some(lamp);
        stats
    }

    /// Starts the lamp and waits until the hub has seen it online (the outbox remembers it).
    async fn start_lamp(&mut self) -> Arc<ActuatorStats> {
        let stats = self.run_lamp().await;
        let journal = self.path("outbox.jsonl");
        wait_for("the hub to track the lamp's availability", || {
            std::fs::read_to_string(&journal).is_ok_and(|t| t.contains(r#"{"seen":"porch_light"}"#))
        })
        .await;
        stats
    }

    /// An agent publishing a person at the door RATE times a second until stopped; it
    /// returns how many events it handed to its client.
    fn start_agent(&mut self) {
        let url = MqttUrl::parse(&self.url("door-cam", &self.agent_pw)).unwrap();
        let (client, el) = ClientSettings::new(url, "delivery-agent")
            .request_capacity(1024)
            .connect()
            .unwrap();
        let mut conn = Connection::new(el, "test agent");
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        let poller = tokio::spawn(async move { while conn.poll().await.is_some() {} });
        let agent = tokio::spawn(async move {
            let mut sent = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => {}
                }
                if publish_event(&client, sent).await {
                    sent += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            poller.abort();
            sent
        });
        self.agent = Some(agent);
        self.stop_agent = Some(stop_tx);
    }

    async fn stop_agent(&mut self) -> u64 {
        let _ = self.stop_agent.take().unwrap().send(());
        self.agent.take().unwrap().await.unwrap()
    }

    /// Waits until every logged command has been applied, then checks and reports.
    /// `lamps`: every instance of the lamp that ran.
    async fn check_zero_lost(&mut self, what: &str, events: u64, lamps: &[Arc<ActuatorStats>]) {
        let sum = |f: fn(&ActuatorStats) -> u64| lamps.iter().map(|s| f(s)).sum::<u64>();
        let deadline = Instant::now() + WAIT;
        let (logged, applied) = loop {
            let logged = self.logged_ids();
            let applied: HashSet<String> = lamps.iter().flat_map(|s| s.applied_ids()).collect();
            let lost = logged.iter().filter(|id| !applied.contains(*id)).count();
            if lost == 0 || Instant::now() > deadline {
                break (logged, applied);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let lost: Vec<&String> = logged.iter().filter(|id| !applied.contains(*id)).collect();
        let unique: HashSet<&String> = logged.iter().collect();
        let applied_n = sum(|s| s.commands_applied.load(Ordering::SeqCst));
        let duplicates = sum(|s| s.commands_duplicate.load(Ordering::SeqCst));
        println!(
            "{what}: {events} events published, {} commands logged by the hub, {} applied by the \
             lamp, {} lost, {duplicates} redeliveries ignored, {} applied again after a lamp restart",
            logged.len(),
            applied_n,
            lost.len(),
            applied_n.saturating_sub(applied.len() as u64),
        );
        assert!(
            logged.len() as u64 >= events / 2,
            "too few commands logged ({} for {events} events):\n{}",
            logged.len(),
            self.logs()
        );
        assert_eq!(unique.len(), logged.len(), "a command id was logged twice");
        assert!(
            lost.is_empty(),
            "{} of {} commands never reached the lamp: {lost:?}",
            lost.len(),
            logged.len()
        );
        // Every command carried an id, and each lamp applied each id once. A lamp that
        // restarts forgets its window (it is in memory): a command it applied but had not
        // acknowledged before dying may be applied again by its next run (counted above).
        let per_run: u64 = lamps.iter().map(|s| s.applied_ids().len() as u64).sum();
        assert_eq!(applied_n, per_run, "a lamp applied a command twice");
        if let Some(l) = self.lamp.take() {
            l.shutdown().await.unwrap();
        }
    }
}

/// Persistent sessions for the hub and the lamp (`HEARTH_TEST_PERSISTENT=false` turns them
/// off, to see the Mosquitto test fail without them).
fn persistent() -> bool {
    std::env::var("HEARTH_TEST_PERSISTENT").map_or(true, |v| v != "false")
}

async fn publish_event(client: &AsyncClient, n: u64) -> bool {
    let ev = format!(
        r#"{{"class":"person","score":0.9,"model":"door-cam@1","ts":"2026-11-30T19:00:{:02}.000Z"}}"#,
        n % 60
    );
    client
        .publish(
            "hearth/door-cam/event/detection",
            QoS::AtLeastOnce,
            false,
            ev,
        )
        .await
        .is_ok()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sleep_s(s: f64) {
    tokio::time::sleep(Duration::from_secs_f64(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_is_lost_when_the_hub_and_its_embedded_broker_are_killed() {
    let mut home = Home::new(free_port());
    let mut hub = home.start_hub(false);
    let mut lamps = vec![home.start_lamp().await];
    home.start_agent();
    for kill in 0..3 {
        sleep_s(2.5).await;
        hub.signal("-KILL");
        hub.wait_exit(WAIT);
        // The third time the lamp goes too and returns 1 s after the hub, so commands
        // certainly wait for it (the first two races go either way).
        let lamp_too = kill == 2;
        if lamp_too {
            drop(home.lamp.take());
        }
        sleep_s(1.0).await;
        hub = home.start_hub(false);
        if lamp_too {
            sleep_s(1.0).await;
            lamps.push(home.run_lamp().await);
        }
    }
    sleep_s(2.5).await;
    let events = home.stop_agent().await;
    home.check_zero_lost("embedded broker, 3 SIGKILLs", events, &lamps)
        .await;
    let logs = home.logs();
    let held = logs.matches("held: actuator offline").count();
    println!("{held} commands were held for the lamp after a restart");
    assert!(
        held > 0,
        "no command had to wait for the lamp: the test proved nothing:\n{logs}"
    );
    drop(hub);
}

/// Mosquitto on 127.0.0.1:`port` with persistence in `dir`.
fn start_mosquitto(dir: &Path, port: u16) -> Proc {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nmax_queued_messages 10000\nlog_dest stderr\n",
            dir.display()
        ),
    )
    .unwrap();
    let log = dir.join("mosquitto.log");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut p = Proc(
        Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start mosquitto"),
    );
    wait_listening(&mut p, port, WAIT, || {
        std::fs::read_to_string(&log).unwrap_or_default()
    });
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_is_lost_when_mosquitto_restarts() {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: apt-get install -y mosquitto (scripts/test.sh installs it)"
    );
    let mut home = Home::new(free_port());
    let broker_dir = home.path("mosquitto");
    std::fs::create_dir(&broker_dir).unwrap();
    let mut broker = start_mosquitto(&broker_dir, home.port);
    let hub = home.start_hub(true);
    let first = home.start_lamp().await;
    home.start_agent();
    sleep_s(3.0).await;
    // A clean broker restart: SIGTERM makes Mosquitto save sessions and queued messages.
    broker.signal("-TERM");
    broker.wait_exit(WAIT);
    // The lamp goes too (its process dies) and comes back 2 s after the broker, so the
    // agent's and the hub's commands arrive while it is away.
    drop(home.lamp.take());
    sleep_s(1.0).await;
    let broker2 = start_mosquitto(&broker_dir, home.port);
    sleep_s(2.0).await;
    let second = home.run_lamp().await;
    sleep_s(2.0).await;
    let events = home.stop_agent().await;
    home.check_zero_lost("Mosquitto restarted once", events, &[first, second])
        .await;
    drop((hub, broker2));
}

/// Mosquitto SIGKILLed mid-stream, twice (it saves nothing: `persistence true`, but its
/// autosave has not run, so sessions, queued and retained messages die with it) and started
/// again 1 s later; the lamp dies with it and returns 1 s after the broker, the hub stays up. Rests on the hub's outbox: what
/// the broker had acknowledged just before it died is sent again, and the lamp's commands
/// wait until it says `online` on the new broker (its subscription exists again).
/// To see this test fail, make `Outbox::broker_lost_session` return at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_is_lost_when_mosquitto_is_killed() {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: apt-get install -y mosquitto (scripts/test.sh installs it)"
    );
    let mut home = Home::new(free_port());
    let broker_dir = home.path("mosquitto");
    std::fs::create_dir(&broker_dir).unwrap();
    let mut broker = start_mosquitto(&broker_dir, home.port);
    let hub = home.start_hub(true);
    let mut lamps = vec![home.start_lamp().await];
    home.start_agent();
    for _ in 0..2 {
        sleep_s(2.5).await;
        broker.signal("-KILL");
        broker.wait_exit(WAIT);
        // The lamp dies too and comes back 1 s after the broker: the hub is back first, and
        // the new broker knows nothing of the lamp (no session, no retained availability).
        drop(home.lamp.take());
        sleep_s(1.0).await;
        broker = start_mosquitto(&broker_dir, home.port);
        sleep_s(1.0).await;
        lamps.push(home.run_lamp().await);
    }
    sleep_s(2.5).await;
    let events = home.stop_agent().await;
    home.check_zero_lost("Mosquitto and the lamp SIGKILLed twice", events, &lamps)
        .await;
    let logs = home.logs();
    assert!(
        logs.contains("the broker lost the hub's session"),
        "the hub never saw the broker lose its state: the test proved nothing:\n{logs}"
    );
    drop((hub, broker));
}
