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
    /// Prompt text (`-`: read it from stdin). Sent as one user message through the
    /// model's chat template when the model has one (see --raw); with no prompt flag, a
    /// prompt piped into stdin is read.
    #[arg(long, short = 'p', conflicts_with_all = ["tokens", "prompt_file"])]
    pub prompt: Option<String>,
    /// Read the prompt text from this file.
    #[arg(long, conflicts_with = "tokens")]
    pub prompt_file: Option<PathBuf>,
    /// Prompt as token ids, comma-separated (no tokenizer needed; never templated).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// Send the prompt text as it is, without the model's chat template (for base
    /// models, or to continue a text).
    #[arg(long, conflicts_with_all = ["chat", "system"])]
    pub raw: bool,
    /// Wrap the prompt in a chat template even when the model has none of its own (a
    /// built-in ChatML/Gemma template then).
    #[arg(long)]
    pub chat: bool,
    /// A system message before the prompt (through the chat template).
    #[arg(long)]
    pub system: Option<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write the logits behind each generated token to this .npy file ([tokens, vocab] float32).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

/// The prompt text, from `--prompt` (`-`: stdin), `--prompt-file`, or stdin when it is not
/// a terminal and no prompt flag was given; None when there is none.
fn prompt_text(a: &RunArgs) -> anyhow::Result<Option<String>> {
    use std::io::{IsTerminal, Read};
    let stdin = || -> anyhow::Result<String> {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .context("reading the prompt from stdin")?;
        Ok(t)
    };
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) if p == "-" => stdin()?,
        (Some(p), _) => return Ok(Some(p.clone())),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the prompt file {}", f.display()))?,
        (None, None) if a.tokens.is_none() && !std::io::stdin().is_terminal() => stdin()?,
        (None, None) => return Ok(None),
    };
    // A file or a pipe ends with a newline that is not part of the question.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(Some(text.to_string()))
}

/// Runs `tpi run`.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let sampler = a.sampling.sampler()?;
    let (loaded, backend) = super::open_backend(&a.model, &a.cluster, 0)?;
    let text = prompt_text(&a)?;
    let prompt_ids = match (text, &a.tokens) {
        (_, Some(t)) => {
            if a.chat || a.system.is_some() {
                bail!("--chat and --system need prompt text, not --tokens");
            }
            t.clone()
        }
        (Some(p), None) => {
            let tok = loaded.tokenizer()?;
            // The model's own template by default, as llama-cli and ollama do: an
            // instruct model given raw text answers nonsense.
            let templated = !a.raw && (a.chat || a.system.is_some() || loaded.chat_template.is_some());
            if templated {
                let mut msgs = Vec::new();
                if let Some(sys) = &a.system {
                    msgs.push(Message::new("system", sys));
                }
                msgs.push(Message::new("user", &p));
                let hint = if a.chat || a.system.is_some() {
                    ""
                } else {
                    " (--raw sends the prompt without it)"
                };
                loaded
                    .chat()
                    .and_then(|c| Ok(c.encode(tok, &msgs, true)?))
                    .with_context(|| format!("applying the model's chat template{hint}"))?
            } else {
                // Special-token text in a prompt stays text; --tokens sends control ids.
                tok.encode_plain(&p, true)?
            }
        }
        (None, None) => bail!(
            "give a prompt: --prompt TEXT, --prompt - or --prompt-file FILE (or pipe it into stdin), or --tokens 1,2,3"
        ),
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
