// The staged mat-vec's block (matvec.cu's `matvec` and `moe_matvec`, and moe.cu's
// `moe_router_matvec` run it) and its helpers; matvec.cu's header comment describes
// the kernel.
#pragma once
#include "quant.cuh"

namespace kiln {

// MATVEC_THREADS and MATVEC_TILE_ELEMS (one chunk of 8 elements of each weight row
// per thread) come from constants.cuh.

// The activations at columns e .. e+7 (e a multiple of 8) of each of the first m (<= M)
// rows of x ([m, k] row-major) as xv[i][0..8); zeros past column k and for rows at or
// past m.
template <u32 M>
__device__ __forceinline__ void load_activations(const float* __restrict__ x,
                                                 const u8* __restrict__ xq8, u32 m, u32 k,
                                                 u32 e, float (&xv)[M][8]) {
    const bool vector = (k % 4 == 0) && e + 8 <= k;
#pragma unroll
    for (u32 i = 0; i < M; ++i) {
        const float* xr = x + (u64)i * k;
        if (i < m && xq8 != nullptr && e < k) {
            // A copy's rows are whole blocks, so e < k puts all 8 in row i's block.
            const float4 p = q8_1_float4(xq8, (u64)i * k + e);
            const float4 q = q8_1_float4(xq8, (u64)i * k + e + 4);
            xv[i][0] = p.x, xv[i][1] = p.y, xv[i][2] = p.z, xv[i][3] = p.w;
            xv[i][4] = q.x, xv[i][5] = q.y, xv[i][6] = q.z, xv[i][7] = q.w;
        } else if (i < m && vector) {
            const float4 p = *reinterpret_cast<const float4*>(xr + e);
            const float4 q = *reinterpret_cast<const float4*>(xr + e + 4);
            xv[i][0] = p.x, xv[i][1] = p.y, xv[i][2] = p.z, xv[i][3] = p.w;
            xv[i][4] = q.x, xv[i][5] = q.y, xv[i][6] = q.z, xv[i][7] = q.w;
        } else {
#pragma unroll
            for (u32 j = 0; j < 8; ++j) {
                xv[i][j] = (i < m && e + j < k) ? xr[e + j] : 0.0f;
            }
        }
    }
}

// 2^23 + byte i (i < 4) of `word`, exactly: the byte becomes the low mantissa bits of
// 2^23 through one byte permute, so no (quarter-rate) int-to-float conversion runs.
__device__ __forceinline__ float two23_plus_byte(u32 word, u32 i) {
    return __uint_as_float(__byte_perm(word, 0x4b000000u, 0x7540u | i));
}

// Adds to acc[i] (i < M) the dot product of the chunk of 8 weights at element e of
// the row of `len` elements starting at `row` with xv[i], the chunk's activations,
// whose sum is xsum[i].
// Formats with quants8 convert their exact integer quants without int-to-float
// instructions and apply the chunk's scale (and offset, times the activation sum)
// once; the others decode to f32 first.
template <typename W, u32 M>
__device__ __forceinline__ void dot_chunk(const u8* row, u32 e, u32 len, const float (&xv)[M][8],
                                          const float (&xsum)[M], float (&acc)[M]) {
    if constexpr (W::HAS_QUANTS8) {
        const Quants8 q =
            W::quants8(row + (u64)(e / W::BLOCK_ELEMS) * W::BLOCK_BYTES, (e % W::BLOCK_ELEMS) / 8);
        float w[8];
#pragma unroll
        for (u32 j = 0; j < 8; ++j) {
            w[j] = two23_plus_byte((u32)(q.u >> (32 * (j / 4))), j % 4) -
                   (8388608.0f + (float)W::BIAS);
        }
#pragma unroll
        for (u32 i = 0; i < M; ++i) {
            float s = 0.0f;
#pragma unroll
            for (u32 j = 0; j < 8; ++j) {
                s = fmaf(w[j], xv[i][j], s);
            }
            acc[i] = fmaf(q.scale, s, acc[i]);
            if constexpr (W::AFFINE) {
                acc[i] = fmaf(q.offset, xsum[i], acc[i]);
            }
        }
    } else {
        float v[8];
        decode_chunk<W>(row, e, len, v);
#pragma unroll
        for (u32 i = 0; i < M; ++i) {
#pragma unroll
            for (u32 j = 0; j < 8; ++j) {
                acc[i] = fmaf(v[j], xv[i][j], acc[i]);
            }
        }
    }
}

// The staged mat-vec of block blockIdx.x, after the wait for prior grids. Dynamic
// shared memory: STAGES slots of ROWS * TILE_BYTES bytes (the launch's size).
template <typename W, u32 M, u32 ROWS, u32 LOAD, u32 STAGES>
__device__ __forceinline__ void matvec_block(const u8* __restrict__ w, const float* x,
                                             const u8* xq8, const float* __restrict__ bias,
                                             float* __restrict__ out, u32 m, u32 n, u32 k,
                                             u64 row_bytes) {
    constexpr u32 TILE_BYTES = MATVEC_TILE_ELEMS / W::BLOCK_ELEMS * W::BLOCK_BYTES;
    constexpr u32 UNITS_PER_ROW = TILE_BYTES / LOAD;
    constexpr u32 UNITS = ROWS * UNITS_PER_ROW;
    constexpr u32 SLOT_BYTES = ROWS * TILE_BYTES;
    static_assert(TILE_BYTES % 16 == 0, "a tile of a row is a whole number of 16-byte units");
    static_assert(STAGES >= 2, "one tile is computed while the next ones load");

    extern __shared__ __align__(16) u8 slots[];
    __shared__ float partial[MATVEC_THREADS / 32][ROWS * M];

    const u32 row0 = blockIdx.x * ROWS;
    const u8* rows = w + (u64)row0 * row_bytes;
    const u32 tiles = (k + MATVEC_TILE_ELEMS - 1) / MATVEC_TILE_ELEMS;

    // Issues this thread's copies of tile t into slot t % STAGES and commits them as
    // one group (empty past the last tile, so that every thread commits one group per
    // tile). Unit u of a tile is bytes (u % UNITS_PER_ROW) * LOAD .. + LOAD of its row
    // u / UNITS_PER_ROW; units past a row's end or of rows past n are not copied (their
    // shared bytes are never decoded). A thread copies units threadIdx.x + i * THREADS;
    // when it has at most PLAN_UNITS of them, their addresses in tile 0 are computed
    // once (`plan`) and each tile only offsets them.
    constexpr u32 UNITS_PER_THREAD = (UNITS + MATVEC_THREADS - 1) / MATVEC_THREADS;
    constexpr u32 PLAN_UNITS = 4;
    constexpr bool PLANNED = UNITS_PER_THREAD <= PLAN_UNITS;
    constexpr u32 DEAD = 0xffffffffu;
    static_assert(SLOT_BYTES < 65536 && TILE_BYTES < 65536, "plan offsets take 16 bits");
    const u8* plan_src[PLANNED ? UNITS_PER_THREAD : 1];
    u32 plan_at[PLANNED ? UNITS_PER_THREAD : 1];  // shared offset << 16 | offset in tile
    if constexpr (PLANNED) {
#pragma unroll
        for (u32 i = 0; i < UNITS_PER_THREAD; ++i) {
            const u32 u = threadIdx.x + i * MATVEC_THREADS;
            const u32 r = u / UNITS_PER_ROW;
            const u32 in_tile = (u % UNITS_PER_ROW) * LOAD;
            const bool live = u < UNITS && row0 + r < n;
            plan_src[i] = rows + (u64)r * row_bytes + in_tile;
            plan_at[i] = live ? ((r * TILE_BYTES + in_tile) << 16) | in_tile : DEAD;
        }
    }
    auto issue = [&](u32 t) {
        if (t < tiles) {
            u8* slot = slots + (t % STAGES) * SLOT_BYTES;
            const u64 tile_at = (u64)t * TILE_BYTES;
            if constexpr (PLANNED) {
#pragma unroll
                for (u32 i = 0; i < UNITS_PER_THREAD; ++i) {
                    const u32 at = plan_at[i];
                    if (at != DEAD && tile_at + (at & 0xffffu) < row_bytes) {
                        copy_async<LOAD>(slot + (at >> 16), plan_src[i] + tile_at);
                    }
                }
            } else {
                for (u32 u = threadIdx.x; u < UNITS; u += MATVEC_THREADS) {
                    const u32 r = u / UNITS_PER_ROW;
                    const u32 in_tile = (u % UNITS_PER_ROW) * LOAD;
                    if (row0 + r < n && tile_at + in_tile < row_bytes) {
                        copy_async<LOAD>(slot + r * TILE_BYTES + in_tile,
                                         rows + (u64)r * row_bytes + tile_at + in_tile);
                    }
                }
            }
        }
        commit_copies();
    };

    float acc[ROWS][M] = {};

#pragma unroll
    for (u32 t = 0; t + 1 < STAGES; ++t) {
        issue(t);
    }
    for (u32 t = 0; t < tiles; ++t) {
        const u32 e0 = t * MATVEC_TILE_ELEMS;
        const u32 local = 8 * threadIdx.x;
        float xv[M][8];
        load_activations<M>(x, xq8, m, k, e0 + local, xv);  // in flight during the wait
        wait_copies<STAGES - 2>();  // this thread's copies of tile t have landed
        __syncthreads();  // everyone's have, and everyone is done with tile t - 1
        issue(t + STAGES - 1);  // into tile t - 1's slot
        const u8* tile = slots + (t % STAGES) * SLOT_BYTES;
        if (e0 + local < k) {
            float xsum[M];
#pragma unroll
            for (u32 i = 0; i < M; ++i) {
                xsum[i] = 0.0f;
#pragma unroll
                for (u32 j = 0; j < 8; ++j) {
                    xsum[i] += xv[i][j];
                }
            }
#pragma unroll
            for (u32 r = 0; r < ROWS; ++r) {
                if (row0 + r < n) {
                    dot_chunk<W, M>(tile + r * TILE_BYTES, local, k - e0, xv, xsum, acc[r]);
                }
            }
        }
    }

    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
#pragma unroll
    for (u32 r = 0; r < ROWS; ++r) {
#pragma unroll
        for (u32 i = 0; i < M; ++i) {
            const float s = warp_sum(acc[r][i]);
            if (lane == 0) {
                partial[warp][r * M + i] = s;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < ROWS * M) {
        const u32 r = threadIdx.x / M;
        const u32 i = threadIdx.x % M;
        const u32 row = row0 + r;
        if (row < n && i < m) {
            float s = 0.0f;
#pragma unroll
            for (u32 p = 0; p < MATVEC_THREADS / 32; ++p) {
                s += partial[p][threadIdx.x];
            }
            out[(u64)i * n + row] = bias ? s + bias[row] : s;
        }
    }
}

}  // namespace kiln
