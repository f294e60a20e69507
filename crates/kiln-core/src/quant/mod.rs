//! The element formats' byte layouts: conversion of every dtype's bytes to f32
//! (dequantization) and back (quantization).
//!
//! This module is the one definition of each format in the workspace: the CPU
//! backend, the GGUF reader and the tests all use it, and every GPU kernel is tested
//! against it. Block formats are bit-exact with ggml's layouts (little-endian), and
//! quantization reproduces ggml's reference quantizers (what `ggml_quantize_chunk`
//! writes without an importance matrix), byte for byte on the same input.
//!
//! - `legacy.rs`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (32-element blocks);
//! - `kquants/`: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K (256-element super-blocks);
//! - `iq4_nl.rs`: IQ4_NL (32-element blocks, non-linear levels);
//! - `lowbit.rs`: Q1_0 (128-element blocks of signs) and Q2_0 (64-element blocks of
//!   four levels);
//! - `ternary.rs`: TQ1_0 and TQ2_0 (256-element blocks of trits);
//! - `mxfp4.rs`: MXFP4 (32 E2M1 values with an E8M0 exponent).
//!
//! Each block struct's doc comment gives its byte layout and the value of each
//! element.

mod block;
mod float;
mod iq4_nl;
mod kquants;
mod legacy;
mod lowbit;
mod mxfp4;
mod ternary;

use crate::{DType, Error, Result};
use block::{decode_blocks, encode_blocks};

pub use iq4_nl::IQ4_NL_LEVELS;
pub use mxfp4::{e8m0_half, MXFP4_LEVELS};

/// Converts `dst.len()` elements stored as `dtype` in `src` to f32.
///
/// `src` must hold exactly `dtype.bytes_for(dst.len())` bytes (so `dst.len()` is a
/// whole number of blocks).
///
/// On x86-64 CPUs with AVX2 and F16C the same code runs compiled for them (wider
/// vectors, one-instruction f16 conversions): the same operations, so the same values.
pub fn dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_lengths("dequantize", dtype, src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C (checked just above).
        return unsafe { decode_avx2(dtype, src, dst) };
    }
    decode(dtype, src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_avx2(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    decode(dtype, src, dst)
}

/// [`dequantize`] after its length check.
#[inline(always)]
fn decode(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => float::to_f32(dtype, src, dst),
        DType::Q4_0 => decode_blocks::<legacy::Q4_0>(src, dst),
        DType::Q4_1 => decode_blocks::<legacy::Q4_1>(src, dst),
        DType::Q5_0 => decode_blocks::<legacy::Q5_0>(src, dst),
        DType::Q5_1 => decode_blocks::<legacy::Q5_1>(src, dst),
        DType::Q8_0 => decode_blocks::<legacy::Q8_0>(src, dst),
        DType::Q8_1 => decode_blocks::<legacy::Q8_1>(src, dst),
        DType::Q2K => decode_blocks::<kquants::Q2K>(src, dst),
        DType::Q3K => decode_blocks::<kquants::Q3K>(src, dst),
        DType::Q4K => decode_blocks::<kquants::Q4K>(src, dst),
        DType::Q5K => decode_blocks::<kquants::Q5K>(src, dst),
        DType::Q6K => decode_blocks::<kquants::Q6K>(src, dst),
        DType::Q8K => decode_blocks::<kquants::Q8K>(src, dst),
        DType::IQ4NL => decode_blocks::<iq4_nl::Iq4Nl>(src, dst),
        DType::Q1_0 => decode_blocks::<lowbit::Q1_0>(src, dst),
        DType::Q2_0 => decode_blocks::<lowbit::Q2_0>(src, dst),
        DType::TQ1_0 => decode_blocks::<ternary::Tq1_0>(src, dst),
        DType::TQ2_0 => decode_blocks::<ternary::Tq2_0>(src, dst),
        DType::MXFP4 => decode_blocks::<mxfp4::Mxfp4>(src, dst),
        DType::I32 | DType::U32 | DType::U8 => {
            return Err(Error::Unsupported(format!("dequantization of {dtype}")))
        }
    }
    Ok(())
}

/// Stores the f32 values of `src` as `dtype` in `dst`.
///
/// `dst` must hold exactly `dtype.bytes_for(src.len())` bytes. Block formats need
/// finite values (a NaN or infinity is an error naming its index); a value so large
/// that a block's f16 scale overflows encodes as infinities, as in ggml.
pub fn quantize(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_lengths("quantize", dtype, dst.len(), src.len())?;
    if dtype.is_quantized() {
        check_finite(dtype, src)?;
    }
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => float::from_f32(dtype, src, dst),
        DType::Q4_0 => encode_blocks::<legacy::Q4_0>(src, dst),
        DType::Q4_1 => encode_blocks::<legacy::Q4_1>(src, dst),
        DType::Q5_0 => encode_blocks::<legacy::Q5_0>(src, dst),
        DType::Q5_1 => encode_blocks::<legacy::Q5_1>(src, dst),
        DType::Q8_0 => encode_blocks::<legacy::Q8_0>(src, dst),
        DType::Q8_1 => encode_blocks::<legacy::Q8_1>(src, dst),
        DType::Q2K => encode_blocks::<kquants::Q2K>(src, dst),
        DType::Q3K => encode_blocks::<kquants::Q3K>(src, dst),
        DType::Q4K => encode_blocks::<kquants::Q4K>(src, dst),
        DType::Q5K => encode_blocks::<kquants::Q5K>(src, dst),
        DType::Q6K => encode_blocks::<kquants::Q6K>(src, dst),
        DType::Q8K => encode_blocks::<kquants::Q8K>(src, dst),
        DType::IQ4NL => encode_blocks::<iq4_nl::Iq4Nl>(src, dst),
        DType::Q1_0 => encode_blocks::<lowbit::Q1_0>(src, dst),
        DType::Q2_0 => encode_blocks::<lowbit::Q2_0>(src, dst),
        DType::TQ1_0 => encode_blocks::<ternary::Tq1_0>(src, dst),
        DType::TQ2_0 => encode_blocks::<ternary::Tq2_0>(src, dst),
        DType::MXFP4 => encode_blocks::<mxfp4::Mxfp4>(src, dst),
        DType::I32 | DType::U32 | DType::U8 => {
            return Err(Error::Unsupported(format!("quantization to {dtype}")))
        }
    }
    Ok(())
}

fn check_finite(dtype: DType, src: &[f32]) -> Result<()> {
    match src.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            "quantize",
            format!(
                "element {i} is {}; {dtype} encodes finite values only",
                src[i]
            ),
        )),
    }
}

fn check_lengths(op: &str, dtype: DType, bytes: usize, elements: usize) -> Result<()> {
    let expected = dtype
        .bytes_for(elements)
        .map_err(|e| Error::invalid(op, e.to_string()))?;
    if bytes != expected {
        return Err(Error::invalid(
            op,
            format!("{elements} elements of {dtype} take {expected} bytes, got {bytes}"),
        ));
    }
    Ok(())
}

#[cfg(all(test, target_arch = "x86_64"))]
mod avx2_tests {
    use super::{decode, decode_avx2};
    use crate::DType;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The AVX2 copy of the decoders gives the baseline's bits for random bytes of
    /// every format (NaN and infinite scales included): the compiler's wider vectors
    /// may not change a value.
    #[test]
    fn the_avx2_copy_decodes_every_format_as_the_baseline() {
        assert!(
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c"),
            "this test compares the AVX2 copy with the baseline: it needs a CPU with AVX2 and F16C"
        );
        let mut rng = StdRng::seed_from_u64(7);
        let mut compared = 0;
        for dtype in DType::ALL {
            let n = 1024.max(dtype.block_size());
            let Ok(bytes) = dtype.bytes_for(n) else {
                continue;
            };
            let src: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
            let mut baseline = vec![0f32; n];
            if decode(dtype, &src, &mut baseline).is_err() {
                continue; // not a format with values (I32, U32, U8)
            }
            let mut avx2 = vec![0f32; n];
            // SAFETY: the CPU has AVX2 and F16C (asserted above).
            unsafe { decode_avx2(dtype, &src, &mut avx2) }.unwrap();
            for (i, (a, b)) in avx2.iter().zip(&baseline).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{dtype} element {i}: {a} against {b}"
                );
            }
            compared += 1;
        }
        assert_eq!(compared, 21, "formats compared");
    }
}
