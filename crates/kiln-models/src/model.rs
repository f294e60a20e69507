//! A model on a backend: weights, KV caches (and a hybrid model's recurrent states),
//! and the forward pass over them.

use crate::config::ModelConfig;
use crate::forward::{self, names, CacheSpec, ForwardGraph, WeightDesc};
use kiln_core::ops::SampleParams;
use kiln_core::{
    plan, Aliasing, Backend, Bindings, BufferId, BufferKind, DType, DeviceBuffer, Error, Graph,
    LaunchProfile, MemoryPlan, Result, Scratch,
};
use kiln_gguf::{Gguf, GgufFile};
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// How to load a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Positions the KV caches hold; `None` takes the model's context length, capped
    /// at [`LoadOptions::DEFAULT_MAX_CONTEXT`].
    pub context: Option<usize>,
    /// Element type of the KV caches: F32 or F16.
    pub cache_dtype: DType,
    /// Sequences the KV caches hold at once ([`Model::forward_batch`]), each of
    /// `context` positions: the caches' memory is `slots` times a single sequence's
    /// (plus one slot that a batched step's padding rows write when `slots > 1`).
    pub slots: usize,
}

impl LoadOptions {
    /// The largest cache [`LoadOptions::context`] `None` allocates.
    pub const DEFAULT_MAX_CONTEXT: usize = 4096;
}

impl Default for LoadOptions {
    /// The model's context (capped), F16 caches, one slot.
    fn default() -> Self {
        Self {
            context: None,
            cache_dtype: DType::F16,
            slots: 1,
        }
    }
}

/// One token of a batched step ([`Model::forward_batch`],
/// [`Model::forward_batch_greedy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRow {
    /// The sequence (cache slot) the token continues.
    pub slot: usize,
    pub token: u32,
    /// Whether the step returns this row's logits ([`Model::forward_batch`]), or its
    /// greedy token ([`Model::forward_batch_greedy`]).
    pub logits: bool,
}

/// Row counts of the executables a batched step runs ([`Model::forward_batch`]): a
/// step of `n` rows runs on the smallest that holds `n`, its other rows padding.
pub const BATCH_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Memory a forward pass used: persistent (weights, caches, inputs, outputs) and
/// scratch, with and without aliasing of transient buffers. A prompt that runs in
/// chunks ([`Model::set_prefill_chunk`]) reports its largest chunk's graph, of
/// `n_tokens` tokens: the scratch every chunk runs in.
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
    decode: DecodeSteps<BE>,
    /// Batched-step executables by row count ([`BATCH_BUCKETS`]).
    batch_steps: HashMap<usize, Compiled<BE>>,
    cache: CacheSpec,
    /// Tokens in each sequence slot's cache (slot 0: [`Model::n_past`]).
    slot_lens: Vec<usize>,
    /// Rows the token, position and slot inputs hold.
    input_rows: usize,
    prefill_chunk: usize,
    last_plan: Option<PlanSummary>,
    /// The recurrent states of a hybrid model's linear-attention layers (name,
    /// bytes): one sequence's, zeroed when a sequence starts at position 0.
    recurrent: Vec<(String, usize)>,
}

/// Tokens per forward graph of a prompt by default ([`Model::set_prefill_chunk`]),
/// as llama.cpp's default micro-batch (`-ub 512`).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

impl<BE: Backend> Model<BE> {
    /// Loads every tensor of `file` into `backend` ([`Backend::share_weight`]: on a
    /// backend that borrows weights, such as the CPU, the model keeps `file`'s bytes,
    /// its memory map, instead of a copy) and allocates the KV caches. The weights
    /// that read one input are stacked where the backend asks for it
    /// ([`Backend::stacks_weights`], [`weight_stacks`]). `progress(done, total)` is
    /// called with bytes loaded after each tensor.
    pub fn load(
        backend: BE,
        file: &GgufFile,
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
        if options.slots == 0 {
            return Err(Error::invalid("load", "slots must be at least 1"));
        }
        if config.linear.is_some() && options.slots > 1 {
            return Err(Error::Unsupported(format!(
                "{} keeps the recurrent state of one sequence; load it with one slot, not {}",
                config.arch.name(),
                options.slots
            )));
        }
        // Several slots get one more, which padding rows of batched steps write.
        let cache_slots = if options.slots > 1 {
            options.slots + 1
        } else {
            1
        };
        let mut raw = raw_weight_descs(file, config.n_layers);
        let splits = weight_splits(&config);
        let split_sources: HashSet<String> = splits.iter().map(|s| s.source.clone()).collect();
        apply_splits(&mut raw, &splits)?;
        let stacks = if backend.stacks_weights() {
            weight_stacks(&raw)
        } else {
            Vec::new()
        };
        let mut weights = raw.clone();
        apply_stacks(&mut weights, &stacks)?;
        // Both graphs (and so every weight's shape and dtype) are checked before any
        // weight is uploaded; their kernels are made ready, before the first token,
        // once the weights are in place.
        let cache_spec = CacheSpec {
            capacity,
            dtype: options.cache_dtype,
            slots: cache_slots,
        };
        let graphs = [(1, 0.0), (2, 0.8)]
            .into_iter()
            .map(|(n_tokens, head)| {
                // Heads of both sampling kernels: the argmax and the sampler.
                let head = SampleParams {
                    temperature: head,
                    top_k: 40,
                    top_p: 0.95,
                    min_p: 0.05,
                };
                graph_for(&config, &weights, n_tokens, cache_spec)?.with_sample(head)
            })
            .collect::<Result<Vec<_>>>()?;
        check_vocabulary(file, &config)?;
        let total: u64 = file
            .tensor_infos()
            .iter()
            .filter(|t| raw.contains_key(t.name()) || split_sources.contains(t.name()))
            .map(|t| t.n_bytes() as u64)
            .sum();
        let stacked: std::collections::HashSet<&str> = stacks
            .iter()
            .flat_map(|s| s.parts.iter().map(String::as_str))
            .collect();
        let mut done = 0u64;
        let mut memory = HashMap::new();
        for (info, data) in file.shared_tensors() {
            // Split sources and blocks past the layers are not weights; stacked parts
            // are uploaded as their stack.
            if stacked.contains(info.name()) || !raw.contains_key(info.name()) {
                continue;
            }
            let buf = backend.share_weight(&data, info.dtype(), info.shape())?;
            done += info.n_bytes() as u64;
            progress(done, total);
            memory.insert(info.name().to_string(), buf);
        }
        for stack in &stacks {
            let desc = stack.desc(&raw)?;
            let bytes = stack.bytes(file)?;
            let mut buf = backend.alloc(bytes.len())?;
            backend.upload_weight(&mut buf, &bytes, desc.dtype, &desc.shape)?;
            done += bytes.len() as u64;
            progress(done, total);
            memory.insert(stack.name.clone(), buf);
        }
        for split in &splits {
            let desc = &raw[&split.name];
            let bytes = split.bytes(file)?;
            let mut buf = backend.alloc(bytes.len())?;
            backend.upload_weight(&mut buf, &bytes, desc.dtype, &desc.shape)?;
            done += bytes.len() as u64;
            progress(done, total);
            memory.insert(split.name.clone(), buf);
        }
        for fg in &graphs {
            backend.prepare(&fg.graph)?;
        }
        // A model of several slots runs batched steps: their kernels (mat-vecs of
        // several rows, mat-mats) are made ready too.
        if options.slots > 1 {
            for rows in BATCH_BUCKETS {
                let planned = planned_batch_graph(&config, &weights, rows, rows, cache_spec)?;
                backend.prepare(&planned.fg.graph)?;
            }
        }
        let cache = cache_spec;
        let cache_bytes = config
            .kv_dim()
            .checked_mul(capacity)
            .and_then(|n| n.checked_mul(cache_slots))
            .ok_or_else(|| {
                Error::invalid(
                    "load",
                    format!("KV caches of {cache_slots} x {capacity} positions overflow"),
                )
            })
            .and_then(|n| cache.dtype.bytes_for(n))?;
        for l in (0..config.n_layers).filter(|&l| config.has_kv_cache(l)) {
            memory.insert(names::k_cache(l), backend.alloc(cache_bytes)?);
            memory.insert(names::v_cache(l), backend.alloc(cache_bytes)?);
        }
        // Token, position and slot inputs: a chunk of a prompt (at most the capacity)
        // or of a batched step (at most the capacity or the largest bucket).
        let input_rows = capacity.max(BATCH_BUCKETS[BATCH_BUCKETS.len() - 1]);
        let recurrent = recurrent_states(&config);
        for (name, bytes) in &recurrent {
            let mut buf = backend.alloc(*bytes)?;
            backend.upload(&mut buf, &vec![0u8; *bytes])?;
            memory.insert(name.clone(), buf);
        }
        for (name, bytes) in [
            (names::TOKEN_IDS, input_rows * 4),
            (names::POSITIONS, input_rows * 4),
            (names::LAST_ROW, 4),
            (names::LOGITS, config.vocab * 4),
            (names::UNIFORM, 4),
            (names::TOKEN, 4),
        ] {
            memory.insert(name.to_string(), backend.alloc(bytes)?);
        }
        tracing::debug!(
            "loaded {} tensors ({:.1} MiB) on {}; the KV caches hold {} x {capacity} positions in {}",
            file.tensor_infos().len(),
            total as f64 / (1 << 20) as f64,
            backend.name(),
            options.slots,
            options.cache_dtype
        );
        Ok(Model {
            config,
            backend,
            weights,
            memory,
            scratch: Scratch::new(),
            decode: DecodeSteps::default(),
            batch_steps: HashMap::new(),
            cache,
            slot_lens: vec![0; options.slots],
            input_rows,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            last_plan: None,
            recurrent,
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

    /// Positions already in slot 0's caches: the next token's position for
    /// [`Model::forward`].
    pub fn n_past(&self) -> usize {
        self.slot_lens[0]
    }

    /// Forgets slot 0's cached positions, so that the next forward pass starts a new
    /// sequence at position 0 (with zeroed recurrent states, on a hybrid model).
    pub fn reset(&mut self) {
        self.slot_lens[0] = 0;
    }

    /// Forgets slot 0's cached positions from `n_past` on (keeps all when there are
    /// fewer), so that the next forward pass continues at position `n_past`.
    ///
    /// A hybrid model's recurrent states hold the whole sequence so far and cannot be
    /// rewound: there `n_past` must be 0 (a reset) or at least the current length;
    /// anything else is an error and changes nothing.
    pub fn truncate(&mut self, n_past: usize) -> Result<()> {
        if !self.recurrent.is_empty() && n_past != 0 && n_past < self.slot_lens[0] {
            return Err(Error::invalid(
                "truncate",
                format!(
                    "a {} model's recurrent state holds all {} positions and cannot be truncated to {n_past}: only to 0 (a reset) or to {} and more",
                    self.config.arch.name(),
                    self.slot_lens[0],
                    self.slot_lens[0]
                ),
            ));
        }
        self.slot_lens[0] = self.slot_lens[0].min(n_past);
        Ok(())
    }

    /// Sequences the caches hold ([`LoadOptions::slots`]).
    pub fn slots(&self) -> usize {
        self.slot_lens.len()
    }

    /// Tokens already in `slot`'s cache (0 for a slot out of range).
    pub fn slot_len(&self, slot: usize) -> usize {
        self.slot_lens.get(slot).copied().unwrap_or(0)
    }

    /// Forgets `slot`'s tokens (its cache memory is reused by the next sequence);
    /// does nothing for a slot out of range.
    pub fn clear_slot(&mut self, slot: usize) {
        if let Some(len) = self.slot_lens.get_mut(slot) {
            *len = 0;
        }
    }

    /// Bytes of the KV caches of every layer: [`Model::slots`] slots of
    /// [`Model::capacity`] positions (and the padding slot of batched steps where
    /// there are several).
    pub fn kv_cache_bytes(&self) -> usize {
        (0..self.config.n_layers)
            .flat_map(|l| [names::k_cache(l), names::v_cache(l)])
            .filter_map(|name| self.memory.get(&name))
            .map(DeviceBuffer::bytes)
            .sum()
    }

    /// Bytes of the recurrent states (a hybrid model's convolution and delta-rule
    /// states, one sequence's; 0 for other models).
    pub fn recurrent_state_bytes(&self) -> usize {
        self.recurrent.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Zeroes the recurrent states: a sequence starts from none.
    fn zero_recurrent_states(&mut self) -> Result<()> {
        for (name, bytes) in &self.recurrent {
            let buf = self
                .memory
                .get_mut(name)
                .expect("recurrent states are allocated at load");
            self.backend.upload(buf, &vec![0u8; *bytes])?;
        }
        Ok(())
    }

    /// Bytes of all weight tensors.
    pub fn weight_bytes(&self) -> usize {
        self.weights
            .values()
            .map(|w| w.dtype.bytes_for(w.shape.iter().product()).unwrap_or(0))
            .sum()
    }

    /// Bytes of the weight tensors whose buffers borrow the file's memory
    /// ([`DeviceBuffer::borrowed`]) instead of holding a copy.
    pub fn borrowed_weight_bytes(&self) -> usize {
        self.weights
            .keys()
            .filter_map(|name| self.memory.get(name))
            .filter(|buf| buf.borrowed())
            .map(DeviceBuffer::bytes)
            .sum()
    }

    /// Memory use of the last forward pass.
    pub fn last_plan(&self) -> Option<PlanSummary> {
        self.last_plan
    }

    /// Tokens per forward graph ([`DEFAULT_PREFILL_CHUNK`] unless set): a forward pass
    /// of more tokens runs them in chunks of this many, in order, each appending its
    /// keys and values to the caches before the next attends to them, so that the
    /// scratch memory of a prompt of any length is that of one chunk.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Sets [`Model::prefill_chunk`]; errors on 0.
    pub fn set_prefill_chunk(&mut self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(Error::invalid(
                "set_prefill_chunk",
                "a prefill chunk must hold at least 1 token",
            ));
        }
        self.prefill_chunk = tokens;
        Ok(())
    }

    /// Builds the forward graph for `n_tokens` tokens (as [`Model::forward`] runs it).
    pub fn graph(&self, n_tokens: usize) -> Result<ForwardGraph> {
        graph_for(&self.config, &self.weights, n_tokens, self.cache)
    }

    /// Runs `tokens` at the next positions, appending them to the KV caches, and
    /// returns the logits (`vocab` values) of the last one. They go through one graph
    /// per chunk of [`Model::prefill_chunk`] tokens; the result equals one pass over
    /// all of them up to the order of floating-point sums.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.step(tokens, None)?;
        self.last_logits()
    }

    /// Runs `tokens` as [`Model::forward`] does, then chooses the next token on the
    /// backend with [`kiln_core::ops::Sample`] (settings `params`, uniform number
    /// `uniform` in `[0, 1)`) from the logits of the last one, and downloads only
    /// that token id. The result is what
    /// [`kiln_core::ops::sample::sample_row`] gives for those logits, `uniform` and
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
        let mut ids = [0];
        self.download_token_ids(names::TOKEN, &mut ids)?;
        Ok(ids[0])
    }

    /// Downloads the first `out.len()` token ids (I32) of model buffer `name` into
    /// `out`; errors, naming the buffer and the backend, on an id outside the
    /// vocabulary.
    fn download_token_ids(&self, name: &str, out: &mut [u32]) -> Result<()> {
        let mut bytes = vec![0u8; out.len() * 4];
        self.backend.download(self.buffer(name), &mut bytes)?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            let id = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            *o = u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < self.config.vocab)
                .ok_or_else(|| {
                    Error::format(
                        format!("{name} on {}", self.backend.name()),
                        format!(
                            "token id {id} is outside the vocabulary 0..{}",
                            self.config.vocab
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// Runs every row at its slot's next position (rows of one slot in order take
    /// consecutive positions; a batch may mix one prompt chunk of one slot with single
    /// decode tokens of others) and returns the logits of the rows with `logits: true`,
    /// in row order, `vocab` values each. Errors (and changes nothing) on a slot out of
    /// range, a token outside the vocabulary, a slot whose cache would overflow, or an
    /// empty batch.
    ///
    /// Rows run in chunks of at most [`Model::prefill_chunk`] rows (and 64 logits
    /// rows). A chunk of up to 64 rows runs an executable compiled once per row count
    /// of [`BATCH_BUCKETS`] and kept (on CUDA, a replayed CUDA graph): the chunk's rows
    /// are padded to the bucket with rows in the extra slot of a model of several
    /// slots, which no sequence reads (a one-slot model compiles one per row count
    /// instead). A larger chunk runs a graph built and executed for it, as a prompt
    /// chunk of [`Model::forward`] does. Each chunk projects the logits of its
    /// requested rows only (a bucket's: of its rows), and takes the argmax of each on
    /// the backend too, which [`Model::forward_batch_greedy`] downloads instead of the
    /// logits.
    ///
    /// A hybrid model (one slot: its recurrent state holds one sequence) runs the rows
    /// in order through [`Model::forward`]'s path instead, in pieces that end at each
    /// row with `logits: true`; an error after the checks resets its sequence, as
    /// [`Model::forward`]'s does.
    pub fn forward_batch(&mut self, rows: &[BatchRow]) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        if !self.recurrent.is_empty() {
            self.forward_rows_in_order("forward_batch", rows, |model| {
                logits.extend(model.last_logits()?);
                Ok(())
            })?;
            return Ok(logits);
        }
        self.run_batch("forward_batch", rows, |model, wanted| {
            let start = logits.len();
            logits.resize(start + wanted * model.config.vocab, 0.0);
            model.download_f32(names::BATCH_LOGITS, &mut logits[start..])
        })?;
        Ok(logits)
    }

    /// Runs `rows` as [`Model::forward_batch`] does (the same checks, chunks and
    /// executables) and returns the greedy token of each row with `logits: true`, in
    /// row order: the argmax of its logits, lowest index on ties
    /// ([`kiln_core::ops::Argmax`]; [`crate::sampler::argmax`] of the row
    /// [`Model::forward_batch`] returns), chosen on the backend, so that only the
    /// token ids are downloaded (4 bytes per row, not `vocab` f32s). Errors as
    /// [`Model::forward_batch`] does, and on an id outside the vocabulary.
    ///
    /// A hybrid model runs the rows as its [`Model::forward_batch`] does and takes each
    /// argmax on the host, from the downloaded logits.
    pub fn forward_batch_greedy(&mut self, rows: &[BatchRow]) -> Result<Vec<u32>> {
        let mut tokens = Vec::new();
        if !self.recurrent.is_empty() {
            self.forward_rows_in_order("forward_batch_greedy", rows, |model| {
                tokens.push(crate::sampler::argmax(&model.last_logits()?) as u32);
                Ok(())
            })?;
            return Ok(tokens);
        }
        self.run_batch("forward_batch_greedy", rows, |model, wanted| {
            let start = tokens.len();
            tokens.resize(start + wanted, 0);
            model.download_token_ids(names::BATCH_TOKENS, &mut tokens[start..])
        })?;
        Ok(tokens)
    }

    /// Checks `rows` (errors name `op`) and runs them in chunks
    /// ([`Model::forward_batch`]); after each chunk, `take(model, wanted)` downloads
    /// the results of its `wanted` rows with `logits: true`. Consumes the rows'
    /// positions once every chunk ran and was taken.
    fn run_batch(
        &mut self,
        op: &str,
        rows: &[BatchRow],
        mut take: impl FnMut(&Self, usize) -> Result<()>,
    ) -> Result<()> {
        let positions = self.check_batch(op, rows)?;
        self.ensure_batch_buffers()?;
        let max_logits = BATCH_BUCKETS[BATCH_BUCKETS.len() - 1];
        let limit = self.prefill_chunk.min(self.input_rows);
        let mut at = 0;
        while at < rows.len() {
            let (mut end, mut wanted) = (at, 0);
            while end < rows.len() && end - at < limit && (wanted < max_logits || !rows[end].logits)
            {
                wanted += usize::from(rows[end].logits);
                end += 1;
            }
            self.batch_chunk(&rows[at..end], &positions[at..end])?;
            take(self, wanted)?;
            at = end;
        }
        // Positions are consumed once every chunk ran: an error leaves them as they were.
        for row in rows {
            self.slot_lens[row.slot] += 1;
        }
        Ok(())
    }

    /// The batch of a hybrid model, whose one slot's rows run in order through
    /// [`Model::forward`]'s path: in pieces that end at each row with `logits: true`,
    /// after each of which `take(model)` reads that row's results from
    /// [`Model::last_logits`], and a last piece for any rows after them. The checks of
    /// [`Model::forward_batch`] come first, and their errors change nothing; an error
    /// of a piece resets the sequence, as [`Model::forward`]'s does (the recurrent
    /// state cannot be rewound).
    fn forward_rows_in_order(
        &mut self,
        op: &str,
        rows: &[BatchRow],
        mut take: impl FnMut(&Self) -> Result<()>,
    ) -> Result<()> {
        self.check_batch(op, rows)?;
        let mut start = 0;
        for (i, row) in rows.iter().enumerate() {
            if row.logits || i + 1 == rows.len() {
                let tokens: Vec<u32> = rows[start..=i].iter().map(|r| r.token).collect();
                self.step(&tokens, None)?;
                if row.logits {
                    take(self)?;
                }
                start = i + 1;
            }
        }
        Ok(())
    }

    /// Each row's position, after checking that the batch can run; errors name `op`.
    fn check_batch(&self, op: &str, rows: &[BatchRow]) -> Result<Vec<usize>> {
        if rows.is_empty() {
            return Err(Error::invalid(op, "no rows"));
        }
        let mut next = self.slot_lens.clone();
        let mut positions = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let Some(pos) = next.get_mut(row.slot) else {
                return Err(Error::invalid(
                    op,
                    format!(
                        "row {i} is in slot {}, outside the model's 0..{}",
                        row.slot,
                        self.slots()
                    ),
                ));
            };
            if *pos >= self.cache.capacity {
                return Err(Error::invalid(
                    op,
                    format!(
                        "context full: slot {} holds {} positions and the batch adds more than the cache's {} hold",
                        row.slot, self.slot_lens[row.slot], self.cache.capacity
                    ),
                ));
            }
            if row.token as usize >= self.config.vocab {
                return Err(Error::invalid(
                    op,
                    format!(
                        "row {i}: token id {} is outside the vocabulary 0..{}",
                        row.token, self.config.vocab
                    ),
                ));
            }
            positions.push(*pos);
            *pos += 1;
        }
        Ok(positions)
    }

    /// Allocates the inputs and outputs only batched steps use, once.
    fn ensure_batch_buffers(&mut self) -> Result<()> {
        let max_logits = BATCH_BUCKETS[BATCH_BUCKETS.len() - 1];
        for (name, bytes) in [
            (names::SLOTS, self.input_rows * 4),
            (names::LOGIT_ROWS, max_logits * 4),
            (names::BATCH_LOGITS, max_logits * self.config.vocab * 4),
            (names::BATCH_TOKENS, max_logits * 4),
        ] {
            if !self.memory.contains_key(name) {
                let buf = self.backend.alloc(bytes)?;
                self.memory.insert(name.to_string(), buf);
            }
        }
        Ok(())
    }

    /// Runs one chunk of a batch (`rows` at `positions`, at most 64 of them wanting
    /// logits), leaving the requested rows' logits and greedy tokens first in
    /// [`names::BATCH_LOGITS`] and [`names::BATCH_TOKENS`].
    fn batch_chunk(&mut self, rows: &[BatchRow], positions: &[usize]) -> Result<()> {
        let (n_rows, n_logits) = self.upload_batch_chunk(rows, positions)?;
        if rows.len() > BATCH_BUCKETS[BATCH_BUCKETS.len() - 1] {
            let (config, weights, cache) = (&self.config, &self.weights, self.cache);
            let planned = planned_batch_graph(config, weights, n_rows, n_logits, cache)?;
            execute(&self.backend, &planned, &mut self.scratch, &mut self.memory)?;
        } else {
            self.ensure_batch_step(n_rows)?;
            let compiled = self.batch_steps.get_mut(&n_rows).expect("compiled above");
            // SAFETY: as in `step_chunk`: the executable's memory is the model's own.
            unsafe { self.backend.run(&mut compiled.exe) }?;
        }
        Ok(())
    }

    /// Downloads the first `out.len()` f32 values of model buffer `name` into `out`,
    /// straight into its memory (the device's little-endian f32 are the host's).
    fn download_f32(&self, name: &str, out: &mut [f32]) -> Result<()> {
        self.backend
            .download(self.buffer(name), bytemuck::cast_slice_mut(out))?;
        if cfg!(target_endian = "big") {
            for v in out.iter_mut() {
                *v = f32::from_bits(u32::from_le(v.to_bits()));
            }
        }
        Ok(())
    }

    /// Uploads the inputs of one chunk of a batch (`rows` at `positions`): token ids,
    /// positions and slots, padded to the chunk's bucket, and the indices of the rows
    /// wanting logits. Returns the graph's row and logits-row counts.
    fn upload_batch_chunk(
        &mut self,
        rows: &[BatchRow],
        positions: &[usize],
    ) -> Result<(usize, usize)> {
        let n = rows.len();
        let wanted: Vec<usize> = (0..n).filter(|&i| rows[i].logits).collect();
        let largest = BATCH_BUCKETS[BATCH_BUCKETS.len() - 1];
        // The padding slot, on a model of several slots.
        let pad_slot = (self.cache.slots > self.slots()).then_some(self.cache.slots - 1);
        let (n_rows, n_logits) = if n > largest {
            (n, wanted.len().max(1))
        } else {
            let bucket = match pad_slot {
                Some(_) => *BATCH_BUCKETS.iter().find(|&&b| b >= n).unwrap_or(&largest),
                None => n,
            };
            (bucket, bucket)
        };
        let pad = n_rows - n;
        let tokens = rows.iter().map(|r| r.token as usize);
        let slots = rows.iter().map(|r| r.slot);
        let mut logit_rows = wanted;
        logit_rows.resize(n_logits, 0);
        let pad_slot = pad_slot.unwrap_or(0);
        for (name, bytes) in [
            (
                names::TOKEN_IDS,
                i32_bytes(tokens.chain(std::iter::repeat_n(0, pad))),
            ),
            (
                names::POSITIONS,
                i32_bytes(positions.iter().copied().chain(std::iter::repeat_n(0, pad))),
            ),
            (
                names::SLOTS,
                i32_bytes(slots.chain(std::iter::repeat_n(pad_slot, pad))),
            ),
            (names::LOGIT_ROWS, i32_bytes(logit_rows.into_iter())),
        ] {
            let buf = self
                .memory
                .get_mut(name)
                .expect("batch buffers are allocated before a batch");
            self.backend.upload(buf, &bytes)?;
        }
        Ok((n_rows, n_logits))
    }

    /// Compiles the batched-step executable of `n_rows` rows (a bucket's) unless it
    /// was.
    fn ensure_batch_step(&mut self, n_rows: usize) -> Result<()> {
        if !self.batch_steps.contains_key(&n_rows) {
            let planned =
                planned_batch_graph(&self.config, &self.weights, n_rows, n_rows, self.cache)?;
            let compiled = Compiled::new(&self.backend, planned, &mut self.memory)?;
            self.batch_steps.insert(n_rows, compiled);
        }
        Ok(())
    }

    /// Runs one batched step of `rows` (at most 64, checked as
    /// [`Model::forward_batch`] checks them) as [`Model::forward_batch`] does, but with
    /// each launch timed alone ([`Backend::profile`]); no position is consumed (the
    /// rows' keys and values are written where the next step of their slots writes
    /// again). Returns the launches' times and the step's graph.
    pub fn profile_batch(&mut self, rows: &[BatchRow]) -> Result<(Vec<LaunchProfile>, Graph)> {
        let largest = BATCH_BUCKETS[BATCH_BUCKETS.len() - 1];
        if rows.len() > largest {
            return Err(Error::invalid(
                "profile_batch",
                format!(
                    "a profiled step holds at most {largest} rows, got {}",
                    rows.len()
                ),
            ));
        }
        let positions = self.check_batch("profile_batch", rows)?;
        self.ensure_batch_buffers()?;
        let (n_rows, _) = self.upload_batch_chunk(rows, &positions)?;
        self.ensure_batch_step(n_rows)?;
        let compiled = self.batch_steps.get_mut(&n_rows).expect("compiled above");
        // SAFETY: as in `step_chunk`; profile waits for its run.
        let times = unsafe { self.backend.profile(&mut compiled.exe) }?;
        Ok((times, compiled.planned.fg.graph.clone()))
    }

    /// The logits (`vocab` values) of the last token of the last forward step, by
    /// [`Model::forward`] or [`Model::forward_sample`]. Errors before the first step.
    pub fn last_logits(&self) -> Result<Vec<f32>> {
        if self.last_plan.is_none() {
            return Err(Error::invalid("last_logits", "no forward step has run yet"));
        }
        let mut logits = vec![0.0; self.config.vocab];
        self.download_f32(names::LOGITS, &mut logits)?;
        Ok(logits)
    }

    /// Runs one decode step of `token` at the next position as [`Model::forward`]
    /// (with `sample`, [`Model::forward_sample`] with uniform 0.5) does, but with each
    /// launch timed alone ([`Backend::profile`]); the position is not consumed. Returns
    /// the launches' times and the step's graph (for the operands of each op). On a
    /// hybrid model the run advances the recurrent states, which cannot be rewound:
    /// the sequence is forgotten (as [`Model::reset`]).
    pub fn profile_decode(
        &mut self,
        token: u32,
        sample: Option<SampleParams>,
    ) -> Result<(Vec<LaunchProfile>, Graph)> {
        self.check_step(&[token])?;
        let uniform = sample.map(|_| 0.5);
        for (name, bytes) in step_inputs(&[token], self.slot_lens[0], uniform) {
            let buf = self
                .memory
                .get_mut(name)
                .expect("input buffers are allocated at load");
            self.backend.upload(buf, &bytes)?;
        }
        let (config, weights, cache) = (&self.config, &self.weights, self.cache);
        let (backend, memory) = (&self.backend, &mut self.memory);
        let compiled = self.decode.get_or_compile(sample, || {
            Compiled::new(
                backend,
                planned_graph(config, weights, 1, cache, sample)?,
                memory,
            )
        })?;
        // SAFETY: as in `step`; profile waits for its run.
        let times = unsafe { self.backend.profile(&mut compiled.exe) };
        if !self.recurrent.is_empty() {
            self.slot_lens[0] = 0;
        }
        let times = times?;
        Ok((times, compiled.planned.fg.graph.clone()))
    }

    /// The model memory buffer `name`, one of those [`Model::load`] allocates, or of
    /// the batched steps' once one ran ([`Model::ensure_batch_buffers`]).
    fn buffer(&self, name: &str) -> &BE::Buffer {
        self.memory
            .get(name)
            .expect("inputs and outputs are allocated before they are read")
    }

    /// Checks that `tokens` can run at the next positions.
    fn check_step(&self, tokens: &[u32]) -> Result<()> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::invalid("forward", "no tokens"));
        }
        if self.slot_lens[0] + t > self.cache.capacity {
            return Err(Error::invalid(
                "forward",
                format!(
                    "context full: {} cached + {t} new positions exceed the cache's {}",
                    self.slot_lens[0], self.cache.capacity
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

    /// Runs `tokens` at the next positions in chunks of [`Model::prefill_chunk`]
    /// ([`Model::step_chunk`]), the last one with the sampling head when `sample`
    /// gives its settings and uniform number. Records the largest chunk's plan. On an
    /// error no position is consumed; on a hybrid model, whose recurrent states a
    /// failed step may have advanced, the sequence is forgotten (as [`Model::reset`]).
    /// A step at position 0 first zeroes the recurrent states. Returns when the work
    /// is enqueued.
    fn step(&mut self, tokens: &[u32], sample: Option<(SampleParams, f32)>) -> Result<()> {
        self.check_step(tokens)?;
        if self.slot_lens[0] == 0 {
            self.zero_recurrent_states()?;
        }
        let start = self.slot_lens[0];
        let n_chunks = tokens.len().div_ceil(self.prefill_chunk);
        let mut largest: Option<PlanSummary> = None;
        for (i, chunk) in tokens.chunks(self.prefill_chunk).enumerate() {
            let head = if i + 1 == n_chunks { sample } else { None };
            match self.step_chunk(chunk, head) {
                // The first chunk is the largest.
                Ok(plan) => largest = largest.or(Some(plan)),
                Err(e) => {
                    self.slot_lens[0] = if self.recurrent.is_empty() { start } else { 0 };
                    return Err(e);
                }
            }
        }
        self.last_plan = largest;
        Ok(())
    }

    /// Runs one chunk of `tokens` at the next positions through the forward graph,
    /// which ends with a sampling head when `sample` is given, and consumes their
    /// positions. Several tokens run as one graph built, checked and executed for
    /// them; one token runs an executable compiled once per head and kept, with only
    /// its inputs uploaded. Returns the graph's memory use.
    fn step_chunk(
        &mut self,
        tokens: &[u32],
        sample: Option<(SampleParams, f32)>,
    ) -> Result<PlanSummary> {
        let t = tokens.len();
        let params = sample.map(|(p, _)| p);
        for (name, bytes) in step_inputs(tokens, self.slot_lens[0], sample.map(|(_, u)| u)) {
            let buf = self
                .memory
                .get_mut(name)
                .expect("input buffers are allocated at load");
            self.backend.upload(buf, &bytes)?;
        }
        let (config, weights, cache) = (&self.config, &self.weights, self.cache);
        let memory_plan = if t == 1 {
            let (backend, memory) = (&self.backend, &mut self.memory);
            let compiled = self.decode.get_or_compile(params, || {
                Compiled::new(
                    backend,
                    planned_graph(config, weights, 1, cache, params)?,
                    memory,
                )
            })?;
            // SAFETY: the executable's memory is the model's own: its buffers and the
            // step's scratch, which stay allocated while the executable lives, and
            // which the host reads only through downloads, ordered after the run.
            unsafe { self.backend.run(&mut compiled.exe) }?;
            compiled.planned.plan.clone()
        } else {
            let planned = planned_graph(config, weights, t, cache, params)?;
            execute(&self.backend, &planned, &mut self.scratch, &mut self.memory)?;
            planned.plan
        };
        self.slot_lens[0] += t;
        Ok(PlanSummary {
            n_tokens: t,
            persistent_bytes: memory_plan.persistent_bytes,
            peak_bytes: memory_plan.peak_bytes(),
            peak_bytes_unaliased: memory_plan.peak_bytes_unaliased(),
        })
    }
}

/// Compares the tokenizer's vocabulary (`tokenizer.ggml.tokens`, when the file has
/// one) with the rows of the embedding table, which llama.cpp requires to be equal:
/// more tokens than rows is an error (the tokenizer would give ids the model cannot
/// embed); fewer is a warning (the model can choose ids that have no text).
fn check_vocabulary<B: AsRef<[u8]>>(file: &Gguf<B>, config: &ModelConfig) -> Result<()> {
    let key = crate::tokenizer::keys::TOKENS;
    let Ok(tokens) = file.metadata().get_array(key) else {
        return Ok(());
    };
    let (n_tokens, rows) = (tokens.len(), config.vocab);
    if n_tokens > rows {
        return Err(Error::format(
            key,
            format!(
                "the tokenizer has {n_tokens} tokens but token_embd.weight has only {rows} rows; ids from {rows} on could not be run"
            ),
        ));
    }
    if n_tokens < rows {
        tracing::warn!(
            "the model's tokenizer has {n_tokens} tokens but its embedding table (token_embd.weight) has {rows} rows; ids from {n_tokens} on have no text and print nothing if generated"
        );
    }
    Ok(())
}

/// A forward graph with its memory plan.
struct Planned {
    fg: ForwardGraph,
    plan: MemoryPlan,
}

/// A one-token graph compiled over the model's memory and a scratch of its own (so
/// that no other graph's plan can move its transient buffers).
struct Compiled<BE: Backend> {
    planned: Planned,
    exe: BE::Executable,
    /// Holds the executable's transient memory; read only through `exe`.
    _scratch: Scratch<BE::Buffer>,
}

impl<BE: Backend> Compiled<BE> {
    fn new(
        backend: &BE,
        planned: Planned,
        memory: &mut HashMap<String, BE::Buffer>,
    ) -> Result<Self> {
        let mut scratch = Scratch::new();
        scratch.ensure(backend, &planned.plan)?;
        let exe = {
            let mut bindings = bind(&planned.fg, &planned.plan, &mut scratch, memory)?;
            backend.compile(&planned.fg.graph, &mut bindings)?
        };
        Ok(Self {
            planned,
            exe,
            _scratch: scratch,
        })
    }
}

/// The one-token (decode) executables compiled so far: one that ends with the logits,
/// and one with a sampling head for the settings it was last asked for.
struct DecodeSteps<BE: Backend> {
    logits: Option<Compiled<BE>>,
    sample: Option<Compiled<BE>>,
}

impl<BE: Backend> Default for DecodeSteps<BE> {
    fn default() -> Self {
        Self {
            logits: None,
            sample: None,
        }
    }
}

impl<BE: Backend> DecodeSteps<BE> {
    /// The executable with a sampling head of `params` (with none for `None`),
    /// compiled by `compile` unless the one kept has that head.
    fn get_or_compile(
        &mut self,
        params: Option<SampleParams>,
        compile: impl FnOnce() -> Result<Compiled<BE>>,
    ) -> Result<&mut Compiled<BE>> {
        let slot = match params {
            None => &mut self.logits,
            Some(_) => &mut self.sample,
        };
        let compiled = match slot.take() {
            Some(kept) if kept.planned.fg.sample.map(|h| h.params) == params => kept,
            _ => compile()?,
        };
        Ok(slot.insert(compiled))
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
    ];
    if t > 1 {
        inputs.push((names::LAST_ROW, i32_bytes(std::iter::once(t - 1))));
    }
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

/// The batched-step graph of `n_tokens` rows projecting `n_logits` rows' logits
/// ([`forward::build_batch`]), and its memory plan.
fn planned_batch_graph(
    config: &ModelConfig,
    weights: &HashMap<String, WeightDesc>,
    n_tokens: usize,
    n_logits: usize,
    cache: CacheSpec,
) -> Result<Planned> {
    let fg = forward::build_batch(config, &lookup(weights), n_tokens, n_logits, cache)?;
    let plan = plan(&fg.graph, Aliasing::On);
    Ok(Planned { fg, plan })
}

/// Whether tensor `name` belongs to a block past the model's `n_layers` (a
/// multi-token-prediction layer a file may carry after them, which no graph reads and
/// a model does not load).
fn beyond_layers(name: &str, n_layers: usize) -> bool {
    name.strip_prefix("blk.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|block| block.parse::<usize>().ok())
        .is_some_and(|block| block >= n_layers)
}

/// The dtype and shape of every tensor of `file`, by name.
fn raw_weight_descs<B: AsRef<[u8]>>(
    file: &Gguf<B>,
    n_layers: usize,
) -> HashMap<String, WeightDesc> {
    file.tensor_infos()
        .iter()
        .filter(|t| !beyond_layers(t.name(), n_layers))
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

/// The weights a model loaded from `file` on a backend that stacks weights
/// ([`Backend::stacks_weights`]) holds, by name: the file's tensors, with the parts
/// of each of [`weight_stacks`] replaced by their stack.
pub fn weight_descs<B: AsRef<[u8]>>(file: &Gguf<B>) -> Result<HashMap<String, WeightDesc>> {
    let config = ModelConfig::from_gguf(file)?;
    let mut weights = raw_weight_descs(file, config.n_layers);
    apply_splits(&mut weights, &weight_splits(&config))?;
    stack_weights(&mut weights)?;
    Ok(weights)
}

/// Replaces the parts of each of [`weight_stacks`] in `weights` (descriptions of GGUF
/// tensors by name) by their stack, as a model loading them holds them.
pub fn stack_weights(weights: &mut HashMap<String, WeightDesc>) -> Result<()> {
    let stacks = weight_stacks(weights);
    apply_stacks(weights, &stacks)
}

/// A weight a model builds at load by stacking the rows of several tensors of one
/// dtype and shape but for their row counts, so that one product reads them all. The
/// rows are those of each tensor's matrices (its last two dimensions): for each index
/// of the leading dimensions (an expert of `[n_expert, rows, cols]` tensors), the
/// parts' rows of that matrix one after another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightStack {
    /// The stacked weight's name.
    pub name: String,
    /// The stacked tensors, in row order.
    pub parts: Vec<String>,
}

impl WeightStack {
    /// The stacked weight's dtype and shape: its parts' rows one after another in
    /// each matrix.
    fn desc(&self, weights: &HashMap<String, WeightDesc>) -> Result<WeightDesc> {
        let parts: Vec<&WeightDesc> = self
            .parts
            .iter()
            .map(|p| {
                weights
                    .get(p)
                    .ok_or_else(|| Error::format("model", format!("tensor {p:?} is missing")))
            })
            .collect::<Result<_>>()?;
        let bad = || Error::format("model", format!("tensors {:?} do not stack", self.parts));
        let first = parts.first().ok_or_else(bad)?;
        let axis = rows_axis(&first.shape).ok_or_else(bad)?;
        let rows = parts.iter().try_fold(0usize, |rows, p| {
            p.shape.get(axis).and_then(|&r| rows.checked_add(r))
        });
        let mut shape = first.shape.clone();
        match rows {
            Some(rows) => shape[axis] = rows,
            None => return Err(bad()),
        }
        Ok(WeightDesc {
            name: self.name.clone(),
            dtype: first.dtype,
            shape,
        })
    }

    /// The stacked weight's bytes, from `file`'s tensors: for each matrix, each part's
    /// rows of it in turn.
    fn bytes<B: AsRef<[u8]>>(&self, file: &Gguf<B>) -> Result<Vec<u8>> {
        let tensors = self
            .parts
            .iter()
            .map(|p| file.tensor(p))
            .collect::<Result<Vec<_>>>()?;
        let matrices = |shape: &[usize]| -> usize {
            rows_axis(shape).map_or(1, |axis| shape[..axis].iter().product())
        };
        let n = tensors.first().map_or(1, |t| matrices(t.info.shape()));
        if n == 0
            || tensors
                .iter()
                .any(|t| matrices(t.info.shape()) != n || t.data.len() % n != 0)
        {
            return Err(Error::format(
                "model",
                format!("tensors {:?} do not stack", self.parts),
            ));
        }
        let mut out = Vec::with_capacity(tensors.iter().map(|t| t.data.len()).sum());
        for m in 0..n {
            for t in &tensors {
                let size = t.data.len() / n;
                out.extend_from_slice(&t.data[m * size..(m + 1) * size]);
            }
        }
        Ok(out)
    }
}

/// The dimension of `shape` that counts a matrix's rows: the second last (the only
/// one of a vector).
fn rows_axis(shape: &[usize]) -> Option<usize> {
    match shape.len() {
        0 => None,
        1 => Some(0),
        n => Some(n - 2),
    }
}

/// The weights a model stacks at load on a backend that stacks weights
/// ([`Backend::stacks_weights`]), per layer `N` where every part exists with one
/// dtype and, for matrices, one row length: `blk.N.attn_qkv.weight` (the query, key
/// and value projections) with `blk.N.attn_qkv.bias` where all three have biases
/// (none stacked when only some have), `blk.N.ffn_gate_up.weight` (the feed-forward
/// gate, then up), and for a mixture of experts `blk.N.ffn_gate_up_exps.weight` (each
/// expert's gate rows, then its up rows) and `blk.N.ffn_gate_up_shexp.weight` (the
/// shared expert's gate, then up). The forward graph uses a stack where there is one.
pub fn weight_stacks(weights: &HashMap<String, WeightDesc>) -> Vec<WeightStack> {
    let stackable = |parts: &[String]| {
        let descs: Vec<&WeightDesc> = parts.iter().filter_map(|p| weights.get(p)).collect();
        descs.len() == parts.len()
            && descs.iter().all(|d| {
                let (shape, first) = (&d.shape, &descs[0].shape);
                d.dtype == descs[0].dtype
                    && shape.len() == first.len()
                    && rows_axis(shape).is_some_and(|axis| {
                        shape[..axis] == first[..axis] && shape[axis + 1..] == first[axis + 1..]
                    })
            })
    };
    let mut stacks = Vec::new();
    for l in 0.. {
        let prefix = format!("blk.{l}.");
        if !weights.keys().any(|k| k.starts_with(&prefix)) {
            break;
        }
        let names = |suffix: &str, parts: &[&str]| -> Vec<String> {
            parts
                .iter()
                .map(|p| format!("{prefix}{p}.{suffix}"))
                .collect()
        };
        let qkv = ["attn_q", "attn_k", "attn_v"];
        let (w, b) = (names("weight", &qkv), names("bias", &qkv));
        let some_bias = b.iter().any(|n| weights.contains_key(n));
        if stackable(&w) && (!some_bias || stackable(&b)) {
            stacks.push(WeightStack {
                name: format!("{prefix}attn_qkv.weight"),
                parts: w,
            });
            if some_bias {
                stacks.push(WeightStack {
                    name: format!("{prefix}attn_qkv.bias"),
                    parts: b,
                });
            }
        }
        // The dense feed-forward's, the experts' and the shared expert's.
        for suffix in ["", "_exps", "_shexp"] {
            let (gate, up) = (format!("ffn_gate{suffix}"), format!("ffn_up{suffix}"));
            let parts = names("weight", &[&gate, &up]);
            if stackable(&parts) {
                stacks.push(WeightStack {
                    name: format!("{prefix}ffn_gate_up{suffix}.weight"),
                    parts,
                });
            }
        }
    }
    stacks
}

/// A weight a model builds at load, on every backend, from row ranges of one file
/// tensor, so that a product computes only what one consumer reads: the hybrid models'
/// interleaved projections ([`weight_splits`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSplit {
    /// The derived weight's name.
    pub name: String,
    /// The file tensor whose rows it takes.
    pub source: String,
    /// The source's rows, in order.
    pub rows: Vec<Range<usize>>,
}

impl WeightSplit {
    /// The derived weight's dtype and shape: the source's, with the rows taken.
    fn desc(&self, raw: &HashMap<String, WeightDesc>) -> Result<WeightDesc> {
        let src = raw.get(&self.source).ok_or_else(|| {
            Error::format("model", format!("tensor {:?} is missing", self.source))
        })?;
        let n_rows = src.shape.first().copied().unwrap_or(0);
        if self.rows.iter().any(|r| r.start > r.end || r.end > n_rows) {
            return Err(Error::format(
                format!("tensor {:?}", self.source),
                format!("{n_rows} rows, too few for {:?}", self.rows),
            ));
        }
        let mut shape = src.shape.clone();
        shape[0] = self.rows.iter().map(ExactSizeIterator::len).sum();
        Ok(WeightDesc {
            name: self.name.clone(),
            dtype: src.dtype,
            shape,
        })
    }

    /// The derived weight's bytes: its rows of the source, whose rows are whole
    /// blocks of its dtype.
    fn bytes<B: AsRef<[u8]>>(&self, file: &Gguf<B>) -> Result<Vec<u8>> {
        let tensor = file.tensor(&self.source)?;
        let info = tensor.info;
        let n_rows = info.shape().first().copied().unwrap_or(1).max(1);
        let row_bytes = tensor.data.len() / n_rows;
        let mut out = Vec::new();
        for r in &self.rows {
            let part = tensor
                .data
                .get(r.start * row_bytes..r.end * row_bytes)
                .ok_or_else(|| {
                    Error::format(
                        format!("tensor {:?}", self.source),
                        format!("rows {r:?} are outside its {n_rows}"),
                    )
                })?;
            out.extend_from_slice(part);
        }
        Ok(out)
    }
}

/// The weights every model of `config` derives at load ([`WeightSplit`]): for each
/// full-attention layer of a hybrid model (Qwen3-Next, Qwen3.5), `blk.N.attn_q.weight`
/// (per head its query rows, then its gate rows) as `blk.N.attn_q.q.weight` and
/// `blk.N.attn_q.gate.weight`; for each Qwen3-Next linear-attention layer,
/// `blk.N.ssm_ba.weight` (per query/key head its value heads' `b` rows, then their
/// `a` rows) as `blk.N.ssm_ba.b.weight` and `blk.N.ssm_ba.a.weight`. None for other
/// architectures.
pub fn weight_splits(config: &ModelConfig) -> Vec<WeightSplit> {
    let Some(lin) = &config.linear else {
        return Vec::new();
    };
    // `groups` groups of rows, each `parts` runs of `len` rows: part `p` of each.
    let split = |l: usize, source: &str, groups: usize, len: usize, parts: [&str; 2]| {
        parts
            .into_iter()
            .enumerate()
            .map(|(p, part)| WeightSplit {
                name: format!("blk.{l}.{source}.{part}.weight"),
                source: format!("blk.{l}.{source}.weight"),
                rows: (0..groups)
                    .map(|g| (2 * g + p) * len..(2 * g + p + 1) * len)
                    .collect(),
            })
            .collect::<Vec<_>>()
    };
    let h = &lin.heads;
    (0..config.n_layers)
        .flat_map(|l| {
            if !lin.is_linear(l) {
                split(l, "attn_q", config.n_heads, config.head_dim, ["q", "gate"])
            } else if lin.fused_beta_alpha {
                split(l, "ssm_ba", h.n_k_heads, h.group(), ["b", "a"])
            } else {
                Vec::new()
            }
        })
        .collect()
}

/// Replaces the source of each of `splits` in `weights` by the derived weights.
fn apply_splits(weights: &mut HashMap<String, WeightDesc>, splits: &[WeightSplit]) -> Result<()> {
    let descs = splits
        .iter()
        .map(|s| s.desc(weights))
        .collect::<Result<Vec<_>>>()?;
    for split in splits {
        weights.remove(&split.source);
    }
    for desc in descs {
        weights.insert(desc.name.clone(), desc);
    }
    Ok(())
}

/// The recurrent states of a model of `config`, by name with their bytes: a hybrid
/// model's convolution and delta-rule states of each linear-attention layer.
fn recurrent_states(config: &ModelConfig) -> Vec<(String, usize)> {
    let Some(lin) = &config.linear else {
        return Vec::new();
    };
    (0..config.n_layers)
        .filter(|&l| lin.is_linear(l))
        .flat_map(|l| {
            [
                (names::conv_state(l), lin.conv_state_elements() * 4),
                (names::delta_state(l), lin.heads.state_elements() * 4),
            ]
        })
        .collect()
}

/// Replaces the parts of each of `stacks` in `weights` by the stack.
fn apply_stacks(weights: &mut HashMap<String, WeightDesc>, stacks: &[WeightStack]) -> Result<()> {
    for stack in stacks {
        let desc = stack.desc(weights)?;
        for part in &stack.parts {
            weights.remove(part);
        }
        weights.insert(stack.name.clone(), desc);
    }
    Ok(())
}

/// The forward graph of `config` for `n_tokens` tokens over the tensors `weights`.
pub fn graph_for(
    config: &ModelConfig,
    weights: &HashMap<String, WeightDesc>,
    n_tokens: usize,
    cache: CacheSpec,
) -> Result<ForwardGraph> {
    forward::build(config, &lookup(weights), n_tokens, cache)
}

/// The description of each of `weights` by name; a missing one is an error naming it.
fn lookup(weights: &HashMap<String, WeightDesc>) -> impl Fn(&str) -> Result<WeightDesc> + '_ {
    |name: &str| {
        weights
            .get(name)
            .cloned()
            .ok_or_else(|| Error::format("model", format!("tensor {name:?} is missing")))
    }
}

/// Bindings of `fg`'s transient buffers to `scratch` (sized for `memory_plan`) and of
/// its persistent ones to the model memory of the same name.
fn bind<'a, B: kiln_core::DeviceBuffer>(
    fg: &ForwardGraph,
    memory_plan: &MemoryPlan,
    scratch: &'a mut Scratch<B>,
    memory: &'a mut HashMap<String, B>,
) -> Result<Bindings<'a, B>> {
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
    Ok(bindings)
}

/// Grows `scratch` to `planned`'s memory plan, binds its graph to the model memory and
/// the scratch, and executes it once.
fn execute<BE: Backend>(
    backend: &BE,
    planned: &Planned,
    scratch: &mut Scratch<BE::Buffer>,
    memory: &mut HashMap<String, BE::Buffer>,
) -> Result<()> {
    scratch.ensure(backend, &planned.plan)?;
    let mut bindings = bind(&planned.fg, &planned.plan, scratch, memory)?;
    backend.execute(&planned.fg.graph, &mut bindings)
}
