//! `kiln inspect` and `kiln quantize`, run as the built binary on GGUF files the
//! tests write with kiln-gguf.

use kiln_core::DType;
use kiln_gguf::{keys, Gguf, GgufWriter, Metadata, TensorDesc};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh path under the test's temporary directory.
fn temp_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Runs `kiln ARGS`, returning its output.
fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

/// Runs `kiln ARGS`, which must succeed; returns stdout.
fn kiln_ok(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Deterministic, non-zero, sign-varying values.
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.37 + seed).sin() * 2.0 + 0.01)
        .collect()
}

/// Values exactly representable in f16 (multiples of 1/8 up to +-16).
fn f16_exact_values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 257) as f32 - 128.0) / 8.0)
        .collect()
}

/// The tensors of the test model: name, dtype, row-major shape, f32 values.
fn model_tensors() -> Vec<(TensorDesc, Vec<f32>)> {
    let f32_tensor = |name: &str, shape: &[usize], seed: f32| {
        let n = shape.iter().product();
        (TensorDesc::new(name, DType::F32, shape), values(n, seed))
    };
    vec![
        f32_tensor("token_embd.weight", &[16, 64], 0.5),
        f32_tensor("blk.0.attn_norm.weight", &[64], 1.5),
        f32_tensor("blk.0.attn_q.weight", &[8, 64], 2.5),
        f32_tensor("blk.0.attn_q.bias", &[8], 3.5),
        f32_tensor("blk.0.ffn_down.weight", &[4, 48], 4.5),
        f32_tensor("blk.0.ffn_gate.weight", &[2, 256], 5.5),
        (
            TensorDesc::new("blk.0.ffn_up.weight", DType::F16, &[2, 32]),
            f16_exact_values(64),
        ),
    ]
}

/// Writes the test model to `path`.
fn write_model(path: &Path) {
    let mut m = Metadata::new();
    m.set(keys::ARCHITECTURE, "llama");
    m.set("llama.block_count", 1u32);
    m.set("llama.rope.freq_base", 10000.0f32);
    let tokens: Vec<String> = (0..100).map(|i| format!("tok{i}")).collect();
    m.set("tokenizer.ggml.tokens", tokens);
    let tensors = model_tensors();
    let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = GgufWriter::create(path, &m, &descs).unwrap();
    for (desc, vals) in &tensors {
        let mut bytes = vec![0u8; desc.dtype.bytes_for(vals.len()).unwrap()];
        kiln_core::quant::quantize(desc.dtype, vals, &mut bytes).unwrap();
        w.write_tensor_data(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn model(name: &str) -> PathBuf {
    let path = temp_path(name);
    write_model(&path);
    path
}

#[test]
fn inspect_prints_header_metadata_and_a_tensor_table() {
    let path = model("inspect_text.gguf");
    let out = kiln_ok(&["inspect", path.to_str().unwrap()]);
    assert!(out.contains("GGUF v3"), "{out}");
    assert!(
        out.contains("tensors: 7  metadata keys: 4  alignment: 32"),
        "{out}"
    );
    assert!(out.contains("\"tok0\", \"tok1\""), "{out}");
    assert!(
        out.contains("... 94 more"),
        "long arrays are abbreviated: {out}"
    );
    assert!(!out.contains("tok99"), "{out}");
    for (desc, _) in model_tensors() {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(desc.name.as_str()))
            .unwrap_or_else(|| panic!("no table row for {}: {out}", desc.name));
        assert!(row.contains(desc.dtype.name()), "{row}");
        assert!(row.contains(&format!("{:?}", desc.shape)), "{row}");
    }
}

#[test]
fn inspect_json_parses_and_describes_every_tensor() {
    let path = model("inspect_json.gguf");
    let out = kiln_ok(&["inspect", "--json", path.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(doc["version"], 3);
    assert_eq!(doc["tensor_count"], 7);
    assert_eq!(doc["metadata"][1]["key"], "llama.block_count");
    assert_eq!(doc["metadata"][1]["type"], "u32");
    assert_eq!(doc["metadata"][1]["value"], 1);
    assert_eq!(
        doc["metadata"][3]["value"][99], "tok99",
        "JSON keeps whole arrays"
    );
    let tensors = doc["tensors"].as_array().unwrap();
    for ((desc, _), t) in model_tensors().iter().zip(tensors) {
        assert_eq!(t["name"], desc.name.as_str());
        assert_eq!(t["dtype"], desc.dtype.name());
        assert_eq!(t["shape"], serde_json::json!(desc.shape));
        let gguf_dims: Vec<usize> = desc.shape.iter().rev().copied().collect();
        assert_eq!(t["gguf_dims"], serde_json::json!(gguf_dims));
    }
    assert_eq!(tensors[2]["bytes"], 8 * 64 * 4);
}

#[test]
fn inspect_tensor_prints_the_values_written() {
    let path = model("inspect_tensor.gguf");
    let p = path.to_str().unwrap();
    for (desc, expected) in model_tensors() {
        let out = kiln_ok(&["inspect", p, "--tensor", &desc.name, "--json"]);
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let got: Vec<f32> = doc["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, expected, "{}", desc.name);
    }
    let out = kiln_ok(&["inspect", p, "--tensor", "blk.0.attn_q.weight"]);
    let first: Vec<String> = values(6, 2.5).iter().map(|v| format!("{v:?}")).collect();
    assert!(out.contains(&first.join(", ")), "{out}");
    assert!(out.contains("shape [8, 64]"), "{out}");
}

/// Reads a .npy file of f32: (header dict text, values).
fn read_npy(path: &Path) -> (String, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0, "data starts 64-byte aligned");
    let header = String::from_utf8(bytes[10..10 + header_len].to_vec()).unwrap();
    assert!(header.ends_with('\n'));
    let values = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (header, values)
}

#[test]
fn inspect_tensor_out_writes_a_row_major_npy() {
    let path = model("inspect_npy.gguf");
    let npy = temp_path("inspect_npy_attn_q.npy");
    kiln_ok(&[
        "inspect",
        path.to_str().unwrap(),
        "--tensor",
        "blk.0.attn_q.weight",
        "--out",
        npy.to_str().unwrap(),
    ]);
    let (header, got) = read_npy(&npy);
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    assert!(header.contains("'shape': (8, 64)"), "{header}");
    assert_eq!(got, values(8 * 64, 2.5));

    let npy1 = temp_path("inspect_npy_bias.npy");
    kiln_ok(&[
        "inspect",
        path.to_str().unwrap(),
        "--tensor",
        "blk.0.attn_q.bias",
        "--out",
        npy1.to_str().unwrap(),
    ]);
    let (header, got) = read_npy(&npy1);
    assert!(
        header.contains("'shape': (8,)"),
        "1-D shapes are one-tuples: {header}"
    );
    assert_eq!(got, values(8, 3.5));
}

#[test]
fn inspect_reports_bad_files_and_tensor_names() {
    let not_gguf = temp_path("inspect_not_gguf.bin");
    std::fs::write(&not_gguf, b"PK\x03\x04 definitely not gguf").unwrap();
    let out = kiln(&["inspect", not_gguf.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a GGUF file") && err.contains("inspect_not_gguf.bin"),
        "{err}"
    );

    let path = model("inspect_missing_tensor.gguf");
    let out = kiln(&["inspect", path.to_str().unwrap(), "--tensor", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\""));
}

/// Quantizes `input` to `dtype`, returning the output file parsed.
fn quantize(input: &Path, output: &str, dtype: &str) -> (Gguf<Vec<u8>>, String) {
    let out_path = temp_path(output);
    let stdout = kiln_ok(&[
        "quantize",
        input.to_str().unwrap(),
        out_path.to_str().unwrap(),
        "--type",
        dtype,
    ]);
    let bytes = std::fs::read(&out_path).unwrap();
    (Gguf::from_bytes(bytes, output).unwrap(), stdout)
}

#[test]
fn quantize_to_f16_converts_weight_matrices_and_keeps_the_rest() {
    let input = model("quantize_f16_in.gguf");
    let (g, stdout) = quantize(&input, "quantize_f16_out.gguf", "f16");
    assert!(
        stdout.contains("converted 4 tensors to f16, kept 3"),
        "{stdout}"
    );
    let expected = [
        ("token_embd.weight", DType::F16),
        ("blk.0.attn_norm.weight", DType::F32),
        ("blk.0.attn_q.weight", DType::F16),
        ("blk.0.attn_q.bias", DType::F32),
        ("blk.0.ffn_down.weight", DType::F16),
        ("blk.0.ffn_gate.weight", DType::F16),
        ("blk.0.ffn_up.weight", DType::F16),
    ];
    for ((name, dtype), (desc, vals)) in expected.iter().zip(model_tensors()) {
        let t = g.tensor(name).unwrap();
        assert_eq!(t.info.dtype(), *dtype, "{name}");
        assert_eq!(t.info.shape(), desc.shape.as_slice(), "{name}");
        for (got, want) in t.to_f32().unwrap().iter().zip(&vals) {
            // f16 keeps 11 significant bits: relative error at most 2^-11.
            assert!(
                (got - want).abs() <= want.abs() * 4.9e-4,
                "{name}: {got} vs {want}"
            );
        }
    }
    assert_eq!(g.metadata().get_u32(keys::FILE_TYPE).unwrap(), 1);
    assert_eq!(g.metadata().get_u32("llama.block_count").unwrap(), 1);
    assert_eq!(
        g.metadata()
            .get_array("tokenizer.ggml.tokens")
            .unwrap()
            .len(),
        100
    );
    let size_in = std::fs::metadata(&input).unwrap().len();
    assert!(
        (g.bytes().len() as u64) < size_in,
        "{} >= {size_in}",
        g.bytes().len()
    );
}

#[test]
fn quantize_to_q8_0_shrinks_the_file_within_the_format_error() {
    let input = model("quantize_q8_0_in.gguf");
    let (g, stdout) = quantize(&input, "quantize_q8_0_out.gguf", "q8_0");
    assert!(
        stdout.contains(
            "converted 5 tensors: 4 to q8_0, and where rows are not whole q8_0 blocks \
             1 to f16; kept 2 as they were"
        ),
        "{stdout}"
    );
    for (desc, vals) in model_tensors() {
        let t = g.tensor(&desc.name).unwrap();
        let row_fits = desc.shape.last().is_some_and(|&n| n % 32 == 0);
        let matrix = desc.name.ends_with(".weight") && desc.shape.len() == 2;
        // Rows that are not whole blocks fall back to f16, as kiln convert does.
        let want = match (matrix, row_fits) {
            (true, true) => DType::Q8_0,
            (true, false) => DType::F16,
            (false, _) => desc.dtype,
        };
        assert_eq!(t.info.dtype(), want, "{}", desc.name);
        let got = t.to_f32().unwrap();
        for (block_got, block_want) in got.chunks(32).zip(vals.chunks(32)) {
            // Q8_0 stores round(x / d) with d = max|x| / 127 per block of 32: an
            // element is off by at most half a step, plus the f16 rounding of d.
            let step = block_want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in block_got.iter().zip(block_want) {
                assert!((a - b).abs() <= 0.6 * step, "{}: {a} vs {b}", desc.name);
            }
        }
    }
    assert_eq!(g.metadata().get_u32(keys::FILE_TYPE).unwrap(), 7);
    assert_eq!(g.metadata().get_u32(keys::QUANTIZATION_VERSION).unwrap(), 2);
    let size_in = std::fs::metadata(&input).unwrap().len() as usize;
    assert!(
        g.bytes().len() < size_in * 6 / 10,
        "{} vs {size_in}",
        g.bytes().len()
    );
}

#[test]
fn quantize_to_q4_k_falls_back_where_rows_are_not_whole_super_blocks() {
    let input = model("quantize_q4_k_in.gguf");
    let (g, stdout) = quantize(&input, "quantize_q4_k_out.gguf", "q4_k");
    assert!(
        stdout.contains(
            "converted 5 tensors: 1 to q4_k, and where rows are not whole q4_k blocks \
             3 to q5_0, 1 to f16; kept 2 as they were"
        ),
        "{stdout}"
    );
    let gate = g.tensor("blk.0.ffn_gate.weight").unwrap();
    assert_eq!(gate.info.dtype(), DType::Q4K);
    assert_eq!(
        gate.data.len(),
        2 * 144,
        "two rows of one 144-byte super-block"
    );
    let want = values(512, 5.5);
    let got = gate.to_f32().unwrap();
    let err: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
    let signal: f32 = want.iter().map(|b| b * b).sum();
    // 4 bits per weight: the relative RMS error is a few percent.
    let rel_rmse = (err / signal).sqrt();
    assert!(rel_rmse < 0.1, "relative RMSE {rel_rmse}");
    // llama-quantize's fallbacks: q5_0 for rows of whole 32-element blocks, else f16.
    let dtype = |name: &str| g.tensor(name).unwrap().info.dtype();
    assert_eq!(dtype("token_embd.weight"), DType::Q5_0);
    assert_eq!(dtype("blk.0.attn_q.weight"), DType::Q5_0);
    assert_eq!(dtype("blk.0.ffn_up.weight"), DType::Q5_0);
    assert_eq!(dtype("blk.0.ffn_down.weight"), DType::F16);
    assert_eq!(dtype("blk.0.attn_norm.weight"), DType::F32);
    assert_eq!(dtype("blk.0.attn_q.bias"), DType::F32);
    assert_eq!(g.metadata().get_u32(keys::FILE_TYPE).unwrap(), 14);
}

#[test]
fn quantize_refuses_bad_types_and_overwriting_its_input() {
    let input = model("quantize_refuse_in.gguf");
    let p = input.to_str().unwrap();
    let out = kiln(&["quantize", p, p, "--type", "f16"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the input file"));
    assert!(Gguf::open(&input).is_ok(), "the input is untouched");

    let target = temp_path("quantize_refuse_out.gguf");
    let out = kiln(&["quantize", p, target.to_str().unwrap(), "--type", "q8_1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("q8_1") && err.contains("q4_k"), "{err}");
    let out = kiln(&["quantize", p, target.to_str().unwrap(), "--type", "q4_2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dtype"));
}

#[test]
fn quantize_to_low_bit_types_writes_their_blocks_and_fallbacks() {
    // (type, file type, the type of each tensor of the test model in order): rows
    // of 64 and 32 elements are not whole tq2_0 blocks (256) and fall back to
    // q4_0 as llama-quantize does; q1_0 (128) has no fallback type, so they go to
    // f16; rows of 48 are f16 either way.
    let cases = [
        (
            "tq2_0",
            37,
            [
                DType::Q4_0,
                DType::F32,
                DType::Q4_0,
                DType::F32,
                DType::F16,
                DType::TQ2_0,
                DType::Q4_0,
            ],
        ),
        (
            "q1_0",
            40,
            [
                DType::F16,
                DType::F32,
                DType::F16,
                DType::F32,
                DType::F16,
                DType::Q1_0,
                DType::F16,
            ],
        ),
    ];
    for (name, file_type, types) in cases {
        let input = model(&format!("quantize_{name}_in.gguf"));
        let (g, _) = quantize(&input, &format!("quantize_{name}_out.gguf"), name);
        for ((desc, vals), want) in model_tensors().iter().zip(types) {
            let t = g.tensor(&desc.name).unwrap();
            assert_eq!(t.info.dtype(), want, "{name}: {}", desc.name);
            if want == DType::TQ2_0 || want == DType::Q1_0 {
                // The stored blocks are the library quantizer's, on the input values.
                let mut expected = vec![0u8; want.bytes_for(vals.len()).unwrap()];
                kiln_core::quant::quantize(want, vals, &mut expected).unwrap();
                assert_eq!(t.data, expected.as_slice(), "{name}: {}", desc.name);
            }
        }
        assert_eq!(
            g.metadata().get_u32(keys::FILE_TYPE).unwrap(),
            file_type,
            "{name}"
        );
    }
}
