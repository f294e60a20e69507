//! Helpers shared by the kiln-gguf integration tests: a hand-rolled GGUF byte builder
//! (independent of the crate's writer, so it can also build malformed files), a
//! sample file with every metadata type, and a rewrite through `GgufWriter`.

#![allow(dead_code)] // each test binary uses a different subset

use kiln_core::DType;
use kiln_gguf::{Array, Gguf, GgufWriter, Metadata, TensorDesc, Value, ValueType};

/// GGUF bytes assembled field by field, little-endian.
#[derive(Default)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Magic, `version`, tensor count and metadata count.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default()
            .bytes(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    pub fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u32(self, v: u32) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(self, v: u64) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    pub fn string(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A metadata entry `key` of value type id `type_id` followed by `value_bytes`.
    pub fn kv(self, key: &str, type_id: u32, value_bytes: &[u8]) -> Raw {
        self.string(key).u32(type_id).bytes(value_bytes)
    }
    /// A tensor info: name, dims (GGUF order), ggml type id, offset.
    pub fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Raw {
        let mut r = self.string(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(type_id).u64(offset)
    }
    /// Zero bytes up to the next multiple of `align`.
    pub fn pad_to(mut self, align: usize) -> Raw {
        let len = self.0.len().next_multiple_of(align);
        self.0.resize(len, 0);
        self
    }
    /// `n` bytes of data, each its index mod 251 (never all zero).
    pub fn data(mut self, n: usize) -> Raw {
        self.0.extend((0..n).map(|i| (i % 251) as u8 + 1));
        self
    }
}

/// Metadata with a value of every type, nested arrays included.
pub fn every_type_metadata() -> Metadata {
    let mut m = Metadata::new();
    m.set("general.architecture", "llama");
    m.set("t.u8", 200u8);
    m.set("t.i8", -100i8);
    m.set("t.u16", 60000u16);
    m.set("t.i16", -30000i16);
    m.set("t.u32", 4_000_000_000u32);
    m.set("t.i32", -2_000_000_000i32);
    m.set("t.f32", 1.5e-3f32);
    m.set("t.bool.true", true);
    m.set("t.bool.false", false);
    m.set("t.string", "héllo, ▁wörld");
    m.set("t.string.empty", "");
    m.set("t.u64", u64::MAX - 1);
    m.set("t.i64", i64::MIN + 1);
    m.set("t.f64", -6.02214076e23f64);
    m.set("t.array.u8", vec![1u8, 2, 255]);
    m.set("t.array.i8", vec![-1i8, 7]);
    m.set("t.array.u16", vec![65535u16]);
    m.set("t.array.i16", vec![-2i16, 2]);
    m.set("t.array.u32", vec![7u32, 8, 9]);
    m.set("t.array.i32", vec![-7i32, 0, 7]);
    m.set("t.array.f32", vec![0.25f32, -8.5]);
    m.set("t.array.bool", vec![true, false, true]);
    m.set(
        "t.array.string",
        vec!["<s>".to_owned(), "".to_owned(), "▁the".to_owned()],
    );
    m.set("t.array.u64", vec![u64::MAX]);
    m.set("t.array.i64", vec![i64::MIN, 1]);
    m.set("t.array.f64", vec![1e300f64]);
    m.set("t.array.empty", Vec::<u32>::new());
    let inner = |v: Vec<i32>| Value::from(v);
    let nested = Array::new(
        ValueType::Array,
        vec![
            inner(vec![1, 2]),
            inner(vec![]),
            Value::from(vec!["a".to_owned()]),
        ],
    )
    .expect("items are arrays");
    m.set("t.array.nested", nested.clone());
    let deeper = Array::new(ValueType::Array, vec![Value::Array(nested)]).expect("array item");
    m.set("t.array.nested2", deeper);
    m
}

/// A tensor's bytes for tests: `n` bytes, each a function of index and `seed`
/// (never all zero).
pub fn pattern_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Tensors of several dtypes and shapes.
pub fn sample_tensors() -> Vec<TensorDesc> {
    vec![
        TensorDesc::new("token_embd.weight", DType::F32, &[5, 8]),
        TensorDesc::new("blk.0.attn_norm.weight", DType::F32, &[8]),
        TensorDesc::new("blk.0.attn_q.weight", DType::F16, &[3, 2, 16]),
        TensorDesc::new("blk.0.ffn_up.weight", DType::Q4_0, &[3, 64]),
        TensorDesc::new("blk.0.ffn_down.weight", DType::Q4K, &[2, 256]),
        TensorDesc::new("blk.0.bf16", DType::BF16, &[7]),
        TensorDesc::new("positions", DType::I32, &[1, 1, 1, 3]),
        TensorDesc::new("empty", DType::F32, &[0, 4]),
        TensorDesc::new("scalar", DType::F32, &[]),
    ]
}

/// A valid GGUF file with [`every_type_metadata`] and [`sample_tensors`] whose data
/// is [`pattern_bytes`] seeded by the tensor's index.
pub fn sample_file() -> Vec<u8> {
    let descs = sample_tensors();
    let mut w = GgufWriter::new(Vec::new(), "<sample>", &every_type_metadata(), &descs)
        .expect("sample header is valid");
    for (i, d) in descs.iter().enumerate() {
        let n = d
            .dtype
            .bytes_for(d.shape.iter().product())
            .expect("whole blocks");
        w.write_tensor_data(&pattern_bytes(n, i as u8))
            .expect("exact size");
    }
    w.finish().expect("all written")
}

/// Writes `g`'s metadata and tensors to a new GGUF v3 buffer.
pub fn rewrite<B: AsRef<[u8]>>(g: &Gguf<B>) -> Vec<u8> {
    let descs: Vec<TensorDesc> = g.tensor_infos().iter().map(|t| t.desc()).collect();
    let mut w = GgufWriter::new(Vec::new(), "<rewrite>", g.metadata(), &descs)
        .expect("a parsed file's header can be written");
    for t in g.tensors() {
        w.write_tensor_data(t.data).expect("exact size");
    }
    w.finish().expect("all written")
}
