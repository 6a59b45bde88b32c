//! What the command-line tools print around their results: a reader that goes away (`| head`)
//! ends them quietly, and a summary line never rates a decode that did not happen.

use std::process::{Command, Stdio};

use tpi_testbed::{smollm2_gguf, tpi_bin, tpi_sim_bin};

/// Runs `bin args` with its stdout closed before it writes anything, and checks that it ends
/// quietly: killed by SIGPIPE or successful, with nothing on stderr about the pipe.
fn closed_stdout_is_quiet(bin: std::path::PathBuf, args: &[&str]) {
    let mut child = Command::new(&bin)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    let quiet_end = out.status.success() || out.status.signal() == Some(libc::SIGPIPE);
    assert!(
        quiet_end
            && !err.contains("panicked")
            && !err.to_lowercase().contains("broken pipe")
            && !err.contains("error"),
        "`{} {}` with its reader gone: {} / stderr:\n{err}",
        bin.display(),
        args.join(" "),
        out.status
    );
}

#[test]
fn a_closed_pipe_ends_tpi_run_quietly() {
    let model = smollm2_gguf().display().to_string();
    closed_stdout_is_quiet(
        tpi_bin(),
        &[
            "run",
            "--model",
            &model,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "50",
        ],
    );
}

#[test]
fn a_closed_pipe_ends_tpi_sim_quietly() {
    closed_stdout_is_quiet(
        tpi_sim_bin(),
        &[
            "predict",
            "--preset",
            "smollm2-135m",
            "--devices",
            "4",
            "--link",
            "1ms,300mbit",
        ],
    );
}

#[test]
fn tpi_sim_errors_are_one_line_without_a_backtrace() {
    let out = Command::new(tpi_sim_bin())
        .args(["predict", "--preset", "no-such-model"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("tpi-sim runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown preset should fail");
    assert!(
        err.starts_with("error: ")
            && !err.contains("Stack backtrace")
            && !err.contains("Caused by"),
        "stderr:\n{err}"
    );
}

#[test]
fn one_generated_token_gets_no_tokens_per_second() {
    let model = smollm2_gguf().display().to_string();
    let out = Command::new(tpi_bin())
        .args([
            "run",
            "--model",
            &model,
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("tpi runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let summary = err.lines().last().unwrap_or_default();
    assert!(
        summary.contains("1 generated") && !summary.contains("tokens/s"),
        "summary line: {summary}"
    );
    let out = Command::new(tpi_bin())
        .args([
            "run",
            "--model",
            &model,
            "--prompt",
            "Hi",
            "--max-tokens",
            "3",
            "--ignore-eos",
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("tpi runs");
    let err = String::from_utf8_lossy(&out.stderr);
    let summary = err.lines().last().unwrap_or_default();
    assert!(summary.contains("tokens/s"), "summary line: {summary}");
}
