//! `kiln doctor`: the device, driver, NVRTC and kernel cache kiln would use, and a
//! kernel compiled, launched and checked on the device.

use std::sync::Arc;
use std::time::Instant;

use kiln_core::ops::ElementwiseKind;
use kiln_core::{Backend, Error, Result};
use kiln_cuda::context::{driver_version, format_version};
use kiln_cuda::nvrtc::nvrtc_version;
use kiln_cuda::registry::{cache_dir_usage, ImageKind, KernelCompiler, RegistryStats};
use kiln_cuda::{ops, CacheConfig, CudaBackend, CudaDevice};

use super::device::{resolve, Device, DeviceArgs};

/// Arguments of `kiln doctor`.
#[derive(clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Prints what kiln finds; errors only when the chosen device fails its check.
pub fn run(args: DoctorArgs) -> Result<()> {
    println!("kiln {}", env!("CARGO_PKG_VERSION"));
    let cache = CacheConfig::from_env();
    print_cache(&cache);
    match resolve(args.device.device)? {
        Device::Cpu => {
            println!(
                "device            cpu ({} threads)",
                rayon::current_num_threads()
            );
            match driver_version() {
                Ok(v) => println!("cuda driver       {} (not chosen)", format_version(v)),
                Err(e) => println!("cuda              unavailable: {e}"),
            }
            Ok(())
        }
        Device::Cuda(device) => check_cuda(device, cache?),
    }
}

fn print_cache(cache: &Result<CacheConfig>) {
    match cache {
        Ok(CacheConfig {
            mode,
            dir: Some(dir),
        }) => {
            let usage = match cache_dir_usage(dir) {
                Ok((files, bytes)) => format!("{files} files, {}", human_bytes(bytes)),
                Err(e) => format!("unreadable: {e}"),
            };
            println!(
                "kernel cache      {} ({}; {usage})",
                dir.display(),
                mode.name()
            );
        }
        Ok(CacheConfig { mode, dir: None }) => println!("kernel cache      {}", mode.name()),
        Err(e) => println!("kernel cache      misconfigured: {e}"),
    }
}

fn check_cuda(device: Arc<CudaDevice>, cache: CacheConfig) -> Result<()> {
    let (cc_major, cc_minor) = device.compute_capability();
    let (free, total) = device.memory_info()?;
    println!(
        "device            cuda:{} {}",
        device.ordinal(),
        device.name()
    );
    println!(
        "compute           {cc_major}.{cc_minor}, {} multiprocessors",
        device.multiprocessors()?
    );
    println!(
        "memory            {} free of {}",
        human_bytes(free as u64),
        human_bytes(total as u64)
    );
    println!(
        "driver            CUDA {}",
        format_version(device.driver_version())
    );
    let (nv_major, nv_minor) = nvrtc_version()?;
    println!("nvrtc             {nv_major}.{nv_minor}");
    let backend = CudaBackend::on_device(device, cache)?;
    let compiler = backend.registry().compiler();
    let image = match compiler.nvrtc_target().image_kind() {
        ImageKind::Cubin => "CUBIN",
        ImageKind::Ptx => "PTX, compiled by the driver: NVRTC is older than the device",
    };
    println!("kernel target     {} ({image})", compiler.target());
    let started = Instant::now();
    check_add(&backend)?;
    println!(
        "kernel check      ok: elementwise add of 4099 values matches the host ({:.1} ms, compile or cache load included)",
        started.elapsed().as_secs_f64() * 1000.0
    );
    print_counters(&backend.registry().stats());
    Ok(())
}

/// Adds two vectors on the device and compares with the host's sums.
fn check_add(backend: &CudaBackend) -> Result<()> {
    let len = 4099;
    let a: Vec<f32> = (0..len).map(|i| i as f32 * 0.25).collect();
    let b: Vec<f32> = (0..len).map(|i| 1.0 - i as f32).collect();
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut da = backend.alloc(len * 4)?;
    let mut db = backend.alloc(len * 4)?;
    let mut dout = backend.alloc(len * 4)?;
    backend.upload(&mut da, &bytes(&a))?;
    backend.upload(&mut db, &bytes(&b))?;
    backend.upload(&mut dout, &vec![0xff; len * 4])?;
    ops::elementwise::elementwise(
        backend,
        ElementwiseKind::Add,
        &da,
        &db,
        &mut dout,
        None,
        len,
    )?;
    let mut out = vec![0u8; len * 4];
    backend.download(&dout, &mut out)?;
    let wrong = out
        .chunks_exact(4)
        .zip(a.iter().zip(&b))
        .position(|(got, (x, y))| f32::from_le_bytes([got[0], got[1], got[2], got[3]]) != x + y);
    match wrong {
        None => Ok(()),
        Some(i) => Err(Error::Backend {
            backend: "cuda",
            msg: format!("kernel check failed: element {i} of an elementwise add differs from the host's sum"),
        }),
    }
}

fn print_counters(stats: &RegistryStats) {
    println!("kernel counters   memory hits / disk hits / compiles / compile ms / load ms");
    for m in stats.modules.iter().chain(std::iter::once(&stats.total())) {
        println!(
            "  {:<28} {:>6} {:>6} {:>6} {:>9.1} {:>8.2}",
            m.key, m.memory_hits, m.disk_hits, m.compiles, m.compile_ms, m.load_ms
        );
    }
    if stats.disk_rejects > 0 || stats.disk_write_errors > 0 {
        println!(
            "  cache files rejected: {}, writes failed: {}",
            stats.disk_rejects, stats.disk_write_errors
        );
    }
}

/// `bytes` in the largest binary unit that keeps it at least 1.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(80 * 1024 * 1024 * 1024), "80.0 GiB");
    }
}
