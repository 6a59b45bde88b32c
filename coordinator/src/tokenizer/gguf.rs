//! A GGUF vocabulary turned into the equivalent of a `tokenizer.json` (model,
//! pre-tokenizer, decoder, added tokens, post-processor). Two GGUF tokenizer models are
//! supported:
//!
//! * `"gpt2"`: byte-level BPE. The split regex is picked from `tokenizer.ggml.pre` (see
//!   [`Tokenizer::from_gguf_vocab`] for the table); an unknown `pre` is an error rather than a
//!   silent fallback, because a wrong split regex gives plausible but wrong ids.
//! * `"llama"`: SentencePiece BPE, rebuilt the way transformers' `LlamaTokenizer` does it (BPE with
//!   byte fallback, `▁` Metaspace with prefix on the first piece, merges derived from the scores).
//!
//! Tokens marked control (`token_type` 3, e.g. `<|im_start|>`) become special added tokens, so the
//! literal text `<|im_start|>` maps to its single id; user-defined tokens (type 4) become
//! non-special added tokens, as transformers and llama.cpp do.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::{plain_copy, Tokenizer, TokenizerError};

/// GGUF `token_type` value of a control token (`<|im_start|>`, `<s>`, ...).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `token_type` value of a user-defined token (an added, non-special token).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama-3's split regex (`llama-bpe` and friends).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o / Llama-4 split regex.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral "tekken" split regex.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The vocabulary fields a GGUF file carries (`tokenizer.ggml.*`), decoupled from the GGUF reader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `"smollm"`, `"llama-bpe"`, `"default"`, `"gpt2"`, `"qwen2"`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores; used to rank merges for `"llama"`).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`, each `"left right"`.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`. When absent: `true` for `"llama"`, `false` otherwise
    /// (transformers' and llama.cpp's defaults).
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`. When absent: `false`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece only: prepend `▁` to the text). When
    /// absent: `true`. Ignored by byte-level BPE, as in transformers.
    pub add_space_prefix: Option<bool>,
}

/// Reads the `tokenizer.ggml.*` metadata of a GGUF file into a [`GgufVocab`].
///
/// Fails with [`TokenizerError::NoTokenizer`] when the file has no `tokenizer.ggml.tokens`.
pub fn vocab_from_gguf(f: &tpi_node::model::gguf::GgufFile) -> Result<GgufVocab, TokenizerError> {
    let tokens = f
        .get_str_array("tokenizer.ggml.tokens")
        .ok_or(TokenizerError::NoTokenizer)?;
    Ok(GgufVocab {
        model: f
            .get_str("tokenizer.ggml.model")
            .unwrap_or("llama")
            .to_string(),
        pre: f.get_str("tokenizer.ggml.pre").map(str::to_string),
        tokens,
        scores: f.get_f32_array("tokenizer.ggml.scores"),
        token_types: f.get_i32_array("tokenizer.ggml.token_type"),
        merges: f.get_str_array("tokenizer.ggml.merges"),
        bos_id: f.get_u32("tokenizer.ggml.bos_token_id"),
        eos_id: f.get_u32("tokenizer.ggml.eos_token_id"),
        unk_id: f.get_u32("tokenizer.ggml.unknown_token_id"),
        pad_id: f.get_u32("tokenizer.ggml.padding_token_id"),
        add_bos: f.get_bool("tokenizer.ggml.add_bos_token"),
        add_eos: f.get_bool("tokenizer.ggml.add_eos_token"),
        add_space_prefix: f.get_bool("tokenizer.ggml.add_space_prefix"),
    })
}

/// GPT-2's byte -> printable char table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false, false),
    ]})
}

fn digits_then_bytes() -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        byte_level(false, true),
    ]})
}

/// `(normalizer, pre_tokenizer)` for a byte-level BPE vocabulary with the given `tokenizer.ggml.pre`.
fn gpt2_pre_tokenizer(pre: Option<&str>) -> Result<(Value, Value), TokenizerError> {
    let nfc = json!({"type": "NFC"});
    Ok(match pre.unwrap_or("default") {
        // GPT-2's regex after isolating every digit (llama.cpp: `\p{N}` then the GPT-2 regex).
        // This is what SmolLM/SmolLM2's and StarCoder's tokenizer.json declare.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (Value::Null, digits_then_bytes())
        }
        "default" | "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v1-en"
        | "jina-v2-es" | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" | "olmo" | "mpt"
        | "jais" | "gigachat" => (Value::Null, byte_level(false, true)),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => (Value::Null, split_then_bytes(LLAMA3_SPLIT)),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" => (nfc, split_then_bytes(QWEN2_SPLIT)),
        "gpt-4o" | "llama4" | "minimax-m2" => (Value::Null, split_then_bytes(GPT4O_SPLIT)),
        "tekken" => (Value::Null, split_then_bytes(TEKKEN_SPLIT)),
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    })
}

/// Merges recovered from SentencePiece scores, as transformers' `generate_merges` does: every
/// split of a token into two vocabulary pieces, ordered best score first (ties: shorter left
/// piece, then shorter right piece, then vocabulary order).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // A Python dict keeps the first insertion position and the last value.
    let mut order: Vec<&str> = Vec::new();
    let mut score_of: HashMap<&str, f32> = HashMap::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for tok in order {
        let score = score_of[tok];
        let mut local: Vec<(&str, &str, f32)> = tok
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| {
                let (l, r) = tok.split_at(i);
                (vocab.contains_key(l) && vocab.contains_key(r)).then_some((l, r, score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    merges.sort_by(|a, b| {
        let ka = (a.0.chars().count(), a.1.chars().count());
        let kb = (b.0.chars().count(), b.1.chars().count());
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(kb.cmp(&ka))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

fn split_merge(m: &str) -> Result<(String, String), TokenizerError> {
    m.split_once(' ')
        .map(|(l, r)| (l.to_string(), r.to_string()))
        .ok_or_else(|| TokenizerError::InvalidVocab(format!("merge {m:?} is not \"left right\"")))
}

/// A `TemplateProcessing` post-processor adding BOS/EOS as configured.
fn post_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special = serde_json::Map::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let mut items = Vec::new();
        if let Some((t, id)) = bos {
            items.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            special.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        items.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some((t, id)) = eos {
            items.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            special.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        if seq == "A" {
            single.extend(items.iter().cloned());
        }
        pair.extend(items);
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

fn vocab_json(tokens: &[String]) -> Value {
    let mut m = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // On duplicates the first id wins in the map; the later ids stay decodable only through
        // the added-tokens table, if they are there.
        m.entry(t.clone()).or_insert(json!(i));
    }
    Value::Object(m)
}

fn merges_json(merges: &[(String, String)]) -> Value {
    Value::Array(merges.iter().map(|(l, r)| json!([l, r])).collect())
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF vocabulary describes, matching transformers'
    /// `AutoTokenizer.from_pretrained(.., gguf_file=..)` on the model's text.
    ///
    /// For `"gpt2"` vocabularies the split is chosen from `tokenizer.ggml.pre`:
    ///
    /// | `pre` | pre-tokenizer |
    /// |---|---|
    /// | `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva-7b` | `Digits(individual)` + `ByteLevel(regex)` |
    /// | absent, `default`, `gpt2`, `gpt-2`, `phi-2`, `olmo`, `mpt`, `jais`, `roberta-bpe`, `jina-*`, `gigachat` | `ByteLevel(regex)` |
    /// | `llama3`, `llama-v3`, `llama-bpe`, `falcon3`, `falcon-h1`, `pixtral`, `dbrx`, `smaug-bpe`, `lfm2`, `midm-2.0` | Llama-3 `Split` + `ByteLevel` |
    /// | `qwen2`, `deepseek-r1-qwen`, `kormo`, `megrez` | NFC + Qwen2 `Split` + `ByteLevel` |
    /// | `gpt-4o`, `llama4`, `minimax-m2` | GPT-4o `Split` + `ByteLevel` |
    /// | `tekken` | Tekken `Split` + `ByteLevel` |
    ///
    /// Anything else is [`TokenizerError::UnsupportedPreTokenizer`].
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Self, TokenizerError> {
        if v.tokens.is_empty() {
            return Err(TokenizerError::NoTokenizer);
        }
        let n = v.tokens.len();
        for (name, id) in [
            ("bos", v.bos_id),
            ("eos", v.eos_id),
            ("unk", v.unk_id),
            ("pad", v.pad_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::InvalidVocab(format!(
                        "{name} token id {id} is out of range for {n} tokens"
                    )));
                }
            }
        }
        if let Some(tt) = &v.token_types {
            if tt.len() != n {
                return Err(TokenizerError::InvalidVocab(format!(
                    "{} token types for {n} tokens",
                    tt.len()
                )));
            }
        }
        let token_type = |i: usize| v.token_types.as_ref().map_or(1, |tt| tt[i]);
        let mut mislabelled: HashSet<usize> = HashSet::new();

        let (tokens, normalizer, pre_tokenizer, decoder, model, add_bos_default) = match v
            .model
            .as_str()
        {
            "gpt2" => {
                // The vocabulary is stored in GPT-2's byte alphabet already; anything that is not
                // gets re-spelled (as transformers does).
                let spelling = bytes_to_unicode();
                let alphabet: HashSet<char> = spelling.iter().copied().collect();
                let tokens: Vec<String> = v
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        if t.chars().all(|c| alphabet.contains(&c)) {
                            t.clone()
                        } else {
                            // A control token outside the byte alphabet is a llama.cpp mislabel;
                            // transformers does not add it as special, neither do we.
                            mislabelled.insert(i);
                            t.bytes().map(|b| spelling[b as usize]).collect()
                        }
                    })
                    .collect();
                let merges = match &v.merges {
                    Some(m) => m
                        .iter()
                        .map(|m| split_merge(m))
                        .collect::<Result<Vec<_>, _>>()?,
                    None => {
                        return Err(TokenizerError::InvalidVocab(
                            "byte-level BPE vocabulary without tokenizer.ggml.merges".into(),
                        ))
                    }
                };
                let (normalizer, pre_tokenizer) = gpt2_pre_tokenizer(v.pre.as_deref())?;
                let model = json!({
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab_json(&tokens), "merges": merges_json(&merges),
                });
                (
                    tokens,
                    normalizer,
                    pre_tokenizer,
                    byte_level(true, true),
                    model,
                    false,
                )
            }
            "llama" => {
                let merges =
                    match (&v.merges, &v.scores) {
                        (Some(m), _) => m
                            .iter()
                            .map(|m| split_merge(m))
                            .collect::<Result<Vec<_>, _>>()?,
                        (None, Some(s)) if s.len() == n => merges_from_scores(&v.tokens, s),
                        _ => return Err(TokenizerError::InvalidVocab(
                            "SentencePiece vocabulary without tokenizer.ggml.scores (or merges)"
                                .into(),
                        )),
                    };
                let prefix = v.add_space_prefix.unwrap_or(true);
                let unk = v.unk_id.map(|i| v.tokens[i as usize].clone());
                let model = json!({
                    "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab_json(&v.tokens), "merges": merges_json(&merges),
                });
                let pre = json!({"type": "Metaspace", "replacement": "\u{2581}",
                                 "prepend_scheme": if prefix { "first" } else { "never" }, "split": false});
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if prefix {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                let decoder = json!({"type": "Sequence", "decoders": dec});
                (v.tokens.clone(), Value::Null, pre, decoder, model, true)
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // Control tokens are special added tokens; user-defined ones are plain added tokens.
        // BOS/EOS/UNK/PAD are always special (transformers registers them as special tokens).
        let declared: HashSet<u32> = [v.bos_id, v.eos_id, v.unk_id, v.pad_id]
            .into_iter()
            .flatten()
            .collect();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = token_type(i);
            if (ty == TOKEN_TYPE_CONTROL && !mislabelled.contains(&i))
                || declared.contains(&(i as u32))
            {
                added.push(added_token(i, t, true));
            } else if ty == TOKEN_TYPE_USER_DEFINED {
                added.push(added_token(i, t, false));
            }
        }

        let add_bos = v.add_bos.unwrap_or(add_bos_default);
        let add_eos = v.add_eos.unwrap_or(false);
        let bos = v
            .bos_id
            .filter(|_| add_bos)
            .map(|i| (tokens[i as usize].as_str(), i));
        let eos = v
            .eos_id
            .filter(|_| add_eos)
            .map(|i| (tokens[i as usize].as_str(), i));
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor(bos, eos),
            "decoder": decoder,
            "model": model,
        });
        let inner: tokenizers::Tokenizer =
            doc.to_string().parse().map_err(TokenizerError::backend)?;
        let mut tok = Tokenizer {
            plain: plain_copy(&inner),
            inner,
            bos_id: v.bos_id,
            eos_ids: Vec::new(),
        };
        tok.eos_ids = tok.collect_eos_ids(v.eos_id);
        Ok(tok)
    }
}
