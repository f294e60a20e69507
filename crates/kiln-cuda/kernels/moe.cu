// Mixture of experts: the router's top-k choice and the weighted combine of the
// experts' outputs (kiln_core::ops::MoeRouter, MoeCombine).
//
// moe_router: one block per token (route_token). The token's n_expert probabilities
// (softmax over its logits, or each logit's sigmoid) go to shared memory; then k rounds
// each pick the largest untaken probability with one block-wide maximum of 64-bit keys,
// (order of the value) << 32 | ~expert, so that ties go to the lower expert and NaN
// (order 0) comes after every number. Thread 0 writes the pick and, with `normalize`,
// divides the k weights by their sum taken in pick order, as the CPU reference does.
//
// moe_router_matvec: a one-token router fused with the f32 product that computes its
// logits (kiln_core::ops::MatMul): the blocks of the staged mat-vec (matvec_staged.cuh)
// each write their logits, and the last block to finish routes the token with
// route_token, so that logits, ids and weights are bit for bit the unfused pair's.
//
// moe_combine: one thread per output element, summing in the definition's order:
// residual, slots 0..k, the shared expert times the sigmoid of its gate.
//
// moe_group: the first launch of the expert-routed mat-mat (described with its
// second, moe_matmul, in matmul.cu).
#include "matvec_staged.cuh"
#include "moe.cuh"
#include "reduce.cuh"

namespace kiln {

// The rank of probability p of `expert`: larger keys are picked first.
__device__ __forceinline__ u64 moe_key(float p, u32 expert) {
    if (isnan(p)) {
        return (u64)(~expert);
    }
    const u32 bits = __float_as_uint(p == 0.0f ? 0.0f : p);
    const u32 order = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)order << 32) | (u64)(~expert);
}

__device__ __forceinline__ u64 max_key(u64 a, u64 b) { return a > b ? a : b; }

// The largest of every thread's `key`; every thread gets it. `scratch` holds 32 keys
// of shared memory; the trailing barrier makes it free for the next call.
__device__ __forceinline__ u64 block_max_key(u64 key, u64* scratch) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        key = max_key(key, __shfl_xor_sync(0xffffffffu, key, offset));
    }
    if (lane == 0) {
        scratch[warp] = key;
    }
    __syncthreads();
    u64 r = lane < (blockDim.x >> 5) ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        r = max_key(r, __shfl_xor_sync(0xffffffffu, r, offset));
    }
    __syncthreads();
    return r;
}

// Routes the token whose n_expert logits are at `l`: its k experts to row_ids and
// their weights to row_weights. Every thread of the block calls it; blockDim.x is a
// multiple of 32 and at most 1024, and the order of the sums depends on it. Dynamic
// shared memory: n_expert floats, then n_expert flags. The logits are read through
// L2 (__ldcg): in moe_router_matvec other blocks of the grid wrote them.
template <bool Sigmoid>
__device__ __forceinline__ void route_token(const float* l, int* row_ids, float* row_weights,
                                            u32 n_expert, u32 k, u32 normalize) {
    extern __shared__ float probs[];
    u8* taken = reinterpret_cast<u8*>(probs + n_expert);
    __shared__ float scratch[32];
    __shared__ u64 key_scratch[32];
    if (Sigmoid) {
        for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
            probs[e] = 1.0f / (1.0f + expf(-__ldcg(l + e)));
            taken[e] = 0;
        }
    } else {
        float mx = neg_inf();
        for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
            mx = fmaxf(mx, __ldcg(l + e));
        }
        mx = block_reduce<MaxOp>(mx, scratch);
        float sum = 0.0f;
        for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
            const float v = expf(__ldcg(l + e) - mx);
            probs[e] = v;
            taken[e] = 0;
            sum += v;
        }
        sum = block_reduce<SumOp>(sum, scratch);
        for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
            probs[e] = probs[e] / sum;
        }
    }
    __syncthreads();
    for (u32 j = 0; j < k; ++j) {
        u64 best = 0;
        for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
            if (!taken[e]) {
                best = max_key(best, moe_key(probs[e], e));
            }
        }
        best = block_max_key(best, key_scratch);
        if (threadIdx.x == 0) {
            const u32 e = ~(u32)best;
            row_ids[j] = (int)e;
            row_weights[j] = probs[e];
            taken[e] = 1;
        }
        __syncthreads();
    }
    if (normalize && threadIdx.x == 0) {
        float sum = 0.0f;
        for (u32 j = 0; j < k; ++j) {
            sum += row_weights[j];
        }
        for (u32 j = 0; j < k; ++j) {
            row_weights[j] = row_weights[j] / sum;
        }
    }
}

// ids and weights: [tokens, k]. One block per token; dynamic shared memory:
// route_token's.
template <bool Sigmoid>
__global__ void moe_router(const float* __restrict__ logits, int* __restrict__ ids,
                           float* __restrict__ weights, u32 n_expert, u32 k, u32 normalize) {
    chain_after_prior_grids(logits);
    route_token<Sigmoid>(logits + (u64)blockIdx.x * n_expert, ids + (u64)blockIdx.x * k,
                         weights + (u64)blockIdx.x * k, n_expert, k, normalize);
}

// logits[j] = sum_l x[l] * w[j, l] (+ bias[j]) for one token's x of `cols` elements and
// a weight of W (an f32 router weight) of n_expert rows of row_bytes, then that
// token's k experts and weights as moe_router computes them. Grid: the staged
// mat-vec's blocks for n_expert rows (ROWS per block) of MATVEC_THREADS, the size of
// moe_router's blocks (ops/router_matvec.rs checks it), so that the router's sums run
// in moe_router's order; dynamic shared memory: the larger of the mat-vec's and the
// router's. *ticket is 0 before the launch and after.
//
// Each block writes its rows' logits, then its thread 0 fences (which, after the
// barrier, orders every thread's logits before the ticket) and takes a ticket; the
// block that takes the last one fences again, so that every block's logits are visible
// to its reads (__ldcg, past the SM's L1), routes the token and resets the ticket.
template <typename W, bool Sigmoid, u32 ROWS, u32 LOAD, u32 STAGES>
__global__ void __launch_bounds__(MATVEC_THREADS)
    moe_router_matvec(const u8* __restrict__ w, const float* __restrict__ x,
                      const float* __restrict__ bias, float* logits, int* __restrict__ ids,
                      float* __restrict__ weights, u32* ticket, u32 n_expert, u32 cols,
                      u64 row_bytes, u32 k, u32 normalize) {
    chain_after_prior_grids(x, ticket);
    matvec_block<W, 1, ROWS, LOAD, STAGES>(w, x, nullptr, bias, logits, 1, n_expert, cols,
                                           row_bytes);
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) {
        return;
    }
    __threadfence();
    if (threadIdx.x == 0) {
        *ticket = 0;
    }
    route_token<Sigmoid>(logits, ids, weights, n_expert, k, normalize);
}

// out[t, i] = residual[t, i] + sum_j weights[t, j] * y[t, j, i]
//             + sigmoid(shared_gate[t]) * shared[t, i]; absent operands are null.
__global__ void moe_combine(const float* __restrict__ y, const float* __restrict__ weights,
                            const float* __restrict__ residual, const float* __restrict__ shared,
                            const float* __restrict__ shared_gate, float* __restrict__ out,
                            u64 len, u32 k, u32 n) {
    chain_after_prior_grids(y, weights, residual, shared, shared_gate);
    for (u64 idx = global_index(); idx < len; idx += grid_stride()) {
        const u64 t = idx / n;
        const u64 i = idx % n;
        float v = add_routed(residual ? residual[idx] : 0.0f, weights, t, i, k, n,
                             [&](u64 p) { return y[p]; });
        if (shared) {
            const float g = shared_gate ? 1.0f / (1.0f + expf(-shared_gate[t])) : 1.0f;
            v += g * shared[idx];
        }
        out[idx] = v;
    }
}

// The exclusive prefix sums over the block's threads of two counts (one pair per
// thread, in thread order), and the totals; `scratch` holds 2 x 32 ints of shared
// memory; the trailing barrier makes it free again.
__device__ __forceinline__ void block_exclusive_scan2(int& a, int& b, int& total_a, int& total_b,
                                                      int (*scratch)[32]) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    int ia = a, ib = b;  // inclusive within the warp
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int ua = __shfl_up_sync(0xffffffffu, ia, offset);
        const int ub = __shfl_up_sync(0xffffffffu, ib, offset);
        if ((int)lane >= offset) {
            ia += ua;
            ib += ub;
        }
    }
    if (lane == 31) {
        scratch[0][warp] = ia;
        scratch[1][warp] = ib;
    }
    __syncthreads();
    const u32 warps = blockDim.x >> 5;
    int before_a = 0, before_b = 0;
    total_a = 0;
    total_b = 0;
    for (u32 w = 0; w < warps; ++w) {
        if (w < warp) {
            before_a += scratch[0][w];
            before_b += scratch[1][w];
        }
        total_a += scratch[0][w];
        total_b += scratch[1][w];
    }
    a = before_a + ia - a;
    b = before_b + ib - b;
    __syncthreads();
}

// Launched serialized, one block of MOE_GROUP_THREADS with 8 * n_expert bytes of
// dynamic shared memory. ids: the m * k = `slots` expert ids; order: `slots` ints;
// tiles: 3 * max_tiles ints, max_tiles at least the tiles needed (the dispatch's bound);
// out: the product's [slots, rows] output, whose rows of invalid ids get NaN.
__global__ void __launch_bounds__(MOE_GROUP_THREADS)
    moe_group(const int* __restrict__ ids, int* __restrict__ order, int* __restrict__ tiles,
              float* __restrict__ out, u32 slots, u32 n_expert, u32 rows, u32 max_tiles) {
    extern __shared__ int counts[];  // n_expert counts (then cursors), n_expert offsets
    int* offsets = counts + n_expert;
    __shared__ int scratch[2][32];
    for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
        counts[e] = 0;
    }
    __syncthreads();
    for (u32 s = threadIdx.x; s < slots; s += blockDim.x) {
        const int id = ids[s];
        if (id >= 0 && (u32)id < n_expert) {
            atomicAdd(&counts[id], 1);
        }
    }
    __syncthreads();
    // Each thread takes a run of consecutive experts.
    const u32 per = (n_expert + blockDim.x - 1) / blockDim.x;
    const u32 e0 = min(threadIdx.x * per, n_expert), e1 = min(e0 + per, n_expert);
    int first = 0, tile = 0;
    for (u32 e = e0; e < e1; ++e) {
        first += counts[e];
        tile += (counts[e] + (int)MM_BM - 1) / (int)MM_BM;
    }
    int total_slots, total_tiles;
    block_exclusive_scan2(first, tile, total_slots, total_tiles, scratch);
    for (u32 e = e0; e < e1; ++e) {
        const int c = counts[e];
        offsets[e] = first;
        for (int j = 0; j < c; j += (int)MM_BM, ++tile) {
            tiles[3 * tile] = (int)e;
            tiles[3 * tile + 1] = first + j;
            tiles[3 * tile + 2] = min((int)MM_BM, c - j);
        }
        first += c;
    }
    for (u32 t = (u32)total_tiles + threadIdx.x; t < max_tiles; t += blockDim.x) {
        tiles[3 * t] = -1;
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < n_expert; e += blockDim.x) {
        counts[e] = 0;
    }
    __syncthreads();
    for (u32 s = threadIdx.x; s < slots; s += blockDim.x) {
        const int id = ids[s];
        if (id >= 0 && (u32)id < n_expert) {
            order[offsets[id] + atomicAdd(&counts[id], 1)] = (int)s;
        } else {
            for (u32 r = 0; r < rows; ++r) {
                out[(u64)s * rows + r] = __int_as_float(0x7fffffff);
            }
        }
    }
}

}  // namespace kiln
