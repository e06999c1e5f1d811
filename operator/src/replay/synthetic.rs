//! A bursty synthetic trace, so that a policy is judged on more than the one recorded
//! trace it may have been tuned on. The process, seeded and reproducible:
//!
//! - Arrivals are a two-state Markov-modulated Poisson process (MMPP-2; W. Fischer and
//!   K. Meier-Hellstern, "The Markov-modulated Poisson process (MMPP) cookbook",
//!   Performance Evaluation 18(2), 1993), the standard model of bursty request
//!   streams: a calm state and a burst state with exponentially distributed dwell
//!   times; in a burst the rate is `burst_factor` times the calm rate.
//! - The calm rate itself follows a slow sine of period `cycle_seconds` (a compressed
//!   daily cycle) between 50% and 150% of `base_rate`.
//! - The time-varying Poisson process is drawn by thinning (P. A. W. Lewis and
//!   G. S. Shedler, "Simulation of nonhomogeneous Poisson processes by thinning",
//!   Naval Research Logistics Quarterly 26(3), 1979).
//! - Prompt and output lengths are log-normal (median and sigma given), as LLM request
//!   lengths are reported to be (e.g. the Splitwise traces' distributions), capped.

use rand::{Rng, SeedableRng};

use super::{Trace, TraceRequest};

/// The process's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Bursty {
    /// Seconds of trace.
    pub duration: f64,
    /// Mean calm arrival rate, requests per second.
    pub base_rate: f64,
    /// Rate multiplier in a burst.
    pub burst_factor: f64,
    /// Mean seconds between bursts.
    pub mean_calm: f64,
    /// Mean seconds a burst lasts.
    pub mean_burst: f64,
    /// Period of the slow cycle.
    pub cycle_seconds: f64,
    /// Median and log-space sigma of prompt tokens.
    pub prompt: (f64, f64),
    /// Median and log-space sigma of generated tokens.
    pub output: (f64, f64),
    /// The seed.
    pub seed: u64,
}

impl Default for Bursty {
    /// One hour, about the Azure code trace's mean load (2.6 requests/s) with bursts
    /// of four times the rate for 45 s every five minutes on average.
    fn default() -> Self {
        Bursty {
            duration: 3600.0,
            base_rate: 2.0,
            burst_factor: 4.0,
            mean_calm: 300.0,
            mean_burst: 45.0,
            cycle_seconds: 1800.0,
            prompt: (1500.0, 0.9),
            output: (24.0, 0.8),
            seed: 2023,
        }
    }
}

impl Bursty {
    /// Draws the trace.
    pub fn trace(&self) -> Trace {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let exp =
            |rng: &mut rand::rngs::StdRng, mean: f64| -mean * (1.0 - rng.random::<f64>()).ln();
        // Log-normal by Box-Muller.
        let lognormal = |rng: &mut rand::rngs::StdRng, (median, sigma): (f64, f64), cap: f64| {
            let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (median * (sigma * z).exp()).clamp(1.0, cap) as u32
        };
        let peak = self.base_rate * 1.5 * self.burst_factor;
        let mut requests = Vec::new();
        let (mut t, mut burst, mut switch) = (0.0, false, exp(&mut rng, self.mean_calm));
        loop {
            t += exp(&mut rng, 1.0 / peak);
            while t >= switch {
                burst = !burst;
                let mean = if burst {
                    self.mean_burst
                } else {
                    self.mean_calm
                };
                switch += exp(&mut rng, mean);
            }
            if t >= self.duration {
                break;
            }
            let cycle = 1.0 + 0.5 * (std::f64::consts::TAU * t / self.cycle_seconds).sin();
            let rate = self.base_rate * cycle * if burst { self.burst_factor } else { 1.0 };
            if rng.random::<f64>() * peak < rate {
                requests.push(TraceRequest {
                    at: t,
                    prompt_tokens: lognormal(&mut rng, self.prompt, 16_000.0),
                    generated_tokens: lognormal(&mut rng, self.output, 2_000.0),
                });
            }
        }
        Trace { requests }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_is_reproducible_and_burstier_than_poisson() {
        let b = Bursty::default();
        let t = b.trace();
        assert_eq!(t, b.trace());
        assert_ne!(
            t,
            Bursty {
                seed: 1,
                ..b.clone()
            }
            .trace()
        );
        // Mean rate: calm 2/s (the cycle averages out), bursts 8/s about 13% of the
        // time: about 2.8/s.
        let rate = t.requests.len() as f64 / b.duration;
        assert!((2.2..3.4).contains(&rate), "{rate}");
        // Counts per 10 s window: a Poisson process has variance = mean; bursts make
        // the index of dispersion well above 1.
        let mut counts = vec![0f64; (b.duration / 10.0) as usize];
        for r in &t.requests {
            counts[(r.at / 10.0) as usize] += 1.0;
        }
        let mean = counts.iter().sum::<f64>() / counts.len() as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
        assert!(var / mean > 3.0, "index of dispersion {}", var / mean);
        let mut prompts: Vec<u32> = t.requests.iter().map(|r| r.prompt_tokens).collect();
        prompts.sort_unstable();
        let median = prompts[prompts.len() / 2];
        assert!((1300..1700).contains(&median), "{median}");
    }
}
