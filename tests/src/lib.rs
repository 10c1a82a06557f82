//! Test kit shared by the tests and the benchmark: a fake OpenAI-compatible upstream and a
//! harness that runs the real proxy binary.

#![allow(clippy::panic, reason = "a test harness fails loudly")]

pub mod control;
pub mod db;
pub mod fake;
pub mod harness;
pub mod python;
pub mod tls;

pub use control::{ControlOptions, ControlProcess};
pub use db::TestDatabase;
pub use fake::{Behavior, FakeUpstream, FakeUsage};
pub use harness::ProxyProcess;
