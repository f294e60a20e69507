//! Every specialisation of the manifest compiles with NVRTC to CUBIN for the H100's
//! architecture, without a GPU or a driver: only libnvrtc (CUDA 13) must load.
//!
//! Run it with NVRTC on the library path, e.g.
//! `LD_LIBRARY_PATH=.../nvidia/cu13/lib cargo test -p kiln-cuda --test nvrtc_compile -- --ignored --nocapture`.
//! It prints each kernel's registers, shared memory and spills as ptxas reports them.

use std::sync::Mutex;

use kiln_cuda::manifest::all_specs;
use kiln_cuda::nvrtc::{choose_target, compile_offline, nvrtc_version};
use kiln_cuda::KernelSpec;

/// NVRTC's version. The test that calls it is ignored unless asked for, so a
/// missing NVRTC fails it.
fn nvrtc() -> (i32, i32) {
    nvrtc_version().unwrap_or_else(|e| panic!("this test needs NVRTC: {e}"))
}

/// The lines of ptxas's `-v` report that give resource usage, joined.
fn resource_usage(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("Used") || l.contains("spill"))
        // "ptxas info    : Used 16 registers, ..." and "ptxas    .  0 bytes stack frame, ...".
        .map(|l| l.find(": Used").map_or(l, |at| &l[at + 2..]))
        .map(|l| {
            l.find(|c: char| c.is_ascii_digit())
                .map_or(l, |at| &l[at..])
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
#[ignore = "needs NVRTC"]
fn every_specialisation_compiles_to_cubin_for_sm_90() {
    let (major, minor) = nvrtc();
    // The H100's compute capability, with the architectures NVRTC 13 supports: the
    // target the registry picks on that device.
    let (arch, _) = choose_target((9, 0), &[75, 80, 86, 87, 88, 89, 90, 100, 110, 120]).unwrap();
    assert_eq!(arch, "sm_90a");
    let specs = all_specs();
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<(String, Result<String, String>)>> = Mutex::new(Vec::new());
    let work = |specs: &[KernelSpec]| loop {
        let i = {
            let mut n = next.lock().unwrap();
            *n += 1;
            *n - 1
        };
        let Some(spec) = specs.get(i) else { break };
        let r = compile_offline(spec, &arch, &["-Xptxas=-v"])
            .map_err(|e| e.to_string())
            .and_then(|(compiled, log)| {
                if compiled.image.len() < 64 || !compiled.image.starts_with(b"\x7fELF") {
                    return Err(format!("not an ELF cubin ({} bytes)", compiled.image.len()));
                }
                Ok(resource_usage(&log))
            });
        results.lock().unwrap().push((spec.key.clone(), r));
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| work(&specs));
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort();
    let mut failures = Vec::new();
    for (key, r) in &results {
        match r {
            Ok(usage) => println!("{key}: {usage}"),
            Err(e) => failures.push(format!("{key}: {e}")),
        }
    }
    println!(
        "nvrtc {major}.{minor}, {arch}: {} of {} specialisations compiled",
        results.len() - failures.len(),
        specs.len()
    );
    assert_eq!(results.len(), specs.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
