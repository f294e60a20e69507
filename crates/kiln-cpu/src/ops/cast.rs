//! Reference for [`kiln_core::ops::Cast`].

use crate::{Inputs, Outputs};
use kiln_core::ops::Cast;
use kiln_core::{quant, DType, Result};

/// Converts `len` elements of `from` in `x` to `to` in `out` (F32, F16, BF16; round
/// to nearest even), through f32, which holds every F16 and BF16 value exactly.
pub fn cast(x: &[u8], from: DType, out: &mut [u8], to: DType, len: usize) -> Result<()> {
    if from == to {
        out.copy_from_slice(x);
        return Ok(());
    }
    let mut values = vec![0f32; len];
    quant::dequantize(from, x, &mut values)?;
    quant::quantize(to, &values, out)
}

pub(crate) fn execute(op: &Cast, ins: &Inputs, outs: &mut Outputs) -> Result<()> {
    let (from, to) = (ins.dtype(op.x), ins.dtype(op.out));
    let x = &ins.bytes(op.x)[..from.bytes_for(op.len)?];
    let out = &mut outs.bytes_mut(op.out)[..to.bytes_for(op.len)?];
    cast(x, from, out, to, op.len)
}
