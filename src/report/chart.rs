//! `report --chart FILE.svg`: five panels over the run's time — items per second, items per
//! request, concurrency (the controller's limit and the calls in flight), 429s, cumulative
//! cost — drawn with plotters' SVG backend. Text stays `<text>` elements: no fonts are loaded.

use plotters::prelude::*;

use super::timeline::{Bucket, Timeline};

/// The series drawn, with their stroke colours (tests find them by colour).
pub const SERIES: &[(&str, RGBColor)] = &[
    ("items/s", RGBColor(0x1f, 0x77, 0xb4)),
    ("items per request", RGBColor(0xff, 0x7f, 0x0e)),
    ("concurrency limit", RGBColor(0x2c, 0xa0, 0x2c)),
    ("calls in flight", RGBColor(0x94, 0x67, 0xbd)),
    ("429s", RGBColor(0xd6, 0x27, 0x28)),
    ("cumulative cost (USD)", RGBColor(0x8c, 0x56, 0x4b)),
];

/// Panels: a caption, the series (by index into [`SERIES`]) it holds, and whether it counts
/// whole things (its axis then has whole-number ticks).
const PANELS: &[(&str, &[usize], bool)] = &[
    ("items/s", &[0], false),
    ("items per request", &[1], true),
    ("concurrency: limit and calls in flight", &[2, 3], true),
    ("429s per bucket", &[4], true),
    ("cumulative cost (USD)", &[5], false),
];

const WIDTH: u32 = 960;
const PANEL_HEIGHT: u32 = 220;

/// One series' points. The controller's settings (items per request, concurrency limit) hold
/// until the next request shows them changed, so buckets without requests repeat the last one.
fn points(buckets: &[Bucket], series: usize) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    buckets
        .iter()
        .map(|b| {
            let y = match series {
                0 => b.items_per_second,
                1 => b.items_per_request.unwrap_or(last),
                2 => b.concurrency_limit.map(f64::from).unwrap_or(last),
                3 => b.in_flight,
                4 => b.rate_limited as f64,
                _ => b.cumulative_cost_usd,
            };
            last = y;
            (b.start_s, y)
        })
        .collect()
}

/// The SVG document for `timeline`, titled `title`.
pub fn render_svg(timeline: &Timeline, title: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!timeline.buckets.is_empty(), "the run has no calls to chart yet");
    let mut svg = String::new();
    let height = 40 + PANEL_HEIGHT * PANELS.len() as u32;
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(draw_error)?;
        let x_max = timeline.span_seconds() as f64;
        let x_desc = if timeline.reads_by_clock() {
            format!("time (UTC; buckets of {})", bucket_width(timeline.bucket_seconds))
        } else {
            format!("seconds (buckets of {})", bucket_width(timeline.bucket_seconds))
        };
        let x_label = |v: &f64| if timeline.reads_by_clock() { timeline.clock(*v) } else { format!("{v:.0}") };
        for (area, (caption, series, counts)) in root.split_evenly((PANELS.len(), 1)).iter().zip(PANELS) {
            let lines: Vec<Vec<(f64, f64)>> = series.iter().map(|s| points(&timeline.buckets, *s)).collect();
            let y_max = lines.iter().flatten().map(|p| p.1).fold(0.0f64, f64::max);
            let y_max = match (*counts, y_max > 0.0) {
                // Whole numbers: the axis ends on one, with a tick on each when there are few.
                (true, _) => (y_max * 1.1).ceil().max(1.0),
                (false, true) => y_max * 1.1,
                (false, false) => 1.0,
            };
            let y_labels = if *counts && y_max <= 10.0 { y_max as usize + 1 } else { 10 };
            let mut chart = ChartBuilder::on(area)
                .caption(*caption, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(34)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)
                .map_err(draw_error)?;
            chart
                .configure_mesh()
                .x_desc(x_desc.as_str())
                .x_label_formatter(&x_label)
                .y_labels(y_labels)
                .y_label_formatter(&|v| if *counts { format!("{v:.0}") } else { label(*v, y_max) })
                .light_line_style(WHITE)
                .draw()
                .map_err(draw_error)?;
            for (&s, line) in series.iter().zip(lines) {
                let (name, color) = SERIES[s];
                chart
                    .draw_series(LineSeries::new(line, color.stroke_width(2)))
                    .map_err(draw_error)?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// "30 s", "5 min", "2 h".
pub fn bucket_width(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Axis labels with as many decimals as the scale needs (costs can be fractions of a cent).
fn label(v: f64, max: f64) -> String {
    let decimals = if max >= 10.0 { 0 } else { ((-max.log10()).ceil() as i32 + 2).clamp(1, 8) as usize };
    format!("{v:.decimals$}")
}

fn draw_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart failed: {e:?}")
}
