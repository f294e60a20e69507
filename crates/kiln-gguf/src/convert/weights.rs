//! The safetensors files of a checkpoint, single (`model.safetensors`) or sharded
//! (`model.safetensors.index.json` naming `model-0000N-of-0000M.safetensors`),
//! memory-mapped.

use super::json::{self, Object};
use crate::output::InputFile;
use kiln_core::{DType, Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The file of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of the checkpoint: where its bytes are and what they hold.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    /// Index into [`Weights`]' files.
    file: usize,
    /// Byte range within that file.
    range: Range<usize>,
    /// The safetensors element type.
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

impl SourceTensor {
    /// The kiln dtype of the elements, for the float types a checkpoint's weights
    /// come in; an error names the tensor otherwise.
    pub fn kiln_dtype(&self, name: &str) -> Result<DType> {
        match self.dtype {
            Dtype::F32 => Ok(DType::F32),
            Dtype::F16 => Ok(DType::F16),
            Dtype::BF16 => Ok(DType::BF16),
            other => Err(Error::Unsupported(format!(
                "tensor {name:?} holds {other:?}; kiln convert reads F32, F16 and BF16 weights"
            ))),
        }
    }
}

struct WeightFile {
    path: PathBuf,
    /// The mapped file, identified (an output must never be written over it).
    input: InputFile,
    map: Mmap,
}

/// The memory-mapped safetensors files of a checkpoint and an index of their
/// tensors by name.
pub struct Weights {
    files: Vec<WeightFile>,
    tensors: HashMap<String, SourceTensor>,
}

impl Weights {
    /// Opens `dir`'s safetensors files: those `model.safetensors.index.json` names,
    /// else `model.safetensors`. Every tensor the index lists must be in the shard it
    /// names, and no name may appear in two files.
    ///
    /// The files must not change while the value lives (they are memory-mapped).
    pub fn open(dir: &Path) -> Result<Weights> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let shards = if index_path.is_file() {
            Some(read_index(&index_path)?)
        } else if single_path.is_file() {
            None
        } else {
            return Err(Error::invalid(
                "convert",
                format!(
                    "{} has neither {SINGLE_FILE} nor {INDEX_FILE}: kiln convert reads \
                     safetensors checkpoints (not pytorch_model.bin)",
                    dir.display()
                ),
            ));
        };
        let file_names: Vec<&str> = match &shards {
            Some(map) => {
                let mut names: Vec<&str> = map.values().map(String::as_str).collect();
                names.sort_unstable();
                names.dedup();
                names
            }
            None => vec![SINGLE_FILE],
        };
        let mut weights = Weights {
            files: Vec::with_capacity(file_names.len()),
            tensors: HashMap::new(),
        };
        for name in file_names {
            weights.add_file(&dir.join(name))?;
        }
        if let Some(map) = shards {
            weights.check_index(&map, &index_path)?;
        }
        Ok(weights)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let input = InputFile::of(path, &file)?;
        // SAFETY: the map is read-only, and open()'s contract forbids changing the
        // file while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
        let data_start = 8 + header_len;
        let file_index = self.files.len();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let tensor = SourceTensor {
                file: file_index,
                range: data_start + start..data_start + end,
                dtype: info.dtype,
                shape: info.shape.clone(),
            };
            if let Some(earlier) = self.tensors.insert(name.clone(), tensor) {
                return Err(Error::format(
                    path.display().to_string(),
                    format!(
                        "tensor {name:?} is also in {}",
                        self.files[earlier.file].path.display()
                    ),
                ));
            }
        }
        self.files.push(WeightFile {
            path: path.to_owned(),
            input,
            map,
        });
        Ok(())
    }

    /// Checks that every tensor of the index's weight map is in the shard it names.
    fn check_index(&self, map: &BTreeMap<String, String>, index_path: &Path) -> Result<()> {
        for (name, shard) in map {
            let found = self
                .tensors
                .get(name)
                .map(|t| self.files[t.file].path.file_name());
            if found != Some(Some(std::ffi::OsStr::new(shard))) {
                return Err(Error::format(
                    index_path.display().to_string(),
                    format!("tensor {name:?} is listed in shard {shard:?} but is not in it"),
                ));
            }
        }
        Ok(())
    }

    /// The safetensors files, identified.
    pub fn input_files(&self) -> Vec<InputFile> {
        self.files.iter().map(|f| f.input.clone()).collect()
    }

    /// The tensor called `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.get(name)
    }

    /// Every tensor name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The bytes of `tensor`.
    pub fn bytes(&self, tensor: &SourceTensor) -> &[u8] {
        // read_metadata checked every range against the file's length.
        &self.files[tensor.file].map[tensor.range.clone()]
    }
}

/// The weight map of an index file: tensor name to shard file name. Shard names must
/// be plain file names (no directories).
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let source = path.display().to_string();
    let root = json::read_object(path)?;
    let index = Object::new(&root, &source);
    let weight_map = index
        .opt_object("weight_map")?
        .ok_or_else(|| index.error("weight_map", "key is missing"))?;
    let mut map = BTreeMap::new();
    for (tensor, shard) in weight_map {
        let shard = shard
            .as_str()
            .filter(|s| is_plain_file_name(s))
            .ok_or_else(|| {
                index.error(
                    "weight_map",
                    format!(
                        "tensor {tensor:?} maps to {}, not a file name",
                        json::describe(shard)
                    ),
                )
            })?;
        map.insert(tensor.clone(), shard.to_owned());
    }
    Ok(map)
}

fn is_plain_file_name(name: &str) -> bool {
    let path = Path::new(name);
    path.file_name().is_some_and(|f| f == name)
}
