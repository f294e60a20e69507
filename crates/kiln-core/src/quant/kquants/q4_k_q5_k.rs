//! Q4_K and Q5_K: 4- or 5-bit unsigned quants with a 6-bit scale and a 6-bit offset
//! per 32 elements. The two formats differ only in the fifth bit plane.

use super::search::{affine_scale_search, AffineSearch};
use super::QK_K;
use crate::quant::block::{nearest_int, nearest_level, read_f16, write_f16, BlockCodec};
use crate::DType;

/// Q4_K (`BITS` = 4, 144 bytes) and Q5_K (`BITS` = 5, 176 bytes): 256 elements in 8
/// groups of 32.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                              |
/// |--------|--------------------------------------------------------------------|
/// | 0      | `d`: f16, multiplies the group scales                              |
/// | 2      | `dmin`: f16, multiplies the group offsets                          |
/// | 4      | `scales[12]`: 8 6-bit group scales `sc[g]` and offsets `m[g]` (below) |
/// | 16     | `qh[32]` (Q5_K only): bit 4 of quant `e` is bit `e / 32` of `qh[e % 32]` |
/// | 16 or 48 | `qs[128]`: bits 0-3 of the quants; element `64 c + l` (`l` < 32) in the low nibble of `qs[32 c + l]`, element `64 c + 32 + l` in the high nibble |
///
/// Scale packing: for `g < 4`, `sc[g]` is bits 0-5 of `scales[g]` and `m[g]` bits
/// 0-5 of `scales[g + 4]`; for `g >= 4`, bits 0-3 of `sc[g]` and `m[g]` are the low
/// and high nibble of `scales[g + 4]`, and their bits 4-5 are bits 6-7 of
/// `scales[g - 4]` and `scales[g]`.
///
/// Value of element `e` in group `g = e / 32`: `x = d * sc[g] * q - dmin * m[g]`.
pub(in crate::quant) struct AffineGroups<const BITS: u32>;

/// Q4_K: 4-bit quants.
pub(in crate::quant) type Q4K = AffineGroups<4>;
/// Q5_K: 5-bit quants.
pub(in crate::quant) type Q5K = AffineGroups<5>;

const D_AT: usize = 0;
const DMIN_AT: usize = 2;
const SCALES_AT: usize = 4;
/// Byte offset of `qh` in Q5_K, of `qs` in Q4_K.
const AFTER_SCALES: usize = 16;

/// Groups per super-block.
const GROUPS: usize = QK_K / 32;
/// Largest quantized group scale or offset (6 bits).
const MAX_GROUP_SCALE: f32 = 63.0;

/// Group `g`'s 6-bit scale and offset from the 12 packed bytes.
fn scale_and_offset(packed: &[u8], g: usize) -> (u8, u8) {
    if g < 4 {
        (packed[g] & 63, packed[g + 4] & 63)
    } else {
        (
            (packed[g + 4] & 0xF) | ((packed[g - 4] >> 6) << 4),
            (packed[g + 4] >> 4) | ((packed[g] >> 6) << 4),
        )
    }
}

/// Packs 8 6-bit scales and offsets (0..64) into 12 bytes, the inverse of
/// [`scale_and_offset`].
fn pack_scales_and_offsets(scales: &[u8; GROUPS], offsets: &[u8; GROUPS], packed: &mut [u8]) {
    for g in 0..GROUPS {
        let (s, m) = (scales[g], offsets[g]);
        if g < 4 {
            packed[g] = s;
            packed[g + 4] = m;
        } else {
            packed[g + 4] = (s & 0xF) | ((m & 0xF) << 4);
            packed[g - 4] |= (s >> 4) << 6;
            packed[g] |= (m >> 4) << 6;
        }
    }
}

impl<const BITS: u32> AffineGroups<BITS> {
    /// Group `g`'s 32 values `dl * q - ml` (`(dl, ml)` = `scaled`): bits 0-3 of `q`
    /// are the low or the `HIGH` nibble of `bytes`, bit 4 (5-bit formats) bit `g` of
    /// `qh`. The nibble is chosen at compile time and `qh`'s bit by a mask, so that
    /// the loop vectorizes.
    #[inline(always)]
    fn decode_group<const HIGH: bool>(
        bytes: &[u8],
        qh: &[u8],
        g: usize,
        (dl, ml): (f32, f32),
        out: &mut [f32],
    ) {
        let bit = 1u8 << g;
        for ((y, &b), &h) in out.iter_mut().zip(bytes).zip(qh) {
            let mut q = if HIGH { b >> 4 } else { b & 0xF };
            if BITS == 5 && h & bit != 0 {
                q |= 0x10;
            }
            *y = dl * f32::from(q) - ml;
        }
    }

    /// Byte offset of `qs`.
    const QS_AT: usize = AFTER_SCALES + if BITS == 5 { 32 } else { 0 };
    /// ggml's search parameters for this width.
    const SEARCH: AffineSearch = if BITS == 5 {
        AffineSearch {
            nmax: 31,
            rmin: -0.5,
            rdelta: 0.1,
            steps: 15,
            absolute_error: false,
        }
    } else {
        AffineSearch {
            nmax: 15,
            rmin: -1.0,
            rdelta: 0.1,
            steps: 20,
            absolute_error: false,
        }
    };

    /// Stores the levels (0..2^BITS) into `qs` and, for Q5_K, `qh`.
    fn pack_levels(levels: &[u8; QK_K], block: &mut [u8]) {
        let mut qh = [0u8; 32];
        let qs = &mut block[Self::QS_AT..Self::QS_AT + QK_K / 2];
        for (c, (chunk, out)) in levels
            .chunks_exact(64)
            .zip(qs.chunks_exact_mut(32))
            .enumerate()
        {
            for l in 0..32 {
                let (lo, hi) = (chunk[l], chunk[l + 32]);
                out[l] = (lo & 0xF) | ((hi & 0xF) << 4);
                qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
        if BITS == 5 {
            block[AFTER_SCALES..AFTER_SCALES + 32].copy_from_slice(&qh);
        }
    }
}

impl<const BITS: u32> BlockCodec for AffineGroups<BITS> {
    const DTYPE: DType = match BITS {
        4 => DType::Q4K,
        5 => DType::Q5K,
        // Evaluated at compile time: instantiating other widths fails to build.
        _ => panic!("AffineGroups exists for 4 and 5 bits only"),
    };

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, D_AT);
        let dmin = read_f16(block, DMIN_AT);
        let packed = &block[SCALES_AT..AFTER_SCALES];
        let qh = &block[AFTER_SCALES..AFTER_SCALES + 32];
        let qs = &block[Self::QS_AT..Self::QS_AT + QK_K / 2];
        // Groups 2p and 2p + 1 take the low and the high nibbles of `qs[32 p..32 p + 32]`.
        for (p, (pair, bytes)) in out
            .chunks_exact_mut(64)
            .zip(qs.chunks_exact(32))
            .enumerate()
        {
            let (low, high) = pair.split_at_mut(32);
            let scaled = |g: usize| {
                let (sc, m) = scale_and_offset(packed, g);
                (d * f32::from(sc), dmin * f32::from(m))
            };
            Self::decode_group::<false>(bytes, qh, 2 * p, scaled(2 * p), low);
            Self::decode_group::<true>(bytes, qh, 2 * p + 1, scaled(2 * p + 1), high);
        }
    }

    /// ggml's `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: per group,
    /// [`affine_scale_search`] weighted by `rms(group) + |x|`; group scales and
    /// offsets are quantized to 6 bits against the largest of each; levels are
    /// recomputed with the quantized values.
    fn encode(x: &[f32], block: &mut [u8]) {
        let mut levels = [0u8; QK_K];
        let mut weights = [0f32; QK_K];
        for (xg, wg) in x.chunks_exact(32).zip(weights.chunks_exact_mut(32)) {
            let sum_x2 = xg.iter().fold(0.0f32, |s, v| s + v * v);
            let rms = (sum_x2 / 32.0).sqrt();
            for (w, v) in wg.iter_mut().zip(xg) {
                *w = rms + v.abs();
            }
        }
        let (scales, offsets) =
            affine_scale_search::<GROUPS, 32>(x, &weights, &Self::SEARCH, &mut levels);
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

        let inv_scale = if max_scale > 0.0 {
            MAX_GROUP_SCALE / max_scale
        } else {
            0.0
        };
        let inv_offset = if max_offset > 0.0 {
            MAX_GROUP_SCALE / max_offset
        } else {
            0.0
        };
        // ggml stores the rounded values in a uint8_t before the clamp to 63.
        let quantize = |v: f32, inv: f32| (nearest_int(inv * v) as u8).min(63);
        let qscales = scales.map(|s| quantize(s, inv_scale));
        let qoffsets = offsets.map(|m| quantize(m, inv_offset));
        pack_scales_and_offsets(&qscales, &qoffsets, &mut block[SCALES_AT..AFTER_SCALES]);
        let d = write_f16(block, D_AT, max_scale / MAX_GROUP_SCALE);
        let dmin = write_f16(block, DMIN_AT, max_offset / MAX_GROUP_SCALE);

        let nmax = Self::SEARCH.nmax;
        for g in 0..GROUPS {
            let dl = d * f32::from(qscales[g]);
            if dl == 0.0 {
                continue;
            }
            let ml = dmin * f32::from(qoffsets[g]);
            let xg = &x[32 * g..32 * g + 32];
            for (l, &v) in levels[32 * g..32 * g + 32].iter_mut().zip(xg) {
                *l = nearest_level((v + ml) / dl, nmax) as u8;
            }
        }
        Self::pack_levels(&levels, block);
    }
}
