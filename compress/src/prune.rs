//! Pruning of the sequential Gemm/Relu models: unstructured (magnitude, global or per layer;
//! gradient sensitivity `|w·∂L/∂w|`), structured (whole hidden units by the L1 norm of their
//! incoming weights, rewriting the graph to fewer units so tract runs a genuinely smaller and
//! faster model), layer pruning (a square hidden layer replaced by the identity) and the
//! iterative prune → fine-tune schedule to a target sparsity.
//!
//! Unstructured pruning is expressed as 0/1 masks by initializer name, so a pruned model is
//! fine-tuned with [`TrainConfig::masks`] without regrowing connections, and the sparse
//! tensors compress well in a package. Rankings are deterministic (ties broken by position),
//! and the number of pruned values is exactly `round(sparsity · count)`.

use hearth_model::data::Dataset;
use hearth_model::error::ModelError;
use hearth_model::infer::{accuracy, Classifier};
use hearth_model::onnx::{DenseLayer, OnnxModel};
use hearth_model::tensor::{Tensor, Weights};
use hearth_model::train::{train, TrainConfig};
use prost::Message;
use std::collections::BTreeSet;
use tract_onnx::pb;

/// Names of the Gemm weight initializers of `model`, in layer order (what pruning ranks;
/// biases are never pruned by the unstructured methods).
pub fn gemm_weight_names(model: &OnnxModel) -> Result<Vec<String>, ModelError> {
    Ok(model
        .dense_layers()?
        .into_iter()
        .map(|l| l.weight)
        .collect())
}

/// Share of exact zeros among the values of the tensors `names` (all tensors of `w` when
/// `names` is empty; names missing from `w` are ignored). 0 when there are no values.
pub fn sparsity(w: &Weights, names: &[String]) -> f32 {
    let (mut zeros, mut total) = (0usize, 0usize);
    for (name, t) in w {
        if names.is_empty() || names.contains(name) {
            zeros += t.data.iter().filter(|&&v| v == 0.0).count();
            total += t.len();
        }
    }
    if total == 0 {
        0.0
    } else {
        zeros as f32 / total as f32
    }
}

/// Masks pruning the `round(sparsity · n)` values of lowest `score`, where `scores` holds
/// (name, per-value score) and n is the number of values; ties broken by position.
fn lowest_masks(scores: &[(&String, &Tensor, Vec<f32>)], sparsity: f32) -> Weights {
    let total: usize = scores.iter().map(|(_, t, _)| t.len()).sum();
    let k = (sparsity.clamp(0.0, 1.0) as f64 * total as f64).round() as usize;
    let mut order: Vec<(f32, usize, usize)> = scores
        .iter()
        .enumerate()
        .flat_map(|(ti, (_, _, s))| s.iter().enumerate().map(move |(i, &v)| (v, ti, i)))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut masks: Vec<Vec<f32>> = scores.iter().map(|(_, t, _)| vec![1.0; t.len()]).collect();
    for &(_, ti, i) in order.iter().take(k) {
        masks[ti][i] = 0.0;
    }
    scores
        .iter()
        .zip(masks)
        .map(|((name, t, _), m)| ((*name).clone(), Tensor::new(t.shape.clone(), m)))
        .collect()
}

/// Magnitude pruning: 0/1 masks (1 keep, 0 prune) for the tensors `names` (names missing
/// from `w` are ignored) pruning the values of smallest `|w|`: `round(sparsity · total)`
/// over all of them when `global`, else `round(sparsity · len)` in every tensor.
pub fn magnitude_masks(w: &Weights, names: &[String], sparsity: f32, global: bool) -> Weights {
    magnitude_masks_keeping(w, names, sparsity, global, None)
}

/// [`magnitude_masks`] where values already pruned by `prev` rank first (so a schedule's
/// masks only grow).
fn magnitude_masks_keeping(
    w: &Weights,
    names: &[String],
    sparsity: f32,
    global: bool,
    prev: Option<&Weights>,
) -> Weights {
    let scores: Vec<(&String, &Tensor, Vec<f32>)> = w
        .iter()
        .filter(|(n, _)| names.contains(n))
        .map(|(n, t)| {
            let p = prev.and_then(|p| p.get(n));
            let s = t
                .data
                .iter()
                .enumerate()
                .map(|(i, v)| match p {
                    Some(p) if p.data.get(i) == Some(&0.0) => -1.0,
                    _ => v.abs(),
                })
                .collect();
            (n, t, s)
        })
        .collect();
    if global {
        lowest_masks(&scores, sparsity)
    } else {
        scores
            .into_iter()
            .flat_map(|s| lowest_masks(&[s], sparsity))
            .collect()
    }
}

/// Gradient-sensitivity pruning: masks pruning the `round(sparsity · total)` values of
/// smallest `|w · g|` over all tensors `names` (the first-order Taylor estimate of the loss
/// change when the weight is removed, comparable across layers, hence one global ranking).
/// `g` is a gradient by the same names (e.g. [`hearth_model::train::gradients`] on a batch);
/// names missing from `w` or `g` are ignored.
pub fn sensitivity_masks(w: &Weights, g: &Weights, names: &[String], sparsity: f32) -> Weights {
    let scores: Vec<(&String, &Tensor, Vec<f32>)> = w
        .iter()
        .filter(|(n, t)| names.contains(n) && g.get(*n).is_some_and(|gt| gt.shape == t.shape))
        .map(|(n, t)| {
            let s = t
                .data
                .iter()
                .zip(&g[n].data)
                .map(|(a, b)| (a * b).abs())
                .collect();
            (n, t, s)
        })
        .collect();
    lowest_masks(&scores, sparsity)
}

/// Sets to exactly 0 every value whose mask is 0 (masks for names absent from `w`, or of
/// another shape, are ignored).
pub fn apply_masks(w: &mut Weights, masks: &Weights) {
    for (name, m) in masks {
        if let Some(t) = w.get_mut(name) {
            if t.shape == m.shape {
                for (v, &k) in t.data.iter_mut().zip(&m.data) {
                    if k == 0.0 {
                        *v = 0.0;
                    }
                }
            }
        }
    }
}

pub(crate) use hearth_model::onnx::f32_initializer;

/// A model from an edited protobuf: replaces the initializers in `replace` (adding new ones),
/// removes those in `remove`, drops intermediate `value_info` (shapes may have changed) and
/// graph inputs naming a changed initializer, then re-reads it.
pub(crate) fn rewrite(
    mut proto: pb::ModelProto,
    replace: &Weights,
    remove: &BTreeSet<String>,
) -> Result<OnnxModel, ModelError> {
    let g = proto
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Onnx("model has no graph".into()))?;
    g.initializer
        .retain(|t| !remove.contains(&t.name) && !replace.contains_key(&t.name));
    for (name, t) in replace {
        g.initializer.push(f32_initializer(name, t));
    }
    g.input
        .retain(|i| !remove.contains(&i.name) && !replace.contains_key(&i.name));
    g.value_info.clear();
    OnnxModel::from_bytes(&proto.encode_to_vec())
}

/// A Gemm layer as a dense `[out, in]` row-major matrix.
struct Layer {
    spec: DenseLayer,
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
}

fn read_layers(model: &OnnxModel) -> Result<Vec<Layer>, ModelError> {
    let weights = model.weights();
    model
        .dense_layers()?
        .into_iter()
        .map(|spec| {
            let t = &weights[&spec.weight];
            let (rows, cols) = (spec.outputs, spec.inputs);
            let w = spec.out_major(t);
            let b = spec.bias.as_ref().map(|n| weights[n].data.clone());
            Ok(Layer {
                spec,
                rows,
                cols,
                w,
                b,
            })
        })
        .collect()
}

/// The layer's weight in its initializer's layout.
fn stored(l: &Layer) -> Tensor {
    if l.spec.trans_b {
        Tensor::new(vec![l.rows, l.cols], l.w.clone())
    } else {
        let mut t = vec![0.0; l.rows * l.cols];
        for o in 0..l.rows {
            for i in 0..l.cols {
                t[i * l.rows + o] = l.w[o * l.cols + i];
            }
        }
        Tensor::new(vec![l.cols, l.rows], t)
    }
}

fn gemm_node_mut<'a>(g: &'a mut pb::GraphProto, weight: &str) -> Option<&'a mut pb::NodeProto> {
    g.node
        .iter_mut()
        .find(|n| n.op_type == "Gemm" && n.input.get(1).map(String::as_str) == Some(weight))
}

/// Structured neuron pruning: in every hidden layer removes the `floor(fraction · width)`
/// units (at least one kept) with the smallest L1 norm of their incoming weight row, and
/// rewrites the graph: the rows of `fcK.weight`/`fcK.bias` and the matching columns of
/// `fc(K+1).weight` are deleted, so the model has fewer units (smaller file, fewer FLOPs).
///
/// A removed unit whose incoming weights are all zero outputs the constant `relu(b)` (or `b`
/// without Relu); that constant's contribution is folded into the next layer's bias (a bias
/// is added if the next Gemm has none), so pruning dead units leaves the outputs unchanged.
pub fn prune_neurons(model: &OnnxModel, fraction: f32) -> Result<OnnxModel, ModelError> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(ModelError::Data(format!(
            "neuron fraction {fraction} not in [0, 1)"
        )));
    }
    let mut layers = read_layers(model)?;
    let mut new_bias: Vec<(usize, String)> = Vec::new();
    for k in 0..layers.len().saturating_sub(1) {
        let (rows, cols) = (layers[k].rows, layers[k].cols);
        let remove = ((fraction as f64 * rows as f64).floor() as usize).min(rows - 1);
        if remove == 0 {
            continue;
        }
        let l1: Vec<f32> = layers[k]
            .w
            .chunks(cols)
            .map(|r| r.iter().map(|v| v.abs()).sum())
            .collect();
        let mut order: Vec<usize> = (0..rows).collect();
        order.sort_by(|&a, &b| l1[a].total_cmp(&l1[b]).then(a.cmp(&b)));
        let dropped: BTreeSet<usize> = order[..remove].iter().copied().collect();
        let keep: Vec<usize> = (0..rows).filter(|j| !dropped.contains(j)).collect();
        // Fold the constant output of all-zero units into the next layer's bias.
        let consts: Vec<(usize, f32)> = dropped
            .iter()
            .filter(|&&j| l1[j] == 0.0)
            .map(|&j| {
                let b = layers[k].b.as_ref().map_or(0.0, |b| b[j]);
                (j, if layers[k].spec.relu { b.max(0.0) } else { b })
            })
            .filter(|&(_, c)| c != 0.0)
            .collect();
        let cur = &mut layers[k];
        cur.w = keep
            .iter()
            .flat_map(|&j| cur.w[j * cols..(j + 1) * cols].to_vec())
            .collect();
        cur.b = cur.b.take().map(|b| keep.iter().map(|&j| b[j]).collect());
        cur.rows = keep.len();
        cur.spec.outputs = keep.len();
        let next = &mut layers[k + 1];
        let (nrows, ncols) = (next.rows, next.cols);
        if !consts.is_empty() {
            if next.b.is_none() {
                next.b = Some(vec![0.0; nrows]);
                let name = format!("{}.folded_bias", next.spec.weight);
                next.spec.bias = Some(name.clone());
                new_bias.push((k + 1, name));
            }
            let b = next.b.as_mut().expect("bias just ensured");
            for (o, bo) in b.iter_mut().enumerate() {
                for &(j, c) in &consts {
                    *bo += c * next.w[o * ncols + j];
                }
            }
        }
        next.w = (0..nrows)
            .flat_map(|o| {
                let row = &next.w[o * ncols..(o + 1) * ncols];
                keep.iter().map(move |&j| row[j])
            })
            .collect();
        next.cols = keep.len();
        next.spec.inputs = keep.len();
    }
    let mut replace = Weights::new();
    for l in &layers {
        replace.insert(l.spec.weight.clone(), stored(l));
        if let (Some(name), Some(b)) = (&l.spec.bias, &l.b) {
            replace.insert(name.clone(), Tensor::new(vec![l.rows], b.clone()));
        }
    }
    let mut proto = model.proto().clone();
    if let Some(g) = proto.graph.as_mut() {
        for (k, name) in &new_bias {
            let node = gemm_node_mut(g, &layers[*k].spec.weight)
                .ok_or_else(|| ModelError::Onnx("Gemm node not found".into()))?;
            node.input.truncate(2);
            node.input.push(name.clone());
        }
    }
    rewrite(proto, &replace, &BTreeSet::new())
}

/// The model with hidden layer `k` (a square Gemm and its Relu) replaced by the identity.
fn without_layer(model: &OnnxModel, spec: &DenseLayer) -> Result<OnnxModel, ModelError> {
    let mut proto = model.proto().clone();
    let g = proto
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Onnx("model has no graph".into()))?;
    let gi = g
        .node
        .iter()
        .position(|n| n.op_type == "Gemm" && n.input.get(1) == Some(&spec.weight))
        .ok_or_else(|| ModelError::Onnx(format!("no Gemm reads {}", spec.weight)))?;
    let input = g.node[gi].input[0].clone();
    let mut out = g.node[gi].output[0].clone();
    let mut drop = vec![gi];
    if spec.relu {
        let ri = g
            .node
            .iter()
            .position(|n| n.op_type == "Relu" && n.input.first() == Some(&out))
            .ok_or_else(|| ModelError::Onnx(format!("Relu after {} not found", spec.weight)))?;
        out = g.node[ri].output[0].clone();
        drop.push(ri);
    }
    if g.output.iter().any(|o| o.name == out) {
        return Err(ModelError::Onnx(format!("{out} is a graph output")));
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !drop.contains(&(i - 1))
    });
    for n in g.node.iter_mut() {
        for inp in n.input.iter_mut() {
            if *inp == out {
                *inp = input.clone();
            }
        }
    }
    let remove: BTreeSet<String> = std::iter::once(spec.weight.clone())
        .chain(spec.bias.clone())
        .collect();
    rewrite(proto, &Weights::new(), &remove)
}

/// Layer pruning: repeatedly removes the hidden Gemm(+Relu) layer with equal input and output
/// widths whose replacement by the identity costs the least accuracy on `data`, as long as the
/// accuracy stays within `max_drop` (absolute, e.g. 0.01 = one point) of the original model's.
/// Returns the pruned model and the weight names of the removed layers, in removal order.
pub fn prune_layers(
    model: &OnnxModel,
    data: &Dataset,
    max_drop: f32,
) -> Result<(OnnxModel, Vec<String>), ModelError> {
    let base = accuracy(&Classifier::new(model)?, data)?;
    let mut cur = model.clone();
    let mut removed = Vec::new();
    let layers = cur.dense_layers()?.len();
    for _ in 0..layers {
        let specs = cur.dense_layers()?;
        let mut best: Option<(f32, OnnxModel, String)> = None;
        for spec in &specs[..specs.len() - 1] {
            if spec.inputs != spec.outputs {
                continue;
            }
            let Ok(candidate) = without_layer(&cur, spec) else {
                continue;
            };
            let acc = accuracy(&Classifier::new(&candidate)?, data)?;
            if best.as_ref().is_none_or(|(a, _, _)| acc > *a) {
                best = Some((acc, candidate, spec.weight.clone()));
            }
        }
        match best {
            Some((acc, m, name)) if base - acc <= max_drop => {
                cur = m;
                removed.push(name);
            }
            _ => break,
        }
    }
    Ok((cur, removed))
}

/// Iterative magnitude pruning with fine-tuning: over `steps` rounds (1 if 0) the global
/// sparsity of the Gemm weights follows the cubic schedule `s_i = target·(1 − (1 − i/steps)³)`
/// (Zhu & Gupta 2017: prune fast while redundancy is high, slowly near the target); each
/// round prunes by magnitude (already pruned weights stay pruned) and fine-tunes on `data`
/// with `finetune` and the masks. The final model has exactly `round(target · n)` of the
/// n Gemm weights at zero; returns it and the masks.
pub fn iterative_prune(
    model: &OnnxModel,
    data: &Dataset,
    target: f32,
    steps: u32,
    finetune: &TrainConfig,
) -> Result<(OnnxModel, Weights), ModelError> {
    if !(0.0..=1.0).contains(&target) {
        return Err(ModelError::Data(format!(
            "target sparsity {target} not in [0, 1]"
        )));
    }
    let names = gemm_weight_names(model)?;
    let steps = steps.max(1);
    let mut cur = model.clone();
    let mut masks: Option<Weights> = None;
    for i in 1..=steps {
        let s = target * (1.0 - (1.0 - i as f32 / steps as f32).powi(3));
        let mut w = cur.weights();
        let m = magnitude_masks_keeping(&w, &names, s, true, masks.as_ref());
        apply_masks(&mut w, &m);
        cur.set_weights(&w)?;
        if finetune.epochs > 0 {
            let cfg = TrainConfig {
                masks: Some(m.clone()),
                ..finetune.clone()
            };
            let (tuned, _) = train(&cur, data, &cfg)?;
            cur.set_weights(&tuned)?;
        }
        masks = Some(m);
    }
    Ok((cur, masks.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> Weights {
        let mut w = Weights::new();
        w.insert(
            "a".into(),
            Tensor::new(vec![2, 3], vec![0.1, -0.5, 0.05, 2.0, -0.01, 0.3]),
        );
        w.insert("b".into(), Tensor::new(vec![2], vec![-3.0, 0.2]));
        w
    }

    #[test]
    fn magnitude_and_sensitivity_masks_count_exactly() {
        let w = w();
        let names = vec!["a".to_string(), "b".to_string()];
        let m = magnitude_masks(&w, &names, 0.5, true);
        assert_eq!(m["a"].data, vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(m["b"].data, vec![1.0, 0.0]);
        let per = magnitude_masks(&w, &names, 0.5, false);
        assert_eq!(per["a"].data, vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(per["b"].data, vec![1.0, 0.0]);
        let only_a = magnitude_masks(&w, &names[..1], 1.0 / 3.0, true);
        assert_eq!(only_a.len(), 1);
        assert_eq!(only_a["a"].data, vec![1.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        let mut g = Weights::new();
        g.insert(
            "a".into(),
            Tensor::new(vec![2, 3], vec![10.0, 0.0, 1.0, 0.001, 6.0, 1.0]),
        );
        g.insert("b".into(), Tensor::new(vec![2], vec![0.0, 1.0]));
        // abs(w·g) = [1, 0, 0.05, 0.002, 0.06, 0.3 | 0, 0.2]
        let s = sensitivity_masks(&w, &g, &names, 0.5);
        assert_eq!(s["a"].data, vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
        assert_eq!(s["b"].data, vec![0.0, 1.0]);
        let mut pruned = w.clone();
        apply_masks(&mut pruned, &s);
        assert_eq!(sparsity(&pruned, &names), 0.5);
        assert_eq!(sparsity(&pruned, &[]), 0.5);
        assert_eq!(pruned["b"].data, vec![0.0, 0.2]);
        assert_eq!(sparsity(&w, &names), 0.0);
    }
}
