//! A tiny random-weight Qwen3-Next checkpoint, converted to GGUF by kiln and run on
//! the CPU backend (and, on a GPU machine, the CUDA backend), against the logits that
//! transformers' Qwen3NextForCausalLM computed in float32 for prompts of 1, 7 and 200
//! tokens and 16 greedy tokens fed back through its cache
//! (tests/fixtures/qwen3next-tiny, made by scripts/make_qwen3next_fixtures.py); a
//! prompt run in chunks against the same prompt token by token; the recurrent state's
//! reset and truncation rules.

mod device;
mod hybrid;
use device::cuda;
use hybrid::{
    check_chunked_prompt, checkpoint_tensor, fixtures, gguf_tensor, greedy_tokens_agree, load,
    model_dir, nmse, CONTEXT,
};
use kiln_core::{Backend, DType};
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Arch, GgufFile};
use kiln_models::{LoadOptions, Model};
use serde_json::Value;
use std::path::Path;

/// The fixture checkpoint.
const NAME: &str = "qwen3next-tiny";

/// The fixtures, checked on `model` as [`hybrid::check_fixtures`] does.
fn check_fixtures<BE: Backend>(model: &mut Model<BE>, max_nmse: f64, what: &str) {
    assert_eq!(model.config().arch, Arch::Qwen3Next);
    hybrid::check_fixtures(model, NAME, max_nmse, what);
}

fn converted(dtype: DType, dir: &Path) -> GgufFile {
    hybrid::converted(NAME, dtype, dir)
}

/// The f32 conversion keeps the checkpoint's weights exactly: the logits of every
/// prompt (the chunkwise delta rule over 200 tokens included) and of every decode
/// step (the recurrent form, the carried convolution and delta-rule states, the KV
/// cache) agree with transformers to f32 summation order.
#[test]
fn qwen3next_matches_transformers_logits_through_prompt_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(CpuBackend, &converted(DType::F32, dir.path()));
    let lin = model.config().linear.clone().expect("a hybrid model");
    assert_eq!(lin.full_attention_interval, 4);
    assert_eq!(model.config().rope.rotary_dim, 4);
    check_fixtures(&mut model, 1e-10, "cpu f32");
}

/// On the CPU a prompt in chunks of 7 tokens, or token by token, leaves the state of
/// one pass (the chunkwise and the recurrent delta rule agree to f32 rounding).
#[test]
fn a_prompt_in_chunks_leaves_the_state_of_one_pass() {
    check_chunked_prompt(NAME, || CpuBackend, 1e-10, "cpu");
}

/// On the GPU likewise, within the rounding of the one pass's products to bf16
/// operands (the mat-mat takes more than 8 rows; chunks of 7 and single tokens run
/// f32 mat-vecs).
#[test]
#[ignore = "needs a CUDA device"]
fn a_prompt_in_chunks_on_cuda_leaves_the_state_of_one_pass() {
    check_chunked_prompt(NAME, cuda, 1e-3, "cuda");
}

/// Resetting starts a new sequence with zeroed states: the same prompt gives the same
/// logits again. Truncation of the recurrent state is possible only to 0 or to the
/// current length (or beyond); anything between is an error that changes nothing.
#[test]
fn recurrent_state_resets_and_refuses_partial_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(CpuBackend, &converted(DType::F32, dir.path()));
    // Three linear-attention layers of a convolution state [128, 3] and a delta-rule
    // state [4, 16, 16], in f32.
    assert_eq!(
        model.recurrent_state_bytes(),
        3 * (128 * 3 + 4 * 16 * 16) * 4
    );
    let prompt = &fixtures(NAME)[1].input_ids;
    let first = model.forward(prompt).unwrap();
    let err = model.truncate(3).unwrap_err().to_string();
    assert!(
        err.contains("cannot be truncated to 3") && err.contains("qwen3next"),
        "{err}"
    );
    assert_eq!(model.n_past(), prompt.len());
    model.truncate(prompt.len()).unwrap();
    model.truncate(prompt.len() + 5).unwrap();
    assert_eq!(model.n_past(), prompt.len());
    // The state now holds the prompt: running it again continues the sequence.
    let continued = model.forward(prompt).unwrap();
    assert!(
        nmse(
            &continued,
            &first.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
        ) > 1e-6
    );
    model.truncate(0).unwrap();
    assert_eq!(model.n_past(), 0);
    let again = model.forward(prompt).unwrap();
    assert_eq!(again, first, "a reset model repeats its first pass");
}

/// The recurrent state holds one sequence: several slots are refused with an
/// Unsupported error naming the architecture, and the one slot's batched steps run in
/// order through the one-sequence path: their logits and greedy tokens are those of
/// `Model::forward` over the same tokens, pieces ending at each row that asks.
#[test]
fn several_slots_are_refused_and_batched_steps_run_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DType::F32, dir.path());
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots: 2,
    };
    let e = Model::load(CpuBackend, &file, options, &mut |_, _| {})
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, kiln_core::Error::Unsupported(_)), "{e}");
    assert!(
        e.to_string().contains("qwen3next") && e.to_string().contains("one slot"),
        "{e}"
    );

    let row = |token: u32, logits: bool| kiln_models::BatchRow {
        slot: 0,
        token,
        logits,
    };
    let mut batched = load(CpuBackend, &file);
    let mut reference = load(CpuBackend, &file);
    let vocab = batched.config().vocab;
    // Checks first: nothing runs, no position is consumed.
    for bad in [
        vec![],
        vec![
            row(1, true),
            kiln_models::BatchRow {
                slot: 1,
                token: 2,
                logits: true,
            },
        ],
        vec![row(1, false), row(vocab as u32, true)],
    ] {
        assert!(batched.forward_batch(&bad).is_err(), "{bad:?}");
        assert!(batched.forward_batch_greedy(&bad).is_err(), "{bad:?}");
        assert_eq!(batched.n_past(), 0);
    }

    // A prompt whose last row asks for logits, then a decode row.
    let prompt = [3u32, 17, 5, 42, 8, 1, 99];
    let rows: Vec<_> = prompt
        .iter()
        .enumerate()
        .map(|(i, &t)| row(t, i + 1 == prompt.len()))
        .collect();
    let got = batched.forward_batch(&rows).unwrap();
    assert_eq!(got, reference.forward(&prompt).unwrap());
    let next = kiln_models::sampler::argmax(&got) as u32;
    assert_eq!(
        batched.forward_batch(&[row(next, true)]).unwrap(),
        reference.forward(&[next]).unwrap()
    );
    // Rows asking in the middle and a last piece that asks for nothing.
    let rows = [
        row(7, false),
        row(11, true),
        row(2, true),
        row(13, false),
        row(6, true),
        row(4, false),
    ];
    let tokens = batched.forward_batch_greedy(&rows).unwrap();
    let mut want = Vec::new();
    for piece in [&[7u32, 11][..], &[2], &[13, 6]] {
        want.push(kiln_models::sampler::argmax(&reference.forward(piece).unwrap()) as u32);
    }
    reference.forward(&[4]).unwrap();
    assert_eq!(tokens, want);
    assert_eq!(batched.n_past(), prompt.len() + 1 + rows.len());
    assert_eq!(batched.n_past(), reference.n_past());
    // The states agree after all of it.
    assert_eq!(
        batched.forward(&[9]).unwrap(),
        reference.forward(&[9]).unwrap()
    );
}

/// With Q8_0 weight matrices (their products reading Q8_1 copies of the
/// activations), the logits stay close to the float32 reference: about 2e-3 here,
/// where a width of 64 leaves two blocks per row.
#[test]
fn q8_0_qwen3next_logits_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(CpuBackend, &converted(DType::Q8_0, dir.path()));
    let f = &fixtures(NAME)[1];
    let e = nmse(&model.forward(&f.input_ids).unwrap(), &f.logits[0]);
    eprintln!("qwen3next q8_0: logits NMSE {e:.2e}");
    assert!(e < 1e-2, "qwen3next q8_0: logits NMSE {e:.2e}");
}

/// The fixtures on the GPU: prompts through the recurrent delta-rule kernel token by
/// token (CUDA has no chunkwise kernel), decode through the replayed graph. In chunks
/// of 8 tokens every product is an f32 mat-vec, so the logits agree with transformers
/// to f32 summation order; in one chunk the prompt's products take bf16 operands (the
/// mat-mat), whose rounding the logits show, carried into the decode steps by the
/// caches and recurrent states. The greedy tokens equal the fixture's either way
/// (their margins, above 0.02, far exceed the bf16 noise).
#[test]
#[ignore = "needs a CUDA device"]
fn qwen3next_on_cuda_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load(cuda(), &converted(DType::F32, dir.path()));
    for (chunk, max_nmse) in [(8, 1e-6), (512, 1e-3)] {
        model.set_prefill_chunk(chunk).unwrap();
        check_fixtures(
            &mut model,
            max_nmse,
            &format!("cuda f32, chunks of {chunk}"),
        );
    }
}

/// 32 greedy tokens on the GPU equal the CPU's from each fixture prompt, for F32 and
/// Q8_0 weights, prompts in chunks of 8 (f32 mat-vecs), with logits within NMSE 1e-6
/// (1e-3 for Q8_0, whose products read activations rounded to 8 bits on the GPU).
/// The backends sum in other orders: a step whose two best CPU
/// logits lie closer than four times the RMS difference of the two backends' logits
/// may choose the other token, and the comparison ends there; any other divergence
/// fails.
#[test]
#[ignore = "needs a CUDA device"]
fn qwen3next_greedy_tokens_on_cuda_equal_the_cpus() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::Q8_0, 1e-3)] {
        let file = converted(dtype, dir.path());
        let mut gpu = load(cuda(), &file);
        gpu.set_prefill_chunk(8).unwrap();
        let mut cpu = load(CpuBackend, &file);
        greedy_tokens_agree(NAME, &mut gpu, &mut cpu, tolerance, &format!("{dtype}"));
    }
}

/// kiln convert writes what llama.cpp's converter writes for Qwen3-Next: its keys,
/// the zero-centred norms plus one (not the gated norm), `ssm_a = -exp(A_log)`, the
/// convolution without its middle axis, and `in_proj_qkvz` (per key head q, k, v, z)
/// as `attn_qkv` (all q, all k, all v) and `attn_gate` (all z).
#[test]
fn conversion_writes_llama_cpp_tensors_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = converted(DType::F32, dir.path());
    let md = file.metadata();
    for (key, want) in [
        ("ssm.conv_kernel", 4),
        ("ssm.state_size", 16),
        ("ssm.group_count", 2),
        ("ssm.time_step_rank", 4),
        ("ssm.inner_size", 64),
        ("full_attention_interval", 4),
        ("rope.dimension_count", 4),
        ("attention.key_length", 16),
        ("expert_feed_forward_length", 16),
        ("expert_shared_feed_forward_length", 32),
    ] {
        assert_eq!(
            md.get_u64(&format!("qwen3next.{key}")).unwrap(),
            want,
            "{key}"
        );
    }
    let gguf = |name: &str| gguf_tensor(&file, name);
    let close = |got: &[f32], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{what}: {g} vs {w}"
            );
        }
    };
    let (_, a_log) = checkpoint_tensor(NAME, "model.layers.1.linear_attn.A_log");
    let want: Vec<f64> = a_log.iter().map(|&v| -f64::from(v).exp()).collect();
    close(&gguf("blk.1.ssm_a").1, &want, "ssm_a");
    for (hf, gg) in [
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.3.self_attn.q_norm.weight",
            "blk.3.attn_q_norm.weight",
        ),
        (
            "model.layers.2.post_attention_layernorm.weight",
            "blk.2.post_attention_norm.weight",
        ),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        let want: Vec<f64> = checkpoint_tensor(NAME, hf)
            .1
            .iter()
            .map(|&v| 1.0 + f64::from(v))
            .collect();
        close(&gguf(gg).1, &want, gg);
    }
    let (_, norm) = checkpoint_tensor(NAME, "model.layers.0.linear_attn.norm.weight");
    assert_eq!(gguf("blk.0.ssm_norm.weight").1, norm);
    let (shape, conv) = gguf("blk.0.ssm_conv1d.weight");
    assert_eq!(shape, [128, 4]);
    assert_eq!(
        conv,
        checkpoint_tensor(NAME, "model.layers.0.linear_attn.conv1d.weight").1
    );
    // Per key head 96 rows: q 0..16, k 16..32, v 32..64, z 64..96.
    let (qkvz_shape, qkvz) =
        checkpoint_tensor(NAME, "model.layers.2.linear_attn.in_proj_qkvz.weight");
    assert_eq!(qkvz_shape, [192, 64]);
    let row = |m: &[f32], r: usize| m[r * 64..(r + 1) * 64].to_vec();
    let (qkv_shape, qkv) = gguf("blk.2.attn_qkv.weight");
    let (gate_shape, gate) = gguf("blk.2.attn_gate.weight");
    assert_eq!((qkv_shape, gate_shape), (vec![128, 64], vec![64, 64]));
    for (got, hf_row) in [
        (0, 0),
        (16, 96),
        (32, 16),
        (48, 112),
        (64, 32),
        (95, 63),
        (96, 128),
        (127, 159),
    ] {
        assert_eq!(row(&qkv, got), row(&qkvz, hf_row), "attn_qkv row {got}");
    }
    for (got, hf_row) in [(0, 64), (31, 95), (32, 160), (63, 191)] {
        assert_eq!(row(&gate, got), row(&qkvz, hf_row), "attn_gate row {got}");
    }
    let (ba_shape, ba) = gguf("blk.2.ssm_ba.weight");
    assert_eq!(ba_shape, [8, 64]);
    assert_eq!(
        ba,
        checkpoint_tensor(NAME, "model.layers.2.linear_attn.in_proj_ba.weight").1
    );
}

/// A checkpoint whose layers are not one full-attention layer in every
/// `full_attention_interval` is refused, naming layer_types.
#[test]
fn an_irregular_layer_pattern_is_a_conversion_error() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(model_dir(NAME).join(file), dir.path().join(file)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["layer_types"] = serde_json::json!([
        "linear_attention",
        "full_attention",
        "linear_attention",
        "full_attention"
    ]);
    config["full_attention_interval"] = 4.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let e = HfCheckpoint::open(dir.path())
        .err()
        .expect("an irregular pattern converts");
    assert!(
        matches!(e, kiln_core::Error::Unsupported(_)) && e.to_string().contains("layer_types"),
        "{e}"
    );
}
