//! Host memory for the CPU backend.

use kiln_core::{DeviceBuffer, Error, Result, SharedBytes};

/// Host memory of a fixed byte size, aligned to [`CpuBuffer::ALIGN`] bytes: either an
/// allocation of its own, zero-initialised and writable, or bytes borrowed from their
/// owner (a weight in a file's memory map), read-only.
#[derive(Clone, Debug)]
pub struct CpuBuffer {
    memory: Memory,
}

#[derive(Clone, Debug)]
enum Memory {
    /// `len` bytes at the start of `words`.
    Owned { words: Vec<u64>, len: usize },
    /// Bytes whose start is aligned to [`CpuBuffer::ALIGN`].
    Borrowed(SharedBytes),
}

impl CpuBuffer {
    /// The alignment of every buffer's bytes, enough to view them as f32, i32, f16
    /// or bf16 elements.
    pub const ALIGN: usize = 8;

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            memory: Memory::Owned {
                words: vec![0; len.div_ceil(8)],
                len,
            },
        }
    }

    /// A read-only buffer of `bytes`, borrowed rather than copied; `None` when they
    /// do not start at a multiple of [`CpuBuffer::ALIGN`].
    pub fn from_shared(bytes: SharedBytes) -> Option<Self> {
        (bytes.as_ref().as_ptr() as usize % Self::ALIGN == 0).then_some(Self {
            memory: Memory::Borrowed(bytes),
        })
    }

    /// All bytes of the buffer.
    pub fn bytes(&self) -> &[u8] {
        match &self.memory {
            Memory::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
            Memory::Borrowed(bytes) => bytes.as_ref(),
        }
    }

    /// All bytes of the buffer, writable. Errors for a borrowed buffer.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        match &mut self.memory {
            Memory::Owned { words, len } => Ok(&mut bytemuck::cast_slice_mut(words)[..*len]),
            Memory::Borrowed(_) => Err(Error::invalid(
                "cpu",
                "the buffer borrows a weight's memory, which is read-only",
            )),
        }
    }
}

impl DeviceBuffer for CpuBuffer {
    fn bytes(&self) -> usize {
        self.bytes().len()
    }

    fn borrowed(&self) -> bool {
        matches!(self.memory, Memory::Borrowed(_))
    }
}
