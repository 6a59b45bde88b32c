//! GGUF files as people download them: random-weight Llama models quantised by llama.cpp's
//! own `llama-quantize` into Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, IQ4_XS, IQ4_NL, Q5_0 and
//! Q5_1 (with llama.cpp's Q5_0/Q5_1/Q8_0/IQ4_NL fallbacks for 576-wide rows), each run
//! beside its twin that gguf-py dequantised to f32: the exact weights transformers runs
//! when it loads the quantised file. Plus the split on 1-4 ranks, streaming with a window
//! of 2 layers, and the files' bad-input cases.
//!
//! The models come from `scripts/make-kquant-models.sh` (see `kquant_models`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tpi_testbed::{
    cmdline, greedy_args, greedy_logits_args, ids, kquant_models, max_abs_diff, read_json,
    read_npy, run_json_within, run_tpi, tokens_arg, tpi_bin, TempDir,
};

/// Greedy tokens per run.
const N_TOKENS: usize = 8;
/// Prompt ids (the vocabulary has 512 tokens).
const PROMPT: [u32; 7] = [5, 17, 300, 42, 511, 0, 123];
/// Max |Δ logit| against the twin on the default path (which may quantise activations
/// to 15-bit integers for Q4_0/Q4_1/Q8_0 matrices).
const TOL_DEFAULT: f32 = 2e-3;
/// Max |Δ logit| against the twin with f32 activations (`TPI_ISA=scalar`: only the sum
/// order differs), and between rank counts.
const TOL_F32: f32 = 1e-4;
/// Ids must agree at every step whose top-1 margin (in the twin's logits) exceeds this.
const MARGIN: f32 = 0.02;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One `tpi run --json --logits-out`.
struct Gen {
    ids: Vec<u32>,
    vocab: usize,
    logits: Vec<f32>,
}

impl Gen {
    /// Top-1 minus top-2 logit at step `t`.
    fn margin(&self, t: usize) -> f32 {
        let row = &self.logits[t * self.vocab..(t + 1) * self.vocab];
        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for &v in row {
            if v > a {
                (a, b) = (v, a);
            } else if v > b {
                b = v;
            }
        }
        a - b
    }
}

fn gen(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Gen {
    let tmp = TempDir::new("kquant-logits");
    let npy = tmp.join("logits.npy");
    let mut args = greedy_logits_args(model, &PROMPT, N_TOKENS, &npy);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(tpi_bin());
    cmd.args(&args)
        .env_remove("RUST_LOG")
        .env_remove("TPI_ISA")
        .envs(env.iter().copied());
    let envs: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let what = format!("`{envs}{}`", cmdline(&args));
    let json = run_json_within(cmd, Duration::from_secs(180), &what);
    let ids = ids(&json["generated_ids"]);
    let ((rows, vocab), logits) = read_npy(&npy);
    assert_eq!((ids.len(), rows), (N_TOKENS, N_TOKENS), "{what}");
    assert!(
        logits.iter().all(|v| v.is_finite()),
        "{what}: non-finite logits"
    );
    Gen { ids, vocab, logits }
}

/// The manifest's entries: (shape, type, quantised file, dequantised twin, tensor types).
fn models() -> Vec<(String, String, PathBuf, PathBuf, Value)> {
    let dir = kquant_models();
    let m = read_json(&dir.join("manifest.json"));
    m["models"]
        .as_array()
        .expect("manifest models")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_string();
            (
                s("shape"),
                s("type"),
                dir.join(s("file")),
                dir.join(s("dequantised")),
                e["tensor_types"].clone(),
            )
        })
        .collect()
}

/// Compares `got` with `want` (the reference run); returns a description of any
/// difference beyond `tol` or of a differing id at a step whose margin exceeds
/// [`MARGIN`] (after the first such difference the continuations may part).
fn differs(got: &Gen, want: &Gen, tol: f32) -> Option<String> {
    let d = max_abs_diff(&got.logits, &want.logits);
    for t in 0..N_TOKENS {
        if got.ids[t] != want.ids[t] {
            if want.margin(t) > MARGIN {
                return Some(format!(
                    "ids {:?} vs {:?} part at step {t} (margin {:.4})",
                    got.ids,
                    want.ids,
                    want.margin(t)
                ));
            }
            // A near tie: later steps see different tokens; compare logits up to here.
            let n = (t + 1) * want.vocab;
            let d = max_abs_diff(&got.logits[..n], &want.logits[..n]);
            return (d > tol).then(|| format!("max |Δ logit| {d:.2e} > {tol:.0e}"));
        }
    }
    (d > tol).then(|| format!("max |Δ logit| {d:.2e} > {tol:.0e}"))
}

#[test]
fn every_type_matches_its_dequantised_twin() {
    let _g = serial();
    let all = models();
    let types: Vec<String> = all
        .iter()
        .flat_map(|m| m.4.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
        .collect();
    for t in [
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q5_0", "Q5_1",
    ] {
        assert!(types.iter().any(|x| x == t), "no fixture holds {t}");
    }
    let mut fails = Vec::new();
    for (shape, ty, q, deq, hist) in &all {
        let twin = gen(deq, &[], &[]);
        let spread = {
            let n = twin.logits.len() as f32;
            let mean = twin.logits.iter().sum::<f32>() / n;
            (twin.logits.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt()
        };
        assert!(
            spread > 0.5,
            "{shape} {ty}: logits' std {spread} is too narrow to test"
        );
        let label = format!("{shape} {ty} {hist}");
        if let Some(e) = differs(&gen(q, &[], &[]), &twin, TOL_DEFAULT) {
            fails.push(format!("{label} default path: {e}"));
        }
        let exact = gen(q, &[], &[("TPI_ISA", "scalar")]);
        if let Some(e) = differs(&exact, &twin, TOL_F32) {
            fails.push(format!("{label} f32 activations: {e}"));
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

#[test]
fn kquant_files_split_on_1_to_4_ranks_and_stream() {
    let _g = serial();
    let mut fails = Vec::new();
    for (shape, ty, q, _, _) in models() {
        if !matches!(ty.as_str(), "Q4_K_M" | "Q3_K_M" | "IQ4_XS" | "Q6_K") {
            continue;
        }
        let env = [("TPI_ISA", "scalar")];
        let one = gen(&q, &[], &env);
        let default_one = gen(&q, &[], &[]);
        for n in 2..=4 {
            let n_s = n.to_string();
            let got = gen(&q, &["--local-cluster", &n_s], &env);
            if let Some(e) = differs(&got, &one, TOL_F32) {
                fails.push(format!("{shape} {ty} N={n}: {e}"));
            }
            let got = gen(&q, &["--local-cluster", &n_s], &[]);
            if got.ids != default_one.ids {
                fails.push(format!(
                    "{shape} {ty} N={n} default path: ids {:?} vs {:?}",
                    got.ids, default_one.ids
                ));
            }
        }
        let streamed = gen(&q, &["--local-cluster", "2", "--window", "2"], &env);
        if let Some(e) = differs(&streamed, &one, TOL_F32) {
            fails.push(format!("{shape} {ty} --window 2: {e}"));
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

// --- bad input --------------------------------------------------------------------------

/// The quantised file of `shape`/`ty` from the manifest.
fn model(shape: &str, ty: &str) -> PathBuf {
    models()
        .into_iter()
        .find(|m| m.0 == shape && m.1 == ty)
        .unwrap_or_else(|| panic!("no {shape} {ty} model in the manifest"))
        .2
}

/// Offset of the type field of tensor `name`'s GGUF directory entry.
fn tensor_type_field(bytes: &[u8], name: &str) -> usize {
    tpi_testbed::gguf_tensor_fields(bytes, name).1
}

/// Runs `tpi run` on `model` with `extra` flags; requires a clean failure whose stderr
/// contains every one of `words` (case-insensitive), and returns the stderr.
fn fails_with(model: &Path, extra: &[&str], words: &[&str]) -> String {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--model".into(),
        model.display().to_string(),
        "--tokens".into(),
        tokens_arg(&PROMPT),
        "--max-tokens".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_tpi(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let ctx = format!("`{}` ({}):\n{stderr}", cmdline(&args), out.status);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "expected an error exit: {ctx}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {ctx}");
    let low = stderr.to_lowercase();
    for w in words {
        assert!(
            low.contains(&w.to_lowercase()),
            "no {w:?} in the error: {ctx}"
        );
    }
    stderr
}

fn edited(tmp: &TempDir, src: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    edit(&mut b);
    let dst = tmp.join("model.gguf");
    std::fs::write(&dst, b).unwrap();
    dst
}

#[test]
fn unsupported_type_is_named_with_its_tensor_and_the_supported_list() {
    let tmp = TempDir::new("kq-iq2");
    // IQ2_XXS (ggml type 16) in place of a Q4_K tensor.
    let f = edited(&tmp, &model("k256", "Q4_K_M"), |b| {
        let at = tensor_type_field(b, "blk.0.attn_q.weight");
        b[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    });
    fails_with(
        &f,
        &[],
        &["blk.0.attn_q.weight", "iq2_xxs", "q4_k", "iq4_xs", "q5_1"],
    );
}

#[test]
fn row_not_a_whole_number_of_blocks_is_refused() {
    let tmp = TempDir::new("kq-rowlen");
    // A 576-wide Q5_0 row claimed to be Q4_K (256-element blocks).
    let f = edited(&tmp, &model("w576", "Q5_0"), |b| {
        let at = tensor_type_field(b, "blk.0.attn_q.weight");
        b[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
    });
    fails_with(&f, &[], &["blk.0.attn_q.weight", "576", "q4_k"]);
}

#[test]
fn truncated_kquant_tensor_is_refused() {
    let tmp = TempDir::new("kq-trunc");
    let f = edited(&tmp, &model("k256", "Q4_K_M"), |b| {
        let n = b.len();
        b.truncate(n - 1000);
    });
    fails_with(&f, &[], &["truncated"]);
}

#[test]
fn n_without_a_valid_split_names_the_largest_that_works() {
    // k256: 8 heads of 128 over 4 KV heads with 256-column blocks in the attention output:
    // heads go in runs of 2, so at most 4 ranks.
    let e = fails_with(
        &model("k256", "Q4_K_M"),
        &["--local-cluster", "5"],
        &["at most 4", "--quant f32"],
    );
    assert!(e.lines().count() <= 6, "a short error, not a trace:\n{e}");
}

#[test]
fn lossless_f32_shards_split_where_the_file_cannot() {
    let _g = serial();
    // The alternative the error offers: f32 shards hold the decoded weights exactly and
    // cut at any head, so 5 ranks run, with the one-rank result.
    let q = model("k256", "Q4_K_M");
    let env = [("TPI_ISA", "scalar")];
    let one = gen(&q, &[], &env);
    let five = gen(&q, &["--local-cluster", "5", "--quant", "f32"], &env);
    if let Some(e) = differs(&five, &one, TOL_F32) {
        panic!("--quant f32 on 5 ranks: {e}");
    }
}

// --- mixture of experts ---------------------------------------------------------------------

/// The Q4_K_M MoE model on 2 ranks from a 19-token prompt, 6 greedy tokens, with `extra`
/// flags: the `--json` report and the logits file's bytes.
fn moe_run(tmp: &TempDir, tag: &str, extra: &[&str]) -> (Value, Vec<u8>) {
    moe_try(tmp, tag, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// [`moe_run`], or the command and its stderr when it fails.
fn moe_try(tmp: &TempDir, tag: &str, extra: &[&str]) -> Result<(Value, Vec<u8>), String> {
    let q = model("moe256", "Q4_K_M");
    let prompt: Vec<u32> = (0..19).map(|i| (i * 37 + 5) % 512).collect();
    let npy = tmp.join(format!("{tag}.npy"));
    let mut args = greedy_args(&q, &prompt, 6);
    args.extend(
        ["--local-cluster", "2", "--ctx", "256", "--logits-out"]
            .map(String::from)
            .into_iter()
            .chain([npy.display().to_string()]),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_tpi(&args);
    if !out.status.success() {
        return Err(format!(
            "`{}`: {}",
            cmdline(&args),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok((j, std::fs::read(&npy).unwrap()))
}

/// Per rank, the sum over decode steps (all but the prefill) of a `RankStep` counter.
fn decode_total(j: &Value, field: &str) -> Vec<u64> {
    let steps = j["steps"].as_array().unwrap();
    let mut tot = vec![0u64; steps[0]["ranks"].as_array().unwrap().len()];
    for s in &steps[1..] {
        for (t, r) in tot.iter_mut().zip(s["ranks"].as_array().unwrap()) {
            *t += r[field].as_u64().unwrap();
        }
    }
    tot
}

/// A budget just too small for rank 0's shard leaves it a short window and room for a
/// few experts beside it: later tokens find some routed experts still resident, read
/// fewer bytes than without the cache, and compute the same logits, bit for bit.
#[test]
fn moe_expert_cache_saves_reads_within_the_budget() {
    let _g = serial();
    let tmp = TempDir::new("kquant-moe-cache");
    let (resident, resident_logits) = moe_run(&tmp, "resident", &[]);
    let (windowed, _) = moe_run(&tmp, "windowed", &["--window", "2"]);
    let uncached = decode_total(&windowed, "expert_read_bytes")[0];
    // Budgets from 64 MiB + 1 MB up, until rank 0 streams with some cache hits (rank 1,
    // without the head's blocks, fits earlier and stops streaming). Budgets below a
    // rank's minimum (two of its largest blocks, KV cache, 64 MiB) are refused first.
    let mut found = None;
    let mut refused = 0;
    for step in 0..60u64 {
        let budget = (64u64 << 20) + 1_000_000 + step * 100_000;
        let run = moe_try(
            &tmp,
            &format!("b{budget}"),
            &["--mem-budget", &budget.to_string()],
        );
        let (j, logits) = match run {
            Ok(r) => r,
            Err(e) if e.contains("cannot hold") && e.contains("give at least") => {
                assert!(refused == step, "refused after accepting: {e}");
                refused += 1;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let hits = decode_total(&j, "expert_cache_hits")[0];
        let read = decode_total(&j, "expert_read_bytes")[0];
        if hits > 0 && read > 0 {
            found = Some((budget, hits, read, logits, j));
            break;
        }
    }
    let (budget, hits, read, logits, j) =
        found.expect("no budget gave rank 0 a streamed window with expert-cache hits");
    assert_eq!(j["generated_ids"], resident["generated_ids"]);
    assert!(
        logits == resident_logits,
        "logits with the expert cache differ from resident"
    );
    assert!(
        read < uncached,
        "read {read} bytes with the cache, {uncached} without"
    );
    eprintln!(
        "MoE expert cache at --mem-budget {budget}: rank 0 decode read {read} expert bytes \
         ({hits} hits) against {uncached} without a cache"
    );
}

/// The Q4_K_M MoE model on 2 ranks through a 2-block window: logits bitwise the resident
/// run's, and a decode step reads only its routed experts (top-2 of 4: exactly half the
/// expert bytes a 19-token prefill, which routes to every expert, reads), on every rank.
#[test]
fn moe_streaming_reads_only_the_routed_experts() {
    let _g = serial();
    let tmp = TempDir::new("kquant-moe-stream");
    let run = |tag: &str, extra: &[&str]| moe_run(&tmp, tag, extra);
    let (resident, resident_logits) = run("resident", &[]);
    let (streamed, streamed_logits) = run("streamed", &["--window", "2"]);
    assert_eq!(resident["generated_ids"], streamed["generated_ids"]);
    assert!(
        resident_logits == streamed_logits,
        "streamed logits differ from resident"
    );
    let bytes = |j: &Value, step: usize| -> Vec<u64> {
        j["steps"][step]["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["expert_read_bytes"].as_u64().unwrap())
            .collect()
    };
    assert!(
        bytes(&resident, 0).iter().all(|&b| b == 0),
        "resident reads no experts"
    );
    let all = bytes(&streamed, 0);
    assert_eq!(streamed["steps"][0]["tokens"], 19);
    let n_steps = streamed["steps"].as_array().unwrap().len();
    for step in 1..n_steps {
        let decode = bytes(&streamed, step);
        for (r, (&d, &a)) in decode.iter().zip(&all).enumerate() {
            assert!(
                d > 0 && 2 * d == a,
                "step {step} rank {r}: read {d} of {a} expert bytes"
            );
        }
    }
    eprintln!(
        "MoE decode reads {:?} expert bytes per rank per token, of {:?} (top-2 of 4)",
        bytes(&streamed, 1),
        all
    );
}
