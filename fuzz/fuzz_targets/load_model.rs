//! Fuzzes model loading: GGUF -> configuration -> forward graphs -> tokenizer ->
//! model on the CPU -> a prefill and a decode step. Any input must load or fail
//! with an error, never panic (see `load_untrusted`, which the malformed-model
//! tests of kiln-models run on their corpus).

#![no_main]

#[path = "../../crates/kiln-models/tests/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = common::load_untrusted(data);
});
