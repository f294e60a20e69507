//! Q2_K: 2-bit quants with a 4-bit scale and a 4-bit offset per 16 elements.

use super::search::{affine_scale_search, AffineSearch};
use super::{pack_2bit, two_bit_group, QK_K};
use crate::quant::block::{nearest_int, nearest_level, read_f16, write_f16, BlockCodec};
use crate::DType;

/// Q2_K: 256 elements in 16 groups of 16, 84 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                              |
/// |--------|--------------------------------------------------------------------|
/// | 0      | `scales[16]`: group `g`'s scale in the low nibble, its offset in the high nibble |
/// | 16     | `qs[64]`: 2-bit quants; element `128 h + 32 s + l` is bits `2 s .. 2 s + 2` of `qs[32 h + l]` |
/// | 80     | `d`: f16, multiplies the group scales                              |
/// | 82     | `dmin`: f16, multiplies the group offsets                          |
///
/// Value of element `e` in group `g = e / 16`:
/// `x = d * (scales[g] & 15) * q - dmin * (scales[g] >> 4)`.
pub(in crate::quant) struct Q2K;

const SCALES_AT: usize = 0;
const QS_AT: usize = 16;
const D_AT: usize = 80;
const DMIN_AT: usize = 82;

/// Groups per super-block.
const GROUPS: usize = QK_K / 16;
/// Largest quantized group scale or offset (4 bits).
const MAX_GROUP_SCALE: f32 = 15.0;

impl BlockCodec for Q2K {
    const DTYPE: DType = DType::Q2K;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, D_AT);
        let dmin = read_f16(block, DMIN_AT);
        let scales = &block[SCALES_AT..SCALES_AT + GROUPS];
        let qs = &block[QS_AT..D_AT];
        for (g, (group, &sc)) in out.chunks_exact_mut(16).zip(scales).enumerate() {
            let dl = d * f32::from(sc & 0xF);
            let ml = dmin * f32::from(sc >> 4);
            let (bytes, shift) = two_bit_group(qs, g);
            for (y, &byte) in group.iter_mut().zip(bytes) {
                // Shifted as i32, which vectorizes (bytes have no vector shifts).
                *y = dl * ((i32::from(byte) >> shift) & 3) as f32 - ml;
            }
        }
    }

    /// ggml's `quantize_row_q2_K_ref`: per group, [`affine_scale_search`] on 3
    /// levels weighted by `|x|` with absolute error; group scales and offsets are
    /// quantized to 4 bits against the largest of each; levels are recomputed with
    /// the quantized values.
    fn encode(x: &[f32], block: &mut [u8]) {
        let search = AffineSearch {
            nmax: 3,
            rmin: -0.5,
            rdelta: 0.1,
            steps: 15,
            absolute_error: true,
        };
        let mut levels = [0u8; QK_K];
        let weights: [f32; QK_K] = std::array::from_fn(|i| x[i].abs());
        let (scales, offsets) =
            affine_scale_search::<GROUPS, 16>(x, &weights, &search, &mut levels);
        let mut max_scale = 0.0f32;
        let mut max_offset = 0.0f32;
        for g in 0..GROUPS {
            if scales[g] > max_scale {
                max_scale = scales[g];
            }
            if offsets[g] > max_offset {
                max_offset = offsets[g];
            }
        }

        let packed = &mut block[SCALES_AT..SCALES_AT + GROUPS];
        packed.fill(0);
        let d = if max_scale > 0.0 {
            let iscale = MAX_GROUP_SCALE / max_scale;
            for (p, &s) in packed.iter_mut().zip(&scales) {
                *p = nearest_int(iscale * s) as u8;
            }
            max_scale / MAX_GROUP_SCALE
        } else {
            0.0
        };
        let dmin = if max_offset > 0.0 {
            let iscale = MAX_GROUP_SCALE / max_offset;
            for (p, &m) in packed.iter_mut().zip(&offsets) {
                *p |= (nearest_int(iscale * m) << 4) as u8;
            }
            max_offset / MAX_GROUP_SCALE
        } else {
            0.0
        };
        let d = write_f16(block, D_AT, d);
        let dmin = write_f16(block, DMIN_AT, dmin);

        for g in 0..GROUPS {
            let sc = block[SCALES_AT + g];
            let dl = d * f32::from(sc & 0xF);
            if dl == 0.0 {
                continue;
            }
            let ml = dmin * f32::from(sc >> 4);
            let xg = &x[16 * g..16 * g + 16];
            for (l, &v) in levels[16 * g..16 * g + 16].iter_mut().zip(xg) {
                *l = nearest_level((v + ml) / dl, 3) as u8;
            }
        }
        pack_2bit(&levels, &mut block[QS_AT..D_AT]);
    }
}
