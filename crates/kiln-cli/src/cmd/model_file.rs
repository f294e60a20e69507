//! Finding the model a command runs: a GGUF file, or a Hugging Face checkpoint
//! directory converted on the fly, by default the project's own small model.

use kiln_core::{Error, Result};
use kiln_gguf::convert::HfCheckpoint;
use kiln_gguf::{Gguf, GgufFile};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The project's own small model, in the repository this binary was built from.
pub fn default_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shakespeare-tiny")
}

/// An opened GGUF model, and the private temporary directory it was converted into
/// (removed on drop), if any.
pub struct ModelFile {
    // Declared first, so the map is dropped before its file is removed.
    pub gguf: GgufFile,
    _temp: Option<TempDir>,
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
            _temp: None,
        });
    }
    let checkpoint = HfCheckpoint::open(&path)?;
    // A directory of its own (mode 0700, random name): nothing another user put in
    // the shared temporary directory is written through or replaced.
    let temp = tempfile::Builder::new()
        .prefix("kiln-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let out = temp.path().join(format!("{}.gguf", dir_name(&path)));
    Ok(ModelFile {
        gguf: convert(&checkpoint, &out)?,
        _temp: Some(temp),
    })
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
