// Embedding: out[t, :] = dequantize(table[ids[t], :]) for a table of any weight format.
//
// Grid: (n_tokens, ceil(dim / (8 * blockDim.x))); each thread decodes one chunk of 8
// elements of its token's row. An id outside 0..vocab gives a row of zeros, never a
// read outside the table.
#include "quant.cuh"

namespace kiln {

template <typename W>
__global__ void embedding(const u8* __restrict__ table, const int* __restrict__ ids,
                          float* __restrict__ out, u32 vocab, u32 dim, u64 row_bytes) {
    chain_after_prior_grids(ids);
    const u32 t = blockIdx.x;
    const u32 e = 8u * (blockIdx.y * blockDim.x + threadIdx.x);
    if (e >= dim) {
        return;
    }
    const int id = ids[t];
    float v[8];
    if (id >= 0 && (u32)id < vocab) {
        decode_chunk<W>(table + (u64)id * row_bytes, e, dim, v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[i] = 0.0f;
        }
    }
    float* o = out + (u64)t * dim + e;
    const u32 n = dim - e < 8u ? dim - e : 8u;
#pragma unroll
    for (u32 i = 0; i < 8; ++i) {
        if (i < n) {
            o[i] = v[i];
        }
    }
}

}  // namespace kiln
