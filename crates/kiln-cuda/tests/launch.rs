//! Programmatic dependent launch: a chain of dependent kernels, each reading what the
//! one before it wrote and overwriting what earlier ones read, gives the same bits
//! with each kernel allowed to start before the one before it ends as without.

mod common;
mod kernels;
use common::*;
use kernels::*;
use kiln_core::ops::ElementwiseKind;
use kiln_core::DType;
use kiln_cuda::ops::{elementwise, matmul, norm};
use kiln_cuda::{CacheConfig, CudaBackend, CudaBuffer};

const DIM: usize = 4096;

/// A backend of this test's own, so that turning programmatic launch on and off does
/// not reach the launches of other tests.
fn own_backend() -> CudaBackend {
    CacheConfig::from_env()
        .and_then(|cache| CudaBackend::with_cache(0, cache))
        .unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

/// Six rounds, for each weight, of `y = W x`, `z = y + x`, `x = rms_norm(z)`, from
/// `x0`; returns the last x.
fn chain(
    cuda: &CudaBackend,
    weights: &[(DType, CudaBuffer)],
    x0: &[f32],
    programmatic: bool,
) -> Vec<f32> {
    assert_eq!(cuda.set_programmatic_launch(programmatic), programmatic);
    let mut x = device(cuda, &f32_bytes(x0));
    let mut y = device(cuda, &poison(4 * DIM));
    let mut z = device(cuda, &poison(4 * DIM));
    for _ in 0..6 {
        for (dtype, w) in weights {
            matmul::matmul(cuda, &x, w, *dtype, None, &mut y, 1, DIM, DIM).unwrap();
            elementwise::elementwise(cuda, ElementwiseKind::Add, &y, &x, &mut z, None, DIM)
                .unwrap();
            norm::rms_norm(cuda, &z, None, &mut x, 1, DIM, 1e-6).unwrap();
        }
    }
    f32s(&host(cuda, &x, 4 * DIM))
}

#[test]
#[ignore = "needs a CUDA device"]
fn chained_kernels_give_the_bits_of_plain_launches() {
    let cuda = own_backend();
    assert!(
        cuda.set_programmatic_launch(true),
        "this test needs a device with programmatic dependent launch (compute capability 9.0+)"
    );
    let mut rng = rng("chained_kernels_give_the_bits_of_plain_launches");
    // Without a Q8_1 copy of x, Q4_0 and Q8_0 run on the packed mat-vec (it loads
    // weights before it waits), F16 on the staged one.
    let weights: Vec<(DType, CudaBuffer)> = [DType::Q4_0, DType::Q8_0, DType::F16]
        .into_iter()
        .map(|dtype| {
            let bytes = encoded(&mut rng, dtype, DIM * DIM);
            (dtype, device_weight(&cuda, &bytes, dtype, &[DIM, DIM]))
        })
        .collect();
    let x0 = uniform(&mut rng, DIM, 1.0);
    let plain = chain(&cuda, &weights, &x0, false);
    let chained = chain(&cuda, &weights, &x0, true);
    // An unweighted RMSNorm output has a mean square of 1: the chain ran to the end.
    let mean_square = plain.iter().map(|v| v * v).sum::<f32>() / DIM as f32;
    assert!(
        (mean_square - 1.0).abs() < 1e-3,
        "mean square {mean_square}"
    );
    let differing = plain
        .iter()
        .zip(&chained)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "{differing} of {DIM} values differ");
}

#[test]
#[ignore = "needs a CUDA device"]
fn programmatic_launch_is_on_by_default_where_the_device_has_it() {
    let cuda = own_backend();
    let has_it = cuda.device().compute_capability().0 >= 9;
    let env_off =
        std::env::var(kiln_cuda::backend::PROGRAMMATIC_LAUNCH_ENV).is_ok_and(|v| v == "0");
    assert_eq!(cuda.programmatic_launch(), has_it && !env_off);
    assert!(!cuda.set_programmatic_launch(false));
    assert!(!cuda.programmatic_launch());
    assert_eq!(cuda.set_programmatic_launch(true), has_it);
    assert_eq!(cuda.programmatic_launch(), has_it);
}
