//! The NVRTC compiler behind the registry: compiles a specialisation's source with
//! its headers in memory, instantiates its name expression, and returns CUBIN for the
//! device's own architecture (PTX only when NVRTC is older than the device).
//!
//! cudarc's safe NVRTC layer returns PTX only and takes no headers or name
//! expressions, so this module wraps its `sys` layer once.

use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{result as nvrtc_result, sys, Ptx};
use kiln_core::{Error, Result};

use crate::registry::{CompiledKernel, ImageKind, KernelCompiler, KernelSpec};

fn nvrtc_error(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        msg: msg.into(),
    }
}

/// Whether libnvrtc can be loaded; checked once. cudarc panics on its first NVRTC
/// call when the library is missing, so every entry point checks this first.
fn nvrtc_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: loading the library runs its initialisers, as cudarc's own first call
    // does; the handle is dropped again at once.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

fn ensure_nvrtc() -> Result<()> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(nvrtc_error(
            "no NVRTC library found (libnvrtc.so of CUDA 13): install the CUDA toolkit's NVRTC or add its lib directory to LD_LIBRARY_PATH",
        ))
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_error(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The virtual architectures NVRTC can compile for, as `major * 10 + minor`.
fn supported_archs() -> Result<Vec<i32>> {
    ensure_nvrtc()?;
    let mut n = 0;
    // SAFETY: the library is present; `n` is valid.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| nvrtc_error(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
    let mut archs = vec![0i32; usize::try_from(n).unwrap_or(0)];
    // SAFETY: `archs` holds the `n` entries NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| nvrtc_error(format!("nvrtcGetSupportedArchs: {e:?}")))?;
    Ok(archs)
}

/// Compute capabilities whose architecture-specific target (`sm_XYa`) kiln uses:
/// it enables instructions such as wgmma (9.0) that the plain target lacks.
const ARCH_SPECIFIC: [(i32, i32); 4] = [(9, 0), (10, 0), (10, 3), (12, 0)];

/// The compile target for a device of compute capability `cc`, given the
/// architectures NVRTC supports: `(gpu-architecture, image kind)`.
///
/// CUBIN for the device's own architecture when NVRTC knows it (`sm_90a` on an
/// H100); otherwise PTX for the newest architecture NVRTC knows that the device can
/// run, which the driver compiles at load time.
pub fn choose_target(cc: (i32, i32), supported: &[i32]) -> Result<(String, ImageKind)> {
    let own = cc.0 * 10 + cc.1;
    if supported.contains(&own) {
        let suffix = if ARCH_SPECIFIC.contains(&cc) { "a" } else { "" };
        return Ok((format!("sm_{own}{suffix}"), ImageKind::Cubin));
    }
    supported
        .iter()
        .copied()
        .filter(|&a| a <= own)
        .max()
        .map(|a| (format!("compute_{a}"), ImageKind::Ptx))
        .ok_or_else(|| {
            nvrtc_error(format!(
                "NVRTC supports none of the architectures a device of compute capability {}.{} runs (supported: {supported:?})",
                cc.0, cc.1
            ))
        })
}

/// A loaded kernel: its entry point, ready to launch, and its key as a label.
#[derive(Debug)]
pub struct CudaKernel {
    pub key: String,
    pub function: CudaFunction,
    /// The dynamic shared memory the function is opted in to (bytes; 0 for the
    /// default), only ever raised, under its lock, so that threads launching it with
    /// different sizes never lower it below another's launch.
    pub(crate) dynamic_shared: std::sync::Mutex<u32>,
}

/// Parses a real architecture as `--arch` spells it, `sm_XY` or `sm_XYa`, into its
/// number (`XY`) and whether it is the architecture-specific variant.
pub fn parse_arch(arch: &str) -> Result<(i32, bool)> {
    let bad = || {
        Error::invalid(
            "arch",
            format!("{arch:?} is not a real GPU architecture such as sm_90a or sm_89"),
        )
    };
    let digits = arch.strip_prefix("sm_").ok_or_else(bad)?;
    let (digits, specific) = match digits.strip_suffix('a') {
        Some(d) => (d, true),
        None => (digits, false),
    };
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok((digits.parse().map_err(|_| bad())?, specific))
}

/// NVRTC aimed at one target: what enters every disk cache key (NVRTC's version,
/// the architecture, the base options) and the compile itself. Needs NVRTC but no
/// device, so the same keys are computed on a machine without a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvrtcTarget {
    version: (i32, i32),
    arch: String,
    kind: ImageKind,
}

impl NvrtcTarget {
    /// The target the registry uses on a device of compute capability `cc`
    /// ([`choose_target`]).
    pub fn for_device(cc: (i32, i32)) -> Result<Self> {
        let version = nvrtc_version()?;
        let (arch, kind) = choose_target(cc, &supported_archs()?)?;
        Ok(Self {
            version,
            arch,
            kind,
        })
    }

    /// CUBIN for the real architecture `arch` (`sm_90a`), which this NVRTC must
    /// support.
    pub fn for_arch(arch: &str) -> Result<Self> {
        let (number, _) = parse_arch(arch)?;
        let version = nvrtc_version()?;
        let supported = supported_archs()?;
        if !supported.contains(&number) {
            return Err(Error::invalid(
                "arch",
                format!(
                    "NVRTC {}.{} cannot compile for {arch}; it supports {supported:?}",
                    version.0, version.1
                ),
            ));
        }
        Ok(Self {
            version,
            arch: arch.to_string(),
            kind: ImageKind::Cubin,
        })
    }

    /// NVRTC's version, `(major, minor)`.
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.version
    }

    /// The `--gpu-architecture` value, e.g. `sm_90a` or `compute_120`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether compiles produce CUBIN or PTX.
    pub fn image_kind(&self) -> ImageKind {
        self.kind
    }

    fn version_label(&self) -> String {
        format!("nvrtc {}.{}", self.version.0, self.version.1)
    }

    fn compile(&self, spec: &KernelSpec) -> Result<CompiledKernel> {
        compile_program(spec, &base_options_for(&self.arch), self.kind)
            .map(|(compiled, _log)| compiled)
    }
}

/// Compiles with NVRTC for one device and loads into its context.
pub struct NvrtcCompiler {
    ctx: Arc<CudaContext>,
    target: NvrtcTarget,
}

impl NvrtcCompiler {
    /// A compiler for the device of `ctx`, whose compute capability is `cc`.
    pub fn new(ctx: Arc<CudaContext>, cc: (i32, i32)) -> Result<Self> {
        Ok(Self {
            ctx,
            target: NvrtcTarget::for_device(cc)?,
        })
    }

    /// What this compiler targets.
    pub fn nvrtc_target(&self) -> &NvrtcTarget {
        &self.target
    }
}

/// Compiles with NVRTC for a named architecture, with no device or driver: fills a
/// disk cache ahead of time for a machine with that GPU (the keys are those the
/// device's [`NvrtcCompiler`] computes), and measures compile times. "Loading" only
/// checks that the image is an ELF CUBIN.
pub struct OfflineCompiler {
    target: NvrtcTarget,
}

impl OfflineCompiler {
    /// A compiler producing CUBIN for `arch` (`sm_90a`).
    pub fn new(arch: &str) -> Result<Self> {
        Ok(Self {
            target: NvrtcTarget::for_arch(arch)?,
        })
    }

    /// What this compiler targets.
    pub fn nvrtc_target(&self) -> &NvrtcTarget {
        &self.target
    }
}

/// What [`OfflineCompiler`] "loads": a checked CUBIN's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedCubin {
    pub bytes: usize,
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        // A failure to free cannot be acted on here.
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

fn c_string(what: &str, key: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| nvrtc_error(format!("kernel {key}: {what} contains a NUL byte")))
}

impl Program {
    fn create(spec: &KernelSpec) -> Result<Self> {
        let key = &spec.key;
        let src = c_string("source", key, spec.source.text)?;
        let name = c_string("source name", key, spec.source.name)?;
        let header_texts = spec
            .headers
            .iter()
            .map(|h| c_string("header", key, h.text))
            .collect::<Result<Vec<_>>>()?;
        let header_names = spec
            .headers
            .iter()
            .map(|h| c_string("header name", key, h.name))
            .collect::<Result<Vec<_>>>()?;
        let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
        let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
        let count = i32::try_from(text_ptrs.len())
            .map_err(|_| nvrtc_error(format!("kernel {key}: too many headers")))?;
        let mut prog = std::ptr::null_mut();
        // SAFETY: every pointer is to a NUL-terminated string that outlives the call
        // (NVRTC copies them); the arrays hold `count` entries.
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                count,
                text_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
            )
        }
        .result()
        .map_err(|e| nvrtc_error(format!("kernel {key}: nvrtcCreateProgram: {e:?}")))?;
        Ok(Program(prog))
    }

    fn log(&self) -> String {
        // SAFETY: the program is live.
        match unsafe { nvrtc_result::get_program_log(self.0) } {
            Ok(log) => {
                let bytes: Vec<u8> = log
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&b| b != 0)
                    .collect();
                String::from_utf8_lossy(&bytes).trim().to_string()
            }
            Err(e) => format!("(no log: {e:?})"),
        }
    }

    fn lowered_name(&self, expr: &CStr) -> Result<String> {
        let mut lowered: *const c_char = std::ptr::null();
        // SAFETY: the program is live and compiled with `expr` added; NVRTC returns a
        // pointer owned by the program, copied before the program is destroyed.
        unsafe { sys::nvrtcGetLoweredName(self.0, expr.as_ptr(), &mut lowered) }
            .result()
            .map_err(|e| nvrtc_error(format!("nvrtcGetLoweredName({expr:?}): {e:?}")))?;
        if lowered.is_null() {
            return Err(nvrtc_error(format!(
                "nvrtcGetLoweredName({expr:?}) returned null"
            )));
        }
        // SAFETY: non-null, NUL-terminated, owned by the live program.
        Ok(unsafe { CStr::from_ptr(lowered) }
            .to_string_lossy()
            .into_owned())
    }

    fn cubin(&self) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: the program is live and compiled for a real architecture.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }
            .result()
            .map_err(|e| nvrtc_error(format!("nvrtcGetCUBINSize: {e:?}")))?;
        let mut image = vec![0u8; size];
        // SAFETY: `image` holds the `size` bytes NVRTC writes.
        unsafe { sys::nvrtcGetCUBIN(self.0, image.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| nvrtc_error(format!("nvrtcGetCUBIN: {e:?}")))?;
        Ok(image)
    }

    fn ptx(&self) -> Result<Vec<u8>> {
        // SAFETY: the program is live and compiled.
        let ptx = unsafe { nvrtc_result::get_ptx(self.0) }
            .map_err(|e| nvrtc_error(format!("nvrtcGetPTX: {e:?}")))?;
        Ok(ptx
            .iter()
            .map(|&c| c as u8)
            .take_while(|&b| b != 0)
            .collect())
    }
}

/// The options every compile for `arch` (e.g. `sm_90a`) starts with.
fn base_options_for(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ]
}

/// Compiles `spec` with `base_options` (which name the architecture) plus the spec's
/// own, producing an image of `kind`; returns it with NVRTC's log.
fn compile_program(
    spec: &KernelSpec,
    base_options: &[String],
    kind: ImageKind,
) -> Result<(CompiledKernel, String)> {
    let key = &spec.key;
    let prog = Program::create(spec)?;
    let expr = c_string("name expression", key, spec.name_expression.trim())?;
    // SAFETY: the program is live; `expr` is NUL-terminated (NVRTC copies it).
    unsafe { sys::nvrtcAddNameExpression(prog.0, expr.as_ptr()) }
        .result()
        .map_err(|e| nvrtc_error(format!("kernel {key}: nvrtcAddNameExpression: {e:?}")))?;
    let options: Vec<String> = base_options
        .iter()
        .chain(&spec.options)
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    if options.iter().any(|o| o.contains('\0')) {
        return Err(nvrtc_error(format!(
            "kernel {key}: an option contains a NUL byte"
        )));
    }
    // SAFETY: the program is live; the options contain no NUL (checked above).
    if let Err(e) = unsafe { nvrtc_result::compile_program(prog.0, &options) } {
        return Err(nvrtc_error(format!(
            "kernel {key}: NVRTC failed to compile {} ({}): {e:?}\n{}",
            spec.source.name,
            spec.name_expression,
            prog.log()
        )));
    }
    let lowered_name = prog.lowered_name(&expr)?;
    let image = match kind {
        ImageKind::Cubin => prog.cubin()?,
        ImageKind::Ptx => prog.ptx()?,
    };
    let compiled = CompiledKernel {
        kind,
        lowered_name,
        image,
    };
    Ok((compiled, prog.log()))
}

/// Compiles `spec` to CUBIN for the real architecture `arch` (e.g. `sm_90a`) with the
/// options the registry uses plus `extra` (e.g. `-Xptxas=-v`, whose resource usage
/// report lands in the log), without a device or a driver: only NVRTC must load.
/// Returns the image and NVRTC's log.
pub fn compile_offline(
    spec: &KernelSpec,
    arch: &str,
    extra: &[&str],
) -> Result<(CompiledKernel, String)> {
    ensure_nvrtc()?;
    let mut options = base_options_for(arch);
    options.extend(extra.iter().map(|o| o.to_string()));
    compile_program(spec, &options, ImageKind::Cubin)
}

impl KernelCompiler for OfflineCompiler {
    type Kernel = CheckedCubin;

    fn version(&self) -> String {
        self.target.version_label()
    }

    fn target(&self) -> String {
        self.target.arch.clone()
    }

    fn base_options(&self) -> Vec<String> {
        base_options_for(&self.target.arch)
    }

    fn compile(&self, spec: &KernelSpec) -> Result<CompiledKernel> {
        self.target.compile(spec)
    }

    fn load(&self, spec: &KernelSpec, compiled: &CompiledKernel) -> Result<CheckedCubin> {
        if compiled.kind != ImageKind::Cubin || !compiled.image.starts_with(b"\x7fELF") {
            return Err(nvrtc_error(format!(
                "kernel {}: the image is not an ELF CUBIN ({:?}, {} bytes)",
                spec.key,
                compiled.kind,
                compiled.image.len()
            )));
        }
        Ok(CheckedCubin {
            bytes: compiled.image.len(),
        })
    }
}

impl KernelCompiler for NvrtcCompiler {
    type Kernel = CudaKernel;

    fn version(&self) -> String {
        self.target.version_label()
    }

    fn target(&self) -> String {
        self.target.arch.clone()
    }

    fn base_options(&self) -> Vec<String> {
        base_options_for(&self.target.arch)
    }

    fn compile(&self, spec: &KernelSpec) -> Result<CompiledKernel> {
        self.target.compile(spec)
    }

    fn load(&self, spec: &KernelSpec, compiled: &CompiledKernel) -> Result<CudaKernel> {
        let key = &spec.key;
        let image = match compiled.kind {
            ImageKind::Cubin => Ptx::from_binary(compiled.image.clone()),
            ImageKind::Ptx => {
                let text = std::str::from_utf8(&compiled.image)
                    .ok()
                    .filter(|t| !t.contains('\0'))
                    .ok_or_else(|| {
                        nvrtc_error(format!("kernel {key}: PTX image is not NUL-free UTF-8"))
                    })?;
                Ptx::from_src(text)
            }
        };
        if compiled.lowered_name.contains('\0') {
            return Err(nvrtc_error(format!(
                "kernel {key}: entry point name contains a NUL byte"
            )));
        }
        let module = self
            .ctx
            .load_module(image)
            .map_err(|e| nvrtc_error(format!("kernel {key}: loading its module: {e:?}")))?;
        let function = module.load_function(&compiled.lowered_name).map_err(|e| {
            nvrtc_error(format!(
                "kernel {key}: entry point {} not found in its module: {e:?}",
                compiled.lowered_name
            ))
        })?;
        Ok(CudaKernel {
            key: key.clone(),
            function,
            dynamic_shared: std::sync::Mutex::new(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NVRTC_13_ARCHS: [i32; 10] = [75, 80, 86, 87, 88, 89, 90, 100, 110, 120];

    #[test]
    fn hopper_gets_arch_specific_cubin() {
        assert_eq!(
            choose_target((9, 0), &NVRTC_13_ARCHS).unwrap(),
            ("sm_90a".to_string(), ImageKind::Cubin)
        );
    }

    #[test]
    fn ada_gets_plain_cubin() {
        assert_eq!(
            choose_target((8, 9), &NVRTC_13_ARCHS).unwrap(),
            ("sm_89".to_string(), ImageKind::Cubin)
        );
    }

    #[test]
    fn device_newer_than_nvrtc_gets_ptx_of_the_newest_older_arch() {
        assert_eq!(
            choose_target((12, 1), &NVRTC_13_ARCHS).unwrap(),
            ("compute_120".to_string(), ImageKind::Ptx)
        );
    }

    #[test]
    fn parses_real_architectures() {
        assert_eq!(parse_arch("sm_90a").unwrap(), (90, true));
        assert_eq!(parse_arch("sm_89").unwrap(), (89, false));
        assert_eq!(parse_arch("sm_120").unwrap(), (120, false));
        for bad in ["compute_90", "sm_9", "sm_", "90", "sm_90b", "sm_9x", ""] {
            let e = parse_arch(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn device_older_than_every_supported_arch_is_an_error() {
        let e = choose_target((7, 0), &NVRTC_13_ARCHS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("7.0"), "{e}");
    }
}
