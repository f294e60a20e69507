//! F32, F16 and BF16: little-endian IEEE binary32, binary16 and bfloat16.

use crate::DType;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Converts little-endian `dtype` values (F32, F16 or BF16) to f32. Lengths are
/// checked by the caller.
#[inline(always)]
pub(super) fn to_f32(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            // Aligned input (the usual case): `half` converts with F16C where the CPU has it.
            Ok(halves) if cfg!(target_endian = "little") => halves.convert_to_f32_slice(dst),
            _ => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
        },
        _ => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
    }
}

/// Stores f32 values as little-endian `dtype` (F32, F16 or BF16), rounding to
/// nearest even. Lengths are checked by the caller.
pub(super) fn from_f32(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::F16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f16::from_f32(*s).to_le_bytes());
            }
        }
        _ => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16::from_f32(*s).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_the_same_aligned_or_not() {
        // Values with exact f16 forms, including a subnormal, infinity and negative zero.
        let values = [
            1.0f32,
            -2.5,
            65504.0,
            5.96e-8,
            f32::INFINITY,
            -0.0,
            0.333_251_95,
            1024.5,
        ];
        let halves: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&halves);
        let (mut aligned, mut unaligned) = ([0f32; 8], [0f32; 8]);
        to_f32(DType::F16, &halves, &mut aligned);
        to_f32(DType::F16, &shifted[1..], &mut unaligned);
        let want: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(
            aligned.map(f32::to_bits).to_vec(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(aligned.map(f32::to_bits), unaligned.map(f32::to_bits));
    }
}
