// Binary element-wise functions over f32 vectors: out[i] = F::apply(a[i], b[i]), and,
// when out_q8 is not null, out rounded to Q8_1 blocks (store_q8_1_block) into out_q8
// (len must then be a multiple of 32; blocks of threads are whole warps, so each
// warp's 32 consecutive elements are one block).
#include "common.cuh"
#include "functors.cuh"

namespace kiln {

template <typename F>
__global__ void elementwise(const float* __restrict__ a, const float* __restrict__ b,
                            float* __restrict__ out, u8* __restrict__ out_q8, u64 len) {
    chain_after_prior_grids(a, b);
    for (u64 i = global_index(); i < len; i += grid_stride()) {
        const float o = F::apply(a[i], b[i]);
        out[i] = o;
        if (out_q8 != nullptr) {
            store_q8_1_block(o, out_q8 + i / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
        }
    }
}

// kiln_core::ops::Glu: out[r, i] = F::apply(x[r, i], x[r, n + i]) for x of rows of
// 2n and out of rows of n (len = rows * n elements), with out's Q8_1 copy when out_q8
// is not null (n a multiple of 32, so that a block is in one row).
// Rows of a multiple of 4 elements go 4 at a time (16-byte loads and stores; a Q8_1
// block is then 8 consecutive threads, store_q8_1_block4).
template <typename F>
__global__ void glu(const float* __restrict__ x, float* __restrict__ out, u8* __restrict__ out_q8,
                    u64 n, u64 len) {
    chain_after_prior_grids(x);
    if (n % 4 == 0) {
        const u64 vectors = len / 4;
        for (u64 v0 = global_index() - (threadIdx.x & 31u); v0 < vectors; v0 += grid_stride()) {
            const u64 v = v0 + (threadIdx.x & 31u);
            const bool live = v < vectors;
            const u64 i = 4 * (live ? v : v0);
            const u64 row = i / n;
            const float* xr = x + row * 2 * n + (i - row * n);
            const float4 g = *reinterpret_cast<const float4*>(xr);
            const float4 u = *reinterpret_cast<const float4*>(xr + n);
            const float4 o = make_float4(F::apply(g.x, u.x), F::apply(g.y, u.y),
                                         F::apply(g.z, u.z), F::apply(g.w, u.w));
            if (live) {
                *reinterpret_cast<float4*>(out + i) = o;
            }
            if (out_q8 != nullptr) {
                store_q8_1_block4(o, live, out_q8 + i / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
            }
        }
        return;
    }
    for (u64 i = global_index(); i < len; i += grid_stride()) {
        const u64 row = i / n;
        const float* xr = x + row * 2 * n + (i - row * n);
        const float o = F::apply(xr[0], xr[n]);
        out[i] = o;
        if (out_q8 != nullptr) {
            store_q8_1_block(o, out_q8 + i / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
        }
    }
}

}  // namespace kiln
