//! Embedded MQTT broker (rumqttd) for zero-setup homes.
//!
//! rumqttd is configured in code (MQTT 3.1.1 listener, limits sized for a home),
//! `Broker::start()` blocks, so it runs on its own OS thread. **rumqttd has no stop
//! API**: the broker thread lives until the process exits; `HubHandle::shutdown`
//! stops the hub's own tasks and clients but the listener stays open. Retained
//! messages and sessions live in memory only, and rumqttd has no per-topic ACLs:
//! production homes use an external Mosquitto (see `deploy/`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings};

use crate::error::Error;

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    thread: std::thread::JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the broker thread is still running.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

/// Resolves the listen address: port 0 is replaced by a free port (found by binding
/// port 0 and reading it back). A taken port fails here with a clear error, before
/// rumqttd (which only logs bind failures) is started.
pub fn resolve_listen(listen: SocketAddr) -> Result<SocketAddr, Error> {
    let probe = TcpListener::bind(listen).map_err(|source| Error::Bind {
        what: "embedded MQTT broker",
        addr: listen.to_string(),
        source,
    })?;
    let addr = probe.local_addr()?;
    drop(probe);
    Ok(addr)
}

/// rumqttd configuration for one MQTT 3.1.1 listener.
pub fn rumqttd_config(
    addr: SocketAddr,
    max_connections: usize,
    max_payload: usize,
) -> rumqttd::Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "hearth-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            // Commit-log segments per topic: events are tiny, keep memory small.
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..rumqttd::Config::default()
    }
}

/// Starts rumqttd on `addr` (a concrete port) and waits, bounded by `timeout`, until
/// it accepts TCP connections.
pub fn start(
    addr: SocketAddr,
    max_connections: usize,
    max_payload: usize,
    timeout: Duration,
) -> Result<EmbeddedBroker, Error> {
    let cfg = rumqttd_config(addr, max_connections, max_payload);
    let thread = std::thread::Builder::new()
        .name("hearth-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;
    let deadline = Instant::now() + timeout;
    let probe = if addr.ip().is_unspecified() {
        SocketAddr::new(
            match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            },
            addr.port(),
        )
    } else {
        addr
    };
    loop {
        if mqtt_ping(probe).is_ok() {
            break;
        }
        if thread.is_finished() || Instant::now() >= deadline {
            return Err(Error::Broker(format!(
                "embedded broker did not start listening on {addr} within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%addr, "embedded MQTT broker listening");
    Ok(EmbeddedBroker { addr, thread })
}

/// Opens a clean MQTT 3.1.1 session (CONNECT → CONNACK accepted → DISCONNECT), so the
/// readiness probe does not show up as a protocol error in the broker's log.
fn mqtt_ping(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind, Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.set_write_timeout(Some(Duration::from_millis(500)))?;
    let id = format!("hearth-probe-{}", std::process::id());
    let mut pkt = vec![0x10, (10 + 2 + id.len()) as u8];
    pkt.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
    pkt.extend_from_slice(&(id.len() as u16).to_be_bytes());
    pkt.extend_from_slice(id.as_bytes());
    s.write_all(&pkt)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "broker refused the probe connection",
        ));
    }
    s.write_all(&[0xE0, 0x00])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_picks_a_port_and_taken_port_is_refused() {
        let a = resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(a.port(), 0);
        let hold = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = hold.local_addr().unwrap();
        let e = resolve_listen(taken).unwrap_err().to_string();
        assert!(e.contains("cannot bind embedded MQTT broker"), "{e}");
    }

    #[test]
    fn broker_accepts_connections() {
        let a = resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = start(a, 8, 4096, Duration::from_secs(5)).unwrap();
        assert!(b.is_running());
        mqtt_ping(b.addr()).unwrap();
    }
}
