//! One module per `kiln` subcommand.
