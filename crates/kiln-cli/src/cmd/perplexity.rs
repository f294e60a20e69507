//! `kiln perplexity`: a model's perplexity over a text file, as llama-perplexity
//! computes it (see [`kiln_models::perplexity`]).

use super::backend::{cache_dtype, run_on, BackendJob};
use super::device::DeviceArgs;
use super::{flags, model_file};
use clap::Args;
use kiln_core::{Backend, DType, Error, Result};
use kiln_gguf::GgufFile;
use kiln_models::forward::CacheSpec;
use kiln_models::model::DEFAULT_PREFILL_CHUNK;
use kiln_models::model::{graph_for, weight_descs};
use kiln_models::perplexity::{perplexity, PerplexityOptions};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, ModelConfig};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Compute a model's perplexity over a text file.
#[derive(Args, Debug)]
#[command(after_help = "\
As llama-perplexity: the text's tokens (BOS first) are cut into windows of
--ctx-size tokens, each run alone from BOS; the second half of each window is
scored, so that every scored token has at least half a window of context. Prints
the running perplexity after each window ([1]35.12,[2]...) and the final
estimate with its uncertainty (PPL times the standard error of the mean
log-likelihood). A window costs one prefill of half of it and one decode step per
token of the other half.")]
pub struct PerplexityArgs {
    /// A GGUF file, or a Hugging Face checkpoint directory (converted on the fly).
    /// Default: the project's own small Shakespeare model.
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// The text to score.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Tokens per window (llama-perplexity's default, 512).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512, value_parser = flags::ctx_size)]
    pub context: usize,
    /// Windows to score at most (default: every whole window of the text).
    #[arg(long, value_name = "N", value_parser = flags::chunks)]
    pub chunks: Option<usize>,
    /// Tokens per forward graph of a prompt (llama.cpp's `-ub`): a longer prompt runs
    /// in chunks of this many against the KV cache, in the scratch memory of one chunk.
    #[arg(long = "ubatch-size", visible_alias = "ubatch", value_name = "N",
          default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = flags::ubatch_size)]
    pub ubatch: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `kiln perplexity`.
pub fn run(args: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file).map_err(|e| Error::io(&args.file, e))?;
    let model = model_file::open(args.model.as_deref())?;
    let file = &model;
    let tokenizer = Tokenizer::from_gguf_metadata(file.metadata())?;
    let config = ModelConfig::from_gguf(file)?;
    flags::warn_above_trained_context(args.context, config.context_length);
    let tokens = tokenizer.encode(&text, true, false);
    let options = PerplexityOptions {
        ctx: args.context,
        max_chunks: args.chunks,
        bos: tokenizer.bos().filter(|_| tokenizer.add_bos()),
    };
    if options.ctx < 3 {
        return Err(Error::invalid(
            "kiln perplexity",
            format!(
                "--ctx-size {} leaves no token to score; give at least 3 (512 is usual)",
                options.ctx
            ),
        ));
    }
    let n_chunks = options.n_chunks(tokens.len());
    if n_chunks == 0 {
        return Err(Error::invalid(
            "kiln perplexity",
            format!(
                "{} has {} tokens, fewer than one window of --ctx-size {}; give a longer text or a smaller --ctx-size",
                args.file.display(),
                tokens.len(),
                options.ctx
            ),
        ));
    }
    let whole = tokens.len() / options.ctx;
    let of_whole = if n_chunks < whole {
        format!(" (of {whole})")
    } else {
        String::new()
    };
    eprintln!(
        "kiln: {} has {} tokens: scoring {n_chunks} windows{of_whole} of {}, the last {} tokens of each ({} in all)",
        args.file.display(),
        tokens.len(),
        options.ctx,
        options.scored_per_chunk(),
        n_chunks * options.scored_per_chunk()
    );
    let graph = graph_for(
        &config,
        &weight_descs(file)?,
        1,
        CacheSpec {
            capacity: options.ctx,
            dtype: DType::F16,
            slots: 1,
        },
    )?;
    let job = PerplexityJob {
        file,
        tokens,
        options,
        ubatch: args.ubatch,
    };
    run_on(args.device.device, &graph.graph, job)
}

struct PerplexityJob<'a> {
    file: &'a GgufFile,
    tokens: Vec<u32>,
    options: PerplexityOptions,
    ubatch: usize,
}

impl BackendJob for PerplexityJob<'_> {
    type Output = ();

    fn run<BE: Backend>(self, backend: BE) -> Result<()> {
        let cache_dtype = cache_dtype(&backend);
        let mut model = Model::load(
            backend,
            self.file,
            LoadOptions {
                context: Some(self.options.ctx),
                cache_dtype,
                slots: 1,
            },
            &mut |_, _| {},
        )?;
        model.set_prefill_chunk(self.ubatch)?;
        let backend_name = model.backend().name();
        let mut out = std::io::stdout().lock();
        let start = Instant::now();
        let result = perplexity(
            &mut model,
            &self.tokens,
            self.options,
            &mut |chunk, n_chunks, running| {
                if chunk == 0 {
                    let per_window = start.elapsed().as_secs_f64();
                    eprintln!(
                        "kiln: {per_window:.2} s per window on {}, about {:.1} minutes for {n_chunks}",
                        backend_name,
                        per_window * n_chunks as f64 / 60.0
                    );
                }
                write!(out, "[{}]{:.4},", chunk + 1, running.ppl())
                    .and_then(|()| out.flush())
                    .map_err(stdout_error)
            },
        )?;
        writeln!(out).map_err(stdout_error)?;
        writeln!(
            out,
            "Final estimate: PPL = {:.4} +/- {:.5} (ln PPL = {:.4} +/- {:.4} nats per token over {} tokens)",
            result.ppl(),
            result.ppl_error(),
            result.mean_nll(),
            result.mean_nll_error(),
            result.count
        )
        .map_err(stdout_error)?;
        eprintln!(
            "kiln: {} tokens scored in {:.1} s ({})",
            result.count,
            start.elapsed().as_secs_f64(),
            backend_name
        );
        Ok(())
    }
}

fn stdout_error(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}
