//! The kernel registry: lazy, single-flight compilation of kernel specialisations,
//! cached in memory and in a content-addressed disk cache.
//!
//! A [`KernelSpec`] names one specialisation: a source file, the headers it may
//! include, a name expression (a template instantiation such as
//! `kiln::rms_norm<true, false>`) and compile options. Its canonical key (e.g.
//! `rms_norm|weight=1|add=0`) identifies it within a process and labels it in
//! counters and profiles.
//!
//! The registry is generic over a [`KernelCompiler`], so its logic (keys, single
//! flight, disk cache, corruption recovery) is testable without a GPU.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use kiln_core::{Error, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// Version of the disk cache's file layout and key derivation. Bump it when either
/// changes so that old files are never read.
pub const CACHE_SCHEMA_VERSION: u32 = 1;

/// Magic bytes that start every disk cache file.
const CACHE_MAGIC: &[u8; 8] = b"KILNKRNL";

/// Bytes of the SHA-256 digest that ends every disk cache file.
const DIGEST_BYTES: usize = 32;

/// One in-memory source file: its include name and its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// The name the file is known by (`norm.cu`, or `common.cuh` as `#include`d).
    pub name: &'static str,
    /// The file's text.
    pub text: &'static str,
}

/// One kernel specialisation: what to compile and how to find its entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// Canonical key, e.g. `rms_norm|weight=1|add=0`: unique per specialisation within
    /// a process, and the kernel's label in counters and profiles.
    pub key: String,
    /// The translation unit that defines the kernel.
    pub source: KernelSource,
    /// Headers the source may `#include`, handed to the compiler in memory.
    pub headers: &'static [KernelSource],
    /// The expression naming the `__global__` function to instantiate and load, e.g.
    /// `kiln::rms_norm<true, false>`.
    pub name_expression: String,
    /// Extra compile options (e.g. `-DBLOCK=256`); order and surrounding whitespace do
    /// not matter.
    pub options: Vec<String>,
}

/// Whether a compiled image is machine code for one architecture or PTX for the
/// driver to compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code (CUBIN) for the target architecture.
    Cubin,
    /// PTX, compiled by the driver at load time.
    Ptx,
}

impl ImageKind {
    fn tag(self) -> u8 {
        match self {
            ImageKind::Cubin => 1,
            ImageKind::Ptx => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(ImageKind::Cubin),
            2 => Some(ImageKind::Ptx),
            _ => None,
        }
    }
}

/// What a compiler produces for one specialisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledKernel {
    /// CUBIN or PTX.
    pub kind: ImageKind,
    /// The entry point's symbol in the image (the lowered, mangled name).
    pub lowered_name: String,
    /// The image's bytes.
    pub image: Vec<u8>,
}

/// A compiler and loader of kernel specialisations for one device.
///
/// Everything that changes the compiled image must show in [`KernelCompiler::version`],
/// [`KernelCompiler::target`] or [`KernelCompiler::base_options`]: these enter the
/// disk cache key.
pub trait KernelCompiler: Send + Sync {
    /// A loaded kernel, ready to launch.
    type Kernel: Send + Sync;

    /// The compiler's name and version, e.g. `nvrtc 13.0`.
    fn version(&self) -> String;

    /// The code target, e.g. `sm_90a` (CUBIN) or `compute_90` (PTX).
    fn target(&self) -> String;

    /// Options the compiler passes to every compile, in addition to the spec's.
    fn base_options(&self) -> Vec<String>;

    /// Compiles `spec`. Errors carry the compiler's log and name the spec's key.
    fn compile(&self, spec: &KernelSpec) -> Result<CompiledKernel>;

    /// Loads a compiled image into the device. Errors when the image is unusable
    /// (corrupt, or for another device).
    fn load(&self, spec: &KernelSpec, compiled: &CompiledKernel) -> Result<Self::Kernel>;
}

/// How the registry uses its disk cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Read cached images and write new ones (the default).
    ReadWrite,
    /// Read cached images; never create, replace or delete a file.
    ReadOnly,
    /// Neither read nor write the disk.
    Off,
}

impl CacheMode {
    fn reads(self) -> bool {
        self != CacheMode::Off
    }

    fn writes(self) -> bool {
        self == CacheMode::ReadWrite
    }

    /// Lower-case name, as `KILN_KERNEL_CACHE` spells it.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::ReadWrite => "on",
            CacheMode::ReadOnly => "readonly",
            CacheMode::Off => "off",
        }
    }
}

/// Where and how the registry caches compiled kernels on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub mode: CacheMode,
    /// The directory holding the cache files (the `kernels` folder of kiln's cache
    /// directory). `None` only with [`CacheMode::Off`].
    pub dir: Option<PathBuf>,
}

impl CacheConfig {
    /// A read-write cache in `dir`.
    pub fn read_write(dir: impl Into<PathBuf>) -> Self {
        Self {
            mode: CacheMode::ReadWrite,
            dir: Some(dir.into()),
        }
    }

    /// A read-only cache in `dir`.
    pub fn read_only(dir: impl Into<PathBuf>) -> Self {
        Self {
            mode: CacheMode::ReadOnly,
            dir: Some(dir.into()),
        }
    }

    /// No disk cache.
    pub fn off() -> Self {
        Self {
            mode: CacheMode::Off,
            dir: None,
        }
    }

    /// The configuration the process environment asks for; see [`CacheConfig::from_vars`].
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// The configuration given environment variables read through `var`:
    ///
    /// - `KILN_KERNEL_CACHE`: `on` (or unset, or empty) reads and writes, `readonly`
    ///   only reads, `off` neither.
    /// - the directory: `kernels` in [`kiln_core::cache::cache_root`]:
    ///   `$KILN_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/kiln/kernels`, else
    ///   `$HOME/.cache/kiln/kernels`.
    ///
    /// Errors on an unknown mode, or when no directory can be found and the mode is
    /// not `off`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let mode = match set("KILN_KERNEL_CACHE").as_deref() {
            None | Some("on") => CacheMode::ReadWrite,
            Some("readonly") => CacheMode::ReadOnly,
            Some("off") => return Ok(Self::off()),
            Some(other) => {
                return Err(Error::invalid(
                    "KILN_KERNEL_CACHE",
                    format!("unknown value {other:?}; expected on, readonly or off"),
                ))
            }
        };
        let root = kiln_core::cache::cache_root(&var).ok_or_else(|| {
                Error::invalid(
                    "kernel cache",
                    "no cache directory: set KILN_CACHE_DIR, XDG_CACHE_HOME or HOME, or KILN_KERNEL_CACHE=off",
                )
            })?;
        Ok(Self {
            mode,
            dir: Some(root.join("kernels")),
        })
    }
}

/// The content-addressed disk cache key of `spec` compiled by a compiler of
/// `version` for `target` with `base_options`: a SHA-256 (hex) over the cache schema
/// version, the compiler version, the target, the normalised options (base and
/// spec's), the name expression, the source and every header (names and texts).
pub fn cache_key(
    spec: &KernelSpec,
    version: &str,
    target: &str,
    base_options: &[String],
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(&CACHE_SCHEMA_VERSION.to_le_bytes());
    field(version.as_bytes());
    field(target.as_bytes());
    let options = normalise_options(base_options.iter().chain(&spec.options));
    field(&(options.len() as u64).to_le_bytes());
    for o in &options {
        field(o.as_bytes());
    }
    field(spec.name_expression.trim().as_bytes());
    field(spec.source.name.as_bytes());
    field(spec.source.text.as_bytes());
    let mut headers: Vec<&KernelSource> = spec.headers.iter().collect();
    headers.sort_by_key(|s| s.name);
    field(&(headers.len() as u64).to_le_bytes());
    for s in headers {
        field(s.name.as_bytes());
        field(s.text.as_bytes());
    }
    hex(&h.finalize())
}

/// Options with surrounding whitespace trimmed, empty ones dropped, sorted and
/// deduplicated: the form that enters the cache key.
pub fn normalise_options<'a>(options: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = options
        .into_iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Counters of one module (one specialisation), as a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModuleStats {
    /// The specialisation's canonical key.
    pub key: String,
    /// Requests answered from memory.
    pub memory_hits: u64,
    /// Loads from the disk cache.
    pub disk_hits: u64,
    /// Compiles.
    pub compiles: u64,
    /// Milliseconds spent compiling.
    pub compile_ms: f64,
    /// Milliseconds spent loading images into the device (from disk or fresh).
    pub load_ms: f64,
}

/// Totals over every module, and the count of disk cache writes that failed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryStats {
    pub modules: Vec<ModuleStats>,
    /// Cache files that could not be written (the kernel still loads).
    pub disk_write_errors: u64,
    /// Cache files found corrupt or unloadable, and recompiled.
    pub disk_rejects: u64,
}

impl RegistryStats {
    /// The sum of every module's counters, keyed `total`.
    pub fn total(&self) -> ModuleStats {
        self.modules.iter().fold(
            ModuleStats {
                key: "total".into(),
                ..Default::default()
            },
            |mut t, m| {
                t.memory_hits += m.memory_hits;
                t.disk_hits += m.disk_hits;
                t.compiles += m.compiles;
                t.compile_ms += m.compile_ms;
                t.load_ms += m.load_ms;
                t
            },
        )
    }
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    compiles: AtomicU64,
    compile_us: AtomicU64,
    load_us: AtomicU64,
}

impl Counters {
    fn add_time(counter: &AtomicU64, since: Instant) {
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        counter.fetch_add(us, Ordering::Relaxed);
    }
}

/// One key's state: the loaded kernel once built, and its counters.
struct Slot<K> {
    kernel: Mutex<Option<Arc<K>>>,
    counters: Counters,
}

/// Locks `m`, recovering the data if a thread panicked while holding it: every
/// value guarded here is valid at any point (a map of slots, an optional kernel).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Compiles kernel specialisations on first request and caches them in memory and
/// on disk. `Send + Sync`; used through `&self`.
///
/// Many threads asking for one key at once cause one compile: a short lock on the
/// map finds (or creates) the key's slot, and the slot's own lock is held while its
/// kernel is built, so other keys compile in parallel.
pub struct KernelRegistry<C: KernelCompiler> {
    compiler: C,
    cache: CacheConfig,
    slots: Mutex<HashMap<String, Arc<Slot<C::Kernel>>>>,
    disk_write_errors: AtomicU64,
    disk_rejects: AtomicU64,
}

impl<C: KernelCompiler> KernelRegistry<C> {
    /// A registry compiling with `compiler` and caching as `cache` says.
    pub fn new(compiler: C, cache: CacheConfig) -> Self {
        Self {
            compiler,
            cache,
            slots: Mutex::new(HashMap::new()),
            disk_write_errors: AtomicU64::new(0),
            disk_rejects: AtomicU64::new(0),
        }
    }

    /// The compiler behind the registry.
    pub fn compiler(&self) -> &C {
        &self.compiler
    }

    /// The disk cache configuration.
    pub fn cache(&self) -> &CacheConfig {
        &self.cache
    }

    /// The kernel for `spec`: from memory, else from the disk cache, else compiled
    /// (and written to the disk cache).
    pub fn get(&self, spec: &KernelSpec) -> Result<Arc<C::Kernel>> {
        let slot = {
            let mut slots = lock(&self.slots);
            Arc::clone(slots.entry(spec.key.clone()).or_insert_with(|| {
                Arc::new(Slot {
                    kernel: Mutex::new(None),
                    counters: Counters::default(),
                })
            }))
        };
        let mut kernel = lock(&slot.kernel);
        if let Some(k) = kernel.as_ref() {
            slot.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(k));
        }
        let built = Arc::new(self.build(spec, &slot.counters)?);
        *kernel = Some(Arc::clone(&built));
        Ok(built)
    }

    /// Makes every spec ready (loaded, and in the disk cache when it writes), in
    /// parallel; calls `on_done` after each one, built or failed, from the worker
    /// thread. Errors list every spec that failed.
    pub fn precompile(
        &self,
        specs: &[KernelSpec],
        on_done: impl Fn(&KernelSpec) + Sync,
    ) -> Result<()> {
        let failures: Vec<String> = specs
            .par_iter()
            .filter_map(|spec| {
                let r = self.get(spec);
                on_done(spec);
                r.err().map(|e| format!("{}: {e}", spec.key))
            })
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: "cuda",
                msg: format!(
                    "{} of {} kernels failed to build:\n{}",
                    failures.len(),
                    specs.len(),
                    failures.join("\n")
                ),
            })
        }
    }

    /// A snapshot of every module's counters, sorted by key.
    pub fn stats(&self) -> RegistryStats {
        let slots: Vec<(String, Arc<Slot<C::Kernel>>)> = lock(&self.slots)
            .iter()
            .map(|(k, s)| (k.clone(), Arc::clone(s)))
            .collect();
        let ms = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1000.0;
        let mut modules: Vec<ModuleStats> = slots
            .into_iter()
            .map(|(key, s)| ModuleStats {
                key,
                memory_hits: s.counters.memory_hits.load(Ordering::Relaxed),
                disk_hits: s.counters.disk_hits.load(Ordering::Relaxed),
                compiles: s.counters.compiles.load(Ordering::Relaxed),
                compile_ms: ms(&s.counters.compile_us),
                load_ms: ms(&s.counters.load_us),
            })
            .collect();
        modules.sort_by(|a, b| a.key.cmp(&b.key));
        RegistryStats {
            modules,
            disk_write_errors: self.disk_write_errors.load(Ordering::Relaxed),
            disk_rejects: self.disk_rejects.load(Ordering::Relaxed),
        }
    }

    /// The disk cache file `spec` maps to, or `None` when the cache is off.
    pub fn cache_path(&self, spec: &KernelSpec) -> Option<PathBuf> {
        let dir = self
            .cache
            .dir
            .as_ref()
            .filter(|_| self.cache.mode.reads())?;
        let key = cache_key(
            spec,
            &self.compiler.version(),
            &self.compiler.target(),
            &self.compiler.base_options(),
        );
        Some(dir.join(format!("{key}.kernel")))
    }

    fn build(&self, spec: &KernelSpec, counters: &Counters) -> Result<C::Kernel> {
        let path = self.cache_path(spec);
        if let Some(path) = &path {
            if let Some(kernel) = self.load_cached(spec, path, counters) {
                counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(kernel);
            }
        }
        let started = Instant::now();
        let compiled = self.compiler.compile(spec)?;
        Counters::add_time(&counters.compile_us, started);
        counters.compiles.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = path.as_ref().filter(|_| self.cache.mode.writes()) {
            if let Err(e) = write_cache_file(path, &compiled) {
                self.disk_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("kernel {}: cannot write the disk cache: {e}", spec.key);
            }
        }
        let started = Instant::now();
        let kernel = self.compiler.load(spec, &compiled)?;
        Counters::add_time(&counters.load_us, started);
        Ok(kernel)
    }

    /// Loads `spec` from its cache file at `path`. A missing file is a miss; a corrupt
    /// or unloadable one is a miss too, and is deleted when the cache may write.
    fn load_cached(
        &self,
        spec: &KernelSpec,
        path: &Path,
        counters: &Counters,
    ) -> Option<C::Kernel> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("kernel {}: cannot read {}: {e}", spec.key, path.display());
                return None;
            }
        };
        let started = Instant::now();
        let loaded = decode_cache_file(&bytes).and_then(|c| self.compiler.load(spec, &c));
        match loaded {
            Ok(kernel) => {
                Counters::add_time(&counters.load_us, started);
                Some(kernel)
            }
            Err(e) => {
                self.disk_rejects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "kernel {}: cached file {} is unusable, recompiling: {e}",
                    spec.key,
                    path.display()
                );
                if self.cache.mode.writes() {
                    // A failed delete leaves the file to be replaced by the new image.
                    let _ = std::fs::remove_file(path);
                }
                None
            }
        }
    }
}

/// Encodes `compiled` as a cache file: magic, schema version, image kind, lowered
/// name, image, and a SHA-256 over all of it.
pub fn encode_cache_file(compiled: &CompiledKernel) -> Vec<u8> {
    let name = compiled.lowered_name.as_bytes();
    let mut out = Vec::with_capacity(64 + name.len() + compiled.image.len());
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&CACHE_SCHEMA_VERSION.to_le_bytes());
    out.push(compiled.kind.tag());
    out.extend_from_slice(&(name.len() as u64).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&(compiled.image.len() as u64).to_le_bytes());
    out.extend_from_slice(&compiled.image);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Decodes a cache file written by [`encode_cache_file`], checking its magic, schema
/// version, lengths and digest.
pub fn decode_cache_file(bytes: &[u8]) -> Result<CompiledKernel> {
    let corrupt = |what: &str| Error::format("kernel cache file", what.to_string());
    let body_len = bytes
        .len()
        .checked_sub(DIGEST_BYTES)
        .ok_or_else(|| corrupt("shorter than its digest"))?;
    let (body, digest) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != digest {
        return Err(corrupt("digest mismatch (truncated or corrupt)"));
    }
    let mut r = Reader { bytes: body };
    if r.take(CACHE_MAGIC.len())? != CACHE_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let schema = u32::from_le_bytes(r.array()?);
    if schema != CACHE_SCHEMA_VERSION {
        return Err(corrupt(&format!(
            "schema version {schema}, expected {CACHE_SCHEMA_VERSION}"
        )));
    }
    let kind = ImageKind::from_tag(r.take(1)?[0]).ok_or_else(|| corrupt("unknown image kind"))?;
    let name_len = r.len()?;
    let lowered_name = String::from_utf8(r.take(name_len)?.to_vec())
        .map_err(|_| corrupt("lowered name is not UTF-8"))?;
    let image_len = r.len()?;
    let image = r.take(image_len)?.to_vec();
    if !r.bytes.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(CompiledKernel {
        kind,
        lowered_name,
        image,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() {
            return Err(Error::format(
                "kernel cache file",
                format!("needs {n} more bytes, has {}", self.bytes.len()),
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n)
            .map_err(|_| Error::format("kernel cache file", format!("length {n} overflows")))
    }
}

/// Writes `compiled` to `path` through a temporary file in the same directory and a
/// rename, so that readers never see a partial file and racing writers are safe.
fn write_cache_file(path: &Path, compiled: &CompiledKernel) -> Result<()> {
    let dir = path.parent().ok_or_else(|| {
        Error::invalid("kernel cache", format!("{} has no parent", path.display()))
    })?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(&encode_cache_file(compiled))
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Files and bytes in a cache directory (0 and 0 when it does not exist).
pub fn cache_dir_usage(dir: &Path) -> Result<(u64, u64)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files = 0;
    let mut bytes = 0;
    for entry in entries {
        let meta = entry
            .and_then(|e| e.metadata())
            .map_err(|e| Error::io(dir, e))?;
        if meta.is_file() {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}
