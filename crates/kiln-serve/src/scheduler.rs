//! Continuous batching: one thread owns the [`Engine`] and runs every sequence,
//! step by step, in the engine's slots.
//!
//! Each step: sequences whose client went away are cancelled and their slots freed;
//! waiting requests are admitted into free slots; every active sequence adds rows to
//! one step of the engine (its next prompt chunk, or its last sampled token); each
//! sequence that takes a token in the step gets it, turns it into text (whole UTF-8
//! characters, stop strings held back while they may still match) and sends that to
//! its client; finished sequences free their slots at once. When every sequence
//! taking a token is greedy ([`Sampler::is_greedy`]), the engine chooses the tokens
//! ([`Engine::forward_batch_greedy`]: a model does so on its device, downloading only
//! the ids); otherwise the step returns the logits ([`Engine::forward_batch`]) and
//! each of those sequences samples its token with its own seeded [`Sampler`]. Either
//! way a sequence gets the token its sampler gives.
//!
//! A sequence's prompt runs in chunks of [`SchedulerOptions::ubatch`] tokens whatever
//! else runs in the step, so its rows, and so its tokens, do not depend on the other
//! sequences.

use crate::engine::{BatchRow, Engine};
use crate::metrics::{Metrics, Outcome};
use crate::stop::StopMatcher;
use kiln_core::{Error, Result};
use kiln_models::tokenizer::{StreamDecoder, TokenId, Tokenizer};
use kiln_models::{Sampler, SamplerConfig};
use rayon::prelude::*;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// One completion to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// Token ids of the prompt: at least one, fewer than the engine's capacity.
    pub prompt: Vec<TokenId>,
    /// Tokens to generate at most (at least 1); the slot's capacity may stop it earlier.
    pub max_tokens: usize,
    /// Sampling settings, seed included.
    pub sampler: SamplerConfig,
    /// Generation stops before the first of these strings (none empty).
    pub stop: Vec<String>,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, or the slot's capacity.
    Length,
}

impl FinishReason {
    /// The OpenAI API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Tokens generated, an end-of-generation token or the tokens of a stop string
    /// included.
    pub completion_tokens: usize,
}

/// What a sequence sends its client, in order: text pieces, then one `Done` or one
/// `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Text(String),
    Done(Finish),
    Error(String),
}

/// Why [`Submitter::submit`] refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Every slot is busy and the queue is full.
    #[error("the server is busy: {0} requests are waiting already; retry later")]
    QueueFull(usize),
    /// The request cannot run (empty prompt, prompt too long, no tokens asked for).
    #[error("{0}")]
    Invalid(String),
    /// The scheduler has stopped.
    #[error("the model is no longer running")]
    Stopped,
}

/// How the scheduler runs.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerOptions {
    /// Requests that may wait for a slot (at least 1); more are refused.
    pub queue: usize,
    /// Prompt tokens per forward step of one sequence (at least 1), and the rows a
    /// step takes in prompt chunks when several sequences prefill at once (one chunk
    /// always runs).
    pub ubatch: usize,
}

/// What the scheduler knows of its engine once it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    pub slots: usize,
    /// Positions per slot: the context of one sequence.
    pub capacity: usize,
    pub vocab: usize,
}

struct Job {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
}

/// Sends requests to the scheduler. Cheap to clone; the scheduler stops when every
/// clone is dropped and its last sequence is done.
#[derive(Clone, Debug)]
pub struct Submitter {
    jobs: SyncSender<Job>,
    info: EngineInfo,
    queue: usize,
    metrics: Arc<Metrics>,
}

impl Submitter {
    /// The engine's slots, capacity and vocabulary.
    pub fn info(&self) -> EngineInfo {
        self.info
    }

    /// The metrics the scheduler updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Checks `request` and queues it; its events arrive on the receiver. Dropping the
    /// receiver cancels the sequence before the scheduler's next step.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        let capacity = self.info.capacity;
        if request.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        if request.prompt.len() >= capacity {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens but the context holds {capacity}, and at least one \
                 position must be left for generation",
                request.prompt.len()
            )));
        }
        if request.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        if request.stop.iter().any(String::is_empty) {
            return Err(SubmitError::Invalid("a stop string is empty".into()));
        }
        request
            .sampler
            .check()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let (events, receiver) = unbounded_channel();
        // Counted before sending, so the scheduler never sees it negative.
        self.metrics.queued.inc();
        match self.jobs.try_send(Job { request, events }) {
            Ok(()) => Ok(receiver),
            Err(e) => {
                self.metrics.queued.dec();
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(self.queue),
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

/// The scheduler's thread.
#[derive(Debug)]
pub struct Scheduler {
    thread: JoinHandle<()>,
}

impl Scheduler {
    /// Starts the scheduler's thread, which builds its engine with `make_engine` (so
    /// that an engine that is not `Send`, such as a model on a GPU, lives and dies on
    /// that thread) and then serves requests until every [`Submitter`] is dropped.
    /// Returns once the engine is built, or with its error.
    pub fn spawn<E, F>(
        make_engine: F,
        tokenizer: Arc<Tokenizer>,
        options: SchedulerOptions,
    ) -> Result<(Scheduler, Submitter)>
    where
        E: Engine,
        F: FnOnce() -> Result<E> + Send + 'static,
    {
        if options.queue == 0 || options.ubatch == 0 {
            return Err(Error::invalid(
                "scheduler",
                format!(
                    "the queue ({}) and the prompt chunk ({}) must be at least 1",
                    options.queue, options.ubatch
                ),
            ));
        }
        let (jobs, inbox) = mpsc::sync_channel(options.queue);
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || {
                let mut engine = match make_engine() {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = EngineInfo {
                    slots: engine.slots(),
                    capacity: engine.capacity(),
                    vocab: engine.vocab(),
                };
                let metrics = Arc::new(Metrics::new(info.slots));
                if ready_tx.send(Ok((info, metrics.clone()))).is_err() {
                    return;
                }
                run(&mut engine, &tokenizer, &inbox, options, &metrics);
            })
            .map_err(|e| Error::Backend {
                backend: "scheduler",
                msg: format!("cannot start the scheduler thread: {e}"),
            })?;
        let (info, metrics) = ready.recv().map_err(|_| Error::Backend {
            backend: "scheduler",
            msg: "the scheduler thread ended while building its engine".into(),
        })??;
        if info.slots == 0 || info.capacity < 2 {
            return Err(Error::invalid(
                "scheduler",
                format!(
                    "the engine has {} slots of {} positions; it needs a slot of at least 2",
                    info.slots, info.capacity
                ),
            ));
        }
        let submitter = Submitter {
            jobs,
            info,
            queue: options.queue,
            metrics,
        };
        Ok((Scheduler { thread }, submitter))
    }

    /// Waits for the thread to end: after every [`Submitter`] is dropped and the
    /// sequences it was running are done.
    pub fn join(self) {
        // A panic on the scheduler thread has been reported on stderr already.
        let _ = self.thread.join();
    }
}

/// A sequence in a slot.
struct Sequence<'t> {
    slot: usize,
    events: UnboundedSender<Event>,
    /// Prompt, then generated tokens.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// Tokens of `tokens` already in the slot.
    fed: usize,
    max_tokens: usize,
    sampler: Sampler,
    decoder: StreamDecoder<'t>,
    stops: StopMatcher,
    /// Rows this sequence has in the current step, and whether the last one returns
    /// logits.
    rows: usize,
    wants_logits: bool,
}

impl Sequence<'_> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn prefilling(&self) -> bool {
        self.fed < self.prompt_len
    }

    fn finish(&self, reason: FinishReason) -> Event {
        Event::Done(Finish {
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
        })
    }

    /// Sends `text` unless it is empty.
    fn send_text(&self, text: String) {
        if !text.is_empty() {
            // A closed channel is seen, and the sequence cancelled, at the next step.
            let _ = self.events.send(Event::Text(text));
        }
    }

    /// Takes sampled token `token`; returns why the sequence ends, if it does.
    fn accept(
        &mut self,
        token: TokenId,
        tokenizer: &Tokenizer,
        capacity: usize,
    ) -> Option<FinishReason> {
        self.tokens.push(token);
        if tokenizer.is_eog(token) {
            self.flush();
            return Some(FinishReason::Stop);
        }
        if let Some(text) = self.decoder.push(token) {
            let released = self.stops.push(&text);
            self.send_text(released.text);
            if released.stopped {
                return Some(FinishReason::Stop);
            }
        }
        // In a full slot the sampled token has no position to run at: it is the last.
        if self.generated() >= self.max_tokens || self.fed >= capacity {
            if self.flush() {
                return Some(FinishReason::Stop);
            }
            return Some(FinishReason::Length);
        }
        None
    }

    /// Sends the text still held back at the end of generation; returns whether a stop
    /// string turned up in it.
    fn flush(&mut self) -> bool {
        let mut stopped = false;
        if let Some(text) = self.decoder.flush() {
            let released = self.stops.push(&text);
            self.send_text(released.text);
            stopped = released.stopped;
        }
        if !stopped {
            let rest = self.stops.flush();
            self.send_text(rest);
        }
        stopped
    }
}

/// The scheduler's loop over `engine` (see the module's documentation); returns when
/// `inbox` is closed and no sequence is left.
fn run<E: Engine>(
    engine: &mut E,
    tokenizer: &Tokenizer,
    inbox: &Receiver<Job>,
    options: SchedulerOptions,
    metrics: &Metrics,
) {
    let slots = engine.slots();
    let capacity = engine.capacity();
    let vocab = engine.vocab();
    let mut active: Vec<Sequence<'_>> = Vec::with_capacity(slots);
    loop {
        active.retain(|seq| {
            if seq.events.is_closed() {
                engine.clear_slot(seq.slot);
                metrics.active.dec();
                metrics.request(Outcome::Cancelled);
                false
            } else {
                true
            }
        });
        while active.len() < slots {
            let job = if active.is_empty() {
                match inbox.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match inbox.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            metrics.queued.dec();
            if job.events.is_closed() {
                metrics.request(Outcome::Cancelled);
                continue;
            }
            let slot = (0..slots)
                .find(|s| active.iter().all(|seq| seq.slot != *s))
                .unwrap_or_default();
            engine.clear_slot(slot);
            metrics.active.inc();
            metrics
                .prompt_tokens
                .inc_by(job.request.prompt.len() as u64);
            active.push(Sequence {
                slot,
                events: job.events,
                prompt_len: job.request.prompt.len(),
                tokens: job.request.prompt,
                fed: 0,
                max_tokens: job.request.max_tokens,
                sampler: Sampler::new(job.request.sampler),
                decoder: tokenizer.stream_decoder(false),
                stops: StopMatcher::new(job.request.stop),
                rows: 0,
                wants_logits: false,
            });
        }
        let rows = plan_rows(&mut active, options.ubatch);
        let greedy = active
            .iter()
            .filter(|s| s.wants_logits)
            .all(|s| s.sampler.is_greedy());
        let start = Instant::now();
        let result = if greedy {
            engine.forward_batch_greedy(&rows).map(StepOutput::Tokens)
        } else {
            engine.forward_batch(&rows).map(StepOutput::Logits)
        };
        metrics.step_seconds.observe(start.elapsed().as_secs_f64());
        metrics
            .batch_size
            .observe(active.iter().filter(|s| s.rows > 0).count() as f64);
        let chosen = result
            .map_err(|e| e.to_string())
            .and_then(|output| next_tokens(&mut active, output, vocab));
        let sampled = match chosen {
            Ok(sampled) => sampled,
            Err(msg) => {
                tracing::error!("forward step failed: {msg}");
                active.retain(|seq| {
                    if seq.rows == 0 {
                        return true;
                    }
                    // Counted and freed before the client hears of it.
                    engine.clear_slot(seq.slot);
                    metrics.active.dec();
                    metrics.request(Outcome::Failed);
                    let _ = seq.events.send(Event::Error(msg.clone()));
                    false
                });
                continue;
            }
        };
        let mut sampled = sampled.into_iter();
        active.retain_mut(|seq| {
            seq.fed += seq.rows;
            let Some(token) = sampled.next().flatten() else {
                return true;
            };
            metrics.generated_tokens.inc();
            match seq.accept(token, tokenizer, capacity) {
                None => true,
                Some(reason) => {
                    engine.clear_slot(seq.slot);
                    metrics.active.dec();
                    metrics.request(Outcome::Finished);
                    let _ = seq.events.send(seq.finish(reason));
                    false
                }
            }
        });
    }
}

/// What one step of the engine returns for the rows wanting logits, in row order.
enum StepOutput {
    /// Their greedy tokens ([`Engine::forward_batch_greedy`]).
    Tokens(Vec<TokenId>),
    /// Their logits ([`Engine::forward_batch`]), `vocab` values each.
    Logits(Vec<f32>),
}

/// The next token of each sequence of `active` (in its order; `None` for those that
/// take none this step) from `output`, whose rows go to the sequences that want
/// logits, in order: a greedy token as it is, a logits row sampled with the
/// sequence's seeded sampler (all of them at once on the host's cores). Errors when
/// `output` does not have one row per such sequence.
fn next_tokens(
    active: &mut [Sequence<'_>],
    output: StepOutput,
    vocab: usize,
) -> std::result::Result<Vec<Option<TokenId>>, String> {
    let wanted = active.iter().filter(|s| s.wants_logits).count();
    match output {
        StepOutput::Tokens(tokens) if tokens.len() == wanted => {
            let mut tokens = tokens.into_iter();
            Ok(active
                .iter()
                .map(|seq| seq.wants_logits.then(|| tokens.next()).flatten())
                .collect())
        }
        StepOutput::Logits(logits) if logits.len() == vocab * wanted => {
            let mut rows = logits.chunks_exact(vocab.max(1));
            let row_of: Vec<Option<&[f32]>> = active
                .iter()
                .map(|seq| seq.wants_logits.then(|| rows.next()).flatten())
                .collect();
            Ok(active
                .par_iter_mut()
                .zip(row_of)
                .map(|(seq, row)| row.map(|row| seq.sampler.sample(row, &seq.tokens)))
                .collect())
        }
        StepOutput::Tokens(tokens) => Err(format!(
            "the engine returned {} tokens for the step's {wanted} sequences",
            tokens.len()
        )),
        StepOutput::Logits(logits) => Err(format!(
            "the engine returned {} logits for the step",
            logits.len()
        )),
    }
}

/// The rows of one step, in the order of `active` (so that the logits come back in
/// that order): each decoding sequence's last sampled token, and whole prompt chunks
/// of the prefilling sequences while the step stays within `ubatch` rows (the first
/// chunk always runs). Sets each sequence's `rows` and `wants_logits`.
fn plan_rows(active: &mut [Sequence<'_>], ubatch: usize) -> Vec<BatchRow> {
    let mut budget = ubatch.saturating_sub(active.iter().filter(|s| !s.prefilling()).count());
    let mut chunk_taken = false;
    let mut rows = Vec::new();
    for seq in active.iter_mut() {
        let (from, to) = if seq.prefilling() {
            let chunk = (seq.prompt_len - seq.fed).min(ubatch);
            if chunk_taken && chunk > budget {
                seq.rows = 0;
                seq.wants_logits = false;
                continue;
            }
            chunk_taken = true;
            budget = budget.saturating_sub(chunk);
            (seq.fed, seq.fed + chunk)
        } else {
            (seq.fed, seq.fed + 1)
        };
        seq.rows = to - from;
        seq.wants_logits = to >= seq.prompt_len;
        rows.extend((from..to).map(|i| BatchRow {
            slot: seq.slot,
            token: seq.tokens[i],
            logits: seq.wants_logits && i + 1 == to,
        }));
    }
    rows
}
