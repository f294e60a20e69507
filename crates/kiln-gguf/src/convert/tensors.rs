//! Which tensors a converted file holds: llama.cpp's names for the checkpoint's
//! tensors, their expected shapes, the q/k permutation of the `llama` architecture,
//! the experts' tensors stacked into one per projection, and the generated
//! `rope_freqs.weight` (each tensor's output type is
//! [`crate::quantize::TypePolicy`]'s).

use super::config::{HfConfig, RopeScaling};
use super::weights::Weights;
use crate::Arch;
use kiln_core::{Error, Result};

/// Where a tensor's values come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The checkpoint tensor of this name.
    Checkpoint(String),
    /// The checkpoint tensors of these names (of equal shape and dtype), one after
    /// another: the experts' `[rows, cols]` weights as one `[n_expert, rows, cols]`.
    Stacked(Vec<String>),
    /// Values computed by the converter, as little-endian f32 bytes.
    Generated(Vec<u8>),
    /// The checkpoint tensor of this name, transformed as llama.cpp's converter does.
    Transformed(String, Transform),
}

/// A change llama.cpp's converter makes to a checkpoint tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// `1 + x`, rounded to the checkpoint's dtype: a zero-centred RMSNorm weight (the
    /// model multiplies by `1 + w`) as the multiplier itself (Qwen3-Next).
    AddOne,
    /// `-exp(x)`, rounded to the checkpoint's dtype: a linear-attention layer's
    /// `A_log` as its decay rate `ssm_a` (Qwen3-Next).
    NegExp,
    /// These rows of the checkpoint's `[rows, cols]` tensor, in this order, bytes
    /// unchanged: Qwen3-Next's `in_proj_qkvz`, whose rows come per key head
    /// (`q, k, v, z` of each), as the fused `q, k, v` of all heads or the `z` of all.
    Rows(Vec<usize>),
}

/// One tensor of the output file.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// llama.cpp's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape, as in the checkpoint.
    pub shape: Vec<usize>,
    pub source: Source,
    /// For the `llama` architecture's q and k projections: the rows per head, whose
    /// order the conversion permutes (see [`crate::quantize::permute_rope_rows`]).
    pub permute_head_rows: Option<usize>,
}

/// A tensor the checkpoint must (or may) hold: one checkpoint tensor, or several
/// stacked along a new first dimension (`shape[0]` of them, each of `shape[1..]`).
struct Expected {
    hf: Vec<String>,
    gguf: String,
    shape: Vec<usize>,
    permute: bool,
    required: bool,
    /// The checkpoint tensor's shape where it is not the output's (nor stacked).
    hf_shape: Option<Vec<usize>>,
    transform: Option<Transform>,
}

impl Expected {
    /// The checkpoint's shape of each part: the stacked shape less its first
    /// dimension, or the shape of the one tensor. llama.cpp stores the shared
    /// expert's gate, a `[1, hidden]` linear layer in the checkpoint, as `[hidden]`.
    fn part_shape(&self) -> Vec<usize> {
        if let Some(shape) = &self.hf_shape {
            shape.clone()
        } else if self.hf.len() > 1 {
            self.shape[1..].to_vec()
        } else if self.gguf.ends_with("ffn_gate_inp_shexp.weight") {
            [&[1][..], &self.shape].concat()
        } else {
            self.shape.clone()
        }
    }
}

/// Checkpoint tensors that carry nothing a GGUF file needs (RoPE tables that older
/// checkpoints saved).
fn is_ignored(hf_name: &str) -> bool {
    hf_name.ends_with(".rotary_emb.inv_freq")
}

/// The output tensors, in write order: `token_embd`, `rope_freqs` (Llama 3 rope
/// scaling), each block's tensors, `output_norm`, `output`.
///
/// Fails if a required tensor is missing, any tensor has another shape than
/// config.json implies, or the checkpoint holds a tensor the architecture does not
/// have.
pub fn plan(config: &HfConfig, weights: &Weights) -> Result<Vec<PlannedTensor>> {
    let expected = expected_tensors(config);
    let mut planned = Vec::with_capacity(expected.len() + 1);
    for e in &expected {
        if !e.required && weights.get(&e.hf[0]).is_none() {
            continue;
        }
        let part_shape = e.part_shape();
        let mut dtypes = Vec::with_capacity(e.hf.len());
        for hf in &e.hf {
            let Some(tensor) = weights.get(hf) else {
                return Err(Error::format(
                    "checkpoint",
                    format!(
                        "tensor {hf:?} is missing (config.json describes a {} model)",
                        config.arch.name()
                    ),
                ));
            };
            if tensor.shape != part_shape {
                return Err(Error::format(
                    format!("tensor {hf:?}"),
                    format!(
                        "shape {:?}, but config.json implies {part_shape:?}",
                        tensor.shape
                    ),
                ));
            }
            dtypes.push(tensor.kiln_dtype(hf)?);
        }
        if let Some(i) = dtypes.iter().position(|&d| d != dtypes[0]) {
            return Err(Error::format(
                format!("tensor {:?}", e.hf[i]),
                format!(
                    "dtype {}, but {:?}, stacked with it into {}, is {}",
                    dtypes[i], e.hf[0], e.gguf, dtypes[0]
                ),
            ));
        }
        let source = match (e.hf.as_slice(), &e.transform) {
            ([one], Some(t)) => Source::Transformed(one.clone(), t.clone()),
            ([one], None) => Source::Checkpoint(one.clone()),
            (parts, _) => Source::Stacked(parts.to_vec()),
        };
        planned.push(PlannedTensor {
            name: e.gguf.clone(),
            shape: e.shape.clone(),
            source,
            permute_head_rows: e.permute.then_some(config.head_dim),
        });
        if e.gguf == "token_embd.weight" {
            if let Some(freqs) = rope_freqs(config)? {
                planned.push(freqs);
            }
        }
    }
    let mut unexpected: Vec<&str> = weights
        .names()
        .filter(|n| !is_ignored(n) && !expected.iter().any(|e| e.hf.iter().any(|h| h == n)))
        .collect();
    unexpected.sort_unstable();
    if let Some(first) = unexpected.first() {
        return Err(Error::Unsupported(format!(
            "tensor {first:?} ({} unexpected tensors in all) is not part of a {} model as kiln convert knows it",
            unexpected.len(),
            config.arch.name()
        )));
    }
    Ok(planned)
}

/// A tensor of a model made without a checkpoint: llama.cpp's name, row-major shape,
/// and the values (little-endian f32) where they are computed rather than drawn.
pub(crate) struct ModelTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub fixed: Option<Vec<u8>>,
}

/// The tensors a model of `config` holds, in write order, as [`plan`] would produce
/// them from a complete checkpoint (`rope_freqs.weight` after `token_embd.weight`).
pub(crate) fn model_tensors(config: &HfConfig) -> Result<Vec<ModelTensor>> {
    let mut list = Vec::new();
    for e in expected_tensors(config).into_iter().filter(|e| e.required) {
        let is_embedding = e.gguf == "token_embd.weight";
        list.push(ModelTensor {
            name: e.gguf,
            shape: e.shape,
            fixed: None,
        });
        if is_embedding {
            if let Some(freqs) = rope_freqs(config)? {
                let Source::Generated(values) = freqs.source else {
                    unreachable!("rope_freqs computes its values")
                };
                list.push(ModelTensor {
                    name: freqs.name,
                    shape: freqs.shape,
                    fixed: Some(values),
                });
            }
        }
    }
    Ok(list)
}

/// The tensors a checkpoint of `c` holds, in llama.cpp's write order.
fn expected_tensors(c: &HfConfig) -> Vec<Expected> {
    let (h, q_dim, kv_dim) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let permute = c.arch == Arch::Llama;
    let mut list = Vec::new();
    let add = |list: &mut Vec<Expected>,
               hf: Vec<String>,
               gguf: String,
               shape: Vec<usize>,
               permute: bool,
               required: bool| {
        list.push(Expected {
            hf,
            gguf,
            shape,
            permute,
            required,
            hf_shape: None,
            transform: None,
        })
    };
    add(
        &mut list,
        vec!["model.embed_tokens.weight".into()],
        "token_embd.weight".into(),
        vec![c.vocab_size, h],
        false,
        true,
    );
    let o_bias = c.attention_bias && !c.arch.has_qkv_bias();
    for i in 0..c.n_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        if c.arch == Arch::Qwen3Next {
            // Its own norms, projections and (in linear-attention layers)
            // transforms; the mixture of experts below is qwen2moe's.
            next_attention(c, i, &mut list);
        }
        // A weight (`[rows, ..]`) and its optional bias (`[rows]`); with `experts`,
        // the tensors of experts `0..experts` (`{e}` in `hf_name`) stacked.
        let mut layer = |hf_name: &str,
                         gguf_name: &str,
                         shape: Vec<usize>,
                         permute: bool,
                         bias: bool,
                         experts: Option<usize>| {
            let weight = |e: usize| hf(&format!("{hf_name}.weight").replace("{e}", &e.to_string()));
            let (names, stacked_shape) = match experts {
                Some(n) => ((0..n).map(weight).collect(), [&[n][..], &shape].concat()),
                None => (vec![weight(0)], shape.clone()),
            };
            add(
                &mut list,
                names,
                gg(&format!("{gguf_name}.weight")),
                stacked_shape,
                permute,
                true,
            );
            if bias {
                add(
                    &mut list,
                    vec![hf(&format!("{hf_name}.bias"))],
                    gg(&format!("{gguf_name}.bias")),
                    vec![shape[0]],
                    permute,
                    true,
                );
            }
        };
        if c.arch != Arch::Qwen3Next {
            layer("input_layernorm", "attn_norm", vec![h], false, false, None);
            let bias = c.attention_bias;
            layer(
                "self_attn.q_proj",
                "attn_q",
                vec![q_dim, h],
                permute,
                bias,
                None,
            );
            layer(
                "self_attn.k_proj",
                "attn_k",
                vec![kv_dim, h],
                permute,
                bias,
                None,
            );
            layer(
                "self_attn.v_proj",
                "attn_v",
                vec![kv_dim, h],
                false,
                bias,
                None,
            );
            layer(
                "self_attn.o_proj",
                "attn_output",
                vec![h, q_dim],
                false,
                o_bias,
                None,
            );
            if c.arch.has_qk_norm() {
                let hd = c.head_dim;
                layer(
                    "self_attn.q_norm",
                    "attn_q_norm",
                    vec![hd],
                    false,
                    false,
                    None,
                );
                layer(
                    "self_attn.k_norm",
                    "attn_k_norm",
                    vec![hd],
                    false,
                    false,
                    None,
                );
            }
            layer(
                "post_attention_layernorm",
                "ffn_norm",
                vec![h],
                false,
                false,
                None,
            );
        }
        let Some(moe) = &c.moe else {
            let (ff, b) = (c.n_ff, c.mlp_bias);
            layer("mlp.gate_proj", "ffn_gate", vec![ff, h], false, b, None);
            layer("mlp.up_proj", "ffn_up", vec![ff, h], false, b, None);
            layer("mlp.down_proj", "ffn_down", vec![h, ff], false, b, None);
            continue;
        };
        let (n, ff) = (Some(moe.n_expert), moe.n_ff_exp);
        layer(
            "mlp.gate",
            "ffn_gate_inp",
            vec![moe.n_expert, h],
            false,
            false,
            None,
        );
        layer(
            "mlp.experts.{e}.gate_proj",
            "ffn_gate_exps",
            vec![ff, h],
            false,
            false,
            n,
        );
        layer(
            "mlp.experts.{e}.down_proj",
            "ffn_down_exps",
            vec![h, ff],
            false,
            false,
            n,
        );
        layer(
            "mlp.experts.{e}.up_proj",
            "ffn_up_exps",
            vec![ff, h],
            false,
            false,
            n,
        );
        if let Some(ff) = moe.n_ff_shexp {
            // A `[1, hidden]` linear layer, a `[hidden]` vector in llama.cpp's files.
            layer(
                "mlp.shared_expert_gate",
                "ffn_gate_inp_shexp",
                vec![h],
                false,
                false,
                None,
            );
            layer(
                "mlp.shared_expert.gate_proj",
                "ffn_gate_shexp",
                vec![ff, h],
                false,
                false,
                None,
            );
            layer(
                "mlp.shared_expert.up_proj",
                "ffn_up_shexp",
                vec![ff, h],
                false,
                false,
                None,
            );
            layer(
                "mlp.shared_expert.down_proj",
                "ffn_down_shexp",
                vec![h, ff],
                false,
                false,
                None,
            );
        }
    }
    add(
        &mut list,
        vec!["model.norm.weight".into()],
        "output_norm.weight".into(),
        vec![h],
        false,
        true,
    );
    if c.arch == Arch::Qwen3Next {
        if let Some(norm) = list.last_mut() {
            norm.transform = Some(Transform::AddOne);
        }
    }
    add(
        &mut list,
        vec!["lm_head.weight".into()],
        "output.weight".into(),
        vec![c.vocab_size, h],
        false,
        !c.tied_embeddings,
    );
    list
}

/// The attention tensors of Qwen3-Next's layer `i` and its norms (the checkpoint's
/// zero-centred norm weights stored plus one), as llama.cpp's converter writes them:
/// gated full attention (`attn_q` holds each head's query and then its gate) or
/// Gated DeltaNet linear attention (`in_proj_qkvz` split into the fused `attn_qkv`
/// and the output gate `attn_gate`, `in_proj_ba` kept as `ssm_ba`, the
/// convolution's middle axis dropped, `A_log` as `ssm_a = -exp(A_log)`).
fn next_attention(c: &HfConfig, i: usize, list: &mut Vec<Expected>) {
    let Some(lin) = &c.linear else {
        return;
    };
    let h = c.hidden;
    let mut add = |hf: &str,
                   gguf: &str,
                   shape: Vec<usize>,
                   hf_shape: Option<Vec<usize>>,
                   t: Option<Transform>| {
        list.push(Expected {
            hf: vec![format!("model.layers.{i}.{hf}")],
            gguf: format!("blk.{i}.{gguf}"),
            shape,
            permute: false,
            required: true,
            hf_shape,
            transform: t,
        })
    };
    add(
        "input_layernorm.weight",
        "attn_norm.weight",
        vec![h],
        None,
        Some(Transform::AddOne),
    );
    if lin.is_linear(i) {
        let (dk, dv, r) = (lin.d_k, lin.d_v, lin.n_v_heads / lin.n_k_heads);
        // Rows of one key head's block: q (dk), k (dk), v (r dv), z (r dv).
        let block = 2 * dk + 2 * r * dv;
        let rows = |offset: usize, len: usize| -> Vec<usize> {
            (0..lin.n_k_heads)
                .flat_map(|g| (0..len).map(move |j| g * block + offset + j))
                .collect()
        };
        let qkv = [rows(0, dk), rows(dk, dk), rows(2 * dk, r * dv)].concat();
        let z = rows(2 * dk + r * dv, r * dv);
        let qkvz_shape = Some(vec![lin.n_k_heads * block, h]);
        add(
            "linear_attn.in_proj_qkvz.weight",
            "attn_qkv.weight",
            vec![lin.conv_dim(), h],
            qkvz_shape.clone(),
            Some(Transform::Rows(qkv)),
        );
        add(
            "linear_attn.in_proj_qkvz.weight",
            "attn_gate.weight",
            vec![lin.value_dim(), h],
            qkvz_shape,
            Some(Transform::Rows(z)),
        );
        add(
            "linear_attn.in_proj_ba.weight",
            "ssm_ba.weight",
            vec![2 * lin.n_v_heads, h],
            None,
            None,
        );
        add(
            "linear_attn.conv1d.weight",
            "ssm_conv1d.weight",
            vec![lin.conv_dim(), lin.conv_kernel],
            Some(vec![lin.conv_dim(), 1, lin.conv_kernel]),
            None,
        );
        add(
            "linear_attn.dt_bias",
            "ssm_dt.bias",
            vec![lin.n_v_heads],
            None,
            None,
        );
        add(
            "linear_attn.A_log",
            "ssm_a",
            vec![lin.n_v_heads],
            None,
            Some(Transform::NegExp),
        );
        add(
            "linear_attn.norm.weight",
            "ssm_norm.weight",
            vec![dv],
            None,
            None,
        );
        add(
            "linear_attn.out_proj.weight",
            "ssm_out.weight",
            vec![h, lin.value_dim()],
            None,
            None,
        );
    } else {
        let (q_dim, kv_dim, hd) = (
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
            c.head_dim,
        );
        // Each head's query rows, then its gate's.
        add(
            "self_attn.q_proj.weight",
            "attn_q.weight",
            vec![2 * q_dim, h],
            None,
            None,
        );
        add(
            "self_attn.k_proj.weight",
            "attn_k.weight",
            vec![kv_dim, h],
            None,
            None,
        );
        add(
            "self_attn.v_proj.weight",
            "attn_v.weight",
            vec![kv_dim, h],
            None,
            None,
        );
        add(
            "self_attn.o_proj.weight",
            "attn_output.weight",
            vec![h, q_dim],
            None,
            None,
        );
        add(
            "self_attn.q_norm.weight",
            "attn_q_norm.weight",
            vec![hd],
            None,
            Some(Transform::AddOne),
        );
        add(
            "self_attn.k_norm.weight",
            "attn_k_norm.weight",
            vec![hd],
            None,
            Some(Transform::AddOne),
        );
    }
    add(
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
        vec![h],
        None,
        Some(Transform::AddOne),
    );
}

/// Llama 3.1's rope scaling as the `rope_freqs.weight` tensor: one factor per
/// rotated pair, dividing that pair's frequency, computed as llama.cpp's converter
/// does (frequencies in f32, `2π / freq` wavelengths against the original context).
fn rope_freqs(c: &HfConfig) -> Result<Option<PlannedTensor>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_context,
    } = c.rope_scaling
    else {
        return Ok(None);
    };
    if low_freq_factor == high_freq_factor {
        return Err(Error::format(
            "config.json rope scaling",
            format!("llama3 low_freq_factor and high_freq_factor are both {low_freq_factor}"),
        ));
    }
    let base = c.rope_theta.unwrap_or(10_000.0) as f32;
    let dim = c.head_dim;
    let old_context = original_context as f64;
    let low_freq_wavelen = old_context / low_freq_factor;
    let high_freq_wavelen = old_context / high_freq_factor;
    let factors = (0..dim / 2)
        .map(|i| {
            let freq = 1.0f32 / base.powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let f = if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor
            } else {
                let smooth = (old_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect::<Vec<f32>>();
    Ok(Some(PlannedTensor {
        name: "rope_freqs.weight".into(),
        shape: vec![factors.len()],
        source: Source::Generated(factors.iter().flat_map(|f| f.to_le_bytes()).collect()),
        permute_head_rows: None,
    }))
}
