//! `kiln generate`: stream text from a model.

use super::backend::{cache_dtype, run_on, BackendJob};
use super::device::DeviceArgs;
use super::flags;
use super::model_file;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::{Backend, DType, Error, Result};
use kiln_gguf::GgufFile;
use kiln_models::forward::CacheSpec;
use kiln_models::generate::{generate, SamplingPath, StopReason};
use kiln_models::model::DEFAULT_PREFILL_CHUNK;
use kiln_models::model::{graph_for, weight_descs};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, ModelConfig, Sampler, SamplerConfig};
use std::io::Write;
use std::path::PathBuf;

/// Generate text from a prompt.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// A GGUF file, or a Hugging Face checkpoint directory (converted once into
    /// kiln's cache, `$KILN_CACHE_DIR/models` by default `~/.cache/kiln/models`).
    /// Default: the project's own small Shakespeare model, models/shakespeare-tiny
    /// of the kiln checkout kiln runs in or from.
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// The prompt.
    #[arg(short = 'p', long, conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Tokens to generate at most; -1: until an end-of-generation token or a full
    /// context.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128, value_parser = flags::n_predict)]
    pub n_predict: i64,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Positions the KV cache holds (default: the model's context, at most 4096).
    #[arg(short = 'c', long = "ctx-size", value_parser = flags::ctx_size)]
    pub context: Option<usize>,
    /// Tokens per forward graph of a prompt (llama.cpp's `-ub`): a longer prompt runs
    /// in chunks of this many against the KV cache, in the scratch memory of one chunk.
    #[arg(long = "ubatch-size", visible_alias = "ubatch", value_name = "N",
          default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = flags::ubatch_size)]
    pub ubatch: usize,
    /// Temperature; 0 or below is greedy decoding.
    #[arg(long = "temp", default_value_t = 0.8, value_parser = flags::temperature)]
    pub temperature: f32,
    /// Top-k sampling (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (nucleus) sampling, in (0, 1] (1 = off).
    #[arg(long, default_value_t = 0.95, value_parser = flags::top_p)]
    pub top_p: f32,
    /// Min-p sampling, in [0, 1] (0 = off).
    #[arg(long, default_value_t = 0.05, value_parser = flags::min_p)]
    pub min_p: f32,
    /// Repetition penalty, above 0 (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = flags::repeat_penalty)]
    pub repeat_penalty: f32,
    /// Tokens the repetition penalty looks back over.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: a fresh one, printed with --verbose).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Print the model's configuration, memory plan and seed to stderr (set from
    /// the global `-v, --verbose`).
    #[arg(skip)]
    pub verbose: bool,
    /// Keep generating past end-of-generation tokens (for timing, as llama.cpp's
    /// --ignore-eos).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl GenerateArgs {
    fn sampler(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed.unwrap_or_else(rand_seed),
        }
    }

    /// Tokens to generate at most: `--n-predict`, or no limit for -1 and -2 (the
    /// context's size stops generation).
    fn max_tokens(&self) -> usize {
        usize::try_from(self.n_predict).unwrap_or(usize::MAX)
    }

    fn prompt_text(&self) -> Result<String> {
        match (&self.prompt, &self.file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| Error::io(f, e)),
            (None, None) => Ok(String::new()),
        }
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs `kiln generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let model = model_file::open(args.model.as_deref())?;
    let file = &model;
    let tokenizer = Tokenizer::from_gguf_metadata(file.metadata())?;
    let prompt = tokenizer.encode(&args.prompt_text()?, true, true);
    if prompt.is_empty() {
        return Err(Error::invalid(
            "generate",
            "the prompt is empty and the model adds no BOS token; pass --prompt",
        ));
    }
    let config = ModelConfig::from_gguf(file)?;
    tokenizer.check_vocab(config.vocab)?;
    let mut decode_graph = graph_for(
        &config,
        &weight_descs(file)?,
        1,
        CacheSpec {
            capacity: 1,
            dtype: DType::F16,
            slots: 1,
        },
    )?;
    let sampler = Sampler::new(args.sampler());
    if SamplingPath::for_sampler(&sampler) == SamplingPath::Device {
        decode_graph = decode_graph.with_sample(sampler.params())?;
    }
    let job = GenerateJob {
        args: &args,
        sampler,
        file,
        tokenizer: &tokenizer,
        prompt,
        config,
    };
    run_on(args.device.device, &decode_graph.graph, job)
}

struct GenerateJob<'a> {
    args: &'a GenerateArgs,
    sampler: Sampler,
    file: &'a GgufFile,
    tokenizer: &'a Tokenizer,
    prompt: Vec<u32>,
    config: ModelConfig,
}

impl BackendJob for GenerateJob<'_> {
    type Output = ();

    fn run<BE: Backend>(self, backend: BE) -> Result<()> {
        let args = self.args;
        let cache_dtype = cache_dtype(&backend);
        let context = args.context.unwrap_or_else(|| {
            self.config
                .context_length
                .min(LoadOptions::DEFAULT_MAX_CONTEXT)
        });
        if args.context.is_some() {
            flags::warn_above_trained_context(context, self.config.context_length);
        }
        if self.prompt.len() >= context {
            return Err(Error::invalid(
                "generate",
                format!(
                    "the prompt has {} tokens but the context holds {context}; raise --ctx-size",
                    self.prompt.len()
                ),
            ));
        }
        let bar = load_bar(self.file);
        let mut model = Model::load(
            backend,
            self.file,
            LoadOptions {
                context: Some(context),
                cache_dtype,
                slots: 1,
            },
            &mut |done, _| bar.set_position(done),
        )?;
        model.set_prefill_chunk(args.ubatch)?;
        bar.finish_and_clear();
        let mut sampler = self.sampler;
        if args.verbose {
            eprintln!(
                "kiln: model: {}; running on {}",
                self.config,
                model.backend().name()
            );
            eprintln!(
                "kiln: seed {}, {}",
                sampler.config().seed,
                SamplingPath::for_sampler(&sampler)
            );
        }
        let mut out = std::io::stdout().lock();
        let prompt_text = self.tokenizer.decode(&self.prompt);
        write!(out, "{prompt_text}").map_err(stdout_error)?;
        let mut decoder = self.tokenizer.stream_decoder(false);
        let tokenizer = self.tokenizer;
        let stats = generate(
            &mut model,
            &self.prompt,
            args.max_tokens(),
            &mut sampler,
            &|t| !args.ignore_eos && tokenizer.is_eog(t),
            &mut |t| {
                if let Some(text) = decoder.push(t) {
                    write!(out, "{text}")
                        .and_then(|()| out.flush())
                        .map_err(stdout_error)?;
                }
                Ok(())
            },
        )?;
        if let Some(text) = decoder.flush() {
            write!(out, "{text}").map_err(stdout_error)?;
        }
        writeln!(out).map_err(stdout_error)?;
        if args.verbose {
            eprintln!(
                "kiln: KV caches: {} slot(s) of {} positions, {} B",
                model.slots(),
                model.capacity(),
                model.kv_cache_bytes()
            );
            if let Some(p) = model.last_plan() {
                eprintln!(
                    "kiln: memory plan ({} tokens): persistent {} B, peak {} B with aliasing, {} B without",
                    p.n_tokens, p.persistent_bytes, p.peak_bytes, p.peak_bytes_unaliased
                );
            }
            let recurrent = model.recurrent_state_bytes();
            if recurrent > 0 {
                eprintln!(
                    "kiln: recurrent states (convolution and delta rule of the linear-attention layers, one sequence, in the persistent memory): {recurrent} B"
                );
            }
        }
        eprintln!(
            "kiln: prompt {} tokens, first token after {:.1} ms, {:.1} tokens/s; generated {} tokens, {:.1} tokens/s ({})",
            stats.prompt_tokens,
            stats.prompt_time.as_secs_f64() * 1e3,
            stats.prompt_tokens_per_s(),
            stats.generated_tokens,
            stats.generation_tokens_per_s(),
            model.backend().name()
        );
        if stats.stop == StopReason::ContextFull {
            let trained = self.config.context_length;
            let advice = if context < trained {
                format!("raise --ctx-size (the model was trained on {trained}) to generate more")
            } else {
                format!("the model was trained on {trained}")
            };
            eprintln!(
                "kiln: generation stopped because the context is full: {context} positions (--ctx-size); {advice}"
            );
        }
        Ok(())
    }
}

/// A progress bar over the bytes of `file`'s tensors, hidden for small models.
pub fn load_bar(file: &GgufFile) -> ProgressBar {
    let total: u64 = file.tensor_infos().iter().map(|t| t.n_bytes() as u64).sum();
    // Small models load in a blink; a bar would only flicker.
    if total < 256 << 20 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn stdout_error(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}
