// RMSNorm and residual-add + RMSNorm over rows of f32: one block per row.
//
// For row r: v = x[r] (+ residual[r], stored to sum[r] when AddResidual), then
// out[r, i] = v[i] * (1 / sqrt(mean(v^2) + eps)) * (HasWeight ? weight[i] : 1), and,
// when out_q8 is not null, out rounded to Q8_1 blocks (store_q8_1_block) into out_q8
// (dim must then be a multiple of 32, so that each warp's 32 consecutive elements are
// one block). Pointers a specialisation does not use may be null.
#include "common.cuh"

namespace kiln {

template <bool HasWeight, bool AddResidual>
__global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ residual,
                         const float* __restrict__ weight, float* __restrict__ sum,
                         float* __restrict__ out, u8* __restrict__ out_q8, u32 dim,
                         float eps) {
    chain_after_prior_grids(x, residual);
    const u64 row_start = (u64)blockIdx.x * dim;
    const float* xr = x + row_start;
    float* outr = out + row_start;

    float squares = 0.0f;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (AddResidual) {
            v += residual[row_start + i];
            sum[row_start + i] = v;
        }
        squares += v * v;
    }
    const float scale = 1.0f / sqrtf(block_sum(squares) / (float)dim + eps);

    // Each thread reads back only the sums it wrote itself.
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = AddResidual ? sum[row_start + i] : xr[i];
        const float w = HasWeight ? weight[i] : 1.0f;
        const float o = v * scale * w;
        outr[i] = o;
        if (out_q8 != nullptr) {
            store_q8_1_block(o, out_q8 + (row_start + i) / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
        }
    }
}

}  // namespace kiln
