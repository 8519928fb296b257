//! The x86-64 integer kernel for int8 layers: AVX-512 BW (16 rows per register) or AVX2 (8),
//! through `pulp`'s feature-checked intrinsics (safe calls: the token proves the CPU has them).
use core::arch::x86_64::{__m128i, __m256i, __m512i};
use pulp::x86::{V3, V4};
use pulp::Simd;

/// Whether this CPU runs the kernel (AVX2 at least).
pub(crate) fn available() -> bool {
    V3::try_new().is_some()
}

/// Packs row-major int8 `w` (`outputs × inputs`) into `panel`-row panels of input pairs:
/// panel `p`, pair `j/2`, row `r`, `j % 2` — a row's two weights of a pair side by side, so
/// one `vpmaddwd` lane is `w[r][j]·x[j] + w[r][j+1]·x[j+1]`. Odd widths get a zero pad.
pub(crate) fn pack_pairs(w: &[i8], outputs: usize, inputs: usize, panel: usize) -> Vec<i8> {
    let pairs = inputs.div_ceil(2);
    let mut p = vec![0i8; outputs.div_ceil(panel) * panel * 2 * pairs];
    for r in 0..outputs {
        let (pi, ri) = (r / panel, r % panel);
        for j in 0..inputs {
            p[pi * panel * 2 * pairs + (j / 2) * panel * 2 + ri * 2 + j % 2] = w[r * inputs + j];
        }
    }
    p
}

/// `acc[r] = Σ_j W[r][j]·q[j]` for int8 activation values `q` (held as floats), in i32.
pub(crate) fn product(packed: &[i8], pairs: usize, panel: usize, q: &[f32], acc: &mut [i32]) {
    let xp = pair_operands(q, pairs);
    run(V4::try_new(), V3::try_new(), packed, pairs, panel, &xp, acc);
}

/// The widest kernel of those given (tests pass `None` for AVX-512 to run the AVX2 one).
pub(crate) fn run(
    v4: Option<V4>,
    v3: Option<V3>,
    packed: &[i8],
    pairs: usize,
    panel: usize,
    xp: &[i32],
    acc: &mut [i32],
) {
    if let Some(v4) = v4 {
        let k = Kernel::<V4, 4> {
            isa: v4,
            packed,
            pairs,
            panel,
            xp,
            acc,
        };
        Simd::vectorize(v4, k);
    } else if let Some(v3) = v3 {
        let k = Kernel::<V3, 8> {
            isa: v3,
            packed,
            pairs,
            panel,
            xp,
            acc,
        };
        Simd::vectorize(v3, k);
    }
}

/// Input pairs as the kernel's broadcast operands: two i16 halves, low = even input.
pub(crate) fn pair_operands(q: &[f32], pairs: usize) -> Vec<i32> {
    (0..pairs)
        .map(|p| {
            let lo = q.get(2 * p).map_or(0, |&v| v as i16);
            let hi = q.get(2 * p + 1).map_or(0, |&v| v as i16);
            (i32::from(hi as u16) << 16) | i32::from(lo as u16)
        })
        .collect()
}

/// One instruction set's pair multiply-add on a register of `ROWS` i32 lanes (one lane per
/// weight row): the only part of the kernel that differs between AVX-512 and AVX2.
trait PairMadd: Copy {
    type Reg: Copy;
    /// Rows (i32 lanes) per register.
    const ROWS: usize;
    fn zero(self) -> Self::Reg;
    fn splat(self, x: i32) -> Self::Reg;
    /// `acc` plus, per lane `r`, `w[2r]·x_lo + w[2r+1]·x_hi` (`w`: `ROWS` rows × 2 int8).
    fn madd(self, acc: Self::Reg, w: &[i8], xs: Self::Reg) -> Self::Reg;
    fn store(self, r: Self::Reg, out: &mut [i32]);
}

impl PairMadd for V4 {
    type Reg = __m512i;
    const ROWS: usize = 16;
    #[inline(always)]
    fn zero(self) -> __m512i {
        self.avx512f._mm512_setzero_si512()
    }
    #[inline(always)]
    fn splat(self, x: i32) -> __m512i {
        self.avx512f._mm512_set1_epi32(x)
    }
    #[inline(always)]
    fn madd(self, acc: __m512i, w: &[i8], xs: __m512i) -> __m512i {
        let bytes: [i8; 32] = w.try_into().unwrap_or([0; 32]);
        let w = self
            .avx512bw
            ._mm512_cvtepi8_epi16(pulp::cast::<_, __m256i>(bytes));
        self.avx512f
            ._mm512_add_epi32(acc, self.avx512bw._mm512_madd_epi16(w, xs))
    }
    #[inline(always)]
    fn store(self, r: __m512i, out: &mut [i32]) {
        out.copy_from_slice(&pulp::cast::<_, [i32; 16]>(r));
    }
}

impl PairMadd for V3 {
    type Reg = __m256i;
    const ROWS: usize = 8;
    #[inline(always)]
    fn zero(self) -> __m256i {
        self.avx._mm256_setzero_si256()
    }
    #[inline(always)]
    fn splat(self, x: i32) -> __m256i {
        self.avx._mm256_set1_epi32(x)
    }
    #[inline(always)]
    fn madd(self, acc: __m256i, w: &[i8], xs: __m256i) -> __m256i {
        let bytes: [i8; 16] = w.try_into().unwrap_or([0; 16]);
        let w = self
            .avx2
            ._mm256_cvtepi8_epi16(pulp::cast::<_, __m128i>(bytes));
        self.avx2
            ._mm256_add_epi32(acc, self.avx2._mm256_madd_epi16(w, xs))
    }
    #[inline(always)]
    fn store(self, r: __m256i, out: &mut [i32]) {
        out.copy_from_slice(&pulp::cast::<_, [i32; 8]>(r));
    }
}

/// The int8 panel product on instruction set `T` with up to `R` accumulator registers
/// (`R · T::ROWS` = 64 rows, a wide panel, per pass over the inputs).
struct Kernel<'a, T, const R: usize> {
    isa: T,
    packed: &'a [i8],
    pairs: usize,
    panel: usize,
    xp: &'a [i32],
    acc: &'a mut [i32],
}

impl<T: PairMadd, const R: usize> pulp::WithSimd for Kernel<'_, T, R> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let isa = self.isa;
        let stride = self.panel * 2 * self.pairs;
        for (out, cols) in self
            .acc
            .chunks_mut(self.panel)
            .zip(self.packed.chunks_exact(stride))
        {
            let mut sums = [0i32; 64];
            let groups = self.panel / T::ROWS;
            for g in (0..groups).step_by(R) {
                let n = (groups - g).min(R);
                let mut acc = [isa.zero(); R];
                for (col, &x) in cols.chunks_exact(self.panel * 2).zip(self.xp) {
                    let xs = isa.splat(x);
                    for (i, a) in acc.iter_mut().enumerate().take(n) {
                        let off = (g + i) * 2 * T::ROWS;
                        *a = isa.madd(*a, &col[off..off + 2 * T::ROWS], xs);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(n) {
                    isa.store(*a, &mut sums[(g + i) * T::ROWS..(g + i + 1) * T::ROWS]);
                }
            }
            let n = out.len();
            out.copy_from_slice(&sums[..n]);
        }
    }
}
