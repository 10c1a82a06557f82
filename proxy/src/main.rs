//! `tokn-proxy`: runs the data plane on a configuration file, or on the embedded default.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tokn-proxy",
    version,
    about = "tokn$ data plane: OpenAI-compatible LLM gateway"
)]
struct Args {
    /// Configuration file (TOML). Without it the embedded default runs: the `mock` model only.
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
    /// Take over the listening sockets of a running instance (graceful upgrade, see Pingora).
    #[arg(long, short)]
    upgrade: bool,
    /// Validate the configuration, list every problem, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOKN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let text = match &args.config {
        None => tokn_config::DEFAULT_CONFIG_TOML.to_owned(),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tokn-proxy: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let valid = match tokn_config::load(&text, std::env::vars(), &|name| std::env::var(name).ok()) {
        Ok(v) => v,
        Err(problems) => {
            eprint!("tokn-proxy: {problems}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        eprintln!("tokn-proxy: configuration is valid");
        return ExitCode::SUCCESS;
    }
    let server = match tokn_proxy::server::build(&valid, args.upgrade) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tokn-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = &valid.config;
    for addr in &cfg.server.listen {
        eprintln!("tokn-proxy: serving the OpenAI API at http://{addr}/v1");
    }
    for addr in &cfg.server.tls_listen {
        eprintln!("tokn-proxy: serving the OpenAI API at https://{addr}/v1");
    }
    if let Some(addr) = &cfg.server.metrics_listen {
        eprintln!("tokn-proxy: Prometheus metrics at http://{addr}/metrics");
    }
    eprintln!("tokn-proxy: usage records appended to {}", cfg.usage.path);
    if let (Some(control), Some(section)) = (&valid.control, &cfg.control) {
        eprintln!(
            "tokn-proxy: configuration from the control plane at {} (sealed copy in {})",
            control.url, section.snapshot_path
        );
    }
    if valid.redis_url.is_some() {
        // The URL may hold a password: only the prefix is shown.
        eprintln!(
            "tokn-proxy: hot state in Redis under prefix `{}`",
            cfg.hot_state.prefix
        );
    }
    if args.config.is_none() {
        eprintln!(
            "tokn-proxy: embedded default: model `mock`, demo key {}",
            tokn_config::DEMO_KEY
        );
    }
    server.run_forever()
}
