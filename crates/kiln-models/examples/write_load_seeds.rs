//! Writes seed inputs for the `load_model` fuzz target into the directory given as
//! the first argument (see docs/fuzz.md): a tiny llama (with rope frequency factors
//! and its own output matrix), qwen2 (biases, tied embeddings, two layers) and qwen3
//! (q/k norms), all F32, and the llama with Q8_0 weight matrices.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{gguf_bytes, load_untrusted, Tiny};
use kiln_core::DType;
use std::path::PathBuf;

fn main() -> kiln_core::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    std::fs::create_dir_all(&dir).map_err(|e| kiln_core::Error::io(&dir, e))?;
    let write = |name: &str, bytes: &[u8]| {
        // A seed that does not load would teach the fuzzer nothing about loading.
        load_untrusted(bytes)?;
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| kiln_core::Error::io(path, e))
    };
    for tiny in [Tiny::LLAMA, Tiny::QWEN2, Tiny::QWEN3] {
        write(&format!("tiny_{}.gguf", tiny.arch), &tiny.bytes())?;
    }
    let wide = Tiny {
        d: 32,
        ff: 32,
        ..Tiny::LLAMA
    };
    let q8_0 = gguf_bytes(&wide.metadata(), &wide.tensors(), |name| {
        let matrix =
            name.ends_with(".weight") && !name.contains("norm") && name != "rope_freqs.weight";
        if matrix {
            DType::Q8_0
        } else {
            DType::F32
        }
    });
    write("tiny_llama_q8_0.gguf", &q8_0)?;
    Ok(())
}
