//! Text <-> token ids, built either from an HF `tokenizer.json` or from the
//! `tokenizer.ggml.*` metadata a GGUF file carries (`gguf.rs`). Either way encoding and
//! decoding are the `tokenizers` crate, exactly the HF implementation.

mod gguf;

pub use gguf::{vocab_from_gguf, GgufVocab};

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

/// Tokens that, when present in the vocabulary as special tokens, end a turn or a document and so
/// should stop generation (besides the model's declared EOS).
const STOP_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
];

/// Errors building or running a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Neither a `tokenizer.json` nor any `tokenizer.ggml.*` vocabulary is available.
    #[error("model has no tokenizer (no tokenizer.json and no tokenizer.ggml.* metadata)")]
    NoTokenizer,
    /// `tokenizer.ggml.model` names a tokenizer kind this crate cannot build.
    #[error(
        "unsupported tokenizer model {0:?} (tokenizer.ggml.model); supported: \"gpt2\", \"llama\""
    )]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not know.
    #[error(
        "unsupported pre-tokenizer {0:?} (tokenizer.ggml.pre) for a byte-level BPE vocabulary"
    )]
    UnsupportedPreTokenizer(String),
    /// The vocabulary metadata is inconsistent (e.g. a special token id out of range).
    #[error("invalid tokenizer vocabulary: {0}")]
    InvalidVocab(String),
    /// Reading a tokenizer file failed.
    #[error("reading tokenizer file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The model has no chat template and no built-in one fits its vocabulary.
    #[error("unsupported chat template: {0}")]
    UnsupportedChatTemplate(String),
    /// The chat template does not compile, or raised on the messages (roles out of order,
    /// say): the caller's messages or the model's template are at fault.
    #[error("{0}")]
    ChatTemplate(String),
    /// An error from the `tokenizers` crate (loading, encoding or decoding).
    #[error("tokenizer: {0}")]
    Backend(String),
}

impl TokenizerError {
    fn backend(e: impl std::fmt::Display) -> Self {
        TokenizerError::Backend(e.to_string())
    }
}

/// Text <-> ids. Wraps [`tokenizers::Tokenizer`].
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token parsing off: `<|im_end|>` in its input is
    /// text, never the control token (for untrusted text: message content, raw prompts).
    plain: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// Reads a token string out of a `tokenizer_config.json` field (plain string or `{"content": ..}`).
fn config_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn plain_copy(inner: &tokenizers::Tokenizer) -> tokenizers::Tokenizer {
    let mut t = inner.clone();
    t.set_encode_special_tokens(true);
    t
}

impl Tokenizer {
    /// Loads an HF `tokenizer.json`. BOS/EOS come from a `tokenizer_config.json` next to it when
    /// there is one (`bos_token`, `eos_token`); whether `encode(.., true)` adds BOS is whatever the
    /// `tokenizer.json` post-processor does, as in transformers.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(TokenizerError::backend)?;
        let cfg = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .unwrap_or(Value::Null);
        let bos_id = config_token(&cfg, "bos_token").and_then(|t| inner.token_to_id(&t));
        let eos_id = config_token(&cfg, "eos_token").and_then(|t| inner.token_to_id(&t));
        let mut tok = Tokenizer {
            plain: plain_copy(&inner),
            inner,
            bos_id,
            eos_ids: Vec::new(),
        };
        tok.eos_ids = tok.collect_eos_ids(eos_id);
        Ok(tok)
    }

    fn collect_eos_ids(&self, eos: Option<u32>) -> Vec<u32> {
        let special: HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut ids: Vec<u32> = eos.into_iter().collect();
        for s in STOP_TOKENS {
            if let Some(id) = self.inner.token_to_id(s) {
                if special.contains(&id) && !ids.contains(&id) && Some(id) != self.bos_id {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Encodes `text`. With `add_special`, the model's configured special tokens are added (BOS
    /// when the model's config says `add_bos_token`, as transformers' `add_special_tokens=True`).
    /// Special-token text such as `<|im_start|>` always maps to its single id.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(TokenizerError::backend)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes untrusted `text` with special-token parsing off: special-token text such as
    /// `<|im_end|>` is tokenised as the characters it is made of, so a user cannot forge
    /// control tokens. `add_special` as in [`Tokenizer::encode`].
    pub fn encode_plain(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .plain
            .encode(text, add_special)
            .map_err(TokenizerError::backend)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether `text` contains the text of any special token (e.g. `<|im_end|>`).
    pub fn contains_special_text(&self, text: &str) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .values()
            .any(|t| t.special && !t.content.is_empty() && text.contains(&t.content))
    }

    /// Decodes `ids` to text; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(TokenizerError::backend)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that should stop generation: the model's EOS, then any of `<|im_end|>`, `<|endoftext|>`,
    /// `<|eot_id|>`, `<|eom_id|>`, `<|end_of_text|>`, `<end_of_turn>`, `<|end|>`, `</s>` that the
    /// vocabulary has as special tokens (never the BOS).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// The model's BOS id, if it declares one (whether or not `encode` adds it).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id of a token given its vocabulary spelling (e.g. `"<|im_start|>"`, or `"Ġthe"` in a
    /// byte-level vocabulary).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The vocabulary spelling of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Incremental detokenizer for streaming, skipping special tokens (what a user should see):
    /// feed one id at a time and get the newly completed text. See [`StreamDecoder`].
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        self.stream_decoder_with(true)
    }

    /// Like [`Tokenizer::stream_decoder`], choosing whether special tokens are skipped.
    pub fn stream_decoder_with(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            inner: self.inner.decode_stream(skip_special),
        }
    }
}

/// Incremental detokenizer (see [`Tokenizer::stream_decoder`]).
///
/// Each [`StreamDecoder::push`] returns the text completed by that id: `""` while a multi-byte
/// UTF-8 character is still split across byte-level tokens, then the whole character once its
/// last byte arrives. The concatenation of everything returned equals `decode` of all the ids.
pub struct StreamDecoder<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl StreamDecoder<'_> {
    /// Feeds one id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        Ok(self
            .inner
            .step(id)
            .map_err(TokenizerError::backend)?
            .unwrap_or_default())
    }
}
