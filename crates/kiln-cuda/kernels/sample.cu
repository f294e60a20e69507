// Sampling of one token id per row of f32 logits (kiln_core::ops::Sample), the same
// token as the CPU reference: the definition's weights are integers (W(E(x)), E(x)
// times 2^32 rounded), so every sum below is exact in any order and every threshold
// is compared exactly.
//
// One cluster of CB blocks per row (CB = 8 on compute capability 9.0 and later; one
// block elsewhere), each block holding a contiguous slice of the row in shared
// memory. The blocks exchange partial results through distributed shared memory and
// wait for each other at cluster barriers; block 0 (the leader) makes every decision.
//
// A candidate's rank is the order of its 96-bit key t = (vk, ~composite): `composite`
// is (order(logit) << 32) | ~index (larger = better: logit descending in IEEE total
// order, ties by lower index) and vk = floor((m - logit) * 2^32 / R), a fixed-point
// distance from the maximum m over a power-of-two range R, saturating. vk never
// decreases as the rank grows (each f32 step is monotone), so ascending t is exactly
// the rank order, and every "first ranks" set is {t <= T}. The top 11 bits of t (of
// vk) are a candidate's bucket: buckets are value ranges of the logit, so a row's
// candidates spread over them.
//
// Every cut is a "crossing": the candidate at which the running count, weight w
// (temperature 1) or weight v (the draw's) in rank order first reaches a target.
// 1. Every block loads its slice (staging it in shared memory when it fits), finds
//    its best composite, count and value range; the cluster combines them: m, R.
//    With temperature <= 0 the leader writes the argmax and the work ends.
// 2. Every block histograms its candidates over the 2048 buckets (count, w, v),
//    caching each candidate's bucket; the histograms are summed into the leader's.
// 3. The leader finds each crossing (top-k, top-p, min-p's count, the draw) from the
//    histogram: the bucket holding it is gathered (every block appends its members to
//    the leader's list), sorted, and resolved with exact prefix sums. A gather takes
//    the buckets above too while they fit, so later crossings, which lie at or above
//    the earlier ones, usually resolve in the same list. A bucket with more members
//    than the list holds is histogrammed again on the next 8 bits of t, and so on.
// When top-k is on, step 2 counts only; the candidates of C are then either all in
// the top-k crossing's list, or histogrammed again with their weights.
//
// Buckets at the far end (vk's last bucket) hold candidates at least 23.99 times
// max(1, temperature) below m when R covers that distance: their w and v are 0 (E
// is below 2^-33 there), so no weighted crossing lies there, and a top-k crossing
// there leaves every later step as it would be with C = all candidates.
#include "common.cuh"

namespace kiln {

// ---------------------------------------------------------------- the definition

// The constants of kiln_core::ops::sample.
constexpr float SAMPLE_LOG2_E = 1.44269502162933349609375f;  // 0x3fb8aa3b
constexpr u32 SAMPLE_LN2_HI = 0x3f317200u;
constexpr u32 SAMPLE_LN2_LO = 0x35bfbe8eu;
constexpr u32 SAMPLE_C3 = 0x3e2aaaabu;
constexpr u32 SAMPLE_C4 = 0x3d2aaaabu;
constexpr u32 SAMPLE_C5 = 0x3c088889u;
constexpr u32 SAMPLE_C6 = 0x3ab60b61u;

__device__ __forceinline__ float pow2(int e) { return __int_as_float((e + 127) << 23); }

// E(x) of the op: e^x for x <= 0 by the reference's formula, operation for operation
// (the __f*_rn intrinsics are never contracted into fused multiply-adds).
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

// W(e): e * 2^32 rounded to the nearest integer, ties to even (the product is exact).
__device__ __forceinline__ u64 weight_of(float e) {
    return __float2ull_rn(__fmul_rn(e, 4294967296.0f));
}

// f * n exactly, rounded up or down, for a finite f in [0, 1] (f = mantissa *
// 2^-shift with shift >= 23; the product has at most 88 bits).
__device__ u64 scaled(float f, u64 n, bool up) {
    const u32 bits = __float_as_uint(f);
    const u32 exponent = (bits >> 23) & 0xffu;
    const u64 mantissa = exponent == 0 ? (bits & 0x7fffffu) : ((bits & 0x7fffffu) | 0x800000u);
    const u32 shift = exponent == 0 ? 149u : 150u - exponent;
    const u64 lo = mantissa * n;
    const u64 hi = __umul64hi(mantissa, n);
    if (shift >= 128) {
        return (up && (lo | hi) != 0) ? 1 : 0;
    }
    u64 whole;
    bool rest;
    if (shift >= 64) {
        const u32 s = shift - 64;
        whole = s == 0 ? hi : hi >> s;
        rest = lo != 0 || (s != 0 && (hi & ((1ull << s) - 1)) != 0);
    } else {
        whole = (lo >> shift) | (hi << (64 - shift));
        rest = (lo & ((1ull << shift) - 1)) != 0;
    }
    return whole + ((up && rest) ? 1 : 0);
}

// D of the draw: floor(u * z), 0 for u below 0 or NaN, at most z - 1.
__device__ u64 draw_target(float u, u64 z) {
    if (!(u > 0.0f)) {
        return 0;
    }
    if (u >= 1.0f) {
        return z - 1;
    }
    const u64 d = scaled(u, z, false);
    return d < z ? d : z - 1;
}

// ---------------------------------------------------------------- ranks and keys

// The total order of a float as an unsigned integer (larger = later in the order).
__device__ __forceinline__ u32 order_of(float l) {
    const u32 bits = __float_as_uint(l);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The rank order of a non-NaN logit at `index`: larger composites rank first.
__device__ __forceinline__ u64 composite(float l, u32 index) {
    return ((u64)order_of(l) << 32) | (u64)(~index);
}

__device__ __forceinline__ u32 index_of(u64 c) { return ~(u32)c; }

__device__ __forceinline__ float logit_of(u64 c) {
    const u32 order = (u32)(c >> 32);
    return __uint_as_float((order & 0x80000000u) ? (order & 0x7fffffffu) : ~order);
}

// A 96-bit rank key hi * 2^64 + lo; ascending is the rank order.
struct Key {
    u32 hi;
    u64 lo;
};

__device__ __forceinline__ bool key_le(Key a, Key b) {
    return a.hi < b.hi || (a.hi == b.hi && a.lo <= b.lo);
}

__device__ __forceinline__ bool key_eq(Key a, Key b) { return a.hi == b.hi && a.lo == b.lo; }

// a >> s for s < 96.
__device__ __forceinline__ Key key_shr(Key a, u32 s) {
    if (s == 0) {
        return a;
    }
    if (s >= 64) {
        return Key{0u, (u64)(a.hi >> (s - 64))};
    }
    return Key{s < 32 ? a.hi >> s : 0u, (a.lo >> s) | ((u64)a.hi << (64 - s))};
}

// (a << bits) | digit for 1 <= bits < 32, where a has at most 96 - bits bits.
__device__ __forceinline__ Key key_push(Key a, u32 bits, u32 digit) {
    return Key{(a.hi << bits) | (u32)(a.lo >> (64 - bits)), (a.lo << bits) | digit};
}

// Count, weight w and weight v of a set of candidates.
struct Sums {
    u64 n, w, v;
};

__device__ __forceinline__ Sums operator+(Sums a, Sums b) { return Sums{a.n + b.n, a.w + b.w, a.v + b.v}; }
__device__ __forceinline__ Sums operator-(Sums a, Sums b) { return Sums{a.n - b.n, a.w - b.w, a.v - b.v}; }

// Which of the sums a crossing counts.
constexpr u32 BY_COUNT = 0;
constexpr u32 BY_W = 1;
constexpr u32 BY_V = 2;

__device__ __forceinline__ u64 pick(Sums s, u32 q) { return q == BY_COUNT ? s.n : q == BY_W ? s.w : s.v; }

// ---------------------------------------------------------------- the cluster

#ifndef KILN_SAMPLE_HOST_EMULATION
// This block's rank in its cluster.
template <u32 CB>
__device__ __forceinline__ u32 cluster_rank() {
    if constexpr (CB == 1) {
        return 0;
    } else {
        u32 r;
        asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
        return r;
    }
}

// A barrier of every thread of the cluster; shared-memory writes before it (local or
// distributed) are visible after it.
template <u32 CB>
__device__ __forceinline__ void cluster_sync() {
    if constexpr (CB == 1) {
        __syncthreads();
    } else {
        asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::
                         : "memory");
    }
}

// The address of `p`'s counterpart in the shared memory of block `rank` of the
// cluster.
template <u32 CB, typename T>
__device__ __forceinline__ T* in_block(T* p, u32 rank) {
    if constexpr (CB == 1) {
        return p;
    } else {
        T* q;
        asm volatile("mapa.u64 %0, %1, %2;" : "=l"(q) : "l"(p), "r"(rank));
        return q;
    }
}

// The launch's dynamic shared memory in bytes.
__device__ __forceinline__ u32 dynamic_shared_bytes() {
    u32 n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}
#endif

// ---------------------------------------------------------------- shared memory

// The leader's requests.
constexpr u32 OP_DONE = 0;
constexpr u32 OP_GATHER = 1;  // append the concerned candidates' composites to the list
constexpr u32 OP_REFINE = 2;  // histogram the concerned candidates on a digit of t
constexpr u32 OP_WEIGH = 3;   // histogram the set (composite >= floor) over the buckets

// What a histogram sums besides counts, and whether min-p's count is taken.
constexpr u32 SUM_W = 1;
constexpr u32 SUM_V = 2;
constexpr u32 COUNT_NM = 4;

// What the leader asks of every block: the op and the candidates it concerns.
struct Request {
    u32 op;
    u32 flags;          // SUM_W, SUM_V, COUNT_NM
    u32 b1_lo, b1_hi;   // the concerned candidates' buckets
    u32 shift;          // and plo <= (t >> shift) <= phi
    u32 digit_shift;    // OP_REFINE's digit: (t >> digit_shift) mod 2^digit_bits
    u32 digit_bits;
    u64 floor_c;        // and composite >= floor_c
    Key plo, phi;
};

// Shared memory at the start of every block's dynamic shared memory: the leader's
// request, each block's partial results (which the other blocks read), and scratch.
struct Control {
    Request req;
    u32 list_n;  // the list's length (block 0's, during a gather)
    u32 count;
    u64 best, argmax, nm;
    float lmin;
    u32 found;
    // Scratch of the block's reductions and scans.
    Sums scan[32];
    u64 red[32];
    Sums found_sums;
};

// Bytes reserved for Control (kiln_cuda::ops::sample's CONTROL_BYTES).
constexpr u32 SAMPLE_CONTROL_BYTES = 2048;
static_assert(sizeof(Control) <= SAMPLE_CONTROL_BYTES, "Control outgrew its bytes");

// A bucket of no candidate (a NaN logit or past the slice).
constexpr u32 NO_BUCKET = 0xffffu;

// The row's quantities every block derives from the combined pass-1 results.
struct Row {
    float m;          // the logit of rank 0
    float scale;      // 2^32 / R: vk = (m - logit) * scale
    float t;          // the temperature
    u64 floor_w;      // min-p's weight floor
    bool same_v;      // temperature 1: v = w
    bool tail_zero;   // the last bucket's w and v are all 0
};

// x_i of the definition.
__device__ __forceinline__ float row_x(const Row& r, float l) { return l == r.m ? 0.0f : __fsub_rn(l, r.m); }

__device__ __forceinline__ u32 row_vk(const Row& r, float x) {
    return __float2uint_rz(__fmul_rn(-x, r.scale));
}

__device__ __forceinline__ Key row_key(const Row& r, float l, u32 index) {
    return Key{row_vk(r, row_x(r, l)), ~composite(l, index)};
}

// W(E(x)) is 0 for every x below this (tests/sample.rs checks every f32 from here to
// -104; E is 0 below -104).
constexpr float SAMPLE_ZERO_WEIGHT_BELOW = -23.9f;

// W(E(x)), skipping the exponential where it is 0.
__device__ __forceinline__ u64 weight_at(float x) {
    return x < SAMPLE_ZERO_WEIGHT_BELOW ? 0 : weight_of(exp_nonpositive(x));
}

// The weights of a candidate at x: w when want_w (and as v's value at temperature 1),
// v when want_v; 0 for what is not wanted.
__device__ __forceinline__ void weights_of(const Row& r, float x, bool want_w, bool want_v, u64* w, u64* v) {
    *w = (want_w || (want_v && r.same_v)) ? weight_at(x) : 0;
    *v = !want_v ? 0 : r.same_v ? *w : weight_at(__fdiv_rn(x, r.t));
}

// A block's slice of the row, copied into registers by the loops over it.
template <u32 D1>
struct Slice {
    const float* stage;  // the slice in shared memory, or null
    const float* src;    // the slice in global memory
    u16* bucket;         // each candidate's bucket, or null
    u32 begin, n;        // n logits from index begin
    Row row;

    __device__ __forceinline__ float logit(u32 j) const { return stage != nullptr ? stage[j] : src[j]; }

    // The bucket of the candidate at j with logit l (once pass 2 cached them).
    __device__ __forceinline__ u32 bucket_of(u32 j, float l) const {
        if (bucket != nullptr) {
            return bucket[j];
        }
        return row_vk(row, row_x(row, l)) >> (32 - D1);
    }

    // Whether the candidate at j (logit l) is one `req` concerns; sets its composite
    // and key.
    __device__ __forceinline__ bool concerned(const Request& req, u32 j, float l, u64* c, Key* t) const {
        if (isnan(l)) {
            return false;
        }
        const u32 b = bucket_of(j, l);
        if (b < req.b1_lo || b > req.b1_hi) {
            return false;
        }
        *c = composite(l, begin + j);
        if (*c < req.floor_c) {
            return false;
        }
        *t = row_key(row, l, begin + j);
        const Key p = key_shr(*t, req.shift);
        return key_le(req.plo, p) && key_le(p, req.phi);
    }
};

// ---------------------------------------------------------------- one row

// A found crossing: the candidate's composite, the sums of every candidate of the
// set up to and including it, and its position in the list.
struct Found {
    u64 c;
    Sums sums;
    u32 index;
};

// A bucket found by a walk over a histogram, with the sums of the buckets before it.
struct Walk {
    u32 bin;
    Sums cum;
};

template <u32 THREADS, u32 CB, u32 D1, u32 D2, u32 CAP, u32 EXT>
struct Sampler {
    static constexpr u32 NB1 = 1u << D1;
    static constexpr u32 NB2 = 1u << D2;
    static constexpr u32 WARPS = THREADS / 32;
    static constexpr u32 SHIFT1 = 96 - D1;
    static constexpr u32 FULL = 0xffffffffu;
    static_assert(THREADS % 32 == 0 && WARPS <= 32, "threads: whole warps, at most 32");
    static_assert(D1 >= 5 && D1 <= 15, "at least 32 buckets (the tail bucket's bound)");
    static_assert(D2 >= 1 && D2 <= D1, "refinement digits");
    static_assert(NB1 % CB == 0 && NB2 % CB == 0, "histograms split evenly over the blocks");
    static_assert(EXT <= CAP, "the gather's budget fits the list");
    static_assert(CAP >= 2 && (CAP & (CAP - 1)) == 0, "the list sorts as a power of two");

    Control* ctl;
    u64 *hw1, *hv1, *hw2, *hv2, *list, *lw, *lv;
    u32 *hc1, *hc2;
    Slice<D1> slice;
    u32 rank, tid, lane, warp;

    // ------------------------------------------------------------ block helpers

    template <class Op>
    __device__ u64 block_all(u64 v, Op op) {
        for (u32 offset = 16; offset > 0; offset >>= 1) {
            v = op(v, __shfl_xor_sync(FULL, v, offset));
        }
        if (lane == 0) {
            ctl->red[warp] = v;
        }
        __syncthreads();
        v = ctl->red[0];
        for (u32 w = 1; w < WARPS; ++w) {
            v = op(v, ctl->red[w]);
        }
        __syncthreads();
        return v;
    }

    __device__ u64 block_sum(u64 v) {
        return block_all(v, [](u64 a, u64 b) { return a + b; });
    }

    // The exclusive prefix of `v` over the block's threads, and the total.
    __device__ Sums block_scan(Sums v, Sums* total) {
        Sums inc = v;
        for (u32 d = 1; d < 32; d <<= 1) {
            const Sums o{__shfl_up_sync(FULL, inc.n, d), __shfl_up_sync(FULL, inc.w, d),
                         __shfl_up_sync(FULL, inc.v, d)};
            if (lane >= d) {
                inc = inc + o;
            }
        }
        if (lane == 31) {
            ctl->scan[warp] = inc;
        }
        __syncthreads();
        Sums before{0, 0, 0};
        Sums all{0, 0, 0};
        for (u32 w = 0; w < WARPS; ++w) {
            if (w < warp) {
                before = before + ctl->scan[w];
            }
            all = all + ctl->scan[w];
        }
        __syncthreads();
        *total = all;
        return before + inc - v;
    }

    // Adds one candidate at bin b (NO_BUCKET: none) with weights w and v for every lane
    // of the warp; when the whole warp has one bin (equal logits), as one atomic each,
    // so that they do not queue on one address. add_w and add_v are the same across
    // the warp.
    static __device__ __forceinline__ void hist_add(u32* hc, u64* hw, u64* hv, u32 lane, u32 b, u64 w, u64 v,
                                                    bool add_w, bool add_v) {
        const u32 b0 = __shfl_sync(FULL, b, 0);
        if (__all_sync(FULL, b == b0)) {
            if (b0 == NO_BUCKET) {
                return;
            }
            for (u32 offset = 16; offset > 0; offset >>= 1) {
                w += __shfl_xor_sync(FULL, w, offset);
                v += __shfl_xor_sync(FULL, v, offset);
            }
            if (lane == 0) {
                atomicAdd(&hc[b0], 32u);
                if (add_w) {
                    atomicAdd(&hw[b0], w);
                }
                if (add_v) {
                    atomicAdd(&hv[b0], v);
                }
            }
        } else if (b != NO_BUCKET) {
            atomicAdd(&hc[b], 1u);
            if (add_w) {
                atomicAdd(&hw[b], w);
            }
            if (add_v) {
                atomicAdd(&hv[b], v);
            }
        }
    }

    __device__ void zero(u32* hc, u64* hw, u64* hv, u32 bins) {
        for (u32 j = tid; j < bins; j += THREADS) {
            hc[j] = 0;
            hw[j] = 0;
            hv[j] = 0;
        }
    }

    // Sums every block's histogram into block 0's: block r adds up its share of the
    // bins. Between two cluster barriers.
    __device__ void reduce_histograms(u32* hc, u64* hw, u64* hv, u32 bins) {
        if constexpr (CB > 1) {
            const u32 share = bins / CB;
            for (u32 k = tid; k < share; k += THREADS) {
                const u32 j = rank * share + k;
                u32 c = 0;
                u64 w = 0;
                u64 v = 0;
#pragma unroll
                for (u32 q = 0; q < CB; ++q) {
                    c += in_block<CB>(hc, q)[j];
                    w += in_block<CB>(hw, q)[j];
                    v += in_block<CB>(hv, q)[j];
                }
                in_block<CB>(hc, 0)[j] = c;
                in_block<CB>(hw, 0)[j] = w;
                in_block<CB>(hv, 0)[j] = v;
            }
        }
    }

    // ------------------------------------------------------------ pass 1

    // Loads the slice (into shared memory when staged); returns the cluster's best
    // composite, argmax composite (-0 taken as +0) and candidate count, and the
    // smallest finite logit within r0 of its block's largest.
    __device__ void pass1(float r0, u64* best_out, u64* argmax_out, u32* count_out, float* lmin_out) {
        const u32 me = tid;  // in a register through the loops
        const Slice<D1> sl = slice;
        float* const stage = const_cast<float*>(sl.stage);
        u64 best = 0;
        u64 amax = 0;
        u32 count = 0;
        float vmax = __int_as_float(0xff800000u);
        const auto visit = [&](float l, u32 j) {
            if (!isnan(l)) {
                ++count;
                const u64 c = composite(l, sl.begin + j);
                best = c > best ? c : best;
                const u64 a = composite(l == 0.0f ? 0.0f : l, sl.begin + j);
                amax = a > amax ? a : amax;
                vmax = fmaxf(vmax, l);
            }
        };
        u32 scalar_from = 0;
        if ((reinterpret_cast<unsigned long long>(sl.src) & 15u) == 0) {
            const u32 n4 = sl.n / 4;
            const float4* src4 = reinterpret_cast<const float4*>(sl.src);
            constexpr u32 BATCH = 4;
            for (u32 k0 = 0; k0 < n4; k0 += BATCH * THREADS) {
                float4 q[BATCH];
#pragma unroll
                for (u32 b = 0; b < BATCH; ++b) {
                    const u32 k = k0 + b * THREADS + me;
                    q[b] = k < n4 ? src4[k] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
#pragma unroll
                for (u32 b = 0; b < BATCH; ++b) {
                    const u32 k = k0 + b * THREADS + me;
                    if (k < n4) {
                        if (stage != nullptr) {
                            reinterpret_cast<float4*>(stage)[k] = q[b];
                        }
                        visit(q[b].x, 4 * k);
                        visit(q[b].y, 4 * k + 1);
                        visit(q[b].z, 4 * k + 2);
                        visit(q[b].w, 4 * k + 3);
                    }
                }
            }
            scalar_from = 4 * n4;
        }
        for (u32 j = scalar_from + me; j < sl.n; j += THREADS) {
            const float l = sl.src[j];
            if (stage != nullptr) {
                stage[j] = l;
            }
            visit(l, j);
        }
        best = block_all(best, [](u64 a, u64 b) { return a > b ? a : b; });
        amax = block_all(amax, [](u64 a, u64 b) { return a > b ? a : b; });
        count = (u32)block_sum(count);
        const float bmax = __uint_as_float((u32)block_all((u64)__float_as_uint(vmax), [](u64 a, u64 b) {
            return (u64)__float_as_uint(fmaxf(__uint_as_float((u32)a), __uint_as_float((u32)b)));
        }));
        // The smallest finite logit within r0 of the block's largest (the staged
        // values other threads wrote: the reductions' barriers order them).
        const float least = __fsub_rn(bmax, r0);
        float lmin = __int_as_float(0x7f800000u);
        for (u32 j = me; j < sl.n; j += THREADS) {
            const float l = sl.logit(j);
            if (isfinite(l) && l >= least) {
                lmin = fminf(lmin, l);
            }
        }
        lmin = __uint_as_float((u32)block_all((u64)__float_as_uint(lmin), [](u64 a, u64 b) {
            return (u64)__float_as_uint(fminf(__uint_as_float((u32)a), __uint_as_float((u32)b)));
        }));
        if (me == 0) {
            ctl->best = best;
            ctl->argmax = amax;
            ctl->count = count;
            ctl->lmin = lmin;
        }
        cluster_sync<CB>();
        best = 0;
        amax = 0;
        count = 0;
        lmin = __int_as_float(0x7f800000u);
        for (u32 q = 0; q < CB; ++q) {
            const Control* other = in_block<CB>(ctl, q);
            best = other->best > best ? other->best : best;
            amax = other->argmax > amax ? other->argmax : amax;
            count += other->count;
            lmin = fminf(lmin, other->lmin);
        }
        *best_out = best;
        *argmax_out = amax;
        *count_out = count;
        *lmin_out = lmin;
    }

    // ------------------------------------------------------------ the ops

    // OP_WEIGH: the bucket histogram of the set {composite >= floor_c} (its last bucket
    // b1_hi), with the sums req.flags asks for, and min-p's count over the set; summed
    // into block 0's. `fill` (pass 2) computes every bucket and caches it.
    __device__ void weigh(const Request& req, bool fill) {
        const u32 me = tid;  // in a register through the loops
        zero(hc1, hw1, hv1, NB1);
        __syncthreads();
        const Slice<D1> sl = slice;
        u32* const hc = hc1;
        u64* const hw = hw1;
        u64* const hv = hv1;
        const u32 ln = lane;
        const bool sum_w = (req.flags & SUM_W) != 0;
        const bool sum_v = (req.flags & SUM_V) != 0;
        const bool want_nm = (req.flags & COUNT_NM) != 0;
        const u32 last = req.b1_hi;
        const u64 floor_c = req.floor_c;
        const bool cached = sl.bucket != nullptr && !fill;
        u64 nm = 0;
        // Two candidates an iteration, for independent work between the exponentials.
        constexpr u32 STEP = 2;
        for (u32 base = 0; base < sl.n; base += STEP * THREADS) {
            u32 b[STEP];
            u64 w[STEP];
            u64 v[STEP];
#pragma unroll
            for (u32 k = 0; k < STEP; ++k) {
                const u32 j = base + k * THREADS + me;
                b[k] = NO_BUCKET;
                w[k] = 0;
                v[k] = 0;
                if (j < sl.n) {
                    const float l = sl.logit(j);
                    u32 lb = NO_BUCKET;
                    float x = 0.0f;
                    if (!isnan(l)) {
                        x = row_x(sl.row, l);
                        lb = cached ? sl.bucket[j] : row_vk(sl.row, x) >> (32 - D1);
                    }
                    if (fill && sl.bucket != nullptr) {
                        sl.bucket[j] = (u16)lb;
                    }
                    if (lb < last || (lb == last && composite(l, sl.begin + j) >= floor_c)) {
                        b[k] = lb;
                        weights_of(sl.row, x, sum_w || want_nm, sum_v, &w[k], &v[k]);
                        nm += (want_nm && w[k] >= sl.row.floor_w) ? 1 : 0;
                    }
                }
            }
#pragma unroll
            for (u32 k = 0; k < STEP; ++k) {
                hist_add(hc, hw, hv, ln, b[k], w[k], v[k], sum_w, sum_v);
            }
        }
        nm = block_sum(nm);
        if (me == 0) {
            ctl->nm = nm;
        }
        cluster_sync<CB>();
        reduce_histograms(hc1, hw1, hv1, NB1);
        cluster_sync<CB>();
    }

    // OP_GATHER: every concerned candidate's composite, appended to block 0's list.
    __device__ void gather(const Request& req) {
        const u32 me = tid;  // in a register through the loops
        const Slice<D1> sl = slice;
        u32* const list_n = in_block<CB>(&ctl->list_n, 0);
        u64* const into = in_block<CB>(list, 0);
        const u32 ln = lane;
        // Appends c for the lanes that take one.
        const auto append = [&](bool take, u64 c) {
            const u32 ballot = __ballot_sync(FULL, take);
            if (ballot != 0) {
                u32 at = 0;
                if (ln == 0) {
                    at = atomicAdd(list_n, (u32)__popc(ballot));
                }
                at = __shfl_sync(FULL, at, 0) + __popc(ballot & ((1u << ln) - 1));
                // The leader asks only for what the list holds; the bound guards it.
                if (take && at < CAP) {
                    into[at] = c;
                }
            }
        };
        if (sl.bucket != nullptr) {
            // Eight cached buckets a load; a warp looks closer only where one is in
            // the requested range.
            const uint4* groups = reinterpret_cast<const uint4*>(sl.bucket);
            const u32 n8 = (sl.n + 7) / 8;
            for (u32 base = 0; base < n8; base += THREADS) {
                const u32 g = base + me;
                u32 hits = 0;
                if (g < n8) {
                    const uint4 q = groups[g];
                    const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                    for (u32 k = 0; k < 8; ++k) {
                        const u32 b = (words[k / 2] >> (16 * (k % 2))) & 0xffffu;
                        if (8 * g + k < sl.n && b >= req.b1_lo && b <= req.b1_hi) {
                            hits |= 1u << k;
                        }
                    }
                }
                if (__any_sync(FULL, hits != 0)) {
                    for (u32 k = 0; k < 8; ++k) {
                        const u32 j = 8 * g + k;
                        u64 c = 0;
                        Key t{0, 0};
                        const bool take = ((hits >> k) & 1) != 0 && sl.concerned(req, j, sl.logit(j), &c, &t);
                        append(take, c);
                    }
                }
            }
        } else {
            for (u32 base = 0; base < sl.n; base += THREADS) {
                const u32 j = base + me;
                u64 c = 0;
                Key t{0, 0};
                const bool take = j < sl.n && sl.concerned(req, j, sl.logit(j), &c, &t);
                append(take, c);
            }
        }
        cluster_sync<CB>();
    }

    // OP_REFINE: the concerned candidates histogrammed on their digit.
    __device__ void refine(const Request& req) {
        const u32 me = tid;  // in a register through the loops
        zero(hc2, hw2, hv2, NB2);
        __syncthreads();
        const Slice<D1> sl = slice;
        u32* const hc = hc2;
        u64* const hw = hw2;
        u64* const hv = hv2;
        const u32 ln = lane;
        const bool sum_w = (req.flags & SUM_W) != 0;
        const bool sum_v = (req.flags & SUM_V) != 0;
        const u32 mask = (1u << req.digit_bits) - 1;
        for (u32 base = 0; base < sl.n; base += THREADS) {
            const u32 j = base + me;
            u32 b = NO_BUCKET;
            u64 w = 0;
            u64 v = 0;
            if (j < sl.n) {
                const float l = sl.logit(j);
                u64 c;
                Key t;
                if (sl.concerned(req, j, l, &c, &t)) {
                    b = (u32)key_shr(t, req.digit_shift).lo & mask;
                    weights_of(sl.row, row_x(sl.row, l), sum_w, sum_v, &w, &v);
                }
            }
            hist_add(hc, hw, hv, ln, b, w, v, sum_w, sum_v);
        }
        cluster_sync<CB>();
        reduce_histograms(hc2, hw2, hv2, NB2);
        cluster_sync<CB>();
    }

    __device__ void run(const Request& req) {
        if (req.op == OP_GATHER) {
            gather(req);
        } else if (req.op == OP_REFINE) {
            refine(req);
        } else if (req.op == OP_WEIGH) {
            weigh(req, false);
        }
    }

    // Blocks other than the leader: run the leader's requests until it is done.
    __device__ void serve() {
        for (;;) {
            cluster_sync<CB>();
            const Request req = in_block<CB>(ctl, 0)->req;
            if (req.op == OP_DONE) {
                return;
            }
            run(req);
        }
    }

    // The leader: sets its request going (thread 0 wrote ctl->req) and takes its share.
    __device__ void request() {
        cluster_sync<CB>();
        run(ctl->req);
    }

    // ------------------------------------------------------------ the leader

    struct State {
        u64 floor_c;  // the current set: composite >= floor_c (0: every candidate)
        Key floor;    // its key bound (t <= floor)
        u32 have;     // what the bucket histogram sums besides counts (SUM_W, SUM_V)
        bool listed;  // the list holds every candidate of the set with keys in a range
        u32 list_size;
        Sums above;   // the sums of every candidate ranked before the list's range
    };

    __device__ Sums histogram_total(const u32* hc, const u64* hw, const u64* hv, u32 bins) {
        Sums mine{0, 0, 0};
        for (u32 j = tid; j < bins; j += THREADS) {
            mine = mine + Sums{hc[j], hw[j], hv[j]};
        }
        return Sums{block_sum(mine.n), block_sum(mine.w), block_sum(mine.v)};
    }

    // The first bin b < limit at which base plus the bins' running sum of q reaches
    // target (base's q below target), with the sums before it; limit and the sums
    // before it when none does.
    __device__ Walk walk(const u32* hc, const u64* hw, const u64* hv, u32 bins, u32 limit, u32 q,
                         u64 target, Sums base) {
        const u32 per = (bins + THREADS - 1) / THREADS;
        const u32 first = tid * per;
        Sums mine{0, 0, 0};
        for (u32 k = 0; k < per; ++k) {
            const u32 j = first + k;
            if (j < limit) {
                mine = mine + Sums{hc[j], hw[j], hv[j]};
            }
        }
        if (tid == 0) {
            ctl->found = limit;
        }
        Sums total;
        Sums run = base + block_scan(mine, &total);
        for (u32 k = 0; k < per; ++k) {
            const u32 j = first + k;
            if (j < limit) {
                const Sums next = run + Sums{hc[j], hw[j], hv[j]};
                if (pick(run, q) < target && pick(next, q) >= target) {
                    ctl->found = j;
                    ctl->found_sums = run;
                }
                run = next;
            }
        }
        __syncthreads();
        Walk r{ctl->found, ctl->found_sums};
        if (r.bin == limit) {
            r.cum = base + total;
        }
        __syncthreads();
        return r;
    }

    // Sorts the gathered list (descending composite: rank order), a bitonic sort whose
    // strides of at most 32 stay within a warp, and sets lw and lv to the running sums
    // of w and v.
    __device__ void build_list(u32 size) {
        u32 padded = 1;
        while (padded < size) {
            padded <<= 1;
        }
        for (u32 i = size + tid; i < padded; i += THREADS) {
            list[i] = 0;  // below every candidate's composite
        }
        __syncthreads();
        for (u32 k = 2; k <= padded; k <<= 1) {
            for (u32 s = k >> 1; s > 0; s >>= 1) {
                for (u32 p = tid; p < padded / 2; p += THREADS) {
                    const u32 i = ((p & ~(s - 1)) << 1) | (p & (s - 1));
                    const u32 o = i + s;
                    const u64 a = list[i];
                    const u64 b = list[o];
                    const bool descending = (i & k) == 0;
                    if (descending ? a < b : a > b) {
                        list[i] = b;
                        list[o] = a;
                    }
                }
                // A warp's pairs of strides up to 32 lie in its own 64 entries.
                const u32 next = s > 1 ? s >> 1 : k;
                if (s > 32 || next > 32 || (s == 1 && k == padded)) {
                    __syncthreads();
                } else {
                    __syncwarp();
                }
            }
        }
        __syncthreads();
        const u32 per = (size + THREADS - 1) / THREADS;
        const u32 first = tid * per;
        Sums mine{0, 0, 0};
        for (u32 k = 0; k < per; ++k) {
            const u32 i = first + k;
            if (i < size) {
                u64 w;
                u64 v;
                weights_of(slice.row, row_x(slice.row, logit_of(list[i])), true, true, &w, &v);
                lw[i] = w;
                lv[i] = v;
                mine = mine + Sums{1, w, v};
            }
        }
        Sums total;
        Sums run = block_scan(mine, &total);
        for (u32 k = 0; k < per; ++k) {
            const u32 i = first + k;
            if (i < size) {
                run = run + Sums{1, lw[i], lv[i]};
                lw[i] = run.w;
                lv[i] = run.v;
            }
        }
        __syncthreads();
    }

    __device__ Sums listed(u32 i) const { return Sums{i + 1, lw[i], lv[i]}; }

    // How many of the list's first candidates have composite >= floor_c.
    __device__ u32 list_until(u64 floor_c, u32 size) {
        if (tid == 0) {
            ctl->found = 0;
        }
        __syncthreads();
        for (u32 i = tid; i < size; i += THREADS) {
            if (list[i] >= floor_c && (i + 1 == size || list[i + 1] < floor_c)) {
                ctl->found = i + 1;
            }
        }
        __syncthreads();
        const u32 r = ctl->found;
        __syncthreads();
        return r;
    }

    // The crossing of q at target, when the list holds it.
    __device__ bool from_list(const State& s, u32 q, u64 target, Found* f) {
        if (!s.listed) {
            return false;
        }
        const u32 until = list_until(s.floor_c, s.list_size);
        if (until == 0) {
            return false;
        }
        const u64 lo = pick(s.above, q);
        if (!(lo < target && target <= lo + pick(listed(until - 1), q))) {
            return false;
        }
        for (u32 i = tid; i < until; i += THREADS) {
            const u64 before = lo + (i == 0 ? 0 : pick(listed(i - 1), q));
            if (before < target && lo + pick(listed(i), q) >= target) {
                ctl->found = i;
            }
        }
        __syncthreads();
        f->index = ctl->found;
        f->c = list[f->index];
        f->sums = s.above + listed(f->index);
        __syncthreads();
        return true;
    }

    // Whether the list still holds f and every candidate ranked before it.
    __device__ bool listed_from_top(const State& s, const Found& f) const {
        return f.c != 0 && s.listed && s.above.n == 0 && f.index < s.list_size && list[f.index] == f.c;
    }

    // Gathers the candidates of the set with buckets b1_lo..b1_hi and plo <= (t >>
    // shift) <= phi into the list, `above` the sums of the set's candidates before it.
    __device__ void gather_list(State& s, u32 b1_lo, u32 b1_hi, u32 shift, Key plo, Key phi, Sums above) {
        if (tid == 0) {
            ctl->req.op = OP_GATHER;
            ctl->req.b1_lo = b1_lo;
            ctl->req.b1_hi = b1_hi;
            ctl->req.shift = shift;
            ctl->req.plo = plo;
            ctl->req.phi = phi;
            ctl->req.floor_c = s.floor_c;
            ctl->list_n = 0;
        }
        request();
        const u32 size = ctl->list_n < CAP ? ctl->list_n : CAP;
        build_list(size);
        s.listed = true;
        s.list_size = size;
        s.above = above;
    }

    // The candidate at which the running sum of q over the set, in rank order, first
    // reaches target (1 <= target <= the set's sum of q; the histogram sums q or the
    // list holds the crossing).
    __device__ Found find(State& s, u32 q, u64 target) {
        // Composite 0 (index -1) only if the list missed, which cannot happen.
        Found f{0, Sums{0, 0, 0}, 0};
        if (from_list(s, q, target, &f)) {
            return f;
        }
        const u32 last = s.floor.hi >> (32 - D1);
        const Walk at = walk(hc1, hw1, hv1, NB1, last, q, target, Sums{0, 0, 0});
        const u32 b = at.bin;
        if (hc1[b] <= CAP) {
            // Take the buckets above too while they fit EXT (or the bucket alone).
            const u32 budget = EXT > hc1[b] ? EXT : hc1[b];
            const u64 through = at.cum.n + hc1[b];
            u32 a = b;
            Sums above = at.cum;
            if (through <= budget) {
                a = 0;
                above = Sums{0, 0, 0};
            } else if (budget > hc1[b]) {
                const Walk e = walk(hc1, hw1, hv1, NB1, b, BY_COUNT, through - budget, Sums{0, 0, 0});
                a = e.bin + 1;
                above = e.cum + Sums{hc1[e.bin], hw1[e.bin], hv1[e.bin]};
            }
            gather_list(s, a, b, SHIFT1, Key{0, a}, Key{0, b}, above);
        } else {
            // Too many for the list: histogram the bucket on the next digits of t.
            u32 shift = SHIFT1;
            Key p{0, b};
            Sums cum = at.cum;
            for (;;) {
                const u32 next = shift > D2 ? shift - D2 : 0;
                const u32 bits = shift - next;
                if (tid == 0) {
                    ctl->req.op = OP_REFINE;
                    ctl->req.flags = s.have;
                    ctl->req.b1_lo = b;
                    ctl->req.b1_hi = b;
                    ctl->req.shift = shift;
                    ctl->req.plo = p;
                    ctl->req.phi = p;
                    ctl->req.floor_c = s.floor_c;
                    ctl->req.digit_shift = next;
                    ctl->req.digit_bits = bits;
                }
                request();
                const u32 bins = 1u << bits;
                const Walk sub = walk(hc2, hw2, hv2, bins, bins - 1, q, target, cum);
                cum = sub.cum;
                p = key_push(p, bits, sub.bin);
                shift = next;
                if (hc2[sub.bin] <= CAP) {
                    gather_list(s, b, b, shift, p, p, cum);
                    break;
                }
            }
        }
        from_list(s, q, target, &f);
        return f;
    }

    // Histograms the set over the buckets with `flags`' sums (OP_WEIGH); returns its
    // sums and sets *nm to its min-p count.
    __device__ Sums weigh_set(State& s, u32 flags, u64* nm) {
        if (tid == 0) {
            ctl->req.op = OP_WEIGH;
            ctl->req.flags = flags;
            ctl->req.b1_hi = s.floor.hi >> (32 - D1);
            ctl->req.floor_c = s.floor_c;
        }
        request();
        s.have = flags & (SUM_W | SUM_V);
        s.listed = false;
        *nm = 0;
        for (u32 q = 0; q < CB; ++q) {
            *nm += in_block<CB>(ctl, q)->nm;
        }
        return histogram_total(hc1, hw1, hv1, NB1);
    }

    // Moves the set's bound to the crossing f.
    __device__ void cut(State& s, const Found& f) {
        s.floor_c = f.c;
        s.floor = row_key(slice.row, logit_of(f.c), index_of(f.c));
    }

    // The leader's program after pass 2 (which histogrammed every candidate with
    // `flags`' sums when `weighed`, else counted them): every cut, then the draw.
    // Returns the chosen index.
    __device__ __noinline__ u32 lead(u32 top_k, float top_p, float min_p, float u, bool weighed, u32 flags) {
        State s;
        s.floor_c = 0;
        s.floor = Key{0xffffffffu, ~0ull};
        s.have = weighed ? flags & (SUM_W | SUM_V) : 0;
        s.listed = false;
        s.list_size = 0;
        s.above = Sums{0, 0, 0};
        u64 nm = 0;
        for (u32 q = 0; q < CB; ++q) {
            nm += in_block<CB>(ctl, q)->nm;
        }
        Sums set = histogram_total(hc1, hw1, hv1, NB1);
        Found at{0, set, 0};
        if (!weighed) {
            // Top-k on counts. In the tail bucket it changes nothing.
            const u32 head = (u32)(set.n - hc1[NB1 - 1]);
            if (slice.row.tail_zero && head < top_k) {
                set = weigh_set(s, flags, &nm);
                at.sums = set;
            } else {
                at = find(s, BY_COUNT, top_k);
                cut(s, at);
                if (listed_from_top(s, at)) {
                    // C is the list's first top_k candidates.
                    u64 count = 0;
                    for (u32 i = tid; i < top_k; i += THREADS) {
                        const u64 w = lw[i] - (i == 0 ? 0 : lw[i - 1]);
                        count += w >= slice.row.floor_w ? 1 : 0;
                    }
                    nm = block_sum(count);
                    set = at.sums;
                } else {
                    set = weigh_set(s, flags, &nm);
                    at.sums = set;
                }
            }
        }
        // Top-p and min-p over C.
        Found kept = at;
        if (top_p < 1.0f) {
            kept = find(s, BY_W, scaled(top_p, set.w, true));
        }
        if (min_p > 0.0f) {
            const u64 keep_m = nm > 0 ? nm : 1;
            if (keep_m < kept.sums.n) {
                kept = find(s, BY_COUNT, keep_m);
            }
        }
        if (kept.c != 0) {
            cut(s, kept);
        }
        // The draw over K: its v from the list, or K histogrammed with v.
        if ((s.have & SUM_V) == 0 && !listed_from_top(s, kept)) {
            u64 unused;
            kept.sums = weigh_set(s, SUM_V, &unused);
        }
        const Found drawn = find(s, BY_V, draw_target(u, kept.sums.v) + 1);
        return index_of(drawn.c);
    }
};

// One row per cluster of CB blocks of THREADS threads; the dynamic shared memory
// holds Control, the histograms and list, and, as far as it fits, the slice of
// `chunk` logits and their buckets.
template <u32 THREADS, u32 CB, u32 D1, u32 D2, u32 CAP, u32 EXT>
__device__ void sample_rows(const float* logits, const float* uniform, int* out, u32 vocab, u32 chunk,
                            float temperature, u32 top_k, float top_p, float min_p) {
    using S = Sampler<THREADS, CB, D1, D2, CAP, EXT>;
    chain_after_prior_grids(logits, uniform);
    extern __shared__ __align__(16) unsigned char sample_shared[];
    S s;
    unsigned char* at = sample_shared;
    s.ctl = reinterpret_cast<Control*>(at);
    at += SAMPLE_CONTROL_BYTES;
    const auto take64 = [&](u32 count) {
        u64* p = reinterpret_cast<u64*>(at);
        at += 8 * count;
        return p;
    };
    s.hw1 = take64(S::NB1);
    s.hv1 = take64(S::NB1);
    s.hw2 = take64(S::NB2);
    s.hv2 = take64(S::NB2);
    s.list = take64(CAP);
    s.lw = take64(CAP);
    s.lv = take64(CAP);
    s.hc1 = reinterpret_cast<u32*>(at);
    at += 4 * S::NB1;
    s.hc2 = reinterpret_cast<u32*>(at);
    at += 4 * S::NB2;
    const u32 fixed = ((u32)(at - sample_shared) + 15) / 16 * 16;
    at = sample_shared + fixed;
    const u32 room = dynamic_shared_bytes();

    s.rank = cluster_rank<CB>();
    s.tid = threadIdx.x;
    s.lane = threadIdx.x & 31u;
    s.warp = threadIdx.x >> 5;
    const u32 row = blockIdx.x / CB;
    const u32 begin = s.rank * chunk < vocab ? s.rank * chunk : vocab;
    Slice<D1>& sl = s.slice;
    sl.stage = fixed + 4 * chunk <= room ? reinterpret_cast<float*>(at) : nullptr;
    sl.bucket = fixed + 6 * chunk <= room ? reinterpret_cast<u16*>(at + 4 * chunk) : nullptr;
    sl.begin = begin;
    sl.n = (vocab - begin < chunk) ? vocab - begin : chunk;
    sl.src = logits + (u64)row * vocab + begin;

    const bool sampling = temperature > 0.0f;
    // R0: the distance beyond which w and v are 0 (24 * max(1, temperature)).
    const float r0 = __fmul_rn(24.0f, temperature > 1.0f ? temperature : 1.0f);
    u64 best;
    u64 amax;
    u32 candidates;
    float lmin;
    s.pass1(r0, &best, &amax, &candidates, &lmin);
    if (candidates == 0 || !sampling) {
        if (s.rank == 0 && threadIdx.x == 0) {
            out[row] = candidates == 0 ? 0 : (int)index_of(sampling ? best : amax);
        }
        cluster_sync<CB>();
        return;
    }

    // The row's quantities, the same in every block.
    Row& r = sl.row;
    r.m = logit_of(best);
    r.t = temperature;
    r.same_v = temperature == 1.0f;
    r.floor_w = min_p > 0.0f ? (u64)ceilf(__fmul_rn(min_p, 4294967296.0f)) : 0;
    // R: a power of two at least the spread m - lmin (when below r0) or r0, within
    // [2^-64, 2^100]; scale = 2^32 / R exactly.
    const float spread = __fsub_rn(r.m, lmin);
    float range = (spread >= 0.0f && spread < r0) ? spread : r0;  // NaN and infinities: r0
    range = range > 0x1p-64f ? range : 0x1p-64f;
    range = range < 0x1p100f ? range : 0x1p100f;
    const u32 bits = __float_as_uint(range);
    const int e = (int)((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
    r.scale = __int_as_float((127 + 32 - e) << 23);
    r.tail_zero = pow2(e) >= r0;

    // Pass 2: C's weights when top-k is off (w for top-p, min-p's count, and v when
    // nothing else cuts), else counts alone.
    const bool weighed = !(top_k > 0 && top_k < candidates);
    const u32 flags = (top_p < 1.0f ? SUM_W : 0) | (min_p > 0.0f ? COUNT_NM : 0) |
                      (top_p < 1.0f || min_p > 0.0f ? 0 : SUM_V);
    Request all{};
    all.op = OP_WEIGH;
    all.flags = weighed ? flags : 0;
    all.b1_hi = S::NB1 - 1;
    all.floor_c = 0;
    s.weigh(all, true);
    if (s.rank == 0) {
        const u32 chosen = s.lead(top_k, top_p, min_p, uniform[row], weighed, flags);
        if (threadIdx.x == 0) {
            out[row] = (int)chosen;
            s.ctl->req.op = OP_DONE;
        }
        cluster_sync<CB>();
    } else {
        s.serve();
    }
    // No block leaves while another may still read its shared memory.
    cluster_sync<CB>();
}

#if __CUDA_ARCH__ >= 900
#define KILN_SAMPLE_CLUSTER(n) __cluster_dims__(n, 1, 1)
#define KILN_SAMPLE_BLOCKS(n) (n)
#else
#define KILN_SAMPLE_CLUSTER(n)
#define KILN_SAMPLE_BLOCKS(n) 1u
#endif

// The sampling kernel: clusters of CB blocks per row where the device has clusters
// (compute capability 9.0 and later), one block per row elsewhere.
template <u32 THREADS, u32 CB, u32 D1, u32 D2, u32 CAP, u32 EXT>
__global__ void KILN_SAMPLE_CLUSTER(CB) __launch_bounds__(THREADS, 1)
    sample(const float* __restrict__ logits, const float* __restrict__ uniform, int* __restrict__ out,
           u32 vocab, u32 chunk, float temperature, u32 top_k, float top_p, float min_p) {
    sample_rows<THREADS, KILN_SAMPLE_BLOCKS(CB), D1, D2, CAP, EXT>(logits, uniform, out, vocab, chunk,
                                                                   temperature, top_k, top_p, min_p);
}

// The same with one block per row on every device.
template <u32 THREADS, u32 D1, u32 D2, u32 CAP, u32 EXT>
__global__ void __launch_bounds__(THREADS, 1)
    sample_block(const float* __restrict__ logits, const float* __restrict__ uniform, int* __restrict__ out,
                 u32 vocab, u32 chunk, float temperature, u32 top_k, float top_p, float min_p) {
    sample_rows<THREADS, 1, D1, D2, CAP, EXT>(logits, uniform, out, vocab, chunk, temperature, top_k, top_p,
                                              min_p);
}

}  // namespace kiln
