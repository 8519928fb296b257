//! The aarch64 integer kernels for int8 layers, 4 weight rows per 128-bit register, weights
//! kept int8 in memory (a quarter of the float bytes):
//!
//! - `SDOT` (Armv8.2 `dotprod`: Cortex-A76 in the Raspberry Pi 5, Cortex-A55…): one
//!   instruction adds four int8 × int8 products into each i32 lane, 16 multiply-adds;
//! - the widening fallback every Armv8 NEON core has (Cortex-A72 in the Pi 4, A53 in the
//!   Pi 3/Zero 2): `SMULL`/`SMULL2` (int8 × int8 → exact i16) then `SADALP` (adjacent i16
//!   pairs widened and added into i32 lanes), 4 instructions per 16 multiply-adds, and one
//!   `ADDP` per register at the end of the pass.
//!
//! The CPU is asked at run time (`is_aarch64_feature_detected!("dotprod")`, cached by std).
//! Both are exact: no intermediate can overflow (|w·x| ≤ 2^14 fits i16; SADALP widens before
//! adding; the i32 lanes hold the same sums as the x86 kernel's).
//!
//! # Why this module has `unsafe` (the only one in Hearth)
//! The widening kernel is safe code (`pulp`'s feature-checked NEON intrinsics). `SDOT` is not
//! reachable from safe stable Rust: `core::arch::aarch64::vdotq_s32` is unstable in Rust 1.95
//! (`stdarch_neon_dotprod`, error E0658, checked) and `pulp` 0.22 exposes it only with its
//! `nightly` feature. So it is one `asm!` instruction, and the pass that contains it is a
//! `#[target_feature(enable = "dotprod")]` function (the assembler refuses `sdot` anywhere
//! else), which stable Rust lets safe code call only from code compiled with that feature:
//! two `unsafe` blocks, each sound because a [`Sdot`] token exists only after the run-time
//! check said the CPU has the instruction. What it buys, counted in the instruction stream:
//! 1 instruction per 16 multiply-adds instead of 4 (SMULL, SMULL2, 2 × SADALP); measured
//! under qemu in BENCHMARKS.md (qemu's timings are not a Pi's; the exactness tests run there
//! on both paths: `-cpu cortex-a72` has no `dotprod`, `-cpu cortex-a76` has it).
use core::arch::aarch64::{int32x4_t, int8x16_t};
use pulp::aarch64::Neon;

/// Which aarch64 int8 kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `SDOT` (CPU feature `dotprod`).
    Sdot,
    /// `SMULL`/`SMULL2` + `SADALP`: every NEON core.
    Widening,
}

impl Kernel {
    /// The best kernel this CPU runs.
    pub(crate) fn best() -> Kernel {
        if Sdot::try_new().is_some() {
            Kernel::Sdot
        } else {
            Kernel::Widening
        }
    }

    /// The name reported by [`crate::DenseNet::int8_kernel`].
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Sdot => "neon-sdot",
            Kernel::Widening => "neon-smull-sadalp",
        }
    }
}

/// Proof that this CPU has `SDOT`: made only by [`Sdot::try_new`] after the run-time check.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sdot(());

impl Sdot {
    pub(crate) fn try_new() -> Option<Sdot> {
        std::arch::is_aarch64_feature_detected!("dotprod").then_some(Sdot(()))
    }
}

/// Packs row-major int8 `w` (`outputs × inputs`) into `panel`-row panels of input quads:
/// panel `p`, quad `j/4`, row `r`, `j % 4` — a row's four weights of a quad side by side, so
/// one 16-byte load holds 4 rows × 4 inputs and one `SDOT` lane is
/// `Σ_k w[r][j+k]·x[j+k]`. Widths that are not a multiple of 4 get zero pads.
pub(crate) fn pack_quads(w: &[i8], outputs: usize, inputs: usize, panel: usize) -> Vec<i8> {
    let quads = inputs.div_ceil(4);
    let mut p = vec![0i8; outputs.div_ceil(panel) * panel * 4 * quads];
    for r in 0..outputs {
        let (pi, ri) = (r / panel, r % panel);
        for j in 0..inputs {
            p[pi * panel * 4 * quads + (j / 4) * panel * 4 + ri * 4 + j % 4] = w[r * inputs + j];
        }
    }
    p
}

/// Input quads as the kernels' broadcast operands: four int8 bytes in one i32, first input
/// in the low byte (lane byte order), zero past the end.
pub(crate) fn quad_operands(q: &[f32], quads: usize) -> Vec<i32> {
    (0..quads)
        .map(|p| {
            let b = |k: usize| q.get(4 * p + k).map_or(0, |&v| v as i8 as u8);
            i32::from_le_bytes([b(0), b(1), b(2), b(3)])
        })
        .collect()
}

/// `acc[r] = Σ_j W[r][j]·q[j]` for int8 activation values `q` (held as floats), in i32, with
/// the best kernel this CPU has.
pub(crate) fn product(packed: &[i8], quads: usize, panel: usize, q: &[f32], acc: &mut [i32]) {
    let xq = quad_operands(q, quads);
    run(Kernel::best(), packed, quads, panel, &xq, acc);
}

/// Runs `kernel` (tests force each one). Asking for `Sdot` on a CPU without it runs nothing
/// (callers check [`Kernel::best`]); `acc` is then left as it was.
pub(crate) fn run(
    kernel: Kernel,
    packed: &[i8],
    quads: usize,
    panel: usize,
    xq: &[i32],
    acc: &mut [i32],
) {
    let Some(neon) = Neon::try_new() else {
        return; // aarch64 Linux always has NEON; no path without it.
    };
    let pass = Pass {
        packed,
        quads,
        panel,
        xq,
        acc,
    };
    match (kernel, Sdot::try_new()) {
        // SAFETY: the `Sdot` token exists, so the run-time check found `dotprod`, the only
        // feature `sdot_pass` enables beyond the NEON baseline.
        (Kernel::Sdot, Some(sdot)) => unsafe { sdot_pass(neon, sdot, pass) },
        (Kernel::Sdot, None) => {}
        (Kernel::Widening, _) => neon.vectorize(WideningPass { neon, pass }),
    }
}

/// The `SDOT` pass: compiled with `dotprod` so the assembler accepts the instruction. A wide
/// panel's 64 rows are 16 accumulator registers (of 32), so one pass over the inputs does them.
#[target_feature(enable = "neon,dotprod")]
fn sdot_pass(neon: Neon, sdot: Sdot, pass: Pass<'_>) {
    if pass.panel == 4 * 4 {
        pass.run::<_, 4>(neon, sdot);
    } else {
        pass.run::<_, 16>(neon, sdot);
    }
}

struct WideningPass<'a> {
    neon: Neon,
    pass: Pass<'a>,
}

impl pulp::NullaryFnOnce for WideningPass<'_> {
    type Output = ();
    #[inline(always)]
    fn call(self) {
        // Two accumulator registers per 4 rows: 8 × 2 of 32 registers, two passes per wide panel.
        if self.pass.panel == 4 * 4 {
            self.pass.run::<_, 4>(self.neon, Widening);
        } else {
            self.pass.run::<_, 8>(self.neon, Widening);
        }
    }
}

/// One kernel's multiply-add of 4 rows × 4 inputs into an accumulator for 4 rows.
trait QuadMadd: Copy {
    type Acc: Copy;
    fn zero(self, neon: Neon) -> Self::Acc;
    /// `acc` plus, per row `r` of 4, `Σ_k w[4r+k]·x[4r+k]` (`x`: one quad, broadcast).
    fn madd(self, neon: Neon, acc: Self::Acc, w: int8x16_t, x: int8x16_t) -> Self::Acc;
    /// The 4 rows' sums.
    fn finish(self, neon: Neon, acc: Self::Acc) -> int32x4_t;
}

impl QuadMadd for Sdot {
    type Acc = int32x4_t;
    #[inline(always)]
    fn zero(self, neon: Neon) -> int32x4_t {
        neon.neon.vdupq_n_s32(0)
    }
    #[inline(always)]
    fn madd(self, _: Neon, mut acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // SAFETY: `self` proves the CPU has `dotprod`; the instruction reads and writes only
        // the three vector registers named (no memory, no stack, no flags).
        unsafe {
            core::arch::asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }
    #[inline(always)]
    fn finish(self, _: Neon, acc: int32x4_t) -> int32x4_t {
        acc
    }
}

/// The widening kernel (safe intrinsics).
#[derive(Clone, Copy)]
struct Widening;

impl QuadMadd for Widening {
    /// Rows 0–1 and rows 2–3, two i32 partial sums per row each.
    type Acc = (int32x4_t, int32x4_t);
    #[inline(always)]
    fn zero(self, neon: Neon) -> Self::Acc {
        (neon.neon.vdupq_n_s32(0), neon.neon.vdupq_n_s32(0))
    }
    #[inline(always)]
    fn madd(self, neon: Neon, acc: Self::Acc, w: int8x16_t, x: int8x16_t) -> Self::Acc {
        let n = neon.neon;
        let lo = n.vmull_s8(n.vget_low_s8(w), n.vget_low_s8(x));
        let hi = n.vmull_high_s8(w, x);
        (n.vpadalq_s16(acc.0, lo), n.vpadalq_s16(acc.1, hi))
    }
    #[inline(always)]
    fn finish(self, neon: Neon, acc: Self::Acc) -> int32x4_t {
        neon.neon.vpaddq_s32(acc.0, acc.1)
    }
}

/// One layer's int8 product over all panels.
struct Pass<'a> {
    packed: &'a [i8],
    quads: usize,
    panel: usize,
    xq: &'a [i32],
    acc: &'a mut [i32],
}

impl Pass<'_> {
    /// Every panel, `R` accumulators (4 rows each) per pass over the inputs; `R` divides the
    /// panel's row groups (panels are 16 or 64 rows), so the accumulators are a fixed set the
    /// compiler keeps in registers (measured: with a run-time count they went through memory).
    #[inline(always)]
    fn run<K: QuadMadd, const R: usize>(self, neon: Neon, k: K) {
        let n = neon.neon;
        let groups = self.panel / 4;
        assert_eq!(groups % R, 0, "panel of {} rows", self.panel);
        let stride = self.panel * 4 * self.quads;
        for (out, cols) in self
            .acc
            .chunks_mut(self.panel)
            .zip(self.packed.chunks_exact(stride))
        {
            // Per input quad, `groups` registers of 4 rows × 4 inputs.
            let (cols, _) = pulp::as_arrays::<16, i8>(cols);
            let mut sums = [0i32; 64];
            for g in (0..groups).step_by(R) {
                let mut acc = [k.zero(neon); R];
                for (col, &x) in cols.chunks_exact(groups).zip(self.xq) {
                    let xs = n.vreinterpretq_s8_s32(n.vdupq_n_s32(x));
                    let w: &[[i8; 16]; R] = col[g..g + R].try_into().expect("R divides groups");
                    for (a, w) in acc.iter_mut().zip(w) {
                        *a = k.madd(neon, *a, pulp::cast(*w), xs);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    let rows: [i32; 4] = pulp::cast(k.finish(neon, *a));
                    sums[(g + i) * 4..(g + i + 1) * 4].copy_from_slice(&rows);
                }
            }
            let len = out.len();
            out.copy_from_slice(&sums[..len]);
        }
    }
}
