//! The ternary formats: TQ1_0 (base-3 packing, 1.6875 bits per weight) and TQ2_0
//! (2-bit codes, 2.0625 bits per weight), 256 elements each with one f16 scale, as
//! ggml stores BitNet b1.58 and TriLM weights.
//!
//! Quantization follows ggml's reference quantizers `quantize_row_tq1_0_ref` and
//! `quantize_row_tq2_0_ref` (what `ggml_quantize_chunk` runs): `d` is the block's
//! largest magnitude and each element takes the trit `round(x / d)` (half away from
//! zero, with the unrounded `d`).

use super::block::{read_f16, write_f16, BlockCodec};
use crate::dtype::QK_K;
use crate::DType;

/// The trit in `-1..=1` nearest to `v * id` (rounding half away from zero, as ggml's
/// `lroundf`), offset to `0..=2`.
#[inline]
fn trit(v: f32, id: f32) -> u8 {
    ((v * id).round() as i32 + 1) as u8
}

/// The block's largest magnitude and its inverse (0 for an all-zero block).
fn scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (amax, if amax != 0.0 { 1.0 / amax } else { 0.0 })
}

/// TQ1_0: 256 elements, 54 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                    |
/// |--------|----------------------------------------------------------|
/// | 0      | `qs[48]`: five trits per byte                            |
/// | 48     | `qh[4]`: four trits per byte                             |
/// | 52     | `d`: f16 scale                                           |
///
/// A byte `b` holds trits `t[0..5]` (most significant first) as the fixed-point
/// fraction `b = ceil(256 * T / 243)`, `T = sum t[n] 3^(4 - n)`; trit `n` is
/// `((b * 3^n mod 256) * 3) >> 8`. Trit `n` of byte `i` is element
/// `n * 32 + i` for `qs[0..32]`, `160 + n * 16 + (i - 32)` for `qs[32..48]`, and
/// `240 + n * 4 + i` for `qh[i]` (whose fifth trit is 0). Value:
/// `x = (t - 1) * d`.
pub(super) struct Tq1_0;

/// The groups of TQ1_0 bytes: (first byte, bytes, trits used per byte, first
/// element, element stride between a byte's trits).
const TQ1_GROUPS: [(usize, usize, usize, usize, usize); 3] =
    [(0, 32, 5, 0, 32), (32, 16, 5, 160, 16), (48, 4, 4, 240, 4)];

/// Byte offset of TQ1_0's scale.
const TQ1_D_AT: usize = 52;

impl BlockCodec for Tq1_0 {
    const DTYPE: DType = DType::TQ1_0;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, TQ1_D_AT);
        for (first, bytes, trits, start, stride) in TQ1_GROUPS {
            for i in 0..bytes {
                let mut b = block[first + i];
                for n in 0..trits {
                    let t = (u16::from(b) * 3) >> 8;
                    out[start + n * stride + i] = (i32::from(t) - 1) as f32 * d;
                    b = b.wrapping_mul(3);
                }
            }
        }
    }

    fn encode(x: &[f32], block: &mut [u8]) {
        let (d, id) = scale(x);
        for (first, bytes, trits, start, stride) in TQ1_GROUPS {
            for i in 0..bytes {
                let mut t = (0..trits).fold(0u16, |t, n| {
                    t * 3 + u16::from(trit(x[start + n * stride + i], id))
                });
                for _ in trits..5 {
                    t *= 3;
                }
                // ceil(256 t / 243): at most 255 for t <= 242.
                block[first + i] = (t * 256).div_ceil(243) as u8;
            }
        }
        write_f16(block, TQ1_D_AT, d);
    }
}

/// TQ2_0: 256 elements, 66 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                       |
/// |--------|-------------------------------------------------------------|
/// | 0      | `qs[64]`: four 2-bit codes per byte                         |
/// | 64     | `d`: f16 scale                                              |
///
/// Bits `2 l` and `2 l + 1` of `qs[i]` hold the code `q` of element
/// `128 (i / 32) + 32 l + i % 32`. Value: `x = (q - 1) * d` (the quantizer writes
/// codes 0 to 2; code 3 decodes as `2 d`, as in ggml).
pub(super) struct Tq2_0;

/// Byte offset of TQ2_0's scale.
const TQ2_D_AT: usize = QK_K / 4;

/// The element that bits `2 l` of TQ2_0's `qs[i]` hold.
#[inline]
fn tq2_element(i: usize, l: usize) -> usize {
    128 * (i / 32) + 32 * l + i % 32
}

impl BlockCodec for Tq2_0 {
    const DTYPE: DType = DType::TQ2_0;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, TQ2_D_AT);
        // Bits 2 l of byte i of each 32 hold element 32 l + i of its 128 (`tq2_element`).
        for (half, bytes) in out
            .chunks_exact_mut(128)
            .zip(block[..TQ2_D_AT].chunks_exact(32))
        {
            for (l, run) in half.chunks_exact_mut(32).enumerate() {
                for (v, &b) in run.iter_mut().zip(bytes) {
                    // Shifted as i32, which vectorizes (bytes have no vector shifts).
                    let q = (i32::from(b) >> (2 * l)) & 3;
                    *v = (q - 1) as f32 * d;
                }
            }
        }
    }

    fn encode(x: &[f32], block: &mut [u8]) {
        let (d, id) = scale(x);
        for (i, b) in block[..TQ2_D_AT].iter_mut().enumerate() {
            *b = (0..4).fold(0u8, |b, l| b | (trit(x[tq2_element(i, l)], id) << (2 * l)));
        }
        write_f16(block, TQ2_D_AT, d);
    }
}
