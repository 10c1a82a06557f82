//! tokn$ data plane: a Pingora proxy serving the OpenAI-compatible API.
//!
//! Start at [`server::build`] (wiring) and [`gateway::Gateway`] (the request path).

pub mod chat;
pub mod clock;
pub mod control;
pub mod error;
pub mod gateway;
pub mod hot_state;
pub mod keys;
pub mod metrics;
pub mod ops;
pub mod providers;
pub mod relay;
pub mod server;
pub mod snapshot;
pub mod upstream;
pub mod usage;
