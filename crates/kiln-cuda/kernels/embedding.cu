// Embedding: out[t, :] = dequantize(table[ids[t], :]) for a table of any weight format,
// and, when out_q8 is not null, out rounded to Q8_1 blocks into out_q8 (dim must then be
// a multiple of 32).
//
// Grid: (n_tokens, ceil(dim / (8 * blockDim.x))), blocks of whole warps; each thread
// decodes one chunk of 8 elements of its token's row, so a Q8_1 block is the chunks of
// 4 consecutive threads (store_q8_1_block8). Threads past the row stay to the end, as
// every lane of a warp takes part in the copy's shuffles: with dim a multiple of 32 a
// block's 4 threads are all in the row or all past it. An id outside 0..vocab gives a
// row of zeros, never a read outside the table.
#include "quant.cuh"

namespace kiln {

template <typename W>
__global__ void embedding(const u8* __restrict__ table, const int* __restrict__ ids,
                          float* __restrict__ out, u8* __restrict__ out_q8, u32 vocab, u32 dim,
                          u64 row_bytes) {
    chain_after_prior_grids(ids);
    const u32 t = blockIdx.x;
    const u32 e = 8u * (blockIdx.y * blockDim.x + threadIdx.x);
    const bool live = e < dim;
    const int id = ids[t];
    float v[8];
    if (live && id >= 0 && (u32)id < vocab) {
        decode_chunk<W>(table + (u64)id * row_bytes, e, dim, v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[i] = 0.0f;
        }
    }
    const u64 at = (u64)t * dim + e;
    if (live) {
        float* o = out + at;
        const u32 n = dim - e < 8u ? dim - e : 8u;
#pragma unroll
        for (u32 i = 0; i < 8; ++i) {
            if (i < n) {
                o[i] = v[i];
            }
        }
    }
    if (out_q8 != nullptr) {
        store_q8_1_block8(v, live, out_q8 + at / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES);
    }
}

}  // namespace kiln
