// RMSNorm and residual-add + RMSNorm over rows of f32: one block per row.
//
// For row r: v = x[r] (+ residual[r], stored to sum[r] when AddResidual), then
// out[r, i] = v[i] * (1 / sqrt(mean(v^2) + eps)) * (HasWeight ? weight[i] : 1), and,
// when out_q8 is not null, out rounded to Q8_1 blocks into out_q8 (dim must then be a
// multiple of 32). Pointers a specialisation does not use may be null.
//
// Rows of a multiple of 4 elements, at most NORM_VECTORS float4s per thread, are read
// once into registers (all of a thread's loads issued before the first use), reduced,
// and written from them; other rows take two passes over memory.
#include "common.cuh"

namespace kiln {

template <bool HasWeight, bool AddResidual>
__device__ __forceinline__ void rms_norm_vectors(const float* __restrict__ x,
                                                 const float* __restrict__ residual,
                                                 const float* __restrict__ weight,
                                                 float* __restrict__ sum, float* __restrict__ out,
                                                 u8* __restrict__ out_q8, u32 dim, float eps) {
    const u64 row = blockIdx.x;
    const u32 vectors = dim / 4;
    const float4* xr = reinterpret_cast<const float4*>(x + row * dim);
    float4 v[NORM_VECTORS];
#pragma unroll
    for (u32 j = 0; j < NORM_VECTORS; ++j) {
        const u32 i = threadIdx.x + j * blockDim.x;
        v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (i < vectors) {
            v[j] = xr[i];
            if (AddResidual) {
                const float4 r = reinterpret_cast<const float4*>(residual + row * dim)[i];
                v[j] = make_float4(v[j].x + r.x, v[j].y + r.y, v[j].z + r.z, v[j].w + r.w);
            }
        }
    }
    float squares = 0.0f;
#pragma unroll
    for (u32 j = 0; j < NORM_VECTORS; ++j) {
        const u32 i = threadIdx.x + j * blockDim.x;
        if (i < vectors) {
            if (AddResidual) {
                reinterpret_cast<float4*>(sum + row * dim)[i] = v[j];
            }
            squares += v[j].x * v[j].x;
            squares += v[j].y * v[j].y;
            squares += v[j].z * v[j].z;
            squares += v[j].w * v[j].w;
        }
    }
    const float scale = 1.0f / sqrtf(block_sum(squares) / (float)dim + eps);
#pragma unroll
    for (u32 j = 0; j < NORM_VECTORS; ++j) {
        const u32 i = threadIdx.x + j * blockDim.x;
        if (j * blockDim.x >= vectors) {
            break;  // block-uniform
        }
        float4 w = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        if (HasWeight && i < vectors) {
            w = reinterpret_cast<const float4*>(weight)[i];
        }
        const float4 o = make_float4(v[j].x * scale * w.x, v[j].y * scale * w.y,
                                     v[j].z * scale * w.z, v[j].w * scale * w.w);
        if (i < vectors) {
            reinterpret_cast<float4*>(out + row * dim)[i] = o;
        }
        if (out_q8 != nullptr) {
            // 8 consecutive threads hold a block; blocks of 32 divide dim, so a block's
            // threads are all in the row or all past it.
            const u64 e = row * dim + 4 * (u64)i;
            store_q8_1_block4(o, i < vectors, out_q8 + e / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
        }
    }
}

template <bool HasWeight, bool AddResidual>
__global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ residual,
                         const float* __restrict__ weight, float* __restrict__ sum,
                         float* __restrict__ out, u8* __restrict__ out_q8, u32 dim,
                         float eps) {
    chain_after_prior_grids(x, residual);
    if (dim % 4 == 0 && dim / 4 <= NORM_VECTORS * blockDim.x) {
        rms_norm_vectors<HasWeight, AddResidual>(x, residual, weight, sum, out, out_q8, dim, eps);
        return;
    }
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
