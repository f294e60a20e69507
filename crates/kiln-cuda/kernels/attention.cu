// Causal grouped-query attention of queries over a KV cache, as
// kiln_core::ops::Attention defines it:
//
//   query t (position p = positions[t]) of head h reads KV head g = h / group and the
//   cache rows j with first(p) <= j <= p, first(p) = window ? max(0, p + 1 - window) : 0;
//   s_j = scale * dot(q, k_j), then softcap * tanh(s_j / softcap) with a softcap;
//   out = sum_j softmax(s)_j v_j, all in f32 from the cache's values converted to f32.
//
// q and out are [n_tokens, n_heads, head_dim] f32; the caches [n_kv_heads, capacity,
// head_dim] of element type C (F32 or F16). head_dim is a multiple of 8 and at most 256.
// A query whose position lies outside 0..capacity gets an output of zeros.
//
// Two kernels compute it:
// - attention_decode (few queries): flash-decoding. The visible rows of each query are
//   split across gridDim.x blocks; each block handles up to GMAX query heads sharing one
//   KV head, so each K and V row is read once for all of them, and keeps an online
//   softmax. With several splits, each block writes its unnormalised partial result and
//   running max and sum to a workspace; the last block of a (query, head group) to
//   finish (counted with an atomic ticket) merges them and resets its counter to 0.
// - attention_prefill (many queries): a block holds 32 (query, head) rows of one KV head
//   and walks their union of visible rows in tiles of 16 staged in shared memory, with
//   an online softmax per row. CUDA cores, f32; tensor cores are a later step.
#include "reduce.cuh"

namespace kiln {

constexpr u32 MAX_HEAD_DIM = 256;

// The first cache row a query at position pos sees.
__device__ __forceinline__ u32 first_visible(u32 pos, u32 window) {
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
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

// Four consecutive cache elements at p (8-byte aligned for F16, 16 for F32) as f32.
template <typename C>
__device__ __forceinline__ void load4(const typename C::storage* p, float* v) {
    if constexpr (sizeof(typename C::storage) == 2) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        v[0] = C::load((u16)(u.x & 0xffffu));
        v[1] = C::load((u16)(u.x >> 16));
        v[2] = C::load((u16)(u.y & 0xffffu));
        v[3] = C::load((u16)(u.y >> 16));
    } else {
        const float4 a = *reinterpret_cast<const float4*>(p);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    }
}

constexpr u32 AD_THREADS = 128;
constexpr u32 AD_WARPS = AD_THREADS / 32;
constexpr u32 AD_TILE = 32;  // cache rows per step, 8 per warp
constexpr u32 AD_MAX_SPLITS = 64;

// Grid: (splits, n_kv_heads * ceil(group / GMAX), n_tokens). QUADS: groups of 4 columns
// per lane in the value phase (1 for head_dim <= 128, 2 for <= 256). `work` holds
// n_tokens * n_heads * splits * (head_dim + 2) floats and `counters` one zeroed u32 per
// (token, grid row); both are unused with one split.
template <typename C, u32 GMAX, u32 QUADS>
__global__ void __launch_bounds__(AD_THREADS)
    attention_decode(const float* __restrict__ q, const typename C::storage* __restrict__ k_cache,
                     const typename C::storage* __restrict__ v_cache,
                     const int* __restrict__ positions, float* __restrict__ out,
                     float* __restrict__ work, u32* __restrict__ counters, u32 n_heads,
                     u32 n_kv_heads, u32 head_dim, u32 capacity, float scale, u32 window,
                     float softcap) {
    chain_after_prior_grids(q, k_cache, v_cache, positions);
    __shared__ __align__(16) float qs[GMAX][MAX_HEAD_DIM];  // queries, later the sums
    __shared__ float probs[GMAX][AD_TILE];
    __shared__ float alpha_s[GMAX], max_s[GMAX], sum_s[GMAX];
    __shared__ float weights[GMAX][AD_MAX_SPLITS];
    __shared__ bool last_block;

    const u32 splits = gridDim.x, split = blockIdx.x, t = blockIdx.z;
    const u32 group = n_heads / n_kv_heads;
    const u32 chunks = (group + GMAX - 1) / GMAX;
    const u32 kvh = blockIdx.y / chunks;
    const u32 h0 = kvh * group + (blockIdx.y % chunks) * GMAX;
    const u32 nh = min(GMAX, kvh * group + group - h0);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    float* out_t = out + ((u64)t * n_heads + h0) * head_dim;

    const int p = positions[t];
    if (p < 0 || (u32)p >= capacity) {
        if (split == 0) {
            for (u32 i = threadIdx.x; i < nh * head_dim; i += AD_THREADS) out_t[i] = 0.0f;
        }
        return;
    }
    const u32 pos = (u32)p;
    const u32 first = first_visible(pos, window);
    const u32 per_split = (pos + 1 - first + splits - 1) / splits;
    const u32 begin = min(first + split * per_split, pos + 1);
    const u32 end = min(begin + per_split, pos + 1);

    for (u32 i = threadIdx.x; i < GMAX * head_dim; i += AD_THREADS) {
        qs[i / head_dim][i % head_dim] =
            i < nh * head_dim ? q[((u64)t * n_heads + h0) * head_dim + i] : 0.0f;
    }
    if (threadIdx.x < GMAX) {
        max_s[threadIdx.x] = neg_inf();
        sum_s[threadIdx.x] = 0.0f;
    }
    float acc[GMAX][QUADS][4];
#pragma unroll
    for (u32 h = 0; h < GMAX; ++h)
#pragma unroll
        for (u32 c = 0; c < QUADS; ++c)
#pragma unroll
            for (u32 e = 0; e < 4; ++e) acc[h][c][e] = 0.0f;
    __syncthreads();

    const typename C::storage* k_head = k_cache + (u64)kvh * capacity * head_dim;
    const typename C::storage* v_head = v_cache + (u64)kvh * capacity * head_dim;
    const u32 units = head_dim / 8, quads = head_dim / 4;
    const u32 sub = lane & 7u, row_in_pass = lane >> 3;

    for (u32 tile = begin; tile < end; tile += AD_TILE) {
        // Scores: 8 lanes per row, 4 rows per warp per pass, 2 passes.
#pragma unroll
        for (u32 pass = 0; pass < 2; ++pass) {
            const u32 local = warp * 8 + pass * 4 + row_in_pass;
            const u32 j = tile + local;
            float part[GMAX];
#pragma unroll
            for (u32 h = 0; h < GMAX; ++h) part[h] = 0.0f;
            if (j < end) {
                const typename C::storage* kr = k_head + (u64)j * head_dim;
                for (u32 u = sub; u < units; u += 8) {
                    float kv[8];
                    load8<C>(kr + 8 * u, kv);
#pragma unroll
                    for (u32 h = 0; h < GMAX; ++h) {
#pragma unroll
                        for (u32 e = 0; e < 8; ++e) part[h] = fmaf(qs[h][8 * u + e], kv[e], part[h]);
                    }
                }
            }
#pragma unroll
            for (u32 h = 0; h < GMAX; ++h) {
                part[h] += __shfl_xor_sync(0xffffffffu, part[h], 1);
                part[h] += __shfl_xor_sync(0xffffffffu, part[h], 2);
                part[h] += __shfl_xor_sync(0xffffffffu, part[h], 4);
                if (sub == 0) {
                    probs[h][local] =
                        (j < end && h < nh) ? attention_score(part[h], scale, softcap) : neg_inf();
                }
            }
        }
        __syncthreads();
        // Online softmax: one warp per head, one lane per row of the tile.
        for (u32 h = warp; h < nh; h += AD_WARPS) {
            const float s = probs[h][lane];
            const float m_old = max_s[h];
            const float m_new = fmaxf(m_old, warp_reduce<MaxOp>(s));
            const bool none = m_new == neg_inf();
            const float pr = none ? 0.0f : expf(s - m_new);
            const float sum = warp_reduce<SumOp>(pr);
            probs[h][lane] = pr;
            if (lane == 0) {
                const float a = none ? 1.0f : expf(m_old - m_new);
                alpha_s[h] = a;
                max_s[h] = m_new;
                sum_s[h] = sum_s[h] * a + sum;
            }
        }
        __syncthreads();
        // Values: rows warp, warp + 4, ...; lanes over groups of 4 columns.
#pragma unroll
        for (u32 h = 0; h < GMAX; ++h) {
            const float a = h < nh ? alpha_s[h] : 1.0f;
#pragma unroll
            for (u32 c = 0; c < QUADS; ++c)
#pragma unroll
                for (u32 e = 0; e < 4; ++e) acc[h][c][e] *= a;
        }
        for (u32 local = warp; local < AD_TILE && tile + local < end; local += AD_WARPS) {
            const typename C::storage* vr = v_head + (u64)(tile + local) * head_dim;
#pragma unroll
            for (u32 c = 0; c < QUADS; ++c) {
                const u32 quad = lane + 32 * c;
                if (quad < quads) {
                    float vv[4];
                    load4<C>(vr + 4 * quad, vv);
#pragma unroll
                    for (u32 h = 0; h < GMAX; ++h) {
                        const float pr = h < nh ? probs[h][local] : 0.0f;
#pragma unroll
                        for (u32 e = 0; e < 4; ++e) acc[h][c][e] = fmaf(pr, vv[e], acc[h][c][e]);
                    }
                }
            }
        }
        __syncthreads();
    }

    // Sum the warps' partial values in warp order into qs (free now).
    for (u32 w = 0; w < AD_WARPS; ++w) {
        if (warp == w) {
#pragma unroll
            for (u32 h = 0; h < GMAX; ++h) {
#pragma unroll
                for (u32 c = 0; c < QUADS; ++c) {
                    const u32 quad = lane + 32 * c;
                    if (h < nh && quad < quads) {
#pragma unroll
                        for (u32 e = 0; e < 4; ++e) {
                            float* slot = &qs[h][4 * quad + e];
                            *slot = (w == 0 ? 0.0f : *slot) + acc[h][c][e];
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

    if (splits == 1) {
        for (u32 i = threadIdx.x; i < nh * head_dim; i += AD_THREADS) {
            const u32 h = i / head_dim;
            out_t[i] = qs[h][i % head_dim] / sum_s[h];
        }
        return;
    }

    // Partial results: [token, head, split] x (values, max, sum).
    const u32 stride = head_dim + 2;
    for (u32 i = threadIdx.x; i < nh * stride; i += AD_THREADS) {
        const u32 h = i / stride, d = i % stride;
        const float v = d < head_dim ? qs[h][d] : (d == head_dim ? max_s[h] : sum_s[h]);
        work[(((u64)t * n_heads + h0 + h) * splits + split) * stride + d] = v;
    }
    __threadfence();
    __syncthreads();
    u32* counter = counters + (u64)t * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) {
        last_block = atomicAdd(counter, 1u) == splits - 1;
    }
    __syncthreads();
    if (!last_block) {
        return;
    }
    __threadfence();
    // Merge: weight of split s = exp(max_s - M) / L with M the largest max and
    // L = sum_s sum_s exp(max_s - M).
    for (u32 h = warp; h < nh; h += AD_WARPS) {
        const float* part = work + ((u64)t * n_heads + h0 + h) * splits * stride;
        float m = neg_inf();
        for (u32 s = lane; s < splits; s += 32) m = fmaxf(m, __ldcg(part + s * stride + head_dim));
        m = warp_reduce<MaxOp>(m);
        float total = 0.0f;
        for (u32 s = lane; s < splits; s += 32) {
            const float ms = __ldcg(part + s * stride + head_dim);
            const float e = ms == neg_inf() ? 0.0f : expf(ms - m);
            weights[h][s] = e;
            total += __ldcg(part + s * stride + head_dim + 1) * e;
        }
        total = warp_reduce<SumOp>(total);
        __syncwarp();
        for (u32 s = lane; s < splits; s += 32) weights[h][s] /= total;
    }
    __syncthreads();
    for (u32 i = threadIdx.x; i < nh * head_dim; i += AD_THREADS) {
        const u32 h = i / head_dim, d = i % head_dim;
        const float* part = work + ((u64)t * n_heads + h0 + h) * splits * stride;
        float o = 0.0f;
        for (u32 s = 0; s < splits; ++s) o = fmaf(__ldcg(part + s * stride + d), weights[h][s], o);
        out_t[i] = o;
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
                      const int* __restrict__ positions, float* __restrict__ out, u32 n_tokens,
                      u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 capacity, float scale,
                      u32 window, float softcap, u32 heads_per_block, u32 tokens_per_block) {
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

    if (warp == 0) {
        const u32 r = lane;
        int p = -1;
        if (exists(r)) {
            p = positions[token_of(r)];
            if (p >= 0 && (u32)p >= capacity) p = -1;
        }
        const u32 first = p >= 0 ? first_visible((u32)p, window) : 0xffffffffu;
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

    const typename C::storage* k_head = k_cache + (u64)kvh * capacity * head_dim;
    const typename C::storage* v_head = v_cache + (u64)kvh * capacity * head_dim;
    const u32 lo = range_lo, hi = range_hi;
    for (u32 kv0 = lo; any_row && kv0 <= hi; kv0 += AP_TILE) {
        // Stage the tile's K and V rows as f32 (zeros past hi).
        for (u32 i = threadIdx.x; i < AP_TILE * (head_dim / 8); i += AP_THREADS) {
            const u32 jj = i / (head_dim / 8), d = (i % (head_dim / 8)) * 8;
            float kv[8], vv[8];
            if (kv0 + jj <= hi) {
                const u64 at = (u64)(kv0 + jj) * head_dim + d;
                load8<C>(k_head + at, kv);
                load8<C>(v_head + at, vv);
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

    if (exists(r_out)) {
        float* o = out + ((u64)token_of(r_out) * n_heads + head_of(r_out)) * head_dim;
        const bool visible = row_pos[r_out] >= 0;
        const float l = row_sum[r_out];
#pragma unroll
        for (u32 i = 0; i < DMAX / 4; ++i) {
            const u32 d = part + 4 * i;
            if (d < head_dim) o[d] = visible ? acc[i] / l : 0.0f;
        }
    }
}

}  // namespace kiln
