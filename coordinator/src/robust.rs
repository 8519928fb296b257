//! Robust combinations of a round's kept updates (the methods that cannot fold into a running
//! sum): coordinate-wise median, coordinate-wise trimmed mean, and Krum / multi-Krum
//! (Blanchard et al. 2017). They take every decoded update of the round at once, so their
//! memory is `updates × model`; the round's `max_clients` bounds it (see
//! [`crate::config::Aggregation::check_round`]). They are CPU work: callers run them on the
//! blocking pool.
//!
//! [`bound_round`] applies the round-relative defences to kept updates before they are
//! combined: norms above `norm_bound_factor ×` the round's median norm are scaled down to it,
//! weights above `sample_cap_factor ×` the round's median weight are capped. With every update
//! in hand the bounds come from the round itself (from round 1 on, no history needed).

use hearth_model::{Tensor, Weights};

use crate::aggregate::{Aggregate, AggregateError};
use crate::config::{Aggregation, Combine};

/// One kept update and its aggregation weight (the capped sample count).
pub type Weighted = (Weights, f64);

/// All updates must have the first one's names and shapes.
fn template(updates: &[Weighted]) -> Result<&Weights, AggregateError> {
    let (first, _) = updates.first().ok_or(AggregateError::Empty)?;
    for (u, _) in updates {
        let same = u.len() == first.len()
            && u.iter()
                .zip(first)
                .all(|((ka, ta), (kb, tb))| ka == kb && ta.data.len() == tb.data.len());
        if !same {
            return Err(AggregateError::Names(
                "kept updates differ in names or shapes".into(),
            ));
        }
    }
    Ok(first)
}

/// Applies `reduce` to the column of every coordinate (the updates' values at one position).
fn coordinatewise(
    updates: &[Weighted],
    reduce: impl Fn(&mut [f32]) -> f32,
) -> Result<Weights, AggregateError> {
    let first = template(updates)?;
    let mut column = vec![0f32; updates.len()];
    Ok(first
        .iter()
        .map(|(name, t)| {
            let data = (0..t.data.len())
                .map(|i| {
                    for (c, (u, _)) in column.iter_mut().zip(updates) {
                        *c = u[name].data[i];
                    }
                    column.sort_unstable_by(f32::total_cmp);
                    reduce(&mut column)
                })
                .collect();
            (name.clone(), Tensor::new(t.shape.clone(), data))
        })
        .collect())
}

/// Coordinate-wise median (the mean of the two middle values for an even count).
pub fn median(updates: &[Weighted]) -> Result<Weights, AggregateError> {
    coordinatewise(updates, |sorted| {
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            ((f64::from(sorted[n / 2 - 1]) + f64::from(sorted[n / 2])) / 2.0) as f32
        }
    })
}

/// Coordinate-wise mean after dropping the ⌊β·n⌋ smallest and ⌊β·n⌋ largest values
/// (β in [0, 0.5), so at least one value is left).
pub fn trimmed_mean(updates: &[Weighted], beta: f32) -> Result<Weights, AggregateError> {
    let k = (f64::from(beta) * updates.len() as f64).floor() as usize;
    if 2 * k >= updates.len() {
        return Err(AggregateError::Robust(format!(
            "trim fraction {beta} leaves nothing of {} updates",
            updates.len()
        )));
    }
    trimmed_mean_count(updates, k)
}

/// Coordinate-wise mean after dropping the `k` smallest and `k` largest values (2k < n).
pub fn trimmed_mean_count(updates: &[Weighted], k: usize) -> Result<Weights, AggregateError> {
    if 2 * k >= updates.len() {
        return Err(AggregateError::Robust(format!(
            "trimming {k} on each side leaves nothing of {} updates",
            updates.len()
        )));
    }
    coordinatewise(updates, |sorted| {
        let kept = &sorted[k..sorted.len() - k];
        (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
    })
}

/// Krum with `f` assumed attackers: each update scores the sum of squared distances to its
/// n − f − 2 nearest others; the `m` lowest scores are selected (m = 1: Krum; more:
/// multi-Krum) and averaged by weight. Needs n ≥ 2f + 3. Returns the mean and the selected
/// indices (best first).
pub fn krum(
    updates: &[Weighted],
    f: usize,
    m: usize,
) -> Result<(Weights, Vec<usize>), AggregateError> {
    let first = template(updates)?;
    let n = updates.len();
    if n < 2 * f + 3 {
        return Err(AggregateError::Robust(format!(
            "krum with f = {f} needs at least {} updates, the round has {n}",
            2 * f + 3
        )));
    }
    let mut dist = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let d: f64 = updates[i]
                .0
                .values()
                .zip(updates[j].0.values())
                .flat_map(|(a, b)| a.data.iter().zip(&b.data))
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum();
            dist[i][j] = d;
            dist[j][i] = d;
        }
    }
    let neighbours = n - f - 2;
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
            others.sort_unstable_by(f64::total_cmp);
            others[..neighbours].iter().sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(m.clamp(1, n - f));
    let mut sum = Aggregate::new(first);
    for &i in &order {
        sum.fold(&updates[i].0, updates[i].1)?;
    }
    Ok((sum.finish()?, order))
}

/// Weighted mean Σ wᵢ·Δᵢ / Σ wᵢ of kept updates.
pub fn weighted_mean(updates: &[Weighted]) -> Result<Weights, AggregateError> {
    let mut sum = Aggregate::new(template(updates)?);
    for (u, w) in updates {
        sum.fold(u, *w)?;
    }
    sum.finish()
}

/// The median of `values` (mean of the two middle ones for an even count); `None` when empty.
pub fn median_of(values: &mut [f64]) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    values.sort_unstable_by(f64::total_cmp);
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Fewest values a median bound is learnt from: with three, one attacker cannot move the
/// median beyond the honest values (with two it could double it).
pub const MIN_FOR_MEDIAN: usize = 3;

/// Applies the round-relative bounds of `a` to kept `updates` in place: `raw_norms[i]` is the
/// L2 norm update i arrived with (its marker's), the bound `norm_bound_factor × median`; the
/// weight cap is `sample_cap_factor × median weight`. Needs [`MIN_FOR_MEDIAN`] updates.
/// Returns a description of what changed (empty when nothing did).
pub fn bound_round(a: &Aggregation, updates: &mut [Weighted], raw_norms: &[f64]) -> String {
    let mut notes = Vec::new();
    if updates.len() < MIN_FOR_MEDIAN {
        return String::new();
    }
    let positive: Vec<f64> = raw_norms.iter().copied().filter(|n| *n > 0.0).collect();
    if a.norm_bound_factor > 0.0 && positive.len() >= MIN_FOR_MEDIAN {
        let bound =
            f64::from(a.norm_bound_factor) * median_of(&mut positive.clone()).unwrap_or(0.0);
        let mut clipped = 0;
        for (u, _) in updates.iter_mut() {
            let norm = f64::from(hearth_model::l2_norm(u));
            if crate::aggregate::clip_update(u, norm, bound as f32) {
                clipped += 1;
            }
        }
        if clipped > 0 {
            notes.push(format!(
                "{clipped} clipped to {bound:.4} ({} × the median norm)",
                a.norm_bound_factor
            ));
        }
    }
    if a.sample_cap_factor > 0.0 {
        let mut weights: Vec<f64> = updates.iter().map(|(_, w)| *w).collect();
        let cap = f64::from(a.sample_cap_factor) * median_of(&mut weights).unwrap_or(0.0);
        let mut capped = 0;
        for (_, w) in updates.iter_mut() {
            if *w > cap && cap > 0.0 {
                *w = cap;
                capped += 1;
            }
        }
        if capped > 0 {
            notes.push(format!(
                "{capped} weight(s) capped at {cap:.0} ({} × the median sample count)",
                a.sample_cap_factor
            ));
        }
    }
    notes.join(", ")
}

/// The round's pseudo-gradient from its kept updates under `a.combine`, with a short
/// description. [`Combine::Auto`] takes multi-Krum with f = `krum_byzantine` selecting
/// n − f (the f updates farthest from their neighbours are left out, the rest averaged by
/// their capped weights) from `robust_from_clients` updates on, else the weighted mean;
/// [`Combine::Mean`] over kept updates is the weighted mean.
pub fn combine(a: &Aggregation, updates: &[Weighted]) -> Result<(Weights, String), AggregateError> {
    let n = updates.len();
    let f = a.krum_byzantine as usize;
    match a.combine {
        Combine::Auto
            if a.robust_from_clients > 0
                && n >= a.robust_from_clients as usize
                && n >= 2 * f + 3 =>
        {
            let (mean, chosen) = krum(updates, f, n - f)?;
            let left: Vec<usize> = (0..n).filter(|i| !chosen.contains(i)).collect();
            Ok((
                mean,
                format!("multi-Krum (f = {f}, update(s) {left:?} left out) of {n}"),
            ))
        }
        Combine::Auto | Combine::Mean => Ok((weighted_mean(updates)?, format!("mean of {n}"))),
        Combine::Median => Ok((median(updates)?, format!("median of {n}"))),
        Combine::TrimmedMean => Ok((
            trimmed_mean(updates, a.trim_fraction)?,
            format!("trimmed mean (β = {}) of {n}", a.trim_fraction),
        )),
        Combine::Krum => {
            let (mean, chosen) = krum(updates, a.krum_byzantine as usize, a.krum_select as usize)?;
            Ok((
                mean,
                format!(
                    "Krum (f = {}, {} chosen) of {n}",
                    a.krum_byzantine,
                    chosen.len()
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(v: &[f32]) -> Weighted {
        let mut w = Weights::new();
        w.insert("a".into(), Tensor::new(vec![v.len()], v.to_vec()));
        (w, 1.0)
    }

    fn vals(w: &Weights) -> &[f32] {
        &w["a"].data
    }

    #[test]
    fn median_by_hand() {
        let ups = [u(&[1.0, -5.0]), u(&[3.0, 0.0]), u(&[100.0, 2.0])];
        assert_eq!(vals(&median(&ups).unwrap()), &[3.0, 0.0]);
        let ups = [u(&[1.0]), u(&[4.0]), u(&[2.0]), u(&[1000.0])];
        assert_eq!(vals(&median(&ups).unwrap()), &[3.0]);
        assert!(median(&[]).is_err());
    }

    #[test]
    fn trimmed_mean_by_hand() {
        // β = 0.2 of 5 drops one value on each side: mean of the middle three.
        let ups = [
            u(&[1.0, 10.0]),
            u(&[2.0, -90.0]),
            u(&[3.0, 20.0]),
            u(&[4.0, 30.0]),
            u(&[-50.0, 1e6]),
        ];
        let m = trimmed_mean(&ups, 0.2).unwrap();
        assert_eq!(vals(&m), &[2.0, 20.0]);
        // β below 1/n trims nothing: the plain mean.
        let m = trimmed_mean(&ups[..4], 0.2).unwrap();
        assert_eq!(vals(&m), &[2.5, -7.5]);
        // β = 0.4 of 4 drops one on each side.
        let m = trimmed_mean(&ups[..4], 0.4).unwrap();
        assert_eq!(vals(&m), &[2.5, 15.0]);
    }

    #[test]
    fn krum_picks_the_honest_cluster() {
        let honest = [
            u(&[1.0, 1.0]),
            u(&[1.1, 0.9]),
            u(&[0.9, 1.1]),
            u(&[1.0, 1.2]),
            u(&[1.05, 1.0]),
        ];
        // f = 2 attackers: one huge, one sign-flipped and scaled.
        let mut all = honest.to_vec();
        all.push(u(&[500.0, 500.0]));
        all.push(u(&[-10.0, -10.0]));
        let (one, chosen) = krum(&all, 2, 1).unwrap();
        assert_eq!(chosen.len(), 1);
        assert!(chosen[0] < 5, "{chosen:?}");
        assert!(
            vals(&one).iter().all(|v| (0.85..1.25).contains(v)),
            "{one:?}"
        );
        // Multi-Krum with m = 5 takes exactly the honest five (n − f = 5).
        let (avg, mut chosen) = krum(&all, 2, 5).unwrap();
        chosen.sort_unstable();
        assert_eq!(chosen, vec![0, 1, 2, 3, 4]);
        assert!((vals(&avg)[0] - 1.01).abs() < 1e-6, "{avg:?}");
        assert!((vals(&avg)[1] - 1.04).abs() < 1e-6, "{avg:?}");
        // Hand computation for Krum scores: with n = 5, f = 1 each update sums its 2 nearest.
        // Points 0, 1, 2 on a line at 0, 1, 3; 3 and 4 far away at 100, 200.
        let line = [u(&[0.0]), u(&[1.0]), u(&[3.0]), u(&[100.0]), u(&[200.0])];
        // scores: 0 → 1 + 9 = 10, 1 → 1 + 4 = 5, 2 → 4 + 9 = 13, 3 → ..., 4 → ...
        let (best, chosen) = krum(&line, 1, 2).unwrap();
        assert_eq!(chosen, vec![1, 0]);
        assert_eq!(vals(&best), &[0.5]);
        assert!(krum(&line[..4], 1, 1).is_err(), "n < 2f + 3");
    }

    #[test]
    fn multi_krum_averages_by_weight() {
        let mut ups = vec![u(&[1.0]), u(&[2.0]), u(&[1.5]), u(&[90.0]), u(&[1.2])];
        ups[0].1 = 3.0;
        let (avg, mut chosen) = krum(&ups, 1, 2).unwrap();
        chosen.sort_unstable();
        // Scores (two nearest): 1.2 → 0.04 + 0.09, 1.0 → 0.04 + 0.25, 1.5 → 0.09 + 0.25.
        assert_eq!(chosen, vec![0, 4]);
        // 1.0 (weight 3) and 1.2 (weight 1).
        assert!((vals(&avg)[0] - 1.05).abs() < 1e-6, "{avg:?}");
        let (avg, _) = krum(&ups, 1, 3).unwrap();
        // 1.0 (weight 3), 1.5, 1.2 → (3 + 1.5 + 1.2) / 5
        assert!((vals(&avg)[0] - 1.14).abs() < 1e-6, "{avg:?}");
    }

    #[test]
    fn round_bounds_clip_to_a_multiple_of_the_median_norm_and_cap_weights() {
        let a = Aggregation::default();
        // Norms 1, 2, 3 and 100 (median 2.5, bound 7.5); weights 10, 20, 30 and 1e6 (median 25,
        // cap 75).
        let mut ups = vec![u(&[1.0]), u(&[2.0]), u(&[-3.0]), u(&[-100.0])];
        for (i, w) in [10.0, 20.0, 30.0, 1e6].into_iter().enumerate() {
            ups[i].1 = w;
        }
        let note = bound_round(&a, &mut ups, &[1.0, 2.0, 3.0, 100.0]);
        assert!(
            note.contains("1 clipped to 7.5") && note.contains("capped at 75"),
            "{note}"
        );
        assert!((vals(&ups[3].0)[0] + 7.5).abs() < 1e-5, "{ups:?}");
        assert_eq!(ups[3].1, 75.0);
        assert_eq!((vals(&ups[2].0), ups[2].1), (&[-3.0][..], 30.0));
        // Off, or fewer than three updates: nothing changes.
        let off = Aggregation {
            norm_bound_factor: 0.0,
            sample_cap_factor: 0.0,
            ..Aggregation::default()
        };
        let mut same = vec![u(&[1.0]), u(&[2.0]), u(&[-100.0])];
        assert!(bound_round(&off, &mut same, &[1.0, 2.0, 100.0]).is_empty());
        assert_eq!(vals(&same[2].0), &[-100.0]);
        let mut two = vec![u(&[1.0]), u(&[-100.0])];
        assert!(bound_round(&a, &mut two, &[1.0, 100.0]).is_empty());
    }

    #[test]
    fn auto_takes_multi_krum_from_five_updates() {
        let a = Aggregation::default();
        let four = [u(&[1.0]), u(&[2.0]), u(&[3.0]), u(&[-94.0])];
        let (m, how) = combine(&a, &four).unwrap();
        assert_eq!((vals(&m), how.as_str()), (&[-22.0][..], "mean of 4"));
        // Five: the one farthest from its neighbours is left out, the rest averaged.
        let five = [u(&[1.0]), u(&[2.0]), u(&[-95.0]), u(&[3.0]), u(&[4.0])];
        let (m, how) = combine(&a, &five).unwrap();
        assert_eq!(vals(&m), &[2.5]);
        assert!(
            how.starts_with("multi-Krum (f = 1, update(s) [2] left out)"),
            "{how}"
        );
        let never = Aggregation {
            robust_from_clients: 0,
            ..Aggregation::default()
        };
        assert_eq!(vals(&combine(&never, &five).unwrap().0), &[-17.0]);
    }
}
