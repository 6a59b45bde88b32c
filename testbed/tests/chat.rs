//! `tpi chat` as a user at a terminal meets it, driven through a pseudo-terminal (tmux):
//! line editing with the arrow keys, Ctrl-C stopping a reply and, twice at the prompt,
//! ending the chat, the commands, and colour on a terminal but not in a pipe.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tpi_testbed::{smollm2_gguf, tpi_bin, TempDir};

/// A tmux session running one command in a 200×50 pane, killed on drop.
struct Pane {
    name: String,
}

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("tmux is needed for the terminal tests (apt-get install tmux): {e}")
        })
}

impl Pane {
    fn start(name: &str, cmd: &str) -> Pane {
        let _ = tmux(&["kill-session", "-t", name]);
        let out = tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "200",
            "-y",
            "50",
            cmd,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = tmux(&["set-option", "-t", name, "remain-on-exit", "on"]);
        Pane {
            name: name.to_string(),
        }
    }

    /// The pane's text (`escapes`: with its colour codes).
    fn screen(&self, escapes: bool) -> String {
        let mut args = vec!["capture-pane", "-p", "-J", "-S", "-2000", "-t", &self.name];
        if escapes {
            args.push("-e");
        }
        String::from_utf8_lossy(&tmux(&args).stdout).into_owned()
    }

    /// Types literal text.
    fn type_text(&self, text: &str) {
        tmux(&["send-keys", "-t", &self.name, "-l", text]);
    }

    /// Presses keys by tmux name (Enter, Left, C-c, …).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.name];
        args.extend(keys);
        tmux(&args);
    }

    /// Waits until `pred(screen)` holds; panics with the screen after `secs`.
    fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen(false);
            if pred(&s) {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                panic!("waited {secs} s for {what}; the screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the command in the pane has ended.
    fn exited(&self) -> bool {
        let out = tmux(&["display-message", "-p", "-t", &self.name, "#{pane_dead}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = tmux(&["kill-session", "-t", &self.name]);
    }
}

fn chat_cmd(cache: &Path, extra: &str) -> String {
    format!(
        "env TPI_CACHE={} RUST_LOG=off {} chat --model {} --threads 1 {extra}",
        cache.display(),
        tpi_bin().display(),
        smollm2_gguf().display()
    )
}

/// Lines that end a reply: the `[N tokens, …]` summary.
fn summaries(s: &str) -> usize {
    s.lines()
        .filter(|l| l.starts_with('[') && l.contains(" tokens, TTFT"))
        .count()
}

/// Asks for a long story, presses Ctrl-C once it streams, and waits for `[stopped]`;
/// returns the screen.
fn ask_for_a_story_and_stop_it(pane: &Pane) -> String {
    pane.type_text("Write a very long story about a lighthouse keeper and a storm.");
    pane.keys(&["Enter"]);
    pane.wait_for("the story to start", 60, |s| {
        s.rsplit("lighthouse keeper and a storm.")
            .next()
            .is_some_and(|after| after.trim().len() > 20)
    });
    pane.keys(&["C-c"]);
    pane.wait_for("the reply to stop", 30, |s| s.contains("[stopped]"))
}

#[test]
fn chat_at_a_terminal_edits_stops_and_obeys_its_commands() {
    let tmp = TempDir::new("chat-pty");
    let pane = Pane::start("tpi-chat-test", &chat_cmd(tmp.path(), "--max-tokens 2000"));
    pane.wait_for("the greeting", 60, |s| {
        s.contains("/help lists the commands")
    });

    // Line editing: the arrow keys move the cursor instead of inserting escape codes.
    pane.type_text("Say hi to Bxb");
    pane.keys(&["Left", "BSpace"]);
    pane.type_text("o");
    pane.keys(&["Enter"]);
    pane.wait_for("the first reply", 60, |s| summaries(s) >= 1);
    let save = tmp.join("chat.json");
    pane.type_text(&format!("/save {}", save.display()));
    pane.keys(&["Enter"]);
    pane.wait_for("the save", 20, |s| s.contains("(saved 2 messages"));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&save).unwrap()).unwrap();
    assert_eq!(j["messages"][0]["role"], "user");
    assert_eq!(
        j["messages"][0]["content"], "Say hi to Bob",
        "the edited line"
    );
    assert_eq!(j["messages"][1]["role"], "assistant");
    assert!(
        !pane.screen(false).contains("^[["),
        "escape codes were typed into the line"
    );

    // Colour on a terminal: the reply is cyan.
    assert!(
        pane.screen(true).contains("\x1b[36m"),
        "no colour on a terminal:\n{}",
        pane.screen(true)
    );

    // Ctrl-C while a reply streams stops it and returns to the prompt.
    let s = ask_for_a_story_and_stop_it(&pane);
    assert!(!pane.exited(), "Ctrl-C during a reply ended the chat:\n{s}");

    // /stats, /help, /system and a confirmed /reset.
    pane.type_text("/stats");
    pane.keys(&["Enter"]);
    pane.wait_for("/stats", 20, |s| {
        s.contains("last reply:") && s.contains("positions")
    });
    pane.type_text("/help");
    pane.keys(&["Enter"]);
    pane.wait_for("/help", 20, |s| s.contains("/save FILE"));
    pane.type_text("/reset");
    pane.keys(&["Enter"]);
    pane.wait_for("the reset question", 20, |s| {
        s.contains("forget the conversation? [y/N]")
    });
    pane.type_text("n");
    pane.keys(&["Enter"]);
    pane.wait_for("the kept conversation", 20, |s| s.contains("(kept)"));
    pane.type_text("/reset");
    pane.keys(&["Enter"]);
    pane.wait_for("the second reset question", 20, |s| {
        s.matches("forget the conversation?").count() >= 2
    });
    pane.type_text("y");
    pane.keys(&["Enter"]);
    pane.wait_for("the reset", 20, |s| s.contains("(conversation forgotten)"));
    pane.type_text("/system You answer in French.");
    pane.keys(&["Enter"]);
    pane.wait_for("/system", 20, |s| s.contains("(system prompt set"));

    // Ctrl-C at the prompt: a hint, then a second one ends the chat.
    pane.keys(&["C-c"]);
    pane.wait_for("the hint", 20, |s| s.contains("Ctrl-C again"));
    assert!(!pane.exited(), "one Ctrl-C at the prompt ended the chat");
    pane.keys(&["C-c"]);
    let t0 = Instant::now();
    while !pane.exited() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "a second Ctrl-C did not end the chat:\n{}",
            pane.screen(false)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn chat_in_a_pipe_has_no_colour() {
    let tmp = TempDir::new("chat-pipe");
    let mut child = Command::new(tpi_bin())
        .args(["chat", "--model"])
        .arg(smollm2_gguf())
        .args(["--threads", "1", "--max-tokens", "8"])
        .env("TPI_CACHE", tmp.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tpi chat");
    {
        use std::io::Write;
        let mut w = child.stdin.take().unwrap();
        w.write_all(b"Hello\n/stats\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(!all.contains('\x1b'), "colour codes in a pipe:\n{all:?}");
    assert!(all.contains("last reply:"), "{all}");
}

/// On a local cluster, Ctrl-C stops the reply and leaves the cluster serving: the terminal's
/// SIGINT reaches rank 0 alone, not its node processes.
#[test]
fn ctrl_c_in_a_cluster_chat_keeps_the_cluster() {
    let tmp = TempDir::new("chat-pty-cluster");
    let pane = Pane::start(
        "tpi-chat-cluster-test",
        &chat_cmd(tmp.path(), "--local-cluster 2 --max-tokens 2000"),
    );
    pane.wait_for("the greeting", 60, |s| {
        s.contains("/help lists the commands")
    });
    ask_for_a_story_and_stop_it(&pane);
    pane.type_text("Hello");
    pane.keys(&["Enter"]);
    let s = pane.wait_for("a reply after the stop", 60, |s| {
        summaries(s) >= 2 || s.contains("error")
    });
    assert!(
        !s.contains("error"),
        "the cluster did not survive Ctrl-C:\n{s}"
    );
}
