// Rotary position embedding (RoPE), optionally after a per-head RMSNorm: what the
// rope kernels (rope.cu) compute, and what a decode attention that rotates its own
// queries and keys (attention.cu) computes with the same operations.
//
// For pair i < rotary_dim / 2 of a head at position p:
//   theta = p * freq_scale * base^(-2i / rotary_dim) / ff[i]   (ff = 1 without factors)
//   (a, b) -> (a cos(theta) - b sin(theta), a sin(theta) + b cos(theta)),
// the pair being (2i, 2i + 1) for the normal style and (i, i + rotary_dim / 2) for
// NeoX. Elements at or past rotary_dim are kept. Angles are computed in f32 in the
// reference's order of operations; the rotation and the norm's scaling are rounded
// after each product and sum (no fused multiply-add), so that every kernel that
// rotates a head gets the same bits.
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

}  // namespace kiln
