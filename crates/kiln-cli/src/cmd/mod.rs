//! One module per `kiln` subcommand.

pub mod inspect;
pub mod quantize;
