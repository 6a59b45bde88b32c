//! The generation loop on a real backend (SmolLM2, one device): long prompts prefill in
//! chunks, and a request stops between chunks when it is cancelled or out of time.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tpi_coordinator::engine::LocalBackend;
use tpi_coordinator::generate::{Finish, GenRequest, Session, PREFILL_CHUNK};
use tpi_coordinator::sampler::SamplerConfig;
use tpi_node::model::ModelFiles;
use tpi_testbed::smollm2_gguf;

fn session() -> Session {
    let files = ModelFiles::open(&smollm2_gguf()).unwrap();
    let backend = LocalBackend::new(&files, 2, Default::default()).unwrap();
    Session::new(Box::new(backend), 4096).unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % 49152).collect()
}

#[test]
fn long_prompts_prefill_in_chunks() {
    let mut s = session();
    let n = 2 * PREFILL_CHUNK + 77;
    let req = GenRequest::new(prompt(n), 3, SamplerConfig::default());
    let out = s.generate(&req, &mut |_, _| true).unwrap();
    assert_eq!(out.generated_ids.len(), 3);
    let steps: Vec<usize> = out.steps.iter().map(|r| r.tokens).collect();
    assert_eq!(steps, [PREFILL_CHUNK, PREFILL_CHUNK, 77, 1, 1]);
    // A prompt of one chunk or less is one step, as it always was.
    let req = GenRequest::new(prompt(PREFILL_CHUNK), 1, SamplerConfig::default());
    s.clear();
    let out = s.generate(&req, &mut |_, _| true).unwrap();
    let steps: Vec<usize> = out.steps.iter().map(|r| r.tokens).collect();
    assert_eq!(steps, [PREFILL_CHUNK]);
}

#[test]
fn cancelled_or_late_requests_stop_before_the_next_chunk() {
    let mut s = session();
    let cancel = Arc::new(AtomicBool::new(true));
    let req = GenRequest {
        cancel: Some(cancel),
        ..GenRequest::new(prompt(3 * PREFILL_CHUNK), 5, SamplerConfig::default())
    };
    let out = s.generate(&req, &mut |_, _| true).unwrap();
    assert_eq!(out.finish, Finish::Cancelled);
    assert!(out.generated_ids.is_empty() && out.steps.is_empty());
    let req = GenRequest {
        deadline: Some(Instant::now()),
        ..GenRequest::new(prompt(3 * PREFILL_CHUNK), 5, SamplerConfig::default())
    };
    let out = s.generate(&req, &mut |_, _| true).unwrap();
    assert_eq!(out.finish, Finish::TimedOut);
    assert!(out.generated_ids.is_empty() && out.steps.is_empty());
    // The session is still usable, and a request without limits runs to its length.
    let req = GenRequest::new(prompt(10), 4, SamplerConfig::default());
    let out = s.generate(&req, &mut |_, _| true).unwrap();
    assert_eq!((out.finish, out.generated_ids.len()), (Finish::Length, 4));
}
