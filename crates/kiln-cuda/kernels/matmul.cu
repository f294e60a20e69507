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
//
// matmul_q8 multiplies x's Q8_1 copy (kiln_core::ops::Q8_COPY) with a packed weight
// whose scale groups are 32 elements (quant.cuh's units) on tensor cores in 8-bit
// integers; see its comment below.
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

// The integer dot products of matmul_q8 become f32 without a conversion instruction
// (I2F issues at a sixteenth of the FMA rate on sm_90): the product starts from
// MQ_MAGIC, the bits of the f32 1.5 * 2^23, so that the integer sum MQ_MAGIC + dot,
// read as f32, is 1.5 * 2^23 + dot exactly for |dot| < 2^22 (a group's dot is at most
// 32 * 128 * 128 = 2^19 in magnitude); subtracting MQ_MAGIC_F leaves dot.
constexpr u32 MQ_MAGIC = 0x4B400000u;
constexpr float MQ_MAGIC_F = 12582912.0f;

// d = MQ_MAGIC + a b for one m16n8k32 tile of signed bytes: a row-major 16x32, b
// column-major 32x8, d 16x8 s32, in the fragment layouts of the PTX ISA (register i of
// a holds row g (+8 for odd i), columns 4q .. 4q + 3 (+16 for i >= 2); register j of b
// holds rows 4q .. 4q + 3 (+16 for j = 1) of column g; d as mma_bf16_16816's).
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(MQ_MAGIC));
}

// Run r of unit t as 4 signed bytes: the quants less W::BIAS (which then needs no
// zero term), or, for W::BIAS = 0, the quants themselves (all below 128).
template <typename W>
__device__ __forceinline__ u32 signed_run(const typename W::Unit& t, u32 r) {
    const u32 q = W::run(t, r);
    if constexpr (W::BIAS != 0) {
        return __vsub4(q, (u32)W::BIAS * 0x01010101u);
    } else {
        return q;
    }
}

// Q8_1 blocks of x per tile of matmul_q8, and the words of one token's tile in shared
// memory: per block its (d, s) word and 8 words of quants, then 4 words of padding,
// which put the 8 tokens a B fragment reads 12 banks apart (conflict-free) and keep
// each token's tile at a multiple of 16 bytes.
constexpr u32 MQ_KB = MQ_KT / Q8_1_BLOCK_ELEMS;
constexpr u32 MQ_BLOCK_WORDS = Q8_1_BLOCK_BYTES / 4;
constexpr u32 MQ_ROW_WORDS = MQ_KB * MQ_BLOCK_WORDS + 4;

// Weight blocks per tile of matmul_q8, and the bytes of one weight row's tile in shared
// memory: the tile's blocks in the planes layout (plane p at MQ_TB * plane_start(p),
// whatever the blocks of a last, partial tile), padded to 4 words more than a multiple
// of 8, so that 8 rows' 16-byte loads of one unit touch distinct banks.
template <typename W>
__host__ __device__ constexpr u32 mq_tile_blocks() {
    return MQ_KT / W::BLOCK_ELEMS;
}
template <typename W>
__host__ __device__ constexpr u32 mq_weight_stride() {
    constexpr u32 words = mq_tile_blocks<W>() * W::BLOCK_BYTES / 4;
    return 4 * (words + (12 - words % 8) % 8);
}

// Bytes per copy of plane P of a whole weight tile when the planes allow LOAD-byte
// copies: at most LOAD, and dividing the tile's entries of the plane (Q1_0's tile has
// 4 bytes of scales), so every piece stays aligned.
template <typename W, u32 LOAD, u32 P>
__host__ __device__ constexpr u32 mq_plane_piece() {
    constexpr u32 tile_factor = pow2_factor(mq_tile_blocks<W>() * W::PLANE_LEN[P]);
    return tile_factor < LOAD ? tile_factor : LOAD;
}

// Copies blocks tb0 .. tb0 + tbs (a tile) of weight rows row_first .. + MQ_BN (rows past
// n repeat row n - 1) from the planes layout (rows of nb blocks) into the tile `ws`,
// plane P and those after it, in pieces of mq_plane_piece bytes (LOAD = 16: cp.async,
// for whole tiles of 16-byte aligned planes; LOAD = 2 for any tile).
template <typename W, u32 LOAD, u32 P = 0>
__device__ __forceinline__ void stage_weight_tile(u8* ws, const u8* __restrict__ w, u32 n,
                                                  u32 row_first, u64 row_bytes, u32 nb, u32 tb0,
                                                  u32 tbs) {
    if constexpr (P < W::PLANES) {
        constexpr u32 TB = mq_tile_blocks<W>();
        constexpr u32 STRIDE = mq_weight_stride<W>();
        constexpr u32 PIECE = mq_plane_piece<W, LOAD, P>();
        const u32 per_row = tbs * W::PLANE_LEN[P] / PIECE;
        const u64 from = (u64)nb * plane_start<W>(P) + (u64)tb0 * W::PLANE_LEN[P];
        for (u32 i = threadIdx.x; i < MQ_BN * per_row; i += MQ_WARPS * 32) {
            const u32 r = i / per_row;
            const u32 c = (i - r * per_row) * PIECE;
            const u8* row = w + (u64)min(row_first + r, n - 1) * row_bytes;
            copy_async<PIECE>(ws + r * STRIDE + TB * plane_start<W>(P) + c, row + from + c);
        }
        stage_weight_tile<W, LOAD, P + 1>(ws, w, n, row_first, row_bytes, nb, tb0, tbs);
    }
}

// Dynamic shared memory of matmul_q8<W, NT>: two x tiles, the x blocks' scales and
// sums, two weight tiles (ops/matmul.rs's q8_shared_bytes computes the same).
template <typename W, u32 NT>
__host__ __device__ constexpr u32 mq_shared_bytes() {
    return 2 * 8 * NT * MQ_ROW_WORDS * 4 + 8 * NT * MQ_KB * 8 + 2 * MQ_BN * mq_weight_stride<W>();
}

// matmul_q8: out = x_q8 · Wᵀ (+ bias) for m rows of x's Q8_1 copy and a weight in the
// planes layout whose scale groups are 32 elements, on tensor cores in 8-bit integers.
// A block of MQ_WARPS warps owns weight rows MQ_BN bx .. (warp w the MQ_ROW_TILES tiles
// of 16 rows from 16 MQ_ROW_TILES w) and tokens 8 NT by .. + 8 NT - 1, over tiles
// z T .. (z + 1) T of k (T = tiles_per_split, z = bz; each tile MQ_KT elements).
// - Each tile of x (raw Q8_1 blocks of the block's tokens; 16-byte copies when every
//   token's tile starts at a multiple of 16 bytes, k a multiple of 128) and of the
//   block's weight rows is copied to shared memory with cp.async, the next tile's
//   copies in flight while one is multiplied; then each (token, block) of x gets its
//   scale d (the f16 widened) and, for affine formats, d times the sum of its quants,
//   as f32 (tokens past m: zeros).
// - Per scale group, one mma.sync.m16n8k32 per 8 tokens and row tile gives every (row,
//   token) integer dot product of the group's quants exactly (A: the weight's runs as
//   signed bytes, run 8h + q in register 0 / 1 and 8h + 4 + q in 2 / 3, which are
//   elements 4q .. and 16 + 4q .. of the group, as quant.cuh's runs of a group are in
//   element order; B: the same elements of x's quants, read once for the warp's row
//   tiles). The f32 accumulator adds scale * d * dot (+ zero * d * sum for affine
//   formats): the terms of the definition's sum of x_q8 values times weight values,
//   summed in another order.
// - With gridDim.z == 1 the block writes out (+ bias); else its partial sums go to
//   work[bz][m][n] and matmul_q8_reduce adds the splits in order.
template <typename W, u32 NT, bool ALIGNED>
__global__ void __launch_bounds__(MQ_WARPS * 32)
    matmul_q8(const u8* __restrict__ w, const u8* __restrict__ xq8, const float* __restrict__ bias,
              float* __restrict__ out, float* __restrict__ work, u32 m, u32 n, u32 k,
              u64 row_bytes, u32 tiles_per_split) {
    static_assert(W::PACKED && W::GROUP_ELEMS == 32, "packed formats of 32-element groups");
    static_assert(MQ_KT % W::BLOCK_ELEMS == 0 && W::BLOCK_ELEMS % W::UNIT_ELEMS == 0,
                  "whole blocks per tile, whole units per block");
    static_assert(W::BIAS != 0 || W::SMALL_QUANTS, "quants fit signed bytes");
    constexpr u32 MT = 8 * NT;
    constexpr u32 RT = MQ_ROW_TILES;
    constexpr u32 THREADS = MQ_WARPS * 32;
    constexpr u32 GROUPS = W::UNIT_ELEMS / 32;
    constexpr u32 TB = mq_tile_blocks<W>();
    constexpr u32 W_STRIDE = mq_weight_stride<W>();
    constexpr u32 X_CHUNKS = MQ_KB * Q8_1_BLOCK_BYTES / 16;  // 16-byte pieces of a token's tile
    extern __shared__ __align__(16) u8 mq_shared[];
    u32* xs = reinterpret_cast<u32*>(mq_shared);                   // [2][MT * MQ_ROW_WORDS]
    float2* xd = reinterpret_cast<float2*>(xs + 2 * MT * MQ_ROW_WORDS);  // [MT * MQ_KB]
    u8* ws = reinterpret_cast<u8*>(xd + MT * MQ_KB);               // [2][MQ_BN * W_STRIDE]

    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 g = lane >> 2;
    const u32 q = lane & 3u;
    const u32 m0 = blockIdx.y * MT;
    const u32 n0 = blockIdx.x * MQ_BN;
    const u32 nb = k / W::BLOCK_ELEMS;
    const u32 k_blocks = k / Q8_1_BLOCK_ELEMS;
    const u32 n_tiles = (k + MQ_KT - 1) / MQ_KT;
    const u32 first = blockIdx.z * tiles_per_split;
    const u32 last = min(first + tiles_per_split, n_tiles);
    const bool x_wide = k_blocks % 4 == 0 && (reinterpret_cast<u64>(xq8) & 15u) == 0;

    auto stage = [&](u32 tile, u32 buf) {
        const u32 kb0 = tile * MQ_KB;
        const u32 blocks = min(MQ_KB, k_blocks - kb0);
        u32* x_tile = xs + buf * MT * MQ_ROW_WORDS;
        const u8* x_from = xq8 + ((u64)m0 * k_blocks + kb0) * Q8_1_BLOCK_BYTES;
        const u64 x_row = (u64)k_blocks * Q8_1_BLOCK_BYTES;
        if (x_wide) {
            const u32 chunks = blocks * X_CHUNKS / MQ_KB;
            for (u32 i = threadIdx.x; i < MT * chunks; i += THREADS) {
                const u32 t = i / chunks;
                const u32 c = i - t * chunks;
                if (m0 + t < m) {
                    copy_async<16>(reinterpret_cast<u8*>(x_tile + t * MQ_ROW_WORDS) + 16 * c,
                                   x_from + t * x_row + 16 * c);
                }
            }
        } else {
            const u32 words = blocks * MQ_BLOCK_WORDS;
            for (u32 i = threadIdx.x; i < MT * words; i += THREADS) {
                const u32 t = i / words;
                const u32 j = i - t * words;
                if (m0 + t < m) {
                    copy_async<4>(reinterpret_cast<u8*>(x_tile + t * MQ_ROW_WORDS + j),
                                  x_from + t * x_row + 4 * j);
                }
            }
        }
        const u32 tb0 = tile * TB;
        const u32 tbs = min(TB, nb - tb0);
        u8* w_tile = ws + buf * MQ_BN * W_STRIDE;
        if (ALIGNED && tbs == TB) {
            stage_weight_tile<W, 16>(w_tile, w, n, n0, row_bytes, nb, tb0, tbs);
        } else {
            stage_weight_tile<W, 2>(w_tile, w, n, n0, row_bytes, nb, tb0, tbs);
        }
        commit_copies();
    };

    float acc[RT][NT][4];
#pragma unroll
    for (u32 i = 0; i < RT; ++i)
#pragma unroll
        for (u32 j = 0; j < NT; ++j)
#pragma unroll
            for (u32 c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    if (first < last) {
        stage(first, 0);
    }
    for (u32 tile = first; tile < last; ++tile) {
        const u32 buf = (tile - first) & 1u;
        const u32 blocks = min(MQ_KB, k_blocks - tile * MQ_KB);
        if (tile + 1 < last) {
            stage(tile + 1, buf ^ 1u);
            wait_copies<1>();
        } else {
            wait_copies<0>();
        }
        __syncthreads();
        const u32* x_tile = xs + buf * MT * MQ_ROW_WORDS;
        for (u32 i = threadIdx.x; i < MT * blocks; i += THREADS) {
            const u32 t = i / blocks;
            const u32 b = i - t * blocks;
            const u32* block = x_tile + t * MQ_ROW_WORDS + b * MQ_BLOCK_WORDS;
            float2 v = make_float2(0.0f, 0.0f);
            if (m0 + t < m) {
                v.x = f16_bits_to_f32((u16)(block[0] & 0xffffu));
                if constexpr (W::AFFINE) {
                    int sum = 0;
#pragma unroll
                    for (u32 j = 1; j < MQ_BLOCK_WORDS; ++j) sum = __dp4a((int)block[j], 0x01010101, sum);
                    v.y = v.x * (float)sum;
                }
            }
            xd[t * MQ_KB + b] = v;
        }
        __syncthreads();
        const u8* w_tile = ws + buf * MQ_BN * W_STRIDE + (16 * RT * warp + g) * W_STRIDE;
        const u32 units = blocks * Q8_1_BLOCK_ELEMS / W::UNIT_ELEMS;
        for (u32 u = 0; u < units; ++u) {
            typename W::Unit lo[RT], hi[RT];
#pragma unroll
            for (u32 i = 0; i < RT; ++i) {
                lo[i] = W::template load_unit<16>(w_tile + 16 * i * W_STRIDE, TB, u);
                hi[i] = W::template load_unit<16>(w_tile + (16 * i + 8) * W_STRIDE, TB, u);
            }
#pragma unroll
            for (u32 h = 0; h < GROUPS; ++h) {
                u32 a[RT][4];
                float scale[RT][2], zero[RT][2];
#pragma unroll
                for (u32 i = 0; i < RT; ++i) {
                    a[i][0] = signed_run<W>(lo[i], 8 * h + q);
                    a[i][1] = signed_run<W>(hi[i], 8 * h + q);
                    a[i][2] = signed_run<W>(lo[i], 8 * h + 4 + q);
                    a[i][3] = signed_run<W>(hi[i], 8 * h + 4 + q);
                    W::group(lo[i], h, scale[i][0], zero[i][0]);
                    W::group(hi[i], h, scale[i][1], zero[i][1]);
                }
                // This group's x block within the tile.
                const u32 b = (u * W::UNIT_ELEMS + 32 * h) / Q8_1_BLOCK_ELEMS;
#pragma unroll
                for (u32 j = 0; j < NT; ++j) {
                    const u32* xrow = x_tile + (8 * j + g) * MQ_ROW_WORDS + b * MQ_BLOCK_WORDS + 1;
                    const u32 bq[2] = {xrow[q], xrow[4 + q]};
                    const float2 xv[2] = {xd[(8 * j + 2 * q) * MQ_KB + b],
                                          xd[(8 * j + 2 * q + 1) * MQ_KB + b]};
#pragma unroll
                    for (u32 i = 0; i < RT; ++i) {
                        int dot[4];
                        mma_s8_16832(dot, a[i], bq);
#pragma unroll
                        for (u32 c = 0; c < 4; ++c) {
                            const float2 x = xv[c & 1];
                            const u32 r = c >> 1;
                            const float d = __int_as_float(dot[c]) - MQ_MAGIC_F;
                            float v = fmaf(scale[i][r] * x.x, d, acc[i][j][c]);
                            if constexpr (W::AFFINE) {
                                v = fmaf(zero[i][r], x.y, v);
                            }
                            acc[i][j][c] = v;
                        }
                    }
                }
            }
        }
        __syncthreads();  // before the next copies reuse this tile's buffers
    }

    // Accumulator c of row tile i and token tile j holds weight row
    // n0 + 16 (RT warp + i) + g (+8 for c >= 2), token m0 + 8j + 2q + (c & 1).
#pragma unroll
    for (u32 i = 0; i < RT; ++i) {
#pragma unroll
        for (u32 j = 0; j < NT; ++j) {
#pragma unroll
            for (u32 c = 0; c < 4; ++c) {
                const u32 row = n0 + 16 * (RT * warp + i) + g + (c >= 2 ? 8 : 0);
                const u32 token = m0 + 8 * j + 2 * q + (c & 1);
                if (row < n && token < m) {
                    if (gridDim.z == 1) {
                        out[(u64)token * n + row] = bias ? acc[i][j][c] + bias[row] : acc[i][j][c];
                    } else {
                        work[((u64)blockIdx.z * m + token) * n + row] = acc[i][j][c];
                    }
                }
            }
        }
    }
}

// out[i] = sum over s < splits of work[s][i] (in order) + bias[i % n], for the m x n
// outputs of a matmul_q8 split over k.
__global__ void matmul_q8_reduce(const float* __restrict__ work, const float* __restrict__ bias,
                                 float* __restrict__ out, u32 m, u32 n, u32 splits) {
    const u64 total = (u64)m * n;
    for (u64 i = global_index(); i < total; i += grid_stride()) {
        float v = 0.0f;
        for (u32 s = 0; s < splits; ++s) {
            v += work[(u64)s * total + i];
        }
        out[i] = bias ? v + bias[i % n] : v;
    }
}

}  // namespace kiln
