//! The HTTP side: routes, handlers, server-sent events, the API key.

use crate::api::{
    ChatChoice, ChatChunkChoice, ChatRequest, Completion, CompletionRequest, Delta, MessageContent,
    ModelCard, ModelList, Prompt, ResponseMessage, SamplingParams, TextChoice, Usage,
};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::ApiError;
use crate::metrics::Outcome;
use crate::scheduler::{Event, Finish, GenerationRequest, SubmitError, Submitter};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use kiln_models::tokenizer::{TokenId, Tokenizer};
use kiln_models::SamplerConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

/// What the server answers with, besides its scheduler and tokenizer.
#[derive(Debug)]
pub struct ServerConfig {
    /// The model's name in requests and responses (`GET /v1/models`).
    pub model_id: String,
    /// When set, `/v1/*` requests must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The most tokens a request generates: its `max_tokens` when smaller, else this
    /// (also when it gives none); `None`: until end of generation or a full context.
    pub n_predict: Option<usize>,
    /// How chat messages become a prompt.
    pub chat_template: ChatTemplate,
}

struct AppState {
    submitter: Submitter,
    tokenizer: Arc<Tokenizer>,
    config: ServerConfig,
    /// SHA-256 of the API key: comparing digests in constant time reveals neither
    /// the key nor its length.
    api_key_digest: Option<[u8; 32]>,
    created: u64,
}

/// The server's routes: `POST /v1/completions`, `POST /v1/chat/completions`,
/// `GET /v1/models` (behind the API key when one is set), `GET /health` and
/// `GET /metrics`.
pub fn router(submitter: Submitter, tokenizer: Arc<Tokenizer>, config: ServerConfig) -> Router {
    let state = Arc::new(AppState {
        api_key_digest: config
            .api_key
            .as_ref()
            .map(|key| Sha256::digest(key.as_bytes()).into()),
        submitter,
        tokenizer,
        config,
        created: unix_time(),
    });
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(want) = &state.api_key_digest {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let digest = Sha256::digest(given.as_bytes());
        if !bool::from(digest.as_slice().ct_eq(want)) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.submitter.metrics().encode(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::invalid("no such endpoint")
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.config.model_id.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "kiln".into(),
        }],
    })
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = parse::<CompletionRequest>(body).and_then(|req| {
        state.check_model(req.model.as_deref())?;
        Ok(Prepared {
            prompt: state.completion_prompt(req.prompt)?,
            params: req.params,
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            chat: false,
        })
    });
    state.answer(prepared).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = parse::<ChatRequest>(body).and_then(|req| {
        state.check_model(req.model.as_deref())?;
        Ok(Prepared {
            prompt: state.chat_prompt(&req)?,
            params: req.params,
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            chat: true,
        })
    });
    state.answer(prepared).await
}

/// The JSON body of a request, whatever its content type; a body that cannot be read
/// (larger than axum's limit of 2 MB) keeps its status, with an OpenAI error body.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::invalid(e.body_text())
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

/// A request ready for the scheduler but for its settings.
struct Prepared {
    prompt: Vec<TokenId>,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
    chat: bool,
}

impl AppState {
    fn check_model(&self, asked: Option<&str>) -> Result<(), ApiError> {
        match asked {
            Some(name) if name != self.config.model_id => {
                Err(ApiError::unknown_model(name, &self.config.model_id))
            }
            _ => Ok(()),
        }
    }

    fn completion_prompt(&self, prompt: Prompt) -> Result<Vec<TokenId>, ApiError> {
        let text = match prompt {
            Prompt::Text(text) => text,
            Prompt::Texts(mut texts) if texts.len() == 1 => texts.remove(0),
            Prompt::Texts(texts) => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!(
                        "{} prompts in one request; send one per request",
                        texts.len()
                    ),
                ))
            }
            Prompt::Tokens(ids) => {
                let vocab = self.submitter.info().vocab;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary 0..{vocab}"),
                    ));
                }
                return Ok(ids);
            }
        };
        Ok(self.tokenizer.encode(&text, true, true))
    }

    fn chat_prompt(&self, req: &ChatRequest) -> Result<Vec<TokenId>, ApiError> {
        if req.messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "there are no messages"));
        }
        let messages = req
            .messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    None => String::new(),
                    Some(MessageContent::Text(text)) => text.clone(),
                    Some(MessageContent::Parts(parts)) => parts
                        .iter()
                        .map(|p| match (p.kind.as_str(), &p.text) {
                            ("text", Some(text)) => Ok(text.as_str()),
                            (kind, _) => Err(ApiError::invalid_param(
                                "messages",
                                format!("content of type `{kind}`: only text parts are supported"),
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join("\n"),
                };
                Ok(ChatMessage::new(m.role.clone(), content))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let template = &self.config.chat_template;
        let text = template
            .render(&messages, true)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        Ok(template.encode(&self.tokenizer, &text))
    }

    /// The scheduler's request for `prompt` with `params`, checked.
    fn generation(
        &self,
        prompt: Vec<TokenId>,
        params: SamplingParams,
    ) -> Result<GenerationRequest, ApiError> {
        if let Some(n) = params.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid_param(
                "n",
                format!("n = {n}: kiln generates one choice per request"),
            ));
        }
        let limit = self.config.n_predict.unwrap_or(usize::MAX);
        let max_tokens = match params.max_completion_tokens.or(params.max_tokens) {
            None => limit,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX).min(limit),
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    format!("max_tokens must be at least 1, got {n}"),
                ))
            }
        };
        let mut sampler = SamplerConfig {
            seed: match params.seed {
                Some(seed) if seed >= 0 => seed as u64,
                _ => rand::random(),
            },
            ..SamplerConfig::default()
        };
        let range = |name: &'static str, v: f64, ok: bool, want: &str| {
            if ok && v.is_finite() {
                Ok(v as f32)
            } else {
                Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be in {want}, got {v}"),
                ))
            }
        };
        if let Some(t) = params.temperature {
            sampler.temperature = range("temperature", t, (0.0..=2.0).contains(&t), "[0, 2]")?;
        }
        if let Some(p) = params.top_p {
            sampler.top_p = range("top_p", p, p > 0.0 && p <= 1.0, "(0, 1]")?;
        }
        if let Some(p) = params.min_p {
            sampler.min_p = range("min_p", p, (0.0..=1.0).contains(&p), "[0, 1]")?;
        }
        if let Some(k) = params.top_k {
            sampler.top_k = usize::try_from(k).map_err(|_| {
                ApiError::invalid_param("top_k", format!("top_k must be 0 (off) or more, got {k}"))
            })?;
        }
        let stop = params.stop.map(|s| s.into_vec()).unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param("stop", "a stop string is empty"));
        }
        Ok(GenerationRequest {
            prompt,
            max_tokens,
            sampler,
            stop,
        })
    }

    /// Submits `prepared` and answers: a whole response, or server-sent events.
    /// Client errors are counted in the metrics as invalid requests.
    async fn answer(&self, prepared: Result<Prepared, ApiError>) -> Response {
        let result = match prepared {
            Ok(prepared) => self.run(prepared).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(response) => response,
            Err(e) => {
                if e.status.is_client_error() {
                    self.submitter.metrics().request(Outcome::Invalid);
                }
                e.into_response()
            }
        }
    }

    async fn run(&self, prepared: Prepared) -> Result<Response, ApiError> {
        let request = self.generation(prepared.prompt, prepared.params)?;
        let events = self.submitter.submit(request).map_err(|e| match e {
            SubmitError::QueueFull(_) => {
                self.submitter.metrics().request(Outcome::QueueFull);
                ApiError::unavailable(e.to_string())
            }
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
            SubmitError::Invalid(msg) => ApiError::invalid(msg),
        })?;
        let shape = Shape {
            id: format!(
                "{}-{:016x}",
                if prepared.chat { "chatcmpl" } else { "cmpl" },
                rand::random::<u64>()
            ),
            created: unix_time(),
            model: self.config.model_id.clone(),
            chat: prepared.chat,
            include_usage: prepared.include_usage,
        };
        if prepared.stream {
            let stream = event_stream(events, shape);
            Ok(Sse::new(stream)
                .keep_alive(KeepAlive::default())
                .into_response())
        } else {
            whole(events, shape).await
        }
    }
}

/// What every response of one request shares.
struct Shape {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
}

impl Shape {
    fn completion<C>(&self, object: &str, choices: Vec<C>, usage: Option<Usage>) -> Completion<C> {
        Completion {
            id: self.id.clone(),
            object: object.into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// A streamed chunk: `role` (chat only), text, or the finish reason.
    fn chunk(&self, role: bool, text: Option<String>, finish: Option<&str>) -> SseEvent {
        let finish_reason = finish.map(str::to_string);
        if self.chat {
            let choice = ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: role.then(|| "assistant".to_string()),
                    content: text,
                },
                logprobs: None,
                finish_reason,
            };
            sse_json(&self.completion("chat.completion.chunk", vec![choice], None))
        } else {
            let choice = TextChoice {
                index: 0,
                text: text.unwrap_or_default(),
                logprobs: None,
                finish_reason,
            };
            sse_json(&self.completion("text_completion", vec![choice], None))
        }
    }

    /// The events after the last text: the finish reason, the usage when asked for,
    /// and `[DONE]`.
    fn end(&self, finish: Finish) -> Vec<SseEvent> {
        let mut events = vec![self.chunk(false, None, Some(finish.reason.as_str()))];
        if self.include_usage {
            let usage = Some(Usage::new(finish.prompt_tokens, finish.completion_tokens));
            let object = if self.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            events.push(sse_json(&self.completion::<TextChoice>(
                object,
                vec![],
                usage,
            )));
        }
        events.push(SseEvent::default().data("[DONE]"));
        events
    }
}

fn sse_json<T: Serialize>(value: &T) -> SseEvent {
    // These bodies are plain structs of strings and numbers: serializing them cannot fail.
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// The server-sent events of a streamed request: for chat, a first chunk with the
/// role; a chunk per piece of text; then [`Shape::end`], or an error body if the
/// model failed. Dropping the stream (the client went away) drops `events`, which
/// cancels the sequence.
fn event_stream(
    events: UnboundedReceiver<Event>,
    shape: Shape,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let first = shape
        .chat
        .then(|| shape.chunk(true, Some(String::new()), None));
    let rest = stream::unfold(Some((events, shape)), |state| async move {
        let (mut events, shape) = state?;
        let out = match events.recv().await {
            Some(Event::Text(text)) => {
                let chunk = shape.chunk(false, Some(text), None);
                return Some((vec![chunk], Some((events, shape))));
            }
            Some(Event::Done(finish)) => shape.end(finish),
            Some(Event::Error(msg)) => vec![sse_json(&ApiError::internal(msg).body())],
            None => vec![sse_json(
                &ApiError::internal("the scheduler stopped").body(),
            )],
        };
        Some((out, None))
    });
    stream::iter(first)
        .chain(rest.flat_map(stream::iter))
        .map(Ok)
}

/// The whole response of a request that did not ask for a stream.
async fn whole(mut events: UnboundedReceiver<Event>, shape: Shape) -> Result<Response, ApiError> {
    let mut text = String::new();
    let finish = loop {
        match events.recv().await {
            Some(Event::Text(piece)) => text.push_str(&piece),
            Some(Event::Done(finish)) => break finish,
            Some(Event::Error(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::internal("the scheduler stopped")),
        }
    };
    let usage = Some(Usage::new(finish.prompt_tokens, finish.completion_tokens));
    let reason = Some(finish.reason.as_str().to_string());
    Ok(if shape.chat {
        let choice = ChatChoice {
            index: 0,
            message: ResponseMessage {
                role: "assistant".into(),
                content: text,
            },
            logprobs: None,
            finish_reason: reason,
        };
        Json(shape.completion("chat.completion", vec![choice], usage)).into_response()
    } else {
        let choice = TextChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: reason,
        };
        Json(shape.completion("text_completion", vec![choice], usage)).into_response()
    })
}
