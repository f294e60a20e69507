//! Helpers shared by the checks of kiln's backends: a seeded generator whose seed is
//! printed for replay, random values, little-endian byte conversions, running one
//! graph on any [`Backend`] with poisoned outputs, an error measure against a
//! reference, and [`op_cases`], the table of op cases that the backends' tests and
//! `kiln check-ops` run.
//!
//! The assertions panic with a message naming the case; [`run_on`] returns the
//! backend's errors so that tests can check them.

pub mod op_cases;

use kiln_core::{plan, Aliasing, Backend, Bindings, BufferId, BufferKind, Graph, Scratch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generator seeded with [`seed`]`(test)`.
pub fn rng(test: &str) -> StdRng {
    StdRng::seed_from_u64(seed(test))
}

/// The seed of the environment variable `KILN_TEST_SEED` (a `u64`) or, when it is
/// unset or unparsable, of the clock. It is printed to stderr as
/// `"{test}: KILN_TEST_SEED={seed}"` so that a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("KILN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: KILN_TEST_SEED={seed}");
    seed
}

/// `m` rows of `n` logits in -6..6 that are distinct and well apart: a shuffled
/// ladder of rungs of at most 0.4 plus noise of a quarter rung, so that the order of
/// every row (a router's top-k) is unambiguous in f32, under a sigmoid too.
pub fn ladder_logits(rng: &mut StdRng, m: usize, n: usize) -> Vec<f32> {
    use rand::seq::SliceRandom;
    let rung = (12.0 / n as f32).min(0.4);
    (0..m)
        .flat_map(|_| {
            let mut rungs: Vec<usize> = (0..n).collect();
            rungs.shuffle(rng);
            let noise = uniform(rng, n, rung / 4.0);
            rungs
                .into_iter()
                .zip(noise)
                .map(|(r, e)| (r as f32 - n as f32 / 2.0) * rung + e)
                .collect::<Vec<f32>>()
        })
        .collect()
}

/// `n` values uniform in `[-scale, scale)`, none exactly zero (a zero draw becomes
/// `scale / 2`), so that no element of an input is trivially zero.
pub fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-scale..scale);
            if v == 0.0 {
                scale / 2.0
            } else {
                v
            }
        })
        .collect()
}

/// Little-endian bytes of f32 values: 4 bytes per value, in order.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of i32 values: 4 bytes per value, in order.
pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values of little-endian bytes; a trailing partial group of fewer than 4 bytes
/// is ignored.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// i32 values of little-endian bytes; a trailing partial group of fewer than 4 bytes
/// is ignored.
pub fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `bytes` bytes of `0xff`: NaN in F32, F16 and BF16 and -1 in I32. Outputs hold
/// this before an op runs, so that an element the op fails to write cannot pass.
pub fn poison(bytes: usize) -> Vec<u8> {
    vec![0xff; bytes]
}

/// Allocates every persistent buffer of `graph` on `backend` and gives it the bytes
/// `inputs` gives it (which must be its exact size), or [`poison`]; buffers of block
/// formats are weights ([`Backend::upload_weight`]). Returns the buffers' ids and the
/// buffers, in id order.
pub fn upload_persistent<B: Backend>(
    backend: &B,
    graph: &Graph,
    inputs: &[(BufferId, Vec<u8>)],
) -> kiln_core::Result<(Vec<BufferId>, Vec<B::Buffer>)> {
    let persistent: Vec<BufferId> = (0..graph.buffers().len() as u32)
        .map(BufferId)
        .filter(|&id| graph.buffers()[id.index()].kind == BufferKind::Persistent)
        .collect();
    let mut bufs = Vec::new();
    for &id in &persistent {
        let desc = &graph.buffers()[id.index()];
        let bytes = desc.bytes();
        let mut buf = backend.alloc(bytes)?;
        let data = inputs
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| poison(bytes), |(_, d)| d.clone());
        if desc.dtype.is_quantized() {
            backend.upload_weight(&mut buf, &data, desc.dtype, &desc.shape)?;
        } else {
            backend.upload(&mut buf, &data)?;
        }
        bufs.push(buf);
    }
    Ok((persistent, bufs))
}

/// Binds `graph`'s persistent buffers, as [`upload_persistent`] makes them, with the
/// memory plan `plan(graph, aliasing)` and calls `f` with the bindings. Returns what
/// `f` returns, the buffers' ids and the buffers (in id order). Errors of the backend,
/// of binding and of `f` are returned.
pub fn with_persistent_bound<B: Backend, R>(
    backend: &B,
    graph: &Graph,
    inputs: &[(BufferId, Vec<u8>)],
    aliasing: Aliasing,
    f: impl FnOnce(&mut Bindings<'_, B::Buffer>) -> kiln_core::Result<R>,
) -> kiln_core::Result<(R, Vec<BufferId>, Vec<B::Buffer>)> {
    let (persistent, mut bufs) = upload_persistent(backend, graph, inputs)?;
    let memory = plan(graph, aliasing);
    let mut scratch = Scratch::new();
    scratch.ensure(backend, &memory)?;
    let result = {
        let mut bindings = Bindings::new(graph, &memory, &mut scratch)?;
        for (&id, buf) in persistent.iter().zip(bufs.iter_mut()) {
            bindings.bind(graph, id, buf)?;
        }
        f(&mut bindings)?
    };
    Ok((result, persistent, bufs))
}

/// Runs `graph` on `backend` with the memory plan `plan(graph, aliasing)`, its
/// persistent buffers as [`upload_persistent`] makes them. Returns the bytes of each
/// of `outputs`, in order; they must be persistent buffers (panics otherwise). Errors
/// of the backend and of binding are returned.
pub fn run_on<B: Backend>(
    backend: &B,
    graph: &Graph,
    inputs: &[(BufferId, Vec<u8>)],
    outputs: &[BufferId],
    aliasing: Aliasing,
) -> kiln_core::Result<Vec<Vec<u8>>> {
    let ((), persistent, bufs) = with_persistent_bound(backend, graph, inputs, aliasing, |b| {
        backend.execute(graph, b)
    })?;
    outputs
        .iter()
        .map(|&id| {
            let p = persistent
                .iter()
                .position(|&p| p == id)
                .expect("test outputs are persistent buffers");
            let mut out = vec![0u8; graph.buffers()[id.index()].bytes()];
            backend.download(&bufs[p], &mut out)?;
            Ok(out)
        })
        .collect()
}

/// Asserts that `got` matches the reference `want` (f32 or f64, widened to f64):
/// [`op_cases::nmse`] (equal lengths, a non-empty reference not all zeros, every
/// element of `got` finite) at most `nmse`. The measured error is printed to stderr;
/// `what` names the case in every message.
pub fn assert_close<W: Copy + Into<f64>>(what: &str, got: &[f32], want: &[W], nmse: f64) {
    let want: Vec<f64> = want.iter().map(|&w| w.into()).collect();
    let e = op_cases::nmse(got, &want).unwrap_or_else(|msg| panic!("{what}: {msg}"));
    eprintln!("{what}: nmse {e:.2e}");
    assert!(
        e <= nmse,
        "{what}: normalised MSE {e:.3e} exceeds {nmse:.1e}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_conversions_are_little_endian_and_invert() {
        assert_eq!(f32_bytes(&[1.0]), [0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(i32_bytes(&[-2, 258]), [0xfe, 0xff, 0xff, 0xff, 2, 1, 0, 0]);
        let floats = [1.5f32, -0.25, 3.0e-20];
        assert_eq!(f32s(&f32_bytes(&floats)), floats);
        let ints = [i32::MIN, -1, 7];
        assert_eq!(i32s(&i32_bytes(&ints)), ints);
    }

    #[test]
    fn poison_reads_as_nan_and_minus_one() {
        assert!(f32s(&poison(8)).iter().all(|v| v.is_nan()));
        assert_eq!(i32s(&poison(8)), [-1, -1]);
    }

    #[test]
    fn the_same_seed_gives_the_same_nonzero_values_in_range() {
        let a = uniform(&mut StdRng::seed_from_u64(7), 1000, 2.0);
        let b = uniform(&mut StdRng::seed_from_u64(7), 1000, 2.0);
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v != 0.0 && (-2.0..2.0).contains(&v)));
    }

    #[test]
    fn assert_close_accepts_f32_and_f64_references_within_tolerance() {
        assert_close("f64", &[1.0, 2.0], &[1.0f64, 2.001], 1e-6);
        assert_close("f32", &[1.0, 2.0], &[1.0f32, 2.0], 0.0);
    }

    #[test]
    #[should_panic(expected = "normalised MSE")]
    fn assert_close_rejects_an_error_above_tolerance() {
        assert_close("far", &[1.0, 2.0], &[1.0f64, 2.1], 1e-4);
    }

    #[test]
    #[should_panic(expected = "element 0 is NaN")]
    fn assert_close_rejects_an_unwritten_poisoned_element() {
        assert_close("poisoned", &f32s(&poison(8)), &[1.0f32, 2.0], 1.0);
    }

    #[test]
    #[should_panic(expected = "reference is all zeros")]
    fn assert_close_rejects_an_all_zero_reference() {
        assert_close("zeros", &[0.0, 0.0], &[0.0f64, 0.0], 1.0);
    }
}
