//! Start-up measurements: one NVRTC compile, one image load, and the time until
//! every kernel of the manifest is ready from an empty cache (cold) and from the
//! disk cache (warm).
//!
//! With the device's [`crate::nvrtc::NvrtcCompiler`] a load is a CUBIN loaded into
//! the context; with [`crate::nvrtc::OfflineCompiler`] (no device) it is only the
//! check of the image, so its cold start is pure compile time and its warm start
//! pure disk-cache time.

use std::time::Instant;

use kiln_core::{Error, Result};

use crate::manifest::all_specs;
use crate::registry::{CacheConfig, KernelCompiler, KernelRegistry, ModuleStats};

/// Minimum, median and maximum of a set of milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |i: usize| ms.get(i).copied().unwrap_or(f64::NAN);
        Self {
            min: at(0),
            median: at(ms.len() / 2),
            max: at(ms.len().saturating_sub(1)),
        }
    }
}

/// How many of the slowest compiles [`StartupTimings::slowest`] lists.
const SLOWEST: usize = 5;

/// What [`measure`] found.
#[derive(Clone, Debug)]
pub struct StartupTimings {
    /// The compiler's version and target, e.g. `nvrtc 13.0, sm_90a`.
    pub compiler: String,
    /// Kernels in the manifest.
    pub kernels: usize,
    /// Worker threads the parallel builds used.
    pub threads: usize,
    /// One kernel's NVRTC compile, compiled one at a time.
    pub compile_ms: Spread,
    /// One kernel's load (fresh from the compiler).
    pub load_ms: Spread,
    /// One kernel's load from the disk cache: digest check and load, after the read.
    pub disk_load_ms: Spread,
    /// Empty cache to every kernel ready, all compiled in parallel.
    pub cold_ms: f64,
    /// Disk cache to every kernel ready, in parallel, with no compile.
    pub warm_ms: f64,
    /// Every kernel compiled one after another (the sum a cold start would cost
    /// without parallelism).
    pub sequential_ms: f64,
    /// The kernels that took longest to compile, slowest first, with their ms.
    pub slowest: Vec<(String, f64)>,
}

/// Measures start-up with compilers made by `make_compiler` (one per registry),
/// caching in a fresh temporary directory (the user's own cache is not touched).
/// The cold start runs first, so that it includes NVRTC's first compile in the
/// process.
pub fn measure<C: KernelCompiler>(make_compiler: impl Fn() -> Result<C>) -> Result<StartupTimings> {
    let scratch = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let specs = all_specs();
    let cache = CacheConfig::read_write(scratch.path().join("kernels"));

    let cold = KernelRegistry::new(make_compiler()?, cache.clone());
    let compiler = format!(
        "{}, {}",
        cold.compiler().version(),
        cold.compiler().target()
    );
    let started = Instant::now();
    cold.precompile(&specs, |_| {})?;
    let cold_ms = ms_since(started);

    let warm = KernelRegistry::new(make_compiler()?, cache);
    let started = Instant::now();
    warm.precompile(&specs, |_| {})?;
    let warm_ms = ms_since(started);
    let warm_stats = warm.stats();
    let warm_compiles = warm_stats.total().compiles;
    if warm_compiles != 0 {
        return Err(Error::Backend {
            backend: "cuda",
            msg: format!("warm start compiled {warm_compiles} kernels; the disk cache missed"),
        });
    }

    // One at a time, without a disk cache: per-kernel compile and load.
    let sequential = KernelRegistry::new(make_compiler()?, CacheConfig::off());
    let started = Instant::now();
    for spec in &specs {
        sequential.get(spec)?;
    }
    let sequential_ms = ms_since(started);
    let one_by_one = sequential.stats().modules;
    let mut slowest: Vec<(String, f64)> = one_by_one
        .iter()
        .map(|m| (m.key.clone(), m.compile_ms))
        .collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    slowest.truncate(SLOWEST);

    let spread = |f: fn(&ModuleStats) -> f64, modules: &[ModuleStats]| {
        Spread::of(modules.iter().map(f).collect())
    };
    Ok(StartupTimings {
        compiler,
        kernels: specs.len(),
        threads: rayon::current_num_threads(),
        compile_ms: spread(|m| m.compile_ms, &one_by_one),
        load_ms: spread(|m| m.load_ms, &one_by_one),
        disk_load_ms: spread(|m| m.load_ms, &warm_stats.modules),
        cold_ms,
        warm_ms,
        sequential_ms,
        slowest,
    })
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
