//! Kernel launches: [`KernelArgs`] gathers a launch's arguments and [`launch`] submits
//! it with `cuLaunchKernelEx` on the backend's stream, with programmatic dependent
//! launch when the backend has it on ([`CudaBackend::programmatic_launch`]).
//!
//! Programmatic dependent launch (compute capability 9.0 and later) lets a kernel's
//! blocks start while the kernel before it in the stream is still finishing. Every
//! kiln kernel launched that way is written for it (kernels/common.cuh): it waits for
//! the grids before it (`chain_after_prior_grids`) before it reads anything they may
//! write or writes anything they may read, and only the resident mat-vec does work
//! before that wait (loads of weights, which only host copies write). The kernels
//! always launched [`KernelArgs::serialized`] do not wait.

use std::ffi::c_void;
use std::marker::PhantomData;

use cudarc::driver::{sys, CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};
use kiln_core::Result;

use crate::context::driver_error;
use crate::nvrtc::CudaKernel;
use crate::CudaBackend;

/// A value a kernel takes as a parameter.
pub(crate) trait KernelArg<'a> {
    /// Adds the parameter to `args`.
    fn push_to(self, args: &mut KernelArgs<'a>);
}

/// One parameter: a pointer to a borrowed scalar, or the index of a buffer's device
/// address in [`KernelArgs::addresses`].
enum Param {
    Scalar(*mut c_void),
    Address(usize),
}

/// The parameters of one launch, in order. Scalars are borrowed for the life of the
/// builder; buffers are passed by their device address.
pub(crate) struct KernelArgs<'a> {
    backend: &'a CudaBackend,
    params: Vec<Param>,
    addresses: Vec<sys::CUdeviceptr>,
    serialized: bool,
    _borrows: PhantomData<&'a ()>,
}

impl<'a> KernelArgs<'a> {
    /// An empty parameter list for a launch on `backend`'s stream.
    pub(crate) fn new(backend: &'a CudaBackend) -> Self {
        Self {
            backend,
            params: Vec::new(),
            addresses: Vec::new(),
            serialized: false,
            _borrows: PhantomData,
        }
    }

    /// Launches after the previous kernel ends even where programmatic launch is on:
    /// for grids of many blocks per multiprocessor, whose blocks an early start would
    /// crowd onto the multiprocessors the previous kernel frees first. A kernel always
    /// launched this way does not call `chain_after_prior_grids` (kernels/common.cuh).
    pub(crate) fn serialized(&mut self) -> &mut Self {
        self.serialized = true;
        self
    }

    /// Appends a parameter.
    pub(crate) fn arg(&mut self, value: impl KernelArg<'a>) -> &mut Self {
        value.push_to(self);
        self
    }

    fn push_address(&mut self, address: sys::CUdeviceptr) {
        self.params.push(Param::Address(self.addresses.len()));
        self.addresses.push(address);
    }

    /// A pointer to each parameter's value, as `cuLaunchKernelEx` takes them; valid
    /// while `self` is neither moved nor changed.
    fn pointers(&mut self) -> Vec<*mut c_void> {
        let addresses = self.addresses.as_mut_ptr();
        self.params
            .iter()
            .map(|p| match *p {
                Param::Scalar(value) => value,
                // SAFETY: `i` indexes `addresses` (pushed together with the param).
                Param::Address(i) => unsafe { addresses.add(i) }.cast(),
            })
            .collect()
    }
}

macro_rules! scalar_kernel_args {
    ($($t:ty),*) => {$(
        impl<'a> KernelArg<'a> for &'a $t {
            fn push_to(self, args: &mut KernelArgs<'a>) {
                args.params.push(Param::Scalar(self as *const $t as *mut c_void));
            }
        }
    )*};
}
scalar_kernel_args!(u32, i32, u64, f32);

/// An optional buffer: its address, or a null pointer for `None` (the operands a
/// kernel is told are absent).
impl<'a, A: KernelArg<'a>> KernelArg<'a> for Option<A> {
    fn push_to(self, args: &mut KernelArgs<'a>) {
        match self {
            Some(value) => value.push_to(args),
            None => args.push_address(0),
        }
    }
}

impl<'a, T> KernelArg<'a> for &'a CudaSlice<T> {
    fn push_to(self, args: &mut KernelArgs<'a>) {
        // Event tracking is off on kiln's contexts (one stream orders all work), so
        // the guard does nothing when dropped.
        let (address, _guard) = self.device_ptr(args.backend.stream());
        args.push_address(address);
    }
}

impl<'a, T> KernelArg<'a> for &'a mut CudaSlice<T> {
    fn push_to(self, args: &mut KernelArgs<'a>) {
        let (address, _guard) = self.device_ptr_mut(args.backend.stream());
        args.push_address(address);
    }
}

impl<'a, 'b, T> KernelArg<'a> for &'a mut CudaViewMut<'b, T> {
    fn push_to(self, args: &mut KernelArgs<'a>) {
        let (address, _guard) = self.device_ptr_mut(args.backend.stream());
        args.push_address(address);
    }
}

/// Launches `kernel` with `args` under `config` on the backend's stream, with
/// programmatic dependent launch when [`CudaBackend::programmatic_launch`] is on and
/// `args` is not [`KernelArgs::serialized`].
///
/// # Safety
/// `args` must match the kernel's parameters in number, order and type, and every
/// buffer the kernel touches under `config` must be large enough.
pub(crate) unsafe fn launch(
    kernel: &CudaKernel,
    args: &mut KernelArgs<'_>,
    config: LaunchConfig,
) -> Result<()> {
    let backend = args.backend;
    let what = || format!("launching {}", kernel.key);
    backend
        .device()
        .context()
        .bind_to_thread()
        .map_err(|e| driver_error(&what(), e))?;
    let mut attributes = [programmatic_serialization()];
    let mut params = args.pointers();
    let launch_config = sys::CUlaunchConfig {
        gridDimX: config.grid_dim.0,
        gridDimY: config.grid_dim.1,
        gridDimZ: config.grid_dim.2,
        blockDimX: config.block_dim.0,
        blockDimY: config.block_dim.1,
        blockDimZ: config.block_dim.2,
        sharedMemBytes: config.shared_mem_bytes,
        hStream: backend.stream().cu_stream(),
        attrs: attributes.as_mut_ptr(),
        numAttrs: u32::from(backend.programmatic_launch() && !args.serialized),
    };
    // SAFETY: the caller's contract for the parameters, whose pointers stay valid
    // (`args` is borrowed, unchanged, for the call); `launch_config` and the
    // attribute it points to outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &launch_config,
            kernel.function.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| driver_error(&what(), e))
}

/// The launch attribute that lets a kernel start before the one before it ends.
fn programmatic_serialization() -> sys::CUlaunchAttribute {
    // SAFETY: the attribute is plain data; all-zero bytes are a valid value of it.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    attribute
}
