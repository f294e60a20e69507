// Row-wise softmax with a scale and an optional causal mask; one block per row.
//
// Row r sees columns 0 .. visible, visible = cols without a mask, else
// min(cols, causal_offset + r + 1). out[r, c] = exp(scale x[r, c] - max) / sum for
// visible columns, 0 for masked ones, with max and sum over the visible columns.
#include "reduce.cuh"

namespace kiln {

template <bool Causal>
__global__ void softmax(const float* __restrict__ x, float* __restrict__ out, u32 cols,
                        float scale, u64 causal_offset) {
    chain_after_prior_grids(x);
    __shared__ float scratch[32];
    const u64 r = blockIdx.x;
    const float* xr = x + r * cols;
    float* outr = out + r * cols;
    u32 visible = cols;
    if (Causal) {
        const u64 v = causal_offset + r + 1;
        visible = v < (u64)cols ? (u32)v : cols;
    }

    float max = neg_inf();
    for (u32 c = threadIdx.x; c < visible; c += blockDim.x) {
        max = fmaxf(max, xr[c] * scale);
    }
    max = block_reduce<MaxOp>(max, scratch);

    float sum = 0.0f;
    for (u32 c = threadIdx.x; c < visible; c += blockDim.x) {
        sum += expf(xr[c] * scale - max);
    }
    sum = block_reduce<SumOp>(sum, scratch);

    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        outr[c] = c < visible ? expf(xr[c] * scale - max) / sum : 0.0f;
    }
}

}  // namespace kiln
