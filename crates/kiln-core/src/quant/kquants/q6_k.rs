//! Q6_K: 6-bit signed quants with an 8-bit signed scale per 16 elements.

use super::search::symmetric_scale_search;
use super::{group_scales_16, requantize_groups_16, QK_K};
use crate::quant::block::{nearest_int, read_f16, write_f16, BlockCodec, GROUP_MAX_EPS};
use crate::DType;

/// Q6_K: 256 elements in 16 groups of 16, 210 bytes.
///
/// Byte layout (little-endian). Element `e = 128 h + 32 s + l` (`h` in 0..2, `s` in
/// 0..4, `l` in 0..32) has the 6-bit quant `q` (0..64):
///
/// | offset | field                                                              |
/// |--------|--------------------------------------------------------------------|
/// | 0      | `ql[128]`: bits 0-3 of `q` in nibble `s / 2` (low nibble first) of `ql[64 h + 32 (s % 2) + l]` |
/// | 128    | `qh[64]`: bits 4-5 of `q` in bits `2 s .. 2 s + 2` of `qh[32 h + l]` |
/// | 192    | `scales[16]`: i8 group scales                                      |
/// | 208    | `d`: f16, multiplies the group scales                              |
///
/// Value of element `e` in group `g = e / 16`: `x = d * scales[g] * (q - 32)`.
pub(in crate::quant) struct Q6K;

const QL_AT: usize = 0;
const QH_AT: usize = 128;
const SCALES_AT: usize = 192;
const D_AT: usize = 208;

/// Groups per super-block.
const GROUPS: usize = QK_K / 16;

impl BlockCodec for Q6K {
    const DTYPE: DType = DType::Q6K;

    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, D_AT);
        let ql = &block[QL_AT..QH_AT];
        let qh = &block[QH_AT..SCALES_AT];
        let scales = &block[SCALES_AT..D_AT];
        for (g, group) in out.chunks_exact_mut(16).enumerate() {
            let (h, s) = (g / 8, (g % 8) / 2);
            let first = 16 * (g % 2);
            let ql = &ql[64 * h + 32 * (s % 2) + first..][..16];
            let qh = &qh[32 * h + first..][..16];
            let dl = d * f32::from(scales[g] as i8);
            for ((y, &lo), &hi) in group.iter_mut().zip(ql).zip(qh) {
                let q = ((lo >> (4 * (s / 2))) & 0xF) | (((hi >> (2 * s)) & 3) << 4);
                *y = dl * (i32::from(q) - 32) as f32;
            }
        }
    }

    /// ggml's `quantize_row_q6_K_ref`: per group, [`symmetric_scale_search`] on
    /// levels -32..32; group scales are quantized to i8 against the one of largest
    /// magnitude (which maps to -128); levels are recomputed with the quantized
    /// scales.
    fn encode(x: &[f32], block: &mut [u8]) {
        let mut levels = [0u8; QK_K];
        let (scales, max_scale) =
            group_scales_16(x, &mut levels, |x, l| symmetric_scale_search(x, 32, l));
        if max_scale.abs() < GROUP_MAX_EPS {
            block.fill(0);
            return;
        }

        let iscale = -128.0 / max_scale;
        let d = write_f16(block, D_AT, 1.0 / iscale);
        for (g, &s) in scales.iter().enumerate() {
            // ggml clamps to 127 only; the largest magnitude lands on -128.
            block[SCALES_AT + g] = nearest_int(iscale * s).min(127) as i8 as u8;
        }
        let scales_q = &block[SCALES_AT..SCALES_AT + GROUPS];
        requantize_groups_16(
            x,
            &mut levels,
            |g| d * f32::from(scales_q[g] as i8),
            -32,
            31,
        );

        let (ql, rest) = block[QL_AT..SCALES_AT].split_at_mut(QH_AT - QL_AT);
        for (h, half) in levels.chunks_exact(128).enumerate() {
            let ql = &mut ql[64 * h..64 * h + 64];
            let qh = &mut rest[32 * h..32 * h + 32];
            for l in 0..32 {
                let q = [half[l], half[l + 32], half[l + 64], half[l + 96]];
                ql[l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
                ql[l + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
                qh[l] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
            }
        }
    }
}
