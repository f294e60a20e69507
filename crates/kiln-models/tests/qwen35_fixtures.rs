//! Tiny random-weight Qwen3.5 checkpoints, converted to GGUF by kiln and run on the
//! CPU backend (and, on a GPU machine, the CUDA backend), against the logits that
//! transformers' Qwen3_5ForCausalLM and Qwen3_5MoeForCausalLM computed in float32 for
//! prompts of 1, 7 and 200 tokens and 16 greedy tokens fed back through their caches
//! (made by scripts/make_qwen35_fixtures.py): tests/fixtures/qwen35-tiny, dense with a
//! tied output projection, as transformers saves it, and tests/fixtures/qwen35moe-tiny,
//! a mixture of experts laid out as the published multimodal checkpoints are (text
//! model under `model.language_model.`, experts stacked, a vision tower and a
//! multi-token-prediction layer that kiln leaves out). Also: a prompt in chunks
//! against token by token, the tensors and keys the conversion writes (value heads
//! tiled as llama.cpp's converter tiles them), and files as llama.cpp's converter may
//! write them (with a multi-token-prediction layer) or malformed.

mod device;
mod hybrid;
use device::cuda;
use hybrid::{
    check_chunked_prompt, check_fixtures, checkpoint_tensor, converted, fixtures, gguf_tensor,
    greedy_tokens_agree, load, model_dir, nmse, CONTEXT,
};
use kiln_core::ops::HeadLayout;
use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Arch, Gguf, GgufFile, GgufWriter, Metadata, SharedBytes, TensorDesc};
use kiln_models::{LoadOptions, Model};
use serde_json::{json, Value};
use std::path::Path;

/// The dense checkpoint: 6 value heads on 2 key heads in its linear attention.
const DENSE: &str = "qwen35-tiny";
/// The mixture of experts: 4 value heads on 2 key heads, 8 experts of which 2.
const MOE: &str = "qwen35moe-tiny";
const MODELS: [(&str, Arch); 2] = [(DENSE, Arch::Qwen35), (MOE, Arch::Qwen35Moe)];

/// The f32 conversion keeps the checkpoints' weights exactly: the logits of every
/// prompt (the chunkwise delta rule over 200 tokens included) and of every decode
/// step (the recurrent form, the carried convolution and delta-rule states, the KV
/// cache) agree with transformers to f32 summation order. The rotary embedding's
/// sections ([2, 1, 1]) all rotate by the token's position, half of each head.
#[test]
fn qwen35_models_match_transformers_logits_through_prompt_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    for (name, arch) in MODELS {
        let mut model = load(CpuBackend, &converted(name, DType::F32, dir.path()));
        let config = model.config().clone();
        assert_eq!(config.arch, arch);
        assert_eq!(config.rope.rotary_dim, 8, "{name}");
        let lin = config.linear.expect("a hybrid model");
        assert_eq!(lin.full_attention_interval, 4);
        assert_eq!(lin.heads.layout, HeadLayout::Tiled);
        assert!(!lin.fused_beta_alpha);
        assert_eq!(config.moe.is_some(), arch == Arch::Qwen35Moe);
        assert_eq!(config.tied_embeddings, arch == Arch::Qwen35);
        check_fixtures(&mut model, name, 1e-10, &format!("{name} cpu f32"));
    }
}

/// On the CPU a prompt in chunks of 7 tokens, or token by token, leaves the state of
/// one pass (the chunkwise and the recurrent delta rule agree to f32 rounding).
#[test]
fn prompts_in_chunks_leave_the_state_of_one_pass() {
    for (name, _) in MODELS {
        check_chunked_prompt(name, || CpuBackend, 1e-10, &format!("{name} cpu"));
    }
}

/// With Q8_0 weight matrices (their products reading Q8_1 copies of the
/// activations), the logits stay close to the float32 reference.
#[test]
fn q8_0_qwen35_logits_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in MODELS {
        let mut model = load(CpuBackend, &converted(name, DType::Q8_0, dir.path()));
        let f = &fixtures(name)[1];
        let e = nmse(&model.forward(&f.input_ids).unwrap(), &f.logits[0]);
        eprintln!("{name} q8_0: logits NMSE {e:.2e}");
        assert!(e < 1e-2, "{name} q8_0: logits NMSE {e:.2e}");
    }
}

/// The checkpoint's value head of the dense model's GGUF value head `p`: llama.cpp's
/// converter tiles the checkpoint's heads (grouped, 3 per key head) across the 2 key
/// heads, so GGUF head `p` is key head `p % 2`'s `(p / 2)`-th.
fn dense_checkpoint_head(p: usize) -> usize {
    (p % 2) * 3 + p / 2
}

fn row(m: &[f32], cols: usize, r: usize) -> &[f32] {
    &m[r * cols..(r + 1) * cols]
}

/// kiln convert writes what llama.cpp's converter writes for Qwen3.5: its keys (the
/// rotary sections included), the zero-centred norms plus one (not the gated norm),
/// `ssm_a = -exp(A_log)`, the convolution without its middle axis, the projections
/// apart (`in_proj_b` as `ssm_beta`, `in_proj_a` as `ssm_alpha`), and every value
/// head's rows, elements and `out_proj` columns tiled.
#[test]
fn dense_conversion_writes_llama_cpp_tensors_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DENSE, DType::F32, dir.path());
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "qwen35");
    for (key, want) in [
        ("ssm.conv_kernel", 4),
        ("ssm.state_size", 16),
        ("ssm.group_count", 2),
        ("ssm.time_step_rank", 6),
        ("ssm.inner_size", 96),
        ("full_attention_interval", 4),
        ("rope.dimension_count", 8),
        ("attention.key_length", 16),
        ("feed_forward_length", 96),
        ("block_count", 4),
    ] {
        assert_eq!(md.get_u64(&format!("qwen35.{key}")).unwrap(), want, "{key}");
    }
    let sections: Vec<i128> = md
        .get_array("qwen35.rope.dimension_sections")
        .unwrap()
        .iter()
        .map(|v| v.as_integer().unwrap())
        .collect();
    assert_eq!(sections, [2, 1, 1, 0]);
    assert!(
        file.tensor("output.weight").is_err(),
        "tied: no output.weight"
    );
    let hf = |t: &str| checkpoint_tensor(DENSE, &format!("model.layers.1.{t}")).1;
    let gguf = |t: &str| gguf_tensor(&file, &format!("blk.1.{t}"));
    // Six value heads of 16; q and k take the first 64 of attn_qkv's 160 rows.
    let (shape, qkv) = gguf("attn_qkv.weight");
    assert_eq!(shape, [160, 64]);
    let hf_qkv = hf("linear_attn.in_proj_qkv.weight");
    let (conv_shape, conv) = gguf("ssm_conv1d.weight");
    assert_eq!(conv_shape, [160, 4]);
    let hf_conv = hf("linear_attn.conv1d.weight");
    for r in 0..64 {
        assert_eq!(
            row(&qkv, 64, r),
            row(&hf_qkv, 64, r),
            "attn_qkv q/k row {r}"
        );
        assert_eq!(row(&conv, 4, r), row(&hf_conv, 4, r), "conv q/k row {r}");
    }
    let (gate, hf_z) = (
        gguf("attn_gate.weight").1,
        hf("linear_attn.in_proj_z.weight"),
    );
    let (out_shape, out) = gguf("ssm_out.weight");
    assert_eq!(out_shape, [64, 96]);
    let hf_out = hf("linear_attn.out_proj.weight");
    for p in 0..6 {
        let c = dense_checkpoint_head(p);
        for i in 0..16 {
            let (got, want) = (p * 16 + i, c * 16 + i);
            assert_eq!(row(&qkv, 64, 64 + got), row(&hf_qkv, 64, 64 + want));
            assert_eq!(row(&conv, 4, 64 + got), row(&hf_conv, 4, 64 + want));
            assert_eq!(row(&gate, 64, got), row(&hf_z, 64, want), "attn_gate");
            for j in 0..64 {
                assert_eq!(out[j * 96 + got], hf_out[j * 96 + want], "ssm_out");
            }
        }
    }
    let (beta, alpha) = (gguf("ssm_beta.weight"), gguf("ssm_alpha.weight"));
    assert_eq!((&beta.0, &alpha.0), (&vec![6, 64], &vec![6, 64]));
    let (hf_b, hf_a) = (
        hf("linear_attn.in_proj_b.weight"),
        hf("linear_attn.in_proj_a.weight"),
    );
    let (dt, ssm_a) = (gguf("ssm_dt.bias").1, gguf("ssm_a").1);
    let (hf_dt, hf_a_log) = (hf("linear_attn.dt_bias"), hf("linear_attn.A_log"));
    for p in 0..6 {
        let c = dense_checkpoint_head(p);
        assert_eq!(row(&beta.1, 64, p), row(&hf_b, 64, c), "ssm_beta");
        assert_eq!(row(&alpha.1, 64, p), row(&hf_a, 64, c), "ssm_alpha");
        assert_eq!(dt[p], hf_dt[c], "ssm_dt.bias");
        let want = -f64::from(hf_a_log[c]).exp();
        assert!(
            (f64::from(ssm_a[p]) - want).abs() <= 1e-6 * want.abs(),
            "ssm_a"
        );
    }
    assert_eq!(gguf("ssm_norm.weight").1, hf("linear_attn.norm.weight"));
    for (hf_name, gguf_name) in [
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.3.self_attn.k_norm.weight",
            "blk.3.attn_k_norm.weight",
        ),
        (
            "model.layers.2.post_attention_layernorm.weight",
            "blk.2.post_attention_norm.weight",
        ),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        let want = checkpoint_tensor(DENSE, hf_name).1;
        let got = gguf_tensor(&file, gguf_name).1;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - (1.0 + w)).abs() <= 1e-6, "{gguf_name}: {g} vs 1 + {w}");
        }
    }
    assert_eq!(
        gguf_tensor(&file, "blk.0.ffn_gate.weight").1,
        checkpoint_tensor(DENSE, "model.layers.0.mlp.gate_proj.weight").1
    );
}

/// The published Qwen3.5-MoE layout converts to its text model: the tensors under
/// `model.language_model.`, each layer's stacked `gate_up_proj` split into
/// `ffn_gate_exps` and `ffn_up_exps`, `down_proj` as `ffn_down_exps`, the vision and
/// multi-token-prediction tensors left out; no `feed_forward_length` (the
/// checkpoint's config has no `intermediate_size`), and the expert keys.
#[test]
fn moe_conversion_reads_the_published_layout() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(MOE, DType::F32, dir.path());
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "qwen35moe");
    assert!(!md.contains_key("qwen35moe.feed_forward_length"));
    assert!(!md.contains_key("qwen35moe.expert_weights_norm"));
    for (key, want) in [
        ("expert_count", 8),
        ("expert_used_count", 2),
        ("expert_feed_forward_length", 16),
        ("expert_shared_feed_forward_length", 32),
        ("ssm.time_step_rank", 4),
        ("block_count", 4),
    ] {
        assert_eq!(
            md.get_u64(&format!("qwen35moe.{key}")).unwrap(),
            want,
            "{key}"
        );
    }
    assert!(file
        .tensor_infos()
        .iter()
        .all(|t| t.name().starts_with("blk.")
            || t.name().starts_with("token_embd")
            || t.name().starts_with("output")));
    let prefix = "model.language_model.layers.2.mlp.experts";
    let (gu_shape, gate_up) = checkpoint_tensor(MOE, &format!("{prefix}.gate_up_proj"));
    assert_eq!(gu_shape, [8, 32, 64]);
    let (gate_shape, gate) = gguf_tensor(&file, "blk.2.ffn_gate_exps.weight");
    let (up_shape, up) = gguf_tensor(&file, "blk.2.ffn_up_exps.weight");
    assert_eq!((gate_shape, up_shape), (vec![8, 16, 64], vec![8, 16, 64]));
    for e in 0..8 {
        for r in 0..16 {
            assert_eq!(row(&gate, 64, e * 16 + r), row(&gate_up, 64, e * 32 + r));
            assert_eq!(row(&up, 64, e * 16 + r), row(&gate_up, 64, e * 32 + 16 + r));
        }
    }
    assert_eq!(
        gguf_tensor(&file, "blk.2.ffn_down_exps.weight"),
        checkpoint_tensor(MOE, &format!("{prefix}.down_proj"))
    );
    assert_eq!(
        gguf_tensor(&file, "output.weight").1,
        checkpoint_tensor(MOE, "lm_head.weight").1
    );
}

/// A copy of checkpoint `name` in a temporary directory, its config.json and
/// tokenizer.json as `edit` leaves them.
fn edited_checkpoint(name: &str, edit: impl FnOnce(&mut Value, &mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let read = |file: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(model_dir(name).join(file)).unwrap()).unwrap()
    };
    let (mut config, mut tokenizer) = (read("config.json"), read("tokenizer.json"));
    edit(&mut config, &mut tokenizer);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::copy(
        model_dir(name).join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    dir
}

fn open_error(dir: &Path) -> String {
    match HfCheckpoint::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Checkpoints as config.json and tokenizer.json may have them: without
/// `architectures` (the multimodal `model_type` and its `text_config.model_type`),
/// with `norm_topk_prob` false (Qwen3.5-MoE's router renormalises regardless) and
/// with Qwen3.5's pre-tokenizer regex, the MoE one converts to the same model, its
/// pre-tokenizer `qwen35`; rotary sections other than three and a dense model without
/// `intermediate_size` are errors naming the key.
#[test]
fn checkpoint_variants_convert_or_fail_naming_the_key() {
    let qwen35_split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let ckpt = edited_checkpoint(MOE, |config, tokenizer| {
        config.as_object_mut().unwrap().remove("architectures");
        config["text_config"]["norm_topk_prob"] = json!(false);
        tokenizer["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qwen35_split}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
             "use_regex": false}
        ]});
    });
    let out = ckpt.path().join("out.gguf");
    HfCheckpoint::open(ckpt.path())
        .unwrap()
        .write_gguf(&out, DType::F32, &mut |_, _| {})
        .unwrap();
    let file = Gguf::open(&out).unwrap();
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "qwen35moe");
    assert_eq!(md.get_str("tokenizer.ggml.pre").unwrap(), "qwen35");
    assert!(!md.contains_key("qwen35moe.expert_weights_norm"));
    let mut model = load(CpuBackend, &file);
    assert!(model.config().moe.as_ref().unwrap().norm_weights);
    let f = &fixtures(MOE)[1];
    assert!(nmse(&model.forward(&f.input_ids).unwrap(), &f.logits[0]) < 1e-10);

    let ckpt = edited_checkpoint(MOE, |config, _| {
        config["text_config"]["rope_parameters"]["mrope_section"] = json!([2, 2]);
    });
    let e = open_error(ckpt.path());
    assert!(e.contains("mrope_section") && e.contains("three"), "{e}");

    let ckpt = edited_checkpoint(DENSE, |config, _| {
        config.as_object_mut().unwrap().remove("intermediate_size");
    });
    let e = open_error(ckpt.path());
    assert!(e.contains("intermediate_size"), "{e}");
}

/// A copy of `file` with its metadata and tensors as `edit` leaves them (each tensor
/// with its bytes).
fn rewritten(
    file: &GgufFile,
    edit: impl FnOnce(&mut Metadata, &mut Vec<(TensorDesc, Vec<u8>)>),
) -> GgufFile {
    let mut md = Metadata::new();
    for (key, value) in file.metadata().iter() {
        md.set(key, value.clone());
    }
    let mut tensors: Vec<(TensorDesc, Vec<u8>)> = file
        .tensor_infos()
        .iter()
        .map(|t| {
            let desc = TensorDesc::new(t.name().to_string(), t.dtype(), t.shape());
            (desc, file.tensor(t.name()).unwrap().data.to_vec())
        })
        .collect();
    edit(&mut md, &mut tensors);
    let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = GgufWriter::new(Vec::new(), "rewritten.gguf", &md, &descs).unwrap();
    for (_, bytes) in &tensors {
        w.write_tensor_data(bytes).unwrap();
    }
    Gguf::from_shared(SharedBytes::new(w.finish().unwrap()), "rewritten.gguf").unwrap()
}

fn load_error(file: &GgufFile) -> String {
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 1,
    };
    match Model::load(CpuBackend, file, options, &mut |_, _| {}) {
        Ok(_) => panic!("the model loaded"),
        Err(e) => e.to_string(),
    }
}

/// llama.cpp's converter may keep Qwen3.5's multi-token-prediction layer: a block
/// after the model's own (`block_count` one more, `nextn_predict_layers` 1, its
/// `blk.4.nextn.*` and attention tensors). kiln runs the model's own layers, holds
/// none of the extra block's tensors, and gives the same logits; a file claiming every block for prediction layers is an error
/// naming the key.
#[test]
fn a_multi_token_prediction_layer_in_the_file_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DENSE, DType::F32, dir.path());
    let with_mtp = rewritten(&file, |md, tensors| {
        md.set("qwen35.block_count", 5u32);
        md.set("qwen35.nextn_predict_layers", 1u32);
        for (name, shape) in [
            ("blk.4.nextn.eh_proj.weight", vec![64, 128]),
            ("blk.4.nextn.enorm.weight", vec![64]),
            ("blk.4.attn_norm.weight", vec![64]),
            ("blk.4.attn_q.weight", vec![128, 64]),
        ] {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| (i as f32 / 1e3).to_le_bytes())
                .collect();
            tensors.push((TensorDesc::new(name.to_string(), DType::F32, &shape), bytes));
        }
    });
    let prompt = &fixtures(DENSE)[1];
    let mut plain = load(CpuBackend, &file);
    let mut model = load(CpuBackend, &with_mtp);
    assert_eq!(model.config().n_layers, 4);
    // The prediction layer's tensors are not loaded.
    assert_eq!(model.weight_bytes(), plain.weight_bytes());
    let logits = model.forward(&prompt.input_ids).unwrap();
    assert_eq!(logits, plain.forward(&prompt.input_ids).unwrap());
    assert!(nmse(&logits, &prompt.logits[0]) < 1e-10);
    let all_mtp = rewritten(&file, |md, _| md.set("qwen35.nextn_predict_layers", 4u32));
    let e = load_error(&all_mtp);
    assert!(
        e.contains("qwen35.nextn_predict_layers") && e.contains("block_count 4"),
        "{e}"
    );
}

/// A missing key or tensor of the linear attention is an error naming it.
#[test]
fn missing_keys_and_tensors_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DENSE, DType::F32, dir.path());
    let no_key = rewritten(&file, |md, _| {
        let kept: Vec<_> = md
            .iter()
            .filter(|(k, _)| *k != "qwen35.ssm.group_count")
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        *md = Metadata::new();
        for (k, v) in kept {
            md.set(k, v);
        }
    });
    let e = load_error(&no_key);
    assert!(e.contains("qwen35.ssm.group_count"), "{e}");
    let no_tensor = rewritten(&file, |_, tensors| {
        tensors.retain(|(d, _)| d.name != "blk.1.ssm_alpha.weight")
    });
    let e = load_error(&no_tensor);
    assert!(
        e.contains("\"blk.1.ssm_alpha.weight\"") && e.contains("missing"),
        "{e}"
    );
}

/// The recurrent states: three linear-attention layers of a convolution state
/// [160, 3] and a delta-rule state [6, 16, 16] in the dense model, in f32.
#[test]
fn dense_recurrent_state_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(CpuBackend, &converted(DENSE, DType::F32, dir.path()));
    assert_eq!(
        model.recurrent_state_bytes(),
        3 * (160 * 3 + 6 * 16 * 16) * 4
    );
}

/// The fixtures on the GPU: prompts through the recurrent delta-rule kernel token by
/// token (tiled value heads), decode through the replayed graph. In chunks of 8 tokens
/// every product is an f32 mat-vec, so the logits agree with transformers to f32
/// summation order; in one chunk the prompt's products take bf16 operands (the
/// mat-mat), whose rounding the logits show, carried into the decode steps by the
/// caches and recurrent states. The greedy tokens equal the fixtures' either way
/// (their margins, above 0.03, far exceed the bf16 noise).
#[test]
#[ignore = "needs a CUDA device"]
fn qwen35_on_cuda_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for (name, arch) in MODELS {
        let mut model = load(cuda(), &converted(name, DType::F32, dir.path()));
        assert_eq!(model.config().arch, arch);
        for (chunk, max_nmse) in [(8, 1e-6), (512, 1e-3)] {
            model.set_prefill_chunk(chunk).unwrap();
            check_fixtures(
                &mut model,
                name,
                max_nmse,
                &format!("{name} cuda f32, chunks of {chunk}"),
            );
        }
    }
}

/// On the GPU a prompt in chunks of 7 tokens, or token by token, leaves the state of
/// one pass, within the rounding of the one pass's products to bf16 operands (the
/// mat-mat takes more than 8 rows; chunks of 7 and single tokens run f32 mat-vecs).
#[test]
#[ignore = "needs a CUDA device"]
fn prompts_in_chunks_on_cuda_leave_the_state_of_one_pass() {
    for (name, _) in MODELS {
        check_chunked_prompt(name, cuda, 1e-3, &format!("{name} cuda"));
    }
}

/// 32 greedy tokens on the GPU equal the CPU's from each fixture prompt of both
/// models, for F32 and Q8_0 weights, prompts in chunks of 8 (f32 mat-vecs), with
/// logits within NMSE 1e-6 (1e-3 for Q8_0, whose products read activations rounded to
/// 8 bits on the GPU); near-ties end a comparison as
/// [`hybrid::greedy_tokens_agree`] says.
#[test]
#[ignore = "needs a CUDA device"]
fn qwen35_greedy_tokens_on_cuda_equal_the_cpus() {
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in MODELS {
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::Q8_0, 1e-3)] {
            let file = converted(name, dtype, dir.path());
            let mut gpu = load(cuda(), &file);
            gpu.set_prefill_chunk(8).unwrap();
            let mut cpu = load(CpuBackend, &file);
            greedy_tokens_agree(
                name,
                &mut gpu,
                &mut cpu,
                tolerance,
                &format!("{name} {dtype}"),
            );
        }
    }
}
