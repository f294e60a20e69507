//! MatMul: the dispatch checks and kernel choice (no GPU needed) and parity of the
//! mat-vec and mat-mat kernels with kiln-cpu on the GPU.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::{MatMul, Q8_COPY, WEIGHT_DTYPES};
use kiln_core::{quant, Aliasing, DType, Graph};
use kiln_cpu::CpuBackend;
use kiln_cuda::ops::matmul::{MatMulArgs, MatMulKernel, GEMM_MIN_ROWS};
use kiln_cuda::{CacheConfig, CudaBackend};

/// A valid decode matmul: 1 x 4096 activations, a 4096 x 4096 Q4_K weight, a bias.
fn args() -> MatMulArgs {
    MatMulArgs {
        weight: DType::Q4K,
        m: 1,
        n: 4096,
        k: 4096,
        x_bytes: 4096 * 4,
        x_q8_bytes: None,
        w_bytes: 4096 * 16 * 144,
        w_packed: Some((DType::Q4K, 4096)),
        bias_bytes: Some(4096 * 4),
        out_bytes: 4096 * 4,
        gemm_min_rows: GEMM_MIN_ROWS,
    }
}

/// `args` for `m` activation rows.
fn rows(m: usize) -> MatMulArgs {
    MatMulArgs {
        m,
        x_bytes: m * 4096 * 4,
        out_bytes: m * 4096 * 4,
        ..args()
    }
}

/// A one-row mat-vec over 5 weight rows of 3 blocks of 32 elements of `dtype` (18-byte
/// blocks: 54-byte rows), uploaded as `upload_weight` would.
fn three_block_rows(dtype: DType) -> MatMulArgs {
    MatMulArgs {
        weight: dtype,
        n: 5,
        k: 96,
        x_bytes: 96 * 4,
        w_bytes: 5 * dtype.bytes_for(96).unwrap(),
        w_packed: kiln_cuda::packing::is_packed(dtype).then_some((dtype, 96)),
        bias_bytes: None,
        out_bytes: 5 * 4,
        ..args()
    }
}

/// `args` with x's Q8_1 copy given.
fn with_copy(args: MatMulArgs) -> MatMulArgs {
    MatMulArgs {
        x_q8_bytes: Some(Q8_COPY.bytes_for(args.m * args.k).unwrap()),
        ..args
    }
}

/// The kernel the dispatch picks for `args`, which must be valid.
fn kernel_of(args: MatMulArgs) -> MatMulKernel {
    args.check().unwrap().kernel
}

#[test]
fn up_to_eight_rows_run_on_the_matvec_tier_that_holds_them() {
    for (m, tier) in [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)] {
        let plan = MatMulArgs {
            m,
            x_bytes: m * 4096 * 4,
            out_bytes: m * 4096 * 4,
            ..args()
        }
        .check()
        .unwrap();
        match plan.kernel {
            // One Q4_K row runs on the resident kernel.
            MatMulKernel::MatVecResident { aligned, .. } => {
                assert_eq!((1, aligned), (tier, true), "m = {m}")
            }
            MatMulKernel::MatVecPacked {
                m_tier, aligned, ..
            } => {
                assert_eq!((m_tier, aligned), (tier, true), "m = {m}");
                assert_eq!(plan.config.block_dim, (256, 1, 1));
            }
            other => panic!("m = {m} runs on {other:?}"),
        }
    }
}

#[test]
fn one_q4_k_activation_row_with_its_copy_runs_on_the_resident_kernel() {
    // Without the copy, the packed kernel multiplies x itself.
    assert!(matches!(
        kernel_of(args()),
        MatMulKernel::MatVecPacked { m_tier: 1, .. }
    ));
    let plan = with_copy(args()).check().unwrap();
    assert_eq!(
        plan.kernel,
        MatMulKernel::MatVecResident {
            threads: 1024,
            min_blocks: 1,
            aligned: true
        }
    );
    assert_eq!(plan.config.block_dim, (1024, 1, 1));
    // One row per warp until the launch fits the grid to the device.
    assert_eq!(plan.config.grid_dim, (4096 / 32, 1, 1));
    assert_eq!(
        plan.spec.name_expression,
        "kiln::matvec_resident<kiln::Q4_K, true, 1024, 1>"
    );
    // All of x rounded to 8 bits: 64 units of 64 one-byte quants, each followed by 16
    // bytes of padding, then a scale and a scaled quant sum (two f32) for each of the
    // 128 scale groups of 32.
    assert_eq!(plan.config.shared_mem_bytes, 64 * (64 + 16) + 128 * 2 * 4);
    // Fewer than 4096 rows: blocks of 8 warps, as many registers per thread.
    let plan = with_copy(MatMulArgs {
        n: 2048,
        w_bytes: 2048 * 16 * 144,
        bias_bytes: None,
        out_bytes: 2048 * 4,
        ..args()
    })
    .check()
    .unwrap();
    assert_eq!(
        plan.kernel,
        MatMulKernel::MatVecResident {
            threads: 256,
            min_blocks: 4,
            aligned: true
        }
    );
    assert_eq!(plan.config.grid_dim, (2048 / 8, 1, 1));
    assert_eq!(
        plan.spec.name_expression,
        "kiln::matvec_resident<kiln::Q4_K, true, 256, 4>"
    );
}

#[test]
fn a_reduction_too_long_for_shared_memory_runs_on_the_packed_kernel() {
    // 65792 Q4_K elements: 1028 units of 80 bytes and 2056 scale groups of 8 bytes,
    // 98688 bytes, above the 96 KiB limit.
    let k = 65792;
    let kernel = kernel_of(with_copy(MatMulArgs {
        k,
        x_bytes: k * 4,
        w_bytes: DType::Q4K.bytes_for(4096 * k).unwrap(),
        w_packed: Some((DType::Q4K, k)),
        ..args()
    }));
    assert!(
        matches!(kernel, MatMulKernel::MatVecPacked { m_tier: 1, .. }),
        "{kernel:?}"
    );
}

#[test]
fn the_resident_grid_is_one_wave_of_warps_with_equal_rows() {
    use kiln_cuda::ops::matmul::resident_blocks;
    // An H100 at two blocks of 16 warps per multiprocessor.
    let resident = 132 * 2 * 16;
    assert_eq!(resident_blocks(4096, resident, 16), 256);
    // 4 rows per warp: 3584 warps.
    assert_eq!(resident_blocks(14336, resident, 16), 224);
    for n in (1..20_000).step_by(7).chain([151_936, 1 << 20]) {
        let blocks = resident_blocks(n, resident, 16);
        let warps = blocks * 16;
        assert!(warps <= resident.max(16), "n = {n}: {blocks} blocks");
        // The kernel's rows per warp: every row has a warp, and no block is idle.
        let per_warp = n.div_ceil(warps);
        assert!(per_warp * warps >= n, "n = {n}");
        assert!((blocks - 1) * 16 * per_warp < n, "n = {n}: an idle block");
    }
}

#[test]
fn a_q5_0_matvec_grid_gives_each_warp_one_weight_row() {
    // No Q8_1 copy of x: the packed kernel.
    let plan = MatMulArgs {
        weight: DType::Q5_0,
        n: 2048,
        w_bytes: DType::Q5_0.bytes_for(2048 * 4096).unwrap(),
        w_packed: Some((DType::Q5_0, 4096)),
        ..args()
    }
    .check()
    .unwrap();
    assert_eq!(
        plan.kernel,
        MatMulKernel::MatVecPacked {
            m_tier: 1,
            rows: 1,
            aligned: true
        }
    );
    // 8 warps of 1 row per block.
    assert_eq!(plan.config.grid_dim, (2048 / 8, 1, 1));
    // 32 lanes x 4 units (blocks) of 32 elements, 4 floats of padding each, one sum each.
    assert_eq!(plan.config.shared_mem_bytes, 32 * 4 * (32 + 4 + 1) * 4);
}

#[test]
fn a_packed_matvec_grid_gives_each_warp_two_weight_rows() {
    let plan = MatMulArgs {
        m: 2,
        x_bytes: 2 * 4096 * 4,
        out_bytes: 2 * 4096 * 4,
        ..args()
    }
    .check()
    .unwrap();
    assert_eq!(
        plan.kernel,
        MatMulKernel::MatVecPacked {
            m_tier: 2,
            rows: 2,
            aligned: true
        }
    );
    // 8 warps of 2 rows per block.
    assert_eq!(plan.config.grid_dim, (4096 / 16, 1, 1));
    assert_eq!(
        plan.spec.name_expression,
        "kiln::matvec_packed<kiln::Q4_K, 2, 2, true>"
    );
    // One round's activations of 2 rows: 32 lanes x 2 units of 64 Q4_K elements,
    // each unit's followed by 4 floats of padding, then the sums of its 2 groups.
    assert_eq!(plan.config.shared_mem_bytes, 2 * 32 * 2 * (64 + 4 + 2) * 4);
}

#[test]
fn packed_planes_that_are_not_16_byte_aligned_use_the_unaligned_kernel() {
    // 3 blocks of 32 per row: 54-byte Q4_0 rows, 102-byte Q8_0 rows.
    let rows = |dtype: DType, n: usize| MatMulArgs {
        n,
        w_bytes: n * dtype.bytes_for(96).unwrap(),
        out_bytes: n * 4,
        ..three_block_rows(dtype)
    };
    let kernel = kernel_of(with_copy(rows(DType::Q4_0, 4096)));
    assert!(
        matches!(kernel, MatMulKernel::MatVecResident { aligned: false, .. }),
        "{kernel:?}"
    );
    for args in [rows(DType::Q8_0, 4096), rows(DType::Q4_0, 5)] {
        let kernel = kernel_of(args);
        assert!(
            matches!(kernel, MatMulKernel::MatVecPacked { aligned: false, .. }),
            "{kernel:?}"
        );
    }
}

#[test]
fn fewer_than_1024_weight_rows_run_on_the_packed_kernel() {
    let rows = |n: usize| {
        kernel_of(with_copy(MatMulArgs {
            n,
            out_bytes: n * 4,
            bias_bytes: None,
            w_bytes: n * 16 * 144,
            ..args()
        }))
    };
    assert!(
        matches!(rows(1023), MatMulKernel::MatVecPacked { m_tier: 1, .. }),
        "{:?}",
        rows(1023)
    );
    assert!(
        matches!(
            rows(1024),
            MatMulKernel::MatVecResident { threads: 256, .. }
        ),
        "{:?}",
        rows(1024)
    );
}

#[test]
fn a_packed_weight_uploaded_without_packing_is_rejected() {
    let msg = invalid(
        MatMulArgs {
            w_packed: None,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        msg,
        "matmul: w of q4_k must be uploaded with upload_weight as rows of 4096 (the planes \
         layout); its buffer holds bytes from a plain upload"
    );
}

#[test]
fn a_weight_packed_for_another_row_length_is_rejected() {
    let msg = invalid(
        MatMulArgs {
            w_packed: Some((DType::Q4K, 2048)),
            ..args()
        }
        .check(),
    );
    assert!(
        msg.ends_with("its buffer holds planes of q4_k rows of 2048"),
        "{msg}"
    );
}

#[test]
fn a_staged_matvec_grid_covers_every_weight_row() {
    let plan = MatMulArgs {
        weight: DType::Q3K,
        w_bytes: 4096 * 16 * 110,
        w_packed: None,
        ..args()
    }
    .check()
    .unwrap();
    let MatMulKernel::MatVec { rows, .. } = plan.kernel else {
        panic!("{:?}", plan.kernel)
    };
    assert_eq!(rows, 8);
    assert_eq!(plan.config.grid_dim, (4096 / 8, 1, 1));
    assert_eq!(
        plan.spec.name_expression,
        "kiln::matvec<kiln::Q3_K, 1, 8, 16, 4>"
    );
    // 4 tiles of 8 rows of 2048 Q3_K elements (8 blocks of 110 bytes).
    assert_eq!(plan.config.shared_mem_bytes, 4 * 8 * 8 * 110);
}

#[test]
fn matvec_tiles_in_flight_fill_64_kib_of_shared_memory() {
    // (dtype, rows, stages): a tile of 2048 elements of 8 rows at most takes 16 KiB,
    // and up to 4 of them 64 KiB.
    for (dtype, rows, stages) in [
        (DType::F32, 2, 4),
        (DType::F16, 4, 4),
        (DType::BF16, 4, 4),
        (DType::Q2K, 8, 4),
    ] {
        let plan = MatMulArgs {
            weight: dtype,
            w_bytes: dtype.bytes_for(4096 * 4096).unwrap(),
            w_packed: None,
            ..args()
        }
        .check()
        .unwrap();
        let MatMulKernel::MatVec {
            rows: r, stages: s, ..
        } = plan.kernel
        else {
            panic!("{:?}", plan.kernel)
        };
        assert_eq!((r, s), (rows, stages), "{dtype}");
        let tile = dtype.bytes_for(2048).unwrap();
        assert_eq!(
            plan.config.shared_mem_bytes as usize,
            stages as usize * rows as usize * tile,
            "{dtype}"
        );
        assert!(plan.config.shared_mem_bytes as usize <= 64 * 1024);
    }
}

#[test]
fn rows_that_are_not_16_byte_multiples_use_the_block_alignment() {
    // 3 blocks of IQ4_NL take 54 bytes: loads of 2 bytes.
    let kernel = kernel_of(three_block_rows(DType::IQ4NL));
    assert!(
        matches!(kernel, MatMulKernel::MatVec { load: 2, .. }),
        "{kernel:?}"
    );
}

#[test]
fn more_than_eight_rows_without_cublaslt_run_on_the_tensor_core_kernel() {
    let plan = MatMulArgs {
        gemm_min_rows: usize::MAX,
        ..rows(512)
    }
    .check()
    .unwrap();
    assert_eq!(plan.kernel, MatMulKernel::MatMat);
    assert_eq!(plan.spec.key, "matmat|w=q4_k");
    assert_eq!(plan.config.grid_dim, (64, 8, 1));
}

#[test]
fn zero_rows_are_rejected() {
    assert_eq!(
        invalid(MatMulArgs { m: 0, ..args() }.check()),
        "matmul: m must be > 0, got 0"
    );
}

#[test]
fn zero_outputs_are_rejected() {
    assert_eq!(
        invalid(MatMulArgs { n: 0, ..args() }.check()),
        "matmul: n must be > 0, got 0"
    );
}

#[test]
fn a_zero_reduction_is_rejected() {
    assert_eq!(
        invalid(MatMulArgs { k: 0, ..args() }.check()),
        "matmul: k must be > 0, got 0"
    );
}

#[test]
fn a_weight_dtype_that_is_no_weight_format_is_rejected() {
    let m = invalid(
        MatMulArgs {
            weight: DType::Q8K,
            ..args()
        }
        .check(),
    );
    assert!(
        m.starts_with("matmul: weight has dtype q8_k, expected one of [f32, f16, bf16, q4_0"),
        "{m}"
    );
}

#[test]
fn a_reduction_that_is_not_whole_blocks_is_rejected() {
    let m = invalid(
        MatMulArgs {
            k: 4096 + 32,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "matmul: k 4128 is not a multiple of q4_k's block size 256"
    );
}

#[test]
fn short_activations_are_rejected() {
    let m = invalid(
        MatMulArgs {
            x_bytes: 100,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "matmul: x needs 4096 f32 elements (16384 bytes), its buffer has 100 bytes"
    );
}

#[test]
fn a_short_weight_is_rejected() {
    let m = invalid(
        MatMulArgs {
            w_bytes: 4096 * 16 * 144 - 1,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "matmul: w needs 16777216 q4_k elements (9437184 bytes), its buffer has 9437183 bytes"
    );
}

#[test]
fn a_short_bias_is_rejected() {
    let m = invalid(
        MatMulArgs {
            bias_bytes: Some(4),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "matmul: bias needs 4096 f32 elements (16384 bytes), its buffer has 4 bytes"
    );
}

#[test]
fn a_short_output_is_rejected() {
    let m = invalid(
        MatMulArgs {
            out_bytes: 0,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        m,
        "matmul: out needs 4096 f32 elements (16384 bytes), its buffer has 0 bytes"
    );
}

#[test]
fn too_many_rows_for_the_grid_are_rejected() {
    let m = 65_536 * 64;
    let msg = invalid(
        MatMulArgs {
            m,
            n: 64,
            k: 256,
            x_bytes: m * 256 * 4,
            w_bytes: 64 * 144,
            w_packed: Some((DType::Q4K, 256)),
            bias_bytes: None,
            out_bytes: m * 64 * 4,
            gemm_min_rows: usize::MAX,
            ..args()
        }
        .check(),
    );
    assert_eq!(
        msg,
        "matmul: m needs 65536 blocks, more than a grid dimension's 65535"
    );
}

#[test]
fn the_q8_copy_of_x_must_hold_whole_blocks_of_every_row() {
    let with_copy = |bytes| MatMulArgs {
        x_q8_bytes: Some(bytes),
        ..args()
    };
    with_copy(4096 / 32 * 36).check().unwrap();
    let msg = invalid(with_copy(4096 / 32 * 36 - 1).check());
    assert!(
        msg.starts_with("matmul: x_q8 needs 4096 q8_1 elements"),
        "{msg}"
    );
    let msg = invalid(
        MatMulArgs {
            weight: DType::F32,
            k: 37,
            x_bytes: 37 * 4,
            w_bytes: 4096 * 37 * 4,
            w_packed: None,
            x_q8_bytes: Some(36 * 2),
            ..args()
        }
        .check(),
    );
    assert_eq!(
        msg,
        "matmul: x_q8: rows of 37 elements cannot be rounded to q8_1, which needs a multiple of 32"
    );
}

#[test]
fn products_of_three_rows_and_more_with_a_copy_run_on_the_8_bit_tensor_core_kernel() {
    for (m, m_tier, tiles) in [
        (3, 8, 1),
        (8, 8, 1),
        (9, 16, 1),
        (33, 64, 1),
        (64, 64, 1),
        (130, 64, 3),
    ] {
        let plan = with_copy(rows(m)).check().unwrap();
        assert_eq!(
            plan.kernel,
            MatMulKernel::MatMatQ8 {
                m_tier,
                aligned: true
            },
            "m = {m}"
        );
        assert_eq!(
            plan.spec.key,
            format!("matmul_q8|w=q4_k|m={m_tier}|aligned=1")
        );
        // 128 weight rows per block (4 warps of two 16-row tiles); the splits of k are
        // the launch's (the device's).
        assert_eq!(plan.config.grid_dim, (4096 / 128, tiles, 1), "m = {m}");
        assert_eq!(plan.config.block_dim, (128, 1, 1));
        // Two tiles of x (76 words per row) and their scales; two tiles of 128 Q4_K
        // rows of one 144-byte block.
        let x_bytes = 2 * m_tier * 76 * 4 + m_tier * 8 * 8;
        assert_eq!(plan.config.shared_mem_bytes, x_bytes + 2 * 128 * 144);
        assert_eq!(plan.row_groups, 1);
        let keys: Vec<_> = plan.specs().unwrap().into_iter().map(|s| s.key).collect();
        assert_eq!(keys[1], "matmul_q8_reduce|out=f32");
    }
    // One row keeps the resident mat-vec, two the packed one.
    assert!(matches!(
        kernel_of(with_copy(rows(1))),
        MatMulKernel::MatVecResident { .. }
    ));
    assert!(matches!(
        kernel_of(with_copy(rows(2))),
        MatMulKernel::MatVecPacked { m_tier: 2, .. }
    ));
}

#[test]
fn a_copy_of_rows_of_a_format_without_the_8_bit_kernel_runs_as_mat_vecs_of_the_copy() {
    let q6_k = |m: usize| {
        with_copy(MatMulArgs {
            weight: DType::Q6K,
            w_bytes: 4096 * 16 * 210,
            w_packed: Some((DType::Q6K, 4096)),
            ..rows(m)
        })
    };
    for m in [9, 64, 100] {
        let plan = q6_k(m).check().unwrap();
        assert!(
            matches!(plan.kernel, MatMulKernel::MatVecPacked { m_tier: 8, .. }),
            "m = {m}: {:?}",
            plan.kernel
        );
        assert_eq!(plan.row_groups as usize, m.div_ceil(8), "m = {m}");
    }
}

#[test]
fn the_8_bit_kernel_splits_k_until_the_grid_has_two_blocks_per_multiprocessor() {
    use kiln_cuda::ops::matmul::q8_splits;
    // 48 blocks of 128 rows on 132 multiprocessors: 6 splits wanted, 16 tiles of 256
    // elements of k, so 3 tiles per split and 6 splits.
    assert_eq!(q8_splits(6144, 16, 16, 4096, 132), (6, 3));
    // 224 blocks: 2 splits of 8 tiles.
    assert_eq!(q8_splits(28672, 16, 16, 4096, 132), (2, 8));
    // 1002 blocks need none.
    assert_eq!(q8_splits(128256, 16, 16, 4096, 132), (1, 16));
    // At most 8 splits, and one per tile of k.
    assert_eq!(q8_splits(64, 8, 8, 14336, 132), (8, 7));
    assert_eq!(q8_splits(64, 8, 8, 96, 132), (1, 1));
    assert_eq!(q8_splits(64, 8, 8, 512, 132), (2, 1));
}

#[test]
fn up_to_63_rows_run_the_eight_row_mat_vec_per_group_then_cublaslt_from_its_threshold() {
    for m in [9, 16, 32, GEMM_MIN_ROWS - 1] {
        let plan = rows(m).check().unwrap();
        assert_eq!(plan.kernel, kernel_of(rows(8)), "m = {m}");
        assert_eq!(plan.row_groups as usize, m.div_ceil(8), "m = {m}");
    }
    assert_eq!(rows(8).check().unwrap().row_groups, 1);
    // Without cuBLASLt, from 64 rows the tensor-core kernel.
    let no_gemm = MatMulArgs {
        gemm_min_rows: usize::MAX,
        ..rows(GEMM_MIN_ROWS)
    };
    assert_eq!(kernel_of(no_gemm), MatMulKernel::MatMat);
    for m in [GEMM_MIN_ROWS, 128, 512, 2048] {
        let plan = rows(m).check().unwrap();
        assert_eq!(plan.kernel, MatMulKernel::Gemm, "m = {m}");
        // The weight decoder: one thread per chunk of 8 elements, 256 per block.
        assert_eq!(plan.spec.key, "dequant_bf16|w=q4_k");
        assert_eq!(plan.config.grid_dim, (4096 * 4096 / 8 / 256, 1, 1));
    }
    // The threshold is the backend's: any row count above the mat-vec's.
    let from_nine = |m| MatMulArgs {
        gemm_min_rows: 9,
        ..rows(m)
    };
    assert_eq!(kernel_of(from_nine(8)), kernel_of(rows(8)));
    assert_eq!(kernel_of(from_nine(9)), MatMulKernel::Gemm);
}

#[test]
fn a_reduction_that_is_not_whole_chunks_of_8_stays_on_the_kernel() {
    let f32_rows = |k: usize| MatMulArgs {
        weight: DType::F32,
        m: 512,
        k,
        x_bytes: 512 * k * 4,
        w_bytes: 4096 * k * 4,
        w_packed: None,
        out_bytes: 512 * 4096 * 4,
        ..args()
    };
    assert_eq!(kernel_of(f32_rows(2093)), MatMulKernel::MatMat);
    assert_eq!(kernel_of(f32_rows(2096)), MatMulKernel::Gemm);
}

#[test]
fn the_gemm_threshold_comes_from_the_environment_or_its_default() {
    use kiln_cuda::backend::parse_gemm_min_rows;
    assert_eq!(parse_gemm_min_rows(None).unwrap(), GEMM_MIN_ROWS);
    assert_eq!(parse_gemm_min_rows(Some("256")).unwrap(), 256);
    assert_eq!(parse_gemm_min_rows(Some("off")).unwrap(), usize::MAX);
    assert_eq!(
        invalid(parse_gemm_min_rows(Some("many"))),
        "KILN_GEMM_MIN_ROWS: expected a number of rows or `off`, got \"many\""
    );
}

/// Normalised MSE allowed for the mat-vec kernels against the CPU's f32 results. The
/// staged kernel's products are exact and only the order of the f32 sums differs (a
/// tree of 8-element chunks and warps on the GPU, a sequence on the CPU). The packed
/// kernel sums (1 + q / 128) x per scale group and subtracts the sum of x, which
/// loses a few more bits: about 1e-11 on random inputs (CPU emulation of the kernel).
const MATVEC_NMSE: f64 = 1e-9;

/// Normalised MSE allowed for both mat-mat paths (kiln's kernel and cuBLASLt), for
/// every weight dtype: activations and decoded weights are rounded to bf16 (8
/// significant bits, relative error up to 2^-9 each) before the tensor-core products,
/// which are summed in f32; for random inputs that gives about 5e-6 whatever the
/// weight format, since the weight's own quantization is the CPU reference's too.
const MATMAT_NMSE: f64 = 5e-5;

/// A CUDA backend of its own whose mat-mats of `min_rows` activation rows and more run
/// on cuBLASLt (`usize::MAX`: none), so that choosing the path does not change the
/// backend other tests share.
fn backend_with_gemm_from(min_rows: usize) -> CudaBackend {
    let b = CudaBackend::with_cache(0, CacheConfig::from_env().unwrap()).unwrap();
    b.set_gemm_min_rows(min_rows);
    assert_eq!(
        b.gemm_min_rows(),
        min_rows,
        "cuBLASLt must load on the GPU machine (libcublasLt.so.13)"
    );
    b
}

/// `x` rounded to Q8_1 ([`Q8_COPY`]) by the CPU codec.
fn q8_copy(x: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; Q8_COPY.bytes_for(x.len()).unwrap()];
    quant::quantize(Q8_COPY, x, &mut bytes).unwrap();
    bytes
}

/// Runs out = x · wᵀ (+ bias) on both backends and compares. Where k is a multiple of
/// 32 it compares again with x's Q8_1 copy given as `x_q8`, which both backends then
/// multiply instead of x (on the GPU: the mat-vecs, or from 3 rows the 8-bit
/// tensor-core kernel, whose integer products are exact, so the mat-vec's bound holds).
#[allow(clippy::too_many_arguments)]
fn compare(
    cuda: &kiln_cuda::CudaBackend,
    rng: &mut rand::rngs::StdRng,
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    with_bias: bool,
) {
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[m, k]).unwrap();
    let w = g.persistent("w", dtype, &[n, k]).unwrap();
    let bias = with_bias.then(|| g.persistent("bias", DType::F32, &[n]).unwrap());
    let out = g.persistent("out", DType::F32, &[m, n]).unwrap();
    let op = MatMul {
        x,
        x_q8: None,
        w,
        bias,
        out,
        m,
        n,
        k,
    };
    let without_op = g.clone();
    g.push(op.clone()).unwrap();
    let xv = uniform(rng, m * k, 1.0);
    let mut inputs = vec![(x, f32_bytes(&xv)), (w, encoded(rng, dtype, n * k))];
    if let Some(b) = bias {
        inputs.push((b, f32_bytes(&uniform(rng, n, 1.0))));
    }
    let label = format!("matmul {dtype} m={m} n={n} k={k} bias={with_bias}");
    let nmse = if m <= 8 { MATVEC_NMSE } else { MATMAT_NMSE };
    let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
    let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
    assert_close(&label, &got, &want, nmse);
    if k % Q8_COPY.block_size() == 0 {
        let mut g = without_op;
        let x_q8 = g.persistent("x_q8", Q8_COPY, &[m, k]).unwrap();
        g.push(MatMul {
            x_q8: Some(x_q8),
            ..op
        })
        .unwrap();
        inputs.push((x_q8, q8_copy(&xv)));
        let want = f32s(&run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
        let got = f32s(&run_on(cuda, &g, &inputs, &[out], Aliasing::On).unwrap()[0]);
        assert_close(&format!("{label} with x_q8"), &got, &want, MATVEC_NMSE);
    }
}

/// Reduction lengths per dtype: a few blocks (rows not 16-byte multiples for most
/// formats), a round width, and an odd multiple of the block past a tile boundary.
fn reductions(dtype: DType) -> [usize; 3] {
    if dtype.is_quantized() {
        let bs = dtype.block_size();
        [3 * bs, 4096, 2048 + 5 * bs]
    } else {
        [37, 4096, 2093]
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn matvec_matches_cpu_for_every_weight_dtype_and_row_count() {
    let cuda = cuda();
    let mut rng = rng("matvec_matches_cpu_for_every_weight_dtype_and_row_count");
    for dtype in WEIGHT_DTYPES {
        for k in reductions(dtype) {
            for m in [1, 2, 3, 5, 8] {
                compare(cuda, &mut rng, dtype, m, 67, k, m == 3);
            }
            compare(cuda, &mut rng, dtype, 1, 4096, k, false);
        }
        // An odd number of rows in the resident kernel's small blocks (with the copy).
        compare(cuda, &mut rng, dtype, 1, 1031, 4096, true);
        // 7 whole tiles of 2048 and a partial one: more tiles than the staged kernel
        // keeps in flight, so every shared-memory slot is reused; for the packed
        // kernel, several rounds of units per lane with a partial last one.
        for m in [1, 8] {
            compare(cuda, &mut rng, dtype, m, 67, 7 * 2048 + 256, m == 8);
        }
        // Aligned planes for every packed format, two rounds of Q6_K units per lane.
        compare(cuda, &mut rng, dtype, 1, 67, 8192, false);
        // More weight rows than warps fit the device: the resident kernel gives each
        // warp several consecutive rows, the last warp fewer.
        compare(
            cuda,
            &mut rng,
            dtype,
            1,
            9001,
            3 * dtype.block_size().max(32),
            true,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn matmat_matches_cpu_for_every_weight_dtype() {
    let backend = backend_with_gemm_from(usize::MAX);
    let cuda = &backend;
    let mut rng = rng("matmat_matches_cpu_for_every_weight_dtype");
    for dtype in WEIGHT_DTYPES {
        for k in reductions(dtype) {
            compare(cuda, &mut rng, dtype, 9, 67, k, true);
            // A block of 128 weight rows, most past n, over 20 rows of x.
            compare(cuda, &mut rng, dtype, 20, 67, k, true);
            // Below 64 rows: the eight-row mat-vec per group, the last one partial.
            compare(cuda, &mut rng, dtype, 37, 67, k, false);
            compare(cuda, &mut rng, dtype, 130, 200, k, false);
        }
        compare(cuda, &mut rng, dtype, 512, 1024, 4096, false);
        // With the copy: 64 rows over 3000 weight rows (24 blocks, k split 8 ways).
        compare(cuda, &mut rng, dtype, 64, 3000, 4096, true);
    }
}

/// Reduction lengths of the cuBLASLt path per dtype: as [`reductions`], multiples of 8.
fn gemm_reductions(dtype: DType) -> [usize; 3] {
    if dtype.is_quantized() {
        reductions(dtype)
    } else {
        [40, 4096, 2096]
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_matches_cpu_for_every_weight_dtype() {
    let backend = backend_with_gemm_from(9);
    let mut rng = rng("gemm_matches_cpu_for_every_weight_dtype");
    for dtype in WEIGHT_DTYPES {
        for k in gemm_reductions(dtype) {
            compare(&backend, &mut rng, dtype, 9, 67, k, true);
            compare(&backend, &mut rng, dtype, 131, 201, k, false);
            compare(&backend, &mut rng, dtype, 67, 1001, k, true);
        }
        compare(&backend, &mut rng, dtype, 512, 1024, 4096, true);
    }
    // Larger products after smaller ones: the scratch buffers grow.
    compare(&backend, &mut rng, DType::Q4_0, 2048, 4096, 4096, false);
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_compiled_gemm_replays_as_a_cuda_graph_over_new_inputs() {
    use kiln_core::{plan, Backend, Bindings, Scratch};
    let backend = backend_with_gemm_from(9);
    let mut rng = rng("a_compiled_gemm_replays_as_a_cuda_graph_over_new_inputs");
    let (m, n, k, dtype) = (77, 301, 512, DType::Q4K);
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[m, k]).unwrap();
    let w = g.persistent("w", dtype, &[n, k]).unwrap();
    let bias = g.persistent("bias", DType::F32, &[n]).unwrap();
    let out = g.persistent("out", DType::F32, &[m, n]).unwrap();
    g.push(MatMul {
        x,
        x_q8: None,
        w,
        bias: Some(bias),
        out,
        m,
        n,
        k,
    })
    .unwrap();
    let weight = encoded(&mut rng, dtype, n * k);
    let bias_bytes = f32_bytes(&uniform(&mut rng, n, 1.0));
    let memory = plan(&g, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(&backend, &memory).unwrap();
    let mut bufs: Vec<_> = [x, w, bias, out]
        .iter()
        .map(|&id| backend.alloc(g.buffers()[id.index()].bytes()).unwrap())
        .collect();
    backend
        .upload_weight(&mut bufs[1], &weight, dtype, &[n, k])
        .unwrap();
    backend.upload(&mut bufs[2], &bias_bytes).unwrap();
    let mut exe = {
        let mut b = Bindings::new(&g, &memory, &mut scratch).unwrap();
        for (&id, buf) in [x, w, bias, out].iter().zip(bufs.iter_mut()) {
            b.bind(&g, id, buf).unwrap();
        }
        backend.compile(&g, &mut b).unwrap()
    };
    let keys: Vec<&str> = exe.launches().iter().map(|l| l.key()).collect();
    assert_eq!(
        keys,
        [
            "dequant_bf16|w=q4_k",
            "cast|from=f32|to=bf16",
            "cublaslt|m=77|n=301|k=512|bias=1"
        ]
    );
    backend.set_cuda_graphs(true);
    for round in 0..3 {
        let xv = f32_bytes(&uniform(&mut rng, m * k, 1.0));
        backend.upload(&mut bufs[0], &xv).unwrap();
        backend.upload(&mut bufs[3], &poison(m * n * 4)).unwrap();
        // SAFETY: `bufs` and `scratch` outlive `exe` and are not touched while it runs.
        unsafe { backend.run(&mut exe) }.unwrap();
        backend.synchronize().unwrap();
        assert!(exe.is_captured());
        let mut got = vec![0u8; m * n * 4];
        backend.download(&bufs[3], &mut got).unwrap();
        let inputs = [(x, xv), (w, weight.clone()), (bias, bias_bytes.clone())];
        let want = run_on(&CpuBackend, &g, &inputs, &[out], Aliasing::On).unwrap();
        assert_close(
            &format!("replay {round}"),
            &f32s(&got),
            &f32s(&want[0]),
            MATMAT_NMSE,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_packed_weight_downloads_as_its_gguf_bytes() {
    use kiln_core::Backend;
    let cuda = cuda();
    let mut rng = rng("a_packed_weight_downloads_as_its_gguf_bytes");
    for dtype in WEIGHT_DTYPES {
        let k = 2 * dtype.block_size().max(32);
        let gguf = encoded(&mut rng, dtype, 3 * k);
        let w = device_weight(cuda, &gguf, dtype, &[3, k]);
        let expect = kiln_cuda::packing::is_packed(dtype).then_some((dtype, k));
        assert_eq!(w.packed(), expect, "{dtype}");
        let mut back = vec![0u8; gguf.len()];
        cuda.download(&w, &mut back).unwrap();
        assert_eq!(back, gguf, "{dtype}");
    }
}
