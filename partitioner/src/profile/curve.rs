//! Measured cost curves: seconds against message bytes, as `strata profile` records them
//! for point-to-point messages and collectives.
//!
//! A [`Curve`] is a list of `(bytes, seconds)` points. Between two points it is linear;
//! below the smallest message it is the smallest message's time (latency dominates);
//! beyond the largest it continues along the line through the last two points (bandwidth
//! dominates). The α–β summary ([`Curve::latency_s`], [`Curve::bandwidth_bytes_s`]) is
//! for reports only: predictions use the points.
//!
//! Invariants of a curve accepted by [`Curve::new`]: at least one point, bytes strictly
//! increasing, every time finite and non-negative; [`Curve::at`] is then finite,
//! non-negative and zero only for zero bytes.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// One measurement: a message of `bytes` took `seconds` (median over repetitions).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub bytes: u64,
    pub seconds: f64,
}

/// Seconds against bytes; see the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<CurvePoint>", into = "Vec<CurvePoint>")]
pub struct Curve {
    points: Vec<CurvePoint>,
}

impl TryFrom<Vec<CurvePoint>> for Curve {
    type Error = Error;
    fn try_from(points: Vec<CurvePoint>) -> Result<Curve> {
        Curve::new(points)
    }
}

impl From<Curve> for Vec<CurvePoint> {
    fn from(c: Curve) -> Vec<CurvePoint> {
        c.points
    }
}

impl Curve {
    /// A curve through `points` (any order; sorted here).
    pub fn new(mut points: Vec<CurvePoint>) -> Result<Curve> {
        let n = points.len();
        let bad = |reason: String| Error::BadValue {
            field: "profile curve",
            value: format!("{n} points"),
            reason,
            fix: "regenerate the profile with `strata profile CONFIG`".into(),
        };
        if points.is_empty() {
            return Err(bad("has no points".into()));
        }
        if let Some(p) = points
            .iter()
            .find(|p| !(p.seconds.is_finite() && p.seconds >= 0.0))
        {
            return Err(bad(format!(
                "a time of {} s at {} bytes",
                p.seconds, p.bytes
            )));
        }
        points.sort_by_key(|p| p.bytes);
        if points.windows(2).any(|w| w[0].bytes == w[1].bytes) {
            return Err(bad("has two points for the same size".into()));
        }
        Ok(Curve { points })
    }

    /// The measured points, by increasing size.
    pub fn points(&self) -> &[CurvePoint] {
        &self.points
    }

    /// Predicted seconds for a message of `bytes` (0 for 0 bytes).
    pub fn at(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            return 0.0;
        }
        let p = &self.points;
        let first = p[0];
        if bytes <= first.bytes || p.len() == 1 {
            return if bytes <= first.bytes {
                first.seconds
            } else {
                first.seconds * bytes as f64 / first.bytes.max(1) as f64
            };
        }
        let i = p.partition_point(|q| q.bytes < bytes).min(p.len() - 1);
        let (a, b) = (p[i - 1], p[i]);
        let slope = (b.seconds - a.seconds) / (b.bytes - a.bytes) as f64;
        (a.seconds + slope * (bytes - a.bytes) as f64).max(a.seconds.min(b.seconds))
    }

    /// Time of the smallest measured message (the latency term α).
    pub fn latency_s(&self) -> f64 {
        self.points[0].seconds
    }

    /// Asymptotic bandwidth in bytes per second: the largest message over the extra time
    /// it takes beyond the latency (the β term); infinite for a flat curve.
    pub fn bandwidth_bytes_s(&self) -> f64 {
        let last = self.points[self.points.len() - 1];
        let extra = last.seconds - self.latency_s();
        if extra > 0.0 {
            last.bytes as f64 / extra
        } else {
            f64::INFINITY
        }
    }

    /// The same curve with every time multiplied by `factor` (≥ 0).
    pub fn scaled(&self, factor: f64) -> Curve {
        Curve {
            points: self
                .points
                .iter()
                .map(|p| CurvePoint {
                    bytes: p.bytes,
                    seconds: p.seconds * factor.max(0.0),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pt(bytes: u64, seconds: f64) -> CurvePoint {
        CurvePoint { bytes, seconds }
    }

    #[test]
    fn interpolates_clamps_and_extrapolates() {
        let c = Curve::new(vec![pt(1024, 3e-6), pt(8, 2e-6), pt(1 << 20, 1e-4)]).unwrap();
        assert_eq!(c.at(0), 0.0);
        assert_eq!(c.at(1), 2e-6);
        assert_eq!(c.at(8), 2e-6);
        assert!((c.at(516) - 2.5e-6).abs() < 1e-9);
        assert_eq!(c.at(1 << 20), 1e-4);
        // beyond the last point: along the last segment
        let slope = (1e-4 - 3e-6) / ((1u64 << 20) - 1024) as f64;
        assert!((c.at(2 << 20) - (1e-4 + slope * (1u64 << 20) as f64)).abs() < 1e-12);
        assert!((c.bandwidth_bytes_s() - (1u64 << 20) as f64 / (1e-4 - 2e-6)).abs() < 1.0);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Curve>(&json).unwrap(), c);
    }

    #[test]
    fn bad_curves_are_refused() {
        assert!(Curve::new(vec![]).is_err());
        assert!(Curve::new(vec![pt(8, f64::NAN)]).is_err());
        assert!(Curve::new(vec![pt(8, 1.0), pt(8, 2.0)]).is_err());
        let e = serde_json::from_str::<Curve>(r#"[{"bytes": 8, "seconds": -1.0}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("strata profile"), "{e}");
    }

    proptest! {
        /// A curve through increasing times is non-decreasing everywhere, and stays within
        /// its neighbouring points between them.
        #[test]
        fn monotone_curves_stay_monotone(
            steps in prop::collection::vec((1u64..1 << 20, 0.0f64..1e-3), 1..8),
            probes in prop::collection::vec(1u64..1 << 26, 1..16),
        ) {
            let mut bytes = 0;
            let mut secs = 0.0;
            let points: Vec<CurvePoint> = steps
                .iter()
                .map(|&(db, ds)| {
                    bytes += db;
                    secs += ds;
                    pt(bytes, secs)
                })
                .collect();
            let c = Curve::new(points.clone()).unwrap();
            let mut probes = probes;
            probes.sort();
            let values: Vec<f64> = probes.iter().map(|&b| c.at(b)).collect();
            prop_assert!(values.iter().all(|v| v.is_finite() && *v >= 0.0));
            prop_assert!(values.windows(2).all(|w| w[0] <= w[1] + 1e-15));
            for p in &points {
                prop_assert!((c.at(p.bytes) - p.seconds).abs() <= 1e-12);
            }
        }
    }
}
