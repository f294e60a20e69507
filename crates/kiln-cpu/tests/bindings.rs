//! Binding persistent memory: missing, undersized and misplaced bindings are errors
//! that name the buffer; uploads and downloads past a buffer's end are refused.

use kiln_core::ops::{Elementwise, ElementwiseKind};
use kiln_core::{plan, Aliasing, Backend, Bindings, DType, Graph, Scratch};
use kiln_cpu::CpuBackend;

fn graph() -> (Graph, [kiln_core::BufferId; 3]) {
    let mut g = Graph::new();
    let x = g.persistent("x", DType::F32, &[8]).unwrap();
    let t = g.transient("t", DType::F32, &[8]).unwrap();
    let y = g.persistent("y", DType::F32, &[8]).unwrap();
    let add = |a, b, out| Elementwise {
        kind: ElementwiseKind::Add,
        a,
        b,
        out,
        out_q8: None,
        len: 8,
    };
    g.push(add(x, x, t)).unwrap();
    g.push(add(t, x, y)).unwrap();
    (g, [x, t, y])
}

#[test]
fn unbound_undersized_and_transient_bindings_are_errors() {
    let cpu = CpuBackend;
    let (g, [x, t, y]) = graph();
    let p = plan(&g, Aliasing::On);
    let mut scratch = Scratch::new();
    scratch.ensure(&cpu, &p).unwrap();
    let (mut bx, mut small, mut by, mut other) = (
        cpu.alloc(32).unwrap(),
        cpu.alloc(31).unwrap(),
        cpu.alloc(32).unwrap(),
        cpu.alloc(32).unwrap(),
    );
    let mut b = Bindings::new(&g, &p, &mut scratch).unwrap();
    let err = b.bind(&g, y, &mut small).unwrap_err().to_string();
    assert!(
        err.contains("\"y\"") && err.contains("32") && err.contains("31"),
        "{err}"
    );
    let err = b.bind(&g, t, &mut other).unwrap_err().to_string();
    assert!(err.contains("transient"), "{err}");
    b.bind(&g, x, &mut bx).unwrap();
    let err = cpu.execute(&g, &mut b).unwrap_err().to_string();
    assert!(err.contains("\"y\"") && err.contains("not bound"), "{err}");
    b.bind(&g, y, &mut by).unwrap();
    cpu.execute(&g, &mut b).unwrap();
}

#[test]
fn scratch_must_fit_the_plan_and_transfers_must_fit_buffers() {
    let cpu = CpuBackend;
    let (g, _) = graph();
    let p = plan(&g, Aliasing::On);
    let mut empty: Scratch<kiln_cpu::CpuBuffer> = Scratch::new();
    assert!(Bindings::new(&g, &p, &mut empty).is_err());
    let mut buf = cpu.alloc(8).unwrap();
    assert!(cpu.upload(&mut buf, &[1; 9]).is_err());
    assert!(cpu.download(&buf, &mut [0; 9]).is_err());
    cpu.upload(&mut buf, &[7; 8]).unwrap();
    let mut back = [0u8; 8];
    cpu.download(&buf, &mut back).unwrap();
    assert_eq!(back, [7; 8]);
}
