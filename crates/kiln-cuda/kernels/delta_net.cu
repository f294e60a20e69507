// The Gated DeltaNet ops (kiln_core::ops::delta_net): causal conv1d with a rolling
// state, the gated delta rule (recurrent, token by token, and chunkwise for prompts),
// gated RMSNorm and L2 norm. Each computes what its op's definition says, in f32; the
// chunkwise form's products run on tensor cores in 3xTF32 (below), close to f32.
#include "common.cuh"
#include "reduce.cuh"

namespace kiln {

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// One thread per channel c (grid-stride), tokens in order. With s the channel's
// kernel - 1 state values followed by its n_tokens inputs:
// out[t, c] = silu(sum_j weight[c, j] * s[t + j]); then state[c, :] = the last
// kernel - 1 values of s. The state is rewritten in ascending order, each value read
// from an index at or above the one written, so nothing is read after it changes.
__global__ void causal_conv1d(const float* __restrict__ x, const float* __restrict__ weight,
                              float* __restrict__ state, float* __restrict__ out,
                              u32 n_tokens, u32 channels, u32 kernel) {
    chain_after_prior_grids(x, state);
    const u32 history = kernel - 1;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += grid_stride()) {
        const float* w = weight + c * kernel;
        float* st = state + c * history;
        auto seq = [&](u32 i) -> float {
            return i < history ? st[i] : x[(u64)(i - history) * channels + c];
        };
        for (u32 t = 0; t < n_tokens; ++t) {
            float sum = 0.0f;
            for (u32 j = 0; j < kernel; ++j) {
                sum += w[j] * seq(t + j);
            }
            out[(u64)t * channels + c] = silu(sum);
        }
        for (u32 i = 0; i < history; ++i) {
            st[i] = seq(n_tokens + i);
        }
    }
}

// One block per (value head h, tile of 32 value columns) of DN_REC_WARPS warps, tokens
// in order. Lane l of warp w owns column j = 32 blockIdx.y + l of the head's state S
// (d_k x d_v, row-major at state + h * d_k * d_v) at rows i = w + DN_REC_WARPS r: the
// first DN_REC_ROWS of them stay in registers from the first token to the last (read
// once, written once), any further ones (d_k > DN_REC_WARPS * DN_REC_ROWS) are read and
// written in global memory each token. Per token the block requests the token's
// query and key head (h % n_k_heads when tiled, else h / group:
// kiln_core::ops::HeadLayout), value column and gate inputs together, normalizes the
// query and key into shared memory (`qk`: 2 * d_k floats; both sums of squares in one
// pass over the block), then per
// column S = exp(g) S, d = beta (v_j - S[:, j] . k), S[:, j] += k d, out = S[:, j] . q;
// each dot product is summed by every warp over its rows, then over the warps in order.
// The held rows are loaded before the wait for the kernels before this one
// (common.cuh): only this op writes the state, and no launch of it follows another
// writer of its state directly (the kernel just before has passed its own wait, so
// every earlier writer has completed).
__global__ void __launch_bounds__(32 * DN_REC_WARPS)
    gated_delta_net(const float* __restrict__ qkv, const float* __restrict__ a,
                    const float* __restrict__ b, const float* __restrict__ ssm_a,
                    const float* __restrict__ dt_bias, float* __restrict__ state,
                    float* __restrict__ out, u32 n_tokens, u32 n_k_heads, u32 n_v_heads,
                    u32 d_k, u32 d_v, u32 tiled, float eps) {
    extern __shared__ float qk[];
    __shared__ float2 scratch[DN_REC_WARPS];
    __shared__ float kv_part[DN_REC_WARPS][32];
    __shared__ float out_part[DN_REC_WARPS][32];
    float* q = qk;
    float* k = qk + d_k;
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 h = blockIdx.x;
    const u32 kh = tiled ? h % n_k_heads : h / (n_v_heads / n_k_heads);
    const u32 j = blockIdx.y * 32u + lane;
    const bool owns_column = j < d_v;
    const u64 width = 2ull * n_k_heads * d_k + (u64)n_v_heads * d_v;
    // The held rows' loads go out first, before the wait and the token's inputs.
    float held[DN_REC_ROWS];
    {
        const float* early = state + (u64)h * d_k * d_v + j;
#pragma unroll
        for (u32 r = 0; r < DN_REC_ROWS; ++r) {
            const u32 i = warp + DN_REC_WARPS * r;
            held[r] = owns_column && i < d_k ? early[(u64)i * d_v] : 0.0f;
        }
    }
    chain_after_prior_grids(qkv, a, b, state);
    float* s = state + (u64)h * d_k * d_v + j;
    const u32 first_unheld = DN_REC_WARPS * DN_REC_ROWS + warp;
    const float rate = ssm_a[h];
    const float q_scale = 1.0f / sqrtf((float)d_k);
    for (u32 t = 0; t < n_tokens; ++t) {
        const float* row = qkv + t * width;
        // The token's gate inputs and value, requested with its query and key so that
        // one round trip to memory brings all of them.
        const u64 gate = (u64)t * n_v_heads + h;
        const float a_t = a[gate];
        const float b_t = b[gate];
        const float v = owns_column ? row[2ull * n_k_heads * d_k + (u64)h * d_v + j] : 0.0f;
        float qq = 0.0f;
        float kk = 0.0f;
        for (u32 i = threadIdx.x; i < d_k; i += blockDim.x) {
            const float qi = row[(u64)kh * d_k + i];
            const float ki = row[(u64)(n_k_heads + kh) * d_k + i];
            q[i] = qi;
            k[i] = ki;
            qq += qi * qi;
            kk += ki * ki;
        }
        // Both sums over the block in one pass (the barrier after the scaling below
        // frees `scratch` for the next token).
        qq = warp_reduce<SumOp>(qq);
        kk = warp_reduce<SumOp>(kk);
        if (lane == 0) {
            scratch[warp] = make_float2(qq, kk);
        }
        __syncthreads();
        const float2 part = lane < DN_REC_WARPS ? scratch[lane] : make_float2(0.0f, 0.0f);
        const float q_inv = q_scale / sqrtf(warp_reduce<SumOp>(part.x) + eps);
        const float k_inv = 1.0f / sqrtf(warp_reduce<SumOp>(part.y) + eps);
        for (u32 i = threadIdx.x; i < d_k; i += blockDim.x) {
            q[i] *= q_inv;
            k[i] *= k_inv;
        }
        __syncthreads();
        const float x = a_t + dt_bias[h];
        const float softplus = x > 20.0f ? x : log1pf(expf(x));
        const float decay = expf(rate * softplus);
        const float beta = 1.0f / (1.0f + expf(-b_t));
        float kv = 0.0f;
#pragma unroll
        for (u32 r = 0; r < DN_REC_ROWS; ++r) {
            const u32 i = warp + DN_REC_WARPS * r;
            if (i < d_k) {
                kv += held[r] * k[i];
            }
        }
        if (owns_column) {
            for (u32 i = first_unheld; i < d_k; i += DN_REC_WARPS) {
                kv += s[(u64)i * d_v] * k[i];
            }
        }
        kv_part[warp][lane] = kv;
        __syncthreads();
        kv = 0.0f;
#pragma unroll
        for (u32 w = 0; w < DN_REC_WARPS; ++w) {
            kv += kv_part[w][lane];
        }
        const float d = beta * (v - decay * kv);
        float o = 0.0f;
#pragma unroll
        for (u32 r = 0; r < DN_REC_ROWS; ++r) {
            const u32 i = warp + DN_REC_WARPS * r;
            if (i < d_k) {
                held[r] = decay * held[r] + k[i] * d;
                o += held[r] * q[i];
            }
        }
        if (owns_column) {
            for (u32 i = first_unheld; i < d_k; i += DN_REC_WARPS) {
                const float si = decay * s[(u64)i * d_v] + k[i] * d;
                s[(u64)i * d_v] = si;
                o += si * q[i];
            }
        }
        out_part[warp][lane] = o;
        // Every thread is done with this token's q, k and kv_part.
        __syncthreads();
        if (warp == 0 && owns_column) {
            o = 0.0f;
#pragma unroll
            for (u32 w = 0; w < DN_REC_WARPS; ++w) {
                o += out_part[w][lane];
            }
            out[gate * d_v + j] = o;
        }
    }
#pragma unroll
    for (u32 r = 0; r < DN_REC_ROWS; ++r) {
        const u32 i = warp + DN_REC_WARPS * r;
        if (owns_column && i < d_k) {
            s[(u64)i * d_v] = held[r];
        }
    }
}

// The chunkwise form (gated_delta_net_chunk) multiplies its matrices with
// mma.sync.m16n8k8 on TF32 operands in 3xTF32: each f32 operand x is split into
// hi, x rounded to TF32 (10 fraction bits, to nearest with ties away from zero), and
// lo = x - hi (exact in f32, at most 2^-11 |x|), which the tensor core reads
// truncated to TF32; a product is lo*hi + hi*lo + hi*hi, accumulated in f32. The
// split represents x within 2^-21 |x| and the dropped lo*lo term is below 2^-22 of
// the product, so each term of a product is within about 2^-20 of its exact value,
// against about 5e-4 for a single TF32 product: too coarse for a state that carries
// its error from chunk to chunk.
struct Tf32Pair {
    u32 hi;
    u32 lo;
};

__device__ __forceinline__ Tf32Pair split_tf32(float x) {
    const u32 hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    return {hi, __float_as_uint(x - __uint_as_float(hi))};
}

// d += a b for one m16n8k8 tile (a row-major 16 x 8, b column-major 8 x 8, TF32; d
// 16 x 8 f32), in the fragment layouts of the PTX ISA.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d[nb] += A B over a strip of 16 rows and 8 NB columns, reduced over k in [0, k_len)
// (a multiple of 8), in 3xTF32: a(r, k) is A's element at row r < 16 of the strip and
// k, b(k, n) B's at k and column n < 8 NB of the strip. Lane l holds the elements
// (l / 4 + 8 (i / 2), 8 nb + 2 (l % 4) + i % 2) of d[nb][i] (strip_row, strip_col).
// Every lane of the warp calls it.
template <u32 NB, typename FA, typename FB>
__device__ __forceinline__ void mma_strip(float (&d)[NB][4], u32 k_len, const FA& a,
                                          const FB& b) {
    const u32 lane = threadIdx.x & 31u;
    const u32 r = lane >> 2;
    const u32 c = lane & 3u;
    for (u32 k = 0; k < k_len; k += 8) {
        const Tf32Pair a0 = split_tf32(a(r, k + c));
        const Tf32Pair a1 = split_tf32(a(r + 8, k + c));
        const Tf32Pair a2 = split_tf32(a(r, k + c + 4));
        const Tf32Pair a3 = split_tf32(a(r + 8, k + c + 4));
        const u32 hi[4] = {a0.hi, a1.hi, a2.hi, a3.hi};
        const u32 lo[4] = {a0.lo, a1.lo, a2.lo, a3.lo};
#pragma unroll
        for (u32 nb = 0; nb < NB; ++nb) {
            const Tf32Pair b0 = split_tf32(b(k + c, 8 * nb + r));
            const Tf32Pair b1 = split_tf32(b(k + c + 4, 8 * nb + r));
            mma_tf32(d[nb], lo, b0.hi, b1.hi);
            mma_tf32(d[nb], hi, b0.lo, b1.lo);
            mma_tf32(d[nb], hi, b0.hi, b1.hi);
        }
    }
}

// The row and column within its strip of accumulator element i of mma_strip's d[nb].
__device__ __forceinline__ u32 strip_row(u32 i) { return ((threadIdx.x & 31u) >> 2) + 8u * (i >> 1); }
__device__ __forceinline__ u32 strip_col(u32 nb, u32 i) {
    return 8u * nb + 2u * (threadIdx.x & 3u) + (i & 1u);
}

// 4 bytes from global `from` to shared `to` without waiting (cp.async).
__device__ __forceinline__ void copy_async_4(float* to, const float* from) {
    const u32 shared = (u32)__cvta_generic_to_shared(to);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared), "l"(from)
                 : "memory");
}

// Waits for this thread's cp.async copies.
__device__ __forceinline__ void copy_async_wait_all() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Shared memory of gated_delta_net_chunk<DK>, in floats (src/ops/delta_net.rs's
// chunk_shared_bytes computes the same total): the chunk's queries then keys (rows of
// DK: Q, K), the block's columns of the state (DK rows of DN_COLS: S), the value tile
// and later the corrections u (DN_CHUNK rows of DN_COLS: X), the decay-weighted key
// products and later their inverse (A, then T), the decay-weighted query-key products
// (P) (DN_CHUNK rows of DN_CHUNK each), and per token the cumulative log-decay G,
// exp(G), exp(G_last - G) and beta. Each row is followed by DN_PAD (rows of DK or
// DN_CHUNK) or DN_COL_PAD (rows of DN_COLS) floats, which makes the fragment loads
// free of bank conflicts (all but the transposed keys of the state update).
template <u32 DK>
struct ChunkLayout {
    static constexpr u32 C = DN_CHUNK;
    static constexpr u32 QK_STRIDE = DK + DN_PAD;
    static constexpr u32 CC_STRIDE = C + DN_PAD;
    static constexpr u32 COL_STRIDE = DN_COLS + DN_COL_PAD;
    static constexpr u32 Q = 0;
    static constexpr u32 K = Q + C * QK_STRIDE;
    static constexpr u32 S = K + C * QK_STRIDE;
    static constexpr u32 X = S + DK * COL_STRIDE;
    static constexpr u32 A = X + C * COL_STRIDE;
    static constexpr u32 P = A + C * CC_STRIDE;
    static constexpr u32 G = P + C * CC_STRIDE;
    static constexpr u32 EXP_G = G + C;
    static constexpr u32 TAIL = EXP_G + C;
    static constexpr u32 BETA = TAIL + C;
    static constexpr u32 FLOATS = BETA + C;
};

// The gated delta rule chunkwise (kiln-cpu's gated_delta_net_chunked is the same
// algorithm, written row by row): one block of DN_WARPS warps per (value head h, tile
// of DN_COLS value columns j0..), walking the prompt in chunks of C = DN_CHUNK tokens
// (the last one shorter: its missing tokens are zeros with g = beta = 0, which change
// nothing) with its state columns S (d_k x DN_COLS) in shared memory. Per chunk, with
// G the cumulative sum of g within the chunk and S0 the incoming state:
//   1. load the chunk's raw q, k (key head h / group) and v (cp.async), the gates
//      g = ssm_a softplus(a + dt_bias) (G by a warp scan) and beta = sigmoid(b), and
//      L2-normalize q and k (q also scaled by 1 / sqrt(d_k));
//   2. A[t][s] = beta_t exp(G_t - G_s) k_t.k_s for s < t, P[t][s] = exp(G_t - G_s)
//      q_t.k_s for s <= t (0 elsewhere); o = exp(G) (Q S0) and
//      X = beta (V - exp(G) (K S0));
//   3. T = (I + A)^-1 by forward substitution (thread j: column j, in registers);
//   4. u = T X, the corrections: the CPU's U - W S0;
//   5. out = o + P u; S = exp(G_last) S0 + K^T (exp(G_last - G) u).
// Products in 3xTF32 on tensor cores (above), everything else in f32. Zeros pad the
// key dimension to DK and the value columns past d_v. blockDim.x = 32 DN_WARPS.
template <u32 DK>
__global__ void __launch_bounds__(32 * DN_WARPS, 1)
    gated_delta_net_chunk(const float* __restrict__ qkv, const float* __restrict__ a,
                          const float* __restrict__ b, const float* __restrict__ ssm_a,
                          const float* __restrict__ dt_bias, float* __restrict__ state,
                          float* __restrict__ out, u32 n_tokens, u32 n_k_heads,
                          u32 n_v_heads, u32 d_k, u32 d_v, u32 tiled, float eps) {
    typedef ChunkLayout<DK> L;
    constexpr u32 C = DN_CHUNK;
    constexpr u32 THREADS = 32 * DN_WARPS;
    constexpr u32 COL_TILES = DN_COLS / 8;
    static_assert(DK % 32 == 0 && DN_COLS % 8 == 0 && C % 16 == 0, "tile shapes");
    static_assert(DN_WARPS >= C / 16 && (2 * C) % DN_WARPS == 0, "warps per block");
    extern __shared__ float sm[];
    float* qs = sm + L::Q;
    float* ks = sm + L::K;
    float* ss = sm + L::S;
    float* xs = sm + L::X;
    float* as = sm + L::A;
    float* ps = sm + L::P;
    const float* gs = sm + L::G;
    const float* exp_g = sm + L::EXP_G;
    const float* tail = sm + L::TAIL;
    const float* betas = sm + L::BETA;

    const u32 warp = threadIdx.x >> 5;
    const u32 lane = threadIdx.x & 31u;
    const u32 h = blockIdx.x;
    const u32 kh = tiled ? h % n_k_heads : h / (n_v_heads / n_k_heads);
    const u32 j0 = blockIdx.y * DN_COLS;
    const u64 width = 2ull * n_k_heads * d_k + (u64)n_v_heads * d_v;
    const u64 v_at = 2ull * n_k_heads * d_k + (u64)h * d_v + j0;
    // The key dimension rounded up to the products' reduction step.
    const u32 k_len = (d_k + 7u) & ~7u;
    const float q_scale = 1.0f / sqrtf((float)d_k);
    float* head_state = state + (u64)h * d_k * d_v;

    for (u32 e = threadIdx.x; e < DK * DN_COLS; e += THREADS) {
        const u32 i = e / DN_COLS;
        const u32 n = e % DN_COLS;
        ss[i * L::COL_STRIDE + n] =
            i < d_k && j0 + n < d_v ? head_state[(u64)i * d_v + j0 + n] : 0.0f;
    }

    for (u32 t0 = 0; t0 < n_tokens; t0 += C) {
        const u32 c = min(C, n_tokens - t0);
        // 1. Raw queries, keys and values, zeros outside the chunk and the head.
        for (u32 e = threadIdx.x; e < 2 * C * DK; e += THREADS) {
            const u32 row = e / DK;
            const u32 i = e % DK;
            const u32 t = row % C;
            float* to = qs + row * L::QK_STRIDE + i;
            if (t < c && i < d_k) {
                const u32 head = row < C ? kh : n_k_heads + kh;
                copy_async_4(to, qkv + (u64)(t0 + t) * width + (u64)head * d_k + i);
            } else {
                *to = 0.0f;
            }
        }
        for (u32 e = threadIdx.x; e < C * DN_COLS; e += THREADS) {
            const u32 t = e / DN_COLS;
            const u32 n = e % DN_COLS;
            float* to = xs + t * L::COL_STRIDE + n;
            if (t < c && j0 + n < d_v) {
                copy_async_4(to, qkv + (u64)(t0 + t) * width + v_at + n);
            } else {
                *to = 0.0f;
            }
        }
        if (warp == 0) {
            // Lane l holds tokens l and l + 32; G by an inclusive scan of each half.
            float g[2];
            float beta[2];
#pragma unroll
            for (u32 half = 0; half < 2; ++half) {
                const u32 t = lane + 32 * half;
                g[half] = 0.0f;
                beta[half] = 0.0f;
                if (t < c) {
                    const u64 gate = (u64)(t0 + t) * n_v_heads + h;
                    const float x = a[gate] + dt_bias[h];
                    g[half] = ssm_a[h] * (x > 20.0f ? x : log1pf(expf(x)));
                    beta[half] = 1.0f / (1.0f + expf(-b[gate]));
                }
            }
#pragma unroll
            for (u32 offset = 1; offset < 32; offset <<= 1) {
                const float lo = __shfl_up_sync(0xffffffffu, g[0], offset);
                const float hi = __shfl_up_sync(0xffffffffu, g[1], offset);
                if (lane >= offset) {
                    g[0] += lo;
                    g[1] += hi;
                }
            }
            g[1] += __shfl_sync(0xffffffffu, g[0], 31);
            const float last = __shfl_sync(0xffffffffu, g[1], 31);
#pragma unroll
            for (u32 half = 0; half < 2; ++half) {
                const u32 t = lane + 32 * half;
                sm[L::G + t] = g[half];
                sm[L::EXP_G + t] = expf(g[half]);
                sm[L::TAIL + t] = expf(last - g[half]);
                sm[L::BETA + t] = beta[half];
            }
        }
        copy_async_wait_all();
        __syncthreads();
        {
            // Warp w normalizes rows w, w + DN_WARPS, ... of the queries then keys, all
            // its sums of squares reduced together; rows past the chunk stay zeros.
            constexpr u32 ROWS = 2 * C / DN_WARPS;
            float sum[ROWS];
#pragma unroll
            for (u32 r = 0; r < ROWS; ++r) {
                const float* row = qs + (warp + DN_WARPS * r) * L::QK_STRIDE;
                sum[r] = 0.0f;
                for (u32 i = lane; i < k_len; i += 32) {
                    sum[r] += row[i] * row[i];
                }
            }
#pragma unroll
            for (u32 offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
                for (u32 r = 0; r < ROWS; ++r) {
                    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
                }
            }
#pragma unroll
            for (u32 r = 0; r < ROWS; ++r) {
                const u32 index = warp + DN_WARPS * r;
                if (index % C >= c) {
                    continue;
                }
                float* row = qs + index * L::QK_STRIDE;
                const float inv = 1.0f / sqrtf(sum[r] + eps);
                const float scale = index < C ? q_scale : 1.0f;
                for (u32 i = lane; i < k_len; i += 32) {
                    row[i] = row[i] * inv * scale;
                }
            }
        }
        __syncthreads();

        // 2a. A and P, by blocks of 16 x 16 on or below the diagonal.
        {
            u32 item = 0;
            for (u32 keys = 0; keys < 2; ++keys) {
                const float* rows = keys ? ks : qs;
                float* to = keys ? as : ps;
                for (u32 bi = 0; bi < C / 16; ++bi) {
                    for (u32 bj = 0; bj <= bi; ++bj, ++item) {
                        if (item % DN_WARPS != warp) {
                            continue;
                        }
                        float d[2][4] = {};
                        mma_strip<2>(
                            d, k_len,
                            [&](u32 r, u32 k) { return rows[(16 * bi + r) * L::QK_STRIDE + k]; },
                            [&](u32 k, u32 n) { return ks[(16 * bj + n) * L::QK_STRIDE + k]; });
#pragma unroll
                        for (u32 nb = 0; nb < 2; ++nb) {
#pragma unroll
                            for (u32 i = 0; i < 4; ++i) {
                                const u32 t = 16 * bi + strip_row(i);
                                const u32 s = 16 * bj + strip_col(nb, i);
                                const bool below = keys ? s < t : s <= t;
                                const float weight = keys ? betas[t] : 1.0f;
                                to[t * L::CC_STRIDE + s] =
                                    below ? weight * expf(gs[t] - gs[s]) * d[nb][i] : 0.0f;
                            }
                        }
                    }
                }
            }
        }
        // 2b. o = exp(G) (Q S0), kept by warp w < C / 16 for rows 16 w.. of the
        // output, and X = beta (V - exp(G) (K S0)), by strips of 16 rows.
        float o[COL_TILES][4] = {};
        for (u32 strip = warp; strip < 2 * C / 16; strip += DN_WARPS) {
            const bool keys = strip >= C / 16;
            const u32 m0 = 16 * (strip % (C / 16));
            const float* rows = keys ? ks : qs;
            float d[COL_TILES][4] = {};
            mma_strip<COL_TILES>(
                d, k_len, [&](u32 r, u32 k) { return rows[(m0 + r) * L::QK_STRIDE + k]; },
                [&](u32 k, u32 n) { return ss[k * L::COL_STRIDE + n]; });
#pragma unroll
            for (u32 nb = 0; nb < COL_TILES; ++nb) {
#pragma unroll
                for (u32 i = 0; i < 4; ++i) {
                    const u32 t = m0 + strip_row(i);
                    if (keys) {
                        float* x = xs + t * L::COL_STRIDE + strip_col(nb, i);
                        *x = betas[t] * (*x - exp_g[t] * d[nb][i]);
                    } else {
                        o[nb][i] = exp_g[t] * d[nb][i];
                    }
                }
            }
        }
        __syncthreads();

        // 3. T = (I + A)^-1, unit lower triangular: thread j solves (I + A) x = e_j
        // down the column in registers (x[s] = 0 for s >= t, as A[t][s] is), in four
        // partial sums, then writes it over A once every solving thread has read A.
        if (threadIdx.x < C) {
            const u32 j = threadIdx.x;
            float x[C];
#pragma unroll
            for (u32 t = 0; t < C; ++t) {
                x[t] = 0.0f;
            }
#pragma unroll
            for (u32 t = 0; t < C; ++t) {
                float part[4] = {t == j ? 1.0f : 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (u32 s = 0; s < t; s += 4) {
                    const float4 w = *reinterpret_cast<const float4*>(as + t * L::CC_STRIDE + s);
                    part[0] -= w.x * x[s];
                    part[1] -= w.y * x[s + 1];
                    part[2] -= w.z * x[s + 2];
                    part[3] -= w.w * x[s + 3];
                }
                x[t] = (part[0] + part[1]) + (part[2] + part[3]);
            }
            asm volatile("bar.sync 1, %0;" ::"n"(C));
#pragma unroll
            for (u32 t = 0; t < C; ++t) {
                as[t * L::CC_STRIDE + j] = x[t];
            }
        }
        __syncthreads();

        // 4. u = T X by blocks of 16 x 16 (T is lower triangular: the reduction stops
        // at the block's last row), written over X once every warp has read it.
        {
            constexpr u32 ITEMS = (C / 16) * (DN_COLS / 16);
            float u[(ITEMS + DN_WARPS - 1) / DN_WARPS][2][4] = {};
#pragma unroll
            for (u32 w = 0; w < (ITEMS + DN_WARPS - 1) / DN_WARPS; ++w) {
                const u32 item = warp + DN_WARPS * w;
                if (item < ITEMS) {
                    const u32 m0 = 16 * (item / (DN_COLS / 16));
                    const u32 n0 = 16 * (item % (DN_COLS / 16));
                    mma_strip<2>(
                        u[w], m0 + 16, [&](u32 r, u32 k) { return as[(m0 + r) * L::CC_STRIDE + k]; },
                        [&](u32 k, u32 n) { return xs[k * L::COL_STRIDE + n0 + n]; });
                }
            }
            __syncthreads();
#pragma unroll
            for (u32 w = 0; w < (ITEMS + DN_WARPS - 1) / DN_WARPS; ++w) {
                const u32 item = warp + DN_WARPS * w;
                if (item < ITEMS) {
                    const u32 m0 = 16 * (item / (DN_COLS / 16));
                    const u32 n0 = 16 * (item % (DN_COLS / 16));
#pragma unroll
                    for (u32 nb = 0; nb < 2; ++nb) {
#pragma unroll
                        for (u32 i = 0; i < 4; ++i) {
                            xs[(m0 + strip_row(i)) * L::COL_STRIDE + n0 + strip_col(nb, i)] =
                                u[w][nb][i];
                        }
                    }
                }
            }
        }
        __syncthreads();

        // 5a. out = o + P u, by the warps that hold o.
        if (warp < C / 16) {
            const u32 m0 = 16 * warp;
            mma_strip<COL_TILES>(
                o, m0 + 16, [&](u32 r, u32 k) { return ps[(m0 + r) * L::CC_STRIDE + k]; },
                [&](u32 k, u32 n) { return xs[k * L::COL_STRIDE + n]; });
#pragma unroll
            for (u32 nb = 0; nb < COL_TILES; ++nb) {
#pragma unroll
                for (u32 i = 0; i < 4; ++i) {
                    const u32 t = m0 + strip_row(i);
                    const u32 n = strip_col(nb, i);
                    if (t < c && j0 + n < d_v) {
                        out[((u64)(t0 + t) * n_v_heads + h) * d_v + j0 + n] = o[nb][i];
                    }
                }
            }
        }
        // 5b. S = exp(G_last) S0 + K^T (exp(G_last - G) u), by strips of 16 key
        // dimensions; rows past d_k stay zero.
        {
            const float decay = exp_g[C - 1];
            const u32 t_len = (c + 7u) & ~7u;
            for (u32 m0 = 16 * warp; m0 < k_len; m0 += 16 * DN_WARPS) {
                float d[COL_TILES][4];
#pragma unroll
                for (u32 nb = 0; nb < COL_TILES; ++nb) {
#pragma unroll
                    for (u32 i = 0; i < 4; ++i) {
                        d[nb][i] = decay * ss[(m0 + strip_row(i)) * L::COL_STRIDE + strip_col(nb, i)];
                    }
                }
                mma_strip<COL_TILES>(
                    d, t_len, [&](u32 r, u32 k) { return ks[k * L::QK_STRIDE + m0 + r]; },
                    [&](u32 k, u32 n) { return tail[k] * xs[k * L::COL_STRIDE + n]; });
#pragma unroll
                for (u32 nb = 0; nb < COL_TILES; ++nb) {
#pragma unroll
                    for (u32 i = 0; i < 4; ++i) {
                        ss[(m0 + strip_row(i)) * L::COL_STRIDE + strip_col(nb, i)] = d[nb][i];
                    }
                }
            }
        }
        __syncthreads();
    }

    for (u32 e = threadIdx.x; e < DK * DN_COLS; e += THREADS) {
        const u32 i = e / DN_COLS;
        const u32 n = e % DN_COLS;
        if (i < d_k && j0 + n < d_v) {
            head_state[(u64)i * d_v + j0 + n] = ss[i * L::COL_STRIDE + n];
        }
    }
}

// One block per row of dim. Gated (gated RMSNorm):
// out = x / sqrt(mean(x^2) + eps) * weight * silu(z); else (L2 norm):
// out = x / sqrt(sum(x^2) + eps). blockDim.x is a multiple of 32.
template <bool Gated>
__global__ void delta_net_norm(const float* __restrict__ x, const float* __restrict__ z,
                               const float* __restrict__ weight, float* __restrict__ out,
                               u32 dim, float eps) {
    chain_after_prior_grids(x, z);
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * dim;
    float squares = 0.0f;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = x[base + i];
        squares += v * v;
    }
    const float total = block_reduce<SumOp>(squares, scratch);
    const float inv = 1.0f / sqrtf((Gated ? total / (float)dim : total) + eps);
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        float o = x[base + i] * inv;
        if (Gated) {
            o = o * weight[i] * silu(z[base + i]);
        }
        out[base + i] = o;
    }
}

}  // namespace kiln
