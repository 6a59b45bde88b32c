//! The models' own chat templates, run by tpi's minijinja renderer, against transformers'
//! renders of the same conversations (`testbed/fixtures/chat_templates`, made by its
//! `make_references.py`): byte-identical text, and the template's own error where it
//! refuses a conversation.

use serde_json::Value;
use tpi_coordinator::chat::{ChatTemplate, Message};
use tpi_testbed::{finish, fixtures_dir, read_json};

#[test]
fn renders_are_byte_identical_to_transformers() {
    let dir = fixtures_dir().join("chat_templates");
    let reference = read_json(&dir.join("reference.json"));
    let today = chrono::Local::now().format("%d %b %Y").to_string();
    let templates = reference["templates"].as_object().expect("templates");
    assert!(templates.len() >= 6, "too few templates in the reference");
    let mut fails = Vec::new();
    let mut checked = 0;
    for (name, t) in templates {
        let source = std::fs::read_to_string(dir.join(name)).expect("template file");
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        let chat = ChatTemplate::new(&source, &s(&t["bos_token"]), &s(&t["eos_token"]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, case) in t["cases"].as_array().expect("cases").iter().enumerate() {
            let msgs: Vec<Message> =
                serde_json::from_value(case["messages"].clone()).expect("messages");
            let got = chat.render(&msgs, true);
            match (case["text"].as_str(), case["raises"].as_str(), got) {
                (Some(want), _, Ok(text)) => {
                    let text = text.replace(&today, "{DATE}");
                    if text != want {
                        fails.push(format!(
                            "{name} case {i}: rendered\n{text:?}\nexpected\n{want:?}"
                        ));
                    }
                }
                (None, Some(msg), Err(e)) => {
                    if !e.to_string().contains(msg) {
                        fails.push(format!("{name} case {i}: error {e} lacks {msg:?}"));
                    }
                }
                (_, _, got) => {
                    fails.push(format!("{name} case {i}: got {got:?}, expected {}", case))
                }
            }
            checked += 1;
        }
    }
    eprintln!("{checked} renders compared");
    finish("chat templates", fails);
}

#[test]
fn a_template_that_does_not_compile_is_refused_at_load() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
    assert!(err.to_string().contains("does not compile"), "{err}");
}

#[test]
fn a_template_that_loops_forever_fails_instead_of_hanging() {
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let err = t.render(&[Message::new("user", "hi")], true).unwrap_err();
    assert!(err.to_string().contains("chat template"), "{err}");
}
