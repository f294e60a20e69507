//! The manifest: every kernel family (each declared by its `ops/<family>.rs` module),
//! the shared headers, and every specialisation, so that precompilation can enumerate
//! them all.

use kiln_core::{BufferId, Error, Graph, Op, Result};

pub use crate::family::{headers, spec_derivations, Family};
use crate::ops;
use crate::registry::KernelSpec;

/// Every family.
pub const FAMILIES: [Family; 14] = [
    ops::cast::CAST,
    ops::elementwise::ELEMENTWISE,
    ops::norm::NORM,
    ops::embedding::EMBEDDING,
    ops::rope::ROPE,
    ops::matmul::MATVEC,
    ops::matmul::MATMUL,
    ops::softmax::SOFTMAX,
    ops::kv_cache::KV_CACHE,
    ops::attention::ATTENTION,
    ops::argmax::ARGMAX,
    ops::sample::SAMPLE,
    ops::moe::MOE,
    ops::delta_net::DELTA_NET,
];

/// Every specialisation of every family.
pub fn all_specs() -> Vec<KernelSpec> {
    let mut specs = ops::cast::all_specs();
    specs.extend(ops::elementwise::all_specs());
    specs.extend(ops::norm::all_specs());
    specs.extend(ops::embedding::all_specs());
    specs.extend(ops::rope::all_specs());
    specs.extend(ops::matmul::all_specs());
    specs.extend(ops::fused_matvec::all_specs());
    specs.extend(ops::sibling_matvec::all_specs());
    specs.extend(ops::softmax::all_specs());
    specs.extend(ops::kv_cache::all_specs());
    specs.extend(ops::attention::all_specs());
    specs.push(ops::argmax::spec());
    specs.push(ops::sample::spec());
    specs.extend(ops::moe::all_specs());
    specs.extend(ops::moe_epilogue::all_specs());
    specs.extend(ops::router_matvec::all_specs());
    specs.extend(ops::delta_net::all_specs());
    specs
}

/// Whether the CUDA backend has a kernel for `op`: its kind and the parameters the
/// kernels are limited in (every weight, cache and float dtype the IR allows has one).
/// The limits: attention's head dimension, with or without a Q8_1 copy of its
/// output ([`ops::attention::check_head_dim`]); the router's expert count
/// ([`ops::moe::MAX_EXPERTS`]).
pub fn has_kernel(op: &Op) -> bool {
    match op {
        Op::Attention(a) => ops::attention::check_head_dim(a.head_dim, a.out_q8.is_some()).is_ok(),
        Op::MoeRouter(r) => r.n_expert <= ops::moe::MAX_EXPERTS,
        _ => true,
    }
}

/// The specialisation that runs `op` of `graph` (for a matmul on the cuBLASLt path,
/// the weight decoder; [`specs_for_graph`] adds the cast it also launches). Errors
/// with [`kiln_core::Error::Unsupported`] for ops the CUDA backend does not implement.
pub fn spec_for_op(op: &Op, graph: &Graph) -> Result<KernelSpec> {
    // Never empty: every op launches a kernel.
    Ok(specs_for_op(op, graph)?.swap_remove(0))
}

/// Every specialisation `op` of `graph` launches, [`spec_for_op`]'s first.
fn specs_for_op(op: &Op, graph: &Graph) -> Result<Vec<KernelSpec>> {
    if !has_kernel(op) {
        return Err(match op {
            Op::MoeRouter(_) => moe_unsupported(op),
            _ => Error::Unsupported(format!(
                "cuda backend: op {} with these parameters has no kernel: {op:?}",
                op.name()
            )),
        });
    }
    let dtype = |id: BufferId| graph.desc(id).map(|d| d.dtype);
    let bytes = |id: BufferId| graph.desc(id).map(|d| d.bytes());
    let optional = |id: Option<BufferId>| id.map(bytes).transpose();
    let spec = match op {
        Op::Cast(c) => ops::cast::spec(dtype(c.x)?, dtype(c.out)?),
        Op::Elementwise(e) => Ok(ops::elementwise::spec(e.kind)),
        Op::RmsNorm(n) => Ok(ops::norm::spec(n.weight.is_some(), false)),
        Op::AddRmsNorm(n) => Ok(ops::norm::spec(n.weight.is_some(), true)),
        Op::Embedding(e) => ops::embedding::spec(dtype(e.table)?),
        Op::Rope(r) => Ok(ops::rope::spec(r.params.style, false)),
        Op::HeadNormRope(r) => Ok(ops::rope::spec(r.params.style, true)),
        Op::QkvRopeAppend(r) => ops::rope::qkv_spec(r.params.style, dtype(r.k_cache)?),
        Op::Glu(g) => Ok(ops::elementwise::glu_spec(g.kind)),
        Op::MatMul(m) => {
            // Where cuBLASLt is missing the kernels of the other path are compiled when
            // the graph is.
            return ops::matmul::MatMulArgs::of_op(graph, m, ops::matmul::GEMM_MIN_ROWS)?
                .check()
                .and_then(|plan| plan.specs());
        }
        Op::Softmax(s) => Ok(ops::softmax::spec(s.causal_offset.is_some())),
        Op::KvAppend(k) => ops::kv_cache::spec(dtype(k.cache)?),
        Op::Attention(a) => ops::attention::AttentionArgs {
            shape: a.into(),
            cache: dtype(a.k_cache)?,
            q_bytes: bytes(a.q)?,
            k_bytes: bytes(a.k_cache)?,
            v_bytes: bytes(a.v_cache)?,
            positions_bytes: bytes(a.positions)?,
            slots_bytes: optional(a.slots)?,
            out_bytes: bytes(a.out)?,
            out_q8_bytes: optional(a.out_q8)?,
        }
        .check()
        .map(|plan| plan.spec),
        Op::Argmax(_) => Ok(ops::argmax::spec()),
        Op::Sample(s) => Ok(ops::sample::spec_for(&s.params)),
        Op::MoeRouter(r) => Ok(ops::moe::router_spec(r.gating)),
        Op::MoeCombine(_) => Ok(ops::moe::combine_spec()),
        Op::MoeMatMul(m) => {
            return ops::moe::MoeMatMulArgs::of_op(graph, m)?
                .check()
                .map(|plan| plan.specs());
        }
        Op::CausalConv1d(_) => Ok(ops::delta_net::conv_spec()),
        Op::GatedDeltaNet(d) => ops::delta_net::DeltaNetArgs::of_op(d, graph)?
            .check()
            .map(|plan| plan.spec),
        Op::GatedRmsNorm(_) => Ok(ops::delta_net::norm_spec(true)),
        Op::L2Norm(_) => Ok(ops::delta_net::norm_spec(false)),
    };
    spec.map(|s| vec![s])
}

/// The error for a router of more than [`ops::moe::MAX_EXPERTS`] experts.
fn moe_unsupported(op: &Op) -> Error {
    Error::Unsupported(format!(
        "cuda backend: op {} has more experts than the kernel's {}; run this model with \
         --device cpu",
        op.name(),
        ops::moe::MAX_EXPERTS
    ))
}

/// The distinct specialisations `graph`'s ops need, in first-use order.
pub fn specs_for_graph(graph: &Graph) -> Result<Vec<KernelSpec>> {
    let mut specs: Vec<KernelSpec> = Vec::new();
    for op in graph.ops() {
        for spec in specs_for_op(op, graph)? {
            if !specs.iter().any(|s| s.key == spec.key) {
                specs.push(spec);
            }
        }
    }
    Ok(specs)
}
