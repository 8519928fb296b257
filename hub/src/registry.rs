//! Device registry: what the hub knows about each device from its retained `meta`,
//! its `availability` (last will) and the events it sends.

use crate::delivery::now_ms;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::RwLock;

use hearth_proto::mqtt::DeviceMeta;

/// Most devices the registry tracks; beyond it new names are ignored (a home has a handful).
pub const MAX_DEVICES: usize = 1024;

/// Availability from `hearth/<device>/availability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Availability {
    /// Nothing received yet.
    #[default]
    Unknown,
    /// `online`.
    Online,
    /// `offline` (the device's last will, or a clean shutdown).
    Offline,
}

impl Availability {
    /// Parses an availability payload.
    pub fn parse(payload: &[u8]) -> Option<Availability> {
        match payload {
            b"online" => Some(Availability::Online),
            b"offline" => Some(Availability::Offline),
            _ => None,
        }
    }

    /// `online`, `offline` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Unknown => "unknown",
            Availability::Online => "online",
            Availability::Offline => "offline",
        }
    }
}

/// One device as seen by the hub.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceInfo {
    /// Device name (the topic level).
    pub name: String,
    /// Retained description, if the device published one.
    pub meta: Option<DeviceMeta>,
    /// Last availability.
    pub availability: Availability,
    /// Valid events received from it.
    pub events: u64,
    /// Wall-clock time of the last valid event, ms since the Unix epoch.
    pub last_event_unix_ms: Option<u64>,
}

/// Thread-safe device table.
#[derive(Debug, Default)]
pub struct Registry {
    devices: RwLock<HashMap<String, DeviceInfo>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_device(&self, name: &str, f: impl FnOnce(&mut DeviceInfo)) -> bool {
        let mut map = self.devices.write().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get_mut(name) {
            f(d);
            return true;
        }
        if map.len() >= MAX_DEVICES {
            return false;
        }
        let mut d = DeviceInfo {
            name: name.to_string(),
            ..DeviceInfo::default()
        };
        f(&mut d);
        map.insert(name.to_string(), d);
        true
    }

    /// Sets (or with `None`, clears) a device's meta. Returns false when the table is full.
    pub fn set_meta(&self, device: &str, meta: Option<DeviceMeta>) -> bool {
        self.with_device(device, |d| d.meta = meta)
    }

    /// Records availability. Returns false when the table is full.
    pub fn set_availability(&self, device: &str, a: Availability) -> bool {
        self.with_device(device, |d| d.availability = a)
    }

    /// Records one valid event (allocates only the first time a device is seen).
    pub fn record_event(&self, device: &str) {
        let t = now_ms();
        self.with_device(device, |d| {
            d.events += 1;
            d.last_event_unix_ms = Some(t);
        });
    }

    /// One device.
    pub fn get(&self, device: &str) -> Option<DeviceInfo> {
        let map = self.devices.read().unwrap_or_else(|p| p.into_inner());
        map.get(device).cloned()
    }

    /// All devices, sorted by name.
    pub fn snapshot(&self) -> Vec<DeviceInfo> {
        let map = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<DeviceInfo> = map.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Number of known devices.
    pub fn len(&self) -> usize {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no device is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends Prometheus gauges: devices by availability.
    pub fn render_prometheus(&self, out: &mut String) {
        let (mut on, mut off, mut unk) = (0u64, 0u64, 0u64);
        for d in self
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            match d.availability {
                Availability::Online => on += 1,
                Availability::Offline => off += 1,
                Availability::Unknown => unk += 1,
            }
        }
        out.push_str("# HELP hearth_hub_devices Known devices by availability.\n");
        out.push_str("# TYPE hearth_hub_devices gauge\n");
        for (label, n) in [("online", on), ("offline", off), ("unknown", unk)] {
            let _ = writeln!(out, "hearth_hub_devices{{availability=\"{label}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_meta_availability_and_events() {
        let r = Registry::new();
        assert!(r.is_empty());
        r.set_availability("cam", Availability::Online);
        r.record_event("cam");
        r.record_event("cam");
        let meta = DeviceMeta {
            device: "cam".into(),
            kind: "agent".into(),
            model: "faces@1".into(),
            classes: vec!["none".into(), "person".into()],
            sw_version: "0.1.0".into(),
        };
        r.set_meta("cam", Some(meta.clone()));
        r.set_availability("plug", Availability::Offline);
        let s = r.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "cam");
        assert_eq!(s[0].events, 2);
        assert_eq!(s[0].meta.as_ref(), Some(&meta));
        assert_eq!(s[1].availability, Availability::Offline);
        r.set_meta("cam", None);
        assert_eq!(r.get("cam").unwrap().meta, None);
        let mut t = String::new();
        r.render_prometheus(&mut t);
        assert!(
            t.contains("hearth_hub_devices{availability=\"online\"} 1"),
            "{t}"
        );
        assert_eq!(Availability::parse(b"online"), Some(Availability::Online));
        assert_eq!(Availability::parse(b"ONLINE"), None);
    }
}
