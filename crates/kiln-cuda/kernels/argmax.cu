// Index of the largest value of each row of f32; one block per row.
//
// Ties go to the lowest index, NaN is never selected, and a row of only NaN gives 0.
// Each candidate is a 64-bit key, (order of its value) << 32 | ~column, so that the
// largest key is the largest value at its lowest column: one max reduction. -0 is
// ranked as +0 (they are equal values), and 0 stands for "no non-NaN value".
#include "common.cuh"

namespace kiln {

constexpr u32 ARGMAX_UNROLL = 4;

// The key of value v at column c (0 for NaN).
__device__ __forceinline__ u64 argmax_key(float v, u32 c) {
    if (isnan(v)) {
        return 0;
    }
    const u32 bits = __float_as_uint(v == 0.0f ? 0.0f : v);
    const u32 order = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)order << 32) | (u64)(~c);
}

__device__ __forceinline__ u64 max_u64(u64 a, u64 b) { return a > b ? a : b; }

__global__ void argmax(const float* __restrict__ x, int* __restrict__ out, u32 cols) {
    chain_after_prior_grids(x);
    __shared__ u64 best_of_warp[32];
    const float* xr = x + (u64)blockIdx.x * cols;
    u64 best = 0;
    u32 scalar_from = 0;
    if ((reinterpret_cast<u64>(xr) & 15u) == 0) {
        // ARGMAX_UNROLL float4s per thread in flight per step.
        const u32 vectors = cols / 4;
        const float4* xv = reinterpret_cast<const float4*>(xr);
        for (u32 v0 = threadIdx.x; v0 < vectors; v0 += ARGMAX_UNROLL * blockDim.x) {
            float4 p[ARGMAX_UNROLL];
#pragma unroll
            for (u32 j = 0; j < ARGMAX_UNROLL; ++j) {
                const u32 v = v0 + j * blockDim.x;
                p[j] = v < vectors ? xv[v] : make_float4(__int_as_float(0x7fc00000), 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (u32 j = 0; j < ARGMAX_UNROLL; ++j) {
                const u32 v = v0 + j * blockDim.x;
                if (v < vectors) {
                    best = max_u64(best, argmax_key(p[j].x, 4 * v));
                    best = max_u64(best, argmax_key(p[j].y, 4 * v + 1));
                    best = max_u64(best, argmax_key(p[j].z, 4 * v + 2));
                    best = max_u64(best, argmax_key(p[j].w, 4 * v + 3));
                }
            }
        }
        scalar_from = vectors * 4;
    }
    for (u32 c = scalar_from + threadIdx.x; c < cols; c += blockDim.x) {
        best = max_u64(best, argmax_key(xr[c], c));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        best = max_u64(best, __shfl_xor_sync(0xffffffffu, best, offset));
    }
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_of_warp[warp] = best;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < (blockDim.x >> 5) ? best_of_warp[lane] : 0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            best = max_u64(best, __shfl_xor_sync(0xffffffffu, best, offset));
        }
        if (lane == 0) {
            out[blockIdx.x] = best == 0 ? 0 : (int)(~(u32)best);
        }
    }
}

}  // namespace kiln
