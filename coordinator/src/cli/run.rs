//! `tpi run`: one prompt, one completion.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tpi_coordinator::chat::Message;
use tpi_coordinator::generate::{GenRequest, Session};
use tpi_coordinator::npy;

use super::{ClusterArgs, ModelArgs, SamplingArgs};

/// `tpi run` flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Prompt text.
    #[arg(long, short = 'p', conflicts_with = "tokens")]
    pub prompt: Option<String>,
    /// Prompt as token ids, comma-separated (no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write the logits behind each generated token to this .npy file ([tokens, vocab] float32).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

/// Runs `tpi run`.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let sampler = a.sampling.sampler()?;
    let (loaded, backend) = super::open_backend(&a.model, &a.cluster, 0)?;
    let prompt_ids = match (&a.prompt, &a.tokens) {
        (_, Some(t)) => {
            if a.chat {
                bail!("--chat needs --prompt text, not --tokens");
            }
            t.clone()
        }
        (Some(p), None) => {
            let tok = loaded.tokenizer()?;
            if a.chat {
                loaded
                    .chat()?
                    .encode(tok, &[Message::new("user", p)], true)?
            } else {
                // Special-token text in a prompt stays text; --tokens sends control ids.
                tok.encode_plain(p, true)?
            }
        }
        (None, None) => bail!("give a prompt with --prompt TEXT or --tokens 1,2,3"),
    };
    let ctx = a
        .model
        .ctx
        .unwrap_or(loaded.files.config.max_position_embeddings);
    let mut session = Session::new(backend, ctx)?;
    let req = GenRequest {
        prompt_ids: prompt_ids.clone(),
        max_tokens: a.sampling.max_tokens,
        sampler,
        stop_ids: loaded.stop_ids(),
        ignore_eos: a.sampling.ignore_eos,
        keep_logits: a.logits_out.is_some(),
        cancel: None,
        deadline: None,
    };
    let tok = loaded.tokenizer.as_ref();
    let mut dec = tok.map(|t| t.stream_decoder());
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let out = session.generate(&req, &mut |id, _| {
        if stream {
            let piece = match dec.as_mut() {
                Some(d) => d.push(id).unwrap_or_default(),
                None => format!("{id} "),
            };
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err = Some(e);
                return false;
            }
        }
        true
    })?;
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
    }
    if let Some(path) = &a.logits_out {
        let vocab = loaded.files.config.vocab_size;
        npy::write_f32_2d(path, &out.logits, vocab)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let text = match tok {
        Some(t) => t.decode(&out.generated_ids, true)?,
        None => String::new(),
    };
    if a.cluster.profile {
        eprintln!();
        if let Some(l) = session.backend().links() {
            eprint!("{l}");
        }
        eprint!("{}", super::profile_summary(&out.steps));
    }
    if a.json {
        let j = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": out.generated_ids,
            "text": text,
            "ttft_ms": out.ttft.as_secs_f64() * 1e3,
            "tokens_per_s": out.tokens_per_s(),
            "finish_reason": out.finish,
            "prefill_tokens": out.prefilled,
            "steps": out.steps,
            "backend": session.backend().info(),
        });
        writeln!(stdout, "{j}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated; TTFT {:.1} ms{}]",
            prompt_ids.len(),
            out.generated_ids.len(),
            out.ttft.as_secs_f64() * 1e3,
            out.rate_note()
        );
    }
    Ok(())
}
