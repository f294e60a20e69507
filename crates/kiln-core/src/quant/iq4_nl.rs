//! IQ4_NL: 4-bit indices into a fixed non-linear table of 16 levels, one f16 scale
//! per 32 elements.

use super::block::{read_f16, signed_absmax, write_f16, BlockCodec, GROUP_MAX_EPS};
use crate::DType;

/// The 16 levels an IQ4_NL index selects (ggml's `kvalues_iq4nl`), ascending.
pub const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL: 32 elements, 18 bytes.
///
/// Byte layout (little-endian):
///
/// | offset | field                                                            |
/// |--------|------------------------------------------------------------------|
/// | 0      | `d`: f16 scale                                                   |
/// | 2      | `qs[16]`: byte `j` holds index `i[j]` in its low nibble and `i[j + 16]` in its high nibble |
///
/// Value: `x[j] = d * IQ4_NL_LEVELS[i[j]]`.
pub(super) struct Iq4Nl;

/// Elements per block.
const QK: usize = 32;

/// Candidate scales tried on each side of the initial one.
const SCALE_TRIES: i32 = 7;

/// The index of the level nearest to `x` (the lower one on ties), as ggml's
/// `best_index_int8`.
fn nearest_level(x: f32) -> u8 {
    let level = |i: usize| f32::from(IQ4_NL_LEVELS[i]);
    let last = IQ4_NL_LEVELS.len() - 1;
    if x <= level(0) {
        return 0;
    }
    if x >= level(last) {
        return last as u8;
    }
    let (mut lo, mut hi) = (0, last);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < level(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - level(hi - 1) < level(hi) - x {
        (hi - 1) as u8
    } else {
        hi as u8
    }
}

/// `(sum w q x, sum w q^2)` over the block with `w = x^2` and `q` the level nearest
/// to `id * x`.
fn weighted_sums(x: &[f32], id: f32) -> (f32, f32) {
    let mut sumqx = 0.0f32;
    let mut sumq2 = 0.0f32;
    for &v in x {
        let q = f32::from(IQ4_NL_LEVELS[usize::from(nearest_level(id * v))]);
        let w = v * v;
        sumqx += w * q * v;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The block scale of ggml's `quantize_iq4_nl` without importance weights: the
/// least-squares scale (weights `x^2`) for the levels nearest to `x / d` with
/// `d = max / 127`, then for inverse scales `(k - 127) / max`, `k` in -7..=7,
/// keeping the best. `max` is the element of largest magnitude.
fn search_scale(x: &[f32]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let lowest = i32::from(IQ4_NL_LEVELS[0]);
    let d = -max / lowest as f32;
    let (sumqx, sumq2) = weighted_sums(x, 1.0 / d);
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for k in -SCALE_TRIES..=SCALE_TRIES {
        let id = (k + lowest) as f32 / max;
        let (sumqx, sumq2) = weighted_sums(x, id);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

impl BlockCodec for Iq4Nl {
    const DTYPE: DType = DType::IQ4NL;

    #[inline(always)]
    fn decode(block: &[u8], out: &mut [f32]) {
        let d = read_f16(block, 0);
        let (low_half, high_half) = out.split_at_mut(QK / 2);
        for ((&byte, lo), hi) in block[2..].iter().zip(low_half).zip(high_half) {
            *lo = d * f32::from(IQ4_NL_LEVELS[usize::from(byte & 0xF)]);
            *hi = d * f32::from(IQ4_NL_LEVELS[usize::from(byte >> 4)]);
        }
    }

    /// ggml's `quantize_iq4_nl` (what `ggml_quantize_chunk` runs) without an
    /// importance matrix: [`search_scale`], then each element takes the level
    /// nearest to `x / d` (with the unrounded `d`; an all-zero block gets index 8,
    /// the level nearest to 0, and `d = 0`).
    fn encode(x: &[f32], block: &mut [u8]) {
        let d = search_scale(x);
        write_f16(block, 0, d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (low_half, high_half) = x.split_at(QK / 2);
        for ((byte, &lo), &hi) in block[2..].iter_mut().zip(low_half).zip(high_half) {
            *byte = nearest_level(id * lo) | (nearest_level(id * hi) << 4);
        }
    }
}
