//! Reference implementations, one module per op family (named as in
//! [`kiln_core::ops`]). Each module has plain functions over slices — the reference
//! other backends are tested against — and the glue that runs its ops in a graph.

pub mod argmax;
pub mod attention;
pub mod cast;
pub mod delta_net;
pub mod elementwise;
pub mod embedding;
pub mod kv_cache;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod softmax;

use crate::{Inputs, Outputs};
use kiln_core::ops::Q8_COPY;
use kiln_core::{quant, BufferId, Op, Result};

/// Runs one validated op on bound memory.
pub(crate) fn execute(op: &Op, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    match op {
        Op::Embedding(op) => embedding::execute(op, ins, outs),
        Op::RmsNorm(op) => norm::execute_rms_norm(op, ins, outs),
        Op::AddRmsNorm(op) => norm::execute_add_rms_norm(op, ins, outs),
        Op::Rope(op) => rope::execute_rope(op, ins, outs),
        Op::HeadNormRope(op) => rope::execute_head_norm_rope(op, ins, outs),
        Op::QkvRopeAppend(op) => rope::execute_qkv_rope_append(op, ins, outs),
        Op::MatMul(op) => matmul::execute(op, ins, outs),
        Op::Elementwise(op) => elementwise::execute(op, ins, outs),
        Op::Glu(op) => elementwise::execute_glu(op, ins, outs),
        Op::Softmax(op) => softmax::execute(op, ins, outs),
        Op::KvAppend(op) => kv_cache::execute(op, ins, outs),
        Op::Attention(op) => attention::execute(op, ins, outs),
        Op::Argmax(op) => argmax::execute(op, ins, outs),
        Op::Cast(op) => cast::execute(op, ins, outs),
        Op::Sample(op) => sample::execute(op, ins, outs),
        Op::MoeRouter(op) => moe::execute_router(op, ins, outs),
        Op::MoeMatMul(op) => moe::execute_matmul(op, ins, outs),
        Op::MoeCombine(op) => moe::execute_combine(op, ins, outs),
        Op::CausalConv1d(op) => delta_net::execute_causal_conv1d(op, ins, outs),
        Op::GatedDeltaNet(op) => delta_net::execute_gated_delta_net(op, ins, outs),
        Op::GatedRmsNorm(op) => delta_net::execute_gated_rms_norm(op, ins, outs),
        Op::L2Norm(op) => delta_net::execute_l2_norm(op, ins, outs),
    }
}

/// Writes the first `n` f32 values of output `out` rounded to Q8_1 into output
/// `out_q8`, when the op has one ([`kiln_core::ops::Q8_COPY`]).
pub(crate) fn write_q8_copy(
    outs: &mut Outputs,
    out: BufferId,
    out_q8: Option<BufferId>,
    n: usize,
) -> Result<()> {
    let Some(out_q8) = out_q8 else {
        return Ok(());
    };
    let values = outs.view::<f32>(out, n).to_vec();
    let bytes = Q8_COPY.bytes_for(n)?;
    quant::quantize(Q8_COPY, &values, &mut outs.bytes_mut(out_q8)[..bytes])
}
