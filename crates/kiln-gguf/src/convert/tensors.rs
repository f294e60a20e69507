//! Which tensors a converted file holds: llama.cpp's names for the checkpoint's
//! tensors, their expected shapes, the q/k permutation of the `llama` architecture,
//! the experts' tensors stacked into one per projection, and the generated
//! `rope_freqs.weight` (each tensor's output type is
//! [`crate::quantize::TypePolicy`]'s).
//!
//! A checkpoint holds the text model under `model.`, or under
//! `model.language_model.` where it is a multimodal one (Qwen3.5's published
//! checkpoints, whose vision tower `model.visual.*` kiln does not convert); a mixture
//! of experts holds one tensor per expert and projection, or (Qwen3.5-MoE's published
//! checkpoints) each layer's experts stacked in `mlp.experts.gate_up_proj` and
//! `mlp.experts.down_proj` ([`Layout`]).

use super::config::{HfConfig, HfMoe, RopeScaling};
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
    /// The checkpoint tensor of this name, transformed as llama.cpp's converter does
    /// (the transforms applied in order).
    Transformed(String, Vec<Transform>),
}

/// A change llama.cpp's converter makes to a checkpoint tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// `1 + x`, rounded to the checkpoint's dtype: a zero-centred RMSNorm weight (the
    /// model multiplies by `1 + w`) as the multiplier itself (Qwen3-Next, Qwen3.5).
    AddOne,
    /// `-exp(x)`, rounded to the checkpoint's dtype: a linear-attention layer's
    /// `A_log` as its decay rate `ssm_a` (Qwen3-Next, Qwen3.5).
    NegExp,
    /// The output's rows (`rows.len()` equal parts of it) are these rows of the tensor
    /// (its elements in parts of the same length), in this order, bytes unchanged:
    /// Qwen3-Next's `in_proj_qkvz`, whose rows come per key head (`q, k, v, z` of
    /// each), as the fused `q, k, v` of all heads or the `z` of all; Qwen3.5's
    /// value heads, grouped by key head in the checkpoint, tiled
    /// ([`super::config::HfLinearAttention::value_heads`]); each expert's gate or up
    /// rows of a stacked `gate_up_proj`.
    Rows(Vec<usize>),
    /// Each row's elements (`cols.len()` of them) are these elements of the tensor's
    /// row, in this order, bytes unchanged: Qwen3.5's `out_proj`, whose columns are
    /// its value heads, tiled.
    Columns(Vec<usize>),
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
    /// What llama.cpp's converter does to the one checkpoint tensor's values, in order.
    transform: Vec<Transform>,
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

/// Where a checkpoint's tensors are, as their names show ([`Layout::of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The text model's prefix: `model.`, or `model.language_model.` in a multimodal
    /// checkpoint (whose `lm_head.weight` is at the top).
    prefix: &'static str,
    /// Whether each layer's experts are stacked: `mlp.experts.gate_up_proj`
    /// (`[n_expert, 2 n_ff_exp, hidden]`, each expert's gate rows then its up rows) and
    /// `mlp.experts.down_proj` (`[n_expert, hidden, n_ff_exp]`), rather than
    /// `mlp.experts.{e}.{gate,up,down}_proj.weight`.
    stacked_experts: bool,
}

impl Layout {
    /// A text model's checkpoint with a tensor per expert, as transformers saves one.
    pub(crate) const PLAIN: Layout = Layout {
        prefix: "model.",
        stacked_experts: false,
    };

    /// The layout of the checkpoint `weights`: multimodal where it has
    /// `model.language_model.embed_tokens.weight`, with stacked experts where its first
    /// layer has `mlp.experts.gate_up_proj`.
    pub(crate) fn of(weights: &Weights) -> Layout {
        let multimodal = "model.language_model.";
        let prefix = if weights
            .get(&format!("{multimodal}embed_tokens.weight"))
            .is_some()
        {
            multimodal
        } else {
            Layout::PLAIN.prefix
        };
        let stacked_experts = weights
            .get(&format!("{prefix}layers.0.mlp.experts.gate_up_proj"))
            .is_some();
        Layout {
            prefix,
            stacked_experts,
        }
    }
}

/// Checkpoint tensors that carry nothing the GGUF file of `arch`'s text model needs:
/// RoPE tables that older checkpoints saved, a hybrid model's multi-token-prediction
/// layer `mtp.*` (which kiln does not run) and a multimodal checkpoint's vision tower
/// `model.visual.*`.
fn is_ignored(arch: Arch, hf_name: &str) -> bool {
    hf_name.ends_with(".rotary_emb.inv_freq")
        || arch.is_hybrid() && hf_name.starts_with("mtp.")
        || arch.hf_multimodal_class().is_some() && hf_name.starts_with("model.visual.")
}

/// The output tensors, in write order: `token_embd`, `rope_freqs` (Llama 3 rope
/// scaling), each block's tensors, `output_norm`, `output`.
///
/// Fails if a required tensor is missing, any tensor has another shape than
/// config.json implies, or the checkpoint holds a tensor the architecture does not
/// have.
pub fn plan(config: &HfConfig, weights: &Weights) -> Result<Vec<PlannedTensor>> {
    let expected = expected_tensors(config, Layout::of(weights));
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
        let source = match e.hf.as_slice() {
            [one] if e.transform.is_empty() => Source::Checkpoint(one.clone()),
            [one] => Source::Transformed(one.clone(), e.transform.clone()),
            parts => Source::Stacked(parts.to_vec()),
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
        .filter(|n| {
            !is_ignored(config.arch, n) && !expected.iter().any(|e| e.hf.iter().any(|h| h == n))
        })
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
    for e in expected_tensors(config, Layout::PLAIN)
        .into_iter()
        .filter(|e| e.required)
    {
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

/// The tensors a checkpoint of `c` laid out as `layout` holds, in llama.cpp's write
/// order.
fn expected_tensors(c: &HfConfig, layout: Layout) -> Vec<Expected> {
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
            transform: Vec::new(),
        })
    };
    let prefix = layout.prefix;
    add(
        &mut list,
        vec![format!("{prefix}embed_tokens.weight")],
        "token_embd.weight".into(),
        vec![c.vocab_size, h],
        false,
        true,
    );
    let o_bias = c.attention_bias && !c.arch.has_qkv_bias();
    for i in 0..c.n_layers {
        let hf = |s: &str| format!("{prefix}layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        if c.arch.is_hybrid() {
            // Its own norms, projections and (in linear-attention layers)
            // transforms; the feed-forward below is llama's or qwen2moe's.
            hybrid_mixer(c, i, prefix, &mut list);
        }
        // A weight (`[rows, ..]`) and its optional bias (`[rows]`); with `experts`,
        // the tensors of experts `0..experts` (`{e}` in `hf_name`) stacked.
        let layer = |list: &mut Vec<Expected>,
                     hf_name: &str,
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
                list,
                names,
                gg(&format!("{gguf_name}.weight")),
                stacked_shape,
                permute,
                true,
            );
            if bias {
                add(
                    list,
                    vec![hf(&format!("{hf_name}.bias"))],
                    gg(&format!("{gguf_name}.bias")),
                    vec![shape[0]],
                    permute,
                    true,
                );
            }
        };
        if !c.arch.is_hybrid() {
            layer(
                &mut list,
                "input_layernorm",
                "attn_norm",
                vec![h],
                false,
                false,
                None,
            );
            let bias = c.attention_bias;
            layer(
                &mut list,
                "self_attn.q_proj",
                "attn_q",
                vec![q_dim, h],
                permute,
                bias,
                None,
            );
            layer(
                &mut list,
                "self_attn.k_proj",
                "attn_k",
                vec![kv_dim, h],
                permute,
                bias,
                None,
            );
            layer(
                &mut list,
                "self_attn.v_proj",
                "attn_v",
                vec![kv_dim, h],
                false,
                bias,
                None,
            );
            layer(
                &mut list,
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
                    &mut list,
                    "self_attn.q_norm",
                    "attn_q_norm",
                    vec![hd],
                    false,
                    false,
                    None,
                );
                layer(
                    &mut list,
                    "self_attn.k_norm",
                    "attn_k_norm",
                    vec![hd],
                    false,
                    false,
                    None,
                );
            }
            layer(
                &mut list,
                "post_attention_layernorm",
                "ffn_norm",
                vec![h],
                false,
                false,
                None,
            );
        }
        let Some(moe) = &c.moe else {
            // A dense model's config has intermediate_size (HfConfig::parse).
            if let Some(ff) = c.n_ff {
                let b = c.mlp_bias;
                layer(
                    &mut list,
                    "mlp.gate_proj",
                    "ffn_gate",
                    vec![ff, h],
                    false,
                    b,
                    None,
                );
                layer(
                    &mut list,
                    "mlp.up_proj",
                    "ffn_up",
                    vec![ff, h],
                    false,
                    b,
                    None,
                );
                layer(
                    &mut list,
                    "mlp.down_proj",
                    "ffn_down",
                    vec![h, ff],
                    false,
                    b,
                    None,
                );
            }
            continue;
        };
        let (n, ff) = (Some(moe.n_expert), moe.n_ff_exp);
        layer(
            &mut list,
            "mlp.gate",
            "ffn_gate_inp",
            vec![moe.n_expert, h],
            false,
            false,
            None,
        );
        if layout.stacked_experts {
            stacked_experts(moe, h, &hf, &gg, &mut list);
        } else {
            layer(
                &mut list,
                "mlp.experts.{e}.gate_proj",
                "ffn_gate_exps",
                vec![ff, h],
                false,
                false,
                n,
            );
            layer(
                &mut list,
                "mlp.experts.{e}.down_proj",
                "ffn_down_exps",
                vec![h, ff],
                false,
                false,
                n,
            );
            layer(
                &mut list,
                "mlp.experts.{e}.up_proj",
                "ffn_up_exps",
                vec![ff, h],
                false,
                false,
                n,
            );
        }
        if let Some(ff) = moe.n_ff_shexp {
            // A `[1, hidden]` linear layer, a `[hidden]` vector in llama.cpp's files.
            layer(
                &mut list,
                "mlp.shared_expert_gate",
                "ffn_gate_inp_shexp",
                vec![h],
                false,
                false,
                None,
            );
            layer(
                &mut list,
                "mlp.shared_expert.gate_proj",
                "ffn_gate_shexp",
                vec![ff, h],
                false,
                false,
                None,
            );
            layer(
                &mut list,
                "mlp.shared_expert.up_proj",
                "ffn_up_shexp",
                vec![ff, h],
                false,
                false,
                None,
            );
            layer(
                &mut list,
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
        vec![format!("{prefix}norm.weight")],
        "output_norm.weight".into(),
        vec![h],
        false,
        true,
    );
    if c.arch.is_hybrid() {
        if let Some(norm) = list.last_mut() {
            norm.transform = vec![Transform::AddOne];
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

/// The stacked experts of a layer (`hf(name)`, `gg(name)` its checkpoint and GGUF
/// names): `mlp.experts.gate_up_proj` split into `ffn_gate_exps` and `ffn_up_exps`,
/// `mlp.experts.down_proj` as `ffn_down_exps`.
fn stacked_experts(
    moe: &HfMoe,
    h: usize,
    hf: &dyn Fn(&str) -> String,
    gg: &dyn Fn(&str) -> String,
    list: &mut Vec<Expected>,
) {
    let (e, ff) = (moe.n_expert, moe.n_ff_exp);
    // Expert x's rows `offset..offset + ff` of its 2 ff.
    let half = |offset: usize| -> Vec<usize> {
        (0..e)
            .flat_map(|x| x * 2 * ff + offset..x * 2 * ff + offset + ff)
            .collect()
    };
    let gate_up = hf("mlp.experts.gate_up_proj");
    let parts = [
        ("ffn_gate_exps", vec![e, ff, h], Some(0)),
        ("ffn_down_exps", vec![e, h, ff], None),
        ("ffn_up_exps", vec![e, ff, h], Some(ff)),
    ];
    for (name, shape, offset) in parts {
        let (source, hf_shape, transform) = match offset {
            Some(offset) => (
                gate_up.clone(),
                Some(vec![e, 2 * ff, h]),
                vec![Transform::Rows(half(offset))],
            ),
            None => (hf("mlp.experts.down_proj"), None, Vec::new()),
        };
        list.push(Expected {
            hf: vec![source],
            gguf: gg(&format!("{name}.weight")),
            shape,
            permute: false,
            required: true,
            hf_shape,
            transform,
        });
    }
}

/// `[transform(order)]` ([`Transform::Rows`] or [`Transform::Columns`]), or nothing
/// where `order` keeps everything in place.
fn reorder(order: Vec<usize>, transform: fn(Vec<usize>) -> Transform) -> Vec<Transform> {
    if order.iter().enumerate().all(|(i, &o)| i == o) {
        Vec::new()
    } else {
        vec![transform(order)]
    }
}

/// The token mixer of a hybrid model's layer `i` (checkpoint names under `prefix`)
/// and its norms (the checkpoint's zero-centred norm weights stored plus one), as
/// llama.cpp's converter writes them: gated full attention (`attn_q` holds each head's
/// query and then its gate) or Gated DeltaNet linear attention, the convolution
/// without its middle axis and `A_log` as `ssm_a = -exp(A_log)`. Qwen3-Next's
/// `in_proj_qkvz` becomes the fused `attn_qkv` and the output gate `attn_gate`, its
/// `in_proj_ba` is kept as `ssm_ba`; Qwen3.5's separate projections become `attn_qkv`,
/// `attn_gate`, `ssm_beta` and `ssm_alpha`, with every per-value-head row, element
/// and (in `out_proj`) column tiled ([`HfLinearAttention::value_heads`]).
fn hybrid_mixer(c: &HfConfig, i: usize, prefix: &str, list: &mut Vec<Expected>) {
    let Some(lin) = &c.linear else {
        return;
    };
    let h = c.hidden;
    let mut add = |hf: &str,
                   gguf: &str,
                   shape: Vec<usize>,
                   hf_shape: Option<Vec<usize>>,
                   transform: Vec<Transform>| {
        list.push(Expected {
            hf: vec![format!("{prefix}layers.{i}.{hf}")],
            gguf: format!("blk.{i}.{gguf}"),
            shape,
            permute: false,
            required: true,
            hf_shape,
            transform,
        })
    };
    add(
        "input_layernorm.weight",
        "attn_norm.weight",
        vec![h],
        None,
        vec![Transform::AddOne],
    );
    let (dv, nv) = (lin.d_v, lin.n_v_heads);
    let conv_shape = Some(vec![lin.conv_dim(), 1, lin.conv_kernel]);
    if lin.is_linear(i) && c.arch.fuses_beta_alpha() {
        let (dk, r) = (lin.d_k, nv / lin.n_k_heads);
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
            vec![Transform::Rows(qkv)],
        );
        add(
            "linear_attn.in_proj_qkvz.weight",
            "attn_gate.weight",
            vec![lin.value_dim(), h],
            qkvz_shape,
            vec![Transform::Rows(z)],
        );
        add(
            "linear_attn.in_proj_ba.weight",
            "ssm_ba.weight",
            vec![2 * nv, h],
            None,
            Vec::new(),
        );
        add(
            "linear_attn.conv1d.weight",
            "ssm_conv1d.weight",
            vec![lin.conv_dim(), lin.conv_kernel],
            conv_shape,
            Vec::new(),
        );
        add(
            "linear_attn.dt_bias",
            "ssm_dt.bias",
            vec![nv],
            None,
            Vec::new(),
        );
        add(
            "linear_attn.A_log",
            "ssm_a",
            vec![nv],
            None,
            vec![Transform::NegExp],
        );
    } else if lin.is_linear(i) {
        // The q and k channels in place, then the value heads in GGUF's order.
        let qk = 2 * lin.key_dim();
        let channels: Vec<usize> = (0..qk)
            .chain(lin.value_elements(dv).into_iter().map(|v| qk + v))
            .collect();
        let per_head = lin.value_elements(1);
        add(
            "linear_attn.in_proj_qkv.weight",
            "attn_qkv.weight",
            vec![lin.conv_dim(), h],
            None,
            reorder(channels.clone(), Transform::Rows),
        );
        add(
            "linear_attn.in_proj_z.weight",
            "attn_gate.weight",
            vec![lin.value_dim(), h],
            None,
            reorder(lin.value_elements(dv), Transform::Rows),
        );
        add(
            "linear_attn.in_proj_b.weight",
            "ssm_beta.weight",
            vec![nv, h],
            None,
            reorder(per_head.clone(), Transform::Rows),
        );
        add(
            "linear_attn.in_proj_a.weight",
            "ssm_alpha.weight",
            vec![nv, h],
            None,
            reorder(per_head.clone(), Transform::Rows),
        );
        add(
            "linear_attn.conv1d.weight",
            "ssm_conv1d.weight",
            vec![lin.conv_dim(), lin.conv_kernel],
            conv_shape,
            reorder(channels, Transform::Rows),
        );
        add(
            "linear_attn.dt_bias",
            "ssm_dt.bias",
            vec![nv],
            None,
            reorder(per_head.clone(), Transform::Rows),
        );
        let mut decay = reorder(per_head, Transform::Rows);
        decay.push(Transform::NegExp);
        add("linear_attn.A_log", "ssm_a", vec![nv], None, decay);
    }
    if lin.is_linear(i) {
        add(
            "linear_attn.norm.weight",
            "ssm_norm.weight",
            vec![dv],
            None,
            Vec::new(),
        );
        add(
            "linear_attn.out_proj.weight",
            "ssm_out.weight",
            vec![h, lin.value_dim()],
            None,
            reorder(lin.value_elements(dv), Transform::Columns),
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
            Vec::new(),
        );
        add(
            "self_attn.k_proj.weight",
            "attn_k.weight",
            vec![kv_dim, h],
            None,
            Vec::new(),
        );
        add(
            "self_attn.v_proj.weight",
            "attn_v.weight",
            vec![kv_dim, h],
            None,
            Vec::new(),
        );
        add(
            "self_attn.o_proj.weight",
            "attn_output.weight",
            vec![h, q_dim],
            None,
            Vec::new(),
        );
        add(
            "self_attn.q_norm.weight",
            "attn_q_norm.weight",
            vec![hd],
            None,
            vec![Transform::AddOne],
        );
        add(
            "self_attn.k_norm.weight",
            "attn_k_norm.weight",
            vec![hd],
            None,
            vec![Transform::AddOne],
        );
    }
    add(
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
        vec![h],
        None,
        vec![Transform::AddOne],
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
