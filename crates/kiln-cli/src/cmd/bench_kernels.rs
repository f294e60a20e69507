//! `kiln bench-kernels`: the speed of the CUDA kernels at the shapes of real models,
//! against a ceiling measured in the same run.
//!
//! - The ceiling: a device-to-device copy, counting bytes read plus bytes written.
//! - Mat-vec (decode, one activation row): GB/s of weight, activation and output
//!   bytes, and its fraction of the copy bandwidth, per weight format, at the
//!   products of the synth presets' decode graphs ([`WEIGHT_SHAPES`]). Block formats
//!   are timed with x's Q8_1 copy given (rows labelled "x_q8"), as decode graphs give
//!   it; float weights with x.
//! - Decode attention: GB/s of K and V cache bytes (plus query and output) for one
//!   query of 32 heads over 8 KV heads of dimension 128, F16 cache, at 1k to 32k rows
//!   (the query at the cache's last row), then short queries in a longer cache (the
//!   launch sized by the capacity, as a decode graph replays it at every position).
//! - The bf16 matrix-product ceiling: cuBLASLt's bf16 product of two 8192 x 8192
//!   matrices in f32 ([`matmul::bf16_product`]), when the mat-mat is measured.
//! - Mat-mat: TFLOP/s and fraction of the bf16 ceiling over a sweep of activation
//!   rows (by default 1 to 2048: the mat-vec's rows, the batched-decode range and
//!   prefill) at Llama-3.1-8B's products ([`MATMAT_SHAPES`]), for the formats of
//!   `--matmat-formats`, on the path the backend picks or on each path forced
//!   (`--matmat-paths`). Products of block formats of up to [`BATCH_COPY_ROWS`] rows
//!   read x's Q8_1 copy, as decode graphs and batched steps give it, and are shown as
//!   GB/s of the bytes they read and write.
//! - Expert-routed products at Qwen3-30B-A3B's expert shapes ([`MOE_SHAPES`]), for the
//!   formats of `--moe-formats`: one decode token (GB/s of the bytes it reads and
//!   writes: its 8 experts' rows of 128 stacked, ids, input, output; each launch takes
//!   the next 8 experts, so that they come from memory, not the L2 cache) and a
//!   512-token prompt chunk spread evenly over the experts (TFLOP/s of its 8 experts'
//!   products per token).
//! - Sampling (temperature, top-k, top-p, min-p and the draw): microseconds per row
//!   and GB/s of the logits read, at 128256 and 151936 tokens, for llama.cpp's
//!   defaults, a wide nucleus, min-p alone, temperature alone and greedy, one row and
//!   a batch of 16. The logits (normal, scale 2) stay in the L2 cache, as they are
//!   after the output head that writes them.
//! - The gated delta rule at Qwen3-Next's linear-attention heads ([`DELTA_NET_HEADS`]):
//!   one decode token (GB/s of the state read and written plus the token's inputs and
//!   output, [`delta_net_decode_bytes`]; each launch takes the next of enough state
//!   copies to miss the L2 cache; plain and "chained"), and prompts of
//!   [`DELTA_NET_PROMPTS`] tokens on the chunkwise kernel (TFLOP/s of the chunkwise
//!   algorithm's products, [`delta_net_chunk_flops`], and tokens/s) beside the
//!   recurrent kernel (its own products, [`delta_net_recurrent_flops`], and tokens/s).
//!
//! `--sections` picks what runs (a mat-mat sweep alone: `--sections matmat`).
//!
//! Each measurement enqueues its launches behind a long copy (so the host's launch
//! overhead is hidden), times them with CUDA events, and cycles through enough copies
//! of its operands that they cannot stay in the L2 cache between launches. Launches
//! are plain (each kernel starts after the one before it ends), except the mat-vec
//! and delta-rule rows labelled "chained" on devices with programmatic dependent
//! launch: there each launch may start while the one before it finishes, as the
//! kernels of a decode step do.

use std::sync::Arc;

use kiln_core::ops::{DeltaNetHeads, SampleParams, Q8_COPY};
use kiln_core::{quant, Backend, DType, Error, Result};
use kiln_cuda::ops::attention::AttentionShape;
use kiln_cuda::ops::delta_net::{DeltaNetForm, DeltaNetOperands};
use kiln_cuda::ops::matmul::MATVEC_MAX_ROWS;
use kiln_cuda::ops::sample::{SampleLayout, SampleTuning, TUNING};
use kiln_cuda::ops::{attention, delta_net, matmul, sample};
use kiln_cuda::timing::EventTimer;
use kiln_cuda::{CacheConfig, CudaBackend, CudaBuffer};
use kiln_models::forward::BATCH_COPY_ROWS;

use super::device::{resolve, Device, DeviceArgs};

/// Arguments of `kiln bench-kernels`.
#[derive(clap::Args, Debug)]
pub struct BenchKernelsArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Timed launches per measurement (after one warm-up launch).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    /// MiB copied to measure the bandwidth ceiling.
    #[arg(long, default_value_t = 1024)]
    pub copy_mib: usize,
    /// What to measure, comma-separated (the copy ceiling always runs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "matvec,attention,sample,matmat,moe,delta-net"
    )]
    pub sections: Vec<Section>,
    /// Weight formats of the mat-vec measurements, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,f16,bf16,q4_0,q4_1,q5_0,q5_1,q8_0,q4_k,q5_k,q6_k"
    )]
    pub formats: Vec<DType>,
    /// Weight formats of the mat-mat sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "q4_0,q4_k,q8_0")]
    pub matmat_formats: Vec<DType>,
    /// Activation rows of the mat-mat sweep, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,512,2048"
    )]
    pub matmat_rows: Vec<usize>,
    /// Paths of the mat-mat sweep, comma-separated: the one the backend picks, kiln's
    /// kernel, cuBLASLt.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub matmat_paths: Vec<MatMatPath>,
    /// Weight formats of the expert-routed mat-vec measurements, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "q4_0,q4_k,q8_0")]
    pub moe_formats: Vec<DType>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The parts of `kiln bench-kernels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Matvec,
    Attention,
    Sample,
    Matmat,
    Moe,
    DeltaNet,
}

/// Which mat-mat runs a product of more than [`MATVEC_MAX_ROWS`] rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MatMatPath {
    /// The backend's choice (cuBLASLt from
    /// [`kiln_cuda::ops::matmul::GEMM_MIN_ROWS`] rows, or as `KILN_GEMM_MIN_ROWS`
    /// says).
    Auto,
    /// kiln's mma.sync kernel.
    Kernel,
    /// cuBLASLt on bf16 copies of the operands.
    Cublaslt,
}

impl MatMatPath {
    /// The backend's fewest rows on cuBLASLt for this path, given its own choice
    /// `auto`.
    pub fn gemm_min_rows(self, auto: usize) -> usize {
        match self {
            Self::Auto => auto,
            Self::Kernel => usize::MAX,
            Self::Cublaslt => MATVEC_MAX_ROWS + 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Cublaslt => "cublaslt",
        }
    }
}

/// Weight shapes `(n, k)` (output rows x row length) of the mat-vec
/// measurements, as the synth presets' decode graphs have them: Llama-3.1-8B's stacked
/// q-k-v, attention output, stacked gate-up and down projections and 128256-token
/// head, Qwen3-8B's 151936-token head, and Llama-3.2-1B's stacked q-k-v, gate-up and
/// down projections.
pub const WEIGHT_SHAPES: [(usize, usize); 9] = [
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),
    (128256, 4096),
    (151936, 4096),
    (3072, 2048),
    (16384, 2048),
    (2048, 8192),
];

/// Expert shapes `(rows, cols)` of the expert-routed mat-vec measurements:
/// Qwen3-30B-A3B's gate (and up) and down projections per expert.
pub const MOE_SHAPES: [(usize, usize); 2] = [(768, 2048), (2048, 768)];

/// Experts of the expert-routed mat-vec measurements, and the experts a token uses.
pub const MOE_EXPERTS: usize = 128;
pub const MOE_USED: usize = 8;

/// Tokens of the expert-routed mat-mat measurement (a prompt chunk).
pub const MOE_PROMPT_TOKENS: usize = 512;

/// Bytes one decode token's expert-routed mat-vec moves: the rows of its `MOE_USED`
/// experts (`rows x cols` of `dtype` each), its ids, its input (one row, or one per
/// slot for the down projection: `per_slot`) and its f32 outputs.
pub fn moe_matvec_bytes(dtype: DType, rows: usize, cols: usize, per_slot: bool) -> Result<usize> {
    let x_rows = if per_slot { MOE_USED } else { 1 };
    Ok(MOE_USED * rows * dtype.bytes_for(cols)?
        + 4 * MOE_USED
        + 4 * x_rows * cols
        + 4 * MOE_USED * rows)
}

/// Rows of the decode attention measurements.
pub const KV_LENGTHS: [usize; 4] = [1024, 4096, 16384, 32768];

/// (visible rows, capacity) of the decode attention measurements of a query before the
/// end of its cache.
pub const KV_PREFIXES: [(usize, usize); 3] = [(16, 4096), (256, 4096), (4096, 32768)];

/// The decode attention problem: one query of 32 heads over 8 KV heads of dimension
/// 128 in an F16 cache of `kv_len` rows, all visible.
pub fn decode_attention_shape(kv_len: usize) -> AttentionShape {
    AttentionShape {
        n_tokens: 1,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        capacity: kv_len,
        n_slots: 1,
        scale: 1.0 / (128f32).sqrt(),
        window: None,
        softcap: None,
    }
}

/// Prompt lengths of the prefill attention measurements.
pub const PREFILL_ATTENTION_TOKENS: [usize; 3] = [512, 4096, 16384];

/// The prefill attention problem: a prompt of `n_tokens` at positions 0.. over an F16
/// cache of as many rows, with the decode problem's heads (Llama 3.1 8B's).
pub fn prefill_attention_shape(n_tokens: usize) -> AttentionShape {
    AttentionShape {
        n_tokens,
        ..decode_attention_shape(n_tokens)
    }
}

/// Floating-point operations of a causal attention, counted as is usual: two products
/// (2 flops per multiply-add) of `n_tokens`^2 / 2 (query, row) pairs of `head_dim` per
/// query head.
pub fn prefill_attention_flops(s: &AttentionShape) -> f64 {
    let t = s.n_tokens as f64;
    4.0 * t * t / 2.0 * (s.head_dim * s.n_heads) as f64
}

/// The delta-rule heads of the measurements: Qwen3-Next's linear-attention layers, 16
/// query/key heads and 32 value heads of 128.
pub const DELTA_NET_HEADS: DeltaNetHeads = DeltaNetHeads {
    n_k_heads: 16,
    n_v_heads: 32,
    d_k: 128,
    d_v: 128,
    layout: kiln_core::ops::HeadLayout::Grouped,
};

/// Prompt lengths of the delta-rule measurements: around the chunkwise kernel's
/// threshold ([`kiln_cuda::ops::delta_net::CHUNK_MIN_TOKENS`]), a chunk, a prompt chunk
/// and a long prompt.
pub const DELTA_NET_PROMPTS: [usize; 7] = [2, 4, 8, 16, 64, 512, 4096];

/// Bytes one decode token of the delta rule moves: the state read and written
/// (`n_v_heads x d_k x d_v` f32 each way), the token's q/k/v row, its gates `a` and `b`,
/// the layer's `ssm_a` and `dt_bias`, and its output (all f32).
pub fn delta_net_decode_bytes(h: &DeltaNetHeads) -> usize {
    4 * (2 * h.state_elements() + h.qkv_width() + 4 * h.n_v_heads + h.n_v_heads * h.d_v)
}

/// Floating-point operations of the chunkwise delta rule over `n_tokens` tokens: the
/// products the algorithm needs, 2 flops per multiply-add, per value head and chunk
/// of `c` tokens (`DELTA_NET_CHUNK` = 64, the last one shorter):
/// - the decay-weighted key products `k_t . k_s` (`s < t`) and query-key products
///   `q_t . k_s` (`s <= t`): `c (c - 1) / 2 + c (c + 1) / 2 = c^2` pairs of `d_k`;
/// - the triangular solve applied to the value corrections (`c (c - 1) / 2` pairs) and
///   the intra-chunk output `P u` (`c (c + 1) / 2` pairs): `c^2` pairs of `d_v`;
/// - the incoming state's `Q S` and `K S` and the state update `K^T u`: `3 c d_k d_v`;
///
/// in all `2 (c^2 (d_k + d_v) + 3 c d_k d_v)` per chunk and value head. The kernel's
/// extra work (the inverse of the solve, the zero halves of its tiles, the three
/// TF32 products of each 3xTF32 product) is not counted.
pub fn delta_net_chunk_flops(n_tokens: usize, h: &DeltaNetHeads) -> f64 {
    let chunk = kiln_core::ops::DELTA_NET_CHUNK;
    let (dk, dv) = (h.d_k as f64, h.d_v as f64);
    let per_chunk = |c: f64| 2.0 * (c * c * (dk + dv) + 3.0 * c * dk * dv);
    let full = (n_tokens / chunk) as f64 * per_chunk(chunk as f64);
    let rest = n_tokens % chunk;
    let last = if rest > 0 {
        per_chunk(rest as f64)
    } else {
        0.0
    };
    h.n_v_heads as f64 * (full + last)
}

/// Floating-point operations of the recurrent delta rule over `n_tokens` tokens: per
/// token and value head three products of the state (`S^T k`, the update `k d^T` and
/// `S^T q`), `d_k x d_v` multiply-adds each: `6 d_k d_v` (the decay's scaling of the
/// state is not counted).
pub fn delta_net_recurrent_flops(n_tokens: usize, h: &DeltaNetHeads) -> f64 {
    6.0 * n_tokens as f64 * (h.n_v_heads * h.d_k * h.d_v) as f64
}

/// Vocabularies of the sampling measurements (Llama 3's and Qwen 2's).
pub const SAMPLE_VOCABS: [usize; 2] = [128_256, 151_936];

/// Rows of the sampling measurements: one (a decode step) and a batch.
pub const SAMPLE_ROWS: [usize; 2] = [1, 16];

/// The sampling settings measured: llama.cpp's defaults, a wide nucleus (about 90% of
/// a flat row's tokens), min-p alone, temperature alone, and greedy (the argmax).
pub fn sample_settings() -> [(&'static str, SampleParams); 5] {
    let p = |temperature, top_k, top_p, min_p| SampleParams {
        temperature,
        top_k,
        top_p,
        min_p,
    };
    [
        ("defaults", p(0.8, 40, 0.95, 0.05)),
        ("top_k 0, top_p 0.9", p(0.8, 0, 0.9, 0.0)),
        ("min_p 0.05", p(0.8, 0, 1.0, 0.05)),
        ("temperature 0.8", p(0.8, 0, 1.0, 0.0)),
        ("greedy", p(0.0, 0, 1.0, 0.0)),
    ]
}

/// Weight shapes `(n, k)` of the mat-mat sweep: Llama-3.1-8B's attention output,
/// stacked q-k-v, stacked gate-up and down projections and its output head.
pub const MATMAT_SHAPES: [(usize, usize); 5] = [
    (4096, 4096),
    (6144, 4096),
    (28672, 4096),
    (4096, 14336),
    (128256, 4096),
];

/// Side of the square bf16 product that measures the matrix-product ceiling.
pub const BF16_CEILING_SIDE: usize = 8192;

/// Bytes an operand set should span so that cycling through its copies defeats a
/// 50 MB L2 cache (an H100's).
const COLD_BYTES: usize = 256 << 20;

/// Most copies of one operand set.
const MAX_COPIES: usize = 64;

/// Bytes a mat-vec of `m` rows over an `n x k` weight of `dtype` moves: the weight,
/// the activations (f32, or their Q8_1 copy when `x_q8`) and the output (f32).
pub fn matvec_bytes(dtype: DType, m: usize, n: usize, k: usize, x_q8: bool) -> Result<usize> {
    let x = if x_q8 {
        Q8_COPY.bytes_for(m * k)?
    } else {
        4 * m * k
    };
    Ok(n * dtype.bytes_for(k)? + x + 4 * m * n)
}

/// Bytes one decode attention over `rows` visible rows moves: those K and V rows of
/// every KV head (F16), the query and the output (f32).
pub fn attention_bytes(s: &AttentionShape, rows: usize) -> usize {
    2 * s.n_kv_heads * rows * s.head_dim * 2 + 2 * 4 * s.n_tokens * s.n_heads * s.head_dim
}

/// Floating-point operations of an `m x k` by `k x n` product.
pub fn matmul_flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

/// Copies of an operand set of `bytes` bytes to cycle through: enough to span
/// [`COLD_BYTES`], at most [`MAX_COPIES`], at least 1.
pub fn copies_for(bytes: usize) -> usize {
    COLD_BYTES.div_ceil(bytes.max(1)).clamp(1, MAX_COPIES)
}

/// One measurement: what ran, the bytes it moved or the operations it did, and the
/// time of one launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub family: &'static str,
    pub label: String,
    pub bytes: usize,
    pub flops: f64,
    pub seconds: f64,
}

impl Measurement {
    /// Bytes moved per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }

    /// Operations per second.
    pub fn flops_per_s(&self) -> f64 {
        self.flops / self.seconds
    }
}

/// The ceilings measured in the run: the copy's bytes per second, and the bf16
/// matrix product's operations per second when it was measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    pub copy_bytes_per_s: f64,
    pub bf16_flops_per_s: Option<f64>,
}

/// The table of one family: memory-bound ones as GB/s and fraction of the copy
/// bandwidth, compute-bound ones as TFLOP/s and fraction of the bf16 ceiling.
pub fn table(title: &str, rows: &[Measurement], ceilings: Ceilings) -> String {
    let copy_bytes_per_s = ceilings.copy_bytes_per_s;
    let mut out = format!("{title}\n");
    for r in rows {
        let line = if r.flops > 0.0 {
            let of_bf16 = ceilings.bf16_flops_per_s.map_or(String::new(), |c| {
                format!(" {:>6.1}% of bf16", 100.0 * r.flops_per_s() / c)
            });
            format!(
                "  {:<34} {:>9.1} us {:>8.1} TFLOP/s{of_bf16}\n",
                r.label,
                r.seconds * 1e6,
                r.flops_per_s() / 1e12
            )
        } else {
            format!(
                "  {:<34} {:>9.1} us {:>8.1} GB/s {:>6.1}% of copy\n",
                r.label,
                r.seconds * 1e6,
                r.bytes_per_s() / 1e9,
                100.0 * r.bytes_per_s() / copy_bytes_per_s
            )
        };
        out.push_str(&line);
    }
    out
}

/// Runs `kiln bench-kernels`.
pub fn run(args: BenchKernelsArgs) -> Result<()> {
    if args.reps == 0 {
        return Err(Error::invalid("bench-kernels", "--reps must be at least 1"));
    }
    let device = match resolve(args.device.device)? {
        Device::Cuda(d) => d,
        Device::Cpu => {
            return Err(Error::Unsupported(
                "kiln bench-kernels measures CUDA kernels and needs a CUDA device".into(),
            ))
        }
    };
    let backend = CudaBackend::on_device(Arc::clone(&device), CacheConfig::from_env()?)?;
    let mut bench = Bench {
        backend: &backend,
        reps: args.reps,
        timer: EventTimer::new(&backend, args.copy_mib << 20)?,
    };
    let copy = bench.timer.copy_bandwidth(&backend, args.reps)?;
    let chaining = device.has_programmatic_launch();
    backend.set_programmatic_launch(false);
    let on = |s: Section| args.sections.contains(&s);
    let mut families = Vec::new();
    let formats: &[DType] = if on(Section::Matvec) {
        &args.formats
    } else {
        &[]
    };
    for dtype in formats {
        let mut rows = Vec::new();
        for (n, k) in WEIGHT_SHAPES {
            // As decode graphs launch them: products of block formats read x's copy.
            let copies: &[bool] = if dtype.is_quantized() {
                &[true]
            } else {
                &[false]
            };
            for &x_q8 in copies {
                rows.push(bench.matvec(*dtype, n, k, false, x_q8)?);
                if chaining {
                    backend.set_programmatic_launch(true);
                    rows.push(bench.matvec(*dtype, n, k, true, x_q8)?);
                    backend.set_programmatic_launch(false);
                }
            }
        }
        families.push((
            format!("mat-vec, 1 activation row, {dtype} weight (n x k)"),
            rows,
        ));
    }
    if on(Section::Moe) {
        for &dtype in &args.moe_formats {
            families.push(bench.moe_matvecs(dtype)?);
        }
    }
    if on(Section::Attention) {
        families.push(bench.decode_attentions()?);
        families.push(bench.prefill_attentions()?);
    }
    if on(Section::Sample) {
        families.push(bench.samples()?);
    }
    if on(Section::DeltaNet) {
        families.push(bench.delta_nets(chaining)?);
    }
    let mut bf16 = None;
    if on(Section::Matmat) {
        bf16 = Some(bench.bf16_ceiling()?);
        let auto = backend.gemm_min_rows();
        for &dtype in &args.matmat_formats {
            for (n, k) in MATMAT_SHAPES {
                families.push(bench.matmat_sweep(dtype, n, k, &args, auto)?);
            }
        }
        backend.set_gemm_min_rows(auto);
    }
    let ceilings = Ceilings {
        copy_bytes_per_s: copy,
        bf16_flops_per_s: bf16,
    };
    if args.json {
        print_json(device.name(), ceilings, &families);
    } else {
        println!(
            "{} ({}): copy bandwidth (read + write) {:.1} GB/s",
            device.name(),
            backend.name(),
            copy / 1e9
        );
        if let Some(c) = bf16 {
            println!(
                "bf16 matrix product ({BF16_CEILING_SIDE} cubed, cuBLASLt, f32 out) {:.1} TFLOP/s",
                c / 1e12
            );
        }
        for (title, rows) in &families {
            print!("{}", table(title, rows, ceilings));
        }
    }
    Ok(())
}

impl Bench<'_> {
    /// The decode attention family.
    fn decode_attentions(&mut self) -> Result<(String, Vec<Measurement>)> {
        let rows = KV_LENGTHS
            .iter()
            .map(|&len| (len, len))
            .chain(KV_PREFIXES)
            .map(|(rows, capacity)| self.decode_attention(rows, capacity))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            "decode attention, 32 heads over 8 KV heads of 128, f16 cache".to_string(),
            rows,
        ))
    }

    /// The sampling family.
    fn samples(&mut self) -> Result<(String, Vec<Measurement>)> {
        let bench = self;
        let mut rows = Vec::new();
        for vocab in SAMPLE_VOCABS {
            for (label, params) in sample_settings() {
                for n in SAMPLE_ROWS {
                    rows.push(bench.sample(
                        vocab,
                        n,
                        label,
                        params,
                        TUNING,
                        SampleLayout::Cluster,
                    )?);
                }
            }
        }
        // For comparison: clusters of 16 blocks (a size the device must allow; skipped
        // where it does not), and one block a row (devices without clusters).
        let sixteen = SampleTuning {
            cluster_blocks: 16,
            ..TUNING
        };
        for (label, params) in sample_settings() {
            match bench.sample(151_936, 1, label, params, sixteen, SampleLayout::Cluster) {
                Ok(m) => rows.push(m),
                Err(e) => eprintln!("kiln: sampling with clusters of 16 blocks: {e}"),
            }
        }
        for (label, params) in sample_settings().into_iter().take(2) {
            rows.push(bench.sample(151_936, 1, label, params, TUNING, SampleLayout::Block)?);
        }
        Ok((
            "sampling, time and GB/s of logits per row, logits in L2".to_string(),
            rows,
        ))
    }

    /// The delta-rule family: one decode token (also chained, with programmatic
    /// dependent launch, as a decode graph runs it, when `chaining`), then each prompt
    /// length of [`DELTA_NET_PROMPTS`] on the chunkwise and on the recurrent kernel.
    fn delta_nets(&mut self, chaining: bool) -> Result<(String, Vec<Measurement>)> {
        let mut rows = vec![self.delta_net(1, DeltaNetForm::Auto)?];
        if chaining {
            self.backend.set_programmatic_launch(true);
            let chained = self.delta_net(1, DeltaNetForm::Auto);
            self.backend.set_programmatic_launch(false);
            let mut chained = chained?;
            chained.label.push_str(", chained");
            rows.push(chained);
        }
        for n in DELTA_NET_PROMPTS {
            for form in [DeltaNetForm::Chunkwise, DeltaNetForm::Recurrent] {
                rows.push(self.delta_net(n, form)?);
            }
        }
        let h = DELTA_NET_HEADS;
        Ok((
            format!(
                "gated delta rule, {} key heads and {} value heads of {} x {}",
                h.n_k_heads, h.n_v_heads, h.d_k, h.d_v
            ),
            rows,
        ))
    }

    /// The prefill attention family, one measurement per prompt length.
    fn prefill_attentions(&mut self) -> Result<(String, Vec<Measurement>)> {
        let rows = PREFILL_ATTENTION_TOKENS
            .iter()
            .map(|&t| self.prefill_attention(t))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            "prefill attention, causal, 32 heads over 8 KV heads of 128, f16 cache".to_string(),
            rows,
        ))
    }
}

fn print_json(device: &str, ceilings: Ceilings, families: &[(String, Vec<Measurement>)]) {
    let copy = ceilings.copy_bytes_per_s;
    let families: Vec<serde_json::Value> = families
        .iter()
        .map(|(title, rows)| {
            let rows: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "label": r.label,
                        "seconds": r.seconds,
                        "bytes_per_s": r.bytes_per_s(),
                        "fraction_of_copy": r.bytes_per_s() / copy,
                        "flops_per_s": r.flops_per_s(),
                        "fraction_of_bf16": ceilings.bf16_flops_per_s.map(|c| r.flops_per_s() / c),
                    })
                })
                .collect();
            serde_json::json!({ "family": title, "rows": rows })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "device": device,
            "copy_bytes_per_s": copy,
            "bf16_flops_per_s": ceilings.bf16_flops_per_s,
            "families": families,
        })
    );
}

/// The measuring state: the backend, the launches per measurement, and the timer.
struct Bench<'a> {
    backend: &'a CudaBackend,
    reps: usize,
    timer: EventTimer,
}

impl Bench<'_> {
    /// `copies` device buffers holding `bytes`.
    fn buffers(&self, copies: usize, bytes: &[u8]) -> Result<Vec<CudaBuffer>> {
        (0..copies)
            .map(|_| {
                let mut b = self.backend.alloc(bytes.len())?;
                self.backend.upload(&mut b, bytes)?;
                Ok(b)
            })
            .collect()
    }

    /// `copies` device buffers holding the `n x k` weight of `dtype` in `gguf`, in the
    /// backend's weight layout.
    fn weights(
        &self,
        copies: usize,
        gguf: &[u8],
        dtype: DType,
        n: usize,
        k: usize,
    ) -> Result<Vec<CudaBuffer>> {
        (0..copies)
            .map(|_| {
                let mut b = self.backend.alloc(gguf.len())?;
                self.backend.upload_weight(&mut b, gguf, dtype, &[n, k])?;
                Ok(b)
            })
            .collect()
    }

    /// The mat-vec measurement of an `n x k` weight of `dtype`, given x's Q8_1 copy
    /// when `x_q8`; `chained` labels one taken with programmatic dependent launch on.
    fn matvec(
        &mut self,
        dtype: DType,
        n: usize,
        k: usize,
        chained: bool,
        x_q8: bool,
    ) -> Result<Measurement> {
        let copy = if x_q8 { ", x_q8" } else { "" };
        let how = if chained { ", chained" } else { "" };
        Ok(Measurement {
            family: "matvec",
            label: format!("{n} x {k}{copy}{how}"),
            bytes: matvec_bytes(dtype, 1, n, k, x_q8)?,
            flops: 0.0,
            seconds: {
                let weight = encoded_weight(dtype, n, k)?;
                let weights = self.weights(copies_for(weight.len()), &weight, dtype, n, k)?;
                self.timed_matmul(dtype, &weights, 1, n, k, x_q8)?
            },
        })
    }

    /// The expert-routed mat-vec family of `dtype`: one decode token's `MOE_USED` of
    /// `MOE_EXPERTS` stacked experts at each of [`MOE_SHAPES`], each launch choosing
    /// the next set of experts, so that the sets cycle through every expert's rows
    /// (more than the L2 cache holds).
    fn moe_matvecs(&mut self, dtype: DType) -> Result<(String, Vec<Measurement>)> {
        let mut rows = Vec::new();
        for (n, k) in MOE_SHAPES {
            // The down projection (more rows than columns) reads each slot's input.
            let per_slot = n > k;
            let weight = encoded_weight(dtype, MOE_EXPERTS * n, k)?;
            let mut w = self.backend.alloc(weight.len())?;
            self.backend
                .upload_weight(&mut w, &weight, dtype, &[MOE_EXPERTS, n, k])?;
            drop(weight);
            for m in [1, MOE_PROMPT_TOKENS] {
                let seconds = self.timed_moe_matmul(dtype, &w, m, n, k, per_slot)?;
                let slots = m * MOE_USED;
                rows.push(if m == 1 {
                    Measurement {
                        family: "moe_matvec",
                        label: format!("{MOE_USED} of {MOE_EXPERTS} x ({n} x {k})"),
                        bytes: moe_matvec_bytes(dtype, n, k, per_slot)?,
                        flops: 0.0,
                        seconds,
                    }
                } else {
                    Measurement {
                        family: "moe_matmat",
                        label: format!("{m} tokens, {MOE_USED} of {MOE_EXPERTS} x ({n} x {k})"),
                        bytes: 0,
                        flops: matmul_flops(slots, n, k),
                        seconds,
                    }
                });
            }
        }
        Ok((
            format!("expert-routed products, {dtype} experts (rows x cols each)"),
            rows,
        ))
    }

    /// Seconds of one expert-routed product of `m` tokens over `weight` (`MOE_EXPERTS`
    /// stacked `n x k` experts of `dtype`): each launch's tokens take the next
    /// `MOE_USED` experts (token t of launch i: experts (i + t) * MOE_USED ..), so that
    /// one token's experts cycle through every expert's rows and a prompt's tokens
    /// spread evenly over the experts.
    fn timed_moe_matmul(
        &mut self,
        dtype: DType,
        weight: &CudaBuffer,
        m: usize,
        n: usize,
        k: usize,
        per_slot: bool,
    ) -> Result<f64> {
        let sets = MOE_EXPERTS / MOE_USED;
        let ids: Vec<CudaBuffer> = (0..sets)
            .map(|set| {
                let ids: Vec<u8> = (0..m)
                    .flat_map(|t| {
                        let first = (set + t) % sets * MOE_USED;
                        (first..first + MOE_USED).flat_map(|e| (e as i32).to_le_bytes())
                    })
                    .collect();
                self.buffers(1, &ids).map(|mut b| b.remove(0))
            })
            .collect::<Result<_>>()?;
        let x_rows = if per_slot { m * MOE_USED } else { m };
        let x = self.buffers(1, &f32_pattern(x_rows * k))?;
        let mut out = self.backend.alloc(4 * m * MOE_USED * n)?;
        // The op's buffer ids are not read by the dispatch.
        let op = kiln_core::ops::MoeMatMul {
            x: kiln_core::BufferId(0),
            ids: kiln_core::BufferId(1),
            w: kiln_core::BufferId(2),
            out: kiln_core::BufferId(3),
            m,
            k: MOE_USED,
            n_expert: MOE_EXPERTS,
            rows: n,
            cols: k,
            per_slot,
        };
        let backend = self.backend;
        self.timer.time(backend, self.reps, |i| {
            let ids = &ids[i % ids.len()];
            kiln_cuda::ops::moe::moe_matmul(backend, &x[0], ids, weight, dtype, &mut out, &op)
        })
    }

    /// The mat-mat family of an `n x k` weight of `dtype`: each row count of the sweep
    /// on each path of `args` (`auto` is the backend's own threshold).
    fn matmat_sweep(
        &mut self,
        dtype: DType,
        n: usize,
        k: usize,
        args: &BenchKernelsArgs,
        auto: usize,
    ) -> Result<(String, Vec<Measurement>)> {
        let weight = encoded_weight(dtype, n, k)?;
        let weights = self.weights(copies_for(weight.len()), &weight, dtype, n, k)?;
        drop(weight);
        let mut rows = Vec::new();
        for &path in &args.matmat_paths {
            self.backend.set_gemm_min_rows(path.gemm_min_rows(auto));
            if path == MatMatPath::Cublaslt && self.backend.gemm_min_rows() == usize::MAX {
                return Err(Error::Unsupported(
                    "--matmat-paths cublaslt: cuBLASLt could not be loaded".into(),
                ));
            }
            let min_rows = self.backend.gemm_min_rows();
            for &m in &args.matmat_rows {
                let matvec = m <= MATVEC_MAX_ROWS;
                if matvec && path != MatMatPath::Auto {
                    // The same mat-vec on every path.
                    continue;
                }
                // Block formats get x's Q8_1 copy up to the rows of a batched decode
                // step, which gives one; those products are memory-bound (GB/s).
                let x_q8 = dtype.is_quantized() && m <= BATCH_COPY_ROWS;
                // What the dispatch runs (k of the shapes is a multiple of 8).
                let runs = if x_q8 && matmul::q8_takes(dtype, m) {
                    "matmul_q8"
                } else if matvec || x_q8 {
                    "mat-vec"
                } else if m >= min_rows {
                    "cublaslt"
                } else {
                    "kernel"
                };
                let seconds = self.timed_matmul(dtype, &weights, m, n, k, x_q8)?;
                let (bytes, flops) = if x_q8 {
                    (matvec_bytes(dtype, m, n, k, true)?, 0.0)
                } else {
                    (0, matmul_flops(m, n, k))
                };
                rows.push(Measurement {
                    family: "matmat",
                    label: format!("m {m}, {} ({runs})", path.name()),
                    bytes,
                    flops,
                    seconds,
                });
            }
        }
        Ok((format!("mat-mat, {dtype} weight {n} x {k}"), rows))
    }

    /// Operations per second of cuBLASLt's bf16 product of two
    /// [`BF16_CEILING_SIDE`]-square matrices, f32 out.
    fn bf16_ceiling(&mut self) -> Result<f64> {
        let side = BF16_CEILING_SIDE;
        let mut values = vec![0u8; DType::BF16.bytes_for(side * side)?];
        quant::quantize(DType::BF16, &f32_values(side * side), &mut values)?;
        let operands = self.buffers(2, &values)?;
        drop(values);
        let mut out = self.backend.alloc(4 * side * side)?;
        let backend = self.backend;
        let shape = (side, side, side);
        let seconds = self.timer.time(backend, self.reps, |_| {
            matmul::bf16_product(backend, &operands[0], &operands[1], &mut out, shape)
        })?;
        Ok(matmul_flops(side, side, side) / seconds)
    }

    /// Seconds of one matmul of `m` rows over the `n x k` weights of `dtype` in
    /// `weights` (enough copies to miss the L2 cache, cycled through), given x's Q8_1
    /// copy when `x_q8`.
    fn timed_matmul(
        &mut self,
        dtype: DType,
        weights: &[CudaBuffer],
        m: usize,
        n: usize,
        k: usize,
        x_q8: bool,
    ) -> Result<f64> {
        let x_bytes = f32_pattern(m * k);
        let x = self.buffers(1, &x_bytes)?;
        let copy = if x_q8 {
            let mut q8 = vec![0u8; Q8_COPY.bytes_for(m * k)?];
            quant::quantize(Q8_COPY, &f32_values(m * k), &mut q8)?;
            self.buffers(1, &q8)?.pop()
        } else {
            None
        };
        let mut out = self.backend.alloc(4 * m * n)?;
        let backend = self.backend;
        let activations = matmul::Activations {
            x: &x[0],
            x_q8: copy.as_ref(),
        };
        self.timer.time(backend, self.reps, |i| {
            let w = &weights[i % weights.len()];
            matmul::matmul(backend, activations, w, dtype, None, &mut out, m, n, k)
        })
    }

    /// One decode attention of a query at row `kv_len - 1` of an F16 cache of
    /// `capacity` rows, writing its output's Q8_1 copy as a decode graph does, cycling
    /// through enough cache copies to miss the L2 cache.
    fn decode_attention(&mut self, kv_len: usize, capacity: usize) -> Result<Measurement> {
        let shape = decode_attention_shape(capacity);
        let cache_len = shape.n_kv_heads * shape.capacity * shape.head_dim;
        let mut cache = vec![0u8; DType::F16.bytes_for(cache_len)?];
        quant::quantize(DType::F16, &f32_values(cache_len), &mut cache)?;
        // Enough copies that the rows the query reads miss the L2 cache.
        let visible = DType::F16.bytes_for(shape.n_kv_heads * kv_len * shape.head_dim)?;
        let copies = copies_for(2 * visible);
        let keys = self.buffers(copies, &cache)?;
        let values = self.buffers(copies, &cache)?;
        drop(cache);
        let nq = shape.n_heads * shape.head_dim;
        let q = self.buffers(1, &f32_pattern(nq))?;
        let last = i32::try_from(kv_len - 1)
            .map_err(|_| Error::invalid("bench-kernels", format!("kv length {kv_len}")))?;
        let positions = self.buffers(1, &last.to_le_bytes())?;
        let mut out = self.backend.alloc(4 * nq)?;
        // With the Q8_1 copy a decode graph has its output projection read.
        let mut out_q8 = self.backend.alloc(DType::Q8_1.bytes_for(nq)?)?;
        let backend = self.backend;
        let seconds = self.timer.time(backend, self.reps, |i| {
            let c = i % copies;
            attention::attention(
                backend,
                &q[0],
                &keys[c],
                &values[c],
                &positions[0],
                None,
                &mut out,
                Some(&mut out_q8),
                DType::F16,
                &shape,
            )
        })?;
        let label = if kv_len == capacity {
            format!("kv {kv_len}")
        } else {
            format!("kv {kv_len} of {capacity}")
        };
        Ok(Measurement {
            family: "attention",
            label,
            bytes: attention_bytes(&shape, kv_len),
            flops: 0.0,
            seconds,
        })
    }

    /// One causal attention of a prompt of `n_tokens` (positions 0..) over an F16 cache
    /// holding its rows, writing its output's Q8_1 copy as a prefill graph does.
    fn prefill_attention(&mut self, n_tokens: usize) -> Result<Measurement> {
        let shape = prefill_attention_shape(n_tokens);
        let cache_len = shape.n_kv_heads * shape.capacity * shape.head_dim;
        let mut cache = vec![0u8; DType::F16.bytes_for(cache_len)?];
        quant::quantize(DType::F16, &f32_values(cache_len), &mut cache)?;
        let keys = self.buffers(1, &cache)?;
        let values = self.buffers(1, &cache)?;
        drop(cache);
        let nq = n_tokens * shape.n_heads * shape.head_dim;
        let q = self.buffers(1, &f32_pattern(nq))?;
        let positions: Vec<u8> = (0..n_tokens as i32).flat_map(i32::to_le_bytes).collect();
        let positions = self.buffers(1, &positions)?;
        let mut out = self.backend.alloc(4 * nq)?;
        let mut out_q8 = self.backend.alloc(DType::Q8_1.bytes_for(nq)?)?;
        let backend = self.backend;
        let seconds = self.timer.time(backend, self.reps, |_| {
            attention::attention(
                backend,
                &q[0],
                &keys[0],
                &values[0],
                &positions[0],
                None,
                &mut out,
                Some(&mut out_q8),
                DType::F16,
                &shape,
            )
        })?;
        Ok(Measurement {
            family: "attention_prefill",
            label: format!("{n_tokens} tokens"),
            bytes: 0,
            flops: prefill_attention_flops(&shape),
            seconds,
        })
    }

    /// The delta rule over `n_tokens` tokens at [`DELTA_NET_HEADS`] in `form`. One
    /// token is a decode step (bytes moved), cycling through enough state copies to
    /// miss the L2 cache; a prompt counts operations ([`delta_net_chunk_flops`] or
    /// [`delta_net_recurrent_flops`]) and is labelled with its tokens per second.
    fn delta_net(&mut self, n_tokens: usize, form: DeltaNetForm) -> Result<Measurement> {
        let h = DELTA_NET_HEADS;
        let nv = h.n_v_heads;
        let qkv = self.buffers(1, &f32_pattern(n_tokens * h.qkv_width()))?;
        let gates = self.buffers(2, &f32_pattern(n_tokens * nv))?;
        // Decay rates -exp(A_log) between -1 and 0, and time-step biases.
        let rates: Vec<u8> = f32_values(nv)
            .iter()
            .flat_map(|v| (-v.abs()).to_le_bytes())
            .collect();
        let ssm_a = self.buffers(1, &rates)?;
        let dt_bias = self.buffers(1, &f32_pattern(nv))?;
        let state_bytes = f32_pattern(h.state_elements());
        let copies = if n_tokens == 1 {
            copies_for(state_bytes.len())
        } else {
            1
        };
        let mut states = self.buffers(copies, &state_bytes)?;
        let mut out = self.backend.alloc(4 * n_tokens * nv * h.d_v)?;
        let backend = self.backend;
        let seconds = self.timer.time(backend, self.reps, |i| {
            let operands = DeltaNetOperands {
                qkv: &qkv[0],
                a: &gates[0],
                b: &gates[1],
                ssm_a: &ssm_a[0],
                dt_bias: &dt_bias[0],
            };
            let state = &mut states[i % copies];
            delta_net::gated_delta_net_with(
                backend, operands, state, &mut out, n_tokens, h, 1e-6, form,
            )
        })?;
        if n_tokens == 1 {
            return Ok(Measurement {
                family: "delta_net",
                label: "decode, 1 token".to_string(),
                bytes: delta_net_decode_bytes(&h),
                flops: 0.0,
                seconds,
            });
        }
        let (name, flops) = if form == DeltaNetForm::Recurrent {
            ("recurrent", delta_net_recurrent_flops(n_tokens, &h))
        } else {
            ("chunkwise", delta_net_chunk_flops(n_tokens, &h))
        };
        Ok(Measurement {
            family: "delta_net_prompt",
            label: format!(
                "{n_tokens} tokens, {name}, {:.2} M tokens/s",
                n_tokens as f64 / seconds / 1e6
            ),
            bytes: 0,
            flops,
            seconds,
        })
    }

    /// Sampling `rows` rows of `vocab` logits with `params` (labelled `label`) by the
    /// kernel of `tuning` and `layout`: the time per row and the logit bytes of one row.
    fn sample(
        &mut self,
        vocab: usize,
        rows: usize,
        label: &str,
        params: SampleParams,
        tuning: SampleTuning,
        layout: SampleLayout,
    ) -> Result<Measurement> {
        let logits: Vec<u8> = sample_logits(rows * vocab)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let x = self.buffers(1, &logits)?;
        let uniform: Vec<u8> = (0..rows)
            .flat_map(|r| ((r as f32 * 0.618_034 + 0.3) % 1.0).to_le_bytes())
            .collect();
        let u = self.buffers(1, &uniform)?;
        let mut out = self.backend.alloc(4 * rows)?;
        let backend = self.backend;
        let seconds = self.timer.time(backend, self.reps, |_| {
            sample::sample_with(
                backend, &x[0], &u[0], &mut out, rows, vocab, &params, tuning, layout,
            )
        })?;
        let how = match layout {
            SampleLayout::Cluster if tuning.cluster_blocks == TUNING.cluster_blocks => {
                String::new()
            }
            SampleLayout::Cluster => format!(", {} blocks a row", tuning.cluster_blocks),
            SampleLayout::Block => ", one block a row".to_string(),
        };
        let per = if rows == 1 { "row" } else { "rows" };
        Ok(Measurement {
            family: "sample",
            label: format!("{vocab}, {label}, {rows} {per}{how}"),
            bytes: 4 * vocab,
            flops: 0.0,
            seconds: seconds / rows as f64,
        })
    }
}

/// `n` deterministic logits, normal of scale 2 (Box-Muller over a xorshift
/// generator): a row as flat as a random model's.
fn sample_logits(n: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // 53 random bits in (0, 1].
        ((state >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (a, b) = (next(), next());
            (2.0 * (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect()
}

/// `n` deterministic values in (-1, 1), none zero.
fn f32_values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 2001) as f32 - 1000.5) / 1001.0)
        .collect()
}

/// The bytes of [`f32_values`].
fn f32_pattern(n: usize) -> Vec<u8> {
    f32_values(n).iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Rows encoded once and repeated: an `n x k` weight of valid `dtype` blocks.
fn encoded_weight(dtype: DType, n: usize, k: usize) -> Result<Vec<u8>> {
    const DISTINCT_ROWS: usize = 16;
    let rows = n.min(DISTINCT_ROWS);
    let mut block = vec![0u8; dtype.bytes_for(rows * k)?];
    quant::quantize(dtype, &f32_values(rows * k), &mut block)?;
    let row_bytes = dtype.bytes_for(k)?;
    let mut out = Vec::with_capacity(n * row_bytes);
    while out.len() < n * row_bytes {
        let take = (n * row_bytes - out.len()).min(block.len());
        out.extend_from_slice(&block[..take]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvec_bytes_count_weight_activations_and_output() {
        // 4096 rows of 16 Q4_K blocks (144 bytes), 4096 f32 in, 4096 f32 out.
        assert_eq!(
            matvec_bytes(DType::Q4K, 1, 4096, 4096, false).unwrap(),
            4096 * 16 * 144 + 4096 * 4 + 4096 * 4
        );
        // With the Q8_1 copy: 128 blocks of 36 bytes in place of the f32 x.
        assert_eq!(
            matvec_bytes(DType::Q4K, 1, 4096, 4096, true).unwrap(),
            4096 * 16 * 144 + 128 * 36 + 4096 * 4
        );
        assert!(matvec_bytes(DType::Q4K, 1, 4096, 100, false).is_err());
    }

    #[test]
    fn moe_matvec_bytes_count_the_used_experts_only() {
        // 8 experts x 768 rows x 64 Q4_0 blocks of 18 bytes, 8 ids, one input row of
        // 2048 f32, 8 x 768 f32 outputs.
        assert_eq!(
            moe_matvec_bytes(DType::Q4_0, 768, 2048, false).unwrap(),
            7_077_888 + 32 + 8192 + 24_576
        );
        // The down projection reads one input row per slot.
        assert_eq!(
            moe_matvec_bytes(DType::Q4_0, 2048, 768, true).unwrap(),
            8 * 2048 * 24 * 18 + 32 + 8 * 768 * 4 + 8 * 2048 * 4
        );
    }

    #[test]
    fn decode_attention_bytes_are_dominated_by_the_cache() {
        let s = decode_attention_shape(32768);
        // K and V: 8 heads x 32768 rows x 128 x 2 bytes each = 128 MiB in all.
        assert_eq!(
            attention_bytes(&s, 32768),
            2 * (64 << 20) + 2 * 4 * 32 * 128
        );
        // Only the visible rows count.
        assert_eq!(
            attention_bytes(&s, 16),
            2 * 8 * 16 * 128 * 2 + 2 * 4 * 32 * 128
        );
    }

    #[test]
    fn prefill_attention_counts_the_causal_half() {
        let s = prefill_attention_shape(4096);
        assert_eq!(
            (s.n_tokens, s.capacity, s.n_heads, s.n_kv_heads),
            (4096, 4096, 32, 8)
        );
        // 32 heads x 2 products x 2 flops x 4096^2 / 2 pairs x 128.
        assert_eq!(
            prefill_attention_flops(&s),
            32.0 * 4.0 * 8_388_608.0 * 128.0
        );
    }

    #[test]
    fn delta_net_decode_bytes_count_the_state_both_ways_and_the_token() {
        let h = DELTA_NET_HEADS;
        // The state, 32 x 128 x 128 f32 read and written; the q/k/v row of 2 x 16 x 128
        // + 32 x 128 floats; a, b, ssm_a, dt_bias of 32 each; 32 x 128 outputs.
        assert_eq!(
            delta_net_decode_bytes(&h),
            2 * (2 << 20) + 4 * 8192 + 4 * 4 * 32 + 4 * 4096
        );
    }

    #[test]
    fn delta_net_flops_count_the_chunkwise_products_by_chunk() {
        let h = DELTA_NET_HEADS;
        // One full chunk per head: c^2 (d_k + d_v) = 64^2 x 256 and 3 c d_k d_v =
        // 3 x 64 x 128^2 multiply-adds, 2 flops each, for 32 value heads.
        let chunk = 2.0 * (4096.0 * 256.0 + 3.0 * 64.0 * 16384.0);
        assert_eq!(delta_net_chunk_flops(64, &h), 32.0 * chunk);
        assert_eq!(delta_net_chunk_flops(4096, &h), 64.0 * 32.0 * chunk);
        // A remainder of one token: 1 pair of each, 3 d_k d_v.
        let one = 2.0 * (256.0 + 3.0 * 16384.0);
        assert_eq!(delta_net_chunk_flops(65, &h), 32.0 * (chunk + one));
        assert_eq!(
            delta_net_recurrent_flops(4096, &h),
            6.0 * 4096.0 * 32.0 * 16384.0
        );
    }

    #[test]
    fn copies_span_the_cold_size_within_bounds() {
        assert_eq!(copies_for(9_437_184), 29);
        assert_eq!(copies_for(1), MAX_COPIES);
        assert_eq!(copies_for(0), MAX_COPIES);
        assert_eq!(copies_for(1 << 30), 1);
    }

    #[test]
    fn encoded_weights_have_the_exact_size_and_decode() {
        for dtype in [DType::F16, DType::Q4_0, DType::Q6K] {
            let w = encoded_weight(dtype, 40, 512).unwrap();
            assert_eq!(w.len(), 40 * dtype.bytes_for(512).unwrap());
            let mut back = vec![0f32; 40 * 512];
            quant::dequantize(dtype, &w, &mut back).unwrap();
            assert!(
                back.iter().all(|v| v.is_finite() && v.abs() <= 1.1),
                "{dtype}"
            );
            // Row 16 repeats row 0.
            assert_eq!(back[..512], back[16 * 512..17 * 512]);
        }
    }

    #[test]
    fn rates_and_tables_follow_the_measurements() {
        let copy = 3.0e12;
        let mv = Measurement {
            family: "matvec",
            label: "4096 x 4096".into(),
            bytes: 1_500_000_000,
            flops: 0.0,
            seconds: 0.001,
        };
        assert_eq!(mv.bytes_per_s(), 1.5e12);
        let ceilings = Ceilings {
            copy_bytes_per_s: copy,
            bf16_flops_per_s: None,
        };
        let t = table("mat-vec", std::slice::from_ref(&mv), ceilings);
        assert!(
            t.contains("1500.0 GB/s") && t.contains("50.0% of copy"),
            "{t}"
        );
        let mm = Measurement {
            flops: matmul_flops(512, 4096, 4096),
            seconds: 1e-4,
            ..mv
        };
        assert!((mm.flops_per_s() - 171.8e12).abs() < 0.1e12);
        let t = table("mat-mat", std::slice::from_ref(&mm), ceilings);
        assert!(t.contains("171.8 TFLOP/s") && !t.contains("of bf16"), "{t}");
        let with_bf16 = Ceilings {
            bf16_flops_per_s: Some(790e12),
            ..ceilings
        };
        let t = table("mat-mat", &[mm], with_bf16);
        assert!(t.contains("171.8 TFLOP/s   21.7% of bf16"), "{t}");
    }

    /// The (rows, row length) of every matrix a model of synth preset `name` holds,
    /// stacked as a loaded model stacks them.
    fn preset_products(name: &str) -> Vec<(usize, usize)> {
        use kiln_models::forward::WeightDesc;
        let preset = kiln_gguf::synth::preset(name).unwrap();
        let config = preset.config().unwrap();
        let mut weights: std::collections::HashMap<String, WeightDesc> =
            kiln_gguf::synth::describe(&config, DType::Q4_0)
                .unwrap()
                .into_iter()
                .map(|t| {
                    let desc = WeightDesc {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    };
                    (t.name, desc)
                })
                .collect();
        kiln_models::model::stack_weights(&mut weights).unwrap();
        weights
            .values()
            .filter(|w| w.shape.len() == 2)
            .map(|w| (w.shape[0], w.shape[1]))
            .collect()
    }

    #[test]
    fn sample_logits_are_a_normal_row_of_scale_2() {
        let x = sample_logits(100_000);
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / x.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05,
            "{mean} {var}"
        );
        assert!(x.iter().all(|v| v.is_finite()));
        assert_eq!(sample_settings()[0].1.top_k, 40);
    }

    #[test]
    fn the_mat_vec_shapes_are_the_presets_decode_products() {
        let eight = preset_products("llama-3.1-8b");
        let one = preset_products("llama-3.2-1b");
        let qwen = preset_products("qwen3-8b");
        for shape in WEIGHT_SHAPES {
            assert!(
                [&eight, &one, &qwen].iter().any(|p| p.contains(&shape)),
                "{shape:?} is no preset's product"
            );
        }
        // Every product of the 8B decode step is measured.
        for shape in eight {
            assert!(WEIGHT_SHAPES.contains(&shape), "{shape:?} is not measured");
        }
        assert_eq!(KV_LENGTHS, [1024, 4096, 16384, 32768]);
        assert!(KV_PREFIXES.iter().all(|&(rows, cap)| rows < cap));
        assert_eq!(SAMPLE_VOCABS, [128_256, 151_936]);
        let s = decode_attention_shape(1024);
        assert_eq!((s.n_heads, s.n_kv_heads, s.head_dim), (32, 8, 128));
    }
}
