//! Choosing the next token from a row of logits.
//!
//! Order, as in llama.cpp and vLLM: penalties (repetition over prompt and output, presence and
//! frequency over the output), then the sequence's logits processors (the hook structured output
//! and tool calling plug into), then temperature, top-k, top-p and min-p, then a draw from the
//! sequence's own seeded generator. Temperature 0 is greedy (the first highest logit). With the same
//! seed and the same logits, the same tokens come out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Sampling options of one request; the defaults are OpenAI's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    /// Keep the most likely tokens whose probabilities add up to this (1: off).
    pub top_p: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0: off).
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI's, -2..2).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of generated tokens (OpenAI's, -2..2).
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of tokens in the prompt or output (1: off).
    pub repetition_penalty: f32,
    /// Seeds the sequence's random generator; `None`: a fresh seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Adjusts a sequence's logits before sampling (constrained decoding, biases). Runs on the model's
/// owner thread once per generated token.
pub trait LogitsProcessor: Send {
    /// `generated`: the tokens produced so far; `logits`: the next token's, to edit in place.
    fn process(&mut self, generated: &[u32], logits: &mut [f32]);
}

/// OpenAI's `logit_bias`: adds a bias to the logits of chosen tokens (-100 bans, 100 forces).
pub struct LogitBias(pub Vec<(u32, f32)>);

impl LogitsProcessor for LogitBias {
    fn process(&mut self, _generated: &[u32], logits: &mut [f32]) {
        for &(token, bias) in &self.0 {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and the same on every platform.
#[derive(Clone, Debug)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A fresh seed for requests without one: distinct per call.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// One sequence's sampling state.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Occurrences of each generated token.
    generated_counts: HashMap<u32, u32>,
    /// Tokens of the prompt and output, for the repetition penalty.
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = Rng::new(params.seed.unwrap_or_else(fresh_seed));
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        Self { params, rng, generated_counts: HashMap::new(), seen }
    }

    /// Picks the next token. `logits` is edited in place; `processors` run after the penalties.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        generated: &[u32],
        processors: &mut [Box<dyn LogitsProcessor>],
    ) -> u32 {
        self.apply_penalties(logits);
        for processor in processors.iter_mut() {
            processor.process(generated, logits);
        }
        let token = if self.params.is_greedy() { argmax(logits) } else { self.draw(logits) };
        *self.generated_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = self.params.repetition_penalty;
        if p != 1.0 {
            for &token in &self.seen {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&token, &count) in &self.generated_counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= presence + frequency * count as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature;
        // Candidates as (token, logit), most likely first once sorted.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
        }
        let needs_order = self.params.top_p < 1.0 || self.params.min_p > 0.0;
        if needs_order {
            candidates.sort_unstable_by(by_logit);
        }
        let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = candidates.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if self.params.min_p > 0.0 {
            let floor = f64::from(self.params.min_p) * probs[0];
            keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
        }
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut n = 0;
            for &p in &probs[..keep] {
                cumulative += p;
                n += 1;
                if cumulative >= f64::from(self.params.top_p) {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut target = self.rng.next_f64() * mass;
        for (i, &p) in probs[..keep].iter().enumerate() {
            if target < p {
                return candidates[i].0;
            }
            target -= p;
        }
        candidates[keep - 1].0
    }
}

/// The index of the first highest finite value (0 if there is none).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 3.0, -1.0, 0.5]
    }

    #[test]
    fn greedy_takes_the_first_highest_logit() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut logits(), &[], &mut []), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let params = SamplingParams { seed: Some(7), ..Default::default() };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..50).map(|_| s.sample(&mut logits(), &[], &mut [])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        assert_ne!(draw(&params), draw(&SamplingParams { seed: Some(8), ..params.clone() }));
        let tokens = draw(&params);
        assert!(tokens.iter().any(|&t| t != tokens[0]), "temperature 1 is not greedy");
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_candidates() {
        let sample_set = |params: SamplingParams| {
            let mut s = Sampler::new(params, &[]);
            let mut seen: Vec<u32> = (0..400).map(|_| s.sample(&mut logits(), &[], &mut [])).collect();
            seen.sort_unstable();
            seen.dedup();
            seen
        };
        let base = SamplingParams { seed: Some(1), ..Default::default() };
        assert_eq!(sample_set(SamplingParams { top_k: 2, ..base.clone() }), [1, 3]);
        // Probabilities: tokens 1 and 3 ≈ 0.35 each, token 2 ≈ 0.13: top_p 0.6 keeps 1 and 3.
        assert_eq!(sample_set(SamplingParams { top_p: 0.6, ..base.clone() }), [1, 3]);
        // min_p 0.3 keeps tokens at least 0.3 × the top probability: 1, 3 and 2 (e^-1 ≈ 0.37).
        assert_eq!(sample_set(SamplingParams { min_p: 0.3, ..base.clone() }), [1, 2, 3]);
        assert_eq!(sample_set(SamplingParams { temperature: 0.0, ..base }), [1]);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let params = SamplingParams { frequency_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, &[]);
        assert_eq!(s.sample(&mut logits(), &[], &mut []), 1);
        assert_eq!(s.sample(&mut logits(), &[1], &mut []), 3, "token 1 was penalised once");
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(params, &[1]);
        assert_eq!(s.sample(&mut logits(), &[], &mut []), 3, "token 1 from the prompt is penalised");
    }

    struct Ban(u32);

    impl LogitsProcessor for Ban {
        fn process(&mut self, _generated: &[u32], logits: &mut [f32]) {
            logits[self.0 as usize] = f32::NEG_INFINITY;
        }
    }

    #[test]
    fn logits_processors_run_before_the_choice() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let mut processors: Vec<Box<dyn LogitsProcessor>> = vec![Box::new(Ban(1))];
        assert_eq!(s.sample(&mut logits(), &[], &mut processors), 3);
    }
}
