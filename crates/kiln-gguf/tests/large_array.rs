//! Memory for metadata arrays is proportional to what is used: a file holding a
//! 64M-element array (and a 4M-string one) opens, answers questions about the
//! arrays, is cloned and is rewritten with a few hundred kilobytes of heap, and
//! parsing it from a buffer costs about the arrays' size in the file, not tens of
//! bytes per item. A counting global allocator measures the heap.

use kiln_core::DType;
use kiln_gguf::{Gguf, GgufWriter, Metadata, TensorDesc, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes allocated now and at most since the
/// last [`reset_peak`].
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts a measurement: returns the bytes allocated now.
fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::SeqCst);
    PEAK.store(now, Ordering::SeqCst);
    now
}

/// The most bytes allocated since `reset_peak` returned `base`, above `base`.
fn peak_since(base: usize) -> usize {
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

/// Items of the large u8 array: as many as the file that exposed the problem held.
const N_BYTES: usize = 64 << 20;
/// Items of the large string array (each "ab": 10 bytes in the file).
const N_STRINGS: usize = 4 << 20;

/// Writes a GGUF file at `path` with the two large arrays, a small token list and
/// one small tensor.
fn write_large_array_file(path: &Path) {
    let mut md = Metadata::new();
    md.set("general.architecture", "llama");
    md.set("junk.bytes", Value::from(vec![7u8; N_BYTES]));
    md.set(
        "junk.strings",
        Value::from(vec!["ab".to_string(); N_STRINGS]),
    );
    md.set(
        "tokenizer.ggml.tokens",
        Value::from(vec!["a".to_string(), "b".to_string()]),
    );
    let descs = [TensorDesc::new("w.weight", DType::F32, &[2, 4])];
    let mut w = GgufWriter::create(path, &md, &descs).unwrap();
    w.write_tensor_data(&[0u8; 32]).unwrap();
    w.finish().unwrap();
}

const KIB: usize = 1 << 10;

#[test]
fn large_arrays_cost_memory_only_for_the_items_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large-array.gguf");
    write_large_array_file(&path);
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(file_len > N_BYTES + 10 * N_STRINGS, "{file_len}");

    // Opening maps the file and checks it; the arrays stay in the map.
    let base = reset_peak();
    let g = Gguf::open(&path).unwrap();
    let opened = peak_since(base);
    eprintln!("open: {opened} bytes of heap at most");
    assert!(opened < 64 * KIB, "opening took {opened} bytes of heap");

    // What inspect and the tokenizer read: lengths, a few items, a small array.
    let base = reset_peak();
    let md = g.metadata();
    let bytes = md.get_array("junk.bytes").unwrap();
    assert_eq!(bytes.len(), N_BYTES);
    assert_eq!(bytes.get(N_BYTES - 1), Some(Value::U8(7)));
    assert_eq!(bytes.get(N_BYTES), None);
    let strings = md.get_array("junk.strings").unwrap();
    assert_eq!(strings.len(), N_STRINGS);
    let first: Vec<Value> = strings.iter().take(6).collect();
    assert_eq!(first, vec![Value::from("ab"); 6]);
    let tokens: Vec<Value> = md
        .get_array("tokenizer.ggml.tokens")
        .unwrap()
        .iter()
        .collect();
    assert_eq!(tokens, [Value::from("a"), Value::from("b")]);
    let read = peak_since(base);
    eprintln!("reading: {read} bytes of heap at most");
    assert!(read < 64 * KIB, "reading took {read} bytes of heap");

    // What quantize does: clone the metadata and write it to a new file.
    let base = reset_peak();
    let mut copy = md.clone();
    copy.set("general.file_type", 0u32);
    let descs: Vec<TensorDesc> = g.tensor_infos().iter().map(|t| t.desc()).collect();
    let mut w = GgufWriter::new(std::io::sink(), "sink", &copy, &descs).unwrap();
    for t in g.tensors() {
        w.write_tensor_data(t.data).unwrap();
    }
    w.finish().unwrap();
    drop(copy);
    let rewritten = peak_since(base);
    eprintln!("cloning and rewriting: {rewritten} bytes of heap at most");
    assert!(
        rewritten < 512 * KIB,
        "cloning and rewriting took {rewritten} bytes of heap"
    );
    drop(g);

    // From a buffer, each array keeps a copy of its bytes: about the file's size.
    let buffer = std::fs::read(&path).unwrap();
    let base = reset_peak();
    let g = Gguf::from_bytes(&buffer[..], "buffer").unwrap();
    assert_eq!(g.metadata().get_array("junk.bytes").unwrap().len(), N_BYTES);
    let parsed = peak_since(base);
    eprintln!("parsing the {file_len}-byte file from a buffer: {parsed} bytes of heap at most");
    assert!(
        parsed < file_len + 64 * KIB,
        "parsing a {file_len}-byte buffer took {parsed} bytes of heap"
    );
}
