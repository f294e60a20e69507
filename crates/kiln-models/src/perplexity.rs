//! Perplexity of a model over a text, computed as llama.cpp's `llama-perplexity`
//! computes it, so that the figures of the two can be compared.
//!
//! The text's tokens (BOS first, where the vocabulary adds it) are cut into
//! non-overlapping windows of `ctx` tokens; a trailing part shorter than a window
//! is not scored. Each window runs from position 0 with an empty cache, its first
//! token replaced by BOS (when the model uses one). Only the second half of each
//! window is scored, so that every scored token has at least `ctx / 2` tokens of
//! context: with `first = ctx / 2`, the logits at positions `first ..= ctx - 2`
//! predict the tokens at `first + 1 ..= ctx - 1`, `ctx - first - 1` tokens per
//! window. A token's negative log-likelihood is `log(sum_j exp(l_j)) - l_t` over its
//! logits `l` (in f64); the perplexity is `exp` of their mean, and its uncertainty
//! `PPL * sqrt(var / (n - 1))` with `var` the variance of the `n` values.

use crate::model::Model;
use kiln_core::{Backend, Error, Result};

/// Sums over scored tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Perplexity {
    /// Tokens scored.
    pub count: usize,
    /// Sum of their negative log-likelihoods (nats).
    pub nll_sum: f64,
    /// Sum of the squares of those.
    pub nll2_sum: f64,
}

impl Perplexity {
    /// Adds one token's negative log-likelihood.
    pub fn add(&mut self, nll: f64) {
        self.count += 1;
        self.nll_sum += nll;
        self.nll2_sum += nll * nll;
    }

    /// The mean negative log-likelihood, in nats per token: `ln PPL`.
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.count as f64
    }

    /// The standard error of [`Perplexity::mean_nll`]: `sqrt(var / (n - 1))`
    /// (NaN for fewer than two tokens).
    pub fn mean_nll_error(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.mean_nll();
        let var = (self.nll2_sum / n - mean * mean).max(0.0);
        (var / (n - 1.0)).sqrt()
    }

    /// `exp(mean negative log-likelihood)`.
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// The uncertainty of [`Perplexity::ppl`]: `PPL` times the standard error of
    /// its logarithm.
    pub fn ppl_error(&self) -> f64 {
        self.ppl() * self.mean_nll_error()
    }
}

/// How [`perplexity`] scores a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerplexityOptions {
    /// Tokens per window (at least 3, so that a window scores a token; at most
    /// the model's cache).
    pub ctx: usize,
    /// Windows to score at most; `None` scores every whole window.
    pub max_chunks: Option<usize>,
    /// The token that replaces the first of each window, when the model's
    /// vocabulary adds BOS.
    pub bos: Option<u32>,
}

impl PerplexityOptions {
    /// The windows `n_tokens` tokens give: whole windows, at most `max_chunks`.
    pub fn n_chunks(&self, n_tokens: usize) -> usize {
        let whole = n_tokens / self.ctx.max(1);
        self.max_chunks.map_or(whole, |m| m.min(whole))
    }

    /// Tokens each window scores: its second half, less the last token (which
    /// predicts nothing inside the window).
    pub fn scored_per_chunk(&self) -> usize {
        self.ctx - self.ctx / 2 - 1
    }
}

/// The negative log-likelihood of `token` under `logits`: `log(sum exp) - l_token`,
/// in f64 around the maximum.
pub fn token_nll(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[token as usize] as f64
}

/// Scores `tokens` with `model` as the module documentation says, calling
/// `on_chunk(index, windows, running)` after each window with the sums so far.
///
/// Each window runs its first half and one token as one prompt (whose last logits
/// score the first token of the second half), then the rest one token at a time,
/// since [`Model::forward`] returns only the last position's logits: a window costs
/// one prefill of `ctx / 2 + 1` tokens and `ctx - ctx / 2 - 2` decode steps.
///
/// Errors: a `ctx` below 3 or above the model's cache, fewer than `ctx` tokens, and
/// as [`Model::forward`] does (token ids outside the vocabulary).
pub fn perplexity<BE: Backend>(
    model: &mut Model<BE>,
    tokens: &[u32],
    options: PerplexityOptions,
    on_chunk: &mut dyn FnMut(usize, usize, &Perplexity) -> Result<()>,
) -> Result<Perplexity> {
    let ctx = options.ctx;
    if ctx < 3 {
        return Err(Error::invalid(
            "perplexity",
            format!("a window of {ctx} tokens scores none; it needs at least 3"),
        ));
    }
    if ctx > model.capacity() {
        return Err(Error::invalid(
            "perplexity",
            format!(
                "windows of {ctx} tokens do not fit the model's cache of {}",
                model.capacity()
            ),
        ));
    }
    let n_chunks = options.n_chunks(tokens.len());
    if n_chunks == 0 {
        return Err(Error::invalid(
            "perplexity",
            format!(
                "the text has {} tokens, fewer than one window of {ctx}",
                tokens.len()
            ),
        ));
    }
    let first = ctx / 2;
    let mut sums = Perplexity::default();
    let mut window = vec![0u32; ctx];
    for chunk in 0..n_chunks {
        window.copy_from_slice(&tokens[chunk * ctx..(chunk + 1) * ctx]);
        if let Some(bos) = options.bos {
            window[0] = bos;
        }
        model.reset();
        let mut logits = model.forward(&window[..=first])?;
        for j in first..ctx - 1 {
            if j > first {
                logits = model.forward(&window[j..=j])?;
            }
            sums.add(token_nll(&logits, window[j + 1]));
        }
        on_chunk(chunk, n_chunks, &sums)?;
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_nll_is_the_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        for t in 0..3 {
            let want = z.ln() - (t as f64 + 1.0);
            assert!((token_nll(&logits, t) - want).abs() < 1e-12);
        }
        // Large logits do not overflow.
        assert!((token_nll(&[1000.0, 1000.0], 0) - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn sums_give_llama_perplexity_figures() {
        let mut p = Perplexity::default();
        for nll in [1.0, 2.0, 3.0, 4.0] {
            p.add(nll);
        }
        assert_eq!(p.mean_nll(), 2.5);
        assert!((p.ppl() - 2.5f64.exp()).abs() < 1e-12);
        // Variance 1.25 over n - 1 = 3.
        assert!((p.mean_nll_error() - (1.25f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((p.ppl_error() - p.ppl() * (1.25f64 / 3.0).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn windows_and_scored_tokens() {
        let o = PerplexityOptions {
            ctx: 512,
            max_chunks: None,
            bos: Some(0),
        };
        assert_eq!(o.scored_per_chunk(), 255);
        assert_eq!(o.n_chunks(1023), 1);
        assert_eq!(o.n_chunks(1024), 2);
        let o = PerplexityOptions {
            max_chunks: Some(1),
            ..o
        };
        assert_eq!(o.n_chunks(4096), 1);
    }
}
