//! Compiled graphs: [`CudaExecutable`] holds the launch records a graph compiles to
//! ([`crate::launch::LaunchRecord`]), replays them as one captured CUDA graph (or one
//! by one), and times them one by one for profiles.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};
use kiln_core::{LaunchProfile, Result};

use crate::context::driver_error;
pub use crate::launch::LaunchRecord;

/// A graph compiled for the CUDA backend ([`kiln_core::Backend::compile`]): every
/// op's launches, in order, over the memory bound at compile time, and once run, the
/// CUDA graph captured from them.
pub struct CudaExecutable {
    launches: Vec<LaunchRecord>,
    ops: Vec<OpLaunches>,
    captured: Option<CapturedGraph>,
}

/// The launches of one op of the compiled graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpLaunches {
    /// The op's index in the graph.
    pub index: usize,
    /// The op's name ([`kiln_core::Op::name`]).
    pub name: &'static str,
    /// Its records in [`CudaExecutable::launches`].
    pub launches: Range<usize>,
}

impl CudaExecutable {
    pub(crate) fn new(launches: Vec<LaunchRecord>, ops: Vec<OpLaunches>) -> Self {
        Self {
            launches,
            ops,
            captured: None,
        }
    }

    /// The launch records, in order.
    pub fn launches(&self) -> &[LaunchRecord] {
        &self.launches
    }

    /// Which launches belong to which op, in graph order.
    pub fn ops(&self) -> &[OpLaunches] {
        &self.ops
    }

    /// Whether a CUDA graph has been captured from the launches (on the first run
    /// with graphs on).
    pub fn is_captured(&self) -> bool {
        self.captured.is_some()
    }

    /// Submits every launch on `stream`, in order.
    ///
    /// # Safety
    /// Every buffer bound at compile time must still be allocated.
    pub(crate) unsafe fn submit_each(
        &self,
        stream: sys::CUstream,
        programmatic: bool,
    ) -> Result<()> {
        for record in &self.launches {
            // SAFETY: the caller's contract.
            unsafe { record.submit(stream, programmatic) }?;
        }
        Ok(())
    }

    /// Launches the captured graph on `stream`, capturing it first on `capture` when
    /// there is none.
    ///
    /// # Safety
    /// Every buffer bound at compile time must still be allocated.
    pub(crate) unsafe fn replay(
        &mut self,
        ctx: &Arc<CudaContext>,
        capture: &Capture,
        stream: sys::CUstream,
        programmatic: bool,
    ) -> Result<()> {
        if self.captured.is_none() {
            let launches = &self.launches;
            // SAFETY: the caller's contract; capture only records the launches.
            let captured = unsafe {
                CapturedGraph::capture(ctx, capture, |s| {
                    launches.iter().try_for_each(|r| r.submit(s, programmatic))
                })
            }?;
            self.captured = Some(captured);
        }
        let captured = self.captured.as_ref().expect("captured above");
        // SAFETY: the graph holds the records' launches, whose buffers the caller keeps.
        unsafe { result::graph::launch(captured.exec, stream) }
            .map_err(|e| driver_error("launching a captured CUDA graph", e))
    }

    /// Device time of each launch (from the end of the one before it to its own end),
    /// run once one after another (no programmatic launch) with an event between each
    /// two, inside a CUDA graph so that the host's launch overhead does not show.
    ///
    /// # Safety
    /// Every buffer bound at compile time must still be allocated; the call waits for
    /// the work it enqueues.
    pub(crate) unsafe fn profile(
        &self,
        ctx: &Arc<CudaContext>,
        capture: &Capture,
        stream: sys::CUstream,
    ) -> Result<Vec<LaunchProfile>> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let events = Events(
            (0..=self.launches.len())
                .map(|_| result::event::create(flags))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| driver_error("creating profiling events", e))?,
        );
        // Recorded as graph nodes (an event recorded plainly in a capture only orders
        // the capture's streams).
        let record = |event: sys::CUevent, s: sys::CUstream| {
            let external = sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32;
            // SAFETY: the event and the stream are valid.
            unsafe { sys::cuEventRecordWithFlags(event, s, external) }
                .result()
                .map_err(|e| driver_error("recording a profiling event", e))
        };
        // SAFETY: the caller's contract.
        let captured = unsafe {
            CapturedGraph::capture(ctx, capture, |s| {
                record(events.0[0], s)?;
                for (i, r) in self.launches.iter().enumerate() {
                    r.submit(s, false)?;
                    record(events.0[i + 1], s)?;
                }
                Ok(())
            })
        }?;
        // SAFETY: as for replay.
        unsafe { result::graph::launch(captured.exec, stream) }
            .and_then(|()| unsafe { result::stream::synchronize(stream) })
            .map_err(|e| driver_error("running a profiled graph", e))?;
        let mut times = Vec::with_capacity(self.launches.len());
        for op in &self.ops {
            for i in op.launches.clone() {
                // SAFETY: both events were recorded by the completed graph.
                let ms = unsafe { result::event::elapsed(events.0[i], events.0[i + 1]) }
                    .map_err(|e| driver_error("reading a profiling event", e))?;
                times.push(LaunchProfile {
                    op_index: op.index,
                    op: op.name,
                    key: self.launches[i].key().to_string(),
                    seconds: f64::from(ms) / 1e3,
                });
            }
        }
        Ok(times)
    }
}

/// Events destroyed when dropped.
struct Events(Vec<sys::CUevent>);

impl Drop for Events {
    fn drop(&mut self) {
        for &e in &self.0 {
            // SAFETY: each event was created by cuEventCreate and is destroyed once.
            let _ = unsafe { result::event::destroy(e) };
        }
    }
}

/// A stream of its own on which graphs are captured (so that launches other threads
/// submit to the backend's stream meanwhile are not captured), one capture at a time.
pub(crate) struct Capture(std::sync::Mutex<Arc<cudarc::driver::CudaStream>>);

impl Capture {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("creating a stream to capture graphs on", e))?;
        Ok(Self(std::sync::Mutex::new(stream)))
    }
}

/// A CUDA graph captured from a stream and instantiated.
struct CapturedGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

// SAFETY: graph handles are not tied to a thread; the executable that owns one is
// used through `&mut`, which serialises every call on it.
unsafe impl Send for CapturedGraph {}

impl CapturedGraph {
    /// Captures what `enqueue` submits to the capture stream and instantiates it. The
    /// capture is ended even when `enqueue` fails.
    ///
    /// # Safety
    /// `capture` must be a stream of `ctx`.
    unsafe fn capture(
        ctx: &Arc<CudaContext>,
        capture: &Capture,
        enqueue: impl FnOnce(sys::CUstream) -> Result<()>,
    ) -> Result<Self> {
        // A poisoned lock still holds a valid stream, not capturing (every capture
        // below is ended before the guard drops).
        let guard = capture.0.lock().unwrap_or_else(|e| e.into_inner());
        let stream = guard.cu_stream();
        ctx.bind_to_thread()
            .map_err(|e| driver_error("binding the context to capture a CUDA graph", e))?;
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the caller's contract.
        unsafe { result::stream::begin_capture(stream, mode) }
            .map_err(|e| driver_error("beginning a CUDA graph capture", e))?;
        let enqueued = enqueue(stream);
        // SAFETY: the capture begun above is ended on every path.
        let ended = unsafe { result::stream::end_capture(stream) }
            .map_err(|e| driver_error("ending a CUDA graph capture", e));
        let graph = match (enqueued, ended) {
            (Ok(()), Ok(graph)) => graph,
            (Err(e), Ok(graph)) => {
                // SAFETY: the graph was created by the capture and is not used.
                let _ = unsafe { result::graph::destroy(graph) };
                return Err(e);
            }
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
        };
        // SAFETY: `graph` is the capture's valid graph.
        match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Self { graph, exec }),
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(driver_error("instantiating a captured CUDA graph", e))
            }
        }
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `capture` and are destroyed once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}
