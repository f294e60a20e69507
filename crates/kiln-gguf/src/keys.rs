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
    /// The hidden width of the feed-forward block: u32.
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
}
