//! Finding the model a command runs: a GGUF file, or a Hugging Face checkpoint
//! directory converted once into kiln's cache, by default the project's own small
//! model.

use kiln_core::{Error, Result};
use kiln_gguf::{convert, Gguf, GgufFile};
use std::path::{Path, PathBuf};

/// Where the project's own small model lives in a checkout of kiln.
pub const DEFAULT_MODEL: &str = "models/shakespeare-tiny";

/// The project's own small model: [`DEFAULT_MODEL`] under the current directory
/// or one of its parents (the README runs kiln from the checkout's root), else
/// under one of the executable's parent directories (`target/release/kiln` sits
/// two levels below the checkout's root). A candidate is a directory holding a
/// `config.json`. Errors with a hint to pass `-m` when there is none.
pub fn default_model_dir() -> Result<PathBuf> {
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf)),
    ];
    find_default_model(starts.iter().flatten()).ok_or_else(|| {
        Error::invalid(
            "model",
            format!(
                "no model given, and the default one ({DEFAULT_MODEL} of a kiln checkout) is \
                 neither under the current directory or its parents nor next to the kiln \
                 executable; pass -m MODEL (a GGUF file or a Hugging Face checkpoint directory)"
            ),
        )
    })
}

/// The first `ANCESTOR/models/shakespeare-tiny` with a `config.json`, over the
/// ancestors of each of `starts` in turn (each start itself first).
fn find_default_model<'a>(starts: impl IntoIterator<Item = &'a PathBuf>) -> Option<PathBuf> {
    starts
        .into_iter()
        .flat_map(|start| start.ancestors())
        .map(|dir| dir.join(DEFAULT_MODEL))
        .find(|candidate| candidate.join("config.json").is_file())
}

/// Opens `path` (default: [`default_model_dir`]): a GGUF file as it is; a directory
/// as a Hugging Face checkpoint, converted in its own precision into the `models`
/// directory of kiln's cache (`$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
/// `~/.cache/kiln`) the first time and reused after that.
pub fn open(path: Option<&Path>) -> Result<GgufFile> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => default_model_dir()?,
    };
    if !path.exists() {
        return Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    if !path.is_dir() {
        return Gguf::open(&path);
    }
    let cache = kiln_core::cache::cache_root_from_env().ok_or_else(|| {
        Error::invalid(
            "model",
            format!(
                "{} is a checkpoint to convert, and there is no cache directory to convert it \
                 into: set KILN_CACHE_DIR (or XDG_CACHE_HOME or HOME), or convert it with \
                 `kiln convert` and pass the GGUF file with -m",
                path.display()
            ),
        )
    })?;
    let (file, _) = convert::open_converted(&path, &cache.join("models"))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_model_is_found_from_a_checkout_and_its_target_dir() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let found = find_default_model([&root]).expect("the checkout's model");
        assert!(found.ends_with(DEFAULT_MODEL), "{}", found.display());
        let exe_dir = root.join("target/release");
        assert!(find_default_model([&exe_dir]).is_some());
        let nowhere = PathBuf::from("/");
        assert_eq!(find_default_model([&nowhere]), None);
    }
}
