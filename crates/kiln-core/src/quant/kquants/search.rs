//! The scale searches of ggml's k-quant reference quantizers.
//!
//! Each picks, for one sub-block of `n` values, a scale (and for affine formats an
//! offset) and integer levels that minimise a weighted error, by trying a few
//! candidate scales and solving least squares for each. The arithmetic follows ggml
//! operation by operation (same order, f32 throughout), so that kiln writes the same
//! bytes as ggml for the same input.

use crate::quant::block::{nearest_int, nearest_level, signed_absmax, GROUP_MAX_EPS};

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

/// ggml's `make_qkx2_quants` (Q2_K, Q4_K, Q5_K), for `G` groups of `N` values at
/// once: group `g` is `x[g N..(g + 1) N]`, weighted by `weights[g N..(g + 1) N]`; its
/// levels go to `levels[g N..(g + 1) N]` and its `(scale, offset)` to element `g` of
/// the result.
///
/// Per group: finds `scale >= 0`, `offset >= 0` and levels `l[i]` in `0..=nmax` such
/// that `x[i] ~ scale * l[i] - offset`, minimising `sum weights[i] * err(i)` (squared
/// or absolute error). Starts from the range `[min(x, 0), max(x)]`; for each candidate
/// inverse scale it rounds to levels and solves weighted least squares for scale and
/// offset (offset clamped to be >= 0), keeping the best, whose offset the next
/// candidates start from. `(0, -min)` with all levels 0 for a constant group.
///
/// Each group is computed exactly as ggml computes it alone, every sum over its values
/// in order; the groups are the lanes of each step, so that they run side by side (a
/// lone group's search waits on the latency of its running sums).
pub(super) fn affine_scale_search<const G: usize, const N: usize>(
    x: &[f32],
    weights: &[f32],
    search: &AffineSearch,
    levels: &mut [u8],
) -> ([f32; G], [f32; G]) {
    // Element i of every group side by side.
    let mut xt = [[0f32; G]; N];
    let mut wt = [[0f32; G]; N];
    for g in 0..G {
        for i in 0..N {
            xt[i][g] = x[g * N + i];
            wt[i][g] = weights[g * N + i];
        }
    }
    let nmax = search.nmax;
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; G];
    for g in 0..G {
        sum_x[g] = sum_w[g] * xt[0][g];
    }
    for i in 1..N {
        for g in 0..G {
            let (v, w) = (xt[i][g], wt[i][g]);
            if v < min[g] {
                min[g] = v;
            }
            if v > max[g] {
                max[g] = v;
            }
            sum_w[g] += w;
            sum_x[g] += w * v;
        }
    }
    let mut constant = [false; G];
    for g in 0..G {
        if min[g] > 0.0 {
            min[g] = 0.0;
        }
        constant[g] = max[g] == min[g];
    }
    let first_min = min;
    let error_of = |diff: f32| {
        if search.absolute_error {
            diff.abs()
        } else {
            diff * diff
        }
    };

    let mut iscale = [0f32; G];
    let mut scale = [0f32; G];
    for g in 0..G {
        iscale[g] = nmax as f32 / (max[g] - min[g]);
        scale[g] = 1.0 / iscale[g];
    }
    // Levels as f32 (small integers, exact).
    let mut best = [[0f32; G]; N];
    let mut best_error = [0f32; G];
    for i in 0..N {
        for g in 0..G {
            let l = nearest_level(iscale[g] * (xt[i][g] - min[g]), nmax);
            best[i][g] = l;
            best_error[g] += wt[i][g] * error_of(scale[g] * l + min[g] - xt[i][g]);
        }
    }
    let mut candidate = [[0f32; G]; N];
    for step in 0..=search.steps {
        for g in 0..G {
            iscale[g] =
                (search.rmin + search.rdelta * step as f32 + nmax as f32) / (max[g] - min[g]);
        }
        let mut sum_l = [0f32; G];
        let mut sum_l2 = [0f32; G];
        let mut sum_xl = [0f32; G];
        for i in 0..N {
            for g in 0..G {
                let (v, w) = (xt[i][g], wt[i][g]);
                let l = nearest_level(iscale[g] * (v - min[g]), nmax);
                candidate[i][g] = l;
                sum_l[g] += w * l;
                sum_l2[g] += w * l * l;
                sum_xl[g] += w * l * v;
            }
        }
        let mut det = [0f32; G];
        let mut this_scale = [0f32; G];
        let mut this_min = [0f32; G];
        for g in 0..G {
            det[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            this_scale[g] = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det[g];
            this_min[g] = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det[g];
            if this_min[g] > 0.0 {
                this_min[g] = 0.0;
                this_scale[g] = sum_xl[g] / sum_l2[g];
            }
        }
        let mut error = [0f32; G];
        for i in 0..N {
            for g in 0..G {
                let l = candidate[i][g];
                error[g] += wt[i][g] * error_of(this_scale[g] * l + this_min[g] - xt[i][g]);
            }
        }
        for g in 0..G {
            if det[g] > 0.0 && error[g] < best_error[g] {
                for (b, c) in best.iter_mut().zip(&candidate) {
                    b[g] = c[g];
                }
                best_error[g] = error[g];
                scale[g] = this_scale[g];
                min[g] = this_min[g];
            }
        }
    }
    let mut scales = [0f32; G];
    let mut offsets = [0f32; G];
    for g in 0..G {
        (scales[g], offsets[g]) = if constant[g] {
            (0.0, -first_min[g])
        } else {
            (scale[g], -min[g])
        };
        for i in 0..N {
            levels[g * N + i] = if constant[g] { 0 } else { best[i][g] as u8 };
        }
    }
    (scales, offsets)
}
