use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Which elements of a head a rotary pair rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Adjacent elements: pair `i` is `(2i, 2i + 1)` (Llama in GGUF's layout).
    Normal,
    /// Split halves: pair `i` is `(i, i + rotary_dim / 2)` (GPT-NeoX, Qwen2, Qwen3).
    NeoX,
}

/// Rotary embedding parameters shared by [`Rope`] and [`HeadNormRope`].
///
/// For pair `i` in `0..rotary_dim / 2` of a head at position `p`:
/// `theta = p * freq_scale * base^(-2i / rotary_dim) / ff[i]`, where `ff` is the
/// optional frequency-factor buffer (F32 `[rotary_dim / 2]`, 1 when absent), and the
/// pair `(a, b)` becomes `(a cos(theta) - b sin(theta), a sin(theta) + b cos(theta))`.
/// Elements at or past `rotary_dim` are copied unchanged. Angles are computed in f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub head_dim: usize,
    /// Rotated leading dimensions of each head: even, `0 < rotary_dim <= head_dim`.
    pub rotary_dim: usize,
    pub base: f32,
    /// Linear position scaling (1 for none).
    pub freq_scale: f32,
    pub style: RopeStyle,
}

impl RopeParams {
    fn check(&self, c: &Checker) -> Result<()> {
        c.nonzero(&[("head_dim", self.head_dim), ("rotary_dim", self.rotary_dim)])?;
        c.ensure(self.rotary_dim <= self.head_dim, || {
            format!(
                "rotary_dim {} exceeds head_dim {}",
                self.rotary_dim, self.head_dim
            )
        })?;
        c.ensure(self.rotary_dim % 2 == 0, || {
            format!("rotary_dim {} must be even", self.rotary_dim)
        })?;
        c.ensure(self.base.is_finite() && self.base > 0.0, || {
            format!("base must be finite and > 0, got {}", self.base)
        })?;
        c.ensure(self.freq_scale.is_finite() && self.freq_scale > 0.0, || {
            format!("freq_scale must be finite and > 0, got {}", self.freq_scale)
        })
    }
}

/// Rotary position embedding of every head of every token.
///
/// - `x`, `out`: F32 `[n_tokens, n_heads, head_dim]`.
/// - `positions`: I32 `[n_tokens]`, the position `p` of each token.
/// - `freq_factors`: optional F32 `[rotary_dim / 2]`.
///
/// `out[t, h, :]` is `x[t, h, :]` rotated as [`RopeParams`] defines, at `positions[t]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub x: BufferId,
    pub positions: BufferId,
    pub freq_factors: Option<BufferId>,
    pub out: BufferId,
    pub n_tokens: usize,
    pub n_heads: usize,
    pub params: RopeParams,
}

/// Per-head RMSNorm followed by RoPE (Qwen3's q/k norm), fused.
///
/// For each token `t` and head `h`, the head vector `v = x[t, h, :]` (F32 `[head_dim]`)
/// is normalized, `u[i] = v[i] / sqrt(mean_j(v[j]^2) + eps) * w[i]` with `w` the
/// optional F32 `[head_dim]` weight (1 when absent), then `out[t, h, :]` is `u`
/// rotated as [`RopeParams`] defines at `positions[t]`. Shapes as [`Rope`].
#[derive(Clone, Debug, PartialEq)]
pub struct HeadNormRope {
    pub x: BufferId,
    pub weight: Option<BufferId>,
    pub positions: BufferId,
    pub freq_factors: Option<BufferId>,
    pub out: BufferId,
    pub n_tokens: usize,
    pub n_heads: usize,
    pub eps: f32,
    pub params: RopeParams,
}

#[allow(clippy::too_many_arguments)]
fn check_rope(
    c: &Checker,
    x: BufferId,
    out: BufferId,
    positions: BufferId,
    freq_factors: Option<BufferId>,
    n_tokens: usize,
    n_heads: usize,
    params: &RopeParams,
) -> Result<()> {
    c.nonzero(&[("n_tokens", n_tokens), ("n_heads", n_heads)])?;
    params.check(c)?;
    let n = c.count(&[n_tokens, n_heads, params.head_dim])?;
    c.buffer("x", x, &[DType::F32], n)?;
    c.buffer("out", out, &[DType::F32], n)?;
    c.buffer("positions", positions, &[DType::I32], n_tokens)?;
    c.optional(
        "freq_factors",
        freq_factors,
        &[DType::F32],
        params.rotary_dim / 2,
    )
}

impl OpSpec for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.x, self.positions], &[self.freq_factors])
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        check_rope(
            &c,
            self.x,
            self.out,
            self.positions,
            self.freq_factors,
            self.n_tokens,
            self.n_heads,
            &self.params,
        )
    }
}

impl OpSpec for HeadNormRope {
    fn name(&self) -> &'static str {
        "head_norm_rope"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.x, self.positions], &[self.weight, self.freq_factors])
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        check_rope(
            &c,
            self.x,
            self.out,
            self.positions,
            self.freq_factors,
            self.n_tokens,
            self.n_heads,
            &self.params,
        )?;
        c.ensure(self.eps.is_finite() && self.eps >= 0.0, || {
            format!("eps must be finite and >= 0, got {}", self.eps)
        })?;
        c.optional("weight", self.weight, &[DType::F32], self.params.head_dim)
    }
}

/// Qwen3's per-head RMSNorm of queries and keys inside [`QkvRopeAppend`]: each query
/// head is normalized as [`HeadNormRope`] does with weight `q_weight`, each key head
/// with `k_weight` (both F32 `[head_dim]`), with `eps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QkNorm {
    pub q_weight: BufferId,
    pub k_weight: BufferId,
    pub eps: f32,
}

/// The step between a fused query-key-value projection and attention: splits each
/// token's projection into heads, rotates queries and keys, and appends keys and
/// values to the KV caches.
///
/// - `qkv`: F32 `[n_tokens, n_heads + 2 * n_kv_heads, head_dim]`: per token, its
///   `n_heads` query heads, then `n_kv_heads` key heads, then `n_kv_heads` value heads.
/// - `positions`: I32 `[n_tokens]`; `freq_factors`: optional F32 `[rotary_dim / 2]`.
/// - `slots`: optional I32 `[n_tokens]`, each token's cache slot ([`super::KvAppend`]
///   defines slots).
/// - `norm`: optional [`QkNorm`].
/// - `q_out`: F32 `[n_tokens, n_heads, head_dim]`.
/// - `k_cache`, `v_cache`: `[n_slots, n_kv_heads, capacity, head_dim]`, F32 or F16
///   (both the same dtype).
///
/// It computes what these ops compute in sequence: [`Rope`] (or [`HeadNormRope`]
/// with `norm`'s query weight) of the query heads into `q_out`; the same of the key
/// heads (with `norm`'s key weight); [`super::KvAppend`] of the rotated keys into
/// `k_cache` and of the value heads, unchanged, into `v_cache`, at each token's slot
/// and position (slots and positions out of range as `KvAppend` defines). Nothing is rounded before the caches' own
/// rounding.
#[derive(Clone, Debug, PartialEq)]
pub struct QkvRopeAppend {
    pub qkv: BufferId,
    pub positions: BufferId,
    pub slots: Option<BufferId>,
    pub freq_factors: Option<BufferId>,
    pub norm: Option<QkNorm>,
    pub q_out: BufferId,
    pub k_cache: BufferId,
    pub v_cache: BufferId,
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub n_slots: usize,
    pub params: RopeParams,
}

impl OpSpec for QkvRopeAppend {
    fn name(&self) -> &'static str {
        "qkv_rope_append"
    }
    fn inputs(&self) -> Vec<BufferId> {
        let norm = self
            .norm
            .map_or([None, None], |n| [Some(n.q_weight), Some(n.k_weight)]);
        ids(
            &[self.qkv, self.positions],
            &[self.slots, self.freq_factors, norm[0], norm[1]],
        )
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.q_out, self.k_cache, self.v_cache]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[
            ("n_tokens", self.n_tokens),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("capacity", self.capacity),
        ])?;
        self.params.check(&c)?;
        let hd = self.params.head_dim;
        let heads = self
            .n_heads
            .checked_add(self.n_kv_heads.saturating_mul(2))
            .ok_or_else(|| c.error("head count overflows"))?;
        c.buffer(
            "qkv",
            self.qkv,
            &[DType::F32],
            c.count(&[self.n_tokens, heads, hd])?,
        )?;
        c.buffer("positions", self.positions, &[DType::I32], self.n_tokens)?;
        super::kv_cache::check_slots(&c, self.slots, self.n_slots, self.n_tokens)?;
        c.optional(
            "freq_factors",
            self.freq_factors,
            &[DType::F32],
            self.params.rotary_dim / 2,
        )?;
        if let Some(norm) = self.norm {
            c.ensure(norm.eps.is_finite() && norm.eps >= 0.0, || {
                format!("eps must be finite and >= 0, got {}", norm.eps)
            })?;
            c.buffer("q norm weight", norm.q_weight, &[DType::F32], hd)?;
            c.buffer("k norm weight", norm.k_weight, &[DType::F32], hd)?;
        }
        c.buffer(
            "q_out",
            self.q_out,
            &[DType::F32],
            c.count(&[self.n_tokens, self.n_heads, hd])?,
        )?;
        let cache = c.count(&[self.n_slots, self.n_kv_heads, self.capacity, hd])?;
        let k = c.buffer("k_cache", self.k_cache, &super::CACHE_DTYPES, cache)?;
        let v = c.buffer("v_cache", self.v_cache, &super::CACHE_DTYPES, cache)?;
        c.ensure(k.dtype == v.dtype, || {
            format!(
                "k_cache is {} and v_cache {}; they must match",
                k.dtype, v.dtype
            )
        })
    }
}
