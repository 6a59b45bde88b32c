//! Opens a model with its tokenizer and chat template, whatever its format.

use std::path::Path;

use tpi_node::model::ModelFiles;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::tokenizer::{vocab_from_gguf, Tokenizer, TokenizerError};

/// A model's files plus what turns text into its tokens.
pub struct LoadedModel {
    /// Mapped weights and config.
    pub files: ModelFiles,
    /// The tokenizer, when the model ships one.
    pub tokenizer: Option<Tokenizer>,
    /// The raw jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
}

impl LoadedModel {
    /// Opens a GGUF file or an HF directory and its tokenizer.
    pub fn open(path: &Path) -> Result<Self> {
        let files = ModelFiles::open(path)?;
        files.validate()?;
        let (tokenizer, chat_template) = match &files.gguf {
            Some(g) => {
                let tok = match vocab_from_gguf(g) {
                    Ok(v) => Some(Tokenizer::from_gguf_vocab(&v)?),
                    Err(TokenizerError::NoTokenizer) => None,
                    Err(e) => return Err(e.into()),
                };
                (tok, g.get_str("tokenizer.chat_template").map(String::from))
            }
            None => {
                let tj = path.join("tokenizer.json");
                let tok = if tj.exists() {
                    Some(Tokenizer::from_file(&tj)?)
                } else {
                    None
                };
                let tmpl = std::fs::read_to_string(path.join("tokenizer_config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v.get("chat_template")?.as_str().map(String::from));
                (tok, tmpl)
            }
        };
        Ok(LoadedModel {
            files,
            tokenizer,
            chat_template,
        })
    }

    /// The tokenizer, or a clear error naming the model.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Input(format!(
                "{} has no tokenizer (no tokenizer.json and no tokenizer.ggml.* metadata); pass --tokens instead of text",
                self.files.path.display()
            ))
        })
    }

    /// The chat template for this model.
    pub fn chat(&self) -> Result<ChatTemplate> {
        Ok(ChatTemplate::from_jinja(
            self.chat_template.as_deref(),
            self.tokenizer()?,
        )?)
    }

    /// Token ids that end a reply.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.files.config.eos_token_ids.clone();
        if let Some(t) = &self.tokenizer {
            for id in t.eos_ids() {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }
}
