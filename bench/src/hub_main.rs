//! `bench-hub`: event → rule → actuator command, Hearth's hub against Node-RED and a bare
//! relay, on one Mosquitto at QoS 1 (run by `bench/hub`, which installs the peers).
//!
//! For each contender it starts the process, waits until an event gets its command, warms
//! up, measures 1,000/s and 10,000/s, then raises the rate until a step loses a command, the
//! generator cannot reach the rate or the commands lag a second behind (the maximum
//! sustained rate is the last step that passed). Latency is per event, matched by the id the
//! command carries ([`hearth_bench::hubload`]). CPU seconds come from `/proc/<pid>/stat`
//! (the contender's processes and, separately, the broker's), peak RSS from sampling
//! `/proc/<pid>/status` every 100 ms. Last, the hub with its embedded broker runs a soak at
//! 10,000/s with its RSS sampled every second. Writes `<out>/hub.md` and `<out>/hub.json`.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hearth_bench::hubload::{self, LoadResult, LoadSpec, RssSampler};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;

/// Matching rules (one per device) in the rules file; the file holds more that never match.
const DEVICES: usize = 50;
const BASE: &str = "zigbee2mqtt";

#[derive(Parser, Debug)]
#[command(
    name = "bench-hub",
    about = "Event → command latency, throughput, CPU and RSS: Hearth's hub (on Mosquitto and with its \
             embedded broker) against Node-RED and a bare relay. Normally run by `bench/hub`."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The hearth-hub binary (release build).
    #[arg(long, default_value = "target/release/hearth-hub")]
    hub: PathBuf,
    /// Node-RED's launcher (`node-red`); the Node-RED row is skipped when absent.
    #[arg(long, default_value = "bench/.node-red/node_modules/.bin/node-red")]
    node_red: PathBuf,
    /// Mosquitto broker binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Seconds per measured step.
    #[arg(long, default_value_t = 5.0)]
    step_secs: f64,
    /// Seconds of the embedded-broker soak at 10,000/s (300 for the full test).
    #[arg(long, default_value_t = 30)]
    soak_secs: u64,
    /// Rates tried above 10,000/s for the maximum sustained rate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "15000,20000,25000,30000,40000,50000"
    )]
    search: Vec<u32>,
    /// Contenders to run (mosquitto-relay, rust-relay, hub, node-red, hub-embedded).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory for hub.md and hub.json.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A minimal Rust relay: every event on `hearth/+/event/+` is published unchanged to
    /// `<base>/relay/set` (QoS 1 both ways): the floor a router cannot beat.
    Relay {
        #[arg(long)]
        broker: SocketAddr,
    },
    /// Writes the rules file, hub configs, Node-RED flow and Mosquitto config to a directory.
    Configs {
        dir: PathBuf,
        #[arg(long, default_value_t = 1883)]
        mqtt_port: u16,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match &cli.command {
        Some(Cmd::Relay { broker }) => rt.block_on(relay(*broker)),
        Some(Cmd::Configs { dir, mqtt_port }) => {
            std::fs::create_dir_all(dir)?;
            let ports = Ports {
                mosquitto: *mqtt_port,
                embedded: free_port()?,
                metrics: free_port()?,
                node_red: free_port()?,
            };
            write_configs(dir, &ports)?;
            println!("configs written to {}", dir.display());
            Ok(())
        }
        None => rt.block_on(bench(&cli)),
    }
}

async fn relay(broker: SocketAddr) -> Result<()> {
    let opts = |suffix: &str| {
        let mut o = MqttOptions::new(
            format!("bench-relay-{suffix}-{}", std::process::id()),
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(1000);
        o
    };
    // Two connections, as in the hub: awaiting a publish never stalls the subscriber.
    let (publisher, mut pub_el) = AsyncClient::new(opts("pub"), 4096);
    tokio::spawn(async move {
        loop {
            if let Err(e) = pub_el.poll().await {
                eprintln!("relay publisher: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let (client, mut el) = AsyncClient::new(opts("sub"), 64);
    let topic = format!("{BASE}/relay/set");
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .subscribe("hearth/+/event/+", QoS::AtLeastOnce)
                    .await?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                publisher
                    .publish(topic.clone(), QoS::AtLeastOnce, false, p.payload.to_vec())
                    .await?;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("relay: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

struct Ports {
    mosquitto: u16,
    embedded: u16,
    metrics: u16,
    node_red: u16,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The rules a home has: one presence rule per room (a score condition, every other one a
/// time window, a payload template carrying the event's id and score), plus rules that the
/// benchmark's events never fire: device patterns (checked on every event), state and
/// availability triggers.
fn rules_toml() -> String {
    let mut s = String::from("# Generated by bench-hub: 50 rules that fire, 20 that never do.\n");
    for i in 0..DEVICES {
        let d = hubload::device_name(i);
        let _ = write!(
            s,
            "\n[[rule]]\nname = \"{d} presence\"\n[rule.when]\ndevice = \"{d}\"\nevent = \"detection\"\n\
             class = \"person\"\nmin_score = 0.6\n[[rule.condition]]\nkind = \"score\"\nmin = 0.5\n"
        );
        if i % 2 == 0 {
            s.push_str(
                "[[rule.condition]]\nkind = \"time\"\nafter = \"00:00\"\nbefore = \"23:59:59\"\n",
            );
        }
        let _ = write!(
            s,
            "[rule.then]\nactuator = \"{d}_light\"\n\
             payload = {{ state = \"ON\", event_id = \"{{{{ id }}}}\", score = \"{{{{ score }}}}\", note = \"{{{{ class }}}} in {{{{ device }}}}\" }}\n"
        );
    }
    for i in 0..10 {
        let _ = write!(
            s,
            "\n[[rule]]\nname = \"garage {i} car\"\ncooldown_secs = 30\n[rule.when]\ndevice = \"garage-{i}*\"\n\
             class = \"car\"\nmin_score = 0.7\n[rule.then]\nactuator = \"garage_{i}_light\"\n\
             payload = {{ state = \"ON\", event_id = \"{{{{ id }}}}\" }}\n"
        );
    }
    for i in 0..5 {
        let _ = write!(
            s,
            "\n[[rule]]\nname = \"tv {i} movie mode\"\n[rule.when]\nkind = \"state\"\ndevice = \"tv_{i}\"\n\
             to = \"ON\"\n[rule.then]\nactuator = \"lamp_{i}\"\npayload = {{ brightness = 30 }}\n"
        );
        let _ = write!(
            s,
            "\n[[rule]]\nname = \"door {i} offline\"\n[rule.when]\nkind = \"availability\"\n\
             device = \"door-{i}\"\nto = \"offline\"\n[rule.then]\nactuator = \"siren_{i}\"\n\
             payload = {{ state = \"ON\", note = \"{{{{ device }}}} {{{{ availability }}}}\" }}\n"
        );
    }
    s
}

fn hub_toml(dir: &Path, name: &str, broker: &str, metrics: u16) -> String {
    let d = dir.display();
    format!(
        "client_id = \"bench-{name}\"\nactuator_base = \"{BASE}\"\nrules = \"{d}/rules.toml\"\n\
         metrics_listen = \"127.0.0.1:{metrics}\"\nstate_dir = \"{d}/{name}-state\"\n\n\
         [delivery]\nstate_file = \"{d}/{name}-outbox.jsonl\"\n\n\
         [rules_engine]\nhistory = \"{d}/{name}-history\"\n\n\
         [zigbee2mqtt]\nenabled = true\n\n\
         [mqtt_auth]\ndir = \"{d}/{name}-mqtt\"\nallow_anonymous = true\nrefresh = \"off\"\n\n\
         [broker]\n{broker}\n"
    )
}

/// Node-RED's equivalent of the 50 firing rules: mqtt in (JSON) → switch on the topic (one
/// output per room) → switch on the class → switch on the score → change (payload from a
/// JSONata template carrying the event's id and score, topic of the room's light) → mqtt out.
fn node_red_flow(mqtt_port: u16) -> serde_json::Value {
    use serde_json::json;
    let mut nodes = vec![
        json!({"id": "tab", "type": "tab", "label": "hearth bench"}),
        json!({"id": "broker", "type": "mqtt-broker", "name": "mosquitto", "broker": "127.0.0.1",
               "port": mqtt_port.to_string(), "clientid": "", "autoConnect": true, "usetls": false,
               "protocolVersion": "4", "keepalive": "60", "cleansession": true,
               "birthTopic": "", "closeTopic": "", "willTopic": ""}),
        json!({"id": "out", "type": "mqtt out", "z": "tab", "name": "", "topic": "", "qos": "1",
               "retain": "false", "broker": "broker", "x": 900, "y": 100, "wires": []}),
    ];
    let mut rules = Vec::new();
    let mut outputs = Vec::new();
    for i in 0..DEVICES {
        let d = hubload::device_name(i);
        rules.push(json!({"t": "eq", "v": format!("hearth/{d}/event/detection"), "vt": "str"}));
        outputs.push(vec![format!("class-{i}")]);
        nodes.push(
            json!({"id": format!("class-{i}"), "type": "switch", "z": "tab", "name": "",
            "property": "payload.class", "propertyType": "msg",
            "rules": [{"t": "eq", "v": "person", "vt": "str"}], "checkall": "true",
            "repair": false, "outputs": 1, "x": 400, "y": 40 * i,
            "wires": [[format!("score-{i}")]]}),
        );
        nodes.push(
            json!({"id": format!("score-{i}"), "type": "switch", "z": "tab", "name": "",
            "property": "payload.score", "propertyType": "msg",
            "rules": [{"t": "gte", "v": "0.6", "vt": "num"}], "checkall": "true",
            "repair": false, "outputs": 1, "x": 550, "y": 40 * i,
            "wires": [[format!("cmd-{i}")]]}),
        );
        nodes.push(json!({"id": format!("cmd-{i}"), "type": "change", "z": "tab", "name": "",
            "rules": [
                {"t": "set", "p": "payload", "pt": "msg",
                 "to": format!("{{\"state\": \"ON\", \"event_id\": payload.id, \"score\": payload.score, \"note\": payload.class & \" in {d}\"}}"),
                 "tot": "jsonata"},
                {"t": "set", "p": "topic", "pt": "msg", "to": format!("{BASE}/{d}_light/set"), "tot": "str"}
            ],
            "x": 700, "y": 40 * i, "wires": [["out"]]}));
    }
    nodes.push(
        json!({"id": "topics", "type": "switch", "z": "tab", "name": "rooms",
        "property": "topic", "propertyType": "msg", "rules": rules, "checkall": "false",
        "repair": false, "outputs": DEVICES, "x": 250, "y": 100, "wires": outputs}),
    );
    nodes.push(
        json!({"id": "in", "type": "mqtt in", "z": "tab", "name": "",
        "topic": "hearth/+/event/+", "qos": "1", "datatype": "json", "broker": "broker",
        "nl": false, "rap": true, "rh": 0, "inputs": 0, "x": 100, "y": 100, "wires": [["topics"]]}),
    );
    serde_json::Value::Array(nodes)
}

fn write_configs(dir: &Path, p: &Ports) -> Result<()> {
    std::fs::write(dir.join("rules.toml"), rules_toml())?;
    std::fs::write(
        dir.join("hub-mosquitto.toml"),
        hub_toml(
            dir,
            "hub",
            &format!("url = \"mqtt://127.0.0.1:{}\"", p.mosquitto),
            p.metrics,
        ),
    )?;
    std::fs::write(
        dir.join("hub-embedded.toml"),
        hub_toml(
            dir,
            "embedded",
            &format!("listen = \"127.0.0.1:{}\"", p.embedded),
            p.metrics,
        ),
    )?;
    // Same queue and in-flight limits as the embedded broker's (100 in flight per
    // client); the default 1,000 queued messages would drop for a receiver at 20k/s.
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 100\nmax_queued_messages 100000\n\
             log_dest stderr\nlog_type error\nlog_type warning\n",
            p.mosquitto
        ),
    )?;
    let nr = dir.join("node-red");
    std::fs::create_dir_all(&nr)?;
    std::fs::write(
        nr.join("flows.json"),
        serde_json::to_vec_pretty(&node_red_flow(p.mosquitto))?,
    )?;
    std::fs::write(
        nr.join("settings.js"),
        format!(
            "module.exports = {{ uiHost: \"127.0.0.1\", uiPort: {}, flowFile: \"flows.json\", \
             credentialSecret: false, logging: {{ console: {{ level: \"warn\" }} }} }};\n",
            p.node_red
        ),
    )?;
    Ok(())
}

/// A started contender: its processes (killed by PID when dropped).
struct Procs {
    children: Vec<Child>,
}

impl Procs {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    fn alive(&mut self) -> bool {
        self.children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn cpu(&self) -> f64 {
        self.pids().into_iter().filter_map(hubload::cpu_secs).sum()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Result<Stdio> {
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
}

fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Result<Child> {
    cmd.stdout(log_file(dir, name)?)
        .stderr(log_file(dir, &format!("{name}.err"))?)
        .spawn()
        .with_context(|| format!("cannot start {name} ({cmd:?})"))
}

#[derive(Debug, Clone, Serialize)]
struct Step {
    result: LoadResult,
    /// CPU seconds of the contender's processes during the step.
    cpu: f64,
    /// CPU seconds of the shared Mosquitto during the step (0 for the embedded broker).
    broker_cpu: f64,
    /// Peak RSS of the contender's processes during the step, KiB.
    rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    name: String,
    what: String,
    steps: Vec<Step>,
    max_sustained: Option<u32>,
    peak_rss_kib: u64,
    error: Option<String>,
}

struct Bench<'a> {
    cli: &'a Cli,
    dir: PathBuf,
    ports: Ports,
    broker_pid: u32,
}

impl Bench<'_> {
    fn spec(&self, port: u16, rate: u32, secs: f64) -> LoadSpec {
        LoadSpec {
            broker: SocketAddr::from(([127, 0, 0, 1], port)),
            rate,
            secs,
            devices: DEVICES,
            base: BASE.into(),
            drain: Duration::from_secs(2),
        }
    }

    fn start(&self, name: &str) -> Result<(Procs, u16)> {
        let d = &self.dir;
        let mq = self.ports.mosquitto.to_string();
        let children = match name {
            "mosquitto-relay" => {
                let mut sub = Command::new("mosquitto_sub");
                sub.args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &mq,
                    "-q",
                    "1",
                    "-t",
                    "hearth/+/event/+",
                ])
                .stdout(Stdio::piped())
                .stderr(log_file(d, "mosquitto_sub.err")?);
                let mut sub = sub.spawn().context("mosquitto_sub (mosquitto-clients)")?;
                let out = sub.stdout.take().context("mosquitto_sub stdout")?;
                let publ = spawn(
                    d,
                    "mosquitto_pub",
                    Command::new("mosquitto_pub")
                        .args(["-h", "127.0.0.1", "-p", &mq, "-q", "1", "-l", "-t"])
                        .arg(format!("{BASE}/relay/set"))
                        .stdin(Stdio::from(out)),
                )?;
                vec![sub, publ]
            }
            "rust-relay" => vec![spawn(
                d,
                "rust-relay",
                Command::new(std::env::current_exe()?)
                    .args(["relay", "--broker"])
                    .arg(format!("127.0.0.1:{mq}")),
            )?],
            "hub" => vec![spawn(
                d,
                "hub",
                Command::new(&self.cli.hub)
                    .arg("--config")
                    .arg(d.join("hub-mosquitto.toml"))
                    .env("RUST_LOG", "warn"),
            )?],
            "hub-embedded" => vec![spawn(
                d,
                "hub-embedded",
                Command::new(&self.cli.hub)
                    .arg("--config")
                    .arg(d.join("hub-embedded.toml"))
                    .env("RUST_LOG", "warn"),
            )?],
            "node-red" => vec![spawn(
                d,
                "node-red",
                Command::new(&self.cli.node_red)
                    .arg("-u")
                    .arg(d.join("node-red"))
                    .arg("flows.json"),
            )?],
            other => bail!("unknown contender {other}"),
        };
        let port = if name == "hub-embedded" {
            self.ports.embedded
        } else {
            self.ports.mosquitto
        };
        Ok((Procs { children }, port))
    }

    /// Waits (≤ 60 s) until an event gets its command.
    async fn ready(&self, procs: &mut Procs, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !procs.alive() {
                bail!(
                    "exited during start-up (see its log in {})",
                    self.dir.display()
                );
            }
            if let Ok(r) = hubload::run(&LoadSpec {
                drain: Duration::from_millis(500),
                ..self.spec(port, 20, 0.25)
            })
            .await
            {
                if r.received > 0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("no command within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn step(&self, procs: &Procs, port: u16, rate: u32, secs: f64) -> Result<Step> {
        let broker = port == self.ports.mosquitto;
        let cpu0 = procs.cpu();
        let b0 = hubload::cpu_secs(self.broker_pid).unwrap_or(0.0);
        let sampler = RssSampler::start(procs.pids(), Duration::from_millis(100));
        let result = hubload::run(&self.spec(port, rate, secs))
            .await
            .map_err(anyhow::Error::msg)?;
        let (peak, _) = sampler.stop();
        let step = Step {
            cpu: procs.cpu() - cpu0,
            broker_cpu: if broker {
                hubload::cpu_secs(self.broker_pid).unwrap_or(0.0) - b0
            } else {
                0.0
            },
            rss_kib: peak.iter().sum(),
            result,
        };
        eprintln!(
            "  {rate:>6}/s: sent {} lost {} dup {} p50 {:.2} ms p99 {:.2} ms max {:.2} ms, \
             achieved {:.0}/s, tail {:.0} ms, cpu {:.2} s (+ broker {:.2} s), rss {:.1} MiB",
            step.result.sent,
            step.result.lost,
            step.result.duplicates,
            step.result.p50_us / 1e3,
            step.result.p99_us / 1e3,
            step.result.max_us / 1e3,
            step.result.achieved_rate,
            step.result.tail_ms,
            step.cpu,
            step.broker_cpu,
            step.rss_kib as f64 / 1024.0
        );
        Ok(step)
    }

    async fn contender(&self, name: &str, what: &str) -> Row {
        eprintln!("{name}: {what}");
        let mut row = Row {
            name: name.into(),
            what: what.into(),
            steps: Vec::new(),
            max_sustained: None,
            peak_rss_kib: 0,
            error: None,
        };
        if let Err(e) = self.measure(name, &mut row).await {
            eprintln!("  {name}: {e:#}");
            row.error = Some(format!("{e:#}"));
        }
        row
    }

    async fn measure(&self, name: &str, row: &mut Row) -> Result<()> {
        let (mut procs, port) = self.start(name)?;
        self.ready(&mut procs, port).await?;
        // Warm-up (JIT, caches, connections), not recorded.
        let _ = hubload::run(&self.spec(port, 1000, 1.0)).await;
        let secs = self.cli.step_secs;
        for rate in [1000, 10_000] {
            let s = self.step(&procs, port, rate, secs).await?;
            if s.result.sustained() {
                row.max_sustained = Some(rate);
            }
            row.steps.push(s);
        }
        if row.max_sustained == Some(10_000) {
            for &rate in &self.cli.search {
                if !procs.alive() {
                    bail!("exited during the rate search");
                }
                let s = self.step(&procs, port, rate, secs).await?;
                let ok = s.result.sustained();
                row.steps.push(s);
                if !ok {
                    break;
                }
                row.max_sustained = Some(rate);
            }
        }
        row.peak_rss_kib = procs
            .pids()
            .into_iter()
            .filter_map(|p| hubload::status_kib(p, "VmHWM"))
            .sum();
        if name.starts_with("hub") {
            if let Some(m) = scrape(self.ports.metrics) {
                eprintln!("  hub metrics: {m}");
            }
        }
        Ok(())
    }

    /// The embedded-broker hub at 10,000/s for `secs`: RSS every second, CPU.
    async fn soak(&self, secs: u64) -> Result<Soak> {
        let (mut procs, port) = self.start("hub-embedded")?;
        self.ready(&mut procs, port).await?;
        let cpu0 = procs.cpu();
        let sampler = RssSampler::start(procs.pids(), Duration::from_secs(1));
        let result = hubload::run(&self.spec(port, 10_000, secs as f64))
            .await
            .map_err(anyhow::Error::msg)?;
        let (_, series) = sampler.stop();
        let cpu = procs.cpu() - cpu0;
        Ok(Soak {
            secs,
            result,
            cpu,
            rss_mib: series.iter().map(|k| *k as f64 / 1024.0).collect(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
struct Soak {
    secs: u64,
    result: LoadResult,
    cpu: f64,
    rss_mib: Vec<f64>,
}

/// A few counters from the hub's `/metrics` (history written/dropped, events dropped).
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let keep = [
        "hearth_hub_rules_history_written_total",
        "hearth_hub_rules_history_dropped_total",
        "hearth_hub_events_received_total",
        "hearth_hub_commands_published_total",
    ];
    Some(
        body.lines()
            .filter(|l| {
                keep.iter().any(|k| l.starts_with(k))
                    || l.starts_with("hearth_hub_events_dropped_total")
            })
            .collect::<Vec<_>>()
            .join("; "),
    )
}

fn ms(us: f64) -> String {
    if us.is_nan() {
        "–".into()
    } else if us < 10_000.0 {
        format!("{:.2}", us / 1e3)
    } else {
        format!("{:.0}", us / 1e3)
    }
}

fn table(rows: &[Row], soak: Option<&Soak>, load: &str, cli: &Cli) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Event → rule → command on one Mosquitto 2.0 (QoS 1), {DEVICES} rooms, 70 rules (50 fire), \
         {:.0} s per step; machine load before the run: {load}.\n",
        cli.step_secs
    );
    s.push_str(
        "| contender | 1k/s p50 / p99 / max (ms) | 10k/s p50 / p99 / max (ms) | lost at 1k / 10k | \
         max sustained, zero loss (events/s) | CPU s per 100k events at 10k/s: contender + broker | peak RSS (MiB) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        if let Some(e) = &r.error {
            if r.steps.len() < 2 {
                let _ = writeln!(s, "| {} ({}) | failed: {e} | | | | | |", r.name, r.what);
                continue;
            }
        }
        let cell = |rate: u32| {
            r.steps
                .iter()
                .find(|st| st.result.rate == rate)
                .map(|st| {
                    format!(
                        "{} / {} / {}",
                        ms(st.result.p50_us),
                        ms(st.result.p99_us),
                        ms(st.result.max_us)
                    )
                })
                .unwrap_or_else(|| "–".into())
        };
        let lost = |rate: u32| {
            r.steps
                .iter()
                .find(|st| st.result.rate == rate)
                .map(|st| st.result.lost.to_string())
                .unwrap_or_else(|| "–".into())
        };
        let cpu = r
            .steps
            .iter()
            .find(|st| st.result.rate == 10_000)
            .map(|st| {
                let per = 100_000.0 / st.result.sent.max(1) as f64;
                format!("{:.2} + {:.2}", st.cpu * per, st.broker_cpu * per)
            })
            .unwrap_or_else(|| "–".into());
        let max = match (r.max_sustained, r.steps.last()) {
            (Some(m), Some(last)) if last.result.rate > m => {
                format!(
                    "{m} (next step {}: lost {}, reached {:.0}/s, tail {:.0} ms)",
                    last.result.rate,
                    last.result.lost,
                    last.result.achieved_rate,
                    last.result.tail_ms
                )
            }
            (Some(m), _) => format!("≥ {m} (highest step tried)"),
            (None, _) => "< 1000".into(),
        };
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} / {} | {} | {} | {:.1} |",
            r.name,
            r.what,
            cell(1000),
            cell(10_000),
            lost(1000),
            lost(10_000),
            max,
            cpu,
            r.peak_rss_kib as f64 / 1024.0
        );
    }
    if let Some(k) = soak {
        let n = k.rss_mib.len();
        let at = |f: f64| {
            k.rss_mib
                .get(((n as f64 - 1.0) * f) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let half = &k.rss_mib[n / 2..];
        let (lo, hi) = half
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        let _ = writeln!(
            s,
            "\nSoak, hub with its embedded broker at 10,000 events/s for {} s: sent {}, lost {}, \
             p99 {} ms; RSS (MiB) at 10 % / 50 % / end: {:.1} / {:.1} / {:.1}, second half \
             min–max {:.1}–{:.1}, peak {:.1}; CPU {:.1} s ({:.2} s per 100k events).",
            k.secs,
            k.result.sent,
            k.result.lost,
            ms(k.result.p99_us),
            at(0.1),
            at(0.5),
            at(1.0),
            lo,
            hi,
            k.rss_mib.iter().cloned().fold(0.0, f64::max),
            k.cpu,
            k.cpu * 100_000.0 / k.result.sent.max(1) as f64
        );
    }
    s
}

async fn bench(cli: &Cli) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let ports = Ports {
        mosquitto: free_port()?,
        embedded: free_port()?,
        metrics: free_port()?,
        node_red: free_port()?,
    };
    write_configs(&dir, &ports)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let mosquitto = spawn(
        &dir,
        "mosquitto",
        Command::new(&cli.mosquitto)
            .arg("-c")
            .arg(dir.join("mosquitto.conf")),
    )?;
    let broker = Procs {
        children: vec![mosquitto],
    };
    let mut up = false;
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", ports.mosquitto)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !up {
        bail!("mosquitto did not listen on {}", ports.mosquitto);
    }
    let b = Bench {
        cli,
        dir: dir.clone(),
        ports,
        broker_pid: broker.pids()[0],
    };
    let all: Vec<(&str, &str)> = vec![
        (
            "mosquitto-relay",
            "mosquitto_sub | mosquitto_pub -l, no rules",
        ),
        ("rust-relay", "rumqttc forwarder, no rules"),
        ("hub", "Hearth hub on Mosquitto"),
        ("node-red", "Node-RED 4.1.8, equivalent flow"),
        ("hub-embedded", "Hearth hub, embedded broker"),
    ];
    let mut rows = Vec::new();
    for (name, what) in all {
        if !cli.only.is_empty() && !cli.only.iter().any(|o| o == name) {
            continue;
        }
        if name == "node-red" && !cli.node_red.exists() {
            eprintln!("node-red: {} not found, skipped", cli.node_red.display());
            continue;
        }
        rows.push(b.contender(name, what).await);
    }
    let soak = if cli.soak_secs > 0 && (cli.only.is_empty() || cli.only.iter().any(|o| o == "soak"))
    {
        eprintln!(
            "soak: hub with its embedded broker, 10,000/s for {} s",
            cli.soak_secs
        );
        match b.soak(cli.soak_secs).await {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("  soak: {e:#}");
                None
            }
        }
    } else {
        None
    };
    drop(broker);
    let md = table(&rows, soak.as_ref(), &load, cli);
    println!("{md}");
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(cli.out.join("hub.md"), &md)?;
    std::fs::write(
        cli.out.join("hub.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"load": load, "rows": rows, "soak": soak}))?,
    )?;
    if std::env::var_os("BENCH_HUB_KEEP").is_some() {
        eprintln!("logs and configs kept in {}", tmp.keep().display());
    }
    Ok(())
}
