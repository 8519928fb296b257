//! Zigbee2MQTT as the hub sees it, on `<actuator_base>` (Zigbee2MQTT's `base_topic`):
//!
//! - `<base>/bridge/state`: `{"state":"online"}` (or the legacy plain `online`), retained;
//! - `<base>/bridge/devices`: the bridge's device list (retained JSON array): each device's
//!   `friendly_name`, `type` (`Coordinator`, `Router`, `EndDevice`) and `definition`
//!   (`model`, `vendor`); a device missing from a newer list was removed from the network;
//! - `<base>/<friendly_name>`: the device's state, a JSON object (retained when the device's
//!   `retain` option is on);
//! - `<base>/<friendly_name>/availability`: `{"state":"online"}` or plain `online`.
//!
//! Commands go to `<base>/<friendly_name>/set` (rules, through `crate::delivery`) and state
//! reads to `<base>/<friendly_name>/get` with `{"state":""}`, exactly as Zigbee2MQTT
//! documents them, so real devices are driven unchanged. Friendly names containing `/` are
//! listed from `bridge/devices`, but their state topics are not followed (the hub subscribes
//! to one level, `<base>/+`, to keep its own commands on `<base>/<name>/set` out of its
//! subscription).

use serde::{Deserialize, Serialize};

use crate::registry::{bounded, BridgeDevice, MAX_DEVICES, MAX_FIELD};

/// `[zigbee2mqtt]` in the hub's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZigbeeConfig {
    /// Follow the bridge and device topics under `actuator_base` into the registry.
    pub enabled: bool,
    /// Ask an actuator the rules name for its state (`<base>/<name>/get`) when it comes
    /// online, so the registry holds its state even when it does not retain it.
    pub get_state_on_online: bool,
}

impl Default for ZigbeeConfig {
    fn default() -> Self {
        ZigbeeConfig {
            enabled: true,
            get_state_on_online: true,
        }
    }
}

/// The body Zigbee2MQTT documents for reading a device's state on `/get`.
pub const GET_STATE_PAYLOAD: &str = r#"{"state":""}"#;

/// Topic filters for the bridge and its devices.
pub fn subscriptions(base: &str) -> Vec<String> {
    vec![
        format!("{base}/bridge/state"),
        format!("{base}/bridge/devices"),
        format!("{base}/+"),
        format!("{base}/+/availability"),
    ]
}

/// `<base>/<name>/get`.
pub fn get_topic(base: &str, name: &str) -> String {
    format!("{base}/{name}/get")
}

/// What a topic under the base is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    BridgeState,
    BridgeDevices,
    /// `<base>/<name>`: a device's state.
    State(&'a str),
    /// `<base>/<name>/availability`.
    Availability(&'a str),
}

/// Classifies `topic` under `base` (`None` for anything else, such as `/set` and `/get`).
pub fn classify<'a>(base: &str, topic: &'a str) -> Option<Topic<'a>> {
    let rest = topic.strip_prefix(base)?.strip_prefix('/')?;
    match rest {
        "bridge/state" => return Some(Topic::BridgeState),
        "bridge/devices" => return Some(Topic::BridgeDevices),
        _ => {}
    }
    if let Some(name) = rest.strip_suffix("/availability") {
        return name_ok(name).then_some(Topic::Availability(name));
    }
    name_ok(rest).then_some(Topic::State(rest))
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name != "bridge"
        && name.len() <= MAX_FIELD
        && !name.contains(['/', '+', '#', '\0'])
}

#[derive(Deserialize)]
struct RawDevice {
    #[serde(default)]
    friendly_name: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    definition: Option<RawDefinition>,
    #[serde(default)]
    software_build_id: Option<String>,
    #[serde(default)]
    model_id: Option<String>,
    #[serde(default)]
    manufacturer: Option<String>,
}

#[derive(Deserialize)]
struct RawDefinition {
    #[serde(default)]
    model: String,
    #[serde(default)]
    vendor: String,
}

/// Parses `bridge/devices` (unknown keys ignored; the coordinator and nameless entries
/// skipped; at most [`MAX_DEVICES`] kept, every field cut to [`MAX_FIELD`]).
pub fn parse_bridge_devices(payload: &[u8]) -> Result<Vec<BridgeDevice>, String> {
    let raw: Vec<RawDevice> =
        serde_json::from_slice(payload).map_err(|e| format!("not a device list: {e}"))?;
    Ok(raw
        .into_iter()
        .filter(|d| d.kind != "Coordinator" && name_ok_listed(&d.friendly_name))
        .take(MAX_DEVICES)
        .map(|d| {
            let (model, vendor) = match d.definition {
                Some(def) => (def.model, def.vendor),
                None => (
                    d.model_id.unwrap_or_default(),
                    d.manufacturer.unwrap_or_default(),
                ),
            };
            BridgeDevice {
                friendly_name: bounded(&d.friendly_name, MAX_FIELD),
                kind: bounded(&d.kind, MAX_FIELD),
                model: bounded(&model, MAX_FIELD),
                vendor: bounded(&vendor, MAX_FIELD),
                sw_version: bounded(&d.software_build_id.unwrap_or_default(), MAX_FIELD),
            }
        })
        .collect())
}

fn name_ok_listed(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_FIELD && !name.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        let c = |t| classify("zigbee2mqtt", t);
        assert_eq!(c("zigbee2mqtt/bridge/state"), Some(Topic::BridgeState));
        assert_eq!(c("zigbee2mqtt/bridge/devices"), Some(Topic::BridgeDevices));
        assert_eq!(c("zigbee2mqtt/lamp"), Some(Topic::State("lamp")));
        assert_eq!(
            c("zigbee2mqtt/lamp/availability"),
            Some(Topic::Availability("lamp"))
        );
        for other in [
            "zigbee2mqtt/lamp/set",
            "zigbee2mqtt/lamp/get",
            "zigbee2mqtt/bridge",
            "zigbee2mqtt/bridge/event",
            "zigbee2mqttx/lamp",
            "zigbee2mqtt/",
        ] {
            assert_eq!(c(other), None, "{other}");
        }
    }

    #[test]
    fn bridge_devices_as_zigbee2mqtt_publishes_them() {
        // Abridged from Zigbee2MQTT 2.x's bridge/devices.
        let json = br#"[
          {"ieee_address":"0x00124b0001","type":"Coordinator","network_address":0,
           "supported":true,"friendly_name":"Coordinator","disabled":false,"definition":null,
           "interview_completed":true,"interviewing":false},
          {"ieee_address":"0x000b57fffec6a5b2","type":"Router","network_address":40369,
           "supported":true,"friendly_name":"living room lamp","disabled":false,
           "power_source":"Mains (single phase)","software_build_id":"2.3.050",
           "model_id":"TRADFRI bulb E27 WS opal 980lm","manufacturer":"IKEA of Sweden",
           "definition":{"model":"LED1545G12","vendor":"IKEA","description":"bulb",
             "exposes":[{"type":"light","features":[]}],"options":[],"supports_ota":true},
           "interview_completed":true,"interviewing":false},
          {"ieee_address":"0x0017880104e45517","type":"EndDevice","friendly_name":"hall/motion",
           "definition":null,"model_id":"SML001","manufacturer":"Signify"}
        ]"#;
        let d = parse_bridge_devices(json).unwrap();
        assert_eq!(d.len(), 2, "the coordinator is not a device");
        assert_eq!(
            d[0],
            BridgeDevice {
                friendly_name: "living room lamp".into(),
                kind: "Router".into(),
                model: "LED1545G12".into(),
                vendor: "IKEA".into(),
                sw_version: "2.3.050".into(),
            }
        );
        assert_eq!(
            (d[1].model.as_str(), d[1].vendor.as_str()),
            ("SML001", "Signify")
        );
        assert!(parse_bridge_devices(b"{}").is_err());
        assert!(parse_bridge_devices(b"[{\"type\":1}]").is_err());
    }
}
