//! Recipes: the ordered compression steps, parsed from an inline string
//! (`"prune:0.8;finetune:3;quant:int4-per-channel"`) or a TOML file (`[[step]]` tables).
//! Both forms go through one parser, so they accept exactly the same steps and keys.

use crate::calib::CalibSpec;
use crate::channels::ChannelCriterion;
use crate::codebook::CodebookKind;
use crate::error::CompressError;
use crate::quant::{Granularity, QuantScheme};
use std::collections::BTreeMap;
use std::fmt;

/// Unstructured pruning criterion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneMethod {
    /// Smallest |w| first.
    Magnitude,
    /// Smallest |w · ∂L/∂w| first (gradient on the training set).
    Sensitivity,
}

/// The mixed-precision budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BudgetSpec {
    /// Stored weights at most this many bytes.
    SizeBytes(usize),
    /// Eval accuracy at least this.
    AccuracyFloor(f32),
}

/// What the final artefact is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// An f32 ONNX file (quantized weights are stored dequantized).
    Float,
    /// An ONNX file in int8 QOperator form (tract integer kernels).
    Int8QOperator,
    /// A Hearth compact package (sparse + low-bit tensors + manifest).
    Package,
}

/// One step of a recipe.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Train a smaller student from the current model as teacher.
    Distill {
        /// Student hidden widths (default: the teacher's halved).
        hidden: Option<Vec<usize>>,
        /// Softmax temperature T.
        temperature: f32,
        /// Weight α of the soft term.
        alpha: f32,
        /// Training epochs.
        epochs: u32,
    },
    /// Unstructured pruning to a sparsity of the weight tensors (masks kept for later steps).
    Prune {
        /// Share of weights set to zero.
        sparsity: f32,
        /// Criterion.
        method: PruneMethod,
        /// One threshold over all layers (true) or the same sparsity in every layer.
        global: bool,
    },
    /// Structured: remove this fraction of every hidden layer's units (L1 norm).
    PruneNeurons {
        /// Share of units removed per hidden layer.
        fraction: f32,
    },
    /// Structured: remove this fraction of every conv layer's output channels (tied channels
    /// together), rewriting the consumers ([`crate::channels`]).
    PruneChannels {
        /// Share of each group's removable channels removed.
        fraction: f32,
        /// Ranking.
        criterion: ChannelCriterion,
        /// Refit the layers reading pruned channels by least squares on calibration inputs.
        recover: bool,
    },
    /// Remove square hidden layers while accuracy drops at most `max_drop`.
    PruneLayers {
        /// Largest accepted accuracy drop (absolute).
        max_drop: f32,
    },
    /// SVD factorisation of Gemm weights by retained energy.
    LowRank {
        /// Retained share of the squared singular values.
        energy: f32,
        /// Minimum share of a layer's parameters a factorisation must save.
        min_saving: f32,
    },
    /// Fine-tune on the training split (pruning masks and quantization kept).
    Finetune {
        /// Epochs.
        epochs: u32,
        /// Learning rate.
        lr: f32,
    },
    /// Quantize every weight tensor with one scheme (weights stored fake-quantized).
    Quant {
        /// The scheme.
        scheme: QuantScheme,
    },
    /// Per-layer scheme chosen by a sensitivity search under a budget.
    MixedPrecision {
        /// The budget.
        budget: BudgetSpec,
    },
    /// Quantization-aware fine-tuning with the current per-layer schemes.
    Qat {
        /// Epochs.
        epochs: u32,
        /// Learning rate.
        lr: f32,
    },
    /// Final artefact format.
    Export {
        /// The format.
        format: ExportFormat,
    },
}

impl Step {
    /// The step's name as written in recipes.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Distill { .. } => "distill",
            Step::Prune { .. } => "prune",
            Step::PruneNeurons { .. } => "prune-neurons",
            Step::PruneLayers { .. } => "prune-layers",
            Step::PruneChannels { .. } => "prune-channels",
            Step::LowRank { .. } => "low-rank",
            Step::Finetune { .. } => "finetune",
            Step::Quant { .. } => "quant",
            Step::MixedPrecision { .. } => "mixed-precision",
            Step::Qat { .. } => "qat",
            Step::Export { .. } => "export",
        }
    }

    /// True for steps that need a sequential Gemm/Relu classifier (training, graph rewrites
    /// of dense layers, labelled data). Only `prune` (magnitude), `quant` and
    /// `export:float` apply to arbitrary ONNX graphs.
    pub fn needs_mlp(&self) -> bool {
        !matches!(
            self,
            Step::Prune {
                method: PruneMethod::Magnitude,
                ..
            } | Step::Quant { .. }
                | Step::PruneChannels { .. }
                | Step::Export {
                    format: ExportFormat::Float
                        | ExportFormat::Package
                        | ExportFormat::Int8QOperator
                }
        )
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Distill {
                hidden,
                temperature,
                alpha,
                epochs,
            } => {
                write!(f, "distill T={temperature} a={alpha} e={epochs}")?;
                if let Some(h) = hidden {
                    let h: Vec<String> = h.iter().map(|v| v.to_string()).collect();
                    write!(f, " h={}", h.join("x"))?;
                }
                Ok(())
            }
            Step::Prune {
                sparsity,
                method,
                global,
            } => write!(
                f,
                "prune {:.0}% {}{}",
                sparsity * 100.0,
                match method {
                    PruneMethod::Magnitude => "mag",
                    PruneMethod::Sensitivity => "sens",
                },
                if *global { "" } else { "/layer" }
            ),
            Step::PruneNeurons { fraction } => {
                write!(f, "prune-neurons {:.0}%", fraction * 100.0)
            }
            Step::PruneLayers { max_drop } => write!(f, "prune-layers {max_drop}"),
            Step::PruneChannels {
                fraction,
                criterion,
                recover,
            } => write!(
                f,
                "prune-channels {:.0}% {}{}",
                fraction * 100.0,
                match criterion {
                    ChannelCriterion::L1 => "l1",
                    ChannelCriterion::Sensitivity => "sens",
                },
                if *recover { " +ls" } else { "" }
            ),
            Step::LowRank { energy, .. } => write!(f, "low-rank {energy}"),
            Step::Finetune { epochs, .. } => write!(f, "finetune {epochs}"),
            Step::Quant { scheme } => write!(f, "quant {scheme}"),
            Step::MixedPrecision { budget } => match budget {
                BudgetSpec::SizeBytes(b) => write!(f, "mixed size<={b}B"),
                BudgetSpec::AccuracyFloor(a) => write!(f, "mixed acc>={a}"),
            },
            Step::Qat { epochs, .. } => write!(f, "qat {epochs}"),
            Step::Export { format } => write!(
                f,
                "export {}",
                match format {
                    ExportFormat::Float => "float",
                    ExportFormat::Int8QOperator => "int8-qoperator",
                    ExportFormat::Package => "package",
                }
            ),
        }
    }
}

/// A parsed recipe: the steps, and per step whether it may change nothing (`allow_noop`).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Recipe {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Per step: true when the recipe accepts that the step changes nothing (`kind?` inline,
    /// `allow_noop = true`); a step that changes nothing is otherwise an error (exit 64).
    pub allow_noop: Vec<bool>,
    /// Calibration data (TOML `[calibration]`; the CLI's `--calib*` options override it).
    pub calibration: Option<CalibSpec>,
}

impl Recipe {
    /// A recipe of `steps`, none of which may be a no-op.
    pub fn new(steps: Vec<Step>) -> Recipe {
        let allow_noop = vec![false; steps.len()];
        Recipe {
            steps,
            allow_noop,
            calibration: None,
        }
    }

    /// Whether step `i` (0-based) may change nothing.
    pub fn noop_allowed(&self, i: usize) -> bool {
        self.allow_noop.get(i).copied().unwrap_or(false)
    }
}

impl std::ops::Deref for Recipe {
    type Target = [Step];
    fn deref(&self) -> &[Step] {
        &self.steps
    }
}

/// The syntax, as printed by `--help` and documented in compress/README.md.
pub const SYNTAX: &str = "\
RECIPE: a TOML file (a list of [[step]] tables with `kind = \"...\"` plus the keys below)
or an inline string: steps separated by ';', each `kind[:value][,key=value...]`
(the bare value sets the step's main key, marked *):
  distill:hidden=16x8,T=4,alpha=0.7,epochs=20   student from the current model (hidden default: halved)
  prune:*sparsity=0.8,method=magnitude|sensitivity,scope=global|layer
  prune-neurons:*fraction=0.25                  remove units by L1 norm (graph shrinks)
  prune-layers:*max_drop=0.01                   drop square hidden layers
  prune-channels:*fraction=0.5,criterion=l1|sensitivity,recover=none|ls
                                                remove conv output channels (tied ones together;
                                                the graph shrinks); also prune-channels:0.5:sensitivity
  low-rank:*energy=0.9,min_saving=0.1           SVD of Gemm weights
  finetune:*epochs=3,lr=0.01                    masks and quantization kept
  quant:*scheme=int4-per-channel                int<b>[-per-channel|-per-tensor] (symmetric),
                                                affine<b>[-per-channel], pow2-<b>, kmeans<b>, gauss<b>
  mixed-precision:size=<bytes>|acc=<floor>      per-layer scheme search (int8/int4/int2 per channel)
  qat:*epochs=2,lr=0.005                        quantization-aware fine-tune
  export:*format=float|int8-qoperator|package   (default float; must be last)
Every recipe starts with `normalise` (Constant nodes to initializers, BatchNorm folded, constant
sub-graphs folded, Identity/no-op Cast/Reshape removed; outputs checked against the original).
A step that changes nothing (no weight tensors, no Conv to quantize, ...) is an error (exit 64)
unless marked: `quant?:int8` inline, or `allow_noop=true` (TOML `allow_noop = true`).
Example: \"distill:T=4,alpha=0.7;prune:0.8;finetune:3;quant:int4-per-channel;export:package\"";

type Args = BTreeMap<String, String>;

fn bad(step: usize, kind: &str, msg: impl fmt::Display) -> CompressError {
    CompressError::Recipe(format!("step {} ({kind}): {msg}", step + 1))
}

fn take<T: std::str::FromStr>(
    args: &mut Args,
    key: &str,
    default: T,
    i: usize,
    kind: &str,
) -> Result<T, CompressError>
where
    T::Err: fmt::Display,
{
    match args.remove(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|e| bad(i, kind, format!("{key}={v:?}: {e}"))),
    }
}

fn fraction(v: f32, key: &str, i: usize, kind: &str, closed: bool) -> Result<f32, CompressError> {
    let ok = v.is_finite() && v >= 0.0 && if closed { v <= 1.0 } else { v < 1.0 };
    if ok {
        Ok(v)
    } else {
        Err(bad(
            i,
            kind,
            format!(
                "{key}={v} must be in [0, 1{}",
                if closed { "]" } else { ")" }
            ),
        ))
    }
}

/// Parses a quantization scheme name (see [`SYNTAX`]).
pub fn parse_scheme(s: &str) -> Result<QuantScheme, String> {
    let s = s.trim().to_ascii_lowercase();
    let bits = |t: &str, lo: u8| -> Result<u8, String> {
        let b: u8 = t.parse().map_err(|_| format!("bad bit width in {s:?}"))?;
        if (lo..=8).contains(&b) {
            Ok(b)
        } else {
            Err(format!("{s:?}: bits must be {lo}..=8"))
        }
    };
    let split_gran = |rest: &str| -> (String, Granularity) {
        if let Some(b) = rest.strip_suffix("-per-channel") {
            (b.to_string(), Granularity::PerChannel)
        } else if let Some(b) = rest.strip_suffix("-per-tensor") {
            (b.to_string(), Granularity::PerTensor)
        } else {
            (rest.to_string(), Granularity::PerTensor)
        }
    };
    if let Some(rest) = s.strip_prefix("int") {
        let (b, granularity) = split_gran(rest);
        return Ok(QuantScheme::Symmetric {
            bits: bits(&b, 2)?,
            granularity,
        });
    }
    if let Some(rest) = s.strip_prefix("affine") {
        let (b, granularity) = split_gran(rest);
        return Ok(QuantScheme::Affine {
            bits: bits(&b, 1)?,
            granularity,
        });
    }
    if let Some(rest) = s.strip_prefix("pow2-") {
        return Ok(QuantScheme::PowerOfTwo {
            bits: bits(rest, 2)?,
        });
    }
    if let Some(rest) = s.strip_prefix("kmeans") {
        return Ok(QuantScheme::Codebook {
            bits: bits(rest.trim_start_matches('-'), 1)?,
            kind: CodebookKind::KMeans,
        });
    }
    if let Some(rest) = s.strip_prefix("gauss") {
        return Ok(QuantScheme::Codebook {
            bits: bits(rest.trim_start_matches('-'), 1)?,
            kind: CodebookKind::GaussianQuantile,
        });
    }
    Err(format!(
        "unknown scheme {s:?} (int8, int4-per-channel, affine8, pow2-4, kmeans4, gauss3, ...)"
    ))
}

fn parse_hidden(s: &str) -> Result<Vec<usize>, String> {
    let v: Result<Vec<usize>, _> = s
        .split(['x', ' ', '/'])
        .filter(|p| !p.is_empty())
        .map(str::parse::<usize>)
        .collect();
    match v {
        Ok(v) if !v.is_empty() && v.iter().all(|&w| w > 0) => Ok(v),
        _ => Err(format!("hidden={s:?}: widths like 16x8")),
    }
}

/// Builds one step from its kind, an optional bare value and `key=value` arguments.
fn build_step(
    i: usize,
    kind: &str,
    value: Option<String>,
    mut args: Args,
) -> Result<Step, CompressError> {
    let kind = kind.trim().to_ascii_lowercase().replace('_', "-");
    let main_key = match kind.as_str() {
        "prune" => Some("sparsity"),
        "prune-neurons" => Some("fraction"),
        "prune-layers" => Some("max_drop"),
        "prune-channels" => Some("fraction"),
        "low-rank" | "lowrank" => Some("energy"),
        "finetune" | "fine-tune" | "qat" => Some("epochs"),
        "quant" => Some("scheme"),
        "export" => Some("format"),
        "distill" | "mixed-precision" | "mixed" => None,
        _ => return Err(bad(i, &kind, "unknown step kind")),
    };
    if let Some(v) = value {
        match main_key {
            Some(k) => {
                if args.insert(k.to_string(), v).is_some() {
                    return Err(bad(i, &kind, format!("{k} given twice")));
                }
            }
            None => {
                return Err(bad(
                    i,
                    &kind,
                    format!("takes key=value arguments, got {v:?}"),
                ))
            }
        }
    }
    let a = &mut args;
    let k = kind.as_str();
    let step = match k {
        "distill" => {
            let hidden = match a.remove("hidden") {
                Some(h) => Some(parse_hidden(&h).map_err(|e| bad(i, k, e))?),
                None => None,
            };
            let long = take(a, "temperature", 4.0f32, i, k)?;
            let temperature = take(a, "t", long, i, k)?;
            let alpha = fraction(take(a, "alpha", 0.7f32, i, k)?, "alpha", i, k, true)?;
            let epochs = take(a, "epochs", 20u32, i, k)?;
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(bad(i, k, "T must be > 0"));
            }
            Step::Distill {
                hidden,
                temperature,
                alpha,
                epochs,
            }
        }
        "prune" => {
            let sparsity = a
                .remove("sparsity")
                .ok_or_else(|| bad(i, k, "needs a sparsity, e.g. prune:0.8"))?;
            let sparsity: f32 = sparsity
                .parse()
                .map_err(|e| bad(i, k, format!("sparsity={sparsity:?}: {e}")))?;
            let sparsity = fraction(sparsity, "sparsity", i, k, true)?;
            let method = match a.remove("method").as_deref() {
                None | Some("magnitude") => PruneMethod::Magnitude,
                Some("sensitivity") => PruneMethod::Sensitivity,
                Some(m) => return Err(bad(i, k, format!("method {m:?}: magnitude|sensitivity"))),
            };
            let global = match a.remove("scope").as_deref() {
                None | Some("global") => true,
                Some("layer") => false,
                Some(s) => return Err(bad(i, k, format!("scope {s:?}: global|layer"))),
            };
            Step::Prune {
                sparsity,
                method,
                global,
            }
        }
        "prune-neurons" => {
            let f = take(a, "fraction", f32::NAN, i, k)?;
            if f.is_nan() {
                return Err(bad(i, k, "needs a fraction, e.g. prune-neurons:0.25"));
            }
            Step::PruneNeurons {
                fraction: fraction(f, "fraction", i, k, false)?,
            }
        }
        "prune-channels" => {
            // `prune-channels:0.5:sensitivity` names the criterion after the fraction.
            if let Some(v) = a.remove("fraction") {
                let (f, c) = match v.split_once(':') {
                    Some((f, c)) => (f.to_string(), Some(c.to_string())),
                    None => (v, None),
                };
                a.insert("fraction".into(), f);
                if let Some(c) = c {
                    if a.insert("criterion".into(), c).is_some() {
                        return Err(bad(i, k, "criterion given twice"));
                    }
                }
            }
            let f = take(a, "fraction", f32::NAN, i, k)?;
            if f.is_nan() {
                return Err(bad(i, k, "needs a fraction, e.g. prune-channels:0.5"));
            }
            let criterion = match a.remove("criterion").as_deref() {
                None | Some("l1") => ChannelCriterion::L1,
                Some("sensitivity") | Some("sens") => ChannelCriterion::Sensitivity,
                Some(c) => return Err(bad(i, k, format!("criterion {c:?}: l1|sensitivity"))),
            };
            let recover = match a.remove("recover").as_deref() {
                None | Some("none") => false,
                Some("ls") | Some("least-squares") => true,
                Some(r) => return Err(bad(i, k, format!("recover {r:?}: none|ls"))),
            };
            Step::PruneChannels {
                fraction: fraction(f, "fraction", i, k, false)?,
                criterion,
                recover,
            }
        }
        "prune-layers" => {
            let d = take(a, "max_drop", 0.01f32, i, k)?;
            Step::PruneLayers {
                max_drop: fraction(d, "max_drop", i, k, true)?,
            }
        }
        "low-rank" | "lowrank" => {
            let e = take(a, "energy", 0.9f32, i, k)?;
            if !(e > 0.0 && e <= 1.0) {
                return Err(bad(i, k, format!("energy={e} must be in (0, 1]")));
            }
            let min_saving = take(a, "min_saving", 0.1f32, i, k)?;
            Step::LowRank {
                energy: e,
                min_saving: fraction(min_saving, "min_saving", i, k, true)?,
            }
        }
        "finetune" | "fine-tune" | "qat" => {
            let is_qat = k == "qat";
            let epochs = take(a, "epochs", if is_qat { 2 } else { 3 }, i, k)?;
            let lr = take(a, "lr", if is_qat { 0.005 } else { 0.01 }, i, k)?;
            if epochs == 0 || !(lr > 0.0 && f32::is_finite(lr)) {
                return Err(bad(i, k, "epochs must be >= 1 and lr > 0"));
            }
            if is_qat {
                Step::Qat { epochs, lr }
            } else {
                Step::Finetune { epochs, lr }
            }
        }
        "quant" => {
            let s = a
                .remove("scheme")
                .ok_or_else(|| bad(i, k, "needs a scheme, e.g. quant:int8-per-channel"))?;
            Step::Quant {
                scheme: parse_scheme(&s).map_err(|e| bad(i, k, e))?,
            }
        }
        "mixed-precision" | "mixed" => {
            let size = a.remove("size");
            let acc = a.remove("acc");
            let budget = match (size, acc) {
                (Some(s), None) => BudgetSpec::SizeBytes(
                    s.parse()
                        .map_err(|e| bad(i, k, format!("size={s:?}: {e}")))?,
                ),
                (None, Some(v)) => {
                    let f: f32 = v
                        .parse()
                        .map_err(|e| bad(i, k, format!("acc={v:?}: {e}")))?;
                    BudgetSpec::AccuracyFloor(fraction(f, "acc", i, k, true)?)
                }
                _ => {
                    return Err(bad(
                        i,
                        k,
                        "needs exactly one of size=<bytes> or acc=<floor>",
                    ))
                }
            };
            Step::MixedPrecision { budget }
        }
        "export" => {
            let format = match a.remove("format").as_deref() {
                None | Some("float") | Some("f32") => ExportFormat::Float,
                Some("int8-qoperator") | Some("int8") | Some("qoperator") => {
                    ExportFormat::Int8QOperator
                }
                Some("package") => ExportFormat::Package,
                Some(f) => {
                    return Err(bad(
                        i,
                        k,
                        format!("format {f:?}: float|int8-qoperator|package"),
                    ))
                }
            };
            Step::Export { format }
        }
        _ => unreachable!("kind checked above"),
    };
    if let Some(key) = args.keys().next() {
        return Err(bad(i, &kind, format!("unknown key {key:?}")));
    }
    Ok(step)
}

/// Parses an inline recipe: `kind[:value][,key=value...]` steps separated by `;`.
pub fn parse_inline(s: &str) -> Result<Recipe, CompressError> {
    let mut steps = Vec::new();
    let mut allow_noop = Vec::new();
    for (i, part) in s.split(';').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        let (kind, rest) = match part.split_once(':') {
            Some((k, r)) => (k, r),
            None => (part, ""),
        };
        let mut value = None;
        let mut args = Args::new();
        for (j, item) in rest.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            match item.split_once('=') {
                Some((key, v)) => {
                    let key = key.trim().to_ascii_lowercase();
                    if args.insert(key.clone(), v.trim().to_string()).is_some() {
                        return Err(bad(i, kind, format!("{key} given twice")));
                    }
                }
                None if j == 0 => value = Some(item.to_string()),
                None => return Err(bad(i, kind, format!("expected key=value, got {item:?}"))),
            }
        }
        let (kind, noop) = take_allow_noop(steps.len(), kind, &mut args)?;
        steps.push(build_step(steps.len(), kind, value, args)?);
        allow_noop.push(noop);
    }
    validate(Recipe {
        steps,
        allow_noop,
        calibration: None,
    })
}

/// Strips the no-op marker from a step: a `?` after the kind or an `allow_noop` key.
fn take_allow_noop<'a>(
    i: usize,
    kind: &'a str,
    args: &mut Args,
) -> Result<(&'a str, bool), CompressError> {
    let kind = kind.trim();
    let (kind, mark) = match kind.strip_suffix('?') {
        Some(k) => (k.trim_end(), true),
        None => (kind, false),
    };
    let key = match args.remove("allow_noop") {
        None => false,
        Some(v) => v
            .parse::<bool>()
            .map_err(|e| bad(i, kind, format!("allow_noop={v:?}: {e}")))?,
    };
    Ok((kind, mark || key))
}

/// Parses a TOML recipe: `[[step]]` tables with `kind` and the same keys as the inline form.
pub fn parse_toml(text: &str) -> Result<Recipe, CompressError> {
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| CompressError::Recipe(format!("TOML: {e}")))?;
    if let Some(k) = doc
        .keys()
        .find(|k| k.as_str() != "step" && k.as_str() != "calibration")
    {
        return Err(CompressError::Recipe(format!(
            "unknown top-level key {k:?} (expected [[step]] tables and [calibration])"
        )));
    }
    let calibration = match doc.get("calibration") {
        None => None,
        Some(toml::Value::Table(t)) => Some(parse_calibration(t)?),
        Some(_) => return Err(CompressError::Recipe("calibration must be a table".into())),
    };
    let list = match doc.get("step") {
        Some(toml::Value::Array(a)) => a.clone(),
        _ => return Err(CompressError::Recipe("no [[step]] tables".into())),
    };
    let mut steps = Vec::new();
    let mut allow_noop = Vec::new();
    for (i, v) in list.into_iter().enumerate() {
        let toml::Value::Table(t) = v else {
            return Err(CompressError::Recipe(format!(
                "step {}: not a table",
                i + 1
            )));
        };
        let mut kind = None;
        let mut args = Args::new();
        for (key, val) in t {
            let s = match val {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .collect::<Vec<_>>()
                    .join("x"),
                other => {
                    return Err(CompressError::Recipe(format!(
                        "step {}: {key} = {other}: unsupported value",
                        i + 1
                    )))
                }
            };
            if key == "kind" {
                kind = Some(s);
            } else {
                args.insert(key.to_ascii_lowercase(), s);
            }
        }
        let kind = kind.ok_or_else(|| {
            CompressError::Recipe(format!("step {}: missing kind = \"...\"", i + 1))
        })?;
        let (kind, noop) = take_allow_noop(i, &kind, &mut args)?;
        steps.push(build_step(i, kind, None, args)?);
        allow_noop.push(noop);
    }
    validate(Recipe {
        steps,
        allow_noop,
        calibration,
    })
}

/// `[calibration]`: `source` (image folder or .npy), `mean`, `std` (numbers or lists),
/// `layout` (nchw|nhwc), `limit`.
fn parse_calibration(t: &toml::Table) -> Result<CalibSpec, CompressError> {
    let e = |m: String| CompressError::Recipe(format!("[calibration]: {m}"));
    let floats = |key: &str| -> Result<Vec<f32>, CompressError> {
        match t.get(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Float(f)) => Ok(vec![*f as f32]),
            Some(toml::Value::Integer(i)) => Ok(vec![*i as f32]),
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    toml::Value::Float(f) => Ok(*f as f32),
                    toml::Value::Integer(i) => Ok(*i as f32),
                    o => Err(e(format!("{key}: {o} is not a number"))),
                })
                .collect(),
            Some(o) => Err(e(format!("{key} = {o}: a number or a list of numbers"))),
        }
    };
    if let Some(k) = t
        .keys()
        .find(|k| !["source", "mean", "std", "layout", "limit"].contains(&k.as_str()))
    {
        return Err(e(format!("unknown key {k:?}")));
    }
    let source = match t.get("source") {
        Some(toml::Value::String(s)) => s.clone(),
        _ => return Err(e("needs source = \"<image folder or .npy>\"".into())),
    };
    let mut spec = CalibSpec::new(source);
    spec.mean = floats("mean")?;
    spec.std = floats("std")?;
    spec.layout = match t.get("layout") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.parse().map_err(e)?),
        Some(o) => return Err(e(format!("layout = {o}: nchw|nhwc"))),
    };
    match t.get("limit") {
        None => {}
        Some(toml::Value::Integer(n)) if *n >= 1 => spec.limit = *n as usize,
        Some(o) => return Err(e(format!("limit = {o}: an integer >= 1"))),
    }
    Ok(spec)
}

fn validate(recipe: Recipe) -> Result<Recipe, CompressError> {
    let steps = &recipe.steps;
    if steps.is_empty() {
        return Err(CompressError::Recipe("the recipe has no steps".into()));
    }
    for (i, s) in steps.iter().enumerate() {
        if matches!(s, Step::Export { .. }) && i + 1 != steps.len() {
            return Err(CompressError::Recipe(format!(
                "step {} (export) must be the last step",
                i + 1
            )));
        }
        if matches!(s, Step::Qat { .. })
            && !steps[..i]
                .iter()
                .any(|p| matches!(p, Step::Quant { .. } | Step::MixedPrecision { .. }))
        {
            return Err(CompressError::Recipe(format!(
                "step {} (qat) needs a quant or mixed-precision step before it",
                i + 1
            )));
        }
    }
    Ok(recipe)
}

/// A recipe argument: a path to an existing `.toml` file, or an inline recipe.
pub fn parse_recipe_arg(arg: &str) -> Result<Recipe, CompressError> {
    let path = std::path::Path::new(arg);
    if arg.ends_with(".toml") || path.is_file() {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CompressError::Recipe(format!("{arg}: {e}")))?;
        parse_toml(&text)
    } else {
        parse_inline(arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_toml_agree() {
        let inline = parse_inline(
            "distill:T=4,alpha=0.7,hidden=16;prune:0.8;finetune:3;quant:int4-per-channel;export:package",
        )
        .unwrap();
        let toml = parse_toml(
            r#"
[[step]]
kind = "distill"
T = 4
alpha = 0.7
hidden = [16]
[[step]]
kind = "prune"
sparsity = 0.8
[[step]]
kind = "finetune"
epochs = 3
[[step]]
kind = "quant"
scheme = "int4-per-channel"
[[step]]
kind = "export"
format = "package"
"#,
        )
        .unwrap();
        assert_eq!(inline, toml);
        assert_eq!(inline.len(), 5);
        assert_eq!(
            inline[3],
            Step::Quant {
                scheme: QuantScheme::Symmetric {
                    bits: 4,
                    granularity: Granularity::PerChannel
                }
            }
        );
        assert_eq!(
            inline[1],
            Step::Prune {
                sparsity: 0.8,
                method: PruneMethod::Magnitude,
                global: true
            }
        );
    }

    #[test]
    fn rejects_bad_recipes() {
        for bad in [
            "",
            "shrink:0.5",
            "prune",
            "prune:1.5",
            "prune:0.5,method=random",
            "quant:int9",
            "quant:float3",
            "export:package;prune:0.5",
            "qat:2",
            "finetune:0",
            "prune:0.5,foo=1",
            "mixed-precision:0.5",
            "low-rank:1.5",
        ] {
            assert!(parse_inline(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_toml("[[step]]\nsparsity = 0.5").is_err());
        assert!(parse_toml("x = 1").is_err());
        assert_eq!(
            parse_scheme("kmeans4").unwrap(),
            QuantScheme::Codebook {
                bits: 4,
                kind: CodebookKind::KMeans
            }
        );
        assert_eq!(
            parse_scheme("pow2-4").unwrap(),
            QuantScheme::PowerOfTwo { bits: 4 }
        );
        assert!(parse_inline("mixed-precision:acc=0.9;qat:1").is_ok());
    }

    #[test]
    fn marks_steps_that_may_change_nothing() {
        let r = parse_inline("prune?:0.1;quant:int8,allow_noop=true;export:package").unwrap();
        assert_eq!(r.allow_noop, vec![true, true, false]);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].kind(), "prune");
        let t = parse_toml("[[step]]\nkind = \"quant\"\nscheme = \"int8\"\nallow_noop = true\n")
            .unwrap();
        assert_eq!(t.allow_noop, vec![true]);
        assert!(parse_inline("quant:int8,allow_noop=maybe").is_err());
        assert_eq!(parse_inline("quant:int8").unwrap().allow_noop, vec![false]);
    }
}
