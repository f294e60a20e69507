//! Planner properties over random graphs: buffers live at the same time never share
//! a slot, slots fit their occupants, persistent buffers are never planned, and a
//! graph executed with aliasing gives bit-identical outputs to one executed without.

mod common;
use common::*;
use kiln_core::ops::{Elementwise, ElementwiseKind};
use kiln_core::planner::{live_ranges, LiveRange};
use kiln_core::{plan, Aliasing, BufferId, BufferKind, DType, Graph};
use kiln_cpu::CpuBackend;
use proptest::prelude::*;

/// Lengths of the buffer size classes; an op's operands all come from one class.
const CLASS_LEN: [usize; 3] = [16, 100, 1000];
const KINDS: [ElementwiseKind; 4] = [
    ElementwiseKind::Add,
    ElementwiseKind::Mul,
    ElementwiseKind::SiluMul,
    ElementwiseKind::GeluMul,
];

/// One op of a random graph: size class, kind, and choices (taken modulo the number
/// of candidates) of its two inputs and its output.
type OpChoice = (usize, usize, usize, usize, usize);

struct RandomGraph {
    graph: Graph,
    inputs: Vec<(BufferId, usize)>,
    outputs: Vec<BufferId>,
}

/// Builds a valid graph: per class one persistent input and one persistent output,
/// `n_transient` transient buffers per class; each op reads inputs or transients
/// already written and writes a transient (or, last, every output).
fn build(n_transient: usize, choices: &[OpChoice]) -> RandomGraph {
    let mut g = Graph::new();
    let mut readable: Vec<Vec<BufferId>> = Vec::new();
    let mut transients: Vec<Vec<BufferId>> = Vec::new();
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    for (c, &len) in CLASS_LEN.iter().enumerate() {
        let input = g.persistent(format!("in{c}"), DType::F32, &[len]).unwrap();
        inputs.push((input, len));
        outputs.push(g.persistent(format!("out{c}"), DType::F32, &[len]).unwrap());
        readable.push(vec![input]);
        transients.push(
            (0..n_transient)
                .map(|i| {
                    g.transient(format!("t{c}_{i}"), DType::F32, &[len])
                        .unwrap()
                })
                .collect(),
        );
    }
    let push = |g: &mut Graph,
                class: usize,
                kind: usize,
                a: usize,
                b: usize,
                out: BufferId,
                readable: &[BufferId]| {
        let (a, b) = (readable[a % readable.len()], readable[b % readable.len()]);
        let op = Elementwise {
            kind: KINDS[kind % 4],
            a,
            b,
            out,
            out_q8: None,
            len: CLASS_LEN[class],
        };
        g.push(op).unwrap();
    };
    for &(class, kind, a, b, o) in choices {
        let class = class % CLASS_LEN.len();
        // The output must differ from both inputs.
        let candidates: Vec<BufferId> = transients[class]
            .iter()
            .copied()
            .filter(|t| {
                let r = &readable[class];
                *t != r[a % r.len()] && *t != r[b % r.len()]
            })
            .collect();
        let Some(&out) = candidates.get(o % candidates.len().max(1)) else {
            continue;
        };
        push(&mut g, class, kind, a, b, out, &readable[class]);
        if !readable[class].contains(&out) {
            readable[class].push(out);
        }
    }
    for (class, &out) in outputs.iter().enumerate() {
        let r = readable[class].clone();
        push(&mut g, class, 0, r.len() - 1, r.len() / 2, out, &r);
    }
    RandomGraph {
        graph: g,
        inputs,
        outputs,
    }
}

/// Live ranges recomputed here, independently of the planner: from a buffer's first
/// use to its last, where a use by an op whose output the next op reads also counts
/// as a use by that next op, and by the one after it when that one reads the next
/// op's output in turn (up to three such ops may run as one launch).
fn expected_ranges(g: &Graph) -> Vec<Option<LiveRange>> {
    let ops = g.ops();
    let feeds_next = |i: usize| {
        ops.get(i + 1)
            .is_some_and(|next| ops[i].outputs().iter().any(|o| next.inputs().contains(o)))
    };
    (0..g.buffers().len())
        .map(|b| {
            let id = BufferId(b as u32);
            let uses: Vec<usize> = ops
                .iter()
                .enumerate()
                .filter(|(_, op)| op.inputs().contains(&id) || op.outputs().contains(&id))
                .map(|(i, _)| match (feeds_next(i), feeds_next(i + 1)) {
                    (true, true) => i + 2,
                    (true, false) => i + 1,
                    (false, _) => i,
                })
                .collect();
            let first = ops
                .iter()
                .position(|op| op.inputs().contains(&id) || op.outputs().contains(&id));
            (g.buffers()[b].kind == BufferKind::Transient && !uses.is_empty()).then(|| LiveRange {
                first: first.unwrap(),
                last: *uses.iter().max().unwrap(),
            })
        })
        .collect()
}

fn op_choices() -> impl Strategy<Value = Vec<OpChoice>> {
    prop::collection::vec(
        (0..3usize, 0..4usize, 0..64usize, 0..64usize, 0..64usize),
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn live_buffers_never_share_a_slot(n_transient in 1usize..12, choices in op_choices()) {
        let rg = build(n_transient, &choices);
        let g = &rg.graph;
        let p = plan(g, Aliasing::On);
        prop_assert_eq!(&live_ranges(g), &expected_ranges(g));
        let bufs = g.buffers();
        for (i, b) in bufs.iter().enumerate() {
            match (b.kind, p.live[i], p.slot_of[i]) {
                (BufferKind::Persistent, _, slot) => prop_assert!(slot.is_none(), "persistent {} planned", b.name),
                (BufferKind::Transient, Some(_), Some(s)) => prop_assert!(p.slot_bytes[s] >= b.bytes()),
                (BufferKind::Transient, None, slot) => prop_assert!(slot.is_none()),
                (BufferKind::Transient, Some(_), None) => prop_assert!(false, "live {} has no slot", b.name),
            }
        }
        for i in 0..bufs.len() {
            for j in i + 1..bufs.len() {
                if let (Some(ri), Some(rj), Some(si), Some(sj)) = (p.live[i], p.live[j], p.slot_of[i], p.slot_of[j]) {
                    prop_assert!(!(ri.overlaps(&rj) && si == sj),
                        "{} {:?} and {} {:?} share slot {}", bufs[i].name, ri, bufs[j].name, rj, si);
                }
            }
        }
        let unaliased = plan(g, Aliasing::Off);
        prop_assert_eq!(unaliased.transient_bytes(), unaliased.transient_bytes_unaliased);
        prop_assert!(p.peak_bytes() <= p.peak_bytes_unaliased());
        prop_assert_eq!(p.peak_bytes_unaliased(), unaliased.peak_bytes());
    }

    #[test]
    fn aliasing_gives_bit_identical_outputs(seed in any::<u64>(), n_transient in 1usize..8, choices in op_choices()) {
        let rg = build(n_transient, &choices);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let inputs: Vec<(BufferId, Vec<u8>)> =
            rg.inputs.iter().map(|&(id, len)| (id, f32_bytes(&randn(&mut rng, len, 1.0)))).collect();
        let aliased = run_on(&CpuBackend, &rg.graph, &inputs, &rg.outputs, Aliasing::On).unwrap();
        let separate = run_on(&CpuBackend, &rg.graph, &inputs, &rg.outputs, Aliasing::Off).unwrap();
        prop_assert_eq!(aliased, separate);
    }
}

#[test]
fn aliasing_saves_memory_on_a_chain() {
    // x -> t0 -> t1 -> ... -> t9 -> out: each op reads the one before's output, so
    // an op's operands stay live through the next two (a run of three ops a backend
    // may fuse), and four transients are live at once.
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[1024]).unwrap();
    let out = g.persistent("out", DType::F32, &[1024]).unwrap();
    let mut prev = x;
    for i in 0..10 {
        let t = g.transient(format!("t{i}"), DType::F32, &[1024]).unwrap();
        g.push(Elementwise {
            kind: ElementwiseKind::Add,
            a: prev,
            b: x,
            out: t,
            out_q8: None,
            len: 1024,
        })
        .unwrap();
        prev = t;
    }
    g.push(Elementwise {
        kind: ElementwiseKind::Mul,
        a: prev,
        b: x,
        out,
        out_q8: None,
        len: 1024,
    })
    .unwrap();
    let p = plan(&g, Aliasing::On);
    assert_eq!(p.slot_bytes.len(), 4, "a chain needs four slots");
    assert_eq!(p.transient_bytes(), 4 * 4096);
    assert_eq!(p.transient_bytes_unaliased, 10 * 4096);
    assert_eq!(p.persistent_bytes, 2 * 4096);
}
