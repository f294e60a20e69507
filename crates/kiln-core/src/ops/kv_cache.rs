use super::{Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Dtypes a KV cache may hold.
pub const CACHE_DTYPES: [DType; 2] = [DType::F32, DType::F16];

/// Writes new key (or value) rows into a cache at the tokens' positions.
///
/// - `src`: F32 `[n_tokens, n_kv_heads, head_dim]`.
/// - `positions`: I32 `[n_tokens]`, each in `0..capacity`. The CPU reference rejects a
///   position outside that range with `InvalidArgument`; device backends skip it.
/// - `cache`: `[n_kv_heads, capacity, head_dim]`, F32 or F16 (rounded to nearest).
///
/// `cache[h, positions[t], :] = src[t, h, :]`; every other cache row is unchanged.
/// When two tokens share a position, the later token's row is the one kept.
#[derive(Clone, Debug, PartialEq)]
pub struct KvAppend {
    pub src: BufferId,
    pub positions: BufferId,
    pub cache: BufferId,
    pub n_tokens: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

impl OpSpec for KvAppend {
    fn name(&self) -> &'static str {
        "kv_append"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.src, self.positions]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.cache]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[
            ("n_tokens", self.n_tokens),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("capacity", self.capacity),
        ])?;
        c.buffer(
            "src",
            self.src,
            &[DType::F32],
            c.count(&[self.n_tokens, self.n_kv_heads, self.head_dim])?,
        )?;
        c.buffer("positions", self.positions, &[DType::I32], self.n_tokens)?;
        c.buffer(
            "cache",
            self.cache,
            &CACHE_DTYPES,
            c.count(&[self.n_kv_heads, self.capacity, self.head_dim])?,
        )?;
        Ok(())
    }
}
