//! Synthetic models: the presets have the real models' tensors and parameter counts,
//! files are deterministic per seed, and what is written reads back as declared.

use kiln_core::DType;
use kiln_gguf::synth::{self, Preset, SynthOptions, PRESETS};
use kiln_gguf::Gguf;

/// Tensor and parameter counts of the real models' GGUF files and Hugging Face
/// checkpoints (parameters exclude llama.cpp's generated `rope_freqs.weight`). The
/// Qwen3.5 counts are of the text model (no vision tower, no multi-token-prediction
/// layer), counted by transformers 5.25 (Qwen3_5ForCausalLM and
/// Qwen3_5MoeForCausalLM of the text configs on the meta device; GGUF has one tensor
/// per checkpoint tensor but two for a layer's stacked `gate_up_proj`).
const REAL: [(&str, usize, u64); 10] = [
    ("llama-3.2-1b", 147, 1_235_814_400),
    ("llama-3.1-8b", 292, 8_030_261_248),
    ("qwen2.5-0.5b", 290, 494_032_768),
    ("qwen3-8b", 399, 8_190_735_360),
    ("qwen3-30b-a3b", 579, 30_532_122_624),
    ("qwen3-235b-a22b", 1131, 235_093_634_560),
    // 36 linear-attention layers of 18 tensors, 12 full-attention layers of 16; the
    // checkpoint's multi-token-prediction layer is not converted (as llama.cpp).
    ("qwen3-next-80b-a3b", 843, 79_674_391_296),
    // 48 linear-attention layers of 14 tensors, 16 full-attention layers of 11.
    ("qwen3.5-27b", 851, 26_895_998_464),
    ("qwen3.5-35b-a3b", 733, 34_660_610_688),
    ("qwen3.5-397b-a17b", 1098, 396_346_350_336),
];

#[test]
fn presets_have_the_real_models_tensors_and_parameters() {
    assert_eq!(PRESETS.len(), REAL.len());
    for (name, n_tensors, n_params) in REAL {
        let preset = synth::preset(name).unwrap();
        let config = preset.config().unwrap();
        // Describe without writing data: the tensor list is what `write` would produce.
        let tensors = kiln_gguf::synth::describe(&config, DType::Q4_0).unwrap();
        assert_eq!(tensors.len(), n_tensors, "{name}: tensor count");
        let params: u64 = tensors
            .iter()
            .filter(|t| t.name != "rope_freqs.weight")
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(params, n_params, "{name}: parameters");
    }
    assert!(synth::preset("gpt-5")
        .unwrap_err()
        .to_string()
        .contains("llama-3.1-8b"));
}

/// A small llama-shaped model with Llama 3 rope scaling and a vocabulary with
/// control and padding ids, to write whole in a test.
const TINY: Preset = Preset {
    name: "tiny",
    config_json: r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false, "vocab_size": 700,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"}}"#,
    pre: "llama-bpe",
    n_normal: 600,
    control_end: 650,
    named: &[(600, "<|begin_of_text|>"), (601, "<|end_of_text|>")],
    bos: 600,
    eos: 601,
    add_bos: true,
};

fn write_tiny(dtype: DType, seed: u64, dir: &std::path::Path) -> Vec<u8> {
    let out = dir.join(format!("tiny-{dtype}-{seed}.gguf"));
    let config = TINY.config().unwrap();
    let mut last = 0;
    synth::write(
        &TINY,
        &config,
        SynthOptions { dtype, seed },
        &out,
        &mut |done, total| {
            assert!(done >= last && done <= total);
            last = done;
        },
    )
    .unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn written_files_read_back_and_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_tiny(DType::Q8_0, 7, dir.path());
    assert_eq!(
        bytes,
        write_tiny(DType::Q8_0, 7, dir.path()),
        "same seed, same file"
    );
    assert_ne!(
        bytes,
        write_tiny(DType::Q8_0, 8, dir.path()),
        "another seed, another file"
    );
    let file = Gguf::from_bytes(&bytes[..], "tiny").unwrap();
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(md.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(md.get_str("tokenizer.ggml.pre").unwrap(), "llama-bpe");
    assert_eq!(md.get_array("tokenizer.ggml.tokens").unwrap().len(), 700);
    assert_eq!(
        md.get_array("tokenizer.ggml.merges").unwrap().len(),
        600 - 256
    );
    assert_eq!(md.get_u32("tokenizer.ggml.bos_token_id").unwrap(), 600);
    // 2-D weights in the requested type, norms in f32, the Llama 3 frequency factors present.
    assert_eq!(
        file.tensor("blk.1.ffn_down.weight").unwrap().info.dtype(),
        DType::Q8_0
    );
    assert_eq!(
        file.tensor("blk.0.attn_norm.weight").unwrap().info.dtype(),
        DType::F32
    );
    assert_eq!(file.tensor("rope_freqs.weight").unwrap().info.shape(), [8]);
    // Values are finite, not constant, and scaled as documented (std ≈ 1/sqrt(64)).
    let w = file
        .tensor("blk.0.attn_q.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
    assert!(w.iter().all(|v| v.is_finite()));
    assert!((std - 0.125).abs() < 0.02, "std {std}");
    let norm = file.tensor("output_norm.weight").unwrap().to_f32().unwrap();
    assert!(norm.iter().all(|v| (v - 1.0).abs() < 0.2), "norms near 1");
}

#[test]
fn vocabulary_tokens_are_unique_and_merges_make_tokens() {
    let v = synth::vocab(&TINY, 700, 3);
    let unique: std::collections::HashSet<&String> = v.tokens.iter().collect();
    assert_eq!(unique.len(), 700);
    for m in &v.merges {
        let (a, b) = m.split_once(' ').expect("merge has two parts");
        assert!(
            unique.contains(&format!("{a}{b}")),
            "merge {m:?} makes no token"
        );
    }
    assert_eq!(v.tokens[600], "<|begin_of_text|>");
    assert_eq!(
        (v.token_types[599], v.token_types[620], v.token_types[680]),
        (1, 3, 5)
    );
}

#[test]
fn qwen3_8b_in_the_low_bit_types_has_every_weight_matrix_in_the_type() {
    // qwen3-8b's rows (4096, 12288 and 1024 wide) are whole blocks of every format,
    // so no matrix falls back; norms stay f32. In q1_0 the file's tensors take
    // 8,190,735,360 / 128 * 18 bytes plus the f32 norms: 1.07 GiB, the size of the
    // llama.cpp file the issue times.
    let config = synth::preset("qwen3-8b").unwrap().config().unwrap();
    for dtype in [
        DType::Q1_0,
        DType::Q2_0,
        DType::TQ1_0,
        DType::TQ2_0,
        DType::MXFP4,
    ] {
        let descs = synth::describe(&config, dtype).unwrap();
        let mut bytes = 0u64;
        for d in &descs {
            let want = if d.shape.len() >= 2 {
                dtype
            } else {
                DType::F32
            };
            assert_eq!(d.dtype, want, "{dtype}: {}", d.name);
            bytes += d.dtype.bytes_for(d.shape.iter().product()).unwrap() as u64;
        }
        if dtype == DType::Q1_0 {
            let gib = bytes as f64 / (1u64 << 30) as f64;
            assert!(
                (1.06..1.08).contains(&gib),
                "q1_0 tensors take {gib:.3} GiB"
            );
        }
    }
}

#[test]
fn the_tiny_preset_in_mxfp4_and_q1_0_reads_back_in_its_types() {
    // Rows of 64 and 96 are whole MXFP4 blocks (32); q1_0's (128) fit neither, so
    // its matrices fall back to f16, as kiln convert types them.
    let dir = tempfile::tempdir().unwrap();
    for (dtype, want) in [(DType::MXFP4, DType::MXFP4), (DType::Q1_0, DType::F16)] {
        let bytes = write_tiny(dtype, 3, dir.path());
        let file = Gguf::from_bytes(&bytes[..], "tiny").unwrap();
        let down = file.tensor("blk.1.ffn_down.weight").unwrap();
        assert_eq!(down.info.dtype(), want, "{dtype}");
        let w = down.to_f32().unwrap();
        assert!(w.iter().all(|v| v.is_finite()), "{dtype}");
        // ffn_down's values are N(0, 1/96): its quantized copy has about that spread.
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.102).abs() < 0.02, "{dtype}: std {std}");
    }
}
