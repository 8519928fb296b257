//! The one reconnect loop of Hearth's long-lived MQTT clients (hub subscriber and
//! publisher, agent, actuator).
//!
//! [`Connection::poll`] wraps rumqttc's [`EventLoop::poll`]: connection errors never reach
//! the caller. Each one is counted, logged (the first five, then every power of two, so a
//! broker that stays down cannot flood the log), marks the link down, and the *next* poll
//! first waits out a [`Backoff`] step before rumqttc reconnects; a ConnAck resets the
//! backoff and marks the link up. The wait is stored as a deadline, so `poll` is
//! cancel-safe: callers `select!` it against their shutdown signal. [`LinkStatus`] is
//! shared (up/down as a watch channel, connections, last error) for readiness checks and
//! health endpoints.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Backoff;

/// Shared state of one MQTT connection.
#[derive(Debug)]
pub struct LinkStatus {
    up: watch::Sender<bool>,
    connects: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Default for LinkStatus {
    fn default() -> Self {
        LinkStatus {
            up: watch::channel(false).0,
            connects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl LinkStatus {
    /// Whether the broker acknowledged the connection and it has not failed since.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Watches up/down changes.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Connections acknowledged so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Connection failures so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_up(&self, up: bool) {
        self.up.send_if_modified(|v| std::mem::replace(v, up) != up);
    }
}

/// An MQTT event loop that reconnects by itself (see the module documentation).
pub struct Connection {
    el: EventLoop,
    backoff: Backoff,
    retry_at: Option<Instant>,
    label: String,
    status: Arc<LinkStatus>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("label", &self.label)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Whether the n-th failure is logged: the first five, then powers of two.
fn worth_logging(n: u64) -> bool {
    n <= 5 || n.is_power_of_two()
}

impl Connection {
    /// Wraps `el`; `label` names the connection in logs (e.g. `hub subscriber`).
    /// Uses [`Backoff::mqtt`].
    pub fn new(el: EventLoop, label: impl Into<String>) -> Connection {
        Connection {
            el,
            backoff: Backoff::mqtt(),
            retry_at: None,
            label: label.into(),
            status: Arc::default(),
        }
    }

    /// Uses `backoff` between reconnection attempts.
    pub fn with_backoff(mut self, backoff: Backoff) -> Connection {
        self.backoff = backoff;
        self
    }

    /// The shared status of this connection.
    pub fn status(&self) -> Arc<LinkStatus> {
        self.status.clone()
    }

    /// The next event. Connection errors are absorbed (logged, counted, backed off) and
    /// the loop reconnects. `None` once every [`AsyncClient`] of this connection is gone.
    /// Cancel-safe.
    pub async fn poll(&mut self) -> Option<Event> {
        loop {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
            }
            match self.el.poll().await {
                Ok(ev) => {
                    match &ev {
                        Event::Incoming(Packet::ConnAck(_)) => {
                            self.backoff.reset();
                            self.status.connects.fetch_add(1, Ordering::Relaxed);
                            self.status.set_up(true);
                            tracing::debug!(connection = %self.label, "MQTT connected");
                        }
                        Event::Outgoing(Outgoing::Disconnect) => self.status.set_up(false),
                        _ => {}
                    }
                    return Some(ev);
                }
                Err(ConnectionError::RequestsDone) => {
                    self.status.set_up(false);
                    return None;
                }
                Err(e) => {
                    self.status.set_up(false);
                    let n = self.status.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    *self
                        .status
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    let wait = self.backoff.next_wait();
                    if worth_logging(n) {
                        tracing::warn!(connection = %self.label, failures = n, retry_in = ?wait, "MQTT connection: {e}");
                    }
                    self.retry_at = Some(Instant::now() + wait);
                }
            }
        }
    }

    /// [`Connection::poll`] until `stop` resolves: `None` on `stop` or once every client is
    /// gone. The shape of every device loop: `while let Some(ev) = conn.poll_until(&mut stop)`.
    pub async fn poll_until<F: Future + Unpin>(&mut self, stop: &mut F) -> Option<Event> {
        tokio::select! {
            _ = stop => None,
            ev = self.poll() => ev,
        }
    }

    /// Drives the event loop until a queued Disconnect has been written, the connection
    /// drops, or `limit` passes.
    async fn drain_until_disconnect(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.el.poll()).await {
                Err(_) => return false,
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => {
                    self.status.set_up(false);
                    return true;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    self.status.set_up(false);
                    tracing::debug!(connection = %self.label, "MQTT connection closed during shutdown: {e}");
                    return true;
                }
            }
        }
    }

    /// Disconnects cleanly (after anything already queued), bounded by `limit`.
    pub async fn disconnect(&mut self, client: &AsyncClient, limit: Duration) {
        if let Err(e) = client.try_disconnect() {
            tracing::debug!(connection = %self.label, "could not queue the disconnect: {e}");
            return;
        }
        if !self.drain_until_disconnect(limit).await {
            tracing::warn!(connection = %self.label, "MQTT disconnect did not complete within {limit:?}");
        }
    }

    /// Publishes `offline` (retained, QoS 1) on `availability_topic`, then disconnects
    /// cleanly, bounded by `limit`: what a device does when it stops (its last will covers
    /// the unclean case).
    pub async fn go_offline(
        &mut self,
        client: &AsyncClient,
        availability_topic: &str,
        limit: Duration,
    ) {
        if let Err(e) = client.try_publish(availability_topic, QoS::AtLeastOnce, true, "offline") {
            tracing::warn!(connection = %self.label, "could not queue `offline`: {e}");
            return;
        }
        self.disconnect(client, limit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientSettings, MqttUrl};

    /// A loopback URL whose port was just free: connections are refused.
    fn closed_port_url() -> (u16, MqttUrl) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = MqttUrl::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap();
        (port, url)
    }

    #[test]
    fn logging_is_rate_limited() {
        let logged: Vec<u64> = (1..=70).filter(|n| worth_logging(*n)).collect();
        assert_eq!(logged, vec![1, 2, 3, 4, 5, 8, 16, 32, 64]);
    }

    #[tokio::test]
    async fn unreachable_broker_backs_off_and_stays_down() {
        // A port that was just free: connections are refused at once, so without the
        // backoff this loop would spin through hundreds of attempts.
        let (_, url) = closed_port_url();
        let (client, el) = ClientSettings::new(url, "t").connect().unwrap();
        let mut c = Connection::new(el, "test").with_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ));
        let status = c.status();
        let _ = tokio::time::timeout(Duration::from_millis(900), async {
            while c.poll().await.is_some() {}
        })
        .await;
        let n = status.failures();
        // 50 + 100 + 200 + 200 + … ms (±20 %): between 3 and 9 attempts in 0.9 s.
        assert!((3..=9).contains(&n), "{n} attempts");
        assert!(!status.is_up());
        assert!(status.last_error().is_some());
        drop(client);
    }

    #[cfg(feature = "broker")]
    #[tokio::test]
    async fn backoff_resets_once_connected_and_the_link_comes_up() {
        use crate::broker::{self, BrokerSettings};
        let (port, url) = closed_port_url();
        let (_client, el) = ClientSettings::new(url, "reset").connect().unwrap();
        let min = Duration::from_millis(20);
        let mut c =
            Connection::new(el, "test").with_backoff(Backoff::new(min, Duration::from_millis(400)));
        let status = c.status();
        // Fail until the backoff has grown (polling in short slices: poll is cancel-safe).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while status.failures() < 4 {
            assert!(tokio::time::Instant::now() < deadline, "no failures");
            let _ = tokio::time::timeout(Duration::from_millis(10), c.poll()).await;
        }
        assert!(c.backoff.clone().next_wait() > min * 2);
        let mut up = status.watch();
        // The broker appears on that port: the next ConnAck resets the backoff.
        let settings = BrokerSettings::on(format!("127.0.0.1:{port}").parse().unwrap());
        let _b =
            tokio::task::spawn_blocking(move || broker::start(&settings, Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(Event::Incoming(Packet::ConnAck(_))) = c.poll().await {
                    return;
                }
            }
        })
        .await;
        assert!(connected.is_ok(), "no ConnAck");
        assert!(status.is_up() && *up.borrow_and_update());
        assert_eq!(status.connects(), 1);
        assert!(
            c.backoff.clone().next_wait() <= min.mul_f64(1.2),
            "backoff not reset"
        );
    }
}
