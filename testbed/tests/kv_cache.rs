//! The f16 KV cache (`--kv-dtype f16`) against transformers' f32 reference: on every
//! random-weight fixture, on 1 and 2 ranks, the logits stay within [`TOL_F16`] and the
//! greedy ids match wherever the reference's top-1 margin is clear; SmolLM2's greedy
//! continuation is compared token by token with the f32 cache's.

use std::path::Path;

use tpi_testbed::{
    check_ids, cmdline, floats, greedy_logits_args, ids, model_fixture_dirs, read_json, read_npy,
    run_tpi_json, smollm2_gguf, TempDir,
};

/// Max |Δ logit| against the f32 reference with an f16 KV cache (measured: 4.2e-3 to
/// 3.1e-2 over the fixtures, whose logits reach about 10; f32 caches stay within 1e-4).
const TOL_F16: f32 = 5e-2;
/// Ids must match at every step whose reference margin exceeds this.
const MARGIN: f64 = 0.05;

fn run(model: &Path, prompt: &[u32], n: usize, npy: &Path, extra: &[&str]) -> Vec<u32> {
    let mut args = greedy_logits_args(model, prompt, n, npy);
    args.extend(extra.iter().map(|s| s.to_string()));
    let j = run_tpi_json(&args);
    let got = ids(&j["generated_ids"]);
    assert_eq!(got.len(), n, "`{}`", cmdline(&args));
    got
}

#[test]
fn f16_kv_cache_stays_within_its_bound_of_transformers_on_every_fixture() {
    let tmp = TempDir::new("kv-f16");
    let mut worst = 0f32;
    let mut fails = Vec::new();
    for dir in model_fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let reference = read_json(&dir.join("reference.json"));
        let n = reference["n_new_tokens"].as_u64().unwrap() as usize;
        for (i, p) in reference["prompts"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&p["prompt_ids"]);
            let want = ids(&p["generated_ids"]);
            let margins = floats(&p["margins"]);
            let ((_, vocab), ref_logits) = read_npy(&dir.join(p["logits_file"].as_str().unwrap()));
            for ranks in ["1", "2"] {
                let npy = tmp.join(format!("{name}-{i}-{ranks}.npy"));
                let got = run(
                    &dir,
                    &prompt,
                    n,
                    &npy,
                    &["--kv-dtype", "f16", "--local-cluster", ranks],
                );
                let what = format!("{name} prompt {i} N={ranks} f16 KV");
                let ok = check_ids(&what, &got, &want, &margins, MARGIN);
                let (_, logits) = read_npy(&npy);
                let m = ok * vocab;
                let d = logits[..m]
                    .iter()
                    .zip(&ref_logits[..m])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                eprintln!("{what}: max |Δ logit| vs transformers {d:.2e}");
                worst = worst.max(d);
                if d > TOL_F16 || d.is_nan() {
                    fails.push(format!("{what}: max |Δ logit| {d:.2e} > {TOL_F16:.0e}"));
                }
            }
        }
    }
    println!("f16 KV cache: worst max |Δ logit| vs transformers over the fixtures {worst:.2e}");
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

#[test]
fn smollm2_continuation_with_an_f16_kv_cache() {
    let tmp = TempDir::new("kv-f16-smollm2");
    let model = smollm2_gguf();
    // "The capital of France is" in SmolLM2's vocabulary.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let n = 64;
    let f32_ids = run(&model, &prompt, n, &tmp.join("f32.npy"), &[]);
    let f16_ids = run(
        &model,
        &prompt,
        n,
        &tmp.join("f16.npy"),
        &["--kv-dtype", "f16"],
    );
    let same = f32_ids
        .iter()
        .zip(&f16_ids)
        .take_while(|(a, b)| a == b)
        .count();
    let (_, a) = read_npy(&tmp.join("f32.npy"));
    let (_, b) = read_npy(&tmp.join("f16.npy"));
    let vocab = a.len() / n;
    let d0 = a[..vocab]
        .iter()
        .zip(&b[..vocab])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!(
        "SmolLM2, f16 KV cache: {same} of {n} greedy tokens as with f32; first-step logits max |Δ| {d0:.2e}"
    );
    // The first step's logits see the prompt's keys and values rounded once.
    assert!(d0 < 0.05, "first-step logits moved by {d0}");
    assert!(
        same >= 16,
        "only {same} of {n} tokens agree: {f16_ids:?} vs {f32_ids:?}"
    );
}
