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
                // transformers 5 saves the template beside the config; older versions inside it.
                let tmpl = std::fs::read_to_string(path.join("chat_template.jinja"))
                    .ok()
                    .or_else(|| {
                        let t = std::fs::read_to_string(path.join("tokenizer_config.json")).ok()?;
                        let v = serde_json::from_str::<serde_json::Value>(&t).ok()?;
                        v.get("chat_template")?.as_str().map(String::from)
                    });
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

    /// Token ids that end a reply: the config's EOS ids, an HF directory's
    /// `generation_config.json` `eos_token_id` (one id or a list), and the tokenizer's
    /// end-of-turn tokens (`<|eot_id|>`, `<end_of_turn>`, `<|im_end|>`, ...).
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.files.config.eos_token_ids.clone();
        let gen_cfg = std::fs::read_to_string(self.files.path.join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if let Some(v) = gen_cfg.as_ref().and_then(|v| v.get("eos_token_id")) {
            let list = match v {
                serde_json::Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            for id in list.iter().filter_map(|x| x.as_u64()) {
                if !ids.contains(&(id as u32)) {
                    ids.push(id as u32);
                }
            }
        }
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
