use super::kv_cache::CACHE_DTYPES;
use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Causal, grouped-query attention of new queries over a KV cache.
///
/// - `q`, `out`: F32 `[n_tokens, n_heads, head_dim]`.
/// - `k_cache`, `v_cache`: `[n_slots, n_kv_heads, capacity, head_dim]`, both F32 or
///   both F16, already holding the rows of every visible position (see
///   [`super::KvAppend`], which also defines slots).
/// - `positions`: I32 `[n_tokens]`, the position `p_t` of each query, in
///   `0..capacity`. The CPU reference rejects a position outside that range with
///   `InvalidArgument`; device backends write zeros for that query.
/// - `slots`: optional I32 `[n_tokens]`, the slot `s_t` of each query (0 when absent),
///   in `0..n_slots`. The CPU reference rejects a slot outside that range with
///   `InvalidArgument` naming the token; device backends write zeros for that query.
///
/// Query head `h` reads KV head `g = h / (n_heads / n_kv_heads)` of its own slot only.
/// Query `t` sees the cache rows `j` with `j <= p_t` and, with `window = Some(w)`,
/// `p_t - j < w`. For each visible `j`:
/// `s_j = scale * dot(q[t, h, :], k_cache[s_t, g, j, :])`, then with
/// `softcap = Some(c)`, `s_j = c * tanh(s_j / c)`. With `a = softmax_j(s_j)`,
/// `out[t, h, :] = sum_j a_j * v_cache[s_t, g, j, :]`. Computed in f32 from the cache's
/// values converted to f32.
///
/// `out_q8`, when given, is Q8_1 `[n_tokens, n_heads * head_dim]` (`n_heads * head_dim`
/// a multiple of 32) and receives `out` rounded to it ([`super::Q8_COPY`]); for a
/// query whose position a device backend answers with zeros, its copy encodes those
/// zeros.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub q: BufferId,
    pub k_cache: BufferId,
    pub v_cache: BufferId,
    pub positions: BufferId,
    pub slots: Option<BufferId>,
    pub out: BufferId,
    pub out_q8: Option<BufferId>,
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub n_slots: usize,
    pub scale: f32,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
}

impl OpSpec for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(
            &[self.q, self.k_cache, self.v_cache, self.positions],
            &[self.slots],
        )
    }
    fn outputs(&self) -> Vec<BufferId> {
        ids(&[self.out], &[self.out_q8])
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[
            ("n_tokens", self.n_tokens),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("capacity", self.capacity),
        ])?;
        c.ensure(self.n_heads % self.n_kv_heads == 0, || {
            format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            )
        })?;
        c.ensure(self.scale.is_finite(), || {
            format!("scale must be finite, got {}", self.scale)
        })?;
        c.ensure(self.window != Some(0), || "window must be > 0".to_string())?;
        if let Some(cap) = self.softcap {
            c.ensure(cap.is_finite() && cap > 0.0, || {
                format!("softcap must be finite and > 0, got {cap}")
            })?;
        }
        let nq = c.count(&[self.n_tokens, self.n_heads, self.head_dim])?;
        c.buffer("q", self.q, &[DType::F32], nq)?;
        c.buffer("out", self.out, &[DType::F32], nq)?;
        c.q8_copy("out_q8", self.out_q8, nq, self.n_heads * self.head_dim)?;
        c.buffer("positions", self.positions, &[DType::I32], self.n_tokens)?;
        super::kv_cache::check_slots(&c, self.slots, self.n_slots, self.n_tokens)?;
        let nkv = c.count(&[self.n_slots, self.n_kv_heads, self.capacity, self.head_dim])?;
        let k = c.buffer("k_cache", self.k_cache, &CACHE_DTYPES, nkv)?;
        let v = c.buffer("v_cache", self.v_cache, &CACHE_DTYPES, nkv)?;
        c.ensure(k.dtype == v.dtype, || {
            format!(
                "k_cache is {} but v_cache is {}; they must match",
                k.dtype, v.dtype
            )
        })
    }
}
