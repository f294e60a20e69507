//! Reference for [`kiln_core::ops::Embedding`]; its optional Q8_1 copy of `out` is
//! [`super::write_q8_copy`].

use crate::{Inputs, Outputs};
use kiln_core::ops::Embedding;
use kiln_core::{quant, DType, Error, Result};
use rayon::prelude::*;

/// `out[t, :] = dequantize(table[ids[t], :])`: `table` holds `vocab` rows of `dim`
/// elements of `dtype`, `out` is `[ids.len(), dim]`. Errors on an id outside
/// `0..vocab`.
pub fn embedding(
    table: &[u8],
    dtype: DType,
    ids: &[i32],
    out: &mut [f32],
    vocab: usize,
    dim: usize,
) -> Result<()> {
    let row_bytes = dtype.bytes_for(dim)?;
    if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
        return Err(Error::invalid(
            "embedding",
            format!("token id {bad} is outside the vocabulary 0..{vocab}"),
        ));
    }
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .try_for_each(|(row, &id)| {
            let start = id as usize * row_bytes;
            quant::dequantize(dtype, &table[start..start + row_bytes], row)
        })
}

pub(crate) fn execute(op: &Embedding, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let dtype = ins.dtype(op.table);
    let table = &ins.bytes(op.table)[..dtype.bytes_for(op.vocab * op.dim)?];
    let ids = ins.view::<i32>(op.ids, op.n_tokens);
    let n = op.n_tokens * op.dim;
    let out = outs.view_mut::<f32>(op.out, n);
    embedding(table, dtype, ids, out, op.vocab, op.dim)?;
    super::write_q8_copy(outs, op.out, op.out_q8, n)
}
