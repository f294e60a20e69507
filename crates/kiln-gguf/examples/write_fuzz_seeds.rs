//! Writes seed inputs for the `read_gguf` fuzz target into the directory given as
//! the first argument (see docs/fuzz.md): a file with every metadata type and
//! several tensor dtypes, one with a custom alignment, and one without tensors.

#[path = "../tests/common/mod.rs"]
mod common;

use kiln_core::DType;
use kiln_gguf::{keys, GgufWriter, Metadata, TensorDesc};
use std::path::PathBuf;

fn main() -> kiln_core::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    std::fs::create_dir_all(&dir).map_err(|e| kiln_core::Error::io(&dir, e))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| kiln_core::Error::io(path, e))
    };
    write("every_type.gguf", &common::sample_file())?;

    let mut aligned = Metadata::new();
    aligned.set(keys::ALIGNMENT, 64u32);
    aligned.set(keys::ARCHITECTURE, "llama");
    let descs = [
        TensorDesc::new("a.weight", DType::Q8_0, &[2, 32]),
        TensorDesc::new("b.bias", DType::F16, &[3]),
    ];
    let mut w = GgufWriter::new(Vec::new(), "seed", &aligned, &descs)?;
    w.write_tensor_data(&common::pattern_bytes(68, 1))?;
    w.write_tensor_data(&common::pattern_bytes(6, 2))?;
    write("aligned_64.gguf", &w.finish()?)?;

    write(
        "metadata_only.gguf",
        &GgufWriter::new(Vec::new(), "seed", &common::every_type_metadata(), &[])?.finish()?,
    )?;
    Ok(())
}
