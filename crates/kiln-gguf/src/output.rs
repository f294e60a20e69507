//! Writing a command's output file without harming anything else: every kiln
//! command that writes a file (convert, quantize, synth, inspect --out) goes
//! through [`OutputFile`].
//!
//! - The output is resolved (a symbolic link is followed to the file it names, the
//!   directory is made canonical) and refused when it is one of the command's
//!   [`InputFile`]s, compared by device and inode as well as by canonical path, so
//!   that a hard link or a symbolic link to an input is caught. Inputs are
//!   memory-mapped: writing over one would corrupt what is being read.
//! - An existing path is replaced only when it is a regular, writable file;
//!   directories, FIFOs, devices, sockets and dangling links are refused and left as
//!   they are. The output path itself is never opened.
//! - The data goes to a temporary file in the output's directory, which
//!   [`OutputFile::persist`] renames over the output once it is complete. An output
//!   dropped without being persisted (an error, a panic) removes its temporary file
//!   and touches nothing else, so a failed command leaves a pre-existing output as it
//!   was.

use kiln_core::{Error, Result};
use std::fs::{File, Metadata};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// A file a command reads, identified so that an output naming the same file
/// through another path (a hard link, a symbolic link, `..`) is recognised.
#[derive(Clone, Debug)]
pub struct InputFile {
    /// The path as the command was given it, for messages.
    path: PathBuf,
    /// The path with every symbolic link resolved.
    canonical: Option<PathBuf>,
    /// Device and inode.
    id: Option<FileId>,
}

/// A file's device and inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

#[cfg(unix)]
fn file_id(metadata: &Metadata) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    Some(FileId {
        dev: metadata.dev(),
        ino: metadata.ino(),
    })
}

#[cfg(not(unix))]
fn file_id(_: &Metadata) -> Option<FileId> {
    None
}

impl InputFile {
    /// The file at `path` (symbolic links followed).
    pub fn at(path: impl AsRef<Path>) -> Result<InputFile> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(InputFile::new(path, &metadata))
    }

    /// The open file `file`, opened from `path`: identified by the file itself, so
    /// that it is the file being read even if `path` has since changed.
    pub fn of(path: impl AsRef<Path>, file: &File) -> Result<InputFile> {
        let path = path.as_ref();
        let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
        Ok(InputFile::new(path, &metadata))
    }

    fn new(path: &Path, metadata: &Metadata) -> InputFile {
        InputFile {
            path: path.to_owned(),
            canonical: path.canonicalize().ok(),
            id: file_id(metadata),
        }
    }

    /// The path the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where an output path leads.
struct Resolved {
    /// The path the finished file is renamed to: the output, or the file a symbolic
    /// link names, in a canonical directory.
    dest: PathBuf,
    /// What is there now, if anything.
    existing: Option<Metadata>,
    /// Whether the output path is a symbolic link.
    via_symlink: bool,
}

/// An output file being written: a temporary file beside the destination. Write
/// through [`OutputFile::file`], then [`OutputFile::persist`]; dropped unpersisted,
/// the temporary file is removed and nothing else is touched.
#[derive(Debug)]
pub struct OutputFile {
    op: String,
    path: PathBuf,
    dest: PathBuf,
    inputs: Vec<InputFile>,
    temp: NamedTempFile,
}

impl OutputFile {
    /// Checks the output `path` of command `op` (named in errors, e.g. `kiln
    /// quantize`) against the command's `inputs` and creates the temporary file it is
    /// written to.
    ///
    /// Fails, naming the path, if it is one of `inputs` (by device and inode or by
    /// canonical path), exists and is not a regular file, is read-only, names no file
    /// (`dir/..`), or if its directory does not exist or the temporary file cannot be
    /// created there.
    pub fn create(op: &str, path: impl AsRef<Path>, inputs: &[InputFile]) -> Result<OutputFile> {
        let path = path.as_ref();
        let resolved = check(op, path, inputs)?;
        let dir = resolved.dest.parent().unwrap_or(Path::new("."));
        let name = resolved
            .dest
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".kiln-tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The mode File::create gives a new file (the umask applies).
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let temp = builder.tempfile_in(dir).map_err(|e| {
            Error::io(
                dir,
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{op}: cannot create a temporary file beside the output {}: {e}",
                        path.display()
                    ),
                ),
            )
        })?;
        if let Some(existing) = &resolved.existing {
            // A replaced file keeps its permissions.
            temp.as_file()
                .set_permissions(existing.permissions())
                .map_err(|e| Error::io(temp.path(), e))?;
        }
        Ok(OutputFile {
            op: op.to_owned(),
            path: path.to_owned(),
            dest: resolved.dest,
            inputs: inputs.to_vec(),
            temp,
        })
    }

    /// The output path as the command was given it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file to write the output's contents to.
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// Flushes the temporary file to disk and renames it over the output, after
    /// checking the output again (it may have changed while the file was written);
    /// returns the file's size. On failure the temporary file is removed.
    pub fn persist(self) -> Result<u64> {
        let file = self.temp.as_file();
        file.sync_all()
            .map_err(|e| Error::io(self.temp.path(), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(self.temp.path(), e))?
            .len();
        let resolved = check(&self.op, &self.path, &self.inputs)?;
        if resolved.dest != self.dest {
            return Err(Error::invalid(
                &self.op,
                format!(
                    "the output {} changed while it was written (it now leads to {}); \
                     nothing was written",
                    self.path.display(),
                    resolved.dest.display()
                ),
            ));
        }
        self.temp
            .persist(&self.dest)
            .map_err(|e| Error::io(&self.dest, e.error))?;
        if let Some(dir) = self.dest.parent() {
            // Best effort: makes the rename durable where directories can be synced.
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(len)
    }
}

/// Resolves `path` and refuses it if it may not be written as `op`'s output.
fn check(op: &str, path: &Path, inputs: &[InputFile]) -> Result<Resolved> {
    let refuse = |msg: String| Error::invalid(op, msg);
    let shown = path.display();
    let Some(name) = path.file_name() else {
        return Err(refuse(format!(
            "the output {shown} does not name a file; choose an output file path"
        )));
    };
    let resolved = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Resolved {
            dest: canonical_dir(op, path)?.join(name),
            existing: None,
            via_symlink: false,
        },
        Err(e) => return Err(Error::io(path, e)),
        Ok(link) if link.file_type().is_symlink() => match std::fs::metadata(path) {
            Ok(target) => Resolved {
                dest: path.canonicalize().map_err(|e| Error::io(path, e))?,
                existing: Some(target),
                via_symlink: true,
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(refuse(format!(
                    "the output {shown} is a symbolic link to a path that does not exist; \
                     kiln does not create files through dangling links; remove the link \
                     or choose another output path"
                )))
            }
            Err(e) => return Err(Error::io(path, e)),
        },
        Ok(metadata) => Resolved {
            dest: canonical_dir(op, path)?.join(name),
            existing: Some(metadata),
            via_symlink: false,
        },
    };
    for input in inputs {
        let same_id = match (&resolved.existing, input.id) {
            (Some(m), Some(id)) => file_id(m) == Some(id),
            _ => false,
        };
        let same_path = input.canonical.as_deref() == Some(resolved.dest.as_path());
        if same_id || same_path {
            let how = if resolved.via_symlink {
                " (through a symbolic link)"
            } else if !same_path {
                " (a hard link)"
            } else {
                ""
            };
            return Err(refuse(format!(
                "the output {shown} is the input file {}{how}; choose another output path",
                input.path.display()
            )));
        }
    }
    if let Some(m) = &resolved.existing {
        if !m.is_file() {
            return Err(refuse(format!(
                "the output {shown} is {}, not a regular file; kiln writes new files or \
                 replaces regular ones; choose another output path",
                describe(m)
            )));
        }
        if m.permissions().readonly() {
            return Err(refuse(format!(
                "the output {shown} is a read-only file; kiln does not replace it; make \
                 it writable or choose another output path"
            )));
        }
    }
    Ok(resolved)
}

/// The canonical form of `path`'s directory (the current one for a bare name).
fn canonical_dir(op: &str, path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    dir.canonicalize().map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Error::invalid(
                op,
                format!(
                    "the directory of the output {} does not exist; create it or choose \
                     another output path",
                    path.display()
                ),
            )
        } else {
            Error::io(dir, e)
        }
    })
}

/// "a directory", "a FIFO", ... for a path that is not a regular file.
fn describe(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn refused(result: Result<OutputFile>) -> String {
        match result {
            Ok(out) => panic!("{} was accepted", out.path().display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_new_file_appears_only_when_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        let mut out = OutputFile::create("test", &dest, &[]).unwrap();
        out.file().write_all(b"hello").unwrap();
        assert!(!dest.exists(), "nothing at the output before persist");
        assert_eq!(names(dir.path()).len(), 1, "one temporary file");
        assert_eq!(out.persist().unwrap(), 5);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert_eq!(names(dir.path()), ["out.gguf"]);
    }

    #[test]
    fn dropping_an_unpersisted_output_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        write(&dest, b"old contents");
        let mut out = OutputFile::create("test", &dest, &[]).unwrap();
        out.file().write_all(b"half a new file").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old contents");
        assert_eq!(names(dir.path()), ["out.gguf"]);
    }

    #[test]
    fn a_regular_file_is_replaced_and_keeps_its_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        write(&dest, b"old");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        let mut out = OutputFile::create("test", &dest, &[]).unwrap();
        out.file().write_all(b"new").unwrap();
        out.persist().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o640);
        }
    }

    #[test]
    fn an_input_is_refused_by_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.gguf");
        write(&input, b"input");
        let inputs = [InputFile::at(&input).unwrap()];

        let err = refused(OutputFile::create("kiln test", &input, &inputs));
        assert!(
            err.contains("is the input file") && err.contains("in.gguf"),
            "{err}"
        );

        let dotted = dir.path().join(".").join("in.gguf");
        let err = refused(OutputFile::create("kiln test", &dotted, &inputs));
        assert!(err.contains("is the input file"), "{err}");

        let hard = dir.path().join("hard.gguf");
        std::fs::hard_link(&input, &hard).unwrap();
        let err = refused(OutputFile::create("kiln test", &hard, &inputs));
        assert!(
            err.contains("(a hard link)") && err.contains("hard.gguf"),
            "{err}"
        );

        #[cfg(unix)]
        {
            let soft = dir.path().join("soft.gguf");
            std::os::unix::fs::symlink(&input, &soft).unwrap();
            let err = refused(OutputFile::create("kiln test", &soft, &inputs));
            assert!(err.contains("(through a symbolic link)"), "{err}");
        }
        assert_eq!(std::fs::read(&input).unwrap(), b"input");
    }

    #[test]
    fn a_symbolic_link_to_another_file_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.gguf");
        write(&target, b"old");
        #[cfg(unix)]
        {
            let link = dir.path().join("link.gguf");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let mut out = OutputFile::create("test", &link, &[]).unwrap();
            out.file().write_all(b"new").unwrap();
            out.persist().unwrap();
            assert!(std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
            assert_eq!(std::fs::read(&target).unwrap(), b"new");
        }
    }

    #[test]
    fn paths_that_are_not_regular_files_are_refused_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let err = refused(OutputFile::create("kiln test", &sub, &[]));
        assert!(err.contains("is a directory, not a regular file"), "{err}");
        assert!(sub.is_dir());

        let err = refused(OutputFile::create("kiln test", sub.join(".."), &[]));
        assert!(err.contains("does not name a file"), "{err}");

        let missing = dir.path().join("no-dir").join("out.gguf");
        let err = refused(OutputFile::create("kiln test", &missing, &[]));
        assert!(err.contains("directory of the output"), "{err}");

        let read_only = dir.path().join("read-only.gguf");
        write(&read_only, b"keep");
        let mut perms = std::fs::metadata(&read_only).unwrap().permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&read_only, perms).unwrap();
        let err = refused(OutputFile::create("kiln test", &read_only, &[]));
        assert!(err.contains("read-only"), "{err}");

        #[cfg(unix)]
        {
            let dangling = dir.path().join("dangling.gguf");
            std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
            let err = refused(OutputFile::create("kiln test", &dangling, &[]));
            assert!(err.contains("does not exist"), "{err}");

            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                let err = refused(OutputFile::create("kiln test", &fifo, &[]));
                assert!(err.contains("is a FIFO"), "{err}");
                use std::os::unix::fs::FileTypeExt;
                let t = std::fs::symlink_metadata(&fifo).unwrap().file_type();
                assert!(t.is_fifo());
            }
        }
        let mut left = names(dir.path());
        left.retain(|n| n.ends_with(".kiln-tmp"));
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn persist_rechecks_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        let out = OutputFile::create("kiln test", &dest, &[]).unwrap();
        // A directory appears at the output while the file is written.
        std::fs::create_dir(&dest).unwrap();
        let err = out.persist().unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        assert_eq!(names(dir.path()), ["out.gguf"]);
        assert!(dest.is_dir());
    }
}
