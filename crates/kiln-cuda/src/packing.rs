//! The CUDA backend's layout of quantized weights: each row's blocks split into planes.
//!
//! A GGUF row of a block format is `nb` blocks of `block_bytes` bytes, each holding
//! its scales and its quants side by side (Q4_0: an f16 scale, then 16 bytes of
//! nibbles). The mat-vec reads a row best when every thread loads 16 aligned bytes
//! of quants at a time, which the 18-byte Q4_0 block does not allow. So for the
//! formats of [`packed_planes`] the backend stores each row as planes: plane `p`
//! holds the bytes `ranges[p]` of every block of the row, block after block, and the
//! planes follow each other in order. A row keeps its size, so a buffer keeps its
//! size; only the bytes inside each row move. The CPU reference and the file format
//! stay the definition: [`unpack_rows`] gives back exactly the GGUF bytes.
//!
//! Kernels find block `b`'s entry of plane `p` at `row + nb * start(p) + b * len(p)`,
//! where `start(p)` is the sum of the lengths of the planes before `p` (`quant.cuh`'s
//! `plane_start` computes the same from this table, which the generated
//! `constants.cuh` hands the kernels as `PackedLayout`).
//!
//! The 1- and 2-bit formats of [`sliced_bits`] also reorder the bits of each 16 bytes
//! of their quants plane, so that the 4 quants of elements 4j .. 4j + 3 (a run, which
//! a kernel multiplies with one dp4a) sit at the same bits of the 4 bytes of one word:
//! one shift and one mask give the run, where GGUF's order (consecutive elements in
//! one byte) takes a multiply to spread them.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use kiln_core::{DType, Error, Result};

/// The GGUF byte ranges of one block that form each plane, in plane order, for the
/// dtypes the backend stores as planes; `None` for the others (kept as GGUF blocks).
/// The first plane is the quants; every plane's length is even.
pub fn packed_planes(dtype: DType) -> Option<&'static [Range<usize>]> {
    Some(match dtype {
        // qs[16] | d
        DType::Q4_0 => &[2..18, 0..2],
        // qs[16] | d, m
        DType::Q4_1 => &[4..20, 0..4],
        // qs[16] | qh | d
        DType::Q5_0 => &[6..22, 2..6, 0..2],
        // qs[16] | qh | d, m
        DType::Q5_1 => &[8..24, 4..8, 0..4],
        // qs[32] | d
        DType::Q8_0 => &[2..34, 0..2],
        // qs[128] | d, dmin, scales[12]
        DType::Q4K => &[16..144, 0..16],
        // qh[32], qs[128] | d, dmin, scales[12]
        DType::Q5K => &[16..176, 0..16],
        // ql[128], qh[64] | scales[16] | d
        DType::Q6K => &[0..192, 192..208, 208..210],
        // qs[16] | d
        DType::Q1_0 | DType::Q2_0 => &[2..18, 0..2],
        // qs[64] | d
        DType::TQ2_0 => &[0..64, 64..66],
        _ => return None,
    })
}

/// Bits per quant of the dtypes whose quants plane is bit-sliced: for `bits` bits
/// (P = 8 / bits quants per byte), element e of a 16-byte piece (GGUF: bits
/// `bits * (e % P)` of byte e / P) moves to bits `bits * (j % P)` of byte 4 (j / P) +
/// e % 4, j = e / 4 its run. `None` for the others.
pub fn sliced_bits(dtype: DType) -> Option<usize> {
    match dtype {
        DType::Q1_0 => Some(1),
        DType::Q2_0 => Some(2),
        _ => None,
    }
}

/// Moves the quants of one 16-byte piece between GGUF's order and the bit-sliced
/// order of [`sliced_bits`] (`to_sliced`), or back, element by element: the
/// definition that [`SliceTables`] computes faster.
fn slice_piece(bits: usize, piece: &[u8], to_sliced: bool) -> [u8; 16] {
    let per_byte = 8 / bits;
    let mask = (1u8 << bits) - 1;
    let mut out = [0u8; 16];
    for e in 0..16 * per_byte {
        let run = e / 4;
        let gguf = (e / per_byte, bits * (e % per_byte));
        let sliced = (4 * (run / per_byte) + e % 4, bits * (run % per_byte));
        let (from, to) = if to_sliced {
            (gguf, sliced)
        } else {
            (sliced, gguf)
        };
        out[to.0] |= ((piece[from.0] >> from.1) & mask) << to.1;
    }
    out
}

/// [`slice_piece`] as a permutation of the bits of each little-endian word (every
/// element stays in its word): `to_sliced[k][v]` is the bits of the reordered word
/// that byte k of value v gives, and `to_gguf` the same the other way.
struct SliceTables {
    to_sliced: [[u32; 256]; 4],
    to_gguf: [[u32; 256]; 4],
}

impl SliceTables {
    /// The tables for quants of `bits` bits, from [`slice_piece`] on each single bit.
    fn new(bits: usize) -> Self {
        let mut to_sliced = [[0u32; 256]; 4];
        let mut to_gguf = [[0u32; 256]; 4];
        for bit in 0..32 {
            let mut piece = [0u8; 16];
            piece[bit / 8] = 1 << (bit % 8);
            let sliced = u32::from_le_bytes(
                slice_piece(bits, &piece, true)[..4]
                    .try_into()
                    .unwrap_or_default(),
            );
            let there = sliced.trailing_zeros() as usize;
            for v in 0..256 {
                if v >> (bit % 8) & 1 == 1 {
                    to_sliced[bit / 8][v] |= 1 << there;
                }
                if v >> (there % 8) & 1 == 1 {
                    to_gguf[there / 8][v] |= 1 << bit;
                }
            }
        }
        SliceTables { to_sliced, to_gguf }
    }

    /// The tables for quants of `bits` bits (1 or 2), built once.
    fn get(bits: usize) -> &'static SliceTables {
        static ONE: OnceLock<SliceTables> = OnceLock::new();
        static TWO: OnceLock<SliceTables> = OnceLock::new();
        if bits == 1 {
            ONE.get_or_init(|| SliceTables::new(1))
        } else {
            TWO.get_or_init(|| SliceTables::new(2))
        }
    }

    /// Writes `from`'s words (whole 16-byte pieces) reordered into `to`.
    fn apply(&self, from: &[u8], to: &mut [u8], to_sliced: bool) {
        let table = if to_sliced {
            &self.to_sliced
        } else {
            &self.to_gguf
        };
        for (f, t) in from.chunks_exact(4).zip(to.chunks_exact_mut(4)) {
            let word = table[0][f[0] as usize]
                | table[1][f[1] as usize]
                | table[2][f[2] as usize]
                | table[3][f[3] as usize];
            t.copy_from_slice(&word.to_le_bytes());
        }
    }
}

/// Whether the backend stores `dtype` as planes.
pub fn is_packed(dtype: DType) -> bool {
    packed_planes(dtype).is_some()
}

/// Whether every plane of every row of `row_len` elements of `dtype` starts at a
/// multiple of 16 bytes (given a 16-byte aligned buffer), so that kernels may read
/// each plane with 16-byte loads. Always false for dtypes that are not packed.
pub fn planes_aligned(dtype: DType, row_len: usize) -> bool {
    let Some(planes) = packed_planes(dtype) else {
        return false;
    };
    let nb = row_len / dtype.block_size();
    let mut start = 0;
    for plane in planes {
        if (nb * start) % 16 != 0 {
            return false;
        }
        start += plane.len();
    }
    (nb * start) % 16 == 0
}

/// Checks that `bytes` bytes are whole rows of `row_len` elements of `dtype` and
/// returns the bytes of one row and of one block.
fn row_shape(dtype: DType, row_len: usize, bytes: usize) -> Result<(usize, usize)> {
    let what = "weight packing";
    if row_len == 0 || row_len % dtype.block_size() != 0 {
        return Err(Error::invalid(
            what,
            format!(
                "row length {row_len} is not a positive multiple of {dtype}'s block size {}",
                dtype.block_size()
            ),
        ));
    }
    let row_bytes = dtype.bytes_for(row_len)?;
    if bytes % row_bytes != 0 {
        return Err(Error::invalid(
            what,
            format!("{bytes} bytes are not whole rows of {row_bytes} bytes ({row_len} {dtype})"),
        ));
    }
    Ok((row_bytes, dtype.block_bytes()))
}

/// Moves each row's bytes between the GGUF order and the plane order: `to_planes`
/// copies block bytes into planes, otherwise planes back into blocks.
fn move_rows(dtype: DType, row_len: usize, src: &[u8], to_planes: bool) -> Result<Vec<u8>> {
    let Some(planes) = packed_planes(dtype) else {
        return Ok(src.to_vec());
    };
    let (row_bytes, block_bytes) = row_shape(dtype, row_len, src.len())?;
    let nb = row_len / dtype.block_size();
    let mut dst = vec![0u8; src.len()];
    // Rows move independently: on all cores, at least 64 KiB per task (a model's
    // weights are gigabytes, moved once at load).
    src.par_chunks_exact(row_bytes)
        .zip(dst.par_chunks_exact_mut(row_bytes))
        .with_min_len((64 * 1024 / row_bytes).max(1))
        .for_each(|(from, to)| move_row(dtype, planes, nb, block_bytes, from, to, to_planes));
    Ok(dst)
}

/// Moves one row of `nb` blocks of `block_bytes` between the GGUF order (`from` when
/// `to_planes`) and the planes `planes` of `dtype` (bit-sliced quants included).
fn move_row(
    dtype: DType,
    planes: &[Range<usize>],
    nb: usize,
    block_bytes: usize,
    from: &[u8],
    to: &mut [u8],
    to_planes: bool,
) {
    let mut plane_start = 0;
    for range in planes {
        // The first plane holds the quants.
        let sliced = sliced_bits(dtype)
            .filter(|_| plane_start == 0)
            .map(SliceTables::get);
        for b in 0..nb {
            let gguf = b * block_bytes + range.start..b * block_bytes + range.end;
            let plane = plane_start + b * range.len()..plane_start + (b + 1) * range.len();
            let (src, dst) = if to_planes {
                (gguf, plane)
            } else {
                (plane, gguf)
            };
            match sliced {
                Some(tables) => tables.apply(&from[src], &mut to[dst], to_planes),
                None => to[dst].copy_from_slice(&from[src]),
            }
        }
        plane_start += nb * range.len();
    }
}

/// The bytes of rows of `row_len` elements of `dtype` (GGUF layout) in the backend's
/// layout: planes for the dtypes of [`packed_planes`], unchanged for the others.
pub fn pack_rows(dtype: DType, row_len: usize, gguf: &[u8]) -> Result<Vec<u8>> {
    move_rows(dtype, row_len, gguf, true)
}

/// The inverse of [`pack_rows`]: the GGUF bytes of packed rows.
pub fn unpack_rows(dtype: DType, row_len: usize, packed: &[u8]) -> Result<Vec<u8>> {
    move_rows(dtype, row_len, packed, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_cover_each_block_once() {
        for dtype in DType::ALL {
            let Some(planes) = packed_planes(dtype) else {
                continue;
            };
            let mut covered = vec![0u32; dtype.block_bytes()];
            for r in planes {
                assert_eq!(r.len() % 2, 0, "{dtype} plane {r:?} has an odd length");
                for b in r.clone() {
                    covered[b] += 1;
                }
            }
            assert!(covered.iter().all(|&c| c == 1), "{dtype}: {covered:?}");
            assert_eq!(planes[0].len() % 16, 0, "{dtype}'s quants plane");
        }
    }

    /// Bytes that differ from block to block and byte to byte.
    fn numbered(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn rows_packed_together_are_the_rows_packed_one_by_one() {
        // Enough rows that the rows move in several parallel tasks.
        for dtype in DType::ALL.into_iter().filter(|d| is_packed(*d)) {
            let row_len = 3 * dtype.block_size();
            let row_bytes = dtype.bytes_for(row_len).unwrap();
            let gguf = numbered(4001 * row_bytes);
            let one_by_one: Vec<u8> = gguf
                .chunks(row_bytes)
                .flat_map(|row| pack_rows(dtype, row_len, row).unwrap())
                .collect();
            assert_eq!(
                pack_rows(dtype, row_len, &gguf).unwrap(),
                one_by_one,
                "{dtype}"
            );
        }
    }

    #[test]
    fn unpacking_gives_back_the_gguf_bytes() {
        for dtype in DType::ALL.into_iter().filter(|d| is_packed(*d)) {
            let row_len = 3 * dtype.block_size();
            let gguf = numbered(5 * dtype.bytes_for(row_len).unwrap());
            let packed = pack_rows(dtype, row_len, &gguf).unwrap();
            assert_ne!(packed, gguf, "{dtype}: packing moves bytes");
            assert_eq!(
                unpack_rows(dtype, row_len, &packed).unwrap(),
                gguf,
                "{dtype}"
            );
        }
    }

    #[test]
    fn a_q4_0_row_is_its_quants_then_its_scales() {
        let gguf = numbered(2 * 3 * 18);
        let packed = pack_rows(DType::Q4_0, 96, &gguf).unwrap();
        for row in 0..2 {
            let (g, p) = (&gguf[row * 54..][..54], &packed[row * 54..][..54]);
            for b in 0..3 {
                assert_eq!(p[16 * b..16 * b + 16], g[18 * b + 2..18 * b + 18], "qs {b}");
                assert_eq!(
                    p[48 + 2 * b..48 + 2 * b + 2],
                    g[18 * b..18 * b + 2],
                    "d {b}"
                );
            }
        }
    }

    #[test]
    fn q1_0_and_q2_0_quants_are_sliced_by_run() {
        // One Q1_0 block: only element 4 * 9 + 2 = 38 set (bit 6 of GGUF qs[4]). Its
        // run 9 is slot 1 of word 1, byte 2: bit 1 of plane byte 4 + 2.
        let mut gguf = vec![0u8; 18];
        gguf[2 + 4] = 1 << 6;
        let packed = pack_rows(DType::Q1_0, 128, &gguf).unwrap();
        let mut want = vec![0u8; 18];
        want[6] = 1 << 1;
        assert_eq!(packed, want);
        // One Q2_0 block: element 4 * 6 + 3 = 27 holds code 2 (bits 6-7 of GGUF qs[6]).
        // Run 6 is slot 2 of word 1, byte 3: bits 4-5 of plane byte 4 + 3.
        let mut gguf = vec![0u8; 18];
        gguf[2 + 6] = 2 << 6;
        let packed = pack_rows(DType::Q2_0, 64, &gguf).unwrap();
        let mut want = vec![0u8; 18];
        want[7] = 2 << 4;
        assert_eq!(packed, want);
    }

    #[test]
    fn the_slice_tables_reorder_as_the_definition_does() {
        for bits in [1, 2] {
            let tables = SliceTables::get(bits);
            for piece in numbered(16 * 40).chunks(16) {
                let mut sliced = [0u8; 16];
                tables.apply(piece, &mut sliced, true);
                assert_eq!(sliced, slice_piece(bits, piece, true), "{bits} bits");
                let mut back = [0u8; 16];
                tables.apply(&sliced, &mut back, false);
                assert_eq!(back, piece, "{bits} bits");
            }
        }
    }

    #[test]
    fn formats_kept_as_gguf_blocks_are_unchanged() {
        let gguf = numbered(4 * 110);
        assert!(!is_packed(DType::Q3K));
        assert_eq!(pack_rows(DType::Q3K, 512, &gguf).unwrap(), gguf);
    }

    #[test]
    fn bytes_that_are_not_whole_rows_are_rejected() {
        let e = pack_rows(DType::Q4_0, 64, &[0; 40])
            .unwrap_err()
            .to_string();
        assert!(e.contains("40 bytes are not whole rows of 36 bytes"), "{e}");
        let e = pack_rows(DType::Q4_0, 48, &[0; 36])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row length 48 is not a positive multiple of q4_0's block size 32"),
            "{e}"
        );
    }

    #[test]
    fn planes_align_when_every_plane_start_is_a_multiple_of_16() {
        // Q4_0 at 4096: 128 blocks, planes at 0 and 2048, rows of 2304 bytes.
        assert!(planes_aligned(DType::Q4_0, 4096));
        // 28 blocks: the scales plane starts at 448 but rows take 504 bytes.
        assert!(!planes_aligned(DType::Q4_0, 896));
        // Q6_K: planes at 0, 192 nb and 208 nb; 16 blocks give 3360-byte rows.
        assert!(planes_aligned(DType::Q6K, 4096));
        assert!(!planes_aligned(DType::Q6K, 256 * 57));
        assert!(!planes_aligned(DType::F16, 4096));
    }
}
