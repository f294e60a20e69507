// Index of the largest value of each row of f32; one block per row.
//
// Ties go to the lowest index, NaN is never selected, and a row of only NaN gives 0.
#include "common.cuh"

namespace kiln {

// A candidate: a value and its column. `col == NONE` means no non-NaN value yet.
struct Best {
    float value;
    u32 col;
};

constexpr u32 NONE = 0xffffffffu;

// The better of two candidates: the larger value, the lower column on equal values.
__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.col == NONE) {
        return a;
    }
    if (a.col == NONE || b.value > a.value || (b.value == a.value && b.col < a.col)) {
        return b;
    }
    return a;
}

__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        Best other;
        other.value = __shfl_xor_sync(0xffffffffu, b.value, offset);
        other.col = __shfl_xor_sync(0xffffffffu, b.col, offset);
        b = better(b, other);
    }
    return b;
}

__global__ void argmax(const float* __restrict__ x, int* __restrict__ out, u32 cols) {
    chain_after_prior_grids(x);
    __shared__ float values[32];
    __shared__ u32 columns[32];
    const float* xr = x + (u64)blockIdx.x * cols;
    Best b = {0.0f, NONE};
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c];
        if (!isnan(v)) {
            b = better(b, Best{v, c});
        }
    }
    b = warp_best(b);
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    if (lane == 0) {
        values[warp] = b.value;
        columns[warp] = b.col;
    }
    __syncthreads();
    if (warp == 0) {
        const u32 warps = blockDim.x >> 5;
        Best w = lane < warps ? Best{values[lane], columns[lane]} : Best{0.0f, NONE};
        w = warp_best(w);
        if (lane == 0) {
            out[blockIdx.x] = w.col == NONE ? 0 : (int)w.col;
        }
    }
}

}  // namespace kiln
