//! Write -> read round trips: every metadata type, tensors of several dtypes and
//! shapes, alignment, chunked writes, memory-mapped reading, version 2.

mod common;

use common::{every_type_metadata, pattern_bytes, sample_file, sample_tensors, Raw};
use kiln_core::DType;
use kiln_gguf::{keys, Gguf, GgufWriter, Metadata, TensorDesc, Value, ValueType};

#[test]
fn every_metadata_type_reads_back_equal() {
    let bytes = sample_file();
    let g = Gguf::from_bytes(&bytes[..], "sample").unwrap();
    let written = every_type_metadata();
    assert_eq!(g.version(), 3);
    assert_eq!(g.metadata().len(), written.len());
    for ((k_read, v_read), (k_written, v_written)) in g.metadata().iter().zip(written.iter()) {
        assert_eq!((k_read, v_read), (k_written, v_written));
    }
    let m = g.metadata();
    assert_eq!(m.get("t.i64"), Some(&Value::I64(i64::MIN + 1)));
    assert_eq!(m.get_str("t.string").unwrap(), "héllo, ▁wörld");
    assert_eq!(m.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(
        m.get_u64("t.u16").unwrap(),
        60000,
        "lossless integer widening"
    );
    assert!(m.get_bool("t.bool.true").unwrap());
    let nested = m.get_array("t.array.nested2").unwrap();
    assert_eq!(nested.item_type(), ValueType::Array);
    let Some(Value::Array(level1)) = nested.get(0) else {
        panic!("nested2[0] is not an array: {:?}", nested.get(0));
    };
    assert_eq!(level1.get(0), Some(Value::from(vec![1i32, 2])));
    assert_eq!(level1.get(1), Some(Value::from(Vec::<i32>::new())));
    assert_eq!(level1.get(2), Some(Value::from(vec!["a".to_owned()])));
    assert_eq!(level1.get(3), None);
    assert_eq!(
        m.get_array("t.array.empty").unwrap().item_type(),
        ValueType::U32
    );
}

#[test]
fn tensors_read_back_with_dtype_shape_and_bytes() {
    let bytes = sample_file();
    let g = Gguf::from_bytes(bytes, "sample").unwrap();
    let descs = sample_tensors();
    assert_eq!(g.tensor_infos().len(), descs.len());
    for (i, (view, desc)) in g.tensors().zip(&descs).enumerate() {
        assert_eq!(view.info.name(), desc.name);
        assert_eq!(view.info.dtype(), desc.dtype);
        assert_eq!(view.info.shape(), desc.shape.as_slice());
        let reversed: Vec<u64> = desc.shape.iter().rev().map(|&d| d as u64).collect();
        assert_eq!(view.info.gguf_dims(), reversed.as_slice());
        assert_eq!(view.info.offset() % g.alignment(), 0);
        assert_eq!(
            view.data,
            pattern_bytes(view.data.len(), i as u8).as_slice()
        );
    }
    let q = g.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!(q.info.gguf_dims(), [64, 3]);
    assert_eq!(
        q.data.len(),
        3 * 2 * 18,
        "3 rows of two 18-byte q4_0 blocks"
    );
    assert_eq!(g.tensor("scalar").unwrap().data.len(), 4);
    assert!(g.tensor("empty").unwrap().data.is_empty());
    let err = g.tensor("nope").unwrap_err().to_string();
    assert!(err.contains("\"nope\""), "{err}");
}

#[test]
fn float_tensors_dequantize_to_the_values_written() {
    let values = [1.0f32, -2.5, 3.25, 0.0078125, -1024.0, 7.0];
    let f16_bits: Vec<u8> = [0x3c00u16, 0xc100, 0x4280, 0x2000, 0xe400, 0x4700]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let descs = [
        TensorDesc::new("a", DType::F32, &[2, 3]),
        TensorDesc::new("b", DType::F16, &[3, 2]),
    ];
    let mut w = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &descs).unwrap();
    w.write_tensor_data(&f32_bytes).unwrap();
    w.write_tensor_data(&f16_bits).unwrap();
    let g = Gguf::from_bytes(w.finish().unwrap(), "mem").unwrap();
    assert_eq!(g.tensor("a").unwrap().to_f32().unwrap(), values);
    assert_eq!(g.tensor("b").unwrap().to_f32().unwrap(), values);
}

#[test]
fn custom_alignment_places_every_tensor_on_its_boundary() {
    let mut m = Metadata::new();
    m.set(keys::ALIGNMENT, 256u32);
    let descs = [
        TensorDesc::new("x", DType::F32, &[3]),
        TensorDesc::new("y", DType::F32, &[5]),
        TensorDesc::new("z", DType::Q8_0, &[1, 32]),
    ];
    let mut w = GgufWriter::new(Vec::new(), "mem", &m, &descs).unwrap();
    for (i, len) in [12usize, 20, 34].into_iter().enumerate() {
        w.write_tensor_data(&pattern_bytes(len, i as u8)).unwrap();
    }
    let bytes = w.finish().unwrap();
    let g = Gguf::from_bytes(&bytes[..], "mem").unwrap();
    assert_eq!(g.alignment(), 256);
    assert_eq!(g.data_offset() % 256, 0);
    let offsets: Vec<u64> = g.tensor_infos().iter().map(|t| t.offset()).collect();
    assert_eq!(offsets, [0, 256, 512]);
    assert_eq!(bytes.len() as u64, g.data_offset() + 768);
    // Padding between tensors is zeros.
    let after_x = (g.data_offset() + 12) as usize;
    assert!(bytes[after_x..after_x + 244].iter().all(|&b| b == 0));
    assert_eq!(g.tensor("z").unwrap().data, pattern_bytes(34, 2).as_slice());
}

#[test]
fn data_may_be_streamed_in_chunks_of_any_size() {
    let descs = [
        TensorDesc::new("a", DType::F32, &[100]),
        TensorDesc::new("b", DType::BF16, &[33]),
    ];
    let a = pattern_bytes(400, 1);
    let b = pattern_bytes(66, 2);
    let mut w = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &descs).unwrap();
    for chunk in a.chunks(7) {
        w.write_tensor_data(chunk).unwrap();
    }
    w.write_tensor_data(&b[..1]).unwrap();
    w.write_tensor_data(&b[1..]).unwrap();
    let g = Gguf::from_bytes(w.finish().unwrap(), "mem").unwrap();
    assert_eq!(g.tensor("a").unwrap().data, a.as_slice());
    assert_eq!(g.tensor("b").unwrap().data, b.as_slice());
}

#[test]
fn writer_rejects_misuse_with_named_errors() {
    let descs = [TensorDesc::new("w", DType::F32, &[2])];
    let mut w = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &descs).unwrap();
    let err = w.write_tensor_data(&[1; 12]).unwrap_err().to_string();
    assert!(
        err.contains("\"w\"") && err.contains("8 of its 8 bytes"),
        "{err}"
    );
    w.write_tensor_data(&[1; 4]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("4 of tensor \"w\"'s 8 bytes"), "{err}");

    let dup = [
        TensorDesc::new("w", DType::F32, &[2]),
        TensorDesc::new("w", DType::F32, &[2]),
    ];
    let err = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &dup).unwrap_err();
    assert!(err.to_string().contains("used twice"), "{err}");

    let partial = [TensorDesc::new("q", DType::Q4_0, &[2, 48])];
    let err = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &partial).unwrap_err();
    assert!(err.to_string().contains("row length 48"), "{err}");

    let no_id = [TensorDesc::new("u", DType::U8, &[2])];
    let err = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &no_id).unwrap_err();
    assert!(err.to_string().contains("no type id for u8"), "{err}");

    let mut m = Metadata::new();
    m.set(keys::ALIGNMENT, 48u32);
    let err = GgufWriter::new(Vec::new(), "mem", &m, &[]).unwrap_err();
    assert!(err.to_string().contains("not a power of two"), "{err}");
}

#[test]
fn open_reads_a_file_through_mmap() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("round_trip_open.gguf");
    let descs = sample_tensors();
    let mut w = GgufWriter::create(&path, &every_type_metadata(), &descs).unwrap();
    for (i, d) in descs.iter().enumerate() {
        let n = d.dtype.bytes_for(d.shape.iter().product()).unwrap();
        w.write_tensor_data(&pattern_bytes(n, i as u8)).unwrap();
    }
    w.finish().unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.bytes(), sample_file().as_slice());
    assert_eq!(g.metadata().get_str(keys::ARCHITECTURE).unwrap(), "llama");
    let t = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(t.info.shape(), [3, 2, 16]);
    assert_eq!(t.data, pattern_bytes(192, 2).as_slice());

    let err = Gguf::open(path.with_extension("missing")).unwrap_err();
    assert!(matches!(err, kiln_core::Error::Io { .. }), "{err}");
}

#[test]
fn version_2_files_read_like_version_3() {
    let bytes = Raw::header(2, 1, 1)
        .kv("general.name", 8, &Raw::default().string("v2").0)
        .tensor("t", &[2], 0, 0)
        .pad_to(32)
        .bytes(&1.5f32.to_le_bytes())
        .bytes(&(-3f32).to_le_bytes())
        .0;
    let g = Gguf::from_bytes(bytes, "v2").unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(g.metadata().get_str("general.name").unwrap(), "v2");
    assert_eq!(g.tensor("t").unwrap().to_f32().unwrap(), [1.5, -3.0]);
}

#[test]
fn a_file_without_tensors_needs_no_data_section() {
    let mut m = Metadata::new();
    m.set("k", 1u8);
    // An alignment of 2^31 would pad the header to 2 GiB if it were applied.
    m.set(keys::ALIGNMENT, 1u32 << 31);
    let bytes = GgufWriter::new(Vec::new(), "mem", &m, &[])
        .unwrap()
        .finish()
        .unwrap();
    let unpadded = Raw::header(3, 0, 2)
        .kv("k", 0, &[1])
        .kv("general.alignment", 4, &(1u32 << 31).to_le_bytes())
        .0;
    assert_eq!(
        bytes, unpadded,
        "the writer adds no padding without tensors"
    );
    let padded = Raw::header(3, 0, 1).kv("k", 0, &[1]).pad_to(32).0;
    for b in [&unpadded[..], &padded[..]] {
        let g = Gguf::from_bytes(b, "mem").unwrap();
        assert_eq!(g.metadata().get("k"), Some(&Value::U8(1)));
        assert!(g.tensor_infos().is_empty());
    }
}

#[test]
fn rewriting_a_parsed_file_reproduces_its_bytes() {
    let bytes = sample_file();
    let g = Gguf::from_bytes(&bytes[..], "sample").unwrap();
    assert_eq!(common::rewrite(&g), bytes);
}

#[test]
fn low_bit_tensors_read_back_with_their_type_ids_and_bytes() {
    // One 2-row tensor of each 1- and 2-bit format and MXFP4: the type id in the
    // tensor info is ggml's, and the data comes back byte for byte.
    let formats = [
        (DType::Q1_0, 41u32),
        (DType::Q2_0, 42),
        (DType::TQ1_0, 34),
        (DType::TQ2_0, 35),
        (DType::MXFP4, 39),
    ];
    let descs: Vec<TensorDesc> = formats
        .iter()
        .map(|&(d, _)| TensorDesc::new(d.name(), d, &[2, 2 * d.block_size()]))
        .collect();
    let mut w = GgufWriter::new(Vec::new(), "mem", &Metadata::new(), &descs).unwrap();
    for (i, &(d, _)) in formats.iter().enumerate() {
        w.write_tensor_data(&pattern_bytes(4 * d.block_bytes(), i as u8))
            .unwrap();
    }
    let bytes = w.finish().unwrap();
    let g = Gguf::from_bytes(&bytes[..], "mem").unwrap();
    for (i, &(d, id)) in formats.iter().enumerate() {
        assert_eq!(d.gguf_type_id(), Some(id));
        let t = g.tensor(d.name()).unwrap();
        assert_eq!(t.info.dtype(), d);
        assert_eq!(
            t.data,
            pattern_bytes(4 * d.block_bytes(), i as u8).as_slice()
        );
        // The type id is stored where GGUF puts it: after the name, the dimension
        // count and the dimensions.
        let mut info = Vec::new();
        info.extend((d.name().len() as u64).to_le_bytes());
        info.extend(d.name().as_bytes());
        info.extend(2u32.to_le_bytes());
        info.extend((2 * d.block_size() as u64).to_le_bytes());
        info.extend(2u64.to_le_bytes());
        info.extend(id.to_le_bytes());
        assert!(
            bytes.windows(info.len()).any(|w| w == info.as_slice()),
            "{d}: tensor info with type id {id} not found"
        );
    }
}
