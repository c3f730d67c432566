//! `loss.svg`: train and validation loss against step (left) and against wall-clock
//! time (right), drawn with plotters' SVG backend.
//!
//! Invariant: time is the cumulative sum of each step's `wall_s` (the whole step on rank 0,
//! evaluation included), so a resumed run's time axis has no gap for the downtime.

use super::plot_err;
use super::run::{Run, StepRecord};
use crate::error::Result;
use plotters::prelude::*;

const TRAIN: RGBColor = RGBColor(0x4e, 0x79, 0xa7);
const VAL: RGBColor = RGBColor(0xf2, 0x8e, 0x2b);

/// One panel's x values: step numbers or elapsed time.
struct Axis {
    desc: String,
    xs: Vec<f64>,
}

fn step_axis(steps: &[StepRecord]) -> Axis {
    Axis {
        desc: "step".into(),
        xs: steps.iter().map(|s| s.step as f64).collect(),
    }
}

fn time_axis(steps: &[StepRecord]) -> Axis {
    let mut t = 0.0;
    let secs: Vec<f64> = steps
        .iter()
        .map(|s| {
            t += s.wall_s.unwrap_or(s.step_s);
            t
        })
        .collect();
    let (unit, scale) = if t >= 180.0 {
        ("minutes", 60.0)
    } else {
        ("seconds", 1.0)
    };
    Axis {
        desc: format!("wall-clock time ({unit})"),
        xs: secs.into_iter().map(|x| x / scale).collect(),
    }
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Renders the two panels as one SVG document.
pub fn loss_svg(run: &Run) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (left, right) = root.split_horizontally(600);
        let losses = run
            .steps
            .iter()
            .flat_map(|s| std::iter::once(s.loss).chain(s.val_loss));
        let y = range(losses);
        for (area, axis) in [
            (left, step_axis(&run.steps)),
            (right, time_axis(&run.steps)),
        ] {
            panel(&area, run, &axis, y)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    run: &Run,
    axis: &Axis,
    (y0, y1): (f64, f64),
) -> Result<()> {
    let (x0, mut x1) = range(axis.xs.iter().copied());
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let title = format!("loss against {}", axis.desc.split(' ').next().unwrap_or(""));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    let integer = axis.desc == "step";
    let x_fmt = |x: &f64| {
        if integer {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(axis.desc.as_str())
        .x_label_formatter(&x_fmt)
        .y_desc("cross-entropy (nats)")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_err)?;
    let train: Vec<(f64, f64)> = axis
        .xs
        .iter()
        .zip(&run.steps)
        .map(|(&x, s)| (x, s.loss))
        .filter(|p| p.1.is_finite())
        .collect();
    let val: Vec<(f64, f64)> = axis
        .xs
        .iter()
        .zip(&run.steps)
        .filter_map(|(&x, s)| Some((x, s.val_loss?)))
        .filter(|p| p.1.is_finite())
        .collect();
    chart
        .draw_series(LineSeries::new(train, TRAIN.stroke_width(1)))
        .map_err(plot_err)?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN.stroke_width(2)));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.clone(), VAL.stroke_width(2)))
            .map_err(plot_err)?
            .label("val loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], VAL.stroke_width(2)));
        chart
            .draw_series(val.iter().map(|&p| Circle::new(p, 3, VAL.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}
