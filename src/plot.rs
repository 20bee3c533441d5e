//! `dsa-train plot`: draw a run's `metrics.jsonl` as one PNG of small panels (indexer KL, LM
//! loss, gradient norm, learning rate, throughput, tokens seen), each against the step, with
//! the warm-up and sparse stages in different colours.
//!
//! Rendering is plotters' bitmap backend into a memory buffer, encoded by the `png` crate.
//! Text goes through plotters' `ab_glyph` feature with DejaVu Sans compiled in (the `dejavu`
//! crate; the Bitstream Vera / DejaVu licence allows redistribution), so plotting needs no
//! system fonts, fontconfig or freetype and looks the same on every machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Size of the PNG `plot_metrics` writes, in pixels.
pub const PLOT_WIDTH: u32 = 1500;
pub const PLOT_HEIGHT: u32 = 900;

/// A logged step's stage (as metrics.jsonl spells it), in plotting order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Dense,
    Warmup,
    Sparse,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Warmup => "warm-up (dense)",
            Stage::Sparse => "sparse",
            Stage::Dense => "dense pre-training",
        }
    }

    fn color(self) -> RGBColor {
        match self {
            Stage::Warmup => RGBColor(230, 120, 20),
            Stage::Sparse => RGBColor(30, 90, 200),
            Stage::Dense => RGBColor(40, 150, 60),
        }
    }
}

/// One line of metrics.jsonl. Numbers that a line leaves out (or writes as null, as the
/// warm-up does for `lm_loss`) are None and leave a gap in their panel.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRecord {
    pub step: u64,
    pub stage: Stage,
    pub lm_loss: Option<f64>,
    pub indexer_kl: Option<f64>,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens: Option<f64>,
    pub tokens_per_s: Option<f64>,
}

/// Read metrics.jsonl, one record per stage and step, in stage order (dense, warm-up, sparse)
/// and then step order: the stages of a pipeline may each count their steps from 1 (the files
/// of its runs concatenated). A step of a stage logged twice (a run resumed from an earlier
/// checkpoint logs its steps again) keeps its last line. Blank lines are skipped; any other
/// line must be a JSON object with an integer `step` and a known `stage`.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics file {}", path.display()))?;
    let mut by_step = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = match parse_line(line) {
            Ok(r) => r,
            // A run killed mid-write leaves its last line torn (no newline after it): that line
            // alone is skipped, with a warning. Anywhere else a bad line is an error.
            Err(e) if i + 1 == lines.len() && !text.ends_with('\n') => {
                crate::elog!(
                    "[plot] warning: {} line {}: skipped a torn last line ({e})",
                    path.display(),
                    i + 1
                );
                continue;
            }
            Err(e) => return Err(e.context(format!("{} line {}", path.display(), i + 1))),
        };
        by_step.insert((r.stage, r.step), r);
    }
    if by_step.is_empty() {
        bail!("metrics file {} holds no records", path.display());
    }
    Ok(by_step.into_values().collect())
}

fn parse_line(line: &str) -> Result<MetricsRecord> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON: {e}"))?;
    let o = v.as_object().context("not a JSON object")?;
    let step = match o.get("step") {
        None | Some(serde_json::Value::Null) => bail!("no \"step\""),
        Some(s) => s
            .as_u64()
            .with_context(|| format!("\"step\" is {s}, not a non-negative integer"))?,
    };
    let stage = match o.get("stage").and_then(|s| s.as_str()) {
        Some("warmup") => Stage::Warmup,
        Some("sparse") => Stage::Sparse,
        Some("dense") => Stage::Dense,
        _ => bail!(
            "\"stage\" is {}, expected \"warmup\", \"sparse\" or \"dense\"",
            o.get("stage").unwrap_or(&serde_json::Value::Null)
        ),
    };
    let num = |key: &str| -> Result<Option<f64>> {
        match o.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .with_context(|| format!("\"{key}\" is {x}, not a number")),
        }
    };
    Ok(MetricsRecord {
        step,
        stage,
        lm_loss: num("lm_loss")?,
        indexer_kl: num("indexer_kl")?,
        lr: num("lr")?,
        grad_norm: num("grad_norm")?,
        tokens: num("tokens")?,
        tokens_per_s: num("tokens_per_s")?,
    })
}

/// Draw `metrics` (a run's metrics.jsonl) into the PNG `out_png`, PLOT_WIDTH x PLOT_HEIGHT.
/// The file is written under a temporary name and renamed, so a viewer that reloads it while
/// a run re-plots never sees half an image.
pub fn plot_metrics(metrics: &Path, out_png: &Path) -> Result<()> {
    // The PNG replaces a regular file only (never a device, pipe or symlink's target).
    if let Ok(meta) = out_png.symlink_metadata() {
        if !meta.is_file() {
            bail!(
                "--output {} exists and is not a regular file",
                out_png.display()
            );
        }
    }
    let records = read_metrics(metrics)?;
    let rgb = render(&records, &metrics.display().to_string())?;
    let tmp = out_png.with_extension("png.partial");
    if let Err(e) = write_png(&tmp, &rgb, PLOT_WIDTH, PLOT_HEIGHT) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out_png)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out_png.display()))
}

type Getter = fn(&MetricsRecord) -> Option<f64>;

/// Panel title, value, and whether a wide positive range may use a log axis (learning rates
/// span 1e-3 in the warm-up to 1e-5 in the sparse stage; on a linear axis the second is 0).
const PANELS: [(&str, Getter, bool); 6] = [
    ("indexer KL", |r| r.indexer_kl, true),
    ("LM loss", |r| r.lm_loss, true),
    ("gradient norm", |r| r.grad_norm, true),
    ("learning rate", |r| r.lr, true),
    ("tokens / s", |r| r.tokens_per_s, false),
    ("tokens seen", |r| r.tokens, false),
];

/// A positive series whose largest value is at least this many times its smallest is drawn
/// on a log axis (when its panel allows it).
const LOG_AXIS_RATIO: f64 = 20.0;

/// Render to an RGB8 buffer.
fn render(records: &[MetricsRecord], source: &str) -> Result<Vec<u8>> {
    register_fonts()?;
    let mut buf = vec![0u8; (PLOT_WIDTH * PLOT_HEIGHT * 3) as usize];
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (title, body) = root.split_vertically(40);
        draw_heading(&title, records, source)?;
        // Every panel spans the whole run, so the stages line up from panel to panel.
        let xs = x_positions(records);
        let steps = padded_range(xs.iter().copied(), 0.0);
        for (area, (name, get, may_log)) in body.split_evenly((2, 3)).iter().zip(PANELS) {
            let points: Vec<(Stage, f64, f64)> = records
                .iter()
                .zip(&xs)
                .filter_map(|(r, &x)| get(r).filter(|v| v.is_finite()).map(|v| (r.stage, x, v)))
                .collect();
            // Zeros (a schedule that starts or ends at lr 0) have no place on a log axis and
            // are left out of it; the caption says so.
            let positive: Vec<(Stage, f64, f64)> =
                points.iter().copied().filter(|p| p.2 > 0.0).collect();
            let (lo, hi) = positive.iter().fold((f64::INFINITY, 0f64), |(lo, hi), p| {
                (lo.min(p.2), hi.max(p.2))
            });
            if may_log && !positive.is_empty() && hi >= LOG_AXIS_RATIO * lo {
                let y = (lo / 1.25..hi * 1.25).log_scale();
                let dropped = points.len() - positive.len();
                let caption = match dropped {
                    0 => format!("{name} (log scale)"),
                    n => format!("{name} (log scale, {n} zero or negative omitted)"),
                };
                draw_panel(area, &caption, &positive, steps, y)?;
            } else {
                let (y0, y1) = padded_range(points.iter().map(|p| p.2), 0.05);
                draw_panel(area, name, &points, steps, y0..y1)?;
            }
        }
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

/// The file name and extent of the run on the left, the stage colours on the right (one
/// legend for all panels, so none covers a curve).
fn draw_heading<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    records: &[MetricsRecord],
    source: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let last = records
        .last()
        .expect("read_metrics returns at least one record");
    let heading = format!(
        "{source}: steps logged {}, last step {}",
        records.len(),
        last.step
    );
    let font = ("sans-serif", 20).into_font();
    area.draw_text(&heading, &font.color(&BLACK), (16, 12))
        .map_err(draw_err)?;
    let mut x = PLOT_WIDTH as i32 - 560;
    for stage in [Stage::Dense, Stage::Warmup, Stage::Sparse] {
        let y = 22;
        area.draw(&PathElement::new(
            vec![(x, y), (x + 28, y)],
            stage.color().stroke_width(4),
        ))
        .map_err(draw_err)?;
        area.draw_text(stage.label(), &font.color(&BLACK), (x + 36, 12))
            .map_err(draw_err)?;
        x += 190;
    }
    Ok(())
}

fn draw_panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    name: &str,
    points: &[(Stage, f64, f64)],
    steps: (f64, f64),
    y: Y,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let caption = if points.is_empty() {
        format!("{name}: no data")
    } else {
        name.to_string()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(steps.0..steps.1, y)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| format_tick(*v))
        .y_label_formatter(&|v| format_tick(*v))
        .label_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    for stage in [Stage::Dense, Stage::Warmup, Stage::Sparse] {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 == stage)
            .map(|p| (p.1, p.2))
            .collect();
        let color = stage.color();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(draw_err)?;
        // Markers keep short runs (a single logged step draws no line) visible.
        if pts.len() <= 40 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_err)?;
        }
    }
    Ok(())
}

/// The values' range widened by `pad` of its width on each side; never empty, so a single
/// point or a constant series still gets an axis.
/// The x position of each record (in `read_metrics` order): its step, shifted past the
/// previous stages' last position when its stage counts its steps from the start again.
pub fn x_positions(records: &[MetricsRecord]) -> Vec<f64> {
    let (mut offset, mut last, mut stage) = (0.0, f64::NEG_INFINITY, None);
    records
        .iter()
        .map(|r| {
            if stage != Some(r.stage) {
                stage = Some(r.stage);
                if r.step as f64 + offset <= last {
                    offset = last;
                }
            }
            last = r.step as f64 + offset;
            last
        })
        .collect()
}

fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi == lo {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - half, hi + half);
    }
    let w = hi - lo;
    (lo - pad * w, hi + pad * w)
}

/// Tick labels short enough for a small panel: learning rates (1e-4) and throughputs (1e5)
/// in scientific notation, everything else with up to four significant digits.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// Register the embedded font under the family name every text style here uses (once per
/// process: plotters keeps a global table).
fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if !*REGISTERED.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
    }) {
        bail!("the embedded DejaVu Sans font could not be parsed");
    }
    Ok(())
}

fn draw_err<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot failed: {e}")
}

fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.write_image_data(rgb)
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.finish()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short_in_every_magnitude() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(3e-4), "3.0e-4");
        assert_eq!(format_tick(2.5), "2.5");
        assert_eq!(format_tick(120.0), "120");
        assert_eq!(format_tick(250000.0), "2.5e5");
    }

    #[test]
    fn ranges_are_never_empty() {
        let (lo, hi) = padded_range([2.0].into_iter(), 0.05);
        assert!(lo < 2.0 && hi > 2.0);
        let (lo, hi) = padded_range([0.0, 0.0].into_iter(), 0.05);
        assert!(lo < 0.0 && hi > 0.0);
        let (lo, hi) = padded_range(std::iter::empty(), 0.05);
        assert!(lo < hi);
        assert_eq!(padded_range([1.0, 3.0].into_iter(), 0.5), (0.0, 4.0));
    }
}
