//! BlazeFace (MediaPipe short-range face detector, front 128×128): the vendored ONNX graph
//! (or its int8 export, or MediaPipe's own `face_detection_short_range.tflite` translated to
//! ONNX with the `tflite` feature: same anchors, outputs joined as [1,896,1] + [1,896,16]),
//! run by Hearth's dense conv engine (`hearth_dense::conv`, checked against tract at load) or
//! by tract; MediaPipe's SSD anchors, box decoding and weighted non-maximum suppression.
//!
//! - Input: one RGB frame, 128×128, interleaved bytes (what the ffmpeg source delivers),
//!   scaled to `x / 127.5 − 1` as the NHWC `[1,128,128,3]` f32 tensor the graph takes.
//! - Anchors (`SsdAnchorsCalculator` with the face_detection_front options): 4 layers,
//!   strides 8, 16, 16, 16, one aspect ratio, fixed anchor size, offset 0.5. Layers with the
//!   same stride share a feature map, so stride 8 gives 16×16×2 = 512 anchors and stride 16
//!   gives 8×8×6 = 384: 896, in the order of the two score / box outputs.
//! - Decoding (`TensorsToDetectionsCalculator`): 16 values per anchor (`x, y, w, h` then six
//!   key points), scales 128; scores are the sigmoid of the clipped (±100) logit.
//! - Weighted NMS (`NonMaxSuppressionCalculator`, `WEIGHTED`, IoU > 0.3): each group's box is
//!   the score-weighted mean of its members, its score the best member's.
//!
//! Inference is CPU work: call [`Detector::detect`] from a blocking thread, never from the
//! async runtime.

use std::path::Path;
use std::sync::Arc;

use hearth_model::dense_conv::ConvEngine;
use hearth_model::OnnxModel;
use serde::{Deserialize, Serialize};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::Error;

/// Side of the square model input, pixels.
pub const INPUT_SIZE: usize = 128;
/// Bytes of one RGB input frame.
pub const FRAME_BYTES: usize = INPUT_SIZE * INPUT_SIZE * 3;
/// Number of anchors (512 + 384).
pub const NUM_ANCHORS: usize = 896;
/// Values per anchor in the box outputs.
const NUM_COORDS: usize = 16;
/// Most detections one frame can yield after NMS (a bound on per-frame work downstream).
pub const MAX_DETECTIONS: usize = 16;

/// A face found in a frame. Coordinates are normalised to `[0, 1]` of the frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[xmin, ymin, xmax, ymax]`.
    pub bbox: [f32; 4],
    /// Probability in `[0, 1]`.
    pub score: f32,
}

/// Detection thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorOptions {
    /// Candidates below this score are discarded before NMS.
    pub min_score: f32,
    /// Candidates whose IoU with a group's best exceeds this join the group.
    pub nms_iou: f32,
    /// The engine that runs the graph.
    pub backend: Backend,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        DetectorOptions {
            min_score: 0.5,
            nms_iou: 0.3,
            backend: Backend::Auto,
        }
    }
}

/// One SSD anchor centre (fixed anchor size: width and height are 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anchor {
    pub x: f32,
    pub y: f32,
}

/// MediaPipe's face_detection_front anchors, in output order.
pub fn anchors() -> Vec<Anchor> {
    let strides = [8usize, 16, 16, 16];
    let mut out = Vec::with_capacity(NUM_ANCHORS);
    let mut layer = 0;
    while layer < strides.len() {
        // Consecutive layers with the same stride share one feature map; each layer
        // contributes two anchors per cell (aspect ratio 1 and the interpolated scale).
        let mut per_cell = 0;
        let mut last = layer;
        while last < strides.len() && strides[last] == strides[layer] {
            per_cell += 2;
            last += 1;
        }
        let side = INPUT_SIZE.div_ceil(strides[layer]);
        for y in 0..side {
            for x in 0..side {
                for _ in 0..per_cell {
                    out.push(Anchor {
                        x: (x as f32 + 0.5) / side as f32,
                        y: (y as f32 + 0.5) / side as f32,
                    });
                }
            }
        }
        layer = last;
    }
    out
}

/// Intersection over union of two `[xmin, ymin, xmax, ymax]` boxes (0 when either is empty).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Decodes the raw outputs (`scores`: one logit per anchor, `boxes`: 16 values per anchor,
/// both in anchor order) into candidates above `min_score`, then weighted NMS.
pub fn decode(
    anchors: &[Anchor],
    scores: &[f32],
    boxes: &[f32],
    opts: &DetectorOptions,
) -> Vec<Detection> {
    let mut cands: Vec<Detection> = Vec::new();
    for (i, a) in anchors.iter().enumerate() {
        let (Some(&logit), Some(raw)) =
            (scores.get(i), boxes.get(i * NUM_COORDS..i * NUM_COORDS + 4))
        else {
            break;
        };
        let score = 1.0 / (1.0 + (-logit.clamp(-100.0, 100.0)).exp());
        if score.is_nan() || score < opts.min_score {
            continue;
        }
        let s = INPUT_SIZE as f32;
        let (xc, yc) = (raw[0] / s + a.x, raw[1] / s + a.y);
        let (w, h) = (raw[2] / s, raw[3] / s);
        let bbox = [xc - w / 2.0, yc - h / 2.0, xc + w / 2.0, yc + h / 2.0];
        if bbox.iter().all(|v| v.is_finite()) {
            cands.push(Detection { bbox, score });
        }
    }
    weighted_nms(cands, opts.nms_iou)
}

/// MediaPipe's weighted non-maximum suppression; at most [`MAX_DETECTIONS`] results, best first.
pub fn weighted_nms(mut cands: Vec<Detection>, iou_threshold: f32) -> Vec<Detection> {
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out = Vec::new();
    while !cands.is_empty() && out.len() < MAX_DETECTIONS {
        let top = cands[0];
        let mut sum = [0f32; 4];
        let mut total = 0f32;
        let mut rest = Vec::with_capacity(cands.len());
        for c in cands {
            if iou(&top.bbox, &c.bbox) > iou_threshold {
                total += c.score;
                for (s, v) in sum.iter_mut().zip(c.bbox) {
                    *s += c.score * v;
                }
            } else {
                rest.push(c);
            }
        }
        let bbox = if total > 0.0 {
            sum.map(|s| s / total)
        } else {
            top.bbox
        };
        out.push(Detection {
            bbox: bbox.map(|v| v.clamp(0.0, 1.0)),
            score: top.score,
        });
        cands = rest;
    }
    out
}

/// Gives every `ConstantOfShape` node without a `value` attribute an explicit f32 zero (the
/// ONNX default, which tract 0.23 types as 64-bit); the vendored BlazeFace has 11. The same
/// rewrite as `hearth_compress::measure::fix_constant_of_shape`, here so that the agent does
/// not link the compression toolkit.
pub(crate) fn fix_constant_of_shape(proto: &mut pb::ModelProto) {
    if let Some(g) = proto.graph.as_mut() {
        for node in g.node.iter_mut() {
            if node.op_type == "ConstantOfShape"
                && !node.attribute.iter().any(|a| a.name == "value")
            {
                node.attribute.push(pb::AttributeProto {
                    name: "value".into(),
                    r#type: pb::attribute_proto::AttributeType::Tensor as i32,
                    t: Some(pb::TensorProto {
                        dims: vec![1],
                        data_type: pb::tensor_proto::DataType::Float as i32,
                        float_data: vec![0.0],
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
    }
}

type Plan = Arc<TypedRunnableModel>;

/// Which engine runs the detector's graph (`[camera] backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Hearth's dense conv engine when it lowers the graph and agrees with tract on the probe
    /// frames (see [`Detector::from_model`]); tract otherwise (logged).
    #[default]
    Auto,
    /// Hearth's dense conv engine (`hearth_dense::conv`), or an error.
    Dense,
    /// tract's optimised plan.
    Tract,
}

enum Engine {
    Tract(Plan),
    Dense(ConvEngine),
}

/// Largest difference allowed between the dense engine and tract on the probe frames, in
/// the raw outputs (score logits and box values in pixels): float sums in another order
/// differ by ~1e-5; an int8 graph can differ by one requantisation step (a tie rounded the
/// other way) that the following layers carry, measured ≤ 0.05 on BlazeFace's int8 export.
const PROBE_TOLERANCE: f32 = 0.25;

/// The BlazeFace detector: an engine, the anchors and the output order.
pub struct Detector {
    engine: Engine,
    anchors: Vec<Anchor>,
    opts: DetectorOptions,
    /// Output indices of (scores 512, scores 384, boxes 512, boxes 384), or, for the
    /// short-range TFLite graph, (scores 896, boxes 896, unused, unused).
    outputs: [usize; 4],
    /// Largest raw-output difference from tract on the probe frames (dense engine only).
    probe_diff: Option<f32>,
    /// Scores and boxes come as one [1,896,1] and one [1,896,16] output (`outputs[0..2]`).
    joined: bool,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("opts", &self.opts)
            .field("backend", &self.backend_name())
            .finish_non_exhaustive()
    }
}

/// Output slots by shape: [1,512,1], [1,384,1], [1,512,16], [1,384,16] (front graph), or
/// [1,896,1], [1,896,16] (short-range TFLite graph: `joined`, slots 0 and 1).
fn output_slots<'a>(
    shapes: impl Iterator<Item = &'a [usize]>,
) -> Result<([usize; 4], bool), Error> {
    let mut outputs = [usize::MAX; 4];
    let mut joined = [usize::MAX; 2];
    for (i, s) in shapes.enumerate() {
        match s {
            [1, 512, 1] => outputs[0] = i,
            [1, 384, 1] => outputs[1] = i,
            [1, 512, 16] => outputs[2] = i,
            [1, 384, 16] => outputs[3] = i,
            [1, NUM_ANCHORS, 1] => joined[0] = i,
            [1, NUM_ANCHORS, NUM_COORDS] => joined[1] = i,
            _ => {}
        }
    }
    if !joined.contains(&usize::MAX) {
        return Ok(([joined[0], joined[1], usize::MAX, usize::MAX], true));
    }
    if outputs.contains(&usize::MAX) {
        return Err(Error::Model(
            "not a BlazeFace graph: expected outputs [1,512,1], [1,384,1], [1,512,16], [1,384,16] \
             or [1,896,1], [1,896,16]"
                .into(),
        ));
    }
    Ok((outputs, false))
}

/// Probe frames for the engine check: grey, and two deterministic patterns.
fn probe_frames() -> Vec<Vec<u8>> {
    let pattern = |k: usize| -> Vec<u8> {
        (0..FRAME_BYTES)
            .map(|i| {
                let (p, c) = (i / 3, i % 3);
                let (x, y) = (p % INPUT_SIZE, p / INPUT_SIZE);
                ((x * (3 + k) + y * (5 + 2 * k) + c * 70 + (x * y) % (11 + k)) % 256) as u8
            })
            .collect()
    };
    vec![vec![128; FRAME_BYTES], pattern(0), pattern(1)]
}

impl Detector {
    /// Loads the BlazeFace ONNX file (e.g. `data/models/face_detection_front_128x128_barracuda.onnx`)
    /// or, with the `tflite` feature, MediaPipe's TFLite original
    /// (`data/models/face_detection_short_range.tflite`, translated by `hearth_model::tflite`).
    pub fn load(path: &Path, opts: DetectorOptions) -> Result<Detector, Error> {
        #[cfg(feature = "tflite")]
        let model = hearth_model::tflite::load_any(path);
        #[cfg(not(feature = "tflite"))]
        let model = OnnxModel::load(path);
        let model = model.map_err(|e| Error::Model(e.to_string()))?;
        Detector::from_model(&model, opts)
    }

    /// Builds the engine from a parsed ONNX model (an f32 graph, or an int8 export of it with
    /// the same inputs and outputs). With [`Backend::Auto`] or [`Backend::Dense`], the dense
    /// engine's raw outputs are compared with tract's on three probe frames and it is used
    /// only within [`PROBE_TOLERANCE`].
    pub fn from_model(model: &OnnxModel, opts: DetectorOptions) -> Result<Detector, Error> {
        Detector::build(model, opts, PROBE_TOLERANCE)
    }

    fn build(model: &OnnxModel, opts: DetectorOptions, tolerance: f32) -> Result<Detector, Error> {
        let mut proto = model.proto().clone();
        fix_constant_of_shape(&mut proto);
        let tract_err = |e: TractError| Error::Model(format!("{e:#}"));
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, INPUT_SIZE, INPUT_SIZE, 3]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(tract_err)?;
        let zeros = Tensor::zero::<f32>(&[1, INPUT_SIZE, INPUT_SIZE, 3]).map_err(tract_err)?;
        let out = plan.run(tvec!(zeros.into())).map_err(tract_err)?;
        let (outputs, joined) = output_slots(out.iter().map(|t| t.shape()))?;
        let tract = Detector {
            engine: Engine::Tract(plan),
            anchors: anchors(),
            opts,
            outputs,
            probe_diff: None,
            joined,
        };
        if opts.backend == Backend::Tract {
            return Ok(tract);
        }
        match Detector::dense(model, opts, &tract, tolerance) {
            Ok(d) => Ok(d),
            Err(e) if opts.backend == Backend::Auto => {
                tracing::warn!("camera detector: dense engine not used, tract runs it: {e}");
                Ok(tract)
            }
            Err(e) => Err(e),
        }
    }

    /// The dense engine for `model`, checked against `tract` on the probe frames.
    fn dense(
        model: &OnnxModel,
        opts: DetectorOptions,
        tract: &Detector,
        tolerance: f32,
    ) -> Result<Detector, Error> {
        let engine = ConvEngine::new(model, &[1, INPUT_SIZE, INPUT_SIZE, 3])
            .map_err(|e| Error::Model(e.to_string()))?;
        let shapes: Vec<Vec<usize>> = engine.outputs().into_iter().map(|o| o.shape).collect();
        let (outputs, joined) = output_slots(shapes.iter().map(Vec::as_slice))?;
        let dense = Detector {
            engine: Engine::Dense(engine),
            anchors: anchors(),
            opts,
            outputs,
            probe_diff: None,
            joined,
        };
        let mut worst = 0f32;
        for f in probe_frames() {
            let (ts, tb) = tract.raw(&f)?;
            let (ds, db) = dense.raw(&f)?;
            for (a, b) in ts.iter().chain(&tb).zip(ds.iter().chain(&db)) {
                let d = (a - b).abs();
                if d.is_nan() || d > tolerance {
                    return Err(Error::Model(format!(
                        "dense engine differs from tract by {d} on a probe frame (> {tolerance})"
                    )));
                }
                worst = worst.max(d);
            }
        }
        Ok(Detector {
            probe_diff: Some(worst),
            ..dense
        })
    }

    /// Thresholds in use.
    pub fn options(&self) -> DetectorOptions {
        self.opts
    }

    /// The engine running the graph: `tract`, or `dense-<isa>` (e.g. `dense-f32-avx2`).
    pub fn backend_name(&self) -> String {
        match &self.engine {
            Engine::Tract(_) => "tract".into(),
            Engine::Dense(e) => format!("dense-{}", e.kernel()),
        }
    }

    /// The dense engine's largest raw-output difference from tract on the probe frames.
    pub fn probe_diff(&self) -> Option<f32> {
        self.probe_diff
    }

    /// Runs the model on one 128×128 RGB frame (`FRAME_BYTES` bytes) and returns the raw
    /// outputs: 896 score logits and 896 × 16 box values, in anchor order.
    pub fn raw(&self, rgb: &[u8]) -> Result<(Vec<f32>, Vec<f32>), Error> {
        if rgb.len() != FRAME_BYTES {
            return Err(Error::Frame(format!(
                "frame has {} bytes, expected {FRAME_BYTES}",
                rgb.len()
            )));
        }
        let data: Vec<f32> = rgb.iter().map(|&b| b as f32 / 127.5 - 1.0).collect();
        let outs: Vec<Vec<f32>> = match &self.engine {
            Engine::Dense(e) => e.run(&data).map_err(|e| Error::Model(e.to_string()))?,
            Engine::Tract(plan) => {
                let tract_err = |e: TractError| Error::Model(format!("{e:#}"));
                let input = Tensor::from_shape(&[1, INPUT_SIZE, INPUT_SIZE, 3], &data)
                    .map_err(tract_err)?;
                let out = plan.run(tvec!(input.into())).map_err(tract_err)?;
                let mut v = Vec::with_capacity(out.len());
                for t in out.iter() {
                    let view = t.try_as_plain_ram().map_err(tract_err)?;
                    v.push(view.as_slice::<f32>().map_err(tract_err)?.to_vec());
                }
                v
            }
        };
        let take = |i: usize| -> Result<&Vec<f32>, Error> {
            outs.get(self.outputs[i])
                .ok_or_else(|| Error::Model("missing output".into()))
        };
        if self.joined {
            return Ok((take(0)?.clone(), take(1)?.clone()));
        }
        let mut scores = take(0)?.clone();
        scores.extend(take(1)?);
        let mut boxes = take(2)?.clone();
        boxes.extend(take(3)?);
        Ok((scores, boxes))
    }

    /// Detects faces in one 128×128 RGB frame.
    pub fn detect(&self, rgb: &[u8]) -> Result<Vec<Detection>, Error> {
        let (scores, boxes) = self.raw(rgb)?;
        Ok(decode(&self.anchors, &scores, &boxes, &self.opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_layout() {
        let a = anchors();
        assert_eq!(a.len(), NUM_ANCHORS);
        assert_eq!(
            a[0],
            Anchor {
                x: 0.5 / 16.0,
                y: 0.5 / 16.0
            }
        );
        assert_eq!(a[1], a[0]);
        assert_eq!(a[2].x, 1.5 / 16.0);
        assert_eq!(
            a[512],
            Anchor {
                x: 0.5 / 8.0,
                y: 0.5 / 8.0
            }
        );
        assert_eq!(a[517], a[512]);
        assert_eq!(a[518].x, 1.5 / 8.0);
        assert_eq!(
            a[895],
            Anchor {
                x: 7.5 / 8.0,
                y: 7.5 / 8.0
            }
        );
    }

    /// The dense engine is used only when it agrees with tract on the probe frames: with a
    /// zero tolerance (the float engine differs by ~6e-4), `auto` falls back to tract and
    /// `dense` fails; within the tolerance it is used.
    #[test]
    fn dense_engine_is_used_only_when_it_agrees_with_tract() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data/models/face_detection_front_128x128_barracuda.onnx");
        let model = OnnxModel::load(&path).unwrap();
        let with = |backend| DetectorOptions {
            backend,
            ..DetectorOptions::default()
        };
        let d = Detector::build(&model, with(Backend::Auto), 0.0).unwrap();
        assert_eq!(d.backend_name(), "tract");
        assert!(d.probe_diff().is_none());
        let e = Detector::build(&model, with(Backend::Dense), 0.0).unwrap_err();
        assert!(e.to_string().contains("differs from tract"), "{e}");
        let d = Detector::build(&model, with(Backend::Dense), PROBE_TOLERANCE).unwrap();
        assert!(
            d.backend_name().starts_with("dense-"),
            "{}",
            d.backend_name()
        );
    }

    /// A graph the dense engine cannot lower (a Sigmoid where a Relu was): `auto` runs it in
    /// tract, `dense` names the node.
    #[test]
    fn unsupported_graphs_fall_back_to_tract_or_fail_when_dense_is_required() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data/models/face_detection_front_128x128_barracuda.onnx");
        let mut proto = OnnxModel::load(&path).unwrap().proto().clone();
        let g = proto.graph.as_mut().unwrap();
        let relu = g.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        relu.op_type = "Sigmoid".into();
        let bytes = prost::Message::encode_to_vec(&proto);
        let model = OnnxModel::from_bytes(&bytes).unwrap();
        let with = |backend| DetectorOptions {
            backend,
            ..DetectorOptions::default()
        };
        let d = Detector::from_model(&model, with(Backend::Auto)).unwrap();
        assert_eq!(d.backend_name(), "tract");
        let e = Detector::from_model(&model, with(Backend::Dense)).unwrap_err();
        assert!(e.to_string().contains("Sigmoid"), "{e}");
    }

    #[test]
    fn weighted_nms_merges_overlaps() {
        let d = |x: f32, s: f32| Detection {
            bbox: [x, 0.1, x + 0.4, 0.5],
            score: s,
        };
        let out = weighted_nms(vec![d(0.1, 0.9), d(0.12, 0.6), d(0.55, 0.7)], 0.3);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].score, 0.9);
        // Weighted mean of 0.1 (0.9) and 0.12 (0.6).
        assert!((out[0].bbox[0] - 0.108).abs() < 1e-5);
        assert_eq!(out[1].score, 0.7);
    }
}
