//! `kiln precompile`: compiles kernel specialisations into the disk cache, in
//! parallel, so that no later run waits on NVRTC; `--timings` measures start-up.
//! With `--arch` it needs no device: the cache it fills serves a machine whose GPU
//! has that architecture and whose NVRTC has the same version.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::{DType, Error, Result};
use kiln_cuda::fusion::{self, Fusions};
use kiln_cuda::manifest::{all_specs, spec_for_op};
use kiln_cuda::nvrtc::{NvrtcCompiler, OfflineCompiler};
use kiln_cuda::registry::{CacheMode, KernelCompiler, KernelRegistry};
use kiln_cuda::{startup, CacheConfig, CudaDevice, KernelSpec};
use kiln_gguf::Gguf;
use kiln_models::forward::{self, CacheSpec};
use kiln_models::model::{weight_descs, BATCH_BUCKETS};
use kiln_models::{LoadOptions, ModelConfig};

use super::device::{resolve, Device, DeviceArgs};

/// Arguments of `kiln precompile`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["all", "model"])))]
pub struct PrecompileArgs {
    /// Every kernel specialisation kiln has.
    #[arg(long)]
    pub all: bool,
    /// Only the specialisations this GGUF model's forward passes need.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Measure start-up instead, in a temporary cache: one NVRTC compile, one CUBIN
    /// load, cold start (empty cache, all kernels in parallel) and warm start.
    #[arg(long, requires = "all")]
    pub timings: bool,
    /// Compile CUBIN for this architecture (e.g. sm_90a) without a device; only
    /// NVRTC is needed. Images are checked, not loaded.
    #[arg(long, value_name = "sm_XY[a]", conflicts_with = "device")]
    pub arch: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `kiln precompile`.
pub fn run(args: PrecompileArgs) -> Result<()> {
    let specs = match &args.model {
        Some(path) => model_specs(path)?,
        None => all_specs(),
    };
    if let Some(arch) = &args.arch {
        let offline = || OfflineCompiler::new(arch);
        eprintln!("kiln: compiling for {arch} without a device (images are checked, not loaded)");
        return if args.timings {
            print_timings("this machine (no device)", offline)
        } else {
            build(offline()?, &specs)
        };
    }
    let device = match resolve(args.device.device)? {
        Device::Cuda(d) => d,
        Device::Cpu => {
            return Err(Error::Unsupported(
                "kiln precompile builds CUDA kernels and needs a CUDA device, or --arch to compile for one without it".into(),
            ))
        }
    };
    let on_device = || NvrtcCompiler::new(device.context().clone(), device.compute_capability());
    if args.timings {
        print_timings(&describe(&device), on_device)
    } else {
        build(on_device()?, &specs)
    }
}

/// `cuda:0 (NVIDIA H100 80GB HBM3, compute 9.0)`.
fn describe(device: &CudaDevice) -> String {
    let (major, minor) = device.compute_capability();
    format!(
        "cuda:{} ({}, compute {major}.{minor})",
        device.ordinal(),
        device.name()
    )
}

fn build<C: KernelCompiler>(compiler: C, specs: &[KernelSpec]) -> Result<()> {
    let cache = CacheConfig::from_env()?;
    match (cache.mode, &cache.dir) {
        (CacheMode::ReadWrite, Some(dir)) => eprintln!("kiln: kernel cache {}", dir.display()),
        (mode, _) => eprintln!(
            "kiln: KILN_KERNEL_CACHE={}: kernels are built but not saved to disk",
            mode.name()
        ),
    }
    let registry = KernelRegistry::new(compiler, cache);
    let bar = ProgressBar::new(specs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} kernels {elapsed} {msg}")
            .map_err(|e| Error::invalid("progress bar", e.to_string()))?,
    );
    let started = Instant::now();
    let built = registry.precompile(specs, |spec| {
        bar.set_message(spec.key.clone());
        bar.inc(1);
    });
    bar.finish_and_clear();
    built?;
    let total = registry.stats().total();
    println!(
        "{} kernels ready for {} in {:.0} ms: {} compiled ({:.0} ms of NVRTC across threads), {} from the disk cache",
        specs.len(),
        registry.compiler().target(),
        started.elapsed().as_secs_f64() * 1000.0,
        total.compiles,
        total.compile_ms,
        total.disk_hits
    );
    Ok(())
}

/// The specialisations the decode and prefill graphs of the model in `path` need,
/// for F32 and F16 KV caches: their ops' and their fused runs' (the fusions the
/// environment switches on, [`Fusions::from_env`]). Names (on stderr) the ops that have
/// no CUDA kernel yet.
fn model_specs(path: &Path) -> Result<Vec<KernelSpec>> {
    let file = Gguf::open(path)?;
    let config = ModelConfig::from_gguf(&file)?;
    let weights = weight_descs(&file)?;
    let weight = |name: &str| {
        weights.get(name).cloned().ok_or_else(|| {
            Error::format(
                path.display().to_string(),
                format!("tensor {name:?} is missing"),
            )
        })
    };
    let capacity = config
        .context_length
        .clamp(2, LoadOptions::DEFAULT_MAX_CONTEXT);
    let fusions = Fusions::from_env();
    let mut specs: Vec<KernelSpec> = Vec::new();
    let mut missing = BTreeSet::new();
    // The one-sequence graphs of one and two tokens, and the batched steps' graphs of
    // every bucket (their mat-vecs of several rows and mat-mats).
    let sizes = [1, 2]
        .into_iter()
        .map(|n| (n, false))
        .chain(BATCH_BUCKETS.into_iter().map(|n| (n, true)));
    for (n_tokens, batch) in sizes {
        for dtype in [DType::F32, DType::F16] {
            let cache = CacheSpec {
                capacity,
                dtype,
                slots: if batch { 2 } else { 1 },
            };
            let fwd = if batch {
                forward::build_batch(&config, &weight, n_tokens, n_tokens, cache)?
            } else {
                forward::build(&config, &weight, n_tokens, cache)?
            };
            for op in fwd.graph.ops() {
                match spec_for_op(op, &fwd.graph) {
                    Ok(spec) if !specs.iter().any(|s| s.key == spec.key) => specs.push(spec),
                    Ok(_) => {}
                    Err(Error::Unsupported(_)) => {
                        missing.insert(op.name());
                    }
                    Err(e) => return Err(e),
                }
            }
            for spec in fusion::specs_for_graph(&fwd.graph, fusions)? {
                if !specs.iter().any(|s| s.key == spec.key) {
                    specs.push(spec);
                }
            }
        }
    }
    if !missing.is_empty() {
        let names: Vec<&str> = missing.into_iter().collect();
        eprintln!(
            "kiln: ops of this model with no CUDA kernel yet (nothing to build): {}",
            names.join(", ")
        );
    }
    Ok(specs)
}

fn print_timings<C: KernelCompiler>(
    place: &str,
    make_compiler: impl Fn() -> Result<C>,
) -> Result<()> {
    let t = startup::measure(make_compiler)?;
    println!(
        "start-up on {place} with {}: {} kernels, {} threads",
        t.compiler, t.kernels, t.threads
    );
    println!("                                 min    median       max");
    for (what, s) in [
        ("one NVRTC compile (ms)", t.compile_ms),
        ("one CUBIN load/check (ms)", t.load_ms),
        ("one load from disk cache (ms)", t.disk_load_ms),
    ] {
        println!("{what:<30} {:>6.2} {:>9.2} {:>9.2}", s.min, s.median, s.max);
    }
    println!("cold start, empty cache, parallel: {:>8.1} ms", t.cold_ms);
    println!("warm start, disk cache, parallel:  {:>8.1} ms", t.warm_ms);
    println!(
        "every kernel compiled in sequence: {:>8.1} ms",
        t.sequential_ms
    );
    for (key, ms) in &t.slowest {
        println!("slow compile: {key:<40} {ms:>8.1} ms");
    }
    Ok(())
}
