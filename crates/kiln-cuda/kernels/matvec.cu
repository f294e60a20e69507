// Matrix-vector product for decode: out[i, j] = sum_l x[i, l] * W[j, l] (+ bias[j])
// for i < m <= M activation rows (M in 1, 2, 4, 8), W of n rows in any weight format.
// Memory-bound: the weight is read once per call for all activation rows. Three kernels:
//
// matvec_packed, for the formats the backend stores as planes (quant.cuh, PACKED):
// - A warp owns R consecutive weight rows; the block's warps are independent.
// - Lane l takes units l, l + 32, ... of each row (W::UNIT_ELEMS elements: a Q4_0
//   block, a quarter of a Q4_K block ...), a round of packed_units of them at a time,
//   with all their loads issued before the first is used. A unit's quants are whole
//   16-byte loads when the planes are 16-byte aligned, so a warp reads 512
//   consecutive bytes of quants per load. The round's activations are staged in
//   shared memory, padded so that the lanes' reads of consecutive units do not
//   conflict (read from global memory, each would touch its own cache line), with the
//   sum of each scale group's activations, computed once per block.
// - A unit is read as runs of 4 quants q (one per byte). For quants below 128 one
//   byte permute makes the f32 (1 + q / 128) / 2 exactly, and one FFMA per element and
//   activation row accumulates s = sum (1 + q / 128) x / 2 over a scale group, so that
//   sum q x = 256 s - 128 sum x; 8-bit quants become 2^23 + q, less 2^23. Then
//   acc += scale * sum q x + zero * sum x per group (values are scale * q + zero).
//
// matvec_resident, for one activation row of the packed formats where it measured
// faster (ops/matmul.rs): the units of matvec_packed, but each block rounds all of x
// to 8 bits per 32 elements into shared memory once (as llama.cpp's q8_1 activations),
// the products of 4 quants with 4 rounded activations are one integer dp4a, and the
// grid is one wave of warps with equal numbers of rows, each warp streaming its rows
// with its next units in flight and no further barrier. Two fusions ride on it: a
// residual add and RMSNorm computed by every block in place of reading x's copy
// (matvec_resident_add_norm), and work on groups of the product's rows in its epilogue,
// done by the last warp to finish a group (TicketRows): the Glu of a gate-up product,
// 32 gate rows and their 32 up rows at a time (matvec_resident_glu), or the rotation and
// cache append of a q-k-v product, a head at a time (matvec_resident_rope_append).
//
// Under programmatic dependent launch (common.cuh) matvec_resident issues its first
// weight loads before it waits for the kernels before it, so that they overlap the
// end of the previous kernel. matvec_packed waits first thing: with its wait after the
// first round's loads, ptxas moved those loads below the wait anyway.
//
// matvec (staged), for the dense formats and the GGUF-layout quantized ones:
// - A block of 256 threads owns ROWS consecutive weight rows.
// - The block walks the rows in tiles of 2048 elements. Each tile of the ROWS rows is
//   copied global -> shared memory with cp.async in aligned units of LOAD bytes (16
//   when a row's byte length is a multiple of 16, else the format's block alignment),
//   so a warp's loads are contiguous and, at LOAD = 16, 16 bytes per lane.
// - STAGES tiles rotate through shared memory: while one is decoded the next
//   STAGES - 1 are in flight, so that enough bytes are requested to cover the
//   latency of global memory.
// - Thread i takes chunk i (8 elements) of each row from shared memory, reads the
//   matching 8 activations of every row of x once (reused across the ROWS weight
//   rows), and accumulates in f32 (dot_chunk); warp shuffles and a shared array
//   reduce the block.
#include "functors.cuh"
#include "moe.cuh"
#include "rope.cuh"
#include "quant.cuh"
#include "matvec_staged.cuh"

namespace kiln {

// The staged mat-vec's block, matvec_block, and its helpers are in matvec_staged.cuh.

template <typename W, u32 M, u32 ROWS, u32 LOAD, u32 STAGES>
__global__ void __launch_bounds__(MATVEC_THREADS)
    matvec(const u8* __restrict__ w, const float* __restrict__ x, const u8* __restrict__ xq8,
           const float* __restrict__ bias, float* __restrict__ out, u32 m, u32 n, u32 k,
           u64 row_bytes) {
    chain_after_prior_grids(x, xq8);
    matvec_block<W, M, ROWS, LOAD, STAGES>(w, x, xq8, bias, out, m, n, k, row_bytes);
}

// Units of W a lane of matvec_packed loads per round for M activation rows: fewer
// for more rows, whose activations share the round's shared memory.
template <typename W, u32 M>
__host__ __device__ constexpr u32 packed_units() {
    return M <= 2 ? W::UNITS_IN_FLIGHT
                  : (W::UNITS_IN_FLIGHT * 2 / M > 0 ? W::UNITS_IN_FLIGHT * 2 / M : 1);
}

// PACKED_PAD (constants.cuh): floats of padding after each unit's activations in
// shared memory: lanes read the activations of consecutive units, and the padding
// puts a quarter-warp's 16-byte reads in distinct banks.

// Stages float4 v of activation row i, p = the row's elements e .. e + 3, in the shared
// layout of matvec_packed for `units` units of k per row: row i's units at
// xs + i * units * (UNIT_ELEMS + PACKED_PAD), each unit's activations followed by
// PACKED_PAD floats; and the sum of each scale group's activations, group g of unit
// u at sums[i * units * GROUPS_PER_UNIT + g * units + u], so that lanes (units) read
// distinct banks. A group's float4s are consecutive v, held by consecutive lanes: every
// lane of the warp calls this (the sum is a shuffle across them); only lanes with
// `store` write.
template <typename W>
__device__ __forceinline__ void stage_activations(const float4& p, u32 v, u32 i, u32 e, bool store,
                                                  u32 units, float* xs, float* sums) {
    constexpr u32 GROUP_VECTORS = W::GROUP_ELEMS / 4;
    constexpr u32 GROUPS_PER_UNIT = W::UNIT_ELEMS / W::GROUP_ELEMS;
    float sum = (p.x + p.y) + (p.z + p.w);
#pragma unroll
    for (u32 o = 1; o < GROUP_VECTORS; o *= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (store) {
        *reinterpret_cast<float4*>(xs + i * units * (W::UNIT_ELEMS + PACKED_PAD) + e +
                                   e / W::UNIT_ELEMS * PACKED_PAD) = p;
        if (v % GROUP_VECTORS == 0) {
            const u32 group = e / W::GROUP_ELEMS;
            sums[i * units * GROUPS_PER_UNIT + group % GROUPS_PER_UNIT * units +
                 group / GROUPS_PER_UNIT] = sum;
        }
    }
}

// Adds to acc[r][i] the dot product of unit t[r] of weight row r with activation row
// i, for r < R and i < M; the unit's activations are xs[i * stride + e], e < UNIT_ELEMS,
// and the sum of those of its group g is sums[i * sums_stride + g * group_stride].
template <typename W, u32 M, u32 R>
__device__ __forceinline__ void accumulate_unit(const typename W::Unit (&t)[R], const float* xs,
                                                u32 stride, const float* sums, u32 group_stride,
                                                u32 sums_stride, float (&acc)[R][M]) {
    constexpr u32 RUNS_PER_GROUP = W::GROUP_ELEMS / 4;
#pragma unroll
    for (u32 g = 0; g < W::UNIT_ELEMS / W::GROUP_ELEMS; ++g) {
        float s[R][M];
#pragma unroll
        for (u32 r = 0; r < R; ++r) {
#pragma unroll
            for (u32 i = 0; i < M; ++i) {
                s[r][i] = 0.0f;
            }
        }
#pragma unroll
        for (u32 j = g * RUNS_PER_GROUP; j < (g + 1) * RUNS_PER_GROUP; ++j) {
            float xv[M][4];
#pragma unroll
            for (u32 i = 0; i < M; ++i) {
                const float4 p = *reinterpret_cast<const float4*>(xs + i * stride + W::run_elem(j));
                xv[i][0] = p.x, xv[i][1] = p.y, xv[i][2] = p.z, xv[i][3] = p.w;
            }
#pragma unroll
            for (u32 r = 0; r < R; ++r) {
                const u32 q = W::run(t[r], j);
                float f[4];
#pragma unroll
                for (u32 b = 0; b < 4; ++b) {
                    if constexpr (W::SMALL_QUANTS) {
                        // 0x3f, q, 0, 0: the f32 (1 + q / 128) / 2.
                        f[b] = __uint_as_float(__byte_perm(q, 0x3f000000u, 0x7044u | (b << 8)));
                    } else {
                        f[b] = two23_plus_byte(q, b) - 8388608.0f;
                    }
                }
#pragma unroll
                for (u32 i = 0; i < M; ++i) {
#pragma unroll
                    for (u32 b = 0; b < 4; ++b) {
                        s[r][i] = fmaf(f[b], xv[i][b], s[r][i]);
                    }
                }
            }
        }
#pragma unroll
        for (u32 r = 0; r < R; ++r) {
            float scale, zero;
            W::group(t[r], g, scale, zero);
            if constexpr (W::SMALL_QUANTS) {
                // s = sum x / 2 + sum q x / 256: the group's sum of values times x,
                // scale * sum q x + zero * sum x, is 256 scale s + (zero - 128 scale) sum x.
                zero = fmaf(-128.0f, scale, zero);
                scale *= 256.0f;
            }
#pragma unroll
            for (u32 i = 0; i < M; ++i) {
                acc[r][i] = fmaf(scale, s[r][i], fmaf(zero, sums[i * sums_stride + g * group_stride], acc[r][i]));
            }
        }
    }
}

// Grid: ceil(n / (R * MATVEC_THREADS / 32)) blocks of MATVEC_THREADS. Dynamic shared
// memory: M rows of packed_stride<W, M>() floats (one round's activations), then M rows
// of packed_groups<W, M>() floats (their sums per scale group).
// ALIGNED: every plane of every row starts at a multiple of 16 bytes.
//
// The block walks k in rounds of 32 * U units: each lane issues the loads of its U
// units of each of its R rows, the block stages the round's activations of all M rows
// in shared memory (each unit's UNIT_ELEMS floats followed by PACKED_PAD) with the sum
// of each scale group's activations, and after a barrier every lane accumulates its
// units.
template <typename W, u32 M>
__host__ __device__ constexpr u32 packed_stride() {
    return 32 * packed_units<W, M>() * (W::UNIT_ELEMS + PACKED_PAD);
}

// Scale groups of k per round of matvec_packed.
template <typename W, u32 M>
__host__ __device__ constexpr u32 packed_groups() {
    return 32 * packed_units<W, M>() * W::UNIT_ELEMS / W::GROUP_ELEMS;
}

// The packed mat-vec of block blockIdx.x, after the wait for prior grids.
template <typename W, u32 M, u32 R, bool ALIGNED>
__device__ __forceinline__ void matvec_packed_block(const u8* __restrict__ w, const float* x,
                                                    const u8* xq8,
                                                    const float* __restrict__ bias,
                                                    float* __restrict__ out, u32 m, u32 n,
                                                    u32 k, u64 row_bytes) {
    constexpr u32 A = ALIGNED ? 16 : 2;
    constexpr u32 U = packed_units<W, M>();
    constexpr u32 ROUND = 32 * U * W::UNIT_ELEMS;  // elements of k per round
    constexpr u32 STRIDE = packed_stride<W, M>();
    constexpr u32 GROUPS = packed_groups<W, M>();
    static_assert(M * ROUND / 4 % MATVEC_THREADS == 0, "whole warps stage every round");
    constexpr u32 STAGED = M * ROUND / 4 / MATVEC_THREADS;  // float4s per thread per round
    extern __shared__ __align__(16) float xs[];
    float* sums = xs + M * STRIDE;

    const u32 lane = threadIdx.x & 31u;
    const u32 row0 = (blockIdx.x * (MATVEC_THREADS / 32) + threadIdx.x / 32) * R;
    const bool active = row0 < n;  // warps past n still stage activations
    const u32 nb = k / W::BLOCK_ELEMS;
    const u32 units = k / W::UNIT_ELEMS;
    const u8* rows[R];
#pragma unroll
    for (u32 r = 0; r < R; ++r) {
        // Rows past n repeat the last row (read, never written).
        const u32 row = row0 + r < n ? row0 + r : n - 1;
        rows[r] = w + (u64)row * row_bytes;
    }
    float acc[R][M] = {};
    for (u32 k0 = 0; k0 < k; k0 += ROUND) {
        const u32 u0 = k0 / W::UNIT_ELEMS;
        typename W::Unit t[U][R];
#pragma unroll
        for (u32 a = 0; a < U; ++a) {
            const u32 u = u0 + lane + 32 * a;
            if (active && u < units) {
#pragma unroll
                for (u32 r = 0; r < R; ++r) {
                    t[a][r] = W::template load_unit<A>(rows[r], nb, u);
                }
            }
        }
        // Activations k0 .. k0 + ROUND of every row (zeros past k and for rows >= m),
        // and their group sums: a group's float4s are consecutive v, so consecutive
        // lanes. All of a thread's loads are issued before the first is used.
        float4 p[STAGED];
#pragma unroll
        for (u32 j = 0; j < STAGED; ++j) {
            const u32 v = threadIdx.x + j * MATVEC_THREADS;
            const u32 i = v / (ROUND / 4), e = v % (ROUND / 4) * 4;
            p[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (i < m && k0 + e < k) {
                p[j] = xq8 != nullptr ? q8_1_float4(xq8, (u64)i * k + k0 + e)
                                      : *reinterpret_cast<const float4*>(x + (u64)i * k + k0 + e);
            }
        }
#pragma unroll
        for (u32 j = 0; j < STAGED; ++j) {
            const u32 v = threadIdx.x + j * MATVEC_THREADS;
            const u32 i = v / (ROUND / 4), e = v % (ROUND / 4) * 4;
            stage_activations<W>(p[j], v, i, e, true, 32 * U, xs, sums);
        }
        __syncthreads();
#pragma unroll
        for (u32 a = 0; a < U; ++a) {
            if (active && u0 + lane + 32 * a < units) {
                const u32 unit = lane + 32 * a;
                accumulate_unit<W, M, R>(t[a], xs + unit * (W::UNIT_ELEMS + PACKED_PAD), STRIDE,
                                         sums + unit, 32 * U, GROUPS, acc);
            }
        }
        __syncthreads();  // the next round overwrites xs
    }
    if (!active) {
        return;  // the whole warp, after the last barrier
    }
#pragma unroll
    for (u32 r = 0; r < R; ++r) {
#pragma unroll
        for (u32 i = 0; i < M; ++i) {
            const float s = warp_sum(acc[r][i]);
            if (lane == 0 && row0 + r < n && i < m) {
                out[(u64)i * n + row0 + r] = bias ? s + bias[row0 + r] : s;
            }
        }
    }
}

template <typename W, u32 M, u32 R, bool ALIGNED>
__global__ void __launch_bounds__(MATVEC_THREADS)
    matvec_packed(const u8* __restrict__ w, const float* __restrict__ x,
                  const u8* __restrict__ xq8, const float* __restrict__ bias,
                  float* __restrict__ out, u32 m, u32 n, u32 k, u64 row_bytes) {
    chain_after_prior_grids(x, xq8);
    matvec_packed_block<W, M, R, ALIGNED>(w, x, xq8, bias, out, m, n, k, row_bytes);
}

// The operands of slot blockIdx.y of an expert-routed mat-vec (kiln_core::ops::MoeMatMul):
// the stacked weight's [rows, cols] slice of expert ids[s] (experts' rows follow each
// other, each in the layout it was uploaded in), the slot's activation row (x row s
// when per_slot, else its token's row s / k) and its output row s. `w` is null for an
// id outside 0..n_expert.
struct RoutedSlot {
    const u8* w;
    const float* x;
    float* out;
};

__device__ __forceinline__ RoutedSlot routed_slot(const u8* w, const int* ids, const float* x,
                                                  float* out, u32 k, u32 per_slot,
                                                  u32 n_expert, u32 rows, u32 cols,
                                                  u64 row_bytes) {
    const u32 s = blockIdx.y;
    const int id = ids[s];
    const bool valid = id >= 0 && (u32)id < n_expert;
    return {valid ? w + (u64)id * rows * row_bytes : nullptr,
            x + (u64)(per_slot ? s : s / k) * cols, out + (u64)s * rows};
}

// Writes NaN to rows first .. first + count (those below `rows`) of `out`.
__device__ __forceinline__ void poison_rows(float* out, u32 first, u32 count, u32 rows) {
    for (u32 r = threadIdx.x; r < count; r += blockDim.x) {
        if (first + r < rows) {
            out[first + r] = __int_as_float(0x7fffffff);
        }
    }
}

// Expert-routed mat-vec: grid (blocks of matvec's grid for `rows` weight rows, m * k
// slots); block (bx, s) computes block bx of slot s's product as matvec does for one
// activation row (routed_slot). An expert id out of range gives NaN rows.
template <typename W, u32 ROWS, u32 LOAD, u32 STAGES>
__global__ void __launch_bounds__(MATVEC_THREADS)
    moe_matvec(const u8* __restrict__ w, const int* __restrict__ ids,
               const float* __restrict__ x, float* __restrict__ out, u32 k, u32 per_slot,
               u32 n_expert, u32 rows, u32 cols, u64 row_bytes) {
    chain_after_prior_grids(x, ids);
    const RoutedSlot slot = routed_slot(w, ids, x, out, k, per_slot, n_expert, rows, cols,
                                        row_bytes);
    if (slot.w == nullptr) {
        poison_rows(slot.out, blockIdx.x * ROWS, ROWS, rows);
        return;
    }
    matvec_block<W, 1, ROWS, LOAD, STAGES>(slot.w, slot.x, nullptr, nullptr, slot.out, 1, rows,
                                           cols, row_bytes);
}

// moe_matvec for weights in the planes layout, as matvec_packed computes one activation
// row (grid: matvec_packed's blocks for `rows` weight rows, m * k slots).
template <typename W, u32 R, bool ALIGNED>
__global__ void __launch_bounds__(MATVEC_THREADS)
    moe_matvec_packed(const u8* __restrict__ w, const int* __restrict__ ids,
                      const float* __restrict__ x, float* __restrict__ out, u32 k,
                      u32 per_slot, u32 n_expert, u32 rows, u32 cols, u64 row_bytes) {
    chain_after_prior_grids(x, ids);
    const RoutedSlot slot = routed_slot(w, ids, x, out, k, per_slot, n_expert, rows, cols,
                                        row_bytes);
    if (slot.w == nullptr) {
        constexpr u32 BLOCK_ROWS = R * MATVEC_THREADS / 32;
        poison_rows(slot.out, blockIdx.x * BLOCK_ROWS, BLOCK_ROWS, rows);
        return;
    }
    matvec_packed_block<W, 1, R, ALIGNED>(slot.w, slot.x, nullptr, nullptr, slot.out, 1, rows,
                                          cols, row_bytes);
}

// Units of W a lane of matvec_resident loads per step: the next step's units are in
// flight while these are used.
template <typename W>
__host__ __device__ constexpr u32 resident_units() {
    return W::UNITS_IN_FLIGHT > 1 ? W::UNITS_IN_FLIGHT / 2 : 1;
}

// Bytes of a unit's activations in matvec_resident's shared memory: its UNIT_ELEMS
// int8 quants and 16 bytes of padding, so that lanes reading consecutive units with
// 16-byte loads touch distinct banks.
template <typename W>
__host__ __device__ constexpr u32 resident_unit_bytes() {
    return W::UNIT_ELEMS + 16;
}

// Where matvec_resident keeps x, rounded to Q8_1 (common.cuh), in shared memory for
// `units` units of k: unit u's quants at img + u * resident_unit_bytes<W>(); then, as
// f32, the scale d of group g of unit u at xd[g * units + u] and d times the sum of
// the group's quants at xds[g * units + u] (xd = img + units * resident_unit_bytes<W>(),
// xds = xd + units * UNIT_ELEMS / GROUP_ELEMS). d is the f16 scale widened, so that
// d * q is exactly the decoded Q8_1 value.
template <typename W>
struct ResidentImage {
    static constexpr u32 GROUPS_PER_UNIT = W::UNIT_ELEMS / W::GROUP_ELEMS;
    static_assert(Q8_1_BLOCK_ELEMS % W::GROUP_ELEMS == 0, "a scale group lies in one block");

    u8* img;
    u32 units;

    // Stores the 4 quants at element e (a multiple of 4), packed one per byte.
    __device__ __forceinline__ void quants(u32 e, u32 packed) const {
        *reinterpret_cast<u32*>(img + e / W::UNIT_ELEMS * resident_unit_bytes<W>() +
                                e % W::UNIT_ELEMS) = packed;
    }

    // Stores the scale d and the quant sum of the group starting at element e.
    __device__ __forceinline__ void group(u32 e, float d, int sum) const {
        float* xd = reinterpret_cast<float*>(img + units * resident_unit_bytes<W>());
        const u32 at = (e % W::UNIT_ELEMS) / W::GROUP_ELEMS * units + e / W::UNIT_ELEMS;
        xd[at] = d;
        xd[units * GROUPS_PER_UNIT + at] = d * (float)sum;
    }
};

// Copies the Q8_1 block at `block` (elements e .. e + 31 of x, 4-byte aligned) into
// `image`, summing each scale group's quants.
template <typename W>
__device__ __forceinline__ void copy_q8_1_block(const u8* block, u32 e,
                                                const ResidentImage<W>& image) {
    constexpr u32 WORDS = Q8_1_BLOCK_ELEMS / 4;
    constexpr u32 GROUP_WORDS = W::GROUP_ELEMS / 4;
    const float d = f16_bits_to_f32((u16)(load_u32<4>(block) & 0xffffu));
    u32 q[WORDS];
#pragma unroll
    for (u32 j = 0; j < WORDS; ++j) {
        q[j] = load_u32<4>(block + 4 + 4 * j);
    }
#pragma unroll
    for (u32 g = 0; g < WORDS / GROUP_WORDS; ++g) {
        int sum = 0;
#pragma unroll
        for (u32 j = g * GROUP_WORDS; j < (g + 1) * GROUP_WORDS; ++j) {
            image.quants(e + 4 * j, q[j]);
            sum = __dp4a((int)q[j], 0x01010101, sum);
        }
        image.group(e + g * W::GROUP_ELEMS, d, sum);
    }
}

// a . b over 4 byte pairs, a's bytes unsigned and b's signed, plus c.
__device__ __forceinline__ int dot4_u8_s8(u32 a, u32 b, int c) {
    int r;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Rounds float4 o, elements e .. e + 3 of x (e a multiple of 4, held as
// store_q8_1_block4's lanes hold a block), to Q8_1 into `image`, exactly as
// store_q8_1_block4 then copy_q8_1_block would. Every lane of the warp must call it;
// only lanes with `store` write.
template <typename W>
__device__ __forceinline__ void stage_q8_1_quad(float4 o, bool store, u32 e,
                                                const ResidentImage<W>& image) {
    constexpr u32 GROUP_LANES = W::GROUP_ELEMS / 4;
    const Q8_1Quad r = round_q8_1_quad(o);
    int sum = (r.q0 + r.q1) + (r.q2 + r.q3);
    for (u32 offset = GROUP_LANES / 2; offset > 0; offset >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (store) {
        image.quants(e, r.packed());
        if ((threadIdx.x & (GROUP_LANES - 1)) == 0) {
            image.group(e, f16_bits_to_f32(f32_to_f16_bits(r.d)), sum);
        }
    }
}

// Stages x's Q8_1 copy (k / 32 blocks at xq8) into `image`.
template <typename W, u32 THREADS>
struct StageQ8Copy {
    const u8* xq8;

    __device__ __forceinline__ void operator()(u32 k, const ResidentImage<W>& image) {
        chain_after_prior_grids(xq8);
        for (u32 b = threadIdx.x; b < k / Q8_1_BLOCK_ELEMS; b += THREADS) {
            copy_q8_1_block<W>(xq8 + (u64)b * Q8_1_BLOCK_BYTES, b * Q8_1_BLOCK_ELEMS, image);
        }
    }
};

// Stages kiln_core::ops::AddRmsNorm of one row of k elements (k a multiple of 128, at
// most 4 * RESIDENT_NORM_VECTORS * THREADS), computed by every block, into `image`,
// rounded to Q8_1 as norm.cu's rms_norm rounds its out_q8: v = x + residual (stored to
// sum by block 0), out = v * (1 / sqrt(mean(v^2) + eps)) * weight.
template <typename W, u32 THREADS>
struct StageAddNorm {
    const float* x;
    const float* residual;
    const float* weight;
    float* sum;
    float eps;

    __device__ __forceinline__ void operator()(u32 k, const ResidentImage<W>& image) {
        chain_after_prior_grids(x, residual, sum);
        const u32 vectors = k / 4;
        float4 v[RESIDENT_NORM_VECTORS];
        float squares = 0.0f;
#pragma unroll
        for (u32 j = 0; j < RESIDENT_NORM_VECTORS; ++j) {
            const u32 i = threadIdx.x + j * THREADS;
            v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (i < vectors) {
                const float4 a = reinterpret_cast<const float4*>(x)[i];
                const float4 r = reinterpret_cast<const float4*>(residual)[i];
                v[j] = make_float4(a.x + r.x, a.y + r.y, a.z + r.z, a.w + r.w);
            }
        }
#pragma unroll
        for (u32 j = 0; j < RESIDENT_NORM_VECTORS; ++j) {
            const u32 i = threadIdx.x + j * THREADS;
            if (i < vectors) {
                if (blockIdx.x == 0) {
                    reinterpret_cast<float4*>(sum)[i] = v[j];
                }
                squares += v[j].x * v[j].x;
                squares += v[j].y * v[j].y;
                squares += v[j].z * v[j].z;
                squares += v[j].w * v[j].w;
            }
        }
        const float scale = 1.0f / sqrtf(block_sum(squares) / (float)k + eps);
#pragma unroll
        for (u32 j = 0; j < RESIDENT_NORM_VECTORS; ++j) {
            const u32 i = threadIdx.x + j * THREADS;
            if (j * THREADS >= vectors) {
                break;  // block-uniform
            }
            const bool live = i < vectors;
            const float4 w = live ? reinterpret_cast<const float4*>(weight)[i]
                                  : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
            const float4 o = make_float4(v[j].x * scale * w.x, v[j].y * scale * w.y,
                                         v[j].z * scale * w.z, v[j].w * scale * w.w);
            stage_q8_1_quad<W>(o, live, 4 * i, image);
        }
    }
};

// What resident_matvec does with the sum of each row of its product.
//
// StoreRows: row r of the weight is row r of the product, stored as out[r] (+ bias[r]).
struct StoreRows {
    const float* bias;
    float* out;

    // The bytes of the row's weight row, w being the weight.
    __device__ __forceinline__ const u8* weight(const u8* w, u32 row, u64 row_bytes) const {
        return w + (u64)row * row_bytes;
    }

    // Every lane of the warp calls it with the row's sum s.
    __device__ __forceinline__ void store(u32 row, float s) const {
        if ((threadIdx.x & 31u) == 0) {
            out[row] = bias ? s + bias[row] : s;
        }
    }

    // Every lane of the warp calls it after the warp's rows begin .. end.
    __device__ __forceinline__ void finish(u32 begin, u32 end) const {}
};

// The atomic add of v to *p at device scope with acquire-release semantics: the
// caller's writes before it are visible to whoever sees the count it leaves, and what
// was written before the counts it sees is visible to the caller. Returns the old value.
__device__ __forceinline__ u32 ticket_add(u32* p, u32 v) {
    u32 old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
                 : "=r"(old)
                 : "l"(p), "r"(v)
                 : "memory");
    return old;
}

// Adds `count` to the ticket at t (lane 0, ticket_add) and returns, to every lane,
// whether that completed its `size`; a warp that completed it has fenced, so that what
// the other warps stored before their counts is visible to its reads through L2
// (__ldcg). Every lane of the warp calls it.
__device__ __forceinline__ bool warp_ticket(u32* t, u32 count, u32 size) {
    u32 last = 0;
    if ((threadIdx.x & 31u) == 0) {
        // Lane 0 stored every row of the warp: the release covers them.
        last = ticket_add(t, count) + count == size;
    }
    const bool done = __shfl_sync(0xffffffffu, last, 0) != 0;
    if (done) {
        __threadfence();
    }
    return done;
}

// TicketRows: the product's rows in groups (Group::rows() each), with work on each
// group's stored rows in the product's epilogue. Each row is stored to out (+ bias) as
// StoreRows stores it, in the order Group::weight_row gives. After its last row, a
// warp adds the rows it stored in each group to the group's ticket (tickets hold zero
// before the launch); the warp that completes a group's count runs Group::apply on it,
// reading out through L2, and puts the ticket back to zero.
template <typename Group>
struct TicketRows {
    const float* bias;
    float* out;
    u32* tickets;
    Group group;

    __device__ __forceinline__ const u8* weight(const u8* w, u32 row, u64 row_bytes) const {
        return w + (u64)group.weight_row(row) * row_bytes;
    }

    __device__ __forceinline__ void store(u32 row, float s) const {
        if ((threadIdx.x & 31u) == 0) {
            const u32 r = group.weight_row(row);
            out[r] = bias ? s + bias[r] : s;
        }
    }

    __device__ __forceinline__ void finish(u32 begin, u32 end) const {
        if (begin >= end) {
            return;
        }
        const u32 size = group.rows();
        for (u32 g = begin / size; g <= (end - 1) / size; ++g) {
            const u32 count = min(end, (g + 1) * size) - max(begin, g * size);
            if (warp_ticket(tickets + g, count, size)) {
                group.apply(g, out);
                if ((threadIdx.x & 31u) == 0) {
                    tickets[g] = 0;
                }
            }
        }
    }
};

// GluGroup: a gate-up product (kiln_core::ops::Glu's x: gate in rows 0 .. half, up in
// rows half .. 2 half, half a multiple of 32) walked in GLU_GROUP_ROWS-row groups:
// group g's rows are gate rows 32 g .. 32 g + 31, then up rows half + 32 g .. + 31.
// A group's work is its 32 outputs glu_out[i] = F(out[i], out[half + i]), rounded to
// one Q8_1 block of glu_q8 when that is not null, as the Glu kernel computes them.
template <typename F>
struct GluGroup {
    float* glu_out;
    u8* glu_q8;
    u32 half;

    static constexpr u32 HALF_ROWS = GLU_GROUP_ROWS / 2;

    __device__ __forceinline__ u32 rows() const { return GLU_GROUP_ROWS; }

    __device__ __forceinline__ u32 weight_row(u32 row) const {
        const u32 j = row % GLU_GROUP_ROWS;
        return row / GLU_GROUP_ROWS * HALF_ROWS + (j < HALF_ROWS ? j : half + j - HALF_ROWS);
    }

    __device__ __forceinline__ void apply(u32 g, const float* out) const {
        const u32 i = g * HALF_ROWS + (threadIdx.x & 31u);
        const float o = F::apply(__ldcg(out + i), __ldcg(out + half + i));
        glu_out[i] = o;
        if (glu_q8 != nullptr) {
            store_q8_1_block(o, glu_q8 + (u64)g * Q8_1_BLOCK_BYTES);
        }
    }
};

// RopeAppendGroup: a q-k-v product of one token (kiln_core::ops::QkvRopeAppend's qkv),
// in groups of one head (head_dim rows), whose work is that head's rope_append_head.
template <bool NeoX, typename C>
struct RopeAppendGroup {
    QkvRopeAppendArgs<C> a;

    __device__ __forceinline__ u32 rows() const { return a.head_dim; }

    __device__ __forceinline__ u32 weight_row(u32 row) const { return row; }

    __device__ __forceinline__ void apply(u32 g, const float* out) const {
        const float* head = out + (u64)g * a.head_dim;
        rope_append_head<NeoX>(a, 0, g, [&](u32 i) { return __ldcg(head + i); });
    }
};

// SiblingRows: up to four (MAX_SIBLINGS) products of the same activation row by
// weights of one format and width, one after another: rows end[s - 1] .. end[s] (from
// 0 for s = 0) are product s's rows of weight w[s], stored to out[s] (+ bias[s]) as
// StoreRows stores them. Segments past the last product end where it ends. (Each of
// the four is a member of its own, picked by comparisons: an array indexed at run time
// would sit in local memory.)
struct SiblingRows {
    const u8 *w0, *w1, *w2, *w3;
    const float *b0, *b1, *b2, *b3;
    float *o0, *o1, *o2, *o3;
    u32 e0, e1, e2;

    template <typename T>
    static __device__ __forceinline__ T pick(u32 s, T a, T b, T c, T d) {
        return s == 0 ? a : s == 1 ? b : s == 2 ? c : d;
    }

    // The product of `row` and its first row.
    __device__ __forceinline__ u32 segment(u32 row, u32& first) const {
        const u32 s = (u32)(row >= e0) + (u32)(row >= e1) + (u32)(row >= e2);
        first = pick(s, 0u, e0, e1, e2);
        return s;
    }

    __device__ __forceinline__ const u8* weight(const u8*, u32 row, u64 row_bytes) const {
        u32 first;
        const u32 s = segment(row, first);
        return pick(s, w0, w1, w2, w3) + (u64)(row - first) * row_bytes;
    }

    __device__ __forceinline__ void store(u32 row, float v) const {
        if ((threadIdx.x & 31u) == 0) {
            u32 first;
            const u32 s = segment(row, first);
            const u32 r = row - first;
            const float* bias = pick(s, b0, b1, b2, b3);
            pick(s, o0, o1, o2, o3)[r] = bias ? v + bias[r] : v;
        }
    }

    __device__ __forceinline__ void finish(u32, u32) const {}
};

// The mat-vec of a packed weight for one activation row rounded to Q8_1, held in
// shared memory (ResidentImage, written by `stage`: StageQ8Copy or StageAddNorm), and
// the products of each run of 4 quants with 4 rounded activations summed in integers
// (dp4a); `rows` (StoreRows or TicketRows) maps the product's rows to the weight's and
// stores each row's sum.
// Grid: any number of blocks of THREADS; warp w of the grid's G warps owns weight rows
// w * P .. (w + 1) * P (P = ceil(n / G)), so a grid of at most one wave gives every
// warp the same work and no block waits on another. Dynamic shared memory:
// k / UNIT_ELEMS * resident_unit_bytes<W>() + 8 * k / GROUP_ELEMS bytes, in
// ResidentImage's layout. ALIGNED: every plane of every row starts at a multiple of
// 16 bytes.
//
// Each lane issues the loads of its first units, then the block stages x into shared
// memory (`stage` waits for the prior grids); after one barrier every warp walks its
// rows in steps of 32 * U units, a lane's next units in flight while it accumulates the
// current ones, and hands each row's sum to `rows` as it finishes the row. Per scale group of a unit the lane adds
// scale * d * sum q_w q_x + zero * d * sum q_x (weights scale * q_w + zero).
template <typename W, bool ALIGNED, u32 THREADS, typename Stage, typename Rows>
__device__ __forceinline__ void resident_matvec(const u8* __restrict__ w, Stage stage, Rows rows,
                                                u32 n, u32 k, u64 row_bytes) {
    constexpr u32 A = ALIGNED ? 16 : 2;
    constexpr u32 U = resident_units<W>();
    constexpr u32 WARPS = THREADS / 32;
    constexpr u32 UNIT_BYTES = resident_unit_bytes<W>();
    constexpr u32 GROUPS_PER_UNIT = W::UNIT_ELEMS / W::GROUP_ELEMS;
    constexpr u32 RUNS_PER_GROUP = W::GROUP_ELEMS / 4;
    typedef typename W::Unit Unit;
    extern __shared__ __align__(16) u8 img[];

    const u32 units = k / W::UNIT_ELEMS;
    const u32 nb = k / W::BLOCK_ELEMS;
    const float* xd = reinterpret_cast<const float*>(img + units * UNIT_BYTES);
    const float* xds = xd + units * GROUPS_PER_UNIT;

    const u32 lane = threadIdx.x & 31u;
    const u32 warps = gridDim.x * WARPS;
    const u32 per_warp = n / warps + (n % warps != 0);
    const u32 warp = blockIdx.x * WARPS + threadIdx.x / 32;
    const u32 row_end = (u32)min((u64)n, (u64)(warp + 1) * per_warp);
    const u32 row_begin = (u32)min((u64)row_end, (u64)warp * per_warp);
    u32 row = row_begin;

    // The step at `row`, units c0 + lane + 32 a (c0 warp-uniform), into t.
    auto load_step = [&](u32 at_row, u32 c0, Unit (&t)[U]) {
        const u8* r = rows.weight(w, at_row, row_bytes);
#pragma unroll
        for (u32 a = 0; a < U; ++a) {
            if (c0 + lane + 32 * a < units) {
                t[a] = W::template load_unit<A>(r, nb, c0 + lane + 32 * a);
            }
        }
    };
    Unit cur[U], next[U];
    u32 c0 = 0;
    if (row < row_end) {
        load_step(row, c0, cur);
    }
    const ResidentImage<W> image{img, units};
    stage(k, image);  // the first step's weights are in flight
    __syncthreads();

    float acc = 0.0f;
    while (row < row_end) {
        u32 next_row = row, next_c0 = c0 + 32 * U;
        if (next_c0 >= units) {
            ++next_row;
            next_c0 = 0;
        }
        if (next_row < row_end) {
            load_step(next_row, next_c0, next);
        }
#pragma unroll
        for (u32 a = 0; a < U; ++a) {
            const u32 unit = c0 + lane + 32 * a;
            if (unit < units) {
                const u8* xq = img + unit * UNIT_BYTES;
#pragma unroll
                for (u32 g = 0; g < GROUPS_PER_UNIT; ++g) {
                    int dot = 0;
#pragma unroll
                    for (u32 j = g * RUNS_PER_GROUP; j < (g + 1) * RUNS_PER_GROUP; ++j) {
                        const u32 xq4 = *reinterpret_cast<const u32*>(xq + W::run_elem(j));
                        dot = dot4_u8_s8(W::run(cur[a], j), xq4, dot);
                    }
                    float scale, zero;
                    W::group(cur[a], g, scale, zero);
                    const u32 at = g * units + unit;
                    acc = fmaf(scale * xd[at], (float)dot, fmaf(zero, xds[at], acc));
                }
            }
        }
        if (next_row != row) {
            rows.store(row, warp_sum(acc));
            acc = 0.0f;
        }
#pragma unroll
        for (u32 a = 0; a < U; ++a) {
            cur[a] = next[a];
        }
        row = next_row;
        c0 = next_c0;
    }
    rows.finish(row_begin, row_end);
}

// resident_matvec of x's Q8_1 copy xq8. m must be 1.
template <typename W, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident(const u8* __restrict__ w, const u8* __restrict__ xq8,
                    const float* __restrict__ bias,
                    float* __restrict__ out, u32 m, u32 n, u32 k, u64 row_bytes) {
    resident_matvec<W, ALIGNED, THREADS>(w, StageQ8Copy<W, THREADS>{xq8}, StoreRows{bias, out},
                                         n, k, row_bytes);
}

// Up to MAX_SIBLINGS kiln_core::ops::MatMul of x's Q8_1 copy xq8 (one row) by weights
// of one format with rows of k elements, in one launch: resident_matvec over their n
// rows with SiblingRows (product s: weight w_s, bias b_s (or null), out o_s, its rows
// ending at e_s of the n; unused products null, ending at n; e3 is n, kept so that
// the four products' parameters read alike).
template <typename W, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident_siblings(const u8* __restrict__ xq8, const u8* w0, const u8* w1,
                             const u8* w2, const u8* w3, const float* b0, const float* b1,
                             const float* b2, const float* b3, float* o0, float* o1, float* o2,
                             float* o3, u32 e0, u32 e1, u32 e2, u32 e3, u32 n, u32 k,
                             u64 row_bytes) {
    static_assert(MAX_SIBLINGS == 4, "the parameters name four products");
    const SiblingRows rows = {w0, w1, w2, w3, b0, b1, b2, b3, o0, o1, o2, o3, e0, e1, e2};
    resident_matvec<W, ALIGNED, THREADS>(nullptr, StageQ8Copy<W, THREADS>{xq8}, rows, n, k,
                                         row_bytes);
}

// kiln_core::ops::AddRmsNorm of one row (F32 x, residual and weight of k elements;
// the sum stored to `sum`) fused with the kiln_core::ops::MatMul of its Q8_1 copy:
// resident_matvec, each block staging x with StageAddNorm instead of reading a copy.
// The norm's f32 output and Q8_1 copy are not written.
template <typename W, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident_add_norm(const u8* __restrict__ w, const float* __restrict__ x,
                             const float* __restrict__ residual,
                             const float* __restrict__ norm_weight, float* __restrict__ sum,
                             float eps, const float* __restrict__ bias,
                             float* __restrict__ out, u32 n, u32 k, u64 row_bytes) {
    resident_matvec<W, ALIGNED, THREADS>(
        w, StageAddNorm<W, THREADS>{x, residual, norm_weight, sum, eps}, StoreRows{bias, out}, n,
        k, row_bytes);
}

// kiln_core::ops::MatMul of x's Q8_1 copy xq8 (one row) by a gate-up weight of n = 2
// half rows, fused with the kiln_core::ops::Glu of its output: resident_matvec with
// TicketRows<GluGroup<F>>. Writes out (n values) as the product does and glu_out (half
// values) and glu_q8 (null, or half / 32 Q8_1 blocks) as the Glu does. tickets: n / 64
// zeros, zeros again when the launch ends.
template <typename W, typename F, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident_glu(const u8* __restrict__ w, const u8* __restrict__ xq8,
                        const float* __restrict__ bias, float* out, u32* tickets,
                        float* __restrict__ glu_out, u8* __restrict__ glu_q8, u32 n, u32 k,
                        u64 row_bytes) {
    resident_matvec<W, ALIGNED, THREADS>(
        w, StageQ8Copy<W, THREADS>{xq8},
        TicketRows<GluGroup<F>>{bias, out, tickets, {glu_out, glu_q8, n / 2}}, n, k, row_bytes);
}

// matvec_resident_add_norm's norm, product and matvec_resident_glu's Glu in one launch.
template <typename W, typename F, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident_add_norm_glu(const u8* __restrict__ w, const float* __restrict__ x,
                                 const float* __restrict__ residual,
                                 const float* __restrict__ norm_weight, float* __restrict__ sum,
                                 float eps, const float* __restrict__ bias, float* out,
                                 u32* tickets, float* __restrict__ glu_out,
                                 u8* __restrict__ glu_q8, u32 n, u32 k, u64 row_bytes) {
    resident_matvec<W, ALIGNED, THREADS>(
        w, StageAddNorm<W, THREADS>{x, residual, norm_weight, sum, eps},
        TicketRows<GluGroup<F>>{bias, out, tickets, {glu_out, glu_q8, n / 2}}, n, k, row_bytes);
}

// The kiln_core::ops::QkvRopeAppend operands of a fused launch, in rope.cu's
// qkv_rope_append's order (qkv is the product's out; one token).
#define KILN_ROPE_APPEND_PARAMS                                                              \
    const int* __restrict__ positions, const int* slots,                                    \
        const float* __restrict__ freq_factors, const float* __restrict__ q_weight,          \
        const float* __restrict__ k_weight, float* __restrict__ q_out,                       \
        typename C::storage* __restrict__ k_cache, typename C::storage* __restrict__ v_cache, \
        u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 rotary_dim, float base,               \
        float freq_scale, float rope_eps, u32 capacity, u32 n_slots
#define KILN_ROPE_APPEND_GROUP                                                        \
    RopeAppendGroup<NeoX, C> {                                                        \
        {positions, slots,      freq_factors, q_weight,  k_weight, q_out,      k_cache, \
         v_cache,   1,          n_heads,      n_kv_heads, head_dim, rotary_dim, base,    \
         freq_scale, rope_eps, capacity,     n_slots}                                  \
    }

// kiln_core::ops::MatMul of x's Q8_1 copy xq8 (one row) by a q-k-v weight of n = (n_heads
// + 2 n_kv_heads) head_dim rows, fused with the kiln_core::ops::QkvRopeAppend of its
// output (one token): resident_matvec with TicketRows<RopeAppendGroup>. Writes out (n
// values) as the product does and q_out and the caches' rows as the op does. tickets:
// n / head_dim zeros, zeros again when the launch ends.
template <typename W, bool NeoX, typename C, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident_rope_append(const u8* __restrict__ w, const u8* __restrict__ xq8,
                                const float* __restrict__ bias, float* out, u32* tickets,
                                KILN_ROPE_APPEND_PARAMS, u32 n, u32 k, u64 row_bytes) {
    resident_matvec<W, ALIGNED, THREADS>(
        w, StageQ8Copy<W, THREADS>{xq8},
        TicketRows<RopeAppendGroup<NeoX, C>>{bias, out, tickets, KILN_ROPE_APPEND_GROUP}, n, k,
        row_bytes);
}

// matvec_resident_add_norm's norm, product and matvec_resident_rope_append's
// QkvRopeAppend in one launch.
template <typename W, bool NeoX, typename C, bool ALIGNED, u32 THREADS, u32 MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    matvec_resident_add_norm_rope_append(const u8* __restrict__ w, const float* __restrict__ x,
                                         const float* __restrict__ residual,
                                         const float* __restrict__ norm_weight,
                                         float* __restrict__ sum, float eps,
                                         const float* __restrict__ bias, float* out,
                                         u32* tickets, KILN_ROPE_APPEND_PARAMS, u32 n, u32 k,
                                         u64 row_bytes) {
    resident_matvec<W, ALIGNED, THREADS>(
        w, StageAddNorm<W, THREADS>{x, residual, norm_weight, sum, eps},
        TicketRows<RopeAppendGroup<NeoX, C>>{bias, out, tickets, KILN_ROPE_APPEND_GROUP}, n, k,
        row_bytes);
}

#undef KILN_ROPE_APPEND_PARAMS
#undef KILN_ROPE_APPEND_GROUP

// The routed packed mat-vec of `slot` (moe_matvec_packed's, one activation row), each
// warp's R rows stored by its lane 0 (NaN for an expert id out of range, the warp's own
// rows, so that the warp's counts on tickets cover them). Returns the warp's first row.
template <typename W, u32 R, bool ALIGNED>
__device__ __forceinline__ u32 routed_rows(const RoutedSlot& slot, u32 rows, u32 cols,
                                           u64 row_bytes) {
    const u32 row0 = (blockIdx.x * (MATVEC_THREADS / 32) + threadIdx.x / 32) * R;
    if (slot.w == nullptr) {
        for (u32 r = 0; r < R && row0 + r < rows && (threadIdx.x & 31u) == 0; ++r) {
            slot.out[row0 + r] = __int_as_float(0x7fffffff);
        }
    } else {
        matvec_packed_block<W, 1, R, ALIGNED>(slot.w, slot.x, nullptr, nullptr, slot.out, 1,
                                              rows, cols, row_bytes);
    }
    return row0;
}

// moe_matvec_packed fused with the kiln_core::ops::Glu of its output (the slots'
// gate-up products, [slots, 2 half]) into act ([slots, half]): after storing its rows,
// each warp counts each on the ticket of its slot's group r / 32 (gate row r and up row
// half + r in the same group; tickets: slots * half / 32 zeros, zeros again at the end),
// and the warp that completes a group (GLU_GROUP_ROWS rows) writes its 32 values as the
// Glu kernel computes them. A slot of an expert id out of range gets NaN rows and their
// gated values.
template <typename W, typename F, u32 R, bool ALIGNED>
__global__ void __launch_bounds__(MATVEC_THREADS)
    moe_matvec_packed_glu(const u8* __restrict__ w, const int* __restrict__ ids,
                          const float* __restrict__ x, float* out, u32* tickets,
                          float* __restrict__ act, u32 k, u32 per_slot, u32 n_expert, u32 rows,
                          u32 cols, u64 row_bytes) {
    chain_after_prior_grids(x, ids);
    const RoutedSlot slot = routed_slot(w, ids, x, out, k, per_slot, n_expert, rows, cols,
                                        row_bytes);
    const u32 row0 = routed_rows<W, R, ALIGNED>(slot, rows, cols, row_bytes);
    const u32 half = rows / 2;
    const GluGroup<F> glu{act + (u64)blockIdx.y * half, nullptr, half};
    u32* slot_tickets = tickets + (u64)blockIdx.y * (half / GluGroup<F>::HALF_ROWS);
    for (u32 r = row0; r < row0 + R && r < rows; ++r) {
        const u32 g = (r < half ? r : r - half) / GluGroup<F>::HALF_ROWS;
        if (warp_ticket(slot_tickets + g, 1, GLU_GROUP_ROWS)) {
            glu.apply(g, slot.out);
            if ((threadIdx.x & 31u) == 0) {
                slot_tickets[g] = 0;
            }
        }
    }
}


// moe_matvec_packed fused with the kiln_core::ops::MoeCombine, without residual or
// shared expert, of its output y ([tokens, k, rows], the slots' rows): combined[t, i] =
// sum_j weights[t, j] y[t, j, i]. After storing its rows, each warp counts each on the
// ticket of its token's group i / 32 (tickets: tokens * rows / 32 zeros, zeros again at
// the end; k * 32 rows a group), and the warp that completes a group writes its 32
// combined values as moe_combine computes them (add_routed). A slot of an expert id out
// of range gets NaN rows, counted like the others.
template <typename W, u32 R, bool ALIGNED>
__global__ void __launch_bounds__(MATVEC_THREADS)
    moe_matvec_packed_combine(const u8* __restrict__ w, const int* __restrict__ ids,
                              const float* __restrict__ x, float* out, u32* tickets,
                              const float* __restrict__ weights, float* __restrict__ combined,
                              u32 k, u32 per_slot, u32 n_expert, u32 rows, u32 cols,
                              u64 row_bytes) {
    chain_after_prior_grids(x, ids);
    const RoutedSlot slot = routed_slot(w, ids, x, out, k, per_slot, n_expert, rows, cols,
                                        row_bytes);
    const u32 row0 = routed_rows<W, R, ALIGNED>(slot, rows, cols, row_bytes);
    const u32 t = blockIdx.y / k;
    u32* token_tickets = tickets + (u64)t * (rows / Q8_1_BLOCK_ELEMS);
    for (u32 r = row0; r < row0 + R && r < rows; ++r) {
        const u32 g = r / Q8_1_BLOCK_ELEMS;
        if (warp_ticket(token_tickets + g, 1, k * Q8_1_BLOCK_ELEMS)) {
            const u32 i = g * Q8_1_BLOCK_ELEMS + (threadIdx.x & 31u);
            combined[(u64)t * rows + i] =
                add_routed(0.0f, weights, t, i, k, rows, [&](u64 p) { return __ldcg(out + p); });
            if ((threadIdx.x & 31u) == 0) {
                token_tickets[g] = 0;
            }
        }
    }
}

}  // namespace kiln
