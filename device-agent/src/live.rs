//! Live sources at run time ([`crate::source`]): an MQTT reader of a device's state topic or a
//! command's lines feed timed readings into a bounded channel; the window loop cuts them into
//! sliding windows, preprocesses each with the task file's chain, classifies it off the
//! runtime and publishes the verdict. Readings are never published: the only thing leaving
//! this module is an [`hearth_proto::mqtt::Event`] (through [`crate::agent::Shared::publish_verdict`]).

use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_edge::{stopped, Backoff, ClientSettings, Connection, MqttUrl};
use rumqttc::{Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::agent::{Published, Shared};
use crate::source::{
    read_field, read_line, CommandSource, MqttSource, Skip, SourceConfig, Windower, MAX_LINE_BYTES,
    MAX_MESSAGE_BYTES,
};
use crate::stats::add;

/// Readings waiting for the window loop; beyond this they are dropped (and counted).
const QUEUE: usize = 8192;

/// One reading: seconds since the source started, one value per channel.
#[derive(Debug)]
struct Reading {
    t: f64,
    values: Vec<f32>,
}

/// Counts a skipped reading.
fn skipped(shared: &Shared, why: &Skip, origin: &str) {
    match why {
        Skip::Missing => add(&shared.stats.readings_missing, 1),
        Skip::Malformed(m) => {
            let n = shared
                .stats
                .readings_malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n <= 5 || n.is_power_of_two() {
                tracing::warn!(source = origin, count = n, "malformed reading skipped: {m}");
            }
        }
    }
}

/// Hands a reading to the window loop, counting it (or its drop when the loop lags).
fn deliver(shared: &Shared, tx: &mpsc::Sender<Reading>, r: Reading) {
    match tx.try_send(r) {
        Ok(()) => add(&shared.stats.readings, 1),
        Err(_) => add(&shared.stats.readings_dropped, 1),
    }
}

/// Runs the configured live source until it ends or `stop`; `done` is set either way.
pub(crate) async fn run(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    done: watch::Sender<bool>,
) {
    let src = shared.config.source.clone();
    let Some(w) = src.windowing() else {
        let _ = done.send(true);
        return;
    };
    let channels = shared.task.input.channels();
    let window = w
        .window
        .or(shared.task.input.length())
        .expect("validated: a window length");
    let hop = w.hop.unwrap_or(window);
    let mut windower = Windower::new(channels, window, hop, w.rate_hz);
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let started = Instant::now();
    let reader = match src {
        SourceConfig::Mqtt(m) => {
            tokio::spawn(mqtt_reader(shared.clone(), m, tx, started, stop.clone()))
        }
        SourceConfig::Command(c) => tokio::spawn(command_reader(
            shared.clone(),
            c,
            channels,
            tx,
            started,
            stop.clone(),
        )),
        SourceConfig::Replay => unreachable!("replay has no windowing"),
    };
    tracing::info!(window, hop, channels, "live source started");
    let limit = shared.config.replay_limit.unwrap_or(u64::MAX);
    let mut windows: u64 = 0;
    let mut stop_rx = stop.clone();
    'outer: while windows < limit {
        let r = tokio::select! {
            _ = stopped(&mut stop_rx) => break,
            r = rx.recv() => match r {
                Some(r) => r,
                None => break, // the source ended
            },
        };
        for win in windower.push(r.t, &r.values) {
            // The front end of the model in use (adopted with it), off the runtime.
            let task = shared
                .slot
                .current()
                .task
                .clone()
                .unwrap_or_else(|| Arc::new(shared.task.clone()));
            let pre = tokio::task::spawn_blocking(move || task.preprocess(&win)).await;
            let input = match pre
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(x) => x,
                Err(e) => {
                    add(&shared.stats.inference_errors, 1);
                    tracing::warn!("window not usable: {e}");
                    continue;
                }
            };
            add(&shared.stats.windows, 1);
            windows += 1;
            if let Published::Closed = shared.publish_verdict(input, &mut stop_rx).await {
                break 'outer;
            }
            if windows >= limit {
                break 'outer;
            }
        }
    }
    reader.abort();
    tracing::info!(windows, "live source finished");
    let _ = done.send(true);
}

/// Subscribes to the device's state topic (again after every reconnect) and turns each
/// message's field into a reading.
async fn mqtt_reader(
    shared: Arc<Shared>,
    m: MqttSource,
    tx: mpsc::Sender<Reading>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = &shared.config;
    let (url, password_file, ca_file) = match &m.url {
        Some(u) => (u.clone(), m.password_file.clone(), m.ca_file.clone()),
        None => (
            cfg.mqtt.clone(),
            cfg.mqtt_password_file.clone(),
            cfg.mqtt_ca_file.clone(),
        ),
    };
    let topic = m.topic().expect("validated");
    let field = m.field();
    let settings = match MqttUrl::parse(&url) {
        Ok(u) => ClientSettings::new(u, format!("hearth-agent-{}-source", cfg.device))
            .keep_alive(Duration::from_secs(15))
            .max_packet_size(2 * MAX_MESSAGE_BYTES)
            .request_capacity(16)
            .ca_file(ca_file)
            .password_file(password_file),
        Err(e) => {
            tracing::error!("source broker: {e}");
            return;
        }
    };
    let (client, el) = match settings.connect() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("source broker: {e}");
            return;
        }
    };
    let mut conn = Connection::new(el, format!("source {topic}"));
    let mut stop_fut = Box::pin(async move { stopped(&mut stop).await });
    while let Some(ev) = conn.poll_until(&mut stop_fut).await {
        match ev {
            rumqttc::Event::Incoming(Packet::ConnAck(_)) => {
                tracing::info!(%topic, %field, "source connected");
                if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                    tracing::warn!("cannot subscribe to {topic}: {e}");
                }
            }
            rumqttc::Event::Incoming(Packet::Publish(p)) if p.topic == topic => {
                match read_field(&p.payload, &field) {
                    Ok(v) => deliver(
                        &shared,
                        &tx,
                        Reading {
                            t: started.elapsed().as_secs_f64(),
                            values: vec![v],
                        },
                    ),
                    Err(why) => skipped(&shared, &why, &topic),
                }
            }
            _ => {}
        }
    }
    conn.disconnect(&client, Duration::from_secs(2)).await;
}

/// One line of a command source.
enum Line {
    Text(String),
    TooLong,
}

/// Reads `r` line by line on a thread of its own (blocking reads), at most
/// [`MAX_LINE_BYTES`] per line; ends at EOF, on a read error or when the receiver is gone.
fn spawn_line_reader(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<Line> {
    let (tx, rx) = mpsc::channel(256);
    let spawned = std::thread::Builder::new()
        .name("hearth-source".into())
        .spawn(move || {
            let mut r = std::io::BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let mut too_long = false;
                let eof = loop {
                    let avail = match r.fill_buf() {
                        Ok(a) => a,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break true,
                    };
                    if avail.is_empty() {
                        break true;
                    }
                    let nl = avail.iter().position(|&b| b == b'\n');
                    let chunk = &avail[..nl.unwrap_or(avail.len())];
                    if !too_long {
                        if buf.len() + chunk.len() > MAX_LINE_BYTES {
                            too_long = true;
                            buf.clear();
                        } else {
                            buf.extend_from_slice(chunk);
                        }
                    }
                    let used = nl.map_or(avail.len(), |i| i + 1);
                    r.consume(used);
                    if nl.is_some() {
                        break false;
                    }
                };
                let line = if too_long {
                    Some(Line::TooLong)
                } else if !buf.is_empty() || !eof {
                    Some(Line::Text(String::from_utf8_lossy(&buf).into_owned()))
                } else {
                    None
                };
                if let Some(l) = line {
                    if tx.blocking_send(l).is_err() {
                        return;
                    }
                }
                if eof {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the source reader thread: {e}");
    }
    rx
}

/// Forwards the lines of `lines` as readings until it ends (`true`) or `stop` (`false`).
async fn forward_lines(
    shared: &Shared,
    lines: &mut mpsc::Receiver<Line>,
    channels: usize,
    tx: &mpsc::Sender<Reading>,
    started: Instant,
    stop: &mut watch::Receiver<bool>,
    origin: &str,
) -> bool {
    loop {
        let line = tokio::select! {
            _ = stopped(stop) => return false,
            l = lines.recv() => match l {
                Some(l) => l,
                None => return true,
            },
        };
        let parsed = match line {
            Line::Text(t) => read_line(&t, channels),
            Line::TooLong => Err(Skip::Malformed(format!(
                "a line longer than {MAX_LINE_BYTES} bytes"
            ))),
        };
        match parsed {
            Ok(values) => deliver(
                shared,
                tx,
                Reading {
                    t: started.elapsed().as_secs_f64(),
                    values,
                },
            ),
            Err(why) => skipped(shared, &why, origin),
        }
    }
}

/// Reads the agent's stdin (`program = "-"`) or runs the program, restarting it when it
/// exits if asked to.
async fn command_reader(
    shared: Arc<Shared>,
    c: CommandSource,
    channels: usize,
    tx: mpsc::Sender<Reading>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) {
    if c.program == "-" {
        let mut lines = spawn_line_reader(std::io::stdin());
        forward_lines(
            &shared, &mut lines, channels, &tx, started, &mut stop, "stdin",
        )
        .await;
        return;
    }
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let spawned = std::process::Command::new(&c.program)
            .args(&c.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn();
        match spawned {
            Ok(mut child) => {
                let ended = match child.stdout.take() {
                    Some(out) => {
                        let mut lines = spawn_line_reader(out);
                        forward_lines(
                            &shared, &mut lines, channels, &tx, started, &mut stop, &c.program,
                        )
                        .await
                    }
                    None => true,
                };
                if !ended {
                    // Stopping: the child goes with the agent.
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                // Its stdout closed: reap it (or end it) without blocking the runtime.
                let status = tokio::task::spawn_blocking(move || {
                    for _ in 0..20 {
                        if let Ok(Some(s)) = child.try_wait() {
                            return Some(s);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = child.kill();
                    child.wait().ok()
                })
                .await
                .ok()
                .flatten();
                tracing::info!(program = %c.program, ?status, "source command ended");
                backoff.reset();
            }
            Err(e) => tracing::warn!(program = %c.program, "cannot start the source command: {e}"),
        }
        if !c.restart {
            return;
        }
        let wait = backoff.next_wait();
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
