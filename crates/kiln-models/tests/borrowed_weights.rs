//! On the CPU, a model's weights borrow the file's memory map instead of copying
//! it, and run unstacked; the logits are bit for bit those of stacked copies.

mod common;

use common::{Stacking, Tiny};
use kiln_core::{Backend, DType};
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile, SharedBytes};
use kiln_models::{LoadOptions, Model};

fn load<BE: Backend>(backend: BE, file: &GgufFile) -> Model<BE> {
    let options = LoadOptions {
        context: Some(64),
        cache_dtype: DType::F32,
        slots: 1,
    };
    Model::load(backend, file, options, &mut |_, _| {}).unwrap()
}

/// The logits of a prefill of `prompt` and of eight greedy decode steps after it.
fn logits<BE: Backend>(model: &mut Model<BE>, prompt: &[u32]) -> Vec<Vec<f32>> {
    let mut all = vec![model.forward(prompt).unwrap()];
    for _ in 0..8 {
        let last = all.last().unwrap();
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        all.push(model.forward(&[next]).unwrap());
    }
    all
}

/// Whether `model`'s one-token graph reads a weight named `blk.N.{suffix}`.
fn reads<BE: Backend>(model: &Model<BE>, suffix: &str) -> bool {
    model
        .graph(1)
        .unwrap()
        .graph
        .buffers()
        .iter()
        .any(|b| b.name.starts_with("blk.") && b.name.ends_with(&format!(".{suffix}")))
}

/// Loads `file` on the CPU and on [`Stacking`]: the CPU borrows every weight (but a
/// hybrid model's split projections, copies of parts of file tensors), the stacking
/// backend reads each of `stacks` (the CPU none of them), and the CPU's logits equal
/// the stacked copies' bit for bit.
fn check(label: &str, file: &GgufFile, prompt: &[u32], stacks: &[&str]) {
    let mut cpu = load(CpuBackend, file);
    assert!(cpu.weight_bytes() > 0);
    if cpu.config().linear.is_none() {
        assert_eq!(
            cpu.borrowed_weight_bytes(),
            cpu.weight_bytes(),
            "{label}: every weight borrowed"
        );
    } else {
        let borrowed = cpu.borrowed_weight_bytes();
        assert!(
            borrowed > 0 && borrowed < cpu.weight_bytes(),
            "{label}: all but the split weights borrowed"
        );
    }
    let mut stacked = load(Stacking::default(), file);
    assert_eq!(stacked.borrowed_weight_bytes(), 0, "{label}: copies");
    for stack in stacks {
        assert!(
            reads(&stacked, stack),
            "{label}: the reference reads {stack}"
        );
        assert!(
            !reads(&cpu, stack),
            "{label}: the CPU does not stack {stack}"
        );
    }
    let (got, want) = (logits(&mut cpu, prompt), logits(&mut stacked, prompt));
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{label}: logits of step {step} differ");
    }
}

#[test]
fn the_small_model_borrows_its_map_and_computes_the_stacked_logits() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::Q4_0] {
        let file = common::small_model_gguf(dir.path(), dtype);
        check(
            &format!("{dtype}"),
            &file,
            &[1, 17, 42, 299, 5],
            &["attn_qkv.weight", "ffn_gate_up.weight"],
        );
    }
}

#[test]
fn tiny_models_with_biases_and_norms_compute_the_stacked_logits() {
    for tiny in [Tiny::LLAMA, Tiny::QWEN2, Tiny::QWEN3] {
        let file = Gguf::from_shared(SharedBytes::new(tiny.bytes()), "tiny.gguf").unwrap();
        check(
            tiny.arch,
            &file,
            &[1, 3, 4],
            &["attn_qkv.weight", "ffn_gate_up.weight"],
        );
    }
}

/// Tiny random-weight mixture-of-experts and hybrid checkpoints (tests/fixtures),
/// converted to GGUF: each chosen expert's gate and up rows are one stacked product,
/// and the shared expert's where there is one.
#[test]
fn expert_stacks_compute_the_unstacked_logits() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let shared = ["ffn_gate_up_exps.weight", "ffn_gate_up_shexp.weight"];
    for (name, stacks) in [
        (
            "qwen3moe-tiny",
            &["attn_qkv.weight", "ffn_gate_up_exps.weight"][..],
        ),
        ("qwen2moe-tiny", &shared[..]),
        ("qwen3next-tiny", &shared[..]),
        ("qwen35moe-tiny", &shared[..]),
    ] {
        let out = dir.path().join(format!("{name}.gguf"));
        HfCheckpoint::open(fixtures.join(name))
            .unwrap()
            .write_gguf(&out, DType::F32, &mut |_, _| {})
            .unwrap();
        let file = Gguf::open(&out).unwrap();
        check(name, &file, &[1, 7, 3, 12, 5], stacks);
    }
}
