use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Dtypes a KV cache may hold.
pub const CACHE_DTYPES: [DType; 2] = [DType::F32, DType::F16];

/// Checks a cache-reading or -writing op's sequence slots: `n_slots > 0` and, when
/// given, an I32 `[n_tokens]` slot buffer.
pub(crate) fn check_slots(
    c: &Checker,
    slots: Option<BufferId>,
    n_slots: usize,
    n_tokens: usize,
) -> Result<()> {
    c.nonzero(&[("n_slots", n_slots)])?;
    c.ensure(i32::try_from(n_slots).is_ok(), || {
        format!("n_slots {n_slots} does not fit an I32 slot id")
    })?;
    c.optional("slots", slots, &[DType::I32], n_tokens)
}

/// Writes new key (or value) rows into a cache at the tokens' slots and positions.
///
/// A KV cache holds `n_slots` sequences (slots), each of `capacity` positions:
/// `[n_slots, n_kv_heads, capacity, head_dim]`, slot-major (one slot is the layout
/// `[n_kv_heads, capacity, head_dim]`). Every op that reads or writes a cache
/// ([`KvAppend`], [`super::QkvRopeAppend`], [`super::Attention`]) takes each token's
/// slot from the same `slots` operand:
///
/// - `slots`: optional I32 `[n_tokens]`, token `t`'s slot `s_t`, each in `0..n_slots`;
///   absent, every token is in slot 0. The CPU reference rejects a slot outside that
///   range with `InvalidArgument` naming the token; device backends skip the token as
///   they skip a position out of range.
///
/// This op:
///
/// - `src`: F32 `[n_tokens, n_kv_heads, head_dim]`.
/// - `positions`: I32 `[n_tokens]`, each in `0..capacity`. The CPU reference rejects a
///   position outside that range with `InvalidArgument`; device backends skip it.
/// - `cache`: `[n_slots, n_kv_heads, capacity, head_dim]`, F32 or F16 (rounded to
///   nearest).
///
/// `cache[s_t, h, positions[t], :] = src[t, h, :]`; every other cache row is unchanged.
/// When two tokens share a slot and a position, the later token's row is the one kept.
#[derive(Clone, Debug, PartialEq)]
pub struct KvAppend {
    pub src: BufferId,
    pub positions: BufferId,
    pub slots: Option<BufferId>,
    pub cache: BufferId,
    pub n_tokens: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub n_slots: usize,
}

impl OpSpec for KvAppend {
    fn name(&self) -> &'static str {
        "kv_append"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(&[self.src, self.positions], &[self.slots])
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
        check_slots(&c, self.slots, self.n_slots, self.n_tokens)?;
        c.buffer(
            "cache",
            self.cache,
            &CACHE_DTYPES,
            c.count(&[self.n_slots, self.n_kv_heads, self.capacity, self.head_dim])?,
        )?;
        Ok(())
    }
}
