//! The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1 (packed nibbles plus an
//! optional fifth bit) and Q8_0, Q8_1 (signed bytes).
//!
//! Quantization follows ggml's reference quantizers (`quantize_row_*_ref`), which are
//! also what `ggml_quantize_chunk` runs without an importance matrix: one scale per
//! block from the block's extreme values, no search.

use super::block::{read_f16, signed_absmax, write_f16, BlockCodec};
use crate::DType;

/// Elements per block.
const QK: usize = 32;

/// Q4_0, Q4_1, Q5_0 and Q5_1: 32 unsigned quants `q` of `BITS` bits (4 or 5).
///
/// Byte layout (little-endian; `h` = 2 without, 4 with the offset `m`):
///
/// | offset          | field                                                        |
/// |-----------------|--------------------------------------------------------------|
/// | 0               | `d`: f16 scale                                               |
/// | 2               | `m`: f16 offset (`AFFINE` formats only)                      |
/// | h               | `qh`: u32, bit `j` is bit 4 of `q[j]` (`BITS` = 5 only)      |
/// | h (+4 if 5-bit) | `qs[16]`: byte `j` holds the low 4 bits of `q[j]` in its low nibble and those of `q[j + 16]` in its high nibble |
///
/// Values: symmetric formats (Q4_0, Q5_0) `x[j] = d * (q[j] - 2^(BITS-1))`; affine
/// formats (Q4_1, Q5_1) `x[j] = d * q[j] + m`.
pub(super) struct PackedNibbles<const BITS: u32, const AFFINE: bool>;

/// Q4_0: 4-bit, symmetric; 18 bytes per 32 elements.
pub(super) type Q4_0 = PackedNibbles<4, false>;
/// Q4_1: 4-bit, affine; 20 bytes per 32 elements.
pub(super) type Q4_1 = PackedNibbles<4, true>;
/// Q5_0: 5-bit, symmetric; 22 bytes per 32 elements.
pub(super) type Q5_0 = PackedNibbles<5, false>;
/// Q5_1: 5-bit, affine; 24 bytes per 32 elements.
pub(super) type Q5_1 = PackedNibbles<5, true>;

impl<const BITS: u32, const AFFINE: bool> PackedNibbles<BITS, AFFINE> {
    /// Largest quant.
    const MAX_Q: i32 = (1 << BITS) - 1;
    /// What symmetric formats subtract from a quant: 2^(BITS-1).
    const ZERO_POINT: i32 = 1 << (BITS - 1);
    /// Byte offset of `qh` (5-bit formats) or `qs`.
    const AFTER_SCALES: usize = if AFFINE { 4 } else { 2 };
    /// Byte offset of `qs`.
    const QS_AT: usize = Self::AFTER_SCALES + if BITS == 5 { 4 } else { 0 };

    /// Encodes quants `q` (each at most `MAX_Q`) into `qh` (5-bit formats) and `qs`.
    fn pack(q: &[u8; QK], block: &mut [u8]) {
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let (q0, q1) = (q[j], q[j + QK / 2]);
            block[Self::QS_AT + j] = (q0 & 0xF) | ((q1 & 0xF) << 4);
            qh |= u32::from(q0 >> 4) << j;
            qh |= u32::from(q1 >> 4) << (j + QK / 2);
        }
        if BITS == 5 {
            block[Self::AFTER_SCALES..Self::AFTER_SCALES + 4].copy_from_slice(&qh.to_le_bytes());
        }
    }

    /// ggml's symmetric reference: `d = -max / 2^(BITS-1)` where `max` is the
    /// element of largest magnitude (so it maps to quant 0), and
    /// `q = min(MAX_Q, trunc(x / d + 2^(BITS-1) + 0.5))`.
    fn quantize_symmetric(x: &[f32], q: &mut [u8; QK]) -> (f32, f32) {
        let (max, _) = signed_absmax(x);
        let d = max / -(Self::ZERO_POINT as f32);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let bias = Self::ZERO_POINT as f32 + 0.5;
        for (q, &v) in q.iter_mut().zip(x) {
            // Truncation toward zero, as ggml's cast to int8_t. Values within half
            // a step of `-max` land on MAX_Q + 1; the clamp keeps them at MAX_Q.
            *q = ((v * id + bias) as i32).clamp(0, Self::MAX_Q) as u8;
        }
        (d, 0.0)
    }

    /// ggml's affine reference: `m = min(x)`, `d = (max(x) - m) / MAX_Q`,
    /// `q = min(MAX_Q, trunc((x - m) / d + 0.5))`.
    fn quantize_affine(x: &[f32], q: &mut [u8; QK]) -> (f32, f32) {
        let mut min = f32::MAX;
        let mut max = -f32::MAX;
        for &v in x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / Self::MAX_Q as f32;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (((v - min) * id + 0.5) as i32).clamp(0, Self::MAX_Q) as u8;
        }
        (d, min)
    }
}

impl<const BITS: u32, const AFFINE: bool> BlockCodec for PackedNibbles<BITS, AFFINE> {
    const DTYPE: DType = match (BITS, AFFINE) {
        (4, false) => DType::Q4_0,
        (4, true) => DType::Q4_1,
        (5, false) => DType::Q5_0,
        (5, true) => DType::Q5_1,
        // Evaluated at compile time: instantiating other widths fails to build.
        _ => panic!("PackedNibbles exists for 4 and 5 bits only"),
    };

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, 0);
        let qh = if BITS == 5 {
            let at = Self::AFTER_SCALES;
            u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
        } else {
            0
        };
        let qs = &block[Self::QS_AT..Self::QS_AT + QK / 2];
        let m = if AFFINE { read_f16(block, 2) } else { 0.0 };
        let (low_half, high_half) = out.split_at_mut(QK / 2);
        let to_value = |q: u32| -> f32 {
            if AFFINE {
                q as f32 * d + m
            } else {
                (q as i32 - Self::ZERO_POINT) as f32 * d
            }
        };
        for (j, ((&byte, lo), hi)) in qs.iter().zip(low_half).zip(high_half).enumerate() {
            let q0 = u32::from(byte & 0xF) | (((qh >> j) & 1) << 4);
            let q1 = u32::from(byte >> 4) | (((qh >> (j + QK / 2)) & 1) << 4);
            *lo = to_value(q0);
            *hi = to_value(q1);
        }
    }

    fn encode(x: &[f32], block: &mut [u8]) {
        let mut q = [0u8; QK];
        let (d, m) = if AFFINE {
            Self::quantize_affine(x, &mut q)
        } else {
            Self::quantize_symmetric(x, &mut q)
        };
        write_f16(block, 0, d);
        if AFFINE {
            write_f16(block, 2, m);
        }
        Self::pack(&q, block);
    }
}

/// Q8_0 and Q8_1: 32 signed 8-bit quants.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                    |
/// |--------|----------------------------------------------------------|
/// | 0      | `d`: f16 scale                                           |
/// | 2      | `s`: f16, `d * sum(q)` (Q8_1 only)                       |
/// | 2 or 4 | `qs[32]`: i8 quants                                      |
///
/// Values: `x[j] = d * qs[j]`. The sum `s` serves dot products; decoding ignores it.
pub(super) struct SignedBytes<const WITH_SUM: bool>;

/// Q8_0: 34 bytes per 32 elements.
pub(super) type Q8_0 = SignedBytes<false>;
/// Q8_1: 36 bytes per 32 elements, with the block sum.
pub(super) type Q8_1 = SignedBytes<true>;

impl<const WITH_SUM: bool> SignedBytes<WITH_SUM> {
    /// Byte offset of `qs`.
    const QS_AT: usize = if WITH_SUM { 4 } else { 2 };
}

impl<const WITH_SUM: bool> BlockCodec for SignedBytes<WITH_SUM> {
    const DTYPE: DType = if WITH_SUM { DType::Q8_1 } else { DType::Q8_0 };

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, 0);
        for (y, &q) in out.iter_mut().zip(&block[Self::QS_AT..]) {
            *y = f32::from(q as i8) * d;
        }
    }

    /// ggml's reference: `d = max|x| / 127`, `q = round(x / d)` (half away from
    /// zero); Q8_1 adds `s = d * sum(q)`.
    fn encode(x: &[f32], block: &mut [u8]) {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(block, 0, d);
        let mut sum = 0i32;
        for (byte, &v) in block[Self::QS_AT..].iter_mut().zip(x) {
            let q = (v * id).round() as i8;
            sum += i32::from(q);
            *byte = q as u8;
        }
        if WITH_SUM {
            write_f16(block, 2, sum as f32 * d);
        }
    }
}
