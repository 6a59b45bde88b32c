//! `tpi chat`: an interactive conversation with the model's chat template.

use std::io::{BufRead, Write};

use clap::Args;
use tpi_coordinator::chat::Message;
use tpi_coordinator::generate::{Finish, GenRequest, Session};

use super::{ClusterArgs, ModelArgs, SamplingArgs};

/// `tpi chat` flags.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// A system prompt (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
}

/// Runs `tpi chat`: reads a line, streams the reply, repeats until EOF or `/exit`.
pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let sampler = a.sampling.sampler()?;
    let (loaded, backend) = super::open_backend(&a.model, &a.cluster, 0)?;
    let tok = loaded.tokenizer()?;
    let template = loaded.chat()?;
    let ctx = a
        .model
        .ctx
        .unwrap_or(4096.min(loaded.files.config.max_position_embeddings));
    let mut session = Session::new(backend, ctx)?;
    let mut history: Vec<Message> = Vec::new();
    if let Some(s) = &a.system {
        history.push(Message::new("system", s));
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("tpi chat — type a message, /reset to start over, /exit or Ctrl-D to quit.");
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                session.clear();
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let ids = match template.encode(tok, &history, true) {
            Ok(ids) => ids,
            Err(e) => {
                // The template refused the conversation: say why, keep chatting.
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        let req = GenRequest {
            prompt_ids: ids,
            max_tokens: a.sampling.max_tokens,
            sampler,
            stop_ids: loaded.stop_ids(),
            ignore_eos: false,
            keep_logits: false,
            cancel: None,
            deadline: None,
        };
        let mut dec = tok.stream_decoder();
        let res = session.generate(&req, &mut |id, _| {
            let piece = dec.push(id).unwrap_or_default();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            true
        });
        match res {
            Ok(g) => {
                writeln!(out)?;
                let reply = tok.decode(&g.generated_ids, true)?;
                history.push(Message::new("assistant", reply.trim_end()));
                if g.finish == Finish::Length {
                    eprintln!("[reply cut at --max-tokens {}]", a.sampling.max_tokens);
                }
                eprintln!(
                    "[{} tokens, TTFT {:.0} ms{}]",
                    g.generated_ids.len(),
                    g.ttft.as_secs_f64() * 1e3,
                    g.rate_note()
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}
