//! Test kit shared by the tests and the benchmark: a fake OpenAI-compatible upstream, a fake
//! Anthropic Messages API, a fake Azure OpenAI resource, fake Bedrock and Google (Gemini and
//! Vertex AI) upstreams, a fake Stripe, and a harness that runs the real proxy binary.

#![allow(clippy::panic, reason = "a test harness fails loudly")]

pub mod control;
pub mod db;
pub mod fake;
pub mod fake_anthropic;
pub mod fake_azure;
pub mod fake_bedrock;
pub mod fake_embeddings;
pub mod fake_google;
pub mod fake_responses;
pub mod fake_signin;
pub mod fake_smtp;
pub mod fake_stripe;
pub mod harness;
pub mod python;
pub mod serve;
pub mod services;
pub mod tls;

pub use control::{ControlOptions, ControlProcess};
pub use db::TestDatabase;
pub use fake::{Behavior, FakeUpstream, FakeUsage};
pub use fake_anthropic::{AnthropicBehavior, AnthropicUsage, FakeAnthropic};
pub use fake_azure::{AzureBehavior, FakeAzure};
pub use fake_bedrock::{BedrockBehavior, BedrockUsage, FakeBedrock};
pub use fake_embeddings::{fake_embedding, word_count};
pub use fake_google::{FakeGoogle, GoogleBehavior, GoogleUsage, TestServiceAccount};
pub use fake_signin::{FakeGitHub, FakeOidc, IdTokenFault, RegisteredClient};
pub use fake_smtp::{FakeSmtp, Mail};
pub use fake_stripe::{FakeStripe, StripeFailure};
pub use harness::ProxyProcess;
pub use services::{PrivatePostgres, PrivateRedis, PrivateRedisCluster};
