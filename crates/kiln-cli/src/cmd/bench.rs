//! `kiln bench`: prompt-processing and generation speed, as llama-bench measures them,
//! with each test's efficiency against the device's own ceilings measured in the same
//! run: a driver device-to-device copy for generation (weight and KV-cache bytes read
//! per token), and achieved TFLOP/s (the FLOPs computed) for prompt processing.
//!
//! - `pp N`: N prompt tokens in one forward pass (in chunks of `--ubatch-size`), after
//!   `d` tokens of context (not timed).
//! - `tg N`: N tokens generated one at a time after `d` tokens of context, each step
//!   choosing its token on the device (greedy, as `kiln generate --temp 0`; with
//!   `--sampler default`, llama.cpp's default sampler settings) and downloading only
//!   its id.
//! - `--profile`: the device time of each launch of one decode step at each depth
//!   (with `--batch`: of one batched step of each B at depth `-p`), by op kind and by
//!   kernel, with the GB/s each op moves.
//! - `--batch B,...`: batched decode instead of the tests above. For each B, B
//!   sequences (one cache slot each) run their `-p` prompt tokens in one batched
//!   step (timed: the prompt processing), then generate `-n` tokens together in `-n`
//!   timed batched steps of one token per sequence, each sequence's next token the
//!   argmax of its logits, taken on the device, which downloads only the token ids
//!   ([`Model::forward_batch_greedy`]). Reports the total and per-stream generated
//!   tokens/s of those steps.

use super::backend::{run_on, BackendJob};
use super::device::DeviceArgs;
use super::flags;
use kiln_core::ops::SampleParams;
use kiln_core::{Backend, DType, Error, Graph, LaunchProfile, Op, Result};
use kiln_gguf::Gguf;
use kiln_models::model::DEFAULT_PREFILL_CHUNK;
use kiln_models::{LoadOptions, Model, ModelConfig, SamplerConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Which settings generation tests sample with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchSampler {
    /// The argmax (temperature 0).
    Greedy,
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05.
    Default,
}

/// Measure prompt processing (pp) and token generation (tg) speed.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The GGUF model file.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Prompt tokens processed in one forward pass (pp tests), comma-separated; 0 skips.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Tokens generated one at a time (tg tests), comma-separated; 0 skips.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Tokens already in the context before each test, comma-separated.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Repetitions of each test; the table shows mean ± standard deviation.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// KV cache element type: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub cache_type: DType,
    /// How generation tests choose each token.
    #[arg(long, value_enum, default_value = "greedy")]
    pub sampler: BenchSampler,
    /// Also print the per-launch profile of one decode step at each depth (with
    /// `--batch`, of one batched step of each B).
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Tokens per forward graph of a prompt (llama.cpp's `-ub`): a longer prompt runs
    /// in chunks of this many against the KV cache, in the scratch memory of one chunk.
    #[arg(long = "ubatch-size", visible_alias = "ubatch", value_name = "N",
          default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = flags::ubatch_size)]
    pub ubatch: usize,
    /// MiB of the device-to-device copy that measures the bandwidth ceiling (default:
    /// 1024 on a GPU, 64 on the CPU).
    #[arg(long)]
    pub copy_mib: Option<usize>,
    /// Batched decode instead of the pp and tg tests: for each comma-separated count
    /// B, B sequences each run a `-p` token prompt, then generate `-n` tokens
    /// together (the first values of `-p` and `-n`; `-d` is not used).
    #[arg(long, value_delimiter = ',', value_name = "B")]
    pub batch: Vec<usize>,
}

/// Mean, sample standard deviation and median.
#[derive(Clone, Copy, Debug, serde::Serialize)]
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
            median: median(v.to_vec()),
        }
    }
}

/// Median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes per second of the backend's own device-to-device copy of `bytes` bytes
/// ([`Backend::copy`]), counting bytes read plus bytes written: the median over `reps`
/// timings, each of 8 copies enqueued back to back and waited for, after a warm-up.
pub fn copy_bandwidth<BE: Backend>(backend: &BE, bytes: usize, reps: usize) -> Result<f64> {
    let (mut src, mut dst) = (backend.alloc(bytes)?, backend.alloc(bytes)?);
    let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    backend.upload(&mut src, &pattern)?;
    drop(pattern);
    const COPIES: usize = 8;
    let mut times = Vec::new();
    for rep in 0..=reps.max(1) {
        let t = Instant::now();
        for _ in 0..COPIES {
            backend.copy(&src, &mut dst)?;
        }
        backend.synchronize()?;
        if rep > 0 {
            times.push(t.elapsed().as_secs_f64() / COPIES as f64);
        }
    }
    Ok(2.0 * bytes as f64 / median(times))
}

/// One measured test.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TestResult {
    /// `pp512`, `tg128`.
    pub name: String,
    pub depth: usize,
    pub tokens_per_s: Stat,
    /// pp: FLOP/s (median); tg: weight and KV bytes read per second (median).
    pub rate: f64,
}

/// One batched-decode test (`--batch`): `batch` sequences of `n_prompt` prompt tokens
/// each generating `n_gen` tokens together.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchResult {
    pub batch: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Seconds of the batched step that runs every prompt.
    pub prompt_seconds: Stat,
    /// Generated tokens per second over all sequences.
    pub total_tokens_per_s: Stat,
    /// Generated tokens per second of one sequence.
    pub stream_tokens_per_s: Stat,
}

/// The time of one op kind or kernel in a profiled decode step.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProfileRow {
    pub name: String,
    pub launches: usize,
    pub seconds: f64,
    pub bytes: f64,
}

/// The profile of one decode step at a depth.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Profile {
    /// Sequences in the step, one token each (1 but for `--batch`).
    pub rows: usize,
    pub depth: usize,
    pub seconds: f64,
    pub by_op: Vec<ProfileRow>,
    pub by_kernel: Vec<ProfileRow>,
}

/// What one benchmark run measured.
#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    /// llama-bench's model column: architecture, size class and weight type.
    pub model: String,
    pub backend: String,
    /// What the backend runs with that changes its speed ([`kiln_core::Backend::settings`]).
    pub settings: String,
    pub weight_bytes: usize,
    pub params: usize,
    pub copy_bytes_per_s: f64,
    pub copy_bytes: usize,
    pub sampler: String,
    pub tests: Vec<TestResult>,
    pub profiles: Vec<Profile>,
    pub batches: Vec<BatchResult>,
}

/// What the tests need to know of the model: its shape and the bytes a decode step
/// reads.
struct Costs {
    config: ModelConfig,
    /// Parameters of every product but the output head's.
    body_params: f64,
    /// Parameters of the output head.
    head_params: f64,
    /// Weight bytes one decode step reads: every tensor, but only one row of an
    /// untied embedding table.
    decode_weight_bytes: f64,
    /// Bytes of one position of the K and V caches over all layers.
    kv_bytes_per_position: f64,
}

impl Costs {
    /// FLOPs of a prefill of `p` tokens after `d`: every product but the head for
    /// each token, the head for the last only, and attention over the visible rows.
    fn prefill_flops(&self, p: usize, d: usize) -> f64 {
        let c = &self.config;
        let (p, d) = (p as f64, d as f64);
        let visible = p * d + p * (p + 1.0) / 2.0;
        let attention = 2.0 * 2.0 * c.n_layers as f64 * c.q_dim() as f64 * visible;
        2.0 * self.body_params * p + 2.0 * self.head_params + attention
    }

    /// Bytes read by `n` decode steps after `d` tokens: the weights each step, and the
    /// cache rows up to each step's position.
    fn decode_bytes(&self, n: usize, d: usize) -> f64 {
        let rows: f64 = (d + 1..=d + n).map(|r| r as f64).sum();
        self.decode_weight_bytes * n as f64 + self.kv_bytes_per_position * rows
    }
}

/// The fraction of a tensor of `shape` one token reads: `n_expert_used / n_expert` of
/// a mixture-of-experts model's stacked experts (its 3-dimensional tensors, one
/// matrix per expert), all of every other tensor.
fn token_share(shape: &[usize], moe: Option<&kiln_models::config::MoeConfig>) -> f64 {
    match moe {
        Some(m) if shape.len() == 3 => m.n_expert_used as f64 / m.n_expert as f64,
        _ => 1.0,
    }
}

/// The dtype holding most of the weight bytes, for the model column.
fn main_type<B: AsRef<[u8]>>(file: &Gguf<B>) -> DType {
    let mut by_type: BTreeMap<&str, (usize, DType)> = BTreeMap::new();
    for t in file.tensor_infos() {
        if t.shape().len() == 2 {
            by_type.entry(t.dtype().name()).or_insert((0, t.dtype())).0 += t.n_bytes();
        }
    }
    by_type
        .into_values()
        .max_by_key(|(bytes, _)| *bytes)
        .map_or(DType::F32, |(_, d)| d)
}

/// `8B`, `1.2B`, `494M`: a parameter count as model names give it.
fn size_class(params: usize) -> String {
    let p = params as f64;
    if p >= 1e9 {
        let b = p / 1e9;
        if b >= 10.0 || (b - b.round()).abs() < 0.1 {
            format!("{:.0}B", b)
        } else {
            format!("{b:.1}B")
        }
    } else {
        format!("{:.0}M", p / 1e6)
    }
}

/// The sampling settings of `sampler`.
fn sample_params(sampler: BenchSampler) -> SampleParams {
    let config = match sampler {
        BenchSampler::Greedy => SamplerConfig::greedy(),
        BenchSampler::Default => SamplerConfig::default(),
    };
    SampleParams {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
        min_p: config.min_p,
    }
}

/// Runs the tests of `args` on `backend`.
pub fn bench<BE: Backend>(backend: BE, args: &BenchArgs) -> Result<BenchReport> {
    if args.repetitions == 0 {
        return Err(Error::invalid("bench", "--repetitions must be at least 1"));
    }
    let on_cpu = backend.name() == "cpu";
    let copy_bytes = args.copy_mib.unwrap_or(if on_cpu { 64 } else { 1024 }) << 20;
    if copy_bytes == 0 {
        return Err(Error::invalid("bench", "--copy-mib must be at least 1"));
    }
    eprintln!(
        "kiln: measuring the copy ceiling ({} MiB)",
        copy_bytes >> 20
    );
    let copy_bytes_per_s = copy_bandwidth(&backend, copy_bytes, 5)?;
    let file = Gguf::open(&args.model)?;
    let depth_max = args.depth.iter().copied().max().unwrap_or(0);
    let longest = args
        .n_prompt
        .iter()
        .chain(&args.n_gen)
        .copied()
        .max()
        .unwrap_or(0);
    let batch_max = args.batch.iter().copied().max().unwrap_or(0);
    let (batch_prompt, batch_gen) = (
        args.n_prompt.first().copied().unwrap_or(0),
        args.n_gen.first().copied().unwrap_or(0),
    );
    if !args.batch.is_empty() && (args.batch.contains(&0) || batch_gen == 0) {
        return Err(Error::invalid(
            "bench",
            "--batch needs counts of at least 1 and -n of at least 1",
        ));
    }
    let context = if args.batch.is_empty() {
        (depth_max + longest).max(1)
    } else {
        batch_prompt.max(1) + batch_gen
    };
    let options = LoadOptions {
        context: Some(context),
        cache_dtype: args.cache_type,
        slots: batch_max.max(1),
    };
    eprintln!(
        "kiln: loading {} ({context} positions)",
        args.model.display()
    );
    let mut model = Model::load(backend, &file, options, &mut |_, _| {})?;
    model.set_prefill_chunk(args.ubatch)?;
    let config = model.config().clone();
    let params: usize = file.tensor_infos().iter().map(|t| t.n_elements()).sum();
    let head_params = (config.vocab * config.n_embd) as f64;
    let share = |t: &kiln_gguf::TensorInfo| token_share(t.shape(), config.moe.as_ref());
    let body_params = file
        .tensor_infos()
        .iter()
        .filter(|t| {
            t.shape().len() >= 2 && !matches!(t.name(), "token_embd.weight" | "output.weight")
        })
        .map(|t| t.n_elements() as f64 * share(t))
        .sum::<f64>();
    // An untied embedding table is read one row per token.
    let decode_weight_bytes = file
        .tensor_infos()
        .iter()
        .filter(|t| config.tied_embeddings || t.name() != "token_embd.weight")
        .map(|t| t.n_bytes() as f64 * share(t))
        .sum::<f64>();
    let kv_bytes_per_position =
        2.0 * config.n_layers as f64 * args.cache_type.bytes_for(config.kv_dim())? as f64;
    let costs = Costs {
        config: config.clone(),
        body_params,
        head_params,
        decode_weight_bytes,
        kv_bytes_per_position,
    };
    let model_name = format!(
        "{} {} {}",
        config.arch.name(),
        size_class(params),
        main_type(&file).name().to_uppercase()
    );
    let tokens: Vec<u32> = (0..context)
        .map(|i| (i * 7919 % config.vocab) as u32)
        .collect();
    let sample = sample_params(args.sampler);
    let per_depth = args
        .n_prompt
        .iter()
        .chain(&args.n_gen)
        .filter(|&&n| n > 0)
        .count();
    let n_tests = args.depth.len() * per_depth;
    let mut tests = Vec::new();
    let mut profiles = Vec::new();
    let mut batches = Vec::new();
    for &b in &args.batch {
        let result = batched(
            &mut model,
            &tokens,
            b,
            batch_prompt,
            batch_gen,
            args.repetitions,
        )?;
        if args.profile {
            profiles.push(profile_batch(&mut model, &tokens, b, batch_prompt, &costs)?);
        }
        eprintln!(
            "kiln: batch {b}: {:.1} t/s generated in all, {:.1} t/s per stream",
            result.total_tokens_per_s.median, result.stream_tokens_per_s.median
        );
        batches.push(result);
    }
    let depths: &[usize] = if args.batch.is_empty() {
        &args.depth
    } else {
        &[]
    };
    for &d in depths {
        fill_context(&mut model, &tokens[..d])?;
        for &p in args.n_prompt.iter().filter(|&&p| p > 0) {
            let mut rates = Vec::new();
            let mut flops = Vec::new();
            for rep in 0..=args.repetitions {
                model.truncate(d)?;
                let t = Instant::now();
                model.forward(&tokens[d..d + p])?;
                let secs = t.elapsed().as_secs_f64();
                if rep > 0 {
                    rates.push(p as f64 / secs);
                    flops.push(costs.prefill_flops(p, d) / secs);
                }
            }
            tests.push(TestResult {
                name: format!("pp{p}"),
                depth: d,
                tokens_per_s: Stat::of(&rates),
                rate: median(flops),
            });
            report_progress(&tests, n_tests);
        }
        for &n in args.n_gen.iter().filter(|&&n| n > 0) {
            let mut rates = Vec::new();
            let mut bandwidth = Vec::new();
            for rep in 0..=args.repetitions {
                model.truncate(d)?;
                let t = Instant::now();
                let mut token = tokens[d];
                for i in 0..n {
                    let u = (i as f32 + 0.5) / n as f32;
                    token = model.forward_sample(&[token], sample, u)?;
                }
                let secs = t.elapsed().as_secs_f64();
                if rep > 0 {
                    rates.push(n as f64 / secs);
                    bandwidth.push(costs.decode_bytes(n, d) / secs);
                }
            }
            tests.push(TestResult {
                name: format!("tg{n}"),
                depth: d,
                tokens_per_s: Stat::of(&rates),
                rate: median(bandwidth),
            });
            report_progress(&tests, n_tests);
        }
        if args.profile {
            model.truncate(d)?;
            profiles.push(profile(&mut model, &tokens, d, sample, &costs)?);
        }
    }
    Ok(BenchReport {
        model: model_name,
        backend: model.backend().name(),
        settings: model.backend().settings(),
        weight_bytes: model.weight_bytes(),
        params,
        copy_bytes_per_s,
        copy_bytes,
        sampler: format!("{:?}", args.sampler).to_lowercase(),
        tests,
        profiles,
        batches,
    })
}

/// The rows of one batched step running `b` prompts of `p` tokens: slot `s` takes
/// `p` tokens of `tokens` from position `31 s` on (wrapping), its last row wanting
/// logits.
fn prompt_rows(tokens: &[u32], b: usize, p: usize) -> Vec<kiln_models::BatchRow> {
    (0..b)
        .flat_map(|slot| {
            (0..p).map(move |i| kiln_models::BatchRow {
                slot,
                token: tokens[(slot * 31 + i) % tokens.len()],
                logits: i + 1 == p,
            })
        })
        .collect()
}

/// One `--batch` test: `b` sequences in slots `0..b`, each a prompt of `p` tokens (a
/// window of `tokens` of its own), then `n` greedy tokens chosen on the device
/// ([`Model::forward_batch_greedy`]), over `reps` timed repetitions after a warm-up.
fn batched<BE: Backend>(
    model: &mut Model<BE>,
    tokens: &[u32],
    b: usize,
    p: usize,
    n: usize,
    reps: usize,
) -> Result<BatchResult> {
    use kiln_models::BatchRow;
    let (mut prompt_secs, mut totals, mut streams) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=reps {
        for slot in 0..b {
            model.clear_slot(slot);
        }
        // Every prompt in one batched step (in the model's chunks); a one-token prompt
        // of each sequence's first token where p is 0.
        let rows = prompt_rows(tokens, b, p.max(1));
        let t = Instant::now();
        // Each slot's greedy token, in slot order.
        let mut next = model.forward_batch_greedy(&rows)?;
        let prompt_time = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            let rows: Vec<BatchRow> = next
                .iter()
                .enumerate()
                .map(|(slot, &token)| BatchRow {
                    slot,
                    token,
                    logits: true,
                })
                .collect();
            next = model.forward_batch_greedy(&rows)?;
        }
        let secs = t.elapsed().as_secs_f64();
        if rep > 0 {
            prompt_secs.push(prompt_time);
            totals.push((b * n) as f64 / secs);
            streams.push(n as f64 / secs);
        }
    }
    Ok(BatchResult {
        batch: b,
        n_prompt: p,
        n_gen: n,
        prompt_seconds: Stat::of(&prompt_secs),
        total_tokens_per_s: Stat::of(&totals),
        stream_tokens_per_s: Stat::of(&streams),
    })
}

/// A size as llama-bench prints it: GiB from 1 GiB, else MiB ("4.21 GiB", "21.02 MiB").
fn size_text(bytes: usize) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A parameter count as llama-bench prints it: billions from 1 B, else millions
/// ("8.03 B", "11.02 M").
fn params_text(params: usize) -> String {
    let p = params as f64;
    if p >= 1e9 {
        format!("{:.2} B", p / 1e9)
    } else {
        format!("{:.2} M", p / 1e6)
    }
}

/// One line on stderr as each test finishes, so that long runs show where they are:
/// "kiln: test 2 of 6, tg128 at depth 4096: 421.7 t/s".
fn report_progress(tests: &[TestResult], n_tests: usize) {
    if let Some(t) = tests.last() {
        eprintln!(
            "kiln: test {} of {n_tests}, {} at depth {}: {:.1} t/s",
            tests.len(),
            t.name,
            t.depth,
            t.tokens_per_s.mean
        );
    }
}

/// Runs `tokens` into a fresh context (in the model's prefill chunks), so that tests
/// start at depth `tokens.len()`.
fn fill_context<BE: Backend>(model: &mut Model<BE>, tokens: &[u32]) -> Result<()> {
    model.reset();
    if tokens.is_empty() {
        return Ok(());
    }
    eprintln!("kiln: filling {} positions of context", tokens.len());
    model.forward(tokens).map(drop)
}

/// The profile of one decode step at depth `d` (warmed up by a few steps first).
fn profile<BE: Backend>(
    model: &mut Model<BE>,
    tokens: &[u32],
    d: usize,
    sample: SampleParams,
    costs: &Costs,
) -> Result<Profile> {
    for &t in &tokens[d..d + 2] {
        model.forward_sample(&[t], sample, 0.5)?;
    }
    model.truncate(d)?;
    let (times, graph) = model.profile_decode(tokens[d], Some(sample))?;
    Ok(summarize(&times, &graph, 1, d, costs))
}

/// The profile of one batched step of `b` sequences (slots `0..b`), each at depth `p`
/// after its prompt of `p` tokens (run as [`batched`] runs it).
fn profile_batch<BE: Backend>(
    model: &mut Model<BE>,
    tokens: &[u32],
    b: usize,
    p: usize,
    costs: &Costs,
) -> Result<Profile> {
    use kiln_models::BatchRow;
    for slot in 0..b {
        model.clear_slot(slot);
    }
    if p > 0 {
        model.forward_batch(&prompt_rows(tokens, b, p))?;
    }
    let step: Vec<BatchRow> = (0..b)
        .map(|slot| BatchRow {
            slot,
            token: tokens[(slot * 31 + p) % tokens.len()],
            logits: true,
        })
        .collect();
    let (times, graph) = model.profile_batch(&step)?;
    Ok(summarize(&times, &graph, b, p, costs))
}

/// A profile's tables from the launch times of one step of `rows` sequences at depth
/// `d` and its graph.
fn summarize(
    times: &[LaunchProfile],
    graph: &Graph,
    rows: usize,
    d: usize,
    costs: &Costs,
) -> Profile {
    let kv_rows = rows * (d + 1);
    let mut by_op: BTreeMap<&str, ProfileRow> = BTreeMap::new();
    let mut by_kernel: BTreeMap<String, ProfileRow> = BTreeMap::new();
    let ops = graph.ops();
    let mut counted = vec![false; ops.len()];
    for LaunchProfile {
        op_index,
        op,
        key,
        seconds,
    } in times
    {
        // An op's bytes count once, with its first launch.
        let bytes = if counted[*op_index] {
            0.0
        } else {
            counted[*op_index] = true;
            op_bytes(&ops[*op_index], graph, kv_rows, costs) as f64
        };
        for row in [
            by_op.entry(op).or_default(),
            by_kernel.entry(key.clone()).or_default(),
        ] {
            row.launches += 1;
            row.seconds += seconds;
            row.bytes += bytes;
        }
    }
    let finish = |rows: Vec<(String, ProfileRow)>| {
        let mut rows: Vec<ProfileRow> = rows
            .into_iter()
            .map(|(name, row)| ProfileRow { name, ..row })
            .collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    };
    Profile {
        rows,
        depth: d,
        seconds: times.iter().map(|t| t.seconds).sum(),
        by_op: finish(by_op.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        by_kernel: finish(by_kernel.into_iter().collect()),
    }
}

/// Bytes an op of a decode step reads and writes: its operands, except that a KV
/// cache counts only the rows it touches (all `kv_rows` for attention, one per token
/// for an append), and an expert-routed product only the experts it can choose (at
/// most `m * k` of them).
fn op_bytes(op: &Op, graph: &Graph, kv_rows: usize, costs: &Costs) -> usize {
    let is_cache = |id: &kiln_core::BufferId| {
        let name = &graph.buffers()[id.index()].name;
        name.starts_with("cache.")
    };
    let per_layer_position = costs.kv_bytes_per_position as usize / 2 / costs.config.n_layers;
    let bytes = |id: &kiln_core::BufferId| graph.buffers()[id.index()].bytes();
    let plain: usize = op
        .inputs()
        .iter()
        .chain(&op.outputs())
        .filter(|id| !is_cache(id))
        .map(bytes)
        .sum();
    let caches = op
        .inputs()
        .iter()
        .chain(&op.outputs())
        .filter(|id| is_cache(id))
        .count();
    let rows = match op {
        Op::Attention(_) => kv_rows,
        _ => 1,
    };
    let embedding_rows = match op {
        // An embedding reads one row of its table per token, not the table.
        Op::Embedding(e) => Some(
            bytes(&e.table) / e.vocab.max(1) * e.n_tokens
                + bytes(&e.out)
                + e.out_q8.as_ref().map_or(0, bytes),
        ),
        _ => None,
    };
    let unread_experts = match op {
        Op::MoeMatMul(mm) => {
            let chosen = (mm.m * mm.k).min(mm.n_expert);
            bytes(&mm.w) / mm.n_expert * (mm.n_expert - chosen)
        }
        _ => 0,
    };
    embedding_rows.unwrap_or(plain + caches * rows * per_layer_position - unread_experts)
}

/// Prints `r` as llama-bench-like tables (or JSON with `json`).
pub fn print(r: &BenchReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    println!(
        "ceiling: device-to-device copy of {} MiB on {} (read + write): {:.1} GB/s",
        r.copy_bytes >> 20,
        r.backend,
        r.copy_bytes_per_s / 1e9
    );
    if !r.settings.is_empty() {
        println!("settings: {}", r.settings);
    }
    if !r.tests.is_empty() {
        println!(
            "tg tests sample with the {} sampler on the device",
            r.sampler
        );
        println!();
        println!("| model | size | params | backend | test | t/s | efficiency |");
        println!("| --- | ---: | ---: | --- | --- | ---: | ---: |");
    }
    let head = format!(
        "| {} | {} | {} | {} ",
        r.model,
        size_text(r.weight_bytes),
        params_text(r.params),
        r.backend
    );
    for t in &r.tests {
        let test = if t.depth > 0 {
            format!("{} @ d{}", t.name, t.depth)
        } else {
            t.name.clone()
        };
        let efficiency = if t.name.starts_with("pp") {
            if t.rate >= 1e12 {
                format!("{:.1} TFLOP/s", t.rate / 1e12)
            } else {
                format!("{:.1} GFLOP/s", t.rate / 1e9)
            }
        } else {
            format!(
                "{:.1}% of copy ({:.0} GB/s)",
                100.0 * t.rate / r.copy_bytes_per_s,
                t.rate / 1e9
            )
        };
        println!(
            "{head}| {test} | {:.2} ± {:.2} | {efficiency} |",
            t.tokens_per_s.mean, t.tokens_per_s.std
        );
    }
    if !r.batches.is_empty() {
        println!();
        println!("batched decode: B sequences, each a prompt then generated tokens, one step per token for all (medians)");
        println!();
        println!(
            "| model | backend | B | prompt | gen | prompt time | total t/s | t/s per stream |"
        );
        println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for b in &r.batches {
            println!(
                "| {} | {} | {} | {} | {} | {:.3} s | {:.1} | {:.1} |",
                r.model,
                r.backend,
                b.batch,
                b.n_prompt,
                b.n_gen,
                b.prompt_seconds.median,
                b.total_tokens_per_s.median,
                b.stream_tokens_per_s.median
            );
        }
    }
    for p in &r.profiles {
        println!();
        let step = if p.rows > 1 {
            format!("batched decode step of {} sequences", p.rows)
        } else {
            "decode step".to_string()
        };
        println!(
            "profile of one {step} at depth {}: {:.1} us of device time, launches timed one by one",
            p.depth,
            p.seconds * 1e6
        );
        // Backends without kernels time ops: the kernel table would repeat the op's.
        let same = p.by_op.len() == p.by_kernel.len()
            && p.by_op
                .iter()
                .all(|o| p.by_kernel.iter().any(|k| k.name == o.name));
        let tables = if same { 1 } else { 2 };
        for (what, rows) in [("op", &p.by_op), ("kernel", &p.by_kernel)]
            .into_iter()
            .take(tables)
        {
            println!();
            println!("| {what} | launches | us | share | GB/s |");
            println!("| --- | ---: | ---: | ---: | ---: |");
            for row in rows.iter() {
                println!(
                    "| {} | {} | {:.1} | {:.1}% | {:.0} |",
                    row.name,
                    row.launches,
                    row.seconds * 1e6,
                    100.0 * row.seconds / p.seconds.max(1e-12),
                    row.bytes / row.seconds.max(1e-12) / 1e9
                );
            }
        }
    }
}

/// Runs `kiln bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let file = Gguf::open(&args.model)?;
    let config = ModelConfig::from_gguf(&file)?;
    let cache = kiln_models::forward::CacheSpec {
        capacity: 1,
        dtype: args.cache_type,
        slots: 1,
    };
    let weights = kiln_models::model::weight_descs(&file)?;
    let graph = kiln_models::model::graph_for(&config, &weights, 1, cache)?
        .with_sample(sample_params(args.sampler))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_its_experts_share_of_the_stacked_experts_only() {
        let moe = kiln_models::config::MoeConfig {
            n_expert: 128,
            n_expert_used: 8,
            n_ff_exp: 768,
            n_ff_shexp: None,
            norm_weights: true,
        };
        assert_eq!(token_share(&[128, 768, 2048], Some(&moe)), 0.0625);
        assert_eq!(token_share(&[2048, 128], Some(&moe)), 1.0);
        assert_eq!(token_share(&[4, 768, 2048], None), 1.0);
    }

    /// The costs of a model of Llama-3.1-8B's shape with round parameter counts.
    fn costs() -> Costs {
        let config = ModelConfig {
            arch: kiln_models::config::Arch::Llama,
            n_layers: 32,
            n_embd: 4096,
            n_ff: 14336,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            vocab: 128_256,
            context_length: 8192,
            rms_eps: 1e-5,
            rope: kiln_core::ops::RopeParams {
                head_dim: 128,
                rotary_dim: 128,
                base: 500_000.0,
                freq_scale: 1.0,
                style: kiln_core::ops::RopeStyle::Normal,
            },
            rope_freq_factors: true,
            tied_embeddings: false,
            qkv_bias: false,
            qk_norm: false,
            moe: None,
            linear: None,
        };
        Costs {
            config,
            body_params: 7.0e9,
            head_params: 0.5e9,
            decode_weight_bytes: 0.0,
            kv_bytes_per_position: 0.0,
        }
    }

    #[test]
    fn prefill_flops_count_the_output_head_for_the_last_row_only() {
        let c = costs();
        // Attention: QKᵀ and PV, 2 FLOPs per multiply-add, per visible (query, key)
        // pair of each layer: 32 layers of 4096 query values.
        let pairs = |n: f64| 2.0 * 2.0 * 32.0 * 4096.0 * n;
        assert_eq!(
            c.prefill_flops(1, 0),
            2.0 * 7.0e9 + 2.0 * 0.5e9 + pairs(1.0)
        );
        // Each further prompt row adds its body products and its attention over the
        // rows up to it, not another head.
        assert_eq!(
            c.prefill_flops(3, 0) - c.prefill_flops(2, 0),
            2.0 * 7.0e9 + pairs(3.0)
        );
        // After 10 rows of context the first prompt row sees 11.
        assert_eq!(
            c.prefill_flops(1, 10),
            2.0 * 7.0e9 + 2.0 * 0.5e9 + pairs(11.0)
        );
    }
}
