//! The memory planner: live ranges of transient buffers and greedy colouring into
//! shared allocations.

use crate::{BufferKind, Graph};

/// Allocation granularity of a slot, in bytes: every slot size is a multiple of it.
pub const SLOT_ALIGN: usize = 256;

/// The ops (by index) between which a transient buffer must keep its contents:
/// from the first op that touches it to the last, both inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveRange {
    pub first: usize,
    pub last: usize,
}

impl LiveRange {
    /// Whether two ranges share at least one op.
    pub fn overlaps(&self, other: &LiveRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Whether transient buffers may share memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aliasing {
    /// Buffers whose live ranges do not overlap may share one slot.
    On,
    /// Every transient buffer gets a slot of its own (for testing and debugging).
    Off,
}

/// Where each buffer of a graph lives during one execution.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Per buffer: its live range, for transient buffers some op touches.
    pub live: Vec<Option<LiveRange>>,
    /// Per buffer: the scratch slot backing it. `None` for persistent buffers (bound
    /// by the caller) and for transient buffers no op touches.
    pub slot_of: Vec<Option<usize>>,
    /// Size of each slot in bytes (a multiple of [`SLOT_ALIGN`]).
    pub slot_bytes: Vec<usize>,
    /// Bytes of all persistent buffers.
    pub persistent_bytes: usize,
    /// Bytes of all used transient buffers, each rounded up to [`SLOT_ALIGN`], as if
    /// none shared memory.
    pub transient_bytes_unaliased: usize,
}

impl MemoryPlan {
    /// Bytes of all scratch slots.
    pub fn transient_bytes(&self) -> usize {
        self.slot_bytes.iter().sum()
    }

    /// Peak device bytes of one execution with this plan: persistent plus scratch.
    pub fn peak_bytes(&self) -> usize {
        self.persistent_bytes + self.transient_bytes()
    }

    /// Peak device bytes had no transient buffers shared memory.
    pub fn peak_bytes_unaliased(&self) -> usize {
        self.persistent_bytes + self.transient_bytes_unaliased
    }
}

/// Ops a backend may run as one launch: up to this many consecutive ops, each reading
/// an output of the one before (a norm, the product that reads it and the gated unit
/// of that product's output).
pub const MAX_FUSED_OPS: usize = 3;

/// Computes every transient buffer's live range over `graph`'s op order: from the
/// first op that uses it to the last, extended through the following ops (up to
/// [`MAX_FUSED_OPS`] in all) while each reads an output of the one before (a backend
/// may run such a run as one launch, which must not find one operand in another's
/// memory).
pub fn live_ranges(graph: &Graph) -> Vec<Option<LiveRange>> {
    let mut live: Vec<Option<LiveRange>> = vec![None; graph.buffers().len()];
    let ops = graph.ops();
    // Whether op j + 1 reads an output of op j.
    let feeds_next = |j: usize| {
        let outputs = ops[j].outputs();
        ops.get(j + 1)
            .is_some_and(|next| next.inputs().iter().any(|id| outputs.contains(id)))
    };
    for (i, op) in ops.iter().enumerate() {
        let mut last = i;
        while last + 1 < i + MAX_FUSED_OPS && feeds_next(last) {
            last += 1;
        }
        for id in op.inputs().into_iter().chain(op.outputs()) {
            if graph.buffers()[id.index()].kind != BufferKind::Transient {
                continue;
            }
            let r = live[id.index()].get_or_insert(LiveRange { first: i, last });
            r.last = r.last.max(last);
        }
    }
    live
}

fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(SLOT_ALIGN).max(1) * SLOT_ALIGN
}

/// Plans `graph`'s memory.
///
/// With [`Aliasing::On`], buffers are taken in order of first use (larger first on
/// ties) and each goes to a free slot (one whose occupants all died before it is
/// born): the smallest free slot that fits, else the largest free slot, grown; a new
/// slot only when none is free. Taking buffers by start time makes this an optimal
/// colouring of the interval graph in slot count; best fit keeps bytes low.
pub fn plan(graph: &Graph, aliasing: Aliasing) -> MemoryPlan {
    let live = live_ranges(graph);
    let bufs = graph.buffers();
    let persistent_bytes = bufs
        .iter()
        .filter(|b| b.kind == BufferKind::Persistent)
        .map(|b| b.bytes())
        .sum();

    let mut order: Vec<usize> = (0..bufs.len()).filter(|&i| live[i].is_some()).collect();
    let transient_bytes_unaliased = order.iter().map(|&i| aligned(bufs[i].bytes())).sum();
    order.sort_by_key(|&i| {
        // `order` holds only buffers with a live range.
        let first = live[i].map_or(0, |r| r.first);
        (first, std::cmp::Reverse(bufs[i].bytes()), i)
    });

    let mut slot_of = vec![None; bufs.len()];
    let mut slot_bytes: Vec<usize> = Vec::new();
    let mut slot_free_after: Vec<usize> = Vec::new(); // last op index of the slot's latest occupant
    for i in order {
        let Some(range) = live[i] else { continue };
        let need = aligned(bufs[i].bytes());
        let free = |s: &usize| aliasing == Aliasing::On && slot_free_after[*s] < range.first;
        let best_fit = (0..slot_bytes.len())
            .filter(free)
            .filter(|&s| slot_bytes[s] >= need)
            .min_by_key(|&s| slot_bytes[s]);
        let largest_free = || {
            (0..slot_bytes.len())
                .filter(free)
                .max_by_key(|&s| slot_bytes[s])
        };
        let slot = match best_fit.or_else(largest_free) {
            Some(s) => {
                slot_bytes[s] = slot_bytes[s].max(need);
                slot_free_after[s] = range.last;
                s
            }
            None => {
                slot_bytes.push(need);
                slot_free_after.push(range.last);
                slot_bytes.len() - 1
            }
        };
        slot_of[i] = Some(slot);
    }

    MemoryPlan {
        live,
        slot_of,
        slot_bytes,
        persistent_bytes,
        transient_bytes_unaliased,
    }
}
