//! Server-sent events: a job's events as OpenAI `chat.completion.chunk` and
//! `text_completion` chunks, ending with `[DONE]`.

use super::*;

/// Waits for the job's first event, so that a failure before any text (a dead cluster)
/// is still answered with an error status rather than inside a 200 stream.
pub(super) async fn first_event(t: &mut Ticket) -> Result<JobEvent, ApiError> {
    match t.rx.recv().await {
        Some(JobEvent::Failed(e)) => Err(e),
        Some(ev) => Ok(ev),
        None => Err(lost_worker()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

fn chat_chunk(m: &Meta, delta: ChatDelta, finish: Option<&str>) -> Event {
    chat_chunk_with(m, delta, finish, None)
}

fn chat_chunk_with(
    m: &Meta,
    delta: ChatDelta,
    finish: Option<&str>,
    logprobs: Option<serde_json::Value>,
) -> Event {
    let c = ChatCompletionChunk {
        id: m.id.clone(),
        object: "chat.completion.chunk".into(),
        created: m.created,
        model: m.model.clone(),
        choices: vec![ChatChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish.map(String::from),
        }],
        usage: None,
    };
    Event::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn text_chunk(m: &Meta, text: String, finish: Option<&str>) -> Event {
    text_chunk_with(m, text, finish, None)
}

fn text_chunk_with(
    m: &Meta,
    text: String,
    finish: Option<&str>,
    logprobs: Option<serde_json::Value>,
) -> Event {
    let c = Completion {
        id: m.id.clone(),
        object: "text_completion".into(),
        created: m.created,
        model: m.model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs,
            finish_reason: finish.map(String::from),
        }],
        usage: None,
    };
    Event::default().data(serde_json::to_string(&c).unwrap_or_default())
}

fn usage_chunk(m: &Meta, kind: Kind, usage: Usage) -> Event {
    let json = match kind {
        Kind::Chat => serde_json::to_string(&ChatCompletionChunk {
            id: m.id.clone(),
            object: "chat.completion.chunk".into(),
            created: m.created,
            model: m.model.clone(),
            choices: vec![],
            usage: Some(usage),
        }),
        Kind::Completion => serde_json::to_string(&Completion {
            id: m.id.clone(),
            object: "text_completion".into(),
            created: m.created,
            model: m.model.clone(),
            choices: vec![],
            usage: Some(usage),
        }),
    };
    Event::default().data(json.unwrap_or_default())
}

/// Turns one job event into the SSE events to send; `true` once the stream is over.
fn events_for(ev: JobEvent, m: &Meta, kind: Kind, out: &mut Vec<Event>) -> bool {
    match ev {
        JobEvent::Text(t, infos) => {
            out.push(match kind {
                Kind::Chat => chat_chunk_with(
                    m,
                    ChatDelta {
                        role: None,
                        content: Some(t),
                    },
                    None,
                    m.logprobs.then(|| chat_logprobs(&infos)),
                ),
                Kind::Completion => {
                    text_chunk_with(m, t, None, m.logprobs.then(|| completion_logprobs(&infos)))
                }
            });
            false
        }
        JobEvent::Done {
            finish_reason,
            completion_tokens,
            ..
        } => {
            out.push(match kind {
                Kind::Chat => chat_chunk(m, ChatDelta::default(), Some(finish_reason)),
                Kind::Completion => text_chunk(m, String::new(), Some(finish_reason)),
            });
            if m.include_usage {
                out.push(usage_chunk(
                    m,
                    kind,
                    Usage::new(m.prompt_tokens, completion_tokens),
                ));
            }
            out.push(Event::default().data("[DONE]"));
            true
        }
        JobEvent::Failed(e) => {
            out.push(Event::default().data(e.body().to_string()));
            true
        }
    }
}

struct StreamState {
    ticket: Ticket,
    meta: Meta,
    kind: Kind,
    pending: std::collections::VecDeque<Event>,
    over: bool,
}

/// The SSE response; the stream owns the ticket, so dropping it (client gone) cancels the job.
pub(super) fn sse(ticket: Ticket, first: JobEvent, meta: Meta, kind: Kind) -> Response {
    let mut initial = Vec::new();
    if kind == Kind::Chat {
        initial.push(chat_chunk(
            &meta,
            ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
        ));
    }
    let over = events_for(first, &meta, kind, &mut initial);
    let state = StreamState {
        ticket,
        meta,
        kind,
        pending: initial.into(),
        over,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(ev), s));
            }
            if s.over {
                return None;
            }
            let mut out = Vec::new();
            match s.ticket.rx.recv().await {
                Some(ev) => s.over = events_for(ev, &s.meta, s.kind, &mut out),
                None => {
                    out.push(Event::default().data(lost_worker().body().to_string()));
                    s.over = true;
                }
            }
            s.pending.extend(out);
        }
    });
    sse_response(stream)
}

fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).into_response()
}
