//! Real-shaped models with random weights, for measuring speed without downloads.
//!
//! A preset is a real model's config.json (parsed by the same code as `kiln
//! convert`), so a synthetic file has exactly the real model's tensors, shapes and
//! architecture metadata. Weights are drawn from seeded normal distributions scaled
//! so that activations stay finite through every layer: matrices `N(0, 1/row_len)`,
//! the token embedding `N(0, 1/hidden)`, norms `1 + N(0, 0.02²)`, biases
//! `N(0, 0.02²)`, a linear-attention layer's decay rates `ssm_a` `-1 + N(0, 0.1²)`
//! (negative: its state decays). The tokenizer section is a valid byte-level BPE vocabulary of the
//! real size: GPT-2's 256 byte characters, then tokens made by random merges, then
//! the real model's special tokens at their real ids.

use crate::byte_level::BYTE_CHARS;
use crate::convert::{
    converted_desc, model_metadata, model_tensors, ConvertSummary, HfConfig, Vocab,
};
use crate::keys::tokenizer as keys;
use crate::output::OutputFile;
use crate::quantize::TypePolicy;
use crate::{GgufWriter, TensorDesc};
use kiln_core::{quant, DType, Error, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use std::collections::HashSet;
use std::io::BufWriter;
use std::path::Path;

/// A real model's shape and tokenizer conventions.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    /// The model's config.json.
    pub config_json: &'static str,
    /// `tokenizer.ggml.pre`.
    pub pre: &'static str,
    /// Ids below this are ordinary tokens; ids from it up to `control_end` are control
    /// tokens; the rest up to the vocabulary size are unused padding.
    pub n_normal: u32,
    pub control_end: u32,
    /// Control tokens with their real names; other control ids get generic names.
    pub named: &'static [(u32, &'static str)],
    pub bos: u32,
    pub eos: u32,
    pub add_bos: bool,
}

const LLAMA3_NAMED: &[(u32, &str)] = &[
    (128000, "<|begin_of_text|>"),
    (128001, "<|end_of_text|>"),
    (128006, "<|start_header_id|>"),
    (128007, "<|end_header_id|>"),
    (128008, "<|eom_id|>"),
    (128009, "<|eot_id|>"),
];

const QWEN_NAMED: &[(u32, &str)] = &[
    (151643, "<|endoftext|>"),
    (151644, "<|im_start|>"),
    (151645, "<|im_end|>"),
];

/// Qwen3.5's special tokens (ids 248044 to 248076 are control tokens).
const QWEN35_NAMED: &[(u32, &str)] = &[
    (248044, "<|endoftext|>"),
    (248045, "<|im_start|>"),
    (248046, "<|im_end|>"),
];

/// The presets `kiln synth` knows. The Qwen3.5 ones are the published checkpoints'
/// config.json (multimodal: the text model's hyperparameters in `text_config`; kiln
/// makes the text model).
pub const PRESETS: [Preset; 10] = [
    Preset {
        name: "llama-3.2-1b",
        config_json: r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": true, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001}"#,
        pre: "llama-bpe",
        n_normal: 128000,
        control_end: 128256,
        named: LLAMA3_NAMED,
        bos: 128000,
        eos: 128001,
        add_bos: true,
    },
    Preset {
        name: "llama-3.1-8b",
        config_json: r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": false, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001}"#,
        pre: "llama-bpe",
        n_normal: 128000,
        control_end: 128256,
        named: LLAMA3_NAMED,
        bos: 128000,
        eos: 128001,
        add_bos: true,
    },
    Preset {
        name: "qwen2.5-0.5b",
        config_json: r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "tie_word_embeddings": true, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643}"#,
        pre: "qwen2",
        n_normal: 151643,
        control_end: 151665,
        named: QWEN_NAMED,
        bos: 151643,
        eos: 151643,
        add_bos: false,
    },
    Preset {
        name: "qwen3-8b",
        config_json: r#"{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
            "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936,
            "bos_token_id": 151643, "eos_token_id": 151645}"#,
        pre: "qwen2",
        n_normal: 151643,
        control_end: 151665,
        named: QWEN_NAMED,
        bos: 151643,
        eos: 151645,
        add_bos: false,
    },
    Preset {
        name: "qwen3-30b-a3b",
        config_json: r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
            "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936,
            "bos_token_id": 151643, "eos_token_id": 151645}"#,
        pre: "qwen2",
        n_normal: 151643,
        control_end: 151665,
        named: QWEN_NAMED,
        bos: 151643,
        eos: 151645,
        add_bos: false,
    },
    Preset {
        name: "qwen3-235b-a22b",
        config_json: r#"{"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
            "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936,
            "bos_token_id": 151643, "eos_token_id": 151645}"#,
        pre: "qwen2",
        n_normal: 151643,
        control_end: 151665,
        named: QWEN_NAMED,
        bos: 151643,
        eos: 151645,
        add_bos: false,
    },
    Preset {
        name: "qwen3-next-80b-a3b",
        config_json: r#"{"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
            "intermediate_size": 5120, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
            "num_experts": 512, "num_experts_per_tok": 10, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
            "head_dim": 256, "partial_rotary_factor": 0.25, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "hidden_act": "silu",
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "rope_theta": 10000000,
            "attention_bias": false, "tie_word_embeddings": false, "vocab_size": 151936,
            "bos_token_id": 151643, "eos_token_id": 151645}"#,
        pre: "qwen2",
        n_normal: 151643,
        control_end: 151665,
        named: QWEN_NAMED,
        bos: 151643,
        eos: 151645,
        add_bos: false,
    },
    Preset {
        name: "qwen3.5-27b",
        config_json: r#"{"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "tie_word_embeddings": false, "text_config": {"model_type": "qwen3_5_text", "hidden_size": 5120,
            "intermediate_size": 17408, "num_hidden_layers": 64, "num_attention_heads": 24,
            "num_key_value_heads": 4, "head_dim": 256, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 48, "hidden_act": "silu",
            "attention_bias": false, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
            "rope_parameters": {"mrope_interleaved": true, "mrope_section": [11, 11, 10],
                "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"},
            "tie_word_embeddings": false, "vocab_size": 248320, "eos_token_id": 248044,
            "mtp_num_hidden_layers": 1}}"#,
        pre: "qwen35",
        n_normal: 248044,
        control_end: 248077,
        named: QWEN35_NAMED,
        bos: 248044,
        eos: 248046,
        add_bos: false,
    },
    Preset {
        name: "qwen3.5-35b-a3b",
        config_json: r#"{"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "tie_word_embeddings": false, "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": 2048,
            "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 256,
            "num_experts_per_tok": 8, "num_hidden_layers": 40, "num_attention_heads": 16,
            "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "hidden_act": "silu",
            "attention_bias": false, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
            "rope_parameters": {"mrope_interleaved": true, "mrope_section": [11, 11, 10],
                "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"},
            "tie_word_embeddings": false, "vocab_size": 248320, "eos_token_id": 248044,
            "mtp_num_hidden_layers": 1}}"#,
        pre: "qwen35",
        n_normal: 248044,
        control_end: 248077,
        named: QWEN35_NAMED,
        bos: 248044,
        eos: 248046,
        add_bos: false,
    },
    Preset {
        name: "qwen3.5-397b-a17b",
        config_json: r#"{"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "tie_word_embeddings": false, "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": 4096,
            "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024, "num_experts": 512,
            "num_experts_per_tok": 10, "num_hidden_layers": 60, "num_attention_heads": 32,
            "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 64, "hidden_act": "silu",
            "attention_bias": false, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
            "rope_parameters": {"mrope_interleaved": true, "mrope_section": [11, 11, 10],
                "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"},
            "tie_word_embeddings": false, "vocab_size": 248320, "eos_token_id": 248044,
            "mtp_num_hidden_layers": 1}}"#,
        pre: "qwen35",
        n_normal: 248044,
        control_end: 248077,
        named: QWEN35_NAMED,
        bos: 248044,
        eos: 248046,
        add_bos: false,
    },
];

/// The preset called `name`, or an error listing them.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        Error::invalid(
            "synth",
            format!("unknown preset {name:?}; presets: {}", names.join(", ")),
        )
    })
}

impl Preset {
    /// The preset's hyperparameters, parsed as `kiln convert` parses config.json.
    pub fn config(&self) -> Result<HfConfig> {
        let json: serde_json::Value = serde_json::from_str(self.config_json)
            .map_err(|e| Error::format(format!("preset {}", self.name), e.to_string()))?;
        let map = json.as_object().ok_or_else(|| {
            Error::format(format!("preset {}", self.name), "config is not an object")
        })?;
        HfConfig::parse(map, &format!("preset {}", self.name))
    }
}

/// What to synthesize.
#[derive(Clone, Copy, Debug)]
pub struct SynthOptions {
    /// The type of the weight matrices (norms, biases and 1-D tensors stay F32).
    pub dtype: DType,
    pub seed: u64,
}

/// The tensors a synthetic model of `config` with weight matrices of `dtype` holds,
/// in file order, typed as `kiln convert` types them ([`TypePolicy`]).
pub fn describe(config: &HfConfig, dtype: DType) -> Result<Vec<TensorDesc>> {
    let policy = TypePolicy::new(dtype)?;
    Ok(model_tensors(config)?
        .iter()
        .map(|t| converted_desc(&policy, &t.name, &t.shape))
        .collect())
}

/// Writes a synthetic model of `config` (named `name`) to `out`, one tensor after
/// another in batches of rows generated and quantized in parallel, so that memory
/// stays bounded whatever the model's size. `progress(done, total)` counts elements.
///
/// The file is written through an [`OutputFile`]: `out` must be a new path or a
/// regular file, and on failure it is left as it was.
pub fn write(
    preset: &Preset,
    config: &HfConfig,
    options: SynthOptions,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertSummary> {
    let policy = TypePolicy::new(options.dtype)?;
    let tensors = model_tensors(config)?;
    let descs = describe(config, options.dtype)?;
    let vocab = vocab(preset, config.vocab_size, options.seed);
    let name = format!("{} (synthetic)", preset.name);
    let mut md = model_metadata(&name, config, &vocab, policy.file_type(&descs));
    md.set(
        "general.description",
        format!(
            "random weights with the shapes of {}: kiln synth, seed {}",
            preset.name, options.seed
        ),
    );
    let total: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let mut output = OutputFile::create("kiln synth -o", out, &[])?;
    let label = output.path().to_owned();
    let mut writer = GgufWriter::new(BufWriter::new(output.file()), &label, &md, &descs)?;
    let mut done = 0;
    for (index, (tensor, desc)) in tensors.iter().zip(&descs).enumerate() {
        let seed = options.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        write_tensor(
            &mut writer,
            tensor.fixed.as_deref(),
            desc,
            config.hidden,
            seed,
            &mut |n| {
                done += n;
                progress(done, total)
            },
        )?;
    }
    writer
        .finish()?
        .into_inner()
        .map_err(|e| Error::io(&label, e.into_error()))?;
    let file_bytes = output.persist()?;
    Ok(ConvertSummary {
        tensors: descs.into_iter().map(|d| (d.name, d.dtype)).collect(),
        file_bytes,
    })
}

/// Rows generated (and quantized) per batch: about 4M elements.
const BATCH_ELEMENTS: usize = 1 << 22;

/// Writes one tensor: `fixed` bytes as they are, else random rows of `desc` drawn and
/// encoded in parallel in batches of about [`BATCH_ELEMENTS`], each batch written
/// while the next one is drawn; `progress` gets the elements of each batch written.
fn write_tensor<W: std::io::Write + Send>(
    writer: &mut GgufWriter<W>,
    fixed: Option<&[u8]>,
    desc: &TensorDesc,
    hidden: usize,
    seed: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    if let Some(bytes) = fixed {
        writer.write_tensor_data(bytes)?;
        progress((bytes.len() / 4) as u64);
        return Ok(());
    }
    let row_len = desc.shape.last().copied().unwrap_or(1).max(1);
    let rows: usize = desc.shape.iter().rev().skip(1).product();
    let draw = Draw::for_tensor(&desc.name, row_len, hidden);
    let rows_per_batch = (BATCH_ELEMENTS / row_len).max(1);
    let row_bytes = desc.dtype.bytes_for(row_len)?;
    // The batch drawn last, written while the next is drawn, and its element count.
    let mut pending: Option<(Vec<u8>, u64)> = None;
    let mut spare = Vec::new();
    for first in (0..rows).step_by(rows_per_batch) {
        let n = rows_per_batch.min(rows - first);
        let mut out = std::mem::take(&mut spare);
        out.resize(n * row_bytes, 0u8);
        let (written, drawn) = rayon::join(
            || match pending.take() {
                Some((bytes, count)) => writer
                    .write_tensor_data(&bytes)
                    .map(|()| Some((bytes, count))),
                None => Ok(None),
            },
            || {
                out.par_chunks_mut(row_bytes).enumerate().try_for_each_init(
                    || vec![0f32; row_len],
                    |values, (i, dst)| {
                        let row = (first + i) as u64;
                        let mut rng =
                            SmallRng::seed_from_u64(seed ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03));
                        for v in values.iter_mut() {
                            *v = draw.sample(&mut rng);
                        }
                        quant::quantize(desc.dtype, values, dst)
                    },
                )
            },
        );
        drawn?;
        if let Some((bytes, count)) = written? {
            progress(count);
            spare = bytes;
        }
        pending = Some((out, (n * row_len) as u64));
    }
    if let Some((bytes, count)) = pending {
        writer.write_tensor_data(&bytes)?;
        progress(count);
    }
    Ok(())
}

/// The distribution of one tensor's values: `offset + scale * N(0, 1)`.
struct Draw {
    offset: f32,
    scale: f32,
}

impl Draw {
    fn for_tensor(name: &str, row_len: usize, hidden: usize) -> Draw {
        if name.ends_with("_norm.weight") {
            Draw {
                offset: 1.0,
                scale: 0.02,
            }
        } else if name.ends_with(".ssm_a") {
            Draw {
                offset: -1.0,
                scale: 0.1,
            }
        } else if name.ends_with(".bias") {
            Draw {
                offset: 0.0,
                scale: 0.02,
            }
        } else if name == "token_embd.weight" {
            Draw {
                offset: 0.0,
                scale: 1.0 / (hidden as f32).sqrt(),
            }
        } else {
            Draw {
                offset: 0.0,
                scale: 1.0 / (row_len as f32).sqrt(),
            }
        }
    }

    fn sample(&self, rng: &mut SmallRng) -> f32 {
        let z: f32 = StandardNormal.sample(rng);
        self.offset + self.scale * z
    }
}

/// A byte-level BPE vocabulary of `size` tokens with `preset`'s special tokens.
pub fn vocab(preset: &Preset, size: usize, seed: u64) -> Vocab {
    let n_normal = (preset.n_normal as usize).min(size);
    let mut tokens: Vec<String> = BYTE_CHARS
        .iter()
        .take(n_normal)
        .map(|c| c.to_string())
        .collect();
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::with_capacity(n_normal.saturating_sub(256));
    let mut rng = SmallRng::seed_from_u64(seed);
    while tokens.len() < n_normal {
        // Merge a short early token with a byte: tokens stay a few characters long.
        let a = rng.random_range(0..tokens.len().min(8192));
        let b = rng.random_range(0..256);
        let merged = format!("{}{}", tokens[a], tokens[b]);
        if seen.insert(merged.clone()) {
            merges.push(format!("{} {}", tokens[a], tokens[b]));
            tokens.push(merged);
        }
    }
    let mut token_types = vec![1i32; n_normal];
    for id in n_normal as u32..size as u32 {
        let named = preset
            .named
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, t)| t.to_string());
        if id < preset.control_end {
            tokens.push(
                named.unwrap_or_else(|| {
                    format!("<|reserved_special_token_{}|>", id - preset.n_normal)
                }),
            );
            token_types.push(3);
        } else {
            tokens.push(format!("[PAD{id}]"));
            token_types.push(5);
        }
    }
    Vocab {
        pre: preset.pre,
        tokens,
        token_types,
        merges,
        special_ids: vec![(keys::BOS_ID, preset.bos), (keys::EOS_ID, preset.eos)],
        add_bos: Some(preset.add_bos),
        add_eos: Some(false),
        chat_template: None,
    }
}
