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

const JSON_WORDS: &[&str] = &[
    "null",
    "true",
    "-1",
    "1e999",
    "-0.0",
    "18446744073709551616",
    "\"\\u0000\"",
    "[]",
    "{}",
    "\"messages\":",
    "\"role\":",
    "\"content\":",
    "\"max_tokens\":",
    "\"temperature\":",
    "\"logprobs\":",
    "\"stop\":",
    "\"prompt\":",
    "\"hidden_size\":",
    "\"num_hidden_layers\":",
    "\"rope_scaling\":",
    "\"blocks\":",
    "\"config\":",
];

/// The signature of a result: `ok`, or the kind of error: the first six words of its
/// message before any quoted or bracketed part, digits dropped (so errors that differ
/// only in names, values, offsets or sizes count as one behaviour).
fn sig<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| {
        let m: String = e
            .to_string()
            .chars()
            .take_while(|c| !matches!(c, '`' | '"' | '\'' | '(' | '[' | '{'))
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let words: Vec<&str> = m.split_whitespace().take(6).collect();
        format!("{what}: {}", words.join(" "))
    })
}

fn run_gguf(data: &[u8]) -> String {
    let path = Path::new("fuzz.gguf");
    let go = || -> Result<String, String> {
        let f = sig("parse", GgufFile::from_bytes(path, data))?;
        let tok = vocab_from_gguf(&f)
            .and_then(|v| Tokenizer::from_gguf_vocab(&v))
            .map(|t| {
                t.encode_plain("hello <|im_end|> 123", true)
                    .map(|ids| ids.len())
            });
        let config = sig("config", ModelConfig::from_gguf(&f))?;
        let store = TensorStore::from_gguf(&f);
        let files = ModelFiles::from_parts(path.to_path_buf(), config, store, Some(f));
        sig("validate", files.validate())?;
        let plan = sig("plan", SplitPlan::even(&files.config, 1))?;
        sig("slice", files.rank_model(&plan.ranks[0]))?;
        sig("head", files.head())?;
        Ok(format!("ok tokenizer={}", tok.is_ok()))
    };
    go().unwrap_or_else(|e| e)
}

fn run_safetensors(data: &[u8]) -> String {
    match sig(
        "parse",
        parse_safetensors(data, Path::new("fuzz.safetensors")),
    ) {
        Ok(t) => format!("ok {}", t.len().min(4)),
        Err(e) => e,
    }
}

fn run_config(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    match sig("config", ModelConfig::from_hf_json(&text)) {
        Ok(c) => format!("ok {}", c.arch),
        Err(e) => e,
    }
}

fn run_manifest(data: &[u8]) -> String {
    let go = || -> Result<String, String> {
        let m: Manifest = sig("json", serde_json::from_slice(data))?;
        sig("check", m.check())?;
        sig("config", m.config.validate())?;
        let _ = (m.cache_key(), m.stream_order(), m.max_block());
        Ok("ok".into())
    };
    go().unwrap_or_else(|e| e)
}

/// A byte stream of frames, decoded as the control and data streams decode them.
fn run_wire(data: &[u8]) -> String {
    let mut rest = data;
    let mut out = String::from("ok");
    while rest.len() >= FRAME_HEADER_LEN {
        let hdr: [u8; FRAME_HEADER_LEN] = rest[..FRAME_HEADER_LEN].try_into().expect("len");
        rest = &rest[FRAME_HEADER_LEN..];
        let (kind, len) = match sig("header", decode_header(&hdr, 1 << 16)) {
            Ok(h) => h,
            Err(e) => return e,
        };
        if len > rest.len() {
            return "truncated frame".into();
        }
        let (payload, next) = rest.split_at(len);
        rest = next;
        match kind {
            FrameKind::Control => {
                let to = wire::decode::<ToNode>(payload).is_ok();
                let from = wire::decode::<FromNode>(payload).is_ok();
                out = format!("control to={to} from={from}");
            }
            _ => {
                let n = payload.len() / 4;
                let mut acc = vec![0f32; n];
                let a = wire::add_f32_le(&mut acc, payload).is_ok();
                let mut acc16 = vec![0f32; payload.len() / 2];
                let b = wire::add_f16_le(&mut acc16, payload).is_ok();
                out = format!("{kind:?} f32={a} f16={b}");
            }
        }
    }
    out
}

fn run_http(data: &[u8]) -> String {
    let chat = parse_body::<ChatCompletionRequest>(data).map(|(_, c)| c.unsupported_field());
    let cmpl = parse_body::<CompletionRequest>(data).map(|(_, c)| c.unsupported_field());
    let s = |r: Result<Option<(&str, String)>, tpi_coordinator::server::openai::ApiError>| match r {
        Ok(None) => "ok".to_string(),
        Ok(Some((f, _))) => format!("refused {f}"),
        Err(e) => format!("400 {:?}", e.param),
    };
    format!("chat {} / completions {}", s(chat), s(cmpl))
}

/// The SmolLM2 tokenizer, for the chat target (it needs a real vocabulary).
fn chat_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let f = GgufFile::open(&crate::smollm2_gguf()).expect("open SmolLM2");
        Tokenizer::from_gguf_vocab(&vocab_from_gguf(&f).expect("vocab")).expect("tokenizer")
    })
}

/// Input: a template, 0x00, then messages separated by 0x01, each `role 0x02 content`.
fn run_chat(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let (template, msgs) = text.split_once('\u{0}').unwrap_or((&text, ""));
    let messages: Vec<Message> = msgs
        .split('\u{1}')
        .filter(|m| !m.is_empty())
        .map(|m| {
            let (r, c) = m.split_once('\u{2}').unwrap_or(("user", m));
            Message::new(r, c)
        })
        .collect();
    let tok = chat_tokenizer();
    let t = match sig("template", ChatTemplate::from_jinja(Some(template), tok)) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let _ = t.render(&messages, true);
    match sig("encode", t.encode(tok, &messages, true)) {
        Ok(ids) => {
            let kind = match t.kind() {
                tpi_coordinator::chat::TemplateKind::ChatMl { default_system } => {
                    format!("chatml system={}", default_system.is_some())
                }
                tpi_coordinator::chat::TemplateKind::Llama3 { .. } => "llama3".into(),
            };
            format!("ok {kind} {}", ids.len().min(1))
        }
        Err(e) => e,
    }
}

// --- seeds -----------------------------------------------------------------------------

/// A GGUF writer for tiny seed models (F32 tensors only).
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

impl GgufWriter {
    fn new() -> Self {
        GgufWriter {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
        }
    }
    fn key(&mut self, k: &str, ty: u32) {
        self.kv.extend((k.len() as u64).to_le_bytes());
        self.kv.extend(k.as_bytes());
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        self.kv.extend((v.len() as u64).to_le_bytes());
        self.kv.extend(v.as_bytes());
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
    }
    fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            self.kv.extend((s.len() as u64).to_le_bytes());
            self.kv.extend(s.as_bytes());
        }
    }
    fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
    }
    fn tensor(&mut self, name: &str, dims: &[u64], rng: &mut XorShift) {
        let n: u64 = dims.iter().product();
        let v = (0..n).map(|_| rng.next_f32() * 0.2 - 0.1).collect();
        self.tensors.push((name.to_string(), dims.to_vec(), v));
    }
    fn finish(self) -> Vec<u8> {
        const ALIGN: u64 = 32;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut off = 0u64;
        for (name, dims, v) in &self.tensors {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend(off.to_le_bytes());
            off = (off + 4 * v.len() as u64).div_ceil(ALIGN) * ALIGN;
        }
        while !(out.len() as u64).is_multiple_of(ALIGN) {
            out.push(0);
        }
        for (_, _, v) in &self.tensors {
            for x in v {
                out.extend(x.to_le_bytes());
            }
            while !(out.len() as u64).is_multiple_of(ALIGN) {
                out.push(0);
            }
        }
        out
    }
}

/// A complete tiny Llama GGUF (F32, 2 layers, with a byte-level BPE vocabulary).
pub fn tiny_gguf(layers: usize, tied: bool) -> Vec<u8> {
    let (dim, ffn, heads, kv, vocab) = (32u64, 64u64, 4u32, 2u32, 64u64);
    let mut w = GgufWriter::new();
    let mut rng = XorShift(0x5eed);
    w.str("general.architecture", "llama");
    w.u32("llama.block_count", layers as u32);
    w.u32("llama.embedding_length", dim as u32);
    w.u32("llama.feed_forward_length", ffn as u32);
    w.u32("llama.attention.head_count", heads);
    w.u32("llama.attention.head_count_kv", kv);
    w.u32("llama.context_length", 128);
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.f32("llama.rope.freq_base", 10000.0);
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "gpt2");
    let mut tokens: Vec<String> = (0..vocab - 2)
        .map(|i| {
            char::from(b'a' + (i % 26) as u8)
                .to_string()
                .repeat(1 + i as usize / 26)
        })
        .collect();
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut types = vec![1i32; vocab as usize];
    types[vocab as usize - 2] = 3;
    types[vocab as usize - 1] = 3;
    w.strs("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strs("tokenizer.ggml.merges", &["a a".to_string()]);
    w.u32("tokenizer.ggml.eos_token_id", vocab as u32 - 1);
    let hd = dim / heads as u64;
    w.tensor("token_embd.weight", &[dim, vocab], &mut rng);
    for l in 0..layers {
        let t = |s: &str| format!("blk.{l}.{s}.weight");
        w.tensor(&t("attn_norm"), &[dim], &mut rng);
        w.tensor(&t("attn_q"), &[dim, dim], &mut rng);
        w.tensor(&t("attn_k"), &[dim, hd * kv as u64], &mut rng);
        w.tensor(&t("attn_v"), &[dim, hd * kv as u64], &mut rng);
        w.tensor(&t("attn_output"), &[dim, dim], &mut rng);
        w.tensor(&t("ffn_norm"), &[dim], &mut rng);
        w.tensor(&t("ffn_gate"), &[dim, ffn], &mut rng);
        w.tensor(&t("ffn_up"), &[dim, ffn], &mut rng);
        w.tensor(&t("ffn_down"), &[ffn, dim], &mut rng);
    }
    w.tensor("output_norm.weight", &[dim], &mut rng);
    if !tied {
        w.tensor("output.weight", &[dim, vocab], &mut rng);
    }
    w.finish()
}

fn gguf_seeds() -> Vec<Vec<u8>> {
    vec![tiny_gguf(2, false), tiny_gguf(1, true)]
}

fn safetensors_bytes(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dtype, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * if *dtype == "F32" { 4 } else { 2 };
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h.as_bytes());
    out.extend(std::iter::repeat_n(0x3c, off));
    out
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    vec![
        safetensors_bytes(&[
            ("model.embed_tokens.weight", "F32", &[8, 4]),
            ("model.norm.weight", "BF16", &[4]),
            ("rotary", "F16", &[2, 2, 2]),
        ]),
        safetensors_bytes(&[]),
    ]
}

fn fixture_text(rel: &str) -> Vec<u8> {
    let p = crate::fixtures_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn config_seeds() -> Vec<Vec<u8>> {
    vec![
        fixture_text("models/gqa_f32_tied/config.json"),
        fixture_text("models/llama3rope_f32/config.json"),
    ]
}

fn manifest_seeds() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("tpi-fuzz-manifest-{}", std::process::id()));
    let files = ModelFiles::open(&crate::fixtures_dir().join("models/gqa12_f32")).expect("fixture");
    let plan = SplitPlan::even(&files.config, 2).expect("plan");
    let m = tpi_node::store::write_shard(
        &files,
        &plan,
        1,
        tpi_node::store::Quant::Keep,
        tpi_kernels::Layout::Ggml,
        &dir,
    )
    .expect("shard");
    let _ = std::fs::remove_dir_all(&dir);
    vec![serde_json::to_vec(&m).expect("manifest json")]
}

fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut v = tpi_node::net::frame::encode_header(kind, payload.len())
        .expect("header")
        .to_vec();
    v.extend(payload);
    v
}

fn wire_seeds() -> Vec<Vec<u8>> {
    let msgs = [
        wire::encode(&ToNode::Hello {
            version: wire::PROTOCOL_VERSION,
        })
        .expect("encode"),
        wire::encode(&ToNode::Step { start: 3, n: 1 }).expect("encode"),
        wire::encode(&FromNode::Error { msg: "x".into() }).expect("encode"),
    ];
    let mut stream = Vec::new();
    for m in &msgs {
        stream.extend(frame(FrameKind::Control, m));
    }
    stream.extend(frame(
        FrameKind::Tensor,
        &wire::f32_to_le_bytes(&[1.0, -2.5, 3.0]),
    ));
    vec![stream, frame(FrameKind::Control, &msgs[0])]
}

fn http_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0.5,"stop":["x"],"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"prompt":"hi","max_tokens":2,"logprobs":0,"top_k":5,"seed":1}"#,
        r#"{"prompt":[1,2,3],"frequency_penalty":0.5}"#,
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn chat_seeds() -> Vec<Vec<u8>> {
    let f = GgufFile::open(&crate::smollm2_gguf()).expect("open SmolLM2");
    let t = f
        .get_str("tokenizer.chat_template")
        .unwrap_or("<|im_start|>")
        .to_string();
    let msgs = "system\u{2}Be brief.\u{1}user\u{2}hi<|im_end|> there\u{1}assistant\u{2}ok";
    vec![
        format!("{t}\u{0}{msgs}").into_bytes(),
        format!("{{% for m in messages %}}<|start_header_id|>{{{{ m.role }}}}<|end_header_id|>{{% endfor %}}\u{0}{msgs}").into_bytes(),
    ]
}

// --- the engine ------------------------------------------------------------------------

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
