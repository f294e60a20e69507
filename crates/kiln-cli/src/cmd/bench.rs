//! `kiln bench`: prompt-processing and generation speed, like llama-bench, with the
//! generation's bandwidth efficiency against a copy bandwidth measured in the same run.

use super::backend::{run_on, BackendJob};
use super::device::DeviceArgs;
use clap::Args;
use kiln_core::ops::Cast;
use kiln_core::{plan, Aliasing, Backend, Bindings, DType, Error, Graph, Result, Scratch};
use kiln_gguf::Gguf;
use kiln_models::{LoadOptions, Model};
use std::path::PathBuf;
use std::time::Instant;

/// Measure prompt processing (pp) and token generation (tg) speed.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The GGUF model file.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Prompt tokens processed in one pass (pp test); 0 skips it.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens generated one at a time (tg test); 0 skips it.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test; the table shows mean ± standard deviation.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// KV cache element type: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub cache_type: DType,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Bytes (MiB) of the copy that measures memory bandwidth.
    #[arg(long, default_value_t = 1024)]
    pub copy_mib: usize,
}

/// Mean, sample standard deviation and median.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub median: f64,
}

impl Stat {
    fn of(v: &[f64]) -> Stat {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Stat {
            mean,
            std: var.sqrt(),
            median: if v.is_empty() {
                0.0
            } else {
                median(v.to_vec())
            },
        }
    }
}

/// Median of `v` (which must not be empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes per second of a device-to-device copy of `bytes` bytes on `backend`,
/// counting bytes read plus bytes written: the median of `reps` timed copies after a
/// warm-up, each a graph of one F32 `Cast` (a copy) through kiln's own kernel.
pub fn copy_bandwidth<BE: Backend>(backend: &BE, bytes: usize, reps: usize) -> Result<f64> {
    let len = bytes / 4;
    let mut g = Graph::new();
    let x = g.persistent("src", DType::F32, &[len])?;
    let out = g.persistent("dst", DType::F32, &[len])?;
    g.push(Cast { x, out, len })?;
    let memory = plan(&g, Aliasing::On);
    let mut scratch = Scratch::new();
    let (mut src, mut dst) = (backend.alloc(len * 4)?, backend.alloc(len * 4)?);
    let pattern: Vec<u8> = (0..len * 4).map(|i| (i % 251) as u8).collect();
    backend.upload(&mut src, &pattern)?;
    let mut times = Vec::new();
    for rep in 0..=reps {
        let mut b = Bindings::new(&g, &memory, &mut scratch)?;
        b.bind(&g, x, &mut src)?;
        b.bind(&g, out, &mut dst)?;
        let t = Instant::now();
        backend.execute(&g, &mut b)?;
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (len * 4) as f64 / median(times))
}

/// What one benchmark run measured.
#[derive(Debug)]
pub struct BenchReport {
    pub model: String,
    pub backend: String,
    pub weight_bytes: usize,
    pub params: usize,
    pub copy_bytes_per_s: f64,
    pub pp: Option<(usize, Stat, f64)>,
    pub tg: Option<(usize, Stat, f64)>,
}

/// Runs the pp and tg tests of `args` on `backend`.
pub fn bench<BE: Backend>(backend: BE, args: &BenchArgs) -> Result<BenchReport> {
    if args.repetitions == 0 {
        return Err(Error::invalid("bench", "--repetitions must be at least 1"));
    }
    let copy_bytes_per_s = copy_bandwidth(&backend, args.copy_mib << 20, 10)?;
    let file = Gguf::open(&args.model)?;
    let context = args.n_prompt.max(args.n_gen).max(1);
    let options = LoadOptions {
        context: Some(context),
        cache_dtype: args.cache_type,
    };
    let mut model = Model::load(backend, &file, options, &mut |_, _| {})?;
    let c = model.config().clone();
    let params: usize = file.tensor_infos().iter().map(|t| t.n_elements()).sum();
    // Weights read by the matrix products each token: every 2-D tensor but the
    // embedding table (of which one row is read), plus the output projection.
    let matmul_params: usize = file
        .tensor_infos()
        .iter()
        .filter(|t| t.shape().len() == 2 && t.name() != "token_embd.weight")
        .map(|t| t.n_elements())
        .sum::<usize>()
        + if c.tied_embeddings {
            c.vocab * c.n_embd
        } else {
            0
        };
    // Bytes read per generated token: every tensor once, except an untied embedding
    // table, of which one row is read.
    let embd_bytes = file.tensor("token_embd.weight")?.info.n_bytes();
    let decode_weight_bytes = model.weight_bytes() - if c.tied_embeddings { 0 } else { embd_bytes };
    let tokens: Vec<u32> = (0..context).map(|i| (i * 7919 % c.vocab) as u32).collect();
    let cache_elem = args.cache_type.block_bytes();

    let mut pp = None;
    if args.n_prompt > 0 {
        let mut rates = Vec::new();
        let mut flops = Vec::new();
        for rep in 0..=args.repetitions {
            model.reset();
            let t = Instant::now();
            model.forward(&tokens[..args.n_prompt])?;
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                let p = args.n_prompt as f64;
                let attn = 2.0 * 2.0 * c.n_layers as f64 * c.q_dim() as f64 * p * (p + 1.0) / 2.0;
                rates.push(p / secs);
                flops.push((2.0 * matmul_params as f64 * p + attn) / secs);
            }
        }
        pp = Some((args.n_prompt, Stat::of(&rates), median(flops)));
    }
    let mut tg = None;
    if args.n_gen > 0 {
        let mut rates = Vec::new();
        let mut eff = Vec::new();
        for rep in 0..=args.repetitions {
            model.reset();
            let t = Instant::now();
            for &tok in &tokens[..args.n_gen] {
                model.forward(&[tok])?;
            }
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                let n = args.n_gen as f64;
                // Each token reads the weights once and the cache up to its position.
                let kv_rows = n * (n + 1.0) / 2.0;
                let kv_bytes =
                    2.0 * c.n_layers as f64 * c.kv_dim() as f64 * cache_elem as f64 * kv_rows;
                let bytes = decode_weight_bytes as f64 * n + kv_bytes;
                rates.push(n / secs);
                eff.push(bytes / secs / copy_bytes_per_s);
            }
        }
        tg = Some((args.n_gen, Stat::of(&rates), median(eff)));
    }
    Ok(BenchReport {
        model: args.model.display().to_string(),
        backend: model.backend().name(),
        weight_bytes: model.weight_bytes(),
        params,
        copy_bytes_per_s,
        pp,
        tg,
    })
}

/// Prints `r` as a table (or JSON with `json`).
pub fn print(r: &BenchReport, json: bool) {
    if json {
        let test = |t: &Option<(usize, Stat, f64)>, extra: &str| {
            t.map(|(n, s, x)| serde_json::json!({"n": n, "tokens_per_s_mean": s.mean, "tokens_per_s_std": s.std, "tokens_per_s_median": s.median, extra: x}))
        };
        let v = serde_json::json!({
            "model": r.model, "backend": r.backend, "weight_bytes": r.weight_bytes, "params": r.params,
            "copy_bytes_per_s": r.copy_bytes_per_s,
            "pp": test(&r.pp, "flops_per_s_median"), "tg": test(&r.tg, "bandwidth_efficiency_median"),
        });
        println!("{v}");
        return;
    }
    println!(
        "copy bandwidth (read + write): {:.1} GB/s",
        r.copy_bytes_per_s / 1e9
    );
    println!("| model | size | params | backend | test | t/s | |");
    println!("| --- | ---: | ---: | --- | --- | ---: | --- |");
    let head = format!(
        "| {} | {:.2} GiB | {:.2} B | {} ",
        r.model,
        r.weight_bytes as f64 / (1u64 << 30) as f64,
        r.params as f64 / 1e9,
        r.backend
    );
    if let Some((n, s, flops)) = r.pp {
        println!(
            "{head}| pp{n} | {:.2} ± {:.2} | {:.2} TFLOP/s |",
            s.mean,
            s.std,
            flops / 1e12
        );
    }
    if let Some((n, s, eff)) = r.tg {
        println!(
            "{head}| tg{n} | {:.2} ± {:.2} | {:.1}% of copy bandwidth |",
            s.mean,
            s.std,
            eff * 100.0
        );
    }
}

/// Runs `kiln bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let file = Gguf::open(&args.model)?;
    let config = kiln_models::ModelConfig::from_gguf(&file)?;
    let cache = kiln_models::forward::CacheSpec {
        capacity: 1,
        dtype: args.cache_type,
    };
    let graph = kiln_models::model::graph_for(
        &config,
        &kiln_models::model::weight_descs(&file)?,
        1,
        cache,
    )?;
    drop(file);
    let report = run_on(args.device.device, &graph.graph, BenchJob { args: &args })?;
    print(&report, args.json);
    Ok(())
}

struct BenchJob<'a> {
    args: &'a BenchArgs,
}

impl BackendJob for BenchJob<'_> {
    type Output = BenchReport;
    fn run<BE: Backend>(self, backend: BE) -> Result<BenchReport> {
        bench(backend, self.args)
    }
}
