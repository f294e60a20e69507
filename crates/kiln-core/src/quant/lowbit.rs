//! The 1- and 2-bit formats with one f16 scale per block: Q1_0 (signs, 128
//! elements) and Q2_0 (four levels, 64 elements).
//!
//! Quantization follows ggml's reference quantizers `quantize_row_q1_0_ref` and
//! `quantize_row_q2_0_ref`, which are also what `ggml_quantize_chunk` runs without an
//! importance matrix.

use super::block::{read_f16, write_f16, BlockCodec};
use crate::DType;

/// Q1_0: 128 elements, 18 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                          |
/// |--------|----------------------------------------------------------------|
/// | 0      | `d`: f16 scale                                                 |
/// | 2      | `qs[16]`: bit `j % 8` of byte `j / 8` is the sign bit `b[j]`   |
///
/// Value: `x[j] = +d` if `b[j]` is set, `-d` if not.
pub(super) struct Q1_0;

/// Elements per Q1_0 block.
const QK1: usize = 128;

impl BlockCodec for Q1_0 {
    const DTYPE: DType = DType::Q1_0;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, 0);
        for (j, v) in out.iter_mut().enumerate() {
            let set = (block[2 + j / 8] >> (j % 8)) & 1 != 0;
            *v = if set { d } else { -d };
        }
    }

    /// ggml's `quantize_row_q1_0_ref`: `d` is the mean magnitude of the block
    /// (summed in order in f32, then divided by 128), and `b[j]` is set where
    /// `x[j] >= 0` (so zeros, and -0.0, decode as `+d`).
    fn encode(x: &[f32], block: &mut [u8]) {
        let sum_abs = x.iter().fold(0.0f32, |s, v| s + v.abs());
        write_f16(block, 0, sum_abs / QK1 as f32);
        for (byte, group) in block[2..].iter_mut().zip(x.chunks_exact(8)) {
            *byte = group
                .iter()
                .enumerate()
                .fold(0u8, |b, (k, &v)| b | (u8::from(v >= 0.0) << k));
        }
    }
}

/// Q2_0: 64 elements, 18 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                           |
/// |--------|-----------------------------------------------------------------|
/// | 0      | `d`: f16 scale                                                  |
/// | 2      | `qs[16]`: bits `2 (j % 4)` and up of byte `j / 4` hold code `q[j]` |
///
/// Value: `x[j] = (q[j] - 1) * d`: codes 0, 1, 2, 3 mean -d, 0, +d, +2d.
pub(super) struct Q2_0;

impl BlockCodec for Q2_0 {
    const DTYPE: DType = DType::Q2_0;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, 0);
        for (quad, &byte) in out.chunks_exact_mut(4).zip(&block[2..]) {
            for (l, v) in quad.iter_mut().enumerate() {
                // Shifted as i32, which vectorizes (bytes have no vector shifts).
                let q = (i32::from(byte) >> (2 * l)) & 3;
                *v = (q - 1) as f32 * d;
            }
        }
    }

    /// ggml's `quantize_row_q2_0_ref`: `d` is the largest magnitude of the block,
    /// and `q = clamp(round(x / d) + 1, 0, 3)` with the unrounded `d` (rounding half
    /// away from zero), so the quantizer writes codes 0 to 2 only.
    fn encode(x: &[f32], block: &mut [u8]) {
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        write_f16(block, 0, amax);
        let id = if amax > 0.0 { 1.0 / amax } else { 0.0 };
        for (byte, group) in block[2..].iter_mut().zip(x.chunks_exact(4)) {
            *byte = group.iter().enumerate().fold(0u8, |b, (k, &v)| {
                let q = ((v * id).round() as i32 + 1).clamp(0, 3) as u8;
                b | (q << (2 * k))
            });
        }
    }
}
