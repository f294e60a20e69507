// Rotary position embedding (RoPE), per-head RMSNorm fused with it, and the per-head
// work of kiln_core::ops::QkvRopeAppend: what rope.cu's kernels and the resident
// mat-vec that runs QkvRopeAppend in its epilogue (matvec.cu) share. rope.cu states
// the definition.
#pragma once
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

// One warp rotates the head of head_dim values that load(i) gives for position pos. With
// `normalize`, each value is first scaled as RMSNorm does: x[i] * inv * w[i] with inv =
// 1 / sqrt(mean(x^2) + eps) and w = weight (1 where weight is null), in that order.
// Calls store(i, value) once for every element i < head_dim. Every lane of the warp
// must call it.
template <bool NeoX, typename Load, typename Store>
__device__ __forceinline__ void rotate_head(Load load, bool normalize,
                                            const float* weight, float eps, const RopeArgs& r,
                                            int pos, Store store) {
    const u32 lane = threadIdx.x & 31u;
    float inv = 1.0f;
    if (normalize) {
        float squares = 0.0f;
        for (u32 i = lane; i < r.head_dim; i += 32) {
            const float x = load(i);
            squares = fmaf(x, x, squares);
        }
        inv = 1.0f / sqrtf(warp_sum(squares) / (float)r.head_dim + eps);
    }
    auto value = [&](u32 i) {
        if (!normalize) {
            return load(i);
        }
        const float scaled = __fmul_rn(load(i), inv);
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

// The operands of kiln_core::ops::QkvRopeAppend but qkv (rope.cu's qkv_rope_append
// takes them one by one), caches of C.
template <typename C>
struct QkvRopeAppendArgs {
    const int* positions;
    const int* slots;
    const float* freq_factors;
    const float* q_weight;
    const float* k_weight;
    float* q_out;
    typename C::storage* k_cache;
    typename C::storage* v_cache;
    u32 n_tokens;
    u32 n_heads;
    u32 n_kv_heads;
    u32 head_dim;
    u32 rotary_dim;
    float base;
    float freq_scale;
    float eps;
    u32 capacity;
    u32 n_slots;
};

// Head h of token t, whose head_dim values load(i) gives: a query head is normalized
// (with q_weight, when not null) and rotated into q_out; a key head likewise (k_weight)
// into row positions[t] of k_cache; a value head is copied into v_cache. The caches are
// [n_slots, n_kv_heads, capacity, head_dim] and token t writes slot token_slot(slots,
// t). Cache rows are stored as C (F32, or F16 rounded to nearest even); a position
// outside 0..capacity, a slot outside 0..n_slots, or a (slot, position) repeated by a
// later token writes no cache row. Every lane of the warp calls it, after the wait for
// prior grids.
template <bool NeoX, typename C, typename Load>
__device__ __forceinline__ void rope_append_head(const QkvRopeAppendArgs<C>& a, u32 t, u32 h,
                                                 Load load) {
    const RopeArgs r = {a.positions, a.freq_factors, a.n_heads, a.head_dim, a.rotary_dim,
                        a.base,      a.freq_scale};
    const u32 lane = threadIdx.x & 31u;
    const int pos = a.positions[t];
    const int slot = token_slot(a.slots, t, a.n_slots);
    const bool is_q = h < a.n_heads;
    const bool writes_cache =
        !is_q && pos >= 0 && (u32)pos < a.capacity && slot >= 0 &&
        !shadowed_by_later(a.positions, a.slots, a.n_slots, t, a.n_tokens, pos, slot);
    // The first row of this token's slot, of KV head 0, in either cache.
    const u64 slot_row = (u64)(slot < 0 ? 0 : slot) * a.n_kv_heads * a.capacity;
    if (h >= a.n_heads + a.n_kv_heads) {
        if (writes_cache) {
            const u64 row =
                slot_row + (u64)(h - a.n_heads - a.n_kv_heads) * a.capacity + (u32)pos;
            typename C::storage* dst = a.v_cache + row * a.head_dim;
            for (u32 i = lane; i < a.head_dim; i += 32) {
                dst[i] = C::store(load(i));
            }
        }
        return;
    }
    if (!is_q && !writes_cache) {
        return;
    }
    const float* weight = is_q ? a.q_weight : a.k_weight;
    const u64 k_row = is_q ? 0 : slot_row + (u64)(h - a.n_heads) * a.capacity + (u32)pos;
    rotate_head<NeoX>(load, weight != nullptr, weight, a.eps, r, pos, [&](u32 i, float v) {
        if (is_q) {
            a.q_out[((u64)t * a.n_heads + h) * a.head_dim + i] = v;
        } else {
            a.k_cache[k_row * a.head_dim + i] = C::store(v);
        }
    });
}

}  // namespace kiln
