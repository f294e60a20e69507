//! kiln-models: what turns the compute layer into a language model.
//!
//! - [`config`]: architectures (`llama`, `qwen2`, `qwen3`) and hyperparameters read
//!   from GGUF metadata;
//! - [`forward`]: the forward pass as a [`kiln_core::Graph`] of Op IR ops, the same
//!   for every backend;
//! - [`model`]: weights on a backend, KV caches, prefill and decode;
//! - [`sampler`]: greedy, temperature, top-k, top-p, min-p, repetition penalty;
//! - [`generate`]: the generation loop with timing;
//! - [`perplexity`]: a model's perplexity over a text, as llama-perplexity computes it;
//! - [`tokenizer`]: text to token ids and back, as llama.cpp does, from GGUF metadata.

pub mod config;
pub mod forward;
pub mod generate;
pub mod model;
pub mod perplexity;
pub mod sampler;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use model::{BatchRow, LoadOptions, Model};
pub use sampler::{Sampler, SamplerConfig};
