//! Q3_K: 3-bit signed quants with a 6-bit scale per 16 elements.

use super::search::symmetric_scale_refine;
use super::{group_scales_16, pack_2bit, requantize_groups_16, two_bit_group, QK_K};
use crate::quant::block::{nearest_int, read_f16, write_f16, BlockCodec};
use crate::DType;

/// Q3_K: 256 elements in 16 groups of 16, 110 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                              |
/// |--------|--------------------------------------------------------------------|
/// | 0      | `hmask[32]`: bit 2 of quant `e` is bit `e / 32` of `hmask[e % 32]` |
/// | 32     | `qs[64]`: bits 0-1 of the quants; element `128 h + 32 s + l` is bits `2 s .. 2 s + 2` of `qs[32 h + l]` |
/// | 96     | `scales[12]`: 16 6-bit group scales `sc[g]`: bits 0-3 are the low (`g < 8`) or high (`g >= 8`) nibble of `scales[g % 8]`, bits 4-5 are bits `2 (g / 4) .. 2 (g / 4) + 2` of `scales[8 + g % 4]` |
/// | 108    | `d`: f16, multiplies the group scales                              |
///
/// Value of element `e` in group `g = e / 16`, with 3-bit quant `q` (0..8):
/// `x = d * (sc[g] - 32) * (q - 4)`.
pub(in crate::quant) struct Q3K;

const HMASK_AT: usize = 0;
const QS_AT: usize = 32;
const SCALES_AT: usize = 96;
const D_AT: usize = 108;

/// Groups per super-block.
const GROUPS: usize = QK_K / 16;

/// Group `g`'s 6-bit scale, minus 32, from the 12 packed bytes.
fn group_scale(packed: &[u8], g: usize) -> i32 {
    let low = if g < 8 {
        packed[g] & 0xF
    } else {
        packed[g - 8] >> 4
    };
    let high = (packed[8 + g % 4] >> (2 * (g / 4))) & 3;
    i32::from(low | (high << 4)) - 32
}

/// Packs 16 6-bit group scales (0..64) into 12 bytes, the inverse of
/// [`group_scale`] (plus 32).
fn pack_group_scales(scales: &[u8; GROUPS], packed: &mut [u8]) {
    packed.fill(0);
    for (g, &s) in scales.iter().enumerate() {
        if g < 8 {
            packed[g] = s & 0xF;
        } else {
            packed[g - 8] |= (s & 0xF) << 4;
        }
        packed[8 + g % 4] |= (s >> 4) << (2 * (g / 4));
    }
}

impl BlockCodec for Q3K {
    const DTYPE: DType = DType::Q3K;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, D_AT);
        let hmask = &block[HMASK_AT..QS_AT];
        let qs = &block[QS_AT..SCALES_AT];
        let packed = &block[SCALES_AT..D_AT];
        for (g, group) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * group_scale(packed, g) as f32;
            let (bytes, shift) = two_bit_group(qs, g);
            let high_bits = &hmask[16 * (g % 2)..16 * (g % 2) + 16];
            let high_bit = 1u8 << (g / 2);
            for ((y, &byte), &hm) in group.iter_mut().zip(bytes).zip(high_bits) {
                // Shifted as i32, which vectorizes (bytes have no vector shifts).
                let low = (i32::from(byte) >> shift) & 3;
                let q = if hm & high_bit != 0 { low } else { low - 4 };
                *y = dl * q as f32;
            }
        }
    }

    /// ggml's `quantize_row_q3_K_ref`: per group, [`symmetric_scale_refine`] on
    /// levels -4..4; group scales are quantized to 6 bits against the one of largest
    /// magnitude; levels are recomputed with the quantized scales.
    fn encode(x: &[f32], block: &mut [u8]) {
        let mut levels = [0u8; QK_K];
        let (scales, max_scale) =
            group_scales_16(x, &mut levels, |x, l| symmetric_scale_refine(x, 4, l));

        let d = if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            let mut quantized = [0u8; GROUPS];
            for (q, &s) in quantized.iter_mut().zip(&scales) {
                // ggml stores the rounded value in an int8_t before clamping.
                let l = i32::from(nearest_int(iscale * s) as i8);
                *q = (l.clamp(-32, 31) + 32) as u8;
            }
            pack_group_scales(&quantized, &mut block[SCALES_AT..D_AT]);
            1.0 / iscale
        } else {
            block[SCALES_AT..D_AT].fill(0);
            0.0
        };
        let d = write_f16(block, D_AT, d);

        let packed = &block[SCALES_AT..D_AT];
        requantize_groups_16(x, &mut levels, |g| d * group_scale(packed, g) as f32, -4, 3);

        let hmask = &mut block[HMASK_AT..QS_AT];
        hmask.fill(0);
        for (e, l) in levels.iter_mut().enumerate() {
            if *l > 3 {
                hmask[e % 32] |= 1 << (e / 32);
                *l -= 4;
            }
        }
        pack_2bit(&levels, &mut block[QS_AT..SCALES_AT]);
    }
}
