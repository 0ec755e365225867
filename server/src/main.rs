//! The `vublk` binary: parses the command line, runs setup in the order
//! fds -> layers -> listen -> ready -> serve, and exits. The only place that exits the process.

mod args;
mod capabilities;
mod config;
mod control;
mod device;
mod disk;
mod engine;
mod events;
mod fds;
mod probe;
mod sandbox;
mod serve;
mod stats;
mod updater;
mod vhost_user;
mod virtio_blk;
mod worker;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// Subcommands, for telling `vublk --socket-path ...` (the vhost-user backend program
/// convention, which has no subcommand) from `vublk serve --socket-path ...`.
const SUBCOMMANDS: [&str; 4] = ["serve", "probe", "help", "x-seccomp-allowlist"];

/// Inserts `serve` when the first argument is an option other than the top-level ones, so a
/// management tool can start vublk as `vublk --socket-path=... --blk-file=...`.
fn normalize_args(mut argv: Vec<OsString>) -> Vec<OsString> {
    let first = argv.get(1).and_then(|a| a.to_str()).map(str::to_owned);
    if let Some(first) = first {
        let top_level = ["--print-capabilities", "--help", "-h", "--version", "-V"];
        if first.starts_with('-')
            && !top_level.contains(&first.as_str())
            && !SUBCOMMANDS.contains(&first.as_str())
        {
            argv.insert(1, OsString::from("serve"));
        }
    }
    argv
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse_from(normalize_args(std::env::args_os().collect()));
    if cli.print_capabilities {
        println!("{}", capabilities::json());
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Serve(args)) => serve::run(*args),
        Some(Command::Probe(args)) => probe::run(args),
        Some(Command::XSeccompAllowlist) => {
            println!("{:#}", sandbox::seccomp::allowlists_json());
            Ok(())
        }
        None => {
            eprintln!("vublk: a subcommand is required (try `vublk serve --help`)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vublk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(OsString::from).collect())
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn backend_convention_options_get_serve_inserted() {
        assert_eq!(
            norm(&["vublk", "--socket-path=/s", "--blk-file=fd:3"]),
            ["vublk", "serve", "--socket-path=/s", "--blk-file=fd:3"]
        );
    }

    #[test]
    fn top_level_flags_and_subcommands_are_left_alone() {
        assert_eq!(
            norm(&["vublk", "--print-capabilities"]),
            ["vublk", "--print-capabilities"]
        );
        assert_eq!(
            norm(&["vublk", "serve", "--fd", "3"]),
            ["vublk", "serve", "--fd", "3"]
        );
    }
}
