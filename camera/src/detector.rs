//! BlazeFace (MediaPipe short-range face detector, front 128×128) in tract: the vendored
//! ONNX graph, MediaPipe's SSD anchors, box decoding and weighted non-maximum suppression.
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

use hearth_model::OnnxModel;
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
}

impl Default for DetectorOptions {
    fn default() -> Self {
        DetectorOptions {
            min_score: 0.5,
            nms_iou: 0.3,
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

/// The BlazeFace detector: an optimised tract plan, the anchors and a reusable input buffer.
pub struct Detector {
    plan: Plan,
    anchors: Vec<Anchor>,
    opts: DetectorOptions,
    /// Output indices of (scores 512, scores 384, boxes 512, boxes 384).
    outputs: [usize; 4],
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Detector {
    /// Loads the BlazeFace ONNX file (e.g. `data/models/face_detection_front_128x128_barracuda.onnx`).
    pub fn load(path: &Path, opts: DetectorOptions) -> Result<Detector, Error> {
        let model = OnnxModel::load(path).map_err(|e| Error::Model(e.to_string()))?;
        Detector::from_model(&model, opts)
    }

    /// Builds the plan from a parsed ONNX model (an f32 graph, or an int8 export of it with
    /// the same inputs and outputs).
    pub fn from_model(model: &OnnxModel, opts: DetectorOptions) -> Result<Detector, Error> {
        let mut proto = model.proto().clone();
        fix_constant_of_shape(&mut proto);
        let tract_err = |e: TractError| Error::Model(format!("{e:#}"));
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, INPUT_SIZE, INPUT_SIZE, 3]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(tract_err)?;
        // Identify the outputs by shape: [1,512,1], [1,384,1], [1,512,16], [1,384,16].
        let zeros = Tensor::zero::<f32>(&[1, INPUT_SIZE, INPUT_SIZE, 3]).map_err(tract_err)?;
        let out = plan.run(tvec!(zeros.into())).map_err(tract_err)?;
        let mut outputs = [usize::MAX; 4];
        for (i, t) in out.iter().enumerate() {
            let slot = match t.shape() {
                [1, 512, 1] => 0,
                [1, 384, 1] => 1,
                [1, 512, 16] => 2,
                [1, 384, 16] => 3,
                _ => continue,
            };
            outputs[slot] = i;
        }
        if outputs.contains(&usize::MAX) {
            return Err(Error::Model(
                "not a BlazeFace front graph: expected outputs [1,512,1], [1,384,1], [1,512,16], [1,384,16]".into(),
            ));
        }
        Ok(Detector {
            plan,
            anchors: anchors(),
            opts,
            outputs,
        })
    }

    /// Thresholds in use.
    pub fn options(&self) -> DetectorOptions {
        self.opts
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
        let tract_err = |e: TractError| Error::Model(format!("{e:#}"));
        let data: Vec<f32> = rgb.iter().map(|&b| b as f32 / 127.5 - 1.0).collect();
        let input =
            Tensor::from_shape(&[1, INPUT_SIZE, INPUT_SIZE, 3], &data).map_err(tract_err)?;
        let out = self.plan.run(tvec!(input.into())).map_err(tract_err)?;
        let view = |i: usize| -> Result<Vec<f32>, Error> {
            let view = out[self.outputs[i]].try_as_plain_ram().map_err(tract_err)?;
            Ok(view.as_slice::<f32>().map_err(tract_err)?.to_vec())
        };
        let mut scores = view(0)?;
        scores.extend(view(1)?);
        let mut boxes = view(2)?;
        boxes.extend(view(3)?);
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
