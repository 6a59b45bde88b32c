//! The fuzz targets: each parses untrusted bytes and returns the signature of what it did.

use super::*;

pub(super) const JSON_WORDS: &[&str] = &[
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
pub(super) fn sig<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
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

pub(super) fn run_gguf(data: &[u8]) -> String {
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

pub(super) fn run_safetensors(data: &[u8]) -> String {
    match sig(
        "parse",
        parse_safetensors(data, Path::new("fuzz.safetensors")),
    ) {
        Ok(t) => format!("ok {}", t.len().min(4)),
        Err(e) => e,
    }
}

pub(super) fn run_config(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    match sig("config", ModelConfig::from_hf_json(&text)) {
        Ok(c) => format!("ok {}", c.arch),
        Err(e) => e,
    }
}

pub(super) fn run_manifest(data: &[u8]) -> String {
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
pub(super) fn run_wire(data: &[u8]) -> String {
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

pub(super) fn run_http(data: &[u8]) -> String {
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
pub(super) fn chat_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let f = GgufFile::open(&crate::smollm2_gguf()).expect("open SmolLM2");
        Tokenizer::from_gguf_vocab(&vocab_from_gguf(&f).expect("vocab")).expect("tokenizer")
    })
}

/// Input: a template, 0x00, then messages separated by 0x01, each `role 0x02 content`.
pub(super) fn run_chat(data: &[u8]) -> String {
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
        Ok(ids) => format!("ok {:?} {}", t.origin(), ids.len().min(1)),
        Err(e) => e,
    }
}

// --- seeds -----------------------------------------------------------------------------
