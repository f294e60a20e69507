//! Which type each tensor of a written model is stored as, and the one path that
//! converts tensors to those types: used by `kiln convert` (Hugging Face checkpoints),
//! `kiln quantize` (GGUF files, through [`Requantization`]) and `kiln synth`.
//!
//! [`TypePolicy`] follows llama-quantize: a *weight matrix* (a tensor of two or more
//! dimensions whose name ends in `weight`, not a norm, router or the like) is stored
//! in the requested type, or, where its rows are not a whole number of that type's
//! blocks, in the type llama-quantize falls back to (q4_k -> q5_0, q5_k -> q5_1,
//! q6_k -> q8_0, q2_k/q3_k -> iq4_nl), else f16. Every other tensor stays f32 in a
//! converted checkpoint, as llama.cpp's converter writes it, and keeps its type in a
//! re-quantized file, as llama-quantize copies it.

use crate::output::{InputFile, OutputFile};
use crate::{keys, llama_file_type, GgufFile, GgufWriter, Metadata, TensorDesc, TensorInfo};
use kiln_core::{quant, DType, Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Source elements converted per batch: bounds the memory one tensor's conversion
/// takes, however large the tensor.
const BATCH_ELEMENTS: usize = 1 << 22;

/// Elements per parallel task when neither type has blocks.
const TASK_ELEMENTS: usize = 1 << 16;

/// Bytes per write when a tensor is copied unchanged.
const COPY_BYTES: usize = 1 << 24;

/// Substrings of the names of tensors that llama-quantize never quantizes although
/// they have two or more dimensions and end in `weight`: norms, mixture-of-experts
/// routers, positional embeddings and token types, and other small tensors.
const NOT_QUANTIZED: [&str; 10] = [
    "_norm.weight",
    "ffn_gate_inp.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "position_embd.weight",
    "token_types.weight",
    "ssm_conv1d.weight",
    "shortconv.conv.weight",
    "attn_rel_b.weight",
];

/// The types of the tensors of a file whose weight matrices are `requested`, and
/// the file's `general.file_type`. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypePolicy {
    requested: DType,
}

impl TypePolicy {
    /// The policy for weight matrices of `requested`: an error listing the accepted
    /// types when llama.cpp has no file type for it.
    pub fn new(requested: DType) -> Result<TypePolicy> {
        if llama_file_type(requested).is_none() {
            let types: Vec<&str> = DType::ALL
                .into_iter()
                .filter(|&d| llama_file_type(d).is_some())
                .map(DType::name)
                .collect();
            return Err(Error::invalid(
                "--type",
                format!(
                    "{requested} is not a type llama.cpp stores weight matrices in; use one of {}",
                    types.join(", ")
                ),
            ));
        }
        Ok(TypePolicy { requested })
    }

    /// The type asked for.
    pub fn requested(&self) -> DType {
        self.requested
    }

    /// Whether llama-quantize quantizes the tensor `name` of row-major `shape`: its
    /// name ends in `weight`, it has two or more dimensions (as ggml counts them,
    /// outer dimensions of 1 not counting) and it is none of [`NOT_QUANTIZED`].
    pub fn is_weight_matrix(name: &str, shape: &[usize]) -> bool {
        let dims = shape.len() - shape.iter().take_while(|&&d| d == 1).count();
        name.ends_with("weight") && dims >= 2 && !NOT_QUANTIZED.iter().any(|s| name.contains(s))
    }

    /// The type of a weight matrix with rows of `row_len` elements: the requested
    /// type if a row is a whole number of its blocks, else llama-quantize's fallback,
    /// else f16.
    pub fn matrix_dtype(&self, row_len: usize) -> DType {
        let fits = |t: DType| row_len % t.block_size() == 0;
        if fits(self.requested) {
            return self.requested;
        }
        let fallback = match self.requested {
            DType::Q2K | DType::Q3K => DType::IQ4NL,
            DType::Q2_0 | DType::TQ1_0 | DType::TQ2_0 => DType::Q4_0,
            DType::Q4K => DType::Q5_0,
            DType::Q5K => DType::Q5_1,
            DType::Q6K => DType::Q8_0,
            _ => DType::F16,
        };
        if fits(fallback) {
            fallback
        } else {
            DType::F16
        }
    }

    /// The type of a tensor converted from a checkpoint: weight matrices as
    /// [`TypePolicy::matrix_dtype`], everything else f32.
    pub fn converted_dtype(&self, name: &str, shape: &[usize]) -> DType {
        if TypePolicy::is_weight_matrix(name, shape) {
            self.matrix_dtype(row_len(shape))
        } else {
            DType::F32
        }
    }

    /// The type of a tensor of type `current` in a re-quantized file: weight
    /// matrices of a float or block type as [`TypePolicy::matrix_dtype`], everything
    /// else (integer tensors too) unchanged.
    pub fn requantized_dtype(&self, name: &str, shape: &[usize], current: DType) -> DType {
        let decodable = current.is_float() || current.is_quantized();
        if decodable && TypePolicy::is_weight_matrix(name, shape) {
            self.matrix_dtype(row_len(shape))
        } else {
            current
        }
    }

    /// llama.cpp's `general.file_type` for a file of `tensors`: the requested type's,
    /// as llama-quantize writes it, when a weight matrix is stored in that type (or
    /// the file has none); otherwise, when every row fell back, the file type of the
    /// type most weight-matrix elements are stored in, so the label names a type the
    /// file holds.
    pub fn file_type(&self, tensors: &[TensorDesc]) -> u32 {
        let requested = llama_file_type(self.requested).unwrap_or(0);
        let matrices: Vec<&TensorDesc> = tensors
            .iter()
            .filter(|t| TypePolicy::is_weight_matrix(&t.name, &t.shape))
            .collect();
        if matrices.is_empty() || matrices.iter().any(|t| t.dtype == self.requested) {
            return requested;
        }
        let mut elements: BTreeMap<DType, usize> = BTreeMap::new();
        for t in matrices {
            if llama_file_type(t.dtype).is_some() {
                *elements.entry(t.dtype).or_default() += t.shape.iter().product::<usize>();
            }
        }
        elements
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .and_then(|(dtype, _)| llama_file_type(dtype))
            .unwrap_or(requested)
    }
}

fn row_len(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1)
}

/// A tensor's values as they are read: `data` holds `shape` (row-major) in `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct TensorSource<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub dtype: DType,
    pub data: &'a [u8],
    /// For the `llama` architecture's q and k projections from a Hugging Face
    /// checkpoint: the rows per head, reordered by [`permute_rope_rows`].
    pub permute_head_rows: Option<usize>,
}

/// Writes a GGUF file of `metadata` and the tensors `sources`, each stored as the
/// type of its entry in `descs` (same order), to `out`, and persists it; returns
/// the file's size. `progress(tensor name, source bytes)` is called as data is done.
///
/// On any error `out` is dropped unpersisted: its temporary file is removed.
pub(crate) fn write_model(
    mut out: OutputFile,
    metadata: &Metadata,
    sources: &[TensorSource<'_>],
    descs: &[TensorDesc],
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64> {
    if sources.len() != descs.len() {
        return Err(Error::invalid(
            "write_model",
            format!("{} sources for {} tensors", sources.len(), descs.len()),
        ));
    }
    let label = out.path().to_owned();
    let mut writer = GgufWriter::new(BufWriter::new(out.file()), &label, metadata, descs)?;
    for (source, desc) in sources.iter().zip(descs) {
        write_tensor(source, desc.dtype, &mut writer, progress)
            .map_err(|e| in_tensor(source.name, e))?;
    }
    writer
        .finish()?
        .into_inner()
        .map_err(|e| Error::io(&label, e.into_error()))?;
    out.persist()
}

/// Adds the tensor's name to an error from its conversion.
fn in_tensor(name: &str, e: Error) -> Error {
    match e {
        Error::Unsupported(m) => Error::Unsupported(format!("tensor {name:?}: {m}")),
        Error::InvalidArgument { op, msg } => Error::invalid(op, format!("tensor {name:?}: {msg}")),
        other => other,
    }
}

/// Streams `source` to `writer` as `out_dtype`: copied when the types are equal and
/// nothing is permuted, else dequantized to f32 and quantized in batches of whole
/// rows (whole heads when permuted), each batch in parallel.
fn write_tensor<W: Write>(
    source: &TensorSource<'_>,
    out_dtype: DType,
    writer: &mut GgufWriter<W>,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<()> {
    let (name, src_dtype) = (source.name, source.dtype);
    let n: usize = source.shape.iter().product();
    let expected = src_dtype.bytes_for(n)?;
    if source.data.len() != expected {
        return Err(Error::format(
            format!("tensor {name:?}"),
            format!(
                "{} bytes of {src_dtype} data for shape {:?}, which takes {expected}",
                source.data.len(),
                source.shape
            ),
        ));
    }
    if src_dtype == out_dtype && source.permute_head_rows.is_none() {
        for chunk in source.data.chunks(COPY_BYTES) {
            writer.write_tensor_data(chunk)?;
            progress(name, chunk.len() as u64);
        }
        return Ok(());
    }
    let row_len = row_len(source.shape).max(1);
    // Elements after the first dimension: the length of a permuted "row".
    let inner: usize = source.shape.iter().skip(1).product();
    let unit = match source.permute_head_rows {
        Some(head_rows) => head_rows * inner,
        None => row_len,
    }
    .max(1);
    let batch = (BATCH_ELEMENTS / unit).max(1) * unit;
    // Whole rows when either type has blocks (a row is whole blocks of both).
    let task = if src_dtype.block_size() > 1 || out_dtype.block_size() > 1 {
        row_len
    } else {
        TASK_ELEMENTS
    };
    let (task_in, task_out) = (src_dtype.bytes_for(task)?, out_dtype.bytes_for(task)?);
    let mut values = Vec::new();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let first = src_dtype.bytes_for(start)?;
        let chunk = &source.data[first..first + src_dtype.bytes_for(len)?];
        values.resize(len, 0f32);
        values
            .par_chunks_mut(task)
            .zip(chunk.par_chunks(task_in))
            .try_for_each(|(dst, src)| quant::dequantize(src_dtype, src, dst))?;
        if let Some(head_rows) = source.permute_head_rows {
            values = permute_rope_rows(&values, head_rows, inner);
        }
        out.resize(out_dtype.bytes_for(len)?, 0u8);
        out.par_chunks_mut(task_out)
            .zip(values.par_chunks(task))
            .try_for_each(|(dst, src)| quant::quantize(out_dtype, src, dst))?;
        writer.write_tensor_data(&out)?;
        progress(name, chunk.len() as u64);
        start += len;
    }
    Ok(())
}

/// A GGUF file opened to be re-quantized (`kiln quantize`): the output's tensor
/// types ([`TypePolicy::requantized_dtype`]) and metadata planned.
pub struct Requantization {
    input: GgufFile,
    input_file: InputFile,
    descs: Vec<TensorDesc>,
    metadata: Metadata,
}

/// What [`Requantization::write_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct RequantizeSummary {
    /// Each tensor's name, type in the input and type in the output, in file order.
    pub tensors: Vec<(String, DType, DType)>,
    /// Tensor data bytes in the input and in the output.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The size of the written file.
    pub file_bytes: u64,
}

impl Requantization {
    /// Opens the GGUF file at `path` to re-quantize its weight matrices to
    /// `requested`. Metadata is copied with `general.file_type` set by
    /// [`TypePolicy::file_type`] and `general.quantization_version` to 2.
    pub fn open(path: impl AsRef<Path>, requested: DType) -> Result<Requantization> {
        let path = path.as_ref();
        let policy = TypePolicy::new(requested)?;
        let input_file = InputFile::at(path)?;
        let input = GgufFile::open(path)?;
        let descs: Vec<TensorDesc> = input
            .tensor_infos()
            .iter()
            .map(|t| {
                let mut d = t.desc();
                d.dtype = policy.requantized_dtype(t.name(), t.shape(), t.dtype());
                d
            })
            .collect();
        let mut metadata = input.metadata().clone();
        metadata.set(keys::FILE_TYPE, policy.file_type(&descs));
        metadata.set(keys::QUANTIZATION_VERSION, crate::QUANTIZATION_VERSION);
        Ok(Requantization {
            input,
            input_file,
            descs,
            metadata,
        })
    }

    /// The input file.
    pub fn input(&self) -> &GgufFile {
        &self.input
    }

    /// The output's tensors, in file order.
    pub fn tensor_descs(&self) -> &[TensorDesc] {
        &self.descs
    }

    /// The tensor data bytes a re-quantization reads (the progress total).
    pub fn source_bytes(&self) -> u64 {
        self.input
            .tensor_infos()
            .iter()
            .map(|t| t.n_bytes() as u64)
            .sum()
    }

    /// Writes the re-quantized file to `out` through an [`OutputFile`] (never over
    /// the input, by any path), calling `progress(tensor name, source bytes just
    /// done)` as it goes.
    pub fn write_gguf(
        &self,
        out: &Path,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<RequantizeSummary> {
        let output =
            OutputFile::create("kiln quantize", out, std::slice::from_ref(&self.input_file))?;
        let sources: Vec<TensorSource<'_>> = self
            .input
            .tensors()
            .map(|view| TensorSource {
                name: view.info.name(),
                shape: view.info.shape(),
                dtype: view.info.dtype(),
                data: view.data,
                permute_head_rows: None,
            })
            .collect();
        let file_bytes = write_model(output, &self.metadata, &sources, &self.descs, progress)?;
        let infos = self.input.tensor_infos();
        let bytes_out = self
            .descs
            .iter()
            .map(|d| {
                d.dtype
                    .bytes_for(d.shape.iter().product())
                    .map(|b| b as u64)
            })
            .sum::<Result<u64>>()?;
        Ok(RequantizeSummary {
            tensors: infos
                .iter()
                .zip(&self.descs)
                .map(|(t, d)| (t.name().to_owned(), t.dtype(), d.dtype))
                .collect(),
            bytes_in: infos.iter().map(|t: &TensorInfo| t.n_bytes() as u64).sum(),
            bytes_out,
            file_bytes,
        })
    }
}

/// Reorders the rows of each head of a q or k projection from Hugging Face's
/// rotate-half RoPE layout to GGML's interleaved one, exactly as llama.cpp's
/// `LlamaModel.permute` does for the `llama` architecture (qwen2 and qwen3 use NeoX
/// RoPE in GGML too and are not permuted).
///
/// HF rotates element `j` of a head with element `j + d/2` (d = `head_rows`); GGML's
/// normal RoPE rotates `2j` with `2j + 1`. So within each group of `head_rows` rows,
/// output row `2j + k` is input row `k * d/2 + j` (k in {0, 1}, j < d/2): numpy's
/// `w.reshape(n_head, 2, d/2, -1).swapaxes(1, 2)`. `row_len` is the elements per
/// row (1 for a bias); `src.len()` must be a multiple of `head_rows * row_len`.
pub fn permute_rope_rows(src: &[f32], head_rows: usize, row_len: usize) -> Vec<f32> {
    let half = head_rows / 2;
    let mut out = Vec::with_capacity(src.len());
    for head in src.chunks_exact(head_rows * row_len) {
        for out_row in 0..head_rows {
            let in_row = (out_row % 2) * half + out_row / 2;
            out.extend_from_slice(&head[in_row * row_len..(in_row + 1) * row_len]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_two_halves_of_each_head() {
        // Two heads of 4 rows, 2 elements a row: row r holds [10r, 10r + 1].
        let src: Vec<f32> = (0..8)
            .flat_map(|r| [10.0 * r as f32, 10.0 * r as f32 + 1.0])
            .collect();
        let out = permute_rope_rows(&src, 4, 2);
        let rows: Vec<f32> = out.chunks(2).map(|r| r[0] / 10.0).collect();
        // Head 0: rows 0,2,1,3; head 1: rows 4,6,5,7.
        assert_eq!(rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(out[1], 1.0);
    }

    fn policy(d: DType) -> TypePolicy {
        TypePolicy::new(d).unwrap()
    }

    #[test]
    fn weight_matrices_are_what_llama_quantize_quantizes() {
        let m = |name: &str, shape: &[usize]| TypePolicy::is_weight_matrix(name, shape);
        assert!(m("blk.0.attn_q.weight", &[8, 64]));
        assert!(m("token_embd.weight", &[100, 64]));
        assert!(m("blk.0.ffn_down_exps.weight", &[4, 8, 64]), "3-D experts");
        assert!(!m("blk.0.attn_norm.weight", &[64]));
        assert!(
            !m("blk.0.attn_q.bias", &[8, 64]),
            "the name must end in weight"
        );
        assert!(!m("blk.0.attn_q_norm.weight", &[2, 64]), "norms never");
        assert!(!m("blk.0.ffn_gate_inp.weight", &[8, 64]), "routers never");
        assert!(!m("position_embd.weight", &[512, 64]));
        assert!(
            !m("blk.0.attn_q.weight", &[1, 64]),
            "ggml counts 1 dimension"
        );
        assert!(!m("rope_freqs.weight", &[32]));
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back_as_llama_quantize_does() {
        let cases = [
            (DType::Q4K, 512, DType::Q4K),
            (DType::Q4K, 384, DType::Q5_0),
            (DType::Q4K, 48, DType::F16),
            (DType::Q5K, 384, DType::Q5_1),
            (DType::Q6K, 384, DType::Q8_0),
            (DType::Q3K, 384, DType::IQ4NL),
            (DType::Q2K, 384, DType::IQ4NL),
            (DType::TQ2_0, 384, DType::Q4_0),
            (DType::TQ1_0, 384, DType::Q4_0),
            (DType::TQ1_0, 48, DType::F16),
            (DType::Q2_0, 96, DType::Q4_0),
            (DType::Q1_0, 384, DType::Q1_0),
            (DType::Q1_0, 320, DType::F16),
            (DType::MXFP4, 48, DType::F16),
            (DType::Q4_0, 48, DType::F16),
            (DType::Q8_0, 64, DType::Q8_0),
            (DType::BF16, 48, DType::BF16),
            (DType::F32, 7, DType::F32),
        ];
        for (requested, row, want) in cases {
            assert_eq!(
                policy(requested).matrix_dtype(row),
                want,
                "{requested} {row}"
            );
        }
    }

    #[test]
    fn conversion_and_requantization_agree_on_weight_matrices() {
        let p = policy(DType::Q4K);
        let tensors: [(&str, &[usize]); 5] = [
            ("token_embd.weight", &[16, 384]),
            ("blk.0.ffn_down.weight", &[384, 1024]),
            ("blk.0.attn_q.weight", &[4, 48]),
            ("blk.0.attn_norm.weight", &[384]),
            ("blk.0.attn_q.bias", &[384]),
        ];
        for (name, shape) in tensors {
            let converted = p.converted_dtype(name, shape);
            for current in [DType::F32, DType::F16, DType::BF16, DType::Q8_0] {
                let requantized = p.requantized_dtype(name, shape, current);
                if TypePolicy::is_weight_matrix(name, shape) {
                    assert_eq!(requantized, converted, "{name} from {current}");
                } else {
                    assert_eq!(converted, DType::F32, "{name}");
                    assert_eq!(requantized, current, "{name} keeps its type");
                }
            }
        }
        assert_eq!(
            p.requantized_dtype("blk.0.attn_q.weight", &[8, 512], DType::I32),
            DType::I32,
            "integer tensors are copied"
        );
    }

    #[test]
    fn the_file_type_names_a_type_the_file_holds() {
        let d = |name: &str, dtype, shape: &[usize]| TensorDesc::new(name, dtype, shape);
        let norm = d("blk.0.attn_norm.weight", DType::F32, &[384]);
        let q4k = policy(DType::Q4K);
        let mixed = [
            norm.clone(),
            d("blk.0.attn_q.weight", DType::Q5_0, &[384, 384]),
            d("blk.0.ffn_down.weight", DType::Q4K, &[384, 1024]),
        ];
        assert_eq!(q4k.file_type(&mixed), 14, "llama-quantize's label");
        let all_fell_back = [
            norm.clone(),
            d("blk.0.attn_q.weight", DType::Q5_0, &[384, 384]),
            d("blk.0.attn_k.weight", DType::F16, &[8, 48]),
        ];
        assert_eq!(q4k.file_type(&all_fell_back), 8, "Q5_0 holds the most");
        assert_eq!(q4k.file_type(std::slice::from_ref(&norm)), 14);
        assert_eq!(policy(DType::Q8_0).file_type(&[]), 7);
        // llama.h's LLAMA_FTYPE_MOSTLY_{TQ1_0, TQ2_0, MXFP4_MOE, Q1_0, Q2_0}.
        let low_bit = [
            (DType::TQ1_0, 36),
            (DType::TQ2_0, 37),
            (DType::MXFP4, 38),
            (DType::Q1_0, 40),
            (DType::Q2_0, 41),
        ];
        for (dtype, ftype) in low_bit {
            assert_eq!(policy(dtype).file_type(&[]), ftype, "{dtype}");
        }
    }

    #[test]
    fn types_llama_cpp_has_no_file_type_for_are_refused() {
        let err = TypePolicy::new(DType::Q8_1).unwrap_err().to_string();
        assert!(err.contains("q8_1") && err.contains("q4_k"), "{err}");
        assert!(TypePolicy::new(DType::I32).is_err());
    }

    #[test]
    fn converted_types_follow_llama_cpp() {
        let m = |n: usize| vec![8, n];
        assert_eq!(
            policy(DType::Q4_0).converted_dtype("blk.0.attn_norm.weight", &[64]),
            DType::F32
        );
        assert_eq!(
            policy(DType::F16).converted_dtype("blk.0.attn_q_norm.weight", &[64]),
            DType::F32
        );
        assert_eq!(
            policy(DType::Q8_0).converted_dtype("blk.0.attn_q.bias", &[64]),
            DType::F32
        );
        assert_eq!(
            policy(DType::Q4K).converted_dtype("blk.0.attn_q.weight", &m(512)),
            DType::Q4K
        );
        assert_eq!(
            policy(DType::Q4K).converted_dtype("blk.0.attn_q.weight", &m(384)),
            DType::Q5_0
        );
        assert_eq!(
            policy(DType::Q6K).converted_dtype("blk.0.attn_q.weight", &m(384)),
            DType::Q8_0
        );
        assert_eq!(
            policy(DType::Q3K).converted_dtype("blk.0.attn_q.weight", &m(384)),
            DType::IQ4NL
        );
        assert_eq!(
            policy(DType::Q4_0).converted_dtype("blk.0.attn_q.weight", &m(48)),
            DType::F16
        );
        assert_eq!(
            policy(DType::Q4K).converted_dtype("blk.0.attn_q.weight", &m(48)),
            DType::F16
        );
        assert_eq!(
            policy(DType::BF16).converted_dtype("token_embd.weight", &m(48)),
            DType::BF16
        );
    }
}
