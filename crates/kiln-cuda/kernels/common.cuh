// Shared helpers for kiln's kernels: integer types, element-type tags with their
// conversions to and from f32, block-wide reductions, grid indexing, and the
// ordering of a kernel after the ones before it in the stream.
#pragma once

#include "constants.cuh"

namespace kiln {

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;

// IEEE half bits to f32 (exact).
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 to IEEE half bits, rounding to nearest even; overflow gives infinity.
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// bfloat16 bits to f32 (exact).
__device__ __forceinline__ float bf16_bits_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// f32 to bfloat16 bits, rounding to nearest even; a NaN stays a NaN of the same
// sign with the quiet bit set (as the `half` crate does).
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    const u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    const u32 round_bit = 0x8000u;
    const u32 keep = x >> 16;
    const bool round_up = (x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0;
    return (u16)(keep + (round_up ? 1u : 0u));
}

// Element types as template tags: the stored type and its conversions to and from
// f32, the type kernels compute in.
struct F32 {
    typedef float storage;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};

struct F16 {
    typedef u16 storage;
    static __device__ __forceinline__ float load(u16 v) { return f16_bits_to_f32(v); }
    static __device__ __forceinline__ u16 store(float v) { return f32_to_f16_bits(v); }
};

struct BF16 {
    typedef u16 storage;
    static __device__ __forceinline__ float load(u16 v) { return bf16_bits_to_f32(v); }
    static __device__ __forceinline__ u16 store(float v) { return f32_to_bf16_bits(v); }
};

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over the block; every thread gets the total. blockDim.x must be a multiple of
// 32 and at most 1024, and every thread of the block must call it. Call at most
// once per kernel (it reuses one shared array without a trailing barrier).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const u32 warps = blockDim.x >> 5;
    v = threadIdx.x < warps ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) {
        v = warp_sum(v);
        if (lane == 0) {
            partial[0] = v;
        }
    }
    __syncthreads();
    return partial[0];
}

// Activations rounded to Q8_1 (kiln_core::ops::Q8_COPY; the CPU definition is
// kiln_core::quant's Q8_1 encoding). Per block of 32 values v: d = max |v| / 127,
// q = v * (1 / d) rounded half away from zero (0 where d = 0), stored as 36 bytes:
// d as f16, s = d * sum(q) as f16, then the 32 quants as i8.

// The reciprocal the quants of a block with scale d are rounded with.
__device__ __forceinline__ float q8_1_inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// The quant of v in a block whose scale has reciprocal inv.
__device__ __forceinline__ int q8_1_quant(float v, float inv) {
    return __float2int_rz(roundf(v * inv));
}

// The first word of a Q8_1 block of scale d whose quants sum to `sum`: d as f16, then
// s = d * sum as f16.
__device__ __forceinline__ u32 q8_1_scales(float d, int sum) {
    return (u32)f32_to_f16_bits(d) | ((u32)f32_to_f16_bits((float)sum * d) << 16);
}

// Quants q0 .. q3 packed one per byte, q0 lowest.
__device__ __forceinline__ u32 q8_1_pack4(int q0, int q1, int q2, int q3) {
    return __byte_perm(__byte_perm((u32)q0, (u32)q1, 0x0040u),
                       __byte_perm((u32)q2, (u32)q3, 0x0040u), 0x5410u);
}

// Rounds the 32 values of a warp, lane i holding element i of the block, to the Q8_1
// block at `block` (4-byte aligned). Every lane of the warp must call it. As on the
// CPU, NaN values do not enter the maximum and round to 0.
__device__ __forceinline__ void store_q8_1_block(float v, u8* block) {
    const u32 lane = threadIdx.x & 31u;
    float amax = fmaxf(0.0f, fabsf(v));
    for (int offset = 16; offset > 0; offset >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    const float d = amax / 127.0f;
    const int q = q8_1_quant(v, q8_1_inverse(d));
    int sum = q;
    for (int offset = 16; offset > 0; offset >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    block[4 + lane] = (u8)q;
    if (lane == 0) {
        *reinterpret_cast<u32*>(block) = q8_1_scales(d, sum);
    }
}

// Elements e .. e + 3 (e a multiple of 4) of activations rounded to Q8_1, `q8` their
// blocks (4-byte aligned), decoded as the CPU decodes them: d * q in f32, d the f16
// scale widened (exact).
__device__ __forceinline__ float4 q8_1_float4(const u8* q8, u64 e) {
    const u8* block = q8 + e / Q8_1_BLOCK_ELEMS * Q8_1_BLOCK_BYTES;
    const float d = f16_bits_to_f32(*reinterpret_cast<const u16*>(block));
    const u32 q = *reinterpret_cast<const u32*>(block + 4 + e % Q8_1_BLOCK_ELEMS);
    return make_float4(d * (float)(int)(signed char)(q & 0xffu),
                       d * (float)(int)(signed char)((q >> 8) & 0xffu),
                       d * (float)(int)(signed char)((q >> 16) & 0xffu),
                       d * (float)(int)(signed char)(q >> 24));
}

// Float4 v, elements 4 * (lane % 8) .. + 3 of a block of 32 held by 8 consecutive
// lanes (starting at a multiple of 8), rounded to Q8_1 as store_q8_1_block does: the
// block's scale d (before its f16 rounding) and v's 4 quants. Every lane of the warp
// must call round_q8_1_quad (the maximum is a shuffle).
struct Q8_1Quad {
    float d;
    int q0, q1, q2, q3;

    // The 4 quants packed one per byte, q0 lowest.
    __device__ __forceinline__ u32 packed() const { return q8_1_pack4(q0, q1, q2, q3); }
};

__device__ __forceinline__ Q8_1Quad round_q8_1_quad(float4 v) {
    float amax = fmaxf(fmaxf(fmaxf(0.0f, fabsf(v.x)), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    for (int offset = 4; offset > 0; offset >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    const float d = amax / 127.0f;
    const float inv = q8_1_inverse(d);
    return Q8_1Quad{d, q8_1_quant(v.x, inv), q8_1_quant(v.y, inv), q8_1_quant(v.z, inv),
                    q8_1_quant(v.w, inv)};
}

// Rounds float4 v as round_q8_1_quad does to the Q8_1 block at `block` (4-byte
// aligned). Every lane of the warp must call it (the maximum and the sum are
// shuffles); only lanes with `store` write.
__device__ __forceinline__ void store_q8_1_block4(float4 v, bool store, u8* block) {
    const Q8_1Quad r = round_q8_1_quad(v);
    int sum = (r.q0 + r.q1) + (r.q2 + r.q3);
    for (int offset = 4; offset > 0; offset >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (store) {
        const u32 lane8 = threadIdx.x & 7u;
        *reinterpret_cast<u32*>(block + 4 + 4 * lane8) = r.packed();
        if (lane8 == 0) {
            *reinterpret_cast<u32*>(block) = q8_1_scales(r.d, sum);
        }
    }
}

// Rounds the 8 values v, elements 8 * (lane % 4) .. + 7 of a block of 32 held by 4
// consecutive lanes (starting at a multiple of 4), to the Q8_1 block at `block` (4-byte
// aligned) as store_q8_1_block does. Every lane of the warp must call it (the maximum
// and the sum are shuffles within each 4 lanes); only lanes with `store` write, and a
// block's 4 lanes must agree on it.
__device__ __forceinline__ void store_q8_1_block8(const float (&v)[8], bool store, u8* block) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        amax = fmaxf(amax, fabsf(v[i]));
    }
    for (int offset = 2; offset > 0; offset >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    const float d = amax / 127.0f;
    const float inv = q8_1_inverse(d);
    int q[8];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        q[i] = q8_1_quant(v[i], inv);
        sum += q[i];
    }
    for (int offset = 2; offset > 0; offset >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (store) {
        const u32 lane4 = threadIdx.x & 3u;
        u32* quants = reinterpret_cast<u32*>(block + 4 + 8 * lane4);
        quants[0] = q8_1_pack4(q[0], q[1], q[2], q[3]);
        quants[1] = q8_1_pack4(q[4], q[5], q[6], q[7]);
        if (lane4 == 0) {
            *reinterpret_cast<u32*>(block) = q8_1_scales(d, sum);
        }
    }
}

// Index of this thread in a one-dimensional grid, and the grid's stride.
__device__ __forceinline__ u64 global_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ u64 grid_stride() {
    return (u64)gridDim.x * blockDim.x;
}

// Programmatic dependent launch. On devices of compute capability 9.0 and later kiln
// launches every kernel so that it may start while the kernel before it in the
// stream is still running (src/launch.rs). A kernel calls chain_after_prior_grids
// before it reads anything an earlier kernel may write or writes anything one may
// read: before it the only reads allowed are of weights, which only host copies
// write, and of a recurrent state that only its own op writes where no launch of that
// op directly follows another writer of the same state (the kernel just before has
// passed its own wait, so every earlier kernel has completed). It
// - waits until every earlier kernel of the stream has completed and its writes are
//   visible (griddepcontrol.wait);
// - makes each of `inputs`, the kernel's pointers to what earlier kernels write,
//   opaque to the compiler (still known to point to global memory), so that their
//   loads are ordinary global loads after the wait. (A `const T* __restrict__`
//   parameter is otherwise read with ld.global.nc, whose data must not change while
//   the kernel runs, and ptxas hoists such loads above the wait.)
// - then lets the next kernel's blocks start (griddepcontrol.launch_dependents;
//   after the wait, so that at most two kernels of the stream run at once).
// All no-ops below compute capability 9.0 and in a kernel launched without that.
// A kernel the host always launches serialized (KernelArgs::serialized) does not call
// it: stream order already puts it after the kernels before it, the next kernel's wait
// covers it, and its activations keep their read-only (.nc) loads.

// p, as a value the compiler cannot trace to a kernel parameter, in global memory.
template <typename Pointer>
__device__ __forceinline__ void make_opaque(Pointer& p) {
    asm volatile("" : "+l"(p));
    __builtin_assume(__isGlobal(p));
}

template <typename... Pointers>
__device__ __forceinline__ void chain_after_prior_grids(Pointers&... inputs) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    (make_opaque(inputs), ...);
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// The cache slot of token t (kiln_core::ops::KvAppend defines slots): slots[t], or 0
// for every token when slots is null; -1 for a slot outside 0..n_slots, which the
// cache ops skip as they skip a position out of range. Call it after
// chain_after_prior_grids (slots is not __restrict__, so its loads stay after the wait).
__device__ __forceinline__ int token_slot(const int* slots, u32 t, u32 n_slots) {
    if (slots == nullptr) {
        return 0;
    }
    const int s = slots[t];
    return s >= 0 && (u32)s < n_slots ? s : -1;
}

// Copies LOAD bytes from global `from` to shared `to` (both LOAD-aligned) without
// waiting: cp.async for 4, 8 and 16 bytes (16 bypassing L1), a plain copy for 1 and 2.
template <u32 LOAD>
__device__ __forceinline__ void copy_async(u8* to, const u8* from) {
    if constexpr (LOAD == 1) {
        *to = *from;
    } else if constexpr (LOAD == 2) {
        *reinterpret_cast<u16*>(to) = *reinterpret_cast<const u16*>(from);
    } else {
        const u32 shared = (u32)__cvta_generic_to_shared(to);
        if constexpr (LOAD == 16) {
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(from));
        } else {
            asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(shared), "l"(from),
                         "n"(LOAD));
        }
    }
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most PENDING of this thread's committed groups are in flight.
template <u32 PENDING>
__device__ __forceinline__ void wait_copies() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

}  // namespace kiln
