// Rotary position embedding (RoPE) and per-head RMSNorm fused with it.
//
// For pair i < rotary_dim / 2 of a head at position p:
//   theta = p * freq_scale * base^(-2i / rotary_dim) / ff[i]   (ff = 1 without factors)
//   (a, b) -> (a cos(theta) - b sin(theta), a sin(theta) + b cos(theta)),
// the pair being (2i, 2i + 1) for the normal style and (i, i + rotary_dim / 2) for
// NeoX. Elements at or past rotary_dim are copied. Angles are computed in f32 in the
// reference's order of operations; the rotation and the norm's scaling are rounded
// after each product and sum, as the reference rounds them (no fused multiply-add).
// x and out are [n_tokens, n_heads, head_dim]. The functions every kernel here shares
// (and the resident mat-vec that runs qkv_rope_append's work in its epilogue) are in
// rope.cuh.
#include "rope.cuh"

namespace kiln {

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
    const float* xh = x + head_index * r.head_dim;
    rotate_head<NeoX>([&](u32 i) { return xh[i]; }, true, weight, eps, r, pos,
                      [&](u32 i, float v) { oh[i] = v; });
}

// kiln_core::ops::QkvRopeAppend. qkv is [n_tokens, n_heads + 2 n_kv_heads, head_dim]:
// query heads, key heads, value heads. One warp per head of one token
// (rope_append_head).
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
    const QkvRopeAppendArgs<C> a = {positions,  slots,    freq_factors, q_weight,
                                    k_weight,   q_out,    k_cache,      v_cache,
                                    n_tokens,   n_heads,  n_kv_heads,   head_dim,
                                    rotary_dim, base,     freq_scale,   eps,
                                    capacity,   n_slots};
    const u32 heads = n_heads + 2 * n_kv_heads;
    const u64 head_index = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (head_index >= (u64)n_tokens * heads) {
        return;
    }
    const u32 t = (u32)(head_index / heads);
    const float* xh = qkv + head_index * head_dim;
    rope_append_head<NeoX>(a, t, (u32)(head_index - (u64)t * heads),
                           [&](u32 i) { return xh[i]; });
}

}  // namespace kiln
