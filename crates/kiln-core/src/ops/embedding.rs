use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// Gathers rows of a (possibly quantized) matrix.
///
/// `out[t, :] = dequantize(table[ids[t], :])` for `t` in `0..n_tokens`.
///
/// - `table`: `[vocab, dim]`, any dtype of [`super::WEIGHT_DTYPES`]; `dim` a multiple of
///   its block size.
/// - `ids`: I32 `[n_tokens]`, each in `0..vocab`. The CPU reference rejects an id
///   outside that range with `InvalidArgument`; device backends write a zero row for
///   it rather than read out of bounds.
/// - `out`: F32 `[n_tokens, dim]`.
/// - `out_q8`: when given, Q8_1 `[n_tokens, dim]` (`dim` a multiple of 32) and receives
///   `out` rounded to it ([`super::Q8_COPY`]): the copy a quantized mat-vec over the
///   gathered rows reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub table: BufferId,
    pub ids: BufferId,
    pub out: BufferId,
    pub out_q8: Option<BufferId>,
    pub n_tokens: usize,
    pub vocab: usize,
    pub dim: usize,
}

impl OpSpec for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.table, self.ids]
    }
    fn outputs(&self) -> Vec<BufferId> {
        ids(&[self.out], &[self.out_q8])
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[
            ("n_tokens", self.n_tokens),
            ("vocab", self.vocab),
            ("dim", self.dim),
        ])?;
        c.weight("table", self.table, self.vocab, self.dim)?;
        c.buffer("ids", self.ids, &[DType::I32], self.n_tokens)?;
        let n = c.count(&[self.n_tokens, self.dim])?;
        c.buffer("out", self.out, &[DType::F32], n)?;
        c.q8_copy("out_q8", self.out_q8, n, self.dim)
    }
}
