//! Measures kiln's quantize -> dequantize error per block format on a matrix of raw
//! little-endian f32 values, and optionally compares kiln's bytes with another
//! quantizer's output for the same matrix.
//!
//! ```text
//! quant_error gaussian FILE [ROWS COLS SEED]   write ROWS x COLS N(0,1) values
//!                                              (default 256 x 4096, seed 42)
//! quant_error measure FILE COLS [BYTES_DIR]    print the table; with BYTES_DIR, read
//!                                              BYTES_DIR/<format>.bin (the same matrix
//!                                              quantized by another implementation;
//!                                              formats without a file print "-"),
//!                                              count the blocks identical to kiln's and
//!                                              measure their error with kiln's decoder
//! ```
//!
//! Relative RMSE = sqrt(mean((x - y)^2)) / sqrt(mean(x^2)) over the whole matrix.

use kiln_core::{quant, DType};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::path::Path;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match (arg(0), arg(1)) {
        (Some("gaussian"), Some(file)) => {
            let rows = arg(2).map_or(Ok(256), str::parse)?;
            let cols = arg(3).map_or(Ok(4096), str::parse)?;
            let seed = arg(4).map_or(Ok(42), str::parse)?;
            write_gaussian(Path::new(file), rows, cols, seed)
        }
        (Some("measure"), Some(file)) => {
            let cols: usize = arg(2).ok_or("measure needs COLS")?.parse()?;
            measure(Path::new(file), cols, arg(3).map(Path::new))
        }
        _ => Err("usage: quant_error gaussian FILE [ROWS COLS SEED] | \
                  quant_error measure FILE COLS [BYTES_DIR]"
            .into()),
    }
}

fn write_gaussian(file: &Path, rows: usize, cols: usize, seed: u64) -> AnyResult<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bytes: Vec<u8> = (0..rows * cols)
        .flat_map(|_| rng.sample::<f32, _>(StandardNormal).to_le_bytes())
        .collect();
    std::fs::write(file, bytes)?;
    println!(
        "wrote {rows} x {cols} N(0,1) f32 values (seed {seed}) to {}",
        file.display()
    );
    Ok(())
}

fn measure(file: &Path, cols: usize, other: Option<&Path>) -> AnyResult<()> {
    let bytes = std::fs::read(file)?;
    let x: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if cols == 0 || x.len() % cols != 0 {
        return Err(format!("{} values do not form rows of {cols}", x.len()).into());
    }
    println!("{} rows x {cols} from {}", x.len() / cols, file.display());
    print!("| format | bits/weight | kiln rel. RMSE |");
    if other.is_some() {
        print!(" identical blocks | other's bytes, rel. RMSE |");
    }
    println!();
    for dtype in DType::block_formats() {
        let mut q = vec![0u8; dtype.bytes_for(x.len())?];
        quant::quantize(dtype, &x, &mut q)?;
        let bits = 8.0 * dtype.block_bytes() as f64 / dtype.block_size() as f64;
        print!(
            "| {dtype} | {bits:.4} | {:.6} |",
            relative_rmse(dtype, &x, &q)?
        );
        let theirs_path = other.map(|dir| dir.join(format!("{dtype}.bin")));
        if let Some(path) = theirs_path.filter(|p| p.exists()) {
            let theirs = std::fs::read(path)?;
            if theirs.len() != q.len() {
                return Err(
                    format!("{dtype}: {} bytes, expected {}", theirs.len(), q.len()).into(),
                );
            }
            let block = dtype.block_bytes();
            let same = q
                .chunks_exact(block)
                .zip(theirs.chunks_exact(block))
                .filter(|(a, b)| a == b)
                .count();
            let err = relative_rmse(dtype, &x, &theirs)?;
            print!(" {same}/{} | {err:.6} |", q.len() / block);
        } else if other.is_some() {
            print!(" - | - |");
        }
        println!();
    }
    Ok(())
}

fn relative_rmse(dtype: DType, x: &[f32], q: &[u8]) -> AnyResult<f64> {
    let mut y = vec![0f32; x.len()];
    quant::dequantize(dtype, q, &mut y)?;
    let (err, norm) = x.iter().zip(&y).fold((0.0f64, 0.0f64), |(e, n), (&a, &b)| {
        let diff = f64::from(a) - f64::from(b);
        (e + diff * diff, n + f64::from(a) * f64::from(a))
    });
    Ok((err / norm).sqrt())
}
