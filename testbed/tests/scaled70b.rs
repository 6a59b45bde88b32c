//! The Llama-3-70B shape, scaled to 2 layers but with the real tensor sizes (hidden 8192,
//! 64 query heads over 8 KV heads, FFN 28672, the 128256-row head, 32 KiB allreduces),
//! as `tpi-testbed synth` writes it (Q4_K_M mix, ~2.5 GB, random weights). On 1, 2, 4
//! and 8 ranks: identical greedy ids, logits within 1e-4 of one rank, the same sampled
//! tokens under a seed, well-spread logits, and every rank's peak RSS within its bound.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tpi_testbed::synth::gguf_model::{self as g, SynthQuant};
use tpi_testbed::TempDir;
use tpi_testbed::{cmdline, greedy_args, ids, max_abs_diff, read_npy, run_json_within, tpi_bin};

const N_TOKENS: usize = 6;
/// Prompt ids: the BOS token, then ordinary ones.
const PROMPT: [u32; 6] = [128000, 5, 17, 300, 4242, 100000];
/// Max |Δ logit| between rank counts with f32 activations.
const TOL: f32 = 1e-4;
/// Every rank's peak RSS with `--mem-budget 1GiB` at 8 ranks.
const RSS_BOUND: u64 = 1 << 30;

struct Gen {
    json: Value,
    ids: Vec<u32>,
    vocab: usize,
    logits: Vec<f32>,
}

fn gen(model: &Path, cache: &Path, extra: &[&str], env: &[(&str, &str)]) -> Gen {
    let tmp = TempDir::new("scaled70b-logits");
    let npy = tmp.join("logits.npy");
    let mut args = greedy_args(model, &PROMPT, N_TOKENS);
    args.extend(["--node-threads", "1", "--logits-out"].map(String::from));
    args.push(npy.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(tpi_bin());
    cmd.args(&args)
        .env("TPI_CACHE", cache)
        .env_remove("RUST_LOG")
        .env_remove("TPI_ISA")
        .envs(env.iter().copied());
    let what = format!("`{}`", cmdline(&args));
    let json = run_json_within(cmd, Duration::from_secs(600), &what);
    let ids = ids(&json["generated_ids"]);
    let ((rows, vocab), logits) = read_npy(&npy);
    assert_eq!(
        (ids.len(), rows, vocab),
        (N_TOKENS, N_TOKENS, 128256),
        "{what}"
    );
    assert!(
        logits.iter().all(|v| v.is_finite()),
        "{what}: non-finite logits"
    );
    Gen {
        json,
        ids,
        vocab,
        logits,
    }
}

/// Per step: the standard deviation of the logits.
fn spreads(g: &Gen) -> Vec<f32> {
    g.logits
        .chunks_exact(g.vocab)
        .map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            var.sqrt() as f32
        })
        .collect()
}

/// (rank, peak RSS) of every rank at the last step.
fn peak_rss(g: &Gen) -> Vec<(u64, u64)> {
    let steps = g.json["steps"].as_array().expect("steps");
    steps.last().expect("a step")["ranks"]
        .as_array()
        .expect("ranks")
        .iter()
        .map(|r| {
            (
                r["rank"].as_u64().unwrap(),
                r["peak_rss_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn llama3_70b_shape_with_2_layers_splits_over_1_to_8_ranks() {
    let tmp = TempDir::new("scaled70b");
    let shape = g::with_layers(g::shape("llama3-70b").unwrap(), Some(2));
    let model = tmp.join("llama3-70b-2l.gguf");
    let w = g::write_model(&shape, SynthQuant::Q4KM, 1, &model, |_, _| {})
        .unwrap_or_else(|e| panic!("synth: {e}"));
    assert_eq!(w.bytes, std::fs::metadata(&model).unwrap().len());
    let cache = tmp.join("cache");
    let exact = [("TPI_ISA", "scalar")];

    let one = gen(&model, &cache, &[], &exact);
    for (t, std) in spreads(&one).iter().enumerate() {
        assert!(
            (1.5..8.0).contains(std),
            "step {t}: logits' std {std} (want well spread, about 3)"
        );
    }
    let mut fails = Vec::new();
    for n in [2usize, 4, 8] {
        let n_s = n.to_string();
        let got = gen(&model, &cache, &["--local-cluster", &n_s], &exact);
        if got.ids != one.ids {
            fails.push(format!("N={n}: ids {:?} vs {:?}", got.ids, one.ids));
        }
        // The 0.86 GB head is split: every rank computes a slice of the logits.
        let vocab = got.json["backend"]["vocab"]
            .as_array()
            .expect("backend.vocab");
        assert_eq!(vocab.len(), n, "N={n}: {vocab:?}");
        assert!(
            vocab
                .iter()
                .all(|r| r["end"].as_u64() > r["start"].as_u64()),
            "N={n}: a rank without LM head rows: {vocab:?}"
        );
        let d = max_abs_diff(&got.logits, &one.logits);
        eprintln!("N={n}: max |Δ logit| against one rank {d:.2e}");
        if d > TOL {
            fails.push(format!("N={n}: max |Δ logit| {d:.2e} > {TOL:.0e}"));
        }
    }
    // The default (SIMD, integer-activation) path: the same ids on 1 and 8 ranks.
    let fast_one = gen(&model, &cache, &[], &[]);
    let fast_eight = gen(&model, &cache, &["--local-cluster", "8"], &[]);
    if fast_eight.ids != fast_one.ids {
        fails.push(format!(
            "default path N=8: ids {:?} vs {:?}",
            fast_eight.ids, fast_one.ids
        ));
    }
    // Sampling: the same seed gives the same tokens on 1 and 8 ranks.
    let sample = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "11"];
    let s1 = gen(&model, &cache, &sample, &exact);
    let mut s8_args = sample.to_vec();
    s8_args.extend(["--local-cluster", "8", "--mem-budget", "1GiB"]);
    let s8 = gen(&model, &cache, &s8_args, &exact);
    if s8.ids != s1.ids {
        fails.push(format!("sampled N=8: ids {:?} vs {:?}", s8.ids, s1.ids));
    }
    for (rank, rss) in peak_rss(&s8) {
        eprintln!(
            "N=8 --mem-budget 1GiB: rank {rank} peak RSS {} MiB",
            rss >> 20
        );
        if rss > RSS_BOUND {
            fails.push(format!(
                "N=8 --mem-budget 1GiB: rank {rank} peak RSS {} MiB > {} MiB",
                rss >> 20,
                RSS_BOUND >> 20
            ));
        }
    }
    fails.extend(shards_out_matches_tpi_shard(
        &tmp, &shape, &model, &s8_args, &s8,
    ));
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// `synth --shards-out` (the shards without the model file): the same blocks as `tpi
/// shard` makes of the GGUF of the same seed, a model file that takes no disk for weights
/// and refuses to be read for them, and a run from the shards that gives the GGUF's
/// 8-rank run (`s8`, made with `s8_args`) exactly.
fn shards_out_matches_tpi_shard(
    tmp: &TempDir,
    shape: &g::Shape,
    model: &Path,
    s8_args: &[&str],
    s8: &Gen,
) -> Vec<String> {
    use tpi_testbed::synth::shards_out::{write_shards, MODEL_FILE};
    let mut fails = Vec::new();
    let layout = tpi_node::store::default_layout();
    let out = tmp.join("shards-out");
    let w = write_shards(shape, SynthQuant::Q4KM, 1, 8, layout, &out, |_, _| {})
        .unwrap_or_else(|e| panic!("synth --shards-out: {e}"));
    let reference = tmp.join("tpi-shard");
    let args = [
        "shard".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--nodes".into(),
        "8".into(),
        "--out".into(),
        reference.display().to_string(),
        "--layout".into(),
        layout.name().into(),
    ];
    let st = Command::new(tpi_bin())
        .args(&args)
        .env_remove("RUST_LOG")
        .status()
        .expect("tpi shard runs");
    assert!(st.success(), "`{}` failed", cmdline(&args));
    for (r, m) in w.manifests.iter().enumerate() {
        let theirs =
            tpi_node::store::load_manifest(&reference.join(format!("rank-{r}"))).expect("manifest");
        let key = |m: &tpi_node::store::Manifest| {
            m.blocks
                .iter()
                .map(|b| (format!("{:?}", b.kind), b.offset, b.len, b.sha256.clone()))
                .collect::<Vec<_>>()
        };
        if key(m) != key(&theirs) || m.plan != theirs.plan || m.config != theirs.config {
            fails.push(format!(
                "rank {r}: synth --shards-out's blocks differ from tpi shard's"
            ));
        }
    }
    // The model file is a header over a hole.
    let file = out.join(MODEL_FILE);
    let meta = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    let on_disk = meta.blocks() * 512;
    // (Its header is the GGUF's and one key longer.)
    let gguf_len = std::fs::metadata(model).unwrap().len();
    if meta.len().abs_diff(gguf_len) > 4096 || on_disk > 64 << 20 {
        fails.push(format!(
            "{MODEL_FILE}: {} bytes long, {on_disk} on disk (want the GGUF's {gguf_len}, no weights)",
            meta.len()
        ));
    }
    // Refused as a source of weights, with where they are.
    let refused = Command::new(tpi_bin())
        .args(greedy_args(&file, &PROMPT, 1))
        .env("TPI_CACHE", tmp.join("refused-cache"))
        .env_remove("RUST_LOG")
        .output()
        .expect("tpi runs");
    let err = String::from_utf8_lossy(&refused.stderr);
    if refused.status.success() || !err.contains("holds no weights") || !err.contains("--shards") {
        fails.push(format!(
            "tpi run on the header-only model without --shards: {} / {err}",
            refused.status
        ));
    }
    // From the shards: exactly the GGUF's 8-rank run.
    let out_s = out.display().to_string();
    let mut args = s8_args.to_vec();
    args.extend(["--shards", &out_s]);
    let got = gen(
        &file,
        &tmp.join("empty-cache"),
        &args,
        &[("TPI_ISA", "scalar")],
    );
    if got.ids != s8.ids || got.logits != s8.logits {
        fails.push(format!(
            "from synth --shards-out: ids {:?} vs the GGUF's {:?}, max |Δ logit| {:.2e}",
            got.ids,
            s8.ids,
            max_abs_diff(&got.logits, &s8.logits)
        ));
    }
    fails
}
