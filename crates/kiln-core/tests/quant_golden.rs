//! Golden blocks for every block format, built by hand.
//!
//! Each test writes one or two blocks field by field from ggml's block layout (the
//! struct in ggml-common.h), with chosen scales and quant values, and computes the
//! expected floats from the format's written definition, e.g. `d * (q - 8)` for
//! Q4_0. The quants run through every value the format allows and every sub-block
//! gets a different scale, so a misplaced bit or nibble changes some element.
//! Scales are small dyadic numbers, exact in f16, so every expected value is exact
//! and the comparison is bitwise.

use half::f16;
use kiln_core::{quant, DType};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

fn f16_le(v: f32) -> [u8; 2] {
    let h = f16::from_f32(v);
    assert_eq!(h.to_f32(), v, "test scales must be exact in f16");
    h.to_le_bytes()
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    assert_eq!(
        bytes.len() % dtype.block_bytes(),
        0,
        "test built a partial block"
    );
    let n = bytes.len() / dtype.block_bytes() * dtype.block_size();
    let mut out = vec![f32::NAN; n];
    quant::dequantize(dtype, bytes, &mut out).unwrap();
    out
}

fn assert_same(dtype: DType, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(
            g.to_bits(),
            e.to_bits(),
            "{dtype} element {i}: got {g}, expected {e}"
        );
    }
}

/// A quant pattern over `n` elements (`n` a multiple of `levels`) that takes every
/// value in `0..levels` equally often, in a fixed pseudo-random order, so that
/// elements a wrong layout would swap hold different values.
fn pattern(n: usize, levels: u32) -> Vec<u32> {
    let mut values: Vec<u32> = (0..n as u32).map(|i| i % levels).collect();
    values.shuffle(&mut StdRng::seed_from_u64(
        n as u64 * 1000 + u64::from(levels),
    ));
    values
}

/// Q4_0: `{ f16 d; u8 qs[16] }`, `qs[j]` = `q[j]` low nibble, `q[j + 16]` high
/// nibble; `x = d * (q - 8)`.
#[test]
fn q4_0_golden() {
    let d = 0.5f32;
    let q = pattern(32, 16);
    let mut block = f16_le(d).to_vec();
    for j in 0..16 {
        block.push((q[j] | (q[j + 16] << 4)) as u8);
    }
    let expected: Vec<f32> = q.iter().map(|&q| d * (q as f32 - 8.0)).collect();
    assert_same(DType::Q4_0, &decode(DType::Q4_0, &block), &expected);
}

/// Q4_1: `{ f16 d; f16 m; u8 qs[16] }`; `x = d * q + m`.
#[test]
fn q4_1_golden() {
    let (d, m) = (0.25f32, -1.5f32);
    let q = pattern(32, 16);
    let mut block = [f16_le(d), f16_le(m)].concat();
    for j in 0..16 {
        block.push((q[j] | (q[j + 16] << 4)) as u8);
    }
    let expected: Vec<f32> = q.iter().map(|&q| d * q as f32 + m).collect();
    assert_same(DType::Q4_1, &decode(DType::Q4_1, &block), &expected);
}

/// The 5-bit formats' `qh`: bit `j` of the little-endian u32 is bit 4 of `q[j]`.
fn fifth_bits(q: &[u32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &q) in q.iter().enumerate() {
        qh |= (q >> 4) << j;
    }
    qh.to_le_bytes()
}

/// Q5_0: `{ f16 d; u8 qh[4]; u8 qs[16] }`; `x = d * (q - 16)`.
#[test]
fn q5_0_golden() {
    let d = 0.125f32;
    let q = pattern(32, 32);
    let mut block = [f16_le(d).as_slice(), &fifth_bits(&q)].concat();
    for j in 0..16 {
        block.push(((q[j] & 15) | ((q[j + 16] & 15) << 4)) as u8);
    }
    let expected: Vec<f32> = q.iter().map(|&q| d * (q as f32 - 16.0)).collect();
    assert_same(DType::Q5_0, &decode(DType::Q5_0, &block), &expected);
}

/// Q5_1: `{ f16 d; f16 m; u8 qh[4]; u8 qs[16] }`; `x = d * q + m`.
#[test]
fn q5_1_golden() {
    let (d, m) = (0.0625f32, 2.0f32);
    let q = pattern(32, 32);
    let mut block = [f16_le(d).as_slice(), &f16_le(m), &fifth_bits(&q)].concat();
    for j in 0..16 {
        block.push(((q[j] & 15) | ((q[j + 16] & 15) << 4)) as u8);
    }
    let expected: Vec<f32> = q.iter().map(|&q| d * q as f32 + m).collect();
    assert_same(DType::Q5_1, &decode(DType::Q5_1, &block), &expected);
}

/// Signed bytes covering -128..=127 over 8 blocks of 32.
fn all_i8() -> Vec<i8> {
    (0..=255u8).map(|b| b as i8).collect()
}

/// Q8_0: `{ f16 d; i8 qs[32] }`; `x = d * q`. Eight blocks with different scales.
#[test]
fn q8_0_golden() {
    let q = all_i8();
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (b, chunk) in q.chunks(32).enumerate() {
        let d = 0.5f32 / (1 << b) as f32;
        bytes.extend(f16_le(d));
        bytes.extend(chunk.iter().map(|&q| q as u8));
        expected.extend(chunk.iter().map(|&q| d * f32::from(q)));
    }
    assert_same(DType::Q8_0, &decode(DType::Q8_0, &bytes), &expected);
}

/// Q8_1: `{ f16 d; f16 s; i8 qs[32] }`; `x = d * q` (`s` does not enter).
#[test]
fn q8_1_golden() {
    let q = all_i8();
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (b, chunk) in q.chunks(32).enumerate() {
        let d = 0.25f32 * (b + 1) as f32;
        bytes.extend(f16_le(d));
        bytes.extend(f16_le(-3.0));
        bytes.extend(chunk.iter().map(|&q| q as u8));
        expected.extend(chunk.iter().map(|&q| d * f32::from(q)));
    }
    assert_same(DType::Q8_1, &decode(DType::Q8_1, &bytes), &expected);
}

/// The k-quants' 2-bit plane: element `128 h + 32 s + l` in bits `2 s .. 2 s + 2`
/// of byte `32 h + l` (64 bytes for 256 elements).
fn two_bit_plane(q: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    for (e, &q) in q.iter().enumerate() {
        let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
        out[32 * h + l] |= ((q & 3) << (2 * s)) as u8;
    }
    out
}

/// Q2_K: `{ u8 scales[16]; u8 qs[64]; f16 d; f16 dmin }`; group `g = e / 16` has
/// scale `scales[g] & 15` and offset `scales[g] >> 4`;
/// `x = d * sc * q - dmin * m`.
#[test]
fn q2_k_golden() {
    let (d, dmin) = (0.5f32, 0.125f32);
    let sc: Vec<u32> = (0..16).map(|g| 1 + (g * 7) % 15).collect();
    let m: Vec<u32> = (0..16).map(|g| 15 - g).collect();
    let q = pattern(256, 4);
    let mut block: Vec<u8> = (0..16).map(|g| (sc[g] | (m[g] << 4)) as u8).collect();
    block.extend(two_bit_plane(&q));
    block.extend(f16_le(d));
    block.extend(f16_le(dmin));
    let expected: Vec<f32> = (0..256)
        .map(|e| d * sc[e / 16] as f32 * q[e] as f32 - dmin * m[e / 16] as f32)
        .collect();
    assert_same(DType::Q2K, &decode(DType::Q2K, &block), &expected);
}

/// Q3_K: `{ u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d }`. Quant `q` (3 bits):
/// bits 0-1 in the 2-bit plane, bit 2 in bit `e / 32` of `hmask[e % 32]`. Group
/// `g`'s 6-bit scale: low 4 bits in `scales[g]` (g < 8) or the high nibble of
/// `scales[g - 8]`, high 2 bits in bits `2 (g / 4)` of `scales[8 + g % 4]`.
/// `x = d * (sc - 32) * (q - 4)`.
#[test]
fn q3_k_golden() {
    let d = 0.25f32;
    let sc: Vec<u32> = (0..16).map(|g| (g * 37 + 5) % 64).collect();
    let q = pattern(256, 8);
    let mut hmask = [0u8; 32];
    for (e, &q) in q.iter().enumerate() {
        hmask[e % 32] |= ((q >> 2) << (e / 32)) as u8;
    }
    let mut scales = [0u8; 12];
    for (g, &s) in sc.iter().enumerate() {
        if g < 8 {
            scales[g] |= (s & 15) as u8;
        } else {
            scales[g - 8] |= ((s & 15) << 4) as u8;
        }
        scales[8 + g % 4] |= ((s >> 4) << (2 * (g / 4))) as u8;
    }
    let mut block = hmask.to_vec();
    block.extend(two_bit_plane(&q));
    block.extend(scales);
    block.extend(f16_le(d));
    let expected: Vec<f32> = (0..256)
        .map(|e| d * (sc[e / 16] as f32 - 32.0) * (q[e] as f32 - 4.0))
        .collect();
    assert_same(DType::Q3K, &decode(DType::Q3K, &block), &expected);
}

/// Q4_K and Q5_K's 12 scale bytes: 8 6-bit scales and offsets. For g < 4:
/// `scales[g]` and `scales[g + 4]` low 6 bits; for g >= 4: low 4 bits in the low
/// (scale) and high (offset) nibbles of `scales[g + 4]`, high 2 bits in bits 6-7 of
/// `scales[g - 4]` (scale) and `scales[g]` (offset).
fn k_scales(sc: &[u32], m: &[u32]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for g in 0..8 {
        if g < 4 {
            out[g] |= sc[g] as u8;
            out[g + 4] |= m[g] as u8;
        } else {
            out[g + 4] |= ((sc[g] & 15) | ((m[g] & 15) << 4)) as u8;
            out[g - 4] |= ((sc[g] >> 4) << 6) as u8;
            out[g] |= ((m[g] >> 4) << 6) as u8;
        }
    }
    out
}

/// The 4-bit plane of Q4_K and Q5_K: element `64 c + l` in the low nibble and
/// `64 c + 32 + l` in the high nibble of byte `32 c + l`.
fn k_nibbles(q: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; 128];
    for (e, &q) in q.iter().enumerate() {
        let (c, upper, l) = (e / 64, (e % 64) / 32, e % 32);
        out[32 * c + l] |= ((q & 15) << (4 * upper)) as u8;
    }
    out
}

fn k_scales_and_offsets() -> (Vec<u32>, Vec<u32>) {
    let sc = (0..8).map(|g| (g * 23 + 7) % 64).collect();
    let m = (0..8).map(|g| (g * 41 + 60) % 64).collect();
    (sc, m)
}

/// Q4_K: `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`;
/// `x = d * sc[e / 32] * q - dmin * m[e / 32]`.
#[test]
fn q4_k_golden() {
    let (d, dmin) = (0.0625f32, 0.03125f32);
    let (sc, m) = k_scales_and_offsets();
    let q = pattern(256, 16);
    let mut block = [f16_le(d), f16_le(dmin)].concat();
    block.extend(k_scales(&sc, &m));
    block.extend(k_nibbles(&q));
    let expected: Vec<f32> = (0..256)
        .map(|e| d * sc[e / 32] as f32 * q[e] as f32 - dmin * m[e / 32] as f32)
        .collect();
    assert_same(DType::Q4K, &decode(DType::Q4K, &block), &expected);
}

/// Q5_K: `{ f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }`, bit 4 of
/// quant `e` in bit `e / 32` of `qh[e % 32]`.
#[test]
fn q5_k_golden() {
    let (d, dmin) = (0.125f32, 0.0625f32);
    let (sc, m) = k_scales_and_offsets();
    let q = pattern(256, 32);
    let mut qh = [0u8; 32];
    for (e, &q) in q.iter().enumerate() {
        qh[e % 32] |= ((q >> 4) << (e / 32)) as u8;
    }
    let mut block = [f16_le(d), f16_le(dmin)].concat();
    block.extend(k_scales(&sc, &m));
    block.extend(qh);
    block.extend(k_nibbles(&q));
    let expected: Vec<f32> = (0..256)
        .map(|e| d * sc[e / 32] as f32 * q[e] as f32 - dmin * m[e / 32] as f32)
        .collect();
    assert_same(DType::Q5K, &decode(DType::Q5K, &block), &expected);
}

/// Q6_K: `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`. Element
/// `e = 128 h + 32 s + l`: low 4 bits in nibble `s / 2` of `ql[64 h + 32 (s % 2) + l]`,
/// high 2 bits in bits `2 s` of `qh[32 h + l]`; `x = d * scales[e / 16] * (q - 32)`.
#[test]
fn q6_k_golden() {
    let d = 0.03125f32;
    let scales: Vec<i8> = (0..16).map(|g| (g * 29 - 128) as i8).collect();
    let q = pattern(256, 64);
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (e, &q) in q.iter().enumerate() {
        let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
        ql[64 * h + 32 * (s % 2) + l] |= ((q & 15) << (4 * (s / 2))) as u8;
        qh[32 * h + l] |= ((q >> 4) << (2 * s)) as u8;
    }
    let mut block = ql.to_vec();
    block.extend(qh);
    block.extend(scales.iter().map(|&s| s as u8));
    block.extend(f16_le(d));
    let expected: Vec<f32> = (0..256)
        .map(|e| d * f32::from(scales[e / 16]) * (q[e] as f32 - 32.0))
        .collect();
    assert_same(DType::Q6K, &decode(DType::Q6K, &block), &expected);
}

/// Q8_K: `{ f32 d; i8 qs[256]; i16 bsums[16] }`; `x = d * q` (`bsums` does not
/// enter).
#[test]
fn q8_k_golden() {
    let d = -0.375f32;
    let q = all_i8();
    let mut block = d.to_le_bytes().to_vec();
    block.extend(q.iter().map(|&q| q as u8));
    for g in 0..16i16 {
        block.extend((g * 100 - 700).to_le_bytes());
    }
    let expected: Vec<f32> = q.iter().map(|&q| d * f32::from(q)).collect();
    assert_same(DType::Q8K, &decode(DType::Q8K, &block), &expected);
}

/// IQ4_NL: `{ f16 d; u8 qs[16] }`, index `i[j]` in the low nibble and `i[j + 16]`
/// in the high nibble of `qs[j]`; `x = d * kvalues_iq4nl[i]` with ggml's table.
#[test]
fn iq4_nl_golden() {
    const KVALUES_IQ4NL: [i8; 16] = [
        -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
    ];
    assert_eq!(quant::IQ4_NL_LEVELS, KVALUES_IQ4NL);
    let d = 0.015625f32;
    let i = pattern(32, 16);
    let mut block = f16_le(d).to_vec();
    for j in 0..16 {
        block.push((i[j] | (i[j + 16] << 4)) as u8);
    }
    let expected: Vec<f32> = i
        .iter()
        .map(|&i| d * f32::from(KVALUES_IQ4NL[i as usize]))
        .collect();
    assert_same(DType::IQ4NL, &decode(DType::IQ4NL, &block), &expected);
}

/// Consecutive blocks decode independently: two Q4_0 blocks with different scales
/// land in the right halves of the output.
#[test]
fn consecutive_blocks_use_their_own_scales() {
    let q = pattern(32, 16);
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for d in [1.0f32, -2.0] {
        bytes.extend(f16_le(d));
        bytes.extend((0..16).map(|j| (q[j] | (q[j + 16] << 4)) as u8));
        expected.extend(q.iter().map(|&q| d * (q as f32 - 8.0)));
    }
    assert_same(DType::Q4_0, &decode(DType::Q4_0, &bytes), &expected);
}

fn encode(dtype: DType, x: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; dtype.bytes_for(x.len()).unwrap()];
    quant::quantize(dtype, x, &mut bytes).unwrap();
    bytes
}

/// ggml's Q4_0 reference rule: `d = -max / 8` with `max` the element of largest
/// magnitude (here -4 at j = 0, so d = 0.5), `q = min(15, trunc(x / d + 8.5))`.
/// With `x[j] = (j - 16) / 4`, `x / d + 8.5 = j / 2 + 0.5`, so `q[j] = ceil(j / 2)`
/// and the top value j = 31 gives 16, clamped to 15.
#[test]
fn q4_0_quantizer_golden() {
    let x: Vec<f32> = (0..32).map(|j| (j as f32 - 16.0) / 4.0).collect();
    let q: Vec<u32> = (0..32).map(|j: u32| j.div_ceil(2).min(15)).collect();
    let mut expected = f16_le(0.5).to_vec();
    expected.extend((0..16).map(|j| (q[j] | (q[j + 16] << 4)) as u8));
    assert_eq!(encode(DType::Q4_0, &x), expected);
}

/// ggml's Q4_1 reference rule: `m = min(x)`, `d = (max(x) - m) / 15`,
/// `q = trunc((x - m) / d + 0.5)`. With `x[j] = -1 + (j mod 16) / 2`: m = -1,
/// d = 0.5 and `q[j] = j mod 16`.
#[test]
fn q4_1_quantizer_golden() {
    let x: Vec<f32> = (0..32).map(|j| -1.0 + (j % 16) as f32 / 2.0).collect();
    let mut expected = [f16_le(0.5), f16_le(-1.0)].concat();
    expected.extend((0..16u8).map(|j| j | (j << 4)));
    assert_eq!(encode(DType::Q4_1, &x), expected);
}

/// Q1_0: `{ f16 d; u8 qs[16] }`, bit `j % 8` of `qs[j / 8]` is element `j`'s sign
/// bit; `x = +d` where set, `-d` where clear.
#[test]
fn q1_0_golden() {
    let d = 0.375f32;
    let bits = pattern(128, 2);
    let mut block = f16_le(d).to_vec();
    for byte in bits.chunks(8) {
        block.push(byte.iter().enumerate().map(|(i, &b)| (b << i) as u8).sum());
    }
    let expected: Vec<f32> = bits.iter().map(|&b| if b == 1 { d } else { -d }).collect();
    assert_same(DType::Q1_0, &decode(DType::Q1_0, &block), &expected);
}

/// Q2_0: `{ f16 d; u8 qs[16] }`, bits `2 (j % 4)` of `qs[j / 4]` hold element `j`'s
/// code `q`; `x = (q - 1) d`: 00, 01, 10, 11 mean -d, 0, +d, +2d.
#[test]
fn q2_0_golden() {
    let d = -1.25f32;
    let q = pattern(64, 4);
    let mut block = f16_le(d).to_vec();
    for byte in q.chunks(4) {
        block.push(
            byte.iter()
                .enumerate()
                .map(|(i, &q)| (q << (2 * i)) as u8)
                .sum(),
        );
    }
    let level = [-1.0f32, 0.0, 1.0, 2.0];
    let expected: Vec<f32> = q.iter().map(|&q| level[q as usize] * d).collect();
    assert_same(DType::Q2_0, &decode(DType::Q2_0, &block), &expected);
}

/// TQ2_0: `{ u8 qs[64]; f16 d }`; elements in the order of ggml's
/// `dequantize_row_tq2_0`: for each half `j` of `qs` (bytes 0-31, 32-63), for each
/// bit pair `l`, the 32 bytes `m` of that half: `x = (((qs[j + m] >> 2 l) & 3) - 1) d`.
#[test]
fn tq2_0_golden() {
    let d = 0.0625f32;
    let qs: Vec<u8> = pattern(64, 64)
        .iter()
        .map(|&v| (v * 4 + v / 16) as u8)
        .collect();
    let block = [qs.clone(), f16_le(d).to_vec()].concat();
    let mut expected = Vec::new();
    for j in [0, 32] {
        for l in 0..4 {
            for m in 0..32 {
                let q = (qs[j + m] >> (2 * l)) & 3;
                expected.push((f32::from(q) - 1.0) * d);
            }
        }
    }
    assert_same(DType::TQ2_0, &decode(DType::TQ2_0, &block), &expected);
}

/// The trits of a TQ1_0 byte, most significant first: trit `n` of byte `b` is
/// `((b * 3^n mod 256) * 3) >> 8` (ggml's base-3 fixed-point packing).
fn tq1_trits(b: u8) -> [u8; 5] {
    std::array::from_fn(|n| {
        let q = b.wrapping_mul(3u8.pow(n as u32));
        ((u16::from(q) * 3) >> 8) as u8
    })
}

/// TQ1_0's byte packing, worked by hand: trits (2, 1, 0, 2, 1) are
/// T = 2*81 + 1*27 + 0*9 + 2*3 + 1 = 196, stored as ceil(196 * 256 / 243) = 207;
/// (0, 0, 0, 0, 0) as 0; (2, 2, 2, 2, 2) = 242 as 255; (1, 0, 0, 0, 0) = 81 as 86.
#[test]
fn tq1_0_trit_packing_by_hand() {
    assert_eq!(tq1_trits(207), [2, 1, 0, 2, 1]);
    assert_eq!(tq1_trits(0), [0, 0, 0, 0, 0]);
    assert_eq!(tq1_trits(255), [2, 2, 2, 2, 2]);
    assert_eq!(tq1_trits(86), [1, 0, 0, 0, 0]);
    // The quantizer writes exactly these bytes for these trits: each 5-trit group
    // below is one byte of the first 32 (elements m, m + 32, ..., m + 128).
    let d = 2.0f32;
    let mut x = vec![0.0f32; 256];
    let groups: [(usize, [u8; 5]); 4] = [
        (0, [2, 1, 0, 2, 1]),
        (5, [0; 5]),
        (31, [2; 5]),
        (7, [1, 0, 0, 0, 0]),
    ];
    for (m, trits) in groups {
        for (n, &t) in trits.iter().enumerate() {
            x[m + 32 * n] = (f32::from(t) - 1.0) * d;
        }
    }
    let mut block = vec![0u8; 54];
    quant::quantize(DType::TQ1_0, &x, &mut block).unwrap();
    assert_eq!((block[0], block[5], block[31], block[7]), (207, 0, 255, 86));
    assert_eq!(&block[52..54], &f16_le(d));
}

/// TQ1_0: `{ u8 qs[48]; u8 qh[4]; f16 d }`; elements in the order of ggml's
/// `dequantize_row_tq1_0`: trit `n` of `qs[m]`, `m` < 32, for n in 0..5 then m;
/// then trit `n` of `qs[32 + m]`, `m` < 16; then trits 0..4 of `qh[j]`, n outer.
/// `x = (t - 1) d`.
#[test]
fn tq1_0_golden() {
    let d = -0.5f32;
    // Every byte value 0..=255 once over the first 48 + 4 bytes would be too many;
    // a shuffled spread over 0..=255 in steps of 5 covers the trit patterns.
    let bytes: Vec<u8> = pattern(52, 52).iter().map(|&v| (v * 5) as u8).collect();
    let (qs, qh) = bytes.split_at(48);
    let block = [bytes.clone(), f16_le(d).to_vec()].concat();
    let value = |t: u8| (f32::from(t) - 1.0) * d;
    let mut expected = Vec::new();
    for n in 0..5 {
        expected.extend(qs[..32].iter().map(|&b| value(tq1_trits(b)[n])));
    }
    for n in 0..5 {
        expected.extend(qs[32..].iter().map(|&b| value(tq1_trits(b)[n])));
    }
    for n in 0..4 {
        expected.extend(qh.iter().map(|&b| value(tq1_trits(b)[n])));
    }
    assert_same(DType::TQ1_0, &decode(DType::TQ1_0, &block), &expected);
}

/// MXFP4: `{ u8 e; u8 qs[16] }`, code `c[j]` in the low nibble and `c[j + 16]` in
/// the high nibble of `qs[j]`; `x = E2M1(c) * 2^(e - 127)`, with E2M1 from the OCP
/// MX spec: sign bit 3, then 2 exponent bits and 1 mantissa bit, magnitudes 0, 0.5,
/// 1, 1.5, 2, 3, 4, 6. Code 8 (-0) decodes as +0, as ggml's integer table has it.
#[test]
fn mxfp4_golden() {
    const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let e2m1 = |c: u32| {
        let m = E2M1[(c & 7) as usize];
        if c & 8 != 0 && m != 0.0 {
            -m
        } else {
            m
        }
    };
    let c = pattern(32, 16);
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    // e = 130 (x 8), 127 (x 1), 1 and 0 (the f32 subnormals 2^-126, 2^-127: the
    // largest level 6 * 2^-127 stays exact).
    for (e, scale) in [
        (130u8, 8.0f32),
        (127, 1.0),
        (1, 2f32.powi(-126)),
        (0, 2f32.powi(-127)),
    ] {
        bytes.push(e);
        bytes.extend((0..16).map(|j| (c[j] | (c[j + 16] << 4)) as u8));
        expected.extend(c.iter().map(|&c| e2m1(c) * scale));
    }
    assert_same(DType::MXFP4, &decode(DType::MXFP4, &bytes), &expected);
}

/// A 64 x 512 matrix of the kinds of rows the searched quantizers meet, from a fixed
/// seed: Gaussian, Gaussian with x100 outliers, constant, zeros, tiny (1e-3), all
/// positive, all negative, small integers, half zeros and growing variance.
fn mixed_rows() -> Vec<f32> {
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (rows, cols) = (64, 512);
    let mut x = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let g: f32 = rng.sample::<f32, _>(rand_distr::StandardNormal);
            x.push(match r % 10 {
                0 => g,
                1 if c % 37 == 0 => 100.0 * g,
                1 => g,
                2 => 0.75,
                3 => 0.0,
                4 => 1e-3 * g,
                5 => g.abs(),
                6 => -g.abs(),
                7 => (3.0 * g).round(),
                8 if c % 2 == 0 => 0.0,
                8 => g,
                _ => g * (1.0 + c as f32 / 64.0),
            });
        }
    }
    x
}

/// FNV-1a over `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The searched encoders (the k-quants and IQ4_NL) write the bytes they wrote when
/// their output was last checked byte for byte against ggml's unfused reference
/// quantizers (docs/quantization.md): the digests of their encodings of
/// [`mixed_rows`] were taken from that code, so a change in a search (its order of
/// sums, its rounding) shows here.
#[test]
fn searched_encodings_are_unchanged() {
    let x = mixed_rows();
    for (dtype, digest) in [
        (DType::Q2K, 0xfb80_dfeb_b073_d951),
        (DType::Q4K, 0x9689_dbf8_6a8f_9972),
        (DType::Q5K, 0xbc8e_9d71_fa6a_9e76),
        (DType::Q3K, 0xb996_58c2_34ba_6335),
        (DType::Q6K, 0x60e0_f3c1_3f29_52e0),
        (DType::IQ4NL, 0x6d7f_f2cb_82dd_c5b5),
    ] {
        let bytes = encode(dtype, &x);
        assert_eq!(fnv1a(&bytes), digest, "{dtype}: {:#018x}", fnv1a(&bytes));
    }
}
