//! MQTT plumbing shared by the agent and the virtual actuator: broker URLs,
//! client options with a retained `offline` last will, and a bounded clean exit.

use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, LastWill, MqttOptions, QoS};

use crate::Error;

/// Capacity of the client request queue (publishes waiting for the event loop).
pub(crate) const REQUEST_CAPACITY: usize = 256;

/// A parsed `mqtt://[user[:password]@]host[:port]` URL (plain TCP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl BrokerUrl {
    /// Parses a broker URL; `mqtt://` and `tcp://` are accepted, port 1883 by default.
    pub fn parse(url: &str) -> Result<BrokerUrl, Error> {
        let bad = |m: &str| Error::Config(format!("broker URL `{url}`: {m}"));
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| bad("expected mqtt://host:port (TLS is configured at the broker)"))?;
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (Some(n.to_string()), Some(p.to_string())),
                None => (Some(u.to_string()), None),
            },
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // [v6]:port
            let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("missing or invalid host"));
        }
        let port = match port {
            None => 1883,
            Some(p) => p.parse::<u16>().map_err(|_| bad("invalid port"))?,
        };
        if port == 0 {
            return Err(bad("port 0"));
        }
        Ok(BrokerUrl {
            host,
            port,
            username,
            password,
        })
    }
}

/// Client options for `url` with a retained `offline` last will on `availability_topic`.
pub(crate) fn options(
    url: &str,
    client_id: &str,
    availability_topic: &str,
) -> Result<MqttOptions, Error> {
    let b = BrokerUrl::parse(url)?;
    let mut o = MqttOptions::new(client_id, b.host, b.port);
    o.set_keep_alive(Duration::from_secs(15))
        .set_clean_session(true)
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(
            availability_topic,
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(u) = b.username {
        o.set_credentials(u, b.password.unwrap_or_default());
    }
    Ok(o)
}

/// Creates the client and its event loop.
pub(crate) fn client(o: MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(o, REQUEST_CAPACITY)
}

/// Publishes `offline` (retained), disconnects cleanly and drives the event loop
/// until the disconnect is written, the connection drops, or `limit` passes.
pub(crate) async fn go_offline(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    availability_topic: &str,
    limit: Duration,
) {
    let queued = client
        .try_publish(availability_topic, QoS::AtLeastOnce, true, "offline")
        .and_then(|_| client.try_disconnect());
    if let Err(e) = queued {
        tracing::warn!("could not queue offline/disconnect: {e}");
        return;
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => {
                tracing::warn!("MQTT disconnect did not complete within {limit:?}");
                return;
            }
            Ok(Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect))) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!("MQTT connection closed during shutdown: {e}");
                return;
            }
        }
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let b = BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1884));
        assert_eq!(BrokerUrl::parse("mqtt://hub.local").unwrap().port, 1883);
        let b = BrokerUrl::parse("mqtt://agent:s3cret@hub:1883/").unwrap();
        assert_eq!(b.username.as_deref(), Some("agent"));
        assert_eq!(b.password.as_deref(), Some("s3cret"));
        assert_eq!(BrokerUrl::parse("tcp://[::1]:1999").unwrap().host, "::1");
        for bad in [
            "http://x:1",
            "mqtt://",
            "mqtt://x:99999",
            "mqtt://x:0",
            "x:1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
