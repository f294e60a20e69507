//! Element types: plain scalars and GGML's quantized block formats.

use crate::{Error, Result};

/// The type of a buffer's elements.
///
/// Scalar types hold one element in `block_bytes()` bytes. Quantized types (GGML's
/// block formats) pack `block_size()` elements into `block_bytes()` bytes; a row of a
/// quantized tensor must hold a whole number of blocks. The byte layout of each block
/// format is defined once, in [`crate::quant`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    U32,
    U8,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ4NL,
    Q1_0,
    Q2_0,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// Elements per super-block of the k-quant formats.
pub const QK_K: usize = 256;

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 24] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::U8,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q8_1,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::Q8K,
        DType::IQ4NL,
        DType::Q1_0,
        DType::Q2_0,
        DType::TQ1_0,
        DType::TQ2_0,
        DType::MXFP4,
    ];

    /// The GGML block formats, in declaration order.
    pub fn block_formats() -> impl Iterator<Item = DType> {
        DType::ALL.into_iter().filter(|d| d.is_quantized())
    }

    /// Elements per block: 1 for scalar types.
    pub const fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::I32 | DType::U32 | DType::U8 => 1,
            DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q8_0
            | DType::Q8_1
            | DType::IQ4NL
            | DType::MXFP4 => 32,
            DType::Q2_0 => 64,
            DType::Q1_0 => 128,
            DType::Q2K
            | DType::Q3K
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
            | DType::Q8K
            | DType::TQ1_0
            | DType::TQ2_0 => QK_K,
        }
    }

    /// Bytes per block (per element for scalar types), as ggml lays them out.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
            DType::Q4_0 => 2 + 16,
            DType::Q4_1 => 2 + 2 + 16,
            DType::Q5_0 => 2 + 4 + 16,
            DType::Q5_1 => 2 + 2 + 4 + 16,
            DType::Q8_0 => 2 + 32,
            DType::Q8_1 => 2 + 2 + 32,
            DType::Q2K => QK_K / 16 + QK_K / 4 + 2 + 2,
            DType::Q3K => QK_K / 8 + QK_K / 4 + 12 + 2,
            DType::Q4K => 2 + 2 + 12 + QK_K / 2,
            DType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            DType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            DType::Q8K => 4 + QK_K + 2 * QK_K / 16,
            DType::IQ4NL => 2 + 16,
            DType::Q1_0 => 2 + 128 / 8,
            DType::Q2_0 => 2 + 64 / 4,
            DType::TQ1_0 => (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2,
            DType::TQ2_0 => QK_K / 4 + 2,
            DType::MXFP4 => 1 + 32 / 2,
        }
    }

    /// Whether this is one of GGML's block formats.
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Whether this is a floating-point scalar type (F32, F16, BF16).
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The type id GGUF files use for this dtype; `None` for types GGUF has no id for.
    pub const fn gguf_type_id(self) -> Option<u32> {
        Some(match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q8_1 => 9,
            DType::Q2K => 10,
            DType::Q3K => 11,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::Q8K => 15,
            DType::IQ4NL => 20,
            DType::I32 => 26,
            DType::BF16 => 30,
            DType::TQ1_0 => 34,
            DType::TQ2_0 => 35,
            DType::MXFP4 => 39,
            DType::Q1_0 => 41,
            DType::Q2_0 => 42,
            DType::U32 | DType::U8 => return None,
        })
    }

    /// The dtype a GGUF type id names, if kiln knows it.
    pub fn from_gguf_type_id(id: u32) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.gguf_type_id() == Some(id))
    }

    /// Lower-case name as llama.cpp spells it (`f32`, `q4_0`, `q4_k`, `iq4_nl`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::U8 => "u8",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::Q8_1 => "q8_1",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::Q8K => "q8_k",
            DType::IQ4NL => "iq4_nl",
            DType::Q1_0 => "q1_0",
            DType::Q2_0 => "q2_0",
            DType::TQ1_0 => "tq1_0",
            DType::TQ2_0 => "tq2_0",
            DType::MXFP4 => "mxfp4",
        }
    }

    /// Parses a name as printed by [`DType::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Result<DType> {
        let lower = name.to_ascii_lowercase();
        DType::ALL
            .into_iter()
            .find(|d| d.name() == lower)
            .ok_or_else(|| {
                let known: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                Error::invalid(
                    "dtype",
                    format!("unknown dtype {name:?}; known: {}", known.join(", ")),
                )
            })
    }

    /// Bytes taken by `n` elements, which must be a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        let bs = self.block_size();
        if n % bs != 0 {
            return Err(Error::invalid(
                "dtype",
                format!(
                    "{n} elements of {} is not a whole number of {bs}-element blocks",
                    self.name()
                ),
            ));
        }
        (n / bs).checked_mul(self.block_bytes()).ok_or_else(|| {
            Error::invalid(
                "dtype",
                format!("{n} elements of {} overflow usize bytes", self.name()),
            )
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DType::from_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml_layouts() {
        // Sizes from ggml's block structs: scale fields plus packed quants.
        let expected = [
            (DType::Q4_0, 32, 18),
            (DType::Q4_1, 32, 20),
            (DType::Q5_0, 32, 22),
            (DType::Q5_1, 32, 24),
            (DType::Q8_0, 32, 34),
            (DType::Q8_1, 32, 36),
            (DType::Q2K, 256, 84),
            (DType::Q3K, 256, 110),
            (DType::Q4K, 256, 144),
            (DType::Q5K, 256, 176),
            (DType::Q6K, 256, 210),
            (DType::Q8K, 256, 292),
            (DType::IQ4NL, 32, 18),
            (DType::Q1_0, 128, 18),
            (DType::Q2_0, 64, 18),
            (DType::TQ1_0, 256, 54),
            (DType::TQ2_0, 256, 66),
            (DType::MXFP4, 32, 17),
        ];
        assert_eq!(DType::block_formats().count(), expected.len());
        for (d, bs, bytes) in expected {
            assert_eq!((d.block_size(), d.block_bytes()), (bs, bytes), "{d}");
        }
    }

    #[test]
    fn gguf_ids_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for d in DType::ALL {
            if let Some(id) = d.gguf_type_id() {
                assert!(seen.insert(id), "duplicate id {id}");
                assert_eq!(DType::from_gguf_type_id(id), Some(d));
            }
        }
        assert_eq!(DType::from_gguf_type_id(12), Some(DType::Q4K));
        assert_eq!(DType::from_gguf_type_id(30), Some(DType::BF16));
        assert_eq!(DType::from_gguf_type_id(34), Some(DType::TQ1_0));
        assert_eq!(DType::from_gguf_type_id(35), Some(DType::TQ2_0));
        assert_eq!(DType::from_gguf_type_id(39), Some(DType::MXFP4));
        assert_eq!(DType::from_gguf_type_id(41), Some(DType::Q1_0));
        assert_eq!(DType::from_gguf_type_id(42), Some(DType::Q2_0));
        assert_eq!(DType::from_gguf_type_id(40), None, "40 is NVFP4");
        assert_eq!(
            DType::from_gguf_type_id(4),
            None,
            "4 was Q4_2, removed from ggml"
        );
    }

    #[test]
    fn names_parse_back() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()).unwrap(), d);
        }
        assert_eq!("Q4_K".parse::<DType>().unwrap(), DType::Q4K);
        assert!(DType::from_name("q4_2").is_err());
    }

    #[test]
    fn bytes_for_rejects_partial_blocks() {
        assert_eq!(DType::Q4_0.bytes_for(64).unwrap(), 36);
        assert_eq!(DType::F16.bytes_for(3).unwrap(), 6);
        assert!(DType::Q4K.bytes_for(128).is_err());
    }
}
