//! The result table: one Markdown row per measurement (original, then each step), so it reads
//! in a terminal, pastes into docs, and splits on `|` in tests.

use crate::pipeline::Row;

/// Column headers, in order.
pub const HEADERS: [&str; 12] = [
    "step",
    "bytes",
    "ratio",
    "params",
    "nonzeros",
    "accuracy",
    "max_diff",
    "mean_diff",
    "decision_agree",
    "latency_us",
    "dense_us",
    "note",
];

/// Formats the rows as a Markdown table; `ratio` is the original size over the row's size,
/// `-` marks a value not measured (no labels, no reference).
pub fn render(rows: &[Row]) -> String {
    let base = rows.first().map_or(1, |r| r.m.bytes.max(1)) as f64;
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let m = &r.m;
            let (max, mean, top) = match &m.agreement {
                Some(a) => (
                    format!("{:.3e}", a.max_abs_diff),
                    format!("{:.3e}", a.mean_abs_diff),
                    format!("{:.3}", a.decision_agreement),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            vec![
                r.label.clone(),
                m.bytes.to_string(),
                format!("{:.2}x", base / m.bytes.max(1) as f64),
                m.params.to_string(),
                m.nonzeros.to_string(),
                m.accuracy.map_or("-".into(), |a| format!("{a:.4}")),
                max,
                mean,
                top,
                format!("{:.1}", m.latency_us_median),
                m.dense_latency_us_median
                    .map_or("-".into(), |v| format!("{v:.1}")),
                r.note.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |vals: Vec<String>| {
        let parts: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        format!("| {} |\n", parts.join(" | "))
    };
    let mut out = line(HEADERS.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in cells {
        out.push_str(&line(row));
    }
    out
}
