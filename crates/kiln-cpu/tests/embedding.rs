//! Embedding rows of every weight dtype, and rejection of out-of-range ids.

mod common;
use common::*;
use kiln_core::ops::{Embedding, WEIGHT_DTYPES};
use kiln_core::DType::{F32, I32};
use kiln_core::{Aliasing, Error};
use kiln_cpu::CpuBackend;
use rand::Rng;

#[test]
fn embedding_gathers_dequantized_rows() {
    let mut rng = rng("embedding");
    for dtype in WEIGHT_DTYPES {
        let dim = dtype.block_size() * if dtype.is_quantized() { 2 } else { 37 };
        for (vocab, n_tokens) in [(1, 1), (11, 5), (300, 17)] {
            let mut g = G::new();
            let table = g.p("table", dtype, &[vocab, dim]);
            let ids = g.p("ids", I32, &[n_tokens]);
            let out = g.p("out", F32, &[n_tokens, dim]);
            g.g.push(Embedding {
                table,
                ids,
                out,
                out_q8: None,
                n_tokens,
                vocab,
                dim,
            })
            .unwrap();
            let tb = random_weight(&mut rng, dtype, vocab, dim);
            let idv: Vec<i32> = (0..n_tokens)
                .map(|_| rng.random_range(0..vocab as i32))
                .collect();
            let got = f32s(&run(&g.g, &[(table, tb.clone()), (ids, i32_bytes(&idv))], &[out])[0]);
            let tv = weight_values(&tb, dtype, vocab * dim);
            let want: Vec<f64> = idv
                .iter()
                .flat_map(|&id| tv[id as usize * dim..][..dim].to_vec())
                .collect();
            assert_close(
                &format!("embedding {dtype} vocab={vocab} n={n_tokens}"),
                &got,
                &want,
                0.0,
            );
        }
    }
}

#[test]
fn embedding_rejects_ids_outside_the_vocabulary() {
    for bad in [-1, 10] {
        let mut g = G::new();
        let table = g.p("table", F32, &[10, 4]);
        let ids = g.p("ids", I32, &[2]);
        let out = g.p("out", F32, &[2, 4]);
        g.g.push(Embedding {
            table,
            ids,
            out,
            out_q8: None,
            n_tokens: 2,
            vocab: 10,
            dim: 4,
        })
        .unwrap();
        let err = run_on(
            &CpuBackend,
            &g.g,
            &[(table, f32_bytes(&[1.0; 40])), (ids, i32_bytes(&[3, bad]))],
            &[out],
            Aliasing::On,
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(
            err.to_string().contains(&bad.to_string()),
            "message names the id: {err}"
        );
    }
}
