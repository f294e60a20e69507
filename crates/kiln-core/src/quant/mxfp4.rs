//! MXFP4 (OCP microscaling FP4): 32 E2M1 values sharing one E8M0 power-of-two
//! scale, as gpt-oss stores its experts.

use super::block::BlockCodec;
use crate::DType;

/// The values of the 16 E2M1 codes, doubled so they are integers (ggml's
/// `kvalues_mxfp4`): code `c` means `MXFP4_LEVELS[c] / 2`.
pub const MXFP4_LEVELS: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Elements per block.
const QK: usize = 32;

/// Half the value of the E8M0 exponent `e`, `2^(e - 128)`: the factor that
/// multiplies the doubled levels of [`MXFP4_LEVELS`] (ggml's
/// `ggml_e8m0_to_fp32_half`). `e` = 0 and 1 give the f32 subnormals 2^-128 and
/// 2^-127; `e` = 255 gives 2^127 (E8M0's NaN code is not treated specially).
#[inline]
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// MXFP4: 32 elements, 17 bytes.
///
/// Byte layout:
///
/// | offset | field                                                             |
/// |--------|-------------------------------------------------------------------|
/// | 0      | `e`: E8M0 exponent (unsigned, bias 127)                            |
/// | 1      | `qs[16]`: byte `j` holds code `c[j]` in its low nibble and `c[j + 16]` in its high nibble |
///
/// Value: `x[j] = MXFP4_LEVELS[c[j]] * e8m0_half(e)` (= `E2M1(c) * 2^(e - 127)`).
pub(super) struct Mxfp4;

/// The code whose value `MXFP4_LEVELS[c] * d` is nearest to `x` (the first on
/// ties), ggml's `best_index_mxfp4`.
fn nearest_code(x: f32, d: f32) -> u8 {
    let err = |c: usize| (f32::from(MXFP4_LEVELS[c]) * d - x).abs();
    let mut best = 0;
    for c in 1..MXFP4_LEVELS.len() {
        if err(c) < err(best) {
            best = c;
        }
    }
    best as u8
}

impl BlockCodec for Mxfp4 {
    const DTYPE: DType = DType::MXFP4;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = e8m0_half(block[0]);
        let (low_half, high_half) = out.split_at_mut(QK / 2);
        for ((&byte, lo), hi) in block[1..].iter().zip(low_half).zip(high_half) {
            *lo = f32::from(MXFP4_LEVELS[usize::from(byte & 0xF)]) * d;
            *hi = f32::from(MXFP4_LEVELS[usize::from(byte >> 4)]) * d;
        }
    }

    /// ggml's `quantize_row_mxfp4_ref`: `e = floor(log2(amax)) - 2 + 127` for the
    /// block's largest magnitude `amax` (0 for an all-zero block), so the largest
    /// E2M1 value 6 lands on `1.5 * 2^floor(log2 amax)` and values above it clip to
    /// 6; then each element takes [`nearest_code`]. Where ggml's conversion to
    /// `uint8_t` would wrap (`amax` below 2^-125), kiln saturates `e` at 0.
    fn encode(x: &[f32], block: &mut [u8]) {
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
        let e = if amax > 0.0 {
            (amax.log2().floor() - 2.0 + 127.0) as u8
        } else {
            0
        };
        block[0] = e;
        let d = e8m0_half(e);
        let (low_half, high_half) = x.split_at(QK / 2);
        for ((byte, &lo), &hi) in block[1..].iter_mut().zip(low_half).zip(high_half) {
            *byte = nearest_code(lo, d) | (nearest_code(hi, d) << 4);
        }
    }
}
