//! The generation loop: prefill the prompt (in the model's prefill chunks), then
//! decode token by token.

use crate::model::Model;
use crate::sampler::Sampler;
use kiln_core::{Backend, Error, Result};
use std::fmt;
use std::time::{Duration, Instant};

/// Where [`generate`] chooses each token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplingPath {
    /// On the backend: each forward step ends with [`kiln_core::ops::Sample`] and only
    /// the token id is downloaded ([`Model::forward_sample`]).
    Device,
    /// On the host: each step downloads the logits and [`Sampler::sample`] applies
    /// the repetition penalty, which needs the token history, before sampling. Every
    /// sampler configuration can take this path.
    #[default]
    Host,
}

impl SamplingPath {
    /// The path [`generate`] takes with `sampler`: the host when its repetition
    /// penalty is on, else the device.
    pub fn for_sampler(sampler: &Sampler) -> Self {
        if sampler.uses_history() {
            SamplingPath::Host
        } else {
            SamplingPath::Device
        }
    }
}

impl fmt::Display for SamplingPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SamplingPath::Device => "sampling on device",
            SamplingPath::Host => "sampling on host (repetition penalty)",
        })
    }
}

/// Why [`generate`] stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    /// It generated the tokens it was asked for.
    #[default]
    MaxTokens,
    /// It chose a token that ends generation.
    EndOfGeneration,
    /// The KV cache is full: no position is left for another token.
    ContextFull,
}

/// What one generation did and how long it took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Time of the prefill step, which also chooses the first generated token.
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    /// Time of the decode steps (the first generated token comes from the prefill).
    pub generation_time: Duration,
    /// Where the tokens were chosen.
    pub sampling: SamplingPath,
    /// Why generation stopped.
    pub stop: StopReason,
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
/// `is_end` holds (that token is passed to `on_token` too), or when the KV cache is
/// full; [`GenerationStats::stop`] says which.
///
/// Where the tokens are chosen ([`SamplingPath::for_sampler`]): when the sampler's
/// repetition penalty is off (`repeat_penalty == 1` or `repeat_last_n == 0`, the
/// defaults), on the backend, prefill included, so each step downloads one token id
/// instead of `vocab` logits; otherwise on the host from the downloaded logits, since
/// the penalty needs the token history. Both paths draw the sampler's uniform numbers
/// in the same order and give the same tokens for the same logits.
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
    sampler.config().check()?;
    model.reset();
    let path = SamplingPath::for_sampler(sampler);
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        sampling: path,
        ..Default::default()
    };
    let mut history = prompt.to_vec();
    let start = Instant::now();
    let mut token = step(model, sampler, path, prompt, &history)?;
    stats.prompt_time = start.elapsed();
    let start = Instant::now();
    for n in 1..=max_tokens {
        history.push(token);
        stats.generated_tokens = n;
        on_token(token)?;
        let stop = if is_end(token) {
            Some(StopReason::EndOfGeneration)
        } else if n == max_tokens {
            Some(StopReason::MaxTokens)
        } else if model.n_past() == model.capacity() {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        if let Some(stop) = stop {
            stats.stop = stop;
            break;
        }
        token = step(model, sampler, path, &[token], &history)?;
    }
    stats.generation_time = start.elapsed();
    Ok(stats)
}

/// Runs `tokens` through `model` and chooses the next token on `path`; `history`
/// is every token so far, `tokens` included.
fn step<BE: Backend>(
    model: &mut Model<BE>,
    sampler: &mut Sampler,
    path: SamplingPath,
    tokens: &[u32],
    history: &[u32],
) -> Result<u32> {
    match path {
        SamplingPath::Device => {
            model.forward_sample(tokens, sampler.params(), sampler.next_uniform())
        }
        SamplingPath::Host => {
            let logits = model.forward(tokens)?;
            Ok(sampler.sample(&logits, history))
        }
    }
}
