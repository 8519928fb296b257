//! Regenerates `data/faces-cam/{train,test}.csv`: every crop of the faces set
//! (`data/faces/*.csv`, 25×25 grey, LFW faces and background crops) through the camera's
//! frozen BlazeFace backbone ([`hearth_camera::embed`]), one row `label,e1..e192` per crop
//! (6 decimals). `camera/tests/embed.rs` checks that the vendored files match what the
//! embedder computes now.
//!
//! `cargo run -p hearth-camera --example faces_embeddings [-- <data dir>]`

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("data"), PathBuf::from);
    let emb = hearth_camera::Embedder::load(
        &data.join("models/face_detection_front_128x128_barracuda.onnx"),
    )?;
    std::fs::create_dir_all(data.join("faces-cam"))?;
    for split in ["train", "test"] {
        let text = std::fs::read_to_string(data.join(format!("faces/{split}.csv")))?;
        let mut out = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut it = line.split(',');
            let label = it.next().ok_or("empty row")?.trim().to_string();
            let px: Vec<f32> = it.map(|v| v.trim().parse()).collect::<Result<_, _>>()?;
            out.push_str(&label);
            for v in emb.embed_grey(&px, 25)? {
                write!(out, ",{v:.6}")?;
            }
            out.push('\n');
        }
        let path = data.join(format!("faces-cam/{split}.csv"));
        std::fs::write(&path, out)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
