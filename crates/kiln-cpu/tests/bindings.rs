//! Binding persistent memory: missing, undersized and misplaced bindings are errors
//! that name the buffer; uploads and downloads past a buffer's end are refused;
//! weights borrowed from shared memory are read in place and never written.

use kiln_core::ops::{Elementwise, ElementwiseKind};
use kiln_core::{
    plan, Aliasing, Backend, Bindings, DType, DeviceBuffer, Graph, Scratch, SharedBytes,
};
use kiln_cpu::{CpuBackend, CpuBuffer};

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

#[test]
fn shared_weights_are_borrowed_read_in_place_and_never_written() {
    let cpu = CpuBackend;
    let (g, [x, _, y]) = graph();
    let p = plan(&g, Aliasing::On);
    let values: Vec<u8> = (1..=8u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
    // A heap buffer (aligned to 8 and more), like a file's map.
    let shared = SharedBytes::new(values.clone());
    let mut weight = cpu.share_weight(&shared, DType::F32, &[8]).unwrap();
    assert!(weight.borrowed());
    assert_eq!(weight.bytes(), &values[..]);
    assert_eq!(
        weight.bytes().as_ptr(),
        shared.as_ref().as_ptr(),
        "not a copy"
    );
    let err = cpu.upload(&mut weight, &[0; 4]).unwrap_err().to_string();
    assert!(err.contains("read-only"), "{err}");

    // Read as an input: y = 3x.
    let mut scratch = Scratch::new();
    scratch.ensure(&cpu, &p).unwrap();
    let mut out = cpu.alloc(32).unwrap();
    let mut b = Bindings::new(&g, &p, &mut scratch).unwrap();
    b.bind(&g, x, &mut weight).unwrap();
    b.bind(&g, y, &mut out).unwrap();
    cpu.execute(&g, &mut b).unwrap();
    let mut back = [0u8; 32];
    cpu.download(&out, &mut back).unwrap();
    let want: Vec<u8> = (1..=8u32)
        .flat_map(|v| (3.0 * v as f32).to_le_bytes())
        .collect();
    assert_eq!(&back[..], &want[..]);

    // Bound as an output: an error naming the buffer, before anything runs.
    let mut scratch = Scratch::new();
    scratch.ensure(&cpu, &p).unwrap();
    let (mut input, mut weight) = (cpu.alloc(32).unwrap(), weight.clone());
    let mut b = Bindings::new(&g, &p, &mut scratch).unwrap();
    b.bind(&g, x, &mut input).unwrap();
    b.bind(&g, y, &mut weight).unwrap();
    let err = cpu.execute(&g, &mut b).unwrap_err().to_string();
    assert!(err.contains("\"y\"") && err.contains("read-only"), "{err}");
    assert_eq!(weight.bytes(), &values[..]);
}

#[test]
fn misaligned_shared_weights_are_copied() {
    let cpu = CpuBackend;
    let bytes = SharedBytes::new(vec![5u8; 41]);
    let odd = bytes.slice(1..41).unwrap();
    assert!(CpuBuffer::from_shared(odd.clone()).is_none());
    let weight = cpu.share_weight(&odd, DType::F32, &[10]).unwrap();
    assert!(!weight.borrowed());
    assert_eq!(weight.bytes(), odd.as_ref());
}
