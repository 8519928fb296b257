//! Frozen features for learning on the camera: BlazeFace's own backbone, cut after its last
//! feature block, turns the crop of a tracked face into a [`EMBED_DIM`]-value embedding on
//! which a small head (the agent's federated model) learns the home's decision — e.g. a
//! resident or a stranger, a person or the poster on the wall.
//!
//! - The crop: the track's box made square, widened by [`CROP_MARGIN`] on every side (LFW-style
//!   framing: forehead to chin), cut from the 128×128 frame and resized (bilinear) to 128×128.
//! - The backbone: the vendored BlazeFace graph with its outputs moved to
//!   `…/re_lu_15/Relu:0` (`[1, 96, 8, 8]`, the map the 384-anchor heads read); the heads are
//!   pruned away by tract. Frozen: its weights never change and never travel.
//! - The embedding: per channel, the mean and the max over the 8×8 map (96 + 96), then scaled
//!   to unit root-mean-square, so the head sees values of one scale whatever the lighting.
//!
//! The embedding is derived on the device and kept there (the agent's sample store, behind the
//! track's event id); the crop exists only inside [`Embedder::embed_box`]. CPU work: call from
//! a blocking thread (the camera worker), never from the async runtime.

use std::path::Path;
use std::sync::Arc;

use hearth_model::OnnxModel;
use tract_onnx::prelude::*;

use crate::detector::{fix_constant_of_shape, FRAME_BYTES, INPUT_SIZE};
use crate::Error;

/// The backbone tensor the embedding pools (BlazeFace's last feature block, 96 × 8 × 8).
pub const BACKBONE_OUTPUT: &str = "StatefulPartitionedCall/functional_1/re_lu_15/Relu:0";
/// Channels of the backbone map.
const CHANNELS: usize = 96;
/// Values per embedding: mean and max of each channel.
pub const EMBED_DIM: usize = 2 * CHANNELS;
/// Margin added on every side of a detection box before cropping, as a fraction of its side.
pub const CROP_MARGIN: f32 = 0.25;

/// BlazeFace's frozen backbone as a feature extractor.
pub struct Embedder {
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads the BlazeFace ONNX file and cuts it after the backbone.
    pub fn load(path: &Path) -> Result<Embedder, Error> {
        let model = OnnxModel::load(path).map_err(|e| Error::Model(e.to_string()))?;
        Embedder::from_model(&model)
    }

    /// Builds the backbone plan from a parsed BlazeFace graph.
    pub fn from_model(model: &OnnxModel) -> Result<Embedder, Error> {
        let mut proto = model.proto().clone();
        fix_constant_of_shape(&mut proto);
        let tract_err = |e: TractError| Error::Model(format!("embedder: {e:#}"));
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, INPUT_SIZE, INPUT_SIZE, 3]).into()))
            .and_then(|m| m.with_outputs_by_name([BACKBONE_OUTPUT]))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(tract_err)?;
        let e = Embedder { plan };
        // The cut must be the 96-channel 8×8 map.
        let probe = e.embed_rgb(&vec![0u8; FRAME_BYTES])?;
        debug_assert_eq!(probe.len(), EMBED_DIM);
        Ok(e)
    }

    /// Embeds one 128×128 RGB image (interleaved bytes, as frames arrive).
    pub fn embed_rgb(&self, rgb: &[u8]) -> Result<Vec<f32>, Error> {
        if rgb.len() != FRAME_BYTES {
            return Err(Error::Frame(format!(
                "image has {} bytes, expected {FRAME_BYTES}",
                rgb.len()
            )));
        }
        let tract_err = |e: TractError| Error::Model(format!("embedder: {e:#}"));
        let data: Vec<f32> = rgb.iter().map(|&b| f32::from(b) / 127.5 - 1.0).collect();
        let input =
            Tensor::from_shape(&[1, INPUT_SIZE, INPUT_SIZE, 3], &data).map_err(tract_err)?;
        let out = self.plan.run(tvec!(input.into())).map_err(tract_err)?;
        let t = out[0].try_as_plain_ram().map_err(tract_err)?;
        if t.shape() != [1, CHANNELS, 8, 8] {
            return Err(Error::Model(format!(
                "embedder: backbone map is {:?}, expected [1, {CHANNELS}, 8, 8]",
                t.shape()
            )));
        }
        Ok(pool(t.as_slice::<f32>().map_err(tract_err)?))
    }

    /// Embeds the region `bbox` (`[xmin, ymin, xmax, ymax]`, normalised) of a 128×128 RGB frame:
    /// the square crop with [`CROP_MARGIN`], resized to 128×128.
    pub fn embed_box(&self, frame: &[u8], bbox: &[f32; 4]) -> Result<Vec<f32>, Error> {
        if frame.len() != FRAME_BYTES {
            return Err(Error::Frame(format!(
                "frame has {} bytes, expected {FRAME_BYTES}",
                frame.len()
            )));
        }
        self.embed_rgb(&crop(frame, bbox))
    }

    /// Embeds an `n`×`n` grey image with values in `[0, 1]` (a data set's face crop, already
    /// framed like [`Embedder::embed_box`]'s crops), resized to 128×128.
    pub fn embed_grey(&self, grey: &[f32], n: usize) -> Result<Vec<f32>, Error> {
        if n == 0 || grey.len() != n * n {
            return Err(Error::Frame(format!(
                "grey image has {} values, expected {n}×{n}",
                grey.len()
            )));
        }
        let mut rgb = vec![0u8; FRAME_BYTES];
        let s = n as f32 / INPUT_SIZE as f32;
        for y in 0..INPUT_SIZE {
            for x in 0..INPUT_SIZE {
                let v = bilinear(
                    grey,
                    n,
                    n,
                    (x as f32 + 0.5) * s - 0.5,
                    (y as f32 + 0.5) * s - 0.5,
                );
                let b = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                rgb[(y * INPUT_SIZE + x) * 3..][..3].copy_from_slice(&[b, b, b]);
            }
        }
        self.embed_rgb(&rgb)
    }
}

/// Mean and max per channel of an NCHW `[1, C, 8, 8]` map, scaled to unit RMS.
fn pool(map: &[f32]) -> Vec<f32> {
    let hw = map.len() / CHANNELS;
    let mut out = vec![0f32; EMBED_DIM];
    for c in 0..CHANNELS {
        let plane = &map[c * hw..(c + 1) * hw];
        out[c] = plane.iter().sum::<f32>() / hw as f32;
        out[CHANNELS + c] = plane.iter().copied().fold(0f32, f32::max);
    }
    let rms = (out.iter().map(|v| v * v).sum::<f32>() / EMBED_DIM as f32).sqrt();
    if rms > 1e-6 {
        out.iter_mut().for_each(|v| *v /= rms);
    }
    out
}

/// Bilinear sample of a single-plane `w`×`h` image at `(fx, fy)` (clamped to the edges).
fn bilinear(img: &[f32], w: usize, h: usize, fx: f32, fy: f32) -> f32 {
    let fx = fx.clamp(0.0, (w - 1) as f32);
    let fy = fy.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (wx, wy) = (fx - x0 as f32, fy - y0 as f32);
    let top = img[y0 * w + x0] * (1.0 - wx) + img[y0 * w + x1] * wx;
    let bot = img[y1 * w + x0] * (1.0 - wx) + img[y1 * w + x1] * wx;
    top * (1.0 - wy) + bot * wy
}

/// The square crop of `bbox` (widened by [`CROP_MARGIN`]) from a 128×128 RGB frame, resized
/// to 128×128 RGB; outside the frame is black.
pub fn crop(frame: &[u8], bbox: &[f32; 4]) -> Vec<u8> {
    let n = INPUT_SIZE as f32;
    let (cx, cy) = ((bbox[0] + bbox[2]) / 2.0 * n, (bbox[1] + bbox[3]) / 2.0 * n);
    let side =
        ((bbox[2] - bbox[0]).max(bbox[3] - bbox[1]) * n).max(4.0) * (1.0 + 2.0 * CROP_MARGIN);
    let (x0, y0) = (cx - side / 2.0, cy - side / 2.0);
    let step = side / n;
    let mut out = vec![0u8; FRAME_BYTES];
    for y in 0..INPUT_SIZE {
        let fy = y0 + (y as f32 + 0.5) * step - 0.5;
        for x in 0..INPUT_SIZE {
            let fx = x0 + (x as f32 + 0.5) * step - 0.5;
            if fx < -0.5 || fy < -0.5 || fx > n - 0.5 || fy > n - 0.5 {
                continue;
            }
            let fxc = fx.clamp(0.0, n - 1.0);
            let fyc = fy.clamp(0.0, n - 1.0);
            let (xa, ya) = (fxc.floor() as usize, fyc.floor() as usize);
            let (xb, yb) = ((xa + 1).min(INPUT_SIZE - 1), (ya + 1).min(INPUT_SIZE - 1));
            let (wx, wy) = (fxc - xa as f32, fyc - ya as f32);
            for ch in 0..3 {
                let p = |xx: usize, yy: usize| f32::from(frame[(yy * INPUT_SIZE + xx) * 3 + ch]);
                let top = p(xa, ya) * (1.0 - wx) + p(xb, ya) * wx;
                let bot = p(xa, yb) * (1.0 - wx) + p(xb, yb) * wx;
                out[(y * INPUT_SIZE + x) * 3 + ch] = (top * (1.0 - wy) + bot * wy).round() as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_is_mean_max_at_unit_rms() {
        let mut map = vec![0f32; CHANNELS * 64];
        map[0] = 64.0; // channel 0: mean 1, max 64
        let e = pool(&map);
        assert_eq!(e.len(), EMBED_DIM);
        let rms = (e.iter().map(|v| v * v).sum::<f32>() / EMBED_DIM as f32).sqrt();
        assert!((rms - 1.0).abs() < 1e-5);
        assert!((e[CHANNELS] / e[0] - 64.0).abs() < 1e-3);
    }

    #[test]
    fn crop_of_the_whole_frame_without_margin_is_close_to_the_frame() {
        let frame: Vec<u8> = (0..FRAME_BYTES).map(|i| (i / 3 % 128) as u8).collect();
        // A centred box of 1/1.5 of the frame: with the margin it covers the whole frame.
        let s = 1.0 / (1.0 + 2.0 * CROP_MARGIN);
        let b = [0.5 - s / 2.0, 0.5 - s / 2.0, 0.5 + s / 2.0, 0.5 + s / 2.0];
        let c = crop(&frame, &b);
        let diff = c
            .iter()
            .zip(&frame)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap();
        assert!(diff <= 1, "max diff {diff}");
    }
}
