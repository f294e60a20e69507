//! Checkpoints converted once, into a cache directory, and reused: the file is
//! named by a hash of the checkpoint's files, written under a name of its own and
//! renamed into place, so that concurrent runs never see a partial file and a run
//! that dies mid-way leaves a temporary file that later runs remove.

use super::HfCheckpoint;
use crate::{Gguf, GgufFile, WRITE_VERSION};
use kiln_core::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bump when the converter's output for a given checkpoint changes, so that files
/// an older kiln converted are not reused.
const CONVERTED_SCHEMA: u32 = 1;

/// Marks the temporary files of conversions under way: `NAME.tmp-PID-NANOS` (and
/// that with `.partial`, as [`HfCheckpoint::write_gguf`] writes it first).
const TEMP_MARK: &str = ".tmp-";

/// A temporary file older than this is stale even if a process of its id runs.
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The GGUF file of the checkpoint in `dir`, converted in its own precision
/// ([`HfCheckpoint::default_dtype`]) into `cache_dir` (created if needed) the first
/// time, and reused from there while the checkpoint's files stay the same.
///
/// A cached file that does not parse is removed and converted again. Temporary
/// files that conversions which died left in `cache_dir` are removed first.
/// Returns the file, opened, and its path.
pub fn open_converted(dir: &Path, cache_dir: &Path) -> Result<(GgufFile, PathBuf)> {
    let path = cache_dir.join(cached_name(dir)?);
    if path.is_file() {
        match Gguf::open(&path) {
            Ok(file) => return Ok((file, path)),
            // Another run may be replacing it: removing a good file costs a
            // conversion, never a wrong model.
            Err(_) => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    remove_stale_temps(cache_dir);
    let checkpoint = HfCheckpoint::open(dir)?;
    let temp = temp_path(&path);
    let result = checkpoint
        .write_gguf(&temp, checkpoint.default_dtype(), &mut |_, _| {})
        .and_then(|_| fs::rename(&temp, &path).map_err(|e| Error::io(&path, e)));
    if result.is_err() {
        // Best effort: the conversion's error matters more than a failed cleanup.
        let _ = fs::remove_file(&temp);
    }
    result?;
    Ok((Gguf::open(&path)?, path))
}

/// The cache file name of the checkpoint in `dir`: the directory's name (for
/// people listing the cache) and 32 hex digits of [`checkpoint_hash`].
pub fn cached_name(dir: &Path) -> Result<String> {
    let label: String = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    let label = if label.is_empty() { "model" } else { &label };
    Ok(format!("{label}-{}.gguf", &checkpoint_hash(dir)?[..32]))
}

/// SHA-256 (hex) over the conversion's schema and GGUF version and every regular
/// file directly in `dir` (names not starting with '.'), in name order: each
/// name, length and content.
pub fn checkpoint_hash(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Followed links count: a Hugging Face cache snapshot links to its blobs.
        if !name.starts_with('.') && entry.path().is_file() {
            files.push((name, entry.path()));
        }
    }
    files.sort();
    let mut h = Sha256::new();
    h.update(CONVERTED_SCHEMA.to_le_bytes());
    h.update(WRITE_VERSION.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for (name, path) in files {
        let mut file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A name next to `path` that no other conversion uses: this process's id and the
/// time.
fn temp_path(path: &Path) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!("{TEMP_MARK}{}-{nanos}", std::process::id()));
    path.with_file_name(name)
}

/// Removes the temporary files in `dir` whose process no longer runs (where
/// `/proc` tells) or that are older than [`STALE_AFTER`]. Best effort: a file that
/// cannot be removed stays.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_pid(&name) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old || !process_runs(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The process id in a temporary file's name, if it is one.
fn temp_pid(name: &str) -> Option<u32> {
    let (_, rest) = name.rsplit_once(TEMP_MARK)?;
    rest.split('-').next()?.parse().ok()
}

/// Whether process `pid` runs: `/proc/PID` exists where there is a `/proc`, else
/// assumed (the file then goes once it is old).
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_carry_the_process_id() {
        let temp = temp_path(Path::new("/c/models/m-0123.gguf"));
        let name = temp.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("m-0123.gguf.tmp-"), "{name}");
        assert_eq!(temp_pid(name), Some(std::process::id()));
        assert_eq!(
            temp_pid(&format!("{name}.partial")),
            Some(std::process::id())
        );
        assert_eq!(temp_pid("m-0123.gguf"), None);
        assert!(process_runs(std::process::id()));
    }
}
