//! Measuring a model before and after compression: size on disk, parameters, non-zeros,
//! accuracy on a labelled set or output agreement with a reference model, and tract latency
//! per sample (median over N batch-1 runs).
//!
//! Works on Hearth's own classifiers and on imported single-input ONNX models of any shape
//! (e.g. BlazeFace, NHWC f32[1,128,128,3] with four outputs) through [`GenericRunner`].
//! Imported graphs get [`fix_constant_of_shape`] at load ([`load_for_tract`]): a
//! `ConstantOfShape` without a `value` attribute is typed 64-bit by tract, ONNX says f32 zero.

use hearth_model::data::Dataset;
use hearth_model::error::ModelError;
use hearth_model::infer::{accuracy, argmax, Classifier};
use hearth_model::onnx::OnnxModel;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;

/// How far a model's outputs are from a reference model's on the same inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    /// Largest |a − b| over every compared output value of every sample.
    pub max_abs_diff: f32,
    /// Mean |a − b| over every compared output value of every sample.
    pub mean_abs_diff: f32,
    /// Share of samples on which both models decide the same: the argmax over the compared
    /// values (a classifier's predicted class) for [`OutputTransform::Identity`]; whether the
    /// largest value exceeds 0.5 (a detector's "object present") for
    /// [`OutputTransform::Sigmoid`] and [`OutputTransform::Probability`].
    pub decision_agreement: f32,
    /// Number of inputs compared.
    pub samples: usize,
    /// Names of the compared outputs.
    pub outputs: Vec<String>,
}

/// Inputs compared when no evaluation set is given (zeros, then uniform [-1, 1]).
pub const PROBE_INPUTS: usize = 8;

/// What [`measure`] reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Serialized ONNX size in bytes.
    pub bytes: usize,
    /// Elements of the weight initializers (see [`count_params`]).
    pub params: usize,
    /// Elements of the weight initializers that are not zero.
    pub nonzeros: usize,
    /// Accuracy on the labelled evaluation set (classifiers whose input matches it).
    pub accuracy: Option<f32>,
    /// Output agreement with the reference model (when one is given).
    pub agreement: Option<Agreement>,
    /// Median tract latency per sample (batch 1), microseconds.
    pub latency_us_median: f64,
    /// Median batch-1 latency of Hearth's dense conv engine (`hearth_model::dense_conv`) on
    /// the same input, microseconds; `None` when it does not run the graph (or no latency
    /// was measured).
    pub dense_latency_us_median: Option<f64>,
}

/// Transform applied to outputs before they are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputTransform {
    /// Compare the raw values.
    Identity,
    /// Compare `1 / (1 + e^-x)` (detector score logits → probabilities).
    Sigmoid,
    /// The outputs are probabilities already (a graph ending in Sigmoid): compared as they
    /// are, decided like [`OutputTransform::Sigmoid`] (some value above 0.5).
    Probability,
}

/// Options of [`measure_with`].
#[derive(Clone, Debug, PartialEq)]
pub struct MeasureOptions {
    /// Timed batch-1 runs (after one warm-up run); 0 skips the latency measurement.
    pub latency_runs: usize,
    /// Outputs compared for agreement, by name; `None` compares every output.
    pub agreement_outputs: Option<Vec<String>>,
    /// Transform applied before comparing.
    pub transform: OutputTransform,
    /// At most this many samples are used for agreement.
    pub max_agreement_samples: usize,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            latency_runs: 20,
            agreement_outputs: None,
            transform: OutputTransform::Identity,
            max_agreement_samples: 200,
        }
    }
}

/// Gives every `ConstantOfShape` node without a `value` attribute an explicit f32 zero
/// (the ONNX default, which tract 0.23 types as 64-bit). Returns the model and how many nodes
/// were rewritten; outputs are unchanged.
pub fn fix_constant_of_shape(model: &OnnxModel) -> Result<(OnnxModel, usize), ModelError> {
    let mut proto = model.proto().clone();
    let mut fixed = 0;
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
                        data_type: DataType::Float as i32,
                        float_data: vec![0.0],
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                fixed += 1;
            }
        }
    }
    if fixed == 0 {
        return Ok((model.clone(), 0));
    }
    Ok((
        OnnxModel::from_bytes(&prost::Message::encode_to_vec(&proto))?,
        fixed,
    ))
}

/// Reads an ONNX file and applies [`fix_constant_of_shape`].
pub fn load_for_tract(path: &Path) -> Result<OnnxModel, ModelError> {
    Ok(fix_constant_of_shape(&OnnxModel::load(path)?)?.0)
}

/// Element types counted as weights by [`count_params`].
fn weight_elem_bytes(data_type: i32) -> Option<usize> {
    match DataType::try_from(data_type).ok()? {
        DataType::Float => Some(4),
        DataType::Int8 | DataType::Uint8 => Some(1),
        _ => None,
    }
}

/// `(params, nonzeros)` over the weight initializers: every f32, int8 or uint8 initializer
/// with more than one element (weights, biases, per-channel tables; scalar scales and zero
/// points and integer shape constants are not parameters). An int8/uint8 value counts as
/// non-zero when its stored code is not 0.
pub fn count_params(model: &OnnxModel) -> (usize, usize) {
    let Some(g) = model.proto().graph.as_ref() else {
        return (0, 0);
    };
    let floats = model.weights();
    let (mut params, mut nonzeros) = (0, 0);
    for init in &g.initializer {
        let Some(size) = weight_elem_bytes(init.data_type) else {
            continue;
        };
        let n: usize = init.dims.iter().map(|&d| d.max(0) as usize).product();
        if n <= 1 {
            continue;
        }
        if size == 4 {
            if let Some(t) = floats.get(&init.name) {
                params += t.len();
                nonzeros += t.data.iter().filter(|v| **v != 0.0).count();
            }
        } else {
            let codes: Vec<i32> = if init.raw_data.len() == n {
                init.raw_data.iter().map(|&b| i32::from(b)).collect()
            } else {
                init.int32_data.clone()
            };
            params += n;
            nonzeros += codes.iter().filter(|&&c| c != 0).count();
        }
    }
    (params, nonzeros)
}

/// A tract plan for an arbitrary f32 model, fixed to batch 1: symbolic or unknown input
/// dimensions are set to 1; inputs after the first (recurrent state) are fed zeros. Returns
/// every output.
#[derive(Clone)]
pub struct GenericRunner {
    plan: Arc<TypedRunnableModel>,
    input_shape: Vec<usize>,
    output_names: Vec<String>,
    /// Zeros for the inputs after the first ([`extra_inputs`]).
    state: Vec<tract_onnx::prelude::Tensor>,
}

impl std::fmt::Debug for GenericRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenericRunner")
            .field("input_shape", &self.input_shape)
            .field("output_names", &self.output_names)
            .finish_non_exhaustive()
    }
}

/// One output of a [`GenericRunner`] run.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedOutput {
    /// Graph output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values as f32 (integer outputs are converted).
    pub data: Vec<f32>,
}

/// Batch-1 dimensions of a graph input (symbolic or unknown dimensions as 1) and its ONNX
/// element type.
fn value_shape(vi: &pb::ValueInfoProto) -> Result<(Vec<usize>, i32), ModelError> {
    use pb::tensor_shape_proto::dimension::Value;
    let name = &vi.name;
    let (dims, elem) = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => (
            t.shape
                .as_ref()
                .map(|s| s.dim.clone())
                .ok_or_else(|| ModelError::Onnx(format!("input {name} has no shape")))?,
            t.elem_type,
        ),
        None => return Err(ModelError::Onnx(format!("input {name} has no type"))),
    };
    Ok((
        dims.iter()
            .map(|d| match d.value {
                Some(Value::DimValue(v)) if v > 0 => v as usize,
                _ => 1,
            })
            .collect(),
        elem,
    ))
}

/// The batch-1 input shape of the model's first non-initializer input.
pub fn input_shape(model: &OnnxModel) -> Result<Vec<usize>, ModelError> {
    let name = model
        .input_name()
        .ok_or_else(|| ModelError::Onnx("graph has no data input".into()))?;
    let g = model.proto().graph.as_ref().expect("graph");
    let vi = g.input.iter().find(|i| i.name == name).expect("input");
    Ok(value_shape(vi)?.0)
}

/// The model's other non-initializer inputs (e.g. a recurrent model's state), by name with
/// their batch-1 shapes: [`GenericRunner`] feeds them zeros. Only f32 ones are supported.
pub fn extra_inputs(model: &OnnxModel) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let g = model.proto().graph.as_ref().expect("graph");
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut out = Vec::new();
    for vi in g
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .skip(1)
    {
        let (shape, elem) = value_shape(vi)?;
        if elem != DataType::Float as i32 {
            return Err(ModelError::Onnx(format!(
                "input {} is not f32 (ONNX type {elem}): only the first input is data, further \
                 inputs must be f32 state (fed zeros)",
                vi.name
            )));
        }
        out.push((vi.name.clone(), shape));
    }
    Ok(out)
}

impl GenericRunner {
    /// Loads and optimises the model with its input fixed to batch 1.
    pub fn new(model: &OnnxModel) -> Result<GenericRunner, ModelError> {
        let input_shape = input_shape(model)?;
        let extra = extra_inputs(model)?;
        let g = model.proto().graph.as_ref().expect("graph");
        let output_names = g.output.iter().map(|o| o.name.clone()).collect();
        let mut m = tract_onnx::onnx()
            .model_for_proto_model(model.proto())
            .and_then(|m| m.with_input_fact(0, f32::fact(&input_shape).into()))
            .map_err(ModelError::tract)?;
        for (k, (_, shape)) in extra.iter().enumerate() {
            m = m
                .with_input_fact(k + 1, f32::fact(shape).into())
                .map_err(ModelError::tract)?;
        }
        let plan = m
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(ModelError::tract)?;
        let state = extra
            .iter()
            .map(|(_, shape)| tract_onnx::prelude::Tensor::zero::<f32>(shape))
            .collect::<TractResult<Vec<_>>>()
            .map_err(ModelError::tract)?;
        Ok(GenericRunner {
            plan,
            input_shape,
            output_names,
            state,
        })
    }

    /// The batch-1 input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Number of input values.
    pub fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Names of the graph outputs.
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// Runs one input (`input_len()` values, row-major in the input shape).
    pub fn run(&self, input: &[f32]) -> Result<Vec<NamedOutput>, ModelError> {
        if input.len() != self.input_len() {
            return Err(ModelError::Shape(format!(
                "input has {} values, model expects {:?}",
                input.len(),
                self.input_shape
            )));
        }
        let t = tract_onnx::prelude::Tensor::from_shape(&self.input_shape, input)
            .map_err(ModelError::tract)?;
        let mut inputs: TVec<TValue> = tvec!(t.into());
        inputs.extend(self.state.iter().map(|z| z.clone().into()));
        let out = self.plan.run(inputs).map_err(ModelError::tract)?;
        out.iter()
            .enumerate()
            .map(|(i, v)| {
                let f = v.cast_to::<f32>().map_err(ModelError::tract)?.into_owned();
                let view = f.try_as_plain_ram().map_err(ModelError::tract)?;
                Ok(NamedOutput {
                    name: self
                        .output_names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("output_{i}")),
                    shape: f.shape().to_vec(),
                    data: view.as_slice::<f32>().map_err(ModelError::tract)?.to_vec(),
                })
            })
            .collect()
    }
}

/// Bilinear resize (half-pixel centres, edge clamped) of a `h×w` grey image to `oh×ow`.
pub fn resize_bilinear(img: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(oh * ow);
    let src = |y: usize, x: usize| img[y * w + x];
    for oy in 0..oh {
        let fy = ((oy as f32 + 0.5) * h as f32 / oh as f32 - 0.5).clamp(0.0, (h - 1) as f32);
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(h - 1);
        let dy = fy - y0 as f32;
        for ox in 0..ow {
            let fx = ((ox as f32 + 0.5) * w as f32 / ow as f32 - 0.5).clamp(0.0, (w - 1) as f32);
            let x0 = fx.floor() as usize;
            let x1 = (x0 + 1).min(w - 1);
            let dx = fx - x0 as f32;
            let top = src(y0, x0) * (1.0 - dx) + src(y0, x1) * dx;
            let bot = src(y1, x0) * (1.0 - dx) + src(y1, x1) * dx;
            out.push(top * (1.0 - dy) + bot * dy);
        }
    }
    out
}

/// Turns the samples of `ds` into inputs of shape `shape` (batch 1):
/// - same number of values: used as they are (Hearth's own models);
/// - a square grey image set (e.g. faces 25×25 in [0,1]) into an image input `[1,H,W,C]`
///   (NHWC, C ≤ 4) or `[1,C,H,W]`: bilinear resize to H×W, the grey level replicated to every
///   channel and scaled from [0,1] to [-1,1] (what BlazeFace expects).
///
/// Errors when neither applies.
pub fn adapt_inputs(ds: &Dataset, shape: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
    let want: usize = shape.iter().product();
    if want == ds.input_len {
        return Ok((0..ds.len()).map(|i| ds.sample(i).to_vec()).collect());
    }
    let side = (ds.input_len as f64).sqrt().round() as usize;
    if side * side != ds.input_len || shape.len() != 4 {
        return Err(ModelError::Shape(format!(
            "cannot feed {}-value samples to input {shape:?}",
            ds.input_len
        )));
    }
    let (nhwc, h, w, c) = if shape[3] <= 4 {
        (true, shape[1], shape[2], shape[3])
    } else {
        (false, shape[2], shape[3], shape[1])
    };
    Ok((0..ds.len())
        .map(|i| {
            let img = resize_bilinear(ds.sample(i), side, side, h, w);
            let mut out = vec![0.0; h * w * c];
            for (p, &v) in img.iter().enumerate() {
                let s = v * 2.0 - 1.0;
                for ch in 0..c {
                    let idx = if nhwc { p * c + ch } else { ch * h * w + p };
                    out[idx] = s;
                }
            }
            out
        })
        .collect())
}

fn transform(v: f32, t: OutputTransform) -> f32 {
    match t {
        OutputTransform::Identity | OutputTransform::Probability => v,
        OutputTransform::Sigmoid => 1.0 / (1.0 + (-v).exp()),
    }
}

/// Concatenated (transformed) values of the selected outputs.
fn selected(outs: &[NamedOutput], names: &[String], t: OutputTransform) -> Vec<f32> {
    outs.iter()
        .filter(|o| names.contains(&o.name))
        .flat_map(|o| o.data.iter().map(move |&v| transform(v, t)))
        .collect()
}

/// Output agreement of `model` with `reference` over `inputs`.
pub fn agreement(
    model: &GenericRunner,
    reference: &GenericRunner,
    inputs: &[Vec<f32>],
    outputs: Option<&[String]>,
    t: OutputTransform,
) -> Result<Agreement, ModelError> {
    let names: Vec<String> = match outputs {
        Some(n) => n.to_vec(),
        None => model.output_names().to_vec(),
    };
    for n in &names {
        if !model.output_names().contains(n) || !reference.output_names().contains(n) {
            return Err(ModelError::Onnx(format!(
                "output {n} is not in both models ({:?} vs {:?})",
                model.output_names(),
                reference.output_names()
            )));
        }
    }
    if inputs.is_empty() {
        return Err(ModelError::Data("no inputs to compare outputs on".into()));
    }
    let (mut max, mut sum, mut count, mut top) = (0f32, 0f64, 0usize, 0usize);
    for x in inputs {
        let a = selected(&model.run(x)?, &names, t);
        let b = selected(&reference.run(x)?, &names, t);
        if a.len() != b.len() {
            return Err(ModelError::Shape(format!(
                "compared outputs have {} vs {} values",
                a.len(),
                b.len()
            )));
        }
        for (p, q) in a.iter().zip(&b) {
            let d = (p - q).abs();
            max = max.max(if d.is_nan() { f32::INFINITY } else { d });
            sum += f64::from(d);
        }
        count += a.len();
        let same = match t {
            OutputTransform::Identity => argmax(&a) == argmax(&b),
            OutputTransform::Sigmoid | OutputTransform::Probability => {
                let hit = |v: &[f32]| v.iter().any(|&p| p > 0.5);
                hit(&a) == hit(&b)
            }
        };
        if same {
            top += 1;
        }
    }
    Ok(Agreement {
        max_abs_diff: max,
        mean_abs_diff: (sum / count.max(1) as f64) as f32,
        decision_agreement: top as f32 / inputs.len() as f32,
        samples: inputs.len(),
        outputs: names,
    })
}

/// Share of `ds`'s first `max` samples whose argmax over the first output with one value per
/// class is the label (`None` when no output has that many values).
fn labelled_accuracy(
    runner: &GenericRunner,
    ds: &Dataset,
    max: usize,
) -> Result<Option<f32>, ModelError> {
    let n = ds.len().min(max.max(1));
    let mut right = 0;
    for i in 0..n {
        let outs = runner.run(ds.sample(i))?;
        let Some(o) = outs.iter().find(|o| o.data.len() == ds.classes.len()) else {
            return Ok(None);
        };
        if argmax(&o.data) == Some(ds.y[i] as usize) {
            right += 1;
        }
    }
    Ok(Some(right as f32 / n.max(1) as f32))
}

/// Median batch-1 latency in microseconds over `runs` timed runs (after one warm-up).
pub fn latency_us(runner: &GenericRunner, input: &[f32], runs: usize) -> Result<f64, ModelError> {
    if runs == 0 {
        return Ok(0.0);
    }
    runner.run(input)?;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            runner.run(input).map(|_| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    let m = times.len() / 2;
    Ok(if times.len() % 2 == 1 {
        times[m]
    } else {
        (times[m - 1] + times[m]) / 2.0
    })
}

/// [`measure_with`] with default options and `latency_runs` timed runs.
pub fn measure(
    model: &OnnxModel,
    eval: Option<&Dataset>,
    reference: Option<&OnnxModel>,
    latency_runs: usize,
) -> Result<Measurement, ModelError> {
    measure_with(
        model,
        eval,
        reference,
        &MeasureOptions {
            latency_runs,
            ..Default::default()
        },
    )
}

/// Measures `model`:
/// - `bytes`, `params`, `nonzeros` from the ONNX file;
/// - `accuracy` when `eval` is given and the model's input takes its samples as they are
///   (Hearth classifiers; tract batch plan);
/// - `agreement` with `reference` on the `eval` samples ([`adapt_inputs`]; without a set, on
///   [`PROBE_INPUTS`] inputs: zeros, then reproducible uniform [-1, 1] values);
/// - latency on the first eval sample (or zeros).
pub fn measure_with(
    model: &OnnxModel,
    eval: Option<&Dataset>,
    reference: Option<&OnnxModel>,
    opts: &MeasureOptions,
) -> Result<Measurement, ModelError> {
    let bytes = model.to_bytes().len();
    let (params, nonzeros) = count_params(model);
    let runner = GenericRunner::new(model)?;
    let inputs: Vec<Vec<f32>> = match eval {
        Some(ds) => {
            let mut v = adapt_inputs(ds, runner.input_shape())?;
            v.truncate(opts.max_agreement_samples.max(1));
            v
        }
        // Zeros, then reproducible uniform [-1, 1] inputs (what "no data" is compared on).
        None => crate::normalise::probe_inputs(
            runner.input_shape(),
            opts.max_agreement_samples.clamp(1, PROBE_INPUTS),
            0,
        ),
    };
    let accuracy = match eval {
        Some(ds)
            if ds.input_len == runner.input_len()
                && runner.input_shape().len() == 2
                && !ds.classes.is_empty() =>
        {
            Some(accuracy(&Classifier::new(model)?, ds)?)
        }
        // Labelled inputs of another shape (an image folder with class sub-folders).
        Some(ds) if ds.input_len == runner.input_len() && ds.classes.len() >= 2 => {
            labelled_accuracy(&runner, ds, opts.max_agreement_samples)?
        }
        _ => None,
    };
    let agreement = match reference {
        Some(r) => Some(agreement(
            &runner,
            &GenericRunner::new(r)?,
            &inputs,
            opts.agreement_outputs.as_deref(),
            opts.transform,
        )?),
        None => None,
    };
    let latency_us_median = latency_us(&runner, &inputs[0], opts.latency_runs)?;
    let dense_latency_us_median =
        dense_conv_latency_us(model, runner.input_shape(), &inputs[0], opts.latency_runs);
    Ok(Measurement {
        bytes,
        params,
        nonzeros,
        accuracy,
        agreement,
        latency_us_median,
        dense_latency_us_median,
    })
}

/// Median batch-1 latency of the dense conv engine on `input` (as [`latency_us`]), or `None`
/// when the graph does not lower to it (any op it lacks) or `runs` is 0.
pub fn dense_conv_latency_us(
    model: &OnnxModel,
    shape: &[usize],
    input: &[f32],
    runs: usize,
) -> Option<f64> {
    if runs == 0 {
        return None;
    }
    let engine = hearth_model::dense_conv::ConvEngine::new(model, shape).ok()?;
    engine.run(input).ok()?;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            engine.run(input).map(|_| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_, _>>()
        .ok()?;
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_model::data::Task;
    use hearth_model::tensor::Weights;

    #[test]
    fn measures_an_mlp_and_its_pruned_copy() {
        let m = OnnxModel::build_mlp(&Task::Digits.default_spec(), 1);
        let n = 64 * 32 + 32 + 32 * 10 + 10;
        assert_eq!(count_params(&m), (n, n - 42)); // zero biases
        let mut pruned = m.clone();
        let mut w: Weights = m.weights();
        let t = w.get_mut("fc0.weight").unwrap();
        for v in t.data.iter_mut().take(1000) {
            *v = 0.0;
        }
        pruned.set_weights(&w).unwrap();
        let ds = Dataset {
            task: "digits".into(),
            classes: Task::Digits.classes(),
            input_len: 64,
            x: (0..64 * 8).map(|i| (i % 13) as f32 / 13.0).collect(),
            y: (0..8).map(|i| i % 10).collect(),
        };
        let a = measure(&m, Some(&ds), Some(&m), 5).unwrap();
        assert_eq!(a.bytes, m.to_bytes().len());
        assert_eq!(a.params, n);
        let acc = a.accuracy.unwrap();
        assert!((0.0..=1.0).contains(&acc));
        let ag = a.agreement.unwrap();
        assert_eq!(ag.max_abs_diff, 0.0);
        assert_eq!(ag.decision_agreement, 1.0);
        assert_eq!(ag.samples, 8);
        assert!(a.latency_us_median > 0.0);
        let b = measure(&pruned, Some(&ds), Some(&m), 3).unwrap();
        assert_eq!(b.nonzeros, a.nonzeros - 1000);
        assert!(b.agreement.unwrap().max_abs_diff > 0.0);
    }

    #[test]
    fn adapts_grey_images_to_nhwc_and_resizes() {
        let img: Vec<f32> = (0..4).map(|i| i as f32 / 3.0).collect();
        let r = resize_bilinear(&img, 2, 2, 4, 4);
        assert_eq!(r.len(), 16);
        assert_eq!(r[0], 0.0);
        assert!((r[15] - 1.0).abs() < 1e-6);
        let ds = Dataset {
            task: "faces".into(),
            classes: Task::Faces.classes(),
            input_len: 4,
            x: img,
            y: vec![1],
        };
        let v = adapt_inputs(&ds, &[1, 4, 4, 3]).unwrap();
        assert_eq!(v[0].len(), 48);
        assert_eq!(&v[0][..3], &[-1.0, -1.0, -1.0]);
        assert!((v[0][47] - 1.0).abs() < 1e-6);
        assert!(adapt_inputs(&ds, &[1, 7]).is_err());
    }

    #[test]
    fn blazeface_loads_after_the_constant_of_shape_fix() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/models/face_detection_front_128x128_barracuda.onnx");
        let raw = OnnxModel::load(&path).unwrap();
        let (fixed, n) = fix_constant_of_shape(&raw).unwrap();
        assert!(n >= 1, "expected a ConstantOfShape without value");
        assert_eq!(fix_constant_of_shape(&fixed).unwrap().1, 0);
        let r = GenericRunner::new(&fixed).unwrap();
        assert_eq!(r.input_shape(), &[1, 128, 128, 3]);
        let out = r.run(&vec![0.0; 128 * 128 * 3]).unwrap();
        let mut shapes: Vec<Vec<usize>> = out.iter().map(|o| o.shape.clone()).collect();
        shapes.sort();
        assert_eq!(
            shapes,
            vec![
                vec![1, 384, 1],
                vec![1, 384, 16],
                vec![1, 512, 1],
                vec![1, 512, 16]
            ]
        );
        let (params, nz) = count_params(&fixed);
        assert!((90_000..130_000).contains(&params), "{params}");
        assert!(nz > params / 2);
    }
}
