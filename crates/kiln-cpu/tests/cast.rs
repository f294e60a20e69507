//! Cast between F32, F16 and BF16, bit-exact with round-to-nearest-even computed here
//! by comparing neighbouring representable values (not by `half`'s conversions, whose
//! `bf16::from_f64` mis-rounds some values that have bits below its rounding bit).

mod common;
use common::*;
use kiln_core::ops::Cast;
use kiln_core::DType;

#[test]
fn casts_round_like_half() {
    let mut rng = rng("cast");
    let floats = [DType::F32, DType::F16, DType::BF16];
    for from in floats {
        for to in floats {
            for len in [1, 7, 1000, 4099] {
                let mut g = G::new();
                let x = g.p("x", from, &[len]);
                let out = g.p("out", to, &[len]);
                g.g.push(Cast { x, out, len }).unwrap();
                let mut values = randn(&mut rng, len, 100.0);
                values[0] = 1e6; // beyond F16's range: becomes infinity there
                let xb = float_bytes(&values, from);
                let got = run(&g.g, &[(x, xb.clone())], &[out]).remove(0);
                let src: Vec<f32> = float_values(&xb, from).iter().map(|&v| v as f32).collect();
                let want: Vec<u8> = src.iter().flat_map(|&v| rounded(v as f64, to)).collect();
                let width = to.block_bytes();
                for (i, (g, w)) in got.chunks(width).zip(want.chunks(width)).enumerate() {
                    assert_eq!(
                        g, w,
                        "{from} -> {to}, len {len}: element {i} ({:e})",
                        src[i]
                    );
                }
            }
        }
    }
}

/// The little-endian bytes of `v` in `to`, rounded to nearest, ties to even:
/// `half`'s guess and its two neighbours compared exactly in f64 (decoding a 16-bit
/// float to f64 is exact), with IEEE overflow to infinity.
fn rounded(v: f64, to: DType) -> Vec<u8> {
    let format = match to {
        DType::F32 => return (v as f32).to_le_bytes().to_vec(),
        DType::F16 => HalfFormat {
            decode: |b| half::f16::from_bits(b).to_f64(),
            encode: |v| half::f16::from_f64(v).to_bits(),
            max_finite: 65504.0,
            half_ulp_at_max: 16.0,
            inf: 0x7c00,
        },
        _ => HalfFormat {
            decode: |b| half::bf16::from_bits(b).to_f64(),
            encode: |v| half::bf16::from_f64(v).to_bits(),
            max_finite: 3.389_531_389_251_535_5e38,
            half_ulp_at_max: 2f64.powi(119),
            inf: 0x7f80,
        },
    };
    let HalfFormat {
        decode,
        encode,
        max_finite,
        half_ulp_at_max,
        inf,
    } = format;
    let sign = if v < 0.0 { 0x8000u16 } else { 0 };
    if v.abs() >= max_finite + half_ulp_at_max {
        return (sign | inf).to_le_bytes().to_vec();
    }
    let guess = encode(v) & 0x7fff;
    let candidates = [guess.saturating_sub(1), guess, (guess + 1).min(inf - 1)];
    let best = candidates
        .into_iter()
        .min_by(|&a, &b| {
            let (da, db) = ((decode(a) - v.abs()).abs(), (decode(b) - v.abs()).abs());
            da.total_cmp(&db).then((a & 1).cmp(&(b & 1)))
        })
        .expect("three candidates");
    (sign | best).to_le_bytes().to_vec()
}

/// A 16-bit float format: exact decoding, `half`'s encoding (a guess to check), the
/// largest finite value, half an ulp there, and the bits of +infinity.
struct HalfFormat {
    decode: fn(u16) -> f64,
    encode: fn(f64) -> u16,
    max_finite: f64,
    half_ulp_at_max: f64,
    inf: u16,
}
