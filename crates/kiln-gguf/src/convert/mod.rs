//! Conversion of Hugging Face checkpoints of the llama, qwen2 and qwen3 families (their
//! mixtures of experts, Qwen3-Next and Qwen3.5 included) to GGUF, with the metadata,
//! tensor names and tokenizer section that llama.cpp's `convert_hf_to_gguf.py` writes,
//! so other GGUF engines run the result too.
//!
//! A checkpoint directory holds `config.json`, `model.safetensors` (or
//! `model.safetensors.index.json` and its shards) in f32, f16 or bf16, and a
//! byte-level BPE `tokenizer.json` (with `tokenizer_config.json` where present).
//!
//! - Tensors are renamed as llama.cpp names them (`model.layers.0.self_attn.q_proj.weight`
//!   becomes `blk.0.attn_q.weight`), checked against the shapes
//!   config.json implies, and written in the requested type: 1-D tensors, norms and
//!   biases stay f32; block types whose block does not divide a row fall back as
//!   llama-quantize does ([`TypePolicy`]).
//! - The `llama` architecture's q and k projections are permuted from Hugging
//!   Face's rotate-half RoPE layout to GGML's interleaved layout, exactly as
//!   llama.cpp's `LlamaModel.permute` does ([`permute_rope_rows`]); qwen2 and qwen3
//!   use NeoX RoPE in GGML and are copied unpermuted.
//! - Qwen3-Next's and Qwen3.5's tensors change as llama.cpp's `Qwen3NextModel` and
//!   `Qwen3_5TextModel` change them (`Transform`): zero-centred norm weights are stored
//!   plus one (not the linear attention's gated norm), `A_log` as
//!   `ssm_a = -exp(A_log)`, the convolution without its middle axis; Qwen3-Next's
//!   `in_proj_qkvz` (per key head its q, k, v, z rows) as `attn_qkv` (every head's q,
//!   then k, then v) and `attn_gate` (z); Qwen3.5's value heads (rows of `in_proj_qkv`,
//!   `in_proj_z`, `in_proj_b`, `in_proj_a` and the convolution, elements of `A_log` and
//!   `dt_bias`, columns of `out_proj`) from grouped by key head to tiled across the
//!   key heads. A multimodal Qwen3.5 checkpoint converts to its text model.
//! - Llama 3.1's rope scaling becomes a `rope_freqs.weight` tensor as llama.cpp
//!   computes it; linear and YaRN scaling become `{arch}.rope.scaling.*` keys.
//! - The tokenizer becomes `tokenizer.ggml.*` keys with model `gpt2`
//!   ([`Vocab`]): tokens, token types, merges, special token ids, add-BOS/EOS flags
//!   and the chat template.
//!
//! [`open_converted`] converts a checkpoint once into a cache directory, under a
//! name given by a hash of its files, and reuses the file after that.
//!
//! Values go through [`crate::quantize`]'s write path, shared with `kiln quantize`:
//! the source is read as f32 and stored in the output type (a tensor already in its
//! output type and not permuted is copied), and the file is written through an
//! [`OutputFile`] that refuses to write over any file of the checkpoint.

mod cache;
mod config;
mod json;
mod tensors;
mod vocab;
mod weights;

pub use crate::quantize::permute_rope_rows;
pub use cache::{cached_name, checkpoint_hash, open_converted};
pub use config::{HfConfig, HfMoe, RopeScaling};
pub(crate) use tensors::model_tensors;
pub use vocab::Vocab;

use crate::output::{InputFile, OutputFile};
use crate::quantize::{write_model, TensorSource, TypePolicy};
use crate::{keys, Metadata, TensorDesc};
use kiln_core::{DType, Error, Result};
use std::path::Path;
use tensors::{PlannedTensor, Source, Transform};
use weights::Weights;

/// The files of a checkpoint directory that a conversion reads besides the
/// safetensors files (those that exist).
const READ_FILES: [&str; 5] = [
    "config.json",
    weights::INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// A Hugging Face checkpoint opened for conversion: config, tokenizer and weights
/// read and checked, the output tensors planned.
pub struct HfCheckpoint {
    name: String,
    config: HfConfig,
    vocab: Vocab,
    weights: Weights,
    tensors: Vec<PlannedTensor>,
    /// Every file the conversion reads: an output may be none of them.
    inputs: Vec<InputFile>,
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
        let vocab = Vocab::load(
            dir,
            config::text_config(&raw_config, config.arch),
            config.vocab_size,
        )?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        let mut inputs = weights.input_files();
        for file in READ_FILES {
            let path = dir.join(file);
            if path.is_file() {
                inputs.push(InputFile::at(&path)?);
            }
        }
        Ok(HfCheckpoint {
            name,
            config,
            vocab,
            weights,
            tensors,
            inputs,
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
            .map(|t| match &t.source {
                Source::Stacked(parts) => self.parts_bytes(parts).iter().map(|b| b.len()).sum(),
                Source::Transformed(name, _) => {
                    self.parts_bytes(std::slice::from_ref(name))[0].len()
                }
                _ => self.source_bytes_of(t).len(),
            } as u64)
            .sum()
    }

    /// The bytes of the checkpoint tensors `parts`, in order.
    fn parts_bytes(&self, parts: &[String]) -> Vec<&[u8]> {
        parts
            .iter()
            .map(|name| {
                self.weights
                    .get(name)
                    .map(|t| self.weights.bytes(t))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The GGUF metadata of a file whose weight matrices are `dtype`; an error if
    /// llama.cpp has no file type for `dtype`.
    pub fn metadata(&self, dtype: DType) -> Result<Metadata> {
        let policy = TypePolicy::new(dtype)?;
        let descs = self.descs(&policy);
        Ok(self.metadata_of(&policy, &descs))
    }

    /// The output tensors with their stored types when the weights are `dtype`
    /// ([`TypePolicy::converted_dtype`]).
    pub fn tensor_descs(&self, dtype: DType) -> Result<Vec<TensorDesc>> {
        Ok(self.descs(&TypePolicy::new(dtype)?))
    }

    /// Every file the conversion reads (config, tokenizer, index and weights).
    pub fn input_files(&self) -> &[InputFile] {
        &self.inputs
    }

    fn descs(&self, policy: &TypePolicy) -> Vec<TensorDesc> {
        self.tensors
            .iter()
            .map(|t| converted_desc(policy, &t.name, &t.shape))
            .collect()
    }

    fn metadata_of(&self, policy: &TypePolicy, descs: &[TensorDesc]) -> Metadata {
        model_metadata(
            &self.name,
            &self.config,
            &self.vocab,
            policy.file_type(descs),
        )
    }

    /// Writes the GGUF file to `out` with weight matrices of type `dtype`, calling
    /// `progress(tensor name, source bytes just converted)` as it goes.
    ///
    /// `out` is refused if it is any file the conversion reads (by any path) or
    /// exists and is not a regular file. The file is written to a temporary file
    /// beside `out` and renamed to `out` once complete, so `out` never holds a
    /// truncated file; on failure the temporary file is removed and `out` is as it
    /// was.
    pub fn write_gguf(
        &self,
        out: &Path,
        dtype: DType,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<ConvertSummary> {
        let policy = TypePolicy::new(dtype)?;
        let descs = self.descs(&policy);
        let metadata = self.metadata_of(&policy, &descs);
        let output = OutputFile::create("kiln convert", out, &self.inputs)?;
        // Stacked and transformed tensors are assembled in memory (their parts are not
        // contiguous in the checkpoint's files, or their values change).
        let stacked: Vec<Option<Vec<u8>>> = self
            .tensors
            .iter()
            .map(|t| match &t.source {
                Source::Stacked(parts) => Ok(Some(self.parts_bytes(parts).concat())),
                Source::Transformed(name, transform) => {
                    self.transformed_bytes(t, name, transform).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let sources = self
            .tensors
            .iter()
            .zip(&stacked)
            .map(|(t, stacked)| {
                Ok(TensorSource {
                    name: &t.name,
                    shape: &t.shape,
                    dtype: self.source_dtype(t)?,
                    data: stacked
                        .as_deref()
                        .unwrap_or_else(|| self.source_bytes_of(t)),
                    permute_head_rows: t.permute_head_rows,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let file_bytes = write_model(output, &metadata, &sources, &descs, progress)?;
        Ok(ConvertSummary {
            tensors: descs.into_iter().map(|d| (d.name, d.dtype)).collect(),
            file_bytes,
        })
    }

    /// The values of checkpoint tensor `name` with `transforms` applied in order, in
    /// the checkpoint's dtype (as llama.cpp's converter computes them in the tensor's
    /// torch dtype), for the output tensor `tensor`.
    fn transformed_bytes(
        &self,
        tensor: &PlannedTensor,
        name: &str,
        transforms: &[Transform],
    ) -> Result<Vec<u8>> {
        let mut bytes = self.parts_bytes(std::slice::from_ref(&name.to_string()))[0].to_vec();
        let dtype = self.source_dtype(tensor)?;
        let elements: usize = tensor.shape.iter().product();
        let bad = |msg: String| Error::format(format!("tensor {name:?}"), msg);
        for transform in transforms {
            let map = |src: &[u8], f: fn(f32) -> f32| -> Result<Vec<u8>> {
                let n = src.len() / dtype.bytes_for(1)?;
                let mut values = vec![0f32; n];
                kiln_core::quant::dequantize(dtype, src, &mut values)?;
                values.iter_mut().for_each(|v| *v = f(*v));
                let mut out = vec![0u8; src.len()];
                kiln_core::quant::quantize(dtype, &values, &mut out)?;
                Ok(out)
            };
            bytes = match transform {
                Transform::AddOne => map(&bytes, |v| 1.0 + v)?,
                Transform::NegExp => map(&bytes, |v| -v.exp())?,
                Transform::Rows(rows) => {
                    if rows.is_empty() || elements % rows.len() != 0 {
                        return Err(bad(format!(
                            "{elements} elements are not {} rows",
                            rows.len()
                        )));
                    }
                    let row_bytes = dtype.bytes_for(elements / rows.len())?;
                    let mut out = Vec::with_capacity(rows.len() * row_bytes);
                    for &r in rows {
                        let row =
                            bytes
                                .get(r * row_bytes..(r + 1) * row_bytes)
                                .ok_or_else(|| {
                                    bad(format!("row {r} is outside its {} bytes", bytes.len()))
                                })?;
                        out.extend_from_slice(row);
                    }
                    out
                }
                Transform::Columns(cols) => {
                    let element = dtype.bytes_for(1)?;
                    let row_bytes = cols.len() * element;
                    if cols.is_empty() || bytes.len() % row_bytes != 0 {
                        return Err(bad(format!(
                            "{} bytes are not rows of {} columns",
                            bytes.len(),
                            cols.len()
                        )));
                    }
                    let mut out = Vec::with_capacity(bytes.len());
                    for row in bytes.chunks_exact(row_bytes) {
                        for &c in cols {
                            let value =
                                row.get(c * element..(c + 1) * element).ok_or_else(|| {
                                    bad(format!("column {c} is outside its {} columns", cols.len()))
                                })?;
                            out.extend_from_slice(value);
                        }
                    }
                    out
                }
            };
        }
        Ok(bytes)
    }

    /// The source bytes of `tensor` (f32 little-endian for generated tensors; none for
    /// stacked and transformed tensors, which [`HfCheckpoint::write_gguf`] assembles).
    fn source_bytes_of<'a>(&'a self, tensor: &'a PlannedTensor) -> &'a [u8] {
        match &tensor.source {
            Source::Checkpoint(name) => self
                .weights
                .get(name)
                .map(|t| self.weights.bytes(t))
                .unwrap_or_default(),
            Source::Stacked(_) | Source::Transformed(..) => &[],
            Source::Generated(f32_le) => f32_le,
        }
    }

    /// The dtype of `tensor`'s source (of its first part when stacked: the plan
    /// checked that the parts agree).
    fn source_dtype(&self, tensor: &PlannedTensor) -> Result<DType> {
        let first = match &tensor.source {
            Source::Checkpoint(name) => Some(name),
            Source::Stacked(parts) => parts.first(),
            Source::Transformed(name, _) => Some(name),
            Source::Generated(_) => None,
        };
        match first {
            Some(name) => match self.weights.get(name) {
                Some(t) => t.kiln_dtype(name),
                None => Err(Error::format(
                    "checkpoint",
                    format!("tensor {name:?} vanished"),
                )),
            },
            None => Ok(DType::F32),
        }
    }
}

/// The GGUF metadata llama.cpp writes for a model named `name` of `config` with the
/// tokenizer `vocab` and llama.cpp file type `file_type` ([`TypePolicy::file_type`]):
/// general keys, architecture keys, tokenizer keys.
pub(crate) fn model_metadata(
    name: &str,
    config: &HfConfig,
    vocab: &Vocab,
    file_type: u32,
) -> Metadata {
    let mut md = Metadata::new();
    md.set(keys::ARCHITECTURE, config.arch.name());
    md.set(keys::TYPE, "model");
    md.set(keys::NAME, name);
    md.set(keys::FILE_TYPE, file_type);
    config.write_metadata(&mut md);
    vocab.write_metadata(&mut md);
    md.set(keys::QUANTIZATION_VERSION, crate::QUANTIZATION_VERSION);
    md
}

/// A tensor as a converted file stores it ([`TypePolicy::converted_dtype`]).
pub(crate) fn converted_desc(policy: &TypePolicy, name: &str, shape: &[usize]) -> TensorDesc {
    TensorDesc::new(name.to_string(), policy.converted_dtype(name, shape), shape)
}
