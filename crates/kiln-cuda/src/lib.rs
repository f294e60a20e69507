//! kiln-cuda: kiln's CUDA backend.
//!
//! - [`registry`]: compiles kernel specialisations on demand (generic over a
//!   [`registry::KernelCompiler`]) and caches them in memory and on disk.

pub mod registry;

pub use registry::{CacheConfig, CacheMode, KernelRegistry, KernelSpec};
