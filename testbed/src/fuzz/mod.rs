//! Fuzzing on the stable toolchain: one target per parser of untrusted bytes, and a small
//! mutation engine that drives them.
//!
//! Targets: the GGUF reader (header, metadata, tensor directory, then the model checks and
//! the GGUF tokenizer), safetensors headers, `config.json`, shard manifests, the wire
//! decoder (frame headers, bincode control messages, f32/f16 payloads), HTTP request
//! bodies, and the chat-template renderer. Each returns a short *signature* of what it
//! did (`ok`, or the error's message with numbers removed).
//!
//! The engine is behaviour-guided rather than coverage-guided (no instrumentation, so no
//! nightly): it mutates inputs from its corpus (bit flips, interesting integers, chunk
//! deletes, copies and splices, dictionary words) and keeps every input whose signature it
//! has not seen before. A panic is a crash: the input is saved and reported.
//! `tpi-testbed fuzz` runs it for millions of executions; the committed corpus under
//! `testbed/fuzz/corpus/<target>/` is replayed by `cargo test` (tests/fuzz.rs).

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tpi_coordinator::chat::{ChatTemplate, Message};
use tpi_coordinator::server::openai::{parse_body, ChatCompletionRequest, CompletionRequest};
use tpi_coordinator::tokenizer::{vocab_from_gguf, Tokenizer};
use tpi_node::model::gguf::GgufFile;
use tpi_node::model::weights::{parse_safetensors, TensorStore};
use tpi_node::model::{ModelConfig, ModelFiles, SplitPlan};
use tpi_node::net::frame::{decode_header, FrameKind, FRAME_HEADER_LEN};
use tpi_node::net::wire;
use tpi_node::proto::{FromNode, ToNode};
use tpi_node::store::Manifest;

use crate::synth::XorShift;

mod seeds;
mod targets;

pub use seeds::tiny_gguf;
use seeds::*;
use targets::*;

/// One fuzz target.
pub struct Target {
    /// Its name (the corpus directory's name).
    pub name: &'static str,
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input; returns its signature.
    pub run: fn(&[u8]) -> String,
    /// Words the mutator inserts (field names, magic values).
    pub dictionary: &'static [&'static str],
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "gguf",
            seeds: gguf_seeds,
            run: run_gguf,
            dictionary: &[
                "GGUF",
                "general.architecture",
                "general.alignment",
                "llama.block_count",
                "llama.embedding_length",
                "llama.attention.head_count",
                "llama.attention.head_count_kv",
                "llama.feed_forward_length",
                "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges",
                "blk.0.attn_q.weight",
                "blk.9.ffn_up.weight",
                "token_embd.weight",
                "output.weight",
            ],
        },
        Target {
            name: "safetensors",
            seeds: safetensors_seeds,
            run: run_safetensors,
            dictionary: &[
                "\"dtype\":",
                "\"shape\":",
                "\"data_offsets\":",
                "\"F32\"",
                "\"BF16\"",
                "\"F64\"",
                "[0,",
                "18446744073709551615",
                "\"__metadata__\":",
            ],
        },
        Target {
            name: "config",
            seeds: config_seeds,
            run: run_config,
            dictionary: JSON_WORDS,
        },
        Target {
            name: "manifest",
            seeds: manifest_seeds,
            run: run_manifest,
            dictionary: JSON_WORDS,
        },
        Target {
            name: "wire",
            seeds: wire_seeds,
            run: run_wire,
            dictionary: &["\u{0}\u{0}\u{0}\u{0}", "\u{ff}\u{ff}\u{ff}\u{ff}"],
        },
        Target {
            name: "http",
            seeds: http_seeds,
            run: run_http,
            dictionary: JSON_WORDS,
        },
        Target {
            name: "chat",
            seeds: chat_seeds,
            run: run_chat,
            dictionary: &[
                "<|im_start|>",
                "<|im_end|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "{{",
                "{%",
                "' + message['content'] + '",
                "\\n",
            ],
        },
    ]
}

/// What a fuzzing run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs executed.
    pub execs: u64,
    /// Inputs that panicked (saved under the crash directory, if any).
    pub crashes: Vec<(Vec<u8>, String)>,
    /// Distinct signatures seen.
    pub signatures: usize,
    /// Inputs in the corpus at the end.
    pub corpus: usize,
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// Applies 1–4 random mutations to `input`.
fn mutate(rng: &mut XorShift, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&str], max: usize) {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next_u64() as u8;
            }
            2 if len >= 8 => {
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len - w + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                input[i..i + w].copy_from_slice(&v[..w]);
            }
            3 if len > 1 => {
                let i = rng.below(len);
                let k = 1 + rng.below((len - i).min(64));
                input.drain(i..i + k);
            }
            4 if len > 1 => {
                let i = rng.below(len);
                let k = 1 + rng.below((len - i).min(64));
                let chunk = input[i..i + k].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            5 if !dict.is_empty() => {
                let word = dict[rng.below(dict.len())].as_bytes();
                let at = rng.below(len + 1);
                input.splice(at..at, word.iter().copied());
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let k = 1 + rng.below((other.len() - i).min(256));
                    let at = rng.below(len + 1);
                    input.splice(at..at, other[i..i + k].iter().copied());
                }
            }
            7 if len > 0 => input.truncate(rng.below(len)),
            _ => {
                let at = rng.below(len + 1);
                let k = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..k).map(|_| rng.next_u64() as u8).collect();
                input.splice(at..at, bytes);
            }
        }
    }
    input.truncate(max);
}

/// Runs `t` on `input`, turning a panic into `Err(message)`.
pub fn run_one(t: &Target, input: &[u8]) -> Result<String, String> {
    catch_unwind(AssertUnwindSafe(|| (t.run)(input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// The committed corpus of `target` (`testbed/fuzz/corpus/<target>/*`).
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target)
}

/// Every file in `dir` (none if it does not exist).
pub fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn save(dir: &Path, data: &[u8]) {
    use sha2::{Digest, Sha256};
    let _ = std::fs::create_dir_all(dir);
    let name = hex::encode(&Sha256::digest(data)[..8]);
    let _ = std::fs::write(dir.join(name), data);
}

/// Fuzzes `t` for `execs` inputs from `seed`, starting from its seeds and `corpus`. New
/// behaviours are saved to `save_dir` when given, crashes to `crash_dir`. Panics are
/// caught (the panic hook is silenced meanwhile) and reported.
pub fn fuzz(
    t: &Target,
    execs: u64,
    seed: u64,
    corpus: Vec<Vec<u8>>,
    save_dir: Option<&Path>,
    crash_dir: Option<&Path>,
) -> Report {
    const MAX_INPUT: usize = 1 << 16;
    let mut pool: Vec<Vec<u8>> = (t.seeds)();
    pool.extend(corpus);
    let mut seen = HashSet::new();
    let mut report = Report::default();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for input in pool.clone() {
        report.execs += 1;
        match run_one(t, &input) {
            Ok(s) => {
                seen.insert(s);
            }
            Err(p) => report.crashes.push((input, p)),
        }
    }
    let mut rng = XorShift(seed | 1);
    let mut input = Vec::new();
    while report.execs < execs {
        input.clear();
        input.extend_from_slice(&pool[rng.below(pool.len())]);
        mutate(&mut rng, &mut input, &pool, t.dictionary, MAX_INPUT);
        report.execs += 1;
        match run_one(t, &input) {
            Ok(s) => {
                if seen.insert(s) {
                    if let Some(d) = save_dir {
                        save(d, &input);
                    }
                    pool.push(input.clone());
                }
            }
            Err(p) => {
                if let Some(d) = crash_dir {
                    save(d, &input);
                }
                report.crashes.push((input.clone(), p));
            }
        }
    }
    std::panic::set_hook(hook);
    report.signatures = seen.len();
    report.corpus = pool.len();
    report
}
