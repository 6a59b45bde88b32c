//! Every family of the architecture table against transformers: the random-weight
//! fixtures of `testbed/fixtures/families` (made by its `make_families.py`), run through
//! the HF directory and through the GGUF that llama.cpp's `convert_hf_to_gguf.py` made of
//! it, on 1 to 4 ranks (each prompt on one rank; the longest on 2, 3 and 4).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tpi_testbed::{
    check_ids, cmdline, finish, fixtures_dir, floats, greedy_args, ids, max_abs_diff, read_json,
    read_npy, run_tpi, run_tpi_json, TempDir,
};

/// As for the Llama fixtures (engine.rs): f32 on the same weights, differing only by
/// summation order (the reference's own cache-vs-no-cache difference is about 1e-6).
const LOGITS_TOL: f32 = 1e-3;
/// Ids are compared only where the reference's top-1 margin exceeds this.
const MARGIN_TOL: f64 = 1e-3;

fn families_dir() -> PathBuf {
    fixtures_dir().join("families")
}

/// One fixture, one source (`hf` or the GGUF), one rank count: every listed prompt's ids
/// and logits against the reference. Mismatches are pushed onto `fails`.
fn check_run(
    name: &str,
    model: &Path,
    reference: &Value,
    prompts: &[usize],
    ranks: usize,
    fails: &mut Vec<String>,
) -> f32 {
    let dir = families_dir().join(name);
    let tmp = TempDir::new(&format!("family-{name}"));
    let n_new = reference["n_new_tokens"].as_u64().expect("n_new_tokens") as usize;
    let mut worst = 0.0f32;
    for &i in prompts {
        let p = &reference["prompts"][i];
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["generated_ids"]);
        let margins = floats(&p["margins"]);
        let ((rows, vocab), ref_logits) = read_npy(&dir.join(p["logits_file"].as_str().unwrap()));
        assert_eq!(rows, n_new, "{name}: reference logits rows");
        let npy = tmp.join(format!("logits_{i}.npy"));
        let mut args = greedy_args(model, &prompt, n_new);
        args.extend([
            "--logits-out".into(),
            npy.display().to_string(),
            "--threads".into(),
            "1".into(),
        ]);
        if ranks > 1 {
            args.extend(["--local-cluster".into(), ranks.to_string()]);
        }
        let what = format!(
            "{name} prompt {i} on {ranks} rank(s) (`{}`)",
            cmdline(&args)
        );
        let j = run_tpi_json(&args);
        let got = ids(&j["generated_ids"]);
        let ok = check_ids(&what, &got, &want, &margins, MARGIN_TOL);
        let ((r, c), logits) = read_npy(&npy);
        assert_eq!((r, c), (n_new, vocab), "{what}: logits shape");
        let d = max_abs_diff(&logits[..ok * vocab], &ref_logits[..ok * vocab]);
        eprintln!("{what}: logits max |Δ| = {d:.3e}");
        if d > LOGITS_TOL {
            fails.push(format!("{what}: logits max |Δ| {d:e} > {LOGITS_TOL:e}"));
        }
        worst = worst.max(d);
    }
    worst
}

/// A family fixture through both sources, on 1..=4 ranks (at most one per query head).
fn check_family(name: &str) {
    let dir = families_dir().join(name);
    let reference = read_json(&dir.join("reference.json"));
    let n_prompts = reference["prompts"].as_array().expect("prompts").len();
    let heads = reference["heads"].as_u64().expect("heads") as usize;
    let mut sources = vec![("hf", dir.join("hf"))];
    if let Some(g) = reference["gguf"].as_str() {
        sources.push(("gguf", dir.join(g)));
    }
    let mut fails = Vec::new();
    for (src, model) in &sources {
        let all: Vec<usize> = (0..n_prompts).collect();
        let mut worst = check_run(name, model, &reference, &all, 1, &mut fails);
        for ranks in 2..=heads.min(4) {
            let d = check_run(name, model, &reference, &[n_prompts - 1], ranks, &mut fails);
            worst = worst.max(d);
        }
        println!("FAMILY {name} ({src}): logits max |Δ| vs transformers = {worst:.3e}");
        if let Err(e) = streamed_equals_resident(name, model, &reference) {
            fails.push(e);
        }
    }
    finish(name, fails);
}

/// The longest prompt on 2 ranks streaming through a 2-block window gives logits bitwise
/// equal to the resident run's (for MoE layers: every expert of the block streamed).
fn streamed_equals_resident(name: &str, model: &Path, reference: &Value) -> Result<(), String> {
    let tmp = TempDir::new(&format!("family-stream-{name}"));
    let p = reference["prompts"].as_array().unwrap().last().unwrap();
    let run = |tag: &str, extra: &[&str]| {
        let npy = tmp.join(format!("{tag}.npy"));
        let mut args = greedy_args(model, &ids(&p["prompt_ids"]), 8);
        args.extend([
            "--local-cluster".into(),
            "2".into(),
            "--logits-out".into(),
            npy.display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        run_tpi_json(&args);
        std::fs::read(&npy).unwrap()
    };
    if run("resident", &[]) != run("streamed", &["--window", "2"]) {
        return Err(format!(
            "{name} ({}): logits with --window 2 differ from resident",
            model.display()
        ));
    }
    Ok(())
}

macro_rules! family_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_family(stringify!($name));
            }
        )*

        /// Every fixture directory has a test above.
        #[test]
        fn every_family_fixture_is_tested() {
            let tested = [$(stringify!($name)),*];
            let rd = std::fs::read_dir(families_dir()).expect("families fixtures");
            let mut n = 0;
            for e in rd.flatten() {
                if e.path().join("reference.json").is_file() {
                    let name = e.file_name().to_string_lossy().to_string();
                    assert!(tested.contains(&name.as_str()), "fixture {name} has no test");
                    n += 1;
                }
            }
            assert_eq!(n, tested.len(), "a tested fixture is missing");
        }
    };
}

family_tests!(
    llama3,
    mistral,
    mistral_swa,
    qwen2,
    qwen3,
    qwen3_bf16,
    gemma3,
    gemma3_qpas,
    qwen3moe,
    mixtral,
);

// ---------------------------------------------------------------------------------------
// Bad input

/// `tpi run` on `model` fails with a message containing every one of `words`.
fn fails_with(model: &Path, words: &[&str]) -> String {
    let args = [
        "run".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--tokens".into(),
        "1,2,3".into(),
        "--max-tokens".into(),
        "2".into(),
    ];
    let out = run_tpi(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "`{}` should fail; stdout: {}",
        cmdline(&args),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !err.contains("panicked"),
        "`{}` panicked:\n{err}",
        cmdline(&args)
    );
    for w in words {
        assert!(
            err.contains(w),
            "`{}`: the error should mention {w:?}:\n{err}",
            cmdline(&args)
        );
    }
    err
}

/// A copy of fixture `name`'s HF directory with its config.json edited.
fn edited_hf(tmp: &TempDir, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = families_dir().join(name).join("hf");
    let dst = tmp.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut cfg = read_json(&dst.join("config.json"));
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

#[test]
fn unsupported_architecture_is_named_with_the_supported_list() {
    let tmp = TempDir::new("family-bad-arch");
    let m = edited_hf(&tmp, "llama3", |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        c["model_type"] = "gpt2".into();
    });
    fails_with(
        &m,
        &[
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "Qwen3ForCausalLM",
            "Gemma3ForCausalLM",
        ],
    );
}

#[test]
fn a_model_labelled_with_the_wrong_family_is_refused() {
    // A Qwen3 model called Qwen2 would run without its q/k norms (and with biases it has
    // not got): its tensors say otherwise.
    let tmp = TempDir::new("family-wrong-label");
    let m = edited_hf(&tmp, "qwen3", |c| {
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        c["model_type"] = "llama".into();
    });
    fails_with(&m, &["_norm.weight", "not part of a llama model"]);
}

/// The offset of the u32 value of GGUF key `key` in `bytes`.
fn gguf_u32_offset(bytes: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    pat.extend_from_slice(&4u32.to_le_bytes()); // GGUF type u32
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap_or_else(|| panic!("no u32 key {key}"));
    at + pat.len()
}

/// Each of `edits` (a u32 key of fixture `name`'s GGUF and a wrong value) is refused with
/// a message holding its words.
fn gguf_edits_are_refused(name: &str, edits: &[(&str, u32, &[&str])]) {
    let src = families_dir().join(name).join("model.gguf");
    let tmp = TempDir::new(&format!("family-bad-{name}"));
    for &(key, value, words) in edits {
        let mut bytes = std::fs::read(&src).unwrap();
        let at = gguf_u32_offset(&bytes, key);
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let p = tmp.join(format!("{key}.gguf"));
        std::fs::write(&p, &bytes).unwrap();
        fails_with(&p, words);
    }
}

#[test]
fn gguf_expert_counts_that_contradict_the_tensors_are_refused() {
    gguf_edits_are_refused(
        "qwen3moe",
        &[
            ("qwen3moe.expert_used_count", 9, &["experts", "used of 4"]),
            ("qwen3moe.expert_count", 8, &["ffn_gate_inp", "shape"]),
            (
                "qwen3moe.expert_feed_forward_length",
                40,
                &["ffn_", "shape"],
            ),
        ],
    );
}

#[test]
fn gguf_head_counts_that_contradict_the_tensors_are_refused() {
    gguf_edits_are_refused(
        "qwen3",
        &[
            ("qwen3.attention.head_count", 2, &["attn_q", "shape"]),
            ("qwen3.attention.head_count_kv", 1, &["attn_k", "shape"]),
            ("qwen3.embedding_length", 40, &["token_embd", "shape"]),
        ],
    );
}

#[test]
fn a_chat_template_that_raises_is_a_clear_cli_error() {
    // The qwen3 fixture with a word-level tokenizer and a template that refuses every
    // conversation, as a model's own template may refuse roles it does not support.
    let tmp = TempDir::new("family-raising-template");
    let m = edited_hf(&tmp, "qwen3", |_| {});
    let vocab: serde_json::Map<String, Value> = (0..256)
        .map(|i| {
            (
                if i == 5 { "hi".into() } else { format!("w{i}") },
                Value::from(i),
            )
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(m.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        m.join("chat_template.jinja"),
        "{{ raise_exception('This model does not chat') }}",
    )
    .unwrap();
    let args = [
        "run".to_string(),
        "--model".into(),
        m.display().to_string(),
        "--chat".into(),
        "--prompt".into(),
        "hi".into(),
        "--max-tokens".into(),
        "2".into(),
    ];
    let out = run_tpi(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`{}` should fail", cmdline(&args));
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("This model does not chat"), "{err}");
    // So does the default, which applies the model's template; `--raw` runs the same model
    // (the template is only used to chat).
    let default: Vec<String> = args.iter().filter(|a| *a != "--chat").cloned().collect();
    let out = run_tpi(&default);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--raw"),
        "the default should fail naming --raw: {err}"
    );
    let plain: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "--chat" {
                "--raw".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = run_tpi(&plain);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
