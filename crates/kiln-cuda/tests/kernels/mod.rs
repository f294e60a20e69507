//! Helpers shared by the kernel catalogue's tests: weights in any format, I32 bytes,
//! and the text of a dispatch check's InvalidArgument.
#![allow(dead_code)] // each test file uses a subset

use kiln_core::{quant, DType, Error, Result};
use rand::rngs::StdRng;
use rand::Rng;

/// `n` values uniform in `[-scale, scale)`, none exactly zero.
pub fn values(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
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

/// `n` random values (uniform in [-1, 1), none zero) stored as `dtype`: its reference
/// encoding, bit-exact with ggml's for the block formats.
pub fn encoded(rng: &mut StdRng, dtype: DType, n: usize) -> Vec<u8> {
    let v = values(rng, n, 1.0);
    let mut bytes = vec![0u8; dtype.bytes_for(n).expect("n is a whole number of blocks")];
    quant::quantize(dtype, &v, &mut bytes).expect("finite values encode");
    bytes
}

/// Little-endian bytes of i32 values.
pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// i32 values of little-endian bytes.
pub fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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

/// The first `len` bytes of a device buffer.
pub fn host(cuda: &kiln_cuda::CudaBackend, buf: &kiln_cuda::CudaBuffer, len: usize) -> Vec<u8> {
    use kiln_core::Backend;
    let mut bytes = vec![0u8; len];
    cuda.download(buf, &mut bytes).expect("download");
    bytes
}
