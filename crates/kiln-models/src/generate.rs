//! The generation loop: prefill the prompt in one pass, then decode token by token.

use crate::model::Model;
use crate::sampler::Sampler;
use kiln_core::{Backend, Error, Result};
use std::time::{Duration, Instant};

/// Timings of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    /// Time of the decode steps (the first generated token comes from the prefill).
    pub generation_time: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second over the decode steps.
    pub fn generation_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64
            / self.generation_time.as_secs_f64().max(1e-9)
    }
}

/// Runs `prompt` through `model` (from position 0) and samples up to `max_tokens`
/// tokens, calling `on_token` with each. Stops early after a token for which
/// `is_end` holds (that token is passed to `on_token` too).
pub fn generate<BE: Backend>(
    model: &mut Model<BE>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    is_end: &dyn Fn(u32) -> bool,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt has no tokens"));
    }
    model.reset();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut history = prompt.to_vec();
    let start = Instant::now();
    let mut logits = model.forward(prompt)?;
    stats.prompt_time = start.elapsed();
    let start = Instant::now();
    for step in 0..max_tokens {
        let token = sampler.sample(&logits, &history);
        history.push(token);
        stats.generated_tokens += 1;
        on_token(token)?;
        if is_end(token) || step + 1 == max_tokens || model.n_past() == model.capacity() {
            break;
        }
        logits = model.forward(&[token])?;
    }
    stats.generation_time = start.elapsed();
    Ok(stats)
}
