//! kiln-cuda: kiln's CUDA backend.
//!
//! - [`context`]: driver checks (an error, never a panic, where there is no driver),
//!   the device, its context and its one stream.
//! - [`registry`]: compiles kernel specialisations on demand (generic over a
//!   [`registry::KernelCompiler`]) and caches them in memory and on disk.
//! - [`nvrtc`]: the NVRTC compiler behind the registry (CUBIN for the device's own
//!   architecture, PTX only as a fallback).

pub mod context;
pub mod nvrtc;
pub mod registry;

pub use context::CudaDevice;
pub use registry::{CacheConfig, CacheMode, KernelRegistry, KernelSpec};
