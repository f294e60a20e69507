// Matrix product for prefill: out[i, j] = sum_l x[i, l] * W[j, l] (+ bias[j]) for many
// activation rows, on tensor cores, by one of two paths (src/ops/matmul.rs picks):
// - dequant_bf16 decodes W to bf16 in scratch memory for cuBLASLt's GEMM
//   (src/ops/matmul/gemm.rs), which multiplies it with x rounded to bf16;
// - matmul computes the product itself (below).
//
// matmul: a block of 128 threads (2 x 2 warps) computes a 64 x 64 tile of out, stepping
// through k by 32: it converts a 64 x 32 tile of x from f32 to bf16 and decodes a
// 64 x 32 tile of W (any weight format, chunks of 8 through quant.cuh) to bf16, both
// into shared memory (rows padded to 40 elements, which makes the fragment loads
// conflict-free); then each warp computes its 32 x 32 part with
// mma.sync.m16n8k16 (bf16 inputs, f32 accumulation). Products are therefore of
// bf16-rounded operands, summed in f32.
#include "quant.cuh"

namespace kiln {

// MM_THREADS, MM_BM (rows of x per block) and MM_BN (rows of W per block) come from
// constants.cuh.
constexpr u32 MM_BK = 32;  // reduction step
constexpr u32 MM_STRIDE = MM_BK + 8;  // bf16 elements per shared row

// Two f32 as two bf16 (round to nearest even) in one word, the first in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16_bits(lo) | ((u32)f32_to_bf16_bits(hi) << 16);
}

// d += a * b for one m16n8k16 tile: a row-major 16x16 bf16, b column-major 16x8 bf16,
// d 16x8 f32, in the fragment layouts of the PTX ISA.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4],
                                               const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The word (two bf16) at row r, column c (even) of a shared tile.
__device__ __forceinline__ u32 word_at(const u16* tile, u32 r, u32 c) {
    return *reinterpret_cast<const u32*>(tile + r * MM_STRIDE + c);
}

// The 64 x 64 output tile of block column blockIdx.x: x_rows[r] is the row of x that
// tile row r reads and out_rows[r] the row of out it writes (-1: none; rows of x and
// out are k and n elements long), both in shared memory.
template <typename W>
__device__ __forceinline__ void matmul_tile(const u8* __restrict__ w,
                                            const float* __restrict__ x,
                                            const float* __restrict__ bias,
                                            float* __restrict__ out, const int* x_rows,
                                            const int* out_rows, u32 n, u32 k, u64 row_bytes) {
    __shared__ __align__(16) u16 xs[MM_BM * MM_STRIDE];
    __shared__ __align__(16) u16 ws[MM_BN * MM_STRIDE];

    const u32 n0 = blockIdx.x * MM_BN;
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 wm = (warp >> 1) * 32;  // the warp's rows within the block tile
    const u32 wn = (warp & 1) * 32;   // the warp's columns within the block tile
    const u32 g = lane >> 2;          // fragment row group
    const u32 q = lane & 3u;          // thread within the group

    float acc[2][4][4];
#pragma unroll
    for (u32 i = 0; i < 2; ++i)
#pragma unroll
        for (u32 j = 0; j < 4; ++j)
#pragma unroll
            for (u32 c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    const bool x_vector = k % 4 == 0;
    for (u32 k0 = 0; k0 < k; k0 += MM_BK) {
        // x tile: 64 rows x 8 groups of 4 columns; 4 groups per thread.
#pragma unroll
        for (u32 i = 0; i < MM_BM * MM_BK / 4 / MM_THREADS; ++i) {
            const u32 idx = i * MM_THREADS + threadIdx.x;
            const u32 r = idx / (MM_BK / 4);
            const u32 c = (idx % (MM_BK / 4)) * 4;
            const int row = x_rows[r];
            const u32 col = k0 + c;
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (row >= 0) {
                const float* xr = x + (u64)row * k + col;
                if (x_vector && col + 4 <= k) {
                    const float4 f = *reinterpret_cast<const float4*>(xr);
                    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
                } else {
#pragma unroll
                    for (u32 j = 0; j < 4; ++j) v[j] = col + j < k ? xr[j] : 0.0f;
                }
            }
            uint2 packed;
            packed.x = pack_bf16x2(v[0], v[1]);
            packed.y = pack_bf16x2(v[2], v[3]);
            *reinterpret_cast<uint2*>(xs + r * MM_STRIDE + c) = packed;
        }
        // W tile: 64 rows x 4 chunks of 8; 2 chunks per thread.
#pragma unroll
        for (u32 i = 0; i < MM_BN * MM_BK / 8 / MM_THREADS; ++i) {
            const u32 idx = i * MM_THREADS + threadIdx.x;
            const u32 r = idx / (MM_BK / 8);
            const u32 c = (idx % (MM_BK / 8)) * 8;
            float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (n0 + r < n && k0 + c < k) {
                decode_chunk<W>(w + (u64)(n0 + r) * row_bytes, k0 + c, k, v);
            }
            uint4 packed;
            packed.x = pack_bf16x2(v[0], v[1]);
            packed.y = pack_bf16x2(v[2], v[3]);
            packed.z = pack_bf16x2(v[4], v[5]);
            packed.w = pack_bf16x2(v[6], v[7]);
            *reinterpret_cast<uint4*>(ws + r * MM_STRIDE + c) = packed;
        }
        __syncthreads();
#pragma unroll
        for (u32 kk = 0; kk < MM_BK; kk += 16) {
            u32 a[2][4], b[4][2];
#pragma unroll
            for (u32 i = 0; i < 2; ++i) {
                const u32 r = wm + 16 * i + g;
                a[i][0] = word_at(xs, r, kk + 2 * q);
                a[i][1] = word_at(xs, r + 8, kk + 2 * q);
                a[i][2] = word_at(xs, r, kk + 2 * q + 8);
                a[i][3] = word_at(xs, r + 8, kk + 2 * q + 8);
            }
#pragma unroll
            for (u32 j = 0; j < 4; ++j) {
                const u32 r = wn + 8 * j + g;
                b[j][0] = word_at(ws, r, kk + 2 * q);
                b[j][1] = word_at(ws, r, kk + 2 * q + 8);
            }
#pragma unroll
            for (u32 i = 0; i < 2; ++i)
#pragma unroll
                for (u32 j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }

    // Accumulator c of tile (i, j) holds row g (+8 for c >= 2), columns 2q, 2q + 1.
#pragma unroll
    for (u32 i = 0; i < 2; ++i) {
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
#pragma unroll
            for (u32 c = 0; c < 4; ++c) {
                const int row = out_rows[wm + 16 * i + g + (c >= 2 ? 8 : 0)];
                const u32 col = n0 + wn + 8 * j + 2 * q + (c & 1);
                if (row >= 0 && col < n) {
                    out[(u64)row * n + col] = bias ? acc[i][j][c] + bias[col] : acc[i][j][c];
                }
            }
        }
    }
}

// Launched serialized (src/ops/matmul.rs), so it does not chain (common.cuh): stream
// order alone puts it after the kernels before it, and x keeps its read-only loads.
// Block (bx, by) computes rows 64 by .. of out, columns 64 bx ..
template <typename W>
__global__ void __launch_bounds__(MM_THREADS)
    matmul(const u8* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
           float* __restrict__ out, u32 m, u32 n, u32 k, u64 row_bytes) {
    __shared__ int rows[MM_BM];
    if (threadIdx.x < MM_BM) {
        const u32 row = blockIdx.y * MM_BM + threadIdx.x;
        rows[threadIdx.x] = row < m ? (int)row : -1;
    }
    __syncthreads();
    matmul_tile<W>(w, x, bias, out, rows, rows, n, k, row_bytes);
}

// The expert-routed mat-mat (kiln_core::ops::MoeMatMul) for many tokens, in two
// launches, both serialized:
//
// moe_group (one block of MOE_GROUP_THREADS): sorts the m * k slots by expert into
// `order` (counts per expert, their prefix sums, then each slot placed with an atomic
// cursor; the order within an expert does not change any output, as every output row
// is computed alone) and cuts each expert's run into tiles of at most MM_BM slots:
// tile t is tiles[3t .. 3t + 3) = (expert, first index in order, slots), and the
// tiles past the last have expert -1. A slot whose id is outside 0..n_expert joins no
// tile; its `rows` outputs are set to NaN here.
//
// moe_matmul: block (bx, t) computes columns 64 bx .. of tile t's slots as matmul does,
// with the weight slice of the tile's expert: tile row r is slot s = order[first + r],
// reading x row s (per_slot) or s / k (its token) and writing out row s.
template <typename W>
__global__ void __launch_bounds__(MM_THREADS)
    moe_matmul(const u8* __restrict__ w, const int* __restrict__ order,
               const int* __restrict__ tiles, const float* __restrict__ x,
               float* __restrict__ out, u32 k, u32 per_slot, u32 rows, u32 cols,
               u64 row_bytes) {
    const int* tile = tiles + 3 * blockIdx.y;
    const int expert = tile[0];
    if (expert < 0) {
        return;  // past the last tile: the whole block
    }
    __shared__ int x_rows[MM_BM];
    __shared__ int out_rows[MM_BM];
    if (threadIdx.x < MM_BM) {
        const int r = (int)threadIdx.x;
        const int slot = r < tile[2] ? order[tile[1] + r] : -1;
        out_rows[r] = slot;
        x_rows[r] = slot < 0 ? -1 : (per_slot ? slot : slot / (int)k);
    }
    __syncthreads();
    matmul_tile<W>(w + (u64)expert * rows * row_bytes, x, nullptr, out, x_rows, out_rows, rows,
                   cols, row_bytes);
}

// Decodes the n x k weight w (rows of row_bytes bytes, any weight format, in the layout
// it is uploaded in; k a multiple of 8) to bf16, rounded to nearest even, row-major in
// out: one chunk of 8 elements, one 16-byte store, per thread and step. Launched
// serialized: stream order puts it after the product that last read out.
template <typename W>
__global__ void dequant_bf16(const u8* __restrict__ w, u16* __restrict__ out, u32 n, u32 k,
                             u64 row_bytes) {
    const u32 chunks = k / 8;
    const u64 total = (u64)n * chunks;
    for (u64 i = global_index(); i < total; i += grid_stride()) {
        const u64 row = i / chunks;
        const u32 c = (u32)(i - row * chunks);
        float v[8];
        decode_chunk<W>(w + row * row_bytes, 8 * c, k, v);
        uint4 packed;
        packed.x = pack_bf16x2(v[0], v[1]);
        packed.y = pack_bf16x2(v[2], v[3]);
        packed.z = pack_bf16x2(v[4], v[5]);
        packed.w = pack_bf16x2(v[6], v[7]);
        reinterpret_cast<uint4*>(out)[i] = packed;
    }
}

}  // namespace kiln
