//! `hearth-coordinator plot`: accuracy per version and bytes per round of one model as an SVG
//! (and [`write_lines`], a plain line plot for benchmarks),
//! drawn with plotters built lean (default features off: the SVG backend and line series only;
//! no font engine, so labels are SVG text elements the viewer renders, placed by estimate).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One round's figures: the version it published and how it did.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPoint {
    /// Version published by the round (x axis).
    pub version: u64,
    /// Held-out accuracy of that version (coordinator's test split), if evaluated.
    pub heldout_accuracy: Option<f32>,
    /// Clients' federated accuracy of that version, if any reported.
    pub federated_accuracy: Option<f32>,
    /// Payload bytes the round's clients uploaded.
    pub uplink_bytes: u64,
    /// Bytes of the version served to agents (whole files and coded deltas).
    pub downlink_bytes: u64,
}

/// Why a plot could not be written.
#[derive(thiserror::Error, Debug)]
pub enum PlotError {
    /// The file name has no `.svg` extension.
    #[error("the output must end in .svg, not {0:?}")]
    Format(String),
    /// Nothing to plot.
    #[error("no versions to plot")]
    Empty,
    /// plotters failed (drawing or writing the file).
    #[error("drawing the plot: {0}")]
    Draw(String),
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Writes the plot of `model`'s `points` to `out` (`.svg`, 900 × 600).
pub fn write(model: &str, points: &[RoundPoint], out: &Path) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::Empty);
    }
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => draw(
            SVGBackend::new(out, (900, 600)).into_drawing_area(),
            model,
            points,
        ),
        _ => Err(PlotError::Format(out.display().to_string())),
    }
}

/// One curve of [`write_tradeoff`]: settings as (bytes, accuracy) points; the ones no other
/// point beats on both (fewer bytes, higher accuracy) are joined by a line.
#[derive(Clone, Debug, PartialEq)]
pub struct TradeoffSeries {
    /// Legend text.
    pub label: String,
    /// (bytes, accuracy) per setting.
    pub points: Vec<(f64, f64)>,
    /// A reference accuracy drawn as a horizontal line (e.g. the fp32 run's minus one point).
    pub reference: Option<f64>,
}

/// The points no other point beats: sorted by bytes, each more accurate than every cheaper one.
pub fn frontier(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = points.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut out: Vec<(f64, f64)> = Vec::new();
    for q in p {
        if out.last().is_none_or(|l| q.1 > l.1) {
            out.push(q);
        }
    }
    out
}

/// Writes accuracy against bytes (log scale) for codec settings to `out` (`.svg`, 900 × 600):
/// the codec sweep's curve (`examples/codec_plot.rs`).
pub fn write_tradeoff(
    title: &str,
    x_desc: &str,
    series: &[TradeoffSeries],
    out: &Path,
) -> Result<(), PlotError> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    if all.is_empty() {
        return Err(PlotError::Empty);
    }
    if out.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(PlotError::Format(out.display().to_string()));
    }
    let root = SVGBackend::new(out, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let xlo = all
        .iter()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .max(1.0)
        / 1.3;
    let xhi = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.3;
    let ylo = all.iter().map(|p| p.1).fold(1.0, f64::min);
    let ylo = (ylo - 0.02).max(0.0);
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .caption(title, ("sans-serif", 18))
        .build_cartesian_2d((xlo..xhi).log_scale(), ylo..1.0f64)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("final accuracy")
        .draw()
        .map_err(draw_err)?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, s) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, colour.filled())),
            )
            .map_err(draw_err)?;
        chart
            .draw_series(LineSeries::new(frontier(&s.points), colour.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
        if let Some(r) = s.reference {
            chart
                .draw_series(LineSeries::new(
                    [(xlo, r), (xhi, r)],
                    colour.mix(0.5).stroke_width(1),
                ))
                .map_err(draw_err)?
                .label(format!("{}: fp32 − 1 point", s.label))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.mix(0.5)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// One curve of [`write_lines`]: its legend and its (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Writes a line plot of `series` to `out` (`.svg`, 900 × 500), the axes from 0 to the largest
/// value (benchmarks: e.g. memory against clients).
pub fn write_lines(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    out: &Path,
) -> Result<(), PlotError> {
    if series.iter().all(|(_, p)| p.is_empty()) {
        return Err(PlotError::Empty);
    }
    if out.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(PlotError::Format(out.display().to_string()));
    }
    let root = SVGBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (x_max, y_max) = points.fold((1e-9f64, 1e-9f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .caption(title, ("sans-serif", 18))
        .build_cartesian_2d(0f64..x_max * 1.05, 0f64..y_max * 1.15)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(draw_err)?;
    let colours = [BLUE, RED, GREEN, MAGENTA, BLACK, CYAN];
    for (i, (label, data)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(data.clone(), colour.stroke_width(2)))
            .map_err(draw_err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
        chart
            .draw_series(data.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    model: &str,
    points: &[RoundPoint],
) -> Result<(), PlotError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let (top, bottom) = root.split_vertically(300);
    let lo = points.iter().map(|p| p.version).min().unwrap_or(0);
    let hi = points
        .iter()
        .map(|p| p.version)
        .max()
        .unwrap_or(1)
        .max(lo + 1);
    let xs = lo as f64..hi as f64;
    let acc_series = |f: fn(&RoundPoint) -> Option<f32>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| f(p).map(|a| (p.version as f64, f64::from(a))))
            .collect()
    };
    let kib = |f: fn(&RoundPoint) -> u64| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|p| (p.version as f64, f(p) as f64 / 1024.0))
            .collect()
    };
    let (up, down) = (kib(|p| p.uplink_bytes), kib(|p| p.downlink_bytes));
    let top_kib = up.iter().chain(&down).map(|p| p.1).fold(1e-3, f64::max) * 1.1;
    let panels = [
        (
            &top,
            format!("{model}: accuracy per version"),
            "accuracy",
            1.0,
            vec![
                ("held-out", BLUE, acc_series(|p| p.heldout_accuracy)),
                ("federated", RED, acc_series(|p| p.federated_accuracy)),
            ],
        ),
        (
            &bottom,
            "bytes per round (KiB)".to_string(),
            "KiB",
            top_kib,
            vec![("uplink", GREEN, up), ("downlink", MAGENTA, down)],
        ),
    ];
    for (area, caption, y_desc, y_max, curves) in panels {
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .caption(caption, ("sans-serif", 18))
            .build_cartesian_2d(xs.clone(), 0f64..y_max)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("version")
            .y_desc(y_desc)
            .draw()
            .map_err(draw_err)?;
        for (label, colour, data) in curves {
            chart
                .draw_series(LineSeries::new(data, colour.stroke_width(2)))
                .map_err(draw_err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points() -> Vec<RoundPoint> {
        (2..8)
            .map(|v| RoundPoint {
                version: v,
                heldout_accuracy: Some(0.1 * v as f32),
                federated_accuracy: (v > 2).then_some(0.09 * v as f32),
                uplink_bytes: 2000 + 100 * v,
                downlink_bytes: 9000 + 10 * v,
            })
            .collect()
    }

    #[test]
    fn writes_svg() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("p.svg");
        write("digits", &points(), &svg).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..40.min(s.len())]);
        for t in [
            "digits: accuracy per version",
            "federated",
            "uplink",
            "downlink",
        ] {
            assert!(s.contains(t), "{t} missing");
        }
        // Four curves.
        assert!(s.matches("<polyline").count() >= 4, "{s}");
        assert!(matches!(
            write("digits", &points(), &dir.path().join("p.png")),
            Err(PlotError::Format(_))
        ));
        assert!(matches!(write("digits", &[], &svg), Err(PlotError::Empty)));
    }

    #[test]
    fn tradeoff_svg_and_frontier() {
        let pts = vec![
            (9640.0, 0.95),
            (2400.0, 0.95),
            (600.0, 0.93),
            (700.0, 0.90),
            (150.0, 0.80),
        ];
        assert_eq!(
            frontier(&pts),
            vec![(150.0, 0.80), (600.0, 0.93), (2400.0, 0.95)]
        );
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("t.svg");
        let series = [TradeoffSeries {
            label: "sgd".into(),
            points: pts,
            reference: Some(0.94),
        }];
        write_tradeoff("digits uplink", "bytes per client per round", &series, &svg).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.contains("digits uplink") && s.contains("sgd"), "{s}");
        assert!(s.matches("<circle").count() >= 5, "{s}");
        assert!(matches!(
            write_tradeoff("x", "b", &[], &svg),
            Err(PlotError::Empty)
        ));
    }

    #[test]
    fn writes_a_line_plot() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("rss.svg");
        let series = vec![
            ("RSS".to_string(), vec![(100.0, 30.0), (1000.0, 31.0)]),
            ("peak RSS".to_string(), vec![(100.0, 35.0), (1000.0, 36.0)]),
        ];
        write_lines("memory against clients", "clients", "MiB", &series, &svg).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        for t in ["memory against clients", "peak RSS", "clients", "MiB"] {
            assert!(s.contains(t), "{t} missing");
        }
        assert!(s.matches("<polyline").count() >= 2, "{s}");
        assert!(matches!(
            write_lines("t", "x", "y", &[], &svg),
            Err(PlotError::Empty)
        ));
    }
}
