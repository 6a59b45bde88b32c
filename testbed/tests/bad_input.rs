//! Bad inputs: every case must exit non-zero with exactly one `error: ...` line on stderr
//! that names the problem, and must not panic.
//!
//! The GGUF cases need the SmolLM2 model (`scripts/fetch-model.sh`); the rest use the
//! random-weight fixtures.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tpi_testbed::{cmdline, copy_dir, fixtures_dir, run_tpi, smollm2_gguf, TempDir};

/// Runs `tpi args` and checks it fails cleanly. `groups`: for each group, at least one of
/// its words must appear (case-insensitive) in the error line, with `strip` (temp
/// directories, whose names could contain anything) removed first.
fn expect_error(args: &[String], strip: &[&Path], groups: &[&[&str]]) -> String {
    let out = run_tpi(args);
    let cmd = cmdline(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!(
        "`{cmd}`\nexit: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(!out.status.success(), "expected failure: {ctx}");
    assert!(
        out.status.code().is_some(),
        "killed by a signal instead of exiting with an error: {ctx}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {ctx}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "panicked: {ctx}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line (`error: ...`) on stderr: {ctx}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("error: "),
        "stderr line does not start with `error: `: {ctx}"
    );
    let mut msg = line.to_string();
    for p in strip {
        msg = msg.replace(&p.display().to_string(), "<tmp>");
    }
    let lower = msg.to_lowercase();
    for g in groups {
        assert!(
            g.iter().any(|w| lower.contains(&w.to_lowercase())),
            "error message does not name the problem (expected one of {g:?}): {ctx}"
        );
    }
    eprintln!("ok: {cmd}\n    -> {line}");
    line.to_string()
}

fn s<T: AsRef<str>>(v: &[T]) -> Vec<String> {
    v.iter().map(|x| x.as_ref().to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join("models").join(name)
}

/// A short generation on `model`, the common tail of most cases.
fn run_args(model: &Path) -> Vec<String> {
    s(&[
        "run",
        "--model",
        &p(model),
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "2",
        "--json",
        "--threads",
        "1",
    ])
}

/// Writes `bytes` at `offset` of `path` (in place).
fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

// --- GGUF ------------------------------------------------------------------------------

fn gguf_prefix(tmp: &TempDir, n: usize) -> PathBuf {
    let src = std::fs::read(smollm2_gguf()).unwrap();
    let dst = tmp.join("model.gguf");
    std::fs::write(&dst, &src[..n.min(src.len())]).unwrap();
    dst
}

fn gguf_copy(tmp: &TempDir) -> PathBuf {
    let dst = tmp.join("model.gguf");
    std::fs::copy(smollm2_gguf(), &dst).unwrap();
    dst
}

#[test]
fn gguf_truncated() {
    let tmp = TempDir::new("bad-gguf-trunc");
    let f = gguf_prefix(&tmp, 1 << 20);
    expect_error(
        &run_args(&f),
        &[tmp.path()],
        &[&[
            "truncat",
            "past the end",
            "remaining file",
            "end of file",
            "unexpected eof",
        ]],
    );
}

#[test]
fn gguf_truncated_in_tensor_data() {
    // Header and metadata intact, tensor data cut short.
    let tmp = TempDir::new("bad-gguf-trunc-data");
    let f = gguf_prefix(&tmp, 90_000_000);
    expect_error(
        &run_args(&f),
        &[tmp.path()],
        &[&["truncat", "past the end", "end of file"]],
    );
}

#[test]
fn gguf_bad_magic() {
    let tmp = TempDir::new("bad-gguf-magic");
    let f = gguf_copy(&tmp);
    patch(&f, 0, b"GGXX");
    expect_error(&run_args(&f), &[tmp.path()], &[&["magic", "not a gguf"]]);
}

#[test]
fn gguf_garbage_tensor_count() {
    let tmp = TempDir::new("bad-gguf-count");
    let f = gguf_copy(&tmp);
    // magic (4) + version (4), then the u64 tensor count.
    patch(&f, 8, &0xFFFF_FFFF_FFFFu64.to_le_bytes());
    expect_error(&run_args(&f), &[tmp.path()], &[&["count", "tensors"]]);
}

#[test]
fn gguf_garbage_metadata_count() {
    let tmp = TempDir::new("bad-gguf-kvcount");
    let f = gguf_copy(&tmp);
    // ... then the u64 metadata key/value count.
    patch(&f, 16, &0xFFFF_FFFF_FFFFu64.to_le_bytes());
    expect_error(&run_args(&f), &[tmp.path()], &[&["count", "metadata"]]);
}

// --- safetensors -----------------------------------------------------------------------

#[test]
fn safetensors_truncated() {
    let dir = copy_dir(&fixture("gqa_f32_tied"), "bad-st-trunc");
    let st = dir.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    expect_error(
        &run_args(dir.path()),
        &[dir.path()],
        &[&[
            "truncat",
            "incomplete",
            "buffer",
            "past the end",
            "too short",
        ]],
    );
}

#[test]
fn safetensors_garbage_header_length() {
    let dir = copy_dir(&fixture("gqa_f32_tied"), "bad-st-hlen");
    let st = dir.join("model.safetensors");
    patch(&st, 0, &0x7FFF_FFFF_FFFFu64.to_le_bytes());
    expect_error(
        &run_args(dir.path()),
        &[dir.path()],
        &[&["header", "metadata"]],
    );
}

/// Rewrites `model.safetensors` of `dir` with tensor `victim` stored as F64 (same shape,
/// same values), every other tensor unchanged. The file is otherwise valid.
fn write_with_f64(dir: &Path, victim: &str) {
    let path = dir.join("model.safetensors");
    let b = std::fs::read(&path).unwrap();
    let hlen = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&b[8..8 + hlen]).unwrap();
    let data = &b[8 + hlen..];
    let mut names: Vec<&String> = header.as_object().unwrap().keys().collect();
    names.retain(|n| *n != "__metadata__");
    names.sort();
    assert!(
        names.iter().any(|n| *n == victim),
        "{victim} not in fixture"
    );
    let mut out_header = serde_json::Map::new();
    if let Some(m) = header.get("__metadata__") {
        out_header.insert("__metadata__".into(), m.clone());
    }
    let mut out_data = Vec::new();
    for n in names {
        let t = &header[n];
        let off: Vec<usize> = t["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let bytes = &data[off[0]..off[1]];
        let start = out_data.len();
        let mut entry = t.clone();
        if n == victim {
            assert_eq!(t["dtype"], "F32");
            for c in bytes.chunks_exact(4) {
                let v = f32::from_le_bytes(c.try_into().unwrap()) as f64;
                out_data.extend_from_slice(&v.to_le_bytes());
            }
            entry["dtype"] = "F64".into();
        } else {
            out_data.extend_from_slice(bytes);
        }
        entry["data_offsets"] = serde_json::json!([start, out_data.len()]);
        out_header.insert(n.clone(), entry);
    }
    let mut h = serde_json::to_vec(&Value::Object(out_header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&out_data);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn safetensors_unsupported_dtype() {
    let dir = copy_dir(&fixture("gqa_f32_tied"), "bad-st-dtype");
    write_with_f64(dir.path(), "model.layers.0.self_attn.q_proj.weight");
    expect_error(
        &run_args(dir.path()),
        &[dir.path()],
        &[
            &["dtype", "data type", "unsupported"],
            &["f64", "float64", "double"],
        ],
    );
}

#[test]
fn unsupported_architecture() {
    let dir = copy_dir(&fixture("gqa_f32_tied"), "bad-arch");
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    cfg["model_type"] = "gpt2".into();
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    expect_error(
        &run_args(dir.path()),
        &[dir.path()],
        &[&["architecture", "unsupported"], &["gpt2"]],
    );
}

// --- requests --------------------------------------------------------------------------

#[test]
fn prompt_longer_than_context() {
    let args = s(&[
        "run",
        "--model",
        &p(&fixture("gqa_f32_tied")),
        "--tokens",
        "1,2,3,4,5,6,7,8,9,10",
        "--ctx",
        "8",
        "--max-tokens",
        "2",
        "--json",
        "--threads",
        "1",
    ]);
    expect_error(&args, &[], &[&["context", "ctx"]]);
}

#[test]
fn token_id_out_of_vocab() {
    let args = s(&[
        "run",
        "--model",
        &p(&fixture("gqa_f32_tied")),
        "--tokens",
        "999999",
        "--max-tokens",
        "2",
        "--json",
        "--threads",
        "1",
    ]);
    expect_error(&args, &[], &[&["999999"], &["vocab", "token"]]);
}

#[test]
fn text_prompt_without_tokenizer() {
    let dir = fixture("gqa_f32_tied");
    assert!(!dir.join("tokenizer.json").exists());
    let args = s(&[
        "run",
        "--model",
        &p(&dir),
        "--prompt",
        "hello world",
        "--max-tokens",
        "2",
        "--json",
        "--threads",
        "1",
    ]);
    expect_error(&args, &[], &[&["tokenizer"]]);
}

#[test]
fn missing_model_path() {
    let tmp = TempDir::new("bad-missing");
    let missing = tmp.join("no-such-model.gguf");
    let line = expect_error(
        &run_args(&missing),
        &[],
        &[&["no such file", "not found", "does not exist", "missing"]],
    );
    assert!(
        line.contains("no-such-model.gguf"),
        "the error should name the path: {line}"
    );
}

#[test]
fn missing_model_dir() {
    let tmp = TempDir::new("bad-missing-dir");
    let missing = tmp.join("no-such-model-dir");
    let line = expect_error(
        &run_args(&missing),
        &[],
        &[&["no such file", "not found", "does not exist", "missing"]],
    );
    assert!(
        line.contains("no-such-model-dir"),
        "the error should name the path: {line}"
    );
}

#[test]
fn negative_temperature() {
    let mut args = run_args(&fixture("gqa_f32_tied"));
    // `--temperature=-1`: with a space, clap would read `-1` as a flag and print its
    // multi-line usage error instead of tpi's own validation.
    args.push("--temperature=-1".into());
    expect_error(&args, &[], &[&["temperature"]]);
}

#[test]
fn negative_temperature_space_separated() {
    // The form a user types. clap rejects `-1` as an unknown flag unless the argument
    // allows negative numbers; either way the result must be one `error:` line about the
    // temperature.
    let mut args = run_args(&fixture("gqa_f32_tied"));
    args.extend(["--temperature".to_string(), "-1".to_string()]);
    expect_error(&args, &[], &[&["temperature"]]);
}
