//! Cast between F32, F16 and BF16, bit-exact with `half`'s rounding from f64.

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
                assert_eq!(got, float_bytes(&src, to), "{from} -> {to}, len {len}");
            }
        }
    }
}
