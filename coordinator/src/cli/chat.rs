//! `tpi chat`: an interactive conversation with the model's chat template.
//!
//! Lines are read with rustyline (editing, history kept in the tpi cache). Ctrl-C while a
//! reply streams stops that reply and returns to the prompt; Ctrl-C twice at the prompt, or
//! Ctrl-D, or `/exit`, ends the chat. On a terminal the model's replies are coloured (not
//! when piped, nor with NO_COLOR set).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use tpi_coordinator::chat::Message;
use tpi_coordinator::generate::{Finish, GenOutput, GenRequest, Session};

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

const HELP: &str = "\
commands:
  /help           this list
  /reset          forget the conversation (asks first)
  /system TEXT    set the system prompt (and forget the conversation)
  /save FILE      write the conversation to FILE as JSON
  /stats          the last reply's speed and the context used
  /exit           quit (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while a reply is written stops it.";

/// What the terminal shows: colours only on a terminal and without NO_COLOR.
struct Style {
    colour: bool,
}

impl Style {
    fn reply_start(&self) -> &'static str {
        if self.colour {
            "\x1b[36m"
        } else {
            ""
        }
    }
    fn reply_end(&self) -> &'static str {
        if self.colour {
            "\x1b[0m"
        } else {
            ""
        }
    }
    fn note(&self, text: &str) {
        if self.colour {
            eprintln!("\x1b[2m{text}\x1b[0m");
        } else {
            eprintln!("{text}");
        }
    }
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
    let style = Style {
        colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    // Ctrl-C during a reply: a flag the generation checks. (At the prompt the line editor
    // has the terminal in raw mode and reads Ctrl-C as a key.) Without a terminal on
    // stdin, Ctrl-C keeps its default action: there is no prompt to return to.
    let stop = Arc::new(AtomicBool::new(false));
    if std::io::stdin().is_terminal() {
        signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
            .context("cannot handle Ctrl-C")?;
    }
    let mut rl = DefaultEditor::new().context("cannot start the line editor")?;
    let history_file = tpi_coordinator::shards::cache_root().join("chat_history");
    let _ = rl.load_history(&history_file);
    let mut last: Option<(usize, GenOutput)> = None;
    let mut ctrl_c = false;
    let mut out = std::io::stdout();
    eprintln!("tpi chat: type a message; /help lists the commands, /exit or Ctrl-D quits.");
    loop {
        let line = match rl.readline("> ") {
            Ok(l) => {
                ctrl_c = false;
                l
            }
            Err(ReadlineError::Interrupted) if ctrl_c => break,
            Err(ReadlineError::Interrupted) => {
                ctrl_c = true;
                style.note("(Ctrl-C again, /exit or Ctrl-D to quit)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading a line"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(text);
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "exit" | "quit" => break,
                "help" => eprintln!("{HELP}"),
                "reset" => {
                    let sure = matches!(
                        rl.readline("forget the conversation? [y/N] ").as_deref(),
                        Ok("y" | "Y" | "yes")
                    );
                    if sure {
                        history.retain(|m| m.role == "system");
                        session.clear();
                        style.note("(conversation forgotten)");
                    } else {
                        style.note("(kept)");
                    }
                }
                "system" if arg.is_empty() => eprintln!("usage: /system TEXT"),
                "system" => {
                    history.clear();
                    history.push(Message::new("system", arg));
                    session.clear();
                    style.note("(system prompt set; conversation forgotten)");
                }
                "save" if arg.is_empty() => eprintln!("usage: /save FILE"),
                "save" => match save(Path::new(arg), &history) {
                    Ok(()) => style.note(&format!("(saved {} messages to {arg})", history.len())),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "stats" => match &last {
                    Some((prompt, g)) => style.note(&format!(
                        "last reply: {} tokens, first after {:.0} ms{}; context {} of {ctx} positions",
                        g.generated_ids.len(),
                        g.ttft.as_secs_f64() * 1e3,
                        g.rate_note(),
                        prompt + g.generated_ids.len()
                    )),
                    None => style.note("(no reply yet)"),
                },
                _ => eprintln!("unknown command /{name}: /help lists them"),
            }
            continue;
        }
        history.push(Message::new("user", text));
        let ids = match template.encode(tok, &history, true) {
            Ok(ids) => ids,
            Err(e) => {
                // The template refused the conversation: say why, keep chatting.
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        stop.store(false, Ordering::SeqCst);
        let req = GenRequest {
            prompt_ids: ids,
            max_tokens: a.sampling.max_tokens,
            sampler,
            stop_ids: loaded.stop_ids(),
            ignore_eos: false,
            keep_logits: false,
            cancel: Some(stop.clone()),
            deadline: None,
        };
        let prompt_len = req.prompt_ids.len();
        let mut dec = tok.stream_decoder();
        let _ = write!(out, "{}", style.reply_start());
        let res = session.generate(&req, &mut |id, _| {
            let piece = dec.push(id).unwrap_or_default();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            !stop.load(Ordering::SeqCst)
        });
        let _ = write!(out, "{}", style.reply_end());
        match res {
            Ok(g) => {
                writeln!(out)?;
                let reply = tok.decode(&g.generated_ids, true)?;
                history.push(Message::new("assistant", reply.trim_end()));
                if stop.load(Ordering::SeqCst) || g.finish == Finish::Cancelled {
                    style.note("[stopped]");
                } else if g.finish == Finish::Length {
                    style.note(&format!(
                        "[reply cut at --max-tokens {}]",
                        a.sampling.max_tokens
                    ));
                }
                style.note(&format!(
                    "[{} tokens, TTFT {:.0} ms{}]",
                    g.generated_ids.len(),
                    g.ttft.as_secs_f64() * 1e3,
                    g.rate_note()
                ));
                last = Some((prompt_len, g));
            }
            Err(e) => {
                writeln!(out)?;
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    if let Some(dir) = history_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = rl.save_history(&history_file);
    Ok(())
}

/// Writes the conversation to `path` as `{"messages": [{"role", "content"}, …]}`.
fn save(path: &Path, history: &[Message]) -> anyhow::Result<()> {
    let j = serde_json::json!({ "messages": history });
    std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}
