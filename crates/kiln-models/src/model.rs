//! A model on a backend: weights, KV caches, and the forward pass over them.

use crate::config::ModelConfig;
use crate::forward::{self, names, CacheSpec, ForwardGraph, WeightDesc};
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
    decode: Option<(ForwardGraph, MemoryPlan)>,
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
            backend.upload(&mut buf, tensor.data)?;
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
        ] {
            memory.insert(name.to_string(), backend.alloc(bytes)?);
        }
        Ok(Model {
            config,
            backend,
            weights,
            memory,
            scratch: Scratch::new(),
            decode: None,
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
        let built;
        let (fg, memory_plan) = if t == 1 {
            if self.decode.is_none() {
                let g = self.graph(1)?;
                let p = plan(&g.graph, Aliasing::On);
                self.decode = Some((g, p));
            }
            let (g, p) = self.decode.as_ref().expect("decode graph was just built");
            (g, p)
        } else {
            let g = self.graph(t)?;
            let p = plan(&g.graph, Aliasing::On);
            built = (g, p);
            (&built.0, &built.1)
        };
        let ids: Vec<u8> = tokens
            .iter()
            .flat_map(|&id| (id as i32).to_le_bytes())
            .collect();
        let positions: Vec<u8> = (self.n_past..self.n_past + t)
            .flat_map(|p| (p as i32).to_le_bytes())
            .collect();
        let last_row = ((t - 1) as i32).to_le_bytes();
        for (name, bytes) in [
            (names::TOKEN_IDS, &ids[..]),
            (names::POSITIONS, &positions[..]),
            (names::LAST_ROW, &last_row[..]),
        ] {
            let buf = self
                .memory
                .get_mut(name)
                .expect("input buffers are allocated at load");
            self.backend.upload(buf, bytes)?;
        }
        self.scratch.ensure(&self.backend, memory_plan)?;
        execute(
            &self.backend,
            fg,
            memory_plan,
            &mut self.scratch,
            &mut self.memory,
        )?;
        let mut logits = vec![0u8; self.config.vocab * 4];
        let out = self
            .memory
            .get(names::LOGITS)
            .expect("the logits buffer is allocated at load");
        self.backend.download(out, &mut logits)?;
        self.last_plan = Some(PlanSummary {
            n_tokens: t,
            persistent_bytes: memory_plan.persistent_bytes,
            peak_bytes: memory_plan.peak_bytes(),
            peak_bytes_unaliased: memory_plan.peak_bytes_unaliased(),
        });
        self.n_past += t;
        Ok(logits
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
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
