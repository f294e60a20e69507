//! Dispatch for [`kiln_core::ops::MoeRouter`] and [`kiln_core::ops::MoeCombine`]
//! (kernels/moe.cu) and [`kiln_core::ops::MoeMatMul`]: for up to
//! [`matmul::MATVEC_MAX_ROWS`] tokens the mat-vec kernels' routed forms
//! (kernels/matvec.cu's `moe_matvec` and `moe_matvec_packed`, one slot per grid row),
//! for more a grouped mat-mat on tensor cores (kernels/moe.cu's `moe_group` sorts the
//! slots by expert, kernels/matmul.cu's `moe_matmul` multiplies each expert's tiles).

use std::sync::{Mutex, MutexGuard, PoisonError};

use cudarc::driver::LaunchConfig;
use kiln_core::ops::Gating;
use kiln_core::{DType, DeviceBuffer, Error, Result};

use super::common::check_not_capturing;
use super::common::{
    allow_dynamic_shared, config, grid_dim, launch, weight_tag, MAX_GRID_X, MAX_GRID_YZ,
};
use super::matmul::{self, MatMulKernel, MATMUL, MATVEC};
use super::{check_bytes, check_nonzero, check_packed, count, grid_1d, to_u32};
use crate::constants::{MM_BM, MM_BN, MM_THREADS, MOE_GROUP_THREADS};
use crate::family::Family;
use crate::launch::KernelArgs;
use crate::registry::{KernelSource, KernelSpec};
use crate::{CudaBackend, CudaBuffer};

/// [`kiln_core::ops::MoeRouter`] and [`kiln_core::ops::MoeCombine`].
pub const MOE: Family = Family {
    name: "moe",
    source: KernelSource {
        name: "moe.cu",
        text: include_str!("../../kernels/moe.cu"),
    },
};

/// Threads per block of the router (one block per token).
pub(crate) const ROUTER_THREADS: u32 = 256;

/// The most experts a router kernel takes: their probabilities and flags fill at
/// most 40 KiB of shared memory, within the 48 KiB every launch may have.
pub const MAX_EXPERTS: usize = 8192;

/// The name of `gating` in kernel keys.
pub(crate) fn gating_tag(gating: Gating) -> &'static str {
    match gating {
        Gating::Softmax => "softmax",
        Gating::Sigmoid => "sigmoid",
    }
}

/// The router specialisation for `gating`.
pub fn router_spec(gating: Gating) -> KernelSpec {
    MOE.spec(
        format!("moe_router|gating={}", gating_tag(gating)),
        format!("kiln::moe_router<{}>", gating == Gating::Sigmoid),
    )
}

/// The combine specialisation.
pub fn combine_spec() -> KernelSpec {
    MOE.spec(
        "moe_combine|x=f32".to_string(),
        "kiln::moe_combine".to_string(),
    )
}

/// The expert-routed form of the one-row mat-vec `kernel` (`MatVec` or
/// `MatVecPacked` of tier 1) for weights of `dtype`.
pub fn matmul_spec(dtype: DType, kernel: MatMulKernel) -> Result<KernelSpec> {
    let tag = weight_tag(MATMUL_OP, dtype)?;
    match kernel {
        MatMulKernel::MatVec {
            m_tier: 1,
            rows,
            load,
            stages,
        } => Ok(MATVEC.spec(
            format!("moe_matvec|w={dtype}|rows={rows}|load={load}|stages={stages}"),
            format!("kiln::moe_matvec<{tag}, {rows}, {load}, {stages}>"),
        )),
        MatMulKernel::MatVecPacked {
            m_tier: 1,
            rows,
            aligned,
        } => Ok(MATVEC.spec(
            format!(
                "moe_matvec_packed|w={dtype}|rows={rows}|aligned={}",
                u8::from(aligned)
            ),
            format!("kiln::moe_matvec_packed<{tag}, {rows}, {aligned}>"),
        )),
        other => Err(Error::invalid(
            MATMUL_OP,
            format!("no expert-routed form of the kernel {other:?}"),
        )),
    }
}

/// The grouping launch of the grouped expert-routed mat-mat.
pub fn group_spec() -> KernelSpec {
    MOE.spec(
        "moe_group|ids=i32".to_string(),
        "kiln::moe_group".to_string(),
    )
}

/// The grouped expert-routed mat-mat for weights of `dtype`.
pub fn grouped_spec(dtype: DType) -> Result<KernelSpec> {
    let tag = weight_tag(MATMUL_OP, dtype)?;
    Ok(MATMUL.spec(
        format!("moe_matmul|w={dtype}"),
        format!("kiln::moe_matmul<{tag}>"),
    ))
}

/// Every specialisation of the family, and the expert-routed mat-vecs and grouped
/// mat-mats of every weight dtype.
pub(crate) fn all_specs() -> Vec<KernelSpec> {
    let mut specs = vec![
        router_spec(Gating::Softmax),
        router_spec(Gating::Sigmoid),
        combine_spec(),
        group_spec(),
    ];
    for dtype in kiln_core::ops::WEIGHT_DTYPES {
        for kernel in matmul::streaming_kernels(dtype, 1) {
            // Every weight dtype has a tag and every tier-1 kernel a routed form.
            specs.extend(matmul_spec(dtype, kernel).ok());
        }
        specs.extend(grouped_spec(dtype).ok());
    }
    specs
}

/// Errors unless `k <= n_expert`.
fn check_k(op: &str, k: usize, n_expert: usize) -> Result<()> {
    if k > n_expert {
        return Err(Error::invalid(
            op,
            format!("k = {k} experts per token exceeds n_expert = {n_expert}"),
        ));
    }
    Ok(())
}

/// Errors unless `k <= n_expert <= MAX_EXPERTS`.
fn check_experts(op: &str, k: usize, n_expert: usize) -> Result<()> {
    check_k(op, k, n_expert)?;
    if n_expert > MAX_EXPERTS {
        return Err(Error::invalid(
            op,
            format!("n_expert = {n_expert} exceeds the kernel's {MAX_EXPERTS}"),
        ));
    }
    Ok(())
}

/// A router's shape, settings and operand sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterArgs {
    pub m: usize,
    pub n_expert: usize,
    pub k: usize,
    pub gating: Gating,
    pub normalize: bool,
    pub logits_bytes: usize,
    pub ids_bytes: usize,
    pub weights_bytes: usize,
}

/// A checked router launch.
#[derive(Clone, Debug)]
pub struct RouterPlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    n_expert: u32,
    k: u32,
    normalize: u32,
}

impl RouterArgs {
    /// Checks non-zero sizes, `k <= n_expert <= MAX_EXPERTS`, `[m, n_expert]` F32
    /// logits and `[m, k]` I32 ids and F32 weights.
    pub fn check(&self) -> Result<RouterPlan> {
        const OP: &str = "moe_router";
        check_nonzero(
            OP,
            &[("m", self.m), ("n_expert", self.n_expert), ("k", self.k)],
        )?;
        check_experts(OP, self.k, self.n_expert)?;
        let logits = count(OP, &[self.m, self.n_expert])?;
        check_bytes(OP, "logits", self.logits_bytes, DType::F32, logits)?;
        let chosen = count(OP, &[self.m, self.k])?;
        check_bytes(OP, "ids", self.ids_bytes, DType::I32, chosen)?;
        check_bytes(OP, "weights", self.weights_bytes, DType::F32, chosen)?;
        let blocks = grid_dim(OP, "m", self.m, MAX_GRID_X)?;
        // At most MAX_EXPERTS * 5 bytes (checked).
        let shared = (self.n_expert * 5) as u32;
        Ok(RouterPlan {
            spec: router_spec(self.gating),
            config: config((blocks, 1, 1), ROUTER_THREADS, shared),
            n_expert: to_u32(OP, "n_expert", self.n_expert)?,
            k: to_u32(OP, "k", self.k)?,
            normalize: u32::from(self.normalize),
        })
    }
}

/// Each token's top-k experts and their weights, as [`kiln_core::ops::MoeRouter`]
/// defines, for the router of `op` (its buffer ids are not read).
pub fn moe_router(
    backend: &CudaBackend,
    logits: &CudaBuffer,
    ids: &mut CudaBuffer,
    weights: &mut CudaBuffer,
    op: &kiln_core::ops::MoeRouter,
) -> Result<()> {
    let plan = RouterArgs {
        m: op.m,
        n_expert: op.n_expert,
        k: op.k,
        gating: op.gating,
        normalize: op.normalize,
        logits_bytes: logits.bytes(),
        ids_bytes: ids.bytes(),
        weights_bytes: weights.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(logits.slice())
        .arg(ids.slice_mut())
        .arg(weights.slice_mut())
        .arg(&plan.n_expert)
        .arg(&plan.k)
        .arg(&plan.normalize);
    // SAFETY: the arguments match `kiln::moe_router<Sigmoid>(const float* logits,
    // int* ids, float* weights, u32 n_expert, u32 k, u32 normalize)`; logits hold
    // m * n_expert values, ids and weights m * k (checked); one block per token with
    // n_expert * 5 bytes of dynamic shared memory.
    unsafe { launch(&kernel, &mut args, plan.config) }
}

/// A combine's shape and operand sizes in bytes (`None` for an absent operand).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CombineArgs {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub y_bytes: usize,
    pub weights_bytes: usize,
    pub residual_bytes: Option<usize>,
    pub shared_bytes: Option<usize>,
    pub shared_gate_bytes: Option<usize>,
    pub out_bytes: usize,
}

/// A checked combine launch.
#[derive(Clone, Debug)]
pub struct CombinePlan {
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    len: u64,
    k: u32,
    n: u32,
}

impl CombineArgs {
    /// Checks non-zero sizes, a shared gate only with a shared expert, and F32
    /// operands: `y` `[m, k, n]`, `weights` `[m, k]`, `residual`, `shared` and `out`
    /// `[m, n]`, `shared_gate` `[m]`.
    pub fn check(&self) -> Result<CombinePlan> {
        const OP: &str = "moe_combine";
        check_nonzero(OP, &[("m", self.m), ("k", self.k), ("n", self.n)])?;
        if self.shared_gate_bytes.is_some() && self.shared_bytes.is_none() {
            return Err(Error::invalid(
                OP,
                "shared_gate is given without a shared expert output",
            ));
        }
        let len = count(OP, &[self.m, self.n])?;
        let f32s = |role: &str, bytes: usize, elements: usize| {
            check_bytes(OP, role, bytes, DType::F32, elements)
        };
        f32s("y", self.y_bytes, count(OP, &[len, self.k])?)?;
        f32s("weights", self.weights_bytes, count(OP, &[self.m, self.k])?)?;
        for (role, bytes, elements) in [
            ("residual", self.residual_bytes, len),
            ("shared", self.shared_bytes, len),
            ("shared_gate", self.shared_gate_bytes, self.m),
        ] {
            bytes.map_or(Ok(()), |b| f32s(role, b, elements))?;
        }
        f32s("out", self.out_bytes, len)?;
        Ok(CombinePlan {
            spec: combine_spec(),
            config: grid_1d(len),
            len: len as u64,
            k: to_u32(OP, "k", self.k)?,
            n: to_u32(OP, "n", self.n)?,
        })
    }
}

/// A combine's operands: the experts' outputs `y` `[m, k, n]`, their `weights`
/// `[m, k]`, and the optional residual, shared expert output (`[m, n]`) and shared
/// gate logits (`[m]`).
pub struct CombineInputs<'a> {
    pub y: &'a CudaBuffer,
    pub weights: &'a CudaBuffer,
    pub residual: Option<&'a CudaBuffer>,
    pub shared: Option<&'a CudaBuffer>,
    pub shared_gate: Option<&'a CudaBuffer>,
}

/// The weighted sum of [`kiln_core::ops::MoeCombine`] into `out` `[m, n]`.
pub fn moe_combine(
    backend: &CudaBackend,
    ins: CombineInputs<'_>,
    out: &mut CudaBuffer,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let plan = CombineArgs {
        m,
        k,
        n,
        y_bytes: ins.y.bytes(),
        weights_bytes: ins.weights.bytes(),
        residual_bytes: ins.residual.map(|b| b.bytes()),
        shared_bytes: ins.shared.map(|b| b.bytes()),
        shared_gate_bytes: ins.shared_gate.map(|b| b.bytes()),
        out_bytes: out.bytes(),
    }
    .check()?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(ins.y.slice())
        .arg(ins.weights.slice())
        .arg(ins.residual.map(|b| b.slice()))
        .arg(ins.shared.map(|b| b.slice()))
        .arg(ins.shared_gate.map(|b| b.slice()))
        .arg(out.slice_mut())
        .arg(&plan.len)
        .arg(&plan.k)
        .arg(&plan.n);
    // SAFETY: the arguments match `kiln::moe_combine(const float* y, const float*
    // weights, const float* residual, const float* shared, const float* shared_gate,
    // float* out, u64 len, u32 k, u32 n)`; every present buffer holds its elements
    // (checked), absent ones are null, and the grid strides over the m * n outputs.
    unsafe { launch(&kernel, &mut args, plan.config) }
}

const MATMUL_OP: &str = "moe_matmul";

/// An expert-routed product's shape, weight dtype and operand sizes in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeMatMulArgs {
    pub weight: DType,
    pub m: usize,
    pub k: usize,
    pub n_expert: usize,
    pub rows: usize,
    pub cols: usize,
    pub per_slot: bool,
    pub x_bytes: usize,
    pub ids_bytes: usize,
    pub w_bytes: usize,
    /// The dtype and row length the weight buffer was packed for
    /// ([`CudaBuffer::packed`]); packed dtypes need `Some((weight, cols))`.
    pub w_packed: Option<(DType, usize)>,
    pub out_bytes: usize,
}

/// Most experts the grouped mat-mat takes: two ints each fill at most 32 KiB of
/// shared memory in its grouping launch. Above, every token count runs the mat-vec.
pub const GROUP_MAX_EXPERTS: usize = 4096;

/// Which kernels run an expert-routed product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeMatMulKernel {
    /// The routed form of this one-row mat-vec, one slot per grid row.
    MatVec(MatMulKernel),
    /// `moe_group`, then `moe_matmul` over at most `max_tiles` tiles of slots.
    Grouped { max_tiles: u32 },
}

/// A checked expert-routed product launch: for the grouped mat-mat, `spec` and
/// `config` are `moe_matmul`'s and `group` holds `moe_group`'s.
#[derive(Clone, Debug)]
pub struct MoeMatMulPlan {
    pub kernel: MoeMatMulKernel,
    pub spec: KernelSpec,
    pub config: LaunchConfig,
    pub group: Option<(KernelSpec, LaunchConfig)>,
    slots: u32,
    k: u32,
    per_slot: u32,
    n_expert: u32,
    rows: u32,
    cols: u32,
    row_bytes: u64,
}

impl MoeMatMulArgs {
    /// The arguments of `op` in `graph`, its weight uploaded with `upload_weight`.
    pub fn of_op(graph: &kiln_core::Graph, op: &kiln_core::ops::MoeMatMul) -> Result<Self> {
        let bytes = |id| graph.desc(id).map(|d| d.bytes());
        let weight = graph.desc(op.w)?.dtype;
        Ok(Self {
            weight,
            m: op.m,
            k: op.k,
            n_expert: op.n_expert,
            rows: op.rows,
            cols: op.cols,
            per_slot: op.per_slot,
            x_bytes: bytes(op.x)?,
            ids_bytes: bytes(op.ids)?,
            w_bytes: bytes(op.w)?,
            w_packed: Some((weight, op.cols)),
            out_bytes: bytes(op.out)?,
        })
    }

    /// Checks non-zero sizes, `k <= n_expert`, a weight dtype whose blocks divide
    /// `cols`, and buffers of `[n_expert, rows, cols]` weights (in the planes layout for
    /// packed dtypes), `[m, k]` I32 ids, F32 `x` of `[m, k, cols]` (`per_slot`) or
    /// `[m, cols]` and F32 `out` of `[m, k, rows]`; `m * k` slots within the grid. Picks
    /// the one-row mat-vec the dense product of `rows` rows would run, routed.
    pub fn check(&self) -> Result<MoeMatMulPlan> {
        const OP: &str = MATMUL_OP;
        check_nonzero(
            OP,
            &[
                ("m", self.m),
                ("k", self.k),
                ("n_expert", self.n_expert),
                ("rows", self.rows),
                ("cols", self.cols),
            ],
        )?;
        check_k(OP, self.k, self.n_expert)?;
        weight_tag(OP, self.weight)?;
        let bs = self.weight.block_size();
        if self.cols % bs != 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "cols {} is not a multiple of {}'s block size {bs}",
                    self.cols, self.weight
                ),
            ));
        }
        let weight_elements = count(OP, &[self.n_expert, self.rows, self.cols])?;
        check_bytes(OP, "w", self.w_bytes, self.weight, weight_elements)?;
        check_packed(OP, "w", self.weight, self.cols, self.w_packed)?;
        let slots = count(OP, &[self.m, self.k])?;
        check_bytes(OP, "ids", self.ids_bytes, DType::I32, slots)?;
        let x_rows = if self.per_slot { slots } else { self.m };
        check_bytes(
            OP,
            "x",
            self.x_bytes,
            DType::F32,
            count(OP, &[x_rows, self.cols])?,
        )?;
        check_bytes(
            OP,
            "out",
            self.out_bytes,
            DType::F32,
            count(OP, &[slots, self.rows])?,
        )?;
        let row_bytes = self.weight.bytes_for(self.cols)?;
        let common = |kernel, spec, config, group| -> Result<MoeMatMulPlan> {
            Ok(MoeMatMulPlan {
                kernel,
                spec,
                config,
                group,
                slots: to_u32(OP, "m * k", slots)?,
                k: to_u32(OP, "k", self.k)?,
                per_slot: u32::from(self.per_slot),
                n_expert: to_u32(OP, "n_expert", self.n_expert)?,
                rows: to_u32(OP, "rows", self.rows)?,
                cols: to_u32(OP, "cols", self.cols)?,
                row_bytes: row_bytes as u64,
            })
        };
        if self.m > matmul::MATVEC_MAX_ROWS && self.n_expert <= GROUP_MAX_EXPERTS {
            // Each expert's run of slots needs ceil(count / MM_BM) tiles: at most one
            // partial tile per expert that has slots.
            let max_tiles = slots.div_ceil(MM_BM as usize) + self.n_expert.min(slots);
            let tiles = grid_dim(OP, "tiles of slots", max_tiles, MAX_GRID_YZ)?;
            let blocks = grid_dim(OP, "rows", self.rows.div_ceil(MM_BN as usize), MAX_GRID_X)?;
            // At most 8 * GROUP_MAX_EXPERTS bytes.
            let group_shared = (8 * self.n_expert) as u32;
            let group = (
                group_spec(),
                config((1, 1, 1), MOE_GROUP_THREADS, group_shared),
            );
            return common(
                MoeMatMulKernel::Grouped { max_tiles: tiles },
                grouped_spec(self.weight)?,
                config((blocks, tiles, 1), MM_THREADS, 0),
                Some(group),
            );
        }
        let kernel = matmul::matvec_kernel(self.weight, 1, self.rows, self.cols, row_bytes, false);
        let (threads, rows_per_block, shared) =
            matmul::matvec_block_shape(self.weight, kernel, self.cols).ok_or_else(|| {
                Error::invalid(OP, "the mat-vec choice returned a mat-mat kernel")
            })?;
        let blocks = grid_dim(
            OP,
            "rows",
            self.rows.div_ceil(rows_per_block as usize),
            MAX_GRID_X,
        )?;
        let slot_blocks = grid_dim(OP, "m * k", slots, MAX_GRID_YZ)?;
        common(
            MoeMatMulKernel::MatVec(kernel),
            matmul_spec(self.weight, kernel)?,
            config((blocks, slot_blocks, 1), threads, shared),
            None,
        )
    }
}

impl MoeMatMulPlan {
    /// Appends the routed mat-vec's shape parameters, in its kernels' order: `u32 k,
    /// u32 per_slot, u32 n_expert, u32 rows, u32 cols, u64 row_bytes`.
    pub(crate) fn push_shape(&self, args: &mut KernelArgs<'_>) {
        args.arg(&self.k)
            .arg(&self.per_slot)
            .arg(&self.n_expert)
            .arg(&self.rows)
            .arg(&self.cols)
            .arg(&self.row_bytes);
    }

    /// Every kernel the product launches, in order.
    pub fn specs(&self) -> Vec<KernelSpec> {
        let group = self.group.iter().map(|(spec, _)| spec.clone());
        group.chain([self.spec.clone()]).collect()
    }
}

/// The grouped mat-mat's scratch memory: the slots in expert order and the tile table,
/// the newest (largest) of each last; earlier ones stay allocated for the executables
/// recorded with them.
#[derive(Default)]
pub(crate) struct Routing {
    lists: Mutex<RoutingLists>,
}

/// The routing lists of [`Routing`].
#[derive(Default)]
pub(crate) struct RoutingLists {
    order: Vec<CudaBuffer>,
    tiles: Vec<CudaBuffer>,
}

impl Routing {
    /// The lists, locked for the caller, holding at least `order_bytes` and
    /// `tiles_bytes` (allocated where missing; never while a graph is captured).
    fn lists(
        &self,
        backend: &CudaBackend,
        order_bytes: usize,
        tiles_bytes: usize,
    ) -> Result<MutexGuard<'_, RoutingLists>> {
        let mut held = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        let lists = &mut *held;
        for (list, bytes) in [
            (&mut lists.order, order_bytes),
            (&mut lists.tiles, tiles_bytes),
        ] {
            if list.last().map_or(0, |b| b.bytes()) < bytes {
                check_not_capturing(
                    backend,
                    MATMUL_OP,
                    "the grouped expert-routed mat-mat",
                    bytes,
                )?;
                list.push(kiln_core::Backend::alloc(backend, bytes)?);
            }
        }
        Ok(held)
    }
}

/// The expert-routed product of [`kiln_core::ops::MoeMatMul`] `op` (its buffer ids are
/// not read) into `out`, for weights `w` of `dtype` stacked `[n_expert, rows, cols]`.
/// Each slot's product is the one-row mat-vec of its expert's slice, in f32; a slot
/// whose expert id is outside `0..n_expert` gets NaN outputs (the device cannot stop
/// the graph; the CPU reference returns an error).
pub fn moe_matmul(
    backend: &CudaBackend,
    x: &CudaBuffer,
    ids: &CudaBuffer,
    w: &CudaBuffer,
    dtype: DType,
    out: &mut CudaBuffer,
    op: &kiln_core::ops::MoeMatMul,
) -> Result<()> {
    let plan = MoeMatMulArgs {
        weight: dtype,
        m: op.m,
        k: op.k,
        n_expert: op.n_expert,
        rows: op.rows,
        cols: op.cols,
        per_slot: op.per_slot,
        x_bytes: x.bytes(),
        ids_bytes: ids.bytes(),
        w_bytes: w.bytes(),
        w_packed: w.packed(),
        out_bytes: out.bytes(),
    }
    .check()?;
    if let MoeMatMulKernel::Grouped { max_tiles } = plan.kernel {
        return grouped(backend, &plan, max_tiles, x, ids, w, out);
    }
    let kernel = backend.kernel(&plan.spec)?;
    allow_dynamic_shared(&kernel, &plan.config)?;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(ids.slice())
        .arg(x.slice())
        .arg(out.slice_mut());
    plan.push_shape(&mut args);
    // SAFETY: the arguments match `kiln::moe_matvec<W, ROWS, LOAD, STAGES>` and
    // `kiln::moe_matvec_packed<W, R, ALIGNED>`: (const u8* w, const int* ids, const
    // float* x, float* out, u32 k, u32 per_slot, u32 n_expert, u32 rows, u32 cols, u64
    // row_bytes). w holds n_expert * rows rows of row_bytes (checked, packed as the
    // kernel reads them), ids m * k ids, x the slots' or tokens' rows of cols, out m * k
    // rows of `rows`; grid y is the m * k slots, grid x and the shared memory the
    // mat-vec's for `rows` rows; a kernel reads a weight slice only for an id in
    // 0..n_expert.
    unsafe { launch(&kernel, &mut args, plan.config) }
}

/// The grouped mat-mat of a checked `plan`: `moe_group` into the backend's routing
/// lists, then `moe_matmul` over the tiles.
#[allow(clippy::too_many_arguments)] // the plan and the op's operands, each named
fn grouped(
    backend: &CudaBackend,
    plan: &MoeMatMulPlan,
    max_tiles: u32,
    x: &CudaBuffer,
    ids: &CudaBuffer,
    w: &CudaBuffer,
    out: &mut CudaBuffer,
) -> Result<()> {
    let Some((group_spec, group_config)) = &plan.group else {
        return Err(Error::invalid(
            MATMUL_OP,
            "a grouped plan without its grouping launch",
        ));
    };
    let mut lists =
        backend
            .moe_routing()
            .lists(backend, 4 * plan.slots as usize, 12 * max_tiles as usize)?;
    let lists = &mut *lists;
    let (order, tiles) = (
        lists.order.last_mut().expect("allocated by lists"),
        lists.tiles.last_mut().expect("allocated by lists"),
    );
    let group = backend.kernel(group_spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(ids.slice())
        .arg(order.slice_mut())
        .arg(tiles.slice_mut())
        .arg(out.slice_mut())
        .arg(&plan.slots)
        .arg(&plan.n_expert)
        .arg(&plan.rows)
        .arg(&max_tiles)
        .serialized();
    // SAFETY: the arguments match `kiln::moe_group(const int* ids, int* order, int*
    // tiles, float* out, u32 slots, u32 n_expert, u32 rows, u32 max_tiles)`: ids holds
    // `slots` ids and out `slots` rows of `rows` (checked), order `slots` ints and tiles
    // 3 * max_tiles (allocated above), max_tiles bounds the tiles the slots can need;
    // one block with 8 * n_expert bytes of dynamic shared memory (at most 32 KiB).
    unsafe { launch(&group, &mut args, *group_config) }?;
    let kernel = backend.kernel(&plan.spec)?;
    let mut args = KernelArgs::new(backend);
    args.arg(w.slice())
        .arg(order.slice())
        .arg(tiles.slice())
        .arg(x.slice())
        .arg(out.slice_mut())
        .arg(&plan.k)
        .arg(&plan.per_slot)
        .arg(&plan.rows)
        .arg(&plan.cols)
        .arg(&plan.row_bytes)
        .serialized();
    // SAFETY: the arguments match `kiln::moe_matmul<W>(const u8* w, const int* order,
    // const int* tiles, const float* x, float* out, u32 k, u32 per_slot, u32 rows, u32
    // cols, u64 row_bytes)`: moe_group, before it in stream order, wrote every tile of
    // the grid (an expert in 0..n_expert and a run of order, or -1) and the slots of
    // order, each below m * k; w holds n_expert * rows rows of row_bytes, x the slots'
    // or tokens' rows of cols, out m * k rows of `rows` (checked).
    unsafe { launch(&kernel, &mut args, plan.config) }
}
