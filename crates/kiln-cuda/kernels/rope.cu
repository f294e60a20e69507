// Rotary position embedding (RoPE) and per-head RMSNorm fused with it.
//
// For pair i < rotary_dim / 2 of a head at position p:
//   theta = p * freq_scale * base^(-2i / rotary_dim) / ff[i]   (ff = 1 without factors)
//   (a, b) -> (a cos(theta) - b sin(theta), a sin(theta) + b cos(theta)),
// the pair being (2i, 2i + 1) for the normal style and (i, i + rotary_dim / 2) for
// NeoX. Elements at or past rotary_dim are copied. Angles are computed in f32 in the
// reference's order of operations; the rotation and the norm's scaling are rounded
// after each product and sum, as the reference rounds them (no fused multiply-add).
// x and out are [n_tokens, n_heads, head_dim].
#include "common.cuh"

namespace kiln {

struct RopeArgs {
    const int* positions;
    const float* freq_factors;  // rotary_dim / 2 values, or null
    u32 n_heads;
    u32 head_dim;
    u32 rotary_dim;
    float base;
    float freq_scale;
};

// The element indices of rotary pair i.
template <bool NeoX>
__device__ __forceinline__ void pair_of(u32 i, u32 rotary_dim, u32& a, u32& b) {
    if (NeoX) {
        a = i;
        b = i + rotary_dim / 2;
    } else {
        a = 2 * i;
        b = 2 * i + 1;
    }
}

// sin and cos of pair i's angle at position pos.
__device__ __forceinline__ void rope_angle(const RopeArgs& r, int pos, u32 i, float& s,
                                           float& c) {
    const float exponent = -2.0f * (float)i / (float)r.rotary_dim;
    const float factor = r.freq_factors ? r.freq_factors[i] : 1.0f;
    const float theta = (float)pos * r.freq_scale * powf(r.base, exponent) / factor;
    sincosf(theta, &s, &c);
}

// The pair (a, b) rotated by the angle of sine s and cosine c.
__device__ __forceinline__ void rotate_pair(float a, float b, float s, float c, float& ra,
                                            float& rb) {
    ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    rb = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

// One warp rotates the head of head_dim values at xh for position pos. With
// `normalize`, each value is first scaled as RMSNorm does: x[i] * inv * w[i] with inv =
// 1 / sqrt(mean(x^2) + eps) and w = weight (1 where weight is null), in that order.
// Calls store(i, value) once for every element i < head_dim. Every lane of the warp
// must call it.
template <bool NeoX, typename Store>
__device__ __forceinline__ void rotate_head(const float* xh, bool normalize,
                                            const float* weight, float eps, const RopeArgs& r,
                                            int pos, Store store) {
    const u32 lane = threadIdx.x & 31u;
    float inv = 1.0f;
    if (normalize) {
        float squares = 0.0f;
        for (u32 i = lane; i < r.head_dim; i += 32) {
            squares = fmaf(xh[i], xh[i], squares);
        }
        inv = 1.0f / sqrtf(warp_sum(squares) / (float)r.head_dim + eps);
    }
    auto value = [&](u32 i) {
        if (!normalize) {
            return xh[i];
        }
        const float scaled = __fmul_rn(xh[i], inv);
        return weight != nullptr ? __fmul_rn(scaled, weight[i]) : scaled;
    };
    const u32 half = r.rotary_dim / 2;
    for (u32 i = lane; i < half; i += 32) {
        u32 ia, ib;
        pair_of<NeoX>(i, r.rotary_dim, ia, ib);
        float s, c, ra, rb;
        rope_angle(r, pos, i, s, c);
        rotate_pair(value(ia), value(ib), s, c, ra, rb);
        store(ia, ra);
        store(ib, rb);
    }
    for (u32 i = r.rotary_dim + lane; i < r.head_dim; i += 32) {
        store(i, value(i));
    }
}

// One block per token; threads walk over every head's pairs, then the copied tail.
template <bool NeoX>
__global__ void rope(const float* __restrict__ x, const int* __restrict__ positions,
                     const float* __restrict__ freq_factors, float* __restrict__ out,
                     u32 n_heads, u32 head_dim, u32 rotary_dim, float base,
                     float freq_scale) {
    chain_after_prior_grids(x, positions);
    const RopeArgs r = {positions, freq_factors, n_heads, head_dim, rotary_dim, base,
                        freq_scale};
    const u32 t = blockIdx.x;
    const int pos = r.positions[t];
    const u64 token = (u64)t * r.n_heads * r.head_dim;
    const u32 half = r.rotary_dim / 2;
    for (u32 j = threadIdx.x; j < r.n_heads * half; j += blockDim.x) {
        const u32 h = j / half;
        const u32 i = j - h * half;
        u32 ia, ib;
        pair_of<NeoX>(i, r.rotary_dim, ia, ib);
        const u64 head = token + (u64)h * r.head_dim;
        float s, c;
        rope_angle(r, pos, i, s, c);
        rotate_pair(x[head + ia], x[head + ib], s, c, out[head + ia], out[head + ib]);
    }
    const u32 tail = r.head_dim - r.rotary_dim;
    for (u32 j = threadIdx.x; j < r.n_heads * tail; j += blockDim.x) {
        const u32 h = j / tail;
        const u64 at = token + (u64)h * r.head_dim + r.rotary_dim + (j - h * tail);
        out[at] = x[at];
    }
}

// One warp per head of one token: u = x / sqrt(mean(x^2) + eps) * w (w = 1 when
// weight is null), then u rotated as rope does. blockDim.x is a multiple of 32.
template <bool NeoX>
__global__ void head_norm_rope(const float* __restrict__ x, const float* __restrict__ weight,
                               const int* __restrict__ positions,
                               const float* __restrict__ freq_factors, float* __restrict__ out,
                               u32 n_heads, u32 head_dim, u32 rotary_dim, float base,
                               float freq_scale, float eps, u64 n_heads_total) {
    chain_after_prior_grids(x, positions);
    const RopeArgs r = {positions, freq_factors, n_heads, head_dim, rotary_dim, base,
                        freq_scale};
    const u64 head_index = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (head_index >= n_heads_total) {
        return;
    }
    const int pos = r.positions[head_index / r.n_heads];
    float* oh = out + head_index * r.head_dim;
    rotate_head<NeoX>(x + head_index * r.head_dim, true, weight, eps, r, pos,
                      [&](u32 i, float v) { oh[i] = v; });
}

// Whether a later token of the call than t has slot `slot` and position pos (its row
// wins, as kv_append defines). Every lane of the warp must call it.
__device__ __forceinline__ bool shadowed_by_later(const int* positions, const int* slots,
                                                  u32 n_slots, u32 t, u32 n_tokens, int pos,
                                                  int slot) {
    bool later = false;
    for (u32 u = t + 1 + (threadIdx.x & 31u); u < n_tokens; u += 32) {
        later |= positions[u] == pos && token_slot(slots, u, n_slots) == slot;
    }
    return __any_sync(0xffffffffu, later);
}

// kiln_core::ops::QkvRopeAppend. qkv is [n_tokens, n_heads + 2 n_kv_heads, head_dim]:
// query heads, key heads, value heads. One warp per head of one token: a query head
// is normalized (with q_weight, when not null) and rotated into q_out; a key head
// likewise (k_weight) into row positions[t] of k_cache; a value head is copied into
// v_cache. The caches are [n_slots, n_kv_heads, capacity, head_dim] and token t writes
// slot token_slot(slots, t). Cache rows are stored as C (F32, or F16 rounded to nearest
// even); a position outside 0..capacity, a slot outside 0..n_slots, or a (slot,
// position) repeated by a later token writes no cache row.
template <bool NeoX, typename C>
__global__ void qkv_rope_append(const float* __restrict__ qkv, const int* __restrict__ positions,
                                const int* slots, const float* __restrict__ freq_factors,
                                const float* __restrict__ q_weight,
                                const float* __restrict__ k_weight, float* __restrict__ q_out,
                                typename C::storage* __restrict__ k_cache,
                                typename C::storage* __restrict__ v_cache, u32 n_tokens,
                                u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 rotary_dim,
                                float base, float freq_scale, float eps, u32 capacity,
                                u32 n_slots) {
    chain_after_prior_grids(qkv, positions);
    const RopeArgs r = {positions, freq_factors, n_heads, head_dim, rotary_dim, base,
                        freq_scale};
    const u32 heads = n_heads + 2 * n_kv_heads;
    const u64 head_index = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u32 lane = threadIdx.x & 31u;
    if (head_index >= (u64)n_tokens * heads) {
        return;
    }
    const u32 t = (u32)(head_index / heads);
    const u32 h = (u32)(head_index - (u64)t * heads);
    const int pos = positions[t];
    const int slot = token_slot(slots, t, n_slots);
    const float* xh = qkv + head_index * head_dim;
    const bool is_q = h < n_heads;
    const bool writes_cache =
        !is_q && pos >= 0 && (u32)pos < capacity && slot >= 0 &&
        !shadowed_by_later(positions, slots, n_slots, t, n_tokens, pos, slot);
    // The first row of this token's slot, of KV head 0, in either cache.
    const u64 slot_row = (u64)(slot < 0 ? 0 : slot) * n_kv_heads * capacity;
    if (h >= n_heads + n_kv_heads) {
        if (writes_cache) {
            const u64 row = slot_row + (u64)(h - n_heads - n_kv_heads) * capacity + (u32)pos;
            typename C::storage* dst = v_cache + row * head_dim;
            for (u32 i = lane; i < head_dim; i += 32) {
                dst[i] = C::store(xh[i]);
            }
        }
        return;
    }
    if (!is_q && !writes_cache) {
        return;
    }
    const float* weight = is_q ? q_weight : k_weight;
    const u64 k_row = is_q ? 0 : slot_row + (u64)(h - n_heads) * capacity + (u32)pos;
    rotate_head<NeoX>(xh, weight != nullptr, weight, eps, r, pos, [&](u32 i, float v) {
        if (is_q) {
            q_out[((u64)t * n_heads + h) * head_dim + i] = v;
        } else {
            k_cache[k_row * head_dim + i] = C::store(v);
        }
    });
}

}  // namespace kiln
