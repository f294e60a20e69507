//! Dispatch for [`kiln_core::ops::Rope`], [`kiln_core::ops::HeadNormRope`] and
//! [`kiln_core::ops::QkvRopeAppend`] (kernels/rope.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::ops::{RopeParams, RopeStyle};
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{cache_tag, config, grid_dim, launch, CACHE_DTYPES, MAX_GRID_X};
use super::{check_bytes, check_nonzero, count, to_u32};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Rope`] and [`kiln_core::ops::HeadNormRope`].
pub const ROPE: Family = Family {
    name: "rope",
    source: KernelSource {
        name: "rope.cu",
        text: include_str!("../../kernels/rope.cu"),
    },
};

/// Threads per block: rope has one block per token, head_norm_rope one warp per head.
const THREADS: u32 = 128;

pub(crate) fn style_name(style: RopeStyle) -> &'static str {
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

/// The specialisation of qkv_rope_append for a rotary style and KV caches of `cache`.
pub fn qkv_spec(style: RopeStyle, cache: DType) -> Result<KernelSpec> {
    let tag = cache_tag(QKV_OP, cache)?;
    Ok(ROPE.spec(
        format!("qkv_rope_append|style={}|cache={cache}", style_name(style)),
        format!("kiln::qkv_rope_append<{}, {tag}>", style == RopeStyle::NeoX),
    ))
}

/// Every rope specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let styles = [RopeStyle::Normal, RopeStyle::NeoX];
    let mut specs: Vec<KernelSpec> = styles
        .into_iter()
        .flat_map(|s| [spec(s, false), spec(s, true)])
        .collect();
    for style in styles {
        // Every cache dtype has a tag.
        specs.extend(CACHE_DTYPES.iter().filter_map(|&c| qkv_spec(style, c).ok()));
    }
    specs
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
        check_params(op, p)?;
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
        check_freq_factors(op, self.freq_factors_bytes, p)?;
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
                check_eps(op, norm.eps)?;
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

/// Errors unless `rotary_dim` is even and at most `head_dim`, and base and frequency
/// scale are finite and positive.
fn check_params(op: &str, p: &RopeParams) -> Result<()> {
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
    Ok(())
}

/// Errors unless the optional frequency factors hold `rotary_dim / 2` F32 values.
fn check_freq_factors(op: &str, bytes: Option<usize>, p: &RopeParams) -> Result<()> {
    match bytes {
        Some(bytes) => check_bytes(op, "freq_factors", bytes, DType::F32, p.rotary_dim / 2),
        None => Ok(()),
    }
}

/// Errors unless a norm's epsilon is finite and non-negative.
fn check_eps(op: &str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ))
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

const QKV_OP: &str = "qkv_rope_append";

/// A qkv_rope_append's shape, parameters, cache dtype and operand sizes in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct QkvRopeArgs {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub n_slots: usize,
    pub params: RopeParams,
    pub cache: DType,
    /// The norm's epsilon and the byte sizes of its query and key weights.
    pub norm: Option<(f32, usize, usize)>,
    pub qkv_bytes: usize,
    pub positions_bytes: usize,
    /// The size of the slot ids, when there are some.
    pub slots_bytes: Option<usize>,
    pub freq_factors_bytes: Option<usize>,
    pub q_out_bytes: usize,
    pub k_cache_bytes: usize,
    pub v_cache_bytes: usize,
}

/// A checked qkv_rope_append launch.
#[derive(Clone, Debug)]
pub struct QkvRopePlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    pub(crate) n_tokens: u32,
    pub(crate) n_heads: u32,
    pub(crate) n_kv_heads: u32,
    pub(crate) head_dim: u32,
    pub(crate) rotary_dim: u32,
    pub(crate) capacity: u32,
    pub(crate) n_slots: u32,
}

impl QkvRopeArgs {
    /// Checks non-zero sizes, the rotary parameters (as [`RopeArgs::check`]), an F32 or
    /// F16 cache, and buffers of `n_tokens x (n_heads + 2 n_kv_heads) x head_dim` F32
    /// projections, `n_tokens` I32 positions, the optional frequency factors and norm
    /// weights (`head_dim` F32 each), `n_tokens x n_heads x head_dim` F32 queries out,
    /// the slots ([`super::check_slots`]) and two `n_slots x n_kv_heads x capacity x
    /// head_dim` caches.
    pub fn check(&self) -> Result<QkvRopePlan> {
        let op = QKV_OP;
        let p = &self.params;
        check_nonzero(
            op,
            &[
                ("n_tokens", self.n_tokens),
                ("n_heads", self.n_heads),
                ("n_kv_heads", self.n_kv_heads),
                ("capacity", self.capacity),
                ("head_dim", p.head_dim),
                ("rotary_dim", p.rotary_dim),
            ],
        )?;
        check_params(op, p)?;
        let tag_spec = qkv_spec(p.style, self.cache)?;
        let heads = count(op, &[self.n_heads, 1])?
            .checked_add(count(op, &[self.n_kv_heads, 2])?)
            .ok_or_else(|| Error::invalid(op, "head count overflows"))?;
        let token_heads = count(op, &[self.n_tokens, heads])?;
        check_bytes(
            op,
            "qkv",
            self.qkv_bytes,
            DType::F32,
            count(op, &[token_heads, p.head_dim])?,
        )?;
        check_bytes(
            op,
            "positions",
            self.positions_bytes,
            DType::I32,
            self.n_tokens,
        )?;
        check_freq_factors(op, self.freq_factors_bytes, p)?;
        if let Some((eps, q_weight, k_weight)) = self.norm {
            check_eps(op, eps)?;
            check_bytes(op, "q norm weight", q_weight, DType::F32, p.head_dim)?;
            check_bytes(op, "k norm weight", k_weight, DType::F32, p.head_dim)?;
        }
        check_bytes(
            op,
            "q_out",
            self.q_out_bytes,
            DType::F32,
            count(op, &[self.n_tokens, self.n_heads, p.head_dim])?,
        )?;
        let n_slots = super::check_slots(
            op,
            self.slots_bytes,
            self.n_tokens,
            self.n_slots,
            self.capacity,
        )?;
        let cache = count(
            op,
            &[self.n_slots, self.n_kv_heads, self.capacity, p.head_dim],
        )?;
        check_bytes(op, "k_cache", self.k_cache_bytes, self.cache, cache)?;
        check_bytes(op, "v_cache", self.v_cache_bytes, self.cache, cache)?;
        to_u32(op, "n_tokens * heads", token_heads)?;
        let warps = (THREADS / 32) as usize;
        let grid = grid_dim(
            op,
            "n_tokens * heads",
            token_heads.div_ceil(warps),
            MAX_GRID_X,
        )?;
        Ok(QkvRopePlan {
            spec: tag_spec,
            config: config((grid, 1, 1), THREADS, 0),
            n_tokens: to_u32(op, "n_tokens", self.n_tokens)?,
            n_heads: to_u32(op, "n_heads", self.n_heads)?,
            n_kv_heads: to_u32(op, "n_kv_heads", self.n_kv_heads)?,
            head_dim: to_u32(op, "head_dim", p.head_dim)?,
            rotary_dim: to_u32(op, "rotary_dim", p.rotary_dim)?,
            capacity: to_u32(op, "capacity", self.capacity)?,
            n_slots,
        })
    }
}

/// The per-head norm of a qkv_rope_append: the query and key weights and epsilon.
#[derive(Clone, Copy)]
pub struct QkNormWeights<'a> {
    pub q_weight: &'a CudaBuffer,
    pub k_weight: &'a CudaBuffer,
    pub eps: f32,
}

/// The caches a qkv_rope_append writes, their dtype, capacity and the tokens' slots.
pub struct KvCaches<'a> {
    pub k: &'a mut CudaBuffer,
    pub v: &'a mut CudaBuffer,
    pub dtype: DType,
    pub capacity: usize,
    pub slots: super::CacheSlots<'a>,
}

/// Splits each token's fused projection `qkv` into heads, rotates (and with `norm`
/// normalizes) queries into `q_out` and keys into the caches, and appends values, as
/// [`kiln_core::ops::QkvRopeAppend`] defines.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn qkv_rope_append(
    backend: &CudaBackend,
    qkv: &CudaBuffer,
    positions: &CudaBuffer,
    freq_factors: Option<&CudaBuffer>,
    norm: Option<QkNormWeights<'_>>,
    q_out: &mut CudaBuffer,
    caches: KvCaches<'_>,
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    params: &RopeParams,
) -> Result<()> {
    let plan = QkvRopeArgs {
        n_tokens,
        n_heads,
        n_kv_heads,
        capacity: caches.capacity,
        n_slots: caches.slots.n_slots,
        params: *params,
        cache: caches.dtype,
        norm: norm.map(|n| (n.eps, n.q_weight.bytes(), n.k_weight.bytes())),
        qkv_bytes: qkv.bytes(),
        positions_bytes: positions.bytes(),
        slots_bytes: caches.slots.ids.map(|s| s.bytes()),
        freq_factors_bytes: freq_factors.map(|f| f.bytes()),
        q_out_bytes: q_out.bytes(),
        k_cache_bytes: caches.k.bytes(),
        v_cache_bytes: caches.v.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let eps = norm.map_or(0.0, |n| n.eps);
    let mut args = KernelArgs::new(backend);
    args.arg(qkv.slice())
        .arg(positions.slice())
        .arg(caches.slots.ids.map(|s| s.slice()))
        .arg(freq_factors.map(|f| f.slice()))
        .arg(norm.map(|n| n.q_weight.slice()))
        .arg(norm.map(|n| n.k_weight.slice()))
        .arg(q_out.slice_mut())
        .arg(caches.k.slice_mut())
        .arg(caches.v.slice_mut())
        .arg(&plan.n_tokens)
        .arg(&plan.n_heads)
        .arg(&plan.n_kv_heads)
        .arg(&plan.head_dim)
        .arg(&plan.rotary_dim)
        .arg(&params.base)
        .arg(&params.freq_scale)
        .arg(&eps)
        .arg(&plan.capacity)
        .arg(&plan.n_slots);
    // SAFETY: the arguments match `kiln::qkv_rope_append<NeoX, C>(const float* qkv,
    // const int* positions, const int* slots, const float* freq_factors, const float*
    // q_weight, const float* k_weight, float* q_out, C* k_cache, C* v_cache, u32
    // n_tokens, u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 rotary_dim, float base,
    // float freq_scale, float eps, u32 capacity, u32 n_slots)`; the buffers hold their
    // elements (checked); the optional ones are null or hold n_tokens slot ids,
    // rotary_dim / 2 and head_dim values.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
