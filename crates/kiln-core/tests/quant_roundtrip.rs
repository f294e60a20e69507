//! Quantize -> dequantize on seeded random data: error bounds per format, special
//! rows (outlier, constant, zeros), and argument errors.
//!
//! Bounds are relative RMSE, `sqrt(mean((x - y)^2)) / sqrt(mean(x^2))`. Each is a
//! little above what ggml's own reference quantizer reaches on N(0, 1) data (see
//! docs/quantization.md: kiln writes the same bytes, so it reaches the same error),
//! with room for this test's smaller sample.

use kiln_core::{quant, DType, Error};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Elements per row: two k-quant super-blocks, 32 legacy blocks.
const COLS: usize = 1024;

/// Relative RMSE bound on N(0, 1) rows, per format, with the reason for its size.
/// An ideal uniform quantizer with step `s` has RMS error `s / sqrt(12)`; for a
/// block of 32 N(0, 1) values the largest magnitude is about 2.1-2.5.
fn gaussian_bound(dtype: DType) -> f64 {
    match dtype {
        // Step max/8 ~ 0.29: ~0.084 ideal; ggml measures 0.0859.
        DType::Q4_0 => 0.095,
        // Step (max - min)/15 ~ 0.28: ~0.080 ideal; ggml 0.0782.
        DType::Q4_1 => 0.087,
        // Step max/16: half of Q4_0's; ggml 0.0427.
        DType::Q5_0 => 0.048,
        // Step (max - min)/31: ggml 0.0379.
        DType::Q5_1 => 0.042,
        // Step max/127 ~ 0.018: ~0.0052 ideal; ggml 0.00536.
        DType::Q8_0 | DType::Q8_1 => 0.006,
        // Four levels per 16 values with 4-bit scales: ggml 0.296.
        DType::Q2K => 0.32,
        // Eight levels per 16 values with 6-bit scales: ggml 0.151.
        DType::Q3K => 0.165,
        // 16 levels per 32 values with searched scale and offset: ggml 0.0714.
        DType::Q4K => 0.079,
        // 32 levels per 32 values: ggml 0.0361.
        DType::Q5K => 0.040,
        // 64 levels per 16 values with searched scale: ggml 0.0177.
        DType::Q6K => 0.020,
        // One scale per 256 values (max ~ 3): step ~ 0.024, ggml 0.00696.
        DType::Q8K => 0.0078,
        // 16 non-linear levels per 32 values, searched scale: ggml 0.0762.
        DType::IQ4NL => 0.085,
        // One magnitude per 128 values, the mean |x|: sqrt(1 - 2/pi) = 0.603 ideal;
        // ggml 0.6006.
        DType::Q1_0 => 0.62,
        // Levels -d, 0, d with d the largest of 64 values (~2.4): most values round
        // to 0; ggml 0.7185.
        DType::Q2_0 => 0.74,
        // Trits with d the largest of 256 values (~2.9): ggml 0.8077 over a
        // million values; a sample of two blocks (512 values) spreads wider.
        DType::TQ1_0 | DType::TQ2_0 => 0.86,
        // E2M1 levels with a power-of-two scale per 32 values, the top values
        // clipped to 1.5 * 2^floor(log2 max): ggml 0.1148.
        DType::MXFP4 => 0.125,
        other => panic!("{other} is not a block format"),
    }
}

/// The largest relative error of a value that is its block's extreme (a lone
/// outlier, or a constant), with the reason.
fn extreme_value_bound(dtype: DType) -> Option<f32> {
    match dtype {
        // One magnitude per block, the mean |x|: an extreme value is not kept.
        DType::Q1_0 => None,
        // The largest level is 1.5 * 2^floor(log2 max) and the levels below it are
        // 1, 2/3, 1/2 ... of it: a block extreme may come back up to 25% off.
        DType::MXFP4 => Some(0.25),
        // Every other format maps its block extreme to a level exactly, up to the
        // rounding of its scale: f16 (relative 2^-11), and for the k-quants also
        // the 6-bit sub-block scale and offset against the f16 super-block ones
        // (measured at most 1.1e-3 for Q5_K at 0.02). 2^-8 leaves room for that.
        _ => Some(1.0 / 256.0),
    }
}

fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

fn round_trip(dtype: DType, x: &[f32]) -> Vec<f32> {
    let mut q = vec![0u8; dtype.bytes_for(x.len()).unwrap()];
    quant::quantize(dtype, x, &mut q).unwrap();
    let mut y = vec![f32::NAN; x.len()];
    quant::dequantize(dtype, &q, &mut y).unwrap();
    y
}

fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let (err, norm) = x.iter().zip(y).fold((0.0f64, 0.0f64), |(e, n), (&a, &b)| {
        let d = f64::from(a) - f64::from(b);
        (e + d * d, n + f64::from(a) * f64::from(a))
    });
    (err / norm).sqrt()
}

#[test]
fn gaussian_rows_stay_within_each_formats_bound() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = gaussian(&mut rng, 8 * COLS);
    for dtype in DType::block_formats() {
        let y = round_trip(dtype, &x);
        let err = relative_rmse(&x, &y);
        let bound = gaussian_bound(dtype);
        assert!(err < bound, "{dtype}: relative RMSE {err:.5} >= {bound}");
        // A vacuous quantizer (all zeros) has error 1; a real one is far below.
        assert!(
            err > 0.0,
            "{dtype}: lossless on Gaussian data is implausible"
        );
    }
}

#[test]
fn scaled_rows_have_the_same_relative_error() {
    // Block scales follow the data: rows of N(0, 0.02^2) (the spread of LLM weights)
    // and N(0, 300^2) quantize with the same bound as N(0, 1). (Much smaller data
    // pushes the k-quants' f16 super-block scales into f16's subnormal range and
    // loses precision there, as in ggml: see docs/quantization.md.)
    let mut rng = StdRng::seed_from_u64(2);
    let base = gaussian(&mut rng, 4 * COLS);
    for scale in [0.02f32, 300.0] {
        let x: Vec<f32> = base.iter().map(|v| v * scale).collect();
        for dtype in DType::block_formats() {
            let err = relative_rmse(&x, &round_trip(dtype, &x));
            let bound = gaussian_bound(dtype);
            assert!(err < bound, "{dtype} at scale {scale}: {err:.5} >= {bound}");
        }
    }
}

#[test]
fn an_outlier_costs_only_its_own_block() {
    // One value of 60 in a Gaussian row: its block (32 values, or the whole
    // super-block's scale range) loses precision, the other blocks do not. So the
    // error of the row without the outlier's block stays within the Gaussian bound,
    // and the outlier itself is reproduced to within a few percent.
    let mut rng = StdRng::seed_from_u64(3);
    let mut x = gaussian(&mut rng, COLS);
    let at = 300;
    x[at] = 60.0;
    for dtype in DType::block_formats() {
        let y = round_trip(dtype, &x);
        assert!(
            y.iter().all(|v| v.is_finite()),
            "{dtype}: non-finite output"
        );
        let bs = dtype.block_size();
        let block = at / bs;
        let outside =
            |v: &[f32]| -> Vec<f32> { [&v[..block * bs], &v[(block + 1) * bs..]].concat() };
        let err = relative_rmse(&outside(&x), &outside(&y));
        let bound = gaussian_bound(dtype);
        assert!(
            err < bound,
            "{dtype}: other blocks' error {err:.5} >= {bound}"
        );
        let outlier_err = ((y[at] - x[at]) / x[at]).abs();
        let bound = extreme_value_bound(dtype).map_or(0.06, |b| b.max(0.06));
        if dtype == DType::Q1_0 {
            assert!(y[at] > 0.0, "{dtype}: outlier 60 lost its sign");
        } else {
            assert!(
                outlier_err < bound,
                "{dtype}: outlier 60 came back as {}",
                y[at]
            );
        }
    }
}

#[test]
fn constant_rows_come_back_nearly_exact() {
    // A constant value is its block's extreme (and for Q1_0 its mean magnitude):
    // see `extreme_value_bound` for what each format keeps of it.
    for c in [0.75f32, -3.5, 0.02] {
        let x = vec![c; COLS];
        for dtype in DType::block_formats() {
            let y = round_trip(dtype, &x);
            let bound = extreme_value_bound(dtype).unwrap_or(1.0 / 256.0);
            for (i, v) in y.iter().enumerate() {
                let rel = ((v - c) / c).abs();
                assert!(rel < bound, "{dtype}: constant {c} -> {v} at {i}");
            }
        }
    }
}

#[test]
fn zero_rows_come_back_as_zeros() {
    let x = vec![0.0f32; COLS];
    for dtype in DType::block_formats() {
        let y = round_trip(dtype, &x);
        assert!(
            y.iter().all(|&v| v == 0.0),
            "{dtype}: zeros came back as {y:?}"
        );
    }
}

#[test]
fn mixed_rows_keep_zero_blocks_zero() {
    // A row whose first half is zeros and second half Gaussian: the zero blocks stay
    // exactly zero, the others stay within bound.
    let mut rng = StdRng::seed_from_u64(4);
    let mut x = vec![0.0f32; COLS / 2];
    x.extend(gaussian(&mut rng, COLS / 2));
    for dtype in DType::block_formats() {
        let y = round_trip(dtype, &x);
        assert!(
            y[..COLS / 2].iter().all(|&v| v == 0.0),
            "{dtype}: zero half changed"
        );
        let err = relative_rmse(&x[COLS / 2..], &y[COLS / 2..]);
        assert!(err < gaussian_bound(dtype), "{dtype}: {err:.5}");
    }
}

#[test]
fn arbitrary_bytes_decode_without_panicking() {
    // Any byte string of the right length is a valid block: decoding never fails,
    // and with finite scales (forced below) every value is finite.
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in DType::block_formats() {
        let blocks = 64;
        let mut bytes: Vec<u8> = (0..blocks * dtype.block_bytes())
            .map(|_| rng.random())
            .collect();
        let mut y = vec![f32::NAN; blocks * dtype.block_size()];
        quant::dequantize(dtype, &bytes, &mut y).unwrap();
        // Clearing bit 6 of every byte makes every f16 exponent below 31 and the
        // Q8_K f32 exponent below 255, so no scale is infinite or NaN.
        bytes.iter_mut().for_each(|b| *b &= !0x40);
        quant::dequantize(dtype, &bytes, &mut y).unwrap();
        assert!(
            y.iter().all(|v| v.is_finite()),
            "{dtype}: non-finite from finite scales"
        );
    }
}

fn assert_invalid(result: kiln_core::Result<()>, what: &str) {
    match result {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn wrong_lengths_are_errors() {
    for dtype in DType::block_formats() {
        let bs = dtype.block_size();
        let bytes = dtype.block_bytes();
        let x = vec![1.0f32; 2 * bs];
        let mut q = vec![0u8; 2 * bytes];
        let mut y = vec![0.0f32; 2 * bs];
        assert_invalid(
            quant::quantize(dtype, &x, &mut q[..2 * bytes - 1]),
            "short dst",
        );
        assert_invalid(
            quant::quantize(dtype, &x[..bs + 1], &mut q),
            "partial block",
        );
        assert_invalid(quant::quantize(dtype, &x[..bs], &mut q), "extra dst");
        assert_invalid(
            quant::dequantize(dtype, &q[..2 * bytes - 1], &mut y),
            "short src",
        );
        assert_invalid(
            quant::dequantize(dtype, &q, &mut y[..2 * bs - 1]),
            "partial dst",
        );
        assert_invalid(quant::dequantize(dtype, &q[..bytes], &mut y), "long dst");
        // The right lengths work.
        quant::quantize(dtype, &x, &mut q).unwrap();
        quant::dequantize(dtype, &q, &mut y).unwrap();
    }
}

#[test]
fn non_finite_input_is_an_error_naming_the_element() {
    for dtype in DType::block_formats() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; dtype.block_size()];
            x[7] = bad;
            let mut q = vec![0u8; dtype.block_bytes()];
            let err = quant::quantize(dtype, &x, &mut q).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("element 7"), "{dtype}: {msg}");
        }
    }
}

#[test]
fn integer_dtypes_are_unsupported() {
    for dtype in [DType::I32, DType::U32, DType::U8] {
        let mut y = [0.0f32; 4];
        let q = vec![0u8; 4 * dtype.block_bytes()];
        assert!(matches!(
            quant::dequantize(dtype, &q, &mut y),
            Err(Error::Unsupported(_))
        ));
        let mut q = q;
        assert!(matches!(
            quant::quantize(dtype, &[1.0; 4], &mut q),
            Err(Error::Unsupported(_))
        ));
    }
}
