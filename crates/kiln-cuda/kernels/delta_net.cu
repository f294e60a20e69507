// The Gated DeltaNet ops (kiln_core::ops::delta_net): causal conv1d with a rolling
// state, the gated delta rule (recurrent, token by token), gated RMSNorm and L2 norm.
// Each computes what its op's definition says, in f32.
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

// One block per (value head h, tile of blockDim.x value columns), tokens in order. The
// block normalizes the token's query and key head (h % n_k_heads when tiled, else
// h / group: kiln_core::ops::HeadLayout) into shared memory
// (`qk`: 2 * d_k floats); thread j then updates column j of the head's state
// S (d_k x d_v, row-major at state + h * d_k * d_v):
// S = exp(g) S, d = beta (v_j - S[:, j] . k), S[:, j] += k d, out = S[:, j] . q.
// blockDim.x is a multiple of 32.
__global__ void gated_delta_net(const float* __restrict__ qkv, const float* __restrict__ a,
                                const float* __restrict__ b, const float* __restrict__ ssm_a,
                                const float* __restrict__ dt_bias, float* __restrict__ state,
                                float* __restrict__ out, u32 n_tokens, u32 n_k_heads,
                                u32 n_v_heads, u32 d_k, u32 d_v, u32 tiled, float eps) {
    chain_after_prior_grids(qkv, a, b, state);
    extern __shared__ float qk[];
    __shared__ float scratch[32];
    float* q = qk;
    float* k = qk + d_k;
    const u32 h = blockIdx.x;
    const u32 kh = tiled ? h % n_k_heads : h / (n_v_heads / n_k_heads);
    const u32 j = blockIdx.y * blockDim.x + threadIdx.x;
    const u64 width = 2ull * n_k_heads * d_k + (u64)n_v_heads * d_v;
    float* s = state + (u64)h * d_k * d_v + j;
    const float rate = ssm_a[h];
    const float q_scale = 1.0f / sqrtf((float)d_k);
    for (u32 t = 0; t < n_tokens; ++t) {
        const float* row = qkv + t * width;
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
        const float q_inv = q_scale / sqrtf(block_reduce<SumOp>(qq, scratch) + eps);
        const float k_inv = 1.0f / sqrtf(block_reduce<SumOp>(kk, scratch) + eps);
        for (u32 i = threadIdx.x; i < d_k; i += blockDim.x) {
            q[i] *= q_inv;
            k[i] *= k_inv;
        }
        __syncthreads();
        if (j < d_v) {
            const u64 gate = (u64)t * n_v_heads + h;
            const float x = a[gate] + dt_bias[h];
            const float softplus = x > 20.0f ? x : log1pf(expf(x));
            const float decay = expf(rate * softplus);
            const float beta = 1.0f / (1.0f + expf(-b[gate]));
            float kv = 0.0f;
            for (u32 i = 0; i < d_k; ++i) {
                kv += s[(u64)i * d_v] * k[i];
            }
            const float v = row[2ull * n_k_heads * d_k + (u64)h * d_v + j];
            const float d = beta * (v - decay * kv);
            float o = 0.0f;
            for (u32 i = 0; i < d_k; ++i) {
                const float si = decay * s[(u64)i * d_v] + k[i] * d;
                s[(u64)i * d_v] = si;
                o += si * q[i];
            }
            out[((u64)t * n_v_heads + h) * d_v + j] = o;
        }
        __syncthreads();
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
