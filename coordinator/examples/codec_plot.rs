//! The codec sweep's accuracy-against-bytes curve as an SVG, drawn with the coordinator's
//! plot code (`hearth_coordinator::plot::write_tradeoff`):
//!
//! ```text
//! cargo run -p hearth-coordinator --example codec_plot -- <sweep.csv> <up|down> <out.svg>
//! ```
//!
//! `sweep.csv` holds the rows `hearth-model`'s `codec_sweep` example appends (`CSV=...`):
//! stage, optimizer, setting, bits, topk, entropy, remedy, downlink, median accuracy, min,
//! max, uplink bytes, uplink deflated, downlink bytes, downlink deflated. One series per
//! optimizer; the fp32 uplink row of the `up` stage (or the `file` row of `down`) gives the
//! reference line at one point below it.

use hearth_coordinator::plot::{write_tradeoff, TradeoffSeries};
use std::collections::BTreeMap;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [csv, stage, out] = args.as_slice() else {
        return Err("usage: codec_plot <sweep.csv> <up|down> <out.svg>".into());
    };
    let mut by_opt: BTreeMap<String, TradeoffSeries> = BTreeMap::new();
    for line in std::fs::read_to_string(csv)?.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 15 || f[0] != stage {
            continue;
        }
        let acc: f64 = f[8].parse()?;
        let bytes: f64 = if stage == "up" { f[11] } else { f[13] }.parse()?;
        let s = by_opt
            .entry(f[1].to_string())
            .or_insert_with(|| TradeoffSeries {
                label: f[1].to_string(),
                points: Vec::new(),
                reference: None,
            });
        let is_reference = if stage == "up" {
            f[3] == "32" && f[4] == "1"
        } else {
            f[7] == "file"
        };
        if is_reference {
            s.reference = Some(acc - 0.01);
        }
        s.points.push((bytes, acc));
    }
    let series: Vec<TradeoffSeries> = by_opt.into_values().collect();
    let (title, x) = if stage == "up" {
        (
            "digits, 4 clients, 10 rounds: uplink codec settings",
            "uplink payload bytes per client per round (log)",
        )
    } else {
        (
            "digits, 4 clients, 10 rounds: downlink codec settings",
            "downlink payload bytes per client per version (log)",
        )
    };
    write_tradeoff(title, x, &series, Path::new(out))?;
    println!("wrote {out}");
    Ok(())
}
