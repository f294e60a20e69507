//! What every block format shares: the per-block codec trait, the row drivers that
//! apply it block by block, and the scalar helpers of ggml's reference quantizers.

use crate::DType;
use half::f16;

/// One GGML block format: how one block's bytes decode to floats and how floats
/// encode to one block.
pub(super) trait BlockCodec {
    /// The dtype whose blocks this codec reads and writes.
    const DTYPE: DType;

    /// Decodes one block of `DTYPE.block_bytes()` bytes into `DTYPE.block_size()`
    /// floats. The caller passes slices of exactly those lengths.
    fn decode(block: &[u8], out: &mut [f32]);

    /// Encodes `DTYPE.block_size()` finite floats into one block of
    /// `DTYPE.block_bytes()` bytes, overwriting every byte. The caller passes slices
    /// of exactly those lengths.
    fn encode(x: &[f32], block: &mut [u8]);
}

/// Decodes whole blocks of `C` from `src` into `dst`. Lengths are checked by the
/// caller: `src` holds exactly the blocks that `dst` receives. Inlined into
/// [`super::dequantize`]'s copies (baseline and AVX2), with each codec's `decode`.
#[inline(always)]
pub(super) fn decode_blocks<C: BlockCodec>(src: &[u8], dst: &mut [f32]) {
    let blocks = src.chunks_exact(C::DTYPE.block_bytes());
    for (block, out) in blocks.zip(dst.chunks_exact_mut(C::DTYPE.block_size())) {
        C::decode(block, out);
    }
}

/// Encodes `src` into whole blocks of `C` in `dst`. Lengths are checked by the
/// caller.
pub(super) fn encode_blocks<C: BlockCodec>(src: &[f32], dst: &mut [u8]) {
    let blocks = dst.chunks_exact_mut(C::DTYPE.block_bytes());
    for (block, x) in blocks.zip(src.chunks_exact(C::DTYPE.block_size())) {
        C::encode(x, block);
    }
}

/// Below this magnitude ggml's quantizers treat a group of values as all zeros.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// Reads the little-endian f16 at byte `at` of `bytes` as f32.
#[inline(always)]
pub(super) fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Stores `value` rounded to the nearest f16 (ties to even) at byte `at` of `bytes`
/// and returns the stored value as f32.
#[inline]
pub(super) fn write_f16(bytes: &mut [u8], at: usize, value: f32) -> f32 {
    let half = f16::from_f32(value);
    bytes[at..at + 2].copy_from_slice(&half.to_le_bytes());
    half.to_f32()
}

/// `x` rounded to an integer, ties to even, for |x| < 2^22: `x + 1.5 * 2^23` lies in
/// [2^23, 2^24), where f32 steps by 1, so the addition itself rounds and the
/// subtraction is exact. The same value as `round_ties_even` in two instructions,
/// where that is a libm call on x86-64 without SSE4.1.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Rounds to the nearest integer, ties to even: ggml's `nearest_int`, which is exact
/// for |x| < 2^22 (the range its quantizers use, where [`round_small`] does it).
/// Out-of-range values saturate.
#[inline]
pub(super) fn nearest_int(x: f32) -> i32 {
    if x.abs() < 4_194_304.0 {
        round_small(x) as i32
    } else {
        x.round_ties_even() as i32
    }
}

/// `nearest_int(t).clamp(0, nmax)` as an f32 level, for every f32 `t` (NaN gives 0)
/// and `nmax < 2^21`: `t` is first brought into `[-1, nmax + 1]`, which changes no
/// result, and there [`round_small`] rounds it; the clamps are single
/// compare-and-selects, so a loop over lanes needs no branch and no integer
/// conversion.
#[inline]
pub(super) fn nearest_level(t: f32, nmax: i32) -> f32 {
    let top = nmax as f32;
    // `a > b ? a : b` and `a < b ? a : b`: a NaN `t` becomes -1, then level 0.
    let t = if t > -1.0 { t } else { -1.0 };
    let t = if t < top + 1.0 { t } else { top + 1.0 };
    let r = round_small(t);
    let r = if r > 0.0 { r } else { 0.0 };
    if r < top {
        r
    } else {
        top
    }
}

/// The element of `x` with the largest magnitude (the first one on ties), and that
/// magnitude; `(0.0, 0.0)` for an empty or all-zero slice.
#[inline]
pub(super) fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

#[cfg(test)]
mod tests {
    use super::nearest_int;

    /// The fast path agrees with `round_ties_even` (saturating to i32) on ties, on
    /// both sides of its 2^22 bound, on values it does not take, and on a dense sweep.
    #[test]
    fn nearest_int_rounds_half_to_even_everywhere() {
        let want = |x: f32| x.round_ties_even() as i32;
        let mut cases = vec![
            0.0,
            -0.0,
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999997,
            4_194_303.5,
            -4_194_303.5,
            4_194_304.0,
            4_194_305.0,
            1e10,
            -1e10,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ];
        let mut v = -70.0f32;
        while v < 70.0 {
            cases.push(v);
            v += 0.0625 + 1e-4;
        }
        cases.extend((0..4096).map(|i| f32::from_bits(0x3f00_0000 + 977 * i)));
        for x in cases {
            assert_eq!(nearest_int(x), want(x), "{x:e}");
        }
    }
}
