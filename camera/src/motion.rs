//! Motion gating: a cheap frame difference on a downscaled grey frame.
//!
//! Each 128×128 RGB frame is averaged down to 32×32 grey (4×4 blocks); a pixel "moved" when it
//! differs from the reference by more than `pixel_threshold` (0–255); the frame has motion
//! when more than `area_fraction` of the pixels moved. The reference is a running average
//! of the frames (weight `1/2`): a sudden change counts as motion for about three frames,
//! slow lighting drift never. Cost: one pass over the frame's bytes, no allocation.

use crate::detector::INPUT_SIZE;

/// Side of the downscaled grey frame.
pub const GREY_SIZE: usize = 32;
const BLOCK: usize = INPUT_SIZE / GREY_SIZE;

/// Motion thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionOptions {
    /// Per-pixel difference (0–255 grey) that counts as change.
    pub pixel_threshold: f32,
    /// Fraction of changed pixels that counts as motion.
    pub area_fraction: f32,
}

impl Default for MotionOptions {
    fn default() -> Self {
        MotionOptions {
            pixel_threshold: 12.0,
            area_fraction: 0.005,
        }
    }
}

/// The motion detector's state: the reference grey frame.
#[derive(Debug, Clone)]
pub struct Motion {
    opts: MotionOptions,
    reference: Option<Box<[f32; GREY_SIZE * GREY_SIZE]>>,
    grey: Box<[f32; GREY_SIZE * GREY_SIZE]>,
}

impl Motion {
    pub fn new(opts: MotionOptions) -> Motion {
        Motion {
            opts,
            reference: None,
            grey: Box::new([0.0; GREY_SIZE * GREY_SIZE]),
        }
    }

    /// Feeds one 128×128 RGB frame; returns the fraction of changed pixels and whether that
    /// is motion. The first frame is always motion.
    pub fn update(&mut self, rgb: &[u8]) -> (f32, bool) {
        downscale(rgb, &mut self.grey);
        let Some(reference) = self.reference.as_mut() else {
            self.reference = Some(self.grey.clone());
            return (1.0, true);
        };
        let mut changed = 0usize;
        for (r, &g) in reference.iter_mut().zip(self.grey.iter()) {
            if (g - *r).abs() > self.opts.pixel_threshold {
                changed += 1;
            }
            *r += (g - *r) * 0.5;
        }
        let frac = changed as f32 / (GREY_SIZE * GREY_SIZE) as f32;
        (frac, frac > self.opts.area_fraction)
    }
}

/// 4×4 block means of the grey value (`(r + g + b) / 3`).
fn downscale(rgb: &[u8], out: &mut [f32; GREY_SIZE * GREY_SIZE]) {
    out.fill(0.0);
    for (i, px) in rgb
        .chunks_exact(3)
        .take(INPUT_SIZE * INPUT_SIZE)
        .enumerate()
    {
        let (y, x) = (i / INPUT_SIZE, i % INPUT_SIZE);
        out[(y / BLOCK) * GREY_SIZE + x / BLOCK] += px[0] as f32 + px[1] as f32 + px[2] as f32;
    }
    let n = (BLOCK * BLOCK * 3) as f32;
    for v in out.iter_mut() {
        *v /= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::FRAME_BYTES;

    #[test]
    fn still_scene_is_not_motion_a_moving_patch_is() {
        let mut m = Motion::new(MotionOptions::default());
        let mut f = vec![100u8; FRAME_BYTES];
        assert!(m.update(&f).1);
        assert!(!m.update(&f).1);
        // Small noise everywhere: below the pixel threshold.
        for (i, b) in f.iter_mut().enumerate() {
            *b = 100 + (i % 5) as u8;
        }
        assert!(!m.update(&f).1);
        // A bright 16×16 patch.
        for y in 40..56 {
            for x in 40..56 {
                for c in 0..3 {
                    f[(y * INPUT_SIZE + x) * 3 + c] = 250;
                }
            }
        }
        let (frac, moved) = m.update(&f);
        assert!(moved, "{frac}");
    }
}
