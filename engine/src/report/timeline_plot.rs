//! `timeline.svg`: the measured per-rank timeline of the traced steps (trace.json), one
//! row per rank, one box per span, coloured like `strata simulate`'s predicted timeline
//! (F blue, B red, I orange, W green; partitioner::schedule::kind_colour), with waits,
//! sends, the optimizer and evaluation in their own colours and each rank's idle share.
//!
//! Invariant: time is relative to the earliest span; ranks share one clock (trace.json
//! holds wall-clock times of one machine).

use super::plot_err;
use super::run::Span;
use crate::error::Result;
use partitioner::schedule::kind_colour;
use partitioner::ActionKind;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// What a span shows, in legend order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Forward,
    Backward,
    InputGrad,
    WeightGrad,
    Send,
    Wait,
    Optimizer,
    Eval,
    Other,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::Forward,
        Kind::Backward,
        Kind::InputGrad,
        Kind::WeightGrad,
        Kind::Send,
        Kind::Wait,
        Kind::Optimizer,
        Kind::Eval,
        Kind::Other,
    ];

    /// The kind of a trace span, from its name (`F mb=3 chunk=1`, `wait RECV_F …`,
    /// `SEND_B …`, `optimizer`, `eval`); None for the whole-step envelopes.
    fn of(span: &Span) -> Option<Kind> {
        if span.cat == "step" {
            return None;
        }
        Some(match span.name.split_whitespace().next().unwrap_or("") {
            "F" => Kind::Forward,
            "B" => Kind::Backward,
            "I" => Kind::InputGrad,
            "W" => Kind::WeightGrad,
            "wait" => Kind::Wait,
            s if s.starts_with("SEND_") => Kind::Send,
            "optimizer" => Kind::Optimizer,
            "eval" => Kind::Eval,
            _ => Kind::Other,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Forward => "F forward",
            Kind::Backward => "B backward",
            Kind::InputGrad => "I input-grad",
            Kind::WeightGrad => "W weight-grad",
            Kind::Send => "send",
            Kind::Wait => "wait (receive)",
            Kind::Optimizer => "optimizer",
            Kind::Eval => "evaluation",
            Kind::Other => "other",
        }
    }

    fn colour(self) -> RGBColor {
        let hex = match self {
            Kind::Forward => kind_colour(ActionKind::Forward),
            Kind::Backward => kind_colour(ActionKind::Backward),
            Kind::InputGrad => kind_colour(ActionKind::InputGrad),
            Kind::WeightGrad => kind_colour(ActionKind::WeightGrad),
            Kind::Send => kind_colour(ActionKind::SendAct),
            Kind::Wait => "#e3e3e3",
            Kind::Optimizer => "#b07aa1",
            Kind::Eval => "#76b7b2",
            Kind::Other => "#9c755f",
        };
        parse_hex(hex)
    }
}

fn parse_hex(hex: &str) -> RGBColor {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap_or(0x808080);
    RGBColor((v >> 16) as u8, (v >> 8) as u8, v as u8)
}

/// `1F3` (chunk, kind, microbatch) for a compute span named `F mb=3 chunk=1`.
fn box_label(span: &Span) -> Option<String> {
    let mut parts = span.name.split_whitespace();
    let kind = parts.next()?;
    let mut mb = None;
    let mut chunk = None;
    for p in parts {
        if let Some(v) = p.strip_prefix("mb=") {
            mb = Some(v);
        } else if let Some(v) = p.strip_prefix("chunk=") {
            chunk = Some(v);
        }
    }
    Some(format!("{}{kind}{}", chunk?, mb?))
}

/// Each rank's idle share over the traced steps: waits / whole steps.
pub fn idle_shares(spans: &[Span], world: usize) -> Vec<f64> {
    let mut wait = vec![0.0; world];
    let mut total = vec![0.0; world];
    for s in spans.iter().filter(|s| s.tid < world) {
        match Kind::of(s) {
            None => total[s.tid] += s.dur,
            Some(Kind::Wait) => wait[s.tid] += s.dur,
            _ => {}
        }
    }
    wait.iter()
        .zip(&total)
        .map(|(w, t)| if *t > 0.0 { w / t } else { 0.0 })
        .collect()
}

const WIDTH: u32 = 1400;
const ROW: u32 = 46;

/// Renders the spans; None when there are none.
pub fn timeline_svg(spans: &[Span], title: &str) -> Result<Option<String>> {
    let world = spans.iter().map(|s| s.tid + 1).max().unwrap_or(0);
    let shown: Vec<(&Span, Kind)> = spans
        .iter()
        .filter_map(|s| Some((s, Kind::of(s)?)))
        .collect();
    if shown.is_empty() {
        return Ok(None);
    }
    let t0 = spans.iter().map(|s| s.ts).fold(f64::INFINITY, f64::min);
    let t1 = spans.iter().map(|s| s.ts + s.dur).fold(0.0, f64::max);
    let ms = |us: f64| (us - t0) / 1e3;
    let idle = idle_shares(spans, world);
    let height = 110 + ROW * world as u32 + 40;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, legend) = root.split_vertically(height - 40);
        let y_of = |rank: usize| (world - 1 - rank) as f64;
        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(150)
            .build_cartesian_2d(0.0..ms(t1).max(1e-3), -0.5..world as f64 - 0.5)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("time (ms)")
            .y_labels(2 * world + 1)
            .y_label_formatter(&|y| {
                let r = world as f64 - 1.0 - y;
                if (r - r.round()).abs() < 1e-6 && r >= -0.1 {
                    let r = r.round() as usize;
                    format!("rank {r} ({:.0}% idle)", 100.0 * idle[r])
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(plot_err)?;
        let px_per_ms = f64::from(WIDTH - 190) / ms(t1).max(1e-3);
        for (span, kind) in &shown {
            let (x0, x1) = (ms(span.ts), ms(span.ts + span.dur));
            let y = y_of(span.tid);
            let (h0, h1) = if *kind == Kind::Wait {
                (y - 0.18, y + 0.18)
            } else {
                (y - 0.38, y + 0.38)
            };
            chart
                .draw_series([
                    Rectangle::new([(x0, h0), (x1, h1)], kind.colour().filled()),
                    Rectangle::new([(x0, h0), (x1, h1)], WHITE.stroke_width(1)),
                ])
                .map_err(plot_err)?;
            let compute = matches!(
                kind,
                Kind::Forward | Kind::Backward | Kind::InputGrad | Kind::WeightGrad
            );
            if compute && (x1 - x0) * px_per_ms > 26.0 {
                if let Some(label) = box_label(span) {
                    let style = ("sans-serif", 11)
                        .into_font()
                        .color(&WHITE)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    chart
                        .draw_series(std::iter::once(Text::new(
                            label,
                            (0.5 * (x0 + x1), y),
                            style,
                        )))
                        .map_err(plot_err)?;
                }
            }
        }
        draw_legend(&legend, &shown)?;
        root.present().map_err(plot_err)?;
    }
    Ok(Some(svg))
}

fn draw_legend(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    shown: &[(&Span, Kind)],
) -> Result<()> {
    let mut x = 160;
    for kind in Kind::ALL {
        if !shown.iter().any(|(_, k)| *k == kind) {
            continue;
        }
        area.draw(&Rectangle::new(
            [(x, 8), (x + 14, 22)],
            kind.colour().filled(),
        ))
        .map_err(plot_err)?;
        area.draw(&Text::new(kind.label(), (x + 19, 10), ("sans-serif", 13)))
            .map_err(plot_err)?;
        x += 130;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, cat: &str, tid: usize, ts: f64, dur: f64) -> Span {
        Span {
            name: name.into(),
            cat: cat.into(),
            ph: "X".into(),
            ts,
            dur,
            tid,
        }
    }

    #[test]
    fn kinds_labels_and_idle_share() {
        let spans = vec![
            span("step 2", "step", 0, 0.0, 100.0),
            span("F mb=3 chunk=1", "compute", 0, 0.0, 40.0),
            span("wait RECV_B mb=0 chunk=1", "comm", 0, 40.0, 25.0),
            span("SEND_F mb=0 chunk=0", "comm", 0, 65.0, 5.0),
            span("optimizer", "compute", 0, 70.0, 30.0),
        ];
        let kinds: Vec<Option<Kind>> = spans.iter().map(Kind::of).collect();
        assert_eq!(
            kinds,
            [
                None,
                Some(Kind::Forward),
                Some(Kind::Wait),
                Some(Kind::Send),
                Some(Kind::Optimizer)
            ]
        );
        assert_eq!(box_label(&spans[1]).as_deref(), Some("1F3"));
        assert_eq!(idle_shares(&spans, 1), vec![0.25]);
        assert_eq!(Kind::Forward.colour(), RGBColor(0x4e, 0x79, 0xa7));
        let svg = timeline_svg(&spans, "t").unwrap().unwrap();
        assert!(svg.contains("rank 0 (25% idle)"), "{svg}");
        assert!(svg.contains("#4E79A7") || svg.contains("#4e79a7"), "{svg}");
    }
}
