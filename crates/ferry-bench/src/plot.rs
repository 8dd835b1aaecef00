//! PNG line charts of benchmark results.
//!
//! Text is drawn with ab_glyph from a TTF read at run time, not with plotters'
//! default `ttf` feature, which needs fontconfig's development files to build.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Shipped by Debian's `fonts-dejavu-core`.
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (1024, 640);
// Distinct on white and for the common colour-vision deficiencies (Tableau 10).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    pub log_y: bool,
}

/// Draws `chart` as a 1024x640 PNG at `path` (parent directory must exist). Each series a
/// coloured line with point markers, legend in the upper-left, y axis from 0 (or log scale
/// when log_y, for values spanning orders of magnitude, e.g. scp 270 s vs ferry 5 s) with
/// 10% headroom, x axis spanning the data.
pub fn line_chart(path: &Path, chart: &Chart) -> Result<()> {
    register_sans()?;
    // A log axis cannot show y <= 0, and NaN/inf would poison the ranges.
    let series: Vec<(&str, Vec<(f64, f64)>)> = chart
        .series
        .iter()
        .map(|s| {
            let mut pts: Vec<_> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_y || *y > 0.0))
                .collect();
            // Callers may collect results out of order; a line must run left to right.
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (s.name.as_str(), pts)
        })
        .collect();
    let all = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (xs, ys) = (span(all().map(|p| p.0)), span(all().map(|p| p.1)));
    let x = match xs {
        Some((lo, hi)) if hi > lo => lo..hi,
        Some((v, _)) => v - 1.0..v + 1.0, // one distinct x: centre it
        None => 0.0..1.0,
    };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    if chart.log_y {
        let (lo, hi) = ys.unwrap_or((1.0, 10.0));
        let pad = 10f64.powf(0.1 * (hi.log10() - lo.log10()).max(0.5));
        // Plotters' log ticks start at a power of ten: keep one in range, or the axis has no numbers.
        let lo = if (lo / pad).log10().ceil() <= (hi * pad).log10() {
            lo / pad
        } else {
            10f64.powf(lo.log10().floor())
        };
        draw(&root, chart, &series, x, (lo..hi * pad).log_scale())?;
    } else {
        let (lo, hi) = ys.map_or((0.0, 1.0), |(lo, hi)| (lo.min(0.0), hi.max(0.0)));
        let (lo, hi) = if hi > lo {
            (lo * 1.1, hi * 1.1)
        } else {
            (0.0, 1.0)
        };
        draw(&root, chart, &series, x, lo..hi)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}

fn draw<Y>(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    chart: &Chart,
    series: &[(&str, Vec<(f64, f64)>)],
    x: Range<f64>,
    y: Y,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut ctx = ChartBuilder::on(root)
        .caption(chart.title, ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        ctx.draw_series(
            LineSeries::new(pts.iter().copied(), color.filled().stroke_width(2)).point_size(4),
        )?
        .label(*name)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    if !series.is_empty() {
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 18))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

fn span(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    vals.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Plotters' default prints f64 ticks with float noise ("0.30000000000000004").
fn tick(v: &f64) -> String {
    if *v != 0.0 && v.abs() < 1e-3 {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Registers the font once per process; plotters keeps a `&'static` to its bytes.
fn register_sans() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT_PATH).map_err(|e| {
            format!(
                "cannot read font {FONT_PATH}: {e}; install the Debian package fonts-dejavu-core"
            )
        })?;
        // Leaked once: register_font wants 'static bytes and the process needs them until exit.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        // Every plotters style defaults to "sans-serif", so one registration covers them all.
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT_PATH} is not a usable TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}
