//! Calibration (and agreement) inputs for any model input, from an image folder or a `.npy`
//! file, prepared as the model expects: images decoded (PNG, JPEG: the `png` and
//! `jpeg-decoder` crates), resized (bilinear) to the
//! input's height and width, scaled to [0, 1], normalised per channel (`(v − mean) / std`) and
//! laid out NCHW or NHWC; `.npy` samples used as stored (normalised only when mean/std are
//! given). A folder whose images sit in sub-folders is labelled by sub-folder (sorted names,
//! class id = position), so accuracy can be reported for classifiers whose classes are in
//! that order; images directly in the folder are unlabelled.
//!
//! Task files (`--task`) stay the way to feed Hearth's own data sets.

use crate::measure::resize_bilinear;
use hearth_model::error::ModelError;
use hearth_model::Dataset;
use std::path::{Path, PathBuf};

/// Memory layout of an image input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[N, C, H, W]`.
    Nchw,
    /// `[N, H, W, C]`.
    Nhwc,
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nchw" => Ok(Layout::Nchw),
            "nhwc" => Ok(Layout::Nhwc),
            o => Err(format!("layout {o:?}: nchw|nhwc")),
        }
    }
}

/// Where calibration inputs come from and how they are prepared.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibSpec {
    /// An image folder or a `.npy` file.
    pub source: PathBuf,
    /// Per-channel mean subtracted after scaling to [0, 1] (one value: every channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by (one value: every channel).
    pub std: Vec<f32>,
    /// Input layout; `None`: NCHW when dimension 1 is 1 or 3 (or at most 4 and the last is
    /// not), else NHWC when the last dimension is at most 4.
    pub layout: Option<Layout>,
    /// At most this many samples (sorted by file name; first rows of a `.npy`).
    pub limit: usize,
}

impl CalibSpec {
    /// A spec for `source` with no normalisation (mean 0, std 1), layout from the shape and
    /// at most 200 samples.
    pub fn new(source: impl Into<PathBuf>) -> CalibSpec {
        CalibSpec {
            source: source.into(),
            mean: Vec::new(),
            std: Vec::new(),
            layout: None,
            limit: 200,
        }
    }
}

fn err(msg: impl Into<String>) -> ModelError {
    ModelError::Data(msg.into())
}

/// `(layout, channels, height, width)` of a rank-4 image input.
fn image_dims(
    shape: &[usize],
    layout: Option<Layout>,
) -> Result<(Layout, usize, usize, usize), ModelError> {
    if shape.len() != 4 {
        return Err(err(format!(
            "images need a rank-4 image input, the model's is {shape:?}"
        )));
    }
    let layout = match layout {
        Some(l) => l,
        None if shape[1] == 1 || shape[1] == 3 || (shape[1] <= 4 && shape[3] > 4) => Layout::Nchw,
        None if shape[3] <= 4 => Layout::Nhwc,
        None => {
            return Err(err(format!(
                "cannot tell the layout of input {shape:?}: pass --calib-layout nchw|nhwc"
            )))
        }
    };
    Ok(match layout {
        Layout::Nchw => (layout, shape[1], shape[2], shape[3]),
        Layout::Nhwc => (layout, shape[3], shape[1], shape[2]),
    })
}

fn per_channel(v: &[f32], c: usize, default: f32, what: &str) -> Result<Vec<f32>, ModelError> {
    match v.len() {
        0 => Ok(vec![default; c]),
        1 => Ok(vec![v[0]; c]),
        n if n == c => Ok(v.to_vec()),
        n => Err(err(format!(
            "{what} has {n} values, the input has {c} channels"
        ))),
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Decodes a PNG or JPEG file: `(width, height, planes)` with one (grey) or three (RGB)
/// planes of values in [0, 1] (alpha dropped, 16-bit and palette images converted).
pub fn decode(path: &Path) -> Result<(usize, usize, Vec<Vec<f32>>), ModelError> {
    let e = |m: String| err(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|x| e(x.to_string()))?;
    let (w, h, channels, data): (usize, usize, usize, Vec<u8>) = if bytes.starts_with(b"\x89PNG") {
        let mut d = png::Decoder::new(std::io::Cursor::new(&bytes));
        d.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut r = d.read_info().map_err(|x| e(x.to_string()))?;
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).map_err(|x| e(x.to_string()))?;
        buf.truncate(info.buffer_size());
        let ch = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Indexed => return Err(e("palette not expanded".into())),
        };
        (info.width as usize, info.height as usize, ch, buf)
    } else if bytes.starts_with(&[0xff, 0xd8]) {
        let mut d = jpeg_decoder::Decoder::new(std::io::Cursor::new(&bytes));
        let px = d.decode().map_err(|x| e(x.to_string()))?;
        let info = d.info().ok_or_else(|| e("no JPEG header".into()))?;
        let ch = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 => 1,
            jpeg_decoder::PixelFormat::RGB24 => 3,
            f => return Err(e(format!("JPEG pixel format {f:?} not supported"))),
        };
        (usize::from(info.width), usize::from(info.height), ch, px)
    } else {
        return Err(e("not a PNG or JPEG file".into()));
    };
    if w == 0 || h == 0 || data.len() != w * h * channels {
        return Err(e(format!(
            "{w}x{h}x{channels} image with {} bytes",
            data.len()
        )));
    }
    let plane = |k: usize| -> Vec<f32> {
        data.iter()
            .skip(k)
            .step_by(channels)
            .map(|&v| f32::from(v) / 255.0)
            .collect()
    };
    let planes = match channels {
        1 | 2 => vec![plane(0)],
        _ => vec![plane(0), plane(1), plane(2)],
    };
    Ok((w, h, planes))
}

/// Decodes one image into the input's layout (see the module doc).
pub fn image_input(path: &Path, shape: &[usize], spec: &CalibSpec) -> Result<Vec<f32>, ModelError> {
    let (layout, c, h, w) = image_dims(shape, spec.layout)?;
    let mean = per_channel(&spec.mean, c, 0.0, "--calib-mean")?;
    let std = per_channel(&spec.std, c, 1.0, "--calib-std")?;
    if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
        return Err(err("--calib-std values must be finite and non-zero"));
    }
    let (iw, ih, src) = decode(path)?;
    // Source channels: luma for 1-channel inputs, RGB otherwise (extra channels repeat).
    let planes: Vec<Vec<f32>> = if c == 1 && src.len() == 3 {
        vec![src[0]
            .iter()
            .zip(&src[1])
            .zip(&src[2])
            .map(|((r, g), b)| 0.2126 * r + 0.7152 * g + 0.0722 * b)
            .collect()]
    } else {
        src
    };
    let mut out = vec![0.0; c * h * w];
    for ch in 0..c {
        let plane = resize_bilinear(&planes[ch % planes.len()], ih, iw, h, w);
        for (p, v) in plane.into_iter().enumerate() {
            let v = (v - mean[ch]) / std[ch];
            let idx = match layout {
                Layout::Nchw => ch * h * w + p,
                Layout::Nhwc => p * c + ch,
            };
            out[idx] = v;
        }
    }
    Ok(out)
}

/// Loads calibration samples for a model whose (batch-1) input shape is `shape`.
pub fn load(spec: &CalibSpec, shape: &[usize]) -> Result<Dataset, ModelError> {
    let src = &spec.source;
    let input_len: usize = shape.iter().product();
    if src.is_dir() {
        let mut files: Vec<(PathBuf, u32)> = Vec::new();
        let mut classes = Vec::new();
        for e in sorted_entries(src)? {
            if e.is_dir() {
                let id = classes.len() as u32;
                let name = e
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                let inner: Vec<PathBuf> = sorted_entries(&e)?
                    .into_iter()
                    .filter(|p| is_image(p))
                    .collect();
                if !inner.is_empty() {
                    classes.push(name);
                    files.extend(inner.into_iter().map(|p| (p, id)));
                }
            } else if is_image(&e) {
                files.push((e, 0));
            }
        }
        if files.is_empty() {
            return Err(err(format!(
                "{}: no .png/.jpg/.jpeg images (directly or in class sub-folders)",
                src.display()
            )));
        }
        if !classes.is_empty() && files.iter().any(|(p, _)| p.parent() == Some(src.as_path())) {
            return Err(err(format!(
                "{}: images both directly in the folder and in class sub-folders",
                src.display()
            )));
        }
        files.truncate(spec.limit.max(1));
        let mut x = Vec::with_capacity(files.len() * input_len);
        let mut y = Vec::with_capacity(files.len());
        for (p, label) in &files {
            x.extend(image_input(p, shape, spec)?);
            y.push(*label);
        }
        return Ok(Dataset {
            task: format!("calibration:{}", src.display()),
            classes,
            input_len,
            x,
            y,
        });
    }
    let is_npy = src
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !is_npy {
        return Err(err(format!(
            "{}: calibration data must be an image folder or a .npy file",
            src.display()
        )));
    }
    let a = hearth_model::formats::npy::read(src).map_err(|e| err(e.to_string()))?;
    let total: usize = a.shape.iter().product();
    let n = if total == input_len {
        1
    } else if a.shape.len() >= 2 && a.shape[1..].iter().product::<usize>() == input_len {
        a.shape[0]
    } else {
        return Err(err(format!(
            "{}: array of shape {:?} does not hold inputs of shape {shape:?} ({input_len} values each)",
            src.display(),
            a.shape
        )));
    };
    let n = n.min(spec.limit.max(1));
    let mut x: Vec<f32> = a.data[..n * input_len].iter().map(|&v| v as f32).collect();
    if !spec.mean.is_empty() || !spec.std.is_empty() {
        let (layout, c, h, w) = image_dims(shape, spec.layout)?;
        let mean = per_channel(&spec.mean, c, 0.0, "--calib-mean")?;
        let std = per_channel(&spec.std, c, 1.0, "--calib-std")?;
        for (i, v) in x.iter_mut().enumerate() {
            let p = i % input_len;
            let ch = match layout {
                Layout::Nchw => p / (h * w),
                Layout::Nhwc => p % c,
            };
            *v = (*v - mean[ch]) / std[ch];
        }
    }
    Ok(Dataset {
        task: format!("calibration:{}", src.display()),
        classes: Vec::new(),
        input_len,
        x,
        y: vec![0; n],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_guessed_from_the_shape_or_given() {
        assert_eq!(
            image_dims(&[1, 3, 48, 192], None).unwrap(),
            (Layout::Nchw, 3, 48, 192)
        );
        assert_eq!(
            image_dims(&[1, 128, 128, 3], None).unwrap(),
            (Layout::Nhwc, 3, 128, 128)
        );
        assert!(image_dims(&[1, 76, 32, 8], None).is_err());
        assert_eq!(
            image_dims(&[1, 76, 32, 8], Some(Layout::Nhwc)).unwrap(),
            (Layout::Nhwc, 8, 76, 32)
        );
        assert!(image_dims(&[1, 576], None).is_err());
        assert!(per_channel(&[0.5, 0.5], 3, 0.0, "m").is_err());
        assert_eq!(per_channel(&[2.0], 3, 0.0, "m").unwrap(), vec![2.0; 3]);
    }
}
