//! End-to-end tests: the real `tokn-proxy` binary, driven over HTTP by real clients, in front of
//! the workspace's fake OpenAI-compatible upstream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

mod anthropic;
mod azure;
mod bedrock;
mod billing;
mod chat;
mod conformance;
mod embeddings;
mod errors;
mod failover;
mod faults;
mod google;
mod load;
mod messages;
mod openai_sdk;
mod responses;
mod surfaces;
mod transport;
