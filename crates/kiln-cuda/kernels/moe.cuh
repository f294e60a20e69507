// What moe.cu's combine and the routed mat-vec that combines in its epilogue
// (matvec.cu) share: the weighted sum of a token's expert outputs.
#pragma once
#include "common.cuh"

namespace kiln {

// v plus the weighted sum of token t's k expert outputs at element i, y being [tokens,
// k, n] and load(p) its element p: v += weights[t, j] * y[t, j, i] for j = 0 .. k - 1,
// in that order (kiln_core::ops::MoeCombine's order after the residual).
template <typename Load>
__device__ __forceinline__ float add_routed(float v, const float* weights, u64 t, u64 i, u32 k,
                                            u32 n, Load load) {
    for (u32 j = 0; j < k; ++j) {
        v += weights[t * k + j] * load((t * k + j) * n + i);
    }
    return v;
}

}  // namespace kiln
