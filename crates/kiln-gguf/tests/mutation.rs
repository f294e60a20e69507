//! Deterministic robustness: many mutated and truncated copies of a valid file are
//! parsed; none may panic, each either parses (and then survives a write/read round
//! trip) or fails with a format/unsupported error.

mod common;

use common::{rewrite, sample_file};
use kiln_core::{DType, Error};
use kiln_gguf::Gguf;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What parsing one mutant gave.
#[derive(Debug, PartialEq)]
enum Outcome {
    Parsed,
    Rejected,
}

/// Parses `bytes`. On success, touches every tensor's data, dequantizes the float
/// ones, and checks that rewriting is stable (write(read(write(read(x)))) equals
/// write(read(x))). On failure, checks the error kind.
fn check(bytes: &[u8]) -> Outcome {
    match Gguf::from_bytes(bytes, "mutant") {
        Ok(g) => {
            for t in g.tensors() {
                assert_eq!(t.data.len(), t.info.n_bytes());
                if matches!(t.info.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                    assert_eq!(t.to_f32().unwrap().len(), t.info.n_elements());
                }
            }
            let once = rewrite(&g);
            let again = Gguf::from_bytes(&once[..], "rewritten").unwrap_or_else(|e| {
                panic!("a rewritten file fails to parse: {e}");
            });
            assert_eq!(rewrite(&again), once, "rewriting is not stable");
            Outcome::Parsed
        }
        Err(Error::Format { .. } | Error::Unsupported(_)) => Outcome::Rejected,
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}

/// The length a file needs for all its tensor data.
fn required_len(bytes: &[u8]) -> usize {
    let g = Gguf::from_bytes(bytes, "sample").unwrap();
    g.tensor_infos()
        .iter()
        .map(|t| (g.data_offset() + t.offset()) as usize + t.n_bytes())
        .max()
        .unwrap()
}

#[test]
fn every_truncation_before_the_last_tensor_byte_is_rejected() {
    let bytes = sample_file();
    let needed = required_len(&bytes);
    for len in 0..=bytes.len() {
        let expected = if len < needed {
            Outcome::Rejected
        } else {
            Outcome::Parsed
        };
        assert_eq!(check(&bytes[..len]), expected, "truncated to {len} bytes");
    }
}

#[test]
fn overwriting_each_header_byte_and_field_never_panics() {
    let bytes = sample_file();
    let header_len = Gguf::from_bytes(&bytes[..], "sample")
        .unwrap()
        .data_offset() as usize;
    let mut rejected = 0;
    for pos in 0..header_len {
        for byte in [0x00, 0xff, 0x80, bytes[pos] ^ 0x01] {
            let mut m = bytes.clone();
            m[pos] = byte;
            rejected += (check(&m) == Outcome::Rejected) as usize;
        }
        for field in [u64::MAX, 1 << 40, 0x41, 0] {
            let mut m = bytes.clone();
            let end = (pos + 8).min(m.len());
            m[pos..end].copy_from_slice(&field.to_le_bytes()[..end - pos]);
            rejected += (check(&m) == Outcome::Rejected) as usize;
        }
    }
    // Most header bytes are lengths, counts, ids and offsets whose corruption must
    // be detected; string contents and some values may change and still parse.
    assert!(
        rejected > header_len * 2,
        "only {rejected} of {} mutants rejected",
        header_len * 8
    );
}

#[test]
fn seeded_random_byte_flips_never_panic() {
    let bytes = sample_file();
    let header_len = Gguf::from_bytes(&bytes[..], "sample")
        .unwrap()
        .data_offset() as usize;
    let mut rng = StdRng::seed_from_u64(0x6b696c6e);
    let (mut parsed, mut rejected) = (0, 0);
    for _ in 0..20_000 {
        let mut m = bytes.clone();
        for _ in 0..rng.random_range(1..=4) {
            // Three in four mutations hit the header, where the structure is.
            let pos = if rng.random_bool(0.75) {
                rng.random_range(0..header_len)
            } else {
                rng.random_range(0..m.len())
            };
            m[pos] ^= 1 << rng.random_range(0..8);
        }
        if rng.random_bool(0.1) {
            let len = rng.random_range(0..m.len());
            m.truncate(len);
        }
        match check(&m) {
            Outcome::Parsed => parsed += 1,
            Outcome::Rejected => rejected += 1,
        }
    }
    assert!(
        parsed > 1000 && rejected > 1000,
        "parsed {parsed}, rejected {rejected}"
    );
}
