//! Choosing the next token from logits.

pub use kiln_core::ops::argmax::argmax_row as argmax;
use kiln_core::ops::sample::sample_row;
use kiln_core::ops::SampleParams;
use kiln_core::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. The defaults are llama.cpp's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `<= 0` selects greedy decoding (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at
    /// least `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens seen in the last
    /// `repeat_last_n` tokens by this; 1 disables.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Checks the ranges of the settings: a finite `temperature`, `top_p` in
    /// `(0, 1]`, `min_p` in `[0, 1]` and a finite `repeat_penalty` above 0.
    /// [`crate::generate::generate`] calls it before any work, whichever path
    /// samples.
    pub fn check(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("sampler", msg));
        if !self.temperature.is_finite() {
            return bad(format!(
                "temperature must be a finite number, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(format!(
                "repeat_penalty must be a finite number above 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }

    /// Greedy decoding, nothing else.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..Self::default()
        }
    }
}

/// A seeded sampler.
///
/// The definition, in order: (1) the repetition penalty changes the logits of tokens
/// in the recent history; (2) with `temperature <= 0` the result is the argmax (lowest
/// index on ties); otherwise (3) top-k keeps the `k` largest logits, (4) with
/// `p_i = softmax(logits)` over the kept tokens, top-p keeps the shortest prefix of
/// them sorted by probability whose sum reaches `top_p`, (5) min-p keeps those with
/// `p_i >= min_p * max p`, and (6) a token is drawn from `softmax(logits / temperature)`
/// over what is kept, with one uniform number from the seeded generator. Steps (2) to
/// (6) are [`kiln_core::ops::Sample`], whose definition fixes every f32 operation and
/// takes probabilities as fixed-point integer weights (so that its sums do not depend
/// on their order), so that a GPU computes the same token.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose draws are determined by `config.seed`.
    pub fn new(config: SamplerConfig) -> Self {
        Sampler {
            config,
            rng: StdRng::seed_from_u64(config.seed),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Chooses the next token given `logits` and the tokens so far: the repetition
    /// penalty, then [`kiln_core::ops::sample::sample_row`] (the definition of
    /// [`kiln_core::ops::Sample`]) with the uniform number [`Sampler::next_uniform`]
    /// gives.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = self.config;
        let mut logits = logits.to_vec();
        apply_repeat_penalty(&mut logits, history, c.repeat_penalty, c.repeat_last_n);
        let u = self.next_uniform();
        // An index into `logits`, whose length (a vocabulary size) fits u32.
        sample_row(&logits, u, &self.params()) as u32
    }

    /// The uniform number in `[0, 1)` for the next token's draw: the generator's next
    /// number when `temperature > 0`, else 0 without drawing (the argmax needs none).
    /// [`Sampler::sample`] calls it once per token; a caller that samples elsewhere
    /// (on a device, with [`Sampler::params`]) calls it once per token instead, and so
    /// gets the same numbers in the same order.
    pub fn next_uniform(&mut self) -> f32 {
        if self.config.temperature > 0.0 {
            self.rng.random()
        } else {
            0.0
        }
    }

    /// Whether the choice depends on the history: the repetition penalty is on
    /// (`repeat_penalty != 1` and `repeat_last_n > 0`). When it is not,
    /// [`Sampler::sample`] is [`kiln_core::ops::Sample`] with [`Sampler::params`] and
    /// [`Sampler::next_uniform`].
    pub fn uses_history(&self) -> bool {
        penalty_applies(self.config.repeat_penalty, self.config.repeat_last_n)
    }

    /// Whether the choice is the argmax of the logits as they come: `temperature <= 0`
    /// and no repetition penalty ([`Sampler::uses_history`]). Then
    /// [`Sampler::sample`] is [`argmax`] of its logits and draws no number, so that a
    /// caller may take the argmax elsewhere instead (on a device:
    /// [`crate::Model::forward_batch_greedy`]).
    pub fn is_greedy(&self) -> bool {
        self.config.temperature <= 0.0 && !self.uses_history()
    }

    /// The settings of [`kiln_core::ops::Sample`] this sampler uses.
    pub fn params(&self) -> SampleParams {
        SampleParams {
            temperature: self.config.temperature,
            top_k: self.config.top_k,
            top_p: self.config.top_p,
            min_p: self.config.min_p,
        }
    }
}

/// llama.cpp's repetition penalty over the last `last_n` tokens of `history`.
pub fn apply_repeat_penalty(logits: &mut [f32], history: &[u32], penalty: f32, last_n: usize) {
    if !penalty_applies(penalty, last_n) {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &id in history.iter().rev().take(last_n) {
        if let Some(l) = logits.get_mut(id as usize) {
            if seen.insert(id) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Whether a repetition penalty of `penalty` over the last `last_n` tokens changes
/// anything: 1 and an empty window disable it.
fn penalty_applies(penalty: f32, last_n: usize) -> bool {
    penalty != 1.0 && last_n > 0
}
