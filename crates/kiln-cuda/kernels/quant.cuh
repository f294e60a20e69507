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
//   W::PACKED  whether the backend stores W's rows as planes (below) rather than as
//       GGUF blocks; the packed formats also describe the mat-vec's units (below).
//
// A GGUF block starts at a multiple of BLOCK_BYTES from a 16-byte aligned address
// (rows are whole blocks, buffers and staging tiles are 16-byte aligned), so every
// multi-byte field is read with the widest load its offset's alignment allows.
#pragma once
#include "common.cuh"

namespace kiln {

// The largest power of two dividing x (x > 0).
__host__ __device__ constexpr u32 pow2_factor(u32 x) { return x & (~x + 1u); }

// The alignment guaranteed for byte `offset` of a block of `block_bytes` bytes:
// the largest power of two dividing both, at most 16.
__host__ __device__ constexpr u32 field_align(u32 block_bytes, u32 offset) {
    const u32 b = pow2_factor(block_bytes) < 16u ? pow2_factor(block_bytes) : 16u;
    const u32 o = offset == 0 ? 16u : pow2_factor(offset);
    return b < o ? b : o;
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

// Eight bytes at p (little-endian), read with loads of ALIGN bytes; p must be
// ALIGN-aligned.
template <u32 ALIGN>
__device__ __forceinline__ u64 load_u64(const u8* p) {
    if constexpr (ALIGN >= 8) {
        return *reinterpret_cast<const u64*>(p);
    } else {
        return (u64)load_u32<ALIGN>(p) | ((u64)load_u32<ALIGN>(p + 4) << 32);
    }
}

// Sixteen bytes at p as four little-endian words, read with loads of ALIGN bytes; p
// must be ALIGN-aligned.
template <u32 ALIGN>
__device__ __forceinline__ uint4 load_u128(const u8* p) {
    if constexpr (ALIGN >= 16) {
        return *reinterpret_cast<const uint4*>(p);
    } else {
        return make_uint4(load_u32<ALIGN>(p), load_u32<ALIGN>(p + 4), load_u32<ALIGN>(p + 8),
                          load_u32<ALIGN>(p + 12));
    }
}

// Word i (< 4, known at compile time after unrolling) of v.
__device__ __forceinline__ u32 word_of(const uint4& v, u32 i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The f16 at byte `offset` of `block` (even offsets only) as f32.
__device__ __forceinline__ float load_f16(const u8* block, u32 offset) {
    return f16_bits_to_f32(*reinterpret_cast<const u16*>(block + offset));
}

// Byte i of a little-endian u64.
__device__ __forceinline__ u32 byte_of(u64 v, int i) { return (u32)(v >> (8 * i)) & 0xffu; }

// The planes layout (kiln-cuda's packing module). A packed format W derives from
// PackedLayout<its GGUF type id> (constants.cuh, generated from kiln-cuda's packing and
// matmul modules, so that the layout is written once), which gives W::PLANES,
// W::PLANE_FROM, W::PLANE_LEN and the unit shape below. W splits each block
// into W::PLANES planes: plane p is the GGUF bytes W::PLANE_FROM[p] ..
// + W::PLANE_LEN[p] of the block. A row of nb blocks holds plane 0's entries for
// blocks 0 .. nb, then plane 1's, and so on; so block b's entry of plane p starts at
// row + nb * plane_start<W>(p) + b * PLANE_LEN[p].
struct PlaneBlock {
    const u8* row;  // the row's first byte
    u32 nb;         // blocks in the row
    u32 b;          // this block
};

// The plane holding GGUF byte `off` of a block of W.
template <typename W>
__host__ __device__ constexpr u32 plane_of(u32 off) {
    u32 p = 0;
    while (p + 1 < W::PLANES && !(off >= W::PLANE_FROM[p] && off < W::PLANE_FROM[p] + W::PLANE_LEN[p])) {
        ++p;
    }
    return p;
}

// Bytes per block of the planes before plane p.
template <typename W>
__host__ __device__ constexpr u32 plane_start(u32 p) {
    u32 start = 0;
    for (u32 q = 0; q < p; ++q) {
        start += W::PLANE_LEN[q];
    }
    return start;
}

// The address of GGUF byte OFF of block b.b in the planes layout.
template <typename W, u32 OFF>
__device__ __forceinline__ const u8* at(const PlaneBlock& b) {
    constexpr u32 p = plane_of<W>(OFF);
    return b.row + (u64)b.nb * plane_start<W>(p) + (u64)b.b * W::PLANE_LEN[p] +
           (OFF - W::PLANE_FROM[p]);
}

// The alignment of GGUF byte OFF's address (at) when every plane starts at a multiple
// of A bytes (16 when planes_aligned, else 2: every plane length is even).
template <typename W, u32 A, u32 OFF>
__host__ __device__ constexpr u32 align_at() {
    constexpr u32 p = plane_of<W>(OFF);
    constexpr u32 f = field_align(W::PLANE_LEN[p], OFF - W::PLANE_FROM[p]);
    return f < A ? f : A;
}

// Whether every plane of the row of nb blocks starting at `row` starts at a multiple
// of 16 bytes.
template <typename W>
__device__ __forceinline__ bool planes_aligned(const u8* row, u32 nb) {
    bool aligned = ((u64)row & 15u) == 0;
#pragma unroll
    for (u32 p = 1; p < W::PLANES; ++p) {
        aligned = aligned && (nb * plane_start<W>(p)) % 16 == 0;
    }
    return aligned;
}

// F32, F16, BF16 (T is the element tag of common.cuh): one element per "block".
template <typename T>
struct Dense {
    static constexpr bool HAS_QUANTS8 = false;
    static constexpr bool PACKED = false;
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
constexpr u32 NIBBLES4 = 0x0f0f0f0fu;

// The formats with a `quants8(block, c)` (chunk c of the block as Quants8) derive
// from this, which gives them decode8 and marks them for kernels that use quants8.
// A GGUF-layout format's quants8 takes the block's address; a packed format's takes
// the block's PlaneBlock and, as template argument A, its planes' alignment.
template <typename W>
struct Quantized {
    static constexpr bool HAS_QUANTS8 = true;

    template <u32 A = 16, typename Block>
    static __device__ __forceinline__ void decode8(const Block& b, u32 c, float* v) {
        Quants8 q;
        if constexpr (W::PACKED) {
            q = W::template quants8<A>(b, c);
        } else {
            q = W::quants8(b, c);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float x = (float)((int)byte_of(q.u, i) - W::BIAS);
            v[i] = W::AFFINE ? q.scale * x + q.offset : q.scale * x;
        }
    }
};

// The mat-vec of packed formats (matvec.cu's matvec_packed) reads a row in units (the
// first three from PackedLayout):
//   W::UNIT_ELEMS   elements per unit (a whole number of units per block, or of blocks
//                   per unit), read by one thread with the widest loads;
//   W::GROUP_ELEMS  elements per scale group (a unit holds whole groups);
//   W::UNITS_IN_FLIGHT  units a thread loads before it uses the first;
//   W::SMALL_QUANTS whether every quant is below 128;
//   W::Unit, W::load_unit<A>(row, nb, u)  unit u of the row of nb blocks at `row`;
//   W::run(t, j)    run j (< UNIT_ELEMS / 4) of unit t: the 4 quants q (0 .. 255) of
//                   elements W::run_elem(j) .. + 3 of the unit, one per byte; the runs of
//                   group g are j = g * GROUP_ELEMS / 4 .. (g + 1) * GROUP_ELEMS / 4;
//   W::group(t, g, scale, zero)  group g's element values scale * q + zero.

// The unit of the packed formats with one scale per block and no offset (Q8_0, Q1_0,
// Q2_0, TQ2_0): LOADS 16-byte loads of quants and the block's scale d.
template <u32 LOADS>
struct ScaledQuants {
    uint4 qs[LOADS];
    float scale;
};

// W::group for those formats: every scale group of a unit has scale d and zero
// -BIAS d (values d * (q - BIAS)).
template <typename W>
struct OneScale {
    template <u32 LOADS>
    static __device__ __forceinline__ void group(const ScaledQuants<LOADS>& t, u32, float& scale,
                                                 float& zero) {
        scale = t.scale;
        zero = -(float)W::BIAS * t.scale;
    }
};

// Q4_0, Q4_1, Q5_0, Q5_1: 32 quants of BITS bits. d (f16) at 0, m (f16) at 2 when
// AFFINE, qh (u32, bit j = bit 4 of quant j) when BITS == 5, then qs[16]: byte j holds
// quant j in its low nibble and quant j + 16 in its high nibble.
// Value: AFFINE ? d * q + m : d * (q - 2^(BITS-1)).
// Planes: qs | qh (BITS == 5) | d and m.
template <u32 BITS, bool IS_AFFINE>
struct PackedNibbles : Quantized<PackedNibbles<BITS, IS_AFFINE>>,
                       PackedLayout<BITS == 4 ? (IS_AFFINE ? 3u : 2u) : (IS_AFFINE ? 7u : 6u)> {
    typedef PackedNibbles<BITS, IS_AFFINE> Self;
    static constexpr bool PACKED = true;
    static constexpr u32 BLOCK_ELEMS = 32;
    static constexpr u32 QH_AT = IS_AFFINE ? 4 : 2;
    static constexpr u32 QS_AT = QH_AT + (BITS == 5 ? 4 : 0);
    static constexpr u32 BLOCK_BYTES = QS_AT + 16;
    static constexpr bool AFFINE = IS_AFFINE;
    static constexpr int BIAS = AFFINE ? 0 : 1 << (BITS - 1);

    template <u32 A>
    static __device__ __forceinline__ Quants8 quants8(const PlaneBlock& b, u32 c) {
        // Elements 8c .. 8c+7 sit in bytes 8 (c % 2) .. +8 of qs, in the low nibble for
        // c < 2 and the high nibble otherwise; their fifth bits are bits 8c .. 8c+7 of qh.
        const u64 qs = load_u64<align_at<Self, A, QS_AT>()>(at<Self, QS_AT>(b) + 8 * (c & 1));
        u64 u = (qs >> (4 * (c >> 1))) & NIBBLES8;
        if constexpr (BITS == 5) {
            const u32 qh = load_u32<align_at<Self, A, QH_AT>()>(at<Self, QH_AT>(b));
            u |= spread_bits8((qh >> (8 * c)) & 0xffu) << 4;
        }
        return {u, load_f16(at<Self, 0>(b), 0), AFFINE ? load_f16(at<Self, 2>(b), 0) : 0.0f};
    }

    // A unit is a block; run j holds the low (j < 4) or high nibbles of qs bytes
    // 4 (j % 4) .. + 3.
    static constexpr bool SMALL_QUANTS = true;
    struct Unit {
        uint4 qs;
        u32 qh;
        float scale, zero;
    };

    template <u32 A>
    static __device__ __forceinline__ Unit load_unit(const u8* row, u32 nb, u32 u) {
        const PlaneBlock b{row, nb, u};
        Unit t;
        t.qs = load_u128<align_at<Self, A, QS_AT>()>(at<Self, QS_AT>(b));
        t.qh = BITS == 5 ? load_u32<align_at<Self, A, QH_AT>()>(at<Self, QH_AT>(b)) : 0u;
        t.scale = load_f16(at<Self, 0>(b), 0);
        t.zero = AFFINE ? load_f16(at<Self, 2>(b), 0) : -(float)BIAS * t.scale;
        return t;
    }

    static __device__ __forceinline__ constexpr u32 run_elem(u32 j) { return 16 * (j / 4) + 4 * (j % 4); }

    static __device__ __forceinline__ u32 run(const Unit& t, u32 j) {
        u32 q = (word_of(t.qs, j % 4) >> (4 * (j / 4))) & NIBBLES4;
        if constexpr (BITS == 5) {
            q |= spread_bits4(t.qh >> run_elem(j)) << 4;
        }
        return q;
    }

    static __device__ __forceinline__ void group(const Unit& t, u32, float& scale, float& zero) {
        scale = t.scale;
        zero = t.zero;
    }
};

typedef PackedNibbles<4, false> Q4_0;
typedef PackedNibbles<4, true> Q4_1;
typedef PackedNibbles<5, false> Q5_0;
typedef PackedNibbles<5, true> Q5_1;

// Q8_0: d (f16) at 0, qs[32] (i8) at 2. Value: d * qs[j]. Planes: qs | d.
struct Q8_0 : Quantized<Q8_0>, PackedLayout<8u>, OneScale<Q8_0> {
    static constexpr bool PACKED = true;
    static constexpr u32 BLOCK_ELEMS = 32;
    static constexpr u32 BLOCK_BYTES = 34;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 128;

    template <u32 A>
    static __device__ __forceinline__ Quants8 quants8(const PlaneBlock& b, u32 c) {
        // Flipping the sign bit maps the i8 q to the byte q + 128.
        const u64 qs = load_u64<align_at<Q8_0, A, 2>()>(at<Q8_0, 2>(b) + 8 * c);
        return {qs ^ 0x8080808080808080ull, load_f16(at<Q8_0, 0>(b), 0), 0.0f};
    }

    // A unit is a block; run j holds quants 4j .. 4j + 3 as q + 128.
    static constexpr bool SMALL_QUANTS = false;
    typedef ScaledQuants<2> Unit;

    template <u32 A>
    static __device__ __forceinline__ Unit load_unit(const u8* row, u32 nb, u32 u) {
        const PlaneBlock b{row, nb, u};
        constexpr u32 QA = align_at<Q8_0, A, 2>();
        return {{load_u128<QA>(at<Q8_0, 2>(b)), load_u128<QA>(at<Q8_0, 2>(b) + 16)},
                load_f16(at<Q8_0, 0>(b), 0)};
    }

    static __device__ __forceinline__ constexpr u32 run_elem(u32 j) { return 4 * j; }

    static __device__ __forceinline__ u32 run(const Unit& t, u32 j) {
        return word_of(t.qs[j / 4], j % 4) ^ 0x80808080u;
    }
};

// IQ4_NL: d (f16) at 0, qs[16] at 2 as Q4_0's nibbles, each an index into 16 fixed
// levels (kiln_core::quant::IQ4_NL_LEVELS). Value: d * level[index].
struct IQ4_NL {
    static constexpr bool HAS_QUANTS8 = false;
    static constexpr bool PACKED = false;
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
    static constexpr bool PACKED = false;
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
    static constexpr bool PACKED = false;
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

// The bytes of a uint4 as an array: byte i of the 16, for i known after unrolling or
// not (a select, never a local-memory array).
struct Bytes16 {
    uint4 w;
    __device__ __forceinline__ u32 operator[](u32 i) const {
        const u32 v = i < 4 ? w.x : i < 8 ? w.y : i < 12 ? w.z : w.w;
        return (v >> (8 * (i % 4))) & 0xffu;
    }
};

// Q4_K and Q5_K: d (f16) at 0, dmin (f16) at 2, scales[12] at 4 (8 6-bit scales and
// offsets, below), qh[32] at 16 (Q5_K: bit 4 of quant e is bit e / 32 of qh[e % 32]),
// qs[128] at 16 or 48 (element 64 j + l in the low nibble of qs[32 j + l], element
// 64 j + 32 + l in its high nibble, l < 32).
// Value: d * sc[g] * q - dmin * m[g], g = e / 32.
// Planes: qh (Q5_K) and qs | d, dmin, scales.
template <u32 BITS>
struct AffineGroups : Quantized<AffineGroups<BITS>>, PackedLayout<BITS == 5 ? 13u : 12u> {
    typedef AffineGroups<BITS> Self;
    static constexpr bool PACKED = true;
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 QS_AT = BITS == 5 ? 48 : 16;
    static constexpr u32 BLOCK_BYTES = QS_AT + 128;
    static constexpr bool AFFINE = true;
    static constexpr int BIAS = 0;

    // Group g's 6-bit scale and offset from the scales bytes p[0 .. 12): for g < 4
    // bits 0-5 of p[g] and p[g + 4]; for g >= 4 the low and high nibble of p[g + 4]
    // with bits 4-5 from bits 6-7 of p[g - 4] and p[g].
    template <typename Bytes>
    static __device__ __forceinline__ void scale_and_offset(const Bytes& p, u32 g, u32& sc,
                                                            u32& m) {
        if (g < 4) {
            sc = p[g] & 63u;
            m = p[g + 4] & 63u;
        } else {
            sc = (p[g + 4] & 0xfu) | ((p[g - 4] >> 6) << 4);
            m = (p[g + 4] >> 4) | ((p[g] >> 6) << 4);
        }
    }

    template <u32 A>
    static __device__ __forceinline__ Quants8 quants8(const PlaneBlock& b, u32 c) {
        const u32 e = 8 * c, g = e / 32, l = e % 32;
        u32 sc, m;
        scale_and_offset(at<Self, 4>(b), g, sc, m);
        const u64 qs =
            load_u64<align_at<Self, A, QS_AT>()>(at<Self, QS_AT>(b) + 32 * (g / 2) + l);
        u64 u = (qs >> (4 * (g % 2))) & NIBBLES8;
        if constexpr (BITS == 5) {
            const u64 qh = load_u64<align_at<Self, A, 16>()>(at<Self, 16>(b) + l);
            u |= ((qh >> g) & 0x0101010101010101ull) << 4;
        }
        return {u, load_f16(at<Self, 0>(b), 0) * (float)sc,
                -(load_f16(at<Self, 2>(b), 0) * (float)m)};
    }

    // Unit u is elements 64 j .. 64 j + 63 (j = u % 4) of block u / 4: groups 2j and
    // 2j + 1, the low and high nibbles of qs bytes 32 j .. 32 j + 31. Run r holds the
    // nibbles (r / 8) of qs bytes 32 j + 4 (r % 8) .. + 3.
    static constexpr bool SMALL_QUANTS = true;
    struct Unit {
        uint4 qs[2];
        uint4 qh[BITS == 5 ? 2 : 1];
        u32 j;
        float scale[2], zero[2];
    };

    template <u32 A>
    static __device__ __forceinline__ Unit load_unit(const u8* row, u32 nb, u32 u) {
        const PlaneBlock b{row, nb, u / 4};
        Unit t;
        t.j = u % 4;
        constexpr u32 QA = align_at<Self, A, QS_AT>();
        t.qs[0] = load_u128<QA>(at<Self, QS_AT>(b) + 32 * t.j);
        t.qs[1] = load_u128<QA>(at<Self, QS_AT>(b) + 32 * t.j + 16);
        if constexpr (BITS == 5) {
            constexpr u32 HA = align_at<Self, A, 16>();
            t.qh[0] = load_u128<HA>(at<Self, 16>(b));
            t.qh[1] = load_u128<HA>(at<Self, 16>(b) + 16);
        }
        const Bytes16 meta{load_u128<align_at<Self, A, 0>()>(at<Self, 0>(b))};
        const float d = f16_bits_to_f32((u16)(meta.w.x & 0xffffu));
        const float dmin = f16_bits_to_f32((u16)(meta.w.x >> 16));
        const Bytes16 scales{make_uint4(meta.w.y, meta.w.z, meta.w.w, 0u)};
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            u32 sc, m;
            scale_and_offset(scales, 2 * t.j + h, sc, m);
            t.scale[h] = d * (float)sc;
            t.zero[h] = -(dmin * (float)m);
        }
        return t;
    }

    static __device__ __forceinline__ constexpr u32 run_elem(u32 r) { return 32 * (r / 8) + 4 * (r % 8); }

    static __device__ __forceinline__ u32 run(const Unit& t, u32 r) {
        const u32 w = r % 8, h = r / 8;
        u32 q = (word_of(t.qs[w / 4], w % 4) >> (4 * h)) & NIBBLES4;
        if constexpr (BITS == 5) {
            q |= ((word_of(t.qh[w / 4], w % 4) >> (2 * t.j + h)) & 0x01010101u) << 4;
        }
        return q;
    }

    static __device__ __forceinline__ void group(const Unit& t, u32 g, float& scale,
                                                 float& zero) {
        scale = t.scale[g];
        zero = t.zero[g];
    }
};

typedef AffineGroups<4> Q4_K;
typedef AffineGroups<5> Q5_K;

// Q6_K: ql[128] at 0 (bits 0-3 of quant e: nibble s / 2 of ql[64 h + 32 (s % 2) + l]),
// qh[64] at 128 (bits 4-5: bits 2s .. 2s+2 of qh[32 h + l]), scales[16] (i8) at 192,
// d (f16) at 208. Value: d * scales[e / 16] * (q - 32).
// Element e = 128 h + 32 s + l (h < 2, s < 4, l < 32). Planes: ql and qh | scales | d.
struct Q6_K : Quantized<Q6_K>, PackedLayout<14u> {
    static constexpr bool PACKED = true;
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 BLOCK_BYTES = 210;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 32;

    template <u32 A>
    static __device__ __forceinline__ Quants8 quants8(const PlaneBlock& b, u32 c) {
        const u32 e = 8 * c, h = e / 128, s = (e % 128) / 32, l = e % 32;
        const u64 ql =
            load_u64<align_at<Q6_K, A, 0>()>(at<Q6_K, 0>(b) + 64 * h + 32 * (s % 2) + l);
        const u64 qh = load_u64<align_at<Q6_K, A, 128>()>(at<Q6_K, 128>(b) + 32 * h + l);
        const u64 u = ((ql >> (4 * (s / 2))) & NIBBLES8) |
                      (((qh >> (2 * s)) & 0x0303030303030303ull) << 4);
        return {u, load_f16(at<Q6_K, 208>(b), 0) * (float)(i8)at<Q6_K, 192>(b)[e / 16], 0.0f};
    }

    // Unit u is half h = u % 2 of block u / 2 (128 elements, 8 groups of 16): ql bytes
    // 64 h .. + 63 and qh bytes 32 h .. + 31. Run r = 8 s + w holds elements
    // 32 s + 4 w .. + 3: nibble s / 2 of ql bytes 64 h + 32 (s % 2) + 4 w .. and bits
    // 2s, 2s + 1 of qh bytes 32 h + 4 w ..
    static constexpr bool SMALL_QUANTS = true;
    struct Unit {
        uint4 ql[4];
        uint4 qh[2];
        u64 scales;  // the half's 8 i8 scales
        float d;
    };

    template <u32 A>
    static __device__ __forceinline__ Unit load_unit(const u8* row, u32 nb, u32 u) {
        const PlaneBlock b{row, nb, u / 2};
        const u32 h = u % 2;
        Unit t;
#pragma unroll
        for (u32 i = 0; i < 4; ++i) {
            t.ql[i] = load_u128<align_at<Q6_K, A, 0>()>(at<Q6_K, 0>(b) + 64 * h + 16 * i);
        }
#pragma unroll
        for (u32 i = 0; i < 2; ++i) {
            t.qh[i] = load_u128<align_at<Q6_K, A, 128>()>(at<Q6_K, 128>(b) + 32 * h + 16 * i);
        }
        t.scales = load_u64<align_at<Q6_K, A, 192>()>(at<Q6_K, 192>(b) + 8 * h);
        t.d = load_f16(at<Q6_K, 208>(b), 0);
        return t;
    }

    static __device__ __forceinline__ constexpr u32 run_elem(u32 r) { return 32 * (r / 8) + 4 * (r % 8); }

    static __device__ __forceinline__ u32 run(const Unit& t, u32 r) {
        const u32 s = r / 8, w = r % 8;
        const u32 ql = word_of(t.ql[2 * (s % 2) + w / 4], w % 4);
        const u32 qh = word_of(t.qh[w / 4], w % 4);
        return ((ql >> (4 * (s / 2))) & NIBBLES4) | (((qh >> (2 * s)) & 0x03030303u) << 4);
    }

    static __device__ __forceinline__ void group(const Unit& t, u32 g, float& scale,
                                                 float& zero) {
        scale = t.d * (float)(i8)byte_of(t.scales, (int)g);
        zero = -32.0f * scale;
    }
};

// The 1- and 2-bit and ternary formats store quants q with value d * (q - 1): the
// quants8 of each is q per byte with BIAS 1, so the kernels' integer path multiplies
// them without decoding to floats. Q1_0, Q2_0 and TQ2_0 are packed: one f16 scale d
// per block, so every scale group of 32 elements of a unit has scale d and zero -d.
// Their quants are at most 3, so the mat-vec converts them as 8-bit quants
// (SMALL_QUANTS false): (1 + q / 128) / 2 would cancel most of the f32's bits.

// Q1_0 and Q2_0 keep their quants plane bit-sliced (kiln-cuda's packing::sliced_bits):
// in each 16-byte piece, run j (elements 4j .. 4j + 3, one per byte) is slot
// s = j % P (P = 8 / BITS quants per byte) of word j / P: bits BITS * s .. of its 4
// bytes. The run at slot s of `word`, one quant per byte:
template <u32 BITS>
__device__ __forceinline__ u32 sliced_run(u32 word, u32 s) {
    return (word >> (BITS * s)) & (BITS == 1 ? 0x01010101u : 0x03030303u);
}

// Q1_0 (BITS 1) and Q2_0 (BITS 2): d (f16) at 0, qs[16] at 2: bits BITS (j % P) ..
// of qs[j / P] hold element j's code (P = 8 / BITS codes per byte). Q1_0's code is a
// sign bit b, value +d where set and -d where clear, i.e. d * (2b - 1): quants 2b.
// Q2_0's code q has value d * (q - 1): quants q. BIAS 1 for both.
// Planes: qs (bit-sliced) | d.
template <u32 BITS>
struct SlicedBits : Quantized<SlicedBits<BITS>>,
                    PackedLayout<BITS == 1 ? 41u : 42u>,
                    OneScale<SlicedBits<BITS>> {
    typedef SlicedBits<BITS> Self;
    static constexpr u32 P = 8 / BITS;
    // Q1_0's quants are its bits doubled.
    static constexpr u32 DOUBLE = BITS == 1 ? 1 : 0;
    static constexpr bool PACKED = true;
    static constexpr u32 BLOCK_ELEMS = 16 * P;
    static constexpr u32 BLOCK_BYTES = 18;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 1;

    template <u32 A>
    static __device__ __forceinline__ Quants8 quants8(const PlaneBlock& b, u32 c) {
        // Runs 2c and 2c + 1: slots 2c % P and + 1 of word 2c / P.
        const u32 w = load_u32<align_at<Self, A, 2>()>(at<Self, 2>(b) + 4 * (2 * c / P));
        const u32 s = 2 * c % P;
        const u64 u = (u64)sliced_run<BITS>(w, s) | ((u64)sliced_run<BITS>(w, s + 1) << 32);
        return {u << DOUBLE, load_f16(at<Self, 0>(b), 0), 0.0f};
    }

    // A unit is a block; run j is slot j % P of word j / P.
    static constexpr bool SMALL_QUANTS = false;
    typedef ScaledQuants<1> Unit;

    template <u32 A>
    static __device__ __forceinline__ Unit load_unit(const u8* row, u32 nb, u32 u) {
        const PlaneBlock b{row, nb, u};
        return {{load_u128<align_at<Self, A, 2>()>(at<Self, 2>(b))}, load_f16(at<Self, 0>(b), 0)};
    }

    static __device__ __forceinline__ constexpr u32 run_elem(u32 j) { return 4 * j; }

    static __device__ __forceinline__ u32 run(const Unit& t, u32 j) {
        return sliced_run<BITS>(word_of(t.qs[0], j / P), j % P) << DOUBLE;
    }
};

typedef SlicedBits<1> Q1_0;
typedef SlicedBits<2> Q2_0;

// TQ2_0: qs[64] at 0, d (f16) at 64. Element e = 128 h + 32 l + m (h < 2, l < 4,
// m < 32) is the code q in bits 2l .. 2l + 1 of qs[32 h + m]. Value: d * (q - 1).
// Planes: qs | d.
struct TQ2_0 : Quantized<TQ2_0>, PackedLayout<35u>, OneScale<TQ2_0> {
    static constexpr bool PACKED = true;
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 BLOCK_BYTES = 66;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 1;

    template <u32 A>
    static __device__ __forceinline__ Quants8 quants8(const PlaneBlock& b, u32 c) {
        const u32 e = 8 * c, h = e / 128, l = (e % 128) / 32, m = e % 32;
        const u64 qs = load_u64<align_at<TQ2_0, A, 0>()>(at<TQ2_0, 0>(b) + 32 * h + m);
        return {(qs >> (2 * l)) & 0x0303030303030303ull, load_f16(at<TQ2_0, 64>(b), 0), 0.0f};
    }

    // Unit u is half h = u % 2 of block u / 2 (128 elements): qs bytes 32 h .. + 31.
    // Run j = 8 l + w holds elements 32 l + 4 w .. + 3 of the half: crumb l of qs
    // bytes 32 h + 4 w .. + 3.
    static constexpr bool SMALL_QUANTS = false;
    typedef ScaledQuants<2> Unit;

    template <u32 A>
    static __device__ __forceinline__ Unit load_unit(const u8* row, u32 nb, u32 u) {
        const PlaneBlock b{row, nb, u / 2};
        constexpr u32 QA = align_at<TQ2_0, A, 0>();
        const u8* qs = at<TQ2_0, 0>(b) + 32 * (u % 2);
        return {{load_u128<QA>(qs), load_u128<QA>(qs + 16)}, load_f16(at<TQ2_0, 64>(b), 0)};
    }

    static __device__ __forceinline__ constexpr u32 run_elem(u32 j) { return 4 * j; }

    static __device__ __forceinline__ u32 run(const Unit& t, u32 j) {
        const u32 w = j % 8;
        return (word_of(t.qs[w / 4], w % 4) >> (2 * (j / 8))) & 0x03030303u;
    }
};

// TQ1_0: qs[48] at 0, qh[4] at 48, d (f16) at 52. Trit n (0 .. 4, most significant
// first) of a byte y is ((y * 3^n mod 256) * 3) >> 8. Trit n of qs[m] is element
// 32 n + m for m < 32, 160 + 16 n + (m - 32) for m >= 32; trit n (< 4) of qh[j] is
// element 240 + 4 n + j. Value: d * (t - 1).
struct TQ1_0 : Quantized<TQ1_0> {
    static constexpr bool PACKED = false;
    static constexpr u32 BLOCK_ELEMS = 256;
    static constexpr u32 BLOCK_BYTES = 54;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 1;

    static __device__ __forceinline__ u32 trit(u32 y, u32 n) {
        const u32 p = n == 0 ? 1u : n == 1 ? 3u : n == 2 ? 9u : n == 3 ? 27u : 81u;
        return (((y * p) & 0xffu) * 3u) >> 8;
    }

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        u64 u = 0;
        if (c < 30) {
            // Chunks 0 .. 19: trit c / 4 of qs[8 (c % 4) ..]; 20 .. 29: trit (c - 20) / 2
            // of qs[32 + 8 (c % 2) ..].
            const u32 n = c < 20 ? c / 4 : (c - 20) / 2;
            const u32 from = c < 20 ? 8 * (c % 4) : 32 + 8 * (c % 2);
#pragma unroll
            for (u32 i = 0; i < 8; ++i) {
                u |= (u64)trit(b[from + i], n) << (8 * i);
            }
        } else {
            // Chunks 30, 31: trits 2 (c - 30) and 2 (c - 30) + 1 of qh[0 .. 4].
#pragma unroll
            for (u32 i = 0; i < 8; ++i) {
                u |= (u64)trit(b[48 + i % 4], 2 * (c - 30) + i / 4) << (8 * i);
            }
        }
        return {u, load_f16(b, 52), 0.0f};
    }
};

// MXFP4: e (E8M0) at 0, qs[16] at 1 as Q4_0's nibbles, each an E2M1 code c. Value:
// kiln_core::quant::MXFP4_LEVELS[c] * 2^(e - 128) (the levels are twice E2M1's
// values): quants MXFP4_LEVELS[c] + 12, BIAS 12, scale 2^(e - 128).
struct MXFP4 : Quantized<MXFP4> {
    static constexpr bool PACKED = false;
    static constexpr u32 BLOCK_ELEMS = 32;
    static constexpr u32 BLOCK_BYTES = 17;
    static constexpr bool AFFINE = false;
    static constexpr int BIAS = 12;

    // MXFP4_LEVELS[c] + 12 without a memory lookup: four per word.
    static __device__ __forceinline__ u32 quant(u32 c) {
        // 12 13 14 15 | 16 18 20 24 | 12 11 10 9 | 8 6 4 0
        const u32 words[4] = {0x0f0e0d0cu, 0x18141210u, 0x090a0b0cu, 0x00040608u};
        u32 w = words[0];
        w = c >= 4 ? words[1] : w;
        w = c >= 8 ? words[2] : w;
        w = c >= 12 ? words[3] : w;
        return (w >> (8 * (c & 3))) & 0xffu;
    }

    // 2^(e - 128), as kiln_core::quant::e8m0_half: f32 subnormals for e < 2.
    static __device__ __forceinline__ float scale(u32 e) {
        return __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
    }

    static __device__ __forceinline__ Quants8 quants8(const u8* b, u32 c) {
        const u64 qs = load_u64<1>(b + 1 + 8 * (c & 1));
        const u32 shift = 4 * (c >> 1);
        u64 u = 0;
#pragma unroll
        for (u32 i = 0; i < 8; ++i) {
            u |= (u64)quant((byte_of(qs, (int)i) >> shift) & 0xfu) << (8 * i);
        }
        return {u, scale(b[0]), 0.0f};
    }
};

// Decodes the chunk of 8 elements starting at element e (a multiple of 8) of a row of
// `len` elements starting at `row` (for packed formats, a row in the planes layout).
// Elements at or past `len` (only possible for the dense formats) decode to 0.
template <typename W>
__device__ __forceinline__ void decode_chunk(const u8* row, u32 e, u32 len, float* v) {
    if constexpr (W::PACKED) {
        const PlaneBlock b{row, len / W::BLOCK_ELEMS, e / W::BLOCK_ELEMS};
        const u32 c = (e % W::BLOCK_ELEMS) / 8;
        if (planes_aligned<W>(row, b.nb)) {
            W::template decode8<16>(b, c, v);
        } else {
            W::template decode8<2>(b, c, v);
        }
    } else {
        const u8* block = row + (u64)(e / W::BLOCK_ELEMS) * W::BLOCK_BYTES;
        if constexpr (W::BLOCK_ELEMS == 1) {
            if (e + 8 > len) {
                W::decode_partial(block, len - e, v);
                return;
            }
        }
        W::decode8(block, (e % W::BLOCK_ELEMS) / 8, v);
    }
}

}  // namespace kiln
