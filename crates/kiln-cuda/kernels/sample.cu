// Sampling of one token id per row of f32 logits (kiln_core::ops::Sample with
// temperature > 0; the argmax kernel serves temperature <= 0). One block of LANES
// threads per row.
//
// No sorting: a candidate's rank is the order of its 64-bit composite
// `(order(logit) << 32) | ~index` (larger = better ranked: logit descending in IEEE total
// order, ties by lower index), and every "first t ranks" set is `{composite >= T}`
// for a threshold T. Each threshold is found by bisection on T's bits from the top,
// one block-wide pass over the row per bit: a count for top-k and min-p, the sum S for
// top-p and the draw. S is the op's fixed-order sum: thread j adds the row's elements
// j, j + LANES, ... in increasing index, then a halving tree adds the lanes, each step
// one f32 operation (the __f*_rn intrinsics are never contracted), so every quantity
// has the bits of the CPU reference.
#include "common.cuh"

namespace kiln {

// The constants of kiln_cpu::ops::sample.
constexpr float SAMPLE_LOG2_E = 1.44269502162933349609375f;  // 0x3fb8aa3b
constexpr u32 SAMPLE_LN2_HI = 0x3f317200u;
constexpr u32 SAMPLE_LN2_LO = 0x35bfbe8eu;
constexpr u32 SAMPLE_C3 = 0x3e2aaaabu;
constexpr u32 SAMPLE_C4 = 0x3d2aaaabu;
constexpr u32 SAMPLE_C5 = 0x3c088889u;
constexpr u32 SAMPLE_C6 = 0x3ab60b61u;

__device__ __forceinline__ float pow2(int e) { return __int_as_float((e + 127) << 23); }

// E(x) of the op: e^x for x <= 0 by the reference's formula, operation for operation.
__device__ float exp_nonpositive(float x) {
    if (isnan(x)) {
        return x;
    }
    if (x < -104.0f) {
        return 0.0f;
    }
    if (x > 0.0f) {
        x = 0.0f;
    }
    const float n = floorf(__fadd_rn(__fmul_rn(x, SAMPLE_LOG2_E), 0.5f));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, __uint_as_float(SAMPLE_LN2_HI))),
                              __fmul_rn(n, __uint_as_float(SAMPLE_LN2_LO)));
    float poly = __fadd_rn(__uint_as_float(SAMPLE_C5), __fmul_rn(r, __uint_as_float(SAMPLE_C6)));
    poly = __fadd_rn(__uint_as_float(SAMPLE_C4), __fmul_rn(r, poly));
    poly = __fadd_rn(__uint_as_float(SAMPLE_C3), __fmul_rn(r, poly));
    poly = __fadd_rn(0.5f, __fmul_rn(r, poly));
    poly = __fadd_rn(1.0f, __fmul_rn(r, poly));
    poly = __fadd_rn(1.0f, __fmul_rn(r, poly));
    const int ni = (int)n;
    if (ni >= -126) {
        return __fmul_rn(poly, pow2(ni));
    }
    return __fmul_rn(__fmul_rn(poly, pow2(ni + 64)), pow2(-64));
}

// The rank order of a non-NaN logit at `index`: larger composites rank first.
__device__ __forceinline__ u64 composite(float logit, u32 index) {
    const u32 bits = __float_as_uint(logit);
    const u32 order = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)order << 32) | (u64)(~index);
}

__device__ __forceinline__ u32 index_of(u64 c) { return ~(u32)c; }

__device__ __forceinline__ u64 max2(u64 a, u64 b) { return a > b ? a : b; }

// One row's logits and the block's shared lanes.
template <u32 LANES>
struct Row {
    const float* logits;
    u32 vocab;
    float* sums;
    u32* counts;
    u64* composites;

    // Every thread gets `combine` over the lanes' values `v`, as a halving tree.
    template <class T, class F>
    __device__ T tree(T v, T* lanes, F combine) const {
        const u32 j = threadIdx.x;
        __syncthreads();  // the previous tree's result has been read
        lanes[j] = v;
        __syncthreads();
        for (u32 s = LANES / 2; s > 0; s >>= 1) {
            if (j < s) {
                lanes[j] = combine(lanes[j], lanes[j + s]);
            }
            __syncthreads();
        }
        return lanes[0];
    }

    // Calls f(logit, composite) for this thread's non-NaN elements of rank set
    // {composite >= lower}, in increasing index.
    template <class F>
    __device__ void each(u64 lower, F f) const {
        for (u32 i = threadIdx.x; i < vocab; i += LANES) {
            const float l = logits[i];
            if (!isnan(l)) {
                const u64 c = composite(l, i);
                if (c >= lower) {
                    f(l, c);
                }
            }
        }
    }

    // S(value(logit) over {composite >= lower}).
    template <class V>
    __device__ float mass(u64 lower, V value) const {
        float acc = 0.0f;
        each(lower, [&](float l, u64) { acc = __fadd_rn(acc, value(l)); });
        return tree(acc, sums, [](float a, float b) { return __fadd_rn(a, b); });
    }

    // How many of {composite >= lower} satisfy keep(logit).
    template <class K>
    __device__ u32 count(u64 lower, K keep) const {
        u32 n = 0;
        each(lower, [&](float l, u64) { n += keep(l) ? 1u : 0u; });
        return tree(n, counts, [](u32 a, u32 b) { return a + b; });
    }

    // The largest composite.
    __device__ u64 top() const {
        u64 best = 0;
        each(0, [&](float, u64 c) { best = max2(best, c); });
        return tree(best, composites, [](u64 a, u64 b) { return max2(a, b); });
    }

    // The largest threshold T with holds(T), for holds true at 0 and monotone (true,
    // then false as T grows): found bit by bit from the top.
    template <class P>
    __device__ u64 largest(P holds) const {
        u64 t = 0;
        for (int bit = 63; bit >= 0; --bit) {
            const u64 next = t | (1ull << bit);
            if (holds(next)) {
                t = next;
            }
        }
        return t;
    }

    // The composite of rank `rank` (from 0) among {composite >= lower}, which must
    // hold more than `rank` elements.
    __device__ u64 select(u64 lower, u32 rank) const {
        return largest([&](u64 t) { return count(max2(t, lower), [](float) { return true; }) > rank; });
    }
};

template <u32 LANES>
__global__ void __launch_bounds__(LANES)
    sample(const float* __restrict__ logits, const float* __restrict__ uniform, int* __restrict__ out,
           u32 vocab, float temperature, u32 top_k, float top_p, float min_p) {
    chain_after_prior_grids(logits, uniform);
    __shared__ float sums[LANES];
    __shared__ u32 counts[LANES];
    __shared__ u64 composites[LANES];
    const Row<LANES> row{logits + (u64)blockIdx.x * vocab, vocab, sums, counts, composites};
    const auto all = [](float) { return true; };

    // Step 2: the candidates (every composite of a non-NaN logit is >= 0).
    const u32 candidates = row.count(0, all);
    if (candidates == 0) {
        if (threadIdx.x == 0) {
            out[blockIdx.x] = 0;
        }
        return;
    }
    const float m = row.logits[index_of(row.top())];
    u64 cut_k = 0;
    u32 size_c = candidates;
    if (top_k > 0 && top_k < candidates) {
        cut_k = row.select(0, top_k - 1);
        size_c = top_k;
    }

    // Step 3: p_i = E(l_i - m) / z.
    const auto e = [=](float l) { return exp_nonpositive(__fsub_rn(l, m)); };
    const float z = row.mass(cut_k, e);
    const auto p = [=](float l) { return __fdiv_rn(e(l), z); };

    // Step 4: top-p, the largest threshold whose set reaches top_p.
    u64 cut_p = cut_k;
    u32 keep_p = size_c;
    if (top_p < 1.0f && row.mass(cut_k, p) >= top_p) {
        cut_p = row.largest([&](u64 t) { return row.mass(max2(t, cut_k), p) >= top_p; });
        keep_p = row.count(cut_p, all);
    }

    // Step 5: min-p, a count of probabilities at or above the floor.
    u32 keep_m = size_c;
    if (min_p > 0.0f) {
        const float floor = __fmul_rn(min_p, p(m));
        keep_m = max(1u, row.count(cut_k, [=](float l) { return p(l) >= floor; }));
    }
    const u64 cut = keep_m < keep_p ? row.select(cut_k, keep_m - 1) : cut_p;

    // Step 6: the draw from p'_i = E((l_i - m) / temperature) / z'.
    const auto e_t = [=](float l) { return exp_nonpositive(__fdiv_rn(__fsub_rn(l, m), temperature)); };
    const float z_t = row.mass(cut, e_t);
    const auto p_t = [=](float l) { return __fdiv_rn(e_t(l), z_t); };
    const float u = uniform[blockIdx.x];
    u64 drawn = cut;
    if (row.mass(cut, p_t) > u) {
        drawn = row.largest([&](u64 t) { return row.mass(max2(t, cut), p_t) > u; });
    }
    if (threadIdx.x == 0) {
        out[blockIdx.x] = (int)index_of(drawn);
    }
}

}  // namespace kiln
