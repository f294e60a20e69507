// Causal grouped-query attention of queries over a KV cache, as
// kiln_core::ops::Attention defines it:
//
//   query t (position p = positions[t]) of head h reads KV head g = h / group and the
//   cache rows j with first(p) <= j <= p, first(p) = window ? max(0, p + 1 - window) : 0;
//   s_j = scale * dot(q, k_j), then softcap * tanh(s_j / softcap) with a softcap;
//   out = sum_j softmax(s)_j v_j, all in f32 from the cache's values converted to f32.
//
// q and out are [n_tokens, n_heads, head_dim] f32; the caches [n_slots, n_kv_heads,
// capacity, head_dim] of element type C (F32 or F16), query t reading slot
// token_slot(slots, t) only. head_dim is a multiple of 8 and at most 256. A query whose
// position lies outside 0..capacity, or whose slot outside 0..n_slots, gets an output
// of zeros.
// When out_q8 is not null, both kernels also write out rounded to Q8_1 blocks
// (store_q8_1_block, store_q8_1_block4) into out_q8, from the f32 values they store;
// head_dim must then be a multiple of 32, so that no block straddles two heads.
//
// Two kernels compute it:
// - attention_decode (few queries): flash-decoding. Each block handles up to G query
//   heads sharing one KV head, so each K and V row is read once for all of them, and one
//   split of a query's visible rows; the grid holds the most splits the capacity needs,
//   and each block derives from the query's position how many are needed now (blocks
//   past that exit at once). Warps stream rows through cp.async rings with an online
//   softmax each; with several splits, the last block of a (query, head group) to finish
//   (an atomic ticket) merges the splits' partial results and resets its counter to 0.
// - attention_flash (many queries, F16 cache): FlashAttention-2 on tensor cores. A block
//   holds FA_ROWS (query, head) rows of one KV head, each warp 16 of them, and walks
//   their union of visible rows in tiles staged in shared memory by cp.async (two
//   stages); mma.sync m16n8k16 computes the scores and the weighted values with f16
//   operands and f32 sums, the online softmax runs in registers. Queries are scaled and
//   rounded to f16, and so are the softmax weights before they multiply V.
// - attention_prefill (many queries, F32 cache): a block holds 32 (query, head) rows of
//   one KV head and walks their union of visible rows in tiles of 16 staged in shared
//   memory, with an online softmax per row. CUDA cores, f32.
//
// The flash and prefill kernels number the rows of all slots of one KV head as one
// sequence, "virtual rows": row j of slot s is s * capacity + j (virtual_row_at gives
// its element offset), so that a query's visible rows are one range of them and a block
// whose queries lie in several slots walks the union of their ranges, jumping over the
// virtual rows none of them sees (next_seen).
//
// slots is written only by the host, never by an earlier kernel (see token_slot).
#include "reduce.cuh"

namespace kiln {

constexpr u32 MAX_HEAD_DIM = 256;

// The first cache row a query at position pos sees.
__device__ __forceinline__ u32 first_visible(u32 pos, u32 window) {
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// The element offset in a cache of column 0 of virtual row `row` (slot row / capacity,
// row row % capacity) of KV head kvh.
__device__ __forceinline__ u64 virtual_row_at(u32 row, u32 kvh, u32 n_kv_heads, u32 capacity,
                                              u32 head_dim) {
    const u32 slot = row / capacity;
    return (((u64)slot * n_kv_heads + kvh) * capacity + (row - slot * capacity)) * head_dim;
}

// A raw dot product turned into a score: scaled, then soft-capped when softcap > 0.
__device__ __forceinline__ float attention_score(float dot, float scale, float softcap) {
    const float s = scale * dot;
    return softcap > 0.0f ? softcap * tanhf(s / softcap) : s;
}

// Eight consecutive cache elements at p (16-byte aligned for F16, 32 for F32) as f32.
template <typename C>
__device__ __forceinline__ void load8(const typename C::storage* p, float* v) {
    if constexpr (sizeof(typename C::storage) == 2) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = C::load((u16)(w[i] & 0xffffu));
            v[2 * i + 1] = C::load((u16)(w[i] >> 16));
        }
    } else {
        const float4 a = *reinterpret_cast<const float4*>(p);
        const float4 b = *reinterpret_cast<const float4*>(p + 4);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

// ---------------------------------------------------------------------------------------
// attention_decode
//
// Grid (splits, n_kv_heads * ceil(group / G), n_tokens), AD_THREADS threads, dynamic
// shared memory decode_shared_bytes(G, LPR). The grid is sized by the host from the
// capacity (the most rows a query can see); each block reads its query's position and
// derives how many splits the visible rows need now:
//   active = min(gridDim.x, ceil(len / split_rows)),   len = p + 1 - first(p),
// and split s < active takes rows first + [s * len / active, (s + 1) * len / active).
// Blocks with s >= active exit at once, so one launch record serves every position.
// With active == 1 the block writes the output itself; otherwise every active block
// writes its unnormalised values ([token, head, split][head_dim] floats from `work`,
// split stride gridDim.x) and their max and sum (2 floats per [token, head, split],
// after all the values) and the last one to finish (an atomic ticket on
// counters[token * gridDim.y + blockIdx.y]) merges them and sets its counter back to 0,
// so counters are zero between launches without a host memset.
//
// Inside a block each warp streams its own tiles of T cache rows (tile w, w + 4, ... of
// the block's range) through an AD_STAGES-deep ring of cp.async copies in shared memory,
// with no block barrier until the end. Lane (slot, sub) of a warp (slot = lane / LPR,
// sub = lane % LPR) copies and reads columns 8 sub .. 8 sub + 7 of rows slot, slot + RPW,
// ... of a tile, 16-byte copies (two for F32), so each lane reads back only what it
// copied. Each slot keeps its own online softmax (in base 2) for the G query heads;
// slots, then warps, then splits are merged at the end.

constexpr u32 AD_WARPS = 4;
constexpr u32 AD_THREADS = AD_WARPS * 32;
constexpr u32 AD_STAGES = 4;        // copies of a warp in flight: AD_STAGES - 1 tiles
constexpr u32 AD_STAGE_BYTES = 4096;  // one tile of K and V rows of one warp
constexpr u32 AD_MIN_BLOCKS = 3;    // blocks per multiprocessor the registers allow
constexpr u32 AD_MAX_SPLITS = 64;

// Dynamic shared memory of attention_decode<C, G, LPR> in bytes: the warps' copy rings,
// then the block's queries as f32 [G][8 * LPR].
__host__ __device__ constexpr u32 decode_shared_bytes(u32 group, u32 lanes) {
    return AD_WARPS * AD_STAGES * AD_STAGE_BYTES + group * lanes * 8 * 4;
}

// 16 bytes from global `from` to shared `to` without waiting (cp.async, through L2 only),
// or 16 zero bytes where !valid (then nothing is read).
__device__ __forceinline__ void decode_copy16(u8* to, const void* from, bool valid) {
    const u32 shared = (u32)__cvta_generic_to_shared(to);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(from),
                 "r"(valid ? 16u : 0u));
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void decode_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most PENDING of this thread's committed groups are in flight.
template <u32 PENDING>
__device__ __forceinline__ void decode_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// Eight cache elements (one lane's chunk of a row) from global `from` to shared `to`:
// 16 bytes, or for F32 two halves of 16 bytes 512 bytes apart (the warp's 32 lanes copy
// each half to consecutive words, so that neither copies nor reads conflict on banks).
template <typename C>
__device__ __forceinline__ void decode_copy_chunk(u8* to, const typename C::storage* from,
                                                  bool valid) {
    decode_copy16(to, from, valid);
    if constexpr (sizeof(typename C::storage) == 4) {
        decode_copy16(to + 512, from + 4, valid);
    }
}

// The eight elements decode_copy_chunk copied to `at`, as f32.
template <typename C>
__device__ __forceinline__ void decode_load_chunk(const u8* at, float* v) {
    if constexpr (sizeof(typename C::storage) == 2) {
        load8<C>(reinterpret_cast<const typename C::storage*>(at), v);
    } else {
        const float4 a = *reinterpret_cast<const float4*>(at);
        const float4 b = *reinterpret_cast<const float4*>(at + 512);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

// Sums each of the N values of v over the LPR lanes of a segment (xor offsets O, O / 2,
// ... 1, O = LPR / 2 at the top) by halving exchanges: at each step a lane keeps one half
// of its values, sends the other half to its partner and adds what it receives. While
// more than one value is left they scatter; after that the steps are a plain butterfly.
// At the end lane `sub` of a segment holds in v[0 .. HOLD) the totals of values
// (sub / DUP) * HOLD + j, with HOLD = max(1, N / LPR) and DUP = max(1, LPR / N); lanes
// holding the same totals hold identical bits.
template <u32 O, u32 NCUR, u32 N>
__device__ __forceinline__ void decode_reduce_scatter(float (&v)[N], u32 sub) {
    if constexpr (O > 0) {
        if constexpr (NCUR > 1) {
            constexpr u32 HALF = NCUR / 2;
            const bool upper = (sub & O) != 0;
#pragma unroll
            for (u32 i = 0; i < HALF; ++i) {
                const float send = upper ? v[i] : v[i + HALF];
                const float keep = upper ? v[i + HALF] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
            }
            decode_reduce_scatter<O / 2, HALF, N>(v, sub);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
            decode_reduce_scatter<O / 2, 1, N>(v, sub);
        }
    }
}

constexpr float AD_LOG2E = 1.4426950408889634f;

// 2^x by the special-function unit alone (ex2.approx.ftz: relative error about 2^-22,
// results below 2^-126 flushed to 0, 2^-inf = 0): the online softmax's weights.
__device__ __forceinline__ float decode_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Adds 1 to a merge counter and returns its old value, with acquire and release
// semantics at GPU scope: the caller's block's partial results (ordered before the call
// by a block barrier) are released to, and every earlier ticket holder's acquired by,
// the block that takes the last ticket.
__device__ __forceinline__ u32 decode_ticket(u32* counter) {
    u32 old;
    asm volatile("atom.acq_rel.gpu.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    return old;
}

// Stores v as element i of a run of outputs `out` and, when `q8` (the run's Q8_1 copy,
// the run a whole number of blocks) is not null, rounds the warp's 32 values to block
// i / 32 of it. Every lane of the warp must call it with i % 32 its lane.
__device__ __forceinline__ void decode_store(float* out, u8* q8, u32 i, float v) {
    out[i] = v;
    if (q8 != nullptr) {
        store_q8_1_block(v, q8 + i / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
    }
}

// Stores v as elements 4 item .. 4 item + 3 of a run of outputs `out` where `on` and,
// when `q8` is not null, rounds each 8 consecutive lanes' values (items 8 b .. 8 b + 7,
// the lanes starting at a multiple of 8, all on or all off) to block b of the run's
// Q8_1 copy. Every lane of the warp must call it.
__device__ __forceinline__ void decode_store4(float* out, u8* q8, u32 item, float4 v, bool on) {
    if (on) {
        float* to = out + 4 * item;
        to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
    }
    if (q8 != nullptr) {
        store_q8_1_block4(v, on, q8 + item / 8 * Q8_1_BLOCK_BYTES);
    }
}

// G: query heads per block (1, 2, 4 or 8; a group runs in chunks of G). LPR: lanes per
// cache row (8, 16 or 32), head_dim <= 8 * LPR; lanes past head_dim / 8 hold zeros.
// `split_rows`: the fewest rows worth a split of its own.
template <typename C, u32 G, u32 LPR>
__global__ void __launch_bounds__(AD_THREADS, AD_MIN_BLOCKS)
    attention_decode(const float* __restrict__ q, const typename C::storage* __restrict__ k_cache,
                     const typename C::storage* __restrict__ v_cache,
                     const int* __restrict__ positions, const int* slots,
                     float* __restrict__ out, u8* __restrict__ out_q8, float* __restrict__ work,
                     u32* __restrict__ counters, u32 n_heads, u32 n_kv_heads, u32 head_dim,
                     u32 capacity, u32 n_slots, float scale, u32 window, float softcap,
                     u32 split_rows) {
    typedef typename C::storage S;
    constexpr u32 CHUNK = 8 * sizeof(S);                    // bytes of a lane's chunk
    constexpr u32 U = AD_STAGE_BYTES / (2 * 32 * CHUNK);    // rows per lane per tile
    constexpr u32 RPW = 32 / LPR;                           // row slots per warp
    constexpr u32 T = RPW * U;                              // rows per tile
    constexpr u32 N = U * G;                                // scores per slot per tile
    constexpr u32 HOLD = N >= LPR ? N / LPR : 1;            // totals a lane holds
    constexpr u32 DUP = N >= LPR ? 1 : LPR / N;             // lanes holding each total
    constexpr u32 LH = LPR / G;                             // lanes holding one head's totals
    constexpr u32 DMAX = 8 * LPR;
    static_assert(G <= LPR && U % HOLD == 0 && LPR <= 32, "attention_decode shape");

    chain_after_prior_grids(q, k_cache, v_cache, positions);
    extern __shared__ __align__(16) u8 decode_shared[];
    __shared__ float warp_max[AD_WARPS][G], warp_sum[AD_WARPS][G], warp_weight[AD_WARPS][G];
    __shared__ float head_max[G], head_sum[G];
    __shared__ float weights[G][AD_MAX_SPLITS];
    __shared__ bool last_block;

    const u32 splits = gridDim.x, split = blockIdx.x, t = blockIdx.z;
    const u32 group = n_heads / n_kv_heads;
    const u32 chunks = (group + G - 1) / G;
    const u32 kvh = blockIdx.y / chunks;
    const u32 h0 = kvh * group + (blockIdx.y % chunks) * G;
    const u32 nh = min(G, kvh * group + group - h0);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 slot = lane / LPR, sub = lane % LPR;
    // This block's outputs, nh * head_dim from out_t, and their copy (a multiple of 32
    // values from a multiple of 32, head_dim being one) or null.
    const u64 out_at = ((u64)t * n_heads + h0) * head_dim;
    float* out_t = out + out_at;
    u8* q8_t = out_q8 != nullptr ? out_q8 + out_at / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES : nullptr;

    const int p = positions[t];
    const int kv_slot = token_slot(slots, t, n_slots);
    if (p < 0 || (u32)p >= capacity || kv_slot < 0) {
        if (split == 0) {
            for (u32 i = threadIdx.x; i < nh * head_dim; i += AD_THREADS) {
                decode_store(out_t, q8_t, i, 0.0f);
            }
        }
        return;
    }
    const u32 pos = (u32)p;
    const u32 first = first_visible(pos, window);
    const u32 len = pos + 1 - first;
    const u32 active = (u32)min((u64)splits, ((u64)len + split_rows - 1) / split_rows);
    if (split >= active) {
        return;
    }
    const u32 begin = first + (u32)((u64)split * len / active);
    const u32 end = first + (u32)((u64)(split + 1) * len / active);

    // This warp's tiles and its copy ring. Tile s of the warp holds rows
    // begin + (warp + 4 s) T + u RPW + slot, u < U; this lane's chunk of the first row
    // of its slot is at lane_at in each cache, and `lane_rows` rows of the split lie at
    // or after that row.
    const u32 tiles = (end - begin + T - 1) / T;
    const u32 my_tiles = warp < tiles ? (tiles - warp + AD_WARPS - 1) / AD_WARPS : 0;
    u8* ring = decode_shared + warp * AD_STAGES * AD_STAGE_BYTES + lane * 16;
    const bool lane_on = sub < head_dim / 8;
    const int lane_rows = (int)(end - begin) - (int)(warp * T + slot);
    const u64 lane_at =
        (((u64)kv_slot * n_kv_heads + kvh) * capacity + begin + warp * T + slot) * head_dim +
        8 * sub;
    const u32 pass_step = RPW * head_dim;
    const u64 tile_step = (u64)AD_WARPS * T * head_dim;
    // Issues the copies of this warp's tile `s` (if it has one) as one group.
    auto issue = [&](u32 s) {
        if (s < my_tiles) {
            const int tile_row = (int)(s * AD_WARPS * T);
            const u64 at = lane_at + s * tile_step;
            u8* stage = ring + (s % AD_STAGES) * AD_STAGE_BYTES;
#pragma unroll
            for (u32 u = 0; u < U; ++u) {
                const bool valid = lane_on && tile_row + (int)(u * RPW) < lane_rows;
                const u64 row_at = valid ? at + u * pass_step : 0;
                decode_copy_chunk<C>(stage + u * 32 * CHUNK, k_cache + row_at, valid);
                decode_copy_chunk<C>(stage + (U + u) * 32 * CHUNK, v_cache + row_at, valid);
            }
        }
        decode_commit();
    };
#pragma unroll
    for (u32 s = 0; s + 1 < AD_STAGES; ++s) issue(s);

    // The block's queries, zero past nh heads and head_dim columns, while the first
    // tiles are in flight. Head h's columns 8 c + e sit at qs[h][4 c + e] for e < 4 and
    // at qs[h][DMAX / 2 + 4 c + e - 4] for the others, so that the lanes of a row read
    // consecutive 16-byte words.
    float* qs = reinterpret_cast<float*>(decode_shared + AD_WARPS * AD_STAGES * AD_STAGE_BYTES);
    for (u32 i = threadIdx.x; i < G * DMAX; i += AD_THREADS) {
        const u32 h = i / DMAX, d = i % DMAX;
        const u32 at = h * DMAX + (d % 8 < 4 ? 0 : DMAX / 2) + 4 * (d / 8) + d % 4;
        qs[at] = h < nh && d < head_dim ? q[((u64)t * n_heads + h0 + h) * head_dim + d] : 0.0f;
    }
    __syncthreads();

    float acc[G][8];
#pragma unroll
    for (u32 h = 0; h < G; ++h)
#pragma unroll
        for (u32 e = 0; e < 8; ++e) acc[h][e] = 0.0f;
    // Running max (base 2) and partial sum of this lane's head in its slot; the lane
    // holds totals base + j, j < HOLD, of each tile's scores h * U + u.
    const u32 base = (sub / DUP) * HOLD;
    float m = neg_inf(), l = 0.0f;
    const float scale2 = scale * AD_LOG2E;

    for (u32 s = 0; s < my_tiles; ++s) {
        issue(s + AD_STAGES - 1);
        decode_wait<AD_STAGES - 1>();
        const u8* stage = ring + (s % AD_STAGES) * AD_STAGE_BYTES;
        const int tile_row = (int)(s * AD_WARPS * T);

        // Partial dot products of this lane's columns: part[h * U + u].
        float part[N];
        {
            float kf[U][8];
#pragma unroll
            for (u32 u = 0; u < U; ++u) {
                decode_load_chunk<C>(stage + u * 32 * CHUNK, kf[u]);
            }
#pragma unroll
            for (u32 h = 0; h < G; ++h) {
                const float4 qa = *reinterpret_cast<const float4*>(qs + h * DMAX + 4 * sub);
                const float4 qb =
                    *reinterpret_cast<const float4*>(qs + h * DMAX + DMAX / 2 + 4 * sub);
                const float qv[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
                for (u32 u = 0; u < U; ++u) {
                    float d = 0.0f;
#pragma unroll
                    for (u32 e = 0; e < 8; ++e) d = fmaf(qv[e], kf[u][e], d);
                    part[h * U + u] = d;
                }
            }
        }
        decode_reduce_scatter<LPR / 2, N, N>(part, sub);

        // Scores (base 2) of the totals this lane holds; rows past `end` are masked.
        float sc[HOLD];
        float tile_max = neg_inf();
#pragma unroll
        for (u32 j = 0; j < HOLD; ++j) {
            const int row = tile_row + (int)(((base + j) % U) * RPW);
            const float raw = softcap > 0.0f
                                  ? attention_score(part[j], scale, softcap) * AD_LOG2E
                                  : part[j] * scale2;
            sc[j] = row < lane_rows ? raw : neg_inf();
            tile_max = fmaxf(tile_max, sc[j]);
        }
#pragma unroll
        for (u32 o = 1; o < LH; o *= 2) {
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
        }
        const float m_new = fmaxf(m, tile_max);
        const bool none = m_new == neg_inf();
        // Exactly 1 while the max holds, so that most tiles rescale nothing.
        const float alpha = m == m_new ? 1.0f : decode_exp2(m - m_new);
        float pr[HOLD];
        float tile_sum = 0.0f;
#pragma unroll
        for (u32 j = 0; j < HOLD; ++j) {
            pr[j] = none ? 0.0f : decode_exp2(sc[j] - m_new);
            tile_sum += pr[j];
        }
        l = l * alpha + tile_sum;
        m = m_new;

        // Every lane of the slot gets every weight and every head's rescaling.
        float pa[N];
#pragma unroll
        for (u32 i = 0; i < N; ++i) {
            pa[i] = __shfl_sync(0xffffffffu, pr[i % HOLD], (i / HOLD) * DUP, LPR);
        }
        if (__any_sync(0xffffffffu, alpha != 1.0f)) {
#pragma unroll
            for (u32 h = 0; h < G; ++h) {
                const float a = __shfl_sync(0xffffffffu, alpha, h * LH, LPR);
#pragma unroll
                for (u32 e = 0; e < 8; ++e) acc[h][e] *= a;
            }
        }
#pragma unroll
        for (u32 u = 0; u < U; ++u) {
            float vf[8];
            decode_load_chunk<C>(stage + (U + u) * 32 * CHUNK, vf);
#pragma unroll
            for (u32 h = 0; h < G; ++h) {
#pragma unroll
                for (u32 e = 0; e < 8; ++e) acc[h][e] = fmaf(pa[h * U + u], vf[e], acc[h][e]);
            }
        }
    }
    decode_wait<0>();

    // Merge the slots of the warp: each head's sum over its lanes (each total once), then
    // max and rescaled sums across slots.
#pragma unroll
    for (u32 o = 1; o < LH; o *= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
    l *= 1.0f / (float)DUP;
    float mh[G], lh[G];
#pragma unroll
    for (u32 h = 0; h < G; ++h) {
        mh[h] = __shfl_sync(0xffffffffu, m, h * LH, LPR);
        lh[h] = __shfl_sync(0xffffffffu, l, h * LH, LPR);
        float mx = mh[h];
#pragma unroll
        for (u32 o = LPR; o < 32; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float f = mh[h] == neg_inf() ? 0.0f : exp2f(mh[h] - mx);
        lh[h] *= f;
#pragma unroll
        for (u32 e = 0; e < 8; ++e) acc[h][e] *= f;
#pragma unroll
        for (u32 o = LPR; o < 32; o *= 2) {
            lh[h] += __shfl_xor_sync(0xffffffffu, lh[h], o);
#pragma unroll
            for (u32 e = 0; e < 8; ++e) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], o);
        }
        mh[h] = mx;
    }

    // Merge the warps, in the copy rings (every warp's copies have landed).
    __syncthreads();
    float* wacc = reinterpret_cast<float*>(decode_shared);  // [AD_WARPS][G][DMAX]
    if (slot == 0) {
#pragma unroll
        for (u32 h = 0; h < G; ++h) {
            float* to = wacc + (warp * G + h) * DMAX + 8 * sub;
            *reinterpret_cast<float4*>(to) = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
            *reinterpret_cast<float4*>(to + 4) =
                make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (u32 h = 0; h < G; ++h) {
            warp_max[warp][h] = mh[h];
            warp_sum[warp][h] = lh[h];
        }
    }
    __syncthreads();
    if (threadIdx.x < G) {
        const u32 h = threadIdx.x;
        float mx = neg_inf();
        for (u32 w = 0; w < AD_WARPS; ++w) mx = fmaxf(mx, warp_max[w][h]);
        float sum = 0.0f;
        for (u32 w = 0; w < AD_WARPS; ++w) {
            const float f = warp_max[w][h] == neg_inf() ? 0.0f : exp2f(warp_max[w][h] - mx);
            warp_weight[w][h] = f;
            sum = fmaf(f, warp_sum[w][h], sum);
        }
        head_max[h] = mx;
        head_sum[h] = sum;
    }
    __syncthreads();
    // The block's unnormalised value of head h, column d.
    auto value = [&](u32 h, u32 d) {
        float o = 0.0f;
#pragma unroll
        for (u32 w = 0; w < AD_WARPS; ++w) o = fmaf(warp_weight[w][h], wacc[(w * G + h) * DMAX + d], o);
        return o;
    };

    if (active == 1) {
        for (u32 i = threadIdx.x; i < nh * head_dim; i += AD_THREADS) {
            const u32 h = i / head_dim;
            decode_store(out_t, q8_t, i, value(h, i % head_dim) / head_sum[h]);
        }
        return;
    }

    // Partial results: values [token, head, split][head_dim], then (max, sum) of each
    // [token, head, split] after all the values.
    const u64 rows_at = ((u64)t * n_heads + h0) * splits;  // this block's heads' first row
    float* values = work;
    float* stats = work + (u64)gridDim.z * n_heads * splits * head_dim;
    for (u32 i = threadIdx.x; i < nh * head_dim; i += AD_THREADS) {
        const u32 h = i / head_dim, d = i % head_dim;
        values[(rows_at + h * splits + split) * head_dim + d] = value(h, d);
    }
    if (threadIdx.x < nh) {
        const u32 h = threadIdx.x;
        stats[(rows_at + h * splits + split) * 2] = head_max[h];
        stats[(rows_at + h * splits + split) * 2 + 1] = head_sum[h];
    }
    __syncthreads();
    u32* counter = counters + (u64)t * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) {
        last_block = decode_ticket(counter) == active - 1;
    }
    __syncthreads();
    if (!last_block) {
        return;
    }
    // Merge the active splits (at most 64): weight of split s = 2^(m_s - M) / L with M
    // the largest max and L = sum_s sum_s 2^(m_s - M). Lane i reads splits i and i + 32.
    static_assert(AD_MAX_SPLITS <= 64, "two splits per lane");
    for (u32 h = warp; h < nh; h += AD_WARPS) {
        const float2* st = reinterpret_cast<const float2*>(stats + (rows_at + h * splits) * 2);
        const float2 none = make_float2(neg_inf(), 0.0f);
        const float2 a = lane < active ? __ldcg(st + lane) : none;
        const float2 b = lane + 32 < active ? __ldcg(st + lane + 32) : none;
        const float mx = warp_reduce<MaxOp>(fmaxf(a.x, b.x));
        const float ea = a.x == neg_inf() ? 0.0f : exp2f(a.x - mx);
        const float eb = b.x == neg_inf() ? 0.0f : exp2f(b.x - mx);
        const float total = warp_reduce<SumOp>(fmaf(a.y, ea, b.y * eb));
        if (lane < active) weights[h][lane] = ea / total;
        if (lane + 32 < active) weights[h][lane + 32] = eb / total;
    }
    __syncthreads();
    // Weighted sums of 4 columns (an item) each; with fewer items than threads, `groups`
    // threads share an item (splits g, g + groups, ...) and their sums meet in the
    // copy rings (free now), added in group order. Item i is columns 4 i .. 4 i + 3 of
    // out_t. The loops run whole warps (for the copy), lanes past the end idle.
    const u32 quads = head_dim / 4, items = nh * quads;
    const u32 groups = items >= AD_THREADS ? 1 : AD_THREADS / items;
    float4* sums = reinterpret_cast<float4*>(decode_shared);  // [groups][items]
    const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const u32 lanes_used = (items * groups + 31u) & ~31u;
    for (u32 i = threadIdx.x; i < lanes_used; i += AD_THREADS) {
        const bool on = i < items * groups;
        const u32 g = i / items, item = i % items, h = item / quads, c = 4 * (item % quads);
        const float* vh = values + (rows_at + h * splits) * head_dim + c;
        float4 o = zero4;
        // 16 loads in flight at a time.
        constexpr u32 BATCH = 16;
        for (u32 s0 = g; on && s0 < active; s0 += BATCH * groups) {
            float4 v[BATCH];
#pragma unroll
            for (u32 k = 0; k < BATCH; ++k) {
                const u32 s = s0 + k * groups;
                v[k] = s < active ? __ldcg(reinterpret_cast<const float4*>(vh + (u64)s * head_dim))
                                  : zero4;
            }
#pragma unroll
            for (u32 k = 0; k < BATCH; ++k) {
                const u32 s = s0 + k * groups;
                const float w = s < active ? weights[h][s] : 0.0f;
                o.x = fmaf(w, v[k].x, o.x);
                o.y = fmaf(w, v[k].y, o.y);
                o.z = fmaf(w, v[k].z, o.z);
                o.w = fmaf(w, v[k].w, o.w);
            }
        }
        if (groups == 1) {
            decode_store4(out_t, q8_t, item, o, on);
        } else if (on) {
            sums[g * items + item] = o;
        }
    }
    if (groups > 1) {
        __syncthreads();
        for (u32 item = threadIdx.x; item < ((items + 31u) & ~31u); item += AD_THREADS) {
            const bool on = item < items;
            float4 o = on ? sums[item] : zero4;
            for (u32 g = 1; on && g < groups; ++g) {
                const float4 v = sums[g * items + item];
                o.x += v.x, o.y += v.y, o.z += v.z, o.w += v.w;
            }
            decode_store4(out_t, q8_t, item, o, on);
        }
    }
    if (threadIdx.x == 0) {
        *counter = 0;
    }
}

constexpr u32 AP_THREADS = 128;
constexpr u32 AP_ROWS = 32;  // (query, head) rows per block
constexpr u32 AP_TILE = 16;  // cache rows per step

// Shared memory of attention_prefill for a head dimension, in floats:
// q rows, K tile, V tile (each row padded by one), scores.
__host__ __device__ constexpr u32 prefill_shared_floats(u32 head_dim) {
    return (AP_ROWS + 2 * AP_TILE) * (head_dim + 1) + AP_ROWS * (AP_TILE + 1);
}

// Grid: (ceil(n_tokens / tokens_per_block), n_kv_heads * ceil(group / heads_per_block)),
// heads_per_block * tokens_per_block <= 32; dynamic shared memory
// prefill_shared_floats(head_dim) * 4 bytes. Row r of a block is token
// r / heads_per_block, head r % heads_per_block of its chunk. DMAX: 128 or 256.
template <typename C, u32 DMAX>
__global__ void __launch_bounds__(AP_THREADS)
    attention_prefill(const float* __restrict__ q, const typename C::storage* __restrict__ k_cache,
                      const typename C::storage* __restrict__ v_cache,
                      const int* __restrict__ positions, const int* slots,
                      float* __restrict__ out, u8* __restrict__ out_q8, u32 n_tokens,
                      u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 capacity, u32 n_slots,
                      float scale, u32 window, float softcap, u32 heads_per_block,
                      u32 tokens_per_block) {
    // Launched serialized (src/ops/attention.rs), so it does not chain (common.cuh).
    extern __shared__ __align__(16) float shared[];
    const u32 ld = head_dim + 1;
    float* qs = shared;
    float* ks = qs + AP_ROWS * ld;
    float* vs = ks + AP_TILE * ld;
    float* scores = vs + AP_TILE * ld;  // [AP_ROWS][AP_TILE + 1]
    __shared__ int row_pos[AP_ROWS];
    __shared__ u32 row_first[AP_ROWS];
    __shared__ float row_max[AP_ROWS], row_sum[AP_ROWS], row_alpha[AP_ROWS];
    __shared__ u32 range_lo, range_hi;
    __shared__ bool any_row;

    const u32 group = n_heads / n_kv_heads;
    const u32 chunks = (group + heads_per_block - 1) / heads_per_block;
    const u32 kvh = blockIdx.y / chunks;
    const u32 h0 = kvh * group + (blockIdx.y % chunks) * heads_per_block;
    const u32 nh = min(heads_per_block, kvh * group + group - h0);
    const u32 t0 = blockIdx.x * tokens_per_block;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;

    // Row r's token and head, and whether it exists (shape) and is visible (position).
    auto token_of = [&](u32 r) { return t0 + r / heads_per_block; };
    auto head_of = [&](u32 r) { return h0 + r % heads_per_block; };
    auto exists = [&](u32 r) {
        return r / heads_per_block < tokens_per_block && r % heads_per_block < nh &&
               token_of(r) < n_tokens;
    };

    // Each row's last and first visible rows, virtual (-1 and ~0: none).
    if (warp == 0) {
        const u32 r = lane;
        int p = -1;
        if (exists(r)) {
            p = positions[token_of(r)];
            const int slot = token_slot(slots, token_of(r), n_slots);
            p = p >= 0 && (u32)p < capacity && slot >= 0 ? slot * (int)capacity + p : -1;
        }
        const u32 first = p >= 0 ? (u32)p - (u32)p % capacity +
                                       first_visible((u32)p % capacity, window)
                                 : 0xffffffffu;
        row_pos[r] = p;
        row_first[r] = first;
        row_max[r] = neg_inf();
        row_sum[r] = 0.0f;
        const u32 lo = __reduce_min_sync(0xffffffffu, first);
        const u32 hi = __reduce_max_sync(0xffffffffu, p >= 0 ? (u32)p : 0u);
        if (lane == 0) {
            range_lo = lo;
            range_hi = hi;
            any_row = lo != 0xffffffffu;
        }
    }
    for (u32 i = threadIdx.x; i < AP_ROWS * head_dim; i += AP_THREADS) {
        const u32 r = i / head_dim, d = i % head_dim;
        qs[r * ld + d] = exists(r) ? q[((u64)token_of(r) * n_heads + head_of(r)) * head_dim + d]
                                   : 0.0f;
    }
    __syncthreads();

    const u32 r_out = threadIdx.x / 4, part = threadIdx.x % 4;
    float acc[DMAX / 4];
#pragma unroll
    for (u32 i = 0; i < DMAX / 4; ++i) acc[i] = 0.0f;

    const u32 lo = range_lo, hi = range_hi;
    constexpr u32 NONE = 0xffffffffu;
    // The first virtual row at or after `from` that some row of the block sees (NONE).
    auto next_seen = [&](u32 from) {
        u32 next = NONE;
        for (u32 r = 0; any_row && r < AP_ROWS; ++r) {
            if (row_pos[r] >= 0 && (u32)row_pos[r] >= from) next = min(next, max(row_first[r], from));
        }
        return next;
    };
    for (u32 kv0 = next_seen(lo); kv0 != NONE; kv0 = next_seen(kv0 + AP_TILE)) {
        // Stage the tile's K and V rows as f32 (zeros past hi).
        for (u32 i = threadIdx.x; i < AP_TILE * (head_dim / 8); i += AP_THREADS) {
            const u32 jj = i / (head_dim / 8), d = (i % (head_dim / 8)) * 8;
            float kv[8], vv[8];
            if (kv0 + jj <= hi) {
                const u64 at = virtual_row_at(kv0 + jj, kvh, n_kv_heads, capacity, head_dim) + d;
                load8<C>(k_cache + at, kv);
                load8<C>(v_cache + at, vv);
            } else {
#pragma unroll
                for (u32 e = 0; e < 8; ++e) kv[e] = vv[e] = 0.0f;
            }
#pragma unroll
            for (u32 e = 0; e < 8; ++e) {
                ks[jj * ld + d + e] = kv[e];
                vs[jj * ld + d + e] = vv[e];
            }
        }
        __syncthreads();
        // Scores: thread (j, rows r0, r0 + 8, r0 + 16, r0 + 24).
        {
            const u32 j = threadIdx.x % AP_TILE, r0 = threadIdx.x / AP_TILE;
            const u32 kp = kv0 + j;
#pragma unroll
            for (u32 i = 0; i < AP_ROWS / (AP_THREADS / AP_TILE); ++i) {
                const u32 r = r0 + i * (AP_THREADS / AP_TILE);
                float dot = 0.0f;
                for (u32 d = 0; d < head_dim; ++d) dot = fmaf(qs[r * ld + d], ks[j * ld + d], dot);
                const int p = row_pos[r];
                const bool visible = p >= 0 && kp >= row_first[r] && kp <= (u32)p;
                scores[r * (AP_TILE + 1) + j] =
                    visible ? attention_score(dot, scale, softcap) : neg_inf();
            }
        }
        __syncthreads();
        // Online softmax, one lane per row.
        if (warp == 0) {
            float* s = scores + lane * (AP_TILE + 1);
            float tile_max = neg_inf();
            for (u32 j = 0; j < AP_TILE; ++j) tile_max = fmaxf(tile_max, s[j]);
            const float m_old = row_max[lane];
            const float m_new = fmaxf(m_old, tile_max);
            const bool none = m_new == neg_inf();
            float sum = 0.0f;
            for (u32 j = 0; j < AP_TILE; ++j) {
                const float pr = none ? 0.0f : expf(s[j] - m_new);
                s[j] = pr;
                sum += pr;
            }
            const float a = none ? 1.0f : expf(m_old - m_new);
            row_alpha[lane] = a;
            row_max[lane] = m_new;
            row_sum[lane] = row_sum[lane] * a + sum;
        }
        __syncthreads();
        // Values: thread (row r_out, columns part, part + 4, ...).
        {
            const float a = row_alpha[r_out];
            const float* s = scores + r_out * (AP_TILE + 1);
#pragma unroll
            for (u32 i = 0; i < DMAX / 4; ++i) acc[i] *= a;
            for (u32 j = 0; j < AP_TILE; ++j) {
                const float pr = s[j];
#pragma unroll
                // A row this query does not see has pr = 0 and adds nothing, even where
                // its cache row holds a non-finite value.
                for (u32 i = 0; i < DMAX / 4; ++i) {
                    const u32 d = part + 4 * i;
                    if (d < head_dim && pr != 0.0f) acc[i] = fmaf(pr, vs[j * ld + d], acc[i]);
                }
            }
        }
        __syncthreads();
    }

    // Row r's outputs start at element row_at(r) of out.
    auto row_at = [&](u32 r) { return ((u64)token_of(r) * n_heads + head_of(r)) * head_dim; };
    // With a copy, the rows' outputs are staged in qs (free now) for whole warps to
    // round 32 consecutive values at a time.
    if (exists(r_out)) {
        float* o = out + row_at(r_out);
        const bool visible = row_pos[r_out] >= 0;
        const float l = row_sum[r_out];
#pragma unroll
        for (u32 i = 0; i < DMAX / 4; ++i) {
            const u32 d = part + 4 * i;
            if (d < head_dim) {
                const float v = visible ? acc[i] / l : 0.0f;
                o[d] = v;
                if (out_q8 != nullptr) qs[r_out * ld + d] = v;
            }
        }
    }
    if (out_q8 != nullptr) {
        __syncthreads();
        const u32 blocks = head_dim / Q8_1_BLOCK_ELEMS;
        for (u32 b = warp; b < AP_ROWS * blocks; b += AP_THREADS / 32) {
            const u32 r = b / blocks, c = (b % blocks) * Q8_1_BLOCK_ELEMS;
            if (exists(r)) {
                store_q8_1_block(qs[r * ld + c + lane],
                                 out_q8 + (row_at(r) + c) / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// attention_flash
//
// Grid (ceil(n_tokens / tokens_per_block), n_kv_heads * ceil(group / heads_per_block)),
// FA_THREADS threads, dynamic shared memory flash_shared_bytes(DH). Row r of a block
// (r < FA_ROWS) is token r / heads_per_block, head r % heads_per_block of its chunk of
// the group, as in attention_prefill; warp w owns rows 16 w .. 16 w + 15, the rows of
// its mma tiles. Blocks take their tokens in reverse order (the last tokens, which see
// the most rows, start first).
//
// The block walks the rows [lo, hi] its queries see (the union of their visible ranges)
// in tiles of BC rows: K and V tiles land in shared memory (f16, rows padded by FA_PAD
// elements so that ldmatrix is free of bank conflicts) through a two-stage cp.async
// ring. A warp skips a tile none of its rows sees and masks only a tile that some of
// its rows see in part. Per tile and warp: S = Q K^T (m16n8k16, f32 sums), soft-capped
// and masked, in base 2; the running max and sum per row; O = O * alpha + P V with P
// rounded to f16 in the A fragments, V through ldmatrix.trans.
//
// Queries are multiplied by scale (and by log2(e) without a soft-cap) before they are
// rounded to f16; with a soft-cap, s = softcap * tanh(dot / softcap) * log2(e). DH is
// 64, 128 or 256 and at least head_dim; columns past head_dim are zeros in Q, K and V,
// so they add nothing. For DH <= 128 each warp holds its Q fragments in registers and
// the Q tile shares its shared memory with the K and V stages; for DH = 256 Q stays in
// shared memory and its fragments are loaded at each step.
//
// Cache rows that no query of the block sees are zeros in the tiles (never read), so
// that a non-finite value there cannot reach an output through a zero weight: rows past
// hi, and, when the visible ranges of the block leave gaps (windows, scattered
// positions), the rows in the gaps.

constexpr u32 FA_THREADS = FA_WARPS * 32;
constexpr u32 FA_ROWS = FA_WARPS * 16;
constexpr u32 FA_STAGES = 2;
constexpr int FA_NO_ROW = 0x7fffffff;  // the first visible row of a row without a query

// Cache rows per tile for head dimension DH.
__host__ __device__ constexpr u32 flash_tile_rows(u32 dh) {
    return dh <= 128 ? FA_TILE_ROWS : FA_TILE_ROWS_WIDE;
}

// Elements of a shared row of Q, K or V.
__host__ __device__ constexpr u32 flash_stride(u32 dh) { return dh + FA_PAD; }

// Dynamic shared memory of attention_flash<C, DH> in bytes: the K and V stages and, for
// DH > 128, the Q tile after them (for DH <= 128 Q uses the stages' memory first).
__host__ __device__ constexpr u32 flash_shared_bytes(u32 dh) {
    return ((dh <= 128 ? 0u : FA_ROWS) + 2 * FA_STAGES * flash_tile_rows(dh)) * flash_stride(dh) *
           2;
}

// Operand types of the tensor-core products: the cache's element type C.
template <typename C>
struct FlashOps;

template <>
struct FlashOps<F16> {
    // Two f32 as two f16 (round to nearest even) in one word, the first in the low half.
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    // d += a * b for one m16n8k16 tile (a row-major, b column-major; PTX fragments).
    static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// Four 8 x 8 matrices of 16-bit elements from shared memory; lane l gives the address of
// row l % 8 of matrix l / 8 (ldmatrix), `trans` transposes each.
template <bool TRANS>
__device__ __forceinline__ void flash_ldmatrix(u32 (&r)[4], const u16* at) {
    const u32 a = (u32)__cvta_generic_to_shared(at);
    if constexpr (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
}

template <typename C, u32 DH>
__global__ void __launch_bounds__(FA_THREADS, 2)
    attention_flash(const float* __restrict__ q, const typename C::storage* __restrict__ k_cache,
                    const typename C::storage* __restrict__ v_cache,
                    const int* __restrict__ positions, const int* slots,
                    float* __restrict__ out, u8* __restrict__ out_q8, u32 n_tokens,
                    u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 capacity, u32 n_slots,
                    float scale, u32 window, float softcap, u32 heads_per_block,
                    u32 tokens_per_block) {
    // Launched serialized (src/ops/attention.rs), so it does not chain (common.cuh).
    typedef FlashOps<C> Ops;
    constexpr u32 BC = flash_tile_rows(DH);
    constexpr u32 LD = flash_stride(DH);
    constexpr u32 OLD = DH + 4;          // floats of a row of the staged outputs
    constexpr bool QREG = DH <= 128;     // Q fragments in registers
    constexpr u32 NT = BC / 8;           // score tiles (n = 8) per warp and tile
    constexpr u32 DT = DH / 8;           // output tiles (n = 8) per warp
    constexpr u32 KQ = DH / 16;          // k steps of Q K^T
    static_assert(DH % 16 == 0 && BC % 16 == 0 && FA_ROWS <= FA_THREADS, "attention_flash shape");
    static_assert(FA_ROWS * OLD * 4 <= flash_shared_bytes(DH), "outputs fit the stages");
    static_assert(!QREG || FA_ROWS <= 2 * FA_STAGES * BC, "Q fits the stages");

    extern __shared__ __align__(16) u8 flash_shared[];
    u16* stages = reinterpret_cast<u16*>(flash_shared);
    u16* qs = QREG ? stages : stages + 2 * FA_STAGES * BC * LD;
    __shared__ int row_pos[FA_ROWS], row_first[FA_ROWS];
    __shared__ int block_lo, block_hi;
    __shared__ bool block_gaps;

    const u32 group = n_heads / n_kv_heads;
    const u32 chunks = (group + heads_per_block - 1) / heads_per_block;
    const u32 kvh = blockIdx.y / chunks;
    const u32 h0 = kvh * group + (blockIdx.y % chunks) * heads_per_block;
    const u32 nh = min(heads_per_block, kvh * group + group - h0);
    const u32 t0 = (gridDim.x - 1 - blockIdx.x) * tokens_per_block;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    auto token_of = [&](u32 r) { return t0 + r / heads_per_block; };
    auto exists = [&](u32 r) {
        return r / heads_per_block < tokens_per_block && r % heads_per_block < nh &&
               token_of(r) < n_tokens;
    };
    // Row r's outputs (and query) start at element row_at(r) of out (and q).
    auto row_at = [&](u32 r) {
        return ((u64)token_of(r) * n_heads + h0 + r % heads_per_block) * head_dim;
    };

    // Each row's virtual position (-1: no query, or one outside the cache) and first
    // visible virtual row.
    if (threadIdx.x < FA_ROWS) {
        const u32 r = threadIdx.x;
        int p = exists(r) ? positions[token_of(r)] : -1;
        const int slot = exists(r) ? token_slot(slots, token_of(r), n_slots) : -1;
        if (p >= 0 && ((u32)p >= capacity || slot < 0)) p = -1;
        const int base = p >= 0 ? slot * (int)capacity : 0;
        row_pos[r] = p >= 0 ? base + p : -1;
        row_first[r] = p >= 0 ? base + (int)first_visible((u32)p, window) : FA_NO_ROW;
    }
    // The queries, scaled, as f16.
    const float q_scale = softcap > 0.0f ? scale : scale * AD_LOG2E;
    for (u32 i = threadIdx.x; i < FA_ROWS * (DH / 4); i += FA_THREADS) {
        const u32 r = i / (DH / 4), d = 4 * (i % (DH / 4));
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (exists(r) && d < head_dim) v = *reinterpret_cast<const float4*>(q + row_at(r) + d);
        *reinterpret_cast<uint2*>(qs + r * LD + d) =
            make_uint2(Ops::pack(v.x * q_scale, v.y * q_scale), Ops::pack(v.z * q_scale, v.w * q_scale));
    }
    __syncthreads();
    // The block's range of rows, and whether the visible ranges leave gaps in it: the
    // union of the ranges is one run iff the row before each range's start (other than
    // the lowest) lies in some range.
    if (warp == 0) {
        int lo = FA_NO_ROW, hi = -1;
        for (u32 r = lane; r < FA_ROWS; r += 32) {
            lo = min(lo, row_first[r]);
            hi = max(hi, row_pos[r]);
        }
        lo = __reduce_min_sync(0xffffffffu, lo);
        hi = __reduce_max_sync(0xffffffffu, hi);
        bool gap = false;
        for (u32 r = lane; (window != 0 || slots != nullptr) && r < FA_ROWS; r += 32) {
            const int before = row_first[r] - 1;
            if (row_pos[r] >= 0 && before >= lo) {
                bool covered = false;
                for (u32 o = 0; o < FA_ROWS; ++o) {
                    covered |= row_first[o] <= before && before <= row_pos[o];
                }
                gap |= !covered;
            }
        }
        gap = __any_sync(0xffffffffu, gap);
        if (lane == 0) {
            block_lo = lo;
            block_hi = hi;
            block_gaps = gap;
        }
    }

    // This thread's two rows (of its fragments) and its warp's bounds: rows some of the
    // warp's queries see, and rows all of them see.
    const u32 ra = warp * 16 + (lane >> 2), rb = ra + 8, quad = lane & 3u;
    const int pos_a = row_pos[ra], pos_b = row_pos[rb];
    const int first_a = row_first[ra], first_b = row_first[rb];
    const int warp_lo = __reduce_min_sync(0xffffffffu, min(first_a, first_b));
    const int warp_hi = __reduce_max_sync(0xffffffffu, max(pos_a, pos_b));
    const int all_lo = __reduce_max_sync(0xffffffffu, max(first_a, first_b));
    const int all_hi = __reduce_min_sync(0xffffffffu, min(pos_a, pos_b));

    u32 qf[QREG ? KQ : 1][4];
    // The A fragment of the warp's queries, columns 16 kk .. 16 kk + 15.
    auto q_fragment = [&](u32 kk, u32 (&a)[4]) {
        flash_ldmatrix<false>(a, qs + (warp * 16 + (lane & 7u) + ((lane >> 3) & 1u) * 8) * LD +
                                     16 * kk + (lane >> 4) * 8);
    };
    if constexpr (QREG) {
#pragma unroll
        for (u32 kk = 0; kk < KQ; ++kk) q_fragment(kk, qf[kk]);
    }
    __syncthreads();  // Q read (QREG: its memory is the stages'), the range written

    const int lo = block_lo, hi = block_hi;
    const bool gaps = block_gaps;
    // Whether some query of the block sees virtual row j (only asked when there are
    // gaps).
    auto seen = [&](int j) {
        bool any = false;
        for (u32 r = 0; r < FA_ROWS; ++r) any |= row_first[r] <= j && j <= row_pos[r];
        return any;
    };
    // The first virtual row at or after `from` that some query of the block sees
    // (FA_NO_ROW: none); without gaps, `from` itself up to hi.
    auto next_seen = [&](int from) {
        if (!gaps) return from <= hi ? from : FA_NO_ROW;
        int next = FA_NO_ROW;
        for (u32 r = 0; r < FA_ROWS; ++r) {
            if (row_pos[r] >= from) next = min(next, max(row_first[r], from));
        }
        return next;
    };
    // Issues the copies of the tile at cache row kv0 into stage `stage`.
    auto issue = [&](int kv0, u32 stage) {
        u16* ks = stages + 2 * stage * BC * LD;
        u16* vs = ks + BC * LD;
        for (u32 i = threadIdx.x; i < BC * (DH / 8); i += FA_THREADS) {
            const u32 jj = i / (DH / 8), c = 8 * (i % (DH / 8));
            const int j = kv0 + (int)jj;
            const bool valid = j <= hi && c < head_dim && (!gaps || seen(j));
            const u64 at =
                valid ? virtual_row_at((u32)j, kvh, n_kv_heads, capacity, head_dim) + c : 0;
            decode_copy16(reinterpret_cast<u8*>(ks + jj * LD + c), k_cache + at, valid);
            decode_copy16(reinterpret_cast<u8*>(vs + jj * LD + c), v_cache + at, valid);
        }
        decode_commit();
    };

    float o[DT][4];
#pragma unroll
    for (u32 t = 0; t < DT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
    const float cap_log2e = softcap * AD_LOG2E;

    // Tiles start at the first seen row and then at the first seen row past each tile.
    int kv0 = hi >= lo ? next_seen(lo) : FA_NO_ROW;
    if (kv0 != FA_NO_ROW) issue(kv0, 0);
    for (int it = 0; kv0 != FA_NO_ROW; ++it) {
        const int next = next_seen(kv0 + (int)BC);
        if (next != FA_NO_ROW) {
            issue(next, (it + 1) & 1);
            decode_wait<1>();
        } else {
            decode_wait<0>();
        }
        __syncthreads();
        const u16* ks = stages + 2 * (it & 1) * BC * LD;
        const u16* vs = ks + BC * LD;
        if (kv0 <= warp_hi && kv0 + (int)BC - 1 >= warp_lo) {
            // S = Q K^T.
            float s[NT][4];
#pragma unroll
            for (u32 t = 0; t < NT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
            for (u32 kk = 0; kk < KQ; ++kk) {
                u32 a[4];
                if constexpr (QREG) {
#pragma unroll
                    for (u32 e = 0; e < 4; ++e) a[e] = qf[kk][e];
                } else {
                    q_fragment(kk, a);
                }
#pragma unroll
                for (u32 jn = 0; jn < NT / 2; ++jn) {
                    u32 b[4];
                    flash_ldmatrix<false>(b, ks + (16 * jn + (lane >> 4) * 8 + (lane & 7u)) * LD +
                                                 16 * kk + ((lane >> 3) & 1u) * 8);
                    Ops::mma(s[2 * jn], a, b[0], b[1]);
                    Ops::mma(s[2 * jn + 1], a, b[2], b[3]);
                }
            }
            // Scores in base 2, soft-capped, masked where the tile is not seen whole.
            const bool whole = kv0 >= all_lo && kv0 + (int)BC - 1 <= all_hi;
            float mx[2] = {m[0], m[1]};
#pragma unroll
            for (u32 t = 0; t < NT; ++t) {
#pragma unroll
                for (u32 e = 0; e < 4; ++e) {
                    float x = s[t][e];
                    if (softcap > 0.0f) x = cap_log2e * tanhf(x / softcap);
                    if (!whole) {
                        const int j = kv0 + (int)(8 * t + 2 * quad + (e & 1u));
                        const int p = e < 2 ? pos_a : pos_b, f = e < 2 ? first_a : first_b;
                        if (j < f || j > p) x = neg_inf();
                    }
                    s[t][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
            }
            float alpha[2], base[2];
#pragma unroll
            for (u32 i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                // With nothing seen yet (max -inf), weights and alpha are 0.
                base[i] = mx[i] == neg_inf() ? 0.0f : mx[i];
                alpha[i] = decode_exp2(m[i] - base[i]);
                m[i] = mx[i];
                l[i] *= alpha[i];
            }
#pragma unroll
            for (u32 t = 0; t < NT; ++t) {
#pragma unroll
                for (u32 e = 0; e < 4; ++e) {
                    s[t][e] = decode_exp2(s[t][e] - base[e >> 1]);
                    l[e >> 1] += s[t][e];
                }
            }
#pragma unroll
            for (u32 t = 0; t < DT; ++t) {
                o[t][0] *= alpha[0], o[t][1] *= alpha[0];
                o[t][2] *= alpha[1], o[t][3] *= alpha[1];
            }
            // O += P V, P (the C fragments of S) as A fragments.
#pragma unroll
            for (u32 kk = 0; kk < BC / 16; ++kk) {
                const u32 a[4] = {Ops::pack(s[2 * kk][0], s[2 * kk][1]),
                                  Ops::pack(s[2 * kk][2], s[2 * kk][3]),
                                  Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (u32 dn = 0; dn < DT / 2; ++dn) {
                    u32 b[4];
                    flash_ldmatrix<true>(b, vs + (16 * kk + ((lane >> 3) & 1u) * 8 + (lane & 7u)) * LD +
                                                16 * dn + (lane >> 4) * 8);
                    Ops::mma(o[2 * dn], a, b[0], b[1]);
                    Ops::mma(o[2 * dn + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the stage is free for the copies of tile it + 2
        kv0 = next;
    }

    // Normalise (rows that see nothing get zeros) and stage the outputs as f32 in the
    // shared memory (free now), for whole rows to be stored and rounded.
    float inv[2];
#pragma unroll
    for (u32 i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        inv[i] = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    }
    float* os = reinterpret_cast<float*>(flash_shared);
#pragma unroll
    for (u32 t = 0; t < DT; ++t) {
        const u32 d = 8 * t + 2 * quad;
        *reinterpret_cast<float2*>(os + ra * OLD + d) = make_float2(o[t][0] * inv[0], o[t][1] * inv[0]);
        *reinterpret_cast<float2*>(os + rb * OLD + d) = make_float2(o[t][2] * inv[1], o[t][3] * inv[1]);
    }
    __syncthreads();
    for (u32 i = threadIdx.x; i < FA_ROWS * (DH / 4); i += FA_THREADS) {
        const u32 r = i / (DH / 4), d = 4 * (i % (DH / 4));
        if (exists(r) && d < head_dim) {
            *reinterpret_cast<float4*>(out + row_at(r) + d) =
                *reinterpret_cast<const float4*>(os + r * OLD + d);
        }
    }
    if (out_q8 != nullptr) {
        const u32 blocks = head_dim / Q8_1_BLOCK_ELEMS;
        for (u32 b = warp; b < FA_ROWS * blocks; b += FA_WARPS) {
            const u32 r = b / blocks, c = (b % blocks) * Q8_1_BLOCK_ELEMS;
            if (exists(r)) {
                store_q8_1_block(os[r * OLD + c + lane],
                                 out_q8 + (row_at(r) + c) / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
            }
        }
    }
}

}  // namespace kiln
