//! kiln-serve: an OpenAI-compatible HTTP server over a kiln model.
//!
//! - [`api`]: the request and response bodies of `/v1/completions`,
//!   `/v1/chat/completions` and `/v1/models`, and the error body;
//! - [`chat`]: chat messages to a prompt with the model's own Jinja chat template;
//! - [`engine`]: what the scheduler runs, a model with KV-cache slots, and
//!   [`engine::ModelEngine`], a [`kiln_models::Model`] of several slots as one;
//! - [`scheduler`]: continuous batching on a thread of its own that owns the engine;
//! - [`stop`]: stop strings over streamed text;
//! - [`metrics`]: the counters of `GET /metrics`;
//! - [`error`]: error responses with the OpenAI API's body;
//! - [`server`]: the routes and handlers (axum), streaming as server-sent events.

pub mod api;
pub mod chat;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod stop;

pub use chat::ChatTemplate;
pub use engine::{BatchRow, Engine, ModelEngine};
pub use scheduler::{GenerationRequest, Scheduler, SchedulerOptions, Submitter};
pub use server::{router, serve, ServerConfig};
