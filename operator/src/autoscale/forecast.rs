//! The demand forecast behind `scaling.predictive`: Holt's linear trend method (double
//! exponential smoothing; C. C. Holt, "Forecasting seasonals and trends by
//! exponentially weighted moving averages", 1957, reprinted in the International
//! Journal of Forecasting 20(1), 2004; R. J. Hyndman and G. Athanasopoulos,
//! "Forecasting: Principles and Practice", 3rd ed., section 8.2). A level and a trend
//! per second are smoothed from the demand the policy sees each tick (its mean over the
//! panic window, a few seconds: one scrape's queue depth is a noisier slope, and the
//! minute-long stable mean lags a ramp by half a minute), and the
//! forecast at the measured cold-start horizon is `level + trend x horizon`: replicas
//! can start while the queue is still forming. The samples arrive at irregular
//! intervals, so the trend is per second and the level is carried over the gap before
//! each update. Seasonality (Holt-Winters) is not modelled: it needs whole seasons of
//! history (days), which a controller restarted or a trace of an hour does not have.

use std::time::{Duration, Instant};

/// Smoothing of the level: how much of each new sample is taken.
pub const ALPHA: f64 = 0.3;
/// Smoothing of the trend.
pub const BETA: f64 = 0.1;

/// Holt's level and trend of one deployment's demand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holt {
    state: Option<(Instant, f64, f64)>,
}

impl Holt {
    /// Takes the demand sampled at `at`.
    pub fn observe(&mut self, at: Instant, demand: f64) {
        self.state = Some(match self.state {
            None => (at, demand, 0.0),
            Some((t, level, trend)) => {
                let dt = at.saturating_duration_since(t).as_secs_f64();
                if dt <= 0.0 {
                    return;
                }
                let carried = level + trend * dt;
                let next = ALPHA * demand + (1.0 - ALPHA) * carried;
                let slope = BETA * (next - level) / dt + (1.0 - BETA) * trend;
                (at, next, slope)
            }
        });
    }

    /// The demand expected `ahead` after the last sample (never below zero), and the
    /// trend per second it rests on; `None` before the first sample.
    pub fn forecast(&self, ahead: Duration) -> Option<(f64, f64)> {
        self.state
            .map(|(_, level, trend)| ((level + trend * ahead.as_secs_f64()).max(0.0), trend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_ramp_is_extrapolated_and_a_flat_line_is_not() {
        let t0 = Instant::now();
        let mut h = Holt::default();
        // Demand rising 0.5 per second, sampled every 2 s for two minutes.
        for i in 0..60 {
            h.observe(t0 + Duration::from_secs(2 * i), i as f64);
        }
        let (f, trend) = h.forecast(Duration::from_secs(45)).unwrap();
        assert!((trend - 0.5).abs() < 0.05, "{trend}");
        // Last sample 59 at 118 s; 45 s on: about 59 + 22.5.
        assert!((f - 81.5).abs() < 4.0, "{f}");
        let mut flat = Holt::default();
        for i in 0..60 {
            flat.observe(t0 + Duration::from_secs(2 * i), 10.0);
        }
        let (f, trend) = flat.forecast(Duration::from_secs(45)).unwrap();
        assert!(trend.abs() < 1e-9 && (f - 10.0).abs() < 1e-9, "{f} {trend}");
        // A falling line is not forecast below zero.
        let mut fall = Holt::default();
        for i in 0..60 {
            fall.observe(t0 + Duration::from_secs(2 * i), 60.0 - i as f64);
        }
        assert_eq!(fall.forecast(Duration::from_secs(600)).unwrap().0, 0.0);
        assert!(Holt::default().forecast(Duration::ZERO).is_none());
    }
}
