//! Recovery after channel pruning by least-squares reconstruction (He et al. 2017, "Channel
//! pruning for accelerating very deep neural networks"; ThiNet): every 1×1 `Conv` (group 1,
//! no padding) that lost input channels is refitted, weights and bias, so that on calibration
//! inputs its output from the *pruned* model's activations matches the *original* model's
//! output of the same conv: `min ‖Y_orig − W′·X_pruned − b′‖² + λ‖W′‖²`, solved in closed
//! form (normal equations, Cholesky). The original model is the teacher; no labels are used.
//!
//! Positions are sampled (at most [`POSITIONS_PER_INPUT`] per input and conv, reproducibly),
//! as in ThiNet. All targets are fitted in one pass from one run of each model, so a conv's
//! inputs are those of the pruned model before any refit. Convs with larger kernels keep their
//! weights (reported).

use crate::measure::GenericRunner;
use hearth_model::error::ModelError;
use hearth_model::onnx::{f32_initializer, initializer_data, InitValues};
use hearth_model::tensor::Tensor as HTensor;
use hearth_model::OnnxModel;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

/// Spatial positions sampled per calibration input and refitted conv.
pub const POSITIONS_PER_INPUT: usize = 128;

/// What [`reconstruct`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconstructReport {
    /// Convs refitted.
    pub refitted: usize,
    /// Convs that lost input channels but were left as they are (kernel larger than 1×1,
    /// padding or groups).
    pub skipped: usize,
    /// Mean over refitted convs of the relative error ‖Y − Ŷ‖/‖Y‖ before and after the refit.
    pub rel_error: (f32, f32),
}

impl std::fmt::Display for ReconstructReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "least squares refitted {} 1x1 convs (rel. error {:.3} -> {:.3}), {} others kept",
            self.refitted, self.rel_error.0, self.rel_error.1, self.skipped
        )
    }
}

fn f32_init(g: &pb::GraphProto, name: &str) -> Option<HTensor> {
    let t = g.initializer.iter().find(|t| t.name == name)?;
    match initializer_data(t)? {
        (shape, DataType::Float, InitValues::Float(data)) => Some(HTensor { shape, data }),
        _ => None,
    }
}

fn ints(n: &pb::NodeProto, name: &str) -> Vec<i64> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
        .unwrap_or_default()
}

/// `model` with the tensors `names` added as graph outputs (f32, shape left to tract).
fn exposing(model: &OnnxModel, names: &[String]) -> Result<OnnxModel, ModelError> {
    let mut proto = model.proto().clone();
    let g = proto.graph.as_mut().expect("graph");
    for n in names {
        if g.output.iter().any(|o| &o.name == n) {
            continue;
        }
        g.output.push(pb::ValueInfoProto {
            name: n.clone(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    OnnxModel::from_bytes(&proto.encode_to_vec())
}

/// Sampled output positions `(y, x)` of one input and the original output there.
type Picked = Vec<((usize, usize), Vec<f64>)>;

/// A conv to refit.
struct Target {
    node: usize,
    input: String,
    output: String,
    /// Original output channels kept, in order.
    keep_out: Vec<usize>,
    stride: (usize, usize),
    c_in: usize,
}

/// Solves `(G + λI) x = b` for symmetric positive definite `G` (`n × n`, row-major) and
/// `m` right-hand sides (`b`: `n × m`); returns `x` (`n × m`).
fn cholesky_solve(g: &mut [f64], n: usize, b: &[f64], m: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = g[j * n + j];
        for k in 0..j {
            d -= g[j * n + k] * g[j * n + k];
        }
        if d <= 0.0 {
            return None;
        }
        let d = d.sqrt();
        g[j * n + j] = d;
        for i in j + 1..n {
            let mut s = g[i * n + j];
            for k in 0..j {
                s -= g[i * n + k] * g[j * n + k];
            }
            g[i * n + j] = s / d;
        }
    }
    let mut x = b.to_vec();
    for c in 0..m {
        // L y = b
        for i in 0..n {
            let mut s = x[i * m + c];
            for k in 0..i {
                s -= g[i * n + k] * x[k * m + c];
            }
            x[i * m + c] = s / g[i * n + i];
        }
        // Lᵀ x = y
        for i in (0..n).rev() {
            let mut s = x[i * m + c];
            for k in i + 1..n {
                s -= g[k * n + i] * x[k * m + c];
            }
            x[i * m + c] = s / g[i * n + i];
        }
    }
    Some(x)
}

/// Refits the 1×1 convs of `pruned` that lost input channels against `original` on `inputs`
/// (see the module doc). `kept` gives, per tensor name whose channels shrank, the original
/// channel positions it keeps ([`crate::channels::ChannelReport::kept`]).
pub fn reconstruct(
    original: &OnnxModel,
    pruned: &OnnxModel,
    kept: &BTreeMap<String, Vec<usize>>,
    inputs: &[Vec<f32>],
) -> Result<(OnnxModel, ReconstructReport), ModelError> {
    if inputs.is_empty() {
        return Err(ModelError::Data(
            "least-squares recovery needs calibration inputs".into(),
        ));
    }
    let go = original.proto().graph.as_ref().expect("graph");
    let gp = pruned.proto().graph.as_ref().expect("graph");
    let mut targets = Vec::new();
    let mut skipped = 0;
    for (i, n) in gp.node.iter().enumerate() {
        if n.op_type != "Conv" || go.node.get(i).map(|o| &o.op_type) != Some(&n.op_type) {
            continue;
        }
        let (Some(wp), Some(wo)) = (
            f32_init(gp, &n.input[1]),
            f32_init(go, &go.node[i].input[1]),
        ) else {
            continue;
        };
        if wp.shape.len() != 4 || wp.shape[1] >= wo.shape[1] {
            continue;
        }
        let group = n
            .attribute
            .iter()
            .find(|a| a.name == "group")
            .map_or(1, |a| a.i);
        let pads = ints(n, "pads");
        let one = wp.shape[2] == 1 && wp.shape[3] == 1;
        if group != 1 || !one || pads.iter().any(|&p| p != 0) {
            skipped += 1;
            continue;
        }
        let s = ints(n, "strides");
        let stride = (
            s.first().copied().unwrap_or(1).max(1) as usize,
            s.get(1).copied().unwrap_or(1).max(1) as usize,
        );
        let keep_out = kept
            .get(&n.output[0])
            .cloned()
            .unwrap_or_else(|| (0..wo.shape[0]).collect());
        targets.push(Target {
            node: i,
            input: n.input[0].clone(),
            output: n.output[0].clone(),
            keep_out,
            stride,
            c_in: wp.shape[1],
        });
    }
    if targets.is_empty() {
        return Ok((
            pruned.clone(),
            ReconstructReport {
                refitted: 0,
                skipped,
                rel_error: (0.0, 0.0),
            },
        ));
    }
    // The original model's outputs of every target conv, at sampled positions (the same
    // positions are read from the pruned model's inputs later).
    let outs: Vec<String> = targets.iter().map(|t| t.output.clone()).collect();
    let ro = GenericRunner::new(&exposing(original, &outs)?)?;
    let mut rng = StdRng::seed_from_u64(0);
    // Per target, per input: (positions (y, x) in the output, Y at them: m values each).
    let mut refs: Vec<Vec<Picked>> = targets.iter().map(|_| Vec::new()).collect();
    for x in inputs {
        let yo = ro.run(x)?;
        for (k, t) in targets.iter().enumerate() {
            let y = yo.iter().find(|o| o.name == t.output).expect("exposed");
            if y.shape.len() != 4 {
                return Err(ModelError::Shape(format!(
                    "conv {} output is not 4-d",
                    t.output
                )));
            }
            let (oh, ow) = (y.shape[2], y.shape[3]);
            let pos = oh * ow;
            let take = pos.min(POSITIONS_PER_INPUT);
            let picked = (0..take)
                .map(|s| {
                    if take == pos {
                        s
                    } else {
                        rng.gen_range(0..pos)
                    }
                })
                .map(|p| {
                    let (py, px) = (p / ow, p % ow);
                    let v = t
                        .keep_out
                        .iter()
                        .map(|&c| f64::from(y.data[(c * oh + py) * ow + px]))
                        .collect();
                    ((py, px), v)
                })
                .collect();
            refs[k].push(picked);
        }
    }
    drop(ro);
    // Targets in graph order, each fitted on the inputs the model refitted so far gives it.
    let mut current = pruned.clone();
    let (mut err_before, mut err_after, mut refitted) = (0.0f64, 0.0f64, 0usize);
    for (k, t) in targets.iter().enumerate() {
        let rp = GenericRunner::new(&exposing(&current, std::slice::from_ref(&t.input))?)?;
        let n = t.c_in + 1;
        let m = t.keep_out.len();
        let mut samples: Vec<(Vec<f64>, &Vec<f64>)> = Vec::new();
        for (x, picked) in inputs.iter().zip(&refs[k]) {
            let out = rp.run(x)?;
            let xi = out.iter().find(|o| o.name == t.input).expect("exposed");
            if xi.shape.len() != 4 || xi.shape[1] != t.c_in {
                return Err(ModelError::Shape(format!(
                    "conv input {} has shape {:?}",
                    t.input, xi.shape
                )));
            }
            let (ih, iw) = (xi.shape[2], xi.shape[3]);
            for ((py, px), yv) in picked {
                let (sy, sx) = (py * t.stride.0, px * t.stride.1);
                if sy >= ih || sx >= iw {
                    continue;
                }
                let mut xa: Vec<f64> = (0..t.c_in)
                    .map(|c| f64::from(xi.data[(c * ih + sy) * iw + sx]))
                    .collect();
                xa.push(1.0);
                samples.push((xa, yv));
            }
        }
        let g = current.proto().graph.as_ref().expect("graph");
        let node = &g.node[t.node];
        let w = f32_init(g, &node.input[1]).expect("conv weight");
        let b = node
            .input
            .get(2)
            .filter(|b| !b.is_empty())
            .and_then(|b| f32_init(g, b));
        let mut gm = vec![0.0f64; n * n];
        let mut bm = vec![0.0f64; n * m];
        let (mut yy, mut ee) = (0.0f64, 0.0f64);
        for (xa, ya) in &samples {
            for i in 0..n {
                let xi = xa[i];
                for j in 0..=i {
                    gm[i * n + j] += xi * xa[j];
                }
                for (o, &yv) in ya.iter().enumerate() {
                    bm[i * m + o] += xi * yv;
                }
            }
            for (o, &yv) in ya.iter().enumerate() {
                let mut pred = b.as_ref().map_or(0.0, |b| f64::from(b.data[o]));
                for (c, xv) in xa.iter().take(t.c_in).enumerate() {
                    pred += f64::from(w.data[o * t.c_in + c]) * xv;
                }
                yy += yv * yv;
                ee += (yv - pred) * (yv - pred);
            }
        }
        for i in 0..n {
            for j in 0..i {
                gm[j * n + i] = gm[i * n + j];
            }
        }
        let trace: f64 = (0..t.c_in).map(|i| gm[i * n + i]).sum();
        let lambda = 1e-4 * trace / t.c_in.max(1) as f64 + 1e-9;
        for i in 0..t.c_in {
            gm[i * n + i] += lambda;
        }
        let Some(sol) = cholesky_solve(&mut gm, n, &bm, m) else {
            continue;
        };
        let mut ea = 0.0;
        for (xa, ya) in &samples {
            for (o, &yv) in ya.iter().enumerate() {
                let pred: f64 = (0..n).map(|i| sol[i * m + o] * xa[i]).sum();
                ea += (yv - pred) * (yv - pred);
            }
        }
        if ea >= ee {
            continue; // never make a layer worse on its own samples
        }
        let nw: Vec<f32> = (0..m)
            .flat_map(|o| (0..t.c_in).map(move |c| (o, c)))
            .map(|(o, c)| sol[c * m + o] as f32)
            .collect();
        let nb: Vec<f32> = (0..m).map(|o| sol[t.c_in * m + o] as f32).collect();
        let wname = format!("{}.ls", node.input[1]);
        let bname = format!("{}.ls.bias", node.input[1]);
        let new_w = f32_initializer(&wname, &HTensor::new(w.shape.clone(), nw));
        let new_b = f32_initializer(&bname, &HTensor::new(vec![m], nb));
        let mut proto = current.proto().clone();
        let g = proto.graph.as_mut().expect("graph");
        let node = &mut g.node[t.node];
        node.input[1] = wname;
        if node.input.len() > 2 {
            node.input[2] = bname;
        } else {
            node.input.push(bname);
        }
        g.initializer.push(new_w);
        g.initializer.push(new_b);
        let read: std::collections::HashSet<String> = g
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .collect();
        g.initializer.retain(|t| read.contains(&t.name));
        current = OnnxModel::from_bytes(&proto.encode_to_vec())?;
        let norm = yy.max(1e-30);
        err_before += (ee / norm).sqrt();
        err_after += (ea / norm).sqrt();
        refitted += 1;
    }
    let d = refitted.max(1) as f64;
    Ok((
        current,
        ReconstructReport {
            refitted,
            skipped,
            rel_error: ((err_before / d) as f32, (err_after / d) as f32),
        },
    ))
}
