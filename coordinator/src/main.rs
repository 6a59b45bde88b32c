//! `tpi`: the tpi coordinator CLI.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if !matches!(args.cmd, cli::Command::Serve(_)) {
        // Output piped into `head` ends the process quietly, as for any Unix tool (Rust
        // ignores SIGPIPE, so a print after the reader left would fail or panic). The
        // server keeps ignoring it: a client that goes away must not end it.
        // SAFETY: setting a signal's disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    cli::init_tracing(args.verbose);
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
