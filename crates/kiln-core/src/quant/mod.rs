//! The element formats' byte layouts: conversion of every dtype's bytes to f32
//! (dequantization) and back (quantization).
//!
//! This module is the one definition of each format in the workspace: the CPU
//! backend, the GGUF reader and the tests all use it, and every GPU kernel is tested
//! against it. Block formats are bit-exact with ggml's layouts (little-endian).

mod float;

use crate::{DType, Error, Result};

/// Converts `dst.len()` elements stored as `dtype` in `src` to f32.
///
/// `src` must hold exactly `dtype.bytes_for(dst.len())` bytes (so `dst.len()` is a
/// whole number of blocks).
pub fn dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_lengths("dequantize", dtype, src.len(), dst.len())?;
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => float::to_f32(dtype, src, dst),
        _ => return Err(Error::Unsupported(format!("dequantization of {dtype}"))),
    }
    Ok(())
}

/// Stores the f32 values of `src` as `dtype` in `dst`.
///
/// `dst` must hold exactly `dtype.bytes_for(src.len())` bytes.
pub fn quantize(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_lengths("quantize", dtype, dst.len(), src.len())?;
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => float::from_f32(dtype, src, dst),
        _ => return Err(Error::Unsupported(format!("quantization to {dtype}"))),
    }
    Ok(())
}

fn check_lengths(op: &str, dtype: DType, bytes: usize, elements: usize) -> Result<()> {
    let expected = dtype
        .bytes_for(elements)
        .map_err(|e| Error::invalid(op, e.to_string()))?;
    if bytes != expected {
        return Err(Error::invalid(
            op,
            format!("{elements} elements of {dtype} take {expected} bytes, got {bytes}"),
        ));
    }
    Ok(())
}
