//! Gemma 3 270M Q4_K_M, the real model, against transformers' reference
//! (`testbed/fixtures/gemma3/reference.json`, made by its `make_reference.py`): tokenizer
//! ids, chat renders, greedy continuations on 1, 2 and 4 ranks, and `tpi chat` and
//! `tpi serve` with it.
//!
//! Needs the model: `scripts/fetch-gemma3.sh` (or set `TPI_GEMMA3_GGUF`). The tests fail,
//! never skip, when it is missing.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;
use tpi_coordinator::chat::{ChatTemplate, Message, TemplateSource};
use tpi_coordinator::tokenizer::{vocab_from_gguf, Tokenizer};
use tpi_node::model::gguf::GgufFile;
use tpi_testbed::{
    check_ids, cmdline, finish, fixtures_dir, floats, gemma3_gguf, greedy_args, ids, read_json,
    run_tpi_json, tpi_bin, ServeProcess,
};

/// A differing greedy id is accepted only where the reference's top-1 margin is at most this
/// (the reference dequantises every tensor and runs in f32; tpi computes on the blocks
/// with integer activations, which moves logits by about 1e-3).
const MARGIN_TOL: f64 = 0.02;

fn reference() -> Value {
    read_json(&fixtures_dir().join("gemma3").join("reference.json"))
}

fn tokenizer() -> (Tokenizer, Option<String>) {
    let f = GgufFile::open(&gemma3_gguf()).expect("open the Gemma 3 GGUF");
    let tok = Tokenizer::from_gguf_vocab(&vocab_from_gguf(&f).expect("vocab")).expect("tokenizer");
    (tok, f.get_str("tokenizer.chat_template").map(String::from))
}

#[test]
fn the_file_is_the_one_the_reference_was_made_from() {
    let sha = tpi_node::model::file_digest(&gemma3_gguf()).unwrap();
    assert_eq!(sha, reference()["gguf_sha256"].as_str().unwrap());
}

#[test]
fn tokenizer_ids_are_transformers_ids() {
    let (tok, _) = tokenizer();
    let mut fails = Vec::new();
    for c in reference()["tokenizer_cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let got = tok.encode(text, true).unwrap();
        if got != want {
            fails.push(format!("{text:?}: got {got:?}, want {want:?}"));
            continue;
        }
        let decoded = tok.decode(&got, false).unwrap();
        if decoded != c["decoded"].as_str().unwrap() {
            fails.push(format!(
                "{text:?}: decoded {decoded:?}, want {}",
                c["decoded"]
            ));
        }
    }
    finish("Gemma 3 tokenizer", fails);
}

#[test]
fn chat_renders_and_ids_are_transformers() {
    let (tok, template) = tokenizer();
    // The GGUF ships no template: tpi uses Gemma 3's own.
    assert!(template.is_none());
    let chat = ChatTemplate::from_jinja(None, &tok).unwrap();
    assert_eq!(chat.origin(), TemplateSource::BuiltinGemma);
    for c in reference()["chat_cases"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        assert_eq!(
            chat.render(&msgs, true).unwrap(),
            c["text"].as_str().unwrap()
        );
        assert_eq!(chat.encode(&tok, &msgs, true).unwrap(), ids(&c["ids"]));
    }
    // Gemma's template refuses a conversation that does not alternate.
    let bad = [
        Message::new("assistant", "first"),
        Message::new("user", "x"),
    ];
    let err = chat.render(&bad, true).unwrap_err().to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
}

/// Every reference generation on `ranks` local ranks (1: in-process), with `extra` flags.
fn check_generations(ranks: usize, extra: &[&str]) {
    let r = reference();
    let mut fails = Vec::new();
    for (i, g) in r["generations"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&g["prompt_ids"]);
        let want = ids(&g["generated_ids"]);
        let margins = floats(&g["margins"]);
        let mut args = greedy_args(&gemma3_gguf(), &prompt, want.len());
        if ranks > 1 {
            args.extend(["--local-cluster".into(), ranks.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let j = run_tpi_json(&args);
        let got = ids(&j["generated_ids"]);
        let what = format!("generation {i} on {ranks} rank(s) (`{}`)", cmdline(&args));
        let ok = std::panic::catch_unwind(|| check_ids(&what, &got, &want, &margins, MARGIN_TOL));
        match ok {
            Ok(n) => eprintln!("{what}: {n}/{} steps equal", want.len()),
            Err(_) => fails.push(format!("{what}: got {got:?}, want {want:?}")),
        }
    }
    finish(&format!("Gemma 3 on {ranks} rank(s) {extra:?}"), fails);
}

#[test]
fn greedy_continuations_match_on_one_rank() {
    check_generations(1, &[]);
}

#[test]
fn greedy_continuations_match_on_two_ranks() {
    check_generations(2, &[]);
}

#[test]
fn greedy_continuations_match_on_four_ranks() {
    check_generations(4, &[]);
}

/// Streamed through a 2-block window, the 178 MB tied head and embedding included.
#[test]
fn greedy_continuations_match_streamed_through_a_window() {
    check_generations(2, &["--window", "2"]);
}

/// The reference chat generation's first `n` tokens as text. (This GGUF is the base
/// model, not the instruction-tuned one, so its "reply" is a continuation, not an answer:
/// what matters is that tpi's chat path gives transformers' tokens.)
fn reference_chat_reply(n: usize) -> String {
    let (tok, _) = tokenizer();
    let r = reference();
    let g = r["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["kind"] == "chat")
        .expect("a chat generation");
    let min_margin = floats(&g["margins"])[..n]
        .iter()
        .cloned()
        .fold(f64::MAX, f64::min);
    assert!(
        min_margin > MARGIN_TOL,
        "the reference chat reply has a near-tie"
    );
    tok.decode(&ids(&g["generated_ids"])[..n], true).unwrap()
}

#[test]
fn tpi_chat_replies_as_transformers() {
    let mut child = Command::new(tpi_bin())
        .args([
            "chat",
            "--model",
            &gemma3_gguf().display().to_string(),
            "--max-tokens",
            "16",
            "--temperature",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tpi chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tpi chat failed:\n{stderr}");
    let want = reference_chat_reply(16);
    assert_eq!(stdout.trim_end(), want.trim_end(), "stderr: {stderr}");
    assert!(stderr.contains("built-in Gemma 3 template"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tpi_serve_chat_completions_with_gemma() {
    let server = ServeProcess::start(&gemma3_gguf(), &["--local-cluster", "2"]);
    let c = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0
    });
    let r = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text.trim_end(), reference_chat_reply(16).trim_end(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    // A conversation Gemma's template refuses is the client's error: 400, with the reason.
    let bad = serde_json::json!({
        "messages": [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
        "max_tokens": 4
    });
    let r = c.post(&url).json(&bad).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("Conversation roles must alternate"), "{v}");
}
