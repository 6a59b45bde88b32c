//! tpi-coordinator: rank 0. Backend choice, the planner, shards, tokenizer and chat templates, sampling, the generation loop, the OpenAI-compatible server, and the `tpi` CLI.
pub mod backend;
pub mod chat;
pub mod cluster;
pub mod discovery;
pub mod engine;
pub mod error;
pub mod generate;
pub mod links;
pub mod loader;
pub mod local;
pub mod logprobs;
pub mod npy;
pub mod planner;
pub mod sampler;
pub mod server;
pub mod shards;
pub mod tokenizer;

pub use error::{Error, Result};
