//! What the command-line tools read and print around their results: the prompt from a flag,
//! a file or stdin, through the model's chat template unless `--raw`; a reader that goes away
//! (`| head`) ends them quietly; a summary line never rates a decode that did not happen.

use std::io::Write;
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

/// The last stderr line (the summary) of `tpi run` on SmolLM2 for `max_tokens` tokens.
fn summary_line(max_tokens: &str) -> String {
    let model = smollm2_gguf().display().to_string();
    let out = Command::new(tpi_bin())
        .args(["run", "--model", &model, "--prompt", "Hi", "--ignore-eos"])
        .args(["--max-tokens", max_tokens])
        .env_remove("RUST_LOG")
        .output()
        .expect("tpi runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    err.lines().last().unwrap_or_default().to_string()
}

#[test]
fn one_generated_token_gets_no_tokens_per_second() {
    let one = summary_line("1");
    assert!(
        one.contains("1 generated") && !one.contains("tokens/s"),
        "summary line: {one}"
    );
    let three = summary_line("3");
    assert!(three.contains("tokens/s"), "summary line: {three}");
}

/// `tpi run --json` on SmolLM2 with `args` (and `stdin` piped in, if any): its prompt ids.
fn prompt_ids(args: &[&str], stdin: Option<&str>) -> Vec<u64> {
    let model = smollm2_gguf().display().to_string();
    let mut all = vec!["run", "--model", &model, "--max-tokens", "1", "--json"];
    all.extend(args);
    let mut child = Command::new(tpi_bin())
        .args(&all)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tpi runs");
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tpi {}: {err}", all.join(" "));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    j["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn the_prompt_comes_from_a_flag_a_file_or_stdin_through_the_chat_template() {
    let q = "What is the capital of France?";
    let default = prompt_ids(&["--prompt", q], None);
    // An instruct model's own template applies by default, as with --chat.
    assert_eq!(default, prompt_ids(&["--chat", "--prompt", q], None));
    let raw = prompt_ids(&["--raw", "--prompt", q], None);
    assert!(
        raw.len() < default.len(),
        "raw {raw:?} vs templated {default:?}"
    );
    // The same text from stdin (piped, or `--prompt -`) and from a file, whose final newline
    // is not part of the prompt.
    assert_eq!(prompt_ids(&[], Some(&format!("{q}\n"))), default);
    assert_eq!(prompt_ids(&["--prompt", "-"], Some(q)), default);
    let tmp = tpi_testbed::TempDir::new("prompt-file");
    let f = tmp.join("q.txt");
    std::fs::write(&f, format!("{q}\n")).unwrap();
    let f = f.display().to_string();
    assert_eq!(prompt_ids(&["--prompt-file", &f], None), default);
    // A system message goes before it, through the template (SmolLM2's replaces its
    // default one), and ends with the same question.
    let sys = prompt_ids(&["--system", "Answer in one word.", "--prompt", q], None);
    let tail = &default[default.len() - 12..];
    assert!(
        sys != default && sys.ends_with(tail),
        "{sys:?} vs {default:?}"
    );
}

#[test]
fn an_empty_prompt_is_a_clear_error() {
    let model = smollm2_gguf().display().to_string();
    let out = Command::new(tpi_bin())
        .args(["run", "--model", &model])
        .stdin(Stdio::null())
        .output()
        .expect("tpi runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("prompt is empty"),
        "{err}"
    );
}
