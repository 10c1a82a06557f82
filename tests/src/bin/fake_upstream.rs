//! `tokn-fake-upstream`: the fake OpenAI-compatible upstream as a process, for the benchmark
//! (Chat Completions and the Responses API), and optionally the fake Anthropic API beside it.

use std::time::Duration;

use clap::Parser;
use tokn_testkit::{AnthropicBehavior, Behavior, FakeAnthropic, FakeUpstream};

#[derive(Parser)]
#[command(about = "Fake OpenAI-compatible upstream (Chat Completions, JSON and SSE)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: std::net::SocketAddr,
    /// Content chunks per streamed answer.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// Delay before the response header, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Pause between stream chunks, in milliseconds.
    #[arg(long, default_value_t = 0, conflicts_with = "tokens_per_second")]
    chunk_interval_ms: u64,
    /// Pace the stream at this many chunks (tokens) per second instead.
    #[arg(long)]
    tokens_per_second: Option<f64>,
    /// Requests for model `bench-paced` stream at this pace (ms between chunks) ...
    #[arg(long, default_value_t = 5)]
    paced_interval_ms: u64,
    /// ... and requests for `bench-hold` at this one, to hold streams open.
    #[arg(long, default_value_t = 200)]
    hold_interval_ms: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also serve the fake Anthropic Messages API here, its replies `chunks` words long.
    #[arg(long)]
    anthropic_listen: Option<std::net::SocketAddr>,
    /// Also serve the same fake over HTTPS here (HTTP/2 by ALPN), with a CA and a `localhost`
    /// certificate made at start and written to `--tls-dir` (`ca.pem` is what clients trust).
    #[arg(long, requires = "tls_dir")]
    tls_listen: Option<std::net::SocketAddr>,
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let behavior = Behavior {
            chunks: args.chunks,
            ttft: Duration::from_millis(args.ttft_ms),
            chunk_interval: match args.tokens_per_second {
                Some(tps) if tps > 0.0 => Duration::from_secs_f64(1.0 / tps),
                _ => Duration::from_millis(args.chunk_interval_ms),
            },
            ..Behavior::default()
        };
        let paced = Behavior {
            chunk_interval: Duration::from_millis(args.paced_interval_ms),
            ..behavior.clone()
        };
        let hold = Behavior {
            chunk_interval: Duration::from_millis(args.hold_interval_ms),
            ..behavior.clone()
        };
        let fake = FakeUpstream::start_on(args.listen, behavior.clone()).await?;
        fake.stop_recording();
        fake.set_model_behavior("bench-paced", paced.clone());
        fake.set_model_behavior("bench-hold", hold.clone());
        eprintln!("tokn-fake-upstream: listening on http://{}/v1", fake.addr);
        let _tls = match (args.tls_listen, &args.tls_dir) {
            (Some(addr), Some(dir)) => {
                let ca = tokn_testkit::tls::TestCa::create(dir)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = FakeUpstream::start_tls_on(
                    addr,
                    behavior.clone(),
                    &ca.leaf_cert_pem,
                    &ca.leaf_key_pem,
                )
                .await?;
                tls.stop_recording();
                tls.set_model_behavior("bench-paced", paced.clone());
                tls.set_model_behavior("bench-hold", hold.clone());
                eprintln!(
                    "tokn-fake-upstream: HTTPS on {} (CA {})",
                    tls.tls_base_url(),
                    ca.ca_cert_path.display()
                );
                Some(tls)
            }
            _ => None,
        };
        let _anthropic = match args.anthropic_listen {
            Some(addr) => {
                let anthropic = FakeAnthropic::start_on(
                    addr,
                    AnthropicBehavior {
                        reply_words: Some(args.chunks),
                        ..AnthropicBehavior::default()
                    },
                )
                .await?;
                anthropic.stop_recording();
                eprintln!("tokn-fake-upstream: Anthropic on http://{addr}");
                Some(anthropic)
            }
            None => None,
        };
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
