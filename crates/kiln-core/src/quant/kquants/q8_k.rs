//! Q8_K: 8-bit signed quants with an f32 scale per 256 elements and group sums,
//! the format ggml quantizes activations to for k-quant dot products.

use super::QK_K;
use crate::quant::block::{nearest_int, signed_absmax, BlockCodec};
use crate::DType;

/// Q8_K: 256 elements, 292 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                  |
/// |--------|--------------------------------------------------------|
/// | 0      | `d`: f32 scale                                         |
/// | 4      | `qs[256]`: i8 quants                                   |
/// | 260    | `bsums[16]`: i16, `bsums[g] = sum(qs[16 g .. 16 g + 16])` |
///
/// Value: `x[e] = d * qs[e]`. The sums serve dot products; decoding ignores them.
pub(in crate::quant) struct Q8K;

const D_AT: usize = 0;
const QS_AT: usize = 4;
const BSUMS_AT: usize = QS_AT + QK_K;

impl BlockCodec for Q8K {
    const DTYPE: DType = DType::Q8K;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        for (y, &q) in out.iter_mut().zip(&block[QS_AT..BSUMS_AT]) {
            *y = d * f32::from(q as i8);
        }
    }

    /// ggml's `quantize_row_q8_K_ref`: `d = -max / 127` where `max` is the element
    /// of largest magnitude, `q = min(127, round(x / d))` (ties to even); an
    /// all-zero block is all zero bytes.
    fn encode(x: &[f32], block: &mut [u8]) {
        let (max, amax) = signed_absmax(x);
        if amax == 0.0 {
            block.fill(0);
            return;
        }
        let iscale = -127.0 / max;
        let (qs, bsums) = block[QS_AT..].split_at_mut(QK_K);
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8 as u8;
        }
        for (sum, group) in bsums.chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
            let s: i16 = group.iter().map(|&q| i16::from(q as i8)).sum();
            sum.copy_from_slice(&s.to_le_bytes());
        }
        block[D_AT..QS_AT].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}
