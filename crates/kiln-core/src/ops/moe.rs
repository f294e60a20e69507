//! Mixture of experts: [`MoeRouter`] chooses each token's experts, [`MoeMatMul`]
//! multiplies by the chosen experts' weights only, and [`MoeCombine`] sums the
//! experts' outputs weighted by the router (with the shared expert and the residual).
//!
//! The router's logits `x · W_gateᵀ` are an ordinary [`super::MatMul`] over the
//! `[n_expert, n_embd]` gate weight; so is a shared expert and its one-row gate.

use super::{ids, Checker, OpSpec};
use crate::{BufferId, DType, Graph, Result};

/// How a router turns an expert's logit `l` into its probability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gating {
    /// `exp(l - max) / sum exp(l' - max)` over all `n_expert` logits of the token.
    Softmax,
    /// `1 / (1 + exp(-l))`, each expert on its own.
    Sigmoid,
}

/// Top-k expert selection of each token.
///
/// For token `t` of `logits` (F32 `[m, n_expert]`): `p[e]` is the probability of
/// expert `e` under `gating`; the chosen experts are the `k` largest `p[e]` in
/// descending order, ties going to the lower expert index, NaN never chosen before a
/// number. `ids` (I32 `[m, k]`) receives them; `weights` (F32 `[m, k]`) receives
/// their `p[e]`, divided by the sum of the `k` chosen `p[e]` when `normalize` is set
/// (Qwen3-MoE's `norm_topk_prob`). Computed in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeRouter {
    pub logits: BufferId,
    pub ids: BufferId,
    pub weights: BufferId,
    pub m: usize,
    pub n_expert: usize,
    pub k: usize,
    pub gating: Gating,
    pub normalize: bool,
}

impl OpSpec for MoeRouter {
    fn name(&self) -> &'static str {
        "moe_router"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.logits]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.ids, self.weights]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("m", self.m), ("n_expert", self.n_expert), ("k", self.k)])?;
        check_experts(&c, self.k, self.n_expert)?;
        c.buffer(
            "logits",
            self.logits,
            &[DType::F32],
            c.count(&[self.m, self.n_expert])?,
        )?;
        let chosen = c.count(&[self.m, self.k])?;
        c.buffer("ids", self.ids, &[DType::I32], chosen)?;
        c.buffer("weights", self.weights, &[DType::F32], chosen)?;
        Ok(())
    }
}

/// Errors unless `k <= n_expert` and the expert indices fit I32.
fn check_experts(c: &Checker<'_>, k: usize, n_expert: usize) -> Result<()> {
    c.ensure(k <= n_expert, || {
        format!("k = {k} experts per token exceeds n_expert = {n_expert}")
    })?;
    c.ensure(i32::try_from(n_expert).is_ok(), || {
        format!("n_expert {n_expert} does not fit an I32 index")
    })
}

/// Expert-routed matrix product: each token multiplies its `k` chosen experts' weight
/// matrices, and reads nothing of the other experts.
///
/// - `w`: the experts' weights stacked, `[n_expert, rows, cols]` row-major, any dtype
///   of [`super::WEIGHT_DTYPES`]; `cols` a multiple of the block size.
/// - `ids`: I32 `[m, k]`, token `t`'s experts (each in `0..n_expert`, else the run
///   fails with an error naming the token and id).
/// - `x`: F32 `[m, k, cols]` when `per_slot` (slot `j` of token `t` has its own input,
///   as the experts' down projection has), else `[m, cols]` (one input per token,
///   shared by its `k` experts, as the gate and up projections have).
/// - `out`: F32 `[m, k, rows]`,
///   `out[t, j, r] = sum_c x[t, (j if per_slot), c] * dequantize(w)[ids[t, j], r, c]`,
///   accumulated in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeMatMul {
    pub x: BufferId,
    pub ids: BufferId,
    pub w: BufferId,
    pub out: BufferId,
    pub m: usize,
    pub k: usize,
    pub n_expert: usize,
    pub rows: usize,
    pub cols: usize,
    pub per_slot: bool,
}

impl OpSpec for MoeMatMul {
    fn name(&self) -> &'static str {
        "moe_matmul"
    }
    fn inputs(&self) -> Vec<BufferId> {
        vec![self.x, self.ids, self.w]
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[
            ("m", self.m),
            ("k", self.k),
            ("n_expert", self.n_expert),
            ("rows", self.rows),
            ("cols", self.cols),
        ])?;
        check_experts(&c, self.k, self.n_expert)?;
        let w_rows = c.count(&[self.n_expert, self.rows])?;
        c.weight("w", self.w, w_rows, self.cols)?;
        let shape = &graph.desc(self.w)?.shape;
        c.ensure(shape == &[self.n_expert, self.rows, self.cols], || {
            format!(
                "w has shape {shape:?}, expected [n_expert, rows, cols] = [{}, {}, {}]",
                self.n_expert, self.rows, self.cols
            )
        })?;
        c.buffer("ids", self.ids, &[DType::I32], c.count(&[self.m, self.k])?)?;
        let slots = if self.per_slot { self.k } else { 1 };
        c.buffer(
            "x",
            self.x,
            &[DType::F32],
            c.count(&[self.m, slots, self.cols])?,
        )?;
        c.buffer(
            "out",
            self.out,
            &[DType::F32],
            c.count(&[self.m, self.k, self.rows])?,
        )?;
        Ok(())
    }
}

/// The weighted sum of each token's expert outputs, with the optional residual and
/// shared expert.
///
/// For token `t` and column `i` of `n`:
/// `out[t, i] = residual[t, i] + sum_{j < k} weights[t, j] * y[t, j, i]
///              + sigmoid(shared_gate[t]) * shared[t, i]`,
/// with `y` F32 `[m, k, n]`, `weights` F32 `[m, k]`, the optional `residual` and
/// `shared` F32 `[m, n]`, the optional `shared_gate` F32 `[m]` (a logit; without it
/// the shared expert's factor is 1; it needs `shared`), `out` F32 `[m, n]`. Summed in
/// f32 in the order written: residual, slots `0..k`, shared expert.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeCombine {
    pub y: BufferId,
    pub weights: BufferId,
    pub residual: Option<BufferId>,
    pub shared: Option<BufferId>,
    pub shared_gate: Option<BufferId>,
    pub out: BufferId,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl OpSpec for MoeCombine {
    fn name(&self) -> &'static str {
        "moe_combine"
    }
    fn inputs(&self) -> Vec<BufferId> {
        ids(
            &[self.y, self.weights],
            &[self.residual, self.shared, self.shared_gate],
        )
    }
    fn outputs(&self) -> Vec<BufferId> {
        vec![self.out]
    }
    fn validate(&self, graph: &Graph) -> Result<()> {
        let c = Checker::new(graph, self.name());
        c.nonzero(&[("m", self.m), ("k", self.k), ("n", self.n)])?;
        c.ensure(self.shared_gate.is_none() || self.shared.is_some(), || {
            "shared_gate is given without a shared expert output".to_string()
        })?;
        let f32s = [DType::F32];
        let rows = c.count(&[self.m, self.n])?;
        c.buffer("y", self.y, &f32s, c.count(&[self.m, self.k, self.n])?)?;
        c.buffer("weights", self.weights, &f32s, c.count(&[self.m, self.k])?)?;
        c.optional("residual", self.residual, &f32s, rows)?;
        c.optional("shared", self.shared, &f32s, rows)?;
        c.optional("shared_gate", self.shared_gate, &f32s, self.m)?;
        c.buffer("out", self.out, &f32s, rows)?;
        Ok(())
    }
}
