//! A model on a backend: weights, KV caches, and the forward pass over them.

use crate::config::ModelConfig;
use crate::forward::{self, names, CacheSpec, ForwardGraph, WeightDesc};
use kiln_core::ops::SampleParams;
use kiln_core::{
    plan, Aliasing, Backend, Bindings, BufferId, BufferKind, DType, Error, MemoryPlan, Result,
    Scratch,
};
use kiln_gguf::Gguf;
use std::collections::HashMap;

/// How to load a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Positions the KV caches hold; `None` takes the model's context length, capped
    /// at [`LoadOptions::DEFAULT_MAX_CONTEXT`].
    pub context: Option<usize>,
    /// Element type of the KV caches: F32 or F16.
    pub cache_dtype: DType,
}

impl LoadOptions {
    /// The largest cache [`LoadOptions::context`] `None` allocates.
    pub const DEFAULT_MAX_CONTEXT: usize = 4096;
}

/// Memory a forward pass used: persistent (weights, caches, inputs, outputs) and
/// scratch, with and without aliasing of transient buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSummary {
    pub n_tokens: usize,
    pub persistent_bytes: usize,
    pub peak_bytes: usize,
    pub peak_bytes_unaliased: usize,
}

/// A loaded model: its configuration, its weights and KV caches in `BE`'s memory,
/// and the number of positions already in the caches.
pub struct Model<BE: Backend> {
    config: ModelConfig,
    backend: BE,
    weights: HashMap<String, WeightDesc>,
    memory: HashMap<String, BE::Buffer>,
    scratch: Scratch<BE::Buffer>,
    decode: DecodeGraphs,
    cache: CacheSpec,
    n_past: usize,
    last_plan: Option<PlanSummary>,
}

impl<BE: Backend> Model<BE> {
    /// Loads every tensor of `file` into `backend` and allocates the KV caches.
    /// `progress(done, total)` is called with bytes uploaded after each tensor.
    pub fn load<B: AsRef<[u8]>>(
        backend: BE,
        file: &Gguf<B>,
        options: LoadOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        if !matches!(options.cache_dtype, DType::F32 | DType::F16) {
            return Err(Error::invalid(
                "load",
                format!("KV cache dtype {} is not f32 or f16", options.cache_dtype),
            ));
        }
        let capacity = options
            .context
            .unwrap_or_else(|| config.context_length.min(LoadOptions::DEFAULT_MAX_CONTEXT));
        if capacity == 0 {
            return Err(Error::invalid("load", "context must be at least 1"));
        }
        let total: u64 = file.tensor_infos().iter().map(|t| t.n_bytes() as u64).sum();
        let mut done = 0u64;
        let mut weights = HashMap::new();
        let mut memory = HashMap::new();
        for tensor in file.tensors() {
            let info = tensor.info;
            let mut buf = backend.alloc(tensor.data.len())?;
            backend.upload_weight(&mut buf, tensor.data, info.dtype(), info.shape())?;
            done += tensor.data.len() as u64;
            progress(done, total);
            let name = info.name().to_string();
            weights.insert(
                name.clone(),
                WeightDesc {
                    name: name.clone(),
                    dtype: info.dtype(),
                    shape: info.shape().to_vec(),
                },
            );
            memory.insert(name, buf);
        }
        let cache = CacheSpec {
            capacity,
            dtype: options.cache_dtype,
        };
        let cache_bytes = cache.dtype.bytes_for(config.kv_dim() * capacity)?;
        for l in 0..config.n_layers {
            memory.insert(names::k_cache(l), backend.alloc(cache_bytes)?);
            memory.insert(names::v_cache(l), backend.alloc(cache_bytes)?);
        }
        for (name, bytes) in [
            (names::TOKEN_IDS, capacity * 4),
            (names::POSITIONS, capacity * 4),
            (names::LAST_ROW, 4),
            (names::LOGITS, config.vocab * 4),
            (names::UNIFORM, 4),
            (names::TOKEN, 4),
        ] {
            memory.insert(name.to_string(), backend.alloc(bytes)?);
        }
        Ok(Model {
            config,
            backend,
            weights,
            memory,
            scratch: Scratch::new(),
            decode: DecodeGraphs::default(),
            cache,
            n_past: 0,
            last_plan: None,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &BE {
        &self.backend
    }

    /// Positions the KV caches hold.
    pub fn capacity(&self) -> usize {
        self.cache.capacity
    }

    /// Positions already in the caches: the next token's position.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Forgets the cached positions, so that the next forward pass starts a new
    /// sequence at position 0.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Bytes of all weight tensors.
    pub fn weight_bytes(&self) -> usize {
        self.weights
            .values()
            .map(|w| w.dtype.bytes_for(w.shape.iter().product()).unwrap_or(0))
            .sum()
    }

    /// Memory use of the last forward pass.
    pub fn last_plan(&self) -> Option<PlanSummary> {
        self.last_plan
    }

    /// Builds the forward graph for `n_tokens` tokens (as [`Model::forward`] runs it).
    pub fn graph(&self, n_tokens: usize) -> Result<ForwardGraph> {
        graph_for(&self.config, &self.weights, n_tokens, self.cache)
    }

    /// Runs `tokens` at the next positions, appending them to the KV caches, and
    /// returns the logits (`vocab` values) of the last one. All of them go through
    /// one graph: a whole prompt is prefilled in one pass.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.step(tokens, None)?;
        self.last_logits()
    }

    /// Runs `tokens` as [`Model::forward`] does, then chooses the next token on the
    /// backend with [`kiln_core::ops::Sample`] (settings `params`, uniform number
    /// `uniform` in `[0, 1)`) from the logits of the last one, and downloads only
    /// that token id. The result is what
    /// [`kiln_cpu::ops::sample::sample_row`] gives for those logits, `uniform` and
    /// `params`; the logits stay readable with [`Model::last_logits`]. Errors on
    /// out-of-range `params` or `uniform`, and as [`Model::forward`] does.
    pub fn forward_sample(
        &mut self,
        tokens: &[u32],
        params: SampleParams,
        uniform: f32,
    ) -> Result<u32> {
        if !(0.0..1.0).contains(&uniform) {
            return Err(Error::invalid(
                "forward_sample",
                format!("the uniform number must be in [0, 1), got {uniform}"),
            ));
        }
        self.step(tokens, Some((params, uniform)))?;
        let mut bytes = [0u8; 4];
        self.backend
            .download(self.buffer(names::TOKEN), &mut bytes)?;
        let id = i32::from_le_bytes(bytes);
        u32::try_from(id)
            .ok()
            .filter(|&id| (id as usize) < self.config.vocab)
            .ok_or_else(|| {
                Error::format(
                    format!("{} on {}", names::TOKEN, self.backend.name()),
                    format!(
                        "token id {id} is outside the vocabulary 0..{}",
                        self.config.vocab
                    ),
                )
            })
    }

    /// The logits (`vocab` values) of the last token of the last forward step, by
    /// [`Model::forward`] or [`Model::forward_sample`]. Errors before the first step.
    pub fn last_logits(&self) -> Result<Vec<f32>> {
        if self.last_plan.is_none() {
            return Err(Error::invalid("last_logits", "no forward step has run yet"));
        }
        let mut bytes = vec![0u8; self.config.vocab * 4];
        self.backend
            .download(self.buffer(names::LOGITS), &mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The model memory buffer `name`, one of those [`Model::load`] allocates.
    fn buffer(&self, name: &str) -> &BE::Buffer {
        self.memory
            .get(name)
            .expect("inputs and outputs are allocated at load")
    }

    /// Checks that `tokens` can run at the next positions.
    fn check_step(&self, tokens: &[u32]) -> Result<()> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::invalid("forward", "no tokens"));
        }
        if self.n_past + t > self.cache.capacity {
            return Err(Error::invalid(
                "forward",
                format!(
                    "context full: {} cached + {t} new positions exceed the cache's {}",
                    self.n_past, self.cache.capacity
                ),
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.config.vocab) {
            return Err(Error::invalid(
                "forward",
                format!(
                    "token id {bad} is outside the vocabulary 0..{}",
                    self.config.vocab
                ),
            ));
        }
        Ok(())
    }

    /// Runs `tokens` at the next positions through the forward graph, which ends
    /// with a sampling head when `sample` gives its settings and uniform number.
    /// One-token graphs are built once per head and kept.
    fn step(&mut self, tokens: &[u32], sample: Option<(SampleParams, f32)>) -> Result<()> {
        self.check_step(tokens)?;
        let t = tokens.len();
        let params = sample.map(|(p, _)| p);
        let (config, weights, cache) = (&self.config, &self.weights, self.cache);
        let build = || planned_graph(config, weights, t, cache, params);
        let built;
        let planned = if t == 1 {
            self.decode.get_or_build(params, build)?
        } else {
            built = build()?;
            &built
        };
        for (name, bytes) in step_inputs(tokens, self.n_past, sample.map(|(_, u)| u)) {
            let buf = self
                .memory
                .get_mut(name)
                .expect("input buffers are allocated at load");
            self.backend.upload(buf, &bytes)?;
        }
        let memory_plan = &planned.plan;
        self.scratch.ensure(&self.backend, memory_plan)?;
        execute(
            &self.backend,
            &planned.fg,
            memory_plan,
            &mut self.scratch,
            &mut self.memory,
        )?;
        self.last_plan = Some(PlanSummary {
            n_tokens: t,
            persistent_bytes: memory_plan.persistent_bytes,
            peak_bytes: memory_plan.peak_bytes(),
            peak_bytes_unaliased: memory_plan.peak_bytes_unaliased(),
        });
        self.n_past += t;
        Ok(())
    }
}

/// A forward graph with its memory plan.
struct Planned {
    fg: ForwardGraph,
    plan: MemoryPlan,
}

/// The one-token (decode) graphs built so far: one that ends with the logits, and one
/// with a sampling head for the settings it was last asked for.
#[derive(Default)]
struct DecodeGraphs {
    logits: Option<Planned>,
    sample: Option<Planned>,
}

impl DecodeGraphs {
    /// The graph with a sampling head of `params` (with none for `None`), built by
    /// `build` unless the one kept has that head.
    fn get_or_build(
        &mut self,
        params: Option<SampleParams>,
        build: impl FnOnce() -> Result<Planned>,
    ) -> Result<&Planned> {
        let slot = match params {
            None => &mut self.logits,
            Some(_) => &mut self.sample,
        };
        let planned = match slot.take() {
            Some(kept) if kept.fg.sample.map(|h| h.params) == params => kept,
            _ => build()?,
        };
        Ok(slot.insert(planned))
    }
}

/// The bytes of each input buffer for a step over `tokens` from position `n_past`,
/// with the sampling head's uniform number when there is one.
fn step_inputs(
    tokens: &[u32],
    n_past: usize,
    uniform: Option<f32>,
) -> Vec<(&'static str, Vec<u8>)> {
    let t = tokens.len();
    let mut inputs = vec![
        (
            names::TOKEN_IDS,
            i32_bytes(tokens.iter().map(|&id| id as usize)),
        ),
        (names::POSITIONS, i32_bytes(n_past..n_past + t)),
        (names::LAST_ROW, i32_bytes(std::iter::once(t - 1))),
    ];
    if let Some(u) = uniform {
        inputs.push((names::UNIFORM, u.to_le_bytes().to_vec()));
    }
    inputs
}

/// `values` (token ids, positions, row indices) as little-endian I32s, the dtype of
/// the graph's index inputs.
fn i32_bytes(values: impl Iterator<Item = usize>) -> Vec<u8> {
    values.flat_map(|v| (v as i32).to_le_bytes()).collect()
}

/// The forward graph of `n_tokens` tokens, with a sampling head of `sample` when
/// given, and its memory plan.
fn planned_graph(
    config: &ModelConfig,
    weights: &HashMap<String, WeightDesc>,
    n_tokens: usize,
    cache: CacheSpec,
    sample: Option<SampleParams>,
) -> Result<Planned> {
    let mut fg = graph_for(config, weights, n_tokens, cache)?;
    if let Some(params) = sample {
        fg = fg.with_sample(params)?;
    }
    let plan = plan(&fg.graph, Aliasing::On);
    Ok(Planned { fg, plan })
}

/// The dtype and shape of every tensor of `file`, by name.
pub fn weight_descs<B: AsRef<[u8]>>(file: &Gguf<B>) -> HashMap<String, WeightDesc> {
    file.tensor_infos()
        .iter()
        .map(|t| {
            let name = t.name().to_string();
            (
                name.clone(),
                WeightDesc {
                    name,
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                },
            )
        })
        .collect()
}

/// The forward graph of `config` for `n_tokens` tokens over the tensors `weights`.
pub fn graph_for(
    config: &ModelConfig,
    weights: &HashMap<String, WeightDesc>,
    n_tokens: usize,
    cache: CacheSpec,
) -> Result<ForwardGraph> {
    let weight = |name: &str| {
        weights
            .get(name)
            .cloned()
            .ok_or_else(|| Error::format("model", format!("tensor {name:?} is missing")))
    };
    forward::build(config, &weight, n_tokens, cache)
}

/// Binds every persistent buffer of `fg` to the model memory of the same name and
/// executes it.
fn execute<BE: Backend>(
    backend: &BE,
    fg: &ForwardGraph,
    memory_plan: &MemoryPlan,
    scratch: &mut Scratch<BE::Buffer>,
    memory: &mut HashMap<String, BE::Buffer>,
) -> Result<()> {
    let graph = &fg.graph;
    let ids: HashMap<&str, BufferId> = graph
        .buffers()
        .iter()
        .enumerate()
        .filter(|(_, b)| b.kind == BufferKind::Persistent)
        .map(|(i, b)| (b.name.as_str(), BufferId(i as u32)))
        .collect();
    let mut bindings = Bindings::new(graph, memory_plan, scratch)?;
    for (name, buf) in memory.iter_mut() {
        if let Some(&id) = ids.get(name.as_str()) {
            bindings.bind(graph, id, buf)?;
        }
    }
    backend.execute(graph, &mut bindings)
}
