//! Bad inputs: every case must exit non-zero with exactly one `error: ...` line on stderr
//! that names the problem, and must not panic.
//!
//! The GGUF cases need the SmolLM2 model (`scripts/fetch-model.sh`); the rest use the
//! random-weight fixtures.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tpi_node::model::GgufFile;
use tpi_testbed::{cmdline, copy_dir, fixtures_dir, ids, run_tpi, smollm2_gguf, tpi_bin, TempDir};

/// Runs `tpi args` and checks it fails cleanly. `groups`: for each group, at least one of
/// its words must appear (case-insensitive) in the error line, with `strip` (temp
/// directories, whose names could contain anything) removed first.
fn expect_error(args: &[String], strip: &[&Path], groups: &[&[&str]]) -> String {
    expect_failure(run_tpi(args), args, strip, groups)
}

/// [`expect_error`] for a run with its own tpi cache (`TPI_CACHE`).
fn expect_error_with_cache(
    args: &[String],
    cache: &Path,
    strip: &[&Path],
    groups: &[&[&str]],
) -> String {
    expect_failure(tpi_with_cache(args, cache), args, strip, groups)
}

/// Runs `tpi args` with `TPI_CACHE=cache`.
fn tpi_with_cache(args: &[String], cache: &Path) -> std::process::Output {
    std::process::Command::new(tpi_bin())
        .args(args)
        .env("TPI_CACHE", cache)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tpi")
}

fn expect_failure(
    out: std::process::Output,
    args: &[String],
    strip: &[&Path],
    groups: &[&[&str]],
) -> String {
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

// --- integrity: shards, inconsistent files, non-finite numbers ----------------------------

/// A SmolLM2 run over a 2-rank local cluster, greedy, 4 tokens.
fn cluster_args(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = s(&[
        "run",
        "--model",
        &p(model),
        "--local-cluster",
        "2",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "4",
        "--json",
        "--threads",
        "1",
        "--node-threads",
        "1",
    ]);
    a.extend(s(extra));
    a
}

/// Overwrites `len` bytes at `offset` of `path` with 0xFF, in place (the mtime changes).
fn scribble(path: &Path, offset: usize, len: usize) {
    patch(path, offset, &vec![0xFF; len]);
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "tpi failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn rank0_cached_shard_that_fails_its_hash_is_written_again() {
    let cache = TempDir::new("integrity-cache");
    let args = cluster_args(&smollm2_gguf(), &[]);
    let good = ids(&json_of(&tpi_with_cache(&args, cache.path()))["generated_ids"]);
    let shards = cache.join("shards");
    let r0 = std::fs::read_dir(&shards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.to_string_lossy().ends_with("-r0"))
        .expect("rank 0's cached shard");
    scribble(&r0.join("shard.bin"), 0, 64 << 10);
    let again = tpi_with_cache(&args, cache.path());
    let stderr = String::from_utf8_lossy(&again.stderr).to_string();
    assert_eq!(ids(&json_of(&again)["generated_ids"]), good, "{stderr}");
    assert!(
        stderr.contains("sha256"),
        "the repair is not reported: {stderr}"
    );
    // Repaired for good: the next run finds it intact and says nothing.
    let third = tpi_with_cache(&args, cache.path());
    assert_eq!(ids(&json_of(&third)["generated_ids"]), good);
    assert!(!String::from_utf8_lossy(&third.stderr).contains("sha256"));
}

#[test]
fn rank0_given_shard_that_fails_its_hash_is_an_error() {
    let tmp = TempDir::new("integrity-given");
    let out = tmp.join("shards");
    make_shards(&smollm2_gguf(), 2, &out);
    let data = out.join("rank-0").join("shard.bin");
    // Verified once: the stamp lets the next run skip hashing, until the file changes.
    let ok = tpi_with_cache(
        &cluster_args(&smollm2_gguf(), &["--shards", &p(&out)]),
        tmp.path(),
    );
    json_of(&ok);
    // Damage that keeps the size and even the modification time is still caught when
    // the inode or mtime moves; damage in place moves the mtime.
    scribble(&data, 5 << 20, 4096);
    expect_error_with_cache(
        &cluster_args(&smollm2_gguf(), &["--shards", &p(&out)]),
        tmp.path(),
        &[tmp.path()],
        &[&["rank 0"], &["sha256"], &["corrupt"]],
    );
}

/// `tpi shard --model M --nodes N --out OUT`, which must succeed.
fn make_shards(model: &Path, nodes: usize, out: &Path) {
    let made = run_tpi(s(&[
        "shard",
        "--model",
        &p(model),
        "--nodes",
        &nodes.to_string(),
        "--out",
        &p(out),
    ]));
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// Offset of the value of GGUF metadata key `key` (after its type tag).
fn meta_value_offset(bytes: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("metadata key {key} not found"));
    at + needle.len() + 4
}

/// Offset of the `offset` field of tensor `name`'s directory entry.
fn tensor_offset_field(bytes: &[u8], name: &str) -> usize {
    tpi_testbed::gguf_tensor_fields(bytes, name).2
}

fn edited_gguf(tmp: &TempDir, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(smollm2_gguf()).unwrap();
    edit(&mut b);
    let dst = tmp.join("model.gguf");
    std::fs::write(&dst, b).unwrap();
    dst
}

fn add_to_offset(b: &mut [u8], name: &str, delta: i64) {
    let f = tensor_offset_field(b, name);
    let v = u64::from_le_bytes(b[f..f + 8].try_into().unwrap());
    b[f..f + 8].copy_from_slice(&((v as i64 + delta) as u64).to_le_bytes());
}

#[test]
fn gguf_tensor_offset_moved_inside_the_file() {
    let tmp = TempDir::new("bad-gguf-moved");
    let f = edited_gguf(&tmp, |b| add_to_offset(b, "blk.3.attn_k.weight", 32));
    expect_error(
        &run_args(&f),
        &[tmp.path()],
        &[&["blk.3.attn_k.weight"], &["gap", "overlap"]],
    );
}

#[test]
fn gguf_tensors_overlapping() {
    let tmp = TempDir::new("bad-gguf-overlap");
    let f = edited_gguf(&tmp, |b| add_to_offset(b, "blk.7.ffn_up.weight", -4096));
    expect_error(&run_args(&f), &[tmp.path()], &[&["overlap"]]);
}

#[test]
fn gguf_tensor_type_changed_to_a_smaller_one() {
    // Q4_1 (20 bytes a block) relabelled Q4_0 (18): in bounds, but the bytes are no longer
    // that tensor's.
    let tmp = TempDir::new("bad-gguf-type");
    let f = edited_gguf(&tmp, |b| {
        let off = tensor_offset_field(b, "blk.0.ffn_gate.weight");
        assert_eq!(u32::from_le_bytes(b[off - 4..off].try_into().unwrap()), 3);
        b[off - 4..off].copy_from_slice(&2u32.to_le_bytes());
    });
    expect_error(
        &run_args(&f),
        &[tmp.path()],
        &[&["gap", "overlap", "follow"]],
    );
}

#[test]
fn gguf_block_count_smaller_than_the_layers_present() {
    let tmp = TempDir::new("bad-gguf-layers");
    let f = edited_gguf(&tmp, |b| {
        let v = meta_value_offset(b, "llama.block_count");
        b[v..v + 4].copy_from_slice(&1u32.to_le_bytes());
    });
    expect_error(
        &run_args(&f),
        &[tmp.path()],
        &[&["layer"], &["block_count"]],
    );
}

#[test]
fn gguf_absurd_norm_epsilon() {
    let tmp = TempDir::new("bad-gguf-eps");
    let f = edited_gguf(&tmp, |b| {
        let v = meta_value_offset(b, "llama.attention.layer_norm_rms_epsilon");
        b[v..v + 4].copy_from_slice(&1e38f32.to_le_bytes());
    });
    expect_error(&run_args(&f), &[tmp.path()], &[&["rms_norm_eps"]]);
}

#[test]
fn gguf_nan_weights_are_an_error_not_an_empty_answer() {
    let tmp = TempDir::new("bad-gguf-nan");
    let g = GgufFile::open(&smollm2_gguf()).unwrap();
    let norm = g.tensor("blk.2.attn_norm.weight").unwrap().clone();
    drop(g);
    let f = edited_gguf(&tmp, |b| {
        b[norm.offset..norm.offset + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    expect_error(
        &run_args(&f),
        &[tmp.path()],
        &[&["non-finite", "nan"], &["layer 2"], &["corrupt"]],
    );
}

/// A copy of a fixture with `edit` applied to its config.json.
fn edited_config(name: &str, edit: impl FnOnce(&mut Value)) -> TempDir {
    let dir = copy_dir(&fixture(name), "bad-config");
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

#[test]
fn config_unknown_activation() {
    let dir = edited_config("gqa_f32_tied", |c| c["hidden_act"] = "gelu".into());
    expect_error(
        &run_args(dir.path()),
        &[dir.path()],
        &[&["hidden_act"], &["gelu"]],
    );
}

#[test]
fn config_absurd_norm_epsilon() {
    let dir = edited_config("gqa_f32_tied", |c| c["rms_norm_eps"] = 1e38.into());
    expect_error(&run_args(dir.path()), &[dir.path()], &[&["rms_norm_eps"]]);
}

#[test]
fn config_llama3_rope_factor_zero() {
    let dir = edited_config("llama3rope_f32", |c| {
        c["rope_parameters"]["factor"] = 0.0.into()
    });
    expect_error(&run_args(dir.path()), &[dir.path()], &[&["factor"]]);
}

#[test]
fn config_fewer_layers_than_the_weights_hold() {
    let dir = edited_config("gqa_f32_tied", |c| c["num_hidden_layers"] = 1.into());
    expect_error(
        &run_args(dir.path()),
        &[dir.path()],
        &[&["layer"], &["num_hidden_layers"]],
    );
}

#[test]
fn shard_manifest_with_an_edited_config() {
    let tmp = TempDir::new("integrity-manifest");
    let out = tmp.join("shards");
    let model = fixture("gqa_f32_tied");
    make_shards(&model, 1, &out);
    let mpath = out.join("rank-0").join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["config"]["rms_norm_eps"] = 0.001.into();
    std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let mut args = run_args(&model);
    args.extend(s(&["--shards", &p(&out)]));
    expect_error(&args, &[tmp.path()], &[&["config"], &["edited", "damaged"]]);
}

// --- absurd flags ----------------------------------------------------------------------

#[test]
fn absurd_thread_count() {
    let mut args = run_args(&fixture("gqa_f32_tied"));
    args.retain(|a| a != "--threads" && a != "1");
    args.extend(s(&["--threads", "100000"]));
    expect_error(&args, &[], &[&["--threads"], &["at most"]]);
}

#[test]
fn local_cluster_larger_than_the_plan_allows_spawns_nothing() {
    let args = cluster_args(&smollm2_gguf(), &[]);
    let mut args: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "2" {
                "500".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    args.retain(|a| a != "--json");
    // The plan's error, not a node's: it comes before any node process is spawned.
    expect_error(&args, &[], &[&["500"], &["heads"]]);
}

#[test]
fn context_beyond_the_model_maximum() {
    let mut args = run_args(&smollm2_gguf());
    args.extend(s(&["--ctx", "1000000000"]));
    expect_error(&args, &[], &[&["--ctx"], &["maximum"], &["kv cache"]]);
}

#[test]
fn zero_node_threads() {
    let args = cluster_args(&smollm2_gguf(), &[]);
    let args: Vec<String> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && args[i - 1] == "--node-threads" {
                "0".into()
            } else {
                a.clone()
            }
        })
        .collect();
    expect_error(&args, &[], &[&["--node-threads"], &["at least 1"]]);
}

#[test]
fn a_memory_budget_below_the_minimum_is_refused_naming_the_minimum() {
    let tmp = TempDir::new("bad-budget");
    for extra in [&[][..], &["--local-cluster", "2"][..]] {
        let mut args = run_args(&smollm2_gguf());
        args.extend(s(&["--mem-budget", "65MiB"]));
        args.extend(s(extra));
        let line = expect_error_with_cache(
            &args,
            tmp.path(),
            &[tmp.path()],
            &[&["mem-budget"], &["minimum"], &["give at least"]],
        );
        // The minimum stated is a budget that runs.
        let min: f64 = line
            .split("give at least ")
            .nth(1)
            .and_then(|t| t.split(" MiB").next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no minimum in {line}"));
        let mut ok = run_args(&smollm2_gguf());
        ok.extend(s(&[
            "--mem-budget",
            &format!("{}", (min * 1048576.0).ceil() as u64),
        ]));
        ok.extend(s(extra));
        let out = tpi_with_cache(&ok, tmp.path());
        assert!(
            out.status.success(),
            "`{}` at the stated minimum failed: {}",
            cmdline(&ok),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
