// Warp and block reductions that a kernel may call any number of times.
#pragma once
#include "common.cuh"

namespace kiln {

// -inf as a float.
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

struct SumOp {
    static __device__ __forceinline__ float identity() { return 0.0f; }
    static __device__ __forceinline__ float apply(float a, float b) { return a + b; }
};

// The maximum; -inf is the identity, and a NaN operand is ignored (fmaxf).
struct MaxOp {
    static __device__ __forceinline__ float identity() { return neg_inf(); }
    static __device__ __forceinline__ float apply(float a, float b) { return fmaxf(a, b); }
};

// Op over the 32 lanes of a warp; every lane gets the result.
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Op over the block; every thread gets the result. blockDim.x must be a multiple of 32
// and at most 1024, and every thread of the block must call it. `scratch` holds 32
// floats of shared memory; the trailing barrier makes it free for the next call.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    v = warp_reduce<Op>(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    const u32 warps = blockDim.x >> 5;
    float r = lane < warps ? scratch[lane] : Op::identity();
    r = warp_reduce<Op>(r);
    __syncthreads();
    return r;
}

}  // namespace kiln
