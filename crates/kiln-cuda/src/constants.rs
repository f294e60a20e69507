//! Constants that the dispatch code and the kernels share, written once: kernels see
//! them as `constants.cuh`, a header generated from this list and handed to NVRTC in
//! memory with the others ([`crate::family::headers`]).

use std::sync::OnceLock;

macro_rules! shared_constants {
    ($($(#[doc = $doc:expr])* $name:ident = $value:expr;)*) => {
        $($(#[doc = $doc])* pub const $name: u32 = $value;)*

        /// The text of `constants.cuh`: every constant as a `constexpr` of namespace
        /// `kiln`.
        fn header_text() -> String {
            let mut text = String::from(
                "// Generated from kiln-cuda/src/constants.rs: constants the dispatch code shares.\n\
                 #pragma once\nnamespace kiln {\n",
            );
            $(text.push_str(&format!("constexpr unsigned int {} = {}u;\n", stringify!($name), $name));)*
            text.push_str("}  // namespace kiln\n");
            text
        }
    };
}

shared_constants! {
    /// Threads per block of the staged and packed mat-vec kernels.
    MATVEC_THREADS = 256;
    /// Elements of each weight row a staged mat-vec block stages per tile.
    MATVEC_TILE_ELEMS = 8 * MATVEC_THREADS;
    /// Floats of padding after each unit's activations in a packed mat-vec block's
    /// shared memory.
    PACKED_PAD = 4;
    /// Threads per block of the mat-mat kernel, and the rows of x and of the weight of
    /// a block's output tile.
    MM_THREADS = 128;
    MM_BM = 64;
    MM_BN = 64;
    /// The 8-bit tensor-core product: warps per block, tiles of 16 weight rows per
    /// warp (each x fragment read from shared memory feeds one product per tile), the
    /// weight rows of a block, and the elements of k its tiles hold.
    MQ_WARPS = 4;
    MQ_ROW_TILES = 2;
    MQ_BN = 16 * MQ_ROW_TILES * MQ_WARPS;
    MQ_KT = 256;
    /// Threads of the one block that groups an expert-routed mat-mat's slots by expert.
    MOE_GROUP_THREADS = 1024;
    /// Warps per block of the flash-attention kernel (16 query rows each), cache rows
    /// per K and V tile for head dimensions up to 128 and for 256, and elements of
    /// padding after each row of a shared tile.
    FA_WARPS = 4;
    FA_TILE_ROWS = 64;
    FA_TILE_ROWS_WIDE = 32;
    FA_PAD = 8;
    /// The chunkwise gated delta rule: tokens per chunk (kiln_core's DELTA_NET_CHUNK),
    /// value columns of the state per block, warps per block, and floats of padding
    /// after each shared row of key-dimension or chunk length and after each row of
    /// value columns.
    DN_CHUNK = 64;
    DN_COLS = 32;
    DN_WARPS = 8;
    DN_PAD = 4;
    DN_COL_PAD = 8;
    /// The recurrent gated delta rule: warps per block (each block takes 32 value
    /// columns of a head), and rows of the state that each thread holds in registers
    /// (its warp's rows of the key dimension, every DN_REC_WARPS-th).
    DN_REC_WARPS = 8;
    DN_REC_ROWS = 16;
    /// Float4s of a row that each thread of a norm kernel holds in registers.
    NORM_VECTORS = 4;
    /// Float4s of the row that each thread of a resident mat-vec with a fused residual
    /// add and RMSNorm holds in registers.
    RESIDENT_NORM_VECTORS = 8;
    /// Rows of a gate-up product that a resident mat-vec with a fused Glu counts to
    /// one ticket: 32 gate rows and their 32 up rows, one Q8_1 block of the Glu.
    GLU_GROUP_ROWS = 64;
    /// Most products of one activation row that one resident mat-vec launch computes
    /// side by side (matvec.cu's SiblingRows).
    MAX_SIBLINGS = 4;
    /// Elements and bytes of a Q8_1 block (kiln_core's DType::Q8_1).
    Q8_1_BLOCK_ELEMS = 32;
    Q8_1_BLOCK_BYTES = 36;
}

/// The text of the generated `constants.cuh`: the constants above, then the layout of
/// each format stored as planes ([`packed_layouts`]).
pub fn header() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| header_text() + &packed_layouts())
}

/// `kiln::PackedLayout<TYPE>` for the GGUF type id of each dtype the backend stores as
/// planes: its planes ([`crate::packing::packed_planes`]: `PLANES`, `PLANE_FROM`,
/// `PLANE_LEN`) and its mat-vec unit (`UNIT_ELEMS`, `UNITS_IN_FLIGHT`, `GROUP_ELEMS`,
/// as the dispatch sizes shared memory for them), which quant.cuh's formats take.
fn packed_layouts() -> String {
    let mut text = String::from(
        "// Generated from kiln-cuda's packing and matmul modules: the layout of each \
         format stored as planes, by GGUF type id.\nnamespace kiln {\n\
         template <unsigned int TYPE>\nstruct PackedLayout;\n",
    );
    let list = |v: Vec<usize>| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for dtype in kiln_core::DType::ALL {
        let (Some(planes), Some(id)) = (crate::packing::packed_planes(dtype), dtype.gguf_type_id())
        else {
            continue;
        };
        let (unit, in_flight, group) = crate::ops::matmul::packed_unit(dtype);
        let n = planes.len();
        text.push_str(&format!(
            "template <>\nstruct PackedLayout<{id}u> {{  // {dtype}\n\
             \x20   static constexpr unsigned int PLANES = {n}u;\n\
             \x20   static constexpr unsigned int PLANE_FROM[{n}] = {{{}}};\n\
             \x20   static constexpr unsigned int PLANE_LEN[{n}] = {{{}}};\n\
             \x20   static constexpr unsigned int UNIT_ELEMS = {unit}u;\n\
             \x20   static constexpr unsigned int UNITS_IN_FLIGHT = {in_flight}u;\n\
             \x20   static constexpr unsigned int GROUP_ELEMS = {group}u;\n}};\n",
            list(planes.iter().map(|r| r.start).collect()),
            list(planes.iter().map(|r| r.len()).collect()),
        ));
    }
    text.push_str("}  // namespace kiln\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::DType;

    #[test]
    fn the_q8_1_block_is_kiln_core_s() {
        assert_eq!(Q8_1_BLOCK_ELEMS as usize, DType::Q8_1.block_size());
        assert_eq!(Q8_1_BLOCK_BYTES as usize, DType::Q8_1.block_bytes());
    }

    #[test]
    fn the_delta_rule_chunk_is_kiln_core_s() {
        assert_eq!(DN_CHUNK as usize, kiln_core::ops::DELTA_NET_CHUNK);
    }

    #[test]
    fn the_header_gives_each_packed_format_its_layout() {
        let text = header();
        assert!(text.contains(
            "struct PackedLayout<2u> {  // q4_0\n    static constexpr unsigned int PLANES = 2u;\n    \
             static constexpr unsigned int PLANE_FROM[2] = {2, 0};\n    \
             static constexpr unsigned int PLANE_LEN[2] = {16, 2};\n    \
             static constexpr unsigned int UNIT_ELEMS = 32u;\n    \
             static constexpr unsigned int UNITS_IN_FLIGHT = 4u;\n    \
             static constexpr unsigned int GROUP_ELEMS = 32u;\n};"
        ));
        let layouts = text.matches("struct PackedLayout<").count();
        let packed = DType::ALL
            .into_iter()
            .filter(|&d| crate::packing::is_packed(d))
            .count();
        assert_eq!(layouts, packed, "one layout per packed format");
    }

    #[test]
    fn the_header_declares_every_constant() {
        let text = header();
        assert!(text.contains("constexpr unsigned int MATVEC_TILE_ELEMS = 2048u;"));
        assert!(text.contains("constexpr unsigned int Q8_1_BLOCK_BYTES = 36u;"));
        assert!(text.starts_with("// Generated") && text.ends_with("}  // namespace kiln\n"));
    }
}
