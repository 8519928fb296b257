//! Test scenes from the repo's own face images: the `faces` set's 25×25 grey crops
//! (`data/faces/*.csv`, class 1 = face, 0 = background) composed into 256×256 frames and
//! written as PPM images, which ffmpeg encodes into clips and serves as streams (tests,
//! demo, benchmark). Not used by a running camera.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::Error;

/// Side of a scene frame, pixels.
pub const SCENE_SIZE: usize = 256;
/// Side of a pasted face, pixels (64 px once ffmpeg scales the frame to 128: the size
/// BlazeFace's short-range model finds best).
pub const FACE_SIZE: usize = 128;

/// 25×25 grey crops of one class from a faces CSV (`label,v1..v625`, values in [0, 1]).
pub fn load_crops(csv: &Path, class: u32) -> Result<Vec<Vec<f32>>, Error> {
    let text =
        std::fs::read_to_string(csv).map_err(|e| Error::Io(format!("{}: {e}", csv.display())))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split(',');
        if it.next().and_then(|l| l.trim().parse::<u32>().ok()) != Some(class) {
            continue;
        }
        let v: Vec<f32> = it.filter_map(|x| x.trim().parse().ok()).collect();
        if v.len() == 625 {
            out.push(v);
        }
    }
    Ok(out)
}

/// Bilinear resize of a square grey image (`n`×`n`, [0, 1]) to `m`×`m`.
fn resize(src: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * m];
    let scale = n as f32 / m as f32;
    for y in 0..m {
        let fy = ((y as f32 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f32);
        let (y0, wy) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(n - 1);
        for x in 0..m {
            let fx = ((x as f32 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f32);
            let (x0, wx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(n - 1);
            let top = src[y0 * n + x0] * (1.0 - wx) + src[y0 * n + x1] * wx;
            let bot = src[y1 * n + x0] * (1.0 - wx) + src[y1 * n + x1] * wx;
            out[y * m + x] = top * (1.0 - wy) + bot * wy;
        }
    }
    out
}

/// A scene: a background crop stretched over the frame, darkened, and optionally a face at
/// `(x, y)` (top-left, pixels). Returns grey values in [0, 255].
pub fn compose(background: &[f32], face: Option<(&[f32], usize, usize)>) -> Vec<u8> {
    let bg = resize(background, 25, SCENE_SIZE);
    let mut frame: Vec<u8> = bg.iter().map(|v| (v * 160.0 + 30.0) as u8).collect();
    if let Some((f, fx, fy)) = face {
        let up = resize(f, 25, FACE_SIZE);
        for y in 0..FACE_SIZE {
            for x in 0..FACE_SIZE {
                let (sx, sy) = (fx + x, fy + y);
                if sx < SCENE_SIZE && sy < SCENE_SIZE {
                    frame[sy * SCENE_SIZE + sx] = (up[y * FACE_SIZE + x] * 255.0) as u8;
                }
            }
        }
    }
    frame
}

/// Writes a grey frame as a binary PPM (RGB, the grey value in every channel).
pub fn write_ppm(path: &Path, grey: &[u8]) -> Result<(), Error> {
    let mut b = format!("P6\n{SCENE_SIZE} {SCENE_SIZE}\n255\n").into_bytes();
    b.reserve(grey.len() * 3);
    for &g in grey {
        b.extend_from_slice(&[g, g, g]);
    }
    let mut f =
        std::fs::File::create(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    f.write_all(&b)
        .map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

/// One stretch of a clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shot {
    /// The empty scene for this many frames.
    Idle(usize),
    /// Face number `face` standing still at the centre for this many frames.
    Face { face: usize, frames: usize },
}

/// Writes `frame_00000.ppm`… into `dir` for the shots, from the crops of `faces_csv`
/// (the first background crop is the scene). Returns the paths in order.
pub fn write_clip_frames(
    faces_csv: &Path,
    dir: &Path,
    shots: &[Shot],
) -> Result<Vec<PathBuf>, Error> {
    let faces = load_crops(faces_csv, 1)?;
    let backgrounds = load_crops(faces_csv, 0)?;
    let (Some(bg), false) = (backgrounds.first(), faces.is_empty()) else {
        return Err(Error::Io(format!(
            "{}: needs face (1) and background (0) rows",
            faces_csv.display()
        )));
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    let empty = compose(bg, None);
    let centre = (SCENE_SIZE - FACE_SIZE) / 2;
    let mut paths = Vec::new();
    for shot in shots {
        let (frame, n) = match *shot {
            Shot::Idle(n) => (empty.clone(), n),
            Shot::Face { face, frames } => (
                compose(bg, Some((&faces[face % faces.len()], centre, centre))),
                frames,
            ),
        };
        for _ in 0..n {
            let p = dir.join(format!("frame_{:05}.ppm", paths.len()));
            write_ppm(&p, &frame)?;
            paths.push(p);
        }
    }
    Ok(paths)
}
