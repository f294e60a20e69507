//! A one-token [`kiln_core::ops::QkvRopeAppend`] fused into the decode attention that
//! reads its queries: kernels/attention.cu's `attention_decode` with a rotation, in
//! which every block rotates (and normalizes) its own query heads from the projection
//! and the block whose split holds the token's position writes the new key and value
//! rows into the caches before it reads them, so that the rotation and the append cost
//! no launch of their own (one per attention layer of a decode step).
//!
//! Compiling a graph ([`kiln_core::Backend::compile`]) fuses a pair where [`fusible`]
//! finds one. The fused launch writes the caches' rows and the attention's `out` (and
//! its copy) as the two ops would; it does not write the rotated queries `q_out`,
//! which is why only a pair whose `q_out` is transient and read by the attention alone
//! is fused.

use kiln_core::ops::{Attention, QkvRopeAppend, RopeParams};
use kiln_core::{Bindings, BufferKind, DType, DeviceBuffer, Error, Graph, Op, Result};

use super::attention::{
    decode_holds_group, launch_plan, AttentionArgs, AttentionKernel, AttentionOperands,
    AttentionShape, DecodeRotation,
};
use super::rope::{QkNormWeights, QkvRopeArgs};
use super::CacheSlots;
use crate::{CudaBackend, CudaBuffer};

const OP: &str = "qkv_rope_append+attention";

/// The ops at `index` and `index + 1` of `graph` when they are a fusible pair: a
/// one-token [`QkvRopeAppend`], then a one-token [`Attention`] over the same caches,
/// positions and slots whose queries are that op's `q_out`, transient and read by no
/// other op, with a group of query heads that one decode block holds.
pub fn fusible(graph: &Graph, index: usize) -> Option<(&QkvRopeAppend, &Attention)> {
    let (Some(Op::QkvRopeAppend(rope)), Some(Op::Attention(attention))) =
        (graph.ops().get(index), graph.ops().get(index + 1))
    else {
        return None;
    };
    let same_shape = rope.n_tokens == 1
        && attention.n_tokens == 1
        && attention.n_heads == rope.n_heads
        && attention.n_kv_heads == rope.n_kv_heads
        && attention.head_dim == rope.params.head_dim
        && attention.capacity == rope.capacity
        && attention.n_slots == rope.n_slots;
    let same_operands = attention.q == rope.q_out
        && attention.k_cache == rope.k_cache
        && attention.v_cache == rope.v_cache
        && attention.positions == rope.positions
        && attention.slots == rope.slots;
    let transient = graph
        .desc(rope.q_out)
        .is_ok_and(|d| d.kind == BufferKind::Transient);
    let read_elsewhere = graph
        .ops()
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != index + 1)
        .any(|(_, op)| op.inputs().contains(&rope.q_out));
    let group = rope.n_heads.checked_div(rope.n_kv_heads)?;
    (same_shape && same_operands && transient && !read_elsewhere && decode_holds_group(group))
        .then_some((rope, attention))
}

/// Whether the fused launch's outputs (the caches, the attention's `out` and copy) are
/// in memory of their own, apart from each other and from every input: the planner
/// keeps a pair's operands live through both ops, but bindings made otherwise may not.
pub fn operands_apart<B: DeviceBuffer>(
    rope: &QkvRopeAppend,
    attention: &Attention,
    bindings: &Bindings<'_, B>,
) -> bool {
    let norm = rope
        .norm
        .map_or([None, None], |n| [Some(n.q_weight), Some(n.k_weight)]);
    let inputs: Vec<_> = [rope.qkv, rope.positions]
        .into_iter()
        .chain(rope.slots)
        .chain(rope.freq_factors)
        .chain(norm.into_iter().flatten())
        .collect();
    let outputs: Vec<_> = [rope.k_cache, rope.v_cache, attention.out]
        .into_iter()
        .chain(attention.out_q8)
        .collect();
    let outputs_apart = outputs.iter().enumerate().all(|(i, &a)| {
        outputs[i + 1..]
            .iter()
            .all(|&b| !bindings.shares_memory(a, b))
    });
    outputs_apart
        && inputs
            .iter()
            .all(|&i| outputs.iter().all(|&o| !bindings.shares_memory(i, o)))
}

/// The rotation's operands: the token's projection `qkv` (`n_heads + 2 n_kv_heads`
/// heads), the frequency factors, the per-head norm and the rotary parameters.
pub struct RotationOperands<'a> {
    pub qkv: &'a CudaBuffer,
    pub freq_factors: Option<&'a CudaBuffer>,
    pub norm: Option<QkNormWeights<'a>>,
    pub params: RopeParams,
}

/// The attention's operands: the caches of `cache` it appends to and reads, the
/// token's position and slot, the buffer the unfused op would have written the
/// rotated queries to (`q_out`, checked, neither read nor written), the output and
/// its Q8_1 copy.
pub struct AttentionTarget<'a> {
    pub k_cache: &'a mut CudaBuffer,
    pub v_cache: &'a mut CudaBuffer,
    pub cache: DType,
    pub positions: &'a CudaBuffer,
    pub slots: CacheSlots<'a>,
    pub q_out: &'a CudaBuffer,
    pub out: &'a mut CudaBuffer,
    pub out_q8: Option<&'a mut CudaBuffer>,
}

/// [`kiln_core::ops::QkvRopeAppend`] then [`kiln_core::ops::Attention`] of one token
/// in one decode launch, with the outputs the two ops define (the caches' new rows,
/// `out` and its copy) and the same values, bit for bit, as the two launches compute.
/// Errors on the operands as the two ops' checks do, and unless `shape` is one token
/// whose group of query heads one decode block holds.
pub fn qkv_rope_attention(
    backend: &CudaBackend,
    rotation: RotationOperands<'_>,
    target: AttentionTarget<'_>,
    shape: &AttentionShape,
) -> Result<()> {
    let n_slots = target.slots.n_slots;
    QkvRopeArgs {
        n_tokens: shape.n_tokens,
        n_heads: shape.n_heads,
        n_kv_heads: shape.n_kv_heads,
        capacity: shape.capacity,
        n_slots,
        params: rotation.params,
        cache: target.cache,
        norm: rotation
            .norm
            .map(|n| (n.eps, n.q_weight.bytes(), n.k_weight.bytes())),
        qkv_bytes: rotation.qkv.bytes(),
        positions_bytes: target.positions.bytes(),
        slots_bytes: target.slots.ids.map(|s| s.bytes()),
        freq_factors_bytes: rotation.freq_factors.map(|f| f.bytes()),
        q_out_bytes: target.q_out.bytes(),
        k_cache_bytes: target.k_cache.bytes(),
        v_cache_bytes: target.v_cache.bytes(),
    }
    .check()?;
    if rotation.params.head_dim != shape.head_dim || shape.n_slots != n_slots {
        return Err(Error::invalid(
            OP,
            format!(
                "the rotation's head_dim {} and {n_slots} slots differ from the attention's {} and {}",
                rotation.params.head_dim, shape.head_dim, shape.n_slots
            ),
        ));
    }
    let plan = AttentionArgs {
        shape: *shape,
        cache: target.cache,
        q_bytes: target.q_out.bytes(),
        k_bytes: target.k_cache.bytes(),
        v_bytes: target.v_cache.bytes(),
        positions_bytes: target.positions.bytes(),
        slots_bytes: target.slots.ids.map(|s| s.bytes()),
        out_bytes: target.out.bytes(),
        out_q8_bytes: target.out_q8.as_ref().map(|b| b.bytes()),
    }
    .check_on(backend.multiprocessors())?;
    let group = shape.n_heads / shape.n_kv_heads;
    let one_block_per_group = matches!(plan.kernel, AttentionKernel::Decode { group: tier, .. } if tier as usize >= group);
    if shape.n_tokens != 1 || !one_block_per_group {
        return Err(Error::invalid(
            OP,
            format!(
                "the fused rotation runs in a one-token decode whose blocks hold a whole group; got {} tokens, a group of {group} and {:?}",
                shape.n_tokens, plan.kernel
            ),
        ));
    }
    let operands = AttentionOperands {
        q: rotation.qkv,
        k_cache: target.k_cache,
        v_cache: target.v_cache,
        positions: target.positions,
        slots: target.slots.ids,
        out: target.out,
        out_q8: target.out_q8,
    };
    let rotation = DecodeRotation {
        params: rotation.params,
        freq_factors: rotation.freq_factors,
        norm: rotation.norm,
    };
    launch_plan(backend, &plan, operands, shape.scale, Some(rotation))
}
