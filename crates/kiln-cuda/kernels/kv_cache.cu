// KV-cache append: cache[slot(t), h, positions[t], :] = src[t, h, :], stored as the
// cache's element type (F32, or F16 rounded to nearest even); the cache is
// [n_slots, n_kv_heads, capacity, head_dim] and slot(t) is token_slot(slots, t). One
// block per token.
//
// A position outside 0..capacity, or a slot outside 0..n_slots, is skipped. When
// several tokens of one call share a slot and a position, the last of them is written
// (as the sequential definition does): a token whose (slot, position) reappears later
// in the call writes nothing.
#include "common.cuh"

namespace kiln {

template <typename C>
__global__ void kv_append(const float* __restrict__ src, const int* __restrict__ positions,
                          const int* slots, typename C::storage* __restrict__ cache,
                          u32 n_tokens, u32 n_kv_heads, u32 head_dim, u32 capacity,
                          u32 n_slots) {
    chain_after_prior_grids(src, positions);
    const u32 t = blockIdx.x;
    const int pos = positions[t];
    const int slot = token_slot(slots, t, n_slots);
    if (pos < 0 || (u32)pos >= capacity || slot < 0) {
        return;
    }
    int shadowed = 0;
    for (u32 later = t + 1 + threadIdx.x; later < n_tokens; later += blockDim.x) {
        shadowed |= positions[later] == pos && token_slot(slots, later, n_slots) == slot;
    }
    if (__syncthreads_or(shadowed)) {
        return;
    }
    const u32 per_token = n_kv_heads * head_dim;
    const float* s = src + (u64)t * per_token;
    typename C::storage* slot_cache = cache + (u64)slot * n_kv_heads * capacity * head_dim;
    for (u32 i = threadIdx.x; i < per_token; i += blockDim.x) {
        const u32 h = i / head_dim;
        const u32 d = i - h * head_dim;
        slot_cache[((u64)h * capacity + (u32)pos) * head_dim + d] = C::store(s[i]);
    }
}

}  // namespace kiln
