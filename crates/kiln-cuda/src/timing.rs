//! Device-side timing of launches on a backend's stream, with CUDA events.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use kiln_core::{Backend, DeviceBuffer, Error, Result};

use crate::context::driver_error;
use crate::{CudaBackend, CudaBuffer};

/// Times launches on a backend's stream with CUDA events. Before each measurement it
/// queues a long device-to-device copy, so that the measured launches are all queued
/// while the device is still busy with it and the host's launch overhead does not
/// show in the result.
pub struct EventTimer {
    filler: CudaBuffer,
    filler_copy: CudaBuffer,
}

impl EventTimer {
    /// A timer whose queue-filling copy moves `bytes` bytes (at least 1).
    pub fn new(backend: &CudaBackend, bytes: usize) -> Result<Self> {
        let bytes = bytes.max(1);
        let mut filler = backend.alloc(bytes)?;
        backend.upload(&mut filler, &vec![0x3c; bytes])?;
        Ok(Self {
            filler,
            filler_copy: backend.alloc(bytes)?,
        })
    }

    /// Seconds of device time per call of `launch(i)`, over `reps` calls (i = 0, 1,
    /// ...) timed together after one warm-up call (i = 0).
    pub fn time(
        &mut self,
        backend: &CudaBackend,
        reps: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        if reps == 0 {
            return Err(Error::invalid("event timer", "reps must be at least 1"));
        }
        launch(0)?;
        self.copy(backend)?;
        let start = record(backend)?;
        for i in 0..reps {
            launch(i)?;
        }
        let end = record(backend)?;
        Ok(elapsed(&start, &end)? / reps as f64)
    }

    /// Read-plus-write bytes per second of copying the filler buffer, over `reps`
    /// copies timed together after one warm-up copy.
    pub fn copy_bandwidth(&mut self, backend: &CudaBackend, reps: usize) -> Result<f64> {
        if reps == 0 {
            return Err(Error::invalid("event timer", "reps must be at least 1"));
        }
        self.copy(backend)?;
        let start = record(backend)?;
        for _ in 0..reps {
            self.copy(backend)?;
        }
        let end = record(backend)?;
        let seconds = elapsed(&start, &end)? / reps as f64;
        Ok(2.0 * self.filler.bytes() as f64 / seconds)
    }

    fn copy(&mut self, backend: &CudaBackend) -> Result<()> {
        backend
            .stream()
            .memcpy_dtod(self.filler.slice(), self.filler_copy.slice_mut())
            .map_err(|e| driver_error("timing: device-to-device copy", e))
    }
}

/// An event recorded on the backend's stream, with timing enabled.
fn record(backend: &CudaBackend) -> Result<CudaEvent> {
    backend
        .stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| driver_error("timing: recording an event", e))
}

/// Seconds between two recorded events (waits for the second).
fn elapsed(start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
    start
        .elapsed_ms(end)
        .map(|ms| f64::from(ms) / 1000.0)
        .map_err(|e| driver_error("timing: reading events", e))
}
