//! MQTT settings of the agent and the virtual actuator, built with the edge layer
//! ([`hearth_edge`]): the one URL parser (`mqtt://`, `mqtts://` with a CA file,
//! credentials in the URL), the one options builder with a retained `offline` last will,
//! and the one reconnect loop ([`hearth_edge::Connection`]).

use std::path::Path;
use std::time::Duration;

use hearth_edge::{ClientSettings, MqttUrl};

use crate::Error;

/// Capacity of the client request queue (publishes waiting for the event loop).
pub(crate) const REQUEST_CAPACITY: usize = 256;
/// Keep-alive of device connections.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Largest MQTT packet a device sends or accepts.
const MAX_PACKET: usize = 256 * 1024;

/// Client settings for a device at `url` whose availability topic gets a retained
/// `offline` last will; `ca_file` is the CA trusted for `mqtts://`.
pub fn settings(
    url: &str,
    ca_file: Option<&Path>,
    client_id: &str,
    availability_topic: &str,
) -> Result<ClientSettings, Error> {
    Ok(ClientSettings::new(MqttUrl::parse(url)?, client_id)
        .keep_alive(KEEP_ALIVE)
        .max_packet_size(MAX_PACKET)
        .request_capacity(REQUEST_CAPACITY)
        .offline_will(availability_topic)
        .ca_file(ca_file.map(Path::to_path_buf)))
}
