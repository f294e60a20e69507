//! The k-quants: 256-element super-blocks of 16 or 32-element sub-blocks, each
//! sub-block with its own quantized scale (and offset), the sub-block scales scaled
//! by one f16 (or f32) per super-block.
//!
//! Quantization follows ggml's reference quantizers (`quantize_row_q*_K_ref`), which
//! are also what `ggml_quantize_chunk` runs without an importance matrix: a scale
//! search per sub-block ([`search`]), then the sub-block scales are quantized and the
//! levels recomputed against the quantized scales.

mod q2_k;
mod q3_k;
mod q4_k_q5_k;
mod q6_k;
mod q8_k;
mod search;

pub(super) use q2_k::Q2K;
pub(super) use q3_k::Q3K;
pub(super) use q4_k_q5_k::{Q4K, Q5K};
pub(super) use q6_k::Q6K;
pub(super) use q8_k::Q8K;

use crate::quant::block::nearest_int;

/// Elements per super-block.
const QK_K: usize = crate::dtype::QK_K;

/// Sixteen-element groups per super-block (Q3_K, Q6_K).
const GROUPS_16: usize = QK_K / 16;

/// The symmetric formats' first step: `search` (a scale search over one 16-element
/// group, writing its levels) on every group of `x`. Returns the groups' scales and
/// the scale of largest magnitude (the first such on ties), which sets the
/// super-block's scale.
fn group_scales_16(
    x: &[f32],
    levels: &mut [u8; QK_K],
    search: impl Fn(&[f32], &mut [u8]) -> f32,
) -> ([f32; GROUPS_16], f32) {
    let mut scales = [0f32; GROUPS_16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for (g, scale) in scales.iter_mut().enumerate() {
        let range = 16 * g..16 * g + 16;
        *scale = search(&x[range.clone()], &mut levels[range]);
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    (scales, max_scale)
}

/// The symmetric formats' last step: each 16-element group's levels recomputed
/// against its quantized scale `group_scale(g)`, as `round(x / scale)` clamped to
/// `lo..=hi` and offset by `-lo`; groups whose scale is 0 keep their levels.
fn requantize_groups_16(
    x: &[f32],
    levels: &mut [u8; QK_K],
    group_scale: impl Fn(usize) -> f32,
    lo: i32,
    hi: i32,
) {
    for g in 0..GROUPS_16 {
        let dl = group_scale(g);
        if dl == 0.0 {
            continue;
        }
        let xg = &x[16 * g..16 * g + 16];
        for (l, &v) in levels[16 * g..16 * g + 16].iter_mut().zip(xg) {
            *l = (nearest_int(v / dl).clamp(lo, hi) - lo) as u8;
        }
    }
}

/// Packs 2-bit quants (values 0..=3) of a super-block the way Q2_K and Q3_K store
/// them: element `128 h + 32 s + l` (`h` in 0..2, `s` in 0..4, `l` in 0..32) goes to
/// bits `2 s .. 2 s + 2` of byte `32 h + l` of `qs` (64 bytes).
fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8]) {
    for (half, out) in levels.chunks_exact(128).zip(qs.chunks_exact_mut(32)) {
        for (l, byte) in out.iter_mut().enumerate() {
            *byte = half[l] | (half[l + 32] << 2) | (half[l + 64] << 4) | (half[l + 96] << 6);
        }
    }
}

/// The 16 bytes of `qs` and the bit shift that hold the 2-bit quants of 16-element
/// group `g` (elements `16 g .. 16 g + 16`, `g` in 0..16) in the layout of
/// [`pack_2bit`]: quant `16 g + k` is `(bytes[k] >> shift) & 3`.
#[inline]
fn two_bit_group(qs: &[u8], g: usize) -> (&[u8], u32) {
    let start = 32 * (g / 8) + 16 * (g % 2);
    (&qs[start..start + 16], 2 * ((g % 8) / 2) as u32)
}
