//! Embedding: the dispatch checks (no GPU needed) and parity with kiln-cpu on the GPU,
//! with its Q8_1 copy of `out`.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{Embedding, Q8_COPY, WEIGHT_DTYPES};
use kiln_core::{Aliasing, BufferId, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::embedding::EmbeddingArgs;

/// A valid embedding of 3 tokens from a 10 x 64 Q4_0 table.
fn args() -> EmbeddingArgs {
    EmbeddingArgs {
        table: DType::Q4_0,
        n_tokens: 3,
        vocab: 10,
        dim: 64,
        table_bytes: 10 * 2 * 18,
        table_packed: Some((DType::Q4_0, 64)),
        ids_bytes: 3 * 4,
        out_bytes: 3 * 64 * 4,
        out_q8_bytes: None,
    }
}

#[test]
fn a_valid_embedding_plans_one_block_row_per_token() {
    let plan = args().check().unwrap();
    assert_eq!(plan.spec.key, "embedding|table=q4_0");
    assert_eq!(plan.spec.name_expression, "kiln::embedding<kiln::Q4_0>");
    assert_eq!(plan.config.grid_dim, (3, 1, 1));
}

#[test]
fn a_packed_table_uploaded_without_packing_is_rejected() {
    assert_eq!(
        invalid(
            EmbeddingArgs {
                table_packed: None,
                ..args()
            }
            .check()
        ),
        "embedding: table of q4_0 must be uploaded with upload_weight as rows of 64 (the \
         planes layout); its buffer holds bytes from a plain upload"
    );
}

#[test]
fn zero_tokens_are_rejected() {
    let m = invalid(
        EmbeddingArgs {
            n_tokens: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(m, "embedding: n_tokens must be > 0, got 0");
}

#[test]
fn an_empty_vocabulary_is_rejected() {
    let m = invalid(EmbeddingArgs { vocab: 0, ..args() }.check());
    assert_eq!(m, "embedding: vocab must be > 0, got 0");
}

#[test]
fn a_zero_dim_is_rejected() {
    let m = invalid(EmbeddingArgs { dim: 0, ..args() }.check());
    assert_eq!(m, "embedding: dim must be > 0, got 0");
}

#[test]
fn a_table_dtype_that_is_no_weight_format_is_rejected() {
    for dtype in [DType::I32, DType::Q8_1, DType::Q8K] {
        let m = invalid(
            EmbeddingArgs {
                table: dtype,
                ..args()
            }
            .check(),
        );
        assert!(
            m.starts_with(&format!(
                "embedding: weight has dtype {dtype}, expected one of [f32"
            )),
            "{m}"
        );
    }
}

#[test]
fn a_dim_that_is_not_whole_blocks_is_rejected() {
    let m = invalid(EmbeddingArgs { dim: 48, ..args() }.check());
    assert_eq!(
        m,
        "embedding: dim 48 is not a multiple of q4_0's block size 32"
    );
}

#[test]
fn a_short_table_is_rejected() {
    let m = invalid(
        EmbeddingArgs {
            table_bytes: 359,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "embedding: table needs 640 q4_0 elements (360 bytes), its buffer has 359 bytes"
    );
}

#[test]
fn short_ids_are_rejected() {
    let m = invalid(
        EmbeddingArgs {
            ids_bytes: 8,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "embedding: ids needs 3 i32 elements (12 bytes), its buffer has 8 bytes"
    );
}

#[test]
fn a_short_output_is_rejected() {
    let m = invalid(
        EmbeddingArgs {
            out_bytes: 767,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "embedding: out needs 192 f32 elements (768 bytes), its buffer has 767 bytes"
    );
}

#[test]
fn a_copy_of_rows_that_are_not_whole_q8_1_blocks_is_rejected() {
    let m = invalid(
        EmbeddingArgs {
            table: DType::F32,
            dim: 48,
            table_bytes: 10 * 48 * 4,
            table_packed: None,
            out_bytes: 3 * 48 * 4,
            out_q8_bytes: Some(3 * 48 / 32 * 36),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "embedding: out_q8: rows of 48 elements cannot be rounded to q8_1, which needs a \
         multiple of 32"
    );
}

#[test]
fn a_short_copy_is_rejected() {
    let m = invalid(
        EmbeddingArgs {
            out_q8_bytes: Some(6 * 36 - 1),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "embedding: out_q8 needs 192 q8_1 elements (216 bytes), its buffer has 215 bytes"
    );
    assert!(EmbeddingArgs {
        out_q8_bytes: Some(6 * 36),
        ..args()
    }
    .check()
    .is_ok());
}

/// A graph's inputs: each buffer and its bytes.
type Inputs = Vec<(BufferId, Vec<u8>)>;

/// A gather of ids 1000, 0, 7, 999, 7 (an odd count, one repeated) from a random
/// 1001-row table of `dtype` and rows of `dim`, with the Q8_1 copy of its output when
/// `copy`: the graph, its inputs, and its outputs (`out`, then the copy).
fn gather(
    rng: &mut rand::rngs::StdRng,
    dtype: DType,
    dim: usize,
    copy: bool,
) -> (Graph, Inputs, Vec<BufferId>) {
    let (vocab, ids) = (1001, [1000, 0, 7, 999, 7]);
    let n_tokens = ids.len();
    let mut g = Graph::new();
    let table = g.persistent("table", dtype, &[vocab, dim]).unwrap();
    let id_buf = g.persistent("ids", DType::I32, &[n_tokens]).unwrap();
    let out = g.persistent("out", DType::F32, &[n_tokens, dim]).unwrap();
    let out_q8 = copy.then(|| g.persistent("q8", Q8_COPY, &[n_tokens, dim]).unwrap());
    g.push(Embedding {
        table,
        ids: id_buf,
        out,
        out_q8,
        n_tokens,
        vocab,
        dim,
    })
    .unwrap();
    let inputs = vec![
        (table, encoded(rng, dtype, vocab * dim)),
        (id_buf, i32_bytes(&ids)),
    ];
    let outs = std::iter::once(out).chain(out_q8).collect();
    (g, inputs, outs)
}

/// Row lengths per dtype: one block (odd for the dense formats), and a round width.
fn dims(dtype: DType) -> [usize; 2] {
    if dtype.is_quantized() {
        [dtype.block_size() * 3, 4096]
    } else {
        [37, 4096]
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_matches_cpu_exactly_for_every_weight_dtype() {
    let cuda = cuda();
    let mut rng = rng("embedding_matches_cpu_exactly_for_every_weight_dtype");
    for dtype in WEIGHT_DTYPES {
        for dim in dims(dtype) {
            let (g, inputs, outs) = gather(&mut rng, dtype, dim, false);
            let want = run_on(&CpuBackend, &g, &inputs, &outs, Aliasing::On).unwrap();
            let got = run_on(cuda, &g, &inputs, &outs, Aliasing::On).unwrap();
            // Both sides decode with the same f32 operations: no tolerance.
            assert_eq!(got, want, "embedding {dtype} dim {dim}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn an_id_outside_the_vocabulary_gives_a_zero_row_on_the_gpu() {
    let cuda = cuda();
    let mut rng = rng("an_id_outside_the_vocabulary_gives_a_zero_row_on_the_gpu");
    let (vocab, dim) = (4, 256);
    let table_bytes = encoded(&mut rng, DType::Q6K, vocab * dim);
    let ids = [2, 4, -1];
    let table = device_weight(cuda, &table_bytes, DType::Q6K, &[vocab, dim]);
    let id_buf = device(cuda, &i32_bytes(&ids));
    let mut out = device(cuda, &poison(3 * dim * 4));
    let q8_bytes = Q8_COPY.bytes_for(3 * dim).unwrap();
    let mut q8 = device(cuda, &poison(q8_bytes));
    kiln_cuda::ops::embedding::embedding(
        cuda,
        &table,
        DType::Q6K,
        &id_buf,
        &mut out,
        Some(&mut q8),
        3,
        vocab,
        dim,
    )
    .unwrap();
    let bytes = host(cuda, &out, 3 * dim * 4);
    assert_q8_copy("zero rows", &bytes, &host(cuda, &q8, q8_bytes));
    let got = f32s(&bytes);
    let mut row = vec![0f32; dim];
    kiln_cpu::ops::embedding::embedding(&table_bytes, DType::Q6K, &[2], &mut row, vocab, dim)
        .unwrap();
    assert_eq!(&got[..dim], &row[..], "id 2");
    assert!(
        got[dim..].iter().all(|&v| v == 0.0),
        "ids 4 and -1 give zeros"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_q8_1_copy_matches_cpu_exactly() {
    let cuda = cuda();
    let mut rng = rng("the_q8_1_copy_matches_cpu_exactly");
    // Rows of one Q8_1 block (fewer threads than a warp), of a warp and a half, of
    // several thread blocks; F32 and quantized tables; an odd number of tokens.
    for (dtype, dim) in [
        (DType::F32, 32),
        (DType::F32, 4096),
        (DType::Q8_0, 96),
        (DType::Q4_0, 384),
        (DType::Q4K, 768),
        (DType::Q6K, 4096),
    ] {
        let (g, inputs, outs) = gather(&mut rng, dtype, dim, true);
        let want = run_on(&CpuBackend, &g, &inputs, &outs[..1], Aliasing::On).unwrap();
        let got = run_on(cuda, &g, &inputs, &outs, Aliasing::On).unwrap();
        let what = format!("embedding {dtype} dim {dim}");
        // The rows are exact (as without a copy), and the copy the CPU rounding of
        // them: the CPU's bytes.
        assert_eq!(got[0], want[0], "{what}: out");
        assert_q8_copy(&what, &got[0], &got[1]);
    }
}
