//! Low-rank decomposition of fully connected layers: a Gemm `y = W·x + b` with `W` `[out, in]`
//! is factorised by SVD, `W ≈ U_r·S_r·V_rᵀ`, and replaced by two thinner Gemms
//! `h = (√S_r·V_rᵀ)·x` (no bias) and `y = (U_r·√S_r)·h + b`, which costs `r·(in + out)`
//! parameters and multiply-adds instead of `in·out`. The rank r is the smallest that retains a
//! given share of the energy `Σ s_i²` (the squared Frobenius norm, so the relative
//! reconstruction error is `√(1 − energy)`). The trainer handles the resulting Gemm → Gemm
//! chain, so the factorised model can be fine-tuned.
//!
//! The SVD is a one-sided Jacobi (Hestenes) iteration written here in f64: it orthogonalises
//! the columns by plane rotations, is accurate to working precision for small singular values,
//! and needs no LAPACK.

use crate::prune::rewrite;
use hearth_model::error::ModelError;
use hearth_model::onnx::OnnxModel;
use hearth_model::tensor::{Tensor, Weights};
use std::collections::BTreeSet;
use tract_onnx::pb;

/// Maximum Jacobi sweeps (convergence is quadratic; 6–12 sweeps are typical).
const MAX_SWEEPS: usize = 60;
/// Columns count as orthogonal when `|⟨a,b⟩| ≤ TOL·‖a‖·‖b‖`.
const TOL: f64 = 1e-13;

/// Thin SVD of the row-major `rows × cols` matrix `a`: returns `U` (`rows × k`, row-major),
/// the singular values `S` (`k`, descending) and `Vᵀ` (`k × cols`, row-major) with
/// `k = min(rows, cols)` and `a = U·diag(S)·Vᵀ`. Columns of `U` for zero singular values are
/// zero (they do not contribute to the product).
///
/// # Panics
/// If `a.len() != rows * cols`.
pub fn svd(a: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(
        a.len(),
        rows * cols,
        "svd: {} values for {rows}x{cols}",
        a.len()
    );
    if rows >= cols {
        jacobi(a, rows, cols)
    } else {
        // A = (Aᵀ)ᵀ = (U'·S·V'ᵀ)ᵀ = V'·S·U'ᵀ.
        let mut t = vec![0.0; a.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = a[r * cols + c];
            }
        }
        let (u2, s, vt2) = jacobi(&t, cols, rows);
        let k = rows;
        // U = V' (rows × k) = (V'ᵀ)ᵀ; Vᵀ = U'ᵀ (k × cols).
        let mut u = vec![0.0; rows * k];
        for i in 0..k {
            for r in 0..rows {
                u[r * k + i] = vt2[i * rows + r];
            }
        }
        let mut vt = vec![0.0; k * cols];
        for i in 0..k {
            for c in 0..cols {
                vt[i * cols + c] = u2[c * k + i];
            }
        }
        (u, s, vt)
    }
}

/// One-sided Jacobi for `m ≥ n`.
fn jacobi(a: &[f32], m: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Columns of A and of V, each contiguous.
    let mut ac: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| f64::from(a[i * n + j])).collect())
        .collect();
    let mut vc: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..n).map(|i| f64::from(u8::from(i == j))).collect())
        .collect();
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let rotate = |x: &mut [f64], y: &mut [f64], c: f64, s: f64| {
        for (a, b) in x.iter_mut().zip(y.iter_mut()) {
            let (p, q) = (*a, *b);
            *a = c * p - s * q;
            *b = s * p + c * q;
        }
    };
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (lo, hi) = ac.split_at_mut(q);
                let (cp, cq) = (&mut lo[p], &mut hi[0]);
                let alpha = dot(cp, cp);
                let beta = dot(cq, cq);
                let gamma = dot(cp, cq);
                if alpha == 0.0 || beta == 0.0 || gamma.abs() <= TOL * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                // Rotation zeroing the (p, q) entry of AᵀA.
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(cp, cq, c, s);
                let (lo, hi) = vc.split_at_mut(q);
                rotate(&mut lo[p], &mut hi[0], c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = ac.iter().map(|c| dot(c, c).sqrt()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
    let k = n;
    let mut u = vec![0.0f32; m * k];
    let mut s = vec![0.0f32; k];
    let mut vt = vec![0.0f32; k * n];
    for (i, &j) in order.iter().enumerate() {
        let sj = norms[j];
        s[i] = sj as f32;
        if sj > 0.0 {
            for r in 0..m {
                u[r * k + i] = (ac[j][r] / sj) as f32;
            }
        }
        for c in 0..n {
            vt[i * n + c] = vc[j][c] as f32;
        }
    }
    (u, s, vt)
}

/// Smallest rank retaining `energy` of `Σ s²` (at least 1).
pub fn rank_for_energy(s: &[f32], energy: f32) -> usize {
    let total: f64 = s.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mut acc = 0.0;
    for (i, &v) in s.iter().enumerate() {
        acc += f64::from(v) * f64::from(v);
        if acc >= f64::from(energy) * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    s.len().max(1)
}

fn gemm(name: String, inputs: Vec<String>, output: String) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs,
        output: vec![output],
        name,
        op_type: "Gemm".into(),
        attribute: vec![pb::AttributeProto {
            name: "transB".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Replaces every Gemm whose rank-r factorisation (r = [`rank_for_energy`] of its singular
/// values) saves at least `min_params_saving` of its weight count (`1 − r·(in+out)/(in·out)`)
/// by two Gemms (`<w>.lr0` `[r, in]` without bias, then `<w>.lr1` `[out, r]` with the original
/// bias), where `<w>` is the weight name without a trailing `.weight`. Returns the new model
/// and `(weight name, rank)` of every factorised layer.
pub fn low_rank(
    model: &OnnxModel,
    energy: f32,
    min_params_saving: f32,
) -> Result<(OnnxModel, Vec<(String, usize)>), ModelError> {
    if !(energy > 0.0 && energy <= 1.0) {
        return Err(ModelError::Data(format!("energy {energy} not in (0, 1]")));
    }
    let layers = model.dense_layers()?;
    let weights = model.weights();
    let mut proto = model.proto().clone();
    let g = proto
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Onnx("model has no graph".into()))?;
    let mut replace = Weights::new();
    let mut remove = BTreeSet::new();
    let mut done = Vec::new();
    for l in &layers {
        let (out, inp) = (l.outputs, l.inputs);
        let t = &weights[&l.weight];
        // W as [out, in].
        let w = l.out_major(t);
        let (u, s, vt) = svd(&w, out, inp);
        let k = s.len();
        let r = rank_for_energy(&s, energy);
        let saving = 1.0 - (r * (inp + out)) as f32 / (inp * out) as f32;
        if saving <= 0.0 || saving < min_params_saving {
            continue;
        }
        let root = l.weight.strip_suffix(".weight").unwrap_or(&l.weight);
        let (n0, n1) = (format!("{root}.lr0.weight"), format!("{root}.lr1.weight"));
        let sq: Vec<f32> = s[..r].iter().map(|v| v.sqrt()).collect();
        let a: Vec<f32> = (0..r)
            .flat_map(|i| {
                let si = sq[i];
                vt[i * inp..(i + 1) * inp].iter().map(move |v| v * si)
            })
            .collect();
        let b: Vec<f32> = (0..out)
            .flat_map(|o| (0..r).map(move |i| (o, i)))
            .map(|(o, i)| u[o * k + i] * sq[i])
            .collect();
        let pos = g
            .node
            .iter()
            .position(|n| n.op_type == "Gemm" && n.input.get(1) == Some(&l.weight))
            .ok_or_else(|| ModelError::Onnx(format!("no Gemm reads {}", l.weight)))?;
        let node = g.node[pos].clone();
        let base = if node.name.is_empty() {
            root.to_string()
        } else {
            node.name.clone()
        };
        let mid = format!("{}_lowrank", node.output[0]);
        let first = gemm(
            format!("{base}.lr0"),
            vec![node.input[0].clone(), n0.clone()],
            mid.clone(),
        );
        let mut second_inputs = vec![mid, n1.clone()];
        if let Some(bias) = node.input.get(2).filter(|b| !b.is_empty()) {
            second_inputs.push(bias.clone());
        }
        let second = gemm(format!("{base}.lr1"), second_inputs, node.output[0].clone());
        g.node[pos] = second;
        g.node.insert(pos, first);
        replace.insert(n0, Tensor::new(vec![r, inp], a));
        replace.insert(n1, Tensor::new(vec![out, r], b));
        remove.insert(l.weight.clone());
        done.push((l.weight.clone(), r));
    }
    Ok((rewrite(proto, &replace, &remove)?, done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn check(rows: usize, cols: usize, seed: u64) -> f32 {
        let mut rng = StdRng::seed_from_u64(seed);
        let a: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (u, s, vt) = svd(&a, rows, cols);
        let k = rows.min(cols);
        assert_eq!((u.len(), s.len(), vt.len()), (rows * k, k, k * cols));
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "sorted: {s:?}");
        assert!(s[k - 1] > 0.0);
        let mut max_err = 0.0f32;
        for r in 0..rows {
            for c in 0..cols {
                let v: f32 = (0..k).map(|i| u[r * k + i] * s[i] * vt[i * cols + c]).sum();
                max_err = max_err.max((v - a[r * cols + c]).abs());
            }
        }
        // Orthonormal columns of U and rows of Vᵀ.
        for i in 0..k {
            for j in 0..k {
                let uu: f32 = (0..rows).map(|r| u[r * k + i] * u[r * k + j]).sum();
                let vv: f32 = (0..cols).map(|c| vt[i * cols + c] * vt[j * cols + c]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((uu - want).abs() < 1e-4, "UᵀU[{i},{j}] = {uu}");
                assert!((vv - want).abs() < 1e-4, "VVᵀ[{i},{j}] = {vv}");
            }
        }
        max_err
    }

    #[test]
    fn jacobi_svd_reconstructs_random_matrices() {
        for (rows, cols, seed) in [(12, 7, 1), (7, 12, 2), (30, 30, 3), (1, 5, 4), (40, 17, 5)] {
            let err = check(rows, cols, seed);
            eprintln!("svd {rows}x{cols}: max reconstruction error {err:.2e}");
            assert!(err < 1e-5, "{rows}x{cols}: {err}");
        }
        // A rank-2 matrix has exactly two non-zero singular values.
        let (rows, cols) = (6, 5);
        let x = [1.0, 2.0, 0.5, -1.0, 3.0, 0.0];
        let y = [0.3, -0.2, 1.0, 2.0, 0.1];
        let z = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let a: Vec<f32> = (0..rows * cols)
            .map(|i| x[i / cols] * y[i % cols] + z[i / cols] * (i % cols) as f32)
            .collect();
        let (_, s, _) = svd(&a, rows, cols);
        assert!(s[1] > 0.1 && s[2] < 1e-5, "{s:?}");
        assert_eq!(rank_for_energy(&s, 1.0), 2);
        assert_eq!(rank_for_energy(&[4.0, 3.0], 0.5), 1);
        assert_eq!(rank_for_energy(&[4.0, 3.0], 0.99), 2);
    }
}
