//! Charts with plotters, each written as SVG and PNG: latency–throughput curves, percentile
//! spectrum, search trace and a rate heatmap over two knobs.
//!
//! The font (DejaVu Sans, `results/assets/`) is compiled in, so charts render the same on a CI
//! machine without fontconfig as on a laptop.

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 600);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        )
        .unwrap_or_else(|_| panic!("the bundled DejaVu Sans font loads"));
    });
}

fn e<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}

/// Colour of series `i` (a fixed qualitative palette, then plotters' own).
fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    P[i % P.len()]
}

/// One profile's points for the latency–throughput chart.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Legend name.
    pub label: String,
    /// (offered rate, p50, p95, p99), seconds, ascending rate.
    pub points: Vec<(f64, f64, f64, f64)>,
}

fn log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
    if lo > hi {
        (1e-3, 1.0)
    } else {
        (lo / 1.5, hi * 1.5)
    }
}

/// Writing a generic drawing function twice (once per backend) is what plotters' backend type
/// parameter asks for; this macro keeps it one definition.
macro_rules! both_backends {
    (|$root:ident| $body:block) => {
        (
            |$root: &DrawingArea<SVGBackend, Shift>| -> Result<(), String> { $body },
            |$root: &DrawingArea<BitMapBackend, Shift>| -> Result<(), String> { $body },
        )
    };
}

/// The chart frame every chart shares: title, margins, axis label room.
macro_rules! builder {
    ($root:expr, $title:expr, $y_area:expr) => {
        ChartBuilder::on($root)
            .caption($title, (FONT, 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size($y_area)
    };
}

/// The legend box every chart with series shares.
macro_rules! legend {
    ($chart:expr, $pos:expr) => {
        $chart
            .configure_series_labels()
            .position($pos)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)
    };
}

/// Draws one chart into `<stem>.svg` and `<stem>.png` with a pair of closures (SVG, PNG) built
/// by `both_backends!`; returns both paths.
fn render2<A, B>(stem: &Path, (svg_draw, png_draw): (A, B)) -> Result<Vec<PathBuf>, String>
where
    A: Fn(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
    B: Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
{
    register_font();
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    }
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        svg_draw(&root)?;
        root.present().map_err(e)?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        png_draw(&root)?;
        root.present().map_err(e)?;
    }
    Ok(vec![svg, png])
}

/// (1) Latency against offered rate: p50 (thin), p95 (medium), p99 (thick) per profile, one
/// colour per profile, log latency axis. Writes `<stem>.svg` and `<stem>.png`.
pub fn latency_throughput(
    stem: &Path,
    title: &str,
    curves: &[Curve],
) -> Result<Vec<PathBuf>, String> {
    latency_against(
        stem,
        title,
        ("offered rate (requests/s)", "latency (s)"),
        curves,
    )
}

/// (1b) The same chart with other axis names: a curve's first value is the x axis (e.g.
/// output tokens/s) and the three others a latency's p50, p95 and p99 (e.g. TTFT, TPOT).
pub fn latency_against(
    stem: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    curves: &[Curve],
) -> Result<Vec<PathBuf>, String> {
    let x_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 1.05;
    let (y_lo, y_hi) = log_bounds(
        curves
            .iter()
            .flat_map(|c| c.points.iter().flat_map(|p| [p.1, p.2, p.3])),
    );
    render2(
        stem,
        both_backends!(|root| {
            let mut chart = builder!(root, title, 70)
                .build_cartesian_2d(0.0..x_max, (y_lo..y_hi).log_scale())
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style((FONT, 14))
                .draw()
                .map_err(e)?;
            for (i, c) in curves.iter().enumerate() {
                let col = color(i);
                for (k, (name, width)) in
                    [("p50", 1), ("p95", 2), ("p99", 4)].into_iter().enumerate()
                {
                    let pts: Vec<(f64, f64)> = c
                        .points
                        .iter()
                        .map(|p| (p.0, [p.1, p.2, p.3][k]))
                        .filter(|p| p.1 > 0.0)
                        .collect();
                    chart
                        .draw_series(LineSeries::new(pts, col.stroke_width(width)))
                        .map_err(e)?
                        .label(format!("{} {name}", c.label))
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], col.stroke_width(width))
                        });
                }
            }
            legend!(chart, SeriesLabelPosition::UpperLeft)
        }),
    )
}

/// (2) Percentile spectrum: latency against 1/(1−p) on a log axis (so p50, p90, p99, p99.9 are
/// evenly spaced), one line per histogram (microseconds, as loadgen records them).
pub fn percentile_spectrum(
    stem: &Path,
    title: &str,
    series: &[(String, &Histogram<u64>)],
) -> Result<Vec<PathBuf>, String> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| {
            let top = (1.0 - 1.0 / h.len() as f64).clamp(0.5, 0.99999);
            let x_max = 1.0 / (1.0 - top);
            let pts = (0..=200)
                .map(|i| {
                    let x = x_max.powf(i as f64 / 200.0);
                    let p = 1.0 - 1.0 / x;
                    (x, h.value_at_quantile(p) as f64 / 1e6)
                })
                .collect();
            (name.clone(), pts)
        })
        .collect();
    let x_hi = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.0))
        .fold(10.0f64, f64::max);
    let (y_lo, y_hi) = log_bounds(lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)));
    render2(
        stem,
        both_backends!(|root| {
            let mut chart = builder!(root, title, 70)
                .build_cartesian_2d((1.0..x_hi).log_scale(), (y_lo..y_hi).log_scale())
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("percentile (1/(1-p): 2 = p50, 10 = p90, 100 = p99, 1000 = p99.9)")
                .y_desc("latency (s)")
                .label_style((FONT, 14))
                .draw()
                .map_err(e)?;
            for (i, (name, pts)) in lines.iter().enumerate() {
                let col = color(i);
                chart
                    .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                    .map_err(e)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], col.stroke_width(2))
                    });
            }
            legend!(chart, SeriesLabelPosition::UpperLeft)
        }),
    )
}

/// (3) Search trace: each trial's sustainable rate (dots) and the best so far (line), one colour
/// per strategy.
pub fn search_trace(
    stem: &Path,
    title: &str,
    strategies: &[(String, Vec<f64>)],
) -> Result<Vec<PathBuf>, String> {
    let n = strategies
        .iter()
        .map(|s| s.1.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let y_hi = strategies
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(1.0f64, f64::max)
        * 1.1;
    render2(
        stem,
        both_backends!(|root| {
            let mut chart = builder!(root, title, 70)
                .build_cartesian_2d(0.5..n as f64 + 0.5, 0.0..y_hi)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("trial")
                .y_desc("sustainable rate (requests/s)")
                .label_style((FONT, 14))
                .draw()
                .map_err(e)?;
            for (i, (name, rates)) in strategies.iter().enumerate() {
                let col = color(i);
                chart
                    .draw_series(
                        rates
                            .iter()
                            .enumerate()
                            .map(|(t, r)| Circle::new((t as f64 + 1.0, *r), 4, col.filled())),
                    )
                    .map_err(e)?;
                let mut best = 0.0f64;
                let line: Vec<(f64, f64)> = rates
                    .iter()
                    .enumerate()
                    .map(|(t, r)| {
                        best = best.max(*r);
                        (t as f64 + 1.0, best)
                    })
                    .collect();
                chart
                    .draw_series(LineSeries::new(line, col.stroke_width(2)))
                    .map_err(e)?
                    .label(format!("{name} (best so far)"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], col.stroke_width(2))
                    });
            }
            legend!(chart, SeriesLabelPosition::LowerRight)
        }),
    )
}

/// A value grid for [`heatmap`]: `values[y][x]`, `None` where nothing was measured.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Column labels (e.g. batch sizes).
    pub x_labels: Vec<String>,
    /// Row labels (e.g. wait timeouts).
    pub y_labels: Vec<String>,
    /// Axis names.
    pub x_name: String,
    /// Axis names.
    pub y_name: String,
    /// Cell values.
    pub values: Vec<Vec<Option<f64>>>,
}

/// (4) Heatmap of a value (sustainable rate) over two knobs, each cell labelled with its value.
pub fn heatmap(stem: &Path, title: &str, g: &Grid) -> Result<Vec<PathBuf>, String> {
    let nx = g.x_labels.len().max(1);
    let ny = g.y_labels.len().max(1);
    let vmax = g
        .values
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |a, b| a.max(*b))
        .max(1e-9);
    render2(
        stem,
        both_backends!(|root| {
            let mut chart = builder!(root, title, 90)
                .build_cartesian_2d(0.0..nx as f64, 0.0..ny as f64)
                .map_err(e)?;
            let xl = |v: &f64| {
                let i = (*v - 0.5).round();
                if (v - (i + 0.5)).abs() < 1e-6 && i >= 0.0 {
                    g.x_labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            };
            let yl = |v: &f64| {
                let i = (*v - 0.5).round();
                if (v - (i + 0.5)).abs() < 1e-6 && i >= 0.0 {
                    g.y_labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(2 * nx + 1)
                .y_labels(2 * ny + 1)
                .x_label_formatter(&xl)
                .y_label_formatter(&yl)
                .x_desc(g.x_name.as_str())
                .y_desc(g.y_name.as_str())
                .label_style((FONT, 14))
                .draw()
                .map_err(e)?;
            for (y, row) in g.values.iter().enumerate() {
                for (x, v) in row.iter().enumerate() {
                    let (x0, y0) = (x as f64, y as f64);
                    let fill = match v {
                        Some(v) => HSLColor(0.33 * (v / vmax), 0.65, 0.45 + 0.1 * (1.0 - v / vmax))
                            .filled(),
                        None => RGBColor(235, 235, 235).filled(),
                    };
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(x0, y0), (x0 + 1.0, y0 + 1.0)],
                            fill,
                        )))
                        .map_err(e)?;
                    let text = v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into());
                    chart
                        .draw_series(std::iter::once(Text::new(
                            text,
                            (x0 + 0.38, y0 + 0.55),
                            (FONT, 14).into_font().color(&BLACK),
                        )))
                        .map_err(e)?;
                }
            }
            Ok(())
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(svg: &Path, needle: &str) -> usize {
        std::fs::read_to_string(svg)
            .unwrap()
            .matches(needle)
            .count()
    }

    /// Text elements whose content is exactly `s` (the SVG backend writes content on its own line).
    fn texts(svg: &Path, s: &str) -> usize {
        std::fs::read_to_string(svg)
            .unwrap()
            .lines()
            .filter(|l| l.trim() == s)
            .count()
    }

    /// Polylines drawn in a series colour (axes and ticks are black): each series draws one,
    /// and its legend entry one more.
    fn series_lines(svg: &Path) -> usize {
        let text = std::fs::read_to_string(svg).unwrap();
        let palette: Vec<String> = (0..8)
            .map(|i| {
                let c = color(i);
                format!("stroke=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2)
            })
            .collect();
        text.split("<polyline")
            .skip(1)
            .filter(|p| {
                let tag = &p[..p.find('>').unwrap_or(p.len())];
                palette.iter().any(|c| tag.contains(c.as_str()))
            })
            .count()
    }

    #[test]
    fn latency_chart_has_three_lines_per_profile_and_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let curves: Vec<Curve> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, name)| Curve {
                label: name.to_string(),
                points: (1..=5)
                    .map(|r| {
                        let x = r as f64 * 10.0;
                        let base = 0.01 * (1 + i) as f64 * r as f64;
                        (x, base, base * 2.0, base * 3.0)
                    })
                    .collect(),
            })
            .collect();
        let files = latency_throughput(&dir.path().join("lt"), "t", &curves).unwrap();
        for f in &files {
            assert!(
                std::fs::metadata(f).unwrap().len() > 1000,
                "{f:?} is too small"
            );
        }
        let svg = &files[0];
        // One polyline per series, plus one per legend entry.
        assert_eq!(series_lines(svg), 2 * 6);
        assert_eq!(texts(svg, "a p95"), 1);
        assert_eq!(texts(svg, "b p99"), 1);
    }

    #[test]
    fn spectrum_trace_and_heatmap_render() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = crate::hist::new_hist();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let files = percentile_spectrum(
            &dir.path().join("sp"),
            "s",
            &[("x".into(), &h), ("y".into(), &h)],
        )
        .unwrap();
        assert_eq!(series_lines(&files[0]), 2 * 2);
        let files = search_trace(
            &dir.path().join("tr"),
            "t",
            &[
                ("nelder-mead".into(), vec![10.0, 30.0, 20.0]),
                ("random".into(), vec![5.0, 8.0]),
            ],
        )
        .unwrap();
        assert_eq!(series_lines(&files[0]), 2 * 2);
        assert_eq!(count(&files[0], "<circle"), 5);
        let g = Grid {
            x_labels: vec!["1".into(), "8".into(), "64".into()],
            y_labels: vec!["1ms".into(), "10ms".into()],
            x_name: "max_batch_size".into(),
            y_name: "batch_wait_timeout".into(),
            values: vec![
                vec![Some(10.0), Some(50.0), None],
                vec![Some(12.0), Some(87.0), Some(90.0)],
            ],
        };
        let files = heatmap(&dir.path().join("hm"), "h", &g).unwrap();
        assert_eq!(texts(&files[0], "87"), 1);
        assert_eq!(texts(&files[0], "–"), 1, "one unmeasured cell");
        assert!(std::fs::metadata(&files[1]).unwrap().len() > 1000);
    }
}
