// Weight formats as decoders: every dtype a MatMul or Embedding weight may have, each
// a tag struct that decodes 8 consecutive elements of a row to f32.
//
// The byte layouts are GGML's, defined once in kiln-core's quant module (whose doc
// comments give each field's offset); every decoder here reads exactly those bytes and
// computes exactly the value formula written there, in f32.
//
// Contract of a format tag W:
//   W::BLOCK_ELEMS  elements per block (1 for F32, F16 and BF16);
//   W::BLOCK_BYTES  bytes per block;
//   W::decode8(block, c, v)  writes elements 8c .. 8c + 7 of the block starting at
//       `block` to v[0..8), for c < BLOCK_ELEMS / 8; for the dense formats (one
//       element per block) it writes the 8 elements starting at `block`.
//   Dense formats also have W::decode_partial(p, n, v): the n < 8 elements starting at
//   p, zeros after them (a row's last chunk when its length is not a multiple of 8).
//   W::HAS_QUANTS8  whether W has quants8 (below): every quantized format but IQ4_NL.
//
// A block starts at a multiple of BLOCK_BYTES from a 16-byte aligned address (rows are
// whole blocks, buffers and staging tiles are 16-byte aligned), so every multi-byte
// field is read with the widest load its offset's alignment allows.
#pragma once
#include "common.cuh"

namespace kiln {

typedef unsigned char u8;
typedef signed char i8;

// The largest power of two dividing x (x > 0).
__host__ __device__ constexpr u32 pow2_factor(u32 x) { return x & (~x + 1u); }

// The alignment guaranteed for byte `offset` of a block of `block_bytes` bytes:
// the largest power of two dividing both, at most 16.
__host__ __device__ constexpr u32 field_align(u32 block_bytes, u32 offset) {
    const u32 b = pow2_factor(block_bytes) < 16u ? pow2_factor(block_bytes) : 16u;
    const u32 o = offset == 0 ? 16u : pow2_factor(offset);
    return b < o ? b : o;
}

// Eight bytes at p (little-endian), read with loads of ALIGN bytes; p must be
// ALIGN-aligned.
template <u32 ALIGN>
__device__ __forceinline__ u64 load_u64(const u8* p) {
    if constexpr (ALIGN >= 8) {
        return *reinterpret_cast<const u64*>(p);
    } else if constexpr (ALIGN == 4) {
        const u32* q = reinterpret_cast<const u32*>(p);
        return (u64)q[0] | ((u64)q[1] << 32);
    } else if constexpr (ALIGN == 2) {
        const u16* q = reinterpret_cast<const u16*>(p);
        return (u64)q[0] | ((u64)q[1] << 16) | ((u64)q[2] << 32) | ((u64)q[3] << 48);
    } else {
        u64 v = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v |= (u64)p[i] << (8 * i);
        }
        return v;
    }
}

// Four bytes at p (little-endian), read with loads of ALIGN bytes; p must be
// ALIGN-aligned.
template <u32 ALIGN>
__device__ __forceinline__ u32 load_u32(const u8* p) {
    if constexpr (ALIGN >= 4) {
        return *reinterpret_cast<const u32*>(p);
    } else if constexpr (ALIGN == 2) {
        const u16* q = reinterpret_cast<const u16*>(p);
        return (u32)q[0] | ((u32)q[1] << 16);
    } else {
        return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
    }
}

// The f16 at byte `offset` of `block` (even offsets only) as f32.
__device__ __forceinline__ float load_f16(const u8* block, u32 offset) {
    return f16_bits_to_f32(*reinterpret_cast<const u16*>(block + offset));
}

// Byte i of a little-endian u64.
__device__ __forceinline__ u32 byte_of(u64 v, int i) { return (u32)(v >> (8 * i)) & 0xffu; }

// F32, F16, BF16 (T is the element tag of common.cuh): one element per "block".
template <typename T>
struct Dense {
    static constexpr bool HAS_QUANTS8 = false;
    typedef typename T::storage storage;
    static constexpr u32 BLOCK_ELEMS = 1;
    static constexpr u32 BLOCK_BYTES = sizeof(storage);

    static __device__ __forceinline__ void decode8(const u8* p, u32, float* v) {
        const storage* s = reinterpret_cast<const storage*>(p);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[i] = T::load(s[i]);
        }
    }

    static __device__ __forceinline__ void decode_partial(const u8* p, u32 n, float* v) {
        const storage* s = reinterpret_cast<const storage*>(p);
#pragma unroll
        for (u32 i = 0; i < 8; ++i) {
            v[i] = i < n ? T::load(s[i]) : 0.0f;
        }
    }
};

typedef Dense<F32> WF32;
typedef Dense<F16> WF16;
typedef Dense<BF16> WBF16;

// The quantized formats decode through one description of a chunk of 8 elements:
// element i of the chunk is scale * (u_i - W::BIAS) + offset, where u_i (0 .. 255) is
// byte i of `u`, W::BIAS a constant of the format, and offset 0 unless W::AFFINE.
// The integers u_i - BIAS are exact, so a kernel may convert them however is
// cheapest and apply scale and offset once per chunk.
struct Quants8 {
    u64 u;
    float scale;
    float offset;
};

// For the mat-vec, a chunk may instead be read as two runs of 4 elements, so that a
// thread decodes both nibbles of the bytes it loads: element i of run h (h < 2) is
// scale * (byte i of u[h] - W::BIAS) + offset, and run h starts at element
// W::run_start(c, h) of the block. The runs of the chunks of a block cover it once.
struct Runs8 {
    u32 u[2];
    float scale;
    float offset;
};

// The four low bits of `bits` (bit i for byte i) spread to bit 0 of the 4 bytes.
__device__ __forceinline__ u32 spread_bits4(u32 bits) {
    // Multiplying 4 bits by 0x00204081 puts bit i at bit 8i with no overlapping terms.
    return ((bits & 0xfu) * 0x00204081u) & 0x01010101u;
}

// Eight bits of `bits` (bit i for byte i) spread to bit 0 of the 8 bytes of a u64.
__device__ __forceinline__ u64 spread_bits8(u32 bits) {
    return (u64)spread_bits4(bits) | ((u64)spread_bits4(bits >> 4) << 32);
}

constexpr u64 NIBBLES8 = 0x0f0f0f0f0f0f0f0full;

// The formats with a `quants8(block, c)` (chunk c of the block as Quants8) derive
// from this, which gives them decode8 and marks them for kernels that use quants8.
template <typename W>
struct Quantized {
    static constexpr bool HAS_QUANTS8 = true;

    // By default a chunk's runs are its two halves.
    static __device__ __forceinline__ u32 run_start(u32 c, u32 h) { return 8 * c + 4 * h; }

    static __device__ __forceinline__ Runs8 runs8(const u8* b, u32 c) {
        const Quants8 q = W::quants8(b, c);
        return {{(u32)q.u, (u32)(q.u >> 32)}, q.scale, q.offset};
    }

    static __device__ __forceinline__ void decode8(const u8* b, u32 c, float* v) {
        const Quants8 q = W::quants8(b, c);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float x = (float)((int)byte_of(q.u, i) - W::BIAS);
            v[i] = W::AFFINE ? q.scale * x + q.offset : q.scale * x;
        }
    }
};

// Q4_0, Q4_1, Q5_0, Q5_1: 32 quants of BITS bits. d (f16) at 0, m (f16) at 2 when
// AFFINE, qh (u32, bit j = bit 4 of quant j) when BITS == 5, then qs[16]: byte j holds
// quant j in its low nibble and quant j + 16 in its high nibble.
// Value: AFFINE ? d * q + m : d * (q - 2^(BITS-1)).
template <u32 BITS, bool IS_AFFINE>
struct PackedNibbles : Quantized<PackedNibbles<BITS, IS_AFFINE>> {
    static constexpr u32 BLOCK_ELEMS = 32;
    static constexpr u32 QH_AT = IS_AFFINE ? 4 : 2;
    static constexpr u32 QS_AT = QH_AT + (BITS == 5 ? 4 : 0);
    static constexpr u32 BLOCK_BYTES = QS_AT + 16;
    static constexpr bool AFFINE = IS_AFFINE;
    static constexpr int BIAS = AFFINE ? 0 : 1 << (BITS - 1);

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        // Elements 8c .. 8c+7 sit in bytes 8 (c % 2) .. +8 of qs, in the low nibble for
        // c < 2 and the high nibble otherwise; their fifth bits are bits 8c .. 8c+7 of qh.
        const u64 qs = load_u64<field_align(BLOCK_BYTES, QS_AT)>(b + QS_AT + 8 * (c & 1));
        u64 u = (qs >> (4 * (c >> 1))) & NIBBLES8;
        if constexpr (BITS == 5) {
            u |= spread_bits8((load_u32<field_align(BLOCK_BYTES, QH_AT)>(b + QH_AT) >> (8 * c)) &
                              0xffu)
                 << 4;
        }
        return {u, load_f16(b, 0), AFFINE ? load_f16(b, 2) : 0.0f};
    }

    // Chunk c's runs: the low and the high nibbles of qs bytes 4c .. 4c+3, elements
    // 4c .. 4c+3 and 16 + 4c .. 16 + 4c+3.
    static __device__ __forceinline__ u32 run_start(u32 c, u32 h) { return 4 * c + 16 * h; }

    static __device__ __forceinline__ Runs8 runs8(const u8* b, u32 c) {
        const u32 qs = load_u32<field_align(BLOCK_BYTES, QS_AT + 4)>(b + QS_AT + 4 * c);
        u32 lo = qs & 0x0f0f0f0fu;
        u32 hi = (qs >> 4) & 0x0f0f0f0fu;
        if constexpr (BITS == 5) {
            const u32 qh = load_u32<field_align(BLOCK_BYTES, QH_AT)>(b + QH_AT);
            lo |= spread_bits4(qh >> (4 * c)) << 4;
            hi |= spread_bits4(qh >> (16 + 4 * c)) << 4;
        }
        return {{lo, hi}, load_f16(b, 0), AFFINE ? load_f16(b, 2) : 0.0f};
    }
};

typedef PackedNibbles<4, false> Q4_0;
typedef PackedNibbles<4, true> Q4_1;
typedef PackedNibbles<5, false> Q5_0;
typedef PackedNibbles<5, true> Q5_1;

// Q8_0: d (f16) at 0, qs[32] (i8) at 2. Value: d * qs[j].
struct Q8_0 : Quantized<Q8_0> {
    static constexpr u32 BLOCK_ELEMS = 32;
    static constexpr u32 BLOCK_BYTES = 34;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 128;

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        // Flipping the sign bit maps the i8 q to the byte q + 128.
        const u64 qs = load_u64<field_align(BLOCK_BYTES, 2)>(b + 2 + 8 * c);
        return {qs ^ 0x8080808080808080ull, load_f16(b, 0), 0.0f};
    }
};

// IQ4_NL: d (f16) at 0, qs[16] at 2 as Q4_0's nibbles, each an index into 16 fixed
// levels (kiln_core::quant::IQ4_NL_LEVELS). Value: d * level[index].
struct IQ4_NL {
    static constexpr bool HAS_QUANTS8 = false;
    static constexpr u32 BLOCK_ELEMS = 32;
    static constexpr u32 BLOCK_BYTES = 18;

    // The level of index i (0..16), without a memory lookup: the 16 levels packed
    // as signed bytes, four per word.
    static __device__ __forceinline__ float level(u32 i) {
        // -127 -104 -83 -65 | -49 -35 -22 -10 | 1 13 25 38 | 53 69 89 113
        const u32 words[4] = {0xbfad9881u, 0xf6eaddcfu, 0x26190d01u, 0x71594535u};
        u32 w = words[0];
        w = i >= 4 ? words[1] : w;
        w = i >= 8 ? words[2] : w;
        w = i >= 12 ? words[3] : w;
        return (float)(i8)((w >> (8 * (i & 3))) & 0xffu);
    }

    static __device__ __forceinline__ void decode8(const u8* b, u32 c, float* v) {
        const float d = load_f16(b, 0);
        const u64 qs = load_u64<field_align(BLOCK_BYTES, 2)>(b + 2 + 8 * (c & 1));
        const u32 shift = 4 * (c >> 1);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[i] = d * level((byte_of(qs, i) >> shift) & 0xfu);
        }
    }
};

// The k-quants: 256 elements. Element e = 128 h + 32 s + l (h < 2, s < 4, l < 32);
// a chunk of 8 (e = 8c) shares h, s and runs over l = 8 (c % 4) .. + 8.

// Q2_K: scales[16] at 0 (group g: scale in the low nibble, offset in the high),
// qs[64] at 16 (quant e: bits 2s..2s+2 of qs[32h + l]), d (f16) at 80, dmin at 82.
// Value: d * (scales[g] & 15) * q - dmin * (scales[g] >> 4), g = e / 16.
struct Q2_K : Quantized<Q2_K> {
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 BLOCK_BYTES = 84;
    static constexpr bool AFFINE = true;
    static constexpr int BIAS = 0;

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        const u32 e = 8 * c, h = e / 128, s = (e % 128) / 32, l = e % 32;
        const u32 sc = b[e / 16];
        const u64 qs = load_u64<field_align(BLOCK_BYTES, 16)>(b + 16 + 32 * h + l);
        return {(qs >> (2 * s)) & 0x0303030303030303ull, load_f16(b, 80) * (float)(sc & 0xfu),
                -(load_f16(b, 82) * (float)(sc >> 4))};
    }
};

// Q3_K: hmask[32] at 0 (bit 2 of quant e: bit e / 32 of hmask[e % 32]), qs[64] at 32
// (bits 0-1 as Q2_K), scales[12] at 96 (16 6-bit scales, below), d (f16) at 108.
// Value: d * (sc[g] - 32) * q, g = e / 16, q the signed 3-bit quant: its low two
// bits, less 4 when the hmask bit is clear.
struct Q3_K : Quantized<Q3_K> {
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 BLOCK_BYTES = 110;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 4;

    // Group g's scale minus 32: bits 0-3 are the low (g < 8) or high (g >= 8) nibble
    // of scales[g % 8], bits 4-5 are bits 2 (g / 4) .. +2 of scales[8 + g % 4].
    static __device__ __forceinline__ int group_scale(const u8* scales, u32 g) {
        const u32 low = (scales[g % 8] >> (4 * (g / 8))) & 0xfu;
        const u32 high = (scales[8 + g % 4] >> (2 * (g / 4))) & 3u;
        return (int)(low | (high << 4)) - 32;
    }

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        const u32 e = 8 * c, h = e / 128, s = (e % 128) / 32, l = e % 32;
        const u64 qs = load_u64<field_align(BLOCK_BYTES, 32)>(b + 32 + 32 * h + l);
        const u64 hm = load_u64<field_align(BLOCK_BYTES, 0)>(b + l);
        // q + 4 = low two bits + 4 * hmask bit.
        const u64 u = ((qs >> (2 * s)) & 0x0303030303030303ull) |
                      (((hm >> (e / 32)) & 0x0101010101010101ull) << 2);
        return {u, load_f16(b, 108) * (float)group_scale(b + 96, e / 16), 0.0f};
    }
};

// Q4_K and Q5_K: d (f16) at 0, dmin (f16) at 2, scales[12] at 4 (8 6-bit scales and
// offsets, below), qh[32] at 16 (Q5_K: bit 4 of quant e is bit e / 32 of qh[e % 32]),
// qs[128] at 16 or 48 (element 64 j + l in the low nibble of qs[32 j + l], element
// 64 j + 32 + l in its high nibble, l < 32).
// Value: d * sc[g] * q - dmin * m[g], g = e / 32.
template <u32 BITS>
struct AffineGroups : Quantized<AffineGroups<BITS>> {
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 QS_AT = BITS == 5 ? 48 : 16;
    static constexpr u32 BLOCK_BYTES = QS_AT + 128;
    static constexpr bool AFFINE = true;
    static constexpr int BIAS = 0;

    // Group g's 6-bit scale and offset: for g < 4 bits 0-5 of scales[g] and
    // scales[g + 4]; for g >= 4 the low and high nibble of scales[g + 4] with bits 4-5
    // from bits 6-7 of scales[g - 4] and scales[g].
    static __device__ __forceinline__ void scale_and_offset(const u8* p, u32 g, u32& sc,
                                                            u32& m) {
        if (g < 4) {
            sc = p[g] & 63u;
            m = p[g + 4] & 63u;
        } else {
            sc = (p[g + 4] & 0xfu) | ((p[g - 4] >> 6) << 4);
            m = (p[g + 4] >> 4) | ((p[g] >> 6) << 4);
        }
    }

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        const u32 e = 8 * c, g = e / 32, l = e % 32;
        u32 sc, m;
        scale_and_offset(b + 4, g, sc, m);
        const u64 qs = load_u64<field_align(BLOCK_BYTES, QS_AT)>(b + QS_AT + 32 * (g / 2) + l);
        u64 u = (qs >> (4 * (g % 2))) & NIBBLES8;
        if constexpr (BITS == 5) {
            const u64 qh = load_u64<field_align(BLOCK_BYTES, 16)>(b + 16 + l);
            u |= ((qh >> g) & 0x0101010101010101ull) << 4;
        }
        return {u, load_f16(b, 0) * (float)sc, -(load_f16(b, 2) * (float)m)};
    }
};

typedef AffineGroups<4> Q4_K;
typedef AffineGroups<5> Q5_K;

// Q6_K: ql[128] at 0 (bits 0-3 of quant e: nibble s / 2 of ql[64 h + 32 (s % 2) + l]),
// qh[64] at 128 (bits 4-5: bits 2s .. 2s+2 of qh[32 h + l]), scales[16] (i8) at 192,
// d (f16) at 208. Value: d * scales[e / 16] * (q - 32).
struct Q6_K : Quantized<Q6_K> {
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 BLOCK_BYTES = 210;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 32;

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        const u32 e = 8 * c, h = e / 128, s = (e % 128) / 32, l = e % 32;
        const u64 ql = load_u64<field_align(BLOCK_BYTES, 0)>(b + 64 * h + 32 * (s % 2) + l);
        const u64 qh = load_u64<field_align(BLOCK_BYTES, 128)>(b + 128 + 32 * h + l);
        const u64 u = ((ql >> (4 * (s / 2))) & NIBBLES8) |
                      (((qh >> (2 * s)) & 0x0303030303030303ull) << 4);
        return {u, load_f16(b, 208) * (float)(i8)b[192 + e / 16], 0.0f};
    }
};

// Decodes the chunk of 8 elements starting at element e (a multiple of 8) of a row of
// `len` elements starting at `row`. Elements at or past `len` (only possible for the
// dense formats) decode to 0.
template <typename W>
__device__ __forceinline__ void decode_chunk(const u8* row, u32 e, u32 len, float* v) {
    const u8* block = row + (u64)(e / W::BLOCK_ELEMS) * W::BLOCK_BYTES;
    if constexpr (W::BLOCK_ELEMS == 1) {
        if (e + 8 > len) {
            W::decode_partial(block, len - e, v);
            return;
        }
    }
    W::decode8(block, (e % W::BLOCK_ELEMS) / 8, v);
}

}  // namespace kiln
