//! Choosing the next token from logits: greedy at temperature 0, otherwise softmax at
//! the temperature restricted to the top-p nucleus, from a seeded generator so a request
//! with a seed is reproducible.

use rand::{Rng, SeedableRng};

/// Sampling parameters of one request (OpenAI's names and ranges).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
}

/// The index of the largest logit; the last one on ties (0 for an empty row). Greedy
/// decoding everywhere (scheduler, tests, benches) picks by this one rule.
pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// A request's sampler.
pub struct Sampler {
    params: Sampling,
    rng: rand::rngs::SmallRng,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(params: Sampling, seed: u64) -> Sampler {
        Sampler {
            params,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
        }
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, ((l - max) / self.params.temperature).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= self.params.top_p {
                break;
            }
        }
        let kept = &probs[..kept];
        let sum: f32 = kept.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * sum;
        for (id, p) in kept {
            r -= p;
            if r <= 0.0 {
                return *id;
            }
        }
        kept.last().map_or_else(|| argmax(logits), |p| p.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_seeded_and_nucleus_behave() {
        let logits = [0.0, 3.0, 2.9, -5.0];
        let mut g = Sampler::new(
            Sampling {
                temperature: 0.0,
                top_p: 1.0,
            },
            1,
        );
        assert_eq!(g.sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(
                Sampling {
                    temperature: 1.0,
                    top_p: 1.0,
                },
                seed,
            );
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7), "same seed, same tokens");
        assert!(
            draw(7).contains(&2) && draw(7).contains(&1),
            "both likely tokens appear"
        );
        // A tight nucleus keeps only the top token.
        let mut n = Sampler::new(
            Sampling {
                temperature: 1.0,
                top_p: 0.01,
            },
            3,
        );
        assert!((0..50).all(|_| n.sample(&logits) == 1));
    }
}
