// KV-cache append: cache[h, positions[t], :] = src[t, h, :], stored as the cache's
// element type (F32, or F16 rounded to nearest even). One block per token.
//
// A position outside 0..capacity is skipped. When several tokens of one call share a
// position, the last of them is written (as the sequential definition does): a token
// whose position reappears later in the call writes nothing.
#include "common.cuh"

namespace kiln {

template <typename C>
__global__ void kv_append(const float* __restrict__ src, const int* __restrict__ positions,
                          typename C::storage* __restrict__ cache, u32 n_tokens,
                          u32 n_kv_heads, u32 head_dim, u32 capacity) {
    chain_after_prior_grids(src, positions);
    const u32 t = blockIdx.x;
    const int pos = positions[t];
    if (pos < 0 || (u32)pos >= capacity) {
        return;
    }
    int shadowed = 0;
    for (u32 later = t + 1 + threadIdx.x; later < n_tokens; later += blockDim.x) {
        shadowed |= positions[later] == pos;
    }
    if (__syncthreads_or(shadowed)) {
        return;
    }
    const u32 per_token = n_kv_heads * head_dim;
    const float* s = src + (u64)t * per_token;
    for (u32 i = threadIdx.x; i < per_token; i += blockDim.x) {
        const u32 h = i / head_dim;
        const u32 d = i - h * head_dim;
        cache[((u64)h * capacity + (u32)pos) * head_dim + d] = C::store(s[i]);
    }
}

}  // namespace kiln
