//! Malformed GGUF: each case is a clear `Error::Format` (or `Unsupported` for valid
//! but unsupported files) naming the tensor or key, never a panic.

mod common;

use common::Raw;
use kiln_core::Error;
use kiln_gguf::{Array, Gguf, GgufWriter, Metadata, Value, ValueType};

/// Parses `bytes`, expecting a format error; returns its message.
fn format_error(bytes: &[u8]) -> String {
    match Gguf::from_bytes(bytes, "bad.gguf") {
        Err(e @ Error::Format { .. }) => e.to_string(),
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(g) => panic!("malformed file parsed: {:?}", g.tensor_infos()),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

/// A file with one f32 tensor "w" of `dims` at `offset`, `data_len` data bytes.
fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    Raw::header(3, 1, 0)
        .tensor("w", dims, type_id, offset)
        .pad_to(32)
        .data(data_len)
        .0
}

#[test]
fn truncated_file() {
    let full = one_tensor(&[4, 2], 0, 0, 32);
    let msg = format_error(&full[..full.len() - 1]);
    assert_mentions(
        &msg,
        &["bad.gguf", "tensor \"w\"", "past the end", "32 bytes"],
    );
    let msg = format_error(&full[..50]);
    assert_mentions(
        &msg,
        &["tensor \"w\"", "dimension needs 8 bytes at offset 45"],
    );
    let msg = format_error(&full[..30]);
    assert_mentions(
        &msg,
        &[
            "tensor count 1 needs at least 24 bytes",
            "only 6 bytes remain",
        ],
    );
    let msg = format_error(&full[..6]);
    assert_mentions(&msg, &["header", "version", "needs 4 bytes at offset 4"]);
    assert_mentions(&format_error(&[]), &["magic"]);
}

#[test]
fn empty_file_on_disk_is_a_format_error() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad_input_empty.gguf");
    std::fs::write(&path, b"").unwrap();
    let err = Gguf::open(&path).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(err.to_string().contains("bad_input_empty.gguf"), "{err}");
}

#[test]
fn a_directory_is_named_as_one() {
    let dir = std::env::temp_dir();
    let msg = Gguf::open(&dir).unwrap_err().to_string();
    assert_mentions(
        &msg,
        &[dir.to_str().unwrap(), "is a directory, not a GGUF file"],
    );
}

#[test]
fn tensor_offset_past_the_end() {
    let msg = format_error(&one_tensor(&[8], 0, 1 << 20, 32));
    assert_mentions(&msg, &["tensor \"w\"", "offset 1048576", "past the end"]);
    let msg = format_error(&one_tensor(&[8], 0, u64::MAX - 31, 32));
    assert_mentions(&msg, &["tensor \"w\"", "past the end"]);
}

#[test]
fn overlapping_tensor_data() {
    let bytes = Raw::header(3, 2, 0)
        .tensor("first", &[16], 0, 0)
        .tensor("second", &[16], 0, 32)
        .pad_to(32)
        .data(128)
        .0;
    let msg = format_error(&bytes);
    assert_mentions(
        &msg,
        &["tensor \"second\"", "overlaps tensor \"first\"", "[0, 64)"],
    );
}

#[test]
fn misaligned_tensor_data() {
    let msg = format_error(&one_tensor(&[2], 0, 4, 64));
    assert_mentions(&msg, &["tensor \"w\"", "offset 4", "alignment 32"]);
    // general.alignment = 64 makes offset 32 misaligned.
    let bytes = Raw::header(3, 1, 1)
        .kv("general.alignment", 4, &64u32.to_le_bytes())
        .tensor("w", &[2], 0, 32)
        .pad_to(64)
        .data(128)
        .0;
    assert_mentions(&format_error(&bytes), &["tensor \"w\"", "alignment 64"]);
}

#[test]
fn alignment_must_be_a_power_of_two_u32() {
    let bytes = Raw::header(3, 0, 1)
        .kv("general.alignment", 4, &24u32.to_le_bytes())
        .0;
    assert_mentions(
        &format_error(&bytes),
        &["general.alignment is 24", "power of two"],
    );
    let bytes = Raw::header(3, 0, 1)
        .kv("general.alignment", 8, &Raw::default().string("32").0)
        .0;
    assert_mentions(
        &format_error(&bytes),
        &["general.alignment", "found string"],
    );
}

#[test]
fn dims_whose_product_overflows() {
    let msg = format_error(&one_tensor(&[1 << 32, 1 << 32, 1 << 32], 0, 0, 32));
    assert_mentions(&msg, &["tensor \"w\"", "overflows"]);
    // The element count fits but the byte count does not.
    let msg = format_error(&one_tensor(&[1 << 62, 2], 0, 0, 32));
    assert_mentions(&msg, &["tensor \"w\"", "overflow"]);
}

#[test]
fn too_many_dims_and_partial_blocks() {
    let msg = format_error(&one_tensor(&[1, 1, 1, 1, 1], 0, 0, 32));
    assert_mentions(&msg, &["tensor \"w\"", "5 dimensions"]);
    let msg = format_error(&one_tensor(&[16, 2], 2, 0, 64));
    assert_mentions(&msg, &["tensor \"w\"", "row length 16", "q4_0"]);
}

#[test]
fn unknown_dtype_id() {
    let msg = format_error(&one_tensor(&[2], 99, 0, 32));
    assert_mentions(&msg, &["tensor \"w\"", "unknown ggml type id 99"]);
}

#[test]
fn array_length_larger_than_the_file() {
    let bytes = Raw::header(3, 0, 1)
        .kv(
            "tokenizer.ggml.scores",
            9,
            &Raw::default().u32(6).u64(1 << 40).0,
        )
        .bytes(&[0; 16])
        .0;
    let msg = format_error(&bytes);
    assert_mentions(
        &msg,
        &[
            "\"tokenizer.ggml.scores\"",
            "array length 1099511627776",
            "16 bytes remain",
        ],
    );
}

#[test]
fn string_length_larger_than_the_file() {
    let bytes = Raw::header(3, 0, 1)
        .kv("general.name", 8, &Raw::default().u64(u64::MAX).0)
        .bytes(b"abc")
        .0;
    let msg = format_error(&bytes);
    assert_mentions(
        &msg,
        &["\"general.name\"", "length 18446744073709551615", "3 bytes"],
    );
    // A key's own length.
    let bytes = Raw::header(3, 0, 1).u64(1000).bytes(b"general.name").0;
    assert_mentions(
        &format_error(&bytes),
        &["metadata entry 0", "key length 1000"],
    );
    // A tensor name's length.
    let bytes = Raw::header(3, 1, 0).u64(500).bytes(&[b'x'; 40]).0;
    assert_mentions(&format_error(&bytes), &["tensor info 0", "name length 500"]);
}

#[test]
fn non_utf8_strings() {
    let bytes = Raw::header(3, 0, 1)
        .kv(
            "general.name",
            8,
            &Raw::default().u64(2).bytes(&[0xc3, 0x28]).0,
        )
        .0;
    assert_mentions(&format_error(&bytes), &["\"general.name\"", "UTF-8"]);
    let bytes = Raw::header(3, 0, 1)
        .u64(2)
        .bytes(&[0xff, 0xfe])
        .u32(0)
        .bytes(&[1])
        .0;
    assert_mentions(&format_error(&bytes), &["metadata entry 0", "UTF-8"]);
    let bytes = Raw::header(3, 1, 0).u64(1).bytes(&[0x80]).bytes(&[0; 32]).0;
    assert_mentions(&format_error(&bytes), &["tensor info 0", "UTF-8"]);
}

#[test]
fn too_many_tensors_or_kv_pairs_for_the_file_size() {
    let msg = format_error(&Raw::header(3, 1 << 40, 0).data(100).0);
    assert_mentions(
        &msg,
        &[
            "tensor count 1099511627776",
            "100 bytes remain",
            "at most 4",
        ],
    );
    let msg = format_error(&Raw::header(3, 0, u64::MAX).data(26).0);
    assert_mentions(&msg, &["metadata count 18446744073709551615", "at most 2"]);
}

#[test]
fn bad_magic_and_versions() {
    let mut bytes = Raw::header(3, 0, 0).0;
    bytes[..4].copy_from_slice(b"GGML");
    assert_mentions(&format_error(&bytes), &["not a GGUF file"]);
    assert_mentions(
        &format_error(&Raw::header(7, 0, 0).0),
        &["unknown GGUF version 7"],
    );
    for (version, expected) in [(1u32, "version 1"), (3u32.swap_bytes(), "big-endian")] {
        match Gguf::from_bytes(Raw::header(version, 0, 0).0, "old.gguf") {
            Err(Error::Unsupported(msg)) => assert_mentions(&msg, &["old.gguf", expected]),
            other => panic!("version {version:#x}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let bytes = Raw::header(3, 0, 2).kv("k", 0, &[1]).kv("k", 0, &[2]).0;
    assert_mentions(&format_error(&bytes), &["\"k\"", "more than once"]);
    let bytes = Raw::header(3, 2, 0)
        .tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .pad_to(32)
        .data(64)
        .0;
    assert_mentions(&format_error(&bytes), &["tensor \"w\"", "infos 0 and 1"]);
}

#[test]
fn bad_value_types_bools_and_nesting() {
    let bytes = Raw::header(3, 0, 1).kv("k", 13, &[0; 8]).0;
    assert_mentions(
        &format_error(&bytes),
        &["\"k\"", "unknown value type id 13"],
    );
    let bytes = Raw::header(3, 0, 1).kv("flag", 7, &[2]).0;
    assert_mentions(&format_error(&bytes), &["\"flag\"", "bool byte is 2"]);
    let bytes = Raw::header(3, 0, 1)
        .kv("arr", 9, &Raw::default().u32(7).u64(3).bytes(&[1, 0, 9]).0)
        .0;
    assert_mentions(
        &format_error(&bytes),
        &["\"arr\"", "array item 2", "bool byte is 9"],
    );
    // Arrays nested 100 deep: each level is (item type Array, count 1).
    let mut deep = Raw::header(3, 0, 1).string("deep").u32(9);
    for _ in 0..100 {
        deep = deep.u32(9).u64(1);
    }
    let msg = format_error(&deep.u32(0).u64(0).0);
    assert_mentions(&msg, &["\"deep\"", "nested more than 8 deep"]);
}

#[test]
fn writer_refuses_metadata_readers_would_reject() {
    let mut v = Value::from(vec![1u8]);
    for _ in 0..8 {
        v = Array::new(ValueType::Array, vec![v]).unwrap().into();
    }
    let mut m = Metadata::new();
    m.set("deep", v);
    let err = GgufWriter::new(Vec::new(), "mem", &m, &[]).unwrap_err();
    assert!(
        err.to_string().contains("\"deep\": arrays nested 9 deep"),
        "{err}"
    );
}
