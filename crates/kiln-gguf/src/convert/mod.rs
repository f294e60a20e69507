//! Conversion of Hugging Face checkpoints of the llama, qwen2 and qwen3 families to
//! GGUF, with the metadata, tensor names and tokenizer section that llama.cpp's
//! `convert_hf_to_gguf.py` writes, so other GGUF engines run the result too.
//!
//! A checkpoint directory holds `config.json`, `model.safetensors` (or
//! `model.safetensors.index.json` and its shards) in f32, f16 or bf16, and a
//! byte-level BPE `tokenizer.json` (with `tokenizer_config.json` where present).
//!
//! - Tensors are renamed as llama.cpp names them (`model.layers.0.self_attn.q_proj.weight`
//!   becomes `blk.0.attn_q.weight`), checked against the shapes
//!   config.json implies, and written in the requested type: 1-D tensors, norms and
//!   biases stay f32; block types whose block does not divide a row fall back as
//!   llama-quantize does ([`output_dtype`]).
//! - The `llama` architecture's q and k projections are permuted from Hugging
//!   Face's rotate-half RoPE layout to GGML's interleaved layout, exactly as
//!   llama.cpp's `LlamaModel.permute` does ([`permute_rope_rows`]); qwen2 and qwen3
//!   use NeoX RoPE in GGML and are copied unpermuted.
//! - Llama 3.1's rope scaling becomes a `rope_freqs.weight` tensor as llama.cpp
//!   computes it; linear and YaRN scaling become `{arch}.rope.scaling.*` keys.
//! - The tokenizer becomes `tokenizer.ggml.*` keys with model `gpt2`
//!   ([`Vocab`]): tokens, token types, merges, special token ids, add-BOS/EOS flags
//!   and the chat template.
//!
//! [`open_converted`] converts a checkpoint once into a cache directory, under a
//! name given by a hash of its files, and reuses the file after that.
//!
//! Values go through [`kiln_core::quant`]: the source is read as f32 and stored in
//! the output type, so f16 to f16 is exact.

mod cache;
mod config;
mod json;
mod tensors;
mod vocab;
mod weights;

pub use cache::{cached_name, checkpoint_hash, open_converted};
pub use config::{Family, HfConfig, RopeScaling};
pub(crate) use tensors::model_tensors;
pub use tensors::{output_dtype, permute_rope_rows};
pub use vocab::Vocab;

use crate::{keys, llama_file_type, GgufWriter, Metadata, TensorDesc};
use kiln_core::{quant, DType, Error, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use tensors::{PlannedTensor, Source};
use weights::Weights;

/// Source elements converted per batch: bounds the memory one tensor's conversion
/// takes, however large the tensor.
const BATCH_ELEMENTS: usize = 1 << 22;

/// Elements per parallel task when the output type has no blocks.
const TASK_ELEMENTS: usize = 1 << 16;

/// A Hugging Face checkpoint opened for conversion: config, tokenizer and weights
/// read and checked, the output tensors planned.
pub struct HfCheckpoint {
    name: String,
    config: HfConfig,
    vocab: Vocab,
    weights: Weights,
    tensors: Vec<PlannedTensor>,
}

/// What [`HfCheckpoint::write_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    /// Each tensor's GGUF name and stored type, in file order.
    pub tensors: Vec<(String, DType)>,
    /// The size of the written file.
    pub file_bytes: u64,
}

impl HfCheckpoint {
    /// Opens the checkpoint in `dir`: parses config.json and the tokenizer files,
    /// maps the safetensors files and checks every tensor against config.json.
    ///
    /// Errors name the missing file, the unsupported architecture or tokenizer, or
    /// the tensor and its shapes. The files must not change while the value lives.
    pub fn open(dir: impl AsRef<Path>) -> Result<HfCheckpoint> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::invalid(
                "convert",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(
                "convert",
                format!(
                    "{} is missing: a Hugging Face checkpoint directory has config.json, \
                     model.safetensors (or an index and shards) and tokenizer.json",
                    config_path.display()
                ),
            ));
        }
        let raw_config = json::read_object(&config_path)?;
        let config = HfConfig::parse(&raw_config, &config_path.display().to_string())?;
        let weights = Weights::open(dir)?;
        let tensors = tensors::plan(&config, &weights)?;
        let vocab = Vocab::load(dir, &raw_config, config.vocab_size)?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        Ok(HfCheckpoint {
            name,
            config,
            vocab,
            weights,
            tensors,
        })
    }

    /// The checkpoint's hyperparameters.
    pub fn config(&self) -> &HfConfig {
        &self.config
    }

    /// The tokenizer metadata.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The type llama.cpp's converter picks when none is asked for: bf16 when the
    /// checkpoint's first weight matrix is bf16, else f16.
    pub fn default_dtype(&self) -> DType {
        let first_matrix = self.tensors.iter().find_map(|t| match &t.source {
            Source::Checkpoint(name) if t.shape.len() >= 2 => self.weights.get(name),
            _ => None,
        });
        match first_matrix.map(|t| t.dtype) {
            Some(safetensors::Dtype::BF16) => DType::BF16,
            _ => DType::F16,
        }
    }

    /// The bytes of checkpoint data a conversion reads (the progress total).
    pub fn source_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| self.source_bytes_of(t).len() as u64)
            .sum()
    }

    /// The GGUF metadata of a file whose weight matrices are `dtype`.
    pub fn metadata(&self, dtype: DType) -> Result<Metadata> {
        model_metadata(&self.name, &self.config, &self.vocab, dtype)
    }

    /// The output tensors with their stored types when the weights are `dtype`.
    pub fn tensor_descs(&self, dtype: DType) -> Vec<TensorDesc> {
        self.tensors
            .iter()
            .map(|t| stored_desc(&t.name, &t.shape, dtype))
            .collect()
    }

    /// Writes the GGUF file to `out` with weight matrices of type `dtype`, calling
    /// `progress(tensor name, source bytes just converted)` as it goes.
    ///
    /// The file is written as `OUT.partial` and renamed to `out` once complete, so
    /// `out` never holds a truncated file; the partial file is removed on failure.
    pub fn write_gguf(
        &self,
        out: &Path,
        dtype: DType,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<ConvertSummary> {
        let metadata = self.metadata(dtype)?;
        let descs = self.tensor_descs(dtype);
        write_atomically(out, descs, |partial, descs| {
            self.write_file(partial, &metadata, descs, progress)
        })
    }

    fn write_file(
        &self,
        path: &Path,
        metadata: &Metadata,
        descs: &[TensorDesc],
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<()> {
        let mut writer = GgufWriter::create(path, metadata, descs)?;
        for (tensor, desc) in self.tensors.iter().zip(descs) {
            self.write_tensor(tensor, desc.dtype, &mut writer, progress)
                .map_err(|e| in_tensor(&tensor.name, e))?;
        }
        let file = writer
            .finish()?
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(path, e))
    }

    /// The source bytes of `tensor` (f32 little-endian for generated tensors).
    fn source_bytes_of<'a>(&'a self, tensor: &'a PlannedTensor) -> &'a [u8] {
        match &tensor.source {
            Source::Checkpoint(name) => self
                .weights
                .get(name)
                .map(|t| self.weights.bytes(t))
                .unwrap_or_default(),
            Source::Generated(f32_le) => f32_le,
        }
    }

    fn source_dtype(&self, tensor: &PlannedTensor) -> Result<DType> {
        match &tensor.source {
            Source::Checkpoint(name) => match self.weights.get(name) {
                Some(t) => t.kiln_dtype(name),
                None => Err(Error::format(
                    "checkpoint",
                    format!("tensor {name:?} vanished"),
                )),
            },
            Source::Generated(_) => Ok(DType::F32),
        }
    }

    /// Converts one tensor in batches of whole heads (permuted tensors) or whole
    /// rows, each batch quantized in parallel, and streams it to `writer`.
    fn write_tensor<W: Write>(
        &self,
        tensor: &PlannedTensor,
        out_dtype: DType,
        writer: &mut GgufWriter<W>,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<()> {
        let src_dtype = self.source_dtype(tensor)?;
        let src = self.source_bytes_of(tensor);
        let src_elem_bytes = src_dtype.block_bytes();
        let row_len = tensor.shape.last().copied().unwrap_or(1).max(1);
        // Elements after the first dimension: the length of a permuted "row".
        let inner: usize = tensor.shape.iter().skip(1).product();
        let unit = match tensor.permute_head_rows {
            Some(head_rows) => head_rows * inner,
            None => row_len,
        };
        let batch = (BATCH_ELEMENTS / unit).max(1) * unit;
        let task = if out_dtype.block_size() > 1 {
            row_len
        } else {
            TASK_ELEMENTS
        };
        let mut values = Vec::new();
        let mut out = Vec::new();
        for chunk in src.chunks(batch * src_elem_bytes) {
            values.resize(chunk.len() / src_elem_bytes, 0f32);
            quant::dequantize(src_dtype, chunk, &mut values)?;
            if let Some(head_rows) = tensor.permute_head_rows {
                values = permute_rope_rows(&values, head_rows, inner);
            }
            out.resize(out_dtype.bytes_for(values.len())?, 0u8);
            let task_bytes = out_dtype.bytes_for(task)?;
            out.par_chunks_mut(task_bytes)
                .zip(values.par_chunks(task))
                .try_for_each(|(dst, src)| quant::quantize(out_dtype, src, dst))?;
            writer.write_tensor_data(&out)?;
            progress(&tensor.name, chunk.len() as u64);
        }
        Ok(())
    }
}

/// Adds the tensor's name to an error from its conversion.
fn in_tensor(name: &str, e: Error) -> Error {
    match e {
        Error::Unsupported(m) => Error::Unsupported(format!("tensor {name:?}: {m}")),
        Error::InvalidArgument { op, msg } => Error::invalid(op, format!("tensor {name:?}: {msg}")),
        other => other,
    }
}

/// The GGUF metadata llama.cpp writes for a model named `name` of `config` with the
/// tokenizer `vocab` and weight matrices of `dtype`: general keys, architecture keys,
/// tokenizer keys.
pub(crate) fn model_metadata(
    name: &str,
    config: &HfConfig,
    vocab: &Vocab,
    dtype: DType,
) -> Result<Metadata> {
    let file_type = llama_file_type(dtype).ok_or_else(|| {
        let types: Vec<&str> = DType::ALL
            .into_iter()
            .filter(|&d| llama_file_type(d).is_some())
            .map(DType::name)
            .collect();
        Error::invalid(
            "--type",
            format!(
                "{dtype} is not a type llama.cpp stores weight matrices in; use one of {}",
                types.join(", ")
            ),
        )
    })?;
    let mut md = Metadata::new();
    md.set(keys::ARCHITECTURE, config.family.gguf_name());
    md.set("general.type", "model");
    md.set(keys::NAME, name);
    md.set(keys::FILE_TYPE, file_type);
    config.write_metadata(&mut md);
    vocab.write_metadata(&mut md);
    md.set(keys::QUANTIZATION_VERSION, crate::QUANTIZATION_VERSION);
    Ok(md)
}

/// A tensor as a file whose weight matrices are `dtype` stores it ([`output_dtype`]).
pub(crate) fn stored_desc(name: &str, shape: &[usize], dtype: DType) -> TensorDesc {
    TensorDesc::new(name.to_string(), output_dtype(name, shape, dtype), shape)
}

/// Writes a GGUF file of `descs` through `write(partial path, descs)` to `OUT.partial`,
/// then renames it to `out`, so `out` never holds a truncated file; the partial file
/// is removed on failure.
pub(crate) fn write_atomically(
    out: &Path,
    descs: Vec<TensorDesc>,
    write: impl FnOnce(&Path, &[TensorDesc]) -> Result<()>,
) -> Result<ConvertSummary> {
    let partial = partial_path(out);
    let result = write(&partial, &descs);
    let result =
        result.and_then(|()| std::fs::rename(&partial, out).map_err(|e| Error::io(out, e)));
    if result.is_err() {
        // Best effort: the writer's error matters more than a failed cleanup.
        let _ = std::fs::remove_file(&partial);
    }
    result?;
    let file_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(ConvertSummary {
        tensors: descs.into_iter().map(|d| (d.name, d.dtype)).collect(),
        file_bytes,
    })
}

/// `out` with `.partial` appended to its file name.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    out.with_file_name(name)
}
