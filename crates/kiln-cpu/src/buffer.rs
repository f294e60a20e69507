//! Host memory for the CPU backend.

use kiln_core::DeviceBuffer;

/// A zero-initialised host allocation of a fixed byte size, aligned to 8 bytes so
/// that it can be viewed as f32, i32, f16 or bf16 elements.
#[derive(Clone, Debug)]
pub struct CpuBuffer {
    words: Vec<u64>,
    len: usize,
}

impl CpuBuffer {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// All bytes of the buffer.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// All bytes of the buffer, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }

    /// The first `n` elements as `T`. Callers have validated `n` against the
    /// buffer's declared size, which bindings check against the allocation.
    pub fn view<T: bytemuck::Pod>(&self, n: usize) -> &[T] {
        &bytemuck::cast_slice(&self.words)[..n]
    }

    /// The first `n` elements as `T`, writable.
    pub fn view_mut<T: bytemuck::Pod>(&mut self, n: usize) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..n]
    }
}

impl DeviceBuffer for CpuBuffer {
    fn bytes(&self) -> usize {
        self.len
    }
}
