//! MQTT event payloads and topics (`hearth_proto::mqtt`): the privacy guard the hub runs on
//! every message. Input: topic, a NUL byte, payload. A payload that parses is valid and
//! re-serialises to a payload that parses to the same event.
#![no_main]

use hearth_proto::mqtt::{parse_event_topic, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    if let Ok(t) = std::str::from_utf8(topic) {
        let _ = parse_event_topic(t);
    }
    if let Ok(ev) = Event::parse(payload) {
        ev.validate().expect("parsed events are valid");
        let again = Event::parse(&ev.to_json()).expect("re-serialised event parses");
        assert_eq!(again, ev);
    }
});
