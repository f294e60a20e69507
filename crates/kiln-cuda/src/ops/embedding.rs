//! Dispatch for [`kiln_core::ops::Embedding`] (kernels/embedding.cu).

use cudarc::driver::LaunchConfig;
use kiln_core::ops::WEIGHT_DTYPES;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::{config, grid_dim, launch, weight_tag, MAX_GRID_X, MAX_GRID_YZ};
use super::{check_bytes, check_nonzero, check_packed, check_q8_copy, count, to_u32};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::Embedding`].
pub const EMBEDDING: Family = Family {
    name: "embedding",
    source: KernelSource {
        name: "embedding.cu",
        text: include_str!("../../kernels/embedding.cu"),
    },
};

const OP: &str = "embedding";

/// Threads per block (whole warps, which the Q8_1 copy needs); each decodes 8
/// elements of a row.
const THREADS: u32 = 128;

/// The specialisation gathering rows of a `table` dtype (any of
/// [`kiln_core::ops::WEIGHT_DTYPES`]).
pub fn spec(table: DType) -> Result<KernelSpec> {
    Ok(EMBEDDING.spec(
        format!("embedding|table={table}"),
        format!("kiln::embedding<{}>", weight_tag(OP, table)?),
    ))
}

/// Every embedding specialisation.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    // Every weight dtype has a tag.
    WEIGHT_DTYPES.iter().filter_map(|&d| spec(d).ok()).collect()
}

/// An embedding's shape, dtypes and operand sizes in bytes: what [`EmbeddingArgs::check`]
/// validates before a launch.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingArgs {
    pub table: DType,
    pub n_tokens: usize,
    pub vocab: usize,
    pub dim: usize,
    pub table_bytes: usize,
    /// The dtype and row length the table buffer was packed for
    /// ([`CudaBuffer::packed`]); packed dtypes need `Some((table, dim))`.
    pub table_packed: Option<(DType, usize)>,
    pub ids_bytes: usize,
    pub out_bytes: usize,
    /// The size of the Q8_1 copy of `out` ([`kiln_core::ops::Q8_COPY`]), when there is
    /// one.
    pub out_q8_bytes: Option<usize>,
}

/// A checked embedding launch.
#[derive(Clone, Debug)]
pub struct EmbeddingPlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    vocab: u32,
    dim: u32,
    row_bytes: u64,
}

impl EmbeddingArgs {
    /// Checks every argument against the kernel's contract: non-zero sizes, a weight
    /// dtype whose blocks divide `dim`, buffers holding `vocab x dim` table elements,
    /// `n_tokens` I32 ids and `n_tokens x dim` F32 outputs, a Q8_1 copy (when given)
    /// of `n_tokens x dim` elements with `dim` a multiple of 32, and grid limits.
    pub fn check(&self) -> Result<EmbeddingPlan> {
        check_nonzero(
            OP,
            &[
                ("n_tokens", self.n_tokens),
                ("vocab", self.vocab),
                ("dim", self.dim),
            ],
        )?;
        let spec = spec(self.table)?;
        let bs = self.table.block_size();
        if self.dim % bs != 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "dim {} is not a multiple of {}'s block size {bs}",
                    self.dim, self.table
                ),
            ));
        }
        check_bytes(
            OP,
            "table",
            self.table_bytes,
            self.table,
            count(OP, &[self.vocab, self.dim])?,
        )?;
        check_packed(OP, "table", self.table, self.dim, self.table_packed)?;
        check_bytes(OP, "ids", self.ids_bytes, DType::I32, self.n_tokens)?;
        let out = count(OP, &[self.n_tokens, self.dim])?;
        check_bytes(OP, "out", self.out_bytes, DType::F32, out)?;
        check_q8_copy(OP, "out_q8", self.out_q8_bytes, out, self.dim)?;
        let tokens = grid_dim(OP, "n_tokens", self.n_tokens, MAX_GRID_X)?;
        let chunks = self.dim.div_ceil(8).div_ceil(THREADS as usize);
        let chunks = grid_dim(OP, "a row", chunks, MAX_GRID_YZ)?;
        Ok(EmbeddingPlan {
            spec,
            config: config((tokens, chunks, 1), THREADS, 0),
            vocab: to_u32(OP, "vocab", self.vocab)?,
            dim: to_u32(OP, "dim", self.dim)?,
            row_bytes: self.table.bytes_for(self.dim)? as u64,
        })
    }
}

/// `out[t, :] = dequantize(table[ids[t], :])` for `n_tokens` ids, and `out` rounded
/// to Q8_1 into `out_q8` when given, as [`kiln_core::ops::Embedding`] defines; an id
/// outside `0..vocab` gives a zero row.
#[allow(clippy::too_many_arguments)] // the op's operands and shape, each named
pub fn embedding(
    backend: &CudaBackend,
    table: &CudaBuffer,
    dtype: DType,
    ids: &CudaBuffer,
    out: &mut CudaBuffer,
    out_q8: Option<&mut CudaBuffer>,
    n_tokens: usize,
    vocab: usize,
    dim: usize,
) -> Result<()> {
    let plan = EmbeddingArgs {
        table: dtype,
        n_tokens,
        vocab,
        dim,
        table_bytes: table.bytes(),
        table_packed: table.packed(),
        ids_bytes: ids.bytes(),
        out_bytes: out.bytes(),
        out_q8_bytes: out_q8.as_ref().map(|q| q.bytes()),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(table.slice())
        .arg(ids.slice())
        .arg(out.slice_mut())
        .arg(out_q8.map(|q| q.slice_mut()))
        .arg(&plan.vocab)
        .arg(&plan.dim)
        .arg(&plan.row_bytes);
    // SAFETY: the arguments match `kiln::embedding<W>(const u8* table, const int* ids,
    // float* out, u8* out_q8, u32 vocab, u32 dim, u64 row_bytes)`; the buffers hold the
    // table, the ids and the output, out_q8 is null or holds n_tokens * dim / 32 Q8_1
    // blocks with dim a multiple of 32 (checked), and the kernel reads table rows only
    // for ids in 0..vocab.
    unsafe { launch(&kernel, &mut args, plan.config) }
}
