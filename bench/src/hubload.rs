//! The hub benchmark's load generator and receiver (`bench/hub`), and the process probes
//! it samples.
//!
//! One run publishes Hearth events (`hearth/<device>/event/detection`, QoS 1) at a fixed
//! rate, each with an id `e<n>`, and receives the actuator commands (`<base>/+/set`, QoS 1)
//! a contender (the hub, Node-RED, a relay) publishes for them. A command is matched to its
//! event by the id it carries (`event_id`, which the rules' payload template copies from
//! `{{ id }}`, or the event's own `id` for a relay that forwards the event unchanged), so
//! latency is exact per event and loss and duplicates are counted, never inferred by order.
//! Both ends live in this process and share one clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// One load step.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Broker the generator and the receiver connect to.
    pub broker: SocketAddr,
    /// Events per second.
    pub rate: u32,
    /// Seconds of sending.
    pub secs: f64,
    /// Devices the events come from (`room-00` …), round robin.
    pub devices: usize,
    /// Actuator base of the commands (`<base>/+/set`).
    pub base: String,
    /// How long to wait after the last event for missing commands (without progress).
    pub drain: Duration,
}

/// What one step measured.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadResult {
    pub rate: u32,
    pub sent: u64,
    /// Events whose command arrived (each counted once).
    pub received: u64,
    pub lost: u64,
    /// Commands received more than once for the same event.
    pub duplicates: u64,
    /// Commands whose id is not one this step sent.
    pub foreign: u64,
    /// Events per second the generator actually achieved.
    pub achieved_rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The last command's arrival after the last event's publish (backlog), ms.
    pub tail_ms: f64,
}

impl LoadResult {
    /// Zero loss, the rate reached (within 3 %) and no backlog beyond a second.
    pub fn sustained(&self) -> bool {
        self.lost == 0 && self.achieved_rate >= 0.97 * self.rate as f64 && self.tail_ms < 1000.0
    }
}

/// The event payload of event `n` (valid for the hub's privacy guard).
pub fn event_payload(n: u64) -> String {
    format!(
        "{{\"class\":\"person\",\"score\":0.93,\"model\":\"bench@1\",\"ts\":\"2026-12-01T00:00:00Z\",\"id\":\"e{n}\"}}"
    )
}

/// The event topic of event `n` among `devices` devices.
pub fn event_topic(n: u64, devices: usize) -> String {
    format!(
        "hearth/{}/event/detection",
        device_name((n % devices as u64) as usize)
    )
}

/// Name of device `i`.
pub fn device_name(i: usize) -> String {
    format!("room-{i:02}")
}

/// The event number a command carries: `"event_id":"e<n>"`, else `"id":"e<n>"`.
pub fn command_id(payload: &[u8]) -> Option<u64> {
    let find = |key: &[u8]| {
        payload
            .windows(key.len())
            .position(|w| w == key)
            .map(|p| p + key.len())
    };
    let start = find(b"\"event_id\":\"e").or_else(|| find(b"\"id\":\"e"))?;
    let digits = payload[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

fn options(id: &str, broker: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_inflight(1000);
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o
}

/// Runs one step: connects the receiver (subscribed) and the generator, sends
/// `rate × secs` events evenly paced (1 ms ticks), waits for the commands, disconnects.
pub async fn run(spec: &LoadSpec) -> Result<LoadResult, String> {
    let n = (spec.rate as f64 * spec.secs).round().max(1.0) as u64;
    let nonce = std::process::id() ^ (t_nonce() as u32);
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let latency: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let received = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let foreign = Arc::new(AtomicU64::new(0));
    let last_arrival = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();

    // Receiver.
    let (rx_client, mut rx_el) =
        AsyncClient::new(options(&format!("bench-rx-{nonce:08x}"), spec.broker), 64);
    let filter = format!("{}/+/set", spec.base);
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let receiver = {
        let (sent_at, latency, received, duplicates, foreign, last) = (
            sent_at.clone(),
            latency.clone(),
            received.clone(),
            duplicates.clone(),
            foreign.clone(),
            last_arrival.clone(),
        );
        let client = rx_client.clone();
        tokio::spawn(async move {
            let mut sub_tx = Some(sub_tx);
            loop {
                match rx_el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = t0.elapsed().as_nanos() as u64;
                        match command_id(&p.payload).filter(|&i| i < n) {
                            Some(i) => {
                                let s = sent_at[i as usize].load(Relaxed);
                                if s == 0 {
                                    foreign.fetch_add(1, Relaxed);
                                    continue;
                                }
                                let lat = now.saturating_sub(s - 1).max(1);
                                if latency[i as usize].swap(lat, Relaxed) == 0 {
                                    received.fetch_add(1, Relaxed);
                                    last.store(now, Relaxed);
                                } else {
                                    duplicates.fetch_add(1, Relaxed);
                                }
                            }
                            None => {
                                foreign.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                            if let Some(tx) = sub_tx.take() {
                                let _ = tx.send(Err(e.to_string()));
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                        // After the step's disconnect (or a broker hiccup): rumqttc reconnects.
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    let subscribed = tokio::time::timeout(Duration::from_secs(10), sub_rx).await;
    match subscribed {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            receiver.abort();
            return Err(format!("receiver cannot connect: {e}"));
        }
        _ => {
            receiver.abort();
            return Err("receiver: no SubAck within 10 s".into());
        }
    }

    // Generator.
    let (gen, mut gen_el) = AsyncClient::new(
        options(&format!("bench-gen-{nonce:08x}"), spec.broker),
        4096,
    );
    let (conn_tx, conn_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let gen_loop = tokio::spawn(async move {
        let mut conn_tx = Some(conn_tx);
        loop {
            match gen_el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), conn_rx).await {
        Ok(Ok(Ok(()))) => {}
        _ => {
            receiver.abort();
            gen_loop.abort();
            return Err("generator cannot connect".into());
        }
    }

    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < n {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * spec.rate as f64) as u64 + 1).min(n);
        while sent < due {
            let topic = event_topic(sent, spec.devices);
            let payload = event_payload(sent);
            sent_at[sent as usize].store(t0.elapsed().as_nanos() as u64 + 1, Relaxed);
            gen.publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| format!("publish: {e}"))?;
            sent += 1;
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    let last_sent = t0.elapsed().as_nanos() as u64;

    // Drain: until everything arrived, or no progress for `drain` (at most 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = received.load(Relaxed);
    let mut progress = Instant::now();
    while received.load(Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = received.load(Relaxed);
        if r != seen {
            seen = r;
            progress = Instant::now();
        } else if progress.elapsed() >= spec.drain {
            break;
        }
    }
    // Late duplicates (redeliveries) show up shortly after.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = gen.disconnect().await;
    let _ = rx_client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    gen_loop.abort();
    receiver.abort();

    let mut lat: Vec<u64> = latency
        .iter()
        .map(|a| a.load(Relaxed))
        .filter(|&x| x > 0)
        .collect();
    lat.sort_unstable();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i] as f64 / 1000.0
    };
    let received = received.load(Relaxed);
    let last = last_arrival.load(Relaxed);
    Ok(LoadResult {
        rate: spec.rate,
        sent,
        received,
        lost: sent - received,
        duplicates: duplicates.load(Relaxed),
        foreign: foreign.load(Relaxed),
        achieved_rate: sent as f64 / send_secs.max(1e-9),
        p50_us: q(0.5),
        p99_us: q(0.99),
        max_us: q(1.0),
        tail_ms: last.saturating_sub(last_sent) as f64 / 1e6,
    })
}

fn t_nonce() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// CPU seconds (user + system) of process `pid` so far, from `/proc/<pid>/stat`
/// (USER_HZ = 100 on Linux).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples the RSS of `pids` every `every` until stopped; the peak per pid (KiB) and the
/// series of their sum (KiB).
#[derive(Debug)]
pub struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<u64>, Vec<u64>)>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>, every: Duration) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            let mut series = Vec::new();
            while !s.load(Relaxed) {
                let mut sum = 0;
                for (i, &p) in pids.iter().enumerate() {
                    let r = status_kib(p, "VmRSS").unwrap_or(0);
                    peak[i] = peak[i].max(r);
                    sum += r;
                }
                series.push(sum);
                std::thread::sleep(every);
            }
            (peak, series)
        });
        RssSampler { stop, handle }
    }

    /// Stops; (peak per pid, series of the sum), KiB.
    pub fn stop(self) -> (Vec<u64>, Vec<u64>) {
        self.stop.store(true, Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_in_commands_and_in_forwarded_events() {
        assert_eq!(
            command_id(br#"{"state":"ON","event_id":"e42","hearth_id":"x"}"#),
            Some(42)
        );
        assert_eq!(command_id(event_payload(7).as_bytes()), Some(7));
        assert_eq!(command_id(br#"{"state":"ON"}"#), None);
        assert_eq!(event_topic(3, 2), "hearth/room-01/event/detection");
    }

    #[test]
    fn proc_probes_read_this_process() {
        let me = std::process::id();
        assert!(cpu_secs(me).is_some());
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
    }
}
