// Matrix-vector product for decode: out[i, j] = sum_l x[i, l] * W[j, l] (+ bias[j])
// for i < m <= M activation rows (M in 1, 2, 4, 8), W of n rows in any weight format.
//
// Memory-bound design: the weight is read once per call for all activation rows.
// - A block of 256 threads owns ROWS consecutive weight rows (ROWS * tile <= 32 KiB).
// - The block walks the rows in tiles of 2048 elements. Each tile of the ROWS rows is
//   copied global -> registers -> shared memory in aligned units of LOAD bytes (16 when
//   a row's byte length is a multiple of 16, else the format's block alignment), so a
//   warp's loads are contiguous and, at LOAD = 16, 16 bytes per lane.
// - The next tile's loads are issued before the current tile is decoded, so they are
//   in flight while the block computes.
// - Thread i takes chunk i (8 elements) of each row from shared memory, reads the
//   matching 8 activations of every row of x once (reused across the ROWS weight rows),
//   and accumulates in f32 (dot_chunk); warp shuffles and a shared array reduce the
//   block.
#include "quant.cuh"

namespace kiln {

constexpr u32 MATVEC_THREADS = 256;
// Elements of each weight row per tile: one chunk of 8 per thread.
constexpr u32 MATVEC_TILE_ELEMS = 8 * MATVEC_THREADS;

// The type of an aligned load of LOAD bytes.
template <u32 LOAD>
struct LoadUnit;
template <>
struct LoadUnit<16> {
    typedef uint4 type;
};
template <>
struct LoadUnit<8> {
    typedef uint2 type;
};
template <>
struct LoadUnit<4> {
    typedef u32 type;
};
template <>
struct LoadUnit<2> {
    typedef u16 type;
};

// The 8 activations at columns e .. e+7 of each of the first m (<= M) rows of x
// ([m, k] row-major); zeros past column k and for rows at or past m.
template <u32 M>
__device__ __forceinline__ void load_activations(const float* __restrict__ x, u32 m, u32 k,
                                                 u32 e, float (&xv)[M][8]) {
    const bool vector = (k % 4 == 0) && e + 8 <= k;
#pragma unroll
    for (u32 i = 0; i < M; ++i) {
        const float* xr = x + (u64)i * k + e;
        if (i < m && vector) {
            const float4 a = *reinterpret_cast<const float4*>(xr);
            const float4 b = *reinterpret_cast<const float4*>(xr + 4);
            xv[i][0] = a.x, xv[i][1] = a.y, xv[i][2] = a.z, xv[i][3] = a.w;
            xv[i][4] = b.x, xv[i][5] = b.y, xv[i][6] = b.z, xv[i][7] = b.w;
        } else {
#pragma unroll
            for (u32 j = 0; j < 8; ++j) {
                xv[i][j] = (i < m && e + j < k) ? xr[j] : 0.0f;
            }
        }
    }
}

// 2^23 + byte i (i < 4) of `word`, exactly: the byte becomes the low mantissa bits of
// 2^23 through one byte permute, so no (quarter-rate) int-to-float conversion runs.
__device__ __forceinline__ float two23_plus_byte(u32 word, u32 i) {
    return __uint_as_float(__byte_perm(word, 0x4b000000u, 0x7540u | i));
}

// Adds to acc[i] (i < M) the dot product of the 8 weights at elements e .. e+7 of the
// row of `len` elements starting at `row` with xv[i] (whose sum is xsum[i]).
// Formats with quants8 convert their exact integer quants without int-to-float
// instructions and apply the chunk's scale (and offset, times xsum) once per chunk;
// the others decode to f32 first.
template <typename W, u32 M>
__device__ __forceinline__ void dot_chunk(const u8* row, u32 e, u32 len, const float (&xv)[M][8],
                                          const float (&xsum)[M], float (&acc)[M]) {
    if constexpr (W::HAS_QUANTS8) {
        const Quants8 q =
            W::quants8(row + (u64)(e / W::BLOCK_ELEMS) * W::BLOCK_BYTES, (e % W::BLOCK_ELEMS) / 8);
        const u32 words[2] = {(u32)q.u, (u32)(q.u >> 32)};
        float w[8];
#pragma unroll
        for (u32 j = 0; j < 8; ++j) {
            w[j] = two23_plus_byte(words[j / 4], j % 4) - (8388608.0f + (float)W::BIAS);
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

template <typename W, u32 M, u32 ROWS, u32 LOAD>
__global__ void __launch_bounds__(MATVEC_THREADS)
    matvec(const u8* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
           float* __restrict__ out, u32 m, u32 n, u32 k, u64 row_bytes) {
    constexpr u32 TILE_BYTES = MATVEC_TILE_ELEMS / W::BLOCK_ELEMS * W::BLOCK_BYTES;
    constexpr u32 UNITS_PER_ROW = TILE_BYTES / LOAD;
    constexpr u32 UNITS = ROWS * UNITS_PER_ROW;
    constexpr u32 UNITS_PER_THREAD = (UNITS + MATVEC_THREADS - 1) / MATVEC_THREADS;
    static_assert(TILE_BYTES % 16 == 0, "a tile of a row is a whole number of 16-byte units");
    typedef typename LoadUnit<LOAD>::type Unit;

    __shared__ __align__(16) u8 tile[ROWS * TILE_BYTES];
    __shared__ float partial[MATVEC_THREADS / 32][ROWS * M];

    const u32 row0 = blockIdx.x * ROWS;
    const u8* rows = w + (u64)row0 * row_bytes;
    const u32 tiles = (k + MATVEC_TILE_ELEMS - 1) / MATVEC_TILE_ELEMS;

    // Unit u of a tile is bytes (u % UNITS_PER_ROW) * LOAD .. + LOAD of row
    // u / UNITS_PER_ROW of the tile; `source` gives its address, or null for units past
    // a row's end or of rows past n, which are not loaded (their shared bytes are never
    // decoded).
    auto source = [&](u32 t, u32 u) -> const Unit* {
        const u32 r = u / UNITS_PER_ROW;
        const u64 at = (u64)t * TILE_BYTES + (u64)(u % UNITS_PER_ROW) * LOAD;
        const bool inside = u < UNITS && row0 + r < n && at < row_bytes;
        return inside ? reinterpret_cast<const Unit*>(rows + (u64)r * row_bytes + at) : nullptr;
    };
    auto target = [&](u32 u) {
        return reinterpret_cast<Unit*>(tile + (u / UNITS_PER_ROW) * TILE_BYTES +
                                       (u % UNITS_PER_ROW) * LOAD);
    };
    // With 16-byte units, a tile goes through registers so that the next tile's loads
    // are in flight while this one is decoded. Narrower units (rows whose byte length
    // is not a multiple of 16) are copied straight to shared memory.
    constexpr u32 STAGED = LOAD == 16 ? UNITS_PER_THREAD : 1;
    Unit staged[STAGED] = {};
    auto fetch = [&](u32 t) {
#pragma unroll
        for (u32 i = 0; i < STAGED; ++i) {
            const Unit* from = source(t, i * MATVEC_THREADS + threadIdx.x);
            if (LOAD == 16 && from) {
                staged[i] = *from;
            }
        }
    };
    auto stash = [&](u32 t) {
        if constexpr (LOAD == 16) {
#pragma unroll
            for (u32 i = 0; i < STAGED; ++i) {
                const u32 u = i * MATVEC_THREADS + threadIdx.x;
                if (u < UNITS) {
                    *target(u) = staged[i];
                }
            }
        } else {
            for (u32 u = threadIdx.x; u < UNITS; u += MATVEC_THREADS) {
                if (const Unit* from = source(t, u)) {
                    *target(u) = *from;
                }
            }
        }
    };

    float acc[ROWS][M];
#pragma unroll
    for (u32 r = 0; r < ROWS; ++r) {
#pragma unroll
        for (u32 i = 0; i < M; ++i) {
            acc[r][i] = 0.0f;
        }
    }

    fetch(0);
    for (u32 t = 0; t < tiles; ++t) {
        __syncthreads();  // every thread is done decoding the previous tile
        stash(t);
        __syncthreads();
        if (t + 1 < tiles) {
            fetch(t + 1);
        }
        const u32 e0 = t * MATVEC_TILE_ELEMS;
        const u32 local = 8 * threadIdx.x;
        if (e0 + local < k) {
            float xv[M][8];
            load_activations<M>(x, m, k, e0 + local, xv);
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
