//! Seed inputs for every target, and the tiny GGUF writer that makes the GGUF seeds.

use super::*;
use crate::gguf_write::{GgufHeader, GGML_F32};

/// A GGUF writer for tiny seed models (F32 tensors only, held in memory).
pub(super) struct GgufWriter {
    header: GgufHeader,
    data: Vec<Vec<f32>>,
}

impl GgufWriter {
    fn new() -> Self {
        GgufWriter {
            header: GgufHeader::new(),
            data: Vec::new(),
        }
    }
    fn tensor(&mut self, name: &str, dims: &[u64], rng: &mut XorShift) {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.2 - 0.1).collect();
        self.header.tensor(name, dims, GGML_F32, 4 * n);
        self.data.push(v);
    }
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        self.header
            .write(&mut out, |i, w| {
                for x in &self.data[i] {
                    w.write_all(&x.to_le_bytes())?;
                }
                Ok(())
            })
            .expect("writing to memory");
        out
    }
}

impl std::ops::Deref for GgufWriter {
    type Target = GgufHeader;
    fn deref(&self) -> &GgufHeader {
        &self.header
    }
}

impl std::ops::DerefMut for GgufWriter {
    fn deref_mut(&mut self) -> &mut GgufHeader {
        &mut self.header
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

pub(super) fn gguf_seeds() -> Vec<Vec<u8>> {
    vec![tiny_gguf(2, false), tiny_gguf(1, true)]
}

pub(super) fn safetensors_bytes(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
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

pub(super) fn safetensors_seeds() -> Vec<Vec<u8>> {
    vec![
        safetensors_bytes(&[
            ("model.embed_tokens.weight", "F32", &[8, 4]),
            ("model.norm.weight", "BF16", &[4]),
            ("rotary", "F16", &[2, 2, 2]),
        ]),
        safetensors_bytes(&[]),
    ]
}

pub(super) fn fixture_text(rel: &str) -> Vec<u8> {
    let p = crate::fixtures_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub(super) fn config_seeds() -> Vec<Vec<u8>> {
    vec![
        fixture_text("models/gqa_f32_tied/config.json"),
        fixture_text("models/llama3rope_f32/config.json"),
    ]
}

pub(super) fn manifest_seeds() -> Vec<Vec<u8>> {
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

pub(super) fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut v = tpi_node::net::frame::encode_header(kind, payload.len())
        .expect("header")
        .to_vec();
    v.extend(payload);
    v
}

pub(super) fn wire_seeds() -> Vec<Vec<u8>> {
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

pub(super) fn http_seeds() -> Vec<Vec<u8>> {
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

pub(super) fn chat_seeds() -> Vec<Vec<u8>> {
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
