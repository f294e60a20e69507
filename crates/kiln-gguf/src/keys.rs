//! llama.cpp's metadata keys that kiln reads or writes.

/// The model architecture (`llama`, `qwen2`, ...; [`crate::Arch::name`]): string.
/// Architecture keys are prefixed with it ([`hparams`]).
pub const ARCHITECTURE: &str = "general.architecture";
/// What the file holds; llama.cpp's converter writes `model`: string.
pub const TYPE: &str = "general.type";
/// The model's name: string.
pub const NAME: &str = "general.name";
/// The alignment of tensor data in bytes, a power of two: u32.
pub const ALIGNMENT: &str = "general.alignment";
/// The file's predominant element type as llama.cpp's `llama_ftype`: u32 (see
/// [`crate::llama_file_type`]).
pub const FILE_TYPE: &str = "general.file_type";
/// The version of the block formats' layouts; llama.cpp writes 2: u32.
pub const QUANTIZATION_VERSION: &str = "general.quantization_version";

/// An architecture's hyperparameter keys, as the suffix after its name: the key in a
/// file is `{arch}.{suffix}` ([`crate::Arch::key`]), e.g. `llama.block_count`.
pub mod hparams {
    /// The number of transformer blocks: u32.
    pub const BLOCK_COUNT: &str = "block_count";
    /// The context length the model was trained for: u32.
    pub const CONTEXT_LENGTH: &str = "context_length";
    /// The width of the residual stream: u32.
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    /// The hidden width of the feed-forward block; a mixture of experts' file may lack
    /// it (llama.cpp writes it only where the checkpoint has `intermediate_size`, which
    /// Qwen3.5-MoE's lack): u32.
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    /// The number of attention (query) heads: u32.
    pub const HEAD_COUNT: &str = "attention.head_count";
    /// The number of key/value heads; the head count when absent: u32.
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    /// The width of a key head; `embedding_length / head_count` when absent: u32.
    pub const KEY_LENGTH: &str = "attention.key_length";
    /// The width of a value head: u32.
    pub const VALUE_LENGTH: &str = "attention.value_length";
    /// The RMSNorm epsilon: f32.
    pub const RMS_EPSILON: &str = "attention.layer_norm_rms_epsilon";
    /// The vocabulary size: u32.
    pub const VOCAB_SIZE: &str = "vocab_size";
    /// The RoPE base frequency; 10000 when absent: f32.
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    /// The rotated dimensions of a head; the head width when absent: u32.
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    /// A multi-section rotary embedding's rotated pairs per section (temporal, height,
    /// width, extra), interleaved: array of 4 i32. Qwen3.5's files have it (llama.cpp
    /// requires it); for text every section rotates by the token's position.
    pub const ROPE_DIMENSION_SECTIONS: &str = "rope.dimension_sections";
    /// How RoPE positions are scaled (`none`, `linear`, `yarn`): string.
    pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
    /// The RoPE scaling factor: f32.
    pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
    /// YaRN's original context length: u32.
    pub const ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH: &str = "rope.scaling.original_context_length";
    /// YaRN's extrapolation mix factor: f32.
    pub const ROPE_SCALING_YARN_EXT_FACTOR: &str = "rope.scaling.yarn_ext_factor";
    /// YaRN's attention magnitude factor: f32.
    pub const ROPE_SCALING_YARN_ATTN_FACTOR: &str = "rope.scaling.yarn_attn_factor";
    /// YaRN's high-frequency correction bound: f32.
    pub const ROPE_SCALING_YARN_BETA_FAST: &str = "rope.scaling.yarn_beta_fast";
    /// YaRN's low-frequency correction bound: f32.
    pub const ROPE_SCALING_YARN_BETA_SLOW: &str = "rope.scaling.yarn_beta_slow";
    /// The number of experts of a mixture-of-experts layer: u32.
    pub const EXPERT_COUNT: &str = "expert_count";
    /// The number of experts each token is routed to (top-k): u32.
    pub const EXPERT_USED_COUNT: &str = "expert_used_count";
    /// The hidden width of one expert's feed-forward; llama.cpp takes
    /// `feed_forward_length / expert_used_count` when absent: u32.
    pub const EXPERT_FEED_FORWARD_LENGTH: &str = "expert_feed_forward_length";
    /// The hidden width of the shared expert; llama.cpp takes `feed_forward_length`
    /// when absent: u32.
    pub const EXPERT_SHARED_FEED_FORWARD_LENGTH: &str = "expert_shared_feed_forward_length";
    /// Whether the top-k expert weights are renormalised to sum 1; the
    /// architecture's default when absent ([`crate::Arch::default_expert_weights_norm`]):
    /// bool.
    pub const EXPERT_WEIGHTS_NORM: &str = "expert_weights_norm";
    /// Taps of a linear-attention layer's causal convolution: u32.
    pub const SSM_CONV_KERNEL: &str = "ssm.conv_kernel";
    /// Elements of a linear-attention layer's value heads together
    /// (`n_v_heads * d_v`): u32.
    pub const SSM_INNER_SIZE: &str = "ssm.inner_size";
    /// Elements of one query/key (and, in Qwen3-Next and Qwen3.5, value) head of a
    /// linear-attention layer: u32.
    pub const SSM_STATE_SIZE: &str = "ssm.state_size";
    /// A linear-attention layer's value heads: u32.
    pub const SSM_TIME_STEP_RANK: &str = "ssm.time_step_rank";
    /// A linear-attention layer's query/key heads: u32.
    pub const SSM_GROUP_COUNT: &str = "ssm.group_count";
    /// Multi-token-prediction layers stored after the model's own layers and counted
    /// in `block_count` (llama.cpp's Qwen3.5 files may carry the checkpoint's one);
    /// 0 when absent: u32.
    pub const NEXTN_PREDICT_LAYERS: &str = "nextn_predict_layers";
    /// Every this many layers one is full attention (layers `i` with
    /// `(i + 1) % interval == 0`), the others linear attention; llama.cpp takes 4 when
    /// absent: u32.
    pub const FULL_ATTENTION_INTERVAL: &str = "full_attention_interval";
}

/// The tokenizer's keys (`tokenizer.ggml.*` and the chat template).
pub mod tokenizer {
    /// The tokenization algorithm: `gpt2` (byte-level BPE), `llama` (SentencePiece
    /// BPE), ...: string.
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// The pre-tokenizer of a byte-level BPE vocabulary (`llama-bpe`, `qwen2`, ...):
    /// string.
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// Every token's text, in id order: array of strings.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// Every token's type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte): array of i32.
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// Every token's score (SentencePiece merge priority): array of f32.
    pub const SCORES: &str = "tokenizer.ggml.scores";
    /// BPE merge rules, `"left right"`, highest priority first: array of strings.
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// Beginning of sequence: u32.
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    /// End of sequence: u32.
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    /// End of turn: u32.
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    /// End of message: u32.
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    /// Unknown token: u32.
    pub const UNKNOWN_ID: &str = "tokenizer.ggml.unknown_token_id";
    /// Separator (llama.cpp's spelling): u32.
    pub const SEPARATOR_ID: &str = "tokenizer.ggml.seperator_token_id";
    /// Padding: u32.
    pub const PADDING_ID: &str = "tokenizer.ggml.padding_token_id";
    /// Fill-in-the-middle prefix: u32.
    pub const FIM_PRE_ID: &str = "tokenizer.ggml.fim_pre_token_id";
    /// Fill-in-the-middle suffix: u32.
    pub const FIM_SUF_ID: &str = "tokenizer.ggml.fim_suf_token_id";
    /// Fill-in-the-middle middle: u32.
    pub const FIM_MID_ID: &str = "tokenizer.ggml.fim_mid_token_id";
    /// Fill-in-the-middle pad: u32.
    pub const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    /// Fill-in-the-middle repository name: u32.
    pub const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    /// Fill-in-the-middle file separator: u32.
    pub const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    /// Whether encoding with special tokens prepends BOS: bool.
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether encoding with special tokens appends EOS: bool.
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// Whether SentencePiece text gets a leading space: bool.
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    /// The Jinja chat template: string.
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}
