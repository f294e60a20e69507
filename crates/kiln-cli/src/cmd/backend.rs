//! Running a job on the backend of a resolved device.

use super::device::{resolve, Device, DeviceChoice};
use kiln_core::{Backend, DType, Error, Graph, Result};
use kiln_cpu::CpuBackend;
use kiln_cuda::{CacheConfig, CudaBackend};

/// Work that runs on any backend (a generic closure, which Rust closures cannot be).
pub trait BackendJob {
    type Output;
    /// Runs the job on `backend` (a backend type owns its state, so a job may keep
    /// it, as `kiln serve` keeps its model, in a boxed trait object).
    fn run<BE: Backend + 'static>(self, backend: BE) -> Result<Self::Output>;
}

/// The KV-cache element type the commands load models with on `backend`: F32 on the
/// CPU, which computes in f32 throughout; F16 on devices.
pub fn cache_dtype<BE: Backend>(backend: &BE) -> DType {
    if backend.name() == "cpu" {
        DType::F32
    } else {
        DType::F16
    }
}

/// The first op of `graph` that `backend` does not implement, by name.
pub fn unsupported_op<BE: Backend>(backend: &BE, graph: &Graph) -> Option<&'static str> {
    graph
        .ops()
        .iter()
        .find(|op| !backend.supports(op))
        .map(|op| op.name())
}

/// Resolves `choice` and runs `job` there. `graph` is the work the job will do: with
/// `--device auto`, a CUDA device that cannot run every op of it is passed over for
/// the CPU (saying why); with an explicit `cuda[:N]` that is an error.
pub fn run_on<J: BackendJob>(choice: DeviceChoice, graph: &Graph, job: J) -> Result<J::Output> {
    match resolve(choice)? {
        Device::Cpu => job.run(CpuBackend),
        Device::Cuda(device) => {
            let backend = CudaBackend::on_device(device, CacheConfig::from_env()?)?;
            match unsupported_op(&backend, graph) {
                None => job.run(backend),
                Some(op) if choice == DeviceChoice::Auto => {
                    eprintln!(
                        "kiln: {} does not implement op {op} yet; using the CPU",
                        backend.name()
                    );
                    job.run(CpuBackend)
                }
                Some(op) => Err(Error::Unsupported(format!(
                    "{} does not implement op {op} yet; use --device cpu",
                    backend.name()
                ))),
            }
        }
    }
}
