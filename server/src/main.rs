//! The `vublk` binary: parses the command line and runs a subcommand. The only place that
//! exits the process.

mod args;
mod config;
mod virtio_blk;

fn main() {}
