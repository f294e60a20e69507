//! The scheduler over a mock engine: admission into slots, interleaving, prompt
//! chunks, greedy steps' tokens from the engine, cancellation, stop strings, end of
//! generation, UTF-8, the context limit, a full queue, a failing engine and one that
//! returns the wrong number of rows. Expected tokens come from the mock's rule
//! applied directly ([`common::continuation`]), never from the scheduler.

mod common;

use common::*;
use kiln_models::SamplerConfig;
use kiln_serve::metrics::Outcome;
use kiln_serve::scheduler::{Event, Finish, FinishReason, SubmitError};
use kiln_serve::{BatchRow, GenerationRequest, Scheduler, SchedulerOptions, Submitter};
use std::collections::HashSet;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

fn spawn(engine: MockEngine, queue: usize, ubatch: usize) -> (Scheduler, Submitter) {
    Scheduler::spawn(
        move || Ok(engine),
        Arc::new(tokenizer()),
        SchedulerOptions { queue, ubatch },
    )
    .expect("the scheduler starts")
}

/// A mock of `slots` slots whose steps each wait for a permit on the returned sender.
fn gated(slots: usize, capacity: usize) -> (MockEngine, Receiver<Vec<BatchRow>>, Sender<()>) {
    let (log, calls) = channel();
    let (permits, gate) = channel();
    let mut engine = MockEngine::new(slots, capacity, log);
    engine.gate = Some(gate);
    (engine, calls, permits)
}

fn open(permits: &Sender<()>) {
    for _ in 0..10_000 {
        permits.send(()).unwrap();
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampler: SamplerConfig::greedy(),
        stop: Vec::new(),
    }
}

/// The text pieces and the end of a sequence.
fn collect(mut events: UnboundedReceiver<Event>) -> (Vec<String>, Finish) {
    let mut pieces = Vec::new();
    loop {
        match events.blocking_recv().expect("the sequence ends with Done") {
            Event::Text(t) => pieces.push(t),
            Event::Done(f) => return (pieces, f),
            Event::Error(e) => panic!("the sequence failed: {e}"),
        }
    }
}

/// The text of letter, space and end tokens (the test vocabulary).
fn text(tokens: &[u32]) -> String {
    tokens
        .iter()
        .filter_map(|&t| match t {
            SPACE => Some(' '),
            t if (A..A + 26).contains(&t) => char::from_u32('a' as u32 + t - A),
            _ => None,
        })
        .collect()
}

fn prompt(letters: &str) -> Vec<u32> {
    std::iter::once(BOS)
        .chain(letters.chars().map(letter))
        .collect()
}

#[test]
fn sequences_share_steps_and_each_gets_what_it_gets_alone() {
    let (engine, calls, permits) = gated(3, 64);
    let (_scheduler, submitter) = spawn(engine, 8, 512);
    let jobs: Vec<(Vec<u32>, usize)> = ["a", "bc", "def", "ghij", "k"]
        .iter()
        .zip([5, 9, 6, 7, 8])
        .map(|(p, n)| (prompt(p), n))
        .collect();
    let first = submitter
        .submit(greedy(jobs[0].0.clone(), jobs[0].1))
        .unwrap();
    // The first step is under way (and waits): the rest arrive while it runs.
    let first_step = calls.recv().unwrap();
    let mut receivers = vec![first];
    for (p, n) in &jobs[1..] {
        receivers.push(submitter.submit(greedy(p.clone(), *n)).unwrap());
    }
    open(&permits);
    for ((p, n), events) in jobs.iter().zip(receivers) {
        let (pieces, finish) = collect(events);
        assert_eq!(pieces.concat(), text(&continuation(hash_rule, p, *n)));
        assert_eq!(
            finish,
            Finish {
                reason: FinishReason::Length,
                prompt_tokens: p.len(),
                completion_tokens: *n,
            }
        );
    }
    let steps: Vec<Vec<BatchRow>> = std::iter::once(first_step)
        .chain(calls.try_iter())
        .collect();
    let busiest = steps
        .iter()
        .map(|rows| rows.iter().map(|r| r.slot).collect::<HashSet<_>>().len())
        .max()
        .unwrap();
    assert_eq!(busiest, 3, "at most 3 slots, and all 3 busy at some step");
    // Alone, a job of n tokens takes n steps (one prefill, n - 1 decodes).
    let alone: usize = jobs.iter().map(|(_, n)| n).sum();
    assert!(steps.len() < alone, "{} steps, {alone} alone", steps.len());
    assert_eq!(submitter.metrics().requests(Outcome::Finished), 5);
}

#[test]
fn steps_of_greedy_sequences_only_take_their_tokens_from_the_engine() {
    let (mut engine, calls, permits) = gated(2, 64);
    let (greedy_log, greedy_calls) = channel();
    engine.greedy_log = Some(greedy_log);
    let (_scheduler, submitter) = spawn(engine, 4, 512);
    // A greedy sequence runs alone, then beside one that samples (temperature 0.8,
    // top-k 1: the rule's token too), then, once that one is done, beside a greedy one
    // with a repetition penalty, then alone again.
    let sampled = SamplerConfig {
        temperature: 0.8,
        top_k: 1,
        ..SamplerConfig::greedy()
    };
    let penalised = SamplerConfig {
        repeat_penalty: 1.5,
        ..SamplerConfig::greedy()
    };
    let with = |sampler, p: &str, n| GenerationRequest {
        sampler,
        ..greedy(prompt(p), n)
    };
    let mut jobs = vec![(
        prompt("a"),
        6,
        submitter.submit(greedy(prompt("a"), 6)).unwrap(),
    )];
    calls.recv().unwrap();
    jobs.push((
        prompt("b"),
        2,
        submitter.submit(with(sampled, "b", 2)).unwrap(),
    ));
    permits.send(()).unwrap();
    calls.recv().unwrap();
    permits.send(()).unwrap();
    // The step that ends the second sequence.
    calls.recv().unwrap();
    jobs.push((
        prompt("c"),
        1,
        submitter.submit(with(penalised, "c", 1)).unwrap(),
    ));
    open(&permits);
    for (p, n, events) in jobs {
        let (pieces, finish) = collect(events);
        assert_eq!(pieces.concat(), text(&continuation(hash_rule, &p, n)));
        assert_eq!(finish.completion_tokens, n);
    }
    let greedy_steps: Vec<bool> = greedy_calls.try_iter().collect();
    assert_eq!(greedy_steps, [true, false, false, false, true, true]);
}

#[test]
fn a_prompt_runs_in_chunks_of_ubatch_with_logits_only_at_its_end() {
    let (log, calls) = channel();
    let (_scheduler, submitter) = spawn(MockEngine::new(1, 64, log), 4, 4);
    let p = prompt("abcdefghi");
    let (pieces, _) = collect(submitter.submit(greedy(p.clone(), 2)).unwrap());
    assert_eq!(pieces.concat(), text(&continuation(hash_rule, &p, 2)));
    let shapes: Vec<Vec<bool>> = calls
        .try_iter()
        .map(|rows| rows.iter().map(|r| r.logits).collect())
        .collect();
    let f = false;
    assert_eq!(
        shapes,
        [vec![f; 4], vec![f; 4], vec![f, true], vec![true]],
        "10 prompt tokens in chunks of 4, 4, 2, then one decode step"
    );
}

#[test]
fn a_dropped_receiver_cancels_its_sequence_and_frees_the_slot() {
    let (engine, calls, permits) = gated(1, 256);
    let (_scheduler, submitter) = spawn(engine, 4, 512);
    let mut long = submitter.submit(greedy(prompt("ab"), 200)).unwrap();
    for _ in 0..3 {
        permits.send(()).unwrap();
    }
    // Three steps done and a fourth under way, waiting.
    for _ in 0..4 {
        calls.recv().unwrap();
    }
    assert!(matches!(long.blocking_recv(), Some(Event::Text(_))));
    drop(long);
    let p = prompt("xy");
    let short = submitter.submit(greedy(p.clone(), 3)).unwrap();
    open(&permits);
    let (pieces, finish) = collect(short);
    // The slot was emptied: the new sequence sees only its own tokens.
    assert_eq!(pieces.concat(), text(&continuation(hash_rule, &p, 3)));
    assert_eq!(finish.completion_tokens, 3);
    // The new sequence's 3 steps follow the one under way when the client left.
    assert_eq!(calls.try_iter().count(), 3);
    assert_eq!(submitter.metrics().requests(Outcome::Cancelled), 1);
    assert_eq!(submitter.metrics().requests(Outcome::Finished), 1);
}

/// The rule of the scripted tests: after a two-token prompt, SCRIPT in order.
fn scripted(history: &[u32]) -> u32 {
    const SCRIPT: [u32; 10] = [
        A,      // a
        A + 1,  // b
        A + 23, // x
        A + 24, // y
        A + 23, // x
        A + 24, // y
        A + 25, // z
        E_ACUTE_1,
        E_ACUTE_2,
        EOS,
    ];
    SCRIPT[(history.len() - 2) % SCRIPT.len()]
}

fn run_scripted(max_tokens: usize, stop: &[&str]) -> (Vec<String>, Finish) {
    let (log, _calls) = channel();
    let mut engine = MockEngine::new(1, 64, log);
    engine.rule = scripted;
    let (_scheduler, submitter) = spawn(engine, 4, 512);
    let request = GenerationRequest {
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..greedy(prompt("q"), max_tokens)
    };
    collect(submitter.submit(request).unwrap())
}

#[test]
fn a_stop_string_ends_generation_before_it() {
    let (pieces, finish) = run_scripted(20, &["xyz"]);
    assert_eq!(pieces.concat(), "abxy");
    assert_eq!(finish.reason, FinishReason::Stop);
    assert_eq!(finish.completion_tokens, 7, "a b x y x y z");
    // "xy" could start "xyz": it was held back until the second "x" showed it was not.
    assert!(pieces.iter().all(|p| p != "abx"), "{pieces:?}");
}

#[test]
fn text_held_for_a_stop_string_is_sent_when_max_tokens_ends_first() {
    let (pieces, finish) = run_scripted(4, &["xyz"]);
    assert_eq!(pieces.concat(), "abxy");
    assert_eq!(finish.reason, FinishReason::Length);
    assert_eq!(finish.completion_tokens, 4);
}

#[test]
fn end_of_generation_stops_and_counts_but_sends_no_text() {
    let (pieces, finish) = run_scripted(20, &[]);
    assert_eq!(pieces.concat(), "abxyxyzé");
    assert!(pieces.contains(&"é".to_string()), "{pieces:?}");
    assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
    assert_eq!(finish.reason, FinishReason::Stop);
    assert_eq!(finish.completion_tokens, 10);
}

#[test]
fn a_full_context_ends_with_length() {
    let (log, _calls) = channel();
    let (_scheduler, submitter) = spawn(MockEngine::new(1, 6, log), 4, 512);
    let (_, finish) = collect(submitter.submit(greedy(prompt("a"), 100)).unwrap());
    // Positions 0..6 hold the prompt and 4 generated tokens; a 5th is sampled from the
    // last position's logits, with no position left to run it.
    assert_eq!(finish.completion_tokens, 5);
    assert_eq!(finish.reason, FinishReason::Length);
}

#[test]
fn a_full_queue_refuses_requests() {
    let (engine, calls, permits) = gated(1, 64);
    let (_scheduler, submitter) = spawn(engine, 1, 512);
    let running = submitter.submit(greedy(prompt("a"), 2)).unwrap();
    calls.recv().unwrap();
    let waiting = submitter.submit(greedy(prompt("b"), 2)).unwrap();
    assert_eq!(submitter.metrics().queued.get(), 1);
    let refused = submitter.submit(greedy(prompt("c"), 2));
    assert!(
        matches!(refused, Err(SubmitError::QueueFull(1))),
        "{refused:?}"
    );
    open(&permits);
    assert_eq!(collect(running).1.completion_tokens, 2);
    assert_eq!(collect(waiting).1.completion_tokens, 2);
    assert_eq!(submitter.metrics().queued.get(), 0);
}

#[test]
fn requests_that_cannot_run_are_refused_before_queueing() {
    let (log, _calls) = channel();
    let (_scheduler, submitter) = spawn(MockEngine::new(1, 8, log), 4, 512);
    let cases = [
        greedy(Vec::new(), 4),
        greedy(prompt("abcdefg"), 4), // 8 tokens: no position left
        greedy(prompt("a"), 0),
        GenerationRequest {
            stop: vec![String::new()],
            ..greedy(prompt("a"), 4)
        },
        GenerationRequest {
            sampler: SamplerConfig {
                top_p: 0.0,
                ..SamplerConfig::default()
            },
            ..greedy(prompt("a"), 4)
        },
    ];
    for request in cases {
        let result = submitter.submit(request.clone());
        assert!(
            matches!(result, Err(SubmitError::Invalid(_))),
            "{request:?}: {result:?}"
        );
    }
    assert_eq!(submitter.metrics().queued.get(), 0);
}

#[test]
fn an_engine_error_fails_its_sequences_and_the_scheduler_goes_on() {
    let (engine, calls, permits) = gated(1, 64);
    let (scheduler, submitter) = spawn(engine, 4, 512);
    let mut events = submitter.submit(greedy(prompt("a"), 4)).unwrap();
    calls.recv().unwrap();
    drop(permits); // the mock's step fails
    match events.blocking_recv() {
        Some(Event::Error(msg)) => assert!(msg.contains("gate"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(submitter.metrics().requests(Outcome::Failed), 1);
    drop(submitter);
    scheduler.join();
}

#[test]
fn an_engine_returning_the_wrong_number_of_rows_fails_the_step() {
    let sampled = SamplerConfig {
        temperature: 0.8,
        ..SamplerConfig::greedy()
    };
    for (sampler, want) in [
        (
            SamplerConfig::greedy(),
            "returned 2 tokens for the step's 1 sequences",
        ),
        (
            sampled,
            &*format!("returned {} logits for the step", 2 * VOCAB),
        ),
    ] {
        let (log, _calls) = channel();
        let mut engine = MockEngine::new(1, 64, log);
        engine.extra_row = true;
        let (scheduler, submitter) = spawn(engine, 4, 512);
        let request = GenerationRequest {
            sampler,
            ..greedy(prompt("ab"), 4)
        };
        let mut events = submitter.submit(request).unwrap();
        match events.blocking_recv() {
            Some(Event::Error(msg)) => assert!(msg.contains(want), "{msg}"),
            other => panic!("expected an error, got {other:?}"),
        }
        assert_eq!(submitter.metrics().requests(Outcome::Failed), 1);
        drop(submitter);
        scheduler.join();
    }
}
