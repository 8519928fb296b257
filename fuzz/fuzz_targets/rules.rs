//! The hub's rules file (`hearth_hub::RuleSet::parse`). A rule set that parses dispatches a
//! fixed event without panicking.
#![no_main]

use hearth_hub::RuleSet;
use hearth_proto::mqtt::Event;
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rules) = RuleSet::parse(text, "fuzz.toml", "zigbee2mqtt") else {
        return;
    };
    let ev = Event::parse(
        br#"{"class":"motion","score":0.9,"model":"m@1","ts":"2026-01-01T00:00:00Z"}"#,
    )
    .expect("fixed event");
    let _ = rules.dispatch("dev1", "motion", &ev, Instant::now(), |_| {});
});
