//! `kiln_gguf::convert`: Hugging Face checkpoints to GGUF, checked with the GGUF
//! reader against the checkpoint's own files (config.json, safetensors and
//! tokenizer.json read directly here, values decoded with `half`).

use half::{bf16, f16};
use kiln_core::DType;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn shakespeare_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Converts `dir` to `dtype` in a fresh temporary directory and opens the result.
fn convert(dir: &Path, dtype: DType) -> (TempDir, GgufFile) {
    let out_dir = TempDir::new().unwrap();
    let out = out_dir.path().join("model.gguf");
    let checkpoint = HfCheckpoint::open(dir).unwrap();
    let mut progress_bytes = 0;
    let summary = checkpoint
        .write_gguf(&out, dtype, &mut |_, bytes| progress_bytes += bytes)
        .unwrap();
    assert_eq!(progress_bytes, checkpoint.source_bytes());
    assert_eq!(summary.file_bytes, std::fs::metadata(&out).unwrap().len());
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["model.gguf"], "no temporary file is left");
    let file = Gguf::open(&out).unwrap();
    (out_dir, file)
}

fn u32_key(file: &GgufFile, key: &str) -> u32 {
    file.metadata().get_u32(key).unwrap()
}

fn strings(file: &GgufFile, key: &str) -> Vec<String> {
    file.metadata()
        .get_array(key)
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::String(s) => s,
            other => panic!("{key}: {other:?} is not a string"),
        })
        .collect()
}

/// A tensor of a safetensors file, decoded to f32.
fn st_values(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F16 => bytes
            .chunks(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// The Hugging Face row that lands at GGUF row `row` of a llama q/k projection with
/// heads of `head_dim` rows (GGML's interleaved RoPE order): within each head, GGUF
/// rows 0, 1, 2, 3, ... are HF rows 0, d/2, 1, d/2 + 1, ...
fn hf_row_of(row: usize, head_dim: usize) -> usize {
    let (head, i) = (row / head_dim, row % head_dim);
    let pair = i / 2;
    let second_half = i % 2 == 1;
    head * head_dim + pair + if second_half { head_dim / 2 } else { 0 }
}

#[test]
fn shakespeare_tiny_f16_is_the_checkpoint_in_llama_cpp_form() {
    let dir = shakespeare_dir();
    let config = read_json(&dir.join("config.json"));
    let (_tmp, file) = convert(&dir, DType::F16);
    let md = file.metadata();

    assert_eq!(md.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(u32_key(&file, "general.file_type"), 1);
    let expect_u32 = [
        ("llama.block_count", "num_hidden_layers"),
        ("llama.context_length", "max_position_embeddings"),
        ("llama.embedding_length", "hidden_size"),
        ("llama.feed_forward_length", "intermediate_size"),
        ("llama.attention.head_count", "num_attention_heads"),
        ("llama.attention.head_count_kv", "num_key_value_heads"),
        ("llama.attention.key_length", "head_dim"),
        ("llama.rope.dimension_count", "head_dim"),
        ("llama.vocab_size", "vocab_size"),
    ];
    for (key, hf_key) in expect_u32 {
        assert_eq!(
            u64::from(u32_key(&file, key)),
            config[hf_key].as_u64().unwrap(),
            "{key} vs config.json {hf_key}"
        );
    }
    assert_eq!(
        md.get_f32("llama.attention.layer_norm_rms_epsilon")
            .unwrap(),
        config["rms_norm_eps"].as_f64().unwrap() as f32
    );
    assert_eq!(
        md.get_f32("llama.rope.freq_base").unwrap(),
        config["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32
    );

    // Every tensor: llama.cpp's name, the checkpoint's shape; tied embeddings, so
    // no output.weight.
    let st_bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    let mut expected: HashMap<String, String> = HashMap::from([
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
        ),
        ("output_norm.weight".into(), "model.norm.weight".into()),
    ]);
    let per_layer = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    for i in 0..layers {
        for (gguf, hf) in per_layer {
            expected.insert(
                format!("blk.{i}.{gguf}.weight"),
                format!("model.layers.{i}.{hf}.weight"),
            );
        }
    }
    assert_eq!(file.tensor_infos().len(), expected.len());
    assert_eq!(st.len(), expected.len());
    let head_dim = config["head_dim"].as_u64().unwrap() as usize;
    for (gguf_name, hf_name) in &expected {
        let view = file.tensor(gguf_name).unwrap();
        let source = st.tensor(hf_name).unwrap();
        assert_eq!(view.info.shape(), source.shape(), "{gguf_name}");
        let is_norm = gguf_name.ends_with("norm.weight");
        assert_eq!(
            view.info.dtype(),
            if is_norm { DType::F32 } else { DType::F16 },
            "{gguf_name}"
        );
        if is_norm {
            assert_eq!(
                view.to_f32().unwrap(),
                st_values(source.dtype(), source.data()),
                "{gguf_name}"
            );
        } else if gguf_name.contains("attn_q.") || gguf_name.contains("attn_k.") {
            let row_bytes = view.info.row_bytes();
            for row in 0..view.info.shape()[0] {
                let src_row = hf_row_of(row, head_dim);
                assert_eq!(
                    &view.data[row * row_bytes..(row + 1) * row_bytes],
                    &source.data()[src_row * row_bytes..(src_row + 1) * row_bytes],
                    "{gguf_name} row {row} should be HF row {src_row}"
                );
            }
        } else {
            assert_eq!(view.data, source.data(), "{gguf_name}: f16 copied exactly");
        }
    }
    assert!(file.tensor("output.weight").is_err());

    // The tokenizer section, against tokenizer.json.
    let tokenizer = read_json(&dir.join("tokenizer.json"));
    assert_eq!(md.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(md.get_str("tokenizer.ggml.pre").unwrap(), "gpt-2");
    let tokens = strings(&file, "tokenizer.ggml.tokens");
    assert_eq!(tokens.len(), 4096);
    for (token, id) in tokenizer["model"]["vocab"].as_object().unwrap() {
        assert_eq!(&tokens[id.as_u64().unwrap() as usize], token);
    }
    let merges = strings(&file, "tokenizer.ggml.merges");
    let hf_merges = tokenizer["model"]["merges"].as_array().unwrap();
    assert_eq!(merges.len(), hf_merges.len());
    assert_eq!(
        merges[0],
        format!(
            "{} {}",
            hf_merges[0][0].as_str().unwrap(),
            hf_merges[0][1].as_str().unwrap()
        )
    );
    let types: Vec<Value> = md
        .get_array("tokenizer.ggml.token_type")
        .unwrap()
        .iter()
        .collect();
    assert_eq!(types[0], Value::I32(3), "BOS is a control token");
    assert_eq!(types[100], Value::I32(1));
    assert_eq!(u32_key(&file, "tokenizer.ggml.bos_token_id"), 0);
    assert_eq!(u32_key(&file, "tokenizer.ggml.eos_token_id"), 1);
    assert!(md.get_bool("tokenizer.ggml.add_bos_token").unwrap());
}

/// Normalised mean squared error of `got` against `want`.
fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| f64::from(g - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    err / norm
}

#[test]
fn shakespeare_tiny_quantized_types_and_fallbacks() {
    let dir = shakespeare_dir();
    let st_bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let ffn_down = st.tensor("model.layers.0.mlp.down_proj.weight").unwrap();
    let ffn_down = st_values(ffn_down.dtype(), ffn_down.data());
    // (type asked, llama file type, type of 384-wide rows, of 1024-wide rows, NMSE bound)
    let cases = [
        (DType::Q8_0, 7, DType::Q8_0, DType::Q8_0, 1e-4),
        (DType::Q4_0, 2, DType::Q4_0, DType::Q4_0, 2e-2),
        (DType::Q4K, 14, DType::Q5_0, DType::Q4K, 2e-2),
        // Relative RMSE ~0.60, ~0.80 and ~0.12 on these weights (docs/quantization.md).
        (DType::Q1_0, 40, DType::Q1_0, DType::Q1_0, 0.38),
        (DType::TQ2_0, 37, DType::Q4_0, DType::TQ2_0, 0.68),
        (DType::MXFP4, 38, DType::MXFP4, DType::MXFP4, 0.02),
    ];
    for (dtype, file_type, narrow, wide, bound) in cases {
        let (_tmp, file) = convert(&dir, dtype);
        assert_eq!(u32_key(&file, "general.file_type"), file_type, "{dtype}");
        assert_eq!(
            file.tensor("blk.0.attn_q.weight").unwrap().info.dtype(),
            narrow
        );
        assert_eq!(
            file.tensor("token_embd.weight").unwrap().info.dtype(),
            narrow
        );
        assert_eq!(
            file.tensor("blk.0.attn_norm.weight").unwrap().info.dtype(),
            DType::F32
        );
        let down = file.tensor("blk.0.ffn_down.weight").unwrap();
        assert_eq!(down.info.dtype(), wide, "{dtype}");
        let error = nmse(&down.to_f32().unwrap(), &ffn_down);
        assert!(error > 0.0 && error < bound, "{dtype}: NMSE {error}");
    }
}

/// A synthetic checkpoint written into a temporary directory.
struct Synthetic {
    dir: TempDir,
    rng: StdRng,
    tensors: Vec<(String, Vec<usize>)>,
}

impl Synthetic {
    fn new(config: Json) -> Synthetic {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        Synthetic {
            dir,
            rng: StdRng::seed_from_u64(7),
            tensors: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn tensor(mut self, name: &str, shape: &[usize]) -> Synthetic {
        self.tensors.push((name.to_owned(), shape.to_vec()));
        self
    }

    /// The tensors of a llama/qwen block stack: `extra` names per layer (suffix,
    /// shape) are added to the common ones.
    fn layers(
        mut self,
        n: usize,
        dims: (usize, usize, usize, usize),
        extra: &[(&str, Vec<usize>)],
    ) -> Synthetic {
        let (h, q, kv, ff) = dims;
        for i in 0..n {
            let common = [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![ff, h]),
                ("mlp.up_proj.weight", vec![ff, h]),
                ("mlp.down_proj.weight", vec![h, ff]),
            ];
            for (suffix, shape) in common.iter().cloned().chain(extra.iter().cloned()) {
                self = self.tensor(&format!("model.layers.{i}.{suffix}"), &shape);
            }
        }
        self
    }

    /// Writes the tensors (random values in `dtype`) into `shards` files, with an
    /// index when there is more than one. Returns each tensor's bytes.
    fn write_weights(&mut self, dtype: Dtype, shards: usize) -> HashMap<String, Vec<u8>> {
        let mut data = HashMap::new();
        for (name, shape) in &self.tensors {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| self.rng.random_range(-1.0..1.0)).collect();
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                other => panic!("{other:?}"),
            };
            data.insert(name.clone(), bytes);
        }
        let mut weight_map = serde_json::Map::new();
        let per_shard = self.tensors.len().div_ceil(shards);
        for (s, group) in self.tensors.chunks(per_shard).enumerate() {
            let file = if shards == 1 {
                "model.safetensors".to_owned()
            } else {
                format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
            };
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = group
                .iter()
                .map(|(name, shape)| {
                    let view =
                        safetensors::tensor::TensorView::new(dtype, shape.clone(), &data[name])
                            .unwrap();
                    (name.clone(), view)
                })
                .collect();
            safetensors::serialize_to_file(views, None, &self.path().join(&file)).unwrap();
            for (name, _) in group {
                weight_map.insert(name.clone(), json!(file));
            }
        }
        if shards > 1 {
            let index = json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(
                self.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
        }
        data
    }

    fn tokenizer(&self, tokenizer: Json, tokenizer_config: Option<Json>) {
        std::fs::write(self.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        if let Some(tc) = tokenizer_config {
            std::fs::write(self.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
        }
    }
}

/// Qwen2's split regex, as its tokenizer.json writes it.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer.json of 6 tokens (ids 0-5), string merges, the
/// given pre-tokenizer and one added special token at id 5.
fn small_tokenizer(pre_tokenizer: Json) -> Json {
    json!({
        "added_tokens": [{"id": 5, "content": "<|endoftext|>", "special": true, "normalized": false}],
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE",
            "vocab": {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4, "<|endoftext|>": 5},
            "merges": ["a b", "Ġ ab"]
        }
    })
}

fn qwen_pre_tokenizer() -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
    ]})
}

fn qwen2_checkpoint() -> Synthetic {
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 5
    });
    let bias = |n: usize| vec![n];
    Synthetic::new(config)
        .tensor("model.embed_tokens.weight", &[8, 32])
        .tensor("model.norm.weight", &[32])
        .tensor("lm_head.weight", &[8, 32])
        .layers(
            2,
            (32, 32, 16, 64),
            &[
                ("self_attn.q_proj.bias", bias(32)),
                ("self_attn.k_proj.bias", bias(16)),
                ("self_attn.v_proj.bias", bias(16)),
            ],
        )
}

#[test]
fn qwen2_sharded_bf16_with_biases_is_copied_unpermuted() {
    let mut ckpt = qwen2_checkpoint();
    let data = ckpt.write_weights(Dtype::BF16, 3);
    ckpt.tokenizer(
        small_tokenizer(qwen_pre_tokenizer()),
        Some(json!({"eos_token": "<|endoftext|>", "bos_token": null, "add_bos_token": false})),
    );
    let checkpoint = HfCheckpoint::open(ckpt.path()).unwrap();
    assert_eq!(checkpoint.default_dtype(), DType::BF16);
    let (_tmp, file) = convert(ckpt.path(), DType::BF16);
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "qwen2");
    assert_eq!(u32_key(&file, "qwen2.attention.head_count_kv"), 2);
    assert_eq!(md.get_f32("qwen2.rope.freq_base").unwrap(), 1.0e6);
    assert!(
        !md.contains_key("qwen2.attention.key_length"),
        "no head_dim in config.json"
    );

    // Not permuted: q and k are the checkpoint's bytes; biases become f32.
    assert_eq!(
        file.tensor("blk.1.attn_q.weight").unwrap().data,
        &data["model.layers.1.self_attn.q_proj.weight"][..]
    );
    assert_eq!(
        file.tensor("blk.0.attn_k.weight").unwrap().data,
        &data["model.layers.0.self_attn.k_proj.weight"][..]
    );
    assert_eq!(
        file.tensor("output.weight").unwrap().data,
        &data["lm_head.weight"][..]
    );
    let bias = file.tensor("blk.0.attn_k.bias").unwrap();
    assert_eq!(bias.info.dtype(), DType::F32);
    assert_eq!(
        bias.to_f32().unwrap(),
        st_values(Dtype::BF16, &data["model.layers.0.self_attn.k_proj.bias"])
    );
    assert_eq!(file.tensor_infos().len(), 3 + 2 * 12);

    // Tokenizer: qwen2 pre-tokenizer, padding ids, EOS by content, BOS from config.json.
    assert_eq!(md.get_str("tokenizer.ggml.pre").unwrap(), "qwen2");
    let tokens = strings(&file, "tokenizer.ggml.tokens");
    assert_eq!(
        tokens,
        [
            "a",
            "b",
            "Ġ",
            "ab",
            "Ġab",
            "<|endoftext|>",
            "[PAD6]",
            "[PAD7]"
        ]
    );
    let types: Vec<Value> = md
        .get_array("tokenizer.ggml.token_type")
        .unwrap()
        .iter()
        .collect();
    assert_eq!(
        types,
        [
            Value::I32(1),
            Value::I32(1),
            Value::I32(1),
            Value::I32(1),
            Value::I32(1),
            Value::I32(3),
            Value::I32(5),
            Value::I32(5)
        ]
    );
    assert_eq!(strings(&file, "tokenizer.ggml.merges"), ["a b", "Ġ ab"]);
    assert_eq!(u32_key(&file, "tokenizer.ggml.eos_token_id"), 5);
    assert_eq!(u32_key(&file, "tokenizer.ggml.bos_token_id"), 5);
    assert!(!md.get_bool("tokenizer.ggml.add_bos_token").unwrap());
}

#[test]
fn qwen3_has_q_k_norms_and_an_explicit_head_dim() {
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 16, "vocab_size": 6, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": true
    });
    let mut ckpt = Synthetic::new(config)
        .tensor("model.embed_tokens.weight", &[6, 32])
        .tensor("model.norm.weight", &[32])
        .layers(
            1,
            (32, 64, 16, 48),
            &[
                ("self_attn.q_norm.weight", vec![16]),
                ("self_attn.k_norm.weight", vec![16]),
            ],
        );
    let data = ckpt.write_weights(Dtype::F32, 1);
    ckpt.tokenizer(small_tokenizer(qwen_pre_tokenizer()), None);
    let (_tmp, file) = convert(ckpt.path(), DType::F16);
    assert_eq!(
        file.metadata().get_str("general.architecture").unwrap(),
        "qwen3"
    );
    assert_eq!(u32_key(&file, "qwen3.attention.key_length"), 16);
    assert_eq!(u32_key(&file, "qwen3.attention.value_length"), 16);
    assert_eq!(
        file.tensor("blk.0.attn_q.weight").unwrap().info.shape(),
        [64, 32]
    );
    let norm = file.tensor("blk.0.attn_k_norm.weight").unwrap();
    assert_eq!(norm.info.dtype(), DType::F32);
    assert_eq!(
        norm.to_f32().unwrap(),
        st_values(Dtype::F32, &data["model.layers.0.self_attn.k_norm.weight"])
    );
    // f32 -> f16: each value rounded once.
    let q = file
        .tensor("blk.0.attn_q.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let want: Vec<f32> = st_values(Dtype::F32, &data["model.layers.0.self_attn.q_proj.weight"])
        .iter()
        .map(|v| f16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(q, want);
    assert!(file.tensor("output.weight").is_err(), "tied embeddings");
}

fn llama_config(extra: &[(&str, Json)]) -> Json {
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 6, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": true, "attention_bias": true
    });
    for (k, v) in extra {
        config[*k] = v.clone();
    }
    config
}

fn llama_checkpoint(config: Json) -> Synthetic {
    let biases = [
        ("self_attn.q_proj.bias", vec![32]),
        ("self_attn.k_proj.bias", vec![16]),
        ("self_attn.v_proj.bias", vec![16]),
        ("self_attn.o_proj.bias", vec![32]),
    ];
    Synthetic::new(config)
        .tensor("model.embed_tokens.weight", &[6, 32])
        .tensor("model.norm.weight", &[32])
        .layers(1, (32, 32, 16, 64), &biases)
}

fn gpt2_pre_tokenizer() -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
}

#[test]
fn llama3_rope_scaling_and_permuted_biases() {
    let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 400});
    let mut ckpt = llama_checkpoint(llama_config(&[("rope_scaling", scaling)]));
    let data = ckpt.write_weights(Dtype::F32, 1);
    ckpt.tokenizer(small_tokenizer(gpt2_pre_tokenizer()), None);
    let (_tmp, file) = convert(ckpt.path(), DType::F32);

    // Llama 3.1's factors: 1 where the wavelength is under original/high_freq_factor
    // (100) tokens, 8 where it is over original/low_freq_factor (400), smoothly
    // between. The pairs' wavelengths are 2π·500000^(i/4): 6.3, 167, 4443, 118000.
    let freqs = file.tensor("rope_freqs.weight").unwrap();
    assert_eq!(freqs.info.dtype(), DType::F32);
    let got = freqs.to_f32().unwrap();
    let head_dim = 8;
    assert_eq!(got.len(), head_dim / 2);
    for (i, &g) in got.iter().enumerate() {
        let wavelen = 2.0 * std::f64::consts::PI * 500000f64.powf(2.0 * i as f64 / head_dim as f64);
        let want = if wavelen < 100.0 {
            1.0
        } else if wavelen > 400.0 {
            8.0
        } else {
            let smooth = (400.0 / wavelen - 1.0) / 3.0;
            1.0 / ((1.0 - smooth) / 8.0 + smooth)
        };
        assert!(
            (f64::from(g) - want).abs() < 1e-5 * want,
            "pair {i}: {g} vs {want}"
        );
    }
    assert_eq!(got[0], 1.0);
    assert!(
        got[1] > 1.0 && got[1] < 8.0,
        "pair 1 is smoothed: {}",
        got[1]
    );
    assert_eq!(got[3], 8.0);

    // Biases of q and k are permuted like their rows; v and o biases are not.
    let q_bias = file.tensor("blk.0.attn_q.bias").unwrap().to_f32().unwrap();
    let hf_q_bias = st_values(Dtype::F32, &data["model.layers.0.self_attn.q_proj.bias"]);
    for (row, v) in q_bias.iter().enumerate() {
        assert_eq!(*v, hf_q_bias[hf_row_of(row, head_dim)], "q bias {row}");
    }
    let o_bias = file
        .tensor("blk.0.attn_output.bias")
        .unwrap()
        .to_f32()
        .unwrap();
    assert_eq!(
        o_bias,
        st_values(Dtype::F32, &data["model.layers.0.self_attn.o_proj.bias"])
    );
    let k = file
        .tensor("blk.0.attn_k.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let hf_k = st_values(Dtype::F32, &data["model.layers.0.self_attn.k_proj.weight"]);
    for row in 0..16 {
        let src = hf_row_of(row, head_dim);
        assert_eq!(
            k[row * 32..(row + 1) * 32],
            hf_k[src * 32..(src + 1) * 32],
            "k row {row}"
        );
    }
}

fn open_error(dir: &Path) -> String {
    match HfCheckpoint::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_files_are_named() {
    let empty = TempDir::new().unwrap();
    let msg = open_error(empty.path());
    assert!(msg.contains("config.json is missing"), "{msg}");

    let ckpt = llama_checkpoint(llama_config(&[]));
    let msg = open_error(ckpt.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("index"),
        "{msg}"
    );

    let mut ckpt = llama_checkpoint(llama_config(&[]));
    ckpt.write_weights(Dtype::F16, 1);
    let msg = open_error(ckpt.path());
    assert!(msg.contains("tokenizer.json is missing"), "{msg}");

    let mut ckpt = qwen2_checkpoint();
    ckpt.write_weights(Dtype::F16, 2);
    ckpt.tokenizer(small_tokenizer(qwen_pre_tokenizer()), None);
    std::fs::remove_file(ckpt.path().join("model-00002-of-00002.safetensors")).unwrap();
    let msg = open_error(ckpt.path());
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn unsupported_configs_and_tensors_are_errors() {
    let mut ckpt = llama_checkpoint(llama_config(&[(
        "architectures",
        json!(["GPTNeoXForCausalLM"]),
    )]));
    ckpt.write_weights(Dtype::F16, 1);
    ckpt.tokenizer(small_tokenizer(gpt2_pre_tokenizer()), None);
    let msg = open_error(ckpt.path());
    assert!(
        msg.contains("GPTNeoXForCausalLM") && msg.contains("LlamaForCausalLM"),
        "{msg}"
    );

    let mut ckpt = llama_checkpoint(llama_config(&[(
        "rope_scaling",
        json!({"rope_type": "longrope", "factor": 2.0}),
    )]));
    ckpt.write_weights(Dtype::F16, 1);
    ckpt.tokenizer(small_tokenizer(gpt2_pre_tokenizer()), None);
    let msg = open_error(ckpt.path());
    assert!(msg.contains("longrope"), "{msg}");

    // config.json says 1 KV head; the k projection has 2 heads' rows.
    let mut ckpt = llama_checkpoint(llama_config(&[("num_key_value_heads", json!(1))]));
    ckpt.write_weights(Dtype::F16, 1);
    ckpt.tokenizer(small_tokenizer(gpt2_pre_tokenizer()), None);
    let msg = open_error(ckpt.path());
    assert!(
        msg.contains("k_proj.weight") && msg.contains("[16, 32]") && msg.contains("[8, 32]"),
        "{msg}"
    );

    let mut ckpt =
        llama_checkpoint(llama_config(&[])).tensor("model.layers.0.mlp.experts.0.weight", &[4, 4]);
    ckpt.write_weights(Dtype::F16, 1);
    ckpt.tokenizer(small_tokenizer(gpt2_pre_tokenizer()), None);
    let msg = open_error(ckpt.path());
    assert!(msg.contains("model.layers.0.mlp.experts.0.weight"), "{msg}");

    // A SentencePiece-style tokenizer (byte fallback).
    let mut ckpt = llama_checkpoint(llama_config(&[]));
    ckpt.write_weights(Dtype::F16, 1);
    let mut tokenizer = small_tokenizer(json!({"type": "Metaspace", "replacement": "▁"}));
    tokenizer["model"]["byte_fallback"] = json!(true);
    ckpt.tokenizer(tokenizer, None);
    let msg = open_error(ckpt.path());
    assert!(msg.contains("byte_fallback true"), "{msg}");

    // A type llama.cpp has no file type for.
    let mut ckpt = llama_checkpoint(llama_config(&[]));
    ckpt.write_weights(Dtype::F16, 1);
    ckpt.tokenizer(small_tokenizer(gpt2_pre_tokenizer()), None);
    let checkpoint = HfCheckpoint::open(ckpt.path()).unwrap();
    let out = ckpt.path().join("out.gguf");
    let msg = checkpoint
        .write_gguf(&out, DType::Q8K, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(msg.contains("q8_k") && msg.contains("q4_0"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn requantizing_a_converted_file_matches_converting_directly() {
    // One policy and one write path: the f16 file re-quantized to TYPE holds the
    // same tensors, types, bytes and file type as the checkpoint converted to TYPE
    // (its f16 values are the checkpoint's, so both quantize the same numbers).
    let dir = shakespeare_dir();
    let (f16_dir, _) = convert(&dir, DType::F16);
    let f16 = f16_dir.path().join("model.gguf");
    for dtype in [DType::Q8_0, DType::Q4K, DType::Q6K] {
        let (_direct_dir, direct) = convert(&dir, dtype);
        let job = kiln_gguf::quantize::Requantization::open(&f16, dtype).unwrap();
        let out_dir = TempDir::new().unwrap();
        let out = out_dir.path().join("requantized.gguf");
        let summary = job.write_gguf(&out, &mut |_, _| {}).unwrap();
        assert_eq!(summary.file_bytes, std::fs::metadata(&out).unwrap().len());
        let requantized = Gguf::open(&out).unwrap();
        assert_eq!(
            u32_key(&requantized, "general.file_type"),
            u32_key(&direct, "general.file_type"),
            "{dtype}"
        );
        assert_eq!(
            requantized.tensor_infos().len(),
            direct.tensor_infos().len()
        );
        for (got, want) in requantized.tensors().zip(direct.tensors()) {
            assert_eq!(got.info.name(), want.info.name());
            assert_eq!(got.info.dtype(), want.info.dtype(), "{}", want.info.name());
            assert!(
                got.data == want.data,
                "{dtype}: {} differs",
                want.info.name()
            );
        }
    }
}
