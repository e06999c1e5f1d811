//! Choosing the next token from logits, in vLLM's order (its V1 sampler): logit bias,
//! then the penalties, then temperature, top-k, top-p and min-p, and a draw from a
//! seeded generator so a request with a seed is reproducible. Temperature 0 is greedy:
//! the argmax of the processed logits, so a bias or a penalty changes greedy output too.
//! Log-probabilities are those of the model's raw output (vLLM's default), so what a
//! client reads is the model's belief, not the sampler's.

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};

/// Sampling parameters of one request (OpenAI's names and ranges; `top_k`, `min_p` and
/// `repetition_penalty` as vLLM and llama.cpp's server name them).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// CTRL's penalty (Keskar et al. 2019) on tokens of the prompt or the output:
    /// positive logits divided by it, negative ones multiplied; 1 is off.
    pub repetition_penalty: f32,
    /// Added to the logit of each listed token.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Sampling {
    /// OpenAI's defaults: temperature 1, the whole distribution, no penalties.
    fn default() -> Sampling {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl Sampling {
    /// Greedy decoding with nothing else applied.
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            ..Sampling::default()
        }
    }

    /// Whether the logits are changed before choosing (else they are read in place).
    fn processes_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }
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

/// One token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The token.
    pub token: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at this position with theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and the `top` most likely tokens'.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: 49k terms in f32 lose the small ones.
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|b| b.1 >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse),
        top: best.into_iter().map(|(i, l)| (i, l - lse)).collect(),
    }
}

/// A request's sampler. It remembers what it chose, for the penalties.
pub struct Sampler {
    params: Sampling,
    rng: rand::rngs::SmallRng,
    /// Times each token was chosen (presence, frequency and repetition penalties).
    counts: HashMap<u32, u32>,
    /// The prompt's tokens, for the repetition penalty only.
    prompt: HashSet<u32>,
    /// The processed logits (reused between tokens).
    scratch: Vec<f32>,
}

impl Sampler {
    /// A sampler seeded with `seed` for a sequence that begins with `prompt`.
    pub fn new(params: Sampling, seed: u64, prompt: &[u32]) -> Sampler {
        let prompt = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Sampler {
            params,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            counts: HashMap::new(),
            prompt,
            scratch: Vec::new(),
        }
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.params.processes_logits() {
            return self.choose(logits);
        }
        let mut processed = std::mem::take(&mut self.scratch);
        processed.clear();
        processed.extend_from_slice(logits);
        self.process(&mut processed);
        let token = self.choose(&processed);
        self.scratch = processed;
        *self.counts.entry(token).or_default() += 1;
        token
    }

    /// Logit bias, then the penalties, in place.
    fn process(&self, l: &mut [f32]) {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(x) = l.get_mut(token as usize) {
                *x += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self
                .prompt
                .iter()
                .chain(self.counts.keys().filter(|t| !self.prompt.contains(t)));
            for &t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        // OpenAI's definition: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    /// Greedy, or a draw from what temperature, top-k, top-p and min-p leave.
    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, ((l - max) / p.temperature).exp()))
            .collect();
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < probs.len() {
            probs.select_nth_unstable_by(p.top_k - 1, desc);
            probs.truncate(p.top_k);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.sort_unstable_by(desc);
        let mut kept = 0;
        let mut mass = 0.0;
        for q in &probs {
            kept += 1;
            mass += q.1 / total;
            if mass >= p.top_p {
                break;
            }
        }
        // Sorted, so the first is the most likely; min-p is relative to it.
        let floor = probs.first().map_or(0.0, |q| q.1) * p.min_p;
        let kept = &probs[..kept];
        let kept = &kept[..kept.partition_point(|q| q.1 >= floor).max(1)];
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

    fn sampler(params: Sampling, seed: u64) -> Sampler {
        Sampler::new(params, seed, &[])
    }

    #[test]
    fn greedy_seeded_and_nucleus_behave() {
        let logits = [0.0, 3.0, 2.9, -5.0];
        let mut g = sampler(Sampling::greedy(), 1);
        assert_eq!(g.sample(&logits), 1);
        let draw = |seed| {
            let mut s = sampler(Sampling::default(), seed);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7), "same seed, same tokens");
        assert!(
            draw(7).contains(&2) && draw(7).contains(&1),
            "both likely tokens appear"
        );
        // A tight nucleus keeps only the top token.
        let mut n = sampler(
            Sampling {
                top_p: 0.01,
                ..Sampling::default()
            },
            3,
        );
        assert!((0..50).all(|_| n.sample(&logits) == 1));
    }

    #[test]
    fn top_k_and_min_p_cut_the_tail() {
        // Four near-equal tokens: at temperature 1 all four appear in 400 draws.
        let logits = [1.0, 1.1, 1.2, 1.3];
        let seen = |params: Sampling| {
            let mut s = sampler(params, 5);
            let mut seen: Vec<u32> = (0..400).map(|_| s.sample(&logits)).collect();
            seen.sort_unstable();
            seen.dedup();
            seen
        };
        assert_eq!(seen(Sampling::default()), vec![0, 1, 2, 3]);
        let top2 = Sampling {
            top_k: 2,
            ..Sampling::default()
        };
        assert_eq!(seen(top2), vec![2, 3], "top_k 2 keeps the two most likely");
        // exp(-0.3) = 0.74 and exp(-0.2) = 0.82 of the top token's probability.
        let min_p = Sampling {
            min_p: 0.8,
            ..Sampling::default()
        };
        assert_eq!(seen(min_p), vec![1, 2, 3]);
    }

    #[test]
    fn bias_and_penalties_change_greedy_choices_as_openai_defines_them() {
        let logits = [2.0, 1.0, 0.5];
        // A bias of -100 bans a token; +100 forces one.
        let mut s = sampler(
            Sampling {
                logit_bias: vec![(0, -100.0)],
                ..Sampling::greedy()
            },
            1,
        );
        assert_eq!(s.sample(&logits), 1);
        // Frequency penalty 0.6: token 0 is chosen at 2.0, then 1.4, then 0.8 < 1.0.
        let mut f = sampler(
            Sampling {
                frequency_penalty: 0.6,
                ..Sampling::greedy()
            },
            1,
        );
        let picks: Vec<u32> = (0..3).map(|_| f.sample(&logits)).collect();
        assert_eq!(picks, vec![0, 0, 1]);
        // Presence penalty 1.6 applies once: 2.0 - 1.6 = 0.4 < 1.0 after one use.
        let mut p = sampler(
            Sampling {
                presence_penalty: 1.6,
                ..Sampling::greedy()
            },
            1,
        );
        let picks: Vec<u32> = (0..3).map(|_| p.sample(&logits)).collect();
        assert_eq!(picks, vec![0, 1, 2], "each used token drops by 1.6 once");
        // The repetition penalty counts the prompt too: 2.0 / 4 = 0.5 < 1.0.
        let logits = [2.0, 1.0, 0.6];
        let mut r = Sampler::new(
            Sampling {
                repetition_penalty: 4.0,
                ..Sampling::greedy()
            },
            1,
            &[0],
        );
        assert_eq!(r.sample(&logits), 1);
        assert_eq!(r.sample(&logits), 2, "1.0 / 4 is now below 0.6");
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let lp = logprobs(&logits, 2, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        let order: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(order, vec![1, 2, 0]);
        assert!((lp.top[1].1 - lp.logprob).abs() < 1e-6);
        let total: f32 = (0..4).map(|t| logprobs(&logits, t, 0).logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(logprobs(&logits, 1, 0).top.is_empty());
    }
}
