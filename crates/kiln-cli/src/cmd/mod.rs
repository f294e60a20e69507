//! One module per `kiln` subcommand.

pub mod backend;
pub mod bench;
pub mod bench_kernels;
pub mod check_ops;
pub mod convert;
pub mod device;
pub mod doctor;
pub mod flags;
pub mod generate;
pub mod inspect;
pub mod model_file;
pub mod perplexity;
pub mod precompile;
pub mod quantize;
pub mod serve;
pub mod synth;
