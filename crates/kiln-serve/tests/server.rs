//! The server on 127.0.0.1 over the project's small model on the CPU, driven by HTTP
//! clients: completions and chat, whole and streamed, against the library's own
//! greedy generation; 64 concurrent clients; a client that leaves mid-stream; bad
//! requests; the API key; a full queue.

mod common;

use futures_util::future::join_all;
use kiln_core::DType;
use kiln_cpu::CpuBackend;
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use kiln_models::tokenizer::Tokenizer;
use kiln_models::{LoadOptions, Model, SamplerConfig};
use kiln_serve::api::ErrorBody;
use kiln_serve::{ChatTemplate, ModelEngine, Scheduler, SchedulerOptions, ServerConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Positions per sequence: the small model's trained context.
const CONTEXT: usize = 512;
/// Sequences a step advances together: concurrent requests share batched steps.
const SLOTS: usize = 4;
const MODEL_ID: &str = "shakespeare-tiny";

/// The small model converted to GGUF once per test binary.
fn model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny");
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kiln-serve-test-{}.gguf", std::process::id()));
        HfCheckpoint::open(&dir)
            .unwrap()
            .write_gguf(&path, DType::F16, &mut |_, _| {})
            .unwrap();
        path
    })
}

fn load(file: &GgufFile) -> Model<CpuBackend> {
    load_slots(file, SLOTS)
}

fn load_slots(file: &GgufFile, slots: usize) -> Model<CpuBackend> {
    let options = LoadOptions {
        context: Some(CONTEXT),
        cache_dtype: DType::F32,
        slots,
    };
    Model::load(CpuBackend, file, options, &mut |_, _| {}).unwrap()
}

struct TestServer {
    base: String,
    client: reqwest::Client,
    tokenizer: Arc<Tokenizer>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Options {
    queue: usize,
    api_key: Option<&'static str>,
    slots: usize,
}

const DEFAULTS: Options = Options {
    queue: 64,
    api_key: None,
    slots: SLOTS,
};

async fn start(options: Options) -> TestServer {
    let path = model_path();
    let file = Gguf::open(path).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_gguf_metadata(file.metadata()).unwrap());
    let chat_template = ChatTemplate::from_gguf(file.metadata(), &tokenizer).unwrap();
    let (_scheduler, submitter) = Scheduler::spawn(
        move || Ok(ModelEngine::new(load_slots(&file, options.slots))),
        tokenizer.clone(),
        SchedulerOptions {
            queue: options.queue,
            ubatch: 512,
        },
    )
    .unwrap();
    let app = kiln_serve::router(
        submitter,
        tokenizer.clone(),
        ServerConfig {
            model_id: MODEL_ID.into(),
            api_key: options.api_key.map(String::from),
            n_predict: None,
            chat_template,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(kiln_serve::serve(listener, app, async {
        let _ = stopped.await;
    }));
    TestServer {
        base,
        client: reqwest::Client::new(),
        tokenizer,
        stop: Some(stop),
    }
}

impl TestServer {
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, path: &str, body: &Value) -> Value {
        let response = self.post(path, body).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// The data of every server-sent event of a streamed request, `[DONE]` included.
    async fn post_stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self.post(path, body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
        assert_eq!(content_type, "text/event-stream");
        sse_data(&response.text().await.unwrap())
    }

    /// The value of the metric line that starts with `name` (labels included).
    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until metric `name` reads `want` (10 s at most).
    async fn wait_for_metric(&self, name: &str, want: f64) {
        let start = Instant::now();
        while self.metric(name).await != want {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} is {}, not {want}",
                self.metric(name).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|line| line.strip_prefix("data: ").map(String::from))
        .collect()
}

/// What the library's generation loop produces greedily for `prompt`: the tokens
/// (an end-of-generation token included) and their text.
fn reference(
    model: &mut Model<CpuBackend>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
) -> (Vec<u32>, String) {
    common::generated(
        model,
        tokenizer,
        prompt,
        max_tokens,
        SamplerConfig::greedy(),
    )
}

fn finish_reason(tokenizer: &Tokenizer, tokens: &[u32], max_tokens: usize) -> &'static str {
    if tokens.last().is_some_and(|&t| tokenizer.is_eog(t)) {
        "stop"
    } else {
        assert_eq!(tokens.len(), max_tokens);
        "length"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_whole_and_streamed_match_the_librarys_greedy_generation() {
    let server = start(DEFAULTS).await;
    let prompt_ids = server.tokenizer.encode("ROMEO:", true, true);
    let file = Gguf::open(model_path()).unwrap();
    let (tokens, text) = reference(&mut load(&file), &server.tokenizer, &prompt_ids, 16);
    let reason = finish_reason(&server.tokenizer, &tokens, 16);
    let request = json!({
        "model": MODEL_ID, "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0
    });
    let body = server.post_json("/v1/completions", &request).await;
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], MODEL_ID);
    assert_eq!(body["choices"][0]["text"], text.as_str());
    assert_eq!(body["choices"][0]["finish_reason"], reason);
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_ids.len());
    assert_eq!(usage["completion_tokens"], tokens.len());
    assert_eq!(usage["total_tokens"], prompt_ids.len() + tokens.len());

    // The same as token ids, streamed, with the usage chunk.
    let mut streamed = request.clone();
    streamed["prompt"] = json!(prompt_ids);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let events = server.post_stream("/v1/completions", &streamed).await;
    let (done, chunks) = events.split_last().unwrap();
    assert_eq!(done, "[DONE]");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let (usage_chunk, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(&usage_chunk["usage"], usage);
    let (finish_chunk, text_chunks) = chunks.split_last().unwrap();
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], reason);
    let mut joined = String::new();
    for chunk in text_chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        joined.push_str(chunk["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(joined, text);
    assert!(text_chunks.len() <= tokens.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_chatml_for_the_small_model_whole_and_streamed() {
    let server = start(DEFAULTS).await;
    // The small model has no chat template: ChatML, as the README documents.
    let prompt = "<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n";
    let prompt_ids = server.tokenizer.encode(prompt, true, true);
    let file = Gguf::open(model_path()).unwrap();
    let (tokens, text) = reference(&mut load(&file), &server.tokenizer, &prompt_ids, 12);
    let request = json!({
        "model": MODEL_ID,
        "messages": [{ "role": "user", "content": "Who art thou?" }],
        "max_tokens": 12,
        "temperature": 0.0,
    });
    let body = server.post_json("/v1/chat/completions", &request).await;
    assert_eq!(body["object"], "chat.completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], text.as_str());
    assert_eq!(
        choice["finish_reason"],
        finish_reason(&server.tokenizer, &tokens, 12)
    );
    assert_eq!(body["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(body["usage"]["completion_tokens"], tokens.len());

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = server.post_stream("/v1/chat/completions", &streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.last().unwrap()["choices"][0]["delta"], json!({}));
    let content: String = chunks
        .iter()
        .inspect(|c| assert_eq!(c["object"], "chat.completion.chunk"))
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, text);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

/// The settings of request `i` of the concurrency test: greedy for even `i`, else
/// sampled at temperature 0.9 with seed `i` (the other settings the server's
/// defaults, llama-server's).
fn concurrent_settings(i: usize) -> (Value, SamplerConfig) {
    if i % 2 == 0 {
        (json!({ "temperature": 0 }), SamplerConfig::greedy())
    } else {
        let sampler = SamplerConfig {
            temperature: 0.9,
            seed: i as u64,
            ..SamplerConfig::default()
        };
        (json!({ "temperature": 0.9, "seed": i }), sampler)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_returns_the_same_tokens_among_63_others() {
    let server = Arc::new(start(DEFAULTS).await);
    let prompts: Vec<String> = (0..64)
        .map(|i| format!("{} {i}:", ["ROMEO", "JULIET", "KING", "NURSE"][i % 4]))
        .collect();
    let requests = prompts.iter().enumerate().map(|(i, p)| {
        let server = server.clone();
        let mut body = concurrent_settings(i).0;
        body["prompt"] = json!(p);
        body["max_tokens"] = json!(4);
        tokio::spawn(async move { server.post_json("/v1/completions", &body).await })
    });
    let results = join_all(requests).await;
    let file = Gguf::open(model_path()).unwrap();
    let mut model = load(&file);
    for (i, (prompt, result)) in prompts.iter().zip(results).enumerate() {
        let body = result.unwrap();
        let ids = server.tokenizer.encode(prompt, true, true);
        let sampler = concurrent_settings(i).1;
        let (tokens, text) = common::generated(&mut model, &server.tokenizer, &ids, 4, sampler);
        assert_eq!(body["choices"][0]["text"], text.as_str(), "{prompt}");
        assert_eq!(body["usage"]["completion_tokens"], tokens.len(), "{prompt}");
    }
    server
        .wait_for_metric("kiln_requests_total{outcome=\"finished\"}", 64.0)
        .await;
    // The requests shared steps: more than one sequence per step on average.
    let (sequences, steps) = (
        server.metric("kiln_batch_size_sum").await,
        server.metric("kiln_batch_size_count").await,
    );
    assert!(
        sequences > 1.5 * steps,
        "{sequences} sequences in {steps} steps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_slot() {
    let server = start(DEFAULTS).await;
    let request = json!({ "prompt": "ROMEO:", "max_tokens": 400, "stream": true });
    let mut response = server.post("/v1/completions", &request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    assert_eq!(server.metric("kiln_active_sequences").await, 1.0);
    drop(response);
    server
        .wait_for_metric("kiln_requests_total{outcome=\"cancelled\"}", 1.0)
        .await;
    assert_eq!(server.metric("kiln_active_sequences").await, 0.0);
    // Far fewer than 400 tokens were generated.
    assert!(server.metric("kiln_generated_tokens_total").await < 300.0);
    assert_eq!(
        server
            .metric("kiln_requests_total{outcome=\"finished\"}")
            .await,
        0.0
    );
    // A client that gives up waiting for a whole response cancels it too.
    let gave_up = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .json(&json!({ "prompt": "ROMEO:", "max_tokens": 400 }))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    server
        .wait_for_metric("kiln_requests_total{outcome=\"cancelled\"}", 2.0)
        .await;
    assert_eq!(server.metric("kiln_active_sequences").await, 0.0);
    // The slot serves the next request.
    let body = server
        .post_json(
            "/v1/completions",
            &json!({ "prompt": "KING:", "max_tokens": 2 }),
        )
        .await;
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

async fn expect_error(response: reqwest::Response, status: StatusCode) -> ErrorBody {
    assert_eq!(response.status(), status);
    let body: ErrorBody = response.json().await.unwrap();
    assert!(!body.error.message.is_empty());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_error_bodies() {
    let server = start(DEFAULTS).await;
    let bad_json = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .body("{\"prompt\": ")
        .send()
        .await
        .unwrap();
    let body = expect_error(bad_json, StatusCode::BAD_REQUEST).await;
    assert_eq!(body.error.kind, "invalid_request_error");

    let unknown = server
        .post(
            "/v1/chat/completions",
            &json!({ "model": "gpt-9", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await;
    let body = expect_error(unknown, StatusCode::NOT_FOUND).await;
    assert_eq!(body.error.code.as_deref(), Some("model_not_found"));

    let long_prompt = "ROMEO: ".repeat(400);
    let too_long = server
        .post("/v1/completions", &json!({ "prompt": long_prompt }))
        .await;
    let body = expect_error(too_long, StatusCode::BAD_REQUEST).await;
    assert!(
        body.error.message.contains("context"),
        "{}",
        body.error.message
    );

    for (field, value) in [
        ("temperature", json!(2.5)),
        ("temperature", json!(-1)),
        ("top_p", json!(0)),
        ("min_p", json!(1.5)),
        ("top_k", json!(-3)),
        ("max_tokens", json!(0)),
        ("n", json!(2)),
    ] {
        let mut request = json!({ "prompt": "ROMEO:" });
        request[field] = value.clone();
        let response = server.post("/v1/completions", &request).await;
        let body = expect_error(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            body.error.param.as_deref(),
            Some(field),
            "{field} = {value}"
        );
    }

    for messages in [
        json!([]),
        json!([{ "role": "user", "content": [{ "type": "image_url" }] }]),
    ] {
        let response = server
            .post("/v1/chat/completions", &json!({ "messages": messages }))
            .await;
        expect_error(response, StatusCode::BAD_REQUEST).await;
    }

    let nowhere = server
        .client
        .get(format!("{}/v1/nowhere", server.base))
        .send()
        .await
        .unwrap();
    expect_error(nowhere, StatusCode::NOT_FOUND).await;

    // On a client of its own: the server answers before reading the body and closes
    // that connection, which a pooled client could otherwise reuse for the next
    // request.
    let huge = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.base))
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .unwrap();
    expect_error(huge, StatusCode::PAYLOAD_TOO_LARGE).await;

    // None of it hurt the server.
    let health = server
        .client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(
        server
            .metric("kiln_requests_total{outcome=\"invalid\"}")
            .await
            >= 12.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_the_v1_endpoints() {
    let server = start(Options {
        api_key: Some("sekret"),
        ..DEFAULTS
    })
    .await;
    let models = format!("{}/v1/models", server.base);
    for key in [None, Some("wrong"), Some("sekre"), Some("sekrets")] {
        let mut request = server.client.get(&models);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let body = expect_error(request.send().await.unwrap(), StatusCode::UNAUTHORIZED).await;
        assert_eq!(body.error.code.as_deref(), Some("invalid_api_key"));
    }
    let ok = server
        .client
        .get(&models)
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let list: Value = ok.json().await.unwrap();
    assert_eq!(list["data"][0]["id"], MODEL_ID);
    let health = server
        .client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gets_503() {
    // One slot, held by a long request, and a queue of one.
    let server = Arc::new(
        start(Options {
            queue: 1,
            slots: 1,
            ..DEFAULTS
        })
        .await,
    );
    let long = json!({ "prompt": "ROMEO:", "max_tokens": 400, "stream": true });
    let mut running = server.post("/v1/completions", &long).await;
    running.chunk().await.unwrap().unwrap();
    let waiting = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .post(
                    "/v1/completions",
                    &json!({ "prompt": "KING:", "max_tokens": 2 }),
                )
                .await
                .status()
        })
    };
    server.wait_for_metric("kiln_queue_size", 1.0).await;
    let refused = server
        .post(
            "/v1/completions",
            &json!({ "prompt": "NURSE:", "max_tokens": 2 }),
        )
        .await;
    let body = expect_error(refused, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body.error.kind, "unavailable_error");
    drop(running);
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);
    assert_eq!(
        server
            .metric("kiln_requests_total{outcome=\"queue_full\"}")
            .await,
        1.0
    );
}
