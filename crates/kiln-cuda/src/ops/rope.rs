//! Dispatch for [`kiln_core::ops::Rope`] and [`kiln_core::ops::HeadNormRope`]
//! (kernels/rope.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::ops::{RopeParams, RopeStyle};
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{config, grid_dim, launch, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count, to_u32};
use crate::launch::KernelArgs;
use crate::manifest::ROPE;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// Threads per block: rope has one block per token, head_norm_rope one warp per head.
const THREADS: u32 = 128;

fn style_name(style: RopeStyle) -> &'static str {
    match style {
        RopeStyle::Normal => "normal",
        RopeStyle::NeoX => "neox",
    }
}

/// The specialisation of rope (`norm` false) or head_norm_rope (`norm` true) for a
/// rotary style.
pub fn spec(style: RopeStyle, norm: bool) -> KernelSpec {
    let name = if norm { "head_norm_rope" } else { "rope" };
    ROPE.spec(
        format!("{name}|style={}", style_name(style)),
        format!("kiln::{name}<{}>", style == RopeStyle::NeoX),
    )
}

/// Every rope specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    [RopeStyle::Normal, RopeStyle::NeoX]
        .into_iter()
        .flat_map(|s| [spec(s, false), spec(s, true)])
        .collect()
}

/// The per-head RMSNorm of [`kiln_core::ops::HeadNormRope`]: its epsilon and the byte
/// size of its optional weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadNorm {
    pub eps: f32,
    pub weight_bytes: Option<usize>,
}

/// A rope's shape, parameters and operand sizes in bytes; with `norm`, a
/// head_norm_rope.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeArgs {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub params: RopeParams,
    pub norm: Option<HeadNorm>,
    pub x_bytes: usize,
    pub positions_bytes: usize,
    pub freq_factors_bytes: Option<usize>,
    pub out_bytes: usize,
}

/// A checked rope or head_norm_rope launch.
#[derive(Clone, Debug)]
pub struct RopePlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    n_heads: u32,
    head_dim: u32,
    rotary_dim: u32,
    heads_total: u64,
}

impl RopeArgs {
    fn op(&self) -> &'static str {
        if self.norm.is_some() {
            "head_norm_rope"
        } else {
            "rope"
        }
    }

    /// Checks non-zero sizes; `rotary_dim` even and at most `head_dim`; a finite
    /// positive base and frequency scale (and a finite non-negative eps); buffers of
    /// `n_tokens x n_heads x head_dim` F32, `n_tokens` I32 positions, and the optional
    /// `rotary_dim / 2` F32 frequency factors and `head_dim` F32 norm weight.
    pub fn check(&self) -> Result<RopePlan> {
        let op = self.op();
        let p = &self.params;
        check_nonzero(
            op,
            &[
                ("n_tokens", self.n_tokens),
                ("n_heads", self.n_heads),
                ("head_dim", p.head_dim),
                ("rotary_dim", p.rotary_dim),
            ],
        )?;
        let invalid = |msg: String| Err(Error::invalid(op, msg));
        if p.rotary_dim > p.head_dim {
            return invalid(format!(
                "rotary_dim {} exceeds head_dim {}",
                p.rotary_dim, p.head_dim
            ));
        }
        if p.rotary_dim % 2 != 0 {
            return invalid(format!("rotary_dim {} must be even", p.rotary_dim));
        }
        if !(p.base.is_finite() && p.base > 0.0) {
            return invalid(format!("base must be finite and > 0, got {}", p.base));
        }
        if !(p.freq_scale.is_finite() && p.freq_scale > 0.0) {
            return invalid(format!(
                "freq_scale must be finite and > 0, got {}",
                p.freq_scale
            ));
        }
        let heads = count(op, &[self.n_tokens, self.n_heads])?;
        let n = count(op, &[heads, p.head_dim])?;
        check_bytes(op, "x", self.x_bytes, DType::F32, n)?;
        check_bytes(op, "out", self.out_bytes, DType::F32, n)?;
        check_bytes(
            op,
            "positions",
            self.positions_bytes,
            DType::I32,
            self.n_tokens,
        )?;
        if let Some(bytes) = self.freq_factors_bytes {
            check_bytes(op, "freq_factors", bytes, DType::F32, p.rotary_dim / 2)?;
        }
        let grid = match &self.norm {
            None => {
                to_u32(
                    op,
                    "n_heads * rotary_dim",
                    count(op, &[self.n_heads, p.head_dim])?,
                )?;
                grid_dim(op, "n_tokens", self.n_tokens, MAX_GRID_X)?
            }
            Some(norm) => {
                if !(norm.eps.is_finite() && norm.eps >= 0.0) {
                    return invalid(format!("eps must be finite and >= 0, got {}", norm.eps));
                }
                if let Some(bytes) = norm.weight_bytes {
                    check_bytes(op, "weight", bytes, DType::F32, p.head_dim)?;
                }
                let warps = (THREADS / 32) as usize;
                grid_dim(op, "n_tokens * n_heads", heads.div_ceil(warps), MAX_GRID_X)?
            }
        };
        Ok(RopePlan {
            spec: spec(p.style, self.norm.is_some()),
            config: config((grid, 1, 1), THREADS, 0),
            n_heads: to_u32(op, "n_heads", self.n_heads)?,
            head_dim: to_u32(op, "head_dim", p.head_dim)?,
            rotary_dim: to_u32(op, "rotary_dim", p.rotary_dim)?,
            heads_total: heads as u64,
        })
    }
}

/// Rotates every head of `n_tokens` tokens of `n_heads` heads at `positions`, as
/// [`kiln_core::ops::Rope`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn rope(
    backend: &CudaBackend,
    x: &CudaBuffer,
    positions: &CudaBuffer,
    freq_factors: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
    n_tokens: usize,
    n_heads: usize,
    params: &RopeParams,
) -> Result<()> {
    let plan = RopeArgs {
        n_tokens,
        n_heads,
        params: *params,
        norm: None,
        x_bytes: x.bytes(),
        positions_bytes: positions.bytes(),
        freq_factors_bytes: freq_factors.map(|f| f.bytes()),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(positions.slice())
        .arg(freq_factors.map(|f| f.slice()))
        .arg(out.slice_mut())
        .arg(&plan.n_heads)
        .arg(&plan.head_dim)
        .arg(&plan.rotary_dim)
        .arg(&params.base)
        .arg(&params.freq_scale);
    // SAFETY: the arguments match `kiln::rope<NeoX>(const float* x, const int*
    // positions, const float* freq_factors, float* out, u32 n_heads, u32 head_dim, u32
    // rotary_dim, float base, float freq_scale)`; the buffers hold their elements
    // (checked), freq_factors is null or holds rotary_dim / 2 values.
    unsafe { launch(&kernel, &mut args, plan.config) }
}

/// Per-head RMSNorm (optional `weight` of `head_dim` values) then RoPE, as
/// [`kiln_core::ops::HeadNormRope`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn head_norm_rope(
    backend: &CudaBackend,
    x: &CudaBuffer,
    weight: Option<&CudaBuffer>,
    positions: &CudaBuffer,
    freq_factors: Option<&CudaBuffer>,
    out: &mut CudaBuffer,
    n_tokens: usize,
    n_heads: usize,
    eps: f32,
    params: &RopeParams,
) -> Result<()> {
    let plan = RopeArgs {
        n_tokens,
        n_heads,
        params: *params,
        norm: Some(HeadNorm {
            eps,
            weight_bytes: weight.map(|w| w.bytes()),
        }),
        x_bytes: x.bytes(),
        positions_bytes: positions.bytes(),
        freq_factors_bytes: freq_factors.map(|f| f.bytes()),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(x.slice())
        .arg(weight.map(|w| w.slice()))
        .arg(positions.slice())
        .arg(freq_factors.map(|f| f.slice()))
        .arg(out.slice_mut())
        .arg(&plan.n_heads)
        .arg(&plan.head_dim)
        .arg(&plan.rotary_dim)
        .arg(&params.base)
        .arg(&params.freq_scale)
        .arg(&eps)
        .arg(&plan.heads_total);
    // SAFETY: the arguments match `kiln::head_norm_rope<NeoX>(const float* x, const
    // float* weight, const int* positions, const float* freq_factors, float* out, u32
    // n_heads, u32 head_dim, u32 rotary_dim, float base, float freq_scale, float eps,
    // u64 n_heads_total)`; the buffers hold their elements (checked); weight and
    // freq_factors are null or hold head_dim and rotary_dim / 2 values.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
