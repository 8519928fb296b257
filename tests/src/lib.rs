//! Helpers shared by the end-to-end tests in `tests/tests/`: a raw MQTT observer that records
//! every message on the broker, and checks on what it saw.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_edge::{ClientSettings, Connection, MqttUrl};
use rumqttc::{AsyncClient, Event, Packet, QoS};

/// One message seen on the broker.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Subscribes to `#` and records everything until dropped.
#[derive(Debug)]
pub struct Observer {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// Connects to the broker at `url` (`mqtt://user:password@host:port`), subscribes to `#`
    /// and returns once subscribed; panics if it cannot.
    pub async fn start(url: &str, id: &str) -> Observer {
        Observer::connect(url, id)
            .await
            .unwrap_or_else(|e| panic!("observer {id}: {e}"))
    }

    /// [`Observer::start`], returning why it could not connect and subscribe within 5 s
    /// (e.g. the broker refused its credentials).
    pub async fn connect(url: &str, id: &str) -> Result<Observer, String> {
        let url = MqttUrl::parse(url).map_err(|e| e.to_string())?;
        let (client, el) = ClientSettings::new(url, id)
            .keep_alive(Duration::from_secs(5))
            .max_packet_size(1 << 20)
            .request_capacity(100)
            .connect()
            .map_err(|e| e.to_string())?;
        let mut conn = Connection::new(el, format!("observer {id}"));
        let status = conn.status();
        client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Some(ev) = conn.poll().await {
                match ev {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => s.lock().unwrap().push(Seen {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    _ => {}
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(())) => Ok(Observer { seen, client, task }),
            _ => {
                task.abort();
                Err(format!(
                    "not subscribed within 5 s (last error: {})",
                    status.last_error().unwrap_or_else(|| "none".into())
                ))
            }
        }
    }

    /// A copy of everything seen so far.
    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Publishes a raw payload (for tests that play a misbehaving device).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Longest run of numbers (digits, '.', '-', 'e') separated by commas in a payload: a raw
/// waveform or image would show up as hundreds of them.
pub fn longest_number_run(payload: &[u8]) -> usize {
    let text = String::from_utf8_lossy(payload);
    let mut best = 0;
    let mut run = 0;
    for part in text.split(',') {
        // Keep what follows an opening bracket and precedes a closing one: `"a":[1.5` -> `1.5`.
        let t = part.rsplit('[').next().unwrap_or(part);
        let t = t.split(']').next().unwrap_or(t).trim();
        if !t.is_empty() && t.parse::<f64>().is_ok() {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    best
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn number_runs() {
        assert_eq!(super::longest_number_run(br#"{"a":[1.5,2,3,-4e3]}"#), 4);
        assert_eq!(
            super::longest_number_run(br#"{"class":"person","score":0.9}"#),
            0
        );
        assert_eq!(super::longest_number_run(b"0.1, 0.2,0.3"), 3);
    }
}
