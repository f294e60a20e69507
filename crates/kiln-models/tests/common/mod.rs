//! Tiny models built in memory, and the path an untrusted GGUF file takes through
//! kiln to a running model: GGUF -> configuration -> forward graphs -> tokenizer ->
//! model on the CPU -> a prefill and a decode step.
//!
//! Shared by the malformed-model tests of kiln-models and kiln-cli, the seed writer
//! `examples/write_load_seeds.rs` and the `load_model` fuzz target (which include
//! this file by path), so that the function fuzzed is the function tested.

#![allow(dead_code)] // each includer uses a different subset

use kiln_core::ops::SampleParams;
use kiln_core::{Backend, Bindings, DType, Graph, LaunchProfile, Op, Result};
use kiln_cpu::{CpuBackend, CpuBuffer, CpuExecutable};
use kiln_gguf::{Gguf, GgufWriter, Metadata, SharedBytes, TensorDesc};
use kiln_models::forward::CacheSpec;
use kiln_models::model::{graph_for, weight_descs};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, ModelConfig, Sampler, SamplerConfig};

/// Positions the caches of an untrusted model hold: enough for a two-token prefill
/// and a decode step.
pub const CONTEXT: usize = 4;

/// Loads `bytes` as kiln loads a model a user gives it, and runs a prefill of two
/// tokens and a greedy decode step on the CPU. Any malformed input must come back as
/// an error; a panic (an index out of bounds, an overflow, an allocation without
/// bound) is a bug. On success, checks what a caller relies on: the loaded model's
/// configuration is the file's, the logits have one value per vocabulary entry, the
/// chosen token is in the vocabulary, and the tokenizer's ids are too.
pub fn load_untrusted(bytes: &[u8]) -> Result<()> {
    let file = Gguf::from_shared(SharedBytes::new(bytes.to_vec()), "untrusted.gguf")?;
    let config = ModelConfig::from_gguf(&file)?;
    let weights = weight_descs(&file)?;
    for n_tokens in [1, 2] {
        let cache = CacheSpec {
            capacity: CONTEXT,
            dtype: DType::F32,
            slots: 1,
        };
        graph_for(&config, &weights, n_tokens, cache)?;
    }
    // The tokenizer is independent of the weights: a model whose tokenizer is
    // malformed still goes through loading, and the other way round.
    let tokenizer = Tokenizer::from_gguf_metadata(file.metadata())
        .and_then(|t| t.check_vocab(config.vocab).map(|()| t));
    if let Ok(tokenizer) = &tokenizer {
        let ids = tokenizer.encode("ROMEO: a ab", true, true);
        assert!(
            ids.iter().all(|&id| (id as usize) < config.vocab),
            "token ids {ids:?} outside the vocabulary of {}",
            config.vocab
        );
        tokenizer.decode(&ids);
        for id in 0..config.vocab.min(1 << 12) as u32 {
            tokenizer.decode(&[id]);
        }
    }
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 1,
    };
    let mut model = Model::load(CpuBackend, &file, options, &mut |_, _| {})?;
    assert_eq!(model.config(), &config, "the loaded model's configuration");
    let last = (config.vocab - 1) as u32;
    let logits = model.forward(&[0, last])?;
    assert_eq!(logits.len(), config.vocab);
    let greedy = SampleParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };
    let token = model.forward_sample(&[last], greedy, 0.5)?;
    assert!((token as usize) < config.vocab, "sampled token {token}");
    tokenizer.map(|_| ())
}

/// The shape of a tiny model: which architecture and which optional tensors.
#[derive(Clone, Copy, Debug)]
pub struct Tiny {
    pub arch: &'static str,
    pub layers: usize,
    pub d: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Llama's `rope_freqs.weight`.
    pub freq_factors: bool,
    /// No `output.weight`: the head reuses the token embedding.
    pub tied: bool,
}

impl Tiny {
    /// A llama with one layer, 8-wide, 2 heads of 4 sharing one KV head, its own
    /// output matrix and rope frequency factors.
    pub const LLAMA: Tiny = Tiny {
        arch: "llama",
        layers: 1,
        d: 8,
        ff: 16,
        heads: 2,
        kv_heads: 1,
        freq_factors: true,
        tied: false,
    };

    /// Qwen2 (biases on q, k, v), tied embeddings, two layers.
    pub const QWEN2: Tiny = Tiny {
        arch: "qwen2",
        layers: 2,
        freq_factors: false,
        tied: true,
        ..Tiny::LLAMA
    };

    /// Qwen3 (per-head q and k norms).
    pub const QWEN3: Tiny = Tiny {
        arch: "qwen3",
        freq_factors: false,
        ..Tiny::LLAMA
    };

    pub fn head_dim(&self) -> usize {
        self.d / self.heads
    }

    /// Every tensor with its row-major shape, in the order llama.cpp writes them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, ff, hd) = (self.d, self.ff, self.head_dim());
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let vocab = TOKENS.len();
        let mut t: Vec<(String, Vec<usize>)> = vec![("token_embd.weight".into(), vec![vocab, d])];
        if self.freq_factors {
            t.push(("rope_freqs.weight".into(), vec![hd / 2]));
        }
        for l in 0..self.layers {
            let mut add =
                |name: &str, shape: &[usize]| t.push((format!("blk.{l}.{name}"), shape.to_vec()));
            add("attn_norm.weight", &[d]);
            add("attn_q.weight", &[q, d]);
            add("attn_k.weight", &[kv, d]);
            add("attn_v.weight", &[kv, d]);
            if self.arch == "qwen2" {
                add("attn_q.bias", &[q]);
                add("attn_k.bias", &[kv]);
                add("attn_v.bias", &[kv]);
            }
            if self.arch == "qwen3" {
                add("attn_q_norm.weight", &[hd]);
                add("attn_k_norm.weight", &[hd]);
            }
            add("attn_output.weight", &[d, q]);
            add("ffn_norm.weight", &[d]);
            add("ffn_gate.weight", &[ff, d]);
            add("ffn_up.weight", &[ff, d]);
            add("ffn_down.weight", &[d, ff]);
        }
        t.push(("output_norm.weight".into(), vec![d]));
        if !self.tied {
            t.push(("output.weight".into(), vec![vocab, d]));
        }
        t
    }

    /// The architecture's hyperparameters and a SentencePiece tokenizer of
    /// [`TOKENS`].
    pub fn metadata(&self) -> Metadata {
        let mut md = Metadata::new();
        md.set("general.architecture", self.arch);
        md.set("general.name", format!("tiny {}", self.arch));
        let k = |key: &str| format!("{}.{key}", self.arch);
        md.set(k("block_count"), self.layers as u32);
        md.set(k("context_length"), 64u32);
        md.set(k("embedding_length"), self.d as u32);
        md.set(k("feed_forward_length"), self.ff as u32);
        md.set(k("attention.head_count"), self.heads as u32);
        md.set(k("attention.head_count_kv"), self.kv_heads as u32);
        md.set(k("attention.layer_norm_rms_epsilon"), 1e-5f32);
        md.set(k("rope.freq_base"), 10_000f32);
        md.set("tokenizer.ggml.model", "llama");
        md.set(
            "tokenizer.ggml.tokens",
            TOKENS.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        );
        let types: Vec<i32> = (0..TOKENS.len())
            .map(|i| match i {
                0 => 2,
                1 | 2 => 3,
                _ => 1,
            })
            .collect();
        md.set("tokenizer.ggml.token_type", types);
        let scores: Vec<f32> = (0..TOKENS.len()).map(|i| -(i as f32)).collect();
        md.set("tokenizer.ggml.scores", scores);
        md.set("tokenizer.ggml.bos_token_id", 1u32);
        md.set("tokenizer.ggml.eos_token_id", 2u32);
        md
    }

    /// The model's GGUF bytes, every tensor F32 with small deterministic values.
    pub fn bytes(&self) -> Vec<u8> {
        gguf_bytes(&self.metadata(), &self.tensors(), |_| DType::F32)
    }
}

/// The tiny models' SentencePiece vocabulary: unknown, BOS, EOS, then pieces.
pub const TOKENS: [&str; 12] = [
    "<unk>",
    "<s>",
    "</s>",
    "\u{2581}",
    "a",
    "b",
    "\u{2581}a",
    "ab",
    "R",
    "O",
    "M",
    ":",
];

/// A GGUF file of `metadata` and `tensors` (name, row-major shape), each stored as
/// `dtype_of(name)`, with deterministic values: norm weights and rope frequency
/// factors 1, others small and varied.
pub fn gguf_bytes(
    metadata: &Metadata,
    tensors: &[(String, Vec<usize>)],
    dtype_of: impl Fn(&str) -> DType,
) -> Vec<u8> {
    let descs: Vec<TensorDesc> = tensors
        .iter()
        .map(|(name, shape)| TensorDesc::new(name.clone(), dtype_of(name), shape))
        .collect();
    let mut w = GgufWriter::new(Vec::new(), "tiny.gguf", metadata, &descs).expect("tiny header");
    for (i, desc) in descs.iter().enumerate() {
        let n: usize = desc.shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|j| {
                if desc.name.ends_with("norm.weight") || desc.name == "rope_freqs.weight" {
                    1.0
                } else {
                    ((i * 31 + j * 7) % 17) as f32 / 32.0 - 0.25
                }
            })
            .collect();
        let mut bytes = vec![0u8; desc.dtype.bytes_for(n).expect("tiny tensor size")];
        if matches!(desc.dtype, DType::I32 | DType::U32 | DType::U8) {
            // Integer types have no quantizer: small values as their bytes.
            bytes
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 5) as u8);
        } else {
            kiln_core::quant::quantize(desc.dtype, &values, &mut bytes).expect("tiny tensor data");
        }
        w.write_tensor_data(&bytes).expect("tiny tensor data");
    }
    w.finish().expect("tiny file")
}

/// `tiny`'s file with tensor `name` given `shape` (removed where `shape` is `None`).
pub fn with_shape(tiny: &Tiny, name: &str, shape: Option<&[usize]>) -> Vec<u8> {
    let tensors: Vec<(String, Vec<usize>)> = tiny
        .tensors()
        .into_iter()
        .filter_map(|(n, s)| match (n == name, shape) {
            (false, _) => Some((n, s)),
            (true, Some(new)) => Some((n, new.to_vec())),
            (true, None) => None,
        })
        .collect();
    gguf_bytes(&tiny.metadata(), &tensors, |_| DType::F32)
}

/// The CPU backend as it loads models when weights are stacked: copies of every
/// weight, with the query, key and value (and gate and up) projections stacked; with
/// `download_fill`, every byte a download returns is overwritten with it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stacking {
    pub download_fill: Option<u8>,
}

impl Backend for Stacking {
    type Buffer = CpuBuffer;
    type Executable = CpuExecutable;

    fn name(&self) -> String {
        match self.download_fill {
            Some(byte) => format!("cpu (stacking, downloads of {byte:#04x})"),
            None => "cpu (stacking)".to_string(),
        }
    }
    fn alloc(&self, bytes: usize) -> Result<CpuBuffer> {
        CpuBackend.alloc(bytes)
    }
    fn upload(&self, dst: &mut CpuBuffer, src: &[u8]) -> Result<()> {
        CpuBackend.upload(dst, src)
    }
    fn download(&self, src: &CpuBuffer, dst: &mut [u8]) -> Result<()> {
        CpuBackend.download(src, dst)?;
        if let Some(byte) = self.download_fill {
            dst.fill(byte);
        }
        Ok(())
    }
    fn supports(&self, op: &Op) -> bool {
        CpuBackend.supports(op)
    }
    fn compile(
        &self,
        graph: &Graph,
        bindings: &mut Bindings<'_, CpuBuffer>,
    ) -> Result<CpuExecutable> {
        CpuBackend.compile(graph, bindings)
    }
    unsafe fn run(&self, exe: &mut CpuExecutable) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { CpuBackend.run(exe) }
    }
    fn synchronize(&self) -> Result<()> {
        CpuBackend.synchronize()
    }
    unsafe fn profile(&self, exe: &mut CpuExecutable) -> Result<Vec<LaunchProfile>> {
        // SAFETY: the caller's contract, passed on.
        unsafe { CpuBackend.profile(exe) }
    }
    fn copy(&self, src: &CpuBuffer, dst: &mut CpuBuffer) -> Result<()> {
        CpuBackend.copy(src, dst)
    }
}

/// The `n` tokens greedy generation ([`kiln_models::generate::generate`]) continues
/// `prompt` with on `model`, from the model's current position.
pub fn greedy_tokens<BE: Backend>(model: &mut Model<BE>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    kiln_models::generate::generate(model, prompt, n, &mut sampler, &|_| false, &mut |t| {
        out.push(t);
        Ok(())
    })
    .expect("generation runs");
    out
}

/// A sequence of a batched-generation scenario ([`batched_greedy`]): its prompt, the
/// step at which it joins the batch, and how many tokens it generates before it
/// leaves (its slot freed for a later sequence).
#[derive(Clone, Debug)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub join: usize,
    pub tokens: usize,
}

/// Greedy generation of every sequence of `sequences` on `model` through
/// [`Model::forward_batch`], one step at a time: a joining sequence takes the lowest
/// free slot and runs its whole prompt in that step (logits of its last row only),
/// placed among the single decode tokens of the sequences already running; a sequence
/// that has its tokens leaves and its slot is cleared. Returns each sequence's tokens.
pub fn batched_greedy<BE: Backend>(model: &mut Model<BE>, sequences: &[Sequence]) -> Vec<Vec<u32>> {
    use kiln_models::BatchRow;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); sequences.len()];
    let mut slot_of: Vec<Option<usize>> = vec![None; sequences.len()];
    let mut free: Vec<usize> = (0..model.slots()).rev().collect();
    let mut step = 0;
    while out.iter().zip(sequences).any(|(o, s)| o.len() < s.tokens) {
        let mut rows = Vec::new();
        let mut owners = Vec::new();
        for (i, s) in sequences.iter().enumerate() {
            if out[i].len() >= s.tokens {
                continue;
            }
            match slot_of[i] {
                Some(slot) => {
                    let token = *out[i].last().expect("a running sequence has a token");
                    rows.push(BatchRow {
                        slot,
                        token,
                        logits: true,
                    });
                    owners.push(i);
                }
                None if s.join <= step => {
                    let slot = free.pop().expect("a free slot for a joining sequence");
                    slot_of[i] = Some(slot);
                    assert_eq!(model.slot_len(slot), 0, "a free slot is empty");
                    // The prompt goes in the middle of the rows so far (which may split
                    // an earlier prompt: only each slot's own rows must stay in order).
                    let at = rows.len() / 2;
                    let owner_at = rows[..at].iter().filter(|r| r.logits).count();
                    let n = s.prompt.len();
                    for (j, &token) in s.prompt.iter().enumerate().rev() {
                        let logits = j + 1 == n;
                        rows.insert(
                            at,
                            BatchRow {
                                slot,
                                token,
                                logits,
                            },
                        );
                    }
                    owners.insert(owner_at, i);
                }
                None => {}
            }
        }
        assert!(!rows.is_empty(), "step {step}: nothing to run");
        let logits = model.forward_batch(&rows).expect("batched step runs");
        let vocab = model.config().vocab;
        assert_eq!(
            logits.len(),
            owners.len() * vocab,
            "step {step}: one row of logits per sequence"
        );
        for (&i, row) in owners.iter().zip(logits.chunks_exact(vocab)) {
            out[i].push(kiln_models::sampler::argmax(row) as u32);
            if out[i].len() == sequences[i].tokens {
                let slot = slot_of[i].expect("a finished sequence had a slot");
                model.clear_slot(slot);
                free.push(slot);
            }
        }
        step += 1;
    }
    out
}

/// Runs the same batched steps on two fresh models loaded alike from one file (3
/// slots or more, of 96 positions or more): on `greedy` through
/// [`Model::forward_batch_greedy`], on `logits` through [`Model::forward_batch`], and
/// asserts that each step's tokens are the host's argmax of its logits rows
/// ([`kiln_models::sampler::argmax`]) and that both models' slots advance alike. The
/// steps: three prompts (5, 3 and 1 tokens) in one bucket; decode steps of all slots,
/// in three orders; a new prompt of 6 rows in slot 1 between decode rows; a new prompt
/// of 70 rows in slot 2 (logits at every tenth) around slot 1's decode row, 72 rows in
/// all, which run the graph built for them, not a bucket's; a new prompt of 70 rows in
/// slot 1 that all want logits between decode rows (two chunks: 64 logits rows, then
/// 8); a last decode step. Each decode row runs its slot's latest greedy token.
pub fn assert_greedy_batches_take_the_argmax<BE: Backend>(
    greedy: &mut Model<BE>,
    logits: &mut Model<BE>,
) {
    use kiln_models::BatchRow;
    let vocab = logits.config().vocab;
    let tokens = |seed: u32, n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (seed * 977 + i * 131 + 7) % vocab as u32)
            .collect()
    };
    let prompt = |slot: usize, tokens: Vec<u32>, wants: fn(usize, usize) -> bool| {
        let n = tokens.len();
        tokens
            .into_iter()
            .enumerate()
            .map(move |(i, token)| BatchRow {
                slot,
                token,
                logits: wants(i, n),
            })
    };
    let last_only: fn(usize, usize) -> bool = |i, n| i + 1 == n;
    // Each slot's latest greedy token, which its next decode row runs.
    let mut latest = [0u32; 3];
    let decode = |latest: &[u32; 3], slot: usize| BatchRow {
        slot,
        token: latest[slot],
        logits: true,
    };
    let mut step =
        |rows: Vec<BatchRow>, cleared: Option<usize>, latest: &mut [u32; 3], what: &str| {
            if let Some(slot) = cleared {
                greedy.clear_slot(slot);
                logits.clear_slot(slot);
            }
            let got = greedy
                .forward_batch_greedy(&rows)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let want: Vec<u32> = logits
                .forward_batch(&rows)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .chunks_exact(vocab)
                .map(|row| kiln_models::sampler::argmax(row) as u32)
                .collect();
            assert_eq!(
                want.len(),
                rows.iter().filter(|r| r.logits).count(),
                "{what}: logits rows"
            );
            assert_eq!(got, want, "{what}: greedy tokens");
            for slot in 0..3 {
                assert_eq!(greedy.slot_len(slot), logits.slot_len(slot), "{what}");
            }
            for (row, token) in rows.iter().filter(|r| r.logits).zip(got) {
                latest[row.slot] = token;
            }
        };
    let rows: Vec<BatchRow> = prompt(0, tokens(1, 5), last_only)
        .chain(prompt(1, tokens(2, 3), last_only))
        .chain(prompt(2, tokens(3, 1), last_only))
        .collect();
    step(rows, None, &mut latest, "prompts of 5, 3 and 1 tokens");
    for (i, order) in [[0, 1, 2], [2, 0, 1], [1, 2, 0]].into_iter().enumerate() {
        let rows = order.iter().map(|&s| decode(&latest, s)).collect();
        step(rows, None, &mut latest, &format!("decode step {i}"));
    }
    // Slot 1 starts again: its prompt's rows between the other slots' decode rows.
    let rows: Vec<BatchRow> = std::iter::once(decode(&latest, 0))
        .chain(prompt(1, tokens(4, 6), last_only))
        .chain(std::iter::once(decode(&latest, 2)))
        .collect();
    step(
        rows,
        Some(1),
        &mut latest,
        "a prompt of 6 rows between decode rows",
    );
    let mut rows: Vec<BatchRow> = std::iter::once(decode(&latest, 0))
        .chain(prompt(2, tokens(5, 70), |i, _| i % 10 == 9))
        .collect();
    rows.insert(30, decode(&latest, 1));
    step(rows, Some(2), &mut latest, "72 rows, 9 of them logits rows");
    let rows: Vec<BatchRow> = std::iter::once(decode(&latest, 0))
        .chain(prompt(1, tokens(6, 70), |_, _| true))
        .chain(std::iter::once(decode(&latest, 2)))
        .collect();
    step(rows, Some(1), &mut latest, "72 logits rows");
    let rows = (0..3).map(|s| decode(&latest, s)).collect();
    step(rows, None, &mut latest, "the last decode step");
    assert_eq!(
        (0..3).map(|s| greedy.slot_len(s)).collect::<Vec<_>>(),
        [12, 71, 72]
    );
}

/// The project's small model (`models/shakespeare-tiny`) converted by kiln to a GGUF
/// of `dtype` in `dir`, opened.
pub fn small_model_gguf(dir: &std::path::Path, dtype: DType) -> kiln_gguf::GgufFile {
    let model_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny");
    let path = dir.join(format!("tiny-{dtype}.gguf"));
    kiln_gguf::convert::HfCheckpoint::open(model_dir)
        .expect("the small model's checkpoint opens")
        .write_gguf(&path, dtype, &mut |_, _| {})
        .expect("the small model converts");
    Gguf::open(&path).expect("the converted small model opens")
}
