//! kiln-cuda: kiln's CUDA backend.
//!
//! - [`context`]: driver checks (an error, never a panic, where there is no driver),
//!   the device, its context and its one stream.
//! - [`registry`]: compiles kernel specialisations on demand (generic over a
//!   [`registry::KernelCompiler`]) and caches them in memory and on disk.
//! - [`nvrtc`]: the NVRTC compiler behind the registry (CUBIN for the device's own
//!   architecture, PTX only as a fallback).
//! - [`manifest`]: every kernel family, its embedded source and specialisations.
//! - [`constants`]: the constants dispatch code and kernels share, as a generated
//!   header.
//! - [`ops`]: dispatch functions, one module per op family, checking every argument
//!   before launch.
//! - [`packing`]: the planes layout in which the backend stores quantized weights.
//! - [`backend`]: [`CudaBackend`], implementing [`kiln_core::Backend`].
//! - [`executable`]: [`CudaExecutable`], a graph compiled to launch records and
//!   replayed as a CUDA graph.
//! - [`fusion`]: the runs of ops compiling a graph launches as one, and their switches.
//! - [`startup`]: measurements of one compile, one load, cold and warm start.
//! - [`timing`]: device-side timing of launches with CUDA events.

pub mod backend;
pub mod constants;
pub mod context;
pub mod executable;
pub mod family;
pub mod fusion;
pub(crate) mod launch;
pub mod manifest;
pub mod nvrtc;
pub mod ops;
pub mod packing;
pub mod registry;
pub mod startup;
pub mod timing;

pub use backend::{CudaBackend, CudaBuffer};
pub use context::CudaDevice;
pub use executable::CudaExecutable;
pub use registry::{CacheConfig, CacheMode, KernelRegistry, KernelSpec};
