//! Finding the model a command runs: a GGUF file, or a Hugging Face checkpoint
//! directory converted on the fly, by default the project's own small model.

use kiln_core::{Error, Result};
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use std::path::{Path, PathBuf};

/// The project's own small model, in the repository this binary was built from.
pub fn default_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

/// An opened GGUF model, and the temporary file it was converted into (removed on
/// drop), if any.
pub struct ModelFile {
    pub gguf: GgufFile,
    temp: Option<PathBuf>,
}

impl Drop for ModelFile {
    fn drop(&mut self) {
        if let Some(path) = &self.temp {
            // Best effort: a leftover file in the temp dir is harmless.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens `path` (default: [`default_model_dir`]): a GGUF file as it is; a directory
/// as a Hugging Face checkpoint, converted to a temporary GGUF in its own precision.
pub fn open(path: Option<&Path>) -> Result<ModelFile> {
    let path = path.map_or_else(default_model_dir, Path::to_path_buf);
    if !path.exists() {
        return Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    if !path.is_dir() {
        return Ok(ModelFile {
            gguf: Gguf::open(&path)?,
            temp: None,
        });
    }
    let checkpoint = HfCheckpoint::open(&path)?;
    let temp = std::env::temp_dir().join(format!(
        "kiln-{}-{}.gguf",
        std::process::id(),
        dir_name(&path)
    ));
    let model = ModelFile {
        gguf: convert(&checkpoint, &temp)?,
        temp: Some(temp),
    };
    Ok(model)
}

fn convert(checkpoint: &HfCheckpoint, out: &Path) -> Result<GgufFile> {
    checkpoint.write_gguf(out, checkpoint.default_dtype(), &mut |_, _| {})?;
    Gguf::open(out)
}

fn dir_name(path: &Path) -> String {
    path.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_string())
}
