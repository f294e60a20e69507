//! Helpers of the kernel catalogue's tests: weights in any format, the text of a
//! dispatch check's InvalidArgument, and device buffers from and to host bytes.
#![allow(dead_code)] // each test file uses a subset

use kiln_core::{quant, DType, Error, Result};
use kiln_testkit::uniform;
use rand::rngs::StdRng;
use rand::Rng;

/// `n` random values (uniform in [-1, 1), none zero) stored as `dtype`: its reference
/// encoding, bit-exact with ggml's for the block formats.
pub fn encoded(rng: &mut StdRng, dtype: DType, n: usize) -> Vec<u8> {
    let v = uniform(rng, n, 1.0);
    let mut bytes = vec![0u8; dtype.bytes_for(n).expect("n is a whole number of blocks")];
    quant::quantize(dtype, &v, &mut bytes).expect("finite values encode");
    bytes
}

/// `"op: message"` of an InvalidArgument; panics on success or any other error.
pub fn invalid<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::InvalidArgument { op, msg }) => format!("{op}: {msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// A device buffer holding `bytes`.
pub fn device(cuda: &kiln_cuda::CudaBackend, bytes: &[u8]) -> kiln_cuda::CudaBuffer {
    use kiln_core::Backend;
    let mut buf = cuda.alloc(bytes.len()).expect("device allocation");
    cuda.upload(&mut buf, bytes).expect("upload");
    buf
}

/// A device buffer holding a weight of `dtype` and `shape` (GGUF bytes), uploaded in
/// the backend's layout.
pub fn device_weight(
    cuda: &kiln_cuda::CudaBackend,
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
) -> kiln_cuda::CudaBuffer {
    use kiln_core::Backend;
    let mut buf = cuda.alloc(bytes.len()).expect("device allocation");
    cuda.upload_weight(&mut buf, bytes, dtype, shape)
        .expect("weight upload");
    buf
}

/// The first `len` bytes of a device buffer.
pub fn host(cuda: &kiln_cuda::CudaBackend, buf: &kiln_cuda::CudaBuffer, len: usize) -> Vec<u8> {
    use kiln_core::Backend;
    let mut bytes = vec![0u8; len];
    cuda.download(buf, &mut bytes).expect("download");
    bytes
}

/// Random expert ids for `m` tokens of `k` distinct experts each (as a router picks),
/// so that some experts get many tokens and some none.
pub fn expert_ids(rng: &mut StdRng, m: usize, k: usize, n_expert: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mut chosen: Vec<i32> = Vec::with_capacity(k);
        while chosen.len() < k {
            // Skewed towards the low experts: several tokens share them.
            let e = rng
                .random_range(0..n_expert)
                .min(rng.random_range(0..n_expert)) as i32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
    }
    ids
}
