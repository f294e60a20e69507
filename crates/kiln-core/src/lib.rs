//! kiln-core: the backend-independent heart of kiln.
//!
//! - [`DType`]: element types, GGML block formats and their GGUF ids; [`quant`]
//!   defines each format's bytes.
//! - [`Error`]: the one error type.
//! - [`ops`]: the Op IR, each op's written definition and argument validation.
//! - [`Graph`]: buffers and ops; [`planner`]: live ranges and aliasing.
//! - [`Backend`]: what a compute backend implements.
//! - [`SharedBytes`]: bytes shared without copying (a file's memory map), which
//!   backends that compute on the host may use as weight memory.
//! - [`cache`]: the directory where kiln caches compiled kernels and converted
//!   models.

pub mod backend;
pub mod cache;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod ops;
pub mod planner;
pub mod quant;
mod shared;

pub use backend::{Backend, Bindings, DeviceBuffer, LaunchProfile, Scratch};
pub use dtype::DType;
pub use error::{Error, Result};
pub use graph::{BufferDesc, BufferId, BufferKind, Graph};
pub use ops::Op;
pub use planner::{plan, Aliasing, MemoryPlan};
pub use shared::SharedBytes;
