//! The scale searches of ggml's k-quant reference quantizers.
//!
//! Each picks, for one sub-block of `n` values, a scale (and for affine formats an
//! offset) and integer levels that minimise a weighted error, by trying a few
//! candidate scales and solving least squares for each. The arithmetic follows ggml
//! operation by operation (same order, f32 throughout), so that kiln writes the same
//! bytes as ggml for the same input.

use crate::quant::block::{nearest_int, signed_absmax, GROUP_MAX_EPS};

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (Q6_K).
///
/// Finds `scale` and levels `l[i]` in `-nmax..nmax` minimising
/// `sum x[i]^2 (x[i] - scale * l[i])^2`: for each candidate inverse scale
/// `-(nmax + 0.1 k) / max`, `k` in `-9..=9` (`max` the element of largest magnitude),
/// rounds to levels and takes the least-squares scale for them; keeps the best.
/// Writes `l[i] + nmax` to `levels` and returns `scale` (0 for an all-zero input).
pub(super) fn symmetric_scale_search(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level_sums = |iscale: f32| -> (f32, f32) {
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let write_levels = |iscale: f32, levels: &mut [u8]| {
        for (out, &v) in levels.iter_mut().zip(x) {
            *out = (nearest_int(iscale * v).clamp(-nmax, nmax - 1) + nmax) as u8;
        }
    };

    let iscale = -nmax as f32 / max;
    write_levels(iscale, levels);
    let (sumlx, suml2) = level_sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for k in (-9..=9).filter(|&k| k != 0) {
        let iscale = -(nmax as f32 + 0.1 * k as f32) / max;
        let (sumlx, suml2) = level_sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            write_levels(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with `do_rmse` (Q3_K).
///
/// Starts from levels `l[i] = round(-nmax x[i] / max)` clamped to `-nmax..nmax`,
/// then, for up to 5 passes, moves single levels to the value that the least-squares
/// fit of the others suggests whenever that lowers `sum x^2 (x - scale l)^2`. Writes
/// `l[i] + nmax` to `levels` and returns the least-squares scale (0 for an all-zero
/// input).
pub(super) fn symmetric_scale_refine(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    const MAX_PASSES: usize = 5;
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let iscale = -nmax as f32 / max;
    let mut l = [0i32; 16];
    let l = &mut l[..x.len()];
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (l, &v) in l.iter_mut().zip(x) {
        *l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *l as f32;
        suml2 += w * *l as f32 * *l as f32;
    }
    for _ in 0..MAX_PASSES {
        let mut changed = false;
        for (l, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *l as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *l as f32 * *l as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *l {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *l = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (out, &l) in levels.iter_mut().zip(l.iter()) {
        *out = (l + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Parameters of [`affine_scale_search`]: levels `0..=nmax`, and candidate inverse
/// scales `(nmax + rmin + rdelta k) / (max - min)` for `k` in `0..=steps`.
pub(super) struct AffineSearch {
    pub nmax: i32,
    pub rmin: f32,
    pub rdelta: f32,
    pub steps: i32,
    /// Minimise the weighted absolute error instead of the weighted squared error.
    pub absolute_error: bool,
}

/// ggml's `make_qkx2_quants` (Q2_K, Q4_K, Q5_K).
///
/// Finds `scale >= 0`, `offset >= 0` and levels `l[i]` in `0..=nmax` such that
/// `x[i] ~ scale * l[i] - offset`, minimising `sum weights[i] * err(i)` (squared
/// or absolute error). Starts from the range `[min(x, 0), max(x)]`; for each
/// candidate inverse scale it rounds to levels and solves weighted least squares for
/// scale and offset (offset clamped to be >= 0), keeping the best. Writes the levels
/// and returns `(scale, offset)`; `(0, -min)` with all levels 0 for a constant input.
/// `scratch` is as long as `x`.
pub(super) fn affine_scale_search(
    x: &[f32],
    weights: &[f32],
    search: &AffineSearch,
    levels: &mut [u8],
    scratch: &mut [u8],
) -> (f32, f32) {
    let nmax = search.nmax;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let error_of = |diff: f32| {
        if search.absolute_error {
            diff.abs()
        } else {
            diff * diff
        }
    };

    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((out, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
        let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
        *out = l as u8;
        best_error += w * error_of(scale * l as f32 + min - v);
    }
    for step in 0..=search.steps {
        let iscale = (search.rmin + search.rdelta * step as f32 + nmax as f32) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for ((out, &v), &w) in scratch.iter_mut().zip(x).zip(weights) {
            let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *out = l as u8;
            let l = l as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0f32;
            for ((&l, &v), &w) in scratch.iter().zip(x).zip(weights) {
                error += w * error_of(this_scale * f32::from(l) + this_min - v);
            }
            if error < best_error {
                levels.copy_from_slice(scratch);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}
