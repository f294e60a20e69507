//! The server's counters, in the Prometheus (OpenMetrics) text format of `GET /metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::fmt::Write;

/// How a generation request ended: the `outcome` label of `kiln_requests_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// It generated its answer (end of generation, stop string, length).
    Finished,
    /// Its client went away before the end.
    Cancelled,
    /// The model failed on it.
    Failed,
    /// The queue was full (503).
    QueueFull,
    /// It was malformed or out of range (4xx).
    Invalid,
}

impl Outcome {
    /// The label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
            Outcome::QueueFull => "queue_full",
            Outcome::Invalid => "invalid",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

/// Everything `GET /metrics` reports. Shared by the handlers and the scheduler thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Requests waiting for a slot.
    pub queued: Gauge,
    /// Slots running a sequence.
    pub active: Gauge,
    /// Sequences per forward step.
    pub batch_size: Histogram,
    /// Seconds per forward step.
    pub step_seconds: Histogram,
}

impl Metrics {
    /// Fresh metrics for a server of `slots` slots.
    pub fn new(slots: usize) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "kiln_requests",
            "Generation requests by outcome",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "kiln_prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "kiln_generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "kiln_queue_size",
            "Requests waiting for a slot",
            queued.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "kiln_active_sequences",
            "Slots running a sequence",
            active.clone(),
        );
        let slot_gauge: Gauge = Gauge::default();
        slot_gauge.set(i64::try_from(slots).unwrap_or(i64::MAX));
        registry.register("kiln_slots", "Slots (sequences at once)", slot_gauge);
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "kiln_batch_size",
            "Sequences per forward step",
            batch_size.clone(),
        );
        let step_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        registry.register(
            "kiln_step_seconds",
            "Seconds per forward step",
            step_seconds.clone(),
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            queued,
            active,
            batch_size,
            step_seconds,
        }
    }

    /// Counts a request that ended with `outcome`.
    pub fn request(&self, outcome: Outcome) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Requests so far that ended with `outcome`.
    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
