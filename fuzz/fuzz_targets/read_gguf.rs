//! Fuzzes the GGUF reader: any input must parse or fail with an error, never panic;
//! a parsed file's tensors must be in bounds, and rewriting it must be stable.

#![no_main]

#[path = "../../crates/kiln-gguf/tests/common/mod.rs"]
mod common;

use kiln_gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_bytes(data, "fuzz") else {
        return;
    };
    for t in g.tensors() {
        assert_eq!(t.data.len(), t.info.n_bytes());
        // Block formats the quant module does not support yet return an error.
        if let Ok(values) = t.to_f32() {
            assert_eq!(values.len(), t.info.n_elements());
        }
    }
    for (key, _) in g.metadata().iter() {
        // Typed getters either convert or report the mismatch.
        let _ = g.metadata().get_u32(key);
        let _ = g.metadata().get_str(key);
    }
    let once = common::rewrite(&g);
    let again = Gguf::from_bytes(&once[..], "rewritten").expect("a rewritten file parses");
    assert_eq!(common::rewrite(&again), once, "rewriting is not stable");
});
