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

/// Run `S` (32 elements, groups of scale `scales[0]` then `scales[1]`) of a half
/// super-block from its 32 `ql` bytes and the half's 32 `qh` bytes: bits 0-3 of a
/// quant are nibble `S / 2` of its `ql` byte, bits 4-5 bits `2 S .. 2 S + 2` of its
/// `qh` byte (constant shifts, so that the loop vectorizes).
#[inline(always)]
fn decode_run<const S: u32>(ql: &[u8], qh: &[u8], scales: [f32; 2], run: &mut [f32]) {
    let groups = run
        .chunks_exact_mut(16)
        .zip(ql.chunks_exact(16).zip(qh.chunks_exact(16)));
    for ((group, (ql, qh)), dl) in groups.zip(scales) {
        for ((y, &lo), &hi) in group.iter_mut().zip(ql).zip(qh) {
            let q = ((lo >> (4 * (S / 2))) & 0xF) | (((hi >> (2 * S)) & 3) << 4);
            *y = dl * (i32::from(q) - 32) as f32;
        }
    }
}

/// Groups per super-block.
const GROUPS: usize = QK_K / 16;

impl BlockCodec for Q6K {
    const DTYPE: DType = DType::Q6K;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, D_AT);
        // Each half `h` of 128 elements is four runs of 32 (`s` in 0..4) of two groups.
        for (h, half) in out.chunks_exact_mut(128).enumerate() {
            let ql = &block[QL_AT + 64 * h..][..64];
            let qh = &block[QH_AT + 32 * h..][..32];
            let scale =
                |s: usize, p: usize| d * f32::from(block[SCALES_AT + 8 * h + 2 * s + p] as i8);
            let (run0, rest) = half.split_at_mut(32);
            let (run1, rest) = rest.split_at_mut(32);
            let (run2, run3) = rest.split_at_mut(32);
            decode_run::<0>(&ql[..32], qh, [scale(0, 0), scale(0, 1)], run0);
            decode_run::<1>(&ql[32..], qh, [scale(1, 0), scale(1, 1)], run1);
            decode_run::<2>(&ql[..32], qh, [scale(2, 0), scale(2, 1)], run2);
            decode_run::<3>(&ql[32..], qh, [scale(3, 0), scale(3, 1)], run3);
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
