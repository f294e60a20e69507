//! `kiln serve`: an OpenAI-compatible HTTP server (see the kiln-serve crate).

use super::backend::{cache_dtype, run_on, BackendJob};
use super::device::DeviceArgs;
use super::generate::load_bar;
use super::{flags, model_file};
use clap::Args;
use kiln_core::{Backend, DType, Error, Result};
use kiln_gguf::GgufFile;
use kiln_models::forward::CacheSpec;
use kiln_models::model::{graph_for, weight_descs, DEFAULT_PREFILL_CHUNK};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, ModelConfig};
use kiln_serve::{ChatTemplate, Engine, ModelEngine, Scheduler, SchedulerOptions, ServerConfig};
use std::path::PathBuf;
use std::sync::Arc;

/// Serve a model over HTTP with OpenAI's API.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ServeArgs {
    /// A GGUF file, or a Hugging Face checkpoint directory (as for `kiln generate`).
    /// Default: the project's own small model.
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Address to listen on; 0.0.0.0 opens the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences to run at once (llama-server's -np): KV-cache slots of `-c` positions
    /// each, advanced together by each batched step; further requests wait in the
    /// queue for a slot.
    #[arg(long, visible_alias = "np", default_value_t = 1, value_parser = flags::parallel)]
    pub parallel: usize,
    /// Positions the KV cache of a sequence holds (default: the model's context, at
    /// most 4096); a prompt must be shorter.
    #[arg(short = 'c', long = "ctx-size", value_parser = flags::ctx_size)]
    pub context: Option<usize>,
    /// Require `Authorization: Bearer KEY` on the /v1 endpoints.
    #[arg(long)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Prompt tokens per forward step of a sequence (llama.cpp's `-ub`).
    #[arg(long = "ubatch-size", visible_alias = "ubatch", value_name = "N",
          default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = flags::ubatch_size)]
    pub ubatch: usize,
    /// Tokens a request generates at most, whatever its max_tokens; -1: until end
    /// of generation or a full context.
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, value_parser = flags::n_predict)]
    pub n_predict: i64,
    /// Requests that may wait for a slot; more are answered 503.
    #[arg(long, default_value_t = 256, value_parser = flags::queue)]
    pub queue: usize,
    /// The model's name in the API (default: the model file's or directory's name).
    #[arg(long)]
    pub alias: Option<String>,
}

/// Runs `kiln serve` until interrupted: a first Ctrl-C stops taking connections and
/// waits for the open ones, a second quits at once.
pub fn run(args: ServeArgs) -> Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => model_file::default_model_dir()?,
    };
    let file = model_file::open(Some(&path))?;
    let tokenizer = Arc::new(Tokenizer::from_gguf_metadata(file.metadata())?);
    let config = ModelConfig::from_gguf(&file)?;
    tokenizer.check_vocab(config.vocab)?;
    let chat_template = ChatTemplate::from_gguf(file.metadata(), &tokenizer)
        .map_err(|e| Error::format(kiln_serve::chat::CHAT_TEMPLATE_KEY, e.to_string()))?;
    if chat_template.is_default() {
        eprintln!("kiln: the model has no chat template; chat requests use ChatML");
    }
    let context = args
        .context
        .unwrap_or_else(|| config.context_length.min(LoadOptions::DEFAULT_MAX_CONTEXT));
    if args.context.is_some() {
        flags::warn_above_trained_context(context, config.context_length);
    }
    let graph = graph_for(
        &config,
        &weight_descs(&file)?,
        1,
        CacheSpec {
            capacity: 1,
            dtype: DType::F16,
            slots: 1,
        },
    )?;
    let device = args.device.device;
    let ubatch = args.ubatch;
    let slots = args.parallel;
    let (scheduler, submitter) = Scheduler::spawn(
        move || {
            let job = LoadJob {
                file: &file,
                context,
                slots,
                ubatch,
            };
            run_on(device, &graph.graph, job)
        },
        tokenizer.clone(),
        SchedulerOptions {
            queue: args.queue,
            ubatch,
        },
    )?;
    let info = submitter.info();
    let model_id = args.alias.clone().unwrap_or_else(|| {
        path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        )
    });
    let app = kiln_serve::router(
        submitter,
        tokenizer,
        ServerConfig {
            model_id: model_id.clone(),
            api_key: args.api_key.clone(),
            n_predict: usize::try_from(args.n_predict).ok(),
            chat_template,
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("<tokio runtime>", e))?;
    let address = format!("{}:{}", args.host, args.port);
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address).await?;
        eprintln!(
            "kiln: serving {model_id} on http://{} ({} slot(s) of {} positions); Ctrl-C stops",
            listener.local_addr()?,
            info.slots,
            info.capacity
        );
        kiln_serve::serve(listener, app, async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("kiln: stopping once the open requests are answered; Ctrl-C again quits now");
            tokio::spawn(async {
                let _ = tokio::signal::ctrl_c().await;
                std::process::exit(130);
            });
        })
        .await
    });
    // The router, and with it the last submitter, is gone: the scheduler ends.
    scheduler.join();
    served.map_err(|e| Error::io(address, e))
}

/// Loads the model on the chosen backend as the scheduler's engine.
struct LoadJob<'a> {
    file: &'a GgufFile,
    context: usize,
    slots: usize,
    ubatch: usize,
}

impl BackendJob for LoadJob<'_> {
    type Output = Box<dyn Engine>;

    fn run<BE: Backend + 'static>(self, backend: BE) -> Result<Box<dyn Engine>> {
        let bar = load_bar(self.file);
        let cache_dtype = cache_dtype(&backend);
        let mut model = Model::load(
            backend,
            self.file,
            LoadOptions {
                context: Some(self.context),
                cache_dtype,
                slots: self.slots,
            },
            &mut |done, _| bar.set_position(done),
        )?;
        model.set_prefill_chunk(self.ubatch)?;
        bar.finish_and_clear();
        Ok(Box::new(ModelEngine::new(model)))
    }
}
